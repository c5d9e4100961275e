/*
 * test_lua_bridge — the Lua policy engine on a real uv loop, with
 * fixture scripts under tests/unit/lua/ and the shipped examples: load
 * errors, each verdict and invalid ones, runtime errors and timeouts
 * (on_error), petrel.sleep and concurrency, petrel.dns through fake_dns,
 * cancel, require, the retry/bounce/route/select_source/data/auth hooks,
 * reload, and expired views. Log lines are captured in a memfd.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <sys/mman.h>
#include <unistd.h>
#include <uv.h>

#include "config.h"
#include "dns.h"
#include "fakes/fake_dns.h"
#include "log.h"
#include "lua_bridge.h"
#include "util.h"
#include "verdict.h"

#define FIXTURE(name) PETREL_SOURCE_DIR "/tests/unit/lua/" name
#define EXAMPLE(name) PETREL_SOURCE_DIR "/examples/" name

struct rec {
    int n;
    int order; /* value of the global counter when it fired */
    enum plua_status status;
    struct verdict v;
    char *error;
    char *route, *src_ip, *src_host, *subject, *text;
    bool allow, retry_set, bounce;
    uint64_t retry_seconds;
    char headers[512]; /* "name: value|" per added header */
};

struct t_env {
    uv_loop_t loop;
    struct petrel_config cfg;
    struct dns *dns;
    struct plua *p;
    int logfd;
};

static int fired;

static void
rec_cb(struct plua_call *c, struct plua_result *r, void *arg)
{
    struct rec *x = arg;
    (void)c;
    x->n++;
    x->order = ++fired;
    x->status = r->status;
    verdict_move(&x->v, &r->verdict);
    x->error = r->error;
    r->error = NULL;
    x->route = r->route;
    r->route = NULL;
    x->src_ip = r->source_ip;
    r->source_ip = NULL;
    x->src_host = r->source_hostname;
    r->source_hostname = NULL;
    x->subject = r->subject;
    r->subject = NULL;
    x->text = r->text;
    r->text = NULL;
    x->allow = r->allow;
    x->retry_set = r->retry_set;
    x->bounce = r->bounce;
    x->retry_seconds = r->retry_seconds;
    x->headers[0] = '\0';
    for (size_t i = 0; i < r->nadd_headers; i++) {
        size_t used = strlen(x->headers);
        snprintf(x->headers + used, sizeof(x->headers) - used, "%s: %s|", r->add_headers[i].name,
                 r->add_headers[i].value);
    }
}

static void
rec_init(struct rec *x)
{
    memset(x, 0, sizeof(*x));
    verdict_init(&x->v);
}

static void
rec_free(struct rec *x)
{
    verdict_clear(&x->v);
    free(x->error);
    free(x->route);
    free(x->src_ip);
    free(x->src_host);
    free(x->subject);
    free(x->text);
    rec_init(x);
}

static char *
env_log(struct t_env *e)
{
    static char text[16384];
    ssize_t n = pread(e->logfd, text, sizeof(text) - 1, 0);
    text[n > 0 ? n : 0] = '\0';
    return text;
}

static void
env_init(struct t_env *e, const char *script, uint64_t timeout_ms, int on_error)
{
    memset(e, 0, sizeof(*e));
    assert_int_equal(uv_loop_init(&e->loop), 0);
    e->cfg.lua.script = script != NULL ? xstrdup(script) : NULL;
    e->cfg.lua.timeout_ms = timeout_ms;
    e->cfg.lua.on_error = on_error;
    char *err = NULL;
    assert_int_equal(dns_open(&e->loop, &e->cfg, &e->dns, &err), 0);
    e->logfd = memfd_create("log", 0);
    assert_true(e->logfd >= 0);
    log_init(LOG_INFO, LOG_FORMAT_TEXT);
    log_set_fd(e->logfd);
    fake_dns_reset();
    fired = 0;
}

