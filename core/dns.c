/*
 * dns — MX and host lookups on the libuv loop, resolved by libunbound.
 *
 * One struct ub_ctx per struct dns. libunbound runs its resolver in a
 * background thread of its own (ub_ctx_async(ctx, 1): its network I/O,
 * retries, TCP fallback after a truncated UDP answer, TTL cache and DNSSEC
 * validation happen there); answers come back over a pipe whose read end,
 * ub_fd(), we watch with uv_poll. ub_process() then runs libunbound's
 * callbacks on the loop thread, so everything here is single-threaded. The
 * alternative, ub_ctx_async(ctx, 0), forks a worker process instead, which
 * would inherit every listening socket and spool descriptor of the daemon.
 *
 * A query (struct dns_query) fans out into sub-queries (struct dns_sub), one
 * per ub_resolve_async(): MX first, then A and AAAA of every exchanger in
 * parallel (or of the domain itself for an implicit MX). The sub is the
 * libunbound callback argument: it lives until libunbound has called back
 * or until a successful ub_cancel() (after which libunbound never calls
 * back), and a sub whose query went away first is kept as an orphan (sub->q
 * NULL) until then, so libunbound never holds a pointer to freed memory
 * (STYLE.md §4.4). ub_ctx_delete() in dns_close() ends every callback, and
 * the orphans go with it.
 *
 * Deadlines: every query gets the same timeout (dns.timeout), so the
 * outstanding queries form a list in deadline order and one uv_timer armed
 * for the oldest suffices. On expiry the query's subs are cancelled; in the
 * address phase the exchangers resolved so far are used, otherwise it fails
 * with DNS_TEMPFAIL "timeout".
 *
 * Delivery: a finished query moves to the done list and a uv_idle handle
 * delivers it on the next loop iteration. User callbacks thus never run
 * inside ub_process() (where dns_close() → ub_ctx_delete() would pull
 * libunbound's state from under its own feet) nor inside dns_resolve_*().
 *
 * The interpretation of answers (MX parsing, null MX, implicit MX, the
 * final verdict) is pure code on struct dns_answer, tested on canned data.
 * DNSSEC: no trust anchor is configured, so `secure` stays false. DANE
 * does not use it: dane.c asks the resolver itself and trusts its AD bit,
 * which libunbound does not pass on.
 */
#include "dns.h"

#include <arpa/inet.h>
#include <ldns/ldns.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unbound.h>
#include <uv.h>

#include "config.h" /* the struct only: no config module code */
#include "log.h"
#include "util.h"

#define DNS_DEFAULT_TIMEOUT_MS 5000
#define DNS_NO_HOST SIZE_MAX /* dns_sub.host of the MX (or TXT) sub-query */
#define DNS_SUB_TXT (-1)     /* dns_sub.family of a TXT sub-query */
#define DNS_TXT_MAX_LEN 4096 /* longer TXT records are skipped */

enum dns_qstate {
    DNS_Q_PENDING,    /* in d->pending, waiting for answers or its deadline */
    DNS_Q_DONE,       /* in d->done, waiting for delivery */
    DNS_Q_DELIVERING, /* its callback runs: in no list */
};

struct dns_sub;

struct dns_query {
    struct dns *d; /* borrowed: dns_close() frees every query first */
    dns_result_cb *cb;
    void *arg;      /* borrowed, the caller's */
    char name[256]; /* the domain (MX) or host, without trailing dot */
    enum dns_qstate state;
    uint64_t done_gen;                /* d->deliver_gen when it joined d->done */
    uint64_t deadline;                /* uv_now() ms */
    struct dns_query *prev, *next;    /* in d->pending or d->done */
    struct dns_sub *subs;             /* owned: sub-queries in flight */
    unsigned outstanding;             /* entries in subs */
    struct dns_result res;            /* being built; owned */
    enum dns_answer_kind (*kinds)[2]; /* owned: per host, A and AAAA answer kinds */
    bool insecure;                    /* an answer was not DNSSEC-validated */
    enum dns_status status;           /* once done */
    const char *detail;               /* static text or NULL */
    dns_txt_cb *txt_cb;               /* a TXT query (then cb is NULL) */
    char **txt;                       /* owned: TXT records, once done */
    size_t ntxt;
};

struct dns_sub {
    struct dns *d;               /* borrowed */
    struct dns_query *q;         /* borrowed; NULL once orphaned */
    size_t host;                 /* index in q->res.hosts, DNS_NO_HOST for MX */
    int family;                  /* AF_INET (A) or AF_INET6 (AAAA); 0 for MX, DNS_SUB_TXT */
    int async_id;                /* libunbound's id for ub_cancel() */
    struct dns_sub *prev, *next; /* in q->subs or d->orphans */
};

