/*
 * test_route — next hops: table-driven route_parse() cases (valid and
 * invalid `via` values), agreement with the config's via check, the order
 * and wildcards of route_for_domain(), and the destination keys. Each table
 * runs every row and reports all failures as "got X, want Y" before failing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "route.h"
#include "util.h"

#define L1 "listeners: [{address: 127.0.0.1:25}]\n"

static const char *
kind_name(enum route_kind k)
{
    switch (k) {
    case ROUTE_MX:
        return "MX";
    case ROUTE_HOST:
        return "HOST";
    case ROUTE_UNIX:
        return "UNIX";
    }
    return "?";
}

/* The wanted route, compared field by field. */
struct want_route {
    enum route_kind kind;
    bool lmtp;
    bool smarthost;
    const char *host;
    unsigned port;
    const char *path;
};

static bool
check_route(const char *label, const struct route *got, const struct want_route *w)
{
    bool ok = true;
    if (got->kind != w->kind) {
        print_error("%s: kind: got %s, want %s\n", label, kind_name(got->kind), kind_name(w->kind));
        ok = false;
    }
    if (got->lmtp != w->lmtp) {
        print_error("%s: lmtp: got %d, want %d\n", label, got->lmtp, w->lmtp);
        ok = false;
    }
    if (got->smarthost != w->smarthost) {
        print_error("%s: smarthost: got %d, want %d\n", label, got->smarthost, w->smarthost);
        ok = false;
    }
    const char *wh = w->host != NULL ? w->host : "";
    if (strcmp(got->host, wh) != 0) {
        print_error("%s: host: got \"%s\", want \"%s\"\n", label, got->host, wh);
        ok = false;
    }
    if (got->port != w->port) {
        print_error("%s: port: got %u, want %u\n", label, got->port, w->port);
        ok = false;
    }
    const char *wp = w->path != NULL ? w->path : "";
    if (strcmp(got->path, wp) != 0) {
        print_error("%s: path: got \"%s\", want \"%s\"\n", label, got->path, wp);
        ok = false;
    }
    return ok;
}

/* "lmtp:unix:/" followed by n-1 'p': a socket path of n octets. */
static char *
long_unix_via(size_t n)
{
    char *s = xmalloc(11 + n + 1);
    memcpy(s, "lmtp:unix:/", 11);
    memset(s + 11, 'p', n - 1);
    s[10 + n] = '\0';
    return s;
}

/* ---- route_parse: valid values ------------------------------------------- */

