"""The worker runtime: serve a Thrift processor to an rpc_lb (L4 of the rpc_proxy mesh).

::

    from rpc_thrift import RpcWorker
    RpcWorker(Echo.Processor(handler), "/var/run/echo_lb.sock", pool_size=4, service="echo").run()
    RpcWorker(Echo.Processor(handler), pool_size=4, service="echo").run()  # started by its LB

The compiled core (:mod:`rpc_thrift._worker`) owns the socket, framing, heartbeats, reconnects
and the graceful stop. This module adds what needs Python: the dispatcher that runs the
processor on each call (:meth:`_Dispatcher.handle_call`, the frame in this file that every
handler thread's stack has), the ``Type: message`` text of handler errors, SIGTERM/SIGINT
handling while :meth:`RpcWorker.run` runs on the main thread, and the SIGUSR1 stack dump
(``faulthandler``) for the LB's watchdog.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
from io import BytesIO
from types import FrameType
from typing import Any, Callable, Optional, Union

from thrift.protocol.TBinaryProtocol import TBinaryProtocol, TBinaryProtocolAccelerated
from thrift.Thrift import TApplicationException, TMessageType
from thrift.transport.TTransport import TMemoryBuffer

from rpc_thrift._worker import DEFAULT_MAX_FRAME_SIZE
from rpc_thrift._worker import Worker as _Core
from rpc_thrift.context import enter_call, leave_call

try:  # thrift's C codec; the pure-Python protocol is used without it.
    from thrift.protocol import fastbinary as _fastbinary
except ImportError:  # pragma: no cover - depends on how thrift was installed
    _fastbinary = None

__all__ = ["DUMP_SIGNAL_ENV", "RpcWorker", "describe_exception"]

logger = logging.getLogger("rpc_thrift")

#: The message of the TApplicationException that thrift-generated processors send for an
#: undeclared handler exception; the worker rewrites it to name the exception.
_GENERIC_INTERNAL_ERROR = "Internal error"

_SignalHandler = Union[Callable[[int, Optional[FrameType]], Any], int, None]

#: Set to ``0`` (or ``off``, ``false``, ``no``) to keep :meth:`RpcWorker.run` from registering
#: the SIGUSR1 stack dump, for an application that needs SIGUSR1 for itself.
DUMP_SIGNAL_ENV = "RPC_THRIFT_DUMP_SIGNAL"

_DUMP_OFF = frozenset({"0", "off", "false", "no", "none"})


def binary_protocol(transport: Any) -> TBinaryProtocol:
    """A strict binary protocol on ``transport``, C-accelerated when thrift has its codec."""
    if _fastbinary is not None:
        return TBinaryProtocolAccelerated(transport)
    return TBinaryProtocol(transport)


def describe_exception(exc: BaseException) -> str:
    """``"Type: message"`` as in a traceback's last line (module omitted for builtins)."""
    cls = type(exc)
    name = cls.__qualname__
    if cls.__module__ not in ("builtins", "__main__"):
        name = f"{cls.__module__}.{name}"
    text = str(exc)
    return f"{name}: {text}" if text else name


class _HandlerErrors(logging.Filter):
    """Captures, per thread, the exceptions logged on the root logger while a call runs.

    Thrift-generated processors catch an undeclared handler exception themselves, log it with
    ``logging.exception(...)`` (a record with ``exc_info`` on the root logger) and answer a
    generic ``TApplicationException(INTERNAL_ERROR, "Internal error")``. Installed as a filter
    of the root logger, this sees that record on the thread that runs the call, without
    changing what is logged or where; the dispatcher then names the exception in the reply.
    It relies on the record being created, i.e. on the root logger being enabled for ERROR
    (the default); otherwise the reply keeps the generic message.
    """

    def __init__(self) -> None:
        super().__init__("rpc_thrift.handler_errors")
        self._local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        caught: list[BaseException] | None = getattr(self._local, "caught", None)
        if caught is not None and record.exc_info and record.exc_info[1] is not None:
            caught.append(record.exc_info[1])
        return True

    def begin(self) -> list[BaseException]:
        caught: list[BaseException] = []
        self._local.caught = caught
        return caught

    def end(self) -> None:
        self._local.caught = None


_handler_errors = _HandlerErrors()
_install_lock = threading.Lock()


def _install_error_capture() -> None:
    root = logging.getLogger()
    with _install_lock:
        if _handler_errors not in root.filters:
            root.addFilter(_handler_errors)


