/*
 * test_tls — conn over TLS on a real libuv loop: a server conn (accepted
 * from a loopback listener) and a client conn (conn_connect_tcp) switch to
 * TLS with contexts from tls.c; certificates come from a throwaway CA made
 * with the openssl CLI in a temporary directory. Checks the handshake
 * result and conn_tls_info on both sides, data both ways (a large payload
 * too), the client's verification result (trusted, wrong name), session
 * resumption through the client cache, SNI choosing a certificate, that
 * plaintext buffered before conn_start_tls is discarded (STARTTLS
 * injection), handshake failures (a plaintext peer, a peer that closes),
 * and context loading errors.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "buf.h"
#include "config.h"
#include "conn.h"
#include "log.h"
#include "tls.h"
#include "util.h"

#define T_TIMEOUT_MS 10000
#define T_BIG (1024 * 1024 + 777)

static char t_dir[64]; /* the throwaway CA and certificates */

static char *
t_path(const char *name)
{
    return xasprintf("%s/%s", t_dir, name);
}

static void
t_sh(const char *cmd)
{
    char *full = xasprintf("cd '%s' && ( %s ) >/dev/null 2>&1", t_dir, cmd);
    int rc = system(full);
    if (rc != 0)
        fail_msg("command failed (status %d): %s", rc, cmd);
    free(full);
}

/* A leaf for name (CN and DNS SAN) signed by the test CA: <base>.pem/.key. */
static void
t_make_leaf(const char *base, const char *name)
{
    char *cmd =
        xasprintf("openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout %s.key "
                  "-out %s.csr -subj '/CN=%s' && printf 'subjectAltName=DNS:%s\\n' > %s.ext && "
                  "openssl x509 -req -in %s.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 "
                  "-extfile %s.ext -out %s.pem",
                  base, base, name, name, base, base, base, base);
    t_sh(cmd);
    free(cmd);
}

static int
t_group_setup(void **state)
{
    (void)state;
    log_init(LOG_ERR, LOG_FORMAT_TEXT);
    snprintf(t_dir, sizeof(t_dir), "/tmp/petrel-test-tls-XXXXXX");
    if (mkdtemp(t_dir) == NULL)
        return -1;
    t_sh("openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key "
         "-out ca.pem -days 2 -subj '/CN=Petrel Test CA' "
         "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign");
    t_make_leaf("mx", "mx.tls.test");
    t_make_leaf("other", "other.tls.test");
    /* the client trusts the test CA (OpenSSL's default paths honour it) */
    char *ca = t_path("ca.pem");
    setenv("SSL_CERT_FILE", ca, 1);
    free(ca);
    return 0;
}

static int
t_group_teardown(void **state)
{
    (void)state;
    char *cmd = xasprintf("rm -rf '%s'", t_dir);
    int rc = system(cmd);
    free(cmd);
    return rc == 0 ? 0 : -1;
}

/* ---- a server and a client conn on one loop ---------------------------- */

enum t_mode {
    M_TLS,         /* both sides start TLS at once; hello → world; client closes */
    M_BIG,         /* as M_TLS with a T_BIG payload from the client */
    M_INJECT,      /* STARTTLS-like: plaintext first, injected line discarded */
    M_PLAIN_PEER,  /* the server never starts TLS: it sends a plaintext banner */
    M_PEER_CLOSES, /* the server closes at once */
};

struct t_world;

struct t_side {
    struct t_world *w;
    struct conn *c;
    bool server;
    bool tls_started;
    bool tls_done;
    int tls_status;
    struct conn_tls_info info;
    bool has_info;
    char err[160];
    struct buf got; /* plaintext received (since TLS started) */
    size_t got_total;
    bool closed;
    bool timed_out;
};

struct t_world {
    uv_loop_t loop;
    uv_tcp_t listener;
    int port;
    enum t_mode mode;
    struct tls_ctx *srv_ctx;
    struct tls_ctx *cli_ctx;
    const char *name; /* the client's SNI / verification name */
    struct t_side srv;
    struct t_side cli;
    bool inject_seen_empty; /* M_INJECT: input empty right after conn_start_tls */
};

