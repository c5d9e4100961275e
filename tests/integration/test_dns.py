"""MX resolution end to end: `petrel dns-lookup DOMAIN -c FILE` through
libunbound against dnsmasq on a loopback port (dns_fixture.py): preference
order, implicit MX, null MX (5.1.10), NXDOMAIN (5.1.2), exchangers via
CNAME, exchangers without addresses, IP literals as exchangers, and
resolvers that never answer (temporary failure within dns.timeout)."""

import re
import time

import pytest

from dns_fixture import closed_resolver, dns_server, silent_resolver  # noqa: F401
from petrel_fixture import run_cli


@pytest.fixture(scope="module", autouse=True)
def dns_lookup_wired():
    """Skips the module until main.c knows `petrel dns-lookup`."""
    cp = run_cli(["help"])
    usage = cp.stdout.decode("utf-8", "replace") + cp.stderr
    if "dns-lookup" not in usage:
        pytest.skip("petrel dns-lookup is not wired into main.c yet")


def lookup(petrel, resolver, domain, timeout="2s", cli_timeout=30):
    """Runs `petrel dns-lookup domain` with dns.resolvers = [resolver];
    returns (exit status, stdout lines, stderr, seconds taken)."""
    p = petrel(start=False, config={"dns": {"resolvers": [resolver], "timeout": timeout}})
    p.write_config()
    t0 = time.monotonic()
    cp = run_cli(["dns-lookup", domain, "-c", str(p.cfg_path)], timeout=cli_timeout)
    took = time.monotonic() - t0
    out = cp.stdout.decode("utf-8", "replace")
    return cp.returncode, out.splitlines(), cp.stderr, took


def hosts(lines):
    """The indented host lines → [(pref, name, [addresses])]."""
    got = []
    for line in lines[1:]:
        m = re.fullmatch(r"  (\d+) (\S+)((?: \S+)*)", line)
        assert m, f"host line {line!r} does not read '  PREF NAME ADDR...'"
        got.append((int(m.group(1)), m.group(2), m.group(3).split()))
    return got


def expect_ok(rc, lines, err, domain, kind="MX"):
    text = "\n".join(lines)
    assert rc == 0, f"exit {rc}, want 0\nstdout:\n{text}\nstderr:\n{err}"
    assert lines and lines[0] == f"{domain}: {kind}", \
        f"first line: got {lines[:1]!r}, want {domain + ': ' + kind!r}\n{text}"


def expect_failure(rc, lines, err, domain, kind, esc, detail_re):
    text = "\n".join(lines)
    assert rc == 1, f"exit {rc}, want 1\nstdout:\n{text}\nstderr:\n{err}"
    want = re.compile(re.escape(f"{domain}: {kind} failure ({esc}): ") + detail_re)
    assert len(lines) == 1 and want.fullmatch(lines[0]), \
        f"got {text!r}, want one line matching {want.pattern!r}\nstderr:\n{err}"


BASE = [
    "example.test MX 20 mx2.example.test",
    "example.test MX 10 mx1.example.test",
    "example.test MX 30 mx3.example.test",
    "mx1.example.test A 127.0.0.5",
    "mx1.example.test AAAA ::1",
    "mx2.example.test A 127.0.0.6",
    "mx2.example.test A 127.0.0.16",
    "mx3.example.test AAAA 2001:db8::3",
    "implicit.test A 127.0.0.7",
    "nullmx.test MX 0 .",
    "cname.test MX 10 alias.cname.test",
    "alias.cname.test CNAME real.cname.test",
    "real.cname.test A 127.0.0.8",
    "half.test MX 10 gone.half.test",
    "half.test MX 20 ok.half.test",
    "ok.half.test A 127.0.0.9",
    "noaddr.test MX 10 gone.noaddr.test",
    "noaddr.test MX 20 gone2.noaddr.test",
    "txtonly.test TXT no mail here",
    "literal.test MX 10 192.0.2.1",
    "literal.test MX 20 ok.literal.test",
    "ok.literal.test A 127.0.0.10",
    "equal.test MX 10 a.equal.test",
    "equal.test MX 10 b.equal.test",
    "a.equal.test A 127.0.0.11",
    "b.equal.test A 127.0.0.12",
]


@pytest.fixture
def dns(dns_server):  # noqa: F811 (the imported fixture)
    return dns_server(records=BASE)


