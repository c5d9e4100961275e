/*
 * dns — asynchronous lookups on the event loop, done by libunbound
 * (ub_resolve_async; ub_fd watched with uv_poll, ub_process on readiness):
 * retries, TCP fallback, a TTL cache with negative caching and DNSSEC
 * validation come from it. No blocking resolver call ever runs on the loop.
 *
 * The one question the delivery code asks: "where do I connect for this
 * domain?" — MX resolution per RFC 5321 5.1 (sorted by preference, equal
 * preferences shuffled, each exchanger resolved to A and AAAA, CNAMEs
 * followed by the resolver), implicit MX when there is no MX record, null
 * MX per RFC 7505.
 *
 * This header is the seam: scheduler and client tests link
 * tests/unit/fakes/fake_dns.c with canned answers instead of dns.c. The fake
 * provides everything above the "internal" section at the end.
 */
#ifndef PETREL_DNS_H
#define PETREL_DNS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct uv_loop_s;
struct petrel_config;
struct dns;
struct dns_query;

enum dns_status {
    DNS_OK = 0,       /* hosts/addresses found */
    DNS_TEMPFAIL,     /* SERVFAIL, timeout, resolver trouble: defer (4.4.3) */
    DNS_NXDOMAIN,     /* the domain does not exist: permanent (5.1.2) */
    DNS_NULL_MX,      /* "MX 0 ." (RFC 7505): the domain accepts no mail (5.1.10) */
    DNS_NO_ADDRESS,   /* the domain (or every exchanger) has no A/AAAA: permanent (5.1.2)
                       * for an implicit MX, temporary (4.4.3) when MX hosts exist */
};

#define DNS_MAX_MX_HOSTS 16   /* exchangers resolved per domain: the lowest preferences */
#define DNS_MAX_ADDRS 16      /* A records kept per host, and as many AAAA records */

struct dns_addr {
    struct sockaddr_storage ss; /* port 0: the caller sets it */
    socklen_t len;
};

struct dns_host {
    char name[256];             /* exchanger name (or the domain for an implicit MX) */
    unsigned pref;              /* MX preference (0 for implicit MX / plain host) */
    struct dns_addr *addrs;     /* owned by the result; A answers, then AAAA */
    size_t naddrs;
};

struct dns_result {
    struct dns_host *hosts;     /* owned by the result; in the order to try */
    size_t nhosts;
    bool implicit_mx;           /* no MX record: the domain's own addresses */
    bool mx;                    /* hosts are MX exchangers (false: implicit MX, or
                                 * dns_resolve_host) */
    bool secure;                /* every answer was DNSSEC-validated (AD) */
};

/* Fires exactly once per query, from a later loop iteration, unless the
 * query was cancelled (or its struct dns closed). res is NULL unless status
 * is DNS_OK, or DNS_NO_ADDRESS after MX records were found: then res->mx is
 * set and res lists the exchangers, each with naddrs 0 (the temporary case
 * of DNS_NO_ADDRESS; with res NULL it is the domain itself, or the host of
 * dns_resolve_host, that has no address). dns_status_esc() maps this. res
 * and detail (a short static human text, e.g. "SERVFAIL", "timeout", "null
 * MX"; may be NULL) are borrowed for the duration of the call only; q is
 * freed when the callback returns. The callback may start new queries,
 * cancel others, or call dns_close(). */
typedef void dns_result_cb(struct dns_query *q, enum dns_status status,
                           const struct dns_result *res, const char *detail, void *arg);

/* Creates the resolver context: cfg->dns.resolvers become forwarders
 * ("ip@port"), otherwise /etc/resolv.conf; cfg->dns.timeout_ms bounds each
 * query (0: 5 s). cfg is read only during the call. Returns 0 or -1 with
 * *err (owned by the caller). */
int dns_open(struct uv_loop_s *loop, const struct petrel_config *cfg, struct dns **out,
             char **err) __attribute__((warn_unused_result));
