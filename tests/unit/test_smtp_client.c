/*
 * test_smtp_client — transcript tests of the delivery client FSM over
 * fake_conn: the test plays the server (connect results, reply bytes,
 * timeouts, drops) and checks the exact bytes the client wrote, the events
 * and the per-recipient replies.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "buf.h"
#include "conn.h"
#include "fakes/fake_conn.h"
#include "fakes/fake_dane.h"
#include "log.h"
#include "smtp_client.h"
#include "smtp_parse.h"

#define T_CONNECT_MS 1000
#define T_GREETING_MS 2000
#define T_COMMAND_MS 3000
#define T_DATA_INIT_MS 4000
#define T_DATA_BLOCK_MS 5000
#define T_DATA_END_MS 6000
#define T_MAX_RCPTS 8

enum t_action { T_NONE, T_QUIT, T_ABORT };

struct t_env {
    struct smtpc *c; /* NULL after CLOSED */
    struct smtpc_target targets[4];
    size_t ntargets;
    struct smtpc_options opts;
    struct sockaddr_in src;
    char events[256]; /* "READY DONE READY CLOSED" */
    size_t nrcpts;    /* of the message in flight */
    struct smtpc_reply results[T_MAX_RCPTS];
    struct smtpc_reply failure;
    char relay[400];
    enum t_action on_done;
    enum t_action on_ready;
};

static const char t_ehlo_full[] = "250-mx1.example.org\r\n"
                                  "250-PIPELINING\r\n"
                                  "250-SIZE 10240\r\n"
                                  "250-8BITMIME\r\n"
                                  "250-SMTPUTF8\r\n"
                                  "250-DSN\r\n"
                                  "250 ENHANCEDSTATUSCODES\r\n";
static const char t_ehlo_plain[] = "250-mx1.example.org\r\n"
                                   "250 ENHANCEDSTATUSCODES\r\n";
static const char t_ehlo_nolimit[] = "250-mx1.example.org\r\n"
                                     "250-PIPELINING\r\n"
                                     "250 SIZE 0\r\n";
static const char t_content[] = "Subject: hi\r\n\r\nbody\r\n"; /* 21 bytes */

static void
t_on_event(struct smtpc *c, enum smtpc_event ev, void *arg)
{
    struct t_env *e = arg;
    static const char *const names[] = {
        [SMTPC_EV_READY] = "READY",
        [SMTPC_EV_DONE] = "DONE",
        [SMTPC_EV_FAILED] = "FAILED",
        [SMTPC_EV_CLOSED] = "CLOSED",
    };
    size_t o = strlen(e->events);
    snprintf(e->events + o, sizeof(e->events) - o, "%s%s", o ? " " : "", names[ev]);
    if (!str_copy(e->relay, sizeof(e->relay), smtpc_relay(c)))
        fail_msg("relay too long");
    switch (ev) {
    case SMTPC_EV_DONE:
        for (size_t i = 0; i < e->nrcpts; i++)
            e->results[i] = *smtpc_rcpt_reply(c, i);
        if (e->on_done == T_QUIT)
            smtpc_quit(c);
        else if (e->on_done == T_ABORT)
            smtpc_abort(c);
        break;
    case SMTPC_EV_READY:
        if (e->on_ready == T_QUIT)
            smtpc_quit(c);
        else if (e->on_ready == T_ABORT)
            smtpc_abort(c);
        break;
    case SMTPC_EV_FAILED:
        e->failure = *smtpc_failure(c);
        break;
    case SMTPC_EV_CLOSED:
        e->c = NULL;
        break;
    }
}

static void
t_target(struct smtpc_target *t, const char *host, const char *ip, int port)
{
    memset(t, 0, sizeof(*t));
    if (!str_copy(t->host, sizeof(t->host), host))
        fail_msg("host too long");
    if (strchr(ip, ':')) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&t->addr;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)port);
        assert_int_equal(inet_pton(AF_INET6, ip, &s6->sin6_addr), 1);
        t->addr_len = sizeof(*s6);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&t->addr;
        s4->sin_family = AF_INET;
        s4->sin_port = htons((uint16_t)port);
        assert_int_equal(inet_pton(AF_INET, ip, &s4->sin_addr), 1);
        t->addr_len = sizeof(*s4);
    }
}

static void
t_target_unix(struct smtpc_target *t, const char *host, const char *path)
{
    memset(t, 0, sizeof(*t));
    if (!str_copy(t->host, sizeof(t->host), host))
        fail_msg("host too long");
    struct sockaddr_un *sun = (struct sockaddr_un *)&t->addr;
    sun->sun_family = AF_UNIX;
    if (!str_copy(sun->sun_path, sizeof(sun->sun_path), path))
        fail_msg("path too long");
    t->addr_len = sizeof(*sun);
}

/* Two TCP targets, a bound source, distinct timeouts. */
static void
t_init(struct t_env *e)
{
    memset(e, 0, sizeof(*e));
    t_target(&e->targets[0], "mx1.example.org", "192.0.2.7", 25);
    t_target(&e->targets[1], "mx2.example.org", "192.0.2.8", 25);
    e->ntargets = 2;
    e->src.sin_family = AF_INET;
    inet_pton(AF_INET, "198.51.100.10", &e->src.sin_addr);
    e->opts.helo_name = "client.example";
    e->opts.src = (const struct sockaddr *)&e->src;
    e->opts.src_len = sizeof(e->src);
    e->opts.connect_timeout_ms = T_CONNECT_MS;
    e->opts.greeting_timeout_ms = T_GREETING_MS;
    e->opts.command_timeout_ms = T_COMMAND_MS;
    e->opts.data_init_timeout_ms = T_DATA_INIT_MS;
    e->opts.data_block_timeout_ms = T_DATA_BLOCK_MS;
    e->opts.data_end_timeout_ms = T_DATA_END_MS;
}

static void
t_start(struct t_env *e)
{
    unsigned before = fake_conn_connects();
    e->c = smtpc_start(NULL, e->targets, e->ntargets, &e->opts, t_on_event, e);
    assert_non_null(e->c);
    assert_int_equal(fake_conn_connects(), before + 1);
    if (e->events[0] != '\0')
        fail_msg("event from inside smtpc_start: %s", e->events);
}

static struct conn *
t_conn(void)
{
    struct conn *cn = fake_conn_last();
    assert_non_null(cn);
    return cn;
}

static void
t_expect(struct conn *cn, const char *want)
{
    char *got = fake_conn_take_output(cn);
    if (strcmp(got, want) != 0)
        fail_msg("client output:\ngot:  \"%s\"\nwant: \"%s\"", got, want);
    free(got);
}

static void
t_events(struct t_env *e, const char *want)
{
    if (strcmp(e->events, want) != 0)
        fail_msg("events: got \"%s\", want \"%s\"", e->events, want);
    e->events[0] = '\0';
}

static void
t_timeout(struct conn *cn, uint64_t want)
{
    if (fake_conn_timeout(cn) != want)
        fail_msg("deadline: got %llu ms, want %llu ms", (unsigned long long)fake_conn_timeout(cn),
                 (unsigned long long)want);
}

static void
t_reply(const struct smtpc_reply *r, int code, const char *esc, const char *text)
{
    if (r->code != code || strcmp(r->esc, esc) != 0 || strcmp(r->text, text) != 0)
        fail_msg("reply: got \"%d [%s] %s\", want \"%d [%s] %s\"", r->code, r->esc, r->text, code,
                 esc, text);
}

/* Connects the current conn and greets with banner and ehlo_reply (EHLO
 * expected). Returns the conn. */
static struct conn *
t_greet(struct t_env *e, const char *ehlo_reply)
{
    struct conn *cn = t_conn();
    t_timeout(cn, T_CONNECT_MS);
    fake_conn_complete_connect(cn, 0);
    t_timeout(cn, T_GREETING_MS);
    t_expect(cn, "");
    fake_conn_push_str(cn, "220 mx1.example.org ESMTP\r\n");
    t_expect(cn, "EHLO client.example\r\n");
    t_timeout(cn, T_COMMAND_MS);
    fake_conn_push_str(cn, ehlo_reply);
    t_events(e, "READY");
    t_timeout(cn, 0);
    return cn;
}

static struct conn *
t_ready(struct t_env *e, const char *ehlo_reply)
{
    t_init(e);
    t_start(e);
    return t_greet(e, ehlo_reply);
}

/* QUIT, 221, close: CLOSED. */
static void
t_quit(struct t_env *e, struct conn *cn)
{
    smtpc_quit(e->c);
    t_expect(cn, "QUIT\r\n");
    assert_false(fake_conn_closing(cn));
    fake_conn_push_str(cn, "221 2.0.0 Bye\r\n");
    assert_true(fake_conn_closing(cn));
    fake_conn_finish_close(cn);
    t_events(e, "CLOSED");
    assert_null(e->c);
}

/* The conn must be closing; finishing the close ends the session. */
static void
t_closed(struct t_env *e, struct conn *cn, const char *want_events)
{
    assert_true(fake_conn_closing(cn));
    fake_conn_finish_close(cn);
    t_events(e, want_events);
    assert_null(e->c);
}

struct t_msg {
    struct smtpc_msg m;
    const char *rcpts[T_MAX_RCPTS];
};

static void
t_msg(struct t_msg *tm, size_t nrcpts, const char *content)
{
    static const char *const addrs[] = {"bob@example.org", "carol@example.org", "dave@example.org",
                                        "erin@example.org"};
    memset(tm, 0, sizeof(*tm));
    tm->m.qid = "0000000000000001";
    tm->m.sender = "alice@example.com";
    for (size_t i = 0; i < nrcpts; i++)
        tm->rcpts[i] = addrs[i];
    tm->m.rcpts = tm->rcpts;
    tm->m.nrcpts = nrcpts;
    tm->m.content = (struct span){content, strlen(content)};
}

static void
t_send(struct t_env *e, const struct t_msg *tm)
{
    e->nrcpts = tm->m.nrcpts;
    smtpc_send(e->c, &tm->m);
    if (e->events[0] != '\0')
        fail_msg("event from inside smtpc_send: %s", e->events);
}

/* ---- targets ------------------------------------------------------------ */

