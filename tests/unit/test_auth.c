/*
 * Unit tests for auth: the users file (errors with line numbers), strict
 * base64, SASL PLAIN/LOGIN exchanges (table-driven), the per-address
 * failure limiter with explicit clocks, password checks through a real
 * libuv loop and threadpool (yescrypt and SHA-512-crypt hashes made here),
 * cancellation and queue bounds, and `petrel passwd`. Table rows report
 * every mismatch as "got X, want Y" before failing.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <crypt.h>
#include <uv.h>

#include "auth.h"

/* Valid hashes of "pw" (made with libcrypt once; the digests are only
 * checked for shape by the loader). */
#define H_Y "$y$j9T$TD1FIT.aqf6KXQoxu.Gyx.$IbhKIPRkjfdsNWy0Fc/MLixoR243ZMq7Y4YPqZlecS/"
#define H_6                                                                                        \
    "$6$EwXcnjIAOuOiw3tj$yxv2lqvwiwpVR8uTT784MhiQ943HEMMq41o7Tnzv7CZ2A6lqStJLgLFthywJUKSwsgtPD"  \
    "eKYnLnmuRBXYwpVk/"
#define H_5 "$5$MD63U8R6L38GqmBU$tPaHpBEIXXHdlrCR1lV6oyskIQ/Y4NZG.qNh6M/4fG6"
#define H_2B "$2b$05$aR3RMjH7iVgTbZbsRl0dkulyhrFJabv2SwvM8RaZAfrd0Q6j8iCEi"

static const char *
reply_str(const struct reply *r, char *buf, size_t size)
{
    if (r == NULL)
        return "NULL";
    snprintf(buf, size, "%d %s %s", r->code, r->esc, r->text);
    return buf;
}

/* Writes content (len bytes) to a fresh temporary file; returns its path
 * (owned). */
static char *
write_tmp(const char *content, size_t len)
{
    char *path = xstrdup("/tmp/petrel_test_auth_XXXXXX");
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, content, len), (ssize_t)len);
    close(fd);
    return path;
}

/* ---- users file --------------------------------------------------------- */

#define TXT(s) .content = (s), .content_len = sizeof(s) - 1

static void
test_auth_db_load_reports_errors_with_line_numbers(void **state)
{
    static const struct {
        const char *label;
        const char *content;
        size_t content_len;
        const char *want_err; /* after "<path>:"; NULL: loads */
        size_t want_count;
    } cases[] = {
        {"empty file", TXT(""), NULL, 0},
        {"comments, blanks, CRLF, trailing blanks",
         TXT("# users\n\n   \nalice:" H_Y "\r\n  # indented comment\nbob:" H_6 "  \t\n"), NULL, 2},
        {"every supported method",
         TXT("a:" H_Y "\nb:" H_6 "\nc:" H_5 "\nd:" H_2B "\n"), NULL, 4},
        {"no final newline", TXT("alice:" H_Y), NULL, 1},
        {"UTF-8 user name", TXT("j\xc3\xbcrgen@example.org:" H_Y "\n"), NULL, 1},
        {"no colon", TXT("# x\nalice:" H_Y "\nbob\n"), "3: expected user:hash", 0},
        {"empty user", TXT(":" H_Y "\n"), "1: empty user name", 0},
        {"space in user", TXT("al ice:" H_Y "\n"),
         "1: invalid user name (1-255 bytes, no space, ':' or control characters)", 0},
        {"leading space", TXT("  alice:" H_Y "\n"), "1: leading white space", 0},
        {"extra field", TXT("alice:" H_Y ":1000:1000\n"),
         "1: extra ':' after the hash (expected user:hash)", 0},
        {"empty hash", TXT("alice:\n"), "1: empty hash", 0},
        {"MD5-crypt", TXT("\n\nalice:$1$CzSLdAp2$TiwrW0EwrjRNpJJRaflBx.\n"),
         "3: unsupported hash method (legacy); use petrel passwd", 0},
        {"DES crypt", TXT("alice:abJnggxhB/yWI\n"),
         "1: unsupported hash (DES crypt or not a crypt(3) hash); use petrel passwd", 0},
        {"plain text password", TXT("alice:secret\n"),
         "1: unsupported hash (DES crypt or not a crypt(3) hash); use petrel passwd", 0},
        {"unknown method", TXT("alice:$9$abc$def\n"),
         "1: unsupported hash method; use yescrypt ($y$) or SHA-512-crypt ($6$)", 0},
        {"truncated SHA-512", TXT("alice:$6$EwXcnjIAOuOiw3tj$yxv2lq\n"),
         "1: malformed hash (wrong digest length)", 0},
        {"yescrypt without digest", TXT("alice:$y$j9T$TD1FIT.aqf6KXQoxu.Gyx.\n"),
         "1: malformed hash (wrong digest length)", 0},
        {"bad character in hash", TXT("alice:$6$salt$ab cd\n"), "1: invalid character in hash", 0},
        {"duplicate user", TXT("alice:" H_Y "\nbob:" H_6 "\n\nalice:" H_6 "\n"),
         "4: duplicate user \"alice\" (first on line 1)", 0},
        {"first duplicate in file order", TXT("b:" H_Y "\na:" H_Y "\nb:" H_Y "\na:" H_Y "\n"),
         "3: duplicate user \"b\" (first on line 1)", 0},
        {"NUL byte", TXT("alice:" H_Y "\nbo\0b:" H_6 "\n"), "2: NUL byte in line", 0},
    };
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        char *path = write_tmp(cases[i].content, cases[i].content_len);
        char *err = NULL;
        struct auth_db *db = auth_db_load(path, &err);
        char *want = cases[i].want_err ? xasprintf("%s:%s", path, cases[i].want_err) : NULL;
        if (want == NULL && db == NULL) {
            print_error("%s: got error \"%s\", want success\n", cases[i].label, err);
            failures++;
        } else if (want != NULL && (db != NULL || err == NULL || strcmp(err, want) != 0)) {
            print_error("%s: got \"%s\", want \"%s\"\n", cases[i].label,
                        err ? err : "success", want);
            failures++;
        } else if (db != NULL && auth_db_count(db) != cases[i].want_count) {
            print_error("%s: count: got %zu, want %zu\n", cases[i].label, auth_db_count(db),
                        cases[i].want_count);
            failures++;
        }
        auth_db_free(db);
        free(err);
        free(want);
        unlink(path);
        free(path);
    }
    assert_int_equal(failures, 0);
}

