"""XBIND (issue 5): a relay client's per-message override of the source IP and
EHLO name — the XBIND command, the MAIL parameter XBIND=, the X-Petrel-Bind
header — against a matching delivery.sources rule; precedence (MAIL parameter >
XBIND command > header); the header never reaches the remote MX; every refusal
reply (raw transcripts); the override stored with the message across a deferral
and a restart; connection reuse that never mixes sources.

Config: the seed's rule (sender domain test.com → 127.0.5.10, mta.test.com),
delivery.source_ips 127.0.5.10-.12 with delivery.hostnames. Addresses: MX on
127.0.5.2, clients not allowed to relay connect from 127.0.6.50."""

import pytest

from mx_fixture import check_fields, first_n, wait_delivery
from petrel_fixture import check_received
from smtpwire import RawSMTP, message
from test_source import (DELIVERY_HOSTNAME, HOSTNAMES, IP10, IP11, IP12, MX_IP, POOL, RCPT,
                         SEED_RULE, SENDER, SrcWorld, expect_source, session)

XCFG = {"sources": [SEED_RULE], "source_ips": POOL, "hostnames": HOSTNAMES}
RULE = {"ip": IP10, "helo": "mta.test.com", "why": "rule 1"}
OUTSIDER = "127.0.6.50"          # not in relay.clients (127.0.0.1/32)
LOCAL_RCPT = "bob@local.test"    # relay.domains: anyone may send here
HEADER = "X-Petrel-Bind"


@pytest.fixture
def world(petrel, mx_servers):
    return SrcWorld(petrel, mx_servers)


def ehlo_keywords(reply):
    return [t.split()[0].upper() for t in reply.texts[1:] if t.strip()]


def expect_reply(r, code, enh, what):
    """A one-line reply `code enh ...`; enh may be a tuple of acceptable (code, enh)."""
    ok = [(code, enh)] if not isinstance(code, (list, tuple)) else list(zip(code, enh))
    good = len(r.lines) == 1 and any(r.first.startswith(f"{c} {e} ") or r.first == f"{c} {e}"
                                     for c, e in ok)
    want = " or ".join(f"{c} {e} ..." for c, e in ok)
    assert good, f"{what}: got {r}, want {want}"


def without_header(content, line):
    """content with the header line (CRLF included) taken out; asserts it was there."""
    raw = line.encode() + b"\r\n"
    assert raw in content
    return content.replace(raw, b"", 1)


def check_data(t, qid, want_rest, *, rcpt=RCPT, client_ip="127.0.0.1"):
    rest = check_received(t.data, qid=qid, helo="client.test", ip=client_ip, rcpt=rcpt)
    assert rest == want_rest, f"DATA bytes after Received:\ngot  {rest!r}\nwant {want_rest!r}"
    assert b"x-petrel-bind" not in t.data.lower(), f"the MX saw the header:\n{t.data!r}"


# ---------------------------------------------------------------- EHLO


def test_xbind_is_advertised_only_to_relay_clients(world):
    p = world.start(**XCFG)
    with session(p, ehlo=None) as c:
        r = c.ehlo()
        assert "XBIND" in ehlo_keywords(r), f"relay client: EHLO {r} does not offer XBIND"
    with session(p, ehlo=None, source=OUTSIDER) as c:
        r = c.ehlo()
        assert "XBIND" not in ehlo_keywords(r), \
            f"client {OUTSIDER} (not a relay client): EHLO {r} offers XBIND"


# ---------------------------------------------------------------- the command


def test_xbind_command_overrides_a_matching_rule(world):
    p = world.start(**XCFG)
    content = message("xbind cmd", sender=SENDER, to=RCPT)
    with session(p) as c:
        r = c.cmd(f"XBIND {IP11} bound.src.test")
        assert r.lines == [f"250 2.0.0 Bound to {IP11} as bound.src.test"], f"XBIND: got {r}"
        qid = c.transaction(SENDER, [RCPT], content)
        c.expect("QUIT", "221")
    d, t = expect_source(p, world.mx, qid, ip=IP11, helo="bound.src.test", why="xbind")
    check_data(t, qid, content)
    check_fields(d, relay=f"{MX_IP}[{MX_IP}]:{world.port}")


