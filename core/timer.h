/*
 * timer — one-shot timers on the event loop for engines that must not
 * include <uv.h> (the scheduler). Times are milliseconds.
 */
#ifndef PETREL_TIMER_H
#define PETREL_TIMER_H

#include <stdint.h>

struct uv_loop_s;
struct timer;

/* Fires on the loop thread, once per timer_arm(). */
typedef void timer_cb(struct timer *t, void *arg);

struct timer *timer_new(struct uv_loop_s *loop, timer_cb *cb, void *arg);
/* (Re)arms: cb fires after delay_ms (0: on the next loop iteration). */
void timer_arm(struct timer *t, uint64_t delay_ms);
void timer_stop(struct timer *t);
/* Stops and frees (memory goes in the close callback: run the loop after).
 * NULL is a no-op. */
void timer_free(struct timer *t);
/* Keeps the loop alive while armed (default) or not. */
void timer_set_ref(struct timer *t, int ref);

#endif
