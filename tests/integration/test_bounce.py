"""Bounces and DSNs as the sender's MX receives them: a 5xx reply, a null MX,
an unknown domain, partial delivery, NOTIFY=NEVER / SUCCESS, RET=FULL with ORCPT
and ENVID, and the double bounce that must be dropped rather than looped.

Each report is parsed with the email package and checked field by field
(RFC 3464 inside RFC 6522 multipart/report).

Addresses: 127.0.42.x (DNS answers from a dnsmasq on a loopback port)."""

import re
import time

import pytest

from mx_fixture import (Report, World, check_fields, check_report_frame,
                        delivery_lines, field_type_value, start_dns, submit,
                        wait_bounce_created, wait_delivery, wait_queue_empty)
from smtpwire import message

SENDER = "alice@sender.bnc.test"
REPORTING_MTA = "petrel.test"       # the top-level `hostname` of the petrel fixture
ZONE = {
    "mx": [
        ("sender.bnc.test", 10, "mx.sender.bnc.test"),
        ("fail.bnc.test", 10, "mx.fail.bnc.test"),
        ("good.bnc.test", 10, "mx.good.bnc.test"),
    ],
    "a": [
        ("mx.sender.bnc.test", "127.0.42.2"),
        ("mx.fail.bnc.test", "127.0.42.3"),
        ("mx.good.bnc.test", "127.0.42.4"),
    ],
    "null_mx": ["nullmx.bnc.test"],
    # nx.bnc.test and nxsender.bnc.test do not exist (NXDOMAIN)
}
HOSTS = sorted({ip for _, ip in ZONE["a"]})
NO_SUCH_USER = "550 5.1.1 No such user"


@pytest.fixture
def world(request, petrel, mx_servers):
    dns = start_dns(request, ZONE)
    return World(petrel, mx_servers, dns, HOSTS)


def start_three(world, **kw):
    sender_mx = world.mx("127.0.42.2", "mx.sender.bnc.test")
    fail_mx = world.mx("127.0.42.3", "mx.fail.bnc.test")
    fail_mx.set_reply("rcpt", NO_SUCH_USER, rcpt="bob")
    good_mx = world.mx("127.0.42.4", "mx.good.bnc.test")
    return sender_mx, fail_mx, good_mx, world.start(**kw)


def the_bounce(sender_mx, p, qid, sender=SENDER, timeout=20):
    """Waits for the one notification about qid at the sender's MX; returns (Report, BQID)."""
    bqid = wait_bounce_created(p, qid, timeout=timeout)
    t = sender_mx.wait_for(1, timeout, what="bounces")[0]
    assert t.mail_from == "", f"bounce MAIL FROM: got <{t.mail_from}>, want <>"
    assert t.rcpt_tos == [sender], f"bounce RCPT TO: got {t.rcpt_tos}, want [{sender}]"
    wait_delivery(p, bqid, sender, "sent")
    return Report(t.data), bqid


def check_rcpt_block(b, **want):
    for k, v in want.items():
        got = b.get(k)
        if k in ("Remote-MTA", "Diagnostic-Code", "Original-Recipient"):
            got = field_type_value(got) if got is not None else None
        if isinstance(v, re.Pattern):
            ok = got is not None and v.fullmatch(got)
        else:
            ok = got == v
        assert ok, f"{k}: got {got!r}, want {v.pattern if isinstance(v, re.Pattern) else v!r}"


def test_550_is_bounced_to_the_sender_with_a_full_report(world):
    sender_mx, fail_mx, _, p = start_three(world)
    content = message("bounce me", sender=SENDER, to="bob@fail.bnc.test",
                      body="BODY-MARKER must not be in a RET=HDRS bounce\r\n")
    qid = submit(p, SENDER, ["bob@fail.bnc.test"], content)
    d = wait_delivery(p, qid, "bob@fail.bnc.test", "bounced")
    check_fields(d, relay=f"mx.fail.bnc.test[127.0.42.3]:{world.port}", attempts="1",
                 dsn="5.1.1", reply=NO_SUCH_USER)
    rep, bqid = the_bounce(sender_mx, p, qid)
    check_report_frame(rep, sender=SENDER, reporting_mta=REPORTING_MTA,
                       rcpts=["bob@fail.bnc.test"])
    b = rep.recipient("bob@fail.bnc.test")
    check_rcpt_block(b, **{"Action": "failed", "Status": "5.1.1",
                           "Remote-MTA": ("dns", "mx.fail.bnc.test"),
                           "Diagnostic-Code": ("smtp", NO_SUCH_USER)})
    assert b.get("Original-Recipient") is None, "no ORCPT was given"
    hdrs = rep.original.get_payload()
    assert isinstance(hdrs, str), f"text/rfc822-headers payload: got {type(hdrs)}"
    assert "Subject: bounce me" in hdrs and "Message-ID: <bounce.me@client.test>" in hdrs, hdrs
    assert "BODY-MARKER" not in rep.raw.decode("utf-8", "replace"), "RET=HDRS: no body"
    human = rep.human.get_payload(decode=True).decode("utf-8", "replace")
    assert "bob@fail.bnc.test" in human, f"the text part should name the recipient:\n{human}"
    wait_queue_empty(p)
    assert len(fail_mx.all_transactions()) == 1, fail_mx.describe()
    assert not fail_mx.messages, "nothing was accepted by the failing MX"


