/*
 * smtp_client — the delivery side of SMTP and LMTP (RFC 5321, 2920, 1870,
 * 6152, 6531, 3461, 2033) as a state machine over conn.h. One struct smtpc
 * is one session to one destination: it tries the given targets in order
 * until one greets (connect error, timeout or a 4xx/5xx banner → next
 * target, RFC 5321 5.1), says EHLO (HELO after a 5xx to EHLO; LHLO for
 * LMTP), then carries any number of transactions, each answered per
 * recipient, until the caller quits. Knows nothing of spool, DNS or
 * scheduling: the scheduler drives it.
 *
 * Timeouts follow RFC 5321 4.5.3.2 (options below). A dropped connection
 * or a timeout inside a transaction fails the recipients not yet answered
 * with a temporary reply ("451 4.4.2 lost connection with …").
 * STARTTLS (RFC 3207) per smtpc_options.tls: after EHLO, when the server
 * offers it, then EHLO again over TLS (conn does the TLS; nothing else in
 * the FSM changes). LMTP sessions never use TLS.
 *
 * Replies petrel makes up itself (struct smtpc_reply.local = true); RELAY is
 * smtpc_relay(), PHASE names what was awaited ("receiving the initial server
 * greeting", "performing the EHLO handshake" (LHLO, HELO), "sending MAIL
 * FROM", "sending RCPT TO", "sending DATA command", "sending message body",
 * "sending end of data -- message may be sent more than once", "sending
 * RSET"):
 *   451 4.4.1 connect to RELAY: <conn_strerror text>        (connect failed)
 *   451 4.4.1 connect to RELAY: Connection timed out        (connect deadline)
 *   451 4.4.2 conversation with RELAY timed out while PHASE
 *   451 4.4.2 lost connection with RELAY while PHASE        (EOF or read/write error)
 *   451 4.5.0 malformed reply from RELAY while PHASE        (not "ddd", "ddd-" or "ddd ")
 *   451 4.5.0 reply line too long from RELAY while PHASE    (a line over 4 KiB)
 *   451 4.5.0 reply too long from RELAY while PHASE         (a reply over 64 KiB)
 *   451 4.5.0 inconsistent reply codes from RELAY while PHASE
 *   451 4.5.0 unexpected reply from RELAY while PHASE: <reply> (e.g. 354 to MAIL)
 *   451 4.3.2 delivery to RELAY aborted                     (smtpc_abort mid-transaction)
 *   451 4.7.4 TLS required but not offered by RELAY       (tls: required; next target)
 *   451 4.7.4 TLS required but STARTTLS refused by RELAY: <reply>
 *   451 4.7.5 TLS handshake with RELAY failed: <reason>   (any policy; next target,
 *                                                          never plaintext after it)
 *   451 4.7.4 TLS required by DANE but not offered by RELAY (and "... STARTTLS refused")
 *   451 4.7.5 DANE verification failed for RELAY: <reason>
 *   451 4.4.3 DANE TLSA lookup for RELAY failed: <detail>
 *   451 4.7.5 MTA-STS policy of DOMAIN does not list MX RELAY
 *   451 4.7.4 TLS required by MTA-STS but not offered by RELAY (and "... STARTTLS refused")
 *   451 4.7.5 MTA-STS certificate verification failed for RELAY: <reason>
 *   552 5.3.4 message size N exceeds size limit M of RELAY
 *   553 5.6.7 SMTPUTF8 is required, but was not offered by RELAY
 * Protocol errors (garbage, over-long lines or replies) are temporary: the
 * peer may be fixed or another MX may behave.
 */
#ifndef PETREL_SMTP_CLIENT_H
#define PETREL_SMTP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

#include "config.h"
#include "util.h"

struct uv_loop_s;
struct smtpc;
struct tls_ctx;
struct conn_tls_info;
struct log_line;
struct dns;

