"""RpcWorker on a thread of the test process: stop(), signals left alone, dispatcher edges."""

from __future__ import annotations

import signal
import threading

import pytest
from thrift.Thrift import TApplicationException

import rpc_thrift
from fake_lb import EXCEPTION, STOP, stop_confirm, wait_until
from rpc_thrift import RpcWorker
from rpc_thrift.worker import describe_exception


class RecordingHandler:
    """Echo handler that records the thread and a thread-local per call."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.seen = []

    def echo(self, s):
        count = getattr(self.local, "count", 0) + 1
        self.local.count = count
        self.seen.append((threading.get_ident(), count))
        return s

    def fail(self, how):
        raise KeyError(how)


def test_public_api():
    assert rpc_thrift.RpcWorker is rpc_thrift.worker.RpcWorker
    assert set(rpc_thrift.__all__) >= {"RpcWorker", "get_base_protocol", "get_service_protocol"}
    assert rpc_thrift.DEFAULT_MAX_FRAME_SIZE == 16384000
    assert (rpc_thrift.MESSAGE_TYPE_HEART_BEAT, rpc_thrift.MESSAGE_TYPE_STOP) == (20, 21)


def test_bad_arguments():
    class P:
        def process(self, iprot, oprot):
            pass

    with pytest.raises(TypeError):
        RpcWorker(object(), "/tmp/x.sock")
    with pytest.raises(ValueError, match="pool_size"):
        RpcWorker(P(), "/tmp/x.sock", pool_size=0)
    with pytest.raises(ValueError, match="empty"):
        RpcWorker(P(), " ")
    with pytest.raises(ValueError, match="heartbeat_timeout_ms"):
        RpcWorker(P(), "/tmp/x.sock", heartbeat_timeout_ms=0)
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        RpcWorker(P(), "/tmp/x.sock", heartbeat_interval_ms=-1)
    worker = RpcWorker(P(), "127.0.0.1:1", pool_size=2, service="svc")
    assert (worker.address, worker.pool_size, worker.service) == ("127.0.0.1:1", 2, "svc")


def test_stop_from_another_thread(fake_lb, thread_worker, codec):
    from echo import Echo

    handler = RecordingHandler()
    worker = RpcWorker(Echo.Processor(handler), fake_lb.path, service="echo")
    before = signal.getsignal(signal.SIGTERM)
    runner = thread_worker(worker)
    conn = fake_lb.accept()
    assert conn.hello()[2] == "echo"
    assert signal.getsignal(signal.SIGTERM) is before, "run() off the main thread leaves signals"
    for seqid in range(3):
        conn.send(codec.call("echo", seqid, f"m{seqid}"))
        assert codec.result("echo", conn.read()) == f"m{seqid}"
    # One pool thread, attached once: the same thread state (and thread-locals) every call.
    assert handler.seen == [(handler.seen[0][0], n) for n in (1, 2, 3)]

    worker.stop()
    worker.stop()  # idempotent
    assert conn.read().message_type == STOP
    conn.send(stop_confirm())
    conn.expect_closed()
    runner.join(10)
    assert worker.stopping


def test_stop_before_run_returns_at_once(lb_path, thread_worker):
    class P:
        def process(self, iprot, oprot):
            pass

    worker = RpcWorker(P(), lb_path)
    worker.stop()
    thread_worker(worker).join(5)


def test_second_run_is_refused(lb_path, thread_worker):
    class P:
        def process(self, iprot, oprot):
            pass

    worker = RpcWorker(P(), lb_path)
    thread_worker(worker)
    wait_until(lambda: worker._core.running, what="run() to start")
    with pytest.raises(RuntimeError, match="already running"):
        worker.run()


def test_processor_that_raises_gets_code_6(fake_lb, thread_worker, codec):
    class Broken:
        def process(self, iprot, oprot):
            raise RuntimeError("kaboom")

    thread_worker(RpcWorker(Broken(), fake_lb.path))
    conn = fake_lb.accept()
    conn.hello()
    conn.send(codec.call("echo", 41, "x"))
    frame = conn.read()
    assert (frame.message_type, frame.name, frame.seqid) == (EXCEPTION, "echo", 41)
    with pytest.raises(TApplicationException) as caught:
        codec.result("echo", frame)
    assert caught.value.type == TApplicationException.INTERNAL_ERROR
    assert caught.value.message == "RuntimeError: kaboom"
    # A oneway call to a broken processor is never answered.
    conn.send(codec.call("notify", 42, "x"))
    conn.send(codec.call("echo", 43, "y"))
    assert conn.read().seqid == 43


def test_undeclared_exception_in_thread(fake_lb, thread_worker, codec):
    from echo import Echo

    thread_worker(RpcWorker(Echo.Processor(RecordingHandler()), fake_lb.path, pool_size=2))
    conn = fake_lb.accept()
    conn.hello()
    conn.send(codec.call("fail", 1, "missing"))
    with pytest.raises(TApplicationException) as caught:
        codec.result("fail", conn.read())
    assert caught.value.message == "KeyError: 'missing'"


def test_describe_exception():
    class Local(Exception):
        pass

    assert describe_exception(ValueError("boom")) == "ValueError: boom"
    assert describe_exception(ValueError()) == "ValueError"
    assert describe_exception(Local("x")).endswith("test_describe_exception.<locals>.Local: x")


def test_pure_python_codec_when_fastbinary_is_missing(fake_lb, thread_worker, codec, monkeypatch):
    from echo import Echo
    from thrift.protocol.TBinaryProtocol import TBinaryProtocolAccelerated

    import rpc_thrift.worker

    monkeypatch.setattr(rpc_thrift.worker, "_fastbinary", None)
    assert not isinstance(rpc_thrift.worker.binary_protocol(None), TBinaryProtocolAccelerated)
    thread_worker(RpcWorker(Echo.Processor(RecordingHandler()), fake_lb.path))
    conn = fake_lb.accept()
    conn.hello()
    conn.send(codec.call("echo", 1, "plain"))
    assert codec.result("echo", conn.read()) == "plain"
    conn.send(codec.call("fail", 2, "k"))
    with pytest.raises(TApplicationException) as caught:
        codec.result("fail", conn.read())
    assert caught.value.message == "KeyError: 'k'"
