"""Proxy resilience (CONTRACT section 9, "LB refusals and LB failures, marked" and "Proxy
resilience"): outlier ejection, retries of calls no handler saw, the retry budget. Real
ZooKeeper, rpc_proxy, rpc_lb and rpc_thrift workers; the fake endpoints are plain sockets
(marked_peers.py) registered with or without `"marks": 1`. N below is
outlier_consecutive_failures (default 5). Each test prints its observed counts (`pytest -s`).

What each test shows, and its bounds. "Failed calls <= N + held + failed probes" (tests 1
and 3) is checked as its two halves, on the clients' own timings around the first ejection
(the "endpoint ejected" log line): at most N - 1 failed calls ended before the ejection (it
comes at the N-th failure in a row), and of the calls sent after it only failed probes
(rpc_proxy_ejections_total{reason="failed_probe"}) fail; the failed calls in between are the
N-th failure and the calls the endpoint held (printed next to the line's own `outstanding`).
1. Two LBs; B's only worker hangs (a gate file blocks every call on entry; LB
   request_timeout_ms 1000, proxy 3000, outlier_base_ejection_ms 2000) under 8 clients: B is
   ejected (/status "ejected"); while the hang lasts, failed calls <= N + held + failed
   probes, and B's LB finishes no call after the ejection beyond the calls it held
   and the failed probes (every new call goes to A). Once the gate is gone a probe readmits
   B within 30 s ("endpoint readmitted", /status, rpc_proxy_ejected_endpoints 0) and B's
   worker serves calls again.
2. Two LBs, A (1 worker, pool_size 4) and B (1 worker, pool_size 1, max_queue 1), both
   nodes saying "marks": 1; 8 clients call slow(30) for 8 s: no call fails;
   rpc_proxy_retries_total{reason="refused"} moves; the handler entries (counted by the
   workers) equal the answered calls, none ran twice.
3. Two LBs; B's only worker frozen with SIGSTOP (SIGCONT at the end); proxy
   request_timeout_ms 800; 8 clients for 12 s: B is ejected; failed calls <= N + held +
   failed probes, and never more than N + 8 (clients) + failed probes.
4. A handler's undeclared exception (code 6, no field 3) through two LBs is never retried:
   exactly one handler entry per call (3 N + 5 calls); no retry, no ejection.
5. Retry budget: three marks endpoints that refuse everything (field 3 = 1), 400 calls from
   8 clients, outlier ejection off: 0 < retries (calls the endpoints received - 400) <= 20 %
   x 400 + 10/s x 10 s per 10 s window begun; rpc_proxy_retry_budget_exhausted_total moves;
   rpc_proxy_retries_total equals the retries seen; no endpoint sees a call twice.
6. Ejection cap: three marks endpoints, two failing every call (field 3 = 2), defaults:
   exactly one is ejected (rpc_proxy_ejected_endpoints 1, one "ejected" in /status, one
   ejection counted) while the other keeps failing (>= 2 N more calls).
7. Mixed fleet: an endpoint whose node has no "marks" answering code 6 with field 3 = 1:
   exactly one attempt per call (each of its >= 3 N calls fails, none reaches the other
   endpoint), never ejected, no retry counted.
8. A marks endpoint failing fast (field 3 = 2, no delay) beside one answering in 20 ms,
   ejection off, 8 clients x 40 calls: its calls are never retried, and it gets at most
   60 % of the calls (balancing does not favour fast failures).
9. A call never written (an endpoint that refuses connections) is retried on another
   endpoint: no call fails, rpc_proxy_retries_total{reason="not_sent"} moves.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import marked_peers
import pytest
import test_lb
from marked_peers import FAIL, REFUSE, REPLY, MarkedEndpoint, RecordingWorker
from thrift.Thrift import TApplicationException

import harness

# The mesh fixtures of test_lb.py (rpc_lb and rpc_thrift workers).
lb_bin = test_lb.lb_bin
mesh = test_lb.mesh

pytestmark = pytest.mark.timeout(120)

#: CONTRACT defaults (section 9).
N = 5  # outlier_consecutive_failures
BUDGET_PERCENT = 20
BUDGET_MIN_PER_SEC = 10
BUDGET_WINDOW_S = 10


# === fixtures and helpers ===


@pytest.fixture
def fakes():
    """MarkedEndpoint factory: fakes(name, behaviour, delay=0.0); closed at teardown."""
    made = []

    def make(name, behaviour, delay=0.0):
        endpoint = MarkedEndpoint(name, behaviour, delay=delay)
        made.append(endpoint)
        return endpoint

    yield make
    for endpoint in made:
        endpoint.close()


def admin_address():
    return f"127.0.0.1:{harness.free_port()}"


def http_get(process, path):
    url = f"http://{process.settings['admin_address']}{path}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"GET {path}: HTTP {exc.code}: {exc.read()[:300]!r}") from None


def series(text, name):
    """[(labels, value)] of every sample of `name` in Prometheus text."""
    found = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line.strip())
        if match and match.group(1) == name:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            found.append((labels, float(match.group(3))))
    return found


def total(text, name, **labels):
    """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
    want = {k: str(v) for k, v in labels.items()}
    return sum(v for got, v in series(text, name) if want.items() <= got.items())


