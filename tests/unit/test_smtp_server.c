/*
 * test_smtp_server — transcript tests of the server session FSM over
 * fake_conn and fake_spool: { client input, exact server bytes }.
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
#include "conn.h"
#include "fakes/fake_conn.h"
#include "fakes/fake_hooks.h"
#include "fakes/fake_spool.h"
#include "reply.h"
#include "smtp_server.h"
#include "spool.h"
#include "util.h"

static const char t_base_config[] =
    "hostname: mx.petrel.test\n"
    "spool: /nonexistent\n"
    "log: { level: error }\n"
    "listeners:\n"
    "  - name: mx\n"
    "    address: 127.0.0.1:2525\n"
    "    max_message_size: 2K\n"
    "    max_recipients: 3\n"
    "    max_line_length: 512\n"
    "    max_errors: 8\n"
    "    max_received_headers: 10\n"
    "relay:\n"
    "  clients: [192.0.2.0/24]\n"
    "  domains: [local.test]\n";

struct t_env {
    struct petrel_config *cfg;
    struct spool *sp;
    struct smtpd_server *srv;
    struct conn *c;
    int ended;
};

static void
t_on_end(void *arg)
{
    struct t_env *e = arg;
    e->ended++;
}

static void
t_expect(struct t_env *e, const char *want)
{
    char *got = fake_conn_take_output(e->c);
    if (strcmp(got, want) != 0)
        fail_msg("server output:\ngot:  \"%s\"\nwant: \"%s\"", got, want);
    free(got);
}

/* Takes the output and checks it starts with prefix. */
static void
t_expect_prefix(struct t_env *e, const char *prefix)
{
    char *got = fake_conn_take_output(e->c);
    if (strncmp(got, prefix, strlen(prefix)) != 0)
        fail_msg("server output:\ngot:  \"%s\"\nwant prefix: \"%s\"", got, prefix);
    free(got);
}

static void
t_start_with(struct t_env *e, const char *yaml, const char *peer_ip)
{
    memset(e, 0, sizeof(*e));
    char *errors = NULL;
    if (config_load_string("test.yaml", yaml, strlen(yaml), &e->cfg, &errors) != 0)
        fail_msg("config: %s", errors);
    free(errors);
    e->sp = fake_spool_new();
    e->srv = smtpd_server_new(e->cfg, e->sp);
    e->c = fake_conn_new(peer_ip, 40000, "127.0.0.1");
    smtpd_session_start(e->srv, &e->cfg->listeners[0], e->c, NULL, t_on_end, e);
}

static void
t_start(struct t_env *e, const char *peer_ip)
{
    t_start_with(e, t_base_config, peer_ip);
    t_expect(e, "220 mx.petrel.test ESMTP petrel\r\n");
}

static void
t_finish(struct t_env *e)
{
    if (!fake_conn_closing(e->c)) {
        fake_conn_push_str(e->c, "QUIT\r\n");
        t_expect(e, "221 2.0.0 Bye\r\n");
    }
    assert_true(fake_conn_closing(e->c));
    fake_conn_finish_close(e->c);
    assert_int_equal(e->ended, 1);
    smtpd_server_free(e->srv);
    fake_spool_free(e->sp);
    config_unref(e->cfg);
}

/* EHLO reply for a relay client (192.0.2.0/24): XBIND is offered */
static const char t_ehlo_reply[] = "250-mx.petrel.test\r\n"
                                   "250-PIPELINING\r\n"
                                   "250-SIZE 2048\r\n"
                                   "250-8BITMIME\r\n"
                                   "250-ENHANCEDSTATUSCODES\r\n"
                                   "250-SMTPUTF8\r\n"
                                   "250-CHUNKING\r\n"
                                   "250-XBIND\r\n"
                                   "250 DSN\r\n";

/* ... and for anyone else: no XBIND */
static const char t_ehlo_reply_foreign[] = "250-mx.petrel.test\r\n"
                                           "250-PIPELINING\r\n"
                                           "250-SIZE 2048\r\n"
                                           "250-8BITMIME\r\n"
                                           "250-ENHANCEDSTATUSCODES\r\n"
                                           "250-SMTPUTF8\r\n"
                                           "250-CHUNKING\r\n"
                                           "250 DSN\r\n";

static void
t_ehlo(struct t_env *e)
{
    fake_conn_push_str(e->c, "EHLO client.example\r\n");
    t_expect(e, t_ehlo_reply);
}

static void
t_ehlo_foreign(struct t_env *e)
{
    fake_conn_push_str(e->c, "EHLO client.example\r\n");
    t_expect(e, t_ehlo_reply_foreign);
}

static void
test_smtp_server_full_transaction_is_queued_after_commit(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<alice@example.com> BODY=8BITMIME\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n");
    fake_conn_push_str(e.c, "RCPT TO:<bob@example.org> NOTIFY=SUCCESS,FAILURE "
                            "ORCPT=rfc822;bob+2B1@example.org\r\n");
    t_expect(&e, "250 2.1.5 Ok\r\n");
    fake_conn_push_str(e.c, "DATA\r\n");
    t_expect(&e, "354 End data with <CR><LF>.<CR><LF>\r\n");
    fake_conn_push_str(e.c, "Subject: hi\r\n\r\n..dot line\r\nbody\r\n.\r\n");
    /* persist, then reply: nothing before the spool commits */
    t_expect(&e, "");
    assert_int_equal(fake_spool_count(e.sp), 1);
    assert_int_equal(fake_spool_complete(e.sp, 0), 1);
    t_expect(&e, "250 2.0.0 Ok: queued as 0000000000000001\r\n");

    const struct fake_spool_msg *m = fake_spool_msg(e.sp, 0);
    assert_string_equal(m->sender, "alice@example.com");
    assert_int_equal(m->nrcpts, 1);
    assert_string_equal(m->rcpts[0], "bob@example.org");
    assert_string_equal(m->orcpt0, "rfc822;bob+1@example.org");
    assert_int_equal(m->notify0, 2 | 4);
    const char *want_start = "Received: from client.example ([192.0.2.7])\r\n"
                             "\tby mx.petrel.test (petrel) with ESMTP id 0000000000000001\r\n"
                             "\tfor <bob@example.org>; ";
    assert_memory_equal(m->content, want_start, strlen(want_start));
    const char *body = strstr(m->content, "\r\n\r\n") ? strstr(m->content, "Subject:") : NULL;
    assert_non_null(body);
    assert_string_equal(body, "Subject: hi\r\n\r\n.dot line\r\nbody\r\n");
    t_finish(&e);
}

static void
test_smtp_server_pipelined_commands_reply_in_one_flush(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                            "RCPT TO:<c@example.org>\r\nDATA\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                 "354 End data with <CR><LF>.<CR><LF>\r\n");
    /* the next transaction is pipelined behind the end of data: it must
     * wait for the commit of the first one */
    fake_conn_push_str(e.c, "x\r\n.\r\nRSET\r\nNOOP\r\n");
    t_expect(&e, "");
    fake_spool_complete(e.sp, 0);
    t_expect(&e, "250 2.0.0 Ok: queued as 0000000000000001\r\n250 2.0.0 Ok\r\n250 2.0.0 Ok\r\n");
    const struct fake_spool_msg *m = fake_spool_msg(e.sp, 0);
    assert_int_equal(m->nrcpts, 2);
    /* two recipients: no "for" clause */
    assert_non_null(strstr(m->content, "with ESMTP id 0000000000000001; "));
    t_finish(&e);
}

static void
test_smtp_server_sequence_errors_get_503(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\n");
    t_expect(&e, "503 5.5.1 Error: send HELO/EHLO first\r\n");
    fake_conn_push_str(e.c, "HELO client.example\r\n");
    t_expect(&e, "250 mx.petrel.test\r\n");
    fake_conn_push_str(e.c, "RCPT TO:<b@example.org>\r\n");
    t_expect(&e, "503 5.5.1 Error: need MAIL command\r\n");
    fake_conn_push_str(e.c, "DATA\r\n");
    t_expect(&e, "503 5.5.1 Error: need MAIL command\r\n");
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n");
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\n");
    t_expect(&e, "503 5.5.1 Error: nested MAIL command\r\n");
    fake_conn_push_str(e.c, "DATA\r\n");
    t_expect(&e, "503 5.5.1 Error: need RCPT command\r\n");
    t_finish(&e);
}

