#!/usr/bin/python3
"""Helpers for bench/run.sh (Python standard library only).

  benchlib.py cpu PID            CPU seconds (utime+stime, all threads) of PID
  benchlib.py treecpu PID        CPU seconds of PID and everything it started:
                                 PID's own utime+stime+cutime+cstime (cutime/cstime
                                 hold the CPU time of children it has reaped) plus
                                 utime+stime+cutime+cstime of every live descendant
  benchlib.py sysbusy            busy CPU seconds of the whole machine since boot
                                 (user+nice+system+irq+softirq from /proc/stat)
  benchlib.py tree PID           PID and its live descendants, one per line
  benchlib.py hwm PID            peak RSS (VmHWM) of PID in KiB
  benchlib.py pss-sample PID OUT INTERVAL MAXSECS
                                 until SIGTERM (or MAXSECS), sample the summed PSS of
                                 PID and its descendants every INTERVAL seconds; write
                                 "peak_kib nprocs_at_peak samples" to OUT; on SIGUSR1
                                 also write the peak so far to OUT.mark
  benchlib.py tarpit PORT MAXSECS
                                 listen on 127.0.0.1:PORT, accept connections and
                                 never answer (parks a relay's outbound deliveries)
  benchlib.py check-sink PORT OUT MAXSECS
                                 a recording SMTP server on 127.0.0.1:PORT (one JSON line
                                 per message in OUT: client address, EHLO, envelope,
                                 headers) for the hooks scenario's spot checks
  benchlib.py hooks-check PORT CHECKOUT MODE MACHINE_IP MAXSECS
                                 the hooks scenario's spot checks against petrel on PORT
                                 (MODE none, lua or plugin; see cmd_hooks_check)
  benchlib.py sinkcount FILE     "MESSAGES SESSIONS" received so far by `smtp-sink -c`
                                 whose stdout is FILE (its last complete record; 0 0 if none)
  benchlib.py tlssinkcount FILE  "HANDSHAKES RESUMED" counted by bench/tls_sink (COUNTFILE)
  benchlib.py relay-watch SINKOUT TARGET MAXSECS KIND PID SINKPID OUT
                                 write "ready" to OUT.ready, then poll SINKOUT every 10 ms
                                 until the sink's message count reaches TARGET; at that
                                 moment write to OUT "time cpu busy sink_cpu self_cpu count"
                                 (time: epoch seconds; cpu: CPU seconds of PID, KIND cpu,
                                 or of PID's process tree, KIND treecpu; busy: sysbusy;
                                 sink_cpu: CPU seconds of SINKPID; self_cpu: the watcher's
                                 own CPU since "ready"). Exit 1 (OUT: "timeout COUNT")
                                 after MAXSECS or on SIGTERM
  benchlib.py report TSV JSON    print the result tables, write JSON; exit 1 if any
                                 run failed
"""
import json
import os
import platform
import re
import signal
import socket
import statistics
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
SINK_RE = re.compile(rb"sess=([0-9]+) quit=[0-9]+ mesg=([0-9]+)$")
TLS_SINK_RE = re.compile(rb"tls=([0-9]+) resumed=([0-9]+) sess=")


def read_stat(pid):
    """Returns (ppid, utime, stime, cutime, cstime) in ticks, or None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    rest = data[data.rfind(")") + 2:].split()
    # rest[0] is field 3 (state); field N is rest[N - 3]
    return (int(rest[1]), int(rest[11]), int(rest[12]), int(rest[13]), int(rest[14]))


def all_stats():
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = read_stat(int(name))
            if st is not None:
                out[int(name)] = st
    return out


def descendants(root, stats):
    children = {}
    for pid, st in stats.items():
        children.setdefault(st[0], []).append(pid)
    seen, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo.extend(children.get(pid, []))
    return seen


def proc_cpu(pid):
    """utime+stime of PID in seconds, or None if it is gone."""
    st = read_stat(pid)
    return None if st is None else (st[1] + st[2]) / CLK_TCK


def tree_cpu(root):
    """(seconds, nprocs) for root and its descendants (see treecpu), or None."""
    # Read the root first: a child reaped after this point is still seen live
    # below (or missed only if it exits in between, a window of microseconds).
    st = read_stat(root)
    if st is None:
        return None
    ticks = st[1] + st[2] + st[3] + st[4]
    stats = all_stats()
    nproc = 1
    for pid in descendants(root, stats):
        s = stats[pid]
        ticks += s[1] + s[2] + s[3] + s[4]
        nproc += 1
    return ticks / CLK_TCK, nproc


def sys_busy():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                v = [int(x) for x in line.split()[1:]]
                return (v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK
    sys.exit("benchlib: no cpu line in /proc/stat")


def cmd_cpu(pid):
    v = proc_cpu(pid)
    if v is None:
        sys.exit(f"benchlib: no process {pid}")
    print(f"{v:.3f}")


def cmd_treecpu(root):
    v = tree_cpu(root)
    if v is None:
        sys.exit(f"benchlib: no process {root}")
    print(f"{v[0]:.3f} {v[1]}")


def cmd_sysbusy():
    print(f"{sys_busy():.3f}")


def sink_counts(path):
    """(messages, sessions) counted by `smtp-sink -c` (stdout in path). Its
    records are "sess=S quit=Q mesg=M" each followed by CR; only a record
    whose CR has been written counts, so a record being written is never
    misread."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 512))
            tail = f.read()
    except OSError:
        return 0, 0
    for rec in reversed(tail.split(b"\r")[:-1]):
        m = SINK_RE.search(rec)
        if m:
            return int(m.group(2)), int(m.group(1))
    return 0, 0


