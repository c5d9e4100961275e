/*
 * smtp_client — the delivery side of SMTP/LMTP as a state machine over
 * conn.h (OpenSMTPD mta_session.c, Postfix smtp_proto.c).
 *
 * smtpc_enter(c, state) sends a state's command and arms its deadline;
 * smtpc_on_reply(c, reply) switches on the state. `state` is the receive
 * side: whose reply is awaited. With PIPELINING (RFC 2920) MAIL, every RCPT
 * and DATA leave in one write, so a separate send cursor (tx_step) tells
 * smtpc_enter that a command is already on the wire; replies are then
 * matched in order (rx_rcpt). Without it, each reply sends the next
 * command.
 *
 * Targets are tried one after the other: a failed target's conn is closed
 * and the next one is connected from that conn's CONN_EV_CLOSED, so at most
 * one conn exists and the session is freed after the last conn's CLOSED.
 * Every event therefore comes from a conn callback (or conn_defer's
 * zero-delay deadline for a transaction refused before MAIL), never from
 * inside smtpc_start/smtpc_send.
 *
 * The content is written in SMTPC_CHUNK pieces, dot-stuffed on the fly
 * (conn_write copies each piece once), the next piece when the output has
 * drained (CONN_EV_DRAINED), so a 50 MB message costs one chunk of memory.
 *
 * STARTTLS (RFC 3207) sits between EHLO and READY: when the policy asks for
 * TLS and the server offers it, STARTTLS → 220 → conn_start_tls() (SNI and
 * verification name: the target's host) → EHLO again over TLS. Bytes the
 * server sent after its 220 are discarded. Not offered: plaintext, unless
 * the policy is `required` (then the target fails with 4.7.4 and the next
 * one is tried). A failed handshake fails the target (4.7.5); there is no
 * plaintext retry on that connection. Verification is reported, never
 * enforced (opportunistic and required both accept any certificate),
 * except under DANE.
 *
 * DANE (RFC 7672): smtpc_connect starts the TLSA lookup (dane.h) for the
 * target's host next to the connect, unless the previous target had the
 * same host and family; smtpc_greeted waits for it in ST_DANE if needed,
 * then the verdict decides whether STARTTLS is mandatory and which
 * context the handshake uses (tls_client_dane: OpenSSL's DANE checks);
 * smtpc_on_tls fails the target when a DANE handshake did not verify.
 *
 * MTA-STS (RFC 8461): smtpc_start starts the policy lookup (mta_sts.h) of
 * opts.mta_sts_domain once per session; smtpc_greeted waits for it in
 * ST_STS if needed. Under an enforced policy (and no DANE-secured target:
 * DANE takes precedence, RFC 8461 2) an MX host the policy does not list
 * fails, STARTTLS is mandatory and smtpc_on_tls fails a target whose
 * certificate did not verify for its name; in testing mode those failures
 * are only logged (mta_sts=testing (would fail: ...)).
 *
 * Owns: its conn, the copy of the targets, the per-recipient results. The
 * message is borrowed from smtpc_send until DONE. Knows nothing of spool,
 * DNS or scheduling.
 */
#include "smtp_client.h"

#include <arpa/inet.h>
#include <errno.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/un.h>

#include "buf.h"
#include "conn.h"
#include "dane.h"
#include "log.h"
#include "mta_sts.h"
#include "reply.h"
#include "smtp_parse.h"
#include "tls.h"
#include "util.h"

#define SMTPC_LINE_MAX 4096   /* one reply line, CRLF included (RFC 5321 says 512) */
#define SMTPC_REPLY_MAX 65536 /* one multi-line reply */
#define SMTPC_CHUNK 65536     /* content bytes per write while sending DATA */

#define SMTPC_DEF_CONNECT_MS (30 * 1000)
#define SMTPC_DEF_GREETING_MS (5 * 60 * 1000)   /* RFC 5321 4.5.3.2.1 */
#define SMTPC_DEF_COMMAND_MS (5 * 60 * 1000)    /* 4.5.3.2.2, 4.5.3.2.3 */
#define SMTPC_DEF_DATA_INIT_MS (2 * 60 * 1000)  /* 4.5.3.2.4 */
#define SMTPC_DEF_DATA_BLOCK_MS (3 * 60 * 1000) /* 4.5.3.2.5 */
#define SMTPC_DEF_DATA_END_MS (10 * 60 * 1000)  /* 4.5.3.2.6 */

enum smtpc_state {
    ST_CONNECTING, /* waiting for CONN_EV_CONNECTED */
    ST_GREETING,   /* waiting for the 220 banner */
    ST_EHLO,       /* EHLO (LHLO) sent */
    ST_HELO,       /* HELO sent after a 5xx to EHLO */
    ST_STARTTLS,   /* STARTTLS sent */
    ST_TLS,        /* TLS handshake (conn_start_tls); EHLO follows */
    ST_DANE,       /* greeted; waiting for the target's DANE lookup */
    ST_STS,        /* greeted; waiting for the session's MTA-STS policy */
    ST_READY,      /* idle between transactions */
    ST_DONE,       /* inside the DONE callback of a clean transaction */
    ST_LOCAL_DONE, /* transaction refused locally (SIZE, SMTPUTF8): DONE via conn_defer */
    ST_MAIL,       /* MAIL reply awaited */
    ST_RCPT,       /* RCPT reply for rcpts[rx_rcpt] awaited */
    ST_DATA,       /* 354 awaited */
    ST_CONTENT,    /* writing the content */
    ST_DOT,        /* final reply (LMTP: one per accepted recipient) awaited */
    ST_RSET,       /* RSET sent after an unclean transaction */
    ST_QUIT,       /* QUIT sent; closing on its reply */
    ST_CLOSING,    /* conn_close called; CONN_EV_CLOSED decides what next */
};

enum smtpc_rcpt_state {
    RS_PENDING,  /* no reply yet */
    RS_ACCEPTED, /* RCPT accepted, final reply outstanding */
    RS_FINAL,    /* reply holds the result */
};

struct smtpc_rcpt {
    struct smtpc_reply reply;
    enum smtpc_rcpt_state st;
};

struct smtpc_ext {
    bool pipelining;
    bool size;           /* SIZE advertised: send SIZE= */
    uint64_t size_limit; /* 0: none given */
    bool eightbitmime;
    bool smtputf8;
    bool dsn;
    bool enhanced; /* ENHANCEDSTATUSCODES (informational) */
    bool starttls; /* STARTTLS (RFC 3207) */
};

struct smtpc {
    struct uv_loop_s *loop;       /* borrowed */
    struct smtpc_target *targets; /* owned copy */
    size_t ntargets;
    size_t cur;                  /* target in use or last tried */
    struct smtpc_options opts;   /* timeouts resolved; helo_name borrowed */
    struct sockaddr_storage src; /* copy of opts->src */
    bool has_src;
    smtpc_event_cb *cb; /* borrowed */
    void *arg;          /* borrowed */
    struct conn *conn;  /* owned; NULL only after the last CLOSED */
    enum smtpc_state state;
    bool next_target;   /* the close is a target failure: try the next one */
    bool plain_retry;   /* the target in use is tried again without STARTTLS
                         * (opts.tls_fallback after a failed handshake) */
    bool plain_pending; /* the close is for that retry: reconnect to the same target */
    bool aborted;       /* smtpc_abort: no further target, no FAILED */
    bool unusable;      /* close after the transaction instead of READY */
    bool esmtp;         /* EHLO/LHLO accepted (not HELO) */
    bool tls_on;        /* the TLS handshake on the conn in use finished: tls_info */
    struct conn_tls_info tls_info;
    unsigned quit_skip; /* replies to swallow before QUIT's (an RSET's) */
    struct smtpc_ext ext;
    char relay[400]; /* "host[ip]:port" */
    char remote_host[256];
    char local_ip[64]; /* our address on the conn in use ("" for unix) */
    /* reply assembly */
    int rx_code;         /* code of the reply being read; 0 between replies */
    struct buf rx_lines; /* owned: its lines' text, each ended by '\n' */
    /* target failures */
    size_t n5xx; /* targets that failed with a 5xx from the server */
    bool has_server_failure;
    struct smtpc_reply server_failure; /* last server reply that failed a target */
    struct smtpc_reply failure;        /* last target failure; the FAILED reply */
    /* transaction */
    const struct smtpc_msg *msg; /* &msg_copy during a transaction, else NULL */
    struct smtpc_msg msg_copy;   /* what it points to is borrowed until DONE */
    struct smtpc_rcpt *rcpts;    /* owned; nrcpts used, results valid after DONE */
    size_t nrcpts;
    size_t rcpts_cap;
    size_t tx_step; /* send cursor: 0 MAIL, 1..n RCPT, n+1 DATA, n+2 done */
    size_t rx_rcpt; /* receive cursor over rcpts (RCPT, LMTP final) */
    size_t naccepted;
    bool mail_ok;
    bool discard_final; /* '.' sent after 354 with nobody accepted */
    bool need_rset;
    size_t content_off; /* next content byte to write */
    bool at_bol;        /* the last content byte written was '\n' */
    unsigned transactions;
    struct buf cmd; /* owned: scratch for one command line */
    /* DANE (opts.tls == DELIVERY_TLS_DANE) */
    struct dane_resolvers dane_rs;
    char dane_domain[256];      /* opts.dane_domain, "" for none */
    struct dane_lookup *dane_q; /* owned while in flight */
    char dane_host[256];        /* the host (and family) of the lookup or result */
    int dane_family;
    bool dane_done;             /* dane_status and dane_detail hold */
    enum dane_status dane_status;
    char dane_detail[192];
    struct tls_ctx *dane_tls;   /* owned reference: DANE_SECURE's context, or NULL */
    char dane_tls_err[160];     /* why dane_tls could not be made */
    /* MTA-STS (opts.mta_sts_domain) */
    char sts_domain[256];          /* "" when MTA-STS is off */
    struct mta_sts_lookup *sts_q;  /* owned while in flight */
    bool sts_done;                 /* sts holds */
    struct mta_sts_result sts;
    char sts_would_fail[192];      /* testing mode: what failed on this target */
};

