/*
 * test_config — the YAML configuration: a full file with every section and
 * its converted values, the shipped reference (config/petrel.yaml, also the
 * embedded default), the option table's defaults, one exact error line per
 * kind of mistake, and the value parsers shared with other modules.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "config.h"
#include "log.h"
#include "util.h"

#define L1 "listeners: [{address: 127.0.0.1:25}]\n"

static struct petrel_config *
load_ok(const char *text)
{
    struct petrel_config *c = NULL;
    char *errors = NULL;
    if (config_load_string("t.yaml", text, strlen(text), &c, &errors) != 0)
        fail_msg("load failed, want success:\n%s", errors);
    assert_non_null(c);
    assert_null(errors);
    return c;
}

/* The errors (owned) of a config that must not load. */
static char *
load_err(const char *text, size_t len)
{
    struct petrel_config *c = NULL;
    char *errors = NULL;
    if (config_load_string("t.yaml", text, len, &c, &errors) == 0) {
        config_unref(c);
        fail_msg("loaded, want an error:\n%s", text);
    }
    assert_null(c);
    assert_non_null(errors);
    return errors;
}

static char *
read_source_file(const char *rel)
{
    const char *dir = getenv("PETREL_SOURCE_DIR");
    char path[1024];
    snprintf(path, sizeof(path), "%s/%s", dir ? dir : PETREL_SOURCE_DIR, rel);
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        fail_msg("cannot open %s", path);
    struct buf b;
    buf_init(&b);
    size_t n;
    while ((n = fread(buf_reserve(&b, 4096), 1, 4096, f)) > 0)
        buf_commit(&b, n);
    fclose(f);
    return buf_steal(&b, NULL);
}

static const char *
sockaddr_text(const struct sockaddr_storage *ss, char *out, size_t size)
{
    char ip[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &sin->sin_addr, ip, sizeof(ip));
        snprintf(out, size, "%s:%u", ip, ntohs(sin->sin_port));
    } else {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &sin6->sin6_addr, ip, sizeof(ip));
        snprintf(out, size, "[%s]:%u", ip, ntohs(sin6->sin6_port));
    }
    return out;
}

#define CHECK_STR(what, got, want)                                                                 \
    do {                                                                                           \
        const char *got_ = (got), *want_ = (want);                                                 \
        if (got_ == NULL || strcmp(got_, want_) != 0)                                              \
            fail_msg("%s: got \"%s\", want \"%s\"", (what), got_ ? got_ : "(null)", want_);        \
    } while (0)

#define CHECK_INT(what, got, want)                                                                 \
    do {                                                                                           \
        unsigned long long got_ = (got), want_ = (want);                                           \
        if (got_ != want_)                                                                         \
            fail_msg("%s: got %llu, want %llu", (what), got_, want_);                              \
    } while (0)

/* ---- a full configuration ------------------------------------------------ */

static const char full_yaml[] =
    "hostname: relay.example.net\n"
    "spool: /var/spool/petrel\n"
    "shutdown_timeout: 45s\n"
    "log: { level: debug, format: json }\n"
    "listeners:\n"
    "  - name: mx\n"
    "    address: \"*:2525\"\n"
    "    tls: starttls\n"
    "    max_message_size: 10M\n"
    "    max_recipients: 50\n"
    "    max_line_length: 1024\n"
    "    max_errors: 5\n"
    "    max_connections: 200\n"
    "    max_connections_per_ip: 20\n"
    "    command_timeout: 2m\n"
    "    data_timeout: 90s\n"
    "    greet_delay: 2s\n"
    "    max_received_headers: 50\n"
    "    milters: [dkim]\n"
    "  - address: \"[::1]:2587\"\n"
    "    tls: implicit\n"
    "    auth: required\n"
    "    milters: []\n"
    "  - address: localhost:2526\n"
    "tls: { cert: /etc/petrel/cert.pem, key: /etc/petrel/key.pem }\n"
    "relay:\n"
    "  clients: [10.0.0.0/8, \"2001:db8::/32\", 192.168.1.1]\n"
    "  domains: [Example.COM, \"*.example.org\"]\n"
    "auth: { users_file: /etc/petrel/users, allow_plaintext: true }\n"
    "dns: { resolvers: [127.0.0.1:53, \"[::1]:5353\"], timeout: 2s }\n"
    "delivery:\n"
    "  hostname: mta.example.net\n"
    "  source_ips: [127.0.0.10, 127.0.0.11]\n"
    "  hostnames: { 127.0.0.10: mta.test.com, 127.0.0.11: mail.test2.com }\n"
    "  sources:\n"
    "    - domain: test.com\n"
    "      ip: 127.0.0.10\n"
    "      hostname: mta.test.com\n"
    "    - listener_ip: 127.0.0.1\n"
    "      listener: mx\n"
    "      recipient_domain: \"*.example.org\"\n"
    "      client_cidr: 10.1.0.0/16\n"
    "      pool: [127.0.0.11, 127.0.0.12]\n"
    "  max_connections_per_destination: 5\n"
    "  max_messages_per_connection: 10\n"
    "  tls: required\n"
    "  port: 2525\n"
    "routes:\n"
    "  - domain: internal.example\n"
    "    via: lmtp:unix:/run/dovecot/lmtp\n"
    "  - domain: partner.example\n"
    "    via: smtp:[10.1.1.1]:2525\n"
    "  - domain: \"*\"\n"
    "    via: mx\n"
    "retry:\n"
    "  schedule: [1m, 5m, 1h]\n"
    "  max_attempts: 3\n"
    "  max_age: 2d\n"
    "bounce: { enabled: false, from_name: Postmaster }\n"
    "lua: { script: scripts/policy.lua, on_error: reject, timeout: 250ms }\n"
    "milters:\n"
    "  - name: dkim\n"
    "    socket: inet:8891@127.0.0.1\n"
    "    default_action: accept\n"
    "    timeouts: { connect: 1s, command: 10s, eom: 2m }\n"
    "  - name: spam\n"
    "    socket: unix:/run/spamass.sock\n"
    "plugins:\n"
    "  - { path: plugins/example.so, config: { key: value, n: 3, empty: } }\n"
    "http: { listen: 127.0.0.1:8025 }\n";

