#!/bin/bash
# petrel benchmark harness (`make bench`); see bench/README.md.
#
# BENCH_MODE=receive: petrel's receive path (deliveries parked) against the
#   Postfix reference relay, same load (scenarios A and B).
# BENCH_MODE=relay: end to end, smtp-source -> server -> smtp-sink, petrel
#   routing dest.test to the same smtp-sink Postfix relays to; the sink's own
#   counter says when every message has arrived.
# BENCH_MODE=milter: relay with and without one pass-through milter
#   (bench/passthrough_milter.c) for both servers: what consulting a filter
#   costs. `bash bench/run.sh milter` is the same.
# BENCH_MODE=hooks: petrel relaying with no hooks, with a Lua policy
#   (bench/policy.lua: connect, rcpt_to, select_source) and with the policy
#   plus the header_stamp plugin: what the hooks cost (petrel only).
# BENCH_MODE=tls: relay with STARTTLS on both hops, petrel and Postfix:
#   bench/tls_load.py -> server -> bench/tls_sink.c (smtp-source and
#   smtp-sink cannot do TLS), certificates made for the run.
# BENCH_MODE=all (default): all five. Postfix does the same work in the
#   receive and relay scenarios (it always relays to the sink), so where a
#   receive and a relay workload coincide one Postfix run gives the figures
#   for both tables.
# Each workload runs BENCH_RUNS times, petrel and Postfix interleaved; medians
# are printed and everything is written to build-bench/results.json.
#
# Knobs: BENCH_MODE (all) BENCH_RUNS (3)
#        receive: BENCH_MESSAGES (10000) BENCH_SESSIONS ("20 100") BENCH_SIZE (4096)
#                 BENCH_PETREL_DELIVERY (park | none; see README) BENCH_TARPIT_PORT (2627)
#        relay:   BENCH_RELAY ("10000:4096:20 10000:4096:100 2000:102400:20",
#                 MESSAGES:SIZE:SESSIONS each)
#                 BENCH_RELAY_CONNECTIONS (20) BENCH_RELAY_PER_CONNECTION (100)
#                 BENCH_RELAY_CACHE_TIME (2s) BENCH_RELAY_TIMEOUT (300)
#        milter:  BENCH_MILTER ("2000:4096:20", MESSAGES:SIZE:SESSIONS each)
#                 BENCH_MILTER_PORT (2628)
#        hooks:   BENCH_HOOKS ("10000:4096:20", MESSAGES:SIZE:SESSIONS each)
#                 BENCH_CHECK_PORT (2630) BENCH_PLUGIN (header_stamp.so of the build)
#        tls:     BENCH_TLS ("5000:4096:20", MESSAGES:SIZE:SESSIONS each)
#                 BENCH_TLS_SINK_PORT (2629) BENCH_TLS_KEY (rsa | ec)
#                 BENCH_TLS_PROCS (2) BENCH_TLS_LOG_LEVEL (info)
#                 BENCH_TLS_POSTFIX_REUSE (yes | no: smtp_tls_connection_reuse)
#        BENCH_SKIP_POSTFIX=1 BENCH_SKIP_PETREL=1 BENCH_PETREL_PORT (2625)
#        BENCH_PETREL_LOG_LEVEL (warning) BENCH_POSTFIX_DIR (/work/shared/bench/postfix)
#        BENCH_PETREL_BIN (a prebuilt petrel to measure instead of building one)
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
BUILD_DIR=$ROOT/build-bench
PY=/usr/bin/python3
LIB=("$PY" "$HERE/benchlib.py")

case ${1:-} in
    '') ;;
    receive|relay|milter|hooks|tls|all) BENCH_MODE=$1 ;;
    *) echo "usage: $0 [receive|relay|milter|hooks|tls|all]  (see bench/README.md)" >&2; exit 2 ;;
esac
export BENCH_MODE=${BENCH_MODE:-all}
export BENCH_RUNS=${BENCH_RUNS:-3}
export BENCH_MESSAGES=${BENCH_MESSAGES:-10000}
export BENCH_SESSIONS=${BENCH_SESSIONS:-"20 100"}
export BENCH_SIZE=${BENCH_SIZE:-4096}
export BENCH_RELAY=${BENCH_RELAY:-"10000:4096:20 10000:4096:100 2000:102400:20"}
export BENCH_MILTER=${BENCH_MILTER:-"2000:4096:20"}
MILTER_PORT=${BENCH_MILTER_PORT:-2628}
export BENCH_HOOKS=${BENCH_HOOKS:-"10000:4096:20"}
CHECK_PORT=${BENCH_CHECK_PORT:-2630}
export BENCH_TLS=${BENCH_TLS:-"5000:4096:20"}
TLS_SINK_PORT=${BENCH_TLS_SINK_PORT:-2629}
TLS_KEY=${BENCH_TLS_KEY:-rsa}
TLS_PROCS=${BENCH_TLS_PROCS:-2}
TLS_LOG_LEVEL=${BENCH_TLS_LOG_LEVEL:-info}
TLS_POSTFIX_REUSE=${BENCH_TLS_POSTFIX_REUSE:-yes}
export BENCH_TLS_KEY=$TLS_KEY BENCH_TLS_PROCS=$TLS_PROCS BENCH_TLS_POSTFIX_REUSE=$TLS_POSTFIX_REUSE
SKIP_POSTFIX=${BENCH_SKIP_POSTFIX:-0}
SKIP_PETREL=${BENCH_SKIP_PETREL:-0}
PETREL_PORT=${BENCH_PETREL_PORT:-2625}
TARPIT_PORT=${BENCH_TARPIT_PORT:-2627}
PETREL_DELIVERY=${BENCH_PETREL_DELIVERY:-park}
PETREL_LOG_LEVEL=${BENCH_PETREL_LOG_LEVEL:-warning}
RELAY_CONNECTIONS=${BENCH_RELAY_CONNECTIONS:-20}
RELAY_PER_CONNECTION=${BENCH_RELAY_PER_CONNECTION:-100}
RELAY_CACHE_TIME=${BENCH_RELAY_CACHE_TIME:-2s}
RELAY_TIMEOUT=${BENCH_RELAY_TIMEOUT:-300}  # s after smtp-source ends for the sink to have all
POSTFIX_DIR=${BENCH_POSTFIX_DIR:-/work/shared/bench/postfix}
POSTFIX_PORT=2525   # fixed by the reference master.cf
PLAIN_SINK_PORT=2526  # fixed by the reference main.cf (relayhost)
SINK_PORT=$PLAIN_SINK_PORT  # the sink in use (sink_use): smtp-sink, or the TLS sink

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

PETREL_PID='' TARPIT_PID='' SINK_PID='' SAMPLER_PID='' WATCH_PID='' MILTER_PID=''
PLAIN_SINK_PID='' TLS_SINK_PID='' CHECK_PID=''
POSTFIX_STARTED=0
PLAIN_SINK_OUT=$BUILD_DIR/logs/smtp-sink.out
TLS_SINK_OUT=$BUILD_DIR/logs/tls-sink.out
SINK_OUT=$PLAIN_SINK_OUT
CHECK_OUT=$BUILD_DIR/logs/check-sink.jsonl
TLS_DIR=$BUILD_DIR/tls
LOAD=smtp  # the load generator in use (load_run): smtp (smtp-source) or tls (tls_load.py)
MILTER_COUNT=$BUILD_DIR/logs/milter.count

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
    for pid in "$WATCH_PID" "$SAMPLER_PID" "$PETREL_PID" "$TARPIT_PID"; do
        [ -n "$pid" ] && alive "$pid" && stop_pid "$pid" 10
    done
    WATCH_PID='' SAMPLER_PID='' PETREL_PID='' TARPIT_PID=''
    if [ "$POSTFIX_STARTED" -eq 1 ]; then
        say "stopping Postfix"
        postfix_stop
    fi
    for pid in "$PLAIN_SINK_PID" "$TLS_SINK_PID" "$CHECK_PID"; do
        [ -n "$pid" ] && alive "$pid" && stop_pid "$pid" 10
    done
    SINK_PID='' PLAIN_SINK_PID='' TLS_SINK_PID='' CHECK_PID=''
    # libmilter winds down slowly on SIGTERM; the filter holds no state
    [ -n "$MILTER_PID" ] && alive "$MILTER_PID" && stop_pid "$MILTER_PID" 2
    MILTER_PID=
    return 0
}
trap cleanup EXIT
trap 'say interrupted; exit 130' INT TERM

