"""The milter engine end to end, without the SMTP server: tests/milter/milter_drive
runs a scripted session through the real core/milter.c and core/conn.c on a
libuv loop against tests/milter/test_milter_filter (libmilter), so transport
(unix and inet sockets), option negotiation, macros, every command, every
reply and every modification are checked against the real libmilter.

The driver prints one JSON object per line (stage verdicts, modifications,
the message after milter_apply_mods); the filter logs what it saw.
"""

import json
import os
import socket
import subprocess
import time

import pytest

from petrel_fixture import check_no_sanitizer, free_port, sanitizer_env, to_yaml

BUILD = os.environ.get("PETREL_BUILD_DIR", "")
FILTER = os.path.join(BUILD, "tests", "milter", "test_milter_filter")
DRIVE = os.path.join(BUILD, "tests", "milter", "milter_drive")

pytestmark = pytest.mark.skipif(
    not (os.access(FILTER, os.X_OK) and os.access(DRIVE, os.X_OK)),
    reason="set PETREL_BUILD_DIR to a build with test_milter_filter and milter_drive",
)

MESSAGE = (b"Subject: hello\r\n"
           b"X-Fold: one\r\n"
           b"\ttwo\r\n"
           b"From: <a@example.org>\r\n"
           b"\r\n"
           b"body line\r\n"
           b".dot line\r\n")


