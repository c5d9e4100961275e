"""Scriptable remote MXes and LMTP servers for petrel's delivery tests.

A `Server` is an aiosmtpd server (SMTP, or LMTP with `lmtp=True`) on a
127.0.0.x address and port, or (LMTP) on a unix socket. It records what a
remote MTA would see and answers as the test scripts it:

    mx = Server("127.0.41.2", port, name="mx1.dlv.test")
    mx.start()
    mx.set_reply("rcpt", "550 5.1.1 No such user", rcpt="bob")   # local part or address
    mx.set_reply("data_end", first_n(2, "451 4.7.1 Try again later"))
    mx.drop_in_data(times=1)            # close the connection after 354 + one line
    msgs = mx.wait_for(1, timeout=10)   # accepted messages (bounded wait)

Stages for set_reply(): "banner" (a non-220 reply refuses the session),
"ehlo", "helo", "mail", "rcpt", "data" (the reply to the DATA command
itself), "data_end" (the reply after the final dot; for LMTP one reply per
recipient, so a per-recipient script applies there too). A reply is a string,
or a Script (replies in turn, the last repeats; None means "the default").
first_n(n, reply) is "reply for the first n times, then the default".

Every transaction (from MAIL on) is a Txn in `server.transactions`; the
messages the server accepted (a 2xx after the dot for at least one
recipient) are in `server.messages`. Each Txn records the peer address
(ip, port), the HELO verb and argument of its session, MAIL FROM (""
for <>) with its raw parameters, each RCPT with its raw parameters and the
reply given, the exact DATA bytes as received (CRLF preserved, dot-stuffing
undone, decode_data=False), and the final replies. `server.connections`
lists every session (peer, verb, helo).

`dsn=True` makes the server advertise DSN and accept NOTIFY/ORCPT on RCPT
and RET/ENVID on MAIL (aiosmtpd alone refuses them with 555); the raw
parameters are in Txn.mail_params / Txn.rcpts[i].params either way.

Nothing listening at an address is a "down" MX: use `down_address()` to
check that a connect to it is refused.

The `mx_servers` fixture (registered by conftest.py) is a factory that
stops every server at teardown. Waits: wait_for(n) (accepted messages),
wait_transactions(n) (MAIL seen), wait_completed(n) (final reply given),
wait_rcpt_attempts(addr, n); every one is bounded and shows the records on
timeout.

Also here: the helpers the delivery tests share — World (one test's petrel,
MXes on one shared port and dnsmasq via start_dns(), which wraps
dns_fixture.DnsServer), the delivery config, submission with smtplib,
parsing of delivery log lines and of DSN reports.
"""

import asyncio
import email
import email.policy
import re
import smtplib
import socket
import threading
import time
from email.utils import parsedate_to_datetime

import pytest
from aiosmtpd.controller import Controller, UnixSocketController
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import MISSING, SMTP

from petrel_fixture import QID_RE, free_port, port_is_closed

DEFAULT_REPLIES = {
    "ehlo": None,
    "mail": "250 2.1.0 Ok",
    "rcpt": "250 2.1.5 Ok",
    "data_end": "250 2.0.0 Ok: queued",
}


# ---------------------------------------------------------------- scripts


class Script:
    """Replies given in turn; the last one repeats. None: the default reply."""

    def __init__(self, *replies):
        assert replies, "a Script needs at least one reply"
        self.replies = list(replies)
        self.used = 0
        self.lock = threading.Lock()

    def next(self):
        with self.lock:
            r = self.replies[min(self.used, len(self.replies) - 1)]
            self.used += 1
            return r

    def __repr__(self):
        return f"Script({self.replies!r}, used={self.used})"


def first_n(n, reply, then=None):
    """`reply` for the first n uses, then `then` (None: the default reply)."""
    return Script(*([reply] * n + [then]))


def _as_script(reply):
    if isinstance(reply, Script):
        return reply
    if isinstance(reply, (list, tuple)):
        return Script(*reply)
    return Script(reply)


# ---------------------------------------------------------------- records


class Rcpt:
    def __init__(self, addr, params, reply):
        self.addr = addr
        self.params = params        # raw "NOTIFY=SUCCESS" strings, as sent
        self.reply = reply

    @property
    def accepted(self):
        return self.reply.startswith("2")

    def __repr__(self):
        return f"Rcpt({self.addr!r}, {self.params!r}, {self.reply!r})"


