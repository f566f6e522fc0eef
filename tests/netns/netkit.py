"""Hosts as network namespaces, for the many-hosts test: no pytest in here.

- `Topology`: a "switch" namespace holding a bridge (`br0`, 10.77.0.254/24) and one namespace
  per host, each linked to the bridge by a veth pair (`eth0` in the host, 10.77.0.<n>/24).
  Nothing is added to the root namespace; deleting the namespaces removes every link.
- `in_netns(name)`: runs a block of the *calling thread* inside a namespace (setns(2) is per
  thread), so the test process itself can open sockets there (ZooKeeper four-letter words,
  a kazoo observer whose threads are started inside and so stay there).
- `ZkNode`: one member of a ZooKeeper ensemble (QuorumPeerMain) inside a host namespace.
- `NsWorker`, `ns_wrapper`: the harness's workers and binaries, run with `ip netns exec`.
- `NsLoad`: tests/netns/nsload.py (the load generator) inside a namespace, driven over its
  stdin and stdout (JSON lines).

`ip netns exec` execs the command in place, so a Popen's pid is the process itself and
signals reach it directly. It keeps the file system: unix socket paths are shared by every
namespace, so each host gets its own directory.
"""

import contextlib
import ctypes
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import harness

CLONE_NEWNET = 0x40000000
NSLOAD = Path(__file__).resolve().parent / "nsload.py"
_libc = ctypes.CDLL(None, use_errno=True)


class NetnsUnavailable(Exception):
    """Network namespaces cannot be made here; the message says why."""


def ip_cmd():
    return shutil.which("ip") or "/usr/sbin/ip"


