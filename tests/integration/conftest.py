"""pytest fixtures for petrel's integration tests.

petrel  — factory: petrel(config={...}, listener={...}, start=True) -> Petrel
          (petrel_fixture.py). config is merged into the base config, listener
          into listeners[0]. At teardown every daemon is stopped by PID (exit
          status 0 required unless the test killed it) and the test fails if
          its stderr holds a sanitizer report or a panic.
sink    — an aiosmtpd server on a free loopback port recording, per message,
          the envelope, the exact DATA bytes, the peer address and the EHLO
          name; `sink.reply` sets the answer to DATA ("250 ...", "451 ...").
"""

import sys
import threading

import pytest

from petrel_fixture import Petrel, free_port


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def petrel(request, tmp_path):
    daemons = []

    def factory(config=None, listener=None, start=True, name=None):
        d = Petrel(tmp_path, config=config, listener=listener,
                   name=name or f"petrel{len(daemons)}")
        daemons.append(d)
        if start:
            d.start()
        return d

    yield factory

    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    errors = []
    for d in daemons:
        try:
            if d.running:
                d.stop()
            else:
                d.check_sanitizers()
        except AssertionError as e:
            errors.append(str(e))
        if failed or errors:
            # Shown under "Captured stderr teardown" in the failure report.
            sys.stderr.write(f"---- {d.stderr_path} (last 80 lines) ----\n{d.log_tail()}\n")
    if errors:
        pytest.fail("daemon teardown: " + "\n\n".join(errors), pytrace=False)


class Sink:
    """Recorded state of the aiosmtpd sink (see module docstring)."""

    def __init__(self):
        self.host = "127.0.0.1"
        self.port = None
        self.messages = []      # dicts: mail_from, rcpt_tos, mail_options, data, peer, ehlo
        self.reply = "250 2.0.0 Ok: accepted"
        self.lock = threading.Lock()
        self.received = threading.Event()

    async def handle_DATA(self, server, session, envelope):
        with self.lock:
            self.messages.append({
                "mail_from": envelope.mail_from,
                "rcpt_tos": list(envelope.rcpt_tos),
                "mail_options": list(envelope.mail_options),
                "data": envelope.original_content,
                "peer": session.peer,
                "ehlo": session.host_name,
            })
            self.received.set()
            return self.reply

    def wait(self, n=1, timeout=10.0):
        """Waits (bounded) until n messages arrived; returns the list."""
        import time
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.messages) >= n:
                    return list(self.messages)
            time.sleep(0.05)
        raise AssertionError(f"sink got {len(self.messages)} messages within {timeout}s, "
                             f"want {n}")


@pytest.fixture
def sink():
    from aiosmtpd.controller import Controller

    s = Sink()
    s.port = free_port(s.host)
    ctl = Controller(s, hostname=s.host, port=s.port, ready_timeout=10,
                     enable_SMTPUTF8=True, decode_data=False)
    ctl.start()
    try:
        yield s
    finally:
        ctl.stop()


# Scriptable remote MXes and LMTP servers for the delivery tests: mx_servers(host,
# port, name=..., lmtp=..., unix_path=..., dsn=...) -> started mx_fixture.Server.
from mx_fixture import mx_servers  # noqa: E402,F401
