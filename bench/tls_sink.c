/*
 * tls_sink — the TLS benchmark's receiving MTA (bench/run.sh, scenario
 * "tls"): an SMTP sink that offers STARTTLS, like Postfix's smtp-sink
 * (which cannot do TLS). It accepts every command, counts the messages it
 * receives and throws them away. petrel and Postfix both relay to it.
 *
 *   tls_sink -l 127.0.0.1:PORT -c CERT.pem -k KEY.pem -o COUNTFILE [-t MAXSECS]
 *
 * COUNTFILE gets one record per event (a TLS handshake, a message, the end
 * of a session), each ended by CR, in the format of `smtp-sink -c` with two
 * fields in front (so the harness's smtp-sink parser reads it too):
 *
 *   tls=T resumed=R sess=S quit=Q mesg=M
 *
 * T: TLS handshakes completed, R: those that resumed a session (ticket or
 * session id: SSL_session_reused), S: sessions ended, Q: of which with QUIT,
 * M: messages received (counted at the final dot). All since start.
 *
 * One thread per connection, blocking I/O; replies are buffered and sent
 * when the client's pipelined input is used up. The server context is
 * OpenSSL's defaults for TLS 1.2/1.3 (session cache and session tickets on),
 * so a client that offers a cached session or ticket is resumed.
 *
 * Build: cc -O2 -o tls_sink tls_sink.c -lssl -lcrypto -lpthread
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_CONNS 2000
#define IO_TIMEOUT_S 120

static SSL_CTX *ctx;
static int count_fd = -1;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long n_tls, n_resumed, n_sess, n_quit, n_mesg;
static int n_conns;
static volatile sig_atomic_t stopping;

/* Appends the counters as one record (called with lock held). */
static void
count_record(void)
{
    char rec[160];
    int n = snprintf(rec, sizeof(rec), "tls=%lu resumed=%lu sess=%lu quit=%lu mesg=%lu\r",
                     n_tls, n_resumed, n_sess, n_quit, n_mesg);
    if (count_fd >= 0 && n > 0 && write(count_fd, rec, (size_t)n) != n)
        perror("tls_sink: count file");
}

static void
count_event(unsigned long *counter, unsigned long *also)
{
    pthread_mutex_lock(&lock);
    (*counter)++;
    if (also != NULL)
        (*also)++;
    count_record();
    pthread_mutex_unlock(&lock);
}

struct sess {
    int fd;
    SSL *ssl;           /* owned, NULL before STARTTLS */
    char in[16384];
    size_t in_len, in_off;
    char out[4096];
    size_t out_len;
};

/* Sends the buffered replies. Returns -1 on error. */
static int
sess_flush(struct sess *s)
{
    size_t off = 0;
    while (off < s->out_len) {
        ssize_t n;
        if (s->ssl != NULL) {
            int r = SSL_write(s->ssl, s->out + off, (int)(s->out_len - off));
            n = r > 0 ? r : -1;
        } else {
            n = write(s->fd, s->out + off, s->out_len - off);
            if (n < 0 && errno == EINTR)
                continue;
        }
        if (n <= 0)
            return -1;
        off += (size_t)n;
    }
    s->out_len = 0;
    return 0;
}

static int
sess_reply(struct sess *s, const char *text)
{
    size_t len = strlen(text);
    if (s->out_len + len > sizeof(s->out) && sess_flush(s) < 0)
        return -1;
    memcpy(s->out + s->out_len, text, len);
    s->out_len += len;
    return 0;
}

/* Reads more input (flushing pending replies first: the client waits for
 * them). Returns the bytes read, 0 at EOF, -1 on error. */
static ssize_t
sess_fill(struct sess *s)
{
    if (s->out_len > 0 && sess_flush(s) < 0)
        return -1;
    if (s->in_off > 0) {
        memmove(s->in, s->in + s->in_off, s->in_len - s->in_off);
        s->in_len -= s->in_off;
        s->in_off = 0;
    }
    if (s->in_len == sizeof(s->in))
        return -1; /* a line longer than the buffer */
    for (;;) {
        ssize_t n;
        if (s->ssl != NULL) {
            int r = SSL_read(s->ssl, s->in + s->in_len, (int)(sizeof(s->in) - s->in_len));
            n = r > 0 ? r : (SSL_get_error(s->ssl, r) == SSL_ERROR_ZERO_RETURN ? 0 : -1);
        } else {
            n = read(s->fd, s->in + s->in_len, sizeof(s->in) - s->in_len);
            if (n < 0 && errno == EINTR)
                continue;
        }
        if (n > 0)
            s->in_len += (size_t)n;
        return n;
    }
}

