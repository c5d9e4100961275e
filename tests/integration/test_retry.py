"""Temporary failures: deferral on a 4xx (at RCPT and after the dot), the retry
schedule (intervals, the last one repeating), the bounce after max_attempts with
the last 4xx reply, `petrel queue list` during a deferral, unreachable MXes, and
a restart with deferred mail that keeps the next-attempt time.

retry.max_age cannot be tested quickly: its minimum is 1m.

Addresses: 127.0.44.x (DNS answers from a dnsmasq on a loopback port)."""

import re
import time
from datetime import datetime

import pytest

from mx_fixture import (Report, World, check_fields, check_report_frame,
                        delivery_lines, field_type_value, first_n, start_dns,
                        submit, wait_bounce_created, wait_delivery, wait_queue_empty)
from petrel_fixture import check_received
from smtpwire import message

SENDER = "alice@sender.rty.test"
REPORTING_MTA = "petrel.test"
ZONE = {
    "mx": [
        ("sender.rty.test", 10, "mx.sender.rty.test"),
        ("tmp.rty.test", 10, "mx.tmp.rty.test"),
        ("down.rty.test", 10, "mxa.down.rty.test"),
        ("down.rty.test", 20, "mxb.down.rty.test"),
    ],
    "a": [
        ("mx.sender.rty.test", "127.0.44.2"),
        ("mx.tmp.rty.test", "127.0.44.3"),
        ("mxa.down.rty.test", "127.0.44.4"),
        ("mxb.down.rty.test", "127.0.44.5"),
    ],
}
HOSTS = sorted({ip for _, ip in ZONE["a"]})
TRY_LATER = "451 4.7.1 Try again later"
RCPT = "bob@tmp.rty.test"


@pytest.fixture
def world(request, petrel, mx_servers):
    dns = start_dns(request, ZONE)
    return World(petrel, mx_servers, dns, HOSTS)


def retry(schedule, max_attempts=3):
    return {"schedule": schedule, "max_attempts": max_attempts, "max_age": "1h"}


def rcpt_attempt_times(mx, addr):
    return [t.when for t in mx.all_transactions()
            if addr.lower() in (r.addr.lower() for r in t.rcpts)]


def test_451_at_rcpt_then_delivered_at_the_next_attempt(world):
    mx = world.mx("127.0.44.3", "mx.tmp.rty.test")
    mx.set_reply("rcpt", first_n(1, TRY_LATER), rcpt="bob")
    p = world.start()
    content = message("later", sender=SENDER, to=RCPT)
    qid = submit(p, SENDER, [RCPT], content)
    d = wait_delivery(p, qid, RCPT, "deferred")
    check_fields(d, relay=f"mx.tmp.rty.test[127.0.44.3]:{world.port}", attempts="1",
                 dsn="4.7.1", reply=TRY_LATER)
    t = mx.wait_for(1, 15)[0]
    rest = check_received(t.data, qid=qid, helo="client.test", rcpt=RCPT)
    assert rest == content
    d = wait_delivery(p, qid, RCPT, "sent")
    check_fields(d, attempts="2")
    times = rcpt_attempt_times(mx, RCPT)
    assert len(times) == 2, mx.describe()
    gap = times[1] - times[0]
    assert 0.8 <= gap <= 4.0, f"second attempt {gap:.2f}s after the first, want ≈1s (schedule)"
    wait_queue_empty(p)


def test_451_after_the_dot_then_the_same_bytes_delivered(world):
    mx = world.mx("127.0.44.3", "mx.tmp.rty.test")
    mx.set_reply("data_end", first_n(1, TRY_LATER))
    p = world.start(retry=retry(["4s"], max_attempts=3))
    content = message("data later", sender=SENDER, to=RCPT, body="..x\r\n.\r\n")
    qid = submit(p, SENDER, [RCPT], content)
    d = wait_delivery(p, qid, RCPT, "deferred")
    check_fields(d, attempts="1", dsn="4.7.1", reply=TRY_LATER)
    stored = p.queue_cat(qid)         # what `petrel queue cat` shows during the deferral
    first = mx.all_transactions()[0]
    assert first.data == stored, \
        f"the MX got other bytes than `queue cat` shows:\ngot  {first.data!r}\nwant {stored!r}"
    assert not first.accepted, first
    t = mx.wait_for(1, 15)[0]
    assert t.data == stored, "the retry must send the same bytes"
    wait_delivery(p, qid, RCPT, "sent")
    wait_queue_empty(p)
    assert len(mx.messages) == 1


