"""SMTP AUTH (issue 8), end to end against the real daemon (`petrel serve`).

What is checked, as a client sees it (exact reply code, enhanced code and
text) and in the log and the queue:

- `petrel passwd USER` (password on stdin) prints a `USER:$y$...` line that
  works in auth.users_file;
- AUTH PLAIN and AUTH LOGIN with swaks --tls (STARTTLS listener) and --tlsc
  (implicit-TLS listener): 235 2.7.0, the message queued with ESMTPSA;
- AUTH is neither advertised nor accepted (538 5.7.11) before STARTTLS, and
  is advertised after it; with auth.allow_plaintext it works in plaintext;
- every refusal: wrong password / unknown user 535 5.7.8, cancel 501 5.7.0,
  bad base64 501 5.5.2, unknown mechanism 504 5.5.4, AUTH twice or inside a
  transaction 503 5.5.1, a listener with auth: none 503 5.5.1, MAIL before
  AUTH on auth: required 530 5.7.0;
- the failure limiter: after 10 failures from one address AUTH gets 421
  4.7.0 and the connection closes (other addresses still authenticate);
- the log: `auth` / `auth failed` lines with user= and mech=, never the
  password; test_log_never_holds_credentials also looks for its base64 forms
  (LOGIN answers, PLAIN blobs) at log.level debug, the fixture's, so the
  command trace is covered;
- an authenticated client relays from outside relay.clients (554 5.7.1
  without AUTH), Received says ESMTPA / ESMTPSA, `petrel queue show` names
  the user, the queued line carries user=;
- an authenticated client may use XBIND (advertised only after AUTH); the
  remote MX sees the bound address;
- a milter sees {auth_authen} and {auth_type} at MAIL;
- the Lua auth hook: true accepts a user the users file lacks, false
  refuses one it has; nil falls back to the users file.

Addresses: the daemon on 127.0.0.1 (relay.clients 10.0.0.0/8 where the test
needs the client outside it), a second client address 127.0.8.50, the remote
MX on 127.0.8.2, the XBIND address 127.0.8.33.
"""

import base64
import os
import re
import subprocess
import warnings

import pytest

from petrel_fixture import (QID_RE, free_port, petrel_bin, sanitizer_env,
                            split_received, wait_until)
from smtpwire import Closed, RawSMTP, message
from tls_certs import TestCA

ALICE_PW = "Al1ce-Pa55-zq7"
BOB_PW = "B0b-Pa55-xk2"
WRONG_PW = "Wr0ng-Pa55-mm9"
LUA_PW = "Lu4-Pa55-vv3"
USERS = {"alice": ALICE_PW, "bob": BOB_PW}

OTHER_CLIENT = "127.0.8.50"
MX_IP = "127.0.8.2"
XBIND_IP = "127.0.8.33"
NOT_RELAY = ["10.0.0.0/8"]          # 127.0.0.1 is not a relay client
FOREIGN_RCPT = "carol@dest.auth.test"
LOCAL_RCPT = "bob@local.test"       # relay.domains: anyone may send here
SENDER = "alice@sender.auth.test"

AUTH_OK = "235 2.7.0 Authentication successful"
AUTH_FAILED = "535 5.7.8 Authentication credentials invalid"
ENCRYPT_REQUIRED = "538 5.7.11 Encryption required for requested authentication mechanism"
AUTH_REQUIRED = "530 5.7.0 Authentication required"
NOT_ENABLED = "503 5.5.1 Error: authentication not enabled"
ALREADY = "503 5.5.1 Error: already authenticated"
IN_TXN = "503 5.5.1 Error: AUTH not allowed during a mail transaction"
CANCELLED = "501 5.7.0 Authentication cancelled"
BAD_BASE64 = "501 5.5.2 Cannot decode response"
UNKNOWN_MECH = "504 5.5.4 Unrecognized authentication mechanism"
AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
TOO_MANY = ("421 4.7.0 Error: too many failed authentication attempts, "
            "closing connection")
RELAY_DENIED = "554 5.7.1 Relay access denied"
XBIND_DENIED = "550 5.7.1 XBIND not permitted for this client"
SEND_EHLO_FIRST = "503 5.5.1 Error: send EHLO first"
USERNAME_CHALLENGE = "334 VXNlcm5hbWU6"
PASSWORD_CHALLENGE = "334 UGFzc3dvcmQ6"

# The Received header of a TLS session (as in test_tls.py).
RECEIVED_TLS_RE = re.compile(
    rb"\AReceived: from (?P<helo>[^ \r\n]+) \(\[(?P<ip>[0-9a-fA-F.:]+)\]\)\r\n"
    rb"\t\(using TLSv1\.[23] with cipher [A-Z0-9_-]+ \(\d+/\d+ bits\)\)\r\n"
    rb"\tby petrel\.test \(petrel\) with (?P<proto>[A-Z0-9]+) id (?P<qid>[0-9A-F]{16})")

