"""ZooKeeper away for longer than the client library's reconnect backoff takes to grow:
rpc_proxy must follow ZooKeeper again within seconds of its return, whatever the outage's
length, and keep routing from its last known table meanwhile.

The ZooKeeper client (zookeeper-client 0.11) retries a lost connection after about 0.1, 0.3,
0.7, 1.5, 3.1, 6.3, 12.7 and 25.5 s, with no cap but the session deadline: left alone, a
proxy whose ZooKeeper came back ~15 s after the loss would see changes ~10 s late. The
registry crate takes over with its own capped backoff after 2 s of disconnection.
"""

import re
import time
import urllib.request

import pytest
import test_lb

import harness

# The mesh fixtures of test_lb.py (ZooKeeper-registered LBs and rpc_thrift workers).
lb_bin = test_lb.lb_bin
mesh = test_lb.mesh

# Past the library's 12.7 s retry once the restart is counted: its next one is at ~25.5 s.
OUTAGE_S = 14.0
# From ZooKeeper answering again to the proxy routing to an LB registered after that
# (the LB's and its worker's start included). Measured ~10 s before the fix.
RESYNC_BOUND_S = 5.0


def whoami_seen(connect, name, calls=20):
    """True when `name` answers whoami() within `calls` calls on a fresh connection."""
    conn = connect()
    try:
        return any(conn.whoami() == name for _ in range(calls))
    finally:
        conn.close()


def metric(proxy, name):
    """The value of the label-less sample `name` in the proxy's /metrics."""
    url = f"http://{proxy.settings['admin_address']}/metrics"
    with urllib.request.urlopen(url, timeout=5.0) as response:
        text = response.read().decode()
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} not in /metrics:\n{text}"
    return float(match.group(1))


@pytest.mark.timeout(150)
def test_proxy_follows_zookeeper_within_seconds_of_a_long_outage(mesh, proxies, clients, zk_server):
    lb_a = mesh.lb()  # zk_session_timeout 30 s (default): longer than the outage
    mesh.worker(lb_a, "a0")
    mesh.wait_registered(lb_a)
    proxy = proxies.start(admin_address=f"127.0.0.1:{harness.free_port()}")
    connect = lambda: clients(proxy.address, timeout=30.0)  # noqa: E731
    harness.wait_until(lambda: whoami_seen(connect, "a0"), 10, "the proxy routes to LB a")
    conn = connect()

    zk_server.kill()
    down_at = time.monotonic()
    try:
        # The outage itself (a fixed window, not a synchronisation): the proxy keeps
        # answering from its last known table all along.
        calls = 0
        while time.monotonic() - down_at < OUTAGE_S:
            assert conn.whoami() == "a0"
            calls += 1
    finally:
        zk_server.start()
    up_at = time.monotonic()

    # A change made after the restart: LB b and its worker register.
    lb_b = mesh.lb()
    mesh.worker(lb_b, "b0")
    mesh.wait_registered(lb_b, timeout=30)
    registered_in = time.monotonic() - up_at
    harness.wait_until(
        lambda: whoami_seen(connect, "b0"),
        40,
        lambda: f"the proxy routes to LB b\n{proxy.output()}",
        0.05,
    )
    routable_in = time.monotonic() - up_at
    reconnects = metric(proxy, "rpc_proxy_zookeeper_reconnects_total")
    expiries = metric(proxy, "rpc_proxy_zookeeper_session_expiries_total")
    print(
        f"ZooKeeper down {up_at - down_at:.1f} s ({calls} calls answered meanwhile); after "
        f"its return LB b registered in {registered_in:.2f} s and was routable in "
        f"{routable_in:.2f} s; proxy reconnects {reconnects:.0f}, expiries {expiries:.0f}"
    )
    for line in "".join(harness._read(p) for p in proxy.log_files()).splitlines():
        if re.search(r"zookeeper|session", line):
            print("  proxy:", line)
    assert routable_in <= RESYNC_BOUND_S, proxy.output()
    # LB a's node is there (its session outlived the outage) and it still serves.
    assert mesh.node_exists(lb_a)
    assert whoami_seen(connect, "a0", calls=50)
    # The session came back or was replaced: a reconnect, not an expiry.
    assert reconnects >= 1
    assert expiries == 0
