/*
 * test_plugin — the C plugin loader and host API on a real uv loop, with
 * the test plugins of tests/plugins/ (good.c is driven by its config; the
 * others are broken on purpose) and the shipped plugins (ratelimit,
 * header_stamp, the hello example): load errors naming the file, every
 * accessor, handler order and first-verdict-wins, add_header, pending
 * handlers completed by a uv timer, cancellation and shutdown while a
 * handler is pending, invalid answers (on_error), the delivery hooks.
 * Log lines are captured in a memfd.
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

#include <petrel/plugin.h>

#include "config.h"
#include "log.h"
#include "lua_bridge.h"
#include "plugin.h"
#include "util.h"
#include "verdict.h"

#define TPLUG(name) TEST_PLUGIN_DIR "/" name ".so"
#define SHIPPED(name) PETREL_PLUGIN_DIR "/" name ".so"

struct rec {
    int n;
    enum plua_status status;
    struct verdict v;
    char *error;
    char *route, *src_ip, *src_host, *subject, *text;
    bool allow, retry_set, bounce;
    uint64_t retry_seconds;
    char headers[4096]; /* "name: value|" per added header */
};

struct t_env {
    uv_loop_t loop;
    struct petrel_config cfg;
    struct plugins *ps;
    int logfd;
};

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

static void
rec_cb(struct plugin_call *c, struct plua_result *r, void *arg)
{
    struct rec *x = arg;
    plugin_call_cancel(c); /* a no-op inside the callback */
    x->n++;
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
env_init(struct t_env *e, int on_error)
{
    memset(e, 0, sizeof(*e));
    assert_int_equal(uv_loop_init(&e->loop), 0);
    e->cfg.lua.on_error = on_error;
    e->logfd = memfd_create("log", 0);
    assert_true(e->logfd >= 0);
    log_init(LOG_INFO, LOG_FORMAT_TEXT);
    log_set_fd(e->logfd);
}

/* Adds a plugins[] entry: path, then key, value, ..., NULL. */
static void
env_add(struct t_env *e, const char *path, ...)
{
    struct petrel_config *c = &e->cfg;
    c->plugins = xreallocarray(c->plugins, c->nplugins + 1, sizeof(*c->plugins));
    struct plugin_config *pc = &c->plugins[c->nplugins++];
    memset(pc, 0, sizeof(*pc));
    pc->path = xstrdup(path);
    va_list ap;
    va_start(ap, path);
    for (const char *k = va_arg(ap, const char *); k != NULL; k = va_arg(ap, const char *)) {
        const char *v = va_arg(ap, const char *);
        pc->config = xreallocarray(pc->config, pc->nconfig + 1, sizeof(*pc->config));
        pc->config[pc->nconfig++] = (struct plugin_kv){xstrdup(k), xstrdup(v)};
    }
    va_end(ap);
}

static void
env_load(struct t_env *e)
{
    char *err = NULL;
    e->ps = plugins_load(&e->loop, &e->cfg, &err);
    if (e->ps == NULL)
        fail_msg("plugins_load: got error %s, want success", err ? err : "(null)");
    assert_null(err);
}

static void
env_done(struct t_env *e)
{
    plugins_free(e->ps);
    uv_run(&e->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&e->loop), 0);
    for (size_t i = 0; i < e->cfg.nplugins; i++) {
        struct plugin_config *pc = &e->cfg.plugins[i];
        for (size_t k = 0; k < pc->nconfig; k++) {
            free(pc->config[k].key);
            free(pc->config[k].value);
        }
        free(pc->config);
        free(pc->path);
    }
    free(e->cfg.plugins);
    log_set_fd(2);
    close(e->logfd);
}

static char *
env_log(struct t_env *e)
{
    static char text[65536];
    ssize_t n = pread(e->logfd, text, sizeof(text) - 1, 0);
    text[n > 0 ? n : 0] = '\0';
    return text;
}

static void
expect_log(struct t_env *e, const char *want)
{
    const char *log = env_log(e);
    if (strstr(log, want) == NULL)
        fail_msg("log lacks %s; got:\n%s", want, log);
}

static void
expect_no_log(struct t_env *e, const char *unwanted)
{
    const char *log = env_log(e);
    if (strstr(log, unwanted) != NULL)
        fail_msg("log has %s, want it absent; got:\n%s", unwanted, log);
}

/* Runs one call to completion on the loop. */
static void
run_call(struct t_env *e, enum plugin_hook h, const struct plua_args *a, struct rec *x)
{
    rec_init(x);
    plugin_call(e->ps, h, a, rec_cb, x);
    assert_int_equal(x->n, 0); /* never synchronous */
    uv_run(&e->loop, UV_RUN_DEFAULT);
    assert_int_equal(x->n, 1);
}

static const struct plua_args conn_args = {
    .ip = "192.0.2.9", .port = 4242, .local_ip = "198.51.100.1", .listener = "mx"};

static void
expect_verdict(const struct rec *x, const char *label, enum verdict_kind kind, int code,
               const char *esc, const char *text)
{
    if (x->v.kind != kind || x->v.reply.code != code ||
        (esc != NULL && strcmp(x->v.reply.esc, esc) != 0) ||
        (text != NULL && strcmp(x->v.reply.text, text) != 0))
        fail_msg("%s: got %s %d %s %s, want %s %d %s %s", label, verdict_kind_name(x->v.kind),
                 x->v.reply.code, x->v.reply.esc, x->v.reply.text, verdict_kind_name(kind), code,
                 esc ? esc : "*", text ? text : "*");
}

/* ---- loading -------------------------------------------------------------- */

static void
test_plugin_load_ok_and_unload(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, TPLUG("good"), "name", "a", "connect", "continue", "event", "dump", NULL);
    env_load(&e);
    static const struct {
        enum plugin_hook h;
        bool want;
    } have[] = {
        {PLUGIN_HOOK_CONNECT, true}, {PLUGIN_HOOK_EVENT, true},  {PLUGIN_HOOK_HELO, false},
        {PLUGIN_HOOK_DATA, false},   {PLUGIN_HOOK_COUNT, false},
    };
    for (size_t i = 0; i < ARRAY_SIZE(have); i++)
        if (plugins_have(e.ps, have[i].h) != have[i].want)
            fail_msg("plugins_have(%d): got %d, want %d", (int)have[i].h, !have[i].want,
                     have[i].want);
    assert_false(plugins_have(NULL, PLUGIN_HOOK_CONNECT));
    /* during init the name is not known yet: the file's */
    expect_log(&e, "petrel: plugin=good, init keys=name,connect,event now=1");
    expect_log(&e, "petrel: plugin=a, loaded from " TPLUG("good"));
    plugins_free(e.ps);
    e.ps = NULL;
    expect_log(&e, "petrel: plugin=a, unload pending=0");
    env_done(&e);
}