class Txn:
    """One transaction as the server saw it."""

    def __init__(self, conn, mail_from, mail_params):
        self.peer = conn.peer           # (ip, port) of petrel's socket ("" for unix)
        self.verb = conn.verb           # "EHLO" | "HELO" | "LHLO"
        self.helo = conn.helo           # the EHLO/HELO/LHLO argument
        self.conn = conn
        self.mail_from = mail_from      # "" for <>
        self.mail_params = mail_params  # raw strings
        self.mail_reply = None
        self.rcpts = []                 # [Rcpt]
        self.data = None                # bytes as received (after the DATA command)
        self.data_cmd_reply = None
        self.final_replies = []         # after the dot: one (SMTP) or one per rcpt (LMTP)
        self.dropped = False            # we closed the connection inside DATA
        self.when = time.time()
        self.done = None                # time.time() of the final reply

    @property
    def rcpt_tos(self):
        """The recipients the server accepted at RCPT."""
        return [r.addr for r in self.rcpts if r.accepted]

    @property
    def delivered_to(self):
        """Recipients whose message the server took (2xx after the dot)."""
        if self.data is None or self.dropped or not self.final_replies:
            return []
        rcpts = self.rcpt_tos
        if len(self.final_replies) == 1 and len(rcpts) != 1:
            return rcpts if self.final_replies[0].startswith("2") else []
        return [a for a, r in zip(rcpts, self.final_replies) if r.startswith("2")]

    @property
    def accepted(self):
        return bool(self.delivered_to)

    def rcpt_params(self, addr):
        for r in self.rcpts:
            if r.addr.lower() == addr.lower():
                return r.params
        raise KeyError(addr)

    def __repr__(self):
        return (f"Txn(peer={self.peer!r}, {self.verb} {self.helo!r}, from={self.mail_from!r} "
                f"{self.mail_params!r}, rcpts={self.rcpts!r}, data={len(self.data or b'')}B, "
                f"final={self.final_replies!r}, dropped={self.dropped})")


class Conn:
    def __init__(self, peer):
        self.peer = peer
        self.verb = None
        self.helo = None
        self.when = time.time()
        self.banner_refused = False

    def __repr__(self):
        return f"Conn({self.peer!r}, {self.verb} {self.helo!r})"


# ---------------------------------------------------------------- aiosmtpd glue


_DSN_MAIL = ("RET=", "ENVID=")
_DSN_RCPT = ("NOTIFY=", "ORCPT=")


def _split_params(server, keyword, arg):
    """(address, [raw params]) from a MAIL/RCPT argument, or (None, [])."""
    if arg is None:
        return None, []
    rest = server._strip_command_keyword(keyword, arg)
    if rest is None:
        return None, []
    address, params = server._getaddr(rest)
    return address, (params or "").split()


def _strip_params(arg, prefixes):
    """arg without the parameters starting with prefixes (case-insensitive)."""
    i = arg.find(">")
    if i < 0:
        return arg
    head, tail = arg[:i + 1], arg[i + 1:]
    kept = [p for p in tail.split() if not p.upper().startswith(prefixes)]
    return head + ("".join(" " + p for p in kept))


class _Mixin:
    """Overrides shared by the SMTP and LMTP servers (self.event_handler is the Handler)."""

    async def _handle_client(self):
        h = self.event_handler
        conn = h._new_conn(self.session.peer)
        self.session.petrel_conn = conn
        banner = h._reply("banner")
        if banner is not None and not banner.startswith("220"):
            conn.banner_refused = True
            await self.push(banner)
            # RFC 5321 3.1: after a 554 greeting the server waits for QUIT.
            try:
                while self.transport is not None:
                    line = await asyncio.wait_for(self._reader.readuntil(b"\n"), 10)
                    if line.strip().upper() == b"QUIT":
                        await self.push("221 2.0.0 Bye")
                        break
                    await self.push("503 5.5.1 Error: no service")
            except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError,
                    asyncio.LimitOverrunError):
                pass
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()

    async def smtp_MAIL(self, arg):
        self._petrel_raw = arg
        if arg and self.event_handler.dsn:
            arg = _strip_params(arg, _DSN_MAIL)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg):
        self._petrel_raw = arg
        if arg and self.event_handler.dsn:
            arg = _strip_params(arg, _DSN_RCPT)
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg):
        h = self.event_handler
        txn = getattr(self.envelope, "petrel_txn", None)
        if (arg or not self.session.host_name or not self.envelope.rcpt_tos or txn is None):
            return await super().smtp_DATA(arg)
        r = h._reply("data")
        if r is not None and not r.startswith("354"):
            txn.data_cmd_reply = r
            await self.push(r)
            return
        if h._reply("drop") == "drop":
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            txn.data_cmd_reply = "354"
            try:
                line = await asyncio.wait_for(self._reader.readuntil(b"\r\n"), 10)
            except Exception:   # noqa: BLE001 - any read outcome: we drop anyway
                line = b""
            txn.data = line
            txn.dropped = True
            txn.done = time.time()
            if self.transport is not None:
                self.transport.abort()
            self._set_post_data_state()
            return
        txn.data_cmd_reply = "354"
        await super().smtp_DATA(arg)


