/*
 * auth — SMTP AUTH building blocks (see auth.h for how smtp_server drives
 * them). Owns: the users file index (a sorted array searched with bsearch),
 * SASL PLAIN/LOGIN decoding with a strict base64 decoder, a set-associative
 * table of failures per client address, the threadpool verifier and the
 * `petrel passwd` command. Leaves to smtp_server: the command sequencing,
 * TLS checks, replies on the wire, logging and the Lua hook.
 *
 * Secrets: passwords live in fixed arrays (struct auth_sasl, the verify
 * job) and are wiped with explicit_bzero() as soon as they are handed on;
 * decoded SASL buffers on the stack are wiped before returning. Nothing
 * here logs.
 */
#include "auth.h"

#include <arpa/inet.h>
#include <crypt.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>
#include <uv.h>

#include "util.h"

/* ---- users file ------------------------------------------------------- */

#define AUTH_LINE_MAX 4096

struct auth_user {
    char *name; /* owned */
    char *hash; /* owned */
    int line;   /* in the users file */
};

struct auth_db {
    struct auth_user *v; /* owned, sorted by name */
    size_t n;
    char dummy[AUTH_HASH_MAX + 1]; /* unknown users are checked against this ("" if none) */
};

/* The methods we accept, with the length of the digest after the last '$'
 * (bcrypt: salt and digest after the cost, 22 + 31). */
static const struct {
    const char *prefix;
    const char *name;
    size_t digest_len;
} auth_methods[] = {
    {"$y$", "yescrypt", 43},       {"$gy$", "gost-yescrypt", 43}, {"$7$", "scrypt", 43},
    {"$2b$", "bcrypt", 53},        {"$2a$", "bcrypt", 53},        {"$2y$", "bcrypt", 53},
    {"$6$", "SHA-512-crypt", 86}, {"$5$", "SHA-256-crypt", 43},
};

static bool
auth_is_hash_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '/' || c == '$' || c == '=' || c == ',';
}

/* NULL if hash is usable, else why not. */
static const char *
auth_check_hash(const char *hash)
{
    size_t len = strlen(hash);
    if (len == 0)
        return "empty hash";
    if (len > AUTH_HASH_MAX)
        return "hash too long";
    for (size_t i = 0; i < len; i++)
        if (!auth_is_hash_char((unsigned char)hash[i]))
            return "invalid character in hash";
    size_t m;
    for (m = 0; m < ARRAY_SIZE(auth_methods); m++)
        if (strncmp(hash, auth_methods[m].prefix, strlen(auth_methods[m].prefix)) == 0)
            break;
    if (m == ARRAY_SIZE(auth_methods)) {
        if (hash[0] != '$')
            return "unsupported hash (DES crypt or not a crypt(3) hash); use petrel passwd";
        if (strncmp(hash, "$1$", 3) == 0 || strncmp(hash, "$md5", 4) == 0 ||
            strncmp(hash, "$sha1$", 6) == 0 || strncmp(hash, "$3$", 3) == 0)
            return "unsupported hash method (legacy); use petrel passwd";
        return "unsupported hash method; use yescrypt ($y$) or SHA-512-crypt ($6$)";
    }
    if (crypt_checksalt(hash) == CRYPT_SALT_INVALID)
        return "malformed hash";
    const char *last = strrchr(hash, '$');
    size_t prefix_len = strlen(auth_methods[m].prefix);
    if (last < hash + prefix_len || strlen(last + 1) != auth_methods[m].digest_len)
        return "malformed hash (wrong digest length)";
    return NULL;
}

bool
auth_valid_user(const char *name, size_t len)
{
    if (len == 0 || len > AUTH_USER_MAX)
        return false;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)name[i];
        if (c <= 0x20 || c == 0x7f || c == ':')
            return false;
    }
    return true;
}

static int
auth_user_cmp(const void *a, const void *b)
{
    const struct auth_user *x = a;
    const struct auth_user *y = b;
    int r = strcmp(x->name, y->name);
    if (r != 0)
        return r;
    return (x->line > y->line) - (x->line < y->line);
}

void
auth_db_free(struct auth_db *db)
{
    if (db == NULL)
        return;
    for (size_t i = 0; i < db->n; i++) {
        free(db->v[i].name);
        free(db->v[i].hash);
    }
    free(db->v);
    free(db);
}

/* One line (without its LF): NULL with name and hash set (name NULL for a
 * blank or comment line), or why the line is refused. Modifies line. */
