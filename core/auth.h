/*
 * auth — SMTP AUTH (RFC 4954) building blocks for smtp_server: the users
 * file, SASL PLAIN (RFC 4616) and LOGIN decoding, password verification on
 * the libuv threadpool (libcrypt), a per-client-IP failure limiter, and
 * `petrel passwd`. The SASL and limiter parts are pure (fuzzed / unit
 * tested with explicit clocks); only the verifier touches the loop.
 *
 * How smtp_server drives it (the session holds one struct auth_sasl, a
 * borrowed struct auth_verifier, struct auth_db and struct auth_limiter,
 * all server-wide):
 *
 *   EHLO: advertise "AUTH PLAIN LOGIN" (AUTH_EHLO_MECHS) when the listener's
 *   auth is optional/required and (TLS is active or auth.allow_plaintext).
 *
 *   AUTH <args>: checks in this order, each ending the command with a reply:
 *     1. listener auth: none           → R_AUTH_NOT_ENABLED  503 5.5.1
 *     2. no TLS and !allow_plaintext   → R_AUTH_ENCRYPT_REQUIRED 538 5.7.11
 *        (both mechanisms send the password in clear; RFC 4954 4)
 *     3. already authenticated         → R_AUTH_ALREADY      503 5.5.1 (RFC 4954 4)
 *     4. inside a mail transaction     → R_AUTH_IN_TXN       503 5.5.1 (RFC 4954 4)
 *     5. auth_limiter_blocked(ip, now) → R_AUTH_TOO_MANY     421 4.7.0, close
 *     6. auth_sasl_start(&sasl, args, &reply):
 *          AUTH_SASL_FAILED   → send reply (504 5.5.4 unknown mechanism, 501 5.5.4
 *                               syntax, 501 5.5.2 bad base64, 500 5.5.6 too long,
 *                               535 5.7.8 malformed credentials)
 *          AUTH_SASL_CONTINUE → send reply (a 334 challenge) and enter a state
 *                               (ST_AUTH) where the next line is not a command but
 *                               goes to auth_sasl_step(); repeat. A line over the
 *                               line limit → R_AUTH_TOO_LONG and auth_sasl_reset().
 *                               The command timeout applies to each 334 wait.
 *          AUTH_SASL_DONE     → sasl.user / sasl.password are ready:
 *     7. verify: the Lua `auth` hook first when present (hook_auth(hs,
 *        sasl.user, sasl.password, ...)): has_answer → its allow is final;
 *        otherwise auth_verify(verifier, db, sasl.user, sasl.password, ...)
 *        (NULL → R_AUTH_TEMPFAIL 454 4.7.0). auth_verify copies user and
 *        password; the session keeps its own copy of sasl.user and
 *        sasl.mech (the identity for the log and, on success, for the
 *        envelope) and calls auth_sasl_reset() as soon as the password has
 *        been handed over (after auth_verify returns, or after the hook's
 *        callback when the hook needs it until then). Stop parsing
 *        pipelined input while a check is pending (RFC 4954 4: the client
 *        must wait anyway); on session close auth_verify_cancel().
 *     8. result: ok → R_AUTH_OK 235 2.7.0, session authenticated (user kept
 *        for the envelope's auth_user, the milter macros {auth_type}
 *        (auth_mech_name) and {auth_authen}, Lua's conn view, relay and
 *        XBIND permission); log `auth user=<u> client=[ip] mech=PLAIN`.
 *        status < 0 → R_AUTH_TEMPFAIL 454 4.7.0 + warning.
 *        not ok (and every 535 from step 6) → R_AUTH_FAILED 535 5.7.8,
 *        auth_limiter_fail(ip, now) (true: log once that the address is now
 *        blocked), info log `auth failed user=<u> client=[ip] mech=PLAIN`
 *        with user escaped (log_kv_vis) and never the password or the
 *        base64 data.
 *   A cancel ("*" as a 334 answer) gives R_AUTH_CANCELLED 501 5.7.0 and
 *   does not count as a failure. 5xx replies count towards max_errors.
 *
 *   MAIL with listener auth: required and no successful AUTH →
 *   R_AUTH_REQUIRED 530 5.7.0. MAIL's AUTH=<mailbox> parameter (RFC 4954 5)
 *   is informational; an authenticated session may relay and use XBIND.
 */
#ifndef PETREL_AUTH_H
#define PETREL_AUTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "reply.h"
#include "util.h"

struct uv_loop_s;

/* What EHLO advertises after "AUTH ". */
#define AUTH_EHLO_MECHS "PLAIN LOGIN"

/* Decoded SASL limits: RFC 4616 2 requires accepting 255 octets for the
 * authentication identity and the password; passwords get more room. */
#define AUTH_USER_MAX 255
#define AUTH_PASSWORD_MAX 512
/* The longest crypt(3) hash a users file may hold (libcrypt's limit). */
#define AUTH_HASH_MAX 383

