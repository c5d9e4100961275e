/*
 * tls — OpenSSL contexts (SSL_CTX) for the server and the delivery client.
 *
 * Server: one SSL_CTX per configured certificate (tls.cert/tls.key first,
 * then tls.certificates); the first is the default, the others are switched
 * to from the SNI callback when the client's server name matches the
 * certificate (X509_check_host). Every one has the same protocol settings.
 *
 * Client: one SSL_CTX with the system trust store, SSL_VERIFY_NONE (OpenSSL
 * still verifies the chain and, with SSL_set1_host, the name: the result is
 * read after the handshake with SSL_get_verify_result and the policy is
 * the engine's), DANE enabled on the context for later use, and a session
 * cache of our own: OpenSSL's internal client cache is keyed by nothing
 * useful, so new sessions come to tls_on_new_session() with the key the
 * connection was made with (SSL ex_data) and tls_ssl_new() sets a cached
 * session on the next connection to the same destination.
 *
 * DANE (tls_client_dane): a context per destination that shares the
 * client SSL_CTX and carries the TLSA records; tls_ssl_new() turns them
 * into SSL_dane_enable/SSL_dane_tlsa_add on the connection.
 *
 * Owns: the SSL_CTXs, the cached SSL_SESSIONs, DANE contexts' records. Contexts are refcounted; a
 * conn holds a reference while its SSL object lives, so the new-session
 * callback always finds its context.
 */
#include "tls.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>

#include "config.h"
#include "dane.h" /* struct dane_tlsa only: no dane module code */
#include "util.h"

/* Mozilla "intermediate" for TLS 1.2; TLS 1.3 suites are OpenSSL's. */
#define TLS_SERVER_CIPHERS                                                                         \
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384:"     \
    "ECDHE-RSA-AES256-GCM-SHA384:ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305:"       \
    "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384:DHE-RSA-CHACHA20-POLY1305"

#define TLS_SESSION_ID_CONTEXT "petrel"

struct tls_cache_entry {
    char *key;         /* owned: "name[ip]:port" */
    SSL_SESSION *sess; /* owned reference */
    uint64_t stamp;    /* when stored: the oldest goes first */
};

struct tls_ctx {
    int refs;
    bool server;
    SSL_CTX **ctxs; /* owned: [0] default; server: one per certificate */
    X509 **leafs;   /* borrowed from ctxs[i]: their certificates (server) */
    size_t nctxs;
    struct tls_cache_entry *cache; /* owned (client) */
    size_t ncache;
    uint64_t stamp;
    struct dane_tlsa *tlsa; /* owned copies (DANE context); NULL otherwise */
    size_t ntlsa;
};

static int tls_key_index = -1; /* SSL ex_data: the cache key (char *, owned) */

static void
tls_key_free(void *parent, void *ptr, CRYPTO_EX_DATA *ad, int idx, long argl, void *argp)
{
    (void)parent;
    (void)ad;
    (void)idx;
    (void)argl;
    (void)argp;
    free(ptr);
}

static void
tls_init_once(void)
{
    if (tls_key_index >= 0)
        return;
    tls_key_index = SSL_get_ex_new_index(0, NULL, NULL, NULL, tls_key_free);
    if (tls_key_index < 0)
        PANIC("SSL_get_ex_new_index failed");
}

void
tls_error_text(char *out, size_t size)
{
    unsigned long e = ERR_get_error();
    if (size == 0)
        return;
    out[0] = '\0';
    if (e != 0) {
        const char *reason = ERR_reason_error_string(e);
        if (reason != NULL)
            snprintf(out, size, "%s", reason);
        else
            ERR_error_string_n(e, out, size);
    }
    ERR_clear_error();
}

/* "what path: reason" for a failed load, as *err. */
static char *
tls_load_error(const char *what, const char *path)
{
    char reason[256];
    tls_error_text(reason, sizeof(reason));
    return xasprintf("%s %s: %s", what, path, reason[0] ? reason : "cannot load");
}

static void
tls_ctx_common(SSL_CTX *ctx)
{
    SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_RENEGOTIATION | SSL_OP_NO_COMPRESSION);
    /* memory BIOs: SSL_write never blocks halfway, but a moving buffer is fine */
    SSL_CTX_set_mode(ctx, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
}

