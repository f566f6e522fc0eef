#!/usr/bin/env bash
# The "Run your own service" example end to end (examples/calculator/README.md):
#   1. thrift --gen py calculator.thrift
#   2. a throwaway ZooKeeper (scripts/zk_throwaway.sh on a free loopback port)
#   3. rpc_lb for service `calculator`, then $WORKERS worker processes (server.py)
#   4. rpc_proxy, once the LB has registered in ZooKeeper
#   5. client.py through the proxy's unix socket: add, divide, divide by zero (the IDL's
#      DivideByZero), pid() spread over the workers
#   6. stop: rpc_lb (SIGTERM: deregisters, drains, tells its workers), then the workers, then
#      rpc_proxy, then ZooKeeper; each must exit 0
# Every process and the temp work dir are cleaned up on every path; every wait has a
# deadline. The test command runs this (tests/ops/test_example.py), so it cannot rot.
#
# Usage: examples/calculator/run.sh [--keep]     (--keep: keep the work dir and its logs)
# Env:   RPC_PROXY_BIN, RPC_LB_BIN (default target/debug/rpc_proxy, target/debug/rpc_lb:
#        `cargo build --workspace --bins`), PYTHON (python3), WORKERS (2), POOL_SIZE (2),
#        READY_TIMEOUT_S (30)
# Exit:  0 every step worked; 1 a step failed (the message says which, logs follow);
#        64 bad usage.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
PYTHON=${PYTHON:-python3}
RPC_PROXY_BIN=${RPC_PROXY_BIN:-$REPO/target/debug/rpc_proxy}
RPC_LB_BIN=${RPC_LB_BIN:-$REPO/target/debug/rpc_lb}
WORKERS=${WORKERS:-2}
POOL_SIZE=${POOL_SIZE:-2}
READY_TIMEOUT_S=${READY_TIMEOUT_S:-30}
# Stop deadlines of CONTRACT section 8 (default settings): LB 30 s, worker 20 s, proxy 15 s.
LB_STOP_S=30
WORKER_STOP_S=20
PROXY_STOP_S=15
ZK_STOP_S=15

KEEP=""
case "${1:-}" in
"") ;;
--keep) KEEP=1 ;;
*)
    echo "usage: $0 [--keep]" >&2
    exit 64
    ;;
esac
if ! [[ $WORKERS =~ ^[1-9][0-9]*$ && $POOL_SIZE =~ ^[1-9][0-9]*$ ]]; then
    echo "run.sh: WORKERS and POOL_SIZE must be positive integers" >&2
    exit 64
fi

STARTED=$SECONDS
WORK=""
ZK_PID=""
LB_PID=""
PROXY_PID=""
WORKER_PIDS=()
FAILED=""

step() { echo "==> $*"; }

