/*
 * plugin — the C plugin loader and the host side of the plugin ABI
 * (include/petrel/plugin.h; the only file of core/ that includes it). Owns
 * the dlopen handles, each plugins[] entry's copy of its config map and of
 * the host API table, the calls in progress, and one uv_idle handle that
 * delivers the callbacks of finished calls. What a result means is the
 * caller's business (core/hooks.c).
 *
 * A call: plugin_call() copies the args into one block and runs the
 * handlers in plugins[] order until the hook's stop rule ends the call or
 * a handler answers PETREL_PENDING; the plugin's complete() then resumes
 * with the next plugin. A finished call joins the ready queue, which the
 * idle handle drains on the next loop iteration (so a callback never fires
 * inside plugin_call, and a thousand calls per iteration cost one idle
 * callback). A cancelled call that a plugin still holds stays allocated,
 * its data readable, until the plugin completes it or plugins_free().
 *
 * Shutdown: plugins_free() cancels, calls each unload, then closes the idle
 * handle and, from its close callback, a second handle; only that second
 * close callback dlclose()s the objects. libuv runs the close callbacks
 * queued before an iteration's closing phase in one batch, so the handles a
 * plugin closed in its unload have run their (plugin-code) callbacks by
 * then.
 */
#include "plugin.h"

#include <assert.h>
#include <dlfcn.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <uv.h>

#include <petrel/plugin.h>

#include "config.h"
#include "log.h"
#include "route.h"
#include "util.h"
#include "verdict.h"

/* The public ABI mirrors the internal enums value for value. */
static_assert(PETREL_HOOK_CONNECT == (int)PLUGIN_HOOK_CONNECT, "hook values");
static_assert(PETREL_HOOK_HELO == (int)PLUGIN_HOOK_HELO, "hook values");
static_assert(PETREL_HOOK_AUTH == (int)PLUGIN_HOOK_AUTH, "hook values");
static_assert(PETREL_HOOK_MAIL_FROM == (int)PLUGIN_HOOK_MAIL_FROM, "hook values");
static_assert(PETREL_HOOK_RCPT_TO == (int)PLUGIN_HOOK_RCPT_TO, "hook values");
static_assert(PETREL_HOOK_DATA == (int)PLUGIN_HOOK_DATA, "hook values");
static_assert(PETREL_HOOK_XBIND == (int)PLUGIN_HOOK_XBIND, "hook values");
static_assert(PETREL_HOOK_ROUTE == (int)PLUGIN_HOOK_ROUTE, "hook values");
static_assert(PETREL_HOOK_SELECT_SOURCE == (int)PLUGIN_HOOK_SELECT_SOURCE, "hook values");
static_assert(PETREL_HOOK_RETRY == (int)PLUGIN_HOOK_RETRY, "hook values");
static_assert(PETREL_HOOK_BOUNCE == (int)PLUGIN_HOOK_BOUNCE, "hook values");
static_assert(PETREL_HOOK_EVENT == (int)PLUGIN_HOOK_EVENT, "hook values");
static_assert(PETREL_HOOK_COUNT == (int)PLUGIN_HOOK_COUNT, "hook values");
static_assert(PETREL_VERDICT_CONTINUE == (int)VERDICT_CONTINUE, "verdict values");
static_assert(PETREL_VERDICT_ACCEPT == (int)VERDICT_ACCEPT, "verdict values");
static_assert(PETREL_VERDICT_REJECT == (int)VERDICT_REJECT, "verdict values");
static_assert(PETREL_VERDICT_TEMPFAIL == (int)VERDICT_TEMPFAIL, "verdict values");
static_assert(PETREL_VERDICT_DISCARD == (int)VERDICT_DISCARD, "verdict values");
static_assert(PETREL_VERDICT_QUARANTINE == (int)VERDICT_QUARANTINE, "verdict values");
static_assert(PETREL_LOG_ERROR == (int)LOG_ERR, "log levels");
static_assert(PETREL_LOG_WARNING == (int)LOG_WARNING, "log levels");
static_assert(PETREL_LOG_INFO == (int)LOG_INFO, "log levels");
static_assert(PETREL_LOG_DEBUG == (int)LOG_DEBUG, "log levels");

#define PLUGIN_INIT_SYM "petrel_plugin_init"
#define PLUGIN_DESC_ROOM 1024 /* init writes into this much, whatever it thinks the size is */
#define PLUGIN_NAME_MAX 64
#define PLUGIN_TEXT_MAX 400 /* verdict text: keeps "ddd x.y.z text" under 512 octets */
#define PLUGIN_HDR_NAME_MAX 76
#define PLUGIN_HDR_VALUE_MAX 900 /* name + ": " + value < 998 (RFC 5322 2.1.1) */
#define PLUGIN_SUBJECT_MAX 200
#define PLUGIN_BOUNCE_TEXT_MAX 65536
#define PLUGIN_RETRY_MAX_S (365ULL * 86400)
#define PLUGIN_CHECK_ITERATIONS 16 /* plugins_check: loop turns to let handles close */

#define PLUGIN_CONTAINER(ptr, type, member) ((type *)(void *)((char *)(ptr)-offsetof(type, member)))

typedef int plugin_init_fn(const struct petrel_host *host, struct petrel_plugin *p);

static const char *const plugin_hook_names[PLUGIN_HOOK_COUNT] = {
    "connect", "helo",  "auth",          "mail_from", "rcpt_to", "data",
    "xbind",   "route", "select_source", "retry",     "bounce",  "event",
};

/* An intrusive circular list (the head is a sentinel); a node that is in
 * no list points at itself, so unlinking twice is harmless. */
struct plugin_link {
    struct plugin_link *next, *prev;
};

struct plugin {
    struct petrel_host host; /* this entry's host API; plugin_of() maps it back */
    union {
        struct petrel_plugin p; /* what init filled */
        unsigned char room[PLUGIN_DESC_ROOM];
    } desc;
    struct plugins *set;      /* borrowed: the owner */
    void *dl;                 /* owned: dlopen handle, or NULL */
    char *path;               /* owned */
    char *name;               /* owned: for logs */
    struct plugin_kv *config; /* owned copy of plugins[].config */
    size_t nconfig;
    bool inited; /* init succeeded and the ABI matched: unload is due */
};

