"""Harness for petrel's integration tests: start the real daemon on loopback.

Petrel (the object the `petrel` fixture hands out) writes the test's YAML
config into the test's tmp_path, takes a free loopback port, starts
`$PETREL_BIN serve -c cfg.yaml` with stderr captured to a file, waits for the
banner, and stops the daemon by PID. Every wait here has a deadline.

Also: a small YAML writer (PyYAML is not a dependency), the queue CLI
wrappers (`petrel queue list|show|cat`) with a parser for `queue list`, log
helpers, and the regexes for queue ids and the Received header.
"""

import os
import re
import signal
import socket
import subprocess
import time
from email.utils import parsedate_to_datetime

# Markers that fail a test when they show up in the daemon's stderr (or a CLI's).
SANITIZER_MARKERS = ("AddressSanitizer", "LeakSanitizer", "runtime error:", "panic")

QID_RE = r"[0-9A-F]{16}"
QUEUED_RE = re.compile(r"^250 2\.0\.0 Ok: queued as (" + QID_RE + r")$")

# RFC 5322 date-time as petrel writes it ("Sun, 23 Nov 2026 02:45:00 +0000").
DATE_RE = r"(?:[A-Z][a-z]{2}, )?\d{1,2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}(?::\d{2})? [+-]\d{4}"

# The Received header petrel prepends. `for <rcpt>` only with exactly one
# recipient; the date follows the ';' after a space or a CRLF+TAB fold.
RECEIVED_RE = re.compile(
    rb"\AReceived: from (?P<helo>[^ \r\n]+) \(\[(?P<ip>[0-9a-fA-F.:]+)\]\)\r\n"
    rb"\tby (?P<by>[^ \r\n]+) \(petrel\) with (?P<proto>[A-Z0-9]+) id (?P<qid>[0-9A-F]{16})"
    rb"(?:\r\n\tfor <(?P<rcpt>[^>\r\n]*)>)?"
    rb";(?:\r\n\t| )(?P<date>" + DATE_RE.encode() + rb")\r\n"
)

# `<ISO time> petrel[<pid>]: ` at the start of every text log line.
LOG_PREFIX_RE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d) petrel\[(\d+)\]: "
)

RCPT_STATES = ("pending", "deferred", "delivered", "failed", "quarantined")


class DaemonError(AssertionError):
    """The daemon did something the harness cannot work around."""


# ---------------------------------------------------------------- paths, ports


def petrel_bin():
    """The daemon binary: $PETREL_BIN, else $PETREL_BUILD_DIR/petrel."""
    path = os.environ.get("PETREL_BIN")
    if not path and os.environ.get("PETREL_BUILD_DIR"):
        path = os.path.join(os.environ["PETREL_BUILD_DIR"], "petrel")
    if not path:
        raise DaemonError("set PETREL_BIN to the petrel binary (e.g. build/petrel)")
    if not os.access(path, os.X_OK):
        raise DaemonError(f"PETREL_BIN={path} is not an executable file")
    return path


def free_port(host="127.0.0.1"):
    """A TCP port that was free on host a moment ago (bind to 0, release).

    Another process may take it before the daemon binds it; Petrel.start()
    retries with a new port when the daemon reports EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_closed(host, port, timeout=1.0):
    """True if a connect to host:port is refused."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect((host, port))
    except ConnectionRefusedError:
        return True
    except OSError:
        return False
    finally:
        s.close()
    return False


# ---------------------------------------------------------------- YAML writer


_PLAIN_RE = re.compile(r"^[A-Za-z0-9_./@+-][A-Za-z0-9_./@+:\[\]-]*$")
_YAML_SPECIAL = {"", "~", "null", "Null", "NULL", "true", "True", "TRUE", "false", "False",
                 "FALSE", "yes", "Yes", "YES", "no", "No", "NO", "on", "On", "ON", "off",
                 "Off", "OFF"}


