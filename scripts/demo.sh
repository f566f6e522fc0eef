#!/usr/bin/env bash
# Builds rpc_proxy, then runs demo/demo.py: a throwaway ZooKeeper, the Python echo backend,
# rpc_proxy, and one real Thrift call through the proxy's unix socket.
# Needs: cargo, java + the Debian `zookeeper` package, the `thrift` compiler, and Python with
# the `thrift` and `kazoo` packages. Exits non-zero when any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -p rpc-proxy
export RPC_PROXY_BIN="${RPC_PROXY_BIN:-$PWD/target/debug/rpc_proxy}"
exec "${PYTHON:-python3}" demo/demo.py "$@"
