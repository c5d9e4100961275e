/*
 * verdict — the one decision Lua hooks, milters and plugins yield (STYLE.md
 * §6): continue, accept, reject, tempfail, discard or quarantine, with the
 * SMTP reply for reject and tempfail. Only smtp_server turns a verdict into
 * bytes. Replies that come from outside (a milter's SMFIR_REPLYCODE, a Lua
 * string) are validated as Postfix's milter8 does before they are trusted:
 * verdict_set_raw() parses and checks one, verdict_check() checks a whole
 * verdict (a reject with a 2xx code is refused, and the caller applies its
 * on_error / default_action).
 *
 * Storage: reply.esc, reply.text and raw are either static strings (from
 * replies.def: verdict_set) or point into `owned`, one heap block the
 * verdict owns (verdict_setf, verdict_set_raw, verdict_copy); verdict_clear
 * frees it. A struct verdict is plain data otherwise: copy it only with
 * verdict_copy (a struct copy would share `owned`).
 */
#ifndef PETREL_VERDICT_H
#define PETREL_VERDICT_H

#include <stdbool.h>
#include <stddef.h>

#include "reply.h"

enum verdict_kind {
    VERDICT_CONTINUE = 0, /* no objection: go on (the default) */
    VERDICT_ACCEPT,       /* accept; skip the rest of this source's checks */
    VERDICT_REJECT,       /* refuse with reply (5xx) */
    VERDICT_TEMPFAIL,     /* refuse with reply (4xx) */
    VERDICT_DISCARD,      /* tell the client it was accepted, then drop the message (logged) */
    VERDICT_QUARANTINE,   /* accept and hold in the queue, undelivered; reply.text = reason */
};

struct verdict {
    enum verdict_kind kind;
    struct reply reply; /* REJECT/TEMPFAIL: code, esc (never ""), text of the first line.
                         * Other kinds: code 0 (none) or an optional 2xx; QUARANTINE keeps
                         * its reason in text. esc/text never NULL. */
    const char *raw;    /* NULL, or the whole reply as the peer wrote it, lines separated by
                         * CRLF, no final CRLF ("550-5.7.1 a\r\n550 5.7.1 b"): when set,
                         * smtp_server sends raw (plus CRLF) instead of code/esc/text */
    char *owned;        /* owned: storage behind reply.esc/text and raw; NULL if static */
};

/* A CONTINUE verdict that owns nothing. */
#define VERDICT_INIT                                                                               \
    {                                                                                              \
        VERDICT_CONTINUE, {0, "", ""}, NULL, NULL                                                  \
    }

/* Sets v to CONTINUE without freeing anything (for fresh memory). */
void verdict_init(struct verdict *v);
/* Frees what v owns and sets it to CONTINUE. */
void verdict_clear(struct verdict *v);
/* kind with a static reply (borrowed: a replies.def entry, or NULL for
 * none); frees what v owned before. */
void verdict_set(struct verdict *v, enum verdict_kind kind, const struct reply *r);
/* kind with a reply built from code, esc and a printf text, copied into
 * v->owned (text with CR/LF replaced by spaces). */
void verdict_setf(struct verdict *v, enum verdict_kind kind, int code, const char *esc,
                  const char *fmt, ...) __attribute__((format(printf, 5, 6)));
/* Parses a reply a peer gave as text (len bytes, no NUL inside; a single
 * trailing NUL or CRLF is ignored), one line or several separated by CRLF,
 * each "ddd-text" but the last "ddd text" (Postfix milter8_valid_smtp_reply):
 * the code 4xx or 5xx and the same on every line; an enhanced status code,
 * where a line has one, of the same class (RFC 3463); no control characters
 * but TAB. Sendmail's "%%" becomes "%", a lone '%' is dropped. On success
 * v becomes TEMPFAIL (4xx) or REJECT (5xx) with raw = the reply and
 * reply = code, the first line's enhanced code (4.7.1 / 5.7.1 when it has
 * none) and text; returns NULL. Otherwise returns why (static text) and
 * leaves v unchanged. */
const char *verdict_set_raw(struct verdict *v, const char *text, size_t len)
    __attribute__((warn_unused_result));
/* Splits a policy's "x.y.z text" (Lua's petrel.reject, a plugin's
 * set_verdict) into the enhanced code (copied into esc) and the text (a
 * pointer into s); a text without an enhanced code gets dflt. NULL, or why
 * the reply is invalid (static text). */
const char *verdict_split_text(const char *s, const char *dflt, char *esc, size_t esc_size,
                               const char **text) __attribute__((warn_unused_result));
/* The verdict of a failed policy (Lua error, bad plugin answer) under
 * lua.on_error (enum milter_action: accept, tempfail, reject): CONTINUE,
 * R_POLICY_TEMPFAIL or R_POLICY_REJECT. */
void verdict_set_on_error(struct verdict *v, int on_error);
/* The name of an enum milter_action (lua.on_error, a milter's
 * default_action) for logs: "accept", "tempfail", "reject". */
const char *verdict_action_name(int action);
/* Deep copy; dst's previous contents are freed (dst may equal src). */
void verdict_copy(struct verdict *dst, const struct verdict *src);
/* Moves src into dst (dst's previous contents are freed); src becomes
 * CONTINUE. */
void verdict_move(struct verdict *dst, struct verdict *src);

/* NULL if v is consistent, else why: REJECT needs a 5xx and TEMPFAIL a 4xx
 * code with an enhanced code of the same class (reply_check); other kinds
 * carry no code or a 2xx one; text holds no CR/LF; raw, if set, must parse
 * as above with the same code. */
const char *verdict_check(const struct verdict *v);

/* "continue", "accept", "reject", "tempfail", "discard", "quarantine". */
const char *verdict_kind_name(enum verdict_kind k);
/* One line for logs: "550 5.7.1 text" (raw lines joined by "; "), or the
 * kind name when there is no reply; always NUL-terminated. */
void verdict_format(const struct verdict *v, char *out, size_t size);

#endif
