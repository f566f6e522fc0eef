"""Bad input (issue 6): malformed frames and abusive peers, at the LB's front socket, at its
back (worker) socket, and at the proxy for the cases tests/e2e/test_protocol.py does not
cover. Each input must get the CONTRACT's answer (a code-7 TApplicationException, or a closed
connection; never silence), and afterwards the process must be up, its memory bounded, and
other clients (already connected, and new ones) served.

One stack serves the whole module: ZooKeeper (the session's), an rpc_lb with one rpc_thrift
worker (pool_size 2), and an rpc_proxy routing to that LB. A test that broke it would make
the tests after it fail too, which is the point: nothing here may break it.
"""

import os
import random
import selectors
import shutil
import socket
import struct
import time
import types
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
        "non_strict_header": Case(
            harness.frame(
                struct.pack(">i", 9) + b"echo:echo" + struct.pack(">bi", CALL, 5) + b"\x00"
            ),
            "protocol_error_may_close",
            None,
        ),
        "bad_version": Case(
            harness.frame(b"\x80\x02\x00\x01" + struct.pack(">i", 4) + b"e:ex" + b"\0\0\0\1"),
            "protocol_error_may_close",
            None,
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
        ),
        "invalid_utf8_service": Case(
            msg(b"\xc3(:echo", CALL, 32, harness.string_args("x")),
            "protocol_error_may_close",
            "protocol_error_may_close",
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


# === the LB's back socket ===


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


def _worker_disturbed(stack):
    log = stack.worker.log()
    return [
        line
        for line in log.splitlines()
        if "dropping the connection" in line or "closed the connection" in line
    ]


def lb_log(stack):
    return "".join(harness._read(p) for p in stack.lb.log_files())


def test_garbage_from_fake_workers_on_the_back_socket(stack, bystanders):
    lb = stack.lb
    outcome = {}
    for name, data in FAKE_WORKER_INPUTS.items():
        left_before = lb_log(stack).count("worker left")
        with harness.RawConnection(lb.back_address, timeout=5.0) as fake:
            fake.send(data)
            # A fixed 1 s window: the LB drops a fake that sent an unframeable byte stream;
            # one that sent frames it ignores stays a "worker" (pinged) until it hangs up.
            got, dropped = b"", False
            window_end = time.monotonic() + 1.0
            try:
                while (left := window_end - time.monotonic()) > 0:
                    fake.sock.settimeout(left)
                    chunk = fake.sock.recv(1 << 16)
                    if not chunk:
                        dropped = True
                        break
                    got += chunk
            except (socket.timeout, TimeoutError):
                pass
            except ConnectionResetError:
                dropped = True
            outcome[name] = f"{'dropped' if dropped else 'kept'} ({len(got)} bytes from the LB)"
        # Calls may go to a connected fake (see the tests below); check once it is gone.
        harness.wait_until(
            lambda before=left_before: lb_log(stack).count("worker left") > before,
            10,
            f"the LB drops the fake worker after {name}",
        )
        assert lb.alive(), f"rpc_lb died after {name}\n{lb.output()}"
        bystanders.check()
    for name, what in outcome.items():
        print(f"fake worker {name}: {what}")
    assert _worker_disturbed(stack) == [], "the real worker lost its connection"
    assert stack.kz.exists_async(lb.node_path(stack.product)).get(timeout=5)
    with harness.EchoConnection(stack.idl, stack.proxy.address) as conn:
        assert {conn.whoami() for _ in range(10)} == {"w0"}


def test_fake_worker_garbage_under_load_costs_at_most_one_call_each(stack, bystanders):
    """Under load through the proxy, 20 fake workers connect to the back socket one after
    the other and send garbage at once. The LB counts a new back connection as a worker (of
    worker_pool_size 1) before it has said anything (old workers send no HELLO), so a call
    queued at that instant may go to the fake and fail with it: at most one per fake, and
    the real worker and every other call are unaffected."""
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
    print(f"20 garbage fake workers under load: {len(failures)} calls failed (stolen)")
    for line in test_faults.describe(failures, started):
        print("  failed:", line)
    assert _worker_disturbed(stack) == [], "the real worker lost its connection"
    assert len(failures) <= 20, test_faults.describe(failures, started)
    for o in failures:
        assert "worker lost (BadFrame)" in o.error, o


def test_silent_fake_worker_holds_a_call_at_most_a_heartbeat_timeout(stack, bystanders):
    """A back connection that never says anything counts as a worker of worker_pool_size 1
    (old workers send no HELLO): a call sent to it is held until the LB's heartbeat timeout
    (6 s) drops it. Measure what that costs: the call must be answered (code 6), not hang."""
    lb = stack.lb
    joined_before = lb_log(stack).count("worker joined")
    with harness.RawConnection(lb.back_address, timeout=10.0):  # the fake: never says a word
        harness.wait_until(
            lambda: lb_log(stack).count("worker joined") > joined_before, 5, "the fake joins"
        )
        sent_at = time.monotonic()
        with harness.RawConnection(lb.frontend, timeout=15.0) as raw:
            # 3 calls at once: 2 slots on the real worker, 1 on the fake.
            calls = [msg("echo", CALL, k, harness.string_args(f"ok-{k}")) for k in (1, 2, 3)]
            raw.send(b"".join(calls))
            answers = {}
            for _ in range(3):
                reply = raw.recv_message()
                answers[reply.seqid] = (reply.mtype, time.monotonic() - sent_at, reply)
    stolen = {k: a for k, a in answers.items() if a[0] != REPLY}
    print(
        "silent fake worker: "
        + ", ".join(f"call {k}: type {t} after {at:.2f} s" for k, (t, at, _) in answers.items())
    )
    assert sorted(answers) == [1, 2, 3]
    assert len(stolen) <= 1, answers
    for _, at, reply in stolen.values():
        code, text = app_exception(reply)
        assert code == harness.INTERNAL_ERROR and "worker lost" in text, text
        assert at < 6.0 + 1.5, f"held {at:.1f} s, heartbeat_timeout_ms is 6000"


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
