/*
 * fake_hooks — stands in for core/hooks.c in the smtp_server unit tests.
 * By default nothing hooks a session (hook_session_new returns NULL). A test
 * that calls fake_hooks_plan() gets hooked sessions: every stage waits until
 * the test calls fake_hooks_complete(), then answers the first planned
 * verdict whose point and subject match (else CONTINUE); at end of message
 * the planned content and envelope changes are handed over.
 */
#ifndef PETREL_FAKE_HOOKS_H
#define PETREL_FAKE_HOOKS_H

#include <stdbool.h>
#include <stddef.h>

#include "hooks.h"

struct fake_hook_plan {
    enum plugin_hook point; /* CONNECT, HELO, MAIL_FROM, RCPT_TO, DATA (end of message) */
    const char *subject;    /* helo name, sender or recipient to match; NULL: any */
    enum verdict_kind kind;
    int code;               /* REJECT/TEMPFAIL */
    const char *esc;
    const char *text;       /* reply text; QUARANTINE: the reason */
};

/* Hooks every session started from now on with plan (borrowed, must
 * outlive the sessions); eom_content (NULL: unchanged) replaces the message
 * and mods (NULL: none) are the envelope changes at end of message. */
void fake_hooks_plan(const struct fake_hook_plan *plan, size_t n, const char *eom_content,
                     const struct milter_mods *mods);
/* Back to "nothing hooks a session". */
void fake_hooks_reset(void);
/* Answers the pending stage; false if none was pending. */
bool fake_hooks_complete(void);
/* Whether a stage waits for fake_hooks_complete(). */
bool fake_hooks_pending(void);
/* Stages started so far, as "connect helo mail rcpt:<addr> eom …". */
const char *fake_hooks_trace(void);

#endif
