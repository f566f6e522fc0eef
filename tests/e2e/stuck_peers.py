"""Peers that are alive but misbehave, for the gray-failure tests (issue 11,
test_gray_failures.py): plain Python sockets, no pytest in here.

- `FakeServer`: a TCP listener standing in for an upstream endpoint (an LB or a Thrift
  server) registered in ZooKeeper; each accepted connection is handed to a handler running in
  its own thread, or just held open unread (a peer that accepts and never reads).
- `FakeWorker`: a worker connected to an LB's back socket that says HELLO and then does what
  its handler says (nothing at all: a worker that never reads).
- `push`: writes a byte stream to a hop with every send bounded, recording how much it
  accepted, when it stalled and when it closed the connection.
- `MemoryWatch`: the resident memory of a process (/proc/<pid>/status) during a test.
- `Bystander`: a client making small calls on its own connection in a loop, timing each.
- `tcp_state` and `peer_closed`: whether the other end of a socket has let go of it, seen
  from the operating system rather than by reading (a peer that never reads cannot be asked).

Every socket operation has a timeout and every loop a deadline.
"""

from __future__ import annotations

import itertools
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

import harness

HELLO = 23
POLLRDHUP = getattr(select, "POLLRDHUP", 0x2000)

#: Bound of a single socket operation in these helpers, in seconds.
OP_TIMEOUT = 10.0


# === wire helpers ===


def call_frame(name, seqid, text):
    """A framed CALL of `name` with one string argument (field 1), e.g. `echo_args(s=text)`."""
    return harness.frame(
        harness.encode_message(name, harness.CALL, seqid, harness.string_args(text))
    )


def string_reply_frame(name, seqid, text):
    """A framed REPLY whose result struct holds the string `text` as its success (field 0)."""
    return harness.frame(
        harness.encode_message(name, harness.REPLY, seqid, harness.string_args(text, field_id=0))
    )


def ping_frame(seqid, name="ping"):
    return harness.frame(harness.encode_message(name, harness.HEARTBEAT, seqid))


def hello_frame(pool_size, pid, service):
    """HELLO (CONTRACT section 7): `("hello", 23, 0)` with `{1: i32 pool_size, 2: i32 pid,
    3: string service}`."""
    raw = service.encode()
    body = (
        struct.pack(">bhi", 8, 1, pool_size)
        + struct.pack(">bhi", 8, 2, pid)
        + struct.pack(">bhi", 11, 3, len(raw))
        + raw
        + b"\x00"
    )
    return harness.frame(harness.encode_message("hello", HELLO, 0, body))


def decode_string_arg(body):
    """The first string field of an args struct (what `call_frame` encodes)."""
    ftype, _fid = struct.unpack(">bh", body[:3])
    assert ftype == 11, f"not a string field: {body[:16]!r}"
    (size,) = struct.unpack(">i", body[3:7])
    return body[7 : 7 + size].decode()


def describe_message(message):
    """One line for assertion messages: name, type, seqid and, for an exception, its text."""
    if message is None:
        return "no message"
    text = f"({message.name!r}, type {message.mtype}, seqid {message.seqid})"
    if message.mtype == harness.EXCEPTION:
        code, why = harness.decode_app_exception(message.body)
        text += f" TApplicationException code {code}: {why[:200]}"
    elif message.mtype == harness.REPLY:
        try:
            text += f" {harness.decode_string_result(message.body)[:40]!r}"
        except (AssertionError, struct.error, UnicodeDecodeError):
            text += f" body {message.body[:16]!r}"
    return text


