"""The whole mesh: ZooKeeper, rpc_lb, rpc_thrift workers (Python), rpc_proxy and generated
clients. Issue 3's end-to-end list: correct results under concurrency, load spread over
workers, declared and undeclared exceptions, graceful stops of a worker and of an LB under
load with no failed call, a worker killed mid-call, and registration following the workers.
"""

import shutil
import signal
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from thrift.Thrift import TApplicationException

import harness


@pytest.fixture(scope="session")
def lb_bin():
    path = harness.lb_bin()
    if not path.exists():
        pytest.fail(f"rpc_lb binary not found at {path}: run `cargo build -p rpc-lb`")
    return path


class Mesh:
    """Starts LBs and workers for the test's product; stops everything at teardown."""

    def __init__(self, lb_bin, zk_server, zk, product, workdir, idl):
        self.lb_bin, self.zk_server, self.zk = lb_bin, zk_server, zk
        self.product, self.workdir, self.idl = product, workdir, idl
        self.lbs, self.workers = [], []

    def lb(self, **overrides):
        directory = self.workdir / f"lb{len(self.lbs)}"
        directory.mkdir()
        settings = {"zk": self.zk_server.address, "product": self.product, "service": "echo"}
        settings.update({k: str(v) for k, v in overrides.items()})
        lb = harness.Lb(self.lb_bin, directory, settings).start()
        self.lbs.append(lb)
        return lb

    def worker(self, lb, name, pool_size=1):
        worker = harness.Worker(
            self.idl.gen_dir, lb.back_address, name, self.workdir, pool_size=pool_size
        ).start()
        self.workers.append(worker)
        return worker

    def node_exists(self, lb):
        return self.zk.exists_async(lb.node_path(self.product)).get(timeout=5) is not None

    def wait_registered(self, lb, timeout=20):
        harness.wait_until(
            lambda: self.node_exists(lb), timeout, lambda: f"LB node appears\n{lb.output()}"
        )

    def wait_workers(self, lb, count, timeout=30):
        """Waits until `count` workers have said HELLO to `lb` (each joined its rotation)."""

        def hellos():
            return sum(harness._read(p).count("worker hello") for p in lb.log_files()) >= count

        harness.wait_until(hellos, timeout, lambda: f"{count} workers joined\n{lb.output()}")

    def close(self):
        for worker in self.workers:
            worker.kill()
        for lb in self.lbs:
            if lb.proc is not None:
                lb.kill()
                print(f"=== rpc_lb in {lb.workdir}\n{lb.output()}")
        for worker in self.workers:
            print(f"=== worker {worker.name}\n{harness._tail(worker.log(), 2000)}")


@pytest.fixture
def mesh(lb_bin, zk_server, zk, product, workdir, echo_idl):
    m = Mesh(lb_bin, zk_server, zk, product, workdir, echo_idl)
    yield m
    m.close()


class Load:
    """`threads` clients calling `echo` with unique payloads until stopped; counts results
    and keeps the failures (`"tag: exc"` strings, or `(tag, exception)` pairs with
    `keep_exceptions`). A client reconnects after any failure but a TApplicationException
    (which leaves its connection usable)."""

    def __init__(self, connect, address, threads=8, call=None, keep_exceptions=False):
        self.connect, self.address, self.threads = connect, address, threads
        self.call = call or (lambda c, tag: c.echo(tag))
        self.keep_exceptions = keep_exceptions
        self.ok = 0
        self.failures = []
        self.served = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(threads)
        self._futures = []

    def _run(self, index):
        conn = self.connect(self.address, timeout=30.0)
        n = 0
        while not self._stop.is_set():
            tag = f"c{index}-{n}"
            n += 1
            try:
                got = self.call(conn, tag)
                assert got == tag, f"crossed reply: sent {tag!r}, got {got!r}"
                with self._lock:
                    self.ok += 1
                    self.served.add(index)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with self._lock:
                    self.failures.append((tag, exc) if self.keep_exceptions else f"{tag}: {exc!r}")
                if not isinstance(exc, TApplicationException):
                    conn = self.connect(self.address, timeout=30.0)

    def start(self):
        self._futures = [self._pool.submit(self._run, i) for i in range(self.threads)]
        return self

    def wait_calls(self, count, timeout=30):
        start = self.ok
        harness.wait_until(lambda: self.ok >= start + count, timeout, f"{count} more calls")

    def stop(self):
        """Stops the clients (once; again is a no-op); raises what a client thread raised."""
        if self._stop.is_set():
            return self
        self._stop.set()
        for f in self._futures:
            f.result(timeout=60)
        self._pool.shutdown()
        print(f"load: {self.ok} calls ok, {len(self.failures)} failed")
        return self


