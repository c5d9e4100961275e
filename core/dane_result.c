/*
 * dane_result — the pure helpers of dane.h (status names, freeing TLSA
 * records and results), apart from the lookups so the delivery client's
 * test fake links them instead of copying them.
 */
#include "dane.h"

#include <stdlib.h>
#include <string.h>

const char *
dane_status_name(enum dane_status st)
{
    switch (st) {
    case DANE_SECURE:
        return "secure";
    case DANE_UNUSABLE:
        return "unusable";
    case DANE_NONE:
        return "none";
    case DANE_INSECURE:
        return "insecure";
    case DANE_TEMPFAIL:
        return "tempfail";
    }
    return "?";
}

void
dane_tlsa_free(struct dane_tlsa *tlsa, size_t n)
{
    for (size_t i = 0; tlsa != NULL && i < n; i++)
        free(tlsa[i].data);
    free(tlsa);
}

void
dane_result_reset(struct dane_result *res)
{
    dane_tlsa_free(res->tlsa, res->ntlsa);
    memset(res, 0, sizeof(*res));
}
