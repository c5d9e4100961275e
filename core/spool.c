/*
 * spool — the durable message store: an append-only journal of checksummed
 * records with group commit, and an in-memory index rebuilt from it at start.
 *
 * Layout:
 *   <dir>/lock                       flock(LOCK_EX|LOCK_NB) while a daemon owns it
 *   <dir>/journal/<16 hex>.log       segments, written in sequence order
 *
 * Record: a 16-byte header then the payload (all integers little-endian):
 *   magic "PTRJ" u32 | type u8 | version u8 | reserved u16 | payload length u32 | crc u32
 * The CRC-32 (IEEE) covers header bytes 4..11 (type, version, reserved,
 * length) and then the payload, so a damaged type or length is caught too.
 * Payload: the queue id (16 ASCII hex digits), then TLV fields { tag u8,
 * length u32, value }; unknown tags are skipped, so fields can be added
 * without a version bump (the version byte is for incompatible changes: a
 * record of an unknown version or type is logged and skipped, never
 * truncated). Types:
 *   MSG   full envelope, per-recipient state (nested TLVs), content last;
 *         also written by compaction as a snapshot that replaces the
 *         message's earlier records
 *   RCPT  one recipient's state (index, state, attempts, next, updated, reply)
 *   QUAR  quarantine flag and reason
 *   DONE  the message is gone
 * The journal is treated as untrusted bytes: every length is bounds-checked.
 *
 * Group commit (STYLE.md §8): the queuing calls only encode a record into
 * the pending batch and remember the callback. A uv_prepare handle (Valkey's
 * beforeSleep) starts one uv_queue_work job per loop iteration when there is
 * work and no job in flight; the job writes the whole batch with pwrite(2),
 * fdatasync()s the segment, and its completion applies the batch to the index
 * and fires the callbacks in order. Records queued meanwhile form the next
 * batch, so under load batches grow and syncs per message drop. The work
 * function touches only the job (struct spool_job): no index, no logging.
 * A write or sync error fails that batch and every later one (-EIO): after a
 * failed fsync the page cache state is unknown, so only a restart (which
 * re-reads the journal) can trust the disk again.
 *
 * Segments rotate when the current one reaches segment_size. Each segment
 * counts references: live messages whose MSG record is in it plus live
 * messages whose latest record is in it. Segments are deleted oldest-first
 * only (never the current one), so a DONE record can never disappear while
 * the MSG record it cancels survives. When rotating, if the oldest segment
 * still holds live messages and is mostly dead space (or the journal is more
 * than twice the live data), those messages are re-appended as MSG snapshots
 * (a bounded amount per batch, placed before the batch's own records so the
 * batch's updates apply on top), which moves their references forward.
 *
 * Crash safety (kill -9 or power loss at any point):
 *   - an acknowledged message (callback fired with 0) survives: its record
 *     and every record before it were fdatasync'ed, and a new segment's
 *     directory entry was fsync'ed before any record in it was acknowledged;
 *   - an unacknowledged message is either fully present (written but not yet
 *     acknowledged: it will be delivered, like Postfix's queue file that
 *     was complete before the 250 was sent) or removed at start-up: a short
 *     or damaged record at the tail of the last segment is a write torn by
 *     the crash and the file is truncated there;
 *   - a recipient whose delivered state was acknowledged is never marked
 *     pending again: its RCPT record is replayed after the MSG record, and a
 *     compaction snapshot carries the state of the index (acknowledged
 *     records only) and is written before any newer record;
 *   - segment deletion happens after the records that made it obsolete were
 *     synced, oldest-first, with a directory fsync after each unlink.
 *
 * Threads: everything runs on the loop thread except spool_job_work().
 */
#include "spool.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>
#include <uv.h>

#include "log.h"

#define SPOOL_MAGIC 0x4A525450u /* bytes "PTRJ" */
#define SPOOL_HDR_LEN 16
#define SPOOL_REC_VERSION 1
#define SPOOL_RECORD_MAX (1u << 30)            /* payload bytes */
#define SPOOL_SEGMENT_SIZE_DEFAULT (64ull << 20)
#define SPOOL_COMPACT_BUDGET (8u << 20)        /* content bytes re-appended per batch */
#define SPOOL_READ_WINDOW (1u << 20)
#define SPOOL_RCPTS_MAX 1000000

enum {
    REC_NONE = 0, /* an op that writes nothing and fails with its preset status */
    REC_MSG = 1,
    REC_RCPT = 2,
    REC_QUAR = 3,
    REC_DONE = 4,
};

enum {
    T_ARRIVAL = 1,
    T_SENDER = 2,
    T_SIZE_PARAM = 3,
    T_BODY = 4,
    T_SMTPUTF8 = 5,
    T_RET = 6,
    T_ENVID = 7,
    T_LISTENER = 8,
    T_LOCAL_IP = 9,
    T_CLIENT_IP = 10,
    T_HELO = 11,
    T_AUTH = 12,
    T_XBIND_IP = 13,
    T_XBIND_HOST = 14,
    T_FLAGS = 15,
    T_QREASON = 16,
    T_RCPT = 17,    /* nested TLVs below */
    T_CONTENT = 18, /* always the last field of a MSG record */
    T_R_ADDR = 32,
    T_R_ORCPT = 33,
    T_R_NOTIFY = 34,
    T_R_STATE = 35,
    T_R_ATTEMPTS = 36,
    T_R_NEXT = 37,
    T_R_UPDATED = 38,
    T_R_LAST = 39,
    T_R_IDX = 40,
};

struct spool_msg {
    struct spool_envelope env;
    uint64_t key;             /* qid as a number */
    struct spool_msg *next;   /* hash chain */
    uint64_t content_seg;     /* segment holding the MSG record */
    uint64_t content_off;     /* file offset of the content bytes */
    uint64_t rec_len;         /* length of the MSG record, header included */
    uint64_t state_seg;       /* segment holding the latest record */
};

struct spool_seg {
    uint64_t seq;
    int fd;                   /* owned */
    uint64_t size;            /* end of the valid records */
    uint64_t refs;            /* see the header comment */
    uint64_t live;            /* bytes of MSG records of live messages */
};

/* One queued record (or a failure to report), applied after its batch syncs. */
struct spool_op {
    uint8_t type;             /* REC_* */
    int status;               /* REC_NONE: the failure to report */
    uint64_t key;
    size_t rec_off;           /* offset of the record in the batch data */
    size_t rec_len;
    size_t content_pos;       /* MSG: offset of the content inside the record */
    struct spool_envelope env; /* MSG: owned copy */
    size_t idx;               /* RCPT */
    struct spool_rcpt rcpt;   /* RCPT: state fields; last_reply owned */
    bool quarantine;          /* QUAR: set (true) or clear the flag */
    char *reason;             /* QUAR: owned or NULL */
    spool_done_cb *cb;
    void *arg;
};

struct spool_batch {
    struct buf data;          /* encoded records, CRCs filled by the job */
    struct spool_op *ops;     /* owned */
    size_t nops;
    size_t cap;
    size_t nrecords;
};

/* A compaction copy: a MSG snapshot whose content is copied by the job. */
struct spool_copy {
    char *prefix;             /* owned: header + payload up to the content */
    size_t prefix_len;
    int src_fd;               /* borrowed from the source segment (alive while the job runs) */
    uint64_t src_off;
    uint64_t len;             /* content bytes */
    uint64_t key;
    uint64_t dst_off;         /* where the record lands in the current segment */
};

/* What the threadpool sees: only this struct (and the fds/bytes it names). */
struct spool_job {
    uv_work_t req;
    struct spool *sp;         /* borrowed: spool_close waits for the job */
    struct spool_batch *batch; /* borrowed from sp->batch[], owned by the job while it runs */
    bool skip_io;             /* spool failed: write nothing */
    int fd;                   /* segment to append to; -1 when creating new_path */
    char *new_path;           /* owned or NULL: rotation */
    uint64_t new_seq;
    const char *jdir;         /* borrowed from the spool */
    uint64_t off;             /* append offset */
    struct spool_copy *copies; /* owned */
    size_t ncopies;
    uint64_t batch_off;       /* offset of the batch records */
    uint64_t end;             /* offset after the last record */
    char **unlinks;           /* owned: segment paths to delete */
    size_t nunlinks;
    bool no_sync;
    /* results */
    int status;               /* 0 or -errno of the first failure */
    int new_fd;
    int unlink_status;
    bool synced;
    bool wrote;
};

struct spool {
    uv_loop_t *loop;          /* borrowed; NULL when read-only */
    char *dir;                /* owned */
    char *jdir;               /* owned: <dir>/journal */
    bool readonly;
    int lock_fd;
    struct spool_options opts;
    bool failed;              /* a write or sync failed: commits fail with -EIO */
    struct spool_msg **buckets; /* owned */
    size_t nbuckets;
    size_t count;
    struct spool_seg *segs;   /* owned, by increasing seq; the last one is current */
    size_t nsegs;
    uint64_t last_qid;
    struct spool_batch batch[2];
    struct spool_batch *pending; /* borrowed from batch[]: being filled on the loop thread */
    struct spool_job job;
    bool job_busy;
    char **unlinks;           /* owned: paths of segments dropped from segs[] */
    size_t nunlinks;
    uint64_t compact_seq;     /* segment being compacted, 0 if none */
    uint64_t *compact_keys;   /* owned */
    size_t ncompact;
    size_t compact_pos;
    uv_prepare_t prepare;
    bool prepare_started;
    bool prepare_closed;
    struct spool_stats stats;
};

