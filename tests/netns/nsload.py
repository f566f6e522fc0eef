"""Steady load on rpc_proxy from inside a host namespace, for the many-hosts test.

    ip netns exec NS python nsload.py --gen-dir GEN --address PROXY [--threads N]

Each client thread keeps one connection and alternates `echo(<unique tag>)` (the reply must
be the tag) with `whoami()` (the worker's name, counted per phase). A failed call is counted,
kept, and the connection made again. Calls are counted under the phase current when they
began. Commands on stdin: `phase NAME`, `stop` (or EOF). Output on stdout, JSON lines:
`ready` once every thread is connected, `phase` when one begins, `progress` every 100 ms
(totals, the current phase and the workers seen in it), `summary` at the end.
"""

import argparse
import importlib
import json
import sys
import threading
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
import harness  # noqa: E402

MAX_FAILURES_KEPT = 20


class State:
    def __init__(self):
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.ok = 0
        self.failed = 0
        self.phase = "start"
        self.phases = {}
        self.order = []
        self.new_phase("start")

    def new_phase(self, name):
        with self.lock:
            self.phase = name
            self.phases[name] = {"ok": 0, "failed": 0, "failures": [], "whoami": {}}
            self.order.append(name)

    def record(self, phase, who=None, failure=None):
        with self.lock:
            counts = self.phases[phase]
            if failure is None:
                self.ok += 1
                counts["ok"] += 1
                if who is not None:
                    counts["whoami"][who] = counts["whoami"].get(who, 0) + 1
            else:
                self.failed += 1
                counts["failed"] += 1
                if len(counts["failures"]) < MAX_FAILURES_KEPT:
                    counts["failures"].append(failure)


def emit(event, **fields):
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def client(state, idl, address, index, connected):
    conn = harness.EchoConnection(idl, address, timeout=30.0)
    connected.release()
    n = 0
    while not state.stop.is_set():
        with state.lock:
            phase = state.phase
        n += 1
        tag = f"c{index}-{n}"
        try:
            if n % 2:
                got = conn.echo(tag)
                if got != tag:
                    raise AssertionError(f"crossed reply: sent {tag!r}, got {got!r}")
                state.record(phase)
            else:
                state.record(phase, who=conn.whoami())
        except Exception as exc:  # noqa: BLE001 - counted and reported
            state.record(phase, failure=f"{tag}: {exc!r}")
            conn.close()
            while not state.stop.is_set():
                try:
                    conn = harness.EchoConnection(idl, address, timeout=30.0)
                    break
                except Exception as again:  # noqa: BLE001 - counted and reported
                    state.record(phase, failure=f"{tag} reconnect: {again!r}")
                    time.sleep(0.1)
    conn.close()


def reporter(state):
    while not state.stop.wait(0.1):
        with state.lock:
            seen = sorted(state.phases[state.phase]["whoami"])
            emit("progress", ok=state.ok, failed=state.failed, phase=state.phase, seen=seen)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gen-dir", required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--threads", type=int, default=6)
    args = parser.parse_args()
    sys.path.insert(0, args.gen_dir)
    idl = types.SimpleNamespace(Echo=importlib.import_module("echo.Echo"))

    state = State()
    connected = threading.Semaphore(0)
    threads = [
        threading.Thread(target=client, args=(state, idl, args.address, i, connected))
        for i in range(args.threads)
    ]
    for thread in threads:
        thread.start()
    for _ in threads:
        if not connected.acquire(timeout=30):
            emit("error", message="a client could not connect within 30 s")
            state.stop.set()
            return 1
    emit("ready")
    progress = threading.Thread(target=reporter, args=(state,), daemon=True)
    progress.start()

    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["phase"] and len(words) == 2:
            state.new_phase(words[1])
            emit("phase", name=words[1])
        elif words == ["stop"]:
            break
    state.stop.set()
    for thread in threads:
        thread.join(timeout=60)
    with state.lock:
        phases = {name: state.phases[name] for name in state.order}
        emit("summary", ok=state.ok, failed=state.failed, phases=phases)
    return 0


if __name__ == "__main__":
    sys.exit(main())
