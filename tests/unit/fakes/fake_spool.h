/* fake_spool — stands in for core/spool.c in engine tests: records every
 * submitted message and fires the commit callbacks when the test says so. */
#ifndef PETREL_FAKE_SPOOL_H
#define PETREL_FAKE_SPOOL_H

#include <stddef.h>

struct spool;

struct fake_spool_msg {
    char qid[17];
    char *sender;        /* owned */
    char **rcpts;        /* owned */
    size_t nrcpts;
    char *content;       /* owned, NUL-terminated */
    size_t content_len;
    int body;
    int smtputf8;
    int ret;
    char *envid;         /* owned or NULL */
    unsigned notify0;    /* notify flags of the first recipient */
    char *orcpt0;        /* owned or NULL */
    char *xbind_ip;      /* owned or NULL */
    char *xbind_hostname; /* owned or NULL */
    unsigned flags;       /* SPOOL_F_* */
    char *quarantine_reason; /* owned or NULL */
};

struct spool *fake_spool_new(void);
void fake_spool_free(struct spool *sp);
/* Fires pending commit callbacks with status; returns how many fired. */
size_t fake_spool_complete(struct spool *sp, int status);
size_t fake_spool_count(const struct spool *sp);
const struct fake_spool_msg *fake_spool_msg(const struct spool *sp, size_t i);

#endif
