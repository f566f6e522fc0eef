"""Gray failures (issue 11, CONTRACT section 9 "Time limits nothing can block"): peers that
are alive but stuck. Real ZooKeeper, rpc_proxy, rpc_lb and rpc_thrift workers; the stuck
peers are plain Python sockets (stuck_peers.py) that accept and never read, stop reading
after a few replies, never read their replies, drip bytes, or send frames that must fail one
call only.

What each test shows, and its bounds:
1. An upstream that accepts and never reads: 20 concurrent 256 KB calls through the proxy
   each end with code 6 within 8 s (request_timeout 0.5 s + heartbeat timeout 1.5 s +
   margin); another service keeps answering (each call < 2 s); the proxy drops the stuck
   connection.
2. The same at the LB for a worker that says HELLO and never reads; a real worker keeps
   serving meanwhile; the LB drops the stuck worker.
3. Memory stays bounded (peak RSS < start + 64 MB with max_connection_buffer_bytes 1 MiB and
   max_process_buffer_bytes 8 MiB) while up to 200 MB are pushed: (a) at a backend that stops
   reading after a few replies, (b) by clients that never read their replies (each closed
   within write_timeout_ms 1 s + margin), (c) by clients dripping a frame, at the proxy and
   at an LB front. Calls on other connections answer meanwhile (each < 2 s).
4. 50 calls in flight on one upstream connection, one reply over max_frame_size: that call
   alone fails, the 49 others get their replies, the stream resynchronises.
5. A request over the LB's max_frame_size, pipelined between normal calls, fails alone.
6. A heartbeat frame carrying the seqid of a pending call never completes that call (proxy
   upstream; and an LB's worker connection).
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import stuck_peers
import test_lb
from stuck_peers import (
    Bystander,
    FakeServer,
    FakeWorker,
    MemoryWatch,
    call_frame,
    decode_string_arg,
    describe_message,
    echo_pings,
    ping_frame,
    push,
    string_reply_frame,
)

import harness

# The mesh fixtures of test_lb.py (rpc_lb and rpc_thrift workers).
lb_bin = test_lb.lb_bin
mesh = test_lb.mesh

# CONTRACT section 4 and 9 keys; the reproduction settings.
GRAY = {"request_timeout_ms": 500, "heartbeat_interval_ms": 200, "heartbeat_timeout_ms": 1500}
BUDGETS = {
    **GRAY,
    "write_timeout_ms": 1000,
    "max_connection_buffer_bytes": 1 << 20,
    "max_process_buffer_bytes": 8 << 20,
}
BIG = 256 * 1024
#: A call to a stuck peer ends within this (request timeout + heartbeat timeout + margin).
CALL_BOUND_S = 8.0
#: A call on another connection, to a healthy peer, while a peer is stuck.
BYSTANDER_BOUND_S = 2.0
#: Peak RSS growth allowed while megabytes are pushed at a hop with byte budgets.
RSS_MARGIN_MB = 64
#: A client that never reads is closed within write_timeout_ms (1 s) + this.
CLOSE_MARGIN_S = 5.0


# === fixtures and helpers ===


class Fakes:
    """Fake servers and workers of one test, closed at teardown."""

    def __init__(self):
        self.items = []

    def server(self, handler=None, rcvbuf=None):
        server = FakeServer(handler, rcvbuf=rcvbuf)
        self.items.append(server)
        return server

    def worker(self, back_address, pool_size, handler=None):
        worker = FakeWorker(back_address, pool_size, handler=handler)
        self.items.append(worker)
        return worker

    def close(self):
        for item in reversed(self.items):
            item.close()


@pytest.fixture
def fakes():
    factory = Fakes()
    yield factory
    factory.close()


@dataclass
class CallResult:
    index: int
    seqid: int
    start: float
    end: float
    message: object = None
    error: str = None

    @property
    def seconds(self):
        return self.end - self.start


def big_call(address, name, index, size=BIG, timeout=20.0):
    """One call with a `size`-byte string on its own connection (raw frames); the socket
    gives up after `timeout` s of silence."""
    seqid = 1000 + index
    start = time.monotonic()
    try:
        with harness.RawConnection(address, timeout=timeout) as raw:
            raw.send(call_frame(name, seqid, f"{index}:" + "x" * size))
            payload = raw.recv_frame()
        end = time.monotonic()
        if payload is None:
            return CallResult(index, seqid, start, end, error="connection closed, no answer")
        return CallResult(index, seqid, start, end, message=harness.decode_message(payload))
    except Exception as exc:  # noqa: BLE001 - reported by caller_problems
        return CallResult(index, seqid, start, time.monotonic(), error=f"{type(exc).__name__}")


def caller_problems(results, bound, replies_ok=False):
    """Every call must end with a code-6 TApplicationException for its own seqid, in time.

    With `replies_ok`, a call may also get its own correct reply in time: at the LB, calls
    handed to a stuck worker but never written to it go to another worker (CONTRACT
    section 9), which answers them.
    """
    found = []
    for r in results:
        where = f"caller {r.index}: after {r.seconds:.2f} s"
        if r.error is not None:
            found.append(f"{where}: no answer ({r.error})")
            continue
        m = r.message
        if replies_ok and m.mtype == harness.REPLY and m.seqid == r.seqid:
            text = harness.decode_string_result(m.body)
            if not text.startswith(f"{r.index}:"):
                found.append(f"{where}: another call's reply: {describe_message(m)}")
            elif r.seconds >= bound:
                found.append(f"{where}: answered too late (bound {bound} s)")
            continue
        if m.mtype != harness.EXCEPTION or m.seqid != r.seqid:
            found.append(f"{where}: expected code 6 for seqid {r.seqid}, got {describe_message(m)}")
            continue
        code, _ = harness.decode_app_exception(m.body)
        if code != harness.INTERNAL_ERROR:
            found.append(f"{where}: code {code}, expected 6: {describe_message(m)}")
        elif r.seconds >= bound:
            found.append(f"{where}: answered too late (bound {bound} s): {describe_message(m)}")
    if len(found) > 8:
        found = found[:8] + [f"... {len(found)} of {len(results)} callers in all"]
    return found


def lb_status(admin):
    with urllib.request.urlopen(f"http://{admin}/status", timeout=2) as response:
        return json.loads(response.read())


def wait_bystander(bystander, calls=10, timeout=30):
    """Lets the bystander make at least `calls` calls (it runs while a peer is stuck)."""
    harness.wait_until(
        lambda: len(bystander.samples) >= calls, timeout, lambda: bystander.summary()
    )


def dripper_frame_head(seqid, frame_len):
    """The first bytes of a `frame_len`-byte `echo:echo` CALL whose string fills the rest."""
    name = b"echo:echo"
    header = struct.pack(">Ii", harness.VERSION_1 | harness.CALL, len(name)) + name
    header += struct.pack(">i", seqid)
    string_len = frame_len - len(header) - 7 - 1  # field header + length, stop byte
    return struct.pack(">i", frame_len) + header + struct.pack(">bhi", 11, 1, string_len)


def pushes_summary(results):
    return ", ".join(
        f"{r.sent / 1e6:.1f} MB"
        + (f" closed +{r.closed_at - r.started:.2f} s" if r.closed_at else "")
        + (f" first stall +{r.first_stall - r.started:.2f} s" if r.first_stall else "")
        for r in results
    )


# === 1, 2: a peer that accepts and never reads ===


def test_proxy_upstream_that_never_reads_fails_every_call_in_bounded_time(
    zk, product, backends, proxies, clients, fakes
):
    stuck = fakes.server(rcvbuf=4096)  # accepts, never reads a byte
    harness.register_endpoint(zk, product, "stuck", stuck.address)
    backends.start("B", services=("other",))
    proxy = proxies.start(**GRAY)
    connect_other = lambda: clients(proxy.address, service="other", timeout=10.0)  # noqa: E731
    assert connect_other().whoami() == "B"

    bystander = Bystander(connect_other, name="other").start()
    started = time.monotonic()
    try:
        with ThreadPoolExecutor(20) as pool:
            futures = [pool.submit(big_call, proxy.address, "stuck:echo", i) for i in range(20)]
            results = [f.result(timeout=60) for f in futures]
        wait_bystander(bystander)
    finally:
        bystander.stop()
    calls_over = time.monotonic()
    problems = caller_problems(results, CALL_BOUND_S)
    problems += bystander.problems(BYSTANDER_BOUND_S)

    peers = stuck.accepted()
    if not peers:
        problems.append("the proxy never connected to the stuck endpoint")
    else:
        try:
            harness.wait_until(
                lambda: all(p.dropped_by_remote() for p in peers),
                5,
                lambda: (
                    "the proxy drops its connection to the stuck endpoint: proxy side "
                    + str([p.remote_state() for p in peers])
                ),
            )
        except AssertionError as exc:
            problems.append(str(exc))
    slowest = max(r.seconds for r in results)
    print(
        f"stuck upstream: 20 calls over {calls_over - started:.2f} s, slowest {slowest:.2f} s; "
        f"{bystander.summary()}; {len(peers)} connection(s) to the stuck endpoint, proxy side "
        f"now {[p.remote_state() for p in peers]}"
    )
    assert not problems, "\n".join(problems)


def test_lb_worker_that_never_reads_holds_no_call_past_its_bound(mesh, clients, fakes):
    admin = f"127.0.0.1:{harness.free_port()}"
    lb = mesh.lb(admin_address=admin, **GRAY)
    stuck = fakes.worker(lb.back_address, pool_size=20)  # HELLO, then never reads
    mesh.wait_workers(lb, 1)

    def stuck_full():
        workers = lb_status(admin).get("workers", [])
        return any(w.get("capacity") == 20 and w.get("inflight", 0) >= 20 for w in workers)

    started = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(big_call, lb.frontend, "echo", i) for i in range(20)]
        # The real worker joins once the 20 calls went to the stuck one (or the LB dropped
        # it, or answered them), so none of them can land on the real worker.
        harness.wait_until(
            lambda: stuck.closed_by_lb() or all(f.done() for f in futures) or stuck_full(),
            15,
            lambda: f"the 20 calls reach the stuck worker: {lb_status(admin)}",
        )
        mesh.worker(lb, "real")
        mesh.wait_workers(lb, 2)
        bystander = Bystander(lambda: clients(lb.frontend, timeout=10.0), name="real").start()
        try:
            results = [f.result(timeout=60) for f in futures]
            wait_bystander(bystander)
        finally:
            bystander.stop()
    calls_over = time.monotonic()
    problems = caller_problems(results, CALL_BOUND_S, replies_ok=True)
    failed = sum(
        1 for r in results if r.message is not None and r.message.mtype == harness.EXCEPTION
    )
    if failed == 0:
        problems.append(
            "no call failed: the call being written to the stuck worker must get code 6"
        )
    problems += bystander.problems(BYSTANDER_BOUND_S)
    try:
        harness.wait_until(stuck.closed_by_lb, 5, "the LB drops the worker that never reads")
    except AssertionError as exc:
        problems.append(str(exc))
    slowest = max(r.seconds for r in results)
    print(
        f"stuck worker: 20 calls over {calls_over - started:.2f} s, slowest {slowest:.2f} s; "
        f"{bystander.summary()}; stuck worker closed by the LB: {stuck.closed_by_lb()}"
    )
    assert not problems, "\n".join(problems)


# === 3: memory bounded ===


def reply_then_stop(replies):
    """A backend that answers `replies` calls (and pings) on a connection, then never reads
    it again (it stays open)."""

    def handler(peer):
        answered = 0
        for message in peer.messages():
            if echo_pings(peer.conn, message):
                continue
            if message.mtype == harness.CALL:
                text = decode_string_arg(message.body)
                peer.conn.send(string_reply_frame(message.name, message.seqid, text))
                answered += 1
                if answered >= replies:
                    return

    return handler


class ReplyCounter:
    """Reads replies on a dup of a pushing client's socket (its own timeouts) until stopped."""

    def __init__(self, sock):
        self.conn = stuck_peers.FrameSocket(sock.dup())
        self.kinds = {}
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                message = self.conn.read_message(0.2)
            except socket.timeout:
                continue
            except (EOFError, OSError, AssertionError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                return
            key = message.mtype
            if message.mtype == harness.EXCEPTION:
                key = f"code {harness.decode_app_exception(message.body)[0]}"
            self.kinds[key] = self.kinds.get(key, 0) + 1

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=10)
        self.conn.close()


