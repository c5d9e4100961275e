/*
 * test_dns — answer interpretation on canned answers (MX sort and shuffle,
 * null MX, NXDOMAIN vs NODATA → implicit MX, SERVFAIL/REFUSED/bogus →
 * tempfail, CNAME'd answers, unusable exchangers, the final verdict over
 * several exchangers), then the real module on a libuv loop against an
 * in-process DNS server (UDP + TCP on a loopback port, answers built with
 * ldns): full MX resolution, implicit and null MX, NXDOMAIN, a CNAME'd
 * exchanger, a truncated UDP answer retried over TCP, SERVFAIL, timeout,
 * cancel, dns_close with queries in flight and from inside a callback.
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
#include <unbound.h>
#include <uv.h>

#include "config.h"
#include "dns.h"
#include "log.h"
#include "util.h"

/* ------------------------------------------------------------ canned answers */

#define CANNED_MAX 32

struct canned {
    uint8_t *data[CANNED_MAX + 1];
    size_t len[CANNED_MAX];
    struct dns_answer a;
};

/* rdata text of type ("10 mx.example.test." for MX, "192.0.2.1" for A) →
 * its wire format, as libunbound hands it over (names uncompressed). */
static void
canned_add(struct canned *c, ldns_rr_type type, const char *rdata)
{
    char text[512];
    char *tname = ldns_rr_type2str(type);
    snprintf(text, sizeof(text), "x.test. 300 IN %s %s", tname, rdata);
    free(tname);
    ldns_rr *rr = NULL;
    if (ldns_rr_new_frm_str(&rr, text, 0, NULL, NULL) != LDNS_STATUS_OK)
        fail_msg("cannot parse canned record \"%s\"", text);
    ldns_buffer *b = ldns_buffer_new(512);
    assert_int_equal(ldns_rr_rdata2buffer_wire(b, rr), LDNS_STATUS_OK);
    size_t i = c->a.ndata;
    assert_true(i < CANNED_MAX);
    c->len[i] = ldns_buffer_position(b);
    c->data[i] = xmalloc(c->len[i]);
    memcpy(c->data[i], ldns_buffer_begin(b), c->len[i]);
    ldns_buffer_free(b);
    ldns_rr_free(rr);
    c->a.ndata++;
    c->a.havedata = true;
    c->a.data = (const uint8_t *const *)c->data;
    c->a.len = c->len;
}

static void
canned_add_raw(struct canned *c, const void *bytes, size_t len)
{
    size_t i = c->a.ndata;
    assert_true(i < CANNED_MAX);
    c->data[i] = xmalloc(len);
    memcpy(c->data[i], bytes, len);
    c->len[i] = len;
    c->a.ndata++;
    c->a.havedata = true;
    c->a.data = (const uint8_t *const *)c->data;
    c->a.len = c->len;
}

static void
canned_free(struct canned *c)
{
    for (size_t i = 0; i < c->a.ndata; i++)
        free(c->data[i]);
    memset(c, 0, sizeof(*c));
}

/* Keeps the stable order: Fisher-Yates with r = k-1 swaps nothing. */
static unsigned
rnd_keep(unsigned n)
{
    return n - 1;
}

static unsigned rnd_seq[64];
static size_t rnd_pos;

static unsigned
rnd_scripted(unsigned n)
{
    unsigned r = rnd_seq[rnd_pos++ % ARRAY_SIZE(rnd_seq)];
    return r % n;
}

static void
addr_str(const struct dns_addr *a, char *out, size_t size)
{
    if (a->ss.ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)&a->ss)->sin_addr, out, (socklen_t)size);
    else if (a->ss.ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&a->ss)->sin6_addr, out,
                  (socklen_t)size);
    else
        snprintf(out, size, "family%d", a->ss.ss_family);
}

/* "10 a.test 192.0.2.1 ::1,20 b.test" */
static void
hosts_str(const struct dns_host *h, size_t n, char *out, size_t size)
{
    size_t used = 0;
    out[0] = '\0';
    for (size_t i = 0; i < n; i++) {
        used += (size_t)snprintf(out + used, size - used, "%s%u %s", i ? "," : "", h[i].pref,
                                 h[i].name);
        assert_true(used < size);
        for (size_t j = 0; j < h[i].naddrs; j++) {
            char ip[INET6_ADDRSTRLEN];
            addr_str(&h[i].addrs[j], ip, sizeof(ip));
            used += (size_t)snprintf(out + used, size - used, " %s", ip);
            assert_true(used < size);
        }
    }
}

/* ------------------------------------------------------------ dns_mx_parse */

struct mx_case {
    const char *label;
    int rcode;
    bool nxdomain;
    bool bogus;
    int err;
    const char *canonname;
    const char *records[24]; /* MX rdata texts */
    enum dns_status want;
    bool want_implicit;
    const char *want_hosts;  /* hosts_str() of the result */
    const char *want_detail; /* NULL: not checked */
};

