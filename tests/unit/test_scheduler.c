/*
 * test_scheduler — the scheduler's pure decisions (retry schedule, give-up
 * rules, the retry hook's answer within retry.max_age). Delivery behaviour end to end is covered by the integration tests
 * (tests/integration/test_delivery.py and friends).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "config.h"
#include "scheduler.h"

static struct petrel_config *
t_config(const char *retry)
{
    char yaml[512];
    snprintf(yaml, sizeof(yaml), "listeners: [{address: 127.0.0.1:2525}]\n%s", retry);
    struct petrel_config *c = NULL;
    char *errors = NULL;
    if (config_load_string("t.yaml", yaml, strlen(yaml), &c, &errors) != 0)
        fail_msg("config: %s", errors);
    free(errors);
    return c;
}

#define MIN (60 * 1000LL)
#define HOUR (60 * MIN)

static void
test_sched_retry_follows_schedule_and_repeats_the_last_interval(void **state)
{
    (void)state;
    struct petrel_config *c =
        t_config("retry: { schedule: [15m, 30m, 1h, 4h], max_attempts: 10, max_age: 5d }\n");
    static const struct {
        uint32_t attempts;
        int64_t want_wait;
    } cases[] = {
        { 1, 15 * MIN }, { 2, 30 * MIN }, { 3, 1 * HOUR }, { 4, 4 * HOUR },
        { 5, 4 * HOUR }, { 9, 4 * HOUR },
    };
    int64_t arrival = 1000000, now = arrival + 10;
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct sched_retry r;
        sched_retry_decide(c, cases[i].attempts, arrival, now, &r);
        if (r.give_up || r.next_ms - now != cases[i].want_wait)
            fail_msg("attempt %u: got give_up=%d wait=%lld, want wait=%lld", cases[i].attempts,
                     r.give_up, (long long)(r.next_ms - now), (long long)cases[i].want_wait);
    }
    config_unref(c);
}

static void
test_sched_retry_gives_up_at_max_attempts(void **state)
{
    (void)state;
    struct petrel_config *c = t_config("retry: { schedule: [1s], max_attempts: 3 }\n");
    struct sched_retry r;
    sched_retry_decide(c, 2, 0, 5000, &r);
    assert_false(r.give_up);
    assert_int_equal(r.next_ms, 6000);
    sched_retry_decide(c, 3, 0, 5000, &r);
    assert_true(r.give_up);
    config_unref(c);
}

static void
test_sched_retry_gives_up_after_max_age(void **state)
{
    (void)state;
    struct petrel_config *c =
        t_config("retry: { schedule: [1h], max_attempts: 100, max_age: 1d }\n");
    struct sched_retry r;
    sched_retry_decide(c, 1, 0, 24 * HOUR - 1, &r);
    assert_false(r.give_up);
    sched_retry_decide(c, 1, 0, 24 * HOUR, &r);
    assert_true(r.give_up);
    config_unref(c);
}

/* The retry hook's answer replaces the schedule and max_attempts, never
 * max_age. */
static void
test_sched_retry_hook_answer_within_max_age(void **state)
{
    (void)state;
    struct petrel_config *c =
        t_config("retry: { schedule: [15m], max_attempts: 3, max_age: 1d }\n");
    static const struct {
        const char *label;
        bool set, bounce;
        uint64_t seconds;
        uint32_t attempts;
        int64_t now;          /* arrival is 0 */
        bool want_give_up;
        int64_t want_next;    /* when not giving up */
    } cases[] = {
        {"nil: the schedule", false, false, 0, 1, 1000, false, 1000 + 15 * MIN},
        {"nil: max_attempts", false, false, 0, 3, 1000, true, 0},
        {"seconds", true, false, 300, 1, 1000, false, 1000 + 300 * 1000},
        {"seconds beyond max_attempts", true, false, 60, 7, 1000, false, 1000 + 60 * 1000},
        {"zero seconds", true, false, 0, 1, 5000, false, 5000},
        {"bounce", true, true, 0, 1, 1000, true, 0},
        {"capped at arrival + max_age", true, false, 86400, 1, 12 * HOUR, false, 24 * HOUR},
        {"huge delay capped", true, false, UINT64_MAX / 2, 1, HOUR, false, 24 * HOUR},
        {"past max_age: bounce anyway", true, false, 60, 1, 24 * HOUR, true, 0},
        {"nil past max_age", false, false, 0, 1, 24 * HOUR + 1, true, 0},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct sched_retry_hook h = { cases[i].set, cases[i].bounce, cases[i].seconds };
        struct sched_retry r;
        sched_retry_decide_hook(c, cases[i].attempts, 0, cases[i].now, &h, &r);
        if (r.give_up != cases[i].want_give_up
            || (!r.give_up && r.next_ms != cases[i].want_next))
            fail_msg("%s: got give_up=%d next=%lld, want give_up=%d next=%lld", cases[i].label,
                     r.give_up, (long long)r.next_ms, cases[i].want_give_up,
                     (long long)cases[i].want_next);
    }
    /* no hook at all is the schedule */
    struct sched_retry a, b;
    sched_retry_decide_hook(c, 2, 0, 1000, NULL, &a);
    sched_retry_decide(c, 2, 0, 1000, &b);
    assert_true(a.give_up == b.give_up && a.next_ms == b.next_ms);
    config_unref(c);
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sched_retry_follows_schedule_and_repeats_the_last_interval),
        cmocka_unit_test(test_sched_retry_gives_up_at_max_attempts),
        cmocka_unit_test(test_sched_retry_gives_up_after_max_age),
        cmocka_unit_test(test_sched_retry_hook_answer_within_max_age),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
