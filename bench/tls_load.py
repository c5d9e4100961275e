#!/usr/bin/python3
"""tls_load.py — the TLS benchmark's load generator (bench/run.sh, scenario
"tls"): smtp-source cannot do STARTTLS, so this sends N messages over C
concurrent connections, one message per connection, each connection

    banner, EHLO, STARTTLS, TLS handshake, EHLO, MAIL, RCPT, DATA, message, QUIT

waiting for every reply (no pipelining, as smtp-source). Python standard
library only (ssl, threads, multiprocessing); the TLS work is OpenSSL's.

  tls_load.py [-n N] [-c C] [-P PROCS] [-l SIZE] [-f FROM] [-t TO]
              [--timeout SECS] [--resume] [--json OUT] HOST:PORT

-P: processes (default 2); the C connections and N messages are split among
them, each process runs its connections as threads (blocking sockets: the
handshakes and socket I/O run outside Python's GIL, the SMTP dialogue in
it). --resume: each connection offers the session of the connection before
it in the same thread (TLS resumption on the inbound hop); the default is a
full handshake per connection, like new clients. The certificate is not
verified (the servers' cost does not depend on it).

The message is SIZE bytes of body (76-character lines) after From, To,
Subject and Message-ID headers, like smtp-source -l. Every wait is
bounded: 30 s per socket operation, --timeout (default 300) for the whole
run, after which the connections left are abandoned and counted as errors.

Prints one line, e.g.

  tls_load: 5000 messages, 5000 handshakes (0 resumed), 0 errors in 6.123 s:
  816.6 msgs/s, cpu 3.456 s (56.4 % of one CPU)

and with --json the same as an object. Exit status 1 if any message failed
(as smtp-source, which gives up at the first error, every failure fails
the run; the first error is printed).
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import socket
import ssl
import sys
import threading
import time

OP_TIMEOUT = 30.0


class SmtpError(Exception):
    pass


class Conn:
    """One SMTP connection: reply reading over a plain or TLS socket."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def reply(self, want, what):
        lines = []
        while True:
            i = self.buf.find(b"\n")
            while i < 0:
                data = self.sock.recv(16384)
                if not data:
                    raise SmtpError(f"{what}: connection closed")
                self.buf += data
                i = self.buf.find(b"\n")
            line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                break
        if not lines[-1].startswith(want):
            text = b" / ".join(x.rstrip() for x in lines).decode("ascii", "replace")
            raise SmtpError(f"{what}: {text}")
        return lines

    def cmd(self, line, want, what):
        self.sock.sendall(line)
        return self.reply(want, what)


def make_message(size, sender, rcpt):
    head = (f"From: <{sender}>\r\nTo: <{rcpt}>\r\nSubject: tls bench\r\n"
            f"Message-ID: <@@ID@@@tls-load.bench.test>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    body = line * (size // len(line))
    rest = size - len(body)
    if rest >= 2:
        body += b"y" * (rest - 2) + b"\r\n"
    return head.encode("ascii"), body + b".\r\n"


def one_message(addr, ctx, head, body, env, session, seq, want_session):
    """addr: (family, sockaddr). Returns (tls_session or None unless
    want_session, resumed)."""
    s = socket.socket(addr[0], socket.SOCK_STREAM)
    try:
        s.settimeout(OP_TIMEOUT)
        s.connect(addr[1])
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c = Conn(s)
        c.reply(b"220", "banner")
        lines = c.cmd(b"EHLO tls-load.bench.test\r\n", b"250", "EHLO")
        if not any(x[4:].strip().upper().startswith(b"STARTTLS") for x in lines):
            raise SmtpError("EHLO: STARTTLS not offered")
        c.cmd(b"STARTTLS\r\n", b"220", "STARTTLS")
        if c.buf:
            raise SmtpError("STARTTLS: data after the 220")
        ts = ctx.wrap_socket(s, server_hostname=None, session=session)
        s = ts
        c.sock = ts
        resumed = ts.session_reused
        c.cmd(b"EHLO tls-load.bench.test\r\n", b"250", "EHLO after STARTTLS")
        c.cmd(env[0], b"250", "MAIL")
        c.cmd(env[1], b"250", "RCPT")
        c.cmd(b"DATA\r\n", b"354", "DATA")
        ts.sendall(head.replace(b"@@ID@@", seq.encode("ascii")) + body)
        c.reply(b"250", "end of data")
        c.cmd(b"QUIT\r\n", b"221", "QUIT")
        # (reading .session costs ~0.2 ms: only when --resume wants it)
        return ts.session if want_session else None, resumed
    finally:
        s.close()


def worker(idx, args, nmsgs, nconns, failed, out):
    """One process: nconns threads sending nmsgs messages together."""
    host, port = args.target
    ai = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM)[0]
    addr = (ai[0], ai[4])
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    head, body = make_message(args.size, args.sender, args.rcpt)
    env = (f"MAIL FROM:<{args.sender}>\r\n".encode("ascii"),
           f"RCPT TO:<{args.rcpt}>\r\n".encode("ascii"))
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "hs": 0, "resumed": 0, "errors": 0, "first_error": None}
    deadline = time.monotonic() + args.timeout

    def run():
        session = None
        while True:
            with lock:
                if state["next"] >= nmsgs or failed.is_set():
                    return
                n = state["next"]
                state["next"] += 1
            if time.monotonic() > deadline:
                with lock:
                    state["errors"] += nmsgs - n
                    state["first_error"] = state["first_error"] or "--timeout reached"
                    state["next"] = nmsgs
                failed.set()
                return
            try:
                sess, resumed = one_message(addr, ctx, head, body, env,
                                            session if args.resume else None,
                                            f"{os.getpid()}.{n}", args.resume)
                session = sess
                with lock:
                    state["ok"] += 1
                    state["hs"] += 1
                    state["resumed"] += 1 if resumed else 0
            except (OSError, SmtpError, ssl.SSLError) as e:
                with lock:
                    state["errors"] += 1
                    state["first_error"] = state["first_error"] or f"{type(e).__name__}: {e}"
                failed.set()
                return

    threads = [threading.Thread(target=run, daemon=True) for _ in range(nconns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()) + 2 * OP_TIMEOUT)
    with lock:
        # messages never started because the run was stopped count as failed
        state["errors"] += nmsgs - state["next"] if failed.is_set() else 0
        out.put((idx, {k: state[k] for k in ("ok", "hs", "resumed", "errors", "first_error")}))