static void smtpc_enter(struct smtpc *c, enum smtpc_state state);
static void smtpc_on_conn(struct conn *cn, enum conn_event ev, int status, void *arg);
static void smtpc_txn_end(struct smtpc *c);

/* ---- replies ------------------------------------------------------------ */

void
smtpc_reply_format(const struct smtpc_reply *r, char *out, size_t size)
{
    int n;
    if (r->esc[0] != '\0')
        n = snprintf(out, size, "%d %s %s", r->code, r->esc, r->text);
    else
        n = snprintf(out, size, "%d %s", r->code, r->text);
    if (n < 0 && size > 0)
        out[0] = '\0'; /* truncation is fine: out is NUL-terminated */
}

static void smtpc_synth_v(struct smtpc_reply *r, int code, const char *esc, enum deliv_scope scope,
                          const char *fmt, va_list ap) __attribute__((format(printf, 5, 0)));

static void
smtpc_synth_v(struct smtpc_reply *r, int code, const char *esc, enum deliv_scope scope,
              const char *fmt, va_list ap)
{
    memset(r, 0, sizeof(*r));
    r->code = code;
    if (!str_copy(r->esc, sizeof(r->esc), esc))
        PANIC("smtpc: enhanced code %s too long", esc);
    if (vsnprintf(r->text, sizeof(r->text), fmt, ap) < 0)
        r->text[0] = '\0'; /* truncation is fine */
    r->local = true;
    r->scope = scope;
}

static void smtpc_synth(struct smtpc_reply *r, int code, const char *esc, enum deliv_scope scope,
                        const char *fmt, ...) __attribute__((format(printf, 5, 6)));

static void
smtpc_synth(struct smtpc_reply *r, int code, const char *esc, enum deliv_scope scope,
            const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    smtpc_synth_v(r, code, esc, scope, fmt, ap);
    va_end(ap);
}

/* Length of an enhanced status code of code's class at the start of s (RFC
 * 3463), copied into esc; 0 if there is none. */
static size_t
smtpc_esc_prefix(int code, const char *s, size_t n, char *esc, size_t esc_size)
{
    size_t len = 0;
    while (len < n && s[len] != ' ')
        len++;
    if (len == 0 || len >= esc_size)
        return 0;
    memcpy(esc, s, len);
    esc[len] = '\0';
    if (code / 100 == 3 || !reply_check(code, esc)) {
        esc[0] = '\0';
        return 0;
    }
    return len;
}

/* Appends n bytes to the reply text, truncating without splitting a UTF-8
 * sequence. */
static void
smtpc_text_append(struct smtpc_reply *r, size_t *len, const char *s, size_t n)
{
    size_t room = sizeof(r->text) - 1 - *len;
    if (n > room) {
        n = room;
        while (n > 0 && ((unsigned char)s[n] & 0xC0) == 0x80)
            n--;
    }
    memcpy(r->text + *len, s, n);
    *len += n;
    r->text[*len] = '\0';
}

/* The reply just read (rx_code, rx_lines) as a struct smtpc_reply: an
 * enhanced code at the start of a line is taken from the first line that
 * has one and cut from every line. */
static void
smtpc_reply_build(const struct smtpc *c, struct smtpc_reply *r)
{
    memset(r, 0, sizeof(*r));
    r->code = c->rx_code;
    size_t tlen = 0;
    const char *p = buf_ptr(&c->rx_lines);
    const char *end = p + c->rx_lines.len;
    bool first = true;
    while (p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        size_t n = (size_t)(nl - p);
        char esc[sizeof(r->esc)];
        size_t e = smtpc_esc_prefix(r->code, p, n, esc, sizeof(esc));
        const char *t = p + e;
        size_t tn = n - e;
        if (e > 0) {
            if (r->esc[0] == '\0')
                memcpy(r->esc, esc, sizeof(esc));
            while (tn > 0 && *t == ' ') {
                t++;
                tn--;
            }
        }
        if (!first)
            smtpc_text_append(r, &tlen, "; ", 2);
        smtpc_text_append(r, &tlen, t, tn);
        first = false;
        p = nl + 1;
    }
}

/* ---- output ------------------------------------------------------------- */

static const char *
smtpc_log_key(const struct smtpc *c)
{
    return c->msg != NULL && c->msg->qid != NULL ? c->msg->qid : NULL;
}

static void
smtpc_trace(const struct smtpc *c, const char *dir, const char *p, size_t n)
{
    if (!log_enabled(LOG_DEBUG))
        return;
    struct log_line ll;
    log_begin(&ll, LOG_DEBUG, smtpc_log_key(c));
    log_event(&ll, dir);
    log_kv(&ll, "relay", "%s", c->relay);
    log_kv_vis(&ll, "data", p, n);
    log_end(&ll);
}

/* Writes the command in c->cmd plus CRLF. */
static void
smtpc_write_cmd_buf(struct smtpc *c)
{
    smtpc_trace(c, ">>>", buf_ptr(&c->cmd), c->cmd.len);
    buf_append(&c->cmd, "\r\n", 2);
    conn_write(c->conn, buf_ptr(&c->cmd), c->cmd.len);
    buf_clear(&c->cmd);
}