struct smtpc_target {
    char host[256];                 /* for logs and Remote-MTA: "mx1.example.org" */
    struct sockaddr_storage addr;   /* with the port set; AF_UNIX for LMTP sockets */
    socklen_t addr_len;
    struct sockaddr_storage src;    /* bind to this for this target (src_len > 0), */
    socklen_t src_len;              /* else smtpc_options.src */
    char helo[256];                 /* EHLO name for this target; "" = options' */
};

struct smtpc_options {
    const char *helo_name;          /* borrowed for the session's life */
    bool lmtp;
    const struct sockaddr *src;     /* bind before connect; NULL: kernel's choice */
    socklen_t src_len;
    uint64_t connect_timeout_ms;    /* 0 → 30s */
    uint64_t greeting_timeout_ms;   /* 0 → 5m (4.5.3.2.1) */
    uint64_t command_timeout_ms;    /* EHLO/MAIL/RCPT/RSET; 0 → 5m (4.5.3.2.2-3) */
    uint64_t data_init_timeout_ms;  /* 0 → 2m (4.5.3.2.4) */
    uint64_t data_block_timeout_ms; /* 0 → 3m (4.5.3.2.5) */
    uint64_t data_end_timeout_ms;   /* 0 → 10m (4.5.3.2.6) */
    enum delivery_tls tls;          /* STARTTLS policy (SMTP only): none (0, the zero
                                     * value: never), opportunistic (when offered, else
                                     * plaintext), required (else the target fails with
                                     * 4.7.4), dane (below). Outside DANE the certificate
                                     * is never required to verify. */
    struct tls_ctx *tls_ctx;        /* borrowed client context; NULL: tls_client_shared() */
    bool tls_fallback;              /* opportunistic only: after a failed handshake, connect
                                     * to the same target again without STARTTLS (once);
                                     * false: the target fails with 4.7.5 (the default) */
    /* DANE (tls = dane; RFC 7672): see "DANE" below. */
    const char *const *dns_resolvers; /* read during smtpc_start: dns.resolvers entries
                                       * ("ip:port"); none: /etc/resolv.conf */
    size_t ndns_resolvers;
    uint64_t dns_timeout_ms;        /* bound of each TLSA lookup; 0 → 5 s */
    const char *dane_domain;        /* copied: the next-hop domain whose MX records gave
                                     * the targets (its MX RRset must be validated too);
                                     * NULL for a host route ("[host]") */
    /* MTA-STS (RFC 8461): see "MTA-STS" below. */
    const char *mta_sts_domain;     /* read during smtpc_start: the MX route's domain
                                     * whose policy applies; NULL: MTA-STS off */
    struct dns *dns;                /* borrowed for the session's life: policy lookups */
    uint64_t mta_sts_timeout_ms;    /* bound of a policy fetch; 0 → 10 s */
};

/* MTA-STS (opts.mta_sts_domain and opts.dns set; not LMTP). smtpc_start
 * looks up the domain's policy (mta_sts.h); the EHLO reply of each TCP
 * target waits for it. Under an enforced policy, unless the target is
 * DANE-secured (DANE applies instead, RFC 8461 2):
 *   - a target whose host no mx pattern lists fails:
 *     "451 4.7.5 MTA-STS policy of DOMAIN does not list MX RELAY";
 *   - STARTTLS is mandatory ("451 4.7.4 TLS required by MTA-STS but not
 *     offered by RELAY", "... STARTTLS refused ...");
 *   - the certificate must verify (PKIX, the target host's name):
 *     "451 4.7.5 MTA-STS certificate verification failed for RELAY: <reason>".
 * In testing mode nothing changes but the first such failure is logged;
 * without a policy, with mode none or after a failed fetch, nothing
 * changes. Log lines carry mta_sts= (smtpc_log_tls). */

