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
#include "fakes/fake_conn.h"
#include "fakes/fake_spool.h"
#include "smtp_server.h"

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

static const char t_ehlo_reply[] = "250-mx.petrel.test\r\n"
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
    t_ehlo(&e);
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

int
main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_smtp_server_full_transaction_is_queued_after_commit),
        cmocka_unit_test(test_smtp_server_pipelined_commands_reply_in_one_flush),
        cmocka_unit_test(test_smtp_server_sequence_errors_get_503),
        cmocka_unit_test(test_smtp_server_unknown_and_syntax_replies),
        cmocka_unit_test(test_smtp_server_relay_denied_for_foreign_client),
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
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