static void smtpc_write_cmd(struct smtpc *c, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
smtpc_write_cmd(struct smtpc *c, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    buf_clear(&c->cmd);
    buf_vprintf(&c->cmd, fmt, ap);
    va_end(ap);
    smtpc_write_cmd_buf(c);
}

static void
smtpc_write_mail(struct smtpc *c)
{
    const struct smtpc_msg *m = c->msg;
    buf_clear(&c->cmd);
    buf_printf(&c->cmd, "MAIL FROM:<%s>", m->sender);
    if (c->esmtp) {
        if (c->ext.size)
            buf_printf(&c->cmd, " SIZE=%zu", m->content.len);
        if (c->ext.eightbitmime && m->body == SMTP_BODY_8BITMIME)
            buf_append_str(&c->cmd, " BODY=8BITMIME");
        else if (c->ext.eightbitmime && m->body == SMTP_BODY_7BIT)
            buf_append_str(&c->cmd, " BODY=7BIT");
        if (m->smtputf8 && c->ext.smtputf8)
            buf_append_str(&c->cmd, " SMTPUTF8");
        if (c->ext.dsn && m->ret == SMTP_RET_FULL)
            buf_append_str(&c->cmd, " RET=FULL");
        else if (c->ext.dsn && m->ret == SMTP_RET_HDRS)
            buf_append_str(&c->cmd, " RET=HDRS");
        char x[SMTP_ENVID_MAX * 3 + 1];
        if (c->ext.dsn && m->envid != NULL && m->envid[0] != '\0' &&
            smtp_xtext_encode(m->envid, x, sizeof(x)))
            buf_printf(&c->cmd, " ENVID=%s", x);
    }
    smtpc_write_cmd_buf(c);
}

static void
smtpc_write_rcpt(struct smtpc *c, size_t i)
{
    const struct smtpc_msg *m = c->msg;
    buf_clear(&c->cmd);
    buf_printf(&c->cmd, "RCPT TO:<%s>", m->rcpts[i]);
    if (c->esmtp && c->ext.dsn) {
        unsigned notify = m->notify != NULL ? m->notify[i] : 0;
        if (notify & SMTP_NOTIFY_NEVER) {
            buf_append_str(&c->cmd, " NOTIFY=NEVER");
        } else if (notify != 0) {
            static const struct {
                unsigned bit;
                const char *name;
            } names[] = {
                {SMTP_NOTIFY_SUCCESS, "SUCCESS"},
                {SMTP_NOTIFY_FAILURE, "FAILURE"},
                {SMTP_NOTIFY_DELAY, "DELAY"},
            };
            const char *sep = " NOTIFY=";
            for (size_t k = 0; k < ARRAY_SIZE(names); k++) {
                if (notify & names[k].bit) {
                    buf_printf(&c->cmd, "%s%s", sep, names[k].name);
                    sep = ",";
                }
            }
        }
        const char *orcpt = m->orcpt != NULL ? m->orcpt[i] : NULL;
        const char *semi = orcpt != NULL ? strchr(orcpt, ';') : NULL;
        char x[SMTP_ORCPT_MAX * 3 + 1];
        if (semi != NULL && semi > orcpt && semi - orcpt < 32 &&
            smtp_xtext_encode(semi + 1, x, sizeof(x)))
            buf_printf(&c->cmd, " ORCPT=%.*s;%s", (int)(semi - orcpt), orcpt, x);
    }
    smtpc_write_cmd_buf(c);
}

/* Writes the transaction command at send-cursor position step. */
static void
smtpc_write_step(struct smtpc *c, size_t step)
{
    if (step == 0)
        smtpc_write_mail(c);
    else if (step <= c->nrcpts)
        smtpc_write_rcpt(c, step - 1);
    else
        smtpc_write_cmd(c, "DATA");
    c->tx_step = step + 1;
}

/* ---- content ------------------------------------------------------------ */

/* Writes content[off, end) dot-stuffed: a line starting with '.' gets
 * another one (RFC 5321 4.5.2). A line starts after any LF. */
static void
smtpc_write_stuffed(struct smtpc *c, size_t end)
{
    const char *p = c->msg->content.p;
    size_t off = c->content_off;
    size_t seg = off;
    while (off < end) {
        if (c->at_bol && p[off] == '.') {
            if (off > seg)
                conn_write(c->conn, p + seg, off - seg);
            conn_write(c->conn, ".", 1);
            seg = off;
        }
        const char *nl = memchr(p + off, '\n', end - off);
        if (nl == NULL) {
            off = end;
            c->at_bol = false;
        } else {
            off = (size_t)(nl - p) + 1;
            c->at_bol = true;
        }
    }
    if (end > seg)
        conn_write(c->conn, p + seg, end - seg);
    c->content_off = end;
}

/* Writes chunks while the conn takes them at once; otherwise waits for
 * CONN_EV_DRAINED. The last chunk carries the end of data. */
static void
smtpc_write_content(struct smtpc *c)
{
    const struct span ct = c->msg->content;
    while (c->state == ST_CONTENT) {
        size_t end = ct.len - c->content_off > SMTPC_CHUNK ? c->content_off + SMTPC_CHUNK : ct.len;
        smtpc_write_stuffed(c, end);
        if (c->content_off == ct.len) {
            if (ct.len > 0 && (ct.len < 2 || ct.p[ct.len - 2] != '\r' || ct.p[ct.len - 1] != '\n'))
                conn_write(c->conn, "\r\n", 2);
            conn_write(c->conn, ".\r\n", 3);
            smtpc_trace(c, ">>>", ".", 1);
            smtpc_enter(c, ST_DOT);
            return;
        }
        conn_flush(c->conn);
        conn_set_timeout(c->conn, c->opts.data_block_timeout_ms); /* 4.5.3.2.5: per block */
        if (conn_pending_output(c->conn) > 0)
            return;
    }
}

/* ---- states ------------------------------------------------------------- */

static const char *
smtpc_phase(const struct smtpc *c)
{
    switch (c->state) {
    case ST_CONNECTING:
        return "connecting";
    case ST_GREETING:
        return "receiving the initial server greeting";
    case ST_EHLO:
        return c->opts.lmtp ? "performing the LHLO handshake" : "performing the EHLO handshake";
    case ST_HELO:
        return "performing the HELO handshake";
    case ST_STARTTLS:
        return "sending STARTTLS";
    case ST_TLS:
        return "performing the TLS handshake";
    case ST_DANE:
        return "looking up TLSA records";
    case ST_STS:
        return "looking up the MTA-STS policy";
    case ST_READY:
    case ST_DONE:
    case ST_LOCAL_DONE:
        return "waiting for a message";
    case ST_MAIL:
        return "sending MAIL FROM";
    case ST_RCPT:
        return "sending RCPT TO";
    case ST_DATA:
        return "sending DATA command";
    case ST_CONTENT:
        return "sending message body";
    case ST_DOT:
        return "sending end of data -- message may be sent more than once";
    case ST_RSET:
        return "sending RSET";
    case ST_QUIT:
        return "sending QUIT";
    case ST_CLOSING:
        break;
    }
    return "closing";
}

static bool
smtpc_in_txn(const struct smtpc *c)
{
    return c->msg != NULL;
}

/* Enters state: sends its command (unless the pipeline already did) and
 * re-arms the deadline for the reply awaited there (RFC 5321 4.5.3.2). */
static void
smtpc_enter(struct smtpc *c, enum smtpc_state state)
{
    c->state = state;
    switch (state) {
    case ST_CONNECTING:
        conn_set_timeout(c->conn, c->opts.connect_timeout_ms);
        return;
    case ST_GREETING:
        conn_set_timeout(c->conn, c->opts.greeting_timeout_ms);
        return;
    case ST_EHLO:
        smtpc_write_cmd(c, "%s %s", c->opts.lmtp ? "LHLO" : "EHLO", smtpc_helo(c));
        break;
    case ST_HELO:
        smtpc_write_cmd(c, "HELO %s", smtpc_helo(c));
        break;
    case ST_STARTTLS:
        smtpc_write_cmd(c, "STARTTLS");
        break;
    case ST_TLS:
    case ST_DANE:
    case ST_STS:
        conn_set_timeout(c->conn, c->opts.command_timeout_ms);
        return;
    case ST_READY:
    case ST_DONE:
        conn_set_timeout(c->conn, 0); /* idle: the caller decides how long */
        return;
    case ST_LOCAL_DONE:
        conn_defer(c->conn);
        return;
    case ST_MAIL:
    case ST_RCPT:
    case ST_DATA: {
        size_t step = state == ST_MAIL ? 0 : state == ST_RCPT ? 1 + c->rx_rcpt : c->nrcpts + 1;
        if (c->tx_step <= step)
            smtpc_write_step(c, step);
        conn_flush(c->conn);
        conn_set_timeout(c->conn, state == ST_DATA ? c->opts.data_init_timeout_ms
                                                   : c->opts.command_timeout_ms);
        return;
    }
    case ST_CONTENT:
        c->content_off = 0;
        c->at_bol = true;
        c->rx_rcpt = 0; /* LMTP: the final replies follow the accepted recipients */
        smtpc_trace(c, ">>>", "(message content)", 17);
        smtpc_write_content(c);
        return;
    case ST_DOT:
        conn_flush(c->conn);
        conn_set_timeout(c->conn, c->opts.data_end_timeout_ms);
        return;
    case ST_RSET:
        smtpc_write_cmd(c, "RSET");
        break;
    case ST_QUIT:
        smtpc_write_cmd(c, "QUIT");
        break;
    case ST_CLOSING:
        conn_close(c->conn);
        return;
    }
    conn_flush(c->conn);
    conn_set_timeout(c->conn, c->opts.command_timeout_ms);
}

static void
smtpc_emit(struct smtpc *c, enum smtpc_event ev)
{
    c->cb(c, ev, c->arg);
}

/* The IP of an AF_INET/AF_INET6 address as text; false for other families. */
static bool
smtpc_addr_ip(const struct sockaddr_storage *ss, char *out, size_t size)
{
    out[0] = '\0';
    if (ss->ss_family == AF_INET6)
        return inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)ss)->sin6_addr, out,
                         (socklen_t)size) != NULL;
    if (ss->ss_family == AF_INET)
        return inet_ntop(AF_INET, &((const struct sockaddr_in *)ss)->sin_addr, out,
                         (socklen_t)size) != NULL;
    return false;
}

static void
smtpc_log_target_failure(const struct smtpc *c, const struct smtpc_reply *r)
{
    char text[700];
    smtpc_reply_format(r, text, sizeof(text));
    struct log_line ll;
    log_begin(&ll, LOG_INFO, NULL);
    log_event(&ll, "relay failed");
    log_kv(&ll, "relay", "%s", c->relay);
    char src[INET6_ADDRSTRLEN];
    const struct smtpc_target *t = &c->targets[c->cur];
    if (t->src_len > 0 ? smtpc_addr_ip(&t->src, src, sizeof(src))
                       : c->has_src && smtpc_addr_ip(&c->src, src, sizeof(src)))
        log_kv(&ll, "src", "%s", src);
    smtpc_log_tls(c, &ll);
    log_kv_vis(&ll, "reason", text, strlen(text));
    log_end(&ll);
}

/* The current target failed before READY: remember why, close, and let
 * CONN_EV_CLOSED connect the next one. quit: the server is still talking
 * (it refused politely), say QUIT first (RFC 5321 3.1, 4.1.1.10). */
static void
smtpc_target_failed(struct smtpc *c, const struct smtpc_reply *r, bool quit)
{
    smtpc_log_target_failure(c, r);
    c->failure = *r;
    if (!r->local) {
        c->has_server_failure = true;
        c->server_failure = *r;
        if (r->code / 100 == 5)
            c->n5xx++;
    }
    if (quit)
        smtpc_write_cmd(c, "QUIT");
    c->next_target = true;
    smtpc_enter(c, ST_CLOSING);
}

/* Something broke the session (421, lost, timeout, protocol error): a
 * target failure before READY; inside a transaction the recipients not yet
 * answered get r and DONE follows; then the session closes. */
static void
smtpc_session_failed(struct smtpc *c, const struct smtpc_reply *r)
{
    switch (c->state) {
    case ST_CONNECTING:
    case ST_GREETING:
    case ST_EHLO:
    case ST_HELO:
    case ST_STARTTLS:
    case ST_TLS:
    case ST_DANE:
    case ST_STS:
        smtpc_target_failed(c, r, false);
        return;
    case ST_CLOSING:
        return;
    default:
        break;
    }
    if (!smtpc_in_txn(c)) {
        if (log_enabled(LOG_DEBUG)) {
            char text[700];
            smtpc_reply_format(r, text, sizeof(text));
            log_msg(LOG_DEBUG, NULL, "relay=%s: session ends: %s", c->relay, text);
        }
        smtpc_enter(c, ST_CLOSING);
        return;
    }
    for (size_t i = 0; i < c->nrcpts; i++) {
        if (c->rcpts[i].st == RS_FINAL)
            continue;
        c->rcpts[i].reply = *r;
        c->rcpts[i].reply.scope = DELIV_SCOPE_CONN;
        c->rcpts[i].st = RS_FINAL;
    }
    c->unusable = true;
    smtpc_txn_end(c);
}

static void
smtpc_protocol_error(struct smtpc *c, const char *what, const struct smtpc_reply *got)
{
    struct smtpc_reply r;
    if (got != NULL) {
        char text[700];
        smtpc_reply_format(got, text, sizeof(text));
        smtpc_synth(&r, 451, "4.5.0", DELIV_SCOPE_CONN, "%s from %s while %s: %s", what, c->relay,
                    smtpc_phase(c), text);
    } else {
        smtpc_synth(&r, 451, "4.5.0", DELIV_SCOPE_CONN, "%s from %s while %s", what, c->relay,
                    smtpc_phase(c));
    }
    smtpc_session_failed(c, &r);
}

/* The transaction is over: every recipient has its result. DONE, then
 * READY (after RSET if the server may hold transaction state), or CLOSED
 * when the session is unusable. */
