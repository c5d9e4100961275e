/*
 * libFuzzer target for auth's pure parts. The input is split at LF: the
 * first line is AUTH's arguments, each further line answers a 334
 * challenge (as smtp_server would feed them). Every line also goes through
 * auth_base64_decode on its own, into a heap block of the exact size the
 * caller claims, and the input bytes drive a small failure limiter.
 * Checked invariants:
 *   - every reply passes reply_check(); CONTINUE comes with a 334 challenge,
 *     FAILED with a 4xx/5xx, DONE with none;
 *   - pending iff the last status was CONTINUE;
 *   - DONE: a valid user name, a non-empty password without NUL within
 *     AUTH_PASSWORD_MAX; FAILED: the password buffer is wiped;
 *   - base64: a decoded line re-encodes to exactly the input (the decoder
 *     accepts only canonical base64), and never writes past its buffer;
 *   - limiter: a failure that reports "just blocked" leaves the address
 *     blocked at the same instant.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "auth.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define CHECK(cond)                                                                                \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            fprintf(stderr, "fuzz_sasl: %s:%d: check failed: %s\n", __FILE__, __LINE__, #cond);  \
            abort();                                                                               \
        }                                                                                          \
    } while (0)

static void
fuzz_check_status(const struct auth_sasl *s, enum auth_sasl_status st, const struct reply *r)
{
    static const char zero[AUTH_PASSWORD_MAX + 1];
    switch (st) {
    case AUTH_SASL_CONTINUE:
        CHECK(r == &R_AUTH_CHALLENGE || r == &R_AUTH_USERNAME || r == &R_AUTH_PASSWORD);
        CHECK(auth_sasl_pending(s));
        break;
    case AUTH_SASL_DONE:
        CHECK(r == NULL);
        CHECK(!auth_sasl_pending(s));
        CHECK(s->mech == AUTH_MECH_PLAIN || s->mech == AUTH_MECH_LOGIN);
        CHECK(memchr(s->user, '\0', sizeof(s->user)) != NULL);
        CHECK(auth_valid_user(s->user, strlen(s->user)));
        CHECK(memchr(s->password, '\0', sizeof(s->password)) != NULL);
        CHECK(s->password[0] != '\0');
        break;
    case AUTH_SASL_FAILED:
        CHECK(r != NULL && r->code >= 400);
        CHECK(reply_check(r->code, r->esc));
        CHECK(!auth_sasl_pending(s));
        CHECK(s->reason != NULL);
        CHECK(memcmp(s->password, zero, sizeof(zero)) == 0);
        break;
    default:
        CHECK(!"unknown status");
    }
    if (r != NULL)
        CHECK(reply_check(r->code, r->esc));
}

static size_t
fuzz_b64_encode(const unsigned char *in, size_t len, char *out)
{
    static const char al[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t w = (uint32_t)in[i] << 16;
        if (i + 1 < len)
            w |= (uint32_t)in[i + 1] << 8;
        if (i + 2 < len)
            w |= in[i + 2];
        out[o++] = al[w >> 18 & 63];
        out[o++] = al[w >> 12 & 63];
        out[o++] = i + 1 < len ? al[w >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? al[w & 63] : '=';
    }
    return o;
}

static void
fuzz_base64(struct span line, size_t size)
{
    char *out = malloc(size ? size : 1);
    CHECK(out != NULL);
    size_t len = 12345;
    const struct reply *r = auth_base64_decode(line, out, size, &len);
    if (r == NULL) {
        CHECK(len <= size);
        char *again = malloc(len / 3 * 4 + 8);
        CHECK(again != NULL);
        size_t n = fuzz_b64_encode((const unsigned char *)out, len, again);
        CHECK(n == line.len && memcmp(again, line.p, n) == 0);
        free(again);
    } else {
        CHECK(r == &R_AUTH_BAD_BASE64 || r == &R_AUTH_TOO_LONG);
        CHECK(len == 0);
    }
    free(out);
}

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data;
    const char *end = p + size;
    struct auth_sasl s;
    memset(&s, 0x5a, sizeof(s));
    enum auth_sasl_status st = AUTH_SASL_FAILED;
    bool started = false;
    struct auth_limiter *l = auth_limiter_new(3, 50, 16);
    int64_t now = 0;
    while (p <= end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        struct span line = { p, nl ? (size_t)(nl - p) : (size_t)(end - p) };
        const struct reply *r = NULL;
        if (!started) {
            st = auth_sasl_start(&s, line, &r);
            started = true;
            fuzz_check_status(&s, st, r);
        } else if (st == AUTH_SASL_CONTINUE) {
            st = auth_sasl_step(&s, line, &r);
            fuzz_check_status(&s, st, r);
        }
        fuzz_base64(line, line.len % 97);
        fuzz_base64(line, line.len);
        /* the limiter, keyed by the line's first bytes as an address */
        char ip[24];
        snprintf(ip, sizeof(ip), "10.0.0.%u", line.len ? (unsigned char)line.p[0] % 4 : 0);
        now += line.len % 7;
        if (auth_limiter_fail(l, ip, now))
            CHECK(auth_limiter_blocked(l, ip, now));
        if (nl == NULL)
            break;
        p = nl + 1;
    }
    auth_limiter_free(l);
    auth_sasl_reset(&s);
    return 0;
}
