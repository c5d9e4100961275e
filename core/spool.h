/*
 * spool — the durable message store. A message is acknowledged (250) only
 * after spool_submit()'s callback reports success: content and envelope are
 * then on stable storage (fdatasync'ed, directory entries included).
 *
 * Layout (private to spool.c; see its header comment): an append-only
 * journal of checksummed records in segment files. Records appended during
 * one loop iteration are written and synced together by one threadpool job
 * (group commit); callbacks fire after the sync, in submission order.
 * Restart rebuilds the index from the journal alone; a torn record at the
 * tail (a crash before the 250) is discarded, never delivered.
 */
#ifndef PETREL_SPOOL_H
#define PETREL_SPOOL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "buf.h"
#include "util.h"

struct uv_loop_s;
struct spool;

/* Queue id: 16 upper-case hex digits, unique and sortable by arrival. */
#define SPOOL_QID_LEN 16
#define SPOOL_QID_SIZE (SPOOL_QID_LEN + 1)

enum spool_rcpt_state {
    SPOOL_RCPT_PENDING = 0,
    SPOOL_RCPT_DELIVERED,
    SPOOL_RCPT_DEFERRED,
    SPOOL_RCPT_FAILED,
};

struct spool_rcpt {
    char *addr;               /* owned */
    char *orcpt;              /* owned or NULL: "rfc822;bob@example.org" (decoded) */
    unsigned notify;          /* SMTP_NOTIFY_* flags; 0 = not given */
    enum spool_rcpt_state state;
    uint32_t attempts;
    int64_t next_attempt_ms;  /* epoch ms; 0 = as soon as possible */
    int64_t updated_ms;       /* epoch ms of the last state change */
    char *last_reply;         /* owned or NULL: e.g. "451 4.7.1 Try later" */
};

#define SPOOL_F_QUARANTINED 0x1u

struct spool_envelope {
    char qid[SPOOL_QID_SIZE];
    int64_t arrival_ms;       /* epoch ms */
    char *sender;             /* owned; "" for the null sender */
    struct spool_rcpt *rcpts; /* owned */
    size_t nrcpts;
    /* MAIL parameters */
    uint64_t size_param;      /* SIZE= (0 if absent) */
    int body;                 /* enum smtp_body */
    bool smtputf8;
    int ret;                  /* enum smtp_ret */
    char *envid;              /* owned or NULL (decoded) */
    /* where it came from */
    char *listener;           /* owned: listener name */
    char *local_ip;           /* owned: local address the client connected to */
    char *client_ip;          /* owned */
    char *client_helo;        /* owned or NULL */
    char *auth_user;          /* owned or NULL */
    /* client override of source IP / EHLO (XBIND); NULL if none */
    char *xbind_ip;           /* owned or NULL */
    char *xbind_hostname;     /* owned or NULL */
    uint32_t flags;           /* SPOOL_F_* */
    char *quarantine_reason;  /* owned or NULL */
    uint64_t content_size;    /* bytes of message content as stored */
};

/* Frees every owned field (not env itself); NULL-safe fields. */
void spool_envelope_clear(struct spool_envelope *env);
/* Deep copy. */
void spool_envelope_copy(struct spool_envelope *dst, const struct spool_envelope *src);
const char *spool_rcpt_state_name(enum spool_rcpt_state s);

struct spool_options {
    uint64_t segment_size;    /* rotate after this many bytes; default 64 MiB */
    bool no_sync;             /* tests/bench only: skip fdatasync (never in production) */
};

/* Opens (creating if needed) the spool directory for the daemon: takes an
 * exclusive lock (a second daemon on the same spool fails), recovers the
 * index from the journal, truncates a torn tail record, logs a summary.
 * opts may be NULL. Returns 0, or -1 with *err (owned by caller). */
int spool_open(struct uv_loop_s *loop, const char *dir, const struct spool_options *opts,
               struct spool **out, char **err) __attribute__((warn_unused_result));

/* Read-only view for the queue CLI: no lock, no truncation, no loop; works
 * while the daemon runs (a record being written is simply not seen). */
int spool_open_readonly(const char *dir, struct spool **out, char **err)
    __attribute__((warn_unused_result));

/* Waits for pending commits (runs their callbacks) and frees everything.
 * NULL is a no-op.
 * For a spool from spool_open(): call it after uv_run() has returned (never
 * from a callback on that loop) and before uv_loop_close(). It finishes the
 * commit in flight by running the loop (UV_RUN_ONCE, so other handles'
 * callbacks may run meanwhile), writes and syncs what is still queued
 * synchronously, fires those callbacks (which may queue more: they are
 * committed too), closes its uv_prepare handle (running the loop until it
 * is closed), releases the lock and frees the index. */
void spool_close(struct spool *sp);

/* A fresh queue id, greater than every id issued or recovered before. */
void spool_new_qid(struct spool *sp, char out[SPOOL_QID_SIZE]);

/* status: 0 once durable; a negative errno-style code on failure (the
 * record must then be treated as not written). Fires exactly once, always
 * from a later loop iteration, never from inside the call that queued it. */
typedef void spool_done_cb(int status, void *arg);

/* Queues a new message: copies env (env->qid must come from spool_new_qid)
 * and the content, given as parts to concatenate (e.g. Received header +
 * body). The message enters the index when cb reports success. */
void spool_submit(struct spool *sp, const struct spool_envelope *env, const struct span *parts,
                  size_t nparts, spool_done_cb *cb, void *arg);

/* Records a recipient's new state (state, attempts, next_attempt_ms,
 * updated_ms, last_reply are taken from st). */
void spool_update_rcpt(struct spool *sp, const char *qid, size_t idx, const struct spool_rcpt *st,
                       spool_done_cb *cb, void *arg);

/* Sets or clears SPOOL_F_QUARANTINED with a reason. */
void spool_set_quarantine(struct spool *sp, const char *qid, const char *reason,
                          spool_done_cb *cb, void *arg);

/* Removes a message (all recipients final, or admin delete). */
void spool_remove(struct spool *sp, const char *qid, spool_done_cb *cb, void *arg);

/* Index access. Pointers are borrowed, valid until the next call that
 * mutates the spool (submit/update/remove completion) or spool_close. */
size_t spool_count(const struct spool *sp);
const struct spool_envelope *spool_get(const struct spool *sp, const char *qid);
/* Calls fn for every message in qid (arrival) order. */
void spool_foreach(const struct spool *sp,
                   void (*fn)(const struct spool_envelope *env, void *arg), void *arg);

/* Reads a message's content (synchronous pread; CLI and small messages).
 * Appends to out. Returns 0 or a negative errno. */
int spool_read_content(const struct spool *sp, const char *qid, struct buf *out)
    __attribute__((warn_unused_result));

/* Counters since spool_open (tests, benchmarks, status output). */
struct spool_stats {
    uint64_t commits;          /* group commits (threadpool jobs that wrote records) */
    uint64_t syncs;            /* fdatasync() calls on segments */
    uint64_t records;          /* records written for callers (MSG/RCPT/QUAR/DONE) */
    uint64_t bytes;            /* bytes appended to the journal, compaction included */
    uint64_t compacted;        /* live messages re-appended by compaction */
    uint64_t segments;         /* segment files now in the journal */
    uint64_t segments_created; /* by rotation since open */
    uint64_t segments_deleted; /* by garbage collection since open */
};

void spool_stats(const struct spool *sp, struct spool_stats *out);

#endif