class _SMTPServer(_Mixin, SMTP):
    pass


class _LMTPServer(_Mixin, LMTP):
    pass


class _TCPController(Controller):
    def __init__(self, server_cls, *a, **kw):
        self.server_cls = server_cls
        super().__init__(*a, **kw)

    def factory(self):
        return self.server_cls(self.handler, **self.SMTP_kwargs)


class _UnixController(UnixSocketController):
    def __init__(self, server_cls, *a, **kw):
        self.server_cls = server_cls
        super().__init__(*a, **kw)

    def factory(self):
        return self.server_cls(self.handler, **self.SMTP_kwargs)


class Handler:
    """aiosmtpd hooks; state lives on the owning Server."""

    def __init__(self, server):
        self.srv = server
        self.dsn = server.dsn

    # -- scripting

    def _reply(self, stage, rcpt=None):
        """The scripted reply for stage (and recipient), or None for the default."""
        s = self.srv
        with s.lock:
            script = None
            if rcpt is not None:
                local = rcpt.rsplit("@", 1)[0].lower()
                script = s.rcpt_scripts.get((stage, rcpt.lower())) or \
                    s.rcpt_scripts.get((stage, local))
            if script is None:
                script = s.scripts.get(stage)
        return script.next() if script is not None else None

    def _new_conn(self, peer):
        c = Conn(peer)
        with self.srv.lock:
            self.srv.connections.append(c)
        return c

    # -- hooks

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        conn = session.petrel_conn
        conn.verb = "LHLO" if isinstance(server, LMTP) else "EHLO"
        conn.helo = hostname
        r = self._reply("ehlo")
        if r is not None and not r.startswith("250"):
            return [r]
        session.host_name = hostname
        last = responses[-1]
        out = responses[:-1]
        if self.srv.pipelining:
            out.append("250-PIPELINING")
        out.append("250-ENHANCEDSTATUSCODES")
        if self.dsn:
            out.append("250-DSN")
        out.append(last)
        return out

    async def handle_HELO(self, server, session, envelope, hostname):
        conn = session.petrel_conn
        conn.verb = "HELO"
        conn.helo = hostname
        r = self._reply("helo")
        if r is not None and not r.startswith("250"):
            return r
        return MISSING

    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        conn = session.petrel_conn
        _, params = _split_params(server, "FROM:", getattr(server, "_petrel_raw", None))
        txn = Txn(conn, "" if address == "<>" else address, params)
        with self.srv.lock:
            self.srv.transactions.append(txn)
        r = self._reply("mail") or DEFAULT_REPLIES["mail"]
        txn.mail_reply = r
        if r.startswith("2"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
            envelope.petrel_txn = txn
        return r

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        txn = getattr(envelope, "petrel_txn", None)
        _, params = _split_params(server, "TO:", getattr(server, "_petrel_raw", None))
        r = self._reply("rcpt", rcpt=address) or DEFAULT_REPLIES["rcpt"]
        if txn is not None:
            with self.srv.lock:
                txn.rcpts.append(Rcpt(address, params, r))
        if r.startswith("2"):
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
        return r

    async def handle_DATA(self, server, session, envelope):
        txn = envelope.petrel_txn
        data = envelope.original_content
        assert isinstance(data, bytes), "aiosmtpd decoded the content (want decode_data=False)"
        if isinstance(server, LMTP):
            replies = []
            for addr in envelope.rcpt_tos:
                replies.append(self._reply("data_end", rcpt=addr) or DEFAULT_REPLIES["data_end"])
        else:
            replies = [self._reply("data_end") or DEFAULT_REPLIES["data_end"]]
        with self.srv.lock:
            txn.data = data
            txn.final_replies = replies
            txn.done = time.time()
        return "\r\n".join(replies)


class Server:
    """A scriptable SMTP or LMTP server; see the module docstring."""

    def __init__(self, host=None, port=None, *, name="mx.test", lmtp=False, unix_path=None,
                 dsn=False, pipelining=True):
        self.host = host
        self.port = port
        self.name = name
        self.lmtp = lmtp
        self.unix_path = str(unix_path) if unix_path else None
        self.dsn = dsn
        self.pipelining = pipelining
        self.lock = threading.Lock()
        self.scripts = {}
        self.rcpt_scripts = {}
        self.connections = []
        self.transactions = []
        self.ctl = None

    # -- life

    def start(self):
        handler = Handler(self)
        cls = _LMTPServer if self.lmtp else _SMTPServer
        kw = dict(ready_timeout=10, enable_SMTPUTF8=True, decode_data=False,
                  server_hostname=self.name)
        if self.unix_path:
            self.ctl = _UnixController(cls, handler, unix_socket=self.unix_path, **kw)
        else:
            if self.port is None:
                self.port = free_port(self.host)
            self.ctl = _TCPController(cls, handler, hostname=self.host, port=self.port, **kw)
        self.ctl.start()
        # The controller's own start-up probe is not petrel's.
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

    def stop(self):
        if self.ctl is not None:
            self.ctl.stop()
            self.ctl = None

    @property
    def address(self):
        return self.unix_path or f"{self.host}:{self.port}"

    # -- scripting

    def set_reply(self, stage, reply, rcpt=None):
        """Scripts a stage (see module docstring); rcpt: local part or address."""
        assert stage in ("banner", "ehlo", "helo", "mail", "rcpt", "data", "data_end", "drop"), \
            stage
        with self.lock:
            if rcpt is None:
                self.scripts[stage] = _as_script(reply)
            else:
                self.rcpt_scripts[(stage, rcpt.lower())] = _as_script(reply)

    def clear_replies(self):
        with self.lock:
            self.scripts.clear()
            self.rcpt_scripts.clear()

    def drop_in_data(self, times=1):
        """Close the connection after 354 and one line of content, `times` times."""
        self.set_reply("drop", first_n(times, "drop"))

    # -- records

    @property
    def messages(self):
        """Accepted transactions, in order."""
        with self.lock:
            return [t for t in self.transactions if t.accepted]

    def all_transactions(self):
        with self.lock:
            return list(self.transactions)

    def all_connections(self):
        with self.lock:
            return list(self.connections)

    def rcpt_attempts(self, addr):
        """How many RCPT commands named addr."""
        with self.lock:
            return sum(1 for t in self.transactions for r in t.rcpts
                       if r.addr.lower() == addr.lower())

    def messages_for(self, addr):
        return [t for t in self.messages if addr.lower() in (a.lower() for a in t.delivered_to)]

    def wait_for(self, n, timeout=15.0, what=None):
        """Waits (bounded) until n messages were accepted; returns them."""
        return self._wait(lambda: self.messages, n, timeout, what or "accepted messages")

    def wait_transactions(self, n, timeout=15.0):
        """Waits for n transactions to have started (MAIL seen); see wait_completed."""
        return self._wait(self.all_transactions, n, timeout, "transactions")

    def wait_completed(self, n, timeout=15.0):
        """Waits for n transactions that got their final reply (or were dropped)."""
        def done():
            with self.lock:
                return [t for t in self.transactions if t.done is not None]
        return self._wait(done, n, timeout, "completed transactions")

    def wait_rcpt_attempts(self, addr, n, timeout=15.0):
        deadline = time.monotonic() + timeout
        while True:
            got = self.rcpt_attempts(addr)
            if got >= n:
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} ({self.address}) saw {got} RCPT TO:<{addr}> "
                                     f"within {timeout}s, want {n}\n{self.describe()}")
            time.sleep(0.05)

    def _wait(self, get, n, timeout, what):
        deadline = time.monotonic() + timeout
        while True:
            got = get()
            if len(got) >= n:
                return got
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} ({self.address}) got {len(got)} {what} "
                                     f"within {timeout}s, want {n}\n{self.describe()}")
            time.sleep(0.05)

    def describe(self):
        with self.lock:
            lines = [f"  connections: {self.connections!r}"]
            lines += [f"  {t!r}" for t in self.transactions]
        return "\n".join(lines)

    def __repr__(self):
        return f"Server({self.name!r}, {self.address}, lmtp={self.lmtp})"


