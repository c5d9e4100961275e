/*
 * milter — the MTA side of the milter protocol v6 over conn.h (see
 * milter.h for the contract; Postfix milter/milter8.c is the model, but
 * asynchronous: every wait is a conn event, never a blocking read).
 *
 * One struct milter_session per SMTP session holds one struct milter_filter
 * per applicable filter, each with its own conn, negotiated options, macro
 * lists and per-message state. A stage call (milter_connect … milter_eom)
 * walks the filters in order from ms->cur: milter_advance() sends the
 * stage's macros and command to the current filter and returns when a
 * reply is due; milter_on_reply() handles the reply and calls
 * milter_advance() again for the next filter, until a filter objects or
 * none is left, then the stage's callback fires (milter_stage_finish). A
 * result decided inside the stage call itself (no filter needed asking)
 * is delivered from the session's zero-delay timer, so callbacks never run
 * inside the call that asked for them (STYLE.md §8).
 *
 * Lifetime: milter_session_free() closes every conn; the memory goes when
 * the last conn reports CONN_EV_CLOSED and no callback of ours is on the
 * stack (`busy`). Callbacks into the caller happen only from conn and timer
 * events, with busy raised, so the caller may free the session or start
 * the next stage from inside them; code after a callback touches nothing.
 *
 * End of message: each filter gets the message as modified by the filters
 * before it (their header/body modifications applied with
 * milter_apply_mods), so header indexes in every modification refer to the
 * message that filter saw and applying the whole list in order gives the
 * final message. A filter that fails mid-way loses its modifications.
 *
 * Owns: the filters' conns, copies of the connection info, macros and
 * stage arguments, the modification list. Borrows: the config (the caller
 * keeps a reference), the loop, the content given to milter_eom.
 */
#include "milter.h"

#include <arpa/inet.h>
#include <libmilter/mfapi.h>
#include <libmilter/mfdef.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>

#include "conn.h"
#include "log.h"
#include "reply.h"
#include "timer.h"

#ifndef PETREL_VERSION
#define PETREL_VERSION "0"
#endif

#define MILTER_VERSION 6
/* Every action petrel can carry out (libmilter SMFI_CURR_ACTS). */
#define MILTER_ACTIONS                                                                             \
    (SMFIF_ADDHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT | SMFIF_DELRCPT | SMFIF_CHGHDRS |               \
     SMFIF_QUARANTINE | SMFIF_CHGFROM | SMFIF_ADDRCPT_PAR | SMFIF_SETSYMLIST)
/* Every protocol flag of version 6 but SMFIP_RCPT_REJ: recipients petrel
 * refused itself are not shown to filters. */
#define MILTER_PROTOCOL (SMFI_CURR_PROT & ~(unsigned long)SMFIP_RCPT_REJ)
#define MILTER_OUT_MAX MILTER_CHUNK_MAX /* libmilter's MILTER_MAX_DATA_SIZE for our packets */
#define MILTER_NSTAGES 7                /* SMFIM_CONNECT .. SMFIM_EOH */
#define MILTER_DEF_MSG_MAX (64u * 1024 * 1024)

enum ms_stage {
    STAGE_NONE,
    STAGE_CONNECT,
    STAGE_HELO,
    STAGE_MAIL,
    STAGE_RCPT,
    STAGE_DATA,
    STAGE_EOM,
};

enum mf_state {
    MF_CONNECTING,  /* waiting for CONN_EV_CONNECTED */
    MF_NEGOTIATING, /* SMFIC_OPTNEG sent, its reply due */
    MF_READY,       /* negotiated and idle */
    MF_WAIT,        /* the reply to `await` is due */
    MF_WRITING,     /* end of message: body output waits for CONN_EV_DRAINED */
    MF_CLOSED,      /* conn closed or closing: failed, finished or quit */
};

enum eom_phase { EOM_HEADERS, EOM_EOH, EOM_BODY, EOM_EOB, EOM_FINAL };

struct milter_filter {
    struct milter_session *ms;       /* borrowed: owner */
    const struct milter_config *cfg; /* borrowed from ms->cfg */
    size_t idx;                      /* position in ms->f */
    struct conn *conn;               /* owned until CONN_EV_CLOSED, then NULL */
    enum mf_state state;
    uint32_t version;            /* negotiated */
    uint32_t actions;            /* SMFIF_* the filter may use */
    uint32_t pflags;             /* SMFIP_* the filter asked for */
    char *lists[MILTER_NSTAGES]; /* owned or NULL: SETSYMLIST macro lists */
    char await;                  /* MF_WAIT: the command whose reply is due */
    char skip;                   /* SMFIR_SKIP: command kind skipped; 0 none */
    bool disabled;               /* ignored from now on (accept, or default accept) */
    bool msg_accepted;           /* no more commands for this message */
    bool in_msg;                 /* inside a transaction: ABORT before the next */
    struct verdict sticky;       /* not CONTINUE: the answer to every later stage */
    size_t mods_mark;            /* ms->mods.n when this filter's end of message began */
    size_t body_mod;             /* 1 + index of its REPLACE_BODY in ms->mods; 0 none */
};

struct ms_macro {
    char *name;  /* owned, without braces */
    char *value; /* owned */
};

struct msg_hdr {
    size_t off;      /* first byte of the field */
    size_t name_len; /* field name, without trailing blanks */
    size_t colon;    /* offset of ':' from off */
    size_t len;      /* through the CRLF of its last line */
};

struct msg_layout {
    struct msg_hdr *v; /* owned */
    size_t n;
    size_t cap;
    size_t sep_off;  /* the empty line between headers and body (has_sep) */
    size_t body_off; /* first body byte */
    bool has_sep;    /* an empty line separates headers and body */
};

struct milter_session {
    struct uv_loop_s *loop;           /* borrowed */
    const struct petrel_config *cfg;  /* borrowed: the caller holds a reference */
    const struct listener_config *lc; /* borrowed from cfg */
    struct milter_filter *f;          /* owned */
    size_t nf;
    size_t open_conns;   /* conns not yet CLOSED */
    size_t next_start;   /* next filter whose connect is not started */
    struct timer *timer; /* owned: delivers results decided in a call */
    unsigned busy;       /* our frames on the stack that may call back */
    bool freed;          /* milter_session_free called */
    bool connect_done;   /* milter_connect called */
    /* connection info (owned copies) */
    char *session_id;
    char *client_addr;
    char *client_name;
    char *helo;
    char *sender;
    char *rcpt;
    int family;
    int client_port;
    struct ms_macro *macros; /* owned */
    size_t nmacros;
    /* the stage in progress */
    enum ms_stage stage; /* STAGE_NONE: idle */
    bool stage_done;     /* result decided, the timer delivers it */
    bool in_call;        /* inside a stage call: defer the callback */
    size_t cur;          /* filter being asked */
    milter_verdict_cb *cb;
    milter_eom_cb *eom_cb;
    void *arg;
    struct verdict result;
    size_t result_filter; /* who objected (for logs); nf = nobody */
    struct buf payload;   /* owned: the stage command's data */
    struct buf pkt;       /* owned: scratch for one packet */
    /* the transaction */
    bool discard; /* a filter said DISCARD */
    /* end of message */
    struct span content; /* the message as the current filter sees it */
    struct buf cbuf[2];  /* owned: modified copies of the message */
    int cbuf_cur;
    size_t content_applied;   /* mods already applied to content */
    struct msg_layout layout; /* of content */
    enum eom_phase phase;
    size_t hdr_next;
    size_t body_off;
    struct buf replbody; /* owned: the current filter's SMFIR_REPLBODY bytes */
    struct milter_mods mods;
    size_t mods_bytes;
};

static void milter_advance(struct milter_session *ms);
static void milter_on_conn(struct conn *c, enum conn_event ev, int status, void *arg);
static void milter_eom_step(struct milter_session *ms, struct milter_filter *f);
static void milter_layout_parse(struct span c, struct msg_layout *l);
static void milter_start_next(struct milter_session *ms);

/* Postfix's default macro lists (mail_params.h DEF_MILT_*_MACROS) plus the
 * connection details the issue asks for; indexed by SMFIM_*. */
static const char *const milter_default_lists[MILTER_NSTAGES] = {
    [SMFIM_CONNECT] = "j _ {daemon_name} {daemon_addr} {daemon_port} {if_name} {if_addr} "
                      "{client_addr} {client_port} {client_name} v",
    [SMFIM_HELO] = "{tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}",
    [SMFIM_ENVFROM] = "i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host} "
                      "{mail_mailer}",
    [SMFIM_ENVRCPT] = "i {rcpt_addr} {rcpt_host} {rcpt_mailer}",
    [SMFIM_DATA] = "i",
    [SMFIM_EOM] = "i",
    [SMFIM_EOH] = "i",
};

/* ---- small helpers ------------------------------------------------------- */

static uint32_t
milter_get32(const char *p)
{
    const unsigned char *u = (const unsigned char *)p;
    return (uint32_t)u[0] << 24 | (uint32_t)u[1] << 16 | (uint32_t)u[2] << 8 | (uint32_t)u[3];
}

static void
milter_put32(struct buf *b, uint32_t v)
{
    unsigned char u[4] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 8), (unsigned char)v};
    buf_append(b, u, 4);
}

static char *
milter_strdup_or_null(const char *s)
{
    return s != NULL ? xstrdup(s) : NULL;
}

static bool
milter_is_msg_stage(enum ms_stage st)
{
    return st == STAGE_MAIL || st == STAGE_RCPT || st == STAGE_DATA || st == STAGE_EOM;
}

static const char *
milter_stage_name(enum ms_stage st)
{
    switch (st) {
    case STAGE_CONNECT:
        return "CONNECT";
    case STAGE_HELO:
        return "HELO";
    case STAGE_MAIL:
        return "MAIL";
    case STAGE_RCPT:
        return "RCPT";
    case STAGE_DATA:
        return "DATA";
    case STAGE_EOM:
        return "END-OF-MESSAGE";
    case STAGE_NONE:
        break;
    }
    return "IDLE";
}

