/*
 * queue_cli — the `petrel queue` read-only commands: list, show, cat. Opens
 * the spool read-only for the duration of one command and prints to the
 * given streams; owns nothing beyond that. Envelope strings come from peers,
 * so control characters are printed as \xNN (UTF-8 is kept as is).
 */
#include "queue_cli.h"

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "buf.h"
#include "smtp_parse.h"
#include "spool.h"
#include "util.h"

/* Prints n bytes, escaping controls (TAB kept) and backslash. */
static void
qcli_put(FILE *out, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if ((c < 0x20 && c != '\t') || c == 0x7f || c == '\\') {
            fputc('\\', out);
            fputc('x', out);
            fputc(hex[c >> 4], out);
            fputc(hex[c & 15], out);
        } else {
            fputc(c, out);
        }
    }
}

static void
qcli_puts(FILE *out, const char *s)
{
    if (s != NULL)
        qcli_put(out, s, strlen(s));
}

static bool
qcli_empty(const char *s)
{
    return s == NULL || s[0] == '\0';
}

static void
qcli_put_time(FILE *out, int64_t ms)
{
    time_t t = (time_t)(ms / 1000);
    struct tm tm;
    if (gmtime_r(&t, &tm) == NULL) {
        fprintf(out, "@%" PRId64, ms);
        return;
    }
    fprintf(out, "%04d-%02d-%02dT%02d:%02d:%02dZ", tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday,
            tm.tm_hour, tm.tm_min, tm.tm_sec);
}

/* 42s, 5m, 3h, 2d */
static void
qcli_age(char *out, size_t size, int64_t ms)
{
    int64_t s = ms > 0 ? ms / 1000 : 0;
    int n;
    if (s < 60)
        n = snprintf(out, size, "%" PRId64 "s", s);
    else if (s < 3600)
        n = snprintf(out, size, "%" PRId64 "m", s / 60);
    else if (s < 86400)
        n = snprintf(out, size, "%" PRId64 "h", s / 3600);
    else
        n = snprintf(out, size, "%" PRId64 "d", s / 86400);
    if (n < 0 || (size_t)n >= size)
        out[0] = '\0'; /* cannot happen with the callers' 32 bytes */
}

static bool
qcli_waiting(const struct spool_rcpt *r)
{
    return r->state == SPOOL_RCPT_PENDING || r->state == SPOOL_RCPT_DEFERRED;
}

static void
qcli_put_next(FILE *out, const struct spool_rcpt *r, int64_t now)
{
    fputs("next=", out);
    if (r->next_attempt_ms <= now)
        fputs("now", out);
    else
        qcli_put_time(out, r->next_attempt_ms);
}

static int
qcli_open(const char *dir, struct spool **sp, FILE *err)
{
    char *e = NULL;
    if (spool_open_readonly(dir, sp, &e) != 0) {
        fprintf(err, "petrel: %s\n", e != NULL ? e : "cannot open spool");
        free(e);
        return -1;
    }
    return 0;
}

static const struct spool_envelope *
qcli_find(const struct spool *sp, const char *qid, FILE *err)
{
    const struct spool_envelope *env = spool_get(sp, qid);
    if (env == NULL) {
        fputs("petrel: ", err);
        qcli_puts(err, qid);
        fputs(": no such message in the queue\n", err);
    }
    return env;
}

/* ---- list ---- */

struct qcli_list {
    FILE *out;
    int64_t now;
    size_t msgs;
    size_t rcpts;
    size_t pending;
    size_t deferred;
    size_t failed;
    size_t quarantined;
};

