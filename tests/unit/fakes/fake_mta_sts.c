/* fake_mta_sts — mta_sts.h for tests/unit/test_smtp_client.c: the
 * client's tests run without MTA-STS (opts.mta_sts_domain NULL), so a
 * lookup is never started; the pure helpers behave as mta_sts.c's. */
#include "mta_sts.h"

#include <string.h>

#include "util.h"

struct mta_sts_lookup *
mta_sts_lookup_start(struct uv_loop_s *loop, struct dns *dns, const char *domain,
                     uint64_t timeout_ms, mta_sts_lookup_cb *cb, void *arg)
{
    (void)loop;
    (void)dns;
    (void)timeout_ms;
    (void)cb;
    (void)arg;
    PANIC("fake_mta_sts: no MTA-STS lookup expected (%s)", domain);
}

void
mta_sts_lookup_cancel(struct mta_sts_lookup *l)
{
    if (l != NULL)
        PANIC("fake_mta_sts: no MTA-STS lookup expected");
}

const char *
mta_sts_mode_name(enum mta_sts_mode mode)
{
    return mode == MTA_STS_MODE_ENFORCE ? "enforce"
           : mode == MTA_STS_MODE_TESTING ? "testing"
                                          : "none";
}

bool
mta_sts_policy_match(const struct mta_sts_policy *p, const char *host)
{
    for (size_t i = 0; i < p->nmx; i++) {
        if (ascii_casecmp(p->mx[i], host) == 0)
            return true;
    }
    return false;
}
