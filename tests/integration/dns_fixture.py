"""dnsmasq on a loopback port, serving the DNS records a test gives.

Use it from a test module by importing the fixtures (pytest then finds them):

    from dns_fixture import dns_server, silent_resolver  # noqa: F401

dns_server — factory fixture:

    srv = dns_server(records=[
        "example.test MX 10 mx1.example.test",
        "example.test MX 20 mx2.example.test",
        "mx1.example.test A 127.0.0.5",
        "mx1.example.test AAAA ::1",
        "mx2.example.test A 127.0.0.6",
        "alias.test CNAME mx1.example.test",
        "nullmx.test MX 0 .",                  # RFC 7505 null MX
        "txtonly.test TXT some text",          # a name with neither MX nor A/AAAA
        "raw.test TYPE15 000a036d7831027465737400",   # any type, rdata in hex
    ])
    petrel(config=srv.config(timeout="2s"))    # {"dns": {"resolvers": [...], "timeout": ...}}

  Each record is "NAME TYPE DATA" with TYPE one of MX (DATA "PREF TARGET",
  TARGET "." for a null MX), A, AAAA (one address per record; several
  records for one name add up), CNAME (the target must itself be served
  here), TXT, or TYPEnn (DATA: the rdata as hex, via --dns-rr). Names under
  the `local` domains (default ("test",)) that are not listed answer
  NXDOMAIN; a listed name without the asked type answers NODATA (NOERROR,
  no records). Names outside them answer REFUSED (no upstream server).

  The factory starts dnsmasq (a free port, bounded wait until it answers a
  probe query) and returns a DnsServer:
      .host, .port        127.0.0.1 and the port (UDP and TCP)
      .resolver           "127.0.0.1:PORT", an entry for dns.resolvers
      .config(timeout)    {"dns": {"resolvers": [.resolver], "timeout": timeout}}
      .queries()          [(qtype, name), ...] dnsmasq logged so far, e.g. ("MX", "example.test")
      .log()              dnsmasq's stderr (its query log) so far
      .stop()             SIGTERM by PID, bounded wait, SIGKILL if needed (idempotent)
  Every server a test started is stopped at teardown.

silent_resolver — a fixture yielding "127.0.0.1:PORT" where a UDP socket is
bound (and a TCP listener accepts nothing) but nothing ever answers: every
lookup through it runs into the dns.timeout.

closed_resolver() — a function returning "127.0.0.1:PORT" where nothing
listens (queries get ICMP port unreachable).
"""

import os
import pwd
import re
import signal
import socket
import struct
import subprocess
import time

import pytest

DNSMASQ = "/usr/sbin/dnsmasq"

_TYPE_NUM = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "MX": 15, "TXT": 16, "AAAA": 28}


class DnsFixtureError(AssertionError):
    """dnsmasq could not be started or stopped as the test needs."""