def sink_count(path):
    return sink_counts(path)[0]


def cmd_sinkcount(path):
    print("%d %d" % sink_counts(path))


def cmd_tlssinkcount(path):
    """Handshakes and resumed handshakes counted by bench/tls_sink (its last
    complete record; 0 0 if none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 512))
            tail = f.read()
    except OSError:
        tail = b""
    for rec in reversed(tail.split(b"\r")[:-1]):
        m = TLS_SINK_RE.search(rec)
        if m:
            print(f"{int(m.group(1))} {int(m.group(2))}")
            return
    print("0 0")


def cmd_relay_watch(sinkout, target, maxsecs, kind, pid, sinkpid, out):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    self0 = sum(os.times()[:2])
    with open(out + ".ready", "w") as f:
        f.write("ready\n")
    deadline = time.monotonic() + maxsecs
    n = sink_count(sinkout)
    while n < target:
        if stop or time.monotonic() >= deadline:
            with open(out, "w") as f:
                f.write(f"timeout {n}\n")
            return 1
        time.sleep(0.01)
        n = sink_count(sinkout)
    t = time.time()
    if kind == "treecpu":
        v = tree_cpu(pid)
        cpu = None if v is None else v[0]
    else:
        cpu = proc_cpu(pid)
    busy = sys_busy()
    scpu = proc_cpu(sinkpid)
    self_cpu = sum(os.times()[:2]) - self0
    with open(out, "w") as f:
        f.write(f"{t:.6f} {'-' if cpu is None else f'{cpu:.3f}'} {busy:.3f} "
                f"{'-' if scpu is None else f'{scpu:.3f}'} {self_cpu:.3f} {n}\n")
    return 0


def cmd_tree(root):
    stats = all_stats()
    for pid in [root] + descendants(root, stats):
        print(pid)


def cmd_hwm(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    print(line.split()[1])
                    return
    except OSError:
        pass
    sys.exit(f"benchlib: no VmHWM for {pid}")


def pss_kib(pid):
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmd_pss_sample(root, out, interval, maxsecs):
    stop, mark = [], []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGUSR1, lambda *_: mark.append(1))
    peak, peak_n, samples = 0, 0, 0
    deadline = time.monotonic() + maxsecs
    while not stop and time.monotonic() < deadline:
        pids = [root] + descendants(root, all_stats())
        total = sum(pss_kib(p) for p in pids)
        samples += 1
        if total > peak:
            peak, peak_n = total, len(pids)
        # sleep in small steps so SIGTERM ends the sampler promptly
        end = time.monotonic() + interval
        while not stop and not mark and time.monotonic() < end:
            time.sleep(0.05)
        if mark:
            # the peak up to now (the last sample is at most INTERVAL old)
            mark.clear()
            with open(out + ".mark", "w") as f:
                f.write(f"{peak} {peak_n} {samples}\n")
    with open(out, "w") as f:
        f.write(f"{peak} {peak_n} {samples}\n")


def cmd_check_sink(port, out, maxsecs):
    """A minimal recording SMTP server for the hooks scenario's spot checks:
    one JSON line per message in OUT (client address, EHLO name, envelope,
    header section). Plain SMTP, one thread per connection, a few messages
    per run: it records, it is not measured."""
    import socketserver
    import threading
    lock = threading.Lock()

    class Handler(socketserver.StreamRequestHandler):
        timeout = 30

        def handle(self):
            peer = self.client_address[0]
            helo, mail, rcpts = None, None, []
            w = self.wfile
            w.write(b"220 check-sink ESMTP\r\n")
            while True:
                line = self.rfile.readline(4096)
                if not line:
                    return
                cmd = line.decode("ascii", "replace").rstrip("\r\n")
                verb = cmd[:4].upper()
                if verb in ("EHLO", "HELO"):
                    helo = cmd[5:].strip()
                    w.write(b"250-check-sink\r\n250 8BITMIME\r\n" if verb == "EHLO"
                            else b"250 check-sink\r\n")
                elif verb == "MAIL":
                    mail, rcpts = cmd[10:].strip(), []
                    w.write(b"250 2.1.0 Ok\r\n")
                elif verb == "RCPT":
                    rcpts.append(cmd[8:].strip())
                    w.write(b"250 2.1.5 Ok\r\n")
                elif verb == "DATA":
                    w.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    data = []
                    while True:
                        d = self.rfile.readline(1 << 20)
                        if not d or d in (b".\r\n", b".\n"):
                            break
                        data.append(d)
                    text = b"".join(data).decode("utf-8", "replace")
                    head = re.split(r"\r?\n\r?\n", text, maxsplit=1)[0]
                    rec = {"peer": peer, "helo": helo, "from": mail, "rcpts": rcpts,
                           "headers": head, "time": time.time()}
                    with lock, open(out, "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    w.write(b"250 2.0.0 Ok: recorded\r\n")
                elif verb == "RSET" or verb == "NOOP":
                    w.write(b"250 2.0.0 Ok\r\n")
                elif verb == "QUIT":
                    w.write(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    w.write(b"502 5.5.2 Not implemented\r\n")

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    srv = Server(("127.0.0.1", port), Handler)
    srv.timeout = 0.2
    deadline = time.monotonic() + maxsecs
    while not stop and time.monotonic() < deadline:
        srv.handle_request()
    srv.server_close()


def smtp_expect(f, code, what):
    """Reads one (multi-line) reply from file f; raises unless it has code."""
    lines = []
    while True:
        line = f.readline(4096).decode("ascii", "replace").rstrip("\r\n")
        if not line:
            raise RuntimeError(f"{what}: connection closed (after {lines})")
        lines.append(line)
        if len(line) < 4 or line[3] != "-":
            break
    if not lines[-1].startswith(str(code)):
        raise RuntimeError(f"{what}: got {' / '.join(lines)!r}, want {code}")
    return lines


def cmd_hooks_check(port, check_out, mode, machine_ip, maxsecs):
    """The hooks scenario's spot checks against a running petrel (MODE none,
    lua or plugin). With the policy: a client at 127.0.0.66 is refused at
    connect (554), a recipient at blocked.test at RCPT (550). Always: a
    message from probe@check.test to probe@check.test reaches the check
    sink (route check.test), from MACHINE_IP with EHLO check-out.bench.test
    when the policy chose the source (127.0.0.1 otherwise), and carries
    X-Bench: <queue id> exactly when the header_stamp plugin is loaded.
    Prints what it saw; exit status 1 with the reason on a failure."""
    deadline = time.monotonic() + maxsecs
    token = f"hooks-check-{os.getpid()}-{time.time():.6f}"
    policy = mode in ("lua", "plugin")
    seen = []

    def session(source_ip):
        s = socket.create_connection(("127.0.0.1", port), timeout=10,
                                     source_address=(source_ip, 0))
        return s, s.makefile("rb")

    def send(s, line):
        s.sendall(line.encode("ascii") + b"\r\n")

    try:
        if policy:
            s, f = session("127.0.0.66")
            seen.append("connect from 127.0.0.66: " + smtp_expect(f, 554, "connect hook")[-1])
            s.close()
        s, f = session("127.0.0.1")
        smtp_expect(f, 220, "banner")
        send(s, "EHLO probe.bench.test")
        smtp_expect(f, 250, "EHLO")
        if policy:
            send(s, "MAIL FROM:<probe@check.test>")
            smtp_expect(f, 250, "MAIL")
            send(s, "RCPT TO:<x@blocked.test>")
            seen.append("RCPT x@blocked.test: " + smtp_expect(f, 550, "rcpt_to hook")[-1])
            send(s, "RSET")
            smtp_expect(f, 250, "RSET")
        send(s, "MAIL FROM:<probe@check.test>")
        smtp_expect(f, 250, "MAIL")
        send(s, "RCPT TO:<probe@check.test>")
        smtp_expect(f, 250, "RCPT probe@check.test")
        send(s, "DATA")
        smtp_expect(f, 354, "DATA")
        s.sendall((f"From: <probe@check.test>\r\nTo: <probe@check.test>\r\n"
                   f"Subject: {token}\r\n\r\nspot check\r\n.\r\n").encode("ascii"))
        queued = smtp_expect(f, 250, "end of data")[-1]
        send(s, "QUIT")
        s.close()
    except (OSError, RuntimeError) as e:
        print(f"hooks-check {mode}: FAILED: {e}")
        return 1

    rec = None
    while rec is None and time.monotonic() < deadline:
        try:
            with open(check_out) as fh:
                for line in fh:
                    r = json.loads(line)
                    if token in r["headers"]:
                        rec = r
        except (OSError, ValueError):
            pass
        if rec is None:
            time.sleep(0.1)
    if rec is None:
        print(f"hooks-check {mode}: FAILED: the probe message ({queued}) did not reach the "
              f"check sink within {maxsecs:.0f} s")
        return 1
    want_ip = machine_ip if policy else "127.0.0.1"
    want_helo = "check-out.bench.test" if policy else None
    stamp = re.findall(r"^X-Bench:[ \t]*(.*)$", rec["headers"], re.M | re.I)
    errors = []
    if rec["peer"] != want_ip:
        errors.append(f"relayed from {rec['peer']}, want {want_ip} (select_source)")
    if want_helo and rec["helo"] != want_helo:
        errors.append(f"EHLO {rec['helo']}, want {want_helo} (select_source)")
    if mode == "plugin":
        if len(stamp) != 1 or not re.fullmatch(r"[0-9A-Za-z]{6,}", stamp[0].strip()):
            errors.append(f"X-Bench headers {stamp}, want one with the queue id")
        elif stamp[0].strip() not in queued:
            errors.append(f"X-Bench: {stamp[0].strip()} is not the queue id in {queued!r}")
    elif stamp:
        errors.append(f"X-Bench header {stamp} without the plugin")
    seen.append(f"probe relayed from {rec['peer']} EHLO {rec['helo']}"
                + (f", X-Bench: {stamp[0].strip()}" if stamp else ", no X-Bench header")
                + f" (petrel: {queued})")
    if errors:
        print(f"hooks-check {mode}: FAILED: " + "; ".join(errors) + " | " + "; ".join(seen))
        return 1
    print(f"hooks-check {mode}: ok: " + "; ".join(seen))
    return 0


def cmd_tarpit(port, maxsecs):
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(1024)
    ls.settimeout(0.2)
    held = []
    deadline = time.monotonic() + maxsecs
    while not stop and time.monotonic() < deadline:
        try:
            conn, _ = ls.accept()
            held.append(conn)
        except socket.timeout:
            pass
        except InterruptedError:
            pass
    for c in held:
        c.close()
    ls.close()


# ---------------------------------------------------------------- report

# Receive path (scenario A: petrel with deliveries parked; B: Postfix)
METRICS = [
    ("msgs_per_s", "msgs/s accepted", "{:.0f}"),
    ("cpu_per_1k", "CPU-s / 1,000 msgs", "{:.3f}"),
    ("mem_mib", "peak memory MiB", "{:.1f}"),
]
POSTFIX_EXTRA = [("cpu_per_1k_drain", "CPU-s / 1,000 incl. relay drain", "{:.3f}"),
                 ("drain_s", "extra s until queue empty", "{:.1f}")]
# the machine may be shared: CPU used by anything else during the run
OTHERS = [("others_pct", "other CPU use during run, %", "{:.0f}")]
# End-to-end relay (smtp-source -> server -> smtp-sink)
RELAY_METRICS = [
    ("msgs_per_s", "msgs/s accepted", "{:.0f}"),
    ("relay_msgs_per_s", "msgs/s relayed", "{:.0f}"),
    ("relay_s", "s until the sink has all", "{:.2f}"),
    ("relay_cpu_per_1k", "CPU-s / 1,000 msgs (relayed)", "{:.3f}"),
    ("cpu_per_1k", "CPU-s / 1,000 while accepting", "{:.3f}"),
    ("relay_mem_mib", "peak memory MiB", "{:.1f}"),
    ("relay_others_pct", "other CPU use during relay, %", "{:.0f}"),
    ("sink_sessions", "connections to the sink", "{:.0f}"),
]
MEM_NOTE = {
    "petrel": "peak memory = VmHWM of the petrel process",
    "postfix": "peak memory = peak of the summed PSS of all Postfix processes (sampled 0.5 s)",
}
TARGET_MSGS = 3000.0
TARGET_CPU = 0.3
TARGET_RELAY_RATIO = 3.0   # petrel relays >= 3x Postfix's rate
TARGET_CPU_RATIO = 5.0     # petrel uses <= 1/5 of Postfix's CPU per message


def load_tsv(path):
    rows = []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            if not line.strip():
                continue
            rec = dict(zip(header, line.rstrip("\n").split("\t")))
            for k, v in rec.items():
                if k not in ("scenario", "server", "status"):
                    try:
                        rec[k] = float(v) if v not in ("", "-") else None
                    except ValueError:
                        pass
            rows.append(rec)
    return rows


def fmt(v, f):
    return "-" if v is None else f.format(v)


def ratio(a, b):
    return a / b if a and b else None


def in_scenario(row, scen):
    return scen in row["scenario"].split("+")


def workload_key(r):
    return (int(r["messages"]), int(r["size"]), int(r["sessions"]))


def print_block(runs, metrics):
    """Prints one server's runs and medians; returns (medians, ok_runs, failed)."""
    ok = [r for r in runs if r["status"] == "ok"]
    cols = [f"run {int(r['run'])}" for r in runs] + ["median"]
    print("  " + f"{'':34}" + "".join(f"{c:>12}" for c in cols))
    med = {}
    for key, label, f in metrics:
        vals = [r.get(key) for r in runs]
        good = [r.get(key) for r in ok if r.get(key) is not None]
        med[key] = statistics.median(good) if good else None
        cells = [fmt(v, f) if r["status"] == "ok" else "ERROR" for v, r in zip(vals, runs)]
        print("  " + f"{label:34}" + "".join(f"{c:>12}" for c in cells)
              + f"{fmt(med[key], f):>12}")
    failed = False
    for r in runs:
        if r["status"] != "ok":
            failed = True
            print(f"  run {int(r['run'])}: ERROR: {r['status']}")
    return med, len(ok), failed


