/* fake_conn — see fake_conn.h. Output counts as sent only once flushed, so
 * tests can check that replies are flushed at the right time (RFC 2920). */
#include "fake_conn.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>

#include "buf.h"
#include "conn.h"
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
};

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
}

void
conn_close(struct conn *c)
{
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
    c->cb(c, CONN_EV_CLOSED, 0, c->arg);
    buf_reset(&c->in);
    buf_reset(&c->out);
    buf_reset(&c->flushed);
    free(c);
}
