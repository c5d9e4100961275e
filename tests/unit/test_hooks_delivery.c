/*
 * test_hooks_delivery — the delivery side of the hook registry on a real
 * uv loop: the real Lua engine (tests/unit/lua/delivery.lua) and a fake
 * plugin set (fakes/fake_plugin.c). Lua first, the plugins when Lua has no
 * hook or answers nil, a Lua error as the answer (built-in behaviour), the
 * event point going to both, callbacks from the loop only, cancel before
 * and inside the callback, and the arguments copied at the call.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
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
#include "fakes/fake_registry.h"
#include "fakes/fake_plugin.h"
#include "hooks.h"
#include "log.h"
#include "lua_bridge.h"
#include "util.h"

#define FIXTURE(name) PETREL_SOURCE_DIR "/tests/unit/lua/" name

struct t_env {
    uv_loop_t loop;
    struct petrel_config cfg;
    struct hooks h;
    int logfd;
};

struct rec {
    int n;
    enum plua_status status;
    char *route;
    bool retry_set;
    uint64_t retry_seconds;
    bool cancel_inside;   /* hooks_call_cancel(c) from the callback */
};

static void
env_open(struct t_env *e, const char *script)
{
    memset(e, 0, sizeof(*e));
    assert_int_equal(uv_loop_init(&e->loop), 0);
    e->cfg.lua.script = script ? xstrdup(script) : NULL;
    e->cfg.lua.timeout_ms = 1000;
    e->cfg.lua.on_error = MILTER_ACTION_TEMPFAIL;
    e->logfd = memfd_create("log", 0);
    assert_true(e->logfd >= 0);
    log_init(LOG_INFO, LOG_FORMAT_TEXT);
    log_set_fd(e->logfd);
    char *err = NULL;
    e->h.lua = plua_open(&e->loop, &e->cfg, NULL, &err);
    if (e->h.lua == NULL)
        fail_msg("plua_open(%s): %s", script ? script : "NULL", err);
    e->h.plugins = fake_plugins_new(&e->loop);
    e->h.cfg = &e->cfg;
}

static void
env_done(struct t_env *e)
{
    plua_close(e->h.lua);
    fake_plugins_free(e->h.plugins);
    uv_run(&e->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&e->loop), 0);
    free(e->cfg.lua.script);
    log_set_fd(2);
    close(e->logfd);
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
rec_cb(struct hooks_call *c, struct plua_result *res, void *arg)
{
    struct rec *x = arg;
    x->n++;
    x->status = res->status;
    free(x->route);
    x->route = res->route; /* taken */
    res->route = NULL;
    x->retry_set = res->retry_set;
    x->retry_seconds = res->retry_seconds;
    if (x->cancel_inside)
        hooks_call_cancel(c); /* a no-op: the call ends when the callback returns */
}

/* One call run to completion: never synchronous, exactly one callback. */
static void
run(struct t_env *e, enum plugin_hook p, const struct plua_args *a, struct rec *x)
{
    hooks_call(&e->h, p, a, rec_cb, x);
    if (x->n != 0)
        fail_msg("callback inside hooks_call: got %d calls, want 0", x->n);
    uv_run(&e->loop, UV_RUN_DEFAULT);
    if (x->n != 1)
        fail_msg("callbacks: got %d, want 1", x->n);
}

