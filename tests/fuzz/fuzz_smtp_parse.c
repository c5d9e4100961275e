/*
 * libFuzzer target for smtp_parse. The input is one command line (without
 * CRLF): it goes through smtp_parse_command and the argument parser of its
 * verb, then straight through every parser, xtext decoding and the address
 * helpers. Output buffers are heap blocks of the exact size given, so ASan
 * catches any write past them. Checked invariants:
 *   - every reply returned passes reply_check();
 *   - outputs are NUL-terminated within their size, and cleared on error;
 *   - an accepted address parses again, to itself, as MAIL and RCPT;
 *   - smtp_addr_domain() of an accepted address stays inside it and is a
 *     valid domain or address literal;
 *   - xtext: decode(encode(x)) == x, and decoded text re-encodes and decodes
 *     to itself.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "smtp_parse.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_smtp_parse: %s:%d: check failed: %s\n", __FILE__, __LINE__,      \
                    #cond);                                                                        \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static void
fuzz_check_reply(const struct reply *r)
{
    if (r == NULL)
        return;
    CHECK(reply_check(r->code, r->esc));
    CHECK(r->code >= 500 && r->code <= 599);
    CHECK(r->text != NULL && r->text[0] != '\0');
}

static void
fuzz_check_terminated(const char *buf, size_t size)
{
    CHECK(size > 0 && memchr(buf, '\0', size) != NULL);
}

/* An accepted address must come back unchanged from MAIL and RCPT. */
static void
fuzz_check_addr(const char *addr, bool utf8, bool postmaster_ok)
{
    size_t len = strlen(addr);
    CHECK(len < SMTP_ADDR_SIZE);
    if (!utf8)
        CHECK(smtp_is_ascii(addr, len));
    struct span dom = smtp_addr_domain(addr);
    CHECK(dom.p >= addr && dom.p + dom.len <= addr + len);
    if (len == 0)
        return;
    if (dom.len == 0) {
        CHECK(postmaster_ok && ascii_casecmp(addr, "postmaster") == 0);
    } else if (dom.p[0] != '[') {
        CHECK(smtp_valid_domain(dom.p, dom.len, true));
    }

    char line[SMTP_ADDR_SIZE + 16];
    int n = snprintf(line, sizeof(line), "<%s> SMTPUTF8", addr);
    CHECK(n > 0 && (size_t)n < sizeof(line));
    char again[SMTP_ADDR_SIZE];
    struct smtp_rcpt_params rp;
    const struct reply *r =
        smtp_parse_rcpt((struct span){line, (size_t)len + 2}, true, again, sizeof(again), &rp);
    CHECK(r == NULL);
    CHECK(strcmp(again, addr) == 0);
    if (dom.len > 0) {
        struct smtp_mail_params mp;
        r = smtp_parse_mail((struct span){line, (size_t)n}, again, sizeof(again), &mp);
        CHECK(r == NULL);
        CHECK(strcmp(again, addr) == 0);
    }
}

static void
fuzz_check_mail_params(const struct smtp_mail_params *p)
{
    CHECK(memchr(p->envid, '\0', sizeof(p->envid)) != NULL);
    CHECK(memchr(p->auth, '\0', sizeof(p->auth)) != NULL);
    CHECK(memchr(p->xbind_ip, '\0', sizeof(p->xbind_ip)) != NULL);
    CHECK(memchr(p->xbind_hostname, '\0', sizeof(p->xbind_hostname)) != NULL);
    CHECK(p->has_auth == (p->auth[0] != '\0'));
    CHECK(p->has_xbind == (p->xbind_ip[0] != '\0'));
    if (p->xbind_hostname[0] != '\0')
        CHECK(smtp_valid_domain(p->xbind_hostname, strlen(p->xbind_hostname), false));
    CHECK(p->body <= SMTP_BODY_8BITMIME && p->ret <= SMTP_RET_HDRS);
}

