"""Client helpers: reach a service through the local rpc_proxy in two lines.

::

    from rpc_thrift.utils import get_base_protocol, get_service_protocol
    get_base_protocol("/usr/local/rpc_proxy/proxy.sock")   # optional: the default endpoint
    client = Echo.Client(get_service_protocol("echo"))
    client.echo("hi")

Every hop of the mesh speaks framed, strict binary Thrift, and the proxy routes on the
``service:`` prefix of the message name (Apache Thrift's ``TMultiplexedProtocol``).

The connection opens lazily, on the first call, and an I/O error closes it so that the next
call opens a new one (the original's ``TAutoConnectFramedTransport`` behaved the same way).
A protocol and its transport are not thread-safe: use one per thread.
"""

from __future__ import annotations

import logging
import os
import threading
from io import BytesIO
from struct import pack, unpack
from typing import Any

from thrift.protocol.TMultiplexedProtocol import TMultiplexedProtocol
from thrift.protocol.TProtocol import TProtocolBase
from thrift.transport import TSocket
from thrift.transport.TTransport import (
    CReadableTransport,
    TTransportBase,
    TTransportException,
)

from rpc_thrift._worker import DEFAULT_MAX_FRAME_SIZE
from rpc_thrift.worker import binary_protocol

__all__ = [
    "DEFAULT_PROXY_ADDRESS",
    "AutoConnectFramedTransport",
    "get_base_protocol",
    "get_service_protocol",
]

#: Where the proxy listens when neither ``get_base_protocol`` nor ``RPC_PROXY_ADDRESS`` says.
DEFAULT_PROXY_ADDRESS = "/usr/local/rpc_proxy/proxy.sock"

_default_protocol: TProtocolBase | None = None
_default_lock = threading.Lock()


def _socket(endpoint: str, timeout_ms: float | None) -> TSocket.TSocket:
    """A TSocket to ``endpoint``: ``host:port`` when it contains ``:``, else a unix path."""
    endpoint = endpoint.strip()
    if not endpoint:
        raise ValueError("empty endpoint")
    if ":" in endpoint:
        host, _, port = endpoint.rpartition(":")
        host = host.strip("[]") or "localhost"  # "[::1]:5550", ":5550"
        sock = TSocket.TSocket(host, int(port))
    else:
        sock = TSocket.TSocket(unix_socket=endpoint)
    sock.setTimeout(timeout_ms)
    return sock


class AutoConnectFramedTransport(TTransportBase, CReadableTransport):
    """Thrift framed transport over a socket that opens on first use and closes on error.

    A frame is written in one piece at ``flush()``, opening the socket first if it is closed
    (or found closed by the peer). Any error while writing or reading closes the socket and
    clears the buffers, so a broken connection costs one failed call and the next call opens
    a fresh one. Frames longer than ``max_frame_size``, or with a negative length, are refused.
    Implements ``CReadableTransport`` so the accelerated binary protocol can decode from it.
    """

    def __init__(self, socket: TTransportBase, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE):
        self._socket = socket
        self._max_frame_size = max_frame_size
        self._rbuf = BytesIO(b"")
        self._wbuf = BytesIO()

    def isOpen(self) -> bool:  # noqa: N802 - Thrift's transport API
        return bool(self._socket.isOpen())

    def open(self) -> None:
        if not self._socket.isOpen():
            self._socket.open()

    def close(self) -> None:
        self._socket.close()
        self._rbuf = BytesIO(b"")
        self._wbuf = BytesIO()

    def read(self, sz: int) -> bytes:
        data = self._rbuf.read(sz)
        if data:
            return data
        self._read_frame()
        return self._rbuf.read(sz)

    def _read_frame(self) -> None:
        try:
            (size,) = unpack("!i", self._socket.readAll(4))
            if size < 0 or size > self._max_frame_size:
                raise TTransportException(
                    TTransportException.SIZE_LIMIT,
                    f"frame size {size} outside 0..{self._max_frame_size}",
                )
            self._rbuf = BytesIO(self._socket.readAll(size))
        except Exception:
            self.close()
            raise

    def write(self, buf: bytes) -> None:
        self._wbuf.write(buf)

    def flush(self) -> None:
        out = self._wbuf.getvalue()
        self._wbuf = BytesIO()
        try:
            self.open()
            self._socket.write(pack("!i", len(out)) + out)
            self._socket.flush()
        except Exception:
            self.close()
            raise

    # CReadableTransport, for the accelerated protocol.
    @property
    def cstringio_buf(self) -> BytesIO:
        return self._rbuf

    def cstringio_refill(self, partialread: bytes, reqlen: int) -> BytesIO:
        # Called once the buffer is exhausted: the rest comes from the next frame(s).
        prefix = partialread
        while len(prefix) < reqlen:
            self._read_frame()
            prefix += self._rbuf.getvalue()
        self._rbuf = BytesIO(prefix)
        return self._rbuf


def get_base_protocol(endpoint: str, timeout: float | None = 5000) -> TProtocolBase:
    """A framed, strict binary protocol to ``endpoint``, remembered as the process default.

    :param endpoint: the proxy's address: a unix socket path, or ``host:port`` when it
        contains ``:``.
    :param timeout: connect, read and write timeout in milliseconds (``None``: none).
    :returns: a protocol (C-accelerated when thrift's codec is available) on an
        :class:`AutoConnectFramedTransport`, which opens the socket on the first call.
        Later :func:`get_service_protocol` calls without a transport use it.
    """
    global _default_protocol
    protocol = binary_protocol(AutoConnectFramedTransport(_socket(endpoint, timeout)))
    with _default_lock:
        _default_protocol = protocol
    return protocol


def _default_base() -> TProtocolBase:
    with _default_lock:
        protocol = _default_protocol
    if protocol is None:
        endpoint = os.environ.get("RPC_PROXY_ADDRESS") or DEFAULT_PROXY_ADDRESS
        protocol = get_base_protocol(endpoint)
    return protocol


def get_service_protocol(
    service: str,
    transport: TProtocolBase | TTransportBase | None = None,
    logger: logging.Logger | None = None,
    fast: bool = False,
) -> TMultiplexedProtocol:
    """The protocol a generated client of ``service`` needs: ``Service.Client(protocol)``.

    Calls go out named ``service:method`` (``TMultiplexedProtocol``); the proxy routes on the
    prefix and replies carry the bare method name.

    :param service: the service name registered in ZooKeeper.
    :param transport: the base protocol (e.g. from :func:`get_base_protocol`), or a framed
        transport to put a binary protocol on. ``None``: the process default, created on
        first use to ``$RPC_PROXY_ADDRESS`` (default ``/usr/local/rpc_proxy/proxy.sock``).
    :param logger: if given, a debug line names the service and transport.
    :param fast: accepted for compatibility with the original API; the C-accelerated codec
        is used whenever thrift provides it (no patched compiler is needed).
    """
    del fast  # see the docstring
    if transport is None:
        base = _default_base()
    elif isinstance(transport, TProtocolBase):
        base = transport
    elif isinstance(transport, TTransportBase):
        base = binary_protocol(transport)
    else:
        raise TypeError(f"transport must be a Thrift protocol or transport, got {transport!r}")
    if logger is not None:
        logger.debug("rpc_thrift: service %s over %r", service, _describe(base))
    return TMultiplexedProtocol(base, service)


def _describe(protocol: Any) -> Any:
    transport = getattr(protocol, "trans", None)
    sock = getattr(transport, "_socket", None)
    return getattr(sock, "_address", transport)
