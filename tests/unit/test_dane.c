/*
 * test_dane — the DNS side of DANE: query packets (RD, AD, EDNS DO),
 * answer packets built with ldns (AD bit, rcodes, TC, CNAME chains, TLSA
 * fields, packets that answer something else), which TLSA records SMTP can
 * use, the verdict over MX/address/TLSA answers, resolver lists; then the
 * real lookups on a libuv loop against in-process DNS servers (UDP + TCP
 * on loopback ports, answers built with ldns, the AD bit set as a
 * validating resolver would): secure, insecure, no TLSA, SERVFAIL, a
 * SERVFAIL answered by the next resolver, a truncated answer retried over
 * TCP, a timeout with retries, and cancel.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <ldns/ldns.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "dane.h"
#include "log.h"
#include "util.h"

#define T_SHA256 "8d02536c887482bc34ff54e41d2ba659bf85b341a0a20afadb5813dcfbcf286d"
#define T_SHA256_2 "0000000000000000000000000000000000000000000000000000000000000001"

/* ------------------------------------------------------------ packets */

/* A response to qname/qtype with id: flags "qr ad tc" (words present or
 * not), rcode, and answer records in presentation form (NULL-ended). */
static uint8_t *
t_response(uint16_t id, const char *qname, ldns_rr_type qtype, const char *flags, int rcode,
           const char *const *rrs, size_t *len)
{
    ldns_pkt *p = ldns_pkt_new();
    ldns_pkt_set_id(p, id);
    ldns_pkt_set_qr(p, strstr(flags, "qr") != NULL);
    ldns_pkt_set_ad(p, strstr(flags, "ad") != NULL);
    ldns_pkt_set_tc(p, strstr(flags, "tc") != NULL);
    ldns_pkt_set_rd(p, true);
    ldns_pkt_set_ra(p, true);
    ldns_pkt_set_rcode(p, (uint8_t)rcode);
    ldns_rr *q = ldns_rr_new();
    ldns_rr_set_owner(q, ldns_dname_new_frm_str(qname));
    ldns_rr_set_type(q, qtype);
    ldns_rr_set_class(q, LDNS_RR_CLASS_IN);
    ldns_rr_set_question(q, true);
    ldns_pkt_push_rr(p, LDNS_SECTION_QUESTION, q);
    for (size_t i = 0; rrs != NULL && rrs[i] != NULL; i++) {
        ldns_rr *rr = NULL;
        if (ldns_rr_new_frm_str(&rr, rrs[i], 0, NULL, NULL) != LDNS_STATUS_OK)
            fail_msg("record \"%s\" does not parse", rrs[i]);
        ldns_pkt_push_rr(p, LDNS_SECTION_ANSWER, rr);
    }
    uint8_t *wire = NULL;
    assert_int_equal(ldns_pkt2wire(&wire, p, len), LDNS_STATUS_OK);
    ldns_pkt_free(p);
    return wire;
}

static void
test_dane_query_wire_asks_with_rd_ad_and_do(void **state)
{
    (void)state;
    size_t len = 0;
    uint8_t *w = dane_query_wire("_25._tcp.mx.example.org", LDNS_RR_TYPE_TLSA, 0x1234, &len);
    assert_non_null(w);
    ldns_pkt *p = NULL;
    assert_int_equal(ldns_wire2pkt(&p, w, len), LDNS_STATUS_OK);
    assert_int_equal(ldns_pkt_id(p), 0x1234);
    assert_false(ldns_pkt_qr(p));
    assert_true(ldns_pkt_rd(p));
    assert_true(ldns_pkt_ad(p));
    assert_true(ldns_pkt_edns_do(p));
    if (ldns_pkt_edns_udp_size(p) != 1232)
        fail_msg("EDNS size: got %u, want 1232", (unsigned)ldns_pkt_edns_udp_size(p));
    assert_int_equal(ldns_pkt_qdcount(p), 1);
    ldns_rr *q = ldns_rr_list_rr(ldns_pkt_question(p), 0);
    assert_int_equal(ldns_rr_get_type(q), LDNS_RR_TYPE_TLSA);
    char *name = ldns_rdf2str(ldns_rr_owner(q));
    assert_string_equal(name, "_25._tcp.mx.example.org.");
    free(name);
    ldns_pkt_free(p);
    free(w);
    /* a label over 63 octets is refused */
    char big[128];
    memset(big, 'a', 70);
    snprintf(big + 70, sizeof(big) - 70, ".example.org");
    assert_null(dane_query_wire(big, LDNS_RR_TYPE_A, 1, &len));
}