def strip_run(r):
    return {k: v for k, v in r.items() if k not in ("scenario", "server")}


def report_receive(rows, out):
    """Scenario A (petrel receive path) and B (Postfix); returns failed."""
    failed = False
    medians = {}
    for server in ("petrel", "postfix"):
        srows = [r for r in rows if r["server"] == server and in_scenario(r, "receive")]
        if not srows:
            continue
        metrics = METRICS + (POSTFIX_EXTRA if server == "postfix" else []) + OTHERS
        title = ("A — receive path, petrel" if server == "petrel"
                 else "B — Postfix 3.7 relay (context)")
        print(f"\nScenario {title}: {int(srows[0]['messages'])} msgs x "
              f"{int(srows[0]['size'])} B, one message per connection")
        print("  " + MEM_NOTE[server])
        sc = out["scenarios"].setdefault(server, {})
        for sess in sorted({int(r["sessions"]) for r in srows}):
            runs = [r for r in srows if int(r["sessions"]) == sess]
            print(f"\n  sessions={sess}")
            med, nok, bad = print_block(runs, metrics)
            failed = failed or bad
            medians[(server, sess)] = med
            sc[str(sess)] = {"runs": [strip_run(r) for r in runs], "median": med,
                             "ok_runs": nok}
    sessions = sorted({s for (_, s) in medians})
    have_ratio = False
    for sess in sessions:
        p, q = medians.get(("petrel", sess)), medians.get(("postfix", sess))
        if not p or not q:
            continue
        tp = ratio(p["msgs_per_s"], q["msgs_per_s"])
        cpu = ratio(q["cpu_per_1k"], p["cpu_per_1k"])
        mem = ratio(q["mem_mib"], p["mem_mib"])
        if not have_ratio:
            print("\nRatios (medians)")
            print(f"  {'sessions':>8}  {'throughput petrel/Postfix':>26}"
                  f"  {'CPU Postfix/petrel':>19}  {'memory Postfix/petrel':>22}")
            have_ratio = True
        print(f"  {sess:>8}  {fmt(tp, '{:.2f}x'):>26}  {fmt(cpu, '{:.2f}x'):>19}"
              f"  {fmt(mem, '{:.2f}x'):>22}")
        out["ratios"][str(sess)] = {"throughput_petrel_over_postfix": tp,
                                    "cpu_postfix_over_petrel": cpu,
                                    "memory_postfix_over_petrel": mem}
    targets = {}
    for sess in sessions:
        p = medians.get(("petrel", sess))
        if not p or p["msgs_per_s"] is None:
            continue
        if not targets:
            print(f"\nTargets (receive path, petrel): >= {TARGET_MSGS:.0f} msgs/s, "
                  f"<= {TARGET_CPU} CPU-s / 1,000 msgs")
        m_ok = p["msgs_per_s"] >= TARGET_MSGS
        c_ok = p["cpu_per_1k"] is not None and p["cpu_per_1k"] <= TARGET_CPU
        targets[str(sess)] = {"msgs_per_s_met": m_ok, "cpu_per_1k_met": c_ok}
        print(f"  sessions={sess}: {p['msgs_per_s']:.0f} msgs/s "
              f"{'MET' if m_ok else 'NOT MET'}, "
              f"{fmt(p['cpu_per_1k'], '{:.3f}')} CPU-s/1k {'MET' if c_ok else 'NOT MET'}")
    out["targets"]["met"] = targets
    return failed


