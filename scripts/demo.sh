#!/usr/bin/env bash
# The demo: installs what is missing (scripts/setup.sh), builds rpc_proxy, rpc_lb and the
# rpc_thrift worker package, then runs demo/demo.py: a throwaway ZooKeeper, rpc_lb starting its
# three Python workers itself (worker_command), rpc_proxy, real Thrift calls from a generated
# client through the proxy's unix socket, a rolling restart of the workers (SIGHUP) while
# calling; everything is stopped gracefully. Exits non-zero when any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins
if ! "${PYTHON:-python3}" -c 'import rpc_thrift' >/dev/null 2>&1; then
    echo "demo: pip install ./worker-py"
    "${PYTHON:-python3}" -m pip install -q --disable-pip-version-check ./worker-py
fi
export RPC_PROXY_BIN="${RPC_PROXY_BIN:-$PWD/target/debug/rpc_proxy}"
export RPC_LB_BIN="${RPC_LB_BIN:-$PWD/target/debug/rpc_lb}"
exec "${PYTHON:-python3}" demo/demo.py "$@"
