"""An Echo worker (rpc_thrift.RpcWorker) that can hang, for tests/e2e/test_watchdog.py.

    python watchdog_worker.py --gen-dir DIR [--address BACK] [--name NAME] [--pool-size N]

The generated code of idl/echo.thrift is imported from `--gen-dir`; the LB's back socket is
`--address`, else $RPC_LB_BACK_ADDRESS (what a supervising rpc_lb sets). It registers no
signal handler of its own: a stack dump on SIGUSR1 is rpc_thrift's doing.

- `whoami()` returns `<name>:<pid>`.
- `slow(ms, s)` sleeps `ms` and returns `s`, except:
  - `s == "block"`: waits forever on an Event (a hang that releases the GIL);
  - `s == "regex"`: a catastrophic regular expression, stuck in C holding the GIL;
  - `s == "block:<name>"` / `"regex:<name>"`: the same in the worker called `<name>`, an
    immediate return anywhere else;
  - `s == "whoami"`: sleeps `ms`, then returns what `whoami()` does (a slow call that says
    which worker ran it).
  Each logs `HANG-START <s> pid=<pid>` to stderr first. The blocking lines carry the markers
  `HANG-LINE-BLOCK` and `HANG-LINE-REGEX`: the tests find the line numbers the LB's message
  must name by those markers.
- The other methods behave as in worker-py/tests/echo_worker.py.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import threading
import time

CATASTROPHIC = re.compile(r"(a+)+$")


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
        mode, _, target = s.partition(":")
        if mode in ("block", "regex") and target in ("", self.name):
            print(f"HANG-START {s} pid={os.getpid()}", file=sys.stderr, flush=True)
            if mode == "block":
                threading.Event().wait()  # HANG-LINE-BLOCK
            else:
                CATASTROPHIC.match("a" * 40 + "b")  # HANG-LINE-REGEX
            return s
        time.sleep(ms / 1000)
        return self.whoami() if s == "whoami" else s

    def whoami(self) -> str:
        return f"{self.name}:{os.getpid()}"

    def blob(self, data: bytes) -> bytes:
        return data

    def notify(self, s: str) -> None:
        print(f"notify {s}", file=sys.stderr, flush=True)

    def fail(self, how: str) -> str:
        from echo.ttypes import EchoError

        if how == "declared":
            raise EchoError(message="declared failure", code=7)
        raise ValueError(f"boom {how}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gen-dir", required=True)
    parser.add_argument("--address", default=None)
    parser.add_argument("--name", default="worker")
    parser.add_argument("--pool-size", type=int, default=1)
    args = parser.parse_args()
    sys.path.insert(0, args.gen_dir)
    from echo import Echo
    from rpc_thrift import RpcWorker

    address = args.address or os.environ["RPC_LB_BACK_ADDRESS"]
    worker = RpcWorker(
        Echo.Processor(Handler(args.name)), address, pool_size=args.pool_size, service="echo"
    )
    print(f"worker {args.name} pid={os.getpid()} serving {address}", file=sys.stderr, flush=True)
    worker.run()
    print(f"worker {os.getpid()} exited cleanly", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
