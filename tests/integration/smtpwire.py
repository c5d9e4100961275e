"""A raw-socket SMTP client for protocol tests: exact bytes out, parsed replies in.

Every socket has a timeout and every read loop a deadline. Replies are parsed
strictly (RFC 5321 4.2: `ddd-text` continuation lines, `ddd text` last line,
same code on every line, CRLF line ends); a malformed reply is an
AssertionError that shows the bytes received.
"""

import re
import socket
import time

from petrel_fixture import QUEUED_RE

REPLY_LINE_RE = re.compile(r"^(\d{3})([ -])(.*)$", re.S)
MAX_LINE = 65536


class Reply:
    """One (possibly multi-line) SMTP reply."""

    def __init__(self, lines):
        self.lines = lines                      # full lines without CRLF
        self.code = int(lines[0][:3])
        self.texts = [line[4:] for line in lines]

    @property
    def first(self):
        return self.lines[0]

    @property
    def last(self):
        return self.lines[-1]

    @property
    def text(self):
        """The text of a one-line reply (after `ddd `)."""
        return self.texts[-1]

    @property
    def qid(self):
        m = QUEUED_RE.match(self.last)
        return m.group(1) if m else None

    def __str__(self):
        return "\\r\\n".join(self.lines)

    def __repr__(self):
        return f"Reply({self.lines!r})"


class Closed(Exception):
    """The server closed the connection (EOF or reset) while we waited for a reply."""

    def __init__(self, partial):
        super().__init__(f"connection closed by server; partial data {partial!r}")
        self.partial = partial


def message(subject="test", body="Hello.\r\n", headers=None, sender="alice@example.org",
            to="bob@local.test"):
    """A small RFC 5322 message with CRLF line ends, as bytes."""
    hdrs = [f"From: <{sender}>", f"To: <{to}>", f"Subject: {subject}",
            "Message-ID: <" + subject.replace(" ", ".") + "@client.test>"]
    hdrs += list(headers or [])
    text = "\r\n".join(hdrs) + "\r\n\r\n"
    data = text.encode()
    data += body.encode() if isinstance(body, str) else body
    return data


def dot_stuff(content):
    """DATA transparency (RFC 5321 4.5.2) plus the terminating dot line.

    content must end with CRLF."""
    assert content.endswith(b"\r\n"), "message content must end with CRLF"
    lines = content.split(b"\r\n")[:-1]
    out = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return out + b".\r\n"


class RawSMTP:
    """One client connection. Construct, then cmd()/send()/read_reply()."""

    def __init__(self, host, port, *, timeout=10.0, source=None, banner=True):
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        if source:
            self.sock.bind((source, 0))
        self.sock.connect((host, port))
        self.local_ip, self.local_port = self.sock.getsockname()[:2]
        self.buf = bytearray()
        self.banner = self.read_reply() if banner else None

    # -- bytes

    def send(self, data):
        if isinstance(data, str):
            data = data.encode("utf-8")
        self.sock.sendall(data)

    def _fill(self, deadline):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise socket.timeout(f"no complete reply within {self.timeout}s; "
                                 f"buffered {bytes(self.buf)!r}")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except ConnectionResetError:
            chunk = b""
        finally:
            self.sock.settimeout(self.timeout)
        if not chunk:
            raise Closed(bytes(self.buf))
        self.buf += chunk

    def read_line(self, timeout=None):
        """One CRLF-terminated line (without CRLF), decoded as UTF-8."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                raw = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                assert raw.endswith(b"\r\n"), f"reply line not ended by CRLF: {raw!r}"
                return raw[:-2].decode("utf-8", "surrogateescape")
            assert len(self.buf) < MAX_LINE, f"reply line longer than {MAX_LINE} bytes"
            self._fill(deadline)

    def read_reply(self, timeout=None):
        """One complete reply (all continuation lines)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        lines = []
        while True:
            line = self.read_line(timeout=max(0.0, deadline - time.monotonic()))
            m = REPLY_LINE_RE.match(line)
            assert m, f"malformed reply line {line!r} (after {lines!r})"
            assert not lines or m.group(1) == lines[0][:3], \
                f"reply code changed inside a multi-line reply: {lines + [line]!r}"
            lines.append(line)
            if m.group(2) == " ":
                return Reply(lines)

    def read_replies(self, n, timeout=None):
        return [self.read_reply(timeout) for _ in range(n)]

    def cmd(self, line, timeout=None):
        """Sends line + CRLF and returns the reply."""
        if isinstance(line, str):
            line = line.encode("utf-8")
        self.send(line + b"\r\n")
        return self.read_reply(timeout)

    def expect(self, line, want, timeout=None):
        """cmd() and assert that the (last) reply line starts with want."""
        r = self.cmd(line, timeout)
        assert r.last.startswith(want), f"{line!r}: got {r}, want {want!r}..."
        return r

    def wait_closed(self, timeout=5.0):
        """True if the server closes the connection (EOF/RST) within timeout
        with no further bytes; raises if it sends more data."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.buf:
                raise AssertionError(f"expected close, got more data {bytes(self.buf)!r}")
            try:
                self._fill(deadline)
            except Closed:
                return True
            except (socket.timeout, TimeoutError):
                return False
        return False

    # -- SMTP steps

    def ehlo(self, name="client.test"):
        r = self.cmd(f"EHLO {name}")
        assert r.code == 250, f"EHLO: got {r}, want 250"
        return r

    def data(self, content, timeout=None):
        """DATA, expect 354, send dot-stuffed content + final dot, return the reply."""
        r = self.cmd("DATA")
        assert r.code == 354, f"DATA: got {r}, want 354"
        self.send(dot_stuff(content))
        return self.read_reply(timeout)

    def transaction(self, sender, rcpts, content, mail_params=""):
        """MAIL, RCPT..., DATA (one command at a time); returns the queue id."""
        self.expect(f"MAIL FROM:<{sender}>{mail_params}", "250 2.1.0")
        for rcpt in rcpts:
            self.expect(f"RCPT TO:<{rcpt}>", "250 2.1.5")
        r = self.data(content)
        assert r.qid, f"end of DATA: got {r}, want '250 2.0.0 Ok: queued as <QID>'"
        return r.qid

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
