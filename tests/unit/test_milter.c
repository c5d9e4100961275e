/*
 * test_milter — transcript tests of the milter engine over fake_conn: the
 * test plays the filter (connect results, milter packets, timeouts, drops)
 * and checks the exact bytes petrel wrote, the verdicts, the modifications
 * and the log lines; plus table tests of the pure parts (wire codec,
 * milter_apply_mods, verdict_set_raw/verdict_check).
 *
 * Output lengths: the fake conn keeps flushed output pending while "hold"
 * is on, so conn_pending_output() gives the exact byte count of binary
 * packets before fake_conn_drain() hands them over.
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
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>
#include <uv.h>

#include "buf.h"
#include "config.h"
#include "conn.h"
#include "fakes/fake_conn.h"
#include "log.h"
#include "milter.h"
#include "verdict.h"

#define T_CONNECT_MS 1000
#define T_COMMAND_MS 2000
#define T_EOM_MS 3000
#define T_MAX_FILTERS 3

/* What the default session sends (see t_info below). */
#define T_VERSION "petrel " PETREL_VERSION
#define ALL_ACTIONS 0x1ffu
#define ALL_PROTO 0x1ff7ffu
#define S(x) x "\0" /* a NUL-terminated wire string; safe before digits */

struct t_rec {
    int n;            /* callbacks so far */
    struct verdict v; /* the last verdict */
    char mods[4096];  /* "kind:filter:index:name=value[args]|" per modification */
    size_t nmods;
    const char *quarantine_seen;
    bool content_flag;
    struct buf applied;  /* the message after milter_apply_mods (eom, CONTINUE) */
    struct span content; /* what milter_eom was given */
    bool free_in_cb;     /* milter_session_free from inside the callback */
};

struct t_env {
    uv_loop_t loop;
    struct milter_config mc[T_MAX_FILTERS];
    char *names[T_MAX_FILTERS];
    struct listener_config lc;
    struct petrel_config cfg;
    struct milter_conn_info ci;
    struct milter_session *ms; /* NULL once freed by the test */
    struct conn *c[T_MAX_FILTERS];
    struct t_rec r;
    FILE *log;
};

static struct t_env T;

/* ---- log capture --------------------------------------------------------- */

static char *
t_log_text(void)
{
    fflush(T.log);
    long end = ftell(T.log);
    char *s = xcalloc(1, (size_t)end + 1);
    rewind(T.log);
    if (end > 0 && fread(s, 1, (size_t)end, T.log) != (size_t)end)
        fail_msg("reading the log back failed");
    fseek(T.log, 0, SEEK_END);
    return s;
}

static void
t_log_has(const char *want)
{
    char *s = t_log_text();
    if (strstr(s, want) == NULL)
        fail_msg("log lacks \"%s\"; got:\n%s", want, s);
    free(s);
}

/* ---- wire builders ------------------------------------------------------- */

static void
w_u32(struct buf *b, uint32_t v)
{
    unsigned char u[4] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 8), (unsigned char)v};
    buf_append(b, u, 4);
}

static void
w_pkt(struct buf *b, char cmd, const void *data, size_t len)
{
    w_u32(b, (uint32_t)len + 1);
    buf_append(b, &cmd, 1);
    if (len > 0)
        buf_append(b, data, len);
}

#define W_LIT(b, cmd, lit) w_pkt((b), (cmd), (lit), sizeof(lit) - 1)

/* SMFIC_MACRO for stage with name/value pairs, NULL-terminated. */
static void
w_macros(struct buf *b, int stage, ...)
{
    struct buf d;
    buf_init(&d);
    char st = (char)stage;
    buf_append(&d, &st, 1);
    va_list ap;
    va_start(ap, stage);
    const char *s;
    while ((s = va_arg(ap, const char *)) != NULL)
        buf_append(&d, s, strlen(s) + 1);
    va_end(ap);
    w_pkt(b, 'D', buf_ptr(&d), d.len);
    buf_reset(&d);
}

static void
w_optneg(struct buf *b, uint32_t version, uint32_t actions, uint32_t pflags)
{
    struct buf d;
    buf_init(&d);
    w_u32(&d, version);
    w_u32(&d, actions);
    w_u32(&d, pflags);
    w_pkt(b, 'O', buf_ptr(&d), d.len);
    buf_reset(&d);
}

/* The connect-stage macros and command of the default session. */
static void
w_connect(struct buf *b)
{
    w_macros(b, 'C', "j", "mx.test", "_", "unknown [192.0.2.1]", "{daemon_name}", "in",
             "{daemon_addr}", "10.0.0.1", "{daemon_port}", "25", "{if_name}", "mx.test",
             "{if_addr}", "10.0.0.1", "{client_addr}", "192.0.2.1", "{client_port}", "40000",
             "{client_name}", "[192.0.2.1]", "v", T_VERSION, NULL);
    W_LIT(b, 'C',
          S("[192.0.2.1]") "4"
                           "\x9c"
                           "\x40" S("192.0.2.1"));
}

/* ---- output and input ---------------------------------------------------- */

static char *
t_vis(const char *p, size_t n)
{
    char *out = xmalloc(n * 4 + 8);
    str_vis(out, n * 4 + 8, p, n);
    return out;
}

/* Exactly the bytes want were written to c since the last check. */
static void
t_expect(struct conn *c, const struct buf *want, const char *label)
{
    size_t n = conn_pending_output(c);
    fake_conn_drain(c);
    char *got = fake_conn_take_output(c);
    if (n != want->len || memcmp(got, buf_ptr(want), n) != 0) {
        char *g = t_vis(got, n);
        char *w = t_vis(buf_ptr(want), want->len);
        fail_msg("%s: got %zu bytes \"%s\", want %zu bytes \"%s\"", label, n, g, want->len, w);
    }
    free(got);
}

static void
t_expect_nothing(struct conn *c, const char *label)
{
    size_t n = conn_pending_output(c);
    if (n != 0) {
        fake_conn_drain(c);
        char *got = fake_conn_take_output(c);
        char *g = t_vis(got, n);
        fail_msg("%s: got %zu bytes \"%s\", want none", label, n, g);
    }
}

/* After conn_close the fake flushes without a length: check the prefix. */
static void
t_expect_closed_with(struct conn *c, const struct buf *want, const char *label)
{
    if (!fake_conn_closing(c))
        fail_msg("%s: conn not closed", label);
    char *got = fake_conn_take_output(c);
    if (memcmp(got, buf_ptr(want), want->len) != 0) {
        char *g = t_vis(got, want->len);
        char *w = t_vis(buf_ptr(want), want->len);
        fail_msg("%s: got \"%s\", want \"%s\"", label, g, w);
    }
    free(got);
}

static void
t_push(struct conn *c, const struct buf *b)
{
    fake_conn_push(c, buf_ptr(b), b->len);
}

static void
t_push_pkt(struct conn *c, char cmd, const void *data, size_t len)
{
    struct buf b;
    buf_init(&b);
    w_pkt(&b, cmd, data, len);
    t_push(c, &b);
    buf_reset(&b);
}

#define T_PUSH_LIT(c, cmd, lit) t_push_pkt((c), (cmd), (lit), sizeof(lit) - 1)
#define T_REPLY(c, cmd) t_push_pkt((c), (cmd), NULL, 0)

static void
t_run(void)
{
    uv_run(&T.loop, UV_RUN_NOWAIT);
}

/* ---- callbacks ----------------------------------------------------------- */

static const char *const t_mod_names[] = {
    [MILTER_MOD_ADD_HEADER] = "add",        [MILTER_MOD_INSERT_HEADER] = "ins",
    [MILTER_MOD_CHANGE_HEADER] = "chg",     [MILTER_MOD_DELETE_HEADER] = "del",
    [MILTER_MOD_REPLACE_BODY] = "body",     [MILTER_MOD_CHANGE_FROM] = "from",
    [MILTER_MOD_ADD_RCPT] = "addrcpt",      [MILTER_MOD_DELETE_RCPT] = "delrcpt",
    [MILTER_MOD_QUARANTINE] = "quarantine",
};

static void
t_on_verdict(struct milter_session *ms, const struct verdict *v, void *arg)
{
    struct t_rec *r = arg;
    r->n++;
    verdict_copy(&r->v, v);
    if (r->free_in_cb) {
        milter_session_free(ms);
        T.ms = NULL;
    }
}

static void
t_on_eom(struct milter_session *ms, const struct verdict *v, const struct milter_mods *mods,
         void *arg)
{
    struct t_rec *r = arg;
    r->n++;
    verdict_copy(&r->v, v);
    size_t o = 0;
    r->mods[0] = '\0';
    r->nmods = mods->n;
    for (size_t i = 0; i < mods->n; i++) {
        const struct milter_mod *m = &mods->v[i];
        char *val = t_vis(m->value, m->value_len);
        int w =
            snprintf(r->mods + o, sizeof(r->mods) - o, "%s:%s:%u:%s=%s%s%s%s|",
                     t_mod_names[m->kind], m->filter, (unsigned)m->index, m->name ? m->name : "",
                     val, m->args ? "[" : "", m->args ? m->args : "", m->args ? "]" : "");
        free(val);
        if (w > 0 && (size_t)w < sizeof(r->mods) - o)
            o += (size_t)w;
    }
    r->quarantine_seen = mods->quarantine != NULL ? "yes" : NULL;
    r->content_flag = mods->content;
    buf_clear(&r->applied);
    if (v->kind == VERDICT_CONTINUE)
        milter_apply_mods(mods, r->content, &r->applied);
    if (r->free_in_cb) {
        milter_session_free(ms);
        T.ms = NULL;
    }
}

static void
t_expect_verdict(enum verdict_kind kind, int code, const char *esc, const char *text,
                 const char *raw)
{
    const struct verdict *v = &T.r.v;
    if (v->kind != kind)
        fail_msg("verdict: got %s, want %s", verdict_kind_name(v->kind), verdict_kind_name(kind));
    if (v->reply.code != code)
        fail_msg("code: got %d, want %d", v->reply.code, code);
    if (esc != NULL && strcmp(v->reply.esc, esc) != 0)
        fail_msg("esc: got \"%s\", want \"%s\"", v->reply.esc, esc);
    if (text != NULL && strcmp(v->reply.text, text) != 0)
        fail_msg("text: got \"%s\", want \"%s\"", v->reply.text, text);
    if ((raw == NULL) != (v->raw == NULL) || (raw != NULL && strcmp(raw, v->raw) != 0))
        fail_msg("raw: got \"%s\", want \"%s\"", v->raw ? v->raw : "(null)", raw ? raw : "(null)");
    const char *why = verdict_check(v);
    if (why != NULL)
        fail_msg("verdict_check: %s", why);
}

