/*
 * config — reads the YAML configuration into an immutable, refcounted
 * struct petrel_config, in three stages (h2o configurator + yoml):
 *   1. libyaml events → a tree of struct config_node keeping line and column;
 *   2. one option table, config_options[] (Valkey static_configs), giving each
 *      key its section, type, default and bounds; one generic mapping parser
 *      walks it section by section, rejecting unknown, duplicate, mistyped and
 *      missing keys and converting values (ms, bytes, CIDRs, sockaddrs);
 *   3. cross-checks between sections (listener milters exist, names unique…).
 * Errors are collected (several per run), sorted by position and returned as
 * "file:line:col: key.path: reason" lines. The only system calls besides
 * reading the file are gethostname() and the local-address probe (a UDP
 * socket bound to port 0): no DNS lookups.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <limits.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <yaml.h>

#include "buf.h"
#include "log.h"
#include "route.h"
#include "util.h"

/* Generated from config/petrel.yaml at build time (cmake/embed.cmake). */
extern const char petrel_default_config[];
extern const size_t petrel_default_config_len;

#define CONFIG_MAX_DEPTH 64        /* YAML nesting; the schema needs 4 */
#define CONFIG_MAX_ERRORS 100      /* shown per run; the rest are counted */
#define CONFIG_MAX_FILE (4u << 20) /* bytes */
#define CONFIG_WHY 256             /* room for a validator's reason */

#define SECONDS(n) ((uint64_t)(n)*1000)
#define MINUTES(n) (SECONDS(n) * 60)
#define HOURS(n) (MINUTES(n) * 60)
#define DAYS(n) (HOURS(n) * 24)
#define KIB(n) ((uint64_t)(n) << 10)
#define GIB(n) ((uint64_t)(n) << 30)

/* Escaped copy of config text for messages (valid until the end of the
 * enclosing full expression's block). */
#define CONFIG_VIS(s) str_vis((char[96]){0}, 96, (s), strlen(s))

_Static_assert(sizeof(enum listener_tls) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(enum listener_auth) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(enum delivery_tls) == sizeof(int), "enums are stored as int");
_Static_assert(sizeof(enum milter_action) == sizeof(int), "enums are stored as int");
_Static_assert(LOG_ERR == 0 && LOG_DEBUG == 3, "config_log_levels[] follows enum log_level");
_Static_assert(LOG_FORMAT_TEXT == 0 && LOG_FORMAT_JSON == 1, "config_log_formats[] order");

/* ---- node tree ----------------------------------------------------------- */

enum config_node_type { NODE_NULL, NODE_SCALAR, NODE_SEQ, NODE_MAP };

struct config_node {
    enum config_node_type type;
    int line;                  /* 1-based; 0 for built-in defaults */
    int col;                   /* 1-based */
    char *str;                 /* owned: scalar text ("" for null) */
    size_t len;                /* of str, which may hold NUL bytes */
    struct config_node **kids; /* owned: list items, or key, value, key, value… */
    size_t n;
    size_t cap;
};

static struct config_node *
config_node_new(enum config_node_type type, int line, int col)
{
    struct config_node *n = xcalloc(1, sizeof(*n));
    n->type = type;
    n->line = line;
    n->col = col;
    return n;
}

static void
config_node_free(struct config_node *n)
{
    if (n == NULL)
        return;
    for (size_t i = 0; i < n->n; i++)
        config_node_free(n->kids[i]);
    free(n->kids);
    free(n->str);
    free(n);
}

static void
config_node_add(struct config_node *parent, struct config_node *kid)
{
    if (parent->n == parent->cap) {
        parent->cap = parent->cap ? parent->cap * 2 : 8;
        parent->kids = xreallocarray(parent->kids, parent->cap, sizeof(*parent->kids));
    }
    parent->kids[parent->n++] = kid;
}

static bool
config_node_is(const struct config_node *n, const char *s)
{
    return n->len == strlen(s) && memcmp(n->str, s, n->len) == 0;
}

/* The value of key in mapping map, or NULL (map may be NULL or not a map). */
static const struct config_node *
config_node_get(const struct config_node *map, const char *key)
{
    if (map == NULL || map->type != NODE_MAP)
        return NULL;
    for (size_t i = 0; i + 1 < map->n; i += 2)
        if (config_node_is(map->kids[i], key))
            return map->kids[i + 1];
    return NULL;
}

/* Where to report about key of map: its value, else the map itself. */
static const struct config_node *
config_node_at(const struct config_node *map, const char *key)
{
    const struct config_node *v = config_node_get(map, key);
    return v != NULL ? v : map;
}

static const struct config_node *
config_node_item(const struct config_node *seq, size_t i)
{
    if (seq == NULL || seq->type != NODE_SEQ || i >= seq->n)
        return NULL;
    return seq->kids[i];
}

static const char *
config_node_kind(const struct config_node *n)
{
    switch (n->type) {
    case NODE_SCALAR:
        return "a scalar";
    case NODE_SEQ:
        return "a list";
    case NODE_MAP:
        return "a mapping";
    case NODE_NULL:
        break;
    }
    return "an empty value";
}

/* ---- errors and key paths ------------------------------------------------ */

struct config_error {
    int line;
    int col;
    size_t seq; /* order of detection, breaks ties */
    char *text; /* owned: the whole line, without newline */
};

struct config_ctx {
    const char *name;          /* borrowed: file name shown in errors */
    struct config_error *errs; /* owned */
    size_t nerrs;
    size_t dropped; /* errors beyond CONFIG_MAX_ERRORS */
    char path[256]; /* key path of the value being parsed */
    size_t plen;
};

static void __attribute__((format(printf, 4, 0)))
config_verr(struct config_ctx *cx, int line, int col, const char *fmt, va_list ap)
{
    if (cx->nerrs == CONFIG_MAX_ERRORS) {
        cx->dropped++;
        return;
    }
    struct buf b;
    buf_init(&b);
    buf_printf(&b, "%s:%d:%d: ", cx->name, line, col);
    if (cx->plen > 0)
        buf_printf(&b, "%s: ", cx->path);
    buf_vprintf(&b, fmt, ap);
    if (cx->nerrs % 16 == 0)
        cx->errs = xreallocarray(cx->errs, cx->nerrs + 16, sizeof(*cx->errs));
    struct config_error *e = &cx->errs[cx->nerrs];
    e->line = line;
    e->col = col;
    e->seq = cx->nerrs++;
    e->text = buf_steal(&b, NULL);
}

static void __attribute__((format(printf, 4, 5)))
config_err_at(struct config_ctx *cx, int line, int col, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    config_verr(cx, line, col, fmt, ap);
    va_end(ap);
}

/* Reports about node at (NULL: the start of the file) under the current path. */
static void __attribute__((format(printf, 3, 4)))
config_err(struct config_ctx *cx, const struct config_node *at, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    config_verr(cx, at ? at->line : 1, at ? at->col : 1, fmt, ap);
    va_end(ap);
}

static int
config_error_cmp(const void *a, const void *b)
{
    const struct config_error *x = a, *y = b;
    if (x->line != y->line)
        return x->line < y->line ? -1 : 1;
    if (x->col != y->col)
        return x->col < y->col ? -1 : 1;
    return x->seq < y->seq ? -1 : x->seq > y->seq;
}

/* Sorts the errors by position, joins them (one per line, each ended by a
 * newline) and frees them. */
static char *
config_errors_take(struct config_ctx *cx)
{
    struct buf b;
    buf_init(&b);
    qsort(cx->errs, cx->nerrs, sizeof(*cx->errs), config_error_cmp);
    for (size_t i = 0; i < cx->nerrs; i++) {
        buf_printf(&b, "%s\n", cx->errs[i].text);
        free(cx->errs[i].text);
    }
    if (cx->dropped > 0)
        buf_printf(&b, "%s: %zu more errors not shown\n", cx->name, cx->dropped);
    free(cx->errs);
    cx->errs = NULL;
    cx->nerrs = 0;
    return buf_steal(&b, NULL);
}

static size_t
config_path_append(struct config_ctx *cx, const char *sep, const char *part)
{
    size_t mark = cx->plen;
    size_t room = sizeof(cx->path) - cx->plen;
    int r = snprintf(cx->path + cx->plen, room, "%s%s", cx->plen > 0 ? sep : "", part);
    if (r > 0)
        cx->plen += (size_t)r < room ? (size_t)r : room - 1;
    return mark;
}

/* Appends ".key" (escaped) to the path; returns the mark to pop back to. */
static size_t
config_path_key(struct config_ctx *cx, const char *key, size_t len)
{
    char vis[96];
    str_vis(vis, sizeof(vis), key, len);
    return config_path_append(cx, ".", vis);
}

static size_t
config_path_index(struct config_ctx *cx, size_t i)
{
    char part[32];
    snprintf(part, sizeof(part), "[%zu]", i);
    size_t mark = cx->plen;
    size_t room = sizeof(cx->path) - cx->plen;
    if (str_copy(cx->path + cx->plen, room, part))
        cx->plen += strlen(part);
    return mark;
}

static void
config_path_pop(struct config_ctx *cx, size_t mark)
{
    cx->plen = mark;
    cx->path[mark] = '\0';
}

/* ---- YAML → node tree ---------------------------------------------------- */

static int
config_mark_line(yaml_mark_t m)
{
    return m.line < INT_MAX ? (int)m.line + 1 : INT_MAX;
}

static int
config_mark_col(yaml_mark_t m)
{
    return m.column < INT_MAX ? (int)m.column + 1 : INT_MAX;
}

/* Advice for the mistakes admins make most: "*:25" and "::1" unquoted (an
 * alias; a plain scalar libyaml refuses inside [ ] and { }), tabs. */
static const char *
config_yaml_hint(const yaml_parser_t *p, const char *text, size_t len)
{
    size_t at = p->problem_mark.index, ctx = p->context_mark.index;
    if (p->context != NULL && ctx < len && text[ctx] == '*')
        return "; quote values that start with '*', like \"*:25\"";
    if (at < len && text[at] == '\t')
        return "; indent with spaces, not tabs";
    if (p->error == YAML_PARSER_ERROR && at + 1 < len && text[at] == ':' &&
        strchr(" \t\r\n", text[at + 1]) == NULL)
        return "; quote values that start with ':', like \"::1\"";
    return "";
}

