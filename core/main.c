/*
 * main — the petrel command line:
 *   petrel serve [-c FILE]          run the daemon in the foreground
 *   petrel check-config [-c FILE]   validate the configuration
 *   petrel queue list|show ID|cat ID|retry ID|delete ID|flush [-c FILE]
 *   petrel dns-lookup [--host] DOMAIN [-c FILE]
 *   petrel version
 * Without -c the embedded default configuration (config/petrel.yaml) is used.
 * Wires config, spool, smtp_server and listeners onto one libuv loop and
 * handles SIGTERM/SIGINT (graceful stop bounded by shutdown_timeout).
 */
#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "config.h"
#include "dns.h"
#include "dns_cli.h"
#include "listener.h"
#include "log.h"
#include "auth.h"
#include "hooks.h"
#include "lua_bridge.h"
#include "queue_cli.h"
#include "scheduler.h"
#include "smtp_server.h"
#include "spool.h"
#include "util.h"

struct main_daemon {
    uv_loop_t loop;
    struct petrel_config *cfg;     /* owned reference */
    struct spool *spool;           /* owned */
    struct smtpd_server *srv;      /* owned */
    struct listeners *listeners;   /* owned */
    struct dns *dns;               /* owned */
    struct sched *sched;           /* owned */
    struct hooks *hooks;           /* owned: Lua, plugins (milters are per session) */
    struct auth_db *auth_db;       /* owned or NULL: auth.users_file */
    struct auth_verifier *auth_verifier; /* owned */
    struct auth_limiter *auth_limiter;   /* owned */
    const char *config_path;       /* borrowed from argv; NULL: the embedded default */
    bool smtpd_idle;
    bool sched_idle;
    uv_signal_t sigterm;
    uv_signal_t sigint;
    uv_signal_t sighup;
    uv_timer_t shutdown_timer;
    bool stopping;
    bool handles_closed;
};

static void
main_usage(FILE *out)
{
    fprintf(out,
            "usage: petrel serve [-c FILE]\n"
            "       petrel check-config [-c FILE]\n"
            "       petrel queue list [-c FILE]\n"
            "       petrel queue show|cat ID [-c FILE]\n"
            "       petrel queue retry|delete ID [-c FILE]\n"
            "       petrel queue flush [-c FILE]\n"
            "       petrel dns-lookup [--host] DOMAIN [-c FILE]\n"
            "       petrel passwd USER   (prints a users_file line; password on stdin)\n"
            "       petrel version\n"
            "Without -c, the embedded default configuration is used.\n");
}

/* Loads -c FILE or the embedded default; prints errors to stderr. */
static struct petrel_config *
main_load_config(const char *path)
{
    struct petrel_config *cfg = NULL;
    char *errors = NULL;
    int r = path ? config_load_file(path, &cfg, &errors) : config_load_default(&cfg, &errors);
    if (r != 0) {
        fprintf(stderr, "%s", errors ? errors : "config: unknown error\n");
        if (errors && errors[0] && errors[strlen(errors) - 1] != '\n')
            fputc('\n', stderr);
        free(errors);
        return NULL;
    }
    return cfg;
}

static void
main_close_walk(uv_handle_t *h, void *arg)
{
    (void)arg;
    if (!uv_is_closing(h))
        uv_close(h, NULL);
}

static void
main_close_handles(struct main_daemon *d)
{
    if (d->handles_closed)
        return;
    d->handles_closed = true;
    dns_close(d->dns);
    d->dns = NULL;
    uv_close((uv_handle_t *)&d->sigterm, NULL);
    uv_close((uv_handle_t *)&d->sigint, NULL);
    uv_close((uv_handle_t *)&d->sighup, NULL);
    uv_close((uv_handle_t *)&d->shutdown_timer, NULL);
}

/* Exits the loop once both the SMTP sessions and the deliveries are done. */
static void
main_maybe_done(struct main_daemon *d)
{
    if (d->smtpd_idle && d->sched_idle) {
        log_msg(LOG_INFO, NULL, "all sessions ended");
        main_close_handles(d);
    }
}

