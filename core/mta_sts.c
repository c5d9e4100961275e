/*
 * mta_sts — MTA-STS policy discovery, fetch and cache (RFC 8461). See
 * mta_sts.h for what is asked and when a policy applies.
 *
 * A struct mta_sts_lookup runs: TXT of _mta-sts.<domain> (dns.c) → the
 * cached policy if its id is the same and it has not expired → else the
 * addresses of mta-sts.<domain> (dns.c) → a TCP connection to port 443 of
 * the first address (conn.h) → TLS with the name mta-sts.<domain> (the
 * shared delivery context: the system trust store, SSL_CERT_FILE) →
 * "GET /.well-known/mta-sts.txt HTTP/1.1" with "Connection: close" → the
 * whole response until EOF (at most MTA_STS_MAX_BODY plus headers) →
 * mta_sts_http_parse, mta_sts_policy_parse → cache. One deadline covers
 * the fetch. The callback fires from a dns or conn callback; the conn is
 * closed after it and the lookup freed on CONN_EV_CLOSED.
 *
 * The cache is process-wide (the loop thread only): up to
 * MTA_STS_CACHE_MAX domains, the entry expiring first dropped when full.
 * Concurrent lookups of one domain with nothing cached each fetch.
 */
#include "mta_sts.h"

#include <arpa/inet.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include "buf.h"
#include "conn.h"
#include "dns.h"
#include "log.h"
#include "tls.h"
#include "util.h"

#define MTA_STS_DEFAULT_TIMEOUT_MS 10000
#define MTA_STS_HTTPS_PORT 443
#define MTA_STS_MAX_HEADERS 16384 /* response bytes before the body */
#define MTA_STS_CACHE_MAX 1024

/* ------------------------------------------------------------------ pure helpers */

const char *
mta_sts_mode_name(enum mta_sts_mode mode)
{
    switch (mode) {
    case MTA_STS_MODE_NONE:
        return "none";
    case MTA_STS_MODE_TESTING:
        return "testing";
    case MTA_STS_MODE_ENFORCE:
        return "enforce";
    }
    return "?";
}

static bool
mta_sts_is_wsp(char c)
{
    return c == ' ' || c == '\t';
}

static bool
mta_sts_is_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

bool
mta_sts_txt_parse(const char *txt, char *id, size_t size)
{
    static const char version[] = "v=STSv1";
    if (strncmp(txt, version, sizeof(version) - 1) != 0)
        return false;
    const char *p = txt + sizeof(version) - 1;
    bool have_id = false;
    while (*p != '\0') {
        while (mta_sts_is_wsp(*p))
            p++;
        if (*p == '\0')
            break;
        if (*p != ';')
            return false; /* "v=STSv1x" or garbage after a field */
        p++;
        while (mta_sts_is_wsp(*p))
            p++;
        if (*p == '\0')
            break; /* a trailing delimiter */
        const char *f = p;
        while (*p != '\0' && *p != ';' && !mta_sts_is_wsp(*p))
            p++;
        size_t n = (size_t)(p - f);
        if (n > 3 && strncmp(f, "id=", 3) == 0) {
            if (have_id)
                continue; /* the first id counts */
            size_t idlen = n - 3;
            if (idlen > 32 || idlen + 1 > size)
                return false;
            for (size_t i = 0; i < idlen; i++) {
                if (!mta_sts_is_alnum(f[3 + i]))
                    return false;
            }
            memcpy(id, f + 3, idlen);
            id[idlen] = '\0';
            have_id = true;
        } else if (memchr(f, '=', n) == NULL || f[0] == '=') {
            return false; /* an extension is name=value */
        }
    }
    return have_id;
}

/* An mx pattern: an optional "*." then a host name (letters, digits, '-',
 * '.', '_'), no empty label. */
static bool
mta_sts_pattern_valid(const char *s)
{
    if (strncmp(s, "*.", 2) == 0)
        s += 2;
    size_t label = 0;
    if (*s == '\0')
        return false;
    for (; *s != '\0'; s++) {
        if (*s == '.') {
            if (label == 0)
                return false;
            label = 0;
        } else if (mta_sts_is_alnum(*s) || *s == '-' || *s == '_') {
            label++;
        } else {
            return false;
        }
    }
    return label > 0;
}