struct dns {
    uv_loop_t *loop;   /* borrowed */
    struct ub_ctx *ub; /* owned */
    uv_poll_t poll;    /* on ub_fd() */
    uv_timer_t timer;  /* deadline of the oldest pending query */
    uv_idle_t idle;    /* delivers d->done */
    uint64_t timeout_ms;
    struct dns_query *pending, *pending_tail; /* owned, in deadline order */
    struct dns_query *done, *done_tail;       /* owned, in completion order */
    struct dns_sub *orphans;                  /* owned: subs whose query is gone */
    uint64_t deliver_gen;                     /* bumped by each delivery pass */
    int open_handles;                         /* freed when the last close callback ran */
    bool closing;
};

/* ------------------------------------------------------------------ pure helpers */

bool
dns_valid_name(const char *name)
{
    size_t len = strlen(name);
    if (len > 0 && name[len - 1] == '.')
        len--;
    if (len == 0 || len > 253)
        return false;
    size_t label = 0;
    bool label_digits = true; /* the current label is all digits */
    for (size_t i = 0; i < len; i++) {
        char c = name[i];
        if (c == '.') {
            if (label == 0 || name[i - 1] == '-')
                return false;
            label = 0;
            label_digits = true;
            continue;
        }
        bool alnum = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
        if (!alnum && c != '-' && c != '_')
            return false;
        if (c == '-' && label == 0)
            return false;
        if (!(c >= '0' && c <= '9'))
            label_digits = false;
        if (++label > 63)
            return false;
    }
    if (name[len - 1] == '-')
        return false;
    /* An all-numeric last label is an address written as a name ("192.0.2.1",
     * "127.1"), never a host name (RFC 1123 2.1, RFC 3696 2). */
    return !label_digits;
}

enum dns_answer_kind
dns_txt_parse(const struct dns_answer *a, char ***txt, size_t *ntxt)
{
    *txt = NULL;
    *ntxt = 0;
    const char *why;
    enum dns_answer_kind kind = dns_answer_classify(a, &why);
    if (kind != DNS_ANSWER_DATA)
        return kind;
    for (size_t i = 0; i < a->ndata && *ntxt < DNS_MAX_TXT; i++) {
        const uint8_t *p = a->data[i];
        size_t len = a->len[i];
        if (len > DNS_TXT_MAX_LEN)
            continue;
        char *out = xmalloc(len + 1);
        size_t n = 0;
        bool ok = true;
        for (size_t off = 0; off < len && ok;) {
            size_t sl = p[off];
            if (off + 1 + sl > len || memchr(p + off + 1, '\0', sl) != NULL) {
                ok = false;
                break;
            }
            memcpy(out + n, p + off + 1, sl);
            n += sl;
            off += 1 + sl;
        }
        if (!ok || len == 0) {
            free(out);
            continue;
        }
        out[n] = '\0';
        if (*txt == NULL)
            *txt = xcalloc(DNS_MAX_TXT, sizeof(**txt));
        (*txt)[(*ntxt)++] = out;
    }
    return kind;
}

enum dns_answer_kind
dns_answer_classify(const struct dns_answer *a, const char **detail)
{
    *detail = NULL;
    if (a->err != 0) {
        *detail = ub_strerror(a->err);
        return DNS_ANSWER_TEMPFAIL;
    }
    if (a->bogus) {
        *detail = "DNSSEC validation failed";
        return DNS_ANSWER_TEMPFAIL;
    }
    if (a->rcode == LDNS_RCODE_NXDOMAIN || a->nxdomain)
        return DNS_ANSWER_NXDOMAIN;
    if (a->rcode != LDNS_RCODE_NOERROR) {
        const ldns_lookup_table *lt = ldns_lookup_by_id(ldns_rcodes, a->rcode);
        *detail = lt != NULL ? lt->name : "DNS error";
        return DNS_ANSWER_TEMPFAIL;
    }
    /* A truncated UDP answer never gets here: libunbound retried it over
     * TCP and this is the TCP answer. */
    return a->havedata && a->ndata > 0 ? DNS_ANSWER_DATA : DNS_ANSWER_NODATA;
}

/* Decodes one MX rdata: 16-bit preference, then the exchanger as an
 * uncompressed wire-format name (ldns does the decoding). The name comes
 * back without its trailing dot; "." is the root (null MX). */
static bool
dns_mx_decode(const uint8_t *data, size_t len, unsigned *pref, char *name, size_t size)
{
    if (len < 3)
        return false;
    *pref = (unsigned)data[0] << 8 | data[1];
    ldns_rdf *rdf = NULL;
    size_t pos = 2;
    if (ldns_wire2dname(&rdf, data, len, &pos) != LDNS_STATUS_OK || pos != len) {
        ldns_rdf_deep_free(rdf);
        return false;
    }
    char *s = ldns_rdf2str(rdf);
    ldns_rdf_deep_free(rdf);
    if (s == NULL)
        return false;
    size_t n = strlen(s);
    if (n > 1 && s[n - 1] == '.')
        s[--n] = '\0';
    bool ok = str_copy(name, size, s);
    free(s);
    return ok;
}

