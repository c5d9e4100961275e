/*
 * route — pure: maps a recipient domain to its next hop. Parses the `via`
 * strings of the config's `routes:` (and, later, of the Lua `route` hook),
 * picks the first route whose domain pattern matches, and names each
 * destination with a stable key for the scheduler's queues.
 *
 * Next-hop semantics are Postfix's (transport(5)): "smtp:[host]:port" goes
 * to host's A/AAAA records, "smtp:host:port" looks up host's MX first. LMTP
 * (RFC 2033) never uses MX records, so "lmtp:host:port" is an address lookup
 * like "lmtp:[host]:port". Owns nothing, allocates nothing; DNS, connecting
 * and the default port are the caller's (scheduler, dns, smtp_client).
 */
#include "route.h"

#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "util.h"

#define ROUTE_HOSTNAME_MAX 253 /* RFC 1035 2.3.4, without the root's dot */
#define ROUTE_LABEL_MAX 63

static const char route_usage[] =
    "expected mx, smtp:[host]:port, smtp:host:port, lmtp:[host]:port or lmtp:unix:/path";

static bool
route_is_ldh(int c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
}

/* A host name: dot-separated LDH labels of 1..63 octets, no label starting
 * or ending with '-', a last label that is not all digits (so that "1.2.3"
 * is not taken for a name), at most 253 octets. The same rule as config's
 * hostnames, so every via config accepts parses here. */
static bool
route_valid_hostname(const char *s, size_t len)
{
    size_t label = 0;
    bool digits = true;
    if (len == 0 || len > ROUTE_HOSTNAME_MAX)
        return false;
    for (size_t i = 0; i <= len; i++) {
        int c = i < len ? (unsigned char)s[i] : '\0';
        if (c == '.' || c == '\0') {
            if (label == 0 || label > ROUTE_LABEL_MAX || s[i - 1] == '-')
                return false;
            if (c == '\0')
                return !digits;
            label = 0;
            digits = true;
        } else if (route_is_ldh(c) && !(c == '-' && label == 0)) {
            digits = digits && c >= '0' && c <= '9';
            label++;
        } else {
            return false;
        }
    }
    return false;
}

/* "1".."65535", at most 5 digits (leading zeros allowed, as config does). */
static bool
route_parse_port(const char *s, unsigned *port)
{
    size_t n = strlen(s);
    unsigned v = 0;
    if (n == 0 || n > 5)
        return false;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return false;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    if (v == 0 || v > 65535)
        return false;
    *port = v;
    return true;
}

/* Writes the normal form of an IP literal (len octets at s) into out:
 * returns AF_INET, AF_INET6, or 0 if s is not an IP address. */
static int
route_normalize_ip(const char *s, size_t len, char *out, size_t size)
{
    char tmp[INET6_ADDRSTRLEN + 1];
    unsigned char addr[16];
    if (len >= sizeof(tmp))
        return 0;
    memcpy(tmp, s, len);
    tmp[len] = '\0';
    int family = AF_INET;
    if (inet_pton(AF_INET, tmp, addr) != 1) {
        family = AF_INET6;
        if (inet_pton(AF_INET6, tmp, addr) != 1)
            return 0;
    }
    if (inet_ntop(family, addr, out, (socklen_t)size) == NULL)
        PANIC("inet_ntop of a parsed address failed");
    return family;
}

/* Stores a lowercased copy of len octets (len < sizeof(out->host)). */
static void
route_set_host(struct route *out, const char *s, size_t len)
{
    if (len >= sizeof(out->host))
        PANIC("host of %zu octets does not fit", len);
    for (size_t i = 0; i < len; i++)
        out->host[i] = (char)ascii_tolower((unsigned char)s[i]);
    out->host[len] = '\0';
}

/* The part after "smtp:" or "lmtp:": "[host]", "[host]:port", "host",
 * "host:port". */
static const char *
route_parse_hostport(const char *s, struct route *out)
{
    const char *host;
    size_t hlen;
    const char *port = NULL; /* after the ':' or NULL */
    bool bracket = s[0] == '[';
    if (bracket) {
        const char *close = strchr(s, ']');
        if (close == NULL)
            return "missing ']' after the host";
        host = s + 1;
        hlen = (size_t)(close - host);
        if (close[1] == ':')
            port = close + 2;
        else if (close[1] != '\0')
            return "expected ':port' after ']'";
    } else {
        const char *colon = strrchr(s, ':');
        host = s;
        hlen = colon != NULL ? (size_t)(colon - s) : strlen(s);
        if (colon != NULL)
            port = colon + 1;
        if (memchr(host, ':', hlen) != NULL)
            return "an IPv6 address needs brackets: [address]:port";
    }
    if (hlen == 0)
        return "empty host";
    if (port != NULL && !route_parse_port(port, &out->port))
        return "the port must be a number from 1 to 65535";

    int family = route_normalize_ip(host, hlen, out->host, sizeof(out->host));
    if (family == AF_INET6 && !bracket)
        return "an IPv6 address needs brackets: [address]:port";
    if (family != 0) {
        out->kind = ROUTE_HOST; /* an address has no MX records */
        return NULL;
    }
    if (!route_valid_hostname(host, hlen))
        return "the host is neither a valid host name nor an IP address";
    route_set_host(out, host, hlen);
    /* Postfix: [] suppresses the MX lookup; LMTP never looks up MX. */
    out->kind = bracket || out->lmtp ? ROUTE_HOST : ROUTE_MX;
    return NULL;
}

