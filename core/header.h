/*
 * header — the header section of a stored message (RFC 5322 2.2), pure:
 * where it ends and its fields as name/value pairs, for the views policies
 * and plugins get (Lua's msg.headers, the plugin accessors) at end of
 * message and in delivery.
 */
#ifndef PETREL_HEADER_H
#define PETREL_HEADER_H

#include <stddef.h>

#include "util.h"

/* One header field. The strings are borrowed from whoever built the array
 * (header_parse: its store; a hook call: its own copies). */
struct header_field {
    const char *name;  /* as written, without the colon */
    const char *value; /* after the colon, leading blanks dropped, unfolded */
};

/* Offset of the CRLF of the empty line that ends the header section (so
 * the section is c.p[0 .. end)), 0 when the content starts with the empty
 * line, c.len when there is none (a message without a body). */
size_t header_section_end(struct span c);

/* The fields of the header section of c, in order; lines without a colon
 * are skipped, NUL bytes and folding line ends dropped from values. The
 * array (*n entries) and store are owned by the caller (free() both);
 * every string points into *store. */
struct header_field *header_parse(struct span c, size_t *n, char **store);

#endif