def down_address(host, port):
    """Asserts that nothing listens on host:port (a "down" MX); returns (host, port)."""
    assert port_is_closed(host, port), f"{host}:{port} accepts connections; want a down MX"
    return host, port


@pytest.fixture
def mx_servers():
    """Factory: mx_servers(host, port, name=..., lmtp=..., unix_path=..., dsn=...) -> started
    Server; all are stopped at teardown."""
    started = []

    def factory(host=None, port=None, **kw):
        s = Server(host, port, **kw)
        s.start()
        started.append(s)
        return s

    yield factory
    for s in started:
        s.stop()


def shared_port(hosts):
    """A port number free on every one of hosts (127.0.0.x addresses), so every MX of a
    test can listen on it (petrel's delivery.port applies to all MX connections)."""
    for _ in range(50):
        port = free_port(hosts[0])
        ok = True
        for h in hosts[1:]:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((h, port))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
    raise AssertionError(f"no port free on all of {hosts}")


# ---------------------------------------------------------------- petrel config


DELIVERY_HOSTNAME = "relay.petrel.test"


def delivery_config(dns_port, mx_port, *, routes=None, retry=None, bounce=None, extra=None):
    """The config overrides for delivery tests (merged into the petrel fixture's base)."""
    cfg = {
        "dns": {"resolvers": [f"127.0.0.1:{dns_port}"], "timeout": "2s"},
        "delivery": {"hostname": DELIVERY_HOSTNAME, "port": mx_port,
                     "connection_cache_time": "1s",
                     "timeouts": {"connect": "3s", "greeting": "10s", "command": "10s",
                                  "data_init": "10s", "data_block": "10s",
                                  "data_end": "10s"}},
        "retry": retry or {"schedule": ["1s", "2s"], "max_attempts": 3, "max_age": "1h"},
        "bounce": bounce or {"enabled": True},
    }
    if routes:
        cfg["routes"] = routes
    if extra:
        cfg.update(extra)
    return cfg