static void
env_open(struct t_env *e, const char *script, uint64_t timeout_ms, int on_error)
{
    env_init(e, script, timeout_ms, on_error);
    char *err = NULL;
    e->p = plua_open(&e->loop, &e->cfg, e->dns, &err);
    if (e->p == NULL)
        fail_msg("plua_open(%s): %s", script, err);
}

static void
env_done(struct t_env *e)
{
    plua_close(e->p);
    dns_close(e->dns);
    uv_run(&e->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&e->loop), 0);
    free(e->cfg.lua.script);
    log_set_fd(2);
    close(e->logfd);
    fake_dns_reset();
}

/* Runs one call to completion on the loop. */
static void
run_call(struct t_env *e, const char *hook, const struct plua_args *a, struct rec *x)
{
    rec_init(x);
    plua_call(e->p, hook, a, rec_cb, x);
    assert_int_equal(x->n, 0); /* never synchronous */
    uv_run(&e->loop, UV_RUN_DEFAULT);
    assert_int_equal(x->n, 1);
}

static void
helo(struct t_env *e, const char *name, struct rec *x)
{
    struct plua_args a = {.ip = "192.0.2.9",
                          .port = 4242,
                          .local_ip = "198.51.100.1",
                          .listener = "mx",
                          .helo = name};
    run_call(e, "helo", &a, x);
}

static void
test_load_errors(void **state)
{
    (void)state;
    static const struct {
        const char *script;
        const char *want; /* substring of err */
    } cases[] = {
        {FIXTURE("syntax_error.lua"), "syntax_error.lua:4:"},
        {FIXTURE("load_error.lua"), "load_error.lua:2: broken at load time"},
        {FIXTURE("bad_hook.lua"), "bad_hook.lua:2: petrel.on: unknown hook 'conect'"},
        {FIXTURE("no_such_file.lua"), "no_such_file.lua"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct t_env e;
        env_init(&e, cases[i].script, 1000, MILTER_ACTION_TEMPFAIL);
        char *err = NULL;
        e.p = plua_open(&e.loop, &e.cfg, e.dns, &err);
        assert_null(e.p);
        if (err == NULL || strstr(err, cases[i].want) == NULL)
            fail_msg("case %zu: got err %s, want it to contain %s", i, err ? err : "(null)",
                     cases[i].want);
        free(err);
        env_done(&e);
    }
}

static void
test_verdicts(void **state)
{
    (void)state;
    static const struct {
        const char *helo;
        enum plua_status status;
        enum verdict_kind kind;
        int code;
        const char *esc;
        const char *text; /* substring; NULL: not checked */
    } cases[] = {
        {"accept", PLUA_OK, VERDICT_ACCEPT, 0, NULL, NULL},
        {"reject", PLUA_OK, VERDICT_REJECT, 550, "5.7.1", "go away"},
        {"tempfail", PLUA_OK, VERDICT_TEMPFAIL, 451, "4.7.1", "try later"},
        {"noesc", PLUA_OK, VERDICT_REJECT, 554, "5.7.1", "no enhanced code"},
        {"continue", PLUA_OK, VERDICT_CONTINUE, 0, NULL, NULL},
        {"conn", PLUA_OK, VERDICT_REJECT, 550, "5.7.1", "192.0.2.9:4242 198.51.100.1 mx"},
        {"reject2xx", PLUA_ERROR, VERDICT_TEMPFAIL, 451, "4.3.0", NULL},
        {"mismatch", PLUA_ERROR, VERDICT_TEMPFAIL, 451, "4.3.0", NULL},
        {"badesc", PLUA_ERROR, VERDICT_TEMPFAIL, 451, "4.3.0", NULL},
        {"badret", PLUA_ERROR, VERDICT_TEMPFAIL, 451, "4.3.0", NULL},
        {"write", PLUA_ERROR, VERDICT_TEMPFAIL, 451, "4.3.0", NULL},
    };
    struct t_env e;
    env_open(&e, FIXTURE("verdicts.lua"), 1000, MILTER_ACTION_TEMPFAIL);
    assert_true(plua_has_hook(e.p, "helo"));
    assert_false(plua_has_hook(e.p, "rcpt_to"));
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct rec x;
        helo(&e, cases[i].helo, &x);
        if (x.status != cases[i].status || x.v.kind != cases[i].kind)
            fail_msg("%s: got status %d kind %s (%s), want status %d kind %s", cases[i].helo,
                     x.status, verdict_kind_name(x.v.kind), x.error ? x.error : "", cases[i].status,
                     verdict_kind_name(cases[i].kind));
        if (cases[i].code != 0 &&
            (x.v.reply.code != cases[i].code || strcmp(x.v.reply.esc, cases[i].esc) != 0))
            fail_msg("%s: got %d %s, want %d %s", cases[i].helo, x.v.reply.code, x.v.reply.esc,
                     cases[i].code, cases[i].esc);
        if (cases[i].text != NULL && strstr(x.v.reply.text, cases[i].text) == NULL)
            fail_msg("%s: got text %s, want %s", cases[i].helo, x.v.reply.text, cases[i].text);
        if (cases[i].status == PLUA_ERROR &&
            (x.error == NULL || strstr(x.error, "verdicts.lua:") == NULL))
            fail_msg("%s: got error %s, want verdicts.lua:line", cases[i].helo, x.error);
        assert_null(verdict_check(&x.v));
        rec_free(&x);
    }
    env_done(&e);
}