def test_ret_full_orcpt_and_envid_appear_in_the_report(world):
    sender_mx, _, _, p = start_three(world)
    content = message("full return", sender=SENDER, to="bob@fail.bnc.test",
                      body="BODY-MARKER comes back with RET=FULL\r\n")
    qid = submit(p, SENDER, ["bob@fail.bnc.test"], content,
                 mail_options=["RET=FULL", "ENVID=envid-77"],
                 rcpt_options={"bob@fail.bnc.test": ["ORCPT=rfc822;Bob.Original@fail.bnc.test"]})
    rep, _ = the_bounce(sender_mx, p, qid)
    check_report_frame(rep, sender=SENDER, reporting_mta=REPORTING_MTA,
                       rcpts=["bob@fail.bnc.test"], ret_full=True)
    assert rep.per_message.get("Original-Envelope-Id") == "envid-77", \
        f"Original-Envelope-Id: got {rep.per_message.get('Original-Envelope-Id')!r}"
    b = rep.recipient("bob@fail.bnc.test")
    check_rcpt_block(b, **{"Action": "failed", "Status": "5.1.1",
                           "Original-Recipient": ("rfc822", "Bob.Original@fail.bnc.test")})
    inner = rep.original.get_payload()
    assert isinstance(inner, list) and inner[0].get("Subject") == "full return", inner
    assert content in rep.raw, "RET=FULL: the original message, byte for byte, in the report"
    wait_queue_empty(p)


def test_partial_delivery_bounces_only_the_failing_recipient(world):
    sender_mx, fail_mx, good_mx, p = start_three(world)
    content = message("partial", sender=SENDER, to="carol@good.bnc.test")
    rcpts = ["carol@good.bnc.test", "bob@fail.bnc.test", "dave@fail.bnc.test"]
    qid = submit(p, SENDER, rcpts, content)
    good = good_mx.wait_for(1, 15)[0]
    assert good.rcpt_tos == ["carol@good.bnc.test"], good
    ok = fail_mx.wait_for(1, 15)[0]
    assert ok.rcpt_tos == ["dave@fail.bnc.test"], ok
    assert good.data == ok.data
    rep, _ = the_bounce(sender_mx, p, qid)
    check_report_frame(rep, sender=SENDER, reporting_mta=REPORTING_MTA,
                       rcpts=["bob@fail.bnc.test"])
    check_rcpt_block(rep.recipient("bob@fail.bnc.test"), Action="failed", Status="5.1.1")
    wait_queue_empty(p)
    time.sleep(2)
    assert len(sender_mx.all_transactions()) == 1, f"want exactly one bounce:\n" \
                                                   f"{sender_mx.describe()}"
    for r in ("carol@good.bnc.test", "dave@fail.bnc.test"):
        assert len(delivery_lines(p, qid, r, "sent")) == 1, p.log_tail(30)


def test_5xx_after_data_bounces_every_recipient_of_that_transaction_in_one_report(world):
    sender_mx, _, good_mx, p = start_three(world)
    good_mx.set_reply("data_end", "554 5.6.0 Message content rejected")
    content = message("content rejected", sender=SENDER, to="carol@good.bnc.test")
    qid = submit(p, SENDER, ["carol@good.bnc.test", "erin@good.bnc.test"], content)
    for r in ("carol@good.bnc.test", "erin@good.bnc.test"):
        d = wait_delivery(p, qid, r, "bounced")
        check_fields(d, dsn="5.6.0", reply="554 5.6.0 Message content rejected")
    rep, _ = the_bounce(sender_mx, p, qid)
    check_report_frame(rep, sender=SENDER, reporting_mta=REPORTING_MTA,
                       rcpts=["carol@good.bnc.test", "erin@good.bnc.test"])
    for r in ("carol@good.bnc.test", "erin@good.bnc.test"):
        check_rcpt_block(rep.recipient(r), **{
            "Action": "failed", "Status": "5.6.0",
            "Diagnostic-Code": ("smtp", "554 5.6.0 Message content rejected")})
    wait_queue_empty(p)


