/*
 * verdict — see verdict.h. Owns nothing global; a verdict's dynamic text
 * lives in one heap block (`owned`) laid out as raw\0 esc\0 text\0.
 */
#include "verdict.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "config.h"
#include "util.h"

#define VERDICT_ESC_MAX 16 /* "5.123.123" fits with room */

void
verdict_init(struct verdict *v)
{
    v->kind = VERDICT_CONTINUE;
    v->reply.code = 0;
    v->reply.esc = "";
    v->reply.text = "";
    v->raw = NULL;
    v->owned = NULL;
}

void
verdict_clear(struct verdict *v)
{
    free(v->owned);
    verdict_init(v);
}

void
verdict_set(struct verdict *v, enum verdict_kind kind, const struct reply *r)
{
    verdict_clear(v);
    v->kind = kind;
    if (r != NULL)
        v->reply = *r;
}

/* Replaces v's storage by one block holding raw (may be NULL), esc and
 * text; sets the pointers. */
static void
verdict_store(struct verdict *v, enum verdict_kind kind, int code, const char *raw, size_t raw_len,
              const char *esc, size_t esc_len, const char *text, size_t text_len)
{
    size_t total = (raw ? raw_len + 1 : 0) + esc_len + 1 + text_len + 1;
    char *blk = xmalloc(total);
    char *p = blk;
    const char *raw_p = NULL;
    if (raw != NULL) {
        memcpy(p, raw, raw_len);
        p[raw_len] = '\0';
        raw_p = p;
        p += raw_len + 1;
    }
    memcpy(p, esc, esc_len);
    p[esc_len] = '\0';
    const char *esc_p = p;
    p += esc_len + 1;
    memcpy(p, text, text_len);
    p[text_len] = '\0';
    const char *text_p = p;
    free(v->owned);
    v->owned = blk;
    v->kind = kind;
    v->reply.code = code;
    v->reply.esc = esc_p;
    v->reply.text = text_p;
    v->raw = raw_p;
}

void
verdict_setf(struct verdict *v, enum verdict_kind kind, int code, const char *esc, const char *fmt,
             ...)
{
    va_list ap;
    va_start(ap, fmt);
    char *text = NULL;
    if (vasprintf(&text, fmt, ap) < 0)
        PANIC("verdict_setf: out of memory");
    va_end(ap);
    for (char *p = text; *p; p++) {
        if (*p == '\r' || *p == '\n')
            *p = ' ';
    }
    verdict_store(v, kind, code, NULL, 0, esc, strlen(esc), text, strlen(text));
    free(text);
}

/* ---- peer replies -------------------------------------------------------- */

struct verdict_line {
    int code;
    const char *esc; /* into the text, or NULL */
    size_t esc_len;
    const char *text; /* after code, separator, esc and spaces */
    size_t text_len;
};

static bool
verdict_is_digit(char c)
{
    return c >= '0' && c <= '9';
}

/* Validates a reply (no NUL inside, no final CRLF) line by line; fills
 * *first with the first line. NULL if valid, else why. */