static void t_on_conn(struct conn *c, enum conn_event ev, int status, void *arg);

static void
t_maybe_stop(struct t_world *w)
{
    if (w != NULL && w->srv.closed && w->cli.closed && !uv_is_closing((uv_handle_t *)&w->listener))
        uv_close((uv_handle_t *)&w->listener, NULL);
}

static void
t_close(struct t_side *s)
{
    if (s->c != NULL)
        conn_close(s->c);
}

static void
t_on_tls(struct conn *c, int status, void *arg)
{
    struct t_side *s = arg;
    assert_ptr_equal(c, s->c);
    assert_false(s->tls_done);
    s->tls_done = true;
    s->tls_status = status;
    snprintf(s->err, sizeof(s->err), "%s", conn_tls_error(c));
    s->has_info = conn_tls_info(c, &s->info);
    if (status < 0) {
        conn_close(c);
        return;
    }
    int again =
        conn_start_tls(c, s->server ? s->w->srv_ctx : s->w->cli_ctx, s->server, NULL, t_on_tls, s);
    if (again != UV_EALREADY)
        fail_msg("a second conn_start_tls: got %d, want UV_EALREADY", again);
    if (!s->server) {
        struct t_world *w = s->w;
        if (w->mode == M_BIG) {
            char *big = xmalloc(T_BIG);
            for (size_t i = 0; i < T_BIG; i++)
                big[i] = (char)('a' + i % 26);
            conn_write(c, big, T_BIG);
            free(big);
        } else if (w->mode == M_INJECT) {
            conn_write(c, "EHLO x\r\n", 8);
        } else {
            conn_write(c, "hello\r\n", 7);
        }
        conn_flush(c);
    }
}

static void
t_start_tls(struct t_side *s)
{
    struct t_world *w = s->w;
    s->tls_started = true;
    buf_clear(&s->got);
    int r = conn_start_tls(s->c, s->server ? w->srv_ctx : w->cli_ctx, s->server,
                           s->server ? NULL : w->name, t_on_tls, s);
    if (r != 0)
        fail_msg("conn_start_tls (%s): got %d, want 0", s->server ? "server" : "client", r);
}

/* The plaintext a side received, as a string (copied into buf, size bytes). */
static const char *
t_got(const struct t_side *s, char *out, size_t size)
{
    size_t n = s->got.len < size - 1 ? s->got.len : size - 1;
    memcpy(out, buf_ptr(&s->got), n);
    out[n] = '\0';
    return out;
}

static void
t_expect_got(const struct t_side *s, const char *who, const char *want)
{
    char got[256];
    if (s->got.len != strlen(want) || memcmp(buf_ptr(&s->got), want, s->got.len) != 0)
        fail_msg("%s received: got \"%s\" (%zu bytes), want \"%s\"", who,
                 t_got(s, got, sizeof(got)), s->got.len, want);
}

static bool
t_got_has(const struct t_side *s, const char *want)
{
    return memmem(buf_ptr(&s->got), s->got.len, want, strlen(want)) != NULL;
}

static void
t_server_data(struct t_side *s)
{
    struct t_world *w = s->w;
    struct conn *c = s->c;
    if (w->mode == M_INJECT && !s->tls_started) {
        /* "STARTTLS\r\nINJECT\r\n" stays in the input buffer: conn_start_tls
         * must drop the injected line */
        struct buf *in = conn_input(c);
        if (memmem(buf_ptr(in), in->len, "INJECT\r\n", 8) == NULL)
            return;
        conn_write(c, "220 go\r\n", 8);
        conn_flush(c);
        t_start_tls(s);
        w->inject_seen_empty = conn_input(c)->len == 0;
        return;
    }
    if (w->mode == M_BIG) {
        if (s->got_total == T_BIG) {
            conn_write(c, "ok\r\n", 4);
            conn_flush(c);
        }
        return;
    }
    if (t_got_has(s, "hello\r\n") && w->mode == M_TLS) {
        conn_write(c, "world\r\n", 7);
        conn_flush(c);
    } else if (t_got_has(s, "EHLO x\r\n") && w->mode == M_INJECT) {
        conn_write(c, "250 ok\r\n", 8);
        conn_flush(c);
    }
}