static void
test_auth_db_load_refuses_long_line_and_missing_file(void **state)
{
    (void)state;
    size_t n = 5000;
    char *content = xmalloc(n);
    memset(content, 'a', n);
    char *path = write_tmp(content, n);
    free(content);
    char *err = NULL;
    assert_null(auth_db_load(path, &err));
    char *want = xasprintf("%s:1: line too long (over 4096 bytes)", path);
    assert_string_equal(err, want);
    free(want);
    free(err);
    unlink(path);

    assert_null(auth_db_load(path, &err));
    want = xasprintf("%s: No such file or directory", path);
    assert_string_equal(err, want);
    free(want);
    free(err);
    free(path);
}

static void
test_auth_db_lookup_is_exact(void **state)
{
    (void)state;
    static const char content[] = "carol:" H_6 "\nalice:" H_Y "\nbob:" H_5 "\n";
    char *path = write_tmp(content, sizeof(content) - 1);
    char *err = NULL;
    struct auth_db *db = auth_db_load(path, &err);
    assert_non_null(db);
    assert_string_equal(auth_db_lookup(db, "alice"), H_Y);
    assert_string_equal(auth_db_lookup(db, "bob"), H_5);
    assert_string_equal(auth_db_lookup(db, "carol"), H_6);
    assert_null(auth_db_lookup(db, "Alice"));
    assert_null(auth_db_lookup(db, "alic"));
    assert_null(auth_db_lookup(db, ""));
    assert_null(auth_db_lookup(NULL, "alice"));
    auth_db_free(db);
    auth_db_free(NULL);
    unlink(path);
    free(path);
}

/* ---- base64 ----------------------------------------------------------------- */

static void
test_auth_base64_decode_is_strict(void **state)
{
    static const struct {
        const char *in;
        size_t size;
        const struct reply *want_reply;
        const char *want;
        size_t want_len;
    } cases[] = {
        {"", 8, NULL, "", 0},
        {"Zg==", 8, NULL, "f", 1},
        {"Zm8=", 8, NULL, "fo", 2},
        {"Zm9v", 8, NULL, "foo", 3},
        {"Zm9vYmFy", 8, NULL, "foobar", 6},
        {"AHVzZXIAcGFzcw==", 16, NULL, "\0user\0pass", 10},
        {"+/+/", 8, NULL, "\xfb\xff\xbf", 3},
        {"Zg=", 8, &R_AUTH_BAD_BASE64, "", 0},
        {"Zg", 8, &R_AUTH_BAD_BASE64, "", 0},
        {"Z===", 8, &R_AUTH_BAD_BASE64, "", 0},
        {"====", 8, &R_AUTH_BAD_BASE64, "", 0},
        {"Zg==Zg==", 8, &R_AUTH_BAD_BASE64, "", 0},
        {"Zh==", 8, &R_AUTH_BAD_BASE64, "", 0}, /* non-zero pad bits */
        {"Zm9=", 8, &R_AUTH_BAD_BASE64, "", 0},
        {"Zm9v\r\n", 8, &R_AUTH_BAD_BASE64, "", 0},
        {"Zm 9", 8, &R_AUTH_BAD_BASE64, "", 0},
        {"Zm-_", 8, &R_AUTH_BAD_BASE64, "", 0}, /* base64url is not base64 */
        {"Zm9vYmFy", 5, &R_AUTH_TOO_LONG, "", 0},
        {"Zm9vYg==", 3, &R_AUTH_TOO_LONG, "", 0},
        {"Zm9vYg==", 4, NULL, "foob", 4},
        {"Zm9vYmFyYmF6cXV4", 3, &R_AUTH_TOO_LONG, "", 0},
    };
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        char out[16];
        size_t len = 99;
        struct span in = { cases[i].in, strlen(cases[i].in) };
        const struct reply *r = auth_base64_decode(in, out, cases[i].size, &len);
        char g[120];
        char w[120];
        if (r != cases[i].want_reply) {
            print_error("\"%s\": got %s, want %s\n", cases[i].in, reply_str(r, g, sizeof(g)),
                        reply_str(cases[i].want_reply, w, sizeof(w)));
            failures++;
        } else if (len != cases[i].want_len || memcmp(out, cases[i].want, len) != 0) {
            print_error("\"%s\": got %zu bytes \"%s\", want \"%s\"\n", cases[i].in, len,
                        str_vis(g, sizeof(g), out, len),
                        str_vis(w, sizeof(w), cases[i].want, cases[i].want_len));
            failures++;
        }
    }
    assert_int_equal(failures, 0);
}

/* ---- SASL -------------------------------------------------------------------- */

#define MAX_STEPS 3

