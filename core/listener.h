/*
 * listener — listening sockets and connection admission: accepts clients,
 * enforces each listener's max_connections and max_connections_per_ip (the
 * excess gets a 421 banner) and hands accepted connections to smtp_server.
 */
#ifndef PETREL_LISTENER_H
#define PETREL_LISTENER_H

#include "config.h"

struct uv_loop_s;
struct smtpd_server;
struct listeners;

/* Binds and listens on every configured listener. cfg and srv are borrowed
 * and must outlive the listeners. Returns 0, or -1 with *err (owned). */
int listeners_start(struct uv_loop_s *loop, const struct petrel_config *cfg,
                    struct smtpd_server *srv, struct listeners **out, char **err)
    __attribute__((warn_unused_result));

/* Stops accepting: closes the listening sockets (sessions go on). */
void listeners_stop(struct listeners *l);

/* Called when the last session ended after listeners_stop (may be NULL). */
void listeners_on_idle(struct listeners *l, void (*cb)(void *arg), void *arg);

/* Live sessions across all listeners. */
size_t listeners_sessions(const struct listeners *l);

/* Frees everything; the loop must have closed the handles (call after
 * listeners_stop and uv_run). NULL is a no-op. */
void listeners_free(struct listeners *l);

#endif
