/*
 * Unit tests for smtp_parse: table-driven cases for verbs, paths, ESMTP
 * parameters, HELO, BDAT, XBIND, xtext and the address helpers. Each table
 * runs every row and reports all failures as "got X, want Y" before failing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

#include <cmocka.h>

#include "smtp_parse.h"

/* A literal input with its length, so rows may carry NUL bytes. */
#define IN(s) .input = (s), .input_len = sizeof(s) - 1

static const char *
reply_str(const struct reply *r, char *buf, size_t size)
{
    if (r == NULL)
        return "NULL (ok)";
    snprintf(buf, size, "%d %s %s", r->code, r->esc, r->text);
    return buf;
}

static const char *
vis(const char *s, size_t len, char *buf, size_t size)
{
    return str_vis(buf, size, s, len);
}

/* Compares two replies; prints "got X, want Y" and returns false on mismatch. */
static bool
check_reply(const char *label, const struct reply *got, const struct reply *want)
{
    char g[160];
    char w[160];
    if (got == want)
        return true;
    print_error("%s: reply: got %s, want %s\n", label, reply_str(got, g, sizeof(g)),
                reply_str(want, w, sizeof(w)));
    return false;
}

static bool
check_str(const char *label, const char *what, const char *got, const char *want)
{
    if (strcmp(got, want) == 0)
        return true;
    char g[600];
    char w[600];
    print_error("%s: %s: got \"%s\", want \"%s\"\n", label, what,
                vis(got, strlen(got), g, sizeof(g)), vis(want, strlen(want), w, sizeof(w)));
    return false;
}

static bool
check_span(const char *label, const char *what, struct span got, const char *want)
{
    if (got.len == strlen(want) && memcmp(got.p, want, got.len) == 0)
        return true;
    char g[600];
    char w[600];
    print_error("%s: %s: got \"%s\", want \"%s\"\n", label, what, vis(got.p, got.len, g, sizeof(g)),
                vis(want, strlen(want), w, sizeof(w)));
    return false;
}

static bool
check_u64(const char *label, const char *what, uint64_t got, uint64_t want)
{
    if (got == want)
        return true;
    print_error("%s: %s: got %llu, want %llu\n", label, what, (unsigned long long)got,
                (unsigned long long)want);
    return false;
}

/* ---- smtp_parse_command -------------------------------------------------- */

struct cmd_case {
    const char *label;
    const char *input;
    size_t input_len;
    enum smtp_verb want_verb;
    const char *want_verb_text;
    const char *want_args;
    bool want_from;
    bool want_to;
    size_t want_verb_text_len; /* 0: strlen(want_verb_text); set for rows with NUL */
    size_t want_args_len;      /* 0: strlen(want_args) */
};

static const struct cmd_case cmd_cases[] = {
    {"mail", IN("MAIL FROM:<a@b.c>"), SMTP_MAIL, "MAIL", "<a@b.c>", true, false},
    {"mail lower case", IN("mail from:<a@b.c>"), SMTP_MAIL, "mail", "<a@b.c>", true, false},
    {"mail mixed case, space after colon", IN("MaIl FrOm: <a@b.c>"), SMTP_MAIL, "MaIl", " <a@b.c>",
     true, false},
    {"mail extra spaces after verb", IN("MAIL   FROM:<a@b.c>"), SMTP_MAIL, "MAIL", "<a@b.c>", true,
     false},
    {"mail trailing spaces trimmed", IN("MAIL FROM:<a@b.c>   "), SMTP_MAIL, "MAIL", "<a@b.c>", true,
     false},
    {"mail without FROM:", IN("MAIL <a@b.c>"), SMTP_MAIL, "MAIL", "<a@b.c>", false, false},
    {"mail FROM without colon", IN("MAIL FROM <a@b.c>"), SMTP_MAIL, "MAIL", "FROM <a@b.c>", false,
     false},
    {"mail alone", IN("MAIL"), SMTP_MAIL, "MAIL", "", false, false},
    {"mail with TO:", IN("MAIL TO:<a@b.c>"), SMTP_MAIL, "MAIL", "TO:<a@b.c>", false, false},
    {"rcpt", IN("RCPT TO:<b@c.d>"), SMTP_RCPT, "RCPT", "<b@c.d>", false, true},
    {"rcpt lower with params", IN("rcpt to:<b@c.d> NOTIFY=NEVER"), SMTP_RCPT, "rcpt",
     "<b@c.d> NOTIFY=NEVER", false, true},
    {"rcpt without TO:", IN("RCPT <b@c.d>"), SMTP_RCPT, "RCPT", "<b@c.d>", false, false},
    {"rcpt with FROM:", IN("RCPT FROM:<b@c.d>"), SMTP_RCPT, "RCPT", "FROM:<b@c.d>", false, false},
    {"ehlo", IN("EHLO mx.example.com"), SMTP_EHLO, "EHLO", "mx.example.com", false, false},
    {"helo lower", IN("helo x"), SMTP_HELO, "helo", "x", false, false},
    {"data", IN("DATA"), SMTP_DATA, "DATA", "", false, false},
    {"data trailing spaces", IN("DATA   "), SMTP_DATA, "DATA", "", false, false},
    {"bdat", IN("BDAT 100 LAST"), SMTP_BDAT, "BDAT", "100 LAST", false, false},
    {"rset", IN("RSET"), SMTP_RSET, "RSET", "", false, false},
    {"noop with arg", IN("NOOP hello"), SMTP_NOOP, "NOOP", "hello", false, false},
    {"quit", IN("quit"), SMTP_QUIT, "quit", "", false, false},
    {"vrfy", IN("VRFY bob"), SMTP_VRFY, "VRFY", "bob", false, false},
    {"expn", IN("EXPN list"), SMTP_EXPN, "EXPN", "list", false, false},
    {"help", IN("HELP"), SMTP_HELP, "HELP", "", false, false},
    {"starttls", IN("StartTLS"), SMTP_STARTTLS, "StartTLS", "", false, false},
    {"auth", IN("AUTH PLAIN AGFAYg=="), SMTP_AUTH, "AUTH", "PLAIN AGFAYg==", false, false},
    {"xbind", IN("XBIND 192.0.2.1 out.example"), SMTP_XBIND, "XBIND", "192.0.2.1 out.example",
     false, false},
    {"xbind reset", IN("xbind reset"), SMTP_XBIND, "xbind", "reset", false, false},
    {"unknown verb", IN("FOO bar"), SMTP_UNKNOWN, "FOO", "bar", false, false},
    {"empty line", IN(""), SMTP_UNKNOWN, "", "", false, false},
    {"leading space", IN(" MAIL FROM:<a@b>"), SMTP_UNKNOWN, "", "MAIL FROM:<a@b>", false, false},
    {"verb prefix is not the verb", IN("STARTTL"), SMTP_UNKNOWN, "STARTTL", "", false, false},
    {"verb with suffix", IN("MAILX FROM:<a@b>"), SMTP_UNKNOWN, "MAILX", "FROM:<a@b>", false, false},
    {"tab is not a separator", IN("MAIL\tFROM:<a@b>"), SMTP_UNKNOWN, "MAIL\tFROM:<a@b>", "", false,
     false},
    {"NUL in verb", IN("DATA\0"), SMTP_UNKNOWN, "DATA\0", "", false, false,
     .want_verb_text_len = 5},
    {"NUL in args kept", IN("NOOP \0x"), SMTP_NOOP, "NOOP", "\0x", false, false,
     .want_args_len = 2},
    {"8-bit verb", IN("M\xc3\x81IL FROM:<a@b>"), SMTP_UNKNOWN, "M\xc3\x81IL", "FROM:<a@b>", false,
     false},
};

/* want_* strings may hold NUL: compare with the literal's own length. */
static bool
check_span_n(const char *label, const char *what, struct span got, const char *want,
             size_t want_len)
{
    if (got.len == want_len && memcmp(got.p, want, want_len) == 0)
        return true;
    char g[600];
    char w[600];
    print_error("%s: %s: got \"%s\", want \"%s\"\n", label, what, vis(got.p, got.len, g, sizeof(g)),
                vis(want, want_len, w, sizeof(w)));
    return false;
}