static void
main_on_idle(void *arg)
{
    struct main_daemon *d = arg;
    d->smtpd_idle = true;
    main_maybe_done(d);
}

static void
main_on_sched_idle(void *arg)
{
    struct main_daemon *d = arg;
    d->sched_idle = true;
    main_maybe_done(d);
}

static void
main_on_queued(const char *qid, void *arg)
{
    struct main_daemon *d = arg;
    sched_enqueue(d->sched, qid);
}

static void
main_on_shutdown_timeout(uv_timer_t *t)
{
    struct main_daemon *d = t->data;
    log_msg(LOG_WARNING, NULL, "shutdown timeout: closing %zu remaining sessions and %zu "
                               "deliveries", smtpd_server_sessions(d->srv), sched_sessions(d->sched));
    smtpd_server_abort_all(d->srv);
    sched_abort(d->sched);
}

static void
main_stop(struct main_daemon *d, const char *why)
{
    if (d->stopping) {
        log_msg(LOG_WARNING, NULL, "%s again: closing every session now", why);
        smtpd_server_abort_all(d->srv);
        sched_abort(d->sched);
        return;
    }
    d->stopping = true;
    log_msg(LOG_INFO, NULL, "%s: stopping (no new connections; %zu sessions finishing)", why,
            smtpd_server_sessions(d->srv));
    listeners_stop(d->listeners);
    smtpd_server_shutdown(d->srv);
    d->smtpd_idle = listeners_sessions(d->listeners) == 0;
    sched_stop(d->sched, main_on_sched_idle, d); /* may report idle at once */
    if (d->smtpd_idle && d->sched_idle)
        return;
    uv_timer_start(&d->shutdown_timer, main_on_shutdown_timeout, d->cfg->shutdown_timeout_ms, 0);
}

/* SIGHUP: reads the configuration again and swaps the Lua script in. If
 * either fails, the running configuration and script stay. Sessions in
 * progress are not touched (calls already running finish on the old
 * script). The lua section is applied and auth.users_file read again;
 * everything else (listeners, spool, relay, delivery, milters, plugins …)
 * is bound at start-up and needs a restart, and the log line says so. */
static void
main_reload(struct main_daemon *d)
{
    struct petrel_config *cfg = NULL;
    char *errors = NULL;
    int r = d->config_path ? config_load_file(d->config_path, &cfg, &errors)
                           : config_load_default(&cfg, &errors);
    if (r != 0) {
        for (char *e = errors; e && *e; e++)
            if (*e == '\n' && e[1] != '\0')
                *e = ' ';
        log_msg(LOG_ERR, NULL, "SIGHUP: reload failed, keeping the running configuration: %s",
                errors ? errors : "?");
        free(errors);
        return;
    }
    char *err = NULL;
    struct auth_db *db = NULL;
    if (cfg->auth.users_file != NULL) {
        db = auth_db_load(cfg->auth.users_file, &err);
        if (db == NULL) {
            log_msg(LOG_ERR, NULL, "SIGHUP: reload failed, keeping the running configuration: "
                                   "auth.users_file: %s",
                    err ? err : "?");
            free(err);
            config_unref(cfg);
            return;
        }
    }
    if (hooks_reload(d->hooks, cfg, &err) != 0) {
        log_msg(LOG_ERR, NULL, "SIGHUP: reload failed, keeping the running script: %s",
                err ? err : "?");
        free(err);
        auth_db_free(db);
        config_unref(cfg);
        return;
    }
    /* checks in progress copied the hash they need: the old file can go */
    auth_db_free(d->auth_db);
    d->auth_db = db;
    smtpd_server_set_auth(d->srv, d->auth_db, d->auth_verifier, d->auth_limiter);
    log_msg(LOG_INFO, NULL, "SIGHUP: reloaded %s: lua section applied (script %s), "
                            "auth.users_file read again (%zu users); changes to other sections "
                            "take effect at restart",
            cfg->file, cfg->lua.script ? cfg->lua.script : "none",
            d->auth_db ? auth_db_count(d->auth_db) : (size_t)0);
    config_unref(cfg);
}

