"""The SMTP receive path as a client sees it: banner, EHLO, command replies,
what is stored (byte-exact, via `petrel queue cat`), relay control, log
lines, SMTP smuggling, pipelining, BDAT, and swaks/smtplib as real clients."""

import json
import re
import smtplib
import subprocess

import pytest

from petrel_fixture import LOG_PREFIX_RE, QID_RE, check_received
from smtpwire import RawSMTP, message

# as a relay client (127.0.0.1) sees it: XBIND is offered to relay clients only
EHLO_LINES = ["250-petrel.test", "250-PIPELINING", "250-SIZE {size}", "250-8BITMIME",
              "250-ENHANCEDSTATUSCODES", "250-SMTPUTF8", "250-CHUNKING", "250-XBIND",
              "250 DSN"]


def connect(p, **kw):
    return RawSMTP(p.host, p.port, **kw)


def assert_reply(r, want, what=""):
    """want: the exact reply line, or a prefix ending in '…' / '...'."""
    got = r.last
    if want.endswith(("…", "...")):
        prefix = want.rstrip(".…")
        assert got.startswith(prefix), f"{what}: got {str(r)!r}, want {want!r}"
    else:
        assert got == want, f"{what}: got {str(r)!r}, want {want!r}"


# ---------------------------------------------------------------- greeting, EHLO, commands


def test_banner_names_the_configured_hostname(petrel):
    p = petrel()
    with connect(p) as c:
        assert c.banner.lines == ["220 petrel.test ESMTP petrel"], f"got {c.banner!r}"


def test_ehlo_advertises_the_extensions_in_order_with_size_limit(petrel):
    p = petrel(listener={"max_message_size": "10K"})
    with connect(p) as c:
        r = c.cmd("EHLO client.test")
        want = [line.format(size=10240) for line in EHLO_LINES]
        assert r.lines == want, f"got {r.lines!r}, want {want!r}"


def test_ehlo_size_defaults_to_50_mebibytes(petrel):
    p = petrel()
    with connect(p) as c:
        r = c.cmd("EHLO client.test")
        assert "250-SIZE 52428800" in r.lines, f"got {r.lines!r}, want 250-SIZE 52428800"


def test_helo_replies_with_the_hostname_only(petrel):
    p = petrel()
    with connect(p) as c:
        r = c.cmd("HELO client.test")
        assert r.lines == ["250 petrel.test"], f"got {r.lines!r}, want ['250 petrel.test']"


@pytest.mark.parametrize("line,want", [
    ("NOOP", "250 2.0.0 Ok"),
    ("noop", "250 2.0.0 Ok"),
    ("RSET", "250 2.0.0 Ok"),
    ("VRFY bob@local.test", "252 2.5.0 …"),
    ("HELP", "214 2.0.0 …"),
    ("FROBNICATE", "500 5.5.2 Error: command not recognized"),
    ("", "500 5.5.2 …"),
])
def test_simple_commands_reply(petrel, line, want):
    p = petrel()
    with connect(p) as c:
        c.ehlo()
        assert_reply(c.cmd(line), want, repr(line))
        # the session goes on
        assert_reply(c.cmd("NOOP"), "250 2.0.0 Ok", "NOOP afterwards")


def test_quit_replies_221_and_closes(petrel):
    p = petrel()
    with connect(p) as c:
        assert_reply(c.cmd("QUIT"), "221 2.0.0 Bye", "QUIT")
        assert c.wait_closed(5), "server did not close the connection after 221"


SEQUENCE_CASES = [
    # (label, commands before the probe, probe, want)
    ("mail_before_ehlo", [], "MAIL FROM:<alice@example.org>", "503 5.5.1 …"),
    ("rcpt_before_mail", ["EHLO client.test"], "RCPT TO:<bob@local.test>", "503 5.5.1 …"),
    ("data_before_mail", ["EHLO client.test"], "DATA", "503 5.5.1 …"),
    ("data_before_rcpt", ["EHLO client.test", "MAIL FROM:<alice@example.org>"], "DATA",
     "503 5.5.1 …"),
    ("nested_mail", ["EHLO client.test", "MAIL FROM:<alice@example.org>"],
     "MAIL FROM:<carol@example.org>", "503 5.5.1 …"),
    ("mail_after_rset_is_fine", ["EHLO client.test", "MAIL FROM:<alice@example.org>", "RSET"],
     "MAIL FROM:<carol@example.org>", "250 2.1.0 Ok"),
    ("rcpt_after_rset", ["EHLO client.test", "MAIL FROM:<alice@example.org>", "RSET"],
     "RCPT TO:<bob@local.test>", "503 5.5.1 …"),
    ("bdat_before_mail", ["EHLO client.test"], "BDAT 0 LAST", "503 5.5.1 …"),
]


