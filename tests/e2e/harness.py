"""Plain helpers for the end-to-end tests and the demo: no pytest in here.

What it runs, all as real processes:
- `ZooKeeperServer`: a throwaway standalone ZooKeeper (java ZooKeeperServerMain) on
  127.0.0.1 with a short tick, so short sessions work; it can be stopped and restarted on the
  same data dir.
- `Backend`: tests/e2e/echo_server.py, a plain Python Thrift server for idl/echo.thrift,
  registered in ZooKeeper as an ephemeral node at the CONTRACT path (section 3).
- `Proxy`: the rpc_proxy binary with a generated config.ini.
And the clients: `EchoConnection` (the generated Python client, multiplexed as `echo`) and
`RawConnection` (hand-made frames, for protocol-level tests).

Every wait has a bound and every socket a timeout, so a broken proxy fails a test instead of
hanging it.
"""

import datetime
import errno
import importlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
ECHO_IDL = REPO_ROOT / "idl" / "echo.thrift"
ECHO_SERVER = Path(__file__).resolve().parent / "echo_server.py"
DEFAULT_PROXY_BIN = REPO_ROOT / "target" / "debug" / "rpc_proxy"

# Thrift message types (CONTRACT section 2).
CALL, REPLY, EXCEPTION, ONEWAY = 1, 2, 3, 4
HEARTBEAT, STOP, STOP_CONFIRM = 20, 21, 22
# TApplicationException codes.
UNKNOWN, INTERNAL_ERROR, PROTOCOL_ERROR = 0, 6, 7
VERSION_1 = 0x80010000
DEFAULT_MAX_FRAME_SIZE = 16384000
EMPTY_STRUCT = b"\x00"


def proxy_bin():
    """Path of the rpc_proxy binary under test: $RPC_PROXY_BIN or target/debug/rpc_proxy."""
    return Path(os.environ.get("RPC_PROXY_BIN", str(DEFAULT_PROXY_BIN)))


def wait_until(cond, timeout, msg, interval=0.02):
    """Polls `cond()` until it returns a truthy value, which is returned.

    Raises AssertionError with `msg` (a string, or a callable giving one) and the last
    exception `cond` raised, if any, when `timeout` seconds pass first.
    """
    deadline = time.monotonic() + timeout
    last_error = None
    while True:
        try:
            value = cond()
        except Exception as exc:  # noqa: BLE001 - reported if the wait times out
            value, last_error = None, exc
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            text = msg() if callable(msg) else msg
            raise AssertionError(f"timed out after {timeout} s: {text}{detail}")
        time.sleep(interval)


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def short_tempdir(prefix):
    """A fresh directory under /tmp with a short path (unix socket paths max 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def _tail(text, limit=4000):
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _read(path):
    try:
        return Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


# === generated Thrift code ===


def generate_echo(out_dir):
    """Runs `thrift --gen py` on idl/echo.thrift into `out_dir`, imports it.

    Returns a namespace with `gen_dir`, `Echo` (the service module) and `EchoError`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["thrift", "--gen", "py", "-out", str(out_dir), str(ECHO_IDL)],
        check=True,
        timeout=60,
    )
    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))
    echo_service = importlib.import_module("echo.Echo")
    ttypes = importlib.import_module("echo.ttypes")
    return types.SimpleNamespace(gen_dir=out_dir, Echo=echo_service, EchoError=ttypes.EchoError)


# === ZooKeeper ===