static void
test_smtp_client_connect_failure_tries_next_target(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    t_start(&e);
    struct conn *c1 = t_conn();
    const struct sockaddr_in *dst = (const struct sockaddr_in *)fake_conn_connect_dst(c1);
    assert_non_null(dst);
    assert_int_equal(ntohs(dst->sin_port), 25);
    assert_int_equal(dst->sin_addr.s_addr,
                     ((struct sockaddr_in *)&e.targets[0].addr)->sin_addr.s_addr);
    const struct sockaddr_in *src = (const struct sockaddr_in *)fake_conn_connect_src(c1);
    assert_non_null(src);
    assert_int_equal(src->sin_addr.s_addr, e.src.sin_addr.s_addr);
    assert_string_equal(smtpc_relay(e.c), "mx1.example.org[192.0.2.7]:25");

    fake_conn_complete_connect(c1, -ECONNREFUSED);
    t_expect(c1, "");
    t_events(&e, "");
    /* the next target is connected once the failed conn is closed */
    assert_true(fake_conn_closing(c1));
    fake_conn_finish_close(c1);
    struct conn *c2 = t_conn();
    assert_ptr_not_equal(c1, c2);
    dst = (const struct sockaddr_in *)fake_conn_connect_dst(c2);
    assert_int_equal(dst->sin_addr.s_addr,
                     ((struct sockaddr_in *)&e.targets[1].addr)->sin_addr.s_addr);
    assert_non_null(fake_conn_connect_src(c2));
    assert_string_equal(smtpc_relay(e.c), "mx2.example.org[192.0.2.8]:25");
    assert_string_equal(smtpc_remote_host(e.c), "mx2.example.org");
    assert_null(smtpc_local_ip(e.c));
    t_greet(&e, t_ehlo_full);
    assert_string_equal(smtpc_local_ip(e.c), "198.51.100.10");
    assert_true(smtpc_server_has_dsn(e.c));
    t_quit(&e, c2);
}

static void
test_smtp_client_5xx_banner_tries_next_target(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    t_start(&e);
    struct conn *c1 = t_conn();
    fake_conn_complete_connect(c1, 0);
    fake_conn_push_str(c1, "554 5.7.1 mx1.example.org: no SMTP service for you\r\n");
    t_expect(c1, "QUIT\r\n"); /* RFC 5321 3.1: the client says QUIT */
    assert_true(fake_conn_closing(c1));
    fake_conn_finish_close(c1);
    t_events(&e, "");
    struct conn *c2 = t_greet(&e, t_ehlo_plain);
    assert_false(smtpc_server_has_dsn(e.c));
    t_quit(&e, c2);
}

/* What each target does before READY, for the all-targets-fail table. */
enum t_fail {
    TF_REFUSED,
    TF_CONNECT_TIMEOUT,
    TF_BANNER_554,
    TF_BANNER_421,
    TF_BANNER_450,
    TF_GREETING_TIMEOUT,
    TF_GREETING_EOF,
    TF_GARBAGE_BANNER,
    TF_EHLO_HELO_550,
    TF_EHLO_421,
    TF_EHLO_TIMEOUT,
};

static void
t_fail_target(struct t_env *e, enum t_fail how)
{
    struct conn *cn = t_conn();
    if (how == TF_REFUSED) {
        fake_conn_complete_connect(cn, -ECONNREFUSED);
    } else if (how == TF_CONNECT_TIMEOUT) {
        fake_conn_fire_timeout(cn);
    } else {
        fake_conn_complete_connect(cn, 0);
        switch (how) {
        case TF_BANNER_554:
            fake_conn_push_str(cn, "554 5.7.1 go away\r\n");
            break;
        case TF_BANNER_421:
            fake_conn_push_str(cn, "421 4.3.2 busy\r\n");
            break;
        case TF_BANNER_450:
            fake_conn_push_str(cn, "450 try later\r\n");
            break;
        case TF_GREETING_TIMEOUT:
            fake_conn_fire_timeout(cn);
            break;
        case TF_GREETING_EOF:
            fake_conn_eof(cn);
            break;
        case TF_GARBAGE_BANNER:
            fake_conn_push_str(cn, "HTTP/1.1 400 Bad Request\r\n");
            break;
        case TF_EHLO_HELO_550:
            fake_conn_push_str(cn, "220 hi\r\n");
            fake_conn_push_str(cn, "550 5.5.1 no EHLO\r\n");
            fake_conn_push_str(cn, "550 5.7.1 no HELO either\r\n");
            break;
        case TF_EHLO_421:
            fake_conn_push_str(cn, "220 hi\r\n");
            fake_conn_push_str(cn, "421 4.7.0 bye\r\n");
            break;
        case TF_EHLO_TIMEOUT:
            fake_conn_push_str(cn, "220 hi\r\n");
            fake_conn_fire_timeout(cn);
            break;
        default:
            break;
        }
    }
    free(fake_conn_take_output(cn));
    assert_true(fake_conn_closing(cn));
    fake_conn_finish_close(cn);
}

static void
test_smtp_client_all_targets_fail(void **state)
{
    (void)state;
    static const struct {
        const char *label;
        enum t_fail first, second;
        int code;
        const char *esc;
        const char *text;
        bool local;
    } cases[] = {
        {"both refused", TF_REFUSED, TF_REFUSED, 451, "4.4.1",
         "connect to mx2.example.org[192.0.2.8]:25: Connection refused", true},
        {"connect timeout", TF_REFUSED, TF_CONNECT_TIMEOUT, 451, "4.4.1",
         "connect to mx2.example.org[192.0.2.8]:25: Connection timed out", true},
        {"554 banners everywhere stay permanent", TF_BANNER_554, TF_BANNER_554, 554, "5.7.1",
         "go away", false},
        {"554 then refused: temporary, last server reply kept", TF_BANNER_554, TF_REFUSED, 454,
         "4.7.1", "go away", false},
        {"refused then 554: temporary", TF_REFUSED, TF_BANNER_554, 454, "4.7.1", "go away", false},
        {"421 banner", TF_REFUSED, TF_BANNER_421, 421, "4.3.2", "busy", false},
        {"450 banner without enhanced code", TF_BANNER_450, TF_REFUSED, 450, "", "try later",
         false},
        {"greeting timeout", TF_REFUSED, TF_GREETING_TIMEOUT, 451, "4.4.2",
         "conversation with mx2.example.org[192.0.2.8]:25 timed out while receiving the "
         "initial server greeting",
         true},
        {"greeting eof", TF_REFUSED, TF_GREETING_EOF, 451, "4.4.2",
         "lost connection with mx2.example.org[192.0.2.8]:25 while receiving the initial "
         "server greeting",
         true},
        {"garbage banner", TF_REFUSED, TF_GARBAGE_BANNER, 451, "4.5.0",
         "malformed reply from mx2.example.org[192.0.2.8]:25 while receiving the initial "
         "server greeting",
         true},
        {"EHLO and HELO refused", TF_EHLO_HELO_550, TF_EHLO_HELO_550, 550, "5.7.1",
         "no HELO either", false},
        {"EHLO 421", TF_REFUSED, TF_EHLO_421, 421, "4.7.0", "bye", false},
        {"EHLO timeout", TF_REFUSED, TF_EHLO_TIMEOUT, 451, "4.4.2",
         "conversation with mx2.example.org[192.0.2.8]:25 timed out while performing the "
         "EHLO handshake",
         true},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        t_init(&e);
        t_start(&e);
        t_fail_target(&e, cases[i].first);
        t_events(&e, "");
        t_fail_target(&e, cases[i].second);
        if (strcmp(e.events, "FAILED CLOSED") != 0)
            fail_msg("%s: events: got \"%s\", want \"FAILED CLOSED\"", cases[i].label, e.events);
        assert_null(e.c);
        const struct smtpc_reply *r = &e.failure;
        if (r->code != cases[i].code || strcmp(r->esc, cases[i].esc) != 0 ||
            strcmp(r->text, cases[i].text) != 0 || r->local != cases[i].local ||
            r->scope != DELIV_SCOPE_SITE)
            fail_msg("%s: got \"%d [%s] %s\" local=%d scope=%d, want \"%d [%s] %s\" local=%d",
                     cases[i].label, r->code, r->esc, r->text, r->local, (int)r->scope,
                     cases[i].code, cases[i].esc, cases[i].text, cases[i].local);
        assert_string_equal(e.relay, "mx2.example.org[192.0.2.8]:25");
    }
}

static void
test_smtp_client_ehlo_5xx_falls_back_to_helo(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    t_start(&e);
    struct conn *cn = t_conn();
    fake_conn_complete_connect(cn, 0);
    fake_conn_push_str(cn, "220 old.example.org SMTP\r\n");
    t_expect(cn, "EHLO client.example\r\n");
    fake_conn_push_str(cn, "502 5.5.2 Error: command not recognized\r\n");
    t_expect(cn, "HELO client.example\r\n");
    t_events(&e, "");
    fake_conn_push_str(cn, "250 old.example.org\r\n");
    t_events(&e, "READY");
    /* no extensions after HELO: no parameters, one command per round trip,
     * 8BITMIME content sent without BODY= */
    struct t_msg tm;
    t_msg(&tm, 1, t_content);
    tm.m.body = SMTP_BODY_8BITMIME;
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\n");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_expect(cn, "RCPT TO:<bob@example.org>\r\n");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_expect(cn, "DATA\r\n");
    fake_conn_push_str(cn, "354 go ahead\r\n");
    t_expect(cn, "Subject: hi\r\n\r\nbody\r\n.\r\n");
    fake_conn_push_str(cn, "250 queued\r\n");
    t_events(&e, "DONE READY");
    t_reply(&e.results[0], 250, "", "queued");
    t_quit(&e, cn);
}

static void
test_smtp_client_ehlo_4xx_is_a_target_failure(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    e.ntargets = 1;
    t_start(&e);
    struct conn *cn = t_conn();
    fake_conn_complete_connect(cn, 0);
    fake_conn_push_str(cn, "220 hi\r\n");
    t_expect(cn, "EHLO client.example\r\n");
    fake_conn_push_str(cn, "451 4.3.0 try later\r\n");
    t_expect(cn, "QUIT\r\n");
    t_closed(&e, cn, "FAILED CLOSED");
    t_reply(&e.failure, 451, "4.3.0", "try later");
}

/* ---- transactions ------------------------------------------------------- */

