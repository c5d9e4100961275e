"""Outgoing source IP and EHLO name (issue 5): delivery.sources rules (the seed's
domain rule, listener_ip, listener, recipient_domain, client_cidr, all criteria
of a rule together, pool, ip alone), the random choice over delivery.source_ips
with delivery.hostnames, the machine's own addresses when nothing is configured,
IPv6, config validation (a non-local address is rejected with file:line), and a
bind failure (address gone) as a temporary failure.

What is checked is what the remote MX sees: the peer address of petrel's
connection and its EHLO argument, and the delivery log line
`src=<ip>, helo=<name> (<why>)`.

Addresses: MX on 127.0.5.2, source IPs 127.0.5.10-.12, listeners on
127.0.5.20/.21, clients from 127.0.6.x; routing through a smarthost route
(`*` → smtp:[127.0.5.2]:port), so no DNS. The bind-failure test adds and
removes 198.18.5.10 on lo (root only)."""

import ipaddress
import json
import os
import re
import subprocess
import time

import pytest

from mx_fixture import check_fields, first_n, shared_port, wait_delivery
from petrel_fixture import RECEIVED_RE, check_received, free_port, run_cli
from smtpwire import RawSMTP, message

MX_IP = "127.0.5.2"
IP10, IP11, IP12 = "127.0.5.10", "127.0.5.11", "127.0.5.12"
POOL = [IP10, IP11, IP12]
HOSTNAMES = {IP10: "ten.src.test", IP11: "eleven.src.test", IP12: "twelve.src.test"}
DELIVERY_HOSTNAME = "relay.src.test"
SEED_RULE = {"domain": "test.com", "ip": IP10, "hostname": "mta.test.com"}
SENDER = "alice@test.com"
RCPT = "bob@dest.src.test"
LISTEN_A, LISTEN_B = "127.0.5.20", "127.0.5.21"
TIMEOUTS = {"connect": "3s", "greeting": "10s", "command": "10s", "data_init": "10s",
            "data_block": "10s", "data_end": "10s"}
WHY_RE = re.compile(r"\bhelo=[^,\s]+ \(([^)]*)\)")


# ---------------------------------------------------------------- the world


class SrcWorld:
    """petrel + one remote MX on MX_IP:port reached through a `*` smarthost route."""

    def __init__(self, petrel_factory, mx_factory, mx_ip=MX_IP):
        self.petrel_factory = petrel_factory
        self.mx_ip = mx_ip
        self.port = free_port(mx_ip)
        self.mx = mx_factory(mx_ip, self.port, name="mx.src.test")
        self.p = None

    def config(self, *, sources=None, source_ips=None, hostnames=None, delivery=None,
               retry=None, relay_clients=None, extra=None, hostname=DELIVERY_HOSTNAME):
        d = {"connection_cache_time": "1s", "timeouts": dict(TIMEOUTS)}
        if hostname is not None:
            d["hostname"] = hostname
        if source_ips is not None:
            d["source_ips"] = list(source_ips)
        if hostnames:
            d["hostnames"] = dict(hostnames)
        if sources:
            d["sources"] = list(sources)
        d.update(delivery or {})
        host = f"[{self.mx_ip}]"
        cfg = {
            "delivery": d,
            "routes": [{"domain": "*", "via": f"smtp:{host}:{self.port}"}],
            "retry": retry or {"schedule": ["1s", "2s"], "max_attempts": 3, "max_age": "1h"},
            "bounce": {"enabled": True},
        }
        if relay_clients is not None:
            cfg["relay"] = {"clients": list(relay_clients), "domains": ["local.test"]}
        cfg.update(extra or {})
        return cfg

    def start(self, start=True, **kw):
        self.p = self.petrel_factory(config=self.config(**kw), start=start)
        return self.p


@pytest.fixture
def world(petrel, mx_servers):
    return SrcWorld(petrel, mx_servers)


# ---------------------------------------------------------------- client side