def parse_target(s):
    host, _, port = s.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{s}: want HOST:PORT")
    return host.strip("[]"), int(port)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=1000, dest="messages")
    ap.add_argument("-c", type=int, default=20, dest="conns")
    ap.add_argument("-P", type=int, default=2, dest="procs")
    ap.add_argument("-l", type=int, default=4096, dest="size")
    ap.add_argument("-f", default="bench@bench.test", dest="sender")
    ap.add_argument("-t", default="rcpt@dest.test", dest="rcpt")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("target", type=parse_target)
    args = ap.parse_args()
    if not (args.messages > 0 and args.conns > 0 and args.procs > 0 and args.size >= 0):
        ap.error("-n, -c, -P must be positive")
    procs = min(args.procs, args.conns, args.messages)

    failed = mp.Event()
    out = mp.Queue()
    plist = []
    t0 = time.monotonic()
    for i in range(procs):
        n = args.messages // procs + (1 if i < args.messages % procs else 0)
        c = args.conns // procs + (1 if i < args.conns % procs else 0)
        p = mp.Process(target=worker, args=(i, args, n, c, failed, out), daemon=True)
        p.start()
        plist.append(p)
    results = {}
    limit = time.monotonic() + args.timeout + 3 * OP_TIMEOUT
    while len(results) < procs and time.monotonic() < limit:
        try:
            idx, r = out.get(timeout=0.5)
            results[idx] = r
        except Exception:  # queue.Empty
            if not any(p.is_alive() for p in plist) and out.empty():
                break
    wall = time.monotonic() - t0
    for p in plist:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join(5)
    ru_self = resource.getrusage(resource.RUSAGE_SELF)
    ru_kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = ru_self.ru_utime + ru_self.ru_stime + ru_kids.ru_utime + ru_kids.ru_stime
    tot = {"ok": 0, "hs": 0, "resumed": 0, "errors": 0}
    first_error = None
    for r in results.values():
        for k in tot:
            tot[k] += r[k]
        first_error = first_error or r["first_error"]
    lost = args.messages - tot["ok"] - tot["errors"]
    if lost > 0:  # a process that did not report
        tot["errors"] += lost
        first_error = first_error or f"{procs - len(results)} worker process(es) did not report"
    summary = {"messages": args.messages, "ok": tot["ok"], "errors": tot["errors"],
               "handshakes": tot["hs"], "resumed": tot["resumed"], "wall_s": wall,
               "msgs_per_s": tot["ok"] / wall if wall > 0 else None, "cpu_s": cpu,
               "cpu_pct_of_one": 100 * cpu / wall if wall > 0 else None,
               "procs": procs, "conns": args.conns, "size": args.size,
               "first_error": first_error}
    print(f"tls_load: {tot['ok']} messages, {tot['hs']} handshakes ({tot['resumed']} resumed), "
          f"{tot['errors']} errors in {wall:.3f} s: {summary['msgs_per_s'] or 0:.1f} msgs/s, "
          f"cpu {cpu:.3f} s ({summary['cpu_pct_of_one'] or 0:.1f} % of one CPU)")
    if first_error:
        print(f"tls_load: first error: {first_error}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f)
            f.write("\n")
    return 1 if tot["errors"] or tot["ok"] != args.messages else 0


if __name__ == "__main__":
    sys.exit(main())
