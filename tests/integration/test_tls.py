"""TLS on both sides of petrel, with a throwaway CA made in each test (tls_certs.py).

Receiving: swaks --tls against a `tls: starttls` listener (the stored Received
header says ESMTPS and names the cipher), swaks --tlsc against a `tls:
implicit` listener, STARTTLS command injection over a raw socket (nothing
pipelined behind STARTTLS runs, before or after the handshake), the
certificate chosen by SNI (tls.certificates), the start-up line without a
certificate. Delivering: to an aiosmtpd MX offering STARTTLS (the MX sees a
TLS session, petrel logs tls=, cipher=, verify=), `delivery.tls: required`
to an MX without STARTTLS (deferred with 4.7.4), opportunistic delivery to
one (plaintext), a handshake that fails (deferred with 4.7.5, never retried
in plaintext), and TLS session resumption on a second delivery to the same
MX.

Addresses: 127.0.7.x for the MXes (DNS answers from a dnsmasq on a loopback
port). petrel trusts the test CA through SSL_CERT_FILE (OpenSSL's default
verify paths), set in its environment.
"""

import re
import socket
import ssl
import subprocess
import time

import pytest

from mx_fixture import (DELIVERY_HOSTNAME, Server, World, _SMTPServer, _TCPController,
                        check_fields, start_dns, submit, wait_delivery)
from petrel_fixture import QID_RE, free_port
from smtpwire import RawSMTP, message
from tls_certs import TestCA

SENDER = "alice@sender.tls.test"
ZONE = {
    "mx": [
        ("tls.tls.test", 10, "mx.tls.tls.test"),
        ("plain.tls.test", 10, "mx.plain.tls.test"),
        ("plain2.tls.test", 10, "mx.plain.tls.test"),
    ],
    "a": [
        ("mx.tls.tls.test", "127.0.7.2"),
        ("mx.plain.tls.test", "127.0.7.3"),
    ],
}
HOSTS = sorted({ip for _, ip in ZONE["a"]})

# The Received header petrel writes for a TLS session.
RECEIVED_TLS_RE = re.compile(
    rb"\AReceived: from (?P<helo>[^ \r\n]+) \(\[(?P<ip>[0-9a-fA-F.:]+)\]\)\r\n"
    rb"\t\(using (?P<version>TLSv1\.[23]) with cipher (?P<cipher>[A-Z0-9_-]+) "
    rb"\((?P<bits>\d+)/(?P<alg_bits>\d+) bits\)\)\r\n"
    rb"\tby petrel\.test \(petrel\) with (?P<proto>[A-Z0-9]+) id (?P<qid>[0-9A-F]{16})")


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path / "ca")


def tls_config(ca, *, sni=False):
    """tls: section with a certificate for petrel.test (and other.petrel.test by SNI)."""
    cert, key = ca.leaf("petrel.test", ips=["127.0.0.1"])
    cfg = {"cert": str(cert), "key": str(key)}
    if sni:
        ocert, okey = ca.leaf("other.petrel.test")
        cfg["certificates"] = [{"cert": str(ocert), "key": str(okey)}]
    return cfg


def run_swaks(host, port, *args):
    cmd = ["swaks", "--server", host, "--port", str(port), "--from", "alice@example.org",
           "--to", "bob@local.test", "--helo", "swaks.test", "--timeout", "10"]
    cp = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60,
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"swaks exit {cp.returncode}, want 0\n{cp.stdout}\n{cp.stderr}"
    return cp.stdout


def swaks_qid(out):
    m = re.search(r"^<~?\s+250 2\.0\.0 Ok: queued as (" + QID_RE + r")$", out, re.M)
    assert m, f"swaks transcript has no '250 2.0.0 Ok: queued as <QID>':\n{out}"
    return m.group(1)


def check_received_tls(stored, qid, helo="swaks.test", proto="ESMTPS"):
    m = RECEIVED_TLS_RE.match(stored)
    assert m, f"stored message does not start with a TLS Received header:\n{stored[:400]!r}"
    got = {k: v.decode() for k, v in m.groupdict().items()}
    assert got["helo"] == helo and got["qid"] == qid and got["proto"] == proto, \
        f"Received: got {got}, want helo={helo} qid={qid} proto={proto}"
    assert got["version"] == "TLSv1.3", f"Received: got {got['version']}, want TLSv1.3"
    assert int(got["bits"]) >= 128, f"Received: cipher bits {got['bits']}"
    return got


