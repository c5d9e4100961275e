/*
 * scheduler — delivery scheduling (see scheduler.h for the model).
 *
 * Owns: destinations (hash by route key) with their ready-job FIFOs and
 * sessions, the per-message in-flight bookkeeping (which recipients are in
 * a transaction or waiting for a spool commit), and the wake-up heap.
 * Borrows: the spool (source of truth for every recipient's state), dns,
 * the config. Talks to the network only through smtp_client and dns.
 *
 * Persist, then act: a transaction's outcome becomes spool records (the
 * bounce message first, then each recipient's new state, then the removal
 * of a finished message), queued in one loop turn so they share a group
 * commit; the in-memory follow-up (timers, removal, enqueueing the bounce)
 * happens in the commit callbacks. A crash between the two can only repeat
 * a bounce, never lose one or re-deliver a recipient whose state was
 * committed.
 *
 * Message content is read with spool_read_content (a pread from the page
 * cache, synchronous on the loop).
 *
 * Hooks (hooks.h; see scheduler.h for what each point does). Without any
 * registered hook every path below is the synchronous one. With hooks:
 *   a plan (struct sched_plan) holds a message's due recipients (busy)
 *   while route and then select_source answer, then turns them into jobs;
 *   a pending outcome (struct sched_pend) holds a finished transaction's
 *   replies, the built-in decisions and the returned content while retry
 *   and then bounce answer, then is applied exactly as a synchronous one
 *   (records queued in one loop turn);
 *   event calls (struct sched_ev) start from the commit callbacks.
 * Each is on a list of the scheduler, so stop and free can cancel them.
 */
#include "scheduler.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <stdio.h>
#include <string.h>
#include <sys/un.h>

#include "bounce.h"
#include "buf.h"
#include "config.h"
#include "dns.h"
#include "header.h"
#include "hooks.h"
#include "log.h"
#include "route.h"
#include "smtp_client.h"
#include "smtp_parse.h"
#include "source.h"
#include "spool.h"
#include "timer.h"
#include "util.h"

#define SCHED_RCPTS_PER_TXN 100
#define SCHED_BUCKETS 4096

struct sched_job {
    struct sched_job *next;
    char qid[SPOOL_QID_SIZE];
    size_t n;
    size_t cap;                       /* ≤ SCHED_RCPTS_PER_TXN */
    size_t idx[];                     /* recipient indexes in the envelope */
};

struct sched_sess;

struct sched_dest {
    struct sched_dest *hnext;         /* hash chain */
    char key[ROUTE_KEY_MAX + 2 * (SOURCE_IP_SIZE + 260)];
    struct route route;
    struct source_choice src;         /* source address and EHLO name of its sessions */
    struct sched_job *head, *tail;    /* ready jobs, owned */
    size_t nready;
    unsigned sessions;                /* resolving, connecting or connected */
    unsigned starting;                /* not yet READY */
    struct sched_sess *idle;          /* idle sessions (via idle_next) */
};

struct sched_sess {
    struct sched *s;                  /* borrowed */
    struct sched_dest *dest;          /* borrowed: destinations live as long as s */
    struct sched_sess *prev, *next;   /* s->sessions */
    struct sched_sess *idle_next;
    struct dns_query *q;              /* while resolving */
    struct smtpc *c;                  /* once started; freed by smtp_client after CLOSED */
    struct timer *idle_timer;         /* owned */
    struct sched_job *job;            /* owned: the transaction in flight */
    bool ready_seen;
    bool idle;
    /* copies handed to smtpc for the transaction in flight */
    struct buf content;
    char *sender;
    char *envid;
    const char **rcpts;
    const char **orcpt;
    unsigned *notify;
    char **owned;                     /* strings behind rcpts/orcpt */
    size_t nowned;
};

struct sched_msg {
    struct sched_msg *hnext;
    char qid[SPOOL_QID_SIZE];
    size_t nrcpts;
    uint8_t *busy;                    /* owned: per recipient, in a job or a commit */
    unsigned commits;                 /* spool records in flight for this message */
    bool removing;
};

struct sched_plan;
struct sched_pend;
struct sched_ev;

struct sched_wake {
    int64_t at_ms;
    char qid[SPOOL_QID_SIZE];
};

struct sched {
    struct uv_loop_s *loop;
    struct petrel_config *cfg;        /* owned reference */
    struct spool *spool;              /* borrowed */
    struct dns *dns;                  /* borrowed */
    struct sched_dest *dests[SCHED_BUCKETS];
    struct sched_msg *msgs[SCHED_BUCKETS];
    struct sched_sess *sessions;
    size_t nsessions;
    struct sched_wake *heap;          /* owned, min-heap on at_ms */
    size_t nheap, heapcap;
    struct timer *wake_timer;         /* owned */
    int64_t wake_armed_at;
    bool stopping;
    void (*idle_cb)(void *arg);
    void *idle_arg;
    char (*locals)[SOURCE_IP_SIZE];   /* owned: the machine's non-loopback addresses */
    size_t nlocals;
    struct hooks *hooks;              /* borrowed or NULL: the delivery hooks */
    struct sched_plan *plans;         /* owned: recipients waiting for route/select_source */
    struct sched_pend *pends;         /* owned: outcomes waiting for retry/bounce */
    struct sched_ev *events;          /* owned: event calls in flight */
};

static void sched_pump(struct sched *s, struct sched_dest *d);
static void sched_consider(struct sched *s, const char *qid);
static void sched_sess_next(struct sched_sess *ss);
static void sched_settle(struct sched *s, struct sched_msg *m);
static void sched_check_idle(struct sched *s);
static void sched_plan_start(struct sched *s, const struct spool_envelope *env, size_t *due,
                             size_t n);

/* ---- small tables ------------------------------------------------------ */

static unsigned
sched_hash(const char *k)
{
    unsigned h = 2166136261u;
    for (; *k; k++)
        h = (h ^ (unsigned char)ascii_tolower((unsigned char)*k)) * 16777619u;
    return h % SCHED_BUCKETS;
}

/* One destination per (next hop, source address, EHLO name): connections
 * are only reused among messages that agree on all three. */
static struct sched_dest *
sched_dest_get(struct sched *s, const struct route *r, const struct source_choice *src)
{
    char rkey[ROUTE_KEY_MAX];
    unsigned port = r->lmtp ? ROUTE_LMTP_PORT : s->cfg->delivery.port;
    route_key(r, port, rkey, sizeof(rkey));
    char key[ROUTE_KEY_MAX + 2 * (SOURCE_IP_SIZE + 260)];
    snprintf(key, sizeof(key), "%s|%s|%s|%s|%s", rkey, src->ip[SOURCE_V4],
             src->hostname[SOURCE_V4], src->ip[SOURCE_V6], src->hostname[SOURCE_V6]);
    unsigned h = sched_hash(key);
    for (struct sched_dest *d = s->dests[h]; d; d = d->hnext)
        if (ascii_casecmp(d->key, key) == 0)
            return d;
    struct sched_dest *d = xcalloc(1, sizeof(*d));
    if (!str_copy(d->key, sizeof(d->key), key))
        PANIC("route key too long: %s", key);
    d->route = *r;
    d->src = *src;
    d->hnext = s->dests[h];
    s->dests[h] = d;
    return d;
}

static struct sched_msg *
sched_msg_find(struct sched *s, const char *qid)
{
    for (struct sched_msg *m = s->msgs[sched_hash(qid)]; m; m = m->hnext)
        if (strcmp(m->qid, qid) == 0)
            return m;
    return NULL;
}

static struct sched_msg *
sched_msg_get(struct sched *s, const char *qid, size_t nrcpts)
{
    struct sched_msg *m = sched_msg_find(s, qid);
    if (m)
        return m;
    m = xcalloc(1, sizeof(*m));
    memcpy(m->qid, qid, sizeof(m->qid));
    m->nrcpts = nrcpts;
    m->busy = xcalloc(nrcpts ? nrcpts : 1, 1);
    unsigned h = sched_hash(qid);
    m->hnext = s->msgs[h];
    s->msgs[h] = m;
    return m;
}

/* Drops the bookkeeping of a message with nothing in flight. */
static void
sched_msg_release(struct sched *s, struct sched_msg *m)
{
    if (m->commits > 0 || m->removing)
        return;
    for (size_t i = 0; i < m->nrcpts; i++)
        if (m->busy[i])
            return;
    struct sched_msg **pp = &s->msgs[sched_hash(m->qid)];
    while (*pp != m)
        pp = &(*pp)->hnext;
    *pp = m->hnext;
    free(m->busy);
    free(m);
}

/* ---- wake-up heap ------------------------------------------------------ */

static void
sched_heap_swap(struct sched_wake *a, struct sched_wake *b)
{
    struct sched_wake t = *a;
    *a = *b;
    *b = t;
}

static void
sched_wake_arm(struct sched *s)
{
    if (s->stopping || s->nheap == 0) {
        timer_stop(s->wake_timer);
        s->wake_armed_at = 0;
        return;
    }
    int64_t at = s->heap[0].at_ms;
    if (s->wake_armed_at == at)
        return;
    int64_t now = now_ms();
    s->wake_armed_at = at;
    timer_arm(s->wake_timer, at > now ? (uint64_t)(at - now) : 0);
}

static void
sched_heap_push(struct sched *s, int64_t at, const char *qid)
{
    if (s->nheap == s->heapcap) {
        s->heapcap = s->heapcap ? s->heapcap * 2 : 64;
        s->heap = xreallocarray(s->heap, s->heapcap, sizeof(*s->heap));
    }
    size_t i = s->nheap++;
    s->heap[i].at_ms = at;
    memcpy(s->heap[i].qid, qid, SPOOL_QID_SIZE);
    while (i > 0 && s->heap[(i - 1) / 2].at_ms > s->heap[i].at_ms) {
        sched_heap_swap(&s->heap[(i - 1) / 2], &s->heap[i]);
        i = (i - 1) / 2;
    }
    sched_wake_arm(s);
}

static void
sched_heap_pop(struct sched *s)
{
    s->heap[0] = s->heap[--s->nheap];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < s->nheap && s->heap[l].at_ms < s->heap[m].at_ms)
            m = l;
        if (r < s->nheap && s->heap[r].at_ms < s->heap[m].at_ms)
            m = r;
        if (m == i)
            break;
        sched_heap_swap(&s->heap[i], &s->heap[m]);
        i = m;
    }
}