static void
config_yaml_error(struct config_ctx *cx, const yaml_parser_t *p, const char *text, size_t len)
{
    const char *problem = p->problem ? p->problem : "cannot parse the document";
    int line = config_mark_line(p->problem_mark), col = config_mark_col(p->problem_mark);
    if (p->error == YAML_READER_ERROR) {
        /* Reader errors (bad encoding) carry a byte offset, not a mark. */
        line = 1;
        col = 1;
        for (size_t i = 0; i < p->problem_offset && i < len; i++) {
            if (text[i] == '\n') {
                line++;
                col = 1;
            } else {
                col++;
            }
        }
    }
    const char *hint = config_yaml_hint(p, text, len);
    if (p->context != NULL)
        config_err_at(cx, line, col, "syntax error: %s (%s at line %d)%s", problem, p->context,
                      config_mark_line(p->context_mark), hint);
    else
        config_err_at(cx, line, col, "syntax error: %s%s", problem, hint);
}

static struct config_node *
config_node_scalar(const yaml_event_t *ev)
{
    static const char *const nulls[] = {"", "~", "null", "Null", "NULL"};
    const char *v = (const char *)ev->data.scalar.value;
    size_t len = ev->data.scalar.length;
    struct config_node *n = config_node_new(NODE_SCALAR, config_mark_line(ev->start_mark),
                                            config_mark_col(ev->start_mark));
    n->str = xstrndup(v, len);
    n->len = len;
    if (ev->data.scalar.plain_implicit) {
        for (size_t i = 0; i < ARRAY_SIZE(nulls); i++)
            if (config_node_is(n, nulls[i]))
                n->type = NODE_NULL;
    }
    return n;
}

struct config_reader {
    struct config_node *root;
    struct config_node *stack[CONFIG_MAX_DEPTH];
    size_t depth;
    int ndocs;
};

/* Hangs n under the open collection (or makes it the root); takes n. */
static bool
config_reader_attach(struct config_ctx *cx, struct config_reader *r, struct config_node *n)
{
    if (r->depth == 0) {
        r->root = n;
        return true;
    }
    struct config_node *parent = r->stack[r->depth - 1];
    if (parent->type == NODE_MAP && parent->n % 2 == 0 && n->type != NODE_SCALAR &&
        n->type != NODE_NULL) {
        config_err(cx, n, "syntax error: mapping keys must be scalars, got %s",
                   config_node_kind(n));
        config_node_free(n);
        return false;
    }
    config_node_add(parent, n);
    return true;
}

/* One event; false to stop reading (an error was reported). */
static bool
config_reader_event(struct config_ctx *cx, struct config_reader *r, const yaml_event_t *ev)
{
    int line = config_mark_line(ev->start_mark), col = config_mark_col(ev->start_mark);
    switch (ev->type) {
    case YAML_DOCUMENT_START_EVENT:
        if (++r->ndocs > 1) {
            config_err_at(cx, line, col, "syntax error: expected a single YAML document");
            return false;
        }
        return true;
    case YAML_ALIAS_EVENT:
        config_err_at(cx, line, col,
                      "syntax error: aliases (*%s) are not supported; quote values that start "
                      "with '*', like \"*:25\"",
                      CONFIG_VIS((const char *)ev->data.alias.anchor));
        return false;
    case YAML_SCALAR_EVENT:
        return config_reader_attach(cx, r, config_node_scalar(ev));
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT: {
        if (r->depth == CONFIG_MAX_DEPTH) {
            config_err_at(cx, line, col, "syntax error: nested more than %d levels deep",
                          CONFIG_MAX_DEPTH);
            return false;
        }
        enum config_node_type t = ev->type == YAML_MAPPING_START_EVENT ? NODE_MAP : NODE_SEQ;
        struct config_node *n = config_node_new(t, line, col);
        if (!config_reader_attach(cx, r, n))
            return false;
        r->stack[r->depth++] = n;
        return true;
    }
    case YAML_SEQUENCE_END_EVENT:
    case YAML_MAPPING_END_EVENT:
        if (r->depth > 0)
            r->depth--;
        return true;
    default:
        return true;
    }
}

/* Parses text into a node tree; NULL for an empty document or after errors
 * (then cx holds them). */
static struct config_node *
config_read_yaml(struct config_ctx *cx, const char *text, size_t len)
{
    yaml_parser_t p;
    if (!yaml_parser_initialize(&p))
        PANIC("yaml_parser_initialize: out of memory");
    yaml_parser_set_input_string(&p, (const unsigned char *)text, len);
    struct config_reader r = {0};
    bool ok = true;
    for (bool done = false; ok && !done;) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&p, &ev)) {
            config_yaml_error(cx, &p, text, len);
            ok = false;
            break;
        }
        done = ev.type == YAML_STREAM_END_EVENT;
        ok = config_reader_event(cx, &r, &ev);
        yaml_event_delete(&ev);
    }
    yaml_parser_delete(&p);
    if (!ok) {
        config_node_free(r.root);
        return NULL;
    }
    return r.root;
}

/* ---- value syntax (shared with other modules) ---------------------------- */

/* Decimal digits at *s into *v, advancing *s; false if none or overflow. */
static bool
config_parse_digits(const char **s, uint64_t *v)
{
    const char *p = *s;
    uint64_t x = 0;
    if (*p < '0' || *p > '9')
        return false;
    for (; *p >= '0' && *p <= '9'; p++) {
        unsigned d = (unsigned)(*p - '0');
        if (x > (UINT64_MAX - d) / 10)
            return false;
        x = x * 10 + d;
    }
    *s = p;
    *v = x;
    return true;
}

static bool
config_parse_uint(const char *s, uint64_t *v)
{
    return config_parse_digits(&s, v) && *s == '\0';
}

static bool
config_mul(uint64_t v, uint64_t unit, uint64_t *out)
{
    if (unit != 0 && v > UINT64_MAX / unit)
        return false;
    *out = v * unit;
    return true;
}

bool
config_parse_duration(const char *s, uint64_t *ms)
{
    static const struct {
        const char *suffix;
        uint64_t unit;
    } units[] = {
        {"ms", 1}, {"s", SECONDS(1)}, {"m", MINUTES(1)}, {"h", HOURS(1)}, {"d", DAYS(1)},
    };
    uint64_t v;
    if (!config_parse_digits(&s, &v))
        return false;
    for (size_t i = 0; i < ARRAY_SIZE(units); i++)
        if (strcmp(s, units[i].suffix) == 0)
            return config_mul(v, units[i].unit, ms);
    return false;
}

bool
config_parse_size(const char *s, uint64_t *bytes)
{
    uint64_t v;
    if (!config_parse_digits(&s, &v))
        return false;
    if (s[0] == '\0')
        return config_mul(v, 1, bytes);
    if (s[1] != '\0')
        return false;
    switch (s[0]) {
    case 'K':
    case 'k':
        return config_mul(v, KIB(1), bytes);
    case 'M':
    case 'm':
        return config_mul(v, KIB(1024), bytes);
    case 'G':
    case 'g':
        return config_mul(v, GIB(1), bytes);
    default:
        return false;
    }
}

static void
config_cidr_mask(struct cidr *c)
{
    unsigned bits = c->family == AF_INET ? 32 : 128;
    for (unsigned i = c->prefix; i < bits; i++)
        c->addr[i / 8] &= (uint8_t) ~(0x80u >> (i % 8));
}

bool
config_parse_cidr(const char *s, struct cidr *out)
{
    char host[INET6_ADDRSTRLEN];
    const char *slash = strchr(s, '/');
    size_t hlen = slash ? (size_t)(slash - s) : strlen(s);
    if (hlen == 0 || hlen >= sizeof(host))
        return false;
    memcpy(host, s, hlen);
    host[hlen] = '\0';
    struct cidr c = {0};
    if (inet_pton(AF_INET, host, c.addr) == 1)
        c.family = AF_INET;
    else if (inet_pton(AF_INET6, host, c.addr) == 1)
        c.family = AF_INET6;
    else
        return false;
    unsigned bits = c.family == AF_INET ? 32 : 128;
    c.prefix = bits;
    if (slash != NULL) {
        const char *p = slash + 1;
        uint64_t prefix;
        if (!config_parse_digits(&p, &prefix) || *p != '\0' || prefix > bits ||
            strlen(slash + 1) > 3)
            return false;
        c.prefix = (unsigned)prefix;
    }
    /* An IPv4-mapped IPv6 network is stored as the IPv4 network it means. */
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    if (c.family == AF_INET6 && c.prefix >= 96 && memcmp(c.addr, mapped, 12) == 0) {
        memmove(c.addr, c.addr + 12, 4);
        memset(c.addr + 4, 0, 12);
        c.family = AF_INET;
        c.prefix -= 96;
    }
    config_cidr_mask(&c);
    *out = c;
    return true;
}

/* "1..65535" spelled in at most 5 digits. */
static bool
config_parse_port(const char *s, unsigned *port)
{
    uint64_t v;
    if (strlen(s) > 5 || !config_parse_uint(s, &v) || v == 0 || v > 65535)
        return false;
    *port = (unsigned)v;
    return true;
}

/* A literal IPv4 or IPv6 address (no brackets) → sockaddr with port. */
static bool
config_parse_ip(const char *s, unsigned port, struct sockaddr_storage *ss, socklen_t *len)
{
    memset(ss, 0, sizeof(*ss));
    struct sockaddr_in *sin = (struct sockaddr_in *)ss;
    struct sockaddr_in6 *sin6 = (struct sockaddr_in6 *)ss;
    if (inet_pton(AF_INET, s, &sin->sin_addr) == 1) {
        sin->sin_family = AF_INET;
        sin->sin_port = htons((uint16_t)port);
        *len = sizeof(*sin);
        return true;
    }
    if (inet_pton(AF_INET6, s, &sin6->sin6_addr) == 1) {
        sin6->sin6_family = AF_INET6;
        sin6->sin6_port = htons((uint16_t)port);
        *len = sizeof(*sin6);
        return true;
    }
    return false;
}

bool
config_parse_hostport(const char *s, struct sockaddr_storage *ss, socklen_t *len)
{
    char host[INET6_ADDRSTRLEN];
    const char *colon;
    bool bracket = s[0] == '[';
    if (bracket) {
        const char *close = strchr(s, ']');
        if (close == NULL || close[1] != ':')
            return false;
        colon = close + 1;
        if ((size_t)(close - s - 1) >= sizeof(host))
            return false;
        memcpy(host, s + 1, (size_t)(close - s - 1));
        host[close - s - 1] = '\0';
    } else {
        colon = strrchr(s, ':');
        if (colon == NULL || (size_t)(colon - s) >= sizeof(host))
            return false;
        memcpy(host, s, (size_t)(colon - s));
        host[colon - s] = '\0';
        if (strchr(host, ':') != NULL) /* IPv6 needs brackets */
            return false;
    }
    unsigned port;
    if (!config_parse_port(colon + 1, &port) || host[0] == '\0')
        return false;
    if (bracket) {
        struct in6_addr a6;
        return inet_pton(AF_INET6, host, &a6) == 1 && config_parse_ip(host, port, ss, len);
    }
    if (strcmp(host, "*") == 0)
        return config_parse_ip("0.0.0.0", port, ss, len);
    if (strcmp(host, "localhost") == 0)
        return config_parse_ip("127.0.0.1", port, ss, len);
    struct in_addr a4;
    return inet_pton(AF_INET, host, &a4) == 1 && config_parse_ip(host, port, ss, len);
}

