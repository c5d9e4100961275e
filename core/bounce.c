/*
 * bounce — pure: writes delivery status notifications. One call builds one
 * complete RFC 5322 message: a multipart/report (RFC 6522) with a
 * human-readable text/plain part, a message/delivery-status part (RFC 3464;
 * message/global-delivery-status for SMTPUTF8 originals, RFC 6533 6) and
 * the original message or its header section.
 *
 * Owns nothing beyond the call; allocates only scratch buffers. Deciding
 * when to bounce (NOTIFY, null sender, grouping recipients), queueing the
 * report from <> and the Lua bounce hook's subject/text are the caller's.
 *
 * Everything that comes from peers or hooks (replies, ORCPT, ENVID, Lua
 * text) is cleaned before it is written: no value can end a line, so none
 * can add a header field, a DSN field or a MIME boundary line.
 */
#include "bounce.h"

#include <stdio.h>
#include <string.h>

#define BOUNCE_LINE_MAX 998 /* RFC 5322 2.1.1: MUST, without CRLF */
#define BOUNCE_FOLD_AT 78   /* RFC 5322 2.1.1: SHOULD */
#define BOUNCE_EW_CHUNK 45  /* octets per encoded-word: 60 base64 chars, 72 in all (RFC 2047 2) */
#define BOUNCE_QID_MAX 24   /* queue id octets used in the boundary */

enum bounce_kind { KIND_FAILED, KIND_DELAYED, KIND_SUCCESS };

/* ---- UTF-8 and cleaning ---------------------------------------------------- */

/* Length of the well-formed UTF-8 sequence at p (RFC 3629 4: no overlongs,
 * no surrogates, ≤ U+10FFFF) and its code point, or 0 if malformed. */
static size_t
bounce_utf8(const unsigned char *p, size_t avail, uint32_t *cp)
{
    unsigned char c = p[0];
    size_t n;
    uint32_t v;
    uint32_t min;
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xc2 && c <= 0xdf) {
        n = 2;
        v = c & 0x1f;
        min = 0x80;
    } else if (c >= 0xe0 && c <= 0xef) {
        n = 3;
        v = c & 0x0f;
        min = 0x800;
    } else if (c >= 0xf0 && c <= 0xf4) {
        n = 4;
        v = c & 0x07;
        min = 0x10000;
    } else {
        return 0;
    }
    if (avail < n)
        return 0;
    for (size_t i = 1; i < n; i++) {
        if ((p[i] & 0xc0) != 0x80)
            return 0;
        v = (v << 6) | (p[i] & 0x3f);
    }
    if (v < min || v > 0x10ffff || (v >= 0xd800 && v <= 0xdfff))
        return 0;
    *cp = v;
    return n;
}

static bool
bounce_is_ctl(unsigned char c)
{
    return c < 0x20 || c == 0x7f;
}

/* A copy of n octets of s fit for one line (owned): each run of CR/LF and
 * every other control (TAB too, unless body) becomes one space; octets
 * ≥ 0x80 stay where they form well-formed UTF-8 and utf8 is true, else
 * become '?'. Trailing spaces are removed, and leading ones unless body
 * (a line of body text keeps its indentation). */
static char *
bounce_clean_n(const char *s, size_t n, bool utf8, bool body)
{
    const unsigned char *u = (const unsigned char *)s;
    char *out = xmalloc(n + 1);
    size_t o = 0;
    for (size_t i = 0; i < n;) {
        unsigned char c = u[i];
        if (c == '\r' || c == '\n') {
            while (i < n && (u[i] == '\r' || u[i] == '\n'))
                i++;
            out[o++] = ' ';
            continue;
        }
        if (c == '\t' && body) {
            out[o++] = '\t';
            i++;
            continue;
        }
        if (bounce_is_ctl(c)) {
            out[o++] = ' ';
            i++;
            continue;
        }
        if (c < 0x80) {
            out[o++] = (char)c;
            i++;
            continue;
        }
        uint32_t cp;
        size_t len = bounce_utf8(u + i, n - i, &cp);
        if (utf8 && len > 0) {
            memcpy(out + o, s + i, len);
            o += len;
            i += len;
        } else {
            out[o++] = '?';
            i += len > 0 ? len : 1;
        }
    }
    size_t start = 0;
    while (!body && start < o && out[start] == ' ')
        start++;
    while (o > start && (out[o - 1] == ' ' || out[o - 1] == '\t'))
        o--;
    memmove(out, out + start, o - start);
    out[o - start] = '\0';
    return out;
}

