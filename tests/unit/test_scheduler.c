/*
 * test_scheduler — the scheduler's pure decisions (retry schedule, give-up
 * rules). Delivery behaviour end to end is covered by the integration tests
 * (tests/integration/test_delivery.py and friends).
 */
#include <setjmp.h>
#include <stdarg.h>
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

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sched_retry_follows_schedule_and_repeats_the_last_interval),
        cmocka_unit_test(test_sched_retry_gives_up_at_max_attempts),
        cmocka_unit_test(test_sched_retry_gives_up_after_max_age),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