static struct tls_ctx *
tls_ctx_alloc(bool server, size_t n)
{
    tls_init_once();
    struct tls_ctx *t = xcalloc(1, sizeof(*t));
    t->refs = 1;
    t->server = server;
    t->ctxs = xcalloc(n, sizeof(*t->ctxs));
    t->leafs = xcalloc(n, sizeof(*t->leafs));
    return t;
}

static void
tls_ctx_destroy(struct tls_ctx *t)
{
    for (size_t i = 0; i < t->nctxs; i++)
        SSL_CTX_free(t->ctxs[i]);
    for (size_t i = 0; i < t->ncache; i++) {
        free(t->cache[i].key);
        SSL_SESSION_free(t->cache[i].sess);
    }
    free(t->cache);
    for (size_t i = 0; i < t->ntlsa; i++)
        free(t->tlsa[i].data);
    free(t->tlsa);
    free(t->ctxs);
    free(t->leafs);
    free(t);
}

struct tls_ctx *
tls_ref(struct tls_ctx *t)
{
    t->refs++;
    return t;
}

void
tls_unref(struct tls_ctx *t)
{
    if (t == NULL || --t->refs > 0)
        return;
    tls_ctx_destroy(t);
}

bool
tls_is_server(const struct tls_ctx *t)
{
    return t->server;
}

size_t
tls_cache_count(const struct tls_ctx *t)
{
    return t->ncache;
}

/* ---- server -------------------------------------------------------------- */

/* SNI (RFC 6066 3): switch to the certificate that names the host the
 * client asked for; no match (or no SNI) keeps the default. */
static int
tls_on_servername(SSL *ssl, int *alert, void *arg)
{
    (void)alert;
    struct tls_ctx *t = arg;
    const char *name = SSL_get_servername(ssl, TLSEXT_NAMETYPE_host_name);
    if (name == NULL || name[0] == '\0' || t->nctxs < 2)
        return SSL_TLSEXT_ERR_OK;
    size_t len = strlen(name);
    if (X509_check_host(t->leafs[0], name, len, 0, NULL) == 1)
        return SSL_TLSEXT_ERR_OK;
    for (size_t i = 1; i < t->nctxs; i++) {
        if (X509_check_host(t->leafs[i], name, len, 0, NULL) == 1) {
            SSL_set_SSL_CTX(ssl, t->ctxs[i]);
            break;
        }
    }
    return SSL_TLSEXT_ERR_OK;
}

static SSL_CTX *
tls_server_ctx_load(const char *cert, const char *key, X509 **leaf, char **err)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL) {
        *err = tls_load_error("SSL_CTX_new", "(server)");
        return NULL;
    }
    tls_ctx_common(ctx);
    SSL_CTX_set_options(ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
    if (SSL_CTX_set_cipher_list(ctx, TLS_SERVER_CIPHERS) != 1) {
        *err = tls_load_error("cipher list", TLS_SERVER_CIPHERS);
        goto fail;
    }
    SSL_CTX_set_dh_auto(ctx, 1);
    SSL_CTX_set_session_id_context(ctx, (const unsigned char *)TLS_SESSION_ID_CONTEXT,
                                   sizeof(TLS_SESSION_ID_CONTEXT) - 1);
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) {
        *err = tls_load_error("tls.cert", cert);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) {
        *err = tls_load_error("tls.key", key);
        goto fail;
    }
    if (SSL_CTX_check_private_key(ctx) != 1) {
        *err = tls_load_error("tls.key", key);
        goto fail;
    }
    *leaf = SSL_CTX_get0_certificate(ctx);
    return ctx;
fail:
    SSL_CTX_free(ctx);
    return NULL;
}

struct tls_ctx *
tls_server_new(const struct petrel_config *cfg, char **err)
{
    *err = NULL;
    if (cfg->tls.cert == NULL || cfg->tls.key == NULL) {
        *err = xstrdup("tls.cert and tls.key are not set");
        return NULL;
    }
    size_t n = 1 + cfg->tls.ncertificates;
    struct tls_ctx *t = tls_ctx_alloc(true, n);
    for (size_t i = 0; i < n; i++) {
        const char *cert = i == 0 ? cfg->tls.cert : cfg->tls.certificates[i - 1].cert;
        const char *key = i == 0 ? cfg->tls.key : cfg->tls.certificates[i - 1].key;
        SSL_CTX *ctx = tls_server_ctx_load(cert, key, &t->leafs[i], err);
        if (ctx == NULL) {
            tls_ctx_destroy(t);
            return NULL;
        }
        t->ctxs[t->nctxs++] = ctx;
        SSL_CTX_set_tlsext_servername_callback(ctx, tls_on_servername);
        SSL_CTX_set_tlsext_servername_arg(ctx, t);
    }
    return t;
}