static void
test_smtp_server_unknown_and_syntax_replies(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    fake_conn_push_str(e.c, "FOO bar\r\n");
    t_expect(&e, "500 5.5.2 Error: command not recognized\r\n");
    fake_conn_push_str(e.c, "EHLO\r\n");
    t_expect_prefix(&e, "501 5.5.4 ");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL TO:<a@example.com>\r\n");
    t_expect_prefix(&e, "501 5.5.4 ");
    fake_conn_push_str(e.c, "VRFY bob\r\n");
    t_expect_prefix(&e, "252 2.5.0 ");
    fake_conn_push_str(e.c, "HELP\r\n");
    t_expect_prefix(&e, "214 2.0.0 ");
    fake_conn_push_str(e.c, "NOOP\r\n");
    t_expect(&e, "250 2.0.0 Ok\r\n");
    t_finish(&e);
}

static void
test_smtp_server_relay_denied_for_foreign_client(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "198.51.100.9");
    t_ehlo_foreign(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n");
    fake_conn_push_str(e.c, "RCPT TO:<b@example.org>\r\n");
    t_expect(&e, "554 5.7.1 Relay access denied\r\n");
    fake_conn_push_str(e.c, "RCPT TO:<b@local.test>\r\n");
    t_expect(&e, "250 2.1.5 Ok\r\n");
    fake_conn_push_str(e.c, "RCPT TO:<Postmaster>\r\n");
    t_expect(&e, "250 2.1.5 Ok\r\n");
    t_finish(&e);
}

static void
test_smtp_server_too_many_recipients_452(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<1@x.org>\r\n"
                            "RCPT TO:<2@x.org>\r\nRCPT TO:<3@x.org>\r\nRCPT TO:<4@x.org>\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                 "452 4.5.3 Error: too many recipients\r\n");
    t_finish(&e);
}

static void
test_smtp_server_bare_lf_is_not_end_of_data(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
    t_expect_prefix(&e, "250 2.1.0 Ok\r\n");
    fake_conn_push_str(e.c, "Subject: x\r\n\r\nhello\n.\nMAIL FROM:<evil@example.com>\r\n"
                            "RCPT TO:<victim@example.org>\r\nDATA\r\nsmuggled\r\n");
    t_expect(&e, ""); /* still in DATA */
    fake_conn_push_str(e.c, ".\r\n");
    t_expect(&e, "554 5.6.0 Error: bare CR or LF in message content is not allowed "
                 "(RFC 5321 2.3.8)\r\n");
    assert_int_equal(fake_spool_count(e.sp), 0);
    /* bare CR too */
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                            "a\r.\rb\r\n.\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
                 "554 5.6.0 Error: bare CR or LF in message content is not allowed "
                 "(RFC 5321 2.3.8)\r\n");
    assert_int_equal(fake_spool_count(e.sp), 0);
    t_finish(&e);
}

static void
test_smtp_server_size_limits(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com> SIZE=4096\r\n");
    t_expect(&e, "552 5.3.4 Error: message size exceeds fixed limit\r\n");
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n");
    t_expect_prefix(&e, "250 2.1.0 Ok\r\n");
    char line[82];
    memset(line, 'x', 80);
    memcpy(line + 80, "\r\n", 2);
    for (int i = 0; i < 40; i++)
        fake_conn_push(e.c, line, sizeof(line));
    fake_conn_push_str(e.c, ".\r\n");
    t_expect(&e, "552 5.3.4 Error: message size exceeds fixed limit\r\n");
    assert_int_equal(fake_spool_count(e.sp), 0);
    t_finish(&e);
}

static void
test_smtp_server_bdat_chunks(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                            "BDAT 10\r\nSubject: x");
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: 10 octets received\r\n");
    fake_conn_push_str(e.c, "DATA\r\n");
    t_expect(&e, "503 5.5.1 Error: BDAT and DATA may not be mixed\r\n");
    fake_conn_push_str(e.c, "BDAT 10 LAST\r\n\r\n\r\nbody\r\n");
    t_expect(&e, "");
    fake_spool_complete(e.sp, 0);
    t_expect(&e, "250 2.0.0 Ok: queued as 0000000000000001\r\n");
    const struct fake_spool_msg *m = fake_spool_msg(e.sp, 0);
    const char *body = strstr(m->content, "Subject:");
    assert_non_null(body);
    assert_string_equal(body, "Subject: x\r\n\r\nbody\r\n");
    /* BDAT without a transaction: the chunk is read and discarded */
    fake_conn_push_str(e.c, "BDAT 5 LAST\r\nabcdeNOOP\r\n");
    t_expect(&e, "503 5.5.1 Error: need MAIL command\r\n250 2.0.0 Ok\r\n");
    t_finish(&e);
}

static void
test_smtp_server_line_too_long_then_continues(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    char big[700];
    memset(big, 'A', sizeof(big));
    memcpy(big, "NOOP ", 5);
    fake_conn_push(e.c, big, sizeof(big));
    fake_conn_push_str(e.c, "\r\nNOOP\r\n");
    t_expect(&e, "500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n");
    t_finish(&e);
}

static void
test_smtp_server_line_too_long_in_one_write_keeps_next_command(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    /* the CRLF of the long line lies past the limit, in the same read as
     * the next command */
    char big[800];
    memset(big, 'A', sizeof(big));
    memcpy(big, "NOOP ", 5);
    memcpy(big + sizeof(big) - 8, "\r\nNOOP\r\n", 8);
    fake_conn_push(e.c, big, sizeof(big));
    t_expect(&e, "500 5.5.2 Error: line too long\r\n250 2.0.0 Ok\r\n");
    t_finish(&e);
}

static void
test_smtp_server_too_many_errors_421(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    fake_conn_push_str(e.c, "A\r\nB\r\nC\r\nD\r\nE\r\nF\r\nG\r\nH\r\nI\r\n");
    t_expect(&e, "500 5.5.2 Error: command not recognized\r\n"
                 "500 5.5.2 Error: command not recognized\r\n"
                 "500 5.5.2 Error: command not recognized\r\n"
                 "500 5.5.2 Error: command not recognized\r\n"
                 "500 5.5.2 Error: command not recognized\r\n"
                 "500 5.5.2 Error: command not recognized\r\n"
                 "500 5.5.2 Error: command not recognized\r\n"
                 "500 5.5.2 Error: command not recognized\r\n"
                 "421 4.7.0 Error: too many errors, closing connection\r\n");
    assert_true(fake_conn_closing(e.c));
    t_finish(&e);
}

static void
test_smtp_server_hop_limit(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
                            "Received: a\r\nReceived: b\r\nreceived: c\r\nReceived: d\r\n"
                            "Received: e\r\nReceived: f\r\nReceived: g\r\nReceived: h\r\n"
                            "Received: i\r\nReceived: j\r\n\r\nx\r\n.\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
                 "554 5.4.6 Error: too many hops (mail loop?)\r\n");
    t_finish(&e);
}

static void
test_smtp_server_early_talker_is_refused(void **state)
{
    (void)state;
    struct t_env e;
    /* the base config with one more listener key after max_errors */
    char yaml[1024];
    const char *at = strstr(t_base_config, "    max_errors: 8\n");
    assert_non_null(at);
    size_t head = (size_t)(at - t_base_config) + strlen("    max_errors: 8\n");
    snprintf(yaml, sizeof(yaml), "%.*s    greet_delay: 1s\n%s", (int)head, t_base_config,
             t_base_config + head);
    t_start_with(&e, yaml, "192.0.2.7");
    t_expect(&e, ""); /* no banner yet */
    assert_int_equal(fake_conn_timeout(e.c), 1000);
    fake_conn_push_str(e.c, "EHLO early\r\n");
    t_expect(&e, "554 5.5.1 Error: SMTP protocol synchronization (data sent before greeting)\r\n");
    assert_true(fake_conn_closing(e.c));
    t_finish(&e);

    /* a patient client gets the banner when the delay ends */
    t_start_with(&e, yaml, "192.0.2.7");
    fake_conn_fire_timeout(e.c);
    t_expect(&e, "220 mx.petrel.test ESMTP petrel\r\n");
    t_finish(&e);
}

