#!/usr/bin/env bash
# Runs one rpc_lb (one service instance) outside systemd (CONTRACT sections 5 and 8): start,
# stop, restart, status, tail. As in the original, it lives in the product directory next to
# its config.ini; under systemd use the template systemd/rpc_lb@.service instead.
#
# Usage: control_lb.sh <start|stop|restart|status|tail> [config.ini]
#
# Environment:
#   RPC_LB_CONFIG            config when no argument is given (default ./config.ini)
#   RPC_LB_BIN               the binary (default: rpc_lb on PATH, else bin/rpc_lb beside this script)
#   RPC_LB_LOG_DIR           pid, log and output files (default ./log); one LB per log dir
#   RPC_LB_LOG_LEVEL         passed on as --log-level when set
#   RPC_LB_WORK_DIR          passed on as --work-dir (default: the config file's directory)
#   RPC_LB_CODE_VERSION      passed on as --code-url-version when set
#   RPC_LB_START_TIMEOUT     seconds `start` waits for the process to listen (default 10)
#   RPC_LB_STOP_TIMEOUT      seconds `stop` waits after SIGTERM before SIGKILL (default 35;
#                            the LB drains for at most drain_grace_ms, 25 s by default, and
#                            exits within 30 s)
#
# Files in the log dir: rpc_lb.pid; rpc_lb.log.YYYY-MM-DD (the binary's -L log, rotated
# daily, UTC dates); rpc_lb.out (stdout and stderr: bad-config messages, panics).
#
# Exit codes: 0 done (stop on a stopped proxy too); 1 failed (already running, did not stop in
# time and was killed, not listening in time); 3 `status` found it not running; 64 bad usage;
# 78 config file missing. When the binary dies at once, `start` exits with its exit code
# (78 bad config, 64 bad usage, 1 runtime failure).
set -euo pipefail

