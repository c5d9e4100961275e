/*
 * dns_result — the pure helpers of dns.h (status names and enhanced codes,
 * result cleanup, RFC 5321 5.1 MX ordering). A module of their own so that
 * dns.c and the unit-test fake (tests/unit/fakes/fake_dns.c) share one
 * implementation.
 */
#include "dns.h"

#include <stdlib.h>
#include <string.h>

#include "util.h"

const char *
dns_status_name(enum dns_status status)
{
    switch (status) {
    case DNS_OK:
        return "ok";
    case DNS_TEMPFAIL:
        return "tempfail";
    case DNS_NXDOMAIN:
        return "nxdomain";
    case DNS_NULL_MX:
        return "null-mx";
    case DNS_NO_ADDRESS:
        return "no-address";
    }
    return "?";
}

const char *
dns_status_esc(enum dns_status status, const struct dns_result *res)
{
    switch (status) {
    case DNS_OK:
        return NULL;
    case DNS_NXDOMAIN:
        return "5.1.2";
    case DNS_NULL_MX:
        return "5.1.10";
    case DNS_NO_ADDRESS:
        return res != NULL && res->mx ? "4.4.3" : "5.1.2";
    case DNS_TEMPFAIL:
        break;
    }
    return "4.4.3";
}

void
dns_result_reset(struct dns_result *res)
{
    for (size_t i = 0; i < res->nhosts; i++)
        free(res->hosts[i].addrs);
    free(res->hosts);
    memset(res, 0, sizeof(*res));
}

static unsigned
dns_rnd_default(unsigned n)
{
    return arc4random_uniform(n);
}

struct dns_sort_key {
    unsigned pref;
    size_t index;
};

static int
dns_sort_key_cmp(const void *a, const void *b)
{
    const struct dns_sort_key *x = a;
    const struct dns_sort_key *y = b;
    if (x->pref != y->pref)
        return x->pref < y->pref ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index); /* stable */
}

void
dns_sort_mx(struct dns_host *hosts, size_t n, unsigned (*rnd)(unsigned n))
{
    if (n < 2)
        return;
    if (rnd == NULL)
        rnd = dns_rnd_default;
    /* Stable sort by preference (qsort on keys with the original index as
     * tie-break), so a test's rnd fully determines the final order. */
    struct dns_sort_key *keys = xcalloc(n, sizeof(*keys));
    for (size_t i = 0; i < n; i++)
        keys[i] = (struct dns_sort_key){hosts[i].pref, i};
    qsort(keys, n, sizeof(*keys), dns_sort_key_cmp);
    struct dns_host *sorted = xcalloc(n, sizeof(*sorted));
    for (size_t i = 0; i < n; i++)
        sorted[i] = hosts[keys[i].index];
    memcpy(hosts, sorted, n * sizeof(*hosts));
    free(sorted);
    free(keys);
    /* RFC 5321 5.1: equal preferences in random order (Fisher-Yates on
     * each run of equal preference). */
    for (size_t start = 0; start < n;) {
        size_t end = start + 1;
        while (end < n && hosts[end].pref == hosts[start].pref)
            end++;
        for (size_t k = end - start; k > 1; k--) {
            unsigned r = rnd((unsigned)k);
            if (r >= k)
                PANIC("dns_sort_mx: rnd(%zu) returned %u", k, r);
            struct dns_host t = hosts[start + k - 1];
            hosts[start + k - 1] = hosts[start + r];
            hosts[start + r] = t;
        }
        start = end;
    }
}
