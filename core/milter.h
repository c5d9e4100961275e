/*
 * milter — the MTA side of the Sendmail milter protocol, version 6, as an
 * engine over conn.h (STYLE.md §1): one connection per applicable filter
 * per SMTP session, filters consulted one after the other in order, each
 * SMTP stage an asynchronous call with one completion callback that
 * carries a struct verdict (verdict.h).
 *
 * Which filters: the milters[] entries in config order, only those named
 * in listeners[].milters when the listener sets that list. Sockets: "unix:/path",
 * "inet:port@host", "inet6:port@host"; host is an IP literal or
 * "localhost" (127.0.0.1 / ::1) — a host name that needs DNS is reported
 * as a filter failure (no blocking lookups on the loop).
 *
 * Life of a session: milter_session_new() connects to every filter at
 * once and negotiates options (SMFIC_OPTNEG: version 6, every action
 * petrel supports, every protocol flag but SMFIP_RCPT_REJ; the filter's
 * SMFIR_SETSYMLIST macro lists are honoured). Then, in SMTP order:
 *   milter_connect → milter_helo (each HELO/EHLO) → per transaction
 *   milter_mail → milter_rcpt (each accepted recipient) → milter_data →
 *   milter_eom (headers, end of headers, body in chunks ≤ 65535 bytes,
 *   end of message) — and milter_abort on RSET or a failed transaction;
 *   milter_session_free at the end (sends QUIT).
 * Each stage first sends the macros the filter asked for (or the defaults
 * below) in SMFIC_MACRO, then the command; SMFIP_NO* flags suppress the
 * command (not its macros), SMFIP_NR_* flags mean no reply is awaited,
 * SMFIR_SKIP stops further commands of the same kind (recipients, headers,
 * body chunks) until another kind is sent.
 *
 * Verdicts (per stage, first objection wins; later filters do not see it):
 *   CONTINUE  every filter continued or accepted. A filter's SMFIR_ACCEPT
 *             at connect/helo ends that filter for the session (QUIT);
 *             at mail..eom it skips that filter for the rest of the message.
 *   REJECT    SMFIR_REJECT: 550 5.7.1 Command rejected;
 *             SMFIR_REPLYCODE 5xx: the filter's reply, raw (multi-line kept).
 *   TEMPFAIL  SMFIR_TEMPFAIL: 451 4.7.1 Service unavailable - try again later;
 *             SMFIR_REPLYCODE 4xx: raw; SMFIR_SHUTDOWN: 421 4.7.0 (close).
 *   DISCARD   SMFIR_DISCARD at mail..eom: accept for the client, then drop
 *             the message; every later stage of this transaction returns
 *             DISCARD without asking the filters. (At connect/helo a
 *             discard is logged and ignored, as Postfix does.)
 * A REJECT/TEMPFAIL at connect or helo is sticky: every later stage of the
 * session returns it again (the filter is closed), as Postfix does; the
 * caller chooses how to greet or refuse.
 * Failures — the filter cannot be reached, a connect/command/eom timeout,
 * the connection drops, a malformed or unexpected packet, a packet over
 * MILTER_PACKET_MAX, a modification the filter did not negotiate — are
 * logged (warning, milter=<name>, reason=) and give the filter's
 * default_action for the rest of the session: accept = the filter is
 * ignored from then on (as if absent; its modifications of an unfinished
 * end of message are dropped); tempfail = 451 4.7.1 Mail filter
 * unavailable, try again later; reject = 550 5.7.1 Mail filter unavailable.
 * Timeouts: connect_timeout for the TCP/unix connect, command_timeout for
 * the negotiation and the connect..data replies, eom_timeout for each reply
 * (and each write) of milter_eom; SMFIR_PROGRESS re-arms the deadline.
 *
 * Default macros per stage (Postfix's lists, plus connection details):
 *   connect  j _ {daemon_name} {daemon_addr} {daemon_port} {if_name}
 *            {if_addr} {client_addr} {client_port} {client_name} v
 *   helo     {tls_version} {cipher} {cipher_bits} {cert_subject} {cert_issuer}
 *   mail     i {auth_type} {auth_authen} {auth_author} {mail_addr} {mail_host}
 *            {mail_mailer}
 *   rcpt     i {rcpt_addr} {rcpt_host} {rcpt_mailer}
 *   data, end of headers, end of message   i
 * Only macros that have a value are sent. The engine sets j _ v
 * {daemon_*} {if_*} {client_*} from milter_conn_info, {mail_*} in
 * milter_mail, {rcpt_*} in milter_rcpt ({*_mailer} = "smtp"), i in
 * milter_eom when a queue id is given; the caller sets the rest with
 * milter_set_macro (i as soon as the queue id exists, {auth_type}
 * {auth_authen} after AUTH, {tls_version} {cipher} {cipher_bits} after
 * STARTTLS).
 *
 * Logs (key: the queue id, else NOQUEUE; session= when known): info
 * "milter-reject" (cmd= milter= client= helo= from= to= reply=),
 * "milter-discard", "milter-hold" (reason=), "milter-modify" (counts=),
 * warning "milter-failure" (milter= cmd= reason= status=<default action>).
 */