def test_mx_hosts_sorted_by_preference_with_a_before_aaaa(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "example.test")
    expect_ok(rc, lines, err, "example.test")
    got = hosts(lines)
    assert [(p, n) for p, n, _ in got] == \
        [(10, "mx1.example.test"), (20, "mx2.example.test"), (30, "mx3.example.test")], \
        f"got {got}"
    assert got[0][2] == ["127.0.0.5", "::1"], f"mx1 addresses: got {got[0][2]}"
    assert sorted(got[1][2]) == ["127.0.0.16", "127.0.0.6"], f"mx2 addresses: got {got[1][2]}"
    assert got[2][2] == ["2001:db8::3"], f"mx3 addresses: got {got[2][2]}"
    asked = dns.queries()
    for want in [("MX", "example.test"), ("A", "mx1.example.test"),
                 ("AAAA", "mx1.example.test")]:
        assert want in asked, f"dnsmasq saw {asked}, want {want} among them"


def test_equal_preferences_are_both_listed(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "equal.test")
    expect_ok(rc, lines, err, "equal.test")
    got = hosts(lines)
    # the shuffle of equal preferences is unit-tested (test_dns.c); here both are present
    assert sorted((p, n) for p, n, _ in got) == [(10, "a.equal.test"), (10, "b.equal.test")], \
        f"got {got}"


def test_no_mx_record_is_an_implicit_mx(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "implicit.test")
    expect_ok(rc, lines, err, "implicit.test", kind="implicit MX (no MX record)")
    assert hosts(lines) == [(0, "implicit.test", ["127.0.0.7"])], f"got {lines}"


def test_null_mx_is_a_permanent_failure_5_1_10(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "nullmx.test")
    expect_failure(rc, lines, err, "nullmx.test", "permanent", "5.1.10", re.escape("null MX"))


def test_nxdomain_is_a_permanent_failure_5_1_2(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "nowhere.test")
    expect_failure(rc, lines, err, "nowhere.test", "permanent", "5.1.2", "NXDOMAIN")


def test_exchanger_behind_a_cname_is_followed(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "cname.test")
    expect_ok(rc, lines, err, "cname.test")
    assert hosts(lines) == [(10, "alias.cname.test", ["127.0.0.8"])], f"got {lines}"


def test_exchanger_without_address_is_skipped(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "half.test")
    expect_ok(rc, lines, err, "half.test")
    assert hosts(lines) == [(20, "ok.half.test", ["127.0.0.9"])], f"got {lines}"


def test_mx_hosts_without_any_address_is_temporary(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "noaddr.test")
    expect_failure(rc, lines, err, "noaddr.test", "temporary", "4.4.3",
                   r".*\(gone\.noaddr\.test, gone2\.noaddr\.test\)")


def test_implicit_mx_without_address_is_permanent(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "txtonly.test")
    expect_failure(rc, lines, err, "txtonly.test", "permanent", "5.1.2", ".+")


def test_ip_address_as_exchanger_is_ignored(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "literal.test")
    expect_ok(rc, lines, err, "literal.test")
    assert hosts(lines) == [(20, "ok.literal.test", ["127.0.0.10"])], f"got {lines}"


def test_trailing_dot_and_case_are_accepted(petrel, dns):
    rc, lines, err, _ = lookup(petrel, dns.resolver, "Implicit.TEST.")
    expect_ok(rc, lines, err, "Implicit.TEST.", kind="implicit MX (no MX record)")
    assert [h[2] for h in hosts(lines)] == [["127.0.0.7"]], f"got {lines}"


def test_resolver_that_never_answers_is_temporary_within_the_timeout(petrel,
                                                                   silent_resolver):  # noqa: F811
    rc, lines, err, took = lookup(petrel, silent_resolver, "example.test", timeout="1s")
    expect_failure(rc, lines, err, "example.test", "temporary", "4.4.3", "timeout")
    assert took < 5.0, f"took {took:.1f}s with dns.timeout 1s"


def test_closed_resolver_port_is_temporary(petrel):
    rc, lines, err, took = lookup(petrel, closed_resolver(), "example.test", timeout="1s")
    expect_failure(rc, lines, err, "example.test", "temporary", "4.4.3", ".+")
    assert took < 5.0, f"took {took:.1f}s with dns.timeout 1s"