/* The domain of an address ("" if none). */
static const char *
milter_addr_host(const char *addr)
{
    const char *at = strrchr(addr, '@');
    return at != NULL ? at + 1 : "";
}

/* ---- macros -------------------------------------------------------------- */

/* "{name}" → "name"; n is set to the bare length. */
static const char *
milter_macro_bare(const char *s, size_t len, size_t *n)
{
    if (len >= 2 && s[0] == '{' && s[len - 1] == '}') {
        *n = len - 2;
        return s + 1;
    }
    *n = len;
    return s;
}

static struct ms_macro *
milter_macro_find(const struct milter_session *ms, const char *name, size_t len)
{
    for (size_t i = 0; i < ms->nmacros; i++) {
        if (strlen(ms->macros[i].name) == len && memcmp(ms->macros[i].name, name, len) == 0)
            return &ms->macros[i];
    }
    return NULL;
}

void
milter_set_macro(struct milter_session *ms, const char *name, const char *value)
{
    size_t n;
    const char *bare = milter_macro_bare(name, strlen(name), &n);
    if (n == 0)
        return;
    struct ms_macro *m = milter_macro_find(ms, bare, n);
    if (value == NULL) {
        if (m != NULL) {
            free(m->name);
            free(m->value);
            *m = ms->macros[--ms->nmacros];
        }
        return;
    }
    if (m == NULL) {
        ms->macros = xreallocarray(ms->macros, ms->nmacros + 1, sizeof(*ms->macros));
        m = &ms->macros[ms->nmacros++];
        m->name = xstrndup(bare, n);
        m->value = NULL;
    }
    free(m->value);
    m->value = xstrdup(value);
}

static const char *
milter_macro_get(const struct milter_session *ms, const char *name)
{
    const struct ms_macro *m = milter_macro_find(ms, name, strlen(name));
    return m != NULL ? m->value : NULL;
}

/* ---- output -------------------------------------------------------------- */

static void
milter_trace(const struct milter_filter *f, const char *dir, char cmd, size_t len)
{
    if (!log_enabled(LOG_DEBUG))
        return;
    log_msg(LOG_DEBUG, NULL, "milter=%s %s '%c' (%zu bytes)", f->cfg->name, dir,
            cmd >= 0x20 && cmd < 0x7f ? cmd : '?', len);
}

/* Queues one packet: length, command, data (len ≤ MILTER_OUT_MAX). */
static void
milter_send(struct milter_filter *f, char cmd, const void *data, size_t len)
{
    if (len > MILTER_OUT_MAX)
        PANIC("milter_send: %zu bytes for '%c'", len, cmd);
    struct buf *b = &f->ms->pkt;
    buf_clear(b);
    milter_put32(b, (uint32_t)len + 1);
    buf_append(b, &cmd, 1);
    conn_write(f->conn, buf_ptr(b), b->len);
    if (len > 0)
        conn_write(f->conn, data, len);
    milter_trace(f, ">>>", cmd, len);
}

/* Appends s and its NUL to b if the packet stays within MILTER_OUT_MAX
 * (a string that does not fit is cut; false once full). */
static bool
milter_put_str(struct buf *b, const char *s)
{
    size_t n = strlen(s);
    if (b->len >= MILTER_OUT_MAX)
        return false;
    size_t room = MILTER_OUT_MAX - b->len - 1;
    bool fits = n <= room;
    buf_append(b, s, fits ? n : room);
    buf_append(b, "", 1);
    return fits;
}

/* The SMFIC_MACRO packet for stage (SMFIM_*) and its command byte; only
 * macros with a value, and none at all when none has one. */
static void
milter_send_macros(struct milter_filter *f, int stage, char cmd)
{
    struct milter_session *ms = f->ms;
    const char *list = f->lists[stage] != NULL ? f->lists[stage] : milter_default_lists[stage];
    struct buf b;
    buf_init(&b);
    buf_append(&b, &cmd, 1);
    const char *p = list;
    while (*p) {
        while (*p == ' ' || *p == ',' || *p == '\t')
            p++;
        size_t len = 0;
        while (p[len] && p[len] != ' ' && p[len] != ',' && p[len] != '\t')
            len++;
        if (len == 0)
            break;
        size_t n;
        const char *bare = milter_macro_bare(p, len, &n);
        p += len;
        const struct ms_macro *m = n > 0 ? milter_macro_find(ms, bare, n) : NULL;
        if (m == NULL)
            continue;
        /* Sendmail's names: one letter bare, longer ones in braces */
        char name[256];
        int w = n == 1 ? snprintf(name, sizeof(name), "%.*s", (int)n, bare)
                       : snprintf(name, sizeof(name), "{%.*s}", (int)n, bare);
        if (w < 0 || (size_t)w >= sizeof(name))
            continue;
        size_t before = b.len;
        if (!milter_put_str(&b, name) || !milter_put_str(&b, m->value)) {
            b.len = before; /* does not fit: leave it out */
            break;
        }
    }
    if (b.len > 1)
        milter_send(f, SMFIC_MACRO, buf_ptr(&b), b.len);
    buf_reset(&b);
}

/* Arms the deadline for what f waits for now. */
static void
milter_arm(struct milter_filter *f)
{
    uint64_t ms;
    if (f->state == MF_CONNECTING)
        ms = f->cfg->connect_timeout_ms;
    else if (f->state == MF_WRITING || (f->state == MF_WAIT && strchr("LNBE", f->await) != NULL))
        ms = f->cfg->eom_timeout_ms;
    else if (f->state == MF_NEGOTIATING || f->state == MF_WAIT)
        ms = f->cfg->command_timeout_ms;
    else
        ms = 0;
    conn_set_timeout(f->conn, ms);
}

static void
milter_await(struct milter_filter *f, char cmd)
{
    f->state = MF_WAIT;
    f->await = cmd;
    conn_flush(f->conn);
    milter_arm(f);
}

/* SMFIR_SKIP bookkeeping (Postfix milter8_event): true if commands of kind
 * cmd are skipped; sending another kind ends the skipping. */
static bool
milter_skipped(struct milter_filter *f, char cmd)
{
    if (f->skip == cmd)
        return true;
    f->skip = 0;
    return false;
}

/* Closes f's conn (after QUIT if negotiated and quit). */
static void
milter_close(struct milter_filter *f, bool quit)
{
    if (f->state == MF_CLOSED)
        return;
    if (f->conn != NULL) {
        if (quit && (f->state == MF_READY || f->state == MF_WAIT || f->state == MF_WRITING))
            milter_send(f, SMFIC_QUIT, NULL, 0);
        conn_close(f->conn);
    }
    f->state = MF_CLOSED;
}

/* ---- logging ------------------------------------------------------------- */

static void
milter_log_begin(const struct milter_session *ms, struct log_line *ll, enum log_level level,
                 const char *event, const struct milter_filter *f)
{
    log_begin(ll, level, milter_macro_get(ms, "i"));
    log_event(ll, event);
    if (ms->session_id != NULL)
        log_kv(ll, "session", "%s", ms->session_id);
    if (f != NULL)
        log_kv(ll, "milter", "%s", f->cfg->name);
}

static void
milter_log_client(const struct milter_session *ms, struct log_line *ll)
{
    const char *name = ms->client_name != NULL ? ms->client_name : "unknown";
    const char *addr = ms->client_addr != NULL ? ms->client_addr : "unknown";
    char c[600];
    int n = snprintf(c, sizeof(c), "%s[%s]", name, addr);
    if (n > 0)
        log_kv_vis(ll, "client", c, strlen(c));
}

/* Logs a reject/tempfail/discard verdict of the stage just finished. */
static void
milter_log_verdict(const struct milter_session *ms, enum ms_stage st, const struct verdict *v)
{
    if (v->kind != VERDICT_REJECT && v->kind != VERDICT_TEMPFAIL && v->kind != VERDICT_DISCARD)
        return;
    const struct milter_filter *f = ms->result_filter < ms->nf ? &ms->f[ms->result_filter] : NULL;
    struct log_line ll;
    milter_log_begin(ms, &ll, LOG_INFO,
                     v->kind == VERDICT_DISCARD ? "milter-discard" : "milter-reject", f);
    log_kv(&ll, "cmd", "%s", milter_stage_name(st));
    milter_log_client(ms, &ll);
    if (ms->helo != NULL)
        log_kv_vis(&ll, "helo", ms->helo, strlen(ms->helo));
    char addr[600];
    if (ms->sender != NULL && milter_is_msg_stage(st) &&
        snprintf(addr, sizeof(addr), "<%s>", ms->sender) > 0)
        log_kv_vis(&ll, "from", addr, strlen(addr));
    if (ms->rcpt != NULL && st == STAGE_RCPT && snprintf(addr, sizeof(addr), "<%s>", ms->rcpt) > 0)
        log_kv_vis(&ll, "to", addr, strlen(addr));
    if (v->kind != VERDICT_DISCARD) {
        char text[1024];
        verdict_format(v, text, sizeof(text));
        log_kv_vis(&ll, "reply", text, strlen(text));
    }
    log_end(&ll);
}

/* ---- stage completion ---------------------------------------------------- */

static void
milter_maybe_destroy(struct milter_session *ms)
{
    if (!ms->freed || ms->busy > 0 || ms->open_conns > 0)
        return;
    for (size_t i = 0; i < ms->nf; i++) {
        for (size_t k = 0; k < MILTER_NSTAGES; k++)
            free(ms->f[i].lists[k]);
        verdict_clear(&ms->f[i].sticky);
    }
    free(ms->f);
    for (size_t i = 0; i < ms->nmacros; i++) {
        free(ms->macros[i].name);
        free(ms->macros[i].value);
    }
    free(ms->macros);
    free(ms->session_id);
    free(ms->client_addr);
    free(ms->client_name);
    free(ms->helo);
    free(ms->sender);
    free(ms->rcpt);
    verdict_clear(&ms->result);
    buf_reset(&ms->payload);
    buf_reset(&ms->pkt);
    buf_reset(&ms->cbuf[0]);
    buf_reset(&ms->cbuf[1]);
    buf_reset(&ms->replbody);
    free(ms->layout.v);
    milter_mods_reset(&ms->mods);
    free(ms);
}