static void
test_smtp_client_pipelining_sends_one_group(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_full);
    struct t_msg tm;
    t_msg(&tm, 2, t_content);
    tm.m.body = SMTP_BODY_8BITMIME;
    t_send(&e, &tm);
    /* RFC 2920: MAIL, every RCPT and DATA in one flush */
    t_expect(cn, "MAIL FROM:<alice@example.com> SIZE=21 BODY=8BITMIME\r\n"
                 "RCPT TO:<bob@example.org>\r\n"
                 "RCPT TO:<carol@example.org>\r\n"
                 "DATA\r\n");
    t_timeout(cn, T_COMMAND_MS);
    fake_conn_push_str(cn, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n");
    t_timeout(cn, T_COMMAND_MS);
    t_expect(cn, "");
    fake_conn_push_str(cn, "250 2.1.5 Ok\r\n");
    t_timeout(cn, T_DATA_INIT_MS);
    fake_conn_push_str(cn, "354 End data with <CR><LF>.<CR><LF>\r\n");
    t_expect(cn, "Subject: hi\r\n\r\nbody\r\n.\r\n");
    t_timeout(cn, T_DATA_END_MS);
    t_events(&e, "");
    fake_conn_push_str(cn, "250 2.0.0 Ok: queued as ABC\r\n");
    t_events(&e, "DONE READY");
    for (size_t i = 0; i < 2; i++) {
        t_reply(&e.results[i], 250, "2.0.0", "Ok: queued as ABC");
        assert_false(e.results[i].local);
        assert_int_equal(e.results[i].scope, DELIV_SCOPE_MSG);
    }
    assert_int_equal(smtpc_transactions(e.c), 1);
    t_quit(&e, cn);
}

static void
test_smtp_client_lockstep_without_pipelining(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_plain);
    struct t_msg tm;
    t_msg(&tm, 2, t_content);
    t_send(&e, &tm);
    memset(&tm.m, 0, sizeof(tm.m)); /* the struct is copied; only what it points to is borrowed */
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\n");
    fake_conn_push_str(cn, "250 2.1.0 Ok\r\n");
    t_expect(cn, "RCPT TO:<bob@example.org>\r\n");
    fake_conn_push_str(cn, "250 2.1.5 Ok\r\n");
    t_expect(cn, "RCPT TO:<carol@example.org>\r\n");
    fake_conn_push_str(cn, "250 2.1.5 Ok\r\n");
    t_expect(cn, "DATA\r\n");
    t_timeout(cn, T_DATA_INIT_MS);
    fake_conn_push_str(cn, "354 go\r\n");
    t_expect(cn, "Subject: hi\r\n\r\nbody\r\n.\r\n");
    fake_conn_push_str(cn, "250 2.0.0 Ok\r\n");
    t_events(&e, "DONE READY");
    t_reply(&e.results[1], 250, "2.0.0", "Ok");
    t_quit(&e, cn);
}

static void
test_smtp_client_size_over_limit_fails_without_mail(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, "250-mx1.example.org\r\n250-PIPELINING\r\n250 SIZE 10\r\n");
    struct t_msg tm;
    t_msg(&tm, 2, t_content);
    t_send(&e, &tm);
    t_expect(cn, "");
    assert_true(fake_conn_deferred(cn)); /* DONE comes from the loop */
    fake_conn_fire_timeout(cn);
    t_events(&e, "DONE READY");
    for (size_t i = 0; i < 2; i++) {
        t_reply(&e.results[i], 552, "5.3.4",
                "message size 21 exceeds size limit 10 of mx1.example.org[192.0.2.7]:25");
        assert_true(e.results[i].local);
        assert_int_equal(e.results[i].scope, DELIV_SCOPE_MSG);
    }
    assert_int_equal(smtpc_transactions(e.c), 0);
    /* nothing was sent: the next message goes out without RSET */
    t_msg(&tm, 1, "x\r\n");
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com> SIZE=3\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n");
    fake_conn_push_str(cn, "250 ok\r\n250 ok\r\n354 go\r\n");
    t_expect(cn, "x\r\n.\r\n");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_events(&e, "DONE READY");
    t_quit(&e, cn);
}

static void
test_smtp_client_smtputf8_required_but_not_offered(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_plain);
    struct t_msg tm;
    t_msg(&tm, 1, t_content);
    tm.m.smtputf8 = true;
    t_send(&e, &tm);
    t_expect(cn, "");
    fake_conn_fire_timeout(cn);
    t_events(&e, "DONE READY");
    t_reply(&e.results[0], 553, "5.6.7",
            "SMTPUTF8 is required, but was not offered by mx1.example.org[192.0.2.7]:25");
    t_quit(&e, cn);
}

static void
test_smtp_client_smtputf8_offered_is_passed(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_full);
    struct t_msg tm;
    t_msg(&tm, 1, t_content);
    tm.m.sender = "\xc3\xa9lise@example.com";
    tm.m.smtputf8 = true;
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<\xc3\xa9lise@example.com> SIZE=21 SMTPUTF8\r\n"
                 "RCPT TO:<bob@example.org>\r\nDATA\r\n");
    smtpc_abort(e.c);
    t_closed(&e, cn, "DONE CLOSED");
    t_reply(&e.results[0], 451, "4.3.2", "delivery to mx1.example.org[192.0.2.7]:25 aborted");
}

static void
test_smtp_client_dot_stuffing(void **state)
{
    (void)state;
    static const struct {
        const char *label;
        const char *content;
        const char *want;
    } cases[] = {
        {"leading dots doubled", ".hidden\r\n..two\r\nmid.dle\r\n.\r\nend\r\n",
         "..hidden\r\n...two\r\nmid.dle\r\n..\r\nend\r\n.\r\n"},
        {"first line", ".\r\n", "..\r\n.\r\n"},
        {"missing final CRLF added", "a\r\n.b", "a\r\n..b\r\n.\r\n"},
        {"bare LF ending gets CRLF", "a\n", "a\n\r\n.\r\n"},
        {"empty", "", ".\r\n"},
        {"dot after bare LF", "a\n.b\r\n", "a\n..b\r\n.\r\n"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        struct conn *cn = t_ready(&e, t_ehlo_plain);
        struct t_msg tm;
        t_msg(&tm, 1, cases[i].content);
        t_send(&e, &tm);
        fake_conn_push_str(cn, "250 ok\r\n250 ok\r\n354 go\r\n");
        char *got = fake_conn_take_output(cn);
        const char *body = strstr(got, "DATA\r\n");
        assert_non_null(body);
        body += 6;
        if (strcmp(body, cases[i].want) != 0)
            fail_msg("%s: got \"%s\", want \"%s\"", cases[i].label, body, cases[i].want);
        free(got);
        fake_conn_push_str(cn, "250 ok\r\n");
        t_events(&e, "DONE READY");
        t_quit(&e, cn);
    }
}

static void
test_smtp_client_large_content_written_in_chunks_as_output_drains(void **state)
{
    (void)state;
    size_t n = 200 * 1024;
    char *content = xmalloc(n + 1);
    for (size_t i = 0; i < n; i += 100) {
        memset(content + i, 'x', 98);
        content[i] = '.'; /* every line needs stuffing */
        content[i + 98] = '\r';
        content[i + 99] = '\n';
    }
    content[n] = '\0';
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_nolimit);
    struct t_msg tm;
    t_msg(&tm, 1, content);
    t_send(&e, &tm);
    fake_conn_push_str(cn, "250 ok\r\n250 ok\r\n");
    free(fake_conn_take_output(cn));
    fake_conn_set_hold(cn, true);
    fake_conn_push_str(cn, "354 go\r\n");
    struct buf all;
    buf_init(&all);
    unsigned drains = 0;
    while (conn_pending_output(cn) > 0) {
        /* one chunk at a time: 64 KiB of content plus its stuffing */
        assert_true(conn_pending_output(cn) <= 65536 + 65536 / 100 + 1 + 5);
        t_timeout(cn, drains < 3 ? T_DATA_BLOCK_MS : T_DATA_END_MS);
        fake_conn_drain(cn);
        drains++;
        char *got = fake_conn_take_output(cn);
        buf_append_str(&all, got);
        free(got);
    }
    assert_int_equal(drains, 4); /* 64 + 64 + 64 + 8 KiB */
    t_timeout(cn, T_DATA_END_MS);
    assert_int_equal(all.len, n + n / 100 + 3);
    assert_memory_equal(buf_ptr(&all) + all.len - 3, ".\r\n", 3);
    assert_memory_equal(buf_ptr(&all), "..xxx", 5);
    fake_conn_set_hold(cn, false);
    fake_conn_push_str(cn, "250 ok\r\n");
    t_events(&e, "DONE READY");
    t_quit(&e, cn);
    buf_reset(&all);
    free(content);
}

static void
test_smtp_client_mixed_recipient_results(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_full);
    struct t_msg tm;
    t_msg(&tm, 3, t_content);
    t_send(&e, &tm);
    free(fake_conn_take_output(cn));
    fake_conn_push_str(cn, "250 2.1.0 Ok\r\n"
                           "250 2.1.5 Ok\r\n"
                           "450 4.2.1 mailbox busy\r\n"
                           "550 5.1.1 no such user\r\n"
                           "354 go\r\n");
    t_expect(cn, "Subject: hi\r\n\r\nbody\r\n.\r\n");
    fake_conn_push_str(cn, "250 2.0.0 Ok: queued\r\n");
    t_events(&e, "DONE READY");
    t_reply(&e.results[0], 250, "2.0.0", "Ok: queued");
    assert_int_equal(e.results[0].scope, DELIV_SCOPE_MSG);
    t_reply(&e.results[1], 450, "4.2.1", "mailbox busy");
    assert_int_equal(e.results[1].scope, DELIV_SCOPE_RCPT);
    t_reply(&e.results[2], 550, "5.1.1", "no such user");
    /* a completed DATA needs no RSET */
    t_msg(&tm, 1, t_content);
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com> SIZE=21\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n");
    smtpc_abort(e.c);
    t_closed(&e, cn, "DONE CLOSED");
}