enum plugin_call_state {
    CALL_RUNNING, /* a handler runs (inside plugin_call or complete) */
    CALL_WAITING, /* a handler answered PETREL_PENDING */
    CALL_READY,   /* finished, in set->ready */
    CALL_FIRING,  /* the callback runs */
};

/* The context handed to handlers is the call itself. */
struct petrel_ctx {
    struct plugin_call *call; /* borrowed: the call embedding this context */
};

struct plugin_call {
    struct petrel_ctx ctx;    /* given to handlers; ctx.call = this */
    struct plugins *set;      /* borrowed: the owner */
    struct plugin_link all;   /* in set->calls while allocated */
    struct plugin_link ready; /* in set->ready (or a batch being drained) */
    enum plugin_hook hook;
    enum plugin_call_state state;
    size_t cur;            /* the plugin whose handler runs or is pending */
    bool cancelled;        /* no callback; freed on complete / plugins_free */
    bool early;            /* complete() ran before the handler returned */
    bool answered;         /* auth / xbind: some handler called set_allow */
    char *why;             /* owned: why the current handler failed, or NULL */
    struct plua_args args; /* copies, pointing into blk */
    char *blk;             /* owned: header and failure arrays, then strings */
    plugin_done_cb *cb;
    void *arg;
    struct plua_result res;
};

struct plugins {
    uv_loop_t *loop;  /* borrowed */
    struct plugin *v; /* owned: n entries, never moved (hosts point into it) */
    size_t n;
    bool have[PLUGIN_HOOK_COUNT];
    int on_error;             /* enum milter_action (lua.on_error) */
    uv_idle_t idle;           /* drains ready */
    uv_check_t closer;        /* initialised and closed at once by the idle handle's close
                               * callback: the second round of closing (see plugins_free) */
    bool handles;             /* idle is initialised */
    bool closing;             /* plugins_free ran */
    struct plugin_link calls; /* every allocated call */
    struct plugin_link ready; /* finished calls, callback due */
};

/* ---- lists ---------------------------------------------------------------- */

static void
plugin_link_init(struct plugin_link *l)
{
    l->next = l->prev = l;
}

static bool
plugin_link_empty(const struct plugin_link *l)
{
    return l->next == l;
}

static void
plugin_link_push(struct plugin_link *head, struct plugin_link *n)
{
    n->prev = head->prev;
    n->next = head;
    head->prev->next = n;
    head->prev = n;
}

static void
plugin_link_del(struct plugin_link *n)
{
    n->prev->next = n->next;
    n->next->prev = n->prev;
    plugin_link_init(n);
}

/* Moves every node of from to the (empty) list to. */
static void
plugin_link_take(struct plugin_link *to, struct plugin_link *from)
{
    plugin_link_init(to);
    if (plugin_link_empty(from))
        return;
    to->next = from->next;
    to->prev = from->prev;
    to->next->prev = to;
    to->prev->next = to;
    plugin_link_init(from);
}

/* ---- hook names ----------------------------------------------------------- */

const char *
plugin_hook_name(enum plugin_hook h)
{
    if ((int)h < 0 || h >= PLUGIN_HOOK_COUNT)
        return NULL;
    return plugin_hook_names[h];
}

int
plugin_hook_by_name(const char *name)
{
    for (int i = 0; i < PLUGIN_HOOK_COUNT; i++)
        if (strcmp(plugin_hook_names[i], name) == 0)
            return i;
    return -1;
}

static bool
plugin_hook_has_verdict(enum plugin_hook h)
{
    return h == PLUGIN_HOOK_CONNECT || h == PLUGIN_HOOK_HELO || h == PLUGIN_HOOK_MAIL_FROM ||
           h == PLUGIN_HOOK_RCPT_TO || h == PLUGIN_HOOK_DATA;
}

/* ---- small helpers -------------------------------------------------------- */

static char *plugin_vasprintf(const char *fmt, va_list ap) __attribute__((format(printf, 1, 0)));

static char *
plugin_vasprintf(const char *fmt, va_list ap)
{
    char *s = NULL;
    if (vasprintf(&s, fmt, ap) < 0)
        PANIC("plugin: out of memory");
    return s;
}

static struct plugin *
plugin_of(const struct petrel_host *host)
{
    return PLUGIN_CONTAINER(host, struct plugin, host);
}

static enum log_level
plugin_log_level(int level)
{
    if (level <= PETREL_LOG_ERROR)
        return LOG_ERR;
    if (level >= PETREL_LOG_DEBUG)
        return LOG_DEBUG;
    return (enum log_level)level;
}

/* One line "<key>: plugin=<name>, <text>" with text escaped. */
static void plugin_log_line(const char *name, enum log_level level, const char *key,
                            const char *fmt, va_list ap) __attribute__((format(printf, 4, 0)));

static void
plugin_log_line(const char *name, enum log_level level, const char *key, const char *fmt,
                va_list ap)
{
    if (!log_enabled(level))
        return;
    char text[1024];
    int n = vsnprintf(text, sizeof(text), fmt, ap);
    if (n < 0)
        text[0] = '\0';
    struct log_line ll;
    log_begin(&ll, level, key);
    log_kv(&ll, "plugin", "%s", name);
    log_kv_vis(&ll, "msg", text, strlen(text));
    log_end(&ll);
}

/* ---- the args copy -------------------------------------------------------- */

/* Copies into base + *off, or only counts when base is NULL. */
static const char *
plugin_copy_str(char *base, size_t *off, const char *s)
{
    if (s == NULL)
        return NULL;
    size_t n = strlen(s) + 1;
    char *d = base != NULL ? base + *off : NULL;
    if (d != NULL)
        memcpy(d, s, n);
    *off += n;
    return d;
}

/* Lays src out at base (arrays first, then strings) into dst; with base
 * NULL only computes the size in *off. */
