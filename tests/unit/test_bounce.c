/*
 * test_bounce — DSN generation. Every test builds a report with
 * bounce_build() and PARSES IT BACK with the small MIME/DSN reader below
 * (split header and body, take the boundary from Content-Type, split the
 * parts, unfold header lines, read the delivery-status groups as name →
 * value lists), then checks every field value, the part types, that the
 * returned original is byte-exact, and that every line ends with CRLF and
 * stays within 998 octets. Failures read "got X, want Y".
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "bounce.h"
#include "buf.h"
#include "util.h"

/* ==== the reader: a deliberately small RFC 5322 / MIME / RFC 3464 parser ==== */

#define MAX_FIELDS 32
#define MAX_PARTS 6
#define MAX_GROUPS 8

/* One header field, unfolded (RFC 5322 2.2.3: CRLF before WSP removed, the
 * WSP kept), with the whitespace after the colon removed. */
struct field {
    char name[80];
    char *value; /* owned */
};

struct fields {
    struct field v[MAX_FIELDS];
    size_t n;
};

struct part {
    struct fields hdr;
    struct span body; /* borrowed from the message */
};

struct report {
    struct fields hdr;
    char boundary[80];
    struct part parts[MAX_PARTS];
    size_t nparts;
    struct fields groups[MAX_GROUPS]; /* the delivery-status part's groups */
    size_t ngroups;
};

static void
fields_free(struct fields *f)
{
    for (size_t i = 0; i < f->n; i++)
        free(f->v[i].value);
    f->n = 0;
}

static void
report_free(struct report *r)
{
    fields_free(&r->hdr);
    for (size_t i = 0; i < r->nparts; i++)
        fields_free(&r->parts[i].hdr);
    for (size_t i = 0; i < r->ngroups; i++)
        fields_free(&r->groups[i]);
    r->nparts = r->ngroups = 0;
}

/* Appends n octets to a malloc'd string. */
static char *
str_append(char *s, const char *p, size_t n)
{
    size_t len = s != NULL ? strlen(s) : 0;
    s = xrealloc(s, len + n + 1);
    memcpy(s + len, p, n);
    s[len + n] = '\0';
    return s;
}

/* Parses the header lines in [p, p+len) (each ended by CRLF) into f.
 * False, with a message, on a line that is neither a field nor a
 * continuation. */
static bool
fields_parse(const char *p, size_t len, struct fields *f)
{
    f->n = 0;
    size_t i = 0;
    while (i < len) {
        const char *eol = memmem(p + i, len - i, "\r\n", 2);
        if (eol == NULL) {
            print_error("header line without CRLF at offset %zu\n", i);
            return false;
        }
        size_t llen = (size_t)(eol - (p + i));
        if (p[i] == ' ' || p[i] == '\t') {
            if (f->n == 0) {
                print_error("continuation line before any field\n");
                return false;
            }
            struct field *last = &f->v[f->n - 1];
            last->value = str_append(last->value, p + i, llen);
        } else {
            const char *colon = memchr(p + i, ':', llen);
            size_t nlen = colon != NULL ? (size_t)(colon - (p + i)) : 0;
            if (colon == NULL || nlen == 0 || nlen >= sizeof(f->v[0].name) || f->n == MAX_FIELDS) {
                print_error("bad header line \"%.*s\"\n", (int)llen, p + i);
                return false;
            }
            struct field *fl = &f->v[f->n++];
            memcpy(fl->name, p + i, nlen);
            fl->name[nlen] = '\0';
            fl->value = str_append(NULL, colon + 1, llen - nlen - 1);
        }
        i += llen + 2;
    }
    for (size_t k = 0; k < f->n; k++) {
        char *v = f->v[k].value;
        size_t skip = strspn(v, " \t");
        memmove(v, v + skip, strlen(v + skip) + 1);
    }
    return true;
}

/* The value of the first field called name, or NULL. */
static const char *
fields_get(const struct fields *f, const char *name)
{
    for (size_t i = 0; i < f->n; i++)
        if (ascii_casecmp(f->v[i].name, name) == 0)
            return f->v[i].value;
    return NULL;
}

/* Splits an entity at its first empty line: header fields, then body. */
static bool
entity_parse(struct span e, struct fields *hdr, struct span *body)
{
    size_t hlen;
    if (e.len >= 2 && memcmp(e.p, "\r\n", 2) == 0) {
        hlen = 0;
        *body = (struct span){e.p + 2, e.len - 2};
    } else {
        const char *end = memmem(e.p, e.len, "\r\n\r\n", 4);
        if (end == NULL) {
            print_error("no empty line after the header section\n");
            return false;
        }
        hlen = (size_t)(end - e.p) + 2;
        *body = (struct span){end + 4, e.len - hlen - 2};
    }
    return fields_parse(e.p, hlen, hdr);
}

/* The boundary parameter of a multipart Content-Type (quoted or token). */
static bool
boundary_of(const char *ctype, char *out, size_t size)
{
    const char *b = strstr(ctype, "boundary=");
    if (b == NULL)
        return false;
    b += strlen("boundary=");
    size_t n;
    if (*b == '"') {
        b++;
        const char *q = strchr(b, '"');
        if (q == NULL)
            return false;
        n = (size_t)(q - b);
    } else {
        n = strcspn(b, "; \t");
    }
    if (n == 0 || n >= size)
        return false;
    memcpy(out, b, n);
    out[n] = '\0';
    return true;
}

/* Splits a multipart body (RFC 2046 5.1.1): the delimiter is CRLF "--"
 * boundary (the CRLF belongs to it), the last one ends with "--". */