def report_relay(rows, out):
    """End-to-end relay scenarios, both servers; returns failed."""
    rrows = [r for r in rows if in_scenario(r, "relay")]
    if not rrows:
        return False
    failed = False
    order = []
    for r in rrows:
        if workload_key(r) not in order:
            order.append(workload_key(r))
    summary = []
    for (msgs, size, sess) in order:
        name = f"{msgs}x{size}B/s{sess}"
        w = out.setdefault(name, {"messages": msgs, "size": size, "sessions": sess})
        print(f"\nRelay {msgs} msgs x {size} B, {sess} sessions, one message per "
              f"connection: smtp-source -> server -> smtp-sink")
        med = {}
        for server in ("petrel", "postfix"):
            runs = [r for r in rrows if r["server"] == server and workload_key(r) ==
                    (msgs, size, sess)]
            if not runs:
                continue
            label = "petrel" if server == "petrel" else "Postfix 3.7"
            print(f"\n  {label} ({MEM_NOTE[server]})")
            m, nok, bad = print_block(runs, RELAY_METRICS)
            failed = failed or bad
            med[server] = m
            w[server] = {"runs": [strip_run(r) for r in runs], "median": m, "ok_runs": nok}
        p, q = med.get("petrel"), med.get("postfix")
        if p and q:
            rr = ratio(p["relay_msgs_per_s"], q["relay_msgs_per_s"])
            ar = ratio(p["msgs_per_s"], q["msgs_per_s"])
            cr = ratio(q["relay_cpu_per_1k"], p["relay_cpu_per_1k"])
            mr = ratio(q["relay_mem_mib"], p["relay_mem_mib"])
            w["ratios"] = {"relay_rate_petrel_over_postfix": rr,
                           "accept_rate_petrel_over_postfix": ar,
                           "cpu_postfix_over_petrel": cr,
                           "memory_postfix_over_petrel": mr}
            w["targets"] = {"relay_rate_met": rr is not None and rr >= TARGET_RELAY_RATIO,
                            "cpu_met": cr is not None and cr >= TARGET_CPU_RATIO}
            summary.append((name, p, q, rr, ar, cr, mr))
    if summary:
        print(f"\nRelay summary (medians). Targets: petrel relays >= {TARGET_RELAY_RATIO:.0f}x "
              f"Postfix's rate and uses <= 1/{TARGET_CPU_RATIO:.0f} of its CPU per message")
        hdr = ["workload", "relayed/s petrel", "Postfix", "ratio", "target",
               "CPU/1k petrel", "Postfix", "ratio", "target", "accepted/s ratio",
               "memory ratio"]
        widths = [20, 17, 8, 7, 8, 14, 8, 7, 8, 17, 13]
        print("  " + "".join(f"{h:>{wd}}" for h, wd in zip(hdr, widths)))
        for name, p, q, rr, ar, cr, mr in summary:
            cells = [name, fmt(p["relay_msgs_per_s"], "{:.0f}"),
                     fmt(q["relay_msgs_per_s"], "{:.0f}"), fmt(rr, "{:.2f}x"),
                     "MET" if rr is not None and rr >= TARGET_RELAY_RATIO else "NOT MET",
                     fmt(p["relay_cpu_per_1k"], "{:.3f}"), fmt(q["relay_cpu_per_1k"], "{:.3f}"),
                     fmt(cr, "{:.2f}x"),
                     "MET" if cr is not None and cr >= TARGET_CPU_RATIO else "NOT MET",
                     fmt(ar, "{:.2f}x"), fmt(mr, "{:.2f}x")]
            print("  " + "".join(f"{c:>{wd}}" for c, wd in zip(cells, widths)))
    return failed