static char *
bounce_clean(const char *s, bool utf8)
{
    return bounce_clean_n(s != NULL ? s : "", s != NULL ? strlen(s) : 0, utf8, false);
}

static bool
bounce_is_ascii_printable(const char *s)
{
    for (; *s != '\0'; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s >= 0x7f)
            return false;
    return true;
}

bool
bounce_is_8bit(struct span msg)
{
    for (size_t i = 0; i < msg.len; i++)
        if ((unsigned char)msg.p[i] >= 0x80)
            return true;
    return false;
}

/* How many of the n octets at s to take so as not to split a UTF-8
 * sequence: backs up over continuation octets (at most 3). */
static size_t
bounce_utf8_cut(const char *s, size_t n, size_t want)
{
    if (want >= n)
        return n;
    size_t take = want;
    while (take > 0 && want - take < 3 && ((unsigned char)s[take] & 0xc0) == 0x80)
        take--;
    return take > 0 ? take : want;
}

/* ---- header fields ----------------------------------------------------------- */

/* Appends "Name: value" CRLF, folded (RFC 5322 2.2.3): before a space when
 * the line would pass 78 octets, so unfolding restores the value exactly;
 * a run without spaces that would pass 998 octets is broken with CRLF SP
 * at a UTF-8 character boundary. value is clean (no CR, LF). */
static void
bounce_field(struct buf *b, const char *name, const char *value)
{
    size_t namelen = strlen(name);
    buf_append(b, name, namelen);
    buf_append(b, ":", 1);
    /* The value with its leading space, cut into segments: a space (or
     * the start) followed by non-spaces. A fold goes before a segment. */
    char *v = xasprintf(" %s", value);
    size_t n = strlen(v);
    size_t col = namelen + 1;
    size_t i = 0;
    while (i < n) {
        size_t j = i + 1;
        while (j < n && v[j] != ' ')
            j++;
        /* Not before a lone space: that could leave a line of only WSP. */
        if (v[i] == ' ' && j - i > 1 && col > namelen + 1 && col + (j - i) > BOUNCE_FOLD_AT) {
            buf_append(b, "\r\n", 2);
            col = 0;
        }
        while (col + (j - i) > BOUNCE_LINE_MAX) {
            size_t room = BOUNCE_LINE_MAX - col;
            size_t take = room > 0 ? bounce_utf8_cut(v + i, j - i, room) : 0;
            buf_append(b, v + i, take);
            i += take;
            if (v[i] == ' ' && take == 0 && col > 0) {
                buf_append(b, "\r\n", 2); /* the space itself is the fold */
                col = 0;
            } else {
                buf_append(b, "\r\n ", 3);
                col = 1;
            }
        }
        buf_append(b, v + i, j - i);
        col += j - i;
        i = j;
    }
    buf_append(b, "\r\n", 2);
    free(v);
}

static void
bounce_base64(struct buf *b, const unsigned char *p, size_t n)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char q[4];
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)p[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)p[i + 1] << 8;
        if (i + 2 < n)
            v |= p[i + 2];
        q[0] = tab[(v >> 18) & 63];
        q[1] = tab[(v >> 12) & 63];
        q[2] = i + 1 < n ? tab[(v >> 6) & 63] : '=';
        q[3] = i + 2 < n ? tab[v & 63] : '=';
        buf_append(b, q, 4);
    }
}

