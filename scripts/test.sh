#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what is missing, checks formatting
# and lints, runs every Rust test (unit tests and the real-ZooKeeper registry tests), builds
# and tests the rpc_thrift worker package, and runs the end-to-end pytest suites (real
# ZooKeeper, real rpc_proxy and rpc_lb, Thrift-generated Python clients, servers and
# workers) and the operations tests. Fails when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== ruff"
ruff check tests demo worker-py examples
ruff format --check tests demo worker-py examples

echo "== cargo build"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace

echo "== rpc_thrift (pip install ./worker-py)"
python3 -m pip install -q --disable-pip-version-check ./worker-py
echo "== stubtest (rpc_thrift._worker against its .pyi)"
python3 -m mypy.stubtest rpc_thrift._worker
(cd worker-py && python3 -m pytest -q tests)

export RPC_PROXY_BIN="$PWD/target/debug/rpc_proxy" RPC_LB_BIN="$PWD/target/debug/rpc_lb"
echo "== benchmark harness, smoke mode (checks every scenario yields numbers; asserts no timing)"
bench/smoke.sh
echo "== end-to-end (pytest)"
python3 -m pytest -q tests/e2e
echo "== operations (pytest)"
python3 -m pytest -q tests/ops
echo "== many hosts in network namespaces (pytest; skips with a reason where it cannot run)"
python3 -m pytest -q -rs tests/netns

echo "== all tests passed"
