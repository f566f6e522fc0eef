"""rpc_lb supervising its own Python workers (`worker_command`, CONTRACT section 9 "LB
supervision", issue 14). Real ZooKeeper, rpc_lb, rpc_proxy and rpc_thrift workers, which the
LB starts itself from tests/e2e/supervised_worker.py (`whoami()` answers
`<slot>:<generation>:<pid>`). The LB's `/status` (admin endpoint) tells which worker runs in
which slot; every test prints what it observed (`pytest -s`).

1. SIGKILL one of 3 workers under 8 clients: only the call it held fails (code 6), its slot
   gets a new worker; SIGKILL that slot 5 times as soon as each new worker appears: the time
   to the next start grows (0.1 s doubling), the other two workers keep their pids, and
   every failure is a code-6 TApplicationException.
2. Calls queued behind the only worker, which is killed: answered at once with code 6
   `Worker FOR echo.echo Not Found` (the held call with "worker lost"), not at their timeout.
3. `worker_max_requests=50`: 500 calls at 4 clients, none fails, the workers are recycled
   (new pids); then `POST /workers/restart` replaces both (generation 1); then SIGTERM
   stops the LB and its workers, exit code 0.
4. SIGHUP under load: a bad file is refused (counted, nothing restarted); a good one makes a
   rolling restart (0 failed, every pid new, generation 1); a command that dies at import
   aborts the next one (old workers keep serving, 0 failed).
5. Without `worker_command`, SIGHUP only re-reads the file: the LB and its (unsupervised)
   worker stay, and so does a call in flight.
6. A worker that cannot import: the LB stays up, logs the traceback, backs off, has no
   ZooKeeper node and /healthz 503 meanwhile; fixed on disk, the worker starts, the LB
   registers and serves. SIGKILL to the LB takes its worker with it (parent-death signal).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import struct
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import test_lb
from test_resilience import gauge
from thrift.Thrift import TApplicationException

import harness

# The mesh fixtures of test_lb.py (rpc_lb and its ZooKeeper checks).
lb_bin = test_lb.lb_bin
mesh = test_lb.mesh

pytestmark = pytest.mark.timeout(120)

WORKER = Path(__file__).resolve().parent / "supervised_worker.py"
BROKEN_IMPORT = "import no_such_module_for_rpc_lb_tests  # noqa: F401 - the failure under test\n"


# === helpers ===


def worker_command(gen_dir, script=WORKER, pool_size=1):
    return shlex.join(
        [sys.executable, str(script), "--gen-dir", str(gen_dir), "--pool-size", str(pool_size)]
    )


def supervised_lb(mesh, processes, command=None, **settings):
    """An LB with `processes` workers of `command` (supervised_worker.py by default) and its
    admin endpoint."""
    settings.setdefault("worker_boot_timeout_ms", 20000)
    return mesh.lb(
        worker_command=command or worker_command(mesh.idl.gen_dir),
        worker_processes=processes,
        admin_address=f"127.0.0.1:{harness.free_port()}",
        **settings,
    )


def http(lb, method, path):
    """(status, body) of one request to the LB's admin endpoint."""
    url = f"http://{lb.settings['admin_address']}{path}"
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def status(lb):
    code, body = http(lb, "GET", "/status")
    assert code == 200, body
    return json.loads(body)


def metric(lb, name, **labels):
    """The value of one sample of the LB's /metrics (0 when absent)."""
    code, text = http(lb, "GET", "/metrics")
    assert code == 200, text
    return gauge(text, name, **labels) or 0.0


def slots(lb, state=None):
    """{slot: pid} of the supervised workers (in `state`, when given), from /status; when a
    slot has two (a replacement booting, a replaced one stopping), the last listed."""
    return {
        w["slot"]: w["pid"]
        for w in status(lb)["workers"]
        if w["slot"] is not None and (state is None or w["state"] == state)
    }


def all_pids(lb):
    """The pids of every worker in /status, whatever its state."""
    return {w["pid"] for w in status(lb)["workers"]}


def wait_ready(lb, count, generation=None, timeout=40, gone=()):
    """Waits until exactly `count` supervised workers are ready (of `generation`, when
    given) and none of the pids `gone` is among the workers; returns {slot: pid}."""

    def ready():
        workers = status(lb)["workers"]
        if any(w["pid"] in gone for w in workers):
            return None
        workers = [
            w
            for w in workers
            if w["slot"] is not None
            and w["state"] == "ready"
            and (generation is None or w["generation"] == generation)
        ]
        return {w["slot"]: w["pid"] for w in workers} if len(workers) == count else None

    return harness.wait_until(
        ready, timeout, lambda: f"{count} ready workers\n{json.dumps(status(lb))}\n{lb.output()}"
    )


