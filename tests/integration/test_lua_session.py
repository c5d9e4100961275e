"""Lua policy hooks in the SMTP session, end to end (issue 6): the real daemon
(`petrel serve`) with `lua: {script: ...}`, the script written into the
test's tmp_path, delivery.hold (nothing leaves; what was accepted is looked at
with `petrel queue list` / `petrel queue cat`). The client is a raw socket
(smtpwire.RawSMTP) so every reply is seen exactly as sent.

What is checked: each session hook changes what the client sees (connect:
the banner is the reject; helo; mail_from; rcpt_to per recipient, and its
petrel.accept() granting relay to a client outside relay.clients; data adding
a header that is stored, and rejecting by Subject); a verdict petrel refuses
(a "reject" with a 2xx code) becomes lua.on_error with a log line naming the
script and line; a script that does not compile stops `petrel serve` and
`petrel check-config`; a runtime error or an endless loop gives lua.on_error
(tempfail 451 4.3.0, or reject 550 5.7.1) and the daemon goes on serving;
txn.from / txn.params as rcpt_to and data see them; the xbind hook refusing
an address (command, MAIL parameter, X-Petrel-Bind header); `kill -HUP`
swaps the script without dropping an open session (a call in progress ends
on the old script), keeps the old script when the new one is broken, and can
add a script with its lua settings; petrel.sleep in one session does not hold
up another; require of a module beside the script; examples/lua/deny-list.lua
(its list re-read on SIGHUP).

Addresses: clients bind 127.0.60.x as their source when the test needs one
outside relay.clients (127.0.0.1/32) or one the script recognises; the
daemon listens on 127.0.0.1 (the fixture's start-up probe comes from there).
"""

import os
import re
import signal
import subprocess
import time

import pytest

from petrel_fixture import petrel_bin, run_cli, sanitizer_env
from smtpwire import RawSMTP, message