static const char *
auth_parse_line(char *line, char **name, char **hash)
{
    *name = NULL;
    *hash = NULL;
    size_t len = strlen(line);
    while (len > 0 && (line[len - 1] == ' ' || line[len - 1] == '\t' || line[len - 1] == '\r'))
        line[--len] = '\0';
    char *p = line;
    while (*p == ' ' || *p == '\t')
        p++;
    if (*p == '\0' || *p == '#')
        return NULL;
    if (p != line)
        return "leading white space";
    char *colon = strchr(line, ':');
    if (colon == NULL)
        return "expected user:hash";
    *colon = '\0';
    if (!auth_valid_user(line, strlen(line)))
        return colon == line ? "empty user name"
                             : "invalid user name (1-255 bytes, no space, ':' or control "
                               "characters)";
    const char *h = colon + 1;
    if (strchr(h, ':') != NULL)
        return "extra ':' after the hash (expected user:hash)";
    const char *why = auth_check_hash(h);
    if (why != NULL)
        return why;
    *name = line;
    *hash = colon + 1;
    return NULL;
}

struct auth_db *
auth_db_load(const char *path, char **err)
{
    *err = NULL;
    FILE *f = fopen(path, "re");
    if (f == NULL) {
        *err = xasprintf("%s: %s", path, strerror(errno));
        return NULL;
    }
    struct auth_db *db = xcalloc(1, sizeof(*db));
    size_t cap = 0;
    char *line = NULL;
    size_t line_cap = 0;
    ssize_t got;
    int lineno = 0;
    errno = 0;
    while ((got = getline(&line, &line_cap, f)) >= 0) {
        lineno++;
        size_t len = (size_t)got;
        if (len > 0 && line[len - 1] == '\n')
            line[--len] = '\0';
        if (len > AUTH_LINE_MAX) {
            *err = xasprintf("%s:%d: line too long (over %d bytes)", path, lineno, AUTH_LINE_MAX);
            goto fail;
        }
        if (memchr(line, '\0', len) != NULL) {
            *err = xasprintf("%s:%d: NUL byte in line", path, lineno);
            goto fail;
        }
        char *name;
        char *hash;
        const char *why = auth_parse_line(line, &name, &hash);
        if (why != NULL) {
            *err = xasprintf("%s:%d: %s", path, lineno, why);
            goto fail;
        }
        if (name == NULL)
            continue;
        if (db->n == cap) {
            cap = cap ? cap * 2 : 16;
            db->v = xreallocarray(db->v, cap, sizeof(*db->v));
        }
        db->v[db->n++] = (struct auth_user){ xstrdup(name), xstrdup(hash), lineno };
        if (db->n == 1 && !str_copy(db->dummy, sizeof(db->dummy), hash))
            PANIC("auth: hash longer than checked");
    }
    if (ferror(f)) {
        *err = xasprintf("%s: read error: %s", path, strerror(errno));
        goto fail;
    }
    fclose(f);
    f = NULL;
    free(line);
    line = NULL;
    if (db->n > 1)
        qsort(db->v, db->n, sizeof(*db->v), auth_user_cmp);
    /* Duplicates sit side by side, ordered by line; report the earliest
     * second occurrence in file order. */
    int dup_line = 0;
    int first_line = 0;
    const char *dup_name = NULL;
    for (size_t i = 1; i < db->n; i++) {
        if (strcmp(db->v[i - 1].name, db->v[i].name) == 0 &&
            (dup_line == 0 || db->v[i].line < dup_line)) {
            dup_line = db->v[i].line;
            first_line = db->v[i - 1].line;
            dup_name = db->v[i].name;
        }
    }
    if (dup_name != NULL) {
        char vis[AUTH_USER_MAX * 4 + 1];
        *err = xasprintf("%s:%d: duplicate user \"%s\" (first on line %d)", path, dup_line,
                         str_vis(vis, sizeof(vis), dup_name, strlen(dup_name)), first_line);
        goto fail;
    }
    return db;
fail:
    if (f != NULL)
        fclose(f);
    free(line);
    auth_db_free(db);
    return NULL;
}

size_t
auth_db_count(const struct auth_db *db)
{
    return db ? db->n : 0;
}

static int
auth_user_key_cmp(const void *key, const void *elem)
{
    const struct auth_user *u = elem;
    return strcmp(key, u->name);
}

const char *
auth_db_lookup(const struct auth_db *db, const char *user)
{
    if (db == NULL || db->n == 0)
        return NULL;
    const struct auth_user *u = bsearch(user, db->v, db->n, sizeof(*db->v), auth_user_key_cmp);
    return u ? u->hash : NULL;
}

/* ---- base64 and SASL ----------------------------------------------------- */

static int
auth_b64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