static void
test_smtp_client_mail_rejected(void **state)
{
    (void)state;
    /* pipelined: the RCPT and DATA replies are read and ignored */
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_full);
    struct t_msg tm;
    t_msg(&tm, 2, t_content);
    t_send(&e, &tm);
    free(fake_conn_take_output(cn));
    fake_conn_push_str(cn, "553 5.7.1 sender rejected\r\n"
                           "503 5.5.1 need MAIL\r\n503 5.5.1 need MAIL\r\n");
    t_events(&e, "");
    fake_conn_push_str(cn, "503 5.5.1 need MAIL\r\n");
    t_events(&e, "DONE");
    for (size_t i = 0; i < 2; i++) {
        t_reply(&e.results[i], 553, "5.7.1", "sender rejected");
        assert_int_equal(e.results[i].scope, DELIV_SCOPE_MSG);
    }
    t_expect(cn, "RSET\r\n");
    fake_conn_push_str(cn, "250 2.0.0 Ok\r\n");
    t_events(&e, "READY");
    t_quit(&e, cn);

    /* lockstep: no RCPT after a refused MAIL */
    cn = t_ready(&e, t_ehlo_plain);
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\n");
    fake_conn_push_str(cn, "451 4.3.0 try later\r\n");
    t_expect(cn, "RSET\r\n");
    t_events(&e, "DONE");
    t_reply(&e.results[1], 451, "4.3.0", "try later");
    fake_conn_push_str(cn, "250 Ok\r\n");
    t_events(&e, "READY");
    t_quit(&e, cn);
}

static void
test_smtp_client_pipelined_354_without_recipients_sends_dot(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_full);
    struct t_msg tm;
    t_msg(&tm, 1, t_content);
    t_send(&e, &tm);
    free(fake_conn_take_output(cn));
    fake_conn_push_str(cn, "250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n");
    t_expect(cn, ".\r\n"); /* RFC 2920 3.1 */
    t_events(&e, "");
    fake_conn_push_str(cn, "554 5.5.1 no valid recipients\r\n");
    t_events(&e, "DONE READY");
    t_reply(&e.results[0], 550, "5.1.1", "unknown");
    t_quit(&e, cn);
}

static void
test_smtp_client_data_rejected(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_full);
    struct t_msg tm;
    t_msg(&tm, 2, t_content);
    t_send(&e, &tm);
    free(fake_conn_take_output(cn));
    fake_conn_push_str(cn, "250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n"
                           "554 5.7.0 DATA refused\r\n");
    t_events(&e, "DONE");
    t_reply(&e.results[0], 554, "5.7.0", "DATA refused");
    assert_int_equal(e.results[0].scope, DELIV_SCOPE_MSG);
    t_reply(&e.results[1], 550, "5.1.1", "unknown");
    t_expect(cn, "RSET\r\n");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_events(&e, "READY");
    t_quit(&e, cn);
}

static void
test_smtp_client_no_recipient_accepted_lockstep_skips_data(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_plain);
    struct t_msg tm;
    t_msg(&tm, 2, t_content);
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\n");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_expect(cn, "RCPT TO:<bob@example.org>\r\n");
    fake_conn_push_str(cn, "550 5.1.1 bob unknown\r\n");
    t_expect(cn, "RCPT TO:<carol@example.org>\r\n");
    fake_conn_push_str(cn, "450 4.2.0 carol greylisted\r\n");
    t_expect(cn, "RSET\r\n"); /* no DATA */
    t_events(&e, "DONE");
    t_reply(&e.results[0], 550, "5.1.1", "bob unknown");
    t_reply(&e.results[1], 450, "4.2.0", "carol greylisted");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_events(&e, "READY");
    /* reuse: the second message on the same connection */
    t_msg(&tm, 1, t_content);
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\n");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_expect(cn, "RCPT TO:<bob@example.org>\r\n");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_expect(cn, "DATA\r\n");
    fake_conn_push_str(cn, "354 go\r\n");
    t_expect(cn, "Subject: hi\r\n\r\nbody\r\n.\r\n");
    fake_conn_push_str(cn, "250 2.0.0 Ok\r\n");
    t_events(&e, "DONE READY");
    t_reply(&e.results[0], 250, "2.0.0", "Ok");
    assert_int_equal(smtpc_transactions(e.c), 2);
    t_quit(&e, cn);
}

static void
test_smtp_client_rset_refused_ends_session(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_plain);
    struct t_msg tm;
    t_msg(&tm, 1, t_content);
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\n");
    fake_conn_push_str(cn, "550 5.7.1 no\r\n");
    t_expect(cn, "RSET\r\n");
    t_events(&e, "DONE");
    fake_conn_push_str(cn, "500 5.5.2 what\r\n");
    t_expect(cn, "QUIT\r\n");
    fake_conn_push_str(cn, "221 bye\r\n");
    t_closed(&e, cn, "CLOSED");
}

static void
test_smtp_client_quit_in_done_while_rset_pending(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_full);
    e.on_done = T_QUIT;
    struct t_msg tm;
    t_msg(&tm, 1, t_content);
    t_send(&e, &tm);
    free(fake_conn_take_output(cn));
    fake_conn_push_str(cn, "250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no recipients\r\n");
    t_events(&e, "DONE");
    t_expect(cn, "RSET\r\nQUIT\r\n");
    fake_conn_push_str(cn, "250 2.0.0 Ok\r\n"); /* RSET's */
    assert_false(fake_conn_closing(cn));
    fake_conn_push_str(cn, "221 2.0.0 Bye\r\n");
    t_closed(&e, cn, "CLOSED");
}

static void
test_smtp_client_421_mid_transaction(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_plain);
    struct t_msg tm;
    t_msg(&tm, 3, t_content);
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\n");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_expect(cn, "RCPT TO:<bob@example.org>\r\n");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_expect(cn, "RCPT TO:<carol@example.org>\r\n");
    fake_conn_push_str(cn, "550 5.1.1 unknown\r\n");
    t_expect(cn, "RCPT TO:<dave@example.org>\r\n");
    fake_conn_push_str(cn, "421 4.7.0 too busy, closing\r\n");
    t_expect(cn, ""); /* no QUIT after 421 */
    t_events(&e, "DONE");
    t_reply(&e.results[0], 421, "4.7.0", "too busy, closing");
    assert_int_equal(e.results[0].scope, DELIV_SCOPE_CONN);
    t_reply(&e.results[1], 550, "5.1.1", "unknown");
    t_reply(&e.results[2], 421, "4.7.0", "too busy, closing");
    t_closed(&e, cn, "CLOSED");
}

static void
test_smtp_client_lost_connection_mid_data(void **state)
{
    (void)state;
    static const char big_line[] = "0123456789012345678901234567890123456789012345678\r\n";
    size_t n = 100 * 1024;
    char *content = xmalloc(n + 1);
    for (size_t i = 0; i + 51 <= n; i += 51)
        memcpy(content + i, big_line, 51);
    content[n - n % 51] = '\0';
    static const struct {
        const char *label;
        bool at_dot;
        bool error;
        const char *text;
    } cases[] = {
        {"eof in body", false, false,
         "lost connection with mx1.example.org[192.0.2.7]:25 while sending message body"},
        {"error in body", false, true,
         "lost connection with mx1.example.org[192.0.2.7]:25 while sending message body"},
        {"eof after dot", true, false,
         "lost connection with mx1.example.org[192.0.2.7]:25 while sending end of data -- "
         "message may be sent more than once"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        struct conn *cn = t_ready(&e, t_ehlo_nolimit);
        struct t_msg tm;
        t_msg(&tm, 3, content);
        t_send(&e, &tm);
        fake_conn_push_str(cn, "250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n250 ok\r\n");
        fake_conn_set_hold(cn, !cases[i].at_dot);
        fake_conn_push_str(cn, "354 go\r\n");
        if (cases[i].error)
            fake_conn_error(cn, -ECONNRESET);
        else
            fake_conn_eof(cn);
        if (strcmp(e.events, "DONE") != 0)
            fail_msg("%s: events %s", cases[i].label, e.events);
        e.events[0] = '\0';
        t_reply(&e.results[0], 451, "4.4.2", cases[i].text);
        t_reply(&e.results[1], 550, "5.1.1", "unknown");
        t_reply(&e.results[2], 451, "4.4.2", cases[i].text);
        free(fake_conn_take_output(cn));
        t_closed(&e, cn, "CLOSED");
    }
    free(content);
}

static void
test_smtp_client_timeout_in_each_phase(void **state)
{
    (void)state;
    enum { P_MAIL, P_RCPT, P_DATA, P_BODY, P_DOT };
    static const struct {
        int phase;
        uint64_t armed;
        const char *text;
    } cases[] = {
        {P_MAIL, T_COMMAND_MS, "while sending MAIL FROM"},
        {P_RCPT, T_COMMAND_MS, "while sending RCPT TO"},
        {P_DATA, T_DATA_INIT_MS, "while sending DATA command"},
        {P_BODY, T_DATA_BLOCK_MS, "while sending message body"},
        {P_DOT, T_DATA_END_MS, "while sending end of data -- message may be sent more than once"},
    };
    char *big = xmalloc(70001);
    memset(big, 'a', 70000);
    big[70000] = '\0';
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        struct conn *cn = t_ready(&e, t_ehlo_plain);
        struct t_msg tm;
        t_msg(&tm, 1, cases[i].phase == P_BODY ? big : t_content);
        t_send(&e, &tm);
        if (cases[i].phase > P_MAIL)
            fake_conn_push_str(cn, "250 ok\r\n");
        if (cases[i].phase > P_RCPT)
            fake_conn_push_str(cn, "250 ok\r\n");
        if (cases[i].phase == P_BODY)
            fake_conn_set_hold(cn, true);
        if (cases[i].phase > P_DATA)
            fake_conn_push_str(cn, "354 go\r\n");
        t_timeout(cn, cases[i].armed);
        fake_conn_fire_timeout(cn);
        t_events(&e, "DONE");
        char want[300];
        snprintf(want, sizeof(want), "conversation with mx1.example.org[192.0.2.7]:25 timed out %s",
                 cases[i].text);
        t_reply(&e.results[0], 451, "4.4.2", want);
        assert_true(e.results[0].local);
        assert_int_equal(e.results[0].scope, DELIV_SCOPE_CONN);
        free(fake_conn_take_output(cn));
        t_closed(&e, cn, "CLOSED");
    }
    free(big);

    /* RSET timeout: the session just closes (DONE was already given) */
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_plain);
    struct t_msg tm;
    t_msg(&tm, 1, t_content);
    t_send(&e, &tm);
    fake_conn_push_str(cn, "550 5.7.1 no\r\n");
    t_events(&e, "DONE");
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\nRSET\r\n");
    t_timeout(cn, T_COMMAND_MS);
    fake_conn_fire_timeout(cn);
    t_closed(&e, cn, "CLOSED");
}