static const struct {
    const char *label;
    const char *via;
    struct want_route want;
} parse_ok_cases[] = {
    {"mx leaves host empty", "mx", {ROUTE_MX, false, false, "", 0, NULL}},
    {"smarthost IPv4 with port",
     "smtp:[192.0.2.1]:2525",
     {ROUTE_HOST, false, true, "192.0.2.1", 2525, NULL}},
    {"bracketed name without port",
     "smtp:[relay.example]",
     {ROUTE_HOST, false, true, "relay.example", 0, NULL}},
    {"bracketed name with port",
     "smtp:[relay.example]:25",
     {ROUTE_HOST, false, true, "relay.example", 25, NULL}},
    {"name without brackets looks up MX",
     "smtp:relay.example:587",
     {ROUTE_MX, false, true, "relay.example", 587, NULL}},
    {"name without brackets or port",
     "smtp:relay.example",
     {ROUTE_MX, false, true, "relay.example", 0, NULL}},
    {"single-label name", "smtp:relay:25", {ROUTE_MX, false, true, "relay", 25, NULL}},
    {"name is lowercased",
     "smtp:[Relay.EXAMPLE]:25",
     {ROUTE_HOST, false, true, "relay.example", 25, NULL}},
    {"IPv6 loopback", "smtp:[::1]:25", {ROUTE_HOST, false, true, "::1", 25, NULL}},
    {"IPv6 normalized", "smtp:[0:0:0::0001]:25", {ROUTE_HOST, false, true, "::1", 25, NULL}},
    {"IPv6 lowercased, no port",
     "smtp:[2001:DB8::A]",
     {ROUTE_HOST, false, true, "2001:db8::a", 0, NULL}},
    {"IPv4 without brackets never uses MX",
     "smtp:192.0.2.1:25",
     {ROUTE_HOST, false, true, "192.0.2.1", 25, NULL}},
    {"leading zeros in port",
     "smtp:[relay.example]:00025",
     {ROUTE_HOST, false, true, "relay.example", 25, NULL}},
    {"highest port",
     "smtp:[relay.example]:65535",
     {ROUTE_HOST, false, true, "relay.example", 65535, NULL}},
    {"digits in labels",
     "smtp:[mx1.123.example]:25",
     {ROUTE_HOST, false, true, "mx1.123.example", 25, NULL}},
    {"hyphen inside a label",
     "smtp:mail-relay.ex-ample:25",
     {ROUTE_MX, false, true, "mail-relay.ex-ample", 25, NULL}},
    {"LMTP IPv4", "lmtp:[127.0.0.1]:24", {ROUTE_HOST, true, true, "127.0.0.1", 24, NULL}},
    {"LMTP IPv6", "lmtp:[::1]:24", {ROUTE_HOST, true, true, "::1", 24, NULL}},
    {"LMTP name without brackets is an address lookup",
     "lmtp:mailstore.example:24",
     {ROUTE_HOST, true, true, "mailstore.example", 24, NULL}},
    {"LMTP without port",
     "lmtp:[mailstore.example]",
     {ROUTE_HOST, true, true, "mailstore.example", 0, NULL}},
    {"LMTP unix socket",
     "lmtp:unix:/run/dovecot/lmtp",
     {ROUTE_UNIX, true, true, "", 0, "/run/dovecot/lmtp"}},
    {"LMTP unix socket keeps case",
     "lmtp:unix:/Run/LMTP",
     {ROUTE_UNIX, true, true, "", 0, "/Run/LMTP"}},
};

static void
test_route_parse_accepts_valid_values(void **state)
{
    (void)state;
    bool ok = true;
    for (size_t i = 0; i < ARRAY_SIZE(parse_ok_cases); i++) {
        struct route r;
        memset(&r, 0xa5, sizeof(r));
        const char *why = route_parse(parse_ok_cases[i].via, &r);
        if (why != NULL) {
            print_error("%s: route_parse(\"%s\"): got \"%s\", want NULL\n", parse_ok_cases[i].label,
                        parse_ok_cases[i].via, why);
            ok = false;
            continue;
        }
        ok = check_route(parse_ok_cases[i].label, &r, &parse_ok_cases[i].want) && ok;
    }
    assert_true(ok);
}

static void
test_route_parse_unix_path_up_to_107_octets(void **state)
{
    (void)state;
    char *via = long_unix_via(107);
    struct route r;
    const char *why = route_parse(via, &r);
    if (why != NULL)
        fail_msg("107-octet path: got \"%s\", want NULL", why);
    assert_int_equal(r.kind, ROUTE_UNIX);
    assert_int_equal(strlen(r.path), 107);
    assert_string_equal(r.path, via + 10);
    free(via);

    via = long_unix_via(108);
    why = route_parse(via, &r);
    if (why == NULL || strcmp(why, "the unix socket path is longer than 107 octets") != 0)
        fail_msg("108-octet path: got \"%s\", want the length reason", why ? why : "NULL");
    free(via);
}

static void
test_route_parse_host_up_to_253_octets(void **state)
{
    (void)state;
    /* Four labels of 63 + dots = 255 > 253; 62+63+63+62 + 3 dots = 253. */
    char host[300];
    char via[320];
    int n = snprintf(host, sizeof(host), "%.62s.%.63s.%.63s.%.62s",
                     "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                     "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
                     "ccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc",
                     "ddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddddd");
    assert_int_equal(n, 253);
    snprintf(via, sizeof(via), "smtp:[%s]:25", host);
    struct route r;
    const char *why = route_parse(via, &r);
    if (why != NULL)
        fail_msg("253-octet host: got \"%s\", want NULL", why);
    assert_string_equal(r.host, host);

    snprintf(via, sizeof(via), "smtp:[%s.e]:25", host);
    assert_non_null(route_parse(via, &r));
}