static void
test_config_full_converts_every_section(void **state)
{
    (void)state;
    struct petrel_config *c = load_ok(full_yaml);
    char text[128];
    CHECK_STR("file", c->file, "t.yaml");
    CHECK_STR("hostname", c->hostname, "relay.example.net");
    CHECK_STR("spool", c->spool, "/var/spool/petrel");
    CHECK_INT("shutdown_timeout_ms", c->shutdown_timeout_ms, 45000);
    CHECK_INT("log.level", c->log.level, LOG_DEBUG);
    CHECK_INT("log.format", c->log.format, LOG_FORMAT_JSON);

    CHECK_INT("nlisteners", c->nlisteners, 3);
    const struct listener_config *l = &c->listeners[0];
    CHECK_STR("listeners[0].name", l->name, "mx");
    CHECK_STR("listeners[0].address", l->address, "*:2525");
    CHECK_STR("listeners[0].addr", sockaddr_text(&l->addr, text, sizeof(text)), "0.0.0.0:2525");
    CHECK_INT("listeners[0].addr_len", l->addr_len, sizeof(struct sockaddr_in));
    CHECK_INT("listeners[0].tls", l->tls, LISTENER_TLS_STARTTLS);
    CHECK_INT("listeners[0].auth", l->auth, LISTENER_AUTH_NONE);
    CHECK_INT("listeners[0].max_message_size", l->max_message_size, 10 * 1024 * 1024);
    CHECK_INT("listeners[0].max_recipients", l->max_recipients, 50);
    CHECK_INT("listeners[0].max_line_length", l->max_line_length, 1024);
    CHECK_INT("listeners[0].max_errors", l->max_errors, 5);
    CHECK_INT("listeners[0].max_connections", l->max_connections, 200);
    CHECK_INT("listeners[0].max_connections_per_ip", l->max_connections_per_ip, 20);
    CHECK_INT("listeners[0].command_timeout_ms", l->command_timeout_ms, 120000);
    CHECK_INT("listeners[0].data_timeout_ms", l->data_timeout_ms, 90000);
    CHECK_INT("listeners[0].greet_delay_ms", l->greet_delay_ms, 2000);
    CHECK_INT("listeners[0].max_received_headers", l->max_received_headers, 50);
    CHECK_INT("listeners[0].milters_set", l->milters_set, true);
    CHECK_INT("listeners[0].milters.n", l->milters.n, 1);
    CHECK_STR("listeners[0].milters[0]", l->milters.v[0], "dkim");
    CHECK_INT("listeners[0].line", l->line, 6);
    l = &c->listeners[1];
    CHECK_STR("listeners[1].name", l->name, "listener1");
    CHECK_STR("listeners[1].addr", sockaddr_text(&l->addr, text, sizeof(text)), "[::1]:2587");
    CHECK_INT("listeners[1].addr_len", l->addr_len, sizeof(struct sockaddr_in6));
    CHECK_INT("listeners[1].tls", l->tls, LISTENER_TLS_IMPLICIT);
    CHECK_INT("listeners[1].auth", l->auth, LISTENER_AUTH_REQUIRED);
    CHECK_INT("listeners[1].milters_set", l->milters_set, true);
    CHECK_INT("listeners[1].milters.n", l->milters.n, 0);
    CHECK_INT("listeners[1].max_message_size", l->max_message_size, 50 * 1024 * 1024);
    l = &c->listeners[2];
    CHECK_STR("listeners[2].name", l->name, "listener2");
    CHECK_STR("listeners[2].addr", sockaddr_text(&l->addr, text, sizeof(text)), "127.0.0.1:2526");
    CHECK_INT("listeners[2].milters_set", l->milters_set, false);
    CHECK_INT("listeners[2].command_timeout_ms", l->command_timeout_ms, 300000);

    CHECK_STR("tls.cert", c->tls.cert, "/etc/petrel/cert.pem");
    CHECK_STR("tls.key", c->tls.key, "/etc/petrel/key.pem");

    CHECK_INT("relay.clients.n", c->relay.clients.n, 3);
    CHECK_INT("relay.clients[0].family", c->relay.clients.v[0].family, AF_INET);
    CHECK_INT("relay.clients[0].prefix", c->relay.clients.v[0].prefix, 8);
    CHECK_INT("relay.clients[1].family", c->relay.clients.v[1].family, AF_INET6);
    CHECK_INT("relay.clients[1].prefix", c->relay.clients.v[1].prefix, 32);
    CHECK_INT("relay.clients[2].prefix", c->relay.clients.v[2].prefix, 32);
    CHECK_INT("relay.domains.n", c->relay.domains.n, 2);
    CHECK_STR("relay.domains[0]", c->relay.domains.v[0], "example.com");
    CHECK_STR("relay.domains[1]", c->relay.domains.v[1], "*.example.org");

    CHECK_STR("auth.users_file", c->auth.users_file, "/etc/petrel/users");
    CHECK_INT("auth.allow_plaintext", c->auth.allow_plaintext, true);

    CHECK_INT("dns.resolvers.n", c->dns.resolvers.n, 2);
    CHECK_STR("dns.resolvers[1]", c->dns.resolvers.v[1], "[::1]:5353");
    CHECK_INT("dns.timeout_ms", c->dns.timeout_ms, 2000);

    CHECK_STR("delivery.hostname", c->delivery.hostname, "mta.example.net");
    CHECK_INT("delivery.source_ips.n", c->delivery.source_ips.n, 2);
    CHECK_STR("delivery.source_ips[1]", c->delivery.source_ips.v[1], "127.0.0.11");
    CHECK_INT("delivery.nhostnames", c->delivery.nhostnames, 2);
    CHECK_STR("delivery.hostnames[0].ip", c->delivery.hostnames[0].ip, "127.0.0.10");
    CHECK_STR("delivery.hostnames[0].hostname", c->delivery.hostnames[0].hostname, "mta.test.com");
    CHECK_STR("delivery.hostnames[1].hostname", c->delivery.hostnames[1].hostname,
              "mail.test2.com");
    CHECK_INT("delivery.nsources", c->delivery.nsources, 2);
    const struct source_rule *r = &c->delivery.sources[0];
    CHECK_STR("sources[0].domain", r->domain, "test.com");
    CHECK_STR("sources[0].ip", r->ip, "127.0.0.10");
    CHECK_STR("sources[0].hostname", r->hostname, "mta.test.com");
    assert_null(r->listener_ip);
    assert_null(r->listener);
    CHECK_INT("sources[0].line", r->line, 36);
    r = &c->delivery.sources[1];
    CHECK_STR("sources[1].listener_ip", r->listener_ip, "127.0.0.1");
    CHECK_STR("sources[1].listener", r->listener, "mx");
    CHECK_STR("sources[1].recipient_domain", r->recipient_domain, "*.example.org");
    CHECK_INT("sources[1].client_cidr.n", r->client_cidr.n, 1);
    CHECK_INT("sources[1].client_cidr[0].prefix", r->client_cidr.v[0].prefix, 16);
    assert_null(r->ip);
    CHECK_INT("sources[1].pool.n", r->pool.n, 2);
    CHECK_STR("sources[1].pool[1]", r->pool.v[1], "127.0.0.12");
    CHECK_INT("delivery.max_connections_per_destination",
              c->delivery.max_connections_per_destination, 5);
    CHECK_INT("delivery.max_messages_per_connection", c->delivery.max_messages_per_connection, 10);
    CHECK_INT("delivery.tls", c->delivery.tls, DELIVERY_TLS_REQUIRED);
    CHECK_INT("delivery.port", c->delivery.port, 2525);

    CHECK_INT("nroutes", c->nroutes, 3);
    CHECK_STR("routes[0].domain", c->routes[0].domain, "internal.example");
    CHECK_STR("routes[0].via", c->routes[0].via, "lmtp:unix:/run/dovecot/lmtp");
    CHECK_STR("routes[1].via", c->routes[1].via, "smtp:[10.1.1.1]:2525");
    CHECK_STR("routes[2].domain", c->routes[2].domain, "*");
    CHECK_STR("routes[2].via", c->routes[2].via, "mx");

    CHECK_INT("retry.nschedule", c->retry.nschedule, 3);
    CHECK_INT("retry.schedule[0]", c->retry.schedule_ms[0], 60000);
    CHECK_INT("retry.schedule[2]", c->retry.schedule_ms[2], 3600000);
    CHECK_INT("retry.max_attempts", c->retry.max_attempts, 3);
    CHECK_INT("retry.max_age_ms", c->retry.max_age_ms, 2ULL * 86400 * 1000);

    CHECK_INT("bounce.enabled", c->bounce.enabled, false);
    CHECK_STR("bounce.from_name", c->bounce.from_name, "Postmaster");

    CHECK_STR("lua.script", c->lua.script, "scripts/policy.lua");
    CHECK_INT("lua.on_error", c->lua.on_error, MILTER_ACTION_REJECT);
    CHECK_INT("lua.timeout_ms", c->lua.timeout_ms, 250);

    CHECK_INT("nmilters", c->nmilters, 2);
    const struct milter_config *m = &c->milters[0];
    CHECK_STR("milters[0].name", m->name, "dkim");
    CHECK_STR("milters[0].socket", m->socket, "inet:8891@127.0.0.1");
    CHECK_INT("milters[0].default_action", m->default_action, MILTER_ACTION_ACCEPT);
    CHECK_INT("milters[0].connect_timeout_ms", m->connect_timeout_ms, 1000);
    CHECK_INT("milters[0].command_timeout_ms", m->command_timeout_ms, 10000);
    CHECK_INT("milters[0].eom_timeout_ms", m->eom_timeout_ms, 120000);
    m = &c->milters[1];
    CHECK_STR("milters[1].socket", m->socket, "unix:/run/spamass.sock");
    CHECK_INT("milters[1].default_action", m->default_action, MILTER_ACTION_TEMPFAIL);
    CHECK_INT("milters[1].eom_timeout_ms", m->eom_timeout_ms, 60000);

    CHECK_INT("nplugins", c->nplugins, 1);
    CHECK_STR("plugins[0].path", c->plugins[0].path, "plugins/example.so");
    CHECK_INT("plugins[0].nconfig", c->plugins[0].nconfig, 3);
    CHECK_STR("plugins[0].config[0].key", c->plugins[0].config[0].key, "key");
    CHECK_STR("plugins[0].config[0].value", c->plugins[0].config[0].value, "value");
    CHECK_STR("plugins[0].config[1].value", c->plugins[0].config[1].value, "3");
    CHECK_STR("plugins[0].config[2].key", c->plugins[0].config[2].key, "empty");
    CHECK_STR("plugins[0].config[2].value", c->plugins[0].config[2].value, "");

    CHECK_STR("http.listen", c->http.listen, "127.0.0.1:8025");
    config_unref(c);
}