const struct reply *
auth_base64_decode(struct span in, char *out, size_t size, size_t *out_len)
{
    *out_len = 0;
    if (in.len % 4 != 0)
        return &R_AUTH_BAD_BASE64;
    if (in.len / 4 * 3 > size + 2) /* cheap bound before decoding */
        return &R_AUTH_TOO_LONG;
    size_t o = 0;
    for (size_t i = 0; i < in.len; i += 4) {
        const unsigned char *q = (const unsigned char *)in.p + i;
        bool last = i + 4 == in.len;
        int pad = 0;
        if (last && q[3] == '=')
            pad = q[2] == '=' ? 2 : 1;
        int v[4] = {0, 0, 0, 0};
        for (int k = 0; k < 4 - pad; k++) {
            v[k] = auth_b64_value(q[k]);
            if (v[k] < 0)
                return &R_AUTH_BAD_BASE64;
        }
        uint32_t w = (uint32_t)v[0] << 18 | (uint32_t)v[1] << 12 | (uint32_t)v[2] << 6 |
                     (uint32_t)v[3];
        /* RFC 4648 3.5: the pad bits must be zero (a canonical encoding). */
        if ((pad == 1 && (w & 0xff) != 0) || (pad == 2 && (w & 0xffff) != 0))
            return &R_AUTH_BAD_BASE64;
        size_t nbytes = 3 - (size_t)pad;
        if (o + nbytes > size) {
            *out_len = 0;
            return &R_AUTH_TOO_LONG;
        }
        out[o++] = (char)(w >> 16);
        if (nbytes > 1)
            out[o++] = (char)(w >> 8);
        if (nbytes > 2)
            out[o++] = (char)w;
    }
    *out_len = o;
    return NULL;
}

const char *
auth_mech_name(enum auth_mech m)
{
    switch (m) {
    case AUTH_MECH_PLAIN:
        return "PLAIN";
    case AUTH_MECH_LOGIN:
        return "LOGIN";
    case AUTH_MECH_NONE:
        break;
    }
    return "";
}

enum { STEP_NONE = 0, STEP_PLAIN, STEP_LOGIN_USER, STEP_LOGIN_PASSWORD };

/* authzid + authcid + password + two NULs (RFC 4616 2). */
#define AUTH_PLAIN_MAX (AUTH_USER_MAX * 2 + AUTH_PASSWORD_MAX + 2)

void
auth_sasl_reset(struct auth_sasl *s)
{
    explicit_bzero(s, sizeof(*s));
}

bool
auth_sasl_pending(const struct auth_sasl *s)
{
    return s->step != STEP_NONE;
}

/* Ends the exchange with r; keeps the user name for the log. */
static enum auth_sasl_status
auth_sasl_fail(struct auth_sasl *s, const struct reply *r, const char *reason,
               const struct reply **reply)
{
    explicit_bzero(s->password, sizeof(s->password));
    s->step = STEP_NONE;
    s->reason = reason;
    *reply = r;
    return AUTH_SASL_FAILED;
}

static bool
auth_set_user(struct auth_sasl *s, const char *p, size_t len)
{
    if (len > AUTH_USER_MAX)
        return false;
    memcpy(s->user, p, len);
    s->user[len] = '\0';
    return true;
}

/* The exchange produced a password (len bytes, no NUL inside, at most
 * AUTH_PASSWORD_MAX): DONE, or FAILED for an empty one. */
static enum auth_sasl_status
auth_sasl_done(struct auth_sasl *s, const char *pass, size_t len, const struct reply **reply)
{
    if (len == 0)
        return auth_sasl_fail(s, &R_AUTH_FAILED, "empty password", reply);
    memcpy(s->password, pass, len);
    s->password[len] = '\0';
    s->step = STEP_NONE;
    *reply = NULL;
    return AUTH_SASL_DONE;
}

