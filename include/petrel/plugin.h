/*
 * petrel/plugin.h — the C plugin ABI of petrel, version 1.
 *
 * A plugin is a shared object listed in the configuration:
 *
 *     plugins:
 *       - path: /usr/lib/petrel/plugins/ratelimit.so
 *         config: { connections: 20, window: 60 }
 *
 * Build one with nothing but this header:
 *
 *     cc -shared -fPIC -I/path/to/petrel/include -o hello.so hello.c
 *
 * Loading. At start-up (and in `petrel check-config`) petrel dlopen()s each
 * file with RTLD_NOW | RTLD_LOCAL, looks up the one symbol a plugin exports,
 *
 *     int petrel_plugin_init(const struct petrel_host *host, struct petrel_plugin *p);
 *
 * and calls it once per plugins[] entry with the host API and a zeroed
 * struct petrel_plugin, which init fills: abi_version =
 * PETREL_PLUGIN_ABI_VERSION, size = sizeof(struct petrel_plugin), a name,
 * a data pointer, an unload function and one handler per hook it wants. A
 * missing file or symbol, an init that returns non-zero, an abi_version or
 * size other than petrel's is a configuration error naming the file
 * ("/x.so: ABI version 99, petrel speaks 1"): petrel refuses to start.
 * The same file listed twice is mapped once (dlopen shares it) but init is
 * called twice: keep per-instance state in `data`, not in globals.
 *
 * Calls. Handlers run on petrel's event-loop thread; they must not block
 * (no blocking I/O, no sleep): a handler that needs to wait returns
 * PETREL_PENDING, arms its own libuv handles on host->loop(), and calls
 * host->complete(ctx) later from the loop thread. For each call the
 * handlers of every plugin run in plugins[] order, one after the other:
 *   - connect, helo, mail_from, rcpt_to, data: the first verdict other than
 *     CONTINUE ends the call; headers added at data accumulate;
 *   - route, select_source, retry, bounce: the first handler that sets a
 *     value ends the call;
 *   - auth, xbind: the first handler that answers (set_allow) ends it;
 *   - event: every handler is called.
 * The Lua hooks and the milters run before the plugins (DESIGN.md); a
 * plugin sees the call only if they did not already decide.
 *
 * Errors. A handler that returns PETREL_ERROR, calls host->fail(), passes
 * a setter an invalid value (a reject with a 2xx code, a malformed
 * enhanced status code, a route that does not parse) or uses a setter its
 * hook does not have fails the call: petrel logs the plugin's name and the
 * reason, and applies lua.on_error (tempfail by default: 451 4.3.0 to the
 * client; the built-in behaviour for delivery hooks). Nothing else the
 * handler set is used.
 *
 * Strings. Everything an accessor returns is borrowed: valid until the
 * handler returns PETREL_OK (or PETREL_ERROR), or, for a handler that
 * returned PETREL_PENDING, until it calls host->complete(ctx). Copy what
 * you keep. Strings passed to setters are copied at once. Peer data
 * (HELO name, addresses, headers) is as the client sent it: treat it as
 * untrusted. Every string is NUL-terminated; a field the hook does not
 * have is NULL (numbers: 0).
 *
 * Compatibility. PETREL_PLUGIN_ABI_VERSION changes whenever a type, a
 * value or a function of this header changes meaning; then plugins must be
 * rebuilt. Within one version, functions are only ever appended to struct
 * petrel_host (its size grows): a plugin built against an older header
 * keeps working, and one built against a newer header can test for a
 * function with PETREL_HOST_HAS(host, member).
 */
#ifndef PETREL_PUBLIC_PLUGIN_H
#define PETREL_PUBLIC_PLUGIN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PETREL_PLUGIN_ABI_VERSION 1

/* What a handler returns. */
#define PETREL_OK 0       /* done: the setters called say what (none: no objection) */
#define PETREL_PENDING 1  /* the answer comes later: call host->complete(ctx) */
#define PETREL_ERROR (-1) /* the handler failed: lua.on_error applies (see host->fail) */

