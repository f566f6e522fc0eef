#!/usr/bin/env python3
"""rpc_proxy demo: one real Thrift call through the proxy, end to end.

Starts a throwaway ZooKeeper, the Python echo backend (tests/e2e/echo_server.py), registers
the backend under product `demo`, starts rpc_proxy with a generated config.ini, calls it
with the generated Python client over the proxy's unix socket, then stops everything
(the proxy with SIGTERM). Exits 0 when every step worked, 1 otherwise.

Usage: demo/demo.py [--proxy-bin PATH] [--keep]   (scripts/demo.sh builds first)
"""

import argparse
import shutil
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import harness  # noqa: E402 - lives in tests/e2e, shared with the test suite

PRODUCT = "demo"


def step(text):
    print(f"==> {text}", flush=True)


def expect(shown, got, want):
    print(f"{shown} -> {got!r}", flush=True)
    if got != want:
        raise RuntimeError(f"{shown}: expected {want!r}, got {got!r}")


def run(proxy_bin, base):
    zk = harness.ZooKeeperServer(base / "zk")
    backend = kz = proxy = None
    try:
        step("starting ZooKeeper")
        zk.start()
        print(f"ZooKeeper listening on {zk.address}")

        step("generating the Python code of idl/echo.thrift")
        idl = harness.generate_echo(base / "gen-py")

        step("starting the echo backend and registering it")
        backend = harness.Backend(idl.gen_dir, "demo-backend", base).start()
        kz = harness.kazoo_client(zk.address)
        node = backend.register(kz, PRODUCT, "echo")
        print(f"backend {backend.address} registered at {node}")

        step("starting rpc_proxy")
        proxy_dir = base / "proxy"
        proxy_dir.mkdir()
        settings = {
            "zk": zk.address,
            "product": PRODUCT,
            "proxy_address": str(proxy_dir / "proxy.sock"),
        }
        proxy = harness.Proxy(proxy_bin, proxy_dir, settings)
        proxy.start()
        print(f"rpc_proxy (pid {proxy.pid}) listening on {proxy.address}")

        step("calling service `echo` through the proxy")
        with harness.EchoConnection(idl, proxy.address, service="echo") as conn:
            expect('echo("hello")', conn.echo("hello"), "hello")
            expect("add(2, 3)", conn.add(2, 3), 5)
            expect("whoami()", conn.whoami(), "demo-backend")

        step("stopping rpc_proxy with SIGTERM")
        code = proxy.stop(signal.SIGTERM, timeout=15)
        print(f"rpc_proxy exited with code {code}")
        if code != 0:
            raise RuntimeError(f"rpc_proxy exit code {code}, want 0")
        return 0
    except Exception as exc:  # noqa: BLE001 - any failure ends the demo with code 1
        print(f"demo failed: {exc}", file=sys.stderr)
        if proxy is not None and proxy.proc is not None:
            print(proxy.output(), file=sys.stderr)
        return 1
    finally:
        if proxy is not None:
            proxy.kill()
        if kz is not None:
            kz.stop()
            kz.close()
        if backend is not None:
            backend.kill()
        zk.kill()


def main(argv=None):
    parser = argparse.ArgumentParser(description="rpc_proxy demo: one call, end to end")
    parser.add_argument("--proxy-bin", type=Path, default=harness.proxy_bin())
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    if not args.proxy_bin.exists():
        print(f"rpc_proxy not found: {args.proxy_bin} (cargo build -p rpc-proxy)", file=sys.stderr)
        return 1
    base = harness.short_tempdir("rpdemo-")
    try:
        code = run(args.proxy_bin, base)
    finally:
        if args.keep:
            print(f"scratch directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print("demo OK" if code == 0 else "demo FAILED")
    return code


if __name__ == "__main__":
    sys.exit(main())