/* DANE (opts.tls = dane). Before the EHLO reply of each TCP target is
 * acted on, dane.h looks up (in parallel with the connect) the TLSA
 * records _port._tcp.<target host> with the AD bit of the resolver, and
 * the MX (dane_domain) and address RRsets behind the target:
 *   - validated usable TLSA records: STARTTLS is mandatory (not offered or
 *     refused → 4.7.4, next target), the handshake is DANE-verified
 *     (tls_client_dane) and a certificate matching no record fails the
 *     target: "451 4.7.5 DANE verification failed for RELAY: <reason>";
 *   - validated TLSA records none of which is usable: STARTTLS mandatory,
 *     no authentication (RFC 7672 2.2);
 *   - no TLSA records, or an answer without AD (insecure): opportunistic;
 *   - a lookup failure (SERVFAIL, timeout): the target fails with
 *     "451 4.4.3 DANE TLSA lookup for RELAY failed: <detail>".
 * Targets with the same host and address family share one lookup. IP
 * literal hosts and LMTP do not use DANE (opportunistic). Every hop's log
 * lines carry dane= (smtpc_log_tls). */

/* What a failure is about (STYLE.md §6, Postfix smtp_trouble.c). */
enum deliv_scope {
    DELIV_SCOPE_RCPT,   /* this recipient only (its RCPT reply, or its LMTP final reply) */
    DELIV_SCOPE_MSG,    /* the message: MAIL, DATA or final reply, SIZE, SMTPUTF8 */
    DELIV_SCOPE_CONN,   /* the session broke (421, lost, timeout, protocol error, abort) */
    DELIV_SCOPE_SITE,   /* no target of the destination worked (SMTPC_EV_FAILED) */
};

struct smtpc_reply {
    int code;                       /* 2xx/4xx/5xx; synthesized ones too (never 0) */
    char esc[16];                   /* enhanced status code, "" if the server gave none */
    char text[512];                 /* the reply text without code and enhanced code,
                                     * multi-line joined with "; ", control bytes as '?',
                                     * truncated */
    bool local;                     /* made up by petrel (see the list above) */
    enum deliv_scope scope;
};

/* "550 5.1.1 text" (or "550 text" without an enhanced code) into out. */
void smtpc_reply_format(const struct smtpc_reply *r, char *out, size_t size);

/* A message to send. smtpc_send copies this struct; everything it points
 * to is borrowed until SMTPC_EV_DONE. */
struct smtpc_msg {
    const char *qid;                /* for logs */
    const char *sender;             /* "" for <> */
    size_t nrcpts;                  /* ≤ 100 per transaction: the caller splits */
    const char *const *rcpts;
    const unsigned *notify;         /* per rcpt SMTP_NOTIFY_* flags or NULL (DSN passthrough) */
    const char *const *orcpt;       /* per rcpt "type;addr" or NULL entries */
    int ret;                        /* enum smtp_ret */
    const char *envid;              /* or NULL */
    int body;                       /* enum smtp_body */
    bool smtputf8;
    struct span content;            /* CRLF lines, not dot-stuffed */
};

enum smtpc_event {
    SMTPC_EV_READY,   /* greeted and idle: smtpc_send() or smtpc_quit() */
    SMTPC_EV_DONE,    /* the transaction ended: read smtpc_rcpt_reply(); READY follows if the
                       * session can carry another one, else CLOSED */
    SMTPC_EV_FAILED,  /* no target greeted (all refused/timed out/5xx banner): smtpc_failure() */
    SMTPC_EV_CLOSED,  /* last event; the smtpc is freed after the callback returns */
};

typedef void smtpc_event_cb(struct smtpc *c, enum smtpc_event ev, void *arg);

/* Starts a session: targets are copied (ntargets ≥ 1; an AF_UNIX target
 * is a unix-domain socket, AF_INET/AF_INET6 ones are bound to opts->src),
 * opts too except helo_name. Events arrive from later loop iterations, never
 * from inside this call. Each target gets connect_timeout_ms to connect and
 * greeting_timeout_ms for its banner; a target that fails (connect error or
 * timeout, a 4xx/5xx or garbage banner, EHLO and HELO refused, the
 * connection lost or timed out before READY) is logged and the next one
 * tried (after QUIT when the server refused politely).
 * Then READY; or, when no target is left, FAILED (smtpc_failure()) then
 * CLOSED. The FAILED reply is the last reply a server gave if there was
 * one, kept 5xx only when every target failed with a 5xx (5yz x.y.z →
 * 4yz 4.y.z otherwise), else the last synthesized one; scope SITE. */