static void
plugin_copy_args(char *base, size_t *off, struct plua_args *dst, const struct plua_args *src)
{
    *off = 0;
    struct header_field *hs = NULL;
    struct plua_failure *fs = NULL;
    if (src->nheaders > 0) {
        hs = base != NULL ? (struct header_field *)(void *)base : NULL;
        *off += src->nheaders * sizeof(*hs);
    }
    if (src->nfailures > 0) {
        fs = base != NULL ? (struct plua_failure *)(void *)(base + *off) : NULL;
        *off += src->nfailures * sizeof(*fs);
    }
    *dst = *src;
    dst->ip = plugin_copy_str(base, off, src->ip);
    dst->local_ip = plugin_copy_str(base, off, src->local_ip);
    dst->listener = plugin_copy_str(base, off, src->listener);
    dst->helo = plugin_copy_str(base, off, src->helo);
    dst->user = plugin_copy_str(base, off, src->user);
    dst->password = plugin_copy_str(base, off, src->password);
    dst->from = plugin_copy_str(base, off, src->from);
    dst->params = plugin_copy_str(base, off, src->params);
    dst->rcpt = plugin_copy_str(base, off, src->rcpt);
    dst->queue_id = plugin_copy_str(base, off, src->queue_id);
    dst->xbind_ip = plugin_copy_str(base, off, src->xbind_ip);
    dst->xbind_hostname = plugin_copy_str(base, off, src->xbind_hostname);
    dst->destination = plugin_copy_str(base, off, src->destination);
    dst->reply_esc = plugin_copy_str(base, off, src->reply_esc);
    dst->reply_text = plugin_copy_str(base, off, src->reply_text);
    dst->event_type = plugin_copy_str(base, off, src->event_type);
    for (size_t i = 0; i < src->nheaders; i++) {
        const char *name = plugin_copy_str(base, off, src->headers[i].name);
        const char *value = plugin_copy_str(base, off, src->headers[i].value);
        if (hs != NULL)
            hs[i] = (struct header_field){name, value};
    }
    for (size_t i = 0; i < src->nfailures; i++) {
        const struct plua_failure *f = &src->failures[i];
        const char *rcpt = plugin_copy_str(base, off, f->rcpt);
        const char *esc = plugin_copy_str(base, off, f->esc);
        const char *text = plugin_copy_str(base, off, f->text);
        if (fs != NULL)
            fs[i] = (struct plua_failure){rcpt, f->code, esc, text};
    }
    dst->headers = hs;
    dst->failures = fs;
}

/* ---- results -------------------------------------------------------------- */

static void
plugin_result_free(struct plua_result *r)
{
    plua_result_drop_answers(r);
    verdict_clear(&r->verdict);
    free(r->error);
    r->error = NULL;
}

/* The current handler failed (c->why): log it and make the result the
 * on_error outcome; nothing any handler set is used. */
static void
plugin_fail_call(struct plugin_call *c)
{
    const struct plugin *pl = &c->set->v[c->cur];
    const char *hook = plugin_hook_names[c->hook];
    const char *act = verdict_action_name(c->set->on_error);
    struct log_line ll;
    log_begin(&ll, LOG_WARNING, c->args.queue_id);
    log_kv(&ll, "plugin", "%s", pl->name);
    log_kv(&ll, "hook", "%s", hook);
    if (c->hook == PLUGIN_HOOK_EVENT)
        log_kv(&ll, "status", "failed");
    else
        log_kv(&ll, "status", "failed (on_error=%s)", act);
    log_kv_vis(&ll, "reason", c->why, strlen(c->why));
    log_end(&ll);

    struct plua_result *r = &c->res;
    if (r->status == PLUA_ERROR) /* an earlier event handler failed already */
        return;
    r->error = xasprintf("plugin %s: hook %s: %s", pl->name, hook, c->why);
    plua_result_drop_answers(r);
    r->status = PLUA_ERROR;
    verdict_set_on_error(&r->verdict, c->set->on_error);
}