static void
test_smtp_parse_command_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(cmd_cases); i++) {
        const struct cmd_case *c = &cmd_cases[i];
        struct smtp_cmd cmd;
        smtp_parse_command((struct span){c->input, c->input_len}, &cmd);
        bool ok = true;
        if (cmd.verb != c->want_verb) {
            print_error("%s: verb: got %d, want %d\n", c->label, cmd.verb, c->want_verb);
            ok = false;
        }
        size_t vt_len = c->want_verb_text_len ? c->want_verb_text_len : strlen(c->want_verb_text);
        size_t args_len = c->want_args_len ? c->want_args_len : strlen(c->want_args);
        ok &= check_span_n(c->label, "verb_text", cmd.verb_text, c->want_verb_text, vt_len);
        ok &= check_span_n(c->label, "args", cmd.args, c->want_args, args_len);
        if (cmd.mail_from != c->want_from || cmd.rcpt_to != c->want_to) {
            print_error("%s: from/to: got %d/%d, want %d/%d\n", c->label, cmd.mail_from,
                        cmd.rcpt_to, c->want_from, c->want_to);
            ok = false;
        }
        failures += !ok;
    }
    assert_int_equal(failures, 0);
}

static void
test_smtp_parse_command_null_span(void **state)
{
    (void)state;
    struct smtp_cmd cmd;
    smtp_parse_command((struct span){NULL, 0}, &cmd);
    assert_int_equal(cmd.verb, SMTP_UNKNOWN);
    assert_int_equal(cmd.args.len, 0);
}

/* ---- smtp_parse_mail ----------------------------------------------------- */

struct mail_case {
    const char *label;
    const char *input; /* after "MAIL FROM:" */
    size_t input_len;
    const struct reply *want_reply; /* NULL: valid */
    const char *want_addr;          /* checked when valid */
    /* parameters, checked when valid (zero values mean "absent") */
    uint64_t want_size;
    bool want_has_size;
    enum smtp_body want_body;
    bool want_smtputf8;
    enum smtp_ret want_ret;
    const char *want_envid;
    const char *want_auth;
    const char *want_xbind_ip;
    const char *want_xbind_hostname;
};