def push_while_watched(socks, frame, seconds, stall_limit, memory, bystander, readers=()):
    """Pushes 50 MB of `frame` on each socket at once for at most `seconds` (see `push`),
    lets the bystander make its calls meanwhile, then stops the watchers and closes the
    sockets. Returns each socket's push result."""
    deadline = time.monotonic() + seconds
    try:
        with ThreadPoolExecutor(len(socks)) as pool:
            pushes = list(
                pool.map(
                    lambda s: push(s, frame, 50 << 20, deadline, stall_limit=stall_limit), socks
                )
            )
        wait_bystander(bystander)
    finally:
        bystander.stop()
        memory.stop()
        for reader in readers:
            reader.stop()
        for s in socks:
            s.close()
    return pushes


def test_memory_bounded_when_backend_stops_reading(zk, product, backends, proxies, clients, fakes):
    server = fakes.server(reply_then_stop(3), rcvbuf=4096)
    harness.register_endpoint(zk, product, "stalls", server.address)
    backends.start("B", services=("other",))
    proxy = proxies.start(**BUDGETS)
    connect_other = lambda: clients(proxy.address, service="other", timeout=10.0)  # noqa: E731
    assert connect_other().whoami() == "B"
    with harness.RawConnection(proxy.address, timeout=10) as raw:
        raw.send(call_frame("stalls:echo", 1, "warm"))
        assert describe_message(raw.recv_message()).endswith("'warm'")

    # 4 clients x 50 MB of 256 KB calls = 200 MB; 4 connection budgets < the process budget.
    frame = call_frame("stalls:echo", 7, "x" * BIG)
    socks = [harness._connect(proxy.address, 10.0) for _ in range(4)]
    readers = [ReplyCounter(s) for s in socks]
    memory = MemoryWatch(proxy.pid).start()
    bystander = Bystander(connect_other, name="other").start()
    pushes = push_while_watched(socks, frame, 20, 3.0, memory, bystander, readers)
    print(
        f"backend stops reading: pushed {pushes_summary(pushes)}; replies "
        f"{[r.kinds for r in readers]}; {memory.summary()}; {bystander.summary()}"
    )
    problems = bystander.problems(BYSTANDER_BOUND_S)
    if memory.growth >= RSS_MARGIN_MB:
        pushed = sum(p.sent for p in pushes) / 1e6
        problems.insert(
            0,
            f"proxy memory grew by {memory.growth:.0f} MB while {pushed:.0f} MB "
            f"were pushed (bound {RSS_MARGIN_MB} MB): {memory.summary()}",
        )
    assert not problems, "\n".join(problems)


