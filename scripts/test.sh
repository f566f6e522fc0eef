#!/usr/bin/env bash
# The project's test command (README, .ci/run): installs what is missing, checks formatting
# and lints, runs every Rust test (unit tests and the real-ZooKeeper registry tests) and the
# end-to-end pytest suite (real ZooKeeper, real rpc_proxy, Thrift-generated Python clients
# and servers). Fails when anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== ruff"
ruff check tests demo
ruff format --check tests demo

echo "== cargo build"
cargo build --workspace --bins
echo "== cargo test"
cargo test --workspace

echo "== end-to-end (pytest)"
RPC_PROXY_BIN="$PWD/target/debug/rpc_proxy" python3 -m pytest -q tests/e2e

echo "== all tests passed"
