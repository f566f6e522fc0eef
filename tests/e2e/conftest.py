"""Fixtures of the end-to-end suite: one ZooKeeper per session, the rest per test.

A test gets its own product name (`product`), so the services it registers are invisible to
every other test's proxy. Factories (`backends`, `proxies`, `clients`) clean up what they
started. The proxy binary comes from $RPC_PROXY_BIN (default target/debug/rpc_proxy); a
missing binary fails the tests, it never skips them.
"""

import re
import shutil
import types
import uuid

import pytest

import harness

DEFAULT_TIMEOUT_S = 120


def pytest_collection_modifyitems(config, items):
    # pytest.ini sets `timeout`; this keeps a bound when the suite runs without that file.
    if config.getini("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S))


@pytest.fixture(scope="session")
def echo_idl(tmp_path_factory):
    """The generated Python code of idl/echo.thrift (`Echo`, `EchoError`, `gen_dir`)."""
    return harness.generate_echo(tmp_path_factory.mktemp("gen-py"))


@pytest.fixture(scope="session")
def proxy_bin():
    path = harness.proxy_bin()
    if not path.exists():
        pytest.fail(
            f"rpc_proxy binary not found at {path}: run `cargo build -p rpc-proxy` "
            "or set RPC_PROXY_BIN"
        )
    return path


@pytest.fixture(scope="session")
def zk_server():
    base = harness.short_tempdir("rpzk-")
    server = harness.ZooKeeperServer(base)
    server.start()
    yield server
    server.kill()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def zk(zk_server):
    """A kazoo client (30 s session) on the session's ZooKeeper, running again if a test
    stopped it."""
    zk_server.ensure_running()
    client = harness.kazoo_client(zk_server.address)
    yield client
    client.stop()
    client.close()


@pytest.fixture
def product(request):
    name = re.sub(r"\W", "_", request.node.name)[:40]
    return f"e2e_{name}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def workdir():
    path = harness.short_tempdir("rpe2e-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Backends:
    """Starts echo backends and registers them under the test's product."""

    def __init__(self, idl, zk, product, workdir):
        self._idl, self._zk, self._product, self._workdir = idl, zk, product, workdir
        self.started = []

    def start(self, name, services=("echo",), concurrent=False, unix=False):
        backend = harness.Backend(
            self._idl.gen_dir, name, self._workdir, concurrent=concurrent, unix=unix
        )
        self.started.append(backend)
        backend.start()
        for service in services:
            backend.register(self._zk, self._product, service)
        return backend

    def close(self):
        for backend in self.started:
            backend.close()


@pytest.fixture
def backends(echo_idl, zk, product, workdir):
    factory = Backends(echo_idl, zk, product, workdir)
    yield factory
    factory.close()


class Proxies:
    """Starts rpc_proxy instances for the test's product; each gets its own directory."""

    def __init__(self, binary, zk_server, product, workdir):
        self._binary, self._zk_server = binary, zk_server
        self._product, self._workdir = product, workdir
        self.started = []

    def settings(self, directory, **overrides):
        settings = {
            "zk": self._zk_server.address,
            "product": self._product,
            "proxy_address": str(directory / "proxy.sock"),
        }
        settings.update({key: str(value) for key, value in overrides.items()})
        return settings

    def new(self, args=None, **overrides):
        """A configured, not yet started proxy."""
        directory = self._workdir / f"proxy{len(self.started)}"
        directory.mkdir()
        proxy = harness.Proxy(
            self._binary, directory, self.settings(directory, **overrides), args=args
        )
        self.started.append(proxy)
        return proxy

    def start(self, **overrides):
        return self.new(**overrides).start()

    def close(self):
        for proxy in self.started:
            if proxy.proc is not None:
                proxy.kill()
                # Shown by pytest only when the test failed.
                print(f"=== rpc_proxy in {proxy.workdir}\n{proxy.output()}")


@pytest.fixture
def proxies(proxy_bin, zk_server, product, workdir):
    factory = Proxies(proxy_bin, zk_server, product, workdir)
    yield factory
    factory.close()


@pytest.fixture
def clients(echo_idl):
    """connect(address, service="echo", timeout=10) -> harness.EchoConnection."""
    opened = []

    def connect(address, service="echo", timeout=10.0):
        conn = harness.EchoConnection(echo_idl, address, service=service, timeout=timeout)
        opened.append(conn)
        return conn

    yield connect
    for conn in opened:
        conn.close()


@pytest.fixture
def echo_stack(backends, proxies, clients):
    """Backend `A` registered as service `echo`, a proxy, and a connected client."""

    backend = backends.start("A")
    proxy = proxies.start()
    return types.SimpleNamespace(backend=backend, proxy=proxy, client=clients(proxy.address))