/* clang-format off */
static const struct mx_case mx_cases[] = {
    { .label = "sorts by preference",
      .records = { "20 b.ex.test.", "10 a.ex.test.", "30 c.ex.test." },
      .want = DNS_OK, .want_hosts = "10 a.ex.test,20 b.ex.test,30 c.ex.test" },
    { .label = "single exchanger",
      .records = { "5 mx.ex.test." }, .want = DNS_OK, .want_hosts = "5 mx.ex.test" },
    { .label = "null MX (RFC 7505)",
      .records = { "0 ." }, .want = DNS_NULL_MX, .want_hosts = "", .want_detail = "null MX" },
    { .label = "null MX with preference 10 is still the root",
      .records = { "10 ." }, .want = DNS_NULL_MX, .want_hosts = "" },
    { .label = "\".\" beside real exchangers is ignored",
      .records = { "0 .", "10 mx.ex.test." }, .want = DNS_OK, .want_hosts = "10 mx.ex.test" },
    { .label = "NXDOMAIN",
      .rcode = LDNS_RCODE_NXDOMAIN, .nxdomain = true, .want = DNS_NXDOMAIN, .want_hosts = "",
      .want_detail = "NXDOMAIN" },
    { .label = "NODATA is an implicit MX",
      .want = DNS_OK, .want_implicit = true, .want_hosts = "" },
    { .label = "SERVFAIL is temporary",
      .rcode = LDNS_RCODE_SERVFAIL, .want = DNS_TEMPFAIL, .want_hosts = "",
      .want_detail = "SERVFAIL" },
    { .label = "REFUSED is temporary",
      .rcode = LDNS_RCODE_REFUSED, .want = DNS_TEMPFAIL, .want_hosts = "",
      .want_detail = "REFUSED" },
    { .label = "DNSSEC bogus is temporary even with data",
      .bogus = true, .records = { "10 mx.ex.test." }, .want = DNS_TEMPFAIL, .want_hosts = "",
      .want_detail = "DNSSEC validation failed" },
    { .label = "resolver error is temporary",
      .err = UB_SERVFAIL, .want = DNS_TEMPFAIL, .want_hosts = "" },
    { .label = "answer through a CNAME is used as is",
      .canonname = "real.ex.test.", .records = { "10 mx.ex.test." },
      .want = DNS_OK, .want_hosts = "10 mx.ex.test" },
    { .label = "IP address as exchanger is ignored",
      .records = { "10 192.0.2.1.", "20 mx.ex.test." }, .want = DNS_OK,
      .want_hosts = "20 mx.ex.test" },
    { .label = "only IP addresses as exchangers is temporary",
      .records = { "10 192.0.2.1." }, .want = DNS_TEMPFAIL, .want_hosts = "",
      .want_detail = "no usable MX host" },
    { .label = "\".\" beside only unusable exchangers is not a null MX",
      .records = { "0 .", "10 192.0.2.1." }, .want = DNS_TEMPFAIL, .want_hosts = "" },
    { .label = "exchanger name with a bad character is ignored",
      .records = { "10 bad\\032name.ex.test.", "20 ok.ex.test." }, .want = DNS_OK,
      .want_hosts = "20 ok.ex.test" },
    { .label = "duplicate exchanger keeps its best preference",
      .records = { "20 mx.ex.test.", "30 other.ex.test.", "10 MX.ex.test." }, .want = DNS_OK,
      .want_hosts = "10 MX.ex.test,30 other.ex.test" },
    { .label = "trailing dot dropped, case kept",
      .records = { "10 Mx1.Ex.Test." }, .want = DNS_OK, .want_hosts = "10 Mx1.Ex.Test" },
    { .label = "keeps the 16 lowest preferences",
      .records = { "17 h17.t.", "1 h1.t.", "2 h2.t.", "3 h3.t.", "4 h4.t.", "5 h5.t.",
                   "6 h6.t.", "7 h7.t.", "8 h8.t.", "9 h9.t.", "10 h10.t.", "11 h11.t.",
                   "12 h12.t.", "13 h13.t.", "14 h14.t.", "15 h15.t.", "16 h16.t.",
                   "18 h18.t." },
      .want = DNS_OK,
      .want_hosts = "1 h1.t,2 h2.t,3 h3.t,4 h4.t,5 h5.t,6 h6.t,7 h7.t,8 h8.t,9 h9.t,10 h10.t,"
                    "11 h11.t,12 h12.t,13 h13.t,14 h14.t,15 h15.t,16 h16.t" },
};
/* clang-format on */

static void
test_dns_mx_parse_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(mx_cases); i++) {
        const struct mx_case *tc = &mx_cases[i];
        struct canned c;
        memset(&c, 0, sizeof(c));
        for (size_t r = 0; tc->records[r] != NULL; r++)
            canned_add(&c, LDNS_RR_TYPE_MX, tc->records[r]);
        c.a.rcode = tc->rcode;
        c.a.nxdomain = tc->nxdomain;
        c.a.bogus = tc->bogus;
        c.a.err = tc->err;
        c.a.canonname = tc->canonname;
        struct dns_host *hosts = NULL;
        size_t n = 0;
        bool implicit = false;
        const char *detail = NULL;
        enum dns_status st = dns_mx_parse(&c.a, rnd_keep, &hosts, &n, &implicit, &detail);
        char got[1024];
        hosts_str(hosts, n, got, sizeof(got));
        if (st != tc->want) {
            print_error("%s: status: got %s (%s), want %s\n", tc->label, dns_status_name(st),
                        detail ? detail : "-", dns_status_name(tc->want));
            failures++;
        }
        if (implicit != tc->want_implicit) {
            print_error("%s: implicit: got %d, want %d\n", tc->label, implicit, tc->want_implicit);
            failures++;
        }
        if (strcmp(got, tc->want_hosts) != 0) {
            print_error("%s: hosts: got \"%s\", want \"%s\"\n", tc->label, got, tc->want_hosts);
            failures++;
        }
        if (tc->want_detail && (detail == NULL || strcmp(detail, tc->want_detail) != 0)) {
            print_error("%s: detail: got \"%s\", want \"%s\"\n", tc->label,
                        detail ? detail : "(null)", tc->want_detail);
            failures++;
        }
        for (size_t h = 0; h < n; h++)
            free(hosts[h].addrs);
        free(hosts);
        canned_free(&c);
    }
    if (failures)
        fail_msg("%d dns_mx_parse failures", failures);
}

static void
test_dns_mx_parse_skips_malformed_rdata(void **state)
{
    (void)state;
    struct canned c;
    memset(&c, 0, sizeof(c));
    static const uint8_t cut[] = {0, 10, 5, 'a', 'b'};      /* label runs off the end */
    static const uint8_t tail[] = {0, 10, 1, 'a', 0, 0xff}; /* bytes after the name */
    static const uint8_t ptr[] = {0, 10, 0xc0, 0x00};       /* compression pointer */
    static const uint8_t shortp[] = {0};                    /* no preference */
    canned_add_raw(&c, cut, sizeof(cut));
    canned_add_raw(&c, tail, sizeof(tail));
    canned_add_raw(&c, ptr, sizeof(ptr));
    canned_add_raw(&c, shortp, sizeof(shortp));
    canned_add(&c, LDNS_RR_TYPE_MX, "20 good.ex.test.");
    struct dns_host *hosts;
    size_t n;
    bool implicit;
    const char *detail;
    enum dns_status st = dns_mx_parse(&c.a, rnd_keep, &hosts, &n, &implicit, &detail);
    char got[256];
    hosts_str(hosts, n, got, sizeof(got));
    if (st != DNS_OK || strcmp(got, "20 good.ex.test") != 0)
        fail_msg("got %s \"%s\", want ok \"20 good.ex.test\"", dns_status_name(st), got);
    free(hosts);
    canned_free(&c);
    /* nothing but malformed records (one being "MX 0 ." would not make it a null MX) */
    canned_add_raw(&c, cut, sizeof(cut));
    canned_add(&c, LDNS_RR_TYPE_MX, "0 .");
    st = dns_mx_parse(&c.a, rnd_keep, &hosts, &n, &implicit, &detail);
    if (st != DNS_TEMPFAIL || n != 0)
        fail_msg("only malformed + \".\": got %s with %zu hosts, want tempfail",
                 dns_status_name(st), n);
    canned_free(&c);
}

/* ------------------------------------------------------------ dns_sort_mx */

static void
make_hosts(struct dns_host *h, const unsigned *prefs, size_t n)
{
    memset(h, 0, n * sizeof(*h));
    for (size_t i = 0; i < n; i++) {
        h[i].pref = prefs[i];
        snprintf(h[i].name, sizeof(h[i].name), "h%zu", i);
    }
}

