/* fake_registry — see fake_registry.h. */
#include "fake_registry.h"

struct plua *
hooks_lua(const struct hooks *h)
{
    return h->lua;
}

struct plugins *
hooks_plugins(const struct hooks *h)
{
    return h->plugins;
}

const struct petrel_config *
hooks_config(const struct hooks *h)
{
    return h->cfg;
}

bool
hooks_have(const struct hooks *h, enum plugin_hook p)
{
    if (h == NULL)
        return false;
    const char *name = plugin_hook_name(p);
    return (h->lua != NULL && name != NULL && plua_has_hook(h->lua, name))
           || plugins_have(h->plugins, p);
}