/* s as RFC 2047 "B" encoded-words, one per line (joined by CRLF SP), each
 * holding whole UTF-8 characters (RFC 2047 5). s is clean UTF-8. */
static void
bounce_encoded_words(struct buf *b, const char *s)
{
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        size_t take = bounce_utf8_cut(s + i, n - i, BOUNCE_EW_CHUNK);
        if (i > 0)
            buf_append(b, "\r\n ", 3);
        buf_append_str(b, "=?utf-8?B?");
        bounce_base64(b, (const unsigned char *)s + i, take);
        buf_append_str(b, "?=");
        i += take;
    }
}

/* RFC 5322 3.2.3 atext, plus the space between atoms of a phrase. */
static bool
bounce_is_phrase_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == ' ' ||
           (c != 0 && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL);
}

/* From: <display name> <MAILER-DAEMON@host>. The name goes out as atoms,
 * a quoted-string, or encoded-words (non-ASCII), whichever it needs. */
static void
bounce_from(struct buf *b, const char *from_name, const char *host)
{
    char *name = bounce_clean(from_name, true);
    char *mbox = bounce_clean(host, false);
    if (name[0] == '\0') {
        char *v = xasprintf("<MAILER-DAEMON@%s>", mbox);
        bounce_field(b, "From", v);
        free(v);
    } else if (bounce_is_ascii_printable(name)) {
        bool atoms = true;
        for (const char *p = name; *p != '\0'; p++)
            atoms = atoms && bounce_is_phrase_char((unsigned char)*p);
        struct buf v;
        buf_init(&v);
        if (atoms) {
            buf_append_str(&v, name);
        } else { /* quoted-string: escape '"' and '\' (RFC 5322 3.2.4) */
            buf_append(&v, "\"", 1);
            for (const char *p = name; *p != '\0'; p++) {
                if (*p == '"' || *p == '\\')
                    buf_append(&v, "\\", 1);
                buf_append(&v, p, 1);
            }
            buf_append(&v, "\"", 1);
        }
        buf_printf(&v, " <MAILER-DAEMON@%s>", mbox);
        buf_append(&v, "", 1);
        bounce_field(b, "From", buf_ptr(&v));
        buf_reset(&v);
    } else {
        buf_append_str(b, "From: ");
        bounce_encoded_words(b, name);
        buf_printf(b, "\r\n <MAILER-DAEMON@%s>\r\n", mbox);
    }
    free(name);
    free(mbox);
}

static void
bounce_subject(struct buf *b, const char *subject)
{
    char *s = bounce_clean(subject, true);
    if (bounce_is_ascii_printable(s)) {
        bounce_field(b, "Subject", s);
    } else {
        buf_append_str(b, "Subject: ");
        bounce_encoded_words(b, s);
        buf_append(b, "\r\n", 2);
    }
    free(s);
}

/* ---- DSN field values -------------------------------------------------------- */

/* RFC 6533 3 QCHARxtext: printable ASCII except '+', '=', '\' and space. */
static bool
bounce_is_qchar(unsigned char c)
{
    return c > 0x20 && c < 0x7f && c != '+' && c != '=' && c != '\\';
}

static void
bounce_hexpoint(struct buf *b, uint32_t cp)
{
    buf_printf(b, cp < 0x100 ? "\\x{%02X}" : "\\x{%X}", (unsigned)cp);
}

/* An address as utf-8-addr-xtext (global false: everything outside
 * QCHARxtext as \x{HEX}) or utf-8-addr-unitext (global: UTF-8 stays).
 * already_encoded keeps '\', '+', '=' (the value is in that form already,
 * as an ORCPT of type utf-8 is). Malformed octets are written as \x{HH}. */