def test_xbind_without_hostname_greets_with_the_hostnames_entry(world):
    p = world.start(**XCFG)
    with session(p) as c:
        r = c.cmd(f"XBIND {IP12}")
        assert r.lines == [f"250 2.0.0 Bound to {IP12} as {HOSTNAMES[IP12]}"], f"XBIND: got {r}"
        qid = c.transaction(SENDER, [RCPT], message("xbind ip only", sender=SENDER))
    expect_source(p, world.mx, qid, ip=IP12, helo=HOSTNAMES[IP12], why="xbind")


def test_xbind_holds_for_every_transaction_until_xbind_reset(world):
    p = world.start(**XCFG)
    with session(p) as c:
        c.expect(f"XBIND {IP11} sticky.src.test", "250 2.0.0")
        q1 = c.transaction(SENDER, [RCPT], message("sticky 1", sender=SENDER))
        q2 = c.transaction(SENDER, [RCPT], message("sticky 2", sender=SENDER))
        q3 = c.transaction(SENDER, [RCPT], message("sticky 3", sender=SENDER))
        r = c.cmd("XBIND RESET")
        assert r.lines == ["250 2.0.0 XBIND reset"], f"XBIND RESET: got {r}"
        q4 = c.transaction(SENDER, [RCPT], message("after reset", sender=SENDER))
        c.expect(f"XBIND {IP12} again.src.test", "250 2.0.0")   # between transactions
        q5 = c.transaction(SENDER, [RCPT], message("rebound", sender=SENDER))
    for q in (q1, q2, q3):
        expect_source(p, world.mx, q, ip=IP11, helo="sticky.src.test", why="xbind")
    expect_source(p, world.mx, q4, **RULE)
    expect_source(p, world.mx, q5, ip=IP12, helo="again.src.test", why="xbind")


def test_xbind_any_local_address_when_no_source_address_is_configured(world):
    p = world.start()       # no source_ips, no rules: any local address may be bound
    with session(p) as c:
        expect_reply(c.cmd("XBIND 192.0.2.99"), 550, "5.7.1", "XBIND of a non-local address")
        r = c.cmd("XBIND 127.0.5.33")
        assert r.lines == [f"250 2.0.0 Bound to 127.0.5.33 as {DELIVERY_HOSTNAME}"], \
            f"XBIND 127.0.5.33: got {r}"
        qid = c.transaction(SENDER, [RCPT], message("any local", sender=SENDER))
    expect_source(p, world.mx, qid, ip="127.0.5.33", helo=DELIVERY_HOSTNAME, why="xbind")


# ---------------------------------------------------------------- MAIL parameter


def test_mail_parameter_overrides_a_rule_for_one_transaction(world):
    p = world.start(**XCFG)
    content = message("xbind param", sender=SENDER, to=RCPT)
    with session(p) as c:
        q1 = c.transaction(SENDER, [RCPT], content, f" XBIND={IP12},param.src.test")
        q2 = c.transaction(SENDER, [RCPT], message("next", sender=SENDER))
        q3 = c.transaction(SENDER, [RCPT], message("ip only", sender=SENDER), f" XBIND={IP11}")
    d, t = expect_source(p, world.mx, q1, ip=IP12, helo="param.src.test", why="xbind")
    check_data(t, q1, content)
    assert not any("XBIND" in x.upper() for x in t.mail_params), \
        f"the MX saw an XBIND parameter: {t.mail_params}"
    expect_source(p, world.mx, q2, **RULE)
    expect_source(p, world.mx, q3, ip=IP11, helo=HOSTNAMES[IP11], why="xbind")


# ---------------------------------------------------------------- header


HEADER_CASES = [
    ("ip_and_hostname", f"{HEADER}: {IP11} hdr.src.test", IP11, "hdr.src.test"),
    ("lower_case_name", f"x-petrel-bind: {IP11} hdr.src.test", IP11, "hdr.src.test"),
    ("ip_only", f"{HEADER}: {IP12}", IP12, HOSTNAMES[IP12]),
]


@pytest.mark.parametrize("line,ip,helo", [c[1:] for c in HEADER_CASES],
                         ids=[c[0] for c in HEADER_CASES])
def test_header_overrides_a_rule_and_never_reaches_the_mx(world, line, ip, helo):
    p = world.start(**XCFG)
    content = message("xbind header", sender=SENDER, to=RCPT,
                      headers=[line, "X-Kept: yes"])
    with session(p) as c:
        qid = c.transaction(SENDER, [RCPT], content)
    d, t = expect_source(p, world.mx, qid, ip=ip, helo=helo, why="xbind")
    check_data(t, qid, without_header(content, line))