bool
cidr_match(const struct cidr *c, const struct sockaddr *sa)
{
    static const uint8_t mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};
    const uint8_t *a;
    int family = sa->sa_family;
    if (family == AF_INET) {
        a = (const uint8_t *)&((const struct sockaddr_in *)sa)->sin_addr;
    } else if (family == AF_INET6) {
        a = (const uint8_t *)&((const struct sockaddr_in6 *)sa)->sin6_addr;
        if (memcmp(a, mapped, 12) == 0) { /* ::ffff:a.b.c.d is the IPv4 client a.b.c.d */
            a += 12;
            family = AF_INET;
        }
    } else {
        return false;
    }
    if (family != c->family)
        return false;
    unsigned full = c->prefix / 8, rest = c->prefix % 8;
    if (memcmp(a, c->addr, full) != 0)
        return false;
    if (rest == 0)
        return true;
    uint8_t mask = (uint8_t)(0xffu << (8 - rest));
    return (a[full] & mask) == (c->addr[full] & mask);
}

bool
cidr_list_match(const struct cidr_list *l, const struct sockaddr *sa)
{
    for (size_t i = 0; i < l->n; i++)
        if (cidr_match(&l->v[i], sa))
            return true;
    return false;
}

/* ---- canonical spelling (the inverse of the parsers above) --------------- */

static void
config_format_duration(struct buf *b, uint64_t ms)
{
    static const struct {
        const char *suffix;
        uint64_t unit;
    } units[] = {
        {"d", DAYS(1)}, {"h", HOURS(1)}, {"m", MINUTES(1)}, {"s", SECONDS(1)}, {"ms", 1},
    };
    if (ms == 0) {
        buf_append_str(b, "0s");
        return;
    }
    for (size_t i = 0; i < ARRAY_SIZE(units); i++) {
        if (ms % units[i].unit == 0) {
            buf_printf(b, "%llu%s", (unsigned long long)(ms / units[i].unit), units[i].suffix);
            return;
        }
    }
}

static void
config_format_size(struct buf *b, uint64_t bytes)
{
    static const char suffix[] = "GMK";
    for (int i = 0; i < 3; i++) {
        uint64_t unit = (uint64_t)1 << (10 * (3 - i));
        if (bytes != 0 && bytes % unit == 0) {
            buf_printf(b, "%llu%c", (unsigned long long)(bytes / unit), suffix[i]);
            return;
        }
    }
    buf_printf(b, "%llu", (unsigned long long)bytes);
}

static void
config_format_cidr(struct buf *b, const struct cidr *c)
{
    char ip[INET6_ADDRSTRLEN];
    if (inet_ntop(c->family, c->addr, ip, sizeof(ip)) == NULL)
        ip[0] = '\0';
    buf_printf(b, "%s/%u", ip, c->prefix);
}

/* ---- validators: NULL if fine, else the reason (static or in why) --------- */

/* A validator may replace *v (owned) with its normal form. */
typedef const char *config_check_fn(char **v, char *why, size_t size);

static bool
config_is_ldh(int c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-';
}

/* RFC 1035 2.3.1 LDH labels of 1..63, 253 in all; the last label is not
 * all digits (that would be an address, written [1.2.3.4] in SMTP). */
static bool
config_valid_hostname(const char *s)
{
    size_t len = strlen(s), label = 0;
    bool digits = true;
    if (len == 0 || len > 253)
        return false;
    for (size_t i = 0; i <= len; i++) {
        int c = (unsigned char)s[i];
        if (c == '.' || c == '\0') {
            if (label == 0 || label > 63 || s[i - 1] == '-')
                return false;
            if (c == '\0')
                return !digits;
            label = 0;
            digits = true;
        } else if (config_is_ldh(c) && !(c == '-' && label == 0)) {
            digits = digits && c >= '0' && c <= '9';
            label++;
        } else {
            return false;
        }
    }
    return false;
}

static const char *
config_check_hostname(char **v, char *why, size_t size)
{
    if (config_valid_hostname(*v))
        return NULL;
    snprintf(why, size, "\"%s\" is not a valid hostname", CONFIG_VIS(*v));
    return why;
}

/* A domain, or "*.domain" for its subdomains; folded to lower case. */
static const char *
config_check_domain(char **v, char *why, size_t size)
{
    const char *d = strncmp(*v, "*.", 2) == 0 ? *v + 2 : *v;
    if (!config_valid_hostname(d)) {
        snprintf(why, size, "\"%s\" is not a valid domain", CONFIG_VIS(*v));
        return why;
    }
    for (char *p = *v; *p; p++)
        *p = (char)ascii_tolower((unsigned char)*p);
    return NULL;
}

/* Route domains may also be "*" (everything else). */
static const char *
config_check_route_domain(char **v, char *why, size_t size)
{
    if (strcmp(*v, "*") == 0)
        return NULL;
    return config_check_domain(v, why, size);
}

static const char *
config_check_name(char **v, char *why, size_t size)
{
    size_t len = strlen(*v);
    bool ok = len > 0 && len <= 64;
    for (const char *p = *v; ok && *p; p++)
        ok = config_is_ldh((unsigned char)*p) || *p == '_' || *p == '.';
    if (ok)
        return NULL;
    return "expected a name of at most 64 letters, digits, '-', '_' or '.'";
}

/* A literal IP address, rewritten in its normal form ("0::1" → "::1"). */
static const char *
config_check_ip(char **v, char *why, size_t size)
{
    struct sockaddr_storage ss;
    socklen_t len;
    char norm[INET6_ADDRSTRLEN];
    if (!config_parse_ip(*v, 0, &ss, &len)) {
        snprintf(why, size, "\"%s\" is not an IP address", CONFIG_VIS(*v));
        return why;
    }
    const void *a = &((struct sockaddr_in6 *)&ss)->sin6_addr;
    if (ss.ss_family == AF_INET)
        a = &((struct sockaddr_in *)&ss)->sin_addr;
    if (inet_ntop(ss.ss_family, a, norm, sizeof(norm)) != NULL) {
        free(*v);
        *v = xstrdup(norm);
    }
    return NULL;
}

/* A literal IP this machine owns: binding a UDP socket to it (port 0) fails
 * with EADDRNOTAVAIL otherwise. Every 127.0.0.0/8 address is local on Linux. */