def test_mail_from_refused_bounces_with_its_status(world):
    sender_mx, _, good_mx, p = start_three(world)
    good_mx.set_reply("mail", "553 5.7.1 Sender address rejected")
    content = message("sender refused", sender=SENDER, to="carol@good.bnc.test")
    qid = submit(p, SENDER, ["carol@good.bnc.test"], content)
    d = wait_delivery(p, qid, "carol@good.bnc.test", "bounced")
    check_fields(d, dsn="5.7.1", reply="553 5.7.1 Sender address rejected")
    rep, _ = the_bounce(sender_mx, p, qid)
    check_rcpt_block(rep.recipient("carol@good.bnc.test"), **{
        "Action": "failed", "Status": "5.7.1",
        "Diagnostic-Code": ("smtp", "553 5.7.1 Sender address rejected")})
    wait_queue_empty(p)


def test_null_mx_bounces_5_1_10_without_a_connection(world):
    sender_mx, fail_mx, good_mx, p = start_three(world)
    content = message("null mx", sender=SENDER, to="bob@nullmx.bnc.test")
    qid = submit(p, SENDER, ["bob@nullmx.bnc.test"], content)
    d = wait_delivery(p, qid, "bob@nullmx.bnc.test", "bounced")
    check_fields(d, dsn="5.1.10")
    rep, _ = the_bounce(sender_mx, p, qid)
    check_report_frame(rep, sender=SENDER, reporting_mta=REPORTING_MTA,
                       rcpts=["bob@nullmx.bnc.test"])
    check_rcpt_block(rep.recipient("bob@nullmx.bnc.test"), Action="failed", Status="5.1.10")
    wait_queue_empty(p)
    assert not fail_mx.all_connections() and not good_mx.all_connections(), \
        "a null MX domain must not cause any connection"
    assert len(sender_mx.all_connections()) >= 1


def test_nxdomain_recipient_domain_bounces_5_1_2(world):
    sender_mx, _, _, p = start_three(world)
    content = message("no such domain", sender=SENDER, to="bob@nx.bnc.test")
    qid = submit(p, SENDER, ["bob@nx.bnc.test"], content)
    d = wait_delivery(p, qid, "bob@nx.bnc.test", "bounced")
    check_fields(d, dsn="5.1.2")
    rep, _ = the_bounce(sender_mx, p, qid)
    check_report_frame(rep, sender=SENDER, reporting_mta=REPORTING_MTA,
                       rcpts=["bob@nx.bnc.test"])
    check_rcpt_block(rep.recipient("bob@nx.bnc.test"), Action="failed", Status="5.1.2")
    wait_queue_empty(p)


def test_bounce_to_an_undeliverable_sender_is_dropped_not_looped(world):
    sender_mx, fail_mx, good_mx, p = start_three(world)
    sender = "alice@nxsender.bnc.test"
    content = message("double bounce", sender=sender, to="bob@fail.bnc.test")
    qid = submit(p, sender, ["bob@fail.bnc.test"], content)
    wait_delivery(p, qid, "bob@fail.bnc.test", "bounced")
    bqid = wait_bounce_created(p, qid)
    d = wait_delivery(p, bqid, sender, "bounced")
    check_fields(d, dsn="5.1.2")
    p.wait_log(re.escape(bqid) + r": double bounce: dropped", timeout=10)
    wait_queue_empty(p)
    time.sleep(2)
    notes = [ln for ln in p.log_lines() if "notification:" in ln]
    assert len(notes) == 1, "want exactly one notification, got:\n" + "\n".join(notes)
    assert not sender_mx.all_transactions(), sender_mx.describe()
    assert len(fail_mx.all_transactions()) == 1, fail_mx.describe()


