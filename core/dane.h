/*
 * dane — the DNS side of outbound DANE (RFC 7672, RFC 7671): for one MX
 * host, are its TLSA records to be trusted, and which are they?
 *
 * The answer rests on the AD bit of a validating resolver (as Postfix's
 * smtp_dns_support_level = dnssec does): libunbound (dns.c) validates by
 * itself and hides the upstream AD bit, so these lookups are made here
 * with ldns packets over UDP (TCP after a truncated answer) to the
 * configured dns.resolvers, or to /etc/resolv.conf's nameservers, on the
 * libuv loop. The resolver must be trusted and the path to it safe (a
 * local validating cache); petrel does not check signatures itself.
 *
 * One lookup asks, in parallel: the MX RRset of the next-hop domain (when
 * the hosts came from MX records, RFC 7672 2.2.1), the A or AAAA RRset of
 * the host (2.2.2), and the TLSA RRset _port._tcp.host (2.2.3; the host
 * name is the TLSA base domain: CNAME-expanded base domains are not
 * tried). The verdict (dane_decide) is one of enum dane_status.
 *
 * This header is the seam: smtp_client tests link tests/unit/fakes/
 * fake_dane.c instead of dane.c; the pure helpers at the end are dane.c's
 * own and tested on canned packets.
 */
#ifndef PETREL_DANE_H
#define PETREL_DANE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct uv_loop_s;
struct dane_lookup;

#define DANE_MAX_RESOLVERS 8 /* resolvers tried, in order */
#define DANE_MAX_TLSA 32     /* TLSA records kept per RRset */

/* One TLSA record (RFC 6698 2.1). */
struct dane_tlsa {
    uint8_t usage;    /* 2 DANE-TA, 3 DANE-EE; 0/1 (PKIX-*) are unusable in SMTP */
    uint8_t selector; /* 0 full certificate, 1 SubjectPublicKeyInfo */
    uint8_t mtype;    /* 0 full, 1 SHA2-256, 2 SHA2-512 */
    uint8_t *data;    /* owned */
    size_t len;
};

enum dane_status {
    DANE_SECURE,   /* validated, usable TLSA records: STARTTLS mandatory, the certificate
                    * must match one of them (RFC 7672 2.2) */
    DANE_UNUSABLE, /* a validated TLSA RRset without a usable record: STARTTLS mandatory,
                    * no authentication (RFC 7672 2.2, 3.1.3) */
    DANE_NONE,     /* validated: no TLSA records (NODATA/NXDOMAIN): opportunistic TLS */
    DANE_INSECURE, /* an answer without the AD bit (MX, address or TLSA): DANE does not
                    * apply, opportunistic TLS */
    DANE_TEMPFAIL, /* a lookup failed (SERVFAIL, timeout, ...): this host must not be
                    * used now (RFC 7672 2.2) */
};

struct dane_result {
    enum dane_status status;
    char detail[192];       /* why, for logs: "no TLSA records for _25._tcp.mx.example.org",
                             * "MX of example.org not DNSSEC-validated", "TLSA lookup ...: SERVFAIL" */
    struct dane_tlsa *tlsa; /* owned: the usable records (DANE_SECURE only) */
    size_t ntlsa;
};

/* The name servers lookups go to. */
struct dane_resolvers {
    struct sockaddr_storage addr[DANE_MAX_RESOLVERS];
    socklen_t len[DANE_MAX_RESOLVERS];
    size_t n;
    uint64_t timeout_ms; /* bound of one lookup (0: 5 s) */
};

/* Fills rs from dns.resolvers entries ("ip:port", "[ipv6]:port",
 * "localhost:port", as dns_open accepts them); with n 0, from the
 * "nameserver" lines of /etc/resolv.conf (port 53), read once per process
 * and kept (the first call reads a file: call it at start-up or accept one
 * small read). At most DANE_MAX_RESOLVERS are kept. Returns NULL, or a
 * static reason (a malformed entry, no name server); rs->n is then 0 and
 * every lookup fails with DANE_TEMPFAIL. */
const char *dane_resolvers_init(struct dane_resolvers *rs, const char *const *list, size_t n,
                                uint64_t timeout_ms);

/* Fires exactly once per lookup, from a loop callback (never inside
 * dane_lookup_start), unless the lookup was cancelled first. res and what
 * it points to are borrowed for the call; the lookup is freed after the
 * callback returns (cancelling it there is a no-op). */
