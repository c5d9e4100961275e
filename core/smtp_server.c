/*
 * smtp_server — server side of SMTP: one session per client connection.
 *
 * A session reads command lines from its conn's input buffer, dispatches
 * them through a command table (sequence check → syntax via smtp_parse →
 * policy → effect → reply), stages message content in memory (bounded by
 * the listener's max_message_size) and hands the finished message to the
 * spool. The 250 for DATA/BDAT LAST is sent only from the spool's commit
 * callback (persist, then reply). While a commit is pending the session
 * stops parsing; pipelined input waits in the conn buffer and is resumed
 * afterwards. Replies are flushed when no complete command is left in the
 * input or when the session blocks (RFC 2920 section 3.1).
 *
 * End of data is only <CRLF>.<CRLF>; a message holding any bare CR or bare
 * LF is rejected with 554 5.6.0 after its real end (SMTP smuggling, see
 * README "SMTP smuggling").
 *
 * XBIND (petrel's private extension, README "XBIND"): a client allowed to
 * use it (relay.clients, or an authenticated session once AUTH exists)
 * chooses the source address and EHLO name its mail is delivered from, for
 * the session (XBIND command, kept across RSET, cleared by XBIND RESET and
 * EHLO/HELO), for one transaction (MAIL parameter XBIND=) or for one message
 * (X-Petrel-Bind header, always removed from the stored content). Precedence:
 * MAIL parameter > XBIND command > header. The effective choice is checked
 * with source_check_override() and stored in the spool envelope.
 *
 * TLS (RFC 3207, RFC 8314): on a `tls: starttls` listener with a usable
 * certificate EHLO offers STARTTLS; its 220 is flushed, every byte the
 * client sent after the command line is discarded (command injection,
 * CVE-2011-0411), conn_start_tls() runs the handshake (ST_TLS: nothing is
 * parsed) and the session restarts from scratch: no EHLO name, no
 * transaction, no XBIND (RFC 3207 4.2), STARTTLS no longer offered. On a
 * `tls: implicit` listener the handshake comes first and the banner after
 * it. The server context is loaded once, in smtpd_server_new(). The
 * Received header then says ESMTPS (UTF8ESMTPS) with a Postfix-like
 * "(using TLSv1.3 with cipher … (256/256 bits))" comment.
 *
 * Ownership: the session owns its conn (closed when the session ends) and
 * its transaction. It is freed once the conn reported CONN_EV_CLOSED and no
 * spool commit is pending (refcount).
 */
#include "smtp_server.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>

#include "auth.h"
#include "buf.h"
#include "conn.h"
#include "hooks.h"
#include "log.h"
#include "smtp_parse.h"
#include "source.h"
#include "spool.h"
#include "tls.h"
#include "util.h"

enum smtpd_state {
    ST_GREETING,  /* banner delayed (greet_delay): the client must stay silent */
    ST_CONNECTED, /* banner sent, no HELO/EHLO yet */
    ST_HELO,      /* greeted, no transaction */
    ST_MAIL,      /* MAIL accepted, no recipient yet */
    ST_RCPT,      /* at least one recipient */
    ST_DATA,      /* reading DATA content */
    ST_BDAT,      /* reading a BDAT chunk */
    ST_QUIT,      /* closing */
    ST_TLS,       /* TLS handshake (implicit TLS, or after STARTTLS's 220): no parsing */
    ST_AUTH,      /* AUTH exchange: the next line answers a 334 challenge */
};

#define ST_BIT(s) (1u << (s))
#define ST_ANY_CMD (ST_BIT(ST_CONNECTED) | ST_BIT(ST_HELO) | ST_BIT(ST_MAIL) | ST_BIT(ST_RCPT))

/* A source override (XBIND): ip normalized, "" = none; hostname never ""
 * when ip is set (the client's, or source_hostname_for()'s default). */
struct smtpd_bind {
    char ip[SOURCE_IP_SIZE];
    char hostname[SMTP_HOSTNAME_MAX + 1];
};

struct smtpd_rcpt {
    char *addr;              /* owned */
    char *orcpt;             /* owned or NULL: "type;address" */
    unsigned notify;
};

struct smtpd_txn {
    char qid[SPOOL_QID_SIZE];
    char *sender;                    /* owned; "" for <> */
    struct smtp_mail_params params;
    struct smtpd_rcpt *rcpts;        /* owned */
    size_t nrcpts;
    size_t rcpts_cap;
    struct buf content;              /* owned: message as it will be stored */
    uint64_t size;                   /* bytes received (counted even when discarded) */
    bool too_big;
    bool bdat;                       /* BDAT used in this transaction */
    const struct reply *bdat_error;  /* failure to repeat for the remaining chunks */
    uint64_t bdat_left;              /* bytes of the current chunk still to read */
    bool bdat_last;
    bool at_bol;                     /* DATA: at the beginning of a line */
    int bdat_return;                 /* enum smtpd_state to return to after a chunk */
    uint64_t stored_size;            /* Received header + content, as spooled */
    struct smtpd_bind xbind_param;   /* MAIL XBIND=, this transaction only */
    struct smtpd_bind bind;          /* effective override, as spooled (for the log) */
    bool discard;                    /* a policy said DISCARD: 250, then drop */
    bool quarantine;                 /* stored held (hooks said QUARANTINE) */
};

/* A command waiting for the hooks (Lua, milters, plugins): what it needs
 * to finish once they answered. */
struct smtpd_pending {
    char helo[SMTP_HOSTNAME_MAX + 1];
    bool esmtp;
    char *addr;                      /* owned: MAIL / RCPT address */
    struct smtp_mail_params mail;
    struct smtpd_bind bind;
    struct smtp_rcpt_params rcpt;
    char params[1024];               /* MAIL's ESMTP parameters, for the hooks */
};

struct smtpd_session {
    struct smtpd_server *srv;            /* borrowed, outlives sessions */
    const struct listener_config *lc;    /* borrowed from srv->cfg */
    struct conn *conn;                   /* owned; NULL once closed */
    struct smtpd_session *prev, *next;   /* srv->sessions list */
    smtpd_session_end_cb *end_cb;
    void *end_arg;
    uint64_t id;
    int refs;                            /* conn + pending commits */
    enum smtpd_state state;
    bool esmtp;
    bool blocked;                        /* waiting for the spool; do not parse */
    bool skipping;                       /* discarding an over-long command line */
    bool quitting;                       /* close after the output drains */
    bool goodbye_sent;
    bool authenticated;                  /* AUTH succeeded: may relay and use XBIND */
    char auth_user[AUTH_USER_MAX + 1];   /* the authenticated user, "" if none */
    enum auth_mech auth_mech;
    struct auth_sasl sasl;               /* the AUTH exchange in progress */
    struct auth_verify *verify;          /* pending password check (holds a ref), or NULL */
    int auth_return;                     /* enum smtpd_state to return to after AUTH */
    bool tls;                            /* the TLS handshake finished: tls_info holds it */
    struct conn_tls_info tls_info;
    char helo[SMTP_HOSTNAME_MAX + 1];
    char client[80];                       /* "[ip]:port" for logs */
    struct smtpd_bind xbind;             /* XBIND command: every transaction until
                                            XBIND RESET or EHLO/HELO (not RSET) */
    unsigned errors;
    unsigned counts[SMTP_XBIND + 1];     /* per verb, for the disconnect line */
    unsigned unknown_count;
    struct smtpd_txn txn;
    struct hook_session *hooks;          /* owned or NULL: nothing hooks this session */
    bool hook_wait;                      /* blocked on a hook stage (holds a ref) */
    bool connect_checked;                /* the connect hook ran */
    struct smtpd_pending pend;
};

struct smtpd_server {
    struct petrel_config *cfg;   /* owned reference */
    struct spool *spool;         /* borrowed */
    struct tls_ctx *tls;         /* owned reference; NULL: no certificate, or it failed */
    char *tls_error;             /* owned: why the certificate did not load, or NULL */
    struct smtpd_session *sessions;
    size_t nsessions;
    uint64_t next_id;
    bool shutting_down;
    smtpd_queued_cb *queued_cb;  /* may be NULL */
    void *queued_arg;
    struct hooks *hooks;         /* borrowed or NULL: Lua, milters, plugins */
    const struct auth_db *auth_db;        /* borrowed or NULL: auth.users_file */
    struct auth_verifier *auth_verifier;  /* borrowed or NULL */
    struct auth_limiter *auth_limiter;    /* borrowed or NULL */
};

static void smtpd_process(struct smtpd_session *s);
static void smtpd_on_conn(struct conn *c, enum conn_event ev, int status, void *arg);
static void smtpd_send_banner(struct smtpd_session *s);
static void smtpd_greet(struct smtpd_session *s);

/* ---- server ---------------------------------------------------------- */

/* Loads the certificate(s) when tls.cert is set, and says at start-up what
 * TLS the listeners get. */
static void
smtpd_server_tls_init(struct smtpd_server *srv)
{
    const struct petrel_config *cfg = srv->cfg;
    size_t nstarttls = 0, nimplicit = 0;
    for (size_t i = 0; i < cfg->nlisteners; i++) {
        if (cfg->listeners[i].tls == LISTENER_TLS_STARTTLS)
            nstarttls++;
        else if (cfg->listeners[i].tls == LISTENER_TLS_IMPLICIT)
            nimplicit++;
    }
    if (cfg->tls.cert == NULL) {
        if (nstarttls + nimplicit == 0) /* config refuses TLS listeners without one */
            log_msg(LOG_INFO, NULL, "TLS: no certificate configured; STARTTLS not offered");
        return;
    }
    srv->tls = tls_server_new(cfg, &srv->tls_error);
    if (srv->tls == NULL) {
        log_msg(LOG_ERR, NULL,
                "TLS: %s; STARTTLS is not offered and implicit-TLS listeners close "
                "connections",
                srv->tls_error);
        return;
    }
    log_msg(LOG_INFO, NULL,
            "TLS: certificate %s loaded (%zu more by SNI); %zu STARTTLS and %zu implicit-TLS "
            "listeners",
            cfg->tls.cert, cfg->tls.ncertificates, nstarttls, nimplicit);
}

struct smtpd_server *
smtpd_server_new(struct petrel_config *cfg, struct spool *spool)
{
    struct smtpd_server *srv = xcalloc(1, sizeof(*srv));
    srv->cfg = config_ref(cfg);
    srv->spool = spool;
    srv->next_id = 1;
    smtpd_server_tls_init(srv);
    return srv;
}

const char *
smtpd_server_tls_error(const struct smtpd_server *srv)
{
    return srv->tls_error;
}

void
smtpd_server_free(struct smtpd_server *srv)
{
    if (srv == NULL)
        return;
    if (srv->nsessions != 0)
        PANIC("smtpd_server_free with %zu live sessions", srv->nsessions);
    tls_unref(srv->tls);
    free(srv->tls_error);
    config_unref(srv->cfg);
    free(srv);
}

void
smtpd_server_set_auth(struct smtpd_server *srv, const struct auth_db *db,
                      struct auth_verifier *av, struct auth_limiter *lim)
{
    srv->auth_db = db;
    srv->auth_verifier = av;
    srv->auth_limiter = lim;
}

void
smtpd_server_set_hooks(struct smtpd_server *srv, struct hooks *h)
{
    srv->hooks = h;
}

void
smtpd_server_on_queued(struct smtpd_server *srv, smtpd_queued_cb *cb, void *arg)
{
    srv->queued_cb = cb;
    srv->queued_arg = arg;
}

size_t
smtpd_server_sessions(const struct smtpd_server *srv)
{
    return srv->nsessions;
}

/* ---- output ---------------------------------------------------------- */

static void
smtpd_trace_out(struct smtpd_session *s, const char *p, size_t n)
{
    if (!log_enabled(LOG_DEBUG))
        return;
    struct log_line ll;
    log_begin(&ll, LOG_DEBUG, s->txn.qid[0] ? s->txn.qid : NULL);
    log_event(&ll, ">>>");
    log_kv(&ll, "session", "%" PRIu64, s->id);
    log_kv_vis(&ll, "data", p, n >= 2 ? n - 2 : n);
    log_end(&ll);
}