for v in BENCH_RUNS BENCH_MESSAGES BENCH_SIZE PETREL_PORT TARPIT_PORT RELAY_CONNECTIONS \
         RELAY_PER_CONNECTION RELAY_TIMEOUT MILTER_PORT CHECK_PORT TLS_SINK_PORT TLS_PROCS; do
    is_uint "${!v}" || die "$v must be a positive integer (got '${!v}')"
done
case $BENCH_MODE in receive|relay|milter|hooks|tls|all) ;;
    *) die "BENCH_MODE must be receive, relay, milter, hooks, tls or all";; esac
want_mode() { [ "$BENCH_MODE" = all ] || [ "$BENCH_MODE" = "$1" ]; }
if want_mode receive; then
    for s in $BENCH_SESSIONS; do is_uint "$s" || die "BENCH_SESSIONS: bad value '$s'"; done
    [ -n "${BENCH_SESSIONS// /}" ] || die "BENCH_SESSIONS is empty"
fi
if want_mode relay; then
    [ -n "${BENCH_RELAY// /}" ] || die "BENCH_RELAY is empty"
    for w in $BENCH_RELAY; do
        [[ "$w" =~ ^[1-9][0-9]*:[1-9][0-9]*:[1-9][0-9]*$ ]] ||
            die "BENCH_RELAY: '$w' is not MESSAGES:SIZE:SESSIONS"
    done
fi
for m in MILTER HOOKS TLS; do
    want_mode "${m,,}" || continue
    v=BENCH_$m
    [ -n "${!v// /}" ] || die "$v is empty"
    for w in ${!v}; do
        [[ "$w" =~ ^[1-9][0-9]*:[1-9][0-9]*:[1-9][0-9]*$ ]] ||
            die "$v: '$w' is not MESSAGES:SIZE:SESSIONS"
    done
done
case $TLS_KEY in rsa|ec) ;; *) die "BENCH_TLS_KEY must be rsa or ec";; esac
case $TLS_POSTFIX_REUSE in yes|no) ;; *) die "BENCH_TLS_POSTFIX_REUSE must be yes or no";; esac
case $TLS_LOG_LEVEL in error|warning|info|debug) ;;
    *) die "BENCH_TLS_LOG_LEVEL must be error, warning, info or debug";; esac
[[ "$RELAY_CACHE_TIME" =~ ^[0-9]+(ms|s|m)$ ]] || die "BENCH_RELAY_CACHE_TIME: bad duration"
case $PETREL_DELIVERY in park|none) ;; *) die "BENCH_PETREL_DELIVERY must be park or none";; esac
case $PETREL_LOG_LEVEL in error|warning|info|debug) ;;
    *) die "BENCH_PETREL_LOG_LEVEL must be error, warning, info or debug";; esac
[ "$BENCH_RUNS" -le 20 ] || die "BENCH_RUNS > 20 is not supported"

SMTP_SOURCE=$(command -v smtp-source || echo /usr/sbin/smtp-source)
SMTP_SINK=$(command -v smtp-sink || echo /usr/sbin/smtp-sink)
[ -x "$SMTP_SOURCE" ] || die "smtp-source not found (make bench-deps installs postfix)"
[ -x "$PY" ] || die "$PY not found"

mkdir -p "$BUILD_DIR/logs"
TSV=$BUILD_DIR/results.tsv
printf '%s\t' scenario server messages size sessions run wall_s msgs_per_s cpu_s cpu_per_1k \
    mem_mib relay_s relay_msgs_per_s relay_cpu_s relay_cpu_per_1k relay_mem_mib \
    cpu_per_1k_drain drain_s others_pct relay_others_pct sink_count sink_sessions \
    milter_cpu_s milter_msgs load_cpu_s tls_in tls_out tls_out_resumed log_tls log_resumed >"$TSV"
printf 'status\n' >>"$TSV"

# per1k CPU MESSAGES / rate MESSAGES SECONDS / mib KIB: "-" stays "-".
per1k() { if [ "$1" = - ]; then echo -; else calc "$1 * 1000 / $2"; fi; }
rate() { if [ "$2" = - ]; then echo -; else calc "$1 / $2"; fi; }
mib() { if [ "$1" = - ]; then echo -; else calc "$1 / 1024"; fi; }

# r0 / r3 NUMBER: rounded for the progress lines ("-" stays "-").
r0() { if [ "$1" = - ]; then echo -; else printf '%.0f' "$1"; fi; }
r3() { if [ "$1" = - ]; then echo -; else printf '%.3f' "$1"; fi; }

# row: one line of results.tsv from the caller's variables (bash's dynamic
# scoping): scen server msgs size sess run wall cpu mem relay rcpu rmem cpud
# drain others rothers sinkn sinks status, and for the milter scenario mcpu
# (the filter's CPU over the run) and mmsgs (messages it saw), for the TLS
# scenario tin (inbound handshakes: the load generator's), tout / tres
# (handshakes at the TLS sink / of which resumed), ltls / lres (petrel's
# "tls established" log lines / of which resumed=yes; Postfix: its "TLS
# connection established to" lines, resumption not logged), and for every
# run lcpu (the load generator's CPU while it ran). CPU in seconds, memory
# in KiB.
row() {
    local r_rate r_per1k r_mib rr_rate rr_per1k rr_mib r_per1kd
    r_rate=$(rate "$msgs" "$wall")
    r_per1k=$(per1k "$cpu" "$msgs")
    r_mib=$(mib "$mem")
    rr_rate=$(rate "$msgs" "$relay")
    rr_per1k=$(per1k "$rcpu" "$msgs")
    rr_mib=$(mib "$rmem")
    r_per1kd=$(per1k "$cpud" "$msgs")
    printf '%s\t' "$scen" "$server" "$msgs" "$size" "$sess" "$run" "$wall" "$r_rate" "$cpu" \
        "$r_per1k" "$r_mib" "$relay" "$rr_rate" "$rcpu" "$rr_per1k" "$rr_mib" "$r_per1kd" \
        "$drain" "$others" "$rothers" "$sinkn" "$sinks" "${mcpu:--}" "${mmsgs:--}" \
        "${lcpu:--}" "${tin:--}" "${tout:--}" "${tres:--}" "${ltls:--}" "${lres:--}" >>"$TSV"
    printf '%s\n' "${status//$'\t'/ }" >>"$TSV"
    local what
    what="$server $scen ${msgs}x${size}B s=$sess run $run: $(r0 "$r_rate") msgs/s accepted"
    if [ "$relay" != - ]; then
        what+=", $(r0 "$rr_rate") msgs/s relayed, $(r3 "$rr_per1k") CPU-s/1k relayed"
    else
        what+=", $(r3 "$r_per1k") CPU-s/1k"
    fi
    say "$what: $status"
}

# smtp_source PORT SESSIONS COUNT SIZE OUTFILE: the load generator (one message
# per connection, smtp-source's default). Returns smtp-source's exit status;
# its own CPU time goes to OUTFILE.cpu ("user system", GNU time).
smtp_source() {
    local timecmd=()
    [ -x /usr/bin/time ] && timecmd=(/usr/bin/time -o "$5.cpu" -f '%U %S')
    timeout "$SOURCE_TIMEOUT" "${timecmd[@]}" "$SMTP_SOURCE" -s "$2" -m "$3" \
        -l "$4" -f "$SENDER" -t "$RCPT" "127.0.0.1:$1" >"$5" 2>&1
}

