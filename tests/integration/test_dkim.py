"""opendkim as a real milter (issue 7): petrel hands each message to an
opendkim in signing mode, relays the signed message to an aiosmtpd remote MX
(route `smtp:[127.0.48.2]:port`), and the MX's copy is verified with
python3-dkim against the public key published as a TXT record by the test
DNS server (dnsmasq, dns_fixture): the verifier's lookups go to dnsmasq.

The key is made per test with opendkim-genkey (openssl if that is missing);
opendkim runs in the foreground as the current user with a config written
into tmp_path (no syslog, PidFile in tmp_path), on a TCP or a unix socket.

Skipped only when opendkim cannot run at all (not installed: Debian package
opendkim) or the verifier is missing (python3-dkim).
"""

import os
import re
import shutil
import socket
import subprocess
import time

import pytest

from dns_fixture import dns_server  # noqa: F401  (fixture)
from petrel_fixture import free_port
from test_milter import MilterWorld, body_after_received, expect_queued, mx_message, txn

dkim = pytest.importorskip("dkim", reason="python3-dkim is not installed (Debian: python3-dkim)")

OPENDKIM = shutil.which("opendkim") or "/usr/sbin/opendkim"
GENKEY = shutil.which("opendkim-genkey") or "/usr/sbin/opendkim-genkey"
MX_IP = "127.0.48.2"
DOMAIN = "signed.dkim.test"
SELECTOR = "petrel2026"
SENDER = f"alice@{DOMAIN}"
RCPT = "bob@dest.dkim.test"


