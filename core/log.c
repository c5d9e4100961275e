/*
 * log — renders structured event lines as text or JSON. Each line is built
 * in a fixed buffer inside struct log_line (no allocation) and written with
 * one write(2), so lines from one process never interleave.
 */
#include "log.h"

#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "util.h"

static enum log_level log_level_cur = LOG_INFO;
static enum log_format log_format_cur = LOG_FORMAT_TEXT;
static int log_fd = 2;

void
log_init(enum log_level level, enum log_format format)
{
    log_level_cur = level;
    log_format_cur = format;
}

void
log_set_fd(int fd)
{
    log_fd = fd;
}

bool
log_enabled(enum log_level level)
{
    return level <= log_level_cur;
}

enum log_level
log_get_level(void)
{
    return log_level_cur;
}

bool
log_level_parse(const char *s, enum log_level *out)
{
    static const char *names[] = { "error", "warning", "info", "debug" };
    for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
        if (strcmp(s, names[i]) == 0) {
            *out = (enum log_level)i;
            return true;
        }
    }
    return false;
}

void
log_begin(struct log_line *ll, enum log_level level, const char *key)
{
    ll->level = level;
    ll->enabled = log_enabled(level);
    ll->event = NULL;
    ll->nfields = 0;
    ll->used = 0;
    if (!str_copy(ll->key, sizeof(ll->key), key ? key : "NOQUEUE"))
        ll->key[sizeof(ll->key) - 1] = '\0';
}

void
log_event(struct log_line *ll, const char *event)
{
    ll->event = event;
}

static char *
log_field_start(struct log_line *ll, const char *name, size_t *room)
{
    if (!ll->enabled || ll->nfields >= LOG_FIELDS_MAX || ll->used >= sizeof(ll->scratch) - 1)
        return NULL;
    ll->names[ll->nfields] = name;
    ll->vals[ll->nfields] = (unsigned)ll->used;
    *room = sizeof(ll->scratch) - ll->used;
    return ll->scratch + ll->used;
}

static void
log_field_end(struct log_line *ll, size_t n, size_t room)
{
    if (n >= room)
        n = room - 1;
    ll->used += n + 1;
    ll->nfields++;
}

void
log_kv(struct log_line *ll, const char *name, const char *fmt, ...)
{
    size_t room;
    char *w = log_field_start(ll, name, &room);
    if (w == NULL)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(w, room, fmt, ap);
    va_end(ap);
    log_field_end(ll, n < 0 ? 0 : (size_t)n, room);
}

void
log_kv_vis(struct log_line *ll, const char *name, const char *data, size_t len)
{
    size_t room;
    char *w = log_field_start(ll, name, &room);
    if (w == NULL)
        return;
    size_t cap = room < 1024 ? room : 1024;
    str_vis(w, cap, data, len);
    log_field_end(ll, strlen(w), room);
}

static void
log_put(char *out, size_t *o, size_t size, const char *s)
{
    if (*o + 1 >= size)
        return;
    size_t room = size - 1 - *o; /* keep one byte for the newline */
    size_t n = strlen(s);
    if (n > room)
        n = room;
    memcpy(out + *o, s, n);
    *o += n;
}

static void
log_put_json_str(char *out, size_t *o, size_t size, const char *s)
{
    static const char hex[] = "0123456789abcdef";
    if (*o + 2 >= size)
        return;
    out[(*o)++] = '"';
    for (; *s && *o + 8 < size; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') {
            out[(*o)++] = '\\';
            out[(*o)++] = (char)c;
        } else if (c < 0x20 || c == 0x7f) {
            memcpy(out + *o, "\\u00", 4);
            *o += 4;
            out[(*o)++] = hex[c >> 4];
            out[(*o)++] = hex[c & 15];
        } else {
            out[(*o)++] = (char)c;
        }
    }
    out[(*o)++] = '"';
}

static void
log_timestamp(char *out, size_t size)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    struct tm tm;
    gmtime_r(&ts.tv_sec, &tm);
    snprintf(out, size, "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ", tm.tm_year + 1900,
             (tm.tm_mon + 1) % 100, tm.tm_mday % 100, tm.tm_hour % 100, tm.tm_min % 100,
             tm.tm_sec % 100, (int)(ts.tv_nsec / 1000000) % 1000);
}

static const char *const log_level_names[] = { "error", "warning", "info", "debug" };

void
log_end(struct log_line *ll)
{
    if (!ll->enabled)
        return;
    char out[LOG_LINE_MAX + 1024];
    size_t o = 0;
    char ts[64];
    log_timestamp(ts, sizeof(ts));
    char pid[24];
    snprintf(pid, sizeof(pid), "%d", (int)getpid());

    if (log_format_cur == LOG_FORMAT_JSON) {
        log_put(out, &o, sizeof(out), "{\"time\":");
        log_put_json_str(out, &o, sizeof(out), ts);
        log_put(out, &o, sizeof(out), ",\"level\":");
        log_put_json_str(out, &o, sizeof(out), log_level_names[ll->level]);
        log_put(out, &o, sizeof(out), ",\"pid\":");
        log_put(out, &o, sizeof(out), pid);
        log_put(out, &o, sizeof(out), ",\"qid\":");
        log_put_json_str(out, &o, sizeof(out), ll->key);
        if (ll->event) {
            log_put(out, &o, sizeof(out), ",\"event\":");
            log_put_json_str(out, &o, sizeof(out), ll->event);
        }
        for (size_t i = 0; i < ll->nfields; i++) {
            log_put(out, &o, sizeof(out), ",");
            log_put_json_str(out, &o, sizeof(out), ll->names[i]);
            log_put(out, &o, sizeof(out), ":");
            log_put_json_str(out, &o, sizeof(out), ll->scratch + ll->vals[i]);
        }
        log_put(out, &o, sizeof(out), "}");
    } else {
        log_put(out, &o, sizeof(out), ts);
        log_put(out, &o, sizeof(out), " petrel[");
        log_put(out, &o, sizeof(out), pid);
        log_put(out, &o, sizeof(out), "]: ");
        if (ll->level != LOG_INFO) {
            log_put(out, &o, sizeof(out), log_level_names[ll->level]);
            log_put(out, &o, sizeof(out), ": ");
        }
        log_put(out, &o, sizeof(out), ll->key);
        log_put(out, &o, sizeof(out), ": ");
        if (ll->event) {
            log_put(out, &o, sizeof(out), ll->event);
            log_put(out, &o, sizeof(out), ll->nfields ? ": " : "");
        }
        for (size_t i = 0; i < ll->nfields; i++) {
            if (i > 0)
                log_put(out, &o, sizeof(out), ", ");
            if (strcmp(ll->names[i], "msg") != 0) { /* free text stands alone */
                log_put(out, &o, sizeof(out), ll->names[i]);
                log_put(out, &o, sizeof(out), "=");
            }
            log_put(out, &o, sizeof(out), ll->scratch + ll->vals[i]);
        }
    }
    out[o++] = '\n';
    ssize_t w;
    do {
        w = write(log_fd, out, o);
    } while (w < 0 && errno == EINTR);
}

void
log_msg(enum log_level level, const char *key, const char *fmt, ...)
{
    struct log_line ll;
    log_begin(&ll, level, key ? key : "petrel");
    if (!ll.enabled)
        return;
    size_t room = 0;
    char *w = log_field_start(&ll, "msg", &room);
    if (w == NULL)
        return;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(w, room, fmt, ap);
    va_end(ap);
    log_field_end(&ll, n < 0 ? 0 : (size_t)n, room);
    log_end(&ll);
}