class FrameSocket:
    """Frames over one socket: `read_message(timeout)` raises socket.timeout (TimeoutError)
    after `timeout` and EOFError when the peer closed."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()
        self._send_lock = threading.Lock()

    def send(self, data, timeout=OP_TIMEOUT):
        with self._send_lock:
            self.sock.settimeout(timeout)
            self.sock.sendall(data)

    def read_frame(self, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 4:
                (size,) = struct.unpack(">i", self.buf[:4])
                assert 0 <= size <= 1 << 27, f"bad frame length {size}"
                if len(self.buf) >= 4 + size:
                    payload = bytes(self.buf[4 : 4 + size])
                    del self.buf[: 4 + size]
                    return payload
            left = deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout(f"no whole frame within {timeout} s")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 20)
            except ConnectionResetError as exc:
                raise EOFError("connection reset") from exc
            if not chunk:
                raise EOFError(f"EOF with {len(self.buf)} bytes of a frame buffered")
            self.buf += chunk

    def read_message(self, timeout):
        return harness.decode_message(self.read_frame(timeout))

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


# === seeing a peer let go, without reading ===

TCP_STATES = {
    1: "ESTABLISHED",
    2: "SYN_SENT",
    3: "SYN_RECV",
    4: "FIN_WAIT1",
    5: "FIN_WAIT2",
    6: "TIME_WAIT",
    7: "CLOSE",
    8: "CLOSE_WAIT",
    9: "LAST_ACK",
    10: "LISTEN",
    11: "CLOSING",
}


def tcp_state(local_port, remote_port):
    """The kernel's state of the TCP socket `local_port -> remote_port` on this host
    (/proc/net/tcp and tcp6), e.g. "ESTABLISHED"; None when there is no such socket.

    This is how a test sees that a process closed a connection whose peer never reads: the
    FIN waits behind unsent data (zero window), so the peer would never see it, but the
    closing side's socket leaves ESTABLISHED at once (FIN_WAIT1), or vanishes on a reset.
    """
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as table:
                next(table)
                for line in table:
                    parts = line.split()
                    lport = int(parts[1].rsplit(":", 1)[1], 16)
                    rport = int(parts[2].rsplit(":", 1)[1], 16)
                    if (lport, rport) == (local_port, remote_port):
                        code = int(parts[3], 16)
                        return TCP_STATES.get(code, str(code))
        except FileNotFoundError:
            continue
    return None


def peer_closed(sock):
    """True when the other end of `sock` has closed or shut down its side (POLLRDHUP,
    POLLHUP or POLLERR), whatever data is still queued to be read; never blocks."""
    poller = select.poll()
    mask = POLLRDHUP | select.POLLHUP | select.POLLERR
    poller.register(sock, mask)
    return any(events & mask for _, events in poller.poll(0))


# === fake upstream ===


class Peer:
    """One connection accepted by a FakeServer."""

    def __init__(self, server, sock, index):
        self.server = server
        self.sock = sock
        self.index = index
        self.conn = FrameSocket(sock)
        self.accepted_at = time.monotonic()
        self.local = sock.getsockname()
        self.remote = sock.getpeername()
        self.error = None  # what ended the handler, if it raised
        self.info = {}  # what the handler chose to record

    @property
    def stopping(self):
        return self.server.stopping

    def remote_state(self):
        """The TCP state of the connecting process's side of this connection."""
        return tcp_state(self.remote[1], self.local[1])

    def dropped_by_remote(self):
        """True once the connecting side (the proxy) no longer holds this connection open."""
        return self.remote_state() != "ESTABLISHED"

    def messages(self, poll=0.2):
        """Yields the messages read until the server stops or the peer closes."""
        while not self.stopping:
            try:
                yield self.conn.read_message(poll)
            except socket.timeout:
                continue
            except (EOFError, OSError):
                return


class FakeServer:
    """A TCP listener on 127.0.0.1; each accepted connection becomes a `Peer`, served by
    `handler(peer)` in its own thread, or held open and never read when `handler` is None.

    `rcvbuf` sets SO_RCVBUF on the listener (inherited by accepted sockets), so a peer that
    does not read fills up after a few kB instead of megabytes.
    """

    def __init__(self, handler=None, rcvbuf=None, name="fake"):
        self.handler = handler
        self.name = name
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if rcvbuf:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.peers = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = []
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepting.start()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    @property
    def stopping(self):
        return self._stop.is_set()

    def _accept_loop(self):
        for index in itertools.count():
            while not self._stop.is_set():
                try:
                    sock, _ = self.listener.accept()
                    break
                except socket.timeout:
                    continue
                except OSError:
                    return
            else:
                return
            peer = Peer(self, sock, index)
            with self._lock:
                self.peers.append(peer)
            if self.handler is not None:
                thread = threading.Thread(target=self._serve, args=(peer,), daemon=True)
                self._threads.append(thread)
                thread.start()

    def _serve(self, peer):
        try:
            self.handler(peer)
        except Exception as exc:  # noqa: BLE001 - reported through peer.error
            if not self._stop.is_set():
                peer.error = exc

    def accepted(self):
        with self._lock:
            return list(self.peers)

    def close(self):
        self._stop.set()
        try:
            self.listener.close()
        except OSError:
            pass
        self._accepting.join(timeout=5)
        for peer in self.accepted():
            peer.conn.close()
        for thread in self._threads:
            thread.join(timeout=5)