@pytest.mark.parametrize("label,before,probe,want", SEQUENCE_CASES,
                         ids=[c[0] for c in SEQUENCE_CASES])
def test_command_sequence(petrel, label, before, probe, want):
    p = petrel()
    with connect(p) as c:
        for line in before:
            r = c.cmd(line)
            assert r.code in (250,), f"{line!r}: got {r}, want 250"
        assert_reply(c.cmd(probe), want, repr(probe))
        assert_reply(c.cmd("NOOP"), "250 2.0.0 Ok", "NOOP afterwards")


SYNTAX_CASES = [
    ("mail_without_from", "MAIL <alice@example.org>", "501 5.5.4 …"),
    ("mail_to_keyword", "MAIL TO:<alice@example.org>", "501 5.5.4 …"),
    ("mail_bad_address", "MAIL FROM:<alice@exa..mple.org>", "501 5.1.7 …"),
    ("mail_unknown_param", "MAIL FROM:<alice@example.org> FROB=1", "555 5.5.4 …"),
    ("mail_size_not_a_number", "MAIL FROM:<alice@example.org> SIZE=abc", "555 5.5.4 …"),
    ("mail_utf8_without_smtputf8", "MAIL FROM:<j\u00f6rg@example.org>", "553 5.6.7 …"),
]


@pytest.mark.parametrize("label,line,want", SYNTAX_CASES, ids=[c[0] for c in SYNTAX_CASES])
def test_mail_syntax_errors(petrel, label, line, want):
    p = petrel()
    with connect(p) as c:
        c.ehlo()
        assert_reply(c.cmd(line), want, repr(line))
        # no transaction was opened: MAIL works now
        assert_reply(c.cmd("MAIL FROM:<alice@example.org>"), "250 2.1.0 Ok", "MAIL afterwards")


RCPT_SYNTAX_CASES = [
    ("rcpt_without_to", "RCPT <bob@local.test>", "501 5.5.4 …"),
    ("rcpt_bad_address", "RCPT TO:<bob@loc..al.test>", "501 5.1.3 …"),
    ("rcpt_unknown_param", "RCPT TO:<bob@local.test> FROB=1", "555 5.5.4 …"),
    ("rcpt_utf8_without_smtputf8", "RCPT TO:<b\u00f6b@local.test>", "553 5.6.7 …"),
]


@pytest.mark.parametrize("label,line,want", RCPT_SYNTAX_CASES,
                         ids=[c[0] for c in RCPT_SYNTAX_CASES])
def test_rcpt_syntax_errors(petrel, label, line, want):
    p = petrel()
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        assert_reply(c.cmd(line), want, repr(line))
        assert_reply(c.cmd("RCPT TO:<bob@local.test>"), "250 2.1.5 Ok", "RCPT afterwards")


# ---------------------------------------------------------------- what is stored


def test_data_message_is_stored_byte_exact_after_a_received_header(petrel):
    p = petrel()
    content = message("stored exactly", body="Line 1\r\n\r\nLine 3 \t with tab\r\n")
    with connect(p) as c:
        c.ehlo("client.test")
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0 Ok")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5 Ok")
        r = c.cmd("DATA")
        assert r.lines == ["354 End data with <CR><LF>.<CR><LF>"], f"got {r!r}"
        c.send(content + b".\r\n")
        r = c.read_reply()
        assert re.fullmatch(r"250 2\.0\.0 Ok: queued as " + QID_RE, r.last), \
            f"got {r!r}, want '250 2.0.0 Ok: queued as <16 upper-case hex digits>'"
        qid = r.qid
        c.expect("QUIT", "221 2.0.0 Bye")
    stored = p.queue_cat(qid)
    rest = check_received(stored, qid=qid, helo="client.test", proto="ESMTP",
                          rcpt="bob@local.test")
    assert rest == content, f"stored body differs:\ngot  {rest!r}\nwant {content!r}"
    q = p.queue_list()
    assert q.qids == [qid], f"queue list: got {q.qids}, want [{qid}]\n{q.text}"
    assert q.messages[qid]["sender"] == "alice@example.org", q.text
    rcpts = [(a, s) for a, s, _ in q.messages[qid]["rcpts"]]
    assert rcpts == [("bob@local.test", "pending")], f"got {rcpts}\n{q.text}"