/* Calls the stage's callback with ms->result and makes the session idle
 * first, so the callback may start the next stage or free the session.
 * The caller returns right after. */
static void
milter_deliver(struct milter_session *ms)
{
    enum ms_stage st = ms->stage;
    milter_verdict_cb *cb = ms->cb;
    milter_eom_cb *eom_cb = ms->eom_cb;
    void *arg = ms->arg;
    struct verdict v;
    verdict_init(&v);
    verdict_move(&v, &ms->result);
    ms->stage = STAGE_NONE;
    ms->stage_done = false;
    ms->cb = NULL;
    ms->eom_cb = NULL;
    if (v.kind == VERDICT_DISCARD && milter_is_msg_stage(st))
        ms->discard = true;
    milter_log_verdict(ms, st, &v);
    ms->busy++;
    if (st == STAGE_EOM) {
        if (v.kind != VERDICT_CONTINUE) {
            milter_mods_reset(&ms->mods);
        } else {
            ms->mods.content = false;
            ms->mods.quarantine = NULL;
            for (size_t i = 0; i < ms->mods.n; i++) {
                enum milter_mod_kind k = ms->mods.v[i].kind;
                if (k <= MILTER_MOD_REPLACE_BODY)
                    ms->mods.content = true;
                else if (k == MILTER_MOD_QUARANTINE)
                    ms->mods.quarantine = ms->mods.v[i].value;
            }
        }
        ms->content = (struct span){NULL, 0};
        eom_cb(ms, &v, &ms->mods, arg);
    } else {
        cb(ms, &v, arg);
    }
    ms->busy--;
    verdict_clear(&v);
}

/* The stage's result is in ms->result: deliver it now, or from the timer
 * when we are still inside the stage call. */
static void
milter_stage_finish(struct milter_session *ms)
{
    ms->stage_done = true;
    if (ms->in_call) {
        timer_arm(ms->timer, 0);
        return;
    }
    milter_deliver(ms);
}

static void
milter_on_timer(struct timer *t, void *arg)
{
    struct milter_session *ms = arg;
    (void)t;
    if (ms->stage == STAGE_NONE || !ms->stage_done)
        return;
    ms->busy++;
    milter_deliver(ms);
    ms->busy--;
    milter_maybe_destroy(ms);
}

/* ---- failures ------------------------------------------------------------ */

/* Drops the modifications of f's unfinished end of message. */
static void
milter_mods_rollback(struct milter_session *ms, struct milter_filter *f)
{
    while (ms->mods.n > f->mods_mark) {
        struct milter_mod *m = &ms->mods.v[--ms->mods.n];
        ms->mods_bytes -=
            m->value_len + (m->name ? strlen(m->name) : 0) + (m->args ? strlen(m->args) : 0);
        free(m->name);
        free(m->value);
        free(m->args);
    }
    f->body_mod = 0;
    buf_clear(&ms->replbody);
}

static void milter_fail(struct milter_filter *f, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* f failed (unreachable, timeout, lost, protocol error): log, close, and
 * apply its default_action; if the stage was waiting on f, go on. */
static void
milter_fail(struct milter_filter *f, const char *fmt, ...)
{
    struct milter_session *ms = f->ms;
    char why[512];
    va_list ap;
    va_start(ap, fmt);
    if (vsnprintf(why, sizeof(why), fmt, ap) < 0)
        why[0] = '\0';
    va_end(ap);
    bool current = ms->stage != STAGE_NONE && !ms->stage_done && ms->cur == f->idx;
    bool was_connecting = f->state == MF_CONNECTING || f->conn == NULL;
    struct log_line ll;
    milter_log_begin(ms, &ll, LOG_WARNING, "milter-failure", f);
    if (current)
        log_kv(&ll, "cmd", "%s", milter_stage_name(ms->stage));
    log_kv_vis(&ll, "reason", why, strlen(why));
    log_kv(&ll, "status", "%s", verdict_action_name(f->cfg->default_action));
    log_end(&ll);
    if (current && ms->stage == STAGE_EOM)
        milter_mods_rollback(ms, f);
    milter_close(f, false);
    f->in_msg = false;
    switch (f->cfg->default_action) {
    case MILTER_ACTION_ACCEPT:
        f->disabled = true;
        break;
    case MILTER_ACTION_REJECT:
        verdict_set(&f->sticky, VERDICT_REJECT, &R_MILTER_FAIL_REJECT);
        break;
    case MILTER_ACTION_TEMPFAIL:
        verdict_set(&f->sticky, VERDICT_TEMPFAIL, &R_MILTER_FAIL_TEMP);
        break;
    }
    if (was_connecting)
        milter_start_next(ms);
    if (current)
        milter_advance(ms);
}

/* ---- sending a stage ----------------------------------------------------- */

/* Per stage: macro list, command, "don't send" and "no reply" flags. */
struct stage_info {
    int macros;       /* SMFIM_* */
    char cmd;         /* SMFIC_* */
    uint32_t no_flag; /* SMFIP_NO* */
    uint32_t nr_flag; /* SMFIP_NR_* */
};

static struct stage_info
milter_stage_info(enum ms_stage st)
{
    switch (st) {
    case STAGE_CONNECT:
        return (struct stage_info){SMFIM_CONNECT, SMFIC_CONNECT, SMFIP_NOCONNECT, SMFIP_NR_CONN};
    case STAGE_HELO:
        return (struct stage_info){SMFIM_HELO, SMFIC_HELO, SMFIP_NOHELO, SMFIP_NR_HELO};
    case STAGE_MAIL:
        return (struct stage_info){SMFIM_ENVFROM, SMFIC_MAIL, SMFIP_NOMAIL, SMFIP_NR_MAIL};
    case STAGE_RCPT:
        return (struct stage_info){SMFIM_ENVRCPT, SMFIC_RCPT, SMFIP_NORCPT, SMFIP_NR_RCPT};
    case STAGE_DATA:
        return (struct stage_info){SMFIM_DATA, SMFIC_DATA, SMFIP_NODATA, SMFIP_NR_DATA};
    case STAGE_EOM:
    case STAGE_NONE:
        break;
    }
    PANIC("milter_stage_info: stage %d", (int)st);
}

/* Sends the current stage to f. True if a reply (or drain) is awaited. */
static bool
milter_send_stage(struct milter_session *ms, struct milter_filter *f)
{
    if (ms->stage == STAGE_EOM) {
        f->in_msg = true;
        f->mods_mark = ms->mods.n;
        f->body_mod = 0;
        buf_clear(&ms->replbody);
        /* the message as the filters before this one left it */
        if (ms->content_applied < ms->mods.n) {
            struct milter_mods view = {ms->mods.v + ms->content_applied,
                                       ms->mods.n - ms->content_applied, 0, false, NULL};
            bool changes = false;
            for (size_t i = 0; i < view.n; i++)
                changes |= view.v[i].kind <= MILTER_MOD_REPLACE_BODY;
            if (changes) {
                int next = 1 - ms->cbuf_cur;
                buf_clear(&ms->cbuf[next]);
                milter_apply_mods(&view, ms->content, &ms->cbuf[next]);
                ms->cbuf_cur = next;
                ms->content = (struct span){buf_ptr(&ms->cbuf[next]), ms->cbuf[next].len};
                milter_layout_parse(ms->content, &ms->layout);
            }
            ms->content_applied = ms->mods.n;
        }
        ms->phase = EOM_HEADERS;
        ms->hdr_next = 0;
        ms->body_off = ms->layout.body_off;
        milter_eom_step(ms, f);
        return true;
    }
    struct stage_info si = milter_stage_info(ms->stage);
    if (ms->stage == STAGE_DATA && f->version < 4)
        return false; /* SMFIC_DATA came with protocol version 4 */
    if (milter_skipped(f, si.cmd))
        return false;
    if (milter_is_msg_stage(ms->stage))
        f->in_msg = true;
    milter_send_macros(f, si.macros, si.cmd);
    if (f->pflags & si.no_flag) {
        conn_flush(f->conn);
        return false;
    }
    milter_send(f, si.cmd, buf_ptr(&ms->payload), ms->payload.len);
    if (f->pflags & si.nr_flag) {
        conn_flush(f->conn);
        return false;
    }
    milter_await(f, si.cmd);
    return true;
}

/* Walks the filters from ms->cur until one must be waited for, one
 * objects, or none is left. */
static void
milter_advance(struct milter_session *ms)
{
    while (ms->stage != STAGE_NONE && !ms->stage_done) {
        if (ms->cur >= ms->nf) {
            milter_stage_finish(ms);
            return;
        }
        struct milter_filter *f = &ms->f[ms->cur];
        if (f->sticky.kind != VERDICT_CONTINUE) {
            verdict_copy(&ms->result, &f->sticky);
            ms->result_filter = f->idx;
            milter_stage_finish(ms);
            return;
        }
        if (f->disabled || (milter_is_msg_stage(ms->stage) && f->msg_accepted)) {
            ms->cur++;
            continue;
        }
        if (f->state == MF_CONNECTING || f->state == MF_NEGOTIATING)
            return; /* milter_on_optneg or milter_fail resumes */
        if (f->state != MF_READY)
            PANIC("milter_advance: filter %s in state %d", f->cfg->name, (int)f->state);
        if (milter_send_stage(ms, f))
            return;
        ms->cur++;
    }
}

/* Starts a stage call: checks the contract, then walks the filters with
 * in_call set so that a result found at once goes through the timer. */
static void
milter_stage_start(struct milter_session *ms, enum ms_stage st, milter_verdict_cb *cb,
                   milter_eom_cb *eom_cb, void *arg)
{
    if (ms->freed)
        PANIC("milter: stage call on a freed session");
    if (ms->stage != STAGE_NONE)
        PANIC("milter: %s called while %s is pending", milter_stage_name(st),
              milter_stage_name(ms->stage));
    if (st != STAGE_CONNECT && !ms->connect_done)
        PANIC("milter: %s before milter_connect", milter_stage_name(st));
    ms->stage = st;
    ms->stage_done = false;
    ms->cb = cb;
    ms->eom_cb = eom_cb;
    ms->arg = arg;
    ms->cur = 0;
    ms->result_filter = ms->nf;
    verdict_clear(&ms->result);
    ms->in_call = true;
    if (ms->discard && (st == STAGE_RCPT || st == STAGE_DATA || st == STAGE_EOM)) {
        verdict_set(&ms->result, VERDICT_DISCARD, NULL);
        milter_stage_finish(ms);
    } else {
        milter_advance(ms);
    }
    ms->in_call = false;
}

/* SMFIC_ABORT to every filter inside a transaction; forgets the
 * transaction's state. */
static void
milter_end_transaction(struct milter_session *ms)
{
    for (size_t i = 0; i < ms->nf; i++) {
        struct milter_filter *f = &ms->f[i];
        if (f->in_msg && f->state == MF_READY && !f->disabled &&
            f->sticky.kind == VERDICT_CONTINUE) {
            milter_send(f, SMFIC_ABORT, NULL, 0);
            conn_flush(f->conn);
        }
        f->in_msg = false;
        f->msg_accepted = false;
        f->skip = 0;
    }
    ms->discard = false;
    milter_mods_reset(&ms->mods);
    ms->mods_bytes = 0;
}

/* ---- end of message ------------------------------------------------------ */

/* One header as SMFIC_HEADER data: name NUL value NUL, the value without
 * the one space Sendmail eats unless SMFIP_HDR_LEADSPC, folded lines joined
 * with LF (Sendmail's form), cut to fit a packet. */
static void
milter_send_header(struct milter_session *ms, struct milter_filter *f, const struct msg_hdr *h)
{
    const char *p = ms->content.p + h->off;
    struct buf *b = &ms->payload;
    buf_clear(b);
    buf_append(b, p, h->name_len < 998 ? h->name_len : 998); /* RFC 5322 2.1.1 line limit */
    buf_append(b, "", 1);
    size_t v = h->colon + 1;
    size_t end = h->len;
    if (end >= 2 && p[end - 2] == '\r' && p[end - 1] == '\n')
        end -= 2;
    else if (end >= 1 && p[end - 1] == '\n')
        end -= 1;
    if (!(f->pflags & SMFIP_HDR_LEADSPC) && v < end && p[v] == ' ')
        v++;
    for (size_t i = v; i < end && b->len < MILTER_OUT_MAX - 1; i++) {
        if (p[i] == '\r' && i + 1 < end && p[i + 1] == '\n')
            continue; /* CRLF inside a folded field → LF */
        buf_append(b, p + i, 1);
    }
    buf_append(b, "", 1);
    milter_send(f, SMFIC_HEADER, buf_ptr(b), b->len);
}

/* Sends f the next part of the message until a reply or a drain is due. */
static void
milter_eom_step(struct milter_session *ms, struct milter_filter *f)
{
    for (;;) {
        switch (ms->phase) {
        case EOM_HEADERS:
            if ((f->pflags & SMFIP_NOHDRS) || ms->hdr_next >= ms->layout.n ||
                milter_skipped(f, SMFIC_HEADER)) {
                ms->phase = EOM_EOH;
                break;
            }
            milter_send_header(ms, f, &ms->layout.v[ms->hdr_next++]);
            if (f->pflags & SMFIP_NR_HDR)
                break;
            milter_await(f, SMFIC_HEADER);
            return;
        case EOM_EOH:
            ms->phase = EOM_BODY;
            if (milter_skipped(f, SMFIC_EOH))
                break;
            milter_send_macros(f, SMFIM_EOH, SMFIC_EOH);
            if (f->pflags & SMFIP_NOEOH)
                break;
            milter_send(f, SMFIC_EOH, NULL, 0);
            if (f->pflags & SMFIP_NR_EOH)
                break;
            milter_await(f, SMFIC_EOH);
            return;
        case EOM_BODY: {
            size_t left = ms->content.len - ms->body_off;
            if ((f->pflags & SMFIP_NOBODY) || left == 0 || milter_skipped(f, SMFIC_BODY)) {
                ms->phase = EOM_EOB;
                break;
            }
            size_t n = left > MILTER_CHUNK_MAX ? MILTER_CHUNK_MAX : left;
            milter_send(f, SMFIC_BODY, ms->content.p + ms->body_off, n);
            ms->body_off += n;
            if (!(f->pflags & SMFIP_NR_BODY)) {
                milter_await(f, SMFIC_BODY);
                return;
            }
            conn_flush(f->conn);
            if (conn_pending_output(f->conn) > 0) {
                f->state = MF_WRITING; /* CONN_EV_DRAINED brings us back */
                milter_arm(f);
                return;
            }
            break;
        }
        case EOM_EOB:
            ms->phase = EOM_FINAL;
            f->skip = 0;
            milter_send_macros(f, SMFIM_EOM, SMFIC_BODYEOB);
            milter_send(f, SMFIC_BODYEOB, NULL, 0);
            milter_await(f, SMFIC_BODYEOB);
            return;
        case EOM_FINAL:
            PANIC("milter_eom_step: filter %s past its end of message", f->cfg->name);
        }
    }
}

/* Normalizes a replacement body to CRLF lines (bare CR or LF → CRLF, a
 * missing final CRLF added). */
static void
milter_body_normalize(const char *p, size_t n, struct buf *out)
{
    size_t seg = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] == '\r' && i + 1 < n && p[i + 1] == '\n') {
            i++;
            continue;
        }
        if (p[i] == '\r' || p[i] == '\n') {
            buf_append(out, p + seg, i - seg);
            buf_append(out, "\r\n", 2);
            seg = i + 1;
        }
    }
    buf_append(out, p + seg, n - seg);
    if (out->len > 0 &&
        (out->len < 2 || buf_ptr(out)[out->len - 2] != '\r' || buf_ptr(out)[out->len - 1] != '\n'))
        buf_append(out, "\r\n", 2);
}