static void
t_client_data(struct t_side *s)
{
    struct t_world *w = s->w;
    if (w->mode == M_INJECT && !s->tls_started) {
        if (t_got_has(s, "220 go\r\n"))
            t_start_tls(s);
        return;
    }
    if (t_got_has(s, "world\r\n") || t_got_has(s, "ok\r\n") || t_got_has(s, "250 ok\r\n"))
        t_close(s);
}

static void
t_on_conn(struct conn *c, enum conn_event ev, int status, void *arg)
{
    struct t_side *s = arg;
    struct t_world *w = s->w;
    assert_ptr_equal(c, s->c);
    switch (ev) {
    case CONN_EV_CONNECTED:
        assert_false(s->server);
        if (status < 0)
            fail_msg("connect: %s", conn_strerror(status));
        if (w->mode == M_INJECT) {
            conn_write(c, "STARTTLS\r\nINJECT\r\n", 18);
            conn_flush(c);
        } else {
            t_start_tls(s);
        }
        return;
    case CONN_EV_DATA: {
        struct buf *in = conn_input(c);
        if (s->tls_started && !s->tls_done)
            fail_msg("CONN_EV_DATA during the handshake");
        if (s->server && w->mode == M_INJECT && !s->tls_started) {
            t_server_data(s);
            return;
        }
        buf_append(&s->got, buf_ptr(in), in->len);
        s->got_total += in->len;
        buf_consume(in, in->len);
        if (s->server)
            t_server_data(s);
        else
            t_client_data(s);
        return;
    }
    case CONN_EV_EOF:
    case CONN_EV_ERROR:
        t_close(s);
        return;
    case CONN_EV_TIMEOUT:
        s->timed_out = true;
        t_close(s);
        return;
    case CONN_EV_DRAINED:
        return;
    case CONN_EV_CLOSED:
        s->closed = true;
        s->c = NULL;
        t_maybe_stop(w);
        return;
    }
}

static void
t_on_accept(uv_stream_t *server, int status)
{
    struct t_world *w = server->data;
    assert_int_equal(status, 0);
    assert_null(w->srv.c);
    assert_int_equal(conn_accept(server, &w->srv.c), 0);
    conn_set_callback(w->srv.c, t_on_conn, &w->srv);
    conn_set_timeout(w->srv.c, T_TIMEOUT_MS);
    conn_resume_read(w->srv.c); /* an accepted conn reads once told to */
    switch (w->mode) {
    case M_TLS:
    case M_BIG:
        t_start_tls(&w->srv);
        return;
    case M_INJECT:
        return;
    case M_PLAIN_PEER:
        conn_write(w->srv.c, "220 mx.tls.test ESMTP not TLS at all\r\n", 38);
        conn_flush(w->srv.c);
        return;
    case M_PEER_CLOSES:
        conn_close(w->srv.c);
        return;
    }
}

