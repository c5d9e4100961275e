/*
 * test_mta_sts — the pure side of MTA-STS (RFC 8461): the _mta-sts TXT
 * record (3.1), the policy body (3.2: CRLF and LF lines, missing and bad
 * fields), mx pattern matching (4.1: one-label wildcards), the HTTP
 * response around the policy (3.3), and dns.c's TXT rdata decoding
 * (character-strings concatenated). The fetch itself runs in
 * tests/integration/test_mta_sts.py.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dns.h"
#include "mta_sts.h"
#include "util.h"

/* ------------------------------------------------------------ TXT record */

static void
test_mta_sts_txt_parse(void **state)
{
    (void)state;
    static const struct {
        const char *txt;
        bool ok;
        const char *id;
    } cases[] = {
        { "v=STSv1; id=20160831085700Z;", true, "20160831085700Z" },
        { "v=STSv1; id=abc", true, "abc" },
        { "v=STSv1;id=abc", true, "abc" },
        { "v=STSv1 ;\tid=abc ; ", true, "abc" },
        { "v=STSv1; ext=1; id=X9", true, "X9" },
        { "v=STSv1; id=a; id=b", true, "a" },
        { "v=STSv1; id=12345678901234567890123456789012", true,
          "12345678901234567890123456789012" },
        { "v=STSv1; id=123456789012345678901234567890123", false, NULL }, /* 33 chars */
        { "v=STSv1; id=", false, NULL },
        { "v=STSv1; id=ab-c", false, NULL },
        { "v=STSv1", false, NULL },
        { "v=STSv1;", false, NULL },
        { "v=STSv2; id=abc", false, NULL },
        { "v=STSv1x; id=abc", false, NULL },
        { "id=abc; v=STSv1", false, NULL },
        { " v=STSv1; id=abc", false, NULL },
        { "v=spf1 -all", false, NULL },
        { "v=STSv1; junk; id=abc", false, NULL },
        { "", false, NULL },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        char id[33] = "";
        bool ok = mta_sts_txt_parse(cases[i].txt, id, sizeof(id));
        if (ok != cases[i].ok)
            fail_msg("case %zu \"%s\": got %d, want %d", i, cases[i].txt, ok, cases[i].ok);
        if (ok && strcmp(id, cases[i].id) != 0)
            fail_msg("case %zu \"%s\": got id \"%s\", want \"%s\"", i, cases[i].txt, id,
                     cases[i].id);
    }
}

/* ------------------------------------------------------------ policy */

#define T_ERR MTA_STS_MODE_NONE, 0, 0, NULL /* the rest of an error case */

