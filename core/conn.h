/*
 * conn — a byte stream (TCP or unix, optionally TLS over it) with an input
 * buffer, an output queue and one deadline timer. Engines (smtp_server,
 * smtp_client) see only this header (and tls.h to make a context): they
 * read the input buffer when told there is new data, queue output with
 * conn_write, and never touch libuv or OpenSSL. Once conn_start_tls() was
 * called, conn_input() holds decrypted bytes and conn_write() encrypts: the
 * engines' state machines do not know whether they run over TLS.
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
    CONN_EV_CONNECTED, /* outbound connect finished (status 0, or <0: connect failed) */
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
/* Outbound TCP: binds to src when non-NULL (source IP, port 0), then
 * connects to dst. CONN_EV_CONNECTED follows from the loop (status 0 or a
 * negative UV error: a bind failure such as UV_EADDRNOTAVAIL is reported
 * there too, never from this call); arm conn_set_timeout() for a connect
 * deadline (CONN_EV_TIMEOUT). The callback is set before any event.
 * Returns 0 and *out every time today (every failure, a dst that is not
 * AF_INET/AF_INET6 included, comes as CONN_EV_CONNECTED with status < 0);
 * a negative return would mean no conn was made and no event follows.
 * Output queued before CONNECTED is sent once connected; reading starts
 * then. conn_close() before CONNECTED cancels the connect (no CONNECTED,
 * CONN_EV_CLOSED follows). After a successful connect conn_peer_ip/port
 * and conn_local_ip/port hold the addresses; for a unix-domain conn they
 * are "" and 0 and conn_peer_addr() is the sockaddr_un. */
struct uv_loop_s;
struct sockaddr;
int conn_connect_tcp(struct uv_loop_s *loop, const struct sockaddr *dst,
                     const struct sockaddr *src, conn_event_cb *cb, void *arg,
                     struct conn **out) __attribute__((warn_unused_result));
/* Outbound unix-domain stream (LMTP to a local socket); as above. A path
 * that does not fit sun_path fails with UV_ENAMETOOLONG (from the loop). */
int conn_connect_unix(struct uv_loop_s *loop, const char *path, conn_event_cb *cb, void *arg,
                      struct conn **out) __attribute__((warn_unused_result));

/* Replaces the deadline by an immediate one: CONN_EV_TIMEOUT fires from
 * the next loop iteration, never from this call. Lets an engine report a
 * result it decided synchronously without re-entering its caller (STYLE.md
 * §8); a later conn_set_timeout() cancels it. No-op once closing. */
void conn_defer(struct conn *c);

/* Text for a negative status from CONN_EV_CONNECTED/CONN_EV_ERROR
 * ("connection refused"); static, never NULL. */
const char *conn_strerror(int status);

/* ---- TLS ---------------------------------------------------------------- */

struct tls_ctx;

/* Completion of conn_start_tls: status 0 (the handshake finished; read
 * conn_tls_info()), or < 0 (it failed: conn_tls_error() says why; the
 * engine should close). Fires once, from a loop callback, never from
 * conn_start_tls itself; not after conn_close(). */
typedef void conn_tls_cb(struct conn *c, int status, void *arg);

/* Switches the conn to TLS (OpenSSL over two memory BIOs): from now on the
 * socket's bytes go through the TLS engine and conn_input() receives only
 * decrypted data; conn_write() output is encrypted on flush. Input already
 * buffered (plaintext received after the STARTTLS command or its 220, i.e.
 * injected, RFC 3207 §5, CVE-2011-0411) is discarded; output queued before
 * the call is sent in plaintext first (the 220). server: accept (ctx must
 * be a tls_server_new() one); else connect, with name (may be NULL) as SNI
 * and the name the certificate is checked against, and the session cache
 * key "name[ip]:port". The conn keeps a reference on ctx. During the
 * handshake no CONN_EV_DATA/EOF/ERROR is delivered (a failure, the peer
 * closing included, comes as cb's status); CONN_EV_TIMEOUT still fires.
 * Returns 0, or a negative UV error and no callback follows: UV_EINVAL (a
 * client context for a server or the reverse), UV_EALREADY (TLS already),
 * UV_ENOTCONN (not connected, closing or at EOF), UV_EPROTO/UV_ENOMEM
 * (OpenSSL refused: conn_tls_error()). */
int conn_start_tls(struct conn *c, struct tls_ctx *ctx, bool server, const char *name,
                   conn_tls_cb *cb, void *arg) __attribute__((warn_unused_result));

/* A finished handshake, as engines log it and Received headers show it. */
struct conn_tls_info {
    char version[16];    /* "TLSv1.3" */
    char cipher[64];     /* "TLS_AES_256_GCM_SHA384" */
    int bits;            /* secret bits of the cipher (256) */
    int alg_bits;        /* bits of the algorithm (256) */
    bool resumed;        /* an earlier session was resumed */
    bool verified;       /* client: the peer's chain and name verified */
    char verify[96];     /* client: "ok" or the reason ("unable to get local issuer
                          * certificate", "hostname mismatch"); server: "none" */
    char peer_cn[128];   /* client: the peer certificate's subject CN ("" if none) */
    char sni[256];       /* server: the name the client asked for ("" if none) */
};

/* Fills info and returns true once the handshake finished; false before,
 * after a failure, or without TLS (info is then zeroed). */
bool conn_tls_info(const struct conn *c, struct conn_tls_info *info);
/* Why the handshake (or a later TLS read) failed: static or owned by the
 * conn, valid until the conn is freed; "" if nothing failed. */
const char *conn_tls_error(const struct conn *c);

/* Number of live conns (for shutdown). */
size_t conn_count(void);
#endif
