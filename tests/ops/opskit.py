"""Helpers of the operations suite: where the binaries are, /proc checks that see through
zombies, bounded waits, `Control`, which runs scripts/control_proxy.sh or
scripts/control_lb.sh against one temp dir, and `ping`, a heartbeat through the proxy's socket.
"""

import os
import selectors
import signal
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
SYSTEMD = REPO / "systemd"
# Longest a control script may take: `stop` waits up to 35 s for an LB, then SIGKILL.
SCRIPT_TIMEOUT_S = 60


def binary(env_name, name):
    return Path(os.environ.get(env_name) or REPO / "target" / "debug" / name)


def require_binary(env_name, name):
    path = binary(env_name, name)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.skip(
            f"{name} not found at {path}: run `cargo build --workspace --bins` or set {env_name}"
        )
    return path


def clean_env(**extra):
    """The current environment without any RPC_PROXY_*/RPC_LB_* setting, plus `extra`."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RPC_PROXY_", "RPC_LB_", "DESTDIR", "UNIT_DIR", "BUILD_DIR"))
    }
    env.update({k: str(v) for k, v in extra.items()})
    return env


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_state(pid):
    """The state letter of a pid (R, S, T, Z, ...), or None when there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def alive(pid):
    """A pid counts as alive when it exists and is not a zombie: this box's PID 1 may never
    reap a daemon whose parent (the control script) has exited."""
    return proc_state(pid) not in (None, "Z", "X")


def exe_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
    except OSError:
        return None


def cmdline_of(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
    except OSError:
        return []


def wait_until(condition, timeout, what):
    """Polls `condition` until true; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def read_until(proc, needle, timeout):
    """Reads a child's stdout until `needle` shows up or `timeout` passes; returns the text."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    out = b""
    deadline = time.monotonic() + timeout
    try:
        while needle.encode() not in out:
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            out += chunk
    finally:
        sel.close()
    return out.decode(errors="replace")


class Control:
    """One control script (`kind` "proxy" or "lb") working in `dir`: its configs, its log dir
    (RPC_*_LOG_DIR = dir/log unless a test says otherwise) and every pid it saw, for teardown."""

    def __init__(self, kind, bin_path, dir):
        self.kind = kind
        self.bin = bin_path
        self.name = f"rpc_{kind}"
        self.prefix = f"RPC_{kind.upper()}_"
        self.script = SCRIPTS / f"control_{kind}.sh"
        self.dir = dir
        self.log_dir = dir / "log"
        self.pids = set()
        self.config = self.write_config("config.ini")

    # --- configs -------------------------------------------------------------------------

    def write_config(self, file_name, drop=None):
        """A config that starts without ZooKeeper; `drop` leaves one required key out."""
        zk = f"127.0.0.1:{free_port()}"  # nothing listens there: the binary keeps retrying
        if self.kind == "proxy":
            keys = {"zk": zk, "proxy_address": str(self.dir / "proxy.sock")}
        else:
            keys = {
                "zk": zk,
                "service": "echo",
                "front_host": "127.0.0.1",
                "front_port": str(free_port()),
                "back_address": str(self.dir / "back.sock"),
            }
        keys.pop(drop, None)
        path = self.dir / file_name
        path.write_text("".join(f"{k}={v}\n" for k, v in keys.items()))
        return path

    # --- running the script --------------------------------------------------------------

    def env(self, log_dir=True, **extra):
        env = clean_env(**{self.prefix + "BIN": self.bin})
        if log_dir:
            env[self.prefix + "LOG_DIR"] = str(self.log_dir)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def run(self, verb, *args, env=None, cwd=None, timeout=SCRIPT_TIMEOUT_S):
        result = subprocess.run(
            [str(self.script), verb, *args],
            env=env if env is not None else self.env(),
            cwd=cwd or self.dir,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        pid = self.pid()
        if pid:
            self.pids.add(pid)
        return result

    def pid_file(self, log_dir=None):
        return (log_dir or self.log_dir) / f"{self.name}.pid"

    def pid(self, log_dir=None):
        try:
            return int(self.pid_file(log_dir).read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def is_ours(self, pid):
        return alive(pid) and exe_of(pid) == str(Path(self.bin).resolve())

    def kill_all(self):
        """Kills every live process of our binary started on this test's dir: the pids seen
        in the pid file, and any other (a start that went wrong leaves no pid file)."""
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                pid = int(entry.name)
                if self.is_ours(pid) and any(str(self.dir) in a for a in cmdline_of(pid)):
                    self.pids.add(pid)
        for pid in self.pids:
            if self.is_ours(pid):
                os.kill(pid, signal.SIGKILL)


def ping(path, seqid=1, sock=None, timeout=10):
    """Sends rpc_proxy a heartbeat ("ping", type 20) on a new connection to the unix socket
    `path` (or on `sock`) and returns the reply's seqid. The proxy answers it itself, with or
    without ZooKeeper."""
    own = sock is None
    if own:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(str(path))
    try:
        name = b"ping"
        message = struct.pack(">Ii", 0x80010000 | 20, len(name)) + name
        message += struct.pack(">i", seqid) + b"\x00"
        sock.sendall(struct.pack(">i", len(message)) + message)
        size = struct.unpack(">i", recv_exact(sock, 4))[0]
        reply = recv_exact(sock, size)
        (head, name_len) = struct.unpack(">Ii", reply[:8])
        assert head == 0x80010000 | 2, f"not a REPLY: {reply!r}"
        return struct.unpack(">i", reply[8 + name_len : 12 + name_len])[0]
    finally:
        if own:
            sock.close()


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def show(result):
    """A CompletedProcess as text, for assertion messages."""
    return f"exit {result.returncode}\n--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