def gauge(text, name, **labels):
    """The one sample of `name` with exactly `labels`, or None."""
    want = {k: str(v) for k, v in labels.items()}
    values = [v for got, v in series(text, name) if got == want]
    return values[0] if values else None


class ProxyView:
    """What the proxy shows about service `echo`: metrics, /status, log lines."""

    def __init__(self, proxy, service="echo"):
        self.proxy, self.service = proxy, service

    def metrics(self):
        return http_get(self.proxy, "/metrics")

    def retries(self, reason=None):
        labels = {"service": self.service}
        if reason is not None:
            labels["reason"] = reason
        return total(self.metrics(), "rpc_proxy_retries_total", **labels)

    def exhausted(self):
        return total(self.metrics(), "rpc_proxy_retry_budget_exhausted_total", service=self.service)

    def ejections(self, reason=None):
        labels = {"service": self.service}
        if reason is not None:
            labels["reason"] = reason
        return total(self.metrics(), "rpc_proxy_ejections_total", **labels)

    def ejected_gauge(self):
        return gauge(self.metrics(), "rpc_proxy_ejected_endpoints", service=self.service)

    def endpoints(self):
        """{address: state} of the service's endpoints in /status."""
        doc = json.loads(http_get(self.proxy, "/status"))
        for service in doc.get("services", []):
            if service.get("name") == self.service:
                return {e["address"]: e["state"] for e in service.get("endpoints", [])}
        return {}

    def wait_endpoints(self, count, timeout=20):
        harness.wait_until(
            lambda: len(self.endpoints()) == count,
            timeout,
            lambda: f"the proxy knows {count} endpoints of {self.service}: {self.endpoints()}",
        )

    def log(self):
        return "".join(harness._read(p) for p in self.proxy.log_files())

    def log_lines(self, text):
        return [line for line in self.log().splitlines() if text in line]

    def ejected_lines(self, address=None):
        """Parsed "endpoint ejected" lines: [{endpoint, failures, ejection_ms, outstanding}]."""
        out = []
        for line in self.log_lines("endpoint ejected"):
            fields = {"at": line.split()[0]}
            for key, quoted, bare in re.findall(r'(\w+)=(?:"((?:[^"\\]|\\.)*)"|(\S+))', line):
                fields[key] = quoted or bare
            if address is None or fields.get("endpoint") == address:
                out.append(fields)
        return out

    def summary(self):
        text = self.metrics()
        return (
            f"retries {dict(self._by_reason(text, 'rpc_proxy_retries_total'))}, "
            f"budget exhausted {total(text, 'rpc_proxy_retry_budget_exhausted_total')}, "
            f"ejections {dict(self._by_reason(text, 'rpc_proxy_ejections_total'))}, "
            f"ejected now {gauge(text, 'rpc_proxy_ejected_endpoints', service=self.service)}"
        )

    def _by_reason(self, text, name):
        return [
            (labels.get("reason"), value)
            for labels, value in series(text, name)
            if labels.get("service") == self.service
        ]


def lb_calls(lb):
    """Calls the LB has finished (every outcome, refusals included), from its /metrics."""
    return total(http_get(lb, "/metrics"), "rpc_lb_requests_total", service="echo")