static void
smtpc_txn_end(struct smtpc *c)
{
    for (size_t i = 0; i < c->nrcpts; i++) {
        if (c->rcpts[i].st != RS_FINAL)
            PANIC("smtpc_txn_end: recipient %zu without a result", i);
    }
    if (c->tx_step > 0)
        c->transactions++;
    c->msg = NULL;
    if (c->unusable)
        smtpc_enter(c, ST_CLOSING);
    else if (c->need_rset)
        smtpc_enter(c, ST_RSET);
    else
        smtpc_enter(c, ST_DONE);
    c->need_rset = false;
    smtpc_emit(c, SMTPC_EV_DONE);
    if (c->state == ST_DONE) { /* the callback did not quit or abort */
        smtpc_enter(c, ST_READY);
        smtpc_emit(c, SMTPC_EV_READY);
    }
}

static void
smtpc_set_result(struct smtpc *c, size_t i, const struct smtpc_reply *r, enum deliv_scope scope)
{
    c->rcpts[i].reply = *r;
    c->rcpts[i].reply.scope = scope;
    c->rcpts[i].st = RS_FINAL;
}

/* Extensions from an EHLO/LHLO reply: every line after the first. */
static void
smtpc_parse_ext(struct smtpc *c)
{
    memset(&c->ext, 0, sizeof(c->ext));
    const char *p = buf_ptr(&c->rx_lines);
    const char *end = p + c->rx_lines.len;
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    p = nl + 1;
    while (p < end) {
        nl = memchr(p, '\n', (size_t)(end - p));
        struct span kw = {p, 0};
        while (p + kw.len < nl && p[kw.len] != ' ')
            kw.len++;
        const char *arg = p + kw.len;
        while (arg < nl && *arg == ' ')
            arg++;
        if (span_eq_ci(kw, "PIPELINING")) {
            c->ext.pipelining = true;
        } else if (span_eq_ci(kw, "SIZE")) {
            c->ext.size = true;
            uint64_t v = 0;
            const char *q = arg;
            for (; q < nl && *q >= '0' && *q <= '9'; q++) {
                if (v > (UINT64_MAX - 9) / 10) {
                    v = 0; /* absurd: treat as no limit */
                    break;
                }
                v = v * 10 + (uint64_t)(*q - '0');
            }
            c->ext.size_limit = v;
        } else if (span_eq_ci(kw, "8BITMIME")) {
            c->ext.eightbitmime = true;
        } else if (span_eq_ci(kw, "SMTPUTF8")) {
            c->ext.smtputf8 = true;
        } else if (span_eq_ci(kw, "DSN")) {
            c->ext.dsn = true;
        } else if (span_eq_ci(kw, "ENHANCEDSTATUSCODES")) {
            c->ext.enhanced = true;
        } else if (span_eq_ci(kw, "STARTTLS")) {
            c->ext.starttls = true;
        }
        p = nl + 1;
    }
}

static bool
smtpc_class_ok(int code)
{
    int cls = code / 100;
    return cls == 2 || cls == 4 || cls == 5;
}

static void
smtpc_on_reply_txn(struct smtpc *c, const struct smtpc_reply *r)
{
    switch (c->state) {
    case ST_MAIL:
        if (!smtpc_class_ok(r->code)) {
            smtpc_protocol_error(c, "unexpected reply", r);
            return;
        }
        if (r->code / 100 == 2) {
            c->mail_ok = true;
        } else {
            for (size_t i = 0; i < c->nrcpts; i++)
                smtpc_set_result(c, i, r, DELIV_SCOPE_MSG);
            c->need_rset = true;
        }
        c->rx_rcpt = 0;
        if (c->mail_ok || c->ext.pipelining)
            smtpc_enter(c, ST_RCPT); /* pipelined: RCPT replies follow anyway */
        else
            smtpc_txn_end(c);
        return;
    case ST_RCPT:
        if (!smtpc_class_ok(r->code)) {
            smtpc_protocol_error(c, "unexpected reply", r);
            return;
        }
        if (c->mail_ok) {
            if (r->code / 100 == 2) {
                c->rcpts[c->rx_rcpt].reply = *r;
                c->rcpts[c->rx_rcpt].st = RS_ACCEPTED;
                c->naccepted++;
            } else {
                smtpc_set_result(c, c->rx_rcpt, r, DELIV_SCOPE_RCPT);
            }
        } /* else MAIL failed: the pipelined RCPT's reply changes nothing */
        c->rx_rcpt++;
        if (c->rx_rcpt < c->nrcpts) {
            smtpc_enter(c, ST_RCPT);
        } else if (c->naccepted > 0 || c->ext.pipelining) {
            smtpc_enter(c, ST_DATA);
        } else {
            c->need_rset = true;
            smtpc_txn_end(c);
        }
        return;
    case ST_DATA:
        if (r->code == 354) {
            if (c->mail_ok && c->naccepted > 0) {
                smtpc_enter(c, ST_CONTENT);
                return;
            }
            /* RFC 2920 3.1: DATA went out pipelined and was accepted
             * although nobody was: end the empty message at once. */
            conn_write(c->conn, ".\r\n", 3);
            smtpc_trace(c, ">>>", ".", 1);
            c->discard_final = true;
            if (c->opts.lmtp) { /* one reply per accepted recipient: none */
                conn_flush(c->conn);
                c->unusable = true;
                smtpc_txn_end(c);
                return;
            }
            smtpc_enter(c, ST_DOT);
            return;
        }
        if (!smtpc_class_ok(r->code)) {
            smtpc_protocol_error(c, "unexpected reply", r);
            return;
        }
        for (size_t i = 0; i < c->nrcpts; i++) {
            if (c->rcpts[i].st == RS_ACCEPTED)
                smtpc_set_result(c, i, r, DELIV_SCOPE_MSG);
        }
        c->need_rset = true;
        smtpc_txn_end(c);
        return;
    case ST_DOT:
        if (!smtpc_class_ok(r->code)) {
            smtpc_protocol_error(c, "unexpected reply", r);
            return;
        }
        if (c->discard_final) {
            smtpc_txn_end(c);
            return;
        }
        if (!c->opts.lmtp) {
            for (size_t i = 0; i < c->nrcpts; i++) {
                if (c->rcpts[i].st == RS_ACCEPTED)
                    smtpc_set_result(c, i, r, DELIV_SCOPE_MSG);
            }
            smtpc_txn_end(c);
            return;
        }
        /* LMTP (RFC 2033 4.2): one reply per accepted recipient, in order */
        while (c->rx_rcpt < c->nrcpts && c->rcpts[c->rx_rcpt].st != RS_ACCEPTED)
            c->rx_rcpt++;
        if (c->rx_rcpt == c->nrcpts)
            PANIC("smtpc: LMTP reply without an accepted recipient");
        smtpc_set_result(c, c->rx_rcpt, r, DELIV_SCOPE_RCPT);
        while (c->rx_rcpt < c->nrcpts && c->rcpts[c->rx_rcpt].st != RS_ACCEPTED)
            c->rx_rcpt++;
        if (c->rx_rcpt == c->nrcpts)
            smtpc_txn_end(c);
        else
            conn_set_timeout(c->conn, c->opts.data_end_timeout_ms);
        return;
    default:
        PANIC("smtpc_on_reply_txn in state %d", (int)c->state);
    }
}

/* ---- STARTTLS ----------------------------------------------------------- */

static bool
smtpc_dane_on(const struct smtpc *c)
{
    return !c->opts.lmtp && c->opts.tls == DELIVERY_TLS_DANE;
}

/* The DANE verdict for the target in use, once its lookup is done. */
static bool
smtpc_dane_known(const struct smtpc *c, enum dane_status *st)
{
    if (!smtpc_dane_on(c) || !c->dane_done)
        return false;
    const struct smtpc_target *t = &c->targets[c->cur];
    if (c->dane_family != t->addr.ss_family || strcmp(c->dane_host, t->host) != 0)
        return false;
    *st = c->dane_status;
    return true;
}

/* The MTA-STS mode for the target in use: NONE without a policy, before
 * it is known, and when DANE secures the target (RFC 8461 2). */
static enum mta_sts_mode
smtpc_sts_mode(const struct smtpc *c)
{
    if (c->opts.lmtp || !c->sts_done || c->sts.status != MTA_STS_POLICY)
        return MTA_STS_MODE_NONE;
    enum dane_status st;
    if (smtpc_dane_known(c, &st) && (st == DANE_SECURE || st == DANE_UNUSABLE))
        return MTA_STS_MODE_NONE;
    return c->sts.policy.mode;
}

/* Testing mode: remember (for the log) what an enforced policy would fail. */
static void
smtpc_sts_would_fail(struct smtpc *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
smtpc_sts_would_fail(struct smtpc *c, const char *fmt, ...)
{
    if (c->sts_would_fail[0] != '\0')
        return; /* the first failure */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->sts_would_fail, sizeof(c->sts_would_fail), fmt, ap);
    va_end(ap);
}

/* TLS is mandatory: `required`, TLSA records (RFC 7672 2.2: usable or
 * not), or an enforced MTA-STS policy (RFC 8461 4.2). */
static bool
smtpc_tls_required(const struct smtpc *c)
{
    if (c->opts.lmtp)
        return false;
    enum dane_status st;
    if (smtpc_dane_known(c, &st) && (st == DANE_SECURE || st == DANE_UNUSABLE))
        return true;
    if (smtpc_sts_mode(c) == MTA_STS_MODE_ENFORCE)
        return true;
    return c->opts.tls == DELIVERY_TLS_REQUIRED;
}

/* The DANE-authenticated handshake applies to the target in use. */
static bool
smtpc_dane_secure(const struct smtpc *c)
{
    enum dane_status st;
    return smtpc_dane_known(c, &st) && st == DANE_SECURE;
}