/* Runs one connection in mode; srv_ctx/cli_ctx are borrowed. */
static void
t_run(struct t_world *w, enum t_mode mode, struct tls_ctx *srv_ctx, struct tls_ctx *cli_ctx,
      const char *name)
{
    memset(w, 0, sizeof(*w));
    w->mode = mode;
    w->srv_ctx = srv_ctx;
    w->cli_ctx = cli_ctx;
    w->name = name;
    w->srv.w = w;
    w->srv.server = true;
    w->cli.w = w;
    w->srv.tls_status = 1;
    w->cli.tls_status = 1;
    assert_int_equal(uv_loop_init(&w->loop), 0);
    assert_int_equal(uv_tcp_init(&w->loop, &w->listener), 0);
    w->listener.data = w;
    struct sockaddr_in sin;
    uv_ip4_addr("127.0.0.1", 0, &sin);
    assert_int_equal(uv_tcp_bind(&w->listener, (const struct sockaddr *)&sin, 0), 0);
    assert_int_equal(uv_listen((uv_stream_t *)&w->listener, 8, t_on_accept), 0);
    int len = sizeof(sin);
    assert_int_equal(uv_tcp_getsockname(&w->listener, (struct sockaddr *)&sin, &len), 0);
    w->port = ntohs(sin.sin_port);
    assert_int_equal(conn_connect_tcp(&w->loop, (const struct sockaddr *)&sin, NULL, t_on_conn,
                                      &w->cli, &w->cli.c),
                     0);
    conn_set_timeout(w->cli.c, T_TIMEOUT_MS);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    if (!uv_is_closing((uv_handle_t *)&w->listener))
        uv_close((uv_handle_t *)&w->listener, NULL);
    uv_run(&w->loop, UV_RUN_DEFAULT);
    int r = uv_loop_close(&w->loop);
    if (r != 0)
        fail_msg("uv_loop_close: got %d, want 0 (a handle was left open)", r);
    assert_true(w->srv.closed);
    assert_true(w->cli.closed);
    assert_false(w->srv.timed_out);
    assert_false(w->cli.timed_out);
    assert_int_equal(conn_count(), 0);
}

static void
t_world_free(struct t_world *w)
{
    buf_reset(&w->srv.got);
    buf_reset(&w->cli.got);
}

static struct tls_ctx *
t_server_ctx(bool with_other)
{
    struct petrel_config cfg;
    memset(&cfg, 0, sizeof(cfg));
    struct tls_cert_config other;
    memset(&other, 0, sizeof(other));
    cfg.tls.cert = t_path("mx.pem");
    cfg.tls.key = t_path("mx.key");
    if (with_other) {
        other.cert = t_path("other.pem");
        other.key = t_path("other.key");
        cfg.tls.certificates = &other;
        cfg.tls.ncertificates = 1;
    }
    char *err = NULL;
    struct tls_ctx *t = tls_server_new(&cfg, &err);
    if (t == NULL)
        fail_msg("tls_server_new: %s", err);
    assert_true(tls_is_server(t));
    free(cfg.tls.cert);
    free(cfg.tls.key);
    free(other.cert);
    free(other.key);
    return t;
}

static struct tls_ctx *
t_client_ctx(void)
{
    char *err = NULL;
    struct tls_ctx *t = tls_client_new(&err);
    if (t == NULL)
        fail_msg("tls_client_new: %s", err);
    assert_false(tls_is_server(t));
    return t;
}

static void
t_expect_tls13(const struct t_side *s, const char *who)
{
    if (s->tls_status != 0)
        fail_msg("%s handshake: got status %d (%s), want 0", who, s->tls_status, s->err);
    assert_true(s->has_info);
    if (strcmp(s->info.version, "TLSv1.3") != 0)
        fail_msg("%s version: got %s, want TLSv1.3", who, s->info.version);
    if (s->info.cipher[0] == '\0' || s->info.bits < 128)
        fail_msg("%s cipher: got \"%s\" (%d bits), want an AEAD suite", who, s->info.cipher,
                 s->info.bits);
}

/* ---- tests ---------------------------------------------------------------- */

