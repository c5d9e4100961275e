"""Milters in the SMTP session, end to end (issue 7): the real daemon (`petrel
serve`) consults libmilter filters (tests/milter/test_milter_filter, each
test picks its behaviour on the command line) and relays what it accepts to
an aiosmtpd remote MX reached through a route `smtp:[127.0.47.2]:port` (no
DNS, no delivery.hold). The client is a raw socket (smtpwire.RawSMTP) so
every reply is seen exactly as sent.

What is checked: a reject / tempfail at connect (the banner), HELO, MAIL,
RCPT (one recipient at a time), DATA and end of message reaches the client
as that command's reply; a custom multi-line SMFIR_REPLYCODE is passed as
is; discard answers 250 and delivers nothing; header and body changes,
change of sender, added and deleted recipients reach the remote MX;
quarantine holds the message in the queue (`petrel queue list`); a filter
that sleeps past its timeout or closes its socket mid-message gives the
milter's default_action; listeners[].milters selects the filters; the
filter sees the macros of each stage (queue id i at end of message, TLS
macros after STARTTLS); two filters run in order; examples/milter's filter.

Every daemon has a first listener "plain" with `milters: []` (no filter):
the fixture's start-up probe goes there, and so do the control messages that
show the delivery path works when a test asserts that something was *not*
delivered. Addresses: the remote MX on 127.0.47.2.
"""

import os
import re
import smtplib
import socket
import ssl
import subprocess
import time

import pytest

from petrel_fixture import free_port, run_cli, split_received, wait_until
from smtpwire import Closed, RawSMTP, dot_stuff
from tls_certs import TestCA

# ---------------------------------------------------------------- binaries


def build_dir():
    """$PETREL_BUILD_DIR, else the directory of $PETREL_BIN (a build tree)."""
    d = os.environ.get("PETREL_BUILD_DIR")
    if not d and os.environ.get("PETREL_BIN"):
        d = os.path.dirname(os.path.abspath(os.environ["PETREL_BIN"]))
    return d or ""


BUILD = build_dir()
FILTER = os.path.join(BUILD, "tests", "milter", "test_milter_filter")
EXAMPLE = os.path.join(BUILD, "tests", "milter", "example_milter")

needs_filter = pytest.mark.skipif(
    not os.access(FILTER, os.X_OK),
    reason=f"no test_milter_filter at {FILTER}: build it (libmilter-dev) and set PETREL_BIN "
           "or PETREL_BUILD_DIR to that build")
pytestmark = needs_filter

MX_IP = "127.0.47.2"
SENDER = "alice@sender.milter.test"
RCPT = "bob@dest.milter.test"
MX_NAME = "mx.milter.test"

DEFAULT_TIMEOUTS = {"connect": "2s", "command": "5s", "eom": "5s"}

REJECTED = "550 5.7.1 Command rejected"
TEMPFAILED = "451 4.7.1 Service unavailable - try again later"
UNAVAILABLE = {"tempfail": "451 4.7.1 Mail filter unavailable, try again later",
               "reject": "550 5.7.1 Mail filter unavailable"}


def content(subject, body=b"Hello from the milter tests.\r\n", to=RCPT, extra=()):
    hdrs = [f"From: <{SENDER}>", f"To: <{to}>", f"Subject: {subject}"] + list(extra)
    return ("\r\n".join(hdrs) + "\r\n\r\n").encode() + body


# ---------------------------------------------------------------- filters