static void
test_auth_sasl_exchanges(void **state)
{
    static const struct {
        const char *label;
        const char *args;                     /* AUTH's arguments */
        const char *answers[MAX_STEPS];       /* lines after each 334 */
        const struct reply *want_challenges[MAX_STEPS]; /* the 334s, in order */
        enum auth_sasl_status want_status;
        const struct reply *want_reply;       /* on FAILED */
        const char *want_user;
        const char *want_password;            /* on DONE */
        enum auth_mech want_mech;
    } cases[] = {
        {"PLAIN initial response", "PLAIN AHVzZXIAcGFzcw==", {NULL}, {NULL}, AUTH_SASL_DONE, NULL,
         "user", "pass", AUTH_MECH_PLAIN},
        {"PLAIN authzid equal to authcid", "PLAIN dXNlcgB1c2VyAHBhc3M=", {NULL}, {NULL},
         AUTH_SASL_DONE, NULL, "user", "pass", AUTH_MECH_PLAIN},
        {"PLAIN lower-case mechanism, extra spaces", "plain   AHVzZXIAcGFzcw==  ", {NULL}, {NULL},
         AUTH_SASL_DONE, NULL, "user", "pass", AUTH_MECH_PLAIN},
        {"PLAIN UTF-8", "PLAIN AGrDvHJnZW4AcMOkc3M=", {NULL}, {NULL}, AUTH_SASL_DONE, NULL,
         "j\xc3\xbcrgen", "p\xc3\xa4ss", AUTH_MECH_PLAIN},
        {"PLAIN after an empty challenge", "PLAIN", {"AHVzZXIAcGFzcw=="}, {&R_AUTH_CHALLENGE},
         AUTH_SASL_DONE, NULL, "user", "pass", AUTH_MECH_PLAIN},
        {"PLAIN authzid differs", "PLAIN YWRtaW4AdXNlcgBwYXNz", {NULL}, {NULL}, AUTH_SASL_FAILED,
         &R_AUTH_FAILED, "user", "", AUTH_MECH_PLAIN},
        {"PLAIN without NULs", "PLAIN dXNlcnBhc3M=", {NULL}, {NULL}, AUTH_SASL_FAILED,
         &R_AUTH_FAILED, "", "", AUTH_MECH_PLAIN},
        {"PLAIN with one NUL", "PLAIN dXNlcgBwYXNz", {NULL}, {NULL}, AUTH_SASL_FAILED,
         &R_AUTH_FAILED, "", "", AUTH_MECH_PLAIN},
        {"PLAIN with three NULs", "PLAIN AHVzZXIAcGEAc3M=", {NULL}, {NULL}, AUTH_SASL_FAILED,
         &R_AUTH_FAILED, "", "", AUTH_MECH_PLAIN},
        {"PLAIN empty password", "PLAIN AHVzZXIA", {NULL}, {NULL}, AUTH_SASL_FAILED,
         &R_AUTH_FAILED, "user", "", AUTH_MECH_PLAIN},
        {"PLAIN empty user", "PLAIN AABwYXNz", {NULL}, {NULL}, AUTH_SASL_FAILED, &R_AUTH_FAILED,
         "", "", AUTH_MECH_PLAIN},
        {"PLAIN space in user", "PLAIN AHVzIGVyAHBhc3M=", {NULL}, {NULL}, AUTH_SASL_FAILED,
         &R_AUTH_FAILED, "", "", AUTH_MECH_PLAIN},
        {"PLAIN '=' is an empty initial response", "PLAIN =", {NULL}, {NULL}, AUTH_SASL_FAILED,
         &R_AUTH_FAILED, "", "", AUTH_MECH_PLAIN},
        {"PLAIN bad base64 (no padding)", "PLAIN AHVzZXIAcGFzcw", {NULL}, {NULL},
         AUTH_SASL_FAILED, &R_AUTH_BAD_BASE64, "", "", AUTH_MECH_PLAIN},
        {"PLAIN bad base64 character", "PLAIN AHVz!XIAcGFzcw==", {NULL}, {NULL},
         AUTH_SASL_FAILED, &R_AUTH_BAD_BASE64, "", "", AUTH_MECH_PLAIN},
        {"PLAIN bad base64 after the challenge", "PLAIN", {"AHVzZXIAcGFzcx=="},
         {&R_AUTH_CHALLENGE}, AUTH_SASL_FAILED, &R_AUTH_BAD_BASE64, "", "", AUTH_MECH_PLAIN},
        {"PLAIN cancelled", "PLAIN", {"*"}, {&R_AUTH_CHALLENGE}, AUTH_SASL_FAILED,
         &R_AUTH_CANCELLED, "", "", AUTH_MECH_PLAIN},
        {"PLAIN '=' answer is not base64", "PLAIN", {"="}, {&R_AUTH_CHALLENGE},
         AUTH_SASL_FAILED, &R_AUTH_BAD_BASE64, "", "", AUTH_MECH_PLAIN},
        {"LOGIN two steps", "LOGIN", {"dXNlcg==", "cGFzcw=="},
         {&R_AUTH_USERNAME, &R_AUTH_PASSWORD}, AUTH_SASL_DONE, NULL, "user", "pass",
         AUTH_MECH_LOGIN},
        {"LOGIN user as initial response", "login dXNlcg==", {"cGFzcw=="}, {&R_AUTH_PASSWORD},
         AUTH_SASL_DONE, NULL, "user", "pass", AUTH_MECH_LOGIN},
        {"LOGIN cancelled at the password", "LOGIN", {"dXNlcg==", "*"},
         {&R_AUTH_USERNAME, &R_AUTH_PASSWORD}, AUTH_SASL_FAILED, &R_AUTH_CANCELLED, "user", "",
         AUTH_MECH_LOGIN},
        {"LOGIN empty password", "LOGIN", {"dXNlcg==", ""}, {&R_AUTH_USERNAME, &R_AUTH_PASSWORD},
         AUTH_SASL_FAILED, &R_AUTH_FAILED, "user", "", AUTH_MECH_LOGIN},
        {"LOGIN empty user", "LOGIN", {""}, {&R_AUTH_USERNAME}, AUTH_SASL_FAILED, &R_AUTH_FAILED,
         "", "", AUTH_MECH_LOGIN},
        {"LOGIN NUL in user", "LOGIN", {"dXMAZXI="}, {&R_AUTH_USERNAME}, AUTH_SASL_FAILED,
         &R_AUTH_FAILED, "", "", AUTH_MECH_LOGIN},
        {"LOGIN space in user", "LOGIN dXMgZXI=", {NULL}, {NULL}, AUTH_SASL_FAILED,
         &R_AUTH_FAILED, "", "", AUTH_MECH_LOGIN},
        {"LOGIN bad base64 user", "LOGIN", {"dXNlcg"}, {&R_AUTH_USERNAME}, AUTH_SASL_FAILED,
         &R_AUTH_BAD_BASE64, "", "", AUTH_MECH_LOGIN},
        {"LOGIN bad base64 password", "LOGIN", {"dXNlcg==", "cGFzc#=="},
         {&R_AUTH_USERNAME, &R_AUTH_PASSWORD}, AUTH_SASL_FAILED, &R_AUTH_BAD_BASE64, "user", "",
         AUTH_MECH_LOGIN},
        {"unknown mechanism", "CRAM-MD5", {NULL}, {NULL}, AUTH_SASL_FAILED, &R_AUTH_UNKNOWN_MECH,
         "", "", AUTH_MECH_NONE},
        {"prefix of a mechanism", "PLAI", {NULL}, {NULL}, AUTH_SASL_FAILED, &R_AUTH_UNKNOWN_MECH,
         "", "", AUTH_MECH_NONE},
        {"no mechanism", "", {NULL}, {NULL}, AUTH_SASL_FAILED, &R_AUTH_SYNTAX, "", "",
         AUTH_MECH_NONE},
        {"only spaces", "   ", {NULL}, {NULL}, AUTH_SASL_FAILED, &R_AUTH_SYNTAX, "", "",
         AUTH_MECH_NONE},
        {"two initial responses", "PLAIN AHVzZXIAcGFzcw== AHVz", {NULL}, {NULL},
         AUTH_SASL_FAILED, &R_AUTH_SYNTAX, "", "", AUTH_MECH_NONE},
        {"control character", "PLAIN AHVz\tZXIAcGFzcw==", {NULL}, {NULL}, AUTH_SASL_FAILED,
         &R_AUTH_SYNTAX, "", "", AUTH_MECH_NONE},
    };
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct auth_sasl s;
        memset(&s, 0xa5, sizeof(s)); /* start must not depend on prior contents */
        const struct reply *r = NULL;
        struct span args = { cases[i].args, strlen(cases[i].args) };
        enum auth_sasl_status st = auth_sasl_start(&s, args, &r);
        char g[160];
        char w[160];
        bool bad = false;
        for (int k = 0; st == AUTH_SASL_CONTINUE; k++) {
            if (k >= MAX_STEPS || cases[i].answers[k] == NULL) {
                print_error("%s: step %d: got another 334 %s, want none\n", cases[i].label, k,
                            reply_str(r, g, sizeof(g)));
                bad = true;
                break;
            }
            if (r != cases[i].want_challenges[k]) {
                print_error("%s: step %d: got %s, want %s\n", cases[i].label, k,
                            reply_str(r, g, sizeof(g)),
                            reply_str(cases[i].want_challenges[k], w, sizeof(w)));
                bad = true;
            }
            if (!auth_sasl_pending(&s)) {
                print_error("%s: step %d: got not pending, want pending\n", cases[i].label, k);
                bad = true;
            }
            struct span line = { cases[i].answers[k], strlen(cases[i].answers[k]) };
            st = auth_sasl_step(&s, line, &r);
        }
        if (!bad && st != cases[i].want_status) {
            print_error("%s: status: got %d, want %d\n", cases[i].label, st,
                        cases[i].want_status);
            bad = true;
        }
        const struct reply *want_r = st == AUTH_SASL_DONE ? NULL : cases[i].want_reply;
        if (!bad && r != want_r) {
            print_error("%s: reply: got %s, want %s\n", cases[i].label, reply_str(r, g, sizeof(g)),
                        reply_str(want_r, w, sizeof(w)));
            bad = true;
        }
        if (!bad && strcmp(s.user, cases[i].want_user) != 0) {
            print_error("%s: user: got \"%s\", want \"%s\"\n", cases[i].label,
                        str_vis(g, sizeof(g), s.user, strlen(s.user)), cases[i].want_user);
            bad = true;
        }
        if (!bad && strcmp(s.password, cases[i].want_password) != 0) {
            print_error("%s: password: got \"%s\", want \"%s\"\n", cases[i].label, s.password,
                        cases[i].want_password);
            bad = true;
        }
        if (!bad && s.mech != cases[i].want_mech) {
            print_error("%s: mech: got %s, want %s\n", cases[i].label, auth_mech_name(s.mech),
                        auth_mech_name(cases[i].want_mech));
            bad = true;
        }
        if (!bad && auth_sasl_pending(&s)) {
            print_error("%s: got pending after the end, want not\n", cases[i].label);
            bad = true;
        }
        if (!bad && st == AUTH_SASL_FAILED && s.reason == NULL) {
            print_error("%s: reason: got NULL, want a reason\n", cases[i].label);
            bad = true;
        }
        /* a failure wipes the password buffer, a reset everything */
        if (!bad && st == AUTH_SASL_FAILED) {
            static const char zero[AUTH_PASSWORD_MAX + 1];
            if (memcmp(s.password, zero, sizeof(zero)) != 0) {
                print_error("%s: password buffer not wiped after failure\n", cases[i].label);
                bad = true;
            }
        }
        auth_sasl_reset(&s);
        static const struct auth_sasl zero_sasl;
        if (!bad && memcmp(&s, &zero_sasl, sizeof(s)) != 0) {
            print_error("%s: state not wiped by reset\n", cases[i].label);
            bad = true;
        }
        failures += bad;
    }
    assert_int_equal(failures, 0);
}