static void
test_on_error_kinds(void **state)
{
    (void)state;
    static const struct {
        int on_error;
        enum verdict_kind kind;
        int code;
    } cases[] = {
        {MILTER_ACTION_TEMPFAIL, VERDICT_TEMPFAIL, 451},
        {MILTER_ACTION_REJECT, VERDICT_REJECT, 550},
        {MILTER_ACTION_ACCEPT, VERDICT_CONTINUE, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct t_env e;
        env_open(&e, FIXTURE("verdicts.lua"), 1000, cases[i].on_error);
        struct rec x;
        helo(&e, "error", &x);
        assert_int_equal(x.status, PLUA_ERROR);
        if (x.v.kind != cases[i].kind || x.v.reply.code != cases[i].code)
            fail_msg("on_error %d: got %s %d, want %s %d", cases[i].on_error,
                     verdict_kind_name(x.v.kind), x.v.reply.code, verdict_kind_name(cases[i].kind),
                     cases[i].code);
        if (x.error == NULL || strstr(x.error, "verdicts.lua:23: deliberate failure") == NULL)
            fail_msg("got error %s, want verdicts.lua:23: deliberate failure", x.error);
        const char *log = env_log(&e);
        if (strstr(log, "verdicts.lua:23: deliberate failure") == NULL ||
            strstr(log, "stack traceback") == NULL)
            fail_msg("got log %s, want the error with file:line and a traceback", log);
        assert_null(strchr(log, '\n') == log + strlen(log) - 1 ? NULL : "multi-line log");
        rec_free(&x);
        env_done(&e);
    }
}

static void
test_timeout(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("verdicts.lua"), 100, MILTER_ACTION_TEMPFAIL);
    int64_t t0 = now_ms();
    struct rec x;
    helo(&e, "loop", &x);
    int64_t took = now_ms() - t0;
    assert_int_equal(x.status, PLUA_ERROR);
    assert_int_equal(x.v.kind, VERDICT_TEMPFAIL);
    if (x.error == NULL || strstr(x.error, "exceeded lua.timeout") == NULL)
        fail_msg("got error %s, want exceeded lua.timeout", x.error);
    if (took > 1000)
        fail_msg("got %lld ms, want about 100", (long long)took);
    rec_free(&x);
    /* pcall cannot swallow the timeout */
    t0 = now_ms();
    helo(&e, "pcall loop", &x);
    took = now_ms() - t0;
    assert_int_equal(x.status, PLUA_ERROR);
    if (took > 1000)
        fail_msg("pcall loop: got %lld ms, want about 100", (long long)took);
    rec_free(&x);
    /* The state still works afterwards. */
    helo(&e, "reject", &x);
    assert_int_equal(x.v.kind, VERDICT_REJECT);
    rec_free(&x);
    env_done(&e);
}

