"""Delivery to remote MXes as they see it: envelope, EHLO, exact DATA bytes, one
transaction per domain, MX fallback, implicit MX, a connection dropped inside DATA,
DSN parameters passed on, and the delivery log line.

Addresses: 127.0.41.x (DNS answers from a dnsmasq on a loopback port)."""

import re
import time

import pytest

from mx_fixture import (DELIVERY_HOSTNAME, World, check_fields, delivery_lines,
                        start_dns, submit, wait_delivery, wait_queue_empty)
from petrel_fixture import check_received, port_is_closed
from smtpwire import message

SENDER = "alice@sender.dlv.test"
ZONE = {
    "mx": [
        ("sender.dlv.test", 10, "mx.sender.dlv.test"),
        ("one.dlv.test", 10, "mx1.one.dlv.test"),
        ("two.dlv.test", 10, "mx.two.dlv.test"),
        ("backup.dlv.test", 10, "mxa.backup.dlv.test"),
        ("backup.dlv.test", 20, "mxb.backup.dlv.test"),
        ("refuse.dlv.test", 10, "mxa.refuse.dlv.test"),
        ("refuse.dlv.test", 20, "mxb.refuse.dlv.test"),
        ("dsn.dlv.test", 10, "mx.dsn.dlv.test"),
    ],
    "a": [
        ("mx.sender.dlv.test", "127.0.41.2"),
        ("mx1.one.dlv.test", "127.0.41.3"),
        ("mx.two.dlv.test", "127.0.41.4"),
        ("mxa.backup.dlv.test", "127.0.41.5"),
        ("mxb.backup.dlv.test", "127.0.41.6"),
        ("implicit.dlv.test", "127.0.41.7"),
        ("mx.dsn.dlv.test", "127.0.41.8"),
        ("mxa.refuse.dlv.test", "127.0.41.11"),
        ("mxb.refuse.dlv.test", "127.0.41.12"),
    ],
}
HOSTS = sorted({ip for _, ip in ZONE["a"]})
DIGITS = re.compile(r"[0-9]+(\.[0-9]+)?")


@pytest.fixture
def world(request, petrel, mx_servers):
    dns = start_dns(request, ZONE)
    return World(petrel, mx_servers, dns, HOSTS)


def xtext_decode(s):
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), s)


def expect_content(data, qid, content, rcpt):
    """The MX got petrel's Received header + the client's message, byte-exact."""
    rest = check_received(data, qid=qid, helo="client.test", proto="ESMTP", rcpt=rcpt)
    assert rest == content, f"message after Received differs:\ngot  {rest!r}\nwant {content!r}"


def test_delivered_byte_exact_with_ehlo_envelope_and_log_line(world):
    mx = world.mx("127.0.41.3", "mx1.one.dlv.test")
    p = world.start()
    content = message("delivered exactly", sender=SENDER, to="bob@one.dlv.test",
                      body=".leading dot\r\n..two dots\r\n.\r\ntab\there \r\n" + "x" * 990 +
                      "\r\n\r\nlast line\r\n")
    qid = submit(p, SENDER, ["bob@one.dlv.test"], content)
    t = mx.wait_for(1, 15)[0]
    assert t.mail_from == SENDER, f"MAIL FROM: got {t.mail_from!r}, want {SENDER!r}"
    assert t.rcpt_tos == ["bob@one.dlv.test"], f"RCPT TO: got {t.rcpt_tos}"
    assert (t.verb, t.helo) == ("EHLO", DELIVERY_HOSTNAME), \
        f"greeting: got {t.verb} {t.helo!r}, want EHLO {DELIVERY_HOSTNAME}"
    expect_content(t.data, qid, content, "bob@one.dlv.test")
    d = wait_delivery(p, qid, "bob@one.dlv.test", "sent")
    check_fields(d, relay=f"mx1.one.dlv.test[127.0.41.3]:{world.port}", src=t.peer[0],
                 helo=DELIVERY_HOSTNAME, attempts="1", delay=DIGITS,
                 dsn=re.compile(r"2\.\d+\.\d+"), reply=re.compile(r"250 .*"))
    wait_queue_empty(p)
    assert len(mx.all_transactions()) == 1, f"more than one transaction:\n{mx.describe()}"
    lines = [x["line"] for x in delivery_lines(p, qid)]
    assert len(lines) == 1, "want one log line per recipient attempt, got:\n" + "\n".join(lines)


