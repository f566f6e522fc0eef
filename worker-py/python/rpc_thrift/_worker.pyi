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

    Protocol (CONTRACT sections 2, 6 and 9): the worker dials ``address`` (a unix socket
    path, or ``host:port`` when it contains ``:``), sends HELLO ``("hello", 23, 0)`` with
    ``{1: i32 pool_size, 2: i32 pid, 3: string service}``, and echoes the LB's pings unchanged
    without taking the GIL. When no heartbeat came from the LB for ``heartbeat_interval_ms``
    (twice that once the LB has pinged on its own), it pings the LB, ``("ping", 20, seqid)``
    with seqids -1, -2, ..., at most once per interval: the Go original LB never pings and
    drops a worker that sends no heartbeat for 6 s, however many calls it sends. Calls do not
    count as heartbeats. An echo of the worker's own ping is not echoed back. Once a heartbeat
    came from the LB (its ping, or the echo of the worker's), the worker drops the connection
    when the LB then sends nothing for ``heartbeat_timeout_ms``; an LB that never sends one
    (the Go original, which neither pings nor echoes) is never timed out. When the LB goes
    away (EOF, or a STOP_CONFIRM the worker did not ask for), held calls are finished and
    answered while the connection lasts, then the worker reconnects with jittered backoff
    (100 ms doubling to 5 s), forever, until stopped.

    Supervised workers (an LB with ``worker_command`` starts them): the LB sets
    ``RPC_LB_BACK_ADDRESS`` (its ``back_address``, used when ``address`` is None),
    ``RPC_WORKER_ID`` (the slot, 0-based) and ``RPC_WORKER_GENERATION`` (the LB's
    rolling-restart count, 0-based); the last two are read at construction into
    :attr:`worker_id` and :attr:`worker_generation` and named in the ``connected`` log line.
    The SIGUSR1 stack dump (``faulthandler``) the LB's watchdog asks for is registered by
    :meth:`rpc_thrift.RpcWorker.run`, not by this class; ``dispatch`` there is
    ``rpc_thrift.worker._Dispatcher.handle_call``, the frame every handler thread's stack has.

    :param dispatch: the per-call function described above.
    :param address: the LB's ``back_address``. An explicit address wins; ``None`` reads
        ``$RPC_LB_BACK_ADDRESS``.
    :param pool_size: calls run at once (OS threads), 1 to 1024; announced in HELLO.
    :param service: the service served (logs, HELLO); ``None`` sends an empty name.
    :param heartbeat_interval_ms: heartbeat silence from the LB after which the worker pings
        it, and the shortest time between two of its pings. Keep it well below the LB's
        heartbeat timeout (6 s for the Go original).
    :param heartbeat_timeout_ms: silence tolerated from an LB once a heartbeat came from it.
    :param max_frame_size: largest frame accepted from the LB; a larger call is answered
        with a code-7 exception and skipped (the calls around it run), a non-positive length
        drops the connection. A reply over it is replaced by a type-6 exception.
    :param stop_timeout_ms: longest wait for held calls during a stop (or an LB shutdown);
        calls still running then lose their replies.
    :raises ValueError: no address (``address`` is None and ``$RPC_LB_BACK_ADDRESS`` is unset
        or empty; the message names both), an empty address, or an argument out of range.
    """

    def __new__(
        cls,
        dispatch: Callable[[bytes], bytes | None],
        address: str | None = None,
        pool_size: int = 1,
        service: str | None = None,
        *,
        heartbeat_interval_ms: int = 1000,
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
    def worker_id(self) -> int | None:
        """``$RPC_WORKER_ID`` at construction (a supervised worker's slot, 0-based), or None
        when unset or not a non-negative integer."""

    @property
    def worker_generation(self) -> int | None:
        """``$RPC_WORKER_GENERATION`` at construction (the LB's rolling-restart count,
        0-based), or None when unset or not a non-negative integer."""

    @property
    def stopping(self) -> bool:
        """Whether a stop was requested."""

    @property
    def running(self) -> bool:
        """Whether :meth:`run` is executing."""