static void
test_mta_sts_policy_parse(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        const char *body;
        const char *err; /* NULL: valid */
        enum mta_sts_mode mode;
        uint64_t max_age;
        size_t nmx;
        const char *mx0;
    } cases[] = {
        { "CRLF", "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
                  "mx: *.example.net\r\nmx: backupmx.example.com\r\nmax_age: 604800\r\n",
          NULL, MTA_STS_MODE_ENFORCE, 604800, 3, "mail.example.com" },
        { "LF", "version: STSv1\nmode: testing\nmx: MX.Example.ORG.\nmax_age: 86400\n", NULL,
          MTA_STS_MODE_TESTING, 86400, 1, "mx.example.org" },
        { "no final newline", "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 1", NULL,
          MTA_STS_MODE_ENFORCE, 1, 1, "a.b" },
        { "none without mx", "version: STSv1\r\nmode: none\r\nmax_age: 0\r\n", NULL,
          MTA_STS_MODE_NONE, 0, 0, NULL },
        { "spaces and unknown keys", "version:STSv1\nmode:   enforce  \nfoo: bar\n\n"
                                     "mx:\tmx.example.org\nmax_age: 10\n",
          NULL, MTA_STS_MODE_ENFORCE, 10, 1, "mx.example.org" },
        { "first field wins", "version: STSv1\nmode: testing\nmode: enforce\nmx: a.b\n"
                              "max_age: 5\nmax_age: 7\n",
          NULL, MTA_STS_MODE_TESTING, 5, 1, "a.b" },
        { "max_age capped", "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 9999999999\n",
          NULL, MTA_STS_MODE_ENFORCE, MTA_STS_MAX_AGE, 1, "a.b" },
        { "missing version", "mode: enforce\nmx: a.b\nmax_age: 5\n", "missing version", T_ERR },
        { "bad version", "version: STSv2\nmode: enforce\nmx: a.b\nmax_age: 5\n",
          "unsupported version", T_ERR },
        { "missing mode", "version: STSv1\nmx: a.b\nmax_age: 5\n", "missing mode", T_ERR },
        { "bad mode", "version: STSv1\nmode: Enforce\nmx: a.b\nmax_age: 5\n", "bad mode", T_ERR },
        { "missing max_age", "version: STSv1\nmode: enforce\nmx: a.b\n", "missing max_age", T_ERR },
        { "negative max_age", "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: -1\n",
          "bad max_age", T_ERR },
        { "long max_age", "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 12345678901\n",
          "bad max_age", T_ERR },
        { "empty max_age", "version: STSv1\nmode: enforce\nmx: a.b\nmax_age:\n", "bad max_age",
          T_ERR },
        { "hex max_age", "version: STSv1\nmode: enforce\nmx: a.b\nmax_age: 0x10\n",
          "bad max_age", T_ERR },
        { "missing mx", "version: STSv1\nmode: enforce\nmax_age: 5\n", "missing mx", T_ERR },
        { "bad mx", "version: STSv1\nmode: enforce\nmx: a..b\nmax_age: 5\n", "bad mx", T_ERR },
        { "mx wildcard inside", "version: STSv1\nmode: enforce\nmx: a.*.b\nmax_age: 5\n",
          "bad mx", T_ERR },
        { "line without colon", "version: STSv1\nmode enforce\nmx: a.b\nmax_age: 5\n",
          "malformed line", T_ERR },
        { "HTML", "<html><body>hello</body></html>\n", "malformed line", T_ERR },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct mta_sts_policy p;
        const char *err = mta_sts_policy_parse(cases[i].body, strlen(cases[i].body), &p);
        if (cases[i].err != NULL) {
            if (err == NULL || strcmp(err, cases[i].err) != 0)
                fail_msg("%s: got error \"%s\", want \"%s\"", cases[i].name, err ? err : "(none)",
                         cases[i].err);
            continue;
        }
        if (err != NULL)
            fail_msg("%s: got error \"%s\", want none", cases[i].name, err);
        if (p.mode != cases[i].mode)
            fail_msg("%s: got mode %s, want %s", cases[i].name, mta_sts_mode_name(p.mode),
                     mta_sts_mode_name(cases[i].mode));
        if (p.max_age_s != cases[i].max_age)
            fail_msg("%s: got max_age %llu, want %llu", cases[i].name,
                     (unsigned long long)p.max_age_s, (unsigned long long)cases[i].max_age);
        if (p.nmx != cases[i].nmx)
            fail_msg("%s: got %zu mx, want %zu", cases[i].name, p.nmx, cases[i].nmx);
        if (cases[i].mx0 != NULL && strcmp(p.mx[0], cases[i].mx0) != 0)
            fail_msg("%s: got mx[0] \"%s\", want \"%s\"", cases[i].name, p.mx[0], cases[i].mx0);
    }
}

static void
test_mta_sts_policy_too_many_mx(void **state)
{
    (void)state;
    char body[8192];
    size_t n = (size_t)snprintf(body, sizeof(body), "version: STSv1\nmode: enforce\nmax_age: 5\n");
    for (int i = 0; i <= MTA_STS_MAX_MX; i++)
        n += (size_t)snprintf(body + n, sizeof(body) - n, "mx: mx%d.example.org\n", i);
    struct mta_sts_policy p;
    const char *err = mta_sts_policy_parse(body, n, &p);
    if (err == NULL || strcmp(err, "too many mx") != 0)
        fail_msg("got error \"%s\", want \"too many mx\"", err ? err : "(none)");
}

/* ------------------------------------------------------------ matching */