def test_client_that_never_reads_is_closed_and_costs_bounded_memory(backends, proxies, clients):
    backends.start("A", services=("echo",))
    backends.start("B", services=("other",))
    proxy = proxies.start(**BUDGETS)
    connect_other = lambda: clients(proxy.address, service="other", timeout=10.0)  # noqa: E731
    assert connect_other().whoami() == "B"
    assert clients(proxy.address).echo("warm") == "warm"

    frame = call_frame("echo:echo", 7, "x" * BIG)
    socks = [harness._connect(proxy.address, 10.0) for _ in range(4)]  # never read
    memory = MemoryWatch(proxy.pid).start()
    bystander = Bystander(connect_other, name="other").start()
    # No stall limit: each pushes until the proxy closes it or the deadline.
    pushes = push_while_watched(socks, frame, 15, 60, memory, bystander)
    print(
        f"clients never read: {pushes_summary(pushes)}; {memory.summary()}; {bystander.summary()}"
    )
    problems = bystander.problems(BYSTANDER_BOUND_S)
    bound = BUDGETS["write_timeout_ms"] / 1000 + CLOSE_MARGIN_S
    for i, p in enumerate(pushes):
        if p.closed_at is None:
            problems.append(
                f"client {i} (never reads) still open {p.ended - p.started:.1f} s after it began "
                f"sending ({p.sent / 1e6:.1f} MB accepted, sends blocked since "
                f"+{(p.first_stall or p.ended) - p.started:.2f} s); expected closed within "
                f"{bound:.0f} s (write_timeout_ms + margin)"
            )
        elif p.closed_at - p.started > bound:
            problems.append(
                f"client {i} closed only {p.closed_at - p.started:.2f} s after it "
                f"began sending (bound {bound:.0f} s)"
            )
    if memory.growth >= RSS_MARGIN_MB:
        problems.append(f"proxy memory grew by {memory.growth:.0f} MB: {memory.summary()}")
    assert not problems, "\n".join(problems)


