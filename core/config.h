/*
 * config — YAML file → struct petrel_config, fully converted (durations in
 * ms, sizes in bytes, addresses as sockaddrs, CIDRs as masks) and validated.
 * Every error names file:line:column and the key path, e.g.
 *   petrel.yaml:12:5: listeners[0].address: expected host:port
 * Unknown, duplicate, mistyped and missing keys are errors. The config is
 * immutable once loaded and refcounted (reload swaps in a new one).
 */
#ifndef PETREL_CONFIG_H
#define PETREL_CONFIG_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>

struct cidr {
    int family;         /* AF_INET or AF_INET6 */
    uint8_t addr[16];   /* network byte order; first 4 bytes for IPv4 */
    unsigned prefix;    /* 0..32 or 0..128 */
};

struct cidr_list {
    struct cidr *v;     /* owned */
    size_t n;
};

struct str_list {
    char **v;           /* owned, each owned */
    size_t n;
};

enum listener_tls { LISTENER_TLS_NONE, LISTENER_TLS_STARTTLS, LISTENER_TLS_IMPLICIT };
enum listener_auth { LISTENER_AUTH_NONE, LISTENER_AUTH_OPTIONAL, LISTENER_AUTH_REQUIRED };

struct listener_config {
    char *name;                       /* owned; default "listenerN" */
    char *address;                    /* owned; as written, "host:port" / "[v6]:port" */
    struct sockaddr_storage addr;     /* parsed address */
    socklen_t addr_len;
    enum listener_tls tls;            /* default none */
    enum listener_auth auth;          /* default none */
    uint64_t max_message_size;        /* bytes; default 50M; SIZE advertised */
    unsigned max_recipients;          /* default 1000 */
    unsigned max_line_length;         /* command line incl. CRLF; default 2048 */
    unsigned max_errors;              /* default 10, then 421 4.7.0 */
    unsigned max_connections;         /* per listener; default 1000 */
    unsigned max_connections_per_ip;  /* default 50 */
    uint64_t command_timeout_ms;      /* default 5m (RFC 5321 4.5.3.2.7) */
    uint64_t data_timeout_ms;         /* per DATA block read; default 3m (4.5.3.2.5-6) */
    uint64_t greet_delay_ms;          /* banner delay for early-talker detection; default 0 */
    unsigned max_received_headers;    /* hop limit; default 100 */
    struct str_list milters;          /* names; empty + milters_set=false: all */
    bool milters_set;
    int line;                         /* line in the config file (for errors) */
};

struct source_rule {
    char *domain;            /* owned or NULL: sender domain, "*.x" = subdomains */
    char *listener_ip;       /* owned or NULL */
    char *listener;          /* owned or NULL */
    char *recipient_domain;  /* owned or NULL */
    struct cidr_list client_cidr;
    char *ip;                /* owned or NULL */
    struct str_list pool;    /* alternative to ip */
    char *hostname;          /* owned or NULL */
    int line;
};

struct ip_hostname {
    char *ip;                /* owned */
    char *hostname;          /* owned */
};

enum delivery_tls { DELIVERY_TLS_NONE, DELIVERY_TLS_OPPORTUNISTIC, DELIVERY_TLS_REQUIRED,
                    DELIVERY_TLS_DANE,
                    DELIVERY_TLS_DEFAULT /* routes[].tls only: delivery.tls applies */ };

struct route_config {
    char *domain;            /* owned; exact or "*.x" or "*" */
    char *via;               /* owned: "mx" | "smtp:[host]:port" | "lmtp:[host]:port" | "lmtp:unix:/path" */
    enum delivery_tls tls;   /* this route's TLS policy; default DELIVERY_TLS_DEFAULT */
    int line;
};

enum milter_action { MILTER_ACTION_ACCEPT, MILTER_ACTION_TEMPFAIL, MILTER_ACTION_REJECT };

struct milter_config {
    char *name;              /* owned */
    char *socket;            /* owned: unix:/path | inet:port@host | inet6:port@host */
    enum milter_action default_action;  /* default tempfail */
    uint64_t connect_timeout_ms;        /* default 5s */
    uint64_t command_timeout_ms;        /* default 30s */
    uint64_t eom_timeout_ms;            /* default 60s */
    int line;
};

/* tls.certificates[]: a further certificate, served to clients whose SNI
 * names one of its host names (tls.cert is the default). */
struct tls_cert_config {
    char *cert;              /* owned: PEM chain */
    char *key;               /* owned */
    int line;
};

struct plugin_kv {
    char *key;               /* owned */
    char *value;             /* owned (scalars only) */
};

struct plugin_config {
    char *path;              /* owned */
    struct plugin_kv *config; /* owned */
    size_t nconfig;
    int line;
};

struct petrel_config {
    int refs;
    char *file;                      /* owned: path shown in errors, "<embedded>" */
    char *hostname;                  /* owned; default: gethostname() */
    char *spool;                     /* owned; default "./var/spool" */
    uint64_t shutdown_timeout_ms;    /* default 30s */

    struct {
        int level;                   /* enum log_level; default info */
        int format;                  /* enum log_format; default text */
    } log;

    struct listener_config *listeners; /* owned; at least one */
    size_t nlisteners;

    struct {
        char *cert;                  /* owned or NULL: PEM chain, leaf first */
        char *key;                   /* owned or NULL */
        struct tls_cert_config *certificates; /* owned: more, chosen by SNI */
        size_t ncertificates;
    } tls;