SOURCE_DIR = os.environ.get("PETREL_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
BUILD = os.environ.get("PETREL_BUILD_DIR") or (
    os.path.dirname(os.path.abspath(os.environ["PETREL_BIN"]))
    if os.environ.get("PETREL_BIN") else "")
FILTER = os.path.join(BUILD, "tests", "milter", "test_milter_filter")


# ---------------------------------------------------------------- helpers


def b64(text):
    return base64.b64encode(text.encode()).decode()


def plain(user, password):
    """The PLAIN initial response (RFC 4616): authzid "", authcid, password."""
    return b64(f"\0{user}\0{password}")


def secrets(passwords, encoded):
    """The forms a password could leak in: as is, and (encoded) base64 as LOGIN sends
    it and inside PLAIN blobs."""
    out = set()
    for pw in passwords:
        out.add(pw)
        if encoded:
            out.add(b64(pw))
            for user in list(USERS) + ["nobody", "lua"]:
                out.add(plain(user, pw))
    return out


def assert_no_secret(p, *passwords, encoded=False):
    """No password in the daemon log (encoded: nor its base64 forms; only
    test_log_never_holds_credentials checks those, so that a leak through the
    command trace fails one test)."""
    text = p.log()
    leaked = sorted(s for s in secrets(passwords, encoded) if s in text)
    assert not leaked, (f"the daemon log holds credentials {leaked}:\n" +
                        "\n".join(line for line in text.splitlines()
                                  if any(s in line for s in leaked)))


def passwd(user, password, stdin_extra=""):
    """`petrel passwd USER` with the password on stdin: CompletedProcess (text)."""
    return subprocess.run([petrel_bin(), "passwd", user], input=password + "\n" + stdin_extra,
                          capture_output=True, text=True, timeout=30, env=sanitizer_env())


@pytest.fixture(scope="module")
def user_lines():
    """{user: 'user:hash'} made by `petrel passwd` once for the module."""
    out = {}
    for user, pw in USERS.items():
        cp = passwd(user, pw)
        assert cp.returncode == 0, f"petrel passwd {user}: exit {cp.returncode}\n{cp.stderr}"
        out[user] = cp.stdout.rstrip("\n")
    return out


@pytest.fixture
def users_file(tmp_path, user_lines):
    path = tmp_path / "users"
    path.write_text("# petrel users\n" + "\n".join(user_lines.values()) + "\n")
    return path


@pytest.fixture
def ca(tmp_path):
    return TestCA(tmp_path / "ca")


def tls_config(ca):
    cert, key = ca.leaf("petrel.test", ips=["127.0.0.1"])
    return {"cert": str(cert), "key": str(key)}


def start_tls(c, ca):
    """STARTTLS on a RawSMTP session (after EHLO); the socket is wrapped."""
    r = c.cmd("STARTTLS")
    assert r.lines == ["220 2.0.0 Ready to start TLS"], f"STARTTLS: got {r}"
    c.sock = ca.client_context().wrap_socket(c.sock, server_hostname="petrel.test")
    assert c.sock.version() in ("TLSv1.2", "TLSv1.3"), c.sock.version()


def ehlo_keywords(r):
    return [t.split()[0].upper() for t in r.texts[1:] if t.strip()]


def ehlo_line(r, keyword):
    """The EHLO line for keyword (text after '250-'/'250 '), or None."""
    for t in r.texts[1:]:
        if t.split() and t.split()[0].upper() == keyword:
            return t
    return None


def expect_line(c, command, want):
    r = c.cmd(command)
    assert r.lines == [want], f"{command!r}: got {r}, want {want!r}"
    return r


def auth_plain(c, user, password, want=AUTH_OK):
    return expect_line(c, f"AUTH PLAIN {plain(user, password)}", want)


def auth_login(c, user, password, want=AUTH_OK):
    expect_line(c, "AUTH LOGIN", USERNAME_CHALLENGE)
    expect_line(c, b64(user), PASSWORD_CHALLENGE)
    return expect_line(c, b64(password), want)


def log_lines_matching(p, pattern):
    rx = re.compile(pattern)
    return [line for line in p.log_lines() if rx.search(line)]


def send_message(c, rcpts, subject, sender=SENDER):
    """MAIL, RCPT..., DATA on c; the queue id."""
    return c.transaction(sender, rcpts, message(subject, sender=sender, to=rcpts[0]))


def swaks(host, port, *args, want_rc=0):
    cmd = ["swaks", "--server", host, "--port", str(port), "--from", SENDER,
           "--to", LOCAL_RCPT, "--helo", "swaks.test", "--timeout", "10"]
    cp = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=60,
                        stdin=subprocess.DEVNULL)
    assert cp.returncode == want_rc, \
        f"swaks exit {cp.returncode}, want {want_rc}\n{cp.stdout}\n{cp.stderr}"
    return cp.stdout


def swaks_qid(out):
    m = re.search(r"^<~?\s+250 2\.0\.0 Ok: queued as (" + QID_RE + r")$", out, re.M)
    assert m, f"swaks transcript has no '250 2.0.0 Ok: queued as <QID>':\n{out}"
    return m.group(1)