/* ---- client -------------------------------------------------------------- */

/* The newest (newest: true) or the oldest session cached under key, or
 * NULL; *count gets how many there are (may be NULL). */
static struct tls_cache_entry *
tls_cache_find(struct tls_ctx *t, const char *key, bool newest, size_t *count)
{
    struct tls_cache_entry *found = NULL;
    size_t n = 0;
    for (size_t i = 0; i < t->ncache; i++) {
        struct tls_cache_entry *e = &t->cache[i];
        if (strcmp(e->key, key) != 0)
            continue;
        n++;
        if (found == NULL || (newest ? e->stamp > found->stamp : e->stamp < found->stamp))
            found = e;
    }
    if (count != NULL)
        *count = n;
    return found;
}

static void
tls_cache_drop(struct tls_ctx *t, struct tls_cache_entry *e)
{
    free(e->key);
    SSL_SESSION_free(e->sess);
    *e = t->cache[--t->ncache];
}

/* A new session (TLS 1.2 after the handshake, TLS 1.3 with each ticket):
 * kept under the connection's key. TLS 1.3 tickets are single-use, so up
 * to TLS_CLIENT_TICKETS_PER_DEST of them are kept per destination (servers
 * send two per handshake by default): connections opened together to one
 * MX can each resume; beyond that the oldest is replaced. A TLS 1.2 session
 * replaces the one before. Returns 1: the cache keeps the reference OpenSSL
 * gave us. */
static int
tls_on_new_session(SSL *ssl, SSL_SESSION *sess)
{
    struct tls_ctx *t = SSL_CTX_get_app_data(SSL_get_SSL_CTX(ssl));
    const char *key = SSL_get_ex_data(ssl, tls_key_index);
    if (t == NULL || key == NULL || !SSL_SESSION_is_resumable(sess))
        return 0;
    size_t have = 0;
    struct tls_cache_entry *e = tls_cache_find(t, key, false, &have);
    bool ticket = SSL_SESSION_get_protocol_version(sess) >= TLS1_3_VERSION;
    if (e != NULL && (!ticket || have >= TLS_CLIENT_TICKETS_PER_DEST)) {
        SSL_SESSION_free(e->sess); /* replace the oldest of this destination */
    } else {
        if (t->ncache == TLS_CLIENT_CACHE_MAX) {
            struct tls_cache_entry *old = &t->cache[0];
            for (size_t i = 1; i < t->ncache; i++) {
                if (t->cache[i].stamp < old->stamp)
                    old = &t->cache[i];
            }
            tls_cache_drop(t, old);
        }
        if (t->cache == NULL)
            t->cache = xcalloc(TLS_CLIENT_CACHE_MAX, sizeof(*t->cache));
        e = &t->cache[t->ncache++];
        e->key = xstrdup(key);
    }
    e->sess = sess;
    e->stamp = ++t->stamp;
    return 1;
}

struct tls_ctx *
tls_client_new(char **err)
{
    *err = NULL;
    struct tls_ctx *t = tls_ctx_alloc(false, 1);
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    if (ctx == NULL) {
        *err = tls_load_error("SSL_CTX_new", "(client)");
        tls_ctx_destroy(t);
        return NULL;
    }
    t->ctxs[t->nctxs++] = ctx;
    tls_ctx_common(ctx);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_NONE, NULL);
    /* a missing system store only makes every peer unverified */
    if (SSL_CTX_set_default_verify_paths(ctx) != 1)
        ERR_clear_error();
    if (SSL_CTX_dane_enable(ctx) <= 0)
        ERR_clear_error();
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_CLIENT | SSL_SESS_CACHE_NO_INTERNAL_STORE);
    SSL_CTX_sess_set_new_cb(ctx, tls_on_new_session);
    SSL_CTX_set_app_data(ctx, t);
    return t;
}

struct tls_ctx *
tls_client_shared(char **err)
{
    static struct tls_ctx *shared;
    static bool failed;
    *err = NULL;
    if (shared == NULL && !failed) {
        shared = tls_client_new(err);
        failed = shared == NULL;
    }
    return shared;
}