static const struct mail_case mail_cases[] = {
    /* paths */
    {"plain", IN("<user@example.com>"), NULL, "user@example.com"},
    {"leading space after colon", IN(" <user@example.com>"), NULL, "user@example.com"},
    {"several leading and trailing spaces", IN("   <user@example.com>   "), NULL,
     "user@example.com"},
    {"null sender", IN("<>"), NULL, ""},
    {"null sender with params", IN("<> SIZE=100"), NULL, "", .want_size = 100,
     .want_has_size = true},
    {"no angle brackets", IN("user@example.com"), NULL, "user@example.com"},
    {"no angle brackets with params", IN("user@example.com SIZE=10"), NULL, "user@example.com",
     .want_size = 10, .want_has_size = true},
    {"subdomains", IN("<first.last@sub.example.co.uk>"), NULL, "first.last@sub.example.co.uk"},
    {"case preserved", IN("<USER@EXAMPLE.COM>"), NULL, "USER@EXAMPLE.COM"},
    {"plus tag", IN("<user+tag@example.com>"), NULL, "user+tag@example.com"},
    {"every atext char", IN("<!#$%&'*+-/=?^_`{|}~@example.com>"), NULL,
     "!#$%&'*+-/=?^_`{|}~@example.com"},
    {"hyphen inside label", IN("<a@b-c.example>"), NULL, "a@b-c.example"},
    {"digit labels", IN("<a@123.example>"), NULL, "a@123.example"},
    {"quoted local part with space", IN("<\"john doe\"@example.com>"), NULL,
     "\"john doe\"@example.com"},
    {"quoted local part with quoted-pair", IN("<\"a\\\"b\"@x.org>"), NULL, "\"a\\\"b\"@x.org"},
    {"quoted local part with '>'", IN("<\"a>b\"@x.org>"), NULL, "\"a>b\"@x.org"},
    {"quoted local part with '@'", IN("<\"a@b\"@x.org>"), NULL, "\"a@b\"@x.org"},
    {"empty quoted local part", IN("<\"\"@x.org>"), NULL, "\"\"@x.org"},
    {"source route dropped", IN("<@relay.example:user@example.com>"), NULL, "user@example.com"},
    {"two-hop source route dropped", IN("<@a.example,@b.example:user@example.com>"), NULL,
     "user@example.com"},
    {"IPv4 literal", IN("<user@[192.0.2.1]>"), NULL, "user@[192.0.2.1]"},
    {"IPv6 literal", IN("<user@[IPv6:2001:db8::1]>"), NULL, "user@[IPv6:2001:db8::1]"},
    {"IPv6 tag any case", IN("<user@[ipv6:::1]>"), NULL, "user@[ipv6:::1]"},
    {"IPv6 literal with IPv4 tail", IN("<user@[IPv6:::ffff:192.0.2.1]>"), NULL,
     "user@[IPv6:::ffff:192.0.2.1]"},
    /* bad addresses: 501 5.1.7 */
    {"no domain", IN("<user>"), &R_BAD_SENDER},
    {"Postmaster is for RCPT only", IN("<Postmaster>"), &R_BAD_SENDER},
    {"empty domain", IN("<user@>"), &R_BAD_SENDER},
    {"empty local part", IN("<@example.com>"), &R_BAD_SENDER},
    {"leading dot", IN("<.user@example.com>"), &R_BAD_SENDER},
    {"trailing dot in local part", IN("<user.@example.com>"), &R_BAD_SENDER},
    {"double dot", IN("<us..er@example.com>"), &R_BAD_SENDER},
    {"double at", IN("<user@@example.com>"), &R_BAD_SENDER},
    {"two at signs", IN("<a@b@example.com>"), &R_BAD_SENDER},
    {"label starts with hyphen", IN("<user@-example.com>"), &R_BAD_SENDER},
    {"label ends with hyphen", IN("<user@example-.com>"), &R_BAD_SENDER},
    {"underscore in domain", IN("<user@exa_mple.com>"), &R_BAD_SENDER},
    {"empty label", IN("<user@example..com>"), &R_BAD_SENDER},
    {"trailing dot in domain", IN("<user@example.com.>"), &R_BAD_SENDER},
    {"leading dot in domain", IN("<user@.example.com>"), &R_BAD_SENDER},
    {"space in local part", IN("<us er@example.com>"), &R_BAD_SENDER},
    {"comma in local part", IN("<us,er@example.com>"), &R_BAD_SENDER},
    {"IPv4 literal out of range", IN("<user@[192.0.2.256]>"), &R_BAD_SENDER},
    {"IPv4 literal too short", IN("<user@[192.0.2]>"), &R_BAD_SENDER},
    {"IPv4 literal leading zero", IN("<user@[192.0.2.01]>"), &R_BAD_SENDER},
    {"IPv6 literal bad digit", IN("<user@[IPv6:2001:db8::g]>"), &R_BAD_SENDER},
    {"IPv6 tag with IPv4", IN("<user@[IPv6:192.0.2.1]>"), &R_BAD_SENDER},
    {"IPv6 without tag", IN("<user@[::1]>"), &R_BAD_SENDER},
    {"empty IPv6 tag", IN("<user@[IPv6:]>"), &R_BAD_SENDER},
    {"general address literal", IN("<user@[x400:foo]>"), &R_BAD_SENDER},
    {"unclosed literal", IN("<user@[192.0.2.1>"), &R_BAD_SENDER},
    {"junk after literal", IN("<user@[192.0.2.1]x>"), &R_BAD_SENDER},
    {"text after quoted string", IN("<\"a\"b@x.org>"), &R_BAD_SENDER},
    {"bad quoted-pair", IN("<\"a\\\x01\"@x.org>"), &R_BAD_SENDER},
    {"control char",
     IN("<a\x01"
        "b@x.org>"),
     &R_BAD_SENDER},
    {"DEL char",
     IN("<a\x7f"
        "b@x.org>"),
     &R_BAD_SENDER},
    {"NUL in local part", IN("<a\0b@x.org>"), &R_BAD_SENDER},
    {"NUL in domain", IN("<a@x\0.org>"), &R_BAD_SENDER},
    {"source route without mailbox", IN("<@relay.example:>"), &R_BAD_SENDER},
    {"source route without colon", IN("<@relay.example,user@example.com>"), &R_BAD_SENDER},
    {"source route bad domain", IN("<@-bad.example:user@example.com>"), &R_BAD_SENDER},
    {"source route empty hop", IN("<@a.example,:user@example.com>"), &R_BAD_SENDER},
    {"'<' inside path", IN("<a<b@x.org>"), &R_BAD_SENDER},
    /* command syntax: 501 5.5.4 */
    {"empty", IN(""), &R_MAIL_SYNTAX},
    {"spaces only", IN("   "), &R_MAIL_SYNTAX},
    {"missing '>'", IN("<user@example.com"), &R_MAIL_SYNTAX},
    {"missing '<'", IN("user@example.com>"), &R_MAIL_SYNTAX},
    {"junk after path", IN("<user@example.com>junk"), &R_MAIL_SYNTAX},
    {"NUL after path", IN("<user@example.com>\0"), &R_MAIL_SYNTAX},
    {"tab after path", IN("<user@example.com>\tSIZE=1"), &R_MAIL_SYNTAX},
    {"unterminated quote", IN("<\"unterminated@x.org>"), &R_MAIL_SYNTAX},
    {"NUL in parameters", IN("<a@b.example> SIZE=1\0"), &R_SYNTAX},
    {"control char in parameters", IN("<a@b.example> BODY=8BIT\x01MIME"), &R_SYNTAX},
    {"tab inside parameters", IN("<a@b.example> SIZE=1\tBODY=7BIT"), &R_SYNTAX},
    /* SMTPUTF8 (RFC 6531) */
    {"UTF-8 local part without SMTPUTF8", IN("<j\xc3\xb6hn@example.com>"), &R_NEED_SMTPUTF8},
    {"UTF-8 local part with SMTPUTF8", IN("<j\xc3\xb6hn@example.com> SMTPUTF8"), NULL,
     "j\xc3\xb6hn@example.com", .want_smtputf8 = true},
    {"SMTPUTF8 keyword any case, after others", IN("<j\xc3\xb6hn@example.com> SIZE=10 smtputf8"),
     NULL, "j\xc3\xb6hn@example.com", .want_size = 10, .want_has_size = true,
     .want_smtputf8 = true},
    {"UTF-8 domain with SMTPUTF8",
     IN("<user@b\xc3\xbc"
        "cher.example> SMTPUTF8"),
     NULL,
     "user@b\xc3\xbc"
     "cher.example",
     .want_smtputf8 = true},
    {"UTF-8 domain without SMTPUTF8",
     IN("<user@b\xc3\xbc"
        "cher.example>"),
     &R_NEED_SMTPUTF8},
    {"UTF-8 in quoted local part", IN("<\"j\xc3\xb6 hn\"@x.org> SMTPUTF8"), NULL,
     "\"j\xc3\xb6 hn\"@x.org", .want_smtputf8 = true},
    {"4-byte UTF-8", IN("<\xf0\x9f\x93\xa7@x.org> SMTPUTF8"), NULL, "\xf0\x9f\x93\xa7@x.org",
     .want_smtputf8 = true},
    {"truncated UTF-8", IN("<j\xc3@x.org> SMTPUTF8"), &R_BAD_SENDER},
    {"overlong UTF-8",
     IN("<\xc0\xaf"
        "x@x.org> SMTPUTF8"),
     &R_BAD_SENDER},
    {"overlong 3-byte UTF-8",
     IN("<\xe0\x80\xaf"
        "x@x.org> SMTPUTF8"),
     &R_BAD_SENDER},
    {"UTF-16 surrogate", IN("<\xed\xa0\x80@x.org> SMTPUTF8"), &R_BAD_SENDER},
    {"above U+10FFFF", IN("<\xf4\x90\x80\x80@x.org> SMTPUTF8"), &R_BAD_SENDER},
    {"stray continuation byte", IN("<\x80@x.org> SMTPUTF8"), &R_BAD_SENDER},
    {"C1 control", IN("<a\xc2\x85@x.org> SMTPUTF8"), &R_BAD_SENDER},
    {"invalid UTF-8 without SMTPUTF8", IN("<\xff@x.org>"), &R_BAD_SENDER},
    {"bad parameter before the SMTPUTF8 check", IN("<j\xc3\xb6hn@example.com> FOO"), &R_BAD_PARAM},
    /* SIZE (RFC 1870) */
    {"SIZE", IN("<a@b.example> SIZE=12345"), NULL, "a@b.example", .want_size = 12345,
     .want_has_size = true},
    {"SIZE=0", IN("<a@b.example> SIZE=0"), NULL, "a@b.example", .want_size = 0,
     .want_has_size = true},
    {"size lower case", IN("<a@b.example> size=7"), NULL, "a@b.example", .want_size = 7,
     .want_has_size = true},
    {"SIZE max uint64", IN("<a@b.example> SIZE=18446744073709551615"), NULL, "a@b.example",
     .want_size = UINT64_MAX, .want_has_size = true},
    {"SIZE overflow", IN("<a@b.example> SIZE=18446744073709551616"), &R_BAD_PARAM_SIZE},
    {"SIZE 21 digits", IN("<a@b.example> SIZE=000000000000000000001"), &R_BAD_PARAM_SIZE},
    {"SIZE huge", IN("<a@b.example> SIZE=99999999999999999999"), &R_BAD_PARAM_SIZE},
    {"SIZE empty", IN("<a@b.example> SIZE="), &R_BAD_PARAM_SIZE},
    {"SIZE without value", IN("<a@b.example> SIZE"), &R_BAD_PARAM_SIZE},
    {"SIZE negative", IN("<a@b.example> SIZE=-1"), &R_BAD_PARAM_SIZE},
    {"SIZE with unit", IN("<a@b.example> SIZE=1k"), &R_BAD_PARAM_SIZE},
    {"SIZE twice", IN("<a@b.example> SIZE=1 SIZE=2"), &R_DUP_PARAM},
    {"SIZE twice, different case", IN("<a@b.example> SIZE=1 size=1"), &R_DUP_PARAM},
    /* BODY (RFC 6152, 3030) */
    {"BODY=7BIT", IN("<a@b.example> BODY=7BIT"), NULL, "a@b.example", .want_body = SMTP_BODY_7BIT},
    {"BODY=8BITMIME", IN("<a@b.example> BODY=8BITMIME"), NULL, "a@b.example",
     .want_body = SMTP_BODY_8BITMIME},
    {"body=8bitmime", IN("<a@b.example> body=8bitmime"), NULL, "a@b.example",
     .want_body = SMTP_BODY_8BITMIME},
    {"BODY=BINARYMIME not offered", IN("<a@b.example> BODY=BINARYMIME"), &R_BAD_PARAM_BODY},
    {"BODY=8BIT", IN("<a@b.example> BODY=8BIT"), &R_BAD_PARAM_BODY},
    {"BODY empty", IN("<a@b.example> BODY="), &R_BAD_PARAM_BODY},
    {"BODY without value", IN("<a@b.example> BODY"), &R_BAD_PARAM_BODY},
    {"BODY twice", IN("<a@b.example> BODY=7BIT BODY=7BIT"), &R_DUP_PARAM},
    /* SMTPUTF8 */
    {"SMTPUTF8", IN("<a@b.example> SMTPUTF8"), NULL, "a@b.example", .want_smtputf8 = true},
    {"SMTPUTF8 with value", IN("<a@b.example> SMTPUTF8=yes"), &R_BAD_PARAM_SMTPUTF8},
    {"SMTPUTF8 with empty value", IN("<a@b.example> SMTPUTF8="), &R_BAD_PARAM_SMTPUTF8},
    {"SMTPUTF8 twice", IN("<a@b.example> SMTPUTF8 SMTPUTF8"), &R_DUP_PARAM},
    /* RET (RFC 3461 4.3) */
    {"RET=FULL", IN("<a@b.example> RET=FULL"), NULL, "a@b.example", .want_ret = SMTP_RET_FULL},
    {"ret=hdrs", IN("<a@b.example> ret=hdrs"), NULL, "a@b.example", .want_ret = SMTP_RET_HDRS},
    {"RET=NONE", IN("<a@b.example> RET=NONE"), &R_BAD_PARAM_RET},
    {"RET empty", IN("<a@b.example> RET="), &R_BAD_PARAM_RET},
    {"RET twice", IN("<a@b.example> RET=FULL RET=HDRS"), &R_DUP_PARAM},
    /* ENVID (RFC 3461 4.4) */
    {"ENVID", IN("<a@b.example> ENVID=QQ314159"), NULL, "a@b.example", .want_envid = "QQ314159"},
    {"ENVID xtext decoded", IN("<a@b.example> ENVID=QQ+2BZ+3D"), NULL, "a@b.example",
     .want_envid = "QQ+Z="},
    {"ENVID encoded space", IN("<a@b.example> ENVID=a+20b"), NULL, "a@b.example",
     .want_envid = "a b"},
    {"ENVID encoded CR", IN("<a@b.example> ENVID=a+0Db"), &R_BAD_PARAM_ENVID},
    {"ENVID encoded NUL", IN("<a@b.example> ENVID=a+00b"), &R_BAD_PARAM_ENVID},
    {"ENVID short hexchar", IN("<a@b.example> ENVID=ab+4"), &R_BAD_PARAM_ENVID},
    {"ENVID bad hexchar", IN("<a@b.example> ENVID=+GG"), &R_BAD_PARAM_ENVID},
    {"ENVID with '='", IN("<a@b.example> ENVID=a=b"), &R_BAD_PARAM_ENVID},
    {"ENVID empty", IN("<a@b.example> ENVID="), &R_BAD_PARAM_ENVID},
    {"ENVID UTF-8 without SMTPUTF8", IN("<a@b.example> ENVID=\xc3\xa9"), &R_BAD_PARAM_ENVID},
    {"ENVID UTF-8 with SMTPUTF8", IN("<a@b.example> ENVID=\xc3\xa9 SMTPUTF8"), NULL, "a@b.example",
     .want_smtputf8 = true, .want_envid = "\xc3\xa9"},
    {"ENVID invalid UTF-8 with SMTPUTF8", IN("<a@b.example> SMTPUTF8 ENVID=\xc3"),
     &R_BAD_PARAM_ENVID},
    {"ENVID twice", IN("<a@b.example> ENVID=a ENVID=b"), &R_DUP_PARAM},
    /* AUTH (RFC 4954 5) */
    {"AUTH=<>", IN("<a@b.example> AUTH=<>"), NULL, "a@b.example", .want_auth = "<>"},
    {"AUTH mailbox", IN("<a@b.example> AUTH=user@example.com"), NULL, "a@b.example",
     .want_auth = "user@example.com"},
    {"AUTH xtext decoded", IN("<a@b.example> AUTH=e+3Dmc2@example.com"), NULL, "a@b.example",
     .want_auth = "e=mc2@example.com"},
    {"AUTH empty", IN("<a@b.example> AUTH="), &R_BAD_PARAM_AUTH},
    {"AUTH bad xtext", IN("<a@b.example> AUTH=+ZZ"), &R_BAD_PARAM_AUTH},
    {"AUTH twice", IN("<a@b.example> AUTH=<> AUTH=<>"), &R_DUP_PARAM},
    /* XBIND (petrel) */
    {"XBIND ip", IN("<a@b.example> XBIND=192.0.2.1"), NULL, "a@b.example",
     .want_xbind_ip = "192.0.2.1", .want_xbind_hostname = ""},
    {"XBIND ip and hostname", IN("<a@b.example> XBIND=192.0.2.1,mta.example.com"), NULL,
     "a@b.example", .want_xbind_ip = "192.0.2.1", .want_xbind_hostname = "mta.example.com"},
    {"XBIND IPv6", IN("<a@b.example> xbind=2001:db8::1,mta.example.com"), NULL, "a@b.example",
     .want_xbind_ip = "2001:db8::1", .want_xbind_hostname = "mta.example.com"},
    {"XBIND bad ip", IN("<a@b.example> XBIND=999.1.1.1"), &R_BAD_PARAM_XBIND},
    {"XBIND bracketed ip", IN("<a@b.example> XBIND=[192.0.2.1]"), &R_BAD_PARAM_XBIND},
    {"XBIND hostname instead of ip", IN("<a@b.example> XBIND=mta.example.com"), &R_BAD_PARAM_XBIND},
    {"XBIND empty hostname", IN("<a@b.example> XBIND=192.0.2.1,"), &R_BAD_PARAM_XBIND},
    {"XBIND bad hostname", IN("<a@b.example> XBIND=192.0.2.1,bad_host"), &R_BAD_PARAM_XBIND},
    {"XBIND empty ip", IN("<a@b.example> XBIND=,mta.example.com"), &R_BAD_PARAM_XBIND},
    {"XBIND twice", IN("<a@b.example> XBIND=192.0.2.1 XBIND=192.0.2.2"), &R_DUP_PARAM},
    /* unknown and malformed parameters */
    {"unknown parameter", IN("<a@b.example> FOO=bar"), &R_BAD_PARAM},
    {"unknown flag", IN("<a@b.example> FOO"), &R_BAD_PARAM},
    {"RCPT parameter in MAIL", IN("<a@b.example> NOTIFY=NEVER"), &R_BAD_PARAM},
    {"keyword starting with hyphen", IN("<a@b.example> -X=1"), &R_BAD_PARAM},
    {"empty keyword", IN("<a@b.example> =5"), &R_BAD_PARAM},
    {"keyword with bad char", IN("<a@b.example> SI_ZE=5"), &R_BAD_PARAM},
    {"spaces between parameters", IN("<a@b.example>   SIZE=1    BODY=7BIT  "), NULL, "a@b.example",
     .want_size = 1, .want_has_size = true, .want_body = SMTP_BODY_7BIT},
    {"every parameter",
     IN("<a@b.example> SIZE=1000 BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ314159 AUTH=<> "
        "XBIND=192.0.2.7,out.example.net"),
     NULL, "a@b.example", .want_size = 1000, .want_has_size = true, .want_body = SMTP_BODY_8BITMIME,
     .want_smtputf8 = true, .want_ret = SMTP_RET_HDRS, .want_envid = "QQ314159", .want_auth = "<>",
     .want_xbind_ip = "192.0.2.7", .want_xbind_hostname = "out.example.net"},
};