def _run(*args, check=True):
    result = subprocess.run(
        [ip_cmd(), *args], capture_output=True, text=True, timeout=30, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {result.stderr.strip()}")
    return result


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(name):
    """Moves the calling thread into network namespace `name` for the block.

    Sockets made inside stay in that namespace afterwards, and threads started inside are
    born there.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(target)
    finally:
        os.close(own)


def kill_inside(ns):
    """SIGKILLs what still runs in namespace `ns` (only a test's own processes run there)."""
    for pid in _run("netns", "pids", ns, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def delete_stale(prefix_root="rpcns-"):
    """Deletes namespaces of earlier runs (`rpcns-<pid>-...`) whose pid is gone, with what
    still runs in them (a run killed before its teardown)."""
    listing = _run("netns", "list", check=False).stdout
    for line in listing.splitlines():
        name = line.split()[0] if line.split() else ""
        match = re.match(rf"{re.escape(prefix_root)}(\d+)-", name)
        if match and not Path(f"/proc/{match.group(1)}").exists():
            kill_inside(name)
            _run("netns", "del", name, check=False)


class Topology:
    """`hosts` namespaces on one bridged /24, plus the switch namespace."""

    def __init__(self, prefix, hosts=3, subnet="10.77.0"):
        self.prefix = prefix
        self.switch = f"{prefix}-sw"
        self.hosts = [f"{prefix}-h{n}" for n in range(1, hosts + 1)]
        self.ips = [f"{subnet}.{n}" for n in range(1, hosts + 1)]
        self.switch_ip = f"{subnet}.254"
        self.created = []

    def create(self):
        """Builds everything; raises NetnsUnavailable when the first namespace cannot be
        made, RuntimeError on a later failure."""
        first = _run("netns", "add", self.switch, check=False)
        if first.returncode != 0:
            raise NetnsUnavailable(f"`ip netns add` failed: {first.stderr.strip()}")
        self.created.append(self.switch)
        for host in self.hosts:
            _run("netns", "add", host)
            self.created.append(host)
        sw = self.switch
        _run("-n", sw, "link", "set", "lo", "up")
        _run("-n", sw, "link", "add", "br0", "type", "bridge", "stp_state", "0")
        _run("-n", sw, "addr", "add", f"{self.switch_ip}/24", "dev", "br0")
        _run("-n", sw, "link", "set", "br0", "up")
        for n, (host, ip) in enumerate(zip(self.hosts, self.ips), start=1):
            port = f"p{n}"
            _run("-n", host, "link", "add", "eth0", "type", "veth", "peer", "name", port,
                 "netns", sw)  # fmt: skip
            _run("-n", sw, "link", "set", port, "master", "br0")
            _run("-n", sw, "link", "set", port, "up")
            _run("-n", host, "addr", "add", f"{ip}/24", "dev", "eth0")
            _run("-n", host, "link", "set", "eth0", "up")
            _run("-n", host, "link", "set", "lo", "up")

    def destroy(self):
        """Deletes the namespaces (their veth pairs and the bridge go with them), killing
        whatever a failed teardown left running inside."""
        for name in reversed(self.created):
            kill_inside(name)
            _run("netns", "del", name, check=False)
        self.created = []


def ns_wrapper(path, ns, binary):
    """A script at `path` that runs `binary` inside `ns` (exec all the way down)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec {ip_cmd()} netns exec {ns} {binary} "$@"\n')
    path.chmod(0o755)
    return path


# === ZooKeeper ensemble ===


def zk_classpath():
    """As tests/e2e: $RPC_TEST_ZK_JAR or Debian's zookeeper.jar, plus log4j when present."""
    parts = [os.environ.get("RPC_TEST_ZK_JAR", "/usr/share/java/zookeeper.jar")]
    for extra in ("/usr/share/java/slf4j-log4j12.jar", "/usr/share/java/log4j-1.2.jar"):
        if os.path.exists(extra):
            parts.append(extra)
    return ":".join(parts)


def four_letter(ns, host, port, word, timeout=1.0):
    """The answer to a four-letter word, asked from namespace `ns` (bounded)."""
    with in_netns(ns):
        sock = socket.create_connection((host, port), timeout=timeout)
    with sock:
        sock.settimeout(timeout)
        sock.sendall(word.encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode(errors="replace")


class ZkNode:
    """ZooKeeper server `myid` of an ensemble, in namespace `ns`, client port on `ip`."""

    CLIENT_PORT = 2181

    def __init__(self, myid, ns, ip, base_dir, servers, observer_ns, tick_ms=250):
        self.myid, self.ns, self.ip = myid, ns, ip
        self.base_dir = Path(base_dir)
        self.servers = servers  # [(myid, ip)]
        self.observer_ns = observer_ns
        self.tick_ms = tick_ms
        self.proc = None
        self.log_path = self.base_dir / "zk.log"

    @property
    def address(self):
        return f"{self.ip}:{self.CLIENT_PORT}"

    def _write_config(self):
        data_dir = self.base_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        (data_dir / "myid").write_text(f"{self.myid}\n")
        lines = [
            f"tickTime={self.tick_ms}",
            "initLimit=20",
            "syncLimit=8",
            "minSessionTimeout=500",
            "maxSessionTimeout=60000",
            f"dataDir={data_dir}",
            f"clientPort={self.CLIENT_PORT}",
            f"clientPortAddress={self.ip}",
            "admin.enableServer=false",
            "4lw.commands.whitelist=srvr,ruok,mntr,cons",
            "maxClientCnxns=0",
            "forceSync=no",
            "cnxTimeout=1000",
        ]
        lines += [f"server.{sid}={ip}:2888:3888" for sid, ip in self.servers]
        cfg = self.base_dir / "zoo.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        return cfg

    def start(self):
        self.base_dir.mkdir(parents=True, exist_ok=True)
        cfg = self._write_config()
        cmd = [ip_cmd(), "netns", "exec", self.ns, "java", "-Xmx256m", "-XX:+UseSerialGC"]
        cmd += ["-XX:TieredStopAtLevel=1", "-Dzookeeper.admin.enableServer=false"]
        log4j = "/etc/zookeeper/conf/log4j.properties"
        if os.path.exists(log4j):
            cmd += [f"-Dlog4j.configuration=file:{log4j}", "-Dzookeeper.root.logger=INFO,CONSOLE"]
        cmd += ["-cp", zk_classpath(), "org.apache.zookeeper.server.quorum.QuorumPeerMain"]
        cmd.append(str(cfg))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        return self

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def ask(self, word):
        return four_letter(self.observer_ns, self.ip, self.CLIENT_PORT, word)

    def mode(self):
        """`leader`, `follower`, or None (not serving, not reachable, not running)."""
        if not self.running():
            return None
        try:
            text = self.ask("srvr")
        except OSError:
            return None
        match = re.search(r"^Mode: (\w+)", text, re.M)
        return match.group(1) if match else None

    def sessions(self):
        """{session id: client ip} of the client connections this server holds."""
        found = {}
        pattern = r"/([\d.]+):\d+\[\d+\]\([^)]*?sid=(0x[0-9a-f]+)"
        for match in re.finditer(pattern, self.ask("cons")):
            found[int(match.group(2), 16)] = match.group(1)
        return found

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)

    def log_tail(self, limit=3000):
        return harness._tail(harness._read(self.log_path), limit)


def wait_quorum(nodes, timeout, followers):
    """Waits until `nodes` show exactly one leader and `followers` followers; returns the
    modes {myid: mode}."""

    def modes():
        return {node.myid: node.mode() for node in nodes}

    def ready():
        for node in nodes:
            if node.proc is not None and node.proc.poll() is not None:
                raise RuntimeError(f"ZooKeeper {node.myid} exited:\n{node.log_tail()}")
        got = list(modes().values())
        return got.count("leader") == 1 and got.count("follower") == followers

    harness.wait_until(ready, timeout, lambda: f"ZooKeeper quorum (modes {modes()})", interval=0.2)
    return modes()


# === workers and load inside namespaces ===


class NsWorker(harness.Worker):
    """worker-py/tests/echo_worker.py run inside namespace `ns`."""

    def __init__(self, ns, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ns = ns

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(self.gen_dir))
        cmd = [ip_cmd(), "netns", "exec", self.ns, sys.executable, str(harness.ECHO_WORKER)]
        cmd += [self.address, "--name", self.name, "--pool-size", str(self.pool_size)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        return self


class NsLoad:
    """nsload.py inside namespace `ns`: `threads` clients of the proxy at `address`.

    Commands go to its stdin (`phase NAME`, `stop`); it answers with JSON lines (`ready`,
    `phase`, `progress` every 100 ms, `summary`), which a reader thread collects.
    """

    def __init__(self, ns, gen_dir, address, log_path, threads=6):
        self.ns, self.gen_dir, self.address = ns, Path(gen_dir), address
        self.log_path = Path(log_path)
        self.threads = threads
        self.proc = None
        self.progress = {"ok": 0, "failed": 0, "phase": None, "seen": []}
        self.events = []
        self.summary = None
        self._lock = threading.Lock()
        self._reader = None

    def start(self, timeout=30):
        cmd = [ip_cmd(), "netns", "exec", self.ns, sys.executable, str(NSLOAD)]
        cmd += ["--gen-dir", str(self.gen_dir), "--address", self.address]
        cmd += ["--threads", str(self.threads)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
            )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._wait_event("ready", timeout)
        return self

    def _read(self):
        for line in self.proc.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            with self._lock:
                if event.get("event") == "progress":
                    self.progress = event
                elif event.get("event") == "summary":
                    self.summary = event
                    self.events.append(event)
                else:
                    self.events.append(event)

    def _check_alive(self):
        if self.proc.poll() is not None and self.summary is None:
            raise RuntimeError(
                f"nsload exited with {self.proc.returncode}:\n{harness._read(self.log_path)}"
            )

    def _wait_event(self, kind, timeout, **fields):
        def found():
            with self._lock:
                for event in self.events:
                    if event.get("event") == kind and all(
                        event.get(k) == v for k, v in fields.items()
                    ):
                        return event
            self._check_alive()
            return None

        return harness.wait_until(found, timeout, f"nsload event {kind} {fields}")

    def _send(self, line):
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def phase(self, name, timeout=10):
        """Starts phase `name`: calls begun from now on are counted under it."""
        self._send(f"phase {name}")
        self._wait_event("phase", timeout, name=name)

    def ok(self):
        with self._lock:
            return self.progress["ok"]

    def wait_calls(self, count, timeout=30):
        start = self.ok()

        def done():
            self._check_alive()
            return self.ok() >= start + count

        harness.wait_until(done, timeout, lambda: f"{count} more calls ({self.progress})")

    def wait_seen(self, names, timeout=30):
        """Waits until every name in `names` answered `whoami` in the current phase."""

        def done():
            self._check_alive()
            with self._lock:
                return set(names) <= set(self.progress["seen"])

        harness.wait_until(done, timeout, lambda: f"whoami from {sorted(names)} ({self.progress})")

    def stop(self, timeout=60):
        """Stops the clients; returns the summary {phases: {name: counts}, ok, failed}."""
        self._send("stop")
        self.proc.stdin.close()
        self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        assert self.summary is not None, f"no summary from nsload:\n{harness._read(self.log_path)}"
        return self.summary

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
