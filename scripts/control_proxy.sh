#!/usr/bin/env bash
# Runs rpc_proxy outside systemd (CONTRACT sections 5 and 8): start, stop, restart, status, tail.
# Under systemd use systemd/rpc_proxy.service instead; the two share nothing but the binary.
#
# Usage: control_proxy.sh <start|stop|restart|status|tail> [config.ini]
#
# restart is a handover that refuses no connection (CONTRACT section 9): a new process starts
# with --takeover, binds beside proxy_address and renames its socket over it; once the path
# names the new socket, the pid file names the new pid and the old process gets SIGTERM: it
# leaves the path alone, serves every connection it accepted or had queued, and exits. If the
# new process fails to start or to take over in time, it is stopped and the old one keeps
# serving (exit non-zero). A TCP proxy_address (host:port) cannot be handed over: restart is
# then stop, then start. When nothing runs, restart is start.
#
# Environment:
#   RPC_PROXY_CONFIG         config when no argument is given (default /usr/local/rpc_proxy/config.ini)
#   RPC_PROXY_BIN            the binary (default: rpc_proxy on PATH, else bin/rpc_proxy beside this script)
#   RPC_PROXY_LOG_DIR        pid, log and output files (default ./log)
#   RPC_PROXY_LOG_LEVEL      passed on as --log-level when set
#   RPC_PROXY_START_TIMEOUT  seconds `start` waits for the process to listen, and `restart` for
#                            the new one to take the socket over (default 10)
#   RPC_PROXY_STOP_TIMEOUT   seconds `stop` waits after SIGTERM before SIGKILL (default 20;
#                            the proxy itself gives up draining after 15 s)
#
# Files in the log dir: rpc_proxy.pid; rpc_proxy.log.YYYY-MM-DD (the binary's -L log, rotated
# daily, UTC dates); rpc_proxy.out (stdout and stderr: bad-config messages, panics).
#
# Exit codes: 0 done (stop on a stopped proxy too); 1 failed (already running, did not stop in
# time and was killed, not listening in time, no takeover in time); 3 `status` found it not
# running; 64 bad usage; 78 config file missing. When the binary dies at once, `start` and
# `restart` exit with its exit code (78 bad config, 64 bad usage, 1 runtime failure); after a
# failed `restart` the old process still runs.
set -euo pipefail

NAME=rpc_proxy
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
CONFIG=$(abspath "${2:-${RPC_PROXY_CONFIG:-/usr/local/rpc_proxy/config.ini}}")
LOG_DIR=$(abspath "${RPC_PROXY_LOG_DIR:-./log}")
LOG_LEVEL=${RPC_PROXY_LOG_LEVEL:-}
START_TIMEOUT=${RPC_PROXY_START_TIMEOUT:-10}
STOP_TIMEOUT=${RPC_PROXY_STOP_TIMEOUT:-20}
PID_FILE=$LOG_DIR/$NAME.pid
LOG_FILE=$LOG_DIR/$NAME.log
OUT_FILE=$LOG_DIR/$NAME.out
LOCK_FILE=$LOG_DIR/$NAME.lock

# The binary: RPC_PROXY_BIN, else PATH, else an installed layout (PREFIX/bin next to this script).
find_bin() {
    local candidate
    if [ -n "${RPC_PROXY_BIN:-}" ]; then
        if [[ $RPC_PROXY_BIN != */* ]] && candidate=$(command -v "$RPC_PROXY_BIN" 2>/dev/null); then
            printf '%s\n' "$candidate"
        else
            printf '%s\n' "$RPC_PROXY_BIN"
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

# Fails (exit 78, or 1) unless the config is readable and the binary is there.
check_runnable() {
    if [ ! -f "$CONFIG" ] || [ ! -r "$CONFIG" ]; then
        die 78 "config file not found or not readable: $CONFIG"
    fi
    if [[ $BIN != */* ]] || [ ! -x "$BIN" ]; then
        die 1 "$NAME binary not found (set RPC_PROXY_BIN or put $NAME on PATH): $BIN"
    fi
}

# Starts the binary in the background with extra flags "$@"; sets LAUNCHED (its pid) and, for
# report_failed_start, OUT_SIZE, LOG and LOG_SIZE.
launch() {
    local cmd=("$BIN" -c "$CONFIG" -L "$LOG_FILE")
    [ -z "$LOG_LEVEL" ] || cmd+=(--log-level "$LOG_LEVEL")
    cmd+=("$@")
    echo "$(date -u +%FT%TZ) $SCRIPT $ACTION: ${cmd[*]}" >>"$OUT_FILE"
    # What the binary writes from here on is what a failed start shows.
    OUT_SIZE=$(stat -c %s "$OUT_FILE")
    LOG=$(current_log)
    LOG_SIZE=$(stat -c %s "$LOG" 2>/dev/null || echo 0)
    # setsid: not killed with the shell that started it (a closed ssh session, a Ctrl-C).
    # The lock fd is closed for the child, or the daemon would hold the lock forever.
    if command -v setsid >/dev/null 2>&1; then
        setsid "${cmd[@]}" </dev/null >>"$OUT_FILE" 2>&1 9>&- &
    else
        nohup "${cmd[@]}" </dev/null >>"$OUT_FILE" 2>&1 9>&- &
    fi
    LAUNCHED=$!
}

