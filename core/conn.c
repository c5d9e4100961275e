/*
 * conn — libuv stream edge. Owns the stream handle (a uv_tcp_t, or a
 * uv_pipe_t for outbound unix-domain connects), the deadline timer, the
 * input buffer and the output queue. Output is written with uv_try_write
 * first (no request object on the fast path) and the rest with one uv_write
 * whose buffer lives in `inflight` until its callback.
 * Inbound conns come from conn_accept (already connected); outbound ones
 * from conn_connect_tcp/conn_connect_unix, which report the result as
 * CONN_EV_CONNECTED from the loop: an error found before the connect is
 * under way (bind, a too-long socket path) is kept in `defer_status` and
 * delivered by the timer armed with a zero delay (libuv's delayed_error).
 * Lifetime: the conn frees itself after both handles' close callbacks ran
 * and CONN_EV_CLOSED was delivered (STYLE.md §4.3).
 *
 * TLS (conn_start_tls, h2o's socket.c read_bio/write_bio scheme): an SSL
 * object with two memory BIOs. Socket bytes land in `raw` and go into the
 * read BIO; SSL_do_handshake/SSL_read turn them into plaintext in `in`.
 * conn_write appends plaintext to `plain`; a flush runs it through
 * SSL_write, and whatever OpenSSL put in the write BIO (records, handshake
 * messages, alerts) moves to `out`, which the plaintext write path sends
 * unchanged. The engine never sees a TLS record, nor whether there are any.
 */
#include "conn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <uv.h>

#include "log.h"
#include "tls.h"
#include "util.h"

#define CONN_READ_CHUNK 65536
#define CONN_OUT_HIGH_WATER (256 * 1024)
#define CONN_CLOSE_GRACE_MS 5000
#define CONN_TLS_READ_CHUNK 16384 /* one TLS record's plaintext at most */

enum conn_tls_state {
    CONN_TLS_OFF,       /* plaintext */
    CONN_TLS_HANDSHAKE, /* conn_start_tls called, conn_tls_cb not yet fired */
    CONN_TLS_ON,        /* handshake done: application data flows */
    CONN_TLS_DEAD,      /* handshake or record layer failed: nothing flows any more */
};

struct conn {
    union {
        uv_handle_t handle;
        uv_stream_t stream;
        uv_tcp_t tcp;
        uv_pipe_t pipe;         /* outbound unix-domain conns only */
    } h;
    uv_timer_t timer;
    uv_write_t wreq;
    uv_connect_t creq;          /* outbound: the pending connect */
    conn_event_cb *cb;          /* borrowed */
    void *arg;                  /* borrowed, owned by the engine */
    struct buf in;              /* owned */
    struct buf out;             /* owned: queued, not yet handed to uv */
    struct buf inflight;        /* owned: in the pending uv_write */
    size_t input_limit;
    uint64_t timeout_ms;
    bool writing;
    bool reading;
    bool paused_user;
    bool paused_full;
    bool eof;
    bool closing;               /* conn_close called: finish output then close */
    bool handles_closing;
    bool connected;             /* accepted, or outbound connect finished */
    bool defer_pending;         /* the timer delivers defer_status as CONN_EV_CONNECTED */
    bool defer_tls;             /* ... or as the conn_tls_cb status */
    int defer_status;
    int pending_closes;
    char peer_ip[INET6_ADDRSTRLEN];
    char local_ip[INET6_ADDRSTRLEN];
    int peer_port;
    int local_port;
    struct sockaddr_storage peer;
    /* TLS (conn_start_tls) */
    SSL *ssl;                   /* owned; NULL while plaintext */
    BIO *rbio;                  /* owned by ssl: socket bytes for OpenSSL */
    BIO *wbio;                  /* owned by ssl: OpenSSL's bytes for the socket */
    struct tls_ctx *tls;        /* counted reference while ssl lives */
    enum conn_tls_state tls_state;
    conn_tls_cb *tls_cb;        /* borrowed; NULL once fired */
    void *tls_arg;              /* borrowed */
    struct buf raw;             /* owned: ciphertext read, not yet in rbio */
    struct buf plain;           /* owned: plaintext queued, encrypted on flush */
    char tls_err[160];
};

static size_t conn_live;