/* What every config that leaves the keys out gets. */
static void
check_minimal_defaults(const struct petrel_config *c, const char *what)
{
    char buf[256];
    if (c->hostname == NULL || c->hostname[0] == '\0')
        fail_msg("%s: hostname: got nothing, want gethostname()", what);
    snprintf(buf, sizeof(buf), "%s: spool", what);
    CHECK_STR(buf, c->spool, "./var/spool");
    CHECK_INT("log.level", c->log.level, LOG_INFO);
    CHECK_INT("log.format", c->log.format, LOG_FORMAT_TEXT);
    CHECK_INT("relay.clients.n", c->relay.clients.n, 2);
    CHECK_INT("retry.nschedule", c->retry.nschedule, 4);
    CHECK_INT("retry.schedule[3]", c->retry.schedule_ms[3], 4 * 3600 * 1000);
    CHECK_INT("delivery.tls", c->delivery.tls, DELIVERY_TLS_OPPORTUNISTIC);
    CHECK_INT("bounce.enabled", c->bounce.enabled, true);
    CHECK_INT("lua.on_error", c->lua.on_error, MILTER_ACTION_TEMPFAIL);
    assert_null(c->tls.cert);
    assert_null(c->http.listen);
}

static void
check_reference(const struct petrel_config *c, const char *file)
{
    char text[128];
    CHECK_STR("file", c->file, file);
    check_minimal_defaults(c, file);
    CHECK_INT("nlisteners", c->nlisteners, 1);
    CHECK_STR("listeners[0].name", c->listeners[0].name, "default");
    CHECK_STR("listeners[0].address", c->listeners[0].address, "127.0.0.1:2525");
    CHECK_STR("listeners[0].addr", sockaddr_text(&c->listeners[0].addr, text, sizeof(text)),
              "127.0.0.1:2525");
    CHECK_INT("listeners[0].milters_set", c->listeners[0].milters_set, false);
    CHECK_INT("nmilters", c->nmilters, 0);
    CHECK_INT("nroutes", c->nroutes, 0);
}

static void
test_config_reference_file_loads(void **state)
{
    (void)state;
    const char *dir = getenv("PETREL_SOURCE_DIR");
    char path[1024];
    snprintf(path, sizeof(path), "%s/config/petrel.yaml", dir ? dir : PETREL_SOURCE_DIR);
    struct petrel_config *c = NULL;
    char *errors = NULL;
    if (config_load_file(path, &c, &errors) != 0)
        fail_msg("%s: got errors, want none:\n%s", path, errors);
    check_reference(c, path);
    config_unref(c);
}

static void
test_config_embedded_default_loads(void **state)
{
    (void)state;
    struct petrel_config *c = NULL;
    char *errors = NULL;
    if (config_load_default(&c, &errors) != 0)
        fail_msg("embedded default: got errors, want none:\n%s", errors);
    check_reference(c, "<embedded>");
    config_unref(c);
}

static void
test_config_missing_file_is_an_error(void **state)
{
    (void)state;
    struct petrel_config *c = NULL;
    char *errors = NULL;
    assert_int_equal(config_load_file("/nonexistent/petrel.yaml", &c, &errors), -1);
    assert_null(c);
    CHECK_STR("errors", errors,
              "/nonexistent/petrel.yaml: cannot open: No such file or directory\n");
    free(errors);
}

