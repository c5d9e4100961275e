#!/bin/bash
# petrel benchmark harness (`make bench`); see bench/README.md.
#
# Scenario A: petrel's receive path (smtp-source -> petrel, durable spool).
# Scenario B: the Postfix reference relay, same load, for context.
# Each scenario runs BENCH_RUNS times per session count; medians are printed
# and everything is written to build-bench/results.json.
#
# Knobs: BENCH_RUNS (3) BENCH_MESSAGES (10000) BENCH_SESSIONS ("20 100")
#        BENCH_SIZE (4096) BENCH_SKIP_POSTFIX=1 BENCH_SKIP_PETREL=1
#        BENCH_PETREL_PORT (2625) BENCH_TARPIT_PORT (2627)
#        BENCH_PETREL_DELIVERY (park | none; see README)
#        BENCH_POSTFIX_DIR (/work/shared/bench/postfix)
#        BENCH_PETREL_BIN (a prebuilt petrel to measure instead of building one)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BUILD_DIR=$ROOT/build-bench
PY=/usr/bin/python3
LIB=("$PY" "$HERE/benchlib.py")

export BENCH_RUNS=${BENCH_RUNS:-3}
export BENCH_MESSAGES=${BENCH_MESSAGES:-10000}
export BENCH_SESSIONS=${BENCH_SESSIONS:-"20 100"}
export BENCH_SIZE=${BENCH_SIZE:-4096}
SKIP_POSTFIX=${BENCH_SKIP_POSTFIX:-0}
SKIP_PETREL=${BENCH_SKIP_PETREL:-0}
PETREL_PORT=${BENCH_PETREL_PORT:-2625}
TARPIT_PORT=${BENCH_TARPIT_PORT:-2627}
PETREL_DELIVERY=${BENCH_PETREL_DELIVERY:-park}
POSTFIX_DIR=${BENCH_POSTFIX_DIR:-/work/shared/bench/postfix}
POSTFIX_PORT=2525   # fixed by the reference master.cf
SINK_PORT=2526      # fixed by the reference main.cf (relayhost)

SENDER=bench@bench.test
RCPT=rcpt@dest.test
SOURCE_TIMEOUT=300  # seconds, per smtp-source invocation
NCPU=$(nproc)

# ------------------------------------------------------------------ helpers

say() { echo "[bench] $*" >&2; }
die() { say "error: $*"; exit 1; }

is_uint() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -gt 0 ]; }

# alive PID: the process exists and is not a zombie.
alive() {
    local st
    st=$(sed -E 's/.*\) (.).*/\1/' "/proc/$1/stat" 2>/dev/null) || return 1
    [ -n "$st" ] && [ "$st" != Z ]
}

listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

# wait_listen PORT SECONDS [PID]: until something listens on PORT (and PID lives).
wait_listen() {
    local port=$1 secs=$2 pid=${3:-} i
    for ((i = 0; i < secs * 10; i++)); do
        listening "$port" && return 0
        if [ -n "$pid" ] && ! alive "$pid"; then return 1; fi
        sleep 0.1
    done
    return 1
}

# stop_pid PID GRACE: SIGTERM, wait up to GRACE seconds, then SIGKILL. Only for
# processes this script started (they are our children, so `wait` reaps them
# and the PID cannot be reused meanwhile). Sets STOP_RC to the exit status.
# Never call it in a subshell: only this shell can reap its children.
STOP_RC=0
stop_pid() {
    local pid=$1 grace=$2 i rc=0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        alive "$pid" || break
        sleep 0.1
    done
    if alive "$pid"; then
        say "pid $pid did not exit within ${grace}s of SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    STOP_RC=$rc
}

now() { date +%s.%N; }
calc() { awk "BEGIN { printf \"%.6f\", $1 }"; }

PETREL_PID= TARPIT_PID= SINK_PID= SAMPLER_PID= POSTFIX_STARTED=0

