/*
 * test_milter_filter — a libmilter filter for petrel's milter tests. Each
 * test picks its behaviour on the command line and reads back what the
 * filter saw from its log file.
 *
 *   test_milter_filter -s SOCKET [-l LOGFILE] [options]
 *     -s unix:/path | inet:PORT@127.0.0.1 | inet6:PORT@::1   (smfi_setconn)
 *     -l FILE       append one line per event seen (see below)
 *     -a STAGE=ACTION
 *                   what to answer at STAGE: connect helo mail rcpt data header
 *                   eoh body eom, or rcpt:ADDR (that recipient only, as the
 *                   filter gets it, e.g. rcpt:<bob@example.org>). ACTION:
 *                     continue | accept | reject | tempfail | discard | skip
 *                     reply:CODE:ESC:TEXT       smfi_setreply, then reject/tempfail
 *                     mlreply:CODE:ESC:L1|L2|…  smfi_setmlreply (≤ 8 lines)
 *                     sleep:SECONDS             sleep, then continue
 *                     progress:N:SECONDS        (eom) N× smfi_progress, sleeping between
 *                     exit                      _exit(0): the socket closes mid-stage
 *     -m MOD        a modification at end of message, in order given:
 *                     addheader:NAME:VALUE      insheader:IDX:NAME:VALUE
 *                     chgheader:NAME:IDX:VALUE  delheader:NAME:IDX
 *                     chgfrom:ADDR[:ARGS]       addrcpt:ADDR  addrcpt_par:ADDR:ARGS
 *                     delrcpt:ADDR              replbody:TEXT  quarantine:REASON
 *                   VALUE/TEXT take \n \r \t \\ escapes.
 *     -p FLAGS      protocol flags to ask for, comma-separated: noconnect nohelo
 *                   nomail norcpt nobody nohdrs noeoh nodata nr_conn nr_helo
 *                   nr_mail nr_rcpt nr_data nr_hdr nr_eoh nr_body skip leadspc
 *     -y STAGE:LIST macro list for a stage (smfi_setsymlist), e.g. "mail:{mail_addr} i"
 *     -A            negotiate no actions (SMFIF_NONE)
 *
 * Log lines (values escaped: \r \n \\ \xNN):
 *   ready
 *   negotiate actions=0xN protocol=0xN
 *   connect host=H family=4|6|L|U addr=A port=P
 *   macro STAGE NAME=VALUE        (every known macro defined at that stage)
 *   helo NAME / mail ARG… / rcpt ARG… / data / header NAME: VALUE / eoh
 *   body LEN BYTES / eom / abort / close
 */
#include <arpa/inet.h>
#include <libmilter/mfapi.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#define MAX_RULES 32
#define MAX_MODS 64

struct rule {
    char stage[300]; /* "rcpt" or "rcpt:<addr>" etc. */
    char action[4096];
};

static struct rule rules[MAX_RULES];
static int nrules;
static char *mods[MAX_MODS];
static int nmods;
static unsigned long want_pflags;
static char *symlists[7];
static bool no_actions;
static FILE *logfp;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static const char *const known_macros[] = {
    "j",
    "_",
    "v",
    "i",
    "{daemon_name}",
    "{daemon_addr}",
    "{daemon_port}",
    "{if_name}",
    "{if_addr}",
    "{client_addr}",
    "{client_port}",
    "{client_name}",
    "{auth_type}",
    "{auth_authen}",
    "{mail_addr}",
    "{mail_host}",
    "{mail_mailer}",
    "{rcpt_addr}",
    "{rcpt_host}",
    "{rcpt_mailer}",
    "{tls_version}",
    "{cipher}",
};