/* The next command line (CRLF or LF stripped) in *line, NUL-terminated in
 * the buffer. Returns 1, 0 at EOF, -1 on error. */
static int
sess_line(struct sess *s, char **line)
{
    for (;;) {
        char *start = s->in + s->in_off;
        char *nl = memchr(start, '\n', s->in_len - s->in_off);
        if (nl != NULL) {
            size_t len = (size_t)(nl - start);
            if (len > 0 && start[len - 1] == '\r')
                len--;
            start[len] = '\0';
            s->in_off = (size_t)(nl - s->in) + 1;
            *line = start;
            return 1;
        }
        ssize_t n = sess_fill(s);
        if (n <= 0)
            return (int)n;
    }
}

/* The message after DATA's 354, up to and including the line ".". The
 * previous line ended (the DATA command), so the match starts after CRLF.
 * Returns 1, 0 at EOF, -1 on error. */
static int
sess_data(struct sess *s)
{
    static const char end[] = "\r\n.\r\n";
    int m = 2; /* "\r\n" of the DATA line already seen */
    for (;;) {
        while (s->in_off < s->in_len) {
            char c = s->in[s->in_off++];
            if (c == end[m])
                m++;
            else if (c == '\r')
                m = 1;
            else
                m = 0;
            if (m == 5)
                return 1;
        }
        s->in_off = s->in_len = 0;
        ssize_t n = sess_fill(s);
        if (n <= 0)
            return (int)n;
    }
}

static bool
verb_is(const char *line, const char *verb)
{
    size_t n = strlen(verb);
    return strncasecmp(line, verb, n) == 0 && (line[n] == '\0' || line[n] == ' ');
}