/* ---- CRC-32/IEEE, slicing-by-8 ---- */

static uint32_t spool_crc_table[8][256];
static pthread_once_t spool_crc_once = PTHREAD_ONCE_INIT;

static void
spool_crc_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        spool_crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = spool_crc_table[0][i];
        for (int t = 1; t < 8; t++) {
            c = spool_crc_table[0][c & 0xff] ^ (c >> 8);
            spool_crc_table[t][i] = c;
        }
    }
}

static inline uint32_t
spool_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline void
spool_put_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

static inline void
spool_put_le64(unsigned char *p, uint64_t v)
{
    spool_put_le32(p, (uint32_t)v);
    spool_put_le32(p + 4, (uint32_t)(v >> 32));
}

/* Running CRC: start with 0, feed pieces in order. */
static uint32_t
spool_crc32(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    uint32_t(*t)[256] = spool_crc_table;
    crc = ~crc;
    while (n >= 8) {
        uint32_t a = crc ^ spool_le32(p);
        uint32_t b = spool_le32(p + 4);
        crc = t[7][a & 0xff] ^ t[6][(a >> 8) & 0xff] ^ t[5][(a >> 16) & 0xff] ^ t[4][a >> 24] ^
              t[3][b & 0xff] ^ t[2][(b >> 8) & 0xff] ^ t[1][(b >> 16) & 0xff] ^ t[0][b >> 24];
        p += 8;
        n -= 8;
    }
    while (n-- > 0)
        crc = t[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

/* CRC of a record whose payload is the n bytes after hdr. */
static uint32_t
spool_rec_crc(const unsigned char *hdr, const unsigned char *payload, size_t n)
{
    return spool_crc32(spool_crc32(0, hdr + 4, 8), payload, n);
}

/* ---- small helpers ---- */

static void
spool_qid_format(uint64_t key, char out[SPOOL_QID_SIZE])
{
    static const char hex[] = "0123456789ABCDEF";
    for (int i = SPOOL_QID_LEN - 1; i >= 0; i--) {
        out[i] = hex[key & 15];
        key >>= 4;
    }
    out[SPOOL_QID_LEN] = '\0';
}

/* Parses exactly 16 hex digits (either case). */
static bool
spool_qid_parse(const char *s, size_t len, uint64_t *key)
{
    if (s == NULL || len != SPOOL_QID_LEN)
        return false;
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)s[i];
        unsigned d;
        if (c >= '0' && c <= '9')
            d = c - '0';
        else if (c >= 'A' && c <= 'F')
            d = c - 'A' + 10;
        else if (c >= 'a' && c <= 'f')
            d = c - 'a' + 10;
        else
            return false;
        v = v << 4 | d;
    }
    *key = v;
    return true;
}

static bool
spool_qid_key(const char *qid, uint64_t *key)
{
    return qid != NULL && spool_qid_parse(qid, strnlen(qid, SPOOL_QID_SIZE), key);
}

static int
spool_pwrite_full(int fd, const void *data, size_t n, uint64_t off)
{
    const char *p = data;
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (w == 0)
            return -EIO;
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

/* Reads n bytes at off; -EIO if the file ends first. */
static int
spool_pread_full(int fd, void *data, size_t n, uint64_t off)
{
    char *p = data;
    while (n > 0) {
        ssize_t r = pread(fd, p, n, (off_t)off);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        p += r;
        n -= (size_t)r;
        off += (uint64_t)r;
    }
    return 0;
}

static int
spool_fsync_dir(const char *path)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0)
        return -errno;
    int r = 0;
    if (fsync(fd) < 0)
        r = -errno;
    close(fd);
    return r;
}

static char *
spool_seg_path(const char *jdir, uint64_t seq)
{
    return xasprintf("%s/%016" PRIx64 ".log", jdir, seq);
}

/* mkdir -p, fsyncing the parent of every directory it creates. */
static int
spool_mkdirs(const char *path)
{
    char *p = xstrdup(path);
    size_t len = strlen(p);
    while (len > 1 && p[len - 1] == '/')
        p[--len] = '\0';
    int r = 0;
    for (size_t i = 1; i <= len && r == 0; i++) {
        if (p[i] != '/' && p[i] != '\0')
            continue;
        char save = p[i];
        p[i] = '\0';
        if (mkdir(p, 0700) == 0) {
            char *slash = strrchr(p, '/');
            char *parent = slash == NULL ? xstrdup(".")
                           : slash == p  ? xstrdup("/")
                                         : xstrndup(p, (size_t)(slash - p));
            r = spool_fsync_dir(parent);
            free(parent);
        } else if (errno != EEXIST) {
            r = -errno;
        } else {
            struct stat st;
            if (stat(p, &st) < 0)
                r = -errno;
            else if (!S_ISDIR(st.st_mode))
                r = -ENOTDIR;
        }
        p[i] = save;
    }
    free(p);
    return r;
}

/* ---- envelopes ---- */

static void
spool_rcpt_clear(struct spool_rcpt *r)
{
    free(r->addr);
    free(r->orcpt);
    free(r->last_reply);
    memset(r, 0, sizeof(*r));
}

void
spool_envelope_clear(struct spool_envelope *env)
{
    if (env == NULL)
        return;
    for (size_t i = 0; i < env->nrcpts; i++)
        spool_rcpt_clear(&env->rcpts[i]);
    free(env->rcpts);
    free(env->sender);
    free(env->envid);
    free(env->listener);
    free(env->local_ip);
    free(env->client_ip);
    free(env->client_helo);
    free(env->auth_user);
    free(env->xbind_ip);
    free(env->xbind_hostname);
    free(env->quarantine_reason);
    memset(env, 0, sizeof(*env));
}

static char *
spool_strdup_or_null(const char *s)
{
    return s == NULL ? NULL : xstrdup(s);
}

void
spool_envelope_copy(struct spool_envelope *dst, const struct spool_envelope *src)
{
    *dst = *src;
    dst->sender = spool_strdup_or_null(src->sender);
    dst->envid = spool_strdup_or_null(src->envid);
    dst->listener = spool_strdup_or_null(src->listener);
    dst->local_ip = spool_strdup_or_null(src->local_ip);
    dst->client_ip = spool_strdup_or_null(src->client_ip);
    dst->client_helo = spool_strdup_or_null(src->client_helo);
    dst->auth_user = spool_strdup_or_null(src->auth_user);
    dst->xbind_ip = spool_strdup_or_null(src->xbind_ip);
    dst->xbind_hostname = spool_strdup_or_null(src->xbind_hostname);
    dst->quarantine_reason = spool_strdup_or_null(src->quarantine_reason);
    dst->rcpts = NULL;
    if (src->nrcpts > 0) {
        dst->rcpts = xcalloc(src->nrcpts, sizeof(*dst->rcpts));
        for (size_t i = 0; i < src->nrcpts; i++) {
            const struct spool_rcpt *s = &src->rcpts[i];
            struct spool_rcpt *d = &dst->rcpts[i];
            *d = *s;
            d->addr = spool_strdup_or_null(s->addr);
            d->orcpt = spool_strdup_or_null(s->orcpt);
            d->last_reply = spool_strdup_or_null(s->last_reply);
        }
    }
}

const char *
spool_rcpt_state_name(enum spool_rcpt_state s)
{
    switch (s) {
    case SPOOL_RCPT_PENDING:
        return "pending";
    case SPOOL_RCPT_DELIVERED:
        return "delivered";
    case SPOOL_RCPT_DEFERRED:
        return "deferred";
    case SPOOL_RCPT_FAILED:
        return "failed";
    }
    return "unknown";
}

/* ---- record encoding ---- */

static unsigned char *
spool_buf_at(struct buf *b, size_t pos)
{
    return (unsigned char *)b->data + b->off + pos;
}

static void
spool_enc_tlv(struct buf *b, unsigned tag, const void *val, size_t len)
{
    unsigned char h[5];
    h[0] = (unsigned char)tag;
    spool_put_le32(h + 1, (uint32_t)len);
    buf_append(b, h, sizeof(h));
    buf_append(b, val, len);
}

static void
spool_enc_u64(struct buf *b, unsigned tag, uint64_t v)
{
    unsigned char le[8];
    spool_put_le64(le, v);
    spool_enc_tlv(b, tag, le, sizeof(le));
}

static void
spool_enc_str(struct buf *b, unsigned tag, const char *s)
{
    if (s != NULL)
        spool_enc_tlv(b, tag, s, strlen(s));
}

/* Starts a TLV whose length is patched by spool_enc_end(). */
static size_t
spool_enc_begin(struct buf *b, unsigned tag)
{
    size_t at = b->len;
    unsigned char h[5] = { (unsigned char)tag, 0, 0, 0, 0 };
    buf_append(b, h, sizeof(h));
    return at;
}

static void
spool_enc_end(struct buf *b, size_t at)
{
    spool_put_le32(spool_buf_at(b, at + 1), (uint32_t)(b->len - at - 5));
}

/* Starts a record: header (length and CRC patched later) and the qid. */
static size_t
spool_rec_begin(struct buf *b, unsigned type, uint64_t key)
{
    size_t at = b->len;
    unsigned char h[SPOOL_HDR_LEN] = { 0 };
    spool_put_le32(h, SPOOL_MAGIC);
    h[4] = (unsigned char)type;
    h[5] = SPOOL_REC_VERSION;
    buf_append(b, h, sizeof(h));
    char qid[SPOOL_QID_SIZE];
    spool_qid_format(key, qid);
    buf_append(b, qid, SPOOL_QID_LEN);
    return at;
}