static void
test_smtp_client_dsn_parameters_only_when_offered(void **state)
{
    (void)state;
    static const unsigned notify[] = {SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_FAILURE, SMTP_NOTIFY_NEVER,
                                      0};
    static const char *const orcpt[] = {"rfc822;bob+x=y@example.org", NULL,
                                        "utf-8;carol@example.org"};
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_full);
    struct t_msg tm;
    t_msg(&tm, 3, t_content);
    tm.m.notify = notify;
    tm.m.orcpt = orcpt;
    tm.m.ret = SMTP_RET_HDRS;
    tm.m.envid = "id+1 x";
    tm.m.body = SMTP_BODY_7BIT;
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com> SIZE=21 BODY=7BIT RET=HDRS ENVID=id+2B1+20x\r\n"
                 "RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE "
                 "ORCPT=rfc822;bob+2Bx+3Dy@example.org\r\n"
                 "RCPT TO:<carol@example.org> NOTIFY=NEVER\r\n"
                 "RCPT TO:<dave@example.org> ORCPT=utf-8;carol@example.org\r\n"
                 "DATA\r\n");
    smtpc_abort(e.c);
    t_closed(&e, cn, "DONE CLOSED");

    cn = t_ready(&e, "250-mx1.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n");
    assert_false(smtpc_server_has_dsn(e.c));
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com> BODY=7BIT\r\n"
                 "RCPT TO:<bob@example.org>\r\n"
                 "RCPT TO:<carol@example.org>\r\n"
                 "RCPT TO:<dave@example.org>\r\n"
                 "DATA\r\n");
    smtpc_abort(e.c);
    t_closed(&e, cn, "DONE CLOSED");
}

/* ---- LMTP --------------------------------------------------------------- */

static void
test_smtp_client_lmtp_one_reply_per_accepted_recipient(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    t_target_unix(&e.targets[0], "", "/run/dovecot/lmtp");
    e.ntargets = 1;
    e.opts.lmtp = true;
    t_start(&e);
    struct conn *cn = t_conn();
    assert_string_equal(fake_conn_connect_path(cn), "/run/dovecot/lmtp");
    assert_null(fake_conn_connect_dst(cn));
    assert_string_equal(smtpc_relay(e.c), "localhost[/run/dovecot/lmtp]");
    fake_conn_complete_connect(cn, 0);
    fake_conn_push_str(cn, "220 host Dovecot LMTP ready\r\n");
    t_expect(cn, "LHLO client.example\r\n");
    fake_conn_push_str(cn, "250-host\r\n250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n"
                           "250 PIPELINING\r\n");
    t_events(&e, "READY");
    struct t_msg tm;
    t_msg(&tm, 4, t_content);
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\n"
                 "RCPT TO:<bob@example.org>\r\n"
                 "RCPT TO:<carol@example.org>\r\n"
                 "RCPT TO:<dave@example.org>\r\n"
                 "RCPT TO:<erin@example.org>\r\n"
                 "DATA\r\n");
    fake_conn_push_str(cn, "250 2.1.0 OK\r\n250 2.1.5 OK\r\n550 5.1.1 carol unknown\r\n"
                           "250 2.1.5 OK\r\n250 2.1.5 OK\r\n354 OK\r\n");
    t_expect(cn, "Subject: hi\r\n\r\nbody\r\n.\r\n");
    fake_conn_push_str(cn, "250 2.0.0 <bob@example.org> Saved\r\n");
    t_events(&e, "");
    t_timeout(cn, T_DATA_END_MS);
    fake_conn_push_str(cn, "452 4.2.2 <dave@example.org> Quota exceeded\r\n");
    t_events(&e, "");
    fake_conn_push_str(cn, "550 5.2.0 <erin@example.org> rejected\r\n");
    t_events(&e, "DONE READY");
    t_reply(&e.results[0], 250, "2.0.0", "<bob@example.org> Saved");
    assert_int_equal(e.results[0].scope, DELIV_SCOPE_RCPT);
    t_reply(&e.results[1], 550, "5.1.1", "carol unknown");
    t_reply(&e.results[2], 452, "4.2.2", "<dave@example.org> Quota exceeded");
    t_reply(&e.results[3], 550, "5.2.0", "<erin@example.org> rejected");
    t_quit(&e, cn);
}

static void
test_smtp_client_lmtp_lost_after_dot_fails_only_unanswered(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    t_target(&e.targets[0], "lmtp.example.org", "192.0.2.20", 24);
    e.ntargets = 1;
    e.opts.lmtp = true;
    t_start(&e);
    struct conn *cn = t_conn();
    fake_conn_complete_connect(cn, 0);
    fake_conn_push_str(cn, "220 lmtp\r\n");
    t_expect(cn, "LHLO client.example\r\n");
    fake_conn_push_str(cn, "250 lmtp\r\n"); /* no PIPELINING: lockstep */
    t_events(&e, "READY");
    struct t_msg tm;
    t_msg(&tm, 2, t_content);
    t_send(&e, &tm);
    fake_conn_push_str(cn, "250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n");
    fake_conn_push_str(cn, "250 2.0.0 saved\r\n");
    fake_conn_eof(cn);
    t_events(&e, "DONE");
    t_reply(&e.results[0], 250, "2.0.0", "saved");
    t_reply(&e.results[1], 451, "4.4.2",
            "lost connection with lmtp.example.org[192.0.2.20]:24 while sending end of data -- "
            "message may be sent more than once");
    free(fake_conn_take_output(cn));
    t_closed(&e, cn, "CLOSED");
}

static void
test_smtp_client_lmtp_lhlo_refused_has_no_helo_fallback(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    e.ntargets = 1;
    e.opts.lmtp = true;
    t_start(&e);
    struct conn *cn = t_conn();
    fake_conn_complete_connect(cn, 0);
    fake_conn_push_str(cn, "220 lmtp\r\n");
    t_expect(cn, "LHLO client.example\r\n");
    fake_conn_push_str(cn, "500 5.5.1 unknown command\r\n");
    t_expect(cn, "QUIT\r\n");
    t_closed(&e, cn, "FAILED CLOSED");
    t_reply(&e.failure, 500, "5.5.1", "unknown command");
}

/* ---- reply parsing ------------------------------------------------------ */

static void
test_smtp_client_multiline_replies(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    t_start(&e);
    struct conn *cn = t_conn();
    fake_conn_complete_connect(cn, 0);
    /* a banner in pieces, with a bare LF line end */
    fake_conn_push_str(cn, "220-mx1.example.org ESMTP\r\n220-sec");
    t_expect(cn, "");
    fake_conn_push_str(cn, "ond line\n220 third\r\n");
    t_expect(cn, "EHLO client.example\r\n");
    fake_conn_push_str(cn, "250-mx1.example.org\r\n250-size 100\r\n250-pipelining\r\n");
    t_events(&e, "");
    fake_conn_push_str(cn, "250 dsn\r\n");
    t_events(&e, "READY");
    assert_true(smtpc_server_has_dsn(e.c)); /* keywords are case-insensitive */
    struct t_msg tm;
    t_msg(&tm, 4, t_content);
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com> SIZE=21\r\n"
                 "RCPT TO:<bob@example.org>\r\nRCPT TO:<carol@example.org>\r\n"
                 "RCPT TO:<dave@example.org>\r\nRCPT TO:<erin@example.org>\r\nDATA\r\n");
    fake_conn_push_str(cn, "250 2.1.0 Ok\r\n"
                           "550-5.1.1 The email account that you tried to reach does not exist.\r\n"
                           "550-5.1.1 Please try double-checking the recipient's email\r\n"
                           "550 5.1.1 address for typos.\r\n"
                           "550 4.1.1 wrong class is no enhanced code\r\n"
                           "250\r\n"
                           "452-first\r\n452-\x01weird\x7f\r\n452 4.5.3 too many\r\n"
                           "354 go\r\n");
    t_expect(cn, "Subject: hi\r\n\r\nbody\r\n.\r\n");
    fake_conn_push_str(cn, "250 2.0.0 ok\r\n");
    t_events(&e, "DONE READY");
    t_reply(&e.results[0], 550, "5.1.1",
            "The email account that you tried to reach does not exist.; Please try "
            "double-checking the recipient's email; address for typos.");
    t_reply(&e.results[1], 550, "", "4.1.1 wrong class is no enhanced code");
    t_reply(&e.results[2], 250, "2.0.0", "ok");
    t_reply(&e.results[3], 452, "4.5.3", "first; ?weird?; too many");
    t_quit(&e, cn);
}

static void
test_smtp_client_long_reply_text_is_truncated(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_plain);
    struct t_msg tm;
    t_msg(&tm, 1, t_content);
    t_send(&e, &tm);
    struct buf b;
    buf_init(&b);
    for (int i = 0; i < 20; i++)
        buf_printf(&b, "550-5.7.1 line %02d of a long rejection text padded out to be long\r\n", i);
    buf_append_str(&b, "550 5.7.1 end\r\n");
    fake_conn_push(cn, buf_ptr(&b), b.len);
    buf_reset(&b);
    t_events(&e, "DONE");
    assert_int_equal(e.results[0].code, 550);
    assert_string_equal(e.results[0].esc, "5.7.1");
    assert_int_equal(strlen(e.results[0].text), sizeof(e.results[0].text) - 1);
    assert_memory_equal(e.results[0].text, "line 00 of a long", 17);
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\nRSET\r\n");
    fake_conn_push_str(cn, "250 ok\r\n");
    t_events(&e, "READY");
    t_quit(&e, cn);
}

