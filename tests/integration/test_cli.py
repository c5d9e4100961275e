"""The command line: check-config (file:line:col errors), the queue verbs
(list, show, cat; retry/delete/flush not yet supported) and version."""

import re

import pytest

from petrel_fixture import run_cli, to_yaml
from smtpwire import RawSMTP, message


def output(cp):
    """stdout + stderr as text (errors may go to either)."""
    return cp.stdout.decode("utf-8", "replace") + cp.stderr


def check_config(path):
    return run_cli(["check-config", "-c", str(path)])


def send(p, sender, rcpts, content):
    with RawSMTP(p.host, p.port) as c:
        c.ehlo()
        qid = c.transaction(sender, rcpts, content)
        c.expect("QUIT", "221")
    return qid


# ---------------------------------------------------------------- check-config


def test_check_config_accepts_the_base_config(petrel):
    p = petrel(start=False)
    p.write_config()
    cp = check_config(p.cfg_path)
    assert cp.returncode == 0, f"exit {cp.returncode}, want 0\n{output(cp)}"
    assert cp.stdout.decode().strip() == "ok", f"got {output(cp)!r}, want 'ok'"


def test_check_config_accepts_every_listener_key(petrel):
    p = petrel(start=False, listener={
        "max_message_size": "10K", "max_recipients": 5, "max_line_length": 1000,
        "max_errors": 3, "max_connections": 10, "max_connections_per_ip": 2,
        "command_timeout": "2s", "data_timeout": "3s", "greet_delay": "500ms",
        "max_received_headers": 20},
        config={"shutdown_timeout": "2s", "log": {"level": "info", "format": "json"}})
    p.write_config()
    cp = check_config(p.cfg_path)
    assert cp.returncode == 0, f"exit {cp.returncode}, want 0\n{output(cp)}\n" \
                               f"{p.cfg_path.read_text()}"
    assert cp.stdout.decode().strip() == "ok"


def assert_config_error(path, line, key, reason_re):
    cp = check_config(path)
    text = output(cp)
    assert cp.returncode == 1, f"exit {cp.returncode}, want 1\n{text}"
    rx = re.compile(r"^" + re.escape(str(path)) + r":(\d+):(\d+): " + re.escape(key) + r": (.*)$",
                    re.M)
    found = rx.findall(text)
    assert found, f"no '{path}:<line>:<col>: {key}: ...' line in:\n{text}"
    lines = [int(f[0]) for f in found]
    assert line in lines, f"{key}: got line(s) {lines}, want {line}\n{text}"
    reason = next(f[2] for f in found if int(f[0]) == line)
    assert re.search(reason_re, reason), f"{key}: got reason {reason!r}, want /{reason_re}/"
    return found


def test_check_config_reports_a_bad_address_with_file_line_col(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("listeners:\n  - address: nonsense\n")
    assert_config_error(path, 2, "listeners[0].address", r"expected host:port")


def test_check_config_reports_an_unknown_top_level_key(petrel):
    p = petrel(start=False)
    p.write_config()
    text = p.cfg_path.read_text()
    p.cfg_path.write_text(text + "bogus: 1\n")
    line = len(text.splitlines()) + 1
    assert_config_error(p.cfg_path, line, "bogus", r"^unknown key$")


def test_check_config_reports_an_unknown_listener_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hostname: petrel.test\nlisteners:\n  - name: a\n    address: 127.0.0.1:2525\n"
                    "    frobnicate: 3\n")
    assert_config_error(path, 5, "listeners[0].frobnicate", r"unknown key")


@pytest.mark.parametrize("key,value", [
    ("command_timeout", "5"),                 # durations need a unit
    ("command_timeout", "5 parsecs"),
    ("max_message_size", "ten"),
    ("max_recipients", "-1"),
])
def test_check_config_reports_bad_listener_values(tmp_path, key, value):
    path = tmp_path / "bad.yaml"
    path.write_text("hostname: petrel.test\nlisteners:\n  - name: a\n    address: 127.0.0.1:2525\n"
                    f"    {key}: {value}\n")
    assert_config_error(path, 5, f"listeners[0].{key}", r".")


def test_check_config_reports_a_yaml_syntax_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("hostname: petrel.test\nlisteners: [\n  {name: a\n")
    cp = check_config(path)
    text = output(cp)
    assert cp.returncode == 1, f"exit {cp.returncode}, want 1\n{text}"
    assert re.search(r"^" + re.escape(str(path)) + r":\d+:\d+: ", text, re.M), text


def test_check_config_on_a_missing_file_fails(tmp_path):
    path = tmp_path / "missing.yaml"
    cp = check_config(path)
    assert cp.returncode == 1, f"exit {cp.returncode}, want 1\n{output(cp)}"
    assert str(path) in output(cp), output(cp)


