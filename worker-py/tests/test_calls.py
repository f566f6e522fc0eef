"""Calls through a worker process: HELLO, replies, exceptions, concurrency, pings."""

from __future__ import annotations

import time

import pytest
from thrift.Thrift import TApplicationException

from fake_lb import EXCEPTION, HEARTBEAT, REPLY, Closed, ping


def test_hello_then_calls(fake_lb, spawn_worker, codec):
    worker = spawn_worker(fake_lb.path, pool_size=3, name="w1")
    conn = fake_lb.accept()
    assert conn.hello() == (3, worker.pid, "echo")

    conn.send(codec.call("echo", 1, "hello"))
    frame = conn.read()
    assert (frame.message_type, frame.name, frame.seqid) == (REPLY, "echo", 1)
    assert codec.result("echo", frame) == "hello"

    cases = [
        ("add", (2, 40), 42),
        ("whoami", (), "w1"),
        ("blob", (bytes(range(256)) * 100,), bytes(range(256)) * 100),
        ("echo", ("ünïcödé",), "ünïcödé"),
        ("ping", (), None),
    ]
    for seqid, (method, args, expected) in enumerate(cases, start=100):
        conn.send(codec.call(method, seqid, *args))
        frame = conn.read()
        assert (frame.name, frame.seqid) == (method, seqid)
        assert codec.result(method, frame) == expected

    # ONEWAY gets no reply: the next frame is the reply to the call after it.
    conn.send(codec.call("notify", 200, "fire and forget"))
    conn.send(codec.call("add", 201, 1, 1))
    frame = conn.read()
    assert (frame.name, frame.seqid) == ("add", 201)


def test_declared_exception_is_a_reply(fake_lb, spawn_worker, codec):
    from echo.ttypes import EchoError

    spawn_worker(fake_lb.path)
    conn = fake_lb.accept()
    conn.hello()
    conn.send(codec.call("fail", 5, "declared"))
    frame = conn.read()
    assert (frame.message_type, frame.seqid) == (REPLY, 5)
    with pytest.raises(EchoError) as caught:
        codec.result("fail", frame)
    assert (caught.value.message, caught.value.code) == ("declared failure", 7)


def test_undeclared_exception_names_type_and_message(fake_lb, spawn_worker, codec):
    worker = spawn_worker(fake_lb.path)
    conn = fake_lb.accept()
    conn.hello()
    for seqid in (7, 8):
        conn.send(codec.call("fail", seqid, f"nr{seqid}"))
        frame = conn.read()
        assert (frame.message_type, frame.name, frame.seqid) == (EXCEPTION, "fail", seqid)
        with pytest.raises(TApplicationException) as caught:
            codec.result("fail", frame)
        assert caught.value.type == TApplicationException.INTERNAL_ERROR
        assert caught.value.message == f"ValueError: boom nr{seqid}"

    # A oneway handler that raises is logged, never answered; the worker keeps serving.
    conn.send(codec.call("notify", 9, "raise"))
    conn.send(codec.call("echo", 10, "still here"))
    frame = conn.read()
    assert (frame.seqid, codec.result("echo", frame)) == (10, "still here")
    assert worker.proc.poll() is None
    assert "ValueError: boom nr7" in worker.log()  # the processor's logging.exception


def test_unknown_method_answered_by_processor(fake_lb, spawn_worker, codec):
    spawn_worker(fake_lb.path)
    conn = fake_lb.accept()
    conn.hello()
    raw = codec.call("echo", 3, "x").replace(b"\x00\x00\x00\x04echo", b"\x00\x00\x00\x04ohce")
    conn.send(raw)
    frame = conn.read()
    assert (frame.message_type, frame.name, frame.seqid) == (EXCEPTION, "ohce", 3)
    with pytest.raises(TApplicationException) as caught:
        codec.result("echo", frame)
    assert caught.value.type == TApplicationException.UNKNOWN_METHOD


def _run_slow_calls(conn, codec, count: int, ms: int) -> float:
    started = time.monotonic()
    for seqid in range(count):
        conn.send(codec.call("slow", seqid, ms, f"s{seqid}"))
    seen = set()
    for _ in range(count):
        frame = conn.read()
        assert codec.result("slow", frame) == f"s{frame.seqid}"
        seen.add(frame.seqid)
    assert seen == set(range(count))
    return time.monotonic() - started


def test_pool_size_4_runs_calls_concurrently(fake_lb, spawn_worker, codec):
    spawn_worker(fake_lb.path, pool_size=4)
    conn = fake_lb.accept()
    conn.hello()
    elapsed = _run_slow_calls(conn, codec, 4, 600)
    assert 0.55 < elapsed < 1.6, f"4 x 600 ms on 4 threads took {elapsed:.2f} s"


def test_pool_size_1_serialises(fake_lb, spawn_worker, codec):
    spawn_worker(fake_lb.path, pool_size=1)
    conn = fake_lb.accept()
    conn.hello()
    elapsed = _run_slow_calls(conn, codec, 4, 250)
    assert elapsed >= 0.95, f"4 x 250 ms on 1 thread took {elapsed:.2f} s"


def test_pings_echoed_unchanged_while_every_handler_spins(fake_lb, spawn_worker, codec):
    spawn_worker(fake_lb.path, pool_size=2)
    conn = fake_lb.accept()
    conn.hello()
    # Both pool threads run a pure-Python loop that holds the GIL for 3 s.
    conn.send(codec.call("slow", 1, 3000, "spin-a"))
    conn.send(codec.call("slow", 2, 3000, "spin-b"))
    latencies = []
    deadline = time.monotonic() + 2.5
    seqid = 1000
    while time.monotonic() < deadline:
        frame_out = ping(seqid)
        sent = time.monotonic()
        conn.send(frame_out)
        echo = conn.read(timeout=2.0)
        latencies.append(time.monotonic() - sent)
        assert echo.message_type == HEARTBEAT, "a reply arrived before the spins ended"
        assert echo.raw == frame_out, "the ping comes back unchanged"
        seqid += 1
        time.sleep(0.1)  # pacing like the LB's 1 s ticker, faster; not a synchronisation
    replies = {conn.read_skipping_pings(timeout=5).seqid for _ in range(2)}
    assert replies == {1, 2}
    worst = max(latencies)
    print(
        f"\npings while 2/2 handlers spin: {len(latencies)} echoed, "
        f"max {worst * 1000:.1f} ms, mean {sum(latencies) / len(latencies) * 1000:.1f} ms"
    )
    assert worst < 0.5, f"a ping waited {worst:.3f} s"


def test_heartbeat_timeout_reconnects(fake_lb, spawn_worker):
    spawn_worker(fake_lb.path)
    conn = fake_lb.accept()
    conn.hello()
    conn.send(ping(1))
    assert conn.read().raw == ping(1)
    pinged = time.monotonic()
    # Silent from now on, socket kept open: the worker gives up after 6 s.
    with pytest.raises(Closed):
        conn.read(timeout=10)
    second = fake_lb.accept(timeout=5)
    second.hello()
    elapsed = time.monotonic() - pinged
    assert 5.5 < elapsed < 10, f"reconnected {elapsed:.1f} s after the last ping"
