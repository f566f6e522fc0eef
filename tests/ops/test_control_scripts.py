"""scripts/control_proxy.sh and scripts/control_lb.sh (CONTRACT section 8): every verb, config
from the argument or the environment, pid and log files, stale pid files. Each test runs once
per script (the `control` fixture), against the real binary."""

import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from opskit import alive, cmdline_of, exe_of, free_port, ping, read_until, show, wait_until


def start_ok(control, config=None):
    result = control.run("start", str(config or control.config))
    assert result.returncode == 0, show(result)
    pid = control.pid()
    assert pid and control.is_ours(pid), f"no live {control.name} behind the pid file\n" + show(
        result
    )
    return pid


def test_start_status_stop(control):
    pid = start_ok(control)
    assert exe_of(pid) == str(control.bin.resolve())
    # start returns once the binary listens: the socket is there without waiting.
    sock = control.dir / ("proxy.sock" if control.kind == "proxy" else "back.sock")
    assert sock.is_socket()

    status = control.run("status")
    assert status.returncode == 0, show(status)
    assert status.stdout.strip() == "running"

    stop = control.run("stop")
    assert stop.returncode == 0, show(stop)
    assert not alive(pid), "stop returned while the process still runs"
    assert not control.pid_file().exists()

    status = control.run("status")
    assert status.returncode != 0, show(status)
    assert status.stdout.strip() == "not running"


def test_pid_and_log_files_in_log_dir(control):
    pid = start_ok(control)
    assert control.pid_file().read_text().strip() == str(pid)
    logs = sorted(control.log_dir.glob(f"{control.name}.log.*"))
    assert logs, f"no -L log in {control.log_dir}: {list(control.log_dir.iterdir())}"
    assert "starting" in logs[-1].read_text()
    assert (control.log_dir / f"{control.name}.out").exists()
    args = cmdline_of(pid)
    assert args[args.index("-L") + 1] == str(control.log_dir / f"{control.name}.log")
    assert control.run("stop").returncode == 0


def test_log_dir_defaults_to_dot_log(control):
    env = control.env(log_dir=False)
    cwd = control.dir / "cwd"
    cwd.mkdir()
    result = control.run("start", str(control.config), env=env, cwd=cwd)
    assert result.returncode == 0, show(result)
    pid = control.pid(cwd / "log")
    control.pids.add(pid)
    assert pid and control.is_ours(pid)
    assert control.run("status", env=env, cwd=cwd).stdout.strip() == "running"
    assert control.run("stop", env=env, cwd=cwd).returncode == 0
    assert not alive(pid)


def test_second_start_refuses(control):
    pid = start_ok(control)
    again = control.run("start", str(control.config))
    assert again.returncode != 0, show(again)
    assert "already running" in again.stderr
    assert control.pid() == pid
    assert control.is_ours(pid)
    assert control.run("stop").returncode == 0