const char *
mta_sts_policy_parse(const char *text, size_t len, struct mta_sts_policy *p)
{
    memset(p, 0, sizeof(*p));
    bool have_version = false;
    bool have_mode = false;
    bool have_age = false;
    const char *end = text + len;
    const char *line = text;
    while (line < end) {
        const char *nl = memchr(line, '\n', (size_t)(end - line));
        const char *lend = nl != NULL ? nl : end;
        const char *next = nl != NULL ? nl + 1 : end;
        if (lend > line && lend[-1] == '\r')
            lend--;
        while (lend > line && mta_sts_is_wsp(lend[-1]))
            lend--;
        if (lend == line) {
            line = next;
            continue;
        }
        const char *colon = memchr(line, ':', (size_t)(lend - line));
        if (colon == NULL || colon == line)
            return "malformed line";
        struct span key = { line, (size_t)(colon - line) };
        const char *v = colon + 1;
        while (v < lend && mta_sts_is_wsp(*v))
            v++;
        size_t vlen = (size_t)(lend - v);
        if (span_eq_ci(key, "version")) {
            if (!have_version) {
                if (vlen != 5 || memcmp(v, "STSv1", 5) != 0)
                    return "unsupported version";
                have_version = true;
            }
        } else if (span_eq_ci(key, "mode")) {
            if (!have_mode) {
                if (vlen == 7 && memcmp(v, "enforce", 7) == 0)
                    p->mode = MTA_STS_MODE_ENFORCE;
                else if (vlen == 7 && memcmp(v, "testing", 7) == 0)
                    p->mode = MTA_STS_MODE_TESTING;
                else if (vlen == 4 && memcmp(v, "none", 4) == 0)
                    p->mode = MTA_STS_MODE_NONE;
                else
                    return "bad mode";
                have_mode = true;
            }
        } else if (span_eq_ci(key, "max_age")) {
            if (!have_age) {
                if (vlen == 0 || vlen > 10)
                    return "bad max_age";
                uint64_t age = 0;
                for (size_t i = 0; i < vlen; i++) {
                    if (v[i] < '0' || v[i] > '9')
                        return "bad max_age";
                    age = age * 10 + (uint64_t)(v[i] - '0');
                }
                p->max_age_s = age > MTA_STS_MAX_AGE ? MTA_STS_MAX_AGE : age;
                have_age = true;
            }
        } else if (span_eq_ci(key, "mx")) {
            if (vlen == 0 || vlen >= sizeof(p->mx[0]))
                return "bad mx";
            if (p->nmx == MTA_STS_MAX_MX)
                return "too many mx";
            char *m = p->mx[p->nmx];
            for (size_t i = 0; i < vlen; i++)
                m[i] = (char)ascii_tolower((unsigned char)v[i]);
            m[vlen] = '\0';
            if (vlen > 1 && m[vlen - 1] == '.')
                m[vlen - 1] = '\0';
            if (!mta_sts_pattern_valid(m))
                return "bad mx";
            p->nmx++;
        }
        line = next;
    }
    if (!have_version)
        return "missing version";
    if (!have_mode)
        return "missing mode";
    if (!have_age)
        return "missing max_age";
    if (p->nmx == 0 && p->mode != MTA_STS_MODE_NONE)
        return "missing mx";
    return NULL;
}

bool
mta_sts_mx_match(const char *pattern, const char *host)
{
    if (strncmp(pattern, "*.", 2) != 0)
        return strcmp(pattern, host) == 0;
    const char *dot = strchr(host, '.');
    if (dot == NULL || dot == host)
        return false; /* the wildcard is exactly one non-empty label */
    return strcmp(dot, pattern + 1) == 0;
}

bool
mta_sts_policy_match(const struct mta_sts_policy *p, const char *host)
{
    char h[256];
    size_t n = strlen(host);
    if (n == 0 || n >= sizeof(h))
        return false;
    for (size_t i = 0; i < n; i++)
        h[i] = (char)ascii_tolower((unsigned char)host[i]);
    h[n] = '\0';
    if (n > 1 && h[n - 1] == '.')
        h[n - 1] = '\0';
    for (size_t i = 0; i < p->nmx; i++) {
        if (mta_sts_mx_match(p->mx[i], h))
            return true;
    }
    return false;
}

