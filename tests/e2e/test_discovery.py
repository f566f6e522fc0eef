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


def _calls_for(seconds, connect):
    """whoami() calls for `seconds`, on a new connection every 50 calls.

    Returns (number of calls, failure messages, Counter of names).
    """
    calls, failures, seen = 0, [], collections.Counter()
    deadline = time.monotonic() + seconds
    conn = None
    while time.monotonic() < deadline:
        if calls % 50 == 0:
            conn = connect()  # new connections are served too
        result = _whoami(conn)
        calls += 1
        if isinstance(result, str):
            seen[result] += 1
        else:
            failures.append(result.message)
    return calls, failures, seen


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
    try:
        calls, failures, seen = _calls_for(10.0, lambda: clients(proxy.address))
    finally:
        zk_server.start()
    assert not failures, (
        f"{len(failures)} of {calls} calls failed without ZooKeeper: {failures[:3]}"
    )
    assert calls >= 100, f"only {calls} calls in 10 s"
    assert set(seen) == {"A", "B"}, seen

    harness.wait_until(lambda: zk.connected, 30, "kazoo reconnects to the restarted ZooKeeper")
    seen = _names_seen(conn, 20)
    assert set(seen) <= {"A", "B"}, f"routing broken after the restart: {seen}"

    backends.start("C")
    harness.wait_until(
        lambda: _names_seen(conn, 15)["C"] > 0,
        30,
        "endpoint C registered after the restart is used",
    )


def test_zookeeper_session_expiry_keeps_routing_then_resyncs(
    zk_server, zk, backends, proxies, clients
):
    a = backends.start("A")
    backends.start("B")
    proxy = proxies.start(zk_session_timeout=2)
    conn = clients(proxy.address)
    harness.wait_until(lambda: set(_names_seen(conn, 10)) == {"A", "B"}, 10, "both endpoints used")

    zk_server.kill()  # down for longer than the proxy's 2 s session
    try:
        calls, failures, seen = _calls_for(5.0, lambda: clients(proxy.address))
    finally:
        zk_server.start()
    assert not failures, f"{len(failures)} of {calls} calls failed: {failures[:3]}"
    assert set(seen) == {"A", "B"}, seen

    # Changes made as soon as ZooKeeper is back must reach the proxy's table.
    harness.wait_until(lambda: zk.connected, 30, "kazoo reconnects to the restarted ZooKeeper")
    a.unregister()
    backends.start("C")
    harness.wait_until(
        lambda: set(_names_seen(conn, 20)) == {"B", "C"},
        30,
        lambda: f"proxy resyncs: A gone, C added\n{proxy.output()}",
    )
    assert set(_names_seen(conn, 40)) == {"B", "C"}


def test_first_call_after_start_waits_for_discovery(zk, backends, proxies, clients, product):
    backend = backends.start("A", services=())
    services = [f"svc{i:02d}" for i in range(40)]
    for service in services:
        backend.register(zk, product, service)
    proxy = proxies.start()  # returns as soon as the socket accepts
    conn = clients(proxy.address, service=services[-1])
    assert conn.whoami() == "A", "a service that exists must not be Not Found after a start"
    assert all(conn.client_for(s).whoami() == "A" for s in services)


def test_dead_endpoint_next_to_a_live_one(zk, product, backends, proxies, clients):
    backends.start("A")
    dead = f"127.0.0.1:{harness.free_port()}"  # registered, nobody listening
    harness.register_endpoint(zk, product, "echo", dead)
    proxy = proxies.start()
    conn = clients(proxy.address)
    harness.wait_until(
        lambda: all(_whoami(conn) == "A" for _ in range(50)),
        15,
        "calls settle on the live endpoint",
    )
    started = time.monotonic()
    assert _names_seen(conn, 50) == {"A": 50}
    assert time.monotonic() - started < 5.0