static void
test_plugin_hook_names(void **state)
{
    (void)state;
    for (int h = 0; h < PLUGIN_HOOK_COUNT; h++) {
        const char *name = plugin_hook_name((enum plugin_hook)h);
        assert_non_null(name);
        if (plugin_hook_by_name(name) != h)
            fail_msg("plugin_hook_by_name(%s): got %d, want %d", name, plugin_hook_by_name(name),
                     h);
    }
    assert_string_equal(plugin_hook_name(PLUGIN_HOOK_SELECT_SOURCE), "select_source");
    assert_null(plugin_hook_name(PLUGIN_HOOK_COUNT));
    assert_int_equal(plugin_hook_by_name("conect"), -1);
}

static void
test_plugin_load_errors_name_the_file(void **state)
{
    (void)state;
    char size_err[256];
    snprintf(size_err, sizeof(size_err),
             "plugins[0].path: " TPLUG("bad_size") ": struct petrel_plugin is %zu bytes, "
                                                   "petrel's is %zu (rebuild it against this "
                                                   "petrel's include/petrel/plugin.h)",
             sizeof(struct petrel_plugin) - 8, sizeof(struct petrel_plugin));
    const struct {
        const char *label;
        const char *first; /* a good plugin loaded before, or NULL */
        const char *path;
        const char *fail_init;
        const char *want;
    } cases[] = {
        {"abi", NULL, TPLUG("abi_mismatch"), NULL,
         "plugins[0].path: " TPLUG("abi_mismatch") ": ABI version 99, petrel speaks 1"},
        {"size", NULL, TPLUG("bad_size"), NULL, size_err},
        {"symbol", NULL, TPLUG("no_symbol"), NULL,
         "plugins[0].path: " TPLUG("no_symbol") ": no symbol petrel_plugin_init (not a petrel "
                                                "plugin)"},
        {"missing", NULL, TPLUG("nope"), NULL,
         "plugins[0].path: " TPLUG("nope") ": cannot open shared object file: No such file or "
                                           "directory"},
        {"relative", NULL, "nope.so", NULL,
         "plugins[0].path: nope.so: cannot open shared object file: No such file or directory"},
        {"init", NULL, TPLUG("good"), "yes",
         "plugins[0].path: " TPLUG("good") ": petrel_plugin_init failed (returned -1)"},
        {"second", TPLUG("good"), TPLUG("abi_mismatch"), NULL,
         "plugins[1].path: " TPLUG("abi_mismatch") ": ABI version 99, petrel speaks 1"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        env_init(&e, MILTER_ACTION_TEMPFAIL);
        if (cases[i].first != NULL)
            env_add(&e, cases[i].first, "name", "first", NULL);
        if (cases[i].fail_init != NULL)
            env_add(&e, cases[i].path, "fail_init", cases[i].fail_init, NULL);
        else
            env_add(&e, cases[i].path, NULL);
        char *err = NULL;
        e.ps = plugins_load(&e.loop, &e.cfg, &err);
        if (e.ps != NULL || err == NULL || strcmp(err, cases[i].want) != 0)
            fail_msg("%s: got %p, error %s; want NULL, error %s", cases[i].label, (void *)e.ps,
                     err ? err : "(null)", cases[i].want);
        free(err);
        if (cases[i].first != NULL) /* the one loaded before was unloaded */
            expect_log(&e, "plugin=first, unload pending=0");
        if (cases[i].fail_init != NULL)
            expect_log(&e, "error: petrel: plugin=good, refusing to load (fail_init)");
        /* the same error from check-config */
        err = NULL;
        assert_int_equal(plugins_check(&e.cfg, &err), -1);
        if (err == NULL || strcmp(err, cases[i].want) != 0)
            fail_msg("%s: plugins_check: got %s, want %s", cases[i].label, err ? err : "(null)",
                     cases[i].want);
        free(err);
        env_done(&e);
    }
}

static void
test_plugin_check_ok(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    char *err = NULL;
    assert_int_equal(plugins_check(&e.cfg, &err), 0); /* no plugins */
    assert_null(err);
    env_add(&e, TPLUG("good"), "connect", "continue", NULL);
    env_add(&e, SHIPPED("ratelimit"), "connections", "5", NULL);
    assert_int_equal(plugins_check(&e.cfg, &err), 0);
    assert_null(err);
    expect_log(&e, "plugin=good, unload pending=0");
    env_done(&e);
}

static void
test_plugin_empty_set_answers_no_hook(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_load(&e);
    for (int h = 0; h < PLUGIN_HOOK_COUNT; h++)
        assert_false(plugins_have(e.ps, (enum plugin_hook)h));
    struct rec x;
    run_call(&e, PLUGIN_HOOK_CONNECT, &conn_args, &x);
    assert_int_equal(x.status, PLUA_NO_HOOK);
    expect_verdict(&x, "empty", VERDICT_CONTINUE, 0, "", "");
    rec_free(&x);
    env_done(&e);
}

/* ---- calls ---------------------------------------------------------------- */

static void
test_plugin_accessors_see_copies_of_every_field(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, TPLUG("good"), "data", "pending:5; dump", "bounce", "dump", NULL);
    env_load(&e);
    char ip[] = "192.0.2.9", from[] = "a@b.test", subj[] = "hi";
    struct header_field hdrs[] = {{"Subject", subj}, {"Received", "r0"}, {"Received", "r1"}};
    struct plua_failure fails[] = {{"bob@x.test", 550, "5.1.1", "no such user"}};
    struct plua_args a = {.ip = ip,
                          .port = 4242,
                          .local_ip = "198.51.100.1",
                          .listener = "mx",
                          .helo = "client.test",
                          .user = "alice",
                          .password = "secret",
                          .from = from,
                          .params = "SIZE=100",
                          .rcpt = "c@d.test",
                          .queue_id = "ABCDEF0123456789",
                          .headers = hdrs,
                          .nheaders = ARRAY_SIZE(hdrs),
                          .size = 1234,
                          .age = 56,
                          .xbind_ip = "192.0.2.50",
                          .xbind_hostname = "out.example",
                          .destination = "mx:d.test",
                          .attempt = 3,
                          .reply_code = 451,
                          .reply_esc = "4.2.0",
                          .reply_text = "busy",
                          .failures = fails,
                          .nfailures = ARRAY_SIZE(fails),
                          .event_type = "deferred"};
    struct rec x;
    rec_init(&x);
    plugin_call(e.ps, PLUGIN_HOOK_DATA, &a, rec_cb, &x);
    /* the handler is pending: scribble over what the caller lent */
    memset(ip, 'x', sizeof(ip) - 1);
    memset(from, 'x', sizeof(from) - 1);
    memset(subj, 'x', sizeof(subj) - 1);
    hdrs[1].value = "changed";
    uv_run(&e.loop, UV_RUN_DEFAULT);
    assert_int_equal(x.n, 1);
    assert_int_equal(x.status, PLUA_OK);
    expect_log(&e, "ABCDEF0123456789: plugin=good, dump1 hook=5 ip=192.0.2.9 port=4242 "
                   "local=198.51.100.1 listener=mx helo=client.test user=alice pass=secret "
                   "from=a@b.test params=SIZE=100 rcpt=c@d.test qid=ABCDEF0123456789 size=1234 "
                   "age=56\n");
    expect_log(&e, "ABCDEF0123456789: plugin=good, dump2 headers=3 [Subject=hi][Received=r0]"
                   "[Received=r1] subject=hi received1=r1 nope=(null)\n");
    expect_log(&e, "ABCDEF0123456789: plugin=good, dump3 xip=192.0.2.50 xhost=out.example "
                   "dest=mx:d.test attempt=3 reply=451/4.2.0/busy event=deferred failures=1 "
                   "bob@x.test/550/5.1.1/no such user past=-1 cancelled=0\n");
    expect_no_log(&e, "header_at past the end");
    rec_free(&x);

    /* a field the call does not have reads as NULL / 0; NOQUEUE without an id */
    struct plua_args none = {0};
    run_call(&e, PLUGIN_HOOK_BOUNCE, &none, &x);
    assert_int_equal(x.status, PLUA_NO_HOOK); /* dumped, answered nothing */
    expect_log(&e, "NOQUEUE: plugin=good, dump1 hook=10 ip=(null) port=0 local=(null) "
                   "listener=(null) helo=(null) user=(null) pass=(null) from=(null) "
                   "params=(null) rcpt=(null) qid=(null) size=0 age=0\n");
    expect_log(&e, "NOQUEUE: plugin=good, dump3 xip=(null) xhost=(null) dest=(null) attempt=0 "
                   "reply=0/(null)/(null) event=(null) failures=0  past=-1 cancelled=0\n");
    rec_free(&x);
    env_done(&e);
}