static void
test_smtp_server_timeout_421(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    fake_conn_fire_timeout(e.c);
    t_expect(&e, "421 4.4.2 Error: timeout exceeded, closing connection\r\n");
    assert_true(fake_conn_closing(e.c));
    t_finish(&e);
}

static void
test_smtp_server_spool_failure_451_and_session_continues(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\n");
    t_expect_prefix(&e, "250 2.1.0 Ok\r\n");
    fake_spool_complete(e.sp, -5);
    t_expect(&e, "451 4.3.0 Error: queue file write error, try again later\r\n");
    fake_conn_push_str(e.c, "NOOP\r\n");
    t_expect(&e, "250 2.0.0 Ok\r\n");
    t_finish(&e);
}

static void
test_smtp_server_disconnect_during_commit_frees_after_callback(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<a@x.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\n");
    t_expect_prefix(&e, "250 2.1.0 Ok\r\n");
    fake_conn_eof(e.c);
    assert_true(fake_conn_closing(e.c));
    fake_conn_finish_close(e.c);
    assert_int_equal(e.ended, 0); /* the commit still holds the session */
    fake_spool_complete(e.sp, 0);
    assert_int_equal(e.ended, 1);
    smtpd_server_free(e.srv);
    fake_spool_free(e.sp);
    config_unref(e.cfg);
}

static void
test_smtp_server_shutdown_lets_transaction_finish(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e);
    fake_conn_push_str(e.c, "MAIL FROM:<a@x.org>\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n");
    smtpd_server_shutdown(e.srv);
    assert_false(fake_conn_closing(e.c));
    fake_conn_push_str(e.c, "RCPT TO:<b@example.org>\r\nDATA\r\nx\r\n.\r\n");
    t_expect_prefix(&e, "250 2.1.5 Ok\r\n");
    fake_spool_complete(e.sp, 0);
    t_expect(&e, "250 2.0.0 Ok: queued as 0000000000000001\r\n"
                 "421 4.3.2 Service shutting down, closing connection\r\n");
    assert_true(fake_conn_closing(e.c));
    t_finish(&e);
}

/* ---- XBIND ----------------------------------------------------------- */

/* A source pool (every 127.0.0.x is local, as config requires): 127.0.0.5
 * has a name of its own, 127.0.0.2 gets delivery.hostname. */
static const char t_pool_yaml[] = "delivery:\n"
                                  "  hostname: out.petrel.test\n"
                                  "  source_ips: [127.0.0.2, 127.0.0.5]\n"
                                  "  hostnames: { 127.0.0.5: mta.test.com }\n";

/* Starts a session on the base config plus extra YAML (may be "") and
 * greets with EHLO; the EHLO reply is checked by the caller's choice. */
static void
t_start_xbind(struct t_env *e, const char *extra, const char *peer_ip)
{
    char yaml[2048];
    int n = snprintf(yaml, sizeof(yaml), "%s%s", t_base_config, extra);
    assert_true(n > 0 && (size_t)n < sizeof(yaml));
    t_start_with(e, yaml, peer_ip);
    t_expect(e, "220 mx.petrel.test ESMTP petrel\r\n");
    fake_conn_push_str(e->c, "EHLO client.example\r\n");
    t_expect_prefix(e, "250-mx.petrel.test\r\n");
}

/* Sends one whole transaction with content (ending in CRLF), commits it and
 * returns what the spool recorded. mail_params may be "". */
static const struct fake_spool_msg *
t_send(struct t_env *e, const char *mail_params, const char *content)
{
    size_t before = fake_spool_count(e->sp);
    char cmds[512];
    snprintf(cmds, sizeof(cmds), "MAIL FROM:<a@example.com>%s\r\nRCPT TO:<b@example.org>\r\n"
                                 "DATA\r\n", mail_params);
    fake_conn_push_str(e->c, cmds);
    t_expect(e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
    fake_conn_push_str(e->c, content);
    fake_conn_push_str(e->c, ".\r\n");
    t_expect(e, "");
    if (fake_spool_count(e->sp) != before + 1)
        fail_msg("spooled messages: got %zu, want %zu", fake_spool_count(e->sp), before + 1);
    assert_int_equal(fake_spool_complete(e->sp, 0), 1);
    t_expect_prefix(e, "250 2.0.0 Ok: queued as ");
    return fake_spool_msg(e->sp, before);
}

/* The stored content after petrel's own Received header field. */
static const char *
t_after_received(const struct fake_spool_msg *m)
{
    const char *p = m->content;
    assert_memory_equal(p, "Received:", 9);
    for (;;) {
        const char *eol = strstr(p, "\r\n");
        assert_non_null(eol);
        p = eol + 2;
        if (*p != ' ' && *p != '\t')
            return p;
    }
}

static void
t_want_bind(const struct fake_spool_msg *m, const char *ip, const char *hostname)
{
    const char *got_ip = m->xbind_ip ? m->xbind_ip : "(none)";
    const char *got_host = m->xbind_hostname ? m->xbind_hostname : "(none)";
    if (strcmp(got_ip, ip ? ip : "(none)") != 0
        || strcmp(got_host, hostname ? hostname : "(none)") != 0)
        fail_msg("stored override: got %s as %s, want %s as %s", got_ip, got_host,
                 ip ? ip : "(none)", hostname ? hostname : "(none)");
}

static void
test_smtp_server_xbind_advertised_only_to_allowed_clients(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    t_ehlo(&e); /* relay client: 250-XBIND */
    t_finish(&e);
    t_start(&e, "198.51.100.9");
    t_ehlo_foreign(&e);
    t_finish(&e);
}

struct t_xbind_case {
    const char *label;
    const char *extra_yaml;
    const char *peer;
    const char *before;      /* commands sent first (replies not checked) */
    const char *cmd;
    const char *want;
};

static const struct t_xbind_case t_xbind_cases[] = {
    { "ip from the pool with its hostnames entry", t_pool_yaml, "192.0.2.7", "",
      "XBIND 127.0.0.5\r\n", "250 2.0.0 Bound to 127.0.0.5 as mta.test.com\r\n" },
    { "ip from the pool, delivery.hostname", t_pool_yaml, "192.0.2.7", "",
      "XBIND 127.0.0.2\r\n", "250 2.0.0 Bound to 127.0.0.2 as out.petrel.test\r\n" },
    { "explicit hostname wins", t_pool_yaml, "192.0.2.7", "",
      "xbind 127.0.0.5 relay.example.net\r\n",
      "250 2.0.0 Bound to 127.0.0.5 as relay.example.net\r\n" },
    { "no pool: any local address, top-level hostname", "", "192.0.2.7", "",
      "XBIND 127.0.0.9\r\n", "250 2.0.0 Bound to 127.0.0.9 as mx.petrel.test\r\n" },
    { "reset", t_pool_yaml, "192.0.2.7", "", "XBIND RESET\r\n", "250 2.0.0 XBIND reset\r\n" },
    { "reset, any case", t_pool_yaml, "192.0.2.7", "XBIND 127.0.0.5\r\n", "XBIND reset\r\n",
      "250 2.0.0 XBIND reset\r\n" },
    { "not in the pool", t_pool_yaml, "192.0.2.7", "", "XBIND 127.0.0.3\r\n",
      "550 5.7.1 127.0.0.3: not in the configured source pool\r\n" },
    { "ipv6 normalized in the reply", t_pool_yaml, "192.0.2.7", "",
      "XBIND 2001:DB8:0::0001\r\n", "550 5.7.1 2001:db8::1: not in the configured source pool\r\n" },
    { "no pool: not a local address", "", "192.0.2.7", "", "XBIND 192.0.2.254\r\n",
      "550 5.7.1 192.0.2.254: not a local address\r\n" },
    { "client not allowed", t_pool_yaml, "198.51.100.9", "", "XBIND 127.0.0.5\r\n",
      "550 5.7.1 XBIND not permitted for this client\r\n" },
    { "reset from a client not allowed", t_pool_yaml, "198.51.100.9", "", "XBIND RESET\r\n",
      "550 5.7.1 XBIND not permitted for this client\r\n" },
    { "no argument", t_pool_yaml, "192.0.2.7", "", "XBIND\r\n",
      "501 5.5.4 Syntax: XBIND ip [hostname] or XBIND RESET\r\n" },
    { "bad ip", t_pool_yaml, "192.0.2.7", "", "XBIND 127.0.0.256\r\n",
      "501 5.5.4 Syntax: XBIND ip [hostname] or XBIND RESET\r\n" },
    { "hostname, not an address", t_pool_yaml, "192.0.2.7", "", "XBIND mta.test.com\r\n",
      "501 5.5.4 Syntax: XBIND ip [hostname] or XBIND RESET\r\n" },
    { "bad hostname", t_pool_yaml, "192.0.2.7", "", "XBIND 127.0.0.5 bad!host\r\n",
      "501 5.5.4 Syntax: XBIND ip [hostname] or XBIND RESET\r\n" },
    { "extra argument", t_pool_yaml, "192.0.2.7", "", "XBIND 127.0.0.5 a.test b.test\r\n",
      "501 5.5.4 Syntax: XBIND ip [hostname] or XBIND RESET\r\n" },
    { "reset with an argument", t_pool_yaml, "192.0.2.7", "", "XBIND RESET now\r\n",
      "501 5.5.4 Syntax: XBIND ip [hostname] or XBIND RESET\r\n" },
    { "after HELO", t_pool_yaml, "192.0.2.7", "HELO client.example\r\n", "XBIND 127.0.0.5\r\n",
      "503 5.5.1 Error: send EHLO first\r\n" },
    { "inside a transaction", t_pool_yaml, "192.0.2.7", "MAIL FROM:<a@example.com>\r\n",
      "XBIND 127.0.0.5\r\n",
      "503 5.5.1 Error: XBIND is not allowed inside a mail transaction\r\n" },
    { "inside a transaction with recipients", t_pool_yaml, "192.0.2.7",
      "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n", "XBIND RESET\r\n",
      "503 5.5.1 Error: XBIND is not allowed inside a mail transaction\r\n" },
    { "after RSET of a transaction", t_pool_yaml, "192.0.2.7",
      "MAIL FROM:<a@example.com>\r\nRSET\r\n", "XBIND 127.0.0.5\r\n",
      "250 2.0.0 Bound to 127.0.0.5 as mta.test.com\r\n" },
};

static void
test_smtp_server_xbind_command_replies(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(t_xbind_cases) / sizeof(t_xbind_cases[0]); i++) {
        const struct t_xbind_case *tc = &t_xbind_cases[i];
        struct t_env e;
        t_start_xbind(&e, tc->extra_yaml, tc->peer);
        fake_conn_push_str(e.c, tc->before);
        free(fake_conn_take_output(e.c));
        fake_conn_push_str(e.c, tc->cmd);
        char *got = fake_conn_take_output(e.c);
        if (strcmp(got, tc->want) != 0)
            fail_msg("%s: got \"%s\", want \"%s\"", tc->label, got, tc->want);
        free(got);
        t_finish(&e);
    }
}