static void
test_hooks_delivery_route_lua_then_plugins(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("delivery.lua"));
    fake_plugins_answer(e.h.plugins, PLUGIN_HOOK_ROUTE,
                        &(struct fake_plugin_answer){ .status = PLUA_OK,
                                                      .route = "smtp:[192.0.2.99]:25" });
    static const struct {
        const char *label, *rcpt;
        enum plua_status want_status;
        const char *want_route; /* NULL: none */
        unsigned want_plugin_calls;
    } cases[] = {
        {"Lua answers", "lua@x.test", PLUA_OK, "smtp:[192.0.2.1]:2525", 0},
        {"Lua reads msg", "from@x.test", PLUA_OK, "smtp:[sender.test]", 0},
        {"Lua nil: plugin", "other@x.test", PLUA_OK, "smtp:[192.0.2.99]:25", 1},
        {"Lua error: built-in", "err@x.test", PLUA_ERROR, NULL, 0},
        {"Lua after a sleep", "slow@x.test", PLUA_OK, "mx", 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        unsigned before = fake_plugins_calls(e.h.plugins, PLUGIN_HOOK_ROUTE);
        struct rec x = { 0 };
        struct plua_args a = { .queue_id = "0123456789ABCDEF", .from = "alice@sender.test",
                               .rcpt = cases[i].rcpt };
        run(&e, PLUGIN_HOOK_ROUTE, &a, &x);
        unsigned calls = fake_plugins_calls(e.h.plugins, PLUGIN_HOOK_ROUTE) - before;
        bool route_ok = cases[i].want_route == NULL
                            ? x.route == NULL
                            : x.route != NULL && strcmp(x.route, cases[i].want_route) == 0;
        if (x.status != cases[i].want_status || !route_ok || calls != cases[i].want_plugin_calls)
            fail_msg("%s: got status %d route %s plugin calls %u, want %d %s %u",
                     cases[i].label, x.status, x.route ? x.route : "NULL", calls,
                     cases[i].want_status, cases[i].want_route ? cases[i].want_route : "NULL",
                     cases[i].want_plugin_calls);
        free(x.route);
    }
    if (strstr(env_log(&e), "route broke") == NULL)
        fail_msg("the Lua error is not logged:\n%s", env_log(&e));
    env_done(&e);
}

static void
test_hooks_delivery_without_lua_hook_asks_plugins(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, NULL); /* no script: no Lua hook at all */
    /* no plugin handler either: PLUA_NO_HOOK, still from the loop */
    struct rec x = { 0 };
    struct plua_args a = { .rcpt = "bob@x.test" };
    run(&e, PLUGIN_HOOK_SELECT_SOURCE, &a, &x);
    assert_int_equal(x.status, PLUA_NO_HOOK);
    assert_false(hooks_have(&e.h, PLUGIN_HOOK_SELECT_SOURCE));

    fake_plugins_answer(e.h.plugins, PLUGIN_HOOK_RETRY,
                        &(struct fake_plugin_answer){ .status = PLUA_OK, .retry_set = true,
                                                      .retry_seconds = 42 });
    assert_true(hooks_have(&e.h, PLUGIN_HOOK_RETRY));
    struct rec y = { 0 };
    run(&e, PLUGIN_HOOK_RETRY, &a, &y);
    if (y.status != PLUA_OK || !y.retry_set || y.retry_seconds != 42)
        fail_msg("plugin retry: got status %d set %d seconds %llu, want 0 1 42", y.status,
                 y.retry_set, (unsigned long long)y.retry_seconds);
    assert_string_equal(fake_plugins_last_rcpt(e.h.plugins), "bob@x.test");
    env_done(&e);
}

static void
test_hooks_delivery_retry_gets_attempt_and_reply(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("delivery.lua"));
    struct rec x = { 0 };
    struct plua_args a = { .rcpt = "lua@x.test", .attempt = 3, .reply_code = 451,
                           .reply_esc = "4.7.1", .reply_text = "greylisted" };
    run(&e, PLUGIN_HOOK_RETRY, &a, &x);
    if (x.status != PLUA_OK || !x.retry_set || x.retry_seconds != 751)
        fail_msg("got status %d set %d seconds %llu, want 0 1 751", x.status, x.retry_set,
                 (unsigned long long)x.retry_seconds);
    /* nil from Lua and no plugin: nothing set, the schedule applies */
    struct rec y = { 0 };
    a.rcpt = "other@x.test";
    run(&e, PLUGIN_HOOK_RETRY, &a, &y);
    assert_false(y.retry_set);
    env_done(&e);
}

static void
test_hooks_delivery_event_goes_to_lua_and_plugins(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("delivery.lua"));
    fake_plugins_answer(e.h.plugins, PLUGIN_HOOK_EVENT,
                        &(struct fake_plugin_answer){ .status = PLUA_OK });
    struct rec x = { 0 };
    struct plua_args a = { .event_type = "delivered", .queue_id = "0123456789ABCDEF",
                           .rcpt = "bob@x.test", .reply_code = 250, .reply_esc = "2.0.0",
                           .reply_text = "Ok" };
    run(&e, PLUGIN_HOOK_EVENT, &a, &x);
    assert_int_equal(fake_plugins_calls(e.h.plugins, PLUGIN_HOOK_EVENT), 1);
    assert_string_equal(fake_plugins_last_event(e.h.plugins), "delivered");
    if (strstr(env_log(&e), "event delivered bob@x.test") == NULL)
        fail_msg("the Lua event hook did not run; log:\n%s", env_log(&e));
    /* a fire-and-forget call with no callback completes and frees itself */
    hooks_call(&e.h, PLUGIN_HOOK_EVENT, &a, NULL, NULL);
    uv_run(&e.loop, UV_RUN_DEFAULT);
    assert_int_equal(fake_plugins_calls(e.h.plugins, PLUGIN_HOOK_EVENT), 2);
    assert_int_equal(plua_pending(e.h.lua), 0);
    env_done(&e);
}

