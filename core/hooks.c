/*
 * hooks — the registry (see hooks.h): sequences the Lua hook, the milters
 * and the C plugins at each SMTP stage, one engine after the other, and
 * folds their answers into one verdict.
 *
 * A stage is a small state machine on the session: STEP_LUA → STEP_MILTER
 * → STEP_PLUGIN → done, each step asynchronous (plua_call, the milter stage
 * call, plugin_call all complete from a later loop iteration). A step whose
 * engine has nothing to do is skipped; when no step had anything to do the
 * completion still comes from a later loop iteration (a zero timer), so the
 * caller sees one behaviour.
 *
 * Ownership: the registry owns the Lua engine and the plugin set and holds
 * a reference on its config. A session owns its milter session, its copies
 * of the connection and transaction facts the views show, and, at end of
 * message, the modified content and the envelope changes.
 */
#include "hooks.h"

#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "buf.h"
#include "config.h"
#include "log.h"
#include "reply.h"
#include "timer.h"
#include "util.h"

struct hooks {
    struct uv_loop_s *loop;      /* borrowed */
    struct petrel_config *cfg;   /* owned reference */
    struct dns *dns;             /* borrowed */
    struct plua *lua;            /* owned; always set (a state without a script has no hooks) */
    struct plugins *plugins;     /* owned; never NULL */
};

enum hook_stage { HS_NONE, HS_CONNECT, HS_HELO, HS_MAIL, HS_RCPT, HS_DATA, HS_EOM, HS_AUTH,
                  HS_XBIND };
enum hook_step { STEP_LUA, STEP_MILTER, STEP_PLUGIN, STEP_DONE };

#define HOOK_FACTS 6

struct hook_session {
    struct hooks *h;                   /* borrowed: outlives sessions */
    const struct listener_config *lc;  /* borrowed from the session's config */
    struct milter_session *ms;         /* owned or NULL */
    uint64_t session_id;
    /* the views (owned copies) */
    char *client_ip, *local_ip;
    int client_port;
    char *helo;
    char *sender, *params;             /* current transaction, NULL outside one */
    char *facts[HOOK_FACTS];           /* hook_session_set values, by hook_fact_names */
    /* the stage in progress */
    enum hook_stage stage;
    enum hook_step step;
    bool ran;                          /* some engine ran in this stage */
    struct plua_call *lcall;           /* pending Lua call */
    struct plugin_call *pcall;         /* pending plugin call */
    bool mpending;                     /* a milter stage call is pending */
    struct timer *idle;                /* owned, lazily: completes a stage that did nothing */
    hook_verdict_cb *vcb;
    hook_eom_cb *ecb;
    hook_allow_cb *acb;
    void *arg;
    struct verdict v;                  /* the stage's verdict so far */
    bool has_answer, allow;            /* auth / xbind */
    char *rcpt, *rcpt_params;          /* HS_RCPT (owned) */
    bool relay_ok;
    bool relay_granted;
    bool ran_plugins_first;            /* HS_RCPT: plugins asked before milters (relay) */
    char *a1, *a2;                     /* HS_AUTH user/password, HS_XBIND ip/hostname (owned) */
    /* end of message */
    struct span in;                    /* borrowed from the caller until the callback */
    struct buf content;                /* owned: the modified message when changed */
    bool changed;
    uint64_t size;
    char *qid;                         /* owned */
    const struct milter_mods *mods;    /* borrowed from ms until the next stage */
    struct milter_mods no_mods;        /* empty, for the result */
};

static const char *const hook_fact_names[HOOK_FACTS] = {
    "i", "{auth_type}", "{auth_authen}", "{tls_version}", "{cipher}", "{cipher_bits}",
};

static void hook_step(struct hook_session *hs);

/* ---- registry ---------------------------------------------------------- */

/* Prefixes a Lua load error with the key it came from. */
static void
hooks_lua_error(char **err)
{
    char *why = xasprintf("lua.script: %s", *err ? *err : "cannot load");
    free(*err);
    *err = why;
}

struct hooks *
hooks_new(struct uv_loop_s *loop, struct petrel_config *cfg, struct dns *dns, char **err)
{
    *err = NULL;
    struct plua *lua = plua_open(loop, cfg, dns, err);
    if (lua == NULL) {
        hooks_lua_error(err);
        return NULL;
    }
    struct plugins *ps = plugins_load(loop, cfg, err);
    if (ps == NULL) {
        plua_close(lua);
        return NULL;
    }
    struct hooks *h = xcalloc(1, sizeof(*h));
    h->loop = loop;
    h->cfg = config_ref(cfg);
    h->dns = dns;
    h->lua = lua;
    h->plugins = ps;
    return h;
}