/* Logs what f changed in this message. */
static void
milter_log_mods(struct milter_session *ms, struct milter_filter *f)
{
    static const char *const names[] = {
        [MILTER_MOD_ADD_HEADER] = "add_header",       [MILTER_MOD_INSERT_HEADER] = "insert_header",
        [MILTER_MOD_CHANGE_HEADER] = "change_header", [MILTER_MOD_DELETE_HEADER] = "delete_header",
        [MILTER_MOD_REPLACE_BODY] = "replace_body",   [MILTER_MOD_CHANGE_FROM] = "change_from",
        [MILTER_MOD_ADD_RCPT] = "add_rcpt",           [MILTER_MOD_DELETE_RCPT] = "delete_rcpt",
        [MILTER_MOD_QUARANTINE] = "quarantine",
    };
    unsigned counts[ARRAY_SIZE(names)] = {0};
    for (size_t i = f->mods_mark; i < ms->mods.n; i++) {
        const struct milter_mod *m = &ms->mods.v[i];
        counts[m->kind]++;
        if (m->kind == MILTER_MOD_QUARANTINE) {
            struct log_line ll;
            milter_log_begin(ms, &ll, LOG_INFO, "milter-hold", f);
            log_kv(&ll, "cmd", "%s", milter_stage_name(STAGE_EOM));
            log_kv_vis(&ll, "reason", m->value, m->value_len);
            log_end(&ll);
        }
    }
    char text[400];
    size_t o = 0;
    text[0] = '\0';
    for (size_t k = 0; k < ARRAY_SIZE(names); k++) {
        if (counts[k] == 0)
            continue;
        int w = snprintf(text + o, sizeof(text) - o, "%s%s=%u", o ? " " : "", names[k], counts[k]);
        if (w < 0 || (size_t)w >= sizeof(text) - o)
            break;
        o += (size_t)w;
    }
    if (o == 0)
        return;
    struct log_line ll;
    milter_log_begin(ms, &ll, LOG_INFO, "milter-modify", f);
    log_kv(&ll, "counts", "%s", text);
    log_end(&ll);
}

/* f answered end of message with continue/accept: its replacement body
 * becomes final, its modifications are logged. */
static void
milter_eom_done(struct milter_session *ms, struct milter_filter *f)
{
    if (f->body_mod > 0) {
        struct milter_mod *m = &ms->mods.v[f->body_mod - 1];
        struct buf b;
        buf_init(&b);
        milter_body_normalize(buf_ptr(&ms->replbody), ms->replbody.len, &b);
        free(m->value);
        m->value = buf_steal(&b, &m->value_len);
        buf_clear(&ms->replbody);
    }
    milter_log_mods(ms, f);
}

/* ---- replies ------------------------------------------------------------- */

static struct milter_mod *
milter_mod_push(struct milter_session *ms, struct milter_filter *f, enum milter_mod_kind kind)
{
    struct milter_mods *m = &ms->mods;
    if (m->n == m->cap) {
        m->cap = m->cap ? m->cap * 2 : 8;
        m->v = xreallocarray(m->v, m->cap, sizeof(*m->v));
    }
    struct milter_mod *mod = &m->v[m->n++];
    memset(mod, 0, sizeof(*mod));
    mod->kind = kind;
    mod->filter = f->cfg->name;
    return mod;
}

static size_t
milter_msg_max(const struct milter_session *ms)
{
    uint64_t v = ms->lc != NULL ? ms->lc->max_message_size : 0;
    if (v == 0 || v > SIZE_MAX / 2)
        return MILTER_DEF_MSG_MAX;
    return (size_t)v;
}

/* A header field name from a filter: printable ASCII but ':' (RFC 5322
 * 3.6.8), at most 998 bytes. */
static bool
milter_valid_header_name(struct span n)
{
    if (n.len == 0 || n.len > 998)
        return false;
    for (size_t i = 0; i < n.len; i++) {
        unsigned char c = (unsigned char)n.p[i];
        if (c < 33 || c > 126 || c == ':')
            return false;
    }
    return true;
}

