/*
 * test_source — outgoing source address / EHLO selection: precedence
 * (XBIND > select_source hook > rules > random), rule criteria, per-family
 * picks, XBIND and hook answer checks.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config.h"
#include "source.h"

static struct petrel_config *
t_config(const char *delivery)
{
    char yaml[2048];
    snprintf(yaml, sizeof(yaml),
             "hostname: default.petrel.test\n"
             "listeners:\n"
             "  - { name: mx, address: 127.0.0.1:2525 }\n"
             "  - { name: sub, address: 127.0.0.1:2587 }\n"
             "%s",
             delivery);
    struct petrel_config *c = NULL;
    char *errors = NULL;
    if (config_load_string("t.yaml", yaml, strlen(yaml), &c, &errors) != 0)
        fail_msg("config: %s", errors);
    free(errors);
    return c;
}

static unsigned t_next;
static unsigned
t_rnd(unsigned n)
{
    return t_next++ % n;
}

static void
t_expect(const struct source_choice *c, const char *ip4, const char *host4, const char *why)
{
    char w[32];
    source_why_text(c, w, sizeof(w));
    if (strcmp(c->ip[SOURCE_V4], ip4) != 0 || strcmp(c->hostname[SOURCE_V4], host4) != 0
        || strcmp(w, why) != 0)
        fail_msg("got %s/%s (%s), want %s/%s (%s)", c->ip[SOURCE_V4], c->hostname[SOURCE_V4], w,
                 ip4, host4, why);
}

static const char t_rules[] =
    "delivery:\n"
    "  hostname: relay.petrel.test\n"
    "  source_ips: [127.0.3.10, 127.0.3.11]\n"
    "  hostnames: { 127.0.3.10: ten.petrel.test, 127.0.3.11: eleven.petrel.test }\n"
    "  sources:\n"
    "    - domain: test.com\n"            /* the seed's format */
    "      ip: 127.0.3.20\n"
    "      hostname: mta.test.com\n"
    "    - domain: \"*.example.com\"\n"
    "      recipient_domain: partner.example\n"
    "      ip: 127.0.3.21\n"
    "    - listener_ip: 127.0.0.9\n"
    "      pool: [127.0.3.30, 127.0.3.31]\n"
    "      hostname: pool.petrel.test\n"
    "    - client_cidr: 10.0.0.0/8\n"
    "      listener: sub\n"
    "      hostname: sub.petrel.test\n";

static void
test_source_rules_in_file_order(void **state)
{
    (void)state;
    struct petrel_config *c = t_config(t_rules);
    struct source_choice ch;
    struct source_query q = { .sender = "alice@test.com", .rcpt_domain = "x.org",
                              .listener = "mx", .listener_ip = "127.0.0.1",
                              .client_ip = "127.0.0.1" };
    t_next = 0;
    source_select(c, NULL, &q, t_rnd, &ch);
    t_expect(&ch, "127.0.3.20", "mta.test.com", "rule 1");
    assert_string_equal(ch.ip[SOURCE_V6], "");
    assert_false(ch.any);

    /* subdomain pattern and recipient_domain must both match */
    q.sender = "bob@eu.example.com";
    source_select(c, NULL, &q, t_rnd, &ch);
    t_expect(&ch, "127.0.3.10", "ten.petrel.test", "random"); /* rule 2 needs partner.example */
    q.rcpt_domain = "partner.example";
    source_select(c, NULL, &q, t_rnd, &ch);
    t_expect(&ch, "127.0.3.21", "relay.petrel.test", "rule 2"); /* ip alone: delivery.hostname */
    q.sender = "bob@example.com"; /* "*.example.com" is subdomains only */
    source_select(c, NULL, &q, t_rnd, &ch);
    assert_int_not_equal(ch.why, SOURCE_RULE);

    /* listener_ip rule with a pool */
    q.sender = "x@y.org";
    q.listener_ip = "127.0.0.9";
    t_next = 1;
    source_select(c, NULL, &q, t_rnd, &ch);
    t_expect(&ch, "127.0.3.31", "pool.petrel.test", "rule 3");

    /* client_cidr and listener; the rule names only a hostname */
    q.listener_ip = "127.0.0.1";
    q.client_ip = "10.1.2.3";
    q.listener = "sub";
    t_next = 0;
    source_select(c, NULL, &q, t_rnd, &ch);
    t_expect(&ch, "127.0.3.10", "sub.petrel.test", "rule 4");
    config_unref(c);
}