/* Base64 of raw (a test-side encoder, independent of the one under test). */
static char *
b64_of(const char *raw, size_t len)
{
    static const char al[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    char *out = xmalloc(len / 3 * 4 + 8);
    size_t o = 0;
    for (size_t i = 0; i < len; i += 3) {
        uint32_t w = (uint32_t)(unsigned char)raw[i] << 16;
        if (i + 1 < len)
            w |= (uint32_t)(unsigned char)raw[i + 1] << 8;
        if (i + 2 < len)
            w |= (unsigned char)raw[i + 2];
        out[o++] = al[w >> 18 & 63];
        out[o++] = al[w >> 12 & 63];
        out[o++] = i + 1 < len ? al[w >> 6 & 63] : '=';
        out[o++] = i + 2 < len ? al[w & 63] : '=';
    }
    out[o] = '\0';
    return out;
}

static void
test_auth_sasl_enforces_length_limits(void **state)
{
    static const struct {
        const char *label;
        enum auth_mech mech;
        size_t authzid_len, user_len, pass_len;
        const struct reply *want; /* NULL: DONE */
    } cases[] = {
        {"PLAIN longest user and password", AUTH_MECH_PLAIN, 0, AUTH_USER_MAX, AUTH_PASSWORD_MAX,
         NULL},
        {"PLAIN longest authzid too", AUTH_MECH_PLAIN, AUTH_USER_MAX, AUTH_USER_MAX,
         AUTH_PASSWORD_MAX, NULL},
        {"PLAIN user too long", AUTH_MECH_PLAIN, 0, AUTH_USER_MAX + 1, 8, &R_AUTH_TOO_LONG},
        {"PLAIN password too long", AUTH_MECH_PLAIN, 0, 8, AUTH_PASSWORD_MAX + 1,
         &R_AUTH_TOO_LONG},
        {"PLAIN message too long", AUTH_MECH_PLAIN, 0, 8, 4 * AUTH_PASSWORD_MAX,
         &R_AUTH_TOO_LONG},
        {"LOGIN longest", AUTH_MECH_LOGIN, 0, AUTH_USER_MAX, AUTH_PASSWORD_MAX, NULL},
        {"LOGIN user too long", AUTH_MECH_LOGIN, 0, AUTH_USER_MAX + 1, 8, &R_AUTH_TOO_LONG},
        {"LOGIN password too long", AUTH_MECH_LOGIN, 0, 8, AUTH_PASSWORD_MAX + 1,
         &R_AUTH_TOO_LONG},
    };
    (void)state;
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        size_t zl = cases[i].authzid_len, ul = cases[i].user_len, pl = cases[i].pass_len;
        char *user = xmalloc(ul + 1);
        memset(user, 'u', ul);
        user[ul] = '\0';
        char *pass = xmalloc(pl + 1);
        memset(pass, 'p', pl);
        pass[pl] = '\0';
        struct auth_sasl s = {0};
        const struct reply *r = NULL;
        enum auth_sasl_status st;
        if (cases[i].mech == AUTH_MECH_PLAIN) {
            char *raw = xmalloc(zl + ul + pl + 2);
            memset(raw, 'u', zl);
            raw[zl] = '\0';
            memcpy(raw + zl + 1, user, ul);
            raw[zl + 1 + ul] = '\0';
            memcpy(raw + zl + ul + 2, pass, pl);
            char *enc = b64_of(raw, zl + ul + pl + 2);
            char *args = xasprintf("PLAIN %s", enc);
            st = auth_sasl_start(&s, (struct span){ args, strlen(args) }, &r);
            free(args);
            free(enc);
            free(raw);
        } else {
            st = auth_sasl_start(&s, SPAN_LIT("LOGIN"), &r);
            char *eu = b64_of(user, ul);
            if (st == AUTH_SASL_CONTINUE)
                st = auth_sasl_step(&s, (struct span){ eu, strlen(eu) }, &r);
            char *ep = b64_of(pass, pl);
            if (st == AUTH_SASL_CONTINUE)
                st = auth_sasl_step(&s, (struct span){ ep, strlen(ep) }, &r);
            free(eu);
            free(ep);
        }
        enum auth_sasl_status want_st = cases[i].want ? AUTH_SASL_FAILED : AUTH_SASL_DONE;
        char g[160];
        char w[160];
        if (st != want_st || r != cases[i].want) {
            print_error("%s: got %d %s, want %d %s\n", cases[i].label, st,
                        reply_str(r, g, sizeof(g)), want_st,
                        reply_str(cases[i].want, w, sizeof(w)));
            failures++;
        } else if (st == AUTH_SASL_DONE &&
                   (strcmp(s.user, user) != 0 || strcmp(s.password, pass) != 0)) {
            print_error("%s: got user/password of %zu/%zu bytes, want %zu/%zu\n", cases[i].label,
                        strlen(s.user), strlen(s.password), ul, pl);
            failures++;
        }
        auth_sasl_reset(&s);
        free(user);
        free(pass);
    }
    assert_int_equal(failures, 0);
}

