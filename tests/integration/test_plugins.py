"""C plugins in the running daemon (issue 6): a plugin built for another ABI
(or not a plugin at all, or missing) stops `petrel check-config` and
`petrel serve` with the file named; the shipped rate limiter answers 421 at
connect after N connections and 451 at MAIL FROM after N messages from one
IP; the header stamper's header reaches the remote MX.

The plugins come from the build tree: <dir of $PETREL_BIN>/plugins/*.so
(shipped) and <dir of $PETREL_BIN>/tests/plugins/*.so (broken on purpose).
Addresses: clients from 127.0.47.10-.19, the remote MX on 127.0.47.2,
reached through a `plug.test` route `smtp:[127.0.47.2]:port` (no DNS)."""

import os
import re
import socket
import subprocess

import pytest

from petrel_fixture import check_received, free_port, petrel_bin, sanitizer_env
from smtpwire import RawSMTP, message

MX_IP = "127.0.47.2"
CLIENT_CONN = "127.0.47.10"
CLIENT_OTHER = "127.0.47.11"
CLIENT_MSGS = "127.0.47.12"
TIMEOUTS = {"connect": "3s", "greeting": "10s", "command": "10s", "data_init": "10s",
            "data_block": "10s", "data_end": "10s"}


def build_dir():
    return os.path.dirname(os.path.abspath(petrel_bin()))


def shipped(name):
    path = os.path.join(build_dir(), "plugins", name + ".so")
    assert os.path.exists(path), (f"{path} is missing: build the plugin targets "
                                  f"(cmake --build <build dir>)")
    return path


def test_plugin(name):
    path = os.path.join(build_dir(), "tests", "plugins", name + ".so")
    assert os.path.exists(path), (f"{path} is missing: build the test plugins "
                                  f"(cmake --build <build dir>)")
    return path


test_plugin.__test__ = False  # a helper, not a test


# ---------------------------------------------------------------- refused at start


BROKEN = [
    ("abi_mismatch", lambda p: f"plugins[0].path: {p}: ABI version 99, petrel speaks 1"),
    ("bad_size", lambda p: f"plugins[0].path: {p}: struct petrel_plugin is "),
    ("no_symbol", lambda p: f"plugins[0].path: {p}: no symbol petrel_plugin_init "
                            f"(not a petrel plugin)"),
]


@pytest.mark.parametrize("name,want", BROKEN, ids=[b[0] for b in BROKEN])
def test_check_config_refuses_a_broken_plugin_naming_the_file(petrel, name, want):
    path = test_plugin(name)
    p = petrel(config={"plugins": [{"path": path}]}, start=False)
    p.write_config()
    cp = p.cli("check-config")
    assert cp.returncode != 0, f"check-config: exit 0, want non-zero\nstderr:\n{cp.stderr}"
    assert want(path) in cp.stderr, (f"check-config stderr lacks {want(path)!r}; "
                                     f"got:\n{cp.stderr}")
    assert b"ok" not in cp.stdout.split(), f"check-config printed ok: {cp.stdout!r}"


def test_check_config_refuses_a_missing_plugin(petrel, tmp_path):
    path = str(tmp_path / "nowhere.so")
    p = petrel(config={"plugins": [{"path": path}]}, start=False)
    p.write_config()
    cp = p.cli("check-config")
    want = f"plugins[0].path: {path}: cannot open shared object file: No such file or directory"
    assert cp.returncode != 0 and want in cp.stderr, (
        f"check-config: exit {cp.returncode}, want non-zero and {want!r}; "
        f"stderr:\n{cp.stderr}")


def test_check_config_names_the_second_entry_and_reports_plugin_config_errors(petrel):
    good = shipped("header_stamp")
    bad = shipped("ratelimit")
    p = petrel(config={"plugins": [
        {"path": good, "config": {"name": "X-A", "value": "v"}},
        {"path": bad, "config": {"burst": 3}},
    ]}, start=False)
    p.write_config()
    cp = p.cli("check-config")
    want = f"plugins[1].path: {bad}: petrel_plugin_init failed (returned -1)"
    assert cp.returncode != 0 and want in cp.stderr, (
        f"check-config: exit {cp.returncode}, want non-zero and {want!r}; "
        f"stderr:\n{cp.stderr}")
    assert 'plugin=ratelimit, unknown config key "burst"' in cp.stderr, cp.stderr


def test_check_config_accepts_the_shipped_plugins(petrel):
    p = petrel(config={"plugins": [
        {"path": shipped("ratelimit"), "config": {"connections": 5, "window": "1m"}},
        {"path": shipped("header_stamp"), "config": {"name": "X-A", "value": "%{queue_id}"}},
        {"path": shipped("hello"), "config": {"reject_domain": "spam.example"}},
    ]}, start=False)
    p.write_config()
    cp = p.cli("check-config")
    assert cp.returncode == 0, f"check-config: exit {cp.returncode}\nstderr:\n{cp.stderr}"
    assert cp.stdout.strip() == b"ok", f"check-config stdout: {cp.stdout!r}, want ok"