static void
sched_on_wake(struct timer *t, void *arg)
{
    struct sched *s = arg;
    (void)t;
    s->wake_armed_at = 0;
    int64_t now = now_ms();
    while (s->nheap > 0 && s->heap[0].at_ms <= now && !s->stopping) {
        char qid[SPOOL_QID_SIZE];
        memcpy(qid, s->heap[0].qid, sizeof(qid));
        sched_heap_pop(s);
        sched_consider(s, qid);
    }
    sched_wake_arm(s);
}

/* ---- pure decisions ---------------------------------------------------- */

void
sched_retry_decide(const struct petrel_config *cfg, uint32_t attempts, int64_t arrival_ms,
                   int64_t now_ms_, struct sched_retry *out)
{
    out->give_up = false;
    out->next_ms = now_ms_;
    if (attempts >= cfg->retry.max_attempts
        || (uint64_t)(now_ms_ - arrival_ms) >= cfg->retry.max_age_ms) {
        out->give_up = true;
        return;
    }
    size_t n = cfg->retry.nschedule;
    uint64_t wait = n == 0 ? 60000 : cfg->retry.schedule_ms[attempts - 1 < n ? attempts - 1 : n - 1];
    out->next_ms = now_ms_ + (int64_t)wait;
}

void
sched_retry_decide_hook(const struct petrel_config *cfg, uint32_t attempts, int64_t arrival_ms,
                        int64_t now_ms_, const struct sched_retry_hook *hook,
                        struct sched_retry *out)
{
    if (hook == NULL || !hook->set) {
        sched_retry_decide(cfg, attempts, arrival_ms, now_ms_, out);
        return;
    }
    out->give_up = false;
    out->next_ms = now_ms_;
    int64_t deadline = arrival_ms + (int64_t)cfg->retry.max_age_ms;
    if (hook->bounce || now_ms_ >= deadline) {
        out->give_up = true;
        return;
    }
    uint64_t left = (uint64_t)(deadline - now_ms_);
    uint64_t wait = hook->seconds > left / 1000 ? left : hook->seconds * 1000;
    out->next_ms = now_ms_ + (int64_t)wait;
}

/* ---- consider: turn due recipients into jobs --------------------------- */

/* The recipient's domain, lower-cased, into out. */
static void
sched_rcpt_domain(const char *rcpt, char *out, size_t size)
{
    struct span dom = smtp_addr_domain(rcpt);
    size_t n = dom.len < size - 1 ? dom.len : size - 1;
    for (size_t i = 0; i < n; i++)
        out[i] = (char)ascii_tolower((unsigned char)dom.p[i]);
    out[n] = '\0';
}

/* Source selection for the recipients of env going to rcpt_domain; hook_ip
 * and hook_hostname: the select_source hook's checked answer, or NULL. */
static void
sched_source_for(struct sched *s, const struct spool_envelope *env, const char *rcpt_domain,
                 const char *hook_ip, const char *hook_hostname, struct source_choice *out)
{
    struct source_locals locals = { s->locals, s->nlocals };
    struct source_query q = {
        .sender = env->sender,
        .rcpt_domain = rcpt_domain,
        .listener = env->listener,
        .listener_ip = env->local_ip,
        .client_ip = env->client_ip,
        .xbind_ip = env->xbind_ip,
        .xbind_hostname = env->xbind_hostname,
        .hook_ip = hook_ip,
        .hook_hostname = hook_hostname,
    };
    source_select(s->cfg, &locals, &q, NULL, out);
}

static void
sched_job_append(struct sched_dest *d, struct sched_job *j)
{
    j->next = NULL;
    if (d->tail)
        d->tail->next = j;
    else
        d->head = j;
    d->tail = j;
    d->nready++;
}

static struct sched_job *
sched_job_pop(struct sched_dest *d)
{
    struct sched_job *j = d->head;
    if (j == NULL)
        return NULL;
    d->head = j->next;
    if (d->head == NULL)
        d->tail = NULL;
    d->nready--;
    j->next = NULL;
    return j;
}

/* The jobs one pass opens: one per destination, split at
 * SCHED_RCPTS_PER_TXN recipients. */
struct sched_batch {
    struct sched_dest **dests;        /* owned: destination of each open job */
    struct sched_job **jobs;          /* owned: the open jobs (owned by their destination) */
    size_t nopen;
    struct sched_dest **touched;      /* owned: destinations that got a job */
    size_t ntouched;
};

static void
sched_batch_init(struct sched_batch *b, size_t nrcpts)
{
    size_t n = nrcpts ? nrcpts : 1;
    b->dests = xcalloc(n, sizeof(*b->dests));
    b->jobs = xcalloc(n, sizeof(*b->jobs));
    b->touched = xcalloc(n, sizeof(*b->touched));
    b->nopen = b->ntouched = 0;
}

/* Adds recipient i of message qid to d's open job; left: recipients of the
 * pass not yet added, counting this one (sizes a new job). */
static void
sched_batch_add(struct sched_batch *b, struct sched_dest *d, const char *qid, size_t i,
                size_t left)
{
    size_t k = 0;
    while (k < b->nopen && b->dests[k] != d)
        k++;
    if (k == b->nopen || b->jobs[k]->n == b->jobs[k]->cap) {
        /* sized for the recipients left, not for a full transaction: a
         * backlog of one-recipient messages stays small in memory */
        size_t cap = left < SCHED_RCPTS_PER_TXN ? left : SCHED_RCPTS_PER_TXN;
        struct sched_job *j = xcalloc(1, sizeof(*j) + cap * sizeof(j->idx[0]));
        j->cap = cap;
        memcpy(j->qid, qid, sizeof(j->qid));
        sched_job_append(d, j);
        if (k == b->nopen)
            b->nopen++;
        b->dests[k] = d;
        b->jobs[k] = j;
        size_t t = 0;
        while (t < b->ntouched && b->touched[t] != d)
            t++;
        if (t == b->ntouched)
            b->touched[b->ntouched++] = d;
    }
    b->jobs[k]->idx[b->jobs[k]->n++] = i;
}

/* Starts what the pass queued and frees the batch. */
static void
sched_batch_run(struct sched *s, struct sched_batch *b)
{
    for (size_t t = 0; t < b->ntouched; t++)
        sched_pump(s, b->touched[t]);
    free(b->dests);
    free(b->jobs);
    free(b->touched);
}

/* Whether due recipients of env must wait for route / select_source. */
static bool
sched_plan_wanted(const struct sched *s, const struct spool_envelope *env)
{
    if (s->hooks == NULL || s->stopping)
        return false;
    if (hooks_have(s->hooks, PLUGIN_HOOK_ROUTE))
        return true;
    return hooks_have(s->hooks, PLUGIN_HOOK_SELECT_SOURCE)
           && !(env->xbind_ip != NULL && env->xbind_ip[0] != '\0');
}

static void
sched_consider(struct sched *s, const char *qid)
{
    const struct spool_envelope *env = spool_get(s->spool, qid);
    if (env == NULL || (env->flags & SPOOL_F_QUARANTINED))
        return;
    struct sched_msg *m = sched_msg_get(s, qid, env->nrcpts);
    if (m->removing) {
        sched_msg_release(s, m);
        return;
    }
    int64_t now = now_ms();
    int64_t earliest = INT64_MAX;
    /* with route / select_source hooks, the due recipients wait in a plan */
    bool plan = sched_plan_wanted(s, env);
    size_t *due = NULL;
    size_t ndue = 0;
    struct sched_batch b;
    sched_batch_init(&b, plan ? 0 : env->nrcpts);
    if (plan)
        due = xcalloc(env->nrcpts ? env->nrcpts : 1, sizeof(*due));
    /* one source choice per recipient domain in this pass, so a random pick
     * does not scatter one message's recipients over several connections */
    char last_domain[SMTP_DOMAIN_MAX + 1] = "";
    struct source_choice src;
    bool have_src = false;
    for (size_t i = 0; i < env->nrcpts; i++) {
        const struct spool_rcpt *r = &env->rcpts[i];
        if (m->busy[i])
            continue;
        if (r->state == SPOOL_RCPT_DEFERRED && r->next_attempt_ms > now) {
            if (r->next_attempt_ms < earliest)
                earliest = r->next_attempt_ms;
            continue;
        }
        if (r->state != SPOOL_RCPT_PENDING && r->state != SPOOL_RCPT_DEFERRED)
            continue;
        if (s->stopping)
            continue;
        m->busy[i] = 1;
        if (plan) {
            due[ndue++] = i;
            continue;
        }
        char domain[SMTP_DOMAIN_MAX + 1];
        sched_rcpt_domain(r->addr, domain, sizeof(domain));
        struct route rt;
        route_for_domain(s->cfg, domain, &rt);
        if (!have_src || strcmp(domain, last_domain) != 0) {
            sched_source_for(s, env, domain, NULL, NULL, &src);
            memcpy(last_domain, domain, sizeof(last_domain));
            have_src = true;
        }
        sched_batch_add(&b, sched_dest_get(s, &rt, &src), qid, i, env->nrcpts - i);
    }
    if (earliest != INT64_MAX)
        sched_heap_push(s, earliest, qid);
    if (ndue > 0) {
        sched_plan_start(s, env, due, ndue); /* takes due */
        sched_batch_run(s, &b);
        sched_msg_release(s, m);
        return;
    }
    free(due);
    if (b.ntouched == 0 && earliest == INT64_MAX && !m->removing && m->commits == 0) {
        bool idle = true;
        for (size_t i = 0; i < m->nrcpts; i++)
            idle = idle && !m->busy[i];
        if (idle) {
            /* every recipient is final (e.g. recovered after a crash that
             * came before the removal): remove the message */
            sched_batch_run(s, &b);
            sched_settle(s, m);
            return;
        }
    }
    sched_batch_run(s, &b);
    sched_msg_release(s, m);
}

/* ---- hook arguments ------------------------------------------------------ */

/* A message's header fields for the msg view, parsed from its content. */
struct sched_headers {
    struct header_field *v;            /* owned array; strings in store */
    size_t n;
    char *store;                      /* owned */
};

static void
sched_headers_parse(struct span c, struct sched_headers *out)
{
    out->v = header_parse(c, &out->n, &out->store);
}