static void
test_tls_handshake_carries_data_both_ways_and_verifies_the_name(void **state)
{
    (void)state;
    struct tls_ctx *srv = t_server_ctx(false);
    struct tls_ctx *cli = t_client_ctx();
    struct t_world w;
    t_run(&w, M_TLS, srv, cli, "mx.tls.test");
    t_expect_tls13(&w.srv, "server");
    t_expect_tls13(&w.cli, "client");
    assert_string_equal(w.srv.info.cipher, w.cli.info.cipher);
    if (!w.cli.info.verified || strcmp(w.cli.info.verify, "ok") != 0)
        fail_msg("client verify: got %d \"%s\", want verified \"ok\"", w.cli.info.verified,
                 w.cli.info.verify);
    assert_string_equal(w.cli.info.peer_cn, "mx.tls.test");
    assert_string_equal(w.srv.info.verify, "none");
    assert_string_equal(w.srv.info.sni, "mx.tls.test");
    assert_false(w.cli.info.resumed);
    t_expect_got(&w.srv, "server", "hello\r\n");
    t_expect_got(&w.cli, "client", "world\r\n");
    t_world_free(&w);
    tls_unref(cli);
    tls_unref(srv);
}

static void
test_tls_wrong_name_still_encrypts_and_reports_the_mismatch(void **state)
{
    (void)state;
    struct tls_ctx *srv = t_server_ctx(false);
    struct tls_ctx *cli = t_client_ctx();
    struct t_world w;
    t_run(&w, M_TLS, srv, cli, "wrong.tls.test");
    t_expect_tls13(&w.cli, "client");
    assert_false(w.cli.info.verified);
    if (strcmp(w.cli.info.verify, "hostname mismatch") != 0)
        fail_msg("client verify: got \"%s\", want \"hostname mismatch\"", w.cli.info.verify);
    t_expect_got(&w.cli, "client", "world\r\n");
    t_world_free(&w);
    /* an IP literal as the name: no SNI, and no name matches it */
    t_run(&w, M_TLS, srv, cli, "127.0.0.1");
    t_expect_tls13(&w.cli, "client");
    assert_false(w.cli.info.verified);
    assert_string_equal(w.srv.info.sni, "");
    t_world_free(&w);
    tls_unref(cli);
    tls_unref(srv);
}

/* TLS 1.3: every ticket the server sends (OpenSSL's default: two) is kept
 * under the connection's destination, up to TLS_CLIENT_TICKETS_PER_DEST. */
static void
test_tls_client_cache_keeps_tickets_per_destination(void **state)
{
    (void)state;
    struct tls_ctx *srv = t_server_ctx(false);
    struct tls_ctx *cli = t_client_ctx();
    struct t_world w;
    t_run(&w, M_TLS, srv, cli, "mx.tls.test");
    t_expect_tls13(&w.cli, "first client");
    assert_false(w.cli.info.resumed);
    t_world_free(&w);
    size_t first = tls_cache_count(cli);
    if (first != 2)
        fail_msg("client cache after one connection: got %zu tickets, want the server's 2",
                 first);
    /* each run listens on a new port: another destination (the key is
     * "name[ip]:port"), so no resumption and its own tickets */
    t_run(&w, M_TLS, srv, cli, "mx.tls.test");
    t_expect_tls13(&w.cli, "second client");
    assert_false(w.cli.info.resumed);
    t_world_free(&w);
    if (tls_cache_count(cli) != 2 * first)
        fail_msg("client cache after two destinations: got %zu entries, want %zu",
                 tls_cache_count(cli), 2 * first);
    tls_unref(cli);
    tls_unref(srv);
}

/* Resumption needs two connections to one address and port: the second
 * run re-binds the first one's port. */
