/*
 * fuzz_milter — arbitrary bytes as a filter's replies: the first input byte
 * splits the input into a reply stream and a message. The stream is cut
 * into packets (milter_frame_parse) and each is decoded (milter_optneg_decode
 * for 'O', milter_reply_decode otherwise); SMFIR_REPLYCODE text goes
 * through verdict_set_raw, whose result must pass verdict_check; header,
 * body and envelope requests become modifications applied to the message
 * with milter_apply_mods. Invariants: frames stay inside the input, no mods
 * means identical bytes, applying never crashes or leaks.
 *
 * Only the pure functions run, so the conn and timer edges milter.c links
 * against are stubbed here (they abort if ever called).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "buf.h"
#include "conn.h"
#include "milter.h"
#include "timer.h"
#include "util.h"
#include "verdict.h"

#define FUZZ_MODS_MAX 64

/* ---- edge stubs: never called by the pure functions ---------------------- */

struct buf *
conn_input(struct conn *c)
{
    (void)c;
    abort();
}

void
conn_set_input_limit(struct conn *c, size_t n)
{
    (void)c;
    (void)n;
    abort();
}

void
conn_write(struct conn *c, const void *p, size_t n)
{
    (void)c;
    (void)p;
    (void)n;
    abort();
}

void
conn_flush(struct conn *c)
{
    (void)c;
    abort();
}

size_t
conn_pending_output(const struct conn *c)
{
    (void)c;
    abort();
}

void
conn_set_timeout(struct conn *c, uint64_t ms)
{
    (void)c;
    (void)ms;
    abort();
}

void
conn_close(struct conn *c)
{
    (void)c;
    abort();
}

int
conn_connect_tcp(struct uv_loop_s *loop, const struct sockaddr *dst, const struct sockaddr *src,
                 conn_event_cb *cb, void *arg, struct conn **out)
{
    (void)loop;
    (void)dst;
    (void)src;
    (void)cb;
    (void)arg;
    (void)out;
    abort();
}

int
conn_connect_unix(struct uv_loop_s *loop, const char *path, conn_event_cb *cb, void *arg,
                  struct conn **out)
{
    (void)loop;
    (void)path;
    (void)cb;
    (void)arg;
    (void)out;
    abort();
}

const char *
conn_strerror(int status)
{
    (void)status;
    abort();
}

struct timer *
timer_new(struct uv_loop_s *loop, timer_cb *cb, void *arg)
{
    (void)loop;
    (void)cb;
    (void)arg;
    abort();
}

void
timer_arm(struct timer *t, uint64_t delay_ms)
{
    (void)t;
    (void)delay_ms;
    abort();
}

void
timer_free(struct timer *t)
{
    (void)t;
    abort();
}

/* ---- the target ---------------------------------------------------------- */

static void
fuzz_mod_add(struct milter_mods *m, enum milter_mod_kind kind, uint32_t index,
             const struct milter_reply *r)
{
    if (m->n == FUZZ_MODS_MAX)
        return;
    if (m->n == m->cap) {
        m->cap = m->cap ? m->cap * 2 : 8;
        m->v = xreallocarray(m->v, m->cap, sizeof(*m->v));
    }
    struct milter_mod *mod = &m->v[m->n++];
    memset(mod, 0, sizeof(*mod));
    mod->kind = kind;
    mod->filter = "fuzz";
    mod->index = index;
    if (kind <= MILTER_MOD_DELETE_HEADER)
        mod->name = xstrndup(r->name.p, r->name.len);
    struct span v = kind == MILTER_MOD_REPLACE_BODY    ? r->data
                    : kind <= MILTER_MOD_DELETE_HEADER ? r->value
                                                       : r->name;
    mod->value = xmalloc(v.len + 1);
    if (v.len > 0)
        memcpy(mod->value, v.p, v.len);
    mod->value[v.len] = '\0';
    mod->value_len = v.len;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 1)
        return 0;
    size_t split = size > 1 ? data[0] % size : 1;
    if (split == 0)
        split = 1;
    struct span stream = {(const char *)data + 1, split - 1};
    struct span msg = {(const char *)data + split, size - split};

    struct milter_mods mods = {0};
    while (stream.len > 0) {
        char cmd;
        struct span payload;
        size_t used;
        enum milter_frame fr = milter_frame_parse(stream, 4096, &cmd, &payload, &used);
        if (fr != MILTER_FRAME_OK)
            break;
        if (used > stream.len || payload.p < stream.p || payload.p + payload.len > stream.p + used)
            abort();
        if (cmd == 'O') {
            struct milter_optneg o;
            (void)milter_optneg_decode(payload, &o);
        } else {
            struct milter_reply r;
            if (milter_reply_decode(cmd, payload, &r) == NULL) {
                switch (cmd) {
                case 'y': {
                    struct verdict v = VERDICT_INIT;
                    if (verdict_set_raw(&v, r.data.p, r.data.len) == NULL &&
                        verdict_check(&v) != NULL)
                        abort();
                    char line[256];
                    verdict_format(&v, line, sizeof(line));
                    verdict_clear(&v);
                    break;
                }
                case 'h':
                    fuzz_mod_add(&mods, MILTER_MOD_ADD_HEADER, 0, &r);
                    break;
                case 'i':
                    fuzz_mod_add(&mods, MILTER_MOD_INSERT_HEADER, r.index, &r);
                    break;
                case 'm':
                    fuzz_mod_add(&mods,
                                 r.value.len == 0 ? MILTER_MOD_DELETE_HEADER
                                                  : MILTER_MOD_CHANGE_HEADER,
                                 r.index, &r);
                    break;
                case 'b':
                    fuzz_mod_add(&mods, MILTER_MOD_REPLACE_BODY, 0, &r);
                    break;
                case '+':
                case '2':
                    fuzz_mod_add(&mods, MILTER_MOD_ADD_RCPT, 0, &r);
                    break;
                case 'q':
                    fuzz_mod_add(&mods, MILTER_MOD_QUARANTINE, 0, &r);
                    break;
                default:
                    break;
                }
            }
        }
        stream.p += used;
        stream.len -= used;
    }

    struct buf out;
    buf_init(&out);
    struct milter_mods none = {0};
    milter_apply_mods(&none, msg, &out);
    if (out.len != msg.len || (msg.len > 0 && memcmp(buf_ptr(&out), msg.p, msg.len) != 0))
        abort();
    buf_clear(&out);
    milter_apply_mods(&mods, msg, &out);
    buf_reset(&out);
    milter_mods_reset(&mods);
    return 0;
}