#ifndef PETREL_MILTER_H
#define PETREL_MILTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "config.h"
#include "util.h"
#include "verdict.h"

#define MILTER_PACKET_MAX (1024 * 1024) /* largest filter packet accepted (SMFIP_MDS_1M) */
#define MILTER_CHUNK_MAX 65535          /* body bytes per SMFIC_BODY (MILTER_CHUNK_SIZE) */
#define MILTER_MODS_MAX 10000           /* modifications per filter per message */

struct uv_loop_s;
struct milter_session;

/* What the engine needs to know about the SMTP connection; every string is
 * copied by milter_session_new (NULL = unknown). */
struct milter_conn_info {
    const char *session_id;  /* logged as session= */
    const char *hostname;    /* macro j; NULL: cfg->hostname */
    const char *daemon_name; /* {daemon_name}; NULL: the listener's name */
    int family;              /* AF_INET, AF_INET6, AF_UNIX, or AF_UNSPEC (unknown) */
    const char *client_addr; /* "192.0.2.1", "2001:db8::1"; AF_UNIX: socket path */
    int client_port;
    const char *client_name; /* verified reverse name; NULL/"": the filter gets "[addr]" */
    const char *local_addr;  /* {daemon_addr}, {if_addr} */
    int local_port;          /* {daemon_port} */
    const char *if_name;     /* {if_name}; NULL: the hostname */
};

/* One modification a filter asked for at end of message. */
enum milter_mod_kind {
    MILTER_MOD_ADD_HEADER,    /* name, value: append after the last header */
    MILTER_MOD_INSERT_HEADER, /* index (0 = before the first header), name, value */
    MILTER_MOD_CHANGE_HEADER, /* index (1 = first occurrence of name), name, value; appended
                               * when there is no such occurrence (libmilter smfi_chgheader) */
    MILTER_MOD_DELETE_HEADER, /* index, name (a change with an empty value) */
    MILTER_MOD_REPLACE_BODY,  /* value/value_len: the new body, CRLF lines */
    MILTER_MOD_CHANGE_FROM,   /* value: new sender without <> ("" = null sender), args */
    MILTER_MOD_ADD_RCPT,      /* value: address without <>, args (NULL: none) */
    MILTER_MOD_DELETE_RCPT,   /* value: address without <> as the filter gave it */
    MILTER_MOD_QUARANTINE,    /* value: the reason */
};

struct milter_mod {
    enum milter_mod_kind kind;
    const char *filter; /* borrowed: the filter's name (from the config) */
    uint32_t index;     /* header kinds */
    char *name;         /* owned or NULL: header field name */
    char *value;        /* owned, NUL-terminated (never NULL). Headers: the text after the
                         * colon as it will be stored, leading space included, folded
                         * with CRLF + whitespace */
    size_t value_len;
    char *args; /* owned or NULL: ESMTP parameters ("NOTIFY=NEVER ...") */
};

/* Every filter's modifications of one message, in filter order, then in
 * the order each filter sent them. Header/body ones are applied with
 * milter_apply_mods; envelope ones (sender, recipients, quarantine) are for
 * the caller to apply to the envelope. */
struct milter_mods {
    struct milter_mod *v; /* owned */
    size_t n;
    size_t cap;
    bool content;           /* some header or body modification: run milter_apply_mods */
    const char *quarantine; /* borrowed from v[]: the last quarantine reason, or NULL */
};

/* Stage completion: v is borrowed for the duration of the call (copy with
 * verdict_copy to keep it). */
typedef void milter_verdict_cb(struct milter_session *ms, const struct verdict *v, void *arg);
/* End of message completion: mods (never NULL, maybe empty) is valid until
 * the next stage call, milter_abort or milter_session_free on ms; it is
 * empty unless v is CONTINUE. */
typedef void milter_eom_cb(struct milter_session *ms, const struct verdict *v,
                           const struct milter_mods *mods, void *arg);

/* Starts a session: picks the filters that apply to listener lc (cfg and lc
 * are borrowed and must outlive the session, e.g. by holding a config_ref),
 * copies ci, and starts connecting to each filter. Returns NULL when no
 * filter applies (nothing to free). Never calls back. */
struct milter_session *milter_session_new(struct uv_loop_s *loop, const struct petrel_config *cfg,
                                          const struct listener_config *lc,
                                          const struct milter_conn_info *ci);

