/*
 * test_hooks — the registry's SMTP-session side on a real uv loop with the
 * real Lua engine (scripts written to a temp file per test) and no milter
 * or plugin: stage verdicts, relay granted by ACCEPT at rcpt_to and refused
 * without it, headers added at end of message (where they go, what the
 * script sees of the header section), a stage with nothing to do still
 * completing from a later loop iteration, cancel, and sessions that are not
 * hooked at all.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "config.h"
#include "hooks.h"
#include "util.h"
#include "verdict.h"

struct t_env {
    uv_loop_t loop;
    struct petrel_config *cfg;
    struct hooks *h;
    char script[64];
};

struct got {
    int n;
    struct verdict v;
    char content[2048];
    bool changed;
};

static void
env_open(struct t_env *e, const char *lua)
{
    memset(e, 0, sizeof(*e));
    uv_loop_init(&e->loop);
    char yaml[512];
    const char *script_line = "";
    char buf[128];
    if (lua != NULL) {
        snprintf(e->script, sizeof(e->script), "/tmp/test_hooks_XXXXXX");
        int fd = mkstemp(e->script);
        assert_true(fd >= 0);
        assert_int_equal(write(fd, lua, strlen(lua)), (ssize_t)strlen(lua));
        close(fd);
        snprintf(buf, sizeof(buf), "lua:\n  script: %s\n", e->script);
        script_line = buf;
    }
    snprintf(yaml, sizeof(yaml),
             "hostname: mx.test\nlisteners:\n  - address: 127.0.0.1:2525\n%s", script_line);
    char *errors = NULL;
    int r = config_load_string("test.yaml", yaml, strlen(yaml), &e->cfg, &errors);
    if (r != 0)
        fail_msg("config: %s", errors);
    char *err = NULL;
    e->h = hooks_new(&e->loop, e->cfg, NULL, &err);
    if (e->h == NULL)
        fail_msg("hooks_new: %s", err);
}

static void
env_close(struct t_env *e)
{
    hooks_free(e->h);
    uv_run(&e->loop, UV_RUN_DEFAULT);
    assert_int_equal(uv_loop_close(&e->loop), 0);
    config_unref(e->cfg);
    if (e->script[0])
        unlink(e->script);
}

static struct hook_session *
session(struct t_env *e)
{
    struct hook_conn hc = {
        .session_id = 1, .family = AF_INET, .client_ip = "192.0.2.9", .client_port = 4000,
        .local_ip = "127.0.0.1", .local_port = 2525,
    };
    return hook_session_new(e->h, &e->cfg->listeners[0], &hc);
}

static void
on_verdict(struct hook_session *hs, const struct verdict *v, void *arg)
{
    (void)hs;
    struct got *g = arg;
    g->n++;
    verdict_copy(&g->v, v);
}

static void
on_eom(struct hook_session *hs, const struct hook_eom_result *r, void *arg)
{
    (void)hs;
    struct got *g = arg;
    g->n++;
    verdict_copy(&g->v, r->verdict);
    g->changed = r->changed;
    size_t n = r->content.len < sizeof(g->content) - 1 ? r->content.len : sizeof(g->content) - 1;
    memcpy(g->content, r->content.p, n);
    g->content[n] = '\0';
}

/* Runs the loop until the callback fired (bounded). */
static void
wait_for(struct t_env *e, struct got *g)
{
    for (int i = 0; i < 1000 && g->n == 0; i++)
        uv_run(&e->loop, UV_RUN_ONCE);
    assert_int_equal(g->n, 1);
}

static void
test_hooks_no_script_no_session(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, NULL);
    assert_null(session(&e)); /* nothing applies: the server calls nothing */
    assert_false(hooks_have(e.h, PLUGIN_HOOK_RCPT_TO));
    env_close(&e);
}