def lb_log(lb):
    return "\n".join(harness._read(p) for p in lb.log_files())


def rewrite_config(lb, **changes):
    """Writes the LB's config file again with `changes` (the running LB reads it on SIGHUP)."""
    lb.settings.update({k: str(v) for k, v in changes.items()})
    harness.write_config(
        lb.config_path, {k: v for k, v in lb.settings.items() if k != "proxy_address"}
    )


def pid_alive(pid):
    """True while process `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def kill(pid, sig=signal.SIGKILL):
    os.kill(pid, sig)


class Load(test_lb.Load):
    """test_lb's load, keeping every failure as (tag, exception)."""

    def __init__(self, connect, address, threads=8):
        super().__init__(connect, address, threads=threads, keep_exceptions=True)

    def report(self, what):
        shown = [
            (tag, getattr(exc, "type", None), getattr(exc, "message", None) or repr(exc))
            for tag, exc in self.failures[:5]
        ]
        print(f"{what}: {self.ok} calls ok, {len(self.failures)} failed: {shown}")


@pytest.fixture
def loads(clients):
    """start(address, threads=8) -> a running Load; every one is stopped at teardown."""
    started = []

    def start(address, threads=8):
        load = Load(clients, address, threads=threads).start()
        started.append(load)
        return load

    yield start
    for load in started:
        try:
            load.stop()
        except Exception as exc:  # noqa: BLE001 - teardown of a test that already failed
            print(f"load teardown: {exc!r}")


def assert_code6(failures):
    for tag, exc in failures:
        assert isinstance(exc, TApplicationException), (tag, exc)
        assert exc.type == TApplicationException.INTERNAL_ERROR, (tag, exc.type, exc.message)


def slow_args(ms, text):
    raw = text.encode()
    return struct.pack(">bhi", 8, 1, ms) + struct.pack(">bhi", 11, 2, len(raw)) + raw + b"\x00"


# === the tests ===


def test_sigkill_fails_only_held_calls_and_restarts_back_off(mesh, proxies, loads):
    lb = supervised_lb(mesh, 3)
    before = wait_ready(lb, 3)
    mesh.wait_registered(lb)
    proxy = proxies.start()
    load = loads(proxy.address)
    load.wait_calls(200)

    # One worker killed under load: it held at most one call (pool_size 1).
    killed = before[1]
    kill(killed)
    after = wait_ready(lb, 3, gone=[killed])
    assert after[1] != killed and after[0] == before[0] and after[2] == before[2], (before, after)
    load.wait_calls(200)
    first_failures = list(load.failures)
    assert len(first_failures) <= 1, first_failures
    assert_code6(first_failures)

    # The same slot killed 5 times, each time as soon as its new worker appears.
    restart_times = []
    for _ in range(5):
        pid = slots(lb)[1]
        kill(pid)
        killed_at = time.monotonic()
        harness.wait_until(
            lambda pid=pid: slots(lb).get(1) not in (None, pid), 40, "slot 1 restarted"
        )
        restart_times.append(round(time.monotonic() - killed_at, 2))
    final = wait_ready(lb, 3, timeout=40)
    load.wait_calls(200)
    load.stop()
    load.report("8 clients, slot 1 killed 6 times")
    exits = metric(lb, "rpc_lb_worker_restarts_total", reason="exit")
    boot_failures = metric(lb, "rpc_lb_worker_boot_failures_total")
    print(
        f"RESULT first kill failed {len(first_failures)} call(s); restart times after the "
        f"5 quick kills: {restart_times} s; restarts(exit)={exits:.0f} "
        f"boot_failures={boot_failures:.0f}; pids before {before} after {final}"
    )
    assert final[0] == before[0] and final[2] == before[2], "the other workers are untouched"
    # Only a ready worker holds calls: the first quick kill may have hit one.
    assert len(load.failures) <= 2, load.failures
    assert_code6(load.failures)
    assert restart_times[-1] >= 2.0, restart_times
    assert restart_times[-1] > 4 * restart_times[0], restart_times
    assert exits >= 6
    assert lb.alive() and mesh.node_exists(lb)


