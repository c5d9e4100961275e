/*
 * good — the test plugin of tests/unit/test_plugin.c: a well-formed plugin
 * whose behaviour per hook comes from its config, so one object covers
 * every accessor and setter.
 *
 * config:
 *   name: <plugin name>            (default "good")
 *   fail_init: yes                 init returns -1
 *   <hook name>: <actions>         e.g. connect: "dump; reject 550 5.7.1 go away"
 * A hook without a key has no handler. Actions, separated by ';', run in
 * order:
 *   pending:<ms>   the rest runs from a uv timer after ms, then complete()
 *   early          complete() inside the handler, then return PETREL_PENDING
 *   dump           log every accessor's value ("dump ...")
 *   continue | accept | discard | quarantine <text>
 *   reject <code> <text> | tempfail <code> <text> | verdict <kind> <code> <text>
 *   header <name> <value> | route <r> | source <ip> [<host>] | retry <s> |
 *   bounce_now | btext <subject>|<text> | allow | deny
 *   error (return PETREL_ERROR) | ret <n> | fail <reason>
 * Each call logs "called <hook>"; a timer completion logs
 * "completed <hook> cancelled=<0|1>"; unload logs "unload pending=<n>" and
 * closes the timers still armed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <uv.h>

#include <petrel/plugin.h>

static const char *const good_hooks[PETREL_HOOK_COUNT] = {
    "connect", "helo",  "auth",          "mail_from", "rcpt_to", "data",
    "xbind",   "route", "select_source", "retry",     "bounce",  "event",
};

struct good_pending {
    uv_timer_t timer;
    struct good *g;
    struct petrel_ctx *ctx;
    char *actions; /* owned: what runs when the timer fires */
    struct good_pending *prev, *next;
};

struct good {
    const struct petrel_host *host;
    char *name;
    struct good_pending pending; /* sentinel of the armed timers */
};

static const char *
good_s(const char *s)
{
    return s != NULL ? s : "(null)";
}

static void
good_dump(struct good *g, struct petrel_ctx *ctx)
{
    const struct petrel_host *h = g->host;
    char hs[512] = "";
    size_t used = 0;
    for (size_t i = 0; i < h->header_count(ctx); i++) {
        const char *name = NULL;
        const char *value = h->header_at(ctx, i, &name);
        used +=
            (size_t)snprintf(hs + used, sizeof(hs) - used, "[%s=%s]", good_s(name), good_s(value));
        if (used >= sizeof(hs))
            break;
    }
    if (h->header_at(ctx, h->header_count(ctx), NULL) != NULL)
        h->ctx_log(ctx, PETREL_LOG_INFO, "header_at past the end is not NULL");
    const char *rcpt = NULL, *esc = NULL, *text = NULL;
    int code = 0;
    char fs[256] = "";
    if (h->failure_at(ctx, 0, &rcpt, &code, &esc, &text) == 0)
        snprintf(fs, sizeof(fs), "%s/%d/%s/%s", good_s(rcpt), code, good_s(esc), good_s(text));
    h->ctx_log(ctx, PETREL_LOG_INFO,
               "dump1 hook=%d ip=%s port=%d local=%s listener=%s helo=%s user=%s pass=%s "
               "from=%s params=%s rcpt=%s qid=%s size=%llu age=%llu",
               (int)h->hook(ctx), good_s(h->client_ip(ctx)), h->client_port(ctx),
               good_s(h->local_ip(ctx)), good_s(h->listener(ctx)), good_s(h->helo(ctx)),
               good_s(h->auth_user(ctx)), good_s(h->auth_password(ctx)), good_s(h->sender(ctx)),
               good_s(h->sender_params(ctx)), good_s(h->rcpt(ctx)), good_s(h->queue_id(ctx)),
               (unsigned long long)h->message_size(ctx), (unsigned long long)h->message_age(ctx));
    h->ctx_log(ctx, PETREL_LOG_INFO, "dump2 headers=%zu %s subject=%s received1=%s nope=%s",
               h->header_count(ctx), hs, good_s(h->header(ctx, "SUBJECT", 0)),
               good_s(h->header(ctx, "received", 1)), good_s(h->header(ctx, "received", 2)));
    h->ctx_log(
        ctx, PETREL_LOG_INFO,
        "dump3 xip=%s xhost=%s dest=%s attempt=%u reply=%d/%s/%s event=%s failures=%zu "
        "%s past=%d cancelled=%d",
        good_s(h->xbind_ip(ctx)), good_s(h->xbind_hostname(ctx)), good_s(h->destination(ctx)),
        h->attempt(ctx), h->reply_code(ctx), good_s(h->reply_enhanced(ctx)),
        good_s(h->reply_text(ctx)), good_s(h->event_type(ctx)), h->failure_count(ctx), fs,
        h->failure_at(ctx, h->failure_count(ctx), NULL, NULL, NULL, NULL), (int)h->cancelled(ctx));
}