static void
test_plugin_order_and_first_verdict_wins(void **state)
{
    (void)state;
    static const struct {
        const char *a, *b;
        enum verdict_kind kind;
        int code;
        const char *esc, *text;
        bool b_called;
    } cases[] = {
        {"continue", "reject 550 5.7.1 no", VERDICT_REJECT, 550, "5.7.1", "no", true},
        {"dump", "tempfail 451 4.7.1 busy", VERDICT_TEMPFAIL, 451, "4.7.1", "busy", true},
        {"tempfail 451 4.7.1 busy", "reject 550 5.7.1 no", VERDICT_TEMPFAIL, 451, "4.7.1", "busy",
         false},
        {"accept", "reject 550 5.7.1 no", VERDICT_ACCEPT, 0, "", "", false},
        {"discard", "reject 550 5.7.1 no", VERDICT_DISCARD, 0, "", "", false},
        {"quarantine held for review", "reject 550 5.7.1 no", VERDICT_QUARANTINE, 0, "",
         "held for review", false},
        {"reject 554 no enhanced code given", "dump", VERDICT_REJECT, 554, "5.7.1",
         "no enhanced code given", false},
        {"tempfail 421 4.7.0 closing", "dump", VERDICT_TEMPFAIL, 421, "4.7.0", "closing", false},
        {"reject 550 5.7.1 first; reject 551 5.7.1 second", "dump", VERDICT_REJECT, 551, "5.7.1",
         "second", false},
        {"verdict 1 250 2.0.0 fine", "dump", VERDICT_ACCEPT, 250, "2.0.0", "fine", false},
        {"dump", "continue", VERDICT_CONTINUE, 0, "", "", true},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        env_init(&e, MILTER_ACTION_TEMPFAIL);
        env_add(&e, TPLUG("good"), "name", "a", "connect", cases[i].a, NULL);
        env_add(&e, TPLUG("good"), "name", "b", "connect", cases[i].b, NULL);
        env_load(&e);
        struct rec x;
        run_call(&e, PLUGIN_HOOK_CONNECT, &conn_args, &x);
        char label[32];
        snprintf(label, sizeof(label), "case %zu", i);
        assert_int_equal(x.status, PLUA_OK);
        expect_verdict(&x, label, cases[i].kind, cases[i].code, cases[i].esc, cases[i].text);
        const char *log = env_log(&e);
        const char *pa = strstr(log, "plugin=a, called connect");
        const char *pb = strstr(log, "plugin=b, called connect");
        if (pa == NULL || (pb != NULL) != cases[i].b_called || (pb != NULL && pb < pa))
            fail_msg("%s: a called %d, b called %d (after a: %d), want a, then b %d; log:\n%s",
                     label, pa != NULL, pb != NULL, pb > pa, cases[i].b_called, log);
        rec_free(&x);
        env_done(&e);
    }
}

static void
test_plugin_add_header_accumulates(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, TPLUG("good"), "name", "a", "data", "header X-A 1; header X-A2 tab\there", NULL);
    env_add(&e, TPLUG("good"), "name", "b", "data", "pending:2; header X-B two words", NULL);
    env_add(&e, TPLUG("good"), "name", "c", "data", "header X-C 3; accept", NULL);
    env_add(&e, TPLUG("good"), "name", "d", "data", "header X-D never", NULL);
    env_load(&e);
    struct plua_args a = conn_args;
    a.queue_id = "0000000000000001";
    struct rec x;
    run_call(&e, PLUGIN_HOOK_DATA, &a, &x);
    assert_int_equal(x.status, PLUA_OK);
    expect_verdict(&x, "data", VERDICT_ACCEPT, 0, "", "");
    assert_string_equal(x.headers, "X-A: 1|X-A2: tab\there|X-B: two words|X-C: 3|");
    rec_free(&x);
    env_done(&e);
}

