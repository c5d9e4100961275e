/*
 * scheduler — turns queued recipients into deliveries. Recipients are
 * grouped by destination (route key); each destination has a FIFO of ready
 * jobs (one message's recipients for it, ≤ 100 per transaction), a number
 * of sessions (≤ delivery.max_connections_per_destination, and all
 * destinations together ≤ delivery.max_connections) and idle sessions kept
 * for reuse (delivery.connection_cache_time). Deferred recipients wait in a
 * min-heap of wake-up times. Every outcome is written to the spool before
 * it is acted on: state changes, the bounce for recipients that failed
 * together (one DSN per transaction), and the removal of a finished message.
 */
#ifndef PETREL_SCHEDULER_H
#define PETREL_SCHEDULER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct uv_loop_s;
struct petrel_config;
struct spool;
struct dns;
struct sched;

/* cfg (a reference is taken), spool and dns are borrowed and must outlive
 * the scheduler. locals: the machine's non-loopback addresses (copied),
 * the last resort of source selection. */
struct sched *sched_new(struct uv_loop_s *loop, struct petrel_config *cfg, struct spool *sp,
                        struct dns *dns, const char (*locals)[46], size_t nlocals);
/* Schedules every message recovered from the spool (due ones at once,
 * deferred ones at their next attempt time). */
void sched_start(struct sched *s);
/* A new message was committed to the spool: deliver it now. */
void sched_enqueue(struct sched *s, const char *qid);
/* Stops starting deliveries; transactions in progress finish. idle_cb
 * (may be NULL) fires once no session is left. */
void sched_stop(struct sched *s, void (*idle_cb)(void *arg), void *arg);
/* Closes every delivery session now (shutdown timeout). */
void sched_abort(struct sched *s);
size_t sched_sessions(const struct sched *s);
/* After sched_stop and once sessions are gone; run the loop afterwards so
 * timer handles close. NULL is a no-op. */
void sched_free(struct sched *s);

/* Pure: what to do with a recipient that just failed temporarily for the
 * attempts-th time (1 = first attempt). */
struct sched_retry {
    bool give_up;        /* max_attempts reached or max_age passed: bounce */
    int64_t next_ms;     /* epoch ms of the next attempt otherwise */
};
void sched_retry_decide(const struct petrel_config *cfg, uint32_t attempts, int64_t arrival_ms,
                        int64_t now_ms, struct sched_retry *out);

#endif