def wall_seconds(stamp):
    """A log line's RFC 3339 UTC timestamp as time.time() seconds."""
    when = datetime.datetime.strptime(stamp[:26].rstrip("Z"), "%Y-%m-%dT%H:%M:%S.%f")
    return round(when.replace(tzinfo=datetime.timezone.utc).timestamp(), 3)


@dataclass
class Split:
    """The failed calls of a run around an endpoint's first ejection (see split_failures)."""

    ejected_at: float  # monotonic
    early: list  # ended before the ejection: counted failures before it
    around: list  # sent before it, ended at or after it: the N-th failure and those held
    after: list  # sent after it: only probes may reach the ejected endpoint

    @property
    def held(self):
        """Calls the endpoint held when ejected, as the clients saw them."""
        return max(0, len(self.around) - 1)

    def describe(self):
        def rel(r):
            return (round(r.start - self.ejected_at, 3), round(r.end - self.ejected_at, 3))

        return (
            f"early {[rel(r) for r in self.early]}, around {[rel(r) for r in self.around]}, "
            f"after {[rel(r) for r in self.after]} (s from the ejection)"
        )


def split_failures(failures, ejected_line, clock_offset, tolerance=0.02):
    """Splits `failures` (Results, monotonic times) at the ejection logged by `ejected_line`
    (its wall-clock stamp; `clock_offset` = time.time() - time.monotonic()), with
    `tolerance` s for the log's stamp."""
    at = wall_seconds(ejected_line["at"]) - clock_offset
    early = [r for r in failures if r.end < at - tolerance]
    after = [r for r in failures if r.start > at + tolerance]
    around = [r for r in failures if r not in early and r not in after]
    return Split(at, early, around, after)


def clock_offset():
    return time.time() - time.monotonic()


def check_split(split, failed_probes, failures):
    """The bound of tests 1 and 3: failed calls <= N + the calls held at the ejection + the
    failed probes, as its two halves: the ejection comes at the N-th failure in a row (at
    most N - 1 failed calls ended before it), and after it only probes reach the endpoint."""
    assert len(split.early) <= N - 1, (
        f"{len(split.early)} calls failed before the ejection (at most N - 1 = {N - 1}): "
        f"{split.describe()}"
    )
    assert len(split.after) <= failed_probes, (
        f"{len(split.after)} calls sent after the ejection failed ({failed_probes} failed "
        f"probes): {split.describe()}; {[r.error for r in split.after][:5]}"
    )
    assert len(failures) <= N + split.held + failed_probes


def describe_error(exc):
    if isinstance(exc, TApplicationException):
        return f"code {exc.type}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Result:
    tag: str
    start: float
    end: float
    error: str | None = None


class TimedLoad:
    """`threads` clients, each on its own connection, calling `call(conn, tag)` with unique
    tags until stopped; every call is kept with its start and end (monotonic) and error."""

    def __init__(self, connect, threads=8, call=None):
        self.connect, self.threads = connect, threads
        self.call = call or (lambda conn, tag: conn.echo(tag))
        self.results = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(threads)
        self._futures = []
        self.started = None

    def _run(self, index):
        conn = self.connect()
        n = 0
        while not self._stop.is_set():
            tag = f"c{index}-{n}"
            n += 1
            start = time.monotonic()
            error = None
            try:
                got = self.call(conn, tag)
                if got != tag:
                    error = f"crossed reply: sent {tag!r}, got {got!r}"
            except TApplicationException as exc:
                error = describe_error(exc)
            except Exception as exc:  # noqa: BLE001 - recorded; the connection is renewed
                error = describe_error(exc)
                conn.close()
                conn = self.connect()
            with self._lock:
                self.results.append(Result(tag, start, time.monotonic(), error))

    def start(self):
        self.started = time.monotonic()
        self._futures = [self._pool.submit(self._run, i) for i in range(self.threads)]
        return self

    def snapshot(self):
        with self._lock:
            return list(self.results)

    def ok_count(self):
        return sum(1 for r in self.snapshot() if r.error is None)

    def wait_ok(self, count, timeout=30):
        start = self.ok_count()
        harness.wait_until(
            lambda: self.ok_count() >= start + count,
            timeout,
            lambda: f"{count} more calls answered; last failures {self.failed()[-3:]}",
        )

    def run_for(self, seconds):
        """Lets the load run until `seconds` after its start (the test's window; raises
        early if every client thread died)."""
        end = self.started + seconds
        while time.monotonic() < end:
            if all(f.done() for f in self._futures):
                for f in self._futures:
                    f.result()
                raise AssertionError("every client thread ended")
            self._stop.wait(min(0.2, max(0.0, end - time.monotonic())))  # the window

    def stop(self):
        self._stop.set()
        for f in self._futures:
            f.result(timeout=60)
        self._pool.shutdown()
        return self

    def failed(self, started_before=None):
        return [
            r
            for r in self.snapshot()
            if r.error is not None and (started_before is None or r.start < started_before)
        ]

    def answered(self):
        return [r for r in self.snapshot() if r.error is None]