def test_recipients_of_one_domain_go_in_one_transaction(world):
    mx = world.mx("127.0.41.3", "mx1.one.dlv.test")
    p = world.start()
    rcpts = ["bob@one.dlv.test", "carol@one.dlv.test", "Dave@ONE.dlv.test"]
    content = message("three", sender=SENDER, to="bob@one.dlv.test")
    qid = submit(p, SENDER, rcpts, content)
    t = mx.wait_for(1, 15)[0]
    assert t.rcpt_tos == rcpts, f"RCPT TO: got {t.rcpt_tos}, want {rcpts} (one transaction)"
    expect_content(t.data, qid, content, None)
    for r in rcpts:
        wait_delivery(p, qid, r, "sent")
    wait_queue_empty(p)
    assert len(mx.all_transactions()) == 1, mx.describe()


def test_more_than_100_recipients_are_split_into_transactions_of_at_most_100(world):
    mx = world.mx("127.0.41.3", "mx1.one.dlv.test")
    p = world.start()          # listeners' max_recipients defaults to 1000
    rcpts = [f"r{i:03d}@one.dlv.test" for i in range(105)]
    content = message("many", sender=SENDER, to="list@one.dlv.test")
    qid = submit(p, SENDER, rcpts, content)
    wait_queue_empty(p, 20)
    txns = mx.messages
    sizes = sorted(len(t.rcpt_tos) for t in txns)
    assert all(n <= 100 for n in sizes) and sum(sizes) == 105, \
        f"transaction sizes: got {sizes}, want ≤ 100 each, 105 in all"
    got = sorted(a for t in txns for a in t.rcpt_tos)
    assert got == rcpts, "every recipient exactly once"
    for t in txns:
        expect_content(t.data, qid, content, None)


def test_two_domains_each_mx_gets_its_recipients(world):
    one = world.mx("127.0.41.3", "mx1.one.dlv.test")
    two = world.mx("127.0.41.4", "mx.two.dlv.test")
    p = world.start()
    content = message("two domains", sender=SENDER, to="bob@one.dlv.test")
    qid = submit(p, SENDER, ["bob@one.dlv.test", "eve@two.dlv.test", "carol@one.dlv.test"],
                 content)
    t1 = one.wait_for(1, 15)[0]
    t2 = two.wait_for(1, 15)[0]
    assert t1.rcpt_tos == ["bob@one.dlv.test", "carol@one.dlv.test"], t1
    assert t2.rcpt_tos == ["eve@two.dlv.test"], t2
    assert t1.data == t2.data, "both MXes must get the same bytes"
    expect_content(t1.data, qid, content, None)
    d = wait_delivery(p, qid, "eve@two.dlv.test", "sent")
    check_fields(d, relay=f"mx.two.dlv.test[127.0.41.4]:{world.port}")
    wait_queue_empty(p)


def test_first_mx_down_second_mx_used(world):
    assert port_is_closed("127.0.41.5", world.port), "the preferred MX must be down"
    mxb = world.mx("127.0.41.6", "mxb.backup.dlv.test")
    p = world.start()
    content = message("fallback", sender=SENDER, to="bob@backup.dlv.test")
    qid = submit(p, SENDER, ["bob@backup.dlv.test"], content)
    t = mxb.wait_for(1, 15)[0]
    expect_content(t.data, qid, content, "bob@backup.dlv.test")
    d = wait_delivery(p, qid, "bob@backup.dlv.test", "sent")
    check_fields(d, relay=f"mxb.backup.dlv.test[127.0.41.6]:{world.port}", attempts="1")
    wait_queue_empty(p)


def test_mx_with_4xx_banner_is_skipped_for_the_next_one(world):
    mxa = world.mx("127.0.41.11", "mxa.refuse.dlv.test")
    mxa.set_reply("banner", "421 4.3.2 Service not available")
    mxb = world.mx("127.0.41.12", "mxb.refuse.dlv.test")
    p = world.start()
    content = message("banner refused", sender=SENDER, to="bob@refuse.dlv.test")
    qid = submit(p, SENDER, ["bob@refuse.dlv.test"], content)
    mxb.wait_for(1, 15)
    d = wait_delivery(p, qid, "bob@refuse.dlv.test", "sent")
    check_fields(d, relay=f"mxb.refuse.dlv.test[127.0.41.12]:{world.port}")
    assert mxa.all_connections(), "the preferred MX was never tried"
    assert not mxa.all_transactions(), mxa.describe()