static void
test_dane_answer_parse_reads_flags_rcode_and_tlsa(void **state)
{
    (void)state;
    static const char *const tlsa2[] = {
        "_25._tcp.mx.example.org. 300 IN TLSA 3 1 1 " T_SHA256,
        "_25._tcp.mx.example.org. 300 IN TLSA 2 0 2 " T_SHA256 T_SHA256,
        NULL,
    };
    static const char *const cname[] = {
        "_25._tcp.mx.example.org. 300 IN CNAME _25._tcp.mx.hoster.net.",
        "_25._tcp.mx.hoster.net. 300 IN TLSA 3 1 1 " T_SHA256,
        NULL,
    };
    static const char *const other_owner[] = {
        "_25._tcp.other.example.org. 300 IN TLSA 3 1 1 " T_SHA256,
        NULL,
    };
    static const char *const loop[] = {
        "_25._tcp.mx.example.org. 300 IN CNAME a.example.org.",
        "a.example.org. 300 IN CNAME _25._tcp.mx.example.org.",
        NULL,
    };
    static const struct {
        const char *label;
        const char *flags;
        int rcode;
        const char *const *rrs;
        bool want_ad, want_tc;
        size_t want_ndata;
        size_t want_ntlsa;
    } cases[] = {
        { "two records, AD", "qr ad", LDNS_RCODE_NOERROR, tlsa2, true, false, 2, 2 },
        { "two records, no AD", "qr", LDNS_RCODE_NOERROR, tlsa2, false, false, 2, 2 },
        { "NODATA", "qr ad", LDNS_RCODE_NOERROR, NULL, true, false, 0, 0 },
        { "NXDOMAIN", "qr ad", LDNS_RCODE_NXDOMAIN, NULL, true, false, 0, 0 },
        { "SERVFAIL", "qr", LDNS_RCODE_SERVFAIL, NULL, false, false, 0, 0 },
        { "truncated", "qr ad tc", LDNS_RCODE_NOERROR, NULL, true, true, 0, 0 },
        { "CNAME chain", "qr ad", LDNS_RCODE_NOERROR, cname, true, false, 1, 1 },
        { "another owner", "qr ad", LDNS_RCODE_NOERROR, other_owner, true, false, 0, 0 },
        { "CNAME loop", "qr ad", LDNS_RCODE_NOERROR, loop, true, false, 0, 0 },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        size_t len;
        uint8_t *w = t_response(77, "_25._tcp.mx.example.org.", LDNS_RR_TYPE_TLSA, cases[i].flags,
                                cases[i].rcode, cases[i].rrs, &len);
        struct dane_answer a;
        struct dane_tlsa *t = NULL;
        size_t nt = 0;
        const char *why = dane_answer_parse(w, len, 77, "_25._tcp.mx.example.org",
                                            LDNS_RR_TYPE_TLSA, &a, &t, &nt);
        if (why != NULL)
            fail_msg("%s: got \"%s\", want an answer", cases[i].label, why);
        if (!a.done || a.error != NULL || a.rcode != cases[i].rcode || a.ad != cases[i].want_ad ||
            a.tc != cases[i].want_tc || a.ndata != cases[i].want_ndata || nt != cases[i].want_ntlsa)
            fail_msg("%s: got done=%d rcode=%d ad=%d tc=%d ndata=%zu ntlsa=%zu, want rcode=%d "
                     "ad=%d tc=%d ndata=%zu ntlsa=%zu", cases[i].label, a.done, a.rcode, a.ad,
                     a.tc, a.ndata, nt, cases[i].rcode, cases[i].want_ad, cases[i].want_tc,
                     cases[i].want_ndata, cases[i].want_ntlsa);
        if (i == 0) {
            assert_int_equal(t[0].usage, 3);
            assert_int_equal(t[0].selector, 1);
            assert_int_equal(t[0].mtype, 1);
            assert_int_equal(t[0].len, 32);
            assert_int_equal(t[0].data[0], 0x8d);
            assert_int_equal(t[0].data[31], 0x6d);
            assert_int_equal(t[1].usage, 2);
            assert_int_equal(t[1].selector, 0);
            assert_int_equal(t[1].mtype, 2);
            assert_int_equal(t[1].len, 64);
        }
        dane_tlsa_free(t, nt);
        free(w);
    }
}

static void
test_dane_answer_parse_ignores_what_does_not_answer_the_query(void **state)
{
    (void)state;
    static const struct {
        const char *label;
        uint16_t id;
        const char *qname;
        ldns_rr_type qtype;
        const char *flags;
        const char *want;
    } cases[] = {
        { "another id", 78, "mx.example.org.", LDNS_RR_TYPE_A, "qr ad", "another id" },
        { "another name", 77, "mx.example.net.", LDNS_RR_TYPE_A, "qr ad", "another question" },
        { "another type", 77, "mx.example.org.", LDNS_RR_TYPE_AAAA, "qr ad", "another question" },
        { "a query, not a response", 77, "mx.example.org.", LDNS_RR_TYPE_A, "ad",
          "not a response" },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        size_t len;
        uint8_t *w = t_response(cases[i].id, cases[i].qname, cases[i].qtype, cases[i].flags, 0,
                                NULL, &len);
        struct dane_answer a;
        struct dane_tlsa *t = NULL;
        size_t nt = 0;
        const char *why = dane_answer_parse(w, len, 77, "MX.example.org", LDNS_RR_TYPE_A, &a, &t,
                                            &nt);
        if (why == NULL || strcmp(why, cases[i].want) != 0)
            fail_msg("%s: got \"%s\", want \"%s\"", cases[i].label, why ? why : "(answer)",
                     cases[i].want);
        assert_null(t);
        free(w);
    }
    /* the name matches case-insensitively */
    size_t len;
    uint8_t *w = t_response(77, "mx.example.org.", LDNS_RR_TYPE_A, "qr ad", 0, NULL, &len);
    struct dane_answer a;
    struct dane_tlsa *t = NULL;
    size_t nt = 0;
    assert_null(dane_answer_parse(w, len, 77, "MX.Example.ORG", LDNS_RR_TYPE_A, &a, &t, &nt));
    /* cut packets */
    assert_string_equal(dane_answer_parse(w, 5, 77, "mx.example.org", LDNS_RR_TYPE_A, &a, &t, &nt),
                        "short packet");
    assert_string_equal(dane_answer_parse(w, len - 3, 77, "mx.example.org", LDNS_RR_TYPE_A, &a,
                                          &t, &nt),
                        "malformed packet");
    free(w);
}