static void
qcli_list_one(const struct spool_envelope *env, void *arg)
{
    struct qcli_list *l = arg;
    FILE *out = l->out;
    char age[32];
    qcli_age(age, sizeof(age), l->now - env->arrival_ms);
    fprintf(out, "%-16s  %5s  %8" PRIu64 "  <", env->qid, age, env->content_size);
    qcli_puts(out, env->sender);
    fputc('>', out);
    if (env->flags & SPOOL_F_QUARANTINED) {
        fputs("  (quarantined: ", out);
        qcli_puts(out, qcli_empty(env->quarantine_reason) ? "no reason given"
                                                          : env->quarantine_reason);
        fputc(')', out);
        l->quarantined++;
    }
    fputc('\n', out);
    for (size_t i = 0; i < env->nrcpts; i++) {
        const struct spool_rcpt *r = &env->rcpts[i];
        fprintf(out, "  %s  <", spool_rcpt_state_name(r->state));
        qcli_puts(out, r->addr);
        fputc('>', out);
        bool waiting = qcli_waiting(r);
        if (r->attempts > 0 || waiting) {
            fputs("  ", out);
            if (r->attempts > 0)
                fprintf(out, "attempts=%" PRIu32 "%s", r->attempts, waiting ? " " : "");
            if (waiting)
                qcli_put_next(out, r, l->now);
        }
        if (!qcli_empty(r->last_reply)) {
            fputs("  last=\"", out);
            qcli_puts(out, r->last_reply);
            fputc('"', out);
        }
        fputc('\n', out);
        l->rcpts++;
        l->pending += r->state == SPOOL_RCPT_PENDING;
        l->deferred += r->state == SPOOL_RCPT_DEFERRED;
        l->failed += r->state == SPOOL_RCPT_FAILED;
    }
    l->msgs++;
}

int
queue_cli_list(const char *spool_dir, FILE *out, FILE *err)
{
    struct spool *sp;
    if (qcli_open(spool_dir, &sp, err) < 0)
        return 1;
    if (spool_count(sp) == 0) {
        fputs("Queue is empty\n", out);
        spool_close(sp);
        return 0;
    }
    struct qcli_list l = { .out = out, .now = now_ms() };
    fprintf(out, "%-16s  %5s  %8s  %s\n", "QUEUE ID", "AGE", "SIZE", "SENDER");
    spool_foreach(sp, qcli_list_one, &l);
    fprintf(out, "-- %zu messages, %zu recipients (%zu pending, %zu deferred, %zu failed, "
            "%zu quarantined)\n", l.msgs, l.rcpts, l.pending, l.deferred, l.failed,
            l.quarantined);
    spool_close(sp);
    return 0;
}

/* ---- show ---- */

static void
qcli_field(FILE *out, const char *name, const char *value)
{
    if (qcli_empty(value))
        return;
    fprintf(out, "%s: ", name);
    qcli_puts(out, value);
    fputc('\n', out);
}

static void
qcli_put_notify(FILE *out, unsigned notify)
{
    static const struct {
        unsigned flag;
        const char *name;
    } names[] = {
        { SMTP_NOTIFY_NEVER, "NEVER" },
        { SMTP_NOTIFY_SUCCESS, "SUCCESS" },
        { SMTP_NOTIFY_FAILURE, "FAILURE" },
        { SMTP_NOTIFY_DELAY, "DELAY" },
    };
    const char *sep = "";
    fputs(" notify=", out);
    for (size_t i = 0; i < ARRAY_SIZE(names); i++) {
        if (notify & names[i].flag) {
            fprintf(out, "%s%s", sep, names[i].name);
            sep = ",";
        }
    }
}

/* The header section: lines up to the first empty one, CRLF shown as a newline. */
static void
qcli_put_headers(FILE *out, const char *p, size_t len)
{
    size_t pos = 0;
    while (pos < len) {
        const char *nl = memchr(p + pos, '\n', len - pos);
        size_t end = nl != NULL ? (size_t)(nl - p) : len;
        size_t n = end - pos;
        if (n > 0 && p[pos + n - 1] == '\r')
            n--;
        if (n == 0)
            break;
        qcli_put(out, p + pos, n);
        fputc('\n', out);
        pos = end + 1;
    }
}

/* Opens the spool read-only and loads one message's envelope and content.
 * On success the caller owns *sp (spool_close) and content (buf_reset); on
 * failure the reason went to err and nothing is left to free. */
static int
qcli_load(const char *spool_dir, const char *qid, struct spool **sp,
          const struct spool_envelope **env, struct buf *content, FILE *err)
{
    buf_init(content);
    if (qcli_open(spool_dir, sp, err) < 0)
        return -1;
    *env = qcli_find(*sp, qid, err);
    if (*env == NULL) {
        spool_close(*sp);
        return -1;
    }
    int r = spool_read_content(*sp, (*env)->qid, content);
    if (r < 0) {
        fprintf(err, "petrel: %s: cannot read the message content: %s\n", (*env)->qid,
                strerror(-r));
        buf_reset(content);
        spool_close(*sp);
        return -1;
    }
    return 0;
}

