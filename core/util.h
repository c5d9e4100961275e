/*
 * util — layer 0: allocation that aborts on OOM, bounded string helpers,
 * ASCII case folding for SMTP tokens, spans, PANIC.
 */
#ifndef PETREL_UTIL_H
#define PETREL_UTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* A borrowed run of bytes; may hold NUL, never strlen() it. */
struct span {
    const char *p;
    size_t len;
};

#define SPAN_LIT(s) ((struct span){ (s), sizeof(s) - 1 })

/* Allocation: never returns NULL; logs and aborts on OOM (sizes a peer
 * controls must be checked against a limit before calling these). */
void *xmalloc(size_t n);
void *xcalloc(size_t nmemb, size_t n);
void *xrealloc(void *p, size_t n);
void *xreallocarray(void *p, size_t nmemb, size_t n);
char *xstrdup(const char *s);
char *xstrndup(const char *s, size_t n);
char *xasprintf(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* Copies src into dst (size bytes incl. NUL); false on truncation (dst is
 * still NUL-terminated). */
bool str_copy(char *dst, size_t size, const char *src) __attribute__((warn_unused_result));

/* ASCII-only case folding, independent of the locale. */
int ascii_tolower(int c);
int ascii_casecmp(const char *a, const char *b);
int ascii_ncasecmp(const char *a, const char *b, size_t n);
bool span_eq_ci(struct span s, const char *lit);
bool span_startswith_ci(struct span s, const char *lit);

/* Wall-clock time in milliseconds / microseconds since the epoch. */
int64_t now_ms(void);
int64_t now_us(void);

/* Formats t (seconds since epoch) as an RFC 5322 date-time in UTC into
 * out (at least 40 bytes). */
void rfc5322_date(char *out, size_t size, int64_t t);

/* Appends an escaped, truncated copy of peer data (CR/LF/non-printables as
 * \xNN) to out; always NUL-terminates. Returns out. */
char *str_vis(char *out, size_t size, const char *in, size_t len);

__attribute__((noreturn, format(printf, 3, 4)))
void petrel_panic(const char *file, int line, const char *fmt, ...);
#define PANIC(...) petrel_panic(__FILE__, __LINE__, __VA_ARGS__)

#endif