static void
test_dane_tlsa_usable_follows_rfc7672(void **state)
{
    (void)state;
    static uint8_t d64[64];
    static const struct {
        struct dane_tlsa t;
        bool want;
    } cases[] = {
        { {3, 1, 1, d64, 32}, true },
        { {2, 0, 2, d64, 64}, true },
        { {3, 0, 0, d64, 10}, true },   /* full data: any length */
        { {0, 1, 1, d64, 32}, false },  /* PKIX-TA */
        { {1, 1, 1, d64, 32}, false },  /* PKIX-EE */
        { {4, 1, 1, d64, 32}, false },
        { {3, 2, 1, d64, 32}, false },  /* selector */
        { {3, 1, 3, d64, 32}, false },  /* matching type */
        { {3, 1, 1, d64, 31}, false },  /* SHA2-256 of the wrong length */
        { {3, 1, 2, d64, 32}, false },  /* SHA2-512 of the wrong length */
        { {3, 1, 0, d64, 0}, false },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        bool got = dane_tlsa_usable(&cases[i].t);
        if (got != cases[i].want)
            fail_msg("case %zu (%u %u %u, %zu octets): got %d, want %d", i, cases[i].t.usage,
                     cases[i].t.selector, cases[i].t.mtype, cases[i].t.len, got, cases[i].want);
    }
}

/* ------------------------------------------------------------ verdict */

#define A_PENDING { .done = false }
#define A_SECURE { .done = true, .ad = true, .ndata = 1 }
#define A_INSECURE { .done = true, .ad = false, .ndata = 1 }
#define A_SERVFAIL { .done = true, .rcode = LDNS_RCODE_SERVFAIL }
#define A_TIMEOUT { .done = true, .error = "timeout" }
#define A_NODATA_SECURE { .done = true, .ad = true, .ndata = 0 }
#define A_NXDOMAIN_SECURE { .done = true, .ad = true, .rcode = LDNS_RCODE_NXDOMAIN }
#define A_NXDOMAIN_INSECURE { .done = true, .rcode = LDNS_RCODE_NXDOMAIN }

