"""Client helpers: reach a service through the local rpc_proxy in two lines.

::

    from rpc_thrift.utils import get_service_protocol
    client = Echo.Client(get_service_protocol("echo"))
    client.echo("hi")

Every hop of the mesh speaks framed, strict binary Thrift, and the proxy routes on the
``service:`` prefix of the message name (Apache Thrift's ``TMultiplexedProtocol``).

**Threads.** A connection carries one call at a time, so :func:`get_service_protocol` without
a transport gives each thread its own connection to the process-wide default endpoint (set by
:func:`get_base_protocol`, else ``$RPC_PROXY_ADDRESS``, else :data:`DEFAULT_PROXY_ADDRESS`)
with the default timeout. Build the client in the thread that calls it (per request, per task
or once per thread): the second line above is cheap, the connection is reused by the thread.
A connection belongs to the first thread that uses it, until it is closed or that thread
ends; any other thread using it gets :class:`SharedConnectionError` before a byte is written
(before, such calls failed or, worse, got another thread's answer). The same holds for an
explicit protocol or transport given to :func:`get_service_protocol`.

**Timeouts.** The default client timeout, :data:`DEFAULT_TIMEOUT_MS` (20 s), is above the
proxy's default ``request_timeout_ms`` (15 s): a call that is too slow ends with the proxy's
``TApplicationException`` (type 6, ``INTERNAL_ERROR``, naming the timeout), not with a
transport timeout that leaves the caller guessing. Set another one per client with
``get_service_protocol(service, timeout=ms)``, or process-wide with :func:`get_base_protocol`.

The connection opens lazily, on the first call, and an I/O error closes it so that the next
call opens a new one (the original's ``TAutoConnectFramedTransport`` behaved the same way).
A connection no longer referenced (e.g. that of a thread that ended) is closed when it is
garbage-collected.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
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
    "DEFAULT_TIMEOUT_MS",
    "AutoConnectFramedTransport",
    "SharedConnectionError",
    "get_base_protocol",
    "get_service_protocol",
]

#: Where the proxy listens when neither ``get_base_protocol`` nor ``RPC_PROXY_ADDRESS`` says.
DEFAULT_PROXY_ADDRESS = "/usr/local/rpc_proxy/proxy.sock"

#: Default connect, read and write timeout of a client connection, in milliseconds: above the
#: proxy's default ``request_timeout_ms`` (15000), so that the proxy's code-6 answer to a slow
#: call arrives before the client gives up on the socket.
DEFAULT_TIMEOUT_MS = 20000

# The process default: the endpoint (None: $RPC_PROXY_ADDRESS, else DEFAULT_PROXY_ADDRESS) and
# timeout of the connections get_service_protocol() makes. Each thread keeps its own
# connections in _local.protocols, keyed by (endpoint, timeout).
_default_endpoint: str | None = None
_default_timeout: float | None = DEFAULT_TIMEOUT_MS
_default_lock = threading.Lock()
_local = threading.local()

# Serialises the claims of connections by threads (_Owner.check, _owner_of).
_owner_lock = threading.Lock()


class SharedConnectionError(RuntimeError):
    """A connection (protocol or transport) was used by a thread other than its owner.

    A Thrift connection carries one call at a time: two threads writing and reading it at
    once interleave their frames and may get each other's answers. The first thread that
    uses a connection owns it until the connection is closed (``close()`` on an
    :class:`AutoConnectFramedTransport`) or that thread ends. Nothing was written when this
    is raised, and the owner's calls go on unharmed.
    """


class _Owner:
    """The thread a connection belongs to: the first that uses it, until close() or its end."""

    __slots__ = ("_thread",)

    def __init__(self) -> None:
        # The owning Thread object itself, not its ident: a new thread may reuse a dead
        # thread's ident, and must not be taken for the owner while it lives.
        self._thread: threading.Thread | None = None

    def check(self, what: object) -> None:
        """Claims the connection for the calling thread, or raises SharedConnectionError."""
        current = threading.current_thread()
        if self._thread is current:
            return
        with _owner_lock:
            owner = self.thread()
            if owner is not None and owner is not current:
                raise SharedConnectionError(
                    f"{_describe(what)} belongs to thread {owner.name!r} and was used from "
                    f"thread {current.name!r}; a connection carries one call at a time. Call "
                    "get_service_protocol(service) without a transport in the thread that "
                    "makes the calls (each thread gets its own connection), or close() the "
                    "connection in its owner before handing it to another thread."
                )
            self._thread = current

    def thread(self) -> threading.Thread | None:
        """The owning thread, or None when there is none or it has ended."""
        owner = self._thread
        if owner is None or not owner.is_alive():
            return None
        return owner

    def usable_here(self) -> bool:
        """True when the calling thread owns the connection or may claim it."""
        owner = self.thread()
        return owner is None or owner is threading.current_thread()

    def release(self) -> None:
        self._thread = None


def _owner_of(transport: Any) -> _Owner:
    """The owner record of any transport object, attached to it on first use."""
    owner = getattr(transport, "_rpc_thrift_owner", None)
    if owner is None:
        with _owner_lock:
            owner = getattr(transport, "_rpc_thrift_owner", None)
            if owner is None:
                owner = _Owner()
                try:
                    transport._rpc_thrift_owner = owner
                except AttributeError:  # no attributes (__slots__): cannot be tracked
                    pass
    return owner


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

    The first thread that writes, reads or opens it owns it; any other thread doing so gets
    :class:`SharedConnectionError` until the owner ends or calls ``close()`` (which any thread
    may call, and which hands the transport on: the next thread to use it owns it). The
    socket is closed when the transport is garbage-collected.
    """

    def __init__(self, socket: TTransportBase, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE):
        self._socket = socket
        self._max_frame_size = max_frame_size
        self._rbuf = BytesIO(b"")
        self._wbuf = BytesIO()
        self._rpc_thrift_owner = _Owner()
        weakref.finalize(self, socket.close)

    def isOpen(self) -> bool:  # noqa: N802 - Thrift's transport API
        return bool(self._socket.isOpen())

    def open(self) -> None:
        self._rpc_thrift_owner.check(self)
        if not self._socket.isOpen():
            self._socket.open()

    def close(self) -> None:
        """Closes the socket (the next call reopens it) and releases the owning thread."""
        self._reset()
        self._rpc_thrift_owner.release()

    def _reset(self) -> None:
        self._socket.close()
        self._rbuf = BytesIO(b"")
        self._wbuf = BytesIO()

    def read(self, sz: int) -> bytes:
        self._rpc_thrift_owner.check(self)
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
            self._reset()
            raise

    def write(self, buf: bytes) -> None:
        self._rpc_thrift_owner.check(self)
        self._wbuf.write(buf)

    def flush(self) -> None:
        self._rpc_thrift_owner.check(self)
        out = self._wbuf.getvalue()
        self._wbuf = BytesIO()
        try:
            self.open()
            self._socket.write(pack("!i", len(out)) + out)
            self._socket.flush()
        except Exception:
            self._reset()
            raise

    # CReadableTransport, for the accelerated protocol.
    @property
    def cstringio_buf(self) -> BytesIO:
        return self._rbuf

    def cstringio_refill(self, partialread: bytes, reqlen: int) -> BytesIO:
        # Called once the buffer is exhausted: the rest comes from the next frame(s).
        self._rpc_thrift_owner.check(self)
        prefix = partialread
        while len(prefix) < reqlen:
            self._read_frame()
            prefix += self._rbuf.getvalue()
        self._rbuf = BytesIO(prefix)
        return self._rbuf


