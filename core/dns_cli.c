/*
 * dns_cli — the `petrel dns-lookup` command: one lookup through dns.h on a
 * private loop, printed for an administrator (format in dns_cli.h).
 */
#include "dns_cli.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdlib.h>
#include <uv.h>

#include "config.h"
#include "dns.h"

struct dns_cli_state {
    const char *domain; /* borrowed from the caller */
    bool host_only;
    FILE *out; /* borrowed */
    bool done;
    int rc;
};

static void
dns_cli_print_addr(FILE *out, const struct dns_addr *a)
{
    char ip[INET6_ADDRSTRLEN] = "?";
    if (a->ss.ss_family == AF_INET)
        inet_ntop(AF_INET, &((const struct sockaddr_in *)&a->ss)->sin_addr, ip, sizeof(ip));
    else if (a->ss.ss_family == AF_INET6)
        inet_ntop(AF_INET6, &((const struct sockaddr_in6 *)&a->ss)->sin6_addr, ip, sizeof(ip));
    fprintf(out, " %s", ip);
}

static void
dns_cli_on_result(struct dns_query *q, enum dns_status status, const struct dns_result *res,
                  const char *detail, void *arg)
{
    struct dns_cli_state *st = arg;
    st->done = true;
    if (status != DNS_OK) {
        const char *esc = dns_status_esc(status, res);
        fprintf(st->out, "%s: %s failure (%s): %s", st->domain,
                esc[0] == '5' ? "permanent" : "temporary", esc,
                detail ? detail : dns_status_name(status));
        if (status == DNS_NO_ADDRESS && res != NULL && res->mx) {
            fprintf(st->out, " (");
            for (size_t i = 0; i < res->nhosts; i++)
                fprintf(st->out, "%s%s", i ? ", " : "", res->hosts[i].name);
            fprintf(st->out, ")");
        }
        fprintf(st->out, "\n");
        st->rc = 1;
        return;
    }
    const char *kind = st->host_only      ? "host"
                       : res->implicit_mx ? "implicit MX (no MX record)"
                                          : "MX";
    fprintf(st->out, "%s: %s%s\n", st->domain, kind, res->secure ? " (DNSSEC secure)" : "");
    for (size_t i = 0; i < res->nhosts; i++) {
        const struct dns_host *h = &res->hosts[i];
        fprintf(st->out, "  %u %s", h->pref, h->name);
        for (size_t j = 0; j < h->naddrs; j++)
            dns_cli_print_addr(st->out, &h->addrs[j]);
        fprintf(st->out, "\n");
    }
    st->rc = 0;
}

int
dns_cli_lookup(const struct petrel_config *cfg, const char *domain, bool host_only, FILE *out,
               FILE *err)
{
    uv_loop_t loop;
    int r = uv_loop_init(&loop);
    if (r != 0) {
        fprintf(err, "petrel: event loop: %s\n", uv_strerror(r));
        return 1;
    }
    struct dns *d = NULL;
    char *why = NULL;
    if (dns_open(&loop, cfg, &d, &why) != 0) {
        fprintf(err, "petrel: %s\n", why ? why : "dns: cannot open the resolver");
        free(why);
        uv_loop_close(&loop);
        return 1;
    }
    struct dns_cli_state st = {.domain = domain, .host_only = host_only, .out = out, .rc = 1};
    if (host_only)
        dns_resolve_host(d, domain, dns_cli_on_result, &st);
    else
        dns_resolve_mx(d, domain, dns_cli_on_result, &st);
    /* The query's deadline timer keeps the loop alive until the callback
     * has fired; dns_close() then lets the handles close. */
    uv_run(&loop, UV_RUN_DEFAULT);
    if (!st.done) {
        fprintf(err, "petrel: dns-lookup: the lookup did not complete\n");
        st.rc = 1;
    }
    dns_close(d);
    uv_run(&loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&loop) != 0)
        fprintf(err, "petrel: dns-lookup: event loop closed with live handles\n");
    return st.rc;
}
