#!/usr/bin/env python3
"""The Calculator worker: one process serving the generated processor to rpc_lb.

Run N of these against the LB's ``back_address``; each announces ``pool_size`` (calls it runs
at once) to the LB, and SIGTERM or SIGINT stops it gracefully (it tells the LB, finishes the
calls it holds, delivers their replies) with exit code 0.

Usage: server.py BACK_ADDRESS [--pool-size N] [--gen-py DIR]
"""

import argparse
import logging
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None):
    parser = argparse.ArgumentParser(description="Calculator worker (rpc_thrift.RpcWorker)")
    parser.add_argument("back_address", help="the LB's back_address (unix path or host:port)")
    parser.add_argument("--pool-size", type=int, default=2, help="calls run at once (threads)")
    parser.add_argument(
        "--gen-py",
        default=os.environ.get("CALCULATOR_GEN_PY", str(HERE / "gen-py")),
        help="where `thrift --gen py calculator.thrift` wrote its code",
    )
    args = parser.parse_args(argv)
    sys.path.insert(0, args.gen_py)

    from calculator import Calculator
    from calculator.ttypes import DivideByZero
    from rpc_thrift import RpcWorker

    class Handler(Calculator.Iface):
        """The service itself: plain Python, one method per IDL function."""

        def add(self, a, b):
            return a + b

        def divide(self, a, b):
            if b == 0:
                # Declared in the IDL: travels to the caller as a normal reply.
                raise DivideByZero(message=f"cannot divide {a} by zero")
            return a / b

        def pid(self):
            return os.getpid()

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s worker[%(process)d] %(levelname)s %(message)s"
    )
    logging.info("serving calculator at %s, pool_size=%d", args.back_address, args.pool_size)
    worker = RpcWorker(
        Calculator.Processor(Handler()),
        args.back_address,
        pool_size=args.pool_size,
        service="calculator",
    )
    worker.run()  # returns after SIGTERM/SIGINT once every held call is answered
    logging.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