static void
test_sleep_concurrent(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("verdicts.lua"), 1000, MILTER_ACTION_TEMPFAIL);
    struct plua_args a1 = {.helo = "sleep 0.05"}, a2 = {.helo = "reject"};
    struct rec x1, x2;
    rec_init(&x1);
    rec_init(&x2);
    int64_t t0 = now_ms();
    plua_call(e.p, "helo", &a1, rec_cb, &x1);
    plua_call(e.p, "helo", &a2, rec_cb, &x2);
    assert_int_equal(plua_pending(e.p), 2);
    uv_run(&e.loop, UV_RUN_DEFAULT);
    int64_t took = now_ms() - t0;
    assert_int_equal(x1.n, 1);
    assert_int_equal(x2.n, 1);
    if (x2.order != 1 || x1.order != 2)
        fail_msg("got order sleeper %d other %d, want other first", x1.order, x2.order);
    assert_int_equal(x1.status, PLUA_OK);
    assert_string_equal(x1.v.reply.text, "slept 0.05");
    if (took < 45)
        fail_msg("got %lld ms, want >= 50", (long long)took);
    assert_int_equal(plua_pending(e.p), 0);
    rec_free(&x1);
    rec_free(&x2);
    env_done(&e);
}

/* A hook waiting longer than the whole-call deadline fails. */
static void
test_deadline(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("verdicts.lua"), 50, MILTER_ACTION_TEMPFAIL);
    int64_t t0 = now_ms();
    struct rec x;
    helo(&e, "sleep 5", &x);
    int64_t took = now_ms() - t0;
    assert_int_equal(x.status, PLUA_ERROR);
    if (x.error == NULL || strstr(x.error, "deadline") == NULL)
        fail_msg("got error %s, want a deadline error", x.error);
    if (took < PLUA_DEADLINE_MIN_MS - 50 || took > 3000)
        fail_msg("got %lld ms, want about %d", (long long)took, PLUA_DEADLINE_MIN_MS);
    rec_free(&x);
    env_done(&e);
}

static void
test_cancel_sleeping(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("verdicts.lua"), 1000, MILTER_ACTION_TEMPFAIL);
    struct plua_args a = {.helo = "sleep 0.05"};
    struct rec x;
    rec_init(&x);
    struct plua_call *c = plua_call(e.p, "helo", &a, rec_cb, &x);
    uv_run(&e.loop, UV_RUN_NOWAIT); /* starts it: now asleep */
    assert_int_equal(x.n, 0);
    plua_cancel(c);
    assert_int_equal(plua_pending(e.p), 0);
    uv_run(&e.loop, UV_RUN_DEFAULT);
    assert_int_equal(x.n, 0);
    /* cancel before it even started */
    c = plua_call(e.p, "helo", &a, rec_cb, &x);
    plua_cancel(c);
    uv_run(&e.loop, UV_RUN_DEFAULT);
    assert_int_equal(x.n, 0);
    /* close with a sleeping call: no callback */
    plua_call(e.p, "helo", &a, rec_cb, &x);
    uv_run(&e.loop, UV_RUN_NOWAIT);
    env_done(&e);
    assert_int_equal(x.n, 0);
}