def test_helo_session_is_recorded_as_smtp(petrel):
    p = petrel()
    content = message("helo")
    with connect(p) as c:
        c.expect("HELO oldclient.test", "250 petrel.test")
        qid = c.transaction("alice@example.org", ["bob@local.test"], content)
    rest = check_received(p.queue_cat(qid), qid=qid, helo="oldclient.test", proto="SMTP",
                          rcpt="bob@local.test")
    assert rest == content


def test_dot_unstuffing(petrel):
    p = petrel()
    # As the client means it; RawSMTP.data() dot-stuffs it on the wire.
    content = message("dots", body=".leading dot\r\n..two dots\r\n.\r\nmiddle\r\n...\r\n")
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250")
        c.expect("RCPT TO:<bob@local.test>", "250")
        c.expect("DATA", "354")
        wire = (content.replace(b"\r\n.", b"\r\n..") + b".\r\n")
        assert b"\r\n..leading dot\r\n...two dots\r\n..\r\nmiddle\r\n....\r\n" in wire
        c.send(wire)
        r = c.read_reply()
        assert r.qid, f"got {r}, want 250 queued"
    rest = check_received(p.queue_cat(r.qid), qid=r.qid, helo="client.test",
                          rcpt="bob@local.test")
    assert rest == content, f"dot-unstuffing: got {rest!r}, want {content!r}"


def test_8bitmime_body_is_stored_byte_exact(petrel):
    p = petrel()
    body = "Gr\u00fc\u00dfe, \u00e9t\u00e9 \u2603\r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n"
    content = message("8bit", body=body, headers=["Content-Type: text/plain; charset=utf-8",
                                                  "Content-Transfer-Encoding: 8bit"])
    with connect(p) as c:
        c.ehlo()
        qid = c.transaction("alice@example.org", ["bob@local.test"], content,
                            mail_params=" BODY=8BITMIME")
    rest = check_received(p.queue_cat(qid), qid=qid, helo="client.test", rcpt="bob@local.test")
    assert rest == content, f"8-bit body: got {rest!r}, want {content!r}"


def test_smtputf8_addresses_are_accepted_and_stored(petrel):
    p = petrel()
    sender = "j\u00f6rg@b\u00fccher.example"
    rcpt = "\u00fcnic\u00f8de@local.test"
    content = message("utf8", sender=sender, to=rcpt, body="Hall\u00f6\r\n".encode())
    with connect(p) as c:
        c.ehlo()
        qid = c.transaction(sender, [rcpt], content, mail_params=" SMTPUTF8 BODY=8BITMIME")
    stored = p.queue_cat(qid)
    rest = check_received(stored, qid=qid, helo="client.test", proto="UTF8ESMTP", rcpt=rcpt)
    assert rest == content
    q = p.queue_list()
    assert q.messages[qid]["sender"] == sender, f"got {q.messages[qid]['line']!r}"
    assert [a for a, _, _ in q.messages[qid]["rcpts"]] == [rcpt], q.text


def test_null_sender_is_accepted(petrel):
    p = petrel()
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<>", "250 2.1.0 Ok")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5 Ok")
        r = c.data(message("bounce"))
        assert r.qid, f"got {r}, want 250 queued"
    q = p.queue_list()
    assert q.messages[r.qid]["sender"] == "", f"got {q.messages[r.qid]['line']!r}, want <>"


def test_smtplib_sendmail_with_several_recipients(petrel):
    p = petrel()
    rcpts = ["bob@local.test", "carol@local.test", "dave@elsewhere.example"]
    content = message("smtplib", body="From smtplib.\r\n.dot\r\n")
    with smtplib.SMTP(p.host, p.port, local_hostname="smtplib.test", timeout=10) as s:
        refused = s.sendmail("alice@example.org", rcpts, content)
        assert refused == {}, f"refused recipients: {refused}"
    q = p.queue_list()
    assert len(q) == 1, f"queue list: got {len(q)} messages, want 1\n{q.text}"
    qid = q.qids[0]
    got = [(a, s) for a, s, _ in q.messages[qid]["rcpts"]]
    assert got == [(r, "pending") for r in rcpts], f"got {got}\n{q.text}"
    assert re.search(r"-- 1 messages?, 3 recipients?", q.summary or ""), \
        f"summary: got {q.summary!r}, want '-- 1 messages, 3 recipients (...)'"
    # no `for <rcpt>` clause with several recipients
    rest = check_received(p.queue_cat(qid), qid=qid, helo="smtplib.test", rcpt=None)
    assert rest == content