static void
t_expect_calls(int n)
{
    if (T.r.n != n)
        fail_msg("callbacks: got %d, want %d", T.r.n, n);
}

/* ---- set-up -------------------------------------------------------------- */

static int
t_setup(void **state)
{
    (void)state;
    memset(&T, 0, sizeof(T));
    if (uv_loop_init(&T.loop) != 0)
        return -1;
    static const char *const names[] = {"f1", "f2", "f3"};
    static const char *const sockets[] = {"inet:8891@127.0.0.1", "inet:8892@127.0.0.1",
                                          "inet:8893@127.0.0.1"};
    for (int i = 0; i < T_MAX_FILTERS; i++) {
        T.mc[i].name = (char *)names[i];
        T.mc[i].socket = (char *)sockets[i];
        T.mc[i].default_action = MILTER_ACTION_TEMPFAIL;
        T.mc[i].connect_timeout_ms = T_CONNECT_MS;
        T.mc[i].command_timeout_ms = T_COMMAND_MS;
        T.mc[i].eom_timeout_ms = T_EOM_MS;
    }
    T.lc.name = (char *)"in";
    T.lc.max_message_size = 10 * 1024 * 1024;
    T.cfg.hostname = (char *)"mx.test";
    T.cfg.milters = T.mc;
    T.cfg.nmilters = 1;
    T.cfg.listeners = &T.lc;
    T.cfg.nlisteners = 1;
    T.ci = (struct milter_conn_info){
        .session_id = "S1",
        .family = AF_INET,
        .client_addr = "192.0.2.1",
        .client_port = 40000,
        .local_addr = "10.0.0.1",
        .local_port = 25,
    };
    verdict_init(&T.r.v);
    buf_init(&T.r.applied);
    T.log = tmpfile();
    if (T.log == NULL)
        return -1;
    log_set_fd(fileno(T.log));
    return 0;
}

static int
t_teardown(void **state)
{
    (void)state;
    milter_session_free(T.ms);
    T.ms = NULL;
    for (int i = 0; i < T_MAX_FILTERS; i++) {
        if (T.c[i] != NULL)
            fake_conn_finish_close(T.c[i]);
        T.c[i] = NULL;
    }
    uv_run(&T.loop, UV_RUN_DEFAULT);
    int rc = uv_loop_close(&T.loop);
    verdict_clear(&T.r.v);
    buf_reset(&T.r.applied);
    log_set_fd(2);
    fclose(T.log);
    if (rc != 0)
        fail_msg("uv_loop_close: got %d, want 0 (handles left open)", rc);
    return 0;
}

/* Starts a session with the first n filters of the config. */
static void
t_start(size_t n)
{
    T.cfg.nmilters = n;
    unsigned before = fake_conn_connects();
    T.ms = milter_session_new(&T.loop, &T.cfg, &T.lc, &T.ci);
    assert_non_null(T.ms);
    if (fake_conn_connects() != before + 1)
        fail_msg("connects at start: got %u, want 1", fake_conn_connects() - before);
    T.c[0] = fake_conn_last();
    fake_conn_set_hold(T.c[0], true);
}

/* Finishes filter i's connect (the next filter's connect starts then),
 * checks OPTNEG and answers it. */
static void
t_negotiate(size_t i, uint32_t version, uint32_t actions, uint32_t pflags)
{
    unsigned before = fake_conn_connects();
    fake_conn_complete_connect(T.c[i], 0);
    if (i + 1 < T.cfg.nmilters && fake_conn_connects() == before + 1) {
        T.c[i + 1] = fake_conn_last();
        fake_conn_set_hold(T.c[i + 1], true);
    }
    struct buf want;
    buf_init(&want);
    w_optneg(&want, 6, ALL_ACTIONS, ALL_PROTO);
    t_expect(T.c[i], &want, "OPTNEG");
    assert_int_equal(fake_conn_timeout(T.c[i]), T_COMMAND_MS);
    buf_clear(&want);
    w_optneg(&want, version, actions, pflags);
    t_push(T.c[i], &want);
    buf_reset(&want);
}

/* One negotiated filter, connect stage answered with continue. */
static void
t_connected(uint32_t pflags)
{
    t_start(1);
    t_negotiate(0, 6, ALL_ACTIONS, pflags);
    milter_connect(T.ms, t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    w_connect(&want);
    if (pflags & 0x1) { /* SMFIP_NOCONNECT: macros only */
        buf_clear(&want);
        w_macros(&want, 'C', "j", "mx.test", "_", "unknown [192.0.2.1]", "{daemon_name}", "in",
                 "{daemon_addr}", "10.0.0.1", "{daemon_port}", "25", "{if_name}", "mx.test",
                 "{if_addr}", "10.0.0.1", "{client_addr}", "192.0.2.1", "{client_port}", "40000",
                 "{client_name}", "[192.0.2.1]", "v", T_VERSION, NULL);
    }
    t_expect(T.c[0], &want, "connect");
    buf_reset(&want);
    if (!(pflags & (0x1 | 0x1000)))
        T_REPLY(T.c[0], 'c');
    t_run();
    t_expect_calls(1);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
}

/* helo + mail a@x.org SIZE=10 + rcpt b@y.org, each continued. */
static void
t_envelope(void)
{
    struct buf want;
    buf_init(&want);
    milter_helo(T.ms, "client.test", t_on_verdict, &T.r);
    W_LIT(&want, 'H', S("client.test"));
    t_expect(T.c[0], &want, "helo");
    T_REPLY(T.c[0], 'c');
    t_expect_calls(2);
    milter_mail(T.ms, "a@x.org", "SIZE=10", t_on_verdict, &T.r);
    buf_clear(&want);
    w_macros(&want, 'M', "{mail_addr}", "a@x.org", "{mail_host}", "x.org", "{mail_mailer}", "smtp",
             NULL);
    W_LIT(&want, 'M', S("<a@x.org>") S("SIZE=10"));
    t_expect(T.c[0], &want, "mail");
    T_REPLY(T.c[0], 'c');
    t_expect_calls(3);
    milter_rcpt(T.ms, "b@y.org", NULL, t_on_verdict, &T.r);
    buf_clear(&want);
    w_macros(&want, 'R', "{rcpt_addr}", "b@y.org", "{rcpt_host}", "y.org", "{rcpt_mailer}", "smtp",
             NULL);
    W_LIT(&want, 'R', S("<b@y.org>"));
    t_expect(T.c[0], &want, "rcpt");
    T_REPLY(T.c[0], 'c');
    t_expect_calls(4);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
    buf_reset(&want);
}

static const char t_msg[] = "Subject: hi\r\n"
                            "X-Fold: a\r\n"
                            "\tb\r\n"
                            "\r\n"
                            "body\r\n";

/* data (continued) then milter_eom of t_msg with qid Q1. */
static void
t_data_eom_start(const char *msg, size_t len)
{
    milter_data(T.ms, t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'T', "");
    t_expect(T.c[0], &want, "data");
    T_REPLY(T.c[0], 'c');
    buf_reset(&want);
    T.r.content = (struct span){msg, len};
    T.r.n = 0;
    milter_eom(T.ms, T.r.content, "Q1", t_on_eom, &T.r);
}

/* Expects the header/eoh/body/eob transcript of t_msg, each replied to. */
static void
t_eom_transcript(struct conn *c)
{
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'L', S("Subject") S("hi"));
    t_expect(c, &want, "header 1");
    T_REPLY(c, 'c');
    buf_clear(&want);
    W_LIT(&want, 'L', S("X-Fold") S("a\n\tb"));
    t_expect(c, &want, "header 2 (folded: LF)");
    T_REPLY(c, 'c');
    buf_clear(&want);
    w_macros(&want, 'N', "i", "Q1", NULL);
    W_LIT(&want, 'N', "");
    t_expect(c, &want, "eoh");
    assert_int_equal(fake_conn_timeout(c), T_EOM_MS);
    T_REPLY(c, 'c');
    buf_clear(&want);
    W_LIT(&want, 'B', "body\r\n");
    t_expect(c, &want, "body");
    T_REPLY(c, 'c');
    buf_clear(&want);
    w_macros(&want, 'E', "i", "Q1", NULL);
    W_LIT(&want, 'E', "");
    t_expect(c, &want, "eob");
    buf_reset(&want);
}

/* ---- transcripts --------------------------------------------------------- */