# The milter scenario: relay without / with one pass-through milter.
MILTER_SCENARIOS = (("relay-nomilter", "without milter"), ("relay-milter", "with the milter"))
MILTER_METRICS = [
    ("milter_cpu_per_1k", "milter's CPU-s / 1,000 msgs", "{:.3f}"),
    ("milter_msgs", "messages the milter saw", "{:.0f}"),
]


def report_milter(rows, out):
    """Relay with and without the pass-through milter, both servers; returns failed."""
    mrows = [r for r in rows if r["scenario"] in dict(MILTER_SCENARIOS)]
    if not mrows:
        return False
    for r in mrows:
        mc = r.get("milter_cpu_s")
        r["milter_cpu_per_1k"] = (mc * 1000 / r["messages"]
                                  if isinstance(mc, float) and r.get("messages") else None)
    failed = False
    order = []
    for r in mrows:
        if workload_key(r) not in order:
            order.append(workload_key(r))
    summary = []
    for (msgs, size, sess) in order:
        name = f"{msgs}x{size}B/s{sess}"
        w = out.setdefault(name, {"messages": msgs, "size": size, "sessions": sess})
        print(f"\nMilter: relay {msgs} msgs x {size} B, {sess} sessions, without and with one "
              f"pass-through milter (every stage, no changes)")
        med = {}
        for server in ("petrel", "postfix"):
            label = "petrel" if server == "petrel" else "Postfix 3.7"
            for scen, what in MILTER_SCENARIOS:
                runs = [r for r in mrows if r["server"] == server and r["scenario"] == scen
                        and workload_key(r) == (msgs, size, sess)]
                if not runs:
                    continue
                print(f"\n  {label}, {what} ({MEM_NOTE[server]})")
                metrics = RELAY_METRICS + (MILTER_METRICS if scen == "relay-milter" else [])
                m, nok, bad = print_block(runs, metrics)
                failed = failed or bad
                med[(server, scen)] = m
                w.setdefault(server, {})[scen] = {"runs": [strip_run(r) for r in runs],
                                                  "median": m, "ok_runs": nok}
        for server in ("petrel", "postfix"):
            off, on = med.get((server, "relay-nomilter")), med.get((server, "relay-milter"))
            if not off or not on:
                continue
            rate = ratio(on["relay_msgs_per_s"], off["relay_msgs_per_s"])
            dcpu = (on["relay_cpu_per_1k"] - off["relay_cpu_per_1k"]
                    if on["relay_cpu_per_1k"] is not None and off["relay_cpu_per_1k"] is not None
                    else None)
            w[server]["overhead"] = {"relay_rate_with_over_without": rate,
                                     "server_cpu_per_1k_added": dcpu,
                                     "milter_cpu_per_1k": on.get("milter_cpu_per_1k")}
            summary.append((name, server, off, on, rate, dcpu))
        p, q = med.get(("petrel", "relay-milter")), med.get(("postfix", "relay-milter"))
        if p and q:
            w["ratios_with_milter"] = {
                "relay_rate_petrel_over_postfix": ratio(p["relay_msgs_per_s"],
                                                        q["relay_msgs_per_s"]),
                "cpu_postfix_over_petrel": ratio(q["relay_cpu_per_1k"], p["relay_cpu_per_1k"])}
    if summary:
        print("\nMilter summary (medians): what one pass-through milter costs each server")
        hdr = ["workload", "server", "relayed/s without", "with", "with/without",
               "CPU/1k without", "with", "added", "milter CPU/1k"]
        widths = [20, 9, 19, 8, 14, 16, 8, 8, 15]
        print("  " + "".join(f"{h:>{wd}}" for h, wd in zip(hdr, widths)))
        for name, server, off, on, rate, dcpu in summary:
            cells = [name, server, fmt(off["relay_msgs_per_s"], "{:.0f}"),
                     fmt(on["relay_msgs_per_s"], "{:.0f}"), fmt(rate, "{:.2f}x"),
                     fmt(off["relay_cpu_per_1k"], "{:.3f}"), fmt(on["relay_cpu_per_1k"], "{:.3f}"),
                     fmt(dcpu, "{:+.3f}"), fmt(on.get("milter_cpu_per_1k"), "{:.3f}")]
            print("  " + "".join(f"{c:>{wd}}" for c, wd in zip(cells, widths)))
        for name in out:
            r = out[name].get("ratios_with_milter") if isinstance(out[name], dict) else None
            if r:
                print(f"  {name} with the milter: petrel relays "
                      f"{fmt(r['relay_rate_petrel_over_postfix'], '{:.2f}x')} Postfix's rate, "
                      f"Postfix uses {fmt(r['cpu_postfix_over_petrel'], '{:.2f}x')} "
                      f"petrel's CPU per message")
    return failed


