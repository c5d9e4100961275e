"""Configured routes: a smarthost `smtp:[ip]:port` (no MX lookup), LMTP over a
unix socket and over TCP (LHLO, one reply per recipient after the final dot,
per-recipient defer/bounce), and the LMTP success DSN (`Action: delivered`).

Addresses: 127.0.43.x (DNS answers from a dnsmasq on a loopback port)."""

import re
import time

import pytest

from mx_fixture import (DELIVERY_HOSTNAME, Report, World, check_fields,
                        check_report_frame, delivery_lines, field_type_value, first_n,
                        start_dns, submit, wait_bounce_created, wait_delivery, wait_queue_empty)
from petrel_fixture import check_received, free_port
from smtpwire import message

SENDER = "alice@sender.rt.test"
REPORTING_MTA = "petrel.test"
ZONE = {
    "mx": [("sender.rt.test", 10, "mx.sender.rt.test")],
    "a": [("mx.sender.rt.test", "127.0.43.2")],
    # smart.rt.test, lmtp.rt.test and lmtptcp.rt.test are not in the DNS at all:
    # their mail can only arrive through the routes.
}
HOSTS = ["127.0.43.2", "127.0.43.9", "127.0.43.10"]
SMART_IP = "127.0.43.9"
LMTP_IP = "127.0.43.10"


class Routes:
    def __init__(self, world, tmp_path):
        self.world = world
        self.sock = tmp_path / "lmtp.sock"
        self.smart_port = free_port(SMART_IP)     # deliberately not delivery.port
        self.lmtp_port = free_port(LMTP_IP)

    def config(self):
        return [
            {"domain": "smart.rt.test", "via": f"smtp:[{SMART_IP}]:{self.smart_port}"},
            {"domain": "lmtp.rt.test", "via": f"lmtp:unix:{self.sock}"},
            {"domain": "lmtptcp.rt.test", "via": f"lmtp:[{LMTP_IP}]:{self.lmtp_port}"},
        ]


@pytest.fixture
def world(request, petrel, mx_servers, tmp_path):
    dns = start_dns(request, ZONE)
    w = World(petrel, mx_servers, dns, HOSTS)
    w.routes = Routes(w, tmp_path)
    return w


def start(world, **kw):
    return world.start(routes=world.routes.config(), **kw)


def expect_content(data, qid, content, rcpt):
    rest = check_received(data, qid=qid, helo="client.test", proto="ESMTP", rcpt=rcpt)
    assert rest == content, f"message after Received differs:\ngot  {rest!r}\nwant {content!r}"