def test_calls_queued_for_a_lost_worker_are_refused_at_once(mesh):
    lb = supervised_lb(mesh, 1)
    (pid,) = wait_ready(lb, 1).values()
    with harness.RawConnection(lb.frontend, timeout=10.0) as raw:
        # The slow call takes the only slot; the two echoes queue behind it.
        raw.send(
            harness.frame(harness.encode_message("slow", 1, 1, slow_args(5000, "held")))
            + harness.frame(harness.encode_message("echo", 1, 2, harness.string_args("a")))
            + harness.frame(harness.encode_message("echo", 1, 3, harness.string_args("b")))
        )
        harness.wait_until(lambda: "SLOW-START held" in lb_log(lb), 10, "the slow call runs")
        killed_at = time.monotonic()
        kill(pid)
        replies = {}
        for _ in range(3):
            reply = raw.recv_message()
            code, text = harness.decode_app_exception(reply.body)
            replies[reply.seqid] = (reply.mtype, code, text, round(time.monotonic() - killed_at, 2))
    print(f"RESULT replies after the worker was killed: {replies}")
    assert replies[1][:2] == (3, 6) and "worker lost" in replies[1][2], replies
    for seqid in (2, 3):
        mtype, code, text, after = replies[seqid]
        assert (mtype, code) == (3, 6), replies
        assert text.startswith("Worker FOR echo.echo Not Found"), text
        assert after < 2.0, replies


def test_max_requests_recycles_and_restart_endpoint(mesh, proxies, clients):
    lb = supervised_lb(mesh, 2, worker_max_requests=50)
    first = wait_ready(lb, 2)
    mesh.wait_registered(lb)
    proxy = proxies.start()

    def client(index):
        conn = clients(proxy.address)
        served, failed = [], []
        for n in range(125):
            try:
                served.append(conn.whoami().rsplit(":", 1)[1])
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failed.append((index, n, exc))
                conn = clients(proxy.address)
        return served, failed

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(client, range(4)))
    served = [pid for s, _ in results for pid in s]
    failed = [failure for _, failures in results for failure in failures]
    per_pid = {pid: served.count(pid) for pid in sorted(set(served))}
    # Recycling goes on after the load: each old worker is replaced once its new one is ready.
    recycled = wait_ready(lb, 2, gone=first.values())
    recycles = metric(lb, "rpc_lb_worker_restarts_total", reason="recycled")
    print(
        f"RESULT 500 calls at 4 clients: {len(served)} ok, {len(failed)} failed; calls per pid "
        f"{per_pid}; pids {first} -> {recycled}; restarts(recycled)={recycles:.0f}"
    )
    assert failed == [] and len(served) == 500
    assert recycles >= 2

    # POST /workers/restart: a rolling restart of both (generation 1).
    code, body = http(lb, "POST", "/workers/restart")
    assert code == 202, body
    assert json.loads(body)["generation"] == 1
    rolled = wait_ready(lb, 2, generation=1, gone=recycled.values())
    harness.wait_until(lambda: not status(lb)["supervision"]["rolling_restart"], 20, "done")
    assert not set(rolled.values()) & set(recycled.values()), (recycled, rolled)
    assert clients(proxy.address).echo("after the restart") == "after the restart"

    # The LB's stop: its workers get SIGTERM and exit (0), then the LB exits 0.
    assert lb.stop(timeout=30) == 0, lb.output()
    assert not any(pid_alive(pid) for pid in rolled.values()), rolled
    log = lb_log(lb)
    print(f"RESULT after POST /workers/restart: {rolled}; LB stopped with its workers")
    assert "SIGTERM sent to every supervised worker" in log
    assert log.count("exited cleanly") >= 2, harness._tail(log)


def test_sighup_rolling_restart_and_aborted_restart(mesh, proxies, loads, workdir):
    lb = supervised_lb(mesh, 3)
    gen0 = wait_ready(lb, 3)
    mesh.wait_registered(lb)
    proxy = proxies.start()
    load = loads(proxy.address)
    load.wait_calls(200)

    # A file that does not validate: refused, counted, nothing restarted.
    good_command = lb.settings["worker_command"]
    rewrite_config(lb, worker_processes=0)
    lb.send_signal(signal.SIGHUP)
    harness.wait_until(
        lambda: metric(lb, "rpc_lb_config_reloads_total", result="error") == 1, 10, "refused"
    )
    assert status(lb)["supervision"]["generation"] == 0 and slots(lb) == gen0

    # A good one: every worker replaced under load, none failed.
    rewrite_config(lb, worker_processes=3)
    lb.send_signal(signal.SIGHUP)
    started = time.monotonic()
    gen1 = wait_ready(lb, 3, generation=1, timeout=60, gone=gen0.values())
    harness.wait_until(lambda: not status(lb)["supervision"]["rolling_restart"], 20, "done")
    rolled_in = round(time.monotonic() - started, 1)
    load.wait_calls(200)
    assert not set(gen0.values()) & set(gen1.values()), (gen0, gen1)

    # A command that dies at import: the rolling restart aborts, the workers stay.
    broken = workdir / "broken_worker.py"
    broken.write_text(BROKEN_IMPORT + WORKER.read_text())
    rewrite_config(lb, worker_command=worker_command(mesh.idl.gen_dir, script=broken))
    lb.send_signal(signal.SIGHUP)
    harness.wait_until(
        lambda: "rolling restart aborted" in lb_log(lb), 30, lambda: f"aborted\n{lb.output()}"
    )
    load.wait_calls(200)
    load.stop()
    load.report("8 clients through 3 SIGHUPs")
    reloads = metric(lb, "rpc_lb_config_reloads_total", result="ok")
    rolling = metric(lb, "rpc_lb_worker_restarts_total", reason="rolling")
    boot_failures = metric(lb, "rpc_lb_worker_boot_failures_total")
    print(
        f"RESULT rolling restart of 3 workers in {rolled_in} s: {gen0} -> {gen1}; aborted "
        f"restart kept {slots(lb, 'ready')}; reloads ok={reloads:.0f} error=1; "
        f"restarts(rolling)={rolling:.0f}; boot failures={boot_failures:.0f}"
    )
    assert load.failures == [], load.failures[:10]
    assert wait_ready(lb, 3, generation=1) == gen1, "the old workers keep serving"
    assert status(lb)["supervision"]["generation"] == 2
    assert (reloads, rolling) == (2, 3)
    assert boot_failures >= 1
    assert "ModuleNotFoundError" in lb_log(lb)
    assert good_command not in lb.config_path.read_text()


