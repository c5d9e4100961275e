/*
 * dane — TLSA, MX and address lookups that report the resolver's AD bit,
 * for outbound DANE (RFC 7672). See dane.h for what is asked and why not
 * through libunbound.
 *
 * A struct dane_lookup holds up to three queries (struct dane_sub: MX of
 * the domain, A or AAAA of the host, TLSA of _port._tcp.host), one UDP
 * socket per address family of the resolvers (uv_udp_t, bound by the
 * kernel to a random port; each query has a random 16-bit id, and an
 * answer must come from a configured resolver, carry the id and repeat
 * the question), one uv_timer for retries and the deadline, and a TCP
 * connection (struct dane_tcp) per query whose UDP answer was truncated.
 * Unanswered queries go to the next resolver every third of the timeout;
 * a SERVFAIL or REFUSED is taken only once every resolver gave it. When
 * dane_decide() has its verdict (an insecure MX or address answer decides
 * before the others are in), the callback runs and every handle is
 * closed; the lookup is freed in the last close callback (STYLE.md §4.3).
 *
 * Owns: its handles, the query packets, the TLSA records of the answer.
 * Leaves to others: what to do with the verdict (smtp_client), the TLS
 * side (tls.c). Everything runs on the loop thread; nothing blocks, but
 * the first dane_resolvers_init() without dns.resolvers reads
 * /etc/resolv.conf.
 */
#include "dane.h"

#include <arpa/inet.h>
#include <ldns/ldns.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "buf.h"
#include "log.h"
#include "util.h"

#define DANE_DEFAULT_TIMEOUT_MS 5000
#define DANE_EDNS_SIZE 1232 /* the DNS flag day 2020 value: no fragmentation */
#define DANE_UDP_MAX 65535
#define DANE_TCP_MAX 65535 /* a TCP answer is at most this (its length is 16 bits) */
#define DANE_CNAME_MAX 8   /* CNAME hops followed inside one answer */
#define DANE_MAX_SUBS 3

/* ------------------------------------------------------------------ pure helpers */

bool
dane_tlsa_usable(const struct dane_tlsa *t)
{
    if (t->usage != 2 && t->usage != 3) /* RFC 7672 3.1.3: no PKIX-TA/PKIX-EE */
        return false;
    if (t->selector > 1 || t->len == 0)
        return false;
    switch (t->mtype) {
    case 0:
        return true;
    case 1:
        return t->len == 32;
    case 2:
        return t->len == 64;
    default:
        return false;
    }
}

uint8_t *
dane_query_wire(const char *qname, int qtype, uint16_t id, size_t *len)
{
    ldns_rdf *name = ldns_dname_new_frm_str(qname);
    if (name == NULL)
        return NULL;
    ldns_pkt *pkt = ldns_pkt_query_new(name, (ldns_rr_type)qtype, LDNS_RR_CLASS_IN, LDNS_RD);
    if (pkt == NULL) {
        ldns_rdf_deep_free(name);
        return NULL;
    }
    ldns_pkt_set_id(pkt, id);
    ldns_pkt_set_ad(pkt, true); /* RFC 6840 5.7: say we understand AD */
    ldns_pkt_set_edns_udp_size(pkt, DANE_EDNS_SIZE);
    ldns_pkt_set_edns_do(pkt, true); /* RFC 3225; older resolvers set AD only then */
    uint8_t *wire = NULL;
    ldns_status st = ldns_pkt2wire(&wire, pkt, len);
    ldns_pkt_free(pkt);
    if (st != LDNS_STATUS_OK) {
        free(wire);
        return NULL;
    }
    return wire;
}

/* The records of type qtype in the answer section owned by qname or by the
 * end of the CNAME chain that starts at qname. Returns the matching RRs in
 * a new list (borrowed entries; free with ldns_rr_list_free) or NULL. */
