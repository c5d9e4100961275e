/*
 * lua_bridge — the Lua 5.4 policy engine (DESIGN.md "Lua policy API").
 *
 * One Lua state on the loop thread, loaded from lua.script; petrel.on(name,
 * fn) registers hooks. Engines call a hook with plua_call(): the hook runs on
 * its own coroutine, may yield to the loop through petrel.sleep(),
 * petrel.dns.mx() and petrel.dns.a(), and its outcome comes back through a
 * callback from a later loop iteration (never inside plua_call()), unless
 * the call was cancelled.
 *
 * Objects given to a hook (conn, txn, msg, reply, ev, failures) are
 * read-only views holding copies of the data in plua_args; they expire when
 * the call ends: touching one afterwards raises the Lua error "attempt to
 * use an expired view" in the script, never a dangling pointer in C.
 *
 * Time limits. While a hook runs, a count hook (LUA_MASKCOUNT, every
 * PLUA_COUNT_STEP instructions) checks two budgets summed over every resume
 * of the call: PLUA_INSNS_PER_MS × lua.timeout_ms instructions (about what
 * Lua 5.4 executes in that time on a slow core), and lua.timeout_ms of wall
 * clock. Time spent suspended in petrel.sleep or a DNS lookup does not
 * count; instead the whole call has a wall-clock deadline of
 * PLUA_DEADLINE_FACTOR × lua.timeout_ms (at least PLUA_DEADLINE_MIN_MS), after
 * which the pending lookup or sleep is cancelled and the call fails. Any
 * failure (a Lua error, a bad return value, a budget or the deadline
 * exceeded) is logged with the script's file and line and completes with
 * status PLUA_ERROR and the lua.on_error verdict.
 */
#ifndef PETREL_LUA_BRIDGE_H
#define PETREL_LUA_BRIDGE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "header.h"
#include "verdict.h"

struct uv_loop_s;
struct petrel_config;
struct dns;
struct plua;
struct plua_call;

#define PLUA_COUNT_STEP 1000     /* instructions between count-hook checks */
#define PLUA_INSNS_PER_MS 100000 /* instruction budget per ms of lua.timeout */
#define PLUA_DEADLINE_FACTOR 10  /* whole-call deadline: this × lua.timeout */
#define PLUA_DEADLINE_MIN_MS 1000
#define PLUA_MAX_ADD_HEADERS 64 /* msg:add_header() calls per call */

/* Header fields (header.h): borrowed in plua_args; in plua_result
 * (add_headers) both strings are owned by the result. */

struct plua_failure { /* one failed recipient, for the bounce hook */
    const char *rcpt; /* borrowed */
    int code;
    const char *esc;  /* borrowed */
    const char *text; /* borrowed */
};

/* What a hook is called with. Every pointer is borrowed for the duration of
 * plua_call() only: the bridge copies what it needs. NULL strings become nil.
 * Which fields a hook sees (DESIGN.md table):
 *   connect(conn) · helo(conn, helo) · auth(conn, user, password) ·
 *   mail_from(txn) · rcpt_to(txn, rcpt) · data(txn, msg) ·
 *   xbind(conn, xbind_ip, xbind_hostname) · route(msg, rcpt) ·
 *   select_source(msg, destination) · retry(msg, rcpt, attempt, reply) ·
 *   bounce(msg, failures) · event(ev)
 * conn = {ip, port, local_ip, listener, helo, user (after AUTH; not in the
 * auth hook)}; txn = {conn, from, params};
 * msg = {id, from, size, age, headers = {{name, value}, …}} (age: seconds since
 * the message was queued) with msg:header(name)
 * and, in the data hook only, msg:add_header(name, value);
 * reply = {code, enhanced, text}; ev = {type, id, rcpt, reply}. */
struct plua_args {
    const char *ip, *local_ip, *listener;
    int port;
    const char *helo;
    const char *user, *password;
    const char *from, *params;
    const char *rcpt;
    const char *queue_id; /* also the log key; NULL: NOQUEUE */
    const struct header_field *headers;
    size_t nheaders;
    uint64_t size;
    uint64_t age; /* seconds since queued (msg.age) */
    const char *xbind_ip, *xbind_hostname;
    const char *destination;
    unsigned attempt;
    int reply_code; /* retry / event: 0 = no reply */
    const char *reply_esc, *reply_text;
    const struct plua_failure *failures;
    size_t nfailures;
    const char *event_type; /* "delivered", "deferred", "bounced" */
};