/* ---- route_parse: invalid values ------------------------------------------ */

static const char usage[] =
    "expected mx, smtp:[host]:port, smtp:host:port, lmtp:[host]:port or lmtp:unix:/path";
static const char bad_port[] = "the port must be a number from 1 to 65535";
static const char bad_host[] = "the host is neither a valid host name nor an IP address";
static const char need_brackets[] = "an IPv6 address needs brackets: [address]:port";

static const struct {
    const char *label;
    const char *via;
    const char *want; /* the reason */
} parse_bad_cases[] = {
    {"empty", "", usage},
    {"upper-case MX", "MX", usage},
    {"mx with a host", "mx:example.org", usage},
    {"unknown transport", "esmtp:[relay.example]:25", usage},
    {"upper-case transport", "SMTP:[relay.example]:25", usage},
    {"url", "http://relay.example", usage},
    {"no host", "smtp:", "empty host"},
    {"empty brackets", "smtp:[]:25", "empty host"},
    {"empty host before port", "smtp::25", "empty host"},
    {"missing ]", "smtp:[relay.example:25", "missing ']' after the host"},
    {"junk after ]", "smtp:[relay.example]25", "expected ':port' after ']'"},
    {"space after ]", "smtp:[relay.example] :25", "expected ':port' after ']'"},
    {"empty port", "smtp:[relay.example]:", bad_port},
    {"port 0", "smtp:relay.example:0", bad_port},
    {"port 65536", "smtp:relay.example:65536", bad_port},
    {"six-digit port", "smtp:relay.example:000025", bad_port},
    {"port with letters", "smtp:relay.example:2x", bad_port},
    {"negative port", "smtp:relay.example:-25", bad_port},
    {"port with sign", "smtp:[relay.example]:+25", bad_port},
    {"IPv6 without brackets", "smtp:::1:25", need_brackets},
    {"IPv6 without brackets or port", "smtp:2001:db8::1", need_brackets},
    {"IPv6 zone id", "smtp:[fe80::1%eth0]:25", bad_host},
    {"IPv4 out of range", "smtp:[192.0.2.256]:25", bad_host},
    {"numeric top label", "smtp:1.2.3:25", bad_host},
    {"leading hyphen", "smtp:-relay.example:25", bad_host},
    {"trailing hyphen", "smtp:relay-.example:25", bad_host},
    {"underscore", "smtp:bad_host.example:25", bad_host},
    {"empty label", "smtp:relay..example:25", bad_host},
    {"trailing dot", "smtp:relay.example.:25", bad_host},
    {"space in host", "smtp:[relay example]:25", bad_host},
    {"64-octet label", "smtp:[aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.x]",
     bad_host},
    {"unix socket for smtp", "smtp:unix:/run/lmtp", bad_port},
    {"relative unix socket", "lmtp:unix:run/lmtp", "the unix socket path must be absolute"},
    {"empty unix socket", "lmtp:unix:", "the unix socket path must be absolute"},
    {"unix socket root", "lmtp:unix:/", "the unix socket path names no socket"},
};

static void
test_route_parse_rejects_bad_values(void **state)
{
    (void)state;
    bool ok = true;
    for (size_t i = 0; i < ARRAY_SIZE(parse_bad_cases); i++) {
        struct route r;
        const char *why = route_parse(parse_bad_cases[i].via, &r);
        if (why == NULL || strcmp(why, parse_bad_cases[i].want) != 0) {
            print_error("%s: route_parse(\"%s\"): got \"%s\", want \"%s\"\n",
                        parse_bad_cases[i].label, parse_bad_cases[i].via, why ? why : "NULL",
                        parse_bad_cases[i].want);
            ok = false;
        }
    }
    assert_true(ok);
}

/* ---- agreement with config's via check ------------------------------------ */

/* Every via in this list that the config accepts must parse. (The config
 * also accepts unix socket paths longer than sun_path, which route_parse
 * rejects: config.c should call route_parse instead of its own check.) */