/* Cancels outstanding queries (their callbacks do not fire; every struct
 * dns_query of d is freed, so dns_cancel() them before, never after) and
 * frees the context; its libuv handles close on the loop and the memory is
 * released in their close callbacks: run the loop afterwards (uv_run until
 * it returns) before uv_loop_close(). Joins libunbound's thread (brief).
 * NULL is a no-op. May be called from a dns_result_cb. */
void dns_close(struct dns *d);

/* MX → exchangers → A/AAAA, with implicit MX and null MX handling. domain
 * is copied (a trailing dot is ignored); a syntactically invalid name
 * completes with DNS_NXDOMAIN ("invalid domain name"). Exchangers written
 * as IP addresses ("MX 10 192.0.2.1") are not hosts: they are ignored, as
 * Postfix does; if nothing else is left the lookup fails temporarily. At
 * most DNS_MAX_MX_HOSTS exchangers are resolved. dns.timeout bounds the
 * whole query: at the deadline the exchangers resolved so far are used,
 * and with none it fails with DNS_TEMPFAIL "timeout".
 * Never returns NULL; the callback never runs inside this call. */
struct dns_query *dns_resolve_mx(struct dns *d, const char *domain, dns_result_cb *cb, void *arg);
/* A/AAAA of one host (smarthost "[host]" routes): one dns_host, pref 0. An
 * IPv4/IPv6 literal completes with that address without a lookup. Both
 * lookups NXDOMAIN → DNS_NXDOMAIN; no address otherwise → DNS_NO_ADDRESS. */
struct dns_query *dns_resolve_host(struct dns *d, const char *host, dns_result_cb *cb, void *arg);
/* TXT records of name (MTA-STS discovery, RFC 8461 3.1). Fires cb with
 * DNS_OK and the records (each record's strings concatenated, NUL-
 * terminated; ntxt 0 when the name has no TXT record), DNS_NXDOMAIN, or
 * DNS_TEMPFAIL. txt is borrowed for the call. At most DNS_MAX_TXT records
 * are kept, records over 4 KiB are skipped. Never returns NULL; the
 * callback never runs inside this call. */
#define DNS_MAX_TXT 16
typedef void dns_txt_cb(struct dns_query *q, enum dns_status status, const char *const *txt,
                        size_t ntxt, const char *detail, void *arg);
struct dns_query *dns_resolve_txt(struct dns *d, const char *name, dns_txt_cb *cb, void *arg);
/* The callback will not fire; q is invalid afterwards. A no-op for NULL and
 * for the query whose callback is running. */
void dns_cancel(struct dns_query *q);

/* Pure helpers, unit-tested on canned packets. */
/* Sorts hosts by preference and shuffles equal preferences (rnd(n) returns
 * a value in [0, n); NULL uses arc4random_uniform()). Stable before the
 * shuffle, so a deterministic rnd gives a deterministic order. */
void dns_sort_mx(struct dns_host *hosts, size_t n, unsigned (*rnd)(unsigned n));

/* The enhanced status code (RFC 3463) delivery uses for a failed MX
 * lookup: "5.1.2" for DNS_NXDOMAIN and for DNS_NO_ADDRESS of an implicit MX
 * (res NULL), "5.1.10" for DNS_NULL_MX (RFC 7505 section 4.2), "4.4.3" for
 * DNS_TEMPFAIL and for DNS_NO_ADDRESS when MX hosts exist (res->mx); NULL
 * for DNS_OK. Permanent iff it starts with '5'. */
const char *dns_status_esc(enum dns_status status, const struct dns_result *res);
/* "ok", "tempfail", "nxdomain", "null-mx", "no-address". */
const char *dns_status_name(enum dns_status status);

/* Frees what a result owns (hosts and their addresses) and zeroes it. */
void dns_result_reset(struct dns_result *res);

/* ---- Internal to dns.c, exported for tests/unit/test_dns.c only: the
 * interpretation of resolver answers, separate from libunbound and the loop.
 * Engines do not call these and fake_dns.c does not provide them. ---- */

/* One resolver answer for one name and type: a view of a struct ub_result
 * (CNAMEs already followed by the resolver: data holds the final records;
 * a truncated UDP answer was already retried over TCP). */
