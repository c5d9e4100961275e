/*
 * test_spool — the journal spool on a real libuv loop and a temp directory:
 * round trips, group commit, per-recipient state, removal, torn tails,
 * corruption in older segments, rotation/GC/compaction, queue ids, locking,
 * read-only views, write failures, and corrupt journals that must not crash.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "buf.h"
#include "log.h"
#include "spool.h"
#include "util.h"

struct fx {
    uv_loop_t loop;
    char tmp[64];         /* mkdtemp'ed root */
    char dir[128];        /* <tmp>/spool */
    char seg1[192];       /* <dir>/journal/0000000000000001.log */
    char logpath[128];
    int logfd;
};

static int
fx_setup(void **state)
{
    struct fx *f = xcalloc(1, sizeof(*f));
    assert_true(str_copy(f->tmp, sizeof(f->tmp), "/tmp/petrel-test-spool-XXXXXX"));
    assert_non_null(mkdtemp(f->tmp));
    snprintf(f->dir, sizeof(f->dir), "%s/spool", f->tmp);
    snprintf(f->seg1, sizeof(f->seg1), "%s/journal/0000000000000001.log", f->dir);
    snprintf(f->logpath, sizeof(f->logpath), "%s/log", f->tmp);
    f->logfd = open(f->logpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    assert_true(f->logfd >= 0);
    log_init(LOG_INFO, LOG_FORMAT_TEXT);
    log_set_fd(f->logfd);
    assert_int_equal(uv_loop_init(&f->loop), 0);
    *state = f;
    return 0;
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
fx_teardown(void **state)
{
    struct fx *f = *state;
    int r = uv_loop_close(&f->loop);
    log_set_fd(2);
    close(f->logfd);
    nftw(f->tmp, fx_rm, 16, FTW_DEPTH | FTW_PHYS);
    free(f);
    if (r != 0)
        fail_msg("uv_loop_close: got %d, want 0", r);
    return 0;
}

static char *
slurp(const char *path, size_t *len)
{
    struct buf b;
    buf_init(&b);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    for (;;) {
        char *w = buf_reserve(&b, 65536);
        ssize_t n = read(fd, w, 65536);
        assert_true(n >= 0);
        if (n == 0)
            break;
        buf_commit(&b, (size_t)n);
    }
    close(fd);
    return buf_steal(&b, len);
}

static bool
log_has(struct fx *f, const char *needle)
{
    char *s = slurp(f->logpath, NULL);
    bool r = strstr(s, needle) != NULL;
    if (!r)
        print_message("log does not contain \"%s\":\n%s", needle, s);
    free(s);
    return r;
}

/* One log line holding both a and b (independent of the text/JSON rendering). */
static bool
log_has_line(struct fx *f, const char *a, const char *b)
{
    char *s = slurp(f->logpath, NULL);
    bool r = false;
    for (char *line = strtok(s, "\n"); line != NULL && !r; line = strtok(NULL, "\n"))
        r = strstr(line, a) != NULL && strstr(line, b) != NULL;
    free(s);
    if (!r)
        print_message("log has no line with \"%s\" and \"%s\"\n", a, b);
    return r;
}

static uint64_t
file_size(const char *path)
{
    struct stat st;
    assert_int_equal(stat(path, &st), 0);
    return (uint64_t)st.st_size;
}

static bool
file_exists(const char *path)
{
    struct stat st;
    return stat(path, &st) == 0;
}

/* ---- spool helpers ---- */

static struct spool *
xopen(struct fx *f, const char *dir, const struct spool_options *opts)
{
    struct spool *sp = NULL;
    char *err = NULL;
    if (spool_open(&f->loop, dir, opts, &sp, &err) != 0)
        fail_msg("spool_open %s: %s", dir, err);
    assert_null(err);
    return sp;
}

static struct spool *
xopen_ro(const char *dir)
{
    struct spool *sp = NULL;
    char *err = NULL;
    if (spool_open_readonly(dir, &sp, &err) != 0)
        fail_msg("spool_open_readonly %s: %s", dir, err);
    return sp;
}

struct done {
    int calls;
    int status;
    int order;
};

static int done_order;

static void
on_done(int status, void *arg)
{
    struct done *d = arg;
    d->calls++;
    d->status = status;
    d->order = done_order++;
}

static void
env_fill(struct spool_envelope *e, struct spool *sp, size_t nrcpts)
{
    memset(e, 0, sizeof(*e));
    spool_new_qid(sp, e->qid);
    e->arrival_ms = 1700000000123;
    e->sender = xstrdup("alice@example.org");
    e->nrcpts = nrcpts;
    e->rcpts = xcalloc(nrcpts ? nrcpts : 1, sizeof(*e->rcpts));
    for (size_t i = 0; i < nrcpts; i++) {
        e->rcpts[i].addr = xasprintf("rcpt%zu@example.net", i);
        if (i == 0) {
            e->rcpts[i].orcpt = xstrdup("rfc822;orig@example.net");
            e->rcpts[i].notify = 6;
        }
    }
    e->size_param = 1234;
    e->body = 2;
    e->smtputf8 = true;
    e->ret = 2;
    e->envid = xstrdup("envid-42");
    e->listener = xstrdup("mx");
    e->local_ip = xstrdup("192.0.2.1");
    e->client_ip = xstrdup("198.51.100.7");
    e->client_helo = xstrdup("client.example");
    e->auth_user = xstrdup("alice");
    e->xbind_ip = xstrdup("203.0.113.5");
    e->xbind_hostname = xstrdup("out.example");
}

static void
assert_str_eq(const char *what, const char *got, const char *want)
{
    if (got == NULL && want == NULL)
        return;
    if (got == NULL || want == NULL || strcmp(got, want) != 0)
        fail_msg("%s: got \"%s\", want \"%s\"", what, got ? got : "(null)",
                 want ? want : "(null)");
}

static void
assert_env_eq(const struct spool_envelope *got, const struct spool_envelope *want,
              uint64_t content_size)
{
    assert_non_null(got);
    assert_str_eq("qid", got->qid, want->qid);
    assert_int_equal(got->arrival_ms, want->arrival_ms);
    assert_str_eq("sender", got->sender, want->sender);
    assert_int_equal(got->size_param, want->size_param);
    assert_int_equal(got->body, want->body);
    assert_int_equal(got->smtputf8, want->smtputf8);
    assert_int_equal(got->ret, want->ret);
    assert_str_eq("envid", got->envid, want->envid);
    assert_str_eq("listener", got->listener, want->listener);
    assert_str_eq("local_ip", got->local_ip, want->local_ip);
    assert_str_eq("client_ip", got->client_ip, want->client_ip);
    assert_str_eq("client_helo", got->client_helo, want->client_helo);
    assert_str_eq("auth_user", got->auth_user, want->auth_user);
    assert_str_eq("xbind_ip", got->xbind_ip, want->xbind_ip);
    assert_str_eq("xbind_hostname", got->xbind_hostname, want->xbind_hostname);
    assert_int_equal(got->flags, want->flags);
    assert_str_eq("quarantine_reason", got->quarantine_reason, want->quarantine_reason);
    assert_int_equal(got->content_size, content_size);
    assert_int_equal(got->nrcpts, want->nrcpts);
    for (size_t i = 0; i < want->nrcpts; i++) {
        const struct spool_rcpt *g = &got->rcpts[i];
        const struct spool_rcpt *w = &want->rcpts[i];
        assert_str_eq("rcpt addr", g->addr, w->addr);
        assert_str_eq("rcpt orcpt", g->orcpt, w->orcpt);
        assert_str_eq("rcpt last_reply", g->last_reply, w->last_reply);
        assert_int_equal(g->notify, w->notify);
        assert_int_equal(g->state, w->state);
        assert_int_equal(g->attempts, w->attempts);
        assert_int_equal(g->next_attempt_ms, w->next_attempt_ms);
        assert_int_equal(g->updated_ms, w->updated_ms);
    }
}

static void
assert_content(struct spool *sp, const char *qid, const void *want, size_t len)
{
    struct buf b;
    buf_init(&b);
    int r = spool_read_content(sp, qid, &b);
    if (r != 0)
        fail_msg("spool_read_content %s: got %d, want 0", qid, r);
    if (b.len != len)
        fail_msg("content of %s: got %zu bytes, want %zu", qid, b.len, len);
    assert_memory_equal(buf_ptr(&b), want, len);
    buf_reset(&b);
}

/* Submits one message with the given content and runs the loop until it is durable. */
static void
submit_sync(struct fx *f, struct spool *sp, struct spool_envelope *env, const char *content)
{
    struct done d = { 0 };
    struct span part = { content, strlen(content) };
    spool_submit(sp, env, &part, 1, on_done, &d);
    assert_int_equal(d.calls, 0);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(d.calls, 1);
    if (d.status != 0)
        fail_msg("submit: got status %d, want 0", d.status);
}

static struct spool_envelope
submit_simple(struct fx *f, struct spool *sp, size_t nrcpts, const char *content)
{
    struct spool_envelope e;
    env_fill(&e, sp, nrcpts);
    submit_sync(f, sp, &e, content);
    return e;
}

static void
remove_sync(struct fx *f, struct spool *sp, const char *qid)
{
    struct done d = { 0 };
    spool_remove(sp, qid, on_done, &d);
    assert_int_equal(d.calls, 0);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(d.calls, 1);
    assert_int_equal(d.status, 0);
}

/* ---- tests ---- */

static void
test_spool_submit_roundtrip_survives_reopen(void **state)
{
    struct fx *f = *state;
    struct spool *sp = xopen(f, f->dir, NULL);
    assert_int_equal(spool_count(sp), 0);

    struct spool_envelope e;
    env_fill(&e, sp, 3);
    e.rcpts[2].state = SPOOL_RCPT_DEFERRED;
    e.rcpts[2].attempts = 2;
    e.rcpts[2].next_attempt_ms = 1700000999000;
    e.rcpts[2].last_reply = xstrdup("451 4.7.1 Try later");
    char body[300];
    for (size_t i = 0; i < sizeof(body); i++)
        body[i] = (char)i; /* NUL and every byte value */
    struct span parts[] = { SPAN_LIT("Received: from x\r\n"), { body, sizeof(body) } };
    size_t clen = parts[0].len + parts[1].len;
    char *want = xmalloc(clen);
    memcpy(want, parts[0].p, parts[0].len);
    memcpy(want + parts[0].len, body, sizeof(body));

    struct done d = { 0 };
    spool_submit(sp, &e, parts, ARRAY_SIZE(parts), on_done, &d);
    assert_int_equal(d.calls, 0);
    assert_null(spool_get(sp, e.qid)); /* enters the index once durable */
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(d.calls, 1);
    assert_int_equal(d.status, 0);
    assert_env_eq(spool_get(sp, e.qid), &e, clen);
    assert_content(sp, e.qid, want, clen);
    spool_close(sp);

    sp = xopen(f, f->dir, NULL);
    assert_int_equal(spool_count(sp), 1);
    assert_env_eq(spool_get(sp, e.qid), &e, clen);
    assert_content(sp, e.qid, want, clen);
    assert_true(log_has(f, "recovered 1 messages, 2 recipients pending, 1 deferred"));
    spool_close(sp);
    spool_envelope_clear(&e);
    free(want);
}

static void
test_spool_group_commit_one_sync_per_iteration(void **state)
{
    struct fx *f = *state;
    struct spool *sp = xopen(f, f->dir, NULL);
    enum { N = 100 };
    struct done d[N] = { { 0 } };
    char qids[N][SPOOL_QID_SIZE];
    done_order = 0;
    for (int i = 0; i < N; i++) {
        struct spool_envelope e;
        env_fill(&e, sp, 1);
        memcpy(qids[i], e.qid, SPOOL_QID_SIZE);
        struct span part = SPAN_LIT("Subject: x\r\n\r\nbody\r\n");
        spool_submit(sp, &e, &part, 1, on_done, &d[i]);
        spool_envelope_clear(&e);
    }
    uv_run(&f->loop, UV_RUN_DEFAULT);
    for (int i = 0; i < N; i++) {
        if (d[i].calls != 1 || d[i].status != 0 || d[i].order != i)
            fail_msg("message %d: got calls=%d status=%d order=%d, want 1 0 %d", i, d[i].calls,
                     d[i].status, d[i].order, i);
        assert_non_null(spool_get(sp, qids[i]));
    }
    struct spool_stats st;
    spool_stats(sp, &st);
    if (st.syncs != 1 || st.commits != 1 || st.records != N)
        fail_msg("got syncs=%llu commits=%llu records=%llu, want 1 1 %d",
                 (unsigned long long)st.syncs, (unsigned long long)st.commits,
                 (unsigned long long)st.records, N);

    /* One job in flight: what is queued meanwhile waits for the next batch. */
    struct done a = { 0 };
    struct done b = { 0 };
    struct done c = { 0 };
    struct spool_envelope e;
    env_fill(&e, sp, 1);
    struct span part = SPAN_LIT("x");
    spool_submit(sp, &e, &part, 1, on_done, &a);
    spool_envelope_clear(&e);
    uv_run(&f->loop, UV_RUN_NOWAIT); /* the prepare handle starts the job */
    env_fill(&e, sp, 1);
    spool_submit(sp, &e, &part, 1, on_done, &b);
    spool_envelope_clear(&e);
    env_fill(&e, sp, 1);
    spool_submit(sp, &e, &part, 1, on_done, &c);
    spool_envelope_clear(&e);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(a.calls + b.calls + c.calls, 3);
    assert_true(a.order < b.order && b.order < c.order);
    spool_stats(sp, &st);
    if (st.syncs != 3 || st.records != N + 3)
        fail_msg("got syncs=%llu records=%llu, want 3 %d", (unsigned long long)st.syncs,
                 (unsigned long long)st.records, N + 3);
    spool_close(sp);
}

static void
test_spool_update_rcpt_survives_reopen(void **state)
{
    struct fx *f = *state;
    struct spool *sp = xopen(f, f->dir, NULL);
    struct spool_envelope e = submit_simple(f, sp, 3, "Subject: r\r\n\r\nhi\r\n");

    struct spool_rcpt st1 = { .state = SPOOL_RCPT_DELIVERED, .attempts = 1,
                              .updated_ms = 1700000001000, .last_reply = "250 2.0.0 Ok" };
    struct spool_rcpt st2 = { .state = SPOOL_RCPT_DEFERRED, .attempts = 3,
                              .next_attempt_ms = 1700000900000, .updated_ms = 1700000002000,
                              .last_reply = "451 4.3.0 Later" };
    struct done d1 = { 0 };
    struct done d2 = { 0 };
    struct done bad_qid = { 0 };
    struct done bad_idx = { 0 };
    spool_update_rcpt(sp, e.qid, 1, &st1, on_done, &d1);
    spool_update_rcpt(sp, e.qid, 2, &st2, on_done, &d2);
    spool_update_rcpt(sp, "0000000000000ABC", 0, &st1, on_done, &bad_qid);
    spool_update_rcpt(sp, e.qid, 3, &st1, on_done, &bad_idx);
    assert_int_equal(d1.calls + d2.calls + bad_qid.calls + bad_idx.calls, 0);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(d1.status, 0);
    assert_int_equal(d2.status, 0);
    assert_int_equal(bad_qid.calls, 1);
    assert_int_equal(bad_qid.status, -ENOENT);
    assert_int_equal(bad_idx.calls, 1);
    assert_int_equal(bad_idx.status, -EINVAL);

    e.rcpts[1].state = st1.state;
    e.rcpts[1].attempts = st1.attempts;
    e.rcpts[1].updated_ms = st1.updated_ms;
    e.rcpts[1].last_reply = xstrdup(st1.last_reply);
    e.rcpts[2].state = st2.state;
    e.rcpts[2].attempts = st2.attempts;
    e.rcpts[2].next_attempt_ms = st2.next_attempt_ms;
    e.rcpts[2].updated_ms = st2.updated_ms;
    e.rcpts[2].last_reply = xstrdup(st2.last_reply);
    size_t clen = strlen("Subject: r\r\n\r\nhi\r\n");
    assert_env_eq(spool_get(sp, e.qid), &e, clen);
    spool_close(sp);

    sp = xopen(f, f->dir, NULL);
    assert_env_eq(spool_get(sp, e.qid), &e, clen);
    assert_content(sp, e.qid, "Subject: r\r\n\r\nhi\r\n", clen);
    spool_close(sp);
    spool_envelope_clear(&e);
}

static void
test_spool_remove_and_quarantine_survive_reopen(void **state)
{
    struct fx *f = *state;
    struct spool *sp = xopen(f, f->dir, NULL);
    struct spool_envelope a = submit_simple(f, sp, 1, "A");
    struct spool_envelope b = submit_simple(f, sp, 1, "B");
    struct done dq = { 0 };
    struct done dr = { 0 };
    struct done dgone = { 0 };
    spool_set_quarantine(sp, a.qid, "virus found", on_done, &dq);
    spool_remove(sp, b.qid, on_done, &dr);
    spool_remove(sp, "FFFFFFFFFFFFFFF0", on_done, &dgone);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(dq.status, 0);
    assert_int_equal(dr.status, 0);
    assert_int_equal(dgone.status, -ENOENT);
    assert_null(spool_get(sp, b.qid));
    spool_close(sp);

    sp = xopen(f, f->dir, NULL);
    assert_int_equal(spool_count(sp), 1);
    assert_null(spool_get(sp, b.qid));
    const struct spool_envelope *g = spool_get(sp, a.qid);
    assert_non_null(g);
    assert_int_equal(g->flags & SPOOL_F_QUARANTINED, SPOOL_F_QUARANTINED);
    assert_str_eq("reason", g->quarantine_reason, "virus found");
    struct buf c;
    buf_init(&c);
    assert_int_equal(spool_read_content(sp, b.qid, &c), -ENOENT);

    spool_set_quarantine(sp, a.qid, NULL, on_done, &dq);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    spool_close(sp);
    sp = xopen(f, f->dir, NULL);
    g = spool_get(sp, a.qid);
    assert_non_null(g);
    assert_int_equal(g->flags, 0);
    assert_null(g->quarantine_reason);
    spool_close(sp);
    spool_envelope_clear(&a);
    spool_envelope_clear(&b);
}

static void
test_spool_torn_tail_is_truncated(void **state)
{
    struct fx *f = *state;
    struct spool *sp = xopen(f, f->dir, NULL);
    struct spool_envelope a = submit_simple(f, sp, 1, "first message\r\n");
    uint64_t size_a = file_size(f->seg1);
    struct spool_envelope b = submit_simple(f, sp, 1, "second message\r\n");
    uint64_t size_b = file_size(f->seg1);
    spool_close(sp);

    size_t len;
    char *full = slurp(f->seg1, &len);
    assert_int_equal(len, size_b);

    /* 1. a record cut short by the crash */
    assert_int_equal(truncate(f->seg1, (off_t)(size_a + (size_b - size_a) / 2)), 0);
    sp = xopen(f, f->dir, NULL);
    assert_int_equal(spool_count(sp), 1);
    assert_non_null(spool_get(sp, a.qid));
    assert_null(spool_get(sp, b.qid));
    assert_int_equal(file_size(f->seg1), size_a);
    assert_true(log_has_line(f, b.qid, "removed incomplete message"));
    spool_close(sp);

    /* 2. garbage after the last good record */
    int fd = open(f->seg1, O_WRONLY | O_TRUNC | O_CLOEXEC);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, full, len), (ssize_t)len);
    assert_int_equal(write(fd, "\0\0\0\0garbage\xff\xfe and more", 22), 22);
    close(fd);
    sp = xopen(f, f->dir, NULL);
    assert_int_equal(spool_count(sp), 2);
    assert_int_equal(file_size(f->seg1), size_b);
    assert_true(log_has(f, "removed incomplete record (bad record magic"));
    assert_content(sp, b.qid, "second message\r\n", 16);
    spool_close(sp);

    /* 3. the last record complete but damaged (bad checksum) */
    fd = open(f->seg1, O_WRONLY | O_CLOEXEC);
    assert_true(fd >= 0);
    assert_int_equal(pwrite(fd, "X", 1, (off_t)size_b - 3), 1);
    close(fd);
    sp = xopen(f, f->dir, NULL);
    assert_int_equal(spool_count(sp), 1);
    assert_null(spool_get(sp, b.qid));
    assert_int_equal(file_size(f->seg1), size_a);
    assert_true(log_has(f, "bad record checksum"));
    /* New writes go after the truncation point and survive. */
    struct spool_envelope c = submit_simple(f, sp, 1, "third\r\n");
    spool_close(sp);
    sp = xopen(f, f->dir, NULL);
    assert_int_equal(spool_count(sp), 2);
    assert_content(sp, c.qid, "third\r\n", 7);
    spool_close(sp);

    free(full);
    spool_envelope_clear(&a);
    spool_envelope_clear(&b);
    spool_envelope_clear(&c);
}

