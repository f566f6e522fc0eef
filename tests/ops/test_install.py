"""scripts/install.sh and `make install`: every file in place with its mode, paths rewritten
for another PREFIX, staging with DESTDIR, and an installed control script that finds its
binary and config in the installed layout."""

import filecmp
import os
import shutil
import stat
import subprocess

import pytest
from opskit import REPO, SYSTEMD, alive, clean_env, exe_of, free_port, show

INSTALL = REPO / "scripts" / "install.sh"
DEFAULT_PREFIX = "/usr/local/rpc_proxy"
UNIT_FILES = ("rpc_proxy.socket", "rpc_proxy.service", "rpc_lb@.service")


def run_install(*args, **env):
    return subprocess.run(
        [str(INSTALL), *map(str, args)],
        env=clean_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def assert_layout(root, units, build_dir):
    """Every installed file, with its mode; binaries identical to the build's."""
    for name in ("rpc_proxy", "rpc_lb"):
        path = root / "bin" / name
        assert mode(path) == 0o755, path
        assert filecmp.cmp(path, build_dir / name, shallow=False), path
    for name in ("control_proxy.sh", "control_lb.sh"):
        assert mode(root / name) == 0o755, name
    assert mode(root / "config.ini.example") == 0o644
    assert filecmp.cmp(root / "config.ini.example", REPO / "config.ini.example", shallow=False)
    for name in UNIT_FILES:
        assert mode(units / name) == 0o644, name
    assert (root / "lb").is_dir() and (root / "log").is_dir()


def test_install_into_destdir(short_dir, build_dir):
    dest = short_dir / "stage"
    result = run_install(DESTDIR=dest, BUILD_DIR=build_dir)
    assert result.returncode == 0, show(result)
    root, units = dest / DEFAULT_PREFIX.lstrip("/"), dest / "etc/systemd/system"
    assert_layout(root, units, build_dir)
    # The default PREFIX is what the repo's files say: copied unchanged.
    for name in UNIT_FILES:
        assert (units / name).read_text() == (SYSTEMD / name).read_text()
    for name in ("control_proxy.sh", "control_lb.sh"):
        assert (root / name).read_text() == (REPO / "scripts" / name).read_text()
    # Nothing but the prefix, the unit dir and their parents.
    allowed = {"usr", "usr/local", "etc", "etc/systemd"}
    stray = [
        p
        for p in (str(p.relative_to(dest)) for p in dest.rglob("*"))
        if p not in allowed and not p.startswith(("usr/local/rpc_proxy", "etc/systemd/system"))
    ]
    assert not stray, stray
    assert not (root / "config.ini").exists(), "install must not invent a config"


def test_install_to_another_prefix_rewrites_paths(short_dir, build_dir):
    dest = short_dir / "stage"
    result = run_install(
        "/opt/rpx",
        DESTDIR=dest,
        BUILD_DIR=build_dir,
        UNIT_DIR="/lib/systemd/system",
        RPC_USER="svc",
    )
    assert result.returncode == 0, show(result)
    root, units = dest / "opt/rpx", dest / "lib/systemd/system"
    assert_layout(root, units, build_dir)
    for path in (*(units / name for name in UNIT_FILES), root / "control_proxy.sh"):
        text = path.read_text()
        assert DEFAULT_PREFIX not in text, path
        assert "/opt/rpx/" in text, path
    proxy_unit = (units / "rpc_proxy.service").read_text()
    assert "ExecStart=/opt/rpx/bin/rpc_proxy -c /opt/rpx/config.ini" in proxy_unit
    assert "\nUser=svc\n" in proxy_unit and "\nGroup=svc\n" in proxy_unit
    assert "ReadWritePaths=/opt/rpx\n" in proxy_unit
    socket_unit = (units / "rpc_proxy.socket").read_text()
    assert "\nListenStream=/opt/rpx/proxy.sock\n" in socket_unit
    assert "\nSocketUser=svc\n" in socket_unit and "\nSocketGroup=svc\n" in socket_unit


def test_installed_control_script_uses_installed_layout(short_dir, build_dir):
    prefix = short_dir / "prefix"
    result = run_install(prefix, BUILD_DIR=build_dir, UNIT_DIR=short_dir / "units", CREATE_USER=0)
    assert result.returncode == 0, show(result)
    (prefix / "config.ini").write_text(
        f"zk=127.0.0.1:{free_port()}\nproxy_address={prefix}/proxy.sock\n"
    )
    # No RPC_PROXY_* and no rpc_proxy on PATH: bin/ beside the script, PREFIX/config.ini
    # (the rewritten default) and ./log, as the original ran from /usr/local/rpc_proxy.
    env = clean_env(PATH="/usr/bin:/bin")
    script = str(prefix / "control_proxy.sh")
    start = subprocess.run(
        [script, "start"], env=env, cwd=prefix, capture_output=True, text=True, timeout=60
    )
    pid = None
    try:
        assert start.returncode == 0, show(start)
        pid = int((prefix / "log" / "rpc_proxy.pid").read_text())
        assert exe_of(pid) == str(prefix / "bin" / "rpc_proxy")
        assert list((prefix / "log").glob("rpc_proxy.log.*"))
        stop = subprocess.run(
            [script, "stop"], env=env, cwd=prefix, capture_output=True, text=True, timeout=60
        )
        assert stop.returncode == 0, show(stop)
        assert not alive(pid)
    finally:
        if pid and alive(pid) and exe_of(pid) == str(prefix / "bin" / "rpc_proxy"):
            os.kill(pid, 9)


def test_install_without_built_binaries_fails(short_dir):
    empty = short_dir / "empty"
    empty.mkdir()
    dest = short_dir / "stage"
    result = run_install(DESTDIR=dest, BUILD_DIR=empty)
    assert result.returncode != 0, show(result)
    assert "make build" in result.stderr
    assert not dest.exists()


@pytest.mark.parametrize("prefix", ["relative/dir", "/opt/with space", "/opt/%i"])
def test_install_rejects_prefixes_units_cannot_hold(short_dir, build_dir, prefix):
    result = run_install(prefix, DESTDIR=short_dir / "stage", BUILD_DIR=build_dir)
    assert result.returncode == 64, show(result)
    assert not (short_dir / "stage").exists()


def test_make_install_calls_install_sh(short_dir, build_dir):
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    dest = short_dir / "stage"
    result = subprocess.run(
        ["make", "-s", "install", f"DESTDIR={dest}", f"BUILD_DIR={build_dir}", "PREFIX=/opt/mk"],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, show(result)
    assert_layout(dest / "opt/mk", dest / "etc/systemd/system", build_dir)