int
hooks_reload(struct hooks *h, struct petrel_config *cfg, char **err)
{
    *err = NULL;
    if (plua_reload(h->lua, cfg, err) < 0) {
        hooks_lua_error(err);
        return -1;
    }
    config_unref(h->cfg);
    h->cfg = config_ref(cfg);
    return 0;
}

void
hooks_free(struct hooks *h)
{
    if (h == NULL)
        return;
    plua_close(h->lua);
    plugins_free(h->plugins);
    config_unref(h->cfg);
    free(h);
}

struct plua *
hooks_lua(const struct hooks *h)
{
    return h->lua;
}

struct plugins *
hooks_plugins(const struct hooks *h)
{
    return h->plugins;
}

const struct petrel_config *
hooks_config(const struct hooks *h)
{
    return h->cfg;
}

bool
hooks_have(const struct hooks *h, enum plugin_hook p)
{
    if (h == NULL)
        return false;
    const char *name = plugin_hook_name(p);
    return (name != NULL && plua_has_hook(h->lua, name)) || plugins_have(h->plugins, p);
}

/* ---- session ----------------------------------------------------------- */

struct hook_session *
hook_session_new(struct hooks *h, const struct listener_config *lc, const struct hook_conn *ci)
{
    if (h == NULL)
        return NULL;
    struct milter_session *ms = NULL;
    if (h->cfg->nmilters > 0) {
        struct milter_conn_info mi = {
            .session_id = NULL,
            .family = ci->family,
            .client_addr = ci->client_ip,
            .client_port = ci->client_port,
            .client_name = ci->client_name,
            .local_addr = ci->local_ip,
            .local_port = ci->local_port,
        };
        char sid[24];
        snprintf(sid, sizeof(sid), "%llu", (unsigned long long)ci->session_id);
        mi.session_id = sid;
        ms = milter_session_new(h->loop, h->cfg, lc, &mi);
    }
    static const enum plugin_hook session_points[] = {
        PLUGIN_HOOK_CONNECT, PLUGIN_HOOK_HELO, PLUGIN_HOOK_AUTH, PLUGIN_HOOK_MAIL_FROM,
        PLUGIN_HOOK_RCPT_TO, PLUGIN_HOOK_DATA, PLUGIN_HOOK_XBIND,
    };
    bool any = ms != NULL;
    for (size_t i = 0; !any && i < ARRAY_SIZE(session_points); i++)
        any = hooks_have(h, session_points[i]);
    if (!any)
        return NULL;
    struct hook_session *hs = xcalloc(1, sizeof(*hs));
    hs->h = h;
    hs->lc = lc;
    hs->ms = ms;
    hs->session_id = ci->session_id;
    hs->client_ip = ci->client_ip ? xstrdup(ci->client_ip) : NULL;
    hs->local_ip = ci->local_ip ? xstrdup(ci->local_ip) : NULL;
    hs->client_port = ci->client_port;
    verdict_init(&hs->v);
    buf_init(&hs->content);
    return hs;
}

static void
hook_cancel_step(struct hook_session *hs)
{
    plua_cancel(hs->lcall);
    hs->lcall = NULL;
    plugin_call_cancel(hs->pcall);
    hs->pcall = NULL;
    if (hs->idle)
        timer_stop(hs->idle);
    hs->stage = HS_NONE;
}

static void
hook_txn_clear(struct hook_session *hs)
{
    free(hs->sender);
    hs->sender = NULL;
    free(hs->params);
    hs->params = NULL;
    free(hs->qid);
    hs->qid = NULL;
    buf_reset(&hs->content);
    hs->changed = false;
    hs->mods = NULL;
}

void
hook_session_free(struct hook_session *hs)
{
    if (hs == NULL)
        return;
    hook_cancel_step(hs);
    /* milter_session_free drops a pending stage call without its callback */
    milter_session_free(hs->ms);
    timer_free(hs->idle);
    hook_txn_clear(hs);
    free(hs->client_ip);
    free(hs->local_ip);
    free(hs->helo);
    for (size_t i = 0; i < HOOK_FACTS; i++)
        free(hs->facts[i]);
    free(hs->rcpt);
    free(hs->rcpt_params);
    free(hs->a1);
    free(hs->a2);
    verdict_clear(&hs->v);
    buf_reset(&hs->content);
    free(hs);
}