static ldns_rr_list *
dane_answer_rrs(const ldns_pkt *pkt, const ldns_rdf *qname, int qtype)
{
    const ldns_rr_list *ans = ldns_pkt_answer(pkt);
    size_t n = ans != NULL ? ldns_rr_list_rr_count(ans) : 0;
    const ldns_rdf *name = qname;
    for (int hop = 0; hop <= DANE_CNAME_MAX; hop++) {
        ldns_rr_list *out = ldns_rr_list_new();
        const ldns_rdf *next = NULL;
        for (size_t i = 0; i < n; i++) {
            ldns_rr *rr = ldns_rr_list_rr(ans, i);
            if (ldns_rr_get_class(rr) != LDNS_RR_CLASS_IN ||
                ldns_dname_compare(ldns_rr_owner(rr), name) != 0)
                continue;
            if ((int)ldns_rr_get_type(rr) == qtype)
                ldns_rr_list_push_rr(out, rr);
            else if (ldns_rr_get_type(rr) == LDNS_RR_TYPE_CNAME && ldns_rr_rd_count(rr) == 1)
                next = ldns_rr_rdf(rr, 0);
        }
        if (ldns_rr_list_rr_count(out) > 0 || next == NULL || qtype == LDNS_RR_TYPE_CNAME)
            return out;
        ldns_rr_list_free(out);
        name = next;
    }
    return NULL; /* a CNAME loop or a chain too long: no records */
}

const char *
dane_answer_parse(const uint8_t *wire, size_t len, uint16_t id, const char *qname, int qtype,
                  struct dane_answer *a, struct dane_tlsa **tlsa, size_t *ntlsa)
{
    *tlsa = NULL;
    *ntlsa = 0;
    if (len < LDNS_HEADER_SIZE)
        return "short packet";
    if (ldns_read_uint16(wire) != id)
        return "another id";
    ldns_pkt *pkt = NULL;
    if (ldns_wire2pkt(&pkt, wire, len) != LDNS_STATUS_OK)
        return "malformed packet";
    const char *why = NULL;
    ldns_rdf *want = ldns_dname_new_frm_str(qname);
    const ldns_rr_list *q = ldns_pkt_question(pkt);
    ldns_rr *q0 = q != NULL && ldns_rr_list_rr_count(q) == 1 ? ldns_rr_list_rr(q, 0) : NULL;
    if (!ldns_pkt_qr(pkt) || ldns_pkt_get_opcode(pkt) != LDNS_PACKET_QUERY)
        why = "not a response";
    else if (want == NULL || q0 == NULL || ldns_dname_compare(ldns_rr_owner(q0), want) != 0 ||
             (int)ldns_rr_get_type(q0) != qtype || ldns_rr_get_class(q0) != LDNS_RR_CLASS_IN)
        why = "another question";
    if (why != NULL) {
        ldns_rdf_deep_free(want);
        ldns_pkt_free(pkt);
        return why;
    }
    memset(a, 0, sizeof(*a));
    a->done = true;
    a->rcode = ldns_pkt_get_rcode(pkt);
    a->ad = ldns_pkt_ad(pkt);
    a->tc = ldns_pkt_tc(pkt);
    ldns_rr_list *rrs = a->rcode == LDNS_RCODE_NOERROR ? dane_answer_rrs(pkt, want, qtype) : NULL;
    a->ndata = rrs != NULL ? ldns_rr_list_rr_count(rrs) : 0;
    if (qtype == LDNS_RR_TYPE_TLSA && a->ndata > 0) {
        size_t n = a->ndata < DANE_MAX_TLSA ? a->ndata : DANE_MAX_TLSA;
        struct dane_tlsa *t = xcalloc(n, sizeof(*t));
        size_t k = 0;
        for (size_t i = 0; i < a->ndata && k < n; i++) {
            ldns_rr *rr = ldns_rr_list_rr(rrs, i);
            if (ldns_rr_rd_count(rr) != 4)
                continue; /* ldns checked the lengths of the three octets */
            const ldns_rdf *d = ldns_rr_rdf(rr, 3);
            t[k].usage = ldns_rdf2native_int8(ldns_rr_rdf(rr, 0));
            t[k].selector = ldns_rdf2native_int8(ldns_rr_rdf(rr, 1));
            t[k].mtype = ldns_rdf2native_int8(ldns_rr_rdf(rr, 2));
            t[k].len = ldns_rdf_size(d);
            t[k].data = xmalloc(t[k].len ? t[k].len : 1);
            memcpy(t[k].data, ldns_rdf_data(d), t[k].len);
            k++;
        }
        *tlsa = t;
        *ntlsa = k;
    }
    ldns_rr_list_free(rrs);
    ldns_rdf_deep_free(want);
    ldns_pkt_free(pkt);
    return NULL;
}

enum dane_kind { K_PENDING, K_FAILED, K_INSECURE, K_SECURE };

