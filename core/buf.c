/*
 * buf — growable byte buffer. Grows by doubling; reclaims the consumed
 * prefix when it needs room rather than on every consume.
 */
#include "buf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void
buf_init(struct buf *b)
{
    memset(b, 0, sizeof(*b));
}

void
buf_reset(struct buf *b)
{
    free(b->data);
    buf_init(b);
}

void
buf_clear(struct buf *b)
{
    b->off = 0;
    b->len = 0;
}

char *
buf_reserve(struct buf *b, size_t n)
{
    if (b->off + b->len + n <= b->cap)
        return b->data + b->off + b->len;
    if (b->off > 0 && b->len + n <= b->cap) {
        memmove(b->data, b->data + b->off, b->len);
        b->off = 0;
        return b->data + b->len;
    }
    if (b->off > 0) {
        memmove(b->data, b->data + b->off, b->len);
        b->off = 0;
    }
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n) {
        if (cap > SIZE_MAX / 2)
            PANIC("buf_reserve: size overflow");
        cap *= 2;
    }
    b->data = xrealloc(b->data, cap);
    b->cap = cap;
    return b->data + b->len;
}

void
buf_commit(struct buf *b, size_t n)
{
    if (b->off + b->len + n > b->cap)
        PANIC("buf_commit past capacity");
    b->len += n;
}

void
buf_append(struct buf *b, const void *p, size_t n)
{
    if (n == 0)
        return;
    memcpy(buf_reserve(b, n), p, n);
    b->len += n;
}

void
buf_append_str(struct buf *b, const char *s)
{
    buf_append(b, s, strlen(s));
}

void
buf_vprintf(struct buf *b, const char *fmt, va_list ap)
{
    va_list ap2;
    va_copy(ap2, ap);
    char *w = buf_reserve(b, 128);
    size_t room = b->cap - b->off - b->len;
    int n = vsnprintf(w, room, fmt, ap);
    if (n < 0)
        PANIC("buf_vprintf: bad format");
    if ((size_t)n >= room) {
        w = buf_reserve(b, (size_t)n + 1);
        vsnprintf(w, (size_t)n + 1, fmt, ap2);
    }
    va_end(ap2);
    b->len += (size_t)n;
}

void
buf_printf(struct buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    buf_vprintf(b, fmt, ap);
    va_end(ap);
}

void
buf_consume(struct buf *b, size_t n)
{
    if (n >= b->len) {
        b->off = 0;
        b->len = 0;
        return;
    }
    b->off += n;
    b->len -= n;
}

enum buf_line
buf_getline(const struct buf *b, size_t max, struct span *line, size_t *consumed)
{
    const char *p = buf_ptr(b);
    size_t scan = b->len < max ? b->len : max;
    for (size_t i = 1; i < scan; i++) {
        /* memchr for LF then check the CR before it: fast on long lines */
        const char *lf = memchr(p + i, '\n', scan - i);
        if (lf == NULL)
            break;
        size_t at = (size_t)(lf - p);
        if (p[at - 1] == '\r') {
            line->p = p;
            line->len = at - 1;
            *consumed = at + 1;
            return BUF_LINE_OK;
        }
        i = at;
    }
    return b->len >= max ? BUF_LINE_TOOLONG : BUF_LINE_PARTIAL;
}

char *
buf_steal(struct buf *b, size_t *len)
{
    buf_reserve(b, 1);
    if (b->off > 0)
        memmove(b->data, b->data + b->off, b->len);
    b->data[b->len] = '\0';
    char *p = b->data;
    if (len)
        *len = b->len;
    buf_init(b);
    return p;
}