static void
test_dns_sort_mx_is_stable_with_a_keeping_rnd(void **state)
{
    (void)state;
    static const unsigned prefs[] = {20, 10, 20, 5, 10, 20};
    struct dns_host h[6];
    make_hosts(h, prefs, 6);
    dns_sort_mx(h, 6, rnd_keep);
    char got[256];
    hosts_str(h, 6, got, sizeof(got));
    const char *want = "5 h3,10 h1,10 h4,20 h0,20 h2,20 h5";
    if (strcmp(got, want) != 0)
        fail_msg("got \"%s\", want \"%s\"", got, want);
}

static void
test_dns_sort_mx_shuffles_equal_preferences(void **state)
{
    (void)state;
    /* rnd = 0 always: Fisher-Yates swaps the last with the first at each step */
    static const unsigned prefs[] = {10, 10, 10, 5};
    struct dns_host h[4];
    make_hosts(h, prefs, 4);
    memset(rnd_seq, 0, sizeof(rnd_seq));
    rnd_pos = 0;
    dns_sort_mx(h, 4, rnd_scripted);
    char got[256];
    hosts_str(h, 4, got, sizeof(got));
    /* sorted: h3(5) h0 h1 h2; k=3 swap(2,0): h2 h1 h0; k=2 swap(1,0): h1 h2 h0 */
    const char *want = "5 h3,10 h1,10 h2,10 h0";
    if (strcmp(got, want) != 0)
        fail_msg("rnd=0: got \"%s\", want \"%s\"", got, want);

    /* every order of three equal preferences is reachable, and the lower
     * preference always stays first */
    bool seen[6] = {false};
    for (unsigned a = 0; a < 3; a++) {
        for (unsigned b = 0; b < 2; b++) {
            make_hosts(h, prefs, 4);
            rnd_seq[0] = a;
            rnd_seq[1] = b;
            rnd_pos = 0;
            dns_sort_mx(h, 4, rnd_scripted);
            if (h[0].pref != 5)
                fail_msg("rnd %u,%u: first host has preference %u, want 5", a, b, h[0].pref);
            static const char *perms[6] = {"h0h1h2", "h0h2h1", "h1h0h2",
                                           "h1h2h0", "h2h0h1", "h2h1h0"};
            char order[800];
            snprintf(order, sizeof(order), "%s%s%s", h[1].name, h[2].name, h[3].name);
            for (int p = 0; p < 6; p++)
                if (strcmp(order, perms[p]) == 0)
                    seen[p] = true;
        }
    }
    for (int p = 0; p < 6; p++)
        if (!seen[p])
            fail_msg("permutation %d of equal preferences never produced", p);
}

static void
test_dns_sort_mx_default_rnd_keeps_preferences_sorted(void **state)
{
    (void)state;
    static const unsigned prefs[] = {30, 10, 20, 10, 30, 20, 10};
    struct dns_host h[7];
    for (int round = 0; round < 50; round++) {
        make_hosts(h, prefs, 7);
        dns_sort_mx(h, 7, NULL);
        for (size_t i = 1; i < 7; i++)
            if (h[i - 1].pref > h[i].pref)
                fail_msg("round %d: preference %u before %u", round, h[i - 1].pref, h[i].pref);
    }
}

/* ------------------------------------------------------------ addresses */

static void
test_dns_host_add_addrs_puts_ipv4_first(void **state)
{
    (void)state;
    struct dns_host h;
    memset(&h, 0, sizeof(h));
    struct canned v6, v4;
    memset(&v6, 0, sizeof(v6));
    memset(&v4, 0, sizeof(v4));
    canned_add(&v6, LDNS_RR_TYPE_AAAA, "2001:db8::1");
    canned_add(&v6, LDNS_RR_TYPE_AAAA, "::1");
    canned_add(&v4, LDNS_RR_TYPE_A, "192.0.2.1");
    canned_add(&v4, LDNS_RR_TYPE_A, "192.0.2.2");
    static const uint8_t odd[] = {1, 2, 3};
    canned_add_raw(&v4, odd, sizeof(odd)); /* wrong length: skipped */
    /* AAAA arrives first, A second: A still comes first */
    dns_host_add_addrs(&h, AF_INET6, &v6.a);
    dns_host_add_addrs(&h, AF_INET, &v4.a);
    char got[512];
    hosts_str(&h, 1, got, sizeof(got));
    const char *want = "0  192.0.2.1 192.0.2.2 2001:db8::1 ::1";
    if (strcmp(got, want) != 0)
        fail_msg("got \"%s\", want \"%s\"", got, want);
    free(h.addrs);
    canned_free(&v6);
    canned_free(&v4);
}

static void
test_dns_host_add_addrs_caps_per_family(void **state)
{
    (void)state;
    struct dns_host h;
    memset(&h, 0, sizeof(h));
    struct canned v4;
    memset(&v4, 0, sizeof(v4));
    for (int i = 0; i < 20; i++) {
        char ip[32];
        snprintf(ip, sizeof(ip), "192.0.2.%d", i + 1);
        canned_add(&v4, LDNS_RR_TYPE_A, ip);
    }
    dns_host_add_addrs(&h, AF_INET, &v4.a);
    if (h.naddrs != DNS_MAX_ADDRS)
        fail_msg("got %zu addresses, want %d", h.naddrs, DNS_MAX_ADDRS);
    /* a CNAME'd host: the answer carries the target's addresses */
    struct dns_host c;
    memset(&c, 0, sizeof(c));
    struct canned cn;
    memset(&cn, 0, sizeof(cn));
    canned_add(&cn, LDNS_RR_TYPE_A, "198.51.100.7");
    cn.a.canonname = "real.ex.test.";
    dns_host_add_addrs(&c, AF_INET, &cn.a);
    if (c.naddrs != 1)
        fail_msg("CNAME'd host: got %zu addresses, want 1", c.naddrs);
    free(h.addrs);
    free(c.addrs);
    canned_free(&v4);
    canned_free(&cn);
}

/* ------------------------------------------------------------ dns_result_finish */

#define K_DATA DNS_ANSWER_DATA
#define K_NODATA DNS_ANSWER_NODATA
#define K_NX DNS_ANSWER_NXDOMAIN
#define K_TEMP DNS_ANSWER_TEMPFAIL

struct finish_case {
    const char *label;
    bool mx;
    bool implicit;
    size_t nhosts;
    unsigned naddrs[4]; /* addresses to give each host */
    enum dns_answer_kind kinds[4][2];
    enum dns_status want;
    const char *want_hosts; /* names kept, "a,b" */
    const char *want_esc;   /* dns_status_esc() */
};

