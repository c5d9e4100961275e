/* fake_conn — see fake_conn.h. Output counts as sent only once flushed, so
 * tests can check that replies are flushed at the right time (RFC 2920). */
#include "fake_conn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "buf.h"
#include "config.h"
#include "conn.h"
#include "tls.h"
#include "util.h"

struct conn {
    conn_event_cb *cb;
    void *arg;
    struct buf in;
    struct buf out;       /* queued, not flushed */
    struct buf flushed;   /* flushed: what the peer would see */
    uint64_t timeout_ms;
    bool paused;
    bool closing;
    bool peer_sent;
    char peer_ip[64];
    char local_ip[64];
    int peer_port;
    struct sockaddr_storage peer;
    bool outbound;        /* made by conn_connect_* */
    bool has_src;
    bool deferred;        /* conn_defer() called */
    bool hold;            /* conn_flush() keeps output pending */
    struct sockaddr_storage src;
    char path[108];
    /* TLS */
    bool tls_started;
    bool tls_server;
    bool tls_on;
    char tls_name[256];
    conn_tls_cb *tls_cb;
    void *tls_arg;
    struct conn_tls_info tls_info;
    char tls_err[160];
    size_t tls_ntlsa;     /* TLSA records of the context conn_start_tls got */
};

static struct conn *fake_last;
static unsigned fake_connects;

struct conn *
fake_conn_new(const char *peer_ip, int peer_port, const char *local_ip)
{
    struct conn *c = xcalloc(1, sizeof(*c));
    if (!str_copy(c->peer_ip, sizeof(c->peer_ip), peer_ip)
        || !str_copy(c->local_ip, sizeof(c->local_ip), local_ip))
        PANIC("fake_conn_new: address too long");
    c->peer_port = peer_port;
    if (strchr(peer_ip, ':')) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)&c->peer;
        s6->sin6_family = AF_INET6;
        inet_pton(AF_INET6, peer_ip, &s6->sin6_addr);
        s6->sin6_port = htons((uint16_t)peer_port);
    } else {
        struct sockaddr_in *s4 = (struct sockaddr_in *)&c->peer;
        s4->sin_family = AF_INET;
        inet_pton(AF_INET, peer_ip, &s4->sin_addr);
        s4->sin_port = htons((uint16_t)peer_port);
    }
    return c;
}

void
conn_set_callback(struct conn *c, conn_event_cb *cb, void *arg)
{
    c->cb = cb;
    c->arg = arg;
}

struct buf *
conn_input(struct conn *c)
{
    return &c->in;
}

void
conn_set_input_limit(struct conn *c, size_t n)
{
    (void)c;
    (void)n;
}

void
conn_write(struct conn *c, const void *p, size_t n)
{
    buf_append(&c->out, p, n);
}

void
conn_flush(struct conn *c)
{
    if (c->hold || c->out.len == 0)
        return;
    buf_append(&c->flushed, buf_ptr(&c->out), c->out.len);
    buf_clear(&c->out);
}

size_t
conn_pending_output(const struct conn *c)
{
    return c->out.len;
}

void
conn_pause_read(struct conn *c)
{
    c->paused = true;
}

void
conn_resume_read(struct conn *c)
{
    c->paused = false;
}

void
conn_set_timeout(struct conn *c, uint64_t ms)
{
    c->timeout_ms = ms;
    c->deferred = false; /* as in conn.c: a new deadline replaces the deferral */
}

void
conn_close(struct conn *c)
{
    c->hold = false;
    conn_flush(c); /* a graceful close sends what was queued */
    c->closing = true;
}

const char *
conn_peer_ip(const struct conn *c)
{
    return c->peer_ip;
}

int
conn_peer_port(const struct conn *c)
{
    return c->peer_port;
}

const char *
conn_local_ip(const struct conn *c)
{
    return c->local_ip;
}

int
conn_local_port(const struct conn *c)
{
    (void)c;
    return 25;
}

const struct sockaddr *
conn_peer_addr(const struct conn *c)
{
    return (const struct sockaddr *)&c->peer;
}

bool
conn_peer_sent_data(const struct conn *c)
{
    return c->peer_sent || c->in.len > 0;
}

void
fake_conn_push(struct conn *c, const char *data, size_t len)
{
    if (c->closing)
        return;
    buf_append(&c->in, data, len);
    c->cb(c, CONN_EV_DATA, 0, c->arg);
}

void
fake_conn_push_str(struct conn *c, const char *s)
{
    fake_conn_push(c, s, strlen(s));
}

void
fake_conn_fire_timeout(struct conn *c)
{
    c->deferred = false;
    c->cb(c, CONN_EV_TIMEOUT, 0, c->arg);
}

void
fake_conn_eof(struct conn *c)
{
    c->cb(c, CONN_EV_EOF, 0, c->arg);
}