def recording_worker(mesh, lb, name, pool_size=1, gate=None):
    worker = RecordingWorker(
        mesh.idl.gen_dir, lb.back_address, name, mesh.workdir, pool_size=pool_size, gate=gate
    ).start()
    mesh.workers.append(worker)  # killed and its log shown by the mesh at teardown
    return worker


def ready(mesh, lb, workers=1):
    mesh.wait_workers(lb, workers)
    mesh.wait_registered(lb)


def wait_both_answer(connect, names, timeout=30):
    """Calls whoami until every worker in `names` has answered one (the proxy routes to
    every LB)."""
    conn = connect()
    seen = set()
    harness.wait_until(
        lambda: seen.add(conn.whoami()) or names <= seen, timeout, lambda: f"{names}: {seen}"
    )
    conn.close()


def fake_calls(client, count, prefix):
    """`count` echo calls on one connection; [(tag, error or None)]."""
    out = []
    for n in range(count):
        tag = f"{prefix}-{n}"
        try:
            got = client.echo(tag)
            out.append((tag, None if got == tag else f"crossed reply {got!r}"))
        except TApplicationException as exc:
            out.append((tag, describe_error(exc)))
    return out


def report(name, **counts):
    text = ", ".join(f"{k}={v}" for k, v in counts.items())
    print(f"\nRESULT {name}: {text}")


# === 1: a hung LB is ejected, then readmitted by a probe ===