/* The headers of content, or of qid's stored content when content is empty. */
static void
sched_headers_load(const struct sched *s, const char *qid, const struct buf *content,
                   struct sched_headers *out)
{
    if (content != NULL && content->len > 0) {
        sched_headers_parse((struct span){ buf_ptr(content), content->len }, out);
        return;
    }
    struct buf b;
    buf_init(&b);
    if (spool_read_content(s->spool, qid, &b) != 0)
        buf_reset(&b); /* no headers then */
    sched_headers_parse((struct span){ buf_ptr(&b), b.len }, out);
    buf_reset(&b);
}

static void
sched_headers_free(struct sched_headers *h)
{
    free(h->v);
    free(h->store);
    memset(h, 0, sizeof(*h));
}

/* msg = {id, from, size, age, headers} of env into a. */
static void
sched_msg_args(const struct spool_envelope *env, const struct sched_headers *h, int64_t now,
               struct plua_args *a)
{
    memset(a, 0, sizeof(*a));
    a->queue_id = env->qid;
    a->from = env->sender;
    a->size = env->content_size;
    a->age = now > env->arrival_ms ? (uint64_t)(now - env->arrival_ms) / 1000 : 0;
    a->headers = h->v;
    a->nheaders = h->n;
    a->listener = env->listener;
    a->local_ip = env->local_ip;
    a->ip = env->client_ip;
    a->helo = env->client_helo;
    a->xbind_ip = env->xbind_ip;
    a->xbind_hostname = env->xbind_hostname;
}

/* ---- plans: route and select_source ------------------------------------- */

struct sched_plan_rcpt {
    struct sched_plan *plan;          /* borrowed: the owner */
    size_t idx;                       /* recipient index in the envelope */
    size_t dom;                       /* index into plan->doms */
    struct route route;
    struct hooks_call *call;          /* pending route call, or NULL */
};

struct sched_plan_dom {
    struct sched_plan *plan;          /* borrowed: the owner */
    char domain[SMTP_DOMAIN_MAX + 1];
    struct hooks_call *call;          /* pending select_source call, or NULL */
    char *ip, *hostname;              /* owned: the hook's checked answer, or NULL */
};

struct sched_plan {
    struct sched_plan *prev, *next;   /* s->plans */
    struct sched *s;                  /* borrowed */
    char qid[SPOOL_QID_SIZE];
    struct sched_plan_rcpt *rcpts;    /* owned: the due recipients (busy in sched_msg) */
    size_t n;
    struct sched_plan_dom *doms;      /* owned: their distinct domains */
    size_t ndoms;
    size_t pending;                   /* hook calls outstanding in this phase */
    struct sched_headers headers;     /* owned */
};

static void
sched_plan_free(struct sched_plan *p)
{
    struct sched *s = p->s;
    if (p->prev)
        p->prev->next = p->next;
    else
        s->plans = p->next;
    if (p->next)
        p->next->prev = p->prev;
    for (size_t k = 0; k < p->n; k++)
        hooks_call_cancel(p->rcpts[k].call);
    for (size_t d = 0; d < p->ndoms; d++) {
        hooks_call_cancel(p->doms[d].call);
        free(p->doms[d].ip);
        free(p->doms[d].hostname);
    }
    free(p->rcpts);
    free(p->doms);
    sched_headers_free(&p->headers);
    free(p);
}

/* Gives the plan's recipients back (not delivered now) and frees it. */
static void
sched_plan_drop(struct sched_plan *p)
{
    struct sched *s = p->s;
    struct sched_msg *m = sched_msg_find(s, p->qid);
    if (m != NULL)
        for (size_t k = 0; k < p->n; k++)
            if (p->rcpts[k].idx < m->nrcpts)
                m->busy[p->rcpts[k].idx] = 0;
    sched_plan_free(p);
    if (m != NULL)
        sched_msg_release(s, m);
}

/* Every answer is in: the recipients become jobs. */
static void
sched_plan_finish(struct sched_plan *p)
{
    struct sched *s = p->s;
    const struct spool_envelope *env = spool_get(s->spool, p->qid);
    struct sched_msg *m = sched_msg_find(s, p->qid);
    if (env == NULL || m == NULL || m->removing || s->stopping) {
        sched_plan_drop(p);
        return;
    }
    struct sched_batch b;
    sched_batch_init(&b, p->n);
    struct source_choice *src = xcalloc(p->ndoms ? p->ndoms : 1, sizeof(*src));
    for (size_t d = 0; d < p->ndoms; d++)
        sched_source_for(s, env, p->doms[d].domain, p->doms[d].ip, p->doms[d].hostname,
                         &src[d]);
    for (size_t k = 0; k < p->n; k++) {
        const struct sched_plan_rcpt *r = &p->rcpts[k];
        sched_batch_add(&b, sched_dest_get(s, &r->route, &src[r->dom]), p->qid, r->idx,
                        p->n - k);
    }
    free(src);
    /* the recipients now belong to their jobs: only the plan goes */
    sched_plan_free(p);
    sched_batch_run(s, &b);
}

static void
sched_on_source(struct hooks_call *c, struct plua_result *res, void *arg)
{
    struct sched_plan_dom *d = arg;
    struct sched_plan *p = d->plan;
    (void)c;
    d->call = NULL;
    if (res->status == PLUA_OK && res->source_ip != NULL) {
        const char *why = source_check_hook(res->source_ip, res->source_hostname);
        if (why == NULL) {
            d->ip = res->source_ip;
            d->hostname = res->source_hostname;
            res->source_ip = res->source_hostname = NULL;
        } else {
            char vis[128];
            log_msg(LOG_WARNING, p->qid, "hook select_source: %s for %s: %s; using the "
                    "configured source selection",
                    str_vis(vis, sizeof(vis), res->source_ip, strlen(res->source_ip)),
                    d->domain, why);
        }
    }
    if (--p->pending == 0)
        sched_plan_finish(p);
}

/* Routes are known: one select_source call per recipient domain (unless an
 * XBIND override decides), then the jobs. */
static void
sched_plan_sources(struct sched_plan *p)
{
    struct sched *s = p->s;
    const struct spool_envelope *env = spool_get(s->spool, p->qid);
    if (env == NULL || s->stopping || s->hooks == NULL
        || !hooks_have(s->hooks, PLUGIN_HOOK_SELECT_SOURCE)
        || (env->xbind_ip != NULL && env->xbind_ip[0] != '\0')) {
        sched_plan_finish(p);
        return;
    }
    int64_t now = now_ms();
    p->pending = p->ndoms;
    for (size_t d = 0; d < p->ndoms; d++) {
        struct plua_args a;
        sched_msg_args(env, &p->headers, now, &a);
        a.destination = p->doms[d].domain;
        p->doms[d].call = hooks_call(s->hooks, PLUGIN_HOOK_SELECT_SOURCE, &a, sched_on_source,
                                     &p->doms[d]);
    }
}

/* The route hook's answer for recipient rcpt (domain), or the configured
 * route when it gave none or an invalid one (logged). */
static void
sched_hook_route(const struct sched *s, const char *qid, const char *rcpt, const char *domain,
                 const struct plua_result *res, struct route *out)
{
    if (res->status == PLUA_OK && res->route != NULL) {
        const char *why = route_parse(res->route, out);
        if (why == NULL) {
            if (out->kind == ROUTE_MX && out->host[0] == '\0')
                route_for_domain(NULL, domain, out); /* "mx": the recipient domain's own */
            return;
        }
        char v1[600], v2[300];
        log_msg(LOG_WARNING, qid, "hook route: <%s>: invalid route \"%s\": %s; using the "
                "configured routes", str_vis(v1, sizeof(v1), rcpt, strlen(rcpt)),
                str_vis(v2, sizeof(v2), res->route, strlen(res->route)), why);
    }
    route_for_domain(s->cfg, domain, out);
}

static void
sched_on_route(struct hooks_call *c, struct plua_result *res, void *arg)
{
    struct sched_plan_rcpt *r = arg;
    struct sched_plan *p = r->plan;
    struct sched *s = p->s;
    (void)c;
    r->call = NULL;
    const struct spool_envelope *env = spool_get(s->spool, p->qid);
    if (env != NULL && r->idx < env->nrcpts)
        sched_hook_route(s, p->qid, env->rcpts[r->idx].addr, p->doms[r->dom].domain, res,
                         &r->route);
    if (--p->pending == 0)
        sched_plan_sources(p);
}

/* Takes due (n recipient indexes of env, already marked busy). */
static void
sched_plan_start(struct sched *s, const struct spool_envelope *env, size_t *due, size_t n)
{
    struct sched_plan *p = xcalloc(1, sizeof(*p));
    p->s = s;
    memcpy(p->qid, env->qid, sizeof(p->qid));
    p->n = n;
    p->rcpts = xcalloc(n, sizeof(*p->rcpts));
    p->doms = xcalloc(n, sizeof(*p->doms));
    for (size_t k = 0; k < n; k++) {
        struct sched_plan_rcpt *r = &p->rcpts[k];
        r->plan = p;
        r->idx = due[k];
        char domain[SMTP_DOMAIN_MAX + 1];
        sched_rcpt_domain(env->rcpts[r->idx].addr, domain, sizeof(domain));
        size_t d = 0;
        while (d < p->ndoms && strcmp(p->doms[d].domain, domain) != 0)
            d++;
        if (d == p->ndoms) {
            p->doms[d].plan = p;
            memcpy(p->doms[d].domain, domain, sizeof(domain));
            p->ndoms++;
        }
        r->dom = d;
    }
    free(due);
    p->next = s->plans;
    if (s->plans)
        s->plans->prev = p;
    s->plans = p;
    sched_headers_load(s, p->qid, NULL, &p->headers);
    if (!hooks_have(s->hooks, PLUGIN_HOOK_ROUTE)) {
        for (size_t k = 0; k < n; k++)
            route_for_domain(s->cfg, p->doms[p->rcpts[k].dom].domain, &p->rcpts[k].route);
        sched_plan_sources(p);
        return;
    }
    int64_t now = now_ms();
    p->pending = n;
    for (size_t k = 0; k < n; k++) {
        struct plua_args a;
        sched_msg_args(env, &p->headers, now, &a);
        a.rcpt = env->rcpts[p->rcpts[k].idx].addr;
        p->rcpts[k].call = hooks_call(s->hooks, PLUGIN_HOOK_ROUTE, &a, sched_on_route,
                                      &p->rcpts[k]);
    }
}