static void logline(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

static void
logline(const char *fmt, ...)
{
    if (logfp == NULL)
        return;
    va_list ap;
    va_start(ap, fmt);
    pthread_mutex_lock(&log_lock);
    vfprintf(logfp, fmt, ap);
    fputc('\n', logfp);
    fflush(logfp);
    pthread_mutex_unlock(&log_lock);
    va_end(ap);
}

/* Escaped copy of n bytes (caller frees). */
static char *
esc(const char *p, size_t n)
{
    char *out = malloc(n * 4 + 1);
    size_t o = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\r') {
            out[o++] = '\\';
            out[o++] = 'r';
        } else if (c == '\n') {
            out[o++] = '\\';
            out[o++] = 'n';
        } else if (c == '\\') {
            out[o++] = '\\';
            out[o++] = '\\';
        } else if (c < 0x20 || c >= 0x7f) {
            o += (size_t)snprintf(out + o, 5, "\\x%02x", c);
        } else {
            out[o++] = (char)c;
        }
    }
    out[o] = '\0';
    return out;
}

/* Decodes \n \r \t \\ in place. */
static char *
unesc(char *s)
{
    char *w = s;
    for (char *r = s; *r; r++) {
        if (*r == '\\' && r[1]) {
            r++;
            *w++ = *r == 'n' ? '\n' : *r == 'r' ? '\r' : *r == 't' ? '\t' : *r;
        } else {
            *w++ = *r;
        }
    }
    *w = '\0';
    return s;
}

static void
log_macros(SMFICTX *ctx, const char *stage)
{
    for (size_t i = 0; i < sizeof(known_macros) / sizeof(known_macros[0]); i++) {
        char *v = smfi_getsymval(ctx, (char *)known_macros[i]);
        if (v == NULL)
            continue;
        char *e = esc(v, strlen(v));
        logline("macro %s %s=%s", stage, known_macros[i], e);
        free(e);
    }
}

static const char *
find_action(const char *stage, const char *arg)
{
    if (arg != NULL) {
        char key[300];
        snprintf(key, sizeof(key), "%s:%s", stage, arg);
        for (int i = 0; i < nrules; i++)
            if (strcmp(rules[i].stage, key) == 0)
                return rules[i].action;
    }
    for (int i = 0; i < nrules; i++)
        if (strcmp(rules[i].stage, stage) == 0)
            return rules[i].action;
    return "continue";
}

/* Splits s at the first ':' (returns the rest or NULL). */
static char *
split(char *s)
{
    char *c = strchr(s, ':');
    if (c == NULL)
        return NULL;
    *c = '\0';
    return c + 1;
}

static sfsistat
act(SMFICTX *ctx, const char *stage, const char *arg)
{
    char a[4096];
    snprintf(a, sizeof(a), "%s", find_action(stage, arg));
    if (strcmp(a, "continue") == 0)
        return SMFIS_CONTINUE;
    if (strcmp(a, "accept") == 0)
        return SMFIS_ACCEPT;
    if (strcmp(a, "reject") == 0)
        return SMFIS_REJECT;
    if (strcmp(a, "tempfail") == 0)
        return SMFIS_TEMPFAIL;
    if (strcmp(a, "discard") == 0)
        return SMFIS_DISCARD;
    if (strcmp(a, "skip") == 0)
        return SMFIS_SKIP;
    if (strcmp(a, "exit") == 0) {
        logline("exit %s", stage);
        _exit(0);
    }
    char *rest = split(a);
    if (strcmp(a, "sleep") == 0 && rest != NULL) {
        sleep((unsigned)atoi(rest));
        return SMFIS_CONTINUE;
    }
    if (strcmp(a, "progress") == 0 && rest != NULL) {
        char *secs = split(rest);
        int n = atoi(rest);
        for (int i = 0; i < n; i++) {
            sleep(secs != NULL ? (unsigned)atoi(secs) : 1);
            smfi_progress(ctx);
        }
        return SMFIS_CONTINUE;
    }
    if ((strcmp(a, "reply") == 0 || strcmp(a, "mlreply") == 0) && rest != NULL) {
        char *code = rest;
        char *xcode = split(code);
        char *text = xcode != NULL ? split(xcode) : NULL;
        if (text == NULL)
            return SMFIS_TEMPFAIL;
        unesc(text);
        int r;
        if (strcmp(a, "reply") == 0) {
            r = smfi_setreply(ctx, code, xcode[0] ? xcode : NULL, text);
        } else {
            char *l[8] = {0};
            int nl = 0;
            for (char *p = text; p != NULL && nl < 8;) {
                l[nl++] = p;
                p = strchr(p, '|');
                if (p != NULL)
                    *p++ = '\0';
            }
            r = smfi_setmlreply(ctx, code, xcode[0] ? xcode : NULL, l[0], l[1], l[2], l[3], l[4],
                                l[5], l[6], l[7], (char *)NULL);
        }
        if (r != MI_SUCCESS)
            logline("setreply failed");
        return code[0] == '4' ? SMFIS_TEMPFAIL : SMFIS_REJECT;
    }
    logline("unknown action %s", a);
    return SMFIS_CONTINUE;
}