HEADER_EDGE_CASES = [
    # id, headers, body, [(ip, helo)] any of which may win (None: the rule), stripped headers
    ("folded", [f"{HEADER}: {IP11}\r\n\thdr.src.test", "X-Kept: yes"], "Hello.\r\n",
     [(IP11, "hdr.src.test")], [f"{HEADER}: {IP11}\r\n\thdr.src.test"]),
    ("two_fields", [f"{HEADER}: {IP11} one.src.test", "X-Kept: yes",
                    f"{HEADER}: {IP12} two.src.test"], "Hello.\r\n",
     [(IP11, "one.src.test"), (IP12, "two.src.test")],
     [f"{HEADER}: {IP11} one.src.test", f"{HEADER}: {IP12} two.src.test"]),
    ("in_the_body_only", ["X-Kept: yes"], f"{HEADER}: {IP12} body.src.test\r\nHello.\r\n",
     None, []),
    ("not_in_pool", [f"{HEADER}: 127.0.5.13 bad.src.test"], "Hello.\r\n", None,
     [f"{HEADER}: 127.0.5.13 bad.src.test"]),
    ("bad_syntax", [f"{HEADER}: garbage"], "Hello.\r\n", None, [f"{HEADER}: garbage"]),
]


@pytest.mark.parametrize("headers,body,winners,stripped", [c[1:] for c in HEADER_EDGE_CASES],
                         ids=[c[0] for c in HEADER_EDGE_CASES])
def test_header_edge_cases_are_stripped_from_the_header_section_only(world, headers, body,
                                                                     winners, stripped):
    p = world.start(**XCFG)
    content = message("header edge", sender=SENDER, to=RCPT, headers=headers, body=body)
    want = content
    for line in stripped:
        want = without_header(want, line)
    with session(p) as c:
        qid = c.transaction(SENDER, [RCPT], content)
    d = wait_delivery(p, qid, RCPT, "sent")
    t = world.mx.wait_for(1)[0]
    rest = check_received(t.data, qid=qid, helo="client.test", rcpt=RCPT)
    assert rest == want, f"DATA bytes after Received:\ngot  {rest!r}\nwant {want!r}"
    if winners is None:
        expect_source(p, world.mx, qid, **RULE)
    else:
        got = (t.peer[0], t.helo)
        assert got in winners, f"MX saw {got}, want one of {winners}\n{d['line']}"
        expect_source(p, world.mx, qid, ip=got[0], helo=got[1], why="xbind")


def test_header_from_a_client_not_allowed_is_removed_and_ignored(world):
    p = world.start(**XCFG)
    line = f"{HEADER}: {IP11} sneaky.src.test"
    content = message("outsider header", sender=SENDER, to=LOCAL_RCPT,
                      headers=[line, "X-Kept: yes"])
    with session(p, source=OUTSIDER) as c:
        qid = c.transaction(SENDER, [LOCAL_RCPT], content)
    d, t = expect_source(p, world.mx, qid, rcpt=LOCAL_RCPT, **RULE)
    check_data(t, qid, without_header(content, line), rcpt=LOCAL_RCPT, client_ip=OUTSIDER)


# ---------------------------------------------------------------- precedence


PRECEDENCE = [
    # id, XBIND command, MAIL parameter, header, winner
    ("param_over_command", (IP11, "cmd.src.test"), (IP12, "param.src.test"), None,
     (IP12, "param.src.test")),
    ("command_over_header", (IP11, "cmd.src.test"), None, (IP12, "hdr.src.test"),
     (IP11, "cmd.src.test")),
    ("param_over_header", None, (IP11, "param.src.test"), (IP12, "hdr.src.test"),
     (IP11, "param.src.test")),
    ("param_over_both", (IP11, "cmd.src.test"), (IP12, "param.src.test"),
     (IP10, "hdr.src.test"), (IP12, "param.src.test")),
]


@pytest.mark.parametrize("cmd,param,header,winner", [c[1:] for c in PRECEDENCE],
                         ids=[c[0] for c in PRECEDENCE])