const char *
mta_sts_http_parse(const char *resp, size_t len, const char **body, size_t *body_len, char *why,
                   size_t size)
{
    /* the end of the header block: CRLF CRLF (a bare LF LF is accepted) */
    const char *hend = NULL;
    size_t skip = 0;
    for (size_t i = 0; i + 1 < len && hend == NULL; i++) {
        if (resp[i] == '\n' && resp[i + 1] == '\n') {
            hend = resp + i + 1;
            skip = 1;
        } else if (i + 3 < len && memcmp(resp + i, "\r\n\r\n", 4) == 0) {
            hend = resp + i + 2;
            skip = 2;
        }
    }
    if (hend == NULL) {
        snprintf(why, size, "incomplete HTTP response");
        return why;
    }
    const char *p = resp;
    const char *eol = memchr(p, '\n', (size_t)(hend - p));
    if (eol == NULL || eol - p < 12 || strncmp(p, "HTTP/1.", 7) != 0 || p[8] != ' ') {
        snprintf(why, size, "malformed HTTP status line");
        return why;
    }
    int status = 0;
    for (int i = 9; i < 12; i++) {
        if (p[i] < '0' || p[i] > '9') {
            snprintf(why, size, "malformed HTTP status line");
            return why;
        }
        status = status * 10 + (p[i] - '0');
    }
    if (status != 200) {
        snprintf(why, size, "HTTP status %d", status);
        return why;
    }
    bool have_length = false;
    bool text_plain = false;
    uint64_t length = 0;
    for (p = eol + 1; p < hend;) {
        eol = memchr(p, '\n', (size_t)(hend - p));
        if (eol == NULL)
            break;
        const char *lend = eol > p && eol[-1] == '\r' ? eol - 1 : eol;
        const char *colon = memchr(p, ':', (size_t)(lend - p));
        if (colon != NULL) {
            struct span name = { p, (size_t)(colon - p) };
            const char *v = colon + 1;
            while (v < lend && mta_sts_is_wsp(*v))
                v++;
            struct span val = { v, (size_t)(lend - v) };
            while (val.len > 0 && mta_sts_is_wsp(val.p[val.len - 1]))
                val.len--;
            if (span_eq_ci(name, "content-length")) {
                if (val.len == 0 || val.len > 10) {
                    snprintf(why, size, "bad Content-Length");
                    return why;
                }
                length = 0;
                for (size_t i = 0; i < val.len; i++) {
                    if (val.p[i] < '0' || val.p[i] > '9') {
                        snprintf(why, size, "bad Content-Length");
                        return why;
                    }
                    length = length * 10 + (uint64_t)(val.p[i] - '0');
                }
                have_length = true;
            } else if (span_eq_ci(name, "transfer-encoding") && !span_eq_ci(val, "identity")) {
                snprintf(why, size, "unsupported Transfer-Encoding");
                return why;
            } else if (span_eq_ci(name, "content-type")) {
                text_plain = span_startswith_ci(val, "text/plain") &&
                             (val.len == 10 || val.p[10] == ';' || mta_sts_is_wsp(val.p[10]));
            }
        }
        p = eol + 1;
    }
    if (!text_plain) {
        snprintf(why, size, "media type is not text/plain");
        return why;
    }
    const char *b = hend + skip;
    size_t blen = len - (size_t)(b - resp);
    if (have_length) {
        if (length > blen) {
            snprintf(why, size, "truncated body");
            return why;
        }
        blen = (size_t)length;
    }
    if (blen > MTA_STS_MAX_BODY) {
        snprintf(why, size, "policy over %d bytes", MTA_STS_MAX_BODY);
        return why;
    }
    *body = b;
    *body_len = blen;
    return NULL;
}

/* ------------------------------------------------------------------ cache */

struct mta_sts_cached {
    char domain[256];
    char id[33];
    struct mta_sts_policy policy;
    int64_t expires_ms; /* now_ms() time */
};

static struct mta_sts_cached *mta_sts_cache; /* owned */
static size_t mta_sts_ncache;

void
mta_sts_cache_clear(void)
{
    free(mta_sts_cache);
    mta_sts_cache = NULL;
    mta_sts_ncache = 0;
}

/* The unexpired entry of domain, or NULL (an expired one is dropped). */
static const struct mta_sts_cached *
mta_sts_cache_find(const char *domain)
{
    int64_t now = now_ms();
    for (size_t i = 0; i < mta_sts_ncache; i++) {
        struct mta_sts_cached *e = &mta_sts_cache[i];
        if (ascii_casecmp(e->domain, domain) != 0)
            continue;
        if (e->expires_ms > now)
            return e;
        mta_sts_cache[i] = mta_sts_cache[--mta_sts_ncache];
        return NULL;
    }
    return NULL;
}