static bool
check_mail_params(const char *label, const struct smtp_mail_params *p, const struct mail_case *c)
{
    bool ok = true;
    ok &= check_u64(label, "size", p->size, c->want_size);
    ok &= check_u64(label, "has_size", p->has_size, c->want_has_size);
    ok &= check_u64(label, "body", p->body, c->want_body);
    ok &= check_u64(label, "smtputf8", p->smtputf8, c->want_smtputf8);
    ok &= check_u64(label, "ret", p->ret, c->want_ret);
    ok &= check_str(label, "envid", p->envid, c->want_envid ? c->want_envid : "");
    ok &= check_u64(label, "has_auth", p->has_auth, c->want_auth != NULL);
    ok &= check_str(label, "auth", p->auth, c->want_auth ? c->want_auth : "");
    ok &= check_u64(label, "has_xbind", p->has_xbind, c->want_xbind_ip != NULL);
    ok &= check_str(label, "xbind_ip", p->xbind_ip, c->want_xbind_ip ? c->want_xbind_ip : "");
    ok &= check_str(label, "xbind_hostname", p->xbind_hostname,
                    c->want_xbind_hostname ? c->want_xbind_hostname : "");
    return ok;
}

static bool
params_zero(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        if (b[i] != 0)
            return false;
    }
    return true;
}

static void
test_smtp_parse_mail_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(mail_cases); i++) {
        const struct mail_case *c = &mail_cases[i];
        char addr[SMTP_ADDR_SIZE];
        struct smtp_mail_params p;
        memset(addr, 'x', sizeof(addr));
        memset(&p, 0x5a, sizeof(p));
        const struct reply *r =
            smtp_parse_mail((struct span){c->input, c->input_len}, addr, sizeof(addr), &p);
        bool ok = check_reply(c->label, r, c->want_reply);
        if (ok && r == NULL) {
            ok &= check_str(c->label, "addr", addr, c->want_addr);
            ok &= check_mail_params(c->label, &p, c);
        } else if (ok) {
            ok &= check_str(c->label, "addr on error", addr, "");
            if (!params_zero(&p, sizeof(p))) {
                print_error("%s: params on error: got non-zero, want zeroed\n", c->label);
                ok = false;
            }
        }
        failures += !ok;
    }
    assert_int_equal(failures, 0);
}

/* ---- smtp_parse_rcpt ----------------------------------------------------- */

struct rcpt_case {
    const char *label;
    const char *input; /* after "RCPT TO:" */
    size_t input_len;
    bool smtputf8;
    const struct reply *want_reply;
    const char *want_addr;
    unsigned want_notify;
    const char *want_orcpt_type;
    const char *want_orcpt;
};

#define N_SFD (SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_FAILURE | SMTP_NOTIFY_DELAY)

