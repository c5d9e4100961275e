/*
 * source — outgoing source address and EHLO name selection (see source.h).
 * Pure: no I/O except config_ip_local_errno() for XBIND and hook answer
 * checks.
 */
#include "source.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <netinet/in.h>
#include <arpa/inet.h>

#include "config.h"
#include "smtp_parse.h"
#include "util.h"

static unsigned
source_rnd_default(unsigned n)
{
    return n ? arc4random_uniform(n) : 0;
}

const char *
source_hostname_for(const struct petrel_config *cfg, const char *ip)
{
    for (size_t i = 0; ip && i < cfg->delivery.nhostnames; i++)
        if (strcmp(cfg->delivery.hostnames[i].ip, ip) == 0)
            return cfg->delivery.hostnames[i].hostname;
    return cfg->delivery.hostname ? cfg->delivery.hostname : cfg->hostname;
}

/* "example.com" matches exactly; "*.example.com" matches its subdomains. */
static bool
source_domain_match(const char *pattern, const char *domain)
{
    if (domain == NULL)
        return false;
    if (pattern[0] == '*' && pattern[1] == '.') {
        size_t pl = strlen(pattern + 1), dl = strlen(domain);
        return dl > pl && ascii_casecmp(domain + dl - pl, pattern + 1) == 0;
    }
    return ascii_casecmp(pattern, domain) == 0;
}

static bool
source_ip_to_sockaddr(const char *ip, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, ip, &s4->sin_addr) == 1) {
        s4->sin_family = AF_INET;
        return true;
    }
    if (inet_pton(AF_INET6, ip, &s6->sin6_addr) == 1) {
        s6->sin6_family = AF_INET6;
        return true;
    }
    return false;
}

static bool
source_rule_matches(const struct source_rule *r, const struct source_query *q)
{
    if (r->domain) {
        char dom[SMTP_DOMAIN_MAX + 1] = "";
        if (q->sender) {
            struct span d = smtp_addr_domain(q->sender);
            snprintf(dom, sizeof(dom), "%.*s", (int)d.len, d.p);
        }
        if (!source_domain_match(r->domain, dom))
            return false;
    }
    if (r->recipient_domain && !source_domain_match(r->recipient_domain, q->rcpt_domain))
        return false;
    if (r->listener && (q->listener == NULL || strcmp(r->listener, q->listener) != 0))
        return false;
    if (r->listener_ip) {
        struct sockaddr_storage a, b;
        if (q->listener_ip == NULL || !source_ip_to_sockaddr(r->listener_ip, &a)
            || !source_ip_to_sockaddr(q->listener_ip, &b))
            return false;
        struct cidr c = { .family = a.ss_family,
                          .prefix = a.ss_family == AF_INET ? 32 : 128 };
        if (a.ss_family == AF_INET)
            memcpy(c.addr, &((struct sockaddr_in *)&a)->sin_addr, 4);
        else
            memcpy(c.addr, &((struct sockaddr_in6 *)&a)->sin6_addr, 16);
        if (!cidr_match(&c, (const struct sockaddr *)&b))
            return false;
    }
    if (r->client_cidr.n > 0) {
        struct sockaddr_storage b;
        if (q->client_ip == NULL || !source_ip_to_sockaddr(q->client_ip, &b)
            || !cidr_list_match(&r->client_cidr, (const struct sockaddr *)&b))
            return false;
    }
    return true;
}

static int
source_family(const char *ip)
{
    return strchr(ip, ':') ? SOURCE_V6 : SOURCE_V4;
}

/* Puts ip (and its EHLO name) into its family's slot. */
static void
source_put(struct source_choice *out, const char *ip, const char *hostname,
           const struct petrel_config *cfg)
{
    int f = source_family(ip);
    if (!str_copy(out->ip[f], sizeof(out->ip[f]), ip))
        out->ip[f][0] = '\0';
    const char *h = hostname ? hostname : source_hostname_for(cfg, ip);
    if (!str_copy(out->hostname[f], sizeof(out->hostname[f]), h))
        out->hostname[f][0] = '\0';
}

/* One random address per family out of list (n entries). */
static void
source_pick(struct source_choice *out, char *const *list, size_t n, unsigned (*rnd)(unsigned),
            const char *hostname, const struct petrel_config *cfg)
{
    for (int f = SOURCE_V4; f <= SOURCE_V6; f++) {
        size_t count = 0;
        for (size_t i = 0; i < n; i++)
            count += source_family(list[i]) == f;
        if (count == 0)
            continue;
        size_t want = rnd((unsigned)count);
        for (size_t i = 0; i < n; i++) {
            if (source_family(list[i]) != f)
                continue;
            if (want-- == 0) {
                source_put(out, list[i], hostname, cfg);
                break;
            }
        }
    }
}