def test_concurrent_starts_launch_one_process(control):
    cmd = [str(control.script), "start", str(control.config)]
    procs = [
        subprocess.Popen(
            cmd, env=control.env(), cwd=control.dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(3)
    ]
    codes = [p.wait(timeout=60) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    pid = control.pid()
    control.pids.add(pid)
    assert sorted(codes) == [0, 1, 1], codes
    assert control.is_ours(pid)
    ours = [
        int(p.name)
        for p in Path("/proc").iterdir()
        if p.name.isdigit()
        and control.is_ours(int(p.name))
        and str(control.config) in cmdline_of(int(p.name))
    ]
    assert ours == [pid], "more than one process launched"
    assert control.run("stop").returncode == 0


def test_restart_gives_new_pid(control):
    old = start_ok(control)
    result = control.run("restart", str(control.config))
    assert result.returncode == 0, show(result)
    new = control.pid()
    assert new and new != old
    assert not alive(old)
    assert control.is_ours(new)
    assert control.run("status").stdout.strip() == "running"
    assert control.run("stop").returncode == 0


def test_restart_when_stopped_starts(control):
    result = control.run("restart", str(control.config))
    assert result.returncode == 0, show(result)
    assert control.is_ours(control.pid())
    assert control.run("stop").returncode == 0


def test_stop_when_not_running_succeeds(control):
    result = control.run("stop")
    assert result.returncode == 0, show(result)
    assert "not running" in result.stdout


def test_tail_follows_the_log(control):
    start_ok(control)
    tail = subprocess.Popen(
        [str(control.script), "tail"],
        env=control.env(),
        cwd=control.dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        out = read_until(tail, f"{control.name} starting", timeout=10)
        assert tail.poll() is None, "tail exited instead of following"
    finally:
        tail.kill()
        tail.wait()
    assert f"{control.name} starting" in out, out
    assert control.run("stop").returncode == 0


def test_start_with_bad_config_fails_clearly(control):
    key = "proxy_address" if control.kind == "proxy" else "service"
    bad = control.write_config("bad.ini", drop=key)
    result = control.run("start", str(bad))
    assert result.returncode == 78, show(result)
    assert "failed to start" in result.stderr and "exit code 78" in result.stderr
    assert key in result.stderr, "the binary's message naming the key is shown"
    assert not control.pid_file().exists()
    status = control.run("status")
    assert status.returncode != 0 and status.stdout.strip() == "not running"


def test_start_with_missing_config_file_fails(control):
    result = control.run("start", str(control.dir / "nope.ini"))
    assert result.returncode == 78, show(result)
    assert "nope.ini" in result.stderr
    assert not control.pid_file().exists()


def test_config_from_environment(control):
    other = control.write_config("from_env.ini")
    env = control.env(**{control.prefix + "CONFIG": other})
    result = control.run("start", env=env)
    assert result.returncode == 0, show(result)
    pid = control.pid()
    assert str(other) in cmdline_of(pid)
    assert control.run("stop", env=env).returncode == 0


def test_relative_config_argument(control):
    result = control.run("start", "config.ini")
    assert result.returncode == 0, show(result)
    assert str(control.config) in cmdline_of(control.pid())
    assert control.run("stop").returncode == 0


def test_stale_pid_file_of_a_dead_process(control):
    dead = subprocess.Popen(["true"])
    dead.wait()
    control.log_dir.mkdir()
    control.pid_file().write_text(f"{dead.pid}\n")

    status = control.run("status")
    assert status.returncode != 0 and status.stdout.strip() == "not running", show(status)
    pid = start_ok(control)
    assert pid != dead.pid
    assert control.run("stop").returncode == 0


def test_stale_pid_file_of_an_unrelated_process(control):
    unrelated = subprocess.Popen(["sleep", "300"])
    try:
        control.log_dir.mkdir()
        control.pid_file().write_text(f"{unrelated.pid}\n")

        status = control.run("status")
        assert status.returncode != 0 and status.stdout.strip() == "not running", show(status)
        stop = control.run("stop")
        assert stop.returncode == 0, show(stop)
        assert unrelated.poll() is None, "stop killed a process that is not ours"

        control.pid_file().write_text(f"{unrelated.pid}\n")
        pid = start_ok(control)
        assert pid != unrelated.pid
        assert control.run("status").stdout.strip() == "running"
        assert control.run("stop").returncode == 0
        assert unrelated.poll() is None
    finally:
        unrelated.kill()
        unrelated.wait()


def sigterm_pending(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("ShdPnd:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def test_stop_waits_until_the_process_is_gone(control):
    pid = start_ok(control)
    os.kill(pid, signal.SIGSTOP)  # frozen: SIGTERM stays pending until SIGCONT
    stop = subprocess.Popen(
        [str(control.script), "stop"],
        env=control.env(),
        cwd=control.dir,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: sigterm_pending(pid), 10, "stop to send SIGTERM")
        with pytest.raises(subprocess.TimeoutExpired):
            stop.wait(timeout=1)  # must still be waiting: the process is alive
        os.kill(pid, signal.SIGCONT)
        out, err = stop.communicate(timeout=40)
        assert stop.returncode == 0, f"{out}{err}"
        assert not alive(pid), "stop returned while the process still runs"
    finally:
        if stop.poll() is None:
            stop.kill()
            stop.communicate()


def test_stop_kills_a_process_that_does_not_exit(control):
    pid = start_ok(control)
    os.kill(pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    env = control.env(**{control.prefix + "STOP_TIMEOUT": 1})
    result = control.run("stop", env=env)
    assert result.returncode != 0, show(result)
    assert "SIGKILL" in result.stderr
    assert not alive(pid)
    assert control.run("status").stdout.strip() == "not running"


def test_missing_binary_is_reported(control):
    env = control.env(**{control.prefix + "BIN": control.dir / "no" / control.name})
    result = control.run("start", str(control.config), env=env)
    assert result.returncode != 0, show(result)
    assert control.prefix + "BIN" in result.stderr
    assert not control.pid_file().exists()


@pytest.mark.parametrize("args", [[], ["bogus"], ["start", "a.ini", "extra"]])
def test_bad_usage_exits_64(control, args):
    result = subprocess.run(
        [str(control.script), *args], env=control.env(), capture_output=True, text=True
    )
    assert result.returncode == 64, show(result)
    assert "usage" in result.stderr


# --- rpc_lb only ---------------------------------------------------------------------------


def test_lb_gets_work_dir_and_code_version(lb_control):
    env = lb_control.env(RPC_LB_CODE_VERSION="v42")
    result = lb_control.run("start", str(lb_control.config), env=env)
    assert result.returncode == 0, show(result)
    args = cmdline_of(lb_control.pid())
    assert args[args.index("--work-dir") + 1] == str(lb_control.dir)
    assert args[args.index("--code-url-version") + 1] == "v42"
    assert lb_control.run("stop").returncode == 0


def test_lb_without_code_version_passes_none(lb_control):
    pid = start_ok(lb_control)
    assert "--code-url-version" not in cmdline_of(pid)
    assert lb_control.run("stop").returncode == 0


def test_lb_default_config_is_dot_config_ini(lb_control):
    product = lb_control.dir / "product"
    product.mkdir()
    (product / "config.ini").write_text(lb_control.config.read_text())
    result = lb_control.run("start", env=lb_control.env(), cwd=product)
    assert result.returncode == 0, show(result)
    args = cmdline_of(lb_control.pid())
    assert args[args.index("-c") + 1] == str(product / "config.ini")
    assert args[args.index("--work-dir") + 1] == str(product)
    assert lb_control.run("stop", cwd=product).returncode == 0


# --- rpc_proxy restart: a handover (issue 15) ---------------------------------------------


def inode(path):
    st = os.stat(path)
    return st.st_dev, st.st_ino


def test_proxy_restart_hands_the_socket_over(proxy_control):
    """restart starts the new process with --takeover, which renames its socket over the
    path; the old one serves the connection it holds, leaves the new file alone and exits."""
    sock = proxy_control.dir / "proxy.sock"
    old = start_ok(proxy_control)
    before = inode(sock)
    held = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    held.settimeout(10)
    held.connect(str(sock))
    try:
        assert ping(sock, 1, sock=held) == 1
        result = proxy_control.run("restart", str(proxy_control.config))
        assert result.returncode == 0, show(result)
        new = proxy_control.pid()
        assert new != old and proxy_control.is_ours(new)
        assert "--takeover" in cmdline_of(new)
        assert not alive(old), "restart returned before the old process exited"
        assert f"took {sock} over" in result.stdout, show(result)
        assert inode(sock) != before, "the path names the new process's socket"
        # The old process answered on its connection until it stopped, then closed it.
        assert held.recv(1) == b""
    finally:
        held.close()
    assert ping(sock, 2) == 2, "the new process serves the path"
    assert proxy_control.run("status").stdout.strip() == "running"
    logs = "".join(p.read_text() for p in proxy_control.log_dir.glob("rpc_proxy.log.*"))
    assert 'socket="taken over"' in logs
    # An ordinary stop removes the stopping process's own socket file.
    assert proxy_control.run("stop").returncode == 0
    assert not sock.exists()


def test_proxy_restart_keeps_the_old_one_when_the_new_one_fails(proxy_control):
    sock = proxy_control.dir / "proxy.sock"
    old = start_ok(proxy_control)
    before = inode(sock)
    with proxy_control.config.open("a") as config:
        config.write("max_connections=many\n")
    result = proxy_control.run("restart", str(proxy_control.config))
    assert result.returncode == 78, show(result)
    assert "max_connections" in result.stderr and f"pid {old}" in result.stderr, show(result)
    assert proxy_control.pid() == old and proxy_control.is_ours(old)
    assert inode(sock) == before and ping(sock) == 1, "the old process still serves"
    assert proxy_control.run("stop").returncode == 0


def test_proxy_restart_hands_the_admin_endpoint_over(proxy_control):
    """The admin port is the old process's until it exits: the new one binds it then."""
    port = free_port()
    with proxy_control.config.open("a") as config:
        config.write(f"admin_address=127.0.0.1:{port}\n")
    start_ok(proxy_control)
    result = proxy_control.run("restart", str(proxy_control.config))
    assert result.returncode == 0, show(result)
    new = proxy_control.pid()

    def admin_pid():
        # The pid whose socket listens on the admin port, by its inode in /proc/net/tcp.
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
                inode = fields[9]
                for fd in Path(f"/proc/{new}/fd").iterdir():
                    try:
                        if os.readlink(fd) == f"socket:[{inode}]":
                            return new
                    except OSError:
                        pass
        return None

    wait_until(lambda: admin_pid() == new, 10, "the new process serving the admin endpoint")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        assert conn.recv(64).startswith(b"HTTP/1."), "the admin endpoint answers"
    assert proxy_control.run("stop").returncode == 0


def test_proxy_restart_of_a_tcp_address_stops_then_starts(proxy_control):
    port = free_port()
    proxy_control.config.write_text(f"zk=127.0.0.1:{free_port()}\nproxy_address=127.0.0.1:{port}\n")
    old = start_ok(proxy_control)
    result = proxy_control.run("restart", str(proxy_control.config))
    assert result.returncode == 0, show(result)
    assert "TCP" in result.stderr, show(result)
    new = proxy_control.pid()
    assert new != old and not alive(old) and proxy_control.is_ours(new)
    assert "--takeover" not in cmdline_of(new)
    assert proxy_control.run("stop").returncode == 0


def test_proxy_default_config_is_the_original_path(proxy_control):
    # /usr/local/rpc_proxy/config.ini is absent on a build box; the message must name it.
    if Path("/usr/local/rpc_proxy/config.ini").exists():
        pytest.skip("/usr/local/rpc_proxy/config.ini exists here: not starting a real proxy")
    result = proxy_control.run("start", env=proxy_control.env())
    assert result.returncode == 78, show(result)
    assert "/usr/local/rpc_proxy/config.ini" in result.stderr


def test_lb_with_worker_command_stops_its_workers(lb_control):
    """`worker_command` (issue 14): control_lb.sh runs unchanged; the LB's workers are its
    children and `stop` returns once the LB, which stops them first, is gone."""
    with lb_control.config.open("a") as config:
        config.write("worker_command=/bin/sleep 300\nworker_processes=2\n")
    pid = start_ok(lb_control)

    def workers():
        found = []
        for entry in Path("/proc").iterdir():
            try:
                stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
            except OSError:
                continue
            if stat and int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        return found

    def sleeping(pid):
        args = cmdline_of(pid)
        return args[-2:] == ["/bin/sleep", "300"]

    # setpriv --pdeathsig runs first and execs the command, keeping the pid.
    wait_until(
        lambda: len(workers()) == 2 and all(sleeping(w) for w in workers()),
        10,
        "two workers of rpc_lb",
    )
    started = workers()
    stop = lb_control.run("stop")
    assert stop.returncode == 0, show(stop)
    assert not alive(pid)
    assert not any(alive(w) for w in started), "the workers stopped with the LB"