static void conn_update_reading(struct conn *c);
static void conn_start_write(struct conn *c);
static void conn_close_handles(struct conn *c);
static void conn_tls_on_raw(struct conn *c);
static void conn_tls_encrypt(struct conn *c);
static void conn_tls_drain(struct conn *c);
static void conn_tls_done(struct conn *c, int status);

static void
conn_emit(struct conn *c, enum conn_event ev, int status)
{
    if (c->cb)
        c->cb(c, ev, status, c->arg);
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
    c->input_limit = n;
    conn_update_reading(c);
}

static void
conn_on_alloc(uv_handle_t *h, size_t suggested, uv_buf_t *out)
{
    struct conn *c = h->data;
    (void)suggested;
    out->base = buf_reserve(c->ssl != NULL ? &c->raw : &c->in, CONN_READ_CHUNK);
    out->len = CONN_READ_CHUNK;
}

static void
conn_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    struct conn *c = s->data;
    (void)b;
    if (nread > 0 && c->ssl != NULL) {
        buf_commit(&c->raw, (size_t)nread);
        conn_tls_on_raw(c);
        return;
    }
    if (nread > 0) {
        buf_commit(&c->in, (size_t)nread);
        if (c->in.len > c->input_limit)
            c->paused_full = true;
        conn_update_reading(c);
        if (!c->closing)
            conn_emit(c, CONN_EV_DATA, 0);
        return;
    }
    if (nread == 0)
        return; /* EAGAIN */
    c->eof = true;
    conn_update_reading(c);
    if (c->closing)
        return;
    if (c->tls_state == CONN_TLS_HANDSHAKE) {
        snprintf(c->tls_err, sizeof(c->tls_err), "%s during the TLS handshake",
                 nread == UV_EOF ? "connection closed" : uv_strerror((int)nread));
        conn_tls_done(c, (int)nread);
        return;
    }
    if (nread == UV_EOF)
        conn_emit(c, CONN_EV_EOF, 0);
    else
        conn_emit(c, CONN_EV_ERROR, (int)nread);
}

static void
conn_update_reading(struct conn *c)
{
    if (c->paused_full && c->in.len <= c->input_limit)
        c->paused_full = false;
    bool want = c->connected && !c->paused_user && !c->paused_full && !c->eof
                && !c->closing && !c->handles_closing;
    if (want && !c->reading) {
        if (uv_read_start(&c->h.stream, conn_on_alloc, conn_on_read) == 0)
            c->reading = true;
    } else if (!want && c->reading) {
        uv_read_stop(&c->h.stream);
        c->reading = false;
    }
}

void
conn_pause_read(struct conn *c)
{
    c->paused_user = true;
    conn_update_reading(c);
}

void
conn_resume_read(struct conn *c)
{
    c->paused_user = false;
    conn_update_reading(c);
}

static void
conn_on_write(uv_write_t *req, int status)
{
    struct conn *c = req->data;
    c->writing = false;
    buf_clear(&c->inflight);
    if (c->handles_closing)
        return;
    if (status < 0) {
        buf_clear(&c->out);
        if (c->closing) {
            conn_close_handles(c);
            return;
        }
        conn_emit(c, CONN_EV_ERROR, status);
        return;
    }
    if (c->out.len == 0 && c->plain.len > 0)
        conn_tls_encrypt(c); /* written since the flush: sent too, as without TLS */
    if (c->out.len > 0) {
        conn_start_write(c);
        return;
    }
    if (c->closing) {
        conn_close_handles(c);
        return;
    }
    conn_emit(c, CONN_EV_DRAINED, 0);
}

static void
conn_start_write(struct conn *c)
{
    if (c->writing || c->out.len == 0 || c->handles_closing || !c->connected)
        return; /* before the connect finished, output waits in `out` */
    uv_buf_t ub = uv_buf_init((char *)buf_ptr(&c->out), (unsigned)c->out.len);
    int n = uv_try_write(&c->h.stream, &ub, 1);
    if (n > 0)
        buf_consume(&c->out, (size_t)n);
    else if (n < 0 && n != UV_EAGAIN) {
        buf_clear(&c->out);
        if (c->closing)
            conn_close_handles(c);
        /* the read side reports the error; a write-only failure shows up as
         * EOF/ERROR there soon, or as the deadline */
        return;
    }
    if (c->out.len == 0) {
        if (c->closing)
            conn_close_handles(c);
        return;
    }
    /* swap the rest into inflight: it must stay put until the callback */
    struct buf tmp = c->inflight;
    c->inflight = c->out;
    c->out = tmp;
    buf_clear(&c->out);
    ub = uv_buf_init((char *)buf_ptr(&c->inflight), (unsigned)c->inflight.len);
    c->wreq.data = c;
    if (uv_write(&c->wreq, &c->h.stream, &ub, 1, conn_on_write) == 0) {
        c->writing = true;
    } else {
        buf_clear(&c->inflight);
        if (c->closing)
            conn_close_handles(c);
    }
}