class Filter:
    """One test_milter_filter process."""

    def __init__(self, tmp_path, name, args, inet=False):
        self.name = name
        self.log_path = tmp_path / f"{name}.log"
        if inet:
            self.port = free_port()
            self.spec = f"inet:{self.port}@127.0.0.1"
        else:
            self.spec = f"unix:{tmp_path / (name + '.sock')}"
        self.proc = subprocess.Popen([FILTER, "-s", self.spec, "-l", str(self.log_path)] + args,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while "ready" not in self.lines():
            if self.proc.poll() is not None:
                raise AssertionError(f"{name} exited: {self.proc.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} did not get ready")
            time.sleep(0.02)

    def lines(self):
        try:
            return self.log_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def stop(self):
        # libmilter takes ~5 s to wind down on SIGTERM; the log is flushed
        # line by line, so nothing is lost by killing it.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self.proc.stderr.close()


@pytest.fixture
def milter(tmp_path):
    filters = []

    def factory(*args, name=None, inet=False):
        f = Filter(tmp_path, name or f"f{len(filters) + 1}", list(args), inet=inet)
        filters.append(f)
        return f

    yield factory
    for f in filters:
        f.stop()


def drive(tmp_path, filters, *, rcpts=("good@example.net",), extra=(), listener=None,
          timeouts=None, default_action="tempfail", message=MESSAGE, timeout=30):
    """Writes the config, runs milter_drive, returns (records, stderr)."""
    cfg = {
        "hostname": "mx.test",
        "spool": str(tmp_path / "spool"),
        "listeners": [dict({"name": "in", "address": f"127.0.0.1:{free_port()}"},
                           **(listener or {}))],
        "milters": [],
    }
    for f in filters:
        spec = f if isinstance(f, str) else f.spec
        name = f"x{len(cfg['milters'])}" if isinstance(f, str) else f.name
        cfg["milters"].append({
            "name": name,
            "socket": spec,
            "default_action": default_action,
            "timeouts": timeouts or {"connect": "2s", "command": "5s", "eom": "5s"},
        })
    cfg_path = tmp_path / "drive.yaml"
    cfg_path.write_text(to_yaml(cfg) + "\n")
    msg_path = tmp_path / "msg.eml"
    msg_path.write_bytes(message)
    args = [DRIVE, "-c", str(cfg_path), "-a", "192.0.2.10", "-p", "40000", "-h",
            "client.example.org", "-f", "a@example.org", "-F", "SIZE=100 BODY=8BITMIME",
            "-m", str(msg_path), "-q", "QID42"]
    for r in rcpts:
        args += ["-t", r]
    args += list(extra)
    cp = subprocess.run(args, capture_output=True, timeout=timeout, env=sanitizer_env(),
                        stdin=subprocess.DEVNULL)
    err = cp.stderr.decode("utf-8", "replace")
    check_no_sanitizer(err, "milter_drive")
    assert cp.returncode == 0, f"milter_drive exited {cp.returncode}: {err}"
    records = [json.loads(line) for line in cp.stdout.decode().splitlines() if line.strip()]
    assert records and records[-1] == {"end": True}, records
    return records, err


def stage(records, name, rcpt=None):
    found = [r for r in records if r.get("stage") == name and (rcpt is None or r.get("rcpt") == rcpt)]
    assert found, f"no {name} verdict in {records}"
    assert found[-1]["check"] is None, found[-1]
    return found[-1]


def mods(records):
    return [(r["mod"], r["name"], r["index"], r["value"], r["args"]) for r in records if "mod" in r]


def message(records):
    found = [r["message"] for r in records if "message" in r]
    return found[-1].encode("latin-1") if found else None


# ---------------------------------------------------------------- transport, commands


@pytest.mark.parametrize("inet", [False, True], ids=["unix", "inet"])
def test_filter_sees_every_command_and_macro(tmp_path, milter, inet):
    f = milter(inet=inet)
    records, _ = drive(tmp_path, [f])
    for s in ("connect", "helo", "mail", "data", "eom"):
        assert stage(records, s)["verdict"] == "continue"
    assert message(records) == MESSAGE
    lines = f.lines()
    assert "negotiate actions=0x1ff protocol=0x1ff7ff" in lines
    assert "connect host=[192.0.2.10] family=4 addr=192.0.2.10 port=40000" in lines
    for want in ("macro connect j=mx.test", "macro connect {daemon_name}=in",
                 "macro connect {client_addr}=192.0.2.10", "macro connect {client_port}=40000",
                 "macro connect _=unknown [192.0.2.10]", "macro mail {mail_addr}=a@example.org",
                 "macro mail {mail_host}=example.org", "macro rcpt {rcpt_addr}=good@example.net",
                 "macro eoh i=QID42", "macro eom i=QID42"):
        assert want in lines, (want, lines)
    seq = [line for line in lines
           if not line.startswith(("macro", "negotiate", "ready")) and line != "close"]
    assert seq == [
        "connect host=[192.0.2.10] family=4 addr=192.0.2.10 port=40000",
        "helo client.example.org",
        "mail <a@example.org> SIZE=100 BODY=8BITMIME",
        "rcpt <good@example.net>",
        "data",
        "header Subject: hello",
        "header X-Fold: one\\n\\x09two",
        "header From: <a@example.org>",
        "eoh",
        "body 22 body line\\r\\n.dot line\\r\\n",
        "eom",
    ], seq


def test_big_body_goes_in_65535_byte_chunks(tmp_path, milter):
    f = milter()
    body = (b"x" * 998 + b"\r\n") * 150  # 150000 bytes
    records, _ = drive(tmp_path, [f], message=b"Subject: big\r\n\r\n" + body)
    assert stage(records, "eom")["verdict"] == "continue"
    sizes = [int(line.split()[1]) for line in f.lines() if line.startswith("body ")]
    assert sizes == [65535, 65535, 150000 - 2 * 65535]


# ---------------------------------------------------------------- replies


@pytest.mark.parametrize("where", ["connect", "helo", "mail", "rcpt", "data", "eom"])
@pytest.mark.parametrize("what,code,esc,text", [
    ("reject", 550, "5.7.1", "Command rejected"),
    ("tempfail", 451, "4.7.1", "Service unavailable - try again later"),
])
def test_reject_and_tempfail_at_each_stage(tmp_path, milter, where, what, code, esc, text):
    f = milter("-a", f"{where}={what}")
    records, err = drive(tmp_path, [f])
    v = stage(records, where)
    assert (v["verdict"], v["code"], v["esc"], v["text"], v["raw"]) == (what, code, esc, text, None)
    assert "milter-reject:" in err and "milter=f1" in err and f"reply={code} {esc} {text}" in err
    if where in ("connect", "helo"):
        assert not any(r.get("stage") == "mail" for r in records)


def test_custom_multiline_replycode_is_kept_as_is(tmp_path, milter):
    f = milter("-a", "rcpt:<bad@example.net>=mlreply:550:5.7.1:first line|second line|last line")
    records, _ = drive(tmp_path, [f], rcpts=("good@example.net", "bad@example.net"))
    assert stage(records, "rcpt", "good@example.net")["verdict"] == "continue"
    bad = stage(records, "rcpt", "bad@example.net")
    assert bad["verdict"] == "reject"
    assert bad["raw"] == ("550-5.7.1 first line\r\n550-5.7.1 second line\r\n"
                          "550 5.7.1 last line")
    assert (bad["code"], bad["esc"], bad["text"]) == (550, "5.7.1", "first line")
    # the message still goes on for the good recipient
    assert stage(records, "eom")["verdict"] == "continue"


def test_single_line_4xx_replycode(tmp_path, milter):
    f = milter("-a", "mail=reply:452:4.3.1:Insufficient storage, 100%% sure")
    records, _ = drive(tmp_path, [f])
    v = stage(records, "mail")
    assert (v["verdict"], v["raw"]) == ("tempfail", "452 4.3.1 Insufficient storage, 100% sure")


def test_discard_at_eom(tmp_path, milter):
    f = milter("-a", "eom=discard")
    records, err = drive(tmp_path, [f])
    assert stage(records, "eom")["verdict"] == "discard"
    assert message(records) is None
    assert "milter-discard:" in err


def test_discard_at_rcpt_covers_the_message(tmp_path, milter):
    f = milter("-a", "rcpt=discard")
    records, _ = drive(tmp_path, [f], rcpts=("a@example.net", "b@example.net"))
    assert stage(records, "rcpt", "a@example.net")["verdict"] == "discard"
    assert stage(records, "rcpt", "b@example.net")["verdict"] == "discard"
    assert stage(records, "eom")["verdict"] == "discard"
    assert [line for line in f.lines() if line.startswith("rcpt ")] == ["rcpt <a@example.net>"]


def test_accept_at_connect_leaves_the_session_alone(tmp_path, milter):
    f = milter("-a", "connect=accept", "-m", "addheader:X-Never:seen")
    records, _ = drive(tmp_path, [f])
    assert all(r["verdict"] == "continue" for r in records if "stage" in r)
    assert mods(records) == []
    assert not any(line.startswith("helo") for line in f.lines())


# ---------------------------------------------------------------- modifications


def test_every_modification(tmp_path, milter):
    f = milter("-m", "addheader:X-Added:added value",
               "-m", "insheader:0:X-Top:on top",
               "-m", "chgheader:Subject:1:changed",
               "-m", "delheader:X-Fold:1",
               "-m", "addheader:X-Multi:line one\\nline two",
               "-m", "chgfrom:<new@example.org>:SIZE=200",
               "-m", "addrcpt:<added@example.net>",
               "-m", "addrcpt_par:<added2@example.net>:NOTIFY=NEVER",
               "-m", "delrcpt:<good@example.net>",
               "-m", "replbody:new body\\r\\nsecond line\\n",
               "-m", "quarantine:looks suspicious")
    records, err = drive(tmp_path, [f])
    assert stage(records, "eom")["verdict"] == "continue"
    assert "mod failed" not in "\n".join(f.lines())
    got = mods(records)
    assert ("add_header", "X-Added", 0, " added value", None) in got
    assert ("insert_header", "X-Top", 0, " on top", None) in got
    assert ("change_header", "Subject", 1, " changed", None) in got
    assert ("delete_header", "X-Fold", 1, "", None) in got
    assert ("change_from", None, 0, "new@example.org", "SIZE=200") in got
    assert ("add_rcpt", None, 0, "added@example.net", None) in got
    assert ("add_rcpt", None, 0, "added2@example.net", "NOTIFY=NEVER") in got
    assert ("delete_rcpt", None, 0, "good@example.net", None) in got
    assert ("quarantine", None, 0, "looks suspicious", None) in got
    assert {"quarantine": "looks suspicious"} in records
    kinds = [m[0] for m in got]
    assert kinds.count("replace_body") == 1
    assert message(records) == (b"X-Top: on top\r\n"
                                b"Subject: changed\r\n"
                                b"From: <a@example.org>\r\n"
                                b"X-Added: added value\r\n"
                                b"X-Multi: line one\r\n\tline two\r\n"
                                b"\r\n"
                                b"new body\r\nsecond line\r\n")
    assert "milter-modify:" in err and "milter-hold:" in err and "reason=looks suspicious" in err


def test_two_filters_in_order_second_sees_first_changes(tmp_path, milter):
    a = milter("-m", "addheader:X-First:from a", name="fa")
    b = milter("-m", "chgheader:X-First:1:changed by b", name="fb")
    records, _ = drive(tmp_path, [a, b])
    assert [(m[0], m[1]) for m in mods(records)] == [("add_header", "X-First"),
                                                     ("change_header", "X-First")]
    assert "header X-First: from a" in b.lines()
    assert b"X-First: changed by b\r\n" in message(records)


def test_first_filter_reject_hides_the_command_from_the_second(tmp_path, milter):
    a = milter("-a", "mail=reject", name="fa")
    b = milter(name="fb")
    records, _ = drive(tmp_path, [a, b])
    assert stage(records, "mail")["verdict"] == "reject"
    assert not any(line.startswith("mail ") for line in b.lines())
    assert any(line.startswith("helo ") for line in b.lines())


def test_listener_selects_filters(tmp_path, milter):
    a = milter("-a", "connect=reject", name="fa")
    b = milter(name="fb")
    records, _ = drive(tmp_path, [a, b], listener={"milters": ["fb"]})
    assert stage(records, "connect")["verdict"] == "continue"
    assert not any(line.startswith("connect") for line in a.lines())


# ---------------------------------------------------------------- protocol options


def test_no_reply_and_leading_space_flags(tmp_path, milter):
    f = milter("-p", "nr_conn,nr_helo,nr_mail,nr_rcpt,nr_data,nr_hdr,nr_eoh,nr_body,leadspc",
               "-a", "rcpt=reject", "-m", "addheader:X-Lead:kept as is")
    big = b"Subject: s\r\n\r\n" + b"y" * 100000
    records, _ = drive(tmp_path, [f], message=big)
    # no reply was asked for: the filter's reject at RCPT cannot be heard
    assert stage(records, "rcpt")["verdict"] == "continue"
    assert stage(records, "eom")["verdict"] == "continue"
    lines = f.lines()
    assert "header Subject:  s" in lines  # the leading space is not eaten
    assert [int(line.split()[1]) for line in lines if line.startswith("body ")] == [65535, 34465]
    assert message(records) == b"Subject: s\r\nX-Lead:kept as is\r\n\r\n" + b"y" * 100000


def test_skip_from_the_body_callback(tmp_path, milter):
    f = milter("-p", "skip", "-a", "body=skip")
    records, _ = drive(tmp_path, [f], message=b"Subject: s\r\n\r\n" + b"y" * 200000)
    assert stage(records, "eom")["verdict"] == "continue"
    lines = f.lines()
    assert [int(line.split()[1]) for line in lines if line.startswith("body ")] == [65535]
    assert "eom" in lines


def test_no_send_flags(tmp_path, milter):
    f = milter("-p", "noconnect,nohelo,nohdrs,nobody,noeoh,nodata")
    records, _ = drive(tmp_path, [f])
    assert stage(records, "eom")["verdict"] == "continue"
    seq = [line.split()[0] for line in f.lines() if not line.startswith(("macro", "negotiate", "ready"))]
    assert seq[:3] == ["mail", "rcpt", "eom"], seq


def test_setsymlist_limits_macros(tmp_path, milter):
    f = milter("-y", "mail:{mail_addr}", "-y", "rcpt:{rcpt_host}")
    drive(tmp_path, [f])
    lines = f.lines()
    assert "macro mail {mail_addr}=a@example.org" in lines
    assert not any(line.startswith("macro mail {mail_host}") for line in lines)
    assert "macro rcpt {rcpt_host}=example.net" in lines
    assert not any(line.startswith("macro rcpt {rcpt_addr}") for line in lines)


def test_two_transactions_in_one_session(tmp_path, milter):
    f = milter("-a", "rcpt:<bad@example.net>=reject")
    records, _ = drive(tmp_path, [f], rcpts=("bad@example.net",), extra=["-r", "2"])
    assert [r["verdict"] for r in records if r.get("stage") == "rcpt"] == ["reject", "reject"]
    assert sum(1 for line in f.lines() if line.startswith("mail ")) == 2


# ---------------------------------------------------------------- failures


def test_timeout_gives_default_action(tmp_path, milter):
    f = milter("-a", "rcpt=sleep:3")
    t0 = time.monotonic()
    records, err = drive(tmp_path, [f], timeouts={"connect": "2s", "command": "1s", "eom": "5s"})
    assert time.monotonic() - t0 < 10
    v = stage(records, "rcpt")
    assert (v["verdict"], v["code"], v["esc"], v["text"]) == (
        "tempfail", 451, "4.7.1", "Mail filter unavailable, try again later")
    assert "milter-failure:" in err and "timeout waiting for the reply to 'R'" in err
    assert "status=tempfail" in err


def test_progress_keeps_a_slow_filter_alive(tmp_path, milter):
    f = milter("-a", "eom=progress:3:1")
    records, _ = drive(tmp_path, [f], timeouts={"connect": "2s", "command": "2s", "eom": "2s"})
    assert stage(records, "eom")["verdict"] == "continue"


@pytest.mark.parametrize("action,verdict,code", [("tempfail", "tempfail", 451),
                                                 ("reject", "reject", 550),
                                                 ("accept", "continue", 0)])
def test_filter_closing_mid_message(tmp_path, milter, action, verdict, code):
    f = milter("-a", "body=exit", "-m", "addheader:X-Never:seen")
    records, err = drive(tmp_path, [f], default_action=action)
    v = stage(records, "eom")
    assert (v["verdict"], v["code"]) == (verdict, code)
    assert mods(records) == []
    if action == "accept":
        assert message(records) == MESSAGE
    assert "reason=connection closed by the filter" in err and f"status={action}" in err


@pytest.mark.parametrize("action,code", [("tempfail", 451), ("reject", 550)])
def test_unreachable_filter(tmp_path, action, code):
    records, err = drive(tmp_path, [f"unix:{tmp_path / 'nobody.sock'}"], default_action=action)
    v = stage(records, "connect")
    assert (v["verdict"], v["code"]) == (action, code)
    assert "milter-failure:" in err and "connect to unix:" in err


def test_unreachable_filter_with_accept_is_ignored(tmp_path, milter):
    b = milter("-m", "addheader:X-B:yes", name="fb")
    records, _ = drive(tmp_path, [f"inet:{free_port()}@127.0.0.1", b], default_action="accept")
    assert stage(records, "eom")["verdict"] == "continue"
    assert [m[1] for m in mods(records)] == ["X-B"]