# The hooks scenario: petrel relay without hooks, with the Lua policy, with
# the policy and the header_stamp plugin.
HOOK_SCENARIOS = (("hooks-none", "no hooks"),
                  ("hooks-lua", "Lua policy (connect, rcpt_to, select_source)"),
                  ("hooks-plugin", "Lua policy + header_stamp plugin"))
HOOK_METRICS = RELAY_METRICS + [
    ("load_cpu_pct", "smtp-source CPU, % of one CPU", "{:.0f}"),
]
TARGET_HOOKS_RATE = 0.95   # <= 5 % lower relayed msgs/s than without hooks


def add_load_pct(r):
    lc, wall = r.get("load_cpu_s"), r.get("wall_s")
    r["load_cpu_pct"] = (100 * lc / wall if isinstance(lc, float) and wall else None)


def report_hooks(rows, out):
    """The hooks scenario (petrel only); returns failed."""
    hrows = [r for r in rows if r["scenario"] in dict(HOOK_SCENARIOS)]
    if not hrows:
        return False
    for r in hrows:
        add_load_pct(r)
    failed = False
    order = []
    for r in hrows:
        if workload_key(r) not in order:
            order.append(workload_key(r))
    for (msgs, size, sess) in order:
        name = f"{msgs}x{size}B/s{sess}"
        w = out.setdefault(name, {"messages": msgs, "size": size, "sessions": sess})
        print(f"\nHooks: petrel relay {msgs} msgs x {size} B, {sess} sessions, one message per "
              f"connection, without and with hooks")
        med = {}
        for scen, what in HOOK_SCENARIOS:
            runs = [r for r in hrows if r["scenario"] == scen and workload_key(r) ==
                    (msgs, size, sess)]
            if not runs:
                continue
            print(f"\n  petrel, {what} ({MEM_NOTE['petrel']})")
            m, nok, bad = print_block(runs, HOOK_METRICS)
            failed = failed or bad
            med[scen] = m
            w[scen] = {"runs": [strip_run(r) for r in runs], "median": m, "ok_runs": nok}
        base = med.get("hooks-none")
        if not base:
            continue
        print(f"\n  Summary (medians) against no hooks; target: relayed msgs/s at least "
              f"{TARGET_HOOKS_RATE:.0%} of it")
        hdr = ["config", "relayed/s", "ratio", "target", "accepted/s", "ratio",
               "CPU-s/1k", "ratio", "added µs/msg"]
        widths = [14, 11, 8, 9, 12, 8, 10, 8, 14]
        print("  " + "".join(f"{h:>{wd}}" for h, wd in zip(hdr, widths)))
        for scen, label in (("hooks-none", "none"), ("hooks-lua", "Lua"),
                            ("hooks-plugin", "Lua+plugin")):
            m = med.get(scen)
            if not m:
                continue
            rr = ratio(m["relay_msgs_per_s"], base["relay_msgs_per_s"])
            ar = ratio(m["msgs_per_s"], base["msgs_per_s"])
            cr = ratio(m["relay_cpu_per_1k"], base["relay_cpu_per_1k"])
            added = (1000 * (m["relay_cpu_per_1k"] - base["relay_cpu_per_1k"])
                     if m["relay_cpu_per_1k"] is not None and
                     base["relay_cpu_per_1k"] is not None else None)
            met = rr is not None and rr >= TARGET_HOOKS_RATE
            if scen != "hooks-none":
                w[scen]["against_none"] = {"relay_rate_ratio": rr, "accept_rate_ratio": ar,
                                           "cpu_ratio": cr, "added_cpu_us_per_msg": added,
                                           "target_met": met}
            cells = [label, fmt(m["relay_msgs_per_s"], "{:.0f}"), fmt(rr, "{:.3f}"),
                     "-" if scen == "hooks-none" else ("MET" if met else "NOT MET"),
                     fmt(m["msgs_per_s"], "{:.0f}"), fmt(ar, "{:.3f}"),
                     fmt(m["relay_cpu_per_1k"], "{:.3f}"), fmt(cr, "{:.2f}"),
                     "-" if scen == "hooks-none" else fmt(added, "{:+.0f}")]
            print("  " + "".join(f"{c:>{wd}}" for c, wd in zip(cells, widths)))
    return failed