/* A header value from a filter as it will be stored after the colon:
 * a space first unless SMFIP_HDR_LEADSPC, LF or CRLF → CRLF followed by
 * whitespace (a TAB is added where the filter gave none), trailing line
 * ends dropped. NULL for a bare CR. */
static char *
milter_header_value(struct span v, bool leadspc, size_t *out_len)
{
    while (v.len > 0 && (v.p[v.len - 1] == '\n' || v.p[v.len - 1] == '\r'))
        v.len--;
    struct buf b;
    buf_init(&b);
    if (!leadspc)
        buf_append(&b, " ", 1);
    for (size_t i = 0; i < v.len; i++) {
        char c = v.p[i];
        if (c == '\r') {
            if (i + 1 >= v.len || v.p[i + 1] != '\n') {
                buf_reset(&b);
                return NULL;
            }
            continue;
        }
        if (c == '\n') {
            buf_append(&b, "\r\n", 2);
            if (i + 1 < v.len && v.p[i + 1] != ' ' && v.p[i + 1] != '\t')
                buf_append(&b, "\t", 1);
            continue;
        }
        buf_append(&b, &c, 1);
    }
    return buf_steal(&b, out_len);
}

/* An envelope address from a filter: without <>, no control characters. */
static char *
milter_address(struct span a)
{
    if (a.len >= 2 && a.p[0] == '<' && a.p[a.len - 1] == '>') {
        a.p++;
        a.len -= 2;
    }
    for (size_t i = 0; i < a.len; i++) {
        unsigned char c = (unsigned char)a.p[i];
        if (c < 0x20 || c == 0x7f)
            return NULL;
    }
    return xstrndup(a.p, a.len);
}

static char *
milter_args(const struct milter_reply *r)
{
    if (!r->has_value || r->value.len == 0)
        return NULL;
    for (size_t i = 0; i < r->value.len; i++) {
        unsigned char c = (unsigned char)r->value.p[i];
        if (c < 0x20 || c == 0x7f)
            return NULL;
    }
    return xstrndup(r->value.p, r->value.len);
}

/* A modification request at end of message. False: f failed. */
static bool
milter_on_mod(struct milter_session *ms, struct milter_filter *f, const struct milter_reply *r)
{
    static const struct {
        char cmd;
        uint32_t action;
        const char *name;
    } need[] = {
        {SMFIR_ADDHEADER, SMFIF_ADDHDRS, "add header"},
        {SMFIR_INSHEADER, SMFIF_ADDHDRS, "insert header"},
        {SMFIR_CHGHEADER, SMFIF_CHGHDRS, "change header"},
        {SMFIR_REPLBODY, SMFIF_CHGBODY, "replace body"},
        {SMFIR_CHGFROM, SMFIF_CHGFROM, "change sender"},
        {SMFIR_ADDRCPT, SMFIF_ADDRCPT, "add recipient"},
        {SMFIR_ADDRCPT_PAR, SMFIF_ADDRCPT_PAR, "add recipient with parameters"},
        {SMFIR_DELRCPT, SMFIF_DELRCPT, "delete recipient"},
        {SMFIR_QUARANTINE, SMFIF_QUARANTINE, "quarantine"},
    };
    size_t k = 0;
    while (k < ARRAY_SIZE(need) && need[k].cmd != r->cmd)
        k++;
    if (k == ARRAY_SIZE(need)) {
        milter_fail(f, "unexpected reply '%c' at end of message", r->cmd);
        return false;
    }
    if (!(f->actions & need[k].action)) {
        milter_fail(f, "%s without negotiating it", need[k].name);
        return false;
    }
    if (ms->mods.n - f->mods_mark >= MILTER_MODS_MAX) {
        milter_fail(f, "more than %d modifications", MILTER_MODS_MAX);
        return false;
    }
    size_t size = r->name.len + r->value.len + r->data.len;
    if (ms->mods_bytes + size > milter_msg_max(ms) ||
        ms->replbody.len + r->data.len > milter_msg_max(ms)) {
        milter_fail(f, "modifications larger than the message size limit");
        return false;
    }
    if (r->cmd == SMFIR_REPLBODY) {
        if (f->body_mod == 0) {
            milter_mod_push(ms, f, MILTER_MOD_REPLACE_BODY)->value = xstrdup("");
            f->body_mod = ms->mods.n;
        }
        buf_append(&ms->replbody, r->data.p, r->data.len);
        ms->mods_bytes += r->data.len;
        return true;
    }
    struct milter_mod tmp = {0};
    const char *bad = NULL;
    switch (r->cmd) {
    case SMFIR_ADDHEADER:
    case SMFIR_INSHEADER:
    case SMFIR_CHGHEADER:
        if (!milter_valid_header_name(r->name)) {
            bad = "bad header name";
            break;
        }
        tmp.name = xstrndup(r->name.p, r->name.len);
        tmp.index = r->index;
        if (r->cmd == SMFIR_CHGHEADER) {
            if (tmp.index == 0)
                tmp.index = 1; /* Sendmail compatibility (Postfix milter8) */
            if (r->value.len == 0) {
                tmp.kind = MILTER_MOD_DELETE_HEADER;
                tmp.value = xstrdup("");
                break;
            }
            tmp.kind = MILTER_MOD_CHANGE_HEADER;
        } else {
            tmp.kind = r->cmd == SMFIR_ADDHEADER ? MILTER_MOD_ADD_HEADER : MILTER_MOD_INSERT_HEADER;
        }
        tmp.value =
            milter_header_value(r->value, (f->pflags & SMFIP_HDR_LEADSPC) != 0, &tmp.value_len);
        if (tmp.value == NULL)
            bad = "bare CR in header value";
        break;
    case SMFIR_CHGFROM:
    case SMFIR_ADDRCPT:
    case SMFIR_ADDRCPT_PAR:
    case SMFIR_DELRCPT:
        tmp.kind = r->cmd == SMFIR_CHGFROM   ? MILTER_MOD_CHANGE_FROM
                   : r->cmd == SMFIR_DELRCPT ? MILTER_MOD_DELETE_RCPT
                                             : MILTER_MOD_ADD_RCPT;
        tmp.value = milter_address(r->name);
        if (tmp.value == NULL) {
            bad = "control character in address";
            break;
        }
        tmp.value_len = strlen(tmp.value);
        if (r->has_value && r->value.len > 0) {
            tmp.args = milter_args(r);
            if (tmp.args == NULL)
                bad = "control character in ESMTP parameters";
        }
        if (tmp.kind != MILTER_MOD_CHANGE_FROM && tmp.value_len == 0)
            bad = "empty recipient";
        break;
    case SMFIR_QUARANTINE:
        tmp.kind = MILTER_MOD_QUARANTINE;
        tmp.value = milter_address(r->name); /* same rules: no control characters */
        if (tmp.value == NULL)
            bad = "control character in quarantine reason";
        else
            tmp.value_len = strlen(tmp.value);
        break;
    default:
        bad = "unexpected modification";
        break;
    }
    if (bad != NULL) {
        free(tmp.name);
        free(tmp.value);
        free(tmp.args);
        milter_fail(f, "%s", bad);
        return false;
    }
    struct milter_mod *m = milter_mod_push(ms, f, tmp.kind);
    m->index = tmp.index;
    m->name = tmp.name;
    m->value = tmp.value;
    m->value_len = tmp.value_len;
    m->args = tmp.args;
    ms->mods_bytes +=
        m->value_len + (m->name ? strlen(m->name) : 0) + (m->args ? strlen(m->args) : 0);
    return true;
}

/* f's reply settled this stage for f without objection: go on with f (more
 * of the message) or with the next filter. */
static void
milter_step_done(struct milter_session *ms, struct milter_filter *f)
{
    if (ms->stage == STAGE_EOM && !f->msg_accepted && ms->phase != EOM_FINAL) {
        milter_eom_step(ms, f);
        return;
    }
    if (ms->stage == STAGE_EOM && ms->phase == EOM_FINAL) {
        f->in_msg = false;
        milter_eom_done(ms, f);
    }
    ms->cur++;
    milter_advance(ms);
}

/* f objected with v: the stage ends with it (sticky for the session at
 * connect and helo, where f is closed). */
static void
milter_objection(struct milter_session *ms, struct milter_filter *f, struct verdict *v,
                 bool session)
{
    bool conn_stage = ms->stage == STAGE_CONNECT || ms->stage == STAGE_HELO;
    if (conn_stage || session) {
        verdict_copy(&f->sticky, v);
        milter_close(f, true);
    } else if (ms->stage != STAGE_RCPT || v->kind == VERDICT_DISCARD) {
        f->msg_accepted = true; /* libmilter ends the message for this filter */
    }
    verdict_move(&ms->result, v);
    ms->result_filter = f->idx;
    milter_stage_finish(ms);
}