static void
smtpd_write_line(struct smtpd_session *s, const char *p, size_t n)
{
    if (s->conn == NULL)
        return;
    smtpd_trace_out(s, p, n);
    conn_write(s->conn, p, n);
}

/* Sends "code esc text" (or "code text" for replies without an enhanced
 * code, i.e. 354). Counts error replies. */
static void
smtpd_reply_text(struct smtpd_session *s, int code, const char *esc, const char *text)
{
    char line[1024];
    int n;
    if (esc && esc[0])
        n = snprintf(line, sizeof(line), "%d %s %s\r\n", code, esc, text);
    else
        n = snprintf(line, sizeof(line), "%d %s\r\n", code, text);
    if (n < 0)
        return;
    if ((size_t)n >= sizeof(line)) {
        n = sizeof(line) - 1;
        line[n - 2] = '\r';
        line[n - 1] = '\n';
    }
    smtpd_write_line(s, line, (size_t)n);
    if (code >= 400)
        s->errors++;
}

static void
smtpd_reply(struct smtpd_session *s, const struct reply *r)
{
    smtpd_reply_text(s, r->code, r->esc, r->text);
}

/* ---- logging ---------------------------------------------------------- */

static void
smtpd_log_begin(struct smtpd_session *s, struct log_line *ll, enum log_level lvl,
                const char *event, bool with_qid)
{
    log_begin(ll, lvl, with_qid && s->txn.qid[0] ? s->txn.qid : NULL);
    log_event(ll, event);
    log_kv(ll, "session", "%" PRIu64, s->id);
}

/* Logs an envelope address as <addr>, escaped. */
static void
smtpd_log_addr(struct log_line *ll, const char *name, const char *addr)
{
    char vis[600];
    str_vis(vis, sizeof(vis), addr, strlen(addr));
    log_kv(ll, name, "<%s>", vis);
}

static void
smtpd_log_reject(struct smtpd_session *s, const char *cmd, const struct reply *r,
                 const char *rcpt)
{
    struct log_line ll;
    smtpd_log_begin(s, &ll, LOG_INFO, "reject", true);
    log_kv(&ll, "cmd", "%s", cmd);
    log_kv(&ll, "client", "%s", s->client);
    if (r->esc[0])
        log_kv(&ll, "reply", "%d %s %s", r->code, r->esc, r->text);
    else
        log_kv(&ll, "reply", "%d %s", r->code, r->text);
    if (s->txn.sender)
        smtpd_log_addr(&ll, "from", s->txn.sender);
    if (rcpt)
        smtpd_log_addr(&ll, "to", rcpt);
    if (s->helo[0])
        smtpd_log_addr(&ll, "helo", s->helo);
    log_end(&ll);
}

static void
smtpd_reject(struct smtpd_session *s, const char *cmd, const struct reply *r, const char *rcpt)
{
    smtpd_log_reject(s, cmd, r, rcpt);
    smtpd_reply(s, r);
}

/* ---- transaction ----------------------------------------------------- */

static void
smtpd_txn_reset(struct smtpd_session *s)
{
    struct smtpd_txn *t = &s->txn;
    free(t->sender);
    for (size_t i = 0; i < t->nrcpts; i++) {
        free(t->rcpts[i].addr);
        free(t->rcpts[i].orcpt);
    }
    free(t->rcpts);
    buf_reset(&t->content);
    memset(t, 0, sizeof(*t));
    if (s->hooks != NULL && !hook_pending(s->hooks)) {
        hook_abort(s->hooks); /* milters inside a transaction get ABORT */
        hook_session_set(s->hooks, "i", NULL);
    }
    if (s->state == ST_MAIL || s->state == ST_RCPT || s->state == ST_DATA
        || s->state == ST_BDAT)
        s->state = ST_HELO;
}

static bool
smtpd_in_txn(const struct smtpd_session *s)
{
    return s->txn.sender != NULL;
}

/* ---- lifecycle ------------------------------------------------------- */

static void
smtpd_session_unref(struct smtpd_session *s)
{
    if (--s->refs > 0)
        return;
    struct smtpd_server *srv = s->srv;
    if (s->prev)
        s->prev->next = s->next;
    else
        srv->sessions = s->next;
    if (s->next)
        s->next->prev = s->prev;
    srv->nsessions--;
    hook_session_free(s->hooks);
    s->hooks = NULL;
    free(s->pend.addr);
    smtpd_txn_reset(s);
    smtpd_session_end_cb *cb = s->end_cb;
    void *arg = s->end_arg;
    free(s);
    if (cb)
        cb(arg);
}

static void
smtpd_log_disconnect(struct smtpd_session *s)
{
    static const char *const names[] = {
        [SMTP_EHLO] = "ehlo", [SMTP_HELO] = "helo", [SMTP_MAIL] = "mail",
        [SMTP_RCPT] = "rcpt", [SMTP_DATA] = "data", [SMTP_BDAT] = "bdat",
        [SMTP_RSET] = "rset", [SMTP_NOOP] = "noop", [SMTP_QUIT] = "quit",
        [SMTP_VRFY] = "vrfy", [SMTP_EXPN] = "expn", [SMTP_HELP] = "help",
        [SMTP_STARTTLS] = "starttls", [SMTP_AUTH] = "auth", [SMTP_XBIND] = "xbind",
    };
    char counts[512];
    size_t o = 0;
    counts[0] = '\0';
    for (size_t v = 1; v < ARRAY_SIZE(names); v++) {
        if (s->counts[v] == 0 || names[v] == NULL)
            continue;
        int n = snprintf(counts + o, sizeof(counts) - o, "%s%s=%u", o ? " " : "", names[v],
                         s->counts[v]);
        if (n < 0 || (size_t)n >= sizeof(counts) - o)
            break;
        o += (size_t)n;
    }
    if (s->unknown_count && o < sizeof(counts)) {
        int n = snprintf(counts + o, sizeof(counts) - o, "%sunknown=%u", o ? " " : "",
                         s->unknown_count);
        if (n > 0 && (size_t)n < sizeof(counts) - o)
            o += (size_t)n;
    }
    struct log_line ll;
    smtpd_log_begin(s, &ll, LOG_INFO, "disconnect", false);
    log_kv(&ll, "client", "%s", s->client);
    log_kv(&ll, "counts", "%s", counts);
    log_end(&ll);
}

/* Sends the pending output and closes the connection once it drained. */
static void
smtpd_close(struct smtpd_session *s)
{
    if (s->state == ST_QUIT || s->conn == NULL)
        return;
    s->state = ST_QUIT;
    if (s->verify != NULL) {
        auth_verify_cancel(s->verify);
        s->verify = NULL;
        s->blocked = false;
        s->refs--;
    }
    auth_sasl_reset(&s->sasl);
    if (s->hook_wait) {
        /* the answer will not be wanted: drop the stage (no callback) */
        hook_session_cancel(s->hooks);
        s->hook_wait = false;
        s->blocked = false;
        s->refs--; /* the conn still holds its own */
    }
    smtpd_log_disconnect(s);
    conn_close(s->conn);
}

static void
smtpd_on_conn(struct conn *c, enum conn_event ev, int status, void *arg)
{
    struct smtpd_session *s = arg;
    (void)c;
    switch (ev) {
    case CONN_EV_DATA:
        if (s->state == ST_GREETING) {
            smtpd_reject(s, "CONNECT", &R_EARLY_TALKER, NULL);
            smtpd_close(s);
            return;
        }
        conn_set_timeout(s->conn, (s->state == ST_DATA || s->state == ST_BDAT)
                                      ? s->lc->data_timeout_ms
                                      : s->lc->command_timeout_ms);
        smtpd_process(s);
        return;
    case CONN_EV_TIMEOUT:
        if (s->hook_wait || s->verify != NULL) {
            conn_set_timeout(s->conn, s->lc->command_timeout_ms);
            return; /* a policy, filter or password check is slow; not the client */
        }
        if (s->state == ST_GREETING) {
            if (conn_peer_sent_data(s->conn)) {
                smtpd_reject(s, "CONNECT", &R_EARLY_TALKER, NULL);
                smtpd_close(s);
                return;
            }
            s->state = ST_CONNECTED;
            smtpd_send_banner(s);
            conn_set_timeout(s->conn, s->lc->command_timeout_ms);
            return;
        }
        if (s->blocked) {
            conn_set_timeout(s->conn, s->lc->command_timeout_ms);
            return; /* our own spool is slow; the client is not to blame */
        }
        {
            struct log_line ll;
            smtpd_log_begin(s, &ll, LOG_INFO, "timeout", true);
            log_kv(&ll, "client", "%s", s->client);
            log_kv(&ll, "state", "%d", (int)s->state);
            log_end(&ll);
        }
        if (s->state != ST_TLS) /* mid-handshake there is no channel for a reply */
            smtpd_reply(s, &R_TIMEOUT);
        smtpd_close(s);
        return;
    case CONN_EV_EOF:
    case CONN_EV_ERROR:
        if (ev == CONN_EV_ERROR && log_enabled(LOG_DEBUG))
            log_msg(LOG_DEBUG, NULL, "session=%" PRIu64 " connection error %d", s->id, status);
        if (s->state != ST_QUIT && smtpd_in_txn(s) && !s->blocked) {
            struct log_line ll;
            smtpd_log_begin(s, &ll, LOG_INFO, "lost connection", true);
            log_kv(&ll, "client", "%s", s->client);
            log_end(&ll);
        }
        smtpd_close(s);
        return;
    case CONN_EV_DRAINED:
    case CONN_EV_CONNECTED: /* inbound conns never connect */
        return;
    case CONN_EV_CLOSED:
        s->conn = NULL;
        smtpd_session_unref(s);
        return;
    }
}

/* The TLS handshake finished (implicit TLS, or after STARTTLS's 220). */
static void
smtpd_on_tls(struct conn *c, int status, void *arg)
{
    struct smtpd_session *s = arg;
    struct log_line ll;
    if (status < 0) {
        smtpd_log_begin(s, &ll, LOG_INFO, "tls handshake failed", false);
        log_kv(&ll, "client", "%s", s->client);
        const char *why = conn_tls_error(c);
        log_kv(&ll, "reason", "%s", why[0] ? why : conn_strerror(status));
        log_end(&ll);
        smtpd_close(s);
        return;
    }
    s->tls = true;
    conn_tls_info(c, &s->tls_info);
    if (s->hooks != NULL) {
        char bits[16];
        snprintf(bits, sizeof(bits), "%d", s->tls_info.bits);
        hook_session_set(s->hooks, "{tls_version}", s->tls_info.version);
        hook_session_set(s->hooks, "{cipher}", s->tls_info.cipher);
        hook_session_set(s->hooks, "{cipher_bits}", bits);
    }
    smtpd_log_begin(s, &ll, LOG_INFO,
                    s->lc->tls == LISTENER_TLS_IMPLICIT ? "tls established" : "starttls", false);
    log_kv(&ll, "client", "%s", s->client);
    log_kv(&ll, "tls", "%s", s->tls_info.version);
    log_kv(&ll, "cipher", "%s (%d/%d bits)", s->tls_info.cipher, s->tls_info.bits,
           s->tls_info.alg_bits);
    if (s->tls_info.sni[0])
        log_kv_vis(&ll, "sni", s->tls_info.sni, strlen(s->tls_info.sni));
    if (s->tls_info.resumed)
        log_kv(&ll, "resumed", "yes");
    log_end(&ll);
    /* RFC 3207 4.2: forget everything the client said before */
    smtpd_txn_reset(s);
    s->helo[0] = '\0';
    s->esmtp = false;
    memset(&s->xbind, 0, sizeof(s->xbind));
    s->authenticated = false;
    s->auth_user[0] = '\0';
    if (s->lc->tls == LISTENER_TLS_IMPLICIT) {
        smtpd_greet(s); /* RFC 8314 3.3: the banner comes under TLS */
        return;
    }
    s->state = ST_CONNECTED;
    conn_set_timeout(c, s->lc->command_timeout_ms);
}

