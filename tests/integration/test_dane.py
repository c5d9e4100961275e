"""Outbound DANE (RFC 7672): `delivery.tls: dane` against an MX with TLSA records.

How the test gets the AD bit: petrel trusts the AD bit of its resolver (the
resolver must validate DNSSEC, like Postfix's smtp_dns_support_level =
dnssec with a local validating cache). The test's resolver, AdDns below, is
a small DNS server in this file (dnspython, UDP on a loopback port) that
answers the test zone and sets AD in its answers when told to, as a
validating resolver does for a signed zone; nothing is signed. It is both
petrel's dns.resolvers entry (MX and A lookups through libunbound) and the
server its TLSA lookups go to. It records every query with the AD and DO
bits the query carried.

The MX (an aiosmtpd server offering STARTTLS, test_tls.TlsServer) has a
certificate from a throwaway CA that petrel does not trust: a delivery that
says dane=verified was authenticated by the TLSA record alone (DANE-EE,
3 1 1: SHA2-256 of the certificate's SubjectPublicKeyInfo).

Cases: a matching TLSA record (delivered over TLS, dane=verified); a
TLSA record that does not match (deferred with 4.7.5, nothing received);
the AD bit clear (delivered opportunistically, dane=insecure); no TLSA
record (opportunistic, dane=none); TLSA records and an MX without STARTTLS
(deferred with 4.7.4); a TLSA lookup that fails with SERVFAIL (deferred
with 4.4.3, no STARTTLS, no mail).

Addresses: 127.0.61.x.
"""

import re
import socket
import subprocess
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from mx_fixture import DELIVERY_HOSTNAME, World, check_fields, submit, wait_delivery
from smtpwire import message
from test_tls import TlsServer
from tls_certs import TestCA

DOMAIN = "dane.test"
MX_NAME = "mx.dane.test"
MX_IP = "127.0.61.2"
SENDER = "alice@sender.dane.test"
RCPT = "bob@dane.test"
WRONG_SHA256 = "00" * 31 + "01"


class AdDns:
    """A UDP DNS server answering from self.records, with the AD bit when self.ad."""

    def __init__(self, host="127.0.0.1"):
        self.host = host
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.records = {}        # (name without dot, TYPE) -> [rdata text]
        self.ad = True
        self.servfail = set()    # (name, TYPE) answered with SERVFAIL
        self.queries = []        # (name, TYPE, ad bit, do bit) as received
        self.lock = threading.Lock()
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def add(self, name, rtype, *rdatas):
        with self.lock:
            self.records.setdefault((name, rtype), []).extend(rdatas)

    def _answer(self, q):
        r = dns.message.make_response(q)
        question = q.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rtype = dns.rdatatype.to_text(question.rdtype)
        with self.lock:
            self.queries.append((name, rtype, bool(q.flags & dns.flags.AD),
                                 bool(q.ednsflags & dns.flags.DO)))
            if (name, rtype) in self.servfail:
                r.set_rcode(dns.rcode.SERVFAIL)
                return r
            rdatas = self.records.get((name, rtype))
            if rdatas:
                r.answer.append(dns.rrset.from_text_list(question.name, 300, "IN", rtype,
                                                         rdatas))
            elif not any(n == name for n, _ in self.records):
                r.set_rcode(dns.rcode.NXDOMAIN)
            if self.ad:
                r.flags |= dns.flags.AD
        return r

    def _serve(self):
        while not self.stopping:
            try:
                data, peer = self.sock.recvfrom(65535)
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                q = dns.message.from_wire(data)
                wire = self._answer(q).to_wire()
            except Exception:  # noqa: BLE001 - a packet we cannot parse gets no answer
                continue
            self.sock.sendto(wire, peer)

    def tlsa_queries(self):
        with self.lock:
            return [x for x in self.queries if x[1] == "TLSA"]

    def stop(self):
        self.stopping = True
        self.thread.join(timeout=5)
        self.sock.close()


def spki_sha256(cert_path):
    """SHA2-256 of the certificate's DER SubjectPublicKeyInfo (TLSA selector 1, type 1)."""
    pub = subprocess.run(["openssl", "x509", "-in", str(cert_path), "-noout", "-pubkey"],
                         capture_output=True, check=True, timeout=30).stdout
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pub,
                         capture_output=True, check=True, timeout=30).stdout
    out = subprocess.run(["openssl", "dgst", "-sha256", "-r"], input=der, capture_output=True,
                         check=True, timeout=30).stdout.decode()
    return out.split()[0]


@pytest.fixture
def world(request, petrel, mx_servers, tmp_path):
    ca = TestCA(tmp_path / "ca")
    dns_srv = AdDns()
    request.addfinalizer(dns_srv.stop)
    dns_srv.add(DOMAIN, "MX", f"10 {MX_NAME}.")
    dns_srv.add(MX_NAME, "A", MX_IP)
    w = World(petrel, mx_servers, dns_srv, [MX_IP])
    w.ca = ca

    def tls_mx():
        cert, key = ca.leaf(MX_NAME)
        s = TlsServer(MX_IP, w.port, name=MX_NAME, tls_context=ca.server_context(cert, key))
        s.start()
        request.addfinalizer(s.stop)
        return s, cert

    def tlsa(rdata):
        dns_srv.add(f"_{w.port}._tcp.{MX_NAME}", "TLSA", rdata)

    def start():
        return w.start(retry={"schedule": ["1h"], "max_attempts": 3, "max_age": "1d"},
                       extra={"delivery": {
                           "hostname": DELIVERY_HOSTNAME, "port": w.port, "tls": "dane",
                           "connection_cache_time": "1s",
                           "timeouts": {"connect": "3s", "greeting": "10s", "command": "10s"}}})

    w.tls_mx = tls_mx
    w.tlsa = tlsa
    w.start_dane = start
    return w