static void
test_dns(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("verdicts.lua"), 1000, MILTER_ACTION_TEMPFAIL);
    fake_dns_set("example.test", DNS_OK, "10 mx1.example.test 192.0.2.1 2001:db8::1",
                 "20 mx2.example.test 192.0.2.2", NULL);
    fake_dns_set("host.test", DNS_OK, "0 host.test 192.0.2.7 2001:db8::7", NULL);
    fake_dns_set("gone.test", DNS_NXDOMAIN, NULL);
    static const struct {
        const char *helo;
        enum verdict_kind kind;
        const char *text;
    } cases[] = {
        {"mx example.test", VERDICT_REJECT, "mx1.example.test 192.0.2.1 2"},
        {"a host.test", VERDICT_REJECT, "192.0.2.7,2001:db8::7"},
        {"mx gone.test", VERDICT_TEMPFAIL, "nxdomain"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct plua_args a = {.helo = cases[i].helo};
        struct rec x;
        rec_init(&x);
        plua_call(e.p, "helo", &a, rec_cb, &x);
        uv_run(&e.loop, UV_RUN_DEFAULT); /* runs until the hook waits for DNS */
        assert_int_equal(x.n, 0);
        assert_int_equal(fake_dns_pending(), 1);
        assert_int_equal(fake_dns_run(), 1);
        uv_run(&e.loop, UV_RUN_DEFAULT);
        assert_int_equal(x.n, 1);
        if (x.v.kind != cases[i].kind || strcmp(x.v.reply.text, cases[i].text) != 0)
            fail_msg("%s: got %s '%s' (%s), want %s '%s'", cases[i].helo,
                     verdict_kind_name(x.v.kind), x.v.reply.text, x.error ? x.error : "",
                     verdict_kind_name(cases[i].kind), cases[i].text);
        rec_free(&x);
    }
    /* cancel while the lookup is pending: the query is cancelled too */
    struct plua_args a = {.helo = "mx example.test"};
    struct rec x;
    rec_init(&x);
    struct plua_call *c = plua_call(e.p, "helo", &a, rec_cb, &x);
    uv_run(&e.loop, UV_RUN_DEFAULT);
    assert_int_equal(fake_dns_pending(), 1);
    plua_cancel(c);
    assert_int_equal(fake_dns_cancelled(), 1);
    assert_int_equal(fake_dns_run(), 0);
    assert_int_equal(x.n, 0);
    env_done(&e);
}

static void
test_require(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("require.lua"), 1000, MILTER_ACTION_TEMPFAIL);
    struct rec x;
    run_call(&e, "connect", NULL, &x);
    assert_int_equal(x.status, PLUA_OK);
    assert_string_equal(x.v.reply.text, "hello from helper_mod");
    rec_free(&x);
    /* a hook the script does not define */
    run_call(&e, "helo", NULL, &x);
    assert_int_equal(x.status, PLUA_NO_HOOK);
    assert_int_equal(x.v.kind, VERDICT_CONTINUE);
    rec_free(&x);
    env_done(&e);
}

static void
test_retry_example(void **state)
{
    (void)state;
    static const struct {
        int code;
        const char *esc;
        uint64_t age;
        bool set, bounce;
        uint64_t seconds;
    } cases[] = {
        {451, "4.7.1", 0, true, false, 300},     {421, "4.4.2", 0, true, false, 60},
        {452, "4.2.2", 3600, true, false, 3600}, {452, "4.2.2", 86400, true, true, 0},
        {450, "4.1.1", 0, false, false, 0},      {0, NULL, 0, false, false, 0},
    };
    struct t_env e;
    env_open(&e, EXAMPLE("policy-greylist-retry.lua"), 1000, MILTER_ACTION_TEMPFAIL);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct plua_args a = {.queue_id = "4F1A2B3C",
                              .rcpt = "bob@example.org",
                              .attempt = 2,
                              .reply_code = cases[i].code,
                              .reply_esc = cases[i].esc,
                              .reply_text = "text",
                              .age = cases[i].age};
        struct rec x;
        run_call(&e, "retry", &a, &x);
        if (x.status != PLUA_OK || x.retry_set != cases[i].set || x.bounce != cases[i].bounce ||
            x.retry_seconds != cases[i].seconds)
            fail_msg("case %zu: got status %d set %d bounce %d seconds %llu (%s), want set %d "
                     "bounce %d seconds %llu",
                     i, x.status, x.retry_set, x.bounce, (unsigned long long)x.retry_seconds,
                     x.error ? x.error : "", cases[i].set, cases[i].bounce,
                     (unsigned long long)cases[i].seconds);
        rec_free(&x);
    }
    env_done(&e);
}