static void
mta_sts_cache_store(const char *domain, const char *id, const struct mta_sts_policy *p)
{
    struct mta_sts_cached *e = NULL;
    for (size_t i = 0; i < mta_sts_ncache && e == NULL; i++) {
        if (ascii_casecmp(mta_sts_cache[i].domain, domain) == 0)
            e = &mta_sts_cache[i];
    }
    if (e == NULL && mta_sts_ncache == MTA_STS_CACHE_MAX) {
        e = &mta_sts_cache[0];
        for (size_t i = 1; i < mta_sts_ncache; i++) {
            if (mta_sts_cache[i].expires_ms < e->expires_ms)
                e = &mta_sts_cache[i];
        }
    }
    if (e == NULL) {
        if (mta_sts_cache == NULL)
            mta_sts_cache = xcalloc(MTA_STS_CACHE_MAX, sizeof(*mta_sts_cache));
        e = &mta_sts_cache[mta_sts_ncache++];
    }
    if (!str_copy(e->domain, sizeof(e->domain), domain) || !str_copy(e->id, sizeof(e->id), id)) {
        *e = mta_sts_cache[--mta_sts_ncache]; /* cannot happen: both were checked */
        return;
    }
    e->policy = *p;
    e->expires_ms = now_ms() + (int64_t)p->max_age_s * 1000;
}

/* ------------------------------------------------------------------ lookups */

struct mta_sts_lookup {
    struct uv_loop_s *loop;   /* borrowed */
    struct dns *dns;          /* borrowed, outlives the lookup */
    mta_sts_lookup_cb *cb;
    void *arg;                /* borrowed, the caller's */
    char domain[256];
    char host[272];           /* "mta-sts.<domain>" */
    uint64_t timeout_ms;
    struct dns_query *q;      /* owned while in flight (TXT, then the host) */
    struct conn *conn;        /* owned until CONN_EV_CLOSED */
    char id[33];              /* of the TXT record */
    bool done;                /* the result was delivered (or cancelled) */
    bool in_cb;
};