/* PLAIN message: [authzid] NUL authcid NUL passwd (RFC 4616 2). */
static enum auth_sasl_status
auth_sasl_plain(struct auth_sasl *s, struct span b64, const struct reply **reply)
{
    char buf[AUTH_PLAIN_MAX];
    size_t len;
    const struct reply *r = auth_base64_decode(b64, buf, sizeof(buf), &len);
    if (r != NULL) {
        explicit_bzero(buf, sizeof(buf));
        return auth_sasl_fail(s, r, r == &R_AUTH_TOO_LONG ? "response too long" : "bad base64",
                              reply);
    }
    const char *nul1 = memchr(buf, '\0', len);
    const char *nul2 = nul1 ? memchr(nul1 + 1, '\0', len - (size_t)(nul1 + 1 - buf)) : NULL;
    enum auth_sasl_status st;
    if (nul2 == NULL) {
        st = auth_sasl_fail(s, &R_AUTH_FAILED, "PLAIN message without two NUL separators",
                            reply);
        goto out;
    }
    const char *authzid = buf;
    size_t authzid_len = (size_t)(nul1 - buf);
    const char *authcid = nul1 + 1;
    size_t authcid_len = (size_t)(nul2 - authcid);
    const char *pass = nul2 + 1;
    size_t pass_len = len - (size_t)(pass - buf);
    if (memchr(pass, '\0', pass_len) != NULL) {
        st = auth_sasl_fail(s, &R_AUTH_FAILED, "PLAIN message with an extra NUL", reply);
        goto out;
    }
    if (authcid_len > AUTH_USER_MAX || authzid_len > AUTH_USER_MAX ||
        pass_len > AUTH_PASSWORD_MAX) {
        st = auth_sasl_fail(s, &R_AUTH_TOO_LONG, "response too long", reply);
        goto out;
    }
    if (!auth_valid_user(authcid, authcid_len)) {
        st = auth_sasl_fail(s, &R_AUTH_FAILED, "invalid user name", reply);
        goto out;
    }
    auth_set_user(s, authcid, authcid_len);
    if (authzid_len != 0 &&
        (authzid_len != authcid_len || memcmp(authzid, authcid, authcid_len) != 0)) {
        st = auth_sasl_fail(s, &R_AUTH_FAILED, "authorization identity differs from user",
                            reply);
        goto out;
    }
    st = auth_sasl_done(s, pass, pass_len, reply);
out:
    explicit_bzero(buf, sizeof(buf));
    return st;
}

/* A LOGIN answer: the user name, or the password. */
static enum auth_sasl_status
auth_sasl_login(struct auth_sasl *s, struct span b64, bool is_user, const struct reply **reply)
{
    char buf[AUTH_PASSWORD_MAX];
    size_t len;
    size_t max = is_user ? AUTH_USER_MAX : AUTH_PASSWORD_MAX;
    const struct reply *r = auth_base64_decode(b64, buf, max, &len);
    enum auth_sasl_status st;
    if (r != NULL) {
        st = auth_sasl_fail(s, r, r == &R_AUTH_TOO_LONG ? "response too long" : "bad base64",
                            reply);
        goto out;
    }
    if (memchr(buf, '\0', len) != NULL) {
        st = auth_sasl_fail(s, &R_AUTH_FAILED, "NUL in LOGIN response", reply);
        goto out;
    }
    if (is_user) {
        if (!auth_valid_user(buf, len)) {
            st = auth_sasl_fail(s, &R_AUTH_FAILED, "invalid user name", reply);
            goto out;
        }
        auth_set_user(s, buf, len);
        s->step = STEP_LOGIN_PASSWORD;
        *reply = &R_AUTH_PASSWORD;
        st = AUTH_SASL_CONTINUE;
        goto out;
    }
    st = auth_sasl_done(s, buf, len, reply);
out:
    explicit_bzero(buf, sizeof(buf));
    return st;
}

static enum auth_sasl_status
auth_sasl_answer(struct auth_sasl *s, struct span b64, const struct reply **reply)
{
    switch (s->step) {
    case STEP_PLAIN:
        return auth_sasl_plain(s, b64, reply);
    case STEP_LOGIN_USER:
        return auth_sasl_login(s, b64, true, reply);
    case STEP_LOGIN_PASSWORD:
        return auth_sasl_login(s, b64, false, reply);
    default:
        PANIC("auth: no SASL challenge outstanding");
    }
}

enum auth_sasl_status
auth_sasl_start(struct auth_sasl *s, struct span args, const struct reply **reply)
{
    auth_sasl_reset(s);
    if (args.len == 0)
        return auth_sasl_fail(s, &R_AUTH_SYNTAX, "syntax", reply);
    size_t i = 0;
    while (i < args.len && args.p[i] == ' ')
        i++;
    size_t m0 = i;
    while (i < args.len && args.p[i] != ' ')
        i++;
    struct span mech = { args.p + m0, i - m0 };
    while (i < args.len && args.p[i] == ' ')
        i++;
    struct span init = { args.p + i, args.len - i };
    while (init.len > 0 && init.p[init.len - 1] == ' ')
        init.len--;
    if (mech.len == 0 || memchr(init.p, ' ', init.len) != NULL)
        return auth_sasl_fail(s, &R_AUTH_SYNTAX, "syntax", reply);
    for (size_t k = 0; k < args.len; k++) {
        unsigned char c = (unsigned char)args.p[k];
        if (c < 0x20 || c >= 0x7f)
            return auth_sasl_fail(s, &R_AUTH_SYNTAX, "syntax", reply);
    }
    if (span_eq_ci(mech, "PLAIN"))
        s->mech = AUTH_MECH_PLAIN;
    else if (span_eq_ci(mech, "LOGIN"))
        s->mech = AUTH_MECH_LOGIN;
    else
        return auth_sasl_fail(s, &R_AUTH_UNKNOWN_MECH, "unknown mechanism", reply);
    s->step = s->mech == AUTH_MECH_PLAIN ? STEP_PLAIN : STEP_LOGIN_USER;
    if (init.len == 0) {
        *reply = s->mech == AUTH_MECH_PLAIN ? &R_AUTH_CHALLENGE : &R_AUTH_USERNAME;
        return AUTH_SASL_CONTINUE;
    }
    /* RFC 4954 4: "=" stands for an empty initial response. */
    if (init.len == 1 && init.p[0] == '=')
        init.len = 0;
    return auth_sasl_answer(s, init, reply);
}

