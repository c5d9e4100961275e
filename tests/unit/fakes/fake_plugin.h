/* fake_plugin — stands in for core/plugin.c: a plugin set whose handlers
 * the test scripts per hook. plugin_call() copies the args it is given
 * (what the test reads back: rcpt, event_type, queue_id) and completes
 * from a zero timer on the loop, as the real one completes from a later
 * loop iteration; plugin_call_cancel() stops it. A hook without a scripted
 * answer is "no handler": plugins_have() false, the call completes with
 * PLUA_NO_HOOK.
 *
 *   struct plugins *ps = fake_plugins_new(&loop);
 *   fake_plugins_answer(ps, PLUGIN_HOOK_ROUTE, &(struct fake_plugin_answer){
 *                           .status = PLUA_OK, .route = "smtp:[192.0.2.1]:25" });
 *   ... uv_run ...
 *   fake_plugins_calls(ps, PLUGIN_HOOK_ROUTE) == 1
 *   fake_plugins_free(ps);                    // before uv_loop_close()
 */
#ifndef PETREL_FAKE_PLUGIN_H
#define PETREL_FAKE_PLUGIN_H

#include <stdbool.h>
#include <stdint.h>

#include "plugin.h"

struct uv_loop_s;

struct fake_plugin_answer {
    enum plua_status status;
    const char *route;               /* copied into the result */
    const char *source_ip, *source_hostname;
    bool retry_set, bounce;
    uint64_t retry_seconds;
    const char *subject, *text;
};

struct plugins *fake_plugins_new(struct uv_loop_s *loop);
/* Registers a handler for h answering a (copied); NULL removes it. */
void fake_plugins_answer(struct plugins *ps, enum plugin_hook h,
                         const struct fake_plugin_answer *a);
/* Calls started for h (cancelled ones included), and the rcpt / event_type
 * of the last one ("" when NULL). */
unsigned fake_plugins_calls(const struct plugins *ps, enum plugin_hook h);
const char *fake_plugins_last_rcpt(const struct plugins *ps);
const char *fake_plugins_last_event(const struct plugins *ps);
/* Calls started and neither completed nor cancelled. */
unsigned fake_plugins_pending(const struct plugins *ps);
/* Cancels what is pending; run the loop afterwards so timers close. */
void fake_plugins_free(struct plugins *ps);

#endif
