"""The Echo service as a worker process, for the tests: ``python echo_worker.py [ADDRESS]``
(without ADDRESS: ``$RPC_LB_BACK_ADDRESS``, as for a worker its LB started).

The generated code (``thrift --gen py``) is found through ``PYTHONPATH``. ``slow(ms, s)``
sleeps, or with ``s`` starting with ``spin`` runs a pure-Python loop holding the GIL;
``fail("declared")`` raises the declared EchoError, anything else a ValueError.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

from echo import Echo
from echo.ttypes import EchoError

from rpc_thrift import RpcWorker


class Handler:
    def __init__(self, name: str) -> None:
        self.name = name

    def echo(self, s: str) -> str:
        return s

    def ping(self) -> None:
        return None

    def add(self, a: int, b: int) -> int:
        return a + b

    def slow(self, ms: int, s: str) -> str:
        logging.getLogger("echo").info("SLOW-START %s", s)
        deadline = time.monotonic() + ms / 1000
        if s.startswith("spin"):
            n = 0
            while time.monotonic() < deadline:  # pure Python: holds the GIL
                n += 1
        else:
            time.sleep(ms / 1000)
        return s

    def whoami(self) -> str:
        return self.name

    def blob(self, data: bytes) -> bytes:
        return data

    def notify(self, s: str) -> None:
        logging.getLogger("echo").info("notify %s", s)
        if s == "raise":
            raise RuntimeError("oneway failure")

    def fail(self, how: str) -> str:
        if how == "declared":
            raise EchoError(message="declared failure", code=7)
        raise ValueError(f"boom {how}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("address", nargs="?")
    parser.add_argument("--pool-size", type=int, default=1)
    parser.add_argument("--name", default="worker")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    worker = RpcWorker(
        Echo.Processor(Handler(args.name)), args.address, pool_size=args.pool_size, service="echo"
    )
    worker.run()
    print(f"worker {os.getpid()} exited cleanly", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
