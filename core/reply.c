/*
 * reply — the fixed reply table and enhanced-code validation.
 */
#include "reply.h"

#include <stdlib.h>
#include <string.h>

#define REPLY_X(name, c, e, t) const struct reply name = { (c), (e), (t) };
#include "replies.def"
#undef REPLY_X

static bool
reply_number(const char **p, int max_digits, long max)
{
    const char *s = *p;
    int n = 0;
    long v = 0;
    while (*s >= '0' && *s <= '9') {
        if (++n > max_digits)
            return false;
        v = v * 10 + (*s - '0');
        s++;
    }
    if (n == 0 || v > max)
        return false;
    *p = s;
    return true;
}

bool
reply_check(int code, const char *esc)
{
    if (code < 200 || code > 599 || esc == NULL)
        return false;
    int cls = code / 100;
    if (cls == 3)
        return esc[0] == '\0'; /* intermediate replies carry none */
    if (esc[0] != '0' + cls || (cls != 2 && cls != 4 && cls != 5) || esc[1] != '.')
        return false;
    const char *p = esc + 2;
    if (!reply_number(&p, 3, 999) || *p++ != '.')
        return false;
    if (!reply_number(&p, 3, 999) || *p != '\0')
        return false;
    return true;
}