struct tls_ctx *
tls_client_dane(struct tls_ctx *base, const struct dane_tlsa *tlsa, size_t n, char **err)
{
    *err = NULL;
    if (base->server || n == 0) {
        *err = xstrdup("DANE needs a client context and TLSA records");
        return NULL;
    }
    struct tls_ctx *t = tls_ctx_alloc(false, 1);
    if (SSL_CTX_up_ref(base->ctxs[0]) != 1) {
        *err = tls_load_error("SSL_CTX_up_ref", "(client)");
        tls_ctx_destroy(t);
        return NULL;
    }
    t->ctxs[t->nctxs++] = base->ctxs[0];
    t->tlsa = xcalloc(n, sizeof(*t->tlsa));
    for (size_t i = 0; i < n; i++) {
        t->tlsa[i] = tlsa[i];
        t->tlsa[i].data = xmalloc(tlsa[i].len ? tlsa[i].len : 1);
        memcpy(t->tlsa[i].data, tlsa[i].data, tlsa[i].len);
    }
    t->ntlsa = n;
    return t;
}

/* ---- connections --------------------------------------------------------- */

/* RFC 7672 3.1: DANE for this connection; name is the TLSA base domain
 * (the MX host name), also the SNI name and the reference identifier for
 * DANE-TA(2) chains. Returns false if OpenSSL took no record. */
static bool
tls_ssl_dane(SSL *ssl, const struct tls_ctx *t, const char *name)
{
    if (name == NULL || name[0] == '\0' || SSL_dane_enable(ssl, name) <= 0)
        return false;
    /* RFC 7672 3.1.1: a DANE-EE(3) match authenticates without name checks */
    SSL_dane_set_flags(ssl, DANE_FLAG_NO_DANE_EE_NAMECHECKS);
    size_t added = 0;
    for (size_t i = 0; i < t->ntlsa; i++) {
        const struct dane_tlsa *r = &t->tlsa[i];
        if (SSL_dane_tlsa_add(ssl, r->usage, r->selector, r->mtype, r->data, r->len) > 0)
            added++;
    }
    return added > 0;
}

static bool
tls_is_ip_literal(const char *name)
{
    unsigned char bin[16];
    return inet_pton(AF_INET, name, bin) == 1 || inet_pton(AF_INET6, name, bin) == 1;
}

struct ssl_st *
tls_ssl_new(struct tls_ctx *t, const char *name, const char *cache_key, char *err, size_t size)
{
    ERR_clear_error();
    SSL *ssl = SSL_new(t->ctxs[0]);
    if (ssl == NULL) {
        tls_error_text(err, size);
        return NULL;
    }
    if (t->server)
        return ssl;
    if (t->tlsa != NULL) {
        if (!tls_ssl_dane(ssl, t, name)) {
            tls_error_text(err, size);
            if (err[0] == '\0')
                snprintf(err, size, "no usable TLSA record for %s", name ? name : "(no name)");
            SSL_free(ssl);
            return NULL;
        }
        return ssl; /* no session cache: each DANE handshake is verified */
    }
    if (name != NULL && name[0] != '\0' && tls_is_ip_literal(name)) {
        /* RFC 6066 3: no IP literals in SNI; check the certificate's IP SAN */
        if (X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), name) != 1)
            ERR_clear_error();
    } else if (name != NULL && name[0] != '\0') {
        if (SSL_set_tlsext_host_name(ssl, name) != 1)
            ERR_clear_error(); /* a name OpenSSL refuses as SNI: go without */
        SSL_set_hostflags(ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        if (SSL_set1_host(ssl, name) != 1)
            ERR_clear_error();
    }
    if (cache_key != NULL) {
        char *key = xstrdup(cache_key);
        if (SSL_set_ex_data(ssl, tls_key_index, key) != 1) {
            free(key);
            ERR_clear_error();
        }
        struct tls_cache_entry *e = tls_cache_find(t, cache_key, true, NULL);
        if (e != NULL) {
            if (SSL_set_session(ssl, e->sess) != 1)
                ERR_clear_error();
            /* RFC 8446 C.4: a TLS 1.3 ticket is used once; fresh ones come
             * with the new connection */
            if (SSL_SESSION_get_protocol_version(e->sess) >= TLS1_3_VERSION)
                tls_cache_drop(t, e);
        }
    }
    return ssl;
}
