"""Calls through rpc_proxy: results, exceptions, routing errors, oneway, pipelining, ping."""

import os
import time
import uuid

import pytest
from thrift.Thrift import TApplicationException

import harness


def test_echo_returns_the_argument(echo_stack):
    assert echo_stack.client.echo("hello") == "hello"
    assert echo_stack.client.echo("") == ""
    assert echo_stack.client.echo("héllo wörld ✓") == "héllo wörld ✓"
    assert echo_stack.client.whoami() == "A"


def test_add(echo_stack):
    assert echo_stack.client.add(2, 3) == 5
    assert echo_stack.client.add(-7, 3) == -4
    assert echo_stack.client.add(2**31 - 2, 1) == 2**31 - 1


@pytest.mark.parametrize(
    "size", [0, 1, 256, 65536, 1 << 20], ids=["empty", "1B", "256B", "64KiB", "1MiB"]
)
def test_blob_roundtrips_binary_data(echo_stack, size):
    data = bytes(range(256)) * (size // 256) + os.urandom(size % 256)
    assert echo_stack.client.blob(data) == data


def test_void_call(echo_stack):
    assert echo_stack.client.ping() is None
    assert echo_stack.client.echo("after ping") == "after ping"


def test_declared_exception_arrives_as_echo_error(echo_stack, echo_idl):
    with pytest.raises(echo_idl.EchoError) as raised:
        echo_stack.client.fail("declared")
    assert raised.value.message == "declared failure"
    assert raised.value.code == 42
    assert echo_stack.client.echo("still works") == "still works"


def test_undeclared_exception_arrives_as_application_exception(echo_stack):
    with pytest.raises(TApplicationException) as raised:
        echo_stack.client.fail("boom")
    # The Python processor answers INTERNAL_ERROR "Internal error"; the proxy forwards it.
    assert raised.value.type == TApplicationException.INTERNAL_ERROR
    assert echo_stack.client.echo("still works") == "still works"


def test_unknown_service_is_not_found_and_connection_stays_usable(echo_stack, clients):
    conn = clients(echo_stack.proxy.address, service="nosuch")
    with pytest.raises(TApplicationException) as raised:
        conn.echo("x")
    assert raised.value.type == TApplicationException.UNKNOWN, raised.value.message
    assert raised.value.message.startswith("Service: nosuch Not Found"), raised.value.message
    # Same connection, a known service next.
    assert conn.client_for("echo").echo("next") == "next"
    with pytest.raises(TApplicationException):
        conn.whoami()
    assert conn.client_for("echo").whoami() == "A"


def test_service_without_endpoint_is_worker_not_found_at_once(echo_stack, zk, product, clients):
    harness.create_service(zk, product, "empty")
    conn = clients(echo_stack.proxy.address, service="empty")
    # The proxy learns of the new service from its watch; until then it may say Service Not Found.
    harness.wait_until(
        lambda: _error_of(conn.echo, "x").message.startswith("Worker FOR"),
        10,
        "proxy sees service `empty`",
    )
    for method, call in (("echo", lambda: conn.echo("x")), ("whoami", conn.whoami)):
        started = time.monotonic()
        with pytest.raises(TApplicationException) as raised:
            call()
        elapsed = time.monotonic() - started
        assert raised.value.type == TApplicationException.INTERNAL_ERROR, raised.value.message
        assert raised.value.message.startswith(f"Worker FOR empty.{method} Not Found"), (
            raised.value.message
        )
        assert elapsed < 2.0, f"Worker Not Found took {elapsed:.2f} s"
    assert conn.client_for("echo").echo("next") == "next"


def test_service_without_endpoint_at_proxy_start(backends, zk, product, proxies, clients):
    backends.start("A")
    harness.create_service(zk, product, "empty")
    proxy = proxies.start()
    conn = clients(proxy.address, service="empty")
    started = time.monotonic()
    with pytest.raises(TApplicationException) as raised:
        conn.add(1, 2)
    elapsed = time.monotonic() - started
    assert raised.value.message.startswith("Worker FOR empty.add Not Found"), raised.value.message
    assert raised.value.type == TApplicationException.INTERNAL_ERROR
    assert elapsed < 2.0, f"Worker Not Found took {elapsed:.2f} s"


def test_oneway_gets_no_reply_and_reaches_the_backend(echo_stack):
    token = f"note-{uuid.uuid4().hex}"
    echo_stack.client.notify(token)
    # Were the proxy to answer the oneway, this call would read that answer instead.
    assert echo_stack.client.echo("after notify") == "after notify"
    harness.wait_until(
        lambda: token in echo_stack.backend.log_lines("NOTIFY"), 5, "backend received notify"
    )


def test_oneway_between_pipelined_calls(echo_stack):
    conn = echo_stack.client
    conn.send_echo("first")
    conn.send_notify("in-between")
    conn.send_echo("second")
    assert conn.recv_echo() == "first"
    assert conn.recv_echo() == "second"
    assert conn.add(1, 1) == 2


def test_pipelined_calls_reply_in_request_order(echo_stack):
    conn = echo_stack.client
    payloads = [f"pipelined-{i}-" + "x" * (i * 37) for i in range(50)]
    for payload in payloads:
        conn.send_echo(payload)
    assert [conn.recv_echo() for _ in payloads] == payloads


@pytest.mark.parametrize("concurrent", [False, True], ids=["two_plain", "one_concurrent"])
def test_pipelined_slow_then_fast_replies_in_request_order(backends, proxies, clients, concurrent):
    # Either two endpoints, or one that answers the fast calls before the slow ones: the
    # replies reach the proxy out of order either way.
    backends.start("A", concurrent=concurrent)
    if not concurrent:
        backends.start("B")
    proxy = proxies.start()
    conn = clients(proxy.address)
    conn.send_slow(800, "slow-1")
    conn.send_echo("fast-2")
    conn.send_slow(300, "slow-3")
    conn.send_add(40, 2)
    conn.send_echo("fast-5")
    assert conn.recv_slow() == "slow-1"
    assert conn.recv_echo() == "fast-2"
    assert conn.recv_slow() == "slow-3"
    assert conn.recv_add() == 42
    assert conn.recv_echo() == "fast-5"


def test_slow_call_does_not_hold_up_other_clients(backends, proxies, clients):
    backend = backends.start("A", concurrent=True)
    proxy = proxies.start()
    slow_conn, fast_conn = clients(proxy.address), clients(proxy.address)
    slow_conn.send_slow(3000, "long")
    harness.wait_until(lambda: "long" in backend.log_lines("SLOW-START"), 5, "slow call started")
    started = time.monotonic()
    for i in range(20):
        assert fast_conn.echo(f"quick-{i}") == f"quick-{i}"
    elapsed = time.monotonic() - started
    assert "long" not in backend.log_lines("SLOW-END"), "test too slow to tell"
    assert elapsed < 1.5, f"20 calls took {elapsed:.2f} s behind one slow call"
    assert slow_conn.recv_slow() == "long"


def test_pipelining_across_services_keeps_request_order(backends, proxies, clients):
    backends.start("A", services=("echo",))
    backends.start("B", services=("other",))
    proxy = proxies.start()
    conn = clients(proxy.address)
    other = conn.client_for("other")  # same connection, another service
    conn.send_slow(600, "echo-slow")
    other.send_whoami()
    conn.send_echo("echo-fast")
    other.send_echo("other-fast")
    assert conn.recv_slow() == "echo-slow"
    assert other.recv_whoami() == "B"
    assert conn.recv_echo() == "echo-fast"
    assert other.recv_echo() == "other-fast"


@pytest.mark.parametrize("concurrent", [False, True], ids=["plain", "concurrent"])
def test_unix_socket_frontend(backends, proxies, clients, concurrent):
    backend = backends.start("U", unix=True, concurrent=concurrent)
    assert backend.address.startswith("/")
    proxy = proxies.start()
    conn = clients(proxy.address)
    assert conn.whoami() == "U"
    assert conn.echo("via unix frontend") == "via unix frontend"


def test_client_ping_is_answered_by_the_proxy(echo_stack):
    with harness.RawConnection(echo_stack.proxy.address) as raw:
        raw.send_message("ping", harness.HEARTBEAT, 77)
        reply = raw.recv_message()
        assert (reply.name, reply.mtype, reply.seqid) == ("ping", harness.REPLY, 77)
        # The connection keeps working for calls.
        raw.send_message("echo:echo", harness.CALL, 78, harness.string_args("raw"))
        reply = raw.recv_message()
        assert (reply.name, reply.mtype, reply.seqid) == ("echo", harness.REPLY, 78)
        assert harness.decode_string_result(reply.body) == "raw"
    # Answered by the proxy itself: the backend's ping() never ran.
    assert "PING" not in echo_stack.backend.log().splitlines()


def test_replies_carry_bare_name_and_client_seqid(echo_stack):
    seqids = [0, 7, -1, 2**31 - 1, -(2**31), 7]
    with harness.RawConnection(echo_stack.proxy.address) as raw:
        for seqid in seqids:
            raw.send_message("echo:echo", harness.CALL, seqid, harness.string_args(f"s{seqid}"))
        for seqid in seqids:
            reply = raw.recv_message()
            assert (reply.name, reply.mtype, reply.seqid) == ("echo", harness.REPLY, seqid)
            assert harness.decode_string_result(reply.body) == f"s{seqid}"


def test_tcp_proxy_address(backends, proxies, clients):
    backends.start("A")
    proxy = proxies.start(proxy_address=f"127.0.0.1:{harness.free_port()}")
    conn = clients(proxy.address)
    assert conn.echo("over tcp") == "over tcp"
    assert conn.whoami() == "A"


def test_idle_upstream_is_pinged_and_kept(backends, proxies, clients):
    backend = backends.start("A")
    proxy = proxies.start(heartbeat_interval_ms=200, heartbeat_timeout_ms=1000)
    conn = clients(proxy.address)
    assert conn.echo("warm") == "warm"
    # The Python backend answers the proxy's ("ping", 20) heartbeat through its ping()
    # handler, which logs PING: wait for a few heartbeats on the idle connection.
    harness.wait_until(
        lambda: backend.log().splitlines().count("PING") >= 3,
        10,
        "proxy pings the idle upstream connection",
    )
    # Answered pings (with a REPLY, as a Python server does) keep the endpoint, and their
    # replies are never handed to a caller.
    for i in range(20):
        assert conn.echo(f"after-heartbeat-{i}") == f"after-heartbeat-{i}"
        assert conn.whoami() == "A"


def _error_of(call, *args):
    """The TApplicationException `call(*args)` raises; AssertionError if it returns."""
    try:
        result = call(*args)
    except TApplicationException as exc:
        return exc
    raise AssertionError(f"expected a TApplicationException, got {result!r}")