/* clang-format off */
static const struct finish_case finish_cases[] = {
    { .label = "some exchangers unresolvable: the others are kept",
      .mx = true, .nhosts = 3, .naddrs = { 0, 1, 0 },
      .kinds = { { K_TEMP, K_TEMP }, { K_DATA, K_NODATA }, { K_NX, K_NX } },
      .want = DNS_OK, .want_hosts = "h0:-,h1:1", .want_esc = NULL },
    { .label = "every exchanger fails temporarily",
      .mx = true, .nhosts = 2, .naddrs = { 0, 0 },
      .kinds = { { K_TEMP, K_TEMP }, { K_TEMP, K_NODATA } },
      .want = DNS_TEMPFAIL, .want_esc = "4.4.3" },
    { .label = "one temporary failure among missing addresses is temporary",
      .mx = true, .nhosts = 2, .naddrs = { 0, 0 },
      .kinds = { { K_NX, K_NX }, { K_NODATA, K_TEMP } },
      .want = DNS_TEMPFAIL, .want_esc = "4.4.3" },
    { .label = "MX hosts without any address: no address, temporary",
      .mx = true, .nhosts = 2, .naddrs = { 0, 0 },
      .kinds = { { K_NX, K_NX }, { K_NODATA, K_NODATA } },
      .want = DNS_NO_ADDRESS, .want_hosts = "h0:0,h1:0", .want_esc = "4.4.3" },
    { .label = "implicit MX without address: no address, permanent",
      .implicit = true, .nhosts = 1, .naddrs = { 0 },
      .kinds = { { K_NODATA, K_NODATA } },
      .want = DNS_NO_ADDRESS, .want_hosts = "h0:0", .want_esc = "5.1.2" },
    { .label = "plain host NXDOMAIN on both lookups",
      .nhosts = 1, .naddrs = { 0 }, .kinds = { { K_NX, K_NX } },
      .want = DNS_NXDOMAIN, .want_esc = "5.1.2" },
    { .label = "A fails temporarily, AAAA answers: the host is usable",
      .nhosts = 1, .naddrs = { 1 }, .kinds = { { K_TEMP, K_DATA } },
      .want = DNS_OK, .want_hosts = "h0:1" },
};
/* clang-format on */

static void
test_dns_result_finish_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(finish_cases); i++) {
        const struct finish_case *tc = &finish_cases[i];
        struct dns_result res;
        memset(&res, 0, sizeof(res));
        res.mx = tc->mx;
        res.implicit_mx = tc->implicit;
        res.nhosts = tc->nhosts;
        res.hosts = xcalloc(tc->nhosts, sizeof(*res.hosts));
        for (size_t h = 0; h < tc->nhosts; h++) {
            snprintf(res.hosts[h].name, sizeof(res.hosts[h].name), "h%zu", h);
            for (unsigned a = 0; a < tc->naddrs[h]; a++) {
                res.hosts[h].addrs =
                    xreallocarray(res.hosts[h].addrs, a + 1, sizeof(*res.hosts[h].addrs));
                memset(&res.hosts[h].addrs[a], 0, sizeof(res.hosts[h].addrs[a]));
                res.hosts[h].addrs[a].ss.ss_family = AF_INET;
                res.hosts[h].naddrs++;
            }
        }
        const char *detail;
        enum dns_status st = dns_result_finish(&res, tc->kinds, &detail);
        if (st != tc->want) {
            print_error("%s: status: got %s (%s), want %s\n", tc->label, dns_status_name(st),
                        detail ? detail : "-", dns_status_name(tc->want));
            failures++;
        }
        if (tc->want_hosts) {
            char got[256] = "";
            size_t used = 0;
            for (size_t h = 0; h < res.nhosts; h++)
                used += (size_t)snprintf(got + used, sizeof(got) - used, "%s%s:%zu", h ? "," : "",
                                         res.hosts[h].name, res.hosts[h].naddrs);
            /* "h0:-" in the table: h0 must be gone */
            char want[256];
            size_t w = 0;
            want[0] = '\0';
            const char *p = tc->want_hosts;
            while (*p) {
                const char *end = strchr(p, ',');
                size_t len = end ? (size_t)(end - p) : strlen(p);
                if (!(len >= 2 && p[len - 1] == '-'))
                    w += (size_t)snprintf(want + w, sizeof(want) - w, "%s%.*s", w ? "," : "",
                                          (int)len, p);
                p += len + (end ? 1 : 0);
            }
            if (strcmp(got, want) != 0) {
                print_error("%s: hosts: got \"%s\", want \"%s\"\n", tc->label, got, want);
                failures++;
            }
        }
        /* as the callback sees it */
        bool with_res = st == DNS_OK || (st == DNS_NO_ADDRESS && res.mx);
        const char *esc = dns_status_esc(st, with_res ? &res : NULL);
        if ((esc == NULL) != (tc->want_esc == NULL) || (esc && strcmp(esc, tc->want_esc) != 0)) {
            print_error("%s: esc: got %s, want %s\n", tc->label, esc ? esc : "(null)",
                        tc->want_esc ? tc->want_esc : "(null)");
            failures++;
        }
        dns_result_reset(&res);
    }
    if (failures)
        fail_msg("%d dns_result_finish failures", failures);
}

/* ------------------------------------------------------------ names, codes */

static void
test_dns_valid_name_table(void **state)
{
    (void)state;
    /* clang-format off */
    static const struct {
        const char *name;
        bool want;
    } cases[] = {
        { "example.org", true },       { "example.org.", true },   { "mx-1.example.org", true },
        { "_dmarc.example.org", true }, { "a", true },             { "xn--bcher-kva.example", true },
        { "1.example.org", true },     { "", false },              { ".", false },
        { "a..b", false },             { ".a", false },            { "-a.b", false },
        { "a-.b", false },             { "a b.c", false },         { "a\x80.b", false },
        { "192.0.2.1", false },        { "127.1", false },         { "::1", false },
        { "a.b.123", false },          { "a.b:25", false },
    };
    /* clang-format on */
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        bool got = dns_valid_name(cases[i].name);
        if (got != cases[i].want) {
            print_error("dns_valid_name(\"%s\"): got %d, want %d\n", cases[i].name, got,
                        cases[i].want);
            failures++;
        }
    }
    char label64[80];
    memset(label64, 'a', 64);
    label64[64] = '\0';
    if (dns_valid_name(label64))
        fail_msg("a 64-octet label: got valid, want invalid");
    char longname[300];
    for (size_t i = 0; i < 254; i += 2) {
        longname[i] = 'a';
        longname[i + 1] = '.';
    }
    longname[253] = 'a';
    longname[254] = '\0';
    if (dns_valid_name(longname))
        fail_msg("a 254-octet name: got valid, want invalid");
    if (failures)
        fail_msg("%d dns_valid_name failures", failures);
}