static const char *
verdict_parse_lines(const char *s, size_t n, struct verdict_line *first)
{
    if (n == 0)
        return "empty reply";
    size_t off = 0;
    int code0 = 0;
    bool is_first = true;
    while (off < n) {
        const char *line = s + off;
        size_t len = 0;
        while (off + len < n && line[len] != '\r' && line[len] != '\n')
            len++;
        bool final = off + len == n;
        if (len < 4)
            return "reply line too short";
        if ((line[0] != '4' && line[0] != '5') || !verdict_is_digit(line[1]) ||
            !verdict_is_digit(line[2]))
            return "reply code is not 4xx or 5xx";
        if (line[3] != (final ? ' ' : '-'))
            return final ? "last reply line must be \"ddd text\""
                         : "reply line must be \"ddd-text\"";
        int code = (line[0] - '0') * 100 + (line[1] - '0') * 10 + (line[2] - '0');
        if (is_first)
            code0 = code;
        else if (code != code0)
            return "reply lines carry different codes";
        for (size_t i = 4; i < len; i++) {
            unsigned char c = (unsigned char)line[i];
            if ((c < 0x20 && c != '\t') || c == 0x7f)
                return "control character in reply";
        }
        /* an enhanced status code where the text starts with a digit */
        size_t e = 4;
        size_t elen = 0;
        if (verdict_is_digit(line[4])) {
            while (e + elen < len && line[e + elen] != ' ')
                elen++;
            char esc[VERDICT_ESC_MAX];
            if (elen >= sizeof(esc))
                return "bad enhanced status code";
            memcpy(esc, line + e, elen);
            esc[elen] = '\0';
            if (!reply_check(code, esc))
                return "bad enhanced status code";
        }
        if (is_first) {
            first->code = code;
            first->esc = elen > 0 ? line + e : NULL;
            first->esc_len = elen;
            size_t t = e + elen;
            while (t < len && line[t] == ' ')
                t++;
            first->text = line + t;
            first->text_len = len - t;
            is_first = false;
        }
        if (final)
            break;
        if (off + len + 1 >= n || line[len] != '\r' || line[len + 1] != '\n')
            return "reply lines must end with CRLF";
        off += len + 2;
    }
    return NULL;
}

const char *
verdict_set_raw(struct verdict *v, const char *text, size_t len)
{
    if (len > 0 && text[len - 1] == '\0')
        len--;
    if (memchr(text, '\0', len) != NULL)
        return "NUL in reply";
    if (len >= 2 && text[len - 2] == '\r' && text[len - 1] == '\n')
        len -= 2;
    /* Sendmail uses the reply as a format string: "%%" is '%', a lone '%'
     * means nothing (Postfix milter8 does the same). */
    char *clean = xmalloc(len + 1);
    size_t n = 0;
    for (size_t i = 0; i < len; i++) {
        if (text[i] == '%') {
            if (i + 1 < len && text[i + 1] == '%')
                clean[n++] = text[++i];
            continue;
        }
        clean[n++] = text[i];
    }
    clean[n] = '\0';
    struct verdict_line first;
    const char *why = verdict_parse_lines(clean, n, &first);
    if (why != NULL) {
        free(clean);
        return why;
    }
    enum verdict_kind kind = first.code / 100 == 4 ? VERDICT_TEMPFAIL : VERDICT_REJECT;
    const char *esc = first.esc;
    size_t esc_len = first.esc_len;
    if (esc == NULL) {
        esc = kind == VERDICT_TEMPFAIL ? "4.7.1" : "5.7.1";
        esc_len = 5;
    }
    /* verdict_store copies before freeing v's old block; clean is separate */
    verdict_store(v, kind, first.code, clean, n, esc, esc_len, first.text, first.text_len);
    free(clean);
    return NULL;
}

void
verdict_copy(struct verdict *dst, const struct verdict *src)
{
    if (dst == src)
        return;
    if (src->owned == NULL) {
        free(dst->owned);
        *dst = *src;
        return;
    }
    verdict_store(dst, src->kind, src->reply.code, src->raw, src->raw ? strlen(src->raw) : 0,
                  src->reply.esc, strlen(src->reply.esc), src->reply.text, strlen(src->reply.text));
}

void
verdict_move(struct verdict *dst, struct verdict *src)
{
    if (dst == src)
        return;
    free(dst->owned);
    *dst = *src;
    verdict_init(src);
}

const char *
verdict_check(const struct verdict *v)
{
    if (v->reply.esc == NULL || v->reply.text == NULL)
        return "reply without text";
    if (strpbrk(v->reply.text, "\r\n") != NULL)
        return "CR or LF in reply text";
    switch (v->kind) {
    case VERDICT_REJECT:
    case VERDICT_TEMPFAIL: {
        int want = v->kind == VERDICT_REJECT ? 5 : 4;
        if (v->reply.code / 100 != want)
            return v->kind == VERDICT_REJECT ? "reject needs a 5xx reply"
                                             : "tempfail needs a 4xx reply";
        if (!reply_check(v->reply.code, v->reply.esc))
            return "enhanced status code missing or of another class";
        if (v->raw != NULL) {
            struct verdict_line first;
            const char *why = verdict_parse_lines(v->raw, strlen(v->raw), &first);
            if (why != NULL)
                return why;
            if (first.code != v->reply.code)
                return "raw reply code differs";
        }
        return NULL;
    }
    case VERDICT_CONTINUE:
    case VERDICT_ACCEPT:
    case VERDICT_DISCARD:
    case VERDICT_QUARANTINE:
        if (v->raw != NULL)
            return "only reject and tempfail carry a raw reply";
        if (v->reply.code == 0)
            return NULL;
        if (v->reply.code / 100 != 2 || !reply_check(v->reply.code, v->reply.esc))
            return "only a 2xx reply fits this verdict";
        return NULL;
    }
    return "unknown verdict kind";
}

