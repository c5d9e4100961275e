/* fake_dane — stands in for core/dane.c in smtp_client tests: records each
 * dane_lookup_start() and completes it when the test says so, with the
 * verdict the test gives. It provides the engine-facing part of dane.h
 * (dane_resolvers_init, dane_lookup_start, dane_lookup_cancel,
 * dane_result_reset, dane_status_name), not the packet helpers.
 *
 *   struct dane_lookup *l = fake_dane_last();        // after a connect
 *   assert_string_equal(fake_dane_host(l), "mx1.example.org");
 *   fake_dane_complete(l, DANE_SECURE, "1 usable TLSA record", 1);
 *
 * State is global: fake_dane_reset() between tests frees what is left. */
#ifndef PETREL_FAKE_DANE_H
#define PETREL_FAKE_DANE_H

#include <stddef.h>

#include "dane.h"

void fake_dane_reset(void);
/* The lookup started last and not yet completed or cancelled, or NULL. */
struct dane_lookup *fake_dane_last(void);
/* Lookups started, and cancelled, since the reset. */
unsigned fake_dane_started(void);
unsigned fake_dane_cancelled(void);
/* What a lookup asked for: host, port, family, MX domain ("" for none). */
const char *fake_dane_host(const struct dane_lookup *l);
unsigned fake_dane_port(const struct dane_lookup *l);
int fake_dane_family(const struct dane_lookup *l);
const char *fake_dane_domain(const struct dane_lookup *l);
/* Fires l's callback with status and detail; DANE_SECURE carries ntlsa
 * dummy DANE-EE SHA2-256 records. l is freed afterwards. */
void fake_dane_complete(struct dane_lookup *l, enum dane_status status, const char *detail,
                        size_t ntlsa);

#endif
