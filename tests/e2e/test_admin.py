"""The admin endpoint (`admin_address`) of rpc_proxy and rpc_lb, end to end with real
processes: `GET /metrics` passes `promtool check metrics` and its counters move with real
calls, `GET /healthz` follows start, drain and stop, `GET /status` shows the routing table and
the workers, and `POST /drain` / `POST /resume` take an LB out of ZooKeeper and back while it
stays up. Also the periodic status log line. HTTP goes through urllib.

Only `test_metrics_of_both_binaries_pass_promtool` needs `promtool` (Debian package
`prometheus`); without it that test is skipped, with the reason printed.
"""

import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest
from test_lb import Mesh
from thrift.Thrift import TApplicationException

import harness

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="session")
def promtool():
    path = shutil.which("promtool")
    if path is None:
        reason = "promtool not installed (Debian package `prometheus`)"
        print(f"skipping the promtool checks: {reason}")
        pytest.skip(reason)
    return path


@pytest.fixture
def mesh(zk_server, zk, product, workdir, echo_idl):
    lb_bin = harness.lb_bin()
    if not lb_bin.exists():
        pytest.fail(f"rpc_lb binary not found at {lb_bin}: run `cargo build -p rpc-lb`")
    m = Mesh(lb_bin, zk_server, zk, product, workdir, echo_idl)
    yield m
    m.close()


def http(method, url, timeout=5.0):
    """(status, body) of one request; HTTP errors are answers too."""
    request = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def admin_url(process, path):
    return f"http://{process.settings['admin_address']}{path}"


def get(process, path):
    return http("GET", admin_url(process, path))


def status_json(process):
    import json

    code, body = get(process, "/status")
    assert code == 200, body
    return json.loads(body)


def metrics(process):
    code, text = get(process, "/metrics")
    assert code == 200, text
    return text


