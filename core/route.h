/*
 * route — pure: which destination a recipient goes to. The config's
 * `routes:` (first match wins: exact domain, "*.example.com" for
 * subdomains, "*" for everything) or, by default, the recipient domain's MX.
 * Postfix semantics for next hops: "smtp:[host]:port" connects to host's
 * A/AAAA (no MX lookup); "smtp:host:port" looks up host's MX first.
 */
#ifndef PETREL_ROUTE_H
#define PETREL_ROUTE_H

#include <stdbool.h>
#include <stddef.h>

struct petrel_config;

enum route_kind {
    ROUTE_MX,   /* MX of `host` (the recipient domain, or a smarthost without []) */
    ROUTE_HOST, /* A/AAAA of `host` ("[host]") or an IP literal */
    ROUTE_UNIX, /* unix-domain socket `path` (LMTP only) */
};

struct route {
    enum route_kind kind;
    bool lmtp;      /* LMTP (RFC 2033) instead of SMTP */
    bool smarthost; /* from routes: (not the recipient's own MX) */
    char host[256]; /* domain, hostname or IP literal (no brackets) */
    unsigned port;  /* 0: delivery.port (SMTP) / 24 (LMTP) */
    char path[108]; /* ROUTE_UNIX */
    int tls;        /* enum delivery_tls from routes[].tls; DELIVERY_TLS_DEFAULT: delivery.tls */
};

/* LMTP has no well-known port (RFC 2033 section 5 forbids 25); 24 is the
 * conventional one (Dovecot, Cyrus) and fills port 0 of LMTP routes. */
#define ROUTE_LMTP_PORT 24

/* Size of a buffer that holds any route_key(): "lmtp:[<255>]:65535",
 * a " tls=opportunistic" suffix, NUL. */
#define ROUTE_KEY_MAX 292

/* Parses a `via` value: "mx", "smtp:[host]:port", "smtp:host:port",
 * "smtp:[host]", "lmtp:[host]:port", "lmtp:host:port", "lmtp:unix:/path".
 * Returns NULL, or a reason for config errors. "mx" leaves host empty.
 * The port is optional everywhere (0). host is a hostname (LDH labels,
 * ≤ 253 octets, lowercased), an IPv4 literal, or — inside [] only — an
 * IPv6 literal; IP literals are stored in their normal form (inet_ntop).
 * "smtp:host" without [] looks up host's MX (ROUTE_MX); an IP literal
 * never does (ROUTE_HOST). LMTP never uses MX records: "lmtp:host:port"
 * is ROUTE_HOST like "lmtp:[host]:port". The unix socket path must be
 * absolute and at most 107 octets (sun_path). The reason is a static
 * string; *out is zeroed first and only meaningful on success. */
const char *route_parse(const char *via, struct route *out);

/* The route for a recipient domain (ASCII-lowercased by the caller or not:
 * matching is case-insensitive). cfg may be NULL (no routes). A route with
 * via "mx", or no matching route, gives the domain's own MX (host = the
 * domain, lowercased; smarthost false); an address-literal domain
 * ("[192.0.2.1]", "[IPv6:2001:db8::1]", RFC 5321 4.1.3) gives ROUTE_HOST to
 * that address. The domain must fit host (≤ 255 octets, as smtp_parse
 * guarantees) and every configured via must pass route_parse(): PANICs
 * otherwise. */
void route_for_domain(const struct petrel_config *cfg, const char *domain, struct route *out);

/* A stable key naming the destination queue (a route with its own TLS
 * policy gets a " tls=<policy>" suffix: two policies never share a
 * queue or a connection), e.g. "mx:example.org",
 * "smtp:[192.0.2.1]:25", "lmtp:unix:/run/dovecot/lmtp". Forms:
 *   recipient MX      "mx:<domain>" ("mx:<domain>:<port>" if port ≠ default)
 *   smarthost MX      "smtp:<host>:<port>"
 *   host / IP         "smtp:[<host>]:<port>" or "lmtp:[<host>]:<port>"
 *   unix socket       "lmtp:unix:<path>"
 * Port 0 is filled with default_port (delivery.port) for SMTP and with
 * ROUTE_LMTP_PORT for LMTP, so "smtp:[h]" and "smtp:[h]:25" share a key.
 * size should be ROUTE_KEY_MAX; a buffer too small for the key PANICs. */
void route_key(const struct route *r, unsigned default_port, char *out, size_t size);

#endif