static void
test_routing_example(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, EXAMPLE("policy-routing.lua"), 1000, MILTER_ACTION_TEMPFAIL);
    struct plua_args a = {.rcpt = "carol@Partner.Example"};
    struct rec x;
    run_call(&e, "route", &a, &x);
    assert_int_equal(x.status, PLUA_OK);
    assert_string_equal(x.route, "smtp:[relay.partner.example]:587");
    rec_free(&x);
    a.rcpt = "dave@elsewhere.example";
    run_call(&e, "route", &a, &x);
    assert_null(x.route);
    rec_free(&x);
    struct header_field h[] = {{"Subject", "news"}, {"precedence", "Bulk"}};
    struct plua_args s = {.headers = h, .nheaders = 2, .destination = "example.org"};
    run_call(&e, "select_source", &s, &x);
    assert_int_equal(x.status, PLUA_OK);
    assert_string_equal(x.src_ip, "192.0.2.20");
    assert_string_equal(x.src_host, "bulk.mta.example");
    rec_free(&x);
    s.nheaders = 1;
    run_call(&e, "select_source", &s, &x);
    assert_string_equal(x.src_ip, "192.0.2.10");
    rec_free(&x);
    env_done(&e);
}

static void
test_other_hooks(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("hooks.lua"), 1000, MILTER_ACTION_TEMPFAIL);
    struct header_field h[] = {{"From", "a@b"}, {"Subject", "spam"}};
    struct plua_args d = {.from = "a@b", .headers = h, .nheaders = 2, .size = 1234};
    struct rec x;
    run_call(&e, "data", &d, &x);
    assert_int_equal(x.v.kind, VERDICT_REJECT);
    assert_string_equal(x.v.reply.text, "no spam (1234)");
    assert_string_equal(x.headers, "X-Policy: checked a@b|");
    rec_free(&x);
    d.nheaders = 1;
    run_call(&e, "data", &d, &x);
    assert_int_equal(x.v.kind, VERDICT_CONTINUE);
    assert_string_equal(x.headers, "X-Policy: checked a@b|");
    rec_free(&x);

    struct plua_args au = {.user = "alice", .password = "secret"};
    run_call(&e, "auth", &au, &x);
    assert_true(x.allow);
    rec_free(&x);
    au.password = "wrong";
    run_call(&e, "auth", &au, &x);
    assert_false(x.allow);
    assert_int_equal(x.status, PLUA_OK);
    rec_free(&x);

    struct plua_failure f[] = {{"bob@example.org", 550, "5.1.1", "no such user"},
                               {"eve@example.org", 552, "5.2.2", "mailbox full"}};
    struct plua_args b = {.queue_id = "4F1A2B3C", .failures = f, .nfailures = 2};
    run_call(&e, "bounce", &b, &x);
    assert_int_equal(x.status, PLUA_OK);
    assert_string_equal(x.subject, "Undelivered: 4F1A2B3C");
    assert_string_equal(x.text, "bob@example.org: 550 5.1.1 no such user\n"
                                "eve@example.org: 552 5.2.2 mailbox full");
    rec_free(&x);

    struct plua_args ev = {.queue_id = "4F1A2B3C", .event_type = "delivered"};
    run_call(&e, "event", &ev, &x);
    assert_int_equal(x.status, PLUA_OK);
    if (strstr(env_log(&e), "event delivered 4F1A2B3C") == NULL)
        fail_msg("got log %s, want event delivered 4F1A2B3C", env_log(&e));
    rec_free(&x);
    env_done(&e);
}