static void
test_milter_full_session_transcript(void **state)
{
    (void)state;
    t_connected(0);
    t_envelope();
    t_data_eom_start(t_msg, sizeof(t_msg) - 1);
    t_eom_transcript(T.c[0]);
    t_expect_calls(0);
    T_REPLY(T.c[0], 'c');
    t_expect_calls(1);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
    assert_int_equal(T.r.nmods, 0);
    assert_int_equal(T.r.applied.len, sizeof(t_msg) - 1);
    assert_memory_equal(buf_ptr(&T.r.applied), t_msg, sizeof(t_msg) - 1);
    /* a second transaction needs no ABORT after a finished message */
    T.r.n = 0;
    milter_mail(T.ms, "", NULL, t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    w_macros(&want, 'M', "i", "Q1", "{mail_addr}", "", "{mail_host}", "", "{mail_mailer}", "smtp",
             NULL);
    W_LIT(&want, 'M', S("<>"));
    t_expect(T.c[0], &want, "null sender");
    T_REPLY(T.c[0], 'c');
    /* free sends QUIT and closes */
    milter_session_free(T.ms);
    T.ms = NULL;
    buf_clear(&want);
    W_LIT(&want, 'Q', "");
    t_expect_closed_with(T.c[0], &want, "quit");
    buf_reset(&want);
}

static void
test_milter_ipv6_unix_and_unknown_client_connect_packets(void **state)
{
    (void)state;
    static const struct {
        int family;
        const char *addr;
        const char *name;
        const char *want;
        size_t want_len;
    } cases[] = {
#define C(fam, addr, name, lit) {fam, addr, name, lit, sizeof(lit) - 1}
        C(AF_INET6, "2001:db8::1", "host.example",
          S("host.example") "6"
                            "\x9c"
                            "\x40" S("2001:db8::1")),
        C(AF_UNIX, "/run/smtp.sock", NULL,
          S("localhost") "L"
                         "\0"
                         "\0" S("/run/smtp.sock")),
        C(AF_UNSPEC, NULL, NULL, S("[unknown]") "U"),
#undef C
    };
    for (size_t k = 0; k < ARRAY_SIZE(cases); k++) {
        T.ci.family = cases[k].family;
        T.ci.client_addr = cases[k].addr;
        T.ci.client_name = cases[k].name;
        t_start(1);
        t_negotiate(0, 6, ALL_ACTIONS, 0x2000 | 0x1000); /* NR_CONN, NR_HELO */
        milter_connect(T.ms, t_on_verdict, &T.r);
        size_t n = conn_pending_output(T.c[0]);
        fake_conn_drain(T.c[0]);
        char *got = fake_conn_take_output(T.c[0]);
        /* the C packet is last: compare its tail */
        size_t plen = cases[k].want_len + 5;
        if (n < plen || memcmp(got + n - cases[k].want_len, cases[k].want, cases[k].want_len) != 0)
            fail_msg("case %zu: connect packet \"%s\" does not end with the expected data", k,
                     t_vis(got, n));
        free(got);
        t_run();
        t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
        milter_session_free(T.ms);
        T.ms = NULL;
        fake_conn_finish_close(T.c[0]);
        T.c[0] = NULL;
    }
}

static void
test_milter_socket_specs(void **state)
{
    (void)state;
    static const struct {
        const char *socket;
        int family;
        const char *ip;
        int port;
        const char *path;
    } cases[] = {
        {"inet:8891@127.0.0.1", AF_INET, "127.0.0.1", 8891, NULL},
        {"inet:25@localhost", AF_INET, "127.0.0.1", 25, NULL},
        {"inet6:8891@::1", AF_INET6, "::1", 8891, NULL},
        {"inet6:99@localhost", AF_INET6, "::1", 99, NULL},
        {"unix:/var/run/f.sock", AF_UNIX, NULL, 0, "/var/run/f.sock"},
    };
    for (size_t k = 0; k < ARRAY_SIZE(cases); k++) {
        T.mc[0].socket = (char *)cases[k].socket;
        t_start(1);
        if (cases[k].path != NULL) {
            assert_null(fake_conn_connect_dst(T.c[0]));
            assert_string_equal(fake_conn_connect_path(T.c[0]), cases[k].path);
        } else {
            const struct sockaddr *sa = fake_conn_connect_dst(T.c[0]);
            assert_non_null(sa);
            assert_int_equal(sa->sa_family, cases[k].family);
            char ip[64];
            int port;
            if (sa->sa_family == AF_INET) {
                const struct sockaddr_in *s4 = (const struct sockaddr_in *)sa;
                inet_ntop(AF_INET, &s4->sin_addr, ip, sizeof(ip));
                port = ntohs(s4->sin_port);
            } else {
                const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
                inet_ntop(AF_INET6, &s6->sin6_addr, ip, sizeof(ip));
                port = ntohs(s6->sin6_port);
            }
            if (strcmp(ip, cases[k].ip) != 0 || port != cases[k].port)
                fail_msg("%s: got %s port %d, want %s port %d", cases[k].socket, ip, port,
                         cases[k].ip, cases[k].port);
        }
        assert_int_equal(fake_conn_timeout(T.c[0]), T_CONNECT_MS);
        milter_session_free(T.ms);
        T.ms = NULL;
        fake_conn_finish_close(T.c[0]);
        T.c[0] = NULL;
    }
}

static void
test_milter_hostname_socket_fails_with_default_action(void **state)
{
    (void)state;
    T.mc[0].socket = (char *)"inet:8891@milter.example.org";
    T.mc[0].default_action = MILTER_ACTION_REJECT;
    T.cfg.nmilters = 1;
    unsigned before = fake_conn_connects();
    T.ms = milter_session_new(&T.loop, &T.cfg, &T.lc, &T.ci);
    assert_non_null(T.ms);
    assert_int_equal(fake_conn_connects(), before);
    milter_connect(T.ms, t_on_verdict, &T.r);
    t_expect_calls(0); /* never from inside the call */
    t_run();
    t_expect_calls(1);
    t_expect_verdict(VERDICT_REJECT, 550, "5.7.1", "Mail filter unavailable", NULL);
    t_log_has("milter-failure: session=S1, milter=f1");
    t_log_has("status=reject");
}

static void
test_milter_listener_selects_filters(void **state)
{
    (void)state;
    char *only[] = {(char *)"f2"};
    T.lc.milters.v = only;
    T.lc.milters.n = 1;
    T.lc.milters_set = true;
    T.cfg.nmilters = 2;
    T.ms = milter_session_new(&T.loop, &T.cfg, &T.lc, &T.ci);
    assert_non_null(T.ms);
    T.c[0] = fake_conn_last();
    const struct sockaddr_in *s4 = (const struct sockaddr_in *)fake_conn_connect_dst(T.c[0]);
    assert_int_equal(ntohs(s4->sin_port), 8892);
    milter_session_free(T.ms);
    T.ms = NULL;
    fake_conn_finish_close(T.c[0]);
    T.c[0] = NULL;
    /* an empty list: no filter, no session */
    T.lc.milters.n = 0;
    assert_null(milter_session_new(&T.loop, &T.cfg, &T.lc, &T.ci));
    T.lc.milters_set = false;
    T.cfg.nmilters = 0;
    assert_null(milter_session_new(&T.loop, &T.cfg, &T.lc, &T.ci));
}

/* ---- replies ------------------------------------------------------------- */

struct reply_case {
    const char *label;
    char cmd;
    const char *data;
    size_t len;
    enum verdict_kind kind;
    int code;
    const char *esc;
    const char *text;
    const char *raw;
};

#define RC(label, cmd, lit, kind, code, esc, text, raw)                                            \
    {                                                                                              \
        label, cmd, lit, sizeof(lit) - 1, kind, code, esc, text, raw                               \
    }

static const struct reply_case t_reply_cases[] = {
    RC("continue", 'c', "", VERDICT_CONTINUE, 0, "", "", NULL),
    RC("accept", 'a', "", VERDICT_CONTINUE, 0, "", "", NULL),
    RC("reject", 'r', "", VERDICT_REJECT, 550, "5.7.1", "Command rejected", NULL),
    RC("tempfail", 't', "", VERDICT_TEMPFAIL, 451, "4.7.1", "Service unavailable - try again later",
       NULL),
    RC("discard", 'd', "", VERDICT_DISCARD, 0, "", "", NULL),
    RC("shutdown", '4', "", VERDICT_TEMPFAIL, 421, "4.7.0",
       "Service unavailable - closing connection", NULL),
    RC("replycode 5xx", 'y', S("554 5.7.0 go away"), VERDICT_REJECT, 554, "5.7.0", "go away",
       "554 5.7.0 go away"),
    RC("replycode 4xx without esc", 'y', S("452 later"), VERDICT_TEMPFAIL, 452, "4.7.1", "later",
       "452 later"),
    RC("replycode multi-line", 'y', S("550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 last"),
       VERDICT_REJECT, 550, "5.7.1", "first",
       "550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 last"),
    RC("replycode percent", 'y', S("550 5.7.1 100%% spam%"), VERDICT_REJECT, 550, "5.7.1",
       "100% spam", "550 5.7.1 100% spam"),
    RC("skip", 's', "", VERDICT_CONTINUE, 0, "", "", NULL),
};

static void
test_milter_every_reply_at_rcpt(void **state)
{
    (void)state;
    for (size_t k = 0; k < ARRAY_SIZE(t_reply_cases); k++) {
        const struct reply_case *rc = &t_reply_cases[k];
        t_connected(0);
        milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
        fake_conn_drain(T.c[0]);
        free(fake_conn_take_output(T.c[0]));
        T_REPLY(T.c[0], 'c');
        milter_rcpt(T.ms, "b@y.org", NULL, t_on_verdict, &T.r);
        fake_conn_drain(T.c[0]);
        free(fake_conn_take_output(T.c[0]));
        t_push_pkt(T.c[0], rc->cmd, rc->data, rc->len);
        if (T.r.n != 3)
            fail_msg("%s: callbacks: got %d, want 3", rc->label, T.r.n);
        const struct verdict *v = &T.r.v;
        if (v->kind != rc->kind || v->reply.code != rc->code ||
            strcmp(v->reply.esc, rc->esc) != 0 || strcmp(v->reply.text, rc->text) != 0 ||
            (rc->raw == NULL) != (v->raw == NULL) || (rc->raw && strcmp(rc->raw, v->raw) != 0))
            fail_msg("%s: got %s %d \"%s\" \"%s\" raw \"%s\", want %s %d \"%s\" \"%s\" raw \"%s\"",
                     rc->label, verdict_kind_name(v->kind), v->reply.code, v->reply.esc,
                     v->reply.text, v->raw ? v->raw : "(null)", verdict_kind_name(rc->kind),
                     rc->code, rc->esc, rc->text, rc->raw ? rc->raw : "(null)");
        if (verdict_check(v) != NULL)
            fail_msg("%s: verdict_check: %s", rc->label, verdict_check(v));
        milter_session_free(T.ms);
        T.ms = NULL;
        fake_conn_finish_close(T.c[0]);
        T.c[0] = NULL;
        T.r.n = 0;
    }
    t_log_has("milter-reject: session=S1, milter=f1, cmd=RCPT, client=unknown[192.0.2.1], "
              "from=<a@x.org>, to=<b@y.org>, reply=550 5.7.1 Command rejected");
    t_log_has("milter-discard: session=S1, milter=f1, cmd=RCPT");
}

static void
test_milter_reject_at_connect_is_sticky_and_closes(void **state)
{
    (void)state;
    t_start(1);
    t_negotiate(0, 6, ALL_ACTIONS, 0);
    milter_connect(T.ms, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_PUSH_LIT(T.c[0], 'y', S("421 4.7.0 not now"));
    t_expect_calls(1);
    t_expect_verdict(VERDICT_TEMPFAIL, 421, "4.7.0", "not now", "421 4.7.0 not now");
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'Q', "");
    t_expect_closed_with(T.c[0], &want, "quit after connect reject");
    buf_reset(&want);
    milter_helo(T.ms, "client.test", t_on_verdict, &T.r);
    t_expect_calls(1);
    t_run();
    t_expect_calls(2);
    t_expect_verdict(VERDICT_TEMPFAIL, 421, "4.7.0", "not now", "421 4.7.0 not now");
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    t_run();
    t_expect_calls(3);
    t_expect_verdict(VERDICT_TEMPFAIL, 421, NULL, NULL, "421 4.7.0 not now");
}

static void
test_milter_accept_at_connect_ends_filter_for_session(void **state)
{
    (void)state;
    t_start(1);
    t_negotiate(0, 6, ALL_ACTIONS, 0);
    milter_connect(T.ms, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'a');
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'Q', "");
    t_expect_closed_with(T.c[0], &want, "quit after accept");
    buf_reset(&want);
    milter_helo(T.ms, "h", t_on_verdict, &T.r);
    t_run();
    t_expect_calls(2);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
}

