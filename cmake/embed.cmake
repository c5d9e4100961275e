# Turns config/petrel.yaml into a C string (petrel_default_config) so that
# `petrel serve` without -c runs on the embedded default.
file(READ ${IN} HEX HEX)
string(REGEX REPLACE "([0-9a-f][0-9a-f])" "0x\\1," BYTES "${HEX}")
file(WRITE ${OUT} "/* generated from config/petrel.yaml */\n#include <stddef.h>\n"
    "const char petrel_default_config[] = {${BYTES} 0x00};\n"
    "const size_t petrel_default_config_len = sizeof(petrel_default_config) - 1;\n")
