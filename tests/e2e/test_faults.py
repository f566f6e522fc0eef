"""Fault injection on the whole mesh (issue 6): ZooKeeper, rpc_lb, rpc_thrift workers and
rpc_proxy as real processes, a steady load of concurrent clients, and one fault per test.
Each test counts the calls that failed and checks that only the calls the fault had to cost
were lost, and that they were answered promptly.

Graceful stops of one of two LBs and of one of three workers under load are in test_lb.py;
here a pipelined variant of the LB stop, and the hard faults: SIGKILL of a worker and of an
LB, ZooKeeper away for 30 s, a forced ZooKeeper session expiry, a proxy restart, and a
handler hung past the request timeout.
"""

import datetime
import itertools
import os
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import test_lb
from thrift.Thrift import TApplicationException

import harness

# The mesh fixtures of test_lb.py (ZooKeeper-registered LBs and rpc_thrift workers).
lb_bin = test_lb.lb_bin
mesh = test_lb.mesh

# === helpers ===


@dataclass
class Outcome:
    """One call: its tag, the connection it went on, when it started and ended (monotonic),
    and the error text when it failed."""

    tag: str
    conn: int
    start: float
    end: float
    error: str = None


class Traffic:
    """`threads` clients, each on its own connection, calling `call(conn, tag)` in a loop
    until stopped; every call is kept as an Outcome. A call fails when it raises or returns
    something other than `tag`. After a failure the client drops its connection and opens a
    new one; a connect that fails is counted in `refused` and retried 20 ms later.

    `pause` seconds between two calls of one client keep long loads light."""

    def __init__(self, connect, threads=6, call=None, pause=0.0):
        self.connect, self.threads, self.pause = connect, threads, pause
        self.call = call or (lambda conn, tag: conn.echo(tag))
        self.outcomes = []
        self.refused = 0
        self.conn_opened = {}  # connection number -> monotonic time it was opened
        self._ids = itertools.count()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads)
        self._futures = []

    def _open(self):
        while not self._stop.is_set():
            try:
                conn = self.connect()
            except Exception:  # noqa: BLE001 - counted; the proxy may be restarting
                with self._lock:
                    self.refused += 1
                self._stop.wait(0.02)  # retry pace, not synchronisation
                continue
            number = next(self._ids)
            with self._lock:
                self.conn_opened[number] = time.monotonic()
            return number, conn
        return None, None

    def _run(self, index):
        number, conn = self._open()
        n = 0
        while not self._stop.is_set():
            tag = f"t{index}-{n}"
            n += 1
            start = time.monotonic()
            error = None
            try:
                got = self.call(conn, tag)
                if got != tag:
                    error = f"crossed reply: sent {tag!r}, got {got!r}"
            except Exception as exc:  # noqa: BLE001 - recorded and reported
                error = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
            with self._lock:
                self.outcomes.append(Outcome(tag, number, start, time.monotonic(), error))
            if error is not None:
                try:
                    conn.close()
                except Exception:  # noqa: BLE001 - the connection is broken anyway
                    pass
                number, conn = self._open()
                if conn is None:
                    return
            elif self.pause:
                self._stop.wait(self.pause)  # load shaping, not synchronisation
        if conn is not None:
            conn.close()

    def start(self):
        self._futures = [self._pool.submit(self._run, i) for i in range(self.threads)]
        return self

    def ok(self):
        with self._lock:
            return sum(1 for o in self.outcomes if o.error is None)

    def failures(self):
        with self._lock:
            return [o for o in self.outcomes if o.error is not None]

    def ok_after(self, when):
        with self._lock:
            return sum(1 for o in self.outcomes if o.error is None and o.start >= when)

    def wait_ok(self, count, timeout=30, after=None):
        """Waits for `count` more successful calls (started after `after`, if given)."""
        if after is None:
            target = self.ok() + count
            harness.wait_until(
                lambda: self.ok() >= target,
                timeout,
                lambda: f"{count} more successful calls ({self.summary()})",
            )
        else:
            harness.wait_until(
                lambda: self.ok_after(after) >= count,
                timeout,
                lambda: f"{count} successful calls after t={after:.2f} ({self.summary()})",
            )

    def summary(self):
        return f"{self.ok()} calls ok, {len(self.failures())} failed, {self.refused} refused"

    def stop(self):
        self._stop.set()
        for future in self._futures:
            future.result(timeout=60)
        self._pool.shutdown()
        print(f"traffic ({self.threads} clients): {self.summary()}")
        return self