/* The points petrel calls plugins at (DESIGN.md "Lua policy API"), in SMTP
 * and delivery order. Which accessors have data, and which setters apply:
 *
 *   hook           data (accessors)                          answer (setters)
 *   connect        client_ip/port, local_ip, listener        set_verdict
 *   helo           + helo                                    set_verdict
 *   auth           + helo, auth_user, auth_password          set_allow
 *   mail_from      + helo, sender, sender_params             set_verdict
 *   rcpt_to        + sender, rcpt                            set_verdict
 *   data           + sender, queue_id, message_size, headers set_verdict, add_header
 *   xbind          connection, xbind_ip, xbind_hostname      set_allow
 *   route          queue_id, sender, rcpt, message_*         set_route
 *   select_source  queue_id, sender, destination, message_*  set_source
 *   retry          queue_id, sender, rcpt, attempt, reply_*  set_retry, set_retry_bounce
 *   bounce         queue_id, sender, failures                set_bounce_text
 *   event          event_type, queue_id, rcpt, reply_*       (none)
 *
 * (The exact set depends on what the caller knows; always check for NULL.) */
enum petrel_hook {
    PETREL_HOOK_CONNECT,
    PETREL_HOOK_HELO,
    PETREL_HOOK_AUTH,
    PETREL_HOOK_MAIL_FROM,
    PETREL_HOOK_RCPT_TO,
    PETREL_HOOK_DATA,
    PETREL_HOOK_XBIND,
    PETREL_HOOK_ROUTE,
    PETREL_HOOK_SELECT_SOURCE,
    PETREL_HOOK_RETRY,
    PETREL_HOOK_BOUNCE,
    PETREL_HOOK_EVENT,
    PETREL_HOOK_COUNT
};

/* A verdict at connect, helo, mail_from, rcpt_to and data. */
enum petrel_verdict {
    PETREL_VERDICT_CONTINUE,  /* no objection: the next plugin decides (the default) */
    PETREL_VERDICT_ACCEPT,    /* no objection, and stop asking plugins; at rcpt_to it
                               * grants relaying */
    PETREL_VERDICT_REJECT,    /* refuse with a 5xx reply */
    PETREL_VERDICT_TEMPFAIL,  /* refuse with a 4xx reply */
    PETREL_VERDICT_DISCARD,   /* tell the client 250, then drop the message (logged) */
    PETREL_VERDICT_QUARANTINE /* accept and hold the message undelivered; text = reason */
};

enum petrel_log_level {
    PETREL_LOG_ERROR,   /* an admin must act */
    PETREL_LOG_WARNING, /* degraded service */
    PETREL_LOG_INFO,    /* an event */
    PETREL_LOG_DEBUG    /* shown with log.level: debug */
};

/* One call of one hook: the data the handler reads and the answer it
 * gives. Opaque; valid as described under "Strings" above. */
struct petrel_ctx;
struct petrel_host;

/* A handler: returns PETREL_OK, PETREL_PENDING or PETREL_ERROR. data is
 * the plugin's struct petrel_plugin.data. */
typedef int petrel_hook_cb(struct petrel_ctx *ctx, void *data);
/* Called once when petrel shuts down (or when a later plugin fails to load
 * during start-up), after every call in progress was cancelled. It must
 * close the plugin's libuv handles (petrel dlclose()s the object only after
 * the loop ran their close callbacks) and leave no request in flight.
 * Contexts still pending are freed by petrel after unload returns: do not
 * complete them afterwards. */
typedef void petrel_unload_cb(void *data);

/* Filled by petrel_plugin_init. petrel zeroes it before the call. */
struct petrel_plugin {
    uint32_t abi_version;     /* = PETREL_PLUGIN_ABI_VERSION */
    uint32_t size;            /* = sizeof(struct petrel_plugin) */
    const char *name;         /* shown in logs as plugin=<name>; static or valid until
                               * unload; NULL: the file name without ".so" */
    void *data;               /* passed to every handler and to unload */
    petrel_unload_cb *unload; /* may be NULL */
    petrel_hook_cb *handlers[PETREL_HOOK_COUNT]; /* indexed by enum petrel_hook; NULL: not
                                                  * interested (petrel skips the call) */
};

/* The host API, given to petrel_plugin_init; valid until unload returns.
 * Each plugins[] entry gets its own host pointer (it knows the plugin's
 * name and config): pass it back as `host`. Functions taking a ctx work on
 * any context the plugin holds. */
struct petrel_host {
    uint32_t abi_version; /* = PETREL_PLUGIN_ABI_VERSION of petrel */
    uint32_t size;        /* = sizeof(struct petrel_host) of petrel */

    /* ---- the plugin ---------------------------------------------------- */