/* Records why the current handler fails (the first reason counts). */
static void plugin_set_why(struct plugin_call *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
plugin_set_why(struct plugin_call *c, const char *fmt, ...)
{
    if (c->why != NULL)
        return;
    va_list ap;
    va_start(ap, fmt);
    c->why = plugin_vasprintf(fmt, ap);
    va_end(ap);
}

/* ---- calls ---------------------------------------------------------------- */

static void
plugin_call_free(struct plugin_call *c)
{
    plugin_link_del(&c->all);
    plugin_link_del(&c->ready);
    plugin_result_free(&c->res);
    free(c->why);
    free(c->blk);
    free(c);
}

static void
plugin_on_idle(uv_idle_t *h)
{
    struct plugins *ps = h->data;
    struct plugin_link batch;
    /* Only the calls finished before this turn: a callback that starts a
     * call whose result is ready at once gets it on the next turn. */
    plugin_link_take(&batch, &ps->ready);
    while (!plugin_link_empty(&batch)) {
        struct plugin_call *c = PLUGIN_CONTAINER(batch.next, struct plugin_call, ready);
        plugin_link_del(&c->ready);
        c->state = CALL_FIRING;
        c->cb(c, &c->res, c->arg);
        plugin_call_free(c);
        if (ps->closing)
            return; /* the callback freed the set: the rest were cancelled */
    }
    if (plugin_link_empty(&ps->ready))
        uv_idle_stop(&ps->idle);
}

/* The handlers are done: queue the callback. */
static void
plugin_finish(struct plugin_call *c)
{
    struct plugins *ps = c->set;
    if (c->cancelled) {
        plugin_call_free(c);
        return;
    }
    struct plua_result *r = &c->res;
    if (r->status == PLUA_OK) {
        bool none = false;
        switch (c->hook) {
        case PLUGIN_HOOK_AUTH:
        case PLUGIN_HOOK_XBIND:
            none = !c->answered;
            break;
        case PLUGIN_HOOK_ROUTE:
            none = r->route == NULL;
            break;
        case PLUGIN_HOOK_SELECT_SOURCE:
            none = r->source_ip == NULL;
            break;
        case PLUGIN_HOOK_RETRY:
            none = !r->retry_set;
            break;
        case PLUGIN_HOOK_BOUNCE:
            none = r->subject == NULL && r->text == NULL;
            break;
        default:
            break;
        }
        if (none)
            r->status = PLUA_NO_HOOK;
    }
    c->state = CALL_READY;
    plugin_link_push(&ps->ready, &c->ready);
    if (!uv_is_active((uv_handle_t *)&ps->idle))
        uv_idle_start(&ps->idle, plugin_on_idle);
}

/* Judges what handler c->cur did (rc, c->why); true when the call ends. */
static bool
plugin_after(struct plugin_call *c, int rc)
{
    if (rc != PETREL_OK && rc != PETREL_PENDING)
        plugin_set_why(c,
                       rc == PETREL_ERROR ? "handler returned PETREL_ERROR"
                                          : "handler returned %d (not PETREL_OK/PENDING/ERROR)",
                       rc);
    if (c->why != NULL) {
        plugin_fail_call(c);
        free(c->why);
        c->why = NULL;
        return c->hook != PLUGIN_HOOK_EVENT; /* the other plugins still hear of the event */
    }
    const struct plua_result *r = &c->res;
    switch (c->hook) {
    case PLUGIN_HOOK_AUTH:
    case PLUGIN_HOOK_XBIND:
        return c->answered;
    case PLUGIN_HOOK_ROUTE:
        return r->route != NULL;
    case PLUGIN_HOOK_SELECT_SOURCE:
        return r->source_ip != NULL;
    case PLUGIN_HOOK_RETRY:
        return r->retry_set;
    case PLUGIN_HOOK_BOUNCE:
        return r->subject != NULL || r->text != NULL;
    case PLUGIN_HOOK_EVENT:
        return false;
    default:
        return r->verdict.kind != VERDICT_CONTINUE;
    }
}

/* Runs the handlers from c->cur on until the call ends, is cancelled or a
 * handler is pending. */
static void
plugin_run(struct plugin_call *c)
{
    struct plugins *ps = c->set;
    for (; c->cur < ps->n; c->cur++) {
        struct plugin *pl = &ps->v[c->cur];
        petrel_hook_cb *h = pl->desc.p.handlers[c->hook];
        if (h == NULL)
            continue;
        c->state = CALL_RUNNING;
        c->early = false;
        int rc = h(&c->ctx, pl->desc.p.data);
        if (rc == PETREL_PENDING && !c->early) {
            c->state = CALL_WAITING;
            return;
        }
        if (c->cancelled)
            break;
        if (plugin_after(c, rc))
            break;
    }
    plugin_finish(c);
}

struct plugin_call *
plugin_call(struct plugins *ps, enum plugin_hook h, const struct plua_args *args,
            plugin_done_cb *cb, void *arg)
{
    if (ps == NULL || (int)h < 0 || h >= PLUGIN_HOOK_COUNT || cb == NULL)
        PANIC("plugin_call: no plugin set, hook %d or callback", (int)h);
    struct plugin_call *c = xcalloc(1, sizeof(*c));
    c->ctx.call = c;
    c->set = ps;
    c->hook = h;
    c->cb = cb;
    c->arg = arg;
    plugin_link_init(&c->ready);
    verdict_init(&c->res.verdict);
    c->res.status = PLUA_OK;
    plugin_link_push(&ps->calls, &c->all);
    if (!ps->handles) {
        uv_idle_init(ps->loop, &ps->idle);
        ps->idle.data = ps;
        ps->handles = true;
    }
    if (!ps->have[h]) {
        c->res.status = PLUA_NO_HOOK;
        plugin_finish(c);
        return c;
    }
    size_t size;
    plugin_copy_args(NULL, &size, &c->args, args);
    c->blk = xmalloc(size > 0 ? size : 1);
    plugin_copy_args(c->blk, &size, &c->args, args);
    plugin_run(c);
    return c;
}

void
plugin_call_cancel(struct plugin_call *c)
{
    if (c == NULL || c->state == CALL_FIRING)
        return;
    if (c->state == CALL_READY) {
        plugin_call_free(c);
        return;
    }
    c->cancelled = true; /* running or waiting: freed when the plugin lets go */
}

/* ---- host API: the plugin ------------------------------------------------- */

static void plugin_host_log(const struct petrel_host *host, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
plugin_host_log(const struct petrel_host *host, int level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    plugin_log_line(plugin_of(host)->name, plugin_log_level(level), "petrel", fmt, ap);
    va_end(ap);
}

static const char *
plugin_host_config(const struct petrel_host *host, const char *key)
{
    const struct plugin *pl = plugin_of(host);
    for (size_t i = 0; key != NULL && i < pl->nconfig; i++)
        if (strcmp(pl->config[i].key, key) == 0)
            return pl->config[i].value;
    return NULL;
}

static const char *
plugin_host_config_key(const struct petrel_host *host, size_t i)
{
    const struct plugin *pl = plugin_of(host);
    return i < pl->nconfig ? pl->config[i].key : NULL;
}

static void *
plugin_host_loop(const struct petrel_host *host)
{
    return plugin_of(host)->set->loop;
}

static uint64_t
plugin_host_now_ms(const struct petrel_host *host)
{
    return uv_now(plugin_of(host)->set->loop);
}

/* ---- host API: reading a call --------------------------------------------- */

static const struct plua_args *
plugin_ctx_args(const struct petrel_ctx *ctx)
{
    return &ctx->call->args;
}

static enum petrel_hook
plugin_ctx_hook(const struct petrel_ctx *ctx)
{
    return (enum petrel_hook)ctx->call->hook;
}

static const char *
plugin_ctx_client_ip(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->ip;
}

static int
plugin_ctx_client_port(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->port;
}

static const char *
plugin_ctx_local_ip(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->local_ip;
}

static const char *
plugin_ctx_listener(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->listener;
}

static const char *
plugin_ctx_helo(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->helo;
}

static const char *
plugin_ctx_auth_user(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->user;
}

static const char *
plugin_ctx_auth_password(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->password;
}

static const char *
plugin_ctx_sender(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->from;
}

static const char *
plugin_ctx_sender_params(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->params;
}

static const char *
plugin_ctx_rcpt(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->rcpt;
}

static const char *
plugin_ctx_queue_id(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->queue_id;
}

static uint64_t
plugin_ctx_message_size(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->size;
}

static uint64_t
plugin_ctx_message_age(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->age;
}

static size_t
plugin_ctx_header_count(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->nheaders;
}

static const char *
plugin_ctx_header_at(const struct petrel_ctx *ctx, size_t i, const char **name)
{
    const struct plua_args *a = plugin_ctx_args(ctx);
    if (i >= a->nheaders)
        return NULL;
    if (name != NULL)
        *name = a->headers[i].name;
    return a->headers[i].value;
}

static const char *
plugin_ctx_header(const struct petrel_ctx *ctx, const char *name, size_t index)
{
    const struct plua_args *a = plugin_ctx_args(ctx);
    for (size_t i = 0; name != NULL && i < a->nheaders; i++) {
        if (a->headers[i].name != NULL && ascii_casecmp(a->headers[i].name, name) == 0) {
            if (index == 0)
                return a->headers[i].value;
            index--;
        }
    }
    return NULL;
}

static const char *
plugin_ctx_xbind_ip(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->xbind_ip;
}

static const char *
plugin_ctx_xbind_hostname(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->xbind_hostname;
}

static const char *
plugin_ctx_destination(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->destination;
}

static unsigned
plugin_ctx_attempt(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->attempt;
}

static int
plugin_ctx_reply_code(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->reply_code;
}

static const char *
plugin_ctx_reply_enhanced(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->reply_esc;
}

static const char *
plugin_ctx_reply_text(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->reply_text;
}

static const char *
plugin_ctx_event_type(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->event_type;
}

static size_t
plugin_ctx_failure_count(const struct petrel_ctx *ctx)
{
    return plugin_ctx_args(ctx)->nfailures;
}

static int
plugin_ctx_failure_at(const struct petrel_ctx *ctx, size_t i, const char **rcpt, int *code,
                      const char **enhanced, const char **text)
{
    const struct plua_args *a = plugin_ctx_args(ctx);
    if (i >= a->nfailures)
        return -1;
    const struct plua_failure *f = &a->failures[i];
    if (rcpt != NULL)
        *rcpt = f->rcpt;
    if (code != NULL)
        *code = f->code;
    if (enhanced != NULL)
        *enhanced = f->esc;
    if (text != NULL)
        *text = f->text;
    return 0;
}

static bool
plugin_ctx_cancelled(const struct petrel_ctx *ctx)
{
    return ctx->call->cancelled;
}

static void plugin_ctx_log(const struct petrel_ctx *ctx, int level, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void
plugin_ctx_log(const struct petrel_ctx *ctx, int level, const char *fmt, ...)
{
    const struct plugin_call *c = ctx->call;
    va_list ap;
    va_start(ap, fmt);
    plugin_log_line(c->set->v[c->cur].name, plugin_log_level(level), c->args.queue_id, fmt, ap);
    va_end(ap);
}

/* ---- host API: answering -------------------------------------------------- */

/* The call behind ctx if a setter named what may act on it now for a hook
 * that wants is true; otherwise records why (or logs a misuse that can no
 * longer fail the call) and returns NULL. */
static struct plugin_call *
plugin_setter(struct petrel_ctx *ctx, const char *what, bool wants)
{
    struct plugin_call *c = ctx->call;
    if (c->state != CALL_RUNNING && c->state != CALL_WAITING) {
        struct log_line ll;
        log_begin(&ll, LOG_WARNING, c->args.queue_id);
        log_kv(&ll, "plugin", "%s", c->set->v[c->cur].name);
        log_kv(&ll, "hook", "%s", plugin_hook_names[c->hook]);
        log_kv(&ll, "msg", "%s() on a context whose handler already returned: ignored", what);
        log_end(&ll);
        return NULL;
    }
    if (!wants) {
        plugin_set_why(c, "%s() is not an answer of hook %s", what, plugin_hook_names[c->hook]);
        return NULL;
    }
    return c;
}

static int
plugin_set_verdict(struct petrel_ctx *ctx, int kind, int code, const char *text)
{
    struct plugin_call *c =
        plugin_setter(ctx, "set_verdict", plugin_hook_has_verdict(ctx->call->hook));
    if (c == NULL)
        return -1;
    if (kind < PETREL_VERDICT_CONTINUE || kind > PETREL_VERDICT_QUARANTINE) {
        plugin_set_why(c, "set_verdict: unknown verdict kind %d", kind);
        return -1;
    }
    if (text == NULL)
        text = "";
    if (strlen(text) > PLUGIN_TEXT_MAX) {
        plugin_set_why(c, "set_verdict: text longer than %d bytes", PLUGIN_TEXT_MAX);
        return -1;
    }
    if (strpbrk(text, "\r\n") != NULL) {
        plugin_set_why(c, "set_verdict: CR or LF in text");
        return -1;
    }
    struct verdict v = VERDICT_INIT;
    if (code == 0) {
        verdict_setf(&v, (enum verdict_kind)kind, 0, "", "%s", text);
    } else {
        const char *dflt = code / 100 == 5 ? "5.7.1" : code / 100 == 4 ? "4.7.1" : "2.0.0";
        char esc[16];
        const char *t;
        const char *why = verdict_split_text(text, dflt, esc, sizeof(esc), &t);
        if (why != NULL) {
            plugin_set_why(c, "set_verdict: %s", why);
            return -1;
        }
        verdict_setf(&v, (enum verdict_kind)kind, code, esc, "%s", t);
    }
    const char *why = verdict_check(&v);
    if (why != NULL) {
        char shown[512];
        verdict_format(&v, shown, sizeof(shown)); /* names the kind only without a code */
        plugin_set_why(c, "invalid verdict %s%s%s: %s",
                       v.reply.code ? verdict_kind_name(v.kind) : "", v.reply.code ? " " : "",
                       shown, why);
        verdict_clear(&v);
        return -1;
    }
    verdict_move(&c->res.verdict, &v);
    return 0;
}

static bool
plugin_header_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > PLUGIN_HDR_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 33 || ch > 126 || ch == ':') /* RFC 5322 2.2 ftext */
            return false;
    }
    return true;
}