static void
test_smtp_server_xbind_before_ehlo_is_503(void **state)
{
    (void)state;
    struct t_env e;
    t_start(&e, "192.0.2.7");
    fake_conn_push_str(e.c, "XBIND 127.0.0.5\r\n");
    t_expect(&e, "503 5.5.1 Error: send EHLO first\r\n");
    t_finish(&e);
}

static void
test_smtp_server_xbind_command_is_stored_and_lasts_the_session(void **state)
{
    (void)state;
    struct t_env e;
    t_start_xbind(&e, t_pool_yaml, "192.0.2.7");
    fake_conn_push_str(e.c, "XBIND 127.0.0.5\r\n");
    t_expect(&e, "250 2.0.0 Bound to 127.0.0.5 as mta.test.com\r\n");
    t_want_bind(t_send(&e, "", "Subject: one\r\n\r\nx\r\n"), "127.0.0.5", "mta.test.com");
    /* RSET ends a transaction, not the binding */
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\nRSET\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n");
    t_want_bind(t_send(&e, "", "Subject: two\r\n\r\nx\r\n"), "127.0.0.5", "mta.test.com");
    /* a refused XBIND leaves the binding as it was */
    fake_conn_push_str(e.c, "XBIND 127.0.0.3\r\n");
    t_expect(&e, "550 5.7.1 127.0.0.3: not in the configured source pool\r\n");
    t_want_bind(t_send(&e, "", "Subject: three\r\n\r\nx\r\n"), "127.0.0.5", "mta.test.com");
    /* XBIND RESET clears it */
    fake_conn_push_str(e.c, "XBIND RESET\r\n");
    t_expect(&e, "250 2.0.0 XBIND reset\r\n");
    t_want_bind(t_send(&e, "", "Subject: four\r\n\r\nx\r\n"), NULL, NULL);
    /* so does a new EHLO (a new session in RFC 5321 terms) */
    fake_conn_push_str(e.c, "XBIND 127.0.0.2 relay.example.net\r\n");
    t_expect(&e, "250 2.0.0 Bound to 127.0.0.2 as relay.example.net\r\n");
    t_want_bind(t_send(&e, "", "Subject: five\r\n\r\nx\r\n"), "127.0.0.2", "relay.example.net");
    t_ehlo(&e);
    t_want_bind(t_send(&e, "", "Subject: six\r\n\r\nx\r\n"), NULL, NULL);
    t_finish(&e);
}

static void
test_smtp_server_xbind_mail_parameter_is_for_one_transaction(void **state)
{
    (void)state;
    struct t_env e;
    t_start_xbind(&e, t_pool_yaml, "192.0.2.7");
    t_want_bind(t_send(&e, " XBIND=127.0.0.5", "Subject: one\r\n\r\nx\r\n"), "127.0.0.5",
                "mta.test.com");
    t_want_bind(t_send(&e, "", "Subject: two\r\n\r\nx\r\n"), NULL, NULL);
    t_want_bind(t_send(&e, " BODY=8BITMIME XBIND=127.0.0.2,relay.example.net",
                       "Subject: three\r\n\r\nx\r\n"),
                "127.0.0.2", "relay.example.net");
    /* RSET drops a parameter with its transaction */
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com> XBIND=127.0.0.5\r\nRSET\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.0.0 Ok\r\n");
    t_want_bind(t_send(&e, "", "Subject: four\r\n\r\nx\r\n"), NULL, NULL);
    /* refused at MAIL: nothing is started */
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com> XBIND=127.0.0.3\r\n");
    t_expect(&e, "550 5.7.1 127.0.0.3: not in the configured source pool\r\n");
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com> XBIND=127.0.0.3,\r\n");
    t_expect(&e, "555 5.5.4 Bad XBIND parameter\r\n");
    fake_conn_push_str(e.c, "RCPT TO:<b@example.org>\r\n");
    t_expect(&e, "503 5.5.1 Error: need MAIL command\r\n");
    t_finish(&e);
}

static void
test_smtp_server_xbind_mail_parameter_refused_for_foreign_client(void **state)
{
    (void)state;
    struct t_env e;
    t_start_xbind(&e, t_pool_yaml, "198.51.100.9");
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com> XBIND=127.0.0.5\r\n");
    t_expect(&e, "550 5.7.1 XBIND not permitted for this client\r\n");
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n");
    t_finish(&e);
}

