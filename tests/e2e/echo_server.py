#!/usr/bin/env python3
"""Echo backend for the end-to-end tests and the demo.

A plain Apache Thrift server for idl/echo.thrift: TThreadedServer on a TCP socket, framed
transport, accelerated binary protocol, NOT multiplexed (rpc_proxy strips `echo:` before it
forwards a call). It stands in for an L3 endpoint registered in ZooKeeper.

Like every Apache Thrift server, TThreadedServer runs the calls of one connection one after
the other. With `--concurrent` the server instead runs each call of a connection in a thread
pool as soon as it arrives and writes each reply when it is ready, so replies can come back
out of order (matched by seqid), as they do from an rpc_lb fanning calls out to workers.

Usage: echo_server.py --gen-dir DIR --name NAME [--host 127.0.0.1] [--port 0] [--unix PATH]
                      [--concurrent]

Once it listens it prints `READY <port>` (`READY 0` on a unix socket) on stdout. It also
prints a line per event the tests wait on: `SLOW-START <s>`, `SLOW-END <s>`, `NOTIFY <s>`,
`PING`.
"""

import argparse
import socket
import struct
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def _log(line):
    # One write per line, so lines of concurrent handlers never interleave.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-dir", required=True, help="output dir of `thrift --gen py`")
    parser.add_argument("--name", required=True, help="what whoami() returns")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--unix", help="listen on this unix socket path instead of TCP")
    parser.add_argument(
        "--concurrent", action="store_true", help="run a connection's calls concurrently"
    )
    args = parser.parse_args(argv)

    sys.path.insert(0, args.gen_dir)
    from echo import Echo
    from echo.ttypes import EchoError
    from thrift.protocol import TBinaryProtocol
    from thrift.server import TServer
    from thrift.transport import TSocket, TTransport

    log_lock = threading.Lock()

    def log(line):
        with log_lock:
            _log(line)

    class Handler:
        def echo(self, s):
            return s

        def ping(self):
            # rpc_proxy's heartbeat ("ping", 20) reaches this handler too: Thrift's Python
            # processor dispatches on the name alone.
            log("PING")

        def add(self, a, b):
            return a + b

        def slow(self, ms, s):
            log(f"SLOW-START {s}")
            time.sleep(ms / 1000.0)
            log(f"SLOW-END {s}")
            return s

        def whoami(self):
            return args.name

        def blob(self, data):
            return data

        def notify(self, s):
            log(f"NOTIFY {s}")

        def fail(self, how):
            if how == "declared":
                raise EchoError(message="declared failure", code=42)
            raise RuntimeError(f"undeclared failure: {how}")

    class BoundServerSocket(TSocket.TServerSocket):
        """Binds once, before serve(), so the chosen port can be printed first."""

        def listen(self):
            if self.handle is None:
                super().listen()

    if args.unix:
        server_socket = BoundServerSocket(unix_socket=args.unix)
        server_socket.listen()
        port = 0
    else:
        server_socket = BoundServerSocket(host=args.host, port=args.port)
        server_socket.listen()
        port = server_socket.handle.getsockname()[1]
    processor = Echo.Processor(Handler())
    log(f"READY {port}")
    try:
        if args.concurrent:
            serve_concurrently(processor, server_socket.handle)
        else:
            TServer.TThreadedServer(
                processor,
                server_socket,
                TTransport.TFramedTransportFactory(),
                TBinaryProtocol.TBinaryProtocolAcceleratedFactory(),
                daemon=True,
            ).serve()
    except KeyboardInterrupt:
        pass
    return 0


def _recv_exact(conn, n):
    """n bytes, or None on EOF."""
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def serve_concurrently(processor, listener):
    """Accept loop of `--concurrent`: one reader thread per connection, calls in a pool."""
    from thrift.protocol import TBinaryProtocol
    from thrift.transport import TTransport

    pool = ThreadPoolExecutor(max_workers=64)

    def process(conn, write_lock, payload):
        out = TTransport.TMemoryBuffer()
        processor.process(
            TBinaryProtocol.TBinaryProtocolAccelerated(TTransport.TMemoryBuffer(payload)),
            TBinaryProtocol.TBinaryProtocolAccelerated(out),
        )
        reply = out.getvalue()
        if reply:  # oneway calls have none
            with write_lock:
                try:
                    conn.sendall(struct.pack(">i", len(reply)) + reply)
                except OSError:
                    pass  # the peer went away

    def read_calls(conn):
        write_lock = threading.Lock()
        with conn:
            while True:
                try:
                    header = _recv_exact(conn, 4)
                    payload = header and _recv_exact(conn, struct.unpack(">i", header)[0])
                except OSError:
                    payload = None
                if payload is None:
                    return
                pool.submit(process, conn, write_lock, payload)

    while True:
        conn, _ = listener.accept()
        if conn.family != socket.AF_UNIX:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=read_calls, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
