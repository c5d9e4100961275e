/*
 * hooks_delivery — the delivery side of the hook registry (hooks.h, last
 * section): route, select_source, retry, bounce and event, called by the
 * scheduler.
 *
 * One struct hooks_call per call. It owns a deep copy of the caller's
 * plua_args (the caller's are borrowed for the duration of hooks_call()
 * only, and the plugins may be asked after Lua has answered), the pending
 * engine call(s) and the caller's callback.
 *
 * Order: the Lua hook first; when it answers nothing (no such hook, nil,
 * or a result without the point's field) the plugins, if one of them
 * handles the point. A Lua failure (PLUA_ERROR, already logged by the
 * bridge) is the answer: the caller falls back to its built-in behaviour.
 * EVENT goes to Lua and the plugins side by side; the callback (if any)
 * follows the last of them. An engine without a handler for the point is
 * not called; when neither has one, a call to the absent Lua hook answers
 * PLUA_NO_HOOK from a later loop iteration (plua_call's contract), so the
 * callback never fires inside hooks_call().
 *
 * Owns: its calls. Borrows: the registry (which must outlive every call:
 * cancel them before hooks_free()).
 */
#include "hooks.h"

#include <string.h>

#include "util.h"

struct hooks_call {
    struct hooks *h;            /* borrowed: outlives the call */
    enum plugin_hook point;
    struct plua_args args;      /* strings and arrays point into owned storage below */
    char **owned;               /* owned: every string copied into args */
    size_t nowned, capowned;
    struct header_field *headers;  /* owned (the array; strings in owned) */
    struct plua_failure *failures; /* owned (same) */
    struct plua_call *lcall;    /* pending Lua call, or NULL */
    struct plugin_call *pcall;  /* pending plugin call, or NULL */
    unsigned pending;           /* engines still running (EVENT: up to 2) */
    hooks_done_cb *cb;          /* may be NULL */
    void *arg;
    bool in_cb;                 /* the callback runs: cancel is a no-op */
};

/* ---- argument copies ---------------------------------------------------- */

static const char *
hd_dup(struct hooks_call *c, const char *s)
{
    if (s == NULL)
        return NULL;
    if (c->nowned == c->capowned) {
        c->capowned = c->capowned ? c->capowned * 2 : 16;
        c->owned = xreallocarray(c->owned, c->capowned, sizeof(*c->owned));
    }
    char *d = xstrdup(s);
    c->owned[c->nowned++] = d;
    return d;
}

static void
hd_copy_args(struct hooks_call *c, const struct plua_args *a)
{
    struct plua_args *d = &c->args;
    *d = *a;
    const char **strs[] = {
        &d->ip,        &d->local_ip,       &d->listener,    &d->helo,      &d->user,
        &d->password,  &d->from,           &d->params,      &d->rcpt,      &d->queue_id,
        &d->xbind_ip,  &d->xbind_hostname, &d->destination, &d->reply_esc, &d->reply_text,
        &d->event_type,
    };
    for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++)
        *strs[i] = hd_dup(c, *strs[i]);
    d->headers = NULL;
    if (a->nheaders > 0 && a->headers != NULL) {
        c->headers = xcalloc(a->nheaders, sizeof(*c->headers));
        for (size_t i = 0; i < a->nheaders; i++) {
            c->headers[i].name = hd_dup(c, a->headers[i].name);
            c->headers[i].value = hd_dup(c, a->headers[i].value);
        }
        d->headers = c->headers;
    } else {
        d->nheaders = 0;
    }
    d->failures = NULL;
    if (a->nfailures > 0 && a->failures != NULL) {
        c->failures = xcalloc(a->nfailures, sizeof(*c->failures));
        for (size_t i = 0; i < a->nfailures; i++) {
            c->failures[i] = a->failures[i];
            c->failures[i].rcpt = hd_dup(c, a->failures[i].rcpt);
            c->failures[i].esc = hd_dup(c, a->failures[i].esc);
            c->failures[i].text = hd_dup(c, a->failures[i].text);
        }
        d->failures = c->failures;
    } else {
        d->nfailures = 0;
    }
}

static void
hd_free(struct hooks_call *c)
{
    for (size_t i = 0; i < c->nowned; i++)
        free(c->owned[i]);
    free(c->owned);
    free(c->headers);
    free(c->failures);
    free(c);
}