def test_swaks_basic_send(petrel):
    p = petrel()
    out = run_swaks(p, "--body", "swaks basic body")
    qid = swaks_qid(out)
    q = p.queue_list()
    assert q.qids == [qid], f"got {q.qids}, want [{qid}]"
    stored = p.queue_cat(qid)
    rest = check_received(stored, qid=qid, helo="swaks.test", rcpt="bob@local.test")
    assert b"\r\n\r\nswaks basic body\r\n" in rest, f"got {rest!r}"


def test_swaks_pipeline_delivers(petrel):
    p = petrel()
    out = run_swaks(p, "--pipeline", "--body", "pipelined body")
    qid = swaks_qid(out)
    q = p.queue_list()
    assert q.qids == [qid], f"got {q.qids}, want [{qid}]\n{out}"
    assert b"pipelined body" in p.queue_cat(qid)


def run_swaks(p, *args, source=None):
    cmd = ["swaks", "--server", p.host, "--port", str(p.port), "--from", "alice@example.org",
           "--to", "bob@local.test", "--helo", "swaks.test", "--timeout", "10"]
    if source:
        cmd += ["--local-interface", source]
    cp = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60,
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == 0, f"swaks exit {cp.returncode}, want 0\n{cp.stdout}\n{cp.stderr}"
    return cp.stdout


def swaks_qid(out):
    m = re.search(r"^<-\s+250 2\.0\.0 Ok: queued as (" + QID_RE + r")$", out, re.M)
    assert m, f"swaks transcript has no '250 2.0.0 Ok: queued as <QID>':\n{out}"
    return m.group(1)


# ---------------------------------------------------------------- relay control


def test_relay_denied_for_foreign_domain_from_non_relay_client(petrel):
    p = petrel()
    with connect(p, source="127.0.0.2") as c:
        c.ehlo("outsider.test")
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        r = c.cmd("RCPT TO:<victim@elsewhere.example>")
        assert r.lines == ["554 5.7.1 Relay access denied"], f"got {r!r}"
        # a relay domain is accepted from anyone
        assert_reply(c.cmd("RCPT TO:<bob@local.test>"), "250 2.1.5 Ok", "RCPT local.test")
        assert_reply(c.cmd("RCPT TO:<BOB2@LOCAL.TEST>"), "250 2.1.5 Ok", "RCPT upper case")
        r = c.data(message("from outside"))
        assert r.qid, f"got {r}, want 250 queued"
        port = c.local_port
    q = p.queue_list()
    got = [a for a, _, _ in q.messages[r.qid]["rcpts"]]
    assert got == ["bob@local.test", "BOB2@LOCAL.TEST"], f"got {got}\n{q.text}"
    p.wait_log(r"NOQUEUE: reject: session=\S+, cmd=RCPT, client=\[127\.0\.0\.2\]:" + str(port)
               + r", reply=554 5\.7\.1 Relay access denied, from=<alice@example\.org>, "
               r"to=<victim@elsewhere\.example>, helo=<?outsider\.test>?$")


def test_relay_denied_with_swaks_from_127_0_0_2(petrel):
    p = petrel()
    cmd = ["swaks", "--server", p.host, "--port", str(p.port), "--from", "alice@example.org",
           "--to", "victim@elsewhere.example", "--helo", "swaks.test", "--timeout", "10",
           "--local-interface", "127.0.0.2"]
    cp = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cp.returncode != 0, f"swaks succeeded, want a refusal\n{cp.stdout}"
    assert re.search(r"^<\*\*\s+554 5\.7\.1 Relay access denied$", cp.stdout, re.M), cp.stdout
    assert p.queue_list().empty


def test_relay_client_may_relay_anywhere(petrel):
    p = petrel()
    with connect(p) as c:
        c.ehlo()
        qid = c.transaction("alice@example.org", ["someone@elsewhere.example"],
                            message("relay"))
    assert qid in p.queue_list()