typedef void dane_lookup_cb(struct dane_lookup *l, const struct dane_result *res, void *arg);

/* Starts the lookups for host (an MX host or a smarthost name; copied) at
 * port, with the address family of the target (AF_INET asks A, AF_INET6
 * AAAA) and, when mx_domain is not NULL, the MX RRset of that domain
 * (copied). rs is copied. Never returns NULL. An unusable name or an empty
 * rs completes with DANE_TEMPFAIL from the loop. Every answer stops at
 * rs->timeout_ms; unanswered queries are re-sent to the next resolver
 * every third of it. */
struct dane_lookup *dane_lookup_start(struct uv_loop_s *loop, const struct dane_resolvers *rs,
                                      const char *mx_domain, const char *host, unsigned port,
                                      int family, dane_lookup_cb *cb, void *arg);
/* The callback will not fire; l is invalid afterwards (its handles close
 * on the loop). A no-op for NULL and inside its own callback. */
void dane_lookup_cancel(struct dane_lookup *l);

/* Frees what res owns and zeroes it. */
void dane_result_reset(struct dane_result *res);
/* "secure", "unusable", "none", "insecure", "tempfail". */
const char *dane_status_name(enum dane_status st);

/* ---- Internal to dane.c, exported for tests/unit/test_dane.c only. ---- */

/* One query's outcome. */
struct dane_answer {
    bool done;         /* an answer came, or the query gave up (error set) */
    const char *error; /* static: "timeout", "network error"...; NULL if rcode holds */
    int rcode;         /* LDNS_RCODE_*: 0 NOERROR, 2 SERVFAIL, 3 NXDOMAIN, 5 REFUSED */
    bool ad;           /* the resolver validated the answer (RFC 4035 3.2.3) */
    bool tc;           /* truncated: ask again over TCP */
    size_t ndata;      /* records of the asked type (after the CNAME chain in the answer) */
};

/* The wire form of a query for qname/qtype with id, RD, AD (RFC 6840
 * 5.7) and EDNS0 DO (RFC 3225) set, UDP size 1232. Returns an owned
 * buffer (*len bytes), or NULL for a name ldns refuses. */
uint8_t *dane_query_wire(const char *qname, int qtype, uint16_t id, size_t *len);

/* Interprets a response packet to the query (id, qname, qtype): NULL and
 * *a filled (done set), and for TLSA the records in *tlsa (owned by the
 * caller: dane_tlsa_free) — at most DANE_MAX_TLSA, those of the answer
 * section owned by qname or by the end of the CNAME chain starting there;
 * or a static reason why the packet is not an answer to that query (id,
 * question, QR bit, malformed): it is then to be ignored. */
const char *dane_answer_parse(const uint8_t *wire, size_t len, uint16_t id, const char *qname,
                              int qtype, struct dane_answer *a, struct dane_tlsa **tlsa,
                              size_t *ntlsa);

/* Frees n records and the array. */
void dane_tlsa_free(struct dane_tlsa *tlsa, size_t n);

/* Whether SMTP can use the record (RFC 7672 3.1.3): usage DANE-TA(2) or
 * DANE-EE(3), selector 0 or 1, matching type 0, 1 (32 octets) or 2 (64
 * octets), data not empty. */
bool dane_tlsa_usable(const struct dane_tlsa *t);

/* The verdict from the answers so far (mx NULL: no MX check). Returns
 * false while it still needs an answer that is not done. Order: an
 * insecure (no AD) MX or address answer makes the host INSECURE (whatever
 * else failed: RFC 7672 2.2.1, 2.2.2); a failed MX or address lookup is a
 * TEMPFAIL; then the TLSA answer: failed → TEMPFAIL, no AD → INSECURE,
 * NODATA/NXDOMAIN → NONE, records → SECURE with copies of the usable ones
 * in out->tlsa, or UNUSABLE. names are for out->detail. out is reset
 * first. */
bool dane_decide(const struct dane_answer *mx, const struct dane_answer *addr,
                 const struct dane_answer *tlsa, const struct dane_tlsa *recs, size_t nrecs,
                 const char *domain, const char *host, const char *tlsa_name,
                 struct dane_result *out);

#endif