# ---------------------------------------------------------------- receiving


def test_swaks_starttls_message_is_queued_with_esmtps_received(petrel, ca):
    p = petrel(config={"tls": tls_config(ca)}, listener={"tls": "starttls"})
    with RawSMTP(p.host, p.port) as c:
        r = c.cmd("EHLO client.test")
        assert "250-STARTTLS" in r.lines, f"EHLO: got {r.lines}, want 250-STARTTLS"
    out = run_swaks(p.host, p.port, "--tls", "--tls-verify", "--tls-ca-path", str(ca.cert),
                    "--body", "over starttls")
    assert "TLS started" in out, f"swaks did not start TLS:\n{out}"
    qid = swaks_qid(out)
    got = check_received_tls(p.queue_cat(qid), qid)
    m = p.wait_log(r"starttls: session=\d+, client=\[127\.0\.0\.1\]:\d+, tls=TLSv1\.3, "
                   r"cipher=(\S+) \(\d+/\d+ bits\)")
    assert m.group(1) == got["cipher"], f"log cipher {m.group(1)}, Received {got['cipher']}"
    p.wait_log(re.escape(qid) + r": queued: .*proto=ESMTPS, .*tls=TLSv1\.3, cipher=")


def test_swaks_tlsc_against_an_implicit_listener(petrel, ca):
    p = petrel(config={"tls": tls_config(ca)}, listener={"tls": "starttls"}, start=False)
    port2 = free_port()
    p.config_overrides["listeners"] = [
        {"name": "default", "address": f"{p.host}:{p.port}", "tls": "starttls"},
        {"name": "smtps", "address": f"{p.host}:{port2}", "tls": "implicit"},
    ]
    p.start()
    out = run_swaks(p.host, port2, "--tlsc", "--tls-verify", "--tls-ca-path", str(ca.cert),
                    "--body", "over implicit tls")
    qid = swaks_qid(out)
    check_received_tls(p.queue_cat(qid), qid)
    p.wait_log(r"tls established: session=\d+, client=\[127\.0\.0\.1\]:\d+, tls=TLSv1\.3")
    # no plaintext banner on the implicit port
    with socket.create_connection((p.host, port2), timeout=5) as s:
        s.settimeout(1.0)
        with pytest.raises(socket.timeout):
            data = s.recv(100)
            raise AssertionError(f"implicit-TLS port sent plaintext: {data!r}")


def test_starttls_injected_commands_are_not_executed(petrel, ca):
    p = petrel(config={"tls": tls_config(ca)}, listener={"tls": "starttls"})
    with RawSMTP(p.host, p.port) as c:
        c.cmd("EHLO client.test")
        # CVE-2011-0411: commands in the same packet as STARTTLS
        c.send("STARTTLS\r\nRSET\r\nMAIL FROM:<evil@example.com>\r\n")
        r = c.read_reply()
        assert r.lines == ["220 2.0.0 Ready to start TLS"], f"got {r!r}"
        # nothing else arrives in plaintext: the server waits for our ClientHello
        c.sock.settimeout(1.0)
        with pytest.raises(socket.timeout):
            extra = c.sock.recv(100)
            raise AssertionError(f"more plaintext after the 220: {extra!r}")
        c.sock.settimeout(c.timeout)
        assert not c.buf, f"bytes buffered after the 220: {bytes(c.buf)!r}"
        c.sock = ca.client_context().wrap_socket(c.sock, server_hostname="petrel.test")
        assert c.sock.version() == "TLSv1.3", f"got {c.sock.version()}"
        # the injected RSET was not answered: NOOP's reply is the first one
        r = c.cmd("NOOP")
        assert r.lines == ["250 2.0.0 Ok"], f"got {r!r}"
        c.sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            extra = c.sock.recv(100)
            raise AssertionError(f"a reply for an injected command: {extra!r}")
        c.sock.settimeout(c.timeout)
        # and the injected MAIL made no transaction: the session starts over
        r = c.cmd("MAIL FROM:<alice@example.org>")
        assert r.lines == ["503 5.5.1 Error: send HELO/EHLO first"], f"got {r!r}"
        r = c.cmd("EHLO client.test")
        assert "250-STARTTLS" not in r.lines, f"STARTTLS offered again: {r.lines}"
        r = c.cmd("STARTTLS")
        assert r.lines == ["503 5.5.1 Error: TLS already active"], f"got {r!r}"
        c.cmd("QUIT")
    p.wait_log(r"starttls injection discarded: session=\d+, client=\S+, size=\d+")
    assert p.queue_list().empty