static const char *const agreement_vias[] = {
    "mx",
    "smtp:[192.0.2.1]:2525",
    "smtp:[relay.example]:25",
    "smtp:[relay.example]",
    "smtp:relay.example:587",
    "smtp:relay.example",
    "smtp:192.0.2.1:25",
    "smtp:[::1]:25",
    "smtp:[2001:db8::1]:25",
    "smtp:[relay.example]:00025",
    "smtp:Relay.Example:25",
    "lmtp:[127.0.0.1]:24",
    "lmtp:[::1]:24",
    "lmtp:[mailstore.example]:24",
    "lmtp:mailstore.example:24",
    "lmtp:unix:/run/dovecot/lmtp",
    "lmtp:unix:/x",
    "smtp:::1:25",
    "smtp:[fe80::1%eth0]:25",
    "smtp:relay..example:25",
    "smtp:[relay.example]:0",
    "lmtp:unix:/",
    "lmtp:unix:relative",
    "smtp:unix:/run/lmtp",
};

static void
test_route_parse_accepts_every_via_config_accepts(void **state)
{
    (void)state;
    bool ok = true;
    size_t accepted = 0;
    for (size_t i = 0; i < ARRAY_SIZE(agreement_vias); i++) {
        const char *via = agreement_vias[i];
        char *yaml = xasprintf(L1 "routes:\n  - domain: x.example\n    via: '%s'\n", via);
        struct petrel_config *c = NULL;
        char *errors = NULL;
        int rc = config_load_string("t.yaml", yaml, strlen(yaml), &c, &errors);
        free(yaml);
        free(errors);
        if (rc != 0)
            continue;
        accepted++;
        struct route r;
        const char *why = route_parse(c->routes[0].via, &r);
        if (why != NULL) {
            print_error("config accepts \"%s\": route_parse: got \"%s\", want NULL\n", via, why);
            ok = false;
        }
        config_unref(c);
    }
    assert_true(ok);
    assert_true(accepted >= 10); /* the loop did test something */
}

/* ---- route_for_domain ------------------------------------------------------ */

/* Built by hand rather than loaded, so that the forms the config's own via
 * check does not take yet ("smtp:[host]", "lmtp:[host]") are covered too. */
static struct route_config routes[] = {
    {"internal.example", "lmtp:unix:/run/dovecot/lmtp", DELIVERY_TLS_DEFAULT, 1},
    {"*.partner.example", "smtp:[10.1.1.1]:2525", DELIVERY_TLS_DEFAULT, 2},
    {"a.partner.example", "smtp:[10.9.9.9]:25", DELIVERY_TLS_DEFAULT, 3},
    {"partner.example", "smtp:relay.partner.example:587", DELIVERY_TLS_DEFAULT, 4},
    {"mxonly.example", "mx", DELIVERY_TLS_DEFAULT, 5},
    {"store.example", "lmtp:[192.0.2.24]", DELIVERY_TLS_DEFAULT, 6},
};

static struct route_config catchall_routes[] = {
    {"internal.example", "lmtp:unix:/run/dovecot/lmtp", DELIVERY_TLS_DEFAULT, 1},
    {"*", "smtp:[relay.example]", DELIVERY_TLS_DEFAULT, 2},
    {"other.example", "smtp:[10.9.9.9]:25", DELIVERY_TLS_DEFAULT, 3},
};

