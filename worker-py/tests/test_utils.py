"""Client helpers: a multiplexed Echo client against a fake multiplexing server."""

from __future__ import annotations

import socket
import struct
import threading

import pytest
from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.TMultiplexedProcessor import TMultiplexedProcessor
from thrift.transport.TTransport import TMemoryBuffer, TTransportException

from fake_lb import WAIT, parse_frame
from rpc_thrift import utils


class MuxServer:
    """Serves ``echo`` through a TMultiplexedProcessor on a unix socket, one connection at a
    time, recording every message name it receives; ``drop_after`` closes a connection after
    that many calls."""

    def __init__(self, path: str, drop_after: int = 0) -> None:
        from echo import Echo

        class Handler:
            def echo(self, s):
                return s

            def add(self, a, b):
                return a + b

        self.processor = TMultiplexedProcessor()
        self.processor.registerProcessor("echo", Echo.Processor(Handler()))
        self.names: list[str] = []
        self.connections = 0
        self.drop_after = drop_after
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(4)
        self.listener.settimeout(WAIT)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            while True:
                sock, _ = self.listener.accept()
                self.connections += 1
                with sock:
                    self._serve_conn(sock)
        except OSError:
            return  # listener closed or idle too long

    def _serve_conn(self, sock: socket.socket) -> None:
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
        assert not self.thread.is_alive(), "a client connection was left open"


@pytest.fixture
def reset_default(monkeypatch):
    """No default protocol before the test; the one it made is closed after it."""
    monkeypatch.setattr(utils, "_default_protocol", None)
    yield
    if utils._default_protocol is not None:
        utils._default_protocol.trans.close()


def test_two_line_client(sock_dir, gen_py, reset_default):
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


def test_default_endpoint_from_environment(sock_dir, gen_py, reset_default, monkeypatch):
    from echo import Echo

    path = str(sock_dir / "env.sock")
    monkeypatch.setenv("RPC_PROXY_ADDRESS", path)
    server = MuxServer(path)
    try:
        assert Echo.Client(utils.get_service_protocol("echo")).echo("env") == "env"
        utils._default_protocol.trans.close()
    finally:
        server.close()
    assert server.names == ["echo:echo"]


def test_reconnects_after_the_connection_drops(sock_dir, gen_py, reset_default):
    from echo import Echo

    server = MuxServer(str(sock_dir / "p.sock"), drop_after=1)
    try:
        client = Echo.Client(
            utils.get_service_protocol("echo", utils.get_base_protocol(str(sock_dir / "p.sock")))
        )
        assert client.echo("one") == "one"
        # The server closed after one call: the next call reopens (the peer-closed check
        # before writing), so no call is lost.
        assert client.echo("two") == "two"
        client._oprot.trans.close()
    finally:
        server.close()
    assert server.connections == 2


def test_connect_failure_raises_and_recovers(sock_dir, gen_py, reset_default):
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