def drip_at(address, pid, bystander, drippers=6, bulk=33 << 20):
    """`drippers` connections each start a frame longer than `bulk`, push `bulk` bytes of it
    as fast as the hop takes them, then drip one byte every 0.1 s for 3 s. Returns the
    pushes and the MemoryWatch. `drippers` connection budgets stay under the process budget.
    """
    frame_len = bulk + 1000
    filler = b"d" * (1 << 20)
    socks = [harness._connect(address, 10.0) for _ in range(drippers)]
    memory = MemoryWatch(pid).start()
    bystander.start()
    deadline = time.monotonic() + 25

    def one(index):
        sock = socks[index]
        result = stuck_peers.PushResult()
        head = dripper_frame_head(index + 1, frame_len)
        push(sock, head, len(head), deadline, stall_limit=3.0, result=result)
        push(sock, filler, bulk - len(head), deadline, stall_limit=2.0, result=result)
        drip_until = time.monotonic() + 3.0
        while result.closed_at is None and time.monotonic() < drip_until:
            push(sock, b"d", 1, drip_until, stall_limit=0.5, result=result)
            time.sleep(0.1)  # the drip's pace, not synchronisation
        return result

    try:
        with ThreadPoolExecutor(drippers) as pool:
            pushes = list(pool.map(one, range(drippers)))
        wait_bystander(bystander)
    finally:
        bystander.stop()
        memory.stop()
        for s in socks:
            s.close()
    return pushes, memory