static void
test_tls_resumption_to_the_same_destination(void **state)
{
    (void)state;
    struct tls_ctx *srv = t_server_ctx(false);
    struct tls_ctx *cli = t_client_ctx();
    /* two runs on one fixed port: bind to a port found free a moment ago */
    bool resumed = false;
    for (int attempt = 0; attempt < 2 && !resumed; attempt++) {
        struct t_world w;
        t_run(&w, M_TLS, srv, cli, "mx.tls.test");
        int port = w.port;
        t_world_free(&w);
        /* second connection: same port, listener re-bound */
        memset(&w, 0, sizeof(w));
        w.mode = M_TLS;
        w.srv_ctx = srv;
        w.cli_ctx = cli;
        w.name = "mx.tls.test";
        w.srv.w = &w;
        w.srv.server = true;
        w.cli.w = &w;
        w.srv.tls_status = 1;
        w.cli.tls_status = 1;
        assert_int_equal(uv_loop_init(&w.loop), 0);
        assert_int_equal(uv_tcp_init(&w.loop, &w.listener), 0);
        w.listener.data = &w;
        struct sockaddr_in sin;
        uv_ip4_addr("127.0.0.1", port, &sin);
        if (uv_tcp_bind(&w.listener, (const struct sockaddr *)&sin, 0) != 0 ||
            uv_listen((uv_stream_t *)&w.listener, 8, t_on_accept) != 0) {
            uv_close((uv_handle_t *)&w.listener, NULL);
            uv_run(&w.loop, UV_RUN_DEFAULT);
            assert_int_equal(uv_loop_close(&w.loop), 0);
            continue; /* the port went away meanwhile: try again */
        }
        w.port = port;
        assert_int_equal(conn_connect_tcp(&w.loop, (const struct sockaddr *)&sin, NULL, t_on_conn,
                                          &w.cli, &w.cli.c),
                         0);
        conn_set_timeout(w.cli.c, T_TIMEOUT_MS);
        uv_run(&w.loop, UV_RUN_DEFAULT);
        uv_run(&w.loop, UV_RUN_DEFAULT);
        assert_int_equal(uv_loop_close(&w.loop), 0);
        t_expect_tls13(&w.cli, "resuming client");
        t_expect_tls13(&w.srv, "resuming server");
        t_expect_got(&w.cli, "client", "world\r\n");
        resumed = w.cli.info.resumed && w.srv.info.resumed;
        if (!resumed)
            fail_msg("second connection to 127.0.0.1:%d: resumed got client %d server %d, "
                     "want both 1",
                     port, w.cli.info.resumed, w.srv.info.resumed);
        t_world_free(&w);
    }
    assert_true(resumed);
    tls_unref(cli);
    tls_unref(srv);
}

static void
test_tls_sni_chooses_the_certificate(void **state)
{
    (void)state;
    struct tls_ctx *srv = t_server_ctx(true);
    struct tls_ctx *cli = t_client_ctx();
    static const struct {
        const char *name;
        const char *want_cn;
    } cases[] = {
        {"other.tls.test", "other.tls.test"},
        {"mx.tls.test", "mx.tls.test"},
        {"unknown.tls.test", "mx.tls.test"}, /* no match: the default */
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_world w;
        t_run(&w, M_TLS, srv, cli, cases[i].name);
        t_expect_tls13(&w.cli, cases[i].name);
        if (strcmp(w.cli.info.peer_cn, cases[i].want_cn) != 0)
            fail_msg("SNI %s: got certificate %s, want %s", cases[i].name, w.cli.info.peer_cn,
                     cases[i].want_cn);
        assert_string_equal(w.srv.info.sni, cases[i].name);
        assert_int_equal(w.cli.info.verified, strcmp(cases[i].name, cases[i].want_cn) == 0);
        t_world_free(&w);
    }
    tls_unref(cli);
    tls_unref(srv);
}

static void
test_tls_large_payload_arrives_intact(void **state)
{
    (void)state;
    struct tls_ctx *srv = t_server_ctx(false);
    struct tls_ctx *cli = t_client_ctx();
    struct t_world w;
    t_run(&w, M_BIG, srv, cli, "mx.tls.test");
    if (w.srv.got_total != T_BIG)
        fail_msg("server got %zu bytes, want %d", w.srv.got_total, T_BIG);
    const char *p = buf_ptr(&w.srv.got);
    for (size_t i = 0; i < T_BIG; i++) {
        if (p[i] != (char)('a' + i % 26))
            fail_msg("byte %zu: got 0x%02x, want 0x%02x", i, (unsigned char)p[i],
                     'a' + (unsigned)(i % 26));
    }
    t_expect_got(&w.cli, "client", "ok\r\n");
    t_world_free(&w);
    tls_unref(cli);
    tls_unref(srv);
}