/* Begins TLS on the session's conn; false (and the session closing) if
 * the conn refused. */
static bool
smtpd_start_tls(struct smtpd_session *s)
{
    int r = conn_start_tls(s->conn, s->srv->tls, true, NULL, smtpd_on_tls, s);
    if (r < 0) {
        struct log_line ll;
        smtpd_log_begin(s, &ll, LOG_WARNING, "tls handshake failed", false);
        log_kv(&ll, "client", "%s", s->client);
        log_kv(&ll, "reason", "%s", conn_tls_error(s->conn)[0] ? conn_tls_error(s->conn)
                                                               : conn_strerror(r));
        log_end(&ll);
        smtpd_close(s);
        return false;
    }
    s->state = ST_TLS;
    conn_set_timeout(s->conn, s->lc->command_timeout_ms);
    return true;
}

static void
smtpd_send_banner(struct smtpd_session *s)
{
    char line[512];
    int n = snprintf(line, sizeof(line), "220 %s ESMTP petrel\r\n", s->srv->cfg->hostname);
    if (n > 0 && (size_t)n < sizeof(line))
        smtpd_write_line(s, line, (size_t)n);
    conn_flush(s->conn);
}

void
smtpd_session_start(struct smtpd_server *srv, const struct listener_config *lc, struct conn *c,
                    const struct reply *refuse, smtpd_session_end_cb *end_cb, void *end_arg)
{
    struct smtpd_session *s = xcalloc(1, sizeof(*s));
    s->srv = srv;
    s->lc = lc;
    s->conn = c;
    s->end_cb = end_cb;
    s->end_arg = end_arg;
    s->id = srv->next_id++;
    s->refs = 1;
    s->next = srv->sessions;
    if (srv->sessions)
        srv->sessions->prev = s;
    srv->sessions = s;
    srv->nsessions++;
    const char *ip = conn_peer_ip(c);
    snprintf(s->client, sizeof(s->client), "[%s]:%d", ip, conn_peer_port(c));
    conn_set_callback(c, smtpd_on_conn, s);
    /* pipelined input beyond a few lines waits in the kernel, not in memory */
    conn_set_input_limit(c, (size_t)lc->max_line_length * 4 + 65536);

    struct log_line ll;
    smtpd_log_begin(s, &ll, LOG_INFO, "connect", false);
    log_kv(&ll, "client", "%s", s->client);
    log_kv(&ll, "listener", "%s", lc->name);
    log_end(&ll);

    struct hook_conn hc = {
        .session_id = s->id,
        .family = conn_peer_addr(c) ? conn_peer_addr(c)->sa_family : AF_UNSPEC,
        .client_ip = ip,
        .client_port = conn_peer_port(c),
        .local_ip = conn_local_ip(c),
        .local_port = conn_local_port(c),
    };
    bool implicit = lc->tls == LISTENER_TLS_IMPLICIT;
    if (refuse == NULL && srv->shutting_down)
        refuse = &R_SHUTDOWN;
    if (refuse != NULL) {
        /* an implicit-TLS client cannot read a plaintext reply: just close */
        if (implicit)
            smtpd_log_reject(s, "CONNECT", refuse, NULL);
        else
            smtpd_reject(s, "CONNECT", refuse, NULL);
        smtpd_close(s);
        return;
    }
    s->hooks = hook_session_new(srv->hooks, lc, &hc);
    if (implicit) {
        if (srv->tls == NULL) {
            smtpd_log_begin(s, &ll, LOG_WARNING, "tls unavailable", false);
            log_kv(&ll, "client", "%s", s->client);
            log_kv(&ll, "reason", "%s", srv->tls_error ? srv->tls_error : "no certificate");
            log_end(&ll);
            smtpd_close(s);
            return;
        }
        smtpd_start_tls(s); /* RFC 8314 3.3: TLS first; the banner follows */
        return;
    }
    smtpd_greet(s);
}

/* ---- hooks (Lua, milters, plugins: hooks.h) ------------------------------ */

/* The session waits for a hook stage: nothing is parsed meanwhile. */
static void
smtpd_hook_wait(struct smtpd_session *s)
{
    s->blocked = true;
    s->hook_wait = true;
    s->refs++;
    conn_set_timeout(s->conn, s->lc->command_timeout_ms);
}

/* The stage answered (the session is alive: smtpd_close cancels a pending
 * stage, so answers only reach open sessions). */
static void
smtpd_hook_end(struct smtpd_session *s)
{
    s->blocked = false;
    s->hook_wait = false;
    s->refs--;
}

/* Goes on with pipelined input after a hook answered. */
static void
smtpd_hook_resume(struct smtpd_session *s)
{
    if (s->conn == NULL || s->state == ST_QUIT)
        return;
    smtpd_process(s);
}

static bool
smtpd_verdict_refuses(const struct verdict *v)
{
    return v->kind == VERDICT_REJECT || v->kind == VERDICT_TEMPFAIL;
}

/* Sends a refusing verdict's reply (a filter's multi-line reply as it
 * wrote it) and logs it; a 421 closes the session. */
static void
smtpd_reply_verdict(struct smtpd_session *s, const char *cmd, const struct verdict *v,
                    const char *rcpt)
{
    smtpd_log_reject(s, cmd, &v->reply, rcpt);
    if (v->raw != NULL) {
        struct buf b;
        buf_init(&b);
        buf_append_str(&b, v->raw);
        buf_append_str(&b, "\r\n");
        smtpd_write_line(s, buf_ptr(&b), b.len);
        buf_reset(&b);
        if (v->reply.code >= 400)
            s->errors++;
    } else {
        smtpd_reply(s, &v->reply);
    }
    if (v->reply.code == 421)
        smtpd_close(s);
}

static void
smtpd_on_hook_connect(struct hook_session *hs, const struct verdict *v, void *arg)
{
    (void)hs;
    struct smtpd_session *s = arg;
    smtpd_hook_end(s);
    if (smtpd_verdict_refuses(v)) {
        /* refused at connect: the reply takes the banner's place */
        smtpd_reply_verdict(s, "CONNECT", v, NULL);
        smtpd_close(s);
        return;
    }
    smtpd_greet(s);
}

/* The banner, unless greet_delay holds it back; refuses early talkers. */
static void
smtpd_greet(struct smtpd_session *s)
{
    const struct listener_config *lc = s->lc;
    if (!s->connect_checked) {
        s->connect_checked = true;
        if (hook_wants(s->hooks, PLUGIN_HOOK_CONNECT)) {
            smtpd_hook_wait(s);
            hook_connect(s->hooks, smtpd_on_hook_connect, s);
            return;
        }
    }
    if (lc->greet_delay_ms > 0) {
        s->state = ST_GREETING;
        conn_set_timeout(s->conn, lc->greet_delay_ms);
        return;
    }
    if (conn_peer_sent_data(s->conn)) {
        /* bytes before our banner was even sent: an early talker */
        smtpd_reject(s, "CONNECT", &R_EARLY_TALKER, NULL);
        smtpd_close(s);
        return;
    }
    s->state = ST_CONNECTED;
    smtpd_send_banner(s);
    conn_set_timeout(s->conn, lc->command_timeout_ms);
}

/* ---- XBIND ----------------------------------------------------------- */

/* Who may choose the source: relay clients and (issue 8) authenticated
 * sessions. Decides both the EHLO keyword and every use of the extension. */
static bool
smtpd_xbind_allowed(const struct smtpd_session *s)
{
    if (s->authenticated)
        return true;
    return s->conn != NULL
           && cidr_list_match(&s->srv->cfg->relay.clients, conn_peer_addr(s->conn));
}

/* Checks an override the client asked for (ip already syntax-checked by
 * smtp_parse; hostname "" = the default for that address) and fills out.
 * Returns NULL, or the refusal's reason (out->ip then holds the normalized
 * address, for the reply text, and out->hostname is ""). */
static const char *
smtpd_xbind_resolve(const struct smtpd_session *s, const char *ip, const char *hostname,
                    struct smtpd_bind *out)
{
    const struct petrel_config *cfg = s->srv->cfg;
    memset(out, 0, sizeof(*out));
    unsigned char bin[sizeof(struct in6_addr)];
    int af = strchr(ip, ':') != NULL ? AF_INET6 : AF_INET;
    /* one spelling per address, as config stores source_ips and hostnames */
    if (inet_pton(af, ip, bin) != 1 || inet_ntop(af, bin, out->ip, sizeof(out->ip)) == NULL) {
        if (!str_copy(out->ip, sizeof(out->ip), ip))
            out->ip[0] = '\0';
        return "not an IP address";
    }
    const char *why = source_check_override(cfg, out->ip);
    if (why != NULL)
        return why;
    /* TODO(issue 6): the Lua xbind hook (conn, ip, hostname) may refuse here */
    const char *h = hostname[0] != '\0' ? hostname : source_hostname_for(cfg, out->ip);
    if (!str_copy(out->hostname, sizeof(out->hostname), h))
        PANIC("XBIND hostname longer than %d bytes", SMTP_HOSTNAME_MAX); /* config checks it */
    return NULL;
}

/* The 550 5.7.1 for a refused address: "<ip>: <reason>". */
static void
smtpd_xbind_refuse(struct smtpd_session *s, const char *cmd, const char *ip, const char *why)
{
    char text[SOURCE_IP_SIZE + 128];
    snprintf(text, sizeof(text), "%s: %s", ip, why);
    const struct reply r = { 550, "5.7.1", text };
    smtpd_reject(s, cmd, &r, NULL);
}

static void
smtpd_log_xbind(struct log_line *ll, const struct smtpd_bind *b)
{
    log_kv(ll, "xbind", "%s (%s)", b->ip, b->hostname);
}

/* True if the header field starting at p (n bytes, through its last CRLF)
 * is named X-Petrel-Bind, in any case; the colon may follow white space
 * (obs-optional, RFC 5322 4.5). *value is what follows the colon. */
static bool
smtpd_is_bind_field(const char *p, size_t n, struct span *value)
{
    static const char name[] = "X-Petrel-Bind";
    size_t i = sizeof(name) - 1;
    if (n < i || ascii_ncasecmp(p, name, i) != 0)
        return false;
    while (i < n && (p[i] == ' ' || p[i] == '\t'))
        i++;
    if (i == n || p[i] != ':')
        return false;
    *value = (struct span){ p + i + 1, n - i - 1 };
    return true;
}

/* Unfolds a field body (RFC 5322 2.2.3: CRLF before white space goes, the
 * white space stays; HTAB counts as a space for the XBIND grammar) and trims
 * it into out. False if it does not fit. */
static bool
smtpd_unfold_value(struct span v, char *out, size_t size)
{
    size_t o = 0;
    for (size_t i = 0; i < v.len; i++) {
        char c = v.p[i];
        if (c == '\r' || c == '\n')
            continue;
        if (c == '\t')
            c = ' ';
        if (c == ' ' && o == 0)
            continue;
        if (o + 1 >= size)
            return false;
        out[o++] = c;
    }
    while (o > 0 && out[o - 1] == ' ')
        o--;
    out[o] = '\0';
    return true;
}

/* Removes every X-Petrel-Bind field (continuation lines included) from the
 * header section of content, leaving every other byte as it was. The first
 * field's unfolded value goes into first (*has_first; *first_ok false if it
 * did not fit). Returns the number of fields removed. content has no bare
 * CR or LF (checked before). */
static size_t
smtpd_strip_bind_fields(struct buf *content, char *first, size_t first_size, bool *has_first,
                        bool *first_ok)
{
    const char *p = buf_ptr(content);
    size_t n = content->len;
    struct buf out;
    buf_init(&out); /* allocates nothing until a field is removed */
    size_t removed = 0;
    size_t copied = 0; /* bytes of p before this index are in out (once removed > 0) */
    size_t i = 0;
    *has_first = false;
    *first_ok = false;
    while (i < n) {
        const char *eol = memchr(p + i, '\n', n - i);
        size_t end = eol ? (size_t)(eol - p) + 1 : n;
        if (end - i == 2 && p[i] == '\r')
            break; /* the empty line: end of the header section */
        /* the field goes on while lines start with white space (folding) */
        while (end < n && (p[end] == ' ' || p[end] == '\t')) {
            eol = memchr(p + end, '\n', n - end);
            end = eol ? (size_t)(eol - p) + 1 : n;
        }
        struct span value;
        if (smtpd_is_bind_field(p + i, end - i, &value)) {
            if (!*has_first) {
                *has_first = true;
                *first_ok = smtpd_unfold_value(value, first, first_size);
            }
            removed++;
            buf_append(&out, p + copied, i - copied);
            copied = end;
        }
        i = end;
    }
    if (removed == 0)
        return 0;
    buf_append(&out, p + copied, n - copied);
    buf_reset(content);
    *content = out;
    return removed;
}