def test_sni_chooses_the_certificate(petrel, ca):
    p = petrel(config={"tls": tls_config(ca, sni=True)}, start=False)
    port2 = free_port()
    p.config_overrides["listeners"] = [
        {"name": "default", "address": f"{p.host}:{p.port}"},
        {"name": "smtps", "address": f"{p.host}:{port2}", "tls": "implicit"},
    ]
    p.start()
    for name in ("other.petrel.test", "petrel.test"):
        ctx = ca.client_context()
        with socket.create_connection((p.host, port2), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname=name) as s:
                cn = dict(x[0] for x in s.getpeercert()["subject"])["commonName"]
                assert cn == name, f"SNI {name}: got a certificate for {cn}"
                s.settimeout(10)
                banner = s.recv(200)
                assert banner.startswith(b"220 petrel.test ESMTP"), f"got {banner!r}"
                s.sendall(b"QUIT\r\n")
    p.wait_log(r"tls established: .*sni=other\.petrel\.test")


def test_without_a_certificate_starttls_is_not_offered(petrel):
    p = petrel()
    p.wait_log(r"TLS: no certificate configured; STARTTLS not offered")
    with RawSMTP(p.host, p.port) as c:
        r = c.cmd("EHLO client.test")
        assert not any("STARTTLS" in line for line in r.lines), f"got {r.lines}"
        assert c.cmd("STARTTLS").lines == ["502 5.5.1 Error: command not implemented"]


# ---------------------------------------------------------------- delivering


class _TlsSMTPServer(_SMTPServer):
    """aiosmtpd makes a new session after STARTTLS: keep the fixture's record, note TLS."""

    def connection_made(self, transport):
        conn = getattr(getattr(self, "session", None), "petrel_conn", None)
        super().connection_made(transport)
        if conn is not None:
            self.session.petrel_conn = conn
            if self.session.ssl is not None:
                obj = self.session.ssl.get("ssl_object")
                conn.tls = (obj.version(), obj.cipher()[0], obj.session_reused)


class TlsServer(Server):
    """An MX (mx_fixture.Server) offering STARTTLS with tls_context."""

    def __init__(self, *a, tls_context=None, **kw):
        super().__init__(*a, **kw)
        self.tls_context = tls_context

    def start(self):
        from mx_fixture import Handler
        handler = Handler(self)
        kw = dict(ready_timeout=10, enable_SMTPUTF8=True, decode_data=False,
                  server_hostname=self.name, tls_context=self.tls_context)
        self.ctl = _TCPController(_TlsSMTPServer, handler, hostname=self.host, port=self.port,
                                  **kw)
        self.ctl.start()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with self.lock:
                if self.connections:
                    break
            time.sleep(0.01)
        with self.lock:
            self.connections.clear()
            self.transactions.clear()
        return self


@pytest.fixture
def world(request, petrel, mx_servers, monkeypatch, ca):
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))  # petrel trusts the test CA
    dns = start_dns(request, ZONE)
    w = World(petrel, mx_servers, dns, HOSTS)

    def tls_mx(ip, name):
        cert, key = ca.leaf(name)
        s = TlsServer(ip, w.port, name=name, tls_context=ca.server_context(cert, key))
        s.start()
        request.addfinalizer(s.stop)
        return s

    w.tls_mx = tls_mx
    return w


def delivery_line_fields(d):
    line = d["line"]
    out = {}
    for k in ("tls", "cipher", "verify", "resumed"):
        m = re.search(r"\b" + k + r"=([^,]+(?: \([^)]*\))?)", line)
        if m:
            out[k] = m.group(1)
    return out


