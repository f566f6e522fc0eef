"""Fixtures of the many-hosts suite: three hosts as network namespaces on one bridge, a
ZooKeeper ensemble across them, and the binaries under test.

Needs root, `ip` and the right to make network namespaces; without them the tests are
skipped with the reason printed. Missing binaries or ZooKeeper fail the tests (as in
tests/e2e). Whatever a test starts is killed and the namespaces are deleted at teardown, on
failure too.
"""

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

import netkit  # noqa: E402

import harness  # noqa: E402

DEFAULT_TIMEOUT_S = 240


def pytest_collection_modifyitems(config, items):
    # pytest.ini sets `timeout`; this keeps a bound when the suite runs without that file.
    if config.getini("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S))


def _skip(reason):
    print(f"SKIP many-hosts test: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def binaries():
    found = {}
    for name, path in (("proxy", harness.proxy_bin()), ("lb", harness.lb_bin())):
        if not path.exists():
            pytest.fail(f"{path} not found: run `cargo build --workspace --bins`")
        found[name] = path
    return found


@pytest.fixture
def workdir():
    path = harness.short_tempdir("rpns-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def echo_idl(workdir):
    return harness.generate_echo(workdir / "gen-py")


@pytest.fixture
def topology():
    """Three host namespaces and a switch namespace, deleted at teardown."""
    if os.geteuid() != 0:
        _skip(f"network namespaces need root (euid is {os.geteuid()})")
    if shutil.which("ip") is None:
        _skip("the `ip` command (iproute2) is missing")
    netkit.delete_stale()
    topo = netkit.Topology(f"rpcns-{os.getpid()}")
    try:
        topo.create()
    except netkit.NetnsUnavailable as exc:
        topo.destroy()
        _skip(str(exc))
    except BaseException:
        topo.destroy()
        raise
    print(f"hosts {list(zip(topo.hosts, topo.ips))}, switch {topo.switch} {topo.switch_ip}")
    yield topo
    topo.destroy()