def session(p, *, host=None, port=None, source=None, ehlo="client.test"):
    """A RawSMTP session to petrel after the banner (and EHLO unless ehlo=None)."""
    c = RawSMTP(host or p.host, port or p.port, source=source)
    assert c.banner.code == 220, f"banner: got {c.banner}, want 220"
    if ehlo:
        c.ehlo(ehlo)
    return c


def submit(p, sender=SENDER, rcpts=(RCPT,), subject="source", *, host=None, port=None,
           source=None, mail_params="", headers=None):
    """One message in its own session; (qid, content)."""
    content = message(subject, sender=sender, to=rcpts[0], headers=headers)
    with session(p, host=host, port=port, source=source) as c:
        qid = c.transaction(sender, list(rcpts), content, mail_params)
        c.expect("QUIT", "221")
    return qid, content


def txn_qid(t):
    """The queue id named in the Received header petrel put on top of t's DATA."""
    m = RECEIVED_RE.match(t.data or b"")
    return m.group("qid").decode() if m else None


def wait_txn(mx, qid, rcpt, timeout=15.0):
    """The MX's accepted transaction that carried qid to rcpt (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        for t in mx.messages:
            if txn_qid(t) == qid and rcpt.lower() in (a.lower() for a in t.delivered_to):
                return t
        if time.monotonic() >= deadline:
            raise AssertionError(f"the MX got no transaction of {qid} for <{rcpt}> within "
                                 f"{timeout}s:\n{mx.describe()}")
        time.sleep(0.05)


def delivered(p, mx, qid, rcpt=RCPT, timeout=15.0):
    """(parsed `status=sent` log line with "why", the MX transaction)."""
    d = wait_delivery(p, qid, rcpt, "sent", timeout=timeout)
    m = WHY_RE.search(d["line"])
    d["why"] = m.group(1) if m else None
    return d, wait_txn(mx, qid, rcpt, timeout)


def expect_source(p, mx, qid, *, ip, helo, why, rcpt=RCPT):
    """The MX saw peer ip and `EHLO helo`; the log line says src=ip, helo=helo (why).

    why: a string or a compiled regex."""
    d, t = delivered(p, mx, qid, rcpt)
    problems = []
    if t.peer[0] != ip:
        problems.append(f"MX peer address: got {t.peer[0]}, want {ip}")
    if (t.verb, t.helo) != ("EHLO", helo):
        problems.append(f"MX greeting: got {t.verb} {t.helo!r}, want EHLO {helo}")
    if d.get("src") != ip:
        problems.append(f"log src=: got {d.get('src')!r}, want {ip}")
    if d.get("helo") != helo:
        problems.append(f"log helo=: got {d.get('helo')!r}, want {helo}")
    ok = why.fullmatch(d["why"] or "") if isinstance(why, re.Pattern) else d["why"] == why
    if not ok:
        problems.append(f"log why: got {d['why']!r}, want "
                        f"{why.pattern if isinstance(why, re.Pattern) else why!r}")
    assert not problems, "\n".join(problems) + f"\nlog line: {d['line']}\nMX txn: {t!r}"
    return d, t


# ---------------------------------------------------------------- rules


def test_seed_domain_rule_binds_its_ip_and_greets_with_its_hostname(world):
    p = world.start(sources=[SEED_RULE], source_ips=[IP11], hostnames={IP11: HOSTNAMES[IP11]})
    content = message("seed rule", sender=SENDER, to=RCPT)
    with session(p) as c:
        qid = c.transaction(SENDER, [RCPT], content)
    d, t = expect_source(p, world.mx, qid, ip=IP10, helo="mta.test.com", why="rule 1")
    rest = check_received(t.data, qid=qid, helo="client.test", rcpt=RCPT)
    assert rest == content, f"content differs:\ngot  {rest!r}\nwant {content!r}"
    check_fields(d, relay=f"{MX_IP}[{MX_IP}]:{world.port}", attempts="1")
    # the rule is for the sender's domain only: another sender gets the random pool
    qid2, _ = submit(p, "carol@other.src.test")
    expect_source(p, world.mx, qid2, ip=IP11, helo=HOSTNAMES[IP11], why="random")


def test_domain_rule_matches_exactly_or_subdomains_with_a_star(world):
    p = world.start(sources=[
        {"domain": "test.com", "ip": IP10, "hostname": "mta.test.com"},
        {"domain": "*.sub.src.test", "ip": IP11, "hostname": "star.src.test"},
    ], source_ips=[IP12], hostnames={IP12: HOSTNAMES[IP12]})
    cases = [
        ("alice@test.com", IP10, "mta.test.com", "rule 1"),
        ("Alice@TEST.COM", IP10, "mta.test.com", "rule 1"),        # domains ignore case
        ("alice@x.test.com", IP12, HOSTNAMES[IP12], "random"),     # exact: no subdomains
        ("alice@a.sub.src.test", IP11, "star.src.test", "rule 2"),
        ("alice@b.a.sub.src.test", IP11, "star.src.test", "rule 2"),
        ("alice@nottest.com", IP12, HOSTNAMES[IP12], "random"),
    ]
    qids = []
    with session(p) as c:
        for i, (sender, *_rest) in enumerate(cases):
            rcpt = f"r{i}@dest.src.test"
            qids.append((c.transaction(sender, [rcpt], message(f"dom {i}", sender=sender)),
                         rcpt))
    for (qid, rcpt), (sender, ip, helo, why) in zip(qids, cases):
        try:
            expect_source(p, world.mx, qid, ip=ip, helo=helo, why=why, rcpt=rcpt)
        except AssertionError as e:
            raise AssertionError(f"sender <{sender}>: {e}") from None


def test_first_matching_rule_wins_and_is_numbered_from_one(world):
    p = world.start(sources=[
        {"domain": "nomatch.src.test", "ip": IP12, "hostname": "no.src.test"},
        {"domain": "test.com", "ip": IP11, "hostname": "second.src.test"},
        {"domain": "test.com", "ip": IP10, "hostname": "third.src.test"},
    ])
    qid, _ = submit(p)
    expect_source(p, world.mx, qid, ip=IP11, helo="second.src.test", why="rule 2")


def test_rule_with_ip_alone_takes_the_hostname_from_hostnames_else_delivery_hostname(world):
    p = world.start(sources=[
        {"domain": "test.com", "ip": IP11},
        {"domain": "bare.src.test", "ip": IP12},
    ], hostnames={IP11: HOSTNAMES[IP11]})
    qid, _ = submit(p)
    expect_source(p, world.mx, qid, ip=IP11, helo=HOSTNAMES[IP11], why="rule 1")
    qid, _ = submit(p, "alice@bare.src.test")
    expect_source(p, world.mx, qid, ip=IP12, helo=DELIVERY_HOSTNAME, why="rule 2")


def test_listener_ip_rule_distinguishes_two_listeners(world):
    port = shared_port([LISTEN_A, LISTEN_B])
    p = world.start(start=False, relay_clients=["127.0.0.0/8"], sources=[
        {"listener_ip": LISTEN_A, "ip": IP10, "hostname": "a.src.test"},
        {"listener_ip": LISTEN_B, "ip": IP11, "hostname": "b.src.test"},
    ], extra={"listeners": [{"name": "in-a", "address": f"{LISTEN_A}:{port}"},
                            {"name": "in-b", "address": f"{LISTEN_B}:{port}"}]})
    p.listener_overrides = {"address": "pinned"}     # the ports are in the config itself
    p.host, p.port = LISTEN_A, port
    p.start()
    qa, _ = submit(p, subject="via a", host=LISTEN_A, port=port)
    qb, _ = submit(p, subject="via b", host=LISTEN_B, port=port)
    expect_source(p, world.mx, qa, ip=IP10, helo="a.src.test", why="rule 1")
    expect_source(p, world.mx, qb, ip=IP11, helo="b.src.test", why="rule 2")


def test_listener_ip_is_the_local_address_a_wildcard_listener_was_reached_on(world):
    port = free_port("0.0.0.0")
    p = world.start(start=False, relay_clients=["127.0.0.0/8"], sources=[
        {"listener_ip": LISTEN_A, "ip": IP10, "hostname": "a.src.test"},
        {"listener_ip": LISTEN_B, "ip": IP11, "hostname": "b.src.test"},
    ], source_ips=[IP12], hostnames={IP12: HOSTNAMES[IP12]},
        extra={"listeners": [{"name": "any", "address": f"0.0.0.0:{port}"}]})
    p.listener_overrides = {"address": "pinned"}
    p.host, p.port = LISTEN_A, port
    p.start()
    qa, _ = submit(p, subject="any a", host=LISTEN_A, port=port)
    qb, _ = submit(p, subject="any b", host=LISTEN_B, port=port)
    qc, _ = submit(p, subject="any 1", host="127.0.0.1", port=port)
    expect_source(p, world.mx, qa, ip=IP10, helo="a.src.test", why="rule 1")
    expect_source(p, world.mx, qb, ip=IP11, helo="b.src.test", why="rule 2")
    expect_source(p, world.mx, qc, ip=IP12, helo=HOSTNAMES[IP12], why="random")


def test_listener_name_rule(world):
    port = shared_port([LISTEN_A, LISTEN_B])
    p = world.start(start=False, relay_clients=["127.0.0.0/8"], sources=[
        {"listener": "in-b", "ip": IP12, "hostname": "named.src.test"},
    ], source_ips=[IP10], hostnames={IP10: HOSTNAMES[IP10]},
        extra={"listeners": [{"name": "in-a", "address": f"{LISTEN_A}:{port}"},
                             {"name": "in-b", "address": f"{LISTEN_B}:{port}"}]})
    p.listener_overrides = {"address": "pinned"}
    p.host, p.port = LISTEN_A, port
    p.start()
    qa, _ = submit(p, subject="named a", host=LISTEN_A, port=port)
    qb, _ = submit(p, subject="named b", host=LISTEN_B, port=port)
    expect_source(p, world.mx, qa, ip=IP10, helo=HOSTNAMES[IP10], why="random")
    expect_source(p, world.mx, qb, ip=IP12, helo="named.src.test", why="rule 1")


def test_recipient_domain_rule_splits_one_message_by_recipient_domain(world):
    p = world.start(sources=[
        {"recipient_domain": "a.dest.test", "ip": IP10, "hostname": "ra.src.test"},
        {"recipient_domain": "b.dest.test", "ip": IP11, "hostname": "rb.src.test"},
    ], source_ips=[IP12], hostnames={IP12: HOSTNAMES[IP12]})
    rcpts = ["bob@a.dest.test", "carol@b.dest.test", "dave@c.dest.test"]
    qid, content = submit(p, rcpts=rcpts, subject="three domains")
    want = [(IP10, "ra.src.test", "rule 1"), (IP11, "rb.src.test", "rule 2"),
            (IP12, HOSTNAMES[IP12], "random")]
    for rcpt, (ip, helo, why) in zip(rcpts, want):
        d, t = expect_source(p, world.mx, qid, ip=ip, helo=helo, why=why, rcpt=rcpt)
        assert t.rcpt_tos == [rcpt], \
            f"<{rcpt}> shared a transaction with {t.rcpt_tos}: sources differ, so must it"
        assert check_received(t.data, qid=qid, helo="client.test", rcpt=None) == content


def test_client_cidr_rule_matches_the_submitting_clients_address(world):
    p = world.start(relay_clients=["127.0.0.1/32", "127.0.6.0/24"], sources=[
        {"client_cidr": ["127.0.6.0/25"], "ip": IP11, "hostname": "cidr.src.test"},
    ], source_ips=[IP12], hostnames={IP12: HOSTNAMES[IP12]})
    q_in, _ = submit(p, subject="in cidr", source="127.0.6.5")
    q_out, _ = submit(p, subject="other half", source="127.0.6.200")
    q_local, _ = submit(p, subject="localhost")
    expect_source(p, world.mx, q_in, ip=IP11, helo="cidr.src.test", why="rule 1")
    expect_source(p, world.mx, q_out, ip=IP12, helo=HOSTNAMES[IP12], why="random")
    expect_source(p, world.mx, q_local, ip=IP12, helo=HOSTNAMES[IP12], why="random")


def test_every_criterion_of_a_rule_must_match(world):
    p = world.start(relay_clients=["127.0.0.1/32", "127.0.6.0/24"], sources=[
        {"domain": "test.com", "recipient_domain": "a.dest.test",
         "client_cidr": ["127.0.6.0/24"], "ip": IP10, "hostname": "all.src.test"},
        {"domain": "test.com", "ip": IP11, "hostname": "mta.test.com"},
    ], source_ips=[IP12], hostnames={IP12: HOSTNAMES[IP12]})
    cases = [
        # sender, rcpt, client source, want ip, helo, why
        (SENDER, "bob@a.dest.test", "127.0.6.7", IP10, "all.src.test", "rule 1"),
        (SENDER, "bob@b.dest.test", "127.0.6.7", IP11, "mta.test.com", "rule 2"),
        (SENDER, "carol@a.dest.test", None, IP11, "mta.test.com", "rule 2"),
        ("alice@other.src.test", "dave@a.dest.test", "127.0.6.7", IP12, HOSTNAMES[IP12],
         "random"),
    ]
    qids = [submit(p, s, [r], f"crit {i}", source=src)[0]
            for i, (s, r, src, *_x) in enumerate(cases)]
    for qid, (s, r, src, ip, helo, why) in zip(qids, cases):
        try:
            expect_source(p, world.mx, qid, ip=ip, helo=helo, why=why, rcpt=r)
        except AssertionError as e:
            raise AssertionError(f"<{s}> → <{r}> from {src or '127.0.0.1'}: {e}") from None


def test_every_delivery_log_line_carries_src_helo_and_why(world):
    world.mx.set_reply("rcpt", "550 5.1.1 No such user", rcpt="gone")
    world.mx.set_reply("rcpt", first_n(1, "451 4.7.1 Try again later"), rcpt="later")
    p = world.start(sources=[SEED_RULE], source_ips=[IP12], hostnames=HOSTNAMES)
    rcpts = ["ok@dest.src.test", "later@dest.src.test", "gone@dest.src.test"]
    qid, _ = submit(p, rcpts=rcpts, subject="three outcomes")
    lines = [wait_delivery(p, qid, rcpts[0], "sent"),
             wait_delivery(p, qid, rcpts[1], "deferred"),
             wait_delivery(p, qid, rcpts[2], "bounced"),
             wait_delivery(p, qid, rcpts[1], "sent")]
    for d in lines:
        m = WHY_RE.search(d["line"])
        check_fields(d, src=IP10, helo="mta.test.com")
        assert m and m.group(1) == "rule 1", f"want (rule 1) after helo=:\n{d['line']}"


# ---------------------------------------------------------------- pools, random


def check_pool_spread(p, mx, qids, pool, *, helo_of, why):
    """Every message went out from a pool address with its EHLO name; more than one
    address was used. helo_of(ip) → the expected EHLO name."""
    seen = {}
    for qid, rcpt in qids:
        d, t = delivered(p, mx, qid, rcpt)
        ip = t.peer[0]
        assert ip in pool, f"{qid}: MX peer {ip} is not in {pool}\n{d['line']}"
        assert t.helo == helo_of(ip), \
            f"{qid}: from {ip} the MX saw EHLO {t.helo!r}, want {helo_of(ip)!r}"
        assert d.get("src") == ip and d.get("helo") == helo_of(ip) and d["why"] == why, \
            (f"{qid}: log says src={d.get('src')} helo={d.get('helo')} ({d['why']}), want "
             f"src={ip} helo={helo_of(ip)} ({why}) as the MX saw\n{d['line']}")
        seen[ip] = seen.get(ip, 0) + 1
    assert len(seen) > 1, f"{len(qids)} messages all went out from {seen}: want a random " \
                          f"choice among {pool}"
    return seen


def submit_many(p, n, sender=SENDER, tag="m"):
    out = []
    with session(p) as c:
        for i in range(n):
            rcpt = f"{tag}{i:02d}@dest.src.test"
            out.append((c.transaction(sender, [rcpt], message(f"{tag} {i}", sender=sender)),
                        rcpt))
        c.expect("QUIT", "221")
    return out


def test_random_choice_over_source_ips_uses_several_each_with_its_hostname(world):
    p = world.start(source_ips=POOL, hostnames=HOSTNAMES)
    qids = submit_many(p, 20, sender="alice@random.src.test")
    check_pool_spread(p, world.mx, qids, POOL, helo_of=HOSTNAMES.get, why="random")


def test_rule_with_pool_picks_among_its_addresses(world):
    p = world.start(sources=[{"domain": "test.com", "pool": POOL}], hostnames=HOSTNAMES,
                    source_ips=[IP10])
    qids = submit_many(p, 20)
    check_pool_spread(p, world.mx, qids, POOL, helo_of=HOSTNAMES.get, why="rule 1")


def test_rule_with_pool_and_hostname_greets_with_the_rules_hostname(world):
    pool = [IP11, IP12]
    p = world.start(sources=[
        {"domain": "other.src.test", "ip": IP10},
        {"domain": "test.com", "pool": pool, "hostname": "pool.src.test"},
    ], hostnames=HOSTNAMES)
    qids = submit_many(p, 16)
    check_pool_spread(p, world.mx, qids, pool, helo_of=lambda ip: "pool.src.test",
                      why="rule 2")


def test_source_ips_without_hostnames_greet_with_delivery_hostname(world):
    p = world.start(source_ips=[IP11])
    qid, _ = submit(p, "alice@plain.src.test")
    expect_source(p, world.mx, qid, ip=IP11, helo=DELIVERY_HOSTNAME, why="random")


def test_without_delivery_hostname_the_top_level_hostname_is_the_ehlo_name(world):
    p = world.start(source_ips=[IP11], hostname=None)
    qid, _ = submit(p, "alice@plain.src.test")
    expect_source(p, world.mx, qid, ip=IP11, helo="petrel.test", why="random")


def machine_ipv4_addresses():
    """The machine's non-loopback IPv4 addresses (as `ip -j addr` lists them)."""
    cp = subprocess.run(["ip", "-j", "-4", "addr", "show"], capture_output=True, timeout=10)
    assert cp.returncode == 0, cp.stderr
    out = set()
    for link in json.loads(cp.stdout or b"[]"):
        if "LOOPBACK" in link.get("flags", []):
            continue
        for a in link.get("addr_info", []):
            if a.get("family") == "inet" and not ipaddress.ip_address(a["local"]).is_loopback:
                out.add(a["local"])
    return out