def describe(outcomes, since=0.0, limit=10):
    """Failed calls as text for assertion messages: tag, start/end relative to `since`."""
    return [
        f"{o.tag} (conn {o.conn}, +{o.start - since:.3f}..+{o.end - since:.3f} s): {o.error}"
        for o in outcomes[:limit]
    ]


def log_text(process):
    """Everything the LB or proxy logged (its -L files)."""
    return "".join(harness._read(p) for p in process.log_files())


def lb_worker_id(lb, pid):
    """The LB's id for the worker process `pid`, from its `worker hello` log line."""
    for line in log_text(lb).splitlines():
        if "worker hello" in line and re.search(rf"\bpid={pid}\b", line):
            return int(re.search(r"\bworker=(\d+)", line).group(1))
    return None


def worker_left_lost(lb, worker_id):
    """`lost=N` of the LB's `worker left` line for `worker_id`, or None before that line."""
    for line in log_text(lb).splitlines():
        if "worker left" in line and re.search(rf"\bworker={worker_id}\b", line):
            return int(re.search(r"\blost=(\d+)", line).group(1))
    return None


def slow_starts(worker):
    """(wall-clock datetime, tag) of each SLOW-START line of a worker's log, in order."""
    found = []
    for line in worker.log().splitlines():
        match = re.match(r"(\S+ \S+) INFO echo: SLOW-START (.*)$", line)
        if match:
            stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
            found.append((stamp, match.group(2)))
    return found


def whoami_seen(connect, name, calls=20):
    """True when `name` answers whoami() within `calls` calls on a fresh connection."""
    conn = connect()
    try:
        return any(conn.whoami() == name for _ in range(calls))
    finally:
        conn.close()


# === worker and LB killed ===


def test_worker_sigkill_under_load_fails_only_the_calls_it_held(mesh, proxies, clients):
    # 3 workers x 2 slots, 8 clients making 200 ms calls: every slot is busy and about two
    # calls wait in the LB's queue at any time, so the victim holds 2 calls when killed.
    lb = mesh.lb()
    workers = [mesh.worker(lb, f"w{i}", pool_size=2) for i in range(3)]
    mesh.wait_registered(lb)
    proxy = proxies.start()
    victim = workers[1]
    harness.wait_until(
        lambda: lb_worker_id(lb, victim.pid) is not None, 15, "the victim said hello"
    )
    victim_id = lb_worker_id(lb, victim.pid)
    traffic = Traffic(
        lambda: clients(proxy.address, timeout=30.0),
        threads=8,
        call=lambda conn, tag: conn.slow(200, tag),
    ).start()
    try:
        traffic.wait_ok(40)
        harness.wait_until(lambda: slow_starts(victim), 10, "the victim runs calls")
        killed_at = time.monotonic()
        victim.stop(signal.SIGKILL)
        traffic.wait_ok(60, after=killed_at + 0.5)
    finally:
        traffic.stop()
    harness.wait_until(
        lambda: worker_left_lost(lb, victim_id) is not None, 10, "the LB logs the worker left"
    )
    held = worker_left_lost(lb, victim_id)
    failures = traffic.failures()
    print(
        f"worker SIGKILL: LB says it held {held} call(s); {len(failures)} failed; "
        f"{traffic.ok_after(killed_at)} calls ok after the kill"
    )
    for line in describe(failures, killed_at):
        print("  failed:", line)
    assert 1 <= held <= 2, f"the victim should hold 1-2 calls at the kill, LB says {held}"
    assert len(failures) == held, (
        f"only the {held} call(s) the killed worker held may fail: {describe(failures, killed_at)}"
    )
    for o in failures:
        assert "worker lost" in o.error, describe([o], killed_at)
        assert o.start < killed_at, f"a call started after the kill failed: {o}"
        assert o.end - killed_at < 1.0, f"answered {o.end - killed_at:.2f} s after the kill: {o}"
    # Its queued calls went to the other two workers, which kept serving.
    assert lb.alive() and mesh.node_exists(lb)
    assert all(w.proc.poll() is None for w in (workers[0], workers[2]))


