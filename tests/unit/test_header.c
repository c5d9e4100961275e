/*
 * test_header — the header-section parser behind the hook views: where the
 * section ends, unfolding, lines without a colon, a last line without CRLF,
 * NUL bytes, an empty section.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "header.h"

static void
test_header_section_end(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        size_t want;
    } cases[] = {
        { "A: 1\r\n\r\nbody\r\n", 6 },
        { "\r\nbody\r\n", 0 },
        { "A: 1\r\nB: 2\r\n", 12 }, /* no empty line: all of it */
        { "", 0 },
        { "A", 1 },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        size_t got = header_section_end((struct span){ cases[i].in, strlen(cases[i].in) });
        if (got != cases[i].want)
            fail_msg("'%s': got %zu, want %zu", cases[i].in, got, cases[i].want);
    }
}

static void
test_header_parse(void **state)
{
    (void)state;
    static const struct {
        const char *in;
        size_t len; /* 0: strlen */
        const char *want; /* "name=value|" per field */
    } cases[] = {
        { "Subject: hi\r\nTo:  b@c\r\n\r\nX: not a header\r\n", 0, "Subject=hi|To=b@c|" },
        { "Subject: a\r\n long\r\n\tline\r\n\r\n", 0, "Subject=a long\tline|" },
        { "no colon here\r\nA:1\r\n\r\n", 0, "A=1|" },
        { "A: last", 0, "A=last|" },
        { "A: x\0y\r\n\r\n", 10, "A=xy|" },
        { "\r\nA: body\r\n", 0, "" },
        { "A:\r\nB: \r\n\r\n", 0, "A=|B=|" },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        size_t len = cases[i].len ? cases[i].len : strlen(cases[i].in);
        size_t n = 0;
        char *store = NULL;
        struct header_field *v = header_parse((struct span){ cases[i].in, len }, &n, &store);
        char got[256] = "";
        size_t o = 0;
        for (size_t k = 0; k < n && o < sizeof(got); k++) {
            int w = snprintf(got + o, sizeof(got) - o, "%s=%s|", v[k].name, v[k].value);
            assert_true(w > 0);
            o += (size_t)w;
        }
        if (strcmp(got, cases[i].want) != 0)
            fail_msg("case %zu: got '%s', want '%s'", i, got, cases[i].want);
        free(v);
        free(store);
    }
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_header_section_end),
        cmocka_unit_test(test_header_parse),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