def test_smarthost_route_receives_mail_without_an_mx_lookup(world):
    r = world.routes
    smart = world.mx_factory(SMART_IP, r.smart_port, name="smarthost.rt.test")
    p = start(world)
    content = message("via smarthost", sender=SENDER, to="bob@smart.rt.test")
    qid = submit(p, SENDER, ["bob@smart.rt.test", "carol@smart.rt.test"], content)
    t = smart.wait_for(1, 15)[0]
    assert t.mail_from == SENDER and t.rcpt_tos == ["bob@smart.rt.test", "carol@smart.rt.test"], t
    assert (t.verb, t.helo) == ("EHLO", DELIVERY_HOSTNAME), t
    expect_content(t.data, qid, content, None)
    d = wait_delivery(p, qid, "bob@smart.rt.test", "sent")
    check_fields(d, relay=re.compile(re.escape(SMART_IP) + r"\[" + re.escape(SMART_IP) +
                                     r"\]:" + str(r.smart_port)))
    wait_queue_empty(p)
    asked = [q for q in world.dns.queries() if q[1].rstrip(".").lower() == "smart.rt.test"]
    assert not asked, f"a smarthost route must not look the domain up; dnsmasq saw {asked}"


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_lmtp_route_delivers_with_lhlo(world, kind):
    r = world.routes
    if kind == "unix":
        srv = world.lmtp(unix_path=r.sock, name="lmtp.rt.test")
        domain = "lmtp.rt.test"
    else:
        srv = world.lmtp(LMTP_IP, port=r.lmtp_port, name="lmtptcp.rt.test")
        domain = "lmtptcp.rt.test"
    p = start(world)
    rcpt = f"bob@{domain}"
    content = message(f"lmtp {kind}", sender=SENDER, to=rcpt, body="..dots\r\n.\r\nend\r\n")
    qid = submit(p, SENDER, [rcpt], content)
    t = srv.wait_for(1, 15)[0]
    assert (t.verb, t.helo) == ("LHLO", DELIVERY_HOSTNAME), \
        f"greeting: got {t.verb} {t.helo!r}, want LHLO {DELIVERY_HOSTNAME}"
    assert t.mail_from == SENDER and t.rcpt_tos == [rcpt], t
    expect_content(t.data, qid, content, rcpt)
    d = wait_delivery(p, qid, rcpt, "sent")
    check_fields(d, reply=re.compile(r"250 .*"), dsn=re.compile(r"2\.\d+\.\d+"))
    if kind == "tcp":
        check_fields(d, relay=re.compile(r".*\[" + re.escape(LMTP_IP) + r"\]:" +
                                         str(r.lmtp_port)))
    else:
        assert str(r.sock) in d["line"], f"relay should name the socket: {d['line']}"
    wait_queue_empty(p)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_lmtp_per_recipient_replies_defer_or_bounce_only_that_recipient(world, kind):
    r = world.routes
    sender_mx = world.mx("127.0.43.2", "mx.sender.rt.test")
    if kind == "unix":
        srv = world.lmtp(unix_path=r.sock, name="lmtp.rt.test")
        domain = "lmtp.rt.test"
    else:
        srv = world.lmtp(LMTP_IP, port=r.lmtp_port, name="lmtptcp.rt.test")
        domain = "lmtptcp.rt.test"
    ok, full, gone = (f"{u}@{domain}" for u in ("ok", "full", "gone"))
    srv.set_reply("data_end", first_n(1, "452 4.2.2 Mailbox full"), rcpt="full")
    srv.set_reply("data_end", "550 5.1.1 No such user", rcpt="gone")
    p = start(world)
    content = message(f"lmtp mixed {kind}", sender=SENDER, to=ok)
    qid = submit(p, SENDER, [ok, full, gone], content)
    first = srv.wait_completed(1, 15)[0]
    assert first.rcpt_tos == [ok, full, gone], first
    d = wait_delivery(p, qid, ok, "sent")
    d = wait_delivery(p, qid, full, "deferred")
    check_fields(d, attempts="1", dsn="4.2.2", reply="452 4.2.2 Mailbox full")
    d = wait_delivery(p, qid, gone, "bounced")
    check_fields(d, dsn="5.1.1", reply="550 5.1.1 No such user")
    # the deferred recipient alone is retried (schedule 1s) and delivered once
    second = srv.wait_completed(2, 15)[1]
    assert second.rcpt_tos == [full], f"retry: got {second.rcpt_tos}, want [{full}]"
    assert second.data == first.data, "the retry sends the same bytes"
    d = wait_delivery(p, qid, full, "sent")
    check_fields(d, attempts="2")
    # one bounce, naming only the recipient that failed
    bqid = wait_bounce_created(p, qid)
    s = sender_mx.wait_for(1, 15)[0]
    assert s.mail_from == "" and s.rcpt_tos == [SENDER], s
    rep = Report(s.data)
    check_report_frame(rep, sender=SENDER, reporting_mta=REPORTING_MTA, rcpts=[gone])
    b = rep.recipient(gone)
    assert (b.get("Action"), b.get("Status")) == ("failed", "5.1.1"), b.items()
    assert field_type_value(b.get("Diagnostic-Code"))[1] == "550 5.1.1 No such user", b.items()
    wait_delivery(p, bqid, SENDER, "sent")
    wait_queue_empty(p)
    time.sleep(1.5)
    assert len(srv.all_transactions()) == 2, srv.describe()
    assert sorted(a for t in srv.messages for a in t.delivered_to) == sorted([ok, full])
    assert len(sender_mx.all_transactions()) == 1, sender_mx.describe()


def test_lmtp_notify_success_gives_action_delivered(world):
    r = world.routes
    sender_mx = world.mx("127.0.43.2", "mx.sender.rt.test")
    srv = world.lmtp(unix_path=r.sock, name="lmtp.rt.test")
    p = start(world)
    rcpt = "bob@lmtp.rt.test"
    content = message("lmtp success dsn", sender=SENDER, to=rcpt)
    qid = submit(p, SENDER, [rcpt], content, rcpt_options=["NOTIFY=SUCCESS"])
    srv.wait_for(1, 15)
    wait_delivery(p, qid, rcpt, "sent")
    dqid = wait_bounce_created(p, qid, kind="delivery status")
    s = sender_mx.wait_for(1, 15)[0]
    assert s.mail_from == "" and s.rcpt_tos == [SENDER], s
    rep = Report(s.data)
    check_report_frame(rep, sender=SENDER, reporting_mta=REPORTING_MTA, rcpts=[rcpt])
    b = rep.recipient(rcpt)
    assert b.get("Action") == "delivered", f"Action: got {b.get('Action')!r}, want delivered"
    assert re.fullmatch(r"2\.\d+\.\d+", b.get("Status") or ""), b.items()
    wait_delivery(p, dqid, SENDER, "sent")
    wait_queue_empty(p)


def test_lmtp_socket_missing_defers_not_bounces(world):
    # nothing listens on the socket path yet
    p = start(world, retry={"schedule": ["2s"], "max_attempts": 5, "max_age": "1h"})
    rcpt = "bob@lmtp.rt.test"
    qid = submit(p, SENDER, [rcpt], message("no lmtp", sender=SENDER, to=rcpt))
    d = wait_delivery(p, qid, rcpt, "deferred")
    check_fields(d, attempts="1", dsn=re.compile(r"4\.\d+\.\d+"))
    assert not delivery_lines(p, qid, rcpt, "bounced")
    q = p.queue_list()
    assert qid in q, q.text
    # the server comes up: the next attempt delivers
    srv = world.lmtp(unix_path=world.routes.sock, name="lmtp.rt.test")
    srv.wait_for(1, 15)
    wait_delivery(p, qid, rcpt, "sent")
    wait_queue_empty(p)
