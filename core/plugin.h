/*
 * plugin — C plugins: the dlopen loader and the host side of the public
 * ABI (include/petrel/plugin.h; in core/ only plugin.c includes it).
 *
 * A plugin is a shared object listed in plugins[] (path, config map). At
 * load, plugin.c dlopen()s it, finds petrel_plugin_init(), calls it with the
 * host API; the plugin fills its struct petrel_plugin (abi_version, size,
 * name, handlers per hook). A missing file or symbol, an ABI version or
 * struct size that differs from the host's, or an init that fails is a
 * configuration error naming the file ("plugins[0].path: /x.so: ABI
 * version 99, petrel speaks 1").
 *
 * The hook data types are the ones the Lua bridge uses (lua_bridge.h):
 * struct plua_args in, struct plua_result out, so core/hooks.c feeds Lua and
 * plugins the same way. A handler reads the call's data through opaque
 * accessors and answers a verdict (or a route, a source, a retry delay, a
 * bounce text, allow/deny) at once, or later through the async completion
 * function of the host API.
 *
 * Ordering: plugin_call() runs the handlers registered for the hook in
 * plugins[] order, one after the other. For verdict hooks (connect, helo,
 * mail_from, rcpt_to, data) the first verdict other than CONTINUE ends the
 * call; headers added at data accumulate. For route, select_source, retry
 * and bounce the first handler that sets a value ends the call; auth and
 * xbind: the first that answers; event: every handler is called.
 * An invalid verdict (a reject with a 2xx code, a malformed enhanced code,
 * a bad route) is logged with the plugin's name and the call completes with
 * status PLUA_ERROR and the lua.on_error verdict.
 *
 * Status: PLUA_NO_HOOK when no plugin has a handler for the hook, and also
 * for auth, xbind, route, select_source, retry and bounce when handlers ran
 * but none answered (the caller keeps its own decision); PLUA_OK otherwise
 * (verdict hooks: CONTINUE when nobody objected). For event, a failing
 * handler is logged and the others still run (status PLUA_ERROR).
 *
 * Loop: the set owns libuv handles. After plugins_free() (and after a
 * failed plugins_load()) run the loop: the shared objects are dlclose()d
 * and the memory freed from close callbacks, after the handles the plugins
 * closed in their unload functions.
 */
#ifndef PETREL_PLUGIN_H
#define PETREL_PLUGIN_H

#include <stdbool.h>
#include <stddef.h>

#include "lua_bridge.h"

struct uv_loop_s;
struct petrel_config;
struct plugins;
struct plugin_call;

/* The hook table of DESIGN.md, in its order. include/petrel/plugin.h has the
 * same values as PETREL_HOOK_* (plugin.c checks with static_assert). */
enum plugin_hook {
    PLUGIN_HOOK_CONNECT,
    PLUGIN_HOOK_HELO,
    PLUGIN_HOOK_AUTH,
    PLUGIN_HOOK_MAIL_FROM,
    PLUGIN_HOOK_RCPT_TO,
    PLUGIN_HOOK_DATA,
    PLUGIN_HOOK_XBIND,
    PLUGIN_HOOK_ROUTE,
    PLUGIN_HOOK_SELECT_SOURCE,
    PLUGIN_HOOK_RETRY,
    PLUGIN_HOOK_BOUNCE,
    PLUGIN_HOOK_EVENT,
    PLUGIN_HOOK_COUNT
};

/* "connect", "helo", … (the Lua names); NULL for an out-of-range value. */
const char *plugin_hook_name(enum plugin_hook h);
/* The hook with that Lua name, or -1. */
int plugin_hook_by_name(const char *name);

/* Loads every plugins[] entry of cfg (cfg is read during the call; each
 * plugin's config map is copied). No plugins configured: returns an empty
 * set (not NULL). On failure returns NULL and *err (owned by the caller)
 * names the file and the reason; plugins loaded before it are unloaded. */
struct plugins *plugins_load(struct uv_loop_s *loop, const struct petrel_config *cfg, char **err)
    __attribute__((warn_unused_result));
/* Cancels calls in progress (no callbacks), calls every plugin's unload
 * function, dlclose()s them. NULL is a no-op. */
void plugins_free(struct plugins *ps);
/* For `petrel check-config`: loads every plugins[] entry of cfg on a
 * private loop (running each init), then unloads them. 0, or -1 with *err
 * (owned by the caller) as plugins_load words it: "plugins[0].path:
 * /x.so: ABI version 99, petrel speaks 1". No plugins: 0. */
int plugins_check(const struct petrel_config *cfg, char **err) __attribute__((warn_unused_result));
/* Whether some plugin registered a handler for h. NULL ps: false. */
bool plugins_have(const struct plugins *ps, enum plugin_hook h);

/* Completion: fires exactly once per plugin_call, from a later loop
 * iteration (never inside plugin_call), unless cancelled first. res is
 * owned by the call; the callback may take pieces (verdict_move, steal a
 * pointer and set it NULL); the rest is freed when it returns. */
typedef void plugin_done_cb(struct plugin_call *c, struct plua_result *res, void *arg);

/* Runs the handlers for h with args (borrowed for the duration of
 * plugin_call only: copied into the call). Never returns NULL. With no
 * handler the result has status PLUA_NO_HOOK. ps must not be NULL (an
 * empty set from plugins_load is fine); handlers that answer at once run
 * inside this call, the callback still comes later. */
struct plugin_call *plugin_call(struct plugins *ps, enum plugin_hook h,
                                const struct plua_args *args, plugin_done_cb *cb, void *arg);
/* The callback will not fire. A handler that answered "pending" keeps its
 * context until it completes (the completion is then ignored). NULL and a
 * call whose callback is running are no-ops. */
void plugin_call_cancel(struct plugin_call *c);

#endif