static void
smtpd_log_header_ignored(struct smtpd_session *s, const char *reason)
{
    struct log_line ll;
    smtpd_log_begin(s, &ll, LOG_INFO, "xbind header ignored", true);
    log_kv(&ll, "client", "%s", s->client);
    log_kv(&ll, "reason", "%s", reason);
    log_end(&ll);
}

/* End of message: strips X-Petrel-Bind from the content and decides the
 * override to store (MAIL parameter > XBIND command > header) in t->bind.
 * A header that cannot be used is logged and ignored, never a rejection. */
static bool
smtpd_xbind_decide(struct smtpd_session *s)
{
    struct smtpd_txn *t = &s->txn;
    char value[512];
    bool has_header;
    bool header_fits;
    smtpd_strip_bind_fields(&t->content, value, sizeof(value), &has_header, &header_fits);
    if (t->xbind_param.ip[0] != '\0')
        t->bind = t->xbind_param;
    else if (s->xbind.ip[0] != '\0')
        t->bind = s->xbind;
    else
        memset(&t->bind, 0, sizeof(t->bind));
    if (!has_header)
        return false;
    if (!smtpd_xbind_allowed(s)) {
        smtpd_log_header_ignored(s, R_XBIND_DENIED.text);
        return false;
    }
    if (t->xbind_param.ip[0] != '\0') {
        smtpd_log_header_ignored(s, "overridden by the MAIL XBIND parameter");
        return false;
    }
    if (s->xbind.ip[0] != '\0') {
        smtpd_log_header_ignored(s, "overridden by the XBIND command");
        return false;
    }
    if (!header_fits) {
        smtpd_log_header_ignored(s, "value too long");
        return false;
    }
    bool reset;
    char ip[SOURCE_IP_SIZE];
    char hostname[SMTP_HOSTNAME_MAX + 1];
    const struct reply *r = smtp_parse_xbind((struct span){ value, strlen(value) }, &reset, ip,
                                             sizeof(ip), hostname, sizeof(hostname));
    if (r != NULL || reset) {
        smtpd_log_header_ignored(s, reset ? "RESET is not valid in the header"
                                          : "bad syntax (want: ip [hostname])");
        return false;
    }
    struct smtpd_bind b;
    const char *why = smtpd_xbind_resolve(s, ip, hostname, &b);
    if (why != NULL) {
        char reason[SOURCE_IP_SIZE + 128];
        snprintf(reason, sizeof(reason), "%s: %s", b.ip, why);
        smtpd_log_header_ignored(s, reason);
        return false;
    }
    t->bind = b;
    return true;
}

/* ---- commands -------------------------------------------------------- */

/* STARTTLS is offered on starttls listeners with a loaded certificate,
 * until TLS is on. */
static bool
smtpd_starttls_offered(const struct smtpd_session *s)
{
    return s->lc->tls == LISTENER_TLS_STARTTLS && s->srv->tls != NULL && !s->tls;
}

/* AUTH is offered on listeners with auth optional/required, under TLS
 * (PLAIN and LOGIN send the password in clear) unless auth.allow_plaintext,
 * until the session has authenticated. */
static bool
smtpd_auth_offered(const struct smtpd_session *s)
{
    return s->lc->auth != LISTENER_AUTH_NONE && !s->authenticated
           && (s->tls || s->srv->cfg->auth.allow_plaintext);
}

static void smtpd_helo_ok(struct smtpd_session *s, const char *name, bool esmtp);
static void smtpd_on_hook_helo(struct hook_session *hs, const struct verdict *v, void *arg);

static void
smtpd_cmd_helo(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    char name[SMTP_HOSTNAME_MAX + 1];
    const struct reply *r = smtp_parse_helo(cmd->args, name, sizeof(name));
    if (r) {
        smtpd_reject(s, cmd->verb == SMTP_EHLO ? "EHLO" : "HELO", r, NULL);
        return;
    }
    smtpd_txn_reset(s); /* RFC 5321 4.1.4: EHLO resets the transaction */
    memset(&s->xbind, 0, sizeof(s->xbind)); /* ... and starts a new session: XBIND too */
    if (hook_wants(s->hooks, PLUGIN_HOOK_HELO)) {
        memcpy(s->pend.helo, name, sizeof(s->pend.helo));
        s->pend.esmtp = cmd->verb == SMTP_EHLO;
        smtpd_hook_wait(s);
        hook_helo(s->hooks, name, smtpd_on_hook_helo, s);
        return;
    }
    smtpd_helo_ok(s, name, cmd->verb == SMTP_EHLO);
}

static void
smtpd_on_hook_helo(struct hook_session *hs, const struct verdict *v, void *arg)
{
    (void)hs;
    struct smtpd_session *s = arg;
    smtpd_hook_end(s);
    if (smtpd_verdict_refuses(v))
        smtpd_reply_verdict(s, s->pend.esmtp ? "EHLO" : "HELO", v, NULL);
    else
        smtpd_helo_ok(s, s->pend.helo, s->pend.esmtp);
    smtpd_hook_resume(s);
}

/* HELO/EHLO accepted: the greeting (and the EHLO keywords). */
static void
smtpd_helo_ok(struct smtpd_session *s, const char *name, bool esmtp)
{
    if (!str_copy(s->helo, sizeof(s->helo), name))
        PANIC("helo name longer than its buffer");
    s->esmtp = esmtp;
    s->state = ST_HELO;
    const char *host = s->srv->cfg->hostname;
    if (!s->esmtp) {
        char line[512];
        int n = snprintf(line, sizeof(line), "250 %s\r\n", host);
        if (n > 0 && (size_t)n < sizeof(line))
            smtpd_write_line(s, line, (size_t)n);
        return;
    }
    struct buf b;
    buf_init(&b);
    buf_printf(&b, "250-%s\r\n", host);
    buf_append_str(&b, "250-PIPELINING\r\n");
    buf_printf(&b, "250-SIZE %" PRIu64 "\r\n", s->lc->max_message_size);
    buf_append_str(&b, "250-8BITMIME\r\n");
    buf_append_str(&b, "250-ENHANCEDSTATUSCODES\r\n");
    buf_append_str(&b, "250-SMTPUTF8\r\n");
    buf_append_str(&b, "250-CHUNKING\r\n");
    if (smtpd_starttls_offered(s))
        buf_append_str(&b, "250-STARTTLS\r\n");
    if (smtpd_auth_offered(s))
        buf_append_str(&b, "250-AUTH " AUTH_EHLO_MECHS "\r\n");
    if (smtpd_xbind_allowed(s))
        buf_append_str(&b, "250-XBIND\r\n");
    buf_append_str(&b, "250 DSN\r\n");
    smtpd_write_line(s, buf_ptr(&b), b.len);
    buf_reset(&b);
}

static void smtpd_mail_ok(struct smtpd_session *s, const char *addr,
                          const struct smtp_mail_params *p, const struct smtpd_bind *param);
static void smtpd_on_hook_mail(struct hook_session *hs, const struct verdict *v, void *arg);
static void smtpd_on_hook_mail_xbind(struct hook_session *hs, bool has_answer, bool allow,
                                     void *arg);

/* The ESMTP parameters after the path of MAIL FROM:/RCPT TO: args, as the
 * client wrote them ("" if none), for milters and policies. */
static void
smtpd_esmtp_params(struct span args, char *out, size_t size)
{
    size_t i = 0;
    while (i < args.len && args.p[i] == ' ')
        i++;
    if (i < args.len && args.p[i] == '<') {
        bool quoted = false;
        for (i++; i < args.len; i++) {
            if (args.p[i] == '\\' && i + 1 < args.len)
                i++;
            else if (args.p[i] == '"')
                quoted = !quoted;
            else if (args.p[i] == '>' && !quoted)
                break;
        }
        i++;
    } else {
        while (i < args.len && args.p[i] != ' ')
            i++;
    }
    while (i < args.len && args.p[i] == ' ')
        i++;
    size_t n = i < args.len ? args.len - i : 0;
    while (n > 0 && args.p[i + n - 1] == ' ')
        n--;
    if (n >= size)
        n = size - 1;
    memcpy(out, args.p + i, n);
    out[n] = '\0';
}

static void
smtpd_cmd_mail(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    if (s->state == ST_CONNECTED) {
        smtpd_reject(s, "MAIL", &R_BAD_SEQ_HELO, NULL);
        return;
    }
    if (smtpd_in_txn(s)) {
        smtpd_reject(s, "MAIL", &R_BAD_SEQ_NESTED, NULL);
        return;
    }
    if (s->srv->shutting_down) {
        smtpd_reject(s, "MAIL", &R_SHUTDOWN, NULL);
        smtpd_close(s);
        return;
    }
    if (!cmd->mail_from) {
        smtpd_reject(s, "MAIL", &R_MAIL_SYNTAX, NULL);
        return;
    }
    if (s->lc->auth == LISTENER_AUTH_REQUIRED && !s->authenticated) {
        smtpd_reject(s, "MAIL", &R_AUTH_REQUIRED, NULL);
        return;
    }
    char addr[SMTP_ADDR_SIZE];
    struct smtp_mail_params p;
    memset(&p, 0, sizeof(p));
    const struct reply *r = smtp_parse_mail(cmd->args, addr, sizeof(addr), &p);
    if (r == NULL && p.has_size && p.size > s->lc->max_message_size)
        r = &R_SIZE_EXCEEDED;
    if (r == NULL && p.has_xbind && !smtpd_xbind_allowed(s))
        r = &R_XBIND_DENIED;
    if (r) {
        smtpd_reject(s, "MAIL", r, NULL);
        return;
    }
    struct smtpd_bind param;
    memset(&param, 0, sizeof(param));
    if (p.has_xbind) {
        const char *why = smtpd_xbind_resolve(s, p.xbind_ip, p.xbind_hostname, &param);
        if (why != NULL) {
            smtpd_xbind_refuse(s, "MAIL", param.ip, why);
            return;
        }
    }
    bool xbind_hook = p.has_xbind && hook_wants(s->hooks, PLUGIN_HOOK_XBIND);
    if (xbind_hook || hook_wants(s->hooks, PLUGIN_HOOK_MAIL_FROM)) {
        smtpd_esmtp_params(cmd->args, s->pend.params, sizeof(s->pend.params));
        free(s->pend.addr);
        s->pend.addr = xstrdup(addr);
        s->pend.mail = p;
        s->pend.bind = param;
        smtpd_hook_wait(s);
        if (xbind_hook)
            hook_xbind(s->hooks, param.ip, param.hostname, smtpd_on_hook_mail_xbind, s);
        else
            hook_mail(s->hooks, addr, s->pend.params, smtpd_on_hook_mail, s);
        return;
    }
    if (s->hooks != NULL) { /* later stages show the sender to the hooks */
        smtpd_esmtp_params(cmd->args, s->pend.params, sizeof(s->pend.params));
        hook_txn_begin(s->hooks, addr, s->pend.params);
    }
    smtpd_mail_ok(s, addr, &p, &param);
}