def drip_problems(hop, pushes, memory, bystander):
    problems = bystander.problems(BYSTANDER_BOUND_S)
    if memory.growth >= RSS_MARGIN_MB:
        pushed = sum(p.sent for p in pushes) / 1e6
        problems.insert(
            0,
            f"{hop} memory grew by {memory.growth:.0f} MB while {pushed:.0f} MB "
            f"of unfinished frames were pushed (bound {RSS_MARGIN_MB} MB): "
            f"{memory.summary()}",
        )
    return problems


def test_memory_bounded_with_dripping_clients_at_the_proxy(backends, proxies, clients):
    backends.start("B", services=("other",))
    proxy = proxies.start(max_frame_size=40_000_000, **BUDGETS)
    connect_other = lambda: clients(proxy.address, service="other", timeout=10.0)  # noqa: E731
    assert connect_other().whoami() == "B"
    bystander = Bystander(connect_other, name="other")
    pushes, memory = drip_at(proxy.address, proxy.pid, bystander)
    print(f"drip at the proxy: {pushes_summary(pushes)}; {memory.summary()}; {bystander.summary()}")
    problems = drip_problems("proxy", pushes, memory, bystander)
    assert not problems, "\n".join(problems)


def test_memory_bounded_with_dripping_clients_at_the_lb_front(mesh, clients):
    lb = mesh.lb(max_frame_size=40_000_000, **BUDGETS)
    mesh.worker(lb, "real", pool_size=2)
    mesh.wait_workers(lb, 1)
    connect = lambda: clients(lb.frontend, timeout=10.0)  # noqa: E731
    assert connect().echo("warm") == "warm"
    bystander = Bystander(connect, name="lb-front")
    pushes, memory = drip_at(lb.frontend, lb.pid, bystander)
    print(f"drip at the LB: {pushes_summary(pushes)}; {memory.summary()}; {bystander.summary()}")
    problems = drip_problems("LB", pushes, memory, bystander)
    assert not problems, "\n".join(problems)


# === 4, 5: one bad frame fails one call ===


