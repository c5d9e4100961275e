"""Durability and lifecycle: a message acknowledged with 250 survives kill -9;
restart rebuilds the queue from the spool; SIGTERM shuts down cleanly."""

import threading
import time

from petrel_fixture import check_received, port_is_closed
from smtpwire import Closed, RawSMTP, message


def connect(p, **kw):
    return RawSMTP(p.host, p.port, **kw)


def test_acknowledged_message_survives_kill9(petrel):
    p = petrel()
    content = message("durable", body="must survive\r\n")
    with connect(p) as c:
        c.ehlo()
        qid = c.transaction("alice@example.org", ["bob@local.test"], content)
        p.kill9()                               # right after the 250, connection still open
    p.start()
    q = p.queue_list()
    assert q.qids == [qid], f"after kill -9 and restart: got {q.qids}, want [{qid}]\n{q.text}"
    rcpts = [(a, s) for a, s, _ in q.messages[qid]["rcpts"]]
    assert rcpts == [("bob@local.test", "pending")], f"got {rcpts}"
    rest = check_received(p.queue_cat(qid), qid=qid, helo="client.test", rcpt="bob@local.test")
    assert rest == content


def _sender_thread(p, idx, count, acked, errors, stop=None):
    """One connection sending `count` messages; records (qid, content) per 250."""
    try:
        with connect(p, timeout=20) as c:
            c.ehlo(f"client{idx}.test")
            for n in range(count):
                if stop is not None and stop.is_set():
                    return
                content = message(f"conn{idx} msg{n}", body=f"conn {idx} message {n}\r\n")
                qid = c.transaction(f"sender{idx}@example.org", [f"rcpt{idx}.{n}@local.test"],
                                    content)
                acked.append((qid, idx, n, content))
    except (OSError, Closed, AssertionError) as e:
        if stop is None or not stop.is_set():
            errors.append(f"connection {idx}: {e!r}")