void
hook_session_cancel(struct hook_session *hs)
{
    if (hs == NULL || hs->stage == HS_NONE)
        return;
    hook_cancel_step(hs);
    if (hs->mpending) {
        /* the milter engine has no per-call cancel: the filters cannot be
         * trusted to be in step any more, so they go (QUIT) */
        milter_session_free(hs->ms);
        hs->ms = NULL;
        hs->mpending = false;
    }
}

bool
hook_pending(const struct hook_session *hs)
{
    return hs != NULL && hs->stage != HS_NONE;
}

static enum plugin_hook
hook_point_of(enum hook_stage st)
{
    switch (st) {
    case HS_CONNECT: return PLUGIN_HOOK_CONNECT;
    case HS_HELO: return PLUGIN_HOOK_HELO;
    case HS_MAIL: return PLUGIN_HOOK_MAIL_FROM;
    case HS_RCPT: return PLUGIN_HOOK_RCPT_TO;
    case HS_DATA:
    case HS_EOM: return PLUGIN_HOOK_DATA;
    case HS_AUTH: return PLUGIN_HOOK_AUTH;
    case HS_XBIND: return PLUGIN_HOOK_XBIND;
    case HS_NONE: break;
    }
    return PLUGIN_HOOK_COUNT;
}

bool
hook_wants(const struct hook_session *hs, enum plugin_hook p)
{
    if (hs == NULL)
        return false;
    if (hs->ms != NULL
        && (p == PLUGIN_HOOK_CONNECT || p == PLUGIN_HOOK_HELO || p == PLUGIN_HOOK_MAIL_FROM
            || p == PLUGIN_HOOK_RCPT_TO || p == PLUGIN_HOOK_DATA))
        return true;
    return hooks_have(hs->h, p);
}

bool
hook_wants_data_command(const struct hook_session *hs)
{
    return hs != NULL && hs->ms != NULL;
}

void
hook_session_set(struct hook_session *hs, const char *name, const char *value)
{
    if (hs == NULL)
        return;
    for (size_t i = 0; i < HOOK_FACTS; i++) {
        if (strcmp(hook_fact_names[i], name) != 0)
            continue;
        free(hs->facts[i]);
        hs->facts[i] = value ? xstrdup(value) : NULL;
    }
    if (hs->ms != NULL)
        milter_set_macro(hs->ms, name, value);
}

static const char *
hook_fact(const struct hook_session *hs, const char *name)
{
    for (size_t i = 0; i < HOOK_FACTS; i++)
        if (strcmp(hook_fact_names[i], name) == 0)
            return hs->facts[i];
    return NULL;
}

/* ---- header section helpers ------------------------------------------ */

/* The message as the engines before have left it. */
static struct span
hook_current(const struct hook_session *hs)
{
    return hs->changed ? (struct span){ buf_ptr(&hs->content), hs->content.len } : hs->in;
}

/* Makes out (taken over) the current message. */
static void
hook_set_content(struct hook_session *hs, struct buf *out)
{
    buf_reset(&hs->content);
    hs->content = *out;
    hs->changed = true;
}

/* Appends the headers (name: value, CR/LF in values replaced by spaces) at
 * the end of the header section of hs's current message. */
static void
hook_add_headers(struct hook_session *hs, const struct header_field *add, size_t n)
{
    if (n == 0)
        return;
    struct span cur = hook_current(hs);
    size_t end = header_section_end(cur);
    struct buf out;
    buf_init(&out);
    buf_append(&out, cur.p, end);
    if (end == cur.len && end > 0 && cur.p[end - 1] != '\n')
        buf_append_str(&out, "\r\n");
    for (size_t i = 0; i < n; i++) {
        buf_append_str(&out, add[i].name);
        buf_append_str(&out, ": ");
        for (const char *p = add[i].value; *p; p++)
            buf_append(&out, (*p == '\r' || *p == '\n') ? " " : p, 1);
        buf_append_str(&out, "\r\n");
    }
    buf_append(&out, cur.p + end, cur.len - end);
    hook_set_content(hs, &out);
}

/* ---- stage machinery ---------------------------------------------------- */

