/*
 * dns_cli — `petrel dns-lookup DOMAIN [-c FILE]`: resolves a domain the way
 * delivery does (dns.h: MX → exchangers → A/AAAA, implicit MX, null MX),
 * with the configured resolvers and timeout, and prints the answer:
 *   example.test: MX
 *     10 mx1.example.test 127.0.0.5 ::1
 *     20 mx2.example.test 127.0.0.6
 * ("implicit MX (no MX record)" or "host" instead of "MX", " (DNSSEC
 * secure)" appended when every answer was validated), or the failure as
 * delivery would see it:
 *   example.test: permanent failure (5.1.10): null MX
 *   example.test: temporary failure (4.4.3): timeout
 */
#ifndef PETREL_DNS_CLI_H
#define PETREL_DNS_CLI_H

#include <stdbool.h>
#include <stdio.h>

struct petrel_config;

/* Runs a private event loop until the lookup ends (bounded by
 * cfg->dns.timeout). host_only: A/AAAA of the name itself (a smarthost),
 * no MX lookup. The answer or the lookup failure goes to out; set-up
 * errors go to err, prefixed "petrel: ". Returns 0 if addresses were
 * found, 1 otherwise. */
int dns_cli_lookup(const struct petrel_config *cfg, const char *domain, bool host_only, FILE *out,
                   FILE *err);

#endif