static enum dane_kind
dane_kind(const struct dane_answer *a)
{
    if (!a->done)
        return K_PENDING;
    if (a->error != NULL || (a->rcode != LDNS_RCODE_NOERROR && a->rcode != LDNS_RCODE_NXDOMAIN))
        return K_FAILED;
    return a->ad ? K_SECURE : K_INSECURE;
}

static const char *
dane_failure_text(const struct dane_answer *a)
{
    if (a->error != NULL)
        return a->error;
    switch (a->rcode) {
    case LDNS_RCODE_SERVFAIL:
        return "SERVFAIL";
    case LDNS_RCODE_REFUSED:
        return "REFUSED";
    case LDNS_RCODE_FORMERR:
        return "FORMERR";
    case LDNS_RCODE_NOTIMPL:
        return "NOTIMP";
    default:
        return "unexpected rcode";
    }
}

static void dane_detail(struct dane_result *out, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
dane_detail(struct dane_result *out, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (vsnprintf(out->detail, sizeof(out->detail), fmt, ap) < 0)
        out->detail[0] = '\0'; /* truncation is fine */
    va_end(ap);
}

bool
dane_decide(const struct dane_answer *mx, const struct dane_answer *addr,
            const struct dane_answer *tlsa, const struct dane_tlsa *recs, size_t nrecs,
            const char *domain, const char *host, const char *tlsa_name, struct dane_result *out)
{
    enum dane_kind km = mx != NULL ? dane_kind(mx) : K_SECURE;
    enum dane_kind ka = dane_kind(addr);
    /* RFC 7672 2.2.1, 2.2.2: names from insecure answers are not a base
     * for DANE, whatever the other lookups say */
    if (km == K_INSECURE || ka == K_INSECURE) {
        dane_result_reset(out);
        out->status = DANE_INSECURE;
        if (km == K_INSECURE)
            dane_detail(out, "MX of %s not DNSSEC-validated", domain);
        else
            dane_detail(out, "address of %s not DNSSEC-validated", host);
        return true;
    }
    if (km == K_PENDING || ka == K_PENDING)
        return false;
    if (km == K_FAILED || ka == K_FAILED) {
        dane_result_reset(out);
        out->status = DANE_TEMPFAIL;
        if (km == K_FAILED)
            dane_detail(out, "MX lookup for %s: %s", domain, dane_failure_text(mx));
        else
            dane_detail(out, "address lookup for %s: %s", host, dane_failure_text(addr));
        return true;
    }
    enum dane_kind kt = dane_kind(tlsa);
    if (kt == K_PENDING)
        return false;
    dane_result_reset(out);
    switch (kt) {
    case K_FAILED:
        out->status = DANE_TEMPFAIL;
        dane_detail(out, "TLSA lookup for %s: %s", tlsa_name, dane_failure_text(tlsa));
        return true;
    case K_INSECURE:
        out->status = DANE_INSECURE;
        dane_detail(out, "TLSA of %s not DNSSEC-validated", tlsa_name);
        return true;
    default:
        break;
    }
    if (tlsa->rcode == LDNS_RCODE_NXDOMAIN || tlsa->ndata == 0 || nrecs == 0) {
        out->status = DANE_NONE;
        dane_detail(out, "no TLSA records for %s", tlsa_name);
        return true;
    }
    size_t usable = 0;
    for (size_t i = 0; i < nrecs; i++)
        usable += dane_tlsa_usable(&recs[i]);
    if (usable == 0) {
        out->status = DANE_UNUSABLE;
        dane_detail(out, "%zu TLSA records for %s, none usable", nrecs, tlsa_name);
        return true;
    }
    out->status = DANE_SECURE;
    out->tlsa = xcalloc(usable, sizeof(*out->tlsa));
    for (size_t i = 0; i < nrecs; i++) {
        if (!dane_tlsa_usable(&recs[i]))
            continue;
        struct dane_tlsa *t = &out->tlsa[out->ntlsa++];
        *t = recs[i];
        t->data = xmalloc(recs[i].len);
        memcpy(t->data, recs[i].data, recs[i].len);
    }
    dane_detail(out, "%zu usable TLSA records for %s", usable, tlsa_name);
    return true;
}

/* ------------------------------------------------------------------ resolvers */

/* "ip:port", "[ipv6]:port", "localhost:port" (dns.resolvers) → sockaddr. */
static bool
dane_parse_resolver(const char *hostport, struct sockaddr_storage *ss, socklen_t *len)
{
    char host[INET6_ADDRSTRLEN];
    const char *port;
    size_t hlen;
    bool v6 = hostport[0] == '[';
    if (v6) {
        const char *close = strchr(hostport, ']');
        if (close == NULL || close[1] != ':')
            return false;
        hlen = (size_t)(close - hostport - 1);
        port = close + 2;
    } else {
        const char *colon = strrchr(hostport, ':');
        if (colon == NULL)
            return false;
        hlen = (size_t)(colon - hostport);
        port = colon + 1;
    }
    if (hlen >= sizeof(host))
        return false;
    memcpy(host, hostport + (v6 ? 1 : 0), hlen);
    host[hlen] = '\0';
    if (!v6 && strcmp(host, "localhost") == 0 && !str_copy(host, sizeof(host), "127.0.0.1"))
        return false;
    char *end;
    unsigned long p = strtoul(port, &end, 10);
    if (port[0] < '0' || port[0] > '9' || *end != '\0' || p == 0 || p > 65535)
        return false;
    memset(ss, 0, sizeof(*ss));
    if (v6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons((uint16_t)p);
        *len = sizeof(*s6);
        return inet_pton(AF_INET6, host, &s6->sin6_addr) == 1;
    }
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
    s4->sin_family = AF_INET;
    s4->sin_port = htons((uint16_t)p);
    *len = sizeof(*s4);
    return inet_pton(AF_INET, host, &s4->sin_addr) == 1;
}

/* /etc/resolv.conf's name servers, read on first use (resolv.conf(5):
 * "nameserver ADDRESS", an IPv6 address possibly with a %scope). */
static const struct dane_resolvers *
dane_resolv_conf(void)
{
    static struct dane_resolvers cached;
    static bool loaded;
    if (loaded)
        return &cached;
    loaded = true;
    FILE *f = fopen("/etc/resolv.conf", "re");
    if (f == NULL)
        return &cached;
    char line[512];
    while (fgets(line, sizeof(line), f) != NULL && cached.n < DANE_MAX_RESOLVERS) {
        char addr[64];
        if (sscanf(line, " nameserver %63s", addr) != 1)
            continue;
        char *pct = strchr(addr, '%');
        if (pct != NULL)
            *pct = '\0';
        struct sockaddr_storage *ss = &cached.addr[cached.n];
        memset(ss, 0, sizeof(*ss));
        struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
        if (inet_pton(AF_INET, addr, &s4->sin_addr) == 1) {
            s4->sin_family = AF_INET;
            s4->sin_port = htons(53);
            cached.len[cached.n++] = sizeof(*s4);
        } else if (inet_pton(AF_INET6, addr, &s6->sin6_addr) == 1) {
            s6->sin6_family = AF_INET6;
            s6->sin6_port = htons(53);
            cached.len[cached.n++] = sizeof(*s6);
        }
    }
    fclose(f);
    return &cached;
}

const char *
dane_resolvers_init(struct dane_resolvers *rs, const char *const *list, size_t n,
                    uint64_t timeout_ms)
{
    memset(rs, 0, sizeof(*rs));
    rs->timeout_ms = timeout_ms > 0 ? timeout_ms : DANE_DEFAULT_TIMEOUT_MS;
    if (n == 0) {
        const struct dane_resolvers *sys = dane_resolv_conf();
        memcpy(rs->addr, sys->addr, sizeof(rs->addr));
        memcpy(rs->len, sys->len, sizeof(rs->len));
        rs->n = sys->n;
        return rs->n > 0 ? NULL : "no nameserver in /etc/resolv.conf";
    }
    for (size_t i = 0; i < n && rs->n < DANE_MAX_RESOLVERS; i++) {
        if (!dane_parse_resolver(list[i], &rs->addr[rs->n], &rs->len[rs->n])) {
            rs->n = 0;
            return "malformed dns.resolvers entry";
        }
        rs->n++;
    }
    return NULL;
}

/* ------------------------------------------------------------------ lookups */

struct dane_lookup;

struct dane_tcp {
    uv_tcp_t h;
    uv_connect_t creq;
    uv_write_t wreq;
    struct dane_lookup *l; /* borrowed: outlives its handles */
    struct dane_sub *sub;  /* borrowed; NULL once the query is done */
    size_t resolver;       /* index in l->rs */
    uint8_t *out;          /* owned: 2-octet length + query (RFC 7766 8) */
    struct buf in;         /* owned */
};

struct dane_sub {
    int type;       /* LDNS_RR_TYPE_* */
    char name[300]; /* the query name */
    uint16_t id;
    uint8_t *query; /* owned wire form; NULL: the name was refused */
    size_t query_len;
    size_t next;  /* the resolver the next send goes to */
    size_t fails; /* SERVFAIL/REFUSED answers so far */
    struct dane_answer ans;
    struct dane_tlsa *tlsa; /* owned: TLSA records of the answer */
    size_t ntlsa;
    struct dane_tcp *tcp; /* the TCP retry in progress, or NULL */
};

struct dane_lookup {
    uv_loop_t *loop;    /* borrowed */
    dane_lookup_cb *cb; /* borrowed */
    void *arg;          /* borrowed */
    struct dane_resolvers rs;
    char domain[256]; /* the MX domain ("" without the MX check) */
    char host[256];
    struct dane_sub subs[DANE_MAX_SUBS];
    struct dane_sub *mx, *addr, *tlsa; /* into subs; mx NULL without the check */
    size_t nsubs;
    uv_udp_t udp[2]; /* [0] IPv4, [1] IPv6 resolvers */
    bool udp_open[2];
    uv_timer_t timer;  /* retries and the deadline */
    uint64_t deadline; /* uv_now() ms */
    uint64_t retry_ms;
    int open_handles; /* freed when the last close callback ran */
    bool closing;     /* the verdict was given or the lookup cancelled */
    uint8_t rbuf[DANE_UDP_MAX];
};

static void dane_lookup_step(struct dane_lookup *l);

/* One of l's handles closed; the last one frees l. */
static void
dane_lookup_unref(struct dane_lookup *l)
{
    if (--l->open_handles > 0)
        return;
    for (size_t i = 0; i < l->nsubs; i++) {
        free(l->subs[i].query);
        dane_tlsa_free(l->subs[i].tlsa, l->subs[i].ntlsa);
    }
    free(l);
}

static void
dane_on_close(uv_handle_t *h)
{
    dane_lookup_unref(h->data);
}

static void
dane_tcp_on_close(uv_handle_t *h)
{
    struct dane_tcp *t = h->data;
    struct dane_lookup *l = t->l;
    free(t->out);
    buf_reset(&t->in);
    free(t);
    dane_lookup_unref(l);
}

static void
dane_tcp_close(struct dane_tcp *t)
{
    if (t->sub != NULL)
        t->sub->tcp = NULL;
    t->sub = NULL;
    uv_close((uv_handle_t *)&t->h, dane_tcp_on_close);
}

/* Stops everything; the lookup is freed once every handle closed. */
static void
dane_lookup_close(struct dane_lookup *l)
{
    l->closing = true;
    for (size_t i = 0; i < l->nsubs; i++) {
        if (l->subs[i].tcp != NULL)
            dane_tcp_close(l->subs[i].tcp);
    }
    for (int f = 0; f < 2; f++) {
        if (l->udp_open[f])
            uv_close((uv_handle_t *)&l->udp[f], dane_on_close);
    }
    uv_close((uv_handle_t *)&l->timer, dane_on_close);
}

static void
dane_sub_fail(struct dane_sub *s, const char *why)
{
    if (s->ans.done)
        return;
    memset(&s->ans, 0, sizeof(s->ans));
    s->ans.done = true;
    s->ans.error = why;
    if (s->tcp != NULL)
        dane_tcp_close(s->tcp);
}

/* The verdict, once dane_decide has one: the callback, then close. */
static void
dane_lookup_step(struct dane_lookup *l)
{
    if (l->closing)
        return;
    struct dane_result res;
    memset(&res, 0, sizeof(res));
    if (!dane_decide(l->mx ? &l->mx->ans : NULL, &l->addr->ans, &l->tlsa->ans, l->tlsa->tlsa,
                     l->tlsa->ntlsa, l->domain, l->host, l->tlsa->name, &res))
        return;
    l->closing = true; /* a cancel from inside the callback is a no-op */
    if (log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, NULL, "dane: host=%s, status=%s (%s)", l->host,
                dane_status_name(res.status), res.detail);
    l->cb(l, &res, l->arg);
    dane_result_reset(&res);
    dane_lookup_close(l);
}

static bool
dane_same_addr(const struct sockaddr *a, const struct sockaddr_storage *b)
{
    if (a->sa_family != b->ss_family)
        return false;
    if (a->sa_family == AF_INET) {
        const struct sockaddr_in *x = (const struct sockaddr_in *)a;
        const struct sockaddr_in *y = (const struct sockaddr_in *)b;
        return x->sin_port == y->sin_port && x->sin_addr.s_addr == y->sin_addr.s_addr;
    }
    if (a->sa_family == AF_INET6) {
        const struct sockaddr_in6 *x = (const struct sockaddr_in6 *)a;
        const struct sockaddr_in6 *y = (const struct sockaddr_in6 *)b;
        return x->sin6_port == y->sin6_port &&
               memcmp(&x->sin6_addr, &y->sin6_addr, sizeof(x->sin6_addr)) == 0;
    }
    return false;
}

static void dane_tcp_start(struct dane_lookup *l, struct dane_sub *s, size_t resolver);
static void dane_send(struct dane_lookup *l, struct dane_sub *s);

/* An answer for s (over UDP or TCP, from resolver r): keep it, or retry. */
static void
dane_sub_answer(struct dane_lookup *l, struct dane_sub *s, const uint8_t *p, size_t n, size_t r,
                bool tcp)
{
    struct dane_answer a;
    struct dane_tlsa *tlsa;
    size_t ntlsa;
    const char *why = dane_answer_parse(p, n, s->id, s->name, s->type, &a, &tlsa, &ntlsa);
    if (why != NULL) {
        if (log_enabled(LOG_DEBUG))
            log_msg(LOG_DEBUG, NULL, "dane: ignoring a packet for %s: %s", s->name, why);
        if (tcp)
            dane_sub_fail(s, "malformed answer over TCP");
        return;
    }
    if (a.tc && !tcp) {
        dane_tlsa_free(tlsa, ntlsa);
        if (s->tcp == NULL)
            dane_tcp_start(l, s, r);
        return;
    }
    if ((a.rcode == LDNS_RCODE_SERVFAIL || a.rcode == LDNS_RCODE_REFUSED) && ++s->fails < l->rs.n) {
        dane_tlsa_free(tlsa, ntlsa);
        if (s->tcp != NULL)
            dane_tcp_close(s->tcp);
        dane_send(l, s); /* the next resolver may know better */
        return;
    }
    s->ans = a;
    s->tlsa = tlsa;
    s->ntlsa = ntlsa;
    if (s->tcp != NULL)
        dane_tcp_close(s->tcp);
}

/* ---- TCP (RFC 7766), after a truncated UDP answer ---- */

static void
dane_tcp_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *out)
{
    struct dane_tcp *t = h->data;
    (void)suggested;
    out->base = buf_reserve(&t->in, 4096);
    out->len = 4096;
}

