/* header — see header.h. */
#include "header.h"

#include <string.h>

size_t
header_section_end(struct span c)
{
    if (c.len >= 2 && c.p[0] == '\r' && c.p[1] == '\n')
        return 0;
    const char *e = c.len >= 4 ? memmem(c.p, c.len, "\r\n\r\n", 4) : NULL;
    return e ? (size_t)(e - c.p) + 2 : c.len;
}

struct header_field *
header_parse(struct span c, size_t *n, char **store)
{
    size_t end = header_section_end(c);
    size_t cap = 1;
    for (size_t i = 0; i < end; i++)
        cap += c.p[i] == '\n';
    struct header_field *v = xcalloc(cap, sizeof(*v));
    /* each field gains two NULs and loses at least its colon: 2 per line
     * more than the section covers every case, a last line without CRLF too */
    char *w = xmalloc(end + 2 * cap);
    *store = w;
    size_t count = 0;
    size_t i = 0;
    while (i < end && count < cap) {
        size_t j = i; /* the field ends at a line end not followed by a blank */
        for (;;) {
            const char *nl = memchr(c.p + j, '\n', end - j);
            j = nl ? (size_t)(nl - c.p) + 1 : end;
            if (j >= end || (c.p[j] != ' ' && c.p[j] != '\t'))
                break;
        }
        const char *colon = memchr(c.p + i, ':', j - i);
        if (colon != NULL) {
            size_t nlen = (size_t)(colon - (c.p + i));
            v[count].name = w;
            memcpy(w, c.p + i, nlen);
            w += nlen;
            *w++ = '\0';
            v[count].value = w;
            size_t k = (size_t)(colon - c.p) + 1;
            while (k < j && (c.p[k] == ' ' || c.p[k] == '\t'))
                k++;
            for (; k < j; k++)
                if (c.p[k] != '\r' && c.p[k] != '\n' && c.p[k] != '\0')
                    *w++ = c.p[k];
            *w++ = '\0';
            count++;
        }
        i = j;
    }
    *n = count;
    return v;
}