static void
fuzz_mail(struct span args, size_t addr_size)
{
    char *addr = malloc(addr_size);
    struct smtp_mail_params p;
    CHECK(addr != NULL || addr_size == 0);
    const struct reply *r = smtp_parse_mail(args, addr, addr_size, &p);
    fuzz_check_reply(r);
    if (addr_size > 0) {
        fuzz_check_terminated(addr, addr_size);
        if (r != NULL)
            CHECK(addr[0] == '\0');
    }
    if (r == NULL) {
        CHECK(addr_size > 0);
        fuzz_check_mail_params(&p);
        fuzz_check_addr(addr, p.smtputf8, false);
    }
    free(addr);
}

static void
fuzz_rcpt(struct span args, bool smtputf8, size_t addr_size)
{
    char *addr = malloc(addr_size);
    struct smtp_rcpt_params p;
    CHECK(addr != NULL || addr_size == 0);
    const struct reply *r = smtp_parse_rcpt(args, smtputf8, addr, addr_size, &p);
    fuzz_check_reply(r);
    if (addr_size > 0) {
        fuzz_check_terminated(addr, addr_size);
        if (r != NULL)
            CHECK(addr[0] == '\0');
    }
    if (r == NULL) {
        CHECK(addr_size > 0 && addr[0] != '\0');
        CHECK(memchr(p.orcpt, '\0', sizeof(p.orcpt)) != NULL);
        CHECK(memchr(p.orcpt_type, '\0', sizeof(p.orcpt_type)) != NULL);
        CHECK((p.orcpt[0] == '\0') == (p.orcpt_type[0] == '\0'));
        CHECK(p.notify == 0 || p.notify == SMTP_NOTIFY_NEVER ||
              (p.notify &
               ~(unsigned)(SMTP_NOTIFY_SUCCESS | SMTP_NOTIFY_FAILURE | SMTP_NOTIFY_DELAY)) == 0);
        fuzz_check_addr(addr, smtputf8, true);
    }
    free(addr);
}

static void
fuzz_helo(struct span args, size_t out_size)
{
    char *out = malloc(out_size);
    CHECK(out != NULL || out_size == 0);
    const struct reply *r = smtp_parse_helo(args, out, out_size);
    fuzz_check_reply(r);
    if (out_size > 0)
        fuzz_check_terminated(out, out_size);
    if (r == NULL) {
        size_t len = strlen(out);
        CHECK(len > 0 && smtp_is_ascii(out, len));
        char again[SMTP_DOMAIN_MAX + 1];
        CHECK(smtp_parse_helo((struct span){out, len}, again, sizeof(again)) == NULL);
        CHECK(strcmp(again, out) == 0);
    }
    free(out);
}

static void
fuzz_bdat(struct span args)
{
    uint64_t n;
    bool last;
    const struct reply *r = smtp_parse_bdat(args, &n, &last);
    fuzz_check_reply(r);
    if (r != NULL)
        CHECK(n == 0 && !last);
}

static void
fuzz_xbind(struct span args, size_t ip_size, size_t host_size)
{
    char *ip = malloc(ip_size);
    char *host = malloc(host_size);
    bool reset;
    CHECK((ip != NULL || ip_size == 0) && (host != NULL || host_size == 0));
    const struct reply *r = smtp_parse_xbind(args, &reset, ip, ip_size, host, host_size);
    fuzz_check_reply(r);
    if (ip_size > 0)
        fuzz_check_terminated(ip, ip_size);
    if (host_size > 0)
        fuzz_check_terminated(host, host_size);
    if (r == NULL && !reset) {
        CHECK(ip[0] != '\0');
        if (host[0] != '\0')
            CHECK(smtp_valid_domain(host, strlen(host), false));
    }
    free(ip);
    free(host);
}