/* res->detail from a format (truncated to fit: it is for logs). */
static void
mta_sts_detail(struct mta_sts_result *res, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void
mta_sts_detail(struct mta_sts_result *res, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(res->detail, sizeof(res->detail), fmt, ap);
    va_end(ap);
}

static void mta_sts_on_conn(struct conn *c, enum conn_event ev, int status, void *arg);

/* Frees l unless its conn still has to close (then CONN_EV_CLOSED does). */
static void
mta_sts_release(struct mta_sts_lookup *l)
{
    dns_cancel(l->q);
    l->q = NULL;
    if (l->conn != NULL)
        conn_close(l->conn);
    else
        free(l);
}

static void
mta_sts_deliver(struct mta_sts_lookup *l, struct mta_sts_result *res)
{
    if (l->done)
        return;
    l->done = true;
    l->in_cb = true;
    l->cb(l, res, l->arg);
    l->in_cb = false;
}

/* The fetch failed: a cached unexpired policy still applies (RFC 8461 5.1). */
static void
mta_sts_fail(struct mta_sts_lookup *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void
mta_sts_fail(struct mta_sts_lookup *l, const char *fmt, ...)
{
    struct mta_sts_result res;
    memset(&res, 0, sizeof(res));
    char why[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    const struct mta_sts_cached *e = mta_sts_cache_find(l->domain);
    if (e != NULL) {
        res.status = MTA_STS_POLICY;
        res.policy = e->policy;
        snprintf(res.id, sizeof(res.id), "%s", e->id);
        snprintf(res.detail, sizeof(res.detail), "cached policy; fetch failed: %s", why);
    } else {
        res.status = MTA_STS_FETCH_FAILED;
        snprintf(res.id, sizeof(res.id), "%s", l->id);
        snprintf(res.detail, sizeof(res.detail), "%s", why);
    }
    log_msg(LOG_INFO, NULL, "mta-sts: policy fetch from %s failed: %s", l->host, why);
    mta_sts_deliver(l, &res);
    mta_sts_release(l);
}

static void
mta_sts_on_response(struct mta_sts_lookup *l)
{
    struct buf *in = conn_input(l->conn);
    const char *body;
    size_t blen;
    char why[160];
    if (mta_sts_http_parse(buf_ptr(in), in->len, &body, &blen, why, sizeof(why)) != NULL) {
        mta_sts_fail(l, "%s", why);
        return;
    }
    struct mta_sts_result res;
    memset(&res, 0, sizeof(res));
    const char *err = mta_sts_policy_parse(body, blen, &res.policy);
    if (err != NULL) {
        mta_sts_fail(l, "policy: %s", err);
        return;
    }
    mta_sts_cache_store(l->domain, l->id, &res.policy);
    res.status = MTA_STS_POLICY;
    snprintf(res.id, sizeof(res.id), "%s", l->id);
    snprintf(res.detail, sizeof(res.detail), "policy id %s fetched", l->id);
    log_msg(LOG_INFO, NULL, "mta-sts: %s policy id %s: mode %s, %zu mx, max_age %" PRIu64,
            l->domain, l->id, mta_sts_mode_name(res.policy.mode), res.policy.nmx,
            res.policy.max_age_s);
    mta_sts_deliver(l, &res);
    mta_sts_release(l);
}

static void
mta_sts_on_tls(struct conn *c, int status, void *arg)
{
    struct mta_sts_lookup *l = arg;
    if (l->done)
        return;
    if (status < 0) {
        mta_sts_fail(l, "TLS handshake with %s failed: %s", l->host, conn_tls_error(c));
        return;
    }
    struct conn_tls_info info;
    if (!conn_tls_info(c, &info) || !info.verified) {
        mta_sts_fail(l, "certificate of %s: %s", l->host, info.verify);
        return;
    }
    char req[400];
    int n = snprintf(req, sizeof(req),
                     "GET /.well-known/mta-sts.txt HTTP/1.1\r\nHost: %s\r\n"
                     "User-Agent: petrel\r\nAccept: text/plain\r\nConnection: close\r\n\r\n",
                     l->host);
    if (n < 0 || (size_t)n >= sizeof(req)) {
        mta_sts_fail(l, "request too long");
        return;
    }
    conn_write(c, req, (size_t)n);
    conn_flush(c);
}

static void
mta_sts_on_conn(struct conn *c, enum conn_event ev, int status, void *arg)
{
    struct mta_sts_lookup *l = arg;
    if (ev == CONN_EV_CLOSED) {
        l->conn = NULL;
        free(l);
        return;
    }
    if (l->done)
        return;
    switch (ev) {
    case CONN_EV_CONNECTED:
        if (status < 0) {
            mta_sts_fail(l, "connect to %s: %s", l->host, conn_strerror(status));
            return;
        }
        {
            char *err = NULL;
            struct tls_ctx *ctx = tls_client_shared(&err);
            if (ctx == NULL) {
                mta_sts_fail(l, "no TLS client context: %s", err ? err : "?");
                free(err);
                return;
            }
            if (conn_start_tls(c, ctx, false, l->host, mta_sts_on_tls, l) != 0)
                mta_sts_fail(l, "TLS with %s: %s", l->host, conn_tls_error(c));
        }
        return;
    case CONN_EV_DATA:
        if (conn_input(c)->len > MTA_STS_MAX_BODY + MTA_STS_MAX_HEADERS)
            mta_sts_fail(l, "response over %d bytes", MTA_STS_MAX_BODY + MTA_STS_MAX_HEADERS);
        return;
    case CONN_EV_EOF:
        mta_sts_on_response(l);
        return;
    case CONN_EV_ERROR:
        mta_sts_fail(l, "reading from %s: %s", l->host, conn_strerror(status));
        return;
    case CONN_EV_TIMEOUT:
        mta_sts_fail(l, "fetching from %s timed out", l->host);
        return;
    case CONN_EV_DRAINED:
    case CONN_EV_CLOSED:
        return;
    }
}

static void
mta_sts_on_host(struct dns_query *q, enum dns_status status, const struct dns_result *res,
                const char *detail, void *arg)
{
    struct mta_sts_lookup *l = arg;
    (void)q;
    l->q = NULL;
    if (status != DNS_OK || res == NULL || res->nhosts == 0 || res->hosts[0].naddrs == 0) {
        mta_sts_fail(l, "address of %s: %s%s%s", l->host, dns_status_name(status),
                     detail ? ": " : "", detail ? detail : "");
        return;
    }
    struct sockaddr_storage ss = res->hosts[0].addrs[0].ss;
    if (ss.ss_family == AF_INET)
        ((struct sockaddr_in *)&ss)->sin_port = htons(MTA_STS_HTTPS_PORT);
    else
        ((struct sockaddr_in6 *)&ss)->sin6_port = htons(MTA_STS_HTTPS_PORT);
    if (conn_connect_tcp(l->loop, (const struct sockaddr *)&ss, NULL, mta_sts_on_conn, l,
                         &l->conn) != 0) {
        l->conn = NULL;
        mta_sts_fail(l, "cannot connect to %s", l->host);
        return;
    }
    conn_set_input_limit(l->conn, MTA_STS_MAX_BODY + MTA_STS_MAX_HEADERS + 1);
    conn_set_timeout(l->conn, l->timeout_ms);
}

static void
mta_sts_on_txt(struct dns_query *q, enum dns_status status, const char *const *txt, size_t ntxt,
               const char *detail, void *arg)
{
    struct mta_sts_lookup *l = arg;
    (void)q;
    l->q = NULL;
    size_t nsts = 0;
    for (size_t i = 0; status == DNS_OK && i < ntxt; i++) {
        char id[33];
        if (strncmp(txt[i], "v=STSv1", 7) != 0)
            continue; /* another kind of TXT record */
        nsts++;
        if (!mta_sts_txt_parse(txt[i], id, sizeof(id)))
            nsts = SIZE_MAX / 2; /* an invalid STSv1 record: as none */
        else if (!str_copy(l->id, sizeof(l->id), id))
            l->id[0] = '\0';
    }
    const struct mta_sts_cached *e = mta_sts_cache_find(l->domain);
    struct mta_sts_result res;
    memset(&res, 0, sizeof(res));
    if (nsts != 1 || l->id[0] == '\0') {
        if (e != NULL) {
            res.status = MTA_STS_POLICY;
            res.policy = e->policy;
            snprintf(res.id, sizeof(res.id), "%s", e->id);
            snprintf(res.detail, sizeof(res.detail), "cached policy id %s", e->id);
        } else {
            res.status = MTA_STS_NO_POLICY;
            if (status != DNS_OK && status != DNS_NXDOMAIN)
                mta_sts_detail(&res, "TXT lookup of _mta-sts.%s: %s", l->domain,
                               detail ? detail : dns_status_name(status));
            else if (nsts > 1)
                mta_sts_detail(&res, "no single valid STSv1 TXT record at _mta-sts.%s",
                               l->domain);
            else
                mta_sts_detail(&res, "no _mta-sts.%s TXT record", l->domain);
        }
        mta_sts_deliver(l, &res);
        mta_sts_release(l);
        return;
    }
    if (e != NULL && strcmp(e->id, l->id) == 0) {
        res.status = MTA_STS_POLICY;
        res.policy = e->policy;
        snprintf(res.id, sizeof(res.id), "%s", e->id);
        snprintf(res.detail, sizeof(res.detail), "cached policy id %s", e->id);
        mta_sts_deliver(l, &res);
        mta_sts_release(l);
        return;
    }
    l->q = dns_resolve_host(l->dns, l->host, mta_sts_on_host, l);
}

struct mta_sts_lookup *
mta_sts_lookup_start(struct uv_loop_s *loop, struct dns *dns, const char *domain,
                     uint64_t timeout_ms, mta_sts_lookup_cb *cb, void *arg)
{
    struct mta_sts_lookup *l = xcalloc(1, sizeof(*l));
    l->loop = loop;
    l->dns = dns;
    l->cb = cb;
    l->arg = arg;
    l->timeout_ms = timeout_ms > 0 ? timeout_ms : MTA_STS_DEFAULT_TIMEOUT_MS;
    if (!str_copy(l->domain, sizeof(l->domain), domain))
        l->domain[0] = '\0'; /* an invalid name: the TXT lookup fails */
    size_t n = strlen(l->domain);
    if (n > 0 && l->domain[n - 1] == '.')
        l->domain[n - 1] = '\0';
    snprintf(l->host, sizeof(l->host), "mta-sts.%s", l->domain);
    char name[272];
    snprintf(name, sizeof(name), "_mta-sts.%s", l->domain);
    l->q = dns_resolve_txt(dns, name, mta_sts_on_txt, l);
    return l;
}

void
mta_sts_lookup_cancel(struct mta_sts_lookup *l)
{
    if (l == NULL || l->in_cb)
        return;
    l->done = true;
    mta_sts_release(l);
}
