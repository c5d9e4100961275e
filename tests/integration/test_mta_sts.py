"""MTA-STS (RFC 8461) on outbound delivery, with `delivery.mta_sts: true`.

dnsmasq serves, per recipient domain, the MX, the _mta-sts TXT record
("v=STSv1; id=...") and the A record of mta-sts.<domain>; a small Python
HTTPS server on 127.0.85.10:443 serves /.well-known/mta-sts.txt (the policy
chosen by the Host header) with a certificate from a throwaway TestCA that
petrel trusts through SSL_CERT_FILE (OpenSSL's default verify paths). The
MXes are aiosmtpd servers on 127.0.85.x, with STARTTLS (TlsServer of
test_tls.py, certificate from the same CA) or without.

Cases: enforce + a listed MX (wildcard pattern) with a valid certificate →
delivered over TLS, mta_sts=enforce logged, the policy fetched once over
HTTPS; enforce + an MX the policy does not list → deferred 4.7.5, nothing
received; enforce + an MX without STARTTLS → deferred 4.7.4; testing + an
unlisted MX without STARTTLS → delivered in plaintext, the would-be failure
logged; enforce + an MX whose certificate is for another name → deferred
4.7.5; a policy served with a certificate for another name → fetch-failed,
delivered as without a policy.
"""

import http.server
import re
import ssl
import threading

import pytest

from dns_fixture import DnsServer
from mx_fixture import DELIVERY_HOSTNAME, World, check_fields, submit, wait_delivery
from smtpwire import message
from test_tls import TlsServer
from tls_certs import TestCA

SENDER = "alice@sender.sts.test"
HTTPS_IP = "127.0.85.10"
MX_ENFORCE = ("mx1.enforce.sts.test", "127.0.85.2")   # TLS, listed by a wildcard
MX_OTHER = ("mx.other.sts.test", "127.0.85.3")        # TLS, listed by no policy
MX_PLAIN = ("mx.plain.sts.test", "127.0.85.4")        # no STARTTLS
HOSTS = [MX_ENFORCE[1], MX_OTHER[1], MX_PLAIN[1]]

POLICIES = {
    "enforce.sts.test": "version: STSv1\r\nmode: enforce\r\nmx: *.enforce.sts.test\r\n"
                        "max_age: 86400\r\n",
    "unlisted.sts.test": "version: STSv1\r\nmode: enforce\r\nmx: mx.unlisted.sts.test\r\n"
                         "max_age: 86400\r\n",
    "notls.sts.test": "version: STSv1\nmode: enforce\nmx: mx.plain.sts.test\nmax_age: 86400\n",
    "testing.sts.test": "version: STSv1\nmode: testing\nmx: mx.testing.sts.test\n"
                        "max_age: 86400\n",
    "badcert.sts.test": "version: STSv1\nmode: enforce\nmx: mx.testing.sts.test\n"
                        "max_age: 86400\n",
    "mxcert.sts.test": "version: STSv1\nmode: enforce\nmx: mx.other.sts.test\n"
                       "max_age: 86400\n",
}
MX_OF = {
    "enforce.sts.test": MX_ENFORCE[0],
    "unlisted.sts.test": MX_OTHER[0],
    "notls.sts.test": MX_PLAIN[0],
    "testing.sts.test": MX_PLAIN[0],
    "badcert.sts.test": MX_PLAIN[0],
    "mxcert.sts.test": MX_OTHER[0],
}


def zone():
    recs = []
    for dom, mx in MX_OF.items():
        recs += [f"{dom} MX 10 {mx}", f"_mta-sts.{dom} TXT v=STSv1; id={dom.split('.')[0]}1",
                 f"mta-sts.{dom} A {HTTPS_IP}"]
    for name, ip in (MX_ENFORCE, MX_OTHER, MX_PLAIN):
        recs.append(f"{name} A {ip}")
    return recs


class PolicyServer:
    """HTTPS on HTTPS_IP:443 serving POLICIES by Host; records (host, path) requested."""

    def __init__(self, ca, tmp_path):
        names = [f"mta-sts.{d}" for d in POLICIES if d != "badcert.sts.test"]
        cert, key = ca.leaf(names[0], extra_names=names[1:])
        self.requests = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                host = (self.headers.get("Host") or "").lower()
                outer.requests.append((host, self.path))
                body = POLICIES.get(host.removeprefix("mta-sts."))
                if self.path != "/.well-known/mta-sts.txt" or body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer((HTTPS_IP, 443), H)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(str(cert), str(key))
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def world(request, petrel, mx_servers, monkeypatch, tmp_path):
    ca = TestCA(tmp_path / "ca")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca.cert))  # petrel trusts the test CA
    dns = DnsServer(tmp_path, records=zone(), name="dnsmasq-sts")
    request.addfinalizer(dns.stop)
    dns.start()
    https = PolicyServer(ca, tmp_path)
    request.addfinalizer(https.stop)
    w = World(petrel, mx_servers, dns, HOSTS)
    w.https = https

    def tls_mx(ip, name, cert_name=None):
        cert, key = ca.leaf(cert_name or name)
        s = TlsServer(ip, w.port, name=name, tls_context=ca.server_context(cert, key))
        s.start()
        request.addfinalizer(s.stop)
        return s

    w.tls_mx = tls_mx

    def start():
        return w.start(extra={"delivery": {
            "hostname": DELIVERY_HOSTNAME, "port": w.port, "mta_sts": True,
            "connection_cache_time": "1s",
            "timeouts": {"connect": "3s", "greeting": "10s", "command": "10s"}}})

    w.start_sts = start
    return w