static void
fuzz_xtext(struct span in, size_t out_size)
{
    char *out = malloc(out_size);
    CHECK(out != NULL || out_size == 0);
    if (smtp_xtext_decode(in, out, out_size)) {
        fuzz_check_terminated(out, out_size);
        size_t len = strlen(out);
        char *enc = malloc(len * 3 + 1);
        char *dec = malloc(len + 1);
        CHECK(enc != NULL && dec != NULL);
        CHECK(smtp_xtext_encode(out, enc, len * 3 + 1));
        CHECK(smtp_xtext_decode((struct span){enc, strlen(enc)}, dec, len + 1));
        CHECK(strcmp(dec, out) == 0);
        free(enc);
        free(dec);
    } else if (out_size > 0) {
        CHECK(out[0] == '\0');
    }
    free(out);
}

/* The input up to its first NUL as a C string: encode, then decode back. */
static void
fuzz_xtext_encode(const uint8_t *data, size_t size, size_t out_size)
{
    char *s = malloc(size + 1);
    char *out = malloc(out_size);
    CHECK(s != NULL && (out != NULL || out_size == 0));
    memcpy(s, data, size);
    s[size] = '\0';
    if (smtp_xtext_encode(s, out, out_size)) {
        fuzz_check_terminated(out, out_size);
        size_t len = strlen(s);
        char *dec = malloc(len + 1);
        CHECK(dec != NULL);
        CHECK(smtp_xtext_decode((struct span){out, strlen(out)}, dec, len + 1));
        CHECK(strcmp(dec, s) == 0);
        free(dec);
    } else if (out_size > 0) {
        CHECK(out[0] == '\0');
    }
    free(out);
    free(s);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size copy: reading past the line is an ASan report. */
    char *buf = malloc(size > 0 ? size : 1);
    if (buf == NULL)
        return 0;
    if (size > 0)
        memcpy(buf, data, size);
    struct span line = {buf, size};
    /* A small buffer size derived from the input exercises the overflow paths. */
    size_t small = size % 48;

    struct smtp_cmd cmd;
    smtp_parse_command(line, &cmd);
    CHECK(cmd.verb_text.p == buf && cmd.verb_text.len <= size);
    CHECK(cmd.args.p >= buf && cmd.args.p + cmd.args.len <= buf + size);
    CHECK(!cmd.mail_from || cmd.verb == SMTP_MAIL);
    CHECK(!cmd.rcpt_to || cmd.verb == SMTP_RCPT);
    switch (cmd.verb) {
    case SMTP_MAIL:
        if (cmd.mail_from)
            fuzz_mail(cmd.args, SMTP_ADDR_SIZE);
        break;
    case SMTP_RCPT:
        if (cmd.rcpt_to) {
            fuzz_rcpt(cmd.args, false, SMTP_ADDR_SIZE);
            fuzz_rcpt(cmd.args, true, SMTP_ADDR_SIZE);
        }
        break;
    case SMTP_EHLO:
    case SMTP_HELO:
        fuzz_helo(cmd.args, SMTP_DOMAIN_MAX + 1);
        break;
    case SMTP_BDAT:
        fuzz_bdat(cmd.args);
        break;
    case SMTP_XBIND:
        fuzz_xbind(cmd.args, 64, SMTP_HOSTNAME_MAX + 1);
        break;
    default:
        break;
    }

    /* Every parser on the raw input, with full and with small buffers. */
    fuzz_mail(line, SMTP_ADDR_SIZE);
    fuzz_mail(line, small);
    fuzz_rcpt(line, size & 1, SMTP_ADDR_SIZE);
    fuzz_rcpt(line, !(size & 1), small);
    fuzz_helo(line, SMTP_DOMAIN_MAX + 1);
    fuzz_helo(line, small);
    fuzz_bdat(line);
    fuzz_xbind(line, 64, SMTP_HOSTNAME_MAX + 1);
    fuzz_xbind(line, small, small);
    fuzz_xtext(line, SMTP_ORCPT_MAX + 1);
    fuzz_xtext(line, small);
    fuzz_xtext_encode(data, size, size * 3 + 1);
    fuzz_xtext_encode(data, size, small);

    (void)smtp_valid_domain(buf, size, true);
    (void)smtp_valid_domain(buf, size, false);
    (void)smtp_is_ascii(buf, size);
    free(buf);
    return 0;
}