# The launched pid died: prints why (its output since launch) and exits with its exit code.
report_failed_start() {
    local pid=$1 rc=0
    wait "$pid" || rc=$?
    {
        echo "$SCRIPT: $NAME failed to start: exit code $rc (config $CONFIG)"
        echo "--- $OUT_FILE"
        tail -c +"$((OUT_SIZE + 1))" "$OUT_FILE" | tail -n 20
        # The -L log too, when this run wrote to it (errors after logging started).
        [ "$(current_log)" = "$LOG" ] || LOG_SIZE=0
        LOG=$(current_log)
        if [ "$(stat -c %s "$LOG" 2>/dev/null || echo 0)" -gt "$LOG_SIZE" ]; then
            echo "--- $LOG"
            tail -c +"$((LOG_SIZE + 1))" "$LOG" | tail -n 10
        fi
    } >&2
    [ "$rc" -ne 0 ] || rc=1
    exit "$rc"
}

# Writes the pid file (atomically: a reader sees the old pid or the new one).
write_pid() {
    echo "$1" >"$PID_FILE.tmp"
    mv -f "$PID_FILE.tmp" "$PID_FILE"
}

do_start() {
    local pid deadline
    if pid=$(running_pid); then
        die 1 "$NAME already running (pid $pid); refusing to start another"
    fi
    check_runnable
    launch
    pid=$LAUNCHED
    write_pid "$pid"

    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    while :; do
        if ! alive "$pid"; then
            rm -f "$PID_FILE"
            report_failed_start "$pid"
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

# proxy_address as the binary reads it: the last `proxy_address=` line, its value trimmed
# ("" or '' is unset). A value with a `:` is TCP (CONTRACT section 4).
proxy_address() {
    awk -v q="'" '
        /^[[:space:]]*proxy_address[[:space:]]*=/ {
            v = substr($0, index($0, "=") + 1)
            gsub(/^[[:space:]]+|[[:space:]]+$/, "", v)
            if (v == "\"\"" || v == q q) v = ""
            addr = v
        }
        END { print addr }
    ' "$CONFIG"
}

# Device and inode of the file at a path (empty when there is none): a takeover has happened
# once the path names another file than before.
file_id() {
    stat -c '%d:%i' "$1" 2>/dev/null || true
}

# Set while a process started by `restart` has not taken over yet: stopped if the script is
# interrupted, so it never runs untracked beside the old one.
PENDING_PID=""
stop_pending() {
    if [ -n "$PENDING_PID" ] && alive "$PENDING_PID"; then
        kill -TERM "$PENDING_PID" 2>/dev/null || true
    fi
}

# restart without a gap: the new process takes the socket over before the old one stops.
do_handover() {
    local old=$1 address=$2 before new deadline
    check_runnable
    before=$(file_id "$address")
    trap stop_pending EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    launch --takeover
    new=$LAUNCHED
    PENDING_PID=$new
    deadline=$(($(now_ms) + START_TIMEOUT * 1000))
    # Taken over: the path names another socket than before, and the new process listens.
    while ! { is_ours "$new" && [ "$(file_id "$address")" != "$before" ] && is_listening "$new"; }; do
        if ! alive "$new"; then
            PENDING_PID=""
            if [ "$(file_id "$address")" = "$before" ]; then
                echo "$SCRIPT: $NAME (pid $old) keeps running" >&2
            else
                echo "$SCRIPT: $NAME (pid $new) died after taking $address over: pid $old serves its connections but gets no new ones; fix the cause, then stop and start" >&2
            fi
            report_failed_start "$new"
        fi
        if [ "$(now_ms)" -ge "$deadline" ]; then
            # Taken over just now (the socket listens before it is renamed into place): keep it.
            if is_ours "$new" && [ "$(file_id "$address")" != "$before" ]; then break; fi
            kill -TERM "$new" 2>/dev/null || true
            wait_gone "$new" "$STOP_TIMEOUT" || kill -KILL "$new" 2>/dev/null || true
            PENDING_PID=""
            die 1 "$NAME (pid $new) did not take $address over within ${START_TIMEOUT}s and was stopped; pid $old keeps running; see $OUT_FILE and $(current_log)"
        fi
        sleep 0.1
    done
    # From here the new process is the one: the pid file names it before the old one stops.
    write_pid "$new"
    PENDING_PID=""
    echo "$NAME (pid $new) took $address over; stopping pid $old (SIGTERM; waiting up to ${STOP_TIMEOUT}s)"
    kill -TERM "$old" 2>/dev/null || true
    if ! wait_gone "$old" "$STOP_TIMEOUT"; then
        echo "$SCRIPT: $NAME (pid $old) still running ${STOP_TIMEOUT}s after SIGTERM; sending SIGKILL" >&2
        kill -KILL "$old" 2>/dev/null || true
        wait_gone "$old" 5 || die 1 "$NAME (pid $old) survived SIGKILL"
    fi
    echo "$NAME restarted (pid $new, config $CONFIG, log $(current_log))"
}

do_restart() {
    local old address
    if ! old=$(running_pid); then
        do_start
        return
    fi
    check_runnable
    address=$(proxy_address)
    case $address in
        *:*)
            echo "$SCRIPT: proxy_address $address is TCP, which cannot be handed over: stopping, then starting" >&2
            do_stop || echo "$SCRIPT: starting again anyway" >&2
            do_start
            ;;
        "") die 78 "no proxy_address in $CONFIG" ;;
        *) do_handover "$old" "$address" ;;
    esac
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

[[ $START_TIMEOUT =~ ^[0-9]+$ ]] || die 64 "RPC_PROXY_START_TIMEOUT must be whole seconds: $START_TIMEOUT"
[[ $STOP_TIMEOUT =~ ^[0-9]+$ ]] || die 64 "RPC_PROXY_STOP_TIMEOUT must be whole seconds: $STOP_TIMEOUT"
mkdir -p "$LOG_DIR"
take_lock
case $ACTION in
    start) do_start ;;
    stop) do_stop ;;
    restart) do_restart ;;
esac
