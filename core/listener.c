/*
 * listener — owns the listening uv_tcp_t handles and the per-listener
 * connection counters (total and per client IP). Each accepted connection
 * gets a small `struct listener_slot` that the session hands back on end,
 * so counters are decremented exactly once.
 */
#include "listener.h"

#include <arpa/inet.h>
#include <string.h>
#include <uv.h>

#include "conn.h"
#include "log.h"
#include "reply.h"
#include "smtp_server.h"
#include "util.h"

#define LISTENER_IP_BUCKETS 1024

struct listener_ipcount {
    struct listener_ipcount *next;
    unsigned count;
    char ip[INET6_ADDRSTRLEN];
};

struct listener {
    uv_tcp_t tcp;
    struct listeners *owner;                /* borrowed */
    const struct listener_config *lc;      /* borrowed from the config */
    unsigned nconns;
    bool open;
    struct listener_ipcount *ips[LISTENER_IP_BUCKETS]; /* owned */
};

struct listeners {
    struct listener *v;         /* owned */
    size_t n;
    size_t sessions;
    int closing_handles;
    bool stopped;
    struct smtpd_server *srv;   /* borrowed */
    void (*idle_cb)(void *arg);
    void *idle_arg;
};

struct listener_slot {
    struct listener *l;         /* borrowed */
    bool counted;
    char ip[INET6_ADDRSTRLEN];
};

static unsigned
listener_hash(const char *ip)
{
    unsigned h = 2166136261u;
    for (; *ip; ip++)
        h = (h ^ (unsigned char)*ip) * 16777619u;
    return h % LISTENER_IP_BUCKETS;
}

static struct listener_ipcount **
listener_ip_find(struct listener *l, const char *ip)
{
    struct listener_ipcount **pp = &l->ips[listener_hash(ip)];
    while (*pp && strcmp((*pp)->ip, ip) != 0)
        pp = &(*pp)->next;
    return pp;
}

static void
listener_on_session_end(void *arg)
{
    struct listener_slot *slot = arg;
    struct listener *l = slot->l;
    struct listeners *ls = l->owner;
    if (slot->counted) {
        l->nconns--;
        struct listener_ipcount **pp = listener_ip_find(l, slot->ip);
        if (*pp && --(*pp)->count == 0) {
            struct listener_ipcount *dead = *pp;
            *pp = dead->next;
            free(dead);
        }
    }
    free(slot);
    ls->sessions--;
    if (ls->stopped && ls->sessions == 0 && ls->idle_cb)
        ls->idle_cb(ls->idle_arg);
}

static void
listener_on_connection(uv_stream_t *server, int status)
{
    struct listener *l = server->data;
    if (status < 0) {
        log_msg(LOG_WARNING, NULL, "listener %s: accept error: %s", l->lc->name,
                uv_strerror(status));
        return;
    }
    struct conn *c;
    int r = conn_accept(server, &c);
    if (r < 0) {
        log_msg(LOG_WARNING, NULL, "listener %s: accept failed: %s", l->lc->name,
                uv_strerror(r));
        return;
    }
    struct listener_slot *slot = xcalloc(1, sizeof(*slot));
    slot->l = l;
    if (!str_copy(slot->ip, sizeof(slot->ip), conn_peer_ip(c)))
        slot->ip[0] = '\0';
    const struct reply *refuse = NULL;
    struct listener_ipcount **pp = listener_ip_find(l, slot->ip);
    if (l->nconns >= l->lc->max_connections) {
        refuse = &R_TOO_MANY_CONNS;
    } else if (*pp && (*pp)->count >= l->lc->max_connections_per_ip) {
        refuse = &R_TOO_MANY_CONNS_IP;
    } else {
        if (*pp == NULL) {
            *pp = xcalloc(1, sizeof(**pp));
            memcpy((*pp)->ip, slot->ip, sizeof((*pp)->ip));
        }
        (*pp)->count++;
        l->nconns++;
        slot->counted = true;
    }
    l->owner->sessions++;
    smtpd_session_start(l->owner->srv, l->lc, c, refuse, listener_on_session_end, slot);
}

int
listeners_start(struct uv_loop_s *loop, const struct petrel_config *cfg, struct smtpd_server *srv,
                struct listeners **out, char **err)
{
    struct listeners *ls = xcalloc(1, sizeof(*ls));
    ls->srv = srv;
    ls->v = xcalloc(cfg->nlisteners, sizeof(*ls->v));
    for (size_t i = 0; i < cfg->nlisteners; i++) {
        struct listener *l = &ls->v[i];
        const struct listener_config *lc = &cfg->listeners[i];
        l->owner = ls;
        l->lc = lc;
        uv_tcp_init(loop, &l->tcp);
        l->tcp.data = l;
        l->open = true;
        ls->n++;
        int r = uv_tcp_bind(&l->tcp, (const struct sockaddr *)&lc->addr, 0);
        if (r == 0)
            r = uv_listen((uv_stream_t *)&l->tcp, 511, listener_on_connection);
        if (r < 0) {
            *err = xasprintf("listener %s: cannot listen on %s: %s", lc->name, lc->address,
                             uv_strerror(r));
            listeners_stop(ls);
            *out = ls;
            return -1;
        }
        log_msg(LOG_INFO, NULL, "listening on %s (listener %s)", lc->address, lc->name);
    }
    *out = ls;
    return 0;
}

static void
listener_on_close(uv_handle_t *h)
{
    struct listener *l = h->data;
    l->owner->closing_handles--;
}

void
listeners_stop(struct listeners *ls)
{
    if (ls == NULL || ls->stopped)
        return;
    ls->stopped = true;
    for (size_t i = 0; i < ls->n; i++) {
        struct listener *l = &ls->v[i];
        if (l->open) {
            l->open = false;
            ls->closing_handles++;
            uv_close((uv_handle_t *)&l->tcp, listener_on_close);
        }
    }
}

void
listeners_on_idle(struct listeners *ls, void (*cb)(void *arg), void *arg)
{
    ls->idle_cb = cb;
    ls->idle_arg = arg;
}

size_t
listeners_sessions(const struct listeners *ls)
{
    return ls->sessions;
}

void
listeners_free(struct listeners *ls)
{
    if (ls == NULL)
        return;
    if (ls->closing_handles != 0 || ls->sessions != 0)
        PANIC("listeners_free with %d handles closing, %zu sessions", ls->closing_handles,
              ls->sessions);
    for (size_t i = 0; i < ls->n; i++) {
        for (size_t b = 0; b < LISTENER_IP_BUCKETS; b++) {
            struct listener_ipcount *next;
            for (struct listener_ipcount *e = ls->v[i].ips[b]; e; e = next) {
                next = e->next;
                free(e);
            }
        }
    }
    free(ls->v);
    free(ls);
}