/* "TLS required" or "TLS required by DANE", for the 4.7.4 replies. */
static const char *
smtpc_tls_required_text(const struct smtpc *c)
{
    enum dane_status st;
    if (smtpc_dane_known(c, &st) && (st == DANE_SECURE || st == DANE_UNUSABLE))
        return "TLS required by DANE";
    if (smtpc_sts_mode(c) == MTA_STS_MODE_ENFORCE)
        return "TLS required by MTA-STS";
    return c->opts.tls == DELIVERY_TLS_DANE ? "TLS required by DANE" : "TLS required";
}

/* The caller's client context, else the process's shared one (with its
 * session cache). NULL, with the reason in why, if it cannot be made. */
static struct tls_ctx *
smtpc_tls_base(const struct smtpc *c, char *why, size_t size)
{
    if (c->opts.tls_ctx != NULL)
        return c->opts.tls_ctx;
    char *err = NULL;
    struct tls_ctx *t = tls_client_shared(&err);
    if (t == NULL)
        snprintf(why, size, "%s", err ? err : "TLS is not available here");
    free(err);
    return t;
}

/* The context for the handshake: the DANE one for a DANE_SECURE target,
 * else smtpc_tls_base(). */
static struct tls_ctx *
smtpc_tls_ctx(const struct smtpc *c, char *why, size_t size)
{
    if (!smtpc_dane_secure(c))
        return smtpc_tls_base(c, why, size);
    if (c->dane_tls == NULL)
        snprintf(why, size, "%s", c->dane_tls_err);
    return c->dane_tls;
}

static void
smtpc_log_tls_established(const struct smtpc *c)
{
    struct log_line ll;
    log_begin(&ll, LOG_INFO, smtpc_log_key(c));
    log_event(&ll, "tls established");
    log_kv(&ll, "relay", "%s", c->relay);
    smtpc_log_tls(c, &ll);
    if (c->tls_info.peer_cn[0])
        log_kv(&ll, "peer_cn", "%s", c->tls_info.peer_cn);
    log_end(&ll);
}

/* Forgets the DANE lookup or verdict (another host, or the end). */
static void
smtpc_dane_reset(struct smtpc *c)
{
    dane_lookup_cancel(c->dane_q);
    c->dane_q = NULL;
    tls_unref(c->dane_tls);
    c->dane_tls = NULL;
    c->dane_done = false;
    c->dane_host[0] = '\0';
    c->dane_family = AF_UNSPEC;
    c->dane_detail[0] = '\0';
    c->dane_tls_err[0] = '\0';
}

static void smtpc_greeted(struct smtpc *c);

/* The DANE lookup of the target's host ended. */
static void
smtpc_on_dane(struct dane_lookup *l, const struct dane_result *res, void *arg)
{
    struct smtpc *c = arg;
    if (l != c->dane_q)
        PANIC("smtpc: a DANE result for a lookup that is not ours");
    c->dane_q = NULL;
    c->dane_done = true;
    c->dane_status = res->status;
    if (!str_copy(c->dane_detail, sizeof(c->dane_detail), res->detail))
        c->dane_detail[0] = '\0'; /* both are 192 bytes */
    if (res->status == DANE_SECURE) {
        char why[160] = "";
        struct tls_ctx *base = smtpc_tls_base(c, why, sizeof(why));
        char *err = NULL;
        c->dane_tls = base ? tls_client_dane(base, res->tlsa, res->ntlsa, &err) : NULL;
        if (c->dane_tls == NULL)
            snprintf(c->dane_tls_err, sizeof(c->dane_tls_err), "%s", err ? err : why);
        free(err);
    }
    if (c->state == ST_DANE)
        smtpc_greeted(c);
}

/* Starts the DANE lookup for the target about to be connected, unless
 * the previous target had the same host and family (its lookup or verdict
 * is kept). An IP literal (or no name) has no TLSA base domain: insecure. */
static void
smtpc_dane_begin(struct smtpc *c)
{
    const struct smtpc_target *t = &c->targets[c->cur];
    int family = t->addr.ss_family;
    if (!smtpc_dane_on(c) || (family != AF_INET && family != AF_INET6))
        return;
    if ((c->dane_q != NULL || c->dane_done) && c->dane_family == family &&
        strcmp(c->dane_host, t->host) == 0)
        return;
    smtpc_dane_reset(c);
    if (!str_copy(c->dane_host, sizeof(c->dane_host), t->host))
        PANIC("smtpc: host name too long");
    c->dane_family = family;
    unsigned char bin[16];
    if (t->host[0] == '\0' || inet_pton(AF_INET, t->host, bin) == 1 ||
        inet_pton(AF_INET6, t->host, bin) == 1) {
        c->dane_done = true;
        c->dane_status = DANE_INSECURE;
        snprintf(c->dane_detail, sizeof(c->dane_detail), "no host name for TLSA records");
        return;
    }
    unsigned port = family == AF_INET6 ? ntohs(((const struct sockaddr_in6 *)&t->addr)->sin6_port)
                                       : ntohs(((const struct sockaddr_in *)&t->addr)->sin_port);
    c->dane_q = dane_lookup_start(c->loop, &c->dane_rs, c->dane_domain[0] ? c->dane_domain : NULL,
                                  t->host, port, family, smtpc_on_dane, c);
}

static void smtpc_greeted(struct smtpc *c);

/* The session's MTA-STS policy lookup ended. */
static void
smtpc_on_sts(struct mta_sts_lookup *l, const struct mta_sts_result *res, void *arg)
{
    struct smtpc *c = arg;
    if (l != c->sts_q)
        PANIC("smtpc: an MTA-STS result for a lookup that is not ours");
    c->sts_q = NULL;
    c->sts_done = true;
    c->sts = *res;
    if (c->state == ST_STS)
        smtpc_greeted(c);
}

/* A failed handshake under an opportunistic policy with opts.tls_fallback:
 * logs r, closes this connection and connects to the same target again
 * without STARTTLS (once per target). False when the policy does not allow
 * it (the caller fails the target). */
static bool
smtpc_plain_fallback(struct smtpc *c, const struct smtpc_reply *r)
{
    if (!c->opts.tls_fallback || c->plain_retry || smtpc_tls_required(c)
        || c->opts.tls != DELIVERY_TLS_OPPORTUNISTIC)
        return false;
    char text[700];
    smtpc_reply_format(r, text, sizeof(text));
    log_msg(LOG_INFO, smtpc_log_key(c), "relay=%s: %s; trying again in plaintext "
                                        "(delivery.tls_fallback)",
            c->relay, text);
    c->plain_retry = true;
    c->plain_pending = true;
    smtpc_enter(c, ST_CLOSING);
    return true;
}

/* The handshake started after STARTTLS's 220 ended. */
static void
smtpc_on_tls(struct conn *cn, int status, void *arg)
{
    struct smtpc *c = arg;
    if (cn != c->conn || c->state != ST_TLS)
        PANIC("smtpc: TLS completion in state %d", (int)c->state);
    if (status < 0) {
        const char *why = conn_tls_error(cn);
        struct smtpc_reply r;
        smtpc_synth(&r, 451, "4.7.5", DELIV_SCOPE_CONN, "TLS handshake with %s failed: %s",
                    c->relay, why[0] ? why : conn_strerror(status));
        if (smtpc_plain_fallback(c, &r))
            return;
        smtpc_target_failed(c, &r, false); /* never plaintext on this connection */
        return;
    }
    c->tls_on = true;
    conn_tls_info(cn, &c->tls_info);
    smtpc_log_tls_established(c);
    if (smtpc_dane_secure(c) && !c->tls_info.verified) {
        /* RFC 7672 2.2: no match for any usable TLSA record, no delivery */
        struct smtpc_reply r;
        smtpc_synth(&r, 451, "4.7.5", DELIV_SCOPE_CONN, "DANE verification failed for %s: %s",
                    c->relay, c->tls_info.verify);
        smtpc_target_failed(c, &r, true);
        return;
    }
    if (!c->tls_info.verified && smtpc_sts_mode(c) == MTA_STS_MODE_ENFORCE) {
        /* RFC 8461 4.2: the certificate must be valid for the MX host name */
        struct smtpc_reply r;
        smtpc_synth(&r, 451, "4.7.5", DELIV_SCOPE_CONN,
                    "MTA-STS certificate verification failed for %s: %s", c->relay,
                    c->tls_info.verify);
        smtpc_target_failed(c, &r, true);
        return;
    }
    if (!c->tls_info.verified && smtpc_sts_mode(c) == MTA_STS_MODE_TESTING)
        smtpc_sts_would_fail(c, "certificate: %s", c->tls_info.verify);
    /* RFC 3207 4.2: forget the extensions; ask again under TLS */
    memset(&c->ext, 0, sizeof(c->ext));
    c->esmtp = false;
    smtpc_enter(c, ST_EHLO);
}

/* The reply to STARTTLS: 220 starts the handshake; a refusal is "not
 * offered" (plaintext, or a target failure when TLS is required). */
