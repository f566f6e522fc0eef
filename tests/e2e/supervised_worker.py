#!/usr/bin/env python3
"""The Echo service as a worker that rpc_lb starts itself (`worker_command`), for the
supervision tests (tests/e2e/test_supervision.py) and the demo:

    worker_command=<python> tests/e2e/supervised_worker.py --gen-dir DIR [--pool-size N]

It dials the LB's back socket named by $RPC_LB_BACK_ADDRESS (passed to RpcWorker explicitly,
so it also runs with an rpc_thrift that does not read the variable itself). `whoami()`
returns `<slot>:<generation>:<pid>` from $RPC_WORKER_ID and $RPC_WORKER_GENERATION;
`slow(ms, s)` logs `SLOW-START <s>` on stderr (which the LB logs), then sleeps. Started at
the prompt without the LB's environment it exits with code 2.
"""

import argparse
import logging
import os
import sys
import time


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-dir", required=True, help="output dir of `thrift --gen py`")
    parser.add_argument("--pool-size", type=int, default=1)
    args = parser.parse_args(argv)
    address = os.environ.get("RPC_LB_BACK_ADDRESS")
    if not address:
        print("supervised_worker.py: RPC_LB_BACK_ADDRESS is not set", file=sys.stderr)
        return 2
    sys.path.insert(0, args.gen_dir)
    from echo import Echo
    from echo.ttypes import EchoError
    from rpc_thrift import RpcWorker

    identity = "{}:{}:{}".format(
        os.environ.get("RPC_WORKER_ID", "-"),
        os.environ.get("RPC_WORKER_GENERATION", "-"),
        os.getpid(),
    )
    log = logging.getLogger("echo")

    class Handler:
        def echo(self, s):
            return s

        def ping(self):
            return None

        def add(self, a, b):
            return a + b

        def slow(self, ms, s):
            log.info("SLOW-START %s", s)
            time.sleep(ms / 1000)
            return s

        def whoami(self):
            return identity

        def blob(self, data):
            return data

        def notify(self, s):
            log.info("notify %s", s)

        def fail(self, how):
            if how == "declared":
                raise EchoError(message="declared failure", code=7)
            raise ValueError(f"boom {how}")

    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    worker = RpcWorker(Echo.Processor(Handler()), address, pool_size=args.pool_size, service="echo")
    log.info("worker %s serving", identity)
    worker.run()
    log.info("worker %s exited cleanly", identity)
    return 0


if __name__ == "__main__":
    sys.exit(main())