struct smtpc *smtpc_start(struct uv_loop_s *loop, const struct smtpc_target *targets,
                          size_t ntargets, const struct smtpc_options *opts,
                          smtpc_event_cb *cb, void *arg);

/* Sends one transaction; only after SMTPC_EV_READY (else PANIC), m->nrcpts
 * ≥ 1. Uses PIPELINING (MAIL, every RCPT and DATA in one write), SIZE,
 * 8BITMIME (BODY= only when offered), SMTPUTF8 and DSN (RET/ENVID/NOTIFY/
 * ORCPT, xtext-encoded) when offered. Without sending anything, it fails
 * every recipient with 552 5.3.4 when SIZE is below the message, 553 5.6.7
 * when SMTPUTF8 is needed but not offered. The content is dot-stuffed and
 * written in 64 KiB chunks as the output drains; a missing final CRLF is
 * added. Exactly one DONE follows, from the loop. An unclean end (MAIL or
 * DATA refused, no recipient accepted) sends RSET before READY; a 421, a
 * lost connection, a timeout or a protocol error fails the unanswered
 * recipients (scope CONN) and the session closes after DONE. */
void smtpc_send(struct smtpc *c, const struct smtpc_msg *m);

/* After SMTPC_EV_DONE (until the next smtpc_send): the reply for recipient
 * i (2xx delivered, 4xx temporary, 5xx permanent). */
const struct smtpc_reply *smtpc_rcpt_reply(const struct smtpc *c, size_t i);
/* After SMTPC_EV_FAILED: why (e.g. "451 4.4.1 connect to …: connection refused"). */
const struct smtpc_reply *smtpc_failure(const struct smtpc *c);
/* "mx1.example.org[192.0.2.7]:25" of the target in use (or last tried);
 * "[2001:db8::1]" for IPv6; the IP stands in for an empty host; a unix
 * socket is "host[/path]" ("localhost[/path]" for an empty host). */
const char *smtpc_relay(const struct smtpc *c);
const char *smtpc_remote_host(const struct smtpc *c);
/* The EHLO name said on the connection in use (or last tried). */
const char *smtpc_helo(const struct smtpc *c);
/* The local address of the connection in use ("10.0.0.1"), or NULL before
 * one is connected (logged as src=); NULL for a unix-domain socket too. */
const char *smtpc_local_ip(const struct smtpc *c);
/* The TLS of the connection in use (after its handshake), or NULL when it
 * runs in plaintext; valid until the session's next connect or CLOSED. */
const struct conn_tls_info *smtpc_tls(const struct smtpc *c);
/* Adds the delivery log fields of that TLS (tls=TLSv1.3, cipher=…,
 * verify=ok | fail (reason), resumed=yes|no) to ll, nothing of that in
 * plaintext; and under DANE, once the target's lookup is done, dane=
 * verified | failed (reason) | secure (detail: before the handshake) |
 * unusable (detail) | none (detail) | insecure (detail) | tempfail (detail);
 * with MTA-STS, once the policy is known, mta_sts= enforce (id ID) |
 * testing (id ID) | testing (would fail: reason) | none (detail) |
 * fetch-failed (detail). */
void smtpc_log_tls(const struct smtpc *c, struct log_line *ll);
/* Whether the server advertised DSN (then it reports success itself). */
bool smtpc_server_has_dsn(const struct smtpc *c);
/* Transactions completed on this connection (those that sent MAIL). */
unsigned smtpc_transactions(const struct smtpc *c);

/* Sends QUIT, waits for its reply (command timeout) and closes; CLOSED
 * follows. Meant for READY (or inside the DONE callback); before READY or
 * inside a transaction it acts as smtpc_abort. Idempotent. */
void smtpc_quit(struct smtpc *c);
/* Closes at once; CLOSED follows (no FAILED, no further target). A
 * transaction in progress still gets its DONE first, its unanswered
 * recipients with 451 4.3.2 (scope CONN). Idempotent. */
void smtpc_abort(struct smtpc *c);

#endif