/* ---- events ------------------------------------------------------------- */

struct sched_ev {
    struct sched_ev *prev, *next;     /* s->events */
    struct sched *s;                  /* borrowed */
    struct hooks_call *call;          /* owned until it completes */
};

/* What a recipient's commit tells the event hook once it is durable. */
struct sched_ev_info {
    const char *type;                 /* static: "delivered", "deferred", "bounced" */
    char *rcpt;                       /* owned */
    int code;
    char esc[16];
    char *text;                       /* owned */
};

static void
sched_ev_unlink(struct sched_ev *ev)
{
    struct sched *s = ev->s;
    if (ev->prev)
        ev->prev->next = ev->next;
    else
        s->events = ev->next;
    if (ev->next)
        ev->next->prev = ev->prev;
}

static void
sched_on_event(struct hooks_call *c, struct plua_result *res, void *arg)
{
    struct sched_ev *ev = arg;
    struct sched *s = ev->s;
    (void)c;
    (void)res;
    sched_ev_unlink(ev);
    free(ev);
    sched_check_idle(s);
}

/* Drops the event calls in flight (no callbacks). */
static void
sched_events_cancel(struct sched *s)
{
    while (s->events != NULL) {
        struct sched_ev *ev = s->events;
        sched_ev_unlink(ev);
        hooks_call_cancel(ev->call);
        free(ev);
    }
}

static void
sched_event_fire(struct sched *s, const char *qid, const struct sched_ev_info *info)
{
    if (s->hooks == NULL)
        return;
    struct plua_args a;
    memset(&a, 0, sizeof(a));
    a.event_type = info->type;
    a.queue_id = qid;
    a.rcpt = info->rcpt;
    a.reply_code = info->code;
    a.reply_esc = info->esc[0] ? info->esc : NULL;
    a.reply_text = info->text;
    struct sched_ev *ev = xcalloc(1, sizeof(*ev));
    ev->s = s;
    ev->next = s->events;
    if (s->events)
        s->events->prev = ev;
    s->events = ev;
    ev->call = hooks_call(s->hooks, PLUGIN_HOOK_EVENT, &a, sched_on_event, ev);
}

/* ---- outcomes ---------------------------------------------------------- */

struct sched_commit {
    struct sched *s;
    char qid[SPOOL_QID_SIZE];
    size_t idx;          /* recipient index, or SIZE_MAX for whole-message records */
    struct sched_ev_info *ev; /* owned or NULL: the event to report once durable */
};

static void
sched_commit_free(struct sched_commit *sc)
{
    if (sc->ev != NULL) {
        free(sc->ev->rcpt);
        free(sc->ev->text);
        free(sc->ev);
    }
    free(sc);
}

static void
sched_on_remove(int status, void *arg)
{
    struct sched_commit *sc = arg;
    struct sched *s = sc->s;
    struct sched_msg *m = sched_msg_find(s, sc->qid);
    if (status != 0)
        log_msg(LOG_WARNING, sc->qid, "spool: cannot remove finished message: %s",
                strerror(-status));
    else
        log_msg(LOG_INFO, sc->qid, "removed");
    if (m) {
        m->removing = false;
        m->commits--;
        sched_msg_release(s, m);
    }
    free(sc);
}

/* All records of a message are committed: remove it if every recipient is
 * final, else make sure its deferred recipients have a wake-up. */
static void
sched_settle(struct sched *s, struct sched_msg *m)
{
    const struct spool_envelope *env = spool_get(s->spool, m->qid);
    if (env == NULL) {
        sched_msg_release(s, m);
        return;
    }
    bool final = true;
    for (size_t i = 0; i < env->nrcpts; i++) {
        if (m->busy[i] || (env->rcpts[i].state != SPOOL_RCPT_DELIVERED
                           && env->rcpts[i].state != SPOOL_RCPT_FAILED))
            final = false;
    }
    if (final && !m->removing) {
        m->removing = true;
        m->commits++;
        struct sched_commit *sc = xcalloc(1, sizeof(*sc));
        sc->s = s;
        memcpy(sc->qid, m->qid, sizeof(sc->qid));
        sc->idx = SIZE_MAX;
        spool_remove(s->spool, m->qid, sched_on_remove, sc);
        return;
    }
    char qid[SPOOL_QID_SIZE];
    memcpy(qid, m->qid, sizeof(qid));
    sched_consider(s, qid); /* re-queues anything due, arms the wake-up */
}

static void
sched_on_update(int status, void *arg)
{
    struct sched_commit *sc = arg;
    struct sched *s = sc->s;
    struct sched_msg *m = sched_msg_find(s, sc->qid);
    if (status != 0)
        log_msg(LOG_WARNING, sc->qid, "spool: cannot record delivery state: %s",
                strerror(-status));
    if (m && sc->idx < m->nrcpts)
        m->busy[sc->idx] = 0;
    /* durable now: tell the event hook (fire and forget) */
    if (status == 0 && sc->ev != NULL)
        sched_event_fire(s, sc->qid, sc->ev);
    if (m && --m->commits == 0)
        sched_settle(s, m);
    sched_commit_free(sc);
}

static void
sched_on_bounce_queued(int status, void *arg)
{
    struct sched_commit *sc = arg;
    if (status == 0)
        sched_enqueue(sc->s, sc->qid);
    else
        log_msg(LOG_WARNING, sc->qid, "spool: cannot queue notification: %s", strerror(-status));
    free(sc);
}

/* Derives the enhanced code when the server gave none. */
static const char *
sched_reply_esc(const struct smtpc_reply *r)
{
    if (r->esc[0])
        return r->esc;
    return r->code >= 500 ? "5.0.0" : r->code >= 400 ? "4.0.0" : "2.0.0";
}

static void
sched_reply_text(const struct smtpc_reply *r, char *out, size_t size)
{
    if (r->esc[0])
        snprintf(out, size, "%d %s %s", r->code, r->esc, r->text);
    else
        snprintf(out, size, "%d %s", r->code, r->text);
}

/* Queues a DSN (failure or success) about env for the listed recipients;
 * subject and text: the bounce hook's wording, or NULL for the default. */
static void
sched_notify(struct sched *s, const struct spool_envelope *env, const struct span original,
             const struct bounce_rcpt *brs, size_t n, enum bounce_action action,
             const char *subject, const char *text)
{
    struct spool_envelope b;
    memset(&b, 0, sizeof(b));
    spool_new_qid(s->spool, b.qid);
    char msgid[128];
    snprintf(msgid, sizeof(msgid), "%s.dsn@%s", b.qid, s->cfg->hostname);
    struct bounce_params p;
    memset(&p, 0, sizeof(p));
    p.reporting_mta = s->cfg->hostname;
    p.from_name = s->cfg->bounce.from_name;
    p.to = env->sender;
    p.orig_qid = env->qid;
    p.envid = env->envid;
    p.arrival_ms = env->arrival_ms;
    p.now_ms = now_ms();
    p.ret_full = env->ret == SMTP_RET_FULL;
    p.smtputf8 = env->smtputf8;
    p.rcpts = brs;
    p.nrcpts = n;
    p.original = original;
    p.message_id = msgid;
    p.subject = subject;
    p.text = text;
    struct buf content;
    buf_init(&content);
    bounce_build(&content, &p);

    struct spool_rcpt r;
    memset(&r, 0, sizeof(r));
    r.addr = env->sender;
    r.state = SPOOL_RCPT_PENDING;
    b.arrival_ms = p.now_ms;
    b.sender = (char *)"";
    b.rcpts = &r;
    b.nrcpts = 1;
    b.smtputf8 = env->smtputf8;
    b.body = bounce_is_8bit((struct span){ buf_ptr(&content), content.len }) ? SMTP_BODY_8BITMIME
                                                                             : SMTP_BODY_7BIT;
    b.listener = (char *)"(bounce)";
    b.local_ip = (char *)"";
    b.client_ip = (char *)"";
    b.content_size = content.len;
    struct span part = { buf_ptr(&content), content.len };
    struct sched_commit *sc = xcalloc(1, sizeof(*sc));
    sc->s = s;
    memcpy(sc->qid, b.qid, sizeof(sc->qid));
    spool_submit(s->spool, &b, &part, 1, sched_on_bounce_queued, sc);
    buf_reset(&content);
    log_msg(LOG_INFO, env->qid, "sender %s notification: %s",
            action == BOUNCE_FAILED ? "non-delivery" : "delivery status", b.qid);
}

struct sched_tls_fields {             /* a session's TLS log fields, kept past its end */
    size_t n;
    const char *names[LOG_FIELDS_MAX]; /* borrowed string literals */
    char *vals[LOG_FIELDS_MAX];       /* owned */
};

struct sched_outcome {
    const struct sched_dest *dest; /* its source choice (why) */
    const char *helo;           /* EHLO name said, or NULL (none connected) */
    const char *relay;          /* "host[ip]:port" or "none" */
    const char *remote_host;    /* for Remote-MTA, or NULL */
    const char *src;            /* local address used, or NULL */
    bool server_dsn;            /* next hop advertised DSN */
    bool lmtp;
    const struct smtpc *smtpc;  /* the session, for its TLS log fields; or NULL */
    const struct sched_tls_fields *tls; /* or these, captured (smtpc NULL) */
};

/* What becomes of one recipient of a finished transaction. */
enum sched_verdict { SV_SENT, SV_FAIL, SV_DEFER };

struct sched_decision {
    enum sched_verdict v;
    uint32_t attempts;          /* this attempt's number (1 = the first) */
    int64_t next_ms;            /* SV_DEFER: the next attempt */
    bool ask_retry;             /* temporary failure the retry hook decides */
};

/* Whether a failure of cur produces a non-delivery DSN. */
static bool
sched_wants_dsn(const struct sched *s, const struct spool_rcpt *cur)
{
    return (cur->notify == 0 || (cur->notify & SMTP_NOTIFY_FAILURE)) && s->cfg->bounce.enabled;
}

/* Applies one transaction's (or a destination failure's) replies to the
 * job's recipients, as decided: logs, notifications, spool records.
 * replies[i] belongs to job->idx[i]. content may be NULL or empty (the
 * original is read here when a DSN needs it). subject and text: the bounce
 * hook's, or NULL. */