/* Runs one action (a NUL-terminated, trimmed string); may set *ret. */
static void
good_action(struct good *g, struct petrel_ctx *ctx, char *a, int *ret)
{
    const struct petrel_host *h = g->host;
    char *arg = strchr(a, ' ');
    if (arg != NULL)
        *arg++ = '\0';
    int code = 0;
    char *text = NULL;
    if (arg != NULL) {
        code = atoi(arg);
        text = strchr(arg, ' ');
        if (text != NULL)
            text++;
    }
    if (strcmp(a, "dump") == 0) {
        good_dump(g, ctx);
    } else if (strcmp(a, "continue") == 0) {
        h->set_verdict(ctx, PETREL_VERDICT_CONTINUE, 0, NULL);
    } else if (strcmp(a, "accept") == 0) {
        h->set_verdict(ctx, PETREL_VERDICT_ACCEPT, 0, NULL);
    } else if (strcmp(a, "discard") == 0) {
        h->set_verdict(ctx, PETREL_VERDICT_DISCARD, 0, NULL);
    } else if (strcmp(a, "quarantine") == 0) {
        h->set_verdict(ctx, PETREL_VERDICT_QUARANTINE, 0, arg);
    } else if (strcmp(a, "reject") == 0) {
        h->set_verdict(ctx, PETREL_VERDICT_REJECT, code, text);
    } else if (strcmp(a, "tempfail") == 0) {
        h->set_verdict(ctx, PETREL_VERDICT_TEMPFAIL, code, text);
    } else if (strcmp(a, "verdict") == 0) { /* verdict <kind> <code> <text> */
        char *t2 = text != NULL ? strchr(text, ' ') : NULL;
        h->set_verdict(ctx, code, text != NULL ? atoi(text) : 0, t2 != NULL ? t2 + 1 : NULL);
    } else if (strcmp(a, "header") == 0) {
        char *value = arg != NULL ? strchr(arg, ' ') : NULL;
        if (value != NULL)
            *value++ = '\0';
        h->add_header(ctx, arg, value != NULL ? value : "");
    } else if (strcmp(a, "route") == 0) {
        h->set_route(ctx, arg);
    } else if (strcmp(a, "source") == 0) {
        char *host = arg != NULL ? strchr(arg, ' ') : NULL;
        if (host != NULL)
            *host++ = '\0';
        h->set_source(ctx, arg, host);
    } else if (strcmp(a, "retry") == 0) {
        h->set_retry(ctx, (uint64_t)strtoull(arg != NULL ? arg : "0", NULL, 10));
    } else if (strcmp(a, "bounce_now") == 0) {
        h->set_retry_bounce(ctx);
    } else if (strcmp(a, "btext") == 0) {
        char *body = arg != NULL ? strchr(arg, '|') : NULL;
        if (body != NULL)
            *body++ = '\0';
        h->set_bounce_text(ctx, arg, body);
    } else if (strcmp(a, "allow") == 0) {
        h->set_allow(ctx, true);
    } else if (strcmp(a, "deny") == 0) {
        h->set_allow(ctx, false);
    } else if (strcmp(a, "error") == 0) {
        *ret = PETREL_ERROR;
    } else if (strcmp(a, "ret") == 0) {
        *ret = code;
    } else if (strcmp(a, "fail") == 0) {
        h->fail(ctx, "%s", arg != NULL ? arg : "no reason");
    } else if (strcmp(a, "early") == 0) {
        h->complete(ctx);
        *ret = PETREL_PENDING;
    } else if (a[0] != '\0') {
        h->ctx_log(ctx, PETREL_LOG_ERROR, "good: unknown action %s", a);
    }
}