int
config_ip_local_errno(const char *ip)
{
    struct sockaddr_storage ss;
    socklen_t len;
    if (!config_parse_ip(ip, 0, &ss, &len))
        return EINVAL;
    /* binding a datagram socket to it succeeds only for a local address */
    int fd = socket(ss.ss_family, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    int r = fd < 0 ? -1 : bind(fd, (const struct sockaddr *)&ss, len);
    int err = errno;
    if (fd >= 0)
        close(fd);
    return r == 0 ? 0 : err;
}

static const char *
config_check_local_ip(char **v, char *why, size_t size)
{
    const char *reason = config_check_ip(v, why, size);
    if (reason != NULL)
        return reason;
    int err = config_ip_local_errno(*v);
    if (err == 0)
        return NULL;
    if (err == EADDRNOTAVAIL || err == EAFNOSUPPORT)
        snprintf(why, size, "%s is not a local address", *v);
    else
        snprintf(why, size, "%s: cannot bind to it: %s", *v, strerror(err));
    return why;
}

static const char *
config_check_hostport(char **v, char *why, size_t size)
{
    struct sockaddr_storage ss;
    socklen_t len;
    return config_parse_hostport(*v, &ss, &len) ? NULL : "expected host:port";
}

/* A next hop: checked by route_parse(), the parser delivery uses, so that
 * every via that loads also routes (the reasons are route.c's). */
static const char *
config_check_via(char **v, char *why, size_t size)
{
    struct route r;
    return route_parse(*v, &r);
}

/* Sendmail milter socket spec: unix:/path, inet:port@host, inet6:port@host. */
static const char *
config_check_milter_socket(char **v, char *why, size_t size)
{
    const char *s = *v;
    if (strncmp(s, "unix:/", 6) == 0 && s[6] != '\0')
        return NULL;
    bool v6 = strncmp(s, "inet6:", 6) == 0;
    const char *spec = v6 ? s + 6 : strncmp(s, "inet:", 5) == 0 ? s + 5 : NULL;
    const char *at = spec ? strchr(spec, '@') : NULL;
    if (at != NULL && (size_t)(at - spec) <= 5) {
        char port[6];
        memcpy(port, spec, (size_t)(at - spec));
        port[at - spec] = '\0';
        unsigned p;
        struct sockaddr_storage ss;
        socklen_t len;
        bool ip = config_parse_ip(at + 1, 0, &ss, &len);
        bool host_ok =
            ip ? ss.ss_family == (v6 ? AF_INET6 : AF_INET) : config_valid_hostname(at + 1);
        if (config_parse_port(port, &p) && host_ok)
            return NULL;
    }
    return "expected unix:/path, inet:port@host or inet6:port@host";
}

/* ---- the option table ---------------------------------------------------- */

enum config_sect {
    S_TOP,
    S_LOG,
    S_LISTENER,
    S_TLS,
    S_TLS_CERT,
    S_RELAY,
    S_AUTH,
    S_DNS,
    S_DELIVERY,
    S_DELIVERY_TIMEOUTS,
    S_SOURCE,
    S_ROUTE,
    S_RETRY,
    S_BOUNCE,
    S_LUA,
    S_MILTER,
    S_MILTER_TIMEOUTS,
    S_PLUGIN,
    S_HTTP,
    S_COUNT
};

static const char *const config_sect_prefix[S_COUNT] = {
    [S_TOP] = "",
    [S_LOG] = "log",
    [S_LISTENER] = "listeners[]",
    [S_TLS] = "tls",
    [S_TLS_CERT] = "tls.certificates[]",
    [S_RELAY] = "relay",
    [S_AUTH] = "auth",
    [S_DNS] = "dns",
    [S_DELIVERY] = "delivery",
    [S_DELIVERY_TIMEOUTS] = "delivery.timeouts",
    [S_SOURCE] = "delivery.sources[]",
    [S_ROUTE] = "routes[]",
    [S_RETRY] = "retry",
    [S_BOUNCE] = "bounce",
    [S_LUA] = "lua",
    [S_MILTER] = "milters[]",
    [S_MILTER_TIMEOUTS] = "milters[].timeouts",
    [S_PLUGIN] = "plugins[]",
    [S_HTTP] = "http",
};

enum config_type {
    T_STR,           /* char *: non-empty, no control characters; .check */
    T_UINT,          /* unsigned, .min .. .max */
    T_SIZE,          /* uint64_t bytes: 1000, 512K, 50M, 1G */
    T_DURATION,      /* uint64_t ms: 250ms, 30s, 15m, 4h, 5d */
    T_BOOL,          /* bool: true | false */
    T_ENUM,          /* int-sized enum; .names in enum order */
    T_STR_LIST,      /* struct str_list; .check per item */
    T_CIDR_LIST,     /* struct cidr_list */
    T_DURATION_LIST, /* uint64_t *ms at .off, size_t count at .off_n */
    T_SECTION,       /* a nested mapping: section .sub, same base struct */
    T_CUSTOM,        /* .custom parses it (lists of objects, free-form maps) */
};

typedef void config_custom_fn(struct config_ctx *cx, const struct config_node *n, void *base);

/* One option. Offsets are relative to the section's base struct: struct
 * petrel_config for the top-level sections, the list element for
 * listeners[], delivery.sources[], routes[], milters[] and plugins[]. */
struct config_option {
    enum config_sect sect;
    const char *key;
    enum config_type type;
    size_t off;
    size_t off_n; /* T_DURATION_LIST: the count field */
    bool required;
    bool scalar_ok;           /* T_*_LIST: a scalar is a list of one */
    const char *def;          /* default as written in YAML; lists without [] */
    uint64_t min, max;        /* T_UINT, T_SIZE, T_DURATION(_LIST) */
    const char *const *names; /* T_ENUM: NULL-terminated */
    config_check_fn *check;   /* T_STR, T_STR_LIST */
    enum config_sect sub;     /* T_SECTION */
    config_custom_fn *custom; /* T_CUSTOM */
};

static const char *const config_log_levels[] = {"error", "warning", "info", "debug", NULL};
static const char *const config_log_formats[] = {"text", "json", NULL};
static const char *const config_listener_tls[] = {"none", "starttls", "implicit", NULL};
static const char *const config_listener_auth[] = {"none", "optional", "required", NULL};
static const char *const config_delivery_tls[] = {"none", "opportunistic", "required", "dane",
                                                  NULL};
static const char *const config_route_tls[] = {"none", "opportunistic", "required", "dane",
                                               "default", NULL};
static const char *const config_actions[] = {"accept", "tempfail", "reject", NULL};

static config_custom_fn config_parse_listeners, config_parse_listener_address,
    config_parse_listener_milters, config_parse_hostnames, config_parse_sources,
    config_parse_routes, config_parse_milters, config_parse_plugins, config_parse_plugin_config,
    config_parse_tls_certificates;

#define OPT(s, k, t, o) .sect = (s), .key = (k), .type = (t), .off = (o)
#define TOP(f) offsetof(struct petrel_config, f)
#define LST(f) offsetof(struct listener_config, f)
#define SRC(f) offsetof(struct source_rule, f)
#define RTE(f) offsetof(struct route_config, f)
#define MLT(f) offsetof(struct milter_config, f)
#define PLG(f) offsetof(struct plugin_config, f)
#define TCR(f) offsetof(struct tls_cert_config, f)

/* Every key of the schema, in the order of config/petrel.yaml. */
/* clang-format off */
static const struct config_option config_options[] = {
    { OPT(S_TOP, "hostname", T_STR, TOP(hostname)), .check = config_check_hostname },
    { OPT(S_TOP, "spool", T_STR, TOP(spool)), .def = "./var/spool" },
    { OPT(S_TOP, "shutdown_timeout", T_DURATION, TOP(shutdown_timeout_ms)), .def = "30s",
      .min = 0, .max = HOURS(1) },

    { OPT(S_TOP, "log", T_SECTION, 0), .sub = S_LOG },
    { OPT(S_LOG, "level", T_ENUM, TOP(log.level)), .def = "info", .names = config_log_levels },
    { OPT(S_LOG, "format", T_ENUM, TOP(log.format)), .def = "text",
      .names = config_log_formats },

    { OPT(S_TOP, "listeners", T_CUSTOM, 0), .custom = config_parse_listeners },
    { OPT(S_LISTENER, "name", T_STR, LST(name)), .check = config_check_name },
    { OPT(S_LISTENER, "address", T_CUSTOM, 0), .required = true,
      .custom = config_parse_listener_address },
    { OPT(S_LISTENER, "tls", T_ENUM, LST(tls)), .def = "none", .names = config_listener_tls },
    { OPT(S_LISTENER, "auth", T_ENUM, LST(auth)), .def = "none",
      .names = config_listener_auth },
    { OPT(S_LISTENER, "max_message_size", T_SIZE, LST(max_message_size)), .def = "50M",
      .min = KIB(1), .max = GIB(4) },
    { OPT(S_LISTENER, "max_recipients", T_UINT, LST(max_recipients)), .def = "1000",
      .min = 1, .max = 100000 },
    { OPT(S_LISTENER, "max_line_length", T_UINT, LST(max_line_length)), .def = "2048",
      .min = 512, .max = 65536 },
    { OPT(S_LISTENER, "max_errors", T_UINT, LST(max_errors)), .def = "10", .min = 1,
      .max = 1000 },
    { OPT(S_LISTENER, "max_connections", T_UINT, LST(max_connections)), .def = "1000",
      .min = 1, .max = 1000000 },
    { OPT(S_LISTENER, "max_connections_per_ip", T_UINT, LST(max_connections_per_ip)),
      .def = "50", .min = 1, .max = 1000000 },
    { OPT(S_LISTENER, "command_timeout", T_DURATION, LST(command_timeout_ms)), .def = "5m",
      .min = SECONDS(1), .max = HOURS(1) },
    { OPT(S_LISTENER, "data_timeout", T_DURATION, LST(data_timeout_ms)), .def = "3m",
      .min = SECONDS(1), .max = HOURS(1) },
    { OPT(S_LISTENER, "greet_delay", T_DURATION, LST(greet_delay_ms)), .def = "0s", .min = 0,
      .max = MINUTES(5) },
    { OPT(S_LISTENER, "max_received_headers", T_UINT, LST(max_received_headers)),
      .def = "100", .min = 10, .max = 1000 },
    { OPT(S_LISTENER, "milters", T_CUSTOM, 0), .custom = config_parse_listener_milters },

    { OPT(S_TOP, "tls", T_SECTION, 0), .sub = S_TLS },
    { OPT(S_TLS, "cert", T_STR, TOP(tls.cert)) },
    { OPT(S_TLS, "key", T_STR, TOP(tls.key)) },
    { OPT(S_TLS, "certificates", T_CUSTOM, 0), .custom = config_parse_tls_certificates },
    { OPT(S_TLS_CERT, "cert", T_STR, TCR(cert)), .required = true },
    { OPT(S_TLS_CERT, "key", T_STR, TCR(key)), .required = true },

    { OPT(S_TOP, "relay", T_SECTION, 0), .sub = S_RELAY },
    { OPT(S_RELAY, "clients", T_CIDR_LIST, TOP(relay.clients)), .def = "127.0.0.0/8, ::1/128" },
    { OPT(S_RELAY, "domains", T_STR_LIST, TOP(relay.domains)), .check = config_check_domain },

    { OPT(S_TOP, "auth", T_SECTION, 0), .sub = S_AUTH },
    { OPT(S_AUTH, "users_file", T_STR, TOP(auth.users_file)) },
    { OPT(S_AUTH, "allow_plaintext", T_BOOL, TOP(auth.allow_plaintext)), .def = "false" },

    { OPT(S_TOP, "dns", T_SECTION, 0), .sub = S_DNS },
    { OPT(S_DNS, "resolvers", T_STR_LIST, TOP(dns.resolvers)), .check = config_check_hostport },
    { OPT(S_DNS, "timeout", T_DURATION, TOP(dns.timeout_ms)), .def = "5s", .min = 100,
      .max = MINUTES(1) },

    { OPT(S_TOP, "delivery", T_SECTION, 0), .sub = S_DELIVERY },
    { OPT(S_DELIVERY, "hostname", T_STR, TOP(delivery.hostname)),
      .check = config_check_hostname },
    { OPT(S_DELIVERY, "source_ips", T_STR_LIST, TOP(delivery.source_ips)),
      .check = config_check_local_ip },
    { OPT(S_DELIVERY, "hostnames", T_CUSTOM, 0), .custom = config_parse_hostnames },
    { OPT(S_DELIVERY, "sources", T_CUSTOM, 0), .custom = config_parse_sources },
    { OPT(S_SOURCE, "domain", T_STR, SRC(domain)), .check = config_check_domain },
    { OPT(S_SOURCE, "listener_ip", T_STR, SRC(listener_ip)), .check = config_check_ip },
    { OPT(S_SOURCE, "listener", T_STR, SRC(listener)), .check = config_check_name },
    { OPT(S_SOURCE, "recipient_domain", T_STR, SRC(recipient_domain)),
      .check = config_check_domain },
    { OPT(S_SOURCE, "client_cidr", T_CIDR_LIST, SRC(client_cidr)), .scalar_ok = true },
    { OPT(S_SOURCE, "ip", T_STR, SRC(ip)), .check = config_check_local_ip },
    { OPT(S_SOURCE, "pool", T_STR_LIST, SRC(pool)), .check = config_check_local_ip },
    { OPT(S_SOURCE, "hostname", T_STR, SRC(hostname)), .check = config_check_hostname },
    { OPT(S_DELIVERY, "max_connections_per_destination", T_UINT,
          TOP(delivery.max_connections_per_destination)),
      .def = "20", .min = 1, .max = 10000 },
    { OPT(S_DELIVERY, "max_messages_per_connection", T_UINT,
          TOP(delivery.max_messages_per_connection)),
      .def = "100", .min = 1, .max = 100000 },
    { OPT(S_DELIVERY, "tls", T_ENUM, TOP(delivery.tls)), .def = "opportunistic",
      .names = config_delivery_tls },
    { OPT(S_DELIVERY, "port", T_UINT, TOP(delivery.port)), .def = "25", .min = 1,
      .max = 65535 },
    { OPT(S_DELIVERY, "hold", T_BOOL, TOP(delivery.hold)), .def = "false" },
    { OPT(S_DELIVERY, "tls_fallback", T_BOOL, TOP(delivery.tls_fallback)), .def = "false" },
    { OPT(S_DELIVERY, "mta_sts", T_BOOL, TOP(delivery.mta_sts)), .def = "false" },
    { OPT(S_DELIVERY, "max_connections", T_UINT, TOP(delivery.max_connections)),
      .def = "500", .min = 1, .max = 100000 },
    { OPT(S_DELIVERY, "connection_cache_time", T_DURATION,
          TOP(delivery.connection_cache_time_ms)),
      .def = "2s", .max = MINUTES(5) },
    { OPT(S_DELIVERY, "timeouts", T_SECTION, 0), .sub = S_DELIVERY_TIMEOUTS },
    { OPT(S_DELIVERY_TIMEOUTS, "connect", T_DURATION, TOP(delivery.timeouts.connect_ms)),
      .def = "30s", .min = 100, .max = MINUTES(10) },
    { OPT(S_DELIVERY_TIMEOUTS, "greeting", T_DURATION, TOP(delivery.timeouts.greeting_ms)),
      .def = "5m", .min = 100, .max = MINUTES(60) },
    { OPT(S_DELIVERY_TIMEOUTS, "command", T_DURATION, TOP(delivery.timeouts.command_ms)),
      .def = "5m", .min = 100, .max = MINUTES(60) },
    { OPT(S_DELIVERY_TIMEOUTS, "data_init", T_DURATION, TOP(delivery.timeouts.data_init_ms)),
      .def = "2m", .min = 100, .max = MINUTES(60) },
    { OPT(S_DELIVERY_TIMEOUTS, "data_block", T_DURATION,
          TOP(delivery.timeouts.data_block_ms)),
      .def = "3m", .min = 100, .max = MINUTES(60) },
    { OPT(S_DELIVERY_TIMEOUTS, "data_end", T_DURATION, TOP(delivery.timeouts.data_end_ms)),
      .def = "10m", .min = 100, .max = MINUTES(60) },

    { OPT(S_TOP, "routes", T_CUSTOM, 0), .custom = config_parse_routes },
    { OPT(S_ROUTE, "domain", T_STR, RTE(domain)), .required = true,
      .check = config_check_route_domain },
    { OPT(S_ROUTE, "via", T_STR, RTE(via)), .required = true, .check = config_check_via },
    { OPT(S_ROUTE, "tls", T_ENUM, RTE(tls)), .def = "default", .names = config_route_tls },

    { OPT(S_TOP, "retry", T_SECTION, 0), .sub = S_RETRY },
    { OPT(S_RETRY, "schedule", T_DURATION_LIST, TOP(retry.schedule_ms)),
      .off_n = TOP(retry.nschedule), .def = "15m, 30m, 1h, 4h", .min = SECONDS(1),
      .max = DAYS(30) },
    { OPT(S_RETRY, "max_attempts", T_UINT, TOP(retry.max_attempts)), .def = "10", .min = 1,
      .max = 1000 },
    { OPT(S_RETRY, "max_age", T_DURATION, TOP(retry.max_age_ms)), .def = "5d",
      .min = MINUTES(1), .max = DAYS(365) },

    { OPT(S_TOP, "bounce", T_SECTION, 0), .sub = S_BOUNCE },
    { OPT(S_BOUNCE, "enabled", T_BOOL, TOP(bounce.enabled)), .def = "true" },
    { OPT(S_BOUNCE, "from_name", T_STR, TOP(bounce.from_name)),
      .def = "Mail Delivery System" },

    { OPT(S_TOP, "lua", T_SECTION, 0), .sub = S_LUA },
    { OPT(S_LUA, "script", T_STR, TOP(lua.script)) },
    { OPT(S_LUA, "on_error", T_ENUM, TOP(lua.on_error)), .def = "tempfail",
      .names = config_actions },
    { OPT(S_LUA, "timeout", T_DURATION, TOP(lua.timeout_ms)), .def = "1s", .min = 1,
      .max = MINUTES(1) },

    { OPT(S_TOP, "milters", T_CUSTOM, 0), .custom = config_parse_milters },
    { OPT(S_MILTER, "name", T_STR, MLT(name)), .required = true, .check = config_check_name },
    { OPT(S_MILTER, "socket", T_STR, MLT(socket)), .required = true,
      .check = config_check_milter_socket },
    { OPT(S_MILTER, "default_action", T_ENUM, MLT(default_action)), .def = "tempfail",
      .names = config_actions },
    { OPT(S_MILTER, "timeouts", T_SECTION, 0), .sub = S_MILTER_TIMEOUTS },
    { OPT(S_MILTER_TIMEOUTS, "connect", T_DURATION, MLT(connect_timeout_ms)), .def = "5s",
      .min = 100, .max = MINUTES(5) },
    { OPT(S_MILTER_TIMEOUTS, "command", T_DURATION, MLT(command_timeout_ms)), .def = "30s",
      .min = 100, .max = HOURS(1) },
    { OPT(S_MILTER_TIMEOUTS, "eom", T_DURATION, MLT(eom_timeout_ms)), .def = "60s",
      .min = 100, .max = HOURS(1) },

    { OPT(S_TOP, "plugins", T_CUSTOM, 0), .custom = config_parse_plugins },
    { OPT(S_PLUGIN, "path", T_STR, PLG(path)), .required = true },
    { OPT(S_PLUGIN, "config", T_CUSTOM, 0), .custom = config_parse_plugin_config },

    { OPT(S_TOP, "http", T_SECTION, 0), .sub = S_HTTP },
    { OPT(S_HTTP, "listen", T_STR, TOP(http.listen)), .check = config_check_hostport },
};
/* clang-format on */

static bool
config_is_list(enum config_type t)
{
    return t == T_STR_LIST || t == T_CIDR_LIST || t == T_DURATION_LIST;
}

/* ---- scalar and list values ---------------------------------------------- */

/* The text of scalar n, or NULL after reporting that n is not one. */
static const char *
config_scalar(struct config_ctx *cx, const struct config_node *n, const char *what)
{
    if (n->type != NODE_SCALAR) {
        config_err(cx, n, "expected %s, got %s", what, config_node_kind(n));
        return NULL;
    }
    if (strlen(n->str) != n->len) {
        config_err(cx, n, "contains a NUL byte");
        return NULL;
    }
    return n->str;
}

static bool
config_expect(struct config_ctx *cx, const struct config_node *n, enum config_node_type t)
{
    if (n->type == t)
        return true;
    config_err(cx, n, "expected %s, got %s", t == NODE_MAP ? "a mapping" : "a list",
               config_node_kind(n));
    return false;
}

/* A non-empty string without control characters, validated by check;
 * returns it (owned) or NULL after reporting. */
static char *
config_string(struct config_ctx *cx, const struct config_node *n, config_check_fn *check)
{
    const char *s = config_scalar(cx, n, "a string");
    if (s == NULL)
        return NULL;
    if (*s == '\0') {
        config_err(cx, n, "expected a non-empty string");
        return NULL;
    }
    for (const char *p = s; *p; p++) {
        if ((unsigned char)*p < 0x20 || *p == 0x7f) {
            config_err(cx, n, "contains a control character");
            return NULL;
        }
    }
    char *v = xstrdup(s);
    char why[CONFIG_WHY];
    const char *reason = check ? check(&v, why, sizeof(why)) : NULL;
    if (reason != NULL) {
        config_err(cx, n, "%s", reason);
        free(v);
        return NULL;
    }
    return v;
}

static void
config_format_uint(struct buf *b, uint64_t v)
{
    buf_printf(b, "%llu", (unsigned long long)v);
}

/* How each numeric type is spelled; syntax NULL: the range says it all. */
struct config_numeric {
    const char *what;
    const char *syntax;
    bool (*parse)(const char *s, uint64_t *v);
    void (*format)(struct buf *b, uint64_t v);
};

#define CONFIG_DURATION_SYNTAX "expected a duration like 30s, 15m, 4h, 5d"

static const struct config_numeric config_numerics[] = {
    [T_UINT] = {"an integer", NULL, config_parse_uint, config_format_uint},
    [T_SIZE] = {"a size", "expected a size like 1000, 512K, 50M, 1G", config_parse_size,
                config_format_size},
    [T_DURATION] = {"a duration", CONFIG_DURATION_SYNTAX, config_parse_duration,
                    config_format_duration},
    [T_DURATION_LIST] = {"a duration", CONFIG_DURATION_SYNTAX, config_parse_duration,
                         config_format_duration},
};

/* An integer, size or duration within the option's bounds. */
static bool
config_number(struct config_ctx *cx, const struct config_option *o, const struct config_node *n,
              uint64_t *v)
{
    const struct config_numeric *k = &config_numerics[o->type];
    const char *s = config_scalar(cx, n, k->what);
    if (s == NULL)
        return false;
    bool ok = k->parse(s, v);
    if (ok && *v >= o->min && *v <= o->max)
        return true;
    struct buf b;
    buf_init(&b);
    uint64_t bare;
    if (!ok && k->syntax != NULL) {
        buf_append_str(&b, k->syntax);
        if (o->type != T_SIZE && config_parse_uint(s, &bare))
            buf_append_str(&b, " (a unit is required)");
    } else {
        buf_append_str(&b, o->type == T_UINT ? "expected an integer from " : "must be from ");
        k->format(&b, o->min);
        buf_append_str(&b, " to ");
        k->format(&b, o->max);
    }
    char *msg = buf_steal(&b, NULL);
    config_err(cx, n, "%s", msg);
    free(msg);
    return false;
}

static void
config_set_enum(struct config_ctx *cx, const struct config_option *o, const struct config_node *n,
                int *field)
{
    const char *s = config_scalar(cx, n, "a string");
    if (s == NULL)
        return;
    for (int i = 0; o->names[i] != NULL; i++) {
        if (strcmp(s, o->names[i]) == 0) {
            *field = i;
            return;
        }
    }
    struct buf b;
    buf_init(&b);
    for (int i = 0; o->names[i] != NULL; i++)
        buf_printf(&b, "%s%s", i ? ", " : "", o->names[i]);
    char *names = buf_steal(&b, NULL);
    config_err(cx, n, "expected one of: %s", names);
    free(names);
}

static void
config_set_bool(struct config_ctx *cx, const struct config_node *n, bool *field)
{
    static const char *const yes[] = {"true", "True", "TRUE"};
    static const char *const no[] = {"false", "False", "FALSE"};
    const char *s = config_scalar(cx, n, "true or false");
    if (s == NULL)
        return;
    for (size_t i = 0; i < ARRAY_SIZE(yes); i++) {
        if (strcmp(s, yes[i]) == 0 || strcmp(s, no[i]) == 0) {
            *field = strcmp(s, yes[i]) == 0;
            return;
        }
    }
    config_err(cx, n, "expected true or false");
}

/* Items of a list option; with scalar_ok a lone scalar is a list of one. */
static size_t
config_list_len(const struct config_node *n)
{
    return n->type == NODE_SEQ ? n->n : 1;
}

static const struct config_node *
config_list_get(const struct config_node *n, size_t i)
{
    return n->type == NODE_SEQ ? n->kids[i] : n;
}

static bool
config_list_ok(struct config_ctx *cx, const struct config_node *n, bool scalar_ok)
{
    if (scalar_ok && n->type == NODE_SCALAR)
        return true;
    return config_expect(cx, n, NODE_SEQ);
}

static void
config_set_str_list(struct config_ctx *cx, const struct config_node *n, bool scalar_ok,
                    config_check_fn *check, struct str_list *l)
{
    if (!config_list_ok(cx, n, scalar_ok))
        return;
    size_t len = config_list_len(n);
    l->v = xcalloc(len, sizeof(*l->v));
    for (size_t i = 0; i < len; i++) {
        size_t mark = n->type == NODE_SEQ ? config_path_index(cx, i) : cx->plen;
        char *s = config_string(cx, config_list_get(n, i), check);
        if (s != NULL)
            l->v[l->n++] = s;
        config_path_pop(cx, mark);
    }
}

static void
config_set_cidr_list(struct config_ctx *cx, const struct config_node *n, bool scalar_ok,
                     struct cidr_list *l)
{
    if (!config_list_ok(cx, n, scalar_ok))
        return;
    size_t len = config_list_len(n);
    l->v = xcalloc(len, sizeof(*l->v));
    for (size_t i = 0; i < len; i++) {
        size_t mark = n->type == NODE_SEQ ? config_path_index(cx, i) : cx->plen;
        const struct config_node *item = config_list_get(n, i);
        const char *s = config_scalar(cx, item, "an address or network");
        if (s != NULL && config_parse_cidr(s, &l->v[l->n]))
            l->n++;
        else if (s != NULL)
            config_err(cx, item, "expected an address or network like 10.0.0.0/8 or 2001:db8::/32");
        config_path_pop(cx, mark);
    }
}

static void
config_set_duration_list(struct config_ctx *cx, const struct config_option *o,
                         const struct config_node *n, void *base)
{
    uint64_t **v = (uint64_t **)((char *)base + o->off);
    size_t *count = (size_t *)((char *)base + o->off_n);
    if (!config_expect(cx, n, NODE_SEQ))
        return;
    if (n->n == 0) {
        config_err(cx, n, "expected at least one duration");
        return;
    }
    *v = xcalloc(n->n, sizeof(**v));
    for (size_t i = 0; i < n->n; i++) {
        size_t mark = config_path_index(cx, i);
        uint64_t ms;
        if (config_number(cx, o, n->kids[i], &ms))
            (*v)[(*count)++] = ms;
        config_path_pop(cx, mark);
    }
}

/* ---- sections ------------------------------------------------------------ */

static void config_parse_section(struct config_ctx *cx, const struct config_node *map,
                                 enum config_sect sect, void *base);

static void
config_parse_value(struct config_ctx *cx, const struct config_option *o,
                   const struct config_node *n, void *base)
{
    void *field = (char *)base + o->off;
    uint64_t v;
    switch (o->type) {
    case T_STR: {
        char *s = config_string(cx, n, o->check);
        if (s != NULL) {
            free(*(char **)field);
            *(char **)field = s;
        }
        break;
    }
    case T_UINT:
        if (config_number(cx, o, n, &v))
            *(unsigned *)field = (unsigned)v;
        break;
    case T_SIZE:
    case T_DURATION:
        if (config_number(cx, o, n, &v))
            *(uint64_t *)field = v;
        break;
    case T_BOOL:
        config_set_bool(cx, n, field);
        break;
    case T_ENUM:
        config_set_enum(cx, o, n, field);
        break;
    case T_STR_LIST:
        config_set_str_list(cx, n, o->scalar_ok, o->check, field);
        break;
    case T_CIDR_LIST:
        config_set_cidr_list(cx, n, o->scalar_ok, field);
        break;
    case T_DURATION_LIST:
        config_set_duration_list(cx, o, n, base);
        break;
    case T_SECTION:
        config_parse_section(cx, n, o->sub, base);
        break;
    case T_CUSTOM:
        o->custom(cx, n, base);
        break;
    }
}

/* The default as a node: a scalar, or for lists "a, b" → [a, b]. */
static struct config_node *
config_default_node(const struct config_option *o)
{
    if (!config_is_list(o->type)) {
        struct config_node *n = config_node_new(NODE_SCALAR, 0, 0);
        n->str = xstrdup(o->def);
        n->len = strlen(n->str);
        return n;
    }
    struct config_node *seq = config_node_new(NODE_SEQ, 0, 0);
    for (const char *p = o->def; *p != '\0';) {
        size_t len = strcspn(p, ",");
        struct config_node *item = config_node_new(NODE_SCALAR, 0, 0);
        item->str = xstrndup(p, len);
        item->len = len;
        config_node_add(seq, item);
        p += len;
        p += strspn(p, ", ");
    }
    return seq;
}

static void
config_apply_default(struct config_ctx *cx, const struct config_option *o, void *base)
{
    if (o->type == T_SECTION) {
        config_parse_section(cx, NULL, o->sub, base);
    } else if (o->def != NULL) {
        struct config_node *n = config_default_node(o);
        config_parse_value(cx, o, n, base);
        config_node_free(n);
    }
}

/* Edit distance of two short keys, for "did you mean". */
static size_t
config_distance(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b), row[65];
    if (la > 64 || lb > 64)
        return SIZE_MAX;
    for (size_t j = 0; j <= lb; j++)
        row[j] = j;
    for (size_t i = 1; i <= la; i++) {
        size_t diag = row[0];
        row[0] = i;
        for (size_t j = 1; j <= lb; j++) {
            size_t up = row[j];
            size_t best = diag + (a[i - 1] != b[j - 1]);
            if (up + 1 < best)
                best = up + 1;
            if (row[j - 1] + 1 < best)
                best = row[j - 1] + 1;
            row[j] = best;
            diag = up;
        }
    }
    return row[lb];
}