static bool
plugin_header_value_ok(const char *s)
{
    size_t n = strlen(s);
    if (n > PLUGIN_HDR_VALUE_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)s[i];
        if ((ch < 32 && ch != '\t') || ch == 127)
            return false;
    }
    return true;
}

static int
plugin_add_header(struct petrel_ctx *ctx, const char *name, const char *value)
{
    struct plugin_call *c = plugin_setter(ctx, "add_header", ctx->call->hook == PLUGIN_HOOK_DATA);
    if (c == NULL)
        return -1;
    if (name == NULL || !plugin_header_name_ok(name)) {
        plugin_set_why(c, "add_header: bad field name (1-%d printable characters, no ':')",
                       PLUGIN_HDR_NAME_MAX);
        return -1;
    }
    if (value == NULL || !plugin_header_value_ok(value)) {
        plugin_set_why(c, "add_header %s: bad value (control characters or over %d bytes)", name,
                       PLUGIN_HDR_VALUE_MAX);
        return -1;
    }
    struct plua_result *r = &c->res;
    if (r->nadd_headers >= PLUA_MAX_ADD_HEADERS) {
        plugin_set_why(c, "add_header: more than %d headers", PLUA_MAX_ADD_HEADERS);
        return -1;
    }
    r->add_headers = xreallocarray(r->add_headers, r->nadd_headers + 1, sizeof(*r->add_headers));
    r->add_headers[r->nadd_headers++] = (struct header_field){xstrdup(name), xstrdup(value)};
    return 0;
}