static const struct rcpt_case rcpt_cases[] = {
    {"plain", IN("<bob@example.org>"), false, NULL, "bob@example.org"},
    {"leading spaces", IN("  <bob@example.org>"), false, NULL, "bob@example.org"},
    {"no angle brackets", IN("bob@example.org"), false, NULL, "bob@example.org"},
    {"Postmaster", IN("<Postmaster>"), false, NULL, "Postmaster"},
    {"postmaster lower case", IN("<postmaster>"), false, NULL, "postmaster"},
    {"POSTMASTER upper case", IN("<POSTMASTER>"), false, NULL, "POSTMASTER"},
    {"Postmaster without brackets", IN("Postmaster"), false, NULL, "Postmaster"},
    {"postmaster with domain", IN("<postmaster@example.org>"), false, NULL,
     "postmaster@example.org"},
    {"quoted Postmaster", IN("<\"Postmaster\">"), false, &R_BAD_RCPT},
    {"other local part without domain", IN("<postmistress>"), false, &R_BAD_RCPT},
    {"null path", IN("<>"), false, &R_BAD_RCPT},
    {"empty", IN(""), false, &R_RCPT_SYNTAX},
    {"missing '>'", IN("<bob@example.org"), false, &R_RCPT_SYNTAX},
    {"junk after path", IN("<bob@example.org>x"), false, &R_RCPT_SYNTAX},
    {"source route", IN("<@a.example,@b.example:bob@example.org>"), false, NULL, "bob@example.org"},
    {"IPv6 literal", IN("<bob@[IPv6:::1]>"), false, NULL, "bob@[IPv6:::1]"},
    {"bad IPv6 literal", IN("<bob@[IPv6:::1::2]>"), false, &R_BAD_RCPT},
    {"quoted local part", IN("<\"john doe\"@example.com>"), false, NULL,
     "\"john doe\"@example.com"},
    {"bad domain", IN("<bob@exa mple.org>"), false, &R_BAD_RCPT},
    {"NUL in address", IN("<bob\0@example.org>"), false, &R_BAD_RCPT},
    {"UTF-8 without smtputf8",
     IN("<b\xc3\xb3"
        "b@example.org>"),
     false, &R_NEED_SMTPUTF8},
    {"UTF-8 with smtputf8",
     IN("<b\xc3\xb3"
        "b@example.org>"),
     true, NULL,
     "b\xc3\xb3"
     "b@example.org"},
    {"UTF-8 domain with smtputf8", IN("<bob@ex\xc3\xa4mple.org>"), true, NULL,
     "bob@ex\xc3\xa4mple.org"},
    {"invalid UTF-8 with smtputf8", IN("<b\xc3\x28@x.org>"), true, &R_BAD_RCPT},
    {"SMTPUTF8 is not a RCPT parameter", IN("<bob@example.org> SMTPUTF8"), true, &R_BAD_PARAM},
    /* NOTIFY (RFC 3461 4.1) */
    {"NOTIFY=NEVER", IN("<bob@example.org> NOTIFY=NEVER"), false, NULL, "bob@example.org",
     SMTP_NOTIFY_NEVER},
    {"NOTIFY all three", IN("<bob@example.org> NOTIFY=SUCCESS,FAILURE,DELAY"), false, NULL,
     "bob@example.org", N_SFD},
    {"notify=delay", IN("<bob@example.org> notify=delay"), false, NULL, "bob@example.org",
     SMTP_NOTIFY_DELAY},
    {"NOTIFY=FAILURE,success", IN("<bob@example.org> NOTIFY=FAILURE,success"), false, NULL,
     "bob@example.org", SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_FAILURE},
    {"NOTIFY=NEVER,SUCCESS", IN("<bob@example.org> NOTIFY=NEVER,SUCCESS"), false,
     &R_BAD_PARAM_NOTIFY},
    {"NOTIFY=SUCCESS,NEVER", IN("<bob@example.org> NOTIFY=SUCCESS,NEVER"), false,
     &R_BAD_PARAM_NOTIFY},
    {"NOTIFY repeated word", IN("<bob@example.org> NOTIFY=SUCCESS,SUCCESS"), false,
     &R_BAD_PARAM_NOTIFY},
    {"NOTIFY trailing comma", IN("<bob@example.org> NOTIFY=SUCCESS,"), false, &R_BAD_PARAM_NOTIFY},
    {"NOTIFY leading comma", IN("<bob@example.org> NOTIFY=,SUCCESS"), false, &R_BAD_PARAM_NOTIFY},
    {"NOTIFY empty", IN("<bob@example.org> NOTIFY="), false, &R_BAD_PARAM_NOTIFY},
    {"NOTIFY without value", IN("<bob@example.org> NOTIFY"), false, &R_BAD_PARAM_NOTIFY},
    {"NOTIFY=NONE", IN("<bob@example.org> NOTIFY=NONE"), false, &R_BAD_PARAM_NOTIFY},
    {"NOTIFY twice", IN("<bob@example.org> NOTIFY=NEVER NOTIFY=NEVER"), false, &R_DUP_PARAM},
    /* ORCPT (RFC 3461 4.2) */
    {"ORCPT rfc822", IN("<bob@example.org> ORCPT=rfc822;bob@example.org"), false, NULL,
     "bob@example.org", 0, "rfc822", "bob@example.org"},
    {"ORCPT type lower-cased, xtext decoded",
     IN("<bob@example.org> ORCPT=RFC822;b+2Bo+3Db@example.org"), false, NULL, "bob@example.org", 0,
     "rfc822", "b+o=b@example.org"},
    {"ORCPT utf-8 embedded unicode kept", IN("<bob@example.org> ORCPT=utf-8;b\\x{E9}b@x.org"),
     false, NULL, "bob@example.org", 0, "utf-8", "b\\x{E9}b@x.org"},
    {"ORCPT raw UTF-8 with smtputf8",
     IN("<bob@example.org> ORCPT=utf-8;b\xc3\xa9"
        "b@x.org"),
     true, NULL, "bob@example.org", 0, "utf-8",
     "b\xc3\xa9"
     "b@x.org"},
    {"ORCPT raw UTF-8 without smtputf8",
     IN("<bob@example.org> ORCPT=utf-8;b\xc3\xa9"
        "b@x.org"),
     false, &R_BAD_PARAM_ORCPT},
    {"ORCPT without ';'", IN("<bob@example.org> ORCPT=rfc822"), false, &R_BAD_PARAM_ORCPT},
    {"ORCPT empty type", IN("<bob@example.org> ORCPT=;bob@example.org"), false, &R_BAD_PARAM_ORCPT},
    {"ORCPT empty address", IN("<bob@example.org> ORCPT=rfc822;"), false, &R_BAD_PARAM_ORCPT},
    {"ORCPT bad xtext", IN("<bob@example.org> ORCPT=rfc822;+ZZ"), false, &R_BAD_PARAM_ORCPT},
    {"ORCPT decoded control char", IN("<bob@example.org> ORCPT=rfc822;a+0Ab"), false,
     &R_BAD_PARAM_ORCPT},
    {"ORCPT bad type char", IN("<bob@example.org> ORCPT=r@c;bob@example.org"), false,
     &R_BAD_PARAM_ORCPT},
    {"ORCPT type too long", IN("<bob@example.org> ORCPT=aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa;b@x"),
     false, &R_BAD_PARAM_ORCPT},
    {"ORCPT empty", IN("<bob@example.org> ORCPT="), false, &R_BAD_PARAM_ORCPT},
    {"ORCPT twice", IN("<bob@example.org> ORCPT=rfc822;a@b ORCPT=rfc822;a@b"), false, &R_DUP_PARAM},
    {"NOTIFY and ORCPT", IN("<bob@example.org> NOTIFY=FAILURE ORCPT=rfc822;bob@example.org"), false,
     NULL, "bob@example.org", SMTP_NOTIFY_FAILURE, "rfc822", "bob@example.org"},
    {"MAIL parameter in RCPT", IN("<bob@example.org> SIZE=10"), false, &R_BAD_PARAM},
    {"unknown RCPT parameter", IN("<bob@example.org> FOO=1"), false, &R_BAD_PARAM},
    {"NUL in parameters", IN("<bob@example.org> NOTIFY=NEVER\0"), false, &R_SYNTAX},
};

static void
test_smtp_parse_rcpt_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(rcpt_cases); i++) {
        const struct rcpt_case *c = &rcpt_cases[i];
        char addr[SMTP_ADDR_SIZE];
        struct smtp_rcpt_params p;
        memset(addr, 'x', sizeof(addr));
        memset(&p, 0x5a, sizeof(p));
        const struct reply *r = smtp_parse_rcpt((struct span){c->input, c->input_len}, c->smtputf8,
                                                addr, sizeof(addr), &p);
        bool ok = check_reply(c->label, r, c->want_reply);
        if (ok && r == NULL) {
            ok &= check_str(c->label, "addr", addr, c->want_addr);
            ok &= check_u64(c->label, "notify", p.notify, c->want_notify);
            ok &= check_str(c->label, "orcpt_type", p.orcpt_type,
                            c->want_orcpt_type ? c->want_orcpt_type : "");
            ok &= check_str(c->label, "orcpt", p.orcpt, c->want_orcpt ? c->want_orcpt : "");
        } else if (ok) {
            ok &= check_str(c->label, "addr on error", addr, "");
            if (!params_zero(&p, sizeof(p))) {
                print_error("%s: params on error: got non-zero, want zeroed\n", c->label);
                ok = false;
            }
        }
        failures += !ok;
    }
    assert_int_equal(failures, 0);
}