def test_pipelined_transaction_with_a_rejected_recipient(petrel):
    p = petrel()
    with connect(p, source="127.0.0.2") as c:
        c.ehlo()
        c.send("MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@local.test>\r\n"
               "RCPT TO:<victim@elsewhere.example>\r\nRCPT TO:<carol@local.test>\r\nDATA\r\n")
        got = [r.last for r in c.read_replies(5)]
        want = ["250 2.1.0 Ok", "250 2.1.5 Ok", "554 5.7.1 Relay access denied", "250 2.1.5 Ok",
                "354 End data with <CR><LF>.<CR><LF>"]
        assert got == want, f"got {got}, want {want}"
        c.send(message("partial") + b".\r\n")
        r = c.read_reply()
        assert r.qid, f"got {r}, want 250 queued"
    got = [a for a, _, _ in p.queue_list().messages[r.qid]["rcpts"]]
    assert got == ["bob@local.test", "carol@local.test"], f"got {got}"


# ---------------------------------------------------------------- logs


def test_log_lines_for_a_session_text_format(petrel):
    p = petrel()
    content = message("logged")
    with connect(p) as c:
        c.ehlo("client.test")
        qid = c.transaction("alice@example.org", ["bob@local.test"], content)
        c.expect("QUIT", "221")
        port = c.local_port
    client = r"client=\[127\.0\.0\.1\]:" + str(port)
    m = p.wait_log(r"petrel\[(\d+)\]: NOQUEUE: connect: session=(\S+), " + client
                   + r", listener=default$")
    assert int(m.group(1)) == p.pid, f"pid in log: got {m.group(1)}, want {p.pid}"
    sid = re.escape(m.group(2))
    m = p.wait_log(r"petrel\[\d+\]: " + qid + r": queued: session=" + sid + ", " + client
                   + r", from=<alice@example\.org>, size=(\d+), nrcpt=1, proto=ESMTP, "
                   r"helo=<?client\.test>?$")
    size = int(m.group(1))
    stored = len(p.queue_cat(qid))
    assert size in (len(content), stored), \
        f"size=: got {size}, want {len(content)} (as sent) or {stored} (as stored)"
    p.wait_log(r"petrel\[\d+\]: NOQUEUE: disconnect: session=" + sid + ", " + client
               + r", counts=ehlo=1 mail=1 rcpt=1 data=1 quit=1$")
    for line in p.log_lines():
        if line.strip():
            assert LOG_PREFIX_RE.match(line), f"log line without '<ISO time> petrel[pid]: ': " \
                                              f"{line!r}"


def test_log_lines_json_format(petrel):
    p = petrel(config={"log": {"format": "json"}})
    with connect(p) as c:
        c.ehlo("client.test")
        qid = c.transaction("alice@example.org", ["bob@local.test", "carol@local.test"],
                            message("json"))
        c.expect("QUIT", "221")
        port = c.local_port
    client = f"[127.0.0.1]:{port}"

    def events():
        out = []
        for line in p.log_lines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                raise AssertionError(f"log line is not JSON: {line!r}")
            assert isinstance(obj, dict), f"log line is not a JSON object: {line!r}"
            for k in ("time", "level", "pid", "qid"):
                assert k in obj, f"JSON log line lacks {k!r}: {line!r}"
            out.append(obj)
        return out

    def find(pred, what):
        from petrel_fixture import wait_until
        return wait_until(lambda: next((e for e in events() if pred(e)), None), 5, what=what)

    conn = find(lambda e: e.get("event") == "connect" and e.get("client") == client,
                "JSON connect event")
    assert conn["qid"] == "NOQUEUE" and conn.get("listener") == "default", conn
    assert int(conn["pid"]) == p.pid, f"pid: got {conn['pid']}, want {p.pid}"
    q = find(lambda e: e.get("event") == "queued" and e.get("qid") == qid, "JSON queued event")
    want = {"session": conn.get("session"), "client": client, "from": "<alice@example.org>",
            "nrcpt": "2", "proto": "ESMTP"}
    got = {k: (str(q.get(k)) if q.get(k) is not None else None) for k in want}
    assert got == want, f"queued event: got {got}, want {want}\n{q}"
    assert str(q.get("size", "")).isdigit(), f"size: got {q.get('size')!r}"
    assert q.get("helo") in ("client.test", "<client.test>"), f"helo: got {q.get('helo')!r}"
    d = find(lambda e: e.get("event") == "disconnect" and e.get("client") == client,
             "JSON disconnect event")
    assert d.get("counts") == "ehlo=1 mail=1 rcpt=2 data=1 quit=1", f"counts: got {d}"


