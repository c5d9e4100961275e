/*
 * source — pure: which local IP a delivery binds to and which name it says
 * in EHLO. In order, first match wins (README "Source IP and EHLO"):
 *   1. the client's override stored with the message (XBIND);
 *   2. the select_source hook's answer (Lua, then plugins), which the caller
 *      obtains beforehand (asynchronously) and checks with source_check_hook;
 *   3. delivery.sources rules in file order: every criterion a rule carries
 *      must match (sender domain — exact or "*.example.com" —, listener_ip,
 *      listener, recipient_domain, client_cidr); it gives ip, a pool to pick
 *      from, or only a hostname;
 *   4. a random address of delivery.source_ips, or (not configured) of the
 *      machine's own non-loopback addresses.
 * The EHLO name is the rule's/override's hostname, else
 * delivery.hostnames[ip], else delivery.hostname, else hostname.
 *
 * Selection runs before DNS, so a choice holds one address per family
 * (random picks draw one IPv4 and one IPv6 candidate); the delivery binds
 * the one matching each MX address. An explicit address (XBIND, a rule's
 * ip) leaves the other family empty: MX addresses of that family are then
 * not used.
 */
#ifndef PETREL_SOURCE_H
#define PETREL_SOURCE_H

#include <stdbool.h>
#include <stddef.h>

struct petrel_config;

#define SOURCE_IP_SIZE 46

enum source_why {
    SOURCE_XBIND,   /* client override */
    SOURCE_LUA,     /* policy hook */
    SOURCE_RULE,    /* delivery.sources[rule - 1] */
    SOURCE_RANDOM,  /* delivery.source_ips or the machine's addresses */
    SOURCE_SYSTEM,  /* no address at all: the kernel chooses */
};

enum { SOURCE_V4 = 0, SOURCE_V6 = 1 };

struct source_choice {
    char ip[2][SOURCE_IP_SIZE];  /* per family ([SOURCE_V4], [SOURCE_V6]); "" = none */
    char hostname[2][256];       /* EHLO name going with each address */
    bool any;                    /* SOURCE_SYSTEM: no bind, the kernel picks */
    enum source_why why;
    unsigned rule;               /* 1-based, for SOURCE_RULE */
};

/* What selection looks at; every string borrowed, NULL = unknown. */
struct source_query {
    const char *sender;          /* envelope sender ("" for <>) */
    const char *rcpt_domain;
    const char *listener;        /* listener name the message came in on */
    const char *listener_ip;     /* local address it came in on */
    const char *client_ip;       /* submitting client */
    const char *xbind_ip;        /* override, or NULL */
    const char *xbind_hostname;  /* or NULL */
    const char *hook_ip;         /* select_source hook's address (checked), or NULL */
    const char *hook_hostname;   /* its EHLO name, or NULL: delivery.hostnames / hostname */
};

/* The machine's own non-loopback addresses (gathered by the caller at
 * start-up with uv_interface_addresses). */
struct source_locals {
    char (*v)[SOURCE_IP_SIZE];   /* borrowed */
    size_t n;
};

/* rnd(n) returns a value in [0, n); NULL uses arc4random_uniform. */
void source_select(const struct petrel_config *cfg, const struct source_locals *locals,
                   const struct source_query *q, unsigned (*rnd)(unsigned n),
                   struct source_choice *out);

/* The EHLO name for ip when nothing names one (step 4's rule). */
const char *source_hostname_for(const struct petrel_config *cfg, const char *ip);

/* XBIND check: NULL if ip may be used as an override, else the reason
 * ("not in the configured source pool", "not a local address"). When any
 * source address is configured (source_ips, rule ip or pool) the override
 * must be one of them; otherwise any local address is allowed. */
const char *source_check_override(const struct petrel_config *cfg, const char *ip);

/* select_source hook answer check: NULL if ip (with hostname, which may
 * be NULL) may be used, else the reason ("not an IP address", "not a local
 * address", "hostname is not a valid domain name"). Unlike an XBIND
 * override the address need not be in a configured pool — the policy is
 * the administrator's — but it must be local, as every configured source
 * address must. */
const char *source_check_hook(const char *ip, const char *hostname);

/* "xbind", "lua", "rule 2", "random", "system" into out. */
void source_why_text(const struct source_choice *c, char *out, size_t size);

#endif