# The TLS scenario: STARTTLS on both hops, both servers.
TLS_METRICS = RELAY_METRICS + [
    ("hs_in_per_s", "inbound handshakes/s", "{:.0f}"),
    ("tls_out", "outbound handshakes (sink)", "{:.0f}"),
    ("hs_out_per_s", "outbound handshakes/s", "{:.1f}"),
    ("resumed_pct", "outbound resumed, %", "{:.0f}"),
    ("log_tls", "outbound TLS in the log", "{:.0f}"),
    ("log_resumed", "  of which resumed=yes", "{:.0f}"),
    ("load_cpu_pct", "tls_load.py CPU, % of one CPU", "{:.0f}"),
]
TARGET_TLS_RATIO = 2.0   # petrel >= 2x Postfix (msgs/s relayed, inbound handshakes/s)


def report_tls(rows, out):
    """The TLS scenario, both servers; returns failed."""
    trows = [r for r in rows if r["scenario"] == "tls"]
    if not trows:
        return False
    for r in trows:
        add_load_pct(r)
        tin, tout, tres = r.get("tls_in"), r.get("tls_out"), r.get("tls_out_resumed")
        r["hs_in_per_s"] = tin / r["wall_s"] if isinstance(tin, float) and r["wall_s"] else None
        r["hs_out_per_s"] = (tout / r["relay_s"] if isinstance(tout, float) and r["relay_s"]
                             else None)
        r["resumed_pct"] = (100 * tres / tout if isinstance(tres, float) and tout else None)
    failed = False
    order = []
    for r in trows:
        if workload_key(r) not in order:
            order.append(workload_key(r))
    summary = []
    for (msgs, size, sess) in order:
        name = f"{msgs}x{size}B/c{sess}"
        w = out.setdefault(name, {"messages": msgs, "size": size, "connections": sess})
        print(f"\nTLS relay {msgs} msgs x {size} B, {sess} concurrent connections, one message "
              f"per connection: tls_load.py -> server -> tls_sink, STARTTLS on both hops")
        med = {}
        for server in ("petrel", "postfix"):
            runs = [r for r in trows if r["server"] == server and workload_key(r) ==
                    (msgs, size, sess)]
            if not runs:
                continue
            label = "petrel" if server == "petrel" else "Postfix 3.7"
            print(f"\n  {label} ({MEM_NOTE[server]})")
            m, nok, bad = print_block(runs, TLS_METRICS)
            failed = failed or bad
            med[server] = m
            w[server] = {"runs": [strip_run(r) for r in runs], "median": m, "ok_runs": nok}
        p, q = med.get("petrel"), med.get("postfix")
        if p and q:
            rr = ratio(p["relay_msgs_per_s"], q["relay_msgs_per_s"])
            hr = ratio(p["hs_in_per_s"], q["hs_in_per_s"])
            ar = ratio(p["msgs_per_s"], q["msgs_per_s"])
            cr = ratio(q["relay_cpu_per_1k"], p["relay_cpu_per_1k"])
            w["ratios"] = {"relay_rate_petrel_over_postfix": rr,
                           "inbound_handshakes_petrel_over_postfix": hr,
                           "accept_rate_petrel_over_postfix": ar,
                           "cpu_postfix_over_petrel": cr}
            w["targets"] = {"relay_rate_met": rr is not None and rr >= TARGET_TLS_RATIO,
                            "handshakes_met": hr is not None and hr >= TARGET_TLS_RATIO}
            summary.append((name, p, q, rr, hr, cr))
    if summary:
        print(f"\nTLS summary (medians). Target: petrel >= {TARGET_TLS_RATIO:.0f}x Postfix "
              f"(messages/s relayed and inbound handshakes/s)")
        hdr = ["workload", "relayed/s petrel", "Postfix", "ratio", "target",
               "handshakes/s in petrel", "Postfix", "ratio", "target",
               "CPU/1k petrel", "Postfix", "ratio", "resumed % petrel", "Postfix"]
        widths = [20, 17, 8, 7, 8, 23, 8, 7, 8, 14, 8, 7, 17, 8]
        print("  " + "".join(f"{h:>{wd}}" for h, wd in zip(hdr, widths)))
        for name, p, q, rr, hr, cr in summary:
            cells = [name, fmt(p["relay_msgs_per_s"], "{:.0f}"),
                     fmt(q["relay_msgs_per_s"], "{:.0f}"), fmt(rr, "{:.2f}x"),
                     "MET" if rr is not None and rr >= TARGET_TLS_RATIO else "NOT MET",
                     fmt(p["hs_in_per_s"], "{:.0f}"), fmt(q["hs_in_per_s"], "{:.0f}"),
                     fmt(hr, "{:.2f}x"),
                     "MET" if hr is not None and hr >= TARGET_TLS_RATIO else "NOT MET",
                     fmt(p["relay_cpu_per_1k"], "{:.3f}"), fmt(q["relay_cpu_per_1k"], "{:.3f}"),
                     fmt(cr, "{:.2f}x"), fmt(p["resumed_pct"], "{:.0f}"),
                     fmt(q["resumed_pct"], "{:.0f}")]
            print("  " + "".join(f"{c:>{wd}}" for c, wd in zip(cells, widths)))
    return failed