/* ---- limiter ------------------------------------------------------------------ */

enum lim_op { FAIL, CHECK };

struct lim_step {
    enum lim_op op;
    const char *ip;
    int64_t now;
    bool want; /* FAIL: "just blocked"; CHECK: blocked */
};

static int
run_limiter(const char *label, struct auth_limiter *l, const struct lim_step *steps, size_t n)
{
    int failures = 0;
    for (size_t i = 0; i < n; i++) {
        bool got = steps[i].op == FAIL ? auth_limiter_fail(l, steps[i].ip, steps[i].now)
                                       : auth_limiter_blocked(l, steps[i].ip, steps[i].now);
        if (got != steps[i].want) {
            print_error("%s: step %zu (%s %s at %lld): got %s, want %s\n", label, i,
                        steps[i].op == FAIL ? "fail" : "check", steps[i].ip,
                        (long long)steps[i].now, got ? "true" : "false",
                        steps[i].want ? "true" : "false");
            failures++;
        }
    }
    return failures;
}

static void
test_auth_limiter_blocks_after_failures_within_window(void **state)
{
    (void)state;
    static const struct lim_step steps[] = {
        {CHECK, "192.0.2.1", 0, false},
        {FAIL, "192.0.2.1", 0, false},
        {FAIL, "192.0.2.1", 100, false},
        {CHECK, "192.0.2.1", 150, false},
        {FAIL, "192.0.2.1", 200, true}, /* the third: now blocked */
        {CHECK, "192.0.2.1", 201, true},
        {CHECK, "192.0.2.2", 201, false}, /* another address is not */
        {FAIL, "192.0.2.1", 300, false},  /* already blocked: not "just" */
        {CHECK, "192.0.2.1", 999, true},
        {CHECK, "192.0.2.1", 1000, false}, /* window from the first failure is over */
        {FAIL, "192.0.2.1", 1001, false},  /* a new window */
        {FAIL, "192.0.2.1", 1500, false},
        {CHECK, "192.0.2.1", 1600, false},
        {FAIL, "192.0.2.1", 1900, true},
        {CHECK, "192.0.2.1", 1901, true},
        {CHECK, "192.0.2.1", 500, false}, /* clock went back: not trusted */
    };
    struct auth_limiter *l = auth_limiter_new(3, 1000, 64);
    int failures = run_limiter("window", l, steps, ARRAY_SIZE(steps));
    auth_limiter_free(l);
    assert_int_equal(failures, 0);
}