def _free_udp_tcp_port(host="127.0.0.1"):
    """A port free for both UDP and TCP on host a moment ago."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind((host, 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind((host, port))
                except OSError:
                    continue
                return port
    raise DnsFixtureError("no port free for both UDP and TCP")


def closed_resolver(host="127.0.0.1"):
    """"host:port" where nothing listens (UDP or TCP)."""
    return f"{host}:{_free_udp_tcp_port(host)}"


def dns_query(host, port, name, qtype, timeout=1.0):
    """One UDP query; returns (rcode, answer count) or None on timeout."""
    qid = int.from_bytes(os.urandom(2), "big")
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(label)]) + label.encode("ascii")
                     for label in name.strip(".").split(".") if label) + b"\0"
    packet = header + qname + struct.pack(">HH", _TYPE_NUM.get(qtype, qtype), 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(packet, (host, port))
        try:
            data, _ = s.recvfrom(65535)
        except socket.timeout:
            return None
    if len(data) < 12 or data[:2] != packet[:2]:
        return None
    flags, _qd, an = struct.unpack(">HHH", data[2:8])
    return flags & 0xF, an


def _options_for(record, lineno):
    """dnsmasq options serving one "NAME TYPE DATA" record."""
    parts = record.split(None, 2)
    if len(parts) < 3:
        raise ValueError(f"record {lineno} {record!r}: want 'NAME TYPE DATA'")
    name, rtype, data = parts[0].rstrip(".") or ".", parts[1].upper(), parts[2].strip()
    if rtype == "MX":
        m = re.fullmatch(r"(\d+)\s+(\S+)", data)
        if not m:
            raise ValueError(f"record {record!r}: MX data is 'PREF TARGET'")
        target = m.group(2)
        if target != ".":
            target = target.rstrip(".")
        return [f"--mx-host={name},{target},{m.group(1)}"]
    if rtype in ("A", "AAAA"):
        family = socket.AF_INET if rtype == "A" else socket.AF_INET6
        socket.inet_pton(family, data)  # raises on a bad address
        return [f"--host-record={name},{data}"]
    if rtype == "CNAME":
        return [f"--cname={name},{data.rstrip('.')}"]
    if rtype == "TXT":
        return [f"--txt-record={name},{data}"]
    m = re.fullmatch(r"TYPE(\d+)", rtype)
    if m:
        if not re.fullmatch(r"(?:[0-9a-fA-F]{2})*", data):
            raise ValueError(f"record {record!r}: TYPEnn data is hex")
        return [f"--dns-rr={name},{m.group(1)},{data}"]
    raise ValueError(f"record {record!r}: unsupported type {rtype}")


class DnsServer:
    """One dnsmasq instance (see module docstring)."""

    host = "127.0.0.1"

    def __init__(self, workdir, records=(), local=("test",), name="dnsmasq"):
        self.dir = workdir
        self.records = list(records)
        self.local = tuple(local)
        self.name = name
        self.port = None
        self.proc = None
        self.stderr_path = os.path.join(str(workdir), f"{name}.log")

    @property
    def resolver(self):
        return f"{self.host}:{self.port}"

    def config(self, timeout="2s"):
        return {"dns": {"resolvers": [self.resolver], "timeout": timeout}}

    def _argv(self):
        argv = [DNSMASQ, "--keep-in-foreground", f"--port={self.port}",
                f"--listen-address={self.host}", "--bind-interfaces", "--no-resolv",
                "--no-hosts", "--no-poll", "--conf-file=/dev/null", "--pid-file=",
                f"--user={pwd.getpwuid(os.getuid()).pw_name}", "--log-queries",
                "--log-facility=-"]
        argv += [f"--local=/{d.strip('.')}/" for d in self.local]
        for i, record in enumerate(self.records):
            argv += _options_for(record, i)
        return argv

    def start(self, timeout=5.0, attempts=5):
        if not os.access(DNSMASQ, os.X_OK):
            raise DnsFixtureError(f"{DNSMASQ} is missing (Debian package dnsmasq-base)")
        last = ""
        for _ in range(attempts):
            self.port = _free_udp_tcp_port(self.host)
            with open(self.stderr_path, "ab") as err:
                self.offset = err.tell()
                self.proc = subprocess.Popen(self._argv(), stdin=subprocess.DEVNULL,
                                             stdout=err, stderr=err)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                # any answer to a probe means dnsmasq is serving
                if dns_query(self.host, self.port, "probe.invalid", "A", timeout=0.2):
                    return self
                time.sleep(0.05)
            last = self.log()
            if self.proc.poll() is None:
                self.stop()
                raise DnsFixtureError(f"dnsmasq did not answer on port {self.port} within "
                                      f"{timeout}s:\n{last}")
            if "in use" not in last:
                raise DnsFixtureError(f"dnsmasq exited with status {self.proc.returncode}:\n"
                                      f"{last}")
        raise DnsFixtureError(f"dnsmasq: no free port after {attempts} attempts:\n{last}")

    def stop(self, timeout=5.0):
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as e:
                raise DnsFixtureError(f"dnsmasq pid {self.proc.pid} survived SIGKILL") from e

    def log(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""

    def queries(self):
        """(qtype, name) of every query dnsmasq logged, in order."""
        return [(m.group(1), m.group(2)) for m in
                re.finditer(r"query\[(\w+)\] (\S+) from", self.log())]


@pytest.fixture
def dns_server(tmp_path):
    servers = []

    def factory(records=(), local=("test",)):
        srv = DnsServer(tmp_path, records=records, local=local,
                        name=f"dnsmasq{len(servers)}")
        servers.append(srv)
        return srv.start()

    yield factory
    for srv in servers:
        srv.stop()


@pytest.fixture
def silent_resolver():
    host = "127.0.0.1"
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        for _ in range(50):
            udp.bind((host, 0))
            port = udp.getsockname()[1]
            try:
                tcp.bind((host, port))
                break
            except OSError:
                udp.close()
                udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        tcp.listen(1)  # never accepted: a TCP query waits too
        yield f"{host}:{port}"
    finally:
        udp.close()
        tcp.close()