static void
hook_args(const struct hook_session *hs, struct plua_args *a)
{
    memset(a, 0, sizeof(*a));
    a->ip = hs->client_ip;
    a->port = hs->client_port;
    a->local_ip = hs->local_ip;
    a->listener = hs->lc ? hs->lc->name : NULL;
    a->helo = hs->helo;
    a->from = hs->sender;
    a->params = hs->params;
    a->queue_id = hook_fact(hs, "i");
    a->user = hook_fact(hs, "{auth_authen}");
}

static void
hook_finish(struct hook_session *hs)
{
    enum hook_stage st = hs->stage;
    hs->stage = HS_NONE;
    switch (st) {
    case HS_EOM: {
        struct hook_eom_result r = {
            .verdict = &hs->v,
            .changed = hs->changed,
            .content = hook_current(hs),
            .envelope = hs->mods ? hs->mods : &hs->no_mods,
        };
        hs->ecb(hs, &r, hs->arg);
        return;
    }
    case HS_AUTH:
    case HS_XBIND:
        if (st == HS_AUTH && hs->a2 != NULL) {
            explicit_bzero(hs->a2, strlen(hs->a2));
            free(hs->a2);
            hs->a2 = NULL;
        }
        hs->acb(hs, hs->has_answer, hs->allow, hs->arg);
        return;
    default:
        hs->vcb(hs, &hs->v, hs->arg);
        return;
    }
}

static void
hook_on_idle(struct timer *t, void *arg)
{
    (void)t;
    hook_step(arg);
}

/* Folds an engine's verdict into the stage's: an objection ends the chain. */
static bool
hook_objects(const struct verdict *v)
{
    return v->kind == VERDICT_REJECT || v->kind == VERDICT_TEMPFAIL
           || v->kind == VERDICT_DISCARD || v->kind == VERDICT_QUARANTINE;
}

static void
hook_take_result(struct hook_session *hs, struct plua_result *res, bool lua)
{
    if (res->status == PLUA_NO_HOOK)
        return;
    switch (hs->stage) {
    case HS_AUTH:
    case HS_XBIND:
        if (res->status == PLUA_ERROR) {
            if (!hs->has_answer) {
                hs->has_answer = true;
                hs->allow = false;
            }
        } else if (!hs->has_answer && (!lua || res->answered)) {
            /* Lua's nil is no answer; a plugin set that answered nothing
             * reports PLUA_NO_HOOK */
            hs->has_answer = true;
            hs->allow = res->allow;
        }
        return;
    case HS_EOM:
        if (res->status == PLUA_OK)
            hook_add_headers(hs, res->add_headers, res->nadd_headers);
        break;
    default:
        break;
    }
    if (res->verdict.kind == VERDICT_ACCEPT && hs->stage == HS_RCPT)
        hs->relay_granted = true;
    if (hook_objects(&res->verdict))
        verdict_move(&hs->v, &res->verdict);
}

static void
hook_on_lua(struct plua_call *c, struct plua_result *res, void *arg)
{
    (void)c;
    struct hook_session *hs = arg;
    hs->lcall = NULL;
    hook_take_result(hs, res, true);
    hs->step = STEP_MILTER;
    hook_step(hs);
}

static void
hook_on_plugin(struct plugin_call *c, struct plua_result *res, void *arg)
{
    (void)c;
    struct hook_session *hs = arg;
    hs->pcall = NULL;
    hook_take_result(hs, res, false);
    if (hs->step == STEP_PLUGIN) /* else: asked early for relay, at STEP_MILTER */
        hs->step = STEP_DONE;
    hook_step(hs);
}

static void
hook_on_milter(struct milter_session *ms, const struct verdict *v, void *arg)
{
    (void)ms;
    struct hook_session *hs = arg;
    hs->mpending = false;
    if (v->kind != VERDICT_CONTINUE && v->kind != VERDICT_ACCEPT)
        verdict_copy(&hs->v, v);
    hs->step = STEP_PLUGIN;
    hook_step(hs);
}

static void
hook_on_milter_eom(struct milter_session *ms, const struct verdict *v,
                   const struct milter_mods *mods, void *arg)
{
    (void)ms;
    struct hook_session *hs = arg;
    hs->mpending = false;
    if (v->kind != VERDICT_CONTINUE && v->kind != VERDICT_ACCEPT) {
        verdict_copy(&hs->v, v);
    } else {
        hs->mods = mods;
        if (mods->content) {
            struct buf out;
            buf_init(&out);
            milter_apply_mods(mods, hook_current(hs), &out);
            hook_set_content(hs, &out);
        }
        if (mods->quarantine != NULL)
            verdict_setf(&hs->v, VERDICT_QUARANTINE, 0, "", "%s", mods->quarantine);
    }
    hs->step = STEP_PLUGIN;
    hook_step(hs);
}