static void
copy_file(const char *from, const char *to)
{
    size_t len;
    char *data = slurp(from, &len);
    int fd = open(to, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, data, len), (ssize_t)len);
    close(fd);
    free(data);
}

static void
test_spool_bad_crc_in_older_segment_skips_rest_of_it(void **state)
{
    struct fx *f = *state;
    /* Build two segments with separate spools, then assemble a third. */
    char x[160];
    char y[160];
    char z[160];
    snprintf(x, sizeof(x), "%s/x", f->tmp);
    snprintf(y, sizeof(y), "%s/y", f->tmp);
    snprintf(z, sizeof(z), "%s/z", f->tmp);
    struct spool *sp = xopen(f, x, NULL);
    struct spool_envelope a = submit_simple(f, sp, 1, "AAAA");
    char xseg[200];
    snprintf(xseg, sizeof(xseg), "%s/journal/0000000000000001.log", x);
    uint64_t size_a = file_size(xseg);
    struct spool_envelope b = submit_simple(f, sp, 1, "BBBB");
    struct spool_envelope c = submit_simple(f, sp, 1, "CCCC");
    spool_close(sp);
    sp = xopen(f, y, NULL);
    struct spool_envelope d = submit_simple(f, sp, 1, "DDDD");
    spool_close(sp);

    char path[220];
    snprintf(path, sizeof(path), "%s/journal", z);
    assert_int_equal(mkdir(z, 0700), 0);
    assert_int_equal(mkdir(path, 0700), 0);
    snprintf(path, sizeof(path), "%s/journal/0000000000000001.log", z);
    copy_file(xseg, path);
    uint64_t size1 = file_size(path);
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    assert_int_equal(pwrite(fd, "!", 1, (off_t)size_a + 40), 1); /* inside B's payload */
    close(fd);
    char yseg[200];
    snprintf(yseg, sizeof(yseg), "%s/journal/0000000000000001.log", y);
    snprintf(path, sizeof(path), "%s/journal/0000000000000002.log", z);
    copy_file(yseg, path);

    sp = xopen(f, z, NULL);
    assert_int_equal(spool_count(sp), 2);
    assert_non_null(spool_get(sp, a.qid));
    assert_null(spool_get(sp, b.qid));
    assert_null(spool_get(sp, c.qid));
    assert_non_null(spool_get(sp, d.qid));
    assert_content(sp, a.qid, "AAAA", 4);
    assert_content(sp, d.qid, "DDDD", 4);
    assert_true(log_has(f, "bad record checksum; skipped the rest of the segment"));
    snprintf(path, sizeof(path), "%s/journal/0000000000000001.log", z);
    assert_int_equal(file_size(path), size1); /* not truncated: not the tail */
    char q[SPOOL_QID_SIZE];
    spool_new_qid(sp, q);
    assert_true(strcmp(q, d.qid) > 0);
    spool_close(sp);
    spool_envelope_clear(&a);
    spool_envelope_clear(&b);
    spool_envelope_clear(&c);
    spool_envelope_clear(&d);
}

