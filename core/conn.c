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
 */
#include "conn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <uv.h>

#include "log.h"
#include "util.h"

#define CONN_READ_CHUNK 65536
#define CONN_OUT_HIGH_WATER (256 * 1024)
#define CONN_CLOSE_GRACE_MS 5000

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
    int defer_status;
    int pending_closes;
    char peer_ip[INET6_ADDRSTRLEN];
    char local_ip[INET6_ADDRSTRLEN];
    int peer_port;
    int local_port;
    struct sockaddr_storage peer;
};

static size_t conn_live;

static void conn_update_reading(struct conn *c);
static void conn_start_write(struct conn *c);
static void conn_close_handles(struct conn *c);

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
    out->base = buf_reserve(&c->in, CONN_READ_CHUNK);
    out->len = CONN_READ_CHUNK;
}

static void
conn_on_read(uv_stream_t *s, ssize_t nread, const uv_buf_t *b)
{
    struct conn *c = s->data;
    (void)b;
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
    buf_append(&c->out, p, n);
    if (c->out.len > CONN_OUT_HIGH_WATER)
        conn_start_write(c);
}

void
conn_flush(struct conn *c)
{
    conn_start_write(c);
}

size_t
conn_pending_output(const struct conn *c)
{
    return c->out.len + c->inflight.len;
}

static void
conn_on_timer(uv_timer_t *t)
{
    struct conn *c = t->data;
    if (c->defer_pending && !c->closing) {
        c->defer_pending = false;
        if (c->timeout_ms > 0) /* a deadline armed meanwhile still counts */
            uv_timer_start(&c->timer, conn_on_timer, c->timeout_ms, 0);
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