static void
test_config_relay_clients_default_when_section_lacks_them(void **state)
{
    (void)state;
    struct petrel_config *c = load_ok(L1 "relay: {domains: [example.com]}\n");
    char text[128];
    assert_true(config_option_format(c, "relay.clients", 0, text, sizeof(text)));
    CHECK_STR("relay.clients", text, "127.0.0.0/8, ::1/128");
    config_unref(c);
    c = load_ok(L1 "relay:\n");
    assert_true(config_option_format(c, "relay.clients", 0, text, sizeof(text)));
    CHECK_STR("relay.clients (empty section)", text, "127.0.0.0/8, ::1/128");
    config_unref(c);
}

static void
test_config_refcount_keeps_config_alive(void **state)
{
    (void)state;
    struct petrel_config *c = load_ok(L1);
    assert_int_equal(c->refs, 1);
    assert_ptr_equal(config_ref(c), c);
    assert_int_equal(c->refs, 2);
    config_unref(c);
    CHECK_STR("spool after one unref", c->spool, "./var/spool");
    config_unref(c);
    config_unref(NULL);
}

/* ---- the option table ---------------------------------------------------- */

/* A config (owned) with one listener, one milter and one route, and option path (one
 * of the table's; NULL: none) set to value, quoted. */
static char *
yaml_setting(const char *path, const char *value, bool list)
{
    struct buf v, lst, mlt, top, rte;
    buf_init(&v);
    buf_init(&rte);
    buf_init(&lst);
    buf_init(&mlt);
    buf_init(&top);
    if (list) {
        buf_append_str(&v, "[");
        for (const char *p = value; *p;) {
            size_t n = strcspn(p, ",");
            buf_printf(&v, "%s\"%.*s\"", v.len > 1 ? ", " : "", (int)n, p);
            p += n;
            p += strspn(p, ", ");
        }
        buf_append_str(&v, "]");
    } else if (value != NULL) {
        buf_printf(&v, "\"%s\"", value);
    }
    char *vs = buf_steal(&v, NULL);
    const char *dot = path ? strrchr(path, '.') : NULL;
    if (path == NULL) {
        /* the minimal config itself */
    } else if (strncmp(path, "listeners[].", 12) == 0) {
        buf_printf(&lst, ", %s: %s", path + 12, vs);
    } else if (strncmp(path, "routes[].", 9) == 0) {
        buf_printf(&rte, ", %s: %s", path + 9, vs);
    } else if (strncmp(path, "milters[].timeouts.", 19) == 0) {
        buf_printf(&mlt, ", timeouts: {%s: %s}", path + 19, vs);
    } else if (strncmp(path, "milters[].", 10) == 0) {
        buf_printf(&mlt, ", %s: %s", path + 10, vs);
    } else if (strncmp(path, "delivery.timeouts.", 18) == 0) {
        buf_printf(&top, "delivery: {timeouts: {%s: %s}}\n", path + 18, vs);
    } else if (dot != NULL) {
        buf_printf(&top, "%.*s: {%s: %s}\n", (int)(dot - path), path, dot + 1, vs);
    } else {
        buf_printf(&top, "%s: %s\n", path, vs);
    }
    free(vs);
    char *l = buf_steal(&lst, NULL), *m = buf_steal(&mlt, NULL), *t = buf_steal(&top, NULL);
    char *r = buf_steal(&rte, NULL);
    char *yaml = xasprintf("%slisteners: [{address: 127.0.0.1:25%s}]\n"
                           "milters: [{name: m, socket: unix:/m%s}]\n"
                           "routes: [{domain: r.example, via: mx%s}]\n",
                           t, l, m, r);
    free(r);
    free(l);
    free(m);
    free(t);
    return yaml;
}

/* Leaving a key out gives the same value as writing the table's default. */
static void
test_config_defaults_come_from_the_table(void **state)
{
    (void)state;
    char *minimal_yaml = yaml_setting(NULL, NULL, false);
    struct petrel_config *minimal = load_ok(minimal_yaml);
    free(minimal_yaml);
    check_minimal_defaults(minimal, "minimal");
    size_t checked = 0;
    for (size_t i = 0; i < config_option_count(); i++) {
        struct config_option_info info;
        assert_true(config_option_describe(i, &info));
        if (info.def == NULL)
            continue;
        char got[256], want[256];
        char *yaml = yaml_setting(info.path, info.def, info.list);
        struct petrel_config *c = load_ok(yaml);
        free(yaml);
        if (!config_option_format(minimal, info.path, 0, got, sizeof(got)))
            fail_msg("%s: cannot format the value it gets when absent", info.path);
        if (!config_option_format(c, info.path, 0, want, sizeof(want)))
            fail_msg("%s: cannot format the value set to %s", info.path, info.def);
        if (strcmp(got, want) != 0)
            fail_msg("%s absent: got %s, want the table default %s (%s)", info.path, got, info.def,
                     want);
        config_unref(c);
        checked++;
    }
    config_unref(minimal);
    if (checked < 30)
        fail_msg("options with defaults: got %zu, want at least 30", checked);
}

static bool
line_documents(const char *line, size_t len, const char *key, const char *def)
{
    char clean[256], want[160];
    size_t n = 0;
    for (size_t i = 0; i < len && n + 1 < sizeof(clean); i++)
        if (line[i] != '"' && line[i] != '[' && line[i] != ']')
            clean[n++] = line[i];
    clean[n] = '\0';
    snprintf(want, sizeof(want), "%s: %s", key, def);
    const char *hit = strstr(clean, want);
    return hit != NULL && (hit == clean || hit[-1] == ' ' || hit[-1] == '#');
}

/* config/petrel.yaml shows every default of the table under its section. */
static void
test_config_reference_documents_every_default(void **state)
{
    (void)state;
    char *text = read_source_file("config/petrel.yaml");
    for (size_t i = 0; i < config_option_count(); i++) {
        struct config_option_info info;
        assert_true(config_option_describe(i, &info));
        if (info.def == NULL)
            continue;
        const char *key = strrchr(info.path, '.');
        key = key ? key + 1 : info.path;
        size_t slen = strcspn(info.path, ".[");
        bool in_section = slen == strlen(info.path); /* top-level keys: anywhere */
        bool found = false;
        for (const char *p = text; *p && !found;) {
            size_t len = strcspn(p, "\n");
            const char *s = p[0] == '#' ? p + 1 : p;
            if (!in_section && strncmp(s, info.path, slen) == 0 && s[slen] == ':')
                in_section = true;
            else if (in_section && line_documents(p, len, key, info.def))
                found = true;
            p += len + (p[len] == '\n');
        }
        if (!found)
            fail_msg("config/petrel.yaml: %s: got no \"%s: %s\" line, want one", info.path, key,
                     info.def);
    }
    free(text);
}

/* ---- errors -------------------------------------------------------------- */

struct error_case {
    const char *label;
    const char *yaml;
    const char *want; /* the whole error text */
};