static void
spool_rec_end(struct buf *b, size_t at)
{
    spool_put_le32(spool_buf_at(b, at + 8), (uint32_t)(b->len - at - SPOOL_HDR_LEN));
}

static void
spool_enc_rcpt_state(struct buf *b, const struct spool_rcpt *r)
{
    spool_enc_u64(b, T_R_STATE, (uint64_t)r->state);
    if (r->attempts != 0)
        spool_enc_u64(b, T_R_ATTEMPTS, r->attempts);
    if (r->next_attempt_ms != 0)
        spool_enc_u64(b, T_R_NEXT, (uint64_t)r->next_attempt_ms);
    if (r->updated_ms != 0)
        spool_enc_u64(b, T_R_UPDATED, (uint64_t)r->updated_ms);
    spool_enc_str(b, T_R_LAST, r->last_reply);
}

/* The MSG payload after the qid, up to (not including) the content. */
static void
spool_enc_envelope(struct buf *b, const struct spool_envelope *env)
{
    spool_enc_u64(b, T_ARRIVAL, (uint64_t)env->arrival_ms);
    spool_enc_str(b, T_SENDER, env->sender != NULL ? env->sender : "");
    if (env->size_param != 0)
        spool_enc_u64(b, T_SIZE_PARAM, env->size_param);
    if (env->body != 0)
        spool_enc_u64(b, T_BODY, (uint64_t)(int64_t)env->body);
    if (env->smtputf8)
        spool_enc_u64(b, T_SMTPUTF8, 1);
    if (env->ret != 0)
        spool_enc_u64(b, T_RET, (uint64_t)(int64_t)env->ret);
    spool_enc_str(b, T_ENVID, env->envid);
    spool_enc_str(b, T_LISTENER, env->listener);
    spool_enc_str(b, T_LOCAL_IP, env->local_ip);
    spool_enc_str(b, T_CLIENT_IP, env->client_ip);
    spool_enc_str(b, T_HELO, env->client_helo);
    spool_enc_str(b, T_AUTH, env->auth_user);
    spool_enc_str(b, T_XBIND_IP, env->xbind_ip);
    spool_enc_str(b, T_XBIND_HOST, env->xbind_hostname);
    if (env->flags != 0)
        spool_enc_u64(b, T_FLAGS, env->flags);
    spool_enc_str(b, T_QREASON, env->quarantine_reason);
    for (size_t i = 0; i < env->nrcpts; i++) {
        const struct spool_rcpt *r = &env->rcpts[i];
        size_t at = spool_enc_begin(b, T_RCPT);
        spool_enc_str(b, T_R_ADDR, r->addr != NULL ? r->addr : "");
        spool_enc_str(b, T_R_ORCPT, r->orcpt);
        if (r->notify != 0)
            spool_enc_u64(b, T_R_NOTIFY, r->notify);
        spool_enc_rcpt_state(b, r);
        spool_enc_end(b, at);
    }
}

/* ---- record decoding (untrusted bytes) ---- */

struct spool_dec {
    const unsigned char *p;   /* borrowed: the record payload being decoded */
    size_t len;
    size_t pos;
};

/* 1: a field; 0: end; -1: malformed. */
static int
spool_dec_next(struct spool_dec *d, unsigned *tag, const unsigned char **val, size_t *vlen)
{
    if (d->pos == d->len)
        return 0;
    if (d->len - d->pos < 5)
        return -1;
    uint32_t n = spool_le32(d->p + d->pos + 1);
    if (n > d->len - d->pos - 5)
        return -1;
    *tag = d->p[d->pos];
    *val = d->p + d->pos + 5;
    *vlen = n;
    d->pos += 5 + (size_t)n;
    return 1;
}

static bool
spool_dec_u64(const unsigned char *val, size_t vlen, uint64_t *out)
{
    if (vlen > 8)
        return false;
    uint64_t v = 0;
    for (size_t i = vlen; i > 0; i--)
        v = v << 8 | val[i - 1];
    *out = v;
    return true;
}

/* Replaces *out with a C string copy; false if the value holds a NUL. */
static bool
spool_dec_str(const unsigned char *val, size_t vlen, char **out)
{
    if (memchr(val, '\0', vlen) != NULL)
        return false;
    free(*out);
    *out = xstrndup((const char *)val, vlen);
    return true;
}

/* Fields shared by a MSG's nested recipient and a RCPT record; false if
 * malformed. Unknown tags are ignored. */
static bool
spool_dec_rcpt_field(struct spool_rcpt *r, unsigned tag, const unsigned char *val, size_t vlen)
{
    uint64_t v;
    switch (tag) {
    case T_R_ADDR:
        return spool_dec_str(val, vlen, &r->addr);
    case T_R_ORCPT:
        return spool_dec_str(val, vlen, &r->orcpt);
    case T_R_LAST:
        return spool_dec_str(val, vlen, &r->last_reply);
    case T_R_NOTIFY:
        if (!spool_dec_u64(val, vlen, &v) || v > UINT32_MAX)
            return false;
        r->notify = (unsigned)v;
        return true;
    case T_R_STATE:
        if (!spool_dec_u64(val, vlen, &v) || v > SPOOL_RCPT_FAILED)
            return false;
        r->state = (enum spool_rcpt_state)v;
        return true;
    case T_R_ATTEMPTS:
        if (!spool_dec_u64(val, vlen, &v) || v > UINT32_MAX)
            return false;
        r->attempts = (uint32_t)v;
        return true;
    case T_R_NEXT:
        if (!spool_dec_u64(val, vlen, &v))
            return false;
        r->next_attempt_ms = (int64_t)v;
        return true;
    case T_R_UPDATED:
        if (!spool_dec_u64(val, vlen, &v))
            return false;
        r->updated_ms = (int64_t)v;
        return true;
    default:
        return true;
    }
}

static bool
spool_dec_int(const unsigned char *val, size_t vlen, int *out)
{
    uint64_t v;
    if (!spool_dec_u64(val, vlen, &v) || (int64_t)v < INT32_MIN || (int64_t)v > INT32_MAX)
        return false;
    *out = (int)(int64_t)v;
    return true;
}

static char **
spool_env_str_field(struct spool_envelope *env, unsigned tag)
{
    switch (tag) {
    case T_SENDER:
        return &env->sender;
    case T_ENVID:
        return &env->envid;
    case T_LISTENER:
        return &env->listener;
    case T_LOCAL_IP:
        return &env->local_ip;
    case T_CLIENT_IP:
        return &env->client_ip;
    case T_HELO:
        return &env->client_helo;
    case T_AUTH:
        return &env->auth_user;
    case T_XBIND_IP:
        return &env->xbind_ip;
    case T_XBIND_HOST:
        return &env->xbind_hostname;
    case T_QREASON:
        return &env->quarantine_reason;
    default:
        return NULL;
    }
}

static void
spool_env_defaults(struct spool_envelope *env)
{
    char **req[] = { &env->sender, &env->listener, &env->local_ip, &env->client_ip };
    for (size_t i = 0; i < ARRAY_SIZE(req); i++) {
        if (*req[i] == NULL)
            *req[i] = xstrdup("");
    }
    for (size_t i = 0; i < env->nrcpts; i++) {
        if (env->rcpts[i].addr == NULL)
            env->rcpts[i].addr = xstrdup("");
    }
}

/* Decodes a MSG payload after its qid into env; *content_pos is the
 * content's offset inside the payload. False if malformed (env cleared). */
static bool
spool_dec_msg(const unsigned char *p, size_t len, struct spool_envelope *env,
              size_t *content_pos, uint64_t *content_len)
{
    struct spool_dec d = { p, len, SPOOL_QID_LEN };
    size_t cap = 0;
    bool have_content = false;
    unsigned tag;
    const unsigned char *val;
    size_t vlen;
    int r;
    uint64_t v = 0;
    while ((r = spool_dec_next(&d, &tag, &val, &vlen)) > 0) {
        char **sf = spool_env_str_field(env, tag);
        bool ok = true;
        if (sf != NULL) {
            ok = spool_dec_str(val, vlen, sf);
        } else {
            switch (tag) {
            case T_ARRIVAL:
                ok = spool_dec_u64(val, vlen, &v);
                env->arrival_ms = (int64_t)v;
                break;
            case T_SIZE_PARAM:
                ok = spool_dec_u64(val, vlen, &env->size_param);
                break;
            case T_BODY:
                ok = spool_dec_int(val, vlen, &env->body);
                break;
            case T_RET:
                ok = spool_dec_int(val, vlen, &env->ret);
                break;
            case T_SMTPUTF8:
                ok = spool_dec_u64(val, vlen, &v);
                env->smtputf8 = v != 0;
                break;
            case T_FLAGS:
                ok = spool_dec_u64(val, vlen, &v) && v <= UINT32_MAX;
                env->flags = (uint32_t)v;
                break;
            case T_RCPT: {
                if (env->nrcpts >= SPOOL_RCPTS_MAX) {
                    ok = false;
                    break;
                }
                if (env->nrcpts == cap) {
                    cap = cap ? cap * 2 : 4;
                    env->rcpts = xreallocarray(env->rcpts, cap, sizeof(*env->rcpts));
                }
                struct spool_rcpt *rc = &env->rcpts[env->nrcpts++];
                memset(rc, 0, sizeof(*rc));
                struct spool_dec sub = { val, vlen, 0 };
                unsigned st;
                const unsigned char *sv;
                size_t sl;
                int sr = 0;
                while (ok && (sr = spool_dec_next(&sub, &st, &sv, &sl)) > 0)
                    ok = spool_dec_rcpt_field(rc, st, sv, sl);
                if (ok && sr < 0)
                    ok = false;
                break;
            }
            case T_CONTENT:
                *content_pos = (size_t)(val - p);
                *content_len = vlen;
                have_content = true;
                break;
            default:
                break;
            }
        }
        if (!ok) {
            spool_envelope_clear(env);
            return false;
        }
    }
    if (r < 0 || !have_content) {
        spool_envelope_clear(env);
        return false;
    }
    spool_env_defaults(env);
    env->content_size = *content_len;
    return true;
}

