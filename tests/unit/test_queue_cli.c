/*
 * test_queue_cli — `petrel queue list|show|cat` output against a real spool
 * written in a temp directory.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <ftw.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <uv.h>

#include "log.h"
#include "queue_cli.h"
#include "spool.h"
#include "util.h"

#define FAR_FUTURE_MS INT64_C(4102444800000) /* 2100-01-01T00:00:00Z */

static const char content_a[] = "Received: from x\r\nSubject: hi\r\n\tfolded\r\n\r\nbody\0line\r\n";

struct fx {
    char tmp[64];
    char dir[128];
    char qid_a[SPOOL_QID_SIZE];
    char qid_b[SPOOL_QID_SIZE];
    char qid_c[SPOOL_QID_SIZE];
};

static void
on_done(int status, void *arg)
{
    int *calls = arg;
    assert_int_equal(status, 0);
    (*calls)++;
}

static struct spool_rcpt
rcpt(const char *addr, enum spool_rcpt_state state, uint32_t attempts, int64_t next,
     const char *last)
{
    return (struct spool_rcpt){ .addr = (char *)addr, .state = state, .attempts = attempts,
                                .next_attempt_ms = next, .last_reply = (char *)last };
}

/* Envelopes borrow string literals: spool_submit copies them. */
static void
submit(struct spool *sp, struct spool_envelope *e, const char *content, size_t len, int *calls)
{
    spool_new_qid(sp, e->qid);
    if (e->listener == NULL)
        e->listener = (char *)"mx";
    if (e->local_ip == NULL)
        e->local_ip = (char *)"192.0.2.1";
    if (e->client_ip == NULL)
        e->client_ip = (char *)"198.51.100.7";
    struct span part = { content, len };
    spool_submit(sp, e, &part, 1, on_done, calls);
}

