/* fake_dns — canned dns.h answers for engine tests (see fake_dns.h). */
#include "fake_dns.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "util.h"

struct fake_dns_answer {
    char name[256]; /* without trailing dot */
    enum dns_status status;
    struct dns_host *hosts; /* owned; addresses owned */
    size_t nhosts;
    const char *detail; /* borrowed static text or NULL */
    bool implicit;
    bool secure;
    unsigned lookups;
    struct fake_dns_answer *next;
};

struct dns {
    struct uv_loop_s *loop; /* borrowed, unused */
};

struct dns_query {
    struct dns *d; /* borrowed */
    char name[256];
    bool mx;
    dns_result_cb *cb;
    void *arg;
    bool running;            /* its callback runs */
    struct dns_query **list; /* the list it is in */
    struct dns_query *prev, *next;
};

static struct fake_dns_answer *fake_answers;
static struct dns_query *fake_pending; /* in start order: appended at the tail */
static struct dns_query *fake_running; /* detached by fake_dns_run() */
static unsigned fake_unknown_lookups;
static unsigned fake_cancels;

static void
fake_dns_norm(char *out, size_t size, const char *name)
{
    if (!str_copy(out, size, name))
        PANIC("fake_dns: name too long: %s", name);
    size_t n = strlen(out);
    if (n > 1 && out[n - 1] == '.')
        out[n - 1] = '\0';
}

static struct fake_dns_answer *
fake_dns_find(const char *name)
{
    char n[256];
    fake_dns_norm(n, sizeof(n), name);
    for (struct fake_dns_answer *a = fake_answers; a != NULL; a = a->next)
        if (ascii_casecmp(a->name, n) == 0)
            return a;
    return NULL;
}

static void
fake_dns_hosts_free(struct dns_host *h, size_t n)
{
    for (size_t i = 0; i < n; i++)
        free(h[i].addrs);
    free(h);
}

void
fake_dns_reset(void)
{
    while (fake_answers != NULL) {
        struct fake_dns_answer *a = fake_answers;
        fake_answers = a->next;
        fake_dns_hosts_free(a->hosts, a->nhosts);
        free(a);
    }
    fake_unknown_lookups = 0;
    fake_cancels = 0;
}

/* "PREF NAME [ADDR ...]" → h */
static void
fake_dns_parse_host(const char *spec, struct dns_host *h)
{
    char *copy = xstrdup(spec);
    char *save = NULL;
    char *pref = strtok_r(copy, " ", &save);
    char *name = strtok_r(NULL, " ", &save);
    char *end = NULL;
    if (pref == NULL || name == NULL)
        PANIC("fake_dns: host \"%s\": want \"PREF NAME [ADDR ...]\"", spec);
    unsigned long p = strtoul(pref, &end, 10);
    if (*end != '\0' || p > 65535)
        PANIC("fake_dns: host \"%s\": bad preference", spec);
    memset(h, 0, sizeof(*h));
    h->pref = (unsigned)p;
    if (!str_copy(h->name, sizeof(h->name), name))
        PANIC("fake_dns: host \"%s\": name too long", spec);
    for (char *ip = strtok_r(NULL, " ", &save); ip != NULL; ip = strtok_r(NULL, " ", &save)) {
        struct dns_addr a;
        memset(&a, 0, sizeof(a));
        struct sockaddr_in *sin = (struct sockaddr_in *)&a.ss;
        struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&a.ss;
        if (inet_pton(AF_INET, ip, &sin->sin_addr) == 1) {
            sin->sin_family = AF_INET;
            a.len = sizeof(*sin);
        } else if (inet_pton(AF_INET6, ip, &sin6->sin6_addr) == 1) {
            sin6->sin6_family = AF_INET6;
            a.len = sizeof(*sin6);
        } else {
            PANIC("fake_dns: host \"%s\": bad address %s", spec, ip);
        }
        h->addrs = xreallocarray(h->addrs, h->naddrs + 1, sizeof(*h->addrs));
        h->addrs[h->naddrs++] = a;
    }
    free(copy);
}