enum dns_status
dns_mx_parse(const struct dns_answer *a, unsigned (*rnd)(unsigned n), struct dns_host **hosts,
             size_t *nhosts, bool *implicit, const char **detail)
{
    *hosts = NULL;
    *nhosts = 0;
    *implicit = false;
    switch (dns_answer_classify(a, detail)) {
    case DNS_ANSWER_TEMPFAIL:
        return DNS_TEMPFAIL;
    case DNS_ANSWER_NXDOMAIN:
        *detail = "NXDOMAIN";
        return DNS_NXDOMAIN;
    case DNS_ANSWER_NODATA:
        *implicit = true; /* RFC 5321 5.1: the domain itself is the only host */
        return DNS_OK;
    case DNS_ANSWER_DATA:
        break;
    }
    struct dns_host *all = xcalloc(a->ndata, sizeof(*all));
    size_t nall = 0;
    size_t nroot = 0;
    size_t nskipped = 0;
    for (size_t i = 0; i < a->ndata; i++) {
        struct dns_host *x = &all[nall];
        if (!dns_mx_decode(a->data[i], a->len[i], &x->pref, x->name, sizeof(x->name))) {
            nskipped++;
            continue;
        }
        if (strcmp(x->name, ".") == 0) {
            nroot++; /* RFC 7505 3: "." beside other records is not a host */
            continue;
        }
        if (!dns_valid_name(x->name)) {
            nskipped++; /* an IP literal or a name no host can have */
            continue;
        }
        nall++;
    }
    if (nall == 0) {
        free(all);
        if (nroot > 0 && nskipped == 0) {
            *detail = "null MX";
            return DNS_NULL_MX;
        }
        *detail = "no usable MX host";
        return DNS_TEMPFAIL;
    }
    dns_sort_mx(all, nall, rnd);
    /* Keep the first DNS_MAX_MX_HOSTS distinct exchangers: in sorted order
     * the first occurrence of a name carries its best preference. */
    struct dns_host *h = xcalloc(nall < DNS_MAX_MX_HOSTS ? nall : DNS_MAX_MX_HOSTS, sizeof(*h));
    size_t n = 0;
    for (size_t i = 0; i < nall && n < DNS_MAX_MX_HOSTS; i++) {
        size_t j = 0;
        while (j < n && ascii_casecmp(h[j].name, all[i].name) != 0)
            j++;
        if (j == n)
            h[n++] = all[i];
    }
    free(all);
    *hosts = h;
    *nhosts = n;
    return DNS_OK;
}

void
dns_host_add_addrs(struct dns_host *h, int family, const struct dns_answer *a)
{
    size_t nv4 = 0;
    for (size_t i = 0; i < h->naddrs; i++)
        if (h->addrs[i].ss.ss_family == AF_INET)
            nv4++;
    size_t have = family == AF_INET ? nv4 : h->naddrs - nv4;
    size_t want = family == AF_INET ? 4 : 16;
    for (size_t i = 0; i < a->ndata && have < DNS_MAX_ADDRS; i++) {
        if (a->len[i] != want)
            continue;
        struct dns_addr addr;
        memset(&addr, 0, sizeof(addr));
        if (family == AF_INET) {
            struct sockaddr_in *sin = (struct sockaddr_in *)&addr.ss;
            sin->sin_family = AF_INET;
            memcpy(&sin->sin_addr, a->data[i], 4);
            addr.len = sizeof(*sin);
        } else {
            struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&addr.ss;
            sin6->sin6_family = AF_INET6;
            memcpy(&sin6->sin6_addr, a->data[i], 16);
            addr.len = sizeof(*sin6);
        }
        h->addrs = xreallocarray(h->addrs, h->naddrs + 1, sizeof(*h->addrs));
        /* IPv4 addresses go after the other IPv4 ones, before any IPv6 */
        size_t at = family == AF_INET ? nv4 : h->naddrs;
        memmove(&h->addrs[at + 1], &h->addrs[at], (h->naddrs - at) * sizeof(*h->addrs));
        h->addrs[at] = addr;
        h->naddrs++;
        if (family == AF_INET)
            nv4++;
        have++;
    }
}