NAME=rpc_lb
SCRIPT=${0##*/}
SCRIPT_DIR=$(cd "$(dirname "$0")" && pwd)

usage() {
    echo "usage: $SCRIPT <start|stop|restart|status|tail> [config.ini]" >&2
    exit 64
}

die() {
    local code=$1
    shift
    echo "$SCRIPT: $*" >&2
    exit "$code"
}

# An absolute form of a path, relative paths taken from the current directory.
abspath() {
    case $1 in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/${1#./}" ;;
    esac
}

# Milliseconds since the epoch (EPOCHREALTIME uses the locale's decimal separator).
now_ms() {
    local t=${EPOCHREALTIME//[.,]/}
    echo $((t / 1000))
}

if [ $# -lt 1 ] || [ $# -gt 2 ]; then usage; fi
ACTION=$1
CONFIG=$(abspath "${2:-${RPC_LB_CONFIG:-./config.ini}}")
LOG_DIR=$(abspath "${RPC_LB_LOG_DIR:-./log}")
LOG_LEVEL=${RPC_LB_LOG_LEVEL:-}
START_TIMEOUT=${RPC_LB_START_TIMEOUT:-10}
STOP_TIMEOUT=${RPC_LB_STOP_TIMEOUT:-35}
PID_FILE=$LOG_DIR/$NAME.pid
LOG_FILE=$LOG_DIR/$NAME.log
OUT_FILE=$LOG_DIR/$NAME.out
LOCK_FILE=$LOG_DIR/$NAME.lock

# The binary: RPC_LB_BIN, else PATH, else an installed layout (PREFIX/bin next to this script).
find_bin() {
    local candidate
    if [ -n "${RPC_LB_BIN:-}" ]; then
        if [[ $RPC_LB_BIN != */* ]] && candidate=$(command -v "$RPC_LB_BIN" 2>/dev/null); then
            printf '%s\n' "$candidate"
        else
            printf '%s\n' "$RPC_LB_BIN"
        fi
        return
    fi
    if candidate=$(command -v "$NAME" 2>/dev/null); then
        printf '%s\n' "$candidate"
        return
    fi
    for candidate in "$SCRIPT_DIR/bin/$NAME" "$SCRIPT_DIR/$NAME"; do
        if [ -x "$candidate" ]; then
            printf '%s\n' "$candidate"
            return
        fi
    done
    printf '%s\n' "$NAME"
}
BIN=$(find_bin)
# The executable's file name, which /proc/<pid>/exe must show for a pid to count as ours.
BIN_NAME=$(basename "$(readlink -f "$BIN" 2>/dev/null || printf '%s' "$BIN")")

# True when the pid exists and is not a zombie.
alive() {
    local stat
    read -r stat 2>/dev/null <"/proc/$1/stat" || return 1
    # Fields after "(comm) ": the state comes first; comm itself may hold spaces.
    stat=${stat##*) }
    [ "${stat%% *}" != Z ] && [ "${stat%% *}" != X ]
}

# True when the pid is alive and runs our binary: a pid file left by a crash or a reboot may
# name a pid that now belongs to anything else.
is_ours() {
    local pid=$1 exe
    alive "$pid" || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || exe=""
    if [ -z "$exe" ]; then
        # No right to read exe (another user's process): argv[0] is readable by anyone.
        exe=$(tr '\0' '\n' 2>/dev/null <"/proc/$pid/cmdline" | head -n 1) || exe=""
    fi
    exe=${exe% (deleted)} # the binary was replaced (an upgrade) while it runs
    [ -n "$exe" ] && [ "${exe##*/}" = "$BIN_NAME" ]
}

# Prints the pid of the running proxy named by the pid file; fails when there is none.
running_pid() {
    local pid
    [ -r "$PID_FILE" ] || return 1
    pid=$(tr -cd '0-9' <"$PID_FILE")
    if [ -z "$pid" ] || ! is_ours "$pid"; then return 1; fi
    printf '%s\n' "$pid"
}

# True when the pid holds a listening socket (TCP, or unix stream); the binary listens before
# it sends systemd READY, so this is the same readiness without systemd.
is_listening() {
    local pid=$1 fd inodes="" files=()
    for fd in "/proc/$pid/fd/"*; do
        fd=$(readlink "$fd" 2>/dev/null) || continue
        case $fd in socket:\[*\]) inodes+="${fd//[^0-9]/} " ;; esac
    done
    [ -n "$inodes" ] || return 1
    for fd in "/proc/$pid/net/tcp" "/proc/$pid/net/tcp6" "/proc/$pid/net/unix"; do
        [ -r "$fd" ] && files+=("$fd")
    done
    [ ${#files[@]} -gt 0 ] || return 1
    # tcp: st (field 4) 0A is LISTEN, inode is field 10; unix: flags (field 4) 00010000 is
    # a listening socket, inode is field 7.
    awk -v inodes="$inodes" '
        BEGIN { n = split(inodes, list, " "); for (i = 1; i <= n; i++) want[list[i]] = 1 }
        FILENAME ~ /unix$/ { if ($4 == "00010000" && ($7 in want)) found = 1; next }
        $4 == "0A" && ($10 in want) { found = 1 }
        END { exit found ? 0 : 1 }
    ' "${files[@]}"
}

# Waits until the pid is gone (or no longer ours), at most $2 seconds.
wait_gone() {
    local pid=$1 deadline=$(($(now_ms) + $2 * 1000))
    while is_ours "$pid"; do
        [ "$(now_ms)" -lt "$deadline" ] || return 1
        sleep 0.1
    done
}

# The newest -L log file (the binary appends a date), or today's name before there is one.
current_log() {
    local newest="" f
    for f in "$LOG_FILE".*; do
        [ -f "$f" ] || continue
        if [ -z "$newest" ] || [ "$f" -nt "$newest" ]; then newest=$f; fi
    done
    printf '%s\n' "${newest:-$LOG_FILE.$(date -u +%F)}"
}

# Serialises start/stop/restart of one log dir, so two starts cannot both launch a process.
take_lock() {
    command -v flock >/dev/null 2>&1 || return 0
    exec 9>"$LOCK_FILE"
    flock -w 60 9 || die 1 "another $SCRIPT holds $LOCK_FILE"
}

do_start() {
    local pid out_size log log_size rc deadline
    if pid=$(running_pid); then
        die 1 "$NAME already running (pid $pid); refusing to start another"
    fi
    if [ ! -f "$CONFIG" ] || [ ! -r "$CONFIG" ]; then
        die 78 "config file not found or not readable: $CONFIG"
    fi
    if [[ $BIN != */* ]] || [ ! -x "$BIN" ]; then
        die 1 "$NAME binary not found (set RPC_LB_BIN or put $NAME on PATH): $BIN"
    fi
    # The work dir is written into the LB's ZooKeeper node: the product directory, which is
    # where the config lives unless RPC_LB_WORK_DIR says otherwise.
    local work_dir=${RPC_LB_WORK_DIR:-$(cd "$(dirname "$CONFIG")" && pwd)}
    local cmd=("$BIN" -c "$CONFIG" -L "$LOG_FILE" --work-dir "$work_dir")
    [ -z "${RPC_LB_CODE_VERSION+set}" ] || cmd+=(--code-url-version "$RPC_LB_CODE_VERSION")
    [ -z "$LOG_LEVEL" ] || cmd+=(--log-level "$LOG_LEVEL")

    echo "$(date -u +%FT%TZ) $SCRIPT start: ${cmd[*]}" >>"$OUT_FILE"
    # What the binary writes from here on is what a failed start shows.
    out_size=$(stat -c %s "$OUT_FILE")
    log=$(current_log)
    log_size=$(stat -c %s "$log" 2>/dev/null || echo 0)
    # setsid: not killed with the shell that started it (a closed ssh session, a Ctrl-C).
    # The lock fd is closed for the child, or the daemon would hold the lock forever.
    if command -v setsid >/dev/null 2>&1; then
        setsid "${cmd[@]}" </dev/null >>"$OUT_FILE" 2>&1 9>&- &
    else
        nohup "${cmd[@]}" </dev/null >>"$OUT_FILE" 2>&1 9>&- &
    fi
    pid=$!
    echo "$pid" >"$PID_FILE.tmp"
    mv -f "$PID_FILE.tmp" "$PID_FILE"

    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    while :; do
        if ! alive "$pid"; then
            rc=0
            wait "$pid" || rc=$?
            rm -f "$PID_FILE"
            {
                echo "$SCRIPT: $NAME failed to start: exit code $rc (config $CONFIG)"
                echo "--- $OUT_FILE"
                tail -c +"$((out_size + 1))" "$OUT_FILE" | tail -n 20
                # The -L log too, when this run wrote to it (errors after logging started).
                [ "$(current_log)" = "$log" ] || log_size=0
                log=$(current_log)
                if [ "$(stat -c %s "$log" 2>/dev/null || echo 0)" -gt "$log_size" ]; then
                    echo "--- $log"
                    tail -c +"$((log_size + 1))" "$log" | tail -n 10
                fi
            } >&2
            [ "$rc" -ne 0 ] || rc=1
            exit "$rc"
        fi
        if is_ours "$pid" && is_listening "$pid"; then
            echo "$NAME started (pid $pid, config $CONFIG, log $(current_log))"
            return 0
        fi
        if [ "$(now_ms)" -ge "$deadline" ]; then
            die 1 "$NAME (pid $pid) runs but listens on nothing after ${START_TIMEOUT}s; see $OUT_FILE and $(current_log)"
        fi
        sleep 0.1
    done
}

do_stop() {
    local pid
    if ! pid=$(running_pid); then
        if [ -e "$PID_FILE" ]; then
            rm -f "$PID_FILE"
            echo "$NAME not running (removed stale $PID_FILE)"
        else
            echo "$NAME not running"
        fi
        return 0
    fi
    echo "stopping $NAME (pid $pid, SIGTERM; waiting up to ${STOP_TIMEOUT}s)"
    kill -TERM "$pid" 2>/dev/null || true
    if wait_gone "$pid" "$STOP_TIMEOUT"; then
        rm -f "$PID_FILE"
        echo "$NAME stopped"
        return 0
    fi
    echo "$SCRIPT: $NAME (pid $pid) still running ${STOP_TIMEOUT}s after SIGTERM; sending SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    wait_gone "$pid" 5 || die 1 "$NAME (pid $pid) survived SIGKILL"
    rm -f "$PID_FILE"
    return 1
}

do_status() {
    local pid
    if pid=$(running_pid); then
        echo "running"
        echo "$NAME: pid $pid, log dir $LOG_DIR" >&2
        return 0
    fi
    echo "not running"
    if [ -e "$PID_FILE" ]; then
        echo "$NAME: stale pid file $PID_FILE" >&2
        return 1
    fi
    return 3
}

do_tail() {
    local log
    log=$(current_log)
    echo "$SCRIPT: following $log and $OUT_FILE (a new file starts each UTC day: run again)" >&2
    exec tail -n 50 -F "$log" "$OUT_FILE"
}

case $ACTION in
    start | stop | restart) ;;
    status)
        rc=0
        do_status || rc=$?
        exit "$rc"
        ;;
    tail)
        do_tail
        ;;
    *) usage ;;
esac

[[ $START_TIMEOUT =~ ^[0-9]+$ ]] || die 64 "RPC_LB_START_TIMEOUT must be whole seconds: $START_TIMEOUT"
[[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die 64 "RPC_LB_STOP_TIMEOUT must be whole seconds: $STOP_TIMEOUT"
mkdir -p "$LOG_DIR"
take_lock
case $ACTION in
    start) do_start ;;
    stop) do_stop ;;
    restart)
        do_stop || echo "$SCRIPT: starting again anyway" >&2
        do_start
        ;;
esac