def test_lb_sigkill_fails_only_calls_in_flight_and_routing_moves_at_once(mesh, proxies, clients):
    lb_a, lb_b = mesh.lb(), mesh.lb()  # default zk_session_timeout: 30 s
    for lb, prefix in ((lb_a, "a"), (lb_b, "b")):
        mesh.worker(lb, f"{prefix}0", pool_size=2)
        mesh.worker(lb, f"{prefix}1", pool_size=2)
        mesh.wait_registered(lb)
    proxy = proxies.start()
    # 50 ms calls, so that calls are in flight on LB a at the kill.
    traffic = Traffic(
        lambda: clients(proxy.address, timeout=30.0),
        threads=6,
        call=lambda conn, tag: conn.slow(50, tag),
    ).start()
    try:
        traffic.wait_ok(100)
        killed_at = time.monotonic()
        lb_a.kill()  # SIGKILL: no deregistration, the node stays until the session expires
        traffic.wait_ok(200, after=killed_at, timeout=20)
        rerouted_in = time.monotonic() - killed_at
        node_still_there = mesh.node_exists(lb_a)
    finally:
        traffic.stop()
    failures = traffic.failures()
    first_ok = min(o.end for o in traffic.outcomes if o.error is None and o.start >= killed_at)
    print(
        f"LB SIGKILL: {len(failures)} calls failed; 200 calls ok {rerouted_in:.2f} s after the "
        f"kill (first after {first_ok - killed_at:.3f} s); LB a's node still registered: "
        f"{node_still_there}"
    )
    for line in describe(failures, killed_at):
        print("  failed:", line)
    assert node_still_there, "the node vanished: the test did not show routing before expiry"
    assert rerouted_in < 10, f"200 calls after the kill took {rerouted_in:.1f} s"
    # Each client has at most one call in flight; only those (started before the proxy can
    # have seen the connection break: 250 ms of slack on a busy box) may fail, and they are
    # answered at once.
    assert len(failures) <= traffic.threads, describe(failures, killed_at)
    for o in failures:
        assert o.start < killed_at + 0.25, f"a call made after the kill failed: {o}"
        assert o.end - killed_at < 1.0, f"answered {o.end - killed_at:.2f} s after the kill: {o}"
    assert lb_b.alive() and mesh.node_exists(lb_b)


def test_lb_sigterm_under_pipelined_load_fails_no_call(mesh, proxies):
    """Variant of test_lb.py's graceful LB stop: clients pipeline 16 calls per write, so the
    proxy's in-order replies are checked across the drain."""
    lb_a, lb_b = mesh.lb(), mesh.lb()
    for lb, prefix in ((lb_a, "a"), (lb_b, "b")):
        mesh.worker(lb, f"{prefix}0", pool_size=2)
        mesh.worker(lb, f"{prefix}1", pool_size=2)
        mesh.wait_registered(lb)
    proxy = proxies.start()
    batch = 16
    seqids = itertools.count(1)

    def pipelined(raw, tag):
        first = next(seqids) * batch
        raw.send(
            b"".join(
                harness.frame(
                    harness.encode_message(
                        "echo:echo", harness.CALL, first + k, harness.string_args(f"{tag}.{k}")
                    )
                )
                for k in range(batch)
            )
        )
        for k in range(batch):
            reply = raw.recv_message()
            assert (reply.name, reply.mtype, reply.seqid) == ("echo", harness.REPLY, first + k), (
                f"call {tag}.{k}: {reply}"
            )
            got = harness.decode_string_result(reply.body)
            assert got == f"{tag}.{k}", f"crossed reply: {tag}.{k} got {got}"
        return tag

    traffic = Traffic(
        lambda: harness.RawConnection(proxy.address, timeout=30.0), threads=3, call=pipelined
    ).start()
    try:
        traffic.wait_ok(20)
        lb_a.send_signal(signal.SIGTERM)
        harness.wait_until(lambda: not mesh.node_exists(lb_a), 10, "LB a's node deleted")
        code = lb_a.stop(timeout=30)
        traffic.wait_ok(20)
    finally:
        traffic.stop()
    failures = traffic.failures()
    print(f"pipelined: {traffic.ok() * batch} calls ok, {len(failures)} batches failed")
    assert code == 0, lb_a.output()
    assert failures == [], describe(failures)
    assert mesh.node_exists(lb_b)


# === ZooKeeper away ===