# tls_source PORT CONNECTIONS COUNT SIZE OUTFILE: the TLS load generator
# (bench/tls_load.py: one message per connection, STARTTLS on each, in
# TLS_PROCS processes). As smtp_source; its summary also goes to OUTFILE.json.
tls_source() {
    local timecmd=()
    [ -x /usr/bin/time ] && timecmd=(/usr/bin/time -o "$5.cpu" -f '%U %S')
    timeout "$SOURCE_TIMEOUT" "${timecmd[@]}" "$PY" "$HERE/tls_load.py" -n "$3" -c "$2" \
        -P "$TLS_PROCS" -l "$4" -f "$SENDER" -t "$RCPT" --timeout $((SOURCE_TIMEOUT - 20)) \
        --json "$5.json" "127.0.0.1:$1" >"$5" 2>&1
}

# load_run PORT SESSIONS COUNT SIZE OUTFILE: the load generator in use (LOAD).
load_run() {
    if [ "$LOAD" = tls ]; then tls_source "$@"; else smtp_source "$@"; fi
}

# source_cpu OUTFILE: smtp-source's CPU seconds, or "" if unknown.
source_cpu() {
    tail -n 1 "$1.cpu" 2>/dev/null | awk 'NF == 2 { print $1 + $2 }'
}

# others_pct BUSY0 BUSY1 WALL SERVER_CPU SOURCE_OUTFILE: share of the machine's
# CPU capacity used during the run by anything other than the server under
# test and smtp-source (other users of a shared machine; for Postfix also
# smtp-sink and the memory sampler). "-" if smtp-source's CPU is unknown.
others_pct() {
    local src
    src=$(source_cpu "$5")
    if [ -z "$src" ] || [ "$4" = - ]; then echo -; return; fi
    calc "($2 - $1 - $4 - $src) * 100 / ($3 * $NCPU)"
}

# ------------------------------------------------------------------ the sink

# One smtp-sink for the whole benchmark, on Postfix's relayhost port: Postfix
# relays to it and petrel's relay runs route dest.test to it. With -c it
# prints a running message counter; runs take the difference.
sink_start() {
    [ -x "$SMTP_SINK" ] || die "smtp-sink not found"
    listening "$SINK_PORT" && die "port $SINK_PORT is already in use"
    local user=()
    [ "$(id -u)" -eq 0 ] && user=(-u nobody)  # smtp-sink refuses to run as root
    "$SMTP_SINK" "${user[@]}" -c "127.0.0.1:$SINK_PORT" 1000 >"$SINK_OUT" 2>&1 &
    SINK_PID=$!
    PLAIN_SINK_PID=$SINK_PID
    wait_listen "$SINK_PORT" 10 "$SINK_PID" || die "smtp-sink did not start"
}

# tls_certs: a CA and a server certificate for 127.0.0.1 / bench.petrel.test,
# made afresh for every invocation (openssl CLI) in $TLS_DIR; RSA 2048 or
# ECDSA P-256 keys (BENCH_TLS_KEY). petrel, Postfix's smtpd and the TLS sink
# all serve the same certificate; petrel's and Postfix's delivery trust the CA.
tls_certs() {
    local newkey=(-newkey rsa:2048)
    [ "$TLS_KEY" = ec ] && newkey=(-newkey ec -pkeyopt ec_paramgen_curve:P-256)
    rm -rf "$TLS_DIR"
    mkdir -p "$TLS_DIR"
    printf '%s\n' "subjectAltName=DNS:bench.petrel.test,DNS:localhost,IP:127.0.0.1" \
        "extendedKeyUsage=serverAuth" >"$TLS_DIR/ext.cnf"
    if ! { openssl req -x509 "${newkey[@]}" -nodes -keyout "$TLS_DIR/ca.key" \
               -out "$TLS_DIR/ca.pem" -days 7 -subj "/CN=petrel bench CA" &&
           openssl req -new "${newkey[@]}" -nodes -keyout "$TLS_DIR/server.key" \
               -out "$TLS_DIR/server.csr" -subj "/CN=bench.petrel.test" &&
           openssl x509 -req -in "$TLS_DIR/server.csr" -CA "$TLS_DIR/ca.pem" \
               -CAkey "$TLS_DIR/ca.key" -CAcreateserial -out "$TLS_DIR/server.pem" -days 7 \
               -extfile "$TLS_DIR/ext.cnf"; } >"$BUILD_DIR/logs/tls-certs.log" 2>&1; then
        cat "$BUILD_DIR/logs/tls-certs.log" >&2
        die "cannot make the TLS certificates"
    fi
    chmod 600 "$TLS_DIR/ca.key" "$TLS_DIR/server.key"
}

# The TLS scenario's receiving MTA (bench/tls_sink.c): STARTTLS, counts like
# smtp-sink -c plus handshakes and resumed handshakes, on 127.0.0.1:$TLS_SINK_PORT.
tls_sink_start() {
    local bin=$BUILD_DIR/tls_sink
    if ! cc -O2 -Wall -o "$bin" "$HERE/tls_sink.c" -lssl -lcrypto -lpthread \
            >"$BUILD_DIR/logs/tls-sink-build.log" 2>&1; then
        cat "$BUILD_DIR/logs/tls-sink-build.log" >&2
        die "cannot build bench/tls_sink.c (libssl-dev)"
    fi
    listening "$TLS_SINK_PORT" && die "port $TLS_SINK_PORT (the TLS sink) is already in use"
    "$bin" -l "127.0.0.1:$TLS_SINK_PORT" -c "$TLS_DIR/server.pem" -k "$TLS_DIR/server.key" \
        -o "$TLS_SINK_OUT" -t 7200 >"$BUILD_DIR/logs/tls-sink.err" 2>&1 &
    TLS_SINK_PID=$!
    wait_listen "$TLS_SINK_PORT" 10 "$TLS_SINK_PID" || die "the TLS sink did not start"
}

# sink_use plain|tls: the sink the next runs relay to (SINK_PORT, SINK_OUT,
# SINK_PID are what the relay functions watch).
sink_use() {
    if [ "$1" = tls ]; then
        SINK_PORT=$TLS_SINK_PORT SINK_OUT=$TLS_SINK_OUT SINK_PID=$TLS_SINK_PID
    else
        SINK_PORT=$PLAIN_SINK_PORT SINK_OUT=$PLAIN_SINK_OUT SINK_PID=$PLAIN_SINK_PID
    fi
}

# The hooks scenario's recording sink (benchlib check-sink) for the spot
# checks: petrel routes check.test to it.
check_sink_start() {
    listening "$CHECK_PORT" && die "port $CHECK_PORT (the check sink) is already in use"
    rm -f "$CHECK_OUT"
    "${LIB[@]}" check-sink "$CHECK_PORT" "$CHECK_OUT" 7200 \
        >"$BUILD_DIR/logs/check-sink.err" 2>&1 &
    CHECK_PID=$!
    wait_listen "$CHECK_PORT" 10 "$CHECK_PID" || die "the check sink did not start"
}

sink_check() { alive "$SINK_PID" || die "the sink (pid $SINK_PID) has died: $SINK_OUT"; }
sink_counts() { "${LIB[@]}" sinkcount "$SINK_OUT"; }  # "MESSAGES SESSIONS"
tls_sink_counts() { "${LIB[@]}" tlssinkcount "$TLS_SINK_OUT"; }  # "HANDSHAKES RESUMED"
sink_count() { sink_counts | cut -d' ' -f1; }

# sink_idle SECONDS: until no connection to the sink is open (the sink counts
# a session when it ends, so connections a server keeps cached would be
# counted in whichever run they happen to end in). Bounded; 1 on timeout.
sink_idle() {
    local i
    for ((i = 0; i < $1 * 10; i++)); do
        if ! ss -Htn state established state close-wait "( sport = :$SINK_PORT )" 2>/dev/null |
            grep -q .; then
            sleep 0.1  # the sink's counter line follows the close
            return 0
        fi
        sleep 0.1
    done
    return 1
}

# watch_start TARGET KIND PID OUT: the relay watcher (benchlib relay-watch):
# notes time and CPU the moment the sink's counter reaches TARGET.
watch_start() {
    local i
    rm -f "$4" "$4.ready"
    "${LIB[@]}" relay-watch "$SINK_OUT" "$1" $((SOURCE_TIMEOUT + RELAY_TIMEOUT + 60)) \
        "$2" "$3" "$SINK_PID" "$4" &
    WATCH_PID=$!
    for ((i = 0; i < 100; i++)); do
        [ -e "$4.ready" ] && return 0
        alive "$WATCH_PID" || break
        sleep 0.05
    done
    die "the relay watcher did not start"
}

