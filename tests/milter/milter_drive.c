/*
 * milter_drive — runs one scripted SMTP session through the real milter
 * engine (core/milter.c over core/conn.c on a libuv loop) and prints, one
 * JSON object per line, each stage's verdict, every modification and the
 * message after milter_apply_mods. A test helper: it proves transport,
 * negotiation and libmilter interoperability without the SMTP server.
 *
 *   milter_drive -c CONFIG [-L LISTENER] [-a CLIENT_IP] [-p CLIENT_PORT]
 *                [-n CLIENT_NAME] [-h HELO] -f SENDER [-F MAIL_PARAMS]
 *                -t RCPT [-t RCPT …] [-T RCPT_PARAMS] -m MESSAGE_FILE
 *                [-q QUEUE_ID] [-r TRANSACTIONS] [-D NAME=VALUE …]
 *
 * Output lines:
 *   {"stage":"connect|helo|mail|rcpt|data|eom","verdict":"…","code":N,
 *    "esc":"…","text":"…","raw":"…"|null[,"rcpt":"…"]}
 *   {"mod":"add_header|…","filter":"…","index":N,"name":…,"value":…,"args":…}
 *   {"quarantine":"…"}            (when a filter quarantined)
 *   {"message":"…"}               (after a CONTINUE end of message)
 *   {"end":true}
 * A stage REJECT/TEMPFAIL (MAIL, DATA, end of message, or every recipient)
 * ends the transaction with milter_abort, as smtp_server would on a failed
 * transaction; connect/helo objections end the session.
 * Exit status 0, or 1 when the loop did not close cleanly.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <uv.h>

#include "buf.h"
#include "config.h"
#include "log.h"
#include "milter.h"
#include "util.h"
#include "verdict.h"

#define DRIVE_MAX_RCPTS 32
#define DRIVE_MAX_MACROS 16

struct drive {
    struct milter_session *ms;
    const char *helo;
    const char *from;
    const char *from_params;
    const char *rcpts[DRIVE_MAX_RCPTS];
    size_t nrcpts;
    const char *rcpt_params;
    const char *macros[DRIVE_MAX_MACROS];
    size_t nmacros;
    const char *qid;
    char *msg;
    size_t msg_len;
    int transactions;
    int done_tx;
    size_t next_rcpt;
    size_t accepted;
};

static void drive_transaction(struct drive *d);

static void
json_str(const char *p, size_t n)
{
    putchar('"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '"' || c == '\\')
            printf("\\%c", c);
        else if (c < 0x20 || c == 0x7f)
            printf("\\u%04x", c);
        else
            putchar(c);
    }
    putchar('"');
}

static void
json_cstr(const char *s)
{
    if (s == NULL)
        fputs("null", stdout);
    else
        json_str(s, strlen(s));
}

static void
print_verdict(const char *stage, const struct verdict *v, const char *rcpt)
{
    printf("{\"stage\":\"%s\",\"verdict\":\"%s\",\"code\":%d,\"esc\":", stage,
           verdict_kind_name(v->kind), v->reply.code);
    json_cstr(v->reply.esc);
    fputs(",\"text\":", stdout);
    json_cstr(v->reply.text);
    fputs(",\"raw\":", stdout);
    json_cstr(v->raw);
    if (rcpt != NULL) {
        fputs(",\"rcpt\":", stdout);
        json_cstr(rcpt);
    }
    const char *why = verdict_check(v);
    fputs(",\"check\":", stdout);
    json_cstr(why);
    puts("}");
    fflush(stdout);
}

static bool
objection(const struct verdict *v)
{
    return v->kind == VERDICT_REJECT || v->kind == VERDICT_TEMPFAIL;
}

static void
drive_end(struct drive *d)
{
    puts("{\"end\":true}");
    fflush(stdout);
    milter_session_free(d->ms);
    d->ms = NULL;
}

static void
drive_next(struct drive *d)
{
    if (++d->done_tx < d->transactions)
        drive_transaction(d);
    else
        drive_end(d);
}

static void
drive_failed_tx(struct drive *d)
{
    milter_abort(d->ms);
    drive_next(d);
}

static const char *const mod_names[] = {
    [MILTER_MOD_ADD_HEADER] = "add_header",       [MILTER_MOD_INSERT_HEADER] = "insert_header",
    [MILTER_MOD_CHANGE_HEADER] = "change_header", [MILTER_MOD_DELETE_HEADER] = "delete_header",
    [MILTER_MOD_REPLACE_BODY] = "replace_body",   [MILTER_MOD_CHANGE_FROM] = "change_from",
    [MILTER_MOD_ADD_RCPT] = "add_rcpt",           [MILTER_MOD_DELETE_RCPT] = "delete_rcpt",
    [MILTER_MOD_QUARANTINE] = "quarantine",
};

static void
on_eom(struct milter_session *ms, const struct verdict *v, const struct milter_mods *mods,
       void *arg)
{
    struct drive *d = arg;
    (void)ms;
    print_verdict("eom", v, NULL);
    for (size_t i = 0; i < mods->n; i++) {
        const struct milter_mod *m = &mods->v[i];
        printf("{\"mod\":\"%s\",\"filter\":", mod_names[m->kind]);
        json_cstr(m->filter);
        printf(",\"index\":%u,\"name\":", (unsigned)m->index);
        json_cstr(m->name);
        fputs(",\"value\":", stdout);
        json_str(m->value, m->value_len);
        fputs(",\"args\":", stdout);
        json_cstr(m->args);
        puts("}");
    }
    if (mods->quarantine != NULL) {
        fputs("{\"quarantine\":", stdout);
        json_cstr(mods->quarantine);
        puts("}");
    }
    if (v->kind == VERDICT_CONTINUE) {
        struct buf out;
        buf_init(&out);
        milter_apply_mods(mods, (struct span){d->msg, d->msg_len}, &out);
        fputs("{\"message\":", stdout);
        json_str(buf_ptr(&out), out.len);
        puts("}");
        buf_reset(&out);
    }
    fflush(stdout);
    if (v->kind != VERDICT_CONTINUE)
        milter_abort(d->ms);
    drive_next(d);
}

static void
on_data(struct milter_session *ms, const struct verdict *v, void *arg)
{
    struct drive *d = arg;
    print_verdict("data", v, NULL);
    if (objection(v)) {
        drive_failed_tx(d);
        return;
    }
    milter_eom(ms, (struct span){d->msg, d->msg_len}, d->qid, on_eom, d);
}

static void on_rcpt(struct milter_session *ms, const struct verdict *v, void *arg);

static void
drive_rcpt(struct drive *d)
{
    if (d->next_rcpt < d->nrcpts) {
        milter_rcpt(d->ms, d->rcpts[d->next_rcpt], d->rcpt_params, on_rcpt, d);
        return;
    }
    if (d->accepted == 0) {
        drive_failed_tx(d);
        return;
    }
    milter_data(d->ms, on_data, d);
}

static void
on_rcpt(struct milter_session *ms, const struct verdict *v, void *arg)
{
    struct drive *d = arg;
    (void)ms;
    print_verdict("rcpt", v, d->rcpts[d->next_rcpt]);
    if (!objection(v))
        d->accepted++;
    d->next_rcpt++;
    drive_rcpt(d);
}

static void
on_mail(struct milter_session *ms, const struct verdict *v, void *arg)
{
    struct drive *d = arg;
    (void)ms;
    print_verdict("mail", v, NULL);
    if (objection(v)) {
        drive_failed_tx(d);
        return;
    }
    drive_rcpt(d);
}

static void
drive_transaction(struct drive *d)
{
    d->next_rcpt = 0;
    d->accepted = 0;
    milter_mail(d->ms, d->from, d->from_params, on_mail, d);
}

static void
on_helo(struct milter_session *ms, const struct verdict *v, void *arg)
{
    struct drive *d = arg;
    (void)ms;
    print_verdict("helo", v, NULL);
    if (objection(v)) {
        drive_end(d);
        return;
    }
    drive_transaction(d);
}

static void
on_connect(struct milter_session *ms, const struct verdict *v, void *arg)
{
    struct drive *d = arg;
    print_verdict("connect", v, NULL);
    if (objection(v)) {
        drive_end(d);
        return;
    }
    milter_helo(ms, d->helo, on_helo, d);
}

static char *
read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (fp == NULL)
        return NULL;
    struct buf b;
    buf_init(&b);
    char chunk[65536];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), fp)) > 0)
        buf_append(&b, chunk, n);
    fclose(fp);
    return buf_steal(&b, len);
}

static void
usage(void)
{
    fprintf(stderr, "usage: milter_drive -c CONFIG [-L LISTENER] [-a IP] [-p PORT] [-n NAME] "
                    "[-h HELO] -f SENDER [-F PARAMS] -t RCPT… [-T PARAMS] -m FILE [-q QID] "
                    "[-r N] [-D NAME=VALUE]\n");
    exit(2);
}

int
main(int argc, char **argv)
{
    struct drive d = {.helo = "client.example.org", .transactions = 1};
    const char *cfg_path = NULL;
    const char *listener = NULL;
    const char *msg_path = NULL;
    struct milter_conn_info ci = {
        .session_id = "drive1",
        .family = AF_INET,
        .client_addr = "192.0.2.10",
        .client_port = 40000,
        .local_addr = "127.0.0.1",
        .local_port = 25,
    };
    int c;
    while ((c = getopt(argc, argv, "c:L:a:p:n:h:f:F:t:T:m:q:r:D:")) != -1) {
        switch (c) {
        case 'c':
            cfg_path = optarg;
            break;
        case 'L':
            listener = optarg;
            break;
        case 'a':
            ci.client_addr = optarg;
            ci.family = strchr(optarg, ':') ? AF_INET6 : AF_INET;
            break;
        case 'p':
            ci.client_port = atoi(optarg);
            break;
        case 'n':
            ci.client_name = optarg;
            break;
        case 'h':
            d.helo = optarg;
            break;
        case 'f':
            d.from = optarg;
            break;
        case 'F':
            d.from_params = optarg;
            break;
        case 't':
            if (d.nrcpts == DRIVE_MAX_RCPTS)
                usage();
            d.rcpts[d.nrcpts++] = optarg;
            break;
        case 'T':
            d.rcpt_params = optarg;
            break;
        case 'm':
            msg_path = optarg;
            break;
        case 'q':
            d.qid = optarg;
            break;
        case 'r':
            d.transactions = atoi(optarg);
            break;
        case 'D':
            if (d.nmacros == DRIVE_MAX_MACROS || strchr(optarg, '=') == NULL)
                usage();
            d.macros[d.nmacros++] = optarg;
            break;
        default:
            usage();
        }
    }
    if (cfg_path == NULL || d.from == NULL || d.nrcpts == 0 || msg_path == NULL ||
        d.transactions < 1)
        usage();
    log_init(LOG_INFO, LOG_FORMAT_TEXT);
    struct petrel_config *cfg;
    char *errors = NULL;
    if (config_load_file(cfg_path, &cfg, &errors) != 0) {
        fprintf(stderr, "%s", errors);
        free(errors);
        return 2;
    }
    const struct listener_config *lc = &cfg->listeners[0];
    for (size_t i = 0; listener != NULL && i < cfg->nlisteners; i++) {
        if (strcmp(cfg->listeners[i].name, listener) == 0)
            lc = &cfg->listeners[i];
    }
    d.msg = read_file(msg_path, &d.msg_len);
    if (d.msg == NULL) {
        perror(msg_path);
        return 2;
    }
    uv_loop_t loop;
    uv_loop_init(&loop);
    d.ms = milter_session_new(&loop, cfg, lc, &ci);
    if (d.ms == NULL) {
        puts("{\"no_filters\":true}");
    } else {
        for (size_t i = 0; i < d.nmacros; i++) {
            char *kv = xstrdup(d.macros[i]);
            char *eq = strchr(kv, '=');
            *eq = '\0';
            milter_set_macro(d.ms, kv, eq + 1);
            free(kv);
        }
        milter_connect(d.ms, on_connect, &d);
    }
    uv_run(&loop, UV_RUN_DEFAULT);
    int rc = uv_loop_close(&loop) == 0 ? 0 : 1;
    free(d.msg);
    config_unref(cfg);
    return rc;
}
