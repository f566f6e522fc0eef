"""Graceful stop and resource use of a running proxy."""

import os
import signal
import threading
import time

from thrift.Thrift import TApplicationException

import harness


def test_sigterm_finishes_calls_in_flight(backends, proxies, clients):
    a = backends.start("A", concurrent=True)
    b = backends.start("B", concurrent=True)
    proxy = proxies.start()
    conns = [clients(proxy.address, timeout=30) for _ in range(4)]
    assert all(conn.echo("warm") == "warm" for conn in conns)
    results, errors = {}, {}

    def call(i, conn):
        try:
            results[i] = conn.slow(1500, f"drain-{i}")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors[i] = exc

    threads = [threading.Thread(target=call, args=(i, c)) for i, c in enumerate(conns)]
    for thread in threads:
        thread.start()
    harness.wait_until(
        lambda: len(a.log_lines("SLOW-START") + b.log_lines("SLOW-START")) == len(conns),
        10,
        "every slow call reached a backend",
    )
    stopped_at = time.monotonic()
    code = proxy.stop(signal.SIGTERM, timeout=15)
    exit_after = time.monotonic() - stopped_at
    for thread in threads:
        thread.join(timeout=15)

    assert not errors, f"calls in flight failed on SIGTERM: {errors}\n{proxy.output()}"
    assert results == {i: f"drain-{i}" for i in range(len(conns))}
    assert code == 0, f"exit code {code} after SIGTERM\n{proxy.output()}"
    assert exit_after < 15
    assert not os.path.exists(proxy.address), "socket file left behind"
    assert harness.connection_refused(proxy.address)


def test_calls_past_drain_grace_get_code_6(backends, proxies, clients):
    backend = backends.start("A", concurrent=True)
    proxy = proxies.start(drain_grace_ms=1000)
    conn = clients(proxy.address, timeout=30)
    outcome = {}

    def call():
        try:
            outcome["result"] = conn.slow(8000, "stuck")
        except Exception as exc:  # noqa: BLE001 - inspected below
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    harness.wait_until(lambda: "stuck" in backend.log_lines("SLOW-START"), 10, "slow call started")
    stopped_at = time.monotonic()
    code = proxy.stop(signal.SIGTERM, timeout=10)
    exit_after = time.monotonic() - stopped_at
    thread.join(timeout=10)

    error = outcome.get("error")
    assert isinstance(error, TApplicationException), f"{outcome}\n{proxy.output()}"
    assert error.type == TApplicationException.INTERNAL_ERROR, error.message
    assert outcome["at"] - stopped_at < 5.0, "answered long after drain_grace_ms"
    assert exit_after < 5.0, f"exited {exit_after:.1f} s after SIGTERM, drain_grace_ms=1000"
    assert code >= 0, f"killed by signal {-code}"
    assert not os.path.exists(proxy.address)


def test_sigint_stops_cleanly(echo_stack):
    proxy = echo_stack.proxy
    assert echo_stack.client.echo("x") == "x"
    assert proxy.stop(signal.SIGINT, timeout=15) == 0, proxy.output()
    assert not os.path.exists(proxy.address)


def test_idle_client_does_not_hold_stop(echo_stack, clients):
    proxy = echo_stack.proxy
    idle = clients(proxy.address)
    assert idle.echo("x") == "x"  # connected and served, then idle
    assert proxy.stop(signal.SIGTERM, timeout=15) == 0, proxy.output()
    assert harness.connection_refused(proxy.address)


def test_fd_count_returns_after_many_connections(echo_stack):
    proxy = echo_stack.proxy
    assert echo_stack.client.echo("warm") == "warm"
    baseline = proxy.fd_count()
    raws = []
    try:
        for i in range(500):
            raw = harness.RawConnection(proxy.address)
            raws.append(raw)
            # A round trip on each, so the proxy has surely accepted it.
            raw.send_message("ping", harness.HEARTBEAT, i)
            assert raw.recv_message().seqid == i
        peak = proxy.fd_count()
    finally:
        for raw in raws:
            raw.close()
    assert peak >= baseline + 450, f"fd count {baseline} -> {peak}: connections not counted?"
    harness.wait_until(
        lambda: proxy.fd_count() <= baseline + 10,
        10,
        lambda: f"proxy fd count back near {baseline} (peak {peak}, now {proxy.fd_count()})",
    )
    assert echo_stack.client.echo("after") == "after"
