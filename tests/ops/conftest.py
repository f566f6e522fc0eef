"""Fixtures of the operations suite: the binaries, a short temp dir per test, and a `Control`
(opskit.py) per control script.

The suite builds nothing. Binaries come from $RPC_PROXY_BIN and $RPC_LB_BIN (default
target/debug/rpc_proxy and rpc_lb); a test that needs a missing one is skipped, naming it.
Nothing here needs ZooKeeper: the proxy starts and retries it, the LB registers only once a
worker connects. Every process a test starts is killed at teardown if it still runs.
"""

import shutil
import tempfile
from pathlib import Path

import pytest
from opskit import Control, require_binary

DEFAULT_TIMEOUT_S = 120


def pytest_collection_modifyitems(config, items):
    # pytest.ini sets `timeout`; this keeps a bound when the suite runs without that file.
    if config.getini("timeout"):
        return
    for item in items:
        if item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT_S))


@pytest.fixture(scope="session")
def proxy_bin():
    return require_binary("RPC_PROXY_BIN", "rpc_proxy")


@pytest.fixture(scope="session")
def lb_bin():
    return require_binary("RPC_LB_BIN", "rpc_lb")


@pytest.fixture
def short_dir():
    """A temp dir with a short path: unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="rpops-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=["proxy", "lb"])
def control(request, short_dir):
    """A Control for each script in turn; skips when that script's binary is missing."""
    kind = request.param
    bin_path = request.getfixturevalue(f"{kind}_bin")
    ctl = Control(kind, bin_path, short_dir)
    yield ctl
    ctl.kill_all()


@pytest.fixture
def lb_control(lb_bin, short_dir):
    ctl = Control("lb", lb_bin, short_dir)
    yield ctl
    ctl.kill_all()


@pytest.fixture
def proxy_control(proxy_bin, short_dir):
    ctl = Control("proxy", proxy_bin, short_dir)
    yield ctl
    ctl.kill_all()


@pytest.fixture
def build_dir(proxy_bin, lb_bin, short_dir):
    """A BUILD_DIR for install.sh holding both binaries (links to wherever they are)."""
    path = short_dir / "build"
    path.mkdir()
    (path / "rpc_proxy").symlink_to(proxy_bin.resolve())
    (path / "rpc_lb").symlink_to(lb_bin.resolve())
    return path