int
queue_cli_show(const char *spool_dir, const char *qid, FILE *out, FILE *err)
{
    struct spool *sp;
    const struct spool_envelope *env;
    struct buf content;
    if (qcli_load(spool_dir, qid, &sp, &env, &content, err) < 0)
        return 1;
    int64_t now = now_ms();
    char age[32];
    qcli_age(age, sizeof(age), now - env->arrival_ms);
    fprintf(out, "queue_id: %s\n", env->qid);
    fputs("arrival: ", out);
    qcli_put_time(out, env->arrival_ms);
    fprintf(out, " (%s ago)\n", age);
    fputs("sender: <", out);
    qcli_puts(out, env->sender);
    fputs(">\n", out);
    fprintf(out, "size: %" PRIu64 "\n", env->content_size);
    qcli_field(out, "listener", env->listener);
    qcli_field(out, "client", env->client_ip);
    qcli_field(out, "local", env->local_ip);
    qcli_field(out, "helo", env->client_helo);
    qcli_field(out, "auth", env->auth_user);
    if (env->body == SMTP_BODY_7BIT || env->body == SMTP_BODY_8BITMIME)
        fprintf(out, "body: %s\n", env->body == SMTP_BODY_7BIT ? "7BIT" : "8BITMIME");
    if (env->smtputf8)
        fputs("smtputf8: yes\n", out);
    if (env->ret == SMTP_RET_FULL || env->ret == SMTP_RET_HDRS)
        fprintf(out, "ret: %s\n", env->ret == SMTP_RET_FULL ? "FULL" : "HDRS");
    qcli_field(out, "envid", env->envid);
    if (!qcli_empty(env->xbind_ip) || !qcli_empty(env->xbind_hostname)) {
        fputs("xbind: ", out);
        qcli_puts(out, env->xbind_ip);
        if (!qcli_empty(env->xbind_hostname)) {
            fputs(qcli_empty(env->xbind_ip) ? "" : " ", out);
            qcli_puts(out, env->xbind_hostname);
        }
        fputc('\n', out);
    }
    if (env->flags & SPOOL_F_QUARANTINED)
        qcli_field(out, "quarantine", qcli_empty(env->quarantine_reason)
                                          ? "yes" : env->quarantine_reason);
    for (size_t i = 0; i < env->nrcpts; i++) {
        const struct spool_rcpt *rc = &env->rcpts[i];
        fputs("rcpt: <", out);
        qcli_puts(out, rc->addr);
        fprintf(out, "> state=%s", spool_rcpt_state_name(rc->state));
        if (rc->notify != 0)
            qcli_put_notify(out, rc->notify);
        if (!qcli_empty(rc->orcpt)) {
            fputs(" orcpt=", out);
            qcli_puts(out, rc->orcpt);
        }
        if (rc->attempts > 0)
            fprintf(out, " attempts=%" PRIu32, rc->attempts);
        if (qcli_waiting(rc)) {
            fputc(' ', out);
            qcli_put_next(out, rc, now);
        }
        if (!qcli_empty(rc->last_reply)) {
            fputs(" last=\"", out);
            qcli_puts(out, rc->last_reply);
            fputc('"', out);
        }
        fputc('\n', out);
    }
    fputc('\n', out);
    qcli_put_headers(out, buf_ptr(&content), content.len);
    buf_reset(&content);
    spool_close(sp);
    return 0;
}

/* ---- cat ---- */

int
queue_cli_cat(const char *spool_dir, const char *qid, FILE *out, FILE *err)
{
    struct spool *sp;
    const struct spool_envelope *env;
    struct buf content;
    if (qcli_load(spool_dir, qid, &sp, &env, &content, err) < 0)
        return 1;
    int rc = 0;
    if (fwrite(buf_ptr(&content), 1, content.len, out) != content.len || fflush(out) != 0) {
        fprintf(err, "petrel: %s: write error: %s\n", env->qid, strerror(errno));
        rc = 1;
    }
    buf_reset(&content);
    spool_close(sp);
    return rc;
}
