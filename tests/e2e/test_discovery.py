"""Endpoint discovery through ZooKeeper: live changes, load sharing, ZooKeeper outages."""

import collections
import time

import pytest
from thrift.Thrift import TApplicationException

import harness


def _whoami(conn):
    """whoami(), or the TApplicationException the proxy answered instead."""
    try:
        return conn.whoami()
    except TApplicationException as exc:
        return exc


def _names_seen(conn, calls):
    return collections.Counter(_whoami(conn) for _ in range(calls))


def test_endpoints_appear_live(backends, proxies, clients):
    proxy = proxies.start()
    conn = clients(proxy.address)
    with pytest.raises(TApplicationException) as raised:
        conn.whoami()
    assert raised.value.message.startswith("Service: echo Not Found"), raised.value.message

    backends.start("A")
    harness.wait_until(lambda: _whoami(conn) == "A", 10, "calls reach endpoint A once registered")
    assert all(conn.whoami() == "A" for _ in range(20))

    backends.start("B")
    harness.wait_until(
        lambda: _names_seen(conn, 10)["B"] > 0, 10, "calls reach endpoint B once registered"
    )


def test_endpoints_vanish_live(backends, proxies, clients):
    a = backends.start("A")
    b = backends.start("B")
    proxy = proxies.start()
    conn = clients(proxy.address)
    harness.wait_until(lambda: _names_seen(conn, 10)["A"] > 0, 10, "endpoint A gets calls")

    a.unregister()  # A keeps running: only its node goes.
    harness.wait_until(
        lambda: _names_seen(conn, 20) == {"B": 20}, 10, "calls stop going to unregistered A"
    )
    assert _names_seen(conn, 100) == {"B": 100}

    b.unregister()
    harness.wait_until(
        lambda: isinstance(_whoami(conn), TApplicationException), 10, "calls fail once B is gone"
    )
    started = time.monotonic()
    error = _whoami(conn)
    assert isinstance(error, TApplicationException), error
    assert error.type == TApplicationException.INTERNAL_ERROR, error.message
    assert error.message.startswith("Worker FOR echo.whoami Not Found"), error.message
    assert time.monotonic() - started < 2.0


def test_two_endpoints_share_the_load(backends, proxies, clients):
    backends.start("A")
    backends.start("B")
    proxy = proxies.start()
    conns = [clients(proxy.address) for _ in range(4)]
    seen = collections.Counter()
    for _ in range(50):
        for conn in conns:
            seen[conn.whoami()] += 1
    assert set(seen) == {"A", "B"}, seen
    assert min(seen.values()) >= 40, f"one endpoint starved: {dict(seen)}"


def test_zookeeper_outage_keeps_routing_then_resyncs(zk_server, zk, backends, proxies, clients):
    backends.start("A")
    backends.start("B")
    proxy = proxies.start(zk_session_timeout=30)
    conn = clients(proxy.address)
    harness.wait_until(lambda: set(_names_seen(conn, 10)) == {"A", "B"}, 10, "both endpoints used")

    zk_server.kill()
    calls, failures, seen = 0, [], collections.Counter()
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if calls % 50 == 0:
            conn = clients(proxy.address)  # new connections are served too
        result = _whoami(conn)
        calls += 1
        if isinstance(result, str):
            seen[result] += 1
        else:
            failures.append(result.message)
    assert not failures, (
        f"{len(failures)} of {calls} calls failed without ZooKeeper: {failures[:3]}"
    )
    assert calls >= 100, f"only {calls} calls in 10 s"
    assert set(seen) == {"A", "B"}, seen

    zk_server.start()
    harness.wait_until(lambda: zk.connected, 30, "kazoo reconnects to the restarted ZooKeeper")
    seen = _names_seen(conn, 20)
    assert set(seen) <= {"A", "B"}, f"routing broken after the restart: {seen}"

    backends.start("C")
    harness.wait_until(
        lambda: _names_seen(conn, 15)["C"] > 0,
        30,
        "endpoint C registered after the restart is used",
    )