static void
test_auth_limiter_groups_ipv6_by_64_and_mapped_v4(void **state)
{
    (void)state;
    static const struct lim_step steps[] = {
        {FAIL, "2001:db8::1", 0, false},
        {FAIL, "2001:db8::2", 1, false},
        {FAIL, "2001:db8::ffff:1", 2, true},
        {CHECK, "2001:db8::99", 3, true},
        {CHECK, "2001:db8:0:1::1", 3, false}, /* next /64 */
        {FAIL, "::ffff:198.51.100.7", 4, false},
        {FAIL, "198.51.100.7", 5, false},
        {FAIL, "::ffff:198.51.100.7", 6, true},
        {CHECK, "198.51.100.7", 7, true},
        {CHECK, "198.51.100.8", 7, false},
        {FAIL, "not-an-address", 8, false}, /* counted by its text */
        {FAIL, "not-an-address", 9, false},
        {FAIL, "not-an-address", 10, true},
    };
    struct auth_limiter *l = auth_limiter_new(3, 1000, 64);
    int failures = run_limiter("ipv6", l, steps, ARRAY_SIZE(steps));
    auth_limiter_free(l);
    assert_int_equal(failures, 0);
}

static void
test_auth_limiter_is_bounded_and_keeps_blocked_entries(void **state)
{
    (void)state;
    /* one set of 8: a blocked address survives a flood of single failures */
    struct auth_limiter *l = auth_limiter_new(3, 10000, 8);
    for (int i = 0; i < 3; i++)
        auth_limiter_fail(l, "192.0.2.66", i);
    assert_true(auth_limiter_blocked(l, "192.0.2.66", 10));
    int evicted_blocked = 0;
    for (int i = 0; i < 500; i++) {
        char ip[32];
        snprintf(ip, sizeof(ip), "10.0.%d.%d", i / 250, i % 250);
        auth_limiter_fail(l, ip, 20 + i);
        if (!auth_limiter_blocked(l, "192.0.2.66", 20 + i))
            evicted_blocked++;
    }
    if (evicted_blocked != 0)
        fail_msg("blocked address forgotten after a flood: got %d times, want 0", evicted_blocked);
    /* when every way is blocked, a new address still gets counted */
    for (int k = 0; k < 9; k++) {
        char ip[32];
        snprintf(ip, sizeof(ip), "203.0.113.%d", k);
        for (int i = 0; i < 3; i++)
            auth_limiter_fail(l, ip, 1000 + k);
        if (!auth_limiter_blocked(l, ip, 1000 + k))
            fail_msg("%s: got not blocked after 3 failures, want blocked", ip);
    }
    int still = 0;
    for (int k = 0; k < 9; k++) {
        char ip[32];
        snprintf(ip, sizeof(ip), "203.0.113.%d", k);
        still += auth_limiter_blocked(l, ip, 2000);
    }
    still += auth_limiter_blocked(l, "192.0.2.66", 2000);
    if (still > 8)
        fail_msg("remembered addresses: got %d, want at most 8", still);
    auth_limiter_free(l);

    /* max_failures 0: never blocks; NULL limiter: never blocks */
    l = auth_limiter_new(0, 1000, 8);
    for (int i = 0; i < 100; i++)
        assert_false(auth_limiter_fail(l, "192.0.2.1", i));
    assert_false(auth_limiter_blocked(l, "192.0.2.1", 100));
    auth_limiter_free(l);
    assert_false(auth_limiter_blocked(NULL, "192.0.2.1", 0));
    auth_limiter_free(NULL);
}

/* ---- verification through a real loop --------------------------------------------- */

struct vres {
    int calls;
    int status;
    bool ok;
};

static void
on_verified(struct auth_verify *v, int status, bool ok, void *arg)
{
    struct vres *r = arg;
    assert_non_null(v);
    r->calls++;
    r->status = status;
    r->ok = ok;
}

static char *
hash_with(const char *prefix, const char *password)
{
    char setting[CRYPT_GENSALT_OUTPUT_SIZE];
    assert_non_null(crypt_gensalt_rn(prefix, 0, NULL, 0, setting, sizeof(setting)));
    struct crypt_data *cd = xcalloc(1, sizeof(*cd));
    const char *h = crypt_rn(password, setting, cd, (int)sizeof(*cd));
    assert_non_null(h);
    char *out = xstrdup(h);
    free(cd);
    return out;
}

struct vfx {
    uv_loop_t loop;
    char *path;
    struct auth_db *db;
};