static void
test_plugin_pending_completed_by_timer(void **state)
{
    (void)state;
    static const struct {
        const char *a, *b;
        enum verdict_kind kind;
        int code;
        const char *text;
        uint64_t min_ms;
    } cases[] = {
        {"pending:30 reject 550 5.7.1 later", "reject 550 5.7.1 from b", VERDICT_REJECT, 550,
         "later", 25},
        {"pending:10 continue", "reject 550 5.7.1 from b", VERDICT_REJECT, 550, "from b", 8},
        {"pending:0 dump", "pending:10 tempfail 452 4.3.1 full", VERDICT_TEMPFAIL, 452, "full", 8},
        {"reject 550 5.7.1 early; early", "dump", VERDICT_REJECT, 550, "early", 0},
        {"early", "reject 550 5.7.1 after early", VERDICT_REJECT, 550, "after early", 0},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        env_init(&e, MILTER_ACTION_TEMPFAIL);
        env_add(&e, TPLUG("good"), "name", "a", "connect", cases[i].a, NULL);
        env_add(&e, TPLUG("good"), "name", "b", "connect", cases[i].b, NULL);
        env_load(&e);
        uv_update_time(&e.loop);
        uint64_t t0 = uv_now(&e.loop);
        struct rec x;
        run_call(&e, PLUGIN_HOOK_CONNECT, &conn_args, &x);
        uint64_t took = uv_now(&e.loop) - t0;
        char label[32];
        snprintf(label, sizeof(label), "case %zu", i);
        assert_int_equal(x.status, PLUA_OK);
        expect_verdict(&x, label, cases[i].kind, cases[i].code, NULL, cases[i].text);
        if (took < cases[i].min_ms)
            fail_msg("%s: answered after %llu ms, want at least %llu", label,
                     (unsigned long long)took, (unsigned long long)cases[i].min_ms);
        if (strncmp(cases[i].a, "pending", 7) == 0) {
            const char *log = env_log(&e);
            const char *done = strstr(log, "plugin=a, completed connect cancelled=0");
            const char *b = strstr(log, "plugin=b, called connect");
            if (done == NULL || (b != NULL && b < done))
                fail_msg("%s: b must run after a completes; log:\n%s", label, log);
        }
        rec_free(&x);
        env_done(&e);
    }
}

static void
test_plugin_cancel_before_completion(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, TPLUG("good"), "name", "a", "connect", "pending:20 dump; reject 550 5.7.1 late",
            "helo", "continue", NULL);
    env_add(&e, TPLUG("good"), "name", "b", "connect", "dump", NULL);
    env_load(&e);
    struct rec x, y;
    rec_init(&x);
    rec_init(&y);
    struct plugin_call *c = plugin_call(e.ps, PLUGIN_HOOK_CONNECT, &conn_args, rec_cb, &x);
    plugin_call_cancel(c); /* pending in a: the context lives on */
    /* a call that finished at once, cancelled before its callback */
    struct plugin_call *d = plugin_call(e.ps, PLUGIN_HOOK_HELO, &conn_args, rec_cb, &y);
    plugin_call_cancel(d);
    plugin_call_cancel(NULL);
    uv_run(&e.loop, UV_RUN_DEFAULT);
    assert_int_equal(x.n, 0);
    assert_int_equal(y.n, 0);
    expect_log(&e, "plugin=a, dump3 xip=(null) xhost=(null) dest=(null) attempt=0 "
                   "reply=0/(null)/(null) event=(null) failures=0  past=-1 cancelled=1\n");
    expect_log(&e, "plugin=a, completed connect cancelled=1");
    expect_no_log(&e, "plugin=b, called connect"); /* the call went no further */
    env_done(&e);
}

static void
close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void
test_plugin_free_while_pending(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, TPLUG("good"), "name", "a", "connect", "pending:10000 reject 550 5.7.1 never",
            NULL);
    env_load(&e);
    struct rec x, y;
    rec_init(&x);
    rec_init(&y);
    plugin_call(e.ps, PLUGIN_HOOK_CONNECT, &conn_args, rec_cb, &x);
    plugin_call(e.ps, PLUGIN_HOOK_CONNECT, &conn_args, rec_cb, &y);
    uv_run(&e.loop, UV_RUN_NOWAIT);
    /* unload closes the plugin's timers; their close callbacks (plugin code)
     * run before the object is dlclose()d, the contexts are freed */
    plugins_free(e.ps);
    e.ps = NULL;
    expect_log(&e, "plugin=a, unload pending=2");
    /* as petrel's shutdown does: close whatever is still open */
    uv_walk(&e.loop, close_walk, NULL);
    env_done(&e);
    assert_int_equal(x.n, 0);
    assert_int_equal(y.n, 0);
}

struct chain {
    struct t_env *e;
    struct plugin_call *other;
    struct rec rec;
    int mode; /* 0: cancel other, 1: plugins_free, 2: start a new call */
    struct rec *next;
};

static void
chain_cb(struct plugin_call *c, struct plua_result *r, void *arg)
{
    struct chain *ch = arg;
    rec_cb(c, r, &ch->rec);
    if (ch->mode == 0) {
        plugin_call_cancel(ch->other);
    } else if (ch->mode == 1) {
        plugins_free(ch->e->ps);
        ch->e->ps = NULL;
    } else {
        rec_init(ch->next);
        plugin_call(ch->e->ps, PLUGIN_HOOK_HELO, &conn_args, rec_cb, ch->next);
        assert_int_equal(ch->next->n, 0);
    }
}

static void
test_plugin_callbacks_may_cancel_free_and_call(void **state)
{
    (void)state;
    for (int mode = 0; mode < 3; mode++) {
        struct t_env e;
        env_init(&e, MILTER_ACTION_TEMPFAIL);
        env_add(&e, TPLUG("good"), "connect", "continue", "helo", "reject 550 5.7.1 no", NULL);
        env_load(&e);
        struct chain ch = {.e = &e, .mode = mode};
        struct rec other, next;
        rec_init(&ch.rec);
        rec_init(&other);
        rec_init(&next);
        ch.next = &next;
        plugin_call(e.ps, PLUGIN_HOOK_CONNECT, &conn_args, chain_cb, &ch);
        ch.other = plugin_call(e.ps, PLUGIN_HOOK_CONNECT, &conn_args, rec_cb, &other);
        uv_run(&e.loop, UV_RUN_DEFAULT);
        assert_int_equal(ch.rec.n, 1);
        if (other.n != (mode == 2 ? 1 : 0))
            fail_msg("mode %d: the second call fired %d times, want %d", mode, other.n, mode == 2);
        if (mode == 2) {
            assert_int_equal(next.n, 1);
            expect_verdict(&next, "started from a callback", VERDICT_REJECT, 550, "5.7.1", "no");
        }
        rec_free(&ch.rec);
        rec_free(&other);
        rec_free(&next);
        env_done(&e);
    }
}