void
conn_write(struct conn *c, const void *p, size_t n)
{
    if (c->handles_closing)
        return;
    if (c->ssl != NULL) {
        if (c->tls_state == CONN_TLS_DEAD)
            return;
        buf_append(&c->plain, p, n);
        if (c->plain.len > CONN_OUT_HIGH_WATER)
            conn_flush(c);
        return;
    }
    buf_append(&c->out, p, n);
    if (c->out.len > CONN_OUT_HIGH_WATER)
        conn_start_write(c);
}

void
conn_flush(struct conn *c)
{
    if (c->ssl != NULL)
        conn_tls_encrypt(c);
    conn_start_write(c);
}

size_t
conn_pending_output(const struct conn *c)
{
    return c->out.len + c->inflight.len + c->plain.len;
}

static void
conn_on_timer(uv_timer_t *t)
{
    struct conn *c = t->data;
    if (c->defer_pending && !c->closing) {
        c->defer_pending = false;
        if (c->timeout_ms > 0) /* a deadline armed meanwhile still counts */
            uv_timer_start(&c->timer, conn_on_timer, c->timeout_ms, 0);
        if (c->defer_tls) {
            c->defer_tls = false;
            conn_tls_done(c, c->defer_status);
            return;
        }
        conn_emit(c, CONN_EV_CONNECTED, c->defer_status);
        return;
    }
    if (c->closing) {
        conn_close_handles(c); /* peer did not take our last bytes in time */
        return;
    }
    conn_emit(c, CONN_EV_TIMEOUT, 0);
}

void
conn_set_timeout(struct conn *c, uint64_t ms)
{
    if (c->closing || c->handles_closing)
        return;
    c->timeout_ms = ms;
    if (c->defer_pending)
        return; /* the timer is busy delivering the connect error first */
    if (ms == 0)
        uv_timer_stop(&c->timer);
    else
        uv_timer_start(&c->timer, conn_on_timer, ms, 0);
}

static void
conn_on_close(uv_handle_t *h)
{
    struct conn *c = h->data;
    if (--c->pending_closes > 0)
        return;
    conn_emit(c, CONN_EV_CLOSED, 0);
    buf_reset(&c->in);
    buf_reset(&c->out);
    buf_reset(&c->inflight);
    buf_reset(&c->raw);
    buf_reset(&c->plain);
    SSL_free(c->ssl); /* frees the BIOs */
    tls_unref(c->tls);
    conn_live--;
    free(c);
}

static void
conn_close_handles(struct conn *c)
{
    if (c->handles_closing)
        return;
    c->handles_closing = true;
    c->closing = true;
    if (c->reading) {
        uv_read_stop(&c->h.stream);
        c->reading = false;
    }
    uv_timer_stop(&c->timer);
    c->pending_closes = 2;
    uv_close(&c->h.handle, conn_on_close);
    uv_close((uv_handle_t *)&c->timer, conn_on_close);
}

void
conn_close(struct conn *c)
{
    if (c->closing)
        return;
    c->closing = true;
    conn_update_reading(c);
    uv_timer_start(&c->timer, conn_on_timer, CONN_CLOSE_GRACE_MS, 0);
    if (c->tls_state == CONN_TLS_ON) {
        conn_tls_encrypt(c);
        ERR_clear_error();
        if (SSL_shutdown(c->ssl) < 0) /* queues our close_notify (RFC 8446 6.1) */
            ERR_clear_error();
        conn_tls_drain(c);
    }
    conn_start_write(c);
    if (!c->writing)
        conn_close_handles(c);
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
    return c->local_port;
}

const struct sockaddr *
conn_peer_addr(const struct conn *c)
{
    return (const struct sockaddr *)&c->peer;
}