# === fake worker (LB back side) ===


class FakeWorker:
    """A worker connected to an LB's back socket (unix path): it sends HELLO at once, then
    `handler(worker)` runs in a thread; with no handler it never reads a byte."""

    def __init__(self, back_address, pool_size, service="echo", handler=None, pid=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(OP_TIMEOUT)
        self.sock.connect(str(back_address))
        self.conn = FrameSocket(self.sock)
        self.conn.send(hello_frame(pool_size, pid or os.getpid(), service))
        self.error = None
        self._stop = threading.Event()
        self._thread = None
        if handler is not None:
            self._thread = threading.Thread(target=self._serve, args=(handler,), daemon=True)
            self._thread.start()

    @property
    def stopping(self):
        return self._stop.is_set()

    def _serve(self, handler):
        try:
            handler(self)
        except Exception as exc:  # noqa: BLE001 - reported through .error
            if not self._stop.is_set():
                self.error = exc

    def messages(self, poll=0.2):
        while not self._stop.is_set():
            try:
                yield self.conn.read_message(poll)
            except socket.timeout:
                continue
            except (EOFError, OSError):
                return

    def closed_by_lb(self):
        return peer_closed(self.sock)

    def close(self):
        self._stop.set()
        self.conn.close()
        if self._thread is not None:
            self._thread.join(timeout=5)


def echo_pings(conn, message, sent_pings=()):
    """Answers a ping from the hop (echo, unchanged); True when `message` was a heartbeat.

    A heartbeat whose seqid is in `sent_pings` is the hop's echo of our own ping: it is not
    echoed back (two echoers would ping-pong forever)."""
    if message.mtype != harness.HEARTBEAT:
        return False
    if message.seqid not in sent_pings:
        conn.send(
            harness.frame(
                harness.encode_message(message.name, message.mtype, message.seqid, message.body)
            )
        )
    return True


# === pushing bytes at a hop ===


@dataclass
class PushResult:
    """What `push` saw: bytes accepted, when (monotonic) a send first stalled and when the
    hop closed the connection, and the error that ended it."""

    sent: int = 0
    started: float = 0.0
    ended: float = 0.0
    first_stall: float | None = None
    closed_at: float | None = None
    error: str | None = None
    stalls: int = 0


def push(sock, chunk, total, deadline, stall_limit=3.0, stop=None, step=0.2, result=None):
    """Writes `chunk` again and again (a byte stream cut anywhere) until `total` bytes are
    sent, the hop accepts nothing for `stall_limit` s, the hop closes the connection,
    `deadline` (monotonic) passes or `stop` is set. Every send is bounded by `step` s.
    """
    result = result or PushResult()
    result.started = result.started or time.monotonic()
    view = memoryview(chunk)
    offset = 0
    last_progress = time.monotonic()
    goal = result.sent + total
    sock.settimeout(step)
    while result.sent < goal and time.monotonic() < deadline:
        if stop is not None and stop.is_set():
            break
        try:
            n = sock.send(view[offset : offset + (goal - result.sent)])
        except socket.timeout:
            now = time.monotonic()
            result.stalls += 1
            if result.first_stall is None:
                result.first_stall = now
            if peer_closed(sock):
                result.closed_at = now
                result.error = "closed by the hop (POLLRDHUP) while a send was blocked"
                break
            if now - last_progress >= stall_limit:
                break
            continue
        except OSError as exc:  # EPIPE, ECONNRESET: the hop closed it
            result.closed_at = time.monotonic()
            result.error = f"{type(exc).__name__}: {exc}"
            break
        result.sent += n
        offset = (offset + n) % len(chunk)
        last_progress = time.monotonic()
    result.ended = time.monotonic()
    if result.closed_at is None and peer_closed(sock):
        result.closed_at = result.ended
        result.error = result.error or "closed by the hop (POLLRDHUP)"
    return result


# === memory ===


def proc_status_kb(pid, key):
    """A `kB` line of /proc/<pid>/status (VmRSS, VmHWM, ...), in kB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class MemoryWatch:
    """Resident memory of `pid` during a test: `baseline` (VmRSS at start, in MB) and `peak`
    (the largest VmRSS sampled every 20 ms, and VmHWM when the kernel let us reset it at
    start through /proc/<pid>/clear_refs)."""

    def __init__(self, pid):
        self.pid = pid
        self.hwm_reset = False
        self.baseline = None
        self.peak = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread = None

    def _rss(self):
        return proc_status_kb(self.pid, "VmRSS") / 1024

    def start(self):
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as refs:
                refs.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self.hwm_reset = True
        except OSError:
            self.hwm_reset = False
        self.baseline = self._rss()
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._rss())
                self.samples += 1
            except (OSError, KeyError):
                return
            self._stop.wait(0.02)  # sampling period, not synchronisation

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=5)
        if self.hwm_reset:
            try:
                self.peak = max(self.peak, proc_status_kb(self.pid, "VmHWM") / 1024)
            except (OSError, KeyError):
                pass
        return self

    @property
    def growth(self):
        return self.peak - self.baseline

    def summary(self):
        return (
            f"RSS {self.baseline:.1f} MB at start, peak {self.peak:.1f} MB "
            f"(+{self.growth:.1f} MB; {self.samples} samples, VmHWM reset: {self.hwm_reset})"
        )


# === a client on another connection ===


@dataclass
class Sample:
    tag: str
    start: float
    seconds: float
    error: str | None = None


class Bystander:
    """Calls `call(conn, tag)` on a connection from `connect()` in a loop, `pause` s apart,
    until stopped; each call must return `tag`. A failed call is recorded and the connection
    opened again."""

    def __init__(self, connect, call=None, pause=0.05, name="bystander"):
        self.connect = connect
        self.call = call or (lambda conn, tag: conn.echo(tag))
        self.pause = pause
        self.name = name
        self.samples = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def _run(self):
        conn = None
        for n in itertools.count():
            if self._stop.is_set():
                break
            tag = f"{self.name}-{n}"
            start = time.monotonic()
            error = None
            try:
                if conn is None:
                    conn = self.connect()
                got = self.call(conn, tag)
                if got != tag:
                    error = f"wrong reply {got!r}"
            except Exception as exc:  # noqa: BLE001 - recorded and asserted on
                error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
                try:
                    if conn is not None:
                        conn.close()
                except Exception:  # noqa: BLE001 - it is broken anyway
                    pass
                conn = None
            self.samples.append(Sample(tag, start, time.monotonic() - start, error))
            self._stop.wait(self.pause)  # pace, not synchronisation
        if conn is not None:
            conn.close()

    def stop(self):
        self._stop.set()
        self._thread.join(timeout=30)
        return self

    def problems(self, max_seconds, min_calls=3):
        """What was wrong: too few calls, failed calls, calls slower than `max_seconds`."""
        found = []
        if len(self.samples) < min_calls:
            found.append(f"{self.name}: only {len(self.samples)} calls were made")
        for s in self.samples:
            if s.error is not None:
                found.append(f"{self.name}: {s.tag} failed after {s.seconds:.2f} s: {s.error}")
            elif s.seconds >= max_seconds:
                found.append(f"{self.name}: {s.tag} took {s.seconds:.2f} s (bound {max_seconds} s)")
        return found[:10]

    def summary(self):
        times = [s.seconds for s in self.samples]
        worst = max(times) if times else float("nan")
        failed = sum(1 for s in self.samples if s.error is not None)
        return f"{self.name}: {len(times)} calls, {failed} failed, slowest {worst:.3f} s"