def test_serve_refuses_a_bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(to_yaml({"hostname": "petrel.test", "bogus": 1}) + "\n")
    cp = run_cli(["serve", "-c", str(path)], timeout=20)
    assert cp.returncode != 0, "serve started with a bad config"
    assert re.search(r"bogus: unknown key", output(cp)), output(cp)


# ---------------------------------------------------------------- queue verbs


def test_queue_list_on_an_empty_queue(petrel):
    p = petrel()
    cp = p.cli("queue", "list")
    assert cp.returncode == 0, f"exit {cp.returncode}\n{output(cp)}"
    assert cp.stdout.decode().strip() == "Queue is empty", f"got {output(cp)!r}"


def test_queue_list_show_cat(petrel):
    p = petrel()
    m1 = message("cli one", body="first\r\n")
    m2 = message("cli two", sender="carol@example.org", body="second\r\n")
    q1 = send(p, "alice@example.org", ["bob@local.test"], m1)
    q2 = send(p, "carol@example.org", ["dave@local.test", "erin@elsewhere.example"], m2)

    q = p.queue_list()
    assert q.qids == [q1, q2], f"got {q.qids}, want {[q1, q2]}\n{q.text}"
    line1 = q.messages[q1]["line"]
    assert re.match(r"^" + q1 + r"\s+\S+\s+\d+\s+<alice@example\.org>", line1), \
        f"message line: got {line1!r}, want '<QID> <age> <size> <sender>'"
    want_rcpts = {q1: ["bob@local.test"], q2: ["dave@local.test", "erin@elsewhere.example"]}
    for qid, addrs in want_rcpts.items():
        got = [(a, s) for a, s, _ in q.messages[qid]["rcpts"]]
        assert got == [(a, "pending") for a in addrs], f"{qid}: got {got}\n{q.text}"
    assert q.summary and re.match(r"^-- 2 messages, 3 recipients\b", q.summary), \
        f"summary: got {q.summary!r}\n{q.text}"
    # a column header line ("QUEUE ID  AGE  SIZE  SENDER") is fine; nothing else
    assert all(re.search(r"(?i)queue id", line) for line in q.other), \
        f"unexpected lines: {q.other}"

    show = p.queue_show(q2)
    assert re.search(r"^queue_id: " + q2 + r"$", show, re.M), show
    assert re.search(r"^sender: <?carol@example\.org>?$", show, re.M), show
    for a in want_rcpts[q2]:
        assert re.search(r"^.*" + re.escape(a) + r".*pending", show, re.M), \
            f"recipient {a} with its state not shown:\n{show}"
    assert re.search(r"^\s*Subject: cli two$", show, re.M), f"headers not shown:\n{show}"

    stored = p.queue_cat(q1)
    assert stored.endswith(m1), f"queue cat: got {stored!r}, want ... + {m1!r}"
    assert stored.startswith(b"Received: from client.test ([127.0.0.1])\r\n")


@pytest.mark.parametrize("args", [["retry", "QID"], ["delete", "QID"], ["flush"]])
def test_unsupported_queue_verbs_exit_2(petrel, args):
    p = petrel()
    qid = send(p, "alice@example.org", ["bob@local.test"], message("stay"))
    cp = p.cli("queue", *[qid if a == "QID" else a for a in args])
    text = output(cp)
    assert cp.returncode == 2, f"queue {args[0]}: exit {cp.returncode}, want 2\n{text}"
    assert "not yet supported" in text, f"got {text!r}, want a 'not yet supported' message"
    assert p.queue_list().qids == [qid], "the message was touched"


@pytest.mark.parametrize("verb", ["show", "cat"])
def test_queue_unknown_qid_exits_1(petrel, verb):
    p = petrel()
    send(p, "alice@example.org", ["bob@local.test"], message("known"))
    cp = p.cli("queue", verb, "0000000000000000")
    assert cp.returncode == 1, f"queue {verb} <unknown>: exit {cp.returncode}, want 1\n" \
                               f"{output(cp)}"


def test_version_prints_the_version():
    cp = run_cli(["version"])
    assert cp.returncode == 0, f"exit {cp.returncode}\n{output(cp)}"
    assert re.search(r"\b\d+\.\d+\.\d+\b", output(cp)), f"got {output(cp)!r}"


def test_unknown_verb_fails_with_usage():
    cp = run_cli(["frobnicate"])
    assert cp.returncode != 0, f"exit 0 for an unknown verb\n{output(cp)}"
    assert re.search(r"(?i)usage", output(cp)), f"no usage text: {output(cp)!r}"