static void
test_plugin_invalid_verdict_gets_on_error(void **state)
{
    (void)state;
    static const struct {
        int on_error;
        const char *name;
        enum verdict_kind kind;
        int code;
        const char *esc;
    } cases[] = {
        {MILTER_ACTION_TEMPFAIL, "tempfail", VERDICT_TEMPFAIL, 451, "4.3.0"},
        {MILTER_ACTION_REJECT, "reject", VERDICT_REJECT, 550, "5.7.1"},
        {MILTER_ACTION_ACCEPT, "accept", VERDICT_CONTINUE, 0, ""},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        env_init(&e, cases[i].on_error);
        env_add(&e, TPLUG("bad_verdict"), NULL);
        env_add(&e, TPLUG("good"), "connect", "dump", NULL);
        env_load(&e);
        struct rec x;
        run_call(&e, PLUGIN_HOOK_CONNECT, &conn_args, &x);
        assert_int_equal(x.status, PLUA_ERROR);
        expect_verdict(&x, cases[i].name, cases[i].kind, cases[i].code, cases[i].esc, NULL);
        assert_string_equal(x.error, "plugin bad_verdict: hook connect: invalid verdict reject "
                                     "250 2.0.0 this is no rejection: reject needs a 5xx reply");
        char want[256];
        snprintf(want, sizeof(want),
                 "warning: NOQUEUE: plugin=bad_verdict, hook=connect, status=failed "
                 "(on_error=%s), reason=invalid verdict reject 250 2.0.0 this is no rejection: "
                 "reject needs a 5xx reply\n",
                 cases[i].name);
        expect_log(&e, want);
        expect_no_log(&e, "plugin=good, called connect");
        rec_free(&x);
        env_done(&e);
    }
}