static void
test_smtp_server_xbind_precedence_parameter_command_header(void **state)
{
    (void)state;
    struct t_env e;
    t_start_xbind(&e, t_pool_yaml, "192.0.2.7");
    const char *with_header = "X-Petrel-Bind: 127.0.0.2 header.example.net\r\n"
                              "Subject: p\r\n\r\nx\r\n";
    /* header alone */
    const struct fake_spool_msg *m = t_send(&e, "", with_header);
    t_want_bind(m, "127.0.0.2", "header.example.net");
    assert_string_equal(t_after_received(m), "Subject: p\r\n\r\nx\r\n");
    /* command beats header */
    fake_conn_push_str(e.c, "XBIND 127.0.0.5 command.example.net\r\n");
    t_expect_prefix(&e, "250 2.0.0 Bound to 127.0.0.5 as command.example.net\r\n");
    m = t_send(&e, "", with_header);
    t_want_bind(m, "127.0.0.5", "command.example.net");
    assert_string_equal(t_after_received(m), "Subject: p\r\n\r\nx\r\n");
    /* parameter beats command and header */
    m = t_send(&e, " XBIND=127.0.0.2,param.example.net", with_header);
    t_want_bind(m, "127.0.0.2", "param.example.net");
    assert_string_equal(t_after_received(m), "Subject: p\r\n\r\nx\r\n");
    /* and the command is still there for the next transaction */
    t_want_bind(t_send(&e, "", "Subject: q\r\n\r\nx\r\n"), "127.0.0.5", "command.example.net");
    t_finish(&e);
}

struct t_header_case {
    const char *label;
    const char *content;     /* as sent (no dot-stuffing needed) */
    const char *want_stored; /* after the Received header */
    const char *want_ip;     /* NULL: no override */
    const char *want_hostname;
};

static const struct t_header_case t_header_cases[] = {
    { "applied, default hostname", "From: a@example.com\r\nX-Petrel-Bind: 127.0.0.5\r\n\r\nbody\r\n",
      "From: a@example.com\r\n\r\nbody\r\n", "127.0.0.5", "mta.test.com" },
    { "any case, space before the colon",
      "x-petrel-BIND : 127.0.0.2  relay.example.net \r\nSubject: s\r\n\r\nbody\r\n",
      "Subject: s\r\n\r\nbody\r\n", "127.0.0.2", "relay.example.net" },
    { "folded value", "Subject: s\r\nX-Petrel-Bind:\r\n 127.0.0.5\r\n\tfolded.example.net\r\n"
      "To: b@example.org\r\n\r\nbody\r\n",
      "Subject: s\r\nTo: b@example.org\r\n\r\nbody\r\n", "127.0.0.5", "folded.example.net" },
    { "every occurrence removed, the first applies",
      "X-Petrel-Bind: 127.0.0.2\r\nSubject: s\r\nX-Petrel-Bind: 127.0.0.5\r\n\r\nbody\r\n",
      "Subject: s\r\n\r\nbody\r\n", "127.0.0.2", "out.petrel.test" },
    { "in the body it stays", "Subject: s\r\n\r\nX-Petrel-Bind: 127.0.0.5\r\n",
      "Subject: s\r\n\r\nX-Petrel-Bind: 127.0.0.5\r\n", NULL, NULL },
    { "other names stay", "X-Petrel-Binding: 127.0.0.5\r\nX-Petrel-Bind-X: 1\r\n\r\nb\r\n",
      "X-Petrel-Binding: 127.0.0.5\r\nX-Petrel-Bind-X: 1\r\n\r\nb\r\n", NULL, NULL },
    { "headers only, no body", "Subject: s\r\nX-Petrel-Bind: 127.0.0.5\r\n", "Subject: s\r\n",
      "127.0.0.5", "mta.test.com" },
    { "bad value ignored, still removed", "X-Petrel-Bind: mta.test.com\r\nSubject: s\r\n\r\nb\r\n",
      "Subject: s\r\n\r\nb\r\n", NULL, NULL },
    { "empty value ignored", "X-Petrel-Bind:\r\nSubject: s\r\n\r\nb\r\n",
      "Subject: s\r\n\r\nb\r\n", NULL, NULL },
    { "RESET in a header ignored", "X-Petrel-Bind: RESET\r\nSubject: s\r\n\r\nb\r\n",
      "Subject: s\r\n\r\nb\r\n", NULL, NULL },
    { "not in the pool ignored", "X-Petrel-Bind: 127.0.0.3\r\nSubject: s\r\n\r\nb\r\n",
      "Subject: s\r\n\r\nb\r\n", NULL, NULL },
    { "bad first one: the later one is not used",
      "X-Petrel-Bind: 127.0.0.3\r\nX-Petrel-Bind: 127.0.0.5\r\n\r\nb\r\n", "\r\nb\r\n", NULL,
      NULL },
};

static void
test_smtp_server_xbind_header_is_removed_and_applied(void **state)
{
    (void)state;
    for (size_t i = 0; i < sizeof(t_header_cases) / sizeof(t_header_cases[0]); i++) {
        const struct t_header_case *tc = &t_header_cases[i];
        struct t_env e;
        t_start_xbind(&e, t_pool_yaml, "192.0.2.7");
        const struct fake_spool_msg *m = t_send(&e, "", tc->content);
        const char *got = t_after_received(m);
        if (strcmp(got, tc->want_stored) != 0)
            fail_msg("%s: stored content: got \"%s\", want \"%s\"", tc->label, got,
                     tc->want_stored);
        if (m->content_len != (size_t)(got - m->content) + strlen(tc->want_stored))
            fail_msg("%s: content_len: got %zu", tc->label, m->content_len);
        const char *got_ip = m->xbind_ip ? m->xbind_ip : "(none)";
        const char *want_ip = tc->want_ip ? tc->want_ip : "(none)";
        const char *got_host = m->xbind_hostname ? m->xbind_hostname : "(none)";
        const char *want_host = tc->want_hostname ? tc->want_hostname : "(none)";
        if (strcmp(got_ip, want_ip) != 0 || strcmp(got_host, want_host) != 0)
            fail_msg("%s: override: got %s as %s, want %s as %s", tc->label, got_ip, got_host,
                     want_ip, want_host);
        t_finish(&e);
    }
}

static void
test_smtp_server_xbind_header_from_foreign_client_is_removed_and_ignored(void **state)
{
    (void)state;
    struct t_env e;
    t_start_xbind(&e, t_pool_yaml, "198.51.100.9");
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n"
                            "X-Petrel-Bind: 127.0.0.5\r\nSubject: s\r\n\r\nb\r\n.\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
    assert_int_equal(fake_spool_complete(e.sp, 0), 1);
    t_expect_prefix(&e, "250 2.0.0 Ok: queued as ");
    const struct fake_spool_msg *m = fake_spool_msg(e.sp, 0);
    assert_string_equal(t_after_received(m), "Subject: s\r\n\r\nb\r\n");
    t_want_bind(m, NULL, NULL);
    t_finish(&e);
}

static void
test_smtp_server_xbind_header_with_bdat(void **state)
{
    (void)state;
    struct t_env e;
    t_start_xbind(&e, t_pool_yaml, "192.0.2.7");
    /* the field is split across two chunks */
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.org>\r\n"
                            "BDAT 20\r\nSubject: s\r\nX-Petrel");
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.0.0 Ok: 20 octets received\r\n");
    fake_conn_push_str(e.c, "BDAT 23 LAST\r\n-Bind: 127.0.0.5\r\n\r\nb\r\n");
    t_expect(&e, "");
    assert_int_equal(fake_spool_complete(e.sp, 0), 1);
    t_expect_prefix(&e, "250 2.0.0 Ok: queued as ");
    const struct fake_spool_msg *m = fake_spool_msg(e.sp, 0);
    assert_string_equal(t_after_received(m), "Subject: s\r\n\r\nb\r\n");
    t_want_bind(m, "127.0.0.5", "mta.test.com");
    t_finish(&e);
}

/* ---- TLS ---------------------------------------------------------------- */

/* base config with listeners[0].tls set to tls, and a certificate (the fake
 * tls_server_new "loads" anything but a path holding "unloadable") */
static char *
t_tls_yaml(const char *tls, const char *cert)
{
    return xasprintf("hostname: mx.petrel.test\n"
                     "spool: /nonexistent\n"
                     "log: { level: error }\n"
                     "listeners:\n"
                     "  - name: mx\n"
                     "    address: 127.0.0.1:2525\n"
                     "    tls: %s\n"
                     "    max_message_size: 2K\n"
                     "relay:\n"
                     "  clients: [192.0.2.0/24]\n"
                     "  domains: [local.test]\n"
                     "tls: { cert: %s, key: /etc/petrel/key.pem }\n",
                     tls, cert);
}