static void
test_smtp_client_garbage_reply_is_temporary(void **state)
{
    (void)state;
    char *long_line = xmalloc(5001);
    memset(long_line, 'a', 5000);
    memcpy(long_line, "250 ", 4);
    long_line[5000] = '\0';
    struct buf huge;
    buf_init(&huge);
    for (int i = 0; i < 300; i++)
        buf_printf(&huge, "250-%0300d\r\n", i);
    static const struct {
        const char *label;
        const char *what;
    } kinds[] = {
        {"text", "malformed reply"},
        {"bad code", "malformed reply"},
        {"no separator", "malformed reply"},
        {"inconsistent", "inconsistent reply codes"},
        {"long line", "reply line too long"},
        {"huge reply", "reply too long"},
        {"unexpected class", "unexpected reply"},
    };
    const char *inputs[] = {
        "hello there\r\n",
        "250 ok\r\n650 what\r\n",
        "250 ok\r\n250x\r\n",
        "250 ok\r\n250-a\r\n251 b\r\n",
        long_line,
        NULL,
        "250 ok\r\n354 send data\r\n",
    };
    for (size_t i = 0; i < ARRAY_SIZE(kinds); i++) {
        struct t_env e;
        struct conn *cn = t_ready(&e, t_ehlo_plain);
        struct t_msg tm;
        t_msg(&tm, 1, t_content);
        t_send(&e, &tm);
        if (inputs[i] != NULL)
            fake_conn_push_str(cn, inputs[i]);
        else
            fake_conn_push(cn, buf_ptr(&huge), huge.len);
        if (strcmp(e.events, "DONE") != 0)
            fail_msg("%s: events \"%s\"", kinds[i].label, e.events);
        e.events[0] = '\0';
        const struct smtpc_reply *r = &e.results[0];
        const char *phase = i == 0 || i == 4 || i == 5 ? "sending MAIL FROM" : "sending RCPT TO";
        char want[400];
        if (i == 6)
            snprintf(want, sizeof(want),
                     "%s from mx1.example.org[192.0.2.7]:25 while %s: 354 "
                     "send data",
                     kinds[i].what, phase);
        else
            snprintf(want, sizeof(want), "%s from mx1.example.org[192.0.2.7]:25 while %s",
                     kinds[i].what, phase);
        if (r->code != 451 || strcmp(r->esc, "4.5.0") != 0 || strcmp(r->text, want) != 0)
            fail_msg("%s: got \"%d %s %s\", want \"451 4.5.0 %s\"", kinds[i].label, r->code, r->esc,
                     r->text, want);
        free(fake_conn_take_output(cn));
        t_closed(&e, cn, "CLOSED");
    }
    buf_reset(&huge);
    free(long_line);
}

/* ---- session ends ------------------------------------------------------- */

static void
test_smtp_client_abort_while_connecting_tries_nothing_else(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    t_start(&e);
    struct conn *cn = t_conn();
    unsigned connects = fake_conn_connects();
    smtpc_abort(e.c);
    smtpc_abort(e.c); /* idempotent */
    t_events(&e, "");
    t_closed(&e, cn, "CLOSED");
    assert_int_equal(fake_conn_connects(), connects);

    /* abort between targets: the next one is not tried */
    t_init(&e);
    t_start(&e);
    cn = t_conn();
    fake_conn_complete_connect(cn, -EHOSTUNREACH);
    smtpc_abort(e.c);
    connects = fake_conn_connects();
    t_closed(&e, cn, "CLOSED");
    assert_int_equal(fake_conn_connects(), connects);
}

static void
test_smtp_client_idle_421_or_eof_closes(void **state)
{
    (void)state;
    struct t_env e;
    struct conn *cn = t_ready(&e, t_ehlo_full);
    fake_conn_push_str(cn, "421 4.4.2 idle timeout\r\n");
    t_expect(cn, "");
    t_closed(&e, cn, "CLOSED");

    cn = t_ready(&e, t_ehlo_full);
    fake_conn_eof(cn);
    t_closed(&e, cn, "CLOSED");
}

static void
test_smtp_client_quit_in_ready_and_ipv6_relay(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    t_target(&e.targets[0], "", "2001:db8::25", 2525);
    e.ntargets = 1;
    e.opts.src = NULL;
    e.on_ready = T_QUIT;
    t_start(&e);
    struct conn *cn = t_conn();
    assert_null(fake_conn_connect_src(cn));
    assert_string_equal(smtpc_relay(e.c), "2001:db8::25[2001:db8::25]:2525");
    assert_string_equal(smtpc_remote_host(e.c), "2001:db8::25");
    fake_conn_complete_connect(cn, 0);
    fake_conn_push_str(cn, "220 hi\r\n");
    t_expect(cn, "EHLO client.example\r\n");
    fake_conn_push_str(cn, "250 hi\r\n");
    t_events(&e, "READY");
    t_expect(cn, "QUIT\r\n");
    fake_conn_eof(cn); /* no 221: fine */
    t_closed(&e, cn, "CLOSED");
}

static void
test_smtp_client_reply_format(void **state)
{
    (void)state;
    struct smtpc_reply r = {.code = 550, .esc = "5.1.1", .text = "no such user"};
    char out[64];
    smtpc_reply_format(&r, out, sizeof(out));
    assert_string_equal(out, "550 5.1.1 no such user");
    r.esc[0] = '\0';
    smtpc_reply_format(&r, out, sizeof(out));
    assert_string_equal(out, "550 no such user");
    smtpc_reply_format(&r, out, 8);
    assert_string_equal(out, "550 no ");
}

/* ---- STARTTLS ------------------------------------------------------------ */

static const char t_ehlo_tls[] = "250-mx1.example.org\r\n"
                                 "250-PIPELINING\r\n"
                                 "250-STARTTLS\r\n"
                                 "250 ENHANCEDSTATUSCODES\r\n";

/* Connects the current conn and answers the banner and EHLO with
 * ehlo_reply; stops there (no event checked). */
static struct conn *
t_greet_only(const char *ehlo_reply)
{
    struct conn *cn = t_conn();
    fake_conn_complete_connect(cn, 0);
    fake_conn_push_str(cn, "220 mx1.example.org ESMTP\r\n");
    t_expect(cn, "EHLO client.example\r\n");
    fake_conn_push_str(cn, ehlo_reply);
    return cn;
}

