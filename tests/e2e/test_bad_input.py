"""Bad input (issue 6): malformed frames and abusive peers, at the LB's front socket, at its
back (worker) socket, and at the proxy for the cases tests/e2e/test_protocol.py does not
cover. Each input must get the CONTRACT's answer (a code-7 TApplicationException, or a closed
connection; never silence), and afterwards the process must be up, its memory bounded, and
other clients (already connected, and new ones) served.

Also the reliability rules on top of the CONTRACT: a back connection takes calls only once it
proved to be a worker (HELLO, or the echo of the ping the LB sends on accept); a frame once
started must be finished within 30 s at the proxy and the LB front; the LB front closes
connections idle for `front_idle_timeout_ms` (pings count); a code-7 reply to a bad header
carries the caller's seqid wherever it can be read.

One stack serves the whole module: ZooKeeper (the session's), an rpc_lb with one rpc_thrift
worker (pool_size 2), and an rpc_proxy routing to that LB. A test that broke it would make
the tests after it fail too, which is the point: nothing here may break it.
"""

import os
import random
import re
import selectors
import shutil
import socket
import struct
import time
import types
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Optional

import pytest
import test_lb

import harness

lb_bin = test_lb.lb_bin  # the session fixture of test_lb.py

CALL, REPLY, EXCEPTION, ONEWAY = harness.CALL, harness.REPLY, harness.EXCEPTION, harness.ONEWAY
STRICT_CALL = struct.pack(">I", harness.VERSION_1 | CALL)
MAX = harness.DEFAULT_MAX_FRAME_SIZE
MB = 1024 * 1024


# === the stack ===


@pytest.fixture(scope="module")
def stack(zk_server, lb_bin, proxy_bin, echo_idl):  # noqa: F811 - lb_bin is the fixture
    zk_server.ensure_running()
    workdir = harness.short_tempdir("rpbad-")
    kz = harness.kazoo_client(zk_server.address)
    product = f"e2e_bad_input_{uuid.uuid4().hex[:8]}"
    (workdir / "lb").mkdir()
    (workdir / "proxy").mkdir()
    lb = harness.Lb(
        lb_bin, workdir / "lb", {"zk": zk_server.address, "product": product, "service": "echo"}
    )
    proxy = harness.Proxy(
        proxy_bin,
        workdir / "proxy",
        {
            "zk": zk_server.address,
            "product": product,
            "proxy_address": str(workdir / "proxy" / "proxy.sock"),
        },
    )
    worker = harness.Worker(echo_idl.gen_dir, lb.back_address, "w0", workdir, pool_size=2)
    s = types.SimpleNamespace(
        zk_server=zk_server,
        kz=kz,
        product=product,
        workdir=workdir,
        lb=lb,
        proxy=proxy,
        worker=worker,
        idl=echo_idl,
        proxy_bin=proxy_bin,
        extra=[],
    )
    try:
        lb.start()
        worker.start()
        node = lb.node_path(product)
        harness.wait_until(
            lambda: kz.exists_async(node).get(timeout=5), 20, lambda: f"LB node\n{lb.output()}"
        )
        proxy.start()
        yield s
    finally:
        for p in [proxy, *s.extra]:
            if p.proc is not None:
                p.kill()
        worker.kill()
        lb.kill()
        print(f"=== rpc_lb\n{lb.output()}\n=== rpc_proxy\n{proxy.output()}")
        print(f"=== worker\n{harness._tail(worker.log(), 3000)}")
        kz.stop()
        kz.close()
        shutil.rmtree(workdir, ignore_errors=True)


def target_of(stack, name):
    return {"lb": stack.lb, "proxy": stack.proxy}[name]


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def good_call(raw, seqid, text=None):
    """A well-formed echo call on `raw`; asserts its reply."""
    text = text or f"ok-{seqid}"
    raw.send_message("echo:echo", CALL, seqid, harness.string_args(text))
    reply = raw.recv_message()
    assert (reply.name, reply.mtype, reply.seqid) == ("echo", REPLY, seqid), reply
    assert harness.decode_string_result(reply.body) == text


class Bystanders:
    """Connections opened before a bad input, to the proxy and to the LB front, each checked
    before and after: other clients must not notice anything."""

    def __init__(self, stack):
        self.stack = stack
        self.proxy = harness.EchoConnection(stack.idl, stack.proxy.address, timeout=10.0)
        self.lb = harness.RawConnection(stack.lb.frontend, timeout=10.0)
        self.n = 0
        self.check()

    def check(self):
        s = self.stack
        assert s.lb.alive(), f"rpc_lb died\n{s.lb.output()}"
        assert s.proxy.alive(), f"rpc_proxy died\n{s.proxy.output()}"
        assert s.worker.proc.poll() is None, f"the worker died\n{s.worker.log()}"
        self.n += 1
        assert self.proxy.echo(f"bystander-{self.n}") == f"bystander-{self.n}"
        good_call(self.lb, 1000 + self.n)
        # And new connections.
        with harness.EchoConnection(s.idl, s.proxy.address, timeout=10.0) as fresh:
            assert fresh.echo("fresh") == "fresh"
        with harness.RawConnection(s.lb.frontend, timeout=10.0) as fresh:
            good_call(fresh, 7)

    def close(self):
        self.proxy.close()
        self.lb.close()


@pytest.fixture
def bystanders(stack):
    b = Bystanders(stack)
    yield b
    b.check()
    b.close()


def reply_or_close(raw):
    """The next message, or None when the peer closed the connection; silence fails."""
    try:
        payload = raw.recv_frame()
    except (socket.timeout, TimeoutError):
        pytest.fail("neither a reply nor a closed connection (silence)")
    except (EOFError, ConnectionResetError):
        return None
    return None if payload is None else harness.decode_message(payload)


