/*
 * conn — a byte stream (TCP today, TLS underneath later) with an input
 * buffer, an output queue and one deadline timer. Engines (smtp_server,
 * smtp_client) see only this header: they read the input buffer when told
 * there is new data, queue output with conn_write, and never touch libuv.
 */
#ifndef PETREL_CONN_H
#define PETREL_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"

struct conn;

enum conn_event {
    CONN_EV_DATA,    /* new bytes in conn_input() */
    CONN_EV_EOF,     /* peer closed its side; no more data will come */
    CONN_EV_ERROR,   /* read/write error (status holds the code) */
    CONN_EV_TIMEOUT, /* the deadline set with conn_set_timeout passed */
    CONN_EV_DRAINED, /* everything queued with conn_write was handed to the kernel */
    CONN_EV_CLOSED,  /* handles are closed: last event, the owner may free */
};

/* Fires on the loop thread. After CONN_EV_CLOSED the conn is freed when the
 * callback returns; never call into it again. */
typedef void conn_event_cb(struct conn *c, enum conn_event ev, int status, void *arg);

void conn_set_callback(struct conn *c, conn_event_cb *cb, void *arg);

/* Input bytes not yet consumed by the engine; the engine consumes with
 * buf_consume(). Reading pauses while more than the high-water mark is
 * buffered (the engine must consume or raise it). */
struct buf *conn_input(struct conn *c);
/* Allows up to n unconsumed input bytes before reading pauses. */
void conn_set_input_limit(struct conn *c, size_t n);

/* Queues bytes for output (copied); sent when conn_flush() is called or
 * when the queue grows past its high-water mark. */
void conn_write(struct conn *c, const void *p, size_t n);
void conn_flush(struct conn *c);
/* Bytes queued and not yet written to the kernel. */
size_t conn_pending_output(const struct conn *c);

void conn_pause_read(struct conn *c);
void conn_resume_read(struct conn *c);

/* (Re)arms the deadline: CONN_EV_TIMEOUT after ms without a call to this
 * function. 0 disarms. */
void conn_set_timeout(struct conn *c, uint64_t ms);

/* Flushes pending output, then closes (graceful); CONN_EV_CLOSED follows.
 * Idempotent. */
void conn_close(struct conn *c);

/* Addresses as text ("127.0.0.1", "::1") and ports. */
const char *conn_peer_ip(const struct conn *c);
int conn_peer_port(const struct conn *c);
const char *conn_local_ip(const struct conn *c);
int conn_local_port(const struct conn *c);
const struct sockaddr *conn_peer_addr(const struct conn *c);

/* True if the peer has sent bytes we have not read yet (early talker test). */
bool conn_peer_sent_data(const struct conn *c);



/* For the listener: accepts a pending connection on server into a new conn.
 * Returns 0 and *out, or a negative UV error. */
struct uv_stream_s;
int conn_accept(struct uv_stream_s *server, struct conn **out);
/* Number of live conns (for shutdown). */
size_t conn_count(void);
#endif