/* ---- index ---- */

static size_t
spool_hash(const struct spool *sp, uint64_t key)
{
    return (size_t)((key * 0x9E3779B97F4A7C15ull) >> 32) & (sp->nbuckets - 1);
}

static struct spool_msg *
spool_lookup(const struct spool *sp, uint64_t key)
{
    for (struct spool_msg *m = sp->buckets[spool_hash(sp, key)]; m != NULL; m = m->next) {
        if (m->key == key)
            return m;
    }
    return NULL;
}

static void
spool_index_grow(struct spool *sp)
{
    size_t old_n = sp->nbuckets;
    struct spool_msg **old = sp->buckets;
    sp->nbuckets = old_n * 2;
    sp->buckets = xcalloc(sp->nbuckets, sizeof(*sp->buckets));
    for (size_t i = 0; i < old_n; i++) {
        struct spool_msg *m = old[i];
        while (m != NULL) {
            struct spool_msg *next = m->next;
            size_t h = spool_hash(sp, m->key);
            m->next = sp->buckets[h];
            sp->buckets[h] = m;
            m = next;
        }
    }
    free(old);
}

static void
spool_index_insert(struct spool *sp, struct spool_msg *m)
{
    if (sp->count >= sp->nbuckets)
        spool_index_grow(sp);
    size_t h = spool_hash(sp, m->key);
    m->next = sp->buckets[h];
    sp->buckets[h] = m;
    sp->count++;
}

static void
spool_index_unlink(struct spool *sp, struct spool_msg *m)
{
    struct spool_msg **pp = &sp->buckets[spool_hash(sp, m->key)];
    while (*pp != m)
        pp = &(*pp)->next;
    *pp = m->next;
    sp->count--;
}

/* ---- segments and references ---- */

static struct spool_seg *
spool_seg_find(const struct spool *sp, uint64_t seq)
{
    size_t lo = 0;
    size_t hi = sp->nsegs;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (sp->segs[mid].seq < seq)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo < sp->nsegs && sp->segs[lo].seq == seq ? &sp->segs[lo] : NULL;
}

static void
spool_seg_add(struct spool *sp, uint64_t seq, int fd, uint64_t size)
{
    sp->segs = xreallocarray(sp->segs, sp->nsegs + 1, sizeof(*sp->segs));
    sp->segs[sp->nsegs++] = (struct spool_seg){ .seq = seq, .fd = fd, .size = size };
}

static void
spool_seg_ref(struct spool *sp, uint64_t seq, int refs, int64_t live)
{
    struct spool_seg *s = spool_seg_find(sp, seq);
    if (s == NULL)
        PANIC("spool: reference to unknown segment %" PRIu64, seq);
    s->refs = (uint64_t)((int64_t)s->refs + refs);
    s->live = (uint64_t)((int64_t)s->live + live);
}

static void
spool_msg_unref(struct spool *sp, struct spool_msg *m)
{
    spool_seg_ref(sp, m->content_seg, -1, -(int64_t)m->rec_len);
    spool_seg_ref(sp, m->state_seg, -1, 0);
}

static void
spool_msg_set_state_seg(struct spool *sp, struct spool_msg *m, uint64_t seq)
{
    spool_seg_ref(sp, m->state_seg, -1, 0);
    m->state_seg = seq;
    spool_seg_ref(sp, seq, 1, 0);
}

/* ---- applying records to the index (recovery and commits) ---- */

/* env is moved into the index. A MSG for a known qid is a compaction
 * snapshot and replaces the message. */
static void
spool_apply_msg(struct spool *sp, uint64_t key, struct spool_envelope *env, uint64_t seq,
                uint64_t content_off, uint64_t rec_len)
{
    struct spool_msg *m = spool_lookup(sp, key);
    if (m != NULL) {
        spool_msg_unref(sp, m);
        spool_envelope_clear(&m->env);
    } else {
        m = xcalloc(1, sizeof(*m));
        m->key = key;
        spool_index_insert(sp, m);
    }
    m->env = *env;
    memset(env, 0, sizeof(*env));
    spool_qid_format(key, m->env.qid);
    m->content_seg = seq;
    m->content_off = content_off;
    m->rec_len = rec_len;
    m->state_seg = seq;
    spool_seg_ref(sp, seq, 1, (int64_t)rec_len);
    spool_seg_ref(sp, seq, 1, 0);
}

/* r's strings are moved (or freed). False if the message or index is unknown. */
static bool
spool_apply_rcpt(struct spool *sp, uint64_t key, size_t idx, struct spool_rcpt *r, uint64_t seq)
{
    struct spool_msg *m = spool_lookup(sp, key);
    if (m == NULL || idx >= m->env.nrcpts) {
        spool_rcpt_clear(r);
        return false;
    }
    struct spool_rcpt *d = &m->env.rcpts[idx];
    d->state = r->state;
    d->attempts = r->attempts;
    d->next_attempt_ms = r->next_attempt_ms;
    d->updated_ms = r->updated_ms;
    free(d->last_reply);
    d->last_reply = r->last_reply;
    r->last_reply = NULL;
    spool_rcpt_clear(r);
    spool_msg_set_state_seg(sp, m, seq);
    return true;
}

static bool
spool_apply_quar(struct spool *sp, uint64_t key, bool set, char **reason, uint64_t seq)
{
    struct spool_msg *m = spool_lookup(sp, key);
    if (m == NULL) {
        free(*reason);
        *reason = NULL;
        return false;
    }
    free(m->env.quarantine_reason);
    m->env.quarantine_reason = NULL;
    if (set) {
        m->env.flags |= SPOOL_F_QUARANTINED;
        m->env.quarantine_reason = *reason;
    } else {
        m->env.flags &= ~SPOOL_F_QUARANTINED;
        free(*reason);
    }
    *reason = NULL;
    spool_msg_set_state_seg(sp, m, seq);
    return true;
}

static bool
spool_apply_done(struct spool *sp, uint64_t key)
{
    struct spool_msg *m = spool_lookup(sp, key);
    if (m == NULL)
        return false;
    spool_msg_unref(sp, m);
    spool_index_unlink(sp, m);
    spool_envelope_clear(&m->env);
    free(m);
    return true;
}

/* ---- recovery ---- */

struct spool_reader {
    int fd;
    uint64_t fsize;
    unsigned char *buf;       /* owned */
    size_t cap;
    uint64_t base;
    size_t have;
};

/* Bytes [off, off+n) of the file (off+n <= fsize), or NULL with *err. */
static const unsigned char *
spool_reader_get(struct spool_reader *rd, uint64_t off, size_t n, int *err)
{
    if (off >= rd->base && off + n <= rd->base + rd->have)
        return rd->buf + (off - rd->base);
    size_t want = n > SPOOL_READ_WINDOW ? n : SPOOL_READ_WINDOW;
    if (want > rd->fsize - off)
        want = (size_t)(rd->fsize - off);
    if (want > rd->cap) {
        free(rd->buf);
        rd->buf = xmalloc(want);
        rd->cap = want;
    }
    rd->base = off;
    rd->have = 0;
    int r = spool_pread_full(rd->fd, rd->buf, want, off);
    if (r < 0) {
        *err = r;
        return NULL;
    }
    rd->have = want;
    return rd->buf;
}

/* Applies one checked record; false if its payload is malformed. */
static bool
spool_replay_record(struct spool *sp, uint64_t seq, uint64_t off, unsigned type,
                    const unsigned char *p, size_t len)
{
    uint64_t key;
    if (len < SPOOL_QID_LEN || !spool_qid_parse((const char *)p, SPOOL_QID_LEN, &key))
        return false;
    if (key > sp->last_qid)
        sp->last_qid = key;
    struct spool_dec d = { p, len, SPOOL_QID_LEN };
    unsigned tag;
    const unsigned char *val;
    size_t vlen;
    int r = 0;
    switch (type) {
    case REC_MSG: {
        struct spool_envelope env = { 0 };
        size_t cpos = 0;
        uint64_t clen = 0;
        if (!spool_dec_msg(p, len, &env, &cpos, &clen))
            return false;
        spool_apply_msg(sp, key, &env, seq, off + SPOOL_HDR_LEN + cpos, SPOOL_HDR_LEN + len);
        return true;
    }
    case REC_RCPT: {
        struct spool_rcpt rc = { 0 };
        uint64_t idx = UINT64_MAX;
        bool ok = true;
        while (ok && (r = spool_dec_next(&d, &tag, &val, &vlen)) > 0) {
            if (tag == T_R_IDX)
                ok = spool_dec_u64(val, vlen, &idx);
            else
                ok = spool_dec_rcpt_field(&rc, tag, val, vlen);
        }
        if (!ok || r < 0 || idx == UINT64_MAX) {
            spool_rcpt_clear(&rc);
            return false;
        }
        spool_apply_rcpt(sp, key, (size_t)idx, &rc, seq);
        return true;
    }
    case REC_QUAR: {
        uint64_t flags = 0;
        char *reason = NULL;
        bool ok = true;
        while (ok && (r = spool_dec_next(&d, &tag, &val, &vlen)) > 0) {
            if (tag == T_FLAGS)
                ok = spool_dec_u64(val, vlen, &flags);
            else if (tag == T_QREASON)
                ok = spool_dec_str(val, vlen, &reason);
        }
        if (!ok || r < 0) {
            free(reason);
            return false;
        }
        spool_apply_quar(sp, key, (flags & SPOOL_F_QUARANTINED) != 0, &reason, seq);
        return true;
    }
    case REC_DONE:
        spool_apply_done(sp, key);
        return true;
    default:
        return false;
    }
}

