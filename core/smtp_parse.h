/*
 * smtp_parse — pure parsing of SMTP command lines, paths and ESMTP
 * parameters (RFC 5321, 1870, 6152, 6531, 3030, 3461, 4954, petrel's XBIND).
 * No I/O, no allocation beyond what the caller passes in; fuzzed.
 * Functions returning `const struct reply *` return NULL when the input is
 * valid; otherwise the reply to send (a parse error *is* its reply).
 *
 * Replies (all static, from replies.def; never NULL-with-error):
 *   501 5.5.4  the command itself is malformed: R_MAIL_SYNTAX / R_RCPT_SYNTAX
 *              (no path, no closing '>', '>' without '<', junk glued to the
 *              path), R_SYNTAX (a control character or NUL among the
 *              parameters), R_HELO_SYNTAX, R_BDAT_SYNTAX, R_XBIND_SYNTAX.
 *   501 5.1.7  R_BAD_SENDER / 501 5.1.3 R_BAD_RCPT: the path is not a valid
 *              RFC 5321 path (also: too long, invalid UTF-8, <> for RCPT, or
 *              does not fit the caller's buffer).
 *   555 5.5.4  every parameter problem: R_BAD_PARAM (unknown or malformed
 *              keyword), R_DUP_PARAM, and R_BAD_PARAM_<KEYWORD> for a missing,
 *              extra or bad value (BODY=BINARYMIME included: not offered).
 *   553 5.6.7  R_NEED_SMTPUTF8: an address that is valid UTF-8 and would be
 *              accepted with SMTPUTF8 but comes without it.
 * Precedence for MAIL/RCPT: command syntax, then the address, then the
 * parameters in order of appearance, then the SMTPUTF8 requirement.
 * On error every output is cleared (addr "" and params zeroed).
 */
#ifndef PETREL_SMTP_PARSE_H
#define PETREL_SMTP_PARSE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "reply.h"
#include "util.h"

enum smtp_verb {
    SMTP_UNKNOWN = 0,
    SMTP_EHLO, SMTP_HELO, SMTP_MAIL, SMTP_RCPT, SMTP_DATA, SMTP_BDAT, SMTP_RSET,
    SMTP_NOOP, SMTP_QUIT, SMTP_VRFY, SMTP_EXPN, SMTP_HELP, SMTP_STARTTLS, SMTP_AUTH,
    SMTP_XBIND,
};

struct smtp_cmd {
    enum smtp_verb verb;
    struct span verb_text; /* the verb as sent (for logs) */
    struct span args;      /* after the verb and its separating space; may be empty */
    bool mail_from;        /* MAIL: "FROM:" prefix present (args starts after it) */
    bool rcpt_to;          /* RCPT: "TO:" prefix present (args starts after it) */
};

/* Splits a command line (without CRLF). Verbs are case-insensitive.
 * For MAIL/RCPT the "FROM:"/"TO:" keyword is matched and removed from args
 * (mail_from/rcpt_to false if missing). Never fails: unknown → SMTP_UNKNOWN. */
void smtp_parse_command(struct span line, struct smtp_cmd *cmd);

/* RFC 5321 4.5.3.1 limits. */
#define SMTP_LOCAL_MAX 64
#define SMTP_DOMAIN_MAX 255
#define SMTP_PATH_MAX 256
#define SMTP_ADDR_SIZE (SMTP_PATH_MAX + 1)

/* EHLO/HELO argument: a domain or an address literal ([1.2.3.4], [IPv6:…]).
 * Copied into out (NUL-terminated). Non-ASCII is refused (501 5.5.4); an
 * underscore is accepted in labels, as real-world HELO names carry them. */
const struct reply *smtp_parse_helo(struct span args, char *out, size_t size);

enum smtp_body { SMTP_BODY_NONE = 0, SMTP_BODY_7BIT, SMTP_BODY_8BITMIME };
enum smtp_ret { SMTP_RET_NONE = 0, SMTP_RET_FULL, SMTP_RET_HDRS };