static const char stage_script[] =
    "petrel.on('helo', function(conn, name)\n"
    "  if name == 'bad.test' then return petrel.reject(550, '5.7.1 bad helo ' .. conn.ip) end\n"
    "end)\n"
    "petrel.on('mail_from', function(txn)\n"
    "  if txn.from == 'x@spam.test' then return petrel.tempfail(451, '4.7.1 later') end\n"
    "end)\n"
    "petrel.on('rcpt_to', function(txn, rcpt)\n"
    "  if rcpt == 'no@local.test' then return petrel.reject(550, '5.1.1 no such user') end\n"
    "  if rcpt:match('@partner%.test$') then return petrel.accept() end\n"
    "end)\n";

static void
test_hooks_stage_verdicts(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, stage_script);
    struct hook_session *hs = session(&e);
    assert_non_null(hs);
    assert_true(hook_wants(hs, PLUGIN_HOOK_HELO));
    assert_false(hook_wants(hs, PLUGIN_HOOK_CONNECT));
    assert_false(hook_wants(hs, PLUGIN_HOOK_DATA));

    static const struct {
        const char *helo;
        enum verdict_kind kind;
        int code;
        const char *text;
    } helos[] = {
        { "bad.test", VERDICT_REJECT, 550, "bad helo 192.0.2.9" },
        { "good.test", VERDICT_CONTINUE, 0, "" },
    };
    for (size_t i = 0; i < ARRAY_SIZE(helos); i++) {
        struct got g = { 0 };
        hook_helo(hs, helos[i].helo, on_verdict, &g);
        assert_int_equal(g.n, 0); /* never from inside the call */
        assert_true(hook_pending(hs));
        wait_for(&e, &g);
        if (g.v.kind != helos[i].kind || g.v.reply.code != helos[i].code
            || strcmp(g.v.reply.text, helos[i].text) != 0)
            fail_msg("helo %s: got %s %d '%s', want %s %d '%s'", helos[i].helo,
                     verdict_kind_name(g.v.kind), g.v.reply.code, g.v.reply.text,
                     verdict_kind_name(helos[i].kind), helos[i].code, helos[i].text);
        verdict_clear(&g.v);
    }

    struct got g = { 0 };
    hook_mail(hs, "x@spam.test", "SIZE=10", on_verdict, &g);
    wait_for(&e, &g);
    assert_int_equal(g.v.kind, VERDICT_TEMPFAIL);
    assert_int_equal(g.v.reply.code, 451);
    assert_string_equal(g.v.reply.esc, "4.7.1");
    verdict_clear(&g.v);

    static const struct {
        const char *rcpt;
        bool relay_ok;
        enum verdict_kind kind;
        int code;
    } rcpts[] = {
        { "no@local.test", true, VERDICT_REJECT, 550 },      /* the script refuses */
        { "yes@local.test", true, VERDICT_CONTINUE, 0 },     /* no objection */
        { "a@partner.test", false, VERDICT_CONTINUE, 0 },    /* ACCEPT grants relay */
        { "a@elsewhere.test", false, VERDICT_REJECT, 554 },  /* relay denied */
    };
    for (size_t i = 0; i < ARRAY_SIZE(rcpts); i++) {
        struct got gr = { 0 };
        hook_rcpt(hs, rcpts[i].rcpt, NULL, rcpts[i].relay_ok, on_verdict, &gr);
        wait_for(&e, &gr);
        if (gr.v.kind != rcpts[i].kind || gr.v.reply.code != rcpts[i].code)
            fail_msg("rcpt %s: got %s %d, want %s %d", rcpts[i].rcpt,
                     verdict_kind_name(gr.v.kind), gr.v.reply.code,
                     verdict_kind_name(rcpts[i].kind), rcpts[i].code);
        verdict_clear(&gr.v);
    }
    hook_session_free(hs);
    env_close(&e);
}

static const char data_script[] =
    "petrel.on('data', function(txn, msg)\n"
    "  msg:add_header('X-Seen', txn.from .. ' ' .. tostring(msg:header('subject')))\n"
    "  if msg:header('Subject') == 'no' then return petrel.reject(554, '5.7.1 content') end\n"
    "end)\n";