static int
plugin_set_route(struct petrel_ctx *ctx, const char *route)
{
    struct plugin_call *c = plugin_setter(ctx, "set_route", ctx->call->hook == PLUGIN_HOOK_ROUTE);
    if (c == NULL)
        return -1;
    struct route parsed;
    const char *why = route != NULL ? route_parse(route, &parsed) : "NULL route";
    if (why != NULL) {
        plugin_set_why(c, "set_route \"%s\": %s", route != NULL ? route : "", why);
        return -1;
    }
    free(c->res.route);
    c->res.route = xstrdup(route);
    return 0;
}

static bool
plugin_hostname_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > 253)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '-' || ch == '.';
        if (!ok)
            return false;
    }
    return true;
}

static int
plugin_set_source(struct petrel_ctx *ctx, const char *ip, const char *hostname)
{
    struct plugin_call *c =
        plugin_setter(ctx, "set_source", ctx->call->hook == PLUGIN_HOOK_SELECT_SOURCE);
    if (c == NULL)
        return -1;
    struct in6_addr a6;
    if (ip == NULL || (inet_pton(AF_INET, ip, &a6) != 1 && inet_pton(AF_INET6, ip, &a6) != 1)) {
        plugin_set_why(c, "set_source: \"%s\" is not an IP address", ip != NULL ? ip : "");
        return -1;
    }
    if (hostname != NULL && !plugin_hostname_ok(hostname)) {
        plugin_set_why(c, "set_source: \"%s\" is not a host name", hostname);
        return -1;
    }
    free(c->res.source_ip);
    free(c->res.source_hostname);
    c->res.source_ip = xstrdup(ip);
    c->res.source_hostname = hostname != NULL ? xstrdup(hostname) : NULL;
    return 0;
}

static int
plugin_set_retry(struct petrel_ctx *ctx, uint64_t seconds)
{
    struct plugin_call *c = plugin_setter(ctx, "set_retry", ctx->call->hook == PLUGIN_HOOK_RETRY);
    if (c == NULL)
        return -1;
    if (seconds > PLUGIN_RETRY_MAX_S) {
        plugin_set_why(c, "set_retry: %llu seconds is over 365 days", (unsigned long long)seconds);
        return -1;
    }
    c->res.retry_set = true;
    c->res.bounce = false;
    c->res.retry_seconds = seconds;
    return 0;
}

static int
plugin_set_retry_bounce(struct petrel_ctx *ctx)
{
    struct plugin_call *c =
        plugin_setter(ctx, "set_retry_bounce", ctx->call->hook == PLUGIN_HOOK_RETRY);
    if (c == NULL)
        return -1;
    c->res.retry_set = true;
    c->res.bounce = true;
    c->res.retry_seconds = 0;
    return 0;
}

static int
plugin_set_bounce_text(struct petrel_ctx *ctx, const char *subject, const char *text)
{
    struct plugin_call *c =
        plugin_setter(ctx, "set_bounce_text", ctx->call->hook == PLUGIN_HOOK_BOUNCE);
    if (c == NULL)
        return -1;
    if (subject != NULL &&
        (strlen(subject) > PLUGIN_SUBJECT_MAX || strpbrk(subject, "\r\n") != NULL)) {
        plugin_set_why(c, "set_bounce_text: subject holds CR or LF or is over %d bytes",
                       PLUGIN_SUBJECT_MAX);
        return -1;
    }
    if (text != NULL && strlen(text) > PLUGIN_BOUNCE_TEXT_MAX) {
        plugin_set_why(c, "set_bounce_text: text over %d bytes", PLUGIN_BOUNCE_TEXT_MAX);
        return -1;
    }
    free(c->res.subject);
    free(c->res.text);
    c->res.subject = subject != NULL ? xstrdup(subject) : NULL;
    c->res.text = text != NULL ? xstrdup(text) : NULL;
    return 0;
}

static int
plugin_set_allow(struct petrel_ctx *ctx, bool allow)
{
    enum plugin_hook h = ctx->call->hook;
    struct plugin_call *c =
        plugin_setter(ctx, "set_allow", h == PLUGIN_HOOK_AUTH || h == PLUGIN_HOOK_XBIND);
    if (c == NULL)
        return -1;
    c->res.allow = allow;
    c->answered = true;
    return 0;
}