def auth_daemon(petrel, users_file, *, listener=None, config=None, listeners=None,
                start=True):
    """petrel with auth.users_file; listeners: extra listener dicts (name, auth, tls…),
    each given a free port on 127.0.0.1 (returned as p.ports[name])."""
    cfg = {"auth": {"users_file": str(users_file)}}
    for k, v in (config or {}).items():
        if k == "auth":
            cfg["auth"] = dict(cfg["auth"], **v)
        else:
            cfg[k] = v
    p = petrel(config=cfg, listener=listener, start=False)
    p.ports = {}
    if listeners:
        first = dict({"name": "default", "address": f"{p.host}:{p.port}"}, **(listener or {}))
        all_l = [first]
        for lc in listeners:
            port = free_port()
            p.ports[lc["name"]] = port
            all_l.append(dict(lc, address=f"{p.host}:{port}"))
        p.config_overrides["listeners"] = all_l
    if start:
        p.start()
    return p


# ---------------------------------------------------------------- petrel passwd


def test_passwd_prints_a_users_file_line_that_works(petrel, tmp_path):
    cp = passwd("alice", ALICE_PW)
    assert cp.returncode == 0, f"exit {cp.returncode}, want 0\n{cp.stderr}"
    assert cp.stderr == "", f"stderr: {cp.stderr!r}"
    m = re.fullmatch(r"alice:(\$(?:y|6)\$[./A-Za-z0-9$]+)\n", cp.stdout)
    assert m, f"got {cp.stdout!r}, want 'alice:$y$...' (or $6$) and a newline"
    hashed = m.group(1)
    assert ALICE_PW not in cp.stdout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            crypt = None
    if crypt is not None:
        assert crypt.crypt(ALICE_PW, hashed) == hashed, "libcrypt does not verify the hash"
        assert crypt.crypt(WRONG_PW, hashed) != hashed
    # a fresh salt every time
    again = passwd("alice", ALICE_PW)
    assert again.returncode == 0 and again.stdout != cp.stdout, \
        f"two runs printed the same line {cp.stdout!r}"
    # usage and refusals
    usage = subprocess.run([petrel_bin(), "passwd"], input="", capture_output=True, text=True,
                           timeout=30, env=sanitizer_env())
    assert usage.returncode == 2 and usage.stdout == "", \
        f"no user: exit {usage.returncode} stdout {usage.stdout!r}, want 2 and nothing"
    empty = passwd("alice", "")
    assert (empty.returncode, empty.stdout) == (1, ""), f"empty password: {empty}"
    assert empty.stderr == "petrel passwd: empty password\n", empty.stderr
    bad = passwd("al ice", ALICE_PW)
    assert bad.returncode == 1 and bad.stdout == "" and \
        bad.stderr.startswith("petrel passwd: invalid user name"), f"bad name: {bad}"

    # the printed line is a users file; check-config and the daemon accept it
    users = tmp_path / "users"
    users.write_text(cp.stdout)
    p = auth_daemon(petrel, users, config={"auth": {"allow_plaintext": True}},
                    listener={"auth": "optional"}, start=False)
    p.write_config()
    chk = p.cli("check-config")
    assert chk.returncode == 0, f"check-config: exit {chk.returncode}\n{chk.stderr}"
    p.start()
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        auth_plain(c, "alice", WRONG_PW, AUTH_FAILED)
        auth_plain(c, "alice", ALICE_PW)
        c.expect("QUIT", "221")
    p.wait_log(r"\bauth: session=\d+, client=\S+, user=alice, mech=PLAIN$")


def test_a_broken_users_file_is_reported_with_its_line(petrel, tmp_path, user_lines):
    users = tmp_path / "users"
    users.write_text(user_lines["alice"] + "\nbob:not-a-hash\n")
    p = auth_daemon(petrel, users, config={"auth": {"allow_plaintext": True}},
                    listener={"auth": "optional"}, start=False)
    p.write_config()
    chk = p.cli("check-config")
    assert chk.returncode != 0, f"check-config accepted a bad users file:\n{chk.stderr}"
    assert f"{users}:2:" in chk.stderr, f"check-config: want '{users}:2: ...', got {chk.stderr}"


# ---------------------------------------------------------------- TLS