static void
dane_tcp_on_read(uv_stream_t *h, ssize_t nread, const uv_buf_t *b)
{
    struct dane_tcp *t = h->data;
    (void)b;
    struct dane_sub *s = t->sub;
    if (s == NULL || nread == 0)
        return;
    if (nread < 0) {
        dane_sub_fail(s, nread == UV_EOF ? "TCP connection closed" : "TCP read error");
        dane_lookup_step(t->l);
        return;
    }
    buf_commit(&t->in, (size_t)nread);
    if (t->in.len > DANE_TCP_MAX + 2) {
        dane_sub_fail(s, "TCP answer too long");
        dane_lookup_step(t->l);
        return;
    }
    if (t->in.len < 2)
        return;
    const uint8_t *p = (const uint8_t *)buf_ptr(&t->in);
    size_t want = (size_t)p[0] << 8 | p[1];
    if (t->in.len < 2 + want)
        return;
    struct dane_lookup *l = t->l;
    dane_sub_answer(l, s, p + 2, want, t->resolver, true); /* may close t */
    dane_lookup_step(l);
}

static void
dane_tcp_on_write(uv_write_t *req, int status)
{
    struct dane_tcp *t = req->data;
    if (status < 0 && status != UV_ECANCELED && t->sub != NULL) {
        dane_sub_fail(t->sub, "TCP write error");
        dane_lookup_step(t->l);
    }
}