const char *
verdict_kind_name(enum verdict_kind k)
{
    switch (k) {
    case VERDICT_CONTINUE:
        return "continue";
    case VERDICT_ACCEPT:
        return "accept";
    case VERDICT_REJECT:
        return "reject";
    case VERDICT_TEMPFAIL:
        return "tempfail";
    case VERDICT_DISCARD:
        return "discard";
    case VERDICT_QUARANTINE:
        return "quarantine";
    }
    return "unknown";
}

void
verdict_format(const struct verdict *v, char *out, size_t size)
{
    if (size == 0)
        return;
    out[0] = '\0';
    if (v->raw != NULL) {
        size_t o = 0;
        for (const char *p = v->raw; *p && o + 1 < size; p++) {
            if (p[0] == '\r' && p[1] == '\n') {
                if (o + 2 >= size)
                    break;
                out[o++] = ';';
                out[o++] = ' ';
                p++;
                continue;
            }
            out[o++] = *p;
        }
        out[o] = '\0';
        return;
    }
    int n;
    if (v->reply.code != 0 && v->reply.esc[0] != '\0')
        n = snprintf(out, size, "%d %s %s", v->reply.code, v->reply.esc, v->reply.text);
    else if (v->reply.code != 0)
        n = snprintf(out, size, "%d %s", v->reply.code, v->reply.text);
    else if (v->reply.text[0] != '\0')
        n = snprintf(out, size, "%s (%s)", verdict_kind_name(v->kind), v->reply.text);
    else
        n = snprintf(out, size, "%s", verdict_kind_name(v->kind));
    if (n < 0)
        out[0] = '\0'; /* truncation is fine: snprintf terminated out */
}

const char *
verdict_split_text(const char *s, const char *dflt, char *esc, size_t esc_size, const char **text)
{
    size_t n = strcspn(s, " ");
    bool looks = n > 0 && s[0] >= '0' && s[0] <= '9' && memchr(s, '.', n) != NULL;
    if (!looks) {
        if (!str_copy(esc, esc_size, dflt))
            return "enhanced status code too long";
        *text = s;
        return NULL;
    }
    if (n >= esc_size)
        return "malformed enhanced status code";
    memcpy(esc, s, n);
    esc[n] = '\0';
    unsigned a, b, c;
    int used = 0;
    if (sscanf(esc, "%1u.%3u.%3u%n", &a, &b, &c, &used) != 3 || (size_t)used != n)
        return "malformed enhanced status code";
    *text = s[n] == ' ' ? s + n + 1 : s + n;
    return NULL;
}

void
verdict_set_on_error(struct verdict *v, int on_error)
{
    switch (on_error) {
    case MILTER_ACTION_ACCEPT: /* the failed policy is ignored */
        verdict_clear(v);
        return;
    case MILTER_ACTION_REJECT:
        verdict_set(v, VERDICT_REJECT, &R_POLICY_REJECT);
        return;
    default: /* MILTER_ACTION_TEMPFAIL */
        verdict_set(v, VERDICT_TEMPFAIL, &R_POLICY_TEMPFAIL);
        return;
    }
}

const char *
verdict_action_name(int action)
{
    switch (action) {
    case MILTER_ACTION_ACCEPT:
        return "accept";
    case MILTER_ACTION_REJECT:
        return "reject";
    default:
        return "tempfail";
    }
}