static const struct {
    const char *label;
    const char *domain;
    struct want_route want;
} for_domain_cases[] = {
    {"exact match", "internal.example", {ROUTE_UNIX, true, true, "", 0, "/run/dovecot/lmtp"}},
    {"exact match ignores case",
     "INTERNAL.Example",
     {ROUTE_UNIX, true, true, "", 0, "/run/dovecot/lmtp"}},
    {"exact domain does not cover subdomains",
     "sub.internal.example",
     {ROUTE_MX, false, false, "sub.internal.example", 0, NULL}},
    {"wildcard before an exact route wins (first match)",
     "a.partner.example",
     {ROUTE_HOST, false, true, "10.1.1.1", 2525, NULL}},
    {"wildcard covers deeper subdomains",
     "deep.a.Partner.EXAMPLE",
     {ROUTE_HOST, false, true, "10.1.1.1", 2525, NULL}},
    {"wildcard does not cover the parent",
     "partner.example",
     {ROUTE_MX, false, true, "relay.partner.example", 587, NULL}},
    {"suffix without a dot does not match",
     "xpartner.example",
     {ROUTE_MX, false, false, "xpartner.example", 0, NULL}},
    {"via mx is the domain's own MX",
     "MXonly.example",
     {ROUTE_MX, false, false, "mxonly.example", 0, NULL}},
    {"LMTP over TCP", "store.example", {ROUTE_HOST, true, true, "192.0.2.24", 0, NULL}},
    {"no match: the domain's MX, lowercased",
     "Other.Example",
     {ROUTE_MX, false, false, "other.example", 0, NULL}},
    {"IPv4 address literal", "[192.0.2.7]", {ROUTE_HOST, false, false, "192.0.2.7", 0, NULL}},
    {"IPv6 address literal",
     "[IPv6:2001:DB8::7]",
     {ROUTE_HOST, false, false, "2001:db8::7", 0, NULL}},
    {"IPv6 tag on an IPv4 literal is left to DNS",
     "[IPv6:192.0.2.7]",
     {ROUTE_MX, false, false, "[ipv6:192.0.2.7]", 0, NULL}},
    {"IPv6 literal without tag is left to DNS",
     "[::1]",
     {ROUTE_MX, false, false, "[::1]", 0, NULL}},
};

static const struct {
    const char *label;
    const char *domain;
    struct want_route want;
} catchall_cases[] = {
    {"route before the catch-all",
     "internal.example",
     {ROUTE_UNIX, true, true, "", 0, "/run/dovecot/lmtp"}},
    {"catch-all", "anything.example", {ROUTE_HOST, false, true, "relay.example", 0, NULL}},
    {"catch-all shadows later routes",
     "other.example",
     {ROUTE_HOST, false, true, "relay.example", 0, NULL}},
    {"catch-all takes address literals",
     "[192.0.2.7]",
     {ROUTE_HOST, false, true, "relay.example", 0, NULL}},
};

static void
test_route_for_domain_first_match_and_wildcards(void **state)
{
    (void)state;
    bool ok = true;
    struct petrel_config c;
    memset(&c, 0, sizeof(c));
    c.routes = routes;
    c.nroutes = ARRAY_SIZE(routes);
    for (size_t i = 0; i < ARRAY_SIZE(for_domain_cases); i++) {
        struct route r;
        memset(&r, 0xa5, sizeof(r));
        route_for_domain(&c, for_domain_cases[i].domain, &r);
        ok = check_route(for_domain_cases[i].label, &r, &for_domain_cases[i].want) && ok;
    }

    c.routes = catchall_routes;
    c.nroutes = ARRAY_SIZE(catchall_routes);
    for (size_t i = 0; i < ARRAY_SIZE(catchall_cases); i++) {
        struct route r;
        route_for_domain(&c, catchall_cases[i].domain, &r);
        ok = check_route(catchall_cases[i].label, &r, &catchall_cases[i].want) && ok;
    }
    assert_true(ok);
}

static void
test_route_for_domain_without_routes_is_mx(void **state)
{
    (void)state;
    static const struct want_route want = {ROUTE_MX, false, false, "example.org", 0, NULL};
    struct route r;
    route_for_domain(NULL, "Example.ORG", &r);
    assert_true(check_route("NULL config", &r, &want));

    struct petrel_config *c = NULL;
    char *errors = NULL;
    if (config_load_string("t.yaml", L1, strlen(L1), &c, &errors) != 0)
        fail_msg("load failed, want success:\n%s", errors);
    route_for_domain(c, "example.org", &r);
    assert_true(check_route("config without routes", &r, &want));
    config_unref(c);
}

/* ---- route_key ----------------------------------------------------------- */