def test_precedence_mail_parameter_then_command_then_header(world, cmd, param, header, winner):
    p = world.start(**XCFG)
    line = f"{HEADER}: {header[0]} {header[1]}" if header else None
    content = message("precedence", sender=SENDER, to=RCPT, headers=[line] if line else None)
    with session(p) as c:
        if cmd:
            c.expect(f"XBIND {cmd[0]} {cmd[1]}", "250 2.0.0")
        params = f" XBIND={param[0]},{param[1]}" if param else ""
        qid = c.transaction(SENDER, [RCPT], content, params)
    d, t = expect_source(p, world.mx, qid, ip=winner[0], helo=winner[1], why="xbind")
    check_data(t, qid, without_header(content, line) if line else content)


# ---------------------------------------------------------------- refusals


EHLO = ("EHLO client.test", "250")
MAIL = (f"MAIL FROM:<{SENDER}>", "250 2.1.0")
RCPT_CMD = (f"RCPT TO:<{RCPT}>", "250 2.1.5")
REFUSALS = [
    # id, commands before, the XBIND command, code, enhanced code
    ("before_ehlo", [], f"XBIND {IP11}", 503, "5.5.1"),
    ("inside_transaction_after_mail", [EHLO, MAIL], f"XBIND {IP11}", 503, "5.5.1"),
    ("inside_transaction_after_rcpt", [EHLO, MAIL, RCPT_CMD], f"XBIND {IP11}", 503, "5.5.1"),
    ("reset_inside_transaction", [EHLO, MAIL], "XBIND RESET", 503, "5.5.1"),
    ("no_argument", [EHLO], "XBIND", 501, "5.5.4"),
    ("not_an_ip", [EHLO], "XBIND mta.test.com", 501, "5.5.4"),
    ("bad_hostname", [EHLO], f"XBIND {IP11} bad_host!", 501, "5.5.4"),
    ("three_arguments", [EHLO], f"XBIND {IP11} a.src.test extra", 501, "5.5.4"),
    ("reset_with_argument", [EHLO], "XBIND RESET now", 501, "5.5.4"),
    ("not_in_pool", [EHLO], "XBIND 127.0.5.13", 550, "5.7.1"),
    ("not_local", [EHLO], "XBIND 192.0.2.99 x.src.test", 550, "5.7.1"),
    ("ipv6_not_in_pool", [EHLO], "XBIND ::1", 550, "5.7.1"),
]


def finish_transaction(c, sent, subject):
    """Completes a transaction from wherever `sent` (the commands so far) left it."""
    verbs = [cmd.split()[0] for cmd, _ in sent]
    if "EHLO" not in verbs:
        c.ehlo()
    if "MAIL" not in verbs:
        c.expect(MAIL[0], MAIL[1])
    if "RCPT" not in verbs:
        c.expect(RCPT_CMD[0], RCPT_CMD[1])
    r = c.data(message(subject, sender=SENDER))
    assert r.qid, f"end of DATA: got {r}"
    return r.qid


@pytest.mark.parametrize("before,command,code,enh", [c[1:] for c in REFUSALS],
                         ids=[c[0] for c in REFUSALS])
def test_xbind_command_refusals(world, before, command, code, enh):
    p = world.start(**XCFG)
    with RawSMTP(p.host, p.port) as c:
        assert c.banner.code == 220
        for cmd, want in before:
            c.expect(cmd, want)
        expect_reply(c.cmd(command), code, enh, command)
        # the session goes on; the refused command bound nothing
        qid = finish_transaction(c, before, f"after {command}")
        c.expect("QUIT", "221")
    expect_source(p, world.mx, qid, **RULE)


def test_xbind_refused_to_a_client_not_allowed(world):
    p = world.start(**XCFG)
    with session(p, source=OUTSIDER) as c:
        expect_reply(c.cmd(f"XBIND {IP11} sneaky.src.test"), 550, "5.7.1", "XBIND")
        r = c.cmd(f"MAIL FROM:<{SENDER}> XBIND={IP11},sneaky.src.test")
        expect_reply(r, (550, 555), ("5.7.1", "5.5.4"), "MAIL ... XBIND=")
        qid = c.transaction(SENDER, [LOCAL_RCPT], message("outsider", sender=SENDER))
    expect_source(p, world.mx, qid, rcpt=LOCAL_RCPT, **RULE)


PARAM_REFUSALS = [
    ("not_in_pool", "XBIND=127.0.5.13", (550,), ("5.7.1",)),
    ("not_local", "XBIND=192.0.2.99,x.src.test", (550,), ("5.7.1",)),
    ("not_an_ip", "XBIND=garbage", (501, 555), ("5.5.4", "5.5.4")),
    ("bad_hostname", f"XBIND={IP11},bad_host!", (501, 555), ("5.5.4", "5.5.4")),
    ("empty", "XBIND=", (501, 555), ("5.5.4", "5.5.4")),
]