def test_delivery_to_a_starttls_mx_is_encrypted_and_logged(world):
    mx = world.tls_mx("127.0.7.2", "mx.tls.tls.test")
    p = world.start()
    content = message("over tls", sender=SENDER, to="bob@tls.tls.test")
    qid = submit(p, SENDER, ["bob@tls.tls.test"], content)
    t = mx.wait_for(1, 15)[0]
    tls = getattr(t.conn, "tls", None)
    assert tls is not None, f"the MX saw no TLS session: {mx.describe()}"
    assert tls[0] == "TLSv1.3", f"MX side: got {tls}"
    assert (t.verb, t.helo) == ("EHLO", DELIVERY_HOSTNAME)
    d = wait_delivery(p, qid, "bob@tls.tls.test", "sent")
    check_fields(d, relay=f"mx.tls.tls.test[127.0.7.2]:{world.port}")
    f = delivery_line_fields(d)
    assert f.get("tls") == "TLSv1.3", f"log tls: got {f}, line: {d['line']}"
    assert f.get("cipher") == tls[1], f"log cipher {f.get('cipher')}, MX cipher {tls[1]}"
    assert f.get("verify") == "ok", f"log verify: got {f.get('verify')}, line: {d['line']}"
    assert f.get("resumed") == "no", f"log resumed: got {f.get('resumed')}"
    p.wait_log(r"tls established: relay=mx\.tls\.tls\.test\[127\.0\.7\.2\]:\d+, tls=TLSv1\.3, "
               r"cipher=\S+, verify=ok, resumed=no, peer_cn=mx\.tls\.tls\.test")


def test_second_delivery_to_the_same_mx_resumes_the_tls_session(world):
    mx = world.tls_mx("127.0.7.2", "mx.tls.tls.test")
    # one message per connection: the second delivery makes a new TLS connection
    p = world.start(extra={"delivery": {
        "hostname": DELIVERY_HOSTNAME, "port": world.port, "connection_cache_time": "1s",
        "max_messages_per_connection": 1,
        "timeouts": {"connect": "3s", "greeting": "10s", "command": "10s"}}})
    q1 = submit(p, SENDER, ["bob@tls.tls.test"], message("first", sender=SENDER))
    wait_delivery(p, q1, "bob@tls.tls.test", "sent")
    mx.wait_for(1, 15)
    q2 = submit(p, SENDER, ["carol@tls.tls.test"], message("second", sender=SENDER))
    d2 = wait_delivery(p, q2, "carol@tls.tls.test", "sent")
    txns = mx.wait_for(2, 15)
    assert txns[0].conn is not txns[1].conn, "both messages went over one connection"
    f = delivery_line_fields(d2)
    assert f.get("resumed") == "yes", f"second delivery: got {f}, line: {d2['line']}"
    assert txns[1].conn.tls[2] is True, f"the MX did not see a resumed session: {txns[1].conn.tls}"


def test_required_tls_to_an_mx_without_starttls_defers(world):
    mx = world.mx("127.0.7.3", "mx.plain.tls.test")
    p = world.start(extra={"delivery": {
        "hostname": DELIVERY_HOSTNAME, "port": world.port, "tls": "required",
        "timeouts": {"connect": "3s", "greeting": "10s", "command": "10s"}}})
    qid = submit(p, SENDER, ["bob@plain.tls.test"], message("must be encrypted",
                                                              sender=SENDER))
    d = wait_delivery(p, qid, "bob@plain.tls.test", "deferred")
    check_fields(d, dsn="4.7.4",
                 reply=re.compile(r"451 4\.7\.4 TLS required but not offered by "
                                  r"mx\.plain\.tls\.test\[127\.0\.7\.3\]:\d+"))
    assert not mx.all_transactions(), f"a transaction in plaintext: {mx.describe()}"
    conns = mx.all_connections()
    assert conns and conns[0].verb == "EHLO", f"got {conns}"


