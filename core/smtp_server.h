/*
 * smtp_server — the SMTP server session state machine (RFC 5321 with
 * PIPELINING, SIZE, 8BITMIME, ENHANCEDSTATUSCODES, SMTPUTF8, CHUNKING, DSN,
 * STARTTLS (RFC 3207) and implicit TLS (RFC 8314)).
 * An engine: it talks to the client through conn.h and persists through
 * spool.h; it never touches libuv directly.
 */
#ifndef PETREL_SMTP_SERVER_H
#define PETREL_SMTP_SERVER_H

#include <stdbool.h>
#include <stddef.h>

#include "config.h"
#include "reply.h"

struct auth_db;
struct auth_limiter;
struct auth_verifier;
struct conn;
struct hooks;
struct spool;
struct smtpd_server;

/* Creates the server-wide state. Takes a reference on cfg; spool is
 * borrowed and must outlive the server. Loads the TLS certificate(s) when
 * tls.cert is set (start-up only: reads files) and logs what TLS the
 * listeners get ("TLS: no certificate configured; STARTTLS not offered"). */
struct smtpd_server *smtpd_server_new(struct petrel_config *cfg, struct spool *spool);
/* Why the TLS certificate (tls.cert, tls.certificates) did not load, or
 * NULL (loaded, or none configured). The server runs without it: STARTTLS
 * is not offered (454 if tried) and implicit-TLS listeners close their
 * connections; the caller may prefer to refuse to start. Valid until
 * smtpd_server_free. */
const char *smtpd_server_tls_error(const struct smtpd_server *srv);
/* Frees the server; every session must have ended. NULL is a no-op. */
void smtpd_server_free(struct smtpd_server *srv);

/* SMTP AUTH: the users file, the password checker and the failure
 * limiter (all borrowed, server-wide, may be NULL: no users file, no
 * checks / no limit). */
void smtpd_server_set_auth(struct smtpd_server *srv, const struct auth_db *db,
                           struct auth_verifier *av, struct auth_limiter *lim);

/* The hook registry (Lua, milters, plugins) sessions started from now on
 * consult; borrowed, must outlive them. NULL: none. */
void smtpd_server_set_hooks(struct smtpd_server *srv, struct hooks *h);

/* Called after a message is durably queued (before its 250 is sent). */
typedef void smtpd_queued_cb(const char *qid, void *arg);
void smtpd_server_on_queued(struct smtpd_server *srv, smtpd_queued_cb *cb, void *arg);

/* Called once when a session has ended and its conn is closed. */
typedef void smtpd_session_end_cb(void *arg);

/* Starts a session on an accepted connection (the session owns conn from
 * now on). lc is borrowed from the server's config. If refuse is non-NULL
 * the client gets it as its banner and the connection is closed (limits).
 * end_cb fires once, after the conn is closed. */
void smtpd_session_start(struct smtpd_server *srv, const struct listener_config *lc,
                         struct conn *c, const struct reply *refuse,
                         smtpd_session_end_cb *end_cb, void *end_arg);

/* Graceful stop: idle sessions get 421 4.3.2 and are closed now; a session
 * inside a transaction may finish it, then gets 421. */
void smtpd_server_shutdown(struct smtpd_server *srv);
/* Closes every remaining session at once (shutdown timeout). */
void smtpd_server_abort_all(struct smtpd_server *srv);
size_t smtpd_server_sessions(const struct smtpd_server *srv);

#endif