static void
t_start_tls_listener(struct t_env *e, const char *tls, const char *cert)
{
    char *yaml = t_tls_yaml(tls, cert);
    t_start_with(e, yaml, "203.0.113.9");
    free(yaml);
}

static const char t_ehlo_reply_starttls[] = "250-mx.petrel.test\r\n"
                                            "250-PIPELINING\r\n"
                                            "250-SIZE 2048\r\n"
                                            "250-8BITMIME\r\n"
                                            "250-ENHANCEDSTATUSCODES\r\n"
                                            "250-SMTPUTF8\r\n"
                                            "250-CHUNKING\r\n"
                                            "250-STARTTLS\r\n"
                                            "250 DSN\r\n";

/* One transaction to b@local.test; returns the stored message. */
static const struct fake_spool_msg *
t_queue_one(struct t_env *e, size_t index)
{
    fake_conn_push_str(e->c, "MAIL FROM:<a@example.com>\r\nRCPT TO:<b@local.test>\r\nDATA\r\n"
                             "Subject: s\r\n\r\nb\r\n.\r\n");
    t_expect(e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
    assert_int_equal(fake_spool_complete(e->sp, index), 1);
    t_expect_prefix(e, "250 2.0.0 Ok: queued as ");
    return fake_spool_msg(e->sp, index);
}

static void
test_smtp_server_starttls_drops_injected_commands_and_restarts(void **state)
{
    (void)state;
    struct t_env e;
    t_start_tls_listener(&e, "starttls", "/etc/petrel/cert.pem");
    t_expect(&e, "220 mx.petrel.test ESMTP petrel\r\n");
    fake_conn_push_str(e.c, "EHLO client.example\r\n");
    t_expect(&e, t_ehlo_reply_starttls);
    /* CVE-2011-0411: a command pipelined behind STARTTLS must not run,
     * neither now nor once TLS is up */
    fake_conn_push_str(e.c, "STARTTLS\r\nMAIL FROM:<evil@example.com>\r\n");
    t_expect(&e, "220 2.0.0 Ready to start TLS\r\n");
    assert_true(fake_conn_tls_started(e.c));
    assert_true(fake_conn_tls_server(e.c));
    if (conn_input(e.c)->len != 0)
        fail_msg("input after STARTTLS: got %zu bytes, want 0 (discarded)",
                 conn_input(e.c)->len);
    fake_conn_complete_tls(e.c, 0, NULL, NULL);
    t_expect(&e, "");
    /* RFC 3207 4.2: the session starts over, EHLO first */
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com>\r\n");
    t_expect(&e, "503 5.5.1 Error: send HELO/EHLO first\r\n");
    fake_conn_push_str(e.c, "EHLO client.example\r\n");
    t_expect(&e, t_ehlo_reply_foreign); /* no STARTTLS any more */
    fake_conn_push_str(e.c, "STARTTLS\r\n");
    t_expect(&e, "503 5.5.1 Error: TLS already active\r\n");
    const struct fake_spool_msg *m = t_queue_one(&e, 0);
    assert_string_equal(m->sender, "a@example.com");
    const char *want = "Received: from client.example ([203.0.113.9])\r\n"
                       "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))\r\n"
                       "\tby mx.petrel.test (petrel) with ESMTPS id ";
    if (strncmp(m->content, want, strlen(want)) != 0)
        fail_msg("Received header:\ngot:  \"%.200s\"\nwant: \"%s…\"", m->content, want);
    assert_int_equal(fake_spool_count(e.sp), 1); /* the evil MAIL never made a message */
    t_finish(&e);
}

static void
test_smtp_server_starttls_sequence_and_syntax_replies(void **state)
{
    (void)state;
    static const struct {
        const char *label;
        const char *before; /* commands sent first (their replies are not checked) */
        const char *cmd;
        const char *want;
    } cases[] = {
        { "before EHLO", "", "STARTTLS\r\n", "503 5.5.1 Error: send EHLO first\r\n" },
        { "after HELO", "HELO c.example\r\n", "STARTTLS\r\n",
          "503 5.5.1 Error: send EHLO first\r\n" },
        { "with an argument", "EHLO c.example\r\n", "STARTTLS now\r\n",
          "501 5.5.4 Syntax error: no arguments allowed\r\n" },
        { "inside a transaction", "EHLO c.example\r\nMAIL FROM:<a@example.com>\r\n",
          "STARTTLS\r\n", "503 5.5.1 Error: MAIL transaction in progress\r\n" },
    };
    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        struct t_env e;
        t_start_tls_listener(&e, "starttls", "/etc/petrel/cert.pem");
        t_expect(&e, "220 mx.petrel.test ESMTP petrel\r\n");
        if (cases[i].before[0]) {
            fake_conn_push_str(e.c, cases[i].before);
            free(fake_conn_take_output(e.c));
        }
        fake_conn_push_str(e.c, cases[i].cmd);
        char *got = fake_conn_take_output(e.c);
        if (strcmp(got, cases[i].want) != 0)
            fail_msg("%s: got \"%s\", want \"%s\"", cases[i].label, got, cases[i].want);
        free(got);
        assert_false(fake_conn_tls_started(e.c));
        t_finish(&e);
    }
    /* a listener without tls: starttls does not know the command */
    struct t_env e;
    t_start(&e, "203.0.113.9");
    t_ehlo_foreign(&e);
    fake_conn_push_str(e.c, "STARTTLS\r\n");
    t_expect(&e, "502 5.5.1 Error: command not implemented\r\n");
    assert_false(fake_conn_tls_started(e.c));
    t_finish(&e);
}

static void
test_smtp_server_starttls_handshake_failure_closes_silently(void **state)
{
    (void)state;
    struct t_env e;
    t_start_tls_listener(&e, "starttls", "/etc/petrel/cert.pem");
    t_expect(&e, "220 mx.petrel.test ESMTP petrel\r\n");
    fake_conn_push_str(e.c, "EHLO client.example\r\nSTARTTLS\r\n");
    char *want = xasprintf("%s220 2.0.0 Ready to start TLS\r\n", t_ehlo_reply_starttls);
    t_expect(&e, want);
    free(want);
    fake_conn_complete_tls(e.c, -71, NULL, "no shared cipher");
    t_expect(&e, "");
    assert_true(fake_conn_closing(e.c));
    fake_conn_finish_close(e.c);
    assert_int_equal(e.ended, 1);
    smtpd_server_free(e.srv);
    fake_spool_free(e.sp);
    config_unref(e.cfg);
}

static void
test_smtp_server_starttls_handshake_timeout_closes_without_a_reply(void **state)
{
    (void)state;
    struct t_env e;
    t_start_tls_listener(&e, "starttls", "/etc/petrel/cert.pem");
    t_expect(&e, "220 mx.petrel.test ESMTP petrel\r\n");
    fake_conn_push_str(e.c, "EHLO client.example\r\nSTARTTLS\r\n");
    free(fake_conn_take_output(e.c));
    fake_conn_fire_timeout(e.c);
    t_expect(&e, ""); /* a plaintext 421 would only confuse the TLS client */
    assert_true(fake_conn_closing(e.c));
    fake_conn_finish_close(e.c);
    assert_int_equal(e.ended, 1);
    smtpd_server_free(e.srv);
    fake_spool_free(e.sp);
    config_unref(e.cfg);
}

static void
test_smtp_server_implicit_tls_sends_the_banner_after_the_handshake(void **state)
{
    (void)state;
    struct t_env e;
    t_start_tls_listener(&e, "implicit", "/etc/petrel/cert.pem");
    t_expect(&e, ""); /* RFC 8314 3.3: TLS first */
    assert_true(fake_conn_tls_started(e.c));
    assert_true(fake_conn_tls_server(e.c));
    fake_conn_complete_tls(e.c, 0, NULL, NULL);
    t_expect(&e, "220 mx.petrel.test ESMTP petrel\r\n");
    fake_conn_push_str(e.c, "EHLO client.example\r\n");
    t_expect(&e, t_ehlo_reply_foreign);
    fake_conn_push_str(e.c, "STARTTLS\r\n");
    t_expect(&e, "503 5.5.1 Error: TLS already active\r\n");
    fake_conn_push_str(e.c, "MAIL FROM:<a@example.com> SMTPUTF8\r\nRCPT TO:<b@local.test>\r\n"
                            "DATA\r\nSubject: s\r\n\r\nb\r\n.\r\n");
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
    assert_int_equal(fake_spool_complete(e.sp, 0), 1);
    t_expect_prefix(&e, "250 2.0.0 Ok: queued as ");
    const struct fake_spool_msg *m = fake_spool_msg(e.sp, 0);
    assert_non_null(strstr(m->content, "\tby mx.petrel.test (petrel) with UTF8ESMTPS id "));
    t_finish(&e);
}