/* MAIL with XBIND=: the xbind hook answered; then the mail_from stage. */
static void
smtpd_on_hook_mail_xbind(struct hook_session *hs, bool has_answer, bool allow, void *arg)
{
    struct smtpd_session *s = arg;
    if (has_answer && !allow) {
        smtpd_hook_end(s);
        smtpd_xbind_refuse(s, "MAIL", s->pend.bind.ip, "refused by local policy");
        free(s->pend.addr);
        s->pend.addr = NULL;
        smtpd_hook_resume(s);
        return;
    }
    if (!hook_wants(hs, PLUGIN_HOOK_MAIL_FROM)) {
        smtpd_hook_end(s);
        hook_txn_begin(hs, s->pend.addr, s->pend.params);
        smtpd_mail_ok(s, s->pend.addr, &s->pend.mail, &s->pend.bind);
        free(s->pend.addr);
        s->pend.addr = NULL;
        smtpd_hook_resume(s);
        return;
    }
    hook_mail(hs, s->pend.addr, s->pend.params, smtpd_on_hook_mail, s); /* still waiting */
}

static void
smtpd_mail_ok(struct smtpd_session *s, const char *addr, const struct smtp_mail_params *p,
              const struct smtpd_bind *param)
{
    struct smtpd_txn *t = &s->txn;
    t->sender = xstrdup(addr);
    t->params = *p;
    t->xbind_param = *param;
    t->at_bol = true;
    s->state = ST_MAIL;
    smtpd_reply(s, &R_SENDER_OK);
}

static void
smtpd_on_hook_mail(struct hook_session *hs, const struct verdict *v, void *arg)
{
    (void)hs;
    struct smtpd_session *s = arg;
    smtpd_hook_end(s);
    if (smtpd_verdict_refuses(v)) {
        /* not yet in a transaction: log the sender the refusal was about */
        struct smtpd_txn *t = &s->txn;
        t->sender = s->pend.addr;
        smtpd_reply_verdict(s, "MAIL", v, NULL);
        t->sender = NULL;
        hook_abort(s->hooks);
    } else {
        smtpd_mail_ok(s, s->pend.addr, &s->pend.mail, &s->pend.bind);
        if (v->kind == VERDICT_DISCARD)
            s->txn.discard = true;
    }
    free(s->pend.addr);
    s->pend.addr = NULL;
    smtpd_hook_resume(s);
}

static bool
smtpd_domain_listed(const struct str_list *l, struct span dom)
{
    for (size_t i = 0; i < l->n; i++) {
        const char *d = l->v[i];
        if (d[0] == '*' && d[1] == '.') {
            size_t n = strlen(d + 1); /* ".example.com" */
            if (dom.len > n && ascii_ncasecmp(dom.p + dom.len - n, d + 1, n) == 0)
                return true;
        } else if (span_eq_ci(dom, d)) {
            return true;
        }
    }
    return false;
}

/* Relay control: recipients in relay.domains come from anyone; anything
 * else only from relay.clients. The bare Postmaster is always accepted. */
static bool
smtpd_may_relay(const struct smtpd_session *s, const char *rcpt)
{
    struct span dom = smtp_addr_domain(rcpt);
    if (dom.len == 0)
        return true; /* <Postmaster> (RFC 5321 4.5.1) */
    if (smtpd_domain_listed(&s->srv->cfg->relay.domains, dom))
        return true;
    if (s->authenticated)
        return true;
    return cidr_list_match(&s->srv->cfg->relay.clients, conn_peer_addr(s->conn));
}

static void smtpd_rcpt_ok(struct smtpd_session *s, const char *addr,
                          const struct smtp_rcpt_params *pp);
static void smtpd_on_hook_rcpt(struct hook_session *hs, const struct verdict *v, void *arg);

static void
smtpd_cmd_rcpt(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    if (!smtpd_in_txn(s)) {
        smtpd_reject(s, "RCPT", s->state == ST_CONNECTED ? &R_BAD_SEQ_HELO : &R_BAD_SEQ_MAIL,
                     NULL);
        return;
    }
    if (s->txn.bdat) {
        smtpd_reject(s, "RCPT", &R_BAD_SEQ_BDAT, NULL);
        return;
    }
    if (!cmd->rcpt_to) {
        smtpd_reject(s, "RCPT", &R_RCPT_SYNTAX, NULL);
        return;
    }
    char addr[SMTP_ADDR_SIZE];
    struct smtp_rcpt_params p;
    memset(&p, 0, sizeof(p));
    const struct reply *r = smtp_parse_rcpt(cmd->args, s->txn.params.smtputf8, addr,
                                            sizeof(addr), &p);
    if (r) {
        smtpd_reject(s, "RCPT", r, NULL);
        return;
    }
    struct smtpd_txn *t = &s->txn;
    if (t->nrcpts >= s->lc->max_recipients) {
        smtpd_reject(s, "RCPT", &R_TOO_MANY_RCPTS, addr);
        return;
    }
    bool relay_ok = smtpd_may_relay(s, addr);
    if (hook_wants(s->hooks, PLUGIN_HOOK_RCPT_TO)) {
        char params[1024];
        smtpd_esmtp_params(cmd->args, params, sizeof(params));
        free(s->pend.addr);
        s->pend.addr = xstrdup(addr);
        s->pend.rcpt = p;
        smtpd_hook_wait(s);
        hook_rcpt(s->hooks, addr, params, relay_ok, smtpd_on_hook_rcpt, s);
        return;
    }
    if (!relay_ok) {
        smtpd_reject(s, "RCPT", &R_RELAY_DENIED, addr);
        return;
    }
    smtpd_rcpt_ok(s, addr, &p);
}

static void
smtpd_on_hook_rcpt(struct hook_session *hs, const struct verdict *v, void *arg)
{
    (void)hs;
    struct smtpd_session *s = arg;
    smtpd_hook_end(s);
    if (smtpd_verdict_refuses(v)) {
        smtpd_reply_verdict(s, "RCPT", v, s->pend.addr);
    } else {
        smtpd_rcpt_ok(s, s->pend.addr, &s->pend.rcpt);
        if (v->kind == VERDICT_DISCARD)
            s->txn.discard = true;
    }
    free(s->pend.addr);
    s->pend.addr = NULL;
    smtpd_hook_resume(s);
}

static void
smtpd_rcpt_ok(struct smtpd_session *s, const char *addr, const struct smtp_rcpt_params *pp)
{
    struct smtpd_txn *t = &s->txn;
    const struct smtp_rcpt_params p = *pp;
    if (t->nrcpts == t->rcpts_cap) {
        t->rcpts_cap = t->rcpts_cap ? t->rcpts_cap * 2 : 4;
        t->rcpts = xreallocarray(t->rcpts, t->rcpts_cap, sizeof(*t->rcpts));
    }
    if (t->qid[0] == '\0') { /* as Postfix: rejects before this one log NOQUEUE */
        spool_new_qid(s->srv->spool, t->qid);
        hook_session_set(s->hooks, "i", t->qid);
    }
    struct smtpd_rcpt *rc = &t->rcpts[t->nrcpts++];
    rc->addr = xstrdup(addr);
    rc->notify = p.notify;
    rc->orcpt = p.orcpt_type[0] ? xasprintf("%s;%s", p.orcpt_type, p.orcpt) : NULL;
    s->state = ST_RCPT;
    smtpd_reply(s, &R_RCPT_OK);
}

static void smtpd_data_go(struct smtpd_session *s);
static void smtpd_on_hook_data(struct hook_session *hs, const struct verdict *v, void *arg);

static void
smtpd_cmd_data(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    if (cmd->args.len > 0) {
        smtpd_reject(s, "DATA", &R_NO_ARGS, NULL);
        return;
    }
    if (s->txn.bdat) {
        smtpd_reject(s, "DATA", &R_BAD_SEQ_BDAT, NULL);
        return;
    }
    if (s->state != ST_RCPT) {
        const struct reply *r = s->state == ST_CONNECTED ? &R_BAD_SEQ_HELO
                                : smtpd_in_txn(s)         ? &R_BAD_SEQ_RCPT
                                                          : &R_BAD_SEQ_MAIL;
        smtpd_reject(s, "DATA", r, NULL);
        return;
    }
    if (hook_wants_data_command(s->hooks)) {
        smtpd_hook_wait(s);
        hook_data(s->hooks, smtpd_on_hook_data, s);
        return;
    }
    smtpd_data_go(s);
}

static void
smtpd_data_go(struct smtpd_session *s)
{
    s->state = ST_DATA;
    s->txn.at_bol = true;
    smtpd_reply(s, &R_DATA_GO);
    conn_set_timeout(s->conn, s->lc->data_timeout_ms);
}

static void
smtpd_on_hook_data(struct hook_session *hs, const struct verdict *v, void *arg)
{
    (void)hs;
    struct smtpd_session *s = arg;
    smtpd_hook_end(s);
    if (smtpd_verdict_refuses(v)) {
        smtpd_reply_verdict(s, "DATA", v, NULL);
        smtpd_txn_reset(s);
    } else {
        if (v->kind == VERDICT_DISCARD)
            s->txn.discard = true;
        smtpd_data_go(s);
    }
    smtpd_hook_resume(s);
}

static void
smtpd_cmd_bdat(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    uint64_t size;
    bool last;
    const struct reply *r = smtp_parse_bdat(cmd->args, &size, &last);
    if (r) {
        /* without a valid size the chunk cannot be skipped: the stream is
         * out of sync, so the connection must go (RFC 3030 section 2) */
        smtpd_reject(s, "BDAT", r, NULL);
        smtpd_close(s);
        return;
    }
    struct smtpd_txn *t = &s->txn;
    const struct reply *err = NULL;
    if (s->state == ST_CONNECTED)
        err = &R_BAD_SEQ_HELO;
    else if (!smtpd_in_txn(s))
        err = &R_BAD_SEQ_MAIL;
    else if (t->nrcpts == 0)
        err = &R_BAD_SEQ_RCPT;
    if (err) {
        /* read and discard the chunk, then answer the error */
        t->bdat_error = err;
    }
    t->bdat = smtpd_in_txn(s);
    t->bdat_return = (int)s->state;
    t->bdat_left = size;
    t->bdat_last = last;
    s->state = ST_BDAT;
    conn_set_timeout(s->conn, s->lc->data_timeout_ms);
}

static void
smtpd_cmd_rset(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    if (cmd->args.len > 0) {
        smtpd_reject(s, "RSET", &R_NO_ARGS, NULL);
        return;
    }
    smtpd_txn_reset(s);
    smtpd_reply(s, &R_RESET_OK);
}

static void
smtpd_cmd_quit(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    (void)cmd;
    smtpd_reply(s, &R_BYE);
    s->goodbye_sent = true;
    smtpd_close(s);
}

static void smtpd_xbind_ok(struct smtpd_session *s, const struct smtpd_bind *b);
static void smtpd_on_hook_xbind(struct hook_session *hs, bool has_answer, bool allow, void *arg);

/* XBIND <ip> [<hostname>] | XBIND RESET: after EHLO, outside a transaction. */
static void
smtpd_cmd_xbind(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    if (!s->esmtp) {
        smtpd_reject(s, "XBIND", &R_BAD_SEQ_EHLO, NULL);
        return;
    }
    if (smtpd_in_txn(s)) {
        smtpd_reject(s, "XBIND", &R_BAD_SEQ_XBIND, NULL);
        return;
    }
    bool reset;
    char ip[SOURCE_IP_SIZE];
    char hostname[SMTP_HOSTNAME_MAX + 1];
    const struct reply *r = smtp_parse_xbind(cmd->args, &reset, ip, sizeof(ip), hostname,
                                             sizeof(hostname));
    if (r == NULL && !smtpd_xbind_allowed(s))
        r = &R_XBIND_DENIED;
    if (r != NULL) {
        smtpd_reject(s, "XBIND", r, NULL);
        return;
    }
    struct log_line ll;
    if (reset) {
        memset(&s->xbind, 0, sizeof(s->xbind));
        smtpd_log_begin(s, &ll, LOG_INFO, "xbind reset", false);
        log_kv(&ll, "client", "%s", s->client);
        log_end(&ll);
        smtpd_reply(s, &R_XBIND_RESET);
        return;
    }
    struct smtpd_bind b;
    const char *why = smtpd_xbind_resolve(s, ip, hostname, &b);
    if (why != NULL) {
        smtpd_xbind_refuse(s, "XBIND", b.ip, why); /* a previous binding stays */
        return;
    }
    if (hook_wants(s->hooks, PLUGIN_HOOK_XBIND)) {
        s->pend.bind = b;
        smtpd_hook_wait(s);
        hook_xbind(s->hooks, b.ip, b.hostname, smtpd_on_hook_xbind, s);
        return;
    }
    smtpd_xbind_ok(s, &b);
}

