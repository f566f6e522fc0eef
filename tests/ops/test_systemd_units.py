"""systemd/rpc_proxy.service, systemd/rpc_proxy.socket and systemd/rpc_lb@.service (CONTRACT
sections 8 and 9): they pass `systemd-analyze verify` (the repo's copies apart from binaries
absent on a build box, the installed copies with no message at all), carry the settings the
issues ask for, and their ExecStart lines, run by hand with $NOTIFY_SOCKET set as systemd
would, start a binary that sends READY=1, then STOPPING=1 and exits 0 on SIGTERM. The LB unit
runs its Python workers itself (`worker_command`, issue 14): its sandbox leaves them what
Python needs, ExecReload sends SIGHUP, and its ExecStart starts the workers as its children
and stops them with it. The proxy takes its socket from rpc_proxy.socket (issue 15): run by
tests/ops/socket_holder.py, which passes a socket the way systemd does (PID 1 here is not
systemd), the proxy serves that socket, never unlinks it, and a connection made while no
proxy runs is served by the next one."""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from opskit import REPO, SYSTEMD, alive, clean_env, exe_of, free_port, ping, show, wait_until

UNITS = {
    "rpc_proxy.socket": "rpc_proxy.socket",
    "rpc_proxy.service": "rpc_proxy.service",
    "rpc_lb@.service": "rpc_lb@echo.service",
}
SOCKET_HOLDER = Path(__file__).resolve().parent / "socket_holder.py"
# The one kind of message a build box may give: the binaries are not installed there.
ABSENT_BINARY = re.compile(
    r"^rpc_(proxy|lb@echo)\.service: Command /usr/local/rpc_proxy/bin/rpc_(proxy|lb) "
    r"is not executable: No such file or directory$"
)


def parse_unit(path):
    """{(section, key): [values]} of a unit file; comments and blank lines skipped."""
    entries, section = {}, None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault((section, key.strip()), []).append(value.strip())
    return entries


def one(unit, section, key):
    values = unit.get((section, key))
    assert values and len(values) == 1, f"[{section}] {key}= should be set once: {values}"
    return values[0]


@pytest.fixture(scope="module")
def analyze(tmp_path_factory):
    """The systemd-analyze binary, once it is shown to verify a unit at all here."""
    exe = shutil.which("systemd-analyze")
    if exe is None:
        pytest.skip("systemd-analyze not installed (Debian package `systemd`)")
    probe = tmp_path_factory.mktemp("probe")
    good, bad = probe / "good.service", probe / "bad.service"
    good.write_text("[Service]\nType=oneshot\nExecStart=/bin/true\n")
    bad.write_text("[Service]\nType=notify\nExecStart=relative/path\n")
    ok = subprocess.run([exe, "verify", "--man=no", str(good)], capture_output=True, text=True)
    if ok.returncode != 0 or ok.stdout.strip() or ok.stderr.strip():
        pytest.skip(f"systemd-analyze verify cannot run on this box: {show(ok)}")
    flawed = subprocess.run([exe, "verify", "--man=no", str(bad)], capture_output=True, text=True)
    assert flawed.returncode != 0, "systemd-analyze verify accepts a broken unit: no check"
    return exe