# watch_wait SECONDS: until the watcher has finished (the sink has everything)
# or SECONDS have passed; then it is stopped. Returns its exit status.
watch_wait() {
    local i
    for ((i = 0; i < $1 * 10; i++)); do
        alive "$WATCH_PID" || break
        sleep 0.1
    done
    stop_pid "$WATCH_PID" 5
    WATCH_PID=
    return "$STOP_RC"
}

# relay_figures OUT T0 C0 B0 S0 SOURCE_OUTFILE: from the watcher's output sets
# relay (s), rcpu (server CPU s), rothers (other CPU %), or returns 1.
relay_figures() {
    local t c b sc self n src
    read -r t c b sc self n <"$1" 2>/dev/null || return 1
    [ "$t" = timeout ] && return 1
    relay=$(calc "$t - $2")
    if [ "$c" != - ]; then rcpu=$(calc "$c - $3"); fi
    src=$(source_cpu "$6")
    if [ -n "$src" ] && [ "$rcpu" != - ] && [ "$sc" != - ]; then
        rothers=$(calc "($b - $4 - $rcpu - $src - ($sc - $5) - $self) * 100 / ($relay * $NCPU)")
    fi
    return 0
}

# ------------------------------------------------------------------ the milter

# One pass-through libmilter filter (bench/passthrough_milter.c) for the whole
# milter scenario, on 127.0.0.1:$MILTER_PORT; both servers use it. It writes
# the number of messages it has seen to $MILTER_COUNT.
milter_start() {
    local bin=$BUILD_DIR/passthrough_milter
    [ -e /usr/include/libmilter/mfapi.h ] ||
        die "libmilter headers missing (Debian: libmilter-dev; make deps installs it)"
    if ! cc -O2 -o "$bin" "$HERE/passthrough_milter.c" -lmilter -lpthread \
            >"$BUILD_DIR/logs/milter-build.log" 2>&1; then
        cat "$BUILD_DIR/logs/milter-build.log" >&2
        die "cannot build bench/passthrough_milter.c"
    fi
    listening "$MILTER_PORT" && die "port $MILTER_PORT (the milter) is already in use"
    "$bin" -s "inet:$MILTER_PORT@127.0.0.1" -c "$MILTER_COUNT" \
        >"$BUILD_DIR/logs/milter.out" 2>&1 &
    MILTER_PID=$!
    wait_listen "$MILTER_PORT" 10 "$MILTER_PID" || die "the pass-through milter did not start"
}