def field(d, name):
    m = re.search(r"\b" + name + r"=([^,(]*?(?: \([^)]*\))?)(?=,|$)", d["line"])
    return m.group(1) if m else None


def test_enforce_listed_mx_with_valid_certificate_is_delivered(world):
    mx = world.tls_mx(MX_ENFORCE[1], MX_ENFORCE[0])
    p = world.start_sts()
    rcpt = "bob@enforce.sts.test"
    qid = submit(p, SENDER, [rcpt], message("enforced", sender=SENDER, to=rcpt))
    d = wait_delivery(p, qid, rcpt, "sent")
    t = mx.wait_for(1, 15)[0]
    assert getattr(t.conn, "tls", None), f"the MX saw no TLS session: {mx.describe()}"
    assert field(d, "verify") == "ok", f"line: {d['line']}"
    assert field(d, "mta_sts") == "enforce (id enforce1)", f"line: {d['line']}"
    assert world.https.requests == [("mta-sts.enforce.sts.test", "/.well-known/mta-sts.txt")], \
        f"policy requests: {world.https.requests}"
    # a second message uses the cached policy: no second fetch
    qid2 = submit(p, SENDER, [rcpt], message("again", sender=SENDER, to=rcpt))
    d2 = wait_delivery(p, qid2, rcpt, "sent")
    assert field(d2, "mta_sts") == "enforce (id enforce1)", f"line: {d2['line']}"
    assert len(world.https.requests) == 1, f"policy fetched again: {world.https.requests}"


def test_enforce_mx_not_in_policy_is_deferred_and_nothing_sent(world):
    mx = world.tls_mx(MX_OTHER[1], MX_OTHER[0])
    p = world.start_sts()
    rcpt = "bob@unlisted.sts.test"
    qid = submit(p, SENDER, [rcpt], message("not listed", sender=SENDER, to=rcpt))
    d = wait_delivery(p, qid, rcpt, "deferred")
    check_fields(d, dsn="4.7.5",
                 reply=re.compile(r"451 4\.7\.5 MTA-STS policy of unlisted\.sts\.test does not "
                                  r"list MX mx\.other\.sts\.test\[127\.0\.85\.3\]:\d+"))
    assert not mx.all_transactions(), f"mail reached an unlisted MX: {mx.describe()}"


def test_enforce_mx_without_starttls_is_deferred(world):
    mx = world.mx(MX_PLAIN[1], MX_PLAIN[0])
    p = world.start_sts()
    rcpt = "bob@notls.sts.test"
    qid = submit(p, SENDER, [rcpt], message("no tls", sender=SENDER, to=rcpt))
    d = wait_delivery(p, qid, rcpt, "deferred")
    check_fields(d, dsn="4.7.4",
                 reply=re.compile(r"451 4\.7\.4 TLS required by MTA-STS but not offered by "
                                  r"mx\.plain\.sts\.test\[127\.0\.85\.4\]:\d+"))
    assert not mx.all_transactions(), f"a transaction in plaintext: {mx.describe()}"


def test_enforce_mx_certificate_for_another_name_is_deferred(world):
    mx = world.tls_mx(MX_OTHER[1], MX_OTHER[0], cert_name="wrong.sts.test")
    p = world.start_sts()
    rcpt = "bob@mxcert.sts.test"
    qid = submit(p, SENDER, [rcpt], message("wrong cert", sender=SENDER, to=rcpt))
    d = wait_delivery(p, qid, rcpt, "deferred")
    check_fields(d, dsn="4.7.5",
                 reply=re.compile(r"451 4\.7\.5 MTA-STS certificate verification failed for "
                                  r"mx\.other\.sts\.test\[127\.0\.85\.3\]:\d+: .+"))
    assert not mx.all_transactions(), f"mail sent over an unverified TLS: {mx.describe()}"


def test_testing_mode_delivers_and_logs_what_would_fail(world):
    mx = world.mx(MX_PLAIN[1], MX_PLAIN[0])
    p = world.start_sts()
    rcpt = "bob@testing.sts.test"
    qid = submit(p, SENDER, [rcpt], message("testing", sender=SENDER, to=rcpt))
    d = wait_delivery(p, qid, rcpt, "sent")
    assert mx.wait_for(1, 15), "nothing delivered"
    assert field(d, "mta_sts") == ("testing (would fail: MX mx.plain.sts.test not listed in "
                                   "the policy)"), f"line: {d['line']}"


def test_policy_with_a_bad_certificate_is_a_fetch_failure(world):
    mx = world.mx(MX_PLAIN[1], MX_PLAIN[0])
    p = world.start_sts()
    rcpt = "bob@badcert.sts.test"
    qid = submit(p, SENDER, [rcpt], message("bad cert", sender=SENDER, to=rcpt))
    d = wait_delivery(p, qid, rcpt, "sent")  # as without a policy
    assert mx.wait_for(1, 15), "nothing delivered"
    got = field(d, "mta_sts") or ""
    assert got.startswith("fetch-failed (certificate of mta-sts.badcert.sts.test:"), \
        f"line: {d['line']}"
    assert not world.https.requests, f"a request after a failed verification: " \
                                     f"{world.https.requests}"