static void
bounce_utf8_addr(struct buf *b, const char *addr, bool global, bool already_encoded)
{
    const unsigned char *u = (const unsigned char *)addr;
    size_t n = strlen(addr);
    for (size_t i = 0; i < n;) {
        uint32_t cp;
        size_t len = bounce_utf8(u + i, n - i, &cp);
        if (len == 0) {
            bounce_hexpoint(b, u[i]);
            i++;
        } else if (len > 1 && global) {
            buf_append(b, addr + i, len);
            i += len;
        } else if (len == 1 &&
                   (bounce_is_qchar(u[i]) || (already_encoded && strchr("\\+=", u[i]) != NULL))) {
            buf_append(b, addr + i, 1);
            i++;
        } else {
            bounce_hexpoint(b, cp);
            i += len;
        }
    }
}

/* "rfc822; addr" for a printable ASCII address, else "utf-8; <encoded>". */
static void
bounce_addr_field(struct buf *b, const char *name, const char *type, const char *addr, bool global)
{
    struct buf v;
    buf_init(&v);
    bool utf8_type = ascii_casecmp(type, "utf-8") == 0;
    if (bounce_is_ascii_printable(addr) && !utf8_type) {
        buf_printf(&v, "%s; %s", type, addr);
    } else {
        buf_append_str(&v, utf8_type ? type : "utf-8");
        buf_append_str(&v, "; ");
        bounce_utf8_addr(&v, addr, global, utf8_type);
    }
    buf_append(&v, "", 1);
    bounce_field(b, name, buf_ptr(&v));
    buf_reset(&v);
}

/* ORCPT "type;address" (decoded): a type that is not an atom of letters,
 * digits and '-' is replaced by rfc822 (RFC 3461 4.2 addr-type). */
static void
bounce_orcpt_field(struct buf *b, const char *orcpt, bool global)
{
    const char *semi = strchr(orcpt, ';');
    char type[33] = "rfc822";
    const char *addr = orcpt;
    if (semi != NULL) {
        size_t tlen = (size_t)(semi - orcpt);
        bool ok = tlen > 0 && tlen < sizeof(type);
        for (size_t i = 0; ok && i < tlen; i++) {
            char c = orcpt[i];
            ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '-';
        }
        if (ok) {
            memcpy(type, orcpt, tlen);
            type[tlen] = '\0';
        }
        addr = semi + 1;
    }
    while (*addr == ' ')
        addr++;
    bounce_addr_field(b, "Original-Recipient", type, addr, global);
}