static void
smtpd_xbind_ok(struct smtpd_session *s, const struct smtpd_bind *b)
{
    struct log_line ll;
    s->xbind = *b;
    smtpd_log_begin(s, &ll, LOG_INFO, "xbind", false);
    log_kv(&ll, "client", "%s", s->client);
    smtpd_log_xbind(&ll, &s->xbind);
    log_end(&ll);
    char text[SOURCE_IP_SIZE + SMTP_HOSTNAME_MAX + 32];
    snprintf(text, sizeof(text), "Bound to %s as %s", b->ip, b->hostname);
    smtpd_reply_text(s, 250, "2.0.0", text);
}

/* The xbind hook answered for the XBIND command: false refuses (a previous
 * binding stays), true or no answer accepts. */
static void
smtpd_on_hook_xbind(struct hook_session *hs, bool has_answer, bool allow, void *arg)
{
    (void)hs;
    struct smtpd_session *s = arg;
    smtpd_hook_end(s);
    if (has_answer && !allow)
        smtpd_xbind_refuse(s, "XBIND", s->pend.bind.ip, "refused by local policy");
    else
        smtpd_xbind_ok(s, &s->pend.bind);
    smtpd_hook_resume(s);
}

static void
smtpd_cmd_simple(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    switch (cmd->verb) {
    case SMTP_NOOP:
        smtpd_reply(s, &R_NOOP_OK);
        break;
    case SMTP_VRFY:
        if (cmd->args.len == 0)
            smtpd_reject(s, "VRFY", &R_SYNTAX, NULL);
        else
            smtpd_reply(s, &R_VRFY);
        break;
    case SMTP_HELP:
        smtpd_reply(s, &R_HELP);
        break;
    default:
        /* EXPN, AUTH: not offered (yet) */
        smtpd_reject(s, "CMD", &R_NOT_IMPL, NULL);
        break;
    }
}

/* STARTTLS (RFC 3207): after EHLO, outside a transaction, once. */
static void
smtpd_cmd_starttls(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    const struct reply *r = NULL;
    if (s->lc->tls != LISTENER_TLS_STARTTLS)
        r = s->tls ? &R_TLS_ACTIVE : &R_NOT_IMPL;
    else if (cmd->args.len > 0)
        r = &R_NO_ARGS;
    else if (s->tls)
        r = &R_TLS_ACTIVE;
    else if (s->srv->tls == NULL)
        r = &R_TLS_UNAVAILABLE; /* the certificate did not load */
    else if (!s->esmtp)
        r = &R_BAD_SEQ_EHLO;
    else if (smtpd_in_txn(s))
        r = &R_BAD_SEQ_STARTTLS;
    if (r != NULL) {
        smtpd_reject(s, "STARTTLS", r, NULL);
        return;
    }
    smtpd_reply(s, &R_TLS_GO);
    conn_flush(s->conn); /* the 220 leaves in plaintext, before the handshake */
    struct buf *in = conn_input(s->conn);
    if (in->len > 0) {
        /* pipelined after STARTTLS: whoever sent it, it must not be taken
         * as sent under TLS (RFC 3207 5, CVE-2011-0411) */
        struct log_line ll;
        smtpd_log_begin(s, &ll, LOG_INFO, "starttls injection discarded", false);
        log_kv(&ll, "client", "%s", s->client);
        log_kv(&ll, "size", "%zu", in->len);
        log_end(&ll);
        buf_clear(in);
    }
    s->skipping = false;
    smtpd_start_tls(s);
}

/* ---- message content ------------------------------------------------- */

/* Appends bytes to the staged message unless it is already too big. */
static void
smtpd_content_add(struct smtpd_session *s, const char *p, size_t n)
{
    struct smtpd_txn *t = &s->txn;
    t->size += n;
    if (t->too_big)
        return;
    if (t->size > s->lc->max_message_size) {
        t->too_big = true;
        buf_reset(&t->content);
        return;
    }
    buf_append(&t->content, p, n);
}

/* True if content holds a CR not followed by LF or an LF not preceded by CR. */
static bool
smtpd_has_bare_cr_lf(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        const char *q = memchr(p + i, '\r', n - i);
        const char *l = memchr(p + i, '\n', n - i);
        if (q == NULL && l == NULL)
            return false;
        if (l != NULL && (q == NULL || l < q))
            return true; /* LF before any CR: bare */
        size_t at = (size_t)(q - p);
        if (at + 1 >= n || p[at + 1] != '\n')
            return true;
        i = at + 1;
    }
    return false;
}

/* Counts Received: header fields in the header section (hop count,
 * RFC 5321 6.3). */
static unsigned
smtpd_count_received(const char *p, size_t n)
{
    unsigned count = 0;
    size_t i = 0;
    while (i < n) {
        const char *eol = memchr(p + i, '\n', n - i);
        size_t len = eol ? (size_t)(eol - (p + i)) + 1 : n - i;
        if (len <= 2 && (p[i] == '\r' || p[i] == '\n'))
            break; /* empty line: end of headers */
        if (len >= 9 && ascii_ncasecmp(p + i, "Received:", 9) == 0)
            count++;
        i += len;
    }
    return count;
}

/* The "with" protocol of the Received header and the queued line (RFC
 * 3848: an S for TLS; the UTF8 prefix as Postfix writes it). */
static const char *
smtpd_proto(const struct smtpd_session *s)
{
    if (s->txn.params.smtputf8) {
        if (s->authenticated)
            return s->tls ? "UTF8ESMTPSA" : "UTF8ESMTPA";
        return s->tls ? "UTF8ESMTPS" : "UTF8ESMTP";
    }
    if (!s->esmtp)
        return "SMTP";
    if (s->authenticated)
        return s->tls ? "ESMTPSA" : "ESMTPA";
    return s->tls ? "ESMTPS" : "ESMTP";
}

static void
smtpd_build_received(struct smtpd_session *s, struct buf *out)
{
    const struct smtpd_txn *t = &s->txn;
    char date[64];
    rfc5322_date(date, sizeof(date), now_ms() / 1000);
    buf_printf(out, "Received: from %s ([%s])\r\n", s->helo, conn_peer_ip(s->conn));
    if (s->tls) /* as Postfix: "(using TLSv1.3 with cipher … (256/256 bits))" */
        buf_printf(out, "\t(using %s with cipher %s (%d/%d bits))\r\n", s->tls_info.version,
                   s->tls_info.cipher, s->tls_info.bits, s->tls_info.alg_bits);
    buf_printf(out, "\tby %s (petrel) with %s id %s", s->srv->cfg->hostname, smtpd_proto(s),
               t->qid);
    if (t->nrcpts == 1)
        buf_printf(out, "\r\n\tfor <%s>", t->rcpts[0].addr);
    buf_printf(out, "; %s\r\n", date);
}

static void
smtpd_on_commit(int status, void *arg)
{
    struct smtpd_session *s = arg;
    s->blocked = false;
    if (status == 0 && s->srv->queued_cb)
        s->srv->queued_cb(s->txn.qid, s->srv->queued_arg);
    if (s->conn != NULL && s->state != ST_QUIT) {
        if (status == 0) {
            char text[128];
            snprintf(text, sizeof(text), "Ok: queued as %s", s->txn.qid);
            smtpd_reply_text(s, 250, "2.0.0", text);
            struct log_line ll;
            smtpd_log_begin(s, &ll, LOG_INFO, "queued", true);
            log_kv(&ll, "client", "%s", s->client);
            smtpd_log_addr(&ll, "from", s->txn.sender);
            log_kv(&ll, "size", "%" PRIu64, s->txn.stored_size);
            log_kv(&ll, "nrcpt", "%zu", s->txn.nrcpts);
            log_kv(&ll, "proto", "%s", smtpd_proto(s));
            smtpd_log_addr(&ll, "helo", s->helo);
            if (s->authenticated)
                log_kv_vis(&ll, "user", s->auth_user, strlen(s->auth_user));
            if (s->tls) {
                log_kv(&ll, "tls", "%s", s->tls_info.version);
                log_kv(&ll, "cipher", "%s", s->tls_info.cipher);
            }
            if (s->txn.bind.ip[0])
                smtpd_log_xbind(&ll, &s->txn.bind);
            if (s->txn.quarantine)
                log_kv(&ll, "status", "quarantined");
            log_end(&ll);
        } else {
            log_msg(LOG_WARNING, s->txn.qid, "spool commit failed: %s", strerror(-status));
            smtpd_reject(s, s->txn.bdat ? "BDAT" : "DATA", &R_SPOOL_FAILED, NULL);
        }
        smtpd_txn_reset(s);
        if (s->srv->shutting_down) {
            smtpd_reply(s, &R_SHUTDOWN);
            smtpd_close(s);
        } else {
            conn_set_timeout(s->conn, s->lc->command_timeout_ms);
            conn_resume_read(s->conn);
            smtpd_process(s);
        }
    } else {
        smtpd_txn_reset(s);
    }
    smtpd_session_unref(s);
}

static void smtpd_discard(struct smtpd_session *s, const char *why);
static void smtpd_eom_hooks(struct smtpd_session *s);
static void smtpd_on_hook_header_xbind(struct hook_session *hs, bool has_answer, bool allow,
                                       void *arg);
static void smtpd_submit(struct smtpd_session *s, const struct hook_eom_result *r);
static void smtpd_on_hook_eom(struct hook_session *hs, const struct hook_eom_result *r,
                              void *arg);
static void smtpd_on_hook_bdat_data(struct hook_session *hs, const struct verdict *v, void *arg);

/* The whole message is in: check it, then persist it (the reply comes from
 * smtpd_on_commit). */
static void
smtpd_end_of_message(struct smtpd_session *s)
{
    struct smtpd_txn *t = &s->txn;
    const char *cmd = t->bdat ? "BDAT" : "DATA";
    const struct reply *r = NULL;
    if (t->too_big)
        r = &R_SIZE_EXCEEDED;
    else if (smtpd_has_bare_cr_lf(buf_ptr(&t->content), t->content.len))
        r = &R_BARE_LF;
    else if (smtpd_count_received(buf_ptr(&t->content), t->content.len)
             >= s->lc->max_received_headers)
        r = &R_HOPS_EXCEEDED;
    if (r) {
        smtpd_reject(s, cmd, r, NULL);
        smtpd_txn_reset(s);
        return;
    }
    /* strips X-Petrel-Bind: before the content is stored */
    if (smtpd_xbind_decide(s) && hook_wants(s->hooks, PLUGIN_HOOK_XBIND)) {
        smtpd_hook_wait(s);
        hook_xbind(s->hooks, t->bind.ip, t->bind.hostname, smtpd_on_hook_header_xbind, s);
        return;
    }
    smtpd_eom_hooks(s);
}

/* The X-Petrel-Bind header's binding went to the xbind hook. */
static void
smtpd_on_hook_header_xbind(struct hook_session *hs, bool has_answer, bool allow, void *arg)
{
    (void)hs;
    struct smtpd_session *s = arg;
    smtpd_hook_end(s);
    if (has_answer && !allow) {
        char reason[SOURCE_IP_SIZE + 64];
        snprintf(reason, sizeof(reason), "%s: refused by local policy", s->txn.bind.ip);
        smtpd_log_header_ignored(s, reason);
        memset(&s->txn.bind, 0, sizeof(s->txn.bind));
    }
    smtpd_eom_hooks(s);
    smtpd_hook_resume(s);
}

