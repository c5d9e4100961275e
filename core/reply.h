/*
 * reply — SMTP replies: basic code, enhanced status code (RFC 3463) and text.
 * Every fixed reply petrel sends lives in replies.def, so wording is reviewed
 * in one place. Parsers return `const struct reply *` (NULL = valid).
 */
#ifndef PETREL_REPLY_H
#define PETREL_REPLY_H

#include <stdbool.h>

struct reply {
    int code;         /* 200..599 */
    const char *esc;  /* enhanced status code "x.y.z", same class as code */
    const char *text; /* human text, no CRLF */
};

#define REPLY_X(name, code, esc, text) extern const struct reply name;
#include "replies.def"
#undef REPLY_X

/* True if code is 2xx..5xx and esc is "c.x.y" of the same class (2, 4, 5),
 * with subject and detail numbers in range (RFC 3463 section 2). */
bool reply_check(int code, const char *esc);

#endif