static const struct {
    const char *label;
    const char *via;    /* parsed with route_parse, or NULL: domain's route */
    const char *domain; /* for via == NULL or "mx" */
    unsigned default_port;
    const char *want;
} key_cases[] = {
    {"recipient MX", NULL, "example.org", 25, "mx:example.org"},
    {"recipient MX, other default port", NULL, "example.org", 2525, "mx:example.org"},
    {"recipient MX is lowercased", NULL, "EXAMPLE.org", 25, "mx:example.org"},
    {"via mx", "mx", "example.org", 25, "mx:example.org"},
    {"address literal", NULL, "[192.0.2.9]", 25, "smtp:[192.0.2.9]:25"},
    {"smarthost IPv4", "smtp:[192.0.2.1]:2525", NULL, 25, "smtp:[192.0.2.1]:2525"},
    {"smarthost default port", "smtp:[192.0.2.1]", NULL, 25, "smtp:[192.0.2.1]:25"},
    {"smarthost default port is delivery.port", "smtp:[192.0.2.1]", NULL, 2525,
     "smtp:[192.0.2.1]:2525"},
    {"smarthost name", "smtp:[Relay.Example]", NULL, 25, "smtp:[relay.example]:25"},
    {"smarthost via MX", "smtp:relay.example:587", NULL, 25, "smtp:relay.example:587"},
    {"smarthost via MX, default port", "smtp:relay.example", NULL, 25, "smtp:relay.example:25"},
    {"IPv6", "smtp:[::1]:25", NULL, 25, "smtp:[::1]:25"},
    {"IPv6 normalized", "smtp:[0::0:1]", NULL, 25, "smtp:[::1]:25"},
    {"IPv4 without brackets", "smtp:192.0.2.1:25", NULL, 25, "smtp:[192.0.2.1]:25"},
    {"LMTP default port is 24", "lmtp:[127.0.0.1]", NULL, 25, "lmtp:[127.0.0.1]:24"},
    {"LMTP name without brackets", "lmtp:store.example:2424", NULL, 25,
     "lmtp:[store.example]:2424"},
    {"LMTP unix socket", "lmtp:unix:/run/dovecot/lmtp", NULL, 25, "lmtp:unix:/run/dovecot/lmtp"},
};

static void
test_route_key_names_destinations(void **state)
{
    (void)state;
    bool ok = true;
    for (size_t i = 0; i < ARRAY_SIZE(key_cases); i++) {
        struct route r;
        if (key_cases[i].via != NULL) {
            const char *why = route_parse(key_cases[i].via, &r);
            if (why != NULL) {
                print_error("%s: route_parse: got \"%s\", want NULL\n", key_cases[i].label, why);
                ok = false;
                continue;
            }
        }
        if (key_cases[i].via == NULL || strcmp(key_cases[i].via, "mx") == 0)
            route_for_domain(NULL, key_cases[i].domain, &r);
        char key[ROUTE_KEY_MAX];
        route_key(&r, key_cases[i].default_port, key, sizeof(key));
        if (strcmp(key, key_cases[i].want) != 0) {
            print_error("%s: key: got \"%s\", want \"%s\"\n", key_cases[i].label, key,
                        key_cases[i].want);
            ok = false;
        }
    }
    assert_true(ok);
}

static void
test_route_key_same_destination_same_key(void **state)
{
    (void)state;
    static const char *const pairs[][2] = {
        {"smtp:[relay.example]", "smtp:[RELAY.example]:25"},
        {"smtp:[::1]:25", "smtp:[0:0::1]"},
        {"lmtp:store.example", "lmtp:[store.example]:24"},
        {"smtp:relay.example", "smtp:relay.example:25"},
    };
    bool ok = true;
    for (size_t i = 0; i < ARRAY_SIZE(pairs); i++) {
        struct route a;
        struct route b;
        char ka[ROUTE_KEY_MAX];
        char kb[ROUTE_KEY_MAX];
        assert_null(route_parse(pairs[i][0], &a));
        assert_null(route_parse(pairs[i][1], &b));
        route_key(&a, 25, ka, sizeof(ka));
        route_key(&b, 25, kb, sizeof(kb));
        if (strcmp(ka, kb) != 0) {
            print_error("%s vs %s: got \"%s\" and \"%s\", want one key\n", pairs[i][0], pairs[i][1],
                        ka, kb);
            ok = false;
        }
    }
    assert_true(ok);
}