# ---------------------------------------------------------------- submission


QUEUED_TEXT_RE = re.compile(r"2\.0\.0 Ok: queued as (" + QID_RE + r")")


def submit(p, sender, rcpts, content, *, mail_options=(), rcpt_options=None,
           helo="client.test"):
    """Submits one message to petrel with smtplib; returns its queue id.

    rcpt_options: {rcpt: [options]} (per recipient) or a list for all."""
    with smtplib.SMTP(p.host, p.port, local_hostname=helo, timeout=15) as s:
        code, msg = s.ehlo(helo)
        assert code == 250, f"EHLO: got {code} {msg!r}"
        code, msg = s.mail(sender, list(mail_options))
        assert code == 250, f"MAIL FROM:<{sender}> {list(mail_options)}: got {code} {msg!r}"
        for r in rcpts:
            if isinstance(rcpt_options, dict):
                opts = rcpt_options.get(r, [])
            else:
                opts = list(rcpt_options or [])
            code, msg = s.rcpt(r, opts)
            assert code == 250, f"RCPT TO:<{r}> {opts}: got {code} {msg!r}"
        code, msg = s.data(content)
        text = msg.decode("utf-8", "replace")
        m = QUEUED_TEXT_RE.search(text)
        assert code == 250 and m, f"end of DATA: got {code} {text!r}, want 250 … queued as <QID>"
        return m.group(1)


# ---------------------------------------------------------------- logs


DELIVERY_FIELDS = {
    "to": r"\bto=<([^>]*)>",
    "relay": r"\brelay=([^,\s]+)",
    "src": r"\bsrc=([^,\s]+)",
    "helo": r"\bhelo=([^,\s]+)",
    "delay": r"\bdelay=([0-9]+(?:\.[0-9]+)?)",
    "attempts": r"\battempts=([0-9]+)",
    "dsn": r"\bdsn=([245]\.[0-9]{1,3}\.[0-9]{1,3})",
    "status": r"\bstatus=([a-z]+)",
    "reply": r"\bstatus=[a-z]+ \((.*)\)\s*$",
}


def parse_delivery(line):
    """{field: value} of a delivery log line (fields missing from the line are absent)."""
    out = {}
    for k, rx in DELIVERY_FIELDS.items():
        m = re.search(rx, line)
        if m:
            out[k] = m.group(1)
    return out


