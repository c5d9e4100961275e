/*
 * ratelimit — a petrel plugin limiting connections and messages per client
 * IP address over a fixed time window.
 *
 *   plugins:
 *     - path: /usr/lib/petrel/plugins/ratelimit.so
 *       config:
 *         connections: 30    # per window and IP; more: 421 4.7.0 at connect
 *         messages: 100      # MAIL FROM per window and IP; more: 451 4.7.1
 *         window: 60         # seconds ("60", "60s", "5m", "1h"); default 60
 *         max_entries: 65536 # IPs tracked at once; default 65536
 *
 * Either limit may be left out (or 0: no limit), not both. Refused
 * attempts count too, so a client that keeps hammering stays refused until
 * its window ends.
 *
 * Memory is bounded: one entry per IP (about 100 bytes) in a hash table of
 * at most max_entries. Entries sit in a list ordered by the start of their
 * window; each call drops a few expired ones from the old end, and when the
 * table is full the entry whose window is oldest makes room (that IP's
 * count starts again: the limiter errs on the side of letting mail in).
 *
 * Everything lives in the instance (p->data): the plugin can be listed
 * twice with different limits. It never blocks and answers at once.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <petrel/plugin.h>

#define RL_IP_MAX 46 /* INET6_ADDRSTRLEN */
#define RL_DEFAULT_WINDOW_S 60
#define RL_DEFAULT_ENTRIES 65536
#define RL_MIN_ENTRIES 16
#define RL_MAX_ENTRIES (1u << 24)
#define RL_SWEEP_PER_CALL 64 /* expired entries dropped per call, at most */

struct rl_entry {
    char ip[RL_IP_MAX];
    uint64_t start_ms;            /* when this window began */
    unsigned conns;               /* connections seen in the window */
    unsigned msgs;                /* MAIL FROM seen in the window */
    struct rl_entry *hnext;       /* hash chain */
    struct rl_entry *prev, *next; /* age list: newest window first */
};

struct rl {
    const struct petrel_host *host; /* borrowed, valid until unload */
    unsigned max_conns;             /* 0: no limit */
    unsigned max_msgs;              /* 0: no limit */
    uint64_t window_ms;
    size_t max_entries;
    size_t nentries;
    struct rl_entry **buckets; /* owned: nbuckets chains of owned entries */
    size_t nbuckets;           /* a power of two */
    struct rl_entry age;       /* sentinel: age.next newest, age.prev oldest */
};

/* ---- config --------------------------------------------------------------- */

/* A non-negative decimal integer up to max; false otherwise. */
static bool
rl_parse_uint(const char *s, uint64_t max, uint64_t *out)
{
    if (s == NULL || *s == '\0')
        return false;
    uint64_t v = 0;
    for (; *s != '\0'; s++) {
        if (*s < '0' || *s > '9')
            return false;
        v = v * 10 + (uint64_t)(*s - '0');
        if (v > max)
            return false;
    }
    *out = v;
    return true;
}

/* "60", "60s", "5m", "1h" → seconds (1 s to 1 day). */
static bool
rl_parse_window(const char *s, uint64_t *seconds)
{
    char num[24];
    size_t n = strlen(s);
    if (n == 0 || n >= sizeof(num))
        return false;
    uint64_t mult = 1;
    char last = s[n - 1];
    if (last == 's' || last == 'm' || last == 'h') {
        mult = last == 's' ? 1 : last == 'm' ? 60 : 3600;
        n--;
    }
    memcpy(num, s, n);
    num[n] = '\0';
    uint64_t v;
    if (!rl_parse_uint(num, 86400, &v) || v * mult == 0 || v * mult > 86400)
        return false;
    *seconds = v * mult;
    return true;
}

