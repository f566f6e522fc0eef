"""The compiled core of :mod:`rpc_thrift` (private: use :class:`rpc_thrift.RpcWorker`).

The Rust side owns the socket to the LB, framing, heartbeats, reconnects with backoff and the
graceful stop; Python only runs the dispatcher for each call.
"""

from typing import Callable, Final, final

__all__ = ["DEFAULT_MAX_FRAME_SIZE", "Worker", "__version__"]

__version__: Final[str]
"""Version of the compiled extension."""

DEFAULT_MAX_FRAME_SIZE: Final[int]
"""The largest frame read or written by default: 16384000 bytes."""

@final
class Worker:
    """One worker process's connection to its LB, with ``pool_size`` handler threads.

    ``dispatch(payload)`` is called on a pool thread, holding the GIL, once per CALL or ONEWAY
    message. ``payload`` is the whole message without the 4-byte frame length (strict binary
    header, then the arguments struct). It returns the reply message the same way (the length
    prefix is added by the core), or ``None``/``b""`` for no reply. If it raises, a CALL is
    answered with a ``TApplicationException`` of type 6 (INTERNAL_ERROR) whose message is
    ``"<ExceptionType>: <message>"``, with the request's name and seqid; a ONEWAY call is never
    answered.

    Protocol (CONTRACT sections 2 and 6): the worker dials ``address`` (a unix socket path, or
    ``host:port`` when it contains ``:``), sends HELLO ``("hello", 23, 0)`` with
    ``{1: i32 pool_size, 2: i32 pid, 3: string service}``, echoes the LB's pings unchanged
    without taking the GIL, and drops the connection when the LB, having pinged once, sends
    nothing for ``heartbeat_timeout_ms``. When the LB goes away (EOF, or a STOP_CONFIRM the
    worker did not ask for), held calls are finished and answered while the connection lasts,
    then the worker reconnects with jittered backoff (100 ms doubling to 5 s), forever, until
    stopped.

    :param dispatch: the per-call function described above.
    :param address: the LB's ``back_address``.
    :param pool_size: calls run at once (OS threads), 1 to 1024; announced in HELLO.
    :param service: the service served (logs, HELLO); ``None`` sends an empty name.
    :param heartbeat_timeout_ms: silence tolerated from an LB that pings.
    :param max_frame_size: largest frame accepted from the LB; a larger call is answered
        with a code-7 exception and skipped (the calls around it run), a non-positive length
        drops the connection. A reply over it is replaced by a type-6 exception.
    :param stop_timeout_ms: longest wait for held calls during a stop (or an LB shutdown);
        calls still running then lose their replies.
    :raises ValueError: an empty address or an argument out of range.
    """

    def __new__(
        cls,
        dispatch: Callable[[bytes], bytes | None],
        address: str,
        pool_size: int = 1,
        service: str | None = None,
        *,
        heartbeat_timeout_ms: int = 6000,
        max_frame_size: int = 16384000,
        stop_timeout_ms: int = 15000,
    ) -> Worker: ...
    def run(self) -> None:
        """Serve until :meth:`stop` is called, then return.

        Blocks. Waits in 100 ms slices with the GIL released and runs pending Python signal
        handlers between slices (on the main thread). A signal handler that raises requests a
        graceful stop; the exception is raised again once the worker has stopped.

        Stopping: the worker sends STOP ``("stop", 21, 0)``, waits up to 1.5 s for
        STOP_CONFIRM (older LBs never send one) while still running calls that arrive, waits
        until every held call's reply is written to the socket (at most ``stop_timeout_ms``
        from the stop request), closes the connection and returns. A worker that is not
        connected returns at once. Calling ``run()`` again after a stop returns at once.

        :raises RuntimeError: the worker is already running in another thread.
        """

    def stop(self) -> None:
        """Request a graceful stop. Idempotent; callable from any thread or a signal handler."""

    @property
    def address(self) -> str:
        """The LB address."""

    @property
    def pool_size(self) -> int:
        """Calls run at once."""

    @property
    def service(self) -> str | None:
        """The service name, if one was given."""

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is executing."""