def test_auth_is_offered_and_accepted_only_after_starttls(petrel, ca, users_file):
    p = auth_daemon(petrel, users_file, config={"tls": tls_config(ca)},
                    listener={"tls": "starttls", "auth": "optional"})
    with RawSMTP(p.host, p.port) as c:
        r = c.ehlo()
        kw = ehlo_keywords(r)
        assert "STARTTLS" in kw and "AUTH" not in kw, f"EHLO before STARTTLS: got {r.lines}"
        auth_plain(c, "alice", ALICE_PW, ENCRYPT_REQUIRED)
        expect_line(c, "AUTH LOGIN", ENCRYPT_REQUIRED)
        start_tls(c, ca)
        expect_line(c, f"AUTH PLAIN {plain('alice', ALICE_PW)}", SEND_EHLO_FIRST)
        r = c.ehlo()
        assert ehlo_line(r, "AUTH") == "AUTH PLAIN LOGIN", f"EHLO after STARTTLS: got {r.lines}"
        auth_plain(c, "alice", ALICE_PW)
        r = c.ehlo()
        assert "AUTH" not in ehlo_keywords(r), f"EHLO after AUTH still offers AUTH: {r.lines}"
        qid = send_message(c, [LOCAL_RCPT], "after starttls and auth")
        c.expect("QUIT", "221")
    stored = p.queue_cat(qid)
    m = RECEIVED_TLS_RE.match(stored)
    assert m and m.group("proto") == b"ESMTPSA" and m.group("qid").decode() == qid, \
        f"Received: want 'with ESMTPSA id {qid}', got {stored[:300]!r}"
    p.wait_log(re.escape(qid) + r": queued: .*proto=ESMTPSA, .*user=alice, tls=TLSv1\.3")
    shown = p.queue_show(qid)
    assert "auth: alice\n" in shown, f"queue show {qid} lacks 'auth: alice':\n{shown}"
    assert_no_secret(p, ALICE_PW)


def test_swaks_plain_and_login_over_starttls_and_implicit_tls(petrel, ca, users_file):
    p = auth_daemon(petrel, users_file, config={"tls": tls_config(ca)},
                    listener={"tls": "starttls", "auth": "optional"},
                    listeners=[{"name": "smtps", "tls": "implicit", "auth": "optional"}])
    runs = [("--tls", p.port, "PLAIN"), ("--tls", p.port, "LOGIN"),
            ("--tlsc", p.ports["smtps"], "PLAIN"), ("--tlsc", p.ports["smtps"], "LOGIN")]
    qids = []
    for mode, port, mech in runs:
        out = swaks(p.host, port, mode, "--tls-verify", "--tls-ca-path", str(ca.cert),
                    "--auth", mech, "--auth-user", "alice", "--auth-password", ALICE_PW,
                    "--body", f"swaks {mode} {mech}")
        assert re.search(r"^<~\s+" + re.escape(AUTH_OK) + "$", out, re.M), \
            f"swaks {mode} AUTH {mech}: no '{AUTH_OK}' under TLS:\n{out}"
        qid = swaks_qid(out)
        qids.append(qid)
        m = RECEIVED_TLS_RE.match(p.queue_cat(qid))
        assert m and m.group("proto") == b"ESMTPSA", \
            f"swaks {mode} {mech}: Received is not ESMTPSA: {p.queue_cat(qid)[:300]!r}"
    for mech in ("PLAIN", "LOGIN"):
        got = log_lines_matching(p, r"\bauth: session=\d+, client=\S+, user=alice, mech="
                                 + mech + "$")
        assert len(got) == 2, f"want 2 'auth: ... user=alice, mech={mech}' lines, got {got}"
    # wrong password through swaks: 535 and nothing queued
    out = swaks(p.host, p.port, "--tls", "--tls-verify", "--tls-ca-path", str(ca.cert),
                "--auth", "LOGIN", "--auth-user", "alice", "--auth-password", WRONG_PW,
                want_rc=28)
    assert re.search(r"^<~\*\s+" + re.escape(AUTH_FAILED) + "$", out, re.M), out
    assert sorted(p.queue_list().qids) == sorted(qids)
    assert_no_secret(p, ALICE_PW, WRONG_PW)


# Each case on a fresh connection after STARTTLS + EHLO: (id, [(command, reply)]).
# Every case ends with NOOP (the session is back to reading commands).
REFUSALS = [
    ("wrong_password", [(f"AUTH PLAIN {plain('alice', WRONG_PW)}", AUTH_FAILED),
                        (f"AUTH PLAIN {plain('alice', ALICE_PW)}", AUTH_OK)]),
    ("unknown_user", [(f"AUTH PLAIN {plain('nobody', ALICE_PW)}", AUTH_FAILED)]),
    ("login_wrong_password", [("AUTH LOGIN", USERNAME_CHALLENGE),
                              (b64("alice"), PASSWORD_CHALLENGE),
                              (b64(WRONG_PW), AUTH_FAILED)]),
    ("login_initial_response", [(f"AUTH LOGIN {b64('bob')}", PASSWORD_CHALLENGE),
                                (b64(BOB_PW), AUTH_OK)]),
    ("plain_after_empty_challenge", [("AUTH PLAIN", "334 "),
                                     (plain("bob", BOB_PW), AUTH_OK)]),
    ("cancel_plain", [("AUTH PLAIN", "334 "), ("*", CANCELLED)]),
    ("cancel_login_password", [("AUTH LOGIN", USERNAME_CHALLENGE),
                               (b64("alice"), PASSWORD_CHALLENGE), ("*", CANCELLED)]),
    ("bad_base64", [("AUTH PLAIN !!not-base64!!", BAD_BASE64)]),
    ("bad_base64_answer", [("AUTH LOGIN", USERNAME_CHALLENGE), ("%%%%", BAD_BASE64)]),
    ("unknown_mechanism", [("AUTH CRAM-MD5", UNKNOWN_MECH)]),
    ("lower_case_mechanism", [(f"auth plain {plain('alice', ALICE_PW)}", AUTH_OK)]),
    ("no_mechanism", [("AUTH", AUTH_SYNTAX)]),
    ("inside_transaction", [(f"MAIL FROM:<{SENDER}>", "250 2.1.0 Ok"),
                            (f"AUTH PLAIN {plain('alice', ALICE_PW)}", IN_TXN),
                            ("RSET", "250 2.0.0 Ok"),
                            (f"AUTH PLAIN {plain('alice', ALICE_PW)}", AUTH_OK)]),
    ("twice", [(f"AUTH PLAIN {plain('alice', ALICE_PW)}", AUTH_OK),
               (f"AUTH PLAIN {plain('bob', BOB_PW)}", ALREADY),
               ("AUTH LOGIN", ALREADY)]),
]