def sample(text, name, **labels):
    """The value of the sample `name{labels}` (labels in any order), or None."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
        if found == {k: str(v) for k, v in labels.items()}:
            return float(match.group(3))
    return None


def promtool_check(promtool, text):
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert done.returncode == 0, (
        f"promtool check metrics failed ({done.returncode}):\n"
        f"{done.stdout.decode()}{done.stderr.decode()}"
    )


def admin_settings(status_interval_ms=None):
    settings = {"admin_address": f"127.0.0.1:{harness.free_port()}"}
    if status_interval_ms is not None:
        settings["status_interval_ms"] = status_interval_ms
    return settings


def wait_http(process, path, status, timeout=20):
    def answered():
        code, body = get(process, path)
        return code == status and (code, body)

    return harness.wait_until(answered, timeout, lambda: f"{path} answers {status}")


def log_text(process):
    return "".join(harness._read(p) for p in process.log_files())


# === both ===


def test_metrics_of_both_binaries_pass_promtool(mesh, proxies, clients, promtool):
    lb = mesh.lb(**admin_settings())
    mesh.worker(lb, "w0")
    mesh.wait_registered(lb)
    proxy = proxies.start(**admin_settings())
    wait_http(proxy, "/healthz", 200)
    # Series of every kind: counters by outcome, histograms, labelled gauges.
    conn = clients(proxy.address)
    assert conn.echo("x") == "x"
    assert conn.add(1, 2) == 3
    with pytest.raises(TApplicationException):
        conn.fail("oops")
    with pytest.raises(TApplicationException):
        clients(proxy.address, service="nosuch").echo("x")
    with harness.RawConnection(proxy.address) as raw:
        raw.send_message("no-service-prefix", harness.CALL, 1)
        assert raw.recv_message().mtype == harness.EXCEPTION
    proxy_text, lb_text = metrics(proxy), metrics(lb)
    assert (
        sample(
            proxy_text,
            "rpc_proxy_requests_total",
            **{"service": "unknown", "method": "unknown", "outcome": "protocol"},
        )
        == 1
    )
    promtool_check(promtool, proxy_text)
    promtool_check(promtool, lb_text)
    # Before the first ZooKeeper sync too (no call series yet).
    lonely = proxies.start(zk=f"127.0.0.1:{harness.free_port()}", **admin_settings())
    promtool_check(promtool, metrics(lonely))


# === rpc_proxy ===


def test_metrics_move_with_calls_through_proxy_and_lb(mesh, proxies, clients):
    lb = mesh.lb(**admin_settings(status_interval_ms=300))
    mesh.worker(lb, "w0", pool_size=2)
    mesh.wait_registered(lb)
    proxy = proxies.start(**admin_settings(status_interval_ms=300))
    wait_http(proxy, "/healthz", 200)
    before_proxy, before_lb = metrics(proxy), metrics(lb)
    ok_labels = {"service": "echo", "method": "echo"}
    ok_before = sample(before_proxy, "rpc_proxy_requests_total", outcome="ok", **ok_labels) or 0

    conn = clients(proxy.address)
    for n in range(25):
        assert conn.echo(f"m{n}") == f"m{n}"
    with pytest.raises(TApplicationException):
        conn.fail("oops")  # undeclared: the worker answers a TApplicationException
    with pytest.raises(TApplicationException):
        clients(proxy.address, service="nosuch").echo("x")

    text = metrics(proxy)
    assert sample(text, "rpc_proxy_requests_total", outcome="ok", **ok_labels) == ok_before + 25
    # `fail` was never answered with a reply: no label of its own (client-made names never
    # become labels before the backend answers one).
    other = {"service": "echo", "method": "other"}
    assert sample(text, "rpc_proxy_requests_total", outcome="exception", **other) == 1
    assert 'method="fail"' not in text
    assert (
        sample(
            text,
            "rpc_proxy_requests_total",
            service="unknown",
            method="unknown",
            outcome="unknown_service",
        )
        == 1
    ), "an unknown service is counted under `unknown`, never under its own name"
    assert "nosuch" not in text
    assert sample(text, "rpc_proxy_request_duration_seconds_count", **ok_labels) == ok_before + 25
    assert sample(text, "rpc_proxy_request_duration_seconds_bucket", le="+Inf", **ok_labels) == (
        ok_before + 25
    )
    assert sample(text, "rpc_proxy_inflight_requests", service="echo") == 0
    assert sample(text, "rpc_proxy_client_connections") >= 2
    assert sample(text, "rpc_proxy_upstream_endpoints", service="echo", state="connected") == 1
    assert sample(text, "rpc_proxy_zookeeper_session_state", state="connected") == 1
    assert sample(text, "rpc_proxy_routing_table_synced") == 1
    for name in (
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ):
        assert sample(text, name) is not None, name

    lb_text = metrics(lb)
    ok_lb_before = sample(before_lb, "rpc_lb_requests_total", outcome="ok", **ok_labels) or 0
    assert sample(lb_text, "rpc_lb_requests_total", outcome="ok", **ok_labels) == ok_lb_before + 25
    assert sample(lb_text, "rpc_lb_requests_total", outcome="exception", **other) == 1
    assert sample(lb_text, "rpc_lb_request_duration_seconds_count", **ok_labels) >= 25
    assert sample(lb_text, "rpc_lb_workers", state="ready") == 1
    assert sample(lb_text, "rpc_lb_worker_slots") == 2
    assert sample(lb_text, "rpc_lb_queue_depth") == 0
    assert sample(lb_text, "rpc_lb_client_connections") >= 1
    assert sample(lb_text, "rpc_lb_zookeeper_registered") == 1
    assert sample(lb_text, "rpc_lb_zookeeper_registrations_total") == 1
    assert sample(lb_text, "process_open_fds") is not None

    doc = status_json(proxy)
    assert doc["state"] == "serving" and doc["zookeeper"] == "connected"
    (echo,) = [s for s in doc["services"] if s["name"] == "echo"]
    assert [e["address"] for e in echo["endpoints"]] == [lb.frontend]
    assert echo["endpoints"][0]["state"] == "connected"
    assert echo["calls"] >= 26 and echo["errors"] >= 1
    lb_doc = status_json(lb)
    assert lb_doc["state"] == "serving" and lb_doc["registered"] is True
    assert [(w["capacity"], w["active"]) for w in lb_doc["workers"]] == [(2, True)]
    assert lb_doc["calls"] >= 26

    # The periodic status lines: one for the proxy, one per busy service, one for the LB.
    harness.wait_until(
        lambda: re.search(r"service status.*service=\W?echo\W?.*calls=\d+", log_text(proxy)),
        5,
        lambda: f"proxy service status line\n{proxy.output()}",
    )
    harness.wait_until(
        lambda: re.search(r"status.*workers=1 .*calls=", log_text(lb)),
        5,
        lambda: f"LB status line\n{lb.output()}",
    )


def test_proxy_healthz_503_before_zookeeper_sync(proxies):
    # Nothing listens on this port: the proxy serves its socket but never syncs.
    proxy = proxies.start(zk=f"127.0.0.1:{harness.free_port()}", **admin_settings())
    code, body = get(proxy, "/healthz")
    assert (code, body.strip()) == (503, "starting")
    time.sleep(1.0)  # not synchronisation: it must stay 503 while ZooKeeper is away
    assert get(proxy, "/healthz")[0] == 503
    text = metrics(proxy)
    assert sample(text, "rpc_proxy_zookeeper_session_state", state="connecting") == 1
    assert sample(text, "rpc_proxy_routing_table_synced") == 0
    assert status_json(proxy)["state"] == "starting"
    assert get(proxy, "/nope")[0] == 404
    assert http("POST", admin_url(proxy, "/healthz"))[0] == 405
    assert proxy.stop() == 0


def test_proxy_healthz_503_while_stopping(backends, proxies, clients):
    backends.start("A")
    proxy = proxies.start(**admin_settings())
    wait_http(proxy, "/healthz", 200)
    result = {}

    def slow_call():
        result["reply"] = clients(proxy.address, timeout=20.0).slow(2500, "late")

    caller = threading.Thread(target=slow_call)
    caller.start()
    harness.wait_until(
        lambda: status_json(proxy)["services"][0]["inflight"] == 1, 10, "slow call in flight"
    )
    proxy.send_signal(signal.SIGTERM)
    # Draining: the admin endpoint still answers, with 503.
    code, body = wait_http(proxy, "/healthz", 503, timeout=5)
    assert body.strip() == "stopping"
    assert proxy.alive()
    caller.join(timeout=20)
    assert result.get("reply") == "late", "the call in flight is finished"
    assert proxy.stop(timeout=15) == 0


# === rpc_lb ===


def test_lb_healthz_drain_resume_and_sigterm(mesh, clients):
    lb = mesh.lb(**admin_settings())
    code, body = get(lb, "/healthz")
    assert (code, body.strip()) == (503, "unregistered"), "no worker, no node: not ready"
    mesh.worker(lb, "w0")
    mesh.wait_registered(lb)
    wait_http(lb, "/healthz", 200)
    direct = clients(lb.frontend)
    assert direct.echo("before") == "before"

    # POST /drain: node gone, still up and serving, 503.
    code, body = http("POST", admin_url(lb, "/drain"), timeout=15)
    assert code == 200, body
    assert not mesh.node_exists(lb), "the node is gone when /drain answers"
    assert get(lb, "/healthz") == (503, "maintenance\n")
    assert direct.echo("while drained") == "while drained"
    assert http("GET", admin_url(lb, "/drain"))[0] == 405
    # A worker joining does not register the LB again while in maintenance.
    mesh.worker(lb, "w1")
    harness.wait_until(lambda: len(status_json(lb)["workers"]) == 2, 15, "second worker joins")
    time.sleep(0.5)  # not synchronisation: a window in which nothing may be registered
    assert not mesh.node_exists(lb)
    text = metrics(lb)
    assert sample(text, "rpc_lb_maintenance") == 1
    assert sample(text, "rpc_lb_zookeeper_registered") == 0

    # POST /resume: node back, 200.
    code, body = http("POST", admin_url(lb, "/resume"), timeout=15)
    assert code == 200, body
    assert mesh.node_exists(lb)
    assert get(lb, "/healthz")[0] == 200
    assert status_json(lb)["state"] == "serving"

    # SIGTERM: 503 from the moment the drain starts until the process is gone. An open
    # proxy connection that just made a call keeps the LB draining for a moment.
    assert direct.echo("last") == "last"
    lb.send_signal(signal.SIGTERM)
    answers = []
    while lb.alive():
        try:
            answers.append(get(lb, "/healthz")[0])
        except OSError:
            answers.append("refused")
        time.sleep(0.02)
    assert lb.stop(timeout=30) == 0, lb.output()
    print(f"/healthz after SIGTERM: {answers}")
    served = [a for a in answers if a != "refused"]
    # 200 only until the signal is handled; from the first 503 on, 503 until the exit.
    assert 503 in served, f"the admin endpoint answered 503 during the drain: {answers}"
    first = served.index(503)
    assert set(served[:first]) <= {200} and set(served[first:]) == {503}, answers
    assert not mesh.node_exists(lb)


def test_lb_rejections_are_counted(mesh):
    lb = mesh.lb(**admin_settings())
    with harness.RawConnection(lb.frontend) as raw:
        raw.send_message("echo:echo", harness.CALL, 3, harness.string_args("x"))
        reply = raw.recv_message()
        assert reply.mtype == harness.EXCEPTION
    text = metrics(lb)
    assert sample(text, "rpc_lb_rejected_requests_total", service="echo", reason="no_worker") == 1
    # Never answered (no worker): counted under `other`, not under the name the client sent.
    assert (
        sample(text, "rpc_lb_requests_total", service="echo", method="other", outcome="no_worker")
        == 1
    )
    assert sample(text, "rpc_lb_workers", state="ready") == 0
