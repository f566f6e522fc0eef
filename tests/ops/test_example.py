"""The "Run your own service" example (examples/calculator/) runs end to end, so it cannot rot.

examples/calculator/run.sh generates the Calculator IDL's Python code, starts a throwaway
ZooKeeper (scripts/zk_throwaway.sh), rpc_lb, two worker processes and rpc_proxy from one
config.ini, makes client calls through the proxy (a declared exception included), stops
everything in order and checks every exit code. Its scripts are linted with the others
(test_lint.py).
"""

import importlib.util
import os
import shutil
import signal
import subprocess
import time

import pytest
from opskit import REPO, clean_env, show

EXAMPLE = REPO / "examples" / "calculator"
RUN = EXAMPLE / "run.sh"
ZK_SCRIPT = REPO / "scripts" / "zk_throwaway.sh"
# The run takes about 6 s on 2 idle cores; this bound allows for a busy CI box.
RUN_TIMEOUT_S = 90


def _missing_prerequisite():
    """Why the example cannot run here (scripts/setup.sh installs all of it), or None."""
    if shutil.which("thrift") is None:
        return "no thrift compiler (Debian package `thrift-compiler`)"
    if shutil.which("java") is None or not os.path.exists("/usr/share/java/zookeeper.jar"):
        return "no ZooKeeper (Debian package `zookeeper`, and java)"
    if importlib.util.find_spec("rpc_thrift") is None:
        return "rpc_thrift not installed (pip install ./worker-py)"
    return None


def test_calculator_example_runs(proxy_bin, lb_bin):
    reason = _missing_prerequisite()
    if reason:
        pytest.skip(reason)
    env = clean_env(RPC_PROXY_BIN=proxy_bin, RPC_LB_BIN=lb_bin)
    started = time.monotonic()
    # Its own session: on a timeout run.sh gets SIGTERM (its trap stops what it started), and
    # whatever is left of its process group is killed after that.
    proc = subprocess.Popen(
        [str(RUN)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        pytest.fail(f"run.sh did not finish within {RUN_TIMEOUT_S} s\n{show(result)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    elapsed = time.monotonic() - started
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == 0, show(result)
    for expected in (
        "add(2, 3) -> 5",
        "divide(1, 0) -> DivideByZero(",
        "rpc_lb (pid",
        "calculator example OK",
    ):
        assert expected in stdout, f"{expected!r} missing from the output\n{show(result)}"
    print(f"examples/calculator/run.sh passed in {elapsed:.1f} s")


def test_zk_throwaway_refuses_bad_usage():
    result = subprocess.run([str(ZK_SCRIPT), "not-a-port"], capture_output=True, text=True)
    assert result.returncode == 64, show(result)
    assert "usage" in result.stderr


@pytest.mark.parametrize(
    ("target", "command"),
    [("zk", "scripts/zk_throwaway.sh 2181"), ("example", "examples/calculator/run.sh")],
)
def test_makefile_target(target, command):
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    result = subprocess.run(["make", "-n", target], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, show(result)
    assert command in result.stdout