static int
vfx_setup(void **state)
{
    struct vfx *fx = xcalloc(1, sizeof(*fx));
    assert_int_equal(uv_loop_init(&fx->loop), 0);
    char yh[AUTH_HASH_MAX + 1];
    assert_true(auth_hash_password("correct horse", yh, sizeof(yh)));
    assert_memory_equal(yh, "$y$", 3);
    char *sh = hash_with("$6$", "battery staple");
    char *content = xasprintf("# test users\nalice:%s\nbob:%s\n", yh, sh);
    fx->path = write_tmp(content, strlen(content));
    free(content);
    free(sh);
    char *err = NULL;
    fx->db = auth_db_load(fx->path, &err);
    if (fx->db == NULL)
        fail_msg("auth_db_load: %s", err);
    *state = fx;
    return 0;
}

static int
vfx_teardown(void **state)
{
    struct vfx *fx = *state;
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    int r = uv_loop_close(&fx->loop);
    auth_db_free(fx->db);
    unlink(fx->path);
    free(fx->path);
    free(fx);
    if (r != 0)
        fail_msg("uv_loop_close: got %d, want 0 (a handle or request was left)", r);
    return 0;
}

static void
test_auth_verify_checks_passwords_on_the_threadpool(void **state)
{
    struct vfx *fx = *state;
    static const struct {
        const char *label;
        const char *user;
        const char *password;
        bool want_ok;
    } cases[] = {
        {"yescrypt, right password", "alice", "correct horse", true},
        {"yescrypt, wrong password", "alice", "correct horsE", false},
        {"SHA-512-crypt, right password", "bob", "battery staple", true},
        {"SHA-512-crypt, wrong password", "bob", "correct horse", false},
        {"user names are case-sensitive", "Alice", "correct horse", false},
        {"unknown user", "mallory", "correct horse", false},
        {"empty password", "alice", "", false},
    };
    struct auth_verifier *av = auth_verifier_new(&fx->loop, 0, 0);
    struct vres res[ARRAY_SIZE(cases)];
    memset(res, 0, sizeof(res));
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct auth_verify *v = auth_verify(av, fx->db, cases[i].user, cases[i].password,
                                            on_verified, &res[i]);
        assert_non_null(v);
        assert_int_equal(res[i].calls, 0); /* never from inside auth_verify */
    }
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        if (res[i].calls != 1 || res[i].status != 0 || res[i].ok != cases[i].want_ok) {
            print_error("%s: got calls=%d status=%d ok=%d, want calls=1 status=0 ok=%d\n",
                        cases[i].label, res[i].calls, res[i].status, res[i].ok,
                        cases[i].want_ok);
            failures++;
        }
    }
    /* no users at all: a dummy hash still runs, and fails */
    struct vres none = {0};
    struct auth_verify *v = auth_verify(av, NULL, "alice", "correct horse", on_verified, &none);
    assert_non_null(v);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    if (none.calls != 1 || none.status != 0 || none.ok) {
        print_error("NULL db: got calls=%d status=%d ok=%d, want 1 0 0\n", none.calls,
                    none.status, none.ok);
        failures++;
    }
    auth_verifier_free(av);
    assert_int_equal(failures, 0);
}

static void
test_auth_verify_cancel_and_queue_bound(void **state)
{
    struct vfx *fx = *state;
    /* one at a time, one waiting: the third is refused */
    struct auth_verifier *av = auth_verifier_new(&fx->loop, 1, 1);
    struct vres r1 = {0}, r2 = {0}, r3 = {0};
    struct auth_verify *v1 = auth_verify(av, fx->db, "alice", "correct horse", on_verified, &r1);
    struct auth_verify *v2 = auth_verify(av, fx->db, "bob", "battery staple", on_verified, &r2);
    struct auth_verify *v3 = auth_verify(av, fx->db, "bob", "x", on_verified, &r3);
    assert_non_null(v1);
    assert_non_null(v2);
    assert_null(v3);
    /* cancelling the running one and the waiting one: no callbacks */
    auth_verify_cancel(v1);
    auth_verify_cancel(v2);
    /* a new one after the cancels is served */
    struct vres r4 = {0};
    struct auth_verify *v4 = auth_verify(av, fx->db, "bob", "battery staple", on_verified, &r4);
    assert_non_null(v4);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    if (r1.calls != 0 || r2.calls != 0)
        fail_msg("cancelled: got %d and %d callbacks, want 0", r1.calls, r2.calls);
    if (r4.calls != 1 || !r4.ok)
        fail_msg("after cancels: got calls=%d ok=%d, want 1 1", r4.calls, r4.ok);
    auth_verify_cancel(NULL);

    /* freeing the verifier with a job running and one waiting: no
     * callbacks; it goes when the running job returns */
    struct vres r5 = {0}, r6 = {0};
    assert_non_null(auth_verify(av, fx->db, "alice", "correct horse", on_verified, &r5));
    assert_non_null(auth_verify(av, fx->db, "alice", "correct horse", on_verified, &r6));
    auth_verifier_free(av);
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    if (r5.calls != 0 || r6.calls != 0)
        fail_msg("after free: got %d and %d callbacks, want 0", r5.calls, r6.calls);
    auth_verifier_free(NULL);
}

struct chain {
    struct auth_verifier *av;
    const struct auth_db *db;
    int calls;
    bool ok[2];
};

/* The callback may start another check, then free the verifier. */
static void
on_chain(struct auth_verify *v, int status, bool ok, void *arg)
{
    struct chain *c = arg;
    assert_int_equal(status, 0);
    c->ok[c->calls++] = ok;
    if (c->calls == 1) {
        assert_non_null(auth_verify(c->av, c->db, "bob", "battery staple", on_chain, c));
    } else {
        auth_verifier_free(c->av);
    }
}

static void
test_auth_verify_callback_may_restart_and_free(void **state)
{
    struct vfx *fx = *state;
    struct chain c = { auth_verifier_new(&fx->loop, 0, 0), fx->db, 0, {false, false} };
    assert_non_null(auth_verify(c.av, fx->db, "alice", "correct horse", on_chain, &c));
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    if (c.calls != 2 || !c.ok[0] || !c.ok[1])
        fail_msg("chain: got calls=%d ok=%d,%d, want 2 1,1", c.calls, c.ok[0], c.ok[1]);
}