static void
milter_on_reply(struct milter_session *ms, struct milter_filter *f, char cmd, struct span payload)
{
    struct milter_reply r;
    const char *why = milter_reply_decode(cmd, payload, &r);
    if (why != NULL) {
        milter_fail(f, "malformed reply '%c': %s", cmd >= 0x20 && cmd < 0x7f ? cmd : '?', why);
        return;
    }
    char ev = f->await;
    bool conn_stage = ms->stage == STAGE_CONNECT || ms->stage == STAGE_HELO;
    struct verdict v = VERDICT_INIT;
    switch (cmd) {
    case SMFIR_PROGRESS:
        milter_arm(f);
        return;
    case SMFIR_CONTINUE:
        f->state = MF_READY;
        milter_step_done(ms, f);
        return;
    case SMFIR_SKIP:
        f->state = MF_READY;
        f->skip = ev;
        milter_step_done(ms, f);
        return;
    case SMFIR_ACCEPT:
        f->state = MF_READY;
        if (conn_stage) {
            milter_close(f, true); /* nothing more for this session */
            f->disabled = true;
        } else if (ev != SMFIC_BODYEOB) {
            f->msg_accepted = true;
            f->in_msg = false;
            ms->cur++;
            milter_advance(ms);
            return;
        }
        milter_step_done(ms, f);
        return;
    case SMFIR_DISCARD:
        f->state = MF_READY;
        if (conn_stage) {
            log_msg(LOG_WARNING, milter_macro_get(ms, "i"),
                    "milter=%s: DISCARD is not allowed at %s, ignored", f->cfg->name,
                    milter_stage_name(ms->stage));
            milter_step_done(ms, f);
            return;
        }
        verdict_set(&v, VERDICT_DISCARD, NULL);
        milter_objection(ms, f, &v, false);
        return;
    case SMFIR_REJECT:
        f->state = MF_READY;
        verdict_set(&v, VERDICT_REJECT, &R_MILTER_REJECT);
        milter_objection(ms, f, &v, false);
        return;
    case SMFIR_TEMPFAIL:
        f->state = MF_READY;
        verdict_set(&v, VERDICT_TEMPFAIL, &R_MILTER_TEMPFAIL);
        milter_objection(ms, f, &v, false);
        return;
    case SMFIR_SHUTDOWN:
        f->state = MF_READY;
        verdict_set(&v, VERDICT_TEMPFAIL, &R_MILTER_SHUTDOWN);
        milter_objection(ms, f, &v, true);
        return;
    case SMFIR_REPLYCODE: {
        if (r.data.len > MILTER_CHUNK_MAX) {
            milter_fail(f, "reply text too long");
            return;
        }
        why = verdict_set_raw(&v, r.data.p, r.data.len);
        if (why != NULL) {
            char vis[200];
            str_vis(vis, sizeof(vis), r.data.p, r.data.len);
            milter_fail(f, "malformed reply code (%s): %s", why, vis);
            return;
        }
        f->state = MF_READY;
        milter_objection(ms, f, &v, false);
        return;
    }
    default:
        break;
    }
    if (ev == SMFIC_BODYEOB) {
        milter_on_mod(ms, f, &r); /* keeps waiting for the final reply */
        return;
    }
    milter_fail(f, "unexpected reply '%c' to '%c'", cmd >= 0x20 && cmd < 0x7f ? cmd : '?', ev);
}

/* The negotiation reply. */
static void
milter_on_optneg(struct milter_session *ms, struct milter_filter *f, char cmd, struct span payload)
{
    if (cmd != SMFIC_OPTNEG) {
        milter_fail(f, "unexpected reply '%c' to option negotiation",
                    cmd >= 0x20 && cmd < 0x7f ? cmd : '?');
        return;
    }
    struct milter_optneg o;
    const char *why = milter_optneg_decode(payload, &o);
    if (why != NULL) {
        milter_fail(f, "malformed option negotiation: %s", why);
        return;
    }
    if (o.version < 2 || o.version > MILTER_VERSION) {
        milter_fail(f, "protocol version %u, petrel speaks 2 to %d", (unsigned)o.version,
                    MILTER_VERSION);
        return;
    }
    if (o.actions & ~(uint32_t)MILTER_ACTIONS) {
        milter_fail(f, "actions 0x%x beyond those offered (0x%x)", (unsigned)o.actions,
                    (unsigned)MILTER_ACTIONS);
        return;
    }
    f->version = o.version;
    f->actions = o.actions;
    f->pflags = o.pflags & (uint32_t)MILTER_PROTOCOL;
    for (int i = 0; i < MILTER_NSTAGES; i++) {
        if (o.has_list[i])
            f->lists[i] = xstrndup(o.lists[i].p, o.lists[i].len);
    }
    f->state = MF_READY;
    milter_arm(f);
    if (ms->stage != STAGE_NONE && !ms->stage_done && ms->cur == f->idx)
        milter_advance(ms);
}

/* Handles every complete packet in f's input. */
static void
milter_read(struct milter_session *ms, struct milter_filter *f)
{
    while (f->state != MF_CLOSED && !ms->freed) {
        struct buf *in = conn_input(f->conn);
        char cmd;
        struct span payload;
        size_t used;
        enum milter_frame fr = milter_frame_parse((struct span){buf_ptr(in), in->len},
                                                  MILTER_PACKET_MAX, &cmd, &payload, &used);
        if (fr == MILTER_FRAME_PARTIAL)
            return;
        if (fr == MILTER_FRAME_EMPTY) {
            milter_fail(f, "packet of length 0");
            return;
        }
        if (fr == MILTER_FRAME_TOOBIG) {
            milter_fail(f, "packet of %u bytes exceeds the limit of %d",
                        (unsigned)milter_get32(buf_ptr(in)), MILTER_PACKET_MAX);
            return;
        }
        milter_trace(f, "<<<", cmd, payload.len);
        /* The handlers copy what they keep; only conn's read callback adds
         * input, so payload stays valid until the consume below. */
        struct conn *c = f->conn;
        switch (f->state) {
        case MF_NEGOTIATING:
            milter_on_optneg(ms, f, cmd, payload);
            break;
        case MF_WAIT:
            milter_on_reply(ms, f, cmd, payload);
            break;
        default:
            milter_fail(f, "unexpected packet '%c' while no reply is due",
                        cmd >= 0x20 && cmd < 0x7f ? cmd : '?');
            break;
        }
        buf_consume(conn_input(c), used);
    }
}

static void
milter_on_conn(struct conn *c, enum conn_event ev, int status, void *arg)
{
    struct milter_filter *f = arg;
    struct milter_session *ms = f->ms;
    if (c != f->conn)
        PANIC("milter: event %d from a conn that is not ours", (int)ev);
    ms->busy++;
    if (ev == CONN_EV_CLOSED) {
        f->conn = NULL;
        ms->open_conns--;
        if (f->state != MF_CLOSED && !ms->freed) /* closed without our asking */
            milter_fail(f, "connection closed");
        f->state = MF_CLOSED;
    } else if (f->state != MF_CLOSED && !ms->freed) {
        switch (ev) {
        case CONN_EV_CONNECTED: {
            if (f->state != MF_CONNECTING)
                break;
            if (status < 0) {
                milter_fail(f, "connect to %s: %s", f->cfg->socket, conn_strerror(status));
                break;
            }
            milter_start_next(ms);
            conn_set_input_limit(c, MILTER_PACKET_MAX + 5);
            struct buf o;
            buf_init(&o);
            milter_put32(&o, MILTER_VERSION);
            milter_put32(&o, (uint32_t)MILTER_ACTIONS);
            milter_put32(&o, (uint32_t)MILTER_PROTOCOL);
            milter_send(f, SMFIC_OPTNEG, buf_ptr(&o), o.len);
            buf_reset(&o);
            f->state = MF_NEGOTIATING;
            conn_flush(c);
            milter_arm(f);
            break;
        }
        case CONN_EV_DATA:
            milter_read(ms, f);
            break;
        case CONN_EV_EOF:
            milter_fail(f, "connection closed by the filter");
            break;
        case CONN_EV_ERROR:
            milter_fail(f, "%s", conn_strerror(status));
            break;
        case CONN_EV_TIMEOUT:
            if (f->state == MF_CONNECTING)
                milter_fail(f, "connect to %s: timed out", f->cfg->socket);
            else if (f->state == MF_NEGOTIATING)
                milter_fail(f, "timeout during option negotiation");
            else if (f->state == MF_WRITING)
                milter_fail(f, "timeout sending the message");
            else if (f->state == MF_WAIT)
                milter_fail(f, "timeout waiting for the reply to '%c'", f->await);
            break;
        case CONN_EV_DRAINED:
            if (f->state == MF_WRITING) {
                f->state = MF_READY;
                milter_eom_step(ms, f);
            }
            break;
        case CONN_EV_CLOSED:
            break;
        }
    }
    ms->busy--;
    milter_maybe_destroy(ms);
}

/* ---- session ------------------------------------------------------------- */

/* Parses the socket spec and starts the connect. */
static void
milter_filter_start(struct milter_session *ms, struct milter_filter *f)
{
    const char *s = f->cfg->socket;
    int rc;
    if (strncmp(s, "unix:", 5) == 0) {
        rc = conn_connect_unix(ms->loop, s + 5, milter_on_conn, f, &f->conn);
    } else {
        bool v6 = strncmp(s, "inet6:", 6) == 0;
        const char *spec = v6 ? s + 6 : strncmp(s, "inet:", 5) == 0 ? s + 5 : NULL;
        const char *at = spec != NULL ? strchr(spec, '@') : NULL;
        char port_s[8];
        struct sockaddr_storage ss;
        memset(&ss, 0, sizeof(ss));
        unsigned long port = 0;
        bool ok = at != NULL && (size_t)(at - spec) > 0 && (size_t)(at - spec) < sizeof(port_s);
        if (ok) {
            memcpy(port_s, spec, (size_t)(at - spec));
            port_s[at - spec] = '\0';
            char *end;
            port = strtoul(port_s, &end, 10);
            ok = *end == '\0' && port > 0 && port <= 65535;
        }
        const char *host = ok ? at + 1 : "";
        if (ok && strcmp(host, "localhost") == 0)
            host = v6 ? "::1" : "127.0.0.1";
        if (ok && !v6) {
            struct sockaddr_in *sin = (struct sockaddr_in *)&ss;
            sin->sin_family = AF_INET;
            sin->sin_port = htons((uint16_t)port);
            ok = inet_pton(AF_INET, host, &sin->sin_addr) == 1;
        } else if (ok) {
            struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)&ss;
            sin6->sin6_family = AF_INET6;
            sin6->sin6_port = htons((uint16_t)port);
            ok = inet_pton(AF_INET6, host, &sin6->sin6_addr) == 1;
        }
        if (!ok) {
            f->state = MF_CLOSED;
            milter_fail(f,
                        "socket %s: expected unix:/path or inet[6]:port@ip (host names are "
                        "not resolved)",
                        s);
            return;
        }
        rc = conn_connect_tcp(ms->loop, (const struct sockaddr *)&ss, NULL, milter_on_conn, f,
                              &f->conn);
    }
    if (rc < 0) {
        f->conn = NULL;
        f->state = MF_CLOSED;
        milter_fail(f, "connect to %s: %s", s, conn_strerror(rc));
        return;
    }
    ms->open_conns++;
    f->state = MF_CONNECTING;
    milter_arm(f);
}

