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
 *
 * Delivery hooks (hooks.h; Lua, then plugins), each asked only when some
 * engine handles it — otherwise delivery runs synchronously as without
 * any registry:
 *   route(msg, rcpt)          per due recipient, before grouping: a route
 *                             string checked with route_parse ("mx" = the
 *                             recipient domain's MX); nil or invalid (logged):
 *                             the configured routes;
 *   select_source(msg, dest)  per recipient domain (dest) of a message without
 *                             an XBIND override: {ip, hostname}, checked with
 *                             source_check_hook (else logged and ignored);
 *   retry(msg, rcpt, attempt, reply)  per temporary failure younger than
 *                             retry.max_age: seconds or "bounce" (see
 *                             sched_retry_decide_hook); nil: retry.schedule;
 *   bounce(msg, failures)     per non-delivery DSN: its Subject and text part;
 *   event(ev)                 per recipient outcome, once it is persisted.
 * A recipient waiting for a hook stays out of every other job; the outcome
 * of a transaction waits for its retry and bounce hooks before anything is
 * persisted, so persist-then-act holds. A hook failure means the built-in
 * behaviour. sched_stop() cancels the calls: waiting outcomes are settled
 * with the built-in decisions, waiting recipients go back to the queue.
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
struct hooks;
struct sched;

/* cfg (a reference is taken), spool and dns are borrowed and must outlive
 * the scheduler. locals: the machine's non-loopback addresses (copied),
 * the last resort of source selection. */
struct sched *sched_new(struct uv_loop_s *loop, struct petrel_config *cfg, struct spool *sp,
                        struct dns *dns, const char (*locals)[46], size_t nlocals);
/* The delivery hooks to ask (borrowed; NULL: none, the default). h must
 * outlive its use: call sched_free() — which cancels event calls still in
 * flight — before hooks_free(). Replacing a registry settles whatever
 * waits for the old one as sched_stop() does. */
void sched_set_hooks(struct sched *s, struct hooks *h);
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

/* What the retry hook answered. */
struct sched_retry_hook {
    bool set;            /* false: nil (or no hook, or a failure): the schedule */
    bool bounce;         /* "bounce": give up now */
    uint64_t seconds;    /* otherwise: the delay until the next attempt */
};
/* Pure: sched_retry_decide with the hook's answer (hook may be NULL). An
 * answer replaces retry.schedule and retry.max_attempts; retry.max_age
 * still bounds everything: past it the recipient bounces whatever the hook
 * says, and no next attempt is set later than arrival + max_age. */
void sched_retry_decide_hook(const struct petrel_config *cfg, uint32_t attempts,
                             int64_t arrival_ms, int64_t now_ms,
                             const struct sched_retry_hook *hook, struct sched_retry *out);

#endif