static void
sched_job_apply(struct sched *s, const struct sched_job *job,
                const struct smtpc_reply *const *replies, const struct sched_decision *dec,
                const struct sched_outcome *oc, const struct buf *content, const char *subject,
                const char *text)
{
    const struct spool_envelope *env = spool_get(s->spool, job->qid);
    struct sched_msg *m = sched_msg_find(s, job->qid);
    if (env == NULL || m == NULL) {
        if (m) {
            for (size_t k = 0; k < job->n; k++)
                if (job->idx[k] < m->nrcpts)
                    m->busy[job->idx[k]] = 0;
            sched_msg_release(s, m);
        }
        return; /* deleted meanwhile */
    }
    int64_t now = now_ms();
    bool events = hooks_have(s->hooks, PLUGIN_HOOK_EVENT);
    struct bounce_rcpt *failed = xcalloc(job->n, sizeof(*failed));
    struct bounce_rcpt *success = xcalloc(job->n, sizeof(*success));
    char (*diag)[600] = xcalloc(job->n, sizeof(*diag));
    size_t nfailed = 0, nsuccess = 0;
    struct spool_rcpt *next = xcalloc(job->n, sizeof(*next));

    for (size_t k = 0; k < job->n; k++) {
        size_t i = job->idx[k];
        const struct spool_rcpt *cur = &env->rcpts[i];
        const struct smtpc_reply *rp = replies[k];
        struct spool_rcpt *st = &next[k];
        *st = *cur;
        st->attempts = dec[k].attempts;
        st->updated_ms = now;
        sched_reply_text(rp, diag[k], sizeof(diag[k]));
        st->last_reply = diag[k];
        const char *status;
        if (dec[k].v == SV_SENT) {
            st->state = SPOOL_RCPT_DELIVERED;
            status = "sent";
            if ((cur->notify & SMTP_NOTIFY_SUCCESS) && !oc->server_dsn && env->sender[0]) {
                struct bounce_rcpt *b = &success[nsuccess++];
                b->addr = cur->addr;
                b->orcpt = cur->orcpt;
                b->action = oc->lmtp ? BOUNCE_DELIVERED : BOUNCE_RELAYED;
                b->status = sched_reply_esc(rp);
                b->remote_mta = oc->remote_host;
                b->diagnostic = diag[k];
                b->last_attempt_ms = now;
            }
        } else if (dec[k].v == SV_FAIL) {
            st->state = SPOOL_RCPT_FAILED;
            status = "bounced";
            if (sched_wants_dsn(s, cur)) {
                struct bounce_rcpt *b = &failed[nfailed++];
                b->addr = cur->addr;
                b->orcpt = cur->orcpt;
                b->action = BOUNCE_FAILED;
                b->status = sched_reply_esc(rp);
                b->remote_mta = oc->remote_host;
                b->diagnostic = diag[k];
                b->last_attempt_ms = now;
            }
        } else {
            st->state = SPOOL_RCPT_DEFERRED;
            st->next_attempt_ms = dec[k].next_ms;
            status = "deferred";
        }
        struct log_line ll;
        log_begin(&ll, LOG_INFO, job->qid);
        char vis[600];
        log_kv(&ll, "to", "<%s>", str_vis(vis, sizeof(vis), cur->addr, strlen(cur->addr)));
        if (cur->orcpt)
            log_kv(&ll, "orig_to", "<%s>", str_vis(vis, sizeof(vis), cur->orcpt,
                                                    strlen(cur->orcpt)));
        log_kv(&ll, "relay", "%s", oc->relay);
        if (oc->smtpc != NULL)
            smtpc_log_tls(oc->smtpc, &ll); /* tls=, cipher=, verify=, resumed= */
        else if (oc->tls != NULL)
            for (size_t f = 0; f < oc->tls->n; f++)
                log_kv(&ll, oc->tls->names[f], "%s", oc->tls->vals[f]);
        const struct source_choice *sc = &oc->dest->src;
        int fam = sc->ip[SOURCE_V4][0] || !sc->ip[SOURCE_V6][0] ? SOURCE_V4 : SOURCE_V6;
        const char *src_ip = oc->src ? oc->src : sc->ip[fam][0] ? sc->ip[fam] : NULL;
        if (src_ip)
            log_kv(&ll, "src", "%s", src_ip);
        char why[32];
        source_why_text(sc, why, sizeof(why));
        log_kv(&ll, "helo", "%s (%s)", oc->helo ? oc->helo : sc->hostname[fam], why);
        log_kv(&ll, "delay", "%.2f", (double)(now - env->arrival_ms) / 1000.0);
        log_kv(&ll, "attempts", "%" PRIu32, st->attempts);
        log_kv(&ll, "dsn", "%s", sched_reply_esc(rp));
        log_kv(&ll, "status", "%s (%s)", status, str_vis(vis, sizeof(vis), diag[k],
                                                          strlen(diag[k])));
        log_end(&ll);
    }

    if (nfailed + nsuccess > 0) {
        struct buf orig;
        buf_init(&orig);
        struct span original = { NULL, 0 };
        if (content && content->len > 0) {
            original = (struct span){ buf_ptr(content), content->len };
        } else if (spool_read_content(s->spool, job->qid, &orig) == 0) {
            original = (struct span){ buf_ptr(&orig), orig.len };
        }
        if (env->sender[0] == '\0') {
            if (nfailed > 0)
                log_msg(LOG_INFO, job->qid, "double bounce: dropped (the sender is <>)");
        } else {
            if (nfailed > 0)
                sched_notify(s, env, original, failed, nfailed, BOUNCE_FAILED, subject, text);
            if (nsuccess > 0)
                sched_notify(s, env, original, success, nsuccess, BOUNCE_RELAYED, NULL, NULL);
        }
        buf_reset(&orig);
    }

    /* the envelope may move once records are applied: copy what we need */
    char qid[SPOOL_QID_SIZE];
    memcpy(qid, job->qid, sizeof(qid));
    for (size_t k = 0; k < job->n; k++) {
        struct sched_commit *sc = xcalloc(1, sizeof(*sc));
        sc->s = s;
        memcpy(sc->qid, qid, sizeof(sc->qid));
        sc->idx = job->idx[k];
        if (events) {
            const struct smtpc_reply *rp = replies[k];
            struct sched_ev_info *ev = xcalloc(1, sizeof(*ev));
            ev->type = dec[k].v == SV_SENT ? "delivered"
                       : dec[k].v == SV_FAIL ? "bounced"
                                             : "deferred";
            ev->rcpt = xstrdup(next[k].addr);
            ev->code = rp->code;
            snprintf(ev->esc, sizeof(ev->esc), "%s", rp->esc);
            ev->text = xstrdup(rp->text);
            sc->ev = ev;
        }
        m->commits++;
        spool_update_rcpt(s->spool, qid, job->idx[k], &next[k], sched_on_update, sc);
    }
    free(next);
    free(diag);
    free(failed);
    free(success);
}

/* ---- outcomes waiting for retry / bounce hooks -------------------------- */

struct sched_pend_rcpt {
    struct sched_pend *pd;            /* borrowed: the owner */
    size_t k;                         /* index in the job */
    struct hooks_call *call;          /* pending retry call, or NULL */
};

struct sched_pend {
    struct sched_pend *prev, *next;   /* s->pends */
    struct sched *s;                  /* borrowed */
    struct sched_job *job;            /* owned copy */
    struct smtpc_reply *replies;      /* owned copies, per job recipient */
    struct sched_decision *dec;       /* owned, per job recipient */
    struct sched_pend_rcpt *slots;    /* owned, per job recipient */
    size_t pending;                   /* retry calls outstanding */
    struct hooks_call *bcall;         /* pending bounce call, or NULL */
    struct sched_headers headers;     /* owned: the msg view's */
    /* the outcome (struct sched_outcome) as owned copies */
    const struct sched_dest *dest;    /* borrowed: destinations live as long as s */
    char *helo, *relay, *remote_host, *src; /* owned or NULL */
    bool server_dsn, lmtp;
    struct sched_tls_fields tls;
    struct buf content;               /* owned: the original (may be empty) */
    char *subject, *text;             /* owned: the bounce hook's answer, or NULL */
};

static void
sched_pend_free(struct sched_pend *pd)
{
    struct sched *s = pd->s;
    if (pd->prev)
        pd->prev->next = pd->next;
    else
        s->pends = pd->next;
    if (pd->next)
        pd->next->prev = pd->prev;
    for (size_t k = 0; k < pd->job->n; k++)
        hooks_call_cancel(pd->slots[k].call);
    hooks_call_cancel(pd->bcall);
    sched_headers_free(&pd->headers);
    for (size_t f = 0; f < pd->tls.n; f++)
        free(pd->tls.vals[f]);
    free(pd->helo);
    free(pd->relay);
    free(pd->remote_host);
    free(pd->src);
    buf_reset(&pd->content);
    free(pd->subject);
    free(pd->text);
    free(pd->slots);
    free(pd->dec);
    free(pd->replies);
    free(pd->job);
    free(pd);
}

/* Applies the outcome as decided so far (unanswered hooks: the built-in
 * decisions) and frees it. */
static void
sched_pend_finish(struct sched_pend *pd)
{
    struct sched *s = pd->s;
    for (size_t k = 0; k < pd->job->n; k++) {
        hooks_call_cancel(pd->slots[k].call);
        pd->slots[k].call = NULL;
    }
    hooks_call_cancel(pd->bcall);
    pd->bcall = NULL;
    const struct smtpc_reply **replies = xcalloc(pd->job->n, sizeof(*replies));
    for (size_t k = 0; k < pd->job->n; k++)
        replies[k] = &pd->replies[k];
    struct sched_outcome oc = {
        .dest = pd->dest,
        .helo = pd->helo,
        .relay = pd->relay ? pd->relay : "none",
        .remote_host = pd->remote_host,
        .src = pd->src,
        .server_dsn = pd->server_dsn,
        .lmtp = pd->lmtp,
        .tls = &pd->tls,
    };
    sched_job_apply(s, pd->job, replies, pd->dec, &oc, &pd->content, pd->subject, pd->text);
    free(replies);
    sched_pend_free(pd);
}