enum dns_status
dns_result_finish(struct dns_result *res, const enum dns_answer_kind (*kinds)[2],
                  const char **detail)
{
    *detail = NULL;
    size_t kept = 0;
    bool temp = false;
    bool all_nx = true;
    for (size_t i = 0; i < res->nhosts; i++) {
        for (int f = 0; f < 2; f++) {
            temp |= kinds[i][f] == DNS_ANSWER_TEMPFAIL;
            all_nx &= kinds[i][f] == DNS_ANSWER_NXDOMAIN;
        }
        if (res->hosts[i].naddrs > 0)
            kept++;
    }
    if (kept > 0) {
        /* An exchanger that failed (temporarily or not) while others have
         * addresses is simply not tried. */
        size_t j = 0;
        for (size_t i = 0; i < res->nhosts; i++) {
            if (res->hosts[i].naddrs > 0)
                res->hosts[j++] = res->hosts[i];
            else
                free(res->hosts[i].addrs);
        }
        res->nhosts = j;
        return DNS_OK;
    }
    if (temp) {
        *detail = res->mx ? "address lookup of every MX host failed" : "address lookup failed";
        return DNS_TEMPFAIL;
    }
    if (all_nx && !res->mx && res->nhosts > 0) {
        *detail = "NXDOMAIN";
        return DNS_NXDOMAIN;
    }
    *detail = res->mx ? "no MX host has an address" : "no A/AAAA record";
    return DNS_NO_ADDRESS;
}

/* ------------------------------------------------------------------ the engine */

static void dns_on_ub(void *arg, int err, struct ub_result *r);
static void dns_on_timer(uv_timer_t *t);
static void dns_on_idle(uv_idle_t *h);

static void
dns_list_remove(struct dns_query **head, struct dns_query **tail, struct dns_query *q)
{
    if (q->prev)
        q->prev->next = q->next;
    else
        *head = q->next;
    if (q->next)
        q->next->prev = q->prev;
    else
        *tail = q->prev;
    q->prev = q->next = NULL;
}

static void
dns_list_append(struct dns_query **head, struct dns_query **tail, struct dns_query *q)
{
    q->next = NULL;
    q->prev = *tail;
    if (*tail)
        (*tail)->next = q;
    else
        *head = q;
    *tail = q;
}

static void
dns_sub_unlink(struct dns_sub **head, struct dns_sub *s)
{
    if (s->prev)
        s->prev->next = s->next;
    else
        *head = s->next;
    if (s->next)
        s->next->prev = s->prev;
    s->prev = s->next = NULL;
}

static void
dns_sub_push(struct dns_sub **head, struct dns_sub *s)
{
    s->prev = NULL;
    s->next = *head;
    if (*head)
        (*head)->prev = s;
    *head = s;
}

static void
dns_arm_timer(struct dns *d)
{
    if (d->pending == NULL) {
        uv_timer_stop(&d->timer);
        return;
    }
    uint64_t now = uv_now(d->loop);
    uint64_t due = d->pending->deadline > now ? d->pending->deadline - now : 0;
    uv_timer_start(&d->timer, dns_on_timer, due, 0);
}

/* Stops every sub-query of q: a cancelled one never calls back; one that
 * libunbound does not know any more is kept as an orphan until it does. */
static void
dns_query_cancel_subs(struct dns_query *q)
{
    struct dns *d = q->d;
    while (q->subs) {
        struct dns_sub *s = q->subs;
        dns_sub_unlink(&q->subs, s);
        q->outstanding--;
        if (!d->closing && ub_cancel(d->ub, s->async_id) != 0) {
            s->q = NULL;
            dns_sub_push(&d->orphans, s);
        } else {
            free(s);
        }
    }
}

static void
dns_query_free(struct dns_query *q)
{
    dns_result_reset(&q->res);
    free(q->kinds);
    for (size_t i = 0; i < q->ntxt; i++)
        free(q->txt[i]);
    free(q->txt);
    free(q);
}

/* The query has its verdict: off the pending list, onto the done list. */
static void
dns_query_finish(struct dns_query *q, enum dns_status status, const char *detail)
{
    struct dns *d = q->d;
    if (q->state != DNS_Q_PENDING)
        PANIC("dns_query_finish: query %s in state %d", q->name, (int)q->state);
    dns_query_cancel_subs(q);
    bool was_head = d->pending == q;
    dns_list_remove(&d->pending, &d->pending_tail, q);
    if (was_head)
        dns_arm_timer(d);
    q->status = status;
    q->detail = detail;
    if (status == DNS_OK || (status == DNS_NO_ADDRESS && q->res.mx))
        q->res.secure = !q->insecure;
    else
        dns_result_reset(&q->res); /* the callback gets res NULL */
    q->state = DNS_Q_DONE;
    q->done_gen = d->deliver_gen;
    dns_list_append(&d->done, &d->done_tail, q);
    uv_idle_start(&d->idle, dns_on_idle);
}

/* Starts one libunbound lookup for q; false if libunbound refused it (the
 * caller records the failure). */
