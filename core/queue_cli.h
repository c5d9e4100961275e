/*
 * queue_cli — `petrel queue list|show|cat`: read-only views of the spool for
 * administrators. They open the spool with spool_open_readonly(), so they
 * work while the daemon runs (a commit in progress is simply not seen).
 * Each returns the process exit code: 0 on success, 1 on an unknown queue id
 * or an unreadable spool (the error goes to err, prefixed "petrel: ").
 */
#ifndef PETREL_QUEUE_CLI_H
#define PETREL_QUEUE_CLI_H

#include <stdio.h>

/* One line per message, then one indented line per recipient:
 *   QUEUE ID           AGE      SIZE  SENDER
 *   660E8C3016466000    42s      1834  <alice@example.org>  (quarantined: reason)
 *     deferred  <bob@example.net>  attempts=2 next=2026-11-23T10:00:00Z  last="451 4.7.1 Later"
 *   -- N messages, M recipients (P pending, D deferred, F failed, Q quarantined)
 * M counts every recipient (delivered ones too); Q counts quarantined
 * messages. Empty fields are omitted; an empty queue prints "Queue is empty". */
int queue_cli_list(const char *spool_dir, FILE *out, FILE *err);

/* The envelope, one "name: value" line per non-empty field, one "rcpt:" line
 * per recipient, a blank line, then the message's header section. qid is
 * matched case-insensitively. */
int queue_cli_show(const char *spool_dir, const char *qid, FILE *out, FILE *err);

/* The stored content, byte for byte (Received header included). */
int queue_cli_cat(const char *spool_dir, const char *qid, FILE *out, FILE *err);

#endif