static void
test_mta_sts_mx_match(void **state)
{
    (void)state;
    static const struct {
        const char *pattern;
        const char *host;
        bool match;
    } cases[] = {
        { "mail.example.com", "mail.example.com", true },
        { "mail.example.com", "MAIL.Example.COM", true },
        { "mail.example.com", "mail.example.com.", true },
        { "mail.example.com", "mail2.example.com", false },
        { "mail.example.com", "example.com", false },
        { "*.example.com", "mx1.example.com", true },
        { "*.example.com", "MX1.EXAMPLE.COM.", true },
        { "*.example.com", "example.com", false },        /* 4.1: not the bare domain */
        { "*.example.com", "a.b.example.com", false },    /* one label only */
        { "*.example.com", ".example.com", false },
        { "*.example.com", "mx1.example.com.evil.org", false },
        { "*.example.com", "mx1.notexample.com", false },
        { "*.example.com", "mx1-example.com", false },
        { "*.b.example.com", "a.b.example.com", true },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct mta_sts_policy p;
        memset(&p, 0, sizeof(p));
        if (!str_copy(p.mx[0], sizeof(p.mx[0]), cases[i].pattern))
            fail_msg("pattern too long");
        p.nmx = 1;
        bool got = mta_sts_policy_match(&p, cases[i].host);
        if (got != cases[i].match)
            fail_msg("%s vs %s: got %d, want %d", cases[i].pattern, cases[i].host, got,
                     cases[i].match);
    }
    struct mta_sts_policy empty;
    memset(&empty, 0, sizeof(empty));
    if (mta_sts_policy_match(&empty, "mx.example.com"))
        fail_msg("a policy without mx matched");
}

/* ------------------------------------------------------------ HTTP */