#define SMTP_ENVID_MAX 100      /* RFC 3461 4.4 */
#define SMTP_ORCPT_MAX 500      /* RFC 3461 4.2 (xtext-decoded) */
#define SMTP_HOSTNAME_MAX 255

struct smtp_mail_params {
    bool has_size;
    uint64_t size;                     /* SIZE=n (RFC 1870) */
    enum smtp_body body;               /* BODY=7BIT|8BITMIME (RFC 6152) */
    bool smtputf8;                     /* SMTPUTF8 (RFC 6531) */
    enum smtp_ret ret;                 /* RET=FULL|HDRS (RFC 3461) */
    char envid[SMTP_ENVID_MAX + 1];    /* ENVID=xtext, decoded; "" if absent */
    bool has_auth;
    char auth[SMTP_ADDR_SIZE];         /* AUTH=xtext mailbox (RFC 4954 5), decoded; "<>" allowed */
    bool has_xbind;
    char xbind_ip[64];                 /* XBIND=<ip>[,<hostname>] (petrel) */
    char xbind_hostname[SMTP_HOSTNAME_MAX + 1];
};

enum smtp_notify {
    SMTP_NOTIFY_NEVER = 1,
    SMTP_NOTIFY_SUCCESS = 2,
    SMTP_NOTIFY_FAILURE = 4,
    SMTP_NOTIFY_DELAY = 8,
};

struct smtp_rcpt_params {
    unsigned notify;                   /* SMTP_NOTIFY_* flags; 0 if absent */
    char orcpt_type[32];               /* "rfc822" / "utf-8"; "" if absent */
    char orcpt[SMTP_ORCPT_MAX + 1];    /* decoded xtext address */
};

/* MAIL FROM: args (after "FROM:"): "<path> [params]". The reverse path
 * (without angle brackets and without any source route; "" for the null
 * sender <>) goes into addr. Leading spaces after the colon and a path
 * without angle brackets are tolerated (as Postfix does). Errors:
 * 501 5.5.4 syntax, 501 5.1.7 bad address, 553 5.6.7 non-ASCII without
 * SMTPUTF8, 555 5.5.4 unknown/malformed/duplicate parameter. */
const struct reply *smtp_parse_mail(struct span args, char *addr, size_t addr_size,
                                    struct smtp_mail_params *p);

/* RCPT TO: args (after "TO:"). "<Postmaster>" (no domain) is accepted.
 * smtputf8: whether MAIL carried SMTPUTF8 (non-ASCII allowed).
 * Errors: 501 5.5.4 syntax, 501 5.1.3 bad address, 553 5.6.7, 555 5.5.4. */
const struct reply *smtp_parse_rcpt(struct span args, bool smtputf8, char *addr,
                                    size_t addr_size, struct smtp_rcpt_params *p);

/* BDAT args: "<chunk-size> [LAST]" (RFC 3030). 501 5.5.4 on bad syntax. */
const struct reply *smtp_parse_bdat(struct span args, uint64_t *size, bool *last);

/* XBIND args: "<ip> [<hostname>]" or "RESET". ip must be a literal IPv4/IPv6
 * address; hostname a valid domain name. 501 5.5.4 on bad syntax. */
const struct reply *smtp_parse_xbind(struct span args, bool *reset, char *ip, size_t ip_size,
                                     char *hostname, size_t hostname_size);

/* Address helpers (for addresses already validated by the parsers). */
/* The domain part after the last '@' outside quotes ("" if none). */
struct span smtp_addr_domain(const char *addr);
/* True if s is a syntactically valid domain name (LDH labels, ≤255). */
bool smtp_valid_domain(const char *s, size_t len, bool allow_utf8);
/* True if s holds only ASCII bytes. */
bool smtp_is_ascii(const char *s, size_t len);
/* Decodes RFC 3461 xtext into out; false on bad encoding or overflow. */
bool smtp_xtext_decode(struct span in, char *out, size_t size);
/* Encodes into xtext; false on overflow. */
bool smtp_xtext_encode(const char *in, char *out, size_t size);

#endif
