/*
 * header_stamp — a petrel plugin adding one header to every message it
 * receives (data hook), e.g. to mark mail that passed through this relay.
 *
 *   plugins:
 *     - path: /usr/lib/petrel/plugins/header_stamp.so
 *       config:
 *         name: X-Relayed-By
 *         value: "petrel %{queue_id} for %{client_ip}"
 *
 * value may use %{queue_id}, %{client_ip}, %{helo}, %{sender},
 * %{listener} and %{local_ip}; "%%" is a '%'. A field the message does not
 * have (no client IP on a unix socket) expands to "unknown". Control
 * characters coming from the client (in %{helo}, %{sender}) become '?', and
 * the value is cut at 900 bytes. An unknown %{…} or an invalid header name
 * refuses to load.
 *
 * Everything lives in the instance (p->data): list it twice to add two
 * headers. It never blocks and answers at once.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <petrel/plugin.h>

#define HS_NAME_MAX 76
#define HS_VALUE_MAX 900

enum hs_var { HS_LITERAL, HS_QUEUE_ID, HS_CLIENT_IP, HS_HELO, HS_SENDER, HS_LISTENER, HS_LOCAL_IP };

static const char *const hs_var_names[] = {
    [HS_QUEUE_ID] = "queue_id", [HS_CLIENT_IP] = "client_ip", [HS_HELO] = "helo",
    [HS_SENDER] = "sender",     [HS_LISTENER] = "listener",   [HS_LOCAL_IP] = "local_ip",
};

struct hs_part {
    enum hs_var var;
    char *text; /* owned: HS_LITERAL's text */
};

struct hs {
    const struct petrel_host *host; /* borrowed, valid until unload */
    char *name;                     /* owned */
    struct hs_part *parts;          /* owned */
    size_t nparts;
};

static void
hs_free(struct hs *hs)
{
    for (size_t i = 0; i < hs->nparts; i++)
        free(hs->parts[i].text);
    free(hs->parts);
    free(hs->name);
    free(hs);
}

static bool
hs_name_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > HS_NAME_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 33 || (unsigned char)s[i] > 126 || s[i] == ':')
            return false;
    return true;
}

static int
hs_add_part(struct hs *hs, enum hs_var var, const char *text, size_t len)
{
    struct hs_part *np = realloc(hs->parts, (hs->nparts + 1) * sizeof(*np));
    if (np == NULL)
        return -1;
    hs->parts = np;
    struct hs_part *p = &hs->parts[hs->nparts];
    p->var = var;
    p->text = NULL;
    if (var == HS_LITERAL) {
        p->text = malloc(len + 1);
        if (p->text == NULL)
            return -1;
        memcpy(p->text, text, len);
        p->text[len] = '\0';
    }
    hs->nparts++;
    return 0;
}

/* Splits the template into literal runs and %{var} references. */
static int
hs_compile(struct hs *hs, const char *tpl)
{
    const struct petrel_host *host = hs->host;
    char *lit = malloc(strlen(tpl) + 1);
    if (lit == NULL)
        return -1;
    size_t n = 0;
    int rc = 0;
    for (const char *s = tpl; *s != '\0' && rc == 0; s++) {
        if ((unsigned char)*s < 32 && *s != '\t') {
            host->log(host, PETREL_LOG_ERROR, "value: control character in the template");
            rc = -1;
        } else if (s[0] == '%' && s[1] == '%') {
            lit[n++] = '%';
            s++;
        } else if (s[0] == '%' && s[1] == '{') {
            const char *end = strchr(s + 2, '}');
            size_t len = end != NULL ? (size_t)(end - (s + 2)) : 0;
            enum hs_var var = HS_LITERAL;
            for (size_t v = HS_QUEUE_ID; end != NULL && v <= HS_LOCAL_IP; v++)
                if (strlen(hs_var_names[v]) == len && strncmp(hs_var_names[v], s + 2, len) == 0)
                    var = (enum hs_var)v;
            if (var == HS_LITERAL) {
                host->log(host, PETREL_LOG_ERROR,
                          "value: unknown or unclosed %%{...} at \"%s\" (known: queue_id, "
                          "client_ip, helo, sender, listener, local_ip)",
                          s);
                rc = -1;
                break;
            }
            if ((n > 0 && hs_add_part(hs, HS_LITERAL, lit, n) != 0) ||
                hs_add_part(hs, var, NULL, 0) != 0)
                rc = -1;
            n = 0;
            s = end;
        } else {
            lit[n++] = *s;
        }
    }
    if (rc == 0 && n > 0)
        rc = hs_add_part(hs, HS_LITERAL, lit, n);
    free(lit);
    return rc;
}