static void
test_source_xbind_wins_over_rules(void **state)
{
    (void)state;
    struct petrel_config *c = t_config(t_rules);
    struct source_choice ch;
    struct source_query q = { .sender = "alice@test.com", .xbind_ip = "127.0.3.11" };
    source_select(c, NULL, &q, t_rnd, &ch);
    t_expect(&ch, "127.0.3.11", "eleven.petrel.test", "xbind");
    q.xbind_hostname = "custom.petrel.test";
    source_select(c, NULL, &q, t_rnd, &ch);
    t_expect(&ch, "127.0.3.11", "custom.petrel.test", "xbind");
    config_unref(c);
}

/* The select_source hook's answer: after XBIND, before every rule. */
static void
test_source_hook_between_xbind_and_rules(void **state)
{
    (void)state;
    struct petrel_config *c = t_config(t_rules);
    static const struct {
        const char *label;
        const char *xbind_ip, *xbind_hostname, *hook_ip, *hook_hostname;
        const char *want_ip, *want_hostname, *want_why;
    } cases[] = {
        {"hook beats rule 1", NULL, NULL, "127.0.3.40", "lua.petrel.test", "127.0.3.40",
         "lua.petrel.test", "lua"},
        {"hook without hostname: delivery.hostnames", NULL, NULL, "127.0.3.11", NULL,
         "127.0.3.11", "eleven.petrel.test", "lua"},
        {"hook with empty hostname: delivery.hostname", NULL, NULL, "127.0.3.40", "",
         "127.0.3.40", "relay.petrel.test", "lua"},
        {"xbind beats hook", "127.0.3.11", NULL, "127.0.3.40", "lua.petrel.test", "127.0.3.11",
         "eleven.petrel.test", "xbind"},
        {"empty hook ip: rules", NULL, NULL, "", "lua.petrel.test", "127.0.3.20",
         "mta.test.com", "rule 1"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct source_query q = {
            .sender = "alice@test.com",
            .rcpt_domain = "x.org",
            .xbind_ip = cases[i].xbind_ip,
            .xbind_hostname = cases[i].xbind_hostname,
            .hook_ip = cases[i].hook_ip,
            .hook_hostname = cases[i].hook_hostname,
        };
        struct source_choice ch;
        source_select(c, NULL, &q, t_rnd, &ch);
        char w[32];
        source_why_text(&ch, w, sizeof(w));
        if (strcmp(ch.ip[SOURCE_V4], cases[i].want_ip) != 0
            || strcmp(ch.hostname[SOURCE_V4], cases[i].want_hostname) != 0
            || strcmp(w, cases[i].want_why) != 0)
            fail_msg("%s: got %s/%s (%s), want %s/%s (%s)", cases[i].label, ch.ip[SOURCE_V4],
                     ch.hostname[SOURCE_V4], w, cases[i].want_ip, cases[i].want_hostname,
                     cases[i].want_why);
        if (ch.why != SOURCE_XBIND && ch.why != SOURCE_RULE && ch.ip[SOURCE_V6][0] != '\0')
            fail_msg("%s: got IPv6 %s, want none (an explicit address)", cases[i].label,
                     ch.ip[SOURCE_V6]);
    }
    /* an IPv6 answer fills the IPv6 slot only */
    struct source_query q6 = { .sender = "alice@test.com", .hook_ip = "::1" };
    struct source_choice ch;
    source_select(c, NULL, &q6, t_rnd, &ch);
    if (strcmp(ch.ip[SOURCE_V6], "::1") != 0 || ch.ip[SOURCE_V4][0] != '\0' || ch.any)
        fail_msg("IPv6 hook answer: got v4=%s v6=%s any=%d, want v4= v6=::1 any=0",
                 ch.ip[SOURCE_V4], ch.ip[SOURCE_V6], ch.any);
    config_unref(c);
}

static void
test_source_check_hook(void **state)
{
    (void)state;
    static const struct {
        const char *ip, *hostname, *want; /* want NULL: accepted */
    } cases[] = {
        {"127.0.3.99", "mta.example.net", NULL}, /* any local address, pool or not */
        {"127.0.3.99", NULL, NULL},
        {"127.0.3.99", "", NULL},
        {"::1", NULL, NULL},
        {"192.0.2.99", NULL, "not a local address"},
        {"mta.example.net", NULL, "not an IP address"},
        {"127.0.0.1 ", NULL, "not an IP address"},
        {"", NULL, "not an IP address"},
        {NULL, NULL, "not an IP address"},
        {"127.0.3.99", "bad name", "hostname is not a valid domain name"},
        {"127.0.3.99", "mta.example.net\r\nRSET", "hostname is not a valid domain name"},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        const char *got = source_check_hook(cases[i].ip, cases[i].hostname);
        bool same = got == NULL ? cases[i].want == NULL
                                : cases[i].want != NULL && strcmp(got, cases[i].want) == 0;
        if (!same)
            fail_msg("source_check_hook(%s, %s): got %s, want %s",
                     cases[i].ip ? cases[i].ip : "NULL",
                     cases[i].hostname ? cases[i].hostname : "NULL", got ? got : "NULL",
                     cases[i].want ? cases[i].want : "NULL");
    }
}

static void
test_source_random_pool_uses_every_address(void **state)
{
    (void)state;
    struct petrel_config *c = t_config(t_rules);
    struct source_query q = { .sender = "a@b.org" };
    bool seen[2] = { false, false };
    for (t_next = 0; t_next < 4;) {
        struct source_choice ch;
        source_select(c, NULL, &q, t_rnd, &ch);
        assert_int_equal(ch.why, SOURCE_RANDOM);
        if (strcmp(ch.ip[SOURCE_V4], "127.0.3.10") == 0) {
            seen[0] = true;
            assert_string_equal(ch.hostname[SOURCE_V4], "ten.petrel.test");
        } else {
            assert_string_equal(ch.ip[SOURCE_V4], "127.0.3.11");
            assert_string_equal(ch.hostname[SOURCE_V4], "eleven.petrel.test");
            seen[1] = true;
        }
    }
    assert_true(seen[0] && seen[1]);
    config_unref(c);
}

static void
test_source_machine_addresses_one_per_family(void **state)
{
    (void)state;
    struct petrel_config *c = t_config("delivery: { hostname: relay.petrel.test }\n");
    char addrs[3][SOURCE_IP_SIZE] = { "192.0.2.2", "fd00::2", "192.0.2.3" };
    struct source_locals locals = { addrs, 3 };
    struct source_query q = { .sender = "a@b.org" };
    struct source_choice ch;
    t_next = 1;
    source_select(c, &locals, &q, t_rnd, &ch);
    assert_int_equal(ch.why, SOURCE_RANDOM);
    assert_string_equal(ch.ip[SOURCE_V4], "192.0.2.3");
    assert_string_equal(ch.ip[SOURCE_V6], "fd00::2");
    assert_string_equal(ch.hostname[SOURCE_V6], "relay.petrel.test");
    assert_false(ch.any);

    /* no address at all: the kernel chooses */
    source_select(c, NULL, &q, t_rnd, &ch);
    assert_int_equal(ch.why, SOURCE_SYSTEM);
    assert_true(ch.any);
    assert_string_equal(ch.hostname[SOURCE_V4], "relay.petrel.test");
    config_unref(c);
}

static void
test_source_check_override(void **state)
{
    (void)state;
    struct petrel_config *c = t_config(t_rules);
    assert_null(source_check_override(c, "127.0.3.10"));  /* source_ips */
    assert_null(source_check_override(c, "127.0.3.20"));  /* a rule's ip */
    assert_null(source_check_override(c, "127.0.3.31"));  /* a rule's pool */
    assert_string_equal(source_check_override(c, "127.0.3.99"),
                        "not in the configured source pool");
    config_unref(c);
    c = t_config("delivery: { hostname: relay.petrel.test }\n");
    assert_null(source_check_override(c, "127.0.3.99")); /* any local address */
    assert_string_equal(source_check_override(c, "192.0.2.99"), "not a local address");
    config_unref(c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_source_rules_in_file_order),
        cmocka_unit_test(test_source_xbind_wins_over_rules),
        cmocka_unit_test(test_source_hook_between_xbind_and_rules),
        cmocka_unit_test(test_source_check_hook),
        cmocka_unit_test(test_source_random_pool_uses_every_address),
        cmocka_unit_test(test_source_machine_addresses_one_per_family),
        cmocka_unit_test(test_source_check_override),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