static void
test_dns_status_esc_and_names(void **state)
{
    (void)state;
    struct dns_result implicit = {.implicit_mx = true};
    struct dns_result mx = {.mx = true};
    assert_null(dns_status_esc(DNS_OK, NULL));
    assert_string_equal(dns_status_esc(DNS_NXDOMAIN, NULL), "5.1.2");
    assert_string_equal(dns_status_esc(DNS_NULL_MX, NULL), "5.1.10");
    assert_string_equal(dns_status_esc(DNS_TEMPFAIL, NULL), "4.4.3");
    assert_string_equal(dns_status_esc(DNS_NO_ADDRESS, &implicit), "5.1.2");
    assert_string_equal(dns_status_esc(DNS_NO_ADDRESS, &mx), "4.4.3");
    assert_string_equal(dns_status_esc(DNS_NO_ADDRESS, NULL), "5.1.2");
    assert_string_equal(dns_status_name(DNS_NULL_MX), "null-mx");
}

/* ------------------------------------------------------------ the in-process DNS server */

/* Answers from a small zone with ldns. Special names: servfail.test →
 * SERVFAIL, refused.test → REFUSED, anything under drop.test → no answer,
 * tc.test → truncated (TC, no records) over UDP, the full answer over TCP. */
static const char *const zone_text[] = {
    "test. 300 IN SOA ns.test. admin.test. 1 3600 600 86400 300",
    "ex.test. 300 IN MX 10 mx1.ex.test.",
    "ex.test. 300 IN MX 20 mx2.ex.test.",
    "ex.test. 300 IN MX 20 gone.ex.test.",
    "mx1.ex.test. 300 IN A 127.0.0.5",
    "mx1.ex.test. 300 IN AAAA ::1",
    "mx2.ex.test. 300 IN A 127.0.0.6",
    "implicit.test. 300 IN A 127.0.0.7",
    "implicit.test. 300 IN AAAA 2001:db8::7",
    "nullmx.test. 300 IN MX 0 .",
    "cname.test. 300 IN MX 10 alias.cname.test.",
    "alias.cname.test. 300 IN CNAME real.cname.test.",
    "real.cname.test. 300 IN A 127.0.0.8",
    "tc.test. 300 IN MX 10 mx1.ex.test.",
    "noaddr.test. 300 IN MX 10 gone.noaddr.test.",
    "halfdrop.test. 300 IN MX 10 mx1.ex.test.",
    "halfdrop.test. 300 IN MX 20 slow.drop.test.",
    "host.test. 300 IN A 127.0.0.9",
    "txtonly.test. 300 IN TXT \"no mail\"",
};

struct srv_conn {
    uv_tcp_t tcp;
    struct fake_server *srv; /* borrowed */
    uint8_t buf[65538];
    size_t len;
    struct srv_conn *next; /* in srv->conns */
};

struct fake_server {
    uv_udp_t udp;
    uv_tcp_t tcp;
    int port;
    ldns_rr_list *zone;     /* owned */
    struct srv_conn *conns; /* owned, closed by srv_stop */
    int udp_queries;
    int tcp_queries;
    int truncated; /* UDP answers sent with TC */
    int dropped;
    char udp_buf[65536];
};

static bool
srv_name_under(const ldns_rdf *name, const char *suffix)
{
    ldns_rdf *s = ldns_dname_new_frm_str(suffix);
    bool r = ldns_dname_compare(name, s) == 0 || ldns_dname_is_subdomain(name, s);
    ldns_rdf_deep_free(s);
    return r;
}

/* Builds the reply to query (wire) in *out (ldns-allocated); false: no reply. */
static bool
srv_answer(struct fake_server *srv, const uint8_t *wire, size_t len, bool tcp, uint8_t **out,
           size_t *outlen)
{
    ldns_pkt *query = NULL;
    if (ldns_wire2pkt(&query, wire, len) != LDNS_STATUS_OK)
        return false;
    if (ldns_pkt_qdcount(query) != 1) {
        ldns_pkt_free(query);
        return false;
    }
    ldns_rr *question = ldns_rr_list_rr(ldns_pkt_question(query), 0);
    const ldns_rdf *qname = ldns_rr_owner(question);
    ldns_rr_type qtype = ldns_rr_get_type(question);
    if (srv_name_under(qname, "drop.test.")) {
        srv->dropped++;
        ldns_pkt_free(query);
        return false;
    }
    ldns_pkt *resp = ldns_pkt_new();
    ldns_pkt_set_id(resp, ldns_pkt_id(query));
    ldns_pkt_set_qr(resp, true);
    ldns_pkt_set_aa(resp, true);
    ldns_pkt_set_rd(resp, ldns_pkt_rd(query));
    ldns_pkt_set_ra(resp, true);
    ldns_pkt_push_rr(resp, LDNS_SECTION_QUESTION, ldns_rr_clone(question));
    if (ldns_pkt_edns_udp_size(query) > 0)
        ldns_pkt_set_edns_udp_size(resp, 1232);

    if (srv_name_under(qname, "servfail.test.")) {
        ldns_pkt_set_rcode(resp, LDNS_RCODE_SERVFAIL);
    } else if (srv_name_under(qname, "refused.test.")) {
        ldns_pkt_set_rcode(resp, LDNS_RCODE_REFUSED);
    } else if (!tcp && srv_name_under(qname, "tc.test.")) {
        ldns_pkt_set_tc(resp, true);
        srv->truncated++;
    } else {
        /* follow CNAMEs inside the zone, as an authoritative server does */
        ldns_rdf *name = ldns_rdf_clone(qname);
        bool exists = false;
        for (int hops = 0; hops < 8; hops++) {
            bool cname = false;
            for (size_t i = 0; i < ldns_rr_list_rr_count(srv->zone); i++) {
                ldns_rr *rr = ldns_rr_list_rr(srv->zone, i);
                if (ldns_dname_compare(ldns_rr_owner(rr), name) != 0)
                    continue;
                exists = true;
                if (ldns_rr_get_type(rr) == qtype) {
                    ldns_pkt_push_rr(resp, LDNS_SECTION_ANSWER, ldns_rr_clone(rr));
                } else if (ldns_rr_get_type(rr) == LDNS_RR_TYPE_CNAME) {
                    ldns_pkt_push_rr(resp, LDNS_SECTION_ANSWER, ldns_rr_clone(rr));
                    ldns_rdf_deep_free(name);
                    name = ldns_rdf_clone(ldns_rr_rdf(rr, 0));
                    exists = false;
                    cname = true;
                    break;
                }
            }
            if (!cname)
                break;
        }
        ldns_rdf_deep_free(name);
        if (ldns_pkt_ancount(resp) == 0 || !exists) {
            if (!exists && ldns_pkt_ancount(resp) == 0)
                ldns_pkt_set_rcode(resp, LDNS_RCODE_NXDOMAIN);
            if (!exists && ldns_pkt_ancount(resp) > 0)
                ldns_pkt_set_rcode(resp, LDNS_RCODE_NXDOMAIN); /* CNAME to nowhere */
            ldns_pkt_push_rr(resp, LDNS_SECTION_AUTHORITY,
                             ldns_rr_clone(ldns_rr_list_rr(srv->zone, 0)));
        }
    }
    bool ok = ldns_pkt2wire(out, resp, outlen) == LDNS_STATUS_OK;
    ldns_pkt_free(resp);
    ldns_pkt_free(query);
    return ok;
}

