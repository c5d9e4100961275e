/*
 * hooks — the one registry every decision point goes through (DESIGN.md
 * "Lua policy API", "Milter"; issue 6). The SMTP session, the scheduler,
 * source selection and bounce generation call hooks_*, never Lua, a milter
 * or a plugin directly.
 *
 * Order at each point: the Lua hook, then the milters (where the point is a
 * milter stage: connect, helo, mail, rcpt, data, end of message), then the
 * C plugins. The first REJECT / TEMPFAIL / DISCARD / QUARANTINE stops the
 * chain and is the point's verdict. ACCEPT from Lua or a plugin means "no
 * objection" (and at rcpt_to grants relay); the engines after it still run,
 * so a DKIM-signing milter still signs what Lua accepted. Every handler may
 * answer later; the caller's session or delivery waits, the loop never does.
 *
 * Callbacks fire from a later loop iteration, never inside the call, unless
 * the call was cancelled (hook_session_cancel, hooks_call_cancel) first.
 * When neither Lua, a milter nor a plugin handles a point, hook_wants() /
 * hooks_have() say so and the caller skips the round trip.
 *
 * Reload: hooks_reload() swaps the Lua script (calls in progress finish on
 * the old state); plugins and milters are bound at start-up.
 */
#ifndef PETREL_HOOKS_H
#define PETREL_HOOKS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "lua_bridge.h"
#include "milter.h"
#include "plugin.h"
#include "util.h"
#include "verdict.h"

struct uv_loop_s;
struct petrel_config;
struct listener_config;
struct dns;
struct hooks;
struct hook_session;
struct hooks_call;

/* Loads the Lua script (cfg->lua.script) and the plugins. cfg must outlive
 * the registry (hold a reference) until hooks_reload replaces it. On failure
 * returns NULL and *err (owned by the caller): "script:line: …" or the
 * plugin's file and reason. dns is borrowed (petrel.dns.* helpers). */
struct hooks *hooks_new(struct uv_loop_s *loop, struct petrel_config *cfg, struct dns *dns,
                        char **err) __attribute__((warn_unused_result));
/* Loads cfg's script; on success new calls use it. On failure returns -1
 * with *err and the old script stays. */
int hooks_reload(struct hooks *h, struct petrel_config *cfg, char **err)
    __attribute__((warn_unused_result));
/* Every session must have been freed; pending calls are cancelled. NULL is
 * a no-op. Run the loop afterwards so timers close. */
void hooks_free(struct hooks *h);
/* The engines behind the registry (for core/hooks_delivery.c): the Lua
 * engine (NULL when no script) and the plugin set (never NULL after
 * hooks_new). Borrowed, valid until hooks_free / the next hooks_reload. */
struct plua *hooks_lua(const struct hooks *h);
struct plugins *hooks_plugins(const struct hooks *h);
const struct petrel_config *hooks_config(const struct hooks *h);

/* Whether Lua or a plugin handles point p (milters are per session: see
 * hook_wants). NULL h: false. */
bool hooks_have(const struct hooks *h, enum plugin_hook p);

/* ---- SMTP session side ---------------------------------------------- */

/* The connection, copied by hook_session_new. */
struct hook_conn {
    uint64_t session_id;
    int family;              /* AF_INET, AF_INET6, AF_UNIX */
    const char *client_ip;
    int client_port;
    const char *client_name; /* verified reverse name or NULL */
    const char *local_ip;
    int local_port;
};

/* A session's hooks: the milters that apply to listener lc (connected at
 * once), plus the registry's Lua and plugins. Returns NULL when nothing at
 * all applies to this listener (then every hook_wants is false and the
 * caller calls nothing). h may be NULL (no registry: returns NULL). */
struct hook_session *hook_session_new(struct hooks *h, const struct listener_config *lc,
                                      const struct hook_conn *ci);
/* Cancels a pending call (no callback), closes milters. NULL: no-op. */
void hook_session_free(struct hook_session *hs);

/* Whether calling the stage for p does anything (Lua, a milter, a plugin).
 * p is one of CONNECT, HELO, MAIL_FROM, RCPT_TO, DATA (the milter DATA
 * command and the end-of-message chain: ask for PLUGIN_HOOK_DATA before
 * both hook_data and hook_eom). NULL hs: false. */
bool hook_wants(const struct hook_session *hs, enum plugin_hook p);

/* Whether the DATA command itself goes to a milter (hook_data). */
bool hook_wants_data_command(const struct hook_session *hs);