class _ServiceProtocol(TMultiplexedProtocol):
    """``TMultiplexedProtocol`` that refuses a transport in use by another thread.

    Checked where every call starts (sending it, reading its answer), so that any transport,
    not only an :class:`AutoConnectFramedTransport`, is refused before a byte is written.
    """

    def writeMessageBegin(self, name: str, type: int, seqid: int) -> None:  # noqa: N802
        _owner_of(self.trans).check(self.trans)
        super().writeMessageBegin(name, type, seqid)

    def readMessageBegin(self) -> Any:  # noqa: N802
        _owner_of(self.trans).check(self.trans)
        return super().readMessageBegin()


def _new_protocol(endpoint: str, timeout: float | None) -> TProtocolBase:
    return binary_protocol(AutoConnectFramedTransport(_socket(endpoint, timeout)))


def get_base_protocol(endpoint: str, timeout: float | None = DEFAULT_TIMEOUT_MS) -> TProtocolBase:
    """A new connection to ``endpoint``, which becomes the process default endpoint.

    :param endpoint: the proxy's address: a unix socket path, or ``host:port`` when it
        contains ``:``.
    :param timeout: connect, read and write timeout in milliseconds (``None``: none); also
        the process default timeout. The default, :data:`DEFAULT_TIMEOUT_MS`, is above the
        proxy's default ``request_timeout_ms``.
    :returns: a framed, strict binary protocol (C-accelerated when thrift's codec is
        available) on an :class:`AutoConnectFramedTransport`, which opens the socket on the
        first call. It is also the calling thread's default connection: a later
        :func:`get_service_protocol` call without a transport in this thread uses it.
        Like any connection it belongs to the first thread that uses it.

    Later :func:`get_service_protocol` calls without a transport, in any thread, connect to
    ``endpoint`` with ``timeout``. Connections that other threads already have are left as
    they are: clients built on them keep working.
    """
    global _default_endpoint, _default_timeout
    endpoint = endpoint.strip()
    protocol = _new_protocol(endpoint, timeout)
    with _default_lock:
        _default_endpoint, _default_timeout = endpoint, timeout
    _thread_protocols()[(endpoint, timeout)] = protocol
    return protocol