/* ---- RFC 5321 4.5.3.1 limits, built at run time -------------------------- */

struct limit_case {
    const char *label;
    size_t local_len; /* 'l' repeated */
    size_t label_len; /* length of the first domain label ('d' repeated) */
    size_t route_len; /* 0, or the length of a source route domain ('r' repeated) */
    bool rcpt;
    const struct reply *want_reply;
};

static const struct limit_case limit_cases[] = {
    {"local part of 64", 64, 10, 0, false, NULL},
    {"local part of 65", 65, 10, 0, false, &R_BAD_SENDER},
    {"local part of 65 (RCPT)", 65, 10, 0, true, &R_BAD_RCPT},
    {"label of 63", 10, 63, 0, false, NULL},
    {"label of 64", 10, 64, 0, false, &R_BAD_SENDER},
    {"label of 64 (RCPT)", 10, 64, 0, true, &R_BAD_RCPT},
    /* path = "<" + local + "@" + label + ".example>" : 2 + local + 1 + label + 8 */
    {"path of 256", 64, 0, 0, false, NULL},
    {"path of 257", 64, 0, 0, false, &R_BAD_SENDER},
    {"path of 257 (RCPT)", 64, 0, 0, true, &R_BAD_RCPT},
    {"source route makes the path too long", 10, 10, 240, false, &R_BAD_SENDER},
    {"source route within the limit", 10, 10, 60, false, NULL},
};

/* Appends n copies of c. */
static size_t
fill(char *buf, size_t off, char c, size_t n)
{
    memset(buf + off, c, n);
    return off + n;
}

static size_t
append(char *buf, size_t off, const char *s)
{
    size_t n = strlen(s);
    memcpy(buf + off, s, n);
    return off + n;
}

/* Builds a domain of total length len: labels of 50 octets while more than
 * 63 remain, then one last label of 13..63 (never an empty label). */
static size_t
fill_domain(char *buf, size_t off, size_t len)
{
    while (len > 63) {
        off = fill(buf, off, 'd', 50);
        buf[off++] = '.';
        len -= 51;
    }
    return fill(buf, off, 'd', len);
}

static void
test_smtp_parse_limits(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(limit_cases); i++) {
        const struct limit_case *c = &limit_cases[i];
        char in[1024];
        size_t n = 0;
        in[n++] = '<';
        if (c->route_len > 0) {
            in[n++] = '@';
            n = fill_domain(in, n, c->route_len);
            in[n++] = ':';
        }
        n = fill(in, n, 'l', c->local_len);
        in[n++] = '@';
        if (c->label_len > 0) /* one label of exactly that length */
            n = fill(in, n, 'd', c->label_len);
        else /* fill the path to 256 or 257 octets */
            n = fill_domain(in, n, (strstr(c->label, "257") ? 257 : 256) - (2 + c->local_len + 9));
        n = append(in, n, ".example>");
        char addr[SMTP_ADDR_SIZE];
        const struct reply *r;
        if (c->rcpt) {
            struct smtp_rcpt_params p;
            r = smtp_parse_rcpt((struct span){in, n}, false, addr, sizeof(addr), &p);
        } else {
            struct smtp_mail_params p;
            r = smtp_parse_mail((struct span){in, n}, addr, sizeof(addr), &p);
        }
        failures += !check_reply(c->label, r, c->want_reply);
    }
    assert_int_equal(failures, 0);
}

static void
test_smtp_parse_mail_small_buffer(void **state)
{
    (void)state;
    char addr[8];
    struct smtp_mail_params p;
    struct smtp_rcpt_params rp;
    struct span in = SPAN_LIT("<user@example.com>");
    assert_ptr_equal(smtp_parse_mail(in, addr, sizeof(addr), &p), &R_BAD_SENDER);
    assert_string_equal(addr, "");
    assert_ptr_equal(smtp_parse_mail(in, addr, 0, &p), &R_BAD_SENDER);
    assert_ptr_equal(smtp_parse_rcpt(in, false, addr, sizeof(addr), &rp), &R_BAD_RCPT);
    assert_string_equal(addr, "");
    /* fits exactly: 7 octets + NUL */
    assert_null(smtp_parse_mail(SPAN_LIT("<ab@c.de>"), addr, sizeof(addr), &p));
    assert_string_equal(addr, "ab@c.de");
    assert_null(smtp_parse_mail(SPAN_LIT("<>"), addr, 1, &p));
    assert_string_equal(addr, "");
}

static void
test_smtp_parse_envid_orcpt_limits(void **state)
{
    (void)state;
    char in[2048];
    char addr[SMTP_ADDR_SIZE];
    struct smtp_mail_params p;
    struct smtp_rcpt_params rp;
    /* ENVID: 100 decoded characters (here 50 plain + 50 "+2B") pass, 101 do not */
    for (size_t extra = 0; extra < 2; extra++) {
        size_t n = append(in, 0, "<a@b.example> ENVID=");
        n = fill(in, n, 'e', 50 + extra);
        for (int i = 0; i < 50; i++)
            n = append(in, n, "+2B");
        const struct reply *r = smtp_parse_mail((struct span){in, n}, addr, sizeof(addr), &p);
        if (extra == 0) {
            assert_null(r);
            assert_int_equal(strlen(p.envid), 100);
        } else {
            assert_ptr_equal(r, &R_BAD_PARAM_ENVID);
        }
    }
    /* ORCPT: 500 decoded characters pass, 501 do not */
    for (size_t extra = 0; extra < 2; extra++) {
        size_t n = append(in, 0, "<b@c.example> ORCPT=rfc822;");
        n = fill(in, n, 'o', 500 + extra);
        const struct reply *r =
            smtp_parse_rcpt((struct span){in, n}, false, addr, sizeof(addr), &rp);
        if (extra == 0) {
            assert_null(r);
            assert_int_equal(strlen(rp.orcpt), 500);
        } else {
            assert_ptr_equal(r, &R_BAD_PARAM_ORCPT);
        }
    }
    /* AUTH: a decoded mailbox that does not fit SMTP_ADDR_SIZE */
    size_t n = append(in, 0, "<a@b.example> AUTH=");
    n = fill(in, n, 'a', SMTP_ADDR_SIZE);
    assert_ptr_equal(smtp_parse_mail((struct span){in, n}, addr, sizeof(addr), &p),
                     &R_BAD_PARAM_AUTH);
}

/* ---- smtp_parse_helo ----------------------------------------------------- */

struct helo_case {
    const char *label;
    const char *input;
    size_t input_len;
    const struct reply *want_reply;
    const char *want_out;
};

static const struct helo_case helo_cases[] = {
    {"domain", IN("mx.example.com"), NULL, "mx.example.com"},
    {"spaces around", IN("  mx.example.com   "), NULL, "mx.example.com"},
    {"single label", IN("localhost"), NULL, "localhost"},
    {"IPv4 literal", IN("[192.0.2.1]"), NULL, "[192.0.2.1]"},
    {"IPv6 literal", IN("[IPv6:2001:db8::1]"), NULL, "[IPv6:2001:db8::1]"},
    {"underscore allowed", IN("my_host.example.com"), NULL, "my_host.example.com"},
    {"leading underscore", IN("_host.example"), NULL, "_host.example"},
    {"bare IPv4 (digit labels)", IN("192.0.2.1"), NULL, "192.0.2.1"},
    {"empty", IN(""), &R_HELO_SYNTAX},
    {"spaces only", IN("   "), &R_HELO_SYNTAX},
    {"two words", IN("foo bar"), &R_HELO_SYNTAX},
    {"bad IPv4 literal", IN("[300.1.1.1]"), &R_HELO_SYNTAX},
    {"general literal", IN("[foo:bar]"), &R_HELO_SYNTAX},
    {"bare IPv6", IN("2001:db8::1"), &R_HELO_SYNTAX},
    {"leading hyphen", IN("-bad.example"), &R_HELO_SYNTAX},
    {"empty label", IN("exa..mple"), &R_HELO_SYNTAX},
    {"non-ASCII",
     IN("b\xc3\xbc"
        "cher.example"),
     &R_HELO_SYNTAX},
    {"NUL", IN("host\0name"), &R_HELO_SYNTAX},
    {"tab", IN("host\tname"), &R_HELO_SYNTAX},
    {"label of 64", IN("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.example"),
     &R_HELO_SYNTAX},
};