enum auth_sasl_status
auth_sasl_step(struct auth_sasl *s, struct span line, const struct reply **reply)
{
    if (s->step == STEP_NONE)
        PANIC("auth: no SASL challenge outstanding");
    if (line.len == 1 && line.p[0] == '*')
        return auth_sasl_fail(s, &R_AUTH_CANCELLED, "cancelled by the client", reply);
    return auth_sasl_answer(s, line, reply);
}

/* ---- limiter -------------------------------------------------------------- */

#define AUTH_LIMIT_WAYS 8

struct auth_limit_entry {
    uint8_t key[17]; /* family byte, then the address (IPv6: its /64) */
    bool used;
    uint32_t count;   /* failures since start_ms */
    int64_t start_ms; /* first failure of the current window */
};

struct auth_limiter {
    struct auth_limit_entry *v; /* owned: nsets * AUTH_LIMIT_WAYS */
    size_t nsets;
    unsigned max_failures;
    int64_t window_ms;
    uint64_t seed; /* per process, so addresses cannot be chosen to collide */
};

struct auth_limiter *
auth_limiter_new(unsigned max_failures, uint64_t window_ms, size_t max_entries)
{
    struct auth_limiter *l = xcalloc(1, sizeof(*l));
    l->nsets = max_entries / AUTH_LIMIT_WAYS + (max_entries % AUTH_LIMIT_WAYS != 0);
    if (l->nsets == 0)
        l->nsets = 1;
    l->v = xcalloc(l->nsets * AUTH_LIMIT_WAYS, sizeof(*l->v));
    l->max_failures = max_failures;
    l->window_ms = window_ms > INT64_MAX ? INT64_MAX : (int64_t)window_ms;
    l->seed = (uint64_t)arc4random() << 32 | arc4random();
    return l;
}

void
auth_limiter_free(struct auth_limiter *l)
{
    if (l == NULL)
        return;
    free(l->v);
    free(l);
}

static void
auth_limit_key(const char *ip, uint8_t key[17])
{
    memset(key, 0, 17);
    struct in6_addr a6;
    struct in_addr a4;
    if (inet_pton(AF_INET, ip, &a4) == 1) {
        key[0] = 4;
        memcpy(key + 1, &a4, 4);
    } else if (inet_pton(AF_INET6, ip, &a6) == 1) {
        if (IN6_IS_ADDR_V4MAPPED(&a6)) {
            key[0] = 4;
            memcpy(key + 1, a6.s6_addr + 12, 4);
        } else {
            key[0] = 6;
            memcpy(key + 1, a6.s6_addr, 8); /* per /64: one site's addresses */
        }
    } else {
        /* not an address (a unix socket peer): the text itself */
        key[0] = 1;
        size_t n = strlen(ip);
        memcpy(key + 1, ip, n > 16 ? 16 : n);
    }
}

static size_t
auth_limit_set(const struct auth_limiter *l, const uint8_t key[17])
{
    uint64_t h = 0xcbf29ce484222325ULL ^ l->seed; /* FNV-1a, seeded */
    for (size_t i = 0; i < 17; i++) {
        h ^= key[i];
        h *= 0x100000001b3ULL;
    }
    h ^= h >> 29;
    return (size_t)(h % l->nsets);
}

static bool
auth_limit_live(const struct auth_limiter *l, const struct auth_limit_entry *e, int64_t now)
{
    return e->used && now - e->start_ms < l->window_ms && now >= e->start_ms;
}

static struct auth_limit_entry *
auth_limit_find(const struct auth_limiter *l, const uint8_t key[17])
{
    struct auth_limit_entry *set = l->v + auth_limit_set(l, key) * AUTH_LIMIT_WAYS;
    for (size_t i = 0; i < AUTH_LIMIT_WAYS; i++)
        if (set[i].used && memcmp(set[i].key, key, 17) == 0)
            return &set[i];
    return NULL;
}

