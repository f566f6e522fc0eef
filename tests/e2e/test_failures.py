"""Upstream failures: a backend killed mid-call, a call that outlives request_timeout_ms."""

import threading
import time

import pytest
from thrift.Thrift import TApplicationException

import harness


def _call_in_thread(call, *args):
    """Runs `call(*args)` in a thread; returns (thread, outcome dict with result/error/at)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = call(*args)
        except Exception as exc:  # noqa: BLE001 - inspected by the test
            outcome["error"] = exc
        outcome["at"] = time.monotonic()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_backend_killed_mid_call(backends, proxies, clients):
    a = backends.start("A", services=("echo",))
    backends.start("B", services=("other",))
    proxy = proxies.start()
    victim = clients(proxy.address, timeout=30)
    bystander = clients(proxy.address, service="other")
    assert victim.whoami() == "A"
    assert bystander.whoami() == "B"

    thread, outcome = _call_in_thread(victim.slow, 20000, "doomed")
    harness.wait_until(lambda: "doomed" in a.log_lines("SLOW-START"), 10, "slow call reached A")
    killed_at = time.monotonic()
    a.kill()

    bystander_calls = 0
    while thread.is_alive() and time.monotonic() - killed_at < 10:
        assert bystander.echo(f"by-{bystander_calls}") == f"by-{bystander_calls}"
        bystander_calls += 1
    thread.join(timeout=1)
    assert not thread.is_alive(), "the caller of the killed backend got no answer within 10 s"
    error = outcome.get("error")
    assert isinstance(error, TApplicationException), outcome
    assert error.type == TApplicationException.INTERNAL_ERROR, error.message
    assert outcome["at"] - killed_at < 5.0, f"answered {outcome['at'] - killed_at:.1f} s after kill"

    # Other clients go on; the dead endpoint's service fails fast instead of hanging.
    assert all(bystander.whoami() == "B" for _ in range(20))
    fresh = clients(proxy.address, timeout=10)
    started = time.monotonic()
    with pytest.raises(TApplicationException) as raised:
        fresh.whoami()
    assert raised.value.type == TApplicationException.INTERNAL_ERROR, raised.value.message
    assert time.monotonic() - started < 3.0
    assert victim.client_for("other").whoami() == "B"


def test_request_timeout(backends, proxies, clients):
    # A concurrent endpoint, so the calls after the slow one are not queued behind it.
    backend = backends.start("A", concurrent=True)
    proxy = proxies.start(request_timeout_ms=1000)
    conn = clients(proxy.address)
    other = clients(proxy.address)

    started = time.monotonic()
    with pytest.raises(TApplicationException) as raised:
        conn.slow(3000, "too-slow")
    elapsed = time.monotonic() - started
    assert 0.8 <= elapsed <= 3.0, f"timed out after {elapsed:.2f} s, configured 1 s"
    assert raised.value.type == TApplicationException.INTERNAL_ERROR, raised.value.message
    message = raised.value.message
    assert "echo" in message and "slow" in message, f"should name service and method: {message}"
    assert "\n" not in message.strip()

    assert conn.echo("same connection") == "same connection"
    assert other.add(20, 22) == 42
    # The late reply (at 3 s) must be dropped, never handed to a later call.
    harness.wait_until(
        lambda: "too-slow" in backend.log_lines("SLOW-END"), 10, "backend finishes the slow call"
    )
    for i in range(10):
        assert conn.echo(f"late-{i}") == f"late-{i}"
    assert conn.slow(100, "quick enough") == "quick enough"
