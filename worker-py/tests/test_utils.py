"""Client helpers: multiplexed Echo clients against a fake multiplexing server, from one
thread and from many."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any, Callable

import pytest
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.TMultiplexedProcessor import TMultiplexedProcessor
from thrift.transport import TSocket
from thrift.transport.TTransport import TFramedTransport, TMemoryBuffer, TTransportException

from fake_lb import WAIT, parse_frame, wait_until
from rpc_thrift import utils


class MuxServer:
    """Serves ``echo`` through a TMultiplexedProcessor on a unix socket, each connection on
    its own thread, recording every message name it receives; ``drop_after`` closes a
    connection after that many calls."""

    def __init__(self, path: str, drop_after: int = 0) -> None:
        from echo import Echo

        class Handler:
            def echo(self, s):
                return s

            def add(self, a, b):
                return a + b

            def slow(self, ms, s):
                time.sleep(ms / 1000)  # the behaviour under test: a slow handler
                return s

        self.processor = TMultiplexedProcessor()
        self.processor.registerProcessor("echo", Echo.Processor(Handler()))
        self.names: list[str] = []
        self.connections = 0
        self.closed = 0  # connections this server has closed
        self.drop_after = drop_after
        self.lock = threading.Lock()
        self.conn_threads: list[threading.Thread] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(32)
        self.listener.settimeout(WAIT)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                sock, _ = self.listener.accept()
                with self.lock:
                    self.connections += 1
                thread = threading.Thread(target=self._serve_conn, args=(sock,), daemon=True)
                self.conn_threads.append(thread)
                thread.start()
        except OSError:
            return  # listener closed or idle too long

    def _serve_conn(self, sock: socket.socket) -> None:
        try:
            with sock:
                self._serve_calls(sock)
        except OSError:
            pass  # the client went away (e.g. after its timeout)
        finally:
            with self.lock:
                self.closed += 1

    def _serve_calls(self, sock: socket.socket) -> None:
        sock.settimeout(WAIT)
        buf = b""
        served = 0
        while True:
            while len(buf) < 4 or len(buf) < 4 + struct.unpack("!i", buf[:4])[0]:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buf += chunk
            size = struct.unpack("!i", buf[:4])[0]
            raw, buf = buf[: 4 + size], buf[4 + size :]
            with self.lock:
                self.names.append(parse_frame(raw).name)
            out = TMemoryBuffer()
            self.processor.process(TBinaryProtocol(TMemoryBuffer(raw[4:])), TBinaryProtocol(out))
            reply = out.getvalue()
            sock.sendall(struct.pack("!i", len(reply)) + reply)
            served += 1
            if self.drop_after and served >= self.drop_after:
                return

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.listener.close()
        self.thread.join(WAIT)
        for thread in self.conn_threads:
            thread.join(WAIT)
        assert not any(t.is_alive() for t in [self.thread, *self.conn_threads]), (
            "a client connection was left open"
        )


@pytest.fixture
def fresh_defaults(monkeypatch):
    """No process default endpoint and no thread connections before the test; the test
    thread's connections are closed after it."""
    monkeypatch.setattr(utils, "_default_endpoint", None)
    monkeypatch.setattr(utils, "_default_timeout", utils.DEFAULT_TIMEOUT_MS)
    monkeypatch.setattr(utils, "_local", threading.local())
    yield
    for protocol in getattr(utils._local, "protocols", {}).values():
        protocol.trans.close()