def test_ehlo_refused_falls_back_to_helo(world):
    mx = world.mx("127.0.41.3", "mx1.one.dlv.test")
    mx.set_reply("ehlo", "502 5.5.2 Error: command not recognized")
    p = world.start()
    content = message("helo fallback", sender=SENDER, to="bob@one.dlv.test")
    qid = submit(p, SENDER, ["bob@one.dlv.test"], content)
    t = mx.wait_for(1, 15)[0]
    assert (t.verb, t.helo) == ("HELO", DELIVERY_HOSTNAME), f"got {t.verb} {t.helo!r}"
    assert t.mail_params == [], f"no ESMTP parameters after HELO, got {t.mail_params}"
    expect_content(t.data, qid, content, "bob@one.dlv.test")
    wait_queue_empty(p)


def test_implicit_mx_uses_the_domains_address(world):
    mx = world.mx("127.0.41.7", "implicit.dlv.test")
    p = world.start()
    content = message("implicit", sender=SENDER, to="bob@implicit.dlv.test")
    qid = submit(p, SENDER, ["bob@implicit.dlv.test"], content)
    t = mx.wait_for(1, 15)[0]
    expect_content(t.data, qid, content, "bob@implicit.dlv.test")
    d = wait_delivery(p, qid, "bob@implicit.dlv.test", "sent")
    check_fields(d, relay=f"implicit.dlv.test[127.0.41.7]:{world.port}")
    wait_queue_empty(p)


def test_connection_dropped_inside_data_defers_then_exactly_one_copy_arrives(world):
    mx = world.mx("127.0.41.3", "mx1.one.dlv.test")
    mx.drop_in_data(times=1)
    p = world.start()
    content = message("dropped", sender=SENDER, to="bob@one.dlv.test")
    qid = submit(p, SENDER, ["bob@one.dlv.test"], content)
    d = wait_delivery(p, qid, "bob@one.dlv.test", "deferred")
    check_fields(d, attempts="1", dsn=re.compile(r"4\.\d+\.\d+"))
    assert mx.all_transactions()[0].dropped, mx.describe()
    t = mx.wait_for(1, 15)[0]        # next attempt after 1s
    expect_content(t.data, qid, content, "bob@one.dlv.test")
    d = wait_delivery(p, qid, "bob@one.dlv.test", "sent")
    check_fields(d, attempts="2")
    wait_queue_empty(p)
    time.sleep(2.5)                   # a duplicate would show up within the schedule
    assert len(mx.messages) == 1, f"want exactly one copy:\n{mx.describe()}"
    assert not delivery_lines(p, qid, status="bounced"), p.log_tail(40)


def test_dsn_parameters_are_passed_to_an_mx_that_offers_dsn(world):
    mx = world.mx("127.0.41.8", "mx.dsn.dlv.test", dsn=True)
    sender_mx = world.mx("127.0.41.2", "mx.sender.dlv.test")
    p = world.start()
    content = message("dsn passthrough", sender=SENDER, to="bob@dsn.dlv.test")
    qid = submit(p, SENDER, ["bob@dsn.dlv.test"], content,
                 mail_options=["RET=HDRS", "ENVID=env+2Dtest42"],
                 rcpt_options={"bob@dsn.dlv.test": ["NOTIFY=SUCCESS,FAILURE",
                                                     "ORCPT=rfc822;Bob.Orig@dsn.dlv.test"]})
    t = mx.wait_for(1, 15)[0]
    mail = {x.split("=", 1)[0].upper(): x.split("=", 1)[1] for x in t.mail_params if "=" in x}
    assert mail.get("RET", "").upper() == "HDRS", f"MAIL params: got {t.mail_params}"
    # xtext (RFC 3461 4): "+2D" and "-" are the same character
    assert xtext_decode(mail.get("ENVID", "")) == "env-test42", \
        f"MAIL params: got {t.mail_params}, want ENVID=env-test42 (xtext)"
    rp = {x.split("=", 1)[0].upper(): x.split("=", 1)[1] for x in t.rcpt_params("bob@dsn.dlv.test")}
    assert sorted(rp.get("NOTIFY", "").upper().split(",")) == ["FAILURE", "SUCCESS"], \
        f"RCPT params: got {t.rcpt_params('bob@dsn.dlv.test')}"
    assert xtext_decode(rp.get("ORCPT", "")) == "rfc822;Bob.Orig@dsn.dlv.test", \
        f"RCPT params: got {t.rcpt_params('bob@dsn.dlv.test')}"
    expect_content(t.data, qid, content, "bob@dsn.dlv.test")
    wait_delivery(p, qid, "bob@dsn.dlv.test", "sent")
    wait_queue_empty(p)
    # the MX reports success itself: petrel sends no DSN of its own
    time.sleep(2)
    assert not sender_mx.all_transactions(), f"unexpected DSN:\n{sender_mx.describe()}"
    assert "delivery status notification" not in p.log(), p.log_tail(20)