/* The end-of-message hooks (Lua data, milters, plugins), then the spool. */
static void
smtpd_eom_hooks(struct smtpd_session *s)
{
    struct smtpd_txn *t = &s->txn;
    if (t->discard) {
        smtpd_discard(s, "an earlier stage");
        return;
    }
    if (hook_wants(s->hooks, PLUGIN_HOOK_DATA)) {
        smtpd_hook_wait(s);
        if (t->bdat && hook_wants_data_command(s->hooks))
            hook_data(s->hooks, smtpd_on_hook_bdat_data, s); /* then the end of message */
        else
            hook_eom(s->hooks, (struct span){ buf_ptr(&t->content), t->content.len }, t->qid,
                     t->size, smtpd_on_hook_eom, s);
        return;
    }
    smtpd_submit(s, NULL);
}

/* A policy or filter discarded the message: the client is told it was
 * accepted (as Postfix does), nothing is stored. */
static void
smtpd_discard(struct smtpd_session *s, const char *why)
{
    struct smtpd_txn *t = &s->txn;
    struct log_line ll;
    smtpd_log_begin(s, &ll, LOG_INFO, "discard", true);
    log_kv(&ll, "client", "%s", s->client);
    smtpd_log_addr(&ll, "from", t->sender ? t->sender : "");
    log_kv(&ll, "nrcpt", "%zu", t->nrcpts);
    log_kv(&ll, "reason", "discarded by %s", why);
    log_end(&ll);
    char text[128];
    snprintf(text, sizeof(text), "Ok: queued as %s", t->qid);
    smtpd_reply_text(s, 250, "2.0.0", text);
    smtpd_txn_reset(s);
}

static void
smtpd_on_hook_eom(struct hook_session *hs, const struct hook_eom_result *r, void *arg)
{
    (void)hs;
    struct smtpd_session *s = arg;
    smtpd_hook_end(s);
    const struct verdict *v = r->verdict;
    if (smtpd_verdict_refuses(v)) {
        smtpd_reply_verdict(s, s->txn.bdat ? "BDAT" : "DATA", v, NULL);
        smtpd_txn_reset(s);
    } else if (v->kind == VERDICT_DISCARD) {
        smtpd_discard(s, "policy");
    } else {
        smtpd_submit(s, r);
    }
    smtpd_hook_resume(s);
}

static void
smtpd_on_hook_bdat_data(struct hook_session *hs, const struct verdict *v, void *arg)
{
    struct smtpd_session *s = arg;
    smtpd_hook_end(s);
    struct smtpd_txn *t = &s->txn;
    if (smtpd_verdict_refuses(v)) {
        smtpd_reply_verdict(s, "BDAT", v, NULL);
        smtpd_txn_reset(s);
    } else if (v->kind == VERDICT_DISCARD) {
        smtpd_discard(s, "policy");
    } else {
        smtpd_hook_wait(s);
        hook_eom(hs, (struct span){ buf_ptr(&t->content), t->content.len }, t->qid, t->size,
                 smtpd_on_hook_eom, s);
        return;
    }
    smtpd_hook_resume(s);
}

/* Strips one pair of angle brackets a filter may have left around an
 * address; returns a pointer into a (or into out). */
static const char *
smtpd_bare_addr(const char *a, char *out, size_t size)
{
    size_t n = strlen(a);
    if (n >= 2 && a[0] == '<' && a[n - 1] == '>') {
        if (n - 2 >= size)
            n = size + 1;
        memcpy(out, a + 1, n - 2);
        out[n - 2] = '\0';
        return out;
    }
    return a;
}

/* Persists the message (the reply comes from smtpd_on_commit), with what
 * the hooks changed when r is set: content, sender, recipients, quarantine. */
static void
smtpd_submit(struct smtpd_session *s, const struct hook_eom_result *r)
{
    struct smtpd_txn *t = &s->txn;
    struct buf received;
    buf_init(&received);
    smtpd_build_received(s, &received);

    struct spool_envelope env;
    memset(&env, 0, sizeof(env));
    memcpy(env.qid, t->qid, sizeof(env.qid));
    env.arrival_ms = now_ms();
    env.sender = t->sender;
    size_t nadd = 0;
    const struct milter_mods *em = r ? r->envelope : NULL;
    for (size_t i = 0; em && i < em->n; i++)
        nadd += em->v[i].kind == MILTER_MOD_ADD_RCPT;
    struct spool_rcpt *rcpts = xcalloc(t->nrcpts + nadd + 1, sizeof(*rcpts));
    size_t nr = 0;
    for (size_t i = 0; i < t->nrcpts; i++) {
        rcpts[nr].addr = t->rcpts[i].addr;
        rcpts[nr].orcpt = t->rcpts[i].orcpt;
        rcpts[nr].notify = t->rcpts[i].notify;
        rcpts[nr].state = SPOOL_RCPT_PENDING;
        nr++;
    }
    char addr[SMTP_ADDR_SIZE];
    for (size_t i = 0; em && i < em->n; i++) {
        const struct milter_mod *m = &em->v[i]; /* addresses come without <> */
        switch (m->kind) {
        case MILTER_MOD_CHANGE_FROM:
            env.sender = m->value;
            log_msg(LOG_INFO, t->qid, "sender changed by milter %s: from=<%s>", m->filter,
                    m->value);
            break;
        case MILTER_MOD_ADD_RCPT:
            rcpts[nr].addr = m->value;
            rcpts[nr].state = SPOOL_RCPT_PENDING;
            nr++;
            log_msg(LOG_INFO, t->qid, "recipient added by milter %s: to=<%s>", m->filter,
                    m->value);
            break;
        case MILTER_MOD_DELETE_RCPT: {
            const char *a = smtpd_bare_addr(m->value, addr, sizeof(addr));
            for (size_t j = 0; j < nr;) {
                if (ascii_casecmp(rcpts[j].addr, a) == 0) {
                    memmove(&rcpts[j], &rcpts[j + 1], (nr - j - 1) * sizeof(*rcpts));
                    nr--;
                } else {
                    j++;
                }
            }
            log_msg(LOG_INFO, t->qid, "recipient deleted by milter %s: to=<%s>", m->filter, a);
            break;
        }
        default:
            break;
        }
    }
    if (nr == 0) {
        /* every recipient was deleted: nothing to deliver */
        free(rcpts);
        buf_reset(&received);
        smtpd_discard(s, "recipient removal");
        return;
    }
    env.rcpts = rcpts;
    env.nrcpts = nr;
    env.size_param = t->params.has_size ? t->params.size : 0;
    env.body = (int)t->params.body;
    env.smtputf8 = t->params.smtputf8;
    env.ret = (int)t->params.ret;
    env.envid = t->params.envid[0] ? t->params.envid : NULL;
    env.listener = s->lc->name;
    env.local_ip = (char *)conn_local_ip(s->conn);
    env.client_ip = (char *)conn_peer_ip(s->conn);
    env.client_helo = s->helo;
    env.auth_user = s->authenticated ? s->auth_user : NULL;
    env.xbind_ip = t->bind.ip[0] ? t->bind.ip : NULL;
    env.xbind_hostname = t->bind.ip[0] ? t->bind.hostname : NULL;
    struct span body = { buf_ptr(&t->content), t->content.len };
    if (r != NULL && r->changed)
        body = r->content;
    if (r != NULL && r->verdict->kind == VERDICT_QUARANTINE) {
        env.flags |= SPOOL_F_QUARANTINED;
        env.quarantine_reason = (char *)r->verdict->reply.text;
        t->quarantine = true;
    }
    env.content_size = received.len + body.len;
    t->stored_size = env.content_size;

    struct span parts[2] = {
        { buf_ptr(&received), received.len },
        body,
    };
    s->blocked = true;
    s->refs++;
    spool_submit(s->srv->spool, &env, parts, 2, smtpd_on_commit, s);
    free(rcpts); /* spool_submit copied everything */
    buf_reset(&received);
}

/* DATA: consumes content lines; returns false when more input is needed. */
static bool
smtpd_read_data(struct smtpd_session *s)
{
    struct buf *in = conn_input(s->conn);
    struct smtpd_txn *t = &s->txn;
    for (;;) {
        struct span line;
        size_t used;
        /* no line limit here: long lines are passed through in pieces */
        enum buf_line st = buf_getline(in, in->len + 1, &line, &used);
        if (st == BUF_LINE_PARTIAL) {
            /* keep the tail (a CR may be half of a CRLF); move the rest on
             * so a huge line does not pile up in the input buffer */
            if (in->len > 65536) {
                size_t n = in->len - 1;
                const char *p = buf_ptr(in);
                if (t->at_bol && p[0] == '.') {
                    p++; /* dot-unstuffing (RFC 5321 4.5.2) */
                    n--;
                    buf_consume(in, 1);
                }
                smtpd_content_add(s, p, n);
                buf_consume(in, n);
                t->at_bol = false;
            }
            return false;
        }
        const char *p = line.p;
        size_t n = line.len;
        if (t->at_bol && n == 1 && p[0] == '.') {
            buf_consume(in, used);
            s->state = ST_RCPT;
            smtpd_end_of_message(s);
            return true;
        }
        if (t->at_bol && n > 0 && p[0] == '.') {
            p++;
            n--;
        }
        smtpd_content_add(s, p, n + 2); /* the line and its CRLF */
        buf_consume(in, used);
        t->at_bol = true;
    }
}

/* BDAT: consumes chunk bytes; returns false when more input is needed. */
static bool
smtpd_read_bdat(struct smtpd_session *s)
{
    struct buf *in = conn_input(s->conn);
    struct smtpd_txn *t = &s->txn;
    size_t n = in->len < t->bdat_left ? in->len : (size_t)t->bdat_left;
    if (n > 0) {
        if (t->bdat_error == NULL)
            smtpd_content_add(s, buf_ptr(in), n);
        buf_consume(in, n);
        t->bdat_left -= n;
    }
    if (t->bdat_left > 0)
        return false;

    s->state = (enum smtpd_state)t->bdat_return;
    if (t->bdat_error) {
        const struct reply *err = t->bdat_error;
        smtpd_reject(s, "BDAT", err, NULL);
        if (t->bdat_last || !smtpd_in_txn(s))
            smtpd_txn_reset(s);
        return true;
    }
    if (t->too_big) {
        smtpd_reject(s, "BDAT", &R_SIZE_EXCEEDED, NULL);
        if (t->bdat_last)
            smtpd_txn_reset(s);
        else
            t->bdat_error = &R_SIZE_EXCEEDED; /* every further chunk fails too */
        return true;
    }
    if (t->bdat_last) {
        smtpd_end_of_message(s);
        return true;
    }
    char text[96];
    snprintf(text, sizeof(text), "Ok: %" PRIu64 " octets received", t->size);
    smtpd_reply_text(s, 250, "2.0.0", text);
    return true;
}

/* ---- AUTH (RFC 4954; the building blocks are in auth.h) ------------------ */

static void
smtpd_log_auth(struct smtpd_session *s, const char *event, const char *why)
{
    struct log_line ll;
    smtpd_log_begin(s, &ll, LOG_INFO, event, false);
    log_kv(&ll, "client", "%s", s->client);
    if (s->sasl.user[0])
        log_kv_vis(&ll, "user", s->sasl.user, strlen(s->sasl.user));
    log_kv(&ll, "mech", "%s", auth_mech_name(s->sasl.mech));
    if (why)
        log_kv(&ll, "reason", "%s", why);
    log_end(&ll);
}

/* A failed attempt: 535, counted per client address. */
static void
smtpd_auth_failed(struct smtpd_session *s, const struct reply *r, const char *why)
{
    smtpd_log_auth(s, "auth failed", why);
    int64_t now = now_ms();
    if (s->srv->auth_limiter != NULL
        && auth_limiter_fail(s->srv->auth_limiter, conn_peer_ip(s->conn), now))
        log_msg(LOG_WARNING, NULL, "auth: too many failures from %s; AUTH refused for a while",
                conn_peer_ip(s->conn));
    smtpd_reply(s, r);
}