@pytest.mark.timeout(180)
def test_zookeeper_down_30s_loses_no_call_then_registrations_resync(
    mesh, proxies, clients, zk_server
):
    lb_a = mesh.lb()  # zk_session_timeout 30 s (default)
    mesh.worker(lb_a, "a0", pool_size=2)
    mesh.worker(lb_a, "a1", pool_size=2)
    lb_c = mesh.lb(zk_session_timeout=2)  # its session cannot outlive the outage
    mesh.worker(lb_c, "c0", pool_size=2)
    mesh.wait_registered(lb_a)
    mesh.wait_registered(lb_c)
    proxy = proxies.start()
    connect = lambda: clients(proxy.address, timeout=30.0)  # noqa: E731
    harness.wait_until(lambda: whoami_seen(connect, "c0"), 10, "the proxy routes to LB c")
    traffic = Traffic(connect, threads=4, pause=0.01).start()
    try:
        traffic.wait_ok(100)
        zk_server.kill()
        down_at = time.monotonic()
        try:
            # LB b starts while ZooKeeper is away: it cannot register yet.
            lb_b = mesh.lb()
            mesh.worker(lb_b, "b0", pool_size=2)
            # The outage itself: a fixed 30 s window in which no call may fail.
            time.sleep(max(0.0, 30.0 - (time.monotonic() - down_at)))
            during = traffic.ok_after(down_at)
        finally:
            zk_server.start()
        up_at = time.monotonic()
        back = {}  # LB name -> seconds after the restart its node was seen

        def all_registered():
            for name, lb in (("a", lb_a), ("b", lb_b), ("c", lb_c)):
                if name not in back and mesh.node_exists(lb):
                    back[name] = time.monotonic() - up_at
            return len(back) == 3

        harness.wait_until(
            all_registered, 40, lambda: f"every LB node exists after the outage: {back}", 0.1
        )
        harness.wait_until(
            lambda: whoami_seen(connect, "b0"), 30, lambda: f"LB b routable\n{proxy.output()}"
        )
        routable_in = time.monotonic() - up_at
        harness.wait_until(lambda: whoami_seen(connect, "c0"), 30, "LB c still routable")
        traffic.wait_ok(100)
    finally:
        traffic.stop()
    failures = traffic.failures()
    lb_c_log = log_text(lb_c)
    c_expired = "registering again" in lb_c_log
    print(
        f"ZooKeeper down {up_at - down_at:.1f} s: {during} calls ok during the outage, "
        f"{len(failures)} failed; nodes seen again after (s) "
        f"{ {k: round(v, 1) for k, v in sorted(back.items())} }, LB b routable "
        f"{routable_in:.1f} s after the restart; LB c (2 s session) saw its session expire: "
        f"{c_expired}"
    )
    for line in log_text(proxy).splitlines():
        if re.search(r"zookeeper|session|endpoint added|endpoint removed", line):
            print("  proxy:", line)
    assert failures == [], describe(failures, down_at)
    assert during >= 200, f"only {during} calls in the 30 s outage"
    assert all(lb.alive() for lb in (lb_a, lb_b, lb_c))