def app_exception(reply):
    assert reply.mtype == EXCEPTION, f"expected a TApplicationException, got {reply}"
    return harness.decode_app_exception(reply.body)


# === the catalogue: one bad input per connection ===


@dataclass(frozen=True)
class Case:
    """`data` sent on a fresh connection; what the LB front and the proxy must answer.

    Expectations (None: not sent there, test_protocol.py covers it for the proxy):
    - protocol_error: a code-7 reply (seqid checked when given); the connection stays open
      (CONTRACT: a misplaced message type).
    - protocol_error_may_close: a code-7 reply; the connection may close afterwards
      (CONTRACT: a malformed frame or header).
    - refused: a code-7 reply or a closed connection, never silence (cannot be framed).
    - exception: a TApplicationException with `seqid` (any code); the connection stays open.
    - reply: a normal reply with `seqid`; the connection stays open.
    - answered: a reply or a TApplicationException with `seqid`; the connection stays open.
    - echo: the very same frame back (an LB echoes heartbeats unchanged).
    - ping_reply: `("ping", REPLY, seqid)` (the proxy answers client pings itself).
    - no_reply: nothing for this frame: the next frame answers the call sent after it.
    """

    data: bytes
    lb: Optional[str]
    proxy: Optional[str]
    seqid: Optional[int] = None


def msg(name, mtype, seqid, body=harness.EMPTY_STRUCT):
    return harness.frame(harness.encode_message(name, mtype, seqid, body))


GARBAGE_BODY = b"\x0b\x00\x01\x7f\xff\xff\xff"  # a string field claiming 2 GiB