static void
test_smtp_client_starttls_when_offered_then_ehlo_again(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    e.opts.tls = DELIVERY_TLS_OPPORTUNISTIC;
    t_start(&e);
    struct conn *cn = t_greet_only(t_ehlo_tls);
    t_expect(cn, "STARTTLS\r\n");
    t_events(&e, "");
    t_timeout(cn, T_COMMAND_MS);
    /* a line the server (or a man in the middle) sends behind its 220 is
     * not trusted: it must not be taken as the reply to the next EHLO */
    fake_conn_push_str(cn, "220 2.0.0 Ready to start TLS\r\n250 injected\r\n");
    assert_true(fake_conn_tls_started(cn));
    assert_false(fake_conn_tls_server(cn));
    assert_string_equal(fake_conn_tls_name(cn), "mx1.example.org");
    if (conn_input(cn)->len != 0)
        fail_msg("input after 220: got %zu bytes, want 0 (discarded)", conn_input(cn)->len);
    t_expect(cn, "");
    t_timeout(cn, T_COMMAND_MS);
    assert_null(smtpc_tls(e.c));
    fake_conn_complete_tls(cn, 0, NULL, NULL);
    t_expect(cn, "EHLO client.example\r\n");
    t_events(&e, "");
    /* still offered (a confused server): once is enough */
    fake_conn_push_str(cn, t_ehlo_tls);
    t_expect(cn, "");
    t_events(&e, "READY");
    const struct conn_tls_info *ti = smtpc_tls(e.c);
    assert_non_null(ti);
    assert_string_equal(ti->version, "TLSv1.3");
    assert_string_equal(ti->cipher, "TLS_AES_256_GCM_SHA384");
    /* the transaction itself is unchanged */
    struct t_msg tm;
    t_msg(&tm, 1, t_content);
    t_send(&e, &tm);
    t_expect(cn, "MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@example.org>\r\nDATA\r\n");
    fake_conn_push_str(cn, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 go\r\n");
    t_expect(cn, "Subject: hi\r\n\r\nbody\r\n.\r\n");
    fake_conn_push_str(cn, "250 2.0.0 Ok: queued\r\n");
    t_events(&e, "DONE READY");
    t_reply(&e.results[0], 250, "2.0.0", "Ok: queued");
    t_quit(&e, cn);
}

static void
test_smtp_client_starttls_not_offered_or_refused_goes_on_in_plaintext(void **state)
{
    (void)state;
    static const struct {
        const char *label;
        const char *ehlo;
        const char *starttls_reply; /* NULL: STARTTLS is not sent */
        enum delivery_tls policy;
    } cases[] = {
        { "not offered", t_ehlo_plain, NULL, DELIVERY_TLS_OPPORTUNISTIC },
        { "refused", t_ehlo_tls, "454 4.7.0 TLS not available\r\n", DELIVERY_TLS_OPPORTUNISTIC },
        { "policy none", t_ehlo_tls, NULL, DELIVERY_TLS_NONE },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        t_init(&e);
        e.opts.tls = cases[i].policy;
        t_start(&e);
        struct conn *cn = t_greet_only(cases[i].ehlo);
        if (cases[i].starttls_reply != NULL) {
            t_expect(cn, "STARTTLS\r\n");
            fake_conn_push_str(cn, cases[i].starttls_reply);
        }
        t_expect(cn, "");
        if (strcmp(e.events, "READY") != 0)
            fail_msg("%s: events: got \"%s\", want \"READY\"", cases[i].label, e.events);
        e.events[0] = '\0';
        assert_false(fake_conn_tls_started(cn));
        assert_null(smtpc_tls(e.c));
        t_quit(&e, cn);
    }
}

static void
test_smtp_client_starttls_required_fails_each_target_without_it(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    e.opts.tls = DELIVERY_TLS_REQUIRED;
    t_start(&e);
    /* mx1 does not offer it: QUIT, next target */
    struct conn *c1 = t_greet_only(t_ehlo_plain);
    t_expect(c1, "QUIT\r\n");
    t_events(&e, "");
    assert_true(fake_conn_closing(c1));
    fake_conn_finish_close(c1);
    /* mx2 refuses it */
    struct conn *c2 = t_greet_only(t_ehlo_tls);
    t_expect(c2, "STARTTLS\r\n");
    fake_conn_push_str(c2, "454 4.7.0 TLS not available due to temporary reason\r\n");
    t_expect(c2, "QUIT\r\n");
    t_closed(&e, c2, "FAILED CLOSED");
    t_reply(&e.failure, 451, "4.7.4",
            "TLS required but STARTTLS refused by mx2.example.org[192.0.2.8]:25: "
            "454 4.7.0 TLS not available due to temporary reason");
    assert_int_equal(e.failure.scope, DELIV_SCOPE_SITE);

    /* only one target, which does not offer it */
    t_init(&e);
    e.opts.tls = DELIVERY_TLS_REQUIRED;
    e.ntargets = 1;
    t_start(&e);
    c1 = t_greet_only(t_ehlo_plain);
    t_expect(c1, "QUIT\r\n");
    t_closed(&e, c1, "FAILED CLOSED");
    t_reply(&e.failure, 451, "4.7.4",
            "TLS required but not offered by mx1.example.org[192.0.2.7]:25");
}

static void
test_smtp_client_starttls_required_and_offered_delivers_over_tls(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    e.opts.tls = DELIVERY_TLS_REQUIRED;
    t_start(&e);
    struct conn *cn = t_greet_only(t_ehlo_tls);
    t_expect(cn, "STARTTLS\r\n");
    fake_conn_push_str(cn, "220 2.0.0 Ready to start TLS\r\n");
    /* an unverifiable certificate is fine: TLS is required, not verification */
    struct conn_tls_info info;
    memset(&info, 0, sizeof(info));
    snprintf(info.version, sizeof(info.version), "TLSv1.2");
    snprintf(info.cipher, sizeof(info.cipher), "ECDHE-RSA-AES256-GCM-SHA384");
    snprintf(info.verify, sizeof(info.verify), "self-signed certificate");
    fake_conn_complete_tls(cn, 0, &info, NULL);
    t_expect(cn, "EHLO client.example\r\n");
    fake_conn_push_str(cn, t_ehlo_plain);
    t_events(&e, "READY");
    assert_string_equal(smtpc_tls(e.c)->version, "TLSv1.2");
    assert_false(smtpc_tls(e.c)->verified);
    t_quit(&e, cn);
}

static void
test_smtp_client_tls_handshake_failure_tries_next_target_never_plaintext(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    e.opts.tls = DELIVERY_TLS_OPPORTUNISTIC;
    t_start(&e);
    struct conn *c1 = t_greet_only(t_ehlo_tls);
    t_expect(c1, "STARTTLS\r\n");
    fake_conn_push_str(c1, "220 2.0.0 Ready to start TLS\r\n");
    fake_conn_complete_tls(c1, -71, NULL, "wrong version number");
    t_expect(c1, ""); /* no plaintext QUIT inside a broken TLS session */
    t_events(&e, "");
    assert_true(fake_conn_closing(c1));
    fake_conn_finish_close(c1);
    /* mx2: the handshake times out */
    struct conn *c2 = t_greet_only(t_ehlo_tls);
    t_expect(c2, "STARTTLS\r\n");
    fake_conn_push_str(c2, "220 2.0.0 Ready to start TLS\r\n");
    fake_conn_fire_timeout(c2);
    t_expect(c2, "");
    t_closed(&e, c2, "FAILED CLOSED");
    t_reply(&e.failure, 451, "4.4.2",
            "conversation with mx2.example.org[192.0.2.8]:25 timed out while performing the "
            "TLS handshake");

    /* one target: the handshake failure is the FAILED reply */
    t_init(&e);
    e.opts.tls = DELIVERY_TLS_OPPORTUNISTIC;
    e.ntargets = 1;
    t_start(&e);
    c1 = t_greet_only(t_ehlo_tls);
    t_expect(c1, "STARTTLS\r\n");
    fake_conn_push_str(c1, "220 2.0.0 Ready to start TLS\r\n");
    fake_conn_complete_tls(c1, -71, NULL, "wrong version number");
    t_closed(&e, c1, "FAILED CLOSED");
    t_reply(&e.failure, 451, "4.7.5",
            "TLS handshake with mx1.example.org[192.0.2.7]:25 failed: wrong version number");
}

static void
test_smtp_client_lmtp_never_uses_tls(void **state)
{
    (void)state;
    struct t_env e;
    t_init(&e);
    e.opts.lmtp = true;
    e.opts.tls = DELIVERY_TLS_REQUIRED;
    e.ntargets = 1;
    t_start(&e);
    struct conn *cn = t_conn();
    fake_conn_complete_connect(cn, 0);
    fake_conn_push_str(cn, "220 lmtp ready\r\n");
    t_expect(cn, "LHLO client.example\r\n");
    fake_conn_push_str(cn, t_ehlo_tls);
    t_expect(cn, "");
    t_events(&e, "READY");
    assert_false(fake_conn_tls_started(cn));
    t_quit(&e, cn);
}

/* ---- DANE ---------------------------------------------------------------- */

/* The value smtpc_log_tls gives field name ("" if absent), in out. */
static const char *
t_log_field(const struct smtpc *c, const char *name, char *out, size_t size)
{
    struct log_line ll;
    log_begin(&ll, LOG_INFO, NULL);
    smtpc_log_tls(c, &ll);
    out[0] = '\0';
    for (size_t i = 0; i < ll.nfields; i++) {
        if (strcmp(ll.names[i], name) == 0)
            snprintf(out, size, "%s", ll.scratch + ll.vals[i]);
    }
    return out;
}

static void
t_log_expect(const struct smtpc *c, const char *name, const char *want)
{
    char got[512];
    t_log_field(c, name, got, sizeof(got));
    if (strcmp(got, want) != 0)
        fail_msg("log field %s: got \"%s\", want \"%s\"", name, got, want);
}

static void
t_init_dane(struct t_env *e, size_t ntargets)
{
    t_init(e);
    e->opts.tls = DELIVERY_TLS_DANE;
    e->opts.dane_domain = "example.org";
    e->ntargets = ntargets;
    fake_dane_reset();
}

/* The lookup started for the target just connected. */
static struct dane_lookup *
t_dane_lookup(const char *host)
{
    struct dane_lookup *l = fake_dane_last();
    assert_non_null(l);
    if (strcmp(fake_dane_host(l), host) != 0)
        fail_msg("DANE lookup for \"%s\", want \"%s\"", fake_dane_host(l), host);
    return l;
}

static void
test_smtp_client_dane_secure_starttls_is_dane_verified(void **state)
{
    (void)state;
    struct t_env e;
    t_init_dane(&e, 1);
    t_start(&e);
    /* the lookup runs next to the connect */
    struct dane_lookup *l = t_dane_lookup("mx1.example.org");
    assert_int_equal(fake_dane_port(l), 25);
    assert_int_equal(fake_dane_family(l), AF_INET);
    assert_string_equal(fake_dane_domain(l), "example.org");
    /* greeted before the verdict: nothing is sent until it comes */
    struct conn *cn = t_greet_only(t_ehlo_tls);
    t_expect(cn, "");
    t_events(&e, "");
    t_timeout(cn, T_COMMAND_MS);
    fake_dane_complete(l, DANE_SECURE, "1 usable TLSA records for _25._tcp.mx1.example.org", 1);
    t_expect(cn, "STARTTLS\r\n");
    t_log_expect(e.c, "dane", "secure (1 usable TLSA records for _25._tcp.mx1.example.org)");
    fake_conn_push_str(cn, "220 2.0.0 Ready to start TLS\r\n");
    assert_true(fake_conn_tls_started(cn));
    if (fake_conn_tls_dane(cn) != 1)
        fail_msg("handshake context: got %zu TLSA records, want 1", fake_conn_tls_dane(cn));
    assert_string_equal(fake_conn_tls_name(cn), "mx1.example.org");
    fake_conn_complete_tls(cn, 0, NULL, NULL); /* verified */
    t_expect(cn, "EHLO client.example\r\n");
    fake_conn_push_str(cn, t_ehlo_plain);
    t_events(&e, "READY");
    t_log_expect(e.c, "dane", "verified");
    t_log_expect(e.c, "verify", "ok");
    t_quit(&e, cn);
    assert_null(fake_dane_last());
    assert_int_equal(fake_tls_live(), 0);
}

static void
test_smtp_client_dane_mismatch_fails_the_target(void **state)
{
    (void)state;
    struct t_env e;
    t_init_dane(&e, 1);
    t_start(&e);
    struct dane_lookup *l = t_dane_lookup("mx1.example.org");
    fake_dane_complete(l, DANE_SECURE, "2 usable TLSA records", 2);
    struct conn *cn = t_greet_only(t_ehlo_tls); /* the verdict came first */
    t_expect(cn, "STARTTLS\r\n");
    fake_conn_push_str(cn, "220 2.0.0 Ready to start TLS\r\n");
    assert_int_equal(fake_conn_tls_dane(cn), 2);
    struct conn_tls_info info;
    memset(&info, 0, sizeof(info));
    snprintf(info.version, sizeof(info.version), "TLSv1.3");
    snprintf(info.cipher, sizeof(info.cipher), "TLS_AES_128_GCM_SHA256");
    snprintf(info.verify, sizeof(info.verify), "no matching DANE TLSA records");
    fake_conn_complete_tls(cn, 0, &info, NULL);
    t_log_expect(e.c, "dane", "failed (no matching DANE TLSA records)");
    t_expect(cn, "QUIT\r\n"); /* over TLS; no EHLO, no mail */
    t_closed(&e, cn, "FAILED CLOSED");
    t_reply(&e.failure, 451, "4.7.5",
            "DANE verification failed for mx1.example.org[192.0.2.7]:25: "
            "no matching DANE TLSA records");
    assert_int_equal(fake_tls_live(), 0);
}

static void
test_smtp_client_dane_tlsa_makes_starttls_mandatory(void **state)
{
    (void)state;
    static const struct {
        const char *label;
        enum dane_status status;
        size_t ntlsa;
        const char *ehlo;
        const char *starttls_reply; /* NULL: not sent */
        const char *want;
    } cases[] = {
        { "secure, not offered", DANE_SECURE, 1, t_ehlo_plain, NULL,
          "TLS required by DANE but not offered by mx1.example.org[192.0.2.7]:25" },
        { "unusable, not offered", DANE_UNUSABLE, 0, t_ehlo_plain, NULL,
          "TLS required by DANE but not offered by mx1.example.org[192.0.2.7]:25" },
        { "secure, refused", DANE_SECURE, 1, t_ehlo_tls, "454 4.7.0 TLS not available\r\n",
          "TLS required by DANE but STARTTLS refused by mx1.example.org[192.0.2.7]:25: "
          "454 4.7.0 TLS not available" },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        t_init_dane(&e, 1);
        t_start(&e);
        fake_dane_complete(t_dane_lookup("mx1.example.org"), cases[i].status, "x",
                           cases[i].ntlsa);
        struct conn *cn = t_greet_only(cases[i].ehlo);
        if (cases[i].starttls_reply != NULL) {
            t_expect(cn, "STARTTLS\r\n");
            fake_conn_push_str(cn, cases[i].starttls_reply);
        }
        t_expect(cn, "QUIT\r\n");
        t_closed(&e, cn, "FAILED CLOSED");
        if (e.failure.code != 451 || strcmp(e.failure.esc, "4.7.4") != 0 ||
            strcmp(e.failure.text, cases[i].want) != 0)
            fail_msg("%s: got \"%d %s %s\", want \"451 4.7.4 %s\"", cases[i].label,
                     e.failure.code, e.failure.esc, e.failure.text, cases[i].want);
    }
    assert_int_equal(fake_tls_live(), 0);
}

static void
test_smtp_client_dane_none_or_insecure_is_opportunistic(void **state)
{
    (void)state;
    static const struct {
        const char *label;
        enum dane_status status;
        const char *detail;
        const char *ehlo;
        bool starttls;
        const char *want_log;
    } cases[] = {
        { "none, plaintext", DANE_NONE, "no TLSA records for _25._tcp.mx1.example.org",
          t_ehlo_plain, false, "none (no TLSA records for _25._tcp.mx1.example.org)" },
        { "insecure, plaintext", DANE_INSECURE, "MX of example.org not DNSSEC-validated",
          t_ehlo_plain, false, "insecure (MX of example.org not DNSSEC-validated)" },
        { "insecure, starttls", DANE_INSECURE, "TLSA of _25._tcp.mx1.example.org not "
          "DNSSEC-validated", t_ehlo_tls, true,
          "insecure (TLSA of _25._tcp.mx1.example.org not DNSSEC-validated)" },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        t_init_dane(&e, 1);
        t_start(&e);
        struct conn *cn = t_greet_only(cases[i].ehlo);
        t_expect(cn, "");
        fake_dane_complete(t_dane_lookup("mx1.example.org"), cases[i].status, cases[i].detail,
                           0);
        if (cases[i].starttls) {
            t_expect(cn, "STARTTLS\r\n");
            fake_conn_push_str(cn, "220 2.0.0 go ahead\r\n");
            if (fake_conn_tls_dane(cn) != 0)
                fail_msg("%s: a DANE context without TLSA records", cases[i].label);
            struct conn_tls_info info;
            memset(&info, 0, sizeof(info));
            snprintf(info.version, sizeof(info.version), "TLSv1.3");
            snprintf(info.verify, sizeof(info.verify), "self-signed certificate");
            fake_conn_complete_tls(cn, 0, &info, NULL); /* unverified is fine */
            t_expect(cn, "EHLO client.example\r\n");
            fake_conn_push_str(cn, t_ehlo_plain);
        } else {
            t_expect(cn, "");
        }
        if (strcmp(e.events, "READY") != 0)
            fail_msg("%s: events: got \"%s\", want \"READY\"", cases[i].label, e.events);
        e.events[0] = '\0';
        t_log_expect(e.c, "dane", cases[i].want_log);
        t_quit(&e, cn);
    }
}

static void
test_smtp_client_dane_lookup_failure_tries_next_target(void **state)
{
    (void)state;
    struct t_env e;
    t_init_dane(&e, 2);
    t_start(&e);
    struct conn *c1 = t_greet_only(t_ehlo_tls);
    fake_dane_complete(t_dane_lookup("mx1.example.org"), DANE_TEMPFAIL,
                       "TLSA lookup for _25._tcp.mx1.example.org: SERVFAIL", 0);
    t_expect(c1, "QUIT\r\n"); /* no STARTTLS, no mail */
    assert_true(fake_conn_closing(c1));
    fake_conn_finish_close(c1);
    t_events(&e, "");
    struct conn *c2 = t_greet_only(t_ehlo_plain);
    fake_dane_complete(t_dane_lookup("mx2.example.org"), DANE_TEMPFAIL, "timeout", 0);
    t_expect(c2, "QUIT\r\n");
    t_closed(&e, c2, "FAILED CLOSED");
    t_reply(&e.failure, 451, "4.4.3",
            "DANE TLSA lookup for mx2.example.org[192.0.2.8]:25 failed: timeout");
    assert_int_equal(fake_dane_started(), 2);
}

static void
test_smtp_client_dane_lookup_is_shared_per_host_and_cancelled(void **state)
{
    (void)state;
    struct t_env e;
    t_init_dane(&e, 3);
    t_target(&e.targets[1], "mx1.example.org", "192.0.2.9", 25); /* same host, another IP */
    t_target(&e.targets[2], "mx2.example.org", "192.0.2.8", 25);
    e.opts.dane_domain = NULL; /* a host route: no MX check */
    t_start(&e);
    assert_string_equal(fake_dane_domain(t_dane_lookup("mx1.example.org")), "");
    fake_conn_complete_connect(t_conn(), -ECONNREFUSED);
    fake_conn_finish_close(t_conn());
    /* the second address of mx1 waits for the same lookup */
    assert_int_equal(fake_dane_started(), 1);
    struct conn *c2 = t_conn();
    fake_conn_complete_connect(c2, -ECONNREFUSED);
    fake_conn_finish_close(c2);
    /* mx2: mx1's lookup is no longer wanted */
    assert_int_equal(fake_dane_cancelled(), 1);
    t_dane_lookup("mx2.example.org");
    assert_int_equal(fake_dane_started(), 2);
    /* an abort while it runs cancels it too */
    smtpc_abort(e.c);
    t_closed(&e, t_conn(), "CLOSED");
    assert_int_equal(fake_dane_cancelled(), 2);
    assert_null(fake_dane_last());

    /* an IP literal has no TLSA base domain: no lookup, opportunistic */
    t_init_dane(&e, 1);
    t_target(&e.targets[0], "192.0.2.7", "192.0.2.7", 25);
    t_start(&e);
    assert_null(fake_dane_last());
    struct conn *cn = t_greet_only(t_ehlo_plain);
    t_events(&e, "READY");
    t_log_expect(e.c, "dane", "insecure (no host name for TLSA records)");
    t_quit(&e, cn);
}

int
main(void)
{
    /* exercise the debug transcript too, into /dev/null */
    int fd = open("/dev/null", O_WRONLY);
    if (fd >= 0)
        log_set_fd(fd);
    log_init(LOG_DEBUG, LOG_FORMAT_TEXT);
    if (getenv("T_LOG") != NULL) /* T_LOG=1 shows the transcript */
        log_set_fd(2);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_smtp_client_connect_failure_tries_next_target),
        cmocka_unit_test(test_smtp_client_5xx_banner_tries_next_target),
        cmocka_unit_test(test_smtp_client_all_targets_fail),
        cmocka_unit_test(test_smtp_client_ehlo_5xx_falls_back_to_helo),
        cmocka_unit_test(test_smtp_client_ehlo_4xx_is_a_target_failure),
        cmocka_unit_test(test_smtp_client_pipelining_sends_one_group),
        cmocka_unit_test(test_smtp_client_lockstep_without_pipelining),
        cmocka_unit_test(test_smtp_client_size_over_limit_fails_without_mail),
        cmocka_unit_test(test_smtp_client_smtputf8_required_but_not_offered),
        cmocka_unit_test(test_smtp_client_smtputf8_offered_is_passed),
        cmocka_unit_test(test_smtp_client_dot_stuffing),
        cmocka_unit_test(test_smtp_client_large_content_written_in_chunks_as_output_drains),
        cmocka_unit_test(test_smtp_client_mixed_recipient_results),
        cmocka_unit_test(test_smtp_client_mail_rejected),
        cmocka_unit_test(test_smtp_client_pipelined_354_without_recipients_sends_dot),
        cmocka_unit_test(test_smtp_client_data_rejected),
        cmocka_unit_test(test_smtp_client_no_recipient_accepted_lockstep_skips_data),
        cmocka_unit_test(test_smtp_client_rset_refused_ends_session),
        cmocka_unit_test(test_smtp_client_quit_in_done_while_rset_pending),
        cmocka_unit_test(test_smtp_client_421_mid_transaction),
        cmocka_unit_test(test_smtp_client_lost_connection_mid_data),
        cmocka_unit_test(test_smtp_client_timeout_in_each_phase),
        cmocka_unit_test(test_smtp_client_dsn_parameters_only_when_offered),
        cmocka_unit_test(test_smtp_client_lmtp_one_reply_per_accepted_recipient),
        cmocka_unit_test(test_smtp_client_lmtp_lost_after_dot_fails_only_unanswered),
        cmocka_unit_test(test_smtp_client_lmtp_lhlo_refused_has_no_helo_fallback),
        cmocka_unit_test(test_smtp_client_multiline_replies),
        cmocka_unit_test(test_smtp_client_long_reply_text_is_truncated),
        cmocka_unit_test(test_smtp_client_garbage_reply_is_temporary),
        cmocka_unit_test(test_smtp_client_abort_while_connecting_tries_nothing_else),
        cmocka_unit_test(test_smtp_client_idle_421_or_eof_closes),
        cmocka_unit_test(test_smtp_client_quit_in_ready_and_ipv6_relay),
        cmocka_unit_test(test_smtp_client_reply_format),
        cmocka_unit_test(test_smtp_client_starttls_when_offered_then_ehlo_again),
        cmocka_unit_test(test_smtp_client_starttls_not_offered_or_refused_goes_on_in_plaintext),
        cmocka_unit_test(test_smtp_client_starttls_required_fails_each_target_without_it),
        cmocka_unit_test(test_smtp_client_starttls_required_and_offered_delivers_over_tls),
        cmocka_unit_test(test_smtp_client_tls_handshake_failure_tries_next_target_never_plaintext),
        cmocka_unit_test(test_smtp_client_lmtp_never_uses_tls),
        cmocka_unit_test(test_smtp_client_dane_secure_starttls_is_dane_verified),
        cmocka_unit_test(test_smtp_client_dane_mismatch_fails_the_target),
        cmocka_unit_test(test_smtp_client_dane_tlsa_makes_starttls_mandatory),
        cmocka_unit_test(test_smtp_client_dane_none_or_insecure_is_opportunistic),
        cmocka_unit_test(test_smtp_client_dane_lookup_failure_tries_next_target),
        cmocka_unit_test(test_smtp_client_dane_lookup_is_shared_per_host_and_cancelled),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