class ZooKeeperServer:
    """A throwaway standalone ZooKeeper listening on 127.0.0.1 only.

    The classpath is /usr/share/java/zookeeper.jar (whose manifest lists its dependencies)
    plus log4j when present; $RPC_TEST_ZK_JAR replaces the ZooKeeper part (a jar, or a
    `:`-separated classpath).
    """

    def __init__(self, base_dir, port=None, tick_ms=200, min_session_ms=400, max_session_ms=60000):
        self.base_dir = Path(base_dir)
        self.port = port or free_port()
        self.tick_ms = tick_ms
        self.min_session_ms = min_session_ms
        self.max_session_ms = max_session_ms
        self.proc = None
        self._log = None

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def _classpath(self):
        parts = [os.environ.get("RPC_TEST_ZK_JAR", "/usr/share/java/zookeeper.jar")]
        for extra in ("/usr/share/java/slf4j-log4j12.jar", "/usr/share/java/log4j-1.2.jar"):
            if os.path.exists(extra):
                parts.append(extra)
        return ":".join(parts)

    def _write_config(self):
        data_dir = self.base_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.base_dir / "zoo.cfg"
        cfg.write_text(
            "\n".join(
                [
                    f"tickTime={self.tick_ms}",
                    f"minSessionTimeout={self.min_session_ms}",
                    f"maxSessionTimeout={self.max_session_ms}",
                    f"dataDir={data_dir}",
                    f"clientPort={self.port}",
                    "clientPortAddress=127.0.0.1",
                    "admin.enableServer=false",
                    "4lw.commands.whitelist=ruok,srvr,stat,mntr,cons",
                    "maxClientCnxns=0",
                    "forceSync=no",
                    "",
                ]
            )
        )
        return cfg

    def start(self, timeout=60):
        """Starts the server and waits until it answers `ruok` with `imok`."""
        if self.running():
            return
        cfg = self._write_config()
        cmd = ["java", "-Xmx256m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1"]
        log4j = "/etc/zookeeper/conf/log4j.properties"
        if os.path.exists(log4j):
            cmd += [f"-Dlog4j.configuration=file:{log4j}", "-Dzookeeper.root.logger=WARN,CONSOLE"]
        cmd += [
            "-Dzookeeper.admin.enableServer=false",
            "-cp",
            self._classpath(),
            "org.apache.zookeeper.server.ZooKeeperServerMain",
            str(cfg),
        ]
        self._log = self.base_dir / "zk.log"
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"ZooKeeper exited with {self.proc.returncode}:\n{_tail(_read(self._log))}"
                )
            return self.ruok()

        try:
            wait_until(ready, timeout, f"ZooKeeper on {self.address} answers ruok")
        except (AssertionError, RuntimeError):
            self.kill()
            raise

    def ruok(self):
        """True when the server answers `ruok`; every socket operation is bounded (1 s)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as s:
                s.settimeout(1.0)
                s.sendall(b"ruok")
                data = b""
                while len(data) < 4:
                    chunk = s.recv(16)
                    if not chunk:
                        break
                    data += chunk
                return data == b"imok"
        except OSError:
            return False

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """Stops the server at once (SIGKILL); the data dir is kept for a restart."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None

    stop = kill

    def restart(self, timeout=60):
        self.kill()
        self.start(timeout=timeout)

    def ensure_running(self):
        if not self.running():
            self.start()


def kazoo_client(zk_address, session_timeout=30.0):
    """A started KazooClient that keeps reconnecting quickly while ZooKeeper is away."""
    from kazoo.client import KazooClient

    retry = {"max_tries": -1, "delay": 0.1, "backoff": 1.5, "max_delay": 1.0}
    client = KazooClient(
        hosts=zk_address,
        timeout=session_timeout,
        connection_retry=retry,
        command_retry={"max_tries": 20, "delay": 0.1, "backoff": 1.5, "max_delay": 1.0},
    )
    client.start(timeout=15)
    return client


# === registry (CONTRACT section 3) ===


def service_id(address):
    """CONTRACT section 3: `.` and `:` become `_`, `/` is removed, the last 20 chars kept."""
    return address.replace(".", "_").replace(":", "_").replace("/", "")[-20:]


def services_path(product):
    return f"/zk/product/{product}/services"


def endpoint_path(product, service, address):
    return f"{services_path(product)}/{service}/{service_id(address)}"


def endpoint_data(service, address):
    return json.dumps(
        {
            "service": service,
            "service_id": service_id(address),
            "frontend": address,
            "deploy_path": str(REPO_ROOT),
            "code_url_version": "e2e",
            "hostname": socket.gethostname(),
            "start_time": datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S"),
        }
    ).encode()


def create_service(kz, product, service):
    """Creates the persistent service node (with no endpoint under it)."""
    path = f"{services_path(product)}/{service}"
    kz.ensure_path(path)
    return path


def register_endpoint(kz, product, service, address):
    """Registers `address` as an EPHEMERAL endpoint node; returns the node path."""
    create_service(kz, product, service)
    path = endpoint_path(product, service, address)
    kz.create(path, endpoint_data(service, address), ephemeral=True)
    return path


# === echo backend ===