/* Replays one segment. A bad record at the tail of the last segment is a
 * write torn by a crash: truncated (daemon) or ignored (read-only).
 * Elsewhere it is corruption: logged, the rest of the segment skipped. */
static int
spool_replay_seg(struct spool *sp, size_t si, bool last, char **err)
{
    struct spool_seg *seg = &sp->segs[si];
    uint64_t seq = seg->seq;
    char *path = xasprintf("journal/%016" PRIx64 ".log", seq); /* for messages */
    struct stat st;
    if (fstat(seg->fd, &st) < 0) {
        *err = xasprintf("spool %s: %s: %s", sp->dir, path, strerror(errno));
        free(path);
        return -1;
    }
    struct spool_reader rd = { .fd = seg->fd, .fsize = (uint64_t)st.st_size };
    uint64_t off = 0;
    const char *bad = NULL;
    int ioerr = 0;
    while (off < rd.fsize) {
        if (rd.fsize - off < SPOOL_HDR_LEN) {
            bad = "short record header";
            break;
        }
        const unsigned char *h = spool_reader_get(&rd, off, SPOOL_HDR_LEN, &ioerr);
        if (h == NULL)
            break;
        if (spool_le32(h) != SPOOL_MAGIC) {
            bad = "bad record magic";
            break;
        }
        uint32_t len = spool_le32(h + 8);
        uint32_t crc = spool_le32(h + 12);
        unsigned type = h[4];
        unsigned version = h[5];
        unsigned char hdr[SPOOL_HDR_LEN];
        memcpy(hdr, h, sizeof(hdr));
        if (len > SPOOL_RECORD_MAX) {
            bad = "bad record length";
            break;
        }
        if (rd.fsize - off - SPOOL_HDR_LEN < len) {
            bad = "short record";
            break;
        }
        const unsigned char *p = spool_reader_get(&rd, off + SPOOL_HDR_LEN, len, &ioerr);
        if (p == NULL)
            break;
        if (spool_rec_crc(hdr, p, len) != crc) {
            bad = "bad record checksum";
            break;
        }
        if (version != SPOOL_REC_VERSION || type < REC_MSG || type > REC_DONE) {
            log_msg(LOG_ERR, NULL, "spool %s: %s offset %" PRIu64
                    ": skipped record of unknown type %u version %u", sp->dir, path, off, type,
                    version);
        } else if (!spool_replay_record(sp, seq, off, type, p, len)) {
            log_msg(LOG_ERR, NULL, "spool %s: %s offset %" PRIu64 ": skipped malformed record",
                    sp->dir, path, off);
        }
        off += SPOOL_HDR_LEN + (uint64_t)len;
    }
    if (ioerr < 0) {
        *err = xasprintf("spool %s: cannot read %s: %s", sp->dir, path, strerror(-ioerr));
        free(rd.buf);
        free(path);
        return -1;
    }
    seg->size = off;
    int rc = 0;
    if (bad != NULL && last && !sp->readonly) {
        /* The qid leads the payload: name the message if its bytes made it. */
        char qid[SPOOL_QID_SIZE] = "";
        uint64_t key;
        if (rd.fsize - off >= SPOOL_HDR_LEN + SPOOL_QID_LEN) {
            const unsigned char *q =
                spool_reader_get(&rd, off + SPOOL_HDR_LEN, SPOOL_QID_LEN, &ioerr);
            if (q != NULL && spool_qid_parse((const char *)q, SPOOL_QID_LEN, &key))
                spool_qid_format(key, qid);
        }
        uint64_t dropped = rd.fsize - off;
        if (qid[0] != '\0')
            log_msg(LOG_WARNING, qid, "removed incomplete message (%s at %s offset %" PRIu64
                    ", %" PRIu64 " bytes dropped): not acknowledged before a crash", bad, path, off,
                    dropped);
        else
            log_msg(LOG_WARNING, NULL, "spool %s: removed incomplete record (%s at %s offset %"
                    PRIu64 ", %" PRIu64 " bytes dropped): not acknowledged before a crash",
                    sp->dir, bad, path, off, dropped);
        if (ftruncate(seg->fd, (off_t)off) < 0 || fsync(seg->fd) < 0) {
            *err = xasprintf("spool %s: cannot truncate %s: %s", sp->dir, path, strerror(errno));
            rc = -1;
        }
    } else if (bad != NULL && !last) {
        log_msg(LOG_ERR, NULL, "spool %s: %s offset %" PRIu64 ": %s; skipped the rest of the "
                "segment (%" PRIu64 " bytes): messages recorded there may be lost or come back",
                sp->dir, path, off, bad, rd.fsize - off);
    }
    free(rd.buf);
    free(path);
    return rc;
}

static int
spool_cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a;
    uint64_t y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Sequence numbers of the segment files, sorted. -errno if unreadable. */
static int
spool_list_segs(const char *jdir, uint64_t **out, size_t *n)
{
    *out = NULL;
    *n = 0;
    DIR *d = opendir(jdir);
    if (d == NULL)
        return -errno;
    size_t cap = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        const char *name = de->d_name;
        uint64_t seq;
        if (strlen(name) != 20 || strcmp(name + 16, ".log") != 0 ||
            !spool_qid_parse(name, 16, &seq) || seq == 0)
            continue;
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            *out = xreallocarray(*out, cap, sizeof(**out));
        }
        (*out)[(*n)++] = seq;
    }
    closedir(d);
    if (*n > 0)
        qsort(*out, *n, sizeof(**out), spool_cmp_u64);
    return 0;
}

/* Opens every segment (read-only views re-list until no new one shows up,
 * so a rotation during the scan is not missed), then replays them. */
static int
spool_recover(struct spool *sp, char **err)
{
    for (int pass = 0; pass < 8; pass++) {
        uint64_t *seqs;
        size_t n;
        int r = spool_list_segs(sp->jdir, &seqs, &n);
        if (r == -ENOENT && sp->readonly)
            return 0;
        if (r < 0) {
            *err = xasprintf("spool %s: cannot read %s: %s", sp->dir, sp->jdir, strerror(-r));
            return -1;
        }
        size_t added = 0;
        for (size_t i = 0; i < n; i++) {
            if (sp->nsegs > 0 && seqs[i] <= sp->segs[sp->nsegs - 1].seq)
                continue;
            char *path = spool_seg_path(sp->jdir, seqs[i]);
            int fd = open(path, (sp->readonly ? O_RDONLY : O_RDWR) | O_CLOEXEC);
            if (fd < 0 && errno == ENOENT && sp->readonly) {
                free(path);
                continue; /* deleted by the daemon's GC meanwhile */
            }
            if (fd < 0) {
                *err = xasprintf("spool %s: cannot open %s: %s", sp->dir, path, strerror(errno));
                free(path);
                free(seqs);
                return -1;
            }
            free(path);
            spool_seg_add(sp, seqs[i], fd, 0);
            added++;
        }
        free(seqs);
        if (!sp->readonly || added == 0)
            break;
    }
    for (size_t i = 0; i < sp->nsegs; i++) {
        if (spool_replay_seg(sp, i, i + 1 == sp->nsegs, err) < 0)
            return -1;
    }
    return 0;
}

/* ---- group commit ---- */

static void spool_on_prepare(uv_prepare_t *h);

static bool
spool_has_work(const struct spool *sp)
{
    return sp->pending->nops > 0 || sp->nunlinks > 0 || sp->compact_pos < sp->ncompact;
}

/* The prepare handle holds the loop open only while there is work no job covers. */
static void
spool_update_ref(struct spool *sp)
{
    if (sp->readonly || !sp->prepare_started)
        return;
    if (spool_has_work(sp) && !sp->job_busy)
        uv_ref((uv_handle_t *)&sp->prepare);
    else
        uv_unref((uv_handle_t *)&sp->prepare);
}

static struct spool_op *
spool_op_new(struct spool *sp, uint8_t type, uint64_t key, spool_done_cb *cb, void *arg)
{
    if (sp->readonly)
        PANIC("spool: write to a read-only spool");
    struct spool_batch *b = sp->pending;
    if (b->nops == b->cap) {
        b->cap = b->cap ? b->cap * 2 : 64;
        b->ops = xreallocarray(b->ops, b->cap, sizeof(*b->ops));
    }
    struct spool_op *op = &b->ops[b->nops++];
    memset(op, 0, sizeof(*op));
    op->type = type;
    op->key = key;
    op->cb = cb;
    op->arg = arg;
    spool_update_ref(sp);
    return op;
}