def test_route_tls_required_overrides_opportunistic_delivery(world):
    """routes[].tls: one domain's route requires TLS while delivery.tls stays
    opportunistic: its MX without STARTTLS defers, another domain's mail to
    the same MX goes in plaintext."""
    mx = world.mx("127.0.7.3", "mx.plain.tls.test")
    p = world.start(extra={"routes": [{"domain": "plain.tls.test", "via": "mx",
                                       "tls": "required"}]})
    qid = submit(p, SENDER, ["bob@plain.tls.test"], message("must be encrypted",
                                                              sender=SENDER))
    d = wait_delivery(p, qid, "bob@plain.tls.test", "deferred")
    check_fields(d, dsn="4.7.4",
                 reply=re.compile(r"451 4\.7\.4 TLS required but not offered by "
                                  r"mx\.plain\.tls\.test\[127\.0\.7\.3\]:\d+"))
    assert not mx.all_transactions(), f"a transaction in plaintext: {mx.describe()}"
    # the global policy is untouched: no route, opportunistic, plaintext is fine
    qid2 = submit(p, SENDER, ["carol@plain2.tls.test"], message("plain", sender=SENDER))
    mx.wait_for(1, 15)
    wait_delivery(p, qid2, "carol@plain2.tls.test", "sent")


def test_opportunistic_tls_to_an_mx_without_starttls_is_plaintext(world):
    mx = world.mx("127.0.7.3", "mx.plain.tls.test")
    p = world.start()
    qid = submit(p, SENDER, ["bob@plain.tls.test"], message("plain", sender=SENDER))
    mx.wait_for(1, 15)
    d = wait_delivery(p, qid, "bob@plain.tls.test", "sent")
    assert "tls=" not in d["line"], f"plaintext delivery logged with TLS: {d['line']}"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_failed_handshake_defers_and_is_never_retried_in_plaintext(world, ca):
    cert, key = ca.leaf("mx.tls.tls.test")
    ctx = ca.server_context(cert, key)
    # petrel speaks TLS 1.2+ only: an MX stuck at TLS 1.1 cannot agree
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    mx = TlsServer("127.0.7.2", world.port, name="mx.tls.tls.test", tls_context=ctx)
    mx.start()
    try:
        p = world.start(retry={"schedule": ["1h"], "max_attempts": 3, "max_age": "1d"})
        qid = submit(p, SENDER, ["bob@tls.tls.test"], message("no downgrade", sender=SENDER))
        d = wait_delivery(p, qid, "bob@tls.tls.test", "deferred")
        check_fields(d, dsn="4.7.5",
                     reply=re.compile(r"451 4\.7\.5 TLS handshake with "
                                      r"mx\.tls\.tls\.test\[127\.0\.7\.2\]:\d+ failed: .+"))
        time.sleep(0.5)
        assert not mx.all_transactions(), f"mail sent after a failed handshake: {mx.describe()}"
        conns = mx.all_connections()
        assert len(conns) == 1, f"want one connection (no plaintext retry), got {conns}"
    finally:
        mx.stop()


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1:DeprecationWarning")
def test_tls_fallback_retries_the_same_mx_in_plaintext_when_configured(world, ca):
    """delivery.tls_fallback: true (opportunistic only): after the failed
    handshake petrel connects to the same MX again without STARTTLS and
    delivers; the log says why."""
    cert, key = ca.leaf("mx.tls.tls.test")
    ctx = ca.server_context(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1
    ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    mx = TlsServer("127.0.7.2", world.port, name="mx.tls.tls.test", tls_context=ctx)
    mx.start()
    try:
        p = world.start(extra={"delivery": {
            "hostname": DELIVERY_HOSTNAME, "port": world.port, "tls_fallback": True,
            "timeouts": {"connect": "3s", "greeting": "10s", "command": "10s"}}})
        qid = submit(p, SENDER, ["bob@tls.tls.test"], message("fallback", sender=SENDER))
        d = wait_delivery(p, qid, "bob@tls.tls.test", "sent")
        assert "tls=" not in d["line"], f"delivered over TLS? {d['line']}"
        p.wait_log(r"relay=mx\.tls\.tls\.test\[127\.0\.7\.2\]:\d+: 451 4\.7\.5 TLS handshake "
                   r"with .* failed: .*; trying again in plaintext \(delivery\.tls_fallback\)")
        txns = mx.wait_for(1, 15)
        conns = mx.all_connections()
        assert len(conns) == 2, f"want the failed TLS connection and a plaintext one: {conns}"
        tls = getattr(txns[0].conn, "tls", None)
        assert not tls, f"the message went over TLS: {tls}"
    finally:
        mx.stop()