bool
auth_limiter_blocked(const struct auth_limiter *l, const char *ip, int64_t now_ms)
{
    if (l == NULL || l->max_failures == 0)
        return false;
    uint8_t key[17];
    auth_limit_key(ip, key);
    const struct auth_limit_entry *e = auth_limit_find(l, key);
    return e != NULL && auth_limit_live(l, e, now_ms) && e->count >= l->max_failures;
}

bool
auth_limiter_fail(struct auth_limiter *l, const char *ip, int64_t now_ms)
{
    if (l == NULL || l->max_failures == 0)
        return false;
    uint8_t key[17];
    auth_limit_key(ip, key);
    struct auth_limit_entry *e = auth_limit_find(l, key);
    if (e == NULL) {
        /* a free or expired way, else the one with the fewest failures
         * (blocked addresses are the last to go), the oldest among equals */
        struct auth_limit_entry *set = l->v + auth_limit_set(l, key) * AUTH_LIMIT_WAYS;
        for (size_t i = 0; i < AUTH_LIMIT_WAYS && e == NULL; i++)
            if (!auth_limit_live(l, &set[i], now_ms))
                e = &set[i];
        if (e == NULL) {
            e = &set[0];
            for (size_t i = 1; i < AUTH_LIMIT_WAYS; i++) {
                struct auth_limit_entry *c = &set[i];
                if (c->count < e->count || (c->count == e->count && c->start_ms < e->start_ms))
                    e = c;
            }
        }
        memcpy(e->key, key, 17);
        e->used = true;
        e->count = 0;
        e->start_ms = now_ms;
    } else if (!auth_limit_live(l, e, now_ms)) {
        e->count = 0;
        e->start_ms = now_ms;
    }
    if (e->count < UINT32_MAX)
        e->count++;
    return e->count == l->max_failures;
}

/* ---- verifier --------------------------------------------------------------- */

struct auth_verify {
    uv_work_t req;
    struct auth_verifier *av;             /* borrowed; outlives its jobs */
    struct auth_verify *prev, *next;      /* av's waiting queue */
    auth_verify_cb *cb;
    void *arg;
    bool queued;                          /* waiting, not yet on the threadpool */
    bool cancelled;
    bool known;                           /* the user exists (else: dummy hash) */
    bool ok;
    int status;
    char setting[AUTH_HASH_MAX + 1];      /* the stored hash */
    char password[AUTH_PASSWORD_MAX + 1]; /* wiped in the work function */
};

struct auth_verifier {
    uv_loop_t *loop;                  /* borrowed */
    unsigned max_parallel;
    unsigned max_queue;
    unsigned running;                 /* jobs on the threadpool */
    unsigned nqueued;
    struct auth_verify *head, *tail;  /* waiting, FIFO */
    bool closing;                     /* freed when the last running job returns */
    bool dispatching;                 /* inside a callback: do not free yet */
    char dummy[AUTH_HASH_MAX + 1];    /* for unknown users when the db has none */
};

struct auth_verifier *
auth_verifier_new(struct uv_loop_s *loop, unsigned max_parallel, unsigned max_queue)
{
    struct auth_verifier *av = xcalloc(1, sizeof(*av));
    av->loop = loop;
    av->max_parallel = max_parallel ? max_parallel : AUTH_VERIFY_PARALLEL_DEFAULT;
    av->max_queue = max_queue ? max_queue : AUTH_VERIFY_QUEUE_DEFAULT;
    /* A real setting so unknown users cost a real hash; the digest part
     * is never compared (ok is false for them anyway). */
    char setting[CRYPT_GENSALT_OUTPUT_SIZE];
    if (crypt_gensalt_rn("$y$", 0, NULL, 0, setting, sizeof(setting)) == NULL &&
        crypt_gensalt_rn("$6$", 0, NULL, 0, setting, sizeof(setting)) == NULL)
        PANIC("auth: libcrypt offers neither yescrypt nor SHA-512-crypt");
    if (!str_copy(av->dummy, sizeof(av->dummy), setting))
        PANIC("auth: setting too long");
    return av;
}

static void
auth_verify_free(struct auth_verify *v)
{
    explicit_bzero(v->password, sizeof(v->password));
    free(v);
}

static void
auth_verifier_unlink(struct auth_verifier *av, struct auth_verify *v)
{
    if (v->prev)
        v->prev->next = v->next;
    else
        av->head = v->next;
    if (v->next)
        v->next->prev = v->prev;
    else
        av->tail = v->prev;
    v->prev = v->next = NULL;
    v->queued = false;
    av->nqueued--;
}