    /* Writes one log line "petrel: plugin=<name>, <message>" at level
     * (enum petrel_log_level); control characters in the message are
     * escaped, and it is cut at about 1000 bytes. Usable from init on
     * (until init returns, <name> is the file name without ".so"). */
    void (*log)(const struct petrel_host *host, int level, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));
    /* The value of key in this entry's plugins[].config map (scalars as
     * written in YAML, "" for an empty value), or NULL when absent.
     * Borrowed, valid until unload. */
    const char *(*config)(const struct petrel_host *host, const char *key);
    /* The i-th key of that map (0-based, in file order), or NULL past the
     * end: lets init refuse keys it does not know. */
    const char *(*config_key)(const struct petrel_host *host, size_t i);
    /* petrel's event loop, a uv_loop_t * (libuv 1.x): arm timers and I/O
     * on it for asynchronous handlers. Never block it. */
    void *(*loop)(const struct petrel_host *host);
    /* A monotonic clock in milliseconds: the loop's time (uv_now), updated
     * at the start of each loop iteration. */
    uint64_t (*now_ms)(const struct petrel_host *host);

    /* ---- a call: what it is about (see enum petrel_hook) ---------------- */

    /* The hook being called. */
    enum petrel_hook (*hook)(const struct petrel_ctx *ctx);
    /* The SMTP client's address ("192.0.2.1", "2001:db8::1") and port;
     * NULL / 0 on a unix socket or for delivery hooks. */
    const char *(*client_ip)(const struct petrel_ctx *ctx);
    int (*client_port)(const struct petrel_ctx *ctx);
    /* The address the client connected to, and the listener's name. */
    const char *(*local_ip)(const struct petrel_ctx *ctx);
    const char *(*listener)(const struct petrel_ctx *ctx);
    /* The HELO/EHLO argument. */
    const char *(*helo)(const struct petrel_ctx *ctx);
    /* AUTH (auth hook): the user name and the password the client gave.
     * Never log the password. */
    const char *(*auth_user)(const struct petrel_ctx *ctx);
    const char *(*auth_password)(const struct petrel_ctx *ctx);
    /* MAIL FROM address without <> ("" for the null sender) and its ESMTP
     * parameters as received (NULL: none). */
    const char *(*sender)(const struct petrel_ctx *ctx);
    const char *(*sender_params)(const struct petrel_ctx *ctx);
    /* The recipient (rcpt_to, route, retry, event), without <>. */
    const char *(*rcpt)(const struct petrel_ctx *ctx);
    /* The message's queue id; NULL before one exists (then logs say
     * NOQUEUE). */
    const char *(*queue_id)(const struct petrel_ctx *ctx);
    /* The message size in bytes, and its age in seconds since it was
     * queued (delivery hooks). */
    uint64_t (*message_size)(const struct petrel_ctx *ctx);
    uint64_t (*message_age)(const struct petrel_ctx *ctx);
    /* Message headers in order (data and delivery hooks): how many there
     * are; the value of the i-th, with its name in *name (name may be
     * NULL), or NULL past the end; the value of the index-th (0-based)
     * header called name (ASCII case-insensitive), or NULL. Values are
     * unfolded as received, without the leading space. Headers added by
     * add_header are not listed. */
    size_t (*header_count)(const struct petrel_ctx *ctx);
    const char *(*header_at)(const struct petrel_ctx *ctx, size_t i, const char **name);
    const char *(*header)(const struct petrel_ctx *ctx, const char *name, size_t index);
    /* XCLIENT-style binding request (xbind hook): the source IP and the
     * hostname asked for. */
    const char *(*xbind_ip)(const struct petrel_ctx *ctx);
    const char *(*xbind_hostname)(const struct petrel_ctx *ctx);
    /* select_source: the destination key ("mx:example.org",
     * "smtp:[192.0.2.1]:25"). */
    const char *(*destination)(const struct petrel_ctx *ctx);
    /* retry: the attempt that just failed (1 = the first). */
    unsigned (*attempt)(const struct petrel_ctx *ctx);
    /* retry, event: the remote reply (code 0 and NULLs when there was
     * none, e.g. a connection failure): code, enhanced code ("4.2.0"),
     * text. */
    int (*reply_code)(const struct petrel_ctx *ctx);
    const char *(*reply_enhanced)(const struct petrel_ctx *ctx);
    const char *(*reply_text)(const struct petrel_ctx *ctx);
    /* event: "delivered", "deferred" or "bounced". */
    const char *(*event_type)(const struct petrel_ctx *ctx);
    /* bounce: the failed recipients. failure_at fills what is non-NULL and
     * returns 0, or -1 past the end. */
    size_t (*failure_count)(const struct petrel_ctx *ctx);
    int (*failure_at)(const struct petrel_ctx *ctx, size_t i, const char **rcpt, int *code,
                      const char **enhanced, const char **text);
    /* Whether petrel stopped waiting for this call (the client went away,
     * shutdown). A pending handler may stop early; it must still call
     * complete(ctx), which then only frees the context. */
    bool (*cancelled)(const struct petrel_ctx *ctx);
    /* Like log, keyed by the call's queue id (or NOQUEUE). */
    void (*ctx_log)(const struct petrel_ctx *ctx, int level, const char *fmt, ...)
        __attribute__((format(printf, 3, 4)));

    /* ---- a call: the answer --------------------------------------------
     * Setters return 0, or -1 when the value is invalid or the hook has no
     * such answer; then the call fails (see "Errors" above). Calling one
     * again replaces the earlier value (add_header appends). */

    /* The verdict (connect, helo, mail_from, rcpt_to, data). kind is an
     * enum petrel_verdict. REJECT needs a 5xx code, TEMPFAIL a 4xx one;
     * text is "x.y.z text" where x.y.z is an RFC 3463 enhanced status code
     * of the same class (5.7.1 / 4.7.1 when text does not start with one),
     * without CR or LF, at most 400 bytes. CONTINUE, ACCEPT and DISCARD
     * take code 0 and text NULL; QUARANTINE takes code 0 and the reason as
     * text. */
    int (*set_verdict)(struct petrel_ctx *ctx, int kind, int code, const char *text);
    /* data: adds the header "name: value" to the message, after its
     * existing headers, in the order added. name is 1-76 printable ASCII
     * characters other than ':'; value has no CR, LF or other control
     * character but TAB and is at most 900 bytes, so the line fits RFC
     * 5322's 998. At most 64 headers per message, all plugins together. */
    int (*add_header)(struct petrel_ctx *ctx, const char *name, const char *value);
    /* route: where the recipient goes: "mx", "smtp:[host]:port",
     * "smtp:host:port", "lmtp:[host]:port", "lmtp:unix:/path". */
    int (*set_route)(struct petrel_ctx *ctx, const char *route);
    /* select_source: the local IP address to connect from and the name
     * to say in EHLO (NULL: the configured one). */
    int (*set_source)(struct petrel_ctx *ctx, const char *ip, const char *hostname);
    /* retry: try again in seconds (at most 365 days) instead of the
     * configured schedule; or give up now and bounce the recipient. */
    int (*set_retry)(struct petrel_ctx *ctx, uint64_t seconds);
    int (*set_retry_bounce)(struct petrel_ctx *ctx);
    /* bounce: the subject (no CR/LF) and the human-readable text of the
     * bounce; NULL keeps petrel's own. */
    int (*set_bounce_text)(struct petrel_ctx *ctx, const char *subject, const char *text);
    /* auth, xbind: the answer (true: allowed). */
    int (*set_allow)(struct petrel_ctx *ctx, bool allow);
    /* Fails the call with a reason for the log (printf format); returns -1.
     * Then return PETREL_ERROR (or PETREL_OK) or complete(ctx). */
    int (*fail)(struct petrel_ctx *ctx, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

    /* Ends a handler that returned PETREL_PENDING, with what the setters
     * said; the next plugin's handler may then run. Call it exactly once,
     * on the loop thread, from a later callback (calling it before the
     * handler returned PETREL_PENDING also works). ctx is invalid
     * afterwards. On a cancelled context it only frees the context. */
    void (*complete)(struct petrel_ctx *ctx);
};

/* Whether host provides member (a function appended after the plugin was
 * built): PETREL_HOST_HAS(host, complete). */
#define PETREL_HOST_HAS(host, member)                                                              \
    ((host)->size >= offsetof(struct petrel_host, member) + sizeof((host)->member))

/* Exported even from objects built with -fvisibility=hidden. */
#define PETREL_EXPORT __attribute__((visibility("default")))

/* The one symbol a plugin exports. Fill *p and return 0; return non-zero
 * to refuse loading (log the reason with host->log first; release what
 * init allocated: unload is not called then). Called on the loop thread
 * before the loop runs; it may arm handles on host->loop(). */
PETREL_EXPORT int petrel_plugin_init(const struct petrel_host *host, struct petrel_plugin *p);

#ifdef __cplusplus
}
#endif

#endif