/* The segment files, which must be a contiguous run of sequence numbers. */
static size_t
journal_segments(const char *dir, uint64_t *lo, uint64_t *hi)
{
    char jdir[200];
    snprintf(jdir, sizeof(jdir), "%s/journal", dir);
    DIR *d = opendir(jdir);
    assert_non_null(d);
    size_t n = 0;
    *lo = UINT64_MAX;
    *hi = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        uint64_t seq = strtoull(de->d_name, NULL, 16);
        n++;
        *lo = seq < *lo ? seq : *lo;
        *hi = seq > *hi ? seq : *hi;
    }
    closedir(d);
    if (n > 0 && *hi - *lo + 1 != n)
        fail_msg("segments %llu..%llu: got %zu files, want a contiguous run",
                 (unsigned long long)*lo, (unsigned long long)*hi, n);
    return n;
}

static void
test_spool_rotation_gc_and_compaction(void **state)
{
    struct fx *f = *state;
    struct spool_options opts = { .segment_size = 1 }; /* rotate before every batch */
    struct spool *sp = xopen(f, f->dir, &opts);
    struct spool_envelope l = submit_simple(f, sp, 2, "long-lived message\r\n");
    uint64_t lo;
    uint64_t hi;
    size_t max_files = 0;
    for (int i = 0; i < 40; i++) {
        char body[2000];
        memset(body, 'a' + i % 26, sizeof(body) - 1);
        body[sizeof(body) - 1] = '\0';
        struct spool_envelope m = submit_simple(f, sp, 1, body);
        remove_sync(f, sp, m.qid);
        spool_envelope_clear(&m);
        size_t n = journal_segments(f->dir, &lo, &hi);
        max_files = n > max_files ? n : max_files;
    }
    struct spool_stats st;
    spool_stats(sp, &st);
    assert_true(st.segments_created >= 80);
    assert_true(st.compacted >= 1);
    assert_true(st.segments_deleted >= 70);
    if (max_files > 6)
        fail_msg("journal files: got up to %zu, want at most 6", max_files);
    assert_false(file_exists(f->seg1)); /* the long-lived message moved on */
    assert_content(sp, l.qid, "long-lived message\r\n", 20);

    struct spool_rcpt r = { .state = SPOOL_RCPT_DEFERRED, .attempts = 7,
                            .next_attempt_ms = 1800000000000, .last_reply = "421 busy" };
    struct done d = { 0 };
    spool_update_rcpt(sp, l.qid, 1, &r, on_done, &d);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(d.status, 0);
    spool_close(sp);

    sp = xopen(f, f->dir, &opts);
    assert_int_equal(spool_count(sp), 1);
    const struct spool_envelope *g = spool_get(sp, l.qid);
    assert_non_null(g);
    assert_int_equal(g->rcpts[1].state, SPOOL_RCPT_DEFERRED);
    assert_int_equal(g->rcpts[1].attempts, 7);
    assert_str_eq("last", g->rcpts[1].last_reply, "421 busy");
    assert_int_equal(g->rcpts[0].state, SPOOL_RCPT_PENDING);
    assert_content(sp, l.qid, "long-lived message\r\n", 20);
    journal_segments(f->dir, &lo, &hi);
    spool_close(sp);
    spool_envelope_clear(&l);
}