static int
rl_configure(struct rl *rl, const struct petrel_host *host)
{
    static const char *const known[] = {"connections", "messages", "window", "max_entries", NULL};
    for (size_t i = 0; host->config_key(host, i) != NULL; i++) {
        const char *k = host->config_key(host, i);
        bool ok = false;
        for (size_t j = 0; known[j] != NULL; j++)
            ok = ok || strcmp(k, known[j]) == 0;
        if (!ok) {
            host->log(host, PETREL_LOG_ERROR,
                      "unknown config key \"%s\" (known: connections, messages, window, "
                      "max_entries)",
                      k);
            return -1;
        }
    }
    uint64_t v;
    const char *s = host->config(host, "connections");
    if (s != NULL) {
        if (!rl_parse_uint(s, UINT32_MAX, &v)) {
            host->log(host, PETREL_LOG_ERROR, "connections: \"%s\" is not a number", s);
            return -1;
        }
        rl->max_conns = (unsigned)v;
    }
    s = host->config(host, "messages");
    if (s != NULL) {
        if (!rl_parse_uint(s, UINT32_MAX, &v)) {
            host->log(host, PETREL_LOG_ERROR, "messages: \"%s\" is not a number", s);
            return -1;
        }
        rl->max_msgs = (unsigned)v;
    }
    v = RL_DEFAULT_WINDOW_S;
    s = host->config(host, "window");
    if (s != NULL && !rl_parse_window(s, &v)) {
        host->log(host, PETREL_LOG_ERROR,
                  "window: \"%s\" is not a duration of 1s to 1 day (60, 60s, 5m, 1h)", s);
        return -1;
    }
    rl->window_ms = v * 1000;
    v = RL_DEFAULT_ENTRIES;
    s = host->config(host, "max_entries");
    if (s != NULL && (!rl_parse_uint(s, RL_MAX_ENTRIES, &v) || v < RL_MIN_ENTRIES)) {
        host->log(host, PETREL_LOG_ERROR, "max_entries: \"%s\" is not a number from %d to %u", s,
                  RL_MIN_ENTRIES, RL_MAX_ENTRIES);
        return -1;
    }
    rl->max_entries = (size_t)v;
    if (rl->max_conns == 0 && rl->max_msgs == 0) {
        host->log(host, PETREL_LOG_ERROR, "nothing to limit: set connections and/or messages");
        return -1;
    }
    return 0;
}

/* ---- the table ------------------------------------------------------------ */

static size_t
rl_hash(const char *s)
{
    uint64_t h = 14695981039346656037ULL; /* FNV-1a */
    for (; *s != '\0'; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ULL;
    }
    return (size_t)h;
}

static void
rl_age_unlink(struct rl_entry *e)
{
    e->prev->next = e->next;
    e->next->prev = e->prev;
}

static void
rl_age_push_newest(struct rl *rl, struct rl_entry *e)
{
    e->next = rl->age.next;
    e->prev = &rl->age;
    rl->age.next->prev = e;
    rl->age.next = e;
}

static void
rl_remove(struct rl *rl, struct rl_entry *e)
{
    struct rl_entry **pp = &rl->buckets[rl_hash(e->ip) & (rl->nbuckets - 1)];
    while (*pp != e)
        pp = &(*pp)->hnext;
    *pp = e->hnext;
    rl_age_unlink(e);
    rl->nentries--;
    free(e);
}

/* Drops entries whose window is over, oldest first, a bounded number. */
static void
rl_sweep(struct rl *rl, uint64_t now)
{
    for (int i = 0; i < RL_SWEEP_PER_CALL && rl->age.prev != &rl->age; i++) {
        struct rl_entry *old = rl->age.prev;
        if (now - old->start_ms < rl->window_ms)
            break;
        rl_remove(rl, old);
    }
}

/* The entry of ip with a current window (a new one if needed), or NULL
 * when memory ran out. */
static struct rl_entry *
rl_touch(struct rl *rl, const char *ip, uint64_t now)
{
    rl_sweep(rl, now);
    size_t b = rl_hash(ip) & (rl->nbuckets - 1);
    for (struct rl_entry *e = rl->buckets[b]; e != NULL; e = e->hnext) {
        if (strcmp(e->ip, ip) != 0)
            continue;
        if (now - e->start_ms >= rl->window_ms) { /* a new window */
            e->start_ms = now;
            e->conns = e->msgs = 0;
            rl_age_unlink(e);
            rl_age_push_newest(rl, e);
        }
        return e;
    }
    if (strlen(ip) >= RL_IP_MAX)
        return NULL;
    if (rl->nentries >= rl->max_entries) /* full: forget the oldest window */
        rl_remove(rl, rl->age.prev);
    struct rl_entry *e = calloc(1, sizeof(*e));
    if (e == NULL)
        return NULL;
    memcpy(e->ip, ip, strlen(ip) + 1);
    e->start_ms = now;
    e->hnext = rl->buckets[b];
    rl->buckets[b] = e;
    rl_age_push_newest(rl, e);
    rl->nentries++;
    return e;
}