def _thread_protocols() -> dict[tuple[str, float | None], TProtocolBase]:
    """The calling thread's connections to default endpoints, by (endpoint, timeout)."""
    try:
        return _local.protocols
    except AttributeError:
        _local.protocols = {}
        return _local.protocols


def _thread_protocol(timeout: float | None) -> TProtocolBase:
    """The calling thread's connection to the default endpoint with ``timeout`` (None: the
    default timeout), made on first need."""
    with _default_lock:
        endpoint, default_timeout = _default_endpoint, _default_timeout
    if endpoint is None:
        endpoint = (os.environ.get("RPC_PROXY_ADDRESS") or DEFAULT_PROXY_ADDRESS).strip()
    key = (endpoint, default_timeout if timeout is None else timeout)
    protocols = _thread_protocols()
    protocol = protocols.get(key)
    # A connection of this thread's that another thread took over (a client handed to it)
    # stays theirs: this thread gets a new one.
    if protocol is None or not _owner_of(protocol.trans).usable_here():
        protocol = protocols[key] = _new_protocol(*key)
    return protocol


def get_service_protocol(
    service: str,
    transport: TProtocolBase | TTransportBase | None = None,
    logger: logging.Logger | None = None,
    fast: bool = False,
    timeout: float | None = None,
) -> TMultiplexedProtocol:
    """The protocol a generated client of ``service`` needs: ``Service.Client(protocol)``.

    Calls go out named ``service:method`` (``TMultiplexedProtocol``); the proxy routes on the
    prefix and replies carry the bare method name.

    Safe to call from many threads: without ``transport``, each thread gets its own
    connection (reused by every client the thread builds with the same timeout). A client is
    used by the thread that built it; one that other threads also call raises
    :class:`SharedConnectionError` in them (see the module docstring).

    :param service: the service name registered in ZooKeeper.
    :param transport: the base protocol (e.g. from :func:`get_base_protocol`), or a framed
        transport to put a binary protocol on; it belongs to the first thread that uses it.
        ``None``: the calling thread's connection to the process default endpoint
        (:func:`get_base_protocol`'s, else ``$RPC_PROXY_ADDRESS``, else
        ``/usr/local/rpc_proxy/proxy.sock``), made on first need.
    :param logger: if given, a debug line names the service and transport.
    :param fast: accepted for compatibility with the original API; the C-accelerated codec
        is used whenever thrift provides it (no patched compiler is needed).
    :param timeout: connect, read and write timeout in milliseconds of the thread's
        connection; ``None``: the process default (:data:`DEFAULT_TIMEOUT_MS` unless
        :func:`get_base_protocol` set another). Only without ``transport``.
    :raises ValueError: ``timeout`` given with ``transport`` (give that connection its
        timeout with :func:`get_base_protocol`).
    :raises TypeError: ``transport`` is neither a Thrift protocol nor a transport.
    """
    del fast  # see the docstring
    if transport is None:
        base = _thread_protocol(timeout)
    elif timeout is not None:
        raise ValueError(
            "timeout applies to the thread's default connection; give an explicit "
            "transport its timeout with get_base_protocol(endpoint, timeout)"
        )
    elif isinstance(transport, TProtocolBase):
        base = transport
    elif isinstance(transport, TTransportBase):
        base = binary_protocol(transport)
    else:
        raise TypeError(f"transport must be a Thrift protocol or transport, got {transport!r}")
    if logger is not None:
        logger.debug("rpc_thrift: service %s over %s", service, _describe(base))
    return _ServiceProtocol(base, service)


def _describe(connection: Any) -> Any:
    """The endpoint of a protocol or transport, for messages and logs."""
    transport = getattr(connection, "trans", connection)
    sock = getattr(transport, "_socket", None)
    address = getattr(sock, "_address", None)
    return f"connection to {address}" if address else f"connection {transport!r}"