def full_stack(mesh, proxies, workers=3, pool_size=1, **lb_settings):
    lb = mesh.lb(**lb_settings)
    started = [mesh.worker(lb, f"w{i}", pool_size=pool_size) for i in range(workers)]
    mesh.wait_workers(lb, workers)
    mesh.wait_registered(lb)
    proxy = proxies.start()
    return lb, started, proxy


def test_results_correct_under_16_concurrent_clients(mesh, proxies, clients):
    _, _, proxy = full_stack(mesh, proxies, workers=3, pool_size=2)

    def client(index):
        conn = clients(proxy.address)
        for n in range(60):
            tag = f"client{index}-call{n}-" + "x" * (n % 7)
            assert conn.echo(tag) == tag
            assert conn.add(index, n) == index + n
        return index

    with ThreadPoolExecutor(16) as pool:
        assert sorted(pool.map(client, range(16))) == list(range(16))


def test_load_spreads_over_workers(mesh, proxies, clients):
    _, workers, proxy = full_stack(mesh, proxies, workers=3)
    conn = clients(proxy.address)
    # Wait until every worker has joined (each answers at least once).
    seen = set()
    harness.wait_until(lambda: seen.add(conn.whoami()) or len(seen) == 3, 20, "3 workers")
    counts = {}
    for _ in range(300):
        name = conn.whoami()
        counts[name] = counts.get(name, 0) + 1
    print("calls per worker:", counts)
    assert set(counts) == {w.name for w in workers}
    assert min(counts.values()) >= 300 * 0.15, counts


def test_declared_and_undeclared_exceptions(mesh, proxies, clients, echo_idl):
    _, _, proxy = full_stack(mesh, proxies, workers=1)
    conn = clients(proxy.address)
    with pytest.raises(echo_idl.EchoError) as declared:
        conn.fail("declared")
    assert declared.value.code == 7
    with pytest.raises(TApplicationException) as undeclared:
        conn.fail("oops")
    assert undeclared.value.type == TApplicationException.INTERNAL_ERROR
    assert "ValueError" in str(undeclared.value.message)
    assert "boom oops" in str(undeclared.value.message)
    assert conn.echo("still serving") == "still serving"


def test_worker_sigterm_under_load_fails_no_call(mesh, proxies, clients):
    lb, workers, proxy = full_stack(mesh, proxies, workers=3)
    load = Load(clients, proxy.address, threads=8).start()
    load.wait_calls(200)
    code = workers[0].stop(signal.SIGTERM, timeout=25)
    load.wait_calls(300)
    load.stop()
    assert code == 0, workers[0].log()
    assert load.failures == [], load.failures[:10]
    assert lb.alive() and mesh.node_exists(lb)


