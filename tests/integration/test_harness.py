"""Self-tests of the harness that need no daemon: the YAML writer, port
allocation, the reply reader and the aiosmtpd sink, the queue-list parser and
the Received-header regex."""

import socket

import pytest

from petrel_fixture import (RECEIVED_RE, QueueListing, check_received, deep_merge, free_port,
                            to_yaml)
from smtpwire import RawSMTP, dot_stuff, message


def test_to_yaml_round_trips_a_petrel_config():
    yaml = pytest.importorskip("yaml")
    cfg = {
        "hostname": "petrel.test",
        "spool": "/tmp/x y/spool",
        "log": {"level": "debug", "format": "text"},
        "listeners": [{"name": "default", "address": "127.0.0.1:2525",
                       "max_message_size": "10K", "max_recipients": 1000,
                       "greet_delay": "500ms"},
                      {"name": "b", "address": "[::1]:25"}],
        "relay": {"clients": ["127.0.0.1/32", "::1/128"], "domains": ["local.test"]},
        "empty": [],
        "quoted": ["yes", "a: b", "#x", "-1x", 'q"uote'],
    }
    got = yaml.safe_load(to_yaml(cfg))
    assert got == cfg, f"got {got!r}, want {cfg!r}"


def test_deep_merge_overrides_nested_keys_and_deletes_none():
    base = {"a": 1, "log": {"level": "debug", "format": "text"}, "gone": 2}
    got = deep_merge(base, {"log": {"format": "json"}, "gone": None, "new": [1]})
    want = {"a": 1, "log": {"level": "debug", "format": "json"}, "new": [1]}
    assert got == want, f"got {got!r}, want {want!r}"
    assert base["log"]["format"] == "text", "deep_merge modified its input"


def test_free_port_is_bindable_and_ports_differ():
    ports = {free_port() for _ in range(5)}
    assert len(ports) >= 4, f"got ports {ports}, want distinct ports"
    p = ports.pop()
    with socket.socket() as s:
        s.bind(("127.0.0.1", p))


def test_dot_stuff_escapes_leading_dots_and_terminates():
    got = dot_stuff(b"a\r\n.b\r\n..c\r\n.\r\n")
    want = b"a\r\n..b\r\n...c\r\n..\r\n.\r\n"
    assert got == want, f"got {got!r}, want {want!r}"


def test_raw_client_reads_multiline_replies_and_sink_records_exact_bytes(sink):
    content = message("harness", body="line one\r\n.dot line\r\n\xe9t\xe9\r\n".encode("latin-1"))
    with RawSMTP(sink.host, sink.port) as c:
        assert c.banner.code == 220, f"got {c.banner}, want 220"
        r = c.ehlo("client.test")
        assert len(r.lines) > 1 and r.lines[-1][3] == " ", f"got {r}, want a multi-line 250"
        assert all(line.startswith("250-") for line in r.lines[:-1]), f"got {r}"
        c.expect("MAIL FROM:<alice@example.org>", "250")
        c.expect("RCPT TO:<bob@local.test>", "250")
        r = c.data(content)
        assert r.code == 250, f"got {r}, want 250"
        c.expect("QUIT", "221")
        assert c.wait_closed(5), "sink did not close after QUIT"
    msgs = sink.wait(1)
    got = msgs[0]
    assert got["data"] == content, f"got {got['data']!r}, want {content!r}"
    assert got["mail_from"] == "alice@example.org"
    assert got["rcpt_tos"] == ["bob@local.test"]
    assert got["ehlo"] == "client.test"
    assert got["peer"][0] == "127.0.0.1"


def test_queue_list_parser():
    text = ("0123456789ABCDEF      3s     512 <alice@example.org>\n"
            "    <bob@local.test> pending\n"
            "    carol@local.test  deferred (451 4.7.1 later)\n"
            "FEDCBA9876543210      1s      80 <>\n"
            "    <x@y> pending\n"
            "-- 2 messages, 3 recipients (3 pending)\n")
    q = QueueListing(text)
    assert q.qids == ["0123456789ABCDEF", "FEDCBA9876543210"], f"got {q.qids}"
    m = q.messages["0123456789ABCDEF"]
    assert m["sender"] == "alice@example.org"
    assert [(a, s) for a, s, _ in m["rcpts"]] == [("bob@local.test", "pending"),
                                                  ("carol@local.test", "deferred")]
    assert q.messages["FEDCBA9876543210"]["sender"] == ""
    assert q.summary.startswith("-- 2 messages")
    assert not q.empty and QueueListing("Queue is empty\n").empty


@pytest.mark.parametrize("header,rcpt", [
    (b"Received: from client.test ([127.0.0.1])\r\n\tby petrel.test (petrel) with ESMTP id "
     b"0123456789ABCDEF\r\n\tfor <bob@local.test>; %s\r\n", "bob@local.test"),
    (b"Received: from client.test ([127.0.0.1])\r\n\tby petrel.test (petrel) with ESMTP id "
     b"0123456789ABCDEF; %s\r\n", None),
    (b"Received: from client.test ([127.0.0.1])\r\n\tby petrel.test (petrel) with ESMTP id "
     b"0123456789ABCDEF;\r\n\t%s\r\n", None),
])
def test_received_regex_accepts_both_forms(header, rcpt):
    from email.utils import formatdate
    stored = header % formatdate(usegmt=False).encode() + b"Subject: x\r\n\r\nbody\r\n"
    assert RECEIVED_RE.match(stored), f"regex rejects {stored!r}"
    rest = check_received(stored, qid="0123456789ABCDEF", helo="client.test", rcpt=rcpt)
    assert rest == b"Subject: x\r\n\r\nbody\r\n"


@pytest.mark.parametrize("text", [
    "==1==ERROR: AddressSanitizer: heap-use-after-free on address 0x6020",
    "==1==ERROR: LeakSanitizer: detected memory leaks",
    "core/buf.c:12:5: runtime error: signed integer overflow",
    "petrel: panic: core/spool.c:99: invariant broken",
])
def test_sanitizer_reports_are_detected(text):
    from petrel_fixture import DaemonError, check_no_sanitizer
    with pytest.raises(DaemonError):
        check_no_sanitizer("2026-01-01T00:00:00.000Z petrel[1]: NOQUEUE: connect\n" + text, "x")
    check_no_sanitizer("2026-01-01T00:00:00.000Z petrel[1]: NOQUEUE: connect\n", "x")
