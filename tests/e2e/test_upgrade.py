"""Zero-downtime upgrades of rpc_proxy (issue 15, CONTRACT section 9 "Zero downtime and
reload"): restarting the proxy under load refuses no client and fails no call.

Real ZooKeeper, a real echo backend and rpc_proxy; the load is 8 threads of Thrift-generated
clients that open a new connection per call (as short-lived Python scripts and PHP-style
callers do) and never retry, through the proxy's unix socket. Every call either returns its
own argument or counts as failed; the counts are printed.

1. Without systemd: `scripts/control_proxy.sh restart`, three times, with the admin endpoint
   on. Each starts a new process with `--takeover`, which renames its socket over the path,
   then stops the old one, which serves what it accepted or had queued and leaves the new
   socket file alone; the new process binds the admin port once the old one has let it go.
2. Socket activation: PID 1 here is not systemd, so tests/ops/socket_holder.py stands in for
   it: it holds the listening socket and starts the proxy with `LISTEN_FDS`/`LISTEN_PID`, then
   restarts it (SIGTERM, wait for the exit, start again) three times, as
   `systemctl restart rpc_proxy` does. Connections made while no proxy runs wait in the
   socket's backlog; the socket file is never replaced nor removed.
3. The inherited socket wins over proxy_address (with a warning); `--takeover` is in `--help`
   and refused (64) for a TCP proxy_address.
"""

import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import harness

CLIENTS = 8
RESTARTS = 3
# Calls that must succeed between two restarts: each new process serves before the next.
CALLS_BETWEEN = 100
CONTROL = harness.REPO_ROOT / "scripts" / "control_proxy.sh"
SOCKET_HOLDER = harness.REPO_ROOT / "tests" / "ops" / "socket_holder.py"


class Load:
    """`CLIENTS` threads, each calling `echo` on a new connection per call until stopped."""

    def __init__(self, idl, address):
        self.idl, self.address = idl, address
        self.lock = threading.Lock()
        self.calls = self.failed = 0
        self.errors = []  # the first failures, for the assertion message
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(CLIENTS)]

    def _run(self, client):
        n = 0
        while not self.stopping.is_set():
            n += 1
            text = f"c{client}-{n}"
            try:
                conn = harness.EchoConnection(self.idl, self.address, timeout=20)
                try:
                    ok = conn.echo(text) == text
                finally:
                    conn.close()
                error = None if ok else f"{text}: wrong reply"
            except Exception as exc:  # noqa: BLE001 - every failure is counted and shown
                error = f"{text}: {exc!r}"
            with self.lock:
                self.calls += 1
                if error is not None:
                    self.failed += 1
                    if len(self.errors) < 10:
                        self.errors.append(error)

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=60)

    def count(self):
        with self.lock:
            return self.calls

    def wait_for_more(self, calls, what):
        """Waits until `calls` more calls have ended (they may have failed: checked at the end)."""
        start = self.count()
        harness.wait_until(lambda: self.count() >= start + calls, 30, what, interval=0.05)

    def summary(self):
        return f"{self.calls} calls, {self.failed} failed"


def seconds(durations):
    return ", ".join(f"{d:.2f}" for d in durations) + " s"


def report(capsys, line):
    with capsys.disabled():
        print(f"\n{line}")


def wait_serving(idl, address, timeout=20):
    def served():
        with harness.EchoConnection(idl, address, timeout=5) as conn:
            return conn.echo("ready") == "ready"

    harness.wait_until(served, timeout, f"a call through {address} succeeds")


def healthz(address):
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as reply:
            return reply.status
    except urllib.error.HTTPError as exc:
        return exc.code