static void
smtpc_on_starttls_reply(struct smtpc *c, const struct smtpc_reply *r)
{
    if (r->code / 100 == 2) {
        /* RFC 3207 5: whatever the server sent after its 220 was not
         * protected; conn_start_tls drops it too */
        buf_clear(conn_input(c->conn));
        char why[160] = "";
        struct tls_ctx *t = smtpc_tls_ctx(c, why, sizeof(why));
        int rc = t ? conn_start_tls(c->conn, t, false, c->remote_host, smtpc_on_tls, c) : -1;
        if (rc < 0) {
            const char *err = t ? conn_tls_error(c->conn) : why;
            struct smtpc_reply f;
            smtpc_synth(&f, 451, "4.7.5", DELIV_SCOPE_CONN, "TLS handshake with %s failed: %s",
                        c->relay, err[0] ? err : conn_strerror(rc));
            if (smtpc_plain_fallback(c, &f))
                return;
            smtpc_target_failed(c, &f, false);
            return;
        }
        smtpc_enter(c, ST_TLS);
        return;
    }
    if (r->code / 100 != 4 && r->code / 100 != 5) {
        smtpc_protocol_error(c, "unexpected reply", r);
        return;
    }
    char text[700];
    smtpc_reply_format(r, text, sizeof(text));
    if (smtpc_tls_required(c)) {
        struct smtpc_reply f;
        smtpc_synth(&f, 451, "4.7.4", DELIV_SCOPE_CONN, "%s but STARTTLS refused by %s: %s",
                    smtpc_tls_required_text(c), c->relay, text);
        smtpc_target_failed(c, &f, true);
        return;
    }
    if (smtpc_sts_mode(c) == MTA_STS_MODE_TESTING)
        smtpc_sts_would_fail(c, "STARTTLS refused");
    struct log_line ll;
    log_begin(&ll, LOG_INFO, smtpc_log_key(c));
    log_event(&ll, "starttls refused");
    log_kv(&ll, "relay", "%s", c->relay);
    log_kv_vis(&ll, "reply", text, strlen(text));
    smtpc_log_tls(c, &ll); /* dane= */
    log_end(&ll);
    smtpc_enter(c, ST_READY); /* opportunistic: on in plaintext (RFC 3207 4.1) */
    smtpc_emit(c, SMTPC_EV_READY);
}

/* EHLO (or HELO) accepted: under DANE, the target's verdict first (wait
 * for it; a failed lookup fails the target). Then STARTTLS if the policy
 * and the server agree, else READY, or the target fails when TLS is
 * required but not offered (RFC 3207 4.1: "TLS required" is the client's
 * local policy; RFC 7672 2.2 makes it so when TLSA records exist). */
static void
smtpc_greeted(struct smtpc *c)
{
    const struct smtpc_target *tg = &c->targets[c->cur];
    bool tcp = tg->addr.ss_family == AF_INET || tg->addr.ss_family == AF_INET6;
    if (smtpc_dane_on(c) && tcp && !c->tls_on) {
        enum dane_status st;
        if (!smtpc_dane_known(c, &st)) {
            smtpc_enter(c, ST_DANE); /* smtpc_on_dane comes back here */
            return;
        }
        if (st == DANE_TEMPFAIL) {
            struct smtpc_reply f;
            smtpc_synth(&f, 451, "4.4.3", DELIV_SCOPE_CONN, "DANE TLSA lookup for %s failed: %s",
                        c->relay, c->dane_detail);
            smtpc_target_failed(c, &f, true);
            return;
        }
    }
    if (c->sts_domain[0] != '\0' && tcp && !c->tls_on) {
        if (!c->sts_done) {
            smtpc_enter(c, ST_STS); /* smtpc_on_sts comes back here */
            return;
        }
        enum mta_sts_mode mode = smtpc_sts_mode(c);
        if (mode != MTA_STS_MODE_NONE && !mta_sts_policy_match(&c->sts.policy, tg->host)) {
            if (mode == MTA_STS_MODE_ENFORCE) { /* RFC 8461 4.1 */
                struct smtpc_reply f;
                smtpc_synth(&f, 451, "4.7.5", DELIV_SCOPE_CONN,
                            "MTA-STS policy of %s does not list MX %s", c->sts_domain,
                            c->relay);
                smtpc_target_failed(c, &f, true);
                return;
            }
            smtpc_sts_would_fail(c, "MX %s not listed in the policy", tg->host);
        }
        if (mode == MTA_STS_MODE_TESTING && !c->ext.starttls)
            smtpc_sts_would_fail(c, "STARTTLS not offered");
    }
    bool want = !c->opts.lmtp && !c->tls_on && !c->plain_retry &&
                (c->opts.tls != DELIVERY_TLS_NONE || smtpc_sts_mode(c) == MTA_STS_MODE_ENFORCE);
    if (want && c->ext.starttls) {
        char why[160] = "";
        if (smtpc_tls_ctx(c, why, sizeof(why)) != NULL) {
            smtpc_enter(c, ST_STARTTLS);
            return;
        }
        if (smtpc_tls_required(c)) {
            struct smtpc_reply f;
            smtpc_synth(&f, 451, "4.7.5", DELIV_SCOPE_CONN, "TLS unavailable for %s: %s",
                        c->relay, why);
            smtpc_target_failed(c, &f, true);
            return;
        }
        log_msg(LOG_WARNING, smtpc_log_key(c), "relay=%s: no TLS client context (%s): plaintext",
                c->relay, why);
    } else if (want && smtpc_tls_required(c)) {
        struct smtpc_reply f;
        smtpc_synth(&f, 451, "4.7.4", DELIV_SCOPE_CONN, "%s but not offered by %s",
                    smtpc_tls_required_text(c), c->relay);
        smtpc_target_failed(c, &f, true);
        return;
    }
    smtpc_enter(c, ST_READY);
    smtpc_emit(c, SMTPC_EV_READY);
}

static void
smtpc_on_reply(struct smtpc *c, const struct smtpc_reply *r)
{
    if (r->code == 421 && c->state != ST_GREETING && c->state != ST_QUIT) {
        /* 421: the server is closing the channel (RFC 5321 3.8) */
        smtpc_session_failed(c, r);
        return;
    }
    switch (c->state) {
    case ST_GREETING:
        if (r->code == 220) {
            smtpc_enter(c, ST_EHLO);
        } else if (r->code / 100 == 4 || r->code / 100 == 5) {
            smtpc_target_failed(c, r, r->code != 421);
        } else {
            smtpc_protocol_error(c, "unexpected reply", r);
        }
        return;
    case ST_EHLO:
        if (r->code / 100 == 2) {
            c->esmtp = true;
            smtpc_parse_ext(c);
            smtpc_greeted(c);
        } else if (r->code / 100 == 5 && !c->opts.lmtp) {
            smtpc_enter(c, ST_HELO);
        } else if (r->code / 100 == 4 || r->code / 100 == 5) {
            smtpc_target_failed(c, r, true);
        } else {
            smtpc_protocol_error(c, "unexpected reply", r);
        }
        return;
    case ST_HELO:
        if (r->code / 100 == 2) {
            smtpc_greeted(c);
        } else if (r->code / 100 == 4 || r->code / 100 == 5) {
            smtpc_target_failed(c, r, true);
        } else {
            smtpc_protocol_error(c, "unexpected reply", r);
        }
        return;
    case ST_STARTTLS:
        smtpc_on_starttls_reply(c, r);
        return;
    case ST_READY:
        smtpc_protocol_error(c, "unexpected reply", r);
        return;
    case ST_RSET:
        if (r->code / 100 == 2) {
            smtpc_enter(c, ST_READY);
            smtpc_emit(c, SMTPC_EV_READY);
        } else {
            smtpc_enter(c, ST_QUIT); /* the server will not reset: give up this session */
        }
        return;
    case ST_QUIT:
        if (c->quit_skip > 0) {
            c->quit_skip--;
            return;
        }
        smtpc_enter(c, ST_CLOSING);
        return;
    case ST_MAIL:
    case ST_RCPT:
    case ST_DATA:
    case ST_DOT:
        smtpc_on_reply_txn(c, r);
        return;
    case ST_CONNECTING:
    case ST_TLS:
    case ST_DANE:
    case ST_STS:
    case ST_DONE:
    case ST_LOCAL_DONE:
    case ST_CONTENT:
    case ST_CLOSING:
        break;
    }
    PANIC("smtpc_on_reply in state %d", (int)c->state);
}

/* ---- input -------------------------------------------------------------- */

static bool
smtpc_wants_reply(const struct smtpc *c)
{
    switch (c->state) {
    case ST_GREETING:
    case ST_EHLO:
    case ST_HELO:
    case ST_STARTTLS:
    case ST_READY:
    case ST_MAIL:
    case ST_RCPT:
    case ST_DATA:
    case ST_DOT:
    case ST_RSET:
    case ST_QUIT:
        return true;
    default:
        return false; /* mid-content replies wait in the input buffer */
    }
}

/* One reply line (without CRLF). Returns NULL and sets *done when a reply
 * is complete, or the protocol error. */
static const char *
smtpc_rx_line(struct smtpc *c, const char *p, size_t n, bool *done)
{
    *done = false;
    smtpc_trace(c, "<<<", p, n);
    if (n < 3 || p[0] < '2' || p[0] > '5' || p[1] < '0' || p[1] > '5' || p[2] < '0' || p[2] > '9' ||
        (n > 3 && p[3] != ' ' && p[3] != '-'))
        return "malformed reply";
    int code = (p[0] - '0') * 100 + (p[1] - '0') * 10 + (p[2] - '0');
    if (c->rx_code != 0 && code != c->rx_code)
        return "inconsistent reply codes";
    c->rx_code = code;
    size_t tn = n > 4 ? n - 4 : 0;
    if (c->rx_lines.len + tn + 1 > SMTPC_REPLY_MAX)
        return "reply too long";
    char *w = buf_reserve(&c->rx_lines, tn + 1);
    for (size_t i = 0; i < tn; i++) {
        unsigned char ch = (unsigned char)p[4 + i];
        w[i] = (ch < 0x20 || ch == 0x7f) ? '?' : (char)ch;
    }
    w[tn] = '\n';
    buf_commit(&c->rx_lines, tn + 1);
    *done = n == 3 || p[3] == ' ';
    return NULL;
}

/* Reads complete replies while the state awaits one. A line may end in a
 * bare LF (as Postfix's smtp_get tolerates). */