static const char *
fake_dns_default_detail(enum dns_status st)
{
    switch (st) {
    case DNS_OK:
        return NULL;
    case DNS_TEMPFAIL:
        return "SERVFAIL";
    case DNS_NXDOMAIN:
        return "NXDOMAIN";
    case DNS_NULL_MX:
        return "null MX";
    case DNS_NO_ADDRESS:
        return "no A/AAAA record";
    }
    return NULL;
}

void
fake_dns_set(const char *name, enum dns_status status, ...)
{
    struct fake_dns_answer *a = fake_dns_find(name);
    if (a == NULL) {
        a = xcalloc(1, sizeof(*a));
        fake_dns_norm(a->name, sizeof(a->name), name);
        a->next = fake_answers;
        fake_answers = a;
    } else {
        fake_dns_hosts_free(a->hosts, a->nhosts);
        a->hosts = NULL;
        a->nhosts = 0;
        a->implicit = a->secure = false;
    }
    a->status = status;
    a->detail = fake_dns_default_detail(status);
    va_list ap;
    va_start(ap, status);
    for (const char *spec = va_arg(ap, const char *); spec != NULL;
         spec = va_arg(ap, const char *)) {
        a->hosts = xreallocarray(a->hosts, a->nhosts + 1, sizeof(*a->hosts));
        fake_dns_parse_host(spec, &a->hosts[a->nhosts++]);
    }
    va_end(ap);
}

static struct fake_dns_answer *
fake_dns_must_find(const char *name)
{
    struct fake_dns_answer *a = fake_dns_find(name);
    if (a == NULL)
        PANIC("fake_dns: no answer registered for %s (call fake_dns_set first)", name);
    return a;
}

void
fake_dns_set_detail(const char *name, const char *detail)
{
    fake_dns_must_find(name)->detail = detail;
}

void
fake_dns_set_implicit(const char *name)
{
    fake_dns_must_find(name)->implicit = true;
}

void
fake_dns_set_secure(const char *name)
{
    fake_dns_must_find(name)->secure = true;
}

static void
fake_dns_unlink(struct dns_query *q)
{
    if (q->prev)
        q->prev->next = q->next;
    else
        *q->list = q->next;
    if (q->next)
        q->next->prev = q->prev;
    q->prev = q->next = NULL;
    q->list = NULL;
}

static void
fake_dns_append(struct dns_query **list, struct dns_query *q)
{
    struct dns_query **pp = list;
    struct dns_query *prev = NULL;
    while (*pp != NULL) {
        prev = *pp;
        pp = &(*pp)->next;
    }
    *pp = q;
    q->prev = prev;
    q->next = NULL;
    q->list = list;
}

/* Copies the canned hosts into a result the callback may look at. */
static void
fake_dns_result(const struct fake_dns_answer *a, const struct dns_query *q, struct dns_result *res)
{
    memset(res, 0, sizeof(*res));
    res->nhosts = a->nhosts;
    res->hosts = xcalloc(a->nhosts ? a->nhosts : 1, sizeof(*res->hosts));
    for (size_t i = 0; i < a->nhosts; i++) {
        res->hosts[i] = a->hosts[i];
        res->hosts[i].addrs = NULL;
        res->hosts[i].naddrs = a->status == DNS_OK ? a->hosts[i].naddrs : 0;
        if (res->hosts[i].naddrs > 0) {
            res->hosts[i].addrs = xcalloc(a->hosts[i].naddrs, sizeof(*res->hosts[i].addrs));
            memcpy(res->hosts[i].addrs, a->hosts[i].addrs,
                   a->hosts[i].naddrs * sizeof(*res->hosts[i].addrs));
        }
    }
    res->implicit_mx = q->mx && a->implicit;
    res->mx = q->mx && !a->implicit;
    res->secure = a->secure;
}