static bool
multipart_split(struct span body, const char *boundary, struct report *r)
{
    char delim[96];
    snprintf(delim, sizeof(delim), "\r\n--%s", boundary);
    size_t dlen = strlen(delim);
    /* The first delimiter may open the body (then without its CRLF). */
    const char *p;
    if (body.len >= dlen - 2 && memcmp(body.p, delim + 2, dlen - 2) == 0) {
        p = body.p + dlen - 2;
    } else {
        p = memmem(body.p, body.len, delim, dlen);
        if (p == NULL) {
            print_error("no delimiter for boundary \"%s\"\n", boundary);
            return false;
        }
        p += dlen;
    }
    const char *end = body.p + body.len;
    for (;;) {
        if (end - p >= 2 && memcmp(p, "--", 2) == 0) {
            if (end - p != 4 || memcmp(p + 2, "\r\n", 2) != 0) {
                print_error("epilogue after the close delimiter\n");
                return false;
            }
            return true;
        }
        if (end - p < 2 || memcmp(p, "\r\n", 2) != 0) {
            print_error("junk after a delimiter\n");
            return false;
        }
        p += 2;
        const char *next = memmem(p, (size_t)(end - p), delim, dlen);
        if (next == NULL) {
            print_error("part %zu is not closed\n", r->nparts);
            return false;
        }
        if (r->nparts == MAX_PARTS)
            return false;
        struct part *pt = &r->parts[r->nparts++];
        if (!entity_parse((struct span){p, (size_t)(next - p)}, &pt->hdr, &pt->body))
            return false;
        p = next + dlen;
    }
}

/* The delivery-status body: groups of fields separated by empty lines. */
static bool
groups_parse(struct span body, struct report *r)
{
    const char *p = body.p;
    const char *end = body.p + body.len;
    while (p < end) {
        const char *blank = memmem(p, (size_t)(end - p), "\r\n\r\n", 4);
        const char *gend = blank != NULL ? blank + 2 : end;
        if (r->ngroups == MAX_GROUPS)
            return false;
        if (!fields_parse(p, (size_t)(gend - p), &r->groups[r->ngroups++]))
            return false;
        p = blank != NULL ? blank + 4 : end;
    }
    return true;
}

/* The whole report: header, boundary, parts, and the groups of the part
 * whose type is message/(global-)delivery-status. */
static bool
report_parse(const char *msg, size_t len, struct report *r)
{
    memset(r, 0, sizeof(*r));
    struct span body;
    if (!entity_parse((struct span){msg, len}, &r->hdr, &body))
        return false;
    const char *ctype = fields_get(&r->hdr, "Content-Type");
    if (ctype == NULL || !boundary_of(ctype, r->boundary, sizeof(r->boundary))) {
        print_error("no boundary in Content-Type \"%s\"\n", ctype ? ctype : "(none)");
        return false;
    }
    if (!multipart_split(body, r->boundary, r))
        return false;
    for (size_t i = 0; i < r->nparts; i++) {
        const char *t = fields_get(&r->parts[i].hdr, "Content-Type");
        if (t != NULL && (strcmp(t, "message/delivery-status") == 0 ||
                          strcmp(t, "message/global-delivery-status") == 0))
            return groups_parse(r->parts[i].body, r);
    }
    print_error("no delivery-status part\n");
    return false;
}

/* ---- checks ----------------------------------------------------------------- */

/* A wanted field; a NULL name ends the list (so a conditional last entry
 * can be written as { cond ? "Name" : NULL, "value" }). */
struct want_field {
    const char *name;
    const char *value;
};

#define END_FIELDS                                                                                 \
    {                                                                                              \
        NULL, NULL                                                                                 \
    }

static const char *
vis(const char *s, size_t len, char *buf, size_t size)
{
    return str_vis(buf, size, s, len);
}

/* The fields, in order, are exactly want (names case-insensitive). */
static bool
check_fields(const char *label, const struct fields *got, const struct want_field *want)
{
    bool ok = true;
    size_t n = 0;
    while (want[n].name != NULL)
        n++;
    for (size_t i = 0; i < n || i < got->n; i++) {
        const char *gn = i < got->n ? got->v[i].name : "(none)";
        const char *gv = i < got->n ? got->v[i].value : "";
        const char *wn = i < n ? want[i].name : "(none)";
        const char *wv = i < n ? want[i].value : "";
        if (ascii_casecmp(gn, wn) != 0 || strcmp(gv, wv) != 0) {
            char g[400];
            char w[400];
            print_error("%s: field %zu: got %s: \"%s\", want %s: \"%s\"\n", label, i, gn,
                        vis(gv, strlen(gv), g, sizeof(g)), wn, vis(wv, strlen(wv), w, sizeof(w)));
            ok = false;
        }
    }
    return ok;
}

static bool
check_str(const char *label, const char *got, const char *want)
{
    if (got != NULL && strcmp(got, want) == 0)
        return true;
    char g[400];
    char w[400];
    print_error("%s: got \"%s\", want \"%s\"\n", label,
                got ? vis(got, strlen(got), g, sizeof(g)) : "(null)",
                vis(want, strlen(want), w, sizeof(w)));
    return false;
}

static bool
check_span(const char *label, struct span got, const char *want, size_t wlen)
{
    if (got.len == wlen && memcmp(got.p, want, wlen) == 0)
        return true;
    char g[600];
    char w[600];
    print_error("%s: got %zu octets \"%s\", want %zu octets \"%s\"\n", label, got.len,
                vis(got.p, got.len, g, sizeof(g)), wlen, vis(want, wlen, w, sizeof(w)));
    return false;
}

/* Every line ends with CRLF (no bare CR or LF) and has ≤ max octets. */
static bool
check_lines(const char *label, const char *msg, size_t len, size_t max)
{
    size_t start = 0;
    size_t lineno = 1;
    for (size_t i = 0; i < len; i++) {
        if (msg[i] == '\r' && (i + 1 >= len || msg[i + 1] != '\n')) {
            print_error("%s: line %zu: got a bare CR, want CRLF\n", label, lineno);
            return false;
        }
        if (msg[i] == '\n') {
            if (i == 0 || msg[i - 1] != '\r') {
                print_error("%s: line %zu: got a bare LF, want CRLF\n", label, lineno);
                return false;
            }
            size_t llen = i - 1 - start;
            if (llen > max) {
                print_error("%s: line %zu: got %zu octets, want at most %zu\n", label, lineno, llen,
                            max);
                return false;
            }
            start = i + 1;
            lineno++;
        }
    }
    if (start != len) {
        print_error("%s: got a last line without CRLF, want CRLF\n", label);
        return false;
    }
    return true;
}