def batch_then_serve(count, oversized_arg, oversized_size):
    """A backend that holds the first `count` calls of a connection, then answers them all
    in one write, last first, the call whose argument is `oversized_arg` with a string of
    `oversized_size` bytes; later calls are answered at once. A batch short of `count` is
    released after 3 s without a new call (so a test fails on its replies, not a hang)."""

    def reply(message, text):
        body = "y" * oversized_size if text == oversized_arg else text
        return string_reply_frame(message.name, message.seqid, body)

    def handler(peer):
        held = []
        last_call = time.monotonic()
        while not peer.stopping:
            try:
                message = peer.conn.read_message(0.2)
            except socket.timeout:
                if held and time.monotonic() - last_call > 3.0:
                    peer.info.setdefault("batches", []).append(len(held))
                    peer.conn.send(b"".join(reply(m, t) for m, t in reversed(held)))
                    held = None
                continue
            except (EOFError, OSError):
                return
            if echo_pings(peer.conn, message) or message.mtype != harness.CALL:
                continue
            last_call = time.monotonic()
            text = decode_string_arg(message.body)
            if held is None:
                peer.conn.send(reply(message, text))
                continue
            held.append((message, text))
            if len(held) == count:
                peer.info.setdefault("batches", []).append(len(held))
                peer.conn.send(b"".join(reply(m, t) for m, t in reversed(held)))
                held = None

    return handler


def test_oversized_reply_fails_only_its_call_among_50_in_flight(zk, product, proxies, fakes):
    server = fakes.server(batch_then_serve(50, "call-17", 100 * 1024))
    harness.register_endpoint(zk, product, "batch", server.address)
    proxy = proxies.start(max_frame_size=65536, request_timeout_ms=5000)
    problems = []
    with harness.RawConnection(proxy.address, timeout=20) as raw:
        raw.send(b"".join(call_frame("batch:echo", 500 + i, f"call-{i}") for i in range(50)))
        replies = []
        for _ in range(50):
            payload = raw.recv_frame()
            if payload is None:
                problems.append(f"connection closed after {len(replies)} of 50 replies")
                break
            replies.append(harness.decode_message(payload))
        failed = []
        for i, m in enumerate(replies):
            if m.seqid != 500 + i:
                problems.append(f"reply {i}: seqid {m.seqid}, expected {500 + i}")
            elif i == 17:
                code = harness.decode_app_exception(m.body)[0] if m.mtype == 3 else None
                if code not in (harness.INTERNAL_ERROR, harness.PROTOCOL_ERROR):
                    problems.append(
                        f"call-17 (oversized reply): expected code 6 or 7, got "
                        f"{describe_message(m)}"
                    )
            elif m.mtype != harness.REPLY or harness.decode_string_result(m.body) != f"call-{i}":
                failed.append(f"call-{i}: {describe_message(m)}")
        if failed:
            problems.append(
                f"{len(failed)} of the 49 normal calls did not get their reply: "
                + "; ".join(failed[:5])
            )
        # Later calls on the same connection and endpoint.
        for n in range(5):
            try:
                raw.send(call_frame("batch:echo", 900 + n, f"later-{n}"))
                m = raw.recv_message()
            except (OSError, AssertionError, EOFError) as exc:
                problems.append(f"later-{n}: {type(exc).__name__}: {exc}")
                break
            if m.mtype != harness.REPLY or harness.decode_string_result(m.body) != f"later-{n}":
                problems.append(f"later-{n}: {describe_message(m)}")
    peers = server.accepted()
    print(
        f"oversized reply: {len(replies)} replies, batches per upstream connection "
        f"{[p.info.get('batches') for p in peers]}"
    )
    if len(peers) != 1:
        problems.append(
            f"the proxy opened {len(peers)} connections to the endpoint: the "
            "stream should resynchronise after the oversized reply, not reconnect"
        )
    elif peers[0].info.get("batches", [None])[:1] != [50]:
        problems.append(
            f"the 50 calls were not all in flight on one connection: batches "
            f"{peers[0].info.get('batches')}"
        )
    assert not problems, "\n".join(problems)


def is_reply(message, seqid, text):
    return (
        message is not None
        and (message.mtype, message.seqid) == (harness.REPLY, seqid)
        and harness.decode_string_result(message.body) == text
    )


