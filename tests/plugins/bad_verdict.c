/*
 * bad_verdict — a test plugin whose connect handler answers a reject with
 * a 2xx code: petrel must log it with the plugin's name and apply
 * lua.on_error.
 */
#include <petrel/plugin.h>

static const struct petrel_host *bad_host;

static int
bad_on_connect(struct petrel_ctx *ctx, void *data)
{
    (void)data;
    bad_host->set_verdict(ctx, PETREL_VERDICT_REJECT, 250, "2.0.0 this is no rejection");
    return PETREL_OK;
}

int
petrel_plugin_init(const struct petrel_host *host, struct petrel_plugin *p)
{
    bad_host = host;
    p->abi_version = PETREL_PLUGIN_ABI_VERSION;
    p->size = sizeof(*p);
    p->name = "bad_verdict";
    p->handlers[PETREL_HOOK_CONNECT] = bad_on_connect;
    return 0;
}