/* Limiter defaults: 10 failures per client address within 10 minutes, then
 * AUTH is refused until the window ends; 4096 addresses remembered. */
#define AUTH_LIMIT_FAILURES_DEFAULT 10
#define AUTH_LIMIT_WINDOW_MS_DEFAULT (10 * 60 * 1000)
#define AUTH_LIMIT_ENTRIES_DEFAULT 4096

/* Verifier defaults: crypt jobs on the threadpool at once (libuv has 4
 * threads by default; the spool's fsyncs need the others), and how many may
 * wait before auth_verify refuses more. */
#define AUTH_VERIFY_PARALLEL_DEFAULT 2
#define AUTH_VERIFY_QUEUE_DEFAULT 256

/* ---- users file ------------------------------------------------------- */

struct auth_db;

/* Loads a users file: one `user:hash` per line; blank lines and lines whose
 * first non-blank character is '#' are ignored; trailing spaces, tabs and a
 * CR are stripped. user: 1..AUTH_USER_MAX bytes, no ':', space or control
 * character (UTF-8 allowed; compared byte for byte, case-sensitively). hash:
 * a crypt(3) hash of a supported method — yescrypt "$y$", gost-yescrypt
 * "$gy$", scrypt "$7$", bcrypt "$2b$"/"$2a$"/"$2y$", SHA-512-crypt "$6$",
 * SHA-256-crypt "$5$" — with a well-formed setting and digest length.
 * Returns NULL on error with *err set (owned; free()) to "path:line: reason"
 * (or "path: reason" for I/O errors); the first error in the file wins.
 * Reads a file: start-up or reload only, never on the loop. */
struct auth_db *auth_db_load(const char *path, char **err) __attribute__((warn_unused_result));
/* NULL is a no-op. Verifications already started do not use db. */
void auth_db_free(struct auth_db *db);
size_t auth_db_count(const struct auth_db *db);
/* The stored hash of user, or NULL if unknown; borrowed from db. */
const char *auth_db_lookup(const struct auth_db *db, const char *user);
/* Whether name is acceptable as a user name (see auth_db_load). */
bool auth_valid_user(const char *name, size_t len);

/* ---- SASL (pure) ------------------------------------------------------- */

enum auth_mech { AUTH_MECH_NONE = 0, AUTH_MECH_PLAIN, AUTH_MECH_LOGIN };

/* "PLAIN", "LOGIN" (for logs and the {auth_type} macro); "" for NONE. */
const char *auth_mech_name(enum auth_mech m);

enum auth_sasl_status {
    AUTH_SASL_CONTINUE, /* send *reply (a 334 challenge); feed the next line to auth_sasl_step */
    AUTH_SASL_DONE,     /* user and password are ready; *reply is NULL */
    AUTH_SASL_FAILED,   /* send *reply; the exchange is over: password wiped, user (when
                           decoded), mech and reason kept for the log */
};

/* One AUTH exchange. Embedded in the session; zero-initialised or reset. */
struct auth_sasl {
    enum auth_mech mech;                 /* set by auth_sasl_start on success */
    int step;                            /* private: what the next line answers */
    const char *reason;                  /* static text: why it failed (for logs), or NULL */
    char user[AUTH_USER_MAX + 1];        /* authcid, "" until known; kept after a failure
                                            that came after it was decoded */
    char password[AUTH_PASSWORD_MAX + 1]; /* valid on DONE only; wiped by reset */
};

/* AUTH's arguments: "<mechanism> [<initial-response>]" (RFC 4954 4; the
 * mechanism compared ASCII-case-insensitively; initial response "=" is an
 * empty one). PLAIN without an initial response answers with an empty 334
 * challenge; LOGIN asks "Username:" then "Password:" (334 VXNlcm5hbWU6 /
 * UGFzc3dvcmQ6), an initial response being the user name.
 * Failure replies: R_AUTH_SYNTAX 501 5.5.4 (no mechanism, extra arguments,
 * control characters), R_AUTH_UNKNOWN_MECH 504 5.5.4, R_AUTH_BAD_BASE64 501
 * 5.5.2, R_AUTH_TOO_LONG 500 5.5.6 (over the limits above), R_AUTH_FAILED
 * 535 5.7.8 (a malformed credential: PLAIN without its two NULs or with more,
 * an authzid other than "" or the authcid, an empty or invalid user name,
 * an empty password, a NUL in a LOGIN answer). Only a 535 counts as a failed
 * attempt for the limiter. *reply is a static reply. */
enum auth_sasl_status auth_sasl_start(struct auth_sasl *s, struct span args,
                                      const struct reply **reply);