static void
test_dane_decide_table(void **state)
{
    (void)state;
    static uint8_t h[32];
    static uint8_t h2[32] = {1};
    static const struct dane_tlsa usable[] = {{3, 1, 1, h, 32}, {1, 1, 1, h, 32},
                                              {2, 1, 1, h2, 32}};
    static const struct dane_tlsa unusable[] = {{1, 1, 1, h, 32}, {0, 0, 1, h, 32}};
    static const struct {
        const char *label;
        bool has_mx;
        struct dane_answer mx, addr, tlsa;
        const struct dane_tlsa *recs;
        size_t nrecs;
        bool want_final;
        enum dane_status want;
        const char *want_detail;
        size_t want_ntlsa;
    } cases[] = {
        { "all secure, usable records", true, A_SECURE, A_SECURE, A_SECURE, usable, 3, true,
          DANE_SECURE, "2 usable TLSA records for _25._tcp.mx.d.test", 2 },
        { "no MX check", false, A_PENDING, A_SECURE, A_SECURE, usable, 1, true, DANE_SECURE,
          "1 usable TLSA records for _25._tcp.mx.d.test", 1 },
        { "insecure MX decides at once", true, A_INSECURE, A_PENDING, A_PENDING, NULL, 0, true,
          DANE_INSECURE, "MX of d.test not DNSSEC-validated", 0 },
        { "insecure address beats a failed MX", true, A_SERVFAIL, A_INSECURE, A_PENDING, NULL, 0,
          true, DANE_INSECURE, "address of mx.d.test not DNSSEC-validated", 0 },
        { "insecure address beats a failed TLSA", false, A_PENDING, A_INSECURE, A_SERVFAIL, NULL,
          0, true, DANE_INSECURE, "address of mx.d.test not DNSSEC-validated", 0 },
        { "MX pending", true, A_PENDING, A_SECURE, A_SECURE, usable, 1, false, DANE_SECURE, "",
          0 },
        { "TLSA pending", true, A_SECURE, A_SECURE, A_PENDING, NULL, 0, false, DANE_SECURE, "",
          0 },
        { "MX SERVFAIL", true, A_SERVFAIL, A_SECURE, A_SECURE, usable, 1, true, DANE_TEMPFAIL,
          "MX lookup for d.test: SERVFAIL", 0 },
        { "address timeout", true, A_SECURE, A_TIMEOUT, A_SECURE, usable, 1, true, DANE_TEMPFAIL,
          "address lookup for mx.d.test: timeout", 0 },
        { "TLSA SERVFAIL", true, A_SECURE, A_SECURE, A_SERVFAIL, NULL, 0, true, DANE_TEMPFAIL,
          "TLSA lookup for _25._tcp.mx.d.test: SERVFAIL", 0 },
        { "TLSA insecure", true, A_SECURE, A_SECURE, A_INSECURE, usable, 1, true, DANE_INSECURE,
          "TLSA of _25._tcp.mx.d.test not DNSSEC-validated", 0 },
        { "TLSA NXDOMAIN without AD", true, A_SECURE, A_SECURE, A_NXDOMAIN_INSECURE, NULL, 0,
          true, DANE_INSECURE, "TLSA of _25._tcp.mx.d.test not DNSSEC-validated", 0 },
        { "TLSA NODATA", true, A_SECURE, A_SECURE, A_NODATA_SECURE, NULL, 0, true, DANE_NONE,
          "no TLSA records for _25._tcp.mx.d.test", 0 },
        { "TLSA NXDOMAIN", true, A_SECURE, A_SECURE, A_NXDOMAIN_SECURE, NULL, 0, true, DANE_NONE,
          "no TLSA records for _25._tcp.mx.d.test", 0 },
        { "only unusable records", true, A_SECURE, A_SECURE, A_SECURE, unusable, 2, true,
          DANE_UNUSABLE, "2 TLSA records for _25._tcp.mx.d.test, none usable", 0 },
        { "MX NXDOMAIN secure is secure", true, A_NXDOMAIN_SECURE, A_SECURE, A_SECURE, usable, 1,
          true, DANE_SECURE, "1 usable TLSA records for _25._tcp.mx.d.test", 1 },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct dane_result r;
        memset(&r, 0, sizeof(r));
        bool final = dane_decide(cases[i].has_mx ? &cases[i].mx : NULL, &cases[i].addr,
                                 &cases[i].tlsa, cases[i].recs, cases[i].nrecs, "d.test",
                                 "mx.d.test", "_25._tcp.mx.d.test", &r);
        if (final != cases[i].want_final)
            fail_msg("%s: final: got %d, want %d", cases[i].label, final, cases[i].want_final);
        if (final && (r.status != cases[i].want || strcmp(r.detail, cases[i].want_detail) != 0 ||
                      r.ntlsa != cases[i].want_ntlsa))
            fail_msg("%s: got %s \"%s\" (%zu records), want %s \"%s\" (%zu)", cases[i].label,
                     dane_status_name(r.status), r.detail, r.ntlsa,
                     dane_status_name(cases[i].want), cases[i].want_detail, cases[i].want_ntlsa);
        if (final && r.status == DANE_SECURE) {
            /* copies of the usable ones, in order */
            assert_int_equal(r.tlsa[0].usage, 3);
            assert_ptr_not_equal(r.tlsa[0].data, h);
            if (r.ntlsa > 1)
                assert_int_equal(r.tlsa[1].data[0], 1);
        }
        dane_result_reset(&r);
    }
}

static void
test_dane_resolvers_init_parses_entries(void **state)
{
    (void)state;
    static const struct {
        const char *entry;
        const char *want_err; /* NULL: ok */
        int family;
        int port;
    } cases[] = {
        { "127.0.0.1:5353", NULL, AF_INET, 5353 },
        { "[::1]:53", NULL, AF_INET6, 53 },
        { "localhost:1053", NULL, AF_INET, 1053 },
        { "127.0.0.1", "malformed dns.resolvers entry", 0, 0 },
        { "127.0.0.1:0", "malformed dns.resolvers entry", 0, 0 },
        { "127.0.0.1:70000", "malformed dns.resolvers entry", 0, 0 },
        { "ns.example:53", "malformed dns.resolvers entry", 0, 0 },
        { "::1:53", "malformed dns.resolvers entry", 0, 0 },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct dane_resolvers rs;
        const char *list[] = {cases[i].entry};
        const char *err = dane_resolvers_init(&rs, list, 1, 0);
        if ((err == NULL) != (cases[i].want_err == NULL) ||
            (err != NULL && strcmp(err, cases[i].want_err) != 0))
            fail_msg("%s: got \"%s\", want \"%s\"", cases[i].entry, err ? err : "ok",
                     cases[i].want_err ? cases[i].want_err : "ok");
        if (err != NULL) {
            assert_int_equal(rs.n, 0);
            continue;
        }
        assert_int_equal(rs.n, 1);
        assert_int_equal(rs.addr[0].ss_family, cases[i].family);
        int port = cases[i].family == AF_INET
                       ? ntohs(((struct sockaddr_in *)&rs.addr[0])->sin_port)
                       : ntohs(((struct sockaddr_in6 *)&rs.addr[0])->sin6_port);
        assert_int_equal(port, cases[i].port);
        assert_int_equal(rs.timeout_ms, 5000); /* 0 → the default */
    }
}

/* ------------------------------------------------------------ in-process DNS servers */