static void
test_spool_qids_increase_past_recovered_ones(void **state)
{
    struct fx *f = *state;
    struct spool *sp = xopen(f, f->dir, NULL);
    char prev[SPOOL_QID_SIZE] = "";
    for (int i = 0; i < 20000; i++) {
        char q[SPOOL_QID_SIZE];
        spool_new_qid(sp, q);
        assert_int_equal(strlen(q), SPOOL_QID_LEN);
        assert_int_equal(strspn(q, "0123456789ABCDEF"), SPOOL_QID_LEN);
        if (strcmp(q, prev) <= 0)
            fail_msg("qid %d: got %s after %s, want increasing", i, q, prev);
        memcpy(prev, q, sizeof(q));
    }
    /* A message from "the future" (clock stepped back since). */
    struct spool_envelope e;
    env_fill(&e, sp, 1);
    memcpy(e.qid, "FFFFF00000000000", SPOOL_QID_SIZE);
    submit_sync(f, sp, &e, "x");
    spool_close(sp);
    sp = xopen(f, f->dir, NULL);
    char q[SPOOL_QID_SIZE];
    spool_new_qid(sp, q);
    assert_str_eq("qid after recovery", q, "FFFFF00000000001");
    spool_close(sp);
    spool_envelope_clear(&e);
}