def _catalogue():
    rng = random.Random(6)
    noise = bytes([0x7F]) + bytes(rng.randrange(256) for _ in range(200))
    cases = {
        "http_request": Case(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", "refused", None),
        "random_noise": Case(noise, "refused", None),
        "length_zero": Case(struct.pack(">i", 0) + b"\x80\x01\x00\x01", "refused", None),
        "length_minus_1": Case(struct.pack(">i", -1) + b"\x80\x01\x00\x01", "refused", None),
        "length_min_i32": Case(struct.pack(">i", -(2**31)) + b"\x80\x01", "refused", None),
        "length_over_max": Case(struct.pack(">i", MAX + 1) + b"\x80\x01\x00\x01", "refused", None),
        "length_max_i32": Case(struct.pack(">i", 2**31 - 1) + b"\x80\x01\x00\x01", "refused", None),
        "truncated_header": Case(
            harness.frame(b"\x80\x01\x00\x01\x00\x00"), "protocol_error_may_close", None
        ),
        # A bad header whose seqid can still be read: the code-7 reply carries it.
        "non_strict_header": Case(
            harness.frame(
                struct.pack(">i", 9) + b"echo:echo" + struct.pack(">bi", CALL, 5) + b"\x00"
            ),
            "protocol_error_may_close",
            None,
            5,
        ),
        "bad_version": Case(
            harness.frame(b"\x80\x02\x00\x01" + struct.pack(">i", 4) + b"e:ex" + b"\0\0\0\1"),
            "protocol_error_may_close",
            None,
            1,
        ),
        "name_past_frame_end": Case(
            harness.frame(STRICT_CALL + struct.pack(">i", 1000) + b"echo:echo"),
            "protocol_error_may_close",
            None,
        ),
        "negative_name_length": Case(
            harness.frame(STRICT_CALL + struct.pack(">i", -5) + b"x" * 20),
            "protocol_error_may_close",
            None,
        ),
        "name_length_over_4096": Case(
            harness.frame(STRICT_CALL + struct.pack(">i", 4097) + b"a" * 4097 + b"\0\0\0\1\0"),
            "protocol_error_may_close",
            "protocol_error_may_close",
        ),
        "name_length_max_i32": Case(
            harness.frame(STRICT_CALL + struct.pack(">i", 2**31 - 1) + b"x" * 16),
            "protocol_error_may_close",
            "protocol_error_may_close",
        ),
        "seqid_missing": Case(
            harness.frame(STRICT_CALL + struct.pack(">i", 9) + b"echo:echo"),
            "protocol_error_may_close",
            "protocol_error_may_close",
        ),
        "invalid_utf8_method": Case(
            msg(b"echo:\xff\xfe", CALL, 31, harness.string_args("x")),
            "protocol_error_may_close",
            "protocol_error_may_close",
            31,
        ),
        "invalid_utf8_service": Case(
            msg(b"\xc3(:echo", CALL, 32, harness.string_args("x")),
            "protocol_error_may_close",
            "protocol_error_may_close",
            32,
        ),
        # The LB takes names with or without `service:`; a bare unknown method reaches the
        # worker, whose processor answers UNKNOWN_METHOD.
        "no_colon_unknown_method": Case(msg("nosuch", CALL, 33), "exception", None, 33),
        "empty_service": Case(
            msg(":echo", CALL, 34, harness.string_args("x")), "answered", "exception", 34
        ),
        "empty_method": Case(msg("echo:", CALL, 35), "exception", "exception", 35),
        "empty_name": Case(msg("", CALL, 36), "exception", "exception", 36),
        "unknown_method": Case(msg("echo:nosuch", CALL, 37), "exception", "exception", 37),
        "reply_as_call": Case(msg("echo:echo", REPLY, 40), "protocol_error", None, 40),
        "exception_as_call": Case(msg("echo:echo", EXCEPTION, 41), "protocol_error", None, 41),
        "garbage_body": Case(
            msg("echo:echo", CALL, 50, GARBAGE_BODY), "exception", "exception", 50
        ),
        "body_missing": Case(msg("echo:echo", CALL, 51, b""), "exception", "exception", 51),
        "oneway_garbage_body": Case(
            msg("echo:notify", ONEWAY, 52, GARBAGE_BODY), "no_reply", "no_reply"
        ),
        "ping_with_body": Case(
            msg("ping", harness.HEARTBEAT, 53, harness.string_args("p" * 1000)),
            "echo",
            "ping_reply",
            53,
        ),
        "negative_seqid": Case(
            msg("echo:echo", CALL, -7, harness.string_args("ok--7")), "reply", "reply", -7
        ),
    }
    for mtype in (0, 5, 19, harness.STOP, harness.STOP_CONFIRM, 23, 24, 99, 255):
        on_proxy = mtype in (0, 23, 24, 255)  # the others are in test_protocol.py
        cases[f"type_{mtype}"] = Case(
            msg("echo:echo", mtype, 60 + mtype),
            "protocol_error",
            "protocol_error" if on_proxy else None,
            60 + mtype,
        )
    return cases


CATALOGUE = _catalogue()
PARAMS = [
    pytest.param(target, name, id=f"{target}-{name}")
    for target in ("lb", "proxy")
    for name, case in CATALOGUE.items()
    if getattr(case, target) is not None
]


def answer_text(reply):
    if reply is None:
        return "closed"
    if reply.mtype == EXCEPTION:
        code, text = harness.decode_app_exception(reply.body)
        return f"code {code} {text[:90]!r}"
    return f"type {reply.mtype} seqid {reply.seqid}"


def check_answer(raw, case, expect):
    """Reads the answer to `case.data` and checks it; returns (whether the connection must
    still serve calls, what was answered)."""
    if expect == "no_reply":
        good_call(raw, 9001)  # the next frame must be this call's reply
        return True, "nothing"
    reply = reply_or_close(raw)
    seen = answer_text(reply)
    if expect == "refused":
        if reply is not None:
            code, text = app_exception(reply)
            assert code == harness.PROTOCOL_ERROR, (code, text)
        return False, seen
    assert reply is not None, f"the connection was closed instead of an answer ({expect})"
    if case.seqid is not None and expect != "echo":
        assert reply.seqid == case.seqid, f"seqid {reply.seqid}, sent {case.seqid}: {reply}"
    if expect.startswith("protocol_error"):
        code, text = app_exception(reply)
        assert code == harness.PROTOCOL_ERROR, (code, text)
        assert text, "a protocol error says what was wrong"
        return expect == "protocol_error", seen
    if expect == "exception":
        app_exception(reply)
    elif expect == "reply":
        assert reply.mtype == REPLY, reply
        assert harness.decode_string_result(reply.body) == f"ok-{case.seqid}"
    elif expect == "answered":
        assert reply.mtype in (REPLY, EXCEPTION), reply
    elif expect == "echo":
        echoed = harness.frame(
            harness.encode_message(reply.name, reply.mtype, reply.seqid, reply.body)
        )
        assert echoed == case.data, f"the heartbeat was not echoed unchanged: {reply}"
    elif expect == "ping_reply":
        assert (reply.name, reply.mtype) == ("ping", REPLY), reply
    else:
        raise AssertionError(f"unknown expectation {expect}")
    return True, seen


@pytest.mark.parametrize(("target", "name"), PARAMS)
def test_bad_input_catalogue(stack, bystanders, target, name):
    case = CATALOGUE[name]
    expect = getattr(case, target)
    process = target_of(stack, target)
    with harness.RawConnection(process.address, timeout=5.0) as raw:
        raw.send(case.data)
        must_stay_open, seen = check_answer(raw, case, expect)
        if must_stay_open:
            good_call(raw, 4242)  # the same connection goes on serving
            kept = "kept"
        elif expect == "protocol_error_may_close":
            # Allowed to close; which one it does is reported.
            try:
                good_call(raw, 4243)
                kept = "kept (may close)"
            except (OSError, EOFError, AssertionError) as exc:
                kept = f"closed (allowed): {type(exc).__name__}"
        else:
            kept = "not reused"
    print(f"{target} {name}: {expect} as required ({seen}); connection {kept}")
    bystanders.check()


@pytest.mark.parametrize("target", ["lb", "proxy"])
def test_pipelined_burst_then_unframeable_bytes(stack, bystanders, target):
    """200 calls in one write, then a zero length: every call is answered (by the proxy in
    request order, by the LB in completion order), the bad length gets code 7 or a close."""
    process = target_of(stack, target)
    burst = b"".join(
        msg("echo:echo", CALL, k, harness.string_args(f"ok-{k}")) for k in range(1, 201)
    )
    with harness.RawConnection(process.address, timeout=10.0) as raw:
        raw.send(burst + struct.pack(">i", 0) + b"\x80\x01\x00\x01")
        seen, errors = [], []
        while True:
            reply = reply_or_close(raw)
            if reply is None:
                break
            if reply.mtype == EXCEPTION:
                errors.append((len(seen), app_exception(reply)))
                continue
            assert reply.mtype == REPLY, reply
            assert harness.decode_string_result(reply.body) == f"ok-{reply.seqid}"
            seen.append(reply.seqid)
    print(f"{target}: {len(seen)} replies; code-7 errors (after n replies, error): {errors}")
    assert sorted(seen) == list(range(1, 201)), f"{200 - len(seen)} calls lost"
    assert len(errors) <= 1 and all(e[1][0] == harness.PROTOCOL_ERROR for e in errors), errors
    if target == "proxy":
        assert seen == list(range(1, 201)), "the proxy answers in request order"
        assert all(after == 200 for after, _ in errors), "the error comes in its place: last"


# === abusive peers ===


@pytest.mark.parametrize("target", ["lb", "proxy"])
def test_clients_stalled_mid_frame(stack, bystanders, target):
    """200 connections each announce a 16 MB frame and send 8 KiB of it; one more stalls
    halfway through a well-formed call. Nobody else notices, memory stays bounded, and the
    half-sent call is answered once its rest arrives."""
    process = target_of(stack, target)
    pid = process.pid
    rss_before, fds_before = rss_kb(pid), fd_count(pid)
    stalled = []
    try:
        for _ in range(200):
            raw = harness.RawConnection(process.address, timeout=5.0)
            raw.send(struct.pack(">i", MAX) + b"\x80\x01\x00\x01" + b"\x00" * 8188)
            stalled.append(raw)
        call = msg("echo:echo", CALL, 77, harness.string_args("ok-77"))
        half = harness.RawConnection(process.address, timeout=5.0)
        stalled.append(half)
        half.send(call[: len(call) // 2])
        bystanders.check()
        # A fixed 3 s observation window: is the stalled connection closed by the server?
        half.sock.settimeout(3.0)
        started = time.monotonic()
        try:
            closed = half.sock.recv(1) == b""
        except (socket.timeout, TimeoutError):
            closed = False
        except ConnectionResetError:
            closed = True
        waited = time.monotonic() - started
        rss_after = rss_kb(pid)
        bystanders.check()
        fate = f"was closed after {waited:.1f} s" if closed else "is still open after 3 s"
        print(
            f"{target}: 201 stalled connections; RSS {rss_before} -> {rss_after} kB, fds "
            f"{fds_before} -> {fd_count(pid)}; the half-sent call's connection "
            f"{fate}"
        )
        assert rss_after - rss_before < 100 * 1024, (
            f"{target} grew by {(rss_after - rss_before) // 1024} MB for 201 stalled clients"
        )
        if not closed:
            half.sock.settimeout(5.0)
            half.send(call[len(call) // 2 :])
            reply = half.recv_message()
            assert (reply.mtype, reply.seqid) == (REPLY, 77), reply
    finally:
        for raw in stalled:
            raw.close()


@pytest.mark.parametrize("target", ["lb", "proxy"])
def test_2000_connections_opened_and_dropped(stack, bystanders, target):
    process = target_of(stack, target)
    pid = process.pid
    rss_before, fds_before = rss_kb(pid), fd_count(pid)
    call = msg("echo:echo", CALL, 5, harness.string_args("dropped"))
    ways = {
        "close at once": b"",
        "half a frame": call[:9],
        "a call, never read": call,
        "garbage": b"\xff" * 16,
    }
    started = time.monotonic()
    peak = fds_before
    for round_ in range(10):
        batch = []
        for k in range(200):
            raw = harness.RawConnection(process.address, timeout=5.0)
            data = list(ways.values())[k % len(ways)]
            if data:
                raw.send(data)
            batch.append(raw)
        peak = max(peak, fd_count(pid))
        for raw in batch:
            # RST instead of FIN for half of them: SO_LINGER 0.
            if round_ % 2:
                raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raw.close()
    churn = time.monotonic() - started
    harness.wait_until(
        lambda: fd_count(pid) <= fds_before + 10,
        15,
        lambda: f"{target}'s fds back near {fds_before} (now {fd_count(pid)})",
    )
    rss_after = rss_kb(pid)
    print(
        f"{target}: 2000 connections in {churn:.1f} s ({', '.join(ways)}); fds {fds_before} -> "
        f"peak {peak} -> {fd_count(pid)}; RSS {rss_before} -> {rss_after} kB"
    )
    assert rss_after - rss_before < 64 * 1024, f"{target} kept {rss_after - rss_before} kB"


def _never_reading_peer(process, frames, budget_bytes):
    """Sends `frames()` on one connection that never reads, until `budget_bytes` are sent or
    the server stops reading (a send blocks for 2 s). Returns (connection, bytes sent,
    whether the server pushed back)."""
    raw = harness.RawConnection(process.address, timeout=2.0)
    raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sent = 0
    pushed_back = False
    while sent < budget_bytes:
        data = frames()
        try:
            raw.sock.sendall(data)
        except (socket.timeout, TimeoutError):
            pushed_back = True
            break
        sent += len(data)
    return raw, sent, pushed_back


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        pytest.param("lb", "calls", id="lb-16KB-calls"),
        pytest.param("proxy", "calls", id="proxy-16KB-calls"),
        pytest.param("lb", "pings", id="lb-1MB-pings"),
    ],
)
def test_peer_that_never_reads_its_replies(stack, bystanders, target, kind):
    """A client sends 256 MB of pings (echoed by the LB) or 128 MB of echo calls and never
    reads: the server must push back (stop reading) or drop what it cannot deliver, not
    buffer every reply."""
    process = target_of(stack, target)
    pid = process.pid
    rss_before = rss_kb(pid)
    seqids = iter(range(1, 10**9))
    if kind == "pings":
        body = harness.string_args("p" * (MB - 16))
        budget = 256 * MB

        def frames():
            return msg("ping", harness.HEARTBEAT, next(seqids), body)
    else:
        body = harness.string_args("c" * (16 * 1024))
        budget = 128 * MB

        def frames():
            return b"".join(msg("echo:echo", CALL, next(seqids), body) for _ in range(16))

    started = time.monotonic()
    raw, sent, pushed_back = _never_reading_peer(process, frames, budget)
    sent_in = time.monotonic() - started
    try:
        # Report: how another client fares right now, while the flood is being worked off.
        probe_started = time.monotonic()
        try:
            with harness.RawConnection(process.address, timeout=20.0) as probe:
                good_call(probe, 5)
            probe_result = "ok"
        except AssertionError as exc:
            probe_result = f"failed: {str(exc).splitlines()[0][:160]}"
        probe_result += f" after {time.monotonic() - probe_started:.2f} s"
        # A fixed 3 s window while the worker runs what was queued: the highest RSS seen.
        rss_peak = rss_kb(pid)
        window_end = time.monotonic() + 3.0
        while time.monotonic() < window_end:
            rss_peak = max(rss_peak, rss_kb(pid))
            time.sleep(0.1)
        bystanders.check()  # served while the greedy peer is still connected
        print(
            f"{target} never-reading peer ({kind}): sent {sent // MB} MB in {sent_in:.1f} s, "
            f"server pushed back: {pushed_back}; RSS {rss_before // 1024} -> peak "
            f"{rss_peak // 1024} MB; another client's call at once: {probe_result}"
        )
        assert process.alive()
        assert rss_peak - rss_before < 128 * 1024, (
            f"{target} RSS grew by {(rss_peak - rss_before) // 1024} MB for one client that "
            f"never reads ({sent // MB} MB sent; pushed back: {pushed_back})"
        )
    finally:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        raw.close()
        # Once it is gone the process stays healthy.
        harness.wait_until(lambda: process.alive() and bystanders.check() is None, 30, "healthy")


# === the LB's back socket: a connection is a worker only once it proves it ===


FAKE_WORKER_INPUTS = {
    "http_request": b"GET / HTTP/1.1\r\n\r\n",
    "negative_length": struct.pack(">i", -1) + b"\x80\x01\x00\x02",
    "oversized_length": struct.pack(">i", MAX + 1),
    "non_strict_header": harness.frame(struct.pack(">i", 4) + b"echo" + b"\x02\0\0\0\1\0"),
    "reply_for_no_call": msg("echo", REPLY, 12345, b"\x00"),
    "call_to_the_lb": msg("echo", CALL, 1, harness.string_args("x")),
    "stop_confirm": msg("stop_confirm", harness.STOP_CONFIRM, 0),
    "bad_hello": msg("hello", 23, 0, b"\x08\x00\x01"),
    "random_noise": bytes(random.Random(7).randrange(256) for _ in range(300)),
}
# A malformed HELLO proves nothing and refutes nothing: the connection waits for the bound.
WAITS_FOR_THE_BOUND = {"bad_hello"}
# The LB's heartbeat timeout (default), also its bound for a new back connection to prove
# itself (HELLO or ping echo).
HEARTBEAT_TIMEOUT = 6.0
# What the LB logs when it closes a back connection that never proved to be a worker.
NOT_JOINED = "back connection closed before it proved to be a worker"


def _worker_disturbed(stack):
    log = stack.worker.log()
    return [
        line
        for line in log.splitlines()
        if "dropping the connection" in line or "closed the connection" in line
    ]


def lb_log(stack):
    return "".join(harness._read(p) for p in stack.lb.log_files())


def _read_until_close(raw, bound):
    """Reads `raw` until the server closes it: (bytes read, seconds until the close), or
    (bytes read, None) if it is still open after `bound` seconds."""
    started = time.monotonic()
    got = b""
    while (left := bound - (time.monotonic() - started)) > 0:
        raw.sock.settimeout(left)
        try:
            chunk = raw.sock.recv(1 << 16)
        except (socket.timeout, TimeoutError):
            break
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            return got, time.monotonic() - started
        got += chunk
    return got, None


def _frame_types(data):
    """The message type of every whole frame in `data` (what a fake worker was sent)."""
    types_seen = []
    while len(data) >= 4:
        (size,) = struct.unpack(">i", data[:4])
        if len(data) < 4 + size:
            break
        types_seen.append(harness.decode_message(data[4 : 4 + size]).mtype)
        data = data[4 + size :]
    return types_seen


def test_garbage_from_fake_workers_on_the_back_socket(stack, bystanders):
    """Each input on a fresh back connection, before any HELLO or ping echo: the LB closes
    the connection (at once for what no worker sends, after the 6 s bound for a malformed
    HELLO), sends it nothing but pings, never counts it as a worker."""
    lb = stack.lb
    outcome = {}
    for name, data in FAKE_WORKER_INPUTS.items():
        log = lb_log(stack)
        joined_before, refused_before = log.count("worker joined"), log.count(NOT_JOINED)
        with harness.RawConnection(lb.back_address, timeout=5.0) as fake:
            fake.send(data)
            got, closed_after = _read_until_close(fake, HEARTBEAT_TIMEOUT + 6.0)
        kinds = _frame_types(got)
        outcome[name] = (
            f"closed after {closed_after:.2f} s" if closed_after is not None else "kept"
        ) + f", sent {len(kinds)} ping(s)"
        assert closed_after is not None, f"{name}: the LB kept the fake connection"
        if name not in WAITS_FOR_THE_BOUND:
            assert closed_after < 3.0, f"{name}: closed only after {closed_after:.2f} s"
        assert set(kinds) <= {harness.HEARTBEAT}, f"{name}: the fake was sent {kinds}"
        harness.wait_until(
            lambda before=refused_before: lb_log(stack).count(NOT_JOINED) > before,
            10,
            f"the LB logs the fake after {name}",
        )
        assert lb_log(stack).count("worker joined") == joined_before, f"{name}: it joined"
        assert lb.alive(), f"rpc_lb died after {name}\n{lb.output()}"
        bystanders.check()
    for name, what in outcome.items():
        print(f"fake worker {name}: {what}")
    assert _worker_disturbed(stack) == [], "the real worker lost its connection"
    assert stack.kz.exists_async(lb.node_path(stack.product)).get(timeout=5)
    with harness.EchoConnection(stack.idl, stack.proxy.address) as conn:
        assert {conn.whoami() for _ in range(10)} == {"w0"}


def test_fake_worker_garbage_under_load_costs_no_call(stack, bystanders):
    """Under load through the proxy, 20 fake workers connect to the back socket one after
    the other and send garbage at once. A back connection takes calls only once it has sent
    HELLO or echoed a ping, so the fakes take none: no call fails."""
    import test_faults  # its Traffic helper

    lb = stack.lb
    traffic = test_faults.Traffic(
        lambda: harness.EchoConnection(stack.idl, stack.proxy.address, timeout=30.0),
        threads=4,
        call=lambda conn, tag: conn.slow(20, tag),
    ).start()
    try:
        traffic.wait_ok(40)
        started = time.monotonic()
        for _ in range(20):
            with harness.RawConnection(lb.back_address, timeout=5.0) as fake:
                fake.send(b"GET / HTTP/1.1\r\n\r\n")
                while fake.sock.recv(1 << 16):  # until the LB drops it (5 s bound)
                    pass
        traffic.wait_ok(40, after=started)
    finally:
        traffic.stop()
    failures = traffic.failures()
    print(f"20 garbage fake workers under load: {len(failures)} calls failed")
    assert _worker_disturbed(stack) == [], "the real worker lost its connection"
    assert failures == [], test_faults.describe(failures, started)


def test_silent_fake_worker_gets_no_call_and_is_closed_after_the_heartbeat_timeout(
    stack, bystanders
):
    """A back connection that never says anything is pinged at once but never becomes a
    worker: calls made while it is connected all go to the real worker, promptly, and the LB
    closes it once the heartbeat timeout (6 s) passed without HELLO or a ping echo."""
    lb = stack.lb
    log = lb_log(stack)
    joined_before, refused_before = log.count("worker joined"), log.count(NOT_JOINED)
    with harness.RawConnection(lb.back_address, timeout=5.0) as fake:
        connected = time.monotonic()
        first = fake.recv_frame()  # the ping sent on accept (5 s bound)
        pinged_after = time.monotonic() - connected
        assert first is not None, "the LB closed a fresh back connection at once"
        assert harness.decode_message(first).mtype == harness.HEARTBEAT
        with harness.RawConnection(lb.frontend, timeout=15.0) as raw:
            # 6 calls at once: the real worker's 2 slots run them in turn; none go to the fake.
            calls = [msg("echo", CALL, k, harness.string_args(f"ok-{k}")) for k in range(1, 7)]
            sent_at = time.monotonic()
            raw.send(b"".join(calls))
            answers = {}
            for _ in range(6):
                reply = raw.recv_message()
                answers[reply.seqid] = (reply, time.monotonic() - sent_at)
        got, _ = _read_until_close(fake, HEARTBEAT_TIMEOUT + 6.0)
        closed_after = time.monotonic() - connected
    print(
        f"silent fake worker: first ping after {pinged_after:.3f} s; calls answered after "
        + ", ".join(f"{at:.2f} s" for _, at in answers.values())
        + f"; closed after {closed_after:.2f} s having been sent {len(_frame_types(got)) + 1}"
        " ping(s)"
    )
    assert sorted(answers) == list(range(1, 7))
    for k, (reply, at) in answers.items():
        assert reply.mtype == REPLY, f"call {k}: {reply}"
        assert harness.decode_string_result(reply.body) == f"ok-{k}"
        assert at < 5.0, f"call {k} answered after {at:.2f} s"
    assert HEARTBEAT_TIMEOUT - 0.5 <= closed_after <= HEARTBEAT_TIMEOUT + 6.0, closed_after
    assert set(_frame_types(got)) <= {harness.HEARTBEAT}
    harness.wait_until(
        lambda: lb_log(stack).count(NOT_JOINED) > refused_before, 10, "the LB logs the fake"
    )
    assert lb_log(stack).count("worker joined") == joined_before, "the silent fake joined"


def _echo_result(text):
    """The result struct of echo(): field 0, a string."""
    raw = text.encode()
    return struct.pack(">bhi", 11, 0, len(raw)) + raw + b"\x00"


def test_worker_that_only_echoes_pings_joins_at_once_and_takes_calls(stack, bystanders):
    """A worker written against the CONTRACT that never sends HELLO (as old workers) proves
    itself by echoing the ping the LB sends on accept: it joins within a round trip and
    takes calls (answered here with "fake")."""
    import threading

    lb = stack.lb
    joined_before = lb_log(stack).count("worker joined")
    left_before = lb_log(stack).count("worker left")
    fake = harness.RawConnection(lb.back_address, timeout=10.0)
    connected = time.monotonic()
    stop = threading.Event()
    answered = []

    def serve():
        while not stop.is_set():
            try:
                payload = fake.recv_frame()
            except (OSError, EOFError):
                return
            if payload is None:
                return
            message = harness.decode_message(payload)
            if message.mtype == harness.HEARTBEAT:
                fake.send(harness.frame(payload))  # the echo: the frame unchanged
            elif message.mtype == CALL:
                answered.append(message.seqid)
                fake.send_message(message.name, REPLY, message.seqid, _echo_result("fake"))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        harness.wait_until(
            lambda: lb_log(stack).count("worker joined") > joined_before,
            5,
            "the echo-only worker joins",
        )
        joined_after = time.monotonic() - connected
        who = []
        with harness.RawConnection(lb.frontend, timeout=10.0) as raw:
            for k in range(1, 31):
                raw.send_message("echo", CALL, k, harness.string_args(f"ok-{k}"))
                reply = raw.recv_message()
                assert (reply.mtype, reply.seqid) == (REPLY, k), reply
                who.append(harness.decode_string_result(reply.body))
        print(
            f"echo-only worker: joined {joined_after:.3f} s after connecting; "
            f"{who.count('fake')} of 30 sequential calls ran on it"
        )
        assert set(who) <= {"fake"} | {f"ok-{k}" for k in range(1, 31)}, who
        assert "fake" in who, "the echo-only worker never got a call"
    finally:
        stop.set()
        fake.close()
        thread.join(timeout=10)
    harness.wait_until(
        lambda: lb_log(stack).count("worker left") > left_before, 10, "the LB drops the fake"
    )
    assert _worker_disturbed(stack) == [], "the real worker lost its connection"


# === frame-completion deadline (proxy and LB front) and the LB's front idle timeout ===

# A frame once started must be complete within this (proxy and LB front, not configurable).
FRAME_DEADLINE = 30.0


def test_clients_dripping_a_frame_are_closed_after_the_frame_deadline(stack, bystanders):
    """One client at the proxy and one at the LB front each send a call one byte per second:
    each is closed about 30 s after its first byte, with nothing sent to it; every other
    client is served meanwhile."""
    frame = msg("echo:echo", CALL, 3, harness.string_args("d" * 100))  # 2 min at 1 B/s
    drips = {t: harness.RawConnection(target_of(stack, t).address) for t in ("lb", "proxy")}
    sent = {t: 0 for t in drips}
    closed = {}
    started = time.monotonic()
    next_byte, checked = started, False
    selector = selectors.DefaultSelector()
    for target, raw in drips.items():
        selector.register(raw.sock, selectors.EVENT_READ, target)
    try:
        while len(closed) < len(drips) and time.monotonic() - started < FRAME_DEADLINE + 15:
            if time.monotonic() >= next_byte:  # the drip's pace: one byte a second
                for target, raw in drips.items():
                    if target not in closed:
                        try:
                            raw.send(frame[sent[target] : sent[target] + 1])
                            sent[target] += 1
                        except OSError:
                            closed[target] = time.monotonic() - started
                next_byte += 1.0
                if not checked and time.monotonic() - started > FRAME_DEADLINE / 2:
                    bystanders.check()  # mid-way, while both drip
                    checked = True
            for key, _ in selector.select(timeout=max(0.0, next_byte - time.monotonic())):
                try:
                    data = key.fileobj.recv(1)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"{key.data}: unexpected bytes {data!r}"
                closed.setdefault(key.data, time.monotonic() - started)
                selector.unregister(key.fileobj)
    finally:
        selector.close()
        for raw in drips.values():
            raw.close()
    print(
        "clients dripping 1 byte/s: "
        + ", ".join(
            f"{t} closed after {closed[t]:.2f} s" if t in closed else f"{t} still open"
            for t in drips
        )
        + f" ({sent} bytes sent)"
    )
    assert checked, "the bystanders were checked while the clients dripped"
    for target in drips:
        after = closed.get(target)
        assert after is not None, f"{target}: still open {FRAME_DEADLINE + 15:.0f} s on"
        assert FRAME_DEADLINE - 1.5 <= after <= FRAME_DEADLINE + 15, f"{target}: {after:.1f} s"


# What the LB logs (debug) when it closes an idle front connection.
IDLE_CLOSED = "idle front connection closed"


def _lb_metric(lb, name):
    with urllib.request.urlopen(f"http://{lb.settings['admin_address']}/metrics", timeout=5) as r:
        text = r.read().decode()
    match = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
    assert match, f"no {name} in /metrics"
    return float(match.group(1))


def test_lb_front_idle_timeout_spares_pinging_proxies_and_calls_in_flight(stack):
    """An LB with front_idle_timeout_ms=2000 closes a front connection with nothing in flight
    and no frame for 2 s, but not a proxy's (the proxy pings idle connections every second)
    nor one whose call runs longer than 2 s."""
    idle_ms = 2000
    directory = stack.workdir / "idle-lb"
    (directory / "lb").mkdir(parents=True)
    (directory / "proxy").mkdir()
    product = stack.product + "_idle"
    lb = harness.Lb(
        stack.lb.binary,
        directory / "lb",
        {
            "zk": stack.zk_server.address,
            "product": product,
            "service": "echo",
            "front_idle_timeout_ms": str(idle_ms),
            "admin_address": f"127.0.0.1:{harness.free_port()}",
        },
        log_level="debug",  # it logs each idle close at debug level
    )
    proxy = harness.Proxy(
        stack.proxy_bin,
        directory / "proxy",
        {
            "zk": stack.zk_server.address,
            "product": product,
            "proxy_address": str(directory / "proxy" / "proxy.sock"),
        },
    )
    worker = harness.Worker(stack.idl.gen_dir, lb.back_address, "wi", directory, pool_size=2)
    stack.extra += [lb, proxy]
    opened = []
    try:
        lb.start()
        worker.start()
        harness.wait_until(
            lambda: stack.kz.exists_async(lb.node_path(product)).get(timeout=5),
            20,
            lambda: f"LB node\n{lb.output()}",
        )
        proxy.start()
        with harness.EchoConnection(stack.idl, proxy.address, timeout=10.0) as conn:
            assert conn.echo("first") == "first"  # the proxy's connection to the LB is open
            harness.wait_until(
                lambda: _lb_metric(lb, "rpc_lb_client_connections") == 1, 10, "one proxy"
            )
            busy = harness.RawConnection(lb.frontend, timeout=10.0)
            opened.append(busy)
            slow_args = struct.pack(">bhi", 8, 1, idle_ms + 1500) + harness.string_args(
                "ok-9", field_id=2
            )
            busy.send(msg("echo:slow", CALL, 9, slow_args))
            # Two idle periods in a row, each observed on a fresh silent connection; meanwhile
            # the proxy's connection carries nothing but its pings.
            closes = []
            for _ in range(2):
                idle = harness.RawConnection(lb.frontend, timeout=10.0)
                opened.append(idle)
                got, after = _read_until_close(idle, idle_ms / 1000 + 8.0)
                assert got == b"", got
                closes.append(after)
            reply = busy.recv_message()
            connections = _lb_metric(lb, "rpc_lb_client_connections")
            print(
                f"front_idle_timeout_ms={idle_ms}: silent connections closed after {closes} s; "
                f"a {idle_ms + 1500} ms call: type {reply.mtype}; LB front connections now "
                f"{connections:.0f} (the proxy's, and the busy one until it idles out)"
            )
            for after in closes:
                assert after is not None, "a silent front connection is still open"
                assert idle_ms / 1000 - 0.5 <= after <= idle_ms / 1000 + 8.0, after
            assert (reply.mtype, reply.seqid) == (REPLY, 9), reply
            assert harness.decode_string_result(reply.body) == "ok-9"
            # The busy connection idles out too, once answered; the proxy's stays.
            _, busy_closed = _read_until_close(busy, idle_ms / 1000 + 8.0)
            assert busy_closed is not None, "the busy connection never idled out"

            def idle_closes():
                return "".join(harness._read(p) for p in lb.log_files()).count(IDLE_CLOSED)

            harness.wait_until(lambda: idle_closes() >= 3, 10, "the LB logs 3 idle closes")
            harness.wait_until(
                lambda: _lb_metric(lb, "rpc_lb_client_connections") <= 1, 10, "closes counted"
            )
            assert _lb_metric(lb, "rpc_lb_client_connections") == 1, "the proxy's was cut"
            assert idle_closes() == 3, "the proxy's connection was closed as idle"
            assert conn.echo("after") == "after"
    finally:
        for raw in opened:
            raw.close()
        worker.kill()


# === idle and stalled connections on a proxy with client_idle_timeout_ms ===


def _closed_within(raw, bound):
    """Seconds until the server closes `raw` (reading nothing else), or None after `bound`."""
    raw.sock.settimeout(bound)
    started = time.monotonic()
    try:
        data = raw.sock.recv(1)
    except (socket.timeout, TimeoutError):
        return None
    except ConnectionResetError:
        data = b""
    assert data == b"", f"unexpected bytes from an idle connection: {data!r}"
    return time.monotonic() - started


def _close_times(conns, bound):
    """For each (name, RawConnection, quiet since): seconds from `quiet since` to the
    server's close, or None if still open after `bound` seconds from now."""
    selector = selectors.DefaultSelector()
    for name, raw, since in conns:
        selector.register(raw.sock, selectors.EVENT_READ, (name, since))
    closed = {name: None for name, _, _ in conns}
    deadline = time.monotonic() + bound
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=max(0.0, deadline - time.monotonic())):
            name, since = key.data
            try:
                data = key.fileobj.recv(1)
            except ConnectionResetError:
                data = b""
            assert data == b"", f"{name}: unexpected bytes {data!r}"
            closed[name] = time.monotonic() - since
            selector.unregister(key.fileobj)
    selector.close()
    return closed


def test_idle_and_stalled_client_connections_time_out(stack):
    directory = stack.workdir / "idle-proxy"
    directory.mkdir()
    proxy = harness.Proxy(
        stack.proxy_bin,
        directory,
        {
            "zk": stack.zk_server.address,
            "product": stack.product,
            "proxy_address": str(directory / "proxy.sock"),
            "client_idle_timeout_ms": "1000",
        },
    )
    stack.extra.append(proxy)
    proxy.start()
    call = msg("echo:echo", CALL, 3, harness.string_args("ok-3"))
    slow_args = struct.pack(">bhi", 8, 1, 2500) + harness.string_args("ok-9", field_id=2)
    opened = [harness.RawConnection(proxy.address, timeout=10.0) for _ in range(4)]
    idle, used, stalled, busy = opened
    try:
        idle_since = time.monotonic()
        good_call(used, 1)
        used_since = time.monotonic()
        stalled.send(call[:10])
        stalled_since = time.monotonic()
        # A call longer than the idle timeout is not cut: nothing is idle while it runs.
        busy.send(msg("echo:slow", CALL, 9, slow_args))
        closed = _close_times(
            [
                ("idle", idle, idle_since),
                ("used", used, used_since),
                ("stalled mid-frame", stalled, stalled_since),
            ],
            4.0,
        )
        reply = busy.recv_message()
        print(f"client_idle_timeout_ms=1000: seconds from last activity to close: {closed}")
        print(f"  a 2.5 s call on another connection: type {reply.mtype}, seqid {reply.seqid}")
        for name, after in closed.items():
            assert after is not None, f"the {name} connection is still open after 4 s"
            assert 0.8 <= after <= 3.0, f"the {name} connection closed after {after:.2f} s"
        assert (reply.mtype, reply.seqid) == (REPLY, 9), reply
        assert harness.decode_string_result(reply.body) == "ok-9"
    finally:
        for raw in opened:
            raw.close()

    # A client dripping one byte every 0.4 s never lets the idle timer fire: report whether
    # the proxy bounds it (a fixed 4 s window).
    with harness.RawConnection(proxy.address) as drip:
        frame = struct.pack(">i", 100) + b"\x80\x01\x00\x01" + b"\x00" * 96
        cut_after = None
        started = time.monotonic()
        for byte in frame[:10]:
            try:
                drip.send(bytes([byte]))
            except OSError:
                cut_after = time.monotonic() - started
                break
            time.sleep(0.4)  # the drip's pace, not synchronisation
        print(
            "  a client dripping 1 byte / 0.4 s: "
            + (f"cut after {cut_after:.1f} s" if cut_after else "still open after 4 s")
        )
    with harness.EchoConnection(stack.idl, proxy.address) as conn:
        assert conn.echo("after") == "after"


def test_lb_max_connections_is_enforced(stack, lb_bin):  # noqa: F811 - fixture
    directory = stack.workdir / "lb-maxconn"
    directory.mkdir()
    lb = harness.Lb(
        lb_bin,
        directory,
        {
            "zk": stack.zk_server.address,
            "product": stack.product + "_maxconn",
            "service": "echo",
            "max_connections": "3",
        },
    )
    stack.extra.append(lb)
    lb.start()
    conns = [harness.RawConnection(lb.frontend, timeout=2.0) for _ in range(8)]
    try:
        answered = 0
        for k, raw in enumerate(conns):
            try:
                raw.send_message("ping", harness.HEARTBEAT, k)
                if raw.recv_frame() is not None:
                    answered += 1
            except (OSError, EOFError):
                pass
        print(f"LB with max_connections=3: {answered} of 8 connections served")
        assert answered <= 3, f"{answered} connections served with max_connections=3"
    finally:
        for raw in conns:
            raw.close()
