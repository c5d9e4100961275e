/*
 * example_milter — a small libmilter content filter to start from.
 *
 * What it does, for every message:
 *   - rejects it with "550 5.7.1 Message contains a forbidden word" when the
 *     body contains KEYWORD (ASCII case-insensitive; found even when it
 *     spans two of the body chunks the MTA sends);
 *   - otherwise adds the header "X-Example-Milter: seen".
 *
 * Build (Debian: apt-get install libmilter-dev):
 *   cc -o example_milter example_milter.c -lmilter -lpthread
 * Run:
 *   ./example_milter -s unix:/run/example-milter.sock [-k KEYWORD]
 *   ./example_milter -s inet:8899@127.0.0.1 -k viagra
 * and point petrel at the same socket (examples/milter/README.md).
 *
 * How a libmilter filter is put together:
 *   - struct smfiDesc lists the callbacks and the actions the filter may
 *     take (here SMFIF_ADDHDRS: add headers);
 *   - xxfi_negotiate tells the MTA which stages the filter wants to see:
 *     this one only needs the body and the end of message, so it asks the
 *     MTA not to send the connection, HELO, envelope and header stages;
 *   - one struct msg_state per SMTP connection (smfi_setpriv), reset at the
 *     end of every message (eom / abort) and freed at close;
 *   - libmilter runs the callbacks of different connections in different
 *     threads, so nothing here is shared between connections except the
 *     read-only keyword.
 */
#include <libmilter/mfapi.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define KEYWORD_MAX 256

static const char *keyword = "forbidden";
static size_t keyword_len;

struct msg_state {
    bool found;             /* the keyword was seen in this message's body */
    size_t tail_len;        /* bytes kept from the end of the previous chunk */
    char tail[KEYWORD_MAX]; /* ... so that a keyword across two chunks is found */
};

static int
lower(int c)
{
    return c >= 'A' && c <= 'Z' ? c - 'A' + 'a' : c;
}

/* Whether keyword occurs in p[0..n), ASCII case-insensitively. */
static bool
contains_keyword(const unsigned char *p, size_t n)
{
    if (n < keyword_len)
        return false;
    for (size_t i = 0; i + keyword_len <= n; i++) {
        size_t k = 0;
        while (k < keyword_len && lower(p[i + k]) == lower((unsigned char)keyword[k]))
            k++;
        if (k == keyword_len)
            return true;
    }
    return false;
}

static struct msg_state *
state(SMFICTX *ctx)
{
    struct msg_state *st = smfi_getpriv(ctx);
    if (st == NULL) {
        st = calloc(1, sizeof(*st));
        if (st != NULL)
            smfi_setpriv(ctx, st);
    }
    return st;
}

static void
reset(SMFICTX *ctx)
{
    struct msg_state *st = smfi_getpriv(ctx);
    if (st != NULL)
        memset(st, 0, sizeof(*st));
}

static sfsistat
on_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3,
             unsigned long *pf0, unsigned long *pf1, unsigned long *pf2, unsigned long *pf3)
{
    (void)ctx;
    (void)f2;
    (void)f3;
    if ((f0 & SMFIF_ADDHDRS) == 0)
        return SMFIS_REJECT; /* the MTA cannot add headers: refuse to work with it */
    *pf0 = SMFIF_ADDHDRS;
    /* Skip the stages this filter does not look at (when the MTA allows it). */
    unsigned long skip = SMFIP_NOCONNECT | SMFIP_NOHELO | SMFIP_NOMAIL | SMFIP_NORCPT |
                         SMFIP_NOHDRS | SMFIP_NOEOH | SMFIP_NODATA | SMFIP_NOUNKNOWN;
    *pf1 = f1 & skip;
    *pf2 = 0;
    *pf3 = 0;
    return SMFIS_CONTINUE;
}

static sfsistat
on_body(SMFICTX *ctx, unsigned char *chunk, size_t len)
{
    struct msg_state *st = state(ctx);
    if (st == NULL)
        return SMFIS_TEMPFAIL; /* out of memory: let the client try again later */
    if (st->found)
        return SMFIS_CONTINUE;
    /* Look at the tail of the previous chunk followed by this chunk. */
    unsigned char *buf = malloc(st->tail_len + len);
    if (buf == NULL)
        return SMFIS_TEMPFAIL;
    memcpy(buf, st->tail, st->tail_len);
    memcpy(buf + st->tail_len, chunk, len);
    size_t n = st->tail_len + len;
    st->found = contains_keyword(buf, n);
    /* Keep the last keyword_len - 1 bytes for the next chunk. */
    size_t keep = n < keyword_len - 1 ? n : keyword_len - 1;
    memcpy(st->tail, buf + n - keep, keep);
    st->tail_len = keep;
    free(buf);
    return SMFIS_CONTINUE;
}

static sfsistat
on_eom(SMFICTX *ctx)
{
    struct msg_state *st = smfi_getpriv(ctx);
    bool found = st != NULL && st->found;
    reset(ctx);
    if (found) {
        if (smfi_setreply(ctx, (char *)"550", (char *)"5.7.1",
                          (char *)"Message contains a forbidden word") != MI_SUCCESS)
            return SMFIS_TEMPFAIL;
        return SMFIS_REJECT;
    }
    if (smfi_addheader(ctx, (char *)"X-Example-Milter", (char *)"seen") != MI_SUCCESS)
        return SMFIS_TEMPFAIL;
    return SMFIS_CONTINUE;
}

static sfsistat
on_abort(SMFICTX *ctx)
{
    reset(ctx);
    return SMFIS_CONTINUE;
}

static sfsistat
on_close(SMFICTX *ctx)
{
    free(smfi_getpriv(ctx));
    smfi_setpriv(ctx, NULL);
    return SMFIS_CONTINUE;
}

static void
usage(void)
{
    fprintf(stderr, "usage: example_milter -s unix:/path|inet:PORT@HOST [-k KEYWORD]\n");
    exit(2);
}

int
main(int argc, char **argv)
{
    const char *sock = NULL;
    int c;
    while ((c = getopt(argc, argv, "s:k:")) != -1) {
        switch (c) {
        case 's':
            sock = optarg;
            break;
        case 'k':
            keyword = optarg;
            break;
        default:
            usage();
        }
    }
    keyword_len = strlen(keyword);
    if (sock == NULL || keyword_len == 0 || keyword_len > KEYWORD_MAX)
        usage();

    struct smfiDesc desc = {
        .xxfi_name = (char *)"example_milter",
        .xxfi_version = SMFI_VERSION,
        .xxfi_flags = SMFIF_ADDHDRS,
        .xxfi_body = on_body,
        .xxfi_eom = on_eom,
        .xxfi_abort = on_abort,
        .xxfi_close = on_close,
        .xxfi_negotiate = on_negotiate,
    };
    if (strncmp(sock, "unix:", 5) == 0)
        unlink(sock + 5); /* a socket left over from an earlier run */
    if (smfi_setconn((char *)sock) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS) {
        fprintf(stderr, "example_milter: bad socket %s\n", sock);
        return 1;
    }
    if (smfi_opensocket(1) != MI_SUCCESS) {
        fprintf(stderr, "example_milter: cannot listen on %s\n", sock);
        return 1;
    }
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