def test_worker_sigkill_mid_call_fails_only_its_call(mesh, proxies, clients):
    # One slot per worker, so the killed worker holds exactly one call: the slow one.
    _, workers, proxy = full_stack(mesh, proxies, workers=3, pool_size=1)
    probe = clients(proxy.address)
    names = set()
    harness.wait_until(lambda: names.add(probe.whoami()) or len(names) == 3, 20, "3 workers")

    results = {}

    def slow(index):
        conn = clients(proxy.address, timeout=30.0)
        try:
            results[index] = ("ok", conn.slow(4000, f"slow{index}"), time.monotonic())
        except TApplicationException as exc:
            results[index] = ("error", exc.message, time.monotonic())

    threads = [threading.Thread(target=slow, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    harness.wait_until(
        lambda: all("SLOW-START" in w.log() for w in workers), 10, "every worker runs a slow call"
    )
    killed_at = time.monotonic()
    workers[1].stop(signal.SIGKILL)
    # Calls made now queue at the LB until a slot frees; none may fail.
    load = Load(clients, proxy.address, threads=2).start()
    for t in threads:
        t.join(timeout=30)
    load.wait_calls(50)
    load.stop()
    errors = [r for r in results.values() if r[0] == "error"]
    print("slow calls:", results)
    assert len(results) == 3
    assert len(errors) == 1, results
    assert errors[0][2] - killed_at < 1.5, f"error after {errors[0][2] - killed_at:.2f} s"
    assert "worker lost" in errors[0][1], errors[0][1]
    assert load.failures == [], load.failures[:10]


def test_lb_sigterm_under_load_fails_no_call_and_node_goes_first(mesh, proxies, clients, zk_server):
    lb_a = mesh.lb()
    lb_b = mesh.lb()
    for lb, prefix in ((lb_a, "a"), (lb_b, "b")):
        mesh.worker(lb, f"{prefix}0", pool_size=2)
        mesh.worker(lb, f"{prefix}1", pool_size=2)
        mesh.wait_workers(lb, 2)
        mesh.wait_registered(lb)
    proxy = proxies.start()
    load = Load(clients, proxy.address, threads=8).start()
    load.wait_calls(300)

    lb_a.send_signal(signal.SIGTERM)
    gone_while_alive = harness.wait_until(
        lambda: (not mesh.node_exists(lb_a)) and [lb_a.alive()], 10, "LB a's node deleted"
    )
    code = lb_a.stop(timeout=30)
    load.wait_calls(300)
    load.stop()
    assert gone_while_alive == [True], "the node must be gone while the LB still drains"
    assert code == 0, lb_a.output()
    assert load.failures == [], load.failures[:10]
    assert mesh.node_exists(lb_b)


def test_registration_follows_workers(mesh):
    lb = mesh.lb()
    time.sleep(0.5)  # not synchronisation: a window in which nothing may be registered
    assert not mesh.node_exists(lb), "an LB without workers must not register"
    worker = mesh.worker(lb, "w0")
    mesh.wait_registered(lb)
    data = mesh.zk.get_async(lb.node_path(mesh.product)).get(timeout=5)[0]
    assert b'"frontend":"%s"' % lb.frontend.encode() in data
    assert worker.stop(signal.SIGTERM) == 0
    harness.wait_until(lambda: not mesh.node_exists(lb), 10, "node deleted with last worker")
    assert lb.alive()
    mesh.worker(lb, "w1")
    mesh.wait_registered(lb)


def test_lb_front_answers_pings_prefixed_names_and_no_worker(mesh):
    lb = mesh.lb()
    with harness.RawConnection(lb.frontend) as raw:
        raw.send_message("ping", 20, 5)
        assert raw.recv_frame() == harness.encode_message("ping", 20, 5)
        raw.send_message("echo:echo", 1, 9, harness.string_args("x"))
        reply = raw.recv_message()
        assert (reply.mtype, reply.seqid) == (3, 9)
        code, text = harness.decode_app_exception(reply.body)
        assert code == 6 and text.startswith("Worker FOR echo.echo Not Found"), text

    mesh.worker(lb, "w0")
    mesh.wait_registered(lb)
    with harness.RawConnection(lb.frontend) as raw:
        for name, seqid in (("echo:echo", 11), ("echo", 12)):
            raw.send_message(name, 1, seqid, harness.string_args("hi"))
            reply = raw.recv_message()
            assert (reply.name, reply.mtype, reply.seqid) == ("echo", 2, seqid)
            assert harness.decode_string_result(reply.body) == "hi"


def test_queue_bound_answers_at_once(mesh):
    lb = mesh.lb(max_queue=1)
    mesh.worker(lb, "w0", pool_size=1)
    mesh.wait_registered(lb)

    def slow_args(ms, text):
        raw = text.encode()
        return struct.pack(">bhi", 8, 1, ms) + struct.pack(">bhi", 11, 2, len(raw)) + raw + b"\x00"

    with harness.RawConnection(lb.frontend, timeout=10.0) as raw:
        # One write, read in order by the LB: the first runs, the second queues, the third
        # finds the queue full.
        raw.send(
            harness.frame(harness.encode_message("slow", 1, 1, slow_args(800, "a")))
            + harness.frame(harness.encode_message("slow", 1, 2, slow_args(10, "b")))
            + harness.frame(harness.encode_message("echo", 1, 3, harness.string_args("c")))
        )
        start = time.monotonic()
        first = raw.recv_message()
        assert time.monotonic() - start < 0.5, "the refusal is immediate"
        assert (first.seqid, first.mtype) == (3, 3)
        code, text = harness.decode_app_exception(first.body)
        assert code == 6 and "queue" in text, text
        replies = [raw.recv_message() for _ in range(2)]
        assert [(r.seqid, r.mtype) for r in replies] == [(1, 2), (2, 2)]


def test_worker_survives_lb_restart(mesh, clients):
    lb = mesh.lb()
    worker = mesh.worker(lb, "w0")
    mesh.wait_registered(lb)
    assert lb.stop() == 0
    shutil.rmtree(lb.workdir / "log", ignore_errors=True)
    restarted = lb.start()
    mesh.wait_registered(restarted, timeout=30)
    assert clients(restarted.frontend).echo("again") == "again"
    assert worker.proc.poll() is None