def test_twenty_messages_over_five_connections_survive_kill9(petrel):
    p = petrel()
    acked, errors = [], []
    threads = [threading.Thread(target=_sender_thread, args=(p, i, 4, acked, errors))
               for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "sender threads did not finish in 60s"
    p.kill9()                                   # immediately after the last 250
    assert not errors, f"sending failed: {errors}"
    assert len(acked) == 20, f"got {len(acked)} acknowledgements, want 20"
    p.start()
    q = p.queue_list()
    missing = [qid for qid, *_ in acked if qid not in q]
    assert not missing, f"{len(missing)} acknowledged messages lost after kill -9: {missing}\n" \
                        f"{q.text}"
    assert len(q) == 20, f"queue holds {len(q)} messages, want 20\n{q.text}"
    assert len({qid for qid, *_ in acked}) == 20, "duplicate queue ids"
    for qid, idx, n, content in acked:
        rest = check_received(p.queue_cat(qid), qid=qid, helo=f"client{idx}.test",
                              rcpt=f"rcpt{idx}.{n}@local.test")
        assert rest == content, f"{qid}: got {rest!r}, want {content!r}"
        assert q.messages[qid]["sender"] == f"sender{idx}@example.org"


def test_kill9_during_traffic_loses_no_acknowledged_message(petrel):
    p = petrel()
    acked, errors = [], []
    stop = threading.Event()
    threads = [threading.Thread(target=_sender_thread, args=(p, i, 200, acked, errors, stop))
               for i in range(5)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < 15 and time.monotonic() < deadline and not errors:
        time.sleep(0.005)
    stop.set()
    p.kill9()                                   # while the other sessions are mid-transaction
    snapshot = list(acked)                      # every 250 received before the kill
    for t in threads:
        t.join(30)
    assert not errors, f"sending failed before the kill: {errors}"
    assert len(snapshot) >= 15, f"only {len(snapshot)} messages acknowledged in 30s"
    p.start()
    q = p.queue_list()
    missing = [qid for qid, *_ in snapshot if qid not in q]
    assert not missing, f"acknowledged but lost: {missing}"
    # anything else in the queue is a complete message that was really sent
    # (its 250 may have been lost with the connection), never a torn one
    sent = {f"conn {i} message {n}\r\n".encode(): (i, n) for i in range(5) for n in range(200)}
    for qid in q.qids:
        stored = p.queue_cat(qid)
        body = stored.split(b"\r\n\r\n", 2)[-1]
        assert body in sent, f"{qid}: stored content is not a message we sent: {stored!r}"


def test_queue_is_rebuilt_after_graceful_restart_and_new_ids_keep_increasing(petrel):
    p = petrel()
    with connect(p) as c:
        c.ehlo()
        q1 = c.transaction("alice@example.org", ["bob@local.test"], message("one"))
        q2 = c.transaction("alice@example.org", ["carol@local.test"], message("two"))
        c.expect("QUIT", "221")
    p.restart()
    with connect(p) as c:
        c.ehlo()
        q3 = c.transaction("alice@example.org", ["dave@local.test"], message("three"))
    q = p.queue_list()
    assert q.qids == [q1, q2, q3], f"got {q.qids}, want {[q1, q2, q3]}"
    assert q1 < q2 < q3, f"queue ids not increasing across restart: {q1} {q2} {q3}"


def test_queue_cli_works_after_the_daemon_stopped(petrel):
    p = petrel()
    content = message("offline")
    with connect(p) as c:
        c.ehlo()
        qid = c.transaction("alice@example.org", ["bob@local.test"], content)
        c.expect("QUIT", "221")
    p.stop()
    q = p.queue_list()
    assert q.qids == [qid], f"got {q.qids}, want [{qid}]"
    assert check_received(p.queue_cat(qid), qid=qid, helo="client.test",
                          rcpt="bob@local.test") == content


def test_sigterm_with_idle_connection_exits_0_within_shutdown_timeout(petrel):
    p = petrel(config={"shutdown_timeout": "2s"})
    with connect(p) as c:
        c.ehlo()
        t0 = time.monotonic()
        p.terminate()
        rc = p.wait_exit(2 + 3)
        elapsed = time.monotonic() - t0
        assert rc is not None, f"daemon still running {elapsed:.1f}s after SIGTERM " \
                               f"(shutdown_timeout 2s)"
        assert rc == 0, f"exit status {rc}, want 0"
        # the idle client was told (421 4.3.2) or simply disconnected
        try:
            r = c.read_reply(timeout=2)
            assert r.last.startswith("421 4.3.2 "), f"idle client got {r!r}, want 421 or close"
            assert c.wait_closed(2)
        except Closed:
            pass
    p.check_sanitizers()


def test_sigterm_lets_a_fast_transaction_finish_and_stops_accepting(petrel):
    p = petrel(config={"shutdown_timeout": "5s"})
    content = message("finish me")
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5")
        c.expect("DATA", "354")
        c.send(content[:20])
        t0 = time.monotonic()
        p.terminate()
        time.sleep(0.3)
        assert port_is_closed(p.host, p.port), \
            "listener still accepts connections 0.3s after SIGTERM"
        c.send(content[20:] + b".\r\n")
        r = c.read_reply(timeout=5)
        assert r.qid, f"in-flight message after SIGTERM: got {r!r}, want 250 queued"
        assert time.monotonic() - t0 < 1.5
        try:
            r2 = c.cmd("QUIT", timeout=3)
            assert r2.last.startswith(("221 ", "421 ")), f"QUIT: got {r2!r}"
        except (Closed, OSError):
            pass
    rc = p.wait_exit(5 + 3)
    assert rc == 0, f"exit status {rc}, want 0 (None = still running)"
    p.check_sanitizers()
    q = p.queue_list()
    assert q.qids == [r.qid], f"got {q.qids}, want [{r.qid}]"
    assert check_received(p.queue_cat(r.qid), qid=r.qid, helo="client.test",
                          rcpt="bob@local.test") == content


def test_second_daemon_on_the_same_spool_refuses_to_start(petrel):
    p = petrel()
    other = petrel(config={"spool": str(p.spool)}, start=False, name="second")
    try:
        other.start(timeout=5, attempts=1)
    except AssertionError as e:
        assert "exited with status" in str(e), f"got {e}"
    else:
        raise AssertionError("a second daemon started on a locked spool")
    assert not other.running
    with connect(p) as c:
        assert c.cmd("NOOP").code == 250