def alive(pid):
    """True while `pid` runs (a zombie does not count: PID 1 here may never reap it)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def inode(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_control_script_restart_under_load_fails_no_call(
    echo_idl, backends, proxies, proxy_bin, workdir, capsys
):
    backends.start("A")
    directory = workdir / "ctl"
    directory.mkdir()
    config = directory / "config.ini"
    # With an admin endpoint: its port is the old process's until it exits.
    admin = f"127.0.0.1:{harness.free_port()}"
    harness.write_config(config, proxies.settings(directory, admin_address=admin))
    address = str(directory / "proxy.sock")
    env = dict(
        os.environ,
        RPC_PROXY_BIN=str(proxy_bin),
        RPC_PROXY_LOG_DIR=str(directory / "log"),
        RPC_PROXY_CONFIG=str(config),
    )
    pid_file = directory / "log" / "rpc_proxy.pid"

    def control(verb):
        result = subprocess.run(
            [str(CONTROL), verb], env=env, cwd=directory, capture_output=True, text=True, timeout=90
        )
        assert result.returncode == 0, (
            f"{verb}: exit {result.returncode}\n{result.stdout}{result.stderr}"
        )
        return result

    def logs():
        parts = [p.read_text(errors="replace") for p in sorted((directory / "log").glob("*"))]
        return harness._tail("\n".join(parts), 8000)

    pids, took = [], []
    try:
        control("start")
        pids.append(int(pid_file.read_text()))
        wait_serving(echo_idl, address)
        with Load(echo_idl, address) as load:
            load.wait_for_more(CALLS_BETWEEN, "calls before the first restart")
            for n in range(RESTARTS):
                before = inode(address)
                started = time.monotonic()
                result = control("restart")
                took.append(time.monotonic() - started)
                new = int(pid_file.read_text())
                pids.append(new)
                assert new != pids[-2], result.stdout
                assert not alive(pids[-2]), "restart returned before the old process exited"
                assert inode(address) != before, "the new process's socket is at the path"
                assert "took" in result.stdout, result.stdout
                load.wait_for_more(CALLS_BETWEEN, f"calls after restart {n + 1}\n{logs()}")
        report(
            capsys,
            f"control_proxy.sh restart x{RESTARTS} under {CLIENTS} clients (a connection per "
            f"call): {load.summary()}; restarts took {seconds(took)}",
        )
        assert load.failed == 0, f"{load.summary()}: {load.errors}\n{logs()}"
        assert load.calls >= (RESTARTS + 1) * CALLS_BETWEEN
        # The last process serves the admin endpoint once its predecessor is gone.
        harness.wait_until(lambda: healthz(admin) == 200, 10, f"/healthz 200 on {admin}")
        # Each old process left the path alone; the last one's stop removes its own file.
        assert os.path.exists(address)
        control("stop")
        assert not os.path.exists(address), "an ordinary stop removes its socket file"
    finally:
        for pid in pids:
            try:
                exe = os.readlink(f"/proc/{pid}/exe").removesuffix(" (deleted)")
                if alive(pid) and exe == str(proxy_bin.resolve()):
                    os.kill(pid, 9)
            except OSError:
                pass


class Holder:
    """tests/ops/socket_holder.py running the proxy, driven by its stdin commands."""

    def __init__(self, path, command, log_path):
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(SOCKET_HOLDER), "--path", path, "--", *command],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                bufsize=1,
            )
        assert self.read().startswith("listening "), self.output()
        self.pid = None

    def read(self):
        line = self.proc.stdout.readline().strip()
        assert line, f"socket_holder.py said nothing more\n{self.output()}"
        return line

    def send(self, verb):
        self.proc.stdin.write(verb + "\n")
        self.proc.stdin.flush()

    def start(self):
        self.send("start")
        self.pid = int(self.read().split()[1])

    def restart(self):
        self.send("restart")
        stopped = self.read()
        self.pid = int(self.read().split()[1])
        return int(stopped.split()[1])

    def output(self):
        return harness._tail(harness._read(self.log_path), 8000)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        if self.pid is not None:
            try:
                os.kill(self.pid, 9)
            except OSError:
                pass


def test_socket_activation_restart_under_load_fails_no_call(
    echo_idl, backends, proxies, proxy_bin, workdir, capsys
):
    backends.start("A")
    directory = workdir / "activated"
    directory.mkdir()
    config = directory / "config.ini"
    harness.write_config(config, proxies.settings(directory))
    address = str(directory / "proxy.sock")
    command = [str(proxy_bin), "-c", str(config), "-L", str(directory / "proxy.log")]
    holder = Holder(address, command, directory / "holder.log")
    took = []
    try:
        bound = inode(address)
        holder.start()
        wait_serving(echo_idl, address)
        with Load(echo_idl, address) as load:
            load.wait_for_more(CALLS_BETWEEN, "calls before the first restart")
            for n in range(RESTARTS):
                old = holder.pid
                started = time.monotonic()
                code = holder.restart()
                took.append(time.monotonic() - started)
                assert code == 0, f"restart {n + 1}: exit code\n{holder.output()}"
                assert holder.pid != old
                assert inode(address) == bound, "the socket file is the holder's, untouched"
                load.wait_for_more(CALLS_BETWEEN, f"calls after restart {n + 1}")
        report(
            capsys,
            f"socket activation: restart x{RESTARTS} under {CLIENTS} clients (a connection per "
            f"call): {load.summary()}; stop + start took {seconds(took)}",
        )
        assert load.failed == 0, f"{load.summary()}: {load.errors}\n{holder.output()}"
        assert load.calls >= (RESTARTS + 1) * CALLS_BETWEEN
        logs = "".join(harness._read(p) for p in sorted(directory.glob("proxy.log*")))
        assert logs.count('socket="inherited"') == RESTARTS + 1, logs[-4000:]
    finally:
        holder.close()
    assert inode(address) == bound, "no proxy removed or replaced the inherited socket"


def test_inherited_socket_wins_over_proxy_address(echo_idl, backends, proxies, proxy_bin, workdir):
    """Under socket activation the proxy serves the socket it was given, whatever
    proxy_address says, with a warning naming both, and never binds proxy_address."""
    backends.start("A")
    directory = workdir / "mismatch"
    directory.mkdir()
    config = directory / "config.ini"
    harness.write_config(config, proxies.settings(directory))  # proxy_address: proxy.sock
    address = str(directory / "elsewhere.sock")
    log = directory / "proxy.log"
    holder = Holder(address, [str(proxy_bin), "-c", str(config), "-L", str(log)], directory / "h")
    try:
        holder.start()
        wait_serving(echo_idl, address)
        assert not (directory / "proxy.sock").exists(), "proxy_address was bound too"
        text = "".join(harness._read(p) for p in sorted(directory.glob("proxy.log*")))
        assert "serving the socket passed by socket activation, not proxy_address" in text
        assert address in text
    finally:
        holder.close()
    assert os.path.exists(address), "the proxy never removes an inherited socket"


def test_takeover_flag_on_the_command_line(proxy_bin, workdir):
    """The new flag is in --help; it needs a unix socket (exit 64 otherwise, before anything
    is bound); unknown flags still exit 64."""
    help_text = subprocess.run(
        [str(proxy_bin), "--help"], capture_output=True, text=True, timeout=30
    )
    assert help_text.returncode == 0
    assert "--takeover" in help_text.stdout and "-c" in help_text.stdout
    config = workdir / "tcp.ini"
    config.write_text(f"zk=127.0.0.1:1\nproxy_address=127.0.0.1:{harness.free_port()}\n")
    tcp = subprocess.run(
        [str(proxy_bin), "-c", str(config), "--takeover"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert tcp.returncode == 64, tcp.stderr
    assert "--takeover needs a unix socket proxy_address" in tcp.stderr
    unknown = subprocess.run(
        [str(proxy_bin), "-c", str(config), "--take-over"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert unknown.returncode == 64, unknown.stderr