char *
fake_conn_take_output(struct conn *c)
{
    return buf_steal(&c->flushed, NULL);
}

bool
fake_conn_closing(const struct conn *c)
{
    return c->closing;
}

uint64_t
fake_conn_timeout(const struct conn *c)
{
    return c->timeout_ms;
}

bool
fake_conn_reading(const struct conn *c)
{
    return !c->paused;
}

void
fake_conn_set_peer_sent(struct conn *c, bool v)
{
    c->peer_sent = v;
}

void
fake_conn_finish_close(struct conn *c)
{
    if (!c->closing)
        return;
    if (fake_last == c)
        fake_last = NULL;
    c->cb(c, CONN_EV_CLOSED, 0, c->arg);
    buf_reset(&c->in);
    buf_reset(&c->out);
    buf_reset(&c->flushed);
    free(c);
}

void
fake_conn_error(struct conn *c, int status)
{
    c->cb(c, CONN_EV_ERROR, status, c->arg);
}

/* ---- outbound ---------------------------------------------------------- */

static struct conn *
fake_conn_new_outbound(conn_event_cb *cb, void *arg)
{
    struct conn *c = xcalloc(1, sizeof(*c));
    c->cb = cb;
    c->arg = arg;
    c->outbound = true;
    fake_last = c;
    fake_connects++;
    return c;
}

int
conn_connect_tcp(struct uv_loop_s *loop, const struct sockaddr *dst, const struct sockaddr *src,
                 conn_event_cb *cb, void *arg, struct conn **out)
{
    (void)loop;
    struct conn *c = fake_conn_new_outbound(cb, arg);
    size_t dlen = dst->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                             : sizeof(struct sockaddr_in);
    memcpy(&c->peer, dst, dlen);
    if (dst->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)dst;
        inet_ntop(AF_INET6, &s6->sin6_addr, c->peer_ip, sizeof(c->peer_ip));
        c->peer_port = ntohs(s6->sin6_port);
    } else {
        const struct sockaddr_in *s4 = (const struct sockaddr_in *)dst;
        inet_ntop(AF_INET, &s4->sin_addr, c->peer_ip, sizeof(c->peer_ip));
        c->peer_port = ntohs(s4->sin_port);
    }
    if (src != NULL) {
        c->has_src = true;
        memcpy(&c->src, src, src->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                                         : sizeof(struct sockaddr_in));
        if (src->sa_family == AF_INET6)
            inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)src)->sin6_addr, c->local_ip,
                      sizeof(c->local_ip));
        else
            inet_ntop(AF_INET, &((const struct sockaddr_in *)src)->sin_addr, c->local_ip,
                      sizeof(c->local_ip));
    } else if (!str_copy(c->local_ip, sizeof(c->local_ip), "127.0.0.1")) {
        PANIC("fake conn_connect_tcp: local ip");
    }
    *out = c;
    return 0;
}

int
conn_connect_unix(struct uv_loop_s *loop, const char *path, conn_event_cb *cb, void *arg,
                  struct conn **out)
{
    (void)loop;
    struct conn *c = fake_conn_new_outbound(cb, arg);
    if (!str_copy(c->path, sizeof(c->path), path))
        PANIC("fake conn_connect_unix: path too long");
    struct sockaddr_un *sun = (struct sockaddr_un *)&c->peer;
    sun->sun_family = AF_UNIX;
    memcpy(sun->sun_path, c->path, sizeof(c->path));
    *out = c;
    return 0;
}

void
conn_defer(struct conn *c)
{
    if (c->closing)
        return;
    c->timeout_ms = 0;
    c->deferred = true;
}

const char *
conn_strerror(int status)
{
    return strerror(-status);
}

struct conn *
fake_conn_last(void)
{
    return fake_last;
}

unsigned
fake_conn_connects(void)
{
    return fake_connects;
}

void
fake_conn_complete_connect(struct conn *c, int status)
{
    if (!c->outbound || c->closing)
        PANIC("fake_conn_complete_connect: not a pending outbound conn");
    c->cb(c, CONN_EV_CONNECTED, status, c->arg);
}

const struct sockaddr *
fake_conn_connect_dst(const struct conn *c)
{
    if (!c->outbound || c->path[0] != '\0')
        return NULL;
    return (const struct sockaddr *)&c->peer;
}

const struct sockaddr *
fake_conn_connect_src(const struct conn *c)
{
    return c->has_src ? (const struct sockaddr *)&c->src : NULL;
}

const char *
fake_conn_connect_path(const struct conn *c)
{
    return c->path;
}

bool
fake_conn_deferred(const struct conn *c)
{
    return c->deferred;
}

void
fake_conn_set_hold(struct conn *c, bool hold)
{
    c->hold = hold;
}

void
fake_conn_drain(struct conn *c)
{
    if (c->out.len > 0)
        buf_append(&c->flushed, buf_ptr(&c->out), c->out.len);
    buf_clear(&c->out);
    c->cb(c, CONN_EV_DRAINED, 0, c->arg);
}