/* Connects the next filter. One connect at a time, in order: filter k+1
 * starts when k's connect finished (either way), so a stage waiting on the
 * first filter rarely waits for the others. */
static void
milter_start_next(struct milter_session *ms)
{
    if (ms->freed || ms->next_start >= ms->nf)
        return;
    struct milter_filter *f = &ms->f[ms->next_start++];
    milter_filter_start(ms, f);
}

struct milter_session *
milter_session_new(struct uv_loop_s *loop, const struct petrel_config *cfg,
                   const struct listener_config *lc, const struct milter_conn_info *ci)
{
    /* config order (milters[]), restricted to the listener's list when it has one */
    const struct milter_config **pick = xcalloc(cfg->nmilters + 1, sizeof(*pick));
    size_t n = 0;
    for (size_t i = 0; i < cfg->nmilters; i++) {
        bool use = lc == NULL || !lc->milters_set;
        for (size_t k = 0; !use && k < lc->milters.n; k++)
            use =
                cfg->milters[i].name != NULL && strcmp(lc->milters.v[k], cfg->milters[i].name) == 0;
        if (use)
            pick[n++] = &cfg->milters[i];
    }
    if (n == 0) {
        free(pick);
        return NULL;
    }
    struct milter_session *ms = xcalloc(1, sizeof(*ms));
    ms->loop = loop;
    ms->cfg = cfg;
    ms->lc = lc;
    ms->nf = n;
    ms->f = xcalloc(n, sizeof(*ms->f));
    verdict_init(&ms->result);
    buf_init(&ms->payload);
    buf_init(&ms->pkt);
    buf_init(&ms->cbuf[0]);
    buf_init(&ms->cbuf[1]);
    buf_init(&ms->replbody);
    ms->session_id = milter_strdup_or_null(ci->session_id);
    ms->client_addr = milter_strdup_or_null(ci->client_addr);
    ms->client_name =
        ci->client_name != NULL && ci->client_name[0] != '\0' ? xstrdup(ci->client_name) : NULL;
    ms->family = ci->family;
    ms->client_port = ci->client_port;
    ms->timer = timer_new(loop, milter_on_timer, ms);

    const char *host = ci->hostname != NULL ? ci->hostname : cfg->hostname;
    char tmp[700];
    if (host != NULL) {
        milter_set_macro(ms, "j", host);
        milter_set_macro(ms, "if_name", ci->if_name != NULL ? ci->if_name : host);
    }
    milter_set_macro(ms, "v", "petrel " PETREL_VERSION);
    const char *dname = ci->daemon_name != NULL ? ci->daemon_name : lc != NULL ? lc->name : NULL;
    if (dname != NULL)
        milter_set_macro(ms, "daemon_name", dname);
    if (ci->local_addr != NULL) {
        milter_set_macro(ms, "daemon_addr", ci->local_addr);
        milter_set_macro(ms, "if_addr", ci->local_addr);
    }
    if (ci->local_port > 0) {
        snprintf(tmp, sizeof(tmp), "%d", ci->local_port);
        milter_set_macro(ms, "daemon_port", tmp);
    }
    const char *addr = ci->client_addr != NULL ? ci->client_addr : "";
    if (ci->client_addr != NULL)
        milter_set_macro(ms, "client_addr", ci->client_addr);
    if (ci->client_port > 0 && ci->family != AF_UNIX) {
        snprintf(tmp, sizeof(tmp), "%d", ci->client_port);
        milter_set_macro(ms, "client_port", tmp);
    }
    /* Sendmail: {client_name} is the verified name or "[addr]" */
    if (ms->client_name != NULL)
        milter_set_macro(ms, "client_name", ms->client_name);
    else if (addr[0] != '\0' && snprintf(tmp, sizeof(tmp), "[%s]", addr) < (int)sizeof(tmp))
        milter_set_macro(ms, "client_name", tmp);
    if (snprintf(tmp, sizeof(tmp), "%s [%s]", ms->client_name ? ms->client_name : "unknown",
                 addr[0] ? addr : "unknown") < (int)sizeof(tmp))
        milter_set_macro(ms, "_", tmp);

    for (size_t i = 0; i < n; i++) {
        struct milter_filter *f = &ms->f[i];
        f->ms = ms;
        f->cfg = pick[i];
        f->idx = i;
        verdict_init(&f->sticky);
        f->state = MF_CONNECTING;
    }
    free(pick);
    milter_start_next(ms);
    return ms;
}

void
milter_session_free(struct milter_session *ms)
{
    if (ms == NULL || ms->freed)
        return;
    ms->freed = true;
    ms->stage = STAGE_NONE;
    ms->stage_done = false;
    timer_free(ms->timer);
    ms->timer = NULL;
    for (size_t i = 0; i < ms->nf; i++)
        milter_close(&ms->f[i], true);
    for (size_t i = 0; i < ms->nf; i++) {
        if (ms->f[i].conn != NULL)
            conn_flush(ms->f[i].conn);
    }
    milter_maybe_destroy(ms);
}

bool
milter_pending(const struct milter_session *ms)
{
    return ms->stage != STAGE_NONE;
}

/* ---- stage calls --------------------------------------------------------- */

void
milter_connect(struct milter_session *ms, milter_verdict_cb *cb, void *arg)
{
    struct buf *b = &ms->payload;
    buf_clear(b);
    const char *addr = ms->client_addr != NULL ? ms->client_addr : "";
    char name[600];
    if (ms->client_name != NULL) {
        if (!str_copy(name, sizeof(name), ms->client_name))
            name[0] = '\0';
    } else if (ms->family == AF_UNIX) {
        memcpy(name, "localhost", sizeof("localhost"));
    } else if (snprintf(name, sizeof(name), "[%s]", addr[0] ? addr : "unknown") >=
               (int)sizeof(name)) {
        name[0] = '\0';
    }
    milter_put_str(b, name);
    char fam = ms->family == AF_INET    ? SMFIA_INET
               : ms->family == AF_INET6 ? SMFIA_INET6
               : ms->family == AF_UNIX  ? SMFIA_UNIX
                                        : SMFIA_UNKNOWN;
    buf_append(b, &fam, 1);
    if (fam != SMFIA_UNKNOWN) {
        uint16_t port = htons(fam == SMFIA_UNIX ? 0 : (uint16_t)ms->client_port);
        buf_append(b, &port, 2);
        milter_put_str(b, addr);
    }
    ms->connect_done = true;
    milter_stage_start(ms, STAGE_CONNECT, cb, NULL, arg);
}

void
milter_helo(struct milter_session *ms, const char *helo, milter_verdict_cb *cb, void *arg)
{
    if (ms->stage == STAGE_NONE)
        milter_end_transaction(ms);
    free(ms->helo);
    ms->helo = xstrdup(helo);
    buf_clear(&ms->payload);
    milter_put_str(&ms->payload, helo);
    milter_stage_start(ms, STAGE_HELO, cb, NULL, arg);
}

/* "<addr>" NUL, then each space-separated parameter NUL. */
static void
milter_envelope_payload(struct buf *b, const char *addr, const char *params)
{
    buf_clear(b);
    buf_append(b, "<", 1);
    buf_append(b, addr, strnlen(addr, MILTER_OUT_MAX / 2));
    buf_append(b, ">", 1);
    buf_append(b, "", 1);
    const char *p = params != NULL ? params : "";
    while (*p) {
        while (*p == ' ')
            p++;
        size_t len = 0;
        while (p[len] && p[len] != ' ')
            len++;
        if (len == 0)
            break;
        if (b->len + len + 1 > MILTER_OUT_MAX)
            break;
        buf_append(b, p, len);
        buf_append(b, "", 1);
        p += len;
    }
}

void
milter_mail(struct milter_session *ms, const char *sender, const char *params,
            milter_verdict_cb *cb, void *arg)
{
    if (ms->stage == STAGE_NONE)
        milter_end_transaction(ms);
    free(ms->sender);
    ms->sender = xstrdup(sender);
    free(ms->rcpt);
    ms->rcpt = NULL;
    milter_set_macro(ms, "mail_addr", sender);
    milter_set_macro(ms, "mail_host", milter_addr_host(sender));
    milter_set_macro(ms, "mail_mailer", "smtp");
    milter_envelope_payload(&ms->payload, sender, params);
    milter_stage_start(ms, STAGE_MAIL, cb, NULL, arg);
}

void
milter_rcpt(struct milter_session *ms, const char *rcpt, const char *params, milter_verdict_cb *cb,
            void *arg)
{
    free(ms->rcpt);
    ms->rcpt = xstrdup(rcpt);
    milter_set_macro(ms, "rcpt_addr", rcpt);
    milter_set_macro(ms, "rcpt_host", milter_addr_host(rcpt));
    milter_set_macro(ms, "rcpt_mailer", "smtp");
    milter_envelope_payload(&ms->payload, rcpt, params);
    milter_stage_start(ms, STAGE_RCPT, cb, NULL, arg);
}

void
milter_data(struct milter_session *ms, milter_verdict_cb *cb, void *arg)
{
    buf_clear(&ms->payload);
    milter_stage_start(ms, STAGE_DATA, cb, NULL, arg);
}

void
milter_eom(struct milter_session *ms, struct span content, const char *qid, milter_eom_cb *cb,
           void *arg)
{
    if (cb == NULL)
        PANIC("milter_eom: no callback");
    if (qid != NULL)
        milter_set_macro(ms, "i", qid);
    if (ms->stage == STAGE_NONE) {
        milter_mods_reset(&ms->mods);
        ms->mods_bytes = 0;
    }
    ms->content = content;
    ms->content_applied = 0;
    ms->cbuf_cur = 0;
    milter_layout_parse(content, &ms->layout);
    milter_stage_start(ms, STAGE_EOM, NULL, cb, arg);
}

void
milter_abort(struct milter_session *ms)
{
    if (ms->stage != STAGE_NONE)
        PANIC("milter_abort while %s is pending", milter_stage_name(ms->stage));
    milter_end_transaction(ms);
}

/* ---- message layout and modifications (pure) ----------------------------- */