def in_thread(call: Callable[[], Any], name: str = "other") -> Any:
    """``call()`` run on a new thread (joined): its result, or its exception raised here."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = call()
        except BaseException as exc:  # re-raised below, on the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=name)
    thread.start()
    thread.join(WAIT)
    assert not thread.is_alive(), f"{name} did not finish within {WAIT} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def timeout_of(protocol: Any) -> float | None:
    """The socket timeout, in seconds, of a protocol on an AutoConnectFramedTransport."""
    return protocol.trans._socket._timeout


def test_two_line_client(sock_dir, gen_py, fresh_defaults):
    from echo import Echo

    server = MuxServer(str(sock_dir / "proxy.sock"))
    try:
        base = utils.get_base_protocol(str(sock_dir / "proxy.sock"), timeout=3000)
        assert not base.trans.isOpen(), "opens lazily"
        client = Echo.Client(utils.get_service_protocol("echo"))
        assert client.echo("hi") == "hi"
        assert client.add(1, 2) == 3
        # An explicit base protocol works too, over the same connection.
        assert Echo.Client(utils.get_service_protocol("echo", base)).echo("again") == "again"
        base.trans.close()
    finally:
        server.close()
    assert server.names == ["echo:echo", "echo:add", "echo:echo"]
    assert server.connections == 1


def test_default_endpoint_from_environment(sock_dir, gen_py, fresh_defaults, monkeypatch):
    from echo import Echo

    path = str(sock_dir / "env.sock")
    monkeypatch.setenv("RPC_PROXY_ADDRESS", path)
    server = MuxServer(path)
    try:
        protocol = utils.get_service_protocol("echo")
        assert Echo.Client(protocol).echo("env") == "env"
        protocol.trans.close()
    finally:
        server.close()
    assert server.names == ["echo:echo"]


def test_reconnects_after_the_connection_drops(sock_dir, gen_py, fresh_defaults):
    from echo import Echo

    server = MuxServer(str(sock_dir / "p.sock"), drop_after=1)
    try:
        client = Echo.Client(
            utils.get_service_protocol("echo", utils.get_base_protocol(str(sock_dir / "p.sock")))
        )
        assert client.echo("one") == "one"
        wait_until(lambda: server.closed == 1, what="the server closes the connection")
        # The server closed after one call: the next call reopens (the peer-closed check
        # before writing), so no call is lost.
        assert client.echo("two") == "two"
        client._oprot.trans.close()
    finally:
        server.close()
    assert server.connections == 2


def test_connect_failure_raises_and_recovers(sock_dir, gen_py, fresh_defaults):
    from echo import Echo

    path = str(sock_dir / "late.sock")
    client = Echo.Client(utils.get_service_protocol("echo", utils.get_base_protocol(path)))
    with pytest.raises(TTransportException):
        client.echo("nobody there")
    server = MuxServer(path)
    try:
        assert client.echo("now") == "now"
        client._oprot.trans.close()
    finally:
        server.close()


def test_tcp_endpoint_and_transport_argument(gen_py):
    sock = utils._socket("127.0.0.1:5550", 100)
    assert (sock.host, sock.port, sock._unix_socket) == ("127.0.0.1", 5550, None)
    assert utils._socket("[::1]:7", None).host == "::1"
    transport = utils.AutoConnectFramedTransport(utils._socket("/tmp/none.sock", 100))
    protocol = utils.get_service_protocol("svc", transport)
    assert protocol.serviceName == "svc"
    with pytest.raises(TypeError):
        utils.get_service_protocol("svc", object())


# === threads ===


def test_threads_get_their_own_connections(sock_dir, gen_py, fresh_defaults):
    from echo import Echo

    path = str(sock_dir / "proxy.sock")
    server = MuxServer(path)
    threads, calls = 8, 20
    start = threading.Barrier(threads)
    outcomes: dict[int, Any] = {}

    def run(tid: int) -> None:
        # The README's line, in each thread: the connection is the thread's own.
        client = Echo.Client(utils.get_service_protocol("echo"))
        transport = client._oprot.trans
        try:
            assert utils.get_service_protocol("echo").trans is transport, "reused per thread"
            start.wait(WAIT)
            answers = [(f"{tid}-{i}", client.slow(1, f"{tid}-{i}")) for i in range(calls)]
            outcomes[tid] = (transport, answers)
        except BaseException as exc:  # reported below
            outcomes[tid] = exc
        finally:
            transport.close()

    try:
        utils.get_base_protocol(path)  # the process default, as the README says
        workers = [threading.Thread(target=run, args=(t,)) for t in range(threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT)
        assert not any(worker.is_alive() for worker in workers), "client threads still running"
    finally:
        server.close()
    errors = {tid: o for tid, o in outcomes.items() if isinstance(o, BaseException)}
    assert not errors, errors
    crossed = [(asked, got) for _, answers in outcomes.values() for asked, got in answers]
    assert [pair for pair in crossed if pair[0] != pair[1]] == []
    assert len(crossed) == threads * calls
    assert len({id(transport) for transport, _ in outcomes.values()}) == threads
    assert server.connections == threads


def test_a_connection_shared_by_threads_is_refused(sock_dir, gen_py, fresh_defaults):
    from echo import Echo

    path = str(sock_dir / "proxy.sock")
    server = MuxServer(path)
    try:
        base = utils.get_base_protocol(path)
        client = Echo.Client(utils.get_service_protocol("echo", base))
        assert client.echo("mine") == "mine"  # the main thread owns `base` now
        # The same client, another client on the same base, or the bare base protocol:
        # each is refused in another thread before a byte is written.
        with pytest.raises(utils.SharedConnectionError) as raised:
            in_thread(lambda: client.echo("shared client"), name="intruder")
        message = str(raised.value)
        assert "'MainThread'" in message and "'intruder'" in message, message
        assert path in message and "get_service_protocol(service)" in message, message
        with pytest.raises(utils.SharedConnectionError):
            in_thread(lambda: Echo.Client(utils.get_service_protocol("echo", base)).echo("x"))
        with pytest.raises(utils.SharedConnectionError):
            in_thread(lambda: Echo.Client(base).echo("not multiplexed"))
        assert client.echo("still mine") == "still mine"

        # Meanwhile another thread's default connection is its own.
        def own() -> str:
            protocol = utils.get_service_protocol("echo")
            try:
                return Echo.Client(protocol).echo("own")
            finally:
                protocol.trans.close()

        assert in_thread(own) == "own"
        base.trans.close()
    finally:
        server.close()
    assert server.names == ["echo:echo", "echo:echo", "echo:echo"]
    assert server.connections == 2


def test_a_foreign_transport_shared_by_threads_is_refused(sock_dir, gen_py, fresh_defaults):
    from echo import Echo

    path = str(sock_dir / "proxy.sock")
    server = MuxServer(path)
    transport = TFramedTransport(TSocket.TSocket(unix_socket=path))
    try:
        transport.open()
        client = Echo.Client(utils.get_service_protocol("echo", transport))
        assert client.echo("mine") == "mine"
        with pytest.raises(utils.SharedConnectionError):
            in_thread(lambda: client.echo("shared"))
        assert client.echo("still mine") == "still mine"
    finally:
        transport.close()
        server.close()
    assert server.names == ["echo:echo", "echo:echo"]


def test_a_connection_passes_on_when_its_owner_ends_or_closes_it(sock_dir, gen_py, fresh_defaults):
    from echo import Echo

    path = str(sock_dir / "proxy.sock")
    server = MuxServer(path)
    try:
        base = utils.get_base_protocol(path)
        client = Echo.Client(utils.get_service_protocol("echo", base))
        # Built here, first used (and so owned) by a thread that then ends.
        assert in_thread(lambda: client.echo("first")) == "first"
        assert client.echo("after its owner ended") == "after its owner ended"
        # close() in the owner hands it on; the next call reopens it.
        base.trans.close()
        assert in_thread(lambda: client.echo("after close")) == "after close"
        assert client.echo("back") == "back"
        # While a live thread owns the main thread's default connection (handed to it), the
        # main thread's next default connection is a new one.
        taken, release = threading.Event(), threading.Event()

        def keep() -> None:
            client.echo("taken")
            taken.set()
            assert release.wait(WAIT)

        base.trans.close()
        keeper = threading.Thread(target=keep)
        keeper.start()
        try:
            assert taken.wait(WAIT), "the other thread made no call"
            own = utils.get_service_protocol("echo")
            assert own.trans is not base.trans
            assert Echo.Client(own).echo("own") == "own"
            own.trans.close()
        finally:
            release.set()
            keeper.join(WAIT)
        assert utils.get_service_protocol("echo").trans is not base.trans
        base.trans.close()
    finally:
        server.close()
    assert server.connections == 4


def test_a_new_default_endpoint_leaves_other_threads_connections(sock_dir, gen_py, fresh_defaults):
    from echo import Echo

    first = MuxServer(str(sock_dir / "first.sock"))
    second = MuxServer(str(sock_dir / "second.sock"))
    connected, moved = threading.Event(), threading.Event()

    def other_thread() -> list[str]:
        client = Echo.Client(utils.get_service_protocol("echo"))
        fresh = None
        try:
            answers = [client.echo("before")]
            connected.set()
            assert moved.wait(WAIT), "the main thread did not move the default"
            answers.append(client.echo("same connection"))
            fresh = Echo.Client(utils.get_service_protocol("echo"))
            answers.append(fresh.echo("new default"))
            return answers
        finally:
            client._oprot.trans.close()
            if fresh is not None:
                fresh._oprot.trans.close()

    try:
        utils.get_base_protocol(first.listener.getsockname())
        result: dict[str, Any] = {}
        thread = threading.Thread(target=lambda: result.update(answers=other_thread()))
        thread.start()
        assert connected.wait(WAIT), "the other thread made no call"
        utils.get_base_protocol(second.listener.getsockname(), timeout=3000)
        moved.set()
        thread.join(WAIT)
        assert not thread.is_alive()
    finally:
        moved.set()
        first.close()
        second.close()
    assert result["answers"] == ["before", "same connection", "new default"]
    assert (first.connections, first.names) == (1, ["echo:echo", "echo:echo"])
    assert (second.connections, second.names) == (1, ["echo:echo"])


# === timeouts ===


def test_default_timeout_is_above_the_proxys_and_can_be_set(fresh_defaults, monkeypatch):
    monkeypatch.setenv("RPC_PROXY_ADDRESS", "/tmp/rpc-thrift-none.sock")
    assert utils.DEFAULT_TIMEOUT_MS > 15000  # the proxy's default request_timeout_ms
    default = utils.get_service_protocol("echo")
    assert timeout_of(default) == utils.DEFAULT_TIMEOUT_MS / 1000
    assert default.trans._socket._unix_socket == "/tmp/rpc-thrift-none.sock"
    # Another timeout is another connection of the thread; each is reused.
    short = utils.get_service_protocol("echo", timeout=1500)
    assert timeout_of(short) == 1.5
    assert short.trans is not default.trans
    assert utils.get_service_protocol("other", timeout=1500).trans is short.trans
    assert utils.get_service_protocol("echo").trans is default.trans
    # get_base_protocol sets the process default endpoint and timeout.
    assert timeout_of(utils.get_base_protocol("/tmp/rpc-thrift-a.sock")) == 20.0
    utils.get_base_protocol("/tmp/rpc-thrift-b.sock", timeout=3000)
    moved = utils.get_service_protocol("echo")
    assert (moved.trans._socket._unix_socket, timeout_of(moved)) == ("/tmp/rpc-thrift-b.sock", 3.0)
    assert timeout_of(utils.get_service_protocol("echo", timeout=None)) == 3.0
    with pytest.raises(ValueError, match="get_base_protocol"):
        utils.get_service_protocol("echo", moved, timeout=1000)


def test_timeout_override_ends_a_slow_call(sock_dir, gen_py, fresh_defaults):
    from echo import Echo

    path = str(sock_dir / "proxy.sock")
    server = MuxServer(path)
    try:
        utils.get_base_protocol(path)
        impatient = Echo.Client(utils.get_service_protocol("echo", timeout=200))
        started = time.monotonic()
        with pytest.raises(TTransportException) as raised:
            impatient.slow(1000, "late")
        assert raised.value.type == TTransportException.TIMED_OUT, raised.value
        assert time.monotonic() - started < 0.9
        patient = Echo.Client(utils.get_service_protocol("echo"))
        assert patient.slow(300, "in time") == "in time"
        assert impatient.echo("reopened") == "reopened"
        impatient._oprot.trans.close()
        patient._oprot.trans.close()
    finally:
        server.close()