def test_auth_replies_under_starttls(petrel, ca, users_file):
    p = auth_daemon(petrel, users_file, config={"tls": tls_config(ca)},
                    listener={"tls": "starttls", "auth": "optional"})
    problems = []
    for name, steps in REFUSALS:
        with RawSMTP(p.host, p.port) as c:
            c.ehlo()
            start_tls(c, ca)
            c.ehlo()
            for command, want in steps + [("NOOP", "250 2.0.0 Ok")]:
                try:
                    r = c.cmd(command)
                except (Closed, OSError) as e:
                    problems.append(f"{name}: {command!r}: {e}")
                    break
                if r.lines != [want]:
                    problems.append(f"{name}: {command!r}: got {r}, want {want!r}")
                    break
    assert not problems, "\n".join(problems)
    # the log: one line per failure with the user name and mechanism, never a secret
    failed = [re.sub(r"^.*?: auth failed: session=\d+, (client=\S+:)\d+,", r"\1PORT,", line)
              for line in log_lines_matching(p, r"\bauth failed: ")]
    assert failed == [
        "client=[127.0.0.1]:PORT, user=alice, mech=PLAIN, reason=wrong user name or password",
        "client=[127.0.0.1]:PORT, user=nobody, mech=PLAIN, reason=wrong user name or password",
        "client=[127.0.0.1]:PORT, user=alice, mech=LOGIN, reason=wrong user name or password",
    ], "auth failed lines:\n" + "\n".join(failed)
    cancelled = log_lines_matching(p, r"\bauth cancelled: ")
    assert len(cancelled) == 2, f"want 2 'auth cancelled' lines, got {cancelled}"
    assert_no_secret(p, ALICE_PW, BOB_PW, WRONG_PW)


def test_log_never_holds_credentials(petrel, users_file):
    """At log.level debug (the fixture's), with every way credentials travel."""
    p = auth_daemon(petrel, users_file, config={"auth": {"allow_plaintext": True}},
                    listener={"auth": "optional"})
    assert p.config_dict()["log"]["level"] == "debug"
    sessions = [
        lambda c: auth_plain(c, "alice", WRONG_PW, AUTH_FAILED),
        lambda c: auth_plain(c, "alice", ALICE_PW),
        lambda c: (expect_line(c, "AUTH PLAIN", "334 "),
                   expect_line(c, plain("bob", BOB_PW), AUTH_OK)),
        lambda c: auth_login(c, "bob", WRONG_PW, AUTH_FAILED),
        lambda c: auth_login(c, "bob", BOB_PW),
        lambda c: (expect_line(c, f"AUTH LOGIN {b64('alice')}", PASSWORD_CHALLENGE),
                   expect_line(c, b64(ALICE_PW), AUTH_OK)),
        lambda c: auth_plain(c, "nobody", ALICE_PW, AUTH_FAILED),
    ]
    for run in sessions:
        with RawSMTP(p.host, p.port) as c:
            c.ehlo()
            run(c)
            c.expect("QUIT", "221")
    assert log_lines_matching(p, r"debug: .*<<<: session=\d+, data=EHLO client\.test"), \
        "no command trace in the log: the test does not cover it"
    failed = log_lines_matching(p, r"\bauth failed: ")
    assert len(failed) == 3, f"want 3 'auth failed' lines, got {failed}"
    assert_no_secret(p, ALICE_PW, BOB_PW, WRONG_PW, encoded=True)


# ---------------------------------------------------------------- listener modes