static void
test_tls_plaintext_buffered_before_start_is_discarded(void **state)
{
    (void)state;
    struct tls_ctx *srv = t_server_ctx(false);
    struct tls_ctx *cli = t_client_ctx();
    struct t_world w;
    t_run(&w, M_INJECT, srv, cli, "mx.tls.test");
    assert_true(w.inject_seen_empty);
    t_expect_tls13(&w.srv, "server");
    /* after the handshake the server saw exactly what was sent under TLS */
    t_expect_got(&w.srv, "server after TLS", "EHLO x\r\n");
    t_expect_got(&w.cli, "client", "250 ok\r\n");
    t_world_free(&w);
    tls_unref(cli);
    tls_unref(srv);
}

static void
test_tls_handshake_with_a_plaintext_peer_fails(void **state)
{
    (void)state;
    struct tls_ctx *srv = t_server_ctx(false);
    struct tls_ctx *cli = t_client_ctx();
    struct t_world w;
    t_run(&w, M_PLAIN_PEER, srv, cli, "mx.tls.test");
    assert_true(w.cli.tls_done);
    if (w.cli.tls_status >= 0)
        fail_msg("client handshake: got status %d, want < 0", w.cli.tls_status);
    if (w.cli.err[0] == '\0')
        fail_msg("conn_tls_error: got \"\", want a reason");
    assert_false(w.cli.has_info);
    t_world_free(&w);
    t_run(&w, M_PEER_CLOSES, srv, cli, "mx.tls.test");
    assert_true(w.cli.tls_done);
    if (w.cli.tls_status >= 0)
        fail_msg("client handshake (peer closed): got status %d, want < 0", w.cli.tls_status);
    assert_true(w.cli.err[0] != '\0');
    t_world_free(&w);
    tls_unref(cli);
    tls_unref(srv);
}

static void
test_tls_server_context_load_errors_name_the_file(void **state)
{
    (void)state;
    static const struct {
        const char *label;
        const char *cert;
        const char *key;
        const char *want; /* substring of the error */
    } cases[] = {
        {"missing certificate", "nonexistent.pem", "mx.key", "tls.cert "},
        {"missing key", "mx.pem", "nonexistent.key", "tls.key "},
        {"key of another certificate", "mx.pem", "other.key", "tls.key "},
        {"key file as certificate", "mx.key", "mx.key", "tls.cert "},
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct petrel_config cfg;
        memset(&cfg, 0, sizeof(cfg));
        cfg.tls.cert = t_path(cases[i].cert);
        cfg.tls.key = t_path(cases[i].key);
        char *err = NULL;
        struct tls_ctx *t = tls_server_new(&cfg, &err);
        if (t != NULL)
            fail_msg("%s: got a context, want an error", cases[i].label);
        if (err == NULL || strstr(err, cases[i].want) == NULL)
            fail_msg("%s: got error \"%s\", want one containing \"%s\"", cases[i].label,
                     err ? err : "(null)", cases[i].want);
        free(err);
        free(cfg.tls.cert);
        free(cfg.tls.key);
    }
}

/* (A second conn_start_tls is refused too: t_on_tls checks it.) */
static void
test_tls_start_is_refused_before_the_connect_and_with_the_wrong_role(void **state)
{
    (void)state;
    struct tls_ctx *srv = t_server_ctx(false);
    struct tls_ctx *cli = t_client_ctx();
    uv_loop_t loop;
    assert_int_equal(uv_loop_init(&loop), 0);
    struct sockaddr_in sin;
    uv_ip4_addr("127.0.0.1", 9, &sin);
    struct conn *c = NULL;
    struct t_side side;
    memset(&side, 0, sizeof(side));
    assert_int_equal(
        conn_connect_tcp(&loop, (const struct sockaddr *)&sin, NULL, t_on_conn, &side, &c), 0);
    side.c = c;
    /* not connected yet */
    assert_int_equal(conn_start_tls(c, cli, false, "x", t_on_tls, &side), UV_ENOTCONN);
    /* a server context for a client handshake, and the reverse */
    assert_int_equal(conn_start_tls(c, srv, false, "x", t_on_tls, &side), UV_EINVAL);
    assert_int_equal(conn_start_tls(c, cli, true, NULL, t_on_tls, &side), UV_EINVAL);
    conn_close(c);
    uv_run(&loop, UV_RUN_DEFAULT);
    assert_true(side.closed);
    assert_int_equal(uv_loop_close(&loop), 0);
    tls_unref(cli);
    tls_unref(srv);
}