def delivery_lines(p, qid, rcpt=None, status=None):
    """Parsed delivery log lines of qid (optionally for one recipient / status), in order."""
    out = []
    for line in p.log_lines():
        if f"{qid}: to=<" not in line:
            continue
        d = parse_delivery(line)
        d["line"] = line
        if rcpt is not None and d.get("to", "").lower() != rcpt.lower():
            continue
        if status is not None and d.get("status") != status:
            continue
        out.append(d)
    return out


def wait_delivery(p, qid, rcpt, status, timeout=15.0, n=1):
    """Waits (bounded) for n delivery lines of qid/rcpt with status; returns the last."""
    deadline = time.monotonic() + timeout
    while True:
        got = delivery_lines(p, qid, rcpt, status)
        if len(got) >= n:
            return got[n - 1]
        if time.monotonic() >= deadline:
            raise AssertionError(f"no{'' if n == 1 else f' {n}'} '{qid}: to=<{rcpt}>, … "
                                 f"status={status}' log line within {timeout}s; "
                                 f"log tail:\n{p.log_tail(60)}")
        time.sleep(0.05)


def check_fields(d, **want):
    """Asserts parsed log fields; values are strings or compiled regexes."""
    for k, v in want.items():
        got = d.get(k)
        if isinstance(v, re.Pattern):
            ok = got is not None and v.fullmatch(got)
        else:
            ok = got == v
        assert ok, (f"log field {k}: got {got!r}, want "
                    f"{v.pattern if isinstance(v, re.Pattern) else v!r}\nline: {d['line']}")


def wait_bounce_created(p, qid, timeout=15.0, kind="non-delivery"):
    """`<qid>: sender non-delivery notification: <BQID>` → BQID."""
    m = p.wait_log(re.escape(qid) + r": sender " + kind + r" notification: (" + QID_RE + ")",
                   timeout=timeout)
    return m.group(1)


def wait_queue_empty(p, timeout=15.0):
    deadline = time.monotonic() + timeout
    while True:
        q = p.queue_list()
        if q.empty:
            return q
        if time.monotonic() >= deadline:
            raise AssertionError(f"queue not empty within {timeout}s:\n{q.text}\n"
                                 f"log tail:\n{p.log_tail(40)}")
        time.sleep(0.2)


# ---------------------------------------------------------------- DSN reports


class Report:
    """A parsed RFC 3464/6522 delivery status notification."""

    def __init__(self, data):
        self.raw = data
        self.msg = email.message_from_bytes(data, policy=email.policy.compat32)
        self.parts = self.msg.get_payload() if self.msg.is_multipart() else []
        self.per_message = None
        self.per_rcpt = []
        self.status_part = None
        self.human = None
        self.original = None
        for part in self.parts:
            ct = part.get_content_type()
            if ct in ("message/delivery-status", "message/global-delivery-status"):
                self.status_part = part
                blocks = part.get_payload()
                if blocks:
                    self.per_message = blocks[0]
                    self.per_rcpt = list(blocks[1:])
            elif ct == "text/plain" and self.human is None:
                self.human = part
            elif ct in ("text/rfc822-headers", "message/rfc822", "message/global",
                        "message/global-headers"):
                self.original = part

    def recipient(self, addr):
        """The per-recipient block whose Final-Recipient is addr."""
        for b in self.per_rcpt:
            if field_addr(b.get("Final-Recipient", "")).lower() == addr.lower():
                return b
        raise AssertionError(f"no Final-Recipient: rfc822; {addr} in the report; have "
                             f"{[b.get('Final-Recipient') for b in self.per_rcpt]}\n"
                             f"{self.raw.decode('utf-8', 'replace')[:3000]}")

    def final_recipients(self):
        return [field_addr(b.get("Final-Recipient", "")) for b in self.per_rcpt]


def field_addr(value):
    """"rfc822; bob@x" → "bob@x" (type checked)."""
    t, _, addr = (value or "").partition(";")
    assert t.strip().lower() in ("rfc822", "utf-8"), f"address type {t!r} in {value!r}"
    return addr.strip()


def field_type_value(value):
    """"dns; mx.example" → ("dns", "mx.example")."""
    t, _, v = (value or "").partition(";")
    return t.strip().lower(), v.strip()