def verify(analyze, *paths):
    result = subprocess.run(
        [analyze, "verify", "--man=no", *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [x for x in (result.stdout + result.stderr).splitlines() if x.strip()]
    return result, lines


def install(tmp, build_dir, **env):
    result = subprocess.run(
        [str(REPO / "scripts" / "install.sh"), str(tmp / "prefix")],
        env=clean_env(BUILD_DIR=build_dir, UNIT_DIR=tmp / "units", CREATE_USER=0, **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, show(result)
    return tmp / "prefix", tmp / "units"


def test_repo_units_pass_verify(analyze, tmp_path):
    for src, name in UNITS.items():
        shutil.copy(SYSTEMD / src, tmp_path / name)
    result, lines = verify(analyze, *(tmp_path / name for name in UNITS.values()))
    unexpected = [x for x in lines if not ABSENT_BINARY.match(x)]
    assert not unexpected, show(result)
    if lines:
        print("accepted on a build box:", *lines, sep="\n  ")


def test_installed_units_pass_verify_cleanly(analyze, short_dir, build_dir):
    _, units = install(short_dir, build_dir)
    shutil.copy(units / "rpc_lb@.service", units / "rpc_lb@echo.service")
    result, lines = verify(
        analyze,
        units / "rpc_proxy.socket",
        units / "rpc_proxy.service",
        units / "rpc_lb@echo.service",
    )
    assert result.returncode == 0 and not lines, show(result)


@pytest.mark.parametrize(
    ("unit", "stop_timeout"), [("rpc_proxy.service", 20), ("rpc_lb@.service", 35)]
)
def test_unit_settings(unit, stop_timeout):
    u = parse_unit(SYSTEMD / unit)
    svc = "Service"
    assert one(u, svc, "Type") == "notify"
    assert one(u, svc, "NotifyAccess") == "main"
    assert one(u, svc, "Restart") == "on-failure"
    assert set(one(u, svc, "RestartPreventExitStatus").split()) == {"64", "78"}
    assert one(u, svc, "KillSignal") == "SIGTERM"
    assert int(one(u, svc, "TimeoutStopSec")) == stop_timeout
    assert one(u, svc, "User") == "rpc" and one(u, svc, "Group") == "rpc"
    assert one(u, svc, "NoNewPrivileges") == "yes"
    assert one(u, svc, "ProtectSystem") == "strict"
    assert one(u, svc, "ProtectHome") == "yes"
    # Sockets and logs live in the prefix, which must stay writable under ProtectSystem.
    assert "/usr/local/rpc_proxy" in one(u, svc, "ReadWritePaths").split()
    assert one(u, svc, "PrivateTmp") == "no"
    assert "AF_UNIX" in one(u, svc, "RestrictAddressFamilies").split()
    assert one(u, "Install", "WantedBy") == "multi-user.target"
    argv = shlex.split(one(u, svc, "ExecStart"))
    assert argv[0].startswith("/usr/local/rpc_proxy/bin/rpc_")
    assert argv[argv.index("-L") + 1].startswith("/usr/local/rpc_proxy/log/")
    if unit.startswith("rpc_lb@"):
        assert argv[argv.index("-c") + 1] == "/usr/local/rpc_proxy/lb/%i.ini"
        assert "%i" in argv[argv.index("-L") + 1]


def test_proxy_socket_unit():
    """Socket activation (CONTRACT section 9): the socket unit listens where config.ini.example
    puts proxy_address, with the mode and group of a socket the proxy binds itself, and the
    service needs it (a restart queues connections in its backlog instead of refusing them)."""
    sock = parse_unit(SYSTEMD / "rpc_proxy.socket")
    svc = parse_unit(SYSTEMD / "rpc_proxy.service")
    example = (REPO / "config.ini.example").read_text()
    address = re.search(r"^proxy_address=(.+)$", example, re.M).group(1).strip()
    assert one(sock, "Socket", "ListenStream") == address
    assert one(sock, "Socket", "SocketMode") == "0660"
    assert one(sock, "Socket", "SocketGroup") == one(svc, "Service", "Group")
    assert one(sock, "Socket", "SocketUser") == one(svc, "Service", "User")
    assert one(sock, "Socket", "Accept") == "no"
    assert one(sock, "Install", "WantedBy") == "sockets.target"
    assert "rpc_proxy.socket" in one(svc, "Unit", "Requires").split()
    assert "rpc_proxy.socket" in one(svc, "Unit", "After").split()
    assert one(svc, "Service", "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_lb_unit_suits_python_workers():
    """Workers are the LB unit's children (no worker units): what breaks Python is off."""
    u = parse_unit(SYSTEMD / "rpc_lb@.service")
    svc = "Service"
    assert one(u, svc, "ExecReload") == "/bin/kill -HUP $MAINPID"
    # SIGTERM to rpc_lb alone (it stops its workers); the rest of the cgroup at its exit.
    assert one(u, svc, "KillMode") == "mixed"
    # ctypes/cffi callbacks need writable-executable memory.
    assert (svc, "MemoryDenyWriteExecute") not in u
    # tempfile needs a writable temporary directory.
    writable = one(u, svc, "ReadWritePaths").split()
    assert {"/tmp", "/var/tmp"} <= set(writable), writable
    assert not list(SYSTEMD.glob("*worker*")), "no separate worker units"


def exec_start(unit_path, instance):
    """The unit's ExecStart as an argv, with %i and ${VAR} expanded as systemd would."""
    unit = parse_unit(unit_path)
    env = {}
    for assignment in unit.get(("Service", "Environment"), []):
        key, _, value = assignment.partition("=")
        env[key] = value
    line = one(unit, "Service", "ExecStart").replace("%i", instance)
    # systemd: a word that is exactly ${VAR} becomes exactly one argument, even when empty.
    return [
        env[w[2:-1]] if w.startswith("${") and w.endswith("}") else w for w in shlex.split(line)
    ]


def notify_socket(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    return sock


def receive(sock, needle, timeout):
    deadline = time.monotonic() + timeout
    got = b""
    while needle.encode() not in got:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock.settimeout(left)
        try:
            got += sock.recv(4096) + b"\n"
        except socket.timeout:
            break
    return got.decode()


@pytest.mark.parametrize("unit", ["rpc_proxy.service", "rpc_lb@.service"])
def test_installed_exec_start_runs_and_notifies(unit, short_dir, build_dir):
    prefix, units = install(short_dir, build_dir)
    zk = f"zk=127.0.0.1:{free_port()}\n"
    if unit == "rpc_proxy.service":
        (prefix / "config.ini").write_text(zk + f"proxy_address={prefix}/proxy.sock\n")
        sock, log = prefix / "proxy.sock", "rpc_proxy.log"
    else:
        (prefix / "lb" / "echo.ini").write_text(
            zk + f"service=echo\nfront_host=127.0.0.1\nfront_port={free_port()}\n"
            f"back_address={prefix}/back.sock\n"
        )
        sock, log = prefix / "back.sock", "rpc_lb-echo.log"
    argv = exec_start(units / unit, "echo")
    notify = notify_socket(short_dir / "notify.sock")
    proc = subprocess.Popen(
        argv,
        env=clean_env(NOTIFY_SOCKET=short_dir / "notify.sock"),
        cwd=prefix,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        got = receive(notify, "READY=1", timeout=15)
        assert "READY=1" in got, f"no READY=1 from {argv}: {got!r}, exit {proc.poll()}"
        assert sock.is_socket(), "READY=1 came before the socket listens"
        wait_until(lambda: any(prefix.glob(f"log/{log}.*")), 10, f"{log}.* in {prefix}/log")
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in receive(notify, "STOPPING=1", timeout=10)
        assert proc.wait(timeout=35) == 0, proc.stdout.read()
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    # Exit codes the units never restart on: a bad config is 78.
    (prefix / "config.ini").write_text("zk=\n")
    (prefix / "lb" / "echo.ini").write_text("zk=\n")
    bad = subprocess.run(argv, env=clean_env(), capture_output=True, text=True, timeout=30)
    assert bad.returncode == 78, show(bad)


def environ_of(pid):
    """The environment of process `pid` ({} once it is gone)."""
    try:
        raw = (Path(f"/proc/{pid}/environ")).read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return {}
    pairs = (item.partition(b"=") for item in raw.split(b"\0") if item)
    return {k.decode(): v.decode(errors="replace") for k, _, v in pairs}


def children_of(pid):
    """Pids whose parent is `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def test_installed_lb_unit_starts_and_stops_its_workers(short_dir, build_dir):
    prefix, units = install(short_dir, build_dir)
    # A stand-in worker: it never says HELLO (boot timeout 60 s), which is all this needs.
    (prefix / "lb" / "echo.ini").write_text(
        f"zk=127.0.0.1:{free_port()}\nservice=echo\nfront_host=127.0.0.1\n"
        f"front_port={free_port()}\nback_address={prefix}/back.sock\n"
        "worker_command=/bin/sleep 300\nworker_processes=2\n"
    )
    argv = exec_start(units / "rpc_lb@.service", "echo")
    notify = notify_socket(short_dir / "notify.sock")
    proc = subprocess.Popen(
        argv,
        env=clean_env(NOTIFY_SOCKET=short_dir / "notify.sock"),
        cwd=prefix,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert "READY=1" in receive(notify, "READY=1", timeout=15)
        wait_until(lambda: len(children_of(proc.pid)) == 2, 10, "two workers of rpc_lb")
        workers = children_of(proc.pid)
        envs = [environ_of(pid) for pid in workers]
        assert sorted(e.get("RPC_WORKER_ID") for e in envs) == ["0", "1"], envs
        assert {e.get("RPC_LB_BACK_ADDRESS") for e in envs} == {f"{prefix}/back.sock"}
        assert all("NOTIFY_SOCKET" not in e for e in envs), "the LB's notify socket is its own"
        # ExecReload: SIGHUP re-reads the config, the LB stays.
        os.kill(proc.pid, signal.SIGHUP)
        wait_until(
            lambda: (
                "configuration reloaded"
                in "".join(p.read_text() for p in prefix.glob("log/rpc_lb-echo.log.*"))
            ),
            10,
            "the reload logged",
        )
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in receive(notify, "STOPPING=1", timeout=10)
        assert proc.wait(timeout=35) == 0, proc.stdout.read()
        assert not any(environ_of(pid) for pid in workers), "workers stopped with the LB"
    finally:
        notify.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def test_installed_proxy_unit_serves_the_socket_units_socket(short_dir, build_dir):
    """ExecStart under socket activation, as systemd runs it for rpc_proxy.socket: the proxy
    serves the socket it is given (READY=1, pings answered), leaves it in place when it stops,
    and the next process serves a connection that waited in the backlog meanwhile."""
    prefix, units = install(short_dir, build_dir)
    listen = one(parse_unit(units / "rpc_proxy.socket"), "Socket", "ListenStream")
    mode = one(parse_unit(units / "rpc_proxy.socket"), "Socket", "SocketMode")
    assert listen == f"{prefix}/proxy.sock"
    (prefix / "config.ini").write_text(f"zk=127.0.0.1:{free_port()}\nproxy_address={listen}\n")
    argv = exec_start(units / "rpc_proxy.service", "")
    notify = notify_socket(short_dir / "notify.sock")
    holder = subprocess.Popen(
        [sys.executable, str(SOCKET_HOLDER), "--path", listen, "--mode", mode, "--", *argv],
        env=clean_env(NOTIFY_SOCKET=short_dir / "notify.sock"),
        cwd=prefix,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        bufsize=1,
    )
    pids = []

    def command(verb):
        holder.stdin.write(verb + "\n")
        holder.stdin.flush()
        line = holder.stdout.readline().split()
        if line[:1] == ["started"]:
            pids.append(int(line[1]))
        return line

    try:
        assert holder.stdout.readline().split() == ["listening", listen]
        bound = os.stat(listen).st_ino
        assert oct(os.stat(listen).st_mode & 0o777) == oct(int(mode, 8))
        assert command("start")[0] == "started"
        assert "READY=1" in receive(notify, "READY=1", timeout=15)
        assert ping(listen, 1) == 1
        assert command("stop") == ["stopped", "0"]
        assert "STOPPING=1" in receive(notify, "STOPPING=1", timeout=10)
        assert os.stat(listen).st_ino == bound, "the proxy never unlinks a socket it was given"
        # No proxy runs: the connect still succeeds (backlog), the next process answers.
        waiting = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        waiting.settimeout(15)
        waiting.connect(listen)
        with waiting:
            assert command("start")[0] == "started"
            assert ping(listen, 7, sock=waiting) == 7
        assert "READY=1" in receive(notify, "READY=1", timeout=15)
        assert command("stop") == ["stopped", "0"]
        logs = "".join(p.read_text() for p in prefix.glob("log/rpc_proxy.log.*"))
        assert logs.count('socket="inherited"') == 2, logs
        assert "not proxy_address" not in logs, "ListenStream is proxy_address: no warning"
    finally:
        notify.close()
        if holder.poll() is None:
            holder.stdin.write("quit\n")
            holder.stdin.close()
            try:
                holder.wait(timeout=30)
            except subprocess.TimeoutExpired:
                holder.kill()
                holder.wait()
        holder.stdout.close()
        for pid in pids:
            if alive(pid) and exe_of(pid) == str((prefix / "bin" / "rpc_proxy").resolve()):
                os.kill(pid, signal.SIGKILL)
    assert os.path.exists(listen), "the socket file is the holder's (systemd's) to remove"