def test_listener_auth_none_optional_required(petrel, users_file):
    p = auth_daemon(petrel, users_file, config={"auth": {"allow_plaintext": True}},
                    listeners=[{"name": "optional", "auth": "optional"},
                               {"name": "submission", "auth": "required"}])
    # auth: none (the default): not advertised, refused before anything else
    with RawSMTP(p.host, p.port) as c:
        r = c.ehlo()
        assert "AUTH" not in ehlo_keywords(r), f"auth: none listener offers AUTH: {r.lines}"
        auth_plain(c, "alice", ALICE_PW, NOT_ENABLED)
        expect_line(c, "AUTH LOGIN", NOT_ENABLED)
        qid = send_message(c, [LOCAL_RCPT], "no auth needed")
    # optional, in plaintext (allow_plaintext): advertised and accepted
    with RawSMTP(p.host, p.ports["optional"]) as c:
        r = c.ehlo()
        assert ehlo_line(r, "AUTH") == "AUTH PLAIN LOGIN", f"EHLO: got {r.lines}"
        q_opt = send_message(c, [LOCAL_RCPT], "optional without auth")
        auth_login(c, "bob", BOB_PW)
        q_auth = send_message(c, [LOCAL_RCPT], "optional with auth")
    # required: MAIL before AUTH is refused, even from a relay client
    with RawSMTP(p.host, p.ports["submission"]) as c:
        r = c.ehlo()
        assert ehlo_line(r, "AUTH") == "AUTH PLAIN LOGIN", f"EHLO: got {r.lines}"
        expect_line(c, f"MAIL FROM:<{SENDER}>", AUTH_REQUIRED)
        expect_line(c, f"MAIL FROM:<{SENDER}>", AUTH_REQUIRED)
        auth_plain(c, "alice", WRONG_PW, AUTH_FAILED)
        expect_line(c, f"MAIL FROM:<{SENDER}>", AUTH_REQUIRED)
        auth_plain(c, "alice", ALICE_PW)
        q_sub = send_message(c, [LOCAL_RCPT], "submission")
        c.expect("QUIT", "221")
    for qid, proto, user in ((qid, b"ESMTP", None), (q_opt, b"ESMTP", None),
                             (q_auth, b"ESMTPA", "bob"), (q_sub, b"ESMTPA", "alice")):
        m, _ = split_received(p.queue_cat(qid))
        assert m.group("proto") == proto, f"{qid}: Received with {m.group('proto')}, want {proto}"
        shown = p.queue_show(qid)
        if user:
            assert f"auth: {user}\n" in shown, f"queue show {qid}: want 'auth: {user}':\n{shown}"
        else:
            assert "\nauth:" not in shown, f"queue show {qid}: an auth user:\n{shown}"
    assert_no_secret(p, ALICE_PW, BOB_PW, WRONG_PW)


# ---------------------------------------------------------------- limiter


def test_too_many_failures_from_one_address_get_421_and_close(petrel, users_file):
    p = auth_daemon(petrel, users_file, config={"auth": {"allow_plaintext": True}},
                    listener={"auth": "optional", "max_errors": 100})
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        for i in range(10):
            r = c.cmd(f"AUTH PLAIN {plain('alice', WRONG_PW)}")
            assert r.lines == [AUTH_FAILED], f"failure {i + 1}: got {r}, want {AUTH_FAILED!r}"
        # the 11th attempt, even with the right password, is refused and the connection closed
        r = c.cmd(f"AUTH PLAIN {plain('alice', ALICE_PW)}")
        assert r.lines == [TOO_MANY], f"after 10 failures: got {r}, want {TOO_MANY!r}"
        assert c.wait_closed(5), "the connection stayed open after the 421"
    # a new connection from the same address: still blocked
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        expect_line(c, "AUTH LOGIN", TOO_MANY)
        assert c.wait_closed(5), "the connection stayed open after the 421"
    # another address is not
    with RawSMTP(p.host, p.port, source=OTHER_CLIENT) as c:
        c.ehlo()
        auth_plain(c, "alice", ALICE_PW)
        c.expect("QUIT", "221")
    p.wait_log(r"auth: too many failures from 127\.0\.0\.1; AUTH refused for a while")
    failed = log_lines_matching(p, r"\bauth failed: ")
    assert len(failed) == 10, f"want 10 'auth failed' lines, got {len(failed)}:\n" + \
        "\n".join(failed)
    assert log_lines_matching(p, r"\bauth: session=\d+, client=\[127\.0\.8\.50\]:\d+"
                                 r", user=alice, mech=PLAIN$"), p.log_tail()
    assert_no_secret(p, ALICE_PW, WRONG_PW)


# ---------------------------------------------------------------- relay, XBIND


def test_authenticated_client_relays_from_outside_relay_clients(petrel, users_file):
    p = auth_daemon(petrel, users_file,
                    config={"auth": {"allow_plaintext": True},
                            "relay": {"clients": NOT_RELAY, "domains": ["local.test"]}},
                    listener={"auth": "optional"})
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        c.expect(f"MAIL FROM:<{SENDER}>", "250 2.1.0")
        expect_line(c, f"RCPT TO:<{FOREIGN_RCPT}>", RELAY_DENIED)
        c.expect(f"RCPT TO:<{LOCAL_RCPT}>", "250 2.1.5")
        c.expect("RSET", "250")
        auth_plain(c, "alice", ALICE_PW)
        c.expect(f"MAIL FROM:<{SENDER}>", "250 2.1.0")
        expect_line(c, f"RCPT TO:<{FOREIGN_RCPT}>", "250 2.1.5 Ok")
        r = c.data(message("relayed after auth", sender=SENDER, to=FOREIGN_RCPT))
        qid = r.qid
        assert qid, f"end of DATA: got {r}"
        c.expect("QUIT", "221")
    m, _ = split_received(p.queue_cat(qid))
    assert m.group("proto") == b"ESMTPA", f"Received with {m.group('proto')}, want ESMTPA"
    assert m.group("rcpt") == FOREIGN_RCPT.encode(), m.group(0)
    shown = p.queue_show(qid)
    assert "auth: alice\n" in shown, f"queue show {qid} lacks 'auth: alice':\n{shown}"
    p.wait_log(re.escape(qid) + r": queued: session=\d+, client=\S+, from=<" + re.escape(SENDER)
               + r">, .*proto=ESMTPA, helo=<client\.test>, user=alice\b")
    p.wait_log(r"reject: session=\d+, cmd=RCPT, .*reply=554 5\.7\.1 Relay access denied")