# ---------------------------------------------------------------- SMTP smuggling / bare LF

SMUGGLED = (b"MAIL FROM:<admin@local.test>\r\nRCPT TO:<victim@local.test>\r\nDATA\r\n"
            b"Subject: smuggled\r\n\r\nsmuggled\r\n")

SMUGGLING_CASES = [
    ("lf_dot_lf", b"\n.\n"),
    ("cr_dot_cr", b"\r.\r"),
    ("lf_dot_crlf", b"\n.\r\n"),
    ("crlf_dot_lf", b"\r\n.\n"),
    ("crlf_dot_cr", b"\r\n.\r"),
    ("cr_dot_crlf", b"\r.\r\n"),
    ("bare_lf_in_line", b"\r\nbare\nlf\r\n"),
    ("bare_cr_in_line", b"\r\nbare\rcr\r\n"),
]


@pytest.mark.parametrize("label,sep", SMUGGLING_CASES, ids=[c[0] for c in SMUGGLING_CASES])
def test_smuggling_attempt_is_rejected_and_nothing_is_queued(petrel, label, sep):
    p = petrel()
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5")
        c.expect("DATA", "354")
        c.send(b"Subject: outer\r\n\r\nouter body" + sep + SMUGGLED + b".\r\n")
        r = c.read_reply()
        want = ("554 5.6.0 Error: bare CR or LF in message content is not allowed "
                "(RFC 5321 2.3.8)")
        assert r.lines == [want], f"got {r!r}, want [{want!r}]"
        # exactly one reply came back for all of it: the next one answers NOOP
        assert_reply(c.cmd("NOOP"), "250 2.0.0 Ok", "NOOP after the rejected message")
        q = p.queue_list()
        assert q.empty and len(q) == 0, f"queue after smuggling attempt: got\n{q.text}"
        # the session continues: a valid message is accepted
        content = message("after smuggling")
        qid = c.transaction("alice@example.org", ["bob@local.test"], content)
    q = p.queue_list()
    assert q.qids == [qid], f"got {q.qids}, want only [{qid}]\n{q.text}"
    rest = check_received(p.queue_cat(qid), qid=qid, helo="client.test", rcpt="bob@local.test")
    assert rest == content


# ---------------------------------------------------------------- pipelining and BDAT


def test_raw_pipelining_mail_rcpt_rcpt_data_in_one_write(petrel):
    p = petrel()
    content = message("pipelined")
    with connect(p) as c:
        c.ehlo()
        c.send("MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@local.test>\r\n"
               "RCPT TO:<carol@local.test>\r\nDATA\r\n")
        got = [r.last for r in c.read_replies(4)]
        want = ["250 2.1.0 Ok", "250 2.1.5 Ok", "250 2.1.5 Ok",
                "354 End data with <CR><LF>.<CR><LF>"]
        assert got == want, f"got {got}, want {want}"
        c.send(content + b".\r\nQUIT\r\n")            # body, dot and QUIT in one write
        r = c.read_reply()
        assert r.qid, f"got {r}, want 250 queued"
        assert c.read_reply().last == "221 2.0.0 Bye"
        assert c.wait_closed(5)
    rest = check_received(p.queue_cat(r.qid), qid=r.qid, helo="client.test", rcpt=None)
    assert rest == content