static void
srv_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *buf)
{
    struct fake_server *srv = h->data;
    (void)suggested;
    *buf = uv_buf_init(srv->udp_buf, sizeof(srv->udp_buf));
}

static void
srv_on_udp(uv_udp_t *h, ssize_t nread, const uv_buf_t *buf, const struct sockaddr *from,
           unsigned flags)
{
    struct fake_server *srv = h->data;
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
            int w = uv_try_write(s, b, 2);
            if (w != (int)(outlen + 2))
                fail_msg("test server: short TCP write %d of %zu", w, outlen + 2);
            free(out);
        }
        memmove(c->buf, c->buf + 2 + mlen, c->len - 2 - mlen);
        c->len -= 2 + mlen;
    }
}

static void
srv_on_connection(uv_stream_t *server, int status)
{
    struct fake_server *srv = server->data;
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
srv_start(struct fake_server *srv, uv_loop_t *loop)
{
    memset(srv, 0, sizeof(*srv));
    srv->zone = ldns_rr_list_new();
    for (size_t i = 0; i < ARRAY_SIZE(zone_text); i++) {
        ldns_rr *rr = NULL;
        if (ldns_rr_new_frm_str(&rr, zone_text[i], 0, NULL, NULL) != LDNS_STATUS_OK)
            fail_msg("zone line \"%s\" does not parse", zone_text[i]);
        ldns_rr_list_push_rr(srv->zone, rr);
    }
    /* UDP on an ephemeral port, TCP on the same number (retry if taken) */
    for (int attempt = 0; attempt < 20; attempt++) {
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
srv_stop(struct fake_server *srv)
{
    for (struct srv_conn *c = srv->conns; c != NULL; c = c->next)
        if (!uv_is_closing((uv_handle_t *)&c->tcp))
            uv_close((uv_handle_t *)&c->tcp, srv_conn_free);
    uv_close((uv_handle_t *)&srv->udp, NULL);
    uv_close((uv_handle_t *)&srv->tcp, NULL);
}

/* ------------------------------------------------------------ live fixture */

struct got {
    int calls;
    enum dns_status status;
    char detail[128];
    char hosts[1024]; /* hosts_str() of the result */
    bool implicit;
    bool mx;
    bool had_res;
    struct live *fx; /* for callbacks that act on the fixture */
    bool close_in_cb;
};

struct live {
    uv_loop_t loop;
    struct fake_server srv;
    struct petrel_config cfg;
    char *resolvers[1];
    char spec[64];
    struct dns *d;
    int logfd;
};

static int
live_setup_timeout(void **state, uint64_t timeout_ms)
{
    struct live *fx = xcalloc(1, sizeof(*fx));
    assert_int_equal(uv_loop_init(&fx->loop), 0);
    srv_start(&fx->srv, &fx->loop);
    snprintf(fx->spec, sizeof(fx->spec), "127.0.0.1:%d", fx->srv.port);
    fx->resolvers[0] = fx->spec;
    fx->cfg.dns.resolvers.v = fx->resolvers;
    fx->cfg.dns.resolvers.n = 1;
    fx->cfg.dns.timeout_ms = timeout_ms;
    char *err = NULL;
    if (dns_open(&fx->loop, &fx->cfg, &fx->d, &err) != 0)
        fail_msg("dns_open: %s", err);
    *state = fx;
    return 0;
}

static int
live_setup(void **state)
{
    return live_setup_timeout(state, 3000);
}

static int
live_setup_short(void **state)
{
    return live_setup_timeout(state, 1000);
}

static int
live_teardown(void **state)
{
    struct live *fx = *state;
    dns_close(fx->d);
    srv_stop(&fx->srv);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    int r = uv_loop_close(&fx->loop);
    ldns_rr_list_deep_free(fx->srv.zone);
    free(fx);
    if (r != 0)
        fail_msg("uv_loop_close: got %d, want 0 (a handle was left open)", r);
    return 0;
}

static void
on_result(struct dns_query *q, enum dns_status status, const struct dns_result *res,
          const char *detail, void *arg)
{
    struct got *g = arg;
    (void)q;
    g->calls++;
    g->status = status;
    snprintf(g->detail, sizeof(g->detail), "%s", detail ? detail : "");
    g->had_res = res != NULL;
    if (res) {
        hosts_str(res->hosts, res->nhosts, g->hosts, sizeof(g->hosts));
        g->implicit = res->implicit_mx;
        g->mx = res->mx;
    }
    if (g->close_in_cb) {
        dns_close(g->fx->d);
        g->fx->d = NULL;
    }
}

static void
on_watchdog(uv_timer_t *t)
{
    (void)t; /* only wakes uv_run(UV_RUN_ONCE) up */
}

/* Runs the loop until every got has a call or max_ms passed (the server's
 * handles keep the loop alive, so UV_RUN_ONCE steps with a watchdog). */
static void
live_run(struct live *fx, struct got **gots, size_t n, uint64_t max_ms)
{
    uv_update_time(&fx->loop);
    uint64_t end = uv_now(&fx->loop) + max_ms;
    uv_timer_t watchdog;
    uv_timer_init(&fx->loop, &watchdog);
    uv_timer_start(&watchdog, on_watchdog, max_ms, 0);
    for (;;) {
        size_t ready = 0;
        for (size_t i = 0; i < n; i++)
            ready += gots[i]->calls > 0;
        if (ready == n || uv_now(&fx->loop) >= end)
            break;
        uv_run(&fx->loop, UV_RUN_ONCE);
    }
    uv_close((uv_handle_t *)&watchdog, NULL);
    uv_run(&fx->loop, UV_RUN_NOWAIT);
}

static void
expect(const struct got *g, const char *label, enum dns_status want, const char *want_hosts)
{
    if (g->calls != 1)
        fail_msg("%s: callback fired %d times, want 1", label, g->calls);
    if (g->status != want)
        fail_msg("%s: got %s (%s), want %s", label, dns_status_name(g->status), g->detail,
                 dns_status_name(want));
    if (want_hosts && strcmp(g->hosts, want_hosts) != 0)
        fail_msg("%s: hosts: got \"%s\", want \"%s\"", label, g->hosts, want_hosts);
}

static void
test_dns_live_mx_sorted_with_addresses(void **state)
{
    struct live *fx = *state;
    struct got g = {0};
    struct dns_query *q = dns_resolve_mx(fx->d, "ex.test", on_result, &g);
    assert_non_null(q);
    assert_int_equal(g.calls, 0); /* never from inside dns_resolve_mx */
    struct got *gs[] = {&g};
    live_run(fx, gs, 1, 5000);
    /* mx2 and gone share preference 20; gone has no address and is dropped */
    expect(&g, "ex.test", DNS_OK, "10 mx1.ex.test 127.0.0.5 ::1,20 mx2.ex.test 127.0.0.6");
    if (!g.mx || g.implicit)
        fail_msg("ex.test: got mx=%d implicit=%d, want mx=1 implicit=0", g.mx, g.implicit);
}

static void
test_dns_live_implicit_mx(void **state)
{
    struct live *fx = *state;
    struct got g = {0};
    dns_resolve_mx(fx->d, "implicit.test.", on_result, &g);
    struct got *gs[] = {&g};
    live_run(fx, gs, 1, 5000);
    expect(&g, "implicit.test", DNS_OK, "0 implicit.test 127.0.0.7 2001:db8::7");
    if (!g.implicit)
        fail_msg("implicit.test: got implicit=0, want 1");
}

static void
test_dns_live_null_mx_nxdomain_servfail(void **state)
{
    struct live *fx = *state;
    struct got null = {0}, nx = {0}, sf = {0}, ref = {0}, noaddr = {0}, txt = {0};
    dns_resolve_mx(fx->d, "nullmx.test", on_result, &null);
    dns_resolve_mx(fx->d, "nowhere.test", on_result, &nx);
    dns_resolve_mx(fx->d, "servfail.test", on_result, &sf);
    dns_resolve_mx(fx->d, "refused.test", on_result, &ref);
    dns_resolve_mx(fx->d, "noaddr.test", on_result, &noaddr);
    dns_resolve_mx(fx->d, "txtonly.test", on_result, &txt);
    struct got *gs[] = {&null, &nx, &sf, &ref, &noaddr, &txt};
    live_run(fx, gs, ARRAY_SIZE(gs), 8000);
    expect(&null, "nullmx.test", DNS_NULL_MX, NULL);
    assert_string_equal(null.detail, "null MX");
    assert_false(null.had_res);
    expect(&nx, "nowhere.test", DNS_NXDOMAIN, NULL);
    expect(&sf, "servfail.test", DNS_TEMPFAIL, NULL);
    expect(&ref, "refused.test", DNS_TEMPFAIL, NULL);
    /* an MX whose only exchanger does not exist: no address, and res says MX */
    expect(&noaddr, "noaddr.test", DNS_NO_ADDRESS, "10 gone.noaddr.test");
    if (!noaddr.had_res || !noaddr.mx)
        fail_msg("noaddr.test: got res=%d mx=%d, want both", noaddr.had_res, noaddr.mx);
    /* no MX and no address: the implicit MX case, res NULL, permanent */
    expect(&txt, "txtonly.test", DNS_NO_ADDRESS, NULL);
    if (txt.had_res)
        fail_msg("txtonly.test: got a result, want none");
}

static void
test_dns_live_cname_exchanger(void **state)
{
    struct live *fx = *state;
    struct got g = {0};
    dns_resolve_mx(fx->d, "cname.test", on_result, &g);
    struct got *gs[] = {&g};
    live_run(fx, gs, 1, 5000);
    /* the exchanger keeps its MX name; its address is the CNAME target's */
    expect(&g, "cname.test", DNS_OK, "10 alias.cname.test 127.0.0.8");
}

static void
test_dns_live_truncated_udp_answer_retried_over_tcp(void **state)
{
    struct live *fx = *state;
    struct got g = {0};
    dns_resolve_mx(fx->d, "tc.test", on_result, &g);
    struct got *gs[] = {&g};
    live_run(fx, gs, 1, 5000);
    expect(&g, "tc.test", DNS_OK, "10 mx1.ex.test 127.0.0.5 ::1");
    if (fx->srv.truncated < 1 || fx->srv.tcp_queries < 1)
        fail_msg("tc.test: got %d truncated UDP answers and %d TCP queries, want ≥1 each",
                 fx->srv.truncated, fx->srv.tcp_queries);
}

static void
test_dns_live_timeout_is_temporary(void **state)
{
    struct live *fx = *state; /* timeout 1 s */
    struct got g = {0};
    uv_update_time(&fx->loop);
    uint64_t t0 = uv_now(&fx->loop);
    dns_resolve_mx(fx->d, "drop.test", on_result, &g);
    struct got *gs[] = {&g};
    live_run(fx, gs, 1, 5000);
    uint64_t took = uv_now(&fx->loop) - t0;
    expect(&g, "drop.test", DNS_TEMPFAIL, NULL);
    if (took < 950 || took > 3000)
        fail_msg("drop.test: failed after %llu ms, want about 1000", (unsigned long long)took);
    assert_string_equal(g.detail, "timeout");
}

static void
test_dns_live_deadline_keeps_resolved_exchangers(void **state)
{
    struct live *fx = *state; /* timeout 1 s */
    struct got g = {0};
    /* one exchanger answers, the other's address lookups never do: at the
     * deadline the query goes on with what it has */
    uv_update_time(&fx->loop);
    uint64_t t0 = uv_now(&fx->loop);
    dns_resolve_mx(fx->d, "halfdrop.test", on_result, &g);
    struct got *gs[] = {&g};
    live_run(fx, gs, 1, 5000);
    uint64_t took = uv_now(&fx->loop) - t0;
    expect(&g, "halfdrop.test", DNS_OK, "10 mx1.ex.test 127.0.0.5 ::1");
    if (took < 950)
        fail_msg("halfdrop.test: answered after %llu ms, want it to wait for the deadline",
                 (unsigned long long)took);
    /* the MX lookup itself hangs: nothing to go on with */
    struct got h = {0};
    dns_resolve_mx(fx->d, "mx.drop.test", on_result, &h);
    struct got *hs[] = {&h};
    live_run(fx, hs, 1, 5000);
    expect(&h, "mx.drop.test", DNS_TEMPFAIL, NULL);
    assert_string_equal(h.detail, "timeout");
}

static void
test_dns_live_cancel_and_close(void **state)
{
    struct live *fx = *state;
    struct got cancelled = {0}, kept = {0}, done_cancelled = {0}, invalid = {0};
    struct dns_query *q1 = dns_resolve_mx(fx->d, "slow.drop.test", on_result, &cancelled);
    dns_resolve_mx(fx->d, "ex.test", on_result, &kept);
    /* an invalid name completes at once internally, yet not before the loop runs */
    dns_resolve_mx(fx->d, "bad..name", on_result, &invalid);
    struct dns_query *q3 = dns_resolve_host(fx->d, "192.0.2.1", on_result, &done_cancelled);
    assert_int_equal(invalid.calls + done_cancelled.calls, 0);
    dns_cancel(q1);
    dns_cancel(q3); /* finished but not yet delivered */
    dns_cancel(NULL);
    struct got *gs[] = {&kept, &invalid};
    live_run(fx, gs, 2, 5000);
    expect(&kept, "ex.test", DNS_OK, NULL);
    expect(&invalid, "bad..name", DNS_NXDOMAIN, NULL);
    assert_string_equal(invalid.detail, "invalid domain name");
    if (cancelled.calls != 0 || done_cancelled.calls != 0)
        fail_msg("cancelled queries: callbacks fired %d and %d times, want 0", cancelled.calls,
                 done_cancelled.calls);

    /* queries in flight when the context closes never call back */
    struct got inflight = {0};
    dns_resolve_mx(fx->d, "slow.drop.test", on_result, &inflight);
    dns_resolve_mx(fx->d, "implicit.test", on_result, &inflight);
    dns_close(fx->d);
    fx->d = NULL;
    uv_run(&fx->loop, UV_RUN_NOWAIT);
    uv_run(&fx->loop, UV_RUN_NOWAIT);
    if (inflight.calls != 0)
        fail_msg("after dns_close: callbacks fired %d times, want 0", inflight.calls);
}

static void
test_dns_live_close_from_callback(void **state)
{
    struct live *fx = *state;
    /* both finish in the same loop iteration; the first closes the context */
    struct got first = {.fx = fx, .close_in_cb = true}, second = {0};
    dns_resolve_host(fx->d, "192.0.2.1", on_result, &first);
    dns_resolve_host(fx->d, "2001:db8::1", on_result, &second);
    struct got *gs[] = {&first};
    live_run(fx, gs, 1, 5000);
    uv_run(&fx->loop, UV_RUN_NOWAIT);
    expect(&first, "192.0.2.1", DNS_OK, "0 192.0.2.1 192.0.2.1");
    if (second.calls != 0)
        fail_msg("second query: callback fired %d times after dns_close, want 0", second.calls);
}

static void
test_dns_live_resolve_host(void **state)
{
    struct live *fx = *state;
    struct got host = {0}, nx = {0}, v6 = {0}, nodata = {0};
    dns_resolve_host(fx->d, "host.test", on_result, &host);
    dns_resolve_host(fx->d, "nohost.test", on_result, &nx);
    dns_resolve_host(fx->d, "::1", on_result, &v6);
    dns_resolve_host(fx->d, "ex.test", on_result, &nodata);
    struct got *gs[] = {&host, &nx, &v6, &nodata};
    live_run(fx, gs, ARRAY_SIZE(gs), 5000);
    expect(&host, "host.test", DNS_OK, "0 host.test 127.0.0.9");
    if (host.mx || host.implicit)
        fail_msg("host.test: got mx=%d implicit=%d, want 0 0", host.mx, host.implicit);
    expect(&nx, "nohost.test", DNS_NXDOMAIN, NULL);
    expect(&v6, "::1", DNS_OK, "0 ::1 ::1");
    expect(&nodata, "ex.test as a host", DNS_NO_ADDRESS, NULL);
    if (nodata.had_res)
        fail_msg("ex.test as a host: got a result, want none (no MX hosts involved)");
}

static void
test_dns_open_checks_resolver_entries(void **state)
{
    (void)state;
    static const struct {
        const char *entry;
        bool ok;
    } cases[] = {
        {"127.0.0.1:53", true},     {"[::1]:5353", true},         {"localhost:5353", true},
        {"not-an-address", false},  {"192.0.2.1", false},         {"192.0.2.1:0", false},
        {"192.0.2.1:65536", false}, {"mx.example.org:53", false}, {"::1:53", false},
        {"[::1]53", false},         {"[192.0.2.1]:53", false},    {"192.0.2.1:5x", false},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        uv_loop_t loop;
        assert_int_equal(uv_loop_init(&loop), 0);
        struct petrel_config cfg;
        memset(&cfg, 0, sizeof(cfg));
        char *v[] = {(char *)cases[i].entry};
        cfg.dns.resolvers.v = v;
        cfg.dns.resolvers.n = 1;
        struct dns *d = NULL;
        char *err = NULL;
        int r = dns_open(&loop, &cfg, &d, &err);
        if ((r == 0) != cases[i].ok)
            fail_msg("dns.resolvers \"%s\": got %s (%s), want %s", cases[i].entry,
                     r == 0 ? "accepted" : "refused", err ? err : "-",
                     cases[i].ok ? "accepted" : "refused");
        if (r != 0) {
            assert_null(d);
            if (err == NULL || strstr(err, cases[i].entry) == NULL)
                fail_msg("error for \"%s\": got \"%s\", want it to name the entry", cases[i].entry,
                         err ? err : "(null)");
        }
        free(err);
        dns_close(d);
        uv_run(&loop, UV_RUN_DEFAULT);
        if (uv_loop_close(&loop) != 0)
            fail_msg("\"%s\": uv_loop_close: got busy, want 0", cases[i].entry);
    }
}

int
main(void)
{
    log_init(LOG_ERR, LOG_FORMAT_TEXT);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dns_mx_parse_table),
        cmocka_unit_test(test_dns_mx_parse_skips_malformed_rdata),
        cmocka_unit_test(test_dns_sort_mx_is_stable_with_a_keeping_rnd),
        cmocka_unit_test(test_dns_sort_mx_shuffles_equal_preferences),
        cmocka_unit_test(test_dns_sort_mx_default_rnd_keeps_preferences_sorted),
        cmocka_unit_test(test_dns_host_add_addrs_puts_ipv4_first),
        cmocka_unit_test(test_dns_host_add_addrs_caps_per_family),
        cmocka_unit_test(test_dns_result_finish_table),
        cmocka_unit_test(test_dns_valid_name_table),
        cmocka_unit_test(test_dns_status_esc_and_names),
        cmocka_unit_test(test_dns_open_checks_resolver_entries),
        cmocka_unit_test_setup_teardown(test_dns_live_mx_sorted_with_addresses, live_setup,
                                        live_teardown),
        cmocka_unit_test_setup_teardown(test_dns_live_implicit_mx, live_setup, live_teardown),
        cmocka_unit_test_setup_teardown(test_dns_live_null_mx_nxdomain_servfail, live_setup,
                                        live_teardown),
        cmocka_unit_test_setup_teardown(test_dns_live_cname_exchanger, live_setup, live_teardown),
        cmocka_unit_test_setup_teardown(test_dns_live_truncated_udp_answer_retried_over_tcp,
                                        live_setup, live_teardown),
        cmocka_unit_test_setup_teardown(test_dns_live_timeout_is_temporary, live_setup_short,
                                        live_teardown),
        cmocka_unit_test_setup_teardown(test_dns_live_deadline_keeps_resolved_exchangers,
                                        live_setup_short, live_teardown),
        cmocka_unit_test_setup_teardown(test_dns_live_cancel_and_close, live_setup, live_teardown),
        cmocka_unit_test_setup_teardown(test_dns_live_close_from_callback, live_setup,
                                        live_teardown),
        cmocka_unit_test_setup_teardown(test_dns_live_resolve_host, live_setup, live_teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