def _yaml_scalar(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if v is None:
        return "null"
    s = str(v)
    if _PLAIN_RE.match(s) and s not in _YAML_SPECIAL and not s.startswith(("-", "[")):
        return s
    out = ['"']
    for ch in s:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append("\\x%02x" % ord(ch))
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def to_yaml(obj, indent=0):
    """Block-style YAML for dicts, lists and scalars (enough for petrel configs)."""
    pad = " " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{k}:")
                lines.append(to_yaml(v, indent + 2))
            elif isinstance(v, list):
                lines.append(f"{pad}{k}: []")
            elif isinstance(v, dict):
                lines.append(f"{pad}{k}: {{}}")
            else:
                lines.append(f"{pad}{k}: {_yaml_scalar(v)}")
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, dict) and item:
                body = to_yaml(item, indent + 2).split("\n")
                body[0] = pad + "- " + body[0][indent + 2:]
                lines.extend(body)
            elif isinstance(item, (dict, list)):
                raise ValueError("nested empty collections are not supported")
            else:
                lines.append(f"{pad}- {_yaml_scalar(item)}")
    else:
        lines.append(pad + _yaml_scalar(obj))
    return "\n".join(lines)


def deep_merge(base, overrides):
    """A copy of base with overrides merged in; a None value deletes the key."""
    out = dict(base)
    for k, v in (overrides or {}).items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------- CLI and queue


class QueueListing:
    """Parsed `petrel queue list` output.

    messages: {qid: {"qid", "line", "sender", "rcpts": [(addr, state, line)]}}
    qids: in printed order; summary: the `-- N messages, ...` line or None."""

    def __init__(self, text):
        self.text = text
        self.messages = {}
        self.qids = []
        self.summary = None
        self.empty = "Queue is empty" in text
        self.other = []
        qid_line = re.compile(r"^(" + QID_RE + r")\b(.*)$")
        current = None
        for line in text.splitlines():
            if not line.strip():
                continue
            m = qid_line.match(line)
            if m:
                sender = re.search(r"<([^>]*)>", m.group(2))
                current = {"qid": m.group(1), "line": line,
                           "sender": sender.group(1) if sender else None, "rcpts": []}
                self.messages[current["qid"]] = current
                self.qids.append(current["qid"])
            elif line.startswith("--"):
                self.summary = line
            elif line[0] in " \t" and current is not None:
                addr = re.search(r"<([^>]*)>", line)
                addr = addr.group(1) if addr else line.split()[0]
                state = next((w for w in re.findall(r"[a-z]+", line) if w in RCPT_STATES), None)
                current["rcpts"].append((addr, state, line))
            else:
                self.other.append(line)

    def __len__(self):
        return len(self.qids)

    def __contains__(self, qid):
        return qid in self.messages

    def __repr__(self):
        return f"QueueListing({self.text!r})"


def check_no_sanitizer(text, what):
    for marker in SANITIZER_MARKERS:
        if marker in text:
            raise DaemonError(f"{what} reported {marker!r}:\n{text[-6000:]}")