static void
test_smtp_parse_helo_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(helo_cases); i++) {
        const struct helo_case *c = &helo_cases[i];
        char out[SMTP_DOMAIN_MAX + 1];
        const struct reply *r =
            smtp_parse_helo((struct span){c->input, c->input_len}, out, sizeof(out));
        bool ok = check_reply(c->label, r, c->want_reply);
        if (ok && r == NULL)
            ok &= check_str(c->label, "out", out, c->want_out);
        failures += !ok;
    }
    assert_int_equal(failures, 0);
}

static void
test_smtp_parse_helo_small_buffer(void **state)
{
    (void)state;
    char out[5];
    assert_ptr_equal(smtp_parse_helo(SPAN_LIT("example"), out, sizeof(out)), &R_HELO_SYNTAX);
    assert_string_equal(out, "");
    assert_null(smtp_parse_helo(SPAN_LIT("exam"), out, sizeof(out)));
    assert_string_equal(out, "exam");
}

/* ---- smtp_parse_bdat ----------------------------------------------------- */

struct bdat_case {
    const char *label;
    const char *input;
    size_t input_len;
    const struct reply *want_reply;
    uint64_t want_size;
    bool want_last;
};

static const struct bdat_case bdat_cases[] = {
    {"size", IN("100"), NULL, 100, false},
    {"size LAST", IN("100 LAST"), NULL, 100, true},
    {"zero last", IN("0 last"), NULL, 0, true},
    {"extra spaces", IN("  100   LAST  "), NULL, 100, true},
    {"max size", IN("18446744073709551615"), NULL, UINT64_MAX, false},
    {"overflow", IN("18446744073709551616"), &R_BDAT_SYNTAX},
    {"21 digits", IN("000000000000000000001"), &R_BDAT_SYNTAX},
    {"empty", IN(""), &R_BDAT_SYNTAX},
    {"LAST alone", IN("LAST"), &R_BDAT_SYNTAX},
    {"bad keyword", IN("100 FIRST"), &R_BDAT_SYNTAX},
    {"extra token", IN("100 LAST x"), &R_BDAT_SYNTAX},
    {"negative", IN("-1"), &R_BDAT_SYNTAX},
    {"plus sign", IN("+1"), &R_BDAT_SYNTAX},
    {"exponent", IN("1e3"), &R_BDAT_SYNTAX},
    {"NUL", IN("100\0"), &R_BDAT_SYNTAX},
    {"tab", IN("100\tLAST"), &R_BDAT_SYNTAX},
};

static void
test_smtp_parse_bdat_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(bdat_cases); i++) {
        const struct bdat_case *c = &bdat_cases[i];
        uint64_t size = 42;
        bool last = true;
        const struct reply *r =
            smtp_parse_bdat((struct span){c->input, c->input_len}, &size, &last);
        bool ok = check_reply(c->label, r, c->want_reply);
        if (ok && r == NULL) {
            ok &= check_u64(c->label, "size", size, c->want_size);
            ok &= check_u64(c->label, "last", last, c->want_last);
        }
        failures += !ok;
    }
    assert_int_equal(failures, 0);
}

/* ---- smtp_parse_xbind ---------------------------------------------------- */

struct xbind_case {
    const char *label;
    const char *input;
    size_t input_len;
    const struct reply *want_reply;
    bool want_reset;
    const char *want_ip;
    const char *want_hostname;
};

static const struct xbind_case xbind_cases[] = {
    {"ip", IN("192.0.2.1"), NULL, false, "192.0.2.1", ""},
    {"ip and hostname", IN("192.0.2.1 out.example.com"), NULL, false, "192.0.2.1",
     "out.example.com"},
    {"IPv6 and hostname", IN("2001:db8::1 out.example.com"), NULL, false, "2001:db8::1",
     "out.example.com"},
    {"extra spaces", IN(" 192.0.2.1   out.example.com "), NULL, false, "192.0.2.1",
     "out.example.com"},
    {"RESET", IN("RESET"), NULL, true, "", ""},
    {"reset lower case", IN("reset"), NULL, true, "", ""},
    {"RESET with argument", IN("RESET now"), &R_XBIND_SYNTAX},
    {"empty", IN(""), &R_XBIND_SYNTAX},
    {"hostname only", IN("out.example.com"), &R_XBIND_SYNTAX},
    {"bad hostname", IN("192.0.2.1 bad_host"), &R_XBIND_SYNTAX},
    {"hostname with hyphen at start", IN("192.0.2.1 -x.example"), &R_XBIND_SYNTAX},
    {"three tokens", IN("192.0.2.1 a.example b.example"), &R_XBIND_SYNTAX},
    {"bracketed ip", IN("[192.0.2.1]"), &R_XBIND_SYNTAX},
    {"bad ip", IN("192.0.2.300"), &R_XBIND_SYNTAX},
    {"NUL", IN("192.0.2.1\0"), &R_XBIND_SYNTAX},
    {"UTF-8 hostname",
     IN("192.0.2.1 b\xc3\xbc"
        "cher.example"),
     &R_XBIND_SYNTAX},
};

static void
test_smtp_parse_xbind_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(xbind_cases); i++) {
        const struct xbind_case *c = &xbind_cases[i];
        bool reset = !c->want_reset;
        char ip[64];
        char host[SMTP_HOSTNAME_MAX + 1];
        const struct reply *r = smtp_parse_xbind((struct span){c->input, c->input_len}, &reset, ip,
                                                 sizeof(ip), host, sizeof(host));
        bool ok = check_reply(c->label, r, c->want_reply);
        if (ok && r == NULL) {
            ok &= check_u64(c->label, "reset", reset, c->want_reset);
            ok &= check_str(c->label, "ip", ip, c->want_ip);
            ok &= check_str(c->label, "hostname", host, c->want_hostname);
        }
        failures += !ok;
    }
    assert_int_equal(failures, 0);
}

static void
test_smtp_parse_xbind_small_buffer(void **state)
{
    (void)state;
    bool reset;
    char ip[8];
    char host[4];
    assert_ptr_equal(
        smtp_parse_xbind(SPAN_LIT("192.0.2.1"), &reset, ip, sizeof(ip), host, sizeof(host)),
        &R_XBIND_SYNTAX);
    assert_ptr_equal(
        smtp_parse_xbind(SPAN_LIT("1.2.3.4 a.bc"), &reset, ip, sizeof(ip), host, sizeof(host)),
        &R_XBIND_SYNTAX);
    assert_null(
        smtp_parse_xbind(SPAN_LIT("1.2.3.4 a.b"), &reset, ip, sizeof(ip), host, sizeof(host)));
    assert_string_equal(ip, "1.2.3.4");
    assert_string_equal(host, "a.b");
}

/* ---- xtext --------------------------------------------------------------- */

struct xtext_case {
    const char *label;
    const char *input;
    size_t input_len;
    bool want_ok;
    const char *want_out;
};

static const struct xtext_case xtext_cases[] = {
    {"plain", IN("abc"), true, "abc"},
    {"empty", IN(""), true, ""},
    {"plus", IN("a+2Bb"), true, "a+b"},
    {"equals", IN("+3D"), true, "="},
    {"space", IN("a+20b"), true, "a b"},
    {"lower-case hex accepted", IN("a+2bb"), true, "a+b"},
    {"8-bit byte", IN("+C3+A9"), true, "\xc3\xa9"},
    {"truncated hexchar", IN("a+2"), false},
    {"lone plus", IN("+"), false},
    {"bad hex digit", IN("+G0"), false},
    {"raw '='", IN("a=b"), false},
    {"raw space", IN("a b"), false},
    {"raw control", IN("a\x01"), false},
    {"raw 8-bit", IN("\xc3\xa9"), false},
    {"NUL byte", IN("a\0b"), false},
    {"encoded NUL", IN("a+00b"), false},
};

static void
test_smtp_xtext_decode_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(xtext_cases); i++) {
        const struct xtext_case *c = &xtext_cases[i];
        char out[64];
        bool got = smtp_xtext_decode((struct span){c->input, c->input_len}, out, sizeof(out));
        bool ok = true;
        if (got != c->want_ok) {
            print_error("%s: ok: got %d, want %d\n", c->label, got, c->want_ok);
            ok = false;
        } else if (got) {
            ok &= check_str(c->label, "out", out, c->want_out);
        }
        failures += !ok;
    }
    assert_int_equal(failures, 0);
}