    struct {
        struct cidr_list clients;    /* default: 127.0.0.0/8, ::1/128 */
        struct str_list domains;     /* default empty */
    } relay;

    struct {
        char *users_file;            /* owned or NULL */
        bool allow_plaintext;        /* default false */
    } auth;

    struct {
        struct str_list resolvers;   /* "host:port"; empty: /etc/resolv.conf */
        uint64_t timeout_ms;         /* default 5s */
    } dns;

    struct {
        char *hostname;              /* owned or NULL (then top-level hostname) */
        struct str_list source_ips;
        struct ip_hostname *hostnames; /* owned */
        size_t nhostnames;
        struct source_rule *sources; /* owned */
        size_t nsources;
        unsigned max_connections_per_destination; /* default 20 */
        unsigned max_messages_per_connection;     /* default 100 */
        enum delivery_tls tls;       /* default opportunistic */
        unsigned port;               /* default 25 */
        bool hold;                   /* queue everything, deliver nothing; default false */
        bool tls_fallback;           /* opportunistic: plaintext after a failed handshake */
        bool mta_sts;                /* apply MTA-STS policies (RFC 8461); default false */
        unsigned max_connections;    /* all destinations together; default 500 */
        uint64_t connection_cache_time_ms; /* idle connection kept for reuse; default 2s */
        struct {                     /* RFC 5321 4.5.3.2 client timeouts */
            uint64_t connect_ms;     /* default 30s */
            uint64_t greeting_ms;    /* default 5m */
            uint64_t command_ms;     /* default 5m */
            uint64_t data_init_ms;   /* default 2m */
            uint64_t data_block_ms;  /* default 3m */
            uint64_t data_end_ms;    /* default 10m */
        } timeouts;
    } delivery;

    struct route_config *routes;     /* owned */
    size_t nroutes;

    struct {
        uint64_t *schedule_ms;       /* owned; default 15m,30m,1h,4h */
        size_t nschedule;
        unsigned max_attempts;       /* default 10 */
        uint64_t max_age_ms;         /* default 5d */
    } retry;

    struct {
        bool enabled;                /* default true */
        char *from_name;             /* owned; default "Mail Delivery System" */
    } bounce;

    struct {
        char *script;                /* owned or NULL */
        int on_error;                /* enum milter_action semantics; default tempfail */
        uint64_t timeout_ms;         /* default 1s */
    } lua;

    struct milter_config *milters;   /* owned */
    size_t nmilters;

    struct plugin_config *plugins;   /* owned */
    size_t nplugins;

    struct {
        char *listen;                /* owned or NULL */
    } http;
};

/* Loads and validates a config file. On success returns 0 and *out (refs=1).
 * On failure returns -1 and *errors holds one or more
 * "file:line:col: key: reason" lines, each ended by a newline, sorted by
 * position (owned by the caller, free()). */
int config_load_file(const char *path, struct petrel_config **out, char **errors)
    __attribute__((warn_unused_result));
/* Same, from memory; name is used in error messages. */
int config_load_string(const char *name, const char *text, size_t len,
                       struct petrel_config **out, char **errors)
    __attribute__((warn_unused_result));
/* The embedded default (config/petrel.yaml compiled in). */
int config_load_default(struct petrel_config **out, char **errors)
    __attribute__((warn_unused_result));

struct petrel_config *config_ref(struct petrel_config *c);
void config_unref(struct petrel_config *c); /* NULL is a no-op */

/* Parsers shared with other modules; false on bad syntax. */
bool config_parse_duration(const char *s, uint64_t *ms);   /* "30s" "15m" "4h" "5d" "250ms" */
bool config_parse_size(const char *s, uint64_t *bytes);    /* "50M" "1G" "512K" "1000" */
bool config_parse_cidr(const char *s, struct cidr *out);   /* "10.0.0.0/8", "::1", "1.2.3.4" */
/* "host:port", "[v6]:port", "*:port" → sockaddr. */
bool config_parse_hostport(const char *s, struct sockaddr_storage *ss, socklen_t *len);

/* 0 if ip (a literal) is an address of this machine (a socket can bind to
 * it), else the errno: EADDRNOTAVAIL when it is not local, EINVAL when it
 * is not an IP literal. */
int config_ip_local_errno(const char *ip);

/* True if the address (AF_INET/AF_INET6 sockaddr) lies in one of the CIDRs. */
bool cidr_list_match(const struct cidr_list *l, const struct sockaddr *sa);
bool cidr_match(const struct cidr *c, const struct sockaddr *sa);

/* The option table (every key with its default and bounds, Valkey
 * static_configs), for tests and `petrel check-config`. */
struct config_option_info {
    char path[64];          /* "retry.max_age", "listeners[].tls", "milters[].timeouts.eom" */
    const char *def;        /* borrowed static: default as written in YAML ("50M"; lists
                               without brackets: "15m, 30m, 1h, 4h"); NULL: none */
    bool list;              /* the value is a YAML list */
};
size_t config_option_count(void);
/* Describes option i (0 ≤ i < config_option_count()); false if out of range. */
bool config_option_describe(size_t i, struct config_option_info *out);
/* Writes the value of option path (as in config_option_info) in its
 * canonical YAML spelling ("50M", "5m", "127.0.0.0/8, ::1/128") into out;
 * index picks the element of a list section (listeners[], milters[], …).
 * False for unknown paths, sections, missing elements or truncation. */
bool config_option_format(const struct petrel_config *c, const char *path, size_t index,
                          char *out, size_t size);

#endif