static void
config_unknown_key(struct config_ctx *cx, const struct config_node *key, enum config_sect sect)
{
    const char *best = NULL;
    size_t best_d = 3; /* suggest only close misspellings */
    for (size_t i = 0; i < ARRAY_SIZE(config_options); i++) {
        const struct config_option *o = &config_options[i];
        size_t d = o->sect == sect ? config_distance(key->str, o->key) : SIZE_MAX;
        if (d < best_d && d < strlen(o->key) / 2) {
            best = o->key;
            best_d = d;
        }
    }
    if (best != NULL)
        config_err(cx, key, "unknown key (did you mean %s?)", best);
    else
        config_err(cx, key, "unknown key");
}

/* Matches the keys of map against the section's options into given[] (by
 * option index), reporting unknown and duplicate keys. */
static void
config_collect_keys(struct config_ctx *cx, const struct config_node *map, enum config_sect sect,
                    const struct config_node **given, const struct config_node **given_key)
{
    for (size_t k = 0; k + 1 < map->n; k += 2) {
        const struct config_node *key = map->kids[k];
        size_t mark = config_path_key(cx, key->str, key->len);
        size_t i = 0;
        while (i < ARRAY_SIZE(config_options) &&
               !(config_options[i].sect == sect && config_node_is(key, config_options[i].key)))
            i++;
        if (i == ARRAY_SIZE(config_options))
            config_unknown_key(cx, key, sect);
        else if (given_key[i] != NULL)
            config_err(cx, key, "duplicate key (first at line %d)", given_key[i]->line);
        else {
            given[i] = map->kids[k + 1];
            given_key[i] = key;
        }
        config_path_pop(cx, mark);
    }
}