static void
main_on_signal(uv_signal_t *h, int signum)
{
    struct main_daemon *d = h->data;
    if (signum == SIGHUP) {
        main_reload(d);
        return;
    }
    main_stop(d, signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

/* The machine's own non-loopback addresses (IPv6 link-local ones need a
 * scope and are left out), for source selection's last resort. */
static size_t
main_local_addresses(char (**out)[46])
{
    uv_interface_address_t *ifs = NULL;
    int n = 0;
    *out = NULL;
    if (uv_interface_addresses(&ifs, &n) != 0)
        return 0;
    char (*v)[46] = xcalloc((size_t)(n > 0 ? n : 1), sizeof(*v));
    size_t k = 0;
    for (int i = 0; i < n; i++) {
        if (ifs[i].is_internal)
            continue;
        const struct sockaddr *sa = (const struct sockaddr *)&ifs[i].address;
        if (sa->sa_family == AF_INET) {
            uv_ip4_name((const struct sockaddr_in *)sa, v[k], sizeof(v[k]));
        } else if (sa->sa_family == AF_INET6) {
            const struct sockaddr_in6 *s6 = (const struct sockaddr_in6 *)sa;
            if (s6->sin6_addr.s6_addr[0] == 0xfe && (s6->sin6_addr.s6_addr[1] & 0xc0) == 0x80)
                continue;
            uv_ip6_name(s6, v[k], sizeof(v[k]));
        } else {
            continue;
        }
        bool dup = false;
        for (size_t j = 0; j < k; j++)
            dup = dup || strcmp(v[j], v[k]) == 0;
        if (!dup)
            k++;
    }
    uv_free_interface_addresses(ifs, n);
    *out = v;
    return k;
}

static int
main_serve(const char *path)
{
    struct main_daemon d;
    memset(&d, 0, sizeof(d));
    d.config_path = path;
    d.cfg = main_load_config(path);
    if (d.cfg == NULL)
        return 1;
    log_init((enum log_level)d.cfg->log.level, (enum log_format)d.cfg->log.format);
    signal(SIGPIPE, SIG_IGN);

    int rc = 1;
    char *err = NULL;
    uv_loop_init(&d.loop);
    if (spool_open(&d.loop, d.cfg->spool, NULL, &d.spool, &err) != 0) {
        log_msg(LOG_ERR, NULL, "cannot open spool %s: %s", d.cfg->spool, err ? err : "?");
        goto out;
    }
    if (dns_open(&d.loop, d.cfg, &d.dns, &err) != 0) {
        log_msg(LOG_ERR, NULL, "cannot start the resolver: %s", err ? err : "?");
        goto out;
    }
    d.hooks = hooks_new(&d.loop, d.cfg, d.dns, &err);
    if (d.hooks == NULL) {
        log_msg(LOG_ERR, NULL, "%s: %s", d.cfg->file, err ? err : "cannot load hooks");
        goto out;
    }
    if (d.cfg->auth.users_file != NULL) {
        d.auth_db = auth_db_load(d.cfg->auth.users_file, &err);
        if (d.auth_db == NULL) {
            log_msg(LOG_ERR, NULL, "%s: auth.users_file: %s", d.cfg->file, err ? err : "?");
            goto out;
        }
    }
    d.auth_verifier = auth_verifier_new(&d.loop, 0, 0);
    d.auth_limiter = auth_limiter_new(AUTH_LIMIT_FAILURES_DEFAULT, AUTH_LIMIT_WINDOW_MS_DEFAULT,
                                      AUTH_LIMIT_ENTRIES_DEFAULT);
    char (*locals)[46] = NULL;
    size_t nlocals = main_local_addresses(&locals);
    d.sched = sched_new(&d.loop, d.cfg, d.spool, d.dns, (const char (*)[46])locals, nlocals);
    free(locals);
    d.srv = smtpd_server_new(d.cfg, d.spool);
    if (smtpd_server_tls_error(d.srv) != NULL)
        goto out; /* a certificate that does not load: refuse to start (already logged) */
    smtpd_server_on_queued(d.srv, main_on_queued, &d);
    smtpd_server_set_hooks(d.srv, d.hooks);
    sched_set_hooks(d.sched, d.hooks);
    smtpd_server_set_auth(d.srv, d.auth_db, d.auth_verifier, d.auth_limiter);
    if (listeners_start(&d.loop, d.cfg, d.srv, &d.listeners, &err) != 0) {
        log_msg(LOG_ERR, NULL, "%s", err);
        uv_run(&d.loop, UV_RUN_DEFAULT); /* let the listener handles close */
        goto out;
    }
    listeners_on_idle(d.listeners, main_on_idle, &d);

    uv_signal_init(&d.loop, &d.sigterm);
    uv_signal_init(&d.loop, &d.sigint);
    uv_signal_init(&d.loop, &d.sighup);
    uv_timer_init(&d.loop, &d.shutdown_timer);
    d.sigterm.data = d.sigint.data = d.sighup.data = d.shutdown_timer.data = &d;
    uv_signal_start(&d.sigterm, main_on_signal, SIGTERM);
    uv_signal_start(&d.sigint, main_on_signal, SIGINT);
    uv_signal_start(&d.sighup, main_on_signal, SIGHUP);

    sched_start(d.sched);
    log_msg(LOG_INFO, NULL, "petrel %s started (hostname %s, spool %s, %s)", PETREL_VERSION,
            d.cfg->hostname, d.cfg->spool, d.cfg->file);
    uv_run(&d.loop, UV_RUN_DEFAULT);
    rc = 0;
    log_msg(LOG_INFO, NULL, "petrel stopped");

out:
    free(err);
    if (d.listeners)
        listeners_stop(d.listeners);
    auth_verifier_free(d.auth_verifier); /* running checks come back in the next uv_run */
    d.auth_verifier = NULL;
    if (!d.handles_closed && d.sigterm.data)
        main_close_handles(&d);
    uv_run(&d.loop, UV_RUN_DEFAULT);
    if (d.spool) {
        struct spool_stats st;
        spool_stats(d.spool, &st);
        log_msg(LOG_INFO, NULL, "spool: %" PRIu64 " records in %" PRIu64 " group commits, "
                                "%" PRIu64 " syncs since start",
                st.records, st.commits, st.syncs);
    }
    spool_close(d.spool); /* may still run scheduler callbacks */
    d.spool = NULL;
    sched_free(d.sched);
    d.sched = NULL;
    hooks_free(d.hooks); /* after every session and delivery that used it */
    d.hooks = NULL;
    auth_limiter_free(d.auth_limiter);
    auth_db_free(d.auth_db);
    dns_close(d.dns);
    d.dns = NULL;
    uv_walk(&d.loop, main_close_walk, NULL);
    uv_run(&d.loop, UV_RUN_DEFAULT);
    if (uv_loop_close(&d.loop) != 0)
        log_msg(LOG_WARNING, NULL, "event loop closed with live handles");
    listeners_free(d.listeners);
    smtpd_server_free(d.srv);
    config_unref(d.cfg);
    return rc;
}

/* Loads and compiles lua.script (syntax errors, errors at load time) and
 * loads the plugins (ABI checks) on a private loop; prints
 * "file: script:line: message" or the plugin's error on failure. */
static int
main_check_lua(struct petrel_config *cfg)
{
    uv_loop_t loop;
    uv_loop_init(&loop);
    char *err = NULL;
    struct hooks *h = hooks_new(&loop, cfg, NULL, &err);
    int rc = 0;
    if (h == NULL) {
        fprintf(stderr, "%s: %s\n", cfg->file, err ? err : "cannot load hooks");
        rc = 1;
    }
    free(err);
    hooks_free(h);
    uv_run(&loop, UV_RUN_DEFAULT);
    uv_loop_close(&loop);
    return rc;
}

static int
main_check_config(const char *path)
{
    struct petrel_config *cfg = main_load_config(path);
    if (cfg == NULL)
        return 1;
    int rc = main_check_lua(cfg);
    if (rc == 0 && cfg->auth.users_file != NULL) {
        char *err = NULL;
        struct auth_db *db = auth_db_load(cfg->auth.users_file, &err);
        if (db == NULL) {
            fprintf(stderr, "%s: auth.users_file: %s\n", cfg->file, err ? err : "?");
            rc = 1;
        }
        free(err);
        auth_db_free(db);
    }
    if (rc == 0)
        printf("ok\n");
    config_unref(cfg);
    return rc;
}

static int
main_queue(int argc, char **argv, const char *path)
{
    if (argc < 1) {
        main_usage(stderr);
        return 2;
    }
    const char *verb = argv[0];
    const char *qid = argc > 1 ? argv[1] : NULL;
    bool needs_id = strcmp(verb, "show") == 0 || strcmp(verb, "cat") == 0
                    || strcmp(verb, "retry") == 0 || strcmp(verb, "delete") == 0;
    if ((needs_id && (qid == NULL || argc > 2)) || (!needs_id && argc > 1)) {
        main_usage(stderr);
        return 2;
    }
    if (strcmp(verb, "retry") == 0 || strcmp(verb, "delete") == 0 || strcmp(verb, "flush") == 0) {
        /* TODO(admin API issue): act through the running daemon */
        fprintf(stderr, "petrel queue %s: not yet supported (comes with the admin API); "
                        "nothing was changed\n", verb);
        return 2;
    }
    struct petrel_config *cfg = main_load_config(path);
    if (cfg == NULL)
        return 1;
    int rc;
    if (strcmp(verb, "list") == 0)
        rc = queue_cli_list(cfg->spool, stdout, stderr);
    else if (strcmp(verb, "show") == 0)
        rc = queue_cli_show(cfg->spool, qid, stdout, stderr);
    else if (strcmp(verb, "cat") == 0)
        rc = queue_cli_cat(cfg->spool, qid, stdout, stderr);
    else {
        main_usage(stderr);
        rc = 2;
    }
    config_unref(cfg);
    return rc;
}

/* petrel dns-lookup [--host] DOMAIN: where delivery would connect. */
static int
main_dns_lookup(int argc, char **argv, const char *path)
{
    bool host_only = argc == 2 && strcmp(argv[0], "--host") == 0;
    if (argc != (host_only ? 2 : 1)) {
        main_usage(stderr);
        return 2;
    }
    struct petrel_config *cfg = main_load_config(path);
    if (cfg == NULL)
        return 1;
    int rc = dns_cli_lookup(cfg, argv[host_only ? 1 : 0], host_only, stdout, stderr);
    config_unref(cfg);
    return rc;
}

int
main(int argc, char **argv)
{
    if (argc < 2) {
        main_usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    /* pull "-c FILE" out of the remaining arguments, wherever it stands */
    const char *path = NULL;
    char **rest = xcalloc((size_t)argc, sizeof(*rest));
    int nrest = 0;
    for (int i = 2; i < argc; i++) {
        if (strcmp(argv[i], "-c") == 0 || strcmp(argv[i], "--config") == 0) {
            if (i + 1 >= argc) {
                fprintf(stderr, "petrel: -c needs a file name\n");
                free(rest);
                return 2;
            }
            path = argv[++i];
        } else {
            rest[nrest++] = argv[i];
        }
    }
    int rc;
    if (strcmp(cmd, "serve") == 0 && nrest == 0)
        rc = main_serve(path);
    else if (strcmp(cmd, "check-config") == 0 && nrest == 0)
        rc = main_check_config(path);
    else if (strcmp(cmd, "queue") == 0)
        rc = main_queue(nrest, rest, path);
    else if (strcmp(cmd, "dns-lookup") == 0)
        rc = main_dns_lookup(nrest, rest, path);
    else if (strcmp(cmd, "passwd") == 0)
        rc = auth_passwd_main(nrest, rest);
    else if (strcmp(cmd, "version") == 0 || strcmp(cmd, "--version") == 0) {
        printf("petrel %s\n", PETREL_VERSION);
        rc = 0;
    } else if (strcmp(cmd, "help") == 0 || strcmp(cmd, "--help") == 0 || strcmp(cmd, "-h") == 0) {
        main_usage(stdout);
        rc = 0;
    } else {
        main_usage(stderr);
        rc = 2;
    }
    free(rest);
    return rc;
}
