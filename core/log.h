/*
 * log — one line per event, keyed by queue id (or NOQUEUE), rendered as text
 * (Postfix-like) or JSON lines with the same keys, written with one write(2)
 * to stderr. Field names are an interface admins grep:
 *   client from to orig_to size nrcpt relay src helo delay attempts conn_use
 *   dsn status reason session milter hook listener proto queued_as reply
 *   cmd counts file line xbind orig_to tls cipher verify resumed sni peer_cn
 *   user mech (AUTH; never the password) plugin
 */
#ifndef PETREL_LOG_H
#define PETREL_LOG_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>

enum log_level { LOG_ERR = 0, LOG_WARNING = 1, LOG_INFO = 2, LOG_DEBUG = 3 };
enum log_format { LOG_FORMAT_TEXT, LOG_FORMAT_JSON };

#define LOG_LINE_MAX 8192
#define LOG_FIELDS_MAX 24

struct log_line {
    enum log_level level;
    bool enabled;
    char key[40];          /* queue id, or NOQUEUE */
    const char *event;     /* borrowed static text, e.g. "reject" (may be NULL) */
    size_t nfields;
    const char *names[LOG_FIELDS_MAX]; /* borrowed string literals */
    unsigned vals[LOG_FIELDS_MAX];     /* offsets into scratch */
    size_t used;
    char scratch[LOG_LINE_MAX];
};

void log_init(enum log_level level, enum log_format format);
void log_set_fd(int fd); /* default: 2 (stderr) */
bool log_enabled(enum log_level level);
enum log_level log_get_level(void);
/* Parses "error|warning|info|debug"; false if unknown. */
bool log_level_parse(const char *s, enum log_level *out);

/* key: a queue id, or NULL for NOQUEUE. */
void log_begin(struct log_line *ll, enum log_level level, const char *key);
/* event: a short static word shown before the fields ("reject", "connect"). */
void log_event(struct log_line *ll, const char *event);
void log_kv(struct log_line *ll, const char *name, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
/* Peer-supplied bytes: escaped (\xNN) and truncated. */
void log_kv_vis(struct log_line *ll, const char *name, const char *data, size_t len);
void log_end(struct log_line *ll);

/* A free-text line (warnings, start-up): "msg=" in JSON. */
void log_msg(enum log_level level, const char *key, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

#endif