def test_two_bdat_transactions_pipelined_in_one_write(petrel):
    p = petrel()
    m1 = message("first", body="one\r\n.\r\nstill one (BDAT is not dot-stuffed)\r\n")
    m2 = message("second", sender="carol@example.org", to="dave@local.test",
                 body="..two\r\n")
    with connect(p) as c:
        c.ehlo()
        c.send(b"MAIL FROM:<alice@example.org>\r\nRCPT TO:<bob@local.test>\r\n"
               + f"BDAT {len(m1)} LAST\r\n".encode() + m1
               + b"MAIL FROM:<carol@example.org>\r\nRCPT TO:<dave@local.test>\r\n"
               + f"BDAT {len(m2)} LAST\r\n".encode() + m2 + b"QUIT\r\n")
        rs = c.read_replies(7)
        got = [r.last for r in rs]
        assert got[:2] == ["250 2.1.0 Ok", "250 2.1.5 Ok"], f"got {got}"
        assert got[3:5] == ["250 2.1.0 Ok", "250 2.1.5 Ok"], f"got {got}"
        assert got[6] == "221 2.0.0 Bye", f"got {got}"
        q1, q2 = rs[2].qid, rs[5].qid
        assert q1 and q2, f"got {got}, want two '250 2.0.0 Ok: queued as <QID>'"
        assert q1 < q2, f"queue ids not increasing: {q1} then {q2}"
        assert c.wait_closed(5)
    q = p.queue_list()
    assert q.qids == [q1, q2], f"got {q.qids}\n{q.text}"
    assert q.messages[q2]["sender"] == "carol@example.org"
    assert check_received(p.queue_cat(q1), qid=q1, helo="client.test", rcpt="bob@local.test") == m1
    assert check_received(p.queue_cat(q2), qid=q2, helo="client.test", rcpt="dave@local.test") == m2


def _chunks_split(content, at):
    out, prev = [], 0
    for a in at:
        out.append(content[prev:a])
        prev = a
    out.append(content[prev:])
    return out


BDAT_CASES = ["whole", "two_chunks", "empty_last_chunk", "crlf_split_across_chunks"]


@pytest.mark.parametrize("label", BDAT_CASES)
def test_bdat_chunks_are_stored_byte_exact(petrel, label):
    p = petrel()
    content = message("bdat " + label, body="a\r\n.\r\n..b\r\nlast line\r\n")
    cr = content.index(b"\r\n", 40) + 1          # the LF of some CRLF
    chunks = {
        "whole": [content],
        "two_chunks": _chunks_split(content, [17]),
        "empty_last_chunk": [content, b""],
        "crlf_split_across_chunks": _chunks_split(content, [cr]),
    }[label]
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5")
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            c.send(f"BDAT {len(chunk)}{' LAST' if last else ''}\r\n".encode() + chunk)
            r = c.read_reply()
            if last:
                assert r.qid, f"BDAT LAST: got {r}, want '250 2.0.0 Ok: queued as <QID>'"
            else:
                assert r.lines == [f"250 2.0.0 Ok: {len(chunk)} octets received"], \
                    f"BDAT {len(chunk)}: got {r!r}"
    rest = check_received(p.queue_cat(r.qid), qid=r.qid, helo="client.test",
                          rcpt="bob@local.test")
    assert rest == content, f"got {rest!r}, want {content!r}"


def test_data_after_bdat_is_a_sequence_error(petrel):
    p = petrel()
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5")
        c.send(b"BDAT 10\r\n0123456789")
        assert_reply(c.read_reply(), "250 2.0.0 Ok: 10 octets received", "BDAT 10")
        assert_reply(c.cmd("DATA"), "503 5.5.1 …", "DATA after BDAT")
        assert_reply(c.cmd("NOOP"), "250 2.0.0 Ok", "NOOP")


def test_rejected_bdat_chunk_is_consumed_not_parsed_as_commands(petrel):
    p = petrel()
    chunk = b"MAIL FROM:<evil@example.org>\r\n"
    with connect(p) as c:
        c.ehlo()
        c.send(f"BDAT {len(chunk)}\r\n".encode() + chunk)
        assert_reply(c.read_reply(), "503 5.5.1 …", "BDAT without MAIL")
        # if the chunk had been read as a command, this reply would be its 250 2.1.0
        assert_reply(c.cmd("NOOP"), "250 2.0.0 Ok", "NOOP after the rejected chunk")
        assert_reply(c.cmd("RCPT TO:<bob@local.test>"), "503 5.5.1 …", "RCPT (no MAIL open)")


# ---------------------------------------------------------------- XBIND (README "XBIND")

# every 127.0.0.x is local: a pool of two, one with a name of its own
XBIND_DELIVERY = {"hold": True, "hostname": "out.petrel.test",
                  "source_ips": ["127.0.0.2", "127.0.0.5"],
                  "hostnames": {"127.0.0.5": "mta.test.com"}}


