"""Peers for the proxy resilience tests (test_resilience.py, CONTRACT section 9 "LB refusals
and LB failures, marked" and "Proxy resilience"): plain Python, no pytest in here.

- `MarkedEndpoint`: a fake upstream endpoint (a plain TCP socket server, built on
  stuck_peers.FakeServer) registered in ZooKeeper as an EPHEMERAL node under a service, with
  `"marks": 1` in its node data (an LB of this mesh) or without it (a Go original LB or a
  plain Thrift server). It answers pings (type 20) and every CALL the way `behaviour` says:
  `REFUSE` (code 6 with field 3 = 1: refused before dispatch), `FAIL` (code 6 with field 3 =
  2: failed after dispatch), `PLAIN_ERROR` (code 6 without field 3, a handler's error) or
  `REPLY` (echoes the call's first string argument back as the result), after `delay` seconds
  when one is set (each call on its own timer, so calls of one connection overlap like at a
  real LB). It records every CALL it received: `calls()`, `tags()` (the string argument, e.g.
  the tag a test put in `echo(tag)`), `count()`.
- `RecordingWorker`: a real rpc_thrift worker (worker-py/tests/echo_worker.py's handler,
  run by this file as a script: `python marked_peers.py worker ...`) that appends one line
  `<method>\\t<first string argument>` to its entries file when a call ENTERS the handler,
  before running it; so a test counts handler runs, and sees a call run twice. With a gate
  file, every call blocks on entry while that file exists (at most GATE_LIMIT_S): a hung
  worker that the test can make recover by deleting the file.
- `exception_body(code, message, mark)`: a TApplicationException struct, with field 3
  (i32) when `mark` is set.
- `node_data(service, address, marks)` / `register(...)`: harness.endpoint_data plus
  `"marks"`.

Every socket operation has a timeout and every loop a deadline or a stop flag.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import stuck_peers

import harness

# Field 3 of an LB's own TApplicationException (CONTRACT section 9).
MARK_REFUSED = 1
MARK_FAILED = 2

# What a MarkedEndpoint answers to a CALL.
REFUSE = "refuse"  # code 6, field 3 = 1
FAIL = "fail"  # code 6, field 3 = 2
PLAIN_ERROR = "plain_error"  # code 6, no field 3 (what a handler's error looks like)
REPLY = "reply"  # the call's first string argument, as the result (field 0)

#: A gated worker's call waits at most this long for its gate file to go away.
GATE_LIMIT_S = 120.0

T_STOP, T_I32, T_STRING = 0, 8, 11


# === wire ===


def exception_body(code, message, mark=None):
    """A TApplicationException struct: {1: string message, 2: i32 type[, 3: i32 mark]}."""
    raw = message.encode()
    body = struct.pack(">bhi", T_STRING, 1, len(raw)) + raw
    body += struct.pack(">bhi", T_I32, 2, code)
    if mark is not None:
        body += struct.pack(">bhi", T_I32, 3, mark)
    return body + bytes([T_STOP])


def exception_frame(name, seqid, code, message, mark=None):
    return harness.frame(
        harness.encode_message(name, harness.EXCEPTION, seqid, exception_body(code, message, mark))
    )


def exception_mark(body):
    """Field 3 (i32) of a TApplicationException struct, or None (skips other fields)."""
    pos = 0
    while pos < len(body):
        ftype = body[pos]
        if ftype == T_STOP:
            return None
        (fid,) = struct.unpack(">h", body[pos + 1 : pos + 3])
        pos += 3
        if ftype == T_I32:
            (value,) = struct.unpack(">i", body[pos : pos + 4])
            if fid == 3:
                return value
            pos += 4
        elif ftype == T_STRING:
            (size,) = struct.unpack(">i", body[pos : pos + 4])
            pos += 4 + size
        else:
            raise AssertionError(f"unexpected field type {ftype} in {body!r}")
    return None


def first_string_arg(body):
    """The first string field of an args struct, or None (e.g. `slow(ms, s)` gives `s`)."""
    pos = 0
    try:
        while pos < len(body) and body[pos] != T_STOP:
            ftype = body[pos]
            pos += 3
            if ftype == T_STRING:
                (size,) = struct.unpack(">i", body[pos : pos + 4])
                return body[pos + 4 : pos + 4 + size].decode(errors="replace")
            if ftype == T_I32:
                pos += 4
            else:
                return None
    except struct.error:
        return None
    return None


# === registry ===


def node_data(service, address, marks=1):
    """harness.endpoint_data, with `"marks": marks` unless `marks` is None (a node as the Go
    original writes it)."""
    data = json.loads(harness.endpoint_data(service, address))
    if marks is not None:
        data["marks"] = marks
    return json.dumps(data).encode()


def register(kz, product, service, address, marks=1):
    """Registers `address` as an EPHEMERAL endpoint node of `service`; returns its path."""
    harness.create_service(kz, product, service)
    path = harness.endpoint_path(product, service, address)
    kz.create(path, node_data(service, address, marks), ephemeral=True)
    return path


# === fake endpoint ===


class MarkedEndpoint:
    """A fake upstream endpoint; see the module docstring. `behaviour` and `delay` may be
    changed while it runs (they apply to the calls received from then on)."""

    def __init__(self, name, behaviour, delay=0.0, message=None):
        self.name = name
        self.behaviour = behaviour
        self.delay = delay
        self.message = message or f"fake endpoint {name}: {behaviour}"
        self._lock = threading.Lock()
        self._calls = []  # (monotonic time, method, seqid, tag)
        self._timers = []
        self.server = stuck_peers.FakeServer(self._serve, name=name)
        self.node = None
        self._kz = None

    @property
    def address(self):
        return self.server.address

    def register(self, kz, product, service, marks=1):
        self._kz = kz
        self.node = register(kz, product, service, self.address, marks=marks)
        return self

    def _answer(self, message, tag):
        name = message.name.split(":", 1)[-1]
        behaviour = self.behaviour
        if behaviour == REPLY:
            return stuck_peers.string_reply_frame(name, message.seqid, tag or "")
        mark = {REFUSE: MARK_REFUSED, FAIL: MARK_FAILED, PLAIN_ERROR: None}[behaviour]
        return exception_frame(name, message.seqid, harness.INTERNAL_ERROR, self.message, mark)

    def _serve(self, peer):
        for message in peer.messages():
            if stuck_peers.echo_pings(peer.conn, message):
                continue
            if message.mtype not in (harness.CALL, harness.ONEWAY):
                continue
            tag = first_string_arg(message.body)
            with self._lock:
                self._calls.append((time.monotonic(), message.name, message.seqid, tag))
            if message.mtype == harness.ONEWAY:
                continue
            answer = self._answer(message, tag)
            if self.delay > 0:
                timer = threading.Timer(self.delay, self._send, args=(peer, answer))
                timer.daemon = True
                with self._lock:
                    self._timers.append(timer)
                timer.start()
            else:
                self._send(peer, answer)

    @staticmethod
    def _send(peer, data):
        try:
            peer.conn.send(data)
        except OSError:
            pass  # the proxy closed the connection; the call is its to account for

    def calls(self):
        with self._lock:
            return list(self._calls)

    def count(self):
        with self._lock:
            return len(self._calls)

    def tags(self):
        """collections.Counter of the string arguments received."""
        return collections.Counter(tag for _, _, _, tag in self.calls())

    def close(self):
        if self._kz is not None and self.node is not None:
            try:
                self._kz.delete_async(self.node).get(timeout=2)
            except Exception:  # noqa: BLE001 - teardown goes on (the node is ephemeral)
                pass
        self.server.close()
        with self._lock:
            timers = list(self._timers)
        for timer in timers:
            timer.cancel()


# === a real worker that records handler entries ===


class RecordingWorker(harness.Worker):
    """A real rpc_thrift worker (this file run as a script) with echo_worker.py's handler;
    one line per call entering the handler in `entries_path`; with `gate`, each call blocks
    on entry while that file exists."""

    def __init__(self, gen_dir, address, name, workdir, pool_size=1, gate=None):
        super().__init__(gen_dir, address, name, workdir, pool_size=pool_size)
        self.entries_path = Path(workdir) / f"entries-{name}.txt"
        self.gate = gate

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(self.gen_dir))
        cmd = [sys.executable, str(Path(__file__).resolve()), "worker", self.address]
        cmd += ["--name", self.name, "--pool-size", str(self.pool_size)]
        cmd += ["--entries", str(self.entries_path)]
        if self.gate is not None:
            cmd += ["--gate", str(self.gate)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        return self

    def entries(self):
        """[(method, tag)] of every call that entered the handler, in order."""
        try:
            text = self.entries_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            method, _, tag = line.partition("\t")
            out.append((method, tag))
        return out


class _EntryRecorder:
    """Wraps a handler: each method call is written to the entries file (one O_APPEND write
    per line, whole even with many handler threads), then waits while the gate exists, then
    runs."""

    def __init__(self, inner, entries_path, gate):
        self._inner = inner
        self._fd = os.open(entries_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._gate = gate

    def __getattr__(self, method):
        target = getattr(self._inner, method)

        def run(*args):
            tag = next((a for a in args if isinstance(a, str)), "")
            os.write(self._fd, f"{method}\t{tag}\n".encode())
            if self._gate is not None:
                limit = time.monotonic() + GATE_LIMIT_S
                while os.path.exists(self._gate) and time.monotonic() < limit:
                    time.sleep(0.01)  # a hung handler, polling its release
            return target(*args)

        return run


def _worker_main(argv):
    parser = argparse.ArgumentParser(prog="marked_peers.py worker")
    parser.add_argument("address")
    parser.add_argument("--name", default="worker")
    parser.add_argument("--pool-size", type=int, default=1)
    parser.add_argument("--entries", required=True)
    parser.add_argument("--gate")
    args = parser.parse_args(argv)

    import logging

    from echo import Echo  # generated code, found through PYTHONPATH
    from rpc_thrift import RpcWorker

    spec = importlib.util.spec_from_file_location("echo_worker", harness.ECHO_WORKER)
    echo_worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(echo_worker)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    handler = _EntryRecorder(echo_worker.Handler(args.name), args.entries, args.gate)
    worker = RpcWorker(
        Echo.Processor(handler), args.address, pool_size=args.pool_size, service="echo"
    )
    worker.run()
    print(f"worker {os.getpid()} exited cleanly", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "worker":
        sys.exit("usage: marked_peers.py worker ADDRESS --entries FILE [--gate FILE] ...")
    sys.exit(_worker_main(sys.argv[2:]))
