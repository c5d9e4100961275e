/* fake_dane — see fake_dane.h. */
#include "fake_dane.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

struct dane_lookup {
    struct dane_lookup *next; /* live lookups */
    dane_lookup_cb *cb;
    void *arg;
    char host[256];
    char domain[256];
    unsigned port;
    int family;
};

static struct dane_lookup *fake_live;
static unsigned fake_started;
static unsigned fake_cancelled;

static void
fake_dane_unlink(struct dane_lookup *l)
{
    for (struct dane_lookup **p = &fake_live; *p != NULL; p = &(*p)->next) {
        if (*p == l) {
            *p = l->next;
            return;
        }
    }
    PANIC("fake_dane: lookup %p is not live", (void *)l);
}

void
fake_dane_reset(void)
{
    while (fake_live != NULL) {
        struct dane_lookup *l = fake_live;
        fake_live = l->next;
        free(l);
    }
    fake_started = 0;
    fake_cancelled = 0;
}

struct dane_lookup *
fake_dane_last(void)
{
    return fake_live;
}

unsigned
fake_dane_started(void)
{
    return fake_started;
}

unsigned
fake_dane_cancelled(void)
{
    return fake_cancelled;
}

const char *
fake_dane_host(const struct dane_lookup *l)
{
    return l->host;
}

unsigned
fake_dane_port(const struct dane_lookup *l)
{
    return l->port;
}

int
fake_dane_family(const struct dane_lookup *l)
{
    return l->family;
}

const char *
fake_dane_domain(const struct dane_lookup *l)
{
    return l->domain;
}

void
fake_dane_complete(struct dane_lookup *l, enum dane_status status, const char *detail, size_t ntlsa)
{
    fake_dane_unlink(l);
    struct dane_result res;
    memset(&res, 0, sizeof(res));
    res.status = status;
    snprintf(res.detail, sizeof(res.detail), "%s", detail);
    if (status == DANE_SECURE && ntlsa > 0) {
        res.tlsa = xcalloc(ntlsa, sizeof(*res.tlsa));
        for (size_t i = 0; i < ntlsa; i++) {
            res.tlsa[i] = (struct dane_tlsa){.usage = 3, .selector = 1, .mtype = 1, .len = 32};
            res.tlsa[i].data = xcalloc(1, 32);
        }
        res.ntlsa = ntlsa;
    }
    l->cb(l, &res, l->arg);
    dane_result_reset(&res);
    free(l);
}

const char *
dane_resolvers_init(struct dane_resolvers *rs, const char *const *list, size_t n,
                    uint64_t timeout_ms)
{
    (void)list;
    memset(rs, 0, sizeof(*rs));
    rs->n = n;
    rs->timeout_ms = timeout_ms;
    return NULL;
}

struct dane_lookup *
dane_lookup_start(struct uv_loop_s *loop, const struct dane_resolvers *rs, const char *mx_domain,
                  const char *host, unsigned port, int family, dane_lookup_cb *cb, void *arg)
{
    (void)loop;
    (void)rs;
    struct dane_lookup *l = xcalloc(1, sizeof(*l));
    l->cb = cb;
    l->arg = arg;
    if (!str_copy(l->host, sizeof(l->host), host) ||
        !str_copy(l->domain, sizeof(l->domain), mx_domain ? mx_domain : ""))
        PANIC("fake_dane: name too long");
    l->port = port;
    l->family = family;
    l->next = fake_live;
    fake_live = l;
    fake_started++;
    return l;
}

void
dane_lookup_cancel(struct dane_lookup *l)
{
    if (l == NULL)
        return;
    fake_dane_unlink(l);
    free(l);
    fake_cancelled++;
}