static void
test_smtp_xtext_round_trip(void **state)
{
    (void)state;
    const char *samples[] = {"",          "user@example.com",  "a+b=c", "with space",
                             "tab\there", "\xc3\xa9t\xc3\xa9", "!~\"#", "+++",
                             "==="};
    for (size_t i = 0; i < ARRAY_SIZE(samples); i++) {
        char enc[256];
        char dec[256];
        assert_true(smtp_xtext_encode(samples[i], enc, sizeof(enc)));
        assert_true(smtp_xtext_decode((struct span){enc, strlen(enc)}, dec, sizeof(dec)));
        assert_string_equal(dec, samples[i]);
    }
    /* every byte 1..255 */
    char all[256];
    for (int i = 1; i < 256; i++)
        all[i - 1] = (char)i;
    all[255] = '\0';
    char enc[1024];
    char dec[256];
    assert_true(smtp_xtext_encode(all, enc, sizeof(enc)));
    assert_true(smtp_xtext_decode((struct span){enc, strlen(enc)}, dec, sizeof(dec)));
    assert_memory_equal(dec, all, 256);
}

static void
test_smtp_xtext_encode_exact(void **state)
{
    (void)state;
    char out[16];
    assert_true(smtp_xtext_encode("a+b=c d", out, sizeof(out)));
    assert_string_equal(out, "a+2Bb+3Dc+20d");
    assert_true(smtp_xtext_encode("\xe9", out, sizeof(out)));
    assert_string_equal(out, "+E9");
    /* overflow: never truncated */
    char small[4];
    assert_true(smtp_xtext_encode("abc", small, sizeof(small)));
    assert_false(smtp_xtext_encode("abcd", small, sizeof(small)));
    assert_string_equal(small, "");
    assert_false(smtp_xtext_encode("a+", small, sizeof(small)));
    assert_false(smtp_xtext_encode("", small, 0));
    /* decode overflow */
    assert_true(smtp_xtext_decode(SPAN_LIT("abc"), small, sizeof(small)));
    assert_false(smtp_xtext_decode(SPAN_LIT("abcd"), small, sizeof(small)));
    assert_string_equal(small, "");
    assert_false(smtp_xtext_decode(SPAN_LIT(""), small, 0));
}

/* ---- address helpers ----------------------------------------------------- */

struct domain_case {
    const char *label;
    const char *addr;
    const char *want;
};

static const struct domain_case addr_domain_cases[] = {
    {"plain", "user@example.com", "example.com"},
    {"quoted '@'", "\"a@b\"@x.org", "x.org"},
    {"quoted escaped quote and '@'", "\"a\\\"@b\"@c.example", "c.example"},
    {"literal", "a@[192.0.2.1]", "[192.0.2.1]"},
    {"Postmaster", "Postmaster", ""},
    {"empty", "", ""},
    {"null sender", "", ""},
    {"UTF-8",
     "j\xc3\xb6@b\xc3\xbc"
     "cher.example",
     "b\xc3\xbc"
     "cher.example"},
};

static void
test_smtp_addr_domain_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(addr_domain_cases); i++) {
        const struct domain_case *c = &addr_domain_cases[i];
        struct span d = smtp_addr_domain(c->addr);
        bool ok = check_span(c->label, "domain", d, c->want);
        if (ok && (d.p < c->addr || d.p + d.len > c->addr + strlen(c->addr))) {
            print_error("%s: span outside the address\n", c->label);
            ok = false;
        }
        failures += !ok;
    }
    assert_int_equal(failures, 0);
}

struct valid_domain_case {
    const char *label;
    const char *s;
    bool utf8;
    bool want;
};

static const struct valid_domain_case valid_domain_cases[] = {
    {"plain", "example.com", false, true},
    {"one letter", "a", false, true},
    {"A-label", "xn--bcher-kva.example", false, true},
    {"leading hyphen", "-a.example", false, false},
    {"trailing hyphen", "a-.example", false, false},
    {"empty label", "a..b", false, false},
    {"empty", "", false, false},
    {"trailing dot", "example.com.", false, false},
    {"underscore", "a_b.example", false, false},
    {"U-label without utf8",
     "b\xc3\xbc"
     "cher.example",
     false, false},
    {"U-label with utf8",
     "b\xc3\xbc"
     "cher.example",
     true, true},
    {"invalid UTF-8 with utf8", "\xff.example", true, false},
    {"space", "a b.example", false, false},
};

static void
test_smtp_valid_domain_table(void **state)
{
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(valid_domain_cases); i++) {
        const struct valid_domain_case *c = &valid_domain_cases[i];
        bool got = smtp_valid_domain(c->s, strlen(c->s), c->utf8);
        if (got != c->want) {
            print_error("%s: got %d, want %d\n", c->label, got, c->want);
            failures++;
        }
    }
    assert_int_equal(failures, 0);
}

static void
test_smtp_valid_domain_lengths(void **state)
{
    (void)state;
    char d[300];
    size_t n = fill(d, 0, 'a', 63);
    assert_true(smtp_valid_domain(d, n, false));
    n = fill(d, 0, 'a', 64);
    assert_false(smtp_valid_domain(d, n, false));
    n = fill_domain(d, 0, 255);
    assert_int_equal(n, 255);
    assert_true(smtp_valid_domain(d, n, false));
    n = fill_domain(d, 0, 256);
    assert_int_equal(n, 256);
    assert_false(smtp_valid_domain(d, n, false));
    /* a span is not a C string: the length given is what counts */
    assert_true(smtp_valid_domain("example.com\0junk", 11, false));
    assert_false(smtp_valid_domain("example.com\0junk", 16, false));
}

static void
test_smtp_is_ascii(void **state)
{
    (void)state;
    assert_true(smtp_is_ascii("", 0));
    assert_true(smtp_is_ascii("abc\0\x7f", 5));
    assert_false(smtp_is_ascii("ab\x80", 3));
    assert_false(smtp_is_ascii("\xc3\xa9", 2));
    assert_true(smtp_is_ascii("ab\x80", 2));
}

/* The replies we return are well-formed (RFC 3463 class matches the code). */
static void
test_smtp_parse_replies_valid(void **state)
{
    (void)state;
    const struct reply *all[] = {
        &R_SYNTAX,           &R_HELO_SYNTAX,     &R_MAIL_SYNTAX,    &R_RCPT_SYNTAX,
        &R_BAD_SENDER,       &R_BAD_RCPT,        &R_BAD_PARAM,      &R_NEED_SMTPUTF8,
        &R_DUP_PARAM,        &R_BAD_PARAM_SIZE,  &R_BAD_PARAM_BODY, &R_BAD_PARAM_SMTPUTF8,
        &R_BAD_PARAM_RET,    &R_BAD_PARAM_ENVID, &R_BAD_PARAM_AUTH, &R_BAD_PARAM_XBIND,
        &R_BAD_PARAM_NOTIFY, &R_BAD_PARAM_ORCPT, &R_BDAT_SYNTAX,    &R_XBIND_SYNTAX,
    };
    for (size_t i = 0; i < ARRAY_SIZE(all); i++) {
        if (!reply_check(all[i]->code, all[i]->esc))
            fail_msg("reply %d %s %s: got invalid, want valid", all[i]->code, all[i]->esc,
                     all[i]->text);
        /* parameter errors are 555 5.5.4, syntax errors 501 5.5.4 / 5.1.x */
        if (all[i]->code != 555 && all[i]->code != 501 && all[i]->code != 553)
            fail_msg("reply %s: got code %d, want 501, 553 or 555", all[i]->text, all[i]->code);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_smtp_parse_command_table),
        cmocka_unit_test(test_smtp_parse_command_null_span),
        cmocka_unit_test(test_smtp_parse_mail_table),
        cmocka_unit_test(test_smtp_parse_rcpt_table),
        cmocka_unit_test(test_smtp_parse_limits),
        cmocka_unit_test(test_smtp_parse_mail_small_buffer),
        cmocka_unit_test(test_smtp_parse_envid_orcpt_limits),
        cmocka_unit_test(test_smtp_parse_helo_table),
        cmocka_unit_test(test_smtp_parse_helo_small_buffer),
        cmocka_unit_test(test_smtp_parse_bdat_table),
        cmocka_unit_test(test_smtp_parse_xbind_table),
        cmocka_unit_test(test_smtp_parse_xbind_small_buffer),
        cmocka_unit_test(test_smtp_xtext_decode_table),
        cmocka_unit_test(test_smtp_xtext_round_trip),
        cmocka_unit_test(test_smtp_xtext_encode_exact),
        cmocka_unit_test(test_smtp_addr_domain_table),
        cmocka_unit_test(test_smtp_valid_domain_table),
        cmocka_unit_test(test_smtp_valid_domain_lengths),
        cmocka_unit_test(test_smtp_is_ascii),
        cmocka_unit_test(test_smtp_parse_replies_valid),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