/* RFC 3463 status-code: class "." subject "." detail, 1-3 digits each. */
static bool
bounce_valid_status(const char *s)
{
    if (s == NULL || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.')
        return false;
    s += 2;
    for (int part = 0; part < 2; part++) {
        size_t d = 0;
        while (s[d] >= '0' && s[d] <= '9')
            d++;
        if (d == 0 || d > 3)
            return false;
        s += d;
        if (part == 0 && *s++ != '.')
            return false;
    }
    return *s == '\0';
}

static const char *
bounce_action_name(enum bounce_action a)
{
    switch (a) {
    case BOUNCE_FAILED:
        return "failed";
    case BOUNCE_DELIVERED:
        return "delivered";
    case BOUNCE_DELAYED:
        return "delayed";
    case BOUNCE_RELAYED:
        return "relayed";
    }
    PANIC("bounce action %d", (int)a);
}

static const char *
bounce_default_status(enum bounce_action a)
{
    return a == BOUNCE_FAILED ? "5.0.0" : a == BOUNCE_DELAYED ? "4.0.0" : "2.0.0";
}

/* An SMTP reply starts with a 2xx-5xx code (RFC 5321 4.2); anything else
 * (a DNS or connection failure described by us) is petrel's own type. */
static bool
bounce_is_smtp_reply(const char *s)
{
    return s[0] >= '2' && s[0] <= '5' && s[1] >= '0' && s[1] <= '9' && s[2] >= '0' && s[2] <= '9' &&
           (s[3] == '\0' || s[3] == ' ' || s[3] == '-');
}

static void
bounce_date_field(struct buf *b, const char *name, int64_t ms)
{
    char date[64];
    rfc5322_date(date, sizeof(date), ms / 1000);
    bounce_field(b, name, date);
}

/* The message/delivery-status body (RFC 3464 2.1): per-message fields,
 * then one group per recipient, each group after a blank line. Fields go in
 * the order of the RFC 3464 2.2 and 2.3 grammar, extension fields last. */
static void
bounce_status_part(struct buf *b, const struct bounce_params *p)
{
    bool global = p->smtputf8;
    char *v;
    char *f;
    if (p->envid != NULL && p->envid[0] != '\0') {
        v = bounce_clean(p->envid, global);
        bounce_field(b, "Original-Envelope-Id", v);
        free(v);
    }
    v = bounce_clean(p->reporting_mta, false);
    f = xasprintf("dns; %s", v);
    bounce_field(b, "Reporting-MTA", f);
    free(f);
    free(v);
    if (p->arrival_ms != 0)
        bounce_date_field(b, "Arrival-Date", p->arrival_ms);
    if (p->orig_qid != NULL && p->orig_qid[0] != '\0') {
        v = bounce_clean(p->orig_qid, false);
        bounce_field(b, "X-Petrel-Queue-ID", v);
        free(v);
    }

    for (size_t i = 0; i < p->nrcpts; i++) {
        const struct bounce_rcpt *r = &p->rcpts[i];
        buf_append(b, "\r\n", 2);
        if (r->orcpt != NULL && r->orcpt[0] != '\0') {
            char *o = bounce_clean(r->orcpt, true);
            bounce_orcpt_field(b, o, global);
            free(o);
        }
        char *addr = bounce_clean(r->addr, true);
        bounce_addr_field(b, "Final-Recipient", "rfc822", addr, global);
        free(addr);
        bounce_field(b, "Action", bounce_action_name(r->action));
        bounce_field(b, "Status",
                     bounce_valid_status(r->status) ? r->status : bounce_default_status(r->action));
        if (r->remote_mta != NULL && r->remote_mta[0] != '\0') {
            v = bounce_clean(r->remote_mta, false);
            f = xasprintf("dns; %s", v);
            bounce_field(b, "Remote-MTA", f);
            free(f);
            free(v);
        }
        if (r->diagnostic != NULL && r->diagnostic[0] != '\0') {
            v = bounce_clean(r->diagnostic, global);
            f = xasprintf("%s; %s", bounce_is_smtp_reply(v) ? "smtp" : "X-Petrel", v);
            bounce_field(b, "Diagnostic-Code", f);
            free(f);
            free(v);
        }
        if (r->last_attempt_ms != 0)
            bounce_date_field(b, "Last-Attempt-Date", r->last_attempt_ms);
        if (r->action == BOUNCE_DELAYED && r->will_retry_until_ms != 0)
            bounce_date_field(b, "Will-Retry-Until", r->will_retry_until_ms);
    }
}

/* ---- the human-readable part --------------------------------------------------- */

/* Appends one logical line (no CR/LF inside) wrapped at spaces to width
 * octets, continuation lines starting with indent; a word that cannot fit
 * in 998 octets is split at a UTF-8 character boundary. Ends with CRLF. */
static void
bounce_wrap(struct buf *b, const char *s, size_t width, const char *indent)
{
    size_t n = strlen(s);
    size_t ilen = strlen(indent);
    size_t col = 0;
    size_t line_start = 0;
    size_t i = 0;
    while (i < n) {
        size_t ws = i;
        while (i < n && s[i] == ' ')
            i++;
        size_t we = i;
        while (we < n && s[we] != ' ')
            we++;
        if (we == i)
            break; /* trailing spaces */
        size_t nsp = i - ws;
        if (col > line_start && col + nsp + (we - i) > width) {
            buf_append(b, "\r\n", 2);
            buf_append(b, indent, ilen);
            col = line_start = ilen;
            nsp = 0;
        }
        buf_append(b, s + ws, nsp);
        col += nsp;
        while (col + (we - i) > BOUNCE_LINE_MAX) {
            size_t room = BOUNCE_LINE_MAX - col;
            size_t take = room > 0 ? bounce_utf8_cut(s + i, we - i, room) : 0;
            buf_append(b, s + i, take);
            i += take;
            buf_append(b, "\r\n", 2);
            buf_append(b, indent, ilen);
            col = line_start = ilen;
        }
        buf_append(b, s + i, we - i);
        col += we - i;
        i = we;
    }
    buf_append(b, "\r\n", 2);
}

/* A caller's text (Lua bounce hook): any line ends become CRLF, controls
 * other than TAB become spaces, lines are wrapped only past 998 octets. */
static void
bounce_user_text(struct buf *b, const char *text)
{
    const char *p = text;
    while (*p != '\0') {
        size_t len = strcspn(p, "\r\n");
        char *line = bounce_clean_n(p, len, true, true);
        bounce_wrap(b, line, BOUNCE_LINE_MAX, "");
        free(line);
        p += len;
        if (p[0] == '\r' && p[1] == '\n')
            p += 2;
        else if (p[0] != '\0')
            p++;
    }
}

static void
bounce_rcpt_line(struct buf *b, const struct bounce_rcpt *r)
{
    char *addr = bounce_clean(r->addr, true);
    char *host = bounce_clean(r->remote_mta, false);
    char *diag = bounce_clean(r->diagnostic, true);
    const char *status =
        bounce_valid_status(r->status) ? r->status : bounce_default_status(r->action);
    char *line;
    bool h = host[0] != '\0';
    bool d = diag[0] != '\0';
    switch (r->action) {
    case BOUNCE_DELIVERED:
    case BOUNCE_RELAYED: {
        const char *verb = r->action == BOUNCE_DELIVERED ? "delivered" : "relayed";
        if (h && d)
            line = xasprintf("<%s>: %s via %s: %s", addr, verb, host, diag);
        else if (h)
            line = xasprintf("<%s>: %s via %s", addr, verb, host);
        else if (d)
            line = xasprintf("<%s>: %s: %s", addr, verb, diag);
        else
            line = xasprintf("<%s>: %s", addr, verb);
        break;
    }
    case BOUNCE_FAILED:
    case BOUNCE_DELAYED:
    default:
        if (h && d)
            line = xasprintf("<%s>: host %s said: %s", addr, host, diag);
        else if (d)
            line = xasprintf("<%s>: %s", addr, diag);
        else if (r->action == BOUNCE_DELAYED)
            line = xasprintf("<%s>: delivery temporarily deferred (%s)", addr, status);
        else
            line = xasprintf("<%s>: delivery failed (%s)", addr, status);
        break;
    }
    bounce_wrap(b, line, BOUNCE_FOLD_AT, "    ");
    free(line);
    free(addr);
    free(host);
    free(diag);
}

/* The default explanation, worded after Postfix's bounce templates. */
static void
bounce_default_text(struct buf *b, const struct bounce_params *p, enum bounce_kind kind, bool full)
{
    char *host = bounce_clean(p->reporting_mta, false);
    char *intro = xasprintf("This is the mail system at host %s.", host);
    bounce_wrap(b, intro, BOUNCE_FOLD_AT, "");
    free(intro);
    free(host);
    buf_append(b, "\r\n", 2);
    switch (kind) {
    case KIND_FAILED:
        bounce_wrap(b,
                    full ? "I'm sorry to have to inform you that your message could not be "
                           "delivered to one or more recipients. It's attached below."
                         : "I'm sorry to have to inform you that your message could not be "
                           "delivered to one or more recipients. Its headers are attached below.",
                    BOUNCE_FOLD_AT, "");
        buf_append(b, "\r\n", 2);
        bounce_wrap(b, "For further assistance, please send mail to postmaster.", BOUNCE_FOLD_AT,
                    "");
        buf_append(b, "\r\n", 2);
        bounce_wrap(b,
                    "If you do so, please include this problem report. You can delete your own "
                    "text from the attached returned message.",
                    BOUNCE_FOLD_AT, "");
        break;
    case KIND_DELAYED:
        buf_append_str(b, "####################################################################\r\n"
                          "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #\r\n"
                          "####################################################################\r\n"
                          "\r\n");
        bounce_wrap(b,
                    "Your message could not be delivered yet to one or more recipients. The mail "
                    "system will keep trying, and will tell you if it finally gives up.",
                    BOUNCE_FOLD_AT, "");
        buf_append(b, "\r\n", 2);
        bounce_wrap(b, "For further assistance, please send mail to postmaster.", BOUNCE_FOLD_AT,
                    "");
        break;
    case KIND_SUCCESS:
        bounce_wrap(b,
                    "Your message was successfully delivered to the destination(s) listed below. "
                    "If the message was delivered to a mailbox you will receive no further "
                    "notifications. Otherwise you may still receive notifications of mail "
                    "delivery errors from other systems.",
                    BOUNCE_FOLD_AT, "");
        break;
    }
    buf_append_str(b, "\r\n                   The mail system\r\n\r\n");
    for (size_t i = 0; i < p->nrcpts; i++) {
        if (i > 0)
            buf_append(b, "\r\n", 2);
        bounce_rcpt_line(b, &p->rcpts[i]);
    }
}

/* ---- assembly ---------------------------------------------------------------- */

static bool
bounce_contains(const char *hay, size_t len, const char *needle)
{
    return memmem(hay, len, needle, strlen(needle)) != NULL;
}

/* The header section of the original, with the CRLF ending its last field
 * (RFC 5322 2.1), without the empty line; all of it if it has no body. */
static struct span
bounce_header_section(struct span msg)
{
    if (msg.len >= 2 && msg.p[0] == '\r' && msg.p[1] == '\n')
        return (struct span){msg.p, 0};
    const char *end = memmem(msg.p, msg.len, "\r\n\r\n", 4);
    if (end == NULL)
        return msg;
    return (struct span){msg.p, (size_t)(end - msg.p) + 2};
}

static void
bounce_part_header(struct buf *b, const char *boundary, const char *description, const char *type,
                   const char *content, size_t len)
{
    buf_printf(b, "--%s\r\n", boundary);
    buf_printf(b, "Content-Description: %s\r\n", description);
    buf_printf(b, "Content-Type: %s\r\n", type);
    if (bounce_is_8bit((struct span){content, len}))
        buf_append_str(b, "Content-Transfer-Encoding: 8bit\r\n");
    buf_append(b, "\r\n", 2);
    buf_append(b, content, len);
    /* The CRLF before the next delimiter belongs to the delimiter (RFC
     * 2046 5.1.1): the part's content is exactly what was appended. */
    buf_append(b, "\r\n", 2);
}

void
bounce_build(struct buf *out, const struct bounce_params *p)
{
    if (p->nrcpts == 0 || p->rcpts == NULL)
        PANIC("bounce without recipients");
    if (p->to == NULL || p->to[0] == '\0')
        PANIC("bounce to the null sender");

    enum bounce_kind kind = KIND_SUCCESS;
    for (size_t i = 0; i < p->nrcpts; i++) {
        if (p->rcpts[i].action == BOUNCE_FAILED)
            kind = KIND_FAILED;
        else if (p->rcpts[i].action == BOUNCE_DELAYED && kind != KIND_FAILED)
            kind = KIND_DELAYED;
    }
    /* RFC 3461 4.3: the full message only in a report of failure. */
    bool full = p->ret_full && kind == KIND_FAILED;
    struct span returned = full ? p->original : bounce_header_section(p->original);

    struct buf text;
    struct buf status;
    buf_init(&text);
    buf_init(&status);
    if (p->text != NULL)
        bounce_user_text(&text, p->text);
    else
        bounce_default_text(&text, p, kind, full);
    bounce_status_part(&status, p);

    /* "=_" cannot occur in base64 or quoted-printable text (RFC 2045 6.7,
     * 6.8); the original may hold anything, so every part is checked. */
    char qid[BOUNCE_QID_MAX + 1];
    size_t q = 0;
    for (const char *s = p->orig_qid ? p->orig_qid : ""; *s != '\0' && q < BOUNCE_QID_MAX; s++)
        if ((*s >= '0' && *s <= '9') || (*s >= 'A' && *s <= 'Z') || (*s >= 'a' && *s <= 'z'))
            qid[q++] = *s;
    qid[q] = '\0';
    char boundary[72];
    for (unsigned attempt = 0;; attempt++) {
        if (attempt == 0)
            snprintf(boundary, sizeof(boundary), "=_petrel_%s_%llx", qid,
                     (unsigned long long)p->now_ms);
        else
            snprintf(boundary, sizeof(boundary), "=_petrel_%s_%llx_%u", qid,
                     (unsigned long long)p->now_ms, attempt);
        if (!bounce_contains(buf_ptr(&text), text.len, boundary) &&
            !bounce_contains(buf_ptr(&status), status.len, boundary) &&
            !bounce_contains(returned.p, returned.len, boundary))
            break;
    }

    const char *subject = p->subject;
    if (subject == NULL)
        subject = kind == KIND_FAILED    ? "Undelivered Mail Returned to Sender"
                  : kind == KIND_DELAYED ? "Delayed Mail (still being retried)"
                                         : "Successful Mail Delivery Report";

    /* The header section. */
    bounce_from(out, p->from_name, p->reporting_mta);
    char *to = bounce_clean(p->to, true);
    char *v = xasprintf("<%s>", to);
    bounce_field(out, "To", v);
    free(v);
    free(to);
    bounce_subject(out, subject);
    bounce_date_field(out, "Date", p->now_ms);
    char *mta = bounce_clean(p->reporting_mta, false);
    if (p->message_id != NULL && p->message_id[0] != '\0') {
        char *id = bounce_clean(p->message_id, false);
        v = xasprintf("<%s>", id);
        free(id);
    } else {
        v = xasprintf("<%lld.%s%sdsn@%s>", (long long)p->now_ms, qid, qid[0] ? "." : "", mta);
    }
    bounce_field(out, "Message-ID", v);
    free(v);
    free(mta);
    bounce_field(out, "Auto-Submitted", "auto-replied"); /* RFC 3834 5 */
    bounce_field(out, "MIME-Version", "1.0");
    buf_printf(out,
               "Content-Type: multipart/report; report-type=delivery-status;\r\n"
               " boundary=\"%s\"\r\n",
               boundary);
    /* A multipart holding an 8bit part is 8bit itself (RFC 2045 6.4). */
    if (bounce_is_8bit((struct span){buf_ptr(&text), text.len}) ||
        bounce_is_8bit((struct span){buf_ptr(&status), status.len}) || bounce_is_8bit(returned))
        buf_append_str(out, "Content-Transfer-Encoding: 8bit\r\n");
    buf_append(out, "\r\n", 2);

    /* The body: preamble, three parts, close delimiter. */
    buf_append_str(out, "This is a MIME-encapsulated message.\r\n\r\n");
    bounce_part_header(out, boundary, "Notification", "text/plain; charset=utf-8", buf_ptr(&text),
                       text.len);
    bounce_part_header(out, boundary, "Delivery report",
                       p->smtputf8 ? "message/global-delivery-status" : "message/delivery-status",
                       buf_ptr(&status), status.len);
    const char *what = kind == KIND_SUCCESS ? "Delivered Message" : "Undelivered Message";
    char *desc = xasprintf("%s%s", what, full ? "" : " Headers");
    const char *type = full ? (p->smtputf8 ? "message/global" : "message/rfc822")
                            : (p->smtputf8 ? "message/global-headers" : "text/rfc822-headers");
    bounce_part_header(out, boundary, desc, type, returned.p, returned.len);
    free(desc);
    buf_printf(out, "--%s--\r\n", boundary);

    buf_reset(&text);
    buf_reset(&status);
}
