/* fake_conn — stands in for core/conn.c in engine unit tests: records the
 * bytes written, lets the test push input, fire the deadline and finish a
 * close. */
#ifndef PETREL_FAKE_CONN_H
#define PETREL_FAKE_CONN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct conn;

struct conn *fake_conn_new(const char *peer_ip, int peer_port, const char *local_ip);
/* Appends input and delivers CONN_EV_DATA. */
void fake_conn_push(struct conn *c, const char *data, size_t len);
void fake_conn_push_str(struct conn *c, const char *s);
/* Delivers CONN_EV_TIMEOUT / CONN_EV_EOF. */
void fake_conn_fire_timeout(struct conn *c);
void fake_conn_eof(struct conn *c);
/* Bytes flushed so far (NUL-terminated), then cleared. Caller frees. */
char *fake_conn_take_output(struct conn *c);
bool fake_conn_closing(const struct conn *c);
uint64_t fake_conn_timeout(const struct conn *c);
bool fake_conn_reading(const struct conn *c);
/* Delivers CONN_EV_CLOSED if conn_close was called; the conn is freed. */
void fake_conn_finish_close(struct conn *c);
/* Makes conn_peer_sent_data() report pending data. */
void fake_conn_set_peer_sent(struct conn *c, bool v);

#endif
