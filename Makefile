# Entry points of the repo. `make test` is the project's test command (scripts/test.sh).
#
#   make build      release binaries: target/release/rpc_proxy, target/release/rpc_lb
#   make test       everything CI runs (scripts/test.sh: setup, lints, cargo test, e2e)
#   make demo       one real Thrift call through ZooKeeper and rpc_proxy (scripts/demo.sh)
#   make install    scripts/install.sh [PREFIX]; honours DESTDIR, UNIT_DIR, BUILD_DIR
#   make check      formatting and lints only
#   make ops-test   control scripts, systemd units and install (tests/ops; needs the debug
#                   binaries: cargo build --workspace --bins)
#   make bench      benchmarks (bench/README.md): release build, every scenario, several
#                   rounds; writes bench/results/latest.md and latest.json (about 20 min)
#   make bench-smoke  one tiny round of every benchmark scenario (bench/smoke.sh)
#   make fuzz       libFuzzer on the frame/header codec for FUZZ_SECONDS (default 60) from
#                   the kept seed corpus fuzz/corpus/frame (nightly + cargo-fuzz, installed
#                   if missing); new inputs go to fuzz/corpus-scratch (not kept), crashes to
#                   fuzz/artifacts
#   make zk         a throwaway standalone ZooKeeper on 127.0.0.1:ZK_PORT (default 2181)
#                   until Ctrl-C (scripts/zk_throwaway.sh)
#   make example    the "run your own service" example end to end: own IDL, rpc_lb, two
#                   Python workers, rpc_proxy, client calls, ordered stop
#                   (examples/calculator/run.sh; builds the debug binaries first)

PREFIX ?= /usr/local/rpc_proxy
PYTHON ?= python3

.PHONY: build test demo install check ops-test bench bench-smoke fuzz

FUZZ_SECONDS ?= 60

build:
	cargo build --workspace --release --bins

test:
	scripts/test.sh

demo:
	scripts/demo.sh

install:
	DESTDIR="$(DESTDIR)" UNIT_DIR="$(UNIT_DIR)" BUILD_DIR="$(BUILD_DIR)" scripts/install.sh "$(PREFIX)"

check:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	ruff check tests demo worker-py examples
	ruff format --check tests demo worker-py examples

ops-test:
	$(PYTHON) -m pytest -q tests/ops

fuzz:
	command -v cargo-fuzz >/dev/null 2>&1 || cargo install cargo-fuzz --locked
	mkdir -p fuzz/corpus-scratch
	cd fuzz && cargo +nightly fuzz run frame corpus-scratch corpus/frame -- -max_total_time=$(FUZZ_SECONDS) -max_len=4096

bench:
	scripts/setup.sh --bench
	cargo build --release -p rpc-bench -p rpc-proxy -p rpc-lb
	$(PYTHON) -m pip install -q --disable-pip-version-check ./worker-py
	target/release/rpc-bench --no-build $(BENCH_ARGS)

bench-smoke:
	bench/smoke.sh

.PHONY: zk example

ZK_PORT ?= 2181

zk:
	scripts/zk_throwaway.sh $(ZK_PORT)

example:
	cargo build --workspace --bins
	examples/calculator/run.sh
