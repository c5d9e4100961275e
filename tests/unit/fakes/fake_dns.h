/* fake_dns — stands in for core/dns.c in engine tests (scheduler, client):
 * canned answers registered by the test, completed when the test says so.
 * It provides the engine-facing part of dns.h (dns_open, dns_close,
 * dns_resolve_mx, dns_resolve_host, dns_cancel, dns_sort_mx,
 * dns_status_esc, dns_status_name, dns_result_reset), not the internal
 * answer-interpretation helpers that only test_dns.c uses.
 *
 *   fake_dns_set("example.test", DNS_OK,
 *                "10 mx1.example.test 192.0.2.1 2001:db8::1",
 *                "20 mx2.example.test 192.0.2.2", NULL);
 *   fake_dns_set("nullmx.test", DNS_NULL_MX, NULL);
 *   q = dns_resolve_mx(d, "example.test", cb, arg);   // no callback yet
 *   fake_dns_run();                                   // cb fires here
 *
 * Host strings are "PREF NAME [ADDR ...]" (IPv4/IPv6 literals, port 0 in
 * the result). Names match case-insensitively, a trailing dot ignored; the
 * same table answers dns_resolve_mx and dns_resolve_host (a host lookup
 * gets res->mx false). A name without a canned answer completes with
 * DNS_TEMPFAIL, detail "fake_dns: no canned answer". State is global:
 * fake_dns_reset() between tests. */
#ifndef PETREL_FAKE_DNS_H
#define PETREL_FAKE_DNS_H

#include <stdbool.h>
#include <stddef.h>

#include "dns.h"

/* Forgets canned answers and counters (call it in teardown too: answers
 * are heap memory). Pending queries stay: they belong to their context and
 * go with dns_close(). */
void fake_dns_reset(void);

/* Registers (or replaces) the answer for name: status, then host strings
 * ending with NULL. DNS_OK: res lists the hosts in the order given (no
 * sorting: write them sorted, or shuffled on purpose); res->mx is set for
 * MX lookups unless fake_dns_set_implicit() was called. DNS_NO_ADDRESS with
 * hosts: res->mx set and the hosts (addresses ignored); without hosts: res
 * NULL (the implicit-MX case). Other statuses: res NULL, hosts ignored.
 * The default detail is NULL for DNS_OK, else "SERVFAIL" (DNS_TEMPFAIL),
 * "NXDOMAIN", "null MX", "no A/AAAA record". Aborts on a malformed host. */
void fake_dns_set(const char *name, enum dns_status status, ...);
/* Overrides the detail text of name's answer ("timeout", …); NULL: none. */
void fake_dns_set_detail(const char *name, const char *detail);
/* Marks name's DNS_OK answer as an implicit MX (res->implicit_mx, not mx). */
void fake_dns_set_implicit(const char *name);
/* Marks name's answer as DNSSEC-validated (res->secure). */
void fake_dns_set_secure(const char *name);

/* Completes the queries pending when called, in the order they were
 * started, firing their callbacks; queries started from those callbacks
 * wait for the next call. Returns how many callbacks fired. */
size_t fake_dns_run(void);
/* Queries started and neither completed nor cancelled. */
size_t fake_dns_pending(void);
/* How many queries were started for name (MX and host lookups alike);
 * total over every name with name NULL. */
unsigned fake_dns_lookups(const char *name);
/* How many queries were cancelled with dns_cancel() since the reset. */
unsigned fake_dns_cancelled(void);

#endif