void
auth_verifier_free(struct auth_verifier *av)
{
    if (av == NULL)
        return;
    while (av->head != NULL) {
        struct auth_verify *v = av->head;
        auth_verifier_unlink(av, v);
        auth_verify_free(v);
    }
    if (av->running > 0 || av->dispatching) {
        av->closing = true;
        return;
    }
    free(av);
}

/* Constant time for equal lengths: the comparison must not tell how much
 * of a guessed hash matched. */
static bool
auth_hash_equal(const char *a, const char *b)
{
    size_t la = strlen(a);
    size_t lb = strlen(b);
    unsigned char d = la != lb;
    size_t n = la < lb ? la : lb;
    for (size_t i = 0; i < n; i++)
        d |= (unsigned char)(a[i] ^ b[i]);
    return d == 0;
}

/* Threadpool: touches only the job. */
static void
auth_on_work(uv_work_t *req)
{
    struct auth_verify *v = req->data;
    struct crypt_data *cd = calloc(1, sizeof(*cd));
    if (cd == NULL) {
        v->status = UV_ENOMEM;
    } else {
        errno = 0;
        const char *h = crypt_rn(v->password, v->setting, cd, (int)sizeof(*cd));
        if (h == NULL)
            v->status = errno == ENOMEM ? UV_ENOMEM : UV_EINVAL;
        else
            v->ok = auth_hash_equal(h, v->setting) && v->known;
        explicit_bzero(cd, sizeof(*cd));
        free(cd);
    }
    explicit_bzero(v->password, sizeof(v->password));
}

static void auth_verifier_pump(struct auth_verifier *av);

static void
auth_on_work_done(uv_work_t *req, int status)
{
    struct auth_verify *v = req->data;
    struct auth_verifier *av = v->av;
    av->running--;
    if (!av->closing)
        auth_verifier_pump(av);
    if (status < 0 && v->status == 0)
        v->status = status; /* UV_ECANCELED only after auth_verify_cancel */
    if (!v->cancelled && !av->closing) {
        av->dispatching = true;
        v->cb(v, v->status, v->status == 0 && v->ok, v->arg);
        av->dispatching = false;
    }
    auth_verify_free(v);
    if (av->closing && av->running == 0 && !av->dispatching)
        free(av);
}

/* Moves waiting jobs onto the threadpool while there is room. */
static void
auth_verifier_pump(struct auth_verifier *av)
{
    while (av->head != NULL && av->running < av->max_parallel) {
        struct auth_verify *v = av->head;
        auth_verifier_unlink(av, v);
        int r = uv_queue_work(av->loop, &v->req, auth_on_work, auth_on_work_done);
        if (r < 0)
            PANIC("auth: uv_queue_work: %s", uv_strerror(r));
        av->running++;
    }
}

struct auth_verify *
auth_verify(struct auth_verifier *av, const struct auth_db *db, const char *user,
            const char *password, auth_verify_cb *cb, void *arg)
{
    if (av->nqueued >= av->max_queue && av->running >= av->max_parallel)
        return NULL;
    struct auth_verify *v = xcalloc(1, sizeof(*v));
    v->req.data = v;
    v->av = av;
    v->cb = cb;
    v->arg = arg;
    const char *hash = auth_db_lookup(db, user);
    size_t plen = strlen(password);
    v->known = hash != NULL && plen <= AUTH_PASSWORD_MAX;
    if (hash == NULL)
        hash = db != NULL && db->dummy[0] ? db->dummy : av->dummy;
    if (!str_copy(v->setting, sizeof(v->setting), hash))
        PANIC("auth: hash longer than checked");
    memcpy(v->password, password, plen > AUTH_PASSWORD_MAX ? AUTH_PASSWORD_MAX : plen);
    /* queue, then start what fits: the callback always comes from the loop */
    v->queued = true;
    v->prev = av->tail;
    if (av->tail)
        av->tail->next = v;
    else
        av->head = v;
    av->tail = v;
    av->nqueued++;
    auth_verifier_pump(av);
    return v;
}

void
auth_verify_cancel(struct auth_verify *v)
{
    if (v == NULL)
        return;
    if (v->queued) {
        auth_verifier_unlink(v->av, v);
        auth_verify_free(v);
        return;
    }
    v->cancelled = true;
    uv_cancel((uv_req_t *)&v->req);
}

/* ---- hashing and petrel passwd -------------------------------------------- */