milter_check() { alive "$MILTER_PID" || die "the milter (pid $MILTER_PID) has died"; }
milter_count() { local n; n=$(tr -dc '0-9' <"$MILTER_COUNT" 2>/dev/null); echo $((10#${n:-0})); }

# milter_figures C0 M0 MSGS: after a run with the milter, sets mcpu (its CPU
# since C0) and mmsgs (messages it saw since M0), and fails the run (status)
# unless it saw exactly MSGS.
milter_figures() {
    local c1 m1
    if ! alive "$MILTER_PID"; then
        [ "$status" = ok ] && status="the milter died during the run"
        return 0
    fi
    c1=$("${LIB[@]}" cpu "$MILTER_PID")
    mcpu=$(calc "$c1 - $1")
    m1=$(milter_count)
    mmsgs=$((m1 - $2))
    if [ "$status" = ok ] && [ "$mmsgs" -ne "$3" ]; then
        status="the milter saw $mmsgs of $3 messages (is it consulted?)"
    fi
    return 0
}

# ------------------------------------------------------------------ petrel

build_petrel() {
    say "building petrel (Release, -O2, no sanitizers) in $BUILD_DIR"
    if ! { cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DPETREL_TESTS=OFF \
               -DPETREL_SANITIZE=OFF -DPETREL_FUZZ=OFF \
               -DCMAKE_C_FLAGS=-O2 -DCMAKE_C_FLAGS_RELEASE="-O2 -DNDEBUG" &&
           cmake --build "$BUILD_DIR" -j2 --target petrel plugin_header_stamp; } \
            >"$BUILD_DIR/build.log" 2>&1; then
        tail -n 30 "$BUILD_DIR/build.log" >&2
        die "petrel build failed (full log: $BUILD_DIR/build.log)"
    fi
    PETREL=$BUILD_DIR/petrel
    [ -x "$PETREL" ] || die "no $PETREL after the build"
}

# petrel_config SPOOL DELIVERY OUT: instantiate bench/petrel-bench.yaml;
# DELIVERY is park (route to the silent listener), none, relay (route to
# the sink with the delivery settings of the relay scenario), relay-milter
# (the same with the pass-through milter), hooks-none / hooks-lua /
# hooks-plugin (relay, plus a route for the spot checks, plus the Lua policy
# / and the header_stamp plugin), or tls (STARTTLS on the listener, relay
# to the TLS sink with delivery.tls required).
petrel_config() {
    local level=$PETREL_LOG_LEVEL sink=$PLAIN_SINK_PORT ltls=none dtls=none check_route=''
    [ "$2" = tls ] && level=$TLS_LOG_LEVEL sink=$TLS_SINK_PORT ltls=starttls dtls=required
    [[ "$2" == hooks-* ]] &&
        check_route=$'\n  - domain: check.test\n    via: smtp:[127.0.0.1]:'"$CHECK_PORT"
    sed -e "s|@SPOOL@|$1|g" -e "s|@LOG_LEVEL@|$level|g" -e "s|@LISTENER_TLS@|$ltls|g" \
        -e "s|@PORT@|$PETREL_PORT|g" "$HERE/petrel-bench.yaml" >"$3"
    if [ "$2" = tls ]; then
        cat >>"$3" <<EOF
# The TLS scenario: STARTTLS on the listener with the run's certificate;
# deliveries require TLS (delivery.tls below) and verify against the run's
# CA (SSL_CERT_FILE in petrel's environment).
tls:
  cert: $TLS_DIR/server.pem
  key: $TLS_DIR/server.key
EOF
    fi
    case $2 in
    park)
        cat >>"$3" <<EOF
# Deliveries are parked on a silent local listener so that the run measures
# the receive path only (see bench/README.md).
routes:
  - domain: dest.test
    via: smtp:[127.0.0.1]:$TARPIT_PORT
EOF
        ;;
    relay|relay-milter|hooks-*|tls)
        cat >>"$3" <<EOF
# End-to-end relay: dest.test goes to the smtp-sink Postfix relays to
# (see bench/README.md). TLS off on both sides, as in the Postfix setup
# (the TLS scenario: the TLS sink, TLS required); source address 127.0.0.1
# like Postfix's (petrel's default would pick one of the machine's
# non-loopback addresses). The hooks scenario's spot checks go to check.test.
routes:
  - domain: dest.test
    via: smtp:[127.0.0.1]:$sink$check_route
delivery:
  max_connections_per_destination: $RELAY_CONNECTIONS
  max_messages_per_connection: $RELAY_PER_CONNECTION
  connection_cache_time: $RELAY_CACHE_TIME
  tls: $dtls
  source_ips: [127.0.0.1]
EOF
        if [ "$2" = hooks-lua ] || [ "$2" = hooks-plugin ]; then
            cat >>"$3" <<EOF
# The hooks scenario: the benchmark's Lua policy (connect, rcpt_to,
# select_source; PETREL_BENCH_SOURCE_IP in petrel's environment).
lua:
  script: $HERE/policy.lua
EOF
        fi
        if [ "$2" = hooks-plugin ]; then
            cat >>"$3" <<EOF
plugins:
  - path: $PLUGIN
    config: { name: X-Bench, value: "%{queue_id}" }
EOF
        fi
        if [ "$2" = relay-milter ]; then
            cat >>"$3" <<EOF
# The milter scenario: one pass-through filter, consulted at every stage;
# tempfail if it fails, so that a broken filter shows as failed messages.
milters:
  - name: passthrough
    socket: inet:$MILTER_PORT@127.0.0.1
    default_action: tempfail
EOF
        fi
        ;;
    esac
}

# Checks once that the generated configs are accepted; for the receive path
# falls back to no route if this petrel does not know `routes` yet.
check_petrel_config() {
    local dir out
    dir=$(mktemp -d "$BUILD_DIR/check-XXXXXX")
    if want_mode receive; then
        petrel_config "$dir/spool" "$PETREL_DELIVERY" "$dir/petrel.yaml"
        if ! out=$("$PETREL" check-config -c "$dir/petrel.yaml" 2>&1); then
            if [ "$PETREL_DELIVERY" = park ]; then
                say "petrel check-config rejected the config with a parking route:"
                say "  $out"
                say "retrying without it (deliveries will go wherever petrel sends them)"
                PETREL_DELIVERY=none
                petrel_config "$dir/spool" none "$dir/petrel.yaml"
                out=$("$PETREL" check-config -c "$dir/petrel.yaml" 2>&1) ||
                    say "petrel check-config still fails ($out); trying serve anyway"
            else
                say "petrel check-config fails ($out); trying serve anyway"
            fi
        fi
    fi
    if want_mode relay || want_mode milter; then
        petrel_config "$dir/spool" relay "$dir/petrel.yaml"
        out=$("$PETREL" check-config -c "$dir/petrel.yaml" 2>&1) ||
            { rm -rf "$dir"; die "petrel rejects the relay configuration: $out"; }
    fi
    if want_mode milter; then
        petrel_config "$dir/spool" relay-milter "$dir/petrel.yaml"
        out=$("$PETREL" check-config -c "$dir/petrel.yaml" 2>&1) ||
            { rm -rf "$dir"; die "petrel rejects the milter configuration: $out"; }
    fi
    if want_mode hooks; then
        [ -r "$PLUGIN" ] || die "no header_stamp plugin at $PLUGIN (BENCH_PLUGIN)"
        for k in hooks-none hooks-lua hooks-plugin; do
            petrel_config "$dir/spool" "$k" "$dir/petrel.yaml"
            out=$("$PETREL" check-config -c "$dir/petrel.yaml" 2>&1) ||
                { rm -rf "$dir"; die "petrel rejects the $k configuration: $out"; }
        done
    fi
    if want_mode tls; then
        petrel_config "$dir/spool" tls "$dir/petrel.yaml"
        out=$("$PETREL" check-config -c "$dir/petrel.yaml" 2>&1) ||
            { rm -rf "$dir"; die "petrel rejects the TLS configuration: $out"; }
    fi
    rm -rf "$dir"
}

# petrel_queue CFG OUTFILE: sets qn to the number of queued messages after
# `petrel queue list` (daemon stopped), or returns 1 with status set.
petrel_queue() {
    local qlast
    if ! timeout 120 "$PETREL" queue list -c "$1" >"$2" 2>&1; then
        status="petrel queue list failed: $(tail -n 1 "$2")"
        return 1
    fi
    qlast=$(tail -n 1 "$2")
    if [[ "$qlast" =~ ^--\ ([0-9]+)\ messages? ]]; then
        qn=${BASH_REMATCH[1]}
    elif [[ "$qlast" == "Queue is empty"* ]]; then
        qn=0
    else
        status="cannot parse petrel queue list summary: '$qlast'"
        return 1
    fi
}

# petrel_receive MESSAGES SIZE SESSIONS RUN: scenario A, the receive path
# with deliveries parked; every accepted message must still be queued.
petrel_receive() {
    local msgs=$1 size=$2 sess=$3 run=$4 scen=receive server=petrel
    local dir cfg log status=ok wall=- cpu=- mem=- src_rc=0 rc t0 t1 c0 c1 b0 b1 others qn
    local relay=- rcpu=- rmem=- cpud=- drain=- rothers=- sinkn=- sinks=-
    dir=$(mktemp -d "$BUILD_DIR/spool-XXXXXX")
    cfg=$dir/petrel.yaml
    log=$BUILD_DIR/logs/petrel-receive-${msgs}x$size-s$sess-r$run.log
    mkdir -p "$dir/spool"
    petrel_config "$dir/spool" "$PETREL_DELIVERY" "$cfg"

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
    smtp_source "$PETREL_PORT" "$sess" "$msgs" "$size" "$dir/smtp-source.out" || src_rc=$?
    t1=$(now)
    b1=$("${LIB[@]}" sysbusy)
    if alive "$PETREL_PID"; then
        c1=$("${LIB[@]}" cpu "$PETREL_PID")
        mem=$("${LIB[@]}" hwm "$PETREL_PID")
        cpu=$(calc "$c1 - $c0")
    else
        status="petrel died during the run (log: $log)"
    fi
    wall=$(calc "$t1 - $t0")
    others=$(others_pct "$b0" "$b1" "$wall" "$cpu" "$dir/smtp-source.out")
    local lcpu
    lcpu=$(source_cpu "$dir/smtp-source.out")
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
    if [ "$status" = ok ] && petrel_queue "$cfg" "$dir/queue.txt"; then
        [ "$qn" -ne "$msgs" ] && status="lost messages: $qn queued, $msgs sent"
    fi
    [ -s "$log" ] && say "petrel logged $(wc -l <"$log") line(s) at level $PETREL_LOG_LEVEL: $log"

    if [ "$status" = ok ]; then
        rm -rf "$dir"
    else
        say "keeping $dir for inspection"
    fi
    row
}

# petrel_relay MESSAGES SIZE SESSIONS RUN [SCENARIO]: end to end, petrel
# relaying to the sink; the sink must count exactly MESSAGES more and the
# queue must be empty. SCENARIO: relay (default), relay-nomilter (the same,
# as the milter scenario's baseline), relay-milter (with the pass-through
# milter, which must see every message), hooks-none / hooks-lua /
# hooks-plugin (the hooks scenario: plus the spot checks of
# `benchlib.py hooks-check` before petrel is stopped), or tls (the TLS
# scenario: LOAD=tls and sink_use tls are the caller's; handshakes counted).
petrel_relay() {
    local msgs=$1 size=$2 sess=$3 run=$4 scen=${5:-relay} server=petrel
    local dir cfg log status=ok wall=- cpu=- mem=- src_rc=0 rc t0 t1 c0 c1 b0 b1 s0 others qn
    local relay=- rcpu=- rmem=- cpud=- drain=- rothers=- sinkn=- sinks=- base sbase n sn
    local mcpu=- mmsgs=- mc0=0 mm0=0 kind=$scen level=$PETREL_LOG_LEVEL check
    local lcpu=- tin=- tout=- tres=- ltls=- lres=- th0=0 tr0=0 th1 tr1 nin
    local envs=("PETREL_BENCH_SOURCE_IP=$MACHINE_IP") loader=smtp-source
    [ "$scen" = relay-nomilter ] && kind=relay
    local loff=0 i
    if [ "$scen" = tls ]; then
        level=$TLS_LOG_LEVEL loader=tls_load.py
        envs+=("SSL_CERT_FILE=$TLS_DIR/ca.pem")
    fi
    dir=$(mktemp -d "$BUILD_DIR/spool-XXXXXX")
    cfg=$dir/petrel.yaml
    log=$BUILD_DIR/logs/petrel-$scen-${msgs}x$size-s$sess-r$run.log
    mkdir -p "$dir/spool"
    petrel_config "$dir/spool" "$kind" "$cfg"
    if [ "$kind" = relay-milter ]; then
        milter_check
        mc0=$("${LIB[@]}" cpu "$MILTER_PID")
        mm0=$(milter_count)
    fi

    listening "$PETREL_PORT" && die "port $PETREL_PORT is already in use"
    sink_check
    read -r base sbase < <(sink_counts)
    env "${envs[@]}" "$PETREL" serve -c "$cfg" 2>"$log" &
    PETREL_PID=$!
    if ! wait_listen "$PETREL_PORT" 15 "$PETREL_PID"; then
        tail -n 20 "$log" >&2
        die "petrel did not listen on 127.0.0.1:$PETREL_PORT within 15 s (log: $log)"
    fi
    if [ "$scen" = tls ]; then
        # The same 500-message warm-up as Postfix gets: both servers start the
        # measured run with their TLS client session cache filled (and every
        # connection to the sink closed again).
        load_run "$PETREL_PORT" "$sess" 500 "$size" "$dir/warmup.out" ||
            { cat "$dir/warmup.out" >&2; die "petrel TLS warm-up failed"; }
        for ((i = 0; i < 600; i++)); do
            [ "$(sink_count)" -ge $((base + 500)) ] && break
            sleep 0.1
        done
        sink_idle 15 || say "warning: petrel keeps connections to the sink open after the warm-up"
        read -r base sbase < <(sink_counts)
        read -r th0 tr0 < <(tls_sink_counts)
        loff=$(stat -c %s "$log")
    fi

    watch_start $((base + msgs)) cpu "$PETREL_PID" "$dir/watch"
    c0=$("${LIB[@]}" cpu "$PETREL_PID")
    s0=$("${LIB[@]}" cpu "$SINK_PID")
    b0=$("${LIB[@]}" sysbusy)
    t0=$(now)
    load_run "$PETREL_PORT" "$sess" "$msgs" "$size" "$dir/smtp-source.out" || src_rc=$?
    t1=$(now)
    b1=$("${LIB[@]}" sysbusy)
    if alive "$PETREL_PID"; then
        c1=$("${LIB[@]}" cpu "$PETREL_PID")
        mem=$("${LIB[@]}" hwm "$PETREL_PID")
        cpu=$(calc "$c1 - $c0")
    else
        status="petrel died during the run (log: $log)"
    fi
    wall=$(calc "$t1 - $t0")
    others=$(others_pct "$b0" "$b1" "$wall" "$cpu" "$dir/smtp-source.out")
    lcpu=$(source_cpu "$dir/smtp-source.out")
    if [ "$src_rc" -ne 0 ]; then
        status="$loader exit $src_rc: $(tail -n 1 "$dir/smtp-source.out" | tr -d '\r')"
    fi

    # Until the sink has them all (not worth waiting for if some were not accepted).
    if [ "$status" = ok ]; then
        watch_wait "$RELAY_TIMEOUT" || true
        if relay_figures "$dir/watch" "$t0" "$c0" "$b0" "$s0" "$dir/smtp-source.out"; then
            alive "$PETREL_PID" && rmem=$("${LIB[@]}" hwm "$PETREL_PID")
        elif alive "$PETREL_PID"; then
            status="relay incomplete: the sink got $(($(sink_count) - base)) of $msgs"
            status+=" within ${RELAY_TIMEOUT}s after $loader ended (log: $log)"
        else
            status="petrel died while relaying (log: $log)"
        fi
    else
        watch_wait 0 || true
    fi

    # The hooks scenario: are the hooks really there? (after the measurement)
    if [ "$status" = ok ] && [[ "$scen" == hooks-* ]]; then
        if check=$("${LIB[@]}" hooks-check "$PETREL_PORT" "$CHECK_OUT" "${scen#hooks-}" \
                       "$MACHINE_IP" 30 2>&1); then
            say "$check"
        else
            status="spot check failed: $check"
        fi
    fi

    # A moment for late duplicates, then stop; afterwards nothing can reach the sink.
    [ "$status" = ok ] && sleep 1
    if [ -n "$PETREL_PID" ]; then
        stop_pid "$PETREL_PID" 60
        rc=$STOP_RC
        PETREL_PID=
        if [ "$status" = ok ] && [ "$rc" -ne 0 ]; then
            status="petrel exited with status $rc after SIGTERM (log: $log)"
        fi
    fi
    sink_idle 10 || say "warning: connections to the sink still open after petrel exited"
    read -r n sn < <(sink_counts)
    sinkn=$((n - base))
    sinks=$((sn - sbase))
    if [ "$status" = ok ] && [ "$sinkn" -ne "$msgs" ]; then
        status="the sink got $sinkn messages, $msgs were sent"
    fi
    [ "$kind" = relay-milter ] && milter_figures "$mc0" "$mm0" "$msgs"
    if [ "$scen" = tls ]; then
        # handshakes: inbound as the load generator counted them, outbound
        # as the TLS sink did, and outbound as petrel logged them
        tin=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["handshakes"])' \
                  "$dir/smtp-source.out.json" 2>/dev/null || echo -)
        read -r th1 tr1 < <(tls_sink_counts)
        tout=$((th1 - th0))
        tres=$((tr1 - tr0))
        ltls=$(tail -c +$((loff + 1)) "$log" | grep -c 'tls established: relay=' || true)
        lres=$(tail -c +$((loff + 1)) "$log" | grep 'tls established: relay=' |
                   grep -c 'resumed=yes' || true)
        nin=$(tail -c +$((loff + 1)) "$log" | grep -c ' starttls: session=' || true)
        if [ "$level" = info ] || [ "$level" = debug ]; then
            [ "$ltls" -ne "$tout" ] &&
                say "warning: petrel logged $ltls outbound handshakes, the TLS sink counted $tout"
            [ "$tin" != - ] && [ "$nin" -ne "$tin" ] &&
                say "warning: petrel logged $nin inbound STARTTLS, the load generator counted $tin"
        else
            ltls=- lres=-
        fi
        say "petrel TLS: $tin inbound handshakes; outbound $tout at the sink ($tres resumed)," \
            "petrel's log: $ltls ($lres resumed=yes)"
    fi

    # Nothing may be left behind in the queue.
    if petrel_queue "$cfg" "$dir/queue.txt"; then
        if [ "$qn" -ne 0 ]; then
            local q="$qn message(s) still queued after SIGTERM ($dir/queue.txt)"
            if [ "$status" = ok ]; then status=$q; else status+="; $q"; fi
        fi
    fi
    [ -s "$log" ] && say "petrel logged $(wc -l <"$log") line(s) at level $level: $log"

    if [ "$status" = ok ]; then
        rm -rf "$dir"
    else
        say "keeping $dir for inspection"
    fi
    row
}