static void
test_milter_discard_at_helo_is_ignored(void **state)
{
    (void)state;
    t_connected(0);
    milter_helo(T.ms, "h", t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'd');
    t_expect_calls(2);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
    t_log_has("DISCARD is not allowed at HELO");
}

static void
test_milter_accept_at_mail_skips_filter_for_message(void **state)
{
    (void)state;
    t_connected(0);
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'a');
    t_expect_calls(2);
    milter_rcpt(T.ms, "b@y.org", NULL, t_on_verdict, &T.r);
    t_expect_nothing(T.c[0], "rcpt after accept");
    t_run();
    t_expect_calls(3);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
    milter_data(T.ms, t_on_verdict, &T.r);
    t_run();
    T.r.content = (struct span){t_msg, sizeof(t_msg) - 1};
    milter_eom(T.ms, T.r.content, NULL, t_on_eom, &T.r);
    t_expect_nothing(T.c[0], "eom after accept");
    t_run();
    t_expect_calls(5);
    /* the next transaction includes the filter again, after an ABORT */
    milter_mail(T.ms, "c@x.org", NULL, t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    w_macros(&want, 'M', "{mail_addr}", "c@x.org", "{mail_host}", "x.org", "{mail_mailer}", "smtp",
             NULL);
    W_LIT(&want, 'M', S("<c@x.org>"));
    t_expect(T.c[0], &want, "next mail: no ABORT after an accepted message");
    buf_reset(&want);
    T_REPLY(T.c[0], 'c');
    t_expect_calls(6);
}

static void
test_milter_discard_at_rcpt_covers_the_transaction(void **state)
{
    (void)state;
    t_connected(0);
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'c');
    milter_rcpt(T.ms, "b@y.org", NULL, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'd');
    t_expect_verdict(VERDICT_DISCARD, 0, NULL, NULL, NULL);
    milter_rcpt(T.ms, "c@y.org", NULL, t_on_verdict, &T.r);
    t_expect_nothing(T.c[0], "rcpt after discard");
    t_run();
    t_expect_calls(4);
    t_expect_verdict(VERDICT_DISCARD, 0, NULL, NULL, NULL);
    T.r.content = (struct span){t_msg, sizeof(t_msg) - 1};
    milter_eom(T.ms, T.r.content, NULL, t_on_eom, &T.r);
    t_run();
    t_expect_calls(5);
    t_expect_verdict(VERDICT_DISCARD, 0, NULL, NULL, NULL);
    /* the abort reaches the filter, which was inside the message */
    milter_abort(T.ms);
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'A', "");
    t_expect(T.c[0], &want, "abort");
    buf_reset(&want);
    /* a new transaction is filtered again */
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    assert_true(conn_pending_output(T.c[0]) > 0);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'c');
    t_expect_calls(6);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
}

static void
test_milter_mail_after_unfinished_transaction_sends_abort_first(void **state)
{
    (void)state;
    t_connected(0);
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'r'); /* MAIL rejected by the filter */
    t_expect_verdict(VERDICT_REJECT, 550, "5.7.1", "Command rejected", NULL);
    milter_mail(T.ms, "b@x.org", NULL, t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'A', "");
    w_macros(&want, 'M', "{mail_addr}", "b@x.org", "{mail_host}", "x.org", "{mail_mailer}", "smtp",
             NULL);
    W_LIT(&want, 'M', S("<b@x.org>"));
    t_expect(T.c[0], &want, "abort then mail");
    buf_reset(&want);
    T_REPLY(T.c[0], 'c');
    t_expect_calls(3);
}

/* ---- protocol flags ------------------------------------------------------ */

static void
test_milter_no_reply_flags_pipeline(void **state)
{
    (void)state;
    /* NR_CONN NR_HELO NR_MAIL NR_RCPT NR_DATA NR_HDR NR_EOH NR_BODY */
    uint32_t nr = 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x80 | 0x40000 | 0x80000;
    t_connected(nr);
    milter_helo(T.ms, "h", t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    t_expect_calls(1);
    t_run();
    t_expect_calls(2);
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    t_run();
    milter_rcpt(T.ms, "b@y.org", NULL, t_on_verdict, &T.r);
    t_run();
    milter_data(T.ms, t_on_verdict, &T.r);
    t_run();
    t_expect_calls(5);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T.r.n = 0;
    T.r.content = (struct span){t_msg, sizeof(t_msg) - 1};
    milter_eom(T.ms, T.r.content, "Q1", t_on_eom, &T.r);
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'L', S("Subject") S("hi"));
    W_LIT(&want, 'L', S("X-Fold") S("a\n\tb"));
    w_macros(&want, 'N', "i", "Q1", NULL);
    W_LIT(&want, 'N', "");
    W_LIT(&want, 'B', "body\r\n");
    /* the body chunk waits for the drain: nothing after it yet */
    t_expect(T.c[0], &want, "pipelined headers, eoh, body");
    buf_clear(&want);
    w_macros(&want, 'E', "i", "Q1", NULL);
    W_LIT(&want, 'E', "");
    t_expect(T.c[0], &want, "eob after the drain");
    buf_reset(&want);
    T_REPLY(T.c[0], 'c');
    t_expect_calls(1);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
}

static void
test_milter_no_send_flags_keep_macros(void **state)
{
    (void)state;
    /* NOCONNECT NOHELO NOMAIL NORCPT NOBODY NOHDRS NOEOH NODATA */
    uint32_t no = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x200;
    t_connected(no);
    milter_helo(T.ms, "h", t_on_verdict, &T.r);
    t_expect_nothing(T.c[0], "helo (no macros set for it)");
    t_run();
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    w_macros(&want, 'M', "{mail_addr}", "a@x.org", "{mail_host}", "x.org", "{mail_mailer}", "smtp",
             NULL);
    t_expect(T.c[0], &want, "mail: macros only");
    t_run();
    milter_data(T.ms, t_on_verdict, &T.r);
    t_run();
    t_expect_calls(4);
    T.r.n = 0;
    T.r.content = (struct span){t_msg, sizeof(t_msg) - 1};
    milter_eom(T.ms, T.r.content, "Q1", t_on_eom, &T.r);
    buf_clear(&want);
    w_macros(&want, 'N', "i", "Q1", NULL);
    w_macros(&want, 'E', "i", "Q1", NULL);
    W_LIT(&want, 'E', "");
    t_expect(T.c[0], &want, "eom: eoh macros, eob only");
    buf_reset(&want);
    T_REPLY(T.c[0], 'c');
    t_expect_calls(1);
}

static void
test_milter_skip_stops_same_kind_until_another(void **state)
{
    (void)state;
    t_connected(0x400); /* SMFIP_SKIP */
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'c');
    milter_rcpt(T.ms, "b@y.org", NULL, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 's');
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
    milter_rcpt(T.ms, "c@y.org", NULL, t_on_verdict, &T.r);
    t_expect_nothing(T.c[0], "rcpt skipped");
    t_run();
    t_expect_calls(4);
    milter_data(T.ms, t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'T', "");
    t_expect(T.c[0], &want, "data ends the skip");
    T_REPLY(T.c[0], 'c');
    /* body: 70000 bytes → first chunk, skip, then EOB */
    static char big[70020];
    memcpy(big, "A: b\r\n\r\n", 8);
    memset(big + 8, 'x', sizeof(big) - 8);
    T.r.n = 0;
    T.r.content = (struct span){big, sizeof(big)};
    milter_eom(T.ms, T.r.content, NULL, t_on_eom, &T.r);
    buf_clear(&want);
    W_LIT(&want, 'L', S("A") S("b"));
    t_expect(T.c[0], &want, "header");
    T_REPLY(T.c[0], 'c');
    buf_clear(&want);
    W_LIT(&want, 'N', "");
    t_expect(T.c[0], &want, "eoh");
    T_REPLY(T.c[0], 'c');
    buf_clear(&want);
    w_pkt(&want, 'B', big + 8, 65535);
    t_expect(T.c[0], &want, "first body chunk: 65535 bytes");
    T_REPLY(T.c[0], 's');
    buf_clear(&want);
    W_LIT(&want, 'E', "");
    t_expect(T.c[0], &want, "eob after skip");
    T_REPLY(T.c[0], 'c');
    t_expect_calls(1);
    buf_reset(&want);
}

static void
test_milter_body_split_in_65535_byte_chunks(void **state)
{
    (void)state;
    t_connected(0);
    static char big[65535 * 2 + 10 + 3];
    memcpy(big, "\r\n", 2); /* no headers */
    memset(big + 2, 'y', sizeof(big) - 2);
    milter_data(T.ms, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'c');
    T.r.n = 0;
    T.r.content = (struct span){big, sizeof(big)};
    milter_eom(T.ms, T.r.content, NULL, t_on_eom, &T.r);
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'N', "");
    t_expect(T.c[0], &want, "eoh without headers");
    T_REPLY(T.c[0], 'c');
    size_t off = 2;
    size_t sizes[] = {65535, 65535, 11};
    for (size_t k = 0; k < 3; k++) {
        buf_clear(&want);
        w_pkt(&want, 'B', big + off, sizes[k]);
        t_expect(T.c[0], &want, "body chunk");
        off += sizes[k];
        T_REPLY(T.c[0], 'c');
    }
    buf_clear(&want);
    W_LIT(&want, 'E', "");
    t_expect(T.c[0], &want, "eob");
    buf_reset(&want);
    T_REPLY(T.c[0], 'c');
    t_expect_calls(1);
}