static void
sched_on_bounce_hook(struct hooks_call *c, struct plua_result *res, void *arg)
{
    struct sched_pend *pd = arg;
    (void)c;
    pd->bcall = NULL;
    if (res->status == PLUA_OK) {
        pd->subject = res->subject;
        pd->text = res->text;
        res->subject = res->text = NULL;
    }
    sched_pend_finish(pd);
}

/* Retry decisions are made: ask the bounce hook for the DSN's wording when
 * one will be sent, then apply. */
static void
sched_pend_bounce(struct sched_pend *pd)
{
    struct sched *s = pd->s;
    const struct spool_envelope *env = spool_get(s->spool, pd->job->qid);
    if (env == NULL || s->stopping || env->sender[0] == '\0'
        || !hooks_have(s->hooks, PLUGIN_HOOK_BOUNCE)) {
        sched_pend_finish(pd);
        return;
    }
    struct plua_failure *fv = xcalloc(pd->job->n, sizeof(*fv));
    size_t nf = 0;
    for (size_t k = 0; k < pd->job->n; k++) {
        const struct spool_rcpt *cur = &env->rcpts[pd->job->idx[k]];
        if (pd->dec[k].v != SV_FAIL || !sched_wants_dsn(s, cur))
            continue;
        fv[nf].rcpt = cur->addr;
        fv[nf].code = pd->replies[k].code;
        fv[nf].esc = pd->replies[k].esc[0] ? pd->replies[k].esc : NULL;
        fv[nf].text = pd->replies[k].text;
        nf++;
    }
    if (nf == 0) {
        free(fv);
        sched_pend_finish(pd);
        return;
    }
    struct plua_args a;
    sched_msg_args(env, &pd->headers, now_ms(), &a);
    a.failures = fv;
    a.nfailures = nf;
    pd->bcall = hooks_call(s->hooks, PLUGIN_HOOK_BOUNCE, &a, sched_on_bounce_hook, pd);
    free(fv);
}

static void
sched_on_retry_hook(struct hooks_call *c, struct plua_result *res, void *arg)
{
    struct sched_pend_rcpt *slot = arg;
    struct sched_pend *pd = slot->pd;
    struct sched *s = pd->s;
    (void)c;
    slot->call = NULL;
    const struct spool_envelope *env = spool_get(s->spool, pd->job->qid);
    if (env != NULL && res->status == PLUA_OK && res->retry_set) {
        struct sched_retry_hook h = { .set = true, .bounce = res->bounce,
                                      .seconds = res->retry_seconds };
        struct sched_decision *d = &pd->dec[slot->k];
        struct sched_retry rd;
        sched_retry_decide_hook(s->cfg, d->attempts, env->arrival_ms, now_ms(), &h, &rd);
        d->v = rd.give_up ? SV_FAIL : SV_DEFER;
        d->next_ms = rd.next_ms;
    }
    if (--pd->pending == 0)
        sched_pend_bounce(pd);
}

/* Keeps the outcome of job for the hooks: copies what the caller's objects
 * hold (the session may go on or end meanwhile) and takes content's bytes. */
static void
sched_pend_start(struct sched *s, const struct spool_envelope *env, const struct sched_job *job,
                 const struct smtpc_reply *const *replies, struct sched_decision *dec,
                 const struct sched_outcome *oc, struct buf *content)
{
    struct sched_pend *pd = xcalloc(1, sizeof(*pd));
    pd->s = s;
    size_t jsize = sizeof(*job) + job->cap * sizeof(job->idx[0]);
    pd->job = xmalloc(jsize);
    memcpy(pd->job, job, jsize);
    pd->job->next = NULL;
    pd->replies = xcalloc(job->n, sizeof(*pd->replies));
    for (size_t k = 0; k < job->n; k++)
        pd->replies[k] = *replies[k];
    pd->dec = dec;
    pd->slots = xcalloc(job->n, sizeof(*pd->slots));
    pd->dest = oc->dest;
    pd->helo = oc->helo ? xstrdup(oc->helo) : NULL;
    pd->relay = oc->relay ? xstrdup(oc->relay) : NULL;
    pd->remote_host = oc->remote_host ? xstrdup(oc->remote_host) : NULL;
    pd->src = oc->src ? xstrdup(oc->src) : NULL;
    pd->server_dsn = oc->server_dsn;
    pd->lmtp = oc->lmtp;
    if (oc->smtpc != NULL) {
        struct log_line ll;
        log_begin(&ll, LOG_INFO, job->qid);
        smtpc_log_tls(oc->smtpc, &ll);
        for (size_t f = 0; f < ll.nfields; f++) {
            pd->tls.names[f] = ll.names[f];
            pd->tls.vals[f] = xstrdup(ll.scratch + ll.vals[f]);
        }
        pd->tls.n = ll.nfields;
    }
    buf_init(&pd->content);
    if (content != NULL) {
        pd->content = *content; /* the bytes move; the caller's buffer is left empty */
        buf_init(content);
    }
    pd->next = s->pends;
    if (s->pends)
        s->pends->prev = pd;
    s->pends = pd;
    sched_headers_load(s, job->qid, &pd->content, &pd->headers);
    int64_t now = now_ms();
    for (size_t k = 0; k < job->n; k++)
        if (dec[k].ask_retry)
            pd->pending++;
    if (pd->pending == 0) {
        sched_pend_bounce(pd);
        return;
    }
    for (size_t k = 0; k < job->n; k++) {
        if (!dec[k].ask_retry)
            continue;
        const struct smtpc_reply *rp = &pd->replies[k];
        struct plua_args a;
        sched_msg_args(env, &pd->headers, now, &a);
        a.rcpt = env->rcpts[job->idx[k]].addr;
        a.attempt = dec[k].attempts;
        a.reply_code = rp->code;
        a.reply_esc = rp->esc[0] ? rp->esc : NULL;
        a.reply_text = rp->text;
        pd->slots[k].pd = pd;
        pd->slots[k].k = k;
        pd->slots[k].call = hooks_call(s->hooks, PLUGIN_HOOK_RETRY, &a, sched_on_retry_hook,
                                       &pd->slots[k]);
    }
}

/* A transaction (or a destination failure) ended: decides each
 * recipient's fate — asking the retry and bounce hooks when there are any
 * — and applies it. replies[i] belongs to job->idx[i]. The caller keeps
 * job; content (may be NULL) may be emptied (its bytes taken). */
static void
sched_job_done(struct sched *s, const struct sched_job *job,
               const struct smtpc_reply *const *replies, const struct sched_outcome *oc,
               struct buf *content)
{
    const struct spool_envelope *env = spool_get(s->spool, job->qid);
    if (env == NULL) {
        sched_job_apply(s, job, replies, NULL, oc, content, NULL, NULL); /* releases */
        return;
    }
    int64_t now = now_ms();
    bool hooks = s->hooks != NULL && !s->stopping;
    bool retry_hook = hooks && hooks_have(s->hooks, PLUGIN_HOOK_RETRY);
    bool young = now - env->arrival_ms < (int64_t)s->cfg->retry.max_age_ms;
    bool ask = false, dsn = false;
    struct sched_decision *dec = xcalloc(job->n, sizeof(*dec));
    for (size_t k = 0; k < job->n; k++) {
        const struct spool_rcpt *cur = &env->rcpts[job->idx[k]];
        const struct smtpc_reply *rp = replies[k];
        struct sched_decision *d = &dec[k];
        d->attempts = cur->attempts + 1;
        if (rp->code >= 200 && rp->code < 300) {
            d->v = SV_SENT;
        } else if (rp->code >= 500) {
            d->v = SV_FAIL;
        } else {
            struct sched_retry rd;
            sched_retry_decide(s->cfg, d->attempts, env->arrival_ms, now, &rd);
            d->v = rd.give_up ? SV_FAIL : SV_DEFER;
            d->next_ms = rd.next_ms;
            d->ask_retry = retry_hook && young;
            ask = ask || d->ask_retry;
        }
        dsn = dsn || (d->v == SV_FAIL && sched_wants_dsn(s, cur));
    }
    if (ask || (dsn && hooks && env->sender[0] && hooks_have(s->hooks, PLUGIN_HOOK_BOUNCE))) {
        sched_pend_start(s, env, job, replies, dec, oc, content); /* takes dec */
        return;
    }
    sched_job_apply(s, job, replies, dec, oc, content, NULL, NULL);
    free(dec);
}

/* Every job waiting for a destination gets the same reply (DNS failure, no
 * MX host reachable). */
static void
sched_dest_fail(struct sched *s, struct sched_dest *d, const struct smtpc_reply *r,
                const char *relay)
{
    struct sched_outcome oc = { .dest = d, .relay = relay ? relay : "none",
                                .lmtp = d->route.lmtp };
    const struct smtpc_reply *replies[SCHED_RCPTS_PER_TXN];
    for (size_t k = 0; k < SCHED_RCPTS_PER_TXN; k++)
        replies[k] = r;
    struct sched_job *j;
    while ((j = sched_job_pop(d)) != NULL) {
        sched_job_done(s, j, replies, &oc, NULL);
        free(j);
    }
}

/* Settles everything that waits for a hook (stop, a registry replaced):
 * outcomes are applied with the built-in decisions, planned recipients go
 * back to the queue. Event calls go on (fire and forget). */
static void
sched_hooks_settle(struct sched *s)
{
    while (s->pends != NULL)
        sched_pend_finish(s->pends);
    while (s->plans != NULL)
        sched_plan_drop(s->plans);
}

/* ---- sessions ---------------------------------------------------------- */

static void
sched_sess_clear_txn(struct sched_sess *ss)
{
    free(ss->job);
    ss->job = NULL;
    buf_reset(&ss->content);
    free(ss->sender);
    free(ss->envid);
    for (size_t i = 0; i < ss->nowned; i++)
        free(ss->owned[i]);
    free(ss->owned);
    free(ss->rcpts);
    free(ss->orcpt);
    free(ss->notify);
    ss->sender = ss->envid = NULL;
    ss->owned = NULL;
    ss->rcpts = ss->orcpt = NULL;
    ss->notify = NULL;
    ss->nowned = 0;
}

static void
sched_check_idle(struct sched *s)
{
    /* idle: no session and no event call (a graceful stop lets the event
     * hooks finish within shutdown_timeout; sched_abort cancels them) */
    if (s->stopping && s->nsessions == 0 && s->events == NULL && s->idle_cb) {
        void (*cb)(void *) = s->idle_cb;
        s->idle_cb = NULL;
        cb(s->idle_arg);
    }
}