bool
conn_peer_sent_data(const struct conn *c)
{
    if (c->in.len > 0)
        return true;
    if (c->ssl != NULL && (SSL_pending(c->ssl) > 0 || BIO_ctrl_pending(c->rbio) > 0))
        return true;
    uv_os_fd_t fd;
    if (uv_fileno(&c->h.handle, &fd) != 0)
        return false;
    char byte;
    ssize_t n = recv(fd, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
    return n > 0;
}

static void
conn_addr_text(const struct sockaddr_storage *ss, char *ip, size_t size, int *port)
{
    ip[0] = '\0';
    *port = 0;
    if (ss->ss_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &sin->sin_addr, ip, (socklen_t)size);
        *port = ntohs(sin->sin_port);
    } else if (ss->ss_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)ss;
        if (IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr))
            inet_ntop(AF_INET, &sin6->sin6_addr.s6_addr[12], ip, (socklen_t)size);
        else
            inet_ntop(AF_INET6, &sin6->sin6_addr, ip, (socklen_t)size);
        *port = ntohs(sin6->sin6_port);
    }
}

int
conn_accept(struct uv_stream_s *server, struct conn **out)
{
    struct conn *c = xcalloc(1, sizeof(*c));
    int r = uv_tcp_init(server->loop, &c->h.tcp);
    if (r < 0) {
        free(c);
        return r;
    }
    uv_timer_init(server->loop, &c->timer);
    c->h.tcp.data = c;
    c->timer.data = c;
    c->input_limit = 1024 * 1024;
    conn_live++;
    r = uv_accept(server, &c->h.stream);
    if (r < 0) {
        conn_close_handles(c);
        return r;
    }
    c->connected = true;
    uv_tcp_nodelay(&c->h.tcp, 1);
    int len = sizeof(c->peer);
    uv_tcp_getpeername(&c->h.tcp, (struct sockaddr *)&c->peer, &len);
    conn_addr_text(&c->peer, c->peer_ip, sizeof(c->peer_ip), &c->peer_port);
    struct sockaddr_storage local;
    len = sizeof(local);
    memset(&local, 0, sizeof(local));
    uv_tcp_getsockname(&c->h.tcp, (struct sockaddr *)&local, &len);
    conn_addr_text(&local, c->local_ip, sizeof(c->local_ip), &c->local_port);
    *out = c;
    return 0;
}

/* ---- outbound ---------------------------------------------------------- */

/* Reports status as CONN_EV_CONNECTED from the next loop iteration (never
 * from the connect call itself, STYLE.md §8). */
static void
conn_connect_fail_later(struct conn *c, int status)
{
    c->defer_pending = true;
    c->defer_status = status;
    uv_timer_start(&c->timer, conn_on_timer, 0, 0);
}

static void
conn_on_connect(uv_connect_t *req, int status)
{
    struct conn *c = req->data;
    if (c->closing || c->handles_closing)
        return; /* closed while connecting: UV_ECANCELED, nobody listens */
    if (status < 0) {
        conn_emit(c, CONN_EV_CONNECTED, status);
        return;
    }
    c->connected = true;
    if (c->h.handle.type == UV_TCP) {
        uv_tcp_nodelay(&c->h.tcp, 1);
        struct sockaddr_storage local;
        int len = sizeof(local);
        memset(&local, 0, sizeof(local));
        if (uv_tcp_getsockname(&c->h.tcp, (struct sockaddr *)&local, &len) == 0)
            conn_addr_text(&local, c->local_ip, sizeof(c->local_ip), &c->local_port);
        struct sockaddr_storage peer;
        len = sizeof(peer);
        memset(&peer, 0, sizeof(peer));
        if (uv_tcp_getpeername(&c->h.tcp, (struct sockaddr *)&peer, &len) == 0) {
            c->peer = peer;
            conn_addr_text(&c->peer, c->peer_ip, sizeof(c->peer_ip), &c->peer_port);
        }
    }
    conn_update_reading(c);
    conn_emit(c, CONN_EV_CONNECTED, 0);
    if (!c->handles_closing)
        conn_start_write(c); /* anything queued before the connect finished */
}

/* A new outbound conn around an initialised stream handle. */
static struct conn *
conn_new_outbound(uv_loop_t *loop, conn_event_cb *cb, void *arg)
{
    struct conn *c = xcalloc(1, sizeof(*c));
    uv_timer_init(loop, &c->timer);
    c->timer.data = c;
    c->creq.data = c;
    c->cb = cb;
    c->arg = arg;
    c->input_limit = 1024 * 1024;
    conn_live++;
    return c;
}