static void
spool_op_fail(struct spool *sp, int status, spool_done_cb *cb, void *arg)
{
    struct spool_op *op = spool_op_new(sp, REC_NONE, 0, cb, arg);
    op->status = status;
}

static void
spool_op_clear(struct spool_op *op)
{
    spool_envelope_clear(&op->env);
    spool_rcpt_clear(&op->rcpt);
    free(op->reason);
    op->reason = NULL;
}

/* The envelope a queued update refers to: the index, else a MSG queued in
 * the pending or in-flight batch (rare: updates normally follow the 250). */
static const struct spool_envelope *
spool_find_env(const struct spool *sp, uint64_t key)
{
    const struct spool_msg *m = spool_lookup(sp, key);
    if (m != NULL)
        return &m->env;
    for (int i = 0; i < 2; i++) {
        const struct spool_batch *b = &sp->batch[i];
        for (size_t k = b->nops; k > 0; k--) {
            if (b->ops[k - 1].type == REC_MSG && b->ops[k - 1].key == key)
                return &b->ops[k - 1].env;
        }
    }
    return NULL;
}

void
spool_submit(struct spool *sp, const struct spool_envelope *env, const struct span *parts,
             size_t nparts, spool_done_cb *cb, void *arg)
{
    uint64_t key;
    if (sp->failed) {
        spool_op_fail(sp, -EIO, cb, arg);
        return;
    }
    if (!spool_qid_key(env->qid, &key)) {
        spool_op_fail(sp, -EINVAL, cb, arg);
        return;
    }
    if (spool_lookup(sp, key) != NULL) {
        spool_op_fail(sp, -EEXIST, cb, arg);
        return;
    }
    uint64_t total = 0;
    for (size_t i = 0; i < nparts; i++)
        total += parts[i].len;
    if (total > SPOOL_RECORD_MAX / 2) {
        spool_op_fail(sp, -EFBIG, cb, arg);
        return;
    }
    struct buf *b = &sp->pending->data;
    size_t at = spool_rec_begin(b, REC_MSG, key);
    spool_enc_envelope(b, env);
    size_t cat = spool_enc_begin(b, T_CONTENT);
    size_t content_pos = b->len - at;
    for (size_t i = 0; i < nparts; i++)
        buf_append(b, parts[i].p, parts[i].len);
    spool_enc_end(b, cat);
    if (b->len - at - SPOOL_HDR_LEN > SPOOL_RECORD_MAX) {
        b->len = at;
        spool_op_fail(sp, -EFBIG, cb, arg);
        return;
    }
    spool_rec_end(b, at);
    struct spool_op *op = spool_op_new(sp, REC_MSG, key, cb, arg);
    op->rec_off = at;
    op->rec_len = b->len - at;
    op->content_pos = content_pos;
    spool_envelope_copy(&op->env, env);
    spool_qid_format(key, op->env.qid);
    op->env.content_size = total;
    sp->pending->nrecords++;
}

void
spool_update_rcpt(struct spool *sp, const char *qid, size_t idx, const struct spool_rcpt *st,
                  spool_done_cb *cb, void *arg)
{
    uint64_t key;
    if (sp->failed) {
        spool_op_fail(sp, -EIO, cb, arg);
        return;
    }
    const struct spool_envelope *env = spool_qid_key(qid, &key) ? spool_find_env(sp, key) : NULL;
    if (env == NULL) {
        spool_op_fail(sp, -ENOENT, cb, arg);
        return;
    }
    if (idx >= env->nrcpts || (unsigned)st->state > SPOOL_RCPT_FAILED) {
        spool_op_fail(sp, -EINVAL, cb, arg);
        return;
    }
    struct buf *b = &sp->pending->data;
    size_t at = spool_rec_begin(b, REC_RCPT, key);
    spool_enc_u64(b, T_R_IDX, idx);
    spool_enc_rcpt_state(b, st);
    spool_rec_end(b, at);
    struct spool_op *op = spool_op_new(sp, REC_RCPT, key, cb, arg);
    op->rec_off = at;
    op->rec_len = b->len - at;
    op->idx = idx;
    op->rcpt.state = st->state;
    op->rcpt.attempts = st->attempts;
    op->rcpt.next_attempt_ms = st->next_attempt_ms;
    op->rcpt.updated_ms = st->updated_ms;
    op->rcpt.last_reply = spool_strdup_or_null(st->last_reply);
    sp->pending->nrecords++;
}

void
spool_set_quarantine(struct spool *sp, const char *qid, const char *reason, spool_done_cb *cb,
                     void *arg)
{
    uint64_t key;
    if (sp->failed) {
        spool_op_fail(sp, -EIO, cb, arg);
        return;
    }
    if (!spool_qid_key(qid, &key) || spool_find_env(sp, key) == NULL) {
        spool_op_fail(sp, -ENOENT, cb, arg);
        return;
    }
    struct buf *b = &sp->pending->data;
    size_t at = spool_rec_begin(b, REC_QUAR, key);
    spool_enc_u64(b, T_FLAGS, reason != NULL ? SPOOL_F_QUARANTINED : 0);
    spool_enc_str(b, T_QREASON, reason);
    spool_rec_end(b, at);
    struct spool_op *op = spool_op_new(sp, REC_QUAR, key, cb, arg);
    op->rec_off = at;
    op->rec_len = b->len - at;
    op->reason = spool_strdup_or_null(reason);
    op->quarantine = reason != NULL;
    sp->pending->nrecords++;
}

void
spool_remove(struct spool *sp, const char *qid, spool_done_cb *cb, void *arg)
{
    uint64_t key;
    if (sp->failed) {
        spool_op_fail(sp, -EIO, cb, arg);
        return;
    }
    if (!spool_qid_key(qid, &key) || spool_find_env(sp, key) == NULL) {
        spool_op_fail(sp, -ENOENT, cb, arg);
        return;
    }
    struct buf *b = &sp->pending->data;
    size_t at = spool_rec_begin(b, REC_DONE, key);
    spool_rec_end(b, at);
    struct spool_op *op = spool_op_new(sp, REC_DONE, key, cb, arg);
    op->rec_off = at;
    op->rec_len = b->len - at;
    sp->pending->nrecords++;
}

/* Decides whether the oldest segment is worth compacting at a rotation and
 * lists its live messages. */
static void
spool_compact_plan(struct spool *sp)
{
    if (sp->compact_pos < sp->ncompact || sp->nsegs == 0)
        return;
    struct spool_seg *old = &sp->segs[0];
    if (old->refs == 0)
        return;
    uint64_t total = 0;
    uint64_t live = 0;
    for (size_t i = 0; i < sp->nsegs; i++) {
        total += sp->segs[i].size;
        live += sp->segs[i].live;
    }
    if (old->live > old->size / 2 && total <= 2 * live)
        return; /* mostly live data in a compact journal: rewriting it buys little */
    free(sp->compact_keys);
    sp->compact_keys = NULL;
    sp->ncompact = 0;
    sp->compact_pos = 0;
    size_t cap = 0;
    for (size_t b = 0; b < sp->nbuckets; b++) {
        for (const struct spool_msg *m = sp->buckets[b]; m != NULL; m = m->next) {
            if (m->content_seg != old->seq)
                continue;
            if (sp->ncompact == cap) {
                cap = cap ? cap * 2 : 16;
                sp->compact_keys = xreallocarray(sp->compact_keys, cap, sizeof(uint64_t));
            }
            sp->compact_keys[sp->ncompact++] = m->key;
        }
    }
    sp->compact_seq = old->seq;
}

/* Adds compaction copies to the job, up to the per-batch budget. */
static void
spool_compact_take(struct spool *sp, struct spool_job *j, uint64_t *off)
{
    uint64_t budget = 0;
    size_t cap = 0;
    struct spool_seg *src = spool_seg_find(sp, sp->compact_seq);
    while (sp->compact_pos < sp->ncompact && (budget < SPOOL_COMPACT_BUDGET || j->ncopies == 0)) {
        uint64_t key = sp->compact_keys[sp->compact_pos++];
        struct spool_msg *m = spool_lookup(sp, key);
        if (m == NULL || src == NULL || m->content_seg != sp->compact_seq)
            continue;
        struct buf pb;
        buf_init(&pb);
        size_t at = spool_rec_begin(&pb, REC_MSG, key);
        spool_enc_envelope(&pb, &m->env);
        unsigned char h[5];
        h[0] = T_CONTENT;
        spool_put_le32(h + 1, (uint32_t)m->env.content_size);
        buf_append(&pb, h, sizeof(h));
        spool_put_le32(spool_buf_at(&pb, at + 8),
                       (uint32_t)(pb.len - SPOOL_HDR_LEN + m->env.content_size));
        if (j->ncopies == cap) {
            cap = cap ? cap * 2 : 8;
            j->copies = xreallocarray(j->copies, cap, sizeof(*j->copies));
        }
        struct spool_copy *c = &j->copies[j->ncopies++];
        c->prefix_len = pb.len;
        c->prefix = buf_steal(&pb, NULL);
        c->src_fd = src->fd;
        c->src_off = m->content_off;
        c->len = m->env.content_size;
        c->key = key;
        c->dst_off = *off;
        *off += c->prefix_len + c->len;
        budget += c->prefix_len + c->len;
    }
    if (sp->compact_pos >= sp->ncompact) {
        free(sp->compact_keys);
        sp->compact_keys = NULL;
        sp->ncompact = 0;
        sp->compact_pos = 0;
        sp->compact_seq = 0;
    }
}