static int
fx_rm(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

static int
fx_setup(void **state)
{
    struct fx *f = xcalloc(1, sizeof(*f));
    assert_true(str_copy(f->tmp, sizeof(f->tmp), "/tmp/petrel-test-qcli-XXXXXX"));
    assert_non_null(mkdtemp(f->tmp));
    snprintf(f->dir, sizeof(f->dir), "%s/spool", f->tmp);
    log_init(LOG_WARNING, LOG_FORMAT_TEXT);

    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    struct spool *sp = NULL;
    char *err = NULL;
    assert_int_equal(spool_open(&loop, f->dir, NULL, &sp, &err), 0);
    int64_t now = now_ms();
    int calls = 0;

    struct spool_rcpt ra[2] = {
        rcpt("rcpt0@example.net", SPOOL_RCPT_PENDING, 0, 0, NULL),
        rcpt("rcpt1@example.net", SPOOL_RCPT_DEFERRED, 2, FAR_FUTURE_MS, "451 4.7.1 Try later"),
    };
    ra[0].orcpt = (char *)"rfc822;orig@example.net";
    ra[0].notify = 6; /* SUCCESS, FAILURE */
    struct spool_envelope a = {
        .arrival_ms = now - 42000, .sender = (char *)"alice@example.org", .rcpts = ra,
        .nrcpts = 2, .size_param = 100, .body = 2, .smtputf8 = true, .ret = 2,
        .envid = (char *)"envid-42", .client_helo = (char *)"client.example",
        .auth_user = (char *)"alice", .xbind_ip = (char *)"203.0.113.5",
        .xbind_hostname = (char *)"out.example",
    };
    submit(sp, &a, content_a, sizeof(content_a) - 1, &calls);
    memcpy(f->qid_a, a.qid, SPOOL_QID_SIZE);

    struct spool_rcpt rb = rcpt("x@example.net", SPOOL_RCPT_FAILED, 1, 0,
                                "550 5.1.1 No such user");
    struct spool_envelope b = { .arrival_ms = now - 3 * 86400000 - 5000, .sender = (char *)"",
                                .rcpts = &rb, .nrcpts = 1 };
    submit(sp, &b, "Subject: bounce\r\n\r\n", 19, &calls);
    memcpy(f->qid_b, b.qid, SPOOL_QID_SIZE);

    struct spool_rcpt rc = rcpt("y@example.net", SPOOL_RCPT_DELIVERED, 1, 0, NULL);
    struct spool_envelope c = { .arrival_ms = now - 2 * 3600000 - 1000,
                                .sender = (char *)"carol@example.org", .rcpts = &rc,
                                .nrcpts = 1 };
    submit(sp, &c, "x", 1, &calls);
    memcpy(f->qid_c, c.qid, SPOOL_QID_SIZE);
    uv_run(&loop, UV_RUN_DEFAULT);
    spool_set_quarantine(sp, f->qid_b, "virus found", on_done, &calls);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_int_equal(calls, 4);
    spool_close(sp);
    assert_int_equal(uv_loop_close(&loop), 0);
    *state = f;
    return 0;
}

static int
fx_teardown(void **state)
{
    struct fx *f = *state;
    nftw(f->tmp, fx_rm, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    return 0;
}

struct capture {
    FILE *out;
    FILE *err;
    char *out_buf;
    char *err_buf;
    size_t out_len;
    size_t err_len;
};

static void
capture_begin(struct capture *c)
{
    memset(c, 0, sizeof(*c));
    c->out = open_memstream(&c->out_buf, &c->out_len);
    c->err = open_memstream(&c->err_buf, &c->err_len);
    assert_non_null(c->out);
    assert_non_null(c->err);
}

static void
capture_end(struct capture *c)
{
    fclose(c->out);
    fclose(c->err);
}

static void
capture_free(struct capture *c)
{
    free(c->out_buf);
    free(c->err_buf);
}

/* Asserts that text holds want as one whole line. */
static void
assert_line(const char *text, const char *want)
{
    size_t n = strlen(want);
    for (const char *p = text; (p = strstr(p, want)) != NULL; p++) {
        if ((p == text || p[-1] == '\n') && p[n] == '\n')
            return;
    }
    fail_msg("got output:\n%s\nwant the line \"%s\"", text, want);
}

static void
test_queue_cli_list_shows_messages_and_summary(void **state)
{
    struct fx *f = *state;
    struct capture c;
    capture_begin(&c);
    int rc = queue_cli_list(f->dir, c.out, c.err);
    capture_end(&c);
    assert_int_equal(rc, 0);
    assert_int_equal(c.err_len, 0);
    char want[256];
    assert_line(c.out_buf, "QUEUE ID            AGE      SIZE  SENDER");
    snprintf(want, sizeof(want), "%s    42s  %8zu  <alice@example.org>", f->qid_a,
             sizeof(content_a) - 1);
    assert_line(c.out_buf, want);
    assert_line(c.out_buf, "  pending  <rcpt0@example.net>  next=now");
    assert_line(c.out_buf, "  deferred  <rcpt1@example.net>  attempts=2 "
                           "next=2100-01-01T00:00:00Z  last=\"451 4.7.1 Try later\"");
    snprintf(want, sizeof(want), "%s     3d        19  <>  (quarantined: virus found)",
             f->qid_b);
    assert_line(c.out_buf, want);
    assert_line(c.out_buf,
                "  failed  <x@example.net>  attempts=1  last=\"550 5.1.1 No such user\"");
    snprintf(want, sizeof(want), "%s     2h         1  <carol@example.org>", f->qid_c);
    assert_line(c.out_buf, want);
    assert_line(c.out_buf, "  delivered  <y@example.net>  attempts=1");
    assert_line(c.out_buf,
                "-- 3 messages, 4 recipients (1 pending, 1 deferred, 1 failed, 1 quarantined)");
    /* arrival (qid) order */
    assert_true(strstr(c.out_buf, f->qid_a) < strstr(c.out_buf, f->qid_b));
    assert_true(strstr(c.out_buf, f->qid_b) < strstr(c.out_buf, f->qid_c));
    capture_free(&c);
}

static void
test_queue_cli_show_prints_envelope_and_headers(void **state)
{
    struct fx *f = *state;
    struct capture c;
    capture_begin(&c);
    int rc = queue_cli_show(f->dir, f->qid_a, c.out, c.err);
    capture_end(&c);
    assert_int_equal(rc, 0);
    char want[128];
    snprintf(want, sizeof(want), "queue_id: %s", f->qid_a);
    assert_line(c.out_buf, want);
    static const char *const lines[] = {
        "sender: <alice@example.org>",
        "size: 53",
        "listener: mx",
        "client: 198.51.100.7",
        "local: 192.0.2.1",
        "helo: client.example",
        "auth: alice",
        "body: 8BITMIME",
        "smtputf8: yes",
        "ret: HDRS",
        "envid: envid-42",
        "xbind: 203.0.113.5 out.example",
        "rcpt: <rcpt0@example.net> state=pending notify=SUCCESS,FAILURE "
        "orcpt=rfc822;orig@example.net next=now",
        "rcpt: <rcpt1@example.net> state=deferred attempts=2 next=2100-01-01T00:00:00Z "
        "last=\"451 4.7.1 Try later\"",
        "",
        "Received: from x",
        "Subject: hi",
        "\tfolded",
    };
    for (size_t i = 0; i < ARRAY_SIZE(lines); i++)
        assert_line(c.out_buf, lines[i]);
    assert_non_null(strstr(c.out_buf, "arrival: "));
    assert_null(strstr(c.out_buf, "quarantine:"));
    assert_null(strstr(c.out_buf, "body\\x00line"));
    assert_null(strstr(c.out_buf, "line"));
    capture_free(&c);

    capture_begin(&c);
    rc = queue_cli_show(f->dir, f->qid_b, c.out, c.err);
    capture_end(&c);
    assert_int_equal(rc, 0);
    assert_line(c.out_buf, "sender: <>");
    assert_line(c.out_buf, "quarantine: virus found");
    assert_null(strstr(c.out_buf, "helo:"));
    assert_null(strstr(c.out_buf, "envid:"));
    assert_line(c.out_buf, "Subject: bounce");
    capture_free(&c);
}

static void
test_queue_cli_cat_is_byte_exact(void **state)
{
    struct fx *f = *state;
    struct capture c;
    capture_begin(&c);
    char lower[SPOOL_QID_SIZE];
    for (size_t i = 0; i < SPOOL_QID_SIZE; i++)
        lower[i] = (char)ascii_tolower(f->qid_a[i]);
    int rc = queue_cli_cat(f->dir, lower, c.out, c.err);
    capture_end(&c);
    assert_int_equal(rc, 0);
    assert_int_equal(c.out_len, sizeof(content_a) - 1);
    assert_memory_equal(c.out_buf, content_a, sizeof(content_a) - 1);
    capture_free(&c);
}

static void
test_queue_cli_unknown_qid_and_bad_spool_fail(void **state)
{
    struct fx *f = *state;
    struct capture c;
    capture_begin(&c);
    assert_int_equal(queue_cli_show(f->dir, "0123456789ABCDEF", c.out, c.err), 1);
    assert_int_equal(queue_cli_cat(f->dir, "nonsense", c.out, c.err), 1);
    capture_end(&c);
    assert_int_equal(c.out_len, 0);
    assert_line(c.err_buf, "petrel: 0123456789ABCDEF: no such message in the queue");
    assert_line(c.err_buf, "petrel: nonsense: no such message in the queue");
    capture_free(&c);

    char missing[160];
    snprintf(missing, sizeof(missing), "%s/missing", f->tmp);
    capture_begin(&c);
    assert_int_equal(queue_cli_list(missing, c.out, c.err), 1);
    capture_end(&c);
    assert_non_null(strstr(c.err_buf, "petrel: spool "));
    assert_non_null(strstr(c.err_buf, "No such file or directory"));
    capture_free(&c);
}

static void
test_queue_cli_list_empty_queue(void **state)
{
    struct fx *f = *state;
    char empty[160];
    snprintf(empty, sizeof(empty), "%s/empty", f->tmp);
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    struct spool *sp = NULL;
    char *err = NULL;
    assert_int_equal(spool_open(&loop, empty, NULL, &sp, &err), 0);
    spool_close(sp);
    assert_int_equal(uv_loop_close(&loop), 0);
    struct capture c;
    capture_begin(&c);
    assert_int_equal(queue_cli_list(empty, c.out, c.err), 0);
    capture_end(&c);
    assert_string_equal(c.out_buf, "Queue is empty\n");
    capture_free(&c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_queue_cli_list_shows_messages_and_summary),
        cmocka_unit_test(test_queue_cli_show_prints_envelope_and_headers),
        cmocka_unit_test(test_queue_cli_cat_is_byte_exact),
        cmocka_unit_test(test_queue_cli_unknown_qid_and_bad_spool_fail),
        cmocka_unit_test(test_queue_cli_list_empty_queue),
    };
    return cmocka_run_group_tests(tests, fx_setup, fx_teardown);
}
