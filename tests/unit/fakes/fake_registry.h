/* fake_registry — stands in for core/hooks.c's registry in tests of the
 * delivery side (core/hooks_delivery.c, the scheduler): the test builds a
 * struct hooks from a Lua engine it opened (or NULL) and a fake plugin set
 * (fake_plugin.h). Provides hooks_lua, hooks_plugins, hooks_config and
 * hooks_have, nothing of the SMTP-session side.
 *
 *   struct hooks h = { .lua = p, .plugins = fake_plugins_new(&loop) };
 *   hooks_call(&h, PLUGIN_HOOK_ROUTE, &args, cb, arg);
 */
#ifndef PETREL_FAKE_REGISTRY_H
#define PETREL_FAKE_REGISTRY_H

#include "hooks.h"

struct hooks {
    struct plua *lua;                 /* borrowed or NULL */
    struct plugins *plugins;          /* borrowed (fake_plugins_new) */
    const struct petrel_config *cfg;  /* borrowed or NULL */
};

#endif