const char *
route_parse(const char *via, struct route *out)
{
    memset(out, 0, sizeof(*out));
    out->tls = DELIVERY_TLS_DEFAULT;
    if (strcmp(via, "mx") == 0) {
        out->kind = ROUTE_MX;
        return NULL;
    }
    if (strncmp(via, "lmtp:", 5) == 0)
        out->lmtp = true;
    else if (strncmp(via, "smtp:", 5) != 0)
        return route_usage;
    out->smarthost = true;
    const char *rest = via + 5;
    if (out->lmtp && strncmp(rest, "unix:", 5) == 0) {
        const char *path = rest + 5;
        if (path[0] != '/')
            return "the unix socket path must be absolute";
        if (path[1] == '\0')
            return "the unix socket path names no socket";
        if (!str_copy(out->path, sizeof(out->path), path))
            return "the unix socket path is longer than 107 octets";
        out->kind = ROUTE_UNIX;
        return NULL;
    }
    const char *why = route_parse_hostport(rest, out);
    if (why != NULL) {
        memset(out, 0, sizeof(*out));
        out->tls = DELIVERY_TLS_DEFAULT;
    }
    return why;
}

/* Routes' domain patterns: "*" for everything, "*.example.com" for the
 * subdomains of example.com (not example.com itself), else one domain. */
static bool
route_domain_matches(const char *pattern, const char *domain)
{
    if (strcmp(pattern, "*") == 0)
        return true;
    if (pattern[0] == '*' && pattern[1] == '.') {
        const char *suffix = pattern + 1; /* ".example.com" */
        size_t slen = strlen(suffix);
        size_t dlen = strlen(domain);
        return dlen > slen && ascii_casecmp(domain + dlen - slen, suffix) == 0;
    }
    return ascii_casecmp(pattern, domain) == 0;
}

/* The recipient domain's own destination: its MX, or the address of an
 * address literal (RFC 5321 4.1.3: "[192.0.2.1]", "[IPv6:2001:db8::1]"). */
static void
route_default(const char *domain, struct route *out)
{
    memset(out, 0, sizeof(*out));
    out->tls = DELIVERY_TLS_DEFAULT;
    size_t len = strlen(domain);
    if (len >= sizeof(out->host))
        PANIC("recipient domain of %zu octets (smtp_parse allows 255)", len);
    if (len > 2 && domain[0] == '[' && domain[len - 1] == ']') {
        const char *lit = domain + 1;
        size_t llen = len - 2;
        bool v6 = llen > 5 && ascii_ncasecmp(lit, "IPv6:", 5) == 0;
        if (v6) {
            lit += 5;
            llen -= 5;
        }
        int family = route_normalize_ip(lit, llen, out->host, sizeof(out->host));
        if (family == (v6 ? AF_INET6 : AF_INET)) {
            out->kind = ROUTE_HOST;
            return;
        }
        /* Not a valid literal: left to the MX lookup to fail. */
    }
    out->kind = ROUTE_MX;
    route_set_host(out, domain, len);
}

void
route_for_domain(const struct petrel_config *cfg, const char *domain, struct route *out)
{
    for (size_t i = 0; cfg != NULL && i < cfg->nroutes; i++) {
        const struct route_config *rc = &cfg->routes[i];
        if (!route_domain_matches(rc->domain, domain))
            continue;
        const char *why = route_parse(rc->via, out);
        if (why != NULL)
            PANIC("routes[%zu] (line %d): via \"%s\" passed config but not route_parse: %s", i,
                  rc->line, rc->via, why);
        if (out->kind == ROUTE_MX && out->host[0] == '\0')
            route_default(domain, out); /* via: mx */
        out->tls = (int)rc->tls;
        return;
    }
    route_default(domain, out);
}

void
route_key(const struct route *r, unsigned default_port, char *out, size_t size)
{
    const char *proto = r->lmtp ? "lmtp" : "smtp";
    unsigned port = r->port != 0 ? r->port : r->lmtp ? ROUTE_LMTP_PORT : default_port;
    int n;
    switch (r->kind) {
    case ROUTE_UNIX:
        n = snprintf(out, size, "lmtp:unix:%s", r->path);
        break;
    case ROUTE_HOST:
        n = snprintf(out, size, "%s:[%s]:%u", proto, r->host, port);
        break;
    case ROUTE_MX:
        if (r->smarthost || r->lmtp)
            n = snprintf(out, size, "%s:%s:%u", proto, r->host, port);
        else if (port == default_port)
            n = snprintf(out, size, "mx:%s", r->host);
        else
            n = snprintf(out, size, "mx:%s:%u", r->host, port);
        break;
    default:
        PANIC("route kind %d", (int)r->kind);
    }
    static const char *const tls_names[] = {"none", "opportunistic", "required", "dane"};
    if (n >= 0 && (size_t)n < size && r->tls >= 0 && r->tls < (int)ARRAY_SIZE(tls_names))
        n += snprintf(out + n, size - (size_t)n, " tls=%s", tls_names[r->tls]);
    if (n < 0 || (size_t)n >= size)
        PANIC("route key buffer of %zu octets too small", size);
}