/* ---- TLS ----------------------------------------------------------------- */

struct tls_ctx {
    int refs;
    bool server;
    size_t ntlsa; /* tls_client_dane: records given */
};

static int fake_tls_count;

static struct tls_ctx *
fake_tls_new(bool server)
{
    struct tls_ctx *t = xcalloc(1, sizeof(*t));
    t->refs = 1;
    t->server = server;
    fake_tls_count++;
    return t;
}

struct tls_ctx *
tls_server_new(const struct petrel_config *cfg, char **err)
{
    *err = NULL;
    if (cfg->tls.cert == NULL || strstr(cfg->tls.cert, "unloadable") != NULL) {
        *err = xasprintf("tls.cert %s: no such file", cfg->tls.cert ? cfg->tls.cert : "(none)");
        return NULL;
    }
    return fake_tls_new(true);
}

struct tls_ctx *
tls_client_new(char **err)
{
    *err = NULL;
    return fake_tls_new(false);
}

struct tls_ctx *
tls_client_shared(char **err)
{
    static struct tls_ctx shared = { .refs = 1, .server = false };
    *err = NULL;
    return &shared;
}

struct tls_ctx *
tls_client_dane(struct tls_ctx *base, const struct dane_tlsa *tlsa, size_t n, char **err)
{
    (void)tlsa;
    *err = NULL;
    if (base->server || n == 0) {
        *err = xstrdup("DANE needs a client context and TLSA records");
        return NULL;
    }
    struct tls_ctx *t = fake_tls_new(false);
    t->ntlsa = n;
    return t;
}

struct tls_ctx *
tls_ref(struct tls_ctx *t)
{
    t->refs++;
    return t;
}

void
tls_unref(struct tls_ctx *t)
{
    if (t == NULL || --t->refs > 0)
        return;
    fake_tls_count--;
    free(t);
}

bool
tls_is_server(const struct tls_ctx *t)
{
    return t->server;
}

size_t
tls_cache_count(const struct tls_ctx *t)
{
    (void)t;
    return 0;
}

int
fake_tls_live(void)
{
    return fake_tls_count;
}

int
conn_start_tls(struct conn *c, struct tls_ctx *ctx, bool server, const char *name,
               conn_tls_cb *cb, void *arg)
{
    if (ctx->server != server)
        return -EINVAL;
    if (c->tls_started)
        return -EALREADY;
    if (c->closing)
        return -ENOTCONN;
    c->tls_started = true;
    c->tls_server = server;
    c->tls_ntlsa = ctx->ntlsa;
    if (!str_copy(c->tls_name, sizeof(c->tls_name), name ? name : ""))
        PANIC("fake conn_start_tls: name too long");
    c->tls_cb = cb;
    c->tls_arg = arg;
    return 0;
}

bool
conn_tls_info(const struct conn *c, struct conn_tls_info *info)
{
    memset(info, 0, sizeof(*info));
    if (!c->tls_on)
        return false;
    *info = c->tls_info;
    return true;
}

const char *
conn_tls_error(const struct conn *c)
{
    return c->tls_err;
}

bool
fake_conn_tls_started(const struct conn *c)
{
    return c->tls_started;
}

bool
fake_conn_tls_server(const struct conn *c)
{
    return c->tls_server;
}

const char *
fake_conn_tls_name(const struct conn *c)
{
    return c->tls_name;
}

size_t
fake_conn_tls_dane(const struct conn *c)
{
    return c->tls_ntlsa;
}

void
fake_conn_complete_tls(struct conn *c, int status, const struct conn_tls_info *info,
                       const char *error)
{
    if (!c->tls_started || c->tls_cb == NULL)
        PANIC("fake_conn_complete_tls: no handshake in progress");
    conn_tls_cb *cb = c->tls_cb;
    c->tls_cb = NULL;
    if (status == 0) {
        c->tls_on = true;
        if (info != NULL) {
            c->tls_info = *info;
        } else {
            memset(&c->tls_info, 0, sizeof(c->tls_info));
            snprintf(c->tls_info.version, sizeof(c->tls_info.version), "TLSv1.3");
            snprintf(c->tls_info.cipher, sizeof(c->tls_info.cipher), "TLS_AES_256_GCM_SHA384");
            c->tls_info.bits = 256;
            c->tls_info.alg_bits = 256;
            c->tls_info.verified = !c->tls_server;
            snprintf(c->tls_info.verify, sizeof(c->tls_info.verify), "%s",
                     c->tls_server ? "none" : "ok");
        }
    } else if (!str_copy(c->tls_err, sizeof(c->tls_err), error ? error : "handshake failure")) {
        PANIC("fake_conn_complete_tls: error text too long");
    }
    if (!c->closing)
        cb(c, status, c->tls_arg);
}