static void
test_hooks_delivery_cancel(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("delivery.lua"));
    fake_plugins_answer(e.h.plugins, PLUGIN_HOOK_SELECT_SOURCE,
                        &(struct fake_plugin_answer){ .status = PLUA_OK,
                                                      .source_ip = "127.0.0.1" });
    fake_plugins_answer(e.h.plugins, PLUGIN_HOOK_EVENT,
                        &(struct fake_plugin_answer){ .status = PLUA_OK });
    struct plua_args a = { .rcpt = "slow@x.test", .event_type = "deferred" };
    /* cancelled while Lua sleeps, while a plugin runs (no Lua hook for
     * select_source), and while both run (event) */
    struct rec x = { 0 }, y = { 0 }, z = { 0 };
    struct hooks_call *c = hooks_call(&e.h, PLUGIN_HOOK_ROUTE, &a, rec_cb, &x);
    uv_run(&e.loop, UV_RUN_NOWAIT); /* the hook started and sleeps 50 ms now */
    assert_int_equal(x.n, 0);
    hooks_call_cancel(c);
    hooks_call_cancel(hooks_call(&e.h, PLUGIN_HOOK_SELECT_SOURCE, &a, rec_cb, &y));
    hooks_call_cancel(hooks_call(&e.h, PLUGIN_HOOK_EVENT, &a, rec_cb, &z));
    hooks_call_cancel(NULL);
    uv_run(&e.loop, UV_RUN_DEFAULT);
    if (x.n + y.n + z.n != 0)
        fail_msg("callbacks after cancel: got %d %d %d, want 0 0 0", x.n, y.n, z.n);
    assert_int_equal(plua_pending(e.h.lua), 0);
    assert_int_equal(fake_plugins_pending(e.h.plugins), 0);
    /* cancel from inside the callback is a no-op */
    struct rec w = { .cancel_inside = true };
    a.rcpt = "lua@x.test";
    run(&e, PLUGIN_HOOK_ROUTE, &a, &w);
    assert_string_equal(w.route, "smtp:[192.0.2.1]:2525");
    free(w.route);
    free(x.route);
    free(y.route);
    free(z.route);
    env_done(&e);
}

static void
test_hooks_delivery_copies_arguments(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, FIXTURE("delivery.lua"));
    char from[64], rcpt[64];
    snprintf(from, sizeof(from), "alice@copied.test");
    snprintf(rcpt, sizeof(rcpt), "from@x.test");
    struct header_field hdr[1] = { { "Subject", "hello" } };
    struct plua_failure fail[1] = { { "bob@x.test", 550, "5.1.1", "no such user" } };
    struct plua_args a = { .from = from, .rcpt = rcpt, .headers = hdr, .nheaders = 1,
                           .failures = fail, .nfailures = 1 };
    struct rec x = { 0 };
    hooks_call(&e.h, PLUGIN_HOOK_ROUTE, &a, rec_cb, &x);
    /* the caller's strings change before the hook runs */
    memset(from, 'X', sizeof(from) - 1);
    memset(rcpt, 'Y', sizeof(rcpt) - 1);
    uv_run(&e.loop, UV_RUN_DEFAULT);
    assert_int_equal(x.n, 1);
    if (x.route == NULL || strcmp(x.route, "smtp:[copied.test]") != 0)
        fail_msg("got route %s, want smtp:[copied.test]", x.route ? x.route : "NULL");
    free(x.route);
    env_done(&e);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hooks_delivery_route_lua_then_plugins),
        cmocka_unit_test(test_hooks_delivery_without_lua_hook_asks_plugins),
        cmocka_unit_test(test_hooks_delivery_retry_gets_attempt_and_reply),
        cmocka_unit_test(test_hooks_delivery_event_goes_to_lua_and_plugins),
        cmocka_unit_test(test_hooks_delivery_cancel),
        cmocka_unit_test(test_hooks_delivery_copies_arguments),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