bool
auth_hash_password(const char *password, char *out, size_t size)
{
    char setting[CRYPT_GENSALT_OUTPUT_SIZE];
    if (crypt_gensalt_rn("$y$", 0, NULL, 0, setting, sizeof(setting)) == NULL &&
        crypt_gensalt_rn("$6$", 0, NULL, 0, setting, sizeof(setting)) == NULL)
        return false;
    struct crypt_data *cd = xcalloc(1, sizeof(*cd));
    const char *h = crypt_rn(password, setting, cd, (int)sizeof(*cd));
    bool ok = h != NULL && str_copy(out, size, h);
    explicit_bzero(cd, sizeof(*cd));
    free(cd);
    if (h != NULL && !ok)
        errno = ERANGE;
    return ok;
}

/* Reads one line into buf (size bytes) without its LF/CRLF. 1: ok, 0: EOF
 * before anything, -1: too long, -2: NUL byte. */
static int
auth_read_line(FILE *in, char *buf, size_t size)
{
    size_t n = 0;
    int c;
    bool any = false;
    while ((c = getc(in)) != EOF) {
        any = true;
        if (c == '\n')
            break;
        if (n + 1 >= size) {
            while ((c = getc(in)) != EOF && c != '\n')
                ;
            return -1;
        }
        buf[n++] = (char)c;
    }
    if (!any)
        return 0;
    if (n > 0 && buf[n - 1] == '\r')
        n--;
    buf[n] = '\0';
    if (memchr(buf, '\0', n) != NULL)
        return -2;
    return 1;
}

/* Prompts on err and reads a line from the terminal in with echo off. */
static int
auth_read_secret(FILE *in, FILE *err, const char *prompt, char *buf, size_t size)
{
    int fd = fileno(in);
    struct termios old;
    bool restore = false;
    fputs(prompt, err);
    fflush(err);
    if (tcgetattr(fd, &old) == 0) {
        struct termios quiet = old;
        quiet.c_lflag &= ~(tcflag_t)ECHO;
        quiet.c_lflag |= ECHONL;
        restore = tcsetattr(fd, TCSAFLUSH, &quiet) == 0;
    }
    int r = auth_read_line(in, buf, size);
    if (restore)
        tcsetattr(fd, TCSAFLUSH, &old);
    else
        fputc('\n', err);
    return r;
}

int
auth_passwd_run(int argc, char **argv, FILE *in, FILE *out, FILE *err)
{
    if (argc != 1) {
        fprintf(err, "usage: petrel passwd USER\n");
        return 2;
    }
    const char *user = argv[0];
    if (!auth_valid_user(user, strlen(user))) {
        fprintf(err, "petrel passwd: invalid user name (1-%d bytes, no space, ':' or control "
                     "characters)\n", AUTH_USER_MAX);
        return 1;
    }
    char pw[AUTH_PASSWORD_MAX + 2];
    char again[AUTH_PASSWORD_MAX + 2];
    char hash[AUTH_HASH_MAX + 1];
    int rc = 1;
    int r;
    bool tty = isatty(fileno(in));
    if (tty)
        r = auth_read_secret(in, err, "Password: ", pw, sizeof(pw));
    else
        r = auth_read_line(in, pw, sizeof(pw));
    if (r == 0) {
        fprintf(err, "petrel passwd: no password given\n");
        goto out;
    }
    if (r == -1 || (r == 1 && strlen(pw) > AUTH_PASSWORD_MAX)) {
        fprintf(err, "petrel passwd: password too long (at most %d bytes)\n", AUTH_PASSWORD_MAX);
        goto out;
    }
    if (r == -2) {
        fprintf(err, "petrel passwd: NUL byte in password\n");
        goto out;
    }
    if (pw[0] == '\0') {
        fprintf(err, "petrel passwd: empty password\n");
        goto out;
    }
    if (tty) {
        r = auth_read_secret(in, err, "Retype password: ", again, sizeof(again));
        if (r != 1 || strcmp(pw, again) != 0) {
            fprintf(err, "petrel passwd: passwords do not match\n");
            goto out;
        }
    }
    if (!auth_hash_password(pw, hash, sizeof(hash))) {
        fprintf(err, "petrel passwd: crypt: %s\n", strerror(errno));
        goto out;
    }
    if (fprintf(out, "%s:%s\n", user, hash) < 0 || fflush(out) != 0) {
        fprintf(err, "petrel passwd: write error: %s\n", strerror(errno));
        goto out;
    }
    rc = 0;
out:
    explicit_bzero(pw, sizeof(pw));
    explicit_bzero(again, sizeof(again));
    return rc;
}

int
auth_passwd_main(int argc, char **argv)
{
    return auth_passwd_run(argc, argv, stdin, stdout, stderr);
}
