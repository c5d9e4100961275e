/*
 * hello — a minimal petrel plugin, to copy from.
 *
 * It logs every connection, and refuses mail from one sender domain (and
 * its subdomains) given in its config:
 *
 *   plugins:
 *     - path: /path/to/hello.so
 *       config:
 *         reject_domain: spam.example
 *
 * Build it with nothing but petrel's public header:
 *
 *   cc -shared -fPIC -I/path/to/petrel/include -o hello.so hello.c
 *
 * The whole contract is include/petrel/plugin.h: export
 * petrel_plugin_init(), fill struct petrel_plugin, read the call through
 * the host's accessors and answer through its setters.
 */
#include <stdlib.h>
#include <string.h>

#include <petrel/plugin.h>

/* Per-instance state: petrel passes it to every handler and to unload.
 * (Globals would be shared if the same .so were listed twice.) */
struct hello {
    const struct petrel_host *host; /* valid until unload */
    char *reject_domain;            /* NULL: refuse nobody */
};

/* ASCII case-insensitive comparison (the locale must not matter). */
static int
hello_casecmp(const char *a, const char *b)
{
    for (;; a++, b++) {
        int ca = (*a >= 'A' && *a <= 'Z') ? *a + 32 : *a;
        int cb = (*b >= 'A' && *b <= 'Z') ? *b + 32 : *b;
        if (ca != cb || ca == 0)
            return ca - cb;
    }
}

/* connect: log who it is; no objection. Strings from the host are only
 * valid during the call. */
static int
hello_on_connect(struct petrel_ctx *ctx, void *data)
{
    struct hello *h = data;
    const char *ip = h->host->client_ip(ctx);
    h->host->ctx_log(ctx, PETREL_LOG_INFO, "hello, %s port %d on listener %s",
                     ip != NULL ? ip : "(unix socket)", h->host->client_port(ctx),
                     h->host->listener(ctx) != NULL ? h->host->listener(ctx) : "?");
    return PETREL_OK; /* no set_verdict: CONTINUE */
}

/* mail_from: refuse sender@reject_domain and sender@*.reject_domain. */
static int
hello_on_mail_from(struct petrel_ctx *ctx, void *data)
{
    struct hello *h = data;
    const char *sender = h->host->sender(ctx);
    const char *at = sender != NULL ? strrchr(sender, '@') : NULL;
    if (at == NULL) /* the null sender <> or a local name */
        return PETREL_OK;
    const char *domain = at + 1;
    size_t dl = strlen(domain), rl = strlen(h->reject_domain);
    int match = hello_casecmp(domain, h->reject_domain) == 0 ||
                (dl > rl && domain[dl - rl - 1] == '.' &&
                 hello_casecmp(domain + dl - rl, h->reject_domain) == 0);
    if (match)
        /* 5xx with an enhanced status code of the same class (RFC 3463) */
        h->host->set_verdict(ctx, PETREL_VERDICT_REJECT, 550,
                             "5.7.1 Mail from this domain is not accepted here");
    return PETREL_OK;
}

static void
hello_unload(void *data)
{
    struct hello *h = data;
    free(h->reject_domain);
    free(h);
}

int
petrel_plugin_init(const struct petrel_host *host, struct petrel_plugin *p)
{
    struct hello *h = calloc(1, sizeof(*h));
    if (h == NULL)
        return -1;
    h->host = host;
    const char *d = host->config(host, "reject_domain");
    if (d != NULL && d[0] != '\0') {
        h->reject_domain = strdup(d);
        if (h->reject_domain == NULL) {
            free(h);
            return -1;
        }
    }
    p->abi_version = PETREL_PLUGIN_ABI_VERSION; /* petrel checks both */
    p->size = sizeof(*p);
    p->name = "hello";
    p->data = h;
    p->unload = hello_unload;
    p->handlers[PETREL_HOOK_CONNECT] = hello_on_connect;
    if (h->reject_domain != NULL) /* no handler: petrel does not even call */
        p->handlers[PETREL_HOOK_MAIL_FROM] = hello_on_mail_from;
    host->log(host, PETREL_LOG_INFO, "ready; refusing mail from %s",
              h->reject_domain != NULL ? h->reject_domain : "nobody");
    return 0;
}