def test_hung_lb_is_ejected_and_readmitted_by_a_probe(mesh, proxies, clients, workdir):
    gate = workdir / "gate-b"
    lb_a = mesh.lb(request_timeout_ms=1000)
    lb_b = mesh.lb(request_timeout_ms=1000, admin_address=admin_address())
    mesh.worker(lb_a, "a0", pool_size=4)
    worker_b = recording_worker(mesh, lb_b, "b0", pool_size=1, gate=gate)
    ready(mesh, lb_a)
    ready(mesh, lb_b)
    proxy = proxies.start(
        request_timeout_ms=3000, outlier_base_ejection_ms=2000, admin_address=admin_address()
    )
    view = ProxyView(proxy)
    connect = lambda: clients(proxy.address, timeout=30.0)  # noqa: E731
    wait_both_answer(connect, {"a0", "b0"})

    offset = clock_offset()
    load = TimedLoad(connect, threads=8).start()
    try:
        load.wait_ok(100)
        gate.touch()  # B's worker hangs from its next call on
        hang_at = time.monotonic()
        harness.wait_until(
            lambda: view.ejections(reason="consecutive_failures") >= 1,
            20,
            lambda: f"B is ejected: {view.summary()}\n{proxy.output()}",
        )
        ejected_at = time.monotonic()
        b_at_ejection = lb_calls(lb_b)
        # Let the hang outlast the first ejection: the probe that follows it fails.
        harness.wait_until(
            lambda: view.ejections(reason="failed_probe") >= 1,
            20,
            lambda: f"a probe to B fails while it hangs: {view.summary()}",
        )
        b_at_recovery = lb_calls(lb_b)  # before the probes are read: see the bound below
        failed_probes = view.ejections(reason="failed_probe")
        ejected_lines = view.ejected_lines(lb_b.frontend)
        status_during = view.endpoints()
        gate.unlink()
        recovered_at = time.monotonic()

        def readmitted():
            states = view.endpoints()
            return (
                view.log_lines("endpoint readmitted")
                and states.get(lb_b.frontend) not in (None, "ejected")
                and view.ejected_gauge() == 0
                and states
            )

        states_after = harness.wait_until(
            readmitted, 30, lambda: f"B readmitted: {view.summary()} {view.endpoints()}"
        )
        readmitted_at = time.monotonic()
        readmitted_lines = view.log_lines("endpoint readmitted")
        entries_then = len(worker_b.entries())
        harness.wait_until(
            lambda: len(worker_b.entries()) >= entries_then + 20,
            20,
            "B's worker serves calls again",
        )
    finally:
        if gate.exists():
            gate.unlink()
        load.stop()

    assert ejected_lines, f"no 'endpoint ejected' line for {lb_b.frontend}\n{proxy.output()}"
    hang_failures = load.failed(started_before=recovered_at)
    later_failures = [r for r in load.failed() if r.start >= recovered_at]
    split = split_failures(hang_failures, ejected_lines[0], offset)
    outstanding_logged = int(ejected_lines[0].get("outstanding", 0))
    bound = N + split.held + failed_probes
    b_after_ejection = b_at_recovery - b_at_ejection
    report(
        "1 hung LB",
        calls=len(load.snapshot()),
        failed_in_hang=len(hang_failures),
        failed_after_recovery=len(later_failures),
        bound=bound,
        held_seen=split.held,
        outstanding_logged=outstanding_logged,
        failed_probes=failed_probes,
        b_lb_calls_after_ejection=b_after_ejection,
        ejected_after_s=round(ejected_at - hang_at, 2),
        readmitted_after_s=round(readmitted_at - recovered_at, 2),
        failures=split.describe(),
        ejected_lines=ejected_lines,
        readmitted_lines=readmitted_lines,
        proxy=view.summary(),
    )
    assert status_during.get(lb_b.frontend) == "ejected", status_during
    check_split(split, failed_probes, hang_failures)
    assert b_after_ejection <= outstanding_logged + failed_probes, (
        f"B's LB finished {b_after_ejection} calls after the ejection; only the "
        f"{outstanding_logged} it held and {failed_probes} probes may reach it"
    )
    assert states_after.get(lb_b.frontend) != "ejected"


# === 2: refusals of a full LB are retried, and every call runs once ===


def test_refusals_of_a_full_lb_are_retried_and_each_call_runs_once(mesh, proxies, clients):
    lb_a = mesh.lb()
    lb_b = mesh.lb(max_queue=1)
    worker_a = recording_worker(mesh, lb_a, "a0", pool_size=4)
    worker_b = recording_worker(mesh, lb_b, "b0", pool_size=1)
    ready(mesh, lb_a)
    ready(mesh, lb_b)
    for lb in (lb_a, lb_b):
        data = json.loads(mesh.zk.get_async(lb.node_path(mesh.product)).get(timeout=5)[0])
        assert data.get("marks") == 1, f"the LB's node announces no marks: {data}"
    proxy = proxies.start(admin_address=admin_address())
    view = ProxyView(proxy)
    connect = lambda: clients(proxy.address, timeout=30.0)  # noqa: E731
    wait_both_answer(connect, {"a0", "b0"})

    load = TimedLoad(connect, threads=8, call=lambda conn, tag: conn.slow(30, tag)).start()
    try:
        load.run_for(8.0)
    finally:
        load.stop()
    answered = load.answered()
    failed = load.failed()
    runs = Counter(
        tag for w in (worker_a, worker_b) for method, tag in w.entries() if method == "slow"
    )
    twice = {tag: n for tag, n in runs.items() if n > 1}
    refused = view.retries(reason="refused")
    per_worker = {
        w.name: sum(1 for m, _ in w.entries() if m == "slow") for w in (worker_a, worker_b)
    }
    report(
        "2 full LB",
        answered=len(answered),
        failed=len(failed),
        handler_runs=sum(runs.values()),
        runs_per_worker=per_worker,
        ran_twice=len(twice),
        retries_refused=refused,
        proxy=view.summary(),
    )
    assert not failed, f"{len(failed)} calls failed: {[r.error for r in failed][:10]}"
    assert refused > 0, f"no refusal was retried: {view.summary()}"
    assert not twice, f"calls run twice: {list(twice.items())[:10]}"
    assert sum(runs.values()) == len(answered), (
        f"{sum(runs.values())} handler runs for {len(answered)} answered calls"
    )
    assert set(runs) == {r.tag for r in answered}