def test_queue_list_shows_the_deferred_recipient(world):
    mx = world.mx("127.0.44.3", "mx.tmp.rty.test")
    mx.set_reply("rcpt", TRY_LATER, rcpt="bob")
    p = world.start(retry=retry(["6s"], max_attempts=5))
    qid = submit(p, SENDER, [RCPT, "carol@tmp.rty.test"],
                 message("listed", sender=SENDER, to=RCPT))
    wait_delivery(p, qid, RCPT, "deferred")
    wait_delivery(p, qid, "carol@tmp.rty.test", "sent")
    attempted = rcpt_attempt_times(mx, RCPT)[0]
    q = p.queue_list()
    assert qid in q, q.text
    rcpts = {a: (s, line) for a, s, line in q.messages[qid]["rcpts"]}
    assert RCPT in rcpts, q.text
    state, line = rcpts[RCPT]
    assert state == "deferred", f"state: got {state!r}, want deferred\n{q.text}"
    assert re.search(r"\battempts=1\b", line), f"want attempts=1: {line!r}"
    assert f'last="{TRY_LATER}"' in line, f"want last=\"{TRY_LATER}\": {line!r}"
    m = re.search(r"\bnext=(\S+)", line)
    assert m, f"want next=<time>: {line!r}"
    nxt = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
    assert -2 <= nxt - (attempted + 6) <= 2, \
        f"next={m.group(1)} is {nxt - attempted:.1f}s after the attempt, want ≈6s"
    carol = rcpts.get("carol@tmp.rty.test")
    assert carol is None or carol[0] == "delivered", q.text


def test_always_451_bounces_after_max_attempts_with_the_last_reply(world):
    sender_mx = world.mx("127.0.44.2", "mx.sender.rty.test")
    mx = world.mx("127.0.44.3", "mx.tmp.rty.test")
    mx.set_reply("rcpt", TRY_LATER, rcpt="bob")
    p = world.start()          # schedule [1s, 2s], max_attempts 3
    qid = submit(p, SENDER, [RCPT], message("never", sender=SENDER, to=RCPT))
    d = wait_delivery(p, qid, RCPT, "bounced", timeout=20)
    check_fields(d, attempts="3", dsn="4.7.1", reply=TRY_LATER)
    deferred = delivery_lines(p, qid, RCPT, "deferred")
    assert [x.get("attempts") for x in deferred] == ["1", "2"], \
        "\n".join(x["line"] for x in deferred)
    times = rcpt_attempt_times(mx, RCPT)
    assert len(times) == 3, f"the MX saw {len(times)} attempts, want 3\n{mx.describe()}"
    g1, g2 = times[1] - times[0], times[2] - times[1]
    assert 0.8 <= g1 <= 4.0, f"gap 1: {g1:.2f}s, want ≈1s"
    assert 1.8 <= g2 <= 5.0, f"gap 2: {g2:.2f}s, want ≈2s"
    wait_bounce_created(p, qid)
    s = sender_mx.wait_for(1, 15)[0]
    assert s.mail_from == "" and s.rcpt_tos == [SENDER], s
    rep = Report(s.data)
    check_report_frame(rep, sender=SENDER, reporting_mta=REPORTING_MTA, rcpts=[RCPT])
    b = rep.recipient(RCPT)
    assert b.get("Action") == "failed", f"Action: got {b.get('Action')!r}, want failed"
    assert re.fullmatch(r"4\.\d+\.\d+", b.get("Status") or ""), \
        f"Status: got {b.get('Status')!r}, want 4.x.x"
    assert field_type_value(b.get("Diagnostic-Code")) == ("smtp", TRY_LATER), \
        f"Diagnostic-Code: got {b.get('Diagnostic-Code')!r}"
    assert field_type_value(b.get("Remote-MTA")) == ("dns", "mx.tmp.rty.test"), b.items()
    wait_queue_empty(p)
    time.sleep(2.5)
    assert mx.rcpt_attempts(RCPT) == 3, "no attempt after the bounce"