static sfsistat
on_negotiate(SMFICTX *ctx, unsigned long f0, unsigned long f1, unsigned long f2, unsigned long f3,
             unsigned long *pf0, unsigned long *pf1, unsigned long *pf2, unsigned long *pf3)
{
    logline("negotiate actions=0x%lx protocol=0x%lx", f0, f1);
    *pf0 = no_actions ? 0 : f0;
    *pf1 = want_pflags & f1;
    *pf2 = 0;
    *pf3 = 0;
    (void)f2;
    (void)f3;
    for (int i = 0; i < 7; i++) {
        if (symlists[i] != NULL && smfi_setsymlist(ctx, i, symlists[i]) != MI_SUCCESS)
            logline("setsymlist %d failed", i);
    }
    return SMFIS_CONTINUE;
}

static sfsistat
on_connect(SMFICTX *ctx, char *host, _SOCK_ADDR *sa)
{
    char addr[sizeof(((struct sockaddr_un *)0)->sun_path) + 1] = "";
    int port = 0;
    char fam = 'U';
    if (sa != NULL && sa->sa_family == AF_INET) {
        struct sockaddr_in *s4 = (struct sockaddr_in *)sa;
        inet_ntop(AF_INET, &s4->sin_addr, addr, sizeof(addr));
        port = ntohs(s4->sin_port);
        fam = '4';
    } else if (sa != NULL && sa->sa_family == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)sa;
        inet_ntop(AF_INET6, &s6->sin6_addr, addr, sizeof(addr));
        port = ntohs(s6->sin6_port);
        fam = '6';
    } else if (sa != NULL && sa->sa_family == AF_UNIX) {
        fam = 'L';
        snprintf(addr, sizeof(addr), "%s", ((struct sockaddr_un *)sa)->sun_path);
    }
    logline("connect host=%s family=%c addr=%s port=%d", host, fam, addr, port);
    log_macros(ctx, "connect");
    return act(ctx, "connect", NULL);
}

static sfsistat
on_helo(SMFICTX *ctx, char *helo)
{
    logline("helo %s", helo);
    log_macros(ctx, "helo");
    return act(ctx, "helo", NULL);
}

static void
log_argv(const char *what, char **argv)
{
    char line[8192];
    size_t o = (size_t)snprintf(line, sizeof(line), "%s", what);
    for (int i = 0; argv[i] != NULL && o < sizeof(line); i++)
        o += (size_t)snprintf(line + o, sizeof(line) - o, " %s", argv[i]);
    logline("%s", line);
}

static sfsistat
on_envfrom(SMFICTX *ctx, char **argv)
{
    log_argv("mail", argv);
    log_macros(ctx, "mail");
    return act(ctx, "mail", NULL);
}

static sfsistat
on_envrcpt(SMFICTX *ctx, char **argv)
{
    log_argv("rcpt", argv);
    log_macros(ctx, "rcpt");
    return act(ctx, "rcpt", argv[0]);
}

static sfsistat
on_data(SMFICTX *ctx)
{
    logline("data");
    log_macros(ctx, "data");
    return act(ctx, "data", NULL);
}

static sfsistat
on_header(SMFICTX *ctx, char *name, char *value)
{
    char *e = esc(value, strlen(value));
    logline("header %s: %s", name, e);
    free(e);
    return act(ctx, "header", name);
}