def test_serve_refuses_to_start_with_an_abi_mismatch(petrel):
    path = test_plugin("abi_mismatch")
    p = petrel(config={"plugins": [{"path": path}]}, start=False)
    p.write_config()
    try:
        cp = subprocess.run([petrel_bin(), "serve", "-c", str(p.cfg_path)],
                            stdin=subprocess.DEVNULL, capture_output=True, timeout=20,
                            env=sanitizer_env(), cwd=str(p.dir))
    except subprocess.TimeoutExpired:
        pytest.fail("petrel serve kept running with an ABI-mismatched plugin")
    err = cp.stderr.decode("utf-8", "replace")
    want = f"plugins[0].path: {path}: ABI version 99, petrel speaks 1"
    assert cp.returncode != 0, f"serve: exit 0, want non-zero\nstderr:\n{err}"
    assert want in err, f"serve stderr lacks {want!r}; got:\n{err}"
    for marker in ("AddressSanitizer", "LeakSanitizer", "runtime error:"):
        assert marker not in err, err
    assert p.port and _port_refuses(p.host, p.port), "serve listened despite the bad plugin"


def _port_refuses(host, port):
    s = socket.socket()
    s.settimeout(1)
    try:
        s.connect((host, port))
    except OSError:
        return True
    finally:
        s.close()
    return False


# ---------------------------------------------------------------- ratelimit


def ratelimit_config(**cfg):
    return {"plugins": [{"path": shipped("ratelimit"), "config": cfg}]}


def test_ratelimit_answers_421_after_n_connections_from_one_ip(petrel):
    p = petrel(config=ratelimit_config(connections=3, window=60))
    p.wait_log(r"plugin=ratelimit, limits per IP and 60s: connections 3, messages 0")
    for i in range(3):
        with RawSMTP(p.host, p.port, source=CLIENT_CONN) as c:
            assert c.banner.code == 220, f"connection {i + 1}: got {c.banner}, want a 220 banner"
            c.expect("QUIT", "221")
    with RawSMTP(p.host, p.port, source=CLIENT_CONN, banner=False) as c:
        r = c.read_reply()
        want = f"421 4.7.0 Too many connections from {CLIENT_CONN}, try again later"
        assert r.lines == [want], f"connection 4: got {r}, want {want!r}"
        assert c.wait_closed(), "petrel kept the refused connection open"
    # another address is counted on its own
    with RawSMTP(p.host, p.port, source=CLIENT_OTHER) as c:
        assert c.banner.code == 220, f"{CLIENT_OTHER}: got {c.banner}, want 220"
        c.expect("QUIT", "221")
    p.wait_log(r"NOQUEUE: plugin=ratelimit, client " + re.escape(CLIENT_CONN) +
               r" over 3 connections in 60s: refusing")


def test_ratelimit_answers_451_after_n_messages_from_one_ip(petrel):
    p = petrel(config=ratelimit_config(messages=2, window="1m"))
    with RawSMTP(p.host, p.port, source=CLIENT_MSGS) as c:
        assert c.banner.code == 220, c.banner
        c.ehlo()
        for i in range(2):
            c.expect("MAIL FROM:<alice@example.org>", "250")
            c.expect("RSET", "250")
        r = c.cmd("MAIL FROM:<alice@example.org>")
        want = f"451 4.7.1 Too many messages from {CLIENT_MSGS}, try again later"
        assert r.lines == [want], f"third MAIL: got {r}, want {want!r}"
        # the session goes on: only the transaction was refused
        c.expect("NOOP", "250")
        c.expect("QUIT", "221")
    # a new connection from the same IP stays limited; connections are not
    with RawSMTP(p.host, p.port, source=CLIENT_MSGS) as c:
        assert c.banner.code == 220, c.banner
        c.ehlo()
        r = c.cmd("MAIL FROM:<bob@example.org>")
        assert r.code == 451 and "4.7.1" in r.first, f"MAIL after reconnect: got {r}, want 451"
        c.expect("QUIT", "221")


# ---------------------------------------------------------------- header_stamp


def test_header_stamp_header_reaches_the_remote_mx(petrel, mx_servers):
    port = free_port(MX_IP)
    mx = mx_servers(MX_IP, port, name="mx.plug.test")
    p = petrel(config={
        "delivery": {"hostname": "relay.plug.test", "connection_cache_time": "1s",
                     "timeouts": dict(TIMEOUTS)},
        "routes": [{"domain": "plug.test", "via": f"smtp:[{MX_IP}]:{port}"}],
        "retry": {"schedule": ["1s", "2s"], "max_attempts": 3, "max_age": "1h"},
        "plugins": [{"path": shipped("header_stamp"),
                     "config": {"name": "X-Plugin-Stamp",
                                "value": "via petrel %{queue_id} from %{client_ip}"}}],
    })
    content = message("stamped", sender="alice@example.org", to="bob@plug.test")
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        qid = c.transaction("alice@example.org", ["bob@plug.test"], content)
        c.expect("QUIT", "221")
    t = mx.wait_for(1, 20)[0]
    assert t.rcpt_tos == ["bob@plug.test"], t
    rest = check_received(t.data, qid=qid, helo="client.test", rcpt="bob@plug.test")
    head, sep, body = rest.partition(b"\r\n\r\n")
    assert sep, f"no end of header section in {rest!r}"
    lines = head.split(b"\r\n")
    want = f"X-Plugin-Stamp: via petrel {qid} from 127.0.0.1".encode()
    stamps = [line for line in lines if line.lower().startswith(b"x-plugin-stamp:")]
    assert stamps == [want], f"stamp headers: got {stamps}, want [{want!r}]\n{t.data!r}"
    assert lines[-1] == want, f"the stamp should follow the message's headers; got {lines}"
    orig_head, _, orig_body = content.partition(b"\r\n\r\n")
    assert head == orig_head + b"\r\n" + want, f"header section: got {head!r}"
    assert body == orig_body, f"body changed: got {body!r}, want {orig_body!r}"