def test_the_last_interval_repeats(world):
    mx = world.mx("127.0.44.3", "mx.tmp.rty.test")
    mx.set_reply("rcpt", first_n(3, TRY_LATER), rcpt="bob")
    p = world.start(retry=retry(["1s", "2s"], max_attempts=5))
    qid = submit(p, SENDER, [RCPT], message("repeat", sender=SENDER, to=RCPT))
    d = wait_delivery(p, qid, RCPT, "sent", timeout=20)
    check_fields(d, attempts="4")
    times = rcpt_attempt_times(mx, RCPT)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert len(gaps) == 3, mx.describe()
    for got, want in zip(gaps, (1, 2, 2)):
        assert want - 0.2 <= got <= want + 3, f"gaps {[round(g, 2) for g in gaps]}, want 1, 2, 2"
    wait_queue_empty(p)


def test_all_mxes_down_defers_then_delivers_when_one_comes_up(world):
    p = world.start(retry=retry(["2s"], max_attempts=5))
    rcpt = "bob@down.rty.test"
    content = message("down", sender=SENDER, to=rcpt)
    qid = submit(p, SENDER, [rcpt], content)
    d = wait_delivery(p, qid, rcpt, "deferred")
    check_fields(d, attempts="1", dsn=re.compile(r"4\.\d+\.\d+"))
    assert not delivery_lines(p, qid, rcpt, "bounced")
    mxb = world.mx("127.0.44.5", "mxb.down.rty.test")
    t = mxb.wait_for(1, 15)[0]
    assert check_received(t.data, qid=qid, helo="client.test", rcpt=rcpt) == content
    d = wait_delivery(p, qid, rcpt, "sent")
    check_fields(d, relay=f"mxb.down.rty.test[127.0.44.5]:{world.port}")
    wait_queue_empty(p)


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_keeps_the_next_attempt_time(world, how):
    mx = world.mx("127.0.44.3", "mx.tmp.rty.test")
    mx.set_reply("rcpt", first_n(1, TRY_LATER), rcpt="bob")
    p = world.start(retry=retry(["8s"], max_attempts=5))
    content = message(f"restart {how}", sender=SENDER, to=RCPT)
    qid = submit(p, SENDER, [RCPT], content)
    wait_delivery(p, qid, RCPT, "deferred")
    first = rcpt_attempt_times(mx, RCPT)[0]
    if how == "sigterm":
        p.stop()
    else:
        p.kill9()
    p.start()
    q = p.queue_list()
    assert qid in q, f"the deferred message must survive the restart\n{q.text}"
    t = mx.wait_for(1, 20)[0]
    assert t.when >= first + 8 - 0.5, \
        f"delivered {t.when - first:.2f}s after the first attempt, before its next-attempt " \
        f"time (8s)"
    assert t.when <= first + 8 + 6, f"delivered {t.when - first:.2f}s after the first attempt"
    assert check_received(t.data, qid=qid, helo="client.test", rcpt=RCPT) == content
    d = wait_delivery(p, qid, RCPT, "sent")
    check_fields(d, attempts="2")
    wait_queue_empty(p)
    assert len(mx.messages) == 1


def test_restart_after_the_next_attempt_time_delivers_at_once(world):
    mx = world.mx("127.0.44.3", "mx.tmp.rty.test")
    mx.set_reply("rcpt", first_n(1, TRY_LATER), rcpt="bob")
    p = world.start(retry=retry(["3s"], max_attempts=5))
    qid = submit(p, SENDER, [RCPT], message("due", sender=SENDER, to=RCPT))
    wait_delivery(p, qid, RCPT, "deferred")
    first = rcpt_attempt_times(mx, RCPT)[0]
    p.stop()
    time.sleep(max(0.0, first + 4 - time.time()))
    started = time.time()
    p.start()
    t = mx.wait_for(1, 10)[0]
    assert t.when - started <= 4, f"a due recipient waited {t.when - started:.2f}s after start"
    wait_delivery(p, qid, RCPT, "sent")
    wait_queue_empty(p)