def run_cli(args, timeout=30, check_sanitizer=True):
    """Runs `$PETREL_BIN args...`; stdout as bytes, stderr as text."""
    env = sanitizer_env()
    try:
        cp = subprocess.run([petrel_bin()] + list(args), stdin=subprocess.DEVNULL,
                            capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as e:
        raise DaemonError(f"petrel {' '.join(args)} did not finish within {timeout}s") from e
    cp.stderr = cp.stderr.decode("utf-8", "replace")
    if check_sanitizer:
        check_no_sanitizer(cp.stderr, f"petrel {' '.join(args)}")
    return cp


def sanitizer_env():
    env = dict(os.environ)
    env.setdefault("ASAN_OPTIONS", "detect_leaks=1:abort_on_error=0:print_summary=1")
    env.setdefault("UBSAN_OPTIONS", "print_stacktrace=1:halt_on_error=1")
    return env


# ---------------------------------------------------------------- the daemon


class Petrel:
    """One petrel daemon for one test. See module docstring."""

    host = "127.0.0.1"

    def __init__(self, tmp_path, config=None, listener=None, name="petrel"):
        self.dir = tmp_path / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cfg_path = self.dir / "petrel.yaml"
        self.spool = self.dir / "spool"
        self.stderr_path = self.dir / "stderr.log"
        self.stdout_path = self.dir / "stdout.log"
        self.config_overrides = config or {}
        self.listener_overrides = listener or {}
        self.port = free_port(self.host)
        self.proc = None
        self.pids = []          # every daemon pid we started, in order
        self.log_offset = 0     # stderr bytes written by earlier runs (restart keeps them)
        self.starts = 0

    # -- config

    def config_dict(self):
        listener = deep_merge({"name": "default", "address": f"{self.host}:{self.port}"},
                              self.listener_overrides)
        base = {
            "hostname": "petrel.test",
            "spool": str(self.spool),
            "log": {"level": "debug", "format": "text"},
            "listeners": [listener],
            "relay": {"clients": ["127.0.0.1/32"], "domains": ["local.test"]},
        }
        if "delivery" not in self.config_overrides:
            # receive-path tests look at what stays in the queue: nothing is
            # delivered unless the test configures delivery itself
            base["delivery"] = {"hold": True}
        return deep_merge(base, self.config_overrides)

    def write_config(self):
        self.cfg_path.write_text(to_yaml(self.config_dict()) + "\n")

    # -- lifecycle

    @property
    def running(self):
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self):
        return self.proc.pid if self.proc else None

    def start(self, timeout=10.0, attempts=5):
        """Starts the daemon and waits (bounded) until its banner is readable.

        On EADDRINUSE (another process took the port) retries with a new port,
        unless the test pinned the address."""
        assert not self.running, "daemon already running"
        for attempt in range(attempts):
            self.write_config()
            if self._spawn_and_wait(timeout):
                return self
            pinned = "address" in self.listener_overrides
            if pinned or attempt == attempts - 1:
                break
            self.port = free_port(self.host)
        raise DaemonError(f"petrel did not start: port {self.port} stays in use\n{self.log()}")

    def _spawn_and_wait(self, timeout):
        """True once the banner was read; False on EADDRINUSE; raises otherwise."""
        with open(self.stderr_path, "ab") as err, open(self.stdout_path, "ab") as out:
            self.log_offset = err.tell()
            self.proc = subprocess.Popen(
                [petrel_bin(), "serve", "-c", str(self.cfg_path)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=sanitizer_env(),
                cwd=str(self.dir))
        self.pids.append(self.proc.pid)
        self.starts += 1
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                text = self.log(all_runs=False)
                if "address already in use" in text.lower() or "EADDRINUSE" in text:
                    return False
                raise DaemonError(f"petrel exited with status {rc} during start-up:\n{text}")
            try:
                if self._probe_banner(deadline):
                    return True
            except OSError as e:
                last_error = e
            time.sleep(0.05)
        self.kill9()
        raise DaemonError(f"no banner on {self.host}:{self.port} within {timeout}s "
                          f"(last error: {last_error}):\n{self.log(all_runs=False)}")

    def _probe_banner(self, deadline):
        """Connects, reads the banner, says QUIT. True if the banner was a 220."""
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(max(0.1, min(3.0, deadline - time.monotonic())))
        try:
            try:
                s.connect((self.host, self.port))
            except ConnectionRefusedError:
                return False
            data = b""
            while b"\r\n" not in data:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                data += chunk
            if not data.startswith(b"220"):
                raise DaemonError(f"start-up probe got {data!r}, want a 220 banner")
            try:
                s.sendall(b"QUIT\r\n")
                s.settimeout(2.0)
                while s.recv(4096):
                    pass
            except OSError:
                pass
            return True
        finally:
            s.close()

    def terminate(self):
        """Sends SIGTERM by PID without waiting."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)

    def wait_exit(self, timeout):
        """Waits for the daemon to exit; its status, or None on timeout."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, timeout=15.0, expect_status=0):
        """SIGTERM by PID, wait (bounded), assert the exit status, check stderr."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.terminate()
        rc = self.wait_exit(timeout)
        if rc is None:
            self.kill9()
            raise DaemonError(f"petrel (pid {self.proc.pid}) did not exit within {timeout}s of "
                              f"SIGTERM; killed it\n{self.log_tail()}")
        self.check_sanitizers()
        if expect_status is not None and rc != expect_status:
            raise DaemonError(f"petrel exited with status {rc}, want {expect_status}\n"
                              f"{self.log_tail()}")
        return rc

    def kill9(self):
        """SIGKILL by PID and reap (bounded)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired as e:
                raise DaemonError(f"pid {self.proc.pid} survived SIGKILL for 10s") from e

    def restart(self, timeout=10.0):
        """Graceful stop if running (asserting exit 0), then start on the same config."""
        if self.running:
            self.stop()
        return self.start(timeout=timeout)

    # -- logs

    def log(self, all_runs=True):
        """The daemon's stderr so far (every run of this Petrel, or only the last)."""
        try:
            data = self.stderr_path.read_bytes()
        except FileNotFoundError:
            return ""
        if not all_runs:
            data = data[self.log_offset:]
        return data.decode("utf-8", "replace")

    def log_lines(self, all_runs=True):
        return self.log(all_runs).splitlines()

    def log_tail(self, n=80):
        lines = self.log_lines()
        return "\n".join(lines[-n:])

    def wait_log(self, pattern, timeout=5.0, all_runs=True):
        """Polls stderr until a line matches the regex; returns the match.

        Raises with the log tail if none matches within timeout."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.log_lines(all_runs):
                m = rx.search(line)
                if m:
                    return m
            if time.monotonic() >= deadline:
                raise AssertionError(f"no log line matches {pattern!r} within {timeout}s; "
                                     f"log tail:\n{self.log_tail()}")
            time.sleep(0.05)

    def check_sanitizers(self):
        check_no_sanitizer(self.log(), f"petrel serve (pids {self.pids})")

    # -- queue CLI

    def cli(self, *args, timeout=30):
        """`$PETREL_BIN <args> -c cfg`."""
        return run_cli(list(args) + ["-c", str(self.cfg_path)], timeout=timeout)

    def queue_list(self):
        cp = self.cli("queue", "list")
        text = cp.stdout.decode("utf-8", "surrogateescape")
        assert cp.returncode == 0, (f"queue list: exit {cp.returncode}, want 0\n"
                                    f"stdout:\n{text}\nstderr:\n{cp.stderr}")
        return QueueListing(text)

    def queue_cat(self, qid):
        cp = self.cli("queue", "cat", qid)
        assert cp.returncode == 0, (f"queue cat {qid}: exit {cp.returncode}, want 0\n"
                                    f"stderr:\n{cp.stderr}")
        return cp.stdout

    def queue_show(self, qid):
        cp = self.cli("queue", "show", qid)
        assert cp.returncode == 0, (f"queue show {qid}: exit {cp.returncode}, want 0\n"
                                    f"stderr:\n{cp.stderr}")
        return cp.stdout.decode("utf-8", "surrogateescape")


# ---------------------------------------------------------------- stored content


def split_received(stored):
    """Splits stored content into (match of RECEIVED_RE, the rest); asserts the format."""
    m = RECEIVED_RE.match(stored)
    assert m, ("stored message does not start with petrel's Received header;\n"
               f"got first 400 bytes: {stored[:400]!r}")
    return m, stored[m.end():]


def check_received(stored, *, qid, helo, ip="127.0.0.1", proto="ESMTP", rcpt=None,
                   hostname="petrel.test"):
    """Asserts the Received header fields; returns the content after it."""
    m, rest = split_received(stored)
    got = {k: (v.decode("utf-8", "surrogateescape") if v is not None else None)
           for k, v in m.groupdict().items()}
    want = {"helo": helo, "ip": ip, "by": hostname, "proto": proto, "qid": qid, "rcpt": rcpt}
    for k, v in want.items():
        assert got[k] == v, f"Received header {k}: got {got[k]!r}, want {v!r}\n{m.group(0)!r}"
    when = parsedate_to_datetime(got["date"])
    skew = abs(time.time() - when.timestamp())
    assert skew < 600, f"Received date {got['date']!r} is {skew:.0f}s away from now"
    return rest


def wait_until(pred, timeout, interval=0.05, what="condition"):
    """Polls pred() until truthy (returned) or raises after timeout."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(interval)