static void
test_hooks_eom_adds_headers_at_the_end_of_the_header_section(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, data_script);
    struct hook_session *hs = session(&e);
    assert_non_null(hs);
    assert_true(hook_wants(hs, PLUGIN_HOOK_DATA));
    assert_false(hook_wants_data_command(hs)); /* no milter: DATA itself is not hooked */

    static const struct {
        const char *in;
        enum verdict_kind kind;
        const char *out;
    } cases[] = {
        { "Subject: hi\r\nTo: b@c\r\n\r\nbody\r\n", VERDICT_CONTINUE,
          "Subject: hi\r\nTo: b@c\r\nX-Seen: a@b.test hi\r\n\r\nbody\r\n" },
        /* folded header: the script sees it unfolded */
        { "Subject: a\r\n long\r\n\r\nbody\r\n", VERDICT_CONTINUE,
          "Subject: a\r\n long\r\nX-Seen: a@b.test a long\r\n\r\nbody\r\n" },
        /* no body, no empty line: the header goes at the end */
        { "Subject: x\r\n", VERDICT_CONTINUE, "Subject: x\r\nX-Seen: a@b.test x\r\n" },
        /* no header section at all */
        { "\r\nbody\r\n", VERDICT_CONTINUE, "X-Seen: a@b.test nil\r\n\r\nbody\r\n" },
        { "Subject: no\r\n\r\nb\r\n", VERDICT_REJECT, NULL },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct got gm = { 0 };
        hook_mail(hs, "a@b.test", NULL, on_verdict, &gm);
        wait_for(&e, &gm); /* nothing hooks mail_from: completes later all the same */
        struct got g = { 0 };
        struct span in = { cases[i].in, strlen(cases[i].in) };
        hook_eom(hs, in, "QID1", in.len, on_eom, &g);
        wait_for(&e, &g);
        if (g.v.kind != cases[i].kind)
            fail_msg("case %zu: got %s, want %s", i, verdict_kind_name(g.v.kind),
                     verdict_kind_name(cases[i].kind));
        if (cases[i].out != NULL) {
            assert_true(g.changed);
            if (strcmp(g.content, cases[i].out) != 0)
                fail_msg("case %zu: got '%s', want '%s'", i, g.content, cases[i].out);
        }
        verdict_clear(&g.v);
        verdict_clear(&gm.v);
        hook_abort(hs);
    }
    hook_session_free(hs);
    env_close(&e);
}

static const char sleep_script[] =
    "petrel.on('rcpt_to', function(txn, rcpt) petrel.sleep(5) end)\n";

static void
test_hooks_cancel_drops_the_pending_stage(void **state)
{
    (void)state;
    struct t_env e;
    env_open(&e, sleep_script);
    struct hook_session *hs = session(&e);
    struct got g = { 0 };
    hook_rcpt(hs, "a@b.test", NULL, true, on_verdict, &g);
    uv_run(&e.loop, UV_RUN_NOWAIT);
    assert_true(hook_pending(hs));
    hook_session_cancel(hs);
    assert_false(hook_pending(hs));
    for (int i = 0; i < 5; i++)
        uv_run(&e.loop, UV_RUN_NOWAIT);
    assert_int_equal(g.n, 0);
    /* the session is usable again */
    hook_rcpt(hs, "a@b.test", NULL, true, on_verdict, &g);
    hook_session_free(hs); /* pending: freed without a callback */
    env_close(&e);
    assert_int_equal(g.n, 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_hooks_no_script_no_session),
        cmocka_unit_test(test_hooks_stage_verdicts),
        cmocka_unit_test(test_hooks_eom_adds_headers_at_the_end_of_the_header_section),
        cmocka_unit_test(test_hooks_cancel_drops_the_pending_stage),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