static sfsistat
on_eoh(SMFICTX *ctx)
{
    logline("eoh");
    log_macros(ctx, "eoh");
    return act(ctx, "eoh", NULL);
}

static sfsistat
on_body(SMFICTX *ctx, unsigned char *p, size_t n)
{
    char *e = esc((const char *)p, n);
    logline("body %zu %s", n, e);
    free(e);
    return act(ctx, "body", NULL);
}

static int
do_mod(SMFICTX *ctx, char *spec)
{
    char buf[8192];
    snprintf(buf, sizeof(buf), "%s", spec);
    char *kind = buf;
    char *a = split(kind);
    if (a == NULL)
        return MI_FAILURE;
    if (strcmp(kind, "addheader") == 0) {
        char *v = split(a);
        return smfi_addheader(ctx, a, unesc(v ? v : (char *)""));
    }
    if (strcmp(kind, "insheader") == 0) {
        char *name = split(a);
        char *v = name ? split(name) : NULL;
        return smfi_insheader(ctx, atoi(a), name, unesc(v ? v : (char *)""));
    }
    if (strcmp(kind, "chgheader") == 0) {
        char *idx = split(a);
        char *v = idx ? split(idx) : NULL;
        return smfi_chgheader(ctx, a, atoi(idx ? idx : "1"), unesc(v ? v : (char *)""));
    }
    if (strcmp(kind, "delheader") == 0) {
        char *idx = split(a);
        return smfi_chgheader(ctx, a, atoi(idx ? idx : "1"), NULL);
    }
    if (strcmp(kind, "chgfrom") == 0) {
        char *args = split(a);
        return smfi_chgfrom(ctx, a, args);
    }
    if (strcmp(kind, "addrcpt") == 0)
        return smfi_addrcpt(ctx, a);
    if (strcmp(kind, "addrcpt_par") == 0) {
        char *args = split(a);
        return smfi_addrcpt_par(ctx, a, args);
    }
    if (strcmp(kind, "delrcpt") == 0)
        return smfi_delrcpt(ctx, a);
    if (strcmp(kind, "replbody") == 0) {
        unesc(a);
        return smfi_replacebody(ctx, (unsigned char *)a, (int)strlen(a));
    }
    if (strcmp(kind, "quarantine") == 0)
        return smfi_quarantine(ctx, a);
    return MI_FAILURE;
}

static sfsistat
on_eom(SMFICTX *ctx)
{
    logline("eom");
    log_macros(ctx, "eom");
    for (int i = 0; i < nmods; i++) {
        if (do_mod(ctx, mods[i]) != MI_SUCCESS)
            logline("mod failed %s", mods[i]);
    }
    return act(ctx, "eom", NULL);
}

static sfsistat
on_abort(SMFICTX *ctx)
{
    (void)ctx;
    logline("abort");
    return SMFIS_CONTINUE;
}

static sfsistat
on_close(SMFICTX *ctx)
{
    (void)ctx;
    logline("close");
    return SMFIS_CONTINUE;
}

static const struct {
    const char *name;
    unsigned long flag;
} pflag_names[] = {
    {"noconnect", SMFIP_NOCONNECT}, {"nohelo", SMFIP_NOHELO},   {"nomail", SMFIP_NOMAIL},
    {"norcpt", SMFIP_NORCPT},       {"nobody", SMFIP_NOBODY},   {"nohdrs", SMFIP_NOHDRS},
    {"noeoh", SMFIP_NOEOH},         {"nodata", SMFIP_NODATA},   {"nr_conn", SMFIP_NR_CONN},
    {"nr_helo", SMFIP_NR_HELO},     {"nr_mail", SMFIP_NR_MAIL}, {"nr_rcpt", SMFIP_NR_RCPT},
    {"nr_data", SMFIP_NR_DATA},     {"nr_hdr", SMFIP_NR_HDR},   {"nr_eoh", SMFIP_NR_EOH},
    {"nr_body", SMFIP_NR_BODY},     {"skip", SMFIP_SKIP},       {"leadspc", SMFIP_HDR_LEADSPC},
};