int
conn_connect_tcp(struct uv_loop_s *loop, const struct sockaddr *dst, const struct sockaddr *src,
                 conn_event_cb *cb, void *arg, struct conn **out)
{
    struct conn *c = conn_new_outbound(loop, cb, arg);
    /* uv_tcp_init creates no socket yet (AF_UNSPEC): it cannot fail. The
     * socket comes with the bind or the connect, and their errors are
     * reported from the loop. */
    uv_tcp_init(loop, &c->h.tcp);
    c->h.tcp.data = c;
    *out = c;
    size_t dlen = dst->sa_family == AF_INET6 ? sizeof(struct sockaddr_in6)
                                             : sizeof(struct sockaddr_in);
    if (dst->sa_family != AF_INET && dst->sa_family != AF_INET6) {
        conn_connect_fail_later(c, UV_EAFNOSUPPORT);
        return 0;
    }
    memcpy(&c->peer, dst, dlen);
    conn_addr_text(&c->peer, c->peer_ip, sizeof(c->peer_ip), &c->peer_port);
    if (src != NULL) {
        int r = uv_tcp_bind(&c->h.tcp, src, 0);
        if (r < 0) {
            conn_connect_fail_later(c, r);
            return 0;
        }
    }
    int r = uv_tcp_connect(&c->creq, &c->h.tcp, dst, conn_on_connect);
    if (r < 0)
        conn_connect_fail_later(c, r);
    return 0;
}

int
conn_connect_unix(struct uv_loop_s *loop, const char *path, conn_event_cb *cb, void *arg,
                  struct conn **out)
{
    struct conn *c = conn_new_outbound(loop, cb, arg);
    uv_pipe_init(loop, &c->h.pipe, 0);
    c->h.pipe.data = c;
    *out = c;
    struct sockaddr_un *sun = (struct sockaddr_un *)&c->peer;
    sun->sun_family = AF_UNIX;
    if (!str_copy(sun->sun_path, sizeof(sun->sun_path), path)) {
        /* libuv 1.44 would silently truncate the path */
        conn_connect_fail_later(c, UV_ENAMETOOLONG);
        return 0;
    }
    uv_pipe_connect(&c->creq, &c->h.pipe, path, conn_on_connect);
    return 0;
}

void
conn_defer(struct conn *c)
{
    if (c->closing || c->handles_closing)
        return;
    c->timeout_ms = 0;
    if (c->defer_pending)
        return;
    uv_timer_start(&c->timer, conn_on_timer, 0, 0);
}

/* ---- TLS ----------------------------------------------------------------- */

/* Records why TLS failed, from SSL_get_error()'s code and the error queue. */
static void
conn_tls_set_error(struct conn *c, int ssl_error)
{
    char reason[128];
    tls_error_text(reason, sizeof(reason));
    if (reason[0] != '\0')
        snprintf(c->tls_err, sizeof(c->tls_err), "%s", reason);
    else if (ssl_error == SSL_ERROR_ZERO_RETURN)
        snprintf(c->tls_err, sizeof(c->tls_err), "peer closed the TLS session");
    else
        snprintf(c->tls_err, sizeof(c->tls_err), "TLS failure (SSL error %d)", ssl_error);
}

/* Moves what OpenSSL wrote (records, alerts) to the socket queue. */
static void
conn_tls_drain(struct conn *c)
{
    size_t pending;
    while ((pending = BIO_ctrl_pending(c->wbio)) > 0) {
        int want = pending > INT_MAX ? INT_MAX : (int)pending;
        char *p = buf_reserve(&c->out, (size_t)want);
        int n = BIO_read(c->wbio, p, want);
        if (n <= 0)
            break;
        buf_commit(&c->out, (size_t)n);
    }
}

/* The handshake ended (status 0) or failed: tell the engine once. */
static void
conn_tls_done(struct conn *c, int status)
{
    c->tls_state = status == 0 ? CONN_TLS_ON : CONN_TLS_DEAD;
    if (status != 0)
        buf_clear(&c->plain);
    conn_tls_cb *cb = c->tls_cb;
    c->tls_cb = NULL;
    if (cb != NULL && !c->closing && !c->handles_closing)
        cb(c, status, c->tls_arg);
}