static void
test_reload(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("verdicts.lua"), 1000, MILTER_ACTION_TEMPFAIL);
    /* a call sleeping on the old state across the reloads */
    struct plua_args a = {.helo = "sleep 0.05"};
    struct rec sl;
    rec_init(&sl);
    plua_call(e.p, "helo", &a, rec_cb, &sl);
    uv_run(&e.loop, UV_RUN_NOWAIT);

    struct petrel_config bad = e.cfg;
    bad.lua.script = (char *)FIXTURE("syntax_error.lua");
    char *err = NULL;
    assert_int_equal(plua_reload(e.p, &bad, &err), -1);
    assert_non_null(strstr(err, "syntax_error.lua:4:"));
    free(err);
    assert_non_null(strstr(env_log(&e), "keeping the old script"));
    struct rec x;
    helo(&e, "reject", &x); /* old script still there (and the sleeper done) */
    assert_string_equal(x.v.reply.text, "go away");
    rec_free(&x);
    assert_int_equal(sl.n, 1);
    rec_free(&sl);

    plua_call(e.p, "helo", &a, rec_cb, &sl);
    uv_run(&e.loop, UV_RUN_NOWAIT);
    struct petrel_config good = e.cfg;
    good.lua.script = (char *)FIXTURE("reload_b.lua");
    err = NULL;
    assert_int_equal(plua_reload(e.p, &good, &err), 0);
    assert_false(plua_has_hook(e.p, "helo"));
    run_call(&e, "connect", NULL, &x);
    assert_string_equal(x.v.reply.text, "new script");
    rec_free(&x);
    uv_run(&e.loop, UV_RUN_DEFAULT);
    assert_int_equal(sl.n, 1); /* finished on the old state */
    assert_string_equal(sl.v.reply.text, "slept 0.05");
    rec_free(&sl);
    env_done(&e);
}

static void
test_expired_view(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("verdicts.lua"), 1000, MILTER_ACTION_TEMPFAIL);
    struct plua_args a = {.ip = "192.0.2.1"};
    struct rec x;
    run_call(&e, "connect", &a, &x);
    assert_int_equal(x.v.kind, VERDICT_CONTINUE);
    rec_free(&x);
    helo(&e, "expired", &x);
    if (x.v.kind != VERDICT_REJECT || strcmp(x.v.reply.text, "expired") != 0)
        fail_msg("got %s '%s', want reject 'expired'", verdict_kind_name(x.v.kind), x.v.reply.text);
    rec_free(&x);
    env_done(&e);
}

static void
test_no_script(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, NULL, 1000, MILTER_ACTION_TEMPFAIL);
    assert_false(plua_has_hook(e.p, "connect"));
    struct rec x;
    run_call(&e, "connect", NULL, &x);
    assert_int_equal(x.status, PLUA_NO_HOOK);
    rec_free(&x);
    env_done(&e);
    /* the shipped default script loads and registers nothing */
    env_open(&e, PETREL_SOURCE_DIR "/scripts/policy.lua", 1000, MILTER_ACTION_TEMPFAIL);
    static const char *const hooks[] = {"connect",       "helo",  "auth",   "mail_from",
                                        "rcpt_to",       "data",  "xbind",  "route",
                                        "select_source", "retry", "bounce", "event"};
    for (size_t i = 0; i < sizeof(hooks) / sizeof(hooks[0]); i++) {
        assert_true(plua_hook_known(hooks[i]));
        assert_false(plua_has_hook(e.p, hooks[i]));
    }
    assert_false(plua_hook_known("conect"));
    env_done(&e);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_load_errors),      cmocka_unit_test(test_verdicts),
        cmocka_unit_test(test_on_error_kinds),   cmocka_unit_test(test_timeout),
        cmocka_unit_test(test_sleep_concurrent), cmocka_unit_test(test_deadline),
        cmocka_unit_test(test_cancel_sleeping),  cmocka_unit_test(test_dns),
        cmocka_unit_test(test_require),          cmocka_unit_test(test_retry_example),
        cmocka_unit_test(test_routing_example),  cmocka_unit_test(test_other_hooks),
        cmocka_unit_test(test_reload),           cmocka_unit_test(test_expired_view),
        cmocka_unit_test(test_no_script),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
