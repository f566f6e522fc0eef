"""The call a handler is running, for handler code and its log records.

::

    import logging, rpc_thrift

    handler = logging.StreamHandler()
    handler.addFilter(rpc_thrift.CallContextFilter())
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(threadName)s %(rpc_method)s#%(rpc_seqid)s %(levelname)s %(message)s"))
    logging.getLogger().addHandler(handler)

The worker sets the call (a :class:`contextvars.ContextVar`) around each call it runs on a pool
thread, so :func:`current_call` works anywhere in the handler's code, and in code it runs
through ``contextvars.copy_context()`` (e.g. ``asyncio.to_thread``). Its ``seqid`` is the one
this worker received: the LB's, which the LB's debug line ``call done`` logs as
``worker_seqid`` next to the proxy's ``seqid`` and the worker's pid.
"""

from __future__ import annotations

import logging
import struct
from contextvars import ContextVar, Token
from typing import NamedTuple

__all__ = ["CallContextFilter", "CallInfo", "current_call"]


class CallInfo(NamedTuple):
    """The call a handler thread is running. Read it by attribute: later versions may add
    fields."""

    #: The method called, without the ``service:`` prefix.
    method: str
    #: The seqid of the call as this worker received it (the LB's, not the client's).
    seqid: int


_current: ContextVar[CallInfo | None] = ContextVar("rpc_thrift.current_call", default=None)

_I32 = struct.Struct("!i")


def current_call() -> CallInfo | None:
    """The call running in this context (a handler's thread), or ``None`` outside a call."""
    return _current.get()


def enter_call(payload: bytes) -> Token[CallInfo | None]:
    """Makes the call in ``payload`` (a message, strict binary header, no frame length) the
    current one; the worker's dispatcher calls it before the processor runs, and
    :func:`leave_call` after. The core hands the dispatcher only messages whose strict header
    it has checked."""
    (name_len,) = _I32.unpack_from(payload, 4)
    end = 8 + name_len
    (seqid,) = _I32.unpack_from(payload, end)
    return _current.set(CallInfo(payload[8:end].decode("utf-8", "replace"), seqid))


def leave_call(token: Token[CallInfo | None]) -> None:
    """Ends the call :func:`enter_call` started."""
    _current.reset(token)


class CallContextFilter(logging.Filter):
    """Adds ``rpc_method`` and ``rpc_seqid`` to every record it sees: the call running where
    the record was made (:func:`current_call`), or ``""`` for both outside a call.

    Attach it to a handler (``handler.addFilter(CallContextFilter())``): a filter on a logger
    sees only the records logged on that very logger, not those of its children. A record
    that already has ``rpc_method`` keeps its values (e.g. set before a ``QueueHandler``
    passed it to another thread). It never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "rpc_method"):
            call = _current.get()
            if call is None:
                record.rpc_method = ""
                record.rpc_seqid = ""
            else:
                record.rpc_method = call.method
                record.rpc_seqid = call.seqid
        return True