struct dns_answer {
    int rcode;                      /* DNS RCODE: 0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED */
    bool havedata;                  /* ndata > 0 */
    bool nxdomain;
    bool secure;                    /* DNSSEC-validated */
    bool bogus;                     /* DNSSEC validation failed */
    const char *canonname;          /* borrowed: end of the CNAME chain, or NULL */
    const uint8_t *const *data;     /* borrowed: rdata of each record, wire format,
                                     * names uncompressed */
    const size_t *len;              /* borrowed: length of each data[i] */
    size_t ndata;
    int err;                        /* libunbound error (UB_*), 0: the fields above hold */
};

enum dns_answer_kind {
    DNS_ANSWER_DATA,      /* records of the asked type */
    DNS_ANSWER_NODATA,    /* the name exists, without records of that type */
    DNS_ANSWER_NXDOMAIN,  /* the name does not exist */
    DNS_ANSWER_TEMPFAIL,  /* SERVFAIL, REFUSED, DNSSEC bogus, resolver error: try later */
};

/* Classifies an answer; *detail (static text, may be NULL) says why for
 * DNS_ANSWER_TEMPFAIL ("SERVFAIL", "DNSSEC validation failed", …). */
enum dns_answer_kind dns_answer_classify(const struct dns_answer *a, const char **detail);

/* Interprets the MX answer for a domain (RFC 5321 5.1, RFC 7505):
 *  - records: DNS_OK, *hosts (owned by the caller: free each addrs and the
 *    array, e.g. through dns_result_reset) sorted by dns_sort_mx(rnd),
 *    duplicates merged (lowest preference kept), at most DNS_MAX_MX_HOSTS;
 *    a lone "MX 0 ." is DNS_NULL_MX, a "." among other records is ignored;
 *    exchangers that are IP literals or not host names are ignored, and if
 *    none is left: DNS_TEMPFAIL ("no usable MX host");
 *  - no MX record (NODATA): DNS_OK, *nhosts 0 and *implicit set;
 *  - NXDOMAIN: DNS_NXDOMAIN; anything else: DNS_TEMPFAIL.
 * *detail (static, may be NULL) explains failures. */
enum dns_status dns_mx_parse(const struct dns_answer *a, unsigned (*rnd)(unsigned n),
                             struct dns_host **hosts, size_t *nhosts, bool *implicit,
                             const char **detail);

/* Adds the addresses of an A (family AF_INET) or AAAA (AF_INET6) answer to
 * h: IPv4 addresses stay before IPv6 ones whatever the order the answers
 * come in; records of the wrong length are skipped; at most DNS_MAX_ADDRS
 * per family. */
void dns_host_add_addrs(struct dns_host *h, int family, const struct dns_answer *a);

/* The verdict once every address lookup of res->hosts is in; kinds[i][0]
 * and kinds[i][1] are the A and AAAA answer kinds of host i. Hosts with
 * addresses are kept in order → DNS_OK. With none: DNS_TEMPFAIL if a
 * lookup failed temporarily; DNS_NXDOMAIN if every lookup was NXDOMAIN and
 * the hosts are not MX exchangers; DNS_NO_ADDRESS otherwise (res keeps the
 * names). Hosts without addresses are dropped from res on DNS_OK. res->mx
 * must say whether the hosts are MX exchangers. */
enum dns_status dns_result_finish(struct dns_result *res, const enum dns_answer_kind (*kinds)[2],
                                  const char **detail);

/* The TXT records of an answer (RFC 1035 3.3.14: each record's
 * character-strings concatenated) into txt (owned by the caller: free each
 * and the array), at most DNS_MAX_TXT, skipping records that are malformed,
 * hold a NUL or are longer than 4 KiB. Returns the kind of the answer. */
enum dns_answer_kind dns_txt_parse(const struct dns_answer *a, char ***txt, size_t *ntxt);

/* True if name is a syntactically valid host/domain name (LDH labels plus
 * '_', 1..63 octets each, at most 253 in all, an optional trailing dot)
 * and not an IPv4 address written as a name. */
bool dns_valid_name(const char *name);

#endif