static void
test_milter_setsymlist_and_leadspc(void **state)
{
    (void)state;
    t_start(1);
    fake_conn_complete_connect(T.c[0], 0);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    struct buf o;
    buf_init(&o);
    w_u32(&o, 6);
    w_u32(&o, ALL_ACTIONS);
    w_u32(&o, 0x100000 | 0x1000); /* HDR_LEADSPC, NR_CONN */
    w_u32(&o, 2);                 /* SMFIM_ENVFROM */
    buf_append(&o, S("{mail_host} j"), sizeof(S("{mail_host} j")) - 1);
    w_u32(&o, 9); /* unknown stage: ignored */
    buf_append(&o, S("x"), 2);
    w_u32(&o, 1); /* SMFIM_HELO */
    buf_append(&o, S("{client_addr}"), sizeof(S("{client_addr}")) - 1);
    t_push_pkt(T.c[0], 'O', buf_ptr(&o), o.len);
    buf_reset(&o);
    milter_connect(T.ms, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    t_run();
    milter_helo(T.ms, "h", t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    w_macros(&want, 'H', "{client_addr}", "192.0.2.1", NULL);
    W_LIT(&want, 'H', S("h"));
    t_expect(T.c[0], &want, "helo with its list");
    T_REPLY(T.c[0], 'c');
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    buf_clear(&want);
    w_macros(&want, 'M', "{mail_host}", "x.org", "j", "mx.test", NULL);
    W_LIT(&want, 'M', S("<a@x.org>"));
    t_expect(T.c[0], &want, "mail with its list");
    T_REPLY(T.c[0], 'c');
    milter_data(T.ms, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'c');
    T.r.n = 0;
    T.r.content = (struct span){t_msg, sizeof(t_msg) - 1};
    milter_eom(T.ms, T.r.content, NULL, t_on_eom, &T.r);
    buf_clear(&want);
    W_LIT(&want, 'L', S("Subject") S(" hi"));
    t_expect(T.c[0], &want, "header with its leading space");
    buf_reset(&want);
    T_REPLY(T.c[0], 'c');
    T_REPLY(T.c[0], 'c'); /* X-Fold */
    T_REPLY(T.c[0], 'c'); /* eoh */
    T_REPLY(T.c[0], 'c'); /* body */
    T_PUSH_LIT(T.c[0], 'h', S("X-Lead") S("no space added"));
    T_REPLY(T.c[0], 'c');
    t_expect_calls(1);
    assert_string_equal(T.r.mods, "add:f1:0:X-Lead=no space added|");
    static const char lead[] = "X-Lead:no space added\r\n\r\nbody";
    assert_non_null(memmem(buf_ptr(&T.r.applied), T.r.applied.len, lead, sizeof(lead) - 1));
}

/* ---- modifications ------------------------------------------------------- */

static void
test_milter_every_modification_at_eom(void **state)
{
    (void)state;
    t_connected(0);
    t_envelope();
    t_data_eom_start(t_msg, sizeof(t_msg) - 1);
    t_eom_transcript(T.c[0]);
    T_PUSH_LIT(T.c[0], 'p', "");
    T_PUSH_LIT(T.c[0], 'h', S("X-Added") S("one\ntwo"));
    t_push_pkt(T.c[0], 'i', "\0\0\0\0" S("X-Top") S("first"),
               4 + sizeof(S("X-Top") S("first")) - 1);
    t_push_pkt(T.c[0], 'm', "\0\0\0\1" S("subject") S("changed"),
               4 + sizeof(S("subject") S("changed")) - 1);
    t_push_pkt(T.c[0], 'm', "\0\0\0\1" S("X-Fold") S(""), 4 + sizeof(S("X-Fold") S("")) - 1);
    T_PUSH_LIT(T.c[0], 'e', S("<new@x.org>") S("SIZE=99"));
    T_PUSH_LIT(T.c[0], '+', S("<add@y.org>"));
    T_PUSH_LIT(T.c[0], '2', S("add2@y.org") S("NOTIFY=NEVER"));
    T_PUSH_LIT(T.c[0], '-', S("<b@y.org>"));
    T_PUSH_LIT(T.c[0], 'b', "new\nbo");
    T_PUSH_LIT(T.c[0], 'b', "dy\r\n");
    T_PUSH_LIT(T.c[0], 'q', S("looks odd"));
    t_expect_calls(0);
    T_REPLY(T.c[0], 'c');
    t_expect_calls(1);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
    assert_string_equal(T.r.mods, "add:f1:0:X-Added= one\\x0d\\x0a\\x09two|"
                                  "ins:f1:0:X-Top= first|"
                                  "chg:f1:1:subject= changed|"
                                  "del:f1:1:X-Fold=|"
                                  "from:f1:0:=new@x.org[SIZE=99]|"
                                  "addrcpt:f1:0:=add@y.org|"
                                  "addrcpt:f1:0:=add2@y.org[NOTIFY=NEVER]|"
                                  "delrcpt:f1:0:=b@y.org|"
                                  "body:f1:0:=new\\x0d\\x0abody\\x0d\\x0a|"
                                  "quarantine:f1:0:=looks odd|");
    assert_non_null(T.r.quarantine_seen);
    assert_true(T.r.content_flag);
    static const char want_msg[] = "X-Top: first\r\n"
                                   "subject: changed\r\n"
                                   "X-Added: one\r\n\ttwo\r\n"
                                   "\r\n"
                                   "new\r\nbody\r\n";
    assert_int_equal(T.r.applied.len, sizeof(want_msg) - 1);
    assert_memory_equal(buf_ptr(&T.r.applied), want_msg, sizeof(want_msg) - 1);
    t_log_has("Q1: milter-modify: session=S1, milter=f1, counts=add_header=1 insert_header=1 "
              "change_header=1 delete_header=1 replace_body=1 change_from=1 add_rcpt=2 "
              "delete_rcpt=1 quarantine=1");
    t_log_has("Q1: milter-hold: session=S1, milter=f1, cmd=END-OF-MESSAGE, reason=looks odd");
}

static void
test_milter_modification_not_negotiated_fails_filter(void **state)
{
    (void)state;
    t_start(1);
    t_negotiate(0, 6, 0x1 /* ADDHDRS only */, 0);
    milter_connect(T.ms, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'c');
    milter_helo(T.ms, "client.test", t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'c');
    milter_data(T.ms, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'c');
    T.r.n = 0;
    T.r.content = (struct span){t_msg, sizeof(t_msg) - 1};
    milter_eom(T.ms, T.r.content, NULL, t_on_eom, &T.r);
    for (int k = 0; k < 4; k++) {
        fake_conn_drain(T.c[0]);
        free(fake_conn_take_output(T.c[0]));
        T_REPLY(T.c[0], 'c');
    }
    T_PUSH_LIT(T.c[0], 'h', S("X-Ok") S("fine"));
    T_PUSH_LIT(T.c[0], '+', S("<x@y.org>"));
    t_expect_calls(1);
    t_expect_verdict(VERDICT_TEMPFAIL, 451, "4.7.1", "Mail filter unavailable, try again later",
                     NULL);
    assert_int_equal(T.r.nmods, 0);
    t_log_has("reason=add recipient without negotiating it");
}

static void
test_milter_accept_default_action_drops_partial_mods(void **state)
{
    (void)state;
    T.mc[0].default_action = MILTER_ACTION_ACCEPT;
    t_connected(0);
    t_envelope();
    t_data_eom_start(t_msg, sizeof(t_msg) - 1);
    t_eom_transcript(T.c[0]);
    T_PUSH_LIT(T.c[0], 'h', S("X-Half") S("done"));
    fake_conn_eof(T.c[0]);
    t_expect_calls(1);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
    assert_int_equal(T.r.nmods, 0);
    assert_memory_equal(buf_ptr(&T.r.applied), t_msg, sizeof(t_msg) - 1);
    t_log_has("milter-failure: session=S1, milter=f1, cmd=END-OF-MESSAGE, reason=connection "
              "closed by the filter, status=accept");
    /* the filter is gone for the session: later stages continue at once */
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    t_run();
    t_expect_calls(2);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
}

/* ---- two filters --------------------------------------------------------- */

static void
test_milter_two_filters_in_order_second_sees_first_mods(void **state)
{
    (void)state;
    t_start(2);
    t_negotiate(0, 6, ALL_ACTIONS, 0x1000 | 0x2000); /* NR_CONN NR_HELO */
    assert_non_null(T.c[1]);
    t_negotiate(1, 6, ALL_ACTIONS, 0x1000 | 0x2000);
    milter_connect(T.ms, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    fake_conn_drain(T.c[1]);
    free(fake_conn_take_output(T.c[1]));
    t_run();
    t_expect_calls(1);
    milter_data(T.ms, t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'T', "");
    t_expect(T.c[0], &want, "data to f1");
    t_expect_nothing(T.c[1], "f2 waits for f1");
    T_REPLY(T.c[0], 'c');
    t_expect(T.c[1], &want, "data to f2");
    T_REPLY(T.c[1], 'c');
    t_expect_calls(2);
    static const char msg[] = "A: 1\r\n\r\nx\r\n";
    T.r.n = 0;
    T.r.content = (struct span){msg, sizeof(msg) - 1};
    milter_eom(T.ms, T.r.content, NULL, t_on_eom, &T.r);
    /* f1: header, eoh, body, eob; adds a header and replaces the body */
    for (int k = 0; k < 4; k++) {
        fake_conn_drain(T.c[0]);
        free(fake_conn_take_output(T.c[0]));
        if (k < 3)
            T_REPLY(T.c[0], 'c');
    }
    T_PUSH_LIT(T.c[0], 'h', S("B") S("2"));
    T_PUSH_LIT(T.c[0], 'b', "y\r\n");
    T_REPLY(T.c[0], 'c');
    /* f2 sees the message as f1 left it */
    buf_clear(&want);
    W_LIT(&want, 'L', S("A") S("1"));
    t_expect(T.c[1], &want, "f2 header 1");
    T_REPLY(T.c[1], 'c');
    buf_clear(&want);
    W_LIT(&want, 'L', S("B") S("2"));
    t_expect(T.c[1], &want, "f2 header 2 (added by f1)");
    T_REPLY(T.c[1], 'c');
    buf_clear(&want);
    W_LIT(&want, 'N', "");
    t_expect(T.c[1], &want, "f2 eoh");
    T_REPLY(T.c[1], 'c');
    buf_clear(&want);
    W_LIT(&want, 'B', "y\r\n");
    t_expect(T.c[1], &want, "f2 body (replaced by f1)");
    T_REPLY(T.c[1], 'c');
    fake_conn_drain(T.c[1]);
    free(fake_conn_take_output(T.c[1]));
    t_push_pkt(T.c[1], 'm', "\0\0\0\1" S("b") S("3"), 4 + sizeof(S("b") S("3")) - 1);
    T_REPLY(T.c[1], 'a');
    t_expect_calls(1);
    assert_string_equal(T.r.mods, "add:f1:0:B= 2|body:f1:0:=y\\x0d\\x0a|chg:f2:1:b= 3|");
    static const char want_msg[] = "A: 1\r\nb: 3\r\n\r\ny\r\n";
    assert_int_equal(T.r.applied.len, sizeof(want_msg) - 1);
    assert_memory_equal(buf_ptr(&T.r.applied), want_msg, sizeof(want_msg) - 1);
    buf_reset(&want);
}

static void
test_milter_first_filter_reject_hides_stage_from_second(void **state)
{
    (void)state;
    t_start(2);
    t_negotiate(0, 6, ALL_ACTIONS, 0);
    t_negotiate(1, 6, ALL_ACTIONS, 0);
    milter_connect(T.ms, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 'c');
    fake_conn_drain(T.c[1]);
    free(fake_conn_take_output(T.c[1]));
    T_REPLY(T.c[1], 'c');
    t_expect_calls(1);
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    T_REPLY(T.c[0], 't');
    t_expect_calls(2);
    t_expect_verdict(VERDICT_TEMPFAIL, 451, "4.7.1", NULL, NULL);
    t_expect_nothing(T.c[1], "f2 never sees the MAIL");
    t_log_has("milter-reject: session=S1, milter=f1, cmd=MAIL");
}

static void
test_milter_stage_waits_for_negotiation(void **state)
{
    (void)state;
    t_start(1);
    milter_connect(T.ms, t_on_verdict, &T.r);
    t_run();
    t_expect_calls(0);
    t_negotiate(0, 6, ALL_ACTIONS, 0);
    struct buf want;
    buf_init(&want);
    w_connect(&want);
    t_expect(T.c[0], &want, "connect after negotiation");
    buf_reset(&want);
    T_REPLY(T.c[0], 'c');
    t_expect_calls(1);
}

/* ---- failures ------------------------------------------------------------ */

struct fail_case {
    const char *label;
    int how; /* 0 timeout, 1 eof, 2 error, 3 packet */
    const char *pkt;
    size_t len;
    const char *reason;
};

#define FC(label, how, lit, reason)                                                                \
    {                                                                                              \
        label, how, lit, sizeof(lit) - 1, reason                                                   \
    }

static const struct fail_case t_fail_cases[] = {
    FC("timeout", 0, "", "reason=timeout waiting for the reply to 'R'"),
    FC("eof", 1, "", "reason=connection closed by the filter"),
    FC("read error", 2, "", "milter=f1, cmd=RCPT, reason="),
    FC("length 0", 3, "\0\0\0\0", "reason=packet of length 0"),
    FC("oversized", 3, "\0\x20\0\0", "reason=packet of 2097152 bytes exceeds the limit"),
    FC("unknown reply", 3, "\0\0\0\1Z", "reason=malformed reply 'Z': unknown reply"),
    FC("data after continue", 3, "\0\0\0\2cx", "reason=malformed reply 'c': unexpected data"),
    FC("bad replycode class", 3,
       "\0\0\0\x08"
       "y"
       "250 ok\0",
       "malformed reply code"),
    FC("replycode codes differ", 3,
       "\0\0\0\x0e"
       "y"
       "550-a\r\n551 b\0",
       "malformed reply code"),
    FC("replycode esc class", 3,
       "\0\0\0\x0d"
       "y"
       "550 4.7.1 x\0",
       "bad enhanced status code"),
    FC("modification before eom", 3,
       "\0\0\0\x05"
       "h"
       "A\0"
       "b\0",
       "unexpected reply 'h' to 'R'"),
    FC("negotiation reply twice", 3,
       "\0\0\0\x0d"
       "O"
       "\0\0\0\6\0\0\0\0\0\0\0\0",
       "malformed reply 'O'"),
};

static void
test_milter_failures_give_default_action(void **state)
{
    (void)state;
    static const enum milter_action actions[] = {MILTER_ACTION_TEMPFAIL, MILTER_ACTION_REJECT,
                                                 MILTER_ACTION_ACCEPT};
    for (size_t a = 0; a < ARRAY_SIZE(actions); a++) {
        for (size_t k = 0; k < ARRAY_SIZE(t_fail_cases); k++) {
            const struct fail_case *fc = &t_fail_cases[k];
            T.mc[0].default_action = actions[a];
            t_connected(0);
            milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
            fake_conn_drain(T.c[0]);
            free(fake_conn_take_output(T.c[0]));
            T_REPLY(T.c[0], 'c');
            milter_rcpt(T.ms, "b@y.org", NULL, t_on_verdict, &T.r);
            fake_conn_drain(T.c[0]);
            free(fake_conn_take_output(T.c[0]));
            assert_int_equal(fake_conn_timeout(T.c[0]), T_COMMAND_MS);
            if (fc->how == 0)
                fake_conn_fire_timeout(T.c[0]);
            else if (fc->how == 1)
                fake_conn_eof(T.c[0]);
            else if (fc->how == 2)
                fake_conn_error(T.c[0], -ECONNRESET);
            else
                fake_conn_push(T.c[0], fc->pkt, fc->len);
            if (T.r.n != 3)
                fail_msg("%s: callbacks: got %d, want 3", fc->label, T.r.n);
            if (!fake_conn_closing(T.c[0]))
                fail_msg("%s: the filter's conn is not closed", fc->label);
            const struct verdict *v = &T.r.v;
            enum verdict_kind want = actions[a] == MILTER_ACTION_ACCEPT   ? VERDICT_CONTINUE
                                     : actions[a] == MILTER_ACTION_REJECT ? VERDICT_REJECT
                                                                          : VERDICT_TEMPFAIL;
            int code = want == VERDICT_CONTINUE ? 0 : want == VERDICT_REJECT ? 550 : 451;
            if (v->kind != want || v->reply.code != code)
                fail_msg("%s/%d: got %s %d, want %s %d", fc->label, (int)actions[a],
                         verdict_kind_name(v->kind), v->reply.code, verdict_kind_name(want), code);
            t_log_has(fc->reason);
            /* sticky (or gone, for accept) for the rest of the session */
            milter_data(T.ms, t_on_verdict, &T.r);
            t_run();
            if (T.r.n != 4 || T.r.v.kind != want)
                fail_msg("%s: after the failure got %s, want %s", fc->label,
                         verdict_kind_name(T.r.v.kind), verdict_kind_name(want));
            milter_session_free(T.ms);
            T.ms = NULL;
            fake_conn_finish_close(T.c[0]);
            T.c[0] = NULL;
            T.r.n = 0;
        }
    }
}

static void
test_milter_connect_failures(void **state)
{
    (void)state;
    /* refused */
    t_start(1);
    fake_conn_complete_connect(T.c[0], -ECONNREFUSED);
    milter_connect(T.ms, t_on_verdict, &T.r);
    t_run();
    t_expect_verdict(VERDICT_TEMPFAIL, 451, "4.7.1", "Mail filter unavailable, try again later",
                     NULL);
    t_log_has("reason=connect to inet:8891@127.0.0.1: ");
    milter_session_free(T.ms);
    T.ms = NULL;
    fake_conn_finish_close(T.c[0]);
    T.c[0] = NULL;
    /* connect timeout while the stage waits */
    T.r.n = 0;
    t_start(1);
    milter_connect(T.ms, t_on_verdict, &T.r);
    fake_conn_fire_timeout(T.c[0]);
    t_expect_calls(1);
    t_expect_verdict(VERDICT_TEMPFAIL, 451, NULL, NULL, NULL);
    t_log_has("reason=connect to inet:8891@127.0.0.1: timed out");
    milter_session_free(T.ms);
    T.ms = NULL;
    fake_conn_finish_close(T.c[0]);
    T.c[0] = NULL;
    /* negotiation: timeout, bad version, actions not offered */
    static const struct {
        uint32_t version, actions;
        const char *reason;
    } neg[] = {
        {0, 0, "reason=timeout during option negotiation"},
        {7, ALL_ACTIONS, "reason=protocol version 7, petrel speaks 2 to 6"},
        {6, 0x400, "reason=actions 0x400 beyond those offered"},
    };
    for (size_t k = 0; k < ARRAY_SIZE(neg); k++) {
        T.r.n = 0;
        t_start(1);
        if (neg[k].version == 0) {
            fake_conn_complete_connect(T.c[0], 0);
            fake_conn_fire_timeout(T.c[0]);
        } else {
            t_negotiate(0, neg[k].version, neg[k].actions, 0);
        }
        milter_connect(T.ms, t_on_verdict, &T.r);
        t_run();
        t_expect_verdict(VERDICT_TEMPFAIL, 451, NULL, NULL, NULL);
        t_log_has(neg[k].reason);
        milter_session_free(T.ms);
        T.ms = NULL;
        fake_conn_finish_close(T.c[0]);
        T.c[0] = NULL;
    }
}

static void
test_milter_second_filter_connects_after_first_fails(void **state)
{
    (void)state;
    T.mc[0].default_action = MILTER_ACTION_ACCEPT;
    t_start(2);
    unsigned before = fake_conn_connects();
    fake_conn_complete_connect(T.c[0], -ECONNREFUSED);
    assert_int_equal(fake_conn_connects(), before + 1);
    T.c[1] = fake_conn_last();
    fake_conn_set_hold(T.c[1], true);
    t_negotiate(1, 6, ALL_ACTIONS, 0);
    milter_connect(T.ms, t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    w_connect(&want);
    t_expect(T.c[1], &want, "connect goes to f2");
    buf_reset(&want);
    T_REPLY(T.c[1], 'r');
    t_expect_verdict(VERDICT_REJECT, 550, "5.7.1", "Command rejected", NULL);
}

static void
test_milter_progress_rearms_and_eom_timeout(void **state)
{
    (void)state;
    t_connected(0);
    t_envelope();
    t_data_eom_start(t_msg, sizeof(t_msg) - 1);
    t_eom_transcript(T.c[0]);
    assert_int_equal(fake_conn_timeout(T.c[0]), T_EOM_MS);
    T_REPLY(T.c[0], 'p');
    T_REPLY(T.c[0], 'p');
    t_expect_calls(0);
    assert_int_equal(fake_conn_timeout(T.c[0]), T_EOM_MS);
    fake_conn_fire_timeout(T.c[0]);
    t_expect_calls(1);
    t_expect_verdict(VERDICT_TEMPFAIL, 451, "4.7.1", NULL, NULL);
    t_log_has("reason=timeout waiting for the reply to 'E'");
}

/* ---- lifecycle ----------------------------------------------------------- */

static void
test_milter_free_while_pending_never_calls_back(void **state)
{
    (void)state;
    t_connected(0);
    milter_helo(T.ms, "h", t_on_verdict, &T.r);
    assert_true(milter_pending(T.ms));
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    milter_session_free(T.ms);
    T.ms = NULL;
    struct buf want;
    buf_init(&want);
    W_LIT(&want, 'Q', "");
    t_expect_closed_with(T.c[0], &want, "quit");
    buf_reset(&want);
    T_REPLY(T.c[0], 'c'); /* ignored: the conn is closing */
    t_run();
    t_expect_calls(1);
}

static void
test_milter_free_from_inside_callback(void **state)
{
    (void)state;
    t_connected(0);
    T.r.free_in_cb = true;
    milter_helo(T.ms, "h", t_on_verdict, &T.r);
    fake_conn_drain(T.c[0]);
    free(fake_conn_take_output(T.c[0]));
    struct buf b;
    buf_init(&b);
    w_pkt(&b, 'c', NULL, 0);
    w_pkt(&b, 'c', NULL, 0); /* a stray packet after the reply: never read */
    t_push(T.c[0], &b);
    buf_reset(&b);
    t_expect_calls(2);
    assert_null(T.ms);
    assert_true(fake_conn_closing(T.c[0]));
}

static void
test_milter_deferred_result_when_no_filter_needed(void **state)
{
    (void)state;
    T.mc[0].default_action = MILTER_ACTION_ACCEPT;
    t_start(1);
    fake_conn_complete_connect(T.c[0], -ECONNREFUSED);
    milter_connect(T.ms, t_on_verdict, &T.r);
    t_expect_calls(0);
    t_run();
    t_expect_calls(1);
    t_expect_verdict(VERDICT_CONTINUE, 0, NULL, NULL, NULL);
    /* set_macro after the fact, then free from the timer's callback */
    milter_set_macro(T.ms, "{auth_type}", "PLAIN");
    milter_set_macro(T.ms, "auth_type", NULL);
    T.r.free_in_cb = true;
    milter_helo(T.ms, "h", t_on_verdict, &T.r);
    t_run();
    t_expect_calls(2);
    assert_null(T.ms);
}

static void
test_milter_caller_macros_are_sent(void **state)
{
    (void)state;
    t_connected(0);
    milter_set_macro(T.ms, "i", "QID7");
    milter_set_macro(T.ms, "{auth_type}", "PLAIN");
    milter_set_macro(T.ms, "auth_authen", "alice");
    milter_mail(T.ms, "a@x.org", NULL, t_on_verdict, &T.r);
    struct buf want;
    buf_init(&want);
    w_macros(&want, 'M', "i", "QID7", "{auth_type}", "PLAIN", "{auth_authen}", "alice",
             "{mail_addr}", "a@x.org", "{mail_host}", "x.org", "{mail_mailer}", "smtp", NULL);
    W_LIT(&want, 'M', S("<a@x.org>"));
    t_expect(T.c[0], &want, "mail with caller macros");
    buf_reset(&want);
    T_REPLY(T.c[0], 'c');
    t_expect_calls(2);
}

/* ---- pure parts ---------------------------------------------------------- */

static void
test_milter_frame_parse(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        size_t len;
        enum milter_frame want;
        char cmd;
        size_t payload;
        size_t consumed;
    } cases[] = {
        {"", 0, MILTER_FRAME_PARTIAL, 0, 0, 0},
        {"\0\0\0", 3, MILTER_FRAME_PARTIAL, 0, 0, 0},
        {"\0\0\0\0", 4, MILTER_FRAME_EMPTY, 0, 0, 0},
        {"\0\0\0\1", 4, MILTER_FRAME_PARTIAL, 0, 0, 0},
        {"\0\0\0\1c", 5, MILTER_FRAME_OK, 'c', 0, 5},
        {"\0\0\0\3hab\0\0\0\1c", 12, MILTER_FRAME_OK, 'h', 2, 7},
        {"\0\x10\0\1", 4, MILTER_FRAME_TOOBIG, 0, 0, 0},
        {"\xff\xff\xff\xff", 4, MILTER_FRAME_TOOBIG, 0, 0, 0},
    };
    for (size_t k = 0; k < ARRAY_SIZE(cases); k++) {
        char cmd = 0;
        struct span p = {NULL, 0};
        size_t used = 0;
        enum milter_frame got = milter_frame_parse((struct span){cases[k].in, cases[k].len},
                                                   MILTER_PACKET_MAX, &cmd, &p, &used);
        if (got != cases[k].want)
            fail_msg("case %zu: got %d, want %d", k, (int)got, (int)cases[k].want);
        if (got == MILTER_FRAME_OK &&
            (cmd != cases[k].cmd || p.len != cases[k].payload || used != cases[k].consumed))
            fail_msg("case %zu: got '%c' %zu %zu, want '%c' %zu %zu", k, cmd, p.len, used,
                     cases[k].cmd, cases[k].payload, cases[k].consumed);
    }
}

static void
test_milter_reply_decode(void **state)
{
    (void)state;
    static const struct {
        char cmd;
        const char *in;
        size_t len;
        const char *err; /* substring, or NULL = ok */
        uint32_t index;
        const char *name;
        const char *value;
    } cases[] = {
#define D(cmd, lit, err, idx, name, value) {cmd, lit, sizeof(lit) - 1, err, idx, name, value}
        D('c', "", NULL, 0, "", NULL),
        D('c', "x", "unexpected data", 0, NULL, NULL),
        D('h', S("A") S("b"), NULL, 0, "A", "b"),
        D('h', S("A") "b", "terminator", 0, NULL, NULL),
        D('h', S("A") S("b") "x", "unexpected data", 0, NULL, NULL),
        D('i', "\0\0\0\5" S("A") S("b"), NULL, 5, "A", "b"),
        D('i', "\0\0\5", "too short", 0, NULL, NULL),
        D('m', "\0\0\0\2" S("A") S(""), NULL, 2, "A", ""),
        D('e', S("<a@b>"), NULL, 0, "<a@b>", NULL),
        D('e', S("<a@b>") S("SIZE=1"), NULL, 0, "<a@b>", "SIZE=1"),
        D('2', S("a@b") "x", "terminator", 0, NULL, NULL),
        D('+', S("a@b"), NULL, 0, "a@b", NULL),
        D('-', "", "terminator", 0, NULL, NULL),
        D('q', S("why"), NULL, 0, "why", NULL),
        D('y', "550 x", NULL, 0, "", NULL),
        D('b', "any\0bytes", NULL, 0, "", NULL),
        D('l', "", "unknown reply", 0, NULL, NULL),
#undef D
    };
    for (size_t k = 0; k < ARRAY_SIZE(cases); k++) {
        struct milter_reply r;
        const char *err =
            milter_reply_decode(cases[k].cmd, (struct span){cases[k].in, cases[k].len}, &r);
        if ((err == NULL) != (cases[k].err == NULL) ||
            (err != NULL && strstr(err, cases[k].err) == NULL))
            fail_msg("case %zu ('%c'): got \"%s\", want \"%s\"", k, cases[k].cmd, err ? err : "ok",
                     cases[k].err ? cases[k].err : "ok");
        if (err != NULL)
            continue;
        assert_int_equal(r.index, cases[k].index);
        if (r.name.len != strlen(cases[k].name) ||
            (r.name.len > 0 && memcmp(r.name.p, cases[k].name, r.name.len) != 0))
            fail_msg("case %zu: name mismatch", k);
        if ((cases[k].value != NULL) != r.has_value ||
            (cases[k].value && (r.value.len != strlen(cases[k].value) ||
                                memcmp(r.value.p, cases[k].value, r.value.len))))
            fail_msg("case %zu: value mismatch", k);
    }
}

static void
test_milter_optneg_decode(void **state)
{
    (void)state;
    struct milter_optneg o;
    assert_non_null(milter_optneg_decode((struct span){"\0\0\0\6\0\0", 6}, &o));
    static const char ok[] = "\0\0\0\6\0\0\1\xff\0\0\0\x80"
                             "\0\0\0\2" S("{mail_addr}") "\0\0\0\x20" S("x");
    assert_null(milter_optneg_decode((struct span){ok, sizeof(ok) - 1}, &o));
    assert_int_equal(o.version, 6);
    assert_int_equal(o.actions, 0x1ff);
    assert_int_equal(o.pflags, 0x80);
    assert_true(o.has_list[2]);
    assert_int_equal(o.lists[2].len, strlen("{mail_addr}"));
    static const char bad1[] = "\0\0\0\6\0\0\1\xff\0\0\0\x80\0\0\0";
    assert_non_null(milter_optneg_decode((struct span){bad1, sizeof(bad1) - 1}, &o));
    static const char bad2[] = "\0\0\0\6\0\0\1\xff\0\0\0\x80\0\0\0\2abc";
    assert_non_null(milter_optneg_decode((struct span){bad2, sizeof(bad2) - 1}, &o));
}

struct apply_case {
    const char *label;
    const char *in;
    struct milter_mod mods[4];
    size_t nmods;
    const char *want;
};

#define MOD(kind, index, name, value)                                                              \
    {                                                                                              \
        kind, "f", index, (char *)(name), (char *)(value), sizeof(value) - 1, NULL                 \
    }

static void
test_milter_apply_mods(void **state)
{
    (void)state;
    static const struct apply_case cases[] = {
        {"no mods keeps bytes",
         "A: 1\r\nB: 2\r\n\r\nbody\r\n",
         {{0}},
         0,
         "A: 1\r\nB: 2\r\n\r\nbody\r\n"},
        {"add appends",
         "A: 1\r\n\r\nb\r\n",
         {MOD(MILTER_MOD_ADD_HEADER, 0, "X", " y")},
         1,
         "A: 1\r\nX: y\r\n\r\nb\r\n"},
        {"insert at 0",
         "A: 1\r\n\r\nb\r\n",
         {MOD(MILTER_MOD_INSERT_HEADER, 0, "X", " y")},
         1,
         "X: y\r\nA: 1\r\n\r\nb\r\n"},
        {"insert past the end appends",
         "A: 1\r\n\r\nb\r\n",
         {MOD(MILTER_MOD_INSERT_HEADER, 9, "X", " y")},
         1,
         "A: 1\r\nX: y\r\n\r\nb\r\n"},
        {"change second occurrence, folded original",
         "R: 1\r\nR: 2\r\n\tmore\r\nZ: z\r\n\r\n",
         {MOD(MILTER_MOD_CHANGE_HEADER, 2, "r", " new")},
         1,
         "R: 1\r\nr: new\r\nZ: z\r\n\r\n"},
        {"change missing occurrence appends",
         "R: 1\r\n\r\nb",
         {MOD(MILTER_MOD_CHANGE_HEADER, 3, "R", " 3")},
         1,
         "R: 1\r\nR: 3\r\n\r\nb"},
        {"delete",
         "A: 1\r\nB: 2\r\nA: 3\r\n\r\nb\r\n",
         {MOD(MILTER_MOD_DELETE_HEADER, 2, "a", "")},
         1,
         "A: 1\r\nB: 2\r\n\r\nb\r\n"},
        {"delete missing is a no-op",
         "A: 1\r\n\r\n",
         {MOD(MILTER_MOD_DELETE_HEADER, 1, "Q", "")},
         1,
         "A: 1\r\n\r\n"},
        {"sequential indexes",
         "A: 1\r\nA: 2\r\n\r\n",
         {MOD(MILTER_MOD_DELETE_HEADER, 1, "A", ""), MOD(MILTER_MOD_CHANGE_HEADER, 1, "A", " x")},
         2,
         "A: x\r\n\r\n"},
        {"replace body",
         "A: 1\r\n\r\nold\r\n",
         {MOD(MILTER_MOD_REPLACE_BODY, 0, NULL, "new\r\n")},
         1,
         "A: 1\r\n\r\nnew\r\n"},
        {"body starts at a non-header line",
         "A: 1\r\nnot a header\r\n",
         {MOD(MILTER_MOD_ADD_HEADER, 0, "X", " y")},
         1,
         "A: 1\r\nX: y\r\nnot a header\r\n"},
        {"last header without CRLF",
         "A: 1",
         {MOD(MILTER_MOD_ADD_HEADER, 0, "X", " y")},
         1,
         "A: 1\r\nX: y\r\n"},
        {"envelope mods ignored",
         "A: 1\r\n\r\n",
         {MOD(MILTER_MOD_ADD_RCPT, 0, NULL, "x@y"), MOD(MILTER_MOD_QUARANTINE, 0, NULL, "q")},
         2,
         "A: 1\r\n\r\n"},
        {"empty message gets a header",
         "",
         {MOD(MILTER_MOD_ADD_HEADER, 0, "X", " y")},
         1,
         "X: y\r\n"},
    };
    for (size_t k = 0; k < ARRAY_SIZE(cases); k++) {
        struct milter_mods m = {(struct milter_mod *)cases[k].mods, cases[k].nmods, 0, false, NULL};
        struct buf out;
        buf_init(&out);
        milter_apply_mods(&m, (struct span){cases[k].in, strlen(cases[k].in)}, &out);
        if (out.len != strlen(cases[k].want) || memcmp(buf_ptr(&out), cases[k].want, out.len))
            fail_msg("%s: got \"%s\", want \"%s\"", cases[k].label, t_vis(buf_ptr(&out), out.len),
                     t_vis(cases[k].want, strlen(cases[k].want)));
        buf_reset(&out);
    }
}

static void
test_verdict_set_raw(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        const char *err; /* NULL: valid */
        enum verdict_kind kind;
        int code;
        const char *esc;
        const char *text;
        const char *raw;
    } cases[] = {
        {"550 5.7.1 no", NULL, VERDICT_REJECT, 550, "5.7.1", "no", "550 5.7.1 no"},
        {"450 busy\r\n", NULL, VERDICT_TEMPFAIL, 450, "4.7.1", "busy", "450 busy"},
        {"550-5.1.1 a\r\n550 5.1.1 b", NULL, VERDICT_REJECT, 550, "5.1.1", "a",
         "550-5.1.1 a\r\n550 5.1.1 b"},
        {"550 5.7.1 50%% off %s", NULL, VERDICT_REJECT, 550, "5.7.1", "50% off s",
         "550 5.7.1 50% off s"},
        {"", "empty", 0, 0, NULL, NULL, NULL},
        {"250 ok", "not 4xx or 5xx", 0, 0, NULL, NULL, NULL},
        {"550", "too short", 0, 0, NULL, NULL, NULL},
        {"550-x", "must be \"ddd text\"", 0, 0, NULL, NULL, NULL},
        {"550 a\r\n550 b", "must be \"ddd-text\"", 0, 0, NULL, NULL, NULL},
        {"550-a\n550 b", "CRLF", 0, 0, NULL, NULL, NULL},
        {"550-a\r\n450 b", "different codes", 0, 0, NULL, NULL, NULL},
        {"550 4.7.1 x", "enhanced", 0, 0, NULL, NULL, NULL},
        {"550 5.7 x", "enhanced", 0, 0, NULL, NULL, NULL},
        {"550 a\x1b[31m", "control", 0, 0, NULL, NULL, NULL},
        {"5x0 a", "not 4xx or 5xx", 0, 0, NULL, NULL, NULL},
    };
    for (size_t k = 0; k < ARRAY_SIZE(cases); k++) {
        struct verdict v = VERDICT_INIT;
        const char *err = verdict_set_raw(&v, cases[k].in, strlen(cases[k].in));
        if ((err == NULL) != (cases[k].err == NULL) ||
            (err != NULL && strstr(err, cases[k].err) == NULL))
            fail_msg("\"%s\": got \"%s\", want \"%s\"", cases[k].in, err ? err : "ok",
                     cases[k].err ? cases[k].err : "ok");
        if (err == NULL) {
            if (v.kind != cases[k].kind || v.reply.code != cases[k].code ||
                strcmp(v.reply.esc, cases[k].esc) || strcmp(v.reply.text, cases[k].text) ||
                strcmp(v.raw, cases[k].raw))
                fail_msg("\"%s\": got %s %d %s \"%s\" raw \"%s\"", cases[k].in,
                         verdict_kind_name(v.kind), v.reply.code, v.reply.esc, v.reply.text, v.raw);
            assert_null(verdict_check(&v));
            struct verdict copy = VERDICT_INIT;
            verdict_copy(&copy, &v);
            assert_string_equal(copy.raw, v.raw);
            assert_ptr_not_equal(copy.raw, v.raw);
            verdict_clear(&copy);
        } else {
            assert_int_equal(v.kind, VERDICT_CONTINUE); /* unchanged */
        }
        verdict_clear(&v);
    }
    /* a NUL inside, and one at the end (libmilter's terminator) */
    struct verdict v = VERDICT_INIT;
    assert_non_null(verdict_set_raw(&v, "550 a\0b", 7));
    assert_null(verdict_set_raw(&v, "550 5.7.1 a\0", 12));
    assert_string_equal(v.raw, "550 5.7.1 a");
    verdict_clear(&v);
}

static void
test_verdict_check_and_format(void **state)
{
    (void)state;
    static const struct reply r550 = {550, "5.7.1", "no"};
    static const struct reply r250 = {250, "2.0.0", "ok"};
    static const struct reply r451bad = {451, "5.7.1", "x"};
    struct verdict v = VERDICT_INIT;
    verdict_set(&v, VERDICT_REJECT, &r550);
    assert_null(verdict_check(&v));
    char out[100];
    verdict_format(&v, out, sizeof(out));
    assert_string_equal(out, "550 5.7.1 no");
    verdict_set(&v, VERDICT_TEMPFAIL, &r550);
    assert_string_equal(verdict_check(&v), "tempfail needs a 4xx reply");
    verdict_set(&v, VERDICT_REJECT, &r250);
    assert_string_equal(verdict_check(&v), "reject needs a 5xx reply");
    verdict_set(&v, VERDICT_TEMPFAIL, &r451bad);
    assert_non_null(verdict_check(&v));
    verdict_set(&v, VERDICT_ACCEPT, &r250);
    assert_null(verdict_check(&v));
    verdict_set(&v, VERDICT_DISCARD, &r550);
    assert_non_null(verdict_check(&v));
    verdict_setf(&v, VERDICT_QUARANTINE, 0, "", "held by %s\r\nx", "f1");
    assert_null(verdict_check(&v));
    verdict_format(&v, out, sizeof(out));
    assert_string_equal(out, "quarantine (held by f1  x)");
    verdict_setf(&v, VERDICT_TEMPFAIL, 451, "4.3.0", "%s", "lua failed");
    assert_null(verdict_check(&v));
    struct verdict w = VERDICT_INIT;
    verdict_move(&w, &v);
    assert_int_equal(v.kind, VERDICT_CONTINUE);
    assert_string_equal(w.reply.text, "lua failed");
    assert_null(verdict_set_raw(&w, "550-5.7.1 a\r\n550 5.7.1 b", 25));
    verdict_format(&w, out, sizeof(out));
    assert_string_equal(out, "550-5.7.1 a; 550 5.7.1 b");
    verdict_clear(&w);
    verdict_clear(&v);
    assert_string_equal(verdict_kind_name(VERDICT_QUARANTINE), "quarantine");
}

int
main(void)
{
    log_init(LOG_DEBUG, LOG_FORMAT_TEXT);
    const struct CMUnitTest tests[] = {
#define T_TEST(f) cmocka_unit_test_setup_teardown(f, t_setup, t_teardown)
        T_TEST(test_milter_full_session_transcript),
        T_TEST(test_milter_ipv6_unix_and_unknown_client_connect_packets),
        T_TEST(test_milter_socket_specs),
        T_TEST(test_milter_hostname_socket_fails_with_default_action),
        T_TEST(test_milter_listener_selects_filters),
        T_TEST(test_milter_every_reply_at_rcpt),
        T_TEST(test_milter_reject_at_connect_is_sticky_and_closes),
        T_TEST(test_milter_accept_at_connect_ends_filter_for_session),
        T_TEST(test_milter_discard_at_helo_is_ignored),
        T_TEST(test_milter_accept_at_mail_skips_filter_for_message),
        T_TEST(test_milter_discard_at_rcpt_covers_the_transaction),
        T_TEST(test_milter_mail_after_unfinished_transaction_sends_abort_first),
        T_TEST(test_milter_no_reply_flags_pipeline),
        T_TEST(test_milter_no_send_flags_keep_macros),
        T_TEST(test_milter_skip_stops_same_kind_until_another),
        T_TEST(test_milter_body_split_in_65535_byte_chunks),
        T_TEST(test_milter_setsymlist_and_leadspc),
        T_TEST(test_milter_every_modification_at_eom),
        T_TEST(test_milter_modification_not_negotiated_fails_filter),
        T_TEST(test_milter_accept_default_action_drops_partial_mods),
        T_TEST(test_milter_two_filters_in_order_second_sees_first_mods),
        T_TEST(test_milter_first_filter_reject_hides_stage_from_second),
        T_TEST(test_milter_stage_waits_for_negotiation),
        T_TEST(test_milter_failures_give_default_action),
        T_TEST(test_milter_connect_failures),
        T_TEST(test_milter_second_filter_connects_after_first_fails),
        T_TEST(test_milter_progress_rearms_and_eom_timeout),
        T_TEST(test_milter_free_while_pending_never_calls_back),
        T_TEST(test_milter_free_from_inside_callback),
        T_TEST(test_milter_deferred_result_when_no_filter_needed),
        T_TEST(test_milter_caller_macros_are_sent),
        cmocka_unit_test(test_milter_frame_parse),
        cmocka_unit_test(test_milter_reply_decode),
        cmocka_unit_test(test_milter_optneg_decode),
        cmocka_unit_test(test_milter_apply_mods),
        cmocka_unit_test(test_verdict_set_raw),
        cmocka_unit_test(test_verdict_check_and_format),
#undef T_TEST
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