static void
test_mta_sts_http_parse(void **state)
{
    (void)state;
    static const struct {
        const char *name;
        const char *resp;
        const char *err; /* NULL: valid */
        const char *body;
    } cases[] = {
        { "length", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\n"
                    "hello world",
          NULL, "hello" },
        { "until EOF", "HTTP/1.0 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nabc",
          NULL, "abc" },
        { "bare LF", "HTTP/1.1 200 OK\ncontent-type: TEXT/PLAIN\n\nabc", NULL, "abc" },
        { "empty body", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n", NULL, "" },
        { "404", "HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\n\r\nnope",
          "HTTP status 404", NULL },
        { "redirect", "HTTP/1.1 301 Moved\r\nLocation: https://x/\r\n\r\n", "HTTP status 301",
          NULL },
        { "html", "HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n\r\nabc",
          "media type is not text/plain", NULL },
        { "plainer", "HTTP/1.1 200 OK\r\nContent-Type: text/plainer\r\n\r\nabc",
          "media type is not text/plain", NULL },
        { "no type", "HTTP/1.1 200 OK\r\n\r\nabc", "media type is not text/plain", NULL },
        { "chunked", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
          "unsupported Transfer-Encoding", NULL },
        { "truncated", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 50\r\n"
                       "\r\nabc",
          "truncated body", NULL },
        { "bad length", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: x\r\n"
                        "\r\nabc",
          "bad Content-Length", NULL },
        { "no header end", "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n",
          "incomplete HTTP response", NULL },
        { "not HTTP", "SSH-2.0-OpenSSH\r\n\r\n", "malformed HTTP status line", NULL },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        const char *body = NULL;
        size_t blen = 0;
        char why[160];
        const char *err = mta_sts_http_parse(cases[i].resp, strlen(cases[i].resp), &body, &blen,
                                             why, sizeof(why));
        if (cases[i].err != NULL) {
            if (err == NULL || strcmp(err, cases[i].err) != 0)
                fail_msg("%s: got error \"%s\", want \"%s\"", cases[i].name, err ? err : "(none)",
                         cases[i].err);
            continue;
        }
        if (err != NULL)
            fail_msg("%s: got error \"%s\", want none", cases[i].name, err);
        if (blen != strlen(cases[i].body) || memcmp(body, cases[i].body, blen) != 0)
            fail_msg("%s: got body \"%.*s\", want \"%s\"", cases[i].name, (int)blen, body,
                     cases[i].body);
    }
}

static void
test_mta_sts_http_body_limit(void **state)
{
    (void)state;
    static const char head[] = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n";
    size_t len = sizeof(head) - 1 + MTA_STS_MAX_BODY + 1;
    char *resp = xmalloc(len);
    memcpy(resp, head, sizeof(head) - 1);
    memset(resp + sizeof(head) - 1, 'a', MTA_STS_MAX_BODY + 1);
    const char *body;
    size_t blen;
    char why[160];
    const char *err = mta_sts_http_parse(resp, len, &body, &blen, why, sizeof(why));
    if (err == NULL || strstr(err, "policy over") == NULL)
        fail_msg("a body of %d bytes: got error \"%s\", want \"policy over ...\"",
                 MTA_STS_MAX_BODY + 1, err ? err : "(none)");
    err = mta_sts_http_parse(resp, len - 1, &body, &blen, why, sizeof(why));
    if (err != NULL || blen != MTA_STS_MAX_BODY)
        fail_msg("a body of %d bytes: got error \"%s\" and %zu bytes, want none", MTA_STS_MAX_BODY,
                 err ? err : "(none)", blen);
    free(resp);
}

/* ------------------------------------------------------------ TXT rdata */

static void
test_mta_sts_dns_txt_parse(void **state)
{
    (void)state;
    /* rdata: character-strings, each a length octet and that many bytes */
    static const uint8_t r_one[] = "\x1bv=STSv1; id=20190429T010101";
    static const uint8_t r_split[] = "\x08v=STSv1;\x06 id=ab";
    static const uint8_t r_nul[] = "\x03\x61\x00\x62";
    static const uint8_t r_short[] = "\x09v=STSv1";
    static const uint8_t r_empty_string[] = "\x00";
    const uint8_t *data[] = { r_one, r_split, r_nul, r_short, r_empty_string };
    size_t lens[] = { sizeof(r_one) - 1, sizeof(r_split) - 1, sizeof(r_nul) - 1,
                      sizeof(r_short) - 1, 1 };
    struct dns_answer a = { .rcode = 0, .havedata = true, .data = data, .len = lens, .ndata = 5 };
    char **txt;
    size_t ntxt;
    enum dns_answer_kind kind = dns_txt_parse(&a, &txt, &ntxt);
    if (kind != DNS_ANSWER_DATA)
        fail_msg("got kind %d, want DNS_ANSWER_DATA", (int)kind);
    static const char *const want[] = { "v=STSv1; id=20190429T010101", "v=STSv1; id=ab", "" };
    if (ntxt != ARRAY_SIZE(want))
        fail_msg("got %zu records, want %zu", ntxt, ARRAY_SIZE(want));
    for (size_t i = 0; i < ntxt; i++) {
        if (strcmp(txt[i], want[i]) != 0)
            fail_msg("record %zu: got \"%s\", want \"%s\"", i, txt[i], want[i]);
        free(txt[i]);
    }
    free(txt);

    struct dns_answer nx = { .rcode = 3, .nxdomain = true };
    kind = dns_txt_parse(&nx, &txt, &ntxt);
    if (kind != DNS_ANSWER_NXDOMAIN || ntxt != 0 || txt != NULL)
        fail_msg("NXDOMAIN: got kind %d, %zu records, want NXDOMAIN and none", (int)kind, ntxt);
    struct dns_answer nodata = { .rcode = 0 };
    kind = dns_txt_parse(&nodata, &txt, &ntxt);
    if (kind != DNS_ANSWER_NODATA || ntxt != 0)
        fail_msg("NODATA: got kind %d, %zu records, want NODATA and none", (int)kind, ntxt);
    struct dns_answer servfail = { .rcode = 2 };
    kind = dns_txt_parse(&servfail, &txt, &ntxt);
    if (kind != DNS_ANSWER_TEMPFAIL || ntxt != 0)
        fail_msg("SERVFAIL: got kind %d, %zu records, want TEMPFAIL and none", (int)kind, ntxt);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mta_sts_txt_parse),
        cmocka_unit_test(test_mta_sts_policy_parse),
        cmocka_unit_test(test_mta_sts_policy_too_many_mx),
        cmocka_unit_test(test_mta_sts_mx_match),
        cmocka_unit_test(test_mta_sts_http_parse),
        cmocka_unit_test(test_mta_sts_http_body_limit),
        cmocka_unit_test(test_mta_sts_dns_txt_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