/* A zone; answers carry AD unless the server's `ad` is off or the name is
 * under insecure.test. Special: names under servfail.test (and TLSA under
 * tlsafail.test) → SERVFAIL; under drop.test → no answer; under tc.test →
 * TC without records over UDP, the answer over TCP. `servfail_all` makes
 * every answer a SERVFAIL (a broken first resolver). */
static const char *const zone_text[] = {
    "d.test. 300 IN MX 10 mx.d.test.",
    "mx.d.test. 300 IN A 127.0.0.5",
    "_25._tcp.mx.d.test. 300 IN TLSA 3 1 1 " T_SHA256,
    "_25._tcp.mx.d.test. 300 IN TLSA 1 1 1 " T_SHA256_2,
    "notlsa.d.test. 300 IN A 127.0.0.6",
    "mx.insecure.test. 300 IN A 127.0.0.7",
    "_25._tcp.mx.insecure.test. 300 IN TLSA 3 1 1 " T_SHA256,
    "mx.tlsafail.test. 300 IN A 127.0.0.8",
    "tc.test. 300 IN MX 10 mx.tc.test.",
    "mx.tc.test. 300 IN A 127.0.0.9",
    "_25._tcp.mx.tc.test. 300 IN TLSA 3 1 1 " T_SHA256,
    "_25._tcp.mx.tc.test. 300 IN TLSA 2 1 1 " T_SHA256_2,
    "mx.drop.test. 300 IN A 127.0.0.10",
};

struct srv_conn {
    uv_tcp_t tcp;
    struct srv *srv;
    uint8_t buf[65538];
    size_t len;
    struct srv_conn *next;
};

struct srv {
    uv_udp_t udp;
    uv_tcp_t tcp;
    int port;
    bool ad;
    bool servfail_all;
    ldns_rr_list *zone;     /* owned */
    struct srv_conn *conns; /* owned */
    int udp_queries;
    int tcp_queries;
    char udp_buf[65536];
};

static bool
srv_under(const ldns_rdf *name, const char *suffix)
{
    ldns_rdf *s = ldns_dname_new_frm_str(suffix);
    bool r = ldns_dname_compare(name, s) == 0 || ldns_dname_is_subdomain(name, s);
    ldns_rdf_deep_free(s);
    return r;
}

static bool
srv_answer(struct srv *srv, const uint8_t *wire, size_t len, bool tcp, uint8_t **out,
           size_t *outlen)
{
    ldns_pkt *query = NULL;
    if (ldns_wire2pkt(&query, wire, len) != LDNS_STATUS_OK)
        return false;
    if (ldns_pkt_qdcount(query) != 1 || !ldns_pkt_ad(query) || !ldns_pkt_edns_do(query)) {
        ldns_pkt_free(query); /* petrel always asks with AD and DO */
        return false;
    }
    ldns_rr *question = ldns_rr_list_rr(ldns_pkt_question(query), 0);
    const ldns_rdf *qname = ldns_rr_owner(question);
    ldns_rr_type qtype = ldns_rr_get_type(question);
    if (srv_under(qname, "drop.test.")) {
        ldns_pkt_free(query);
        return false;
    }
    ldns_pkt *resp = ldns_pkt_new();
    ldns_pkt_set_id(resp, ldns_pkt_id(query));
    ldns_pkt_set_qr(resp, true);
    ldns_pkt_set_rd(resp, true);
    ldns_pkt_set_ra(resp, true);
    ldns_pkt_push_rr(resp, LDNS_SECTION_QUESTION, ldns_rr_clone(question));
    ldns_pkt_set_edns_udp_size(resp, 1232);
    if (srv->servfail_all || srv_under(qname, "servfail.test.") ||
        (qtype == LDNS_RR_TYPE_TLSA && srv_under(qname, "tlsafail.test."))) {
        ldns_pkt_set_rcode(resp, LDNS_RCODE_SERVFAIL);
    } else if (!tcp && srv_under(qname, "tc.test.")) {
        ldns_pkt_set_tc(resp, true);
    } else {
        bool exists = false;
        for (size_t i = 0; i < ldns_rr_list_rr_count(srv->zone); i++) {
            ldns_rr *rr = ldns_rr_list_rr(srv->zone, i);
            if (ldns_dname_compare(ldns_rr_owner(rr), qname) != 0)
                continue;
            exists = true;
            if (ldns_rr_get_type(rr) == qtype)
                ldns_pkt_push_rr(resp, LDNS_SECTION_ANSWER, ldns_rr_clone(rr));
        }
        if (!exists)
            ldns_pkt_set_rcode(resp, LDNS_RCODE_NXDOMAIN);
        ldns_pkt_set_ad(resp, srv->ad && !srv_under(qname, "insecure.test."));
    }
    bool ok = ldns_pkt2wire(out, resp, outlen) == LDNS_STATUS_OK;
    ldns_pkt_free(resp);
    ldns_pkt_free(query);
    return ok;
}

static void
srv_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct srv *srv = h->data;
    (void)suggested;
    *buf = uv_buf_init(srv->udp_buf, sizeof(srv->udp_buf));
}