def _name_internal_error(reply: bytes, exc: BaseException) -> bytes:
    """``reply`` with a generic INTERNAL_ERROR message replaced by ``describe_exception(exc)``.

    Any other reply (a normal one, another exception type or message) is returned unchanged.
    """
    if isinstance(exc, TApplicationException):
        return reply  # raised by the handler on purpose: the processor sent it as it was
    try:
        iprot = TBinaryProtocol(TMemoryBuffer(reply))
        name, message_type, seqid = iprot.readMessageBegin()
        if message_type != TMessageType.EXCEPTION:
            return reply
        sent = TApplicationException()
        sent.read(iprot)
    except Exception:  # not a message we can read: leave it alone
        return reply
    if sent.type != TApplicationException.INTERNAL_ERROR or sent.message != _GENERIC_INTERNAL_ERROR:
        return reply
    out = TMemoryBuffer()
    oprot = TBinaryProtocol(out)
    oprot.writeMessageBegin(name, TMessageType.EXCEPTION, seqid)
    TApplicationException(TApplicationException.INTERNAL_ERROR, describe_exception(exc)).write(
        oprot
    )
    oprot.writeMessageEnd()
    named: bytes = out.getvalue()
    return named


class _Codec(threading.local):
    """One pool thread's transports and protocols, reused for every call it runs.

    Building two ``TMemoryBuffer`` and two protocol objects per call costs about as much as a
    trivial handler; a pool thread runs one call at a time, so it keeps one set and only swaps
    the byte buffers under them.
    """

    def __init__(self) -> None:
        self.inbound = TMemoryBuffer()
        self.iprot = binary_protocol(self.inbound)
        self.outbound = TMemoryBuffer()
        self.oprot = binary_protocol(self.outbound)


class _Dispatcher:
    """Runs one call: ``payload`` (a message without frame length) in, reply message out.

    While it runs, the call is :func:`rpc_thrift.current_call`.

    The core calls :meth:`handle_call` on a pool thread, so every handler's Python stack has
    the frame ``File ".../rpc_thrift/worker.py", line N in handle_call`` under the processor's
    frames. The LB's watchdog (CONTRACT section 9) tells handler threads in a SIGUSR1 stack
    dump by that frame (the main thread, in :meth:`RpcWorker.run`, has a frame of this file
    too, ``in run``, but never ``in handle_call``; an idle pool thread has no Python frame).
    """

    __slots__ = ("_processor", "_codec")

    def __init__(self, processor: Any) -> None:
        self._processor = processor
        self._codec = _Codec()
        _install_error_capture()

    def handle_call(self, payload: bytes) -> bytes:
        codec = self._codec
        # TMemoryBuffer keeps its bytes in `_buffer` (a BytesIO), which is also what the C
        # codec reads through `cstringio_buf`; fresh ones per call, same objects around them.
        codec.inbound._buffer = BytesIO(payload)
        out = codec.outbound._buffer = BytesIO()
        caught = _handler_errors.begin()
        call = enter_call(payload)
        try:
            self._processor.process(codec.iprot, codec.oprot)
        except Exception:
            # The core answers a CALL with TApplicationException(6, "Type: message").
            logger.exception("the processor raised")
            raise
        finally:
            leave_call(call)
            _handler_errors.end()
        reply: bytes = out.getvalue()
        if caught and reply:
            reply = _name_internal_error(reply, caught[-1])
        return reply