class Filter:
    """One libmilter filter process (test_milter_filter, or another binary
    taking -s SOCKET) with a log file of what it saw."""

    def __init__(self, tmp_path, name, args, *, inet=False, binary=FILTER, log=True):
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        self.stderr_path = tmp_path / f"{name}.stderr"
        if inet:
            self.port = free_port()
            self.spec = f"inet:{self.port}@127.0.0.1"
        else:
            self.spec = f"unix:{tmp_path / (name + '.sock')}"
        argv = [binary, "-s", self.spec] + (["-l", str(self.log_path)] if log else []) + args
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 10
        while not self.ready(log):
            if self.proc.poll() is not None:
                raise AssertionError(f"filter {name} exited with {self.proc.returncode}: "
                                     f"{self.stderr_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise AssertionError(f"filter {name} did not get ready within 10 s")
            time.sleep(0.02)

    def ready(self, log):
        if log:
            return "ready" in self.lines()
        if self.spec.startswith("unix:"):
            return os.path.exists(self.spec[5:])
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    def lines(self):
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def events(self):
        """What the filter saw, without macros, negotiation and connection ends."""
        return [line for line in self.lines()
                if not line.startswith(("macro ", "negotiate ", "ready"))
                and line not in ("close", "abort")]

    def saw(self, prefix):
        return [line for line in self.lines() if line.startswith(prefix)]

    def stop(self):
        # libmilter takes seconds to wind down on SIGTERM; its log is flushed
        # line by line, so nothing is lost by killing it.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def milter(tmp_path):
    """Factory: milter(*args, name=..., inet=False, binary=FILTER) -> started Filter."""
    started = []

    def factory(*args, name=None, inet=False, binary=FILTER, log=True):
        f = Filter(tmp_path, name or f"f{len(started) + 1}", list(args), inet=inet,
                   binary=binary, log=log)
        started.append(f)
        return f

    yield factory
    for f in started:
        f.stop()


# ---------------------------------------------------------------- petrel + MX


class MilterWorld:
    """One test's petrel (listeners: "plain" without milters, then the given
    ones), its milters and the remote MX every domain is routed to."""

    def __init__(self, petrel, mx_servers, mx_ip=MX_IP):
        self.petrel_factory = petrel
        self.mx = mx_servers(mx_ip, free_port(mx_ip), name=MX_NAME)
        self.p = None
        self.ports = {}

    def start(self, milters, listeners=None, *, config=None):
        """milters: [Filter or dict (milters[] entry; "filter": Filter or "socket")].
        listeners: {name: [milter names] | None (all) | dict (listener keys)};
        default {"milter": None}. Returns the Petrel."""
        entries = []
        for m in milters:
            if isinstance(m, Filter):
                m = {"filter": m}
            m = dict(m)
            f = m.pop("filter", None)
            e = {"name": m.pop("name", f.name if f else None),
                 "socket": m.pop("socket", f.spec if f else None),
                 "default_action": m.pop("default_action", "tempfail"),
                 "timeouts": m.pop("timeouts", DEFAULT_TIMEOUTS)}
            e.update(m)
            entries.append(e)
        listeners = {"milter": None} if listeners is None else listeners
        cfg = {
            "delivery": {"hostname": "relay.milter.test", "connection_cache_time": "1s",
                         "tls": "none",
                         "timeouts": {"connect": "3s", "greeting": "10s", "command": "10s",
                                      "data_init": "10s", "data_block": "10s",
                                      "data_end": "10s"}},
            "routes": [{"domain": "*", "via": f"smtp:[{self.mx.host}]:{self.mx.port}"}],
            "retry": {"schedule": ["1s"], "max_attempts": 3, "max_age": "1h"},
            "milters": entries,
        }
        cfg.update(config or {})
        self.p = p = self.petrel_factory(config=cfg, listener={"name": "plain", "milters": []},
                                         start=False)
        self.ports = dict(zip(listeners, distinct_ports(len(listeners), exclude={p.port})))
        base = p.config_dict

        def config_dict():
            d = base()
            for name, sel in listeners.items():
                lc = {"name": name, "address": f"{p.host}:{self.ports[name]}"}
                if isinstance(sel, dict):
                    lc.update(sel)
                elif sel is not None:
                    lc["milters"] = list(sel)
                d["listeners"].append(lc)
            return d

        p.config_dict = config_dict
        return p.start()

    def connect(self, listener="milter", banner=True, timeout=15.0):
        port = self.p.port if listener == "plain" else self.ports[listener]
        return RawSMTP(self.p.host, port, banner=banner, timeout=timeout)

    def control(self, subject="control"):
        """Sends a message through the plain listener and waits until the MX has it:
        the delivery path works, so what did not arrive before it was not sent."""
        with self.connect("plain") as c:
            c.ehlo()
            qid = c.transaction(SENDER, [RCPT], content(subject))
            c.expect("QUIT", "221")
        mx_message(self.mx, subject)
        return qid

    def queue(self):
        return self.p.queue_list()


def distinct_ports(n, host="127.0.0.1", exclude=()):
    """n different TCP ports, none in exclude, that were free a moment ago (all
    bound at once, so that free_port()'s bind-and-release cannot hand out the
    same one twice)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            port = s.getsockname()[1]
            if port not in exclude:
                ports.append(port)
            assert len(socks) < n + 100, "no free ports"
        return ports
    finally:
        for s in socks:
            s.close()


def mx_message(mx, subject, timeout=15.0):
    """The transaction at the MX whose content has `Subject: subject` (bounded wait)."""
    want = f"\r\nSubject: {subject}\r\n".encode()

    def find():
        return [t for t in mx.messages if want in b"\r\n" + t.data]

    got = wait_until(find, timeout, what=f"the MX receiving {subject!r}\n{mx.describe()}")
    assert len(got) == 1, f"the MX got {subject!r} {len(got)} times: {got}"
    return got[0]


def mx_subjects(mx):
    out = []
    for t in mx.all_transactions():
        m = re.search(rb"\r\nSubject: ([^\r\n]*)\r\n", b"\r\n" + (t.data or b""))
        if m:
            out.append(m.group(1).decode())
    return out


def body_after_received(t):
    """The MX's DATA bytes without petrel's Received header (format checked)."""
    _, rest = split_received(t.data)
    return rest


def txn(c, rcpts, data, *, sender=SENDER, mail_params=""):
    """MAIL, each RCPT, DATA (if a recipient was accepted): the replies as
    {"mail", "rcpt": [..], "data" (the DATA command), "end" (after the dot)}."""
    out = {"mail": c.cmd(f"MAIL FROM:<{sender}>{mail_params}"), "rcpt": [], "data": None,
           "end": None}
    if out["mail"].code != 250:
        return out
    for r in rcpts:
        out["rcpt"].append(c.cmd(f"RCPT TO:<{r}>"))
    if not any(r.code == 250 for r in out["rcpt"]):
        return out
    out["data"] = c.cmd("DATA")
    if out["data"].code != 354:
        return out
    c.send(dot_stuff(data))
    out["end"] = c.read_reply()
    return out


def expect_lines(reply, want, what):
    want = [want] if isinstance(want, str) else list(want)
    assert reply is not None, f"{what}: no reply (the command was not reached)"
    assert reply.lines == want, f"{what}: got {reply}, want {' / '.join(want)}"


def expect_queued(reply, what="end of DATA"):
    assert reply is not None and reply.qid, \
        f"{what}: got {reply}, want '250 2.0.0 Ok: queued as <QID>'"
    return reply.qid


def refused_later(c):
    """After a refusal at connect or HELO: the session is closed, or MAIL is refused.
    Returns the MAIL reply (None if the connection was closed)."""
    try:
        r = c.cmd(f"MAIL FROM:<{SENDER}>", timeout=5)
    except (Closed, ConnectionError):
        return None
    assert r.code >= 400, f"MAIL after a milter refusal: got {r}, want a refusal"
    return r


# ---------------------------------------------------------------- fixtures


@pytest.fixture
def world(petrel, mx_servers):
    return MilterWorld(petrel, mx_servers)


# ---------------------------------------------------------------- pass-through, macros


def test_message_through_a_filter_reaches_the_mx_unchanged_and_the_filter_saw_it_all(
        world, milter):
    f = milter()
    world.start([f])
    data = content("pass through", extra=["X-Fold: one", "\ttwo"],
                   body=b"body line\r\n.dot line\r\n")
    with world.connect() as c:
        assert c.banner.code == 220, f"banner: got {c.banner}"
        c.ehlo("client.test")
        r = txn(c, [RCPT], data, mail_params=" SIZE=500")
        qid = expect_queued(r["end"])
        client_port = c.local_port
        c.expect("QUIT", "221")
    t = mx_message(world.mx, "pass through")
    assert t.mail_from == SENDER and t.rcpt_tos == [RCPT], t
    assert body_after_received(t) == data, f"the MX got {t.data!r}"
    assert f"connect host=[127.0.0.1] family=4 addr=127.0.0.1 port={client_port}" in f.lines()
    assert f.events() == [
        f"connect host=[127.0.0.1] family=4 addr=127.0.0.1 port={client_port}",
        "helo client.test",
        f"mail <{SENDER}> SIZE=500",
        f"rcpt <{RCPT}>",
        "data",
        f"header From: <{SENDER}>",
        f"header To: <{RCPT}>",
        "header Subject: pass through",
        "header X-Fold: one\\n\\x09two",
        "eoh",
        "body 22 body line\\r\\n.dot line\\r\\n",
        "eom",
    ], f.lines()
    lines = f.lines()
    for want in ("macro connect j=petrel.test",
                 "macro connect {daemon_name}=milter",
                 "macro connect {client_addr}=127.0.0.1",
                 f"macro connect {{client_port}}={client_port}",
                 f"macro connect {{daemon_port}}={world.ports['milter']}",
                 f"macro mail {{mail_addr}}={SENDER}",
                 "macro mail {mail_host}=sender.milter.test",
                 f"macro rcpt {{rcpt_addr}}={RCPT}",
                 "macro rcpt {rcpt_host}=dest.milter.test",
                 f"macro eom i={qid}"):
        assert want in lines, f"filter log lacks {want!r}:\n" + "\n".join(lines)
    # no AUTH in this session: no authentication macros
    assert not [line for line in lines if "{auth_" in line], lines
    # the start-up probe on the plain listener never reached it
    assert sum(1 for line in lines if line.startswith("connect ")) == 1, lines


def test_tls_macros_after_starttls(world, milter, tmp_path):
    ca = TestCA(tmp_path / "ca")
    cert, key = ca.leaf("petrel.test", ips=["127.0.0.1"])
    f = milter()
    world.start([f], {"milter": {"tls": "starttls"}},
                config={"tls": {"cert": str(cert), "key": str(key)}})
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    ctx.check_hostname = False
    with smtplib.SMTP("127.0.0.1", world.ports["milter"], local_hostname="tls.client.test",
                      timeout=15) as s:
        s.ehlo()
        s.starttls(context=ctx)
        s.ehlo()
        s.sendmail(SENDER, [RCPT], content("over tls"))
    mx_message(world.mx, "over tls")
    lines = f.lines()
    assert lines.count("helo tls.client.test") == 2, lines
    # the first HELO had no TLS; the second (and every later stage) has it
    helo_macros = []
    for line in lines:
        if line == "helo tls.client.test":
            helo_macros.append([])
        elif line.startswith("macro helo ") and helo_macros:
            helo_macros[-1].append(line)
    assert not any("{tls_version}" in m for m in helo_macros[0]), helo_macros
    assert any(re.fullmatch(r"macro helo \{tls_version\}=TLSv1\.[23]", m)
               for m in helo_macros[1]), helo_macros
    assert any(re.fullmatch(r"macro helo \{cipher\}=\S+", m) for m in helo_macros[1]), \
        helo_macros


# ---------------------------------------------------------------- reject and tempfail


def two_filters(milter, stage, rej="reject", tmp="tempfail"):
    """A filter answering `rej` at stage and one answering `tmp`, on listeners
    "rej" and "tmp" of one daemon."""
    a = milter("-a", f"{stage}={rej}", name="rej")
    b = milter("-a", f"{stage}={tmp}", name="tmp")
    return [a, b], {"rej": ["rej"], "tmp": ["tmp"]}


def test_reject_and_tempfail_at_connect_are_the_banner(world, milter):
    filters, listeners = two_filters(milter, "connect")
    world.start(filters, listeners)
    for lst, code, esc in (("rej", 5, "5.7.1"), ("tmp", 4, "4.7.")):
        with world.connect(lst) as c:
            b = c.banner
            assert b.code // 100 == code and f" {esc}" in b.first, \
                f"listener {lst}: banner {b}, want a {code}xx {esc} refusal"
            refused_later(c)
    for f in filters:
        assert f.saw("connect ") and not f.saw("helo "), f.lines()
    # the plain listener still greets normally
    world.control()


def test_reject_and_tempfail_at_helo_are_the_ehlo_reply(world, milter):
    filters, listeners = two_filters(milter, "helo")
    world.start(filters, listeners)
    for lst, want in (("rej", REJECTED), ("tmp", TEMPFAILED)):
        with world.connect(lst) as c:
            assert c.banner.code == 220, f"banner: {c.banner}"
            expect_lines(c.cmd("EHLO client.test"), want, f"{lst}: EHLO")
            refused_later(c)
    for f in filters:
        assert f.saw("helo client.test") and not f.saw("mail "), f.lines()


def test_reject_and_tempfail_at_mail(world, milter):
    filters, listeners = two_filters(milter, "mail")
    world.start(filters, listeners)
    for lst, want in (("rej", REJECTED), ("tmp", TEMPFAILED)):
        with world.connect(lst) as c:
            c.ehlo()
            r = txn(c, [RCPT], content(f"mail {lst}"))
            expect_lines(r["mail"], want, f"{lst}: MAIL")
            # the session goes on: the next MAIL is asked again
            expect_lines(c.cmd("RSET"), "250 2.0.0 Ok", "RSET")
            expect_lines(c.cmd(f"MAIL FROM:<{SENDER}>"), want, f"{lst}: second MAIL")
            c.expect("QUIT", "221")
    for f in filters:
        assert len(f.saw("mail ")) == 2 and not f.saw("rcpt "), f.lines()
    world.control()
    assert mx_subjects(world.mx) == ["control"]


def test_reject_and_tempfail_at_rcpt(world, milter):
    filters, listeners = two_filters(milter, "rcpt")
    world.start(filters, listeners)
    for lst, want in (("rej", REJECTED), ("tmp", TEMPFAILED)):
        with world.connect(lst) as c:
            c.ehlo()
            r = txn(c, [RCPT, "carol@dest.milter.test"], content(f"rcpt {lst}"))
            expect_lines(r["mail"], "250 2.1.0 Ok", "MAIL")
            for got in r["rcpt"]:
                expect_lines(got, want, f"{lst}: RCPT")
            assert r["data"] is None
            c.expect("QUIT", "221")
    for f in filters:
        assert len(f.saw("rcpt ")) == 2 and not f.saw("data"), f.lines()
    assert world.queue().empty


def test_rejected_recipient_does_not_stop_the_others(world, milter):
    f = milter("-a", "rcpt:<bad@dest.milter.test>=reject",
               "-a", "rcpt:<later@dest.milter.test>=tempfail",
               "-a", "rcpt:<custom@dest.milter.test>=reply:553:5.1.3:Not that one")
    world.start([f])
    rcpts = ["bad@dest.milter.test", RCPT, "later@dest.milter.test",
             "custom@dest.milter.test", "carol@dest.milter.test"]
    with world.connect() as c:
        c.ehlo()
        r = txn(c, rcpts, content("some recipients"))
        got = [x.lines for x in r["rcpt"]]
        assert got == [[REJECTED], ["250 2.1.5 Ok"], [TEMPFAILED],
                       ["553 5.1.3 Not that one"], ["250 2.1.5 Ok"]], got
        expect_queued(r["end"])
        c.expect("QUIT", "221")
    t = mx_message(world.mx, "some recipients")
    assert sorted(t.rcpt_tos) == sorted([RCPT, "carol@dest.milter.test"]), t
    assert [line for line in f.lines() if line.startswith("rcpt ")] == \
        [f"rcpt <{a}>" for a in rcpts]


def test_reject_and_tempfail_at_data_command(world, milter):
    filters, listeners = two_filters(milter, "data")
    world.start(filters, listeners)
    for lst, want in (("rej", REJECTED), ("tmp", TEMPFAILED)):
        with world.connect(lst) as c:
            c.ehlo()
            r = txn(c, [RCPT], content(f"data {lst}"))
            expect_lines(r["data"], want, f"{lst}: DATA")
            c.expect("QUIT", "221")
    for f in filters:
        assert f.saw("data") and not f.saw("header "), f.lines()
    assert world.queue().empty


def test_reject_and_tempfail_at_end_of_message(world, milter):
    filters, listeners = two_filters(milter, "eom")
    world.start(filters, listeners)
    for lst, want in (("rej", REJECTED), ("tmp", TEMPFAILED)):
        with world.connect(lst) as c:
            c.ehlo()
            r = txn(c, [RCPT], content(f"eom {lst}"))
            expect_lines(r["end"], want, f"{lst}: end of DATA")
            # the session is usable afterwards
            expect_lines(c.cmd("RSET"), "250 2.0.0 Ok", "RSET after a refused message")
            c.expect("QUIT", "221")
    for f in filters:
        assert f.saw("eom"), f.lines()
    assert world.queue().empty, "a refused message was queued"
    world.control()
    assert mx_subjects(world.mx) == ["control"], world.mx.describe()
    assert world.p.wait_log(r"milter-reject: .*milter=rej")


def test_custom_multiline_replies_are_passed_as_is(world, milter):
    a = milter("-a", "connect=mlreply:554:5.7.1:You are not welcome|Go away", name="conn")
    b = milter("-a", "eom=mlreply:451:4.7.1:Greylisted|come back|in 5 minutes", name="eom")
    c1 = milter("-a", "mail=reply:521:5.7.0:No mail from you", name="mail")
    world.start([a, b, c1], {"conn": ["conn"], "eom": ["eom"], "mail": ["mail"]})
    with world.connect("conn") as c:
        assert c.banner.lines == ["554-5.7.1 You are not welcome", "554 5.7.1 Go away"], \
            f"banner: got {c.banner}"
    with world.connect("eom") as c:
        c.ehlo()
        r = txn(c, [RCPT], content("greylisted"))
        expect_lines(r["end"], ["451-4.7.1 Greylisted", "451-4.7.1 come back",
                                "451 4.7.1 in 5 minutes"], "end of DATA")
    with world.connect("mail") as c:
        c.ehlo()
        expect_lines(c.cmd(f"MAIL FROM:<{SENDER}>"), "521 5.7.0 No mail from you", "MAIL")
    assert world.queue().empty


# ---------------------------------------------------------------- discard


def test_discard_answers_250_and_delivers_nothing(world, milter):
    a = milter("-a", "eom=discard", name="eom")
    b = milter("-a", "rcpt:<bob@dest.milter.test>=discard", name="rcpt")
    world.start([a, b], {"eom": ["eom"], "rcpt": ["rcpt"]})
    with world.connect("eom") as c:
        c.ehlo()
        r = txn(c, [RCPT], content("discarded at eom"))
        assert r["end"] is not None and r["end"].first.startswith("250 2.0.0"), \
            f"end of DATA: got {r['end']}, want 250 2.0.0 ..."
        c.expect("QUIT", "221")
    with world.connect("rcpt") as c:
        c.ehlo()
        r = txn(c, ["carol@dest.milter.test", RCPT, "dave@dest.milter.test"],
                content("discarded at rcpt"))
        assert [x.code for x in r["rcpt"]] == [250, 250, 250], r["rcpt"]
        assert r["end"] is not None and r["end"].first.startswith("250 2.0.0"), \
            f"end of DATA: got {r['end']}, want 250 2.0.0 ..."
        c.expect("QUIT", "221")
    # once discarded, the filter is not asked about the later recipient
    assert [line for line in b.lines() if line.startswith("rcpt ")] == \
        ["rcpt <carol@dest.milter.test>", f"rcpt <{RCPT}>"], b.lines()
    world.control()
    assert mx_subjects(world.mx) == ["control"], world.mx.describe()
    assert world.queue().empty
    world.p.wait_log(r"milter-discard")
    assert sum(1 for line in world.p.log_lines() if "milter-discard" in line) >= 2, \
        world.p.log_tail()


# ---------------------------------------------------------------- modifications


def test_header_and_body_changes_reach_the_mx(world, milter):
    f = milter("-m", "addheader:X-Added:added value",
               "-m", "insheader:0:X-Top:on top",
               "-m", "chgheader:Subject:1:changed subject",
               "-m", "delheader:X-Fold:1",
               "-m", "addheader:X-Multi:line one\\nline two",
               "-m", "replbody:new body\\r\\nsecond line\\n")
    world.start([f])
    data = (b"Subject: original\r\n"
            b"X-Fold: one\r\n\ttwo\r\n" +
            f"From: <{SENDER}>\r\n".encode() +
            b"\r\n"
            b"old body\r\n")
    with world.connect() as c:
        c.ehlo()
        qid = expect_queued(txn(c, [RCPT], data)["end"])
        c.expect("QUIT", "221")
    assert "mod failed" not in "\n".join(f.lines())
    t = mx_message(world.mx, "changed subject")
    want = (b"X-Top: on top\r\n"
            b"Subject: changed subject\r\n" +
            f"From: <{SENDER}>\r\n".encode() +
            b"X-Added: added value\r\n"
            b"X-Multi: line one\r\n\tline two\r\n"
            b"\r\n"
            b"new body\r\nsecond line\r\n")
    got = body_after_received(t)
    assert got == want, f"the MX got\n{got!r}\nwant\n{want!r}"
    m, _ = split_received(t.data)
    assert m.group("qid").decode() == qid
    world.p.wait_log(re.escape(qid) + r": milter-modify: ")


def test_change_sender_add_and_delete_recipients(world, milter):
    f = milter("-m", "chgfrom:<new-sender@sender.milter.test>",
               "-m", "addrcpt:<added@dest.milter.test>",
               "-m", "addrcpt:<other@else.milter.test>",
               "-m", "delrcpt:<carol@dest.milter.test>")
    world.start([f])
    with world.connect() as c:
        c.ehlo()
        r = txn(c, [RCPT, "carol@dest.milter.test"], content("envelope changes"))
        qid = expect_queued(r["end"])
        c.expect("QUIT", "221")
    # every domain goes to the same MX: count recipients over all transactions
    deadline = time.monotonic() + 15
    while True:
        txns = [t for t in world.mx.messages if b"Subject: envelope changes" in t.data]
        got = sorted(a for t in txns for a in t.delivered_to)
        if len(got) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert got == sorted([RCPT, "added@dest.milter.test", "other@else.milter.test"]), \
        world.mx.describe()
    assert {t.mail_from for t in txns} == {"new-sender@sender.milter.test"}, txns
    # the header section is not touched by envelope changes
    for t in txns:
        assert body_after_received(t) == content("envelope changes"), t.data
    time.sleep(0.3)
    assert world.mx.rcpt_attempts("carol@dest.milter.test") == 0, world.mx.describe()
    # the queue forgets the message once delivered
    wait_until(lambda: qid not in world.queue(), 10, what=f"{qid} leaving the queue")


def test_two_filters_in_order_the_second_sees_the_first_ones_changes(world, milter):
    a = milter("-m", "addheader:X-First:from a", name="fa")
    b = milter("-m", "chgheader:X-First:1:changed by b", "-m", "addheader:X-Second:b", name="fb")
    world.start([a, b])
    with world.connect() as c:
        c.ehlo()
        expect_queued(txn(c, [RCPT], content("two filters"))["end"])
    t = mx_message(world.mx, "two filters")
    assert "header X-First: from a" in b.lines(), b.lines()
    got = body_after_received(t)
    assert b"X-First: changed by b\r\nX-Second: b\r\n\r\n" in got, got


# ---------------------------------------------------------------- quarantine


def test_quarantine_holds_the_message_in_the_queue(world, milter):
    f = milter("-m", "quarantine:looks suspicious")
    world.start([f])
    with world.connect() as c:
        c.ehlo()
        qid = expect_queued(txn(c, [RCPT], content("to quarantine"))["end"])
        c.expect("QUIT", "221")
    world.control()
    time.sleep(0.5)
    assert "to quarantine" not in mx_subjects(world.mx), world.mx.describe()
    q = world.queue()
    assert qid in q, f"quarantined {qid} is not in the queue:\n{q.text}"
    line = q.messages[qid]["line"]
    assert line.endswith("(quarantined: looks suspicious)"), f"queue list line: {line!r}"
    assert q.summary and "1 quarantined" in q.summary, q.text
    assert [a for a, _, _ in q.messages[qid]["rcpts"]] == [RCPT], q.text
    assert "quarantine: looks suspicious" in world.p.queue_show(qid)
    world.p.wait_log(re.escape(qid) + r": milter-hold: .*reason=looks suspicious")
    # still held after a restart
    world.p.restart()
    time.sleep(0.5)
    assert qid in world.queue()
    assert "to quarantine" not in mx_subjects(world.mx)


# ---------------------------------------------------------------- failures


ACTIONS = ("tempfail", "reject", "accept")


def test_filter_slower_than_eom_timeout_gives_default_action(world, milter):
    filters = [milter("-a", "eom=sleep:4", "-m", "addheader:X-Never:seen", name=a)
               for a in ACTIONS]
    slow_rcpt = milter("-a", "rcpt=sleep:4", name="slowrcpt")
    timeouts = {"connect": "2s", "command": "1s", "eom": "1s"}
    entries = [{"filter": f, "default_action": f.name, "timeouts": timeouts} for f in filters]
    entries.append({"filter": slow_rcpt, "default_action": "tempfail", "timeouts": timeouts})
    world.start(entries, {a: [a] for a in ACTIONS} | {"slowrcpt": ["slowrcpt"]})
    for a in ACTIONS:
        with world.connect(a) as c:
            c.ehlo()
            t0 = time.monotonic()
            r = txn(c, [RCPT], content(f"slow {a}"))
            took = time.monotonic() - t0
            if a == "accept":
                expect_queued(r["end"], f"{a}: end of DATA")
            else:
                expect_lines(r["end"], UNAVAILABLE[a], f"{a}: end of DATA")
            assert took < 3.5, f"{a}: the end of DATA took {took:.1f}s (eom timeout 1s)"
    with world.connect("slowrcpt") as c:
        c.ehlo()
        r = txn(c, [RCPT], content("slow rcpt"))
        expect_lines(r["rcpt"][0], UNAVAILABLE["tempfail"], "RCPT to a sleeping filter")
    t = mx_message(world.mx, "slow accept")
    assert b"X-Never" not in t.data, "an accept-on-failure filter's changes were applied"
    assert body_after_received(t) == content("slow accept")
    world.control()
    assert sorted(mx_subjects(world.mx)) == ["control", "slow accept"], world.mx.describe()
    for a in ACTIONS:
        world.p.wait_log(rf"milter-failure: .*milter={a}\b.*status={a}")


def test_filter_closing_its_socket_mid_message_gives_default_action(world, milter):
    filters = [milter("-a", "body=exit", "-m", "addheader:X-Never:seen", name=a)
               for a in ACTIONS]
    world.start([{"filter": f, "default_action": f.name} for f in filters],
                {a: [a] for a in ACTIONS})
    for a in ACTIONS:
        with world.connect(a) as c:
            c.ehlo()
            r = txn(c, [RCPT], content(f"closed {a}"))
            if a == "accept":
                expect_queued(r["end"], f"{a}: end of DATA")
            else:
                expect_lines(r["end"], UNAVAILABLE[a], f"{a}: end of DATA")
    for f in filters:
        assert "exit body" in f.lines(), f.lines()
    t = mx_message(world.mx, "closed accept")
    assert body_after_received(t) == content("closed accept"), t.data
    world.control()
    assert sorted(mx_subjects(world.mx)) == ["closed accept", "control"], world.mx.describe()
    world.p.wait_log(r"milter-failure: .*milter=reject\b.*reason=connection closed by the "
                     r"filter.*status=reject")


def test_unreachable_filter(world, tmp_path):
    gone = f"unix:{tmp_path / 'nobody.sock'}"
    world.start([{"name": "down_accept", "socket": gone, "default_action": "accept"},
                 {"name": "down_tempfail", "socket": gone, "default_action": "tempfail"}],
                {"acc": ["down_accept"], "tmp": ["down_tempfail"]})
    with world.connect("acc") as c:
        c.ehlo()
        expect_queued(txn(c, [RCPT], content("filter down, accept"))["end"])
        c.expect("QUIT", "221")
    mx_message(world.mx, "filter down, accept")
    # tempfail: the session cannot get a message in, and the first refusal is 4.7.1
    with world.connect("tmp") as c:
        first = None
        if c.banner.code != 220:
            first = c.banner
        else:
            r = c.cmd("EHLO client.test")
            if r.code != 250:
                first = r
            else:
                r = txn(c, [RCPT], content("filter down, tempfail"))
                steps = [r["mail"]] + r["rcpt"] + [r["data"], r["end"]]
                first = next((x for x in steps if x is not None and x.code >= 400), None)
        assert first is not None and first.first.startswith(UNAVAILABLE["tempfail"]), \
            f"with an unreachable tempfail filter: first refusal {first}, want " \
            f"{UNAVAILABLE['tempfail']}"
    world.p.wait_log(r"milter-failure: .*milter=down_tempfail.*status=tempfail")


# ---------------------------------------------------------------- per-listener selection


def test_listeners_choose_their_milters(world, milter):
    a = milter("-m", "addheader:X-Filter-A:yes", name="fa")
    b = milter("-m", "addheader:X-Filter-B:yes", name="fb")
    world.start([a, b], {"only_a": ["fa"], "only_b": ["fb"], "both": None})
    for lst in ("only_a", "only_b", "both", "plain"):
        with world.connect(lst) as c:
            c.ehlo()
            expect_queued(txn(c, [RCPT], content(f"via {lst}"))["end"])
            c.expect("QUIT", "221")
    got = {}
    for lst in ("only_a", "only_b", "both", "plain"):
        data = mx_message(world.mx, f"via {lst}").data
        got[lst] = (b"X-Filter-A: yes" in data, b"X-Filter-B: yes" in data)
    assert got == {"only_a": (True, False), "only_b": (False, True), "both": (True, True),
                   "plain": (False, False)}, got
    assert sorted(line for line in a.lines() if line.startswith("macro connect {daemon_name}")) \
        == ["macro connect {daemon_name}=both", "macro connect {daemon_name}=only_a"], a.lines()
    assert sorted(line for line in b.lines() if line.startswith("macro connect {daemon_name}")) \
        == ["macro connect {daemon_name}=both", "macro connect {daemon_name}=only_b"], b.lines()


# ---------------------------------------------------------------- examples/milter


@pytest.mark.skipif(not os.access(EXAMPLE, os.X_OK), reason=f"no example_milter at {EXAMPLE}")
def test_example_milter_adds_its_header_and_rejects_the_keyword(world, milter):
    f = milter("-k", "forbidden-word", binary=EXAMPLE, log=False, name="example")
    world.start([f])
    with world.connect() as c:
        c.ehlo()
        expect_queued(txn(c, [RCPT], content("clean one"))["end"])
        # the keyword in another case, across the first 65535-byte body chunk's end
        body = (b"x" * 998 + b"\r\n") * 65 + b"y" * 530 + b"FORBIDDEN-WORD is here\r\n"
        assert body.index(b"FORBIDDEN") == 65535 - 5
        r = txn(c, [RCPT], content("dirty one", body=body))
        expect_lines(r["end"], "550 5.7.1 Message contains a forbidden word",
                     "end of DATA with the keyword")
        c.expect("QUIT", "221")
    t = mx_message(world.mx, "clean one")
    got = body_after_received(t)
    assert got == content("clean one").replace(b"\r\n\r\n", b"\r\nX-Example-Milter: seen\r\n\r\n",
                                               1), got
    world.control()
    assert sorted(mx_subjects(world.mx)) == ["clean one", "control"]


def test_example_milter_documented_yaml_is_valid(tmp_path):
    """The YAML shown in examples/milter/README.md passes check-config."""
    src = os.environ.get("PETREL_SOURCE_DIR") or os.path.join(os.path.dirname(__file__), "..",
                                                               "..")
    readme = open(os.path.join(src, "examples", "milter", "README.md"), encoding="utf-8").read()
    m = re.search(r"```yaml\n(.*?)```", readme, re.S)
    assert m, "examples/milter/README.md has no ```yaml block"
    cfg = tmp_path / "example.yaml"
    cfg.write_text(m.group(1).replace("/var/spool/petrel", str(tmp_path / "spool")))
    cp = run_cli(["check-config", "-c", str(cfg)])
    assert cp.returncode == 0, f"check-config: exit {cp.returncode}\n{cp.stdout!r}\n{cp.stderr}"