static void
dane_tcp_on_connect(uv_connect_t *req, int status)
{
    struct dane_tcp *t = req->data;
    if (status == UV_ECANCELED || t->sub == NULL)
        return;
    if (status < 0) {
        dane_sub_fail(t->sub, "TCP connect failed");
        dane_lookup_step(t->l);
        return;
    }
    uv_buf_t b = uv_buf_init((char *)t->out, (unsigned)(t->sub->query_len + 2));
    t->wreq.data = t;
    int r = uv_write(&t->wreq, (uv_stream_t *)&t->h, &b, 1, dane_tcp_on_write);
    if (r == 0)
        r = uv_read_start((uv_stream_t *)&t->h, dane_tcp_alloc, dane_tcp_on_read);
    if (r < 0) {
        dane_sub_fail(t->sub, "TCP write error");
        dane_lookup_step(t->l);
    }
}

static void
dane_tcp_start(struct dane_lookup *l, struct dane_sub *s, size_t resolver)
{
    struct dane_tcp *t = xcalloc(1, sizeof(*t));
    t->l = l;
    t->sub = s;
    t->resolver = resolver;
    buf_init(&t->in);
    t->out = xmalloc(s->query_len + 2);
    t->out[0] = (uint8_t)(s->query_len >> 8);
    t->out[1] = (uint8_t)s->query_len;
    memcpy(t->out + 2, s->query, s->query_len);
    int r = uv_tcp_init(l->loop, &t->h);
    if (r < 0) {
        free(t->out);
        free(t);
        dane_sub_fail(s, "TCP: cannot make a socket");
        return;
    }
    t->h.data = t;
    l->open_handles++;
    s->tcp = t;
    t->creq.data = t;
    r = uv_tcp_connect(&t->creq, &t->h, (const struct sockaddr *)&l->rs.addr[resolver],
                       dane_tcp_on_connect);
    if (r < 0)
        dane_sub_fail(s, "TCP connect failed"); /* closes t */
}

