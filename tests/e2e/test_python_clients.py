"""rpc_thrift.utils clients through a real rpc_proxy: many threads with the README's two lines,
and a call slower than the proxy's default request timeout."""

import threading
import time
import uuid

import pytest
from thrift.Thrift import TApplicationException
from thrift.transport.TTransport import TTransportException

THREADS = 16
CALLS_PER_THREAD = 50
#: The proxy's default `request_timeout_ms`, in seconds (CONTRACT section 4).
PROXY_REQUEST_TIMEOUT_S = 15.0


@pytest.fixture
def default_endpoint():
    """Points the process default of rpc_thrift.utils at a proxy: `use(proxy)`; the main
    thread's default connection is closed after the test."""
    from rpc_thrift.utils import get_base_protocol

    bases = []

    def use(proxy):
        bases.append(get_base_protocol(proxy.address))  # the default timeout

    yield use
    for base in bases:
        base.trans.close()


def test_threads_with_the_readme_client_get_their_own_answers(
    backends, proxies, echo_idl, default_endpoint
):
    # A concurrent endpoint, so the replies also come back from upstream out of order.
    backends.start("A", concurrent=True)
    proxy = proxies.start()
    default_endpoint(proxy)
    run = uuid.uuid4().hex[:8]
    start = threading.Barrier(THREADS)
    lock = threading.Lock()
    errors, crossed, answered, transports = [], [], [], set()

    def caller(tid):
        from rpc_thrift.utils import get_service_protocol

        client = echo_idl.Echo.Client(get_service_protocol("echo"))  # the README's line
        transport = client._oprot.trans
        with lock:
            transports.add(transport)
        try:
            start.wait(timeout=30)
            for i in range(CALLS_PER_THREAD):
                asked = f"{run}:{tid}:{i}:" + "p" * ((tid * 31 + i * 7) % 300)
                try:
                    got = client.echo(asked)
                except Exception as exc:  # noqa: BLE001 - reported below
                    with lock:
                        errors.append(f"thread {tid} call {i}: {exc!r}")
                    continue
                with lock:
                    (answered if got == asked else crossed).append((asked[:30], got[:30]))
        finally:
            transport.close()

    threads = [
        threading.Thread(target=caller, args=(t,), name=f"caller-{t}") for t in range(THREADS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "client threads still running"
    assert not errors, f"{len(errors)} calls failed, e.g. {errors[:3]}"
    assert not crossed, f"{len(crossed)} answers went to another caller, e.g. {crossed[:3]}"
    assert len(answered) == THREADS * CALLS_PER_THREAD
    assert len(transports) == THREADS, "threads shared connections"


def test_a_call_slower_than_the_proxy_gets_its_timeout_not_a_transport_one(
    backends, proxies, echo_idl, default_endpoint
):
    from rpc_thrift.utils import get_service_protocol

    # A concurrent endpoint keeps answering the proxy's pings while the call sleeps.
    backend = backends.start("A", concurrent=True)
    proxy = proxies.start()  # the default request_timeout_ms
    default_endpoint(proxy)
    client = echo_idl.Echo.Client(get_service_protocol("echo"))
    tag = f"slow-{uuid.uuid4().hex[:8]}"

    started = time.monotonic()
    try:
        client.slow(20000, tag)
    except TTransportException as exc:
        pytest.fail(
            f"transport error after {time.monotonic() - started:.1f} s instead of the "
            f"proxy's code 6: {exc!r}"
        )
    except TApplicationException as exc:
        error = exc
    else:
        pytest.fail("the 20 s call succeeded through a proxy with a 15 s request timeout")
    elapsed = time.monotonic() - started

    assert error.type == TApplicationException.INTERNAL_ERROR, error.message
    assert "timeout" in error.message and "slow" in error.message, error.message
    assert PROXY_REQUEST_TIMEOUT_S - 1 <= elapsed <= PROXY_REQUEST_TIMEOUT_S + 4, elapsed
    assert tag in backend.log_lines("SLOW-START"), "the call never reached the backend"
    # The connection stays usable; the late reply is dropped by the proxy.
    assert client.echo("after the timeout") == "after the timeout"