SOURCE_DIR = os.environ.get("PETREL_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
DENY_LIST_EXAMPLE = os.path.join(SOURCE_DIR, "examples", "lua", "deny-list.lua")

OUTSIDER = "127.0.60.2"      # not in relay.clients
BLOCKED_IP = "127.0.60.3"    # refused by the connect hook

ON_ERROR_TEMPFAIL = "451 4.3.0 Local policy temporarily unavailable, try again later"
ON_ERROR_REJECT = "550 5.7.1 Rejected by local policy"
RELAY_DENIED = "554 5.7.1 Relay access denied"


# ---------------------------------------------------------------- helpers


def write_script(tmp_path, text, name="policy.lua"):
    path = tmp_path / name
    path.write_text(text)
    return path


def lua_daemon(petrel, tmp_path, script, lua=None, **kw):
    """Writes script into tmp_path and starts petrel with it as lua.script."""
    path = write_script(tmp_path, script)
    cfg = {"lua": dict({"script": str(path)}, **(lua or {}))}
    cfg.update(kw.pop("config", {}))
    return petrel(config=cfg, **kw), path


def connect(p, **kw):
    return RawSMTP(p.host, p.port, **kw)


def line_of(path, needle):
    """1-based number of the first line of path containing needle."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {path}")


def assert_line(r, want, what):
    assert r.last == want, f"{what}: got {str(r)!r}, want {want!r}"


def queued(p, qid):
    listing = p.queue_list()
    assert qid in listing, f"{qid} not in the queue:\n{listing.text}"
    return listing.messages[qid]


def full_transaction(p, rcpt="bob@local.test", subject="ok", **kw):
    """A new session: EHLO, MAIL, RCPT, DATA; returns the queue id."""
    with connect(p, **kw) as c:
        assert c.banner.code == 220, f"banner: got {c.banner}, want 220"
        c.ehlo()
        qid = c.transaction("alice@example.org", [rcpt], message(subject=subject, to=rcpt))
        c.expect("QUIT", "221")
    return qid


# ---------------------------------------------------------------- each hook


CONNECT_SCRIPT = r'''
petrel.on("connect", function(conn)
    if conn.ip == "127.0.60.3" then
        return petrel.reject(554, "5.7.1 No mail from " .. conn.ip .. " on " .. conn.listener)
    end
end)
'''


def test_connect_reject_replaces_the_banner_and_closes(petrel, tmp_path):
    p, _ = lua_daemon(petrel, tmp_path, CONNECT_SCRIPT)
    c = connect(p, source=BLOCKED_IP)
    try:
        assert c.banner.lines == ["554 5.7.1 No mail from 127.0.60.3 on default"], \
            f"banner: got {c.banner!r}, want the connect hook's reject"
        assert c.wait_closed(5.0), "the server did not close the session after the reject"
    finally:
        c.close()
    # another client is greeted as usual
    with connect(p, source=OUTSIDER) as c:
        assert c.banner.lines == ["220 petrel.test ESMTP petrel"], f"got {c.banner!r}"


HELO_SCRIPT = r'''
petrel.on("helo", function(conn, name)
    if name:lower() == "localhost" then
        return petrel.reject(550, "5.7.1 Bad HELO " .. name .. " from " .. conn.ip)
    end
end)
'''


def test_helo_reject_then_a_good_name_is_accepted(petrel, tmp_path):
    p, _ = lua_daemon(petrel, tmp_path, HELO_SCRIPT)
    with connect(p) as c:
        assert_line(c.cmd("EHLO LocalHost"), "550 5.7.1 Bad HELO LocalHost from 127.0.0.1",
                    "EHLO LocalHost")
        assert_line(c.cmd("HELO localhost"), "550 5.7.1 Bad HELO localhost from 127.0.0.1",
                    "HELO localhost")
        # refused greeting: no transaction yet
        r = c.cmd("MAIL FROM:<alice@example.org>")
        assert r.code == 503, f"MAIL after a refused EHLO: got {r}, want 503"
        c.ehlo("client.test")
        c.transaction("alice@example.org", ["bob@local.test"], message())


MAIL_SCRIPT = r'''
petrel.on("mail_from", function(txn)
    if txn.from:match("@spammer%.test$") then
        return petrel.reject(553, "5.7.1 Sender " .. txn.from .. " refused")
    end
    if txn.from == "" then
        return petrel.tempfail(450, "4.7.1 No bounces now (" .. (txn.params or "") .. ")")
    end
end)
'''


def test_mail_from_reject_and_tempfail_are_the_exact_reply(petrel, tmp_path):
    p, _ = lua_daemon(petrel, tmp_path, MAIL_SCRIPT)
    with connect(p) as c:
        c.ehlo()
        assert_line(c.cmd("MAIL FROM:<eve@spammer.test>"),
                    "553 5.7.1 Sender eve@spammer.test refused", "MAIL from the spammer")
        assert_line(c.cmd("MAIL FROM:<> SIZE=100"), "450 4.7.1 No bounces now (SIZE=100)",
                    "MAIL FROM:<>")
        # the refused MAIL opened no transaction
        r = c.cmd("RCPT TO:<bob@local.test>")
        assert r.code == 503, f"RCPT after a refused MAIL: got {r}, want 503"
        qid = c.transaction("alice@example.org", ["bob@local.test"], message())
    assert queued(p, qid)["sender"] == "alice@example.org"


RCPT_SCRIPT = r'''
local partners = { ["partner.test"] = true }

petrel.on("rcpt_to", function(txn, rcpt)
    if rcpt == "nobody@local.test" then
        return petrel.reject(550, "5.1.1 <" .. rcpt .. ">: no such user")
    end
    local domain = rcpt:match("@(.+)$")
    if domain and partners[domain:lower()] then
        return petrel.accept()
    end
end)
'''


def test_rcpt_to_rejects_one_recipient_and_keeps_the_other(petrel, tmp_path):
    p, _ = lua_daemon(petrel, tmp_path, RCPT_SCRIPT)
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        assert_line(c.cmd("RCPT TO:<nobody@local.test>"),
                    "550 5.1.1 <nobody@local.test>: no such user",
                    "RCPT nobody")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5")
        r = c.data(message())
        assert r.qid, f"end of DATA: got {r}, want queued"
    rcpts = [a for a, _, _ in queued(p, r.qid)["rcpts"]]
    assert rcpts == ["bob@local.test"], f"queued recipients: got {rcpts}, want only bob"


def test_rcpt_to_accept_grants_relay_to_an_outside_client(petrel, tmp_path):
    p, _ = lua_daemon(petrel, tmp_path, RCPT_SCRIPT)
    with connect(p, source=OUTSIDER) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        # without the hook's accept, petrel's relay control applies
        assert_line(c.cmd("RCPT TO:<carol@elsewhere.test>"), RELAY_DENIED, "RCPT elsewhere")
        # the hook accepts partner.test: relay granted though 127.0.60.2 is no relay client
        assert_line(c.cmd("RCPT TO:<carol@Partner.test>"), "250 2.1.5 Ok", "RCPT partner")
        r = c.data(message(to="carol@Partner.test"))
        assert r.qid, f"end of DATA: got {r}, want queued"
    rcpts = [a for a, _, _ in queued(p, r.qid)["rcpts"]]
    assert rcpts == ["carol@Partner.test"], f"queued recipients: got {rcpts}"


DATA_SCRIPT = r'''
petrel.on("data", function(txn, msg)
    local subject = msg:header("subject") or ""
    if subject:lower():find("viagra", 1, true) then
        return petrel.reject(550, "5.7.1 Message refused: " .. subject)
    end
    msg:add_header("X-Policy", "checked size=" .. msg.size .. " headers=" .. #msg.headers)
end)
'''


def test_data_hook_adds_a_header_that_is_stored(petrel, tmp_path):
    p, _ = lua_daemon(petrel, tmp_path, DATA_SCRIPT)
    content = message(subject="hello")
    with connect(p) as c:
        c.ehlo()
        qid = c.transaction("alice@example.org", ["bob@local.test"], content)
    stored = p.queue_cat(qid)
    head = stored.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    added = [h for h in head if h.startswith(b"X-Policy:")]
    want = (f"X-Policy: checked size={len(content)} headers=4").encode()
    assert added == [want], f"X-Policy in the stored header: got {added}, want [{want!r}]"
    assert stored.endswith(b"\r\n\r\nHello.\r\n"), f"body changed: {stored[-60:]!r}"


def test_data_hook_rejects_by_subject(petrel, tmp_path):
    p, _ = lua_daemon(petrel, tmp_path, DATA_SCRIPT)
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5")
        r = c.data(message(subject="Cheap VIAGRA"))
        assert_line(r, "550 5.7.1 Message refused: Cheap VIAGRA", "end of DATA")
        # the session goes on: a clean message is queued
        qid = c.transaction("alice@example.org", ["bob@local.test"], message(subject="fine"))
    listing = p.queue_list()
    assert listing.qids == [qid], f"queue: got {listing.qids}, want only {qid}\n{listing.text}"


TXN_SCRIPT = r'''
-- rcpt_to and data see the transaction's sender, with or without a mail_from hook
petrel.on("rcpt_to", function(txn, rcpt)
    if rcpt == "who@local.test" then
        return petrel.reject(550, "5.7.1 from=<" .. tostring(txn.from) .. "> params="
                             .. tostring(txn.params) .. " ip=" .. txn.conn.ip)
    end
end)

petrel.on("data", function(txn, msg)
    msg:add_header("X-Envelope-From", tostring(txn.from))
end)
'''


@pytest.mark.parametrize("mail_hook", [False, True], ids=["no-mail_from-hook", "mail_from-hook"])
def test_rcpt_to_and_data_see_the_sender(petrel, tmp_path, mail_hook):
    script = TXN_SCRIPT + ('petrel.on("mail_from", function(txn) end)\n' if mail_hook else "")
    p, _ = lua_daemon(petrel, tmp_path, script)
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org> BODY=8BITMIME", "250 2.1.0")
        assert_line(c.cmd("RCPT TO:<who@local.test>"),
                    "550 5.7.1 from=<alice@example.org> params=BODY=8BITMIME ip=127.0.0.1",
                    "RCPT who (txn as rcpt_to sees it)")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5")
        r = c.data(message())
        assert r.qid, f"end of DATA: got {r}, want queued"
    head = p.queue_cat(r.qid).split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    added = [h for h in head if h.startswith(b"X-Envelope-From:")]
    assert added == [b"X-Envelope-From: alice@example.org"], \
        f"the data hook's txn.from: got {added}, want [b'X-Envelope-From: alice@example.org']"


XBIND_SCRIPT = r'''
petrel.on("xbind", function(conn, ip, hostname)
    return ip ~= "127.0.60.6"
end)
'''


def test_xbind_hook_refuses_an_address(petrel, tmp_path):
    p, _ = lua_daemon(petrel, tmp_path, XBIND_SCRIPT)
    with connect(p) as c:
        c.ehlo()
        assert_line(c.cmd("XBIND 127.0.60.6"), "550 5.7.1 127.0.60.6: refused by local policy",
                    "XBIND refused by the hook")
        assert_line(c.cmd("MAIL FROM:<alice@example.org> XBIND=127.0.60.6"),
                    "550 5.7.1 127.0.60.6: refused by local policy", "MAIL XBIND= refused")
        assert_line(c.cmd("XBIND 127.0.60.7 out.example"),
                    "250 2.0.0 Bound to 127.0.60.7 as out.example", "XBIND allowed")
        c.transaction("alice@example.org", ["bob@local.test"], message())


def test_xbind_hook_refuses_the_header_too(petrel, tmp_path):
    p, _ = lua_daemon(petrel, tmp_path, XBIND_SCRIPT)
    with connect(p) as c:
        c.ehlo()
        refused = c.transaction("alice@example.org", ["bob@local.test"],
                                message("refused", headers=["X-Petrel-Bind: 127.0.60.6 h.example"]))
        allowed = c.transaction("alice@example.org", ["bob@local.test"],
                                message("allowed", headers=["X-Petrel-Bind: 127.0.60.7 h.example"]))
    shown = p.queue_show(allowed)
    assert "xbind: 127.0.60.7 h.example" in shown, f"allowed header not applied:\n{shown}"
    shown = p.queue_show(refused)
    assert "127.0.60.6" not in shown, \
        f"X-Petrel-Bind: 127.0.60.6 was applied though the xbind hook refuses it:\n{shown}"


# ---------------------------------------------------------------- errors


BAD_VERDICT_SCRIPT = r'''
petrel.on("mail_from", function(txn)
    if txn.from == "weird@example.org" then
        return petrel.reject(250, "2.0.0 this is no refusal")
    end
end)
'''


def test_a_reject_with_a_2xx_code_is_an_error(petrel, tmp_path):
    p, path = lua_daemon(petrel, tmp_path, BAD_VERDICT_SCRIPT)
    with connect(p) as c:
        c.ehlo()
        assert_line(c.cmd("MAIL FROM:<weird@example.org>"), ON_ERROR_TEMPFAIL, "MAIL weird")
        c.transaction("alice@example.org", ["bob@local.test"], message())
    n = line_of(path, "petrel.reject(250")
    p.wait_log(r"lua: hook mail_from failed \(on_error=tempfail\): .*"
               + re.escape(f"policy.lua:{n}:") + r".*code 250 is not 5xx")


SYNTAX_ERROR_SCRIPT = '''-- line 1
petrel.on("rcpt_to", function(txn, rcpt)
    if rcpt == "x" then
        return petrel.reject(550 "5.7.1 missing comma")
    end
end)
'''


def test_a_script_that_does_not_compile_is_refused_at_start(petrel, tmp_path):
    path = write_script(tmp_path, SYNTAX_ERROR_SCRIPT)
    p = petrel(config={"lua": {"script": str(path)}}, start=False)
    p.write_config()
    # Lua shortens a long script path from the left ("...tmp/x/policy.lua:4:")
    want = re.compile(r"lua\.script: .*" + re.escape(f"{path.name}:4:") + r" '\)' expected")

    cp = run_cli(["check-config", "-c", str(p.cfg_path)])
    assert cp.returncode != 0, f"check-config: exit 0, want non-zero\n{cp.stderr}"
    assert want.search(cp.stderr), f"check-config stderr: want {want.pattern!r}\n{cp.stderr}"

    try:
        sp = subprocess.run([petrel_bin(), "serve", "-c", str(p.cfg_path)],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=15,
                            env=sanitizer_env(), cwd=str(p.dir))
    except subprocess.TimeoutExpired:
        pytest.fail("petrel serve with a broken script did not exit within 15 s")
    err = sp.stderr.decode("utf-8", "replace")
    assert sp.returncode != 0, f"serve: exit 0, want non-zero\n{err}"
    assert want.search(err), f"serve stderr: want {want.pattern!r}\n{err}"
    for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
        assert marker not in err, err


RUNTIME_ERROR_SCRIPT = r'''
petrel.on("rcpt_to", function(txn, rcpt)
    if rcpt == "crash@local.test" then
        local t = nil
        return t.field -- attempt to index a nil value
    end
end)
'''


@pytest.mark.parametrize("on_error,want", [(None, ON_ERROR_TEMPFAIL),
                                           ("reject", ON_ERROR_REJECT)])
def test_a_runtime_error_gives_on_error_and_serving_goes_on(petrel, tmp_path, on_error, want):
    lua = {"on_error": on_error} if on_error else {}
    p, path = lua_daemon(petrel, tmp_path, RUNTIME_ERROR_SCRIPT, lua=lua)
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        assert_line(c.cmd("RCPT TO:<crash@local.test>"), want, "RCPT crash")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5")
        assert c.data(message()).qid
    n = line_of(path, "t.field")
    p.wait_log(r"lua: hook rcpt_to failed \(on_error=" + (on_error or "tempfail") + r"\): .*"
               + re.escape(f"policy.lua:{n}:") + r".*index a nil value")
    full_transaction(p)     # a new session works


LOOP_SCRIPT = r'''
petrel.on("rcpt_to", function(txn, rcpt)
    if rcpt == "loop@local.test" then
        local n = 0
        while true do n = n + 1 end
    end
end)
'''


def test_an_endless_loop_is_cut_off(petrel, tmp_path):
    p, path = lua_daemon(petrel, tmp_path, LOOP_SCRIPT, lua={"timeout": "100ms"})
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        t0 = time.monotonic()
        r = c.cmd("RCPT TO:<loop@local.test>", timeout=10)
        took = time.monotonic() - t0
        assert_line(r, ON_ERROR_TEMPFAIL, "RCPT loop")
        assert took < 3.0, f"the looping hook answered after {took:.2f}s, want < 3 s"
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5")
        assert c.data(message()).qid
    n = line_of(path, "while true")
    p.wait_log(r"lua: hook rcpt_to failed \(on_error=tempfail\): hook exceeded lua\.timeout "
               r"\(100 ms\).*" + re.escape(f"policy.lua:{n}:"))
    t0 = time.monotonic()
    full_transaction(p)
    assert time.monotonic() - t0 < 2.0, "a session after the loop was slow"


# ---------------------------------------------------------------- reload


RELOAD_V1 = r'''
petrel.on("rcpt_to", function(txn, rcpt)
    if rcpt == "slow@local.test" then
        petrel.sleep(0.6)
        return petrel.reject(550, "5.7.1 v1 refuses slow")
    end
    if rcpt == "old@local.test" then
        return petrel.reject(550, "5.7.1 v1 refuses old")
    end
end)
'''

RELOAD_V2 = r'''
petrel.on("rcpt_to", function(txn, rcpt)
    if rcpt == "new@local.test" then
        return petrel.reject(550, "5.7.1 v2 refuses new")
    end
end)
'''

RELOAD_BROKEN = r'''
petrel.on("rcpt_to", function(txn, rcpt)
    return petrel.accept(
end)
'''


def test_sighup_swaps_the_script_without_dropping_an_open_session(petrel, tmp_path):
    p, path = lua_daemon(petrel, tmp_path, RELOAD_V1)
    with connect(p) as a:
        a.ehlo()
        a.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        assert_line(a.cmd("RCPT TO:<old@local.test>"), "550 5.7.1 v1 refuses old", "v1")
        # a call in progress when the signal arrives finishes on the old script
        a.send("RCPT TO:<slow@local.test>\r\n")
        time.sleep(0.15)
        path.write_text(RELOAD_V2)
        os.kill(p.pid, signal.SIGHUP)
        p.wait_log(r"SIGHUP: reloaded")
        assert_line(a.read_reply(timeout=5), "550 5.7.1 v1 refuses slow", "RCPT slow")
        # the open session goes on, now under v2
        assert_line(a.cmd("RCPT TO:<new@local.test>"), "550 5.7.1 v2 refuses new",
                    "RCPT new in the open session")
        a.expect("RCPT TO:<old@local.test>", "250 2.1.5")
        r = a.data(message(to="old@local.test"))
        assert r.qid, f"end of DATA in the open session: got {r}, want queued"
    # a new session sees v2
    with connect(p) as b:
        b.ehlo()
        b.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        assert_line(b.cmd("RCPT TO:<new@local.test>"), "550 5.7.1 v2 refuses new", "new")
        b.expect("RCPT TO:<old@local.test>", "250 2.1.5")


def test_sighup_with_a_broken_script_keeps_the_old_one(petrel, tmp_path):
    p, path = lua_daemon(petrel, tmp_path, RELOAD_V2)
    path.write_text(RELOAD_BROKEN)
    os.kill(p.pid, signal.SIGHUP)
    m = p.wait_log(r"SIGHUP: reload failed, keeping the running script: (.*)")
    assert re.search(re.escape(f"{path.name}:4:") + r" unexpected symbol near 'end'",
                     m.group(1)), f"the reload error does not name {path.name}:4: {m.group(0)}"
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        assert_line(c.cmd("RCPT TO:<new@local.test>"), "550 5.7.1 v2 refuses new",
                    "the old script after a failed reload")
    assert p.running, "the daemon exited after a failed reload"


def test_sighup_adds_a_script_and_its_lua_settings(petrel, tmp_path):
    p = petrel()        # no lua section
    path = write_script(tmp_path, RUNTIME_ERROR_SCRIPT)
    p.config_overrides["lua"] = {"script": str(path), "on_error": "reject"}
    p.write_config()
    os.kill(p.pid, signal.SIGHUP)
    p.wait_log(r"SIGHUP: reloaded .*: lua section applied \(script " + re.escape(str(path)) + r"\)")
    with connect(p) as c:
        c.ehlo()
        c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        assert_line(c.cmd("RCPT TO:<crash@local.test>"), ON_ERROR_REJECT,
                    "RCPT crash under the script added by SIGHUP (lua.on_error: reject)")
        c.expect("RCPT TO:<bob@local.test>", "250 2.1.5")


# ---------------------------------------------------------------- async helpers


SLEEP_SCRIPT = r'''
petrel.on("rcpt_to", function(txn, rcpt)
    if rcpt == "slow@local.test" then
        petrel.sleep(1)
        return petrel.tempfail(451, "4.7.1 slept")
    end
end)
'''


def test_sleep_in_one_session_does_not_delay_another(petrel, tmp_path):
    p, _ = lua_daemon(petrel, tmp_path, SLEEP_SCRIPT)
    with connect(p) as a:
        a.ehlo()
        a.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
        t0 = time.monotonic()
        a.send("RCPT TO:<slow@local.test>\r\n")
        time.sleep(0.05)    # the hook is asleep now
        t1 = time.monotonic()
        full_transaction(p)
        other = time.monotonic() - t1
        r = a.read_reply(timeout=5)
        slept = time.monotonic() - t0
        assert_line(r, "451 4.7.1 slept", "RCPT slow")
        assert other < 0.5, f"the other session's transaction took {other:.2f}s, want < 0.5 s"
        assert slept >= 0.95, f"the sleeping RCPT answered after {slept:.2f}s, want >= 1 s"


# ---------------------------------------------------------------- require, examples


def test_require_finds_a_module_beside_the_script(petrel, tmp_path):
    write_script(tmp_path, 'return { banned = { ["mallory@example.org"] = true } }\n',
                 name="localrules.lua")
    p, _ = lua_daemon(petrel, tmp_path, r'''
local rules = require("localrules")
petrel.on("mail_from", function(txn)
    if rules.banned[txn.from] then return petrel.reject(550, "5.7.1 banned") end
end)
''')
    with connect(p) as c:
        c.ehlo()
        assert_line(c.cmd("MAIL FROM:<mallory@example.org>"), "550 5.7.1 banned", "MAIL")


def test_example_deny_list(petrel, tmp_path):
    deny = tmp_path / "deny.txt"
    script = open(DENY_LIST_EXAMPLE).read()
    script, n = re.subn(r'^local DENY_LIST = ".*"$', f'local DENY_LIST = "{deny}"', script,
                        flags=re.M)
    assert n == 1, "examples/lua/deny-list.lua has no `local DENY_LIST = \"...\"` line"
    path = write_script(tmp_path, script, name="deny-list.lua")
    p = petrel(config={"lua": {"script": str(path)}}, start=False)
    p.write_config()

    # a list that cannot be read is a load error
    cp = run_cli(["check-config", "-c", str(p.cfg_path)])
    assert cp.returncode != 0, f"check-config without the list: exit 0\n{cp.stderr}"
    assert "deny-list.lua:" in cp.stderr and "cannot read the deny list" in cp.stderr, \
        f"check-config without the list: got {cp.stderr!r}"

    deny.write_text("# people who left\nBob@Local.test   # trailing comment\n\n"
                    "@closed.test\n")
    p.start()
    p.wait_log(r"deny-list: 2 entries from " + re.escape(str(deny)))

    def rcpt_replies(*rcpts):
        with connect(p) as c:
            c.ehlo()
            c.expect("MAIL FROM:<alice@example.org>", "250 2.1.0")
            return {rc: c.cmd(f"RCPT TO:<{rc}>").last for rc in rcpts}

    got = rcpt_replies("bob@local.test", "x@CLOSED.test", "carol@local.test")
    want = {"bob@local.test": "550 5.1.1 <bob@local.test>: Recipient address rejected",
            "x@CLOSED.test": "550 5.1.1 <x@CLOSED.test>: Recipient address rejected",
            "carol@local.test": "250 2.1.5 Ok"}
    assert got == want, f"got {got}, want {want}"

    # the list is read again on SIGHUP
    deny.write_text("carol@local.test\n")
    os.kill(p.pid, signal.SIGHUP)
    p.wait_log(r"deny-list: 1 entries from ")
    p.wait_log(r"SIGHUP: reloaded")
    got = rcpt_replies("bob@local.test", "carol@local.test")
    want = {"bob@local.test": "250 2.1.5 Ok",
            "carol@local.test": "550 5.1.1 <carol@local.test>: Recipient address rejected"}
    assert got == want, f"after SIGHUP: got {got}, want {want}"