static void
smtpc_read(struct smtpc *c)
{
    struct buf *in = conn_input(c->conn);
    while (smtpc_wants_reply(c) && in->len > 0) {
        const char *p = buf_ptr(in);
        size_t scan = in->len < SMTPC_LINE_MAX ? in->len : SMTPC_LINE_MAX;
        const char *nl = memchr(p, '\n', scan);
        if (nl == NULL) {
            if (in->len >= SMTPC_LINE_MAX)
                smtpc_protocol_error(c, "reply line too long", NULL);
            return;
        }
        size_t consumed = (size_t)(nl - p) + 1;
        size_t n = consumed - 1;
        if (n > 0 && p[n - 1] == '\r')
            n--;
        bool done;
        const char *err = smtpc_rx_line(c, p, n, &done);
        buf_consume(in, consumed);
        if (err != NULL) {
            c->rx_code = 0;
            buf_clear(&c->rx_lines);
            smtpc_protocol_error(c, err, NULL);
            return;
        }
        if (!done)
            continue;
        struct smtpc_reply r;
        smtpc_reply_build(c, &r);
        c->rx_code = 0;
        smtpc_on_reply(c, &r); /* may read rx_lines (EHLO extensions) */
        buf_clear(&c->rx_lines);
    }
}

/* ---- conn events -------------------------------------------------------- */

static void
smtpc_on_timeout(struct smtpc *c)
{
    struct smtpc_reply r;
    switch (c->state) {
    case ST_CONNECTING:
        smtpc_synth(&r, 451, "4.4.1", DELIV_SCOPE_CONN, "connect to %s: Connection timed out",
                    c->relay);
        smtpc_target_failed(c, &r, false);
        return;
    case ST_LOCAL_DONE:
        smtpc_txn_end(c);
        return;
    case ST_READY:
    case ST_DONE:
    case ST_CLOSING:
        return;
    case ST_RSET:
    case ST_QUIT:
        smtpc_enter(c, ST_CLOSING);
        return;
    default:
        break;
    }
    smtpc_synth(&r, 451, "4.4.2", DELIV_SCOPE_CONN, "conversation with %s timed out while %s",
                c->relay, smtpc_phase(c));
    smtpc_session_failed(c, &r);
}

static void
smtpc_on_lost(struct smtpc *c, int status)
{
    if (status < 0 && log_enabled(LOG_DEBUG))
        log_msg(LOG_DEBUG, smtpc_log_key(c), "relay=%s: connection error: %s", c->relay,
                conn_strerror(status));
    if (c->state == ST_CLOSING)
        return;
    if (c->state == ST_QUIT) {
        smtpc_enter(c, ST_CLOSING);
        return;
    }
    struct smtpc_reply r;
    smtpc_synth(&r, 451, "4.4.2", DELIV_SCOPE_CONN, "lost connection with %s while %s", c->relay,
                smtpc_phase(c));
    smtpc_session_failed(c, &r);
}

/* The FAILED reply: see smtp_client.h (smtpc_start). */
static void
smtpc_final_failure(struct smtpc *c)
{
    if (c->has_server_failure) {
        c->failure = c->server_failure;
        if (c->failure.code / 100 == 5 && c->n5xx < c->ntargets) {
            c->failure.code -= 100;
            if (c->failure.esc[0] == '5')
                c->failure.esc[0] = '4';
        }
    }
    c->failure.scope = DELIV_SCOPE_SITE;
}

static void smtpc_connect(struct smtpc *c);

static void
smtpc_on_closed(struct smtpc *c)
{
    c->conn = NULL;
    if (smtpc_in_txn(c)) { /* smtpc_abort mid-transaction */
        struct smtpc_reply r;
        smtpc_synth(&r, 451, "4.3.2", DELIV_SCOPE_CONN, "delivery to %s aborted", c->relay);
        for (size_t i = 0; i < c->nrcpts; i++) {
            if (c->rcpts[i].st != RS_FINAL)
                smtpc_set_result(c, i, &r, DELIV_SCOPE_CONN);
        }
        if (c->tx_step > 0)
            c->transactions++;
        c->msg = NULL;
        smtpc_emit(c, SMTPC_EV_DONE);
    }
    if (c->plain_pending && !c->aborted) {
        c->plain_pending = false;
        smtpc_connect(c); /* the same target, plain_retry set: no STARTTLS */
        return;
    }
    if (c->next_target && !c->aborted) {
        c->next_target = false;
        if (c->cur + 1 < c->ntargets) {
            c->cur++;
            c->plain_retry = false;
            smtpc_connect(c);
            return;
        }
        smtpc_final_failure(c);
        smtpc_emit(c, SMTPC_EV_FAILED);
    }
    smtpc_emit(c, SMTPC_EV_CLOSED);
    smtpc_dane_reset(c);
    mta_sts_lookup_cancel(c->sts_q);
    buf_reset(&c->rx_lines);
    buf_reset(&c->cmd);
    free(c->rcpts);
    free(c->targets);
    free(c);
}

static void
smtpc_on_conn(struct conn *cn, enum conn_event ev, int status, void *arg)
{
    struct smtpc *c = arg;
    if (cn != c->conn)
        PANIC("smtpc: event %d from a conn that is not ours", (int)ev);
    switch (ev) {
    case CONN_EV_CONNECTED:
        if (c->state != ST_CONNECTING)
            return;
        if (status < 0) {
            struct smtpc_reply r;
            const struct smtpc_target *t = &c->targets[c->cur];
            char src[INET6_ADDRSTRLEN];
            bool has_src = t->src_len > 0 ? smtpc_addr_ip(&t->src, src, sizeof(src))
                                          : c->has_src && smtpc_addr_ip(&c->src, src, sizeof(src));
            /* UV_E* codes are -errno on Unix; this one only comes from bind(2) */
            if (status == -EADDRNOTAVAIL && has_src) /* the source address is gone */
                smtpc_synth(&r, 451, "4.4.1", DELIV_SCOPE_CONN,
                            "cannot bind to source address %s to connect to %s: %s", src,
                            c->relay, conn_strerror(status));
            else
                smtpc_synth(&r, 451, "4.4.1", DELIV_SCOPE_CONN, "connect to %s: %s", c->relay,
                            conn_strerror(status));
            smtpc_target_failed(c, &r, false);
            return;
        }
        if (!str_copy(c->local_ip, sizeof(c->local_ip), conn_local_ip(c->conn)))
            c->local_ip[0] = '\0';
        smtpc_enter(c, ST_GREETING);
        smtpc_read(c);
        return;
    case CONN_EV_DATA:
        smtpc_read(c);
        return;
    case CONN_EV_EOF:
        smtpc_on_lost(c, 0);
        return;
    case CONN_EV_ERROR:
        smtpc_on_lost(c, status);
        return;
    case CONN_EV_TIMEOUT:
        smtpc_on_timeout(c);
        return;
    case CONN_EV_DRAINED:
        if (c->state == ST_CONTENT)
            smtpc_write_content(c);
        return;
    case CONN_EV_CLOSED:
        smtpc_on_closed(c);
        return;
    }
}

/* ---- targets ------------------------------------------------------------ */

static void
smtpc_format_relay(struct smtpc *c)
{
    const struct smtpc_target *t = &c->targets[c->cur];
    int n;
    if (t->addr.ss_family == AF_UNIX) {
        const struct sockaddr_un *sun = (const struct sockaddr_un *)&t->addr;
        n = snprintf(c->relay, sizeof(c->relay), "%s[%.*s]", t->host[0] ? t->host : "localhost",
                     (int)strnlen(sun->sun_path, sizeof(sun->sun_path)), sun->sun_path);
        if (!str_copy(c->remote_host, sizeof(c->remote_host), t->host[0] ? t->host : "localhost"))
            PANIC("smtpc: host name too long");
    } else {
        char ip[INET6_ADDRSTRLEN];
        smtpc_addr_ip(&t->addr, ip, sizeof(ip));
        int port = 0;
        if (t->addr.ss_family == AF_INET6)
            port = ntohs(((const struct sockaddr_in6 *)&t->addr)->sin6_port);
        else if (t->addr.ss_family == AF_INET)
            port = ntohs(((const struct sockaddr_in *)&t->addr)->sin_port);
        const char *host = t->host[0] ? t->host : ip;
        n = snprintf(c->relay, sizeof(c->relay), "%s[%s]:%d", host, ip, port);
        if (!str_copy(c->remote_host, sizeof(c->remote_host), host))
            PANIC("smtpc: host name too long");
    }
    if (n < 0 || (size_t)n >= sizeof(c->relay))
        PANIC("smtpc: relay name too long");
}

static void
smtpc_connect(struct smtpc *c)
{
    const struct smtpc_target *t = &c->targets[c->cur];
    smtpc_format_relay(c);
    memset(&c->ext, 0, sizeof(c->ext));
    c->esmtp = false;
    c->tls_on = false;
    memset(&c->tls_info, 0, sizeof(c->tls_info));
    c->sts_would_fail[0] = '\0';
    c->local_ip[0] = '\0';
    c->rx_code = 0;
    buf_clear(&c->rx_lines);
    int r;
    if (t->addr.ss_family == AF_UNIX) {
        const struct sockaddr_un *sun = (const struct sockaddr_un *)&t->addr;
        char path[sizeof(sun->sun_path) + 1];
        size_t len = strnlen(sun->sun_path, sizeof(sun->sun_path));
        memcpy(path, sun->sun_path, len);
        path[len] = '\0';
        r = conn_connect_unix(c->loop, path, smtpc_on_conn, c, &c->conn);
    } else {
        const struct sockaddr *src = t->src_len > 0 ? (const struct sockaddr *)&t->src
                                     : c->has_src  ? (const struct sockaddr *)&c->src
                                                   : NULL;
        r = conn_connect_tcp(c->loop, (const struct sockaddr *)&t->addr, src, smtpc_on_conn, c,
                             &c->conn);
    }
    if (r < 0) /* conn.h: every failure comes as CONN_EV_CONNECTED */
        PANIC("smtpc: conn_connect to %s returned %d", c->relay, r);
    smtpc_enter(c, ST_CONNECTING);
    smtpc_dane_begin(c); /* RFC 7672: TLSA lookup while connecting */
}

