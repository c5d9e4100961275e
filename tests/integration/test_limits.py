"""Per-listener limits as a client meets them: message size, recipients, line
length, error count, timeouts, early talkers, connection limits, hop count."""

import socket
import time

import pytest

from petrel_fixture import check_received
from smtpwire import Closed, RawSMTP, message

SIZE_EXCEEDED = "552 5.3.4 Error: message size exceeds fixed limit"


def connect(p, **kw):
    return RawSMTP(p.host, p.port, **kw)


def open_transaction(c, rcpt="bob@local.test", params=""):
    c.ehlo()
    r = c.cmd(f"MAIL FROM:<alice@example.org>{params}")
    assert r.last == "250 2.1.0 Ok", f"MAIL: got {r}"
    r = c.cmd(f"RCPT TO:<{rcpt}>")
    assert r.last == "250 2.1.5 Ok", f"RCPT: got {r}"


def reply_or_closed(c, timeout):
    """The next reply, or None if the server closed without one."""
    try:
        return c.read_reply(timeout)
    except Closed:
        return None


# ---------------------------------------------------------------- message size


@pytest.mark.parametrize("size,want", [
    (10240, "250 2.1.0 Ok"),
    (10241, SIZE_EXCEEDED),
    (10 ** 12, SIZE_EXCEEDED),
])
def test_mail_size_parameter_against_max_message_size(petrel, size, want):
    p = petrel(listener={"max_message_size": "10K"})
    with connect(p) as c:
        c.ehlo()
        r = c.cmd(f"MAIL FROM:<alice@example.org> SIZE={size}")
        assert r.lines == [want], f"SIZE={size}: got {r!r}, want [{want!r}]"
        assert c.cmd("NOOP").last == "250 2.0.0 Ok"


def test_data_over_max_message_size_is_rejected_after_the_final_dot(petrel):
    p = petrel(listener={"max_message_size": "10K"})
    big = message("big", body=("x" * 76 + "\r\n") * 200)          # ~15.6 KiB
    assert len(big) > 10240
    with connect(p) as c:
        open_transaction(c)
        r = c.data(big)
        assert r.lines == [SIZE_EXCEEDED], f"got {r!r}, want [{SIZE_EXCEEDED!r}]"
        # the session continues and a message under the limit is accepted
        assert c.cmd("NOOP").last == "250 2.0.0 Ok"
        small = message("small")
        qid = c.transaction("alice@example.org", ["bob@local.test"], small)
    q = p.queue_list()
    assert q.qids == [qid], f"got {q.qids}, want only the small message [{qid}]\n{q.text}"


def test_bdat_over_max_message_size_is_rejected_and_consumed(petrel):
    p = petrel(listener={"max_message_size": "10K"})
    big = message("big bdat", body=("y" * 76 + "\r\n") * 200)
    with connect(p) as c:
        open_transaction(c)
        c.send(f"BDAT {len(big)} LAST\r\n".encode() + big)
        r = c.read_reply()
        assert r.lines == [SIZE_EXCEEDED], f"got {r!r}, want [{SIZE_EXCEEDED!r}]"
        assert c.cmd("NOOP").last == "250 2.0.0 Ok", "chunk bytes were parsed as commands"
    assert p.queue_list().empty


# ---------------------------------------------------------------- recipients


def test_1001st_recipient_is_refused_and_the_first_1000_are_queued(petrel):
    p = petrel()
    rcpts = [f"user{i:04d}@local.test" for i in range(1001)]
    with connect(p, timeout=30) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        replies = []
        for start in range(0, len(rcpts), 100):          # pipelined in groups of 100
            batch = rcpts[start:start + 100]
            c.send("".join(f"RCPT TO:<{a}>\r\n" for a in batch))
            replies += [r.last for r in c.read_replies(len(batch))]
        bad = [(i, r) for i, r in enumerate(replies[:1000]) if r != "250 2.1.5 Ok"]
        assert not bad, f"refused among the first 1000: {bad[:5]}"
        assert replies[1000] == "452 4.5.3 Error: too many recipients", \
            f"RCPT #1001: got {replies[1000]!r}"
        r = c.data(message("many"))
        assert r.qid, f"got {r}, want 250 queued"
        port = c.local_port
    q = p.queue_list()
    got = [a for a, _, _ in q.messages[r.qid]["rcpts"]]
    assert got == rcpts[:1000], f"queued recipients: got {len(got)}, want the first 1000"
    assert all(s == "pending" for _, s, _ in q.messages[r.qid]["rcpts"])
    p.wait_log(r.qid + r": queued: session=\S+, client=\[127\.0\.0\.1\]:" + str(port)
               + r", .*nrcpt=1000\b")


