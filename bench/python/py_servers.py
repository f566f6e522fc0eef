#!/usr/bin/env python3
"""Python Thrift servers for rpc-bench (scenarios 3 and 4), all with the same trivial handler.

Modes (one process each; rpc-bench starts them in their own process group and stops the group):

- ``threaded``: Apache Thrift ``TThreadedServer`` (a thread per connection).
- ``processpool``: Apache Thrift ``TProcessPoolServer`` with ``--workers`` processes; each
  process serves one connection at a time, until that client disconnects.
- ``thriftpy2``: thriftpy2's ``make_server`` (its threaded server), Cython codec.
- ``worker``: an ``rpc_thrift.RpcWorker`` serving the LB's back socket ``--unix``.

Every server listens on the unix socket ``--unix`` with the framed transport and the (accelerated)
strict binary protocol, not multiplexed: clients send the bare method name ``echo``. Generated
code (``thrift --gen py idl/echo.thrift``) is found in ``--gen-dir``; thriftpy2 reads ``--idl``.
"""

from __future__ import annotations

import argparse
import os
import sys


class Handler:
    """The trivial echo handler of idl/echo.thrift (only what the benchmark calls)."""

    def echo(self, s):
        return s

    def ping(self):
        return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def apache(mode: str, path: str, workers: int) -> None:
    from echo import Echo
    from thrift.protocol import TBinaryProtocol
    from thrift.server import TServer
    from thrift.transport import TSocket, TTransport

    _unlink(path)
    processor = Echo.Processor(Handler())
    sock = TSocket.TServerSocket(unix_socket=path)
    tfactory = TTransport.TFramedTransportFactory()
    pfactory = TBinaryProtocol.TBinaryProtocolAcceleratedFactory()
    if mode == "threaded":
        server = TServer.TThreadedServer(processor, sock, tfactory, pfactory, daemon=True)
    else:
        from thrift.server.TProcessPoolServer import TProcessPoolServer

        server = TProcessPoolServer(processor, sock, tfactory, pfactory)
        server.setNumWorkers(workers)
    server.serve()


def thriftpy2_server(path: str, idl: str) -> None:
    import thriftpy2
    from thriftpy2.protocol import TCyBinaryProtocolFactory
    from thriftpy2.rpc import make_server
    from thriftpy2.transport import TCyFramedTransportFactory

    _unlink(path)
    echo_thrift = thriftpy2.load(idl, module_name="echo_thrift")
    server = make_server(
        echo_thrift.Echo,
        Handler(),
        unix_socket=path,
        proto_factory=TCyBinaryProtocolFactory(),
        trans_factory=TCyFramedTransportFactory(),
        client_timeout=None,
    )
    server.daemon = True
    server.serve()


def worker(address: str, pool_size: int, service: str) -> None:
    from echo import Echo
    from rpc_thrift import RpcWorker

    RpcWorker(Echo.Processor(Handler()), address, pool_size=pool_size, service=service).run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["threaded", "processpool", "thriftpy2", "worker"])
    parser.add_argument(
        "--unix", required=True, help="socket to listen on (the LB's back socket for worker)"
    )
    parser.add_argument("--gen-dir", help="output dir of `thrift --gen py idl/echo.thrift`")
    parser.add_argument("--idl", help="idl/echo.thrift (thriftpy2)")
    parser.add_argument("--workers", type=int, default=2, help="processpool: worker processes")
    parser.add_argument("--pool-size", type=int, default=1, help="worker: calls at once")
    parser.add_argument("--service", default="echo", help="worker: service name")
    args = parser.parse_args()
    if args.gen_dir:
        sys.path.insert(0, args.gen_dir)
    if args.mode in ("threaded", "processpool"):
        apache(args.mode, args.unix, args.workers)
    elif args.mode == "thriftpy2":
        thriftpy2_server(args.unix, args.idl)
    else:
        worker(args.unix, args.pool_size, args.service)
    return 0


if __name__ == "__main__":
    sys.exit(main())