/* ---- UDP ---- */

static void
dane_udp_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *out)
{
    struct dane_lookup *l = h->data;
    (void)suggested;
    out->base = (char *)l->rbuf;
    out->len = sizeof(l->rbuf);
}

static void
dane_udp_on_recv(uv_udp_t *h, ssize_t nread, const uv_buf_t *b, const struct sockaddr *from,
                 unsigned flags)
{
    struct dane_lookup *l = h->data;
    (void)flags;
    if (l->closing || nread <= 0 || from == NULL)
        return; /* errors (ICMP unreachable) are ridden out until the deadline */
    size_t r = l->rs.n;
    for (size_t i = 0; i < l->rs.n; i++) {
        if (dane_same_addr(from, &l->rs.addr[i]))
            r = i;
    }
    if (r == l->rs.n || (size_t)nread < LDNS_HEADER_SIZE)
        return; /* not from a resolver of ours */
    const uint8_t *p = (const uint8_t *)b->base;
    uint16_t id = ldns_read_uint16(p);
    for (size_t i = 0; i < l->nsubs; i++) {
        struct dane_sub *s = &l->subs[i];
        if (s->ans.done || s->tcp != NULL || s->id != id)
            continue;
        dane_sub_answer(l, s, p, (size_t)nread, r, false);
        break;
    }
    dane_lookup_step(l);
}