def test_max_recipients_setting(petrel):
    p = petrel(listener={"max_recipients": 2})
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        got = [c.cmd(f"RCPT TO:<u{i}@local.test>").last for i in range(3)]
        want = ["250 2.1.5 Ok", "250 2.1.5 Ok", "452 4.5.3 Error: too many recipients"]
        assert got == want, f"got {got}, want {want}"


# ---------------------------------------------------------------- command line length


@pytest.mark.parametrize("total,want", [
    (2048, "250 2.0.0 Ok"),                        # exactly max_line_length incl. CRLF
    (2049, "500 5.5.2 Error: line too long"),
    (100000, "500 5.5.2 Error: line too long"),
])
def test_command_line_length_limit(petrel, total, want):
    p = petrel()
    line = b"NOOP " + b"x" * (total - len("NOOP ") - 2)
    assert len(line) + 2 == total
    with connect(p) as c:
        c.ehlo()
        c.send(line + b"\r\n")
        r = c.read_reply()
        assert r.lines == [want], f"{total}-byte line: got {r!r}, want [{want!r}]"
        # exactly one reply for the line; the session continues
        assert c.cmd("NOOP").last == "250 2.0.0 Ok"
        assert c.cmd("MAIL FROM:<alice@example.org>").last == "250 2.1.0 Ok"


def test_command_after_an_overlong_line_in_the_same_write_is_processed(petrel):
    p = petrel()
    with connect(p) as c:
        c.ehlo()
        c.send(b"NOOP " + b"x" * 3000 + b"\r\nMAIL FROM:<alice@example.org>\r\n")
        got = [r.last for r in c.read_replies(2)]
        want = ["500 5.5.2 Error: line too long", "250 2.1.0 Ok"]
        assert got == want, f"got {got}, want {want}"


def test_998_octet_body_line_is_stored_byte_exact(petrel):
    p = petrel()
    content = b"Subject: long line\r\n\r\n" + b"L" * 998 + b"\r\nend\r\n"
    with connect(p) as c:
        c.ehlo()
        qid = c.transaction("alice@example.org", ["bob@local.test"], content)
    assert check_received(p.queue_cat(qid), qid=qid, helo="client.test",
                          rcpt="bob@local.test") == content


def expect_too_many_errors(c):
    """After the last allowed error: 421 4.7.0 (sent at once or on the next
    command), then the server closes."""
    want = "421 4.7.0 Error: too many errors, closing connection"
    try:
        r = c.read_reply(timeout=0.5)
    except (socket.timeout, TimeoutError):
        c.send(b"NOOP\r\n")
        r = reply_or_closed(c, 5)
    assert r is not None and r.lines == [want], f"got {r!r}, want [{want!r}]"
    assert c.wait_closed(5), "server did not close after 421"


def test_max_errors_closes_with_421(petrel):
    p = petrel(listener={"max_errors": 3})
    with connect(p) as c:
        c.ehlo()
        for i in range(3):
            r = c.cmd(f"BOGUS{i}")
            assert r.last == "500 5.5.2 Error: command not recognized", f"error {i}: got {r}"
        expect_too_many_errors(c)


def test_long_lines_count_as_errors(petrel):
    p = petrel(listener={"max_errors": 2})
    with connect(p) as c:
        c.ehlo()
        for _ in range(2):
            r = c.cmd(b"NOOP " + b"z" * 3000)
            assert r.last == "500 5.5.2 Error: line too long", f"got {r}"
        expect_too_many_errors(c)


# ---------------------------------------------------------------- timeouts


def test_idle_client_gets_421_after_command_timeout(petrel):
    p = petrel(listener={"command_timeout": "1s"})
    with connect(p) as c:
        c.ehlo()
        t0 = time.monotonic()
        r = reply_or_closed(c, 10)
        elapsed = time.monotonic() - t0
        want = "421 4.4.2 Error: timeout exceeded, closing connection"
        assert r is not None and r.lines == [want], f"got {r!r}, want [{want!r}]"
        assert 0.8 <= elapsed <= 5, f"421 after {elapsed:.2f}s, want about 1s"
        assert c.wait_closed(5), "server did not close after the timeout"


def test_command_timeout_is_rearmed_by_each_command(petrel):
    p = petrel(listener={"command_timeout": "2s"})
    with connect(p) as c:
        c.ehlo()
        for _ in range(4):                      # 4 x 0.8 s > 2 s in total
            time.sleep(0.8)
            assert c.cmd("NOOP").last == "250 2.0.0 Ok"


def test_stalled_data_gets_421_after_data_timeout_and_nothing_is_queued(petrel):
    p = petrel(listener={"data_timeout": "1s"})
    with connect(p) as c:
        open_transaction(c)
        c.expect("DATA", "354")
        c.send(b"Subject: stalled\r\n\r\npartial line")
        r = reply_or_closed(c, 10)
        want = "421 4.4.2 Error: timeout exceeded, closing connection"
        assert r is not None and r.lines == [want], f"got {r!r}, want [{want!r}]"
        assert c.wait_closed(5)
    assert p.queue_list().empty


