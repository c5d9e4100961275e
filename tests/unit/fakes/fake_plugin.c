/* fake_plugin — see fake_plugin.h. */
#include "fake_plugin.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "util.h"

struct plugins {
    uv_loop_t *loop;                          /* borrowed */
    bool has[PLUGIN_HOOK_COUNT];
    struct fake_plugin_answer ans[PLUGIN_HOOK_COUNT]; /* strings owned */
    unsigned calls[PLUGIN_HOOK_COUNT];
    char last_rcpt[256];
    char last_event[32];
    struct plugin_call *pending;              /* list of calls in flight */
    unsigned npending;
};

struct plugin_call {
    struct plugins *ps;
    struct plugin_call *prev, *next;
    uv_timer_t timer;                         /* freed from its close callback */
    enum plugin_hook h;
    plugin_done_cb *cb;
    void *arg;
    bool in_cb;
};

static const char *const fake_names[PLUGIN_HOOK_COUNT] = {
    "connect", "helo",          "auth",  "mail_from", "rcpt_to", "data",
    "xbind",   "route", "select_source", "retry",     "bounce",  "event",
};

const char *
plugin_hook_name(enum plugin_hook h)
{
    return (int)h >= 0 && h < PLUGIN_HOOK_COUNT ? fake_names[h] : NULL;
}

int
plugin_hook_by_name(const char *name)
{
    for (int i = 0; i < PLUGIN_HOOK_COUNT; i++)
        if (strcmp(fake_names[i], name) == 0)
            return i;
    return -1;
}

static char *
fake_dup(const char *s)
{
    return s ? xstrdup(s) : NULL;
}

static void
fake_answer_clear(struct fake_plugin_answer *a)
{
    free((char *)a->route);
    free((char *)a->source_ip);
    free((char *)a->source_hostname);
    free((char *)a->subject);
    free((char *)a->text);
    memset(a, 0, sizeof(*a));
}

struct plugins *
fake_plugins_new(struct uv_loop_s *loop)
{
    struct plugins *ps = xcalloc(1, sizeof(*ps));
    ps->loop = loop;
    return ps;
}

void
fake_plugins_answer(struct plugins *ps, enum plugin_hook h, const struct fake_plugin_answer *a)
{
    fake_answer_clear(&ps->ans[h]);
    ps->has[h] = a != NULL;
    if (a == NULL)
        return;
    ps->ans[h] = *a;
    ps->ans[h].route = fake_dup(a->route);
    ps->ans[h].source_ip = fake_dup(a->source_ip);
    ps->ans[h].source_hostname = fake_dup(a->source_hostname);
    ps->ans[h].subject = fake_dup(a->subject);
    ps->ans[h].text = fake_dup(a->text);
}

unsigned
fake_plugins_calls(const struct plugins *ps, enum plugin_hook h)
{
    return ps->calls[h];
}

const char *
fake_plugins_last_rcpt(const struct plugins *ps)
{
    return ps->last_rcpt;
}

const char *
fake_plugins_last_event(const struct plugins *ps)
{
    return ps->last_event;
}

unsigned
fake_plugins_pending(const struct plugins *ps)
{
    return ps->npending;
}

bool
plugins_have(const struct plugins *ps, enum plugin_hook h)
{
    return ps != NULL && h < PLUGIN_HOOK_COUNT && ps->has[h];
}

static void
fake_on_close(uv_handle_t *t)
{
    free(t->data);
}

static void
fake_unlink(struct plugin_call *c)
{
    struct plugins *ps = c->ps;
    if (c->prev)
        c->prev->next = c->next;
    else
        ps->pending = c->next;
    if (c->next)
        c->next->prev = c->prev;
    ps->npending--;
}

static void
fake_on_timer(uv_timer_t *t)
{
    struct plugin_call *c = t->data;
    struct plugins *ps = c->ps;
    fake_unlink(c);
    struct plua_result r;
    memset(&r, 0, sizeof(r));
    verdict_init(&r.verdict);
    if (!ps->has[c->h]) {
        r.status = PLUA_NO_HOOK;
    } else {
        const struct fake_plugin_answer *a = &ps->ans[c->h];
        r.status = a->status;
        r.route = fake_dup(a->route);
        r.source_ip = fake_dup(a->source_ip);
        r.source_hostname = fake_dup(a->source_hostname);
        r.retry_set = a->retry_set;
        r.bounce = a->bounce;
        r.retry_seconds = a->retry_seconds;
        r.subject = fake_dup(a->subject);
        r.text = fake_dup(a->text);
    }
    c->in_cb = true;
    c->cb(c, &r, c->arg);
    free(r.route);
    free(r.source_ip);
    free(r.source_hostname);
    free(r.subject);
    free(r.text);
    verdict_clear(&r.verdict);
    uv_close((uv_handle_t *)&c->timer, fake_on_close);
}

struct plugin_call *
plugin_call(struct plugins *ps, enum plugin_hook h, const struct plua_args *args,
            plugin_done_cb *cb, void *arg)
{
    struct plugin_call *c = xcalloc(1, sizeof(*c));
    c->ps = ps;
    c->h = h;
    c->cb = cb;
    c->arg = arg;
    ps->calls[h]++;
    snprintf(ps->last_rcpt, sizeof(ps->last_rcpt), "%s", args->rcpt ? args->rcpt : "");
    snprintf(ps->last_event, sizeof(ps->last_event), "%s",
             args->event_type ? args->event_type : "");
    c->next = ps->pending;
    if (ps->pending)
        ps->pending->prev = c;
    ps->pending = c;
    ps->npending++;
    uv_timer_init(ps->loop, &c->timer);
    c->timer.data = c;
    uv_timer_start(&c->timer, fake_on_timer, 0, 0);
    return c;
}

void
plugin_call_cancel(struct plugin_call *c)
{
    if (c == NULL || c->in_cb)
        return;
    fake_unlink(c);
    uv_timer_stop(&c->timer);
    uv_close((uv_handle_t *)&c->timer, fake_on_close);
}

void
fake_plugins_free(struct plugins *ps)
{
    if (ps == NULL)
        return;
    while (ps->pending != NULL)
        plugin_call_cancel(ps->pending);
    for (int i = 0; i < PLUGIN_HOOK_COUNT; i++)
        fake_answer_clear(&ps->ans[i]);
    free(ps);
}