class Backend:
    """tests/e2e/echo_server.py in a subprocess; stdout and stderr go to a log file.

    `concurrent=True` runs the calls of one connection concurrently, replies out of order
    (see echo_server.py); the default server runs them one after the other. `unix=True`
    listens on `<workdir>/backend-<name>.sock` instead of a TCP port.
    """

    def __init__(self, gen_dir, name, workdir, concurrent=False, unix=False):
        self.gen_dir = Path(gen_dir)
        self.name = name
        self.concurrent = concurrent
        self.unix_path = Path(workdir) / f"backend-{name}.sock" if unix else None
        self.log_path = Path(workdir) / f"backend-{name}.log"
        self.proc = None
        self.port = None
        self.registrations = []  # (kazoo client, node path)

    @property
    def address(self):
        """The registered `frontend`: host:port, or the unix socket path."""
        if self.unix_path is not None:
            return str(self.unix_path)
        return f"127.0.0.1:{self.port}"

    def start(self, timeout=20):
        cmd = [
            sys.executable,
            str(ECHO_SERVER),
            "--gen-dir",
            str(self.gen_dir),
            "--name",
            self.name,
        ]
        if self.concurrent:
            cmd.append("--concurrent")
        if self.unix_path is not None:
            cmd += ["--unix", str(self.unix_path)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

        def ready():
            for line in self.log().splitlines():
                if line.startswith("READY "):
                    return [int(line.split()[1])]  # a list: port 0 (unix) is truthy too
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend {self.name} exited:\n{_tail(self.log())}")
            return None

        (self.port,) = wait_until(ready, timeout, f"backend {self.name} prints READY")
        return self

    def log(self):
        return _read(self.log_path)

    def log_lines(self, prefix):
        """The payloads of the log lines `<prefix> <payload>`."""
        return [
            line[len(prefix) + 1 :]
            for line in self.log().splitlines()
            if line.startswith(prefix + " ")
        ]

    def register(self, kz, product, service="echo"):
        path = register_endpoint(kz, product, service, self.address)
        self.registrations.append((kz, path))
        return path

    def unregister(self, timeout=10):
        """Deletes every node this backend registered (each request bounded by `timeout`)."""
        from kazoo.exceptions import NoNodeError

        for kz, path in self.registrations:
            try:
                # The *_async forms, because kazoo's plain calls wait without bound while
                # ZooKeeper is away.
                kz.delete_async(path).get(timeout=timeout)
            except NoNodeError:
                pass
        self.registrations = []

    def kill(self):
        """SIGKILL; its ZooKeeper nodes stay (they belong to the test's session)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def close(self):
        try:
            self.unregister(timeout=2)
        except Exception:  # noqa: BLE001 - teardown goes on (ZooKeeper may be down)
            pass
        self.kill()


# === rpc_proxy ===


def write_config(path, settings, extra_lines=()):
    lines = ["# written by tests/e2e/harness.py"]
    lines += [f"{key}={value}" for key, value in settings.items()]
    lines += list(extra_lines)
    Path(path).write_text("\n".join(lines) + "\n")


def _connect(address, timeout):
    """A connected socket to `address`: a unix path, or `host:port` when it has a `:`."""
    if ":" in address and not address.startswith("/"):
        host, port = address.rsplit(":", 1)
        return socket.create_connection((host, int(port)), timeout=timeout)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(address)
    except OSError:
        s.close()
        raise
    return s


class Proxy:
    """rpc_proxy started with `-c <workdir>/config.ini -L <workdir>/proxy.log`."""

    def __init__(self, binary, workdir, settings, args=None, log_level="info"):
        self.binary = Path(binary)
        self.workdir = Path(workdir)
        self.settings = dict(settings)
        self.address = self.settings["proxy_address"]
        self.config_path = self.workdir / "config.ini"
        self.log_base = self.workdir / "proxy.log"
        self.stdout_path = self.workdir / "proxy.stdout"
        self.stderr_path = self.workdir / "proxy.stderr"
        if args is None:
            args = ["-L", str(self.log_base), "--log-level", log_level]
        self.args = list(args)
        self.proc = None

    @property
    def pid(self):
        return self.proc.pid

    def start(self, wait=True, timeout=20):
        write_config(self.config_path, self.settings)
        cmd = [str(self.binary), "-c", str(self.config_path), *self.args]
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=self.workdir
            )
        if wait:
            self.wait_ready(timeout)
        return self

    def accepts(self):
        """True when a new connection to the proxy's address succeeds."""
        try:
            _connect(self.address, 1.0).close()
            return True
        except OSError:
            return False

    def wait_ready(self, timeout=20):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"rpc_proxy exited with {self.proc.returncode}:\n{self.output()}"
                )
            return self.accepts()

        try:
            wait_until(ready, timeout, f"rpc_proxy accepts on {self.address}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.output()}") from None

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """Sends `sig` and returns the exit code; raises AssertionError after `timeout` s."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"rpc_proxy did not exit within {timeout} s of signal {sig}\n{self.output()}"
            ) from None

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def log_files(self):
        return sorted(self.workdir.glob(self.log_base.name + "*"))

    def stderr(self):
        return _read(self.stderr_path)

    def output(self, limit=6000):
        """stderr, stdout and the log files, for failure messages."""
        parts = [f"--- stderr\n{self.stderr()}", f"--- stdout\n{_read(self.stdout_path)}"]
        parts += [f"--- {p.name}\n{_read(p)}" for p in self.log_files()]
        return _tail("\n".join(parts), limit)

    def fd_count(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))


# === clients ===


class EchoConnection:
    """One connection to the proxy with the generated client, multiplexed as `service`.

    Attribute access is delegated to the Echo.Client, so `conn.echo("x")` works;
    `client_for(other)` gives a client for another service over the same connection.
    """

    def __init__(self, idl, address, service="echo", timeout=10.0):
        from thrift.protocol import TBinaryProtocol
        from thrift.transport import TSocket, TTransport

        if ":" in address and not address.startswith("/"):
            host, port = address.rsplit(":", 1)
            sock = TSocket.TSocket(host=host, port=int(port))
        else:
            sock = TSocket.TSocket(unix_socket=address)
        sock.setTimeout(int(timeout * 1000))
        self._idl = idl
        self.transport = TTransport.TFramedTransport(sock)
        self.transport.open()
        self.protocol = TBinaryProtocol.TBinaryProtocolAccelerated(self.transport)
        self.client = self.client_for(service)

    def client_for(self, service):
        from thrift.protocol import TMultiplexedProtocol

        proto = TMultiplexedProtocol.TMultiplexedProtocol(self.protocol, service)
        return self._idl.Echo.Client(proto)

    def __getattr__(self, name):
        return getattr(self.client, name)

    def close(self):
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# === raw frames ===


class Message(types.SimpleNamespace):
    """A decoded message: `name`, `mtype`, `seqid`, `body` (the undecoded struct)."""


def encode_message(name, mtype, seqid, body=EMPTY_STRUCT):
    """A strict binary message header plus `body` (not framed)."""
    raw_name = name.encode() if isinstance(name, str) else name
    return (
        struct.pack(">Ii", VERSION_1 | mtype, len(raw_name))
        + raw_name
        + struct.pack(">i", seqid)
        + body
    )


def frame(payload):
    return struct.pack(">i", len(payload)) + payload


def string_args(value, field_id=1):
    """An args struct with one string field, e.g. `echo_args(s=value)`."""
    raw = value.encode()
    return struct.pack(">bhi", 11, field_id, len(raw)) + raw + b"\x00"


def decode_message(payload):
    """Decodes a strict message header; raises AssertionError on anything else."""
    assert len(payload) >= 12, f"frame too short for a message: {payload!r}"
    (version,) = struct.unpack(">I", payload[:4])
    assert version & 0xFFFF0000 == VERSION_1, f"not a strict header: {payload[:16]!r}"
    (name_len,) = struct.unpack(">i", payload[4:8])
    assert 0 <= name_len <= len(payload) - 12, f"bad name length {name_len}: {payload!r}"
    name = payload[8 : 8 + name_len].decode()
    (seqid,) = struct.unpack(">i", payload[8 + name_len : 12 + name_len])
    return Message(name=name, mtype=version & 0xFF, seqid=seqid, body=payload[12 + name_len :])


def decode_app_exception(body):
    """(type, message) of a TApplicationException struct."""
    from thrift.protocol import TBinaryProtocol
    from thrift.Thrift import TApplicationException
    from thrift.transport import TTransport

    exc = TApplicationException()
    exc.read(TBinaryProtocol.TBinaryProtocol(TTransport.TMemoryBuffer(body)))
    return exc.type, exc.message or ""


def decode_string_result(body):
    """The success value of a result struct whose field 0 is a string."""
    ftype, fid = struct.unpack(">bh", body[:3])
    assert (ftype, fid) == (11, 0), f"not a string success field: {body!r}"
    (size,) = struct.unpack(">i", body[3:7])
    return body[7 : 7 + size].decode()


class RawConnection:
    """A socket to the proxy for hand-made frames; every receive is bounded by `timeout`."""

    def __init__(self, address, timeout=5.0):
        self.sock = _connect(address, timeout)
        self.sock.settimeout(timeout)

    def send(self, data):
        self.sock.sendall(data)

    def send_message(self, name, mtype, seqid, body=EMPTY_STRUCT):
        self.send(frame(encode_message(name, mtype, seqid, body)))

    def _recv_exact(self, n):
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"connection closed after {len(data)} of {n} bytes")
            data += chunk
        return data

    def recv_frame(self):
        """The next frame's payload, or None on a clean EOF (or reset) before it.

        A silent peer raises socket.timeout (TimeoutError).
        """
        try:
            first = self.sock.recv(4)
        except ConnectionResetError:
            return None
        if not first:
            return None
        header = first + self._recv_exact(4 - len(first))
        (size,) = struct.unpack(">i", header)
        assert 0 <= size <= DEFAULT_MAX_FRAME_SIZE, f"bad frame length from proxy: {size}"
        return self._recv_exact(size)

    def recv_message(self):
        payload = self.recv_frame()
        assert payload is not None, "proxy closed the connection instead of replying"
        return decode_message(payload)

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def connection_refused(address):
    """True when connecting to `address` fails (no socket file, or nobody listening)."""
    try:
        _connect(address, 1.0).close()
    except OSError as exc:
        return exc.errno in (errno.ENOENT, errno.ECONNREFUSED) or isinstance(
            exc, (FileNotFoundError, ConnectionRefusedError)
        )
    return False


# === rpc_lb and rpc_thrift workers ===

DEFAULT_LB_BIN = REPO_ROOT / "target" / "debug" / "rpc_lb"
ECHO_WORKER = REPO_ROOT / "worker-py" / "tests" / "echo_worker.py"


def lb_bin():
    return Path(os.environ.get("RPC_LB_BIN", DEFAULT_LB_BIN))


class Lb(Proxy):
    """rpc_lb started with `-c <workdir>/config.ini -L <workdir>/lb.log`; the front listens
    on 127.0.0.1:<free port>, the back on `<workdir>/back.sock`."""

    def __init__(self, binary, workdir, settings, args=None, log_level="info"):
        workdir = Path(workdir)
        settings = dict(settings)
        settings.setdefault("front_host", "127.0.0.1")
        settings.setdefault("front_port", str(free_port()))
        settings.setdefault("back_address", str(workdir / "back.sock"))
        settings["proxy_address"] = f"{settings['front_host']}:{settings['front_port']}"
        super().__init__(binary, workdir, settings, args=args, log_level=log_level)
        self.log_base = self.workdir / "lb.log"
        if args is None:
            self.args = ["-L", str(self.log_base), "--log-level", log_level]
        self.back_address = settings["back_address"]

    def start(self, wait=True, timeout=20):
        write_config(
            self.config_path,
            {k: v for k, v in self.settings.items() if k != "proxy_address"},
        )
        cmd = [str(self.binary), "-c", str(self.config_path), *self.args]
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            self.proc = subprocess.Popen(
                cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=self.workdir
            )
        if wait:
            self.wait_ready(timeout)
        return self

    @property
    def frontend(self):
        return self.address

    def node_path(self, product, service="echo"):
        return endpoint_path(product, service, self.frontend)


class Worker:
    """worker-py/tests/echo_worker.py (rpc_thrift.RpcWorker) in a subprocess."""

    def __init__(self, gen_dir, address, name, workdir, pool_size=1):
        self.gen_dir, self.address, self.name = Path(gen_dir), address, name
        self.pool_size = pool_size
        self.log_path = Path(workdir) / f"worker-{name}.log"
        self.proc = None

    def start(self):
        env = dict(os.environ, PYTHONPATH=str(self.gen_dir))
        cmd = [sys.executable, str(ECHO_WORKER), self.address, "--name", self.name]
        cmd += ["--pool-size", str(self.pool_size)]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        return self

    @property
    def pid(self):
        return self.proc.pid

    def log(self):
        return _read(self.log_path)

    def stop(self, sig=signal.SIGTERM, timeout=25):
        """Sends `sig` and returns the exit code (None if it did not exit in time)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