# ------------------------------------------------------------------ Postfix

POSTFIX_QDIR='' POSTFIX_LOG=''

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
    if postfix status >/dev/null 2>&1 || listening "$POSTFIX_PORT"; then
        die "Postfix (or something on port $POSTFIX_PORT) is already running; stop it first" \
            "(bash $POSTFIX_DIR/ctl.sh stop)"
    fi
    POSTFIX_QDIR=$(postconf -h queue_directory)
    if [ "$(queue_files)" -ne 0 ]; then
        die "the Postfix queue in $POSTFIX_QDIR is not empty; the benchmark needs an" \
            "empty queue (inspect with postqueue -p, empty with postsuper -d ALL)"
    fi
}

# postfix_run SCENARIO MESSAGES SIZE SESSIONS RUN: the reference relay.
# SCENARIO (receive, relay or receive+relay) only says which tables the run
# belongs to: Postfix always relays to the sink, and every run records the
# receive figures (CPU and memory while smtp-source runs, drain until the
# queue is empty) and the relay figures (until the sink has every message).
postfix_run() {
    local scen=$1 msgs=$2 size=$3 sess=$4 run=$5 server=postfix
    local dir master status=ok src_rc=0 wall=- cpu=- cpud=- drain=- mem=- others
    local relay=- rcpu=- rmem=- rothers=- sinkn=- sinks=- base sbase n sn
    local t0 t1 t2 c0 c1 c2 s0 off n_in n_sent i b0 b1 mcpu=- mmsgs=- mc0=0 mm0=0
    local lcpu=- tin=- tout=- tres=- ltls=- lres=- th0=0 tr0=0 th1 tr1 loader=smtp-source
    dir=$(mktemp -d "$BUILD_DIR/postfix-XXXXXX")
    sink_check
    if [ "$scen" = tls ]; then
        loader=tls_load.py
        # every run starts with an empty client session cache, as petrel's
        rm -f "$(postconf -h data_directory)"/smtp_scache.*
    fi

    # Fresh Postfix for every run, then a 500-message warm-up (README of the
    # reference setup: idle smtpd processes left over skew the next figure).
    POSTFIX_STARTED=1
    bash "$POSTFIX_DIR/ctl.sh" restart >"$dir/ctl.out" 2>&1 ||
        { cat "$dir/ctl.out" >&2; die "Postfix did not start"; }
    POSTFIX_QDIR=$(postconf -h queue_directory)
    POSTFIX_LOG=$(postconf -h maillog_file)
    master=$(tr -d ' \n' <"$POSTFIX_QDIR/pid/master.pid")
    alive "$master" || die "no Postfix master process ($master)"
    if [ "$scen" = relay-milter ]; then
        # The reference main.cf has no milter (ctl.sh reinstalls it at the next
        # restart); smtpd processes started after the reload use the filter.
        milter_check
        postconf -e "smtpd_milters = inet:127.0.0.1:$MILTER_PORT" \
            "milter_default_action = tempfail" "milter_protocol = 6" ||
            die "postconf smtpd_milters failed"
        postfix reload >>"$dir/ctl.out" 2>&1 || die "postfix reload failed"
        sleep 1
    fi
    if [ "$scen" = tls ]; then
        # STARTTLS offered on the receiving side, required on the sending side
        # (to the TLS sink), with the client session cache; see bench/README.md.
        postconf -e "relayhost = [127.0.0.1]:$TLS_SINK_PORT" \
            "smtpd_tls_security_level = may" \
            "smtpd_tls_cert_file = $TLS_DIR/server.pem" \
            "smtpd_tls_key_file = $TLS_DIR/server.key" \
            "smtp_tls_security_level = encrypt" \
            "smtp_tls_session_cache_database = btree:\${data_directory}/smtp_scache" \
            "smtp_tls_CAfile = $TLS_DIR/ca.pem" \
            "smtp_tls_connection_reuse = $TLS_POSTFIX_REUSE" \
            "smtp_tls_loglevel = 1" || die "postconf (TLS) failed"
        if [ "$TLS_POSTFIX_REUSE" = yes ]; then
            # TLS connection reuse goes through tlsproxy(8), which the reference
            # master.cf leaves commented out
            postconf -M "tlsproxy/unix = tlsproxy unix - - n - 0 tlsproxy" ||
                die "postconf -M tlsproxy failed"
        fi
        postfix reload >>"$dir/ctl.out" 2>&1 || die "postfix reload failed"
        sleep 1
    fi

    if ! load_run "$POSTFIX_PORT" "$sess" 500 "$size" "$dir/warmup.out"; then
        cat "$dir/warmup.out" >&2
        die "Postfix warm-up failed"
    fi
    wait_drain 120 || die "Postfix did not relay the warm-up messages within 120 s"
    sleep 1  # let postlogd write the warm-up's last lines
    # Postfix caches idle connections to the sink for 2 s (its default).
    sink_idle 15 || say "warning: Postfix keeps connections to the sink open after the warm-up"
    off=$(log_size)
    read -r base sbase < <(sink_counts)
    if [ "$scen" = relay-milter ]; then
        mc0=$("${LIB[@]}" cpu "$MILTER_PID")
        mm0=$(milter_count)
    fi
    [ "$scen" = tls ] && read -r th0 tr0 < <(tls_sink_counts)

    watch_start $((base + msgs)) treecpu "$master" "$dir/watch"
    read -r c0 _ < <("${LIB[@]}" treecpu "$master")
    s0=$("${LIB[@]}" cpu "$SINK_PID")
    "${LIB[@]}" pss-sample "$master" "$dir/pss" 0.5 900 &
    SAMPLER_PID=$!
    b0=$("${LIB[@]}" sysbusy)
    t0=$(now)
    load_run "$POSTFIX_PORT" "$sess" "$msgs" "$size" "$dir/smtp-source.out" || src_rc=$?
    t1=$(now)
    read -r c1 _ < <("${LIB[@]}" treecpu "$master")
    b1=$("${LIB[@]}" sysbusy)
    kill -USR1 "$SAMPLER_PID" 2>/dev/null || true  # peak memory while accepting
    wall=$(calc "$t1 - $t0")
    cpu=$(calc "$c1 - $c0")
    others=$(others_pct "$b0" "$b1" "$wall" "$cpu" "$dir/smtp-source.out")
    lcpu=$(source_cpu "$dir/smtp-source.out")
    if [ "$src_rc" -ne 0 ]; then
        status="$loader exit $src_rc: $(tail -n 1 "$dir/smtp-source.out" | tr -d '\r')"
    fi

    # Until the sink has every message.
    if [ "$status" = ok ]; then
        watch_wait "$RELAY_TIMEOUT" || true
        if ! relay_figures "$dir/watch" "$t0" "$c0" "$b0" "$s0" "$dir/smtp-source.out"; then
            status="relay incomplete: the sink got $(($(sink_count) - base)) of $msgs"
            status+=" within ${RELAY_TIMEOUT}s after $loader ended"
        fi
    else
        watch_wait 0 || true
    fi
    stop_pid "$SAMPLER_PID" 10
    SAMPLER_PID=
    for i in 1 2 3 4 5 6 7 8 9 10; do [ -s "$dir/pss.mark" ] && break; sleep 0.1; done
    [ -s "$dir/pss.mark" ] && read -r mem _ <"$dir/pss.mark"
    [ -s "$dir/pss" ] && read -r rmem _ <"$dir/pss"

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
    # and relayed to the sink; and from the sink: exactly as many arrived.
    if [ "$status" = ok ]; then
        for ((i = 0; i < 50; i++)); do
            n_in=$(log_count "$off" 'postfix/cleanup\[[0-9]+\]: [0-9A-Za-z]+: message-id=')
            n_sent=$(log_count "$off" "to=<$RCPT>, relay=.*status=sent")
            [ "$n_in" -ge "$msgs" ] && [ "$n_sent" -ge "$msgs" ] && break
            sleep 0.2
        done
        if [ "$n_in" -ne "$msgs" ] || [ "$n_sent" -ne "$msgs" ]; then
            status="Postfix log shows $n_in accepted, $n_sent relayed of $msgs"
        fi
    fi
    # Stopped, so that every connection it used has ended and been counted.
    postfix_stop
    # Back to the reference main.cf (as ctl.sh installs it): no milter or TLS
    # settings left behind.
    if [ "$scen" = relay-milter ] || [ "$scen" = tls ]; then
        install -m 644 "$POSTFIX_DIR/main.cf" /etc/postfix/main.cf
        install -m 644 "$POSTFIX_DIR/master.cf" /etc/postfix/master.cf
    fi
    if [ "$scen" = tls ]; then
        tin=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["handshakes"])' \
                  "$dir/smtp-source.out.json" 2>/dev/null || echo -)
        read -r th1 tr1 < <(tls_sink_counts)
        tout=$((th1 - th0))
        tres=$((tr1 - tr0))
        # with connection reuse tlsproxy makes the connections (and smtp logs
        # them again); without, smtp does
        local who=smtp
        [ "$TLS_POSTFIX_REUSE" = yes ] && who=tlsproxy
        ltls=$(log_count "$off" "postfix/$who\[[0-9]+\]: .*TLS connection established to ")
        say "Postfix TLS: $tin inbound handshakes; outbound $tout at the sink ($tres resumed)," \
            "its log: $ltls outbound TLS connections"
    fi
    sink_idle 10 || say "warning: connections to the sink still open after postfix stop"
    read -r n sn < <(sink_counts)
    sinkn=$((n - base))
    sinks=$((sn - sbase))
    if [ "$status" = ok ] && [ "$sinkn" -ne "$msgs" ]; then
        status="the sink got $sinkn messages, $msgs were sent"
    fi
    [ "$scen" = relay-milter ] && milter_figures "$mc0" "$mm0" "$msgs"

    if [ "$status" = ok ]; then
        rm -rf "$dir"
    else
        say "keeping $dir for inspection"
    fi
    row
}

