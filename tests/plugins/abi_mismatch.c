/*
 * abi_mismatch — a test plugin claiming ABI version 99: petrel must refuse
 * it ("ABI version 99, petrel speaks 1") and must not call its unload.
 */
#include <stdlib.h>

#include <petrel/plugin.h>

static void
abi_unload(void *data)
{
    (void)data;
    abort(); /* a refused plugin is never unloaded */
}

int
petrel_plugin_init(const struct petrel_host *host, struct petrel_plugin *p)
{
    (void)host;
    p->abi_version = 99;
    p->size = sizeof(*p);
    p->name = "abi_mismatch";
    p->unload = abi_unload;
    return 0;
}