static void
test_plugin_handler_failures(void **state)
{
    (void)state;
    char many[64 * 16 + 32] = "";
    for (int i = 0; i <= PLUA_MAX_ADD_HEADERS; i++) {
        size_t used = strlen(many);
        snprintf(many + used, sizeof(many) - used, "header X-%d v;", i);
    }
    const struct {
        enum plugin_hook hook;
        const char *spec;
        const char *why;
    } cases[] = {
        {PLUGIN_HOOK_CONNECT, "error", "handler returned PETREL_ERROR"},
        {PLUGIN_HOOK_CONNECT, "ret 7", "handler returned 7 (not PETREL_OK/PENDING/ERROR)"},
        {PLUGIN_HOOK_CONNECT, "fail backend down", "backend down"},
        {PLUGIN_HOOK_CONNECT, "reject 550 5.7.1 fine; fail changed my mind", "changed my mind"},
        {PLUGIN_HOOK_CONNECT, "pending:3 error", "failed after waiting"},
        {PLUGIN_HOOK_CONNECT, "route smtp:[192.0.2.1]:25",
         "set_route() is not an answer of hook connect"},
        {PLUGIN_HOOK_CONNECT, "header X-A 1", "add_header() is not an answer of hook connect"},
        {PLUGIN_HOOK_CONNECT, "allow", "set_allow() is not an answer of hook connect"},
        {PLUGIN_HOOK_ROUTE, "accept", "set_verdict() is not an answer of hook route"},
        {PLUGIN_HOOK_CONNECT, "reject 550 5.x.1 bad",
         "set_verdict: malformed enhanced status code"},
        {PLUGIN_HOOK_CONNECT, "reject 550 4.7.1 wrong class",
         "invalid verdict reject 550 4.7.1 wrong class: enhanced status code missing or of another "
         "class"},
        {PLUGIN_HOOK_CONNECT, "tempfail 550 5.7.1 x",
         "invalid verdict tempfail 550 5.7.1 x: tempfail needs a 4xx reply"},
        {PLUGIN_HOOK_CONNECT, "verdict 9 550 x", "set_verdict: unknown verdict kind 9"},
        {PLUGIN_HOOK_CONNECT, "verdict 2 0 x",
         "invalid verdict reject (x): reject needs a 5xx reply"},
        {PLUGIN_HOOK_DATA, "header Bad:Name x",
         "add_header: bad field name (1-76 printable characters, no ':')"},
        {PLUGIN_HOOK_DATA, many, "add_header: more than 64 headers"},
        {PLUGIN_HOOK_ROUTE, "route nonsense:x", "set_route \"nonsense:x\": "},
        {PLUGIN_HOOK_SELECT_SOURCE, "source not-an-ip",
         "set_source: \"not-an-ip\" is not an IP address"},
        {PLUGIN_HOOK_SELECT_SOURCE, "source 192.0.2.1 bad_host!",
         "set_source: \"bad_host!\" is not a host name"},
        {PLUGIN_HOOK_RETRY, "retry 31536001", "set_retry: 31536001 seconds is over 365 days"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        env_init(&e, MILTER_ACTION_TEMPFAIL);
        const char *hook = plugin_hook_name(cases[i].hook);
        env_add(&e, TPLUG("good"), "name", "a", hook, cases[i].spec, NULL);
        env_add(&e, TPLUG("good"), "name", "b", hook, "dump", NULL);
        env_load(&e);
        struct rec x;
        run_call(&e, cases[i].hook, &conn_args, &x);
        char want[512];
        snprintf(want, sizeof(want), "plugin a: hook %s: %s", hook, cases[i].why);
        if (x.status != PLUA_ERROR || x.error == NULL || strncmp(x.error, want, strlen(want)) != 0)
            fail_msg("case %zu (%s): got status %d error %s, want PLUA_ERROR, error %s", i,
                     cases[i].spec, x.status, x.error ? x.error : "(null)", want);
        expect_verdict(&x, "on_error", VERDICT_TEMPFAIL, 451, "4.3.0", NULL);
        assert_int_equal(x.headers[0], '\0'); /* nothing the plugins set is used */
        assert_null(x.route);
        assert_null(x.src_ip);
        assert_false(x.retry_set);
        expect_no_log(&e, "plugin=b, called");
        rec_free(&x);
        env_done(&e);
    }
}

static void
test_plugin_delivery_and_allow_hooks(void **state)
{
    (void)state;
    static const struct {
        enum plugin_hook hook;
        const char *a, *b;
        enum plua_status status;
        const char *route, *ip, *host, *subject, *text;
        int allow; /* -1: not checked */
        int retry; /* -1: not set; -2: bounce */
    } cases[] = {
        {PLUGIN_HOOK_ROUTE, "route smtp:[192.0.2.1]:2525", "route mx", PLUA_OK,
         "smtp:[192.0.2.1]:2525", NULL, NULL, NULL, NULL, -1, -1},
        {PLUGIN_HOOK_ROUTE, "dump", "route lmtp:unix:/run/lmtp", PLUA_OK, "lmtp:unix:/run/lmtp",
         NULL, NULL, NULL, NULL, -1, -1},
        {PLUGIN_HOOK_ROUTE, "dump", "dump", PLUA_NO_HOOK, NULL, NULL, NULL, NULL, NULL, -1, -1},
        {PLUGIN_HOOK_SELECT_SOURCE, "source 192.0.2.7 out.example", "source 192.0.2.8", PLUA_OK,
         NULL, "192.0.2.7", "out.example", NULL, NULL, -1, -1},
        {PLUGIN_HOOK_SELECT_SOURCE, "source 2001:db8::7", "dump", PLUA_OK, NULL, "2001:db8::7",
         NULL, NULL, NULL, -1, -1},
        {PLUGIN_HOOK_RETRY, "retry 300", "bounce_now", PLUA_OK, NULL, NULL, NULL, NULL, NULL, -1,
         300},
        {PLUGIN_HOOK_RETRY, "dump", "bounce_now", PLUA_OK, NULL, NULL, NULL, NULL, NULL, -1, -2},
        {PLUGIN_HOOK_RETRY, "retry 0", "dump", PLUA_OK, NULL, NULL, NULL, NULL, NULL, -1, 0},
        {PLUGIN_HOOK_BOUNCE, "btext Undeliverable|Sorry.\nReally.", "dump", PLUA_OK, NULL, NULL,
         NULL, "Undeliverable", "Sorry.\nReally.", -1, -1},
        {PLUGIN_HOOK_BOUNCE, "dump", "dump", PLUA_NO_HOOK, NULL, NULL, NULL, NULL, NULL, -1, -1},
        {PLUGIN_HOOK_AUTH, "allow", "deny", PLUA_OK, NULL, NULL, NULL, NULL, NULL, 1, -1},
        {PLUGIN_HOOK_AUTH, "dump", "deny", PLUA_OK, NULL, NULL, NULL, NULL, NULL, 0, -1},
        {PLUGIN_HOOK_AUTH, "dump", "dump", PLUA_NO_HOOK, NULL, NULL, NULL, NULL, NULL, 0, -1},
        {PLUGIN_HOOK_XBIND, "pending:2 allow", "deny", PLUA_OK, NULL, NULL, NULL, NULL, NULL, 1,
         -1},
        {PLUGIN_HOOK_EVENT, "dump", "dump", PLUA_OK, NULL, NULL, NULL, NULL, NULL, -1, -1},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        env_init(&e, MILTER_ACTION_TEMPFAIL);
        const char *hook = plugin_hook_name(cases[i].hook);
        env_add(&e, TPLUG("good"), "name", "a", hook, cases[i].a, NULL);
        env_add(&e, TPLUG("good"), "name", "b", hook, cases[i].b, NULL);
        env_load(&e);
        struct rec x;
        struct plua_args args = {.queue_id = "00000000000000AA", .rcpt = "bob@d.test"};
        run_call(&e, cases[i].hook, &args, &x);
#define SAME(got, want) ((want) == NULL ? (got) == NULL : (got) != NULL && strcmp(got, want) == 0)
        bool ok = x.status == cases[i].status && SAME(x.route, cases[i].route) &&
                  SAME(x.src_ip, cases[i].ip) && SAME(x.src_host, cases[i].host) &&
                  SAME(x.subject, cases[i].subject) && SAME(x.text, cases[i].text) &&
                  (cases[i].allow < 0 || x.allow == (cases[i].allow == 1)) &&
                  (cases[i].retry == -1 ? !x.retry_set
                   : cases[i].retry == -2
                       ? x.retry_set && x.bounce
                       : x.retry_set && !x.bounce && x.retry_seconds == (uint64_t)cases[i].retry);
#undef SAME
        if (!ok)
            fail_msg("case %zu (%s: %s / %s): got status %d route %s ip %s host %s subject %s "
                     "allow %d retry %d/%d/%llu (error %s)",
                     i, hook, cases[i].a, cases[i].b, x.status, x.route ? x.route : "-",
                     x.src_ip ? x.src_ip : "-", x.src_host ? x.src_host : "-",
                     x.subject ? x.subject : "-", x.allow, x.retry_set, x.bounce,
                     (unsigned long long)x.retry_seconds, x.error ? x.error : "-");
        /* the first answer ends the call; event reaches everyone */
        bool a_answered = strcmp(cases[i].a, "dump") != 0;
        const char *log = env_log(&e);
        bool b_called = strstr(log, "plugin=b, called") != NULL;
        if (b_called == a_answered)
            fail_msg("case %zu: b called %d, want %d", i, b_called, !a_answered);
        rec_free(&x);
        env_done(&e);
    }
}

static void
test_plugin_event_reaches_every_plugin(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, TPLUG("good"), "name", "a", "event", "error", NULL);
    env_add(&e, TPLUG("good"), "name", "b", "event", "fail b too", NULL);
    env_add(&e, TPLUG("good"), "name", "c", "event", "dump", NULL);
    env_load(&e);
    struct plua_args a = {.event_type = "delivered", .queue_id = "00000000000000EE"};
    struct rec x;
    run_call(&e, PLUGIN_HOOK_EVENT, &a, &x);
    assert_int_equal(x.status, PLUA_ERROR);
    assert_string_equal(x.error, "plugin a: hook event: handler returned PETREL_ERROR");
    expect_log(&e, "00000000000000EE: plugin=a, hook=event, status=failed, "
                   "reason=handler returned PETREL_ERROR\n");
    expect_log(&e, "00000000000000EE: plugin=b, hook=event, status=failed, reason=b too\n");
    expect_log(&e, "plugin=c, dump3 xip=(null) xhost=(null) dest=(null) attempt=0 "
                   "reply=0/(null)/(null) event=delivered");
    rec_free(&x);
    env_done(&e);
}

static void
test_plugin_without_handler_for_hook(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, TPLUG("good"), "connect", "reject 550 5.7.1 no", NULL);
    env_load(&e);
    struct rec x;
    run_call(&e, PLUGIN_HOOK_HELO, &conn_args, &x);
    assert_int_equal(x.status, PLUA_NO_HOOK);
    expect_verdict(&x, "helo", VERDICT_CONTINUE, 0, "", "");
    expect_no_log(&e, "called");
    rec_free(&x);
    env_done(&e);
}

