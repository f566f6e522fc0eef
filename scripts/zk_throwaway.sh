#!/usr/bin/env bash
# A throwaway standalone ZooKeeper for trying the mesh (README "Run your own service",
# examples/calculator/). Runs in the foreground: starts ZooKeeper from Debian's `zookeeper`
# package (jars only; never `zookeeperd`) on 127.0.0.1:PORT with a fresh temp data dir, waits
# until it answers `ruok`, prints its address (`127.0.0.1:PORT`, alone on a stdout line), and
# runs until SIGTERM, SIGINT (Ctrl-C) or SIGHUP; then stops it and deletes the data dir.
#
# Debian's zkServer.sh is tied to /etc/zookeeper/conf, so this runs the server's java main
# class with its own zoo.cfg, as tests/e2e/harness.py's ZooKeeperServer does.
#
# Usage: scripts/zk_throwaway.sh [PORT]          (default 2181; `make zk`)
# Env:   ZK_TICK_MS (default 2000), ZK_READY_TIMEOUT_S (default 60),
#        ZK_CLASSPATH (default /usr/share/java/zookeeper.jar, plus log4j when present)
# Exit:  0 stopped by a signal, 64 bad usage, 1 could not start or ZooKeeper died.
set -euo pipefail

usage() {
    echo "usage: $0 [PORT]   (a free TCP port on 127.0.0.1, default 2181)" >&2
    exit 64
}

[ $# -le 1 ] || usage
case "${1:-}" in -h | --help) usage ;; esac
PORT=${1:-2181}
if ! [[ $PORT =~ ^[0-9]+$ ]] || [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then
    usage
fi
TICK_MS=${ZK_TICK_MS:-2000}
READY_TIMEOUT_S=${ZK_READY_TIMEOUT_S:-60}

die() {
    echo "zk_throwaway: $*" >&2
    exit 1
}

if [ -z "${ZK_CLASSPATH:-}" ]; then
    [ -f /usr/share/java/zookeeper.jar ] ||
        die "no /usr/share/java/zookeeper.jar: apt-get install zookeeper (not zookeeperd, which starts a daemon)"
    ZK_CLASSPATH=/usr/share/java/zookeeper.jar
    for jar in /usr/share/java/slf4j-log4j12.jar /usr/share/java/log4j-1.2.jar; do
        [ -f "$jar" ] && ZK_CLASSPATH+=":$jar"
    done
fi
command -v java >/dev/null 2>&1 || die "no java: apt-get install default-jre-headless"

# Sends `ruok`; true when the answer is `imok`. Every step is bounded: a `ruok` sent while
# ZooKeeper 3.8 is still starting can leave the connection open with no answer.
# shellcheck disable=SC2016 # $1 is expanded by the inner bash
ruok() {
    local answer
    answer=$(timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1" && printf ruok >&3 && head -c 4 <&3' _ "$PORT" 2>/dev/null) || true
    [ "$answer" = imok ]
}

# Another server on the port would answer `ruok` for us: refuse to start beside it.
# shellcheck disable=SC2016 # $1 is expanded by the inner bash
if timeout 2 bash -c 'exec 3<>"/dev/tcp/127.0.0.1/$1"' _ "$PORT" 2>/dev/null; then
    die "127.0.0.1:$PORT is already in use (another ZooKeeper?); pass another port"
fi

DIR=$(mktemp -d "${TMPDIR:-/tmp}/zk-throwaway.XXXXXX")
ZK_PID=""

# Runs on every exit (the EXIT trap): stops ZooKeeper, deletes its data dir.
# shellcheck disable=SC2317 # invoked by the trap
cleanup() {
    local status=$? i
    trap "" INT TERM HUP # a second signal must not cut the cleanup short (it is bounded)
    trap - EXIT
    if [ -n "$ZK_PID" ] && kill -0 "$ZK_PID" 2>/dev/null; then
        kill -TERM "$ZK_PID" 2>/dev/null || true
        # Its shutdown hook takes about 2 s; a throwaway server may then be killed.
        for ((i = 0; i < 100; i++)); do
            kill -0 "$ZK_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$ZK_PID" 2>/dev/null || true
        wait "$ZK_PID" 2>/dev/null || true
    fi
    rm -rf "$DIR"
    exit "$status"
}
trap cleanup EXIT
trap 'echo "zk_throwaway: stopping" >&2; exit 0' INT TERM HUP

mkdir "$DIR/data"
cat >"$DIR/zoo.cfg" <<CFG
tickTime=$TICK_MS
dataDir=$DIR/data
clientPort=$PORT
clientPortAddress=127.0.0.1
admin.enableServer=false
4lw.commands.whitelist=ruok,srvr,stat,mntr,cons
maxClientCnxns=0
forceSync=no
CFG

java_opts=(-Xmx256m -XX:+UseSerialGC -XX:TieredStopAtLevel=1 -Dzookeeper.admin.enableServer=false)
if [ -f /etc/zookeeper/conf/log4j.properties ]; then
    java_opts+=(-Dlog4j.configuration=file:/etc/zookeeper/conf/log4j.properties "-Dzookeeper.root.logger=WARN,CONSOLE")
fi
java "${java_opts[@]}" -cp "$ZK_CLASSPATH" org.apache.zookeeper.server.ZooKeeperServerMain \
    "$DIR/zoo.cfg" >"$DIR/zk.log" 2>&1 </dev/null &
ZK_PID=$!

deadline=$((SECONDS + READY_TIMEOUT_S))
until ruok; do
    if ! kill -0 "$ZK_PID" 2>/dev/null; then
        tail -n 30 "$DIR/zk.log" >&2
        die "ZooKeeper exited during start (log above)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        tail -n 30 "$DIR/zk.log" >&2
        die "ZooKeeper did not answer ruok on 127.0.0.1:$PORT within ${READY_TIMEOUT_S}s (log above)"
    fi
    sleep 0.1
done

echo "zk_throwaway: ZooKeeper (pid $ZK_PID) ready on 127.0.0.1:$PORT, data in $DIR; stop with Ctrl-C or SIGTERM" >&2
echo "127.0.0.1:$PORT"

# Returns when ZooKeeper dies or a signal arrives (the trap then stops it and exits 0).
status=0
wait "$ZK_PID" || status=$?
ZK_PID=""
tail -n 30 "$DIR/zk.log" >&2
die "ZooKeeper exited by itself with status $status (log above)"