# ------------------------------------------------------------------ main

# The workloads, in order: the receive scenario's (BENCH_MESSAGES x BENCH_SIZE
# for each of BENCH_SESSIONS), then the relay scenario's (BENCH_RELAY) that are
# not already among them, then the milter scenario's (BENCH_MILTER), the
# hooks scenario's (BENCH_HOOKS) and the TLS scenario's (BENCH_TLS). Each is
# MESSAGES:SIZE:SESSIONS:SCENARIO.
WORKLOADS=()
relay_has() { [[ " $BENCH_RELAY " == *" $1 "* ]]; }
if want_mode receive; then
    for s in $BENCH_SESSIONS; do
        w=$BENCH_MESSAGES:$BENCH_SIZE:$s
        if [ "$BENCH_MODE" = all ] && relay_has "$w"; then
            WORKLOADS+=("$w:receive+relay")
        else
            WORKLOADS+=("$w:receive")
        fi
    done
fi
if want_mode relay; then
    for w in $BENCH_RELAY; do
        dup=0
        for x in "${WORKLOADS[@]}"; do [ "${x%:*}" = "$w" ] && dup=1; done
        [ "$dup" -eq 0 ] && WORKLOADS+=("$w:relay")
    done
fi
if want_mode milter; then
    for w in $BENCH_MILTER; do WORKLOADS+=("$w:milter"); done