/* ---- the shipped plugins -------------------------------------------------- */

static void
connect_from(struct t_env *e, const char *ip, struct rec *x)
{
    struct plua_args a = conn_args;
    a.ip = ip;
    run_call(e, PLUGIN_HOOK_CONNECT, &a, x);
}

static void
test_ratelimit_refuses_over_the_limits(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, SHIPPED("ratelimit"), "connections", "2", "messages", "1", "window", "1m", NULL);
    env_load(&e);
    assert_true(plugins_have(e.ps, PLUGIN_HOOK_CONNECT));
    assert_true(plugins_have(e.ps, PLUGIN_HOOK_MAIL_FROM));
    assert_false(plugins_have(e.ps, PLUGIN_HOOK_DATA));
    expect_log(&e, "plugin=ratelimit, limits per IP and 60s: connections 2, messages 1 (0: none); "
                   "up to 65536 IPs");
    static const struct {
        enum plugin_hook hook;
        const char *ip;
        enum verdict_kind kind;
        int code;
        const char *text;
    } steps[] = {
        {PLUGIN_HOOK_CONNECT, "192.0.2.1", VERDICT_CONTINUE, 0, NULL},
        {PLUGIN_HOOK_CONNECT, "192.0.2.1", VERDICT_CONTINUE, 0, NULL},
        {PLUGIN_HOOK_CONNECT, "192.0.2.1", VERDICT_TEMPFAIL, 421,
         "Too many connections from 192.0.2.1, try again later"},
        {PLUGIN_HOOK_CONNECT, "192.0.2.1", VERDICT_TEMPFAIL, 421, NULL},
        {PLUGIN_HOOK_CONNECT, "2001:db8::1", VERDICT_CONTINUE, 0, NULL},
        {PLUGIN_HOOK_MAIL_FROM, "2001:db8::1", VERDICT_CONTINUE, 0, NULL},
        {PLUGIN_HOOK_MAIL_FROM, "2001:db8::1", VERDICT_TEMPFAIL, 451,
         "Too many messages from 2001:db8::1, try again later"},
        {PLUGIN_HOOK_MAIL_FROM, "192.0.2.1", VERDICT_CONTINUE, 0, NULL},
    };
    for (size_t i = 0; i < ARRAY_SIZE(steps); i++) {
        struct plua_args a = conn_args;
        a.ip = steps[i].ip;
        a.from = "a@b.test";
        struct rec x;
        run_call(&e, steps[i].hook, &a, &x);
        char label[32];
        snprintf(label, sizeof(label), "step %zu", i);
        assert_int_equal(x.status, PLUA_OK);
        expect_verdict(&x, label, steps[i].kind, steps[i].code,
                       steps[i].code == 421 ? "4.7.0"
                       : steps[i].code      ? "4.7.1"
                                            : "",
                       steps[i].text);
        rec_free(&x);
    }
    /* one log line per IP and window, not one per refusal */
    const char *log = env_log(&e);
    const char *first = strstr(log, "client 192.0.2.1 over 2 connections in 60s: refusing");
    assert_non_null(first);
    assert_null(strstr(first + 1, "client 192.0.2.1 over 2 connections"));
    expect_log(&e, "NOQUEUE: plugin=ratelimit, client 2001:db8::1 over 1 messages in 60s");
    /* no client IP (unix socket): nothing to count */
    struct rec x;
    struct plua_args none = {.listener = "local"};
    for (int i = 0; i < 3; i++) {
        run_call(&e, PLUGIN_HOOK_CONNECT, &none, &x);
        expect_verdict(&x, "unix", VERDICT_CONTINUE, 0, "", "");
        rec_free(&x);
    }
    env_done(&e);
}

static void
test_ratelimit_memory_is_bounded(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, SHIPPED("ratelimit"), "connections", "1", "max_entries", "16", NULL);
    env_load(&e);
    struct rec x;
    connect_from(&e, "10.0.0.100", &x);
    expect_verdict(&x, "first", VERDICT_CONTINUE, 0, "", "");
    rec_free(&x);
    connect_from(&e, "10.0.0.100", &x);
    expect_verdict(&x, "second", VERDICT_TEMPFAIL, 421, "4.7.0", NULL);
    rec_free(&x);
    /* 16 other IPs fill the table: the oldest window (10.0.0.100) goes */
    for (int i = 0; i < 16; i++) {
        char ip[32];
        snprintf(ip, sizeof(ip), "10.0.0.%d", i);
        connect_from(&e, ip, &x);
        expect_verdict(&x, ip, VERDICT_CONTINUE, 0, "", "");
        rec_free(&x);
    }
    connect_from(&e, "10.0.0.100", &x);
    expect_verdict(&x, "forgotten", VERDICT_CONTINUE, 0, "", "");
    rec_free(&x);
    connect_from(&e, "10.0.0.15", &x); /* still counted */
    expect_verdict(&x, "kept", VERDICT_TEMPFAIL, 421, "4.7.0", NULL);
    rec_free(&x);
    env_done(&e);
}

static void
test_ratelimit_window_ends(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, SHIPPED("ratelimit"), "connections", "1", "window", "1s", NULL);
    env_load(&e);
    struct rec x;
    connect_from(&e, "192.0.2.1", &x);
    expect_verdict(&x, "first", VERDICT_CONTINUE, 0, "", "");
    rec_free(&x);
    connect_from(&e, "192.0.2.1", &x);
    expect_verdict(&x, "second", VERDICT_TEMPFAIL, 421, "4.7.0", NULL);
    rec_free(&x);
    usleep(1100 * 1000);
    uv_update_time(&e.loop);
    connect_from(&e, "192.0.2.1", &x);
    expect_verdict(&x, "next window", VERDICT_CONTINUE, 0, "", "");
    rec_free(&x);
    env_done(&e);
}

