"""A fake rpc_lb for the worker tests: listens on a unix socket, accepts the worker's
connection, and speaks the LB side of the worker protocol frame by frame.

Calls are encoded exactly as a thrift-generated client would (``Echo.Client`` over an
in-memory transport) and replies decoded the same way. Every socket operation is bounded.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from typing import Any, Callable

from thrift.protocol.TBinaryProtocol import TBinaryProtocol
from thrift.transport.TTransport import TMemoryBuffer

CALL, REPLY, EXCEPTION, ONEWAY = 1, 2, 3, 4
HEARTBEAT, STOP, STOP_CONFIRM, HELLO = 20, 21, 22, 23

#: Default bound of every wait in the tests, in seconds.
WAIT = 10.0


def encode_frame(message_type: int, name: str, seqid: int, body: bytes = b"\x00") -> bytes:
    """A whole frame: length, strict header, body."""
    raw_name = name.encode()
    payload = (
        struct.pack("!Ii", 0x80010000 | message_type, len(raw_name))
        + raw_name
        + struct.pack("!i", seqid)
        + body
    )
    return struct.pack("!i", len(payload)) + payload


def ping(seqid: int) -> bytes:
    return encode_frame(HEARTBEAT, "ping", seqid)


def stop_confirm() -> bytes:
    return encode_frame(STOP_CONFIRM, "stop_confirm", 0)


@dataclass
class Frame:
    """One frame from the worker."""

    raw: bytes  # the whole frame, length prefix included
    message_type: int
    name: str
    seqid: int
    body: bytes

    @property
    def payload(self) -> bytes:
        return self.raw[4:]


def parse_frame(raw: bytes) -> Frame:
    (word, name_len) = struct.unpack("!Ii", raw[4:12])
    assert word & 0xFFFF0000 == 0x80010000, f"not strict binary: {raw[:16]!r}"
    name = raw[12 : 12 + name_len].decode()
    (seqid,) = struct.unpack("!i", raw[12 + name_len : 16 + name_len])
    return Frame(raw, word & 0xFF, name, seqid, raw[16 + name_len :])


def parse_hello(body: bytes) -> tuple[int, int, str]:
    """``(pool_size, pid, service)`` from a HELLO body."""
    fields: dict = {}
    at = 0
    while body[at] != 0:
        field_type, field_id = struct.unpack("!bh", body[at : at + 3])
        at += 3
        if field_type == 8:
            (fields[field_id],) = struct.unpack("!i", body[at : at + 4])
            at += 4
        elif field_type == 11:
            (size,) = struct.unpack("!i", body[at : at + 4])
            fields[field_id] = body[at + 4 : at + 4 + size].decode()
            at += 4 + size
        else:
            raise AssertionError(f"unexpected field type {field_type} in HELLO")
    assert at == len(body) - 1, "trailing bytes after HELLO's stop byte"
    return fields.get(1, 0), fields.get(2, 0), fields.get(3, "")


class Codec:
    """Encodes calls and decodes replies with a generated service module (e.g. ``Echo``)."""

    def __init__(self, service_module: Any) -> None:
        self.service = service_module

    def call(self, method: str, seqid: int, *args: Any) -> bytes:
        buf = TMemoryBuffer()
        client = self.service.Client(TBinaryProtocol(buf))
        client._seqid = seqid
        getattr(client, "send_" + method)(*args)
        payload = buf.getvalue()
        return struct.pack("!i", len(payload)) + payload

    def result(self, method: str, frame: Frame) -> Any:
        """The call's result; raises the declared exception or TApplicationException."""
        client = self.service.Client(TBinaryProtocol(TMemoryBuffer(frame.payload)))
        return getattr(client, "recv_" + method)()


class Closed(Exception):
    """The worker closed the connection."""


def is_worker_ping(frame: Frame) -> bool:
    """The worker's own ping: a heartbeat with a negative seqid (an LB's pings, and the echoes
    of them, carry the LB's seqids, never negative here)."""
    return frame.message_type == HEARTBEAT and frame.seqid < 0


class LBConn:
    """The LB's end of one worker connection.

    :meth:`read` skips the worker's own pings (which it sends whenever this LB sent no
    heartbeat for a heartbeat interval) and keeps them in ``worker_pings`` as ``(monotonic
    time, frame)``; :meth:`read_any` returns every frame.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.worker_pings: list[tuple[float, Frame]] = []

    def send(self, data: bytes) -> None:
        self.sock.settimeout(WAIT)
        self.sock.sendall(data)

    def read(self, timeout: float = WAIT) -> Frame:
        """The next frame that is not one of the worker's own pings; raises ``Closed`` on EOF
        and ``socket.timeout`` after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.read_any(max(0.0, deadline - time.monotonic()))
            if not is_worker_ping(frame):
                return frame
            self.worker_pings.append((time.monotonic(), frame))

    def read_any(self, timeout: float = WAIT) -> Frame:
        """The next frame, whatever it is; raises ``Closed`` on EOF and ``socket.timeout``
        after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                (size,) = struct.unpack("!i", self.buf[:4])
                assert 0 < size < 1 << 26, f"bad frame length {size}"
                if len(self.buf) >= 4 + size:
                    raw, self.buf = self.buf[: 4 + size], self.buf[4 + size :]
                    return parse_frame(raw)
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"no frame within {timeout} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError as err:
                raise Closed("reset") from err
            if not chunk:
                raise Closed("EOF")
            self.buf += chunk

    def read_skipping_pings(self, timeout: float = WAIT) -> Frame:
        """The next frame that is not a ping echo."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self.read(max(0.01, deadline - time.monotonic()))
            if frame.message_type != HEARTBEAT:
                return frame

    def expect_closed(self, timeout: float = WAIT) -> None:
        """Waits for EOF, failing on any frame or on timeout."""
        try:
            frame = self.read(timeout)
        except Closed:
            return
        raise AssertionError(f"expected EOF, got {frame}")

    def hello(self, timeout: float = WAIT) -> tuple[int, int, str]:
        frame = self.read(timeout)
        assert (frame.message_type, frame.name, frame.seqid) == (HELLO, "hello", 0), frame
        return parse_hello(frame.body)

    def close(self) -> None:
        self.sock.close()


class FakeLB:
    """A listener on a unix socket at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.conns: list = []

    def accept(self, timeout: float = WAIT) -> LBConn:
        self.listener.settimeout(timeout)
        sock, _ = self.listener.accept()
        conn = LBConn(sock)
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.listener.close()


def wait_until(condition: Callable[[], Any], timeout: float = WAIT, what: str = "") -> Any:
    """Polls ``condition`` until it is truthy (returned) or ``timeout`` passes (fails)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.02)