def test_authenticated_client_may_use_xbind(petrel, users_file, mx_servers):
    mx = mx_servers(MX_IP, free_port(MX_IP), name="mx.auth.test")
    p = auth_daemon(petrel, users_file, config={
        "auth": {"allow_plaintext": True},
        "relay": {"clients": NOT_RELAY, "domains": ["local.test"]},
        "delivery": {"hostname": "relay.auth.test", "connection_cache_time": "1s",
                     "timeouts": {"connect": "3s", "greeting": "10s", "command": "10s"}},
        "routes": [{"domain": "*", "via": f"smtp:[{MX_IP}]:{mx.port}"}],
        "retry": {"schedule": ["1s"], "max_attempts": 3, "max_age": "1h"},
    }, listener={"auth": "optional"})
    with RawSMTP(p.host, p.port) as c:
        r = c.ehlo()
        assert "XBIND" not in ehlo_keywords(r), f"XBIND offered before AUTH: {r.lines}"
        expect_line(c, f"XBIND {XBIND_IP} auth.xbind.test", XBIND_DENIED)
        auth_login(c, "alice", ALICE_PW)
        r = c.ehlo()
        assert "XBIND" in ehlo_keywords(r), f"XBIND not offered after AUTH: {r.lines}"
        expect_line(c, f"XBIND {XBIND_IP} auth.xbind.test",
                    f"250 2.0.0 Bound to {XBIND_IP} as auth.xbind.test")
        qid = send_message(c, [FOREIGN_RCPT], "xbind after auth")
        c.expect("QUIT", "221")
    t = mx.wait_for(1, 15)[0]
    assert (t.peer[0], t.helo) == (XBIND_IP, "auth.xbind.test"), \
        f"MX saw {t.peer[0]} / EHLO {t.helo!r}, want {XBIND_IP} / auth.xbind.test"
    m, _ = split_received(t.data)
    assert (m.group("proto"), m.group("qid").decode()) == (b"ESMTPA", qid), m.group(0)
    p.wait_log(re.escape(qid) + r": to=<" + re.escape(FOREIGN_RCPT) + r">, relay=\S+, src="
               + re.escape(XBIND_IP) + r", helo=auth\.xbind\.test \(xbind\), .*status=sent ")


# ---------------------------------------------------------------- milter


@pytest.mark.skipif(not os.access(FILTER, os.X_OK),
                    reason=f"no test_milter_filter at {FILTER} (libmilter-dev)")