def check_report_frame(rep, *, sender, reporting_mta, rcpts, ret_full=False):
    """Checks the parts every DSN has; returns the Report."""
    msg = rep.msg
    dump = rep.raw.decode("utf-8", "replace")[:4000]
    assert msg.get_content_type() == "multipart/report", \
        f"Content-Type: got {msg.get_content_type()}, want multipart/report\n{dump}"
    assert (msg.get_param("report-type") or "").lower() == "delivery-status", \
        f"report-type: got {msg.get_param('report-type')!r}, want delivery-status\n{dump}"
    to = email.utils.getaddresses(msg.get_all("To", []))
    assert [a.lower() for _, a in to] == [sender.lower()], \
        f"To: got {msg.get_all('To')}, want {sender}\n{dump}"
    assert msg.get("From"), f"no From: header\n{dump}"
    assert msg.get("Date") and msg.get("Message-ID"), f"Date/Message-ID missing\n{dump}"
    ctypes = [p.get_content_type() for p in rep.parts]
    want_orig = "message/rfc822" if ret_full else "text/rfc822-headers"
    assert ctypes == ["text/plain", "message/delivery-status", want_orig], \
        f"parts: got {ctypes}, want text/plain, message/delivery-status, {want_orig}\n{dump}"
    pm = rep.per_message
    assert pm is not None, f"no per-message block\n{dump}"
    assert field_type_value(pm.get("Reporting-MTA")) == ("dns", reporting_mta), \
        f"Reporting-MTA: got {pm.get('Reporting-MTA')!r}, want 'dns; {reporting_mta}'"
    arrival = pm.get("Arrival-Date")
    assert arrival, f"no Arrival-Date in the per-message block: {pm.items()}"
    skew = abs(time.time() - parsedate_to_datetime(arrival).timestamp())
    assert skew < 600, f"Arrival-Date {arrival!r} is {skew:.0f}s away from now"
    got = sorted(a.lower() for a in rep.final_recipients())
    assert got == sorted(r.lower() for r in rcpts), \
        f"Final-Recipients: got {got}, want {sorted(rcpts)}\n{dump}"
    return rep


# ---------------------------------------------------------------- one test's world


class World:
    """The pieces of one delivery test: petrel, its MXes on one shared port, the DNS server.

    world.mx(ip, name, **kw) starts a Server on ip:world.port; world.start(...) starts
    petrel with delivery_config(...) (+ overrides)."""

    def __init__(self, petrel_factory, mx_factory, dns, hosts):
        self.petrel_factory = petrel_factory
        self.mx_factory = mx_factory
        self.dns = dns              # dns_fixture.DnsServer
        self.dns_port = dns.port
        self.hosts = list(hosts)
        self.port = shared_port(self.hosts)
        self.p = None

    def mx(self, ip, name, **kw):
        return self.mx_factory(ip, self.port, name=name, **kw)

    def lmtp(self, ip=None, name="lmtp.test", unix_path=None, port=None, **kw):
        if unix_path:
            return self.mx_factory(unix_path=unix_path, name=name, lmtp=True, **kw)
        return self.mx_factory(ip, port or self.port, name=name, lmtp=True, **kw)

    def start(self, *, routes=None, retry=None, bounce=None, extra=None, start=True):
        cfg = delivery_config(self.dns_port, self.port, routes=routes, retry=retry,
                              bounce=bounce, extra=extra)
        self.p = self.petrel_factory(config=cfg, start=start)
        return self.p


# ---------------------------------------------------------------- DNS


def zone_records(zone):
    """dns_fixture records ("NAME TYPE DATA") for a zone dict (see start_dns)."""
    recs = [f"{d} MX {pref} {host}" for d, pref, host in zone.get("mx", ())]
    recs += [f"{h} A {ip}" for h, ip in zone.get("a", ())]
    recs += [f"{d} MX 0 ." for d in zone.get("null_mx", ())]
    return recs


def start_dns(request, zone):
    """Starts dnsmasq (dns_fixture.DnsServer) serving zone; stopped at teardown.

    zone: {"mx": [(domain, pref, exchanger)], "a": [(host, ipv4)], "null_mx": [domain]};
    every other name under .test is NXDOMAIN. Returns the DnsServer (.port, .queries())."""
    from dns_fixture import DnsServer

    srv = DnsServer(request.getfixturevalue("tmp_path"), records=zone_records(zone))
    request.addfinalizer(srv.stop)
    return srv.start()