/* Splits c into header fields and body: fields are "name: value" lines with
 * their continuation lines (starting with SP/HTAB); an empty line ends
 * them (has_sep), as does a line that is not a field (the body starts
 * there). */
static void
milter_layout_parse(struct span c, struct msg_layout *l)
{
    l->n = 0;
    l->has_sep = false;
    size_t pos = 0;
    while (pos < c.len) {
        const char *nl = memchr(c.p + pos, '\n', c.len - pos);
        size_t next = nl != NULL ? (size_t)(nl - c.p) + 1 : c.len;
        size_t text = next - pos;
        if (nl != NULL) {
            text--;
            if (text > 0 && c.p[pos + text - 1] == '\r')
                text--;
        }
        if (nl != NULL && text == 0) {
            l->has_sep = true;
            l->sep_off = pos;
            l->body_off = next;
            return;
        }
        if ((c.p[pos] == ' ' || c.p[pos] == '\t') && l->n > 0) {
            l->v[l->n - 1].len = next - l->v[l->n - 1].off;
            pos = next;
            continue;
        }
        size_t nlen = 0;
        while (nlen < text) {
            unsigned char ch = (unsigned char)c.p[pos + nlen];
            if (ch < 33 || ch > 126 || ch == ':')
                break;
            nlen++;
        }
        size_t colon = nlen;
        while (colon < text && (c.p[pos + colon] == ' ' || c.p[pos + colon] == '\t'))
            colon++;
        if (nlen == 0 || colon >= text || c.p[pos + colon] != ':')
            break; /* not a header field: the body starts here */
        if (l->n == l->cap) {
            l->cap = l->cap ? l->cap * 2 : 32;
            l->v = xreallocarray(l->v, l->cap, sizeof(*l->v));
        }
        l->v[l->n++] = (struct msg_hdr){pos, nlen, colon, next - pos};
        pos = next;
    }
    l->body_off = pos;
}

struct apply_ent {
    const char *p; /* borrowed: the field's bytes (content or a mod) */
    size_t len;
    const char *name;
    size_t name_len;
    bool new_field; /* p/len is the value of a mod: write "name:" value CRLF */
};

static bool
milter_name_eq(const struct apply_ent *e, const char *name)
{
    size_t n = strlen(name);
    return e->name_len == n && ascii_ncasecmp(e->name, name, n) == 0;
}

/* The index-th (1-based) field named name, or n if none. */
static size_t
milter_find_field(const struct apply_ent *v, size_t n, const char *name, uint32_t index)
{
    uint32_t seen = 0;
    for (size_t i = 0; i < n; i++) {
        if (milter_name_eq(&v[i], name) && ++seen == index)
            return i;
    }
    return n;
}

void
milter_apply_mods(const struct milter_mods *m, struct span content, struct buf *out)
{
    struct msg_layout l = {0};
    milter_layout_parse(content, &l);
    size_t n = l.n;
    size_t cap = l.n + 8;
    struct apply_ent *v = xreallocarray(NULL, cap, sizeof(*v));
    for (size_t i = 0; i < l.n; i++) {
        v[i] = (struct apply_ent){content.p + l.v[i].off, l.v[i].len, content.p + l.v[i].off,
                                  l.v[i].name_len, false};
    }
    const struct milter_mod *body = NULL;
    for (size_t k = 0; k < m->n; k++) {
        const struct milter_mod *mod = &m->v[k];
        if (mod->kind == MILTER_MOD_REPLACE_BODY) {
            body = mod;
            continue;
        }
        if (mod->kind > MILTER_MOD_REPLACE_BODY)
            continue;
        struct apply_ent e = {mod->value, mod->value_len, mod->name, strlen(mod->name), true};
        size_t at;
        switch (mod->kind) {
        case MILTER_MOD_ADD_HEADER:
            at = n;
            break;
        case MILTER_MOD_INSERT_HEADER:
            at = mod->index < n ? mod->index : n;
            break;
        case MILTER_MOD_CHANGE_HEADER:
            at = milter_find_field(v, n, mod->name, mod->index);
            if (at < n) {
                v[at] = e;
                continue;
            }
            break; /* no such occurrence: added (libmilter smfi_chgheader) */
        case MILTER_MOD_DELETE_HEADER:
            at = milter_find_field(v, n, mod->name, mod->index);
            if (at < n) {
                memmove(v + at, v + at + 1, (n - at - 1) * sizeof(*v));
                n--;
            }
            continue;
        default:
            continue;
        }
        if (n == cap) {
            cap *= 2;
            v = xreallocarray(v, cap, sizeof(*v));
        }
        memmove(v + at + 1, v + at, (n - at) * sizeof(*v));
        v[at] = e;
        n++;
    }
    for (size_t i = 0; i < n; i++) {
        if (v[i].new_field) {
            buf_append(out, v[i].name, v[i].name_len);
            buf_append(out, ":", 1);
            buf_append(out, v[i].p, v[i].len);
            buf_append(out, "\r\n", 2);
        } else {
            buf_append(out, v[i].p, v[i].len);
            /* a last field without its line end gets one if more follows */
            if ((v[i].len == 0 || v[i].p[v[i].len - 1] != '\n') &&
                (i + 1 < n || l.has_sep || body != NULL || l.body_off < content.len))
                buf_append(out, "\r\n", 2);
        }
    }
    /* the empty line as it was (CRLF, or a bare LF in odd input) */
    if (l.has_sep)
        buf_append(out, content.p + l.sep_off, l.body_off - l.sep_off);
    if (body != NULL) {
        if (!l.has_sep && body->value_len > 0)
            buf_append(out, "\r\n", 2);
        buf_append(out, body->value, body->value_len);
    } else {
        if (content.len > l.body_off)
            buf_append(out, content.p + l.body_off, content.len - l.body_off);
    }
    free(v);
    free(l.v);
}

void
milter_mods_reset(struct milter_mods *m)
{
    for (size_t i = 0; i < m->n; i++) {
        free(m->v[i].name);
        free(m->v[i].value);
        free(m->v[i].args);
    }
    free(m->v);
    memset(m, 0, sizeof(*m));
}

/* ---- wire codec ---------------------------------------------------------- */

enum milter_frame
milter_frame_parse(struct span in, size_t max, char *cmd, struct span *payload, size_t *consumed)
{
    if (in.len < 4)
        return MILTER_FRAME_PARTIAL;
    uint32_t len = milter_get32(in.p);
    if (len == 0)
        return MILTER_FRAME_EMPTY;
    if (len > max)
        return MILTER_FRAME_TOOBIG;
    if (in.len - 4 < len)
        return MILTER_FRAME_PARTIAL;
    *cmd = in.p[4];
    payload->p = in.p + 5;
    payload->len = len - 1;
    *consumed = 4 + (size_t)len;
    return MILTER_FRAME_OK;
}

/* Takes one NUL-terminated string off the front of *rest. */
static bool
milter_take_str(struct span *rest, struct span *out)
{
    const char *nul = rest->len > 0 ? memchr(rest->p, '\0', rest->len) : NULL;
    if (nul == NULL)
        return false;
    out->p = rest->p;
    out->len = (size_t)(nul - rest->p);
    rest->p = nul + 1;
    rest->len -= out->len + 1;
    return true;
}

static bool
milter_take32(struct span *rest, uint32_t *out)
{
    if (rest->len < 4)
        return false;
    *out = milter_get32(rest->p);
    rest->p += 4;
    rest->len -= 4;
    return true;
}

const char *
milter_reply_decode(char cmd, struct span payload, struct milter_reply *out)
{
    memset(out, 0, sizeof(*out));
    out->cmd = cmd;
    struct span rest = payload;
    switch (cmd) {
    case SMFIR_CONTINUE:
    case SMFIR_ACCEPT:
    case SMFIR_REJECT:
    case SMFIR_TEMPFAIL:
    case SMFIR_DISCARD:
    case SMFIR_PROGRESS:
    case SMFIR_SKIP:
    case SMFIR_SHUTDOWN:
        return payload.len == 0 ? NULL : "unexpected data after reply";
    case SMFIR_REPLYCODE:
    case SMFIR_REPLBODY:
        out->data = payload;
        return NULL;
    case SMFIR_QUARANTINE:
    case SMFIR_ADDRCPT:
    case SMFIR_DELRCPT:
        if (!milter_take_str(&rest, &out->name))
            return "missing string terminator";
        break;
    case SMFIR_ADDHEADER:
        if (!milter_take_str(&rest, &out->name) || !milter_take_str(&rest, &out->value))
            return "missing string terminator";
        out->has_value = true;
        break;
    case SMFIR_INSHEADER:
    case SMFIR_CHGHEADER:
        if (!milter_take32(&rest, &out->index))
            return "packet too short for the header index";
        if (!milter_take_str(&rest, &out->name) || !milter_take_str(&rest, &out->value))
            return "missing string terminator";
        out->has_value = true;
        break;
    case SMFIR_CHGFROM:
    case SMFIR_ADDRCPT_PAR:
        if (!milter_take_str(&rest, &out->name))
            return "missing string terminator";
        if (rest.len > 0) {
            if (!milter_take_str(&rest, &out->value))
                return "missing string terminator";
            out->has_value = true;
        }
        break;
    default:
        return "unknown reply";
    }
    return rest.len == 0 ? NULL : "unexpected data after reply";
}

const char *
milter_optneg_decode(struct span payload, struct milter_optneg *out)
{
    memset(out, 0, sizeof(*out));
    struct span rest = payload;
    if (!milter_take32(&rest, &out->version) || !milter_take32(&rest, &out->actions) ||
        !milter_take32(&rest, &out->pflags))
        return "packet too short";
    while (rest.len > 0) {
        uint32_t stage;
        struct span list;
        if (!milter_take32(&rest, &stage))
            return "truncated macro list";
        if (!milter_take_str(&rest, &list))
            return "macro list without terminator";
        if (stage < MILTER_NSTAGES) {
            out->lists[stage] = list;
            out->has_list[stage] = true;
        }
        /* unknown stages are ignored, as Postfix does */
    }
    return NULL;
}