/* ---- completion --------------------------------------------------------- */

/* Whether res carries the point's answer (else the next engine is asked). */
static bool
hd_answered(enum plugin_hook p, const struct plua_result *res)
{
    if (res->status == PLUA_ERROR)
        return true; /* the built-in behaviour: asking a plugin instead would hide it */
    if (res->status != PLUA_OK)
        return false;
    switch (p) {
    case PLUGIN_HOOK_ROUTE:
        return res->route != NULL;
    case PLUGIN_HOOK_SELECT_SOURCE:
        return res->source_ip != NULL;
    case PLUGIN_HOOK_RETRY:
        return res->retry_set;
    case PLUGIN_HOOK_BOUNCE:
        return res->subject != NULL || res->text != NULL;
    default:
        return true;
    }
}

static void
hd_deliver(struct hooks_call *c, struct plua_result *res)
{
    c->in_cb = true;
    if (c->cb != NULL)
        c->cb(c, res, c->arg);
    hd_free(c);
}

static void hd_on_plugin(struct plugin_call *pc, struct plua_result *res, void *arg);

static void
hd_start_plugins(struct hooks_call *c)
{
    c->pending++;
    c->pcall = plugin_call(hooks_plugins(c->h), c->point, &c->args, hd_on_plugin, c);
}

static void
hd_on_lua(struct plua_call *lc, struct plua_result *res, void *arg)
{
    struct hooks_call *c = arg;
    (void)lc;
    c->lcall = NULL;
    c->pending--;
    if (c->point == PLUGIN_HOOK_EVENT) {
        if (c->pending == 0)
            hd_deliver(c, res);
        return;
    }
    if (hd_answered(c->point, res) || !plugins_have(hooks_plugins(c->h), c->point)) {
        hd_deliver(c, res);
        return;
    }
    hd_start_plugins(c); /* Lua had nothing to say: the plugins */
}

static void
hd_on_plugin(struct plugin_call *pc, struct plua_result *res, void *arg)
{
    struct hooks_call *c = arg;
    (void)pc;
    c->pcall = NULL;
    c->pending--;
    if (c->pending == 0)
        hd_deliver(c, res);
}

/* ---- API ---------------------------------------------------------------- */

struct hooks_call *
hooks_call(struct hooks *h, enum plugin_hook p, const struct plua_args *args, hooks_done_cb *cb,
           void *arg)
{
    if (p != PLUGIN_HOOK_ROUTE && p != PLUGIN_HOOK_SELECT_SOURCE && p != PLUGIN_HOOK_RETRY
        && p != PLUGIN_HOOK_BOUNCE && p != PLUGIN_HOOK_EVENT)
        PANIC("hooks_call: %s is not a delivery hook", plugin_hook_name(p));
    struct hooks_call *c = xcalloc(1, sizeof(*c));
    c->h = h;
    c->point = p;
    c->cb = cb;
    c->arg = arg;
    hd_copy_args(c, args);
    struct plua *lua = hooks_lua(h);
    const char *name = plugin_hook_name(p);
    bool lua_has = lua != NULL && plua_has_hook(lua, name);
    bool plugins_has = plugins_have(hooks_plugins(h), p);
    /* Lua when it has the hook, or when nobody has: the absent hook then
     * completes from the loop with PLUA_NO_HOOK (no loop of our own). */
    if (lua_has || (!plugins_has && lua != NULL)) {
        c->pending++;
        c->lcall = plua_call(lua, name, &c->args, hd_on_lua, c);
    }
    /* EVENT: every engine at once. Otherwise the plugins when Lua has no
     * hook (after a Lua answer of nil they are asked from hd_on_lua). */
    if ((plugins_has && (!lua_has || p == PLUGIN_HOOK_EVENT)) || c->pending == 0)
        hd_start_plugins(c);
    return c;
}

void
hooks_call_cancel(struct hooks_call *c)
{
    if (c == NULL || c->in_cb)
        return;
    if (c->lcall != NULL)
        plua_cancel(c->lcall);
    if (c->pcall != NULL)
        plugin_call_cancel(c->pcall);
    hd_free(c);
}