static void
test_smtp_server_unloadable_certificate_disables_tls(void **state)
{
    (void)state;
    struct t_env e;
    t_start_tls_listener(&e, "starttls", "/etc/petrel/unloadable.pem");
    assert_non_null(smtpd_server_tls_error(e.srv));
    t_expect(&e, "220 mx.petrel.test ESMTP petrel\r\n");
    t_ehlo_foreign(&e); /* STARTTLS not offered */
    fake_conn_push_str(e.c, "STARTTLS\r\n");
    t_expect(&e, "454 4.7.0 TLS not available due to temporary reason\r\n");
    t_finish(&e);
    /* an implicit-TLS listener cannot talk at all: it closes */
    t_start_tls_listener(&e, "implicit", "/etc/petrel/unloadable.pem");
    t_expect(&e, "");
    assert_false(fake_conn_tls_started(e.c));
    assert_true(fake_conn_closing(e.c));
    fake_conn_finish_close(e.c);
    assert_int_equal(e.ended, 1);
    smtpd_server_free(e.srv);
    fake_spool_free(e.sp);
    config_unref(e.cfg);
    assert_int_equal(fake_tls_live(), 0);
}

static void
test_smtp_server_implicit_tls_refusal_is_not_written_in_plaintext(void **state)
{
    (void)state;
    struct t_env e;
    char *yaml = t_tls_yaml("implicit", "/etc/petrel/cert.pem");
    memset(&e, 0, sizeof(e));
    char *errors = NULL;
    if (config_load_string("test.yaml", yaml, strlen(yaml), &e.cfg, &errors) != 0)
        fail_msg("config: %s", errors);
    free(errors);
    free(yaml);
    e.sp = fake_spool_new();
    e.srv = smtpd_server_new(e.cfg, e.sp);
    e.c = fake_conn_new("203.0.113.9", 40000, "127.0.0.1");
    smtpd_session_start(e.srv, &e.cfg->listeners[0], e.c, &R_TOO_MANY_CONNS, t_on_end, &e);
    t_expect(&e, "");
    assert_false(fake_conn_tls_started(e.c));
    assert_true(fake_conn_closing(e.c));
    fake_conn_finish_close(e.c);
    assert_int_equal(e.ended, 1);
    smtpd_server_free(e.srv);
    fake_spool_free(e.sp);
    config_unref(e.cfg);
}

/* ---- hooked sessions (fake_hooks: scripted Lua/milter/plugin answers) ---- */

static void
t_hooks_expect_trace(const char *want)
{
    if (strcmp(fake_hooks_trace(), want) != 0)
        fail_msg("hook stages: got \"%s\", want \"%s\"", fake_hooks_trace(), want);
}

/* A hooked session from a relay client, past its connect stage. */
static void
t_start_hooked(struct t_env *e)
{
    t_start_with(e, t_base_config, "192.0.2.7");
    assert_true(fake_hooks_complete()); /* connect */
    t_expect(e, "220 mx.petrel.test ESMTP petrel\r\n");
}

/* The connect stage's refusal takes the banner's place and closes. */
static void
test_smtp_server_hook_connect_refusal_is_the_banner(void **state)
{
    (void)state;
    static const struct fake_hook_plan plan[] = {
        { PLUGIN_HOOK_CONNECT, NULL, VERDICT_REJECT, 554, "5.7.1", "go away" },
    };
    fake_hooks_plan(plan, ARRAY_SIZE(plan), NULL, NULL);
    struct t_env e;
    t_start_with(&e, t_base_config, "192.0.2.7");
    t_expect(&e, ""); /* nothing before the hook answered */
    assert_true(fake_hooks_pending());
    assert_true(fake_hooks_complete());
    t_expect(&e, "554 5.7.1 go away\r\n");
    assert_true(fake_conn_closing(e.c));
    t_finish(&e);
    fake_hooks_reset();
}

/* Pipelined commands wait for each stage; replies come in order, one
 * recipient refused among others. */
static void
test_smtp_server_hook_stages_keep_pipelined_order(void **state)
{
    (void)state;
    static const struct fake_hook_plan plan[] = {
        { PLUGIN_HOOK_RCPT_TO, "no@x.org", VERDICT_REJECT, 550, "5.1.1", "no such user" },
        { PLUGIN_HOOK_MAIL_FROM, "spam@x.org", VERDICT_TEMPFAIL, 451, "4.7.1", "later" },
    };
    fake_hooks_plan(plan, ARRAY_SIZE(plan), NULL, NULL);
    struct t_env e;
    t_start_hooked(&e);
    fake_conn_push_str(e.c, "EHLO client.example\r\nMAIL FROM:<spam@x.org>\r\n"
                            "MAIL FROM:<a@x.org>\r\nRCPT TO:<no@x.org>\r\n"
                            "RCPT TO:<yes@x.org>\r\nDATA\r\n");
    t_expect(&e, ""); /* EHLO waits for the helo stage */
    int rounds = 0;
    while (fake_hooks_complete())
        rounds++;
    assert_int_equal(rounds, 5); /* helo, mail ×2, rcpt ×2 */
    t_expect(&e, "250-mx.petrel.test\r\n250-PIPELINING\r\n250-SIZE 2048\r\n"
                 "250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n"
                 "250-CHUNKING\r\n250-XBIND\r\n250 DSN\r\n"
                 "451 4.7.1 later\r\n250 2.1.0 Ok\r\n550 5.1.1 no such user\r\n"
                 "250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n");
    t_hooks_expect_trace("connect helo:client.example mail:spam@x.org mail:a@x.org "
                         "rcpt:no@x.org rcpt:yes@x.org");
    fake_conn_push_str(e.c, "Subject: x\r\n\r\nb\r\n.\r\n");
    assert_true(fake_hooks_complete()); /* end of message */
    assert_int_equal(fake_spool_count(e.sp), 1);
    assert_int_equal(fake_spool_msg(e.sp, 0)->nrcpts, 1);
    assert_string_equal(fake_spool_msg(e.sp, 0)->rcpts[0], "yes@x.org");
    fake_spool_complete(e.sp, 0);
    t_expect_prefix(&e, "250 2.0.0 Ok: queued as ");
    t_finish(&e);
    fake_hooks_reset();
}

/* End of message: the hooks' content and envelope changes are what is
 * stored; a quarantine is stored held with its reason. */