/* Loop thread: hands the pending batch (and due deletions) to the job. */
static void
spool_job_setup(struct spool *sp)
{
    struct spool_job *j = &sp->job;
    memset(j, 0, sizeof(*j));
    j->req.data = sp;
    j->sp = sp;
    j->batch = sp->pending;
    sp->pending = sp->pending == &sp->batch[0] ? &sp->batch[1] : &sp->batch[0];
    j->jdir = sp->jdir;
    j->no_sync = sp->opts.no_sync;
    j->new_fd = -1;
    j->unlinks = sp->unlinks;
    j->nunlinks = sp->nunlinks;
    sp->unlinks = NULL;
    sp->nunlinks = 0;
    sp->job_busy = true;
    if (sp->failed) {
        j->skip_io = true;
        return;
    }
    struct spool_seg *cur = &sp->segs[sp->nsegs - 1];
    bool has_data = j->batch->data.len > 0 || sp->compact_pos < sp->ncompact;
    j->fd = cur->fd;
    j->off = cur->size;
    if (has_data && cur->size >= sp->opts.segment_size) {
        j->new_seq = cur->seq + 1;
        j->new_path = spool_seg_path(sp->jdir, j->new_seq);
        j->fd = -1;
        j->off = 0;
        spool_compact_plan(sp);
    }
    uint64_t off = j->off;
    if (sp->compact_pos < sp->ncompact)
        spool_compact_take(sp, j, &off);
    j->batch_off = off;
    j->end = off + j->batch->data.len;
}

/* Threadpool (or spool_close): touches only the job. */
static void
spool_job_work(struct spool_job *j)
{
    if (j->skip_io)
        return;
    int fd = j->fd;
    if (j->new_path != NULL) {
        fd = open(j->new_path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0) {
            j->status = -errno;
            return;
        }
        j->new_fd = fd;
        if (!j->no_sync && (j->status = spool_fsync_dir(j->jdir)) < 0)
            return;
    }
    uint64_t off = j->off;
    for (size_t i = 0; i < j->ncopies; i++) {
        struct spool_copy *c = &j->copies[i];
        size_t n = c->prefix_len + (size_t)c->len;
        unsigned char *rec = malloc(n);
        if (rec == NULL) {
            j->status = -ENOMEM;
            return;
        }
        memcpy(rec, c->prefix, c->prefix_len);
        j->status = spool_pread_full(c->src_fd, rec + c->prefix_len, (size_t)c->len, c->src_off);
        if (j->status == 0) {
            spool_put_le32(rec + 12, spool_rec_crc(rec, rec + SPOOL_HDR_LEN, n - SPOOL_HDR_LEN));
            j->status = spool_pwrite_full(fd, rec, n, off);
        }
        free(rec);
        if (j->status < 0)
            return;
        off += n;
        j->wrote = true;
    }
    struct buf *b = &j->batch->data;
    if (b->len > 0) {
        unsigned char *p = spool_buf_at(b, 0);
        for (size_t pos = 0; pos + SPOOL_HDR_LEN <= b->len;) {
            uint32_t len = spool_le32(p + pos + 8);
            spool_put_le32(p + pos + 12, spool_rec_crc(p + pos, p + pos + SPOOL_HDR_LEN, len));
            pos += SPOOL_HDR_LEN + (size_t)len;
        }
        if ((j->status = spool_pwrite_full(fd, p, b->len, off)) < 0)
            return;
        j->wrote = true;
    }
    if (j->wrote && !j->no_sync) {
        if (fdatasync(fd) < 0) {
            j->status = -errno;
            return;
        }
        j->synced = true;
    }
    /* Oldest first, each unlink made durable before the next (see header). */
    for (size_t i = 0; i < j->nunlinks; i++) {
        if (unlink(j->unlinks[i]) < 0 && errno != ENOENT) {
            j->unlink_status = -errno;
            break;
        }
        if (!j->no_sync && (j->unlink_status = spool_fsync_dir(j->jdir)) < 0)
            break;
    }
}

static void
spool_job_free(struct spool_job *j)
{
    for (size_t i = 0; i < j->ncopies; i++)
        free(j->copies[i].prefix);
    free(j->copies);
    for (size_t i = 0; i < j->nunlinks; i++)
        free(j->unlinks[i]);
    free(j->unlinks);
    free(j->new_path);
    j->copies = NULL;
    j->unlinks = NULL;
    j->new_path = NULL;
    j->ncopies = 0;
    j->nunlinks = 0;
}

/* Drops unreferenced segments, oldest first, never the current one. The
 * files are unlinked by the next job. */
static void
spool_gc(struct spool *sp)
{
    size_t drop = 0;
    while (drop + 1 < sp->nsegs && sp->segs[drop].refs == 0)
        drop++;
    if (drop == 0)
        return;
    sp->unlinks = xreallocarray(sp->unlinks, sp->nunlinks + drop, sizeof(*sp->unlinks));
    for (size_t i = 0; i < drop; i++) {
        close(sp->segs[i].fd);
        sp->unlinks[sp->nunlinks++] = spool_seg_path(sp->jdir, sp->segs[i].seq);
    }
    memmove(sp->segs, sp->segs + drop, (sp->nsegs - drop) * sizeof(*sp->segs));
    sp->nsegs -= drop;
    sp->stats.segments_deleted += drop;
    sp->stats.segments = sp->nsegs;
}

/* Loop thread: applies a finished job to the index, then fires callbacks. */
static void
spool_job_finish(struct spool *sp, int uv_status)
{
    struct spool_job *j = &sp->job;
    struct spool_batch *b = j->batch;
    int status = j->status < 0 ? j->status : uv_status;
    if (j->skip_io)
        status = -EIO;
    if (status < 0 && !sp->failed) {
        sp->failed = true;
        log_msg(LOG_ERR, NULL, "spool %s: cannot commit to the journal: %s; refusing new "
                "messages until restart", sp->dir, strerror(-status));
    }
    if (status < 0) {
        if (j->new_fd >= 0)
            close(j->new_fd);
        free(sp->compact_keys);
        sp->compact_keys = NULL;
        sp->ncompact = 0;
        sp->compact_pos = 0;
        for (size_t i = 0; i < sp->nunlinks; i++)
            free(sp->unlinks[i]);
        sp->nunlinks = 0;
    } else {
        if (j->new_path != NULL) {
            spool_seg_add(sp, j->new_seq, j->new_fd, 0);
            sp->stats.segments_created++;
        }
        struct spool_seg *cur = &sp->segs[sp->nsegs - 1];
        uint64_t seq = cur->seq;
        for (size_t i = 0; i < j->ncopies; i++) {
            struct spool_copy *c = &j->copies[i];
            struct spool_msg *m = spool_lookup(sp, c->key);
            if (m == NULL)
                PANIC("spool: compacted message vanished");
            spool_msg_unref(sp, m);
            m->content_seg = seq;
            m->content_off = c->dst_off + c->prefix_len;
            m->rec_len = c->prefix_len + c->len;
            m->state_seg = seq;
            spool_seg_ref(sp, seq, 1, (int64_t)m->rec_len);
            spool_seg_ref(sp, seq, 1, 0);
            sp->stats.compacted++;
        }
        for (size_t i = 0; i < b->nops; i++) {
            struct spool_op *op = &b->ops[i];
            uint64_t rec = j->batch_off + op->rec_off;
            switch (op->type) {
            case REC_MSG:
                spool_apply_msg(sp, op->key, &op->env, seq, rec + op->content_pos, op->rec_len);
                break;
            case REC_RCPT:
                spool_apply_rcpt(sp, op->key, op->idx, &op->rcpt, seq);
                break;
            case REC_QUAR:
                spool_apply_quar(sp, op->key, op->quarantine, &op->reason, seq);
                break;
            case REC_DONE:
                spool_apply_done(sp, op->key);
                break;
            default:
                break;
            }
        }
        if (j->wrote) {
            cur->size = j->end;
            sp->stats.commits++;
            sp->stats.records += b->nrecords;
            sp->stats.bytes += j->end - j->off;
        }
        if (j->synced)
            sp->stats.syncs++;
        if (j->unlink_status < 0)
            log_msg(LOG_WARNING, NULL, "spool %s: cannot delete an old segment: %s", sp->dir,
                    strerror(-j->unlink_status));
        spool_gc(sp);
    }
    spool_job_free(j);
    sp->job_busy = false;
    /* Callbacks last: the index is consistent, and what they queue goes
     * into the other batch. */
    for (size_t i = 0; i < b->nops; i++) {
        struct spool_op *op = &b->ops[i];
        int st = op->type == REC_NONE ? op->status : status;
        spool_op_clear(op);
        if (op->cb != NULL)
            op->cb(st, op->arg);
    }
    b->nops = 0;
    b->nrecords = 0;
    buf_clear(&b->data);
    spool_update_ref(sp);
}

static void
spool_on_work(uv_work_t *req)
{
    struct spool *sp = req->data;
    spool_job_work(&sp->job);
}

static void
spool_on_work_done(uv_work_t *req, int status)
{
    struct spool *sp = req->data;
    spool_job_finish(sp, status);
}

/* Valkey's beforeSleep: once per loop iteration, before polling. */
static void
spool_on_prepare(uv_prepare_t *h)
{
    struct spool *sp = h->data;
    if (!sp->job_busy && spool_has_work(sp)) {
        spool_job_setup(sp);
        int r = uv_queue_work(sp->loop, &sp->job.req, spool_on_work, spool_on_work_done);
        if (r < 0)
            PANIC("spool: uv_queue_work: %s", uv_strerror(r));
    }
    spool_update_ref(sp);
}

