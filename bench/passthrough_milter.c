/*
 * passthrough_milter — the benchmark's milter (bench/run.sh, scenario
 * "milter"): a libmilter filter that asks for every stage of every message
 * (connect, HELO, MAIL, each RCPT, DATA, each header, end of headers, the
 * body, end of message), changes nothing and answers "continue" each time.
 * It measures what consulting one filter costs an MTA: the protocol round
 * trips and the copy of the message to the filter, not any filtering.
 *
 *   passthrough_milter -s inet:PORT@127.0.0.1 [-c COUNTFILE]
 *
 * -c: after each end of message, the number of messages seen so far is
 * written to COUNTFILE (one line, overwritten in place), so the harness can
 * check that the filter really saw every message of a run.
 *
 * Build: cc -O2 -o passthrough_milter passthrough_milter.c -lmilter -lpthread
 */
#include <fcntl.h>
#include <libmilter/mfapi.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static int count_fd = -1;
static unsigned long count;
static pthread_mutex_t count_lock = PTHREAD_MUTEX_INITIALIZER;

static void
count_message(void)
{
    pthread_mutex_lock(&count_lock);
    count++;
    if (count_fd >= 0) {
        char line[32];
        int n = snprintf(line, sizeof(line), "%020lu\n", count);
        if (n > 0 && pwrite(count_fd, line, (size_t)n, 0) != n)
            perror("passthrough_milter: count file");
    }
    pthread_mutex_unlock(&count_lock);
}

static sfsistat
on_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3,
             unsigned long *pf0, unsigned long *pf1, unsigned long *pf2, unsigned long *pf3)
{
    (void)ctx;
    (void)f0;
    (void)f1;
    (void)f2;
    (void)f3;
    *pf0 = 0; /* no modifications */
    *pf1 = 0; /* every stage, every reply awaited: the full protocol cost */
    *pf2 = 0;
    *pf3 = 0;
    return SMFIS_CONTINUE;
}

static sfsistat
on_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *sa)
{
    (void)ctx;
    (void)host;
    (void)sa;
    return SMFIS_CONTINUE;
}

static sfsistat
on_helo(SMFICTX *ctx, char *helo)
{
    (void)ctx;
    (void)helo;
    return SMFIS_CONTINUE;
}

static sfsistat
on_argv(SMFICTX *ctx, char **argv)
{
    (void)ctx;
    (void)argv;
    return SMFIS_CONTINUE;
}

static sfsistat
on_header(SMFICTX *ctx, char *name, char *value)
{
    (void)ctx;
    (void)name;
    (void)value;
    return SMFIS_CONTINUE;
}

static sfsistat
on_ctx(SMFICTX *ctx)
{
    (void)ctx;
    return SMFIS_CONTINUE;
}

static sfsistat
on_body(SMFICTX *ctx, unsigned char *p, size_t n)
{
    (void)ctx;
    (void)p;
    (void)n;
    return SMFIS_CONTINUE;
}

static sfsistat
on_eom(SMFICTX *ctx)
{
    (void)ctx;
    count_message();
    return SMFIS_CONTINUE;
}

int
main(int argc, char **argv)
{
    const char *sock = NULL;
    const char *countfile = NULL;
    int c;
    while ((c = getopt(argc, argv, "s:c:")) != -1) {
        switch (c) {
        case 's':
            sock = optarg;
            break;
        case 'c':
            countfile = optarg;
            break;
        default:
            sock = NULL;
            optind = argc;
            break;
        }
    }
    if (sock == NULL) {
        fprintf(stderr, "usage: passthrough_milter -s SOCKET [-c COUNTFILE]\n");
        return 2;
    }
    if (countfile != NULL) {
        count_fd = open(countfile, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (count_fd < 0) {
            perror(countfile);
            return 1;
        }
        if (write(count_fd, "00000000000000000000\n", 21) != 21) {
            perror(countfile);
            return 1;
        }
    }
    struct smfiDesc desc = {
        .xxfi_name = (char *)"passthrough",
        .xxfi_version = SMFI_VERSION,
        .xxfi_flags = SMFIF_NONE,
        .xxfi_connect = on_connect,
        .xxfi_helo = on_helo,
        .xxfi_envfrom = on_argv,
        .xxfi_envrcpt = on_argv,
        .xxfi_header = on_header,
        .xxfi_eoh = on_ctx,
        .xxfi_body = on_body,
        .xxfi_eom = on_eom,
        .xxfi_abort = on_ctx,
        .xxfi_close = on_ctx,
        .xxfi_data = on_ctx,
        .xxfi_negotiate = on_negotiate,
    };
    if (strncmp(sock, "unix:", 5) == 0)
        unlink(sock + 5);
    if (smfi_setconn((char *)sock) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS ||
        smfi_opensocket(1) != MI_SUCCESS) {
        fprintf(stderr, "passthrough_milter: cannot listen on %s\n", sock);
        return 1;
    }
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