static const char *
hs_lookup(const struct petrel_host *host, const struct petrel_ctx *ctx, enum hs_var var)
{
    switch (var) {
    case HS_QUEUE_ID:
        return host->queue_id(ctx);
    case HS_CLIENT_IP:
        return host->client_ip(ctx);
    case HS_HELO:
        return host->helo(ctx);
    case HS_SENDER: {
        const char *s = host->sender(ctx);
        return s != NULL && s[0] == '\0' ? "<>" : s;
    }
    case HS_LISTENER:
        return host->listener(ctx);
    case HS_LOCAL_IP:
        return host->local_ip(ctx);
    case HS_LITERAL:
        break;
    }
    return NULL;
}

static int
hs_on_data(struct petrel_ctx *ctx, void *data)
{
    struct hs *hs = data;
    const struct petrel_host *host = hs->host;
    char value[HS_VALUE_MAX + 1];
    size_t n = 0;
    for (size_t i = 0; i < hs->nparts; i++) {
        const struct hs_part *p = &hs->parts[i];
        const char *s = p->var == HS_LITERAL ? p->text : hs_lookup(host, ctx, p->var);
        if (s == NULL)
            s = "unknown";
        for (; *s != '\0' && n < HS_VALUE_MAX; s++) {
            unsigned char ch = (unsigned char)*s;
            value[n++] = (ch < 32 && ch != '\t') || ch == 127 ? '?' : (char)ch;
        }
    }
    value[n] = '\0';
    host->add_header(ctx, hs->name, value);
    return PETREL_OK;
}

static void
hs_unload(void *data)
{
    hs_free(data);
}

int
petrel_plugin_init(const struct petrel_host *host, struct petrel_plugin *p)
{
    if (host->abi_version != PETREL_PLUGIN_ABI_VERSION)
        return -1;
    for (size_t i = 0; host->config_key(host, i) != NULL; i++) {
        const char *k = host->config_key(host, i);
        if (strcmp(k, "name") != 0 && strcmp(k, "value") != 0) {
            host->log(host, PETREL_LOG_ERROR, "unknown config key \"%s\" (known: name, value)", k);
            return -1;
        }
    }
    const char *name = host->config(host, "name");
    const char *value = host->config(host, "value");
    if (name == NULL || value == NULL) {
        host->log(host, PETREL_LOG_ERROR, "config needs name and value");
        return -1;
    }
    if (!hs_name_ok(name)) {
        host->log(host, PETREL_LOG_ERROR,
                  "name: \"%s\" is not a header name (1-%d printable characters, no ':')", name,
                  HS_NAME_MAX);
        return -1;
    }
    struct hs *hs = calloc(1, sizeof(*hs));
    if (hs == NULL)
        return -1;
    hs->host = host;
    hs->name = strdup(name);
    if (hs->name == NULL || hs_compile(hs, value) != 0) {
        hs_free(hs);
        return -1;
    }
    p->abi_version = PETREL_PLUGIN_ABI_VERSION;
    p->size = sizeof(*p);
    p->name = "header_stamp";
    p->data = hs;
    p->unload = hs_unload;
    p->handlers[PETREL_HOOK_DATA] = hs_on_data;
    return 0;
}