static void
sched_sess_unidle(struct sched_sess *ss)
{
    if (!ss->idle)
        return;
    struct sched_sess **pp = &ss->dest->idle;
    while (*pp && *pp != ss)
        pp = &(*pp)->idle_next;
    if (*pp)
        *pp = ss->idle_next;
    ss->idle = false;
    ss->idle_next = NULL;
    timer_stop(ss->idle_timer);
}

static void
sched_sess_free(struct sched_sess *ss)
{
    struct sched *s = ss->s;
    struct sched_dest *d = ss->dest;
    sched_sess_unidle(ss);
    if (ss->prev)
        ss->prev->next = ss->next;
    else
        s->sessions = ss->next;
    if (ss->next)
        ss->next->prev = ss->prev;
    s->nsessions--;
    d->sessions--;
    if (!ss->ready_seen)
        d->starting--;
    sched_sess_clear_txn(ss);
    timer_free(ss->idle_timer);
    free(ss);
    sched_pump(s, d);
    sched_check_idle(s);
}

static void
sched_on_idle_timeout(struct timer *t, void *arg)
{
    struct sched_sess *ss = arg;
    (void)t;
    sched_sess_unidle(ss);
    if (ss->c)
        smtpc_quit(ss->c);
}

/* Hands a job to a READY session. */
static void
sched_sess_send(struct sched_sess *ss, struct sched_job *job)
{
    struct sched *s = ss->s;
    const struct spool_envelope *env = spool_get(s->spool, job->qid);
    struct sched_msg *m = sched_msg_find(s, job->qid);
    if (env == NULL || spool_read_content(s->spool, job->qid, &ss->content) != 0) {
        if (m) {
            for (size_t k = 0; k < job->n; k++)
                if (job->idx[k] < m->nrcpts)
                    m->busy[job->idx[k]] = 0;
            sched_msg_release(s, m);
        }
        log_msg(LOG_WARNING, job->qid, "message vanished from the spool before delivery");
        free(job);
        buf_reset(&ss->content);
        sched_sess_next(ss);
        return;
    }
    ss->job = job;
    ss->sender = xstrdup(env->sender);
    ss->envid = env->envid ? xstrdup(env->envid) : NULL;
    ss->rcpts = xcalloc(job->n, sizeof(*ss->rcpts));
    ss->orcpt = xcalloc(job->n, sizeof(*ss->orcpt));
    ss->notify = xcalloc(job->n, sizeof(*ss->notify));
    ss->owned = xcalloc(job->n * 2, sizeof(*ss->owned));
    for (size_t k = 0; k < job->n; k++) {
        const struct spool_rcpt *r = &env->rcpts[job->idx[k]];
        ss->owned[ss->nowned] = xstrdup(r->addr);
        ss->rcpts[k] = ss->owned[ss->nowned++];
        if (r->orcpt) {
            ss->owned[ss->nowned] = xstrdup(r->orcpt);
            ss->orcpt[k] = ss->owned[ss->nowned++];
        }
        ss->notify[k] = r->notify;
    }
    struct smtpc_msg msg = {
        .qid = job->qid,
        .sender = ss->sender,
        .nrcpts = job->n,
        .rcpts = ss->rcpts,
        .notify = ss->notify,
        .orcpt = ss->orcpt,
        .ret = env->ret,
        .envid = ss->envid,
        .body = env->body,
        .smtputf8 = env->smtputf8,
        .content = { buf_ptr(&ss->content), ss->content.len },
    };
    smtpc_send(ss->c, &msg);
}

/* A session is READY: give it work, park it, or end it. */
static void
sched_sess_next(struct sched_sess *ss)
{
    struct sched *s = ss->s;
    struct sched_dest *d = ss->dest;
    if (s->stopping || smtpc_transactions(ss->c) >= s->cfg->delivery.max_messages_per_connection) {
        smtpc_quit(ss->c);
        return;
    }
    struct sched_job *j = sched_job_pop(d);
    if (j != NULL) {
        sched_sess_send(ss, j);
        return;
    }
    ss->idle = true;
    ss->idle_next = d->idle;
    d->idle = ss;
    timer_arm(ss->idle_timer, s->cfg->delivery.connection_cache_time_ms);
}

static void
sched_on_smtpc(struct smtpc *c, enum smtpc_event ev, void *arg)
{
    struct sched_sess *ss = arg;
    struct sched *s = ss->s;
    switch (ev) {
    case SMTPC_EV_READY:
        if (!ss->ready_seen) {
            ss->ready_seen = true;
            ss->dest->starting--;
        }
        sched_sess_next(ss);
        return;
    case SMTPC_EV_DONE: {
        struct sched_job *job = ss->job;
        if (job == NULL)
            return;
        const struct smtpc_reply *replies[SCHED_RCPTS_PER_TXN];
        for (size_t k = 0; k < job->n; k++)
            replies[k] = smtpc_rcpt_reply(c, k);
        struct sched_outcome oc = {
            .dest = ss->dest,
            .relay = smtpc_relay(c),
            .remote_host = smtpc_remote_host(c),
            .src = smtpc_local_ip(c),
            .helo = smtpc_helo(c),
            .server_dsn = smtpc_server_has_dsn(c),
            .lmtp = ss->dest->route.lmtp,
            .smtpc = c,
        };
        sched_job_done(s, job, replies, &oc, &ss->content);
        sched_sess_clear_txn(ss);
        return;
    }
    case SMTPC_EV_FAILED:
        sched_dest_fail(s, ss->dest, smtpc_failure(c), smtpc_relay(c));
        return;
    case SMTPC_EV_CLOSED:
        ss->c = NULL;
        if (ss->job) {
            /* smtp_client reports DONE before CLOSED; this is a safety net */
            struct smtpc_reply lost = { .code = 451, .esc = "4.4.2" };
            snprintf(lost.text, sizeof(lost.text), "lost connection");
            const struct smtpc_reply *replies[SCHED_RCPTS_PER_TXN];
            for (size_t k = 0; k < ss->job->n; k++)
                replies[k] = &lost;
            struct sched_outcome oc = { .dest = ss->dest, .relay = "none",
                                        .lmtp = ss->dest->route.lmtp };
            sched_job_done(s, ss->job, replies, &oc, &ss->content);
            sched_sess_clear_txn(ss);
        }
        sched_sess_free(ss);
        return;
    }
}

static void
sched_sess_connect(struct sched_sess *ss, const struct smtpc_target *t, size_t n)
{
    struct sched *s = ss->s;
    const struct petrel_config *cfg = s->cfg;
    const struct source_choice *sc = &ss->dest->src;
    struct smtpc_options o = {
        .helo_name = sc->hostname[SOURCE_V4][0] ? sc->hostname[SOURCE_V4]
                                                : sc->hostname[SOURCE_V6],
        .lmtp = ss->dest->route.lmtp,
        .connect_timeout_ms = cfg->delivery.timeouts.connect_ms,
        .greeting_timeout_ms = cfg->delivery.timeouts.greeting_ms,
        .command_timeout_ms = cfg->delivery.timeouts.command_ms,
        .data_init_timeout_ms = cfg->delivery.timeouts.data_init_ms,
        .data_block_timeout_ms = cfg->delivery.timeouts.data_block_ms,
        .data_end_timeout_ms = cfg->delivery.timeouts.data_end_ms,
        .tls = ss->dest->route.tls != DELIVERY_TLS_DEFAULT ? (enum delivery_tls)ss->dest->route.tls
                                                           : cfg->delivery.tls,
        .tls_fallback = cfg->delivery.tls_fallback,
        /* DANE: TLSA lookups go to the same resolvers; the MX RRset of an
         * MX route's domain must be validated too (RFC 7672 2.2.1) */
        .dns_resolvers = (const char *const *)cfg->dns.resolvers.v,
        .ndns_resolvers = cfg->dns.resolvers.n,
        .dns_timeout_ms = cfg->dns.timeout_ms,
        .dane_domain = ss->dest->route.kind == ROUTE_MX ? ss->dest->route.host : NULL,
        /* MTA-STS (RFC 8461) applies to MX routes only */
        .mta_sts_domain = cfg->delivery.mta_sts && ss->dest->route.kind == ROUTE_MX
                              ? ss->dest->route.host
                              : NULL,
        .dns = s->dns,
    };
    ss->c = smtpc_start(s->loop, t, n, &o, sched_on_smtpc, ss);
}

/* Binds target t to the destination's source address of its family (and
 * says that family's EHLO name). False: no source of that family and the
 * kernel may not choose — the target is not used. */
static bool
sched_target_source(const struct sched_dest *d, struct smtpc_target *t)
{
    int f;
    if (t->addr.ss_family == AF_INET)
        f = SOURCE_V4;
    else if (t->addr.ss_family == AF_INET6)
        f = SOURCE_V6;
    else
        return true; /* unix socket: nothing to bind */
    const struct source_choice *sc = &d->src;
    if (!str_copy(t->helo, sizeof(t->helo), sc->hostname[f]))
        t->helo[0] = '\0';
    const char *ip = sc->ip[f];
    if (ip[0] == '\0')
        return sc->any;
    memset(&t->src, 0, sizeof(t->src));
    if (f == SOURCE_V4) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&t->src;
        s4->sin_family = AF_INET;
        t->src_len = inet_pton(AF_INET, ip, &s4->sin_addr) == 1 ? sizeof(*s4) : 0;
    } else {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&t->src;
        s6->sin6_family = AF_INET6;
        t->src_len = inet_pton(AF_INET6, ip, &s6->sin6_addr) == 1 ? sizeof(*s6) : 0;
    }
    return t->src_len > 0;
}

/* No target has a usable source address: fail the waiting jobs. */
static void
sched_no_source(struct sched *s, struct sched_sess *ss)
{
    struct smtpc_reply r = { .code = 451 };
    snprintf(r.esc, sizeof(r.esc), "4.4.4");
    snprintf(r.text, sizeof(r.text), "no mail exchanger of %s has an address of the source "
             "address's family", ss->dest->route.host[0] ? ss->dest->route.host : "the route");
    sched_dest_fail(s, ss->dest, &r, "none");
    sched_sess_free(ss);
}

static unsigned
sched_dest_port(const struct sched *s, const struct sched_dest *d)
{
    if (d->route.port)
        return d->route.port;
    return d->route.lmtp ? ROUTE_LMTP_PORT : s->cfg->delivery.port;
}