/* ---- open / close ---- */

static struct spool *
spool_alloc(const char *dir, bool readonly)
{
    pthread_once(&spool_crc_once, spool_crc_init);
    struct spool *sp = xcalloc(1, sizeof(*sp));
    sp->dir = xstrdup(dir);
    sp->jdir = xasprintf("%s/journal", dir);
    sp->readonly = readonly;
    sp->lock_fd = -1;
    sp->opts.segment_size = SPOOL_SEGMENT_SIZE_DEFAULT;
    sp->nbuckets = 64;
    sp->buckets = xcalloc(sp->nbuckets, sizeof(*sp->buckets));
    buf_init(&sp->batch[0].data);
    buf_init(&sp->batch[1].data);
    sp->pending = &sp->batch[0];
    return sp;
}

static void
spool_free(struct spool *sp)
{
    for (size_t b = 0; b < sp->nbuckets; b++) {
        struct spool_msg *m = sp->buckets[b];
        while (m != NULL) {
            struct spool_msg *next = m->next;
            spool_envelope_clear(&m->env);
            free(m);
            m = next;
        }
    }
    free(sp->buckets);
    for (size_t i = 0; i < sp->nsegs; i++)
        close(sp->segs[i].fd);
    free(sp->segs);
    for (int i = 0; i < 2; i++) {
        for (size_t k = 0; k < sp->batch[i].nops; k++)
            spool_op_clear(&sp->batch[i].ops[k]);
        free(sp->batch[i].ops);
        buf_reset(&sp->batch[i].data);
    }
    for (size_t i = 0; i < sp->nunlinks; i++)
        free(sp->unlinks[i]);
    free(sp->unlinks);
    free(sp->compact_keys);
    if (sp->lock_fd >= 0)
        close(sp->lock_fd);
    free(sp->jdir);
    free(sp->dir);
    free(sp);
}

static void
spool_log_summary(const struct spool *sp)
{
    size_t pending = 0;
    size_t deferred = 0;
    for (size_t b = 0; b < sp->nbuckets; b++) {
        for (const struct spool_msg *m = sp->buckets[b]; m != NULL; m = m->next) {
            for (size_t i = 0; i < m->env.nrcpts; i++) {
                pending += m->env.rcpts[i].state == SPOOL_RCPT_PENDING;
                deferred += m->env.rcpts[i].state == SPOOL_RCPT_DEFERRED;
            }
        }
    }
    log_msg(LOG_INFO, NULL, "spool %s: recovered %zu messages, %zu recipients pending, "
            "%zu deferred, %zu segments", sp->dir, sp->count, pending, deferred, sp->nsegs);
}

int
spool_open(struct uv_loop_s *loop, const char *dir, const struct spool_options *opts,
           struct spool **out, char **err)
{
    *out = NULL;
    *err = NULL;
    struct spool *sp = spool_alloc(dir, false);
    sp->loop = loop;
    if (opts != NULL) {
        sp->opts = *opts;
        if (sp->opts.segment_size == 0)
            sp->opts.segment_size = SPOOL_SEGMENT_SIZE_DEFAULT;
    }
    int r = spool_mkdirs(sp->jdir);
    if (r < 0) {
        *err = xasprintf("spool %s: cannot create %s: %s", dir, sp->jdir, strerror(-r));
        goto fail;
    }
    char *lock = xasprintf("%s/lock", dir);
    sp->lock_fd = open(lock, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    free(lock);
    if (sp->lock_fd < 0) {
        *err = xasprintf("spool %s: cannot open lock file: %s", dir, strerror(errno));
        goto fail;
    }
    if (flock(sp->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        if (errno == EWOULDBLOCK)
            *err = xasprintf("spool %s is in use by another petrel", dir);
        else
            *err = xasprintf("spool %s: cannot lock: %s", dir, strerror(errno));
        goto fail;
    }
    if (spool_recover(sp, err) < 0)
        goto fail;
    if (sp->nsegs == 0) {
        char *path = spool_seg_path(sp->jdir, 1);
        int fd = open(path, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd < 0 || (!sp->opts.no_sync && (r = spool_fsync_dir(sp->jdir)) < 0)) {
            *err = xasprintf("spool %s: cannot create %s: %s", dir, path,
                             strerror(fd < 0 ? errno : -r));
            if (fd >= 0)
                close(fd);
            free(path);
            goto fail;
        }
        free(path);
        spool_seg_add(sp, 1, fd, 0);
    }
    /* Segments left unreferenced by an earlier run: delete them now. */
    spool_gc(sp);
    for (size_t i = 0; i < sp->nunlinks; i++) {
        if (unlink(sp->unlinks[i]) < 0 && errno != ENOENT)
            log_msg(LOG_WARNING, NULL, "spool %s: cannot delete %s: %s", dir, sp->unlinks[i],
                    strerror(errno));
        else if (!sp->opts.no_sync)
            (void)spool_fsync_dir(sp->jdir);
        free(sp->unlinks[i]);
    }
    sp->nunlinks = 0;
    sp->stats.segments_deleted = 0;
    sp->stats.segments = sp->nsegs;
    spool_log_summary(sp);

    uv_prepare_init(loop, &sp->prepare);
    sp->prepare.data = sp;
    uv_prepare_start(&sp->prepare, spool_on_prepare);
    uv_unref((uv_handle_t *)&sp->prepare);
    sp->prepare_started = true;
    *out = sp;
    return 0;

fail:
    spool_free(sp);
    return -1;
}

int
spool_open_readonly(const char *dir, struct spool **out, char **err)
{
    *out = NULL;
    *err = NULL;
    struct stat st;
    if (stat(dir, &st) < 0) {
        *err = xasprintf("spool %s: %s", dir, strerror(errno));
        return -1;
    }
    if (!S_ISDIR(st.st_mode)) {
        *err = xasprintf("spool %s: %s", dir, strerror(ENOTDIR));
        return -1;
    }
    struct spool *sp = spool_alloc(dir, true);
    if (spool_recover(sp, err) < 0) {
        spool_free(sp);
        return -1;
    }
    sp->stats.segments = sp->nsegs;
    *out = sp;
    return 0;
}

static void
spool_on_prepare_closed(uv_handle_t *h)
{
    struct spool *sp = h->data;
    sp->prepare_closed = true;
}

void
spool_close(struct spool *sp)
{
    if (sp == NULL)
        return;
    if (!sp->readonly) {
        while (sp->job_busy)
            uv_run(sp->loop, UV_RUN_ONCE);
        while (spool_has_work(sp)) {
            spool_job_setup(sp);
            spool_job_work(&sp->job);
            spool_job_finish(sp, 0);
        }
        uv_close((uv_handle_t *)&sp->prepare, spool_on_prepare_closed);
        while (!sp->prepare_closed)
            uv_run(sp->loop, UV_RUN_NOWAIT);
    }
    spool_free(sp);
}

/* ---- queue ids and index access ---- */

void
spool_new_qid(struct spool *sp, char out[SPOOL_QID_SIZE])
{
    uint64_t us = (uint64_t)now_us() & ((UINT64_C(1) << 52) - 1);
    uint64_t key = us << 12;
    if (key <= sp->last_qid)
        key = sp->last_qid + 1;
    sp->last_qid = key;
    spool_qid_format(key, out);
}

size_t
spool_count(const struct spool *sp)
{
    return sp->count;
}

const struct spool_envelope *
spool_get(const struct spool *sp, const char *qid)
{
    uint64_t key;
    if (!spool_qid_key(qid, &key))
        return NULL;
    const struct spool_msg *m = spool_lookup(sp, key);
    return m != NULL ? &m->env : NULL;
}

static int
spool_cmp_msg(const void *a, const void *b)
{
    const struct spool_msg *x = *(const struct spool_msg *const *)a;
    const struct spool_msg *y = *(const struct spool_msg *const *)b;
    return x->key < y->key ? -1 : x->key > y->key;
}

void
spool_foreach(const struct spool *sp, void (*fn)(const struct spool_envelope *env, void *arg),
              void *arg)
{
    if (sp->count == 0)
        return;
    const struct spool_msg **v = xcalloc(sp->count, sizeof(*v));
    size_t n = 0;
    for (size_t b = 0; b < sp->nbuckets; b++) {
        for (const struct spool_msg *m = sp->buckets[b]; m != NULL; m = m->next)
            v[n++] = m;
    }
    qsort(v, n, sizeof(*v), spool_cmp_msg);
    for (size_t i = 0; i < n; i++)
        fn(&v[i]->env, arg);
    free(v);
}

int
spool_read_content(const struct spool *sp, const char *qid, struct buf *out)
{
    uint64_t key;
    if (!spool_qid_key(qid, &key))
        return -ENOENT;
    const struct spool_msg *m = spool_lookup(sp, key);
    if (m == NULL)
        return -ENOENT;
    const struct spool_seg *seg = spool_seg_find(sp, m->content_seg);
    if (seg == NULL)
        return -EIO;
    size_t n = (size_t)m->env.content_size;
    char *w = buf_reserve(out, n);
    int r = spool_pread_full(seg->fd, w, n, m->content_off);
    if (r < 0)
        return r;
    buf_commit(out, n);
    return 0;
}

void
spool_stats(const struct spool *sp, struct spool_stats *out)
{
    *out = sp->stats;
    out->segments = sp->nsegs;
}