/* The socket for resolvers of the family of addr, opened on first use. */
static uv_udp_t *
dane_udp(struct dane_lookup *l, int family)
{
    int f = family == AF_INET6 ? 1 : 0;
    if (l->udp_open[f])
        return &l->udp[f];
    if (uv_udp_init_ex(l->loop, &l->udp[f], (unsigned)family) < 0)
        return NULL;
    l->udp[f].data = l;
    l->udp_open[f] = true;
    l->open_handles++;
    if (uv_udp_recv_start(&l->udp[f], dane_udp_alloc, dane_udp_on_recv) < 0)
        return NULL; /* closed with the lookup */
    return &l->udp[f];
}

/* Sends s to its next resolver. A failed send is a lost datagram: the
 * retry timer tries again. */
static void
dane_send(struct dane_lookup *l, struct dane_sub *s)
{
    size_t r = s->next;
    s->next = (s->next + 1) % l->rs.n;
    const struct sockaddr *to = (const struct sockaddr *)&l->rs.addr[r];
    uv_udp_t *u = dane_udp(l, to->sa_family);
    if (u == NULL)
        return;
    uv_buf_t b = uv_buf_init((char *)s->query, (unsigned)s->query_len);
    int rc = uv_udp_try_send(u, &b, 1, to);
    if (rc < 0 && log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, NULL, "dane: send for %s: %s", s->name, uv_strerror(rc));
}

