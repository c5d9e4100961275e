/*
 * timer — uv_timer_t wrapper; the memory holding the handle is freed from
 * its close callback (STYLE.md §4.3).
 */
#include "timer.h"

#include <uv.h>

#include "util.h"

struct timer {
    uv_timer_t h;
    timer_cb *cb;
    void *arg;
};

static void
timer_on_fire(uv_timer_t *h)
{
    struct timer *t = h->data;
    t->cb(t, t->arg);
}

struct timer *
timer_new(struct uv_loop_s *loop, timer_cb *cb, void *arg)
{
    struct timer *t = xcalloc(1, sizeof(*t));
    uv_timer_init(loop, &t->h);
    t->h.data = t;
    t->cb = cb;
    t->arg = arg;
    return t;
}

void
timer_arm(struct timer *t, uint64_t delay_ms)
{
    uv_timer_start(&t->h, timer_on_fire, delay_ms, 0);
}

void
timer_stop(struct timer *t)
{
    uv_timer_stop(&t->h);
}

static void
timer_on_close(uv_handle_t *h)
{
    free(h->data);
}

void
timer_free(struct timer *t)
{
    if (t == NULL)
        return;
    uv_timer_stop(&t->h);
    uv_close((uv_handle_t *)&t->h, timer_on_close);
}

void
timer_set_ref(struct timer *t, int ref)
{
    if (ref)
        uv_ref((uv_handle_t *)&t->h);
    else
        uv_unref((uv_handle_t *)&t->h);
}