# postfix_stop: `postfix stop`, then wait (bounded) until the master and all
# its processes have exited, since `postfix stop` returns before they have.
postfix_stop() {
    local master i pid pids=() left
    [ "$POSTFIX_STARTED" -eq 1 ] || return 0
    master=$(tr -d ' \n' <"${POSTFIX_QDIR:-/var/spool/postfix}/pid/master.pid" 2>/dev/null || true)
    [[ "$master" =~ ^[0-9]+$ ]] && mapfile -t pids < <("${LIB[@]}" tree "$master" 2>/dev/null)
    bash "$POSTFIX_DIR/ctl.sh" stop >/dev/null 2>&1 || true
    POSTFIX_STARTED=0
    for ((i = 0; i < 150; i++)); do
        left=0
        for pid in "${pids[@]}"; do
            if alive "$pid"; then left=1; break; fi
        done
        [ "$left" -eq 0 ] && return 0
        sleep 0.1
    done
    say "warning: Postfix processes still running 15 s after postfix stop"
}

cleanup() {
    local pid
    for pid in "$SAMPLER_PID" "$PETREL_PID" "$TARPIT_PID"; do
        [ -n "$pid" ] && alive "$pid" && stop_pid "$pid" 10
    done
    if [ "$POSTFIX_STARTED" -eq 1 ]; then
        say "stopping Postfix"
        postfix_stop
    fi
    [ -n "$SINK_PID" ] && alive "$SINK_PID" && stop_pid "$SINK_PID" 10
    SINK_PID=
    return 0
}
trap cleanup EXIT
trap 'say interrupted; exit 130' INT TERM

for v in BENCH_RUNS BENCH_MESSAGES BENCH_SIZE PETREL_PORT TARPIT_PORT; do
    is_uint "${!v}" || die "$v must be a positive integer (got '${!v}')"
done
for s in $BENCH_SESSIONS; do is_uint "$s" || die "BENCH_SESSIONS: bad value '$s'"; done
[ -n "${BENCH_SESSIONS// /}" ] || die "BENCH_SESSIONS is empty"
case $PETREL_DELIVERY in park|none) ;; *) die "BENCH_PETREL_DELIVERY must be park or none";; esac
[ "$BENCH_RUNS" -le 20 ] || die "BENCH_RUNS > 20 is not supported"

SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
[ -x "$SMTP_SOURCE" ] || die "smtp-source not found (make bench-deps installs postfix)"
[ -x "$PY" ] || die "$PY not found"

mkdir -p "$BUILD_DIR/logs"
TSV=$BUILD_DIR/results.tsv
printf 'scenario\tsessions\trun\tmessages\tsize\twall_s\tmsgs_per_s\tcpu_s\tcpu_per_1k\tmem_mib\tcpu_per_1k_drain\tdrain_s\tothers_pct\tstatus\n' >"$TSV"

