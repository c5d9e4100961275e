/*
 * smtp_parse — pure parsing of SMTP command lines: verbs, reverse and forward
 * paths (RFC 5321 4.1.1.2, 4.1.1.3, 4.1.2, 4.1.3), ESMTP parameters of MAIL and
 * RCPT (RFC 1870 SIZE, 6152 BODY, 6531 SMTPUTF8, 3461 RET/ENVID/NOTIFY/ORCPT,
 * 4954 5 AUTH, petrel's XBIND), BDAT (RFC 3030), XBIND, HELO/EHLO and xtext.
 *
 * Owns nothing: every function reads a borrowed span (which may hold any byte,
 * NUL included, so nothing here calls strlen on peer data) and writes into
 * caller buffers bounded by the sizes given; an output that does not fit is an
 * error reply, never a truncation. No allocation, no I/O, no mutable globals.
 * Policy (sizes against limits, relay rights, which extensions are offered) is
 * left to smtp_server; this module only says whether a line is well-formed.
 */
#include "smtp_parse.h"

#include <arpa/inet.h>
#include <string.h>

/* Flags for smtp_domain_check(). */
#define DOM_UTF8 1u       /* U-labels (RFC 6531 3.3, sub-domain =/ U-label) */
#define DOM_UNDERSCORE 2u /* '_' in labels (HELO only: common in the wild) */

#define SMTP_LABEL_MAX 63  /* RFC 1035 2.3.4 */
#define SMTP_DIGITS_MAX 20 /* SIZE and BDAT chunk-size: UINT64_MAX has 20 digits */

static const struct {
    const char *name;
    enum smtp_verb verb;
} smtp_verbs[] = {
    {"EHLO", SMTP_EHLO},         {"HELO", SMTP_HELO}, {"MAIL", SMTP_MAIL},   {"RCPT", SMTP_RCPT},
    {"DATA", SMTP_DATA},         {"BDAT", SMTP_BDAT}, {"RSET", SMTP_RSET},   {"NOOP", SMTP_NOOP},
    {"QUIT", SMTP_QUIT},         {"VRFY", SMTP_VRFY}, {"EXPN", SMTP_EXPN},   {"HELP", SMTP_HELP},
    {"STARTTLS", SMTP_STARTTLS}, {"AUTH", SMTP_AUTH}, {"XBIND", SMTP_XBIND},
};

static bool
smtp_is_ctl(unsigned char c)
{
    return c < 0x20 || c == 0x7f;
}

static bool
smtp_is_digit(unsigned char c)
{
    return c >= '0' && c <= '9';
}

