/*
 * fake_hooks — stands in for core/hooks.c in the smtp_server unit tests:
 * no Lua, no milter, no plugin, so no session is ever hooked
 * (hook_session_new returns NULL and every stage is a no-op). The hooked
 * paths are covered by test_hooks (the registry with real Lua) and by the
 * integration tests with real engines.
 */
#include "hooks.h"

#define FAKE_UNREACHABLE() PANIC("fake_hooks: a stage was started on a NULL hook session")

struct hook_session *
hook_session_new(struct hooks *h, const struct listener_config *lc, const struct hook_conn *ci)
{
    (void)h, (void)lc, (void)ci;
    return NULL;
}

void
hook_session_free(struct hook_session *hs)
{
    (void)hs;
}

bool
hook_wants(const struct hook_session *hs, enum plugin_hook p)
{
    (void)hs, (void)p;
    return false;
}

bool
hook_wants_data_command(const struct hook_session *hs)
{
    (void)hs;
    return false;
}

void
hook_session_set(struct hook_session *hs, const char *name, const char *value)
{
    (void)hs, (void)name, (void)value;
}

void
hook_connect(struct hook_session *hs, hook_verdict_cb *cb, void *arg)
{
    (void)hs, (void)cb, (void)arg;
    FAKE_UNREACHABLE();
}

void
hook_helo(struct hook_session *hs, const char *helo, hook_verdict_cb *cb, void *arg)
{
    (void)hs, (void)helo, (void)cb, (void)arg;
    FAKE_UNREACHABLE();
}

void
hook_mail(struct hook_session *hs, const char *sender, const char *params, hook_verdict_cb *cb,
          void *arg)
{
    (void)hs, (void)sender, (void)params, (void)cb, (void)arg;
    FAKE_UNREACHABLE();
}

void
hook_rcpt(struct hook_session *hs, const char *rcpt, const char *params, bool relay_ok,
          hook_verdict_cb *cb, void *arg)
{
    (void)hs, (void)rcpt, (void)params, (void)relay_ok, (void)cb, (void)arg;
    FAKE_UNREACHABLE();
}

void
hook_data(struct hook_session *hs, hook_verdict_cb *cb, void *arg)
{
    (void)hs, (void)cb, (void)arg;
    FAKE_UNREACHABLE();
}

void
hook_eom(struct hook_session *hs, struct span content, const char *qid, uint64_t size,
         hook_eom_cb *cb, void *arg)
{
    (void)hs, (void)content, (void)qid, (void)size, (void)cb, (void)arg;
    FAKE_UNREACHABLE();
}

void
hook_abort(struct hook_session *hs)
{
    (void)hs;
}

bool
hook_pending(const struct hook_session *hs)
{
    (void)hs;
    return false;
}

void
hook_session_cancel(struct hook_session *hs)
{
    (void)hs;
}

void
hook_xbind(struct hook_session *hs, const char *ip, const char *hostname, hook_allow_cb *cb,
           void *arg)
{
    (void)hs, (void)ip, (void)hostname, (void)cb, (void)arg;
    FAKE_UNREACHABLE();
}

void
hook_auth(struct hook_session *hs, const char *user, const char *password, hook_allow_cb *cb,
          void *arg)
{
    (void)hs, (void)user, (void)password, (void)cb, (void)arg;
    FAKE_UNREACHABLE();
}

void
hook_txn_begin(struct hook_session *hs, const char *sender, const char *params)
{
    (void)hs, (void)sender, (void)params;
}