# row SCENARIO SESSIONS RUN WALL CPU MEM_KIB CPU_DRAIN DRAIN OTHERS_PCT STATUS
row() {
    local scen=$1 sess=$2 run=$3 wall=$4 cpu=$5 mem=$6 cpud=$7 drain=$8 others=$9 status=${10}
    local rate=- per1k=- mib=- per1kd=-
    if [ "$wall" != - ]; then rate=$(calc "$BENCH_MESSAGES / $wall"); fi
    if [ "$cpu" != - ]; then per1k=$(calc "$cpu * 1000 / $BENCH_MESSAGES"); fi
    if [ "$mem" != - ]; then mib=$(calc "$mem / 1024"); fi
    if [ "$cpud" != - ]; then per1kd=$(calc "$cpud * 1000 / $BENCH_MESSAGES"); fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$scen" "$sess" \
        "$run" "$BENCH_MESSAGES" "$BENCH_SIZE" "$wall" "$rate" "$cpu" "$per1k" "$mib" "$per1kd" \
        "$drain" "$others" "${status//$'\t'/ }" >>"$TSV"
    say "$scen s=$sess run $run: $rate msgs/s, $per1k CPU-s/1k, $mib MiB: $status"
}

# smtp_source PORT SESSIONS COUNT OUTFILE: the load generator (one message per
# connection, smtp-source's default). Returns smtp-source's exit status; its
# own CPU time goes to OUTFILE.cpu ("user system", GNU time).
smtp_source() {
    local timecmd=()
    [ -x /usr/bin/time ] && timecmd=(/usr/bin/time -o "$4.cpu" -f '%U %S')
    timeout "$SOURCE_TIMEOUT" "${timecmd[@]}" "$SMTP_SOURCE" -s "$2" -m "$3" \
        -l "$BENCH_SIZE" -f "$SENDER" -t "$RCPT" "127.0.0.1:$1" >"$4" 2>&1
}

# others_pct BUSY0 BUSY1 WALL SERVER_CPU SOURCE_OUTFILE: share of the machine's
# CPU capacity used during the run by anything other than the server under
# test and smtp-source (other users of a shared machine; for Postfix also
# smtp-sink and the memory sampler). "-" if smtp-source's CPU is unknown.
others_pct() {
    local src
    src=$(tail -n 1 "$5.cpu" 2>/dev/null | awk 'NF == 2 { print $1 + $2 }')
    if [ -z "$src" ] || [ "$4" = - ]; then echo -; return; fi
    calc "($2 - $1 - $4 - $src) * 100 / ($3 * $NCPU)"
}

# ------------------------------------------------------------------ petrel

build_petrel() {
    say "building petrel (Release, -O2, no sanitizers) in $BUILD_DIR"
    if ! { cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DPETREL_TESTS=OFF \
               -DPETREL_SANITIZE=OFF -DPETREL_FUZZ=OFF \
               -DCMAKE_C_FLAGS=-O2 -DCMAKE_C_FLAGS_RELEASE="-O2 -DNDEBUG" &&
           cmake --build "$BUILD_DIR" -j2 --target petrel; } >"$BUILD_DIR/build.log" 2>&1; then
        tail -n 30 "$BUILD_DIR/build.log" >&2
        die "petrel build failed (full log: $BUILD_DIR/build.log)"
    fi
    PETREL=$BUILD_DIR/petrel
    [ -x "$PETREL" ] || die "no $PETREL after the build"
}

# petrel_config SPOOL LEVEL OUT: instantiate bench/petrel-bench.yaml.
petrel_config() {
    sed -e "s|@SPOOL@|$1|g" -e "s|@LOG_LEVEL@|$2|g" -e "s|@PORT@|$PETREL_PORT|g" \
        "$HERE/petrel-bench.yaml" >"$3"
    if [ "$PETREL_DELIVERY" = park ]; then
        cat >>"$3" <<EOF
# Deliveries are parked on a silent local listener so that the run measures
# the receive path only (see bench/README.md).
routes:
  - domain: dest.test
    via: smtp:[127.0.0.1]:$TARPIT_PORT
EOF
    fi
}

# Checks once that the generated config is accepted; falls back to no route
# if this petrel does not know `routes` yet.
check_petrel_config() {
    local dir out
    dir=$(mktemp -d "$BUILD_DIR/check-XXXXXX")
    petrel_config "$dir/spool" warning "$dir/petrel.yaml"
    if ! out=$("$PETREL" check-config -c "$dir/petrel.yaml" 2>&1); then
        if [ "$PETREL_DELIVERY" = park ]; then
            say "petrel check-config rejected the config with a parking route:"
            say "  $out"
            say "retrying without it (deliveries will go wherever petrel sends them)"
            PETREL_DELIVERY=none
            petrel_config "$dir/spool" warning "$dir/petrel.yaml"
            out=$("$PETREL" check-config -c "$dir/petrel.yaml" 2>&1) ||
                say "petrel check-config still fails ($out); trying serve anyway"
        else
            say "petrel check-config fails ($out); trying serve anyway"
        fi
    fi
    rm -rf "$dir"
}

# petrel_run SESSIONS RUN
petrel_run() {
    local sess=$1 run=$2 dir cfg log status=ok wall=- cpu=- hwm=- src_rc=0 rc t0 t1 c0 c1
    local b0 b1 others
    local qlast n
    dir=$(mktemp -d "$BUILD_DIR/spool-XXXXXX")
    cfg=$dir/petrel.yaml
    log=$BUILD_DIR/logs/petrel-s$sess-r$run.log
    mkdir -p "$dir/spool"
    petrel_config "$dir/spool" warning "$cfg"

    listening "$PETREL_PORT" && die "port $PETREL_PORT is already in use"
    if [ "$PETREL_DELIVERY" = park ]; then
        listening "$TARPIT_PORT" && die "port $TARPIT_PORT is already in use"
        "${LIB[@]}" tarpit "$TARPIT_PORT" 900 &
        TARPIT_PID=$!
        wait_listen "$TARPIT_PORT" 10 "$TARPIT_PID" || die "tarpit did not start"
    fi

    "$PETREL" serve -c "$cfg" 2>"$log" &
    PETREL_PID=$!
    if ! wait_listen "$PETREL_PORT" 15 "$PETREL_PID"; then
        tail -n 20 "$log" >&2
        die "petrel did not listen on 127.0.0.1:$PETREL_PORT within 15 s (log: $log)"
    fi

    c0=$("${LIB[@]}" cpu "$PETREL_PID")
    b0=$("${LIB[@]}" sysbusy)
    t0=$(now)
    smtp_source "$PETREL_PORT" "$sess" "$BENCH_MESSAGES" "$dir/smtp-source.out" || src_rc=$?
    t1=$(now)
    b1=$("${LIB[@]}" sysbusy)
    if alive "$PETREL_PID"; then
        c1=$("${LIB[@]}" cpu "$PETREL_PID")
        hwm=$("${LIB[@]}" hwm "$PETREL_PID")
        cpu=$(calc "$c1 - $c0")
    else
        status="petrel died during the run (log: $log)"
    fi
    wall=$(calc "$t1 - $t0")
    others=$(others_pct "$b0" "$b1" "$wall" "$cpu" "$dir/smtp-source.out")
    if [ "$src_rc" -ne 0 ]; then
        status="smtp-source exit $src_rc: $(tail -n 1 "$dir/smtp-source.out" | tr -d '\r')"
    fi

    stop_pid "$PETREL_PID" 60
    rc=$STOP_RC
    PETREL_PID=
    if [ -n "$TARPIT_PID" ]; then
        stop_pid "$TARPIT_PID" 10
        TARPIT_PID=
    fi
    if [ "$status" = ok ] && [ "$rc" -ne 0 ]; then
        status="petrel exited with status $rc after SIGTERM (log: $log)"
    fi

    # Every accepted message must be in the queue afterwards.
    if [ "$status" = ok ]; then
        if ! timeout 120 "$PETREL" queue list -c "$cfg" >"$dir/queue.txt" 2>&1; then
            status="petrel queue list failed: $(tail -n 1 "$dir/queue.txt")"
        else
            qlast=$(tail -n 1 "$dir/queue.txt")
            if [[ "$qlast" =~ ^--\ ([0-9]+)\ messages? ]]; then
                n=${BASH_REMATCH[1]}
            elif [[ "$qlast" == "Queue is empty"* ]]; then
                n=0
            else
                n=
                status="cannot parse petrel queue list summary: '$qlast'"
            fi
            if [ -n "$n" ] && [ "$n" -ne "$BENCH_MESSAGES" ]; then
                status="lost messages: $n queued, $BENCH_MESSAGES sent"
            fi
        fi
    fi
    [ -s "$log" ] && say "petrel logged $(wc -l <"$log") line(s) at level warning: $log"

    if [ "$status" = ok ]; then
        rm -rf "$dir"
    else
        say "keeping $dir for inspection"
    fi
    row petrel "$sess" "$run" "$wall" "$cpu" "$hwm" - - "$others" "$status"
}

# ------------------------------------------------------------------ Postfix

POSTFIX_QDIR= POSTFIX_LOG=

queue_files() {
    find "$POSTFIX_QDIR/maildrop" "$POSTFIX_QDIR/incoming" "$POSTFIX_QDIR/active" \
        "$POSTFIX_QDIR/deferred" "$POSTFIX_QDIR/hold" -type f 2>/dev/null | wc -l
}

# wait_drain SECONDS: until the Postfix queue is empty (read from the queue
# directories, so no Postfix process is involved in the check).
wait_drain() {
    local i
    for ((i = 0; i < $1 * 5; i++)); do
        [ "$(queue_files)" -eq 0 ] && return 0
        sleep 0.2
    done
    return 1
}

log_size() { stat -c %s "$POSTFIX_LOG" 2>/dev/null || echo 0; }

# log_count OFFSET REGEX: matching lines in the Postfix log after OFFSET bytes.
log_count() {
    { tail -c +"$(($1 + 1))" "$POSTFIX_LOG" 2>/dev/null || true; } | grep -cE "$2" || true
}

postfix_setup() {
    [ -x "$POSTFIX_DIR/ctl.sh" ] || die "no Postfix reference setup at $POSTFIX_DIR"
    command -v postfix >/dev/null || die "postfix is not installed (make bench-deps)"
    [ -x "$SMTP_SINK" ] || die "smtp-sink not found"
    if postfix status >/dev/null 2>&1 || listening "$POSTFIX_PORT"; then
        die "Postfix (or something on port $POSTFIX_PORT) is already running; stop it first" \
            "(bash $POSTFIX_DIR/ctl.sh stop)"
    fi
    listening "$SINK_PORT" && die "port $SINK_PORT is already in use"
    POSTFIX_QDIR=$(postconf -h queue_directory)
    if [ "$(queue_files)" -ne 0 ]; then
        die "the Postfix queue in $POSTFIX_QDIR is not empty; the benchmark needs an" \
            "empty queue (inspect with postqueue -p, empty with postsuper -d ALL)"
    fi
    local user=()
    [ "$(id -u)" -eq 0 ] && user=(-u nobody)  # smtp-sink refuses to run as root
    "$SMTP_SINK" "${user[@]}" -c "127.0.0.1:$SINK_PORT" 1000 >"$BUILD_DIR/logs/smtp-sink.out" 2>&1 &
    SINK_PID=$!
    wait_listen "$SINK_PORT" 10 "$SINK_PID" || die "smtp-sink did not start"
}

# postfix_run SESSIONS RUN
postfix_run() {
    local sess=$1 run=$2 dir master status=ok src_rc=0 wall=- cpu=- cpud=- drain=- mem=-
    local t0 t1 t2 c0 c1 c2 off n_in n_sent i b0 b1 others
    dir=$(mktemp -d "$BUILD_DIR/postfix-XXXXXX")

    # Fresh Postfix for every run, then a 500-message warm-up (README of the
    # reference setup: idle smtpd processes left over skew the next figure).
    POSTFIX_STARTED=1
    bash "$POSTFIX_DIR/ctl.sh" restart >"$dir/ctl.out" 2>&1 ||
        { cat "$dir/ctl.out" >&2; die "Postfix did not start"; }
    POSTFIX_QDIR=$(postconf -h queue_directory)
    POSTFIX_LOG=$(postconf -h maillog_file)
    master=$(tr -d ' \n' <"$POSTFIX_QDIR/pid/master.pid")
    alive "$master" || die "no Postfix master process ($master)"

    if ! smtp_source "$POSTFIX_PORT" "$sess" 500 "$dir/warmup.out"; then
        cat "$dir/warmup.out" >&2
        die "Postfix warm-up failed"
    fi
    wait_drain 120 || die "Postfix did not relay the warm-up messages within 120 s"
    sleep 1  # let postlogd write the warm-up's last lines
    off=$(log_size)

    read -r c0 _ < <("${LIB[@]}" treecpu "$master")
    "${LIB[@]}" pss-sample "$master" "$dir/pss" 0.5 900 &
    SAMPLER_PID=$!
    b0=$("${LIB[@]}" sysbusy)
    t0=$(now)
    smtp_source "$POSTFIX_PORT" "$sess" "$BENCH_MESSAGES" "$dir/smtp-source.out" || src_rc=$?
    t1=$(now)
    read -r c1 _ < <("${LIB[@]}" treecpu "$master")
    b1=$("${LIB[@]}" sysbusy)
    stop_pid "$SAMPLER_PID" 10
    SAMPLER_PID=
    wall=$(calc "$t1 - $t0")
    cpu=$(calc "$c1 - $c0")
    others=$(others_pct "$b0" "$b1" "$wall" "$cpu" "$dir/smtp-source.out")
    [ -s "$dir/pss" ] && read -r mem _ <"$dir/pss"
    if [ "$src_rc" -ne 0 ]; then
        status="smtp-source exit $src_rc: $(tail -n 1 "$dir/smtp-source.out" | tr -d '\r')"
    fi

    # Context: the relay work still queued when smtp-source finished.
    if wait_drain 300; then
        t2=$(now)
        read -r c2 _ < <("${LIB[@]}" treecpu "$master")
        cpud=$(calc "$c2 - $c0")
        drain=$(calc "$t2 - $t1")
    elif [ "$status" = ok ]; then
        status="Postfix queue not empty 300 s after the run"
    fi

    # Verify from the Postfix log: every message accepted (cleanup saw it)
    # and relayed to the sink.
    if [ "$status" = ok ]; then
        for ((i = 0; i < 50; i++)); do
            n_in=$(log_count "$off" 'postfix/cleanup\[[0-9]+\]: [0-9A-Za-z]+: message-id=')
            n_sent=$(log_count "$off" "to=<$RCPT>, relay=.*status=sent")
            [ "$n_in" -ge "$BENCH_MESSAGES" ] && [ "$n_sent" -ge "$BENCH_MESSAGES" ] && break
            sleep 0.2
        done
        if [ "$n_in" -ne "$BENCH_MESSAGES" ] || [ "$n_sent" -ne "$BENCH_MESSAGES" ]; then
            status="Postfix log shows $n_in accepted, $n_sent relayed of $BENCH_MESSAGES"
        fi
    fi

    if [ "$status" = ok ]; then
        rm -rf "$dir"
    else
        say "keeping $dir for inspection"
    fi
    row postfix "$sess" "$run" "$wall" "$cpu" "$mem" "$cpud" "$drain" "$others" "$status"
}

# ------------------------------------------------------------------ main

say "messages=$BENCH_MESSAGES size=$BENCH_SIZE sessions=($BENCH_SESSIONS) runs=$BENCH_RUNS" \
    "cpus=$(nproc)"

# The machine may be shared and its load drift during the benchmark, so the
# two scenarios are interleaved (petrel run 1, Postfix run 1, petrel run 2, …)
# rather than run one after the other: both then see the same conditions.
if [ "$SKIP_PETREL" != 1 ]; then
    if [ -n "${BENCH_PETREL_BIN:-}" ]; then
        PETREL=$BENCH_PETREL_BIN
        [ -x "$PETREL" ] || die "BENCH_PETREL_BIN=$PETREL is not executable"
        say "using the prebuilt $PETREL (BENCH_PETREL_BIN; no build)"
    else
        build_petrel
    fi
    check_petrel_config
    say "Scenario A: petrel receive path on 127.0.0.1:$PETREL_PORT" \
        "(deliveries: $PETREL_DELIVERY)"
fi
if [ "$SKIP_POSTFIX" != 1 ]; then
    say "Scenario B: Postfix on 127.0.0.1:$POSTFIX_PORT relaying to smtp-sink on :$SINK_PORT"
    postfix_setup
fi
for sess in $BENCH_SESSIONS; do
    for ((run = 1; run <= BENCH_RUNS; run++)); do
        if [ "$SKIP_PETREL" != 1 ]; then
            petrel_run "$sess" "$run"
        fi
        if [ "$SKIP_POSTFIX" != 1 ]; then
            postfix_run "$sess" "$run"
            postfix_stop  # no idle Postfix processes during the next petrel run
        fi
    done
done
cleanup

report_rc=0
"${LIB[@]}" report "$TSV" "$BUILD_DIR/results.json" || report_rc=$?
exit "$report_rc"