class _StackDump:
    """The SIGUSR1 ``faulthandler`` registration shared by the running workers of a process.

    Registered when the first :meth:`RpcWorker.run` starts (all threads, no chaining, written
    to file descriptor 2, the process's stderr, which the LB logs), unregistered when the last
    one returns. Skipped when ``$RPC_THRIFT_DUMP_SIGNAL`` says ``0``, when the worker was made
    with ``dump_stacks=False``, or when the application installed a Python handler for SIGUSR1
    itself (it keeps it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0

    def acquire(self) -> bool:
        signum = getattr(signal, "SIGUSR1", None)
        if signum is None or not hasattr(faulthandler, "register"):
            return False  # pragma: no cover - not on this platform
        with self._lock:
            if self._users == 0:
                current = signal.getsignal(signum)
                if callable(current):
                    logger.warning(
                        "SIGUSR1 has a handler of the application: no stack dump on SIGUSR1 "
                        "(the LB's watchdog logs 'no stack'); set %s=0 to silence this",
                        DUMP_SIGNAL_ENV,
                    )
                    return False
                faulthandler.register(signum, file=2, all_threads=True, chain=False)
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                faulthandler.unregister(signal.SIGUSR1)


_stack_dump = _StackDump()


def _dump_stacks_wanted(dump_stacks: bool | None) -> bool:
    if dump_stacks is not None:
        return dump_stacks
    return os.environ.get(DUMP_SIGNAL_ENV, "").strip().lower() not in _DUMP_OFF


class RpcWorker:
    """Serves ``processor`` to the LB at ``address`` until stopped.

    :param processor: any Apache Thrift processor (``Service.Processor(handler)`` from
        ``thrift --gen py``): an object with ``process(iprot, oprot)``.
    :param address: the LB's ``back_address``: a unix socket path, or ``host:port`` when it
        contains ``:``. An explicit address wins; with ``None`` (the default) it is read from
        ``$RPC_LB_BACK_ADDRESS``, which an LB sets for the workers it starts
        (``worker_command``). Neither (or an empty value): ``ValueError``.
    :param pool_size: calls run at once in this process, each on its own OS thread (handlers
        run under the GIL, so this helps handlers that wait on I/O). Announced to the LB.
    :param service: the service served (logs; sent to the LB in HELLO).
    :param heartbeat_interval_ms: when no heartbeat came from the LB for this long (twice
        this once the LB has pinged on its own), the worker pings it; at most once per interval.
    :param heartbeat_timeout_ms: once a heartbeat came from the LB (its ping, or the echo of
        the worker's), this much silence drops the connection. An LB that never sends one
        (the Go original) is never timed out.
    :param max_frame_size: largest frame accepted (CONTRACT default 16384000).
    :param stop_timeout_ms: longest wait for held calls when stopping (the CONTRACT wants a
        worker gone within 20 s of SIGTERM).
    :param dump_stacks: register the SIGUSR1 stack dump while :meth:`run` runs (see there);
        ``None`` (the default): yes, unless ``$RPC_THRIFT_DUMP_SIGNAL`` is ``0``.

    Handler errors: a declared IDL exception is a normal reply. An undeclared exception is
    answered with ``TApplicationException`` type 6 whose message is ``"Type: message"`` (e.g.
    ``"ValueError: boom"``) and the worker keeps serving.
    """

    def __init__(
        self,
        processor: Any,
        address: str | None = None,
        pool_size: int = 1,
        service: str | None = None,
        *,
        heartbeat_interval_ms: int = 1000,
        heartbeat_timeout_ms: int = 6000,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
        stop_timeout_ms: int = 15000,
        dump_stacks: bool | None = None,
    ) -> None:
        if not callable(getattr(processor, "process", None)):
            raise TypeError(
                "processor must have a process(iprot, oprot) method, "
                f"e.g. a thrift-generated Processor; got {type(processor).__name__}"
            )
        self.processor = processor
        self._dump_stacks = dump_stacks
        self._core = _Core(
            _Dispatcher(processor).handle_call,
            address,
            pool_size,
            service,
            heartbeat_interval_ms=heartbeat_interval_ms,
            heartbeat_timeout_ms=heartbeat_timeout_ms,
            max_frame_size=max_frame_size,
            stop_timeout_ms=stop_timeout_ms,
        )

    @property
    def address(self) -> str:
        """The LB address."""
        return self._core.address

    @property
    def pool_size(self) -> int:
        """Calls run at once."""
        return self._core.pool_size

    @property
    def service(self) -> str | None:
        """The service name, if given."""
        return self._core.service

    @property
    def worker_id(self) -> int | None:
        """This worker's slot (0-based) when its LB started it (``$RPC_WORKER_ID``), else None."""
        return self._core.worker_id

    @property
    def worker_generation(self) -> int | None:
        """The LB's rolling-restart count (0-based) when it started this worker
        (``$RPC_WORKER_GENERATION``), else None."""
        return self._core.worker_generation

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""
        return self._core.stopping

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (on the main thread) or :meth:`stop`, then return.

        On the main thread, SIGTERM and SIGINT handlers are installed for the duration of the
        call (the previous ones are restored on return); either signal starts a graceful stop.
        On another thread no signal is touched: use :meth:`stop`.

        Stack dumps: while it runs (on any thread), ``kill -USR1 <pid>`` writes the Python
        stack of every thread to file descriptor 2 (``faulthandler.register(SIGUSR1,
        all_threads=True, chain=False)``), even while a handler holds the GIL in C code; the
        worker keeps running. An LB that starts its workers uses it when a call hangs. A
        handler thread's stack ends (outermost) in ``rpc_thrift/worker.py ... in
        handle_call``. Off with ``dump_stacks=False`` or ``$RPC_THRIFT_DUMP_SIGNAL=0``, and
        when the application has its own Python handler for SIGUSR1 (kept).

        A graceful stop sends STOP to the LB, waits briefly for STOP_CONFIRM, finishes every
        held call and writes its reply, then closes the connection and returns (within
        ``stop_timeout_ms`` plus about a second).
        """
        dumping = _dump_stacks_wanted(self._dump_stacks) and _stack_dump.acquire()
        previous: dict[int, _SignalHandler] = {}
        try:
            previous = self._install_signal_handlers()
            self._core.run()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
            if dumping:
                _stack_dump.release()

    def stop(self) -> None:
        """Request a graceful stop; returns at once. Idempotent, callable from any thread."""
        self._core.stop()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self._core.stopping:
            logger.info("%s received while stopping; still finishing held calls", name)
        else:
            logger.info("%s received: stopping gracefully", name)
        self._core.stop()

    def _install_signal_handlers(self) -> dict[int, _SignalHandler]:
        previous: dict[int, _SignalHandler] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous
        for signum in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[signum] = signal.signal(signum, self._on_signal)
            except (ValueError, OSError):  # e.g. a subinterpreter: stop() still works
                logger.debug("cannot handle %s here", signal.Signals(signum).name)
        return previous

    def __repr__(self) -> str:
        return (
            f"RpcWorker(address={self.address!r}, pool_size={self.pool_size}, "
            f"service={self.service!r})"
        )