/* Parses mapping map (NULL: absent, so all defaults) as section sect into
 * base. A value that is empty (`key:` or `key: ~`) counts as absent. */
static void
config_parse_section(struct config_ctx *cx, const struct config_node *map, enum config_sect sect,
                     void *base)
{
    const struct config_node *given[ARRAY_SIZE(config_options)] = {0};
    const struct config_node *given_key[ARRAY_SIZE(config_options)] = {0};
    bool is_map = false;
    if (map != NULL && map->type != NODE_NULL && config_expect(cx, map, NODE_MAP)) {
        config_collect_keys(cx, map, sect, given, given_key);
        is_map = true;
    }
    for (size_t i = 0; i < ARRAY_SIZE(config_options); i++) {
        const struct config_option *o = &config_options[i];
        if (o->sect != sect)
            continue;
        size_t mark = config_path_key(cx, o->key, strlen(o->key));
        const struct config_node *v = given[i];
        if (v != NULL && v->type != NODE_NULL)
            config_parse_value(cx, o, v, base);
        else if (o->required && v != NULL)
            config_err(cx, v, "missing value");
        else if (o->required && is_map)
            config_err(cx, map, "missing required key");
        else if (!o->required)
            config_apply_default(cx, o, base);
        config_path_pop(cx, mark);
    }
}

/* A list of mappings, each parsed as section sect into a zeroed element of
 * size bytes whose `int line` field sits at off_line. */
static void *
config_parse_objects(struct config_ctx *cx, const struct config_node *n, enum config_sect sect,
                     size_t size, size_t off_line, size_t *count)
{
    *count = 0;
    if (!config_expect(cx, n, NODE_SEQ))
        return NULL;
    char *v = xcalloc(n->n, size);
    for (size_t i = 0; i < n->n; i++) {
        char *elem = v + i * size;
        *(int *)(elem + off_line) = n->kids[i]->line;
        size_t mark = config_path_index(cx, i);
        if (n->kids[i]->type == NODE_NULL)
            config_err(cx, n->kids[i], "expected a mapping, got %s", config_node_kind(n->kids[i]));
        config_parse_section(cx, n->kids[i], sect, elem);
        config_path_pop(cx, mark);
    }
    *count = n->n;
    return v;
}

/* Reports key i of a list of named things when an earlier one has the same
 * name; names[] are strided by size from first. */
static void
config_check_unique(struct config_ctx *cx, const struct config_node *list, const char *key,
                    const char *what, const void *first, size_t size, size_t count)
{
    if (first == NULL)
        return;
    for (size_t i = 0; i < count; i++) {
        const char *a = *(char *const *)((const char *)first + i * size);
        for (size_t j = 0; a != NULL && j < i; j++) {
            const char *b = *(char *const *)((const char *)first + j * size);
            if (b == NULL || strcmp(a, b) != 0)
                continue;
            size_t mark = config_path_index(cx, i);
            size_t mark2 = config_path_key(cx, key, strlen(key));
            const struct config_node *item = config_node_item(list, i);
            const struct config_node *prev = config_node_item(list, j);
            config_err(cx, config_node_at(item, key), "duplicate %s \"%s\" (first at line %d)",
                       what, CONFIG_VIS(a), prev ? prev->line : 0);
            config_path_pop(cx, mark2);
            config_path_pop(cx, mark);
            break;
        }
    }
}

/* ---- custom parsers: lists of objects and free-form maps ------------------ */

