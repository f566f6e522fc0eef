#!/usr/bin/env bash
# Smoke test of the benchmark harness (issue 5): one tiny round of every scenario, so the
# harness cannot rot. It fails when a scenario produced no numbers; it asserts no timing.
# About 40 s on 2 cores once built (the limit is 150 s); scenario 7 (blocking clients)
# takes about 6 s of it.
#
# Call it from scripts/test.sh after `pip install ./worker-py` (scenarios 3 and 4 need the
# rpc_thrift package). Needs what scripts/setup.sh installs (Debian zookeeper and
# thrift-compiler, Python thrift). haproxy and thriftpy2 are used when present; without
# them their baselines are skipped with a printed reason. Writes target/rpc-bench-smoke/.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p rpc-bench -p rpc-proxy -p rpc-lb
exec timeout 150 target/debug/rpc-bench --smoke --no-build "$@"