static void
sess_run(struct sess *s)
{
    bool quit = false;
    char *line = NULL;
    if (sess_reply(s, "220 tls-sink.bench.test ESMTP\r\n") < 0 || sess_flush(s) < 0)
        goto out;
    while (sess_line(s, &line) == 1) {
        int rc = 0;
        if (verb_is(line, "EHLO")) {
            rc = sess_reply(s, s->ssl != NULL ?
                            "250-tls-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                            "250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n" :
                            "250-tls-sink.bench.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                            "250-SIZE 104857600\r\n250-STARTTLS\r\n250 ENHANCEDSTATUSCODES\r\n");
        } else if (verb_is(line, "HELO")) {
            rc = sess_reply(s, "250 tls-sink.bench.test\r\n");
        } else if (verb_is(line, "STARTTLS") && s->ssl == NULL) {
            if (sess_reply(s, "220 2.0.0 Ready to start TLS\r\n") < 0 || sess_flush(s) < 0)
                break;
            s->in_len = s->in_off = 0; /* RFC 3207 5: nothing sent before the handshake */
            s->ssl = SSL_new(ctx);
            if (s->ssl == NULL || SSL_set_fd(s->ssl, s->fd) != 1 || SSL_accept(s->ssl) != 1)
                break;
            count_event(&n_tls, SSL_session_reused(s->ssl) ? &n_resumed : NULL);
        } else if (verb_is(line, "MAIL")) {
            rc = sess_reply(s, "250 2.1.0 Ok\r\n");
        } else if (verb_is(line, "RCPT")) {
            rc = sess_reply(s, "250 2.1.5 Ok\r\n");
        } else if (verb_is(line, "DATA")) {
            if (sess_reply(s, "354 End data with <CR><LF>.<CR><LF>\r\n") < 0)
                break;
            if (sess_data(s) != 1)
                break;
            count_event(&n_mesg, NULL);
            rc = sess_reply(s, "250 2.0.0 Ok: discarded\r\n");
        } else if (verb_is(line, "RSET") || verb_is(line, "NOOP")) {
            rc = sess_reply(s, "250 2.0.0 Ok\r\n");
        } else if (verb_is(line, "QUIT")) {
            if (sess_reply(s, "221 2.0.0 Bye\r\n") == 0)
                (void)sess_flush(s);
            quit = true;
            break;
        } else {
            rc = sess_reply(s, "502 5.5.2 Command not recognized\r\n");
        }
        if (rc < 0)
            break;
    }
out:
    if (s->ssl != NULL) {
        if (quit)
            (void)SSL_shutdown(s->ssl);
        SSL_free(s->ssl);
        s->ssl = NULL;
    }
    ERR_clear_error();
    close(s->fd);
    count_event(&n_sess, quit ? &n_quit : NULL);
}

static void *
sess_thread(void *arg)
{
    struct sess *s = arg;
    sess_run(s);
    free(s);
    pthread_mutex_lock(&lock);
    n_conns--;
    pthread_mutex_unlock(&lock);
    return NULL;
}

static void
on_term(int sig)
{
    (void)sig;
    stopping = 1;
}

static void
usage(void)
{
    fprintf(stderr, "usage: tls_sink -l HOST:PORT -c CERT -k KEY -o COUNTFILE [-t MAXSECS]\n");
    exit(2);
}

int
main(int argc, char **argv)
{
    const char *listen_at = NULL, *cert = NULL, *key = NULL, *countfile = NULL;
    double maxsecs = 3600;
    int opt;
    while ((opt = getopt(argc, argv, "l:c:k:o:t:")) != -1) {
        switch (opt) {
        case 'l': listen_at = optarg; break;
        case 'c': cert = optarg; break;
        case 'k': key = optarg; break;
        case 'o': countfile = optarg; break;
        case 't': maxsecs = atof(optarg); break;
        default: usage();
        }
    }
    if (listen_at == NULL || cert == NULL || key == NULL || countfile == NULL)
        usage();
    const char *colon = strrchr(listen_at, ':');
    if (colon == NULL)
        usage();
    char host[64];
    snprintf(host, sizeof(host), "%.*s", (int)(colon - listen_at), listen_at);
    struct sockaddr_in sa = { .sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(colon + 1)) };
    if (inet_pton(AF_INET, host, &sa.sin_addr) != 1)
        usage();

    ctx = SSL_CTX_new(TLS_server_method());
    if (ctx == NULL || SSL_CTX_set_min_proto_version(ctx, TLS1_2_VERSION) != 1 ||
        SSL_CTX_use_certificate_chain_file(ctx, cert) != 1 ||
        SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1 ||
        SSL_CTX_check_private_key(ctx) != 1) {
        ERR_print_errors_fp(stderr);
        return 1;
    }
    static const unsigned char sid_ctx[] = "tls_sink";
    SSL_CTX_set_session_id_context(ctx, sid_ctx, sizeof(sid_ctx) - 1);

    count_fd = open(countfile, O_WRONLY | O_CREAT | O_APPEND | O_TRUNC, 0644);
    if (count_fd < 0) {
        perror(countfile);
        return 1;
    }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof(sa)) < 0 || listen(ls, 1024) < 0) {
        perror(listen_at);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction act = { .sa_handler = on_term };
    sigaction(SIGTERM, &act, NULL);
    sigaction(SIGINT, &act, NULL);
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&attr, 256 * 1024);

    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (!stopping) {
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((double)(t.tv_sec - t0.tv_sec) + (double)(t.tv_nsec - t0.tv_nsec) / 1e9 > maxsecs)
            break;
        struct pollfd p = { .fd = ls, .events = POLLIN };
        if (poll(&p, 1, 200) <= 0)
            continue;
        int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0)
            continue;
        struct timeval tv = { .tv_sec = IO_TIMEOUT_S };
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
        pthread_mutex_lock(&lock);
        bool full = n_conns >= MAX_CONNS;
        if (!full)
            n_conns++;
        pthread_mutex_unlock(&lock);
        struct sess *s = full ? NULL : calloc(1, sizeof(*s));
        pthread_t th;
        if (s == NULL) {
            close(fd);
            if (!full) {
                pthread_mutex_lock(&lock);
                n_conns--;
                pthread_mutex_unlock(&lock);
            }
            continue;
        }
        s->fd = fd;
        if (pthread_create(&th, &attr, sess_thread, s) != 0) {
            close(fd);
            free(s);
            pthread_mutex_lock(&lock);
            n_conns--;
            pthread_mutex_unlock(&lock);
        }
    }
    close(ls);
    return 0;
}