/* RFC 2047 "B" encoded-words separated by spaces → their decoded text. */
static bool
decode_encoded_words(const char *v, char *out, size_t size)
{
    static const char tab[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    while (*v != '\0') {
        v += strspn(v, " \t");
        if (strncmp(v, "=?utf-8?B?", 10) != 0)
            return false;
        v += 10;
        const char *e = strstr(v, "?=");
        if (e == NULL || (e - v) % 4 != 0)
            return false;
        for (; v < e; v += 4) {
            uint32_t acc = 0;
            int pad = 0;
            for (int k = 0; k < 4; k++) {
                const char *c = v[k] == '=' ? NULL : strchr(tab, v[k]);
                if (v[k] == '=')
                    pad++;
                else if (c == NULL)
                    return false;
                acc = (acc << 6) | (c ? (uint32_t)(c - tab) : 0);
            }
            for (int k = 0; k < 3 - pad; k++) {
                if (o + 1 >= size)
                    return false;
                out[o++] = (char)((acc >> (16 - 8 * k)) & 0xff);
            }
        }
        v = e + 2;
    }
    out[o] = '\0';
    return true;
}

/* The report's text part with continuation lines ("CRLF + 4 spaces")
 * joined back, for finding a wrapped recipient line. */
static char *
unwrap_text(struct span body)
{
    char *s = xstrndup(body.p, body.len);
    char *p;
    while ((p = strstr(s, "\r\n    ")) != NULL) {
        p[0] = ' ';
        memmove(p + 1, p + 6, strlen(p + 6) + 1);
    }
    return s;
}

static bool
check_contains(const char *label, const char *hay, const char *needle)
{
    if (strstr(hay, needle) != NULL)
        return true;
    char h[1200];
    print_error("%s: got text \"%s\", want it to contain \"%s\"\n", label,
                vis(hay, strlen(hay), h, sizeof(h)), needle);
    return false;
}

/* Builds the report and parses it; fails the test if it does not parse or
 * breaks the line rules. The caller frees *msg and report_free()s. */
static void
build_and_parse(const char *label, const struct bounce_params *p, struct buf *msg, struct report *r)
{
    buf_init(msg);
    bounce_build(msg, p);
    if (!check_lines(label, buf_ptr(msg), msg->len, 998))
        fail_msg("%s: bad lines", label);
    if (!report_parse(buf_ptr(msg), msg->len, r))
        fail_msg("%s: the report does not parse", label);
}

/* ==== fixtures ================================================================ */

#define ARRIVAL_MS 1700000000000LL /* Tue, 14 Nov 2023 22:13:20 +0000 */
#define NOW_MS 1700003600000LL     /* Tue, 14 Nov 2023 23:13:20 +0000 */
#define LAST_MS 1700003000000LL    /* Tue, 14 Nov 2023 23:03:20 +0000 */
#define ARRIVAL_DATE "Tue, 14 Nov 2023 22:13:20 +0000"
#define NOW_DATE "Tue, 14 Nov 2023 23:13:20 +0000"
#define LAST_DATE "Tue, 14 Nov 2023 23:03:20 +0000"

static const char orig_headers[] = "Received: from client.example (client.example [192.0.2.10])\r\n"
                                   "\tby mta.example (petrel) with ESMTP id 7F3A9C1E\r\n"
                                   "From: Alice <alice@example.com>\r\n"
                                   "To: bob@example.org, carol@example.net\r\n"
                                   "Subject: Lunch\r\n"
                                   "Message-ID: <lunch-1@example.com>\r\n";
static const char orig_body[] =
    "Hi Bob, hi Carol,\r\n\r\nnoon at the usual place?\r\n-- \r\nAlice\r\n";

struct original {
    char *p; /* owned */
    size_t len;
};

static struct original
make_original(const char *headers, const char *body)
{
    struct original o;
    o.p = xasprintf("%s\r\n%s", headers, body);
    o.len = strlen(o.p);
    return o;
}

static const char bob_diag[] = "550 5.1.1 <bob@example.org>: Recipient address rejected: User "
                               "unknown in virtual mailbox table";

static const struct bounce_rcpt two_failed[] = {
    {.addr = "bob@example.org",
     .orcpt = "rfc822;Bob@Example.ORG",
     .action = BOUNCE_FAILED,
     .status = "5.1.1",
     .remote_mta = "mx.example.org",
     .diagnostic = bob_diag,
     .last_attempt_ms = LAST_MS},
    {.addr = "carol@example.net",
     .action = BOUNCE_FAILED,
     .status = "5.7.1",
     .remote_mta = "mx.example.net",
     .diagnostic = "554 5.7.1 <carol@example.net>: Relay access denied"},
};

static struct bounce_params
base_params(struct original o, const struct bounce_rcpt *rcpts, size_t n)
{
    struct bounce_params p = {
        .reporting_mta = "mta.example",
        .from_name = "Mail Delivery System",
        .to = "alice@example.com",
        .orig_qid = "7F3A9C1E",
        .envid = "ENV-42",
        .arrival_ms = ARRIVAL_MS,
        .now_ms = NOW_MS,
        .ret_full = false,
        .smtputf8 = false,
        .rcpts = rcpts,
        .nrcpts = n,
        .original = {o.p, o.len},
        .subject = NULL,
        .text = NULL,
        .message_id = "1700003600000.7F3A9C1E@mta.example",
    };
    return p;
}

static const struct want_field per_message[] = {
    {"Original-Envelope-Id", "ENV-42"},
    {"Reporting-MTA", "dns; mta.example"},
    {"Arrival-Date", ARRIVAL_DATE},
    {"X-Petrel-Queue-ID", "7F3A9C1E"},
    END_FIELDS,
};

static const struct want_field bob_group[] = {
    {"Original-Recipient", "rfc822; Bob@Example.ORG"},
    {"Final-Recipient", "rfc822; bob@example.org"},
    {"Action", "failed"},
    {"Status", "5.1.1"},
    {"Remote-MTA", "dns; mx.example.org"},
    {"Diagnostic-Code",
     "smtp; 550 5.1.1 <bob@example.org>: Recipient address rejected: User unknown in virtual "
     "mailbox table"},
    {"Last-Attempt-Date", LAST_DATE},
    END_FIELDS,
};

static const struct want_field carol_group[] = {
    {"Final-Recipient", "rfc822; carol@example.net"},
    {"Action", "failed"},
    {"Status", "5.7.1"},
    {"Remote-MTA", "dns; mx.example.net"},
    {"Diagnostic-Code", "smtp; 554 5.7.1 <carol@example.net>: Relay access denied"},
    END_FIELDS,
};

/* The top-level header of a report with the given subject; the
 * Content-Type value depends on the boundary the report chose. */
static bool
check_top_header(const char *label, const struct report *r, const char *subject, bool eightbit)
{
    char ctype[160];
    snprintf(ctype, sizeof(ctype), "multipart/report; report-type=delivery-status; boundary=\"%s\"",
             r->boundary);
    struct want_field want[] = {
        {"From", "Mail Delivery System <MAILER-DAEMON@mta.example>"},
        {"To", "<alice@example.com>"},
        {"Subject", subject},
        {"Date", NOW_DATE},
        {"Message-ID", "<1700003600000.7F3A9C1E@mta.example>"},
        {"Auto-Submitted", "auto-replied"},
        {"MIME-Version", "1.0"},
        {"Content-Type", ctype},
        {eightbit ? "Content-Transfer-Encoding" : NULL, "8bit"},
        END_FIELDS,
    };
    return check_fields(label, &r->hdr, want);
}

static bool
check_part_header(const char *label, const struct part *pt, const char *description,
                  const char *type, bool eightbit)
{
    struct want_field want[] = {
        {"Content-Description", description},
        {"Content-Type", type},
        {eightbit ? "Content-Transfer-Encoding" : NULL, "8bit"},
        END_FIELDS,
    };
    return check_fields(label, &pt->hdr, want);
}

/* ==== (a) two failed recipients, ORCPT on one, ENVID, RET=HDRS ============= */

static void
test_bounce_two_failed_rcpts_headers_only(void **state)
{
    (void)state;
    struct original o = make_original(orig_headers, orig_body);
    struct bounce_params p = base_params(o, two_failed, 2);
    struct buf msg;
    struct report r;
    build_and_parse("RET=HDRS", &p, &msg, &r);

    bool ok = check_top_header("top header", &r, "Undelivered Mail Returned to Sender", false);
    assert_int_equal(r.nparts, 3);
    ok = check_part_header("part 1", &r.parts[0], "Notification", "text/plain; charset=utf-8",
                           false) &&
         ok;
    ok = check_part_header("part 2", &r.parts[1], "Delivery report", "message/delivery-status",
                           false) &&
         ok;
    ok = check_part_header("part 3", &r.parts[2], "Undelivered Message Headers",
                           "text/rfc822-headers", false) &&
         ok;

    /* The human-readable part, Postfix-like. */
    char *text = unwrap_text(r.parts[0].body);
    ok = check_contains("text", text, "This is the mail system at host mta.example.\r\n") && ok;
    ok = check_contains("text", text, "your message could not be delivered") && ok;
    ok = check_contains("text", text, "Its headers are attached below.") && ok;
    ok = check_contains("text", text,
                        "<bob@example.org>: host mx.example.org said: 550 5.1.1 "
                        "<bob@example.org>: Recipient address rejected: User unknown in "
                        "virtual mailbox table\r\n") &&
         ok;
    ok = check_contains("text", text,
                        "<carol@example.net>: host mx.example.net said: 554 5.7.1 "
                        "<carol@example.net>: Relay access denied\r\n") &&
         ok;
    free(text);
    ok = check_lines("text part", r.parts[0].body.p, r.parts[0].body.len, 78) && ok;

    /* The machine-readable part: every field of every group. */
    assert_int_equal(r.ngroups, 3);
    ok = check_fields("per-message", &r.groups[0], per_message) && ok;
    ok = check_fields("bob", &r.groups[1], bob_group) && ok;
    ok = check_fields("carol", &r.groups[2], carol_group) && ok;

    /* The original's header section, byte for byte, and nothing else. */
    ok = check_span("returned headers", r.parts[2].body, orig_headers, strlen(orig_headers)) && ok;
    ok = check_str("no 8bit anywhere",
                   bounce_is_8bit((struct span){buf_ptr(&msg), msg.len}) ? "8bit" : "7bit",
                   "7bit") &&
         ok;

    report_free(&r);
    buf_reset(&msg);
    free(o.p);
    assert_true(ok);
}

/* ==== (b) RET=FULL ============================================================= */

static void
test_bounce_ret_full_returns_the_message(void **state)
{
    (void)state;
    struct original o = make_original(orig_headers, orig_body);
    struct bounce_params p = base_params(o, two_failed, 2);
    p.ret_full = true;
    struct buf msg;
    struct report r;
    build_and_parse("RET=FULL", &p, &msg, &r);

    bool ok = check_top_header("top header", &r, "Undelivered Mail Returned to Sender", false);
    assert_int_equal(r.nparts, 3);
    ok = check_part_header("part 3", &r.parts[2], "Undelivered Message", "message/rfc822", false) &&
         ok;
    ok = check_span("returned message", r.parts[2].body, o.p, o.len) && ok;
    char *text = unwrap_text(r.parts[0].body);
    ok = check_contains("text", text, "It's attached below.") && ok;
    free(text);
    assert_int_equal(r.ngroups, 3);
    ok = check_fields("per-message", &r.groups[0], per_message) && ok;
    ok = check_fields("bob", &r.groups[1], bob_group) && ok;
    ok = check_fields("carol", &r.groups[2], carol_group) && ok;

    report_free(&r);
    buf_reset(&msg);
    free(o.p);
    assert_true(ok);
}

/* An original that does not end with CRLF and one without a body are
 * still returned exactly. */
static void
test_bounce_ret_full_odd_originals_byte_exact(void **state)
{
    (void)state;
    static const char *const originals[] = {
        "Subject: no final CRLF\r\n\r\nbody without line end",
        "Subject: headers only\r\nX-A: b\r\n",
        "\r\nbody without headers\r\n",
        "",
    };
    static const char *const want_headers[] = {
        "Subject: no final CRLF\r\n",
        "Subject: headers only\r\nX-A: b\r\n",
        "",
        "",
    };
    bool ok = true;
    for (size_t i = 0; i < ARRAY_SIZE(originals); i++) {
        struct original o = {xstrdup(originals[i]), strlen(originals[i])};
        for (int full = 0; full <= 1; full++) {
            struct bounce_params p = base_params(o, two_failed, 1);
            p.ret_full = full;
            struct buf msg;
            struct report r;
            char label[64];
            snprintf(label, sizeof(label), "original %zu, full=%d", i, full);
            build_and_parse(label, &p, &msg, &r);
            assert_int_equal(r.nparts, 3);
            if (full)
                ok = check_span(label, r.parts[2].body, o.p, o.len) && ok;
            else
                ok = check_span(label, r.parts[2].body, want_headers[i], strlen(want_headers[i])) &&
                     ok;
            report_free(&r);
            buf_reset(&msg);
        }
        free(o.p);
    }
    assert_true(ok);
}

/* ==== (c) success DSN ============================================================ */

static void
test_bounce_success_report(void **state)
{
    (void)state;
    static const struct bounce_rcpt rcpts[] = {
        {.addr = "bob@example.org",
         .orcpt = "rfc822;bob@example.org",
         .action = BOUNCE_DELIVERED,
         .status = "2.0.0",
         .remote_mta = "mx.example.org",
         .diagnostic = "250 2.0.0 Ok: queued as 4XyZ",
         .last_attempt_ms = LAST_MS},
        {.addr = "dave@example.net",
         .action = BOUNCE_RELAYED,
         .status = NULL,
         .remote_mta = "mx.example.net",
         .diagnostic = "250 ok"},
    };
    struct original o = make_original(orig_headers, orig_body);
    struct bounce_params p = base_params(o, rcpts, 2);
    p.ret_full = true; /* a success report still returns headers only */
    p.envid = NULL;
    struct buf msg;
    struct report r;
    build_and_parse("success", &p, &msg, &r);

    bool ok = check_top_header("top header", &r, "Successful Mail Delivery Report", false);
    assert_int_equal(r.nparts, 3);
    ok = check_part_header("part 3", &r.parts[2], "Delivered Message Headers",
                           "text/rfc822-headers", false) &&
         ok;
    ok = check_span("returned headers", r.parts[2].body, orig_headers, strlen(orig_headers)) && ok;
    char *text = unwrap_text(r.parts[0].body);
    ok = check_contains("text", text, "Your message was successfully delivered") && ok;
    ok = check_contains("text", text,
                        "<bob@example.org>: delivered via mx.example.org: 250 2.0.0 Ok: "
                        "queued as 4XyZ\r\n") &&
         ok;
    ok = check_contains("text", text,
                        "<dave@example.net>: relayed via mx.example.net: 250 ok\r\n") &&
         ok;
    free(text);

    static const struct want_field msg_fields[] = {
        {"Reporting-MTA", "dns; mta.example"},
        {"Arrival-Date", ARRIVAL_DATE},
        {"X-Petrel-Queue-ID", "7F3A9C1E"},
        END_FIELDS,
    };
    static const struct want_field bob[] = {
        {"Original-Recipient", "rfc822; bob@example.org"},
        {"Final-Recipient", "rfc822; bob@example.org"},
        {"Action", "delivered"},
        {"Status", "2.0.0"},
        {"Remote-MTA", "dns; mx.example.org"},
        {"Diagnostic-Code", "smtp; 250 2.0.0 Ok: queued as 4XyZ"},
        {"Last-Attempt-Date", LAST_DATE},
        END_FIELDS,
    };
    static const struct want_field dave[] = {
        {"Final-Recipient", "rfc822; dave@example.net"},
        {"Action", "relayed"},
        {"Status", "2.0.0"},
        {"Remote-MTA", "dns; mx.example.net"},
        {"Diagnostic-Code", "smtp; 250 ok"},
        END_FIELDS,
    };
    assert_int_equal(r.ngroups, 3);
    ok = check_fields("per-message", &r.groups[0], msg_fields) && ok;
    ok = check_fields("bob", &r.groups[1], bob) && ok;
    ok = check_fields("dave", &r.groups[2], dave) && ok;

    report_free(&r);
    buf_reset(&msg);
    free(o.p);
    assert_true(ok);
}

/* A delay warning: its own subject and text, Will-Retry-Until, headers
 * only even with RET=FULL. */
static void
test_bounce_delay_warning(void **state)
{
    (void)state;
    static const struct bounce_rcpt rcpts[] = {
        {.addr = "bob@example.org",
         .action = BOUNCE_DELAYED,
         .status = "4.4.1",
         .diagnostic = "connect to mx.example.org[192.0.2.7]:25: Connection timed out",
         .last_attempt_ms = LAST_MS,
         .will_retry_until_ms = ARRIVAL_MS + 5LL * 86400 * 1000},
    };
    struct original o = make_original(orig_headers, orig_body);
    struct bounce_params p = base_params(o, rcpts, 1);
    p.ret_full = true;
    struct buf msg;
    struct report r;
    build_and_parse("delayed", &p, &msg, &r);

    bool ok = check_top_header("top header", &r, "Delayed Mail (still being retried)", false);
    ok = check_part_header("part 3", &r.parts[2], "Undelivered Message Headers",
                           "text/rfc822-headers", false) &&
         ok;
    char *text = unwrap_text(r.parts[0].body);
    ok = check_contains("text", text, "# THIS IS A WARNING ONLY.") && ok;
    ok = check_contains("text", text,
                        "<bob@example.org>: connect to mx.example.org[192.0.2.7]:25: "
                        "Connection timed out\r\n") &&
         ok;
    free(text);
    static const struct want_field bob[] = {
        {"Final-Recipient", "rfc822; bob@example.org"},
        {"Action", "delayed"},
        {"Status", "4.4.1"},
        {"Diagnostic-Code",
         "X-Petrel; connect to mx.example.org[192.0.2.7]:25: Connection timed out"},
        {"Last-Attempt-Date", LAST_DATE},
        {"Will-Retry-Until", "Sun, 19 Nov 2023 22:13:20 +0000"},
        END_FIELDS,
    };
    assert_int_equal(r.ngroups, 2);
    ok = check_fields("bob", &r.groups[1], bob) && ok;
    report_free(&r);
    buf_reset(&msg);
    free(o.p);
    assert_true(ok);
}

/* ==== (d) diagnostics longer than 998 octets ===================================== */

/* s without any space or tab. */
static char *
strip_spaces(const char *s)
{
    char *out = xmalloc(strlen(s) + 1);
    size_t o = 0;
    for (; *s != '\0'; s++)
        if (*s != ' ' && *s != '\t')
            out[o++] = *s;
    out[o] = '\0';
    return out;
}

static void
test_bounce_long_diagnostic_is_folded(void **state)
{
    (void)state;
    /* With spaces: folding must restore it exactly. */
    struct buf words;
    buf_init(&words);
    buf_append_str(&words, "550 5.7.1 Message rejected:");
    for (int i = 0; i < 200; i++)
        buf_printf(&words, " reason%03d", i);
    buf_append(&words, "", 1);
    const char *spaced = buf_ptr(&words);
    assert_true(strlen(spaced) > 998);
    /* Without spaces: only a broken line is possible. */
    char *solid = xmalloc(1600);
    memcpy(solid, "550 ", 4);
    for (size_t i = 4; i < 1599; i++)
        solid[i] = (char)('a' + i % 26);
    solid[1599] = '\0';

    struct bounce_rcpt rcpts[] = {
        {.addr = "bob@example.org",
         .action = BOUNCE_FAILED,
         .status = "5.7.1",
         .remote_mta = "mx.example.org",
         .diagnostic = spaced},
        {.addr = "carol@example.net",
         .action = BOUNCE_FAILED,
         .status = "5.0.0",
         .diagnostic = solid},
    };
    struct original o = make_original(orig_headers, orig_body);
    struct bounce_params p = base_params(o, rcpts, 2);
    struct buf msg;
    struct report r;
    build_and_parse("long diagnostic", &p, &msg, &r);

    bool ok = true;
    assert_int_equal(r.ngroups, 3);
    char *want = xasprintf("smtp; %s", spaced);
    ok = check_str("folded at spaces", fields_get(&r.groups[1], "Diagnostic-Code"), want) && ok;
    free(want);
    /* Folding at spaces keeps the lines within 78 octets. */
    ok = check_lines("status part", r.parts[1].body.p, r.parts[1].body.len, 998) && ok;
    const char *dc = memmem(r.parts[1].body.p, r.parts[1].body.len, "Diagnostic-Code:", 16);
    const char *end = r.parts[1].body.p + r.parts[1].body.len;
    assert_non_null(dc);
    for (const char *line = dc; line < dc + 900;) {
        const char *eol = memmem(line, (size_t)(end - line), "\r\n", 2);
        assert_non_null(eol);
        if ((size_t)(eol - line) > 78) {
            print_error("folded line of %zu octets, want at most 78\n", (size_t)(eol - line));
            ok = false;
        }
        line = eol + 2;
    }
    /* The solid one: every octet is kept, broken lines add only spaces. */
    char *got = strip_spaces(fields_get(&r.groups[2], "Diagnostic-Code"));
    char *exp = xasprintf("smtp;%s", solid);
    char *exp_stripped = strip_spaces(exp);
    ok = check_str("broken without spaces", got, exp_stripped) && ok;
    free(got);
    free(exp);
    free(exp_stripped);
    /* The text part holds both, wrapped, within the limits too. */
    ok = check_lines("text part", r.parts[0].body.p, r.parts[0].body.len, 998) && ok;

    report_free(&r);
    buf_reset(&msg);
    buf_reset(&words);
    free(solid);
    free(o.p);
    assert_true(ok);
}

/* ==== (e) an original containing the would-be boundary =========================== */

static void
test_bounce_boundary_avoids_the_original(void **state)
{
    (void)state;
    struct original o = make_original(orig_headers, orig_body);
    struct bounce_params p = base_params(o, two_failed, 2);
    struct buf msg;
    struct report r;
    build_and_parse("plain", &p, &msg, &r);
    char first[80];
    assert_true(str_copy(first, sizeof(first), r.boundary));
    report_free(&r);
    buf_reset(&msg);

    /* The same report again, but the original carries that boundary as a
     * delimiter line in its body and inside a header. */
    char *hdrs = xasprintf("%sX-Trap: %s\r\n", orig_headers, first);
    char *body =
        xasprintf("--%s\r\nContent-Type: text/plain\r\n\r\ntrap\r\n--%s--\r\n", first, first);
    struct original trap = make_original(hdrs, body);
    bool ok = true;
    for (int full = 0; full <= 1; full++) {
        p = base_params(trap, two_failed, 2);
        p.ret_full = full;
        /* The Lua text may hold a boundary too. */
        char *text = xasprintf("Undeliverable.\n--%s\n--%s_1--\n", first, first);
        p.text = text;
        build_and_parse(full ? "trap FULL" : "trap HDRS", &p, &msg, &r);
        if (strcmp(r.boundary, first) == 0) {
            print_error("boundary: got \"%s\" again, want another one\n", r.boundary);
            ok = false;
        }
        assert_int_equal(r.nparts, 3);
        for (size_t i = 0; i < r.nparts; i++) {
            if (memmem(r.parts[i].body.p, r.parts[i].body.len, r.boundary, strlen(r.boundary)) !=
                NULL) {
                print_error("part %zu contains the boundary \"%s\"\n", i + 1, r.boundary);
                ok = false;
            }
        }
        if (full)
            ok = check_span("trap returned", r.parts[2].body, trap.p, trap.len) && ok;
        else
            ok = check_span("trap headers", r.parts[2].body, hdrs, strlen(hdrs)) && ok;
        char *want_text = xasprintf("Undeliverable.\r\n--%s\r\n--%s_1--\r\n", first, first);
        ok = check_span("text", r.parts[0].body, want_text, strlen(want_text)) && ok;
        free(want_text);
        free(text);
        assert_int_equal(r.ngroups, 3);
        ok = check_fields("bob", &r.groups[1], bob_group) && ok;
        report_free(&r);
        buf_reset(&msg);
    }
    free(hdrs);
    free(body);
    free(trap.p);
    free(o.p);
    assert_true(ok);
}

/* ==== internationalized reports (RFC 6533) ========================================= */

static void
test_bounce_smtputf8_global_types(void **state)
{
    (void)state;
    static const struct bounce_rcpt rcpts[] = {
        {.addr = "j\xc3\xb6ran@example.org",
         .orcpt = "utf-8;j\xc3\xb6ran@example.org",
         .action = BOUNCE_FAILED,
         .status = "5.1.1",
         .diagnostic = "550 5.1.1 unknown"},
    };
    static const char utf8_headers[] = "From: Andr\xc3\xa9 <andre@example.com>\r\n"
                                       "Subject: Gr\xc3\xbc\xc3\x9f"
                                       "e\r\n";
    struct original o = make_original(utf8_headers, "hej\r\n");
    struct bounce_params p = base_params(o, rcpts, 1);
    p.smtputf8 = true;
    struct buf msg;
    struct report r;
    build_and_parse("smtputf8", &p, &msg, &r);

    bool ok = check_top_header("top header", &r, "Undelivered Mail Returned to Sender", true);
    ok = check_part_header("part 1", &r.parts[0], "Notification", "text/plain; charset=utf-8",
                           true) &&
         ok;
    ok = check_part_header("part 2", &r.parts[1], "Delivery report",
                           "message/global-delivery-status", true) &&
         ok;
    ok = check_part_header("part 3", &r.parts[2], "Undelivered Message Headers",
                           "message/global-headers", true) &&
         ok;
    ok = check_span("returned headers", r.parts[2].body, utf8_headers, strlen(utf8_headers)) && ok;
    static const struct want_field want[] = {
        {"Original-Recipient", "utf-8; j\xc3\xb6ran@example.org"},
        {"Final-Recipient", "utf-8; j\xc3\xb6ran@example.org"},
        {"Action", "failed"},
        {"Status", "5.1.1"},
        {"Diagnostic-Code", "smtp; 550 5.1.1 unknown"},
        END_FIELDS,
    };
    assert_int_equal(r.ngroups, 2);
    ok = check_fields("rcpt", &r.groups[1], want) && ok;
    ok = check_str("8bit", bounce_is_8bit((struct span){buf_ptr(&msg), msg.len}) ? "8bit" : "7bit",
                   "8bit") &&
         ok;
    report_free(&r);
    buf_reset(&msg);

    /* Without SMTPUTF8 the status part stays ASCII: utf-8-addr-xtext. */
    static const struct bounce_rcpt plain[] = {
        {.addr = "j\xc3\xb6ran+x=y@example.org",
         .orcpt = "rfc822;J\xc3\xb6ran@example.org",
         .action = BOUNCE_FAILED,
         .status = "5.1.1"},
    };
    p = base_params(o, plain, 1);
    build_and_parse("utf-8 address, no smtputf8", &p, &msg, &r);
    ok = check_part_header("part 2", &r.parts[1], "Delivery report", "message/delivery-status",
                           false) &&
         ok;
    static const struct want_field want_x[] = {
        {"Original-Recipient", "utf-8; J\\x{F6}ran@example.org"},
        {"Final-Recipient", "utf-8; j\\x{F6}ran\\x{2B}x\\x{3D}y@example.org"},
        {"Action", "failed"},
        {"Status", "5.1.1"},
        END_FIELDS,
    };
    assert_int_equal(r.ngroups, 2);
    ok = check_fields("rcpt", &r.groups[1], want_x) && ok;
    report_free(&r);
    buf_reset(&msg);
    free(o.p);
    assert_true(ok);
}

/* ==== values from hooks and peers ================================================== */

static void
test_bounce_hook_subject_and_text(void **state)
{
    (void)state;
    struct original o = make_original(orig_headers, orig_body);
    struct bounce_params p = base_params(o, two_failed, 2);
    p.subject = "Unzustellbar: Gr\xc3\xbc\xc3\x9f"
                "e an alle Empf\xc3\xa4nger der Nachricht "
                "\xe2\x80\x94 bitte pr\xc3\xbc"
                "fen";
    p.text = "Line one\nLine two\r\n\r\n  indented\rlast \xc3\xa9t\xc3\xa9";
    struct buf msg;
    struct report r;
    build_and_parse("hook", &p, &msg, &r);

    bool ok = true;
    char subject[300];
    const char *raw = fields_get(&r.hdr, "Subject");
    if (raw == NULL || !decode_encoded_words(raw, subject, sizeof(subject))) {
        print_error("Subject: got \"%s\", want encoded-words\n", raw ? raw : "(none)");
        ok = false;
    } else {
        ok = check_str("decoded Subject", subject, p.subject) && ok;
    }
    static const char want_text[] =
        "Line one\r\nLine two\r\n\r\n  indented\r\nlast \xc3\xa9t\xc3\xa9\r\n";
    ok = check_span("text", r.parts[0].body, want_text, strlen(want_text)) && ok;
    ok = check_part_header("part 1", &r.parts[0], "Notification", "text/plain; charset=utf-8",
                           true) &&
         ok;
    /* The machine-readable parts stay standard. */
    assert_int_equal(r.ngroups, 3);
    ok = check_fields("per-message", &r.groups[0], per_message) && ok;
    ok = check_fields("bob", &r.groups[1], bob_group) && ok;
    ok = check_fields("carol", &r.groups[2], carol_group) && ok;
    report_free(&r);
    buf_reset(&msg);
    free(o.p);
    assert_true(ok);
}

static void
test_bounce_values_cannot_inject_lines(void **state)
{
    (void)state;
    static const struct bounce_rcpt rcpts[] = {
        {.addr = "bob@example.org",
         .orcpt = "rfc822;bob@example.org\r\nAction: delivered",
         .action = BOUNCE_FAILED,
         .status = "5.1",
         .remote_mta = "mx.example.org\r\nX-Evil: 1",
         .diagnostic = "550-5.1.1 first line\r\n550 5.1.1 second\tline\x01"},
    };
    struct original o = make_original(orig_headers, orig_body);
    struct bounce_params p = base_params(o, rcpts, 1);
    p.subject = "Hi\r\nBcc: victim@example.net";
    p.envid = "ENV\r\n\r\nFinal-Recipient: rfc822; x@y";
    p.from_name = "Postmaster (petrel) \"MTA\"";
    p.message_id = NULL;
    struct buf msg;
    struct report r;
    build_and_parse("injection", &p, &msg, &r);

    char ctype[160];
    snprintf(ctype, sizeof(ctype), "multipart/report; report-type=delivery-status; boundary=\"%s\"",
             r.boundary);
    struct want_field top[] = {
        {"From", "\"Postmaster (petrel) \\\"MTA\\\"\" <MAILER-DAEMON@mta.example>"},
        {"To", "<alice@example.com>"},
        {"Subject", "Hi Bcc: victim@example.net"},
        {"Date", NOW_DATE},
        {"Message-ID", "<1700003600000.7F3A9C1E.dsn@mta.example>"},
        {"Auto-Submitted", "auto-replied"},
        {"MIME-Version", "1.0"},
        {"Content-Type", ctype},
        END_FIELDS,
    };
    bool ok = check_fields("top header", &r.hdr, top);
    static const struct want_field msg_fields[] = {
        {"Original-Envelope-Id", "ENV Final-Recipient: rfc822; x@y"},
        {"Reporting-MTA", "dns; mta.example"},
        {"Arrival-Date", ARRIVAL_DATE},
        {"X-Petrel-Queue-ID", "7F3A9C1E"},
        END_FIELDS,
    };
    static const struct want_field bob[] = {
        {"Original-Recipient", "rfc822; bob@example.org Action: delivered"},
        {"Final-Recipient", "rfc822; bob@example.org"},
        {"Action", "failed"},
        {"Status", "5.0.0"},
        {"Remote-MTA", "dns; mx.example.org X-Evil: 1"},
        {"Diagnostic-Code", "smtp; 550-5.1.1 first line 550 5.1.1 second line"},
        END_FIELDS,
    };
    assert_int_equal(r.ngroups, 2);
    ok = check_fields("per-message", &r.groups[0], msg_fields) && ok;
    ok = check_fields("bob", &r.groups[1], bob) && ok;
    report_free(&r);
    buf_reset(&msg);
    free(o.p);
    assert_true(ok);
}

static void
test_bounce_from_name_forms(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        const char *want; /* the From value; NULL: encoded-words, checked decoded */
    } cases[] = {
        {"Mail Delivery System", "Mail Delivery System <MAILER-DAEMON@mta.example>"},
        {"", "<MAILER-DAEMON@mta.example>"},
        {"Mail System, Example Inc.", "\"Mail System, Example Inc.\" <MAILER-DAEMON@mta.example>"},
        {"Syst\xc3\xa8me de messagerie", NULL},
    };
    bool ok = true;
    struct original o = make_original(orig_headers, orig_body);
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct bounce_params p = base_params(o, two_failed, 1);
        p.from_name = cases[i].name;
        struct buf msg;
        struct report r;
        build_and_parse(cases[i].name, &p, &msg, &r);
        const char *from = fields_get(&r.hdr, "From");
        if (cases[i].want != NULL) {
            ok = check_str(cases[i].name, from, cases[i].want) && ok;
        } else {
            const char *lt = from ? strstr(from, " <MAILER-DAEMON@mta.example>") : NULL;
            char words[200];
            char decoded[200];
            if (lt == NULL || (size_t)(lt - from) >= sizeof(words)) {
                print_error("%s: From: got \"%s\"\n", cases[i].name, from ? from : "(none)");
                ok = false;
            } else {
                memcpy(words, from, (size_t)(lt - from));
                words[lt - from] = '\0';
                ok = decode_encoded_words(words, decoded, sizeof(decoded)) &&
                     check_str(cases[i].name, decoded, cases[i].name) && ok;
            }
        }
        report_free(&r);
        buf_reset(&msg);
    }
    free(o.p);
    assert_true(ok);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bounce_two_failed_rcpts_headers_only),
        cmocka_unit_test(test_bounce_ret_full_returns_the_message),
        cmocka_unit_test(test_bounce_ret_full_odd_originals_byte_exact),
        cmocka_unit_test(test_bounce_success_report),
        cmocka_unit_test(test_bounce_delay_warning),
        cmocka_unit_test(test_bounce_long_diagnostic_is_folded),
        cmocka_unit_test(test_bounce_boundary_avoids_the_original),
        cmocka_unit_test(test_bounce_smtputf8_global_types),
        cmocka_unit_test(test_bounce_hook_subject_and_text),
        cmocka_unit_test(test_bounce_values_cannot_inject_lines),
        cmocka_unit_test(test_bounce_from_name_forms),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