static const char *const stage_names[7] = {"connect", "helo", "mail", "rcpt", "data", "eom", "eoh"};

static void
usage(void)
{
    fprintf(stderr, "usage: test_milter_filter -s SOCKET [-l LOG] [-a STAGE=ACTION] [-m MOD] "
                    "[-p FLAGS] [-y STAGE:LIST] [-A]\n");
    exit(2);
}

int
main(int argc, char **argv)
{
    const char *sock = NULL;
    const char *logpath = NULL;
    int c;
    while ((c = getopt(argc, argv, "s:l:a:m:p:y:A")) != -1) {
        switch (c) {
        case 's':
            sock = optarg;
            break;
        case 'l':
            logpath = optarg;
            break;
        case 'a': {
            char *eq = strchr(optarg, '=');
            if (eq == NULL || nrules == MAX_RULES)
                usage();
            snprintf(rules[nrules].stage, sizeof(rules[nrules].stage), "%.*s", (int)(eq - optarg),
                     optarg);
            snprintf(rules[nrules].action, sizeof(rules[nrules].action), "%s", eq + 1);
            nrules++;
            break;
        }
        case 'm':
            if (nmods == MAX_MODS)
                usage();
            mods[nmods++] = optarg;
            break;
        case 'p': {
            char *s = strdup(optarg);
            for (char *t = strtok(s, ","); t != NULL; t = strtok(NULL, ",")) {
                size_t i = 0;
                while (i < sizeof(pflag_names) / sizeof(pflag_names[0]) &&
                       strcmp(pflag_names[i].name, t) != 0)
                    i++;
                if (i == sizeof(pflag_names) / sizeof(pflag_names[0]))
                    usage();
                want_pflags |= pflag_names[i].flag;
            }
            free(s);
            break;
        }
        case 'y': {
            char *colon = strchr(optarg, ':');
            if (colon == NULL)
                usage();
            int i = 0;
            while (i < 7 && strncmp(stage_names[i], optarg, (size_t)(colon - optarg)) != 0)
                i++;
            if (i == 7)
                usage();
            symlists[i] = colon + 1;
            break;
        }
        case 'A':
            no_actions = true;
            break;
        default:
            usage();
        }
    }
    if (sock == NULL)
        usage();
    if (logpath != NULL && (logfp = fopen(logpath, "a")) == NULL) {
        perror(logpath);
        return 1;
    }
    struct smfiDesc desc = {
        .xxfi_name = (char *)"petrel-test",
        .xxfi_version = SMFI_VERSION,
        .xxfi_flags = SMFIF_ADDHDRS | SMFIF_CHGHDRS | SMFIF_CHGBODY | SMFIF_ADDRCPT |
                      SMFIF_ADDRCPT_PAR | SMFIF_DELRCPT | SMFIF_QUARANTINE | SMFIF_CHGFROM |
                      SMFIF_SETSYMLIST,
        .xxfi_connect = on_connect,
        .xxfi_helo = on_helo,
        .xxfi_envfrom = on_envfrom,
        .xxfi_envrcpt = on_envrcpt,
        .xxfi_header = on_header,
        .xxfi_eoh = on_eoh,
        .xxfi_body = on_body,
        .xxfi_eom = on_eom,
        .xxfi_abort = on_abort,
        .xxfi_close = on_close,
        .xxfi_data = on_data,
        .xxfi_negotiate = on_negotiate,
    };
    if (no_actions)
        desc.xxfi_flags = SMFIF_NONE;
    if (strncmp(sock, "unix:", 5) == 0)
        unlink(sock + 5);
    if (smfi_setconn((char *)sock) != MI_SUCCESS || smfi_register(desc) != MI_SUCCESS) {
        fprintf(stderr, "test_milter_filter: setconn/register failed\n");
        return 1;
    }
    if (smfi_opensocket(1) != MI_SUCCESS) {
        fprintf(stderr, "test_milter_filter: cannot open %s\n", sock);
        return 1;
    }
    logline("ready");
    return smfi_main() == MI_SUCCESS ? 0 : 1;
}