/* tls.certificates in the config: parsed into the list tls_server_new()
 * reads, checked against the default certificate. */
static void
test_tls_config_certificates_list(void **state)
{
    (void)state;
    static const char ok[] = "listeners: [{ address: 127.0.0.1:2525, tls: implicit }]\n"
                             "tls:\n"
                             "  cert: /etc/petrel/a.pem\n"
                             "  key: /etc/petrel/a.key\n"
                             "  certificates:\n"
                             "    - { cert: /etc/petrel/b.pem, key: /etc/petrel/b.key }\n"
                             "    - { cert: /etc/petrel/c.pem, key: /etc/petrel/c.key }\n";
    struct petrel_config *c = NULL;
    char *errors = NULL;
    if (config_load_string("t.yaml", ok, strlen(ok), &c, &errors) != 0)
        fail_msg("config: got errors %s, want none", errors);
    assert_int_equal(c->tls.ncertificates, 2);
    assert_string_equal(c->tls.certificates[0].cert, "/etc/petrel/b.pem");
    assert_string_equal(c->tls.certificates[1].key, "/etc/petrel/c.key");
    config_unref(c);
    static const struct {
        const char *label;
        const char *yaml;
        const char *want;
    } bad[] = {
        {"no default certificate",
         "listeners: [{ address: 127.0.0.1:2525 }]\n"
         "tls:\n  certificates: [{ cert: /b.pem, key: /b.key }]\n",
         "t.yaml:3:17: tls.certificates: needs tls.cert and tls.key (the default "
         "certificate)\n"},
        {"entry without a key",
         "listeners: [{ address: 127.0.0.1:2525 }]\n"
         "tls: { cert: /a.pem, key: /a.key, certificates: [{ cert: /b.pem }] }\n",
         "t.yaml:2:50: tls.certificates[0].key: missing required key\n"},
    };
    for (size_t i = 0; i < ARRAY_SIZE(bad); i++) {
        c = NULL;
        errors = NULL;
        if (config_load_string("t.yaml", bad[i].yaml, strlen(bad[i].yaml), &c, &errors) == 0)
            fail_msg("%s: got a config, want an error", bad[i].label);
        if (strcmp(errors, bad[i].want) != 0)
            fail_msg("%s: got \"%s\", want \"%s\"", bad[i].label, errors, bad[i].want);
        free(errors);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tls_handshake_carries_data_both_ways_and_verifies_the_name),
        cmocka_unit_test(test_tls_wrong_name_still_encrypts_and_reports_the_mismatch),
        cmocka_unit_test(test_tls_client_cache_keeps_tickets_per_destination),
        cmocka_unit_test(test_tls_resumption_to_the_same_destination),
        cmocka_unit_test(test_tls_sni_chooses_the_certificate),
        cmocka_unit_test(test_tls_large_payload_arrives_intact),
        cmocka_unit_test(test_tls_plaintext_buffered_before_start_is_discarded),
        cmocka_unit_test(test_tls_handshake_with_a_plaintext_peer_fails),
        cmocka_unit_test(test_tls_server_context_load_errors_name_the_file),
        cmocka_unit_test(test_tls_config_certificates_list),
        cmocka_unit_test(test_tls_start_is_refused_before_the_connect_and_with_the_wrong_role),
    };
    return cmocka_run_group_tests(tests, t_group_setup, t_group_teardown);
}
