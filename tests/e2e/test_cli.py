"""Command line, config.ini handling and the listening socket (CONTRACT sections 4, 5, 8)."""

import os
import socket
import stat
import subprocess

import pytest

import harness

EX_USAGE, EX_CONFIG = 64, 78


def _run(proxy_bin, args, cwd, timeout=15):
    try:
        return subprocess.run(
            [str(proxy_bin), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"rpc_proxy {args} did not exit within {timeout} s: {exc.stderr!r}")


def _config(workdir, zk_server, product, drop=(), **extra):
    settings = {
        "zk": zk_server.address,
        "product": product,
        "proxy_address": str(workdir / "cli.sock"),
    }
    settings.update(extra)
    for key in drop:
        settings.pop(key)
    path = workdir / "config.ini"
    harness.write_config(path, settings)
    return path


def test_help_mentions_c(proxy_bin, workdir):
    done = _run(proxy_bin, ["--help"], workdir)
    assert done.returncode == 0, done
    assert "-c" in done.stdout + done.stderr


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(proxy_bin, workdir, flag):
    done = _run(proxy_bin, [flag], workdir)
    assert done.returncode == 0, done
    assert (done.stdout + done.stderr).strip(), "prints a version"


def test_unknown_flag_exits_64(proxy_bin, workdir, zk_server, product):
    config = _config(workdir, zk_server, product)
    assert _run(proxy_bin, ["--no-such-flag"], workdir).returncode == EX_USAGE
    done = _run(proxy_bin, ["-c", str(config), "--no-such-flag"], workdir)
    assert done.returncode == EX_USAGE, done


def test_no_config_flag_exits_64(proxy_bin, workdir):
    done = _run(proxy_bin, [], workdir)
    assert done.returncode == EX_USAGE, done


def test_missing_config_file_exits_78(proxy_bin, workdir):
    done = _run(proxy_bin, ["-c", str(workdir / "absent.ini")], workdir)
    assert done.returncode == EX_CONFIG, done
    assert done.stderr.strip(), "the reason goes to stderr"


@pytest.mark.parametrize("key", ["zk", "proxy_address"])
def test_missing_required_key_exits_78_naming_it(proxy_bin, workdir, zk_server, product, key):
    config = _config(workdir, zk_server, product, drop=(key,))
    done = _run(proxy_bin, ["-c", str(config)], workdir)
    assert done.returncode == EX_CONFIG, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"want a one-line message, got: {done.stderr!r}"
    assert key in lines[0], lines[0]


@pytest.mark.parametrize(
    "key",
    [
        "request_timeout_ms",
        "heartbeat_interval_ms",
        "zk_session_timeout",
        "max_frame_size",
        "socket_mode",
    ],
)
def test_bad_value_exits_78_naming_the_key(proxy_bin, workdir, zk_server, product, key):
    config = _config(workdir, zk_server, product, **{key: "not-a-number"})
    done = _run(proxy_bin, ["-c", str(config)], workdir)
    assert done.returncode == EX_CONFIG, done
    assert key in done.stderr, done.stderr


def test_bad_config_message_printed_once(proxy_bin, workdir, zk_server, product):
    config = _config(workdir, zk_server, product, request_timeout_ms="soon")
    done = _run(proxy_bin, ["-c", str(config)], workdir)
    assert done.returncode == EX_CONFIG, done
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"want the message once, got: {done.stderr!r}"
    assert lines[0].startswith("rpc_proxy: ") and "request_timeout_ms" in lines[0], lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("log_file", [False, True], ids=["stderr-log", "file-log"])
@pytest.mark.parametrize("binary", ["rpc_proxy", "rpc_lb"])
def test_startup_failure_printed_once(proxy_bin, workdir, zk_server, product, binary, log_file):
    # The admin port is taken, so the binary fails after logging is set up: exit 1 and one
    # stderr line, whether the log goes to stderr too (no -L) or to a file (-L, which then
    # gets the error as well).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = f"127.0.0.1:{busy.getsockname()[1]}"
        if binary == "rpc_proxy":
            path = proxy_bin
            config = _config(workdir, zk_server, product, proxy_admin_address=taken)
        else:
            path = harness.lb_bin()
            config = _config(
                workdir,
                zk_server,
                product,
                drop=("proxy_address",),
                service="echo",
                back_address=str(workdir / "back.sock"),
                front_sock=str(workdir / "front.sock"),
                lb_admin_address=taken,
            )
        log = workdir / "start.log"
        args = ["-c", str(config)] + (["-L", str(log)] if log_file else [])
        done = _run(path, args, workdir)
    assert done.returncode == 1, done
    lines = [line for line in done.stderr.splitlines() if "Address already in use" in line]
    assert len(lines) == 1, f"want the error once on stderr, got: {done.stderr!r}"
    assert lines[0].startswith(f"{binary}: ") and taken in lines[0], lines[0]
    logged = "".join(harness._read(p) for p in workdir.glob("start.log*"))
    assert logged.count("Address already in use") == (1 if log_file else 0), logged


def test_unknown_key_warns_and_starts(backends, proxies, clients):
    backends.start("A")
    proxy = proxies.start(frobnicate_widgets="yes")
    assert clients(proxy.address).echo("x") == "x"
    harness.wait_until(
        lambda: "frobnicate_widgets" in proxy.output(limit=10**6),
        5,
        lambda: f"a warning naming the unknown key\n{proxy.output()}",
    )


def test_log_file_option(backends, proxies, clients):
    backends.start("A")
    proxy = proxies.new(args=[])
    base = proxy.workdir / "custom-log"
    proxy.args = ["-L", str(base)]
    proxy.start()
    assert clients(proxy.address).echo("logged") == "logged"

    def log_written():
        names = [p for p in proxy.workdir.iterdir() if p.name.startswith(base.name)]
        return names and any(p.stat().st_size > 0 for p in names)

    harness.wait_until(log_written, 5, lambda: f"a log file named {base}*\n{proxy.output()}")


def test_go_style_flags_accepted(backends, proxies, clients):
    backends.start("A")
    proxy = proxies.new(args=[])
    proxy.args = ["-L", str(proxy.workdir / "go.log"), "-log_level", "debug"]
    proxy.start()
    assert clients(proxy.address).echo("go") == "go"


def test_socket_mode_defaults_to_0660(echo_stack):
    mode = os.stat(echo_stack.proxy.address).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o660, oct(stat.S_IMODE(mode))


def test_socket_mode_setting(backends, proxies, clients):
    backends.start("A")
    proxy = proxies.start(socket_mode="0600")
    assert stat.S_IMODE(os.stat(proxy.address).st_mode) == 0o600
    assert clients(proxy.address).echo("x") == "x"


def test_stale_socket_file_is_replaced(backends, proxies, clients):
    backends.start("A")
    proxy = proxies.new()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(proxy.address)
    stale.close()  # leaves the socket file, with nobody listening
    assert os.path.exists(proxy.address)
    assert harness.connection_refused(proxy.address)
    proxy.start()
    assert clients(proxy.address).echo("fresh") == "fresh"