/* clang-format off */
static const struct error_case error_cases[] = {
    { "unknown top-level key",
      L1 "bogus: 1\n",
      "t.yaml:2:1: bogus: unknown key\n" },
    { "unknown listener key",
      "listeners:\n  - address: 127.0.0.1:25\n    max_recipient: 5\n",
      "t.yaml:3:5: listeners[0].max_recipient: unknown key (did you mean max_recipients?)\n" },
    { "unknown section key",
      L1 "retry:\n  max_tries: 3\n",
      "t.yaml:3:3: retry.max_tries: unknown key\n" },
    { "duplicate key",
      L1 "spool: /a\nspool: /b\n",
      "t.yaml:3:1: spool: duplicate key (first at line 2)\n" },
    { "duplicate nested key",
      "listeners:\n  - address: 127.0.0.1:25\n    tls: none\n    tls: none\n",
      "t.yaml:4:5: listeners[0].tls: duplicate key (first at line 3)\n" },
    { "list where scalar expected",
      L1 "spool: [a, b]\n",
      "t.yaml:2:8: spool: expected a string, got a list\n" },
    { "mapping where list expected",
      "listeners: {address: 127.0.0.1:25}\n",
      "t.yaml:1:12: listeners: expected a list, got a mapping\n" },
    { "scalar where mapping expected",
      L1 "log: debug\n",
      "t.yaml:2:6: log: expected a mapping, got a scalar\n" },
    { "mapping where integer expected",
      "listeners:\n  - address: 127.0.0.1:25\n    max_errors: {a: 1}\n",
      "t.yaml:3:17: listeners[0].max_errors: expected an integer, got a mapping\n" },
    { "bad duration",
      L1 "retry:\n  max_age: 5x\n",
      "t.yaml:3:12: retry.max_age: expected a duration like 30s, 15m, 4h, 5d\n" },
    { "duration without unit",
      L1 "shutdown_timeout: 30\n",
      "t.yaml:2:19: shutdown_timeout: expected a duration like 30s, 15m, 4h, 5d (a unit is"
      " required)\n" },
    { "duration out of bounds",
      L1 "dns: {timeout: 2h}\n",
      "t.yaml:2:16: dns.timeout: must be from 100ms to 1m\n" },
    { "bad size",
      "listeners:\n  - address: 127.0.0.1:25\n    max_message_size: 50MB\n",
      "t.yaml:3:23: listeners[0].max_message_size: expected a size like 1000, 512K, 50M, 1G\n" },
    { "size below minimum",
      "listeners:\n  - address: 127.0.0.1:25\n    max_message_size: 10\n",
      "t.yaml:3:23: listeners[0].max_message_size: must be from 1K to 4G\n" },
    { "negative integer",
      "listeners:\n  - address: 127.0.0.1:25\n    max_recipients: -1\n",
      "t.yaml:3:21: listeners[0].max_recipients: expected an integer from 1 to 100000\n" },
    { "bad boolean",
      L1 "bounce: {enabled: yes}\n",
      "t.yaml:2:19: bounce.enabled: expected true or false\n" },
    { "bad CIDR prefix",
      L1 "relay: {clients: [10.0.0.0/33]}\n",
      "t.yaml:2:19: relay.clients[0]: expected an address or network like 10.0.0.0/8 or"
      " 2001:db8::/32\n" },
    { "bad CIDR address",
      L1 "relay:\n  clients:\n    - 10.0.0.256\n",
      "t.yaml:4:7: relay.clients[0]: expected an address or network like 10.0.0.0/8 or"
      " 2001:db8::/32\n" },
    { "address without port",
      "listeners:\n  - address: 127.0.0.1\n",
      "t.yaml:2:14: listeners[0].address: expected host:port\n" },
    { "IPv6 address without brackets",
      "listeners:\n  - address: '::1:25'\n",
      "t.yaml:2:14: listeners[0].address: expected host:port\n" },
    { "address with a hostname",
      "listeners:\n  - address: mail.example.com:25\n",
      "t.yaml:2:14: listeners[0].address: expected host:port\n" },
    { "bad enum value",
      L1 "log: {level: verbose}\n",
      "t.yaml:2:14: log.level: expected one of: error, warning, info, debug\n" },
    { "bad listener tls",
      "listeners:\n  - address: 127.0.0.1:25\n    tls: yes\n",
      "t.yaml:3:10: listeners[0].tls: expected one of: none, starttls, implicit\n" },
    { "missing listener address",
      "listeners:\n  - name: mx\n",
      "t.yaml:2:5: listeners[0].address: missing required key\n" },
    { "no listeners key",
      "spool: /x\n",
      "t.yaml:1:1: listeners: at least one listener is required\n" },
    { "empty listener list",
      "listeners: []\n",
      "t.yaml:1:12: listeners: at least one listener is required\n" },
    { "duplicate listener names",
      "listeners:\n  - name: mx\n    address: 127.0.0.1:25\n  - name: mx\n    address:"
      " 127.0.0.1:26\n",
      "t.yaml:4:11: listeners[1].name: duplicate listener name \"mx\" (first at line 2)\n" },
    { "generated listener name taken",
      "listeners:\n  - address: 127.0.0.1:25\n  - name: listener0\n    address: 127.0.0.1:26\n",
      "t.yaml:3:11: listeners[1].name: duplicate listener name \"listener0\" (first at line 2)\n" },
    { "same listener address",
      "listeners:\n  - address: 127.0.0.1:25\n  - address: localhost:25\n",
      "t.yaml:3:14: listeners[1].address: same address as listeners[0]\n" },
    { "non-local source IP",
      L1 "delivery:\n  source_ips: [127.0.0.1, 192.0.2.9]\n",
      "t.yaml:3:27: delivery.source_ips[1]: 192.0.2.9 is not a local address\n" },
    { "non-local rule IP",
      L1 "delivery:\n  sources:\n    - domain: example.com\n      ip: 198.51.100.7\n",
      "t.yaml:5:11: delivery.sources[0].ip: 198.51.100.7 is not a local address\n" },
    { "non-local hostnames key",
      L1 "delivery:\n  hostnames: {203.0.113.5: mta.example.com}\n",
      "t.yaml:3:15: delivery.hostnames.203.0.113.5: 203.0.113.5 is not a local address\n" },
    { "source IP not an address",
      L1 "delivery: {source_ips: [mta.example.com]}\n",
      "t.yaml:2:25: delivery.source_ips[0]: \"mta.example.com\" is not an IP address\n" },
    { "invalid hostname",
      L1 "hostname: -bad.example\n",
      "t.yaml:2:11: hostname: \"-bad.example\" is not a valid hostname\n" },
    { "invalid EHLO hostname",
      L1 "delivery: {hostname: mta_1.example.com}\n",
      "t.yaml:2:22: delivery.hostname: \"mta_1.example.com\" is not a valid hostname\n" },
    { "invalid hostnames value",
      L1 "delivery:\n  hostnames: {127.0.0.1: bad..name}\n",
      "t.yaml:3:26: delivery.hostnames.127.0.0.1: \"bad..name\" is not a valid hostname\n" },
    { "bad route via",
      L1 "routes:\n  - domain: example.com\n    via: smtp:[10.1.1.1]:0\n",
      "t.yaml:4:10: routes[0].via: the port must be a number from 1 to 65535\n" },
    { "unknown route transport",
      L1 "routes:\n  - domain: example.com\n    via: http://x\n",
      "t.yaml:4:10: routes[0].via: expected mx, smtp:[host]:port, smtp:host:port,"
      " lmtp:[host]:port or lmtp:unix:/path\n" },
    { "route without via",
      L1 "routes:\n  - domain: example.com\n",
      "t.yaml:3:5: routes[0].via: missing required key\n" },
    { "duplicate route",
      L1 "routes:\n  - {domain: a.example, via: mx}\n  - {domain: A.example, via: mx}\n",
      "t.yaml:4:14: routes[1].domain: duplicate route for \"a.example\" (first at line 3)\n" },
    { "listener names an unknown milter",
      "listeners:\n  - address: 127.0.0.1:25\n    milters: [dkim]\n",
      "t.yaml:3:15: listeners[0].milters[0]: unknown milter \"dkim\" (not in milters)\n" },
    { "bad milter socket",
      L1 "milters:\n  - name: dkim\n    socket: tcp:8891\n",
      "t.yaml:4:13: milters[0].socket: expected unix:/path, inet:port@host or inet6:port@host\n" },
    { "duplicate milter name",
      L1 "milters:\n  - {name: a, socket: unix:/a}\n  - {name: a, socket: unix:/b}\n",
      "t.yaml:4:12: milters[1].name: duplicate milter name \"a\" (first at line 3)\n" },
    { "starttls without certificate",
      "listeners:\n  - address: 127.0.0.1:25\n    tls: starttls\n",
      "t.yaml:3:10: listeners[0].tls: starttls needs tls.cert and tls.key\n" },
    { "certificate without key",
      L1 "tls:\n  cert: /etc/cert.pem\n",
      "t.yaml:3:3: tls.key: required with tls.cert\n" },
    { "auth without users file",
      "listeners:\n  - address: 127.0.0.1:25\n    auth: required\n",
      "t.yaml:3:11: listeners[0].auth: required needs auth.users_file\n" },
    { "auth without tls",
      "listeners:\n  - address: 127.0.0.1:25\n    auth: optional\nauth: {users_file: /u}\n",
      "t.yaml:3:11: listeners[0].auth: optional needs tls: starttls or implicit, or"
      " auth.allow_plaintext: true\n" },
    { "source rule with ip and pool",
      L1 "delivery:\n  sources:\n    - ip: 127.0.0.2\n      pool: [127.0.0.3]\n",
      "t.yaml:5:13: delivery.sources[0].pool: set either ip or pool, not both\n" },
    { "source rule naming unknown listener",
      L1 "delivery:\n  sources:\n    - listener: mx\n      ip: 127.0.0.2\n",
      "t.yaml:4:17: delivery.sources[0].listener: unknown listener \"mx\"\n" },
    { "empty retry schedule",
      L1 "retry: {schedule: []}\n",
      "t.yaml:2:19: retry.schedule: expected at least one duration\n" },
    { "plugin config value is a list",
      L1 "plugins:\n  - path: p.so\n    config: {a: [1]}\n",
      "t.yaml:4:17: plugins[0].config.a: expected a scalar, got a list\n" },
    { "plugin without path",
      L1 "plugins:\n  - config: {a: 1}\n",
      "t.yaml:3:5: plugins[0].path: missing required key\n" },
    { "empty string",
      L1 "spool: ''\n",
      "t.yaml:2:8: spool: expected a non-empty string\n" },
    { "NUL byte",
      L1 "spool: \"a\\0b\"\n",
      "t.yaml:2:8: spool: contains a NUL byte\n" },
    { "control character",
      L1 "bounce: {from_name: \"a\\tb\"}\n",
      "t.yaml:2:21: bounce.from_name: contains a control character\n" },
    { "top level is a list",
      "- a\n- b\n",
      "t.yaml:1:1: expected a mapping of settings, got a list\n" },
    { "alias",
      L1 "spool: &s /x\nhttp: {listen: *s}\n",
      "t.yaml:3:16: syntax error: aliases (*s) are not supported; quote values that start with"
      " '*', like \"*:25\"\n" },
    { "two documents",
      L1 "---\nlisteners: [{address: 127.0.0.1:25}]\n",
      "t.yaml:2:1: syntax error: expected a single YAML document\n" },
    { "YAML syntax error",
      "listeners:\n  - address: 127.0.0.1:25\n    tls: [none\nspool: /x\n",
      "t.yaml:4:6: syntax error: did not find expected ',' or ']' (while parsing a flow"
      " sequence at line 3)\n" },
    { "YAML bad indentation",
      "listeners:\n  - address: 127.0.0.1:25\n   name: x\n",
      "t.yaml:3:4: syntax error: did not find expected '-' indicator (while parsing a block"
      " collection at line 2)\n" },
    { "unquoted IPv6 in flow list",
      L1 "relay: {clients: [::1]}\n",
      "t.yaml:2:19: syntax error: did not find expected node content (while parsing a flow node"
      " at line 2); quote values that start with ':', like \"::1\"\n" },
    { "tab indentation",
      "listeners:\n\t- address: 127.0.0.1:25\n",
      "t.yaml:2:1: syntax error: found character that cannot start any token (while scanning"
      " for the next token at line 2); indent with spaces, not tabs\n" },
    { "invalid UTF-8",
      L1 "spool: /x\xff""\n",
      "t.yaml:2:10: syntax error: invalid leading UTF-8 octet\n" },
    { "relay domain wildcard all",
      L1 "relay: {domains: ['*']}\n",
      "t.yaml:2:19: relay.domains[0]: \"*\" is not a valid domain\n" },
    { "bad listener name",
      "listeners:\n  - name: 'my listener'\n    address: 127.0.0.1:25\n",
      "t.yaml:2:11: listeners[0].name: expected a name of at most 64 letters, digits, '-', '_'"
      " or '.'\n" },
    { "bad http listen",
      L1 "http: {listen: 8025}\n",
      "t.yaml:2:16: http.listen: expected host:port\n" },
    { "bad resolver",
      L1 "dns: {resolvers: [127.0.0.1]}\n",
      "t.yaml:2:19: dns.resolvers[0]: expected host:port\n" },
    { "null list item",
      "listeners:\n  -\n",
      "t.yaml:2:4: listeners[0]: expected a mapping, got an empty value\n" },
    { "null required value",
      "listeners:\n  - address:\n",
      "t.yaml:2:13: listeners[0].address: missing value\n" },
};
/* clang-format on */