static void
srv_on_udp(uv_udp_t *h, ssize_t nread, const uv_buf_t *buf, const struct sockaddr *from,
           unsigned flags)
{
    struct srv *srv = h->data;
    (void)flags;
    if (nread <= 0 || from == NULL)
        return;
    srv->udp_queries++;
    uint8_t *out = NULL;
    size_t outlen = 0;
    if (srv_answer(srv, (const uint8_t *)buf->base, (size_t)nread, false, &out, &outlen)) {
        uv_buf_t b = uv_buf_init((char *)out, (unsigned)outlen);
        uv_udp_try_send(h, &b, 1, from);
        free(out);
    }
}

static void
srv_conn_free(uv_handle_t *h)
{
    struct srv_conn *c = h->data;
    struct srv_conn **pp = &c->srv->conns;
    while (*pp != c)
        pp = &(*pp)->next;
    *pp = c->next;
    free(c);
}

static void
srv_conn_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct srv_conn *c = h->data;
    (void)suggested;
    *buf = uv_buf_init((char *)c->buf + c->len, (unsigned)(sizeof(c->buf) - c->len));
}

static void
srv_on_tcp_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *buf)
{
    struct srv_conn *c = s->data;
    (void)buf;
    if (nread < 0) {
        if (!uv_is_closing((uv_handle_t *)s))
            uv_close((uv_handle_t *)s, srv_conn_free);
        return;
    }
    c->len += (size_t)nread;
    while (c->len >= 2) {
        size_t mlen = (size_t)c->buf[0] << 8 | c->buf[1];
        if (c->len < 2 + mlen)
            break;
        c->srv->tcp_queries++;
        uint8_t *out = NULL;
        size_t outlen = 0;
        if (srv_answer(c->srv, c->buf + 2, mlen, true, &out, &outlen)) {
            uint8_t hdr[2] = {(uint8_t)(outlen >> 8), (uint8_t)outlen};
            uv_buf_t b[2] = {uv_buf_init((char *)hdr, 2),
                             uv_buf_init((char *)out, (unsigned)outlen)};
            if (uv_try_write(s, b, 2) != (int)(outlen + 2))
                fail_msg("test server: short TCP write");
            free(out);
        }
        memmove(c->buf, c->buf + 2 + mlen, c->len - 2 - mlen);
        c->len -= 2 + mlen;
    }
}

static void
srv_on_connection(uv_stream_t *server, int status)
{
    struct srv *srv = server->data;
    if (status < 0)
        return;
    struct srv_conn *c = xcalloc(1, sizeof(*c));
    c->srv = srv;
    uv_tcp_init(server->loop, &c->tcp);
    c->tcp.data = c;
    c->next = srv->conns;
    srv->conns = c;
    if (uv_accept(server, (uv_stream_t *)&c->tcp) != 0) {
        uv_close((uv_handle_t *)&c->tcp, srv_conn_free);
        return;
    }
    uv_read_start((uv_stream_t *)&c->tcp, srv_conn_alloc, srv_on_tcp_read);
}

static void
srv_start(struct srv *srv, uv_loop_t *loop)
{
    memset(srv, 0, sizeof(*srv));
    srv->ad = true;
    srv->zone = ldns_rr_list_new();
    for (size_t i = 0; i < ARRAY_SIZE(zone_text); i++) {
        ldns_rr *rr = NULL;
        if (ldns_rr_new_frm_str(&rr, zone_text[i], 0, NULL, NULL) != LDNS_STATUS_OK)
            fail_msg("zone line \"%s\" does not parse", zone_text[i]);
        ldns_rr_list_push_rr(srv->zone, rr);
    }
    for (int attempt = 0; attempt < 20 && srv->port == 0; attempt++) {
        struct sockaddr_in sin;
        uv_ip4_addr("127.0.0.1", 0, &sin);
        assert_int_equal(uv_udp_init(loop, &srv->udp), 0);
        assert_int_equal(uv_udp_bind(&srv->udp, (const struct sockaddr *)&sin, 0), 0);
        int len = sizeof(sin);
        assert_int_equal(uv_udp_getsockname(&srv->udp, (struct sockaddr *)&sin, &len), 0);
        assert_int_equal(uv_tcp_init(loop, &srv->tcp), 0);
        if (uv_tcp_bind(&srv->tcp, (const struct sockaddr *)&sin, 0) == 0 &&
            uv_listen((uv_stream_t *)&srv->tcp, 16, srv_on_connection) == 0) {
            srv->port = ntohs(sin.sin_port);
            break;
        }
        uv_close((uv_handle_t *)&srv->udp, NULL);
        uv_close((uv_handle_t *)&srv->tcp, NULL);
        uv_run(loop, UV_RUN_NOWAIT);
    }
    assert_true(srv->port > 0);
    srv->udp.data = srv->tcp.data = srv;
    assert_int_equal(uv_udp_recv_start(&srv->udp, srv_alloc, srv_on_udp), 0);
}

static void
srv_stop(struct srv *srv)
{
    for (struct srv_conn *c = srv->conns; c != NULL; c = c->next)
        if (!uv_is_closing((uv_handle_t *)&c->tcp))
            uv_close((uv_handle_t *)&c->tcp, srv_conn_free);
    uv_close((uv_handle_t *)&srv->udp, NULL);
    uv_close((uv_handle_t *)&srv->tcp, NULL);
}

/* ------------------------------------------------------------ live lookups */