def test_xbind_not_offered_to_a_non_relay_client(petrel):
    p = petrel()
    with connect(p, source="127.0.0.2") as c:
        r = c.ehlo()
        want = [line.format(size=52428800) for line in EHLO_LINES if line != "250-XBIND"]
        assert r.lines == want, f"got {r.lines!r}, want {want!r}"
        r = c.cmd("XBIND 127.0.0.5")
        assert r.lines == ["550 5.7.1 XBIND not permitted for this client"], f"got {r!r}"


def test_xbind_command_is_stored_and_survives_a_restart(petrel):
    p = petrel(config={"delivery": XBIND_DELIVERY})
    with connect(p) as c:
        c.ehlo()
        assert_reply(c.cmd("XBIND 127.0.0.3"),
                     "550 5.7.1 127.0.0.3: not in the configured source pool", "XBIND 127.0.0.3")
        assert_reply(c.cmd("XBIND 127.0.0.5"), "250 2.0.0 Bound to 127.0.0.5 as mta.test.com",
                     "XBIND 127.0.0.5")
        q1 = c.transaction("alice@example.org", ["bob@local.test"], message("one"))
        c.expect("RSET", "250 2.0.0")
        q2 = c.transaction("alice@example.org", ["bob@local.test"], message("two"))
        assert_reply(c.cmd("XBIND RESET"), "250 2.0.0 XBIND reset", "XBIND RESET")
        q3 = c.transaction("alice@example.org", ["bob@local.test"], message("three"))
    p.wait_log(q1 + r": queued: .*, xbind=127\.0\.0\.5 \(mta\.test\.com\)$")
    p.restart()
    for qid in (q1, q2):
        show = p.queue_show(qid)
        assert "\nxbind: 127.0.0.5 mta.test.com\n" in show, f"{qid}: got\n{show}"
    show = p.queue_show(q3)
    assert "xbind:" not in show, f"{q3}: got\n{show}"


def test_xbind_smtplib_mail_parameter_and_header(petrel):
    p = petrel(config={"delivery": XBIND_DELIVERY})
    header = message("hdr", headers=["X-Petrel-Bind: 127.0.0.2"])
    with smtplib.SMTP(p.host, p.port, local_hostname="smtplib.test", timeout=10) as s:
        s.ehlo()
        assert s.has_extn("xbind"), f"EHLO: got {s.esmtp_features}"
        code, text = s.docmd("XBIND", "127.0.0.5 relay.example.net")
        assert (code, text) == (250, b"2.0.0 Bound to 127.0.0.5 as relay.example.net"), \
            f"got {code} {text!r}"
        s.sendmail("alice@example.org", ["bob@local.test"], message("param"),
                   mail_options=["XBIND=127.0.0.2,param.example.net"])
        s.sendmail("alice@example.org", ["bob@local.test"], header)
        s.docmd("XBIND", "RESET")
        s.sendmail("alice@example.org", ["bob@local.test"], header)
    q = p.queue_list()
    assert len(q) == 3, f"got {len(q)} messages, want 3\n{q.text}"
    want = ["127.0.0.2 param.example.net",   # MAIL parameter beats the command
            "127.0.0.5 relay.example.net",   # command beats the header
            "127.0.0.2 out.petrel.test"]     # the header alone
    for qid, w in zip(q.qids, want):
        show = p.queue_show(qid)
        assert f"\nxbind: {w}\n" in show, f"{qid}: want xbind: {w}, got\n{show}"
    # the header never reaches the stored message; the rest is byte-identical
    for qid in q.qids[1:]:
        rest = check_received(p.queue_cat(qid), qid=qid, helo="smtplib.test",
                              rcpt="bob@local.test")
        assert rest == message("hdr"), f"{qid}: got {rest!r}"


def test_xbind_header_from_a_non_relay_client_is_removed_and_ignored(petrel):
    p = petrel(config={"delivery": XBIND_DELIVERY})
    out = run_swaks(p, "--add-header", "X-Petrel-Bind: 127.0.0.5", "--body", "b",
                    source="127.0.0.2")
    qid = swaks_qid(out)
    stored = p.queue_cat(qid)
    assert b"X-Petrel-Bind" not in stored, f"got {stored!r}"
    assert "xbind:" not in p.queue_show(qid)
    p.wait_log(qid + r": xbind header ignored: session=\S+, client=\[127\.0\.0\.2\]:\d+, "
               r"reason=XBIND not permitted for this client$")