static void
test_spool_second_open_fails_while_locked(void **state)
{
    struct fx *f = *state;
    struct spool *sp = xopen(f, f->dir, NULL);
    struct spool *sp2 = NULL;
    char *err = NULL;
    assert_int_equal(spool_open(&f->loop, f->dir, NULL, &sp2, &err), -1);
    assert_null(sp2);
    assert_non_null(err);
    if (strstr(err, "is in use by another petrel") == NULL)
        fail_msg("got \"%s\", want \"... is in use by another petrel\"", err);
    free(err);
    spool_close(sp);
    sp = xopen(f, f->dir, NULL);
    spool_close(sp);
}

static void
test_spool_readonly_sees_committed_messages(void **state)
{
    struct fx *f = *state;
    struct spool *ro = NULL;
    char *err = NULL;
    assert_int_equal(spool_open_readonly(f->dir, &ro, &err), -1);
    assert_non_null(err); /* no spool yet */
    free(err);

    struct spool *sp = xopen(f, f->dir, NULL);
    struct spool_envelope a = submit_simple(f, sp, 2, "hello\r\n");
    ro = xopen_ro(f->dir);
    assert_int_equal(spool_count(ro), 1);
    assert_env_eq(spool_get(ro, a.qid), &a, 7);
    assert_content(ro, a.qid, "hello\r\n", 7);
    spool_close(ro);
    /* A half-written record (the daemon mid-write) is simply not seen. */
    int fd = open(f->seg1, O_WRONLY | O_APPEND | O_CLOEXEC);
    assert_int_equal(write(fd, "PTRJ\1\1\0\0\xff\0\0\0", 12), 12);
    close(fd);
    uint64_t size = file_size(f->seg1);
    ro = xopen_ro(f->dir);
    assert_int_equal(spool_count(ro), 1);
    spool_close(ro);
    assert_int_equal(file_size(f->seg1), size);
    spool_close(sp);
    spool_envelope_clear(&a);
}

