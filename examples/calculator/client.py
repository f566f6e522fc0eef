#!/usr/bin/env python3
"""Calls the Calculator service through the local rpc_proxy.

The proxy's address comes from $RPC_PROXY_ADDRESS (default /usr/local/rpc_proxy/proxy.sock);
the proxy finds the service's LBs in ZooKeeper and the LB picks a worker. Exits 0 when every
answer is the expected one, 1 otherwise.

Usage: client.py [--gen-py DIR] [--calls N]
"""

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None):
    parser = argparse.ArgumentParser(description="Calculator client through rpc_proxy")
    parser.add_argument(
        "--gen-py",
        default=os.environ.get("CALCULATOR_GEN_PY", str(HERE / "gen-py")),
        help="where `thrift --gen py calculator.thrift` wrote its code",
    )
    parser.add_argument("--calls", type=int, default=20, help="pid() calls to spread")
    args = parser.parse_args(argv)
    sys.path.insert(0, args.gen_py)

    from calculator import Calculator
    from calculator.ttypes import DivideByZero
    from rpc_thrift.utils import get_service_protocol

    # The two lines a client needs: a protocol for service "calculator", a generated client.
    client = Calculator.Client(get_service_protocol("calculator"))

    failures = []

    def check(shown, got, want):
        print(f"{shown} -> {got!r}", flush=True)
        if got != want:
            failures.append(f"{shown}: expected {want!r}, got {got!r}")

    check("add(2, 3)", client.add(2, 3), 5)
    check("divide(7, 2)", client.divide(7, 2), 3.5)
    try:
        answer = client.divide(1, 0)
    except DivideByZero as exc:  # the IDL's declared exception, raised in the client
        print(f"divide(1, 0) -> DivideByZero(message={exc.message!r})", flush=True)
    else:
        failures.append(f"divide(1, 0): expected DivideByZero, got {answer!r}")
    pids = sorted({client.pid() for _ in range(args.calls)})
    print(f"pid() x {args.calls} answered by worker pids {pids}", flush=True)

    for failure in failures:
        print(f"client: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
