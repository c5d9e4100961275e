/* fake_spool — see fake_spool.h. Only the calls smtp_server makes. */
#include "fake_spool.h"

#include <stdio.h>
#include <string.h>

#include "spool.h"
#include "util.h"

struct fake_pending {
    spool_done_cb *cb;
    void *arg;
};

struct spool {
    unsigned next_qid;
    struct fake_spool_msg msgs[64];
    size_t nmsgs;
    struct fake_pending pending[64];
    size_t npending;
};

struct spool *
fake_spool_new(void)
{
    return xcalloc(1, sizeof(struct spool));
}

void
fake_spool_free(struct spool *sp)
{
    for (size_t i = 0; i < sp->nmsgs; i++) {
        struct fake_spool_msg *m = &sp->msgs[i];
        free(m->sender);
        for (size_t j = 0; j < m->nrcpts; j++)
            free(m->rcpts[j]);
        free(m->rcpts);
        free(m->content);
        free(m->envid);
        free(m->orcpt0);
        free(m->xbind_ip);
        free(m->xbind_hostname);
        free(m->quarantine_reason);
    }
    free(sp);
}

void
spool_new_qid(struct spool *sp, char out[SPOOL_QID_SIZE])
{
    snprintf(out, SPOOL_QID_SIZE, "%016X", ++sp->next_qid);
}

void
spool_submit(struct spool *sp, const struct spool_envelope *env, const struct span *parts,
             size_t nparts, spool_done_cb *cb, void *arg)
{
    if (sp->nmsgs == ARRAY_SIZE(sp->msgs) || sp->npending == ARRAY_SIZE(sp->pending))
        PANIC("fake_spool: too many messages");
    struct fake_spool_msg *m = &sp->msgs[sp->nmsgs++];
    memcpy(m->qid, env->qid, sizeof(m->qid));
    m->sender = xstrdup(env->sender);
    m->nrcpts = env->nrcpts;
    m->rcpts = xcalloc(env->nrcpts, sizeof(char *));
    for (size_t i = 0; i < env->nrcpts; i++)
        m->rcpts[i] = xstrdup(env->rcpts[i].addr);
    if (env->nrcpts > 0) {
        m->notify0 = env->rcpts[0].notify;
        m->orcpt0 = env->rcpts[0].orcpt ? xstrdup(env->rcpts[0].orcpt) : NULL;
    }
    size_t len = 0;
    for (size_t i = 0; i < nparts; i++)
        len += parts[i].len;
    m->content = xmalloc(len + 1);
    size_t o = 0;
    for (size_t i = 0; i < nparts; i++) {
        memcpy(m->content + o, parts[i].p, parts[i].len);
        o += parts[i].len;
    }
    m->content[len] = '\0';
    m->content_len = len;
    m->body = env->body;
    m->smtputf8 = env->smtputf8;
    m->ret = env->ret;
    m->envid = env->envid ? xstrdup(env->envid) : NULL;
    m->xbind_ip = env->xbind_ip ? xstrdup(env->xbind_ip) : NULL;
    m->xbind_hostname = env->xbind_hostname ? xstrdup(env->xbind_hostname) : NULL;
    m->flags = env->flags;
    m->quarantine_reason = env->quarantine_reason ? xstrdup(env->quarantine_reason) : NULL;
    sp->pending[sp->npending++] = (struct fake_pending){ cb, arg };
}

size_t
fake_spool_complete(struct spool *sp, int status)
{
    size_t n = sp->npending;
    struct fake_pending copy[64];
    memcpy(copy, sp->pending, n * sizeof(copy[0]));
    sp->npending = 0;
    for (size_t i = 0; i < n; i++)
        copy[i].cb(status, copy[i].arg);
    return n;
}

size_t
fake_spool_count(const struct spool *sp)
{
    return sp->nmsgs;
}

const struct fake_spool_msg *
fake_spool_msg(const struct spool *sp, size_t i)
{
    return i < sp->nmsgs ? &sp->msgs[i] : NULL;
}