/* Session facts for later stages (copied): "i" (queue id), "{auth_type}",
 * "{auth_authen}", "{tls_version}", "{cipher}", "{cipher_bits}"; NULL
 * unsets. Passed to milters as macros, to Lua/plugins in their views. */
void hook_session_set(struct hook_session *hs, const char *name, const char *value);

typedef void hook_verdict_cb(struct hook_session *hs, const struct verdict *v, void *arg);

/* The stages, in SMTP order. One at a time (PANIC otherwise); v is borrowed
 * for the duration of the callback. */
void hook_connect(struct hook_session *hs, hook_verdict_cb *cb, void *arg);
void hook_helo(struct hook_session *hs, const char *helo, hook_verdict_cb *cb, void *arg);
/* sender without <> ("" = null sender); params: ESMTP parameters as
 * received, or NULL. */
void hook_mail(struct hook_session *hs, const char *sender, const char *params,
               hook_verdict_cb *cb, void *arg);
/* One recipient. relay_ok: petrel's own relay control allows it. Lua's
 * ACCEPT grants relay; otherwise a recipient without relay_ok gets
 * R_RELAY_DENIED before the milters see it. */
void hook_rcpt(struct hook_session *hs, const char *rcpt, const char *params, bool relay_ok,
               hook_verdict_cb *cb, void *arg);
/* A transaction began without the mail_from stage (nothing hooks it):
 * records the sender and parameters the later stages show. */
void hook_txn_begin(struct hook_session *hs, const char *sender, const char *params);
/* The DATA command / the first BDAT (milters only). */
void hook_data(struct hook_session *hs, hook_verdict_cb *cb, void *arg);

/* End of message, what the caller must do. */
struct hook_eom_result {
    const struct verdict *verdict; /* CONTINUE/ACCEPT: queue it; DISCARD: 250, drop;
                                    * QUARANTINE: queue it held, reason in reply.text;
                                    * REJECT/TEMPFAIL: refuse */
    bool changed;                  /* content differs from what was given */
    struct span content;           /* the message to store (the given one if !changed) */
    const struct milter_mods *envelope; /* CHANGE_FROM, ADD_RCPT, DELETE_RCPT in order
                                         * (other kinds ignored); never NULL */
};
typedef void hook_eom_cb(struct hook_session *hs, const struct hook_eom_result *r, void *arg);
/* content: header section, empty line, body (CRLF, not dot-stuffed), as it
 * will be stored without petrel's Received line; borrowed until the
 * callback. Lua's data hook (may add headers), then each milter's end of
 * message (modifications applied), then plugins' data handlers (may add
 * headers). The result is valid until the next stage call, hook_abort or
 * hook_session_free. */
void hook_eom(struct hook_session *hs, struct span content, const char *qid, uint64_t size,
              hook_eom_cb *cb, void *arg);
/* RSET, a new MAIL, or a transaction that failed: milters get ABORT. Not
 * while a stage is pending. */
void hook_abort(struct hook_session *hs);
/* A stage waits for its callback. */
bool hook_pending(const struct hook_session *hs);
/* Drops the pending stage without a callback (the client went away). */
void hook_session_cancel(struct hook_session *hs);

/* auth / xbind: Lua's answer (true/false), then plugins'. has_answer false
 * when no handler answered (the caller keeps its own decision). */
typedef void hook_allow_cb(struct hook_session *hs, bool has_answer, bool allow, void *arg);
void hook_auth(struct hook_session *hs, const char *user, const char *password,
               hook_allow_cb *cb, void *arg);
void hook_xbind(struct hook_session *hs, const char *ip, const char *hostname,
                hook_allow_cb *cb, void *arg);

/* ---- delivery side (scheduler, source, bounce): core/hooks_delivery.c - */

/* Calls point p (ROUTE, SELECT_SOURCE, RETRY, BOUNCE, EVENT) with args:
 * Lua first; if Lua answered nothing (nil, or PLUA_NO_HOOK) the plugins.
 * res as in lua_bridge.h (route, source_ip/source_hostname, retry_set/
 * bounce/retry_seconds, subject/text); a PLUA_ERROR result means "use the
 * built-in behaviour" for these points (logged by the engine). EVENT: every
 * engine is told; cb may be NULL. Never returns NULL. */
typedef void hooks_done_cb(struct hooks_call *c, struct plua_result *res, void *arg);
struct hooks_call *hooks_call(struct hooks *h, enum plugin_hook p, const struct plua_args *args,
                              hooks_done_cb *cb, void *arg);
void hooks_call_cancel(struct hooks_call *c);

#endif