/* Runs the ';'-separated actions of spec (modified in place). */
static int
good_actions(struct good *g, struct petrel_ctx *ctx, char *spec)
{
    int ret = PETREL_OK;
    char *save = NULL;
    for (char *a = strtok_r(spec, ";", &save); a != NULL; a = strtok_r(NULL, ";", &save)) {
        while (*a == ' ')
            a++;
        good_action(g, ctx, a, &ret);
    }
    return ret;
}

static void
good_on_closed(uv_handle_t *h)
{
    struct good_pending *p = h->data;
    free(p->actions);
    free(p);
}

static void
good_pending_unlink(struct good_pending *p)
{
    p->prev->next = p->next;
    p->next->prev = p->prev;
}

static void
good_on_timer(uv_timer_t *t)
{
    struct good_pending *p = t->data;
    struct good *g = p->g;
    good_pending_unlink(p);
    int rc = good_actions(g, p->ctx, p->actions);
    if (rc == PETREL_ERROR)
        g->host->fail(p->ctx, "failed after waiting");
    g->host->ctx_log(p->ctx, PETREL_LOG_INFO, "completed %s cancelled=%d",
                     good_hooks[g->host->hook(p->ctx)], (int)g->host->cancelled(p->ctx));
    g->host->complete(p->ctx);
    uv_close((uv_handle_t *)&p->timer, good_on_closed);
}

static int
good_handler(struct petrel_ctx *ctx, void *data)
{
    struct good *g = data;
    const struct petrel_host *h = g->host;
    const char *hook = good_hooks[h->hook(ctx)];
    h->ctx_log(ctx, PETREL_LOG_INFO, "called %s", hook);
    const char *spec = h->config(h, hook);
    if (spec == NULL)
        return PETREL_OK;
    if (strncmp(spec, "pending:", 8) == 0) {
        char *end = NULL;
        unsigned long ms = strtoul(spec + 8, &end, 10);
        struct good_pending *p = calloc(1, sizeof(*p));
        if (p == NULL)
            return PETREL_ERROR;
        p->g = g;
        p->ctx = ctx;
        p->actions = strdup(end != NULL ? end : "");
        uv_timer_init(h->loop(h), &p->timer);
        p->timer.data = p;
        uv_timer_start(&p->timer, good_on_timer, ms, 0);
        p->next = g->pending.next;
        p->prev = &g->pending;
        g->pending.next->prev = p;
        g->pending.next = p;
        return PETREL_PENDING;
    }
    char *copy = strdup(spec);
    int rc = good_actions(g, ctx, copy);
    free(copy);
    return rc;
}

static void
good_unload(void *data)
{
    struct good *g = data;
    int n = 0;
    while (g->pending.next != &g->pending) {
        struct good_pending *p = g->pending.next;
        good_pending_unlink(p);
        uv_timer_stop(&p->timer);
        uv_close((uv_handle_t *)&p->timer, good_on_closed); /* runs after unload returns */
        n++;
    }
    g->host->log(g->host, PETREL_LOG_INFO, "unload pending=%d", n);
    free(g->name);
    free(g);
}

int
petrel_plugin_init(const struct petrel_host *host, struct petrel_plugin *p)
{
    if (host->abi_version != PETREL_PLUGIN_ABI_VERSION || host->size < sizeof(*host) ||
        !PETREL_HOST_HAS(host, complete))
        return -1;
    if (host->config(host, "fail_init") != NULL) {
        host->log(host, PETREL_LOG_ERROR, "refusing to load (fail_init)");
        return -1;
    }
    struct good *g = calloc(1, sizeof(*g));
    g->host = host;
    const char *name = host->config(host, "name");
    g->name = strdup(name != NULL ? name : "good");
    g->pending.next = g->pending.prev = &g->pending;
    p->abi_version = PETREL_PLUGIN_ABI_VERSION;
    p->size = sizeof(*p);
    p->name = g->name;
    p->data = g;
    p->unload = good_unload;
    for (int i = 0; i < PETREL_HOOK_COUNT; i++)
        if (host->config(host, good_hooks[i]) != NULL)
            p->handlers[i] = good_handler;
    char keys[256] = "";
    size_t used = 0;
    for (size_t i = 0; host->config_key(host, i) != NULL && used < sizeof(keys); i++)
        used += (size_t)snprintf(keys + used, sizeof(keys) - used, "%s%s", i ? "," : "",
                                 host->config_key(host, i));
    host->log(host, PETREL_LOG_INFO, "init keys=%s now=%d", keys, host->now_ms(host) > 0);
    return 0;
}
