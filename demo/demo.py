#!/usr/bin/env python3
"""rpc_proxy demo: real Thrift calls through the whole mesh, end to end.

Starts a throwaway ZooKeeper and `rpc_lb` for service `echo`, which starts its three Python
worker processes itself (`worker_command`: rpc_thrift.RpcWorker running the generated Echo
processor, tests/e2e/supervised_worker.py) and registers in ZooKeeper under product `demo`
once they are ready; starts `rpc_proxy`; calls it with the generated Python client over the
proxy's unix socket; replaces every worker with a rolling restart (SIGHUP to rpc_lb) while
calling; then stops everything gracefully (the LB, which stops its workers, and the proxy
with SIGTERM, each exit code checked). Exits 0 when every step worked, 1 otherwise.

Usage: demo/demo.py [--proxy-bin PATH] [--lb-bin PATH] [--keep]   (scripts/demo.sh builds first)
"""

import argparse
import shlex
import shutil
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

import harness  # noqa: E402 - lives in tests/e2e, shared with the test suite

PRODUCT = "demo"
WORKER = ROOT / "tests" / "e2e" / "supervised_worker.py"
WORKERS = 3


def step(text):
    print(f"==> {text}", flush=True)


def expect(shown, got, want):
    print(f"{shown} -> {got!r}", flush=True)
    if got != want:
        raise RuntimeError(f"{shown}: expected {want!r}, got {got!r}")


def worker_pids(conn, want_generation, calls=60):
    """{slot: pid} of the workers that answered `whoami()` (`<slot>:<generation>:<pid>`)
    in `calls` calls, if all are of `want_generation`; None otherwise."""
    seen = {}
    for _ in range(calls):
        slot, generation, pid = conn.whoami().split(":")
        if int(generation) != want_generation:
            return None
        seen[int(slot)] = int(pid)
    return seen if len(seen) == WORKERS else None


def run(proxy_bin, lb_bin, base):
    zk = harness.ZooKeeperServer(base / "zk")
    lb = kz = proxy = None
    try:
        step("starting ZooKeeper")
        zk.start()
        print(f"ZooKeeper listening on {zk.address}")

        step("generating the Python code of idl/echo.thrift")
        idl = harness.generate_echo(base / "gen-py")

        step(f"starting rpc_lb for service `echo`; it starts {WORKERS} Python workers itself")
        lb_dir = base / "lb"
        lb_dir.mkdir()
        command = [sys.executable, str(WORKER), "--gen-dir", str(idl.gen_dir), "--pool-size", "2"]
        settings = {
            "zk": zk.address,
            "product": PRODUCT,
            "service": "echo",
            "worker_command": shlex.join(command),
            "worker_processes": str(WORKERS),
        }
        lb = harness.Lb(lb_bin, lb_dir, settings)
        lb.start()
        print(f"rpc_lb (pid {lb.pid}) front {lb.frontend}, workers dial {lb.back_address}")
        print(f"worker_command={settings['worker_command']}")
        kz = harness.kazoo_client(zk.address)
        node = lb.node_path(PRODUCT)
        harness.wait_until(lambda: kz.exists(node), 30, "the LB registers in ZooKeeper")
        print(f"registered: {node} = {kz.get(node)[0].decode()}")

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

        step("calling service `echo` through proxy -> LB -> workers")
        with harness.EchoConnection(idl, proxy.address, service="echo") as conn:
            expect('echo("hello")', conn.echo("hello"), "hello")
            expect("add(2, 3)", conn.add(2, 3), 5)
            first = harness.wait_until(lambda: worker_pids(conn, 0), 30, "every worker answers")
            print(f"whoami() answered by the workers {{slot: pid}} = {first}")
            try:
                conn.fail("declared")
            except idl.EchoError as exc:
                print(f"fail('declared') -> EchoError(message={exc.message!r}, code={exc.code})")

            step("rolling restart: SIGHUP to rpc_lb (each worker replaced once its successor runs)")
            lb.send_signal(signal.SIGHUP)
            calls, failures = 0, []

            def rolled():
                nonlocal calls
                calls += 60
                try:
                    return worker_pids(conn, 1)
                except Exception as exc:  # noqa: BLE001 - reported below
                    failures.append(exc)
                    return None

            second = harness.wait_until(rolled, 60, "every worker replaced (generation 1)")
            if failures:
                raise RuntimeError(f"calls failed during the rolling restart: {failures[:3]}")
            print(f"after {calls} calls, none failed: generation 1 workers {second}")
            if set(first.values()) & set(second.values()):
                raise RuntimeError(f"workers not replaced: {first} -> {second}")

        step("stopping: the LB (it stops its workers), then the proxy (SIGTERM each)")
        for name, proc in (("rpc_lb", lb), ("rpc_proxy", proxy)):
            code = proc.stop(signal.SIGTERM, timeout=30)
            print(f"{name} exited with code {code}")
            if code != 0:
                raise RuntimeError(f"{name} exit code {code}, want 0")
        return 0
    except Exception as exc:  # noqa: BLE001 - any failure ends the demo with code 1
        print(f"demo failed: {exc}", file=sys.stderr)
        for proc in (lb, proxy):
            if proc is not None and proc.proc is not None:
                print(proc.output(), file=sys.stderr)
        return 1
    finally:
        # Killing the LB kills its workers too (setpriv --pdeathsig).
        for proc in (proxy, lb):
            if proc is not None:
                proc.kill()
        if kz is not None:
            kz.stop()
            kz.close()
        zk.kill()


def main(argv=None):
    parser = argparse.ArgumentParser(description="rpc_proxy demo: the whole mesh, end to end")
    parser.add_argument("--proxy-bin", type=Path, default=harness.proxy_bin())
    parser.add_argument("--lb-bin", type=Path, default=harness.lb_bin())
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    for binary in (args.proxy_bin, args.lb_bin):
        if not binary.exists():
            print(f"{binary} not found (cargo build --workspace --bins)", file=sys.stderr)
            return 1
    base = harness.short_tempdir("rpdemo-")
    try:
        code = run(args.proxy_bin, args.lb_bin, base)
    finally:
        if args.keep:
            print(f"scratch directory kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    print("demo OK" if code == 0 else "demo FAILED")
    return code


if __name__ == "__main__":
    sys.exit(main())
