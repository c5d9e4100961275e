/*
 * mta_sts — SMTP MTA Strict Transport Security (RFC 8461) for outbound
 * delivery: for a next-hop domain, is there a policy, and which?
 *
 * A lookup asks the TXT record _mta-sts.<domain> (dns.h); a record
 * "v=STSv1; id=..." says the domain has a policy. If a policy of that
 * domain with the same id is cached and not expired (max_age), it is used;
 * otherwise it is fetched from https://mta-sts.<domain>/.well-known/
 * mta-sts.txt (HTTP/1.1 GET over conn.h with TLS, the certificate verified
 * (PKIX, system trust store or SSL_CERT_FILE) for mta-sts.<domain>, no
 * redirects, at most MTA_STS_MAX_BODY bytes, a deadline) and cached in
 * memory until max_age. Without a TXT record or when the fetch fails, a
 * cached unexpired policy still applies (RFC 8461 5.1); else there is none.
 *
 * This header is the seam: smtp_client tests link tests/unit/fakes/
 * fake_mta_sts.c instead of mta_sts.c; the pure helpers at the end are
 * mta_sts.c's own and tested in tests/unit/test_mta_sts.c.
 */
#ifndef PETREL_MTA_STS_H
#define PETREL_MTA_STS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct uv_loop_s;
struct dns;
struct mta_sts_lookup;

#define MTA_STS_MAX_BODY 65536 /* policy bodies are at most 64 KiB (RFC 8461 3.3) */
#define MTA_STS_MAX_MX 64      /* mx patterns kept per policy */
#define MTA_STS_MAX_AGE 31557600 /* seconds: a larger max_age is capped (RFC 8461 3.2) */

enum mta_sts_mode {
    MTA_STS_MODE_NONE,    /* "none": no policy applies */
    MTA_STS_MODE_TESTING, /* report what would fail, deliver as usual */
    MTA_STS_MODE_ENFORCE, /* only listed MX hosts, with TLS verified for their names */
};

struct mta_sts_policy {
    enum mta_sts_mode mode;
    char mx[MTA_STS_MAX_MX][256]; /* patterns as written, lower case ("*.example.org") */
    size_t nmx;
    uint64_t max_age_s;
};

enum mta_sts_status {
    MTA_STS_NO_POLICY,    /* no TXT record (or not STSv1) and nothing cached */
    MTA_STS_POLICY,       /* a policy applies (fresh or cached): see its mode */
    MTA_STS_FETCH_FAILED, /* the TXT record says there is one, the fetch failed, nothing
                           * cached: behave as without a policy */
};

struct mta_sts_result {
    enum mta_sts_status status;
    struct mta_sts_policy policy; /* MTA_STS_POLICY only */
    char id[33];                  /* the policy id ("" if unknown) */
    char detail[192];             /* for logs: "no _mta-sts.example.org TXT record",
                                   * "HTTP status 404", "certificate: hostname mismatch" */
};

/* Fires exactly once per lookup, from a loop callback (never inside
 * mta_sts_lookup_start), unless cancelled first. res is borrowed for the
 * call; the lookup is freed after the callback returns. */
typedef void mta_sts_lookup_cb(struct mta_sts_lookup *l, const struct mta_sts_result *res,
                               void *arg);

/* Starts the lookup of domain's policy (copied). dns is borrowed and must
 * outlive the lookup; timeout_ms bounds the HTTPS fetch (0: 10 s). Never
 * returns NULL. */
struct mta_sts_lookup *mta_sts_lookup_start(struct uv_loop_s *loop, struct dns *dns,
                                            const char *domain, uint64_t timeout_ms,
                                            mta_sts_lookup_cb *cb, void *arg);
/* The callback will not fire; l is invalid afterwards. A no-op for NULL
 * and inside its own callback. */
void mta_sts_lookup_cancel(struct mta_sts_lookup *l);

/* Drops every cached policy (tests, shutdown). */
void mta_sts_cache_clear(void);

/* "none", "testing", "enforce". */
const char *mta_sts_mode_name(enum mta_sts_mode mode);

/* Whether host (an MX host name, any case, an optional trailing dot) is
 * listed by one of p's mx patterns (RFC 8461 4.1). */
bool mta_sts_policy_match(const struct mta_sts_policy *p, const char *host);

/* ---- Internal to mta_sts.c, exported for tests/unit/test_mta_sts.c only. ---- */

/* Parses one TXT record (its strings concatenated): "v=STSv1" first, then
 * "; "-separated fields, one of them id=1*32(ALPHA / DIGIT) (RFC 8461
 * 3.1). Returns true and the id in id (size bytes), or false. */
bool mta_sts_txt_parse(const char *txt, char *id, size_t size);

/* Parses a policy body (RFC 8461 3.2: "key: value" lines ended by CRLF or
 * LF; version STSv1, mode, max_age 0..10 digits, one mx per line unless
 * mode is none). Unknown keys are ignored. Returns NULL and *p filled, or
 * a static reason ("missing version", "bad max_age", …). */
const char *mta_sts_policy_parse(const char *text, size_t len, struct mta_sts_policy *p);

/* One mx pattern against a host (lower case, no trailing dot): equal, or
 * "*.rest" and host is one label followed by ".rest" (RFC 8461 4.1). */
bool mta_sts_mx_match(const char *pattern, const char *host);

/* Parses an HTTP/1.1 response held in full in resp (len bytes): status 200,
 * no Transfer-Encoding other than identity, a body of Content-Length bytes
 * (or up to the end), media type text/plain. Returns NULL and the body in *body and *body_len
 * (pointing into resp), or a reason into why (size bytes; "HTTP status
 * 404"). */
const char *mta_sts_http_parse(const char *resp, size_t len, const char **body,
                               size_t *body_len, char *why, size_t size);

#endif