/* Encrypts the queued plaintext into `out` (nothing before the handshake
 * finished: it waits). */
static void
conn_tls_encrypt(struct conn *c)
{
    if (c->tls_state != CONN_TLS_ON)
        return;
    while (c->plain.len > 0) {
        int chunk = c->plain.len > (size_t)INT_MAX ? INT_MAX : (int)c->plain.len;
        ERR_clear_error();
        int n = SSL_write(c->ssl, buf_ptr(&c->plain), chunk);
        if (n <= 0) {
            /* a memory BIO takes everything: this is a broken session */
            conn_tls_set_error(c, SSL_get_error(c->ssl, n));
            c->tls_state = CONN_TLS_DEAD;
            buf_clear(&c->plain);
            break;
        }
        buf_consume(&c->plain, (size_t)n);
    }
    conn_tls_drain(c);
}

/* Runs the handshake and decrypts what the read BIO holds. Events: the
 * conn_tls_cb when the handshake ends, then CONN_EV_DATA for new
 * plaintext, CONN_EV_EOF for the peer's close_notify, CONN_EV_ERROR
 * (UV_EPROTO) for a broken record layer. */
static void
conn_tls_pump(struct conn *c)
{
    if (c->tls_state == CONN_TLS_HANDSHAKE) {
        ERR_clear_error();
        int r = SSL_do_handshake(c->ssl);
        int e = r == 1 ? SSL_ERROR_NONE : SSL_get_error(c->ssl, r);
        if (e != SSL_ERROR_NONE && e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE)
            conn_tls_set_error(c, e);
        conn_tls_drain(c); /* our flight, or the alert that explains a failure */
        conn_start_write(c);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
            return;
        conn_tls_done(c, e == SSL_ERROR_NONE ? 0 : UV_EPROTO);
        if (c->tls_state != CONN_TLS_ON || c->closing || c->handles_closing)
            return;
        conn_flush(c); /* output the engine queued in its callback or before */
    }
    if (c->tls_state != CONN_TLS_ON || c->closing)
        return;
    size_t before = c->in.len;
    bool peer_closed = false;
    bool broken = false;
    for (;;) {
        char *p = buf_reserve(&c->in, CONN_TLS_READ_CHUNK);
        ERR_clear_error();
        int n = SSL_read(c->ssl, p, CONN_TLS_READ_CHUNK);
        if (n > 0) {
            buf_commit(&c->in, (size_t)n);
            continue;
        }
        int e = SSL_get_error(c->ssl, n);
        if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE)
            break;
        if (e == SSL_ERROR_ZERO_RETURN) {
            peer_closed = true;
        } else {
            conn_tls_set_error(c, e);
            c->tls_state = CONN_TLS_DEAD;
            broken = true;
        }
        break;
    }
    conn_tls_drain(c); /* a KeyUpdate answer, session tickets */
    conn_start_write(c);
    if (c->in.len > c->input_limit)
        c->paused_full = true;
    if (peer_closed || broken)
        c->eof = true;
    conn_update_reading(c);
    if (c->in.len > before && !c->closing)
        conn_emit(c, CONN_EV_DATA, 0);
    if (c->closing || c->handles_closing)
        return;
    if (peer_closed)
        conn_emit(c, CONN_EV_EOF, 0);
    else if (broken)
        conn_emit(c, CONN_EV_ERROR, UV_EPROTO);
}

/* Socket bytes arrived in `raw`: hand them to OpenSSL. */
static void
conn_tls_on_raw(struct conn *c)
{
    if (c->tls_state == CONN_TLS_DEAD) {
        buf_clear(&c->raw);
        return;
    }
    const char *p = buf_ptr(&c->raw);
    size_t n = c->raw.len;
    while (n > 0) {
        int w = BIO_write(c->rbio, p, n > (size_t)INT_MAX ? INT_MAX : (int)n);
        if (w <= 0)
            PANIC("BIO_write to a memory BIO failed");
        p += w;
        n -= (size_t)w;
    }
    buf_clear(&c->raw);
    conn_tls_pump(c);
}