def test_nothing_configured_picks_one_of_the_machines_own_ipv4_addresses(world):
    p = world.start()
    locals_v4 = machine_ipv4_addresses()
    qid, _ = submit(p, "alice@plain.src.test")
    d, t = delivered(p, world.mx, qid)
    if locals_v4:
        assert t.peer[0] in locals_v4, \
            f"MX peer {t.peer[0]}: want one of the machine's IPv4 addresses {sorted(locals_v4)}"
        assert d["why"] == "random", f"why: got {d['why']!r}, want 'random'\n{d['line']}"
        assert d.get("src") == t.peer[0], f"log src= {d.get('src')!r}, MX saw {t.peer[0]}"
    else:
        assert d["why"] == "system", f"why: got {d['why']!r}, want 'system'\n{d['line']}"
    assert (t.verb, t.helo) == ("EHLO", DELIVERY_HOSTNAME), f"got {t.verb} {t.helo!r}"
    assert d.get("helo") == DELIVERY_HOSTNAME, d["line"]


def test_ipv6_source_rule_binds_an_ipv6_address(petrel, mx_servers):
    import socket
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        try:
            s.bind(("::1", 0))
        except OSError:
            pytest.skip("no ::1 on this machine")
        port = s.getsockname()[1]
    mx = mx_servers("::1", port, name="mx6.src.test")
    p = petrel(config={
        "delivery": {"hostname": DELIVERY_HOSTNAME, "connection_cache_time": "1s",
                     "timeouts": dict(TIMEOUTS),
                     "sources": [{"domain": "test.com", "ip": "::1",
                                  "hostname": "v6.src.test"}]},
        "routes": [{"domain": "*", "via": f"smtp:[::1]:{port}"}],
        "retry": {"schedule": ["1s"], "max_attempts": 3, "max_age": "1h"},
    })
    qid, _ = submit(p)
    expect_source(p, mx, qid, ip="::1", helo="v6.src.test", why="rule 1")