def test_oversized_request_at_the_lb_front_fails_only_its_call(mesh):
    lb = mesh.lb(max_frame_size=65536)
    mesh.worker(lb, "real", pool_size=2)
    mesh.wait_workers(lb, 1)
    problems = []
    got = {}  # seqid -> reply (the LB front answers in completion order)
    closed = False
    with harness.RawConnection(lb.frontend, timeout=10) as raw:
        try:
            raw.send(
                call_frame("echo", 1, "before")
                + call_frame("echo", 2, "z" * (100 * 1024))  # over max_frame_size
                + call_frame("echo", 3, "behind")
            )
        except OSError as exc:
            problems.append(f"sending the three calls failed: {type(exc).__name__}: {exc}")
        while len(got) < 3:
            try:
                payload = raw.recv_frame()
            except socket.timeout:
                problems.append(f"no further reply within 10 s after seqids {sorted(got)}")
                break
            if payload is None:
                closed = True
                problems.append(
                    f"the LB closed the connection after replies to seqids {sorted(got)}"
                )
                break
            message = harness.decode_message(payload)
            got[message.seqid] = message
        for seqid, text in ((1, "before"), (3, "behind")):
            if not is_reply(got.get(seqid), seqid, text):
                problems.append(f"seqid {seqid} ({text!r}): {describe_message(got.get(seqid))}")
        oversized = got.get(2)
        code = None
        if oversized is not None and oversized.mtype == harness.EXCEPTION:
            code = harness.decode_app_exception(oversized.body)[0]
        if code not in (harness.INTERNAL_ERROR, harness.PROTOCOL_ERROR):
            problems.append(
                f"seqid 2 (oversized) should get code 6 or 7: {describe_message(oversized)}"
            )
        stray = [describe_message(m) for s, m in got.items() if s not in (1, 2, 3)]
        if stray:
            problems.append(
                f"replies that belong to no call (the oversized call's error must "
                f"carry its seqid): {stray}"
            )
        if not closed:
            try:
                raw.send(call_frame("echo", 4, "after"))
                after = raw.recv_message()
                if not is_reply(after, 4, "after"):
                    problems.append(f"a call after them: {describe_message(after)}")
            except (OSError, AssertionError) as exc:
                problems.append(f"a call after them: {type(exc).__name__}: {exc}")
    assert not problems, "\n".join(problems)


# === 6: a heartbeat never completes a call ===


def ping_then_reply(peer):
    """Answers each call with a heartbeat frame carrying the call's seqid, then the reply."""
    sent = set()
    for message in peer.messages():
        if echo_pings(peer.conn, message, sent) or message.mtype != harness.CALL:
            continue
        sent.add(message.seqid)
        text = decode_string_arg(message.body)
        peer.conn.send(ping_frame(message.seqid))
        peer.conn.send(string_reply_frame(message.name, message.seqid, text))


def test_heartbeat_with_a_pending_seqid_does_not_complete_the_call_at_the_proxy(
    zk, product, proxies, clients, fakes
):
    server = fakes.server(ping_then_reply)
    harness.register_endpoint(zk, product, "hb", server.address)
    proxy = proxies.start(request_timeout_ms=5000)
    conn = clients(proxy.address, service="hb", timeout=10.0)
    answers = []
    for n in range(5):
        try:
            answers.append(conn.echo(f"hb-{n}"))
        except Exception as exc:  # noqa: BLE001 - the assertion shows it
            answers.append(f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}")
    assert answers == [f"hb-{n}" for n in range(5)], answers


def test_heartbeat_with_a_pending_seqid_does_not_complete_the_call_at_the_lb(mesh, fakes):
    lb = mesh.lb(request_timeout_ms=5000)
    worker = fakes.worker(lb.back_address, pool_size=1, handler=ping_then_reply)
    mesh.wait_workers(lb, 1)
    wrong = []
    with harness.RawConnection(lb.frontend, timeout=10) as raw:
        for n in range(5):
            raw.send(call_frame("echo", 40 + n, f"hb-{n}"))
            answer = raw.recv_message()
            if not is_reply(answer, 40 + n, f"hb-{n}"):
                wrong.append(f"hb-{n}: {describe_message(answer)}")
    assert worker.error is None, worker.error
    assert not wrong, wrong
