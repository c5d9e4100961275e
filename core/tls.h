/*
 * tls — OpenSSL 3 contexts for petrel's two TLS roles: the server side of
 * STARTTLS and implicit-TLS listeners (certificates from the config, chosen
 * by SNI), and the delivery client (trust store, verification name, session
 * cache for resumption). An edge (STYLE.md §1): engines create and drop
 * contexts here and hand them to conn_start_tls(); only conn.c and this
 * module touch OpenSSL objects.
 */
#ifndef PETREL_TLS_H
#define PETREL_TLS_H

#include <stdbool.h>
#include <stddef.h>

struct petrel_config;
struct ssl_st;
struct tls_ctx;

/* The server context: the certificate chain and key in tls.cert/tls.key
 * (PEM, the chain after the leaf), plus each of tls.certificates, chosen
 * when the client's SNI matches one of its names (else tls.cert). TLS 1.2
 * and 1.3 only, ECDHE/DHE with AEAD ciphers for TLS 1.2 (OpenSSL's TLS 1.3
 * suites), no renegotiation, no compression; session tickets on.
 * cfg->tls.cert must be set. Returns a context (one reference), or NULL and
 * *err (owned: "tls.cert /path: <OpenSSL reason>"). Reads files: start-up only. */
struct tls_ctx *tls_server_new(const struct petrel_config *cfg, char **err)
    __attribute__((warn_unused_result));

/* A delivery client context: TLS 1.2+, the system trust store (OpenSSL's
 * default paths; SSL_CERT_FILE / SSL_CERT_DIR are honoured), verification
 * done but not enforced (the result is reported, the caller decides), and a
 * session cache keyed by destination (up to TLS_CLIENT_CACHE_MAX entries,
 * least recently stored dropped first; a TLS 1.3 ticket is used once).
 * Returns a context (one reference), or NULL and *err (owned). */
#define TLS_CLIENT_CACHE_MAX 1024
/* TLS 1.3 tickets kept per destination (each is used once). */
#define TLS_CLIENT_TICKETS_PER_DEST 4
struct tls_ctx *tls_client_new(char **err) __attribute__((warn_unused_result));

/* The process's shared delivery client context, made on first use (NULL if
 * that failed: *err, owned, says why, once). Lives until the process exits;
 * conn holds its own reference while a connection uses it. */
struct tls_ctx *tls_client_shared(char **err);

/* A delivery context for one DANE-authenticated destination (RFC 7672):
 * base's SSL_CTX (one more reference on it) with copies of the n TLSA
 * records (n ≥ 1, usable per dane_tlsa_usable()). Its connections enable
 * DANE with the name given to tls_ssl_new (SNI and TLSA base domain;
 * SSL_dane_enable), add the records (SSL_dane_tlsa_add), skip name checks
 * for DANE-EE(3) matches (RFC 7672 3.1.1), and neither resume nor cache
 * sessions, so every handshake is verified afresh. The verification result
 * comes as usual (conn_tls_info: verified, verify = "ok" or OpenSSL's
 * reason, e.g. "no matching DANE TLSA records"). Returns a context (one
 * reference), or NULL and *err (owned). */
struct dane_tlsa;
struct tls_ctx *tls_client_dane(struct tls_ctx *base, const struct dane_tlsa *tlsa, size_t n,
                                char **err) __attribute__((warn_unused_result));

/* Reference counting: a conn keeps its context alive while its SSL object
 * lives. tls_unref(NULL) is a no-op. */
struct tls_ctx *tls_ref(struct tls_ctx *t);
void tls_unref(struct tls_ctx *t);

bool tls_is_server(const struct tls_ctx *t);
/* Entries in a client context's session cache (tests). */
size_t tls_cache_count(const struct tls_ctx *t);

/* For conn.c: a new SSL object for one connection (no BIOs yet). A client
 * one sends name as SNI (unless it is an IP literal) and checks the
 * certificate against it (name NULL or "": no name check), and resumes
 * the session cached under cache_key if there is one; new sessions are
 * stored under cache_key (NULL: no caching). Returns NULL and the reason
 * in err (size bytes) on failure. */
struct ssl_st *tls_ssl_new(struct tls_ctx *t, const char *name, const char *cache_key, char *err,
                           size_t size);

/* The reason of the oldest queued OpenSSL error of this thread ("" if
 * none) into out; the queue is cleared. */
void tls_error_text(char *out, size_t size);

#endif