# === 3: a frozen worker ===


def test_frozen_worker_costs_at_most_the_threshold_plus_held_calls(mesh, proxies, clients):
    lb_a = mesh.lb()
    lb_b = mesh.lb()
    mesh.worker(lb_a, "a0", pool_size=4)
    worker_b = mesh.worker(lb_b, "b0", pool_size=1)
    ready(mesh, lb_a)
    ready(mesh, lb_b)
    proxy = proxies.start(request_timeout_ms=800, admin_address=admin_address())
    view = ProxyView(proxy)
    connect = lambda: clients(proxy.address, timeout=30.0)  # noqa: E731
    wait_both_answer(connect, {"a0", "b0"})

    offset = clock_offset()
    load = TimedLoad(connect, threads=8).start()
    frozen = False
    try:
        load.wait_ok(50)
        os.kill(worker_b.pid, signal.SIGSTOP)
        frozen = True
        frozen_at = time.monotonic()
        load.run_for(12.0)
    finally:
        if frozen:
            os.kill(worker_b.pid, signal.SIGCONT)
        load.stop()
    failed = load.failed()
    ejected_lines = view.ejected_lines(lb_b.frontend)
    failed_probes = view.ejections(reason="failed_probe")
    assert ejected_lines, f"B was never ejected\n{proxy.output()}"
    split = split_failures(failed, ejected_lines[0], offset)
    report(
        "3 frozen worker",
        calls=len(load.snapshot()),
        failed=len(failed),
        failed_sent_before_freeze=len(load.failed(started_before=frozen_at)),
        bound=N + split.held + failed_probes,
        held_seen=split.held,
        outstanding_logged=int(ejected_lines[0].get("outstanding", 0)),
        failed_probes=failed_probes,
        ejected_s_after_freeze=round(split.ejected_at - frozen_at, 3),
        failures=split.describe(),
        ejected_lines=ejected_lines,
        proxy=view.summary(),
    )
    check_split(split, failed_probes, failed)
    assert len(failed) <= N + load.threads + failed_probes, "more failures than N + clients"


# === 4: a handler's exception is never retried ===


def test_handler_exception_is_never_retried(mesh, proxies, clients):
    lb_a = mesh.lb()
    lb_b = mesh.lb()
    workers = [recording_worker(mesh, lb_a, "a0"), recording_worker(mesh, lb_b, "b0")]
    ready(mesh, lb_a)
    ready(mesh, lb_b)
    proxy = proxies.start(admin_address=admin_address())
    view = ProxyView(proxy)
    connect = lambda: clients(proxy.address, timeout=30.0)  # noqa: E731
    wait_both_answer(connect, {"a0", "b0"})

    conn = connect()
    messages = []
    calls = 3 * N + 5
    for n in range(calls):
        with pytest.raises(TApplicationException) as raised:
            conn.fail(f"oops-{n}")
        messages.append((raised.value.type, raised.value.message))
    assert conn.echo("after") == "after"
    runs = Counter(tag for w in workers for method, tag in w.entries() if method == "fail")
    per_worker = {w.name: sum(1 for m, _ in w.entries() if m == "fail") for w in workers}
    retries, ejections, ejected = view.retries(), view.ejections(), view.ejected_gauge()
    report(
        "4 handler exception",
        calls=calls,
        handler_runs=sum(runs.values()),
        runs_per_worker=per_worker,
        proxy=view.summary(),
    )
    assert all(t == TApplicationException.INTERNAL_ERROR for t, _ in messages), messages[:3]
    assert all("ValueError" in m for _, m in messages), messages[:3]
    assert runs == Counter({f"oops-{n}": 1 for n in range(calls)}), runs
    assert retries == 0, view.summary()
    assert ejections == 0 and not ejected, view.summary()
    assert "ejected" not in view.endpoints().values()


