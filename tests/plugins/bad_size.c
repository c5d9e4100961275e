/*
 * bad_size — a test plugin with the right ABI version but a struct
 * petrel_plugin size of another build: petrel must refuse it.
 */
#include <petrel/plugin.h>

int
petrel_plugin_init(const struct petrel_host *host, struct petrel_plugin *p)
{
    (void)host;
    p->abi_version = PETREL_PLUGIN_ABI_VERSION;
    p->size = (uint32_t)sizeof(*p) - 8;
    p->name = "bad_size";
    return 0;
}
