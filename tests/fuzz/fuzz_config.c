/*
 * fuzz_config — feeds arbitrary bytes to config_load_string(): the YAML
 * reader, every section parser and the cross-checks must neither crash nor
 * leak, whether the input loads or not.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "config.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct petrel_config *c = NULL;
    char *errors = NULL;
    if (config_load_string("fuzz.yaml", (const char *)data, size, &c, &errors) == 0) {
        if (c == NULL || errors != NULL)
            abort();
        config_unref(c);
    } else if (c != NULL || errors == NULL || errors[0] == '\0') {
        abort();
    }
    free(errors);
    return 0;
}