/* ---- API ---------------------------------------------------------------- */

const char *
smtpc_helo(const struct smtpc *c)
{
    const struct smtpc_target *t = &c->targets[c->cur < c->ntargets ? c->cur : c->ntargets - 1];
    return t->helo[0] ? t->helo : c->opts.helo_name;
}

static uint64_t
smtpc_ms(uint64_t v, uint64_t def)
{
    return v != 0 ? v : def;
}

struct smtpc *
smtpc_start(struct uv_loop_s *loop, const struct smtpc_target *targets, size_t ntargets,
            const struct smtpc_options *opts, smtpc_event_cb *cb, void *arg)
{
    if (ntargets == 0 || opts == NULL || opts->helo_name == NULL || cb == NULL)
        PANIC("smtpc_start: no targets, options, HELO name or callback");
    struct smtpc *c = xcalloc(1, sizeof(*c));
    c->loop = loop;
    c->targets = xreallocarray(NULL, ntargets, sizeof(*targets));
    memcpy(c->targets, targets, ntargets * sizeof(*targets));
    c->ntargets = ntargets;
    c->opts = *opts;
    c->opts.connect_timeout_ms = smtpc_ms(opts->connect_timeout_ms, SMTPC_DEF_CONNECT_MS);
    c->opts.greeting_timeout_ms = smtpc_ms(opts->greeting_timeout_ms, SMTPC_DEF_GREETING_MS);
    c->opts.command_timeout_ms = smtpc_ms(opts->command_timeout_ms, SMTPC_DEF_COMMAND_MS);
    c->opts.data_init_timeout_ms = smtpc_ms(opts->data_init_timeout_ms, SMTPC_DEF_DATA_INIT_MS);
    c->opts.data_block_timeout_ms = smtpc_ms(opts->data_block_timeout_ms, SMTPC_DEF_DATA_BLOCK_MS);
    c->opts.data_end_timeout_ms = smtpc_ms(opts->data_end_timeout_ms, SMTPC_DEF_DATA_END_MS);
    if (opts->src != NULL) {
        if (opts->src_len > sizeof(c->src))
            PANIC("smtpc_start: source address too long");
        memcpy(&c->src, opts->src, opts->src_len);
        c->has_src = true;
    }
    c->opts.src = NULL; /* use the copy */
    if (smtpc_dane_on(c)) {
        const char *why = dane_resolvers_init(&c->dane_rs, opts->dns_resolvers,
                                              opts->ndns_resolvers, opts->dns_timeout_ms);
        if (why != NULL) /* every lookup fails: TLSA lookup failure, deferral */
            log_msg(LOG_WARNING, NULL, "dane: %s", why);
        if (opts->dane_domain != NULL &&
            !str_copy(c->dane_domain, sizeof(c->dane_domain), opts->dane_domain))
            c->dane_domain[0] = '\0';
    }
    c->opts.dns_resolvers = NULL; /* read above only */
    c->opts.ndns_resolvers = 0;
    c->opts.dane_domain = NULL;
    if (!c->opts.lmtp && opts->mta_sts_domain != NULL && opts->dns != NULL &&
        str_copy(c->sts_domain, sizeof(c->sts_domain), opts->mta_sts_domain))
        c->sts_q = mta_sts_lookup_start(loop, opts->dns, c->sts_domain, opts->mta_sts_timeout_ms,
                                        smtpc_on_sts, c);
    else
        c->sts_domain[0] = '\0';
    c->opts.mta_sts_domain = NULL;
    c->cb = cb;
    c->arg = arg;
    buf_init(&c->rx_lines);
    buf_init(&c->cmd);
    smtpc_connect(c);
    return c;
}

void
smtpc_send(struct smtpc *c, const struct smtpc_msg *m)
{
    if (c->state != ST_READY)
        PANIC("smtpc_send in state %d (wait for SMTPC_EV_READY)", (int)c->state);
    if (m->nrcpts == 0)
        PANIC("smtpc_send without recipients");
    if (m->nrcpts > c->rcpts_cap) {
        c->rcpts = xreallocarray(c->rcpts, m->nrcpts, sizeof(*c->rcpts));
        c->rcpts_cap = m->nrcpts;
    }
    memset(c->rcpts, 0, m->nrcpts * sizeof(*c->rcpts));
    c->msg_copy = *m; /* the caller's struct may live on its stack */
    c->msg = &c->msg_copy;
    m = c->msg;
    c->nrcpts = m->nrcpts;
    c->tx_step = 0;
    c->rx_rcpt = 0;
    c->naccepted = 0;
    c->mail_ok = false;
    c->discard_final = false;
    c->need_rset = false;
    c->unusable = false;
    struct smtpc_reply r;
    if (c->ext.size && c->ext.size_limit > 0 && m->content.len > c->ext.size_limit) {
        smtpc_synth(&r, 552, "5.3.4", DELIV_SCOPE_MSG,
                    "message size %zu exceeds size limit %" PRIu64 " of %s", m->content.len,
                    c->ext.size_limit, c->relay);
    } else if (m->smtputf8 && !c->ext.smtputf8) {
        smtpc_synth(&r, 553, "5.6.7", DELIV_SCOPE_MSG,
                    "SMTPUTF8 is required, but was not offered by %s", c->relay);
    } else {
        if (c->ext.pipelining) { /* RFC 2920 3.1: the group ends with DATA */
            for (size_t step = 0; step <= c->nrcpts + 1; step++)
                smtpc_write_step(c, step);
        }
        smtpc_enter(c, ST_MAIL);
        return;
    }
    for (size_t i = 0; i < c->nrcpts; i++)
        smtpc_set_result(c, i, &r, DELIV_SCOPE_MSG);
    smtpc_enter(c, ST_LOCAL_DONE);
}

const struct smtpc_reply *
smtpc_rcpt_reply(const struct smtpc *c, size_t i)
{
    if (i >= c->nrcpts || c->rcpts[i].st != RS_FINAL)
        PANIC("smtpc_rcpt_reply(%zu): no result", i);
    return &c->rcpts[i].reply;
}

const struct smtpc_reply *
smtpc_failure(const struct smtpc *c)
{
    return &c->failure;
}

const char *
smtpc_relay(const struct smtpc *c)
{
    return c->relay;
}

const char *
smtpc_remote_host(const struct smtpc *c)
{
    return c->remote_host;
}

const char *
smtpc_local_ip(const struct smtpc *c)
{
    return c->local_ip[0] != '\0' ? c->local_ip : NULL;
}

const struct conn_tls_info *
smtpc_tls(const struct smtpc *c)
{
    return c->tls_on ? &c->tls_info : NULL;
}

/* mta_sts= of the target in use, once the policy is known. */
static void
smtpc_log_sts(const struct smtpc *c, struct log_line *ll)
{
    if (c->sts_domain[0] == '\0' || !c->sts_done)
        return;
    enum dane_status st;
    if (c->sts.status == MTA_STS_NO_POLICY) {
        log_kv(ll, "mta_sts", "none (%s)", c->sts.detail);
    } else if (c->sts.status == MTA_STS_FETCH_FAILED) {
        log_kv(ll, "mta_sts", "fetch-failed (%s)", c->sts.detail);
    } else if (smtpc_dane_known(c, &st) && (st == DANE_SECURE || st == DANE_UNUSABLE)) {
        log_kv(ll, "mta_sts", "none (DANE applies; policy mode %s)",
               mta_sts_mode_name(c->sts.policy.mode));
    } else if (c->sts.policy.mode == MTA_STS_MODE_NONE) {
        log_kv(ll, "mta_sts", "none (policy mode none, id %s)", c->sts.id);
    } else if (c->sts.policy.mode == MTA_STS_MODE_TESTING && c->sts_would_fail[0] != '\0') {
        log_kv(ll, "mta_sts", "testing (would fail: %s)", c->sts_would_fail);
    } else {
        log_kv(ll, "mta_sts", "%s (id %s)", mta_sts_mode_name(c->sts.policy.mode), c->sts.id);
    }
}

void
smtpc_log_tls(const struct smtpc *c, struct log_line *ll)
{
    const struct conn_tls_info *i = &c->tls_info;
    if (c->tls_on) {
        log_kv(ll, "tls", "%s", i->version);
        log_kv(ll, "cipher", "%s", i->cipher);
        if (i->verified)
            log_kv(ll, "verify", "ok");
        else
            log_kv(ll, "verify", "fail (%s)", i->verify);
        log_kv(ll, "resumed", "%s", i->resumed ? "yes" : "no");
    }
    smtpc_log_sts(c, ll);
    enum dane_status st;
    if (!smtpc_dane_known(c, &st))
        return;
    if (st == DANE_SECURE && c->tls_on && i->verified)
        log_kv(ll, "dane", "verified");
    else if (st == DANE_SECURE && c->tls_on)
        log_kv(ll, "dane", "failed (%s)", i->verify);
    else
        log_kv(ll, "dane", "%s (%s)", dane_status_name(st), c->dane_detail);
}

bool
smtpc_server_has_dsn(const struct smtpc *c)
{
    return c->ext.dsn;
}

unsigned
smtpc_transactions(const struct smtpc *c)
{
    return c->transactions;
}

void
smtpc_quit(struct smtpc *c)
{
    switch (c->state) {
    case ST_READY:
    case ST_DONE:
        smtpc_enter(c, ST_QUIT);
        return;
    case ST_RSET:
        c->quit_skip = 1; /* RSET's reply comes first (pipelined QUIT, RFC 2920) */
        smtpc_enter(c, ST_QUIT);
        return;
    case ST_QUIT:
    case ST_CLOSING:
        return;
    default:
        smtpc_abort(c);
        return;
    }
}

void
smtpc_abort(struct smtpc *c)
{
    c->aborted = true;
    if (c->state == ST_CLOSING)
        return;
    smtpc_enter(c, ST_CLOSING);
}