static void
smtpd_auth_done(struct smtpd_session *s, int status, bool ok, const char *why)
{
    s->state = (enum smtpd_state)s->auth_return;
    if (status < 0) {
        smtpd_log_auth(s, "auth unavailable", "password check failed");
        smtpd_reply(s, &R_AUTH_TEMPFAIL);
    } else if (!ok) {
        smtpd_auth_failed(s, &R_AUTH_FAILED, why);
    } else {
        s->authenticated = true;
        s->auth_mech = s->sasl.mech;
        if (!str_copy(s->auth_user, sizeof(s->auth_user), s->sasl.user))
            PANIC("auth user longer than its buffer");
        smtpd_log_auth(s, "auth", NULL);
        hook_session_set(s->hooks, "{auth_type}", auth_mech_name(s->auth_mech));
        hook_session_set(s->hooks, "{auth_authen}", s->auth_user);
        smtpd_reply(s, &R_AUTH_OK);
    }
    auth_sasl_reset(&s->sasl);
}

static void
smtpd_on_auth_verify(struct auth_verify *v, int status, bool ok, void *arg)
{
    (void)v;
    struct smtpd_session *s = arg;
    s->verify = NULL;
    s->blocked = false;
    s->refs--;
    smtpd_auth_done(s, status, ok, "wrong user name or password");
    smtpd_process(s);
}

/* Checks the users file (on the threadpool); the session waits. */
static void
smtpd_auth_check_file(struct smtpd_session *s)
{
    struct smtpd_server *srv = s->srv;
    if (srv->auth_db == NULL || srv->auth_verifier == NULL) {
        s->state = (enum smtpd_state)s->auth_return;
        smtpd_auth_failed(s, &R_AUTH_FAILED, "no auth.users_file and no auth hook answered");
        auth_sasl_reset(&s->sasl);
        return;
    }
    s->verify = auth_verify(srv->auth_verifier, srv->auth_db, s->sasl.user, s->sasl.password,
                            smtpd_on_auth_verify, s);
    /* auth_verify copied the password: wipe ours now */
    explicit_bzero(s->sasl.password, sizeof(s->sasl.password));
    if (s->verify == NULL) {
        smtpd_auth_done(s, -1, false, NULL); /* too many checks queued */
        return;
    }
    s->blocked = true;
    s->refs++;
}

static void
smtpd_on_hook_auth(struct hook_session *hs, bool has_answer, bool allow, void *arg)
{
    (void)hs;
    struct smtpd_session *s = arg;
    smtpd_hook_end(s);
    if (has_answer)
        smtpd_auth_done(s, 0, allow, "refused by the auth hook");
    else
        smtpd_auth_check_file(s);
    smtpd_hook_resume(s);
}

/* The exchange produced a user name and password: the auth hook first,
 * then the users file. */
static void
smtpd_auth_verify(struct smtpd_session *s)
{
    if (hook_wants(s->hooks, PLUGIN_HOOK_AUTH)) {
        smtpd_hook_wait(s);
        hook_auth(s->hooks, s->sasl.user, s->sasl.password, smtpd_on_hook_auth, s);
        return;
    }
    smtpd_auth_check_file(s);
}

static void
smtpd_auth_status(struct smtpd_session *s, enum auth_sasl_status st, const struct reply *r)
{
    switch (st) {
    case AUTH_SASL_CONTINUE:
        s->state = ST_AUTH;
        smtpd_reply(s, r);
        return;
    case AUTH_SASL_DONE:
        smtpd_auth_verify(s);
        return;
    case AUTH_SASL_FAILED:
        s->state = (enum smtpd_state)s->auth_return;
        if (r->code == 535)
            smtpd_auth_failed(s, r, s->sasl.reason);
        else
            smtpd_reply(s, r);
        auth_sasl_reset(&s->sasl);
        return;
    }
}

static void
smtpd_cmd_auth(struct smtpd_session *s, const struct smtp_cmd *cmd)
{
    const struct reply *r = NULL;
    if (s->lc->auth == LISTENER_AUTH_NONE)
        r = &R_AUTH_NOT_ENABLED;
    else if (!s->esmtp)
        r = &R_BAD_SEQ_EHLO;
    else if (!s->tls && !s->srv->cfg->auth.allow_plaintext)
        r = &R_AUTH_ENCRYPT_REQUIRED;
    else if (s->authenticated)
        r = &R_AUTH_ALREADY;
    else if (smtpd_in_txn(s))
        r = &R_AUTH_IN_TXN;
    if (r != NULL) {
        smtpd_reject(s, "AUTH", r, NULL);
        return;
    }
    if (s->srv->auth_limiter != NULL
        && auth_limiter_blocked(s->srv->auth_limiter, conn_peer_ip(s->conn), now_ms())) {
        smtpd_reject(s, "AUTH", &R_AUTH_TOO_MANY, NULL);
        smtpd_close(s);
        return;
    }
    s->auth_return = (int)s->state;
    const struct reply *reply = NULL;
    enum auth_sasl_status st = auth_sasl_start(&s->sasl, cmd->args, &reply);
    smtpd_auth_status(s, st, reply);
}

/* A line answering a 334 challenge. */
static void
smtpd_auth_line(struct smtpd_session *s, struct span line)
{
    const struct reply *reply = NULL;
    enum auth_sasl_status st = auth_sasl_step(&s->sasl, line, &reply);
    if (st == AUTH_SASL_FAILED && reply == &R_AUTH_CANCELLED)
        smtpd_log_auth(s, "auth cancelled", NULL);
    smtpd_auth_status(s, st, reply);
}

/* ---- dispatch -------------------------------------------------------- */

typedef void smtpd_cmd_fn(struct smtpd_session *s, const struct smtp_cmd *cmd);

struct smtpd_cmd_entry {
    enum smtp_verb verb;
    const char *name;
    smtpd_cmd_fn *fn;
};

static const struct smtpd_cmd_entry smtpd_cmds[] = {
    { SMTP_EHLO, "EHLO", smtpd_cmd_helo },
    { SMTP_HELO, "HELO", smtpd_cmd_helo },
    { SMTP_MAIL, "MAIL", smtpd_cmd_mail },
    { SMTP_RCPT, "RCPT", smtpd_cmd_rcpt },
    { SMTP_DATA, "DATA", smtpd_cmd_data },
    { SMTP_BDAT, "BDAT", smtpd_cmd_bdat },
    { SMTP_RSET, "RSET", smtpd_cmd_rset },
    { SMTP_NOOP, "NOOP", smtpd_cmd_simple },
    { SMTP_QUIT, "QUIT", smtpd_cmd_quit },
    { SMTP_VRFY, "VRFY", smtpd_cmd_simple },
    { SMTP_EXPN, "EXPN", smtpd_cmd_simple },
    { SMTP_HELP, "HELP", smtpd_cmd_simple },
    { SMTP_STARTTLS, "STARTTLS", smtpd_cmd_starttls },
    { SMTP_AUTH, "AUTH", smtpd_cmd_auth },
    { SMTP_XBIND, "XBIND", smtpd_cmd_xbind },
};

static void
smtpd_trace_in(struct smtpd_session *s, struct span line)
{
    if (!log_enabled(LOG_DEBUG))
        return;
    if (line.len >= 5 && ascii_ncasecmp(line.p, "AUTH ", 5) == 0) {
        /* the initial response holds credentials: trace the mechanism only */
        size_t n = 5;
        while (n < line.len && line.p[n] == ' ')
            n++;
        while (n < line.len && line.p[n] != ' ')
            n++;
        if (n < line.len)
            line.len = n; /* "AUTH PLAIN" (the rest is not logged) */
    }
    struct log_line ll;
    log_begin(&ll, LOG_DEBUG, s->txn.qid[0] ? s->txn.qid : NULL);
    log_event(&ll, "<<<");
    log_kv(&ll, "session", "%" PRIu64, s->id);
    log_kv_vis(&ll, "data", line.p, line.len);
    log_end(&ll);
}

static void
smtpd_dispatch(struct smtpd_session *s, struct span line)
{
    if (s->state == ST_AUTH) {
        smtpd_auth_line(s, line); /* not traced: it holds credentials */
        return;
    }
    smtpd_trace_in(s, line);
    struct smtp_cmd cmd;
    smtp_parse_command(line, &cmd);
    for (size_t i = 0; i < ARRAY_SIZE(smtpd_cmds); i++) {
        if (smtpd_cmds[i].verb == cmd.verb) {
            s->counts[cmd.verb]++;
            smtpd_cmds[i].fn(s, &cmd);
            return;
        }
    }
    s->unknown_count++;
    smtpd_reject(s, "UNKNOWN", &R_UNKNOWN_CMD, NULL);
}

static void
smtpd_line_too_long(struct smtpd_session *s)
{
    if (s->state == ST_AUTH) {
        auth_sasl_reset(&s->sasl);
        s->state = (enum smtpd_state)s->auth_return;
        smtpd_reject(s, "AUTH", &R_AUTH_TOO_LONG, NULL);
        return;
    }
    smtpd_reject(s, "CMD", &R_LINE_TOO_LONG, NULL);
}

/* Runs pipelined commands until input runs out or the session blocks. */
static void
smtpd_process(struct smtpd_session *s)
{
    while (s->conn != NULL && !s->blocked && s->state != ST_QUIT
           && s->state != ST_GREETING && s->state != ST_TLS) {
        struct buf *in = conn_input(s->conn);
        if (s->state == ST_DATA) {
            if (!smtpd_read_data(s))
                break;
            continue;
        }
        if (s->state == ST_BDAT) {
            if (!smtpd_read_bdat(s))
                break;
            continue;
        }
        if (in->len == 0)
            break;
        struct span line;
        size_t used;
        enum buf_line st = buf_getline(in, s->lc->max_line_length, &line, &used);
        if (st == BUF_LINE_PARTIAL)
            break;
        if (st == BUF_LINE_TOOLONG) {
            /* the line ends past the limit: drop it through its CRLF if that
             * has arrived (commands after it stay), else drop what we have,
             * keeping a trailing CR that may start the CRLF */
            const char *p = buf_ptr(in);
            const char *crlf = memmem(p, in->len, "\r\n", 2);
            if (crlf == NULL) {
                size_t keep = p[in->len - 1] == '\r' ? 1 : 0;
                buf_consume(in, in->len - keep);
                s->skipping = true;
                continue;
            }
            buf_consume(in, (size_t)(crlf - p) + 2);
            s->skipping = false;
            smtpd_line_too_long(s);
        } else if (s->skipping) {
            buf_consume(in, used);
            s->skipping = false;
            smtpd_line_too_long(s);
        } else {
            /* the line points into the input buffer: copy before consuming */
            char stack[2048];
            char *copy = line.len <= sizeof(stack) ? stack : xmalloc(line.len);
            memcpy(copy, line.p, line.len);
            buf_consume(in, used);
            smtpd_dispatch(s, (struct span){ copy, line.len });
            if (copy != stack)
                free(copy);
        }
        if (s->state != ST_QUIT && s->errors >= s->lc->max_errors) {
            struct log_line ll;
            smtpd_log_begin(s, &ll, LOG_INFO, "too many errors", true);
            log_kv(&ll, "client", "%s", s->client);
            log_end(&ll);
            smtpd_reply(s, &R_TOO_MANY_ERRORS);
            smtpd_close(s);
        }
    }
    if (s->conn != NULL) {
        conn_flush(s->conn);
        if (s->state != ST_QUIT && !s->blocked)
            conn_resume_read(s->conn);
    }
}

/* ---- shutdown -------------------------------------------------------- */

void
smtpd_server_shutdown(struct smtpd_server *srv)
{
    srv->shutting_down = true;
    struct smtpd_session *next;
    for (struct smtpd_session *s = srv->sessions; s != NULL; s = next) {
        next = s->next;
        if (s->conn == NULL || s->state == ST_QUIT)
            continue;
        if (smtpd_in_txn(s) || s->blocked)
            continue; /* let the transaction finish; smtpd_on_commit closes */
        smtpd_reply(s, &R_SHUTDOWN);
        smtpd_close(s);
    }
}

void
smtpd_server_abort_all(struct smtpd_server *srv)
{
    struct smtpd_session *next;
    for (struct smtpd_session *s = srv->sessions; s != NULL; s = next) {
        next = s->next;
        if (s->conn == NULL || s->state == ST_QUIT)
            continue;
        smtpd_reply(s, &R_SHUTDOWN);
        smtpd_close(s);
    }
}