struct live {
    uv_loop_t loop;
    struct srv srv[2];
    struct dane_resolvers rs;
};

struct got {
    int calls;
    enum dane_status status;
    char detail[192];
    size_t ntlsa;
    struct dane_tlsa first;
    uint64_t at_ms;
    uv_loop_t *loop;
};

/* The resolvers: server 0, then server 1 when two. */
static void
live_resolvers(struct live *fx, size_t n, uint64_t timeout_ms)
{
    char spec[2][32];
    const char *list[2];
    for (size_t i = 0; i < n; i++) {
        snprintf(spec[i], sizeof(spec[i]), "127.0.0.1:%d", fx->srv[i].port);
        list[i] = spec[i];
    }
    assert_null(dane_resolvers_init(&fx->rs, list, n, timeout_ms));
}

static int
live_setup(void **state)
{
    struct live *fx = xcalloc(1, sizeof(*fx));
    assert_int_equal(uv_loop_init(&fx->loop), 0);
    srv_start(&fx->srv[0], &fx->loop);
    srv_start(&fx->srv[1], &fx->loop);
    live_resolvers(fx, 1, 2000);
    *state = fx;
    return 0;
}

static int
live_teardown(void **state)
{
    struct live *fx = *state;
    srv_stop(&fx->srv[0]);
    srv_stop(&fx->srv[1]);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    int r = uv_loop_close(&fx->loop);
    ldns_rr_list_deep_free(fx->srv[0].zone);
    ldns_rr_list_deep_free(fx->srv[1].zone);
    free(fx);
    if (r != 0)
        fail_msg("uv_loop_close: got %d, want 0 (a handle was left open)", r);
    return 0;
}

static void
on_dane(struct dane_lookup *l, const struct dane_result *res, void *arg)
{
    struct got *g = arg;
    g->calls++;
    g->status = res->status;
    snprintf(g->detail, sizeof(g->detail), "%s", res->detail);
    g->ntlsa = res->ntlsa;
    if (res->ntlsa > 0) {
        g->first = res->tlsa[0];
        g->first.data = NULL; /* borrowed: gone after the call */
    }
    uv_update_time(g->loop);
    g->at_ms = uv_now(g->loop);
    dane_lookup_cancel(l); /* a no-op inside its own callback */
}

static void
on_watchdog(uv_timer_t *t)
{
    (void)t;
}

/* Runs the loop until g has its call or max_ms passed. */
static void
live_run(struct live *fx, struct got *g, uint64_t max_ms)
{
    uv_update_time(&fx->loop);
    uint64_t end = uv_now(&fx->loop) + max_ms;
    uv_timer_t watchdog;
    uv_timer_init(&fx->loop, &watchdog);
    uv_timer_start(&watchdog, on_watchdog, max_ms, 0);
    while (g->calls == 0 && uv_now(&fx->loop) < end)
        uv_run(&fx->loop, UV_RUN_ONCE);
    uv_close((uv_handle_t *)&watchdog, NULL);
    uv_run(&fx->loop, UV_RUN_NOWAIT);
}

static void
test_dane_live_verdicts(void **state)
{
    struct live *fx = *state;
    static const struct {
        const char *label;
        const char *domain; /* NULL: no MX check */
        const char *host;
        bool ad;
        enum dane_status want;
        const char *want_detail;
        size_t want_ntlsa;
    } cases[] = {
        { "secure", "d.test", "mx.d.test", true, DANE_SECURE,
          "1 usable TLSA records for _25._tcp.mx.d.test", 1 },
        { "no AD anywhere", "d.test", "mx.d.test", false, DANE_INSECURE,
          "MX of d.test not DNSSEC-validated", 0 },
        { "insecure zone of the host", NULL, "mx.insecure.test", true, DANE_INSECURE,
          "address of mx.insecure.test not DNSSEC-validated", 0 },
        { "no TLSA", "d.test", "notlsa.d.test", true, DANE_NONE,
          "no TLSA records for _25._tcp.notlsa.d.test", 0 },
        { "TLSA SERVFAIL", NULL, "mx.tlsafail.test", true, DANE_TEMPFAIL,
          "TLSA lookup for _25._tcp.mx.tlsafail.test: SERVFAIL", 0 },
        { "truncated, then TCP", "tc.test", "mx.tc.test", true, DANE_SECURE,
          "2 usable TLSA records for _25._tcp.mx.tc.test", 2 },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        fx->srv[0].ad = cases[i].ad;
        int tcp_before = fx->srv[0].tcp_queries;
        struct got g = {.loop = &fx->loop};
        struct dane_lookup *l = dane_lookup_start(&fx->loop, &fx->rs, cases[i].domain,
                                                  cases[i].host, 25, AF_INET, on_dane, &g);
        assert_non_null(l);
        if (g.calls != 0)
            fail_msg("%s: callback inside dane_lookup_start", cases[i].label);
        live_run(fx, &g, 3000);
        if (g.calls != 1 || g.status != cases[i].want ||
            strcmp(g.detail, cases[i].want_detail) != 0 || g.ntlsa != cases[i].want_ntlsa)
            fail_msg("%s: got %d calls, %s \"%s\" (%zu records), want %s \"%s\" (%zu)",
                     cases[i].label, g.calls, dane_status_name(g.status), g.detail, g.ntlsa,
                     dane_status_name(cases[i].want), cases[i].want_detail,
                     cases[i].want_ntlsa);
        if (g.ntlsa > 0 && (g.first.usage != 3 || g.first.selector != 1 || g.first.mtype != 1))
            fail_msg("%s: first record %u %u %u, want 3 1 1", cases[i].label, g.first.usage,
                     g.first.selector, g.first.mtype);
        if (strstr(cases[i].label, "TCP") && fx->srv[0].tcp_queries == tcp_before)
            fail_msg("%s: no query over TCP", cases[i].label);
    }
}

