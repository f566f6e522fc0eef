"""Same-host rule (CONTRACT sections 3 and 9): a unix-path `frontend` is routable only when its
node's `hostname` is empty, `localhost` or the proxy's own host name.

A unix path names a socket on the host that registered it; another host's path, dialled here,
would reach whatever local socket happens to have the same name. The foreign endpoint below
is a real listening socket that counts every connection, so "not routed" is checked where it
matters: nothing ever dialled it.
"""

import json
import socket
import threading

import pytest
from thrift.Thrift import TApplicationException

import harness

FOREIGN_HOST = "some-other-host.invalid"
# The proxy's warning for a skipped endpoint (crates/registry/src/discovery.rs).
SKIP_WARNING = "skipping endpoint: unix-path frontend of another host"


class DialRecorder:
    """A listening unix socket that counts the connections made to it and closes each at once
    (so a proxy that dials it fails fast instead of waiting for a reply)."""

    def __init__(self, path):
        self.path = str(path)
        self._dials = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.path)
        self._sock.listen(64)
        # Bounds each accept, so that the thread sees `_stop` within this long.
        self._sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._serve, name="dial-recorder", daemon=True)
        self._thread.start()

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._count(1)
            conn.close()

    def _count(self, n):
        with self._lock:
            self._dials += n

    @property
    def dials(self):
        """Connections accepted so far (one just made may still wait in the backlog)."""
        with self._lock:
            return self._dials

    def close(self):
        """Stops listening and returns every connection ever made, the backlog included.

        Closing again only returns the count."""
        if self._stop.is_set():
            return self.dials
        self._stop.set()
        self._thread.join(timeout=5)
        assert not self._thread.is_alive(), "dial recorder thread did not stop"
        self._sock.setblocking(False)
        while True:
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, OSError):
                break
            self._count(1)
            conn.close()
        self._sock.close()
        return self.dials


@pytest.fixture
def recorder(workdir):
    rec = DialRecorder(workdir / "foreign.sock")
    yield rec
    rec.close()


def register_with_hostname(zk, product, service, frontend, hostname):
    """Registers `frontend` as the harness does, but with node data `hostname` = `hostname`."""
    data = json.loads(harness.endpoint_data(service, frontend))
    data["hostname"] = hostname
    harness.create_service(zk, product, service)
    path = harness.endpoint_path(product, service, frontend)
    zk.create(path, json.dumps(data).encode(), ephemeral=True)
    return path


def _whoami(conn):
    """whoami(), or the TApplicationException the proxy answered instead."""
    try:
        return conn.whoami()
    except TApplicationException as exc:
        return exc


def _skip_warnings(proxy):
    """The proxy's log lines that warn about a skipped unix-path endpoint."""
    lines = []
    for path in proxy.log_files():
        lines += [
            line for line in path.read_text(errors="replace").splitlines() if SKIP_WARNING in line
        ]
    return lines


def _assert_not_found(result):
    assert isinstance(result, TApplicationException), (
        f"a call was answered ({result!r}) although the only endpoint is another host's socket"
    )
    assert result.type == TApplicationException.INTERNAL_ERROR, result.message
    assert result.message.startswith("Worker FOR echo.whoami Not Found"), result.message


def test_unix_frontend_of_another_host_is_not_routed(
    zk, product, recorder, backends, proxies, clients
):
    register_with_hostname(zk, product, "echo", recorder.path, FOREIGN_HOST)
    # Registered before the proxy starts: its first full read (which calls wait for) has it.
    proxy = proxies.start()
    conn = clients(proxy.address)
    for _ in range(5):
        _assert_not_found(_whoami(conn))
    assert recorder.dials == 0, "the proxy dialled another host's unix path"

    # A same-host unix endpoint joins the service: the service's watch fires and every
    # endpoint of it is read again. Calls go to the new one; the foreign one stays skipped.
    backends.start("A", unix=True)
    harness.wait_until(
        lambda: _whoami(conn) == "A",
        10,
        lambda: f"calls reach the same-host endpoint A\n{proxy.output()}",
    )
    assert all(conn.whoami() == "A" for _ in range(50))

    assert proxy.stop() == 0, proxy.output()  # flushes the log
    assert recorder.close() == 0, "the proxy dialled another host's unix path"
    warnings = _skip_warnings(proxy)
    assert len(warnings) == 1 and FOREIGN_HOST in warnings[0], (
        f"one warning for the skipped node, not one per read: {warnings}\n{proxy.output()}"
    )


@pytest.mark.parametrize(
    "hostname",
    [
        pytest.param(socket.gethostname(), id="this-host"),
        pytest.param("", id="empty"),
        pytest.param("localhost", id="localhost"),
    ],
)
def test_unix_frontend_of_this_host_is_routed(hostname, zk, product, backends, proxies, clients):
    backend = backends.start("A", services=(), unix=True)
    register_with_hostname(zk, product, "echo", backend.address, hostname)
    proxy = proxies.start()
    conn = clients(proxy.address)
    assert conn.whoami() == "A"
    assert conn.echo("same host") == "same host"
    assert proxy.stop() == 0, proxy.output()  # flushes the log
    assert not _skip_warnings(proxy), proxy.output()