def cmd_report(tsv, out_json):
    rows = load_tsv(tsv)
    params = {k: os.environ.get(k) for k in
              ("BENCH_MODE", "BENCH_RUNS", "BENCH_MESSAGES", "BENCH_SESSIONS", "BENCH_SIZE",
               "BENCH_RELAY", "BENCH_MILTER", "BENCH_HOOKS", "BENCH_TLS", "BENCH_TLS_KEY",
               "BENCH_TLS_PROCS", "BENCH_TLS_POSTFIX_REUSE")}
    result = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                    "clk_tck": CLK_TCK, "loadavg": os.getloadavg()},
        "params": params,
        "receive": {"scenarios": {}, "ratios": {},
                    "targets": {"msgs_per_s_min": TARGET_MSGS, "cpu_per_1k_max": TARGET_CPU}},
        "relay": {"targets": {"relay_rate_ratio_min": TARGET_RELAY_RATIO,
                              "cpu_ratio_min": TARGET_CPU_RATIO},
                  "workloads": {}},
        "milter": {"workloads": {}},
        "hooks": {"target_relay_rate_ratio_min": TARGET_HOOKS_RATE, "workloads": {}},
        "tls": {"target_ratio_min": TARGET_TLS_RATIO, "workloads": {}},
    }
    failed = report_receive(rows, result["receive"])
    failed = report_relay(rows, result["relay"]["workloads"]) or failed
    failed = report_milter(rows, result["milter"]["workloads"]) or failed
    failed = report_hooks(rows, result["hooks"]["workloads"]) or failed
    failed = report_tls(rows, result["tls"]["workloads"]) or failed
    result["failed"] = failed
    with open(out_json, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(f"\nresults: {out_json}")
    return 1 if failed else 0


def main(argv):
    if len(argv) < 2:
        sys.exit(__doc__)
    cmd, args = argv[1], argv[2:]
    if cmd == "cpu" and len(args) == 1:
        cmd_cpu(int(args[0]))
    elif cmd == "treecpu" and len(args) == 1:
        cmd_treecpu(int(args[0]))
    elif cmd == "sysbusy" and not args:
        cmd_sysbusy()
    elif cmd == "tree" and len(args) == 1:
        cmd_tree(int(args[0]))
    elif cmd == "hwm" and len(args) == 1:
        cmd_hwm(int(args[0]))
    elif cmd == "pss-sample" and len(args) == 4:
        cmd_pss_sample(int(args[0]), args[1], float(args[2]), float(args[3]))
    elif cmd == "sinkcount" and len(args) == 1:
        cmd_sinkcount(args[0])
    elif cmd == "tlssinkcount" and len(args) == 1:
        cmd_tlssinkcount(args[0])
    elif cmd == "relay-watch" and len(args) == 7:
        return cmd_relay_watch(args[0], int(args[1]), float(args[2]), args[3],
                               int(args[4]), int(args[5]), args[6])
    elif cmd == "check-sink" and len(args) == 3:
        cmd_check_sink(int(args[0]), args[1], float(args[2]))
    elif cmd == "hooks-check" and len(args) == 5:
        return cmd_hooks_check(int(args[0]), args[1], args[2], args[3], float(args[4]))
    elif cmd == "tarpit" and len(args) == 2:
        cmd_tarpit(int(args[0]), float(args[1]))
    elif cmd == "report" and len(args) == 2:
        return cmd_report(args[0], args[1])
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
