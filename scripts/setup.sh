#!/usr/bin/env bash
# Installs what the build, the demo and the tests need on a fresh Debian machine:
# Debian's zookeeper (jars only: it starts no daemon; never zookeeperd), thrift-compiler,
# chromium (headless, for the status page test) and the Python test dependencies; with
# `--bench`, also haproxy (a benchmark baseline).
# Safe to run again; skips what is present.
set -euo pipefail

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

need_apt=()
[ -f /usr/share/java/zookeeper.jar ] || need_apt+=(zookeeper)
command -v thrift >/dev/null 2>&1 || need_apt+=(thrift-compiler)
command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)
command -v shellcheck >/dev/null 2>&1 || need_apt+=(shellcheck)
command -v systemd-analyze >/dev/null 2>&1 || need_apt+=(systemd)
command -v make >/dev/null 2>&1 || need_apt+=(make)
command -v flock >/dev/null 2>&1 || need_apt+=(util-linux)
# Headless Chromium loads the admin status page in tests/e2e/test_status_page.py.
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need_apt[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# Installs Debian package $1 for its binary $2 without leaving its daemon running: service
# starts are blocked for the install (policy-rc.d), and any process named $2 is stopped.
apt_install_quiet() {
    local package=$1 binary=$2 added_policy=""
    echo "setup: apt-get install $package (for $binary; its daemon is kept off)"
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
        $SUDO chmod +x /usr/sbin/policy-rc.d
        added_policy=1
    fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$package" >/dev/null
    [ -n "$added_policy" ] && $SUDO rm -f /usr/sbin/policy-rc.d
    $SUDO pkill -x "$binary" 2>/dev/null || true
}

# promtool (tests check /metrics with it) comes with Debian's prometheus.
command -v promtool >/dev/null 2>&1 || apt_install_quiet prometheus prometheus
# `--bench` (make bench): haproxy, a baseline of scenario 1 (the benchmark starts its own).
if [ "${1:-}" = "--bench" ] && ! command -v haproxy >/dev/null 2>&1 && [ ! -x /usr/sbin/haproxy ]; then
    apt_install_quiet haproxy haproxy
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import thrift, kazoo, pytest, pytest_timeout, thriftpy2' >/dev/null 2>&1 || ! command -v ruff >/dev/null 2>&1; then
    echo "setup: pip install thrift kazoo thriftpy2 pytest pytest-timeout ruff"
    "$PY" -m pip install -q --disable-pip-version-check thrift kazoo thriftpy2 pytest pytest-timeout ruff
fi
# mypy, for its stubtest: scripts/test.sh checks the rpc_thrift `.pyi` against the built module.
if ! "$PY" -c 'import mypy.stubtest' >/dev/null 2>&1; then
    echo "setup: pip install mypy"
    "$PY" -m pip install -q --disable-pip-version-check mypy
fi
echo "setup: ok (thrift $(thrift --version | awk '{print $3}'), zookeeper $(dpkg-query -W -f='${Version}' zookeeper 2>/dev/null || echo '?'))"
