/*
 * fake_hooks — see fake_hooks.h. The hooked paths are also covered end to
 * end by test_hooks (the registry with real Lua) and the integration tests
 * with real Lua, milters and plugins.
 */
#include "fake_hooks.h"

#include <stdio.h>
#include <string.h>

struct hook_session {
    int unused;
};

static struct hook_session fake_session;
static const struct fake_hook_plan *fake_plan;
static size_t fake_nplan;
static bool fake_on;
static const char *fake_eom_content;
static const struct milter_mods *fake_mods;
static struct milter_mods fake_no_mods;
static char fake_trace[1024];

/* the stage waiting for fake_hooks_complete() */
static enum plugin_hook fake_point = PLUGIN_HOOK_COUNT;
static char fake_subject[512];
static hook_verdict_cb *fake_vcb;
static hook_eom_cb *fake_ecb;
static void *fake_arg;
static struct span fake_in;

void
fake_hooks_plan(const struct fake_hook_plan *plan, size_t n, const char *eom_content,
                const struct milter_mods *mods)
{
    fake_plan = plan;
    fake_nplan = n;
    fake_on = true;
    fake_eom_content = eom_content;
    fake_mods = mods;
    fake_trace[0] = '\0';
}

void
fake_hooks_reset(void)
{
    fake_on = false;
    fake_plan = NULL;
    fake_nplan = 0;
    fake_point = PLUGIN_HOOK_COUNT;
}

const char *
fake_hooks_trace(void)
{
    return fake_trace;
}

bool
fake_hooks_pending(void)
{
    return fake_point != PLUGIN_HOOK_COUNT;
}

static void
fake_begin(enum plugin_hook p, const char *name, const char *subject, void *arg)
{
    if (fake_point != PLUGIN_HOOK_COUNT)
        PANIC("fake_hooks: a stage started while another is pending");
    fake_point = p;
    fake_arg = arg;
    snprintf(fake_subject, sizeof(fake_subject), "%s", subject ? subject : "");
    size_t o = strlen(fake_trace);
    snprintf(fake_trace + o, sizeof(fake_trace) - o, "%s%s%s%s", o ? " " : "", name,
             subject ? ":" : "", subject ? subject : "");
}

bool
fake_hooks_complete(void)
{
    if (fake_point == PLUGIN_HOOK_COUNT)
        return false;
    enum plugin_hook p = fake_point;
    fake_point = PLUGIN_HOOK_COUNT;
    struct verdict v;
    verdict_init(&v);
    for (size_t i = 0; i < fake_nplan; i++) {
        const struct fake_hook_plan *pl = &fake_plan[i];
        if (pl->point != p || (pl->subject && strcmp(pl->subject, fake_subject) != 0))
            continue;
        if (pl->kind == VERDICT_REJECT || pl->kind == VERDICT_TEMPFAIL)
            verdict_setf(&v, pl->kind, pl->code, pl->esc, "%s", pl->text);
        else if (pl->kind == VERDICT_QUARANTINE)
            verdict_setf(&v, pl->kind, 0, "", "%s", pl->text);
        else
            verdict_set(&v, pl->kind, NULL);
        break;
    }
    if (p == PLUGIN_HOOK_DATA) {
        bool changed = fake_eom_content != NULL && v.kind == VERDICT_CONTINUE;
        struct hook_eom_result r = {
            .verdict = &v,
            .changed = changed,
            .content = changed ? (struct span){ fake_eom_content, strlen(fake_eom_content) }
                               : fake_in,
            .envelope = fake_mods && v.kind == VERDICT_CONTINUE ? fake_mods : &fake_no_mods,
        };
        fake_ecb(&fake_session, &r, fake_arg);
    } else {
        fake_vcb(&fake_session, &v, fake_arg);
    }
    verdict_clear(&v);
    return true;
}

struct hook_session *
hook_session_new(struct hooks *h, const struct listener_config *lc, const struct hook_conn *ci)
{
    (void)h, (void)lc, (void)ci;
    return fake_on ? &fake_session : NULL;
}

void
hook_session_free(struct hook_session *hs)
{
    (void)hs;
}

bool
hook_wants(const struct hook_session *hs, enum plugin_hook p)
{
    return hs != NULL
           && (p == PLUGIN_HOOK_CONNECT || p == PLUGIN_HOOK_HELO || p == PLUGIN_HOOK_MAIL_FROM
               || p == PLUGIN_HOOK_RCPT_TO || p == PLUGIN_HOOK_DATA);
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
    (void)hs;
    fake_vcb = cb;
    fake_begin(PLUGIN_HOOK_CONNECT, "connect", NULL, arg);
}

void
hook_helo(struct hook_session *hs, const char *helo, hook_verdict_cb *cb, void *arg)
{
    (void)hs;
    fake_vcb = cb;
    fake_begin(PLUGIN_HOOK_HELO, "helo", helo, arg);
}

void
hook_mail(struct hook_session *hs, const char *sender, const char *params, hook_verdict_cb *cb,
          void *arg)
{
    (void)hs, (void)params;
    fake_vcb = cb;
    fake_begin(PLUGIN_HOOK_MAIL_FROM, "mail", sender, arg);
}

void
hook_txn_begin(struct hook_session *hs, const char *sender, const char *params)
{
    (void)hs, (void)sender, (void)params;
}

void
hook_rcpt(struct hook_session *hs, const char *rcpt, const char *params, bool relay_ok,
          hook_verdict_cb *cb, void *arg)
{
    (void)hs, (void)params, (void)relay_ok;
    fake_vcb = cb;
    fake_begin(PLUGIN_HOOK_RCPT_TO, "rcpt", rcpt, arg);
}

void
hook_data(struct hook_session *hs, hook_verdict_cb *cb, void *arg)
{
    (void)hs, (void)cb, (void)arg;
    PANIC("fake_hooks: hook_data without a milter");
}

void
hook_eom(struct hook_session *hs, struct span content, const char *qid, uint64_t size,
         hook_eom_cb *cb, void *arg)
{
    (void)hs, (void)qid, (void)size;
    fake_ecb = cb;
    fake_in = content;
    fake_begin(PLUGIN_HOOK_DATA, "eom", NULL, arg);
}

void
hook_abort(struct hook_session *hs)
{
    (void)hs;
}

bool
hook_pending(const struct hook_session *hs)
{
    return hs != NULL && fake_point != PLUGIN_HOOK_COUNT;
}

void
hook_session_cancel(struct hook_session *hs)
{
    (void)hs;
    fake_point = PLUGIN_HOOK_COUNT;
    size_t o = strlen(fake_trace);
    snprintf(fake_trace + o, sizeof(fake_trace) - o, " cancel");
}

void
hook_xbind(struct hook_session *hs, const char *ip, const char *hostname, hook_allow_cb *cb,
           void *arg)
{
    (void)hs, (void)ip, (void)hostname, (void)cb, (void)arg;
    PANIC("fake_hooks: xbind is not scripted");
}

void
hook_auth(struct hook_session *hs, const char *user, const char *password, hook_allow_cb *cb,
          void *arg)
{
    (void)hs, (void)user, (void)password, (void)cb, (void)arg;
    PANIC("fake_hooks: auth is not scripted");
}