static void
test_smtp_server_hook_eom_changes_are_stored(void **state)
{
    (void)state;
    static const struct fake_hook_plan plan[] = {
        { PLUGIN_HOOK_DATA, NULL, VERDICT_QUARANTINE, 0, "", "looks odd" },
    };
    struct milter_mod mods[] = {
        { .kind = MILTER_MOD_CHANGE_FROM, .filter = "f", .value = "new@x.org" },
        { .kind = MILTER_MOD_ADD_RCPT, .filter = "f", .value = "added@x.org" },
        { .kind = MILTER_MOD_DELETE_RCPT, .filter = "f", .value = "<B@X.ORG>" },
    };
    struct milter_mods m = { .v = mods, .n = ARRAY_SIZE(mods), .cap = ARRAY_SIZE(mods) };
    fake_hooks_plan(plan, ARRAY_SIZE(plan), "X-Changed: yes\r\n\r\nnew body\r\n", &m);
    struct t_env e;
    t_start_hooked(&e);
    fake_conn_push_str(e.c, "EHLO c.example\r\nMAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\n"
                            "RCPT TO:<c@x.org>\r\nDATA\r\n");
    while (fake_hooks_complete())
        ;
    t_expect_prefix(&e, "250-mx.petrel.test");
    fake_conn_push_str(e.c, "Subject: hi\r\n\r\nbody\r\n.\r\n");
    assert_true(fake_hooks_complete()); /* eom: quarantined, no content change then */
    assert_int_equal(fake_spool_count(e.sp), 1);
    const struct fake_spool_msg *q = fake_spool_msg(e.sp, 0);
    assert_true(q->flags & SPOOL_F_QUARANTINED);
    assert_string_equal(q->quarantine_reason, "looks odd");
    assert_non_null(strstr(q->content, "Subject: hi\r\n\r\nbody\r\n"));
    fake_spool_complete(e.sp, 0);
    t_expect_prefix(&e, "250 2.0.0 Ok: queued as ");

    /* the next message: content and envelope changed (no quarantine plan
     * for it: the plan's verdict applies to every end of message, so swap) */
    static const struct fake_hook_plan none[] = {
        { PLUGIN_HOOK_HELO, "never", VERDICT_REJECT, 550, "5.7.1", "x" },
    };
    fake_hooks_plan(none, ARRAY_SIZE(none), "X-Changed: yes\r\n\r\nnew body\r\n", &m);
    fake_conn_push_str(e.c, "MAIL FROM:<a@x.org>\r\nRCPT TO:<b@x.org>\r\n"
                            "RCPT TO:<c@x.org>\r\nDATA\r\n");
    while (fake_hooks_complete())
        ;
    t_expect(&e, "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n250 2.1.5 Ok\r\n"
                 "354 End data with <CR><LF>.<CR><LF>\r\n");
    fake_conn_push_str(e.c, "Subject: hi\r\n\r\nbody\r\n.\r\n");
    assert_true(fake_hooks_complete());
    assert_int_equal(fake_spool_count(e.sp), 2);
    q = fake_spool_msg(e.sp, 1);
    assert_int_equal(q->flags & SPOOL_F_QUARANTINED, 0);
    assert_string_equal(q->sender, "new@x.org");
    assert_int_equal(q->nrcpts, 2); /* b deleted (case-insensitively, brackets), added */
    assert_string_equal(q->rcpts[0], "c@x.org");
    assert_string_equal(q->rcpts[1], "added@x.org");
    const char *body = strstr(q->content, "X-Changed: yes\r\n\r\nnew body\r\n");
    assert_non_null(body);
    assert_null(strstr(q->content, "Subject: hi"));
    fake_spool_complete(e.sp, 0);
    t_expect_prefix(&e, "250 2.0.0 Ok: queued as ");
    t_finish(&e);
    fake_hooks_reset();
}

/* DISCARD at a recipient: the client is told 250, nothing is stored. */
static void
test_smtp_server_hook_discard_stores_nothing(void **state)
{
    (void)state;
    static const struct fake_hook_plan plan[] = {
        { PLUGIN_HOOK_RCPT_TO, "drop@x.org", VERDICT_DISCARD, 0, "", "" },
    };
    fake_hooks_plan(plan, ARRAY_SIZE(plan), NULL, NULL);
    struct t_env e;
    t_start_hooked(&e);
    fake_conn_push_str(e.c, "EHLO c.example\r\nMAIL FROM:<a@x.org>\r\n"
                            "RCPT TO:<drop@x.org>\r\nDATA\r\n");
    while (fake_hooks_complete())
        ;
    t_expect_prefix(&e, "250-mx.petrel.test");
    fake_conn_push_str(e.c, "Subject: x\r\n\r\nb\r\n.\r\n");
    assert_false(fake_hooks_pending()); /* decided already: no end-of-message stage */
    t_expect_prefix(&e, "250 2.0.0 Ok: queued as ");
    assert_int_equal(fake_spool_count(e.sp), 0);
    t_finish(&e);
    fake_hooks_reset();
}

/* A client that leaves while a stage is pending: the stage is cancelled,
 * the session ends, no callback arrives later. */
static void
test_smtp_server_hook_pending_stage_cancelled_on_eof(void **state)
{
    (void)state;
    fake_hooks_plan(NULL, 0, NULL, NULL);
    struct t_env e;
    t_start_hooked(&e);
    fake_conn_push_str(e.c, "EHLO c.example\r\nMAIL FROM:<a@x.org>\r\n");
    assert_true(fake_hooks_complete()); /* helo */
    assert_true(fake_hooks_pending());  /* mail */
    fake_conn_eof(e.c);
    assert_false(fake_hooks_pending());
    t_hooks_expect_trace("connect helo:c.example mail:a@x.org cancel");
    assert_true(fake_conn_closing(e.c));
    fake_conn_finish_close(e.c);
    assert_int_equal(e.ended, 1);
    smtpd_server_free(e.srv);
    fake_spool_free(e.sp);
    config_unref(e.cfg);
    fake_hooks_reset();
}

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_smtp_server_full_transaction_is_queued_after_commit),
        cmocka_unit_test(test_smtp_server_pipelined_commands_reply_in_one_flush),
        cmocka_unit_test(test_smtp_server_sequence_errors_get_503),
        cmocka_unit_test(test_smtp_server_unknown_and_syntax_replies),
        cmocka_unit_test(test_smtp_server_relay_denied_for_foreign_client),
        cmocka_unit_test(test_smtp_server_hook_connect_refusal_is_the_banner),
        cmocka_unit_test(test_smtp_server_hook_stages_keep_pipelined_order),
        cmocka_unit_test(test_smtp_server_hook_eom_changes_are_stored),
        cmocka_unit_test(test_smtp_server_hook_discard_stores_nothing),
        cmocka_unit_test(test_smtp_server_hook_pending_stage_cancelled_on_eof),
        cmocka_unit_test(test_smtp_server_too_many_recipients_452),
        cmocka_unit_test(test_smtp_server_bare_lf_is_not_end_of_data),
        cmocka_unit_test(test_smtp_server_size_limits),
        cmocka_unit_test(test_smtp_server_bdat_chunks),
        cmocka_unit_test(test_smtp_server_line_too_long_then_continues),
        cmocka_unit_test(test_smtp_server_line_too_long_in_one_write_keeps_next_command),
        cmocka_unit_test(test_smtp_server_too_many_errors_421),
        cmocka_unit_test(test_smtp_server_hop_limit),
        cmocka_unit_test(test_smtp_server_early_talker_is_refused),
        cmocka_unit_test(test_smtp_server_timeout_421),
        cmocka_unit_test(test_smtp_server_spool_failure_451_and_session_continues),
        cmocka_unit_test(test_smtp_server_disconnect_during_commit_frees_after_callback),
        cmocka_unit_test(test_smtp_server_shutdown_lets_transaction_finish),
        cmocka_unit_test(test_smtp_server_xbind_advertised_only_to_allowed_clients),
        cmocka_unit_test(test_smtp_server_xbind_command_replies),
        cmocka_unit_test(test_smtp_server_xbind_before_ehlo_is_503),
        cmocka_unit_test(test_smtp_server_xbind_command_is_stored_and_lasts_the_session),
        cmocka_unit_test(test_smtp_server_xbind_mail_parameter_is_for_one_transaction),
        cmocka_unit_test(test_smtp_server_xbind_mail_parameter_refused_for_foreign_client),
        cmocka_unit_test(test_smtp_server_xbind_precedence_parameter_command_header),
        cmocka_unit_test(test_smtp_server_xbind_header_is_removed_and_applied),
        cmocka_unit_test(test_smtp_server_xbind_header_from_foreign_client_is_removed_and_ignored),
        cmocka_unit_test(test_smtp_server_xbind_header_with_bdat),
        cmocka_unit_test(test_smtp_server_starttls_drops_injected_commands_and_restarts),
        cmocka_unit_test(test_smtp_server_starttls_sequence_and_syntax_replies),
        cmocka_unit_test(test_smtp_server_starttls_handshake_failure_closes_silently),
        cmocka_unit_test(test_smtp_server_starttls_handshake_timeout_closes_without_a_reply),
        cmocka_unit_test(test_smtp_server_implicit_tls_sends_the_banner_after_the_handshake),
        cmocka_unit_test(test_smtp_server_unloadable_certificate_disables_tls),
        cmocka_unit_test(test_smtp_server_implicit_tls_refusal_is_not_written_in_plaintext),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