static bool
dns_sub_start(struct dns_query *q, size_t host, int family, const char **detail)
{
    struct dns *d = q->d;
    struct dns_sub *s = xcalloc(1, sizeof(*s));
    s->d = d;
    s->q = q;
    s->host = host;
    s->family = family;
    const char *name = host == DNS_NO_HOST ? q->name : q->res.hosts[host].name;
    int type = family == 0             ? LDNS_RR_TYPE_MX
               : family == DNS_SUB_TXT ? LDNS_RR_TYPE_TXT
               : family == AF_INET     ? LDNS_RR_TYPE_A
                                       : LDNS_RR_TYPE_AAAA;
    dns_sub_push(&q->subs, s);
    q->outstanding++;
    int r = ub_resolve_async(d->ub, name, type, LDNS_RR_CLASS_IN, s, dns_on_ub, &s->async_id);
    if (r != 0) {
        dns_sub_unlink(&q->subs, s);
        q->outstanding--;
        free(s);
        *detail = ub_strerror(r);
        log_msg(LOG_WARNING, NULL, "dns: cannot start lookup of %s: %s", name, *detail);
        return false;
    }
    return true;
}

/* Address phase: A and AAAA of every host in q->res, in parallel. */
static void
dns_query_resolve_hosts(struct dns_query *q)
{
    q->kinds = xcalloc(q->res.nhosts, sizeof(*q->kinds));
    for (size_t i = 0; i < q->res.nhosts; i++) {
        for (int f = 0; f < 2; f++) {
            const char *why;
            if (!dns_sub_start(q, i, f == 0 ? AF_INET : AF_INET6, &why))
                q->kinds[i][f] = DNS_ANSWER_TEMPFAIL;
        }
    }
    if (q->outstanding == 0) { /* libunbound refused everything */
        const char *detail;
        enum dns_status st =
            dns_result_finish(&q->res, (const enum dns_answer_kind(*)[2])q->kinds, &detail);
        dns_query_finish(q, st, detail);
    }
}

/* A view of a ub_result; *lens (owned by the caller, free()) holds the
 * lengths as size_t. */
static void
dns_answer_from_ub(struct dns_answer *a, int err, const struct ub_result *r, size_t **lens)
{
    memset(a, 0, sizeof(*a));
    *lens = NULL;
    a->err = err;
    if (err != 0 || r == NULL) {
        if (a->err == 0)
            a->err = UB_NOMEM;
        return;
    }
    a->rcode = r->rcode;
    a->havedata = r->havedata != 0;
    a->nxdomain = r->nxdomain != 0;
    a->secure = r->secure != 0;
    a->bogus = r->bogus != 0;
    a->canonname = r->canonname;
    size_t n = 0;
    while (r->data != NULL && r->data[n] != NULL)
        n++;
    /* n is bounded by the answer's size (at most 64 KiB on the wire) */
    *lens = xcalloc(n + 1, sizeof(**lens));
    for (size_t i = 0; i < n; i++)
        (*lens)[i] = r->len[i] > 0 ? (size_t)r->len[i] : 0;
    a->data = (const uint8_t *const *)r->data;
    a->len = *lens;
    a->ndata = n;
}

static void
dns_on_mx_answer(struct dns_query *q, const struct dns_answer *a)
{
    struct dns_host *hosts;
    size_t n;
    bool implicit;
    const char *detail;
    enum dns_status st = dns_mx_parse(a, NULL, &hosts, &n, &implicit, &detail);
    if (st != DNS_OK) {
        dns_query_finish(q, st, detail);
        return;
    }
    if (implicit) {
        q->res.implicit_mx = true;
        q->res.hosts = xcalloc(1, sizeof(*q->res.hosts));
        q->res.nhosts = 1;
        if (!str_copy(q->res.hosts[0].name, sizeof(q->res.hosts[0].name), q->name))
            PANIC("dns: name %s too long", q->name); /* checked by dns_valid_name */
    } else {
        q->res.mx = true;
        q->res.hosts = hosts;
        q->res.nhosts = n;
    }
    dns_query_resolve_hosts(q);
}

/* libunbound's callback, run by ub_process() on the loop thread. */
static void
dns_on_ub(void *arg, int err, struct ub_result *r)
{
    struct dns_sub *s = arg;
    struct dns_query *q = s->q;
    if (q == NULL) { /* its query timed out or was cancelled */
        dns_sub_unlink(&s->d->orphans, s);
        free(s);
        ub_resolve_free(r);
        return;
    }
    dns_sub_unlink(&q->subs, s);
    q->outstanding--;

    size_t *lens;
    struct dns_answer a;
    dns_answer_from_ub(&a, err, r, &lens);
    if (!a.secure)
        q->insecure = true;
    if (s->family == DNS_SUB_TXT) {
        switch (dns_txt_parse(&a, &q->txt, &q->ntxt)) {
        case DNS_ANSWER_DATA:
        case DNS_ANSWER_NODATA:
            dns_query_finish(q, DNS_OK, NULL);
            break;
        case DNS_ANSWER_NXDOMAIN:
            dns_query_finish(q, DNS_NXDOMAIN, NULL);
            break;
        case DNS_ANSWER_TEMPFAIL: {
            const char *why;
            (void)dns_answer_classify(&a, &why);
            dns_query_finish(q, DNS_TEMPFAIL, why);
            break;
        }
        }
    } else if (s->host == DNS_NO_HOST) {
        dns_on_mx_answer(q, &a);
    } else {
        const char *why;
        q->kinds[s->host][s->family == AF_INET ? 0 : 1] = dns_answer_classify(&a, &why);
        dns_host_add_addrs(&q->res.hosts[s->host], s->family, &a);
        if (q->outstanding == 0) {
            const char *detail;
            enum dns_status st =
                dns_result_finish(&q->res, (const enum dns_answer_kind(*)[2])q->kinds, &detail);
            dns_query_finish(q, st, detail);
        }
    }
    free(lens);
    free(s);
    ub_resolve_free(r);
}