static void
sched_on_dns(struct dns_query *q, enum dns_status st, const struct dns_result *res,
             const char *detail, void *arg)
{
    struct sched_sess *ss = arg;
    struct sched *s = ss->s;
    struct sched_dest *d = ss->dest;
    (void)q;
    ss->q = NULL;
    if (st != DNS_OK) {
        struct smtpc_reply r;
        memset(&r, 0, sizeof(r));
        const char *what = d->route.host;
        switch (st) {
        case DNS_NXDOMAIN:
            r.code = 550;
            snprintf(r.esc, sizeof(r.esc), "5.1.2");
            snprintf(r.text, sizeof(r.text), "Host or domain name not found: %s (%s)", what,
                     detail ? detail : "NXDOMAIN");
            break;
        case DNS_NULL_MX:
            r.code = 556;
            snprintf(r.esc, sizeof(r.esc), "5.1.10");
            snprintf(r.text, sizeof(r.text), "Domain %s does not accept mail (null MX)", what);
            break;
        case DNS_NO_ADDRESS:
            if (res == NULL && d->route.kind == ROUTE_MX) {
                /* implicit MX without an address: nothing will ever answer */
                r.code = 550;
                snprintf(r.esc, sizeof(r.esc), "5.1.2");
            } else {
                r.code = 451;
                snprintf(r.esc, sizeof(r.esc), "4.4.3");
            }
            snprintf(r.text, sizeof(r.text), "No address for the mail exchangers of %s (%s)",
                     what, detail ? detail : "no A/AAAA");
            break;
        default:
            r.code = 451;
            snprintf(r.esc, sizeof(r.esc), "4.4.3");
            snprintf(r.text, sizeof(r.text), "Name service error for %s: %s", what,
                     detail ? detail : "temporary failure");
            break;
        }
        sched_dest_fail(s, d, &r, "none");
        sched_sess_free(ss);
        return;
    }
    size_t total = 0;
    for (size_t i = 0; i < res->nhosts; i++)
        total += res->hosts[i].naddrs;
    struct smtpc_target *t = xcalloc(total ? total : 1, sizeof(*t));
    size_t n = 0;
    unsigned port = sched_dest_port(s, d);
    for (size_t i = 0; i < res->nhosts; i++) {
        const struct dns_host *h = &res->hosts[i];
        for (size_t a = 0; a < h->naddrs; a++) {
            struct smtpc_target *x = &t[n++];
            if (!str_copy(x->host, sizeof(x->host), h->name))
                x->host[0] = '\0';
            memcpy(&x->addr, &h->addrs[a].ss, sizeof(x->addr));
            x->addr_len = h->addrs[a].len;
            if (x->addr.ss_family == AF_INET)
                ((struct sockaddr_in *)&x->addr)->sin_port = htons((uint16_t)port);
            else
                ((struct sockaddr_in6 *)&x->addr)->sin6_port = htons((uint16_t)port);
            if (!sched_target_source(d, x))
                n--; /* no source address for this family */
        }
    }
    if (n == 0) {
        free(t);
        sched_no_source(s, ss);
        return;
    }
    sched_sess_connect(ss, t, n);
    free(t);
}

/* Builds a target straight from an IP literal or a unix path. */
static bool
sched_literal_target(const struct sched *s, const struct sched_dest *d, struct smtpc_target *t)
{
    memset(t, 0, sizeof(*t));
    if (d->route.kind == ROUTE_UNIX) {
        struct sockaddr_un *sun = (struct sockaddr_un *)&t->addr;
        sun->sun_family = AF_UNIX;
        if (!str_copy(sun->sun_path, sizeof(sun->sun_path), d->route.path))
            return false;
        t->addr_len = sizeof(*sun);
        snprintf(t->host, sizeof(t->host), "%s", d->route.path);
        return true;
    }
    unsigned port = sched_dest_port(s, d);
    struct sockaddr_in *sin = (struct sockaddr_in *)&t->addr;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&t->addr;
    if (inet_pton(AF_INET, d->route.host, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        t->addr_len = sizeof(*sin);
    } else if (inet_pton(AF_INET6, d->route.host, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        t->addr_len = sizeof(*sin6);
    } else {
        return false;
    }
    snprintf(t->host, sizeof(t->host), "%s", d->route.host);
    return true;
}

static void
sched_sess_start(struct sched *s, struct sched_dest *d)
{
    struct sched_sess *ss = xcalloc(1, sizeof(*ss));
    ss->s = s;
    ss->dest = d;
    ss->idle_timer = timer_new(s->loop, sched_on_idle_timeout, ss);
    ss->next = s->sessions;
    if (s->sessions)
        s->sessions->prev = ss;
    s->sessions = ss;
    s->nsessions++;
    d->sessions++;
    d->starting++;
    struct smtpc_target t;
    if (sched_literal_target(s, d, &t)) {
        if (!sched_target_source(d, &t)) {
            sched_no_source(s, ss);
            return;
        }
        sched_sess_connect(ss, &t, 1);
        return;
    }
    if (d->route.kind == ROUTE_MX)
        ss->q = dns_resolve_mx(s->dns, d->route.host, sched_on_dns, ss);
    else
        ss->q = dns_resolve_host(s->dns, d->route.host, sched_on_dns, ss);
}

static void
sched_pump(struct sched *s, struct sched_dest *d)
{
    while (d->head != NULL && !s->stopping) {
        if (d->idle != NULL) {
            struct sched_sess *ss = d->idle;
            sched_sess_unidle(ss);
            sched_sess_send(ss, sched_job_pop(d));
            continue;
        }
        if (d->sessions >= s->cfg->delivery.max_connections_per_destination
            || s->nsessions >= s->cfg->delivery.max_connections || d->starting >= d->nready)
            break;
        sched_sess_start(s, d);
    }
}

/* ---- lifecycle --------------------------------------------------------- */

struct sched *
sched_new(struct uv_loop_s *loop, struct petrel_config *cfg, struct spool *sp, struct dns *dns,
          const char (*locals)[46], size_t nlocals)
{
    struct sched *s = xcalloc(1, sizeof(*s));
    s->locals = xcalloc(nlocals ? nlocals : 1, sizeof(*s->locals));
    memcpy(s->locals, locals, nlocals * sizeof(*s->locals));
    s->nlocals = nlocals;
    s->loop = loop;
    s->cfg = config_ref(cfg);
    s->spool = sp;
    s->dns = dns;
    s->wake_timer = timer_new(loop, sched_on_wake, s);
    return s;
}

void
sched_set_hooks(struct sched *s, struct hooks *h)
{
    if (h == s->hooks)
        return;
    sched_hooks_settle(s);
    s->hooks = h;
}

static void
sched_start_one(const struct spool_envelope *env, void *arg)
{
    struct sched *s = arg;
    /* defer the work: sched_consider may queue spool records */
    int64_t at = 0;
    for (size_t i = 0; i < env->nrcpts; i++) {
        const struct spool_rcpt *r = &env->rcpts[i];
        if (r->state == SPOOL_RCPT_PENDING || r->state == SPOOL_RCPT_DEFERRED) {
            int64_t t = r->state == SPOOL_RCPT_PENDING ? 0 : r->next_attempt_ms;
            if (at == 0 || t < at)
                at = t;
        }
    }
    if (!(env->flags & SPOOL_F_QUARANTINED))
        sched_heap_push(s, at, env->qid); /* at 0 also sweeps finished messages */
}

void
sched_start(struct sched *s)
{
    if (s->cfg->delivery.hold) {
        log_msg(LOG_WARNING, NULL, "delivery.hold is set: mail is queued but not delivered");
        return;
    }
    spool_foreach(s->spool, sched_start_one, s);
    /* finished messages left over (e.g. a crash before their removal) are
     * also swept: sched_consider → settle happens when a heap entry fires */
    sched_wake_arm(s);
}

void
sched_enqueue(struct sched *s, const char *qid)
{
    if (s->stopping || s->cfg->delivery.hold)
        return;
    sched_consider(s, qid);
}

void
sched_stop(struct sched *s, void (*idle_cb)(void *arg), void *arg)
{
    s->stopping = true;
    s->idle_cb = idle_cb;
    s->idle_arg = arg;
    timer_stop(s->wake_timer);
    sched_hooks_settle(s);
    struct sched_sess *next;
    for (struct sched_sess *ss = s->sessions; ss; ss = next) {
        next = ss->next;
        if (ss->q) {
            dns_cancel(ss->q);
            ss->q = NULL;
            sched_sess_free(ss);
            continue;
        }
        if (ss->idle) {
            sched_sess_unidle(ss);
            smtpc_quit(ss->c);
        } else if (!ss->ready_seen && ss->c) {
            smtpc_abort(ss->c);
        }
    }
    sched_check_idle(s);
}

void
sched_abort(struct sched *s)
{
    sched_hooks_settle(s);
    sched_events_cancel(s);
    for (struct sched_sess *ss = s->sessions; ss; ss = ss->next)
        if (ss->c)
            smtpc_abort(ss->c);
    sched_check_idle(s);
}

size_t
sched_sessions(const struct sched *s)
{
    return s->nsessions;
}

void
sched_free(struct sched *s)
{
    if (s == NULL)
        return;
    if (s->nsessions != 0)
        PANIC("sched_free with %zu sessions", s->nsessions);
    /* after sched_stop nothing waits for a hook but event calls (possibly
     * started by commit callbacks that spool_close ran): drop them all */
    sched_events_cancel(s);
    while (s->pends != NULL)
        sched_pend_free(s->pends);
    while (s->plans != NULL)
        sched_plan_free(s->plans);
    for (size_t b = 0; b < SCHED_BUCKETS; b++) {
        struct sched_dest *dn;
        for (struct sched_dest *d = s->dests[b]; d; d = dn) {
            dn = d->hnext;
            struct sched_job *j;
            while ((j = sched_job_pop(d)) != NULL)
                free(j);
            free(d);
        }
        struct sched_msg *mn;
        for (struct sched_msg *m = s->msgs[b]; m; m = mn) {
            mn = m->hnext;
            free(m->busy);
            free(m);
        }
    }
    free(s->heap);
    free(s->locals);
    timer_free(s->wake_timer);
    config_unref(s->cfg);
    free(s);
}