static void
test_spool_close_commits_what_is_queued(void **state)
{
    struct fx *f = *state;
    struct spool *sp = xopen(f, f->dir, NULL);
    struct spool_envelope e;
    env_fill(&e, sp, 1);
    struct done d = { 0 };
    struct span part = SPAN_LIT("queued at shutdown");
    spool_submit(sp, &e, &part, 1, on_done, &d);
    assert_int_equal(d.calls, 0);
    spool_close(sp);
    assert_int_equal(d.calls, 1);
    assert_int_equal(d.status, 0);
    sp = xopen(f, f->dir, NULL);
    assert_content(sp, e.qid, "queued at shutdown", 18);
    spool_close(sp);
    spool_envelope_clear(&e);
}

static void
test_spool_write_error_fails_batch_and_later_commits(void **state)
{
    struct fx *f = *state;
    struct spool *sp = xopen(f, f->dir, NULL);
    struct spool_envelope a = submit_simple(f, sp, 1, "kept");
    uint64_t size = file_size(f->seg1);

    struct rlimit old;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    void (*oldsig)(int) = signal(SIGXFSZ, SIG_IGN);
    struct rlimit lim = { (rlim_t)(size + 4096), old.rlim_max };
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);

    char *big = xmalloc(65536);
    memset(big, 'z', 65535);
    big[65535] = '\0';
    struct spool_envelope b;
    env_fill(&b, sp, 1);
    struct done d = { 0 };
    struct span part = { big, 65535 };
    spool_submit(sp, &b, &part, 1, on_done, &d);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, oldsig);
    assert_int_equal(d.calls, 1);
    if (d.status != -EFBIG)
        fail_msg("got status %d, want %d (-EFBIG)", d.status, -EFBIG);
    assert_null(spool_get(sp, b.qid));
    assert_true(log_has(f, "cannot commit to the journal"));

    struct done d2 = { 0 };
    struct spool_envelope c;
    env_fill(&c, sp, 1);
    spool_submit(sp, &c, &part, 1, on_done, &d2);
    assert_int_equal(d2.calls, 0);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    assert_int_equal(d2.status, -EIO);
    spool_close(sp);

    sp = xopen(f, f->dir, NULL); /* the partial record is dropped */
    assert_int_equal(spool_count(sp), 1);
    assert_content(sp, a.qid, "kept", 4);
    assert_int_equal(file_size(f->seg1), size);
    spool_close(sp);
    free(big);
    spool_envelope_clear(&a);
    spool_envelope_clear(&b);
    spool_envelope_clear(&c);
}