def test_sighup_without_worker_command_only_reloads(mesh, clients):
    lb = mesh.lb(admin_address=f"127.0.0.1:{harness.free_port()}")
    worker = mesh.worker(lb, "w0")
    mesh.wait_registered(lb)
    conn = clients(lb.frontend)
    result = {}
    thread = threading.Thread(target=lambda: result.update(slow=conn.slow(1500, "held")))
    thread.start()
    harness.wait_until(lambda: "SLOW-START held" in worker.log(), 10, "the slow call runs")
    for n in (1, 2):
        lb.send_signal(signal.SIGHUP)
        harness.wait_until(
            lambda n=n: metric(lb, "rpc_lb_config_reloads_total", result="ok") == n,
            10,
            f"reload {n}",
        )
    thread.join(timeout=10)
    print(f"RESULT two SIGHUPs without worker_command: LB alive={lb.alive()}, call {result}")
    assert result == {"slow": "held"}
    assert lb.alive() and worker.proc.poll() is None and mesh.node_exists(lb)
    assert status(lb)["supervision"] is None
    assert http(lb, "POST", "/workers/restart")[0] == 409
    assert clients(lb.frontend).echo("still") == "still"


def test_broken_import_backs_off_then_registers(mesh, proxies, clients, workdir):
    script = workdir / "app_worker.py"
    script.write_text(BROKEN_IMPORT + WORKER.read_text())
    lb = supervised_lb(mesh, 1, command=worker_command(mesh.idl.gen_dir, script=script))
    harness.wait_until(
        lambda: lb_log(lb).count("supervised worker exited") >= 4,
        30,
        lambda: f"4 failed starts\n{lb.output()}",
    )
    log = lb_log(lb)
    delays = [int(d) for d in re.findall(r"restart_in_ms=(\d+)", log)]
    assert "Traceback (most recent call last)" in log and "ModuleNotFoundError" in log
    assert delays[:4] == [100, 200, 400, 800], delays
    assert lb.alive() and not mesh.node_exists(lb)
    assert http(lb, "GET", "/healthz")[0] == 503
    # A call that reaches it meanwhile is refused at once.
    with harness.RawConnection(lb.frontend) as raw:
        raw.send_message("echo:echo", 1, 4, harness.string_args("x"))
        reply = raw.recv_message()
        code, text = harness.decode_app_exception(reply.body)
        assert (reply.mtype, code) == (3, 6) and text.startswith("Worker FOR echo.echo"), text

    script.write_text(WORKER.read_text())
    fixed_at = time.monotonic()
    mesh.wait_registered(lb, timeout=60)
    registered_after = round(time.monotonic() - fixed_at, 1)
    assert http(lb, "GET", "/healthz")[0] == 200
    proxy = proxies.start()
    assert clients(proxy.address).echo("fixed") == "fixed"
    (pid,) = slots(lb, "ready").values()
    failures = metric(lb, "rpc_lb_worker_boot_failures_total")
    print(
        f"RESULT broken import: restart delays {delays} ms, {failures:.0f} boot failures; "
        f"registered {registered_after} s after the fix"
    )

    # The LB killed outright: its worker dies with it (setpriv --pdeathsig).
    lb.proc.kill()
    lb.proc.wait(timeout=10)
    harness.wait_until(lambda: not pid_alive(pid), 10, f"worker {pid} died with the LB")