# ---------------------------------------------------------------- config validation


def check_config(path):
    return run_cli(["check-config", "-c", str(path)])


def cli_output(cp):
    return cp.stdout.decode("utf-8", "replace") + cp.stderr


def line_of(path, needle, after=0):
    """1-based number of the first line (after line `after`) containing needle."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if i > after and needle in line:
            return i
    raise AssertionError(f"{needle!r} not in {path}:\n{path.read_text()}")


BAD_CONFIGS = [
    # id, delivery overrides, needle on the bad line, key regex, reason regex
    ("source_ips", {"source_ips": ["192.0.2.99"]}, "192.0.2.99",
     r"delivery\.source_ips\[0\]", r"^192\.0\.2\.99 is not a local address$"),
    ("source_ips_second", {"source_ips": [IP10, "192.0.2.98"]}, "192.0.2.98",
     r"delivery\.source_ips\[1\]", r"^192\.0\.2\.98 is not a local address$"),
    ("rule_ip", {"sources": [{"domain": "test.com", "ip": "192.0.2.99",
                              "hostname": "mta.test.com"}]}, "192.0.2.99",
     r"delivery\.sources\[0\]\.ip", r"^192\.0\.2\.99 is not a local address$"),
    ("rule_pool", {"sources": [{"domain": "test.com", "pool": [IP10, "192.0.2.97"]}]},
     "192.0.2.97", r"delivery\.sources\[0\]\.pool\[1\]",
     r"^192\.0\.2\.97 is not a local address$"),
    ("second_rule_ip", {"sources": [SEED_RULE, {"domain": "x.test", "ip": "192.0.2.96"}]},
     "192.0.2.96", r"delivery\.sources\[1\]\.ip", r"^192\.0\.2\.96 is not a local address$"),
    ("hostnames_key", {"hostnames": {IP10: "ten.src.test", "192.0.2.95": "x.src.test"}},
     "192.0.2.95", r"delivery\.hostnames\S*", r"192\.0\.2\.95 is not a local address"),
    ("ipv6_source_ip", {"source_ips": ["2001:db8::99"]}, "2001:db8::99",
     r"delivery\.source_ips\[0\]", r"^2001:db8::99 is not a local address$"),
    ("not_an_ip", {"source_ips": ["mta.test.com"]}, "mta.test.com",
     r"delivery\.source_ips\[0\]", r"."),
    ("rule_hostname", {"sources": [{"domain": "test.com", "ip": IP10,
                                    "hostname": "bad_host!"}]}, "bad_host!",
     r"delivery\.sources\[0\]\.hostname", r"(?i)host|domain|name"),
    ("hostnames_value", {"hostnames": {IP10: "-bad-.src.test"}}, "-bad-.src.test",
     r"delivery\.hostnames\S*", r"(?i)host|domain|name"),
]


@pytest.mark.parametrize("overrides,needle,key_re,reason_re",
                         [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_check_config_rejects_bad_source_config_with_its_line(petrel, overrides, needle,
                                                              key_re, reason_re):
    delivery = {"hostname": DELIVERY_HOSTNAME}
    delivery.update(overrides)
    p = petrel(config={"delivery": delivery}, start=False)
    p.write_config()
    line = line_of(p.cfg_path, needle, after=line_of(p.cfg_path, "delivery:"))
    cp = check_config(p.cfg_path)
    text = cli_output(cp)
    assert cp.returncode == 1, f"exit {cp.returncode}, want 1\n{text}\n{p.cfg_path.read_text()}"
    rx = re.compile(r"^" + re.escape(str(p.cfg_path)) + r":(\d+):(\d+): (" + key_re +
                    r"): (.*)$", re.M)
    found = rx.findall(text)
    assert found, (f"no '{p.cfg_path}:<line>:<col>: {key_re}: ...' line in:\n{text}\n"
                   f"config:\n{p.cfg_path.read_text()}")
    lines = [int(f[0]) for f in found]
    assert line in lines, f"got line(s) {lines}, want {line}\n{text}"
    reason = next(f[3] for f in found if int(f[0]) == line)
    assert re.search(reason_re, reason), f"got reason {reason!r}, want /{reason_re}/\n{text}"


def test_check_config_accepts_local_ipv4_and_ipv6_sources(petrel):
    p = petrel(config={"delivery": {
        "hostname": DELIVERY_HOSTNAME,
        "source_ips": [IP10, IP11, "::1"],
        "hostnames": dict(HOSTNAMES),
        "sources": [SEED_RULE,
                    {"domain": "*.v6.src.test", "ip": "::1", "hostname": "v6.src.test"},
                    {"recipient_domain": "b.dest.test", "pool": [IP11, IP12]},
                    {"client_cidr": ["127.0.6.0/24"], "listener": "default", "ip": IP12},
                    {"listener_ip": "127.0.0.1", "ip": IP10}],
    }}, start=False)
    p.write_config()
    cp = check_config(p.cfg_path)
    assert cp.returncode == 0, f"exit {cp.returncode}, want 0\n{cli_output(cp)}\n" \
                               f"{p.cfg_path.read_text()}"
    assert cp.stdout.decode().strip() == "ok", cli_output(cp)


# ---------------------------------------------------------------- bind failure


GONE_IP = "198.18.5.10"


def ip_cmd(*args):
    return subprocess.run(["ip"] + list(args), capture_output=True, timeout=10)


@pytest.fixture
def vanishing_address():
    """GONE_IP added to lo; the test may remove and re-add it; removed at teardown."""
    if os.geteuid() != 0:
        pytest.skip("needs root to add an address to lo")
    ip_cmd("addr", "del", f"{GONE_IP}/32", "dev", "lo")
    cp = ip_cmd("addr", "add", f"{GONE_IP}/32", "dev", "lo")
    if cp.returncode != 0:
        pytest.skip(f"cannot add {GONE_IP} to lo: {cp.stderr!r}")
    yield GONE_IP
    ip_cmd("addr", "del", f"{GONE_IP}/32", "dev", "lo")


def test_bind_failure_is_a_temporary_failure_not_a_crash(world, vanishing_address):
    p = world.start(source_ips=[GONE_IP], hostnames={GONE_IP: "gone.src.test"},
                    retry={"schedule": ["2s"], "max_attempts": 10, "max_age": "1h"})
    cp = ip_cmd("addr", "del", f"{GONE_IP}/32", "dev", "lo")
    assert cp.returncode == 0, cp.stderr
    qid, _ = submit(p, "alice@gone.src.test")
    d = wait_delivery(p, qid, RCPT, "deferred")
    check_fields(d, dsn=re.compile(r"4\.\d+\.\d+"), attempts="1")
    if "src" in d:
        check_fields(d, src=GONE_IP)
    assert p.running, f"petrel died after a bind failure\n{p.log_tail()}"
    clear = [ln for ln in p.log_lines() if GONE_IP in ln and
             re.search(r"(?i)bind|assign requested address|not available", ln)]
    assert clear, (f"no log line names {GONE_IP} and the bind failure "
                   f"(bind / Cannot assign requested address):\n{p.log_tail(30)}")
    assert not world.mx.all_connections(), world.mx.describe()
    cp = ip_cmd("addr", "add", f"{GONE_IP}/32", "dev", "lo")
    assert cp.returncode == 0, cp.stderr
    expect_source(p, world.mx, qid, ip=GONE_IP, helo="gone.src.test", why="random")
    assert p.running