/* The view of the stage in progress for Lua or the plugins; *hv and
 * *store (header fields at end of message) are the caller's to free. */
static void
hook_stage_args(const struct hook_session *hs, struct plua_args *a, struct header_field **hv,
                char **store)
{
    hook_args(hs, a);
    *hv = NULL;
    *store = NULL;
    switch (hs->stage) {
    case HS_RCPT:
        a->rcpt = hs->rcpt;
        break;
    case HS_EOM:
        *hv = header_parse(hook_current(hs), &a->nheaders, store);
        a->headers = *hv;
        a->size = hs->changed ? hs->content.len : hs->size;
        break;
    case HS_AUTH:
        a->user = hs->a1;
        a->password = hs->a2;
        break;
    case HS_XBIND:
        a->xbind_ip = hs->a1;
        a->xbind_hostname = hs->a2;
        break;
    default:
        break;
    }
}

/* Starts the Lua call of the stage, or returns false if there is none. */
static bool
hook_start_lua(struct hook_session *hs)
{
    enum plugin_hook p = hook_point_of(hs->stage);
    if (hs->stage == HS_DATA || !plua_has_hook(hs->h->lua, plugin_hook_name(p)))
        return false;
    struct plua_args a;
    struct header_field *hv;
    char *store;
    hook_stage_args(hs, &a, &hv, &store);
    hs->ran = true;
    hs->lcall = plua_call(hs->h->lua, plugin_hook_name(p), &a, hook_on_lua, hs);
    free(hv);
    free(store);
    return true;
}

static bool
hook_start_plugin(struct hook_session *hs)
{
    enum plugin_hook p = hook_point_of(hs->stage);
    if (hs->stage == HS_DATA || !plugins_have(hs->h->plugins, p))
        return false;
    struct plua_args a;
    struct header_field *hv;
    char *store;
    hook_stage_args(hs, &a, &hv, &store);
    hs->ran = true;
    hs->pcall = plugin_call(hs->h->plugins, p, &a, hook_on_plugin, hs);
    free(hv);
    free(store);
    return true;
}

static bool
hook_start_milter(struct hook_session *hs)
{
    if (hs->ms == NULL)
        return false;
    hs->mpending = true;
    hs->ran = true;
    switch (hs->stage) {
    case HS_CONNECT:
        milter_connect(hs->ms, hook_on_milter, hs);
        return true;
    case HS_HELO:
        milter_helo(hs->ms, hs->helo, hook_on_milter, hs);
        return true;
    case HS_MAIL:
        milter_mail(hs->ms, hs->sender, hs->params, hook_on_milter, hs);
        return true;
    case HS_RCPT:
        milter_rcpt(hs->ms, hs->rcpt, hs->rcpt_params, hook_on_milter, hs);
        return true;
    case HS_DATA:
        milter_data(hs->ms, hook_on_milter, hs);
        return true;
    case HS_EOM:
        milter_eom(hs->ms, hook_current(hs), hs->qid, hook_on_milter_eom, hs);
        return true;
    default:
        hs->mpending = false;
        return false;
    }
}

/* Runs the next step of the stage in progress. */
static void
hook_step(struct hook_session *hs)
{
    for (;;) {
        if (hs->step != STEP_DONE && hook_objects(&hs->v))
            hs->step = STEP_DONE;
        switch (hs->step) {
        case STEP_LUA:
            if (hook_start_lua(hs))
                return;
            hs->step = STEP_MILTER;
            continue;
        case STEP_MILTER:
            if (hs->stage == HS_RCPT && !hs->relay_ok && !hs->relay_granted) {
                /* petrel would refuse this relaying: a plugin may still
                 * grant it (ACCEPT) before the milters see the recipient */
                if (plugins_have(hs->h->plugins, PLUGIN_HOOK_RCPT_TO) && !hs->ran_plugins_first) {
                    hs->ran_plugins_first = true;
                    if (hook_start_plugin(hs))
                        return;
                }
                if (!hs->relay_granted) {
                    verdict_set(&hs->v, VERDICT_REJECT, &R_RELAY_DENIED);
                    hs->step = STEP_DONE;
                    continue;
                }
            }
            if (hook_start_milter(hs))
                return;
            hs->step = STEP_PLUGIN;
            continue;
        case STEP_PLUGIN:
            if (!hs->ran_plugins_first && hook_start_plugin(hs))
                return;
            hs->step = STEP_DONE;
            continue;
        case STEP_DONE:
            if (!hs->ran && hs->stage != HS_NONE) {
                /* nothing ran: complete from a later loop iteration */
                hs->ran = true;
                if (hs->idle == NULL)
                    hs->idle = timer_new(hs->h->loop, hook_on_idle, hs);
                timer_arm(hs->idle, 0);
                return;
            }
            hook_finish(hs);
            return;
        }
    }
}