def test_failed_null_sender_message_is_a_dropped_double_bounce(world):
    sender_mx, fail_mx, _, p = start_three(world)
    content = message("null sender", sender="MAILER-DAEMON@elsewhere.test",
                      to="bob@fail.bnc.test")
    qid = submit(p, "", ["bob@fail.bnc.test"], content)
    t = fail_mx.wait_transactions(1, 15)[0]
    assert t.mail_from == "", f"MAIL FROM: got <{t.mail_from}>, want <>"
    d = wait_delivery(p, qid, "bob@fail.bnc.test", "bounced")
    check_fields(d, dsn="5.1.1", reply=NO_SUCH_USER)
    m = p.wait_log(re.escape(qid) + r": double bounce: dropped", timeout=10)
    lines = p.log_lines()
    i_bounced = next(i for i, ln in enumerate(lines) if ln == d["line"])
    i_dropped = next(i for i, ln in enumerate(lines) if m.group(0) in ln)
    assert i_bounced < i_dropped, "the bounced line comes first"
    wait_queue_empty(p)
    time.sleep(1.5)
    assert "notification:" not in p.log(), p.log_tail(20)
    assert not sender_mx.all_connections(), sender_mx.describe()


def test_notify_never_suppresses_the_bounce(world):
    sender_mx, _, _, p = start_three(world)
    content = message("never tell", sender=SENDER, to="bob@fail.bnc.test")
    qid = submit(p, SENDER, ["bob@fail.bnc.test"], content,
                 rcpt_options={"bob@fail.bnc.test": ["NOTIFY=NEVER"]})
    wait_delivery(p, qid, "bob@fail.bnc.test", "bounced")
    wait_queue_empty(p)
    time.sleep(2)
    assert "notification:" not in p.log(), p.log_tail(20)
    assert not sender_mx.all_connections(), sender_mx.describe()


def test_bounces_disabled_sends_none(world):
    sender_mx, _, _, p = start_three(world, bounce={"enabled": False})
    content = message("no bounces", sender=SENDER, to="bob@fail.bnc.test")
    qid = submit(p, SENDER, ["bob@fail.bnc.test"], content)
    wait_delivery(p, qid, "bob@fail.bnc.test", "bounced")
    wait_queue_empty(p)
    time.sleep(2)
    assert "notification:" not in p.log(), p.log_tail(20)
    assert not sender_mx.all_connections(), sender_mx.describe()


def test_notify_success_to_an_mx_without_dsn_gives_a_relayed_dsn(world):
    sender_mx, _, good_mx, p = start_three(world)
    content = message("tell me", sender=SENDER, to="carol@good.bnc.test")
    qid = submit(p, SENDER, ["carol@good.bnc.test", "dave@good.bnc.test"], content,
                 mail_options=["ENVID=succ-1"],
                 rcpt_options={"carol@good.bnc.test": ["NOTIFY=SUCCESS",
                                                       "ORCPT=rfc822;Carol@good.bnc.test"]})
    t = good_mx.wait_for(1, 15)[0]
    assert t.rcpt_tos == ["carol@good.bnc.test", "dave@good.bnc.test"], t
    assert not any(x.upper().startswith(("NOTIFY=", "ORCPT="))
                   for r in t.rcpts for x in r.params), \
        f"DSN parameters sent to an MX that does not offer DSN: {t.rcpts}"
    assert not any(x.upper().startswith(("RET=", "ENVID=")) for x in t.mail_params), \
        f"DSN parameters sent to an MX that does not offer DSN: {t.mail_params}"
    dqid = wait_bounce_created(p, qid, kind="delivery status")
    s = sender_mx.wait_for(1, 15)[0]
    assert s.mail_from == "" and s.rcpt_tos == [SENDER], s
    wait_delivery(p, dqid, SENDER, "sent")
    rep = Report(s.data)
    check_report_frame(rep, sender=SENDER, reporting_mta=REPORTING_MTA,
                       rcpts=["carol@good.bnc.test"])
    assert rep.per_message.get("Original-Envelope-Id") == "succ-1", rep.per_message.items()
    check_rcpt_block(rep.recipient("carol@good.bnc.test"), **{
        "Action": "relayed", "Status": re.compile(r"2\.\d+\.\d+"),
        "Remote-MTA": ("dns", "mx.good.bnc.test"),
        "Original-Recipient": ("rfc822", "Carol@good.bnc.test")})
    wait_queue_empty(p)
    time.sleep(1.5)
    assert len(sender_mx.all_transactions()) == 1, "one DSN, for carol only"