static int plugin_fail(struct petrel_ctx *ctx, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static int
plugin_fail(struct petrel_ctx *ctx, const char *fmt, ...)
{
    struct plugin_call *c = plugin_setter(ctx, "fail", true);
    if (c == NULL || c->why != NULL)
        return -1;
    if (fmt == NULL) {
        c->why = xstrdup("failed");
        return -1;
    }
    va_list ap;
    va_start(ap, fmt);
    c->why = plugin_vasprintf(fmt, ap);
    va_end(ap);
    return -1;
}

static void
plugin_complete(struct petrel_ctx *ctx)
{
    struct plugin_call *c = ctx->call;
    if (c->state == CALL_RUNNING) {
        c->early = true; /* plugin_run carries on when the handler returns */
        return;
    }
    if (c->state != CALL_WAITING) {
        plugin_setter(ctx, "complete", true); /* logs the misuse */
        return;
    }
    if (c->cancelled) {
        plugin_call_free(c);
        return;
    }
    c->state = CALL_RUNNING;
    if (plugin_after(c, PETREL_OK)) {
        plugin_finish(c);
        return;
    }
    c->cur++;
    plugin_run(c);
}

static void
plugin_host_init(struct petrel_host *h)
{
    memset(h, 0, sizeof(*h));
    h->abi_version = PETREL_PLUGIN_ABI_VERSION;
    h->size = sizeof(*h);
    h->log = plugin_host_log;
    h->config = plugin_host_config;
    h->config_key = plugin_host_config_key;
    h->loop = plugin_host_loop;
    h->now_ms = plugin_host_now_ms;
    h->hook = plugin_ctx_hook;
    h->client_ip = plugin_ctx_client_ip;
    h->client_port = plugin_ctx_client_port;
    h->local_ip = plugin_ctx_local_ip;
    h->listener = plugin_ctx_listener;
    h->helo = plugin_ctx_helo;
    h->auth_user = plugin_ctx_auth_user;
    h->auth_password = plugin_ctx_auth_password;
    h->sender = plugin_ctx_sender;
    h->sender_params = plugin_ctx_sender_params;
    h->rcpt = plugin_ctx_rcpt;
    h->queue_id = plugin_ctx_queue_id;
    h->message_size = plugin_ctx_message_size;
    h->message_age = plugin_ctx_message_age;
    h->header_count = plugin_ctx_header_count;
    h->header_at = plugin_ctx_header_at;
    h->header = plugin_ctx_header;
    h->xbind_ip = plugin_ctx_xbind_ip;
    h->xbind_hostname = plugin_ctx_xbind_hostname;
    h->destination = plugin_ctx_destination;
    h->attempt = plugin_ctx_attempt;
    h->reply_code = plugin_ctx_reply_code;
    h->reply_enhanced = plugin_ctx_reply_enhanced;
    h->reply_text = plugin_ctx_reply_text;
    h->event_type = plugin_ctx_event_type;
    h->failure_count = plugin_ctx_failure_count;
    h->failure_at = plugin_ctx_failure_at;
    h->cancelled = plugin_ctx_cancelled;
    h->ctx_log = plugin_ctx_log;
    h->set_verdict = plugin_set_verdict;
    h->add_header = plugin_add_header;
    h->set_route = plugin_set_route;
    h->set_source = plugin_set_source;
    h->set_retry = plugin_set_retry;
    h->set_retry_bounce = plugin_set_retry_bounce;
    h->set_bounce_text = plugin_set_bounce_text;
    h->set_allow = plugin_set_allow;
    h->fail = plugin_fail;
    h->complete = plugin_complete;
}

/* ---- loading and unloading ------------------------------------------------ */

static char *plugin_load_error(size_t i, const char *path, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* "plugins[i].path: <path>: <reason>" */
static char *
plugin_load_error(size_t i, const char *path, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *why = plugin_vasprintf(fmt, ap);
    va_end(ap);
    char *err = xasprintf("plugins[%zu].path: %s: %s", i, path, why);
    free(why);
    return err;
}

/* dlerror() without the "<path>: " it usually starts with. */
static const char *
plugin_dlerror(const char *path)
{
    const char *e = dlerror();
    if (e == NULL)
        return "unknown dlopen error";
    size_t n = strlen(path);
    if (strncmp(e, path, n) == 0 && e[n] == ':' && e[n + 1] == ' ')
        return e + n + 2;
    return e;
}

/* The name for logs: the plugin's, or the file name without ".so". */
static char *
plugin_pick_name(const char *given, const char *path)
{
    if (given != NULL && given[0] != '\0')
        return xstrdup(given);
    const char *base = strrchr(path, '/');
    base = base != NULL ? base + 1 : path;
    size_t n = strlen(base);
    if (n > 3 && strcmp(base + n - 3, ".so") == 0)
        n -= 3;
    return xstrndup(base, n);
}

static bool
plugin_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > PLUGIN_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        bool ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                  (ch >= '0' && ch <= '9') || ch == '-' || ch == '_' || ch == '.';
        if (!ok)
            return false;
    }
    return true;
}

/* Opens plugins[i] into ps->v[i]. 0, or -1 with *err. */
static int
plugin_open(struct plugins *ps, size_t i, const struct plugin_config *pc, char **err)
{
    struct plugin *pl = &ps->v[i];
    pl->set = ps;
    pl->path = xstrdup(pc->path != NULL ? pc->path : "");
    pl->name = plugin_pick_name(NULL, pl->path);
    pl->nconfig = pc->nconfig;
    pl->config = pc->nconfig > 0 ? xcalloc(pc->nconfig, sizeof(*pl->config)) : NULL;
    for (size_t k = 0; k < pc->nconfig; k++) {
        pl->config[k].key = xstrdup(pc->config[k].key);
        pl->config[k].value = xstrdup(pc->config[k].value != NULL ? pc->config[k].value : "");
    }
    plugin_host_init(&pl->host);

    /* A name without '/' would make dlopen search the library path: keep
     * it relative to the working directory, like every other path. */
    char *open_path =
        strchr(pl->path, '/') != NULL ? xstrdup(pl->path) : xasprintf("./%s", pl->path);
    dlerror();
    pl->dl = dlopen(open_path, RTLD_NOW | RTLD_LOCAL);
    if (pl->dl == NULL) {
        *err = plugin_load_error(i, pl->path, "%s", plugin_dlerror(open_path));
        free(open_path);
        return -1;
    }
    free(open_path);
    dlerror();
    void *sym = dlsym(pl->dl, PLUGIN_INIT_SYM);
    if (sym == NULL) {
        *err =
            plugin_load_error(i, pl->path, "no symbol %s (not a petrel plugin)", PLUGIN_INIT_SYM);
        return -1;
    }
    plugin_init_fn *init;
    memcpy(&init, &sym, sizeof(init)); /* POSIX: dlsym's object pointer is the function */
    memset(&pl->desc, 0, sizeof(pl->desc));
    int rc = init(&pl->host, &pl->desc.p);
    if (rc != 0) {
        *err = plugin_load_error(i, pl->path, "%s failed (returned %d)", PLUGIN_INIT_SYM, rc);
        return -1;
    }
    /* A plugin of another ABI laid its struct out differently: use nothing
     * of it, not even unload. */
    if (pl->desc.p.abi_version != PETREL_PLUGIN_ABI_VERSION) {
        *err = plugin_load_error(i, pl->path, "ABI version %u, petrel speaks %d",
                                 (unsigned)pl->desc.p.abi_version, PETREL_PLUGIN_ABI_VERSION);
        return -1;
    }
    if (pl->desc.p.size != sizeof(struct petrel_plugin)) {
        *err = plugin_load_error(i, pl->path,
                                 "struct petrel_plugin is %u bytes, petrel's is %zu (rebuild it "
                                 "against this petrel's include/petrel/plugin.h)",
                                 (unsigned)pl->desc.p.size, sizeof(struct petrel_plugin));
        return -1;
    }
    pl->inited = true;
    if (pl->desc.p.name != NULL && pl->desc.p.name[0] != '\0') {
        if (!plugin_name_ok(pl->desc.p.name)) {
            char shown[3 * PLUGIN_NAME_MAX];
            str_vis(shown, sizeof(shown), pl->desc.p.name, strlen(pl->desc.p.name));
            *err = plugin_load_error(i, pl->path,
                                     "plugin name \"%s\": use 1-%d letters, digits, '-', '_', '.'",
                                     shown, PLUGIN_NAME_MAX);
            return -1;
        }
        free(pl->name);
        pl->name = plugin_pick_name(pl->desc.p.name, pl->path);
    }
    for (int h = 0; h < PLUGIN_HOOK_COUNT; h++)
        if (pl->desc.p.handlers[h] != NULL)
            ps->have[h] = true;
    struct log_line ll;
    log_begin(&ll, LOG_INFO, "petrel");
    log_kv(&ll, "plugin", "%s", pl->name);
    log_kv(&ll, "msg", "loaded from %s", pl->path);
    log_end(&ll);
    return 0;
}