static void
hook_begin(struct hook_session *hs, enum hook_stage st, void *arg)
{
    if (hs->stage != HS_NONE)
        PANIC("hook stage %d started while %d is pending", (int)st, (int)hs->stage);
    hs->stage = st;
    hs->step = STEP_LUA;
    hs->ran = false;
    hs->ran_plugins_first = false;
    hs->arg = arg;
    verdict_clear(&hs->v);
    hook_step(hs);
}

void
hook_connect(struct hook_session *hs, hook_verdict_cb *cb, void *arg)
{
    hs->vcb = cb;
    hook_begin(hs, HS_CONNECT, arg);
}

void
hook_helo(struct hook_session *hs, const char *helo, hook_verdict_cb *cb, void *arg)
{
    free(hs->helo);
    hs->helo = xstrdup(helo);
    hs->vcb = cb;
    hook_begin(hs, HS_HELO, arg);
}

void
hook_txn_begin(struct hook_session *hs, const char *sender, const char *params)
{
    if (hs == NULL)
        return;
    if (hs->stage != HS_NONE)
        PANIC("hook_txn_begin while stage %d is pending", (int)hs->stage);
    hook_txn_clear(hs);
    hs->sender = xstrdup(sender);
    hs->params = params && params[0] ? xstrdup(params) : NULL;
}

void
hook_mail(struct hook_session *hs, const char *sender, const char *params, hook_verdict_cb *cb,
          void *arg)
{
    hook_txn_begin(hs, sender, params);
    hs->vcb = cb;
    hook_begin(hs, HS_MAIL, arg);
}

void
hook_rcpt(struct hook_session *hs, const char *rcpt, const char *params, bool relay_ok,
          hook_verdict_cb *cb, void *arg)
{
    free(hs->rcpt);
    free(hs->rcpt_params);
    hs->rcpt = xstrdup(rcpt);
    hs->rcpt_params = params && params[0] ? xstrdup(params) : NULL;
    hs->relay_ok = relay_ok;
    hs->relay_granted = false;
    hs->vcb = cb;
    hook_begin(hs, HS_RCPT, arg);
}

void
hook_data(struct hook_session *hs, hook_verdict_cb *cb, void *arg)
{
    hs->vcb = cb;
    hook_begin(hs, HS_DATA, arg);
}

void
hook_eom(struct hook_session *hs, struct span content, const char *qid, uint64_t size,
         hook_eom_cb *cb, void *arg)
{
    buf_reset(&hs->content);
    hs->changed = false;
    hs->mods = NULL;
    hs->in = content;
    hs->size = size;
    free(hs->qid);
    hs->qid = qid ? xstrdup(qid) : NULL;
    hs->ecb = cb;
    hook_begin(hs, HS_EOM, arg);
}

void
hook_abort(struct hook_session *hs)
{
    if (hs == NULL)
        return;
    if (hs->stage != HS_NONE)
        PANIC("hook_abort while stage %d is pending", (int)hs->stage);
    if (hs->ms != NULL)
        milter_abort(hs->ms);
    hook_txn_clear(hs);
}

void
hook_auth(struct hook_session *hs, const char *user, const char *password, hook_allow_cb *cb,
          void *arg)
{
    free(hs->a1);
    free(hs->a2);
    hs->a1 = xstrdup(user);
    hs->a2 = xstrdup(password);
    hs->has_answer = hs->allow = false;
    hs->acb = cb;
    hook_begin(hs, HS_AUTH, arg); /* the password copy is wiped when the stage ends */
}

void
hook_xbind(struct hook_session *hs, const char *ip, const char *hostname, hook_allow_cb *cb,
           void *arg)
{
    free(hs->a1);
    free(hs->a2);
    hs->a1 = xstrdup(ip);
    hs->a2 = hostname ? xstrdup(hostname) : NULL;
    hs->has_answer = hs->allow = false;
    hs->acb = cb;
    hook_begin(hs, HS_XBIND, arg);
}