int
conn_start_tls(struct conn *c, struct tls_ctx *ctx, bool server, const char *name,
               conn_tls_cb *cb, void *arg)
{
    if (tls_is_server(ctx) != server)
        return UV_EINVAL;
    if (c->ssl != NULL)
        return UV_EALREADY;
    if (!c->connected || c->closing || c->handles_closing || c->eof)
        return UV_ENOTCONN;
    char key[512];
    const char *cache_key = NULL;
    if (!server) {
        int n = snprintf(key, sizeof(key), "%s[%s]:%d", name ? name : "", c->peer_ip,
                         c->peer_port);
        if (n > 0 && (size_t)n < sizeof(key))
            cache_key = key;
    }
    SSL *ssl = tls_ssl_new(ctx, server ? NULL : name, cache_key, c->tls_err, sizeof(c->tls_err));
    if (ssl == NULL)
        return UV_EPROTO;
    BIO *rbio = BIO_new(BIO_s_mem());
    BIO *wbio = BIO_new(BIO_s_mem());
    if (rbio == NULL || wbio == NULL) {
        BIO_free(rbio);
        BIO_free(wbio);
        SSL_free(ssl);
        return UV_ENOMEM;
    }
    BIO_set_mem_eof_return(rbio, -1); /* empty means "wait for more", not EOF */
    SSL_set_bio(ssl, rbio, wbio);
    if (server)
        SSL_set_accept_state(ssl);
    else
        SSL_set_connect_state(ssl);
    c->ssl = ssl;
    c->rbio = rbio;
    c->wbio = wbio;
    c->tls = tls_ref(ctx);
    c->tls_state = CONN_TLS_HANDSHAKE;
    c->tls_cb = cb;
    c->tls_arg = arg;
    c->tls_err[0] = '\0';
    /* RFC 3207 §5 (CVE-2011-0411): nothing received before the handshake
     * may count as sent under TLS */
    buf_clear(&c->in);
    conn_update_reading(c);
    conn_start_write(c); /* the plaintext queued before: the 220 to STARTTLS */
    if (server)
        return 0; /* the ClientHello will come */
    ERR_clear_error();
    int r = SSL_do_handshake(ssl);
    int e = SSL_get_error(ssl, r);
    conn_tls_drain(c);
    conn_start_write(c);
    if (r != 1 && e != SSL_ERROR_WANT_READ && e != SSL_ERROR_WANT_WRITE) {
        conn_tls_set_error(c, e);
        c->tls_state = CONN_TLS_DEAD;
        c->defer_pending = true; /* the callback comes from the loop */
        c->defer_tls = true;
        c->defer_status = UV_EPROTO;
        uv_timer_start(&c->timer, conn_on_timer, 0, 0);
    }
    return 0;
}

bool
conn_tls_info(const struct conn *c, struct conn_tls_info *info)
{
    memset(info, 0, sizeof(*info));
    if (c->tls_state != CONN_TLS_ON)
        return false;
    SSL *ssl = c->ssl;
    snprintf(info->version, sizeof(info->version), "%s", SSL_get_version(ssl));
    const char *cipher = SSL_get_cipher_name(ssl);
    snprintf(info->cipher, sizeof(info->cipher), "%s", cipher ? cipher : "unknown");
    info->bits = SSL_get_cipher_bits(ssl, &info->alg_bits);
    info->resumed = SSL_session_reused(ssl) == 1;
    if (SSL_is_server(ssl)) {
        snprintf(info->verify, sizeof(info->verify), "none");
        const char *sni = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
        snprintf(info->sni, sizeof(info->sni), "%s", sni ? sni : "");
        return true;
    }
    X509 *cert = SSL_get0_peer_certificate(ssl);
    long v = SSL_get_verify_result(ssl);
    if (cert == NULL) {
        snprintf(info->verify, sizeof(info->verify), "no peer certificate");
    } else if (v == X509_V_OK) {
        info->verified = true;
        snprintf(info->verify, sizeof(info->verify), "ok");
    } else {
        snprintf(info->verify, sizeof(info->verify), "%s", X509_verify_cert_error_string(v));
    }
    if (cert != NULL) {
        char cn[sizeof(info->peer_cn)];
        int n = X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, cn,
                                          (int)sizeof(cn));
        if (n > 0)
            str_vis(info->peer_cn, sizeof(info->peer_cn), cn, (size_t)n);
    }
    return true;
}

const char *
conn_tls_error(const struct conn *c)
{
    return c->tls_err;
}

const char *
conn_strerror(int status)
{
    return uv_strerror(status);
}

size_t
conn_count(void)
{
    return conn_live;
}
