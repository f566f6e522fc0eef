"""Which thread and which call: pool threads named ``rpc_thrift-worker-<n>`` (in Python and
for the OS), :func:`rpc_thrift.current_call` and :class:`rpc_thrift.CallContextFilter`."""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import pytest

import rpc_thrift
from fake_lb import REPLY
from rpc_thrift import RpcWorker

LOGGER = "test.traceability"


class Recording(logging.Handler):
    """Keeps every record it gets, with the call context filter on it."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(rpc_thrift.CallContextFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def recording():
    handler = Recording()
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


class Tracing:
    """``echo("meet")`` waits until two calls run at once and says which thread ran it;
    ``echo(anything else)`` logs a line and says which call it is; ``notify`` logs."""

    def __init__(self) -> None:
        self.meet = threading.Barrier(2, timeout=10)

    def echo(self, s: str) -> str:
        if s == "meet":
            self.meet.wait()
            logging.getLogger(LOGGER).info("met")
            return f"{threading.current_thread().name}|{os_thread_name()}"
        call = rpc_thrift.current_call()
        logging.getLogger(LOGGER).info("in %s", s)
        return "none" if call is None else f"{call.method}|{call.seqid}"

    def notify(self, s: str) -> None:
        logging.getLogger(LOGGER).info("notified %s", s)


def os_thread_name() -> str:
    """The kernel's name of the calling thread (Linux), else ``""``."""
    comm = Path(f"/proc/self/task/{threading.get_native_id()}/comm")
    return comm.read_text().strip() if comm.exists() else ""


def serve(fake_lb, thread_worker, pool_size: int):
    from echo import Echo

    thread_worker(RpcWorker(Echo.Processor(Tracing()), fake_lb.path, pool_size=pool_size))
    conn = fake_lb.accept()
    conn.hello()
    return conn


def test_pool_threads_are_named_rpc_thrift_worker_n(fake_lb, thread_worker, codec, recording):
    conn = serve(fake_lb, thread_worker, pool_size=2)
    conn.send(codec.call("echo", 1, "meet") + codec.call("echo", 2, "meet"))
    answers = [codec.result("echo", conn.read()) for _ in range(2)]
    python_names = sorted(answer.split("|")[0] for answer in answers)
    assert python_names == ["rpc_thrift-worker-0", "rpc_thrift-worker-1"], answers
    assert sorted(r.threadName for r in recording.records) == python_names
    if sys.platform.startswith("linux"):
        # The kernel keeps 15 bytes of a thread's name.
        assert [a.split("|")[1] for a in answers] == ["rpc_thrift-work"] * 2, answers


def test_current_call_and_the_log_filter_name_the_call(fake_lb, thread_worker, codec, recording):
    assert rpc_thrift.current_call() is None
    outside = logging.LogRecord(LOGGER, logging.INFO, __file__, 1, "outside", None, None)
    rpc_thrift.CallContextFilter().filter(outside)
    assert (outside.rpc_method, outside.rpc_seqid) == ("", "")

    conn = serve(fake_lb, thread_worker, pool_size=1)
    conn.send(codec.call("echo", 41, "first"))
    assert codec.result("echo", conn.read()) == "echo|41"
    conn.send(codec.call("notify", 42, "oneway"))
    conn.send(codec.call("echo", 43, "second"))
    frame = conn.read()
    assert (frame.message_type, frame.seqid) == (REPLY, 43)
    assert codec.result("echo", frame) == "echo|43"
    seen = [(r.getMessage(), r.rpc_method, r.rpc_seqid) for r in recording.records]
    assert seen == [
        ("in first", "echo", 41),
        ("notified oneway", "notify", 42),
        ("in second", "echo", 43),
    ]


def test_filter_keeps_values_a_record_already_has():
    record = logging.LogRecord(LOGGER, logging.INFO, __file__, 1, "queued", None, None)
    record.rpc_method, record.rpc_seqid = "echo", 7
    assert rpc_thrift.CallContextFilter().filter(record)
    assert (record.rpc_method, record.rpc_seqid) == ("echo", 7)


def test_call_info_is_exported():
    assert {"CallContextFilter", "CallInfo", "current_call"} <= set(rpc_thrift.__all__)
    call = rpc_thrift.CallInfo("echo", 3)
    assert (call.method, call.seqid) == ("echo", 3)