/* ---- petrel passwd ------------------------------------------------------------------ */

static int
run_passwd(int argc, const char *user, const char *input, size_t input_len, char *out,
           size_t out_size, char *err, size_t err_size)
{
    FILE *in = input_len ? fmemopen((void *)input, input_len, "r") : fopen("/dev/null", "r");
    assert_non_null(in);
    FILE *o = fmemopen(out, out_size, "w");
    FILE *e = fmemopen(err, err_size, "w");
    char *argv[] = { (char *)user, NULL };
    int rc = auth_passwd_run(argc, argv, in, o, e);
    fclose(in);
    fclose(o);
    fclose(e);
    return rc;
}

static void
test_auth_passwd_prints_a_users_file_line(void **state)
{
    struct vfx *fx = *state;
    char out[1024] = "";
    char err[1024] = "";
    static const char input[] = "s3cret pass\r\n";
    int rc = run_passwd(1, "carol@example.org", input, sizeof(input) - 1, out, sizeof(out), err,
                        sizeof(err));
    if (rc != 0)
        fail_msg("rc: got %d, want 0 (stderr: %s)", rc, err);
    if (strncmp(out, "carol@example.org:$y$", 21) != 0 && strncmp(out, "carol@example.org:$6$", 21))
        fail_msg("output: got \"%s\", want carol@example.org:$y$…", out);
    assert_string_equal(err, "");
    /* the line loads as a users file and verifies */
    char *path = write_tmp(out, strlen(out));
    char *lerr = NULL;
    struct auth_db *db = auth_db_load(path, &lerr);
    if (db == NULL)
        fail_msg("load: %s", lerr);
    struct auth_verifier *av = auth_verifier_new(&fx->loop, 0, 0);
    struct vres ok = {0}, bad = {0};
    assert_non_null(auth_verify(av, db, "carol@example.org", "s3cret pass", on_verified, &ok));
    assert_non_null(auth_verify(av, db, "carol@example.org", "s3cret pass\r", on_verified, &bad));
    uv_run(&fx->loop, UV_RUN_DEFAULT);
    if (!ok.ok || bad.ok || ok.calls != 1 || bad.calls != 1)
        fail_msg("verify: got %d/%d, want 1/0", ok.ok, bad.ok);
    auth_verifier_free(av);
    auth_db_free(db);
    unlink(path);
    free(path);
}

static void
test_auth_passwd_refuses_bad_input(void **state)
{
    (void)state;
    char long_pw[AUTH_PASSWORD_MAX + 3];
    memset(long_pw, 'x', sizeof(long_pw) - 1);
    long_pw[sizeof(long_pw) - 1] = '\n';
    static const struct {
        const char *label;
        int argc;
        const char *user;
        const char *input;
        size_t input_len;
        int want_rc;
        const char *want_err;
    } cases[] = {
        {"no user", 0, NULL, "x\n", 2, 2, "usage: petrel passwd USER\n"},
        {"colon in user", 1, "a:b", "x\n", 2, 1,
         "petrel passwd: invalid user name (1-255 bytes, no space, ':' or control characters)\n"},
        {"no input", 1, "alice", "", 0, 1, "petrel passwd: no password given\n"},
        {"empty line", 1, "alice", "\n", 1, 1, "petrel passwd: empty password\n"},
        {"NUL", 1, "alice", "a\0b\n", 4, 1, "petrel passwd: NUL byte in password\n"},
    };
    int failures = 0;
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        char out[256] = "";
        char err[256] = "";
        int rc = run_passwd(cases[i].argc, cases[i].user, cases[i].input, cases[i].input_len, out,
                            sizeof(out), err, sizeof(err));
        if (rc != cases[i].want_rc || strcmp(err, cases[i].want_err) != 0 || out[0] != '\0') {
            print_error("%s: got rc=%d err=\"%s\" out=\"%s\", want rc=%d err=\"%s\" out=\"\"\n",
                        cases[i].label, rc, err, out, cases[i].want_rc, cases[i].want_err);
            failures++;
        }
    }
    char out[256] = "";
    char err[256] = "";
    int rc = run_passwd(1, "alice", long_pw, sizeof(long_pw), out, sizeof(out), err, sizeof(err));
    if (rc != 1 || strcmp(err, "petrel passwd: password too long (at most 512 bytes)\n") != 0) {
        print_error("too long: got rc=%d err=\"%s\", want 1 and the length message\n", rc, err);
        failures++;
    }
    assert_int_equal(failures, 0);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_auth_db_load_reports_errors_with_line_numbers),
        cmocka_unit_test(test_auth_db_load_refuses_long_line_and_missing_file),
        cmocka_unit_test(test_auth_db_lookup_is_exact),
        cmocka_unit_test(test_auth_base64_decode_is_strict),
        cmocka_unit_test(test_auth_sasl_exchanges),
        cmocka_unit_test(test_auth_sasl_enforces_length_limits),
        cmocka_unit_test(test_auth_limiter_blocks_after_failures_within_window),
        cmocka_unit_test(test_auth_limiter_groups_ipv6_by_64_and_mapped_v4),
        cmocka_unit_test(test_auth_limiter_is_bounded_and_keeps_blocked_entries),
        cmocka_unit_test_setup_teardown(test_auth_verify_checks_passwords_on_the_threadpool,
                                        vfx_setup, vfx_teardown),
        cmocka_unit_test_setup_teardown(test_auth_verify_cancel_and_queue_bound, vfx_setup,
                                        vfx_teardown),
        cmocka_unit_test_setup_teardown(test_auth_verify_callback_may_restart_and_free,
                                        vfx_setup, vfx_teardown),
        cmocka_unit_test_setup_teardown(test_auth_passwd_prints_a_users_file_line, vfx_setup,
                                        vfx_teardown),
        cmocka_unit_test(test_auth_passwd_refuses_bad_input),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
