"""Self-tests of mx_fixture.py (the scriptable MX and LMTP servers), without petrel.

Addresses: 127.0.40.x."""

import smtplib
import socket

import pytest

from mx_fixture import first_n, shared_port
from smtpwire import RawSMTP, dot_stuff

HOSTS = ["127.0.40.1", "127.0.40.2"]


def lmtp_exchange(sock_or_addr, rcpts, content, unix=False):
    """LHLO, MAIL, RCPT..., DATA over a raw socket; returns (lhlo, rcpt replies, data replies)."""
    s = socket.socket(socket.AF_UNIX if unix else socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(sock_or_addr)
    buf = b""

    def reply():
        nonlocal buf
        lines = []
        while True:
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                assert chunk, f"closed; partial {buf!r}"
                buf += chunk
            line, buf = buf.split(b"\r\n", 1)
            lines.append(line.decode())
            if line[3:4] == b" ":
                return lines

    assert reply()[0].startswith("220")
    s.sendall(b"LHLO petrel.test\r\n")
    lhlo = reply()
    s.sendall(b"MAIL FROM:<a@x.test>\r\n")
    assert reply()[-1].startswith("250")
    rr = []
    for r in rcpts:
        s.sendall(f"RCPT TO:<{r}>\r\n".encode())
        rr.append(reply()[-1])
    s.sendall(b"DATA\r\n")
    assert reply()[-1].startswith("354")
    s.sendall(dot_stuff(content))
    n = sum(1 for r in rr if r.startswith("2"))
    dr = [reply()[-1] for _ in range(n)]
    s.sendall(b"QUIT\r\n")
    s.close()
    return lhlo, rr, dr


def test_smtp_records_envelope_and_exact_bytes(mx_servers):
    port = shared_port(HOSTS)
    mx = mx_servers(HOSTS[0], port, name="mx1.self.test")
    content = b"Subject: x\r\n\r\n.leading dot\r\n..two\r\nbare \t tab \r\n"
    with RawSMTP(HOSTS[0], port) as c:
        assert c.banner.first.startswith("220 mx1.self.test"), c.banner
        r = c.cmd("EHLO relay.self.test")
        assert "250-PIPELINING" in r.lines and "250-DSN" not in r.lines, r.lines
        c.expect("MAIL FROM:<> SIZE=100 BODY=8BITMIME", "250 2.1.0")
        c.expect("RCPT TO:<bob@self.test>", "250 2.1.5")
        r = c.data(content)
        assert r.code == 250, r
    msgs = mx.wait_for(1, 5)
    t = msgs[0]
    assert t.data == content, f"got {t.data!r}"
    assert t.mail_from == "" and t.mail_params == ["SIZE=100", "BODY=8BITMIME"], t
    assert t.helo == "relay.self.test" and t.verb == "EHLO" and t.peer[0] == "127.0.0.1", t
    assert t.rcpt_tos == ["bob@self.test"] and t.delivered_to == ["bob@self.test"]


def test_smtp_scripts(mx_servers):
    port = shared_port(HOSTS)
    mx = mx_servers(HOSTS[1], port, name="mx2.self.test")
    mx.set_reply("rcpt", "550 5.1.1 No such user", rcpt="nobody")
    mx.set_reply("rcpt", first_n(2, "451 4.7.1 Try again later"), rcpt="later@self.test")
    mx.set_reply("data_end", first_n(1, "452 4.2.2 Mailbox full"))
    for i in range(3):
        with smtplib.SMTP(HOSTS[1], port, timeout=10) as s:
            s.ehlo("c.test")
            s.mail("a@x.test")
            assert s.rcpt("nobody@self.test")[0] == 550
            code = s.rcpt("later@self.test")[0]
            assert code == (451 if i < 2 else 250), (i, code)
            assert s.rcpt("ok@self.test")[0] == 250
            code, _ = s.data(b"Subject: y\r\n\r\nbody\r\n")
            assert code == (452 if i == 0 else 250), (i, code)
    assert mx.rcpt_attempts("later@self.test") == 3
    msgs = mx.messages
    assert [m.rcpt_tos for m in msgs] == [["ok@self.test"], ["later@self.test", "ok@self.test"]]


def test_banner_and_ehlo_refusal_and_drop(mx_servers):
    port = shared_port(HOSTS)
    mx = mx_servers(HOSTS[0], port, name="mx1.self.test")
    mx.set_reply("banner", first_n(1, "554 5.3.2 No service"))
    with RawSMTP(HOSTS[0], port) as c:
        assert c.banner.last == "554 5.3.2 No service"
        c.expect("QUIT", "221")
    mx.set_reply("ehlo", first_n(1, "502 5.5.2 No EHLO"))
    with RawSMTP(HOSTS[0], port) as c:
        c.expect("EHLO r.test", "502")
        c.expect("HELO r.test", "250")
        c.expect("MAIL FROM:<a@x.test>", "250")
        c.expect("RCPT TO:<b@y.test>", "250")
        c.expect("DATA", "354")
        c.send(b"Subject: z\r\n\r\nbody\r\n.\r\n")
        assert c.read_reply().code == 250
    assert mx.messages[0].verb == "HELO"
    mx.drop_in_data(1)
    with RawSMTP(HOSTS[0], port) as c:
        c.ehlo()
        c.expect("MAIL FROM:<a@x.test>", "250")
        c.expect("RCPT TO:<b@y.test>", "250")
        c.expect("DATA", "354")
        c.send(b"Subject: z\r\n")
        assert c.wait_closed(5), "no close mid-DATA"
    assert len(mx.messages) == 1
    assert mx.all_transactions()[-1].dropped


def test_dsn_params_are_accepted_and_recorded(mx_servers):
    port = shared_port(HOSTS)
    mx = mx_servers(HOSTS[1], port, name="mx2.self.test", dsn=True)
    with RawSMTP(HOSTS[1], port) as c:
        r = c.cmd("EHLO r.test")
        assert "250-DSN" in r.lines, r.lines
        c.expect("MAIL FROM:<a@x.test> RET=HDRS ENVID=abc", "250")
        c.expect("RCPT TO:<b@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;B@y.test", "250")
        assert c.data(b"Subject: z\r\n\r\nbody\r\n").code == 250
    t = mx.wait_for(1, 5)[0]
    assert t.mail_params == ["RET=HDRS", "ENVID=abc"], t
    assert t.rcpt_params("b@y.test") == ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;B@y.test"], t


@pytest.mark.parametrize("unix", [True, False], ids=["unix", "tcp"])
def test_lmtp_one_reply_per_recipient(mx_servers, tmp_path, unix):
    if unix:
        srv = mx_servers(unix_path=tmp_path / "lmtp.sock", name="lmtp.self.test", lmtp=True)
        addr = srv.unix_path
    else:
        srv = mx_servers(HOSTS[0], shared_port(HOSTS), name="lmtp.self.test", lmtp=True)
        addr = (srv.host, srv.port)
    srv.set_reply("data_end", "452 4.2.2 Mailbox full", rcpt="full")
    srv.set_reply("data_end", "550 5.1.1 No such user", rcpt="gone@l.test")
    content = b"Subject: l\r\n\r\nhi\r\n"
    lhlo, rr, dr = lmtp_exchange(addr, ["a@l.test", "full@l.test", "gone@l.test"], content,
                                 unix=unix)
    assert lhlo[0].startswith("250-lmtp.self.test"), lhlo
    assert rr == ["250 2.1.5 Ok"] * 3, rr
    assert dr == ["250 2.0.0 Ok: queued", "452 4.2.2 Mailbox full",
                  "550 5.1.1 No such user"], dr
    t = srv.wait_for(1, 5)[0]
    assert t.verb == "LHLO" and t.helo == "petrel.test" and t.data == content, t
    assert t.delivered_to == ["a@l.test"], t