# === 5: the retry budget ===


def test_retry_budget_bounds_retries_of_refused_calls(zk, product, proxies, clients, fakes):
    endpoints = [fakes(f"r{i}", REFUSE).register(zk, product, "echo") for i in range(3)]
    proxy = proxies.start(outlier_consecutive_failures=0, admin_address=admin_address())
    view = ProxyView(proxy)
    view.wait_endpoints(3)

    calls, threads = 400, 8
    start = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        futures = [
            pool.submit(fake_calls, clients(proxy.address), calls // threads, f"t{i}")
            for i in range(threads)
        ]
        results = [r for f in futures for r in f.result(timeout=90)]
    elapsed = time.monotonic() - start
    received = sum(e.count() for e in endpoints)
    retries = received - calls
    windows = max(1, math.ceil(elapsed / BUDGET_WINDOW_S))
    budget = BUDGET_PERCENT * calls / 100 + BUDGET_MIN_PER_SEC * BUDGET_WINDOW_S * windows
    per_endpoint = [e.tags() for e in endpoints]
    twice = [(e.name, t, n) for e, tags in zip(endpoints, per_endpoint) for t, n in tags.items()]
    twice = [x for x in twice if x[2] > 1]
    seen = set().union(*per_endpoint)
    metric_retries, exhausted = view.retries(), view.exhausted()
    report(
        "5 retry budget",
        calls=calls,
        seconds=round(elapsed, 2),
        received=received,
        retries=retries,
        budget=budget,
        unlimited_would_be=2 * calls,
        metric_retries=metric_retries,
        exhausted=exhausted,
        per_endpoint=[e.count() for e in endpoints],
        proxy=view.summary(),
    )
    assert all(error is not None for _, error in results), "a refused call cannot succeed"
    assert seen == {tag for tag, _ in results}, "every call reached an endpoint"
    assert not twice, f"an endpoint saw a call twice: {twice[:10]}"
    assert 0 < retries <= budget, f"{retries} retries, budget {budget}"
    assert exhausted > 0, view.summary()
    assert metric_retries == retries, f"metric {metric_retries}, seen {retries}"
    assert view.retries(reason="refused") == retries, view.summary()


# === 6: the ejection cap ===


def test_at_most_half_of_the_endpoints_are_ejected(zk, product, proxies, clients, fakes):
    sick = [fakes(f"s{i}", FAIL).register(zk, product, "echo") for i in range(2)]
    healthy = fakes("h", REPLY).register(zk, product, "echo")
    proxy = proxies.start(admin_address=admin_address())
    view = ProxyView(proxy)
    view.wait_endpoints(3)
    conn = clients(proxy.address)

    made = []

    def call_until(cond, limit):
        while not cond():
            if len(made) >= limit:
                return False
            made.extend(fake_calls(conn, 1, f"x{len(made)}"))
        return True

    ejected_one = call_until(lambda: view.ejections() >= 1, 200)
    states = view.endpoints()
    ejected = [a for a, s in states.items() if s == "ejected"]
    other = [e for e in sick if e.address not in ejected]
    other_before = other[0].count() if other else 0
    kept_failing = bool(other) and call_until(
        lambda: other[0].count() >= other_before + 2 * N, len(made) + 400
    )
    states = view.endpoints()
    text = view.metrics()
    ejected_gauge = gauge(text, "rpc_proxy_ejected_endpoints", service="echo")
    ejections = total(text, "rpc_proxy_ejections_total", service="echo")
    report(
        "6 ejection cap",
        calls=len(made),
        failed=sum(1 for _, e in made if e),
        per_endpoint={e.name: e.count() for e in [*sick, healthy]},
        states=states,
        proxy=view.summary(),
    )
    assert ejected_one, f"no endpoint ejected after {len(made)} calls: {view.summary()}"
    assert len(ejected) == 1 and ejected[0] in {e.address for e in sick}, states
    assert kept_failing, (
        f"the other failing endpoint got {other[0].count() - other_before} more calls"
        if other
        else states
    )
    assert [a for a, s in states.items() if s == "ejected"] == ejected, states
    assert ejected_gauge == 1, view.summary()
    assert ejections == 1, view.summary()


# === 7: a mixed fleet ===


def test_unmarked_endpoint_is_never_retried_nor_ejected(zk, product, proxies, clients, fakes):
    plain = fakes("plain", REFUSE).register(zk, product, "echo", marks=None)
    healthy = fakes("h", REPLY).register(zk, product, "echo")
    proxy = proxies.start(admin_address=admin_address())
    view = ProxyView(proxy)
    view.wait_endpoints(2)
    conn = clients(proxy.address)

    made = []
    while plain.count() < 3 * N and len(made) < 400:
        made.extend(fake_calls(conn, 1, f"m{len(made)}"))
    failed = {tag for tag, error in made if error}
    at_plain, at_healthy = plain.tags(), healthy.tags()
    retries, ejections, ejected = view.retries(), view.ejections(), view.ejected_gauge()
    states = view.endpoints()
    report(
        "7 mixed fleet",
        calls=len(made),
        failed=len(failed),
        at_plain=plain.count(),
        at_healthy=healthy.count(),
        states=states,
        proxy=view.summary(),
    )
    assert plain.count() >= 3 * N, f"the plain endpoint got {plain.count()} of {len(made)} calls"
    assert max(at_plain.values()) == 1, at_plain.most_common(3)
    assert not set(at_plain) & set(at_healthy), "a call failed by the plain endpoint was retried"
    assert failed == set(at_plain), (sorted(failed)[:5], sorted(at_plain)[:5])
    assert retries == 0, view.summary()
    assert ejections == 0 and not ejected, view.summary()
    assert "ejected" not in states.values(), states


# === 8: fast failures are not retried, nor favoured ===


def test_fast_failures_are_not_retried_nor_favoured(zk, product, proxies, clients, fakes):
    failing = fakes("f", FAIL).register(zk, product, "echo")
    healthy = fakes("h", REPLY, delay=0.02).register(zk, product, "echo")
    proxy = proxies.start(outlier_consecutive_failures=0, admin_address=admin_address())
    view = ProxyView(proxy)
    view.wait_endpoints(2)

    threads, per_thread = 8, 40
    with ThreadPoolExecutor(threads) as pool:
        futures = [
            pool.submit(fake_calls, clients(proxy.address), per_thread, f"t{i}")
            for i in range(threads)
        ]
        made = [r for f in futures for r in f.result(timeout=90)]
    failed = {tag for tag, error in made if error}
    at_failing, at_healthy = failing.tags(), healthy.tags()
    share = failing.count() / len(made)
    retries = view.retries()
    report(
        "8 fast failures",
        calls=len(made),
        failed=len(failed),
        at_failing=failing.count(),
        at_healthy=healthy.count(),
        failing_share=round(share, 3),
        proxy=view.summary(),
    )
    assert not set(at_failing) & set(at_healthy), "a call failed with field 3 = 2 was retried"
    assert failed == set(at_failing)
    assert retries == 0, view.summary()
    assert share <= 0.6, (
        f"the endpoint failing fast got {share:.0%} of the calls ({failing.count()} of "
        f"{len(made)}): balancing favours it"
    )


# === 9: a call never written is retried ===


def test_call_never_written_is_retried_elsewhere(zk, product, proxies, clients, fakes):
    dead = f"127.0.0.1:{harness.free_port()}"  # nothing listens: connect is refused
    marked_peers.register(zk, product, "echo", dead, marks=None)
    healthy = fakes("h", REPLY).register(zk, product, "echo")
    proxy = proxies.start(admin_address=admin_address())
    view = ProxyView(proxy)
    view.wait_endpoints(2)
    conn = clients(proxy.address)

    made = []
    while view.retries(reason="not_sent") < 1 and len(made) < 200:
        made.extend(fake_calls(conn, 1, f"n{len(made)}"))
    failed = [(tag, error) for tag, error in made if error]
    report(
        "9 never written",
        calls=len(made),
        failed=len(failed),
        at_healthy=healthy.count(),
        states=view.endpoints(),
        proxy=view.summary(),
    )
    assert view.retries(reason="not_sent") >= 1, view.summary()
    assert not failed, failed[:5]