/* An answer line to a 334 challenge (without CRLF): base64, or "*" to
 * cancel (R_AUTH_CANCELLED 501 5.7.0, RFC 4954 4). Same failure replies as
 * auth_sasl_start. PANIC if no challenge is outstanding. */
enum auth_sasl_status auth_sasl_step(struct auth_sasl *s, struct span line,
                                     const struct reply **reply);
/* True while a 334 challenge awaits its answer. */
bool auth_sasl_pending(const struct auth_sasl *s);
/* Wipes the password (explicit_bzero) and forgets the exchange; keeps
 * nothing but zeroes. Call once the password has been handed over. */
void auth_sasl_reset(struct auth_sasl *s);

/* Strict base64 (RFC 4648 4): the standard alphabet, padding required,
 * no whitespace, no data after padding, zero pad bits. Decodes into out
 * (size bytes; *out_len set). NULL on success, R_AUTH_BAD_BASE64 when
 * malformed, R_AUTH_TOO_LONG when the result would not fit. */
const struct reply *auth_base64_decode(struct span in, char *out, size_t size, size_t *out_len);

/* ---- per-client-IP failure limiter (pure) ------------------------------- */

struct auth_limiter;

/* After max_failures failed attempts from one address within window_ms
 * (counted from the first of them), the address is blocked until the
 * window ends. IPv6 addresses count per /64. At most max_entries addresses
 * are remembered (rounded up to a multiple of 8); when full, an expired or
 * the least-failed entry is forgotten. max_failures 0 disables it. */
struct auth_limiter *auth_limiter_new(unsigned max_failures, uint64_t window_ms,
                                      size_t max_entries);
void auth_limiter_free(struct auth_limiter *l);
/* Whether AUTH from ip (text form) must be refused now. */
bool auth_limiter_blocked(const struct auth_limiter *l, const char *ip, int64_t now_ms);
/* Records a failure; true when this one made ip blocked (log it once). */
bool auth_limiter_fail(struct auth_limiter *l, const char *ip, int64_t now_ms);

/* ---- verification on the threadpool ------------------------------------ */

struct auth_verifier;
struct auth_verify;

/* Fires once on the loop thread, never after auth_verify_cancel() and never
 * from inside auth_verify(). status 0: ok tells whether the password
 * matched; status < 0 (UV_ENOMEM, UV_EINVAL for a hash libcrypt refused):
 * the check could not run (454 4.7.0). v is freed after the callback. */
typedef void auth_verify_cb(struct auth_verify *v, int status, bool ok, void *arg);

/* Runs crypt_rn() on the loop's threadpool, at most max_parallel jobs at
 * once, queueing up to max_queue more. 0 takes the defaults above. */
struct auth_verifier *auth_verifier_new(struct uv_loop_s *loop, unsigned max_parallel,
                                        unsigned max_queue);
/* Cancels every queued check (no callbacks). Jobs running on the
 * threadpool cannot be stopped: their callbacks are dropped and the
 * verifier is freed when the last one has come back, so the loop must run
 * until then before uv_loop_close(). NULL is a no-op. */
void auth_verifier_free(struct auth_verifier *av);

/* Checks password against user's hash in db. user and password are copied
 * (the copy is wiped after use); db is only read during this call (NULL:
 * no users). An unknown user, or a password longer than
 * AUTH_PASSWORD_MAX, costs the same crypt work against a dummy hash and
 * ends with ok false. Returns NULL when max_queue checks already wait
 * (reply R_AUTH_TEMPFAIL); otherwise the handle, valid until its callback
 * fires or auth_verify_cancel. */
struct auth_verify *auth_verify(struct auth_verifier *av, const struct auth_db *db,
                                const char *user, const char *password, auth_verify_cb *cb,
                                void *arg) __attribute__((warn_unused_result));
/* The callback will not fire; the memory goes when the job returns. */
void auth_verify_cancel(struct auth_verify *v);

/* ---- hashing and `petrel passwd` ----------------------------------------- */

/* Hashes password with the strongest method libcrypt offers (yescrypt "$y$",
 * else SHA-512-crypt "$6$") and a fresh random salt, at the default cost.
 * Blocking (tens of ms): CLI only. false (errno set) if libcrypt failed. */
bool auth_hash_password(const char *password, char *out, size_t size)
    __attribute__((warn_unused_result));

/* `petrel passwd USER`: argv holds the arguments after "passwd" (argv[0] is
 * USER, argc must be 1). Reads the password from stdin — prompting twice
 * on the terminal with echo off when stdin is a tty, one line otherwise —
 * and prints "USER:HASH" for the users file on stdout. Exit code: 0, 1 on
 * failure (message on stderr, prefixed "petrel passwd: "), 2 on usage. */
int auth_passwd_main(int argc, char **argv);
/* The same with explicit streams (tests). */
int auth_passwd_run(int argc, char **argv, FILE *in, FILE *out, FILE *err);

#endif