def fields(d):
    out = {}
    for k in ("tls", "verify", "dane"):
        m = re.search(r"\b" + k + r"=([^,(]+?(?: \([^)]*\))?)(?=, |$)", d["line"])
        if m:
            out[k] = m.group(1)
    return out


def test_matching_tlsa_is_delivered_and_logged_verified(world):
    mx, cert = world.tls_mx()
    world.tlsa(f"3 1 1 {spki_sha256(cert)}")
    p = world.start_dane()
    qid = submit(p, SENDER, [RCPT], message("dane", sender=SENDER, to=RCPT))
    t = mx.wait_for(1, 15)[0]
    assert getattr(t.conn, "tls", None) is not None, f"the MX saw no TLS: {mx.describe()}"
    d = wait_delivery(p, qid, RCPT, "sent")
    f = fields(d)
    assert f.get("dane") == "verified", f"dane: got {f}, line: {d['line']}"
    # the CA is not trusted: the certificate verified through its TLSA record
    assert f.get("verify") == "ok", f"verify: got {f}, line: {d['line']}"
    p.wait_log(r"tls established: relay=mx\.dane\.test\[127\.0\.61\.2\]:\d+, tls=TLSv1\.3, "
               r"cipher=\S+, verify=ok, resumed=no, dane=verified")
    tq = world.dns.tlsa_queries()
    assert tq and tq[0][0] == f"_{world.port}._tcp.{MX_NAME}", f"TLSA queries: {tq}"
    assert tq[0][2] and tq[0][3], f"the TLSA query lacks the AD or DO bit: {tq}"


def test_mismatching_tlsa_defers_with_4_7_5_and_sends_nothing(world):
    mx, _cert = world.tls_mx()
    world.tlsa(f"3 1 1 {WRONG_SHA256}")
    p = world.start_dane()
    qid = submit(p, SENDER, [RCPT], message("must not arrive", sender=SENDER, to=RCPT))
    d = wait_delivery(p, qid, RCPT, "deferred")
    check_fields(d, dsn="4.7.5", reply=re.compile(
        r"451 4\.7\.5 DANE verification failed for mx\.dane\.test\[127\.0\.61\.2\]:\d+: "
        r"no matching DANE TLSA records"))
    p.wait_log(r"relay failed: relay=mx\.dane\.test\[127\.0\.61\.2\]:\d+, (?:src=\S+, )?"
               r"tls=TLSv1\.3, .*"
               r"dane=failed \(no matching DANE TLSA records\)")
    assert not mx.all_transactions(), f"mail sent despite the mismatch: {mx.describe()}"
    conns = mx.all_connections()
    assert len(conns) == 1, f"want one connection, got {conns}"


@pytest.mark.parametrize("case", ["ad clear", "no tlsa"])
def test_insecure_or_missing_tlsa_is_opportunistic(world, case):
    mx, _cert = world.tls_mx()
    if case == "ad clear":
        world.dns.ad = False
        world.tlsa(f"3 1 1 {WRONG_SHA256}")  # would fail if it were trusted
        want = "insecure (MX of dane.test not DNSSEC-validated)"
    else:
        want = f"none (no TLSA records for _{world.port}._tcp.mx.dane.test)"
    p = world.start_dane()
    qid = submit(p, SENDER, [RCPT], message("opportunistic", sender=SENDER, to=RCPT))
    t = mx.wait_for(1, 15)[0]
    assert getattr(t.conn, "tls", None) is not None, f"the MX saw no TLS: {mx.describe()}"
    d = wait_delivery(p, qid, RCPT, "sent")
    f = fields(d)
    assert f.get("dane") == want, f"dane: got {f.get('dane')!r}, want {want!r}\n{d['line']}"
    assert f.get("tls") == "TLSv1.3", f"tls: got {f}, line: {d['line']}"


def test_tlsa_and_no_starttls_defers_with_4_7_4(world):
    mx = world.mx(MX_IP, MX_NAME)  # no STARTTLS
    world.tlsa(f"3 1 1 {WRONG_SHA256}")
    p = world.start_dane()
    qid = submit(p, SENDER, [RCPT], message("needs tls", sender=SENDER, to=RCPT))
    d = wait_delivery(p, qid, RCPT, "deferred")
    check_fields(d, dsn="4.7.4", reply=re.compile(
        r"451 4\.7\.4 TLS required by DANE but not offered by "
        r"mx\.dane\.test\[127\.0\.61\.2\]:\d+"))
    assert not mx.all_transactions(), f"a transaction in plaintext: {mx.describe()}"


def test_tlsa_servfail_defers_with_4_4_3(world):
    mx, _cert = world.tls_mx()
    world.dns.servfail.add((f"_{world.port}._tcp.{MX_NAME}", "TLSA"))
    p = world.start_dane()
    qid = submit(p, SENDER, [RCPT], message("lookup fails", sender=SENDER, to=RCPT))
    d = wait_delivery(p, qid, RCPT, "deferred")
    check_fields(d, dsn="4.4.3", reply=re.compile(
        r"451 4\.4\.3 DANE TLSA lookup for mx\.dane\.test\[127\.0\.61\.2\]:\d+ failed: "
        r"TLSA lookup for _\d+\._tcp\.mx\.dane\.test: SERVFAIL"))
    assert not mx.all_transactions(), f"mail sent without a TLSA answer: {mx.describe()}"
    conns = mx.all_connections()
    assert conns and all(getattr(c, "tls", None) is None for c in conns), \
        f"STARTTLS although the lookup failed: {conns}"