/* Reference CRC-32/IEEE, bit by bit, to forge checksums of mutated records. */
static uint32_t
ref_crc32(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = ~crc;
    while (n--) {
        crc ^= *p++;
        for (int k = 0; k < 8; k++)
            crc = (crc & 1) ? 0xEDB88320u ^ (crc >> 1) : crc >> 1;
    }
    return ~crc;
}

static uint32_t
get32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void
put32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* Re-checksums every record whose length still fits, so mutations reach the decoder. */
static void
fix_crcs(unsigned char *d, size_t len)
{
    size_t pos = 0;
    while (pos + 16 <= len) {
        uint32_t n = get32(d + pos + 8);
        if (n > len - pos - 16)
            break;
        put32(d + pos + 12, ref_crc32(ref_crc32(0, d + pos + 4, 8), d + pos + 16, n));
        pos += 16 + n;
    }
}

static void
test_spool_corrupt_records_never_crash(void **state)
{
    struct fx *f = *state;
    struct spool *sp = xopen(f, f->dir, NULL);
    struct spool_envelope a = submit_simple(f, sp, 3, "Subject: a\r\n\r\nA\r\n");
    struct spool_rcpt r = { .state = SPOOL_RCPT_DEFERRED, .attempts = 1, .last_reply = "4xx" };
    struct done d = { 0 };
    spool_update_rcpt(sp, a.qid, 2, &r, on_done, &d);
    spool_set_quarantine(sp, a.qid, "why", on_done, &d);
    uv_run(&f->loop, UV_RUN_DEFAULT);
    struct spool_envelope b = submit_simple(f, sp, 1, "B");
    remove_sync(f, sp, b.qid);
    spool_close(sp);

    size_t len;
    unsigned char *orig = (unsigned char *)slurp(f->seg1, &len);
    /* The CRC must match a reference implementation. */
    assert_int_equal(ref_crc32(0, (const unsigned char *)"123456789", 9), 0xCBF43926u);
    unsigned char *mut = xmalloc(len);
    srandom(12345);
    for (int iter = 0; iter < 400; iter++) {
        memcpy(mut, orig, len);
        int nflips = 1 + (int)(random() % 4);
        for (int k = 0; k < nflips; k++) {
            size_t at = (size_t)random() % len;
            switch (random() % 3) {
            case 0:
                mut[at] = (unsigned char)random();
                break;
            case 1:
                mut[at] ^= (unsigned char)(1u << (random() % 8));
                break;
            default:
                mut[at] = (random() % 2) ? 0xff : 0;
                break;
            }
        }
        size_t mlen = (iter % 5 == 0) ? (size_t)random() % len : len;
        if (iter % 2 == 0)
            fix_crcs(mut, mlen);
        int fd = open(f->seg1, O_WRONLY | O_TRUNC | O_CLOEXEC);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, mut, mlen), (ssize_t)mlen);
        close(fd);
        struct spool *ro = xopen_ro(f->dir);
        struct buf c;
        buf_init(&c);
        if (spool_count(ro) > 0 && spool_get(ro, a.qid) != NULL)
            (void)!spool_read_content(ro, a.qid, &c);
        buf_reset(&c);
        spool_close(ro);
        if (iter % 10 == 0) { /* the daemon path too (it may truncate) */
            sp = xopen(f, f->dir, NULL);
            spool_close(sp);
        }
    }
    free(mut);
    free(orig);
    spool_envelope_clear(&a);
    spool_envelope_clear(&b);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_spool_submit_roundtrip_survives_reopen, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_group_commit_one_sync_per_iteration, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_update_rcpt_survives_reopen, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_remove_and_quarantine_survive_reopen, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_torn_tail_is_truncated, fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_bad_crc_in_older_segment_skips_rest_of_it,
                                        fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_rotation_gc_and_compaction, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_qids_increase_past_recovered_ones, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_second_open_fails_while_locked, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_readonly_sees_committed_messages, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_close_commits_what_is_queued, fx_setup,
                                        fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_write_error_fails_batch_and_later_commits,
                                        fx_setup, fx_teardown),
        cmocka_unit_test_setup_teardown(test_spool_corrupt_records_never_crash, fx_setup,
                                        fx_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