static void
test_config_errors_name_line_column_and_key(void **state)
{
    (void)state;
    for (size_t i = 0; i < ARRAY_SIZE(error_cases); i++) {
        const struct error_case *t = &error_cases[i];
        char *got = load_err(t->yaml, strlen(t->yaml));
        if (strcmp(got, t->want) != 0)
            fail_msg("%s: got \"%s\", want \"%s\"", t->label, got, t->want);
        free(got);
    }
}

/* A file's mistakes are all reported in one run, in file order. */
static void
test_config_collects_several_errors_in_order(void **state)
{
    (void)state;
    static const char yaml[] = "listeners:\n"
                               "  - address: 127.0.0.1\n"
                               "    max_errors: 0\n"
                               "retry: {max_age: 5x}\n"
                               "bogus: 1\n"
                               "log: {level: loud}\n";
    char *got = load_err(yaml, sizeof(yaml) - 1);
    CHECK_STR("errors", got,
              "t.yaml:2:14: listeners[0].address: expected host:port\n"
              "t.yaml:3:17: listeners[0].max_errors: expected an integer from 1 to 1000\n"
              "t.yaml:4:18: retry.max_age: expected a duration like 30s, 15m, 4h, 5d\n"
              "t.yaml:5:1: bogus: unknown key\n"
              "t.yaml:6:14: log.level: expected one of: error, warning, info, debug\n");
    free(got);
}