@pytest.mark.parametrize("param,codes,enhs", [c[1:] for c in PARAM_REFUSALS],
                         ids=[c[0] for c in PARAM_REFUSALS])
def test_mail_parameter_refusals(world, param, codes, enhs):
    p = world.start(**XCFG)
    with session(p) as c:
        expect_reply(c.cmd(f"MAIL FROM:<{SENDER}> {param}"), codes, enhs, f"MAIL ... {param}")
        qid = c.transaction(SENDER, [RCPT], message("after refusal", sender=SENDER))
    expect_source(p, world.mx, qid, **RULE)


# ---------------------------------------------------------------- stored with the message


def submit_with_override(p, kind, ip, helo, subject):
    """One message with the override given as kind ("command", "param", "header")."""
    line = f"{HEADER}: {ip} {helo}"
    content = message(subject, sender=SENDER, to=RCPT,
                      headers=[line] if kind == "header" else None)
    with session(p) as c:
        if kind == "command":
            c.expect(f"XBIND {ip} {helo}", "250 2.0.0")
        params = f" XBIND={ip},{helo}" if kind == "param" else ""
        qid = c.transaction(SENDER, [RCPT], content, params)
        c.expect("QUIT", "221")
    return qid, (without_header(content, line) if kind == "header" else content)


@pytest.mark.parametrize("kind", ["command", "param", "header"])
def test_override_survives_a_deferral_and_a_restart(world, kind):
    world.mx.set_reply("rcpt", first_n(1, "451 4.7.1 Try again later"))
    p = world.start(retry={"schedule": ["3s"], "max_attempts": 5, "max_age": "1h"}, **XCFG)
    qid, want = submit_with_override(p, kind, IP11, "keep.src.test", f"restart {kind}")
    d = wait_delivery(p, qid, RCPT, "deferred")
    check_fields(d, src=IP11, helo="keep.src.test", attempts="1", dsn="4.7.1")
    assert "(xbind)" in d["line"], f"why: want (xbind)\n{d['line']}"
    first = world.mx.all_transactions()[0]
    assert (first.peer[0], first.helo) == (IP11, "keep.src.test"), \
        f"first attempt: MX saw {first.peer[0]} / EHLO {first.helo!r}, " \
        f"want {IP11} / keep.src.test"
    p.stop()
    shown = p.queue_show(qid)
    assert IP11 in shown and "keep.src.test" in shown, \
        f"queue show {qid} does not show the stored override:\n{shown}"
    p.start()
    d, t = expect_source(p, world.mx, qid, ip=IP11, helo="keep.src.test", why="xbind")
    check_fields(d, attempts="2")
    check_data(t, qid, want)


# ---------------------------------------------------------------- connection reuse


def test_connection_reuse_never_mixes_sources(world):
    p = world.start(delivery={"connection_cache_time": "3s"}, **XCFG)
    overrides = [(IP11, "a.src.test"), (IP12, "b.src.test"), (IP11, "c.src.test")]
    sent = []
    with session(p) as c:
        for i in range(9):
            ip, helo = overrides[i % 3]
            c.expect(f"XBIND {ip} {helo}", "250 2.0.0")
            rcpt = f"r{i}@dest.src.test"
            sent.append((c.transaction(SENDER, [rcpt], message(f"reuse {i}", sender=SENDER)),
                         rcpt, ip, helo))
        c.expect("XBIND RESET", "250 2.0.0")
        rcpt = "r9@dest.src.test"
        sent.append((c.transaction(SENDER, [rcpt], message("reuse 9", sender=SENDER)),
                     rcpt, IP10, "mta.test.com"))
        c.expect("QUIT", "221")
    by_conn = {}
    for qid, rcpt, ip, helo in sent:
        why = "rule 1" if ip == IP10 else "xbind"
        d, t = expect_source(p, world.mx, qid, ip=ip, helo=helo, why=why, rcpt=rcpt)
        by_conn.setdefault(id(t.conn), set()).add((ip, helo))
    mixed = {k: v for k, v in by_conn.items() if len(v) > 1}
    assert not mixed, f"connections carried messages of different sources: {mixed}"
    assert len(by_conn) >= 4, f"want at least one connection per source, got {by_conn}"