static void
test_dane_live_servfail_goes_to_the_next_resolver(void **state)
{
    struct live *fx = *state;
    live_resolvers(fx, 2, 2000);
    fx->srv[0].servfail_all = true;
    struct got g = {.loop = &fx->loop};
    dane_lookup_start(&fx->loop, &fx->rs, "d.test", "mx.d.test", 25, AF_INET, on_dane, &g);
    live_run(fx, &g, 3000);
    assert_int_equal(g.calls, 1);
    if (g.status != DANE_SECURE)
        fail_msg("got %s \"%s\", want secure", dane_status_name(g.status), g.detail);
    assert_int_equal(fx->srv[0].udp_queries, 3);
    assert_int_equal(fx->srv[1].udp_queries, 3);
    /* every resolver says SERVFAIL: that is the answer */
    fx->srv[1].servfail_all = true;
    memset(&g, 0, sizeof(g));
    g.loop = &fx->loop;
    dane_lookup_start(&fx->loop, &fx->rs, NULL, "mx.d.test", 25, AF_INET, on_dane, &g);
    live_run(fx, &g, 3000);
    assert_int_equal(g.calls, 1);
    assert_int_equal(g.status, DANE_TEMPFAIL);
    assert_string_equal(g.detail, "address lookup for mx.d.test: SERVFAIL");
}

static void
test_dane_live_timeout_retries_then_fails(void **state)
{
    struct live *fx = *state;
    live_resolvers(fx, 1, 300);
    struct got g = {.loop = &fx->loop};
    uv_update_time(&fx->loop);
    uint64_t start = uv_now(&fx->loop);
    dane_lookup_start(&fx->loop, &fx->rs, NULL, "mx.drop.test", 25, AF_INET, on_dane, &g);
    live_run(fx, &g, 3000);
    assert_int_equal(g.calls, 1);
    assert_int_equal(g.status, DANE_TEMPFAIL);
    assert_string_equal(g.detail, "address lookup for mx.drop.test: timeout");
    uint64_t took = g.at_ms - start;
    if (took < 290 || took > 1500)
        fail_msg("timeout after %llu ms, want about 300", (unsigned long long)took);
    /* A and TLSA, each sent at 0, 100 and 200 ms */
    if (fx->srv[0].udp_queries < 5)
        fail_msg("queries sent: got %d, want 5 or more (3 tries each)", fx->srv[0].udp_queries);
}

static void
test_dane_live_cancel_and_no_resolver(void **state)
{
    struct live *fx = *state;
    struct got g = {.loop = &fx->loop};
    struct dane_lookup *l =
        dane_lookup_start(&fx->loop, &fx->rs, "d.test", "mx.d.test", 25, AF_INET, on_dane, &g);
    dane_lookup_cancel(l);
    live_run(fx, &g, 300);
    assert_int_equal(g.calls, 0);
    dane_lookup_cancel(NULL);

    /* no resolver: a TEMPFAIL, from the loop */
    struct dane_resolvers none;
    memset(&none, 0, sizeof(none));
    dane_lookup_start(&fx->loop, &none, "d.test", "mx.d.test", 25, AF_INET, on_dane, &g);
    assert_int_equal(g.calls, 0);
    live_run(fx, &g, 1000);
    assert_int_equal(g.calls, 1);
    assert_int_equal(g.status, DANE_TEMPFAIL);
    assert_string_equal(g.detail, "MX lookup for d.test: no resolver");
}

int
main(void)
{
    log_init(LOG_WARNING, LOG_FORMAT_TEXT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dane_query_wire_asks_with_rd_ad_and_do),
        cmocka_unit_test(test_dane_answer_parse_reads_flags_rcode_and_tlsa),
        cmocka_unit_test(test_dane_answer_parse_ignores_what_does_not_answer_the_query),
        cmocka_unit_test(test_dane_tlsa_usable_follows_rfc7672),
        cmocka_unit_test(test_dane_decide_table),
        cmocka_unit_test(test_dane_resolvers_init_parses_entries),
        cmocka_unit_test_setup_teardown(test_dane_live_verdicts, live_setup, live_teardown),
        cmocka_unit_test_setup_teardown(test_dane_live_servfail_goes_to_the_next_resolver,
                                        live_setup, live_teardown),
        cmocka_unit_test_setup_teardown(test_dane_live_timeout_retries_then_fails, live_setup,
                                        live_teardown),
        cmocka_unit_test_setup_teardown(test_dane_live_cancel_and_no_resolver, live_setup,
                                        live_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