enum plua_status {
    PLUA_OK = 0,  /* the hook ran; the fields for its kind are set */
    PLUA_NO_HOOK, /* no such hook registered: defaults (verdict CONTINUE) */
    PLUA_ERROR,   /* Lua error, bad return value, timeout: verdict = on_error,
                   * error = the message (script:line: …) */
};

/* The outcome of one call. Everything is owned by the result: the callback
 * may take pieces (verdict_move, or steal a pointer and set it to NULL);
 * the rest is freed when the callback returns. */
struct plua_result {
    enum plua_status status;
    char *error; /* owned: PLUA_ERROR's message, else NULL */
    /* connect, helo, mail_from, rcpt_to, data (and on_error for any hook) */
    struct verdict verdict;
    struct header_field *add_headers; /* owned (names and values too): data hook */
    size_t nadd_headers;
    /* auth, xbind: what the hook returned (false for nil); answered: true or
     * false was returned (nil: no opinion, the built-in check decides) */
    bool allow;
    bool answered;
    /* route: NULL when the hook returned nil */
    char *route; /* owned */
    /* select_source: NULL when nil */
    char *source_ip, *source_hostname; /* owned */
    /* retry: retry_set false when nil (use the schedule) */
    bool retry_set;
    bool bounce; /* "bounce" was returned */
    uint64_t retry_seconds;
    /* bounce: NULL when nil */
    char *subject, *text; /* owned */
};

/* Frees and clears everything a hook answered besides its verdict: added
 * headers, route, source, retry decision, bounce text, allow/answered.
 * status, error and verdict stay. Shared by the Lua and plugin engines (a
 * failed call keeps nothing it produced). */
static inline void
plua_result_drop_answers(struct plua_result *r)
{
    for (size_t i = 0; i < r->nadd_headers; i++) {
        free((char *)r->add_headers[i].name);
        free((char *)r->add_headers[i].value);
    }
    free(r->add_headers);
    r->add_headers = NULL;
    r->nadd_headers = 0;
    char **strs[] = {&r->route, &r->source_ip, &r->source_hostname, &r->subject, &r->text};
    for (size_t i = 0; i < sizeof(strs) / sizeof(strs[0]); i++) {
        free(*strs[i]);
        *strs[i] = NULL;
    }
    r->retry_set = r->bounce = false;
    r->retry_seconds = 0;
    r->allow = r->answered = false;
}

/* Fires once per plua_call(), from a later loop iteration (a timer, or the
 * DNS completion that resumed the hook), unless the call was cancelled
 * first. c is freed when the callback returns; plua_cancel(c) inside it is
 * a no-op. The callback may start new calls and cancel other ones, but must
 * not plua_close(). */
typedef void plua_cb(struct plua_call *c, struct plua_result *res, void *arg);

/* Creates the engine and loads cfg->lua.script (NULL: no script, every hook
 * absent); the script's directory is put first in package.path so require
 * finds modules beside it. cfg is read during the call only (on_error,
 * timeout_ms are copied). dns is borrowed (may be NULL: petrel.dns.* then
 * fail); it must outlive the engine. On failure returns NULL and sets *err
 * (owned by the caller) to "script:line: message". */
struct plua *plua_open(struct uv_loop_s *loop, const struct petrel_config *cfg, struct dns *dns,
                       char **err) __attribute__((warn_unused_result));
/* Loads cfg's script into a new state and makes it current: new calls use
 * it, calls in progress finish on the state they started on (freed when the
 * last ends). On failure returns -1 with *err, the old state stays. */
int plua_reload(struct plua *p, const struct petrel_config *cfg, char **err)
    __attribute__((warn_unused_result));
/* Cancels every call (no callbacks) and frees everything; timers close on
 * the loop: run it before uv_loop_close(). NULL is a no-op. */
void plua_close(struct plua *p);

/* Whether the current script registered hook name. */
bool plua_has_hook(struct plua *p, const char *name);
/* The known hook names: connect, helo, auth, mail_from, rcpt_to, data, xbind,
 * route, select_source, retry, bounce, event. */
bool plua_hook_known(const char *name);

/* Calls hook name with args; cb fires later with the result (PLUA_NO_HOOK
 * if not registered). Never returns NULL. */
struct plua_call *plua_call(struct plua *p, const char *name, const struct plua_args *args,
                            plua_cb *cb, void *arg);
/* The callback will not fire; a pending sleep or lookup is cancelled, the
 * coroutine abandoned, c freed. NULL and a call whose callback is running
 * are no-ops. */
void plua_cancel(struct plua_call *c);
/* Calls in progress (for tests and shutdown). */
size_t plua_pending(const struct plua *p);

#endif