/* Step 4: random configured or local addresses, else the kernel's. */
static void
source_random(const struct petrel_config *cfg, const struct source_locals *locals,
              unsigned (*rnd)(unsigned), const char *hostname, struct source_choice *out)
{
    const struct str_list *pool = &cfg->delivery.source_ips;
    out->why = SOURCE_RANDOM;
    if (pool->n > 0) {
        source_pick(out, pool->v, pool->n, rnd, hostname, cfg);
        return;
    }
    if (locals && locals->n > 0) {
        char **list = xcalloc(locals->n, sizeof(*list));
        for (size_t i = 0; i < locals->n; i++)
            list[i] = locals->v[i];
        source_pick(out, list, locals->n, rnd, hostname, cfg);
        free(list);
        /* a family the machine has no public address of: let the kernel pick */
        out->any = out->ip[SOURCE_V4][0] == '\0' || out->ip[SOURCE_V6][0] == '\0';
        return;
    }
    out->why = SOURCE_SYSTEM;
    out->any = true;
    const char *h = hostname ? hostname : source_hostname_for(cfg, NULL);
    for (int f = SOURCE_V4; f <= SOURCE_V6; f++)
        if (!str_copy(out->hostname[f], sizeof(out->hostname[f]), h))
            out->hostname[f][0] = '\0';
}

void
source_select(const struct petrel_config *cfg, const struct source_locals *locals,
              const struct source_query *q, unsigned (*rnd)(unsigned n),
              struct source_choice *out)
{
    if (rnd == NULL)
        rnd = source_rnd_default;
    memset(out, 0, sizeof(*out));
    if (q->xbind_ip && q->xbind_ip[0]) {
        source_put(out, q->xbind_ip,
                   q->xbind_hostname && q->xbind_hostname[0] ? q->xbind_hostname : NULL, cfg);
        out->why = SOURCE_XBIND;
        return;
    }
    if (q->hook_ip && q->hook_ip[0]) {
        source_put(out, q->hook_ip,
                   q->hook_hostname && q->hook_hostname[0] ? q->hook_hostname : NULL, cfg);
        out->why = SOURCE_LUA;
        return;
    }
    for (size_t i = 0; i < cfg->delivery.nsources; i++) {
        const struct source_rule *r = &cfg->delivery.sources[i];
        if (!source_rule_matches(r, q))
            continue;
        if (r->ip)
            source_put(out, r->ip, r->hostname, cfg);
        else if (r->pool.n > 0)
            source_pick(out, r->pool.v, r->pool.n, rnd, r->hostname, cfg);
        else /* a rule naming only the EHLO name: the address is step 4's */
            source_random(cfg, locals, rnd, r->hostname, out);
        out->why = SOURCE_RULE;
        out->rule = (unsigned)i + 1;
        return;
    }
    source_random(cfg, locals, rnd, NULL, out);
}

static bool
source_list_has(const struct str_list *l, const char *ip)
{
    for (size_t i = 0; i < l->n; i++)
        if (strcmp(l->v[i], ip) == 0)
            return true;
    return false;
}

const char *
source_check_override(const struct petrel_config *cfg, const char *ip)
{
    bool configured = cfg->delivery.source_ips.n > 0;
    bool listed = source_list_has(&cfg->delivery.source_ips, ip);
    for (size_t i = 0; i < cfg->delivery.nsources; i++) {
        const struct source_rule *r = &cfg->delivery.sources[i];
        if (r->ip) {
            configured = true;
            listed = listed || strcmp(r->ip, ip) == 0;
        }
        if (r->pool.n > 0) {
            configured = true;
            listed = listed || source_list_has(&r->pool, ip);
        }
    }
    if (configured)
        return listed ? NULL : "not in the configured source pool";
    return config_ip_local_errno(ip) == 0 ? NULL : "not a local address";
}

const char *
source_check_hook(const char *ip, const char *hostname)
{
    struct sockaddr_storage ss;
    if (ip == NULL || strlen(ip) >= SOURCE_IP_SIZE || !source_ip_to_sockaddr(ip, &ss))
        return "not an IP address";
    if (hostname != NULL && hostname[0] != '\0'
        && !smtp_valid_domain(hostname, strlen(hostname), false))
        return "hostname is not a valid domain name";
    return config_ip_local_errno(ip) == 0 ? NULL : "not a local address";
}

void
source_why_text(const struct source_choice *c, char *out, size_t size)
{
    switch (c->why) {
    case SOURCE_XBIND:
        snprintf(out, size, "xbind");
        break;
    case SOURCE_LUA:
        snprintf(out, size, "lua");
        break;
    case SOURCE_RULE:
        snprintf(out, size, "rule %u", c->rule);
        break;
    case SOURCE_RANDOM:
        snprintf(out, size, "random");
        break;
    case SOURCE_SYSTEM:
        snprintf(out, size, "system");
        break;
    }
}