struct plugins *
plugins_load(struct uv_loop_s *loop, const struct petrel_config *cfg, char **err)
{
    struct plugins *ps = xcalloc(1, sizeof(*ps));
    ps->loop = loop;
    ps->on_error = cfg->lua.on_error;
    plugin_link_init(&ps->calls);
    plugin_link_init(&ps->ready);
    *err = NULL;
    if (cfg->nplugins == 0)
        return ps;
    ps->n = cfg->nplugins;
    ps->v = xcalloc(ps->n, sizeof(*ps->v));
    /* The handles exist before any init runs, so that even a failed load
     * dlclose()s only after the handles a plugin's unload closed are gone. */
    uv_idle_init(loop, &ps->idle);
    ps->idle.data = ps;
    ps->handles = true;
    for (size_t i = 0; i < ps->n; i++) {
        if (plugin_open(ps, i, &cfg->plugins[i], err) != 0) {
            plugins_free(ps);
            return NULL;
        }
    }
    return ps;
}

bool
plugins_have(const struct plugins *ps, enum plugin_hook h)
{
    if (ps == NULL || (int)h < 0 || h >= PLUGIN_HOOK_COUNT)
        return false;
    return ps->have[h];
}

/* Last step: every handle is closed, the plugins' close callbacks ran. */
static void
plugins_destroy(struct plugins *ps)
{
    for (size_t i = ps->n; i-- > 0;) {
        struct plugin *pl = &ps->v[i];
        if (pl->dl != NULL)
            dlclose(pl->dl);
        for (size_t k = 0; k < pl->nconfig; k++) {
            free(pl->config[k].key);
            free(pl->config[k].value);
        }
        free(pl->config);
        free(pl->path);
        free(pl->name);
    }
    free(ps->v);
    free(ps);
}

static void
plugins_on_closer_closed(uv_handle_t *h)
{
    plugins_destroy(h->data);
}

static void
plugins_on_idle_closed(uv_handle_t *h)
{
    struct plugins *ps = h->data;
    /* Handles the plugins closed in unload were queued before the idle
     * handle, so their callbacks ran in this same closing phase; the
     * closer's runs in the next one, after which the code can go. It is
     * made here, not earlier, so that a uv_walk() closing every handle at
     * shutdown cannot close it first. */
    uv_check_init(ps->loop, &ps->closer);
    ps->closer.data = ps;
    uv_close((uv_handle_t *)&ps->closer, plugins_on_closer_closed);
}

void
plugins_free(struct plugins *ps)
{
    if (ps == NULL)
        return;
    ps->closing = true;
    struct plugin_link *l, *next;
    for (l = ps->calls.next; l != &ps->calls; l = next) {
        next = l->next;
        struct plugin_call *c = PLUGIN_CONTAINER(l, struct plugin_call, all);
        if (c->state == CALL_READY)
            plugin_call_free(c);
        else if (c->state != CALL_FIRING)
            c->cancelled = true;
    }
    /* Unload in reverse order; an unload may still complete its contexts
     * (which frees them: they are cancelled). */
    for (size_t i = ps->n; i-- > 0;) {
        struct plugin *pl = &ps->v[i];
        if (pl->inited && pl->desc.p.unload != NULL)
            pl->desc.p.unload(pl->desc.p.data);
        pl->inited = false;
    }
    for (l = ps->calls.next; l != &ps->calls; l = next) {
        next = l->next;
        struct plugin_call *c = PLUGIN_CONTAINER(l, struct plugin_call, all);
        if (c->state != CALL_FIRING) /* a firing one is freed by plugin_on_idle */
            plugin_call_free(c);
    }
    if (!ps->handles) {
        plugins_destroy(ps);
        return;
    }
    if (uv_is_closing((uv_handle_t *)&ps->idle)) {
        /* someone closed our handle behind our back: we cannot know when
         * it is done, so keep the memory and the code mapped */
        log_msg(LOG_WARNING, NULL, "plugins: event-loop handle closed early; not unmapping");
        return;
    }
    uv_close((uv_handle_t *)&ps->idle, plugins_on_idle_closed);
}

int
plugins_check(const struct petrel_config *cfg, char **err)
{
    *err = NULL;
    if (cfg->nplugins == 0)
        return 0;
    uv_loop_t loop;
    if (uv_loop_init(&loop) != 0) {
        *err = xstrdup("plugins: cannot create an event loop");
        return -1;
    }
    struct plugins *ps = plugins_load(&loop, cfg, err);
    plugins_free(ps);
    /* Bounded: a plugin that leaves a handle active must not hang
     * check-config; the loop is then leaked, the process exits anyway. */
    for (int i = 0; i < PLUGIN_CHECK_ITERATIONS && uv_loop_alive(&loop); i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    if (!uv_loop_alive(&loop))
        (void)uv_loop_close(&loop);
    return ps != NULL ? 0 : -1;
}
