/*
 * bounce — pure: builds delivery status notifications (RFC 3464 inside
 * RFC 6522 multipart/report): a human-readable part, the
 * message/delivery-status part, and the original message (RET=FULL) or its
 * headers (RET=HDRS, the default) as message/rfc822 or
 * text/rfc822-headers. Sent from <> by the caller.
 */
#ifndef PETREL_BOUNCE_H
#define PETREL_BOUNCE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "util.h"

enum bounce_action { BOUNCE_FAILED, BOUNCE_DELIVERED, BOUNCE_DELAYED, BOUNCE_RELAYED };

struct bounce_rcpt {
    const char *addr;  /* final recipient (rfc822) */
    const char *orcpt; /* "type;address" (decoded) or NULL: Original-Recipient */
    enum bounce_action action;
    const char *status;          /* enhanced code "5.1.1" */
    const char *remote_mta;      /* host name or NULL: Remote-MTA: dns; host */
    const char *diagnostic;      /* full reply "550 5.1.1 No such user" or NULL */
    int64_t last_attempt_ms;     /* 0: omitted */
    int64_t will_retry_until_ms; /* 0: omitted; Will-Retry-Until (BOUNCE_DELAYED only) */
};

struct bounce_params {
    const char *reporting_mta; /* our hostname */
    const char *from_name;     /* "Mail Delivery System" */
    const char *to;            /* the original sender (bounce recipient) */
    const char *orig_qid;      /* queue id of the original message */
    const char *envid;         /* ENVID or NULL: Original-Envelope-Id */
    int64_t arrival_ms;        /* Arrival-Date */
    int64_t now_ms;            /* Date: of the report */
    bool ret_full;             /* RET=FULL: whole message, else headers only */
    bool smtputf8; /* original used SMTPUTF8: message/global-delivery-status (RFC 6533) */
    const struct bounce_rcpt *rcpts;
    size_t nrcpts;
    struct span original;   /* the original message as stored (borrowed) */
    const char *subject;    /* NULL: a default per action */
    const char *text;       /* NULL: the default human-readable text */
    const char *message_id; /* Message-ID to use (without <>) */
};

/* Appends the complete DSN message (header + body, CRLF line ends, lines
 * ≤ 998 octets) to out. Everything in p is borrowed for the call only.
 *
 * One report covers every recipient in p->rcpts (the caller groups the
 * recipients that failed together). The report's kind — subject, text and
 * what is returned — follows the most serious action: any FAILED → a
 * failure report, else any DELAYED → a delay warning, else a success
 * report (DELIVERED/RELAYED). RET=FULL returns the whole message only in
 * a failure report (RFC 3461 4.3); otherwise the header section is
 * returned. The original's octets are copied verbatim (its own lines are
 * as long as they were received).
 *
 * Values are made safe, not trusted: CR, LF and other controls in subject,
 * text, diagnostics, ENVID and addresses cannot add header fields or
 * lines; non-ASCII text in Subject and From is RFC 2047 encoded; non-ASCII
 * addresses use the utf-8 address type (RFC 6533 3). Lines longer than 78
 * octets are folded at spaces (RFC 5322 2.2.3); a run of more than 998
 * octets without a space is broken with CRLF SP, which adds a space when
 * unfolded. The multipart boundary is derived from orig_qid and now_ms and
 * changed until no part contains it.
 *
 * message_id NULL: "<now_ms>.<orig_qid>.dsn@<reporting_mta>". subject
 * NULL: "Undelivered Mail Returned to Sender", "Delayed Mail (still being
 * retried)" or "Successful Mail Delivery Report". text NULL: a Postfix-like
 * explanation with one line per recipient; a given text replaces it (any
 * line ends, lines longer than 998 octets are wrapped). A missing or
 * malformed rcpt status becomes 5.0.0 / 4.0.0 / 2.0.0 by action.
 * PANICs when nrcpts is 0 or `to` is empty (null-sender mail is never
 * bounced). */
void bounce_build(struct buf *out, const struct bounce_params *p);

/* True if msg holds an octet ≥ 0x80: send it with BODY=8BITMIME (and
 * SMTPUTF8 when the original used it). */
bool bounce_is_8bit(struct span msg);

#endif