static void
dane_on_timer(uv_timer_t *h)
{
    struct dane_lookup *l = h->data;
    dane_lookup_step(l); /* a verdict decided at the start */
    if (l->closing)
        return;
    uint64_t now = uv_now(l->loop);
    bool expired = now >= l->deadline;
    for (size_t i = 0; i < l->nsubs; i++) {
        struct dane_sub *s = &l->subs[i];
        if (s->ans.done)
            continue;
        if (expired)
            dane_sub_fail(s, "timeout");
        else if (s->tcp == NULL)
            dane_send(l, s);
    }
    dane_lookup_step(l);
    if (l->closing)
        return;
    uint64_t left = l->deadline - now;
    uv_timer_start(&l->timer, dane_on_timer, left < l->retry_ms ? left : l->retry_ms, 0);
}

static void
dane_sub_init(struct dane_lookup *l, struct dane_sub *s, int type, const char *name)
{
    s->type = type;
    if (snprintf(s->name, sizeof(s->name), "%s", name) >= (int)sizeof(s->name)) {
        dane_sub_fail(s, "name too long");
        return;
    }
    for (;;) { /* ids distinct among the lookup's queries */
        s->id = (uint16_t)arc4random_uniform(65536);
        bool clash = false;
        for (struct dane_sub *o = l->subs; o < s; o++)
            clash = clash || o->id == s->id;
        if (!clash)
            break;
    }
    s->query = dane_query_wire(s->name, type, s->id, &s->query_len);
    if (s->query == NULL)
        dane_sub_fail(s, "invalid name");
}

struct dane_lookup *
dane_lookup_start(struct uv_loop_s *loop, const struct dane_resolvers *rs, const char *mx_domain,
                  const char *host, unsigned port, int family, dane_lookup_cb *cb, void *arg)
{
    struct dane_lookup *l = xcalloc(1, sizeof(*l));
    l->loop = loop;
    l->cb = cb;
    l->arg = arg;
    l->rs = *rs;
    if (l->rs.timeout_ms == 0)
        l->rs.timeout_ms = DANE_DEFAULT_TIMEOUT_MS;
    if (!str_copy(l->host, sizeof(l->host), host))
        l->host[0] = '\0';
    if (mx_domain != NULL && !str_copy(l->domain, sizeof(l->domain), mx_domain))
        l->domain[0] = '\0';
    uv_timer_init(loop, &l->timer);
    l->timer.data = l;
    l->open_handles = 1;
    if (mx_domain != NULL) {
        l->mx = &l->subs[l->nsubs++];
        dane_sub_init(l, l->mx, LDNS_RR_TYPE_MX, mx_domain);
    }
    l->addr = &l->subs[l->nsubs++];
    dane_sub_init(l, l->addr, family == AF_INET6 ? LDNS_RR_TYPE_AAAA : LDNS_RR_TYPE_A, host);
    l->tlsa = &l->subs[l->nsubs++];
    char tname[300];
    snprintf(tname, sizeof(tname), "_%u._tcp.%s", port, host); /* truncation: refused below */
    dane_sub_init(l, l->tlsa, LDNS_RR_TYPE_TLSA, tname);
    l->retry_ms = l->rs.timeout_ms / 3 > 0 ? l->rs.timeout_ms / 3 : 1;
    l->deadline = uv_now(loop) + l->rs.timeout_ms;
    if (l->rs.n == 0 || host[0] == '\0') {
        for (size_t i = 0; i < l->nsubs; i++)
            dane_sub_fail(&l->subs[i], l->rs.n == 0 ? "no resolver" : "no host name");
        uv_timer_start(&l->timer, dane_on_timer, 0, 0); /* the verdict comes from the loop */
        return l;
    }
    bool refused = false; /* a name ldns refused: the verdict may be decided already */
    for (size_t i = 0; i < l->nsubs; i++) {
        if (l->subs[i].ans.done)
            refused = true;
        else
            dane_send(l, &l->subs[i]);
    }
    uv_timer_start(&l->timer, dane_on_timer, refused ? 0 : l->retry_ms, 0);
    return l;
}

void
dane_lookup_cancel(struct dane_lookup *l)
{
    if (l == NULL || l->closing)
        return;
    dane_lookup_close(l);
}