/* ---- handlers ------------------------------------------------------------- */

static int
rl_on_connect(struct petrel_ctx *ctx, void *data)
{
    struct rl *rl = data;
    const struct petrel_host *host = rl->host;
    const char *ip = host->client_ip(ctx);
    if (ip == NULL) /* unix socket: nothing to count */
        return PETREL_OK;
    struct rl_entry *e = rl_touch(rl, ip, host->now_ms(host));
    if (e == NULL)
        return PETREL_OK;
    if (e->conns < UINT32_MAX)
        e->conns++;
    if (e->conns <= rl->max_conns)
        return PETREL_OK;
    if (e->conns == rl->max_conns + 1) /* once per window, not per refusal */
        host->ctx_log(ctx, PETREL_LOG_INFO, "client %s over %u connections in %llus: refusing", ip,
                      rl->max_conns, (unsigned long long)(rl->window_ms / 1000));
    char text[128];
    snprintf(text, sizeof(text), "4.7.0 Too many connections from %s, try again later", ip);
    host->set_verdict(ctx, PETREL_VERDICT_TEMPFAIL, 421, text);
    return PETREL_OK;
}

static int
rl_on_mail_from(struct petrel_ctx *ctx, void *data)
{
    struct rl *rl = data;
    const struct petrel_host *host = rl->host;
    const char *ip = host->client_ip(ctx);
    if (ip == NULL)
        return PETREL_OK;
    struct rl_entry *e = rl_touch(rl, ip, host->now_ms(host));
    if (e == NULL)
        return PETREL_OK;
    if (e->msgs < UINT32_MAX)
        e->msgs++;
    if (e->msgs <= rl->max_msgs)
        return PETREL_OK;
    if (e->msgs == rl->max_msgs + 1)
        host->ctx_log(ctx, PETREL_LOG_INFO, "client %s over %u messages in %llus: refusing", ip,
                      rl->max_msgs, (unsigned long long)(rl->window_ms / 1000));
    char text[128];
    snprintf(text, sizeof(text), "4.7.1 Too many messages from %s, try again later", ip);
    host->set_verdict(ctx, PETREL_VERDICT_TEMPFAIL, 451, text);
    return PETREL_OK;
}

static void
rl_unload(void *data)
{
    struct rl *rl = data;
    while (rl->age.next != &rl->age) {
        struct rl_entry *e = rl->age.next;
        rl_age_unlink(e);
        free(e);
    }
    free(rl->buckets);
    free(rl);
}

int
petrel_plugin_init(const struct petrel_host *host, struct petrel_plugin *p)
{
    if (host->abi_version != PETREL_PLUGIN_ABI_VERSION)
        return -1;
    struct rl *rl = calloc(1, sizeof(*rl));
    if (rl == NULL)
        return -1;
    rl->host = host;
    rl->age.next = rl->age.prev = &rl->age;
    if (rl_configure(rl, host) != 0) {
        free(rl);
        return -1;
    }
    rl->nbuckets = 1;
    while (rl->nbuckets < rl->max_entries)
        rl->nbuckets <<= 1;
    rl->buckets = calloc(rl->nbuckets, sizeof(*rl->buckets));
    if (rl->buckets == NULL) {
        free(rl);
        return -1;
    }
    p->abi_version = PETREL_PLUGIN_ABI_VERSION;
    p->size = sizeof(*p);
    p->name = "ratelimit";
    p->data = rl;
    p->unload = rl_unload;
    if (rl->max_conns > 0)
        p->handlers[PETREL_HOOK_CONNECT] = rl_on_connect;
    if (rl->max_msgs > 0)
        p->handlers[PETREL_HOOK_MAIL_FROM] = rl_on_mail_from;
    host->log(host, PETREL_LOG_INFO,
              "limits per IP and %llus: connections %u, messages %u (0: none); up to %zu IPs",
              (unsigned long long)(rl->window_ms / 1000), rl->max_conns, rl->max_msgs,
              rl->max_entries);
    return 0;
}