def _opendkim_runs():
    """None if `opendkim -V` works, else why not."""
    if not os.access(OPENDKIM, os.X_OK):
        return f"opendkim is not installed ({OPENDKIM}; Debian package opendkim)"
    try:
        cp = subprocess.run([OPENDKIM, "-V"], capture_output=True, timeout=10,
                            stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"opendkim -V failed: {e}"
    if cp.returncode != 0 or b"OpenDKIM" not in cp.stdout + cp.stderr:
        return f"opendkim -V exited {cp.returncode}: {(cp.stdout + cp.stderr)[:300]!r}"
    return None


_WHY_NOT = _opendkim_runs()
pytestmark = pytest.mark.skipif(_WHY_NOT is not None, reason=_WHY_NOT or "")


# ---------------------------------------------------------------- key and daemon


def make_key(d):
    """(private key path, TXT record text "v=DKIM1; k=rsa; p=...")."""
    d.mkdir(parents=True, exist_ok=True)
    key = d / f"{SELECTOR}.private"
    if os.access(GENKEY, os.X_OK):
        cp = subprocess.run([GENKEY, "-b", "1024", "-D", str(d), "-d", DOMAIN, "-s", SELECTOR],
                            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert cp.returncode == 0, f"opendkim-genkey: {cp.stderr.decode(errors='replace')}"
        txt = "".join(re.findall(r'"([^"]*)"', (d / f"{SELECTOR}.txt").read_text()))
    else:
        cp = subprocess.run(["openssl", "genrsa", "-out", str(key), "1024"],
                            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert cp.returncode == 0, cp.stderr
        cp = subprocess.run(["openssl", "rsa", "-in", str(key), "-pubout", "-outform", "DER"],
                            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        assert cp.returncode == 0, cp.stderr
        import base64
        txt = "v=DKIM1; k=rsa; p=" + base64.b64encode(cp.stdout).decode()
    assert "p=" in txt, f"no public key in {txt!r}"
    os.chmod(key, 0o600)
    return key, txt


class OpenDKIM:
    def __init__(self, d, key, *, unix):
        self.dir = d
        d.mkdir(parents=True, exist_ok=True)
        if unix:
            self.path = d / "opendkim.sock"
            self.spec = f"unix:{self.path}"
            sock = f"local:{self.path}"
        else:
            self.port = free_port()
            self.spec = f"inet:{self.port}@127.0.0.1"
            sock = self.spec
        self.unix = unix
        self.conf = d / "opendkim.conf"
        self.conf.write_text("\n".join([
            "Syslog no",
            "Mode s",
            f"Domain {DOMAIN}",
            f"Selector {SELECTOR}",
            f"KeyFile {key}",
            f"Socket {sock}",
            f"PidFile {d / 'opendkim.pid'}",
            "RequireSafeKeys no",       # tmp_path lives under the world-writable /tmp
            "Canonicalization relaxed/simple",
            "UMask 007",
        ]) + "\n")
        self.stderr_path = d / "opendkim.stderr"
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([OPENDKIM, "-f", "-x", str(self.conf)],
                                         stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        deadline = time.monotonic() + 10
        while not self.listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"opendkim exited with {self.proc.returncode}: "
                                     f"{self.stderr_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError("opendkim did not listen within 10 s")
            time.sleep(0.05)

    def listening(self):
        fam = socket.AF_UNIX if self.unix else socket.AF_INET
        addr = str(self.path) if self.unix else ("127.0.0.1", self.port)
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(1)
            try:
                s.connect(addr)
            except OSError:
                return False
        return True

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture
def opendkim(tmp_path):
    started = []

    def factory(key, unix=False):
        o = OpenDKIM(tmp_path / f"opendkim{len(started)}", key, unix=unix)
        started.append(o)
        return o

    yield factory
    for o in started:
        o.stop()


def txt_for_dnsmasq(txt):
    """dnsmasq's --txt-record data: strings of at most 255 bytes, comma-separated."""
    assert "," not in txt
    return ",".join(txt[i:i + 250] for i in range(0, len(txt), 250))


def dns_txt_func(srv):
    """A dkimpy dnsfunc asking the test's dnsmasq for TXT records."""
    import dns.resolver as resolver

    def lookup(name, timeout=5):
        r = resolver.Resolver(configure=False)
        r.nameservers = [srv.host]
        r.port = srv.port
        ans = r.resolve(name.decode().rstrip("."), "TXT", lifetime=timeout)
        return b"".join(ans[0].strings)

    return lookup


# ---------------------------------------------------------------- the test


@pytest.mark.parametrize("unix", [False, True], ids=["inet", "unix"])
def test_opendkim_signs_and_the_mx_copy_verifies(petrel, mx_servers, opendkim, dns_server,
                                                 tmp_path, unix):
    key, txt = make_key(tmp_path / "keys")
    name = f"{SELECTOR}._domainkey.{DOMAIN}"
    dns = dns_server(records=[f"{name} TXT {txt_for_dnsmasq(txt)}"])
    lookup = dns_txt_func(dns)
    assert lookup(name.encode()) == txt.encode(), "dnsmasq does not serve the key as given"
    o = opendkim(key, unix=unix)
    world = MilterWorld(petrel, mx_servers, mx_ip=MX_IP)
    world.start([{"name": "dkim", "socket": o.spec, "default_action": "tempfail",
                  "timeouts": {"connect": "2s", "command": "10s", "eom": "10s"}}])

    def msg(sender, subject):
        return (f"From: Alice <{sender}>\r\n"
                f"To: <{RCPT}>\r\n"
                f"Subject: {subject}\r\n"
                f"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\n"
                f"Message-ID: <{subject.replace(' ', '.')}@{DOMAIN}>\r\n"
                "\r\n"
                "Hello, this message is signed by opendkim through petrel.\r\n"
                ".a line starting with a dot\r\n").encode()

    signed = msg(SENDER, "dkim signed")
    unsigned = msg("carol@other.dkim.test", "not our domain")
    with world.connect() as c:
        c.ehlo("client.dkim.test")
        expect_queued(txn(c, [RCPT], signed, sender=SENDER)["end"])
        expect_queued(txn(c, [RCPT], unsigned, sender="carol@other.dkim.test")["end"])
        c.expect("QUIT", "221")

    t = mx_message(world.mx, "dkim signed")
    data = t.data
    m = re.search(rb"(?:^|\r\n)DKIM-Signature:(.*?)\r\n(?![ \t])", data, re.S)
    assert m, f"no DKIM-Signature at the MX:\n{data.decode(errors='replace')}"
    sig = re.sub(rb"\s+", b"", m.group(1)).decode()
    tags = dict(kv.split("=", 1) for kv in sig.split(";") if "=" in kv)
    assert tags.get("d") == DOMAIN and tags.get("s") == SELECTOR, f"signature tags {tags}"
    assert tags.get("a") == "rsa-sha256" and tags.get("c") == "relaxed/simple", tags
    assert "from" in tags.get("h", "").lower().split(":"), tags
    # the body and headers after the signature are what the client sent
    assert body_after_received(t).endswith(signed), data

    assert dkim.verify(data, dnsfunc=lookup), \
        f"the MX's copy does not verify:\n{data.decode(errors='replace')}"
    assert ("TXT", name) in dns.queries(), f"the verifier did not ask dnsmasq: {dns.queries()}"
    # and the check can fail: a changed body no longer verifies
    tampered = data.replace(b"Hello, this message", b"Hello, that message")
    assert tampered != data and not dkim.verify(tampered, dnsfunc=lookup)

    # opendkim signs only for its Domain: the other sender's mail passes unsigned
    other = mx_message(world.mx, "not our domain")
    assert b"DKIM-Signature:" not in other.data, other.data
    assert body_after_received(other) == unsigned