static void
test_route_key_max_fits_longest_keys(void **state)
{
    (void)state;
    struct route r;
    memset(&r, 0, sizeof(r));
    r.kind = ROUTE_HOST;
    r.lmtp = true;
    r.smarthost = true;
    r.port = 65535;
    r.tls = DELIVERY_TLS_OPPORTUNISTIC; /* the longest suffix */
    memset(r.host, 'h', sizeof(r.host) - 1);
    char key[ROUTE_KEY_MAX];
    route_key(&r, 25, key, sizeof(key));
    assert_int_equal(strlen(key),
                     strlen("lmtp:[]:65535 tls=opportunistic") + sizeof(r.host) - 1);

    r.kind = ROUTE_MX;
    r.lmtp = false;
    r.smarthost = false;
    r.tls = DELIVERY_TLS_DEFAULT;
    route_key(&r, 25, key, sizeof(key));
    assert_int_equal(strlen(key), strlen("mx::65535") + sizeof(r.host) - 1);

    memset(&r, 0, sizeof(r));
    r.tls = DELIVERY_TLS_DEFAULT;
    r.kind = ROUTE_UNIX;
    r.lmtp = true;
    memset(r.path, 'p', sizeof(r.path) - 1);
    route_key(&r, 25, key, sizeof(key));
    assert_int_equal(strlen(key), strlen("lmtp:unix:") + sizeof(r.path) - 1);
}

/* routes[].tls: the route carries its policy and its queue key says so,
 * so two policies to one next hop never share a queue or a connection. */
static void
test_route_tls_policy_is_part_of_the_key(void **state)
{
    (void)state;
    static struct route_config tls_routes[] = {
        {"secure.example", "smtp:[10.1.1.1]:25", DELIVERY_TLS_REQUIRED, 1},
        {"other.example", "smtp:[10.1.1.1]:25", DELIVERY_TLS_DEFAULT, 2},
        {"dane.example", "mx", DELIVERY_TLS_DANE, 3},
    };
    struct petrel_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    cfg.routes = tls_routes;
    cfg.nroutes = ARRAY_SIZE(tls_routes);
    static const struct {
        const char *domain;
        int tls;
        const char *key;
    } cases[] = {
        { "secure.example", DELIVERY_TLS_REQUIRED, "smtp:[10.1.1.1]:25 tls=required" },
        { "other.example", DELIVERY_TLS_DEFAULT, "smtp:[10.1.1.1]:25" },
        { "dane.example", DELIVERY_TLS_DANE, "mx:dane.example tls=dane" },
        { "unrouted.example", DELIVERY_TLS_DEFAULT, "mx:unrouted.example" },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct route r;
        route_for_domain(&cfg, cases[i].domain, &r);
        char key[ROUTE_KEY_MAX];
        route_key(&r, 25, key, sizeof(key));
        if (r.tls != cases[i].tls || strcmp(key, cases[i].key) != 0)
            fail_msg("%s: got tls=%d key '%s', want tls=%d key '%s'", cases[i].domain, r.tls,
                     key, cases[i].tls, cases[i].key);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_route_parse_accepts_valid_values),
        cmocka_unit_test(test_route_parse_unix_path_up_to_107_octets),
        cmocka_unit_test(test_route_parse_host_up_to_253_octets),
        cmocka_unit_test(test_route_parse_rejects_bad_values),
        cmocka_unit_test(test_route_parse_accepts_every_via_config_accepts),
        cmocka_unit_test(test_route_for_domain_first_match_and_wildcards),
        cmocka_unit_test(test_route_for_domain_without_routes_is_mx),
        cmocka_unit_test(test_route_key_names_destinations),
        cmocka_unit_test(test_route_key_same_destination_same_key),
        cmocka_unit_test(test_route_key_max_fits_longest_keys),
        cmocka_unit_test(test_route_tls_policy_is_part_of_the_key),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