# The last lines of every log of the run, to stderr.
show_logs() {
    local log
    [ -n "$WORK" ] || return 0
    for log in "$WORK"/*.log; do
        [ -s "$log" ] || continue
        echo "---- $(basename "$log") (last 40 lines)" >&2
        tail -n 40 "$log" >&2
    done
}

fail() {
    echo "run.sh: FAILED: $*" >&2
    FAILED=1
    show_logs
    exit 1
}

# True once process $1 has exited (gone, or a zombie not yet reaped).
exited() {
    local stat
    { read -r stat <"/proc/$1/stat"; } 2>/dev/null || return 0
    stat=${stat##*) }
    [ "${stat%% *}" = Z ]
}

# wait_until SECONDS WHAT COMMAND...: polls COMMAND every 0.1 s until it succeeds; fails the
# run naming WHAT once SECONDS pass. COMMAND may itself fail the run (a process that died).
wait_until() {
    local limit=$1 what=$2 deadline=$((SECONDS + $1))
    shift 2
    until "$@"; do
        [ "$SECONDS" -lt "$deadline" ] || fail "timed out after ${limit}s waiting for $what"
        sleep 0.1
    done
}

# must_run NAME PID: fails the run when the process has exited.
must_run() {
    exited "$2" && fail "$1 (pid $2) exited early; its log follows"
    return 0
}

# stop_checked NAME PID SECONDS: SIGTERM, wait at most SECONDS, the exit code must be 0.
stop_checked() {
    local name=$1 pid=$2 limit=$3 deadline rc=0
    kill -TERM "$pid" 2>/dev/null || true
    deadline=$((SECONDS + limit))
    until exited "$pid"; do
        [ "$SECONDS" -lt "$deadline" ] || fail "$name (pid $pid) still running ${limit}s after SIGTERM"
        sleep 0.1
    done
    wait "$pid" || rc=$?
    [ "$rc" -eq 0 ] || fail "$name (pid $pid) exited with code $rc after SIGTERM, want 0"
    echo "$name (pid $pid) exited with code 0"
}

# Kills what still runs (in stop order; SIGTERM, then SIGKILL after 15 s), removes the work
# dir. Runs on every exit: success, failure, Ctrl-C, SIGTERM.
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
    local status=$? pid deadline
    trap "" INT TERM HUP # a second signal must not cut the cleanup short (it is bounded)
    trap - EXIT
    local pids=()
    for pid in "$LB_PID" "${WORKER_PIDS[@]}" "$PROXY_PID" "$ZK_PID"; do
        if [ -n "$pid" ] && ! exited "$pid"; then pids+=("$pid"); fi
    done
    if [ ${#pids[@]} -gt 0 ]; then
        if [ -z "$FAILED" ] && [ "$status" -ne 0 ]; then show_logs; fi
        echo "run.sh: stopping what still runs: ${pids[*]}" >&2
        kill -TERM "${pids[@]}" 2>/dev/null || true
        deadline=$((SECONDS + 15))
        for pid in "${pids[@]}"; do
            while ! exited "$pid" && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.1; done
            kill -KILL "$pid" 2>/dev/null || true
            wait "$pid" 2>/dev/null || true
        done
    fi
    if [ -n "$WORK" ]; then
        if [ -n "$KEEP" ]; then
            echo "run.sh: work dir kept: $WORK" >&2
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'echo "run.sh: interrupted" >&2; exit 130' INT
trap 'echo "run.sh: terminated" >&2; exit 143' TERM HUP

# --- what the example needs ----------------------------------------------------------------
for bin in "$RPC_PROXY_BIN" "$RPC_LB_BIN"; do
    [ -x "$bin" ] || fail "$bin not found: run \`cargo build --workspace --bins\` or set RPC_PROXY_BIN / RPC_LB_BIN"
done
command -v thrift >/dev/null 2>&1 || fail "no thrift compiler: apt-get install thrift-compiler"
"$PYTHON" -c 'import rpc_thrift, thrift' 2>/dev/null ||
    fail "$PYTHON cannot import rpc_thrift and thrift: pip install ./worker-py"

WORK=$(mktemp -d /tmp/rpcalc.XXXXXX) # short: unix socket paths must stay under 108 bytes
echo "work dir: $WORK"

# --- 0. exit codes of a bad start (no ZooKeeper needed) ------------------------------------
step "exit codes: an unknown flag gives 64, a config missing a required key gives 78"
rc=0
"$RPC_LB_BIN" --no-such-flag >"$WORK/usage.out" 2>&1 || rc=$?
[ "$rc" -eq 64 ] || fail "rpc_lb --no-such-flag exited $rc, want 64: $(cat "$WORK/usage.out")"
echo "rpc_lb --no-such-flag -> 64"
printf 'zk=127.0.0.1:2181\n' >"$WORK/bad.ini"
rc=0
"$RPC_PROXY_BIN" -c "$WORK/bad.ini" >"$WORK/bad.out" 2>&1 || rc=$?
[ "$rc" -eq 78 ] || fail "rpc_proxy with no proxy_address exited $rc, want 78: $(cat "$WORK/bad.out")"
echo "rpc_proxy -c bad.ini (no proxy_address) -> 78: $(tail -n 1 "$WORK/bad.out")"

# --- 1. generated code ---------------------------------------------------------------------
step "thrift --gen py calculator.thrift"
mkdir "$WORK/gen-py"
thrift --gen py -out "$WORK/gen-py" "$HERE/calculator.thrift" || fail "thrift --gen py failed"
echo "generated $WORK/gen-py/calculator/{Calculator,ttypes}.py"

# --- 2. ZooKeeper --------------------------------------------------------------------------
step "a throwaway ZooKeeper (scripts/zk_throwaway.sh)"
ZK_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$REPO/scripts/zk_throwaway.sh" "$ZK_PORT" >"$WORK/zk.out" 2>"$WORK/zk.log" &
ZK_PID=$!
zk_ready() {
    must_run "ZooKeeper (scripts/zk_throwaway.sh)" "$ZK_PID"
    grep -qsx "127.0.0.1:$ZK_PORT" "$WORK/zk.out"
}
wait_until 60 "ZooKeeper on 127.0.0.1:$ZK_PORT" zk_ready
echo "ZooKeeper listening on 127.0.0.1:$ZK_PORT"

# One config.ini for both binaries: the repo's, with this run's ZooKeeper and work dir.
sed -e "s|^zk=.*|zk=127.0.0.1:$ZK_PORT|" -e "s|/tmp/calculator|$WORK|g" \
    "$HERE/config.ini" >"$WORK/config.ini"

# --- 3. the LB and its workers -------------------------------------------------------------
step "rpc_lb -c config.ini (service calculator), then $WORKERS worker processes"
"$RPC_LB_BIN" -c "$WORK/config.ini" --work-dir "$WORK" >"$WORK/lb.log" 2>&1 &
LB_PID=$!
lb_listening() {
    must_run rpc_lb "$LB_PID"
    [ -S "$WORK/calculator_back.sock" ]
}
wait_until "$READY_TIMEOUT_S" "rpc_lb to listen on $WORK/calculator_back.sock" lb_listening
echo "rpc_lb (pid $LB_PID) listening; workers dial $WORK/calculator_back.sock"

for ((i = 1; i <= WORKERS; i++)); do
    "$PYTHON" "$HERE/server.py" "$WORK/calculator_back.sock" --pool-size "$POOL_SIZE" \
        --gen-py "$WORK/gen-py" >"$WORK/worker-$i.log" 2>&1 &
    WORKER_PIDS+=($!)
done
workers_connected() {
    local i
    for ((i = 1; i <= WORKERS; i++)); do
        must_run "worker $i" "${WORKER_PIDS[i - 1]}"
        grep -qs "connected to the LB" "$WORK/worker-$i.log" || return 1
    done
}
wait_until "$READY_TIMEOUT_S" "$WORKERS workers to connect to rpc_lb" workers_connected
echo "workers (pids ${WORKER_PIDS[*]}) connected, pool_size $POOL_SIZE each"

# The LB registers its ephemeral node once it has a worker; proxies route to it from then on.
lb_registered() {
    must_run rpc_lb "$LB_PID"
    grep -qs " registered path=/zk/product/example/services/calculator/" "$WORK/lb.log"
}
wait_until "$READY_TIMEOUT_S" "rpc_lb to register in ZooKeeper" lb_registered
echo "rpc_lb registered: $(grep -o ' registered path=[^ ]*' "$WORK/lb.log" | head -n 1 | cut -d= -f2)"

# --- 4. the proxy --------------------------------------------------------------------------
step "rpc_proxy -c config.ini (the same file)"
"$RPC_PROXY_BIN" -c "$WORK/config.ini" >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
proxy_listening() {
    must_run rpc_proxy "$PROXY_PID"
    [ -S "$WORK/proxy.sock" ]
}
wait_until "$READY_TIMEOUT_S" "rpc_proxy to listen on $WORK/proxy.sock" proxy_listening
echo "rpc_proxy (pid $PROXY_PID) listening on $WORK/proxy.sock"

# --- 5. the client -------------------------------------------------------------------------
step "client.py: calls through rpc_proxy -> rpc_lb -> workers"
# The proxy holds calls until its first full read of ZooKeeper, so the first call finds the LB.
RPC_PROXY_ADDRESS="$WORK/proxy.sock" timeout 60 "$PYTHON" "$HERE/client.py" --gen-py "$WORK/gen-py" ||
    fail "client.py failed (exit $?)"

# --- 6. stop -------------------------------------------------------------------------------
step "stop: rpc_lb (deregisters, drains, tells its workers), workers, rpc_proxy, ZooKeeper"
stop_checked rpc_lb "$LB_PID" "$LB_STOP_S"
LB_PID=""
grep -q " deregistered path=" "$WORK/lb.log" || fail "rpc_lb did not log that it deregistered"
for ((i = 1; i <= WORKERS; i++)); do
    stop_checked "worker $i" "${WORKER_PIDS[i - 1]}" "$WORKER_STOP_S"
done
WORKER_PIDS=()
stop_checked rpc_proxy "$PROXY_PID" "$PROXY_STOP_S"
PROXY_PID=""
[ ! -e "$WORK/proxy.sock" ] || fail "rpc_proxy left its socket $WORK/proxy.sock behind"
stop_checked ZooKeeper "$ZK_PID" "$ZK_STOP_S"
ZK_PID=""

echo "calculator example OK ($((SECONDS - STARTED))s)"