static void
test_config_error_count_is_bounded(void **state)
{
    (void)state;
    struct buf b;
    buf_init(&b);
    buf_append_str(&b, L1);
    for (int i = 0; i < 150; i++)
        buf_printf(&b, "bogus%d: 1\n", i);
    char *yaml = buf_steal(&b, NULL);
    char *got = load_err(yaml, strlen(yaml));
    size_t lines = 0;
    for (const char *p = got; *p; p++)
        lines += *p == '\n';
    CHECK_INT("error lines", lines, 101);
    const char *last = got + strlen(got) - 1;
    while (last > got && last[-1] != '\n')
        last--;
    CHECK_STR("last line", last, "t.yaml: 50 more errors not shown\n");
    free(got);
    free(yaml);
}

static void
test_config_local_source_ips_are_accepted(void **state)
{
    (void)state;
    struct petrel_config *c = load_ok(L1 "delivery:\n"
                                         "  source_ips: [127.0.0.1, 127.0.0.200, 0::1]\n"
                                         "  hostnames: {127.0.0.200: mta.example.com}\n");
    CHECK_INT("source_ips.n", c->delivery.source_ips.n, 3);
    CHECK_STR("source_ips[2] (normalized)", c->delivery.source_ips.v[2], "::1");
    config_unref(c);
}

static void
test_config_delivery_tls_dane_is_accepted(void **state)
{
    (void)state;
    struct petrel_config *c = load_ok(L1 "delivery:\n  tls: dane\n");
    CHECK_INT("delivery.tls", c->delivery.tls, DELIVERY_TLS_DANE);
    config_unref(c);
}

/* ---- value parsers ------------------------------------------------------- */

static void
test_config_parse_duration(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        bool ok;
        uint64_t ms;
    } cases[] = {
        {"250ms", true, 250},
        {"30s", true, 30000},
        {"15m", true, 900000},
        {"4h", true, 14400000},
        {"5d", true, 432000000},
        {"0s", true, 0},
        {"30", false, 0},
        {"", false, 0},
        {"s", false, 0},
        {"-5s", false, 0},
        {"5 s", false, 0},
        {" 5s", false, 0},
        {"5S", false, 0},
        {"1h30m", false, 0},
        {"5w", false, 0},
        {"1.5h", false, 0},
        {"5ss", false, 0},
        {"+5s", false, 0},
        {"99999999999999999999s", false, 0},
        {"213503982335d", false, 0},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        uint64_t ms = 0;
        bool ok = config_parse_duration(cases[i].in, &ms);
        if (ok != cases[i].ok || (ok && ms != cases[i].ms))
            fail_msg("config_parse_duration(\"%s\"): got %s %llu, want %s %llu", cases[i].in,
                     ok ? "ok" : "error", (unsigned long long)ms, cases[i].ok ? "ok" : "error",
                     (unsigned long long)cases[i].ms);
    }
}

static void
test_config_parse_size(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        bool ok;
        uint64_t bytes;
    } cases[] = {
        {"1000", true, 1000},
        {"512K", true, 524288},
        {"50M", true, 52428800},
        {"1G", true, 1073741824},
        {"0", true, 0},
        {"2k", true, 2048},
        {"", false, 0},
        {"M", false, 0},
        {"50MB", false, 0},
        {"1.5G", false, 0},
        {"-1", false, 0},
        {"1T", false, 0},
        {" 1K", false, 0},
        {"18446744073709551616", false, 0},
        {"17179869184G", false, 0},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        uint64_t bytes = 0;
        bool ok = config_parse_size(cases[i].in, &bytes);
        if (ok != cases[i].ok || (ok && bytes != cases[i].bytes))
            fail_msg("config_parse_size(\"%s\"): got %s %llu, want %s %llu", cases[i].in,
                     ok ? "ok" : "error", (unsigned long long)bytes, cases[i].ok ? "ok" : "error",
                     (unsigned long long)cases[i].bytes);
    }
}

static void
test_config_parse_cidr(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        bool ok;
        int family;
        unsigned prefix;
        const char *net; /* the stored network, host bits cleared */
    } cases[] = {
        {"10.0.0.0/8", true, AF_INET, 8, "10.0.0.0"},
        {"1.2.3.4", true, AF_INET, 32, "1.2.3.4"},
        {"10.1.2.3/8", true, AF_INET, 8, "10.0.0.0"},
        {"0.0.0.0/0", true, AF_INET, 0, "0.0.0.0"},
        {"::1", true, AF_INET6, 128, "::1"},
        {"2001:db8::/32", true, AF_INET6, 32, "2001:db8::"},
        {"2001:db8:ffff::1/33", true, AF_INET6, 33, "2001:db8:8000::"},
        {"::ffff:10.0.0.0/104", true, AF_INET, 8, "10.0.0.0"},
        {"10.0.0.0/33", false, 0, 0, NULL},
        {"::/129", false, 0, 0, NULL},
        {"10.0.0.0/", false, 0, 0, NULL},
        {"/8", false, 0, 0, NULL},
        {"10.0.0/8", false, 0, 0, NULL},
        {"10.0.0.0/8x", false, 0, 0, NULL},
        {"10.0.0.0/-1", false, 0, 0, NULL},
        {"10.0.0.0/0008", false, 0, 0, NULL},
        {"example.com/8", false, 0, 0, NULL},
        {"", false, 0, 0, NULL},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct cidr c;
        memset(&c, 0, sizeof(c));
        bool ok = config_parse_cidr(cases[i].in, &c);
        if (ok != cases[i].ok)
            fail_msg("config_parse_cidr(\"%s\"): got %s, want %s", cases[i].in, ok ? "ok" : "error",
                     cases[i].ok ? "ok" : "error");
        if (!ok)
            continue;
        char net[INET6_ADDRSTRLEN];
        inet_ntop(c.family, c.addr, net, sizeof(net));
        if (c.family != cases[i].family || c.prefix != cases[i].prefix ||
            strcmp(net, cases[i].net) != 0)
            fail_msg("config_parse_cidr(\"%s\"): got %s/%u (family %d), want %s/%u (family %d)",
                     cases[i].in, net, c.prefix, c.family, cases[i].net, cases[i].prefix,
                     cases[i].family);
    }
}