# ---------------------------------------------------------------- early talker


def test_early_talker_is_rejected_and_disconnected(petrel):
    p = petrel(listener={"greet_delay": "500ms"})
    with connect(p, banner=False) as c:
        c.send(b"EHLO x\r\n")
        r = reply_or_closed(c, 5)
        want = "554 5.5.1 Error: SMTP protocol synchronization (data sent before greeting)"
        assert r is not None and r.lines == [want], f"got {r!r}, want [{want!r}]"
        assert c.wait_closed(5), "server did not close the early talker's connection"
    assert p.queue_list().empty


def test_patient_client_gets_the_banner_after_greet_delay(petrel):
    p = petrel(listener={"greet_delay": "500ms"})
    t0 = time.monotonic()
    with connect(p, banner=False) as c:
        r = c.read_reply(timeout=5)
        elapsed = time.monotonic() - t0
        assert r.lines == ["220 petrel.test ESMTP petrel"], f"got {r!r}"
        assert elapsed >= 0.45, f"banner after {elapsed:.3f}s, want >= 0.5s (greet_delay)"
        c.ehlo()
        qid = c.transaction("alice@example.org", ["bob@local.test"], message("patient"))
    assert qid in p.queue_list()


# ---------------------------------------------------------------- connection limits


def open_banners(p, n, source=None, deadline_s=5.0):
    """n connections that all got a 220 (retrying while the daemon still
    counts connections that were just closed); returns the clients."""
    deadline = time.monotonic() + deadline_s
    while True:
        conns = []
        ok = True
        for _ in range(n):
            c = RawSMTP(p.host, p.port, source=source, banner=False)
            conns.append(c)
            r = reply_or_closed(c, 5)
            if r is None or r.code != 220:
                ok = False
                break
        if ok:
            return conns
        for c in conns:
            c.close()
        assert time.monotonic() < deadline, f"could not open {n} connections: last reply {r!r}"
        time.sleep(0.2)


def test_connection_over_max_connections_per_ip_gets_421(petrel):
    p = petrel(listener={"max_connections_per_ip": 3})
    conns = open_banners(p, 3)
    try:
        with RawSMTP(p.host, p.port, banner=False) as extra:
            r = reply_or_closed(extra, 5)
            assert r is not None and r.code == 421 and r.last.startswith("421 4.7.0 "), \
                f"4th connection from 127.0.0.1: got {r!r}, want 421 4.7.0 ..."
            assert extra.wait_closed(5), "server did not close the refused connection"
        # another address is not affected
        with RawSMTP(p.host, p.port, source="127.0.0.2", banner=False) as other:
            r = other.read_reply(5)
            assert r.code == 220, f"connection from 127.0.0.2: got {r!r}, want 220"
        # the existing sessions still work
        for c in conns:
            assert c.cmd("NOOP").last == "250 2.0.0 Ok"
        # after one closes, a new connection is admitted again (bounded retry)
        conns.pop().close()
        conns += open_banners(p, 1)
    finally:
        for c in conns:
            c.close()


def test_connection_over_max_connections_gets_421(petrel):
    p = petrel(listener={"max_connections": 2})
    conns = open_banners(p, 2)
    try:
        with RawSMTP(p.host, p.port, source="127.0.0.3", banner=False) as extra:
            r = reply_or_closed(extra, 5)
            assert r is not None and r.last.startswith("421 4.7.0 "), \
                f"3rd connection: got {r!r}, want 421 4.7.0 ..."
            assert extra.wait_closed(5)
    finally:
        for c in conns:
            c.close()


# ---------------------------------------------------------------- hop count


@pytest.mark.parametrize("hops,accepted", [(2, True), (15, False)])
def test_max_received_headers(petrel, hops, accepted):
    p = petrel(listener={"max_received_headers": 10})      # the lowest value allowed
    hdrs = [f"Received: from hop{i}.test by hop{i + 1}.test; Mon, 1 Jan 2024 00:00:0{i % 10} +0000"
            for i in range(hops)]
    content = "\r\n".join(hdrs).encode() + b"\r\n" + message("hops")
    with connect(p) as c:
        open_transaction(c)
        r = c.data(content)
        if accepted:
            assert r.qid, f"{hops} Received headers: got {r!r}, want 250 queued"
        else:
            assert r.last.startswith("554 5.4.6 "), \
                f"{hops} Received headers: got {r!r}, want 554 5.4.6 too many hops"
    q = p.queue_list()
    assert len(q) == (1 if accepted else 0), q.text
    if accepted:
        assert check_received(p.queue_cat(r.qid), qid=r.qid, helo="client.test",
                              rcpt="bob@local.test") == content