def test_zookeeper_session_expiry_lb_registers_again(mesh, proxies, clients):
    lb = mesh.lb(zk_session_timeout=2)
    mesh.worker(lb, "w0")
    mesh.wait_registered(lb)
    proxy = proxies.start()
    conn = clients(proxy.address)
    assert conn.whoami() == "w0"
    # SIGSTOP the LB past its 2 s session: ZooKeeper expires the session and deletes the
    # node; after SIGCONT the LB must notice and register again by itself.
    os.kill(lb.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        harness.wait_until(lambda: not mesh.node_exists(lb), 15, "the session expires")
        expired_in = time.monotonic() - stopped_at
    finally:
        os.kill(lb.pid, signal.SIGCONT)
    resumed_at = time.monotonic()
    harness.wait_until(
        lambda: mesh.node_exists(lb), 20, lambda: f"the LB registers again\n{lb.output()}"
    )
    registered_in = time.monotonic() - resumed_at
    harness.wait_until(
        lambda: whoami_seen(lambda: clients(proxy.address), "w0"),
        20,
        lambda: f"the proxy routes to the LB again\n{proxy.output()}",
    )
    routable_in = time.monotonic() - resumed_at
    print(
        f"session expiry: node gone {expired_in:.1f} s after SIGSTOP; registered again "
        f"{registered_in:.2f} s and routable {routable_in:.2f} s after SIGCONT"
    )
    assert lb.alive()
    assert "registering again" in log_text(lb), "the LB should log the expiry"


# === proxy restarted ===


def test_proxy_restart_clients_reconnect_and_nothing_else_breaks(mesh, proxies, clients):
    lb = mesh.lb()
    workers = [mesh.worker(lb, f"w{i}", pool_size=2) for i in range(2)]
    mesh.wait_registered(lb)
    proxy = proxies.start()
    lb_pid = lb.pid
    # Clients through the proxy, and one client of the LB itself that must see nothing.
    traffic = Traffic(lambda: clients(proxy.address, timeout=30.0), threads=6).start()
    direct = Traffic(lambda: clients(lb.frontend, timeout=30.0), threads=1, pause=0.01).start()
    try:
        traffic.wait_ok(200)
        stopped_at = time.monotonic()
        code = proxy.stop(signal.SIGTERM)
        down_for = time.monotonic() - stopped_at
        proxy.start()
        restarted_at = time.monotonic()
        traffic.wait_ok(300, after=restarted_at)
        direct.wait_ok(20)
    finally:
        traffic.stop()
        direct.stop()
    failures = traffic.failures()
    opened = traffic.conn_opened
    on_old = [o for o in failures if opened[o.conn] < stopped_at]
    # A connect in the instant between SIGTERM and the listener's close can still land in the
    # old proxy's accept queue; such a connection is closed unserved.
    on_stopping = [o for o in failures if stopped_at <= opened[o.conn] < restarted_at]
    on_new = [o for o in failures if opened[o.conn] >= restarted_at]
    old_conns = sum(1 for t in opened.values() if t < stopped_at)
    stopping_conns = sum(1 for t in opened.values() if stopped_at <= t < restarted_at)
    print(
        f"proxy restart: exit {code} after {down_for:.2f} s; {len(on_old)} calls failed on the "
        f"{old_conns} connections open at the restart, {len(on_stopping)} on the "
        f"{stopping_conns} made to the stopping proxy, {len(on_new)} on new ones; "
        f"{traffic.refused} connects refused while it was down; "
        f"{traffic.ok_after(restarted_at)} calls ok after; direct LB client: {direct.summary()}"
    )
    for line in describe(on_old + on_stopping, stopped_at):
        print("  failed on an old connection:", line)
    assert code == 0, proxy.output()
    assert on_new == [], describe(on_new, restarted_at)
    # At most one failed call per old connection (its client then reconnects), each answered
    # promptly (a closed connection, not a hang).
    for group in (on_old, on_stopping):
        conns = [o.conn for o in group]
        assert len(conns) == len(set(conns)), describe(group, stopped_at)
        for o in group:
            assert o.end - stopped_at < down_for + 5, describe([o], stopped_at)
    assert direct.failures() == [], describe(direct.failures(), stopped_at)
    assert lb.alive() and lb.pid == lb_pid and mesh.node_exists(lb)
    assert all(w.proc.poll() is None for w in workers)
    assert "worker left" not in log_text(lb), "a worker connection was disturbed"


# === a handler hung past the request timeout ===


def test_hung_worker_times_out_and_keeps_its_slot(mesh, proxies, clients):
    lb = mesh.lb(request_timeout_ms=1500)  # the LB answers at 95 %: 1425 ms
    worker = mesh.worker(lb, "w0", pool_size=1)
    mesh.wait_registered(lb)
    proxy = proxies.start(request_timeout_ms=1500)
    conn = clients(proxy.address, timeout=30.0)
    assert conn.echo("warm") == "warm"

    sent_at = time.monotonic()
    with pytest.raises(TApplicationException) as raised:
        conn.slow(5000, "hung")
    timed_out_in = time.monotonic() - sent_at
    error = raised.value
    print(f"hung call: code {error.type} after {timed_out_in:.2f} s: {error.message}")
    assert error.type == TApplicationException.INTERNAL_ERROR, error.message
    assert "timeout" in error.message, error.message
    assert 1.0 <= timed_out_in <= 3.0, f"timeout after {timed_out_in:.2f} s, configured 1.5 s"

    # The worker's only slot stays taken until the hung call returns (at sent_at + 5 s):
    # calls made now wait in the LB's queue (and may time out there) but never run before.
    attempts = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        tag = f"second-{len(attempts)}"
        started = time.monotonic()
        try:
            assert conn.slow(10, tag) == tag
            attempts.append((tag, started, time.monotonic(), None))
            break
        except TApplicationException as exc:
            attempts.append((tag, started, time.monotonic(), exc.message))
    for tag, started, ended, err in attempts:
        print(f"  {tag}: +{started - sent_at:.2f}..+{ended - sent_at:.2f} s: {err or 'ok'}")
    tag, started, ended, err = attempts[-1]
    assert err is None, f"no call succeeded within 20 s: {attempts}"
    assert ended - sent_at >= 5.0, (
        f"{tag} was answered {ended - sent_at:.2f} s after the hung call was sent: it ran "
        "while the hung call still held the worker's only slot"
    )
    for _, _, _, failed in attempts[:-1]:
        assert "timeout" in failed, failed
    # The worker's log: the hung call started first; the calls that timed out in the queue
    # never ran at all, and the successful one started only once the hung call was over.
    starts = slow_starts(worker)
    print("  SLOW-START order:", [(s.strftime("%H:%M:%S.%f")[:-3], t) for s, t in starts])
    assert [t for _, t in starts] == ["hung", tag], starts
    gap = (starts[1][0] - starts[0][0]).total_seconds()
    assert gap >= 4.95, f"{tag} started {gap:.2f} s after the 5 s hung call: concurrently"
    assert conn.echo("after") == "after"