static void
test_config_parse_hostport(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        const char *want; /* NULL: error */
    } cases[] = {
        {"127.0.0.1:25", "127.0.0.1:25"},
        {"*:2525", "0.0.0.0:2525"},
        {"localhost:587", "127.0.0.1:587"},
        {"[::1]:25", "[::1]:25"},
        {"[::]:465", "[::]:465"},
        {"0.0.0.0:65535", "0.0.0.0:65535"},
        {"127.0.0.1", NULL},
        {"127.0.0.1:", NULL},
        {"127.0.0.1:0", NULL},
        {"127.0.0.1:65536", NULL},
        {"127.0.0.1:25x", NULL},
        {"::1:25", NULL},
        {"[::1]25", NULL},
        {"[127.0.0.1]:25", NULL},
        {"example.com:25", NULL},
        {":25", NULL},
        {"[]:25", NULL},
        {"127.0.0.1:-25", NULL},
        {"[::1:25", NULL},
        {"127.0.0.1:000025", NULL},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct sockaddr_storage ss;
        socklen_t len = 0;
        char got[128];
        bool ok = config_parse_hostport(cases[i].in, &ss, &len);
        if (ok != (cases[i].want != NULL))
            fail_msg("config_parse_hostport(\"%s\"): got %s, want %s", cases[i].in,
                     ok ? "ok" : "error", cases[i].want ? cases[i].want : "error");
        if (ok) {
            CHECK_STR(cases[i].in, sockaddr_text(&ss, got, sizeof(got)), cases[i].want);
            CHECK_INT(cases[i].in, len,
                      ss.ss_family == AF_INET ? sizeof(struct sockaddr_in)
                                              : sizeof(struct sockaddr_in6));
        }
    }
}

static void
test_config_cidr_match(void **state)
{
    (void)state;
    static const struct {
        const char *cidr;
        const char *addr; /* an IPv4 or IPv6 literal */
        bool want;
    } cases[] = {
        {"10.0.0.0/8", "10.1.2.3", true},
        {"10.0.0.0/8", "11.0.0.1", false},
        {"192.168.1.128/25", "192.168.1.200", true},
        {"192.168.1.128/25", "192.168.1.127", false},
        {"1.2.3.4", "1.2.3.4", true},
        {"1.2.3.4", "1.2.3.5", false},
        {"0.0.0.0/0", "203.0.113.9", true},
        {"0.0.0.0/0", "2001:db8::1", false},
        {"::1/128", "::1", true},
        {"::1/128", "::2", false},
        {"2001:db8::/32", "2001:db8:1234::1", true},
        {"2001:db8::/33", "2001:db8:8000::1", false},
        {"::/0", "2001:db8::1", true},
        {"10.0.0.0/8", "::ffff:10.9.9.9", true}, /* v4-mapped client */
        {"10.0.0.0/8", "::ffff:11.9.9.9", false},
        {"127.0.0.0/8", "::ffff:127.0.0.1", true},
        {"::ffff:10.0.0.0/104", "10.2.3.4", true}, /* v4-mapped CIDR */
        {"2001:db8::/32", "10.0.0.1", false},
        {"10.0.0.0/8", "::a00:1", false}, /* IPv4-compatible is not mapped */
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct cidr c;
        assert_true(config_parse_cidr(cases[i].cidr, &c));
        struct sockaddr_storage ss;
        memset(&ss, 0, sizeof(ss));
        struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
        if (inet_pton(AF_INET, cases[i].addr, &sin->sin_addr) == 1)
            sin->sin_family = AF_INET;
        else if (inet_pton(AF_INET6, cases[i].addr, &sin6->sin6_addr) == 1)
            sin6->sin6_family = AF_INET6;
        else
            fail_msg("bad test address %s", cases[i].addr);
        bool got = cidr_match(&c, (const struct sockaddr *)&ss);
        if (got != cases[i].want)
            fail_msg("cidr_match(%s, %s): got %d, want %d", cases[i].cidr, cases[i].addr, got,
                     cases[i].want);
    }
}

static void
test_config_cidr_list_match(void **state)
{
    (void)state;
    struct petrel_config *c = load_ok(L1);
    struct sockaddr_in sin = {.sin_family = AF_INET};
    struct sockaddr_in6 sin6 = {.sin6_family = AF_INET6};
    inet_pton(AF_INET, "127.3.4.5", &sin.sin_addr);
    assert_true(cidr_list_match(&c->relay.clients, (struct sockaddr *)&sin));
    inet_pton(AF_INET, "192.0.2.1", &sin.sin_addr);
    assert_false(cidr_list_match(&c->relay.clients, (struct sockaddr *)&sin));
    inet_pton(AF_INET6, "::1", &sin6.sin6_addr);
    assert_true(cidr_list_match(&c->relay.clients, (struct sockaddr *)&sin6));
    inet_pton(AF_INET6, "::ffff:127.0.0.1", &sin6.sin6_addr);
    assert_true(cidr_list_match(&c->relay.clients, (struct sockaddr *)&sin6));
    inet_pton(AF_INET6, "2001:db8::1", &sin6.sin6_addr);
    assert_false(cidr_list_match(&c->relay.clients, (struct sockaddr *)&sin6));
    struct cidr_list empty = {0};
    assert_false(cidr_list_match(&empty, (struct sockaddr *)&sin6));
    config_unref(c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config_full_converts_every_section),
        cmocka_unit_test(test_config_reference_file_loads),
        cmocka_unit_test(test_config_embedded_default_loads),
        cmocka_unit_test(test_config_missing_file_is_an_error),
        cmocka_unit_test(test_config_relay_clients_default_when_section_lacks_them),
        cmocka_unit_test(test_config_refcount_keeps_config_alive),
        cmocka_unit_test(test_config_defaults_come_from_the_table),
        cmocka_unit_test(test_config_reference_documents_every_default),
        cmocka_unit_test(test_config_errors_name_line_column_and_key),
        cmocka_unit_test(test_config_collects_several_errors_in_order),
        cmocka_unit_test(test_config_error_count_is_bounded),
        cmocka_unit_test(test_config_local_source_ips_are_accepted),
        cmocka_unit_test(test_config_delivery_tls_dane_is_accepted),
        cmocka_unit_test(test_config_parse_duration),
        cmocka_unit_test(test_config_parse_size),
        cmocka_unit_test(test_config_parse_cidr),
        cmocka_unit_test(test_config_parse_hostport),
        cmocka_unit_test(test_config_cidr_match),
        cmocka_unit_test(test_config_cidr_list_match),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