/* Sends QUIT to every open filter connection and closes it; a pending
 * stage's callback never fires. Safe at any time, from inside a callback
 * too; memory goes once every connection has closed (run the loop).
 * NULL is a no-op. */
void milter_session_free(struct milter_session *ms);

/* Sets (copies) macro name — "i", "{auth_type}" or "auth_type" — to value;
 * NULL unsets it. Takes effect for the commands sent after the call. */
void milter_set_macro(struct milter_session *ms, const char *name, const char *value);

/* The stage calls. Each fires its callback exactly once, from a later loop
 * iteration (never from inside the call), unless milter_session_free comes
 * first; then never. One call at a time: calling while another is pending
 * is a bug (PANIC) — see milter_pending(). The callback may start the next
 * call or free the session. milter_connect must come first. Strings are
 * copied. */
void milter_connect(struct milter_session *ms, milter_verdict_cb *cb, void *arg);
void milter_helo(struct milter_session *ms, const char *helo, milter_verdict_cb *cb, void *arg);
/* sender without <> ("" = null sender); params: the ESMTP parameters as
 * received ("SIZE=123 BODY=8BITMIME"), split on spaces; NULL or "" = none.
 * Filters still inside an earlier transaction get SMFIC_ABORT first. */
void milter_mail(struct milter_session *ms, const char *sender, const char *params,
                 milter_verdict_cb *cb, void *arg);
/* One recipient (without <>); the verdict is for this recipient (REJECT and
 * TEMPFAIL refuse it alone; DISCARD drops the whole message). */
void milter_rcpt(struct milter_session *ms, const char *rcpt, const char *params,
                 milter_verdict_cb *cb, void *arg);
void milter_data(struct milter_session *ms, milter_verdict_cb *cb, void *arg);
/* The message as it will be stored: header section, empty line, body;
 * CRLF lines, not dot-stuffed. Borrowed until the callback. qid (may be
 * NULL) sets macro i and keys the log lines. Each filter in turn gets the
 * message as modified by the filters before it. */
void milter_eom(struct milter_session *ms, struct span content, const char *qid, milter_eom_cb *cb,
                void *arg);
/* Ends the current transaction for every filter inside one (SMFIC_ABORT,
 * no reply) and forgets its state (DISCARD, modifications). Not while a
 * stage call is pending (PANIC). */
void milter_abort(struct milter_session *ms);
/* True while a stage call waits for its callback. */
bool milter_pending(const struct milter_session *ms);

/* Applies the header and body modifications in m, in order, to content
 * (header section + CRLF + body, CRLF lines) and appends the result to out;
 * envelope modifications are ignored. Pure. Header names match ASCII
 * case-insensitively; an index past the last occurrence appends (change)
 * or does nothing (delete); an insert index past the end appends. */
void milter_apply_mods(const struct milter_mods *m, struct span content, struct buf *out);
/* Frees every modification and empties m (m itself is not freed). */
void milter_mods_reset(struct milter_mods *m);

/* ---- wire codec: pure functions, exposed for tests and the fuzzer ---- */

enum milter_frame {
    MILTER_FRAME_OK,      /* *cmd, *payload set; *consumed bytes make up the packet */
    MILTER_FRAME_PARTIAL, /* need more bytes */
    MILTER_FRAME_EMPTY,   /* length 0: no command byte (protocol error) */
    MILTER_FRAME_TOOBIG,  /* length over max (protocol error; decided from the header) */
};

/* Splits one packet (4-byte big-endian length, command byte, data) off the
 * front of in; payload points into in. */
enum milter_frame milter_frame_parse(struct span in, size_t max, char *cmd, struct span *payload,
                                     size_t *consumed);

/* A filter packet decoded (strings point into the payload or are NULL). */
struct milter_reply {
    char cmd;          /* SMFIR_* (or 'O' for the negotiation reply) */
    uint32_t index;    /* CHGHEADER / INSHEADER */
    struct span name;  /* header name; address for rcpt/from; reason; reply text */
    struct span value; /* header value; ESMTP args (len 0: none) */
    bool has_value;
    struct span data; /* REPLBODY / REPLYCODE bytes */
};

/* Decodes cmd + payload; NULL if well formed (strings NUL-terminated where
 * the protocol says so, no bytes left over), else why (static text). An
 * unknown cmd is "unknown reply". */
const char *milter_reply_decode(char cmd, struct span payload, struct milter_reply *out);

/* The negotiation reply: version, actions, protocol flags and any
 * SETSYMLIST lists (lists[stage] for stages 0..6, len 0 = not given). */
struct milter_optneg {
    uint32_t version;
    uint32_t actions;
    uint32_t pflags;
    struct span lists[7];
    bool has_list[7];
};
const char *milter_optneg_decode(struct span payload, struct milter_optneg *out);

#endif
