"""Fixtures of the rpc_thrift tests: code generated from idl/echo.thrift, a fake LB on a
short unix socket path, and worker processes or threads that are always cleaned up."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from fake_lb import Codec, FakeLB

HERE = Path(__file__).resolve().parent
IDL = Path(os.environ.get("RPC_ECHO_IDL", HERE.parents[1] / "idl" / "echo.thrift"))


@pytest.fixture(scope="session")
def gen_py() -> Iterator[Path]:
    """``thrift --gen py`` output for the Echo IDL, importable as ``echo``."""
    compiler = shutil.which("thrift")
    if compiler is None:
        pytest.fail("the thrift compiler is needed (apt-get install thrift-compiler)")
    if not IDL.exists():
        pytest.fail(f"{IDL} is missing")
    out = Path(tempfile.mkdtemp(prefix="rpc-thrift-gen-"))
    subprocess.run([compiler, "--gen", "py", "-out", str(out), str(IDL)], check=True, timeout=60)
    sys.path.insert(0, str(out))
    yield out
    sys.path.remove(str(out))
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture(scope="session")
def codec(gen_py: Path) -> Codec:
    from echo import Echo

    return Codec(Echo)


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for unix sockets (paths are limited to ~100 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lb_path(sock_dir: Path) -> str:
    return str(sock_dir / "lb.sock")


@pytest.fixture
def fake_lb(lb_path: str) -> Iterator[FakeLB]:
    lb = FakeLB(lb_path)
    yield lb
    lb.close()


class WorkerProcess:
    """A worker subprocess (tests/echo_worker.py) whose log goes to a file."""

    def __init__(self, proc: subprocess.Popen, log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def spawn_worker(gen_py: Path, sock_dir: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts ``echo_worker.py ADDRESS`` processes; kills leftovers and shows their logs."""
    started: list[WorkerProcess] = []

    def spawn(
        address: str | None,
        pool_size: int = 1,
        name: str = "worker",
        env: dict[str, str] | None = None,
    ) -> WorkerProcess:
        """``address`` None: the worker is made with ``address=None`` (the environment's);
        ``env`` is added to the test's environment."""
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(gen_py), str(HERE)]
            + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else [])
        )
        log_path = sock_dir / f"worker-{len(started)}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    str(HERE / "echo_worker.py"),
                    *([] if address is None else [address]),
                    "--pool-size",
                    str(pool_size),
                    "--name",
                    name,
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        worker = WorkerProcess(proc, log_path)
        started.append(worker)
        return worker

    yield spawn
    for worker in started:
        if worker.proc.poll() is None:
            worker.proc.send_signal(signal.SIGKILL)
            worker.proc.wait(timeout=10)
        text = worker.log()
        if text:
            print(f"--- worker {worker.pid} log ---\n{text}")


class ThreadWorker:
    """An RpcWorker running on a thread of the test process."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, name="test-rpc-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:  # reported by the test
            self.error.append(exc)

    def start(self) -> ThreadWorker:
        self.thread.start()
        return self

    def join(self, timeout: float) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run() did not return"
        assert not self.error, self.error


@pytest.fixture
def thread_worker(gen_py: Path) -> Iterator[Callable[[Any], ThreadWorker]]:
    """Runs RpcWorkers on threads; stops and joins them at teardown."""
    started: list[ThreadWorker] = []

    def start(worker: Any) -> ThreadWorker:
        runner = ThreadWorker(worker).start()
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.worker.stop()
        runner.thread.join(25)