static void
config_parse_listeners(struct config_ctx *cx, const struct config_node *n, void *base)
{
    struct petrel_config *c = base;
    c->listeners =
        config_parse_objects(cx, n, S_LISTENER, sizeof(*c->listeners), LST(line), &c->nlisteners);
    for (size_t i = 0; i < c->nlisteners; i++)
        if (c->listeners[i].name == NULL)
            c->listeners[i].name = xasprintf("listener%zu", i);
    config_check_unique(cx, n, "name", "listener name", c->listeners ? &c->listeners[0].name : NULL,
                        sizeof(*c->listeners), c->nlisteners);
}

static void
config_parse_listener_address(struct config_ctx *cx, const struct config_node *n, void *base)
{
    struct listener_config *l = base;
    const char *s = config_scalar(cx, n, "host:port");
    if (s == NULL)
        return;
    if (!config_parse_hostport(s, &l->addr, &l->addr_len)) {
        config_err(cx, n, "expected host:port");
        return;
    }
    l->address = xstrdup(s);
}

static void
config_parse_listener_milters(struct config_ctx *cx, const struct config_node *n, void *base)
{
    struct listener_config *l = base;
    config_set_str_list(cx, n, false, config_check_name, &l->milters);
    l->milters_set = true;
}

/* delivery.hostnames: { ip: hostname, … }; ips literal, local, unique. */
static void
config_parse_hostnames(struct config_ctx *cx, const struct config_node *n, void *base)
{
    struct petrel_config *c = base;
    if (!config_expect(cx, n, NODE_MAP))
        return;
    int *lines = xcalloc(n->n / 2, sizeof(*lines));
    c->delivery.hostnames = xcalloc(n->n / 2, sizeof(*c->delivery.hostnames));
    for (size_t k = 0; k + 1 < n->n; k += 2) {
        const struct config_node *key = n->kids[k], *val = n->kids[k + 1];
        size_t mark = config_path_key(cx, key->str, key->len);
        char *ip = config_string(cx, key, config_check_local_ip);
        char *host = config_string(cx, val, config_check_hostname);
        for (size_t j = 0; ip != NULL && j < c->delivery.nhostnames; j++) {
            if (strcmp(ip, c->delivery.hostnames[j].ip) == 0) {
                config_err(cx, key, "duplicate address (first at line %d)", lines[j]);
                free(ip);
                ip = NULL;
            }
        }
        if (ip != NULL && host != NULL) {
            lines[c->delivery.nhostnames] = key->line;
            c->delivery.hostnames[c->delivery.nhostnames++] = (struct ip_hostname){ip, host};
        } else {
            free(ip);
            free(host);
        }
        config_path_pop(cx, mark);
    }
    free(lines);
}

/* delivery.sources[]: the criteria are all optional (a rule without any is a
 * catch-all); the rule must give ip or pool (not both), or a hostname. */
static void
config_parse_sources(struct config_ctx *cx, const struct config_node *n, void *base)
{
    struct petrel_config *c = base;
    c->delivery.sources = config_parse_objects(cx, n, S_SOURCE, sizeof(*c->delivery.sources),
                                               SRC(line), &c->delivery.nsources);
    for (size_t i = 0; i < c->delivery.nsources; i++) {
        const struct config_node *item = n->kids[i];
        if (item->type != NODE_MAP)
            continue;
        size_t mark = config_path_index(cx, i);
        bool ip = config_node_get(item, "ip") != NULL;
        bool pool = config_node_get(item, "pool") != NULL;
        if (ip && pool) {
            size_t m2 = config_path_key(cx, "pool", 4);
            config_err(cx, config_node_at(item, "pool"), "set either ip or pool, not both");
            config_path_pop(cx, m2);
        } else if (!ip && !pool && config_node_get(item, "hostname") == NULL) {
            config_err(cx, item, "a rule must set ip, pool or hostname");
        }
        config_path_pop(cx, mark);
    }
}

static void
config_parse_routes(struct config_ctx *cx, const struct config_node *n, void *base)
{
    struct petrel_config *c = base;
    c->routes = config_parse_objects(cx, n, S_ROUTE, sizeof(*c->routes), RTE(line), &c->nroutes);
    config_check_unique(cx, n, "domain", "route for", c->routes ? &c->routes[0].domain : NULL,
                        sizeof(*c->routes), c->nroutes);
}

static void
config_parse_milters(struct config_ctx *cx, const struct config_node *n, void *base)
{
    struct petrel_config *c = base;
    c->milters =
        config_parse_objects(cx, n, S_MILTER, sizeof(*c->milters), MLT(line), &c->nmilters);
    config_check_unique(cx, n, "name", "milter name", c->milters ? &c->milters[0].name : NULL,
                        sizeof(*c->milters), c->nmilters);
}

static void
config_parse_tls_certificates(struct config_ctx *cx, const struct config_node *n, void *base)
{
    struct petrel_config *c = base;
    c->tls.certificates = config_parse_objects(cx, n, S_TLS_CERT, sizeof(*c->tls.certificates),
                                               TCR(line), &c->tls.ncertificates);
}

static void
config_parse_plugins(struct config_ctx *cx, const struct config_node *n, void *base)
{
    struct petrel_config *c = base;
    c->plugins =
        config_parse_objects(cx, n, S_PLUGIN, sizeof(*c->plugins), PLG(line), &c->nplugins);
}

/* plugins[].config: { key: scalar, … } handed to the plugin as strings; an
 * empty value is "". */
static void
config_parse_plugin_config(struct config_ctx *cx, const struct config_node *n, void *base)
{
    struct plugin_config *p = base;
    if (!config_expect(cx, n, NODE_MAP))
        return;
    p->config = xcalloc(n->n / 2, sizeof(*p->config));
    for (size_t k = 0; k + 1 < n->n; k += 2) {
        const struct config_node *key = n->kids[k], *val = n->kids[k + 1];
        size_t mark = config_path_key(cx, key->str, key->len);
        const char *ks = config_scalar(cx, key, "a string");
        const char *vs = val->type == NODE_NULL ? "" : config_scalar(cx, val, "a scalar");
        for (size_t j = 0; ks != NULL && j < p->nconfig; j++) {
            if (strcmp(ks, p->config[j].key) == 0) {
                config_err(cx, key, "duplicate key (first at line %d)", n->kids[2 * j]->line);
                ks = NULL;
            }
        }
        if (ks != NULL && *ks == '\0') {
            config_err(cx, key, "expected a non-empty key");
            ks = NULL;
        }
        if (ks != NULL && vs != NULL)
            p->config[p->nconfig++] = (struct plugin_kv){xstrdup(ks), xstrdup(vs)};
        config_path_pop(cx, mark);
    }
}

/* ---- cross-checks -------------------------------------------------------- */

static bool
config_milter_exists(const struct petrel_config *c, const char *name)
{
    for (size_t i = 0; i < c->nmilters; i++)
        if (c->milters[i].name != NULL && strcmp(c->milters[i].name, name) == 0)
            return true;
    return false;
}

static bool
config_same_addr(const struct listener_config *a, const struct listener_config *b)
{
    return a->addr_len != 0 && a->addr_len == b->addr_len &&
           memcmp(&a->addr, &b->addr, a->addr_len) == 0;
}

static void
config_check_listener(struct config_ctx *cx, const struct petrel_config *c,
                      const struct config_node *item, size_t i)
{
    const struct listener_config *l = &c->listeners[i];
    size_t mark = config_path_index(cx, i), m2;
    for (size_t j = 0; j < i; j++) {
        if (config_same_addr(l, &c->listeners[j])) {
            m2 = config_path_key(cx, "address", 7);
            config_err(cx, config_node_at(item, "address"), "same address as listeners[%zu]", j);
            config_path_pop(cx, m2);
            break;
        }
    }
    if (l->tls != LISTENER_TLS_NONE && (c->tls.cert == NULL || c->tls.key == NULL)) {
        m2 = config_path_key(cx, "tls", 3);
        config_err(cx, config_node_at(item, "tls"), "%s needs tls.cert and tls.key",
                   config_listener_tls[l->tls]);
        config_path_pop(cx, m2);
    }
    if (l->auth != LISTENER_AUTH_NONE) {
        m2 = config_path_key(cx, "auth", 4);
        if (c->auth.users_file == NULL)
            config_err(cx, config_node_at(item, "auth"), "%s needs auth.users_file",
                       config_listener_auth[l->auth]);
        else if (l->tls == LISTENER_TLS_NONE && !c->auth.allow_plaintext)
            config_err(cx, config_node_at(item, "auth"),
                       "%s needs tls: starttls or implicit, or auth.allow_plaintext: true",
                       config_listener_auth[l->auth]);
        config_path_pop(cx, m2);
    }
    const struct config_node *milters = config_node_get(item, "milters");
    for (size_t j = 0; j < l->milters.n; j++) {
        if (config_milter_exists(c, l->milters.v[j]))
            continue;
        m2 = config_path_key(cx, "milters", 7);
        size_t m3 = config_path_index(cx, j);
        const struct config_node *at = config_node_item(milters, j);
        config_err(cx, at ? at : item, "unknown milter \"%s\" (not in milters)",
                   CONFIG_VIS(l->milters.v[j]));
        config_path_pop(cx, m3);
        config_path_pop(cx, m2);
    }
    config_path_pop(cx, mark);
}

static void
config_check_listeners(struct config_ctx *cx, const struct config_node *root,
                       const struct petrel_config *c)
{
    const struct config_node *list = config_node_get(root, "listeners");
    size_t mark = config_path_key(cx, "listeners", 9);
    bool none = list == NULL || list->type == NODE_NULL || (list->type == NODE_SEQ && list->n == 0);
    if (c->nlisteners == 0 && none)
        config_err(cx, list ? list : root, "at least one listener is required");
    for (size_t i = 0; i < c->nlisteners; i++)
        config_check_listener(cx, c, config_node_item(list, i), i);
    config_path_pop(cx, mark);
}

static bool
config_listener_exists(const struct petrel_config *c, const char *name)
{
    for (size_t i = 0; i < c->nlisteners; i++)
        if (strcmp(c->listeners[i].name, name) == 0)
            return true;
    return false;
}

static void
config_check_sources(struct config_ctx *cx, const struct config_node *root,
                     const struct petrel_config *c)
{
    const struct config_node *list = config_node_get(config_node_get(root, "delivery"), "sources");
    for (size_t i = 0; i < c->delivery.nsources; i++) {
        const char *name = c->delivery.sources[i].listener;
        if (name == NULL || config_listener_exists(c, name))
            continue;
        size_t mark = config_path_append(cx, ".", "delivery.sources");
        config_path_index(cx, i);
        config_path_key(cx, "listener", 8);
        config_err(cx, config_node_at(config_node_item(list, i), "listener"),
                   "unknown listener \"%s\"", CONFIG_VIS(name));
        config_path_pop(cx, mark);
    }
}

