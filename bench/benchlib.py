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
                                 "peak_kib nprocs_at_peak samples" to OUT
  benchlib.py tarpit PORT MAXSECS
                                 listen on 127.0.0.1:PORT, accept connections and
                                 never answer (parks a relay's outbound deliveries)
  benchlib.py report TSV JSON    print the result tables, write JSON; exit 1 if any
                                 run failed
"""
import json
import os
import platform
import signal
import socket
import statistics
import sys
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")


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


def cmd_cpu(pid):
    st = read_stat(pid)
    if st is None:
        sys.exit(f"benchlib: no process {pid}")
    print(f"{(st[1] + st[2]) / CLK_TCK:.3f}")


def cmd_treecpu(root):
    # Read the root first: a child reaped after this point is still seen live
    # below (or missed only if it exits in between, a window of microseconds).
    st = read_stat(root)
    if st is None:
        sys.exit(f"benchlib: no process {root}")
    ticks = st[1] + st[2] + st[3] + st[4]
    stats = all_stats()
    nproc = 1
    for pid in descendants(root, stats):
        s = stats[pid]
        ticks += s[1] + s[2] + s[3] + s[4]
        nproc += 1
    print(f"{ticks / CLK_TCK:.3f} {nproc}")


def cmd_sysbusy():
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu "):
                v = [int(x) for x in line.split()[1:]]
                print(f"{(v[0] + v[1] + v[2] + v[5] + v[6]) / CLK_TCK:.3f}")
                return
    sys.exit("benchlib: no cpu line in /proc/stat")


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
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
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
        while not stop and time.monotonic() < end:
            time.sleep(0.05)
    with open(out, "w") as f:
        f.write(f"{peak} {peak_n} {samples}\n")


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

METRICS = [
    ("msgs_per_s", "msgs/s accepted", "{:.0f}"),
    ("cpu_per_1k", "CPU-s / 1,000 msgs", "{:.3f}"),
    ("mem_mib", "peak memory MiB", "{:.1f}"),
]
POSTFIX_EXTRA = [("cpu_per_1k_drain", "CPU-s / 1,000 incl. relay drain", "{:.3f}"),
                 ("drain_s", "extra s until queue empty", "{:.1f}")]
# the machine may be shared: CPU used by anything else during the run
OTHERS = [("others_pct", "other CPU use during run, %", "{:.0f}")]
MEM_NOTE = {
    "petrel": "peak memory = VmHWM of the petrel process",
    "postfix": "peak memory = peak of the summed PSS of all Postfix processes (sampled 0.5 s)",
}
TARGET_MSGS = 3000.0
TARGET_CPU = 0.3


def load_tsv(path):
    rows = []
    with open(path) as f:
        header = f.readline().rstrip("\n").split("\t")
        for line in f:
            if not line.strip():
                continue
            rec = dict(zip(header, line.rstrip("\n").split("\t")))
            for k, v in rec.items():
                if k not in ("scenario", "status"):
                    try:
                        rec[k] = float(v) if v not in ("", "-") else None
                    except ValueError:
                        pass
            rows.append(rec)
    return rows


def fmt(v, f):
    return "-" if v is None else f.format(v)


def cmd_report(tsv, out_json):
    rows = load_tsv(tsv)
    params = {k: os.environ.get(k) for k in
              ("BENCH_RUNS", "BENCH_MESSAGES", "BENCH_SESSIONS", "BENCH_SIZE")}
    result = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                    "clk_tck": CLK_TCK},
        "params": params,
        "scenarios": {},
        "ratios": {},
        "targets": {"msgs_per_s_min": TARGET_MSGS, "cpu_per_1k_max": TARGET_CPU},
    }
    failed = False
    medians = {}
    for scen in ("petrel", "postfix"):
        srows = [r for r in rows if r["scenario"] == scen]
        if not srows:
            continue
        metrics = METRICS + (POSTFIX_EXTRA if scen == "postfix" else []) + OTHERS
        title = ("A — receive path, petrel" if scen == "petrel"
                 else "B — Postfix 3.7 relay (context)")
        print(f"\nScenario {title}: {int(srows[0]['messages'])} msgs x "
              f"{int(srows[0]['size'])} B, one message per connection")
        print("  " + MEM_NOTE[scen])
        sc = result["scenarios"].setdefault(scen, {})
        for sess in sorted({int(r["sessions"]) for r in srows}):
            runs = [r for r in srows if int(r["sessions"]) == sess]
            ok = [r for r in runs if r["status"] == "ok"]
            cols = [f"run {int(r['run'])}" for r in runs] + ["median"]
            print(f"\n  sessions={sess}")
            print("  " + f"{'':34}" + "".join(f"{c:>12}" for c in cols))
            med = {}
            for key, label, f in metrics:
                vals = [r.get(key) for r in runs]
                good = [r.get(key) for r in ok if r.get(key) is not None]
                med[key] = statistics.median(good) if good else None
                cells = [fmt(v, f) if r["status"] == "ok" else "ERROR"
                         for v, r in zip(vals, runs)]
                print("  " + f"{label:34}" + "".join(f"{c:>12}" for c in cells)
                      + f"{fmt(med[key], f):>12}")
            for r in runs:
                if r["status"] != "ok":
                    failed = True
                    print(f"  run {int(r['run'])}: ERROR: {r['status']}")
            medians[(scen, sess)] = med
            sc[str(sess)] = {
                "runs": [{k: v for k, v in r.items() if k not in ("scenario",)} for r in runs],
                "median": med,
                "ok_runs": len(ok),
            }
    sessions = sorted({s for (_, s) in medians})
    have_ratio = False
    for sess in sessions:
        p, q = medians.get(("petrel", sess)), medians.get(("postfix", sess))
        if not p or not q:
            continue
        tp = (p["msgs_per_s"] / q["msgs_per_s"]
              if p["msgs_per_s"] and q["msgs_per_s"] else None)
        cpu = (q["cpu_per_1k"] / p["cpu_per_1k"]
               if p["cpu_per_1k"] and q["cpu_per_1k"] else None)
        mem = (q["mem_mib"] / p["mem_mib"] if p["mem_mib"] and q["mem_mib"] else None)
        if not have_ratio:
            print("\nRatios (medians)")
            print(f"  {'sessions':>8}  {'throughput petrel/Postfix':>26}"
                  f"  {'CPU Postfix/petrel':>19}  {'memory Postfix/petrel':>22}")
            have_ratio = True
        print(f"  {sess:>8}  {fmt(tp, '{:.2f}x'):>26}  {fmt(cpu, '{:.2f}x'):>19}"
              f"  {fmt(mem, '{:.2f}x'):>22}")
        result["ratios"][str(sess)] = {"throughput_petrel_over_postfix": tp,
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
    result["targets"]["met"] = targets
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
    elif cmd == "tarpit" and len(args) == 2:
        cmd_tarpit(int(args[0]), float(args[1]))
    elif cmd == "report" and len(args) == 2:
        return cmd_report(args[0], args[1])
    else:
        sys.exit(__doc__)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