static void
dns_on_poll(uv_poll_t *h, int status, int events)
{
    struct dns *d = h->data;
    if (status < 0) {
        log_msg(LOG_WARNING, NULL, "dns: resolver pipe: %s", uv_strerror(status));
        return;
    }
    int r = ub_process(d->ub);
    if (r != 0)
        log_msg(LOG_WARNING, NULL, "dns: resolver: %s", ub_strerror(r));
}

/* The deadline passed. In the address phase the exchangers resolved so far
 * are used and the silent ones count as failed temporarily (as Postfix
 * carries on past an MX host whose lookup failed); otherwise: timeout. */
static void
dns_query_expire(struct dns_query *q)
{
    if (q->kinds == NULL) {
        dns_query_finish(q, DNS_TEMPFAIL, "timeout");
        return;
    }
    for (struct dns_sub *s = q->subs; s != NULL; s = s->next)
        q->kinds[s->host][s->family == AF_INET ? 0 : 1] = DNS_ANSWER_TEMPFAIL;
    const char *detail;
    enum dns_status st =
        dns_result_finish(&q->res, (const enum dns_answer_kind(*)[2])q->kinds, &detail);
    if (st == DNS_TEMPFAIL)
        detail = "timeout";
    dns_query_finish(q, st, detail);
}

static void
dns_on_timer(uv_timer_t *t)
{
    struct dns *d = t->data;
    uint64_t now = uv_now(d->loop);
    while (d->pending != NULL && d->pending->deadline <= now)
        dns_query_expire(d->pending);
    dns_arm_timer(d);
}

static void
dns_on_idle(uv_idle_t *h)
{
    struct dns *d = h->data;
    /* Queries that finish during this pass (started or failed from a
     * callback) wait for the next loop iteration. */
    uint64_t gen = d->deliver_gen++;
    while (d->done != NULL && d->done->done_gen <= gen && !d->closing) {
        struct dns_query *q = d->done;
        dns_list_remove(&d->done, &d->done_tail, q);
        q->state = DNS_Q_DELIVERING;
        if (q->txt_cb != NULL) {
            q->txt_cb(q, q->status, (const char *const *)q->txt, q->ntxt, q->detail, q->arg);
            dns_query_free(q);
            continue;
        }
        bool with_res = q->status == DNS_OK || (q->status == DNS_NO_ADDRESS && q->res.mx);
        q->cb(q, q->status, with_res ? &q->res : NULL, q->detail, q->arg);
        dns_query_free(q);
    }
    if (!d->closing && d->done == NULL)
        uv_idle_stop(&d->idle);
}

static void
dns_on_close(uv_handle_t *h)
{
    struct dns *d = h->data;
    if (--d->open_handles == 0)
        free(d);
}

/* A dns.resolvers entry, "ip:port", "[ipv6]:port" or "localhost:port" →
 * unbound's "ip@port". */
static bool
dns_fwd_spec(const char *hostport, char *out, size_t size)
{
    char host[INET6_ADDRSTRLEN];
    const char *port;
    size_t hlen;
    if (hostport[0] == '[') {
        const char *close = strchr(hostport, ']');
        if (close == NULL || close[1] != ':')
            return false;
        hlen = (size_t)(close - hostport - 1);
        if (hlen >= sizeof(host))
            return false;
        memcpy(host, hostport + 1, hlen);
        port = close + 2;
    } else {
        const char *colon = strrchr(hostport, ':');
        if (colon == NULL || (size_t)(colon - hostport) >= sizeof(host))
            return false;
        hlen = (size_t)(colon - hostport);
        memcpy(host, hostport, hlen);
        port = colon + 1;
    }
    host[hlen] = '\0';
    if (strcmp(host, "localhost") == 0 && hostport[0] != '[')
        snprintf(host, sizeof(host), "127.0.0.1");
    unsigned char a[16];
    if (inet_pton(hostport[0] == '[' ? AF_INET6 : AF_INET, host, a) != 1)
        return false;
    char *end;
    unsigned long p = strtoul(port, &end, 10);
    if (port[0] < '0' || port[0] > '9' || *end != '\0' || p == 0 || p > 65535)
        return false;
    int n = snprintf(out, size, "%s@%lu", host, p);
    return n > 0 && (size_t)n < size;
}

