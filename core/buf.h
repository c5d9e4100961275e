/*
 * buf — one growable byte buffer for input, output queues and DATA staging.
 * Valid bytes are data[off .. off+len); consumed bytes are reclaimed lazily.
 */
#ifndef PETREL_BUF_H
#define PETREL_BUF_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>

#include "util.h"

struct buf {
    char *data; /* owned */
    size_t off; /* start of unconsumed bytes */
    size_t len; /* unconsumed bytes */
    size_t cap; /* allocated bytes */
};

enum buf_line {
    BUF_LINE_OK,      /* *line holds one line without its CRLF */
    BUF_LINE_PARTIAL, /* no CRLF yet and below the limit: read more */
    BUF_LINE_TOOLONG, /* max bytes seen without CRLF */
};

void buf_init(struct buf *b);
void buf_reset(struct buf *b); /* frees memory */
void buf_clear(struct buf *b); /* keeps memory */

/* Makes room for n more bytes after the valid ones; may move data (spans
 * into the buffer become invalid). Returns the write pointer. */
char *buf_reserve(struct buf *b, size_t n);
/* Marks n bytes written at the pointer buf_reserve() returned. */
void buf_commit(struct buf *b, size_t n);
void buf_append(struct buf *b, const void *p, size_t n);
void buf_append_str(struct buf *b, const char *s);
void buf_printf(struct buf *b, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void buf_vprintf(struct buf *b, const char *fmt, va_list ap) __attribute__((format(printf, 2, 0)));
void buf_consume(struct buf *b, size_t n);

static inline const char *
buf_ptr(const struct buf *b)
{
    return b->data + b->off;
}

/* Finds a line ended by CRLF (only CRLF: a bare LF does not end a line).
 * On BUF_LINE_OK, *line points into the buffer (valid until the next call
 * that mutates b) and *consumed is the length including CRLF; the caller
 * consumes it. max bounds the line including CRLF. */
enum buf_line buf_getline(const struct buf *b, size_t max, struct span *line, size_t *consumed);

/* Takes the data out of b (NUL-terminated); b is left empty. */
char *buf_steal(struct buf *b, size_t *len);

#endif