size_t
fake_dns_run(void)
{
    /* detach what is pending now; later queries wait for the next run */
    while (fake_pending != NULL) {
        struct dns_query *q = fake_pending;
        fake_dns_unlink(q);
        fake_dns_append(&fake_running, q);
    }
    size_t fired = 0;
    while (fake_running != NULL) {
        struct dns_query *q = fake_running;
        fake_dns_unlink(q);
        q->running = true;
        const struct fake_dns_answer *a = fake_dns_find(q->name);
        if (a == NULL) {
            q->cb(q, DNS_TEMPFAIL, NULL, "fake_dns: no canned answer", q->arg);
        } else {
            struct dns_result res;
            fake_dns_result(a, q, &res);
            bool with_res =
                a->status == DNS_OK || (a->status == DNS_NO_ADDRESS && a->nhosts > 0 && q->mx);
            q->cb(q, a->status, with_res ? &res : NULL, a->detail, q->arg);
            dns_result_reset(&res);
        }
        free(q);
        fired++;
    }
    return fired;
}

size_t
fake_dns_pending(void)
{
    size_t n = 0;
    for (const struct dns_query *q = fake_pending; q != NULL; q = q->next)
        n++;
    for (const struct dns_query *q = fake_running; q != NULL; q = q->next)
        n++;
    return n;
}

unsigned
fake_dns_lookups(const char *name)
{
    if (name != NULL) {
        const struct fake_dns_answer *a = fake_dns_find(name);
        return a ? a->lookups : 0;
    }
    unsigned n = fake_unknown_lookups;
    for (const struct fake_dns_answer *a = fake_answers; a != NULL; a = a->next)
        n += a->lookups;
    return n;
}

unsigned
fake_dns_cancelled(void)
{
    return fake_cancels;
}

/* ------------------------------------------------------------ dns.h */

int
dns_open(struct uv_loop_s *loop, const struct petrel_config *cfg, struct dns **out, char **err)
{
    (void)cfg;
    *err = NULL;
    *out = xcalloc(1, sizeof(**out));
    (*out)->loop = loop;
    return 0;
}

void
dns_close(struct dns *d)
{
    if (d == NULL)
        return;
    struct dns_query **lists[] = {&fake_pending, &fake_running};
    for (size_t l = 0; l < 2; l++) {
        struct dns_query *q = *lists[l];
        while (q != NULL) {
            struct dns_query *next = q->next;
            if (q->d == d) {
                fake_dns_unlink(q);
                free(q);
            }
            q = next;
        }
    }
    free(d);
}

static struct dns_query *
fake_dns_start(struct dns *d, const char *name, bool mx, dns_result_cb *cb, void *arg)
{
    struct dns_query *q = xcalloc(1, sizeof(*q));
    q->d = d;
    fake_dns_norm(q->name, sizeof(q->name), name);
    q->mx = mx;
    q->cb = cb;
    q->arg = arg;
    struct fake_dns_answer *a = fake_dns_find(name);
    if (a != NULL)
        a->lookups++;
    else
        fake_unknown_lookups++;
    fake_dns_append(&fake_pending, q);
    return q;
}

struct dns_query *
dns_resolve_mx(struct dns *d, const char *domain, dns_result_cb *cb, void *arg)
{
    return fake_dns_start(d, domain, true, cb, arg);
}

struct dns_query *
dns_resolve_host(struct dns *d, const char *host, dns_result_cb *cb, void *arg)
{
    return fake_dns_start(d, host, false, cb, arg);
}

struct dns_query *
dns_resolve_txt(struct dns *d, const char *name, dns_txt_cb *cb, void *arg)
{
    (void)d;
    (void)cb;
    (void)arg;
    PANIC("fake_dns: TXT lookups (%s) are not faked", name);
}

void
dns_cancel(struct dns_query *q)
{
    if (q == NULL || q->running)
        return;
    fake_dns_unlink(q);
    free(q);
    fake_cancels++;
}