static bool
smtp_is_alnum(unsigned char c)
{
    return smtp_is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

/* RFC 5322 3.2.3 atext (RFC 5321 4.1.2 Atom). */
static bool
smtp_is_atext(unsigned char c)
{
    return smtp_is_alnum(c) || (c != 0 && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL);
}

static int
smtp_hex_value(unsigned char c)
{
    if (smtp_is_digit(c))
        return c - '0';
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Never offset a NULL span pointer (UB even by 0): callers may pass {NULL, 0}. */
static struct span
smtp_span_fix(struct span s)
{
    if (s.p == NULL)
        s = (struct span){"", 0};
    return s;
}

/* Length (2..4) of the well-formed UTF-8 sequence at s[0 .. len), or 0 for
 * anything RFC 3629 section 4 forbids: stray continuation bytes, overlong
 * forms (C0, C1, E0 80..9F, F0 80..8F), surrogates (ED A0..BF), code points
 * above U+10FFFF (F4 90.., F5..FF) and truncated sequences. C1 controls
 * (U+0080..U+009F) are refused too: control characters have no place in a
 * mailbox or a parameter. */
static size_t
smtp_utf8_len(const char *p, size_t len)
{
    const unsigned char *s = (const unsigned char *)p;
    unsigned char lo = 0x80;
    unsigned char hi = 0xbf;
    size_t n;
    if (s[0] >= 0xc2 && s[0] <= 0xdf) {
        n = 2;
        if (s[0] == 0xc2)
            lo = 0xa0;
    } else if (s[0] == 0xe0) {
        n = 3;
        lo = 0xa0;
    } else if (s[0] >= 0xe1 && s[0] <= 0xef) {
        n = 3;
        if (s[0] == 0xed)
            hi = 0x9f;
    } else if (s[0] == 0xf0) {
        n = 4;
        lo = 0x90;
    } else if (s[0] >= 0xf1 && s[0] <= 0xf3) {
        n = 4;
    } else if (s[0] == 0xf4) {
        n = 4;
        hi = 0x8f;
    } else {
        return 0;
    }
    if (len < n || s[1] < lo || s[1] > hi)
        return 0;
    for (size_t i = 2; i < n; i++) {
        if (s[i] < 0x80 || s[i] > 0xbf)
            return 0;
    }
    return n;
}

/* Next SP-separated token of *rest (runs of SP are one separator); false at
 * the end. Other bytes, TAB included, belong to tokens. */
static bool
smtp_next_token(struct span *rest, struct span *tok)
{
    size_t i = 0;
    while (i < rest->len && rest->p[i] == ' ')
        i++;
    if (i == rest->len) {
        rest->p += i;
        rest->len = 0;
        return false;
    }
    size_t start = i;
    while (i < rest->len && rest->p[i] != ' ')
        i++;
    *tok = (struct span){rest->p + start, i - start};
    rest->p += i;
    rest->len -= i;
    return true;
}

static bool
smtp_span_has_ctl(struct span s)
{
    for (size_t i = 0; i < s.len; i++) {
        if (smtp_is_ctl((unsigned char)s.p[i]))
            return true;
    }
    return false;
}

static bool
smtp_str_has_ctl(const char *s)
{
    for (; *s != '\0'; s++) {
        if (smtp_is_ctl((unsigned char)*s))
            return true;
    }
    return false;
}

/* Copies span s into out as a C string; false if it does not fit. */
static bool
smtp_span_copy(struct span s, char *out, size_t size)
{
    if (size == 0 || s.len >= size)
        return false;
    memcpy(out, s.p, s.len);
    out[s.len] = '\0';
    return true;
}

/* Parses 1..20 decimal digits into *v; false on anything else or overflow. */
static bool
smtp_parse_u64(struct span s, uint64_t *v)
{
    if (s.len == 0 || s.len > SMTP_DIGITS_MAX)
        return false;
    uint64_t n = 0;
    for (size_t i = 0; i < s.len; i++) {
        unsigned char c = (unsigned char)s.p[i];
        if (!smtp_is_digit(c))
            return false;
        unsigned d = c - '0';
        if (n > (UINT64_MAX - d) / 10)
            return false;
        n = n * 10 + d;
    }
    *v = n;
    return true;
}

/* Domain = sub-domain *("." sub-domain), sub-domain = Let-dig [Ldh-str]
 * (RFC 5321 4.1.2), or a U-label with DOM_UTF8 (any well-formed non-ASCII
 * character counts as a letter; length is counted in octets). Labels of at
 * most 63 octets, the whole at most 255. Sets *non_ascii if it saw UTF-8. */
static bool
smtp_domain_check(const char *s, size_t len, unsigned flags, bool *non_ascii)
{
    if (len == 0 || len > SMTP_DOMAIN_MAX)
        return false;
    size_t label = 0;
    unsigned char prev = '.';
    for (size_t i = 0; i < len;) {
        unsigned char c = (unsigned char)s[i];
        size_t n = 1;
        if (c == '.') {
            if (label == 0 || prev == '-')
                return false;
            label = 0;
            prev = c;
            i++;
            continue;
        }
        if (c >= 0x80) {
            if (!(flags & DOM_UTF8) || (n = smtp_utf8_len(s + i, len - i)) == 0)
                return false;
            *non_ascii = true;
            c = 'a';
        } else if (c == '-') {
            if (label == 0)
                return false;
        } else if (c == '_') {
            if (!(flags & DOM_UNDERSCORE))
                return false;
        } else if (!smtp_is_alnum(c)) {
            return false;
        }
        label += n;
        if (label > SMTP_LABEL_MAX)
            return false;
        prev = c;
        i += n;
    }
    return label > 0 && prev != '-';
}

/* True if s[0 .. len) is a literal IPv4 or IPv6 address (inet_pton syntax). */
static bool
smtp_ip_check(const char *s, size_t len, int af)
{
    char tmp[INET6_ADDRSTRLEN];
    unsigned char bin[sizeof(struct in6_addr)];
    if (len == 0 || len >= sizeof(tmp) || memchr(s, '\0', len) != NULL)
        return false;
    memcpy(tmp, s, len);
    tmp[len] = '\0';
    if (af != AF_INET6 && inet_pton(AF_INET, tmp, bin) == 1)
        return true;
    return af != AF_INET && inet_pton(AF_INET6, tmp, bin) == 1;
}

/* address-literal = "[" ( IPv4-address-literal / IPv6-address-literal ) "]"
 * (RFC 5321 4.1.3); the "IPv6:" tag is case-insensitive (RFC 5234 2.3).
 * General-address-literal is refused: nothing would deliver to one. */
static bool
smtp_addr_literal_check(const char *s, size_t len)
{
    if (len < 3 || s[0] != '[' || s[len - 1] != ']')
        return false;
    const char *p = s + 1;
    size_t n = len - 2;
    if (n > 5 && ascii_ncasecmp(p, "IPv6:", 5) == 0)
        return smtp_ip_check(p + 5, n - 5, AF_INET6);
    return smtp_ip_check(p, n, AF_INET);
}

/* Mailbox = Local-part "@" ( Domain / address-literal ) (RFC 5321 4.1.2),
 * UTF-8 allowed where RFC 6531 3.3 allows it (atext, qtextSMTP, sub-domain);
 * *non_ascii tells the caller whether SMTPUTF8 is needed. With
 * allow_postmaster a bare "Postmaster" (any case, RFC 5321 4.1.1.3) passes. */
static bool
smtp_mailbox_check(const char *s, size_t len, bool allow_postmaster, bool *non_ascii)
{
    size_t i = 0;
    size_t n;
    if (len == 0)
        return false;
    if (s[0] == '"') {
        /* Quoted-string = DQUOTE *(qtextSMTP / quoted-pairSMTP) DQUOTE */
        i = 1;
        for (;;) {
            if (i >= len)
                return false;
            unsigned char c = (unsigned char)s[i];
            if (c == '"') {
                i++;
                break;
            }
            if (c == '\\') {
                if (i + 1 >= len || s[i + 1] < 32 || s[i + 1] > 126)
                    return false;
                i += 2;
            } else if (c >= 0x80) {
                if ((n = smtp_utf8_len(s + i, len - i)) == 0)
                    return false;
                *non_ascii = true;
                i += n;
            } else if (c < 32 || c > 126) {
                return false;
            } else {
                i++;
            }
        }
    } else {
        /* Dot-string = Atom *("." Atom) */
        bool atom_start = true;
        while (i < len && s[i] != '@') {
            unsigned char c = (unsigned char)s[i];
            if (c == '.') {
                if (atom_start)
                    return false;
                atom_start = true;
                i++;
                continue;
            }
            if (c >= 0x80) {
                if ((n = smtp_utf8_len(s + i, len - i)) == 0)
                    return false;
                *non_ascii = true;
                i += n;
            } else if (smtp_is_atext(c)) {
                i++;
            } else {
                return false;
            }
            atom_start = false;
        }
        if (atom_start)
            return false; /* empty, or a trailing dot */
    }
    if (i > SMTP_LOCAL_MAX)
        return false;
    if (i == len)
        return allow_postmaster && len == 10 && ascii_ncasecmp(s, "postmaster", 10) == 0;
    if (s[i] != '@')
        return false;
    i++;
    if (i < len && s[i] == '[')
        return smtp_addr_literal_check(s + i, len - i);
    return smtp_domain_check(s + i, len - i, DOM_UTF8, non_ascii);
}

/* Splits MAIL/RCPT arguments into the path (inside the angle brackets, or the
 * bare token when they are missing, as Postfix tolerates) and the rest. The
 * scan for '>' skips quoted strings so "<\"a>b\"@x>" is one path. The path
 * length limit (RFC 5321 4.5.3.1.3) counts the brackets. */
static const struct reply *
smtp_split_path(struct span args, const struct reply *syntax, const struct reply *bad,
                struct span *path, struct span *rest)
{
    size_t i = 0;
    while (i < args.len && args.p[i] == ' ')
        i++;
    if (i == args.len)
        return syntax;
    const char *p = args.p + i;
    size_t len = args.len - i;
    size_t end;
    size_t total;
    if (p[0] == '<') {
        bool quoted = false;
        size_t j;
        for (j = 1; j < len; j++) {
            if (quoted) {
                if (p[j] == '\\' && j + 1 < len)
                    j++;
                else if (p[j] == '"')
                    quoted = false;
            } else if (p[j] == '"') {
                quoted = true;
            } else if (p[j] == '>') {
                break;
            }
        }
        if (j == len)
            return syntax; /* no closing '>' */
        *path = (struct span){p + 1, j - 1};
        end = j + 1;
        total = end;
    } else {
        size_t j = 0;
        while (j < len && p[j] != ' ')
            j++;
        if (memchr(p, '>', j) != NULL)
            return syntax; /* '>' without '<' */
        *path = (struct span){p, j};
        end = j;
        total = j + 2;
    }
    if (end < len && p[end] != ' ')
        return syntax; /* junk glued to the path */
    if (total > SMTP_PATH_MAX)
        return bad;
    *rest = (struct span){p + end, len - end};
    return NULL;
}

/* Path contents: [ A-d-l ":" ] Mailbox (RFC 5321 4.1.2). The source route is
 * checked and dropped (RFC 5321 C: MUST accept, SHOULD ignore); *mailbox is
 * what remains. An empty path is the caller's business (null sender). */
static bool
smtp_path_check(struct span path, bool allow_postmaster, bool *non_ascii, struct span *mailbox)
{
    const char *s = path.p;
    size_t len = path.len;
    if (len > 0 && s[0] == '@') {
        size_t i = 0;
        for (;;) {
            if (i >= len || s[i] != '@')
                return false;
            size_t start = ++i;
            while (i < len && s[i] != ',' && s[i] != ':')
                i++;
            if (i >= len || !smtp_domain_check(s + start, i - start, DOM_UTF8, non_ascii))
                return false;
            if (s[i++] == ':')
                break;
        }
        s += i;
        len -= i;
    }
    *mailbox = (struct span){s, len};
    return smtp_mailbox_check(s, len, allow_postmaster, non_ascii);
}

/* Decodes xtext (RFC 3461 4): "+XX" (either hex case accepted) or a char in
 * 33..126 other than '+' and '='; with utf8, well-formed UTF-8 passes as is
 * (RFC 6531 3.3 extends esmtp-value). A decoded NUL is refused: out is a C
 * string. */
static bool
smtp_xtext_decode_utf8(struct span in, bool utf8, char *out, size_t size)
{
    if (size == 0)
        return false;
    in = smtp_span_fix(in);
    size_t o = 0;
    for (size_t i = 0; i < in.len;) {
        unsigned char c = (unsigned char)in.p[i];
        size_t n = 1;
        if (c == '+') {
            if (in.len - i < 3)
                goto fail;
            int hi = smtp_hex_value((unsigned char)in.p[i + 1]);
            int lo = smtp_hex_value((unsigned char)in.p[i + 2]);
            if (hi < 0 || lo < 0 || (hi == 0 && lo == 0) || o + 1 >= size)
                goto fail;
            out[o++] = (char)(hi * 16 + lo);
            i += 3;
            continue;
        }
        if (c >= 0x80) {
            if (!utf8 || (n = smtp_utf8_len(in.p + i, in.len - i)) == 0)
                goto fail;
        } else if (c < 33 || c > 126 || c == '=') {
            goto fail;
        }
        if (o + n >= size)
            goto fail;
        memcpy(out + o, in.p + i, n);
        o += n;
        i += n;
    }
    out[o] = '\0';
    return true;
fail:
    out[0] = '\0';
    return false;
}

/* ---- ESMTP parameters ---------------------------------------------------- */

struct smtp_param_def {
    const char *name;
    const struct reply *bad; /* borrowed: a static reply for a bad value */
    bool value;              /* needs "=value"; otherwise takes none */
};

enum { MP_SIZE, MP_BODY, MP_SMTPUTF8, MP_RET, MP_ENVID, MP_AUTH, MP_XBIND };

static const struct smtp_param_def smtp_mail_params[] = {
    [MP_SIZE] = {"SIZE", &R_BAD_PARAM_SIZE, true},
    [MP_BODY] = {"BODY", &R_BAD_PARAM_BODY, true},
    [MP_SMTPUTF8] = {"SMTPUTF8", &R_BAD_PARAM_SMTPUTF8, false},
    [MP_RET] = {"RET", &R_BAD_PARAM_RET, true},
    [MP_ENVID] = {"ENVID", &R_BAD_PARAM_ENVID, true},
    [MP_AUTH] = {"AUTH", &R_BAD_PARAM_AUTH, true},
    [MP_XBIND] = {"XBIND", &R_BAD_PARAM_XBIND, true},
};

enum { RP_NOTIFY, RP_ORCPT };

static const struct smtp_param_def smtp_rcpt_params[] = {
    [RP_NOTIFY] = {"NOTIFY", &R_BAD_PARAM_NOTIFY, true},
    [RP_ORCPT] = {"ORCPT", &R_BAD_PARAM_ORCPT, true},
};

/* One esmtp-param = esmtp-keyword ["=" esmtp-value] (RFC 5321 4.1.2). */
struct smtp_param {
    struct span key;
    struct span value;
    bool has_value; /* '=' present (value may still be empty) */
};

static void
smtp_param_split(struct span tok, struct smtp_param *pa)
{
    const char *eq = memchr(tok.p, '=', tok.len);
    if (eq == NULL) {
        *pa = (struct smtp_param){tok, {tok.p + tok.len, 0}, false};
        return;
    }
    size_t k = (size_t)(eq - tok.p);
    *pa = (struct smtp_param){{tok.p, k}, {eq + 1, tok.len - k - 1}, true};
}

/* True if some parameter in params has keyword key (case-insensitive). Used to
 * learn about SMTPUTF8 before values that may carry UTF-8 are checked. */
static bool
smtp_params_have(struct span params, const char *key)
{
    struct span tok;
    while (smtp_next_token(&params, &tok)) {
        struct smtp_param pa;
        smtp_param_split(tok, &pa);
        if (span_eq_ci(pa.key, key))
            return true;
    }
    return false;
}

/* Checks one parameter's shape against defs and returns its index in *idx.
 * Errors: control characters → 501 syntax; bad or unknown keyword → 555;
 * a repeated keyword → 555 duplicate; a missing, empty, extra or non-esmtp
 * value → the parameter's own 555 reply. */
static const struct reply *
smtp_param_lookup(struct span tok, const struct smtp_param_def *defs, size_t ndefs, bool utf8,
                  unsigned *seen, struct smtp_param *pa, size_t *idx)
{
    if (smtp_span_has_ctl(tok))
        return &R_SYNTAX;
    smtp_param_split(tok, pa);
    /* esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-") */
    if (pa->key.len == 0 || !smtp_is_alnum((unsigned char)pa->key.p[0]))
        return &R_BAD_PARAM;
    for (size_t i = 1; i < pa->key.len; i++) {
        unsigned char c = (unsigned char)pa->key.p[i];
        if (!smtp_is_alnum(c) && c != '-')
            return &R_BAD_PARAM;
    }
    size_t i;
    for (i = 0; i < ndefs; i++) {
        if (span_eq_ci(pa->key, defs[i].name))
            break;
    }
    if (i == ndefs)
        return &R_BAD_PARAM;
    if (*seen & (1u << i))
        return &R_DUP_PARAM;
    *seen |= 1u << i;
    *idx = i;
    if (!defs[i].value)
        return pa->has_value ? defs[i].bad : NULL;
    if (!pa->has_value || pa->value.len == 0)
        return defs[i].bad;
    /* esmtp-value = 1*(%d33-60 / %d62-126), =/ UTF8-non-ascii (RFC 6531 3.3) */
    for (size_t j = 0; j < pa->value.len;) {
        unsigned char c = (unsigned char)pa->value.p[j];
        size_t n = 1;
        if (c >= 0x80) {
            if (!utf8 || (n = smtp_utf8_len(pa->value.p + j, pa->value.len - j)) == 0)
                return defs[i].bad;
        } else if (c == '=') {
            return defs[i].bad;
        }
        j += n;
    }
    return NULL;
}

/* XBIND=<ip>[,<hostname>] */
static bool
smtp_xbind_param(struct span v, struct smtp_mail_params *p)
{
    const char *comma = memchr(v.p, ',', v.len);
    size_t iplen = comma != NULL ? (size_t)(comma - v.p) : v.len;
    if (!smtp_ip_check(v.p, iplen, AF_UNSPEC) ||
        !smtp_span_copy((struct span){v.p, iplen}, p->xbind_ip, sizeof(p->xbind_ip)))
        return false;
    if (comma != NULL) {
        struct span h = {comma + 1, v.len - iplen - 1};
        if (!smtp_valid_domain(h.p, h.len, false) ||
            !smtp_span_copy(h, p->xbind_hostname, sizeof(p->xbind_hostname)))
            return false;
    }
    p->has_xbind = true;
    return true;
}

static const struct reply *
smtp_mail_params_parse(struct span params, bool utf8, struct smtp_mail_params *p)
{
    unsigned seen = 0;
    struct span tok;
    while (smtp_next_token(&params, &tok)) {
        struct smtp_param pa;
        size_t idx = 0;
        const struct reply *r = smtp_param_lookup(
            tok, smtp_mail_params, ARRAY_SIZE(smtp_mail_params), utf8, &seen, &pa, &idx);
        if (r != NULL)
            return r;
        struct span v = pa.value;
        bool ok = true;
        switch (idx) {
        case MP_SIZE:
            ok = smtp_parse_u64(v, &p->size);
            p->has_size = ok;
            break;
        case MP_BODY:
            /* RFC 3030 BINARYMIME is not offered, so it is refused too. */
            if (span_eq_ci(v, "7BIT"))
                p->body = SMTP_BODY_7BIT;
            else if (span_eq_ci(v, "8BITMIME"))
                p->body = SMTP_BODY_8BITMIME;
            else
                ok = false;
            break;
        case MP_SMTPUTF8:
            p->smtputf8 = true;
            break;
        case MP_RET:
            if (span_eq_ci(v, "FULL"))
                p->ret = SMTP_RET_FULL;
            else if (span_eq_ci(v, "HDRS"))
                p->ret = SMTP_RET_HDRS;
            else
                ok = false;
            break;
        case MP_ENVID:
            ok = smtp_xtext_decode_utf8(v, utf8, p->envid, sizeof(p->envid)) &&
                 !smtp_str_has_ctl(p->envid);
            break;
        case MP_AUTH:
            /* RFC 4954 5: AUTH=<> or the xtext-encoded addr-spec */
            if (v.len == 2 && v.p[0] == '<' && v.p[1] == '>')
                ok = smtp_span_copy(v, p->auth, sizeof(p->auth));
            else
                ok = smtp_xtext_decode_utf8(v, utf8, p->auth, sizeof(p->auth)) &&
                     !smtp_str_has_ctl(p->auth);
            p->has_auth = ok;
            break;
        case MP_XBIND:
            ok = smtp_xbind_param(v, p);
            break;
        default:
            PANIC("smtp_parse: MAIL parameter index %zu", idx);
        }
        if (!ok)
            return smtp_mail_params[idx].bad;
    }
    return NULL;
}

/* NOTIFY="NEVER" / 1#("SUCCESS" / "FAILURE" / "DELAY") (RFC 3461 4.1) */
static bool
smtp_notify_param(struct span v, unsigned *notify)
{
    static const struct {
        const char *name;
        unsigned flag;
    } words[] = {
        {"NEVER", SMTP_NOTIFY_NEVER},
        {"SUCCESS", SMTP_NOTIFY_SUCCESS},
        {"FAILURE", SMTP_NOTIFY_FAILURE},
        {"DELAY", SMTP_NOTIFY_DELAY},
    };
    unsigned flags = 0;
    size_t i = 0;
    for (;;) {
        size_t start = i;
        while (i < v.len && v.p[i] != ',')
            i++;
        struct span w = {v.p + start, i - start};
        size_t k;
        for (k = 0; k < ARRAY_SIZE(words); k++) {
            if (span_eq_ci(w, words[k].name))
                break;
        }
        if (k == ARRAY_SIZE(words) || (flags & words[k].flag))
            return false;
        flags |= words[k].flag;
        if (i == v.len)
            break;
        i++; /* the comma; a trailing one leaves an empty word above */
    }
    if ((flags & SMTP_NOTIFY_NEVER) && flags != SMTP_NOTIFY_NEVER)
        return false;
    *notify = flags;
    return true;
}

/* ORCPT=addr-type ";" xtext (RFC 3461 4.2). addr-type is an atom, stored in
 * lower case ("rfc822", "utf-8"); the address is xtext-decoded (RFC 6533's
 * "\x{HEX}" of utf-8 addresses is kept verbatim) and may not be empty. */
static bool
smtp_orcpt_param(struct span v, bool utf8, struct smtp_rcpt_params *p)
{
    const char *semi = memchr(v.p, ';', v.len);
    if (semi == NULL)
        return false;
    size_t tlen = (size_t)(semi - v.p);
    if (tlen == 0 || tlen >= sizeof(p->orcpt_type))
        return false;
    for (size_t i = 0; i < tlen; i++) {
        unsigned char c = (unsigned char)v.p[i];
        if (c >= 0x80 || !smtp_is_atext(c))
            return false;
        p->orcpt_type[i] = (char)ascii_tolower(c);
    }
    p->orcpt_type[tlen] = '\0';
    struct span addr = {semi + 1, v.len - tlen - 1};
    if (addr.len == 0 || !smtp_xtext_decode_utf8(addr, utf8, p->orcpt, sizeof(p->orcpt)) ||
        smtp_str_has_ctl(p->orcpt)) {
        p->orcpt_type[0] = '\0';
        p->orcpt[0] = '\0';
        return false;
    }
    return true;
}

static const struct reply *
smtp_rcpt_params_parse(struct span params, bool utf8, struct smtp_rcpt_params *p)
{
    unsigned seen = 0;
    struct span tok;
    while (smtp_next_token(&params, &tok)) {
        struct smtp_param pa;
        size_t idx = 0;
        const struct reply *r = smtp_param_lookup(
            tok, smtp_rcpt_params, ARRAY_SIZE(smtp_rcpt_params), utf8, &seen, &pa, &idx);
        if (r != NULL)
            return r;
        bool ok;
        if (idx == RP_NOTIFY)
            ok = smtp_notify_param(pa.value, &p->notify);
        else
            ok = smtp_orcpt_param(pa.value, utf8, p);
        if (!ok)
            return smtp_rcpt_params[idx].bad;
    }
    return NULL;
}

/* ---- exported ------------------------------------------------------------ */

void
smtp_parse_command(struct span line, struct smtp_cmd *cmd)
{
    line = smtp_span_fix(line);
    memset(cmd, 0, sizeof(*cmd));
    size_t i = 0;
    while (i < line.len && line.p[i] != ' ')
        i++;
    cmd->verb_text = (struct span){line.p, i};
    while (i < line.len && line.p[i] == ' ')
        i++;
    size_t end = line.len;
    while (end > i && line.p[end - 1] == ' ')
        end--;
    cmd->args = (struct span){line.p + i, end - i};
    cmd->verb = SMTP_UNKNOWN;
    for (size_t k = 0; k < ARRAY_SIZE(smtp_verbs); k++) {
        if (span_eq_ci(cmd->verb_text, smtp_verbs[k].name)) {
            cmd->verb = smtp_verbs[k].verb;
            break;
        }
    }
    if (cmd->verb == SMTP_MAIL && span_startswith_ci(cmd->args, "FROM:")) {
        cmd->mail_from = true;
        cmd->args.p += 5;
        cmd->args.len -= 5;
    } else if (cmd->verb == SMTP_RCPT && span_startswith_ci(cmd->args, "TO:")) {
        cmd->rcpt_to = true;
        cmd->args.p += 3;
        cmd->args.len -= 3;
    }
}

const struct reply *
smtp_parse_helo(struct span args, char *out, size_t size)
{
    args = smtp_span_fix(args);
    if (size > 0)
        out[0] = '\0';
    while (args.len > 0 && args.p[0] == ' ') {
        args.p++;
        args.len--;
    }
    while (args.len > 0 && args.p[args.len - 1] == ' ')
        args.len--;
    if (args.len == 0)
        return &R_HELO_SYNTAX;
    bool ok;
    if (args.p[0] == '[') {
        ok = smtp_addr_literal_check(args.p, args.len);
    } else {
        bool non_ascii = false;
        ok = smtp_domain_check(args.p, args.len, DOM_UNDERSCORE, &non_ascii);
    }
    if (!ok || !smtp_span_copy(args, out, size))
        return &R_HELO_SYNTAX;
    return NULL;
}

const struct reply *
smtp_parse_mail(struct span args, char *addr, size_t addr_size, struct smtp_mail_params *p)
{
    args = smtp_span_fix(args);
    memset(p, 0, sizeof(*p));
    if (addr_size > 0)
        addr[0] = '\0';
    struct span path;
    struct span rest;
    const struct reply *r = smtp_split_path(args, &R_MAIL_SYNTAX, &R_BAD_SENDER, &path, &rest);
    if (r != NULL)
        return r;
    bool non_ascii = false;
    struct span mbox = {path.p, 0};
    if (path.len > 0 && !smtp_path_check(path, false, &non_ascii, &mbox))
        return &R_BAD_SENDER;
    if (mbox.len >= addr_size)
        return &R_BAD_SENDER;
    r = smtp_mail_params_parse(rest, smtp_params_have(rest, "SMTPUTF8"), p);
    if (r == NULL && non_ascii && !p->smtputf8)
        r = &R_NEED_SMTPUTF8;
    if (r != NULL) {
        memset(p, 0, sizeof(*p));
        return r;
    }
    memcpy(addr, mbox.p, mbox.len);
    addr[mbox.len] = '\0';
    return NULL;
}

const struct reply *
smtp_parse_rcpt(struct span args, bool smtputf8, char *addr, size_t addr_size,
                struct smtp_rcpt_params *p)
{
    args = smtp_span_fix(args);
    memset(p, 0, sizeof(*p));
    if (addr_size > 0)
        addr[0] = '\0';
    struct span path;
    struct span rest;
    const struct reply *r = smtp_split_path(args, &R_RCPT_SYNTAX, &R_BAD_RCPT, &path, &rest);
    if (r != NULL)
        return r;
    bool non_ascii = false;
    struct span mbox;
    if (!smtp_path_check(path, true, &non_ascii, &mbox) || mbox.len >= addr_size)
        return &R_BAD_RCPT; /* the null path <> included */
    r = smtp_rcpt_params_parse(rest, smtputf8, p);
    if (r == NULL && non_ascii && !smtputf8)
        r = &R_NEED_SMTPUTF8;
    if (r != NULL) {
        memset(p, 0, sizeof(*p));
        return r;
    }
    memcpy(addr, mbox.p, mbox.len);
    addr[mbox.len] = '\0';
    return NULL;
}

const struct reply *
smtp_parse_bdat(struct span args, uint64_t *size, bool *last)
{
    args = smtp_span_fix(args);
    *size = 0;
    *last = false;
    struct span tok;
    struct span last_tok;
    uint64_t n;
    if (!smtp_next_token(&args, &tok) || !smtp_parse_u64(tok, &n))
        return &R_BDAT_SYNTAX;
    bool is_last = false;
    if (smtp_next_token(&args, &last_tok)) {
        if (!span_eq_ci(last_tok, "LAST"))
            return &R_BDAT_SYNTAX;
        is_last = true;
    }
    if (smtp_next_token(&args, &tok))
        return &R_BDAT_SYNTAX;
    *size = n;
    *last = is_last;
    return NULL;
}

const struct reply *
smtp_parse_xbind(struct span args, bool *reset, char *ip, size_t ip_size, char *hostname,
                 size_t hostname_size)
{
    args = smtp_span_fix(args);
    *reset = false;
    if (ip_size > 0)
        ip[0] = '\0';
    if (hostname_size > 0)
        hostname[0] = '\0';
    struct span ip_tok;
    struct span host_tok = {"", 0};
    struct span extra;
    if (!smtp_next_token(&args, &ip_tok))
        return &R_XBIND_SYNTAX;
    bool has_host = smtp_next_token(&args, &host_tok);
    if (has_host && smtp_next_token(&args, &extra))
        return &R_XBIND_SYNTAX;
    if (span_eq_ci(ip_tok, "RESET")) {
        if (has_host)
            return &R_XBIND_SYNTAX;
        *reset = true;
        return NULL;
    }
    if (!smtp_ip_check(ip_tok.p, ip_tok.len, AF_UNSPEC) || ip_tok.len >= ip_size ||
        hostname_size == 0)
        return &R_XBIND_SYNTAX;
    if (has_host &&
        (!smtp_valid_domain(host_tok.p, host_tok.len, false) || host_tok.len >= hostname_size))
        return &R_XBIND_SYNTAX;
    (void)smtp_span_copy(ip_tok, ip, ip_size);
    (void)smtp_span_copy(host_tok, hostname, hostname_size);
    return NULL;
}

struct span
smtp_addr_domain(const char *addr)
{
    const char *at = NULL;
    bool quoted = false;
    size_t i;
    for (i = 0; addr[i] != '\0'; i++) {
        if (quoted) {
            if (addr[i] == '\\' && addr[i + 1] != '\0')
                i++;
            else if (addr[i] == '"')
                quoted = false;
        } else if (addr[i] == '"') {
            quoted = true;
        } else if (addr[i] == '@') {
            at = addr + i;
        }
    }
    if (at == NULL)
        return (struct span){addr + i, 0};
    return (struct span){at + 1, (size_t)(addr + i - (at + 1))};
}

bool
smtp_valid_domain(const char *s, size_t len, bool allow_utf8)
{
    bool non_ascii = false;
    if (s == NULL)
        return false;
    return smtp_domain_check(s, len, allow_utf8 ? DOM_UTF8 : 0, &non_ascii);
}

bool
smtp_is_ascii(const char *s, size_t len)
{
    for (size_t i = 0; i < len; i++) {
        if ((unsigned char)s[i] >= 0x80)
            return false;
    }
    return true;
}

bool
smtp_xtext_decode(struct span in, char *out, size_t size)
{
    return smtp_xtext_decode_utf8(in, false, out, size);
}

bool
smtp_xtext_encode(const char *in, char *out, size_t size)
{
    static const char hex[] = "0123456789ABCDEF";
    if (size == 0)
        return false;
    size_t o = 0;
    for (const unsigned char *s = (const unsigned char *)in; *s != '\0'; s++) {
        size_t need = (*s >= 33 && *s <= 126 && *s != '+' && *s != '=') ? 1 : 3;
        if (o + need >= size) {
            out[0] = '\0';
            return false;
        }
        if (need == 1) {
            out[o++] = (char)*s;
        } else {
            out[o++] = '+';
            out[o++] = hex[*s >> 4];
            out[o++] = hex[*s & 0x0f];
        }
    }
    out[o] = '\0';
    return true;
}
