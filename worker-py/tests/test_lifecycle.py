"""Worker processes across stops, LB restarts and bad input."""

from __future__ import annotations

import signal
import struct
import time

import pytest

from fake_lb import HEARTBEAT, STOP, FakeLB, encode_frame, ping, stop_confirm, wait_until


def _held(conn, codec, calls):
    """Sends ``calls`` and proves they were read: a ping sent after them is echoed."""
    for seqid, (method, args) in calls.items():
        conn.send(codec.call(method, seqid, *args))
    conn.send(ping(424242))
    assert conn.read().raw == ping(424242)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully_with_confirm(fake_lb, spawn_worker, codec, signum):
    worker = spawn_worker(fake_lb.path, pool_size=2)
    conn = fake_lb.accept()
    conn.hello()
    _held(conn, codec, {1: ("slow", (1200, "a")), 2: ("slow", (1200, "b"))})
    signalled = time.monotonic()
    worker.signal(signum)
    stop = conn.read()
    assert (stop.message_type, stop.name, stop.seqid, stop.body) == (STOP, "stop", 0, b"\x00")
    conn.send(stop_confirm())
    replies = {}
    for _ in range(2):
        frame = conn.read()
        replies[frame.seqid] = codec.result("slow", frame)
    assert replies == {1: "a", 2: "b"}
    conn.expect_closed()
    assert worker.wait(timeout=20) == 0
    elapsed = time.monotonic() - signalled
    assert elapsed < 5, f"stopped in {elapsed:.1f} s"
    assert "exited cleanly" in worker.log()


def test_sigterm_without_confirm_still_finishes(fake_lb, spawn_worker, codec):
    worker = spawn_worker(fake_lb.path)
    conn = fake_lb.accept()
    conn.hello()
    _held(conn, codec, {1: ("slow", (500, "late"))})
    worker.signal(signal.SIGTERM)
    assert conn.read().message_type == STOP
    # An old LB: no STOP_CONFIRM, but pings continue and must still be echoed.
    conn.send(ping(9))
    frames = [conn.read(), conn.read()]
    assert {f.message_type for f in frames} == {HEARTBEAT, 2}
    reply = next(f for f in frames if f.message_type == 2)
    assert codec.result("slow", reply) == "late"
    conn.expect_closed()
    assert worker.wait(timeout=20) == 0


def test_calls_arriving_after_stop_still_run(fake_lb, spawn_worker, codec):
    worker = spawn_worker(fake_lb.path)
    conn = fake_lb.accept()
    conn.hello()
    worker.signal(signal.SIGTERM)
    assert conn.read().message_type == STOP
    # The LB had this call in flight before it processed STOP.
    conn.send(codec.call("echo", 77, "in flight"))
    conn.send(stop_confirm())
    frame = conn.read()
    assert (frame.seqid, codec.result("echo", frame)) == (77, "in flight")
    conn.expect_closed()
    assert worker.wait(timeout=20) == 0


def test_sigterm_while_the_lb_is_away(lb_path, spawn_worker):
    worker = spawn_worker(lb_path)
    wait_until(lambda: "cannot connect" in worker.log(), what="a failed connect")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=10) == 0


def test_eof_from_the_lb_reconnects(fake_lb, spawn_worker, codec):
    worker = spawn_worker(fake_lb.path)
    first = fake_lb.accept()
    first.hello()
    first.close()
    second = fake_lb.accept()
    assert second.hello() == (1, worker.pid, "echo")
    second.send(codec.call("echo", 1, "again"))
    assert codec.result("echo", second.read()) == "again"


def test_unsolicited_stop_confirm_delivers_then_reconnects(fake_lb, spawn_worker, codec):
    worker = spawn_worker(fake_lb.path)
    conn = fake_lb.accept()
    conn.hello()
    _held(conn, codec, {1: ("slow", (600, "held"))})
    conn.send(stop_confirm())  # the LB is shutting down
    frame = conn.read()
    assert (frame.seqid, codec.result("slow", frame)) == (1, "held")
    conn.expect_closed()
    second = fake_lb.accept()
    assert second.hello() == (1, worker.pid, "echo")
    assert worker.proc.poll() is None


def test_lb_not_there_at_start(lb_path, spawn_worker, codec):
    worker = spawn_worker(lb_path)
    wait_until(lambda: "cannot connect" in worker.log(), what="a failed connect")
    lb = FakeLB(lb_path)
    try:
        conn = lb.accept(timeout=10)  # backoff tops out at 5 s
        conn.hello()
        conn.send(codec.call("add", 1, 20, 22))
        assert codec.result("add", conn.read()) == 42
    finally:
        lb.close()


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(struct.pack("!i", 16384001) + b"x" * 64, id="oversized"),
        pytest.param(struct.pack("!i", 0), id="zero-length"),
        pytest.param(struct.pack("!i", -5), id="negative-length"),
        pytest.param(struct.pack("!i", 12) + b"GET / HTTP/1", id="not-thrift"),
    ],
)
def test_bad_frames_drop_the_connection(fake_lb, spawn_worker, codec, garbage):
    worker = spawn_worker(fake_lb.path)
    conn = fake_lb.accept()
    conn.hello()
    conn.send(garbage)
    conn.expect_closed()
    second = fake_lb.accept()
    second.hello()
    second.send(codec.call("echo", 1, "alive"))
    assert codec.result("echo", second.read()) == "alive"
    assert worker.proc.poll() is None


def test_unexpected_types_are_ignored(fake_lb, spawn_worker, codec):
    worker = spawn_worker(fake_lb.path)
    conn = fake_lb.accept()
    conn.hello()
    for message_type in (2, 3, 5, 19, 21, 23, 99):
        conn.send(encode_frame(message_type, "odd", 1))
    conn.send(codec.call("echo", 2, "fine"))
    frame = conn.read()
    assert (frame.seqid, codec.result("echo", frame)) == (2, "fine")
    assert "ignoring a frame of type 99" in wait_until(
        lambda: "type 99" in worker.log() and worker.log()
    )