static void
config_check_tls(struct config_ctx *cx, const struct config_node *root,
                 const struct petrel_config *c)
{
    const struct config_node *tls = config_node_get(root, "tls");
    if (c->tls.ncertificates > 0 && c->tls.cert == NULL) {
        size_t mark = config_path_append(cx, ".", "tls.certificates");
        config_err(cx, config_node_at(tls, "certificates"),
                   "needs tls.cert and tls.key (the default certificate)");
        config_path_pop(cx, mark);
    }
    if ((c->tls.cert == NULL) == (c->tls.key == NULL))
        return;
    const char *missing = c->tls.cert == NULL ? "tls.cert" : "tls.key";
    size_t mark = config_path_append(cx, ".", missing);
    config_err(cx, tls ? tls : root, "required with %s", c->tls.cert ? "tls.cert" : "tls.key");
    config_path_pop(cx, mark);
}

/* hostname defaults to gethostname(), which must then be a valid name. */
static void
config_default_hostname(struct config_ctx *cx, const struct config_node *root,
                        struct petrel_config *c)
{
    const struct config_node *given = config_node_get(root, "hostname");
    if (c->hostname != NULL || (given != NULL && given->type != NODE_NULL))
        return; /* set, or its error is already reported */
    char name[256];
    if (gethostname(name, sizeof(name)) != 0 || name[0] == '\0')
        snprintf(name, sizeof(name), "localhost");
    name[sizeof(name) - 1] = '\0';
    if (!config_valid_hostname(name)) {
        size_t mark = config_path_append(cx, ".", "hostname");
        config_err(cx, root, "gethostname() gave \"%s\", not a valid hostname: set hostname",
                   CONFIG_VIS(name));
        config_path_pop(cx, mark);
        return;
    }
    c->hostname = xstrdup(name);
}

static void
config_cross_check(struct config_ctx *cx, const struct config_node *root, struct petrel_config *c)
{
    config_check_listeners(cx, root, c);
    config_check_sources(cx, root, c);
    config_check_tls(cx, root, c);
    config_default_hostname(cx, root, c);
}

/* ---- loading and freeing ------------------------------------------------- */

static void
config_str_list_free(struct str_list *l)
{
    for (size_t i = 0; i < l->n; i++)
        free(l->v[i]);
    free(l->v);
}

static void
config_free(struct petrel_config *c)
{
    for (size_t i = 0; i < c->nlisteners; i++) {
        free(c->listeners[i].name);
        free(c->listeners[i].address);
        config_str_list_free(&c->listeners[i].milters);
    }
    free(c->listeners);
    for (size_t i = 0; i < c->delivery.nhostnames; i++) {
        free(c->delivery.hostnames[i].ip);
        free(c->delivery.hostnames[i].hostname);
    }
    free(c->delivery.hostnames);
    for (size_t i = 0; i < c->delivery.nsources; i++) {
        struct source_rule *r = &c->delivery.sources[i];
        free(r->domain);
        free(r->listener_ip);
        free(r->listener);
        free(r->recipient_domain);
        free(r->client_cidr.v);
        free(r->ip);
        config_str_list_free(&r->pool);
        free(r->hostname);
    }
    free(c->delivery.sources);
    for (size_t i = 0; i < c->nroutes; i++) {
        free(c->routes[i].domain);
        free(c->routes[i].via);
    }
    free(c->routes);
    for (size_t i = 0; i < c->nmilters; i++) {
        free(c->milters[i].name);
        free(c->milters[i].socket);
    }
    free(c->milters);
    for (size_t i = 0; i < c->nplugins; i++) {
        for (size_t j = 0; j < c->plugins[i].nconfig; j++) {
            free(c->plugins[i].config[j].key);
            free(c->plugins[i].config[j].value);
        }
        free(c->plugins[i].config);
        free(c->plugins[i].path);
    }
    free(c->plugins);
    free(c->relay.clients.v);
    config_str_list_free(&c->relay.domains);
    config_str_list_free(&c->dns.resolvers);
    config_str_list_free(&c->delivery.source_ips);
    free(c->delivery.hostname);
    free(c->retry.schedule_ms);
    free(c->file);
    free(c->hostname);
    free(c->spool);
    free(c->tls.cert);
    free(c->tls.key);
    for (size_t i = 0; i < c->tls.ncertificates; i++) {
        free(c->tls.certificates[i].cert);
        free(c->tls.certificates[i].key);
    }
    free(c->tls.certificates);
    free(c->auth.users_file);
    free(c->bounce.from_name);
    free(c->lua.script);
    free(c->http.listen);
    free(c);
}

struct petrel_config *
config_ref(struct petrel_config *c)
{
    c->refs++;
    return c;
}

void
config_unref(struct petrel_config *c)
{
    if (c != NULL && --c->refs == 0)
        config_free(c);
}

int
config_load_string(const char *name, const char *text, size_t len, struct petrel_config **out,
                   char **errors)
{
    struct config_ctx cx = {.name = name};
    struct petrel_config *c = xcalloc(1, sizeof(*c));
    c->refs = 1;
    c->file = xstrdup(name);
    *out = NULL;
    *errors = NULL;
    struct config_node *root = config_read_yaml(&cx, text, len);
    if (root != NULL && root->type != NODE_MAP && root->type != NODE_NULL)
        config_err(&cx, root, "expected a mapping of settings, got %s", config_node_kind(root));
    else if (cx.nerrs == 0) {
        config_parse_section(&cx, root, S_TOP, c);
        config_cross_check(&cx, root, c);
    }
    config_node_free(root);
    if (cx.nerrs > 0 || cx.dropped > 0) {
        *errors = config_errors_take(&cx);
        config_unref(c);
        return -1;
    }
    free(cx.errs);
    *out = c;
    return 0;
}

int
config_load_file(const char *path, struct petrel_config **out, char **errors)
{
    *out = NULL;
    *errors = NULL;
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        *errors = xasprintf("%s: cannot open: %s\n", path, strerror(errno));
        return -1;
    }
    struct buf b;
    buf_init(&b);
    size_t n;
    do {
        char *p = buf_reserve(&b, 65536);
        n = fread(p, 1, 65536, f);
        buf_commit(&b, n);
    } while (n > 0 && b.len <= CONFIG_MAX_FILE);
    int err = ferror(f) ? errno : 0;
    fclose(f);
    int r = -1;
    if (err != 0)
        *errors = xasprintf("%s: cannot read: %s\n", path, strerror(err));
    else if (b.len > CONFIG_MAX_FILE)
        *errors = xasprintf("%s: larger than %u bytes\n", path, CONFIG_MAX_FILE);
    else
        r = config_load_string(path, buf_ptr(&b), b.len, out, errors);
    buf_reset(&b);
    return r;
}

int
config_load_default(struct petrel_config **out, char **errors)
{
    return config_load_string("<embedded>", petrel_default_config, petrel_default_config_len, out,
                              errors);
}

/* ---- the option table, seen from outside ---------------------------------- */

size_t
config_option_count(void)
{
    return ARRAY_SIZE(config_options);
}

static void
config_option_path(const struct config_option *o, char *out, size_t size)
{
    const char *prefix = config_sect_prefix[o->sect];
    snprintf(out, size, "%s%s%s", prefix, *prefix ? "." : "", o->key);
}

bool
config_option_describe(size_t i, struct config_option_info *out)
{
    if (i >= ARRAY_SIZE(config_options))
        return false;
    const struct config_option *o = &config_options[i];
    config_option_path(o, out->path, sizeof(out->path));
    out->def = o->def;
    out->list = config_is_list(o->type);
    return true;
}

static const void *
config_sect_base(const struct petrel_config *c, enum config_sect s, size_t index)
{
    switch (s) {
    case S_LISTENER:
        return index < c->nlisteners ? (const void *)&c->listeners[index] : NULL;
    case S_SOURCE:
        return index < c->delivery.nsources ? (const void *)&c->delivery.sources[index] : NULL;
    case S_ROUTE:
        return index < c->nroutes ? (const void *)&c->routes[index] : NULL;
    case S_MILTER:
    case S_MILTER_TIMEOUTS:
        return index < c->nmilters ? (const void *)&c->milters[index] : NULL;
    case S_PLUGIN:
        return index < c->nplugins ? (const void *)&c->plugins[index] : NULL;
    case S_TLS_CERT:
        return index < c->tls.ncertificates ? (const void *)&c->tls.certificates[index] : NULL;
    default:
        return c;
    }
}

static void
config_format_value(struct buf *b, const struct config_option *o, const void *base)
{
    const void *field = (const char *)base + o->off;
    switch (o->type) {
    case T_STR:
        buf_append_str(b, *(char *const *)field ? *(char *const *)field : "");
        break;
    case T_UINT:
        buf_printf(b, "%u", *(const unsigned *)field);
        break;
    case T_SIZE:
        config_format_size(b, *(const uint64_t *)field);
        break;
    case T_DURATION:
        config_format_duration(b, *(const uint64_t *)field);
        break;
    case T_BOOL:
        buf_append_str(b, *(const bool *)field ? "true" : "false");
        break;
    case T_ENUM:
        buf_append_str(b, o->names[*(const int *)field]);
        break;
    case T_STR_LIST:
        for (size_t i = 0; i < ((const struct str_list *)field)->n; i++)
            buf_printf(b, "%s%s", i ? ", " : "", ((const struct str_list *)field)->v[i]);
        break;
    case T_CIDR_LIST:
        for (size_t i = 0; i < ((const struct cidr_list *)field)->n; i++) {
            buf_append_str(b, i ? ", " : "");
            config_format_cidr(b, &((const struct cidr_list *)field)->v[i]);
        }
        break;
    case T_DURATION_LIST:
        for (size_t i = 0; i < *(const size_t *)((const char *)base + o->off_n); i++) {
            buf_append_str(b, i ? ", " : "");
            config_format_duration(b, (*(uint64_t *const *)field)[i]);
        }
        break;
    case T_SECTION:
    case T_CUSTOM:
        break;
    }
}

bool
config_option_format(const struct petrel_config *c, const char *path, size_t index, char *out,
                     size_t size)
{
    for (size_t i = 0; i < ARRAY_SIZE(config_options); i++) {
        const struct config_option *o = &config_options[i];
        char p[64];
        config_option_path(o, p, sizeof(p));
        if (strcmp(p, path) != 0)
            continue;
        const void *base = config_sect_base(c, o->sect, index);
        if (base == NULL || o->type == T_SECTION || o->type == T_CUSTOM)
            return false;
        struct buf b;
        buf_init(&b);
        config_format_value(&b, o, base);
        char *s = buf_steal(&b, NULL);
        bool ok = str_copy(out, size, s);
        free(s);
        return ok;
    }
    return false;
}