static void
test_shipped_plugins_refuse_bad_config(void **state)
{
    (void)state;
    static const struct {
        const char *path;
        const char *k1, *v1, *k2, *v2;
        const char *log;
    } cases[] = {
        {SHIPPED("ratelimit"), "window", "60", NULL, NULL,
         "plugin=ratelimit, nothing to limit: set connections and/or messages"},
        {SHIPPED("ratelimit"), "connections", "ten", NULL, NULL,
         "plugin=ratelimit, connections: \"ten\" is not a number"},
        {SHIPPED("ratelimit"), "connections", "1", "window", "2d",
         "plugin=ratelimit, window: \"2d\" is not a duration of 1s to 1 day"},
        {SHIPPED("ratelimit"), "connections", "1", "max_entries", "3",
         "plugin=ratelimit, max_entries: \"3\" is not a number from 16"},
        {SHIPPED("ratelimit"), "connections", "1", "burst", "3",
         "plugin=ratelimit, unknown config key \"burst\""},
        {SHIPPED("header_stamp"), "name", "X-A", NULL, NULL,
         "plugin=header_stamp, config needs name and value"},
        {SHIPPED("header_stamp"), "name", "X:A", "value", "v",
         "plugin=header_stamp, name: \"X:A\" is not a header name"},
        {SHIPPED("header_stamp"), "name", "X-A", "value", "%{nope}",
         "plugin=header_stamp, value: unknown or unclosed %{...} at \"%{nope}\""},
        {SHIPPED("header_stamp"), "name", "X-A", "value", "%{helo",
         "plugin=header_stamp, value: unknown or unclosed %{...} at \"%{helo\""},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        env_init(&e, MILTER_ACTION_TEMPFAIL);
        if (cases[i].k2 != NULL)
            env_add(&e, cases[i].path, cases[i].k1, cases[i].v1, cases[i].k2, cases[i].v2, NULL);
        else
            env_add(&e, cases[i].path, cases[i].k1, cases[i].v1, NULL);
        char *err = NULL;
        e.ps = plugins_load(&e.loop, &e.cfg, &err);
        assert_null(e.ps);
        char want[256];
        snprintf(want, sizeof(want), "plugins[0].path: %s: petrel_plugin_init failed (returned -1)",
                 cases[i].path);
        if (err == NULL || strcmp(err, want) != 0)
            fail_msg("case %zu: got %s, want %s", i, err ? err : "(null)", want);
        free(err);
        expect_log(&e, cases[i].log);
        env_done(&e);
    }
}

static void
test_header_stamp_adds_its_header(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, SHIPPED("header_stamp"), "name", "X-Stamp", "value",
            "q=%{queue_id} ip=%{client_ip} helo=%{helo} from=%{sender} l=%{listener} "
            "to=%{local_ip} 100%% %x",
            NULL);
    env_add(&e, SHIPPED("header_stamp"), "name", "X-Second", "value", "%{client_ip}", NULL);
    env_load(&e);
    assert_true(plugins_have(e.ps, PLUGIN_HOOK_DATA));
    assert_false(plugins_have(e.ps, PLUGIN_HOOK_CONNECT));
    struct plua_args a = conn_args;
    a.queue_id = "0123456789ABCDEF";
    a.helo = "bad\r\nhelo";
    a.from = "";
    struct rec x;
    run_call(&e, PLUGIN_HOOK_DATA, &a, &x);
    assert_int_equal(x.status, PLUA_OK);
    assert_string_equal(x.headers, "X-Stamp: q=0123456789ABCDEF ip=192.0.2.9 helo=bad??helo "
                                   "from=<> l=mx to=198.51.100.1 100% %x|X-Second: 192.0.2.9|");
    rec_free(&x);
    struct plua_args unix_args = {.listener = "local", .queue_id = "0123456789ABCDEF"};
    run_call(&e, PLUGIN_HOOK_DATA, &unix_args, &x);
    assert_string_equal(x.headers, "X-Stamp: q=0123456789ABCDEF ip=unknown helo=unknown "
                                   "from=unknown l=local to=unknown 100% %x|X-Second: unknown|");
    rec_free(&x);
    env_done(&e);
}

static void
test_hello_example(void **state)
{
    (void)state;
    struct t_env e;
    env_init(&e, MILTER_ACTION_TEMPFAIL);
    env_add(&e, SHIPPED("hello"), "reject_domain", "spam.example", NULL);
    env_load(&e);
    expect_log(&e, "petrel: plugin=hello, ready; refusing mail from spam.example");
    struct rec x;
    run_call(&e, PLUGIN_HOOK_CONNECT, &conn_args, &x);
    expect_verdict(&x, "connect", VERDICT_CONTINUE, 0, "", "");
    expect_log(&e, "NOQUEUE: plugin=hello, hello, 192.0.2.9 port 4242 on listener mx\n");
    rec_free(&x);
    static const struct {
        const char *from;
        bool reject;
    } cases[] = {
        {"x@spam.example", true},
        {"x@SPAM.Example", true},
        {"x@sub.spam.example", true},
        {"x@notspam.example", false},
        {"", false},
        {"x@example", false},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct plua_args a = conn_args;
        a.from = cases[i].from;
        run_call(&e, PLUGIN_HOOK_MAIL_FROM, &a, &x);
        if (cases[i].reject)
            expect_verdict(&x, cases[i].from, VERDICT_REJECT, 550, "5.7.1",
                           "Mail from this domain is not accepted here");
        else
            expect_verdict(&x, cases[i].from, VERDICT_CONTINUE, 0, "", "");
        rec_free(&x);
    }
    env_done(&e);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_plugin_load_ok_and_unload),
        cmocka_unit_test(test_plugin_hook_names),
        cmocka_unit_test(test_plugin_load_errors_name_the_file),
        cmocka_unit_test(test_plugin_check_ok),
        cmocka_unit_test(test_plugin_empty_set_answers_no_hook),
        cmocka_unit_test(test_plugin_accessors_see_copies_of_every_field),
        cmocka_unit_test(test_plugin_order_and_first_verdict_wins),
        cmocka_unit_test(test_plugin_add_header_accumulates),
        cmocka_unit_test(test_plugin_pending_completed_by_timer),
        cmocka_unit_test(test_plugin_cancel_before_completion),
        cmocka_unit_test(test_plugin_free_while_pending),
        cmocka_unit_test(test_plugin_callbacks_may_cancel_free_and_call),
        cmocka_unit_test(test_plugin_invalid_verdict_gets_on_error),
        cmocka_unit_test(test_plugin_handler_failures),
        cmocka_unit_test(test_plugin_delivery_and_allow_hooks),
        cmocka_unit_test(test_plugin_event_reaches_every_plugin),
        cmocka_unit_test(test_plugin_without_handler_for_hook),
        cmocka_unit_test(test_ratelimit_refuses_over_the_limits),
        cmocka_unit_test(test_ratelimit_memory_is_bounded),
        cmocka_unit_test(test_ratelimit_window_ends),
        cmocka_unit_test(test_shipped_plugins_refuse_bad_config),
        cmocka_unit_test(test_header_stamp_adds_its_header),
        cmocka_unit_test(test_hello_example),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