def test_milter_sees_auth_macros(petrel, users_file, tmp_path):
    log = tmp_path / "filter.log"
    spec = f"unix:{tmp_path / 'filter.sock'}"
    errf = open(tmp_path / "filter.stderr", "wb")
    proc = subprocess.Popen([FILTER, "-s", spec, "-l", str(log)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=errf)
    try:
        wait_until(lambda: log.exists() and "ready" in log.read_text().splitlines(), 10,
                   what="test_milter_filter ready")
        p = auth_daemon(petrel, users_file, config={
            "auth": {"allow_plaintext": True},
            "milters": [{"name": "f1", "socket": spec, "default_action": "tempfail",
                         "timeouts": {"connect": "2s", "command": "5s", "eom": "5s"}}],
        }, listener={"auth": "optional"})
        with RawSMTP(p.host, p.port) as c:
            c.ehlo()
            auth_plain(c, "alice", ALICE_PW)
            q1 = send_message(c, [LOCAL_RCPT], "milter plain")
            c.expect("QUIT", "221")
        with RawSMTP(p.host, p.port) as c:
            c.ehlo()
            auth_login(c, "bob", BOB_PW)
            q2 = send_message(c, [LOCAL_RCPT], "milter login")
            c.expect("QUIT", "221")
        def two_eoms():
            got = log.read_text().splitlines()
            return got if len([x for x in got if x.startswith("macro eom i=")]) >= 2 else None

        lines = wait_until(two_eoms, 10, what="the filter logging two messages")
        auth_macros = [x for x in lines if "{auth_" in x]
        for want in ("macro mail {auth_authen}=alice", "macro mail {auth_type}=PLAIN",
                     "macro mail {auth_authen}=bob", "macro mail {auth_type}=LOGIN"):
            assert want in lines, f"filter log lacks {want!r}; auth macros: {auth_macros}"
        assert not [x for x in lines if x.startswith(("macro connect {auth_",
                                                      "macro helo {auth_"))], auth_macros
        assert f"macro eom i={q1}" in lines and f"macro eom i={q2}" in lines, lines
        assert not [x for x in lines if ALICE_PW in x or BOB_PW in x], "password in the milter log"
    finally:
        proc.kill()
        proc.wait(5)
        errf.close()


# ---------------------------------------------------------------- Lua auth hook


LUA_SCRIPT = """
petrel.on("auth", function(conn, user, password)
  if user == "lua" then
    return password == "%s" and conn.ip == "127.0.0.1"
  end
  if user == "bob" then
    return false
  end
  return nil
end)
-- the authenticated user is in every later view: only alice may use the
-- "alice-only" recipient
petrel.on("rcpt_to", function(txn, rcpt)
  if rcpt:match("^alice%%-only@") and txn.conn.user ~= "alice" then
    return petrel.reject(550, "5.7.1 only alice, not " .. tostring(txn.conn.user))
  end
end)
""" % LUA_PW


def lua_daemon(petrel, users_file, tmp_path):
    script = tmp_path / "auth.lua"
    script.write_text(LUA_SCRIPT)
    return auth_daemon(petrel, users_file,
                       config={"auth": {"allow_plaintext": True}, "lua": {"script": str(script)}},
                       listener={"auth": "optional"})


def test_lua_auth_hook_accepts_and_refuses(petrel, users_file, tmp_path):
    p = lua_daemon(petrel, users_file, tmp_path)
    cases = [
        ("lua_true", lambda c: auth_plain(c, "lua", LUA_PW)),
        ("lua_true_login", lambda c: auth_login(c, "lua", LUA_PW)),
        ("lua_wrong_password", lambda c: auth_plain(c, "lua", WRONG_PW, AUTH_FAILED)),
        # in the users file with the right password, but the hook says false: final
        ("false_is_final", lambda c: auth_plain(c, "bob", BOB_PW, AUTH_FAILED)),
    ]
    problems = []
    for name, run in cases:
        with RawSMTP(p.host, p.port) as c:
            c.ehlo()
            try:
                run(c)
            except AssertionError as e:
                problems.append(f"{name}: {e}")
    assert not problems, "\n".join(problems)
    # the log says who refused: the hook, not a wrong password
    p.wait_log(r"auth failed: .*user=bob, mech=PLAIN, reason=refused by the auth hook")
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        auth_plain(c, "lua", LUA_PW)
        qid = send_message(c, [LOCAL_RCPT], "lua user")
    assert "auth: lua\n" in p.queue_show(qid)
    got = log_lines_matching(p, r"\bauth: session=\d+, client=\S+, user=lua, mech=")
    assert len(got) == 3, f"want 3 'auth: ... user=lua' lines, got {got}"
    p.wait_log(r"auth failed: .*user=bob, mech=PLAIN")
    assert_no_secret(p, LUA_PW, BOB_PW, WRONG_PW)


def test_lua_views_carry_the_authenticated_user(petrel, users_file, tmp_path):
    p = lua_daemon(petrel, users_file, tmp_path)
    for user, pw, want in [(None, None, "550 5.7.1 only alice, not nil"),
                           ("lua", LUA_PW, "550 5.7.1 only alice, not lua"),
                           ("alice", ALICE_PW, "250 2.1.5")]:
        with RawSMTP(p.host, p.port) as c:
            c.ehlo()
            if user:
                auth_plain(c, user, pw)
            c.expect(f"MAIL FROM:<{SENDER}>", "250 2.1.0")
            c.expect("RCPT TO:<alice-only@local.test>", want)


def test_lua_auth_hook_nil_falls_back_to_the_users_file(petrel, users_file, tmp_path):
    p = lua_daemon(petrel, users_file, tmp_path)
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        auth_plain(c, "alice", WRONG_PW, AUTH_FAILED)
        auth_plain(c, "alice", ALICE_PW)


# ---------------------------------------------------------------- SIGHUP


def test_sighup_reads_the_users_file_again(petrel, users_file, tmp_path):
    """A user added to auth.users_file can log in after `kill -HUP`; a broken
    file is refused and the running one stays."""
    import os
    import signal
    p = auth_daemon(petrel, users_file, config={"auth": {"allow_plaintext": True}},
                    listener={"auth": "optional"})
    carol = passwd("carol", "Car0l-Pa55")
    assert carol.returncode == 0, carol.stderr
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        auth_plain(c, "carol", "Car0l-Pa55", AUTH_FAILED)  # not in the file yet
    users_file.write_text(users_file.read_text() + carol.stdout)
    os.kill(p.pid, signal.SIGHUP)
    p.wait_log(r"SIGHUP: reloaded .*auth\.users_file read again \(3 users\)")
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        auth_plain(c, "carol", "Car0l-Pa55")
    # a broken file: the reload fails as a whole, carol still gets in
    good = users_file.read_text()
    users_file.write_text(good + "broken line without a hash\n")
    os.kill(p.pid, signal.SIGHUP)
    p.wait_log(r"SIGHUP: reload failed, keeping the running configuration: auth\.users_file: "
               r".*users:\d+:")
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        auth_plain(c, "carol", "Car0l-Pa55")
