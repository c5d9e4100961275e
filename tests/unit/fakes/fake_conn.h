/* fake_conn — stands in for core/conn.c in engine unit tests: records the
 * bytes written, lets the test push input, fire the deadline and finish a
 * close. */
#ifndef PETREL_FAKE_CONN_H
#define PETREL_FAKE_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct conn;

struct conn *fake_conn_new(const char *peer_ip, int peer_port, const char *local_ip);
/* Appends input and delivers CONN_EV_DATA. */
void fake_conn_push(struct conn *c, const char *data, size_t len);
void fake_conn_push_str(struct conn *c, const char *s);
/* Delivers CONN_EV_TIMEOUT / CONN_EV_EOF. */
void fake_conn_fire_timeout(struct conn *c);
void fake_conn_eof(struct conn *c);
/* Bytes flushed so far (NUL-terminated), then cleared. Caller frees. */
char *fake_conn_take_output(struct conn *c);
bool fake_conn_closing(const struct conn *c);
uint64_t fake_conn_timeout(const struct conn *c);
bool fake_conn_reading(const struct conn *c);
/* Delivers CONN_EV_CLOSED if conn_close was called; the conn is freed. */
void fake_conn_finish_close(struct conn *c);
/* Makes conn_peer_sent_data() report pending data. */
void fake_conn_set_peer_sent(struct conn *c, bool v);
/* Delivers CONN_EV_ERROR with status (a negative UV-style code). */
void fake_conn_error(struct conn *c, int status);

/* Outbound conns made by the fake conn_connect_tcp/conn_connect_unix: they
 * record the target and wait for the test to finish the connect. */
struct sockaddr;
/* The conn made by the latest connect call (NULL once it was freed). */
struct conn *fake_conn_last(void);
/* Number of connect calls so far (both kinds). */
unsigned fake_conn_connects(void);
/* Delivers CONN_EV_CONNECTED with status (0, or e.g. -ECONNREFUSED). */
void fake_conn_complete_connect(struct conn *c, int status);
/* The connect's destination and bind address (NULL: none / unix). */
const struct sockaddr *fake_conn_connect_dst(const struct conn *c);
const struct sockaddr *fake_conn_connect_src(const struct conn *c);
/* The unix socket path ("" for TCP). */
const char *fake_conn_connect_path(const struct conn *c);
/* True if conn_defer() was called and fake_conn_fire_timeout() not yet. */
bool fake_conn_deferred(const struct conn *c);
/* hold: conn_flush() keeps the bytes pending (conn_pending_output() > 0)
 * until fake_conn_drain() moves them out and delivers CONN_EV_DRAINED. */
void fake_conn_set_hold(struct conn *c, bool hold);
void fake_conn_drain(struct conn *c);

/* TLS. conn_start_tls() records the call (it does not discard buffered
 * input, unlike conn.c, so tests see the engine discard it itself) and
 * waits for the test to finish the handshake. The tls.h context functions
 * are faked too: tls_server_new() fails when tls.cert contains "unloadable",
 * other contexts are counted dummies. */
struct conn_tls_info;
bool fake_conn_tls_started(const struct conn *c);
bool fake_conn_tls_server(const struct conn *c);
/* The client's SNI/verification name ("" for none). */
const char *fake_conn_tls_name(const struct conn *c);
/* TLSA records of the context the handshake uses (tls_client_dane()'s n;
 * 0 for a plain context). */
size_t fake_conn_tls_dane(const struct conn *c);
/* Delivers the conn_tls_cb: status 0 with info (NULL: TLSv1.3,
 * TLS_AES_256_GCM_SHA384, 256/256 bits, verified) or < 0 with error as
 * conn_tls_error(). */
void fake_conn_complete_tls(struct conn *c, int status, const struct conn_tls_info *info,
                            const char *error);
/* Live fake TLS contexts (leak checks). */
int fake_tls_live(void);

#endif