static int
dns_ub_setup(struct ub_ctx *ub, const struct petrel_config *cfg, char **err)
{
    int r;
    /* the resolver in a thread of libunbound's, answers over ub_fd() */
    if ((r = ub_ctx_async(ub, 1)) != 0) {
        *err = xasprintf("dns: cannot set up the resolver: %s", ub_strerror(r));
        return -1;
    }
    /* libunbound's own retry schedule stays as it is: our deadline ends
     * each query. Lowering infra-cache-max-rtt to the deadline would make
     * one slow answer (a forwarder waiting on some broken domain) mark the
     * forwarder down, and every other lookup would SERVFAIL at once. */
    const char *opts[][2] = {
        /* forwarders on loopback (a local cache, dnsmasq in tests) are fine */
        {"do-not-query-localhost:", "no"},
        /* a forwarder that was down keeps being probed, so a short outage
         * does not turn into 15 minutes (infra-host-ttl) of SERVFAILs */
        {"infra-keep-probing:", "yes"},
        /* libunbound answers the RFC 6761 name "test." itself (NXDOMAIN);
         * RFC 6761 6.2 asks for an option to resolve it where a local
         * server serves it, as the resolvers of a test network do. A
         * transparent zone without data does that ("test. nodefault"
         * through ub_ctx_set_option is ignored by libunbound 1.17) */
        {"local-zone:", "test. transparent"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(opts); i++) {
        if ((r = ub_ctx_set_option(ub, opts[i][0], opts[i][1])) != 0) {
            *err =
                xasprintf("dns: resolver option %s %s: %s", opts[i][0], opts[i][1], ub_strerror(r));
            return -1;
        }
    }
    if (cfg->dns.resolvers.n == 0) {
        if ((r = ub_ctx_resolvconf(ub, NULL)) != 0) {
            *err = xasprintf("dns: cannot use /etc/resolv.conf: %s", ub_strerror(r));
            return -1;
        }
        return 0;
    }
    for (size_t i = 0; i < cfg->dns.resolvers.n; i++) {
        char spec[INET6_ADDRSTRLEN + 8];
        const char *hp = cfg->dns.resolvers.v[i];
        if (!dns_fwd_spec(hp, spec, sizeof(spec))) {
            *err = xasprintf("dns.resolvers: %s: expected ip:port", hp);
            return -1;
        }
        if ((r = ub_ctx_set_fwd(ub, spec)) != 0) {
            *err = xasprintf("dns.resolvers: %s: %s", hp, ub_strerror(r));
            return -1;
        }
    }
    return 0;
}

int
dns_open(uv_loop_t *loop, const struct petrel_config *cfg, struct dns **out, char **err)
{
    *out = NULL;
    *err = NULL;
    struct dns *d = xcalloc(1, sizeof(*d));
    d->loop = loop;
    d->timeout_ms = cfg->dns.timeout_ms > 0 ? cfg->dns.timeout_ms : DNS_DEFAULT_TIMEOUT_MS;
    d->ub = ub_ctx_create();
    if (d->ub == NULL) {
        *err = xstrdup("dns: cannot create the resolver context");
        free(d);
        return -1;
    }
    if (dns_ub_setup(d->ub, cfg, err) != 0) {
        ub_ctx_delete(d->ub);
        free(d);
        return -1;
    }
    int fd = ub_fd(d->ub);
    int r = fd < 0 ? UV_EBADF : uv_poll_init(loop, &d->poll, fd);
    if (r != 0) {
        *err = xasprintf("dns: cannot watch the resolver: %s", uv_strerror(r));
        ub_ctx_delete(d->ub);
        free(d);
        return -1;
    }
    uv_timer_init(loop, &d->timer);
    uv_idle_init(loop, &d->idle);
    d->poll.data = d->timer.data = d->idle.data = d;
    d->open_handles = 3;
    /* the poll handle is the only one that does not keep the loop alive on
     * its own: an idle daemon has nothing to wait for from the resolver */
    uv_poll_start(&d->poll, UV_READABLE, dns_on_poll);
    uv_unref((uv_handle_t *)&d->poll);
    *out = d;
    return 0;
}

void
dns_close(struct dns *d)
{
    if (d == NULL || d->closing)
        return;
    d->closing = true;
    while (d->pending != NULL) {
        struct dns_query *q = d->pending;
        dns_query_cancel_subs(q); /* closing: no ub_cancel, the context goes */
        dns_list_remove(&d->pending, &d->pending_tail, q);
        dns_query_free(q);
    }
    while (d->done != NULL) {
        struct dns_query *q = d->done;
        dns_list_remove(&d->done, &d->done_tail, q);
        dns_query_free(q);
    }
    /* stop watching the fd before libunbound closes it */
    uv_poll_stop(&d->poll);
    uv_close((uv_handle_t *)&d->poll, dns_on_close);
    uv_close((uv_handle_t *)&d->timer, dns_on_close);
    uv_close((uv_handle_t *)&d->idle, dns_on_close);
    ub_ctx_delete(d->ub); /* joins libunbound's thread; no callback after this */
    d->ub = NULL;
    while (d->orphans != NULL) {
        struct dns_sub *s = d->orphans;
        dns_sub_unlink(&d->orphans, s);
        free(s);
    }
}

/* A new pending query for name (copied, trailing dot dropped), its
 * deadline running. *valid tells whether the name fits and is a host name. */
static struct dns_query *
dns_query_new(struct dns *d, const char *name, dns_result_cb *cb, void *arg, bool *valid)
{
    if (d->closing)
        PANIC("dns: lookup of %s after dns_close", name);
    struct dns_query *q = xcalloc(1, sizeof(*q));
    q->d = d;
    q->cb = cb;
    q->arg = arg;
    q->state = DNS_Q_PENDING;
    q->deadline = uv_now(d->loop) + d->timeout_ms;
    bool fits = str_copy(q->name, sizeof(q->name), name);
    size_t len = strlen(q->name);
    if (len > 1 && q->name[len - 1] == '.')
        q->name[len - 1] = '\0';
    dns_list_append(&d->pending, &d->pending_tail, q);
    if (d->pending == q)
        dns_arm_timer(d);
    *valid = fits && dns_valid_name(q->name);
    return q;
}

struct dns_query *
dns_resolve_mx(struct dns *d, const char *domain, dns_result_cb *cb, void *arg)
{
    bool valid;
    struct dns_query *q = dns_query_new(d, domain, cb, arg, &valid);
    const char *why;
    if (!valid)
        dns_query_finish(q, DNS_NXDOMAIN, "invalid domain name");
    else if (!dns_sub_start(q, DNS_NO_HOST, 0, &why))
        dns_query_finish(q, DNS_TEMPFAIL, why);
    return q;
}

struct dns_query *
dns_resolve_txt(struct dns *d, const char *name, dns_txt_cb *cb, void *arg)
{
    bool valid;
    struct dns_query *q = dns_query_new(d, name, NULL, arg, &valid);
    q->txt_cb = cb;
    const char *why;
    if (!valid)
        dns_query_finish(q, DNS_NXDOMAIN, "invalid domain name");
    else if (!dns_sub_start(q, DNS_NO_HOST, DNS_SUB_TXT, &why))
        dns_query_finish(q, DNS_TEMPFAIL, why);
    return q;
}

/* An IPv4/IPv6 literal → its address; false if host is not one. */
static bool
dns_parse_literal(const char *host, struct dns_addr *addr)
{
    memset(addr, 0, sizeof(*addr));
    struct sockaddr_in *sin = (struct sockaddr_in *)&addr->ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&addr->ss;
    if (inet_pton(AF_INET, host, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        addr->len = sizeof(*sin);
        return true;
    }
    if (inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        addr->len = sizeof(*sin6);
        return true;
    }
    return false;
}

struct dns_query *
dns_resolve_host(struct dns *d, const char *host, dns_result_cb *cb, void *arg)
{
    bool valid;
    struct dns_query *q = dns_query_new(d, host, cb, arg, &valid);
    q->res.hosts = xcalloc(1, sizeof(*q->res.hosts));
    q->res.nhosts = 1;
    struct dns_host *h = &q->res.hosts[0];
    struct dns_addr addr;
    if (dns_parse_literal(host, &addr)) {
        if (!str_copy(h->name, sizeof(h->name), host))
            PANIC("dns: literal %s too long", host); /* an address fits */
        h->addrs = xmalloc(sizeof(*h->addrs));
        h->addrs[0] = addr;
        h->naddrs = 1;
        q->insecure = true;
        dns_query_finish(q, DNS_OK, NULL);
        return q;
    }
    if (!valid) {
        dns_query_finish(q, DNS_NXDOMAIN, "invalid domain name");
        return q;
    }
    if (!str_copy(h->name, sizeof(h->name), q->name))
        PANIC("dns: name %s too long", q->name); /* dns_valid_name: at most 253 */
    dns_query_resolve_hosts(q);
    return q;
}

void
dns_cancel(struct dns_query *q)
{
    if (q == NULL || q->state == DNS_Q_DELIVERING)
        return;
    struct dns *d = q->d;
    if (q->state == DNS_Q_PENDING) {
        dns_query_cancel_subs(q);
        bool was_head = d->pending == q;
        dns_list_remove(&d->pending, &d->pending_tail, q);
        if (was_head)
            dns_arm_timer(d);
    } else {
        dns_list_remove(&d->done, &d->done_tail, q);
    }
    dns_query_free(q);
}