fi
if want_mode hooks && [ "$SKIP_PETREL" != 1 ]; then  # petrel only
    for w in $BENCH_HOOKS; do WORKLOADS+=("$w:hooks"); done
fi
if want_mode tls; then
    for w in $BENCH_TLS; do WORKLOADS+=("$w:tls"); done
fi
[ "${#WORKLOADS[@]}" -gt 0 ] || die "nothing to run (BENCH_MODE=$BENCH_MODE, BENCH_SKIP_*)"

# The machine's own address (the hooks scenario's policy makes the spot
# check's mail leave from it: select_source with an address that is not
# petrel's default 127.0.0.1); 127.0.0.1 if it has none.
MACHINE_IP=$(ip -4 -o addr show scope global 2>/dev/null | awk '{ sub("/.*", "", $4); print $4; exit }')
MACHINE_IP=${MACHINE_IP:-127.0.0.1}

say "mode=$BENCH_MODE runs=$BENCH_RUNS cpus=$NCPU loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
say "workloads (messages:size:sessions:scenario): ${WORKLOADS[*]}"

if [ "$SKIP_PETREL" != 1 ]; then
    if [ -n "${BENCH_PETREL_BIN:-}" ]; then
        PETREL=$BENCH_PETREL_BIN
        [ -x "$PETREL" ] || die "BENCH_PETREL_BIN=$PETREL is not executable"
        say "using the prebuilt $PETREL (BENCH_PETREL_BIN; no build)"
    else
        build_petrel
    fi
    PLUGIN=${BENCH_PLUGIN:-$(dirname "$PETREL")/plugins/header_stamp.so}
    want_mode tls && tls_certs
    check_petrel_config
    want_mode receive &&
        say "Scenario A: petrel receive path on 127.0.0.1:$PETREL_PORT" \
            "(deliveries: $PETREL_DELIVERY)"
    { want_mode relay || want_mode milter; } &&
        say "Relay: petrel on 127.0.0.1:$PETREL_PORT routing dest.test to smtp-sink on" \
            ":$SINK_PORT ($RELAY_CONNECTIONS connections, $RELAY_PER_CONNECTION messages" \
            "per connection, cache $RELAY_CACHE_TIME)"
    want_mode hooks &&
        say "Hooks: petrel relay without hooks, with bench/policy.lua, and with the policy" \
            "and $PLUGIN (spot checks via 127.0.0.1:$CHECK_PORT, machine address $MACHINE_IP)"
fi
# Postfix takes part in every scenario but hooks (petrel's own hooks).
[ "$BENCH_MODE" = hooks ] && SKIP_POSTFIX=1
if [ "$SKIP_POSTFIX" != 1 ]; then
    say "Postfix on 127.0.0.1:$POSTFIX_PORT relaying to smtp-sink on :$SINK_PORT"
    postfix_setup
fi
# smtp-sink: for the receive scenario's Postfix runs, the relay and milter
# scenarios, and petrel's hooks runs; the TLS scenario has its own sink.
need_sink=0
want_mode receive && [ "$SKIP_POSTFIX" != 1 ] && need_sink=1
{ want_mode relay || want_mode milter; } &&
    { [ "$SKIP_POSTFIX" != 1 ] || [ "$SKIP_PETREL" != 1 ]; } && need_sink=1
want_mode hooks && [ "$SKIP_PETREL" != 1 ] && need_sink=1
[ "$need_sink" -eq 1 ] && sink_start
if want_mode hooks && [ "$SKIP_PETREL" != 1 ]; then
    check_sink_start
fi
if want_mode tls; then
    [ "$SKIP_PETREL" = 1 ] && tls_certs
    say "TLS: bench/tls_load.py ($TLS_PROCS processes) -> server with STARTTLS on" \
        "127.0.0.1:$PETREL_PORT (petrel) / :$POSTFIX_PORT (Postfix) -> bench/tls_sink on" \
        ":$TLS_SINK_PORT, TLS required; $TLS_KEY certificate; Postfix" \
        "smtp_tls_connection_reuse = $TLS_POSTFIX_REUSE"
    tls_sink_start
fi
if want_mode milter; then
    say "Milter: relay with and without a pass-through milter on 127.0.0.1:$MILTER_PORT" \
        "(bench/passthrough_milter.c), for each server"
    milter_start
fi

# The machine may be shared and its load drift during the benchmark, so the
# servers are interleaved (petrel run 1, Postfix run 1, petrel run 2, …)
# rather than run one after the other: both then see the same conditions.
# Postfix is stopped during petrel's runs. The milter scenario interleaves
# four runs: petrel without and with the milter, then Postfix likewise.
for w in "${WORKLOADS[@]}"; do
    IFS=: read -r msgs size sess scen <<<"$w"
    for ((run = 1; run <= BENCH_RUNS; run++)); do
        if [ "$scen" = milter ]; then
            for m in relay-nomilter relay-milter; do
                [ "$SKIP_PETREL" != 1 ] && petrel_relay "$msgs" "$size" "$sess" "$run" "$m"
            done
            if [ "$SKIP_POSTFIX" != 1 ]; then
                for m in relay-nomilter relay-milter; do
                    postfix_run "$m" "$msgs" "$size" "$sess" "$run"
                    postfix_stop
                done
            fi
            continue
        fi
        if [ "$scen" = hooks ]; then
            # petrel only; the three configurations in a rotating order (run 1:
            # none, lua, plugin; run 2: lua, plugin, none; …) so that none of
            # them always comes first or last
            hk=(none lua plugin)
            for ((k = 0; k < 3; k++)); do
                petrel_relay "$msgs" "$size" "$sess" "$run" "hooks-${hk[(run - 1 + k) % 3]}"
            done
            continue
        fi
        if [ "$scen" = tls ]; then
            LOAD=tls
            sink_use tls
            [ "$SKIP_PETREL" != 1 ] && petrel_relay "$msgs" "$size" "$sess" "$run" tls
            if [ "$SKIP_POSTFIX" != 1 ]; then
                postfix_run tls "$msgs" "$size" "$sess" "$run"
                postfix_stop
            fi
            LOAD=smtp
            sink_use plain
            continue
        fi
        if [ "$SKIP_PETREL" != 1 ]; then
            [[ "$scen" == *receive* ]] && petrel_receive "$msgs" "$size" "$sess" "$run"
            [[ "$scen" == *relay* ]] && petrel_relay "$msgs" "$size" "$sess" "$run"
        fi
        if [ "$SKIP_POSTFIX" != 1 ]; then
            postfix_run "$scen" "$msgs" "$size" "$sess" "$run"
            postfix_stop  # (postfix_run stops it already; no Postfix during petrel runs)
        fi
    done
done
cleanup

report_rc=0
"${LIB[@]}" report "$TSV" "$BUILD_DIR/results.json" || report_rc=$?
# keep every invocation's figures: results.json is overwritten by the next one
stamp=$(date +%Y%m%d-%H%M%S)
mkdir -p "$BUILD_DIR/history"
cp "$BUILD_DIR/results.json" "$BUILD_DIR/history/results-$stamp.json" 2>/dev/null || true
cp "$TSV" "$BUILD_DIR/history/results-$stamp.tsv" 2>/dev/null || true
exit "$report_rc"
