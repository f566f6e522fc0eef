"""Issue 6, "many hosts": three hosts as network namespaces, one bridge between them.

    switch namespace rpcns-<pid>-sw: bridge br0 10.77.0.254/24 (the test's observer: kazoo
                                     and ZooKeeper four-letter words)
    host 1  rpcns-<pid>-h1  eth0 10.77.0.1/24   ZooKeeper 1, rpc_lb :9101, workers h1-w0 h1-w1
    host 2  rpcns-<pid>-h2  eth0 10.77.0.2/24   ZooKeeper 2, rpc_lb :9101, workers h2-w0 h2-w1
                                                (later rpc_lb :9102 with worker h2-late)
    host 3  rpcns-<pid>-h3  eth0 10.77.0.3/24   ZooKeeper 3, rpc_proxy (unix socket), clients

ZooKeeper runs as a three-node ensemble (client port 2181, quorum 2888/3888 on each host's
address); every binary's `zk=` lists the three. Nodes 1 and 2 start first, so node 2 (the
higher id) leads, on a service host; node 3 then joins as a follower. The clients run inside
host 3 (nsload.py) through the proxy's unix socket; the proxy reaches the LBs over TCP
across the bridge. Checks:

1. calls from host 3 succeed and are served by the workers of both service hosts;
2. SIGKILL of the ZooKeeper leader under steady load: no failed call, the two survivors
   elect a leader, every ZooKeeper session of the product (both LBs, the proxy) reconnects
   to a survivor with the same session id (the LBs' nodes keep their owner), a new LB still
   registers and the proxy routes to it;
3. SIGTERM of host 1's LB under steady load: no failed call, its node goes while it drains,
   it exits 0 within 30 s, and from then on only host 2's workers answer.
"""

import json
import os
import signal
import time
import uuid

import netkit
import pytest

import harness

SESSION_TIMEOUT_S = 8  # zk_session_timeout of the binaries: a lost session would show soon
LB_PORT = 9101


class Cluster:
    """What the test starts inside the topology; `close()` kills all of it."""

    def __init__(self, topo, workdir, idl, binaries):
        self.topo, self.workdir, self.idl, self.binaries = topo, workdir, idl, binaries
        self.product = f"netns_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.zk_nodes, self.lbs, self.workers, self.proxies, self.loads = [], [], [], [], []
        self.kz = None

    # --- layout

    def ns(self, host):
        return self.topo.hosts[host - 1]

    def ip(self, host):
        return self.topo.ips[host - 1]

    def host_dir(self, host):
        path = self.workdir / f"h{host}"
        path.mkdir(exist_ok=True)
        return path

    def wrapper(self, host, name):
        return netkit.ns_wrapper(
            self.host_dir(host) / "bin" / name, self.ns(host), self.binaries[name[4:]]
        )

    @property
    def zk_address(self):
        return ",".join(node.address for node in self.zk_nodes)

    # --- ZooKeeper

    def start_ensemble(self):
        servers = [(n, self.ip(n)) for n in (1, 2, 3)]
        self.zk_nodes = [
            netkit.ZkNode(
                n, self.ns(n), self.ip(n), self.host_dir(n) / "zk", servers, self.topo.switch
            )
            for n in (1, 2, 3)
        ]
        first, second, third = self.zk_nodes
        first.start()
        second.start()
        netkit.wait_quorum([first, second], 90, followers=1)
        third.start()
        modes = netkit.wait_quorum(self.zk_nodes, 60, followers=2)
        with netkit.in_netns(self.topo.switch):
            # kazoo's threads are born here, so they stay in the switch namespace.
            self.kz = harness.kazoo_client(self.zk_address)
        return modes

    def leader(self):
        leaders = [node for node in self.zk_nodes if node.mode() == "leader"]
        assert len(leaders) == 1, {node.myid: node.mode() for node in self.zk_nodes}
        return leaders[0]

    def sessions(self):
        """{session id: client ip} over the ZooKeeper servers that answer."""
        found = {}
        for node in self.zk_nodes:
            if node.running():
                try:
                    found.update(node.sessions())
                except OSError:
                    pass
        return found

    def node_stat(self, lb):
        return self.kz.exists_async(lb.node_path(self.product)).get(timeout=5)

    # --- the mesh

    def lb(self, host, port):
        directory = self.host_dir(host) / f"lb-{port}"
        directory.mkdir()
        settings = {
            "zk": self.zk_address,
            "product": self.product,
            "service": "echo",
            "front_host": self.ip(host),
            "front_port": str(port),
            "zk_session_timeout": str(SESSION_TIMEOUT_S),
        }
        lb = harness.Lb(self.wrapper(host, "rpc_lb"), directory, settings)
        self.lbs.append(lb)
        return lb.start(wait=False)

    def worker(self, host, lb, name, pool_size=2):
        worker = netkit.NsWorker(
            self.ns(host),
            self.idl.gen_dir,
            lb.back_address,
            name,
            self.host_dir(host),
            pool_size=pool_size,
        )
        self.workers.append(worker)
        return worker.start()

    def wait_registered(self, lb, timeout=30):
        def registered():
            if not lb.alive():
                raise RuntimeError(f"rpc_lb exited with {lb.proc.returncode}:\n{lb.output()}")
            return self.node_stat(lb) is not None

        harness.wait_until(registered, timeout, lambda: f"LB node appears\n{lb.output()}")

    def proxy(self, host):
        directory = self.host_dir(host) / "proxy"
        directory.mkdir()
        settings = {
            "zk": self.zk_address,
            "product": self.product,
            "proxy_address": str(directory / "proxy.sock"),
            "zk_session_timeout": str(SESSION_TIMEOUT_S),
        }
        proxy = harness.Proxy(self.wrapper(host, "rpc_proxy"), directory, settings)
        self.proxies.append(proxy)
        # The socket is a path: the test process can see it accept from any namespace.
        return proxy.start(timeout=30)

    def load(self, host, address, threads=6):
        load = netkit.NsLoad(
            self.ns(host),
            self.idl.gen_dir,
            address,
            self.host_dir(host) / f"load{len(self.loads)}.log",
            threads=threads,
        )
        self.loads.append(load)
        return load.start()

    def close(self):
        for load in self.loads:
            load.kill()
        for worker in self.workers:
            worker.kill()
        for process in self.lbs + self.proxies:
            if process.proc is not None:
                process.kill()
        if self.kz is not None:
            self.kz.stop()
            self.kz.close()
        for node in self.zk_nodes:
            node.kill()
        # Shown by pytest only when the test failed.
        for process in self.lbs + self.proxies:
            print(f"=== {process.binary.name} in {process.workdir}\n{process.output(3000)}")
        for worker in self.workers:
            print(f"=== worker {worker.name}\n{harness._tail(worker.log(), 1500)}")
        for load in self.loads:
            print(f"=== nsload\n{harness._tail(harness._read(load.log_path), 2000)}")
        for node in self.zk_nodes:
            print(f"=== ZooKeeper {node.myid}\n{node.log_tail(1500)}")


@pytest.fixture
def cluster(topology, workdir, echo_idl, binaries):
    c = Cluster(topology, workdir, echo_idl, binaries)
    yield c
    c.close()


def test_three_hosts_ensemble_failover_and_lb_drain(cluster):
    c = cluster
    t0 = time.monotonic()

    def stamp(what):
        print(f"[{time.monotonic() - t0:6.1f} s] {what}")

    modes = c.start_ensemble()
    stamp(f"ZooKeeper ensemble {c.zk_address}: modes {modes}")

    lb1, lb2 = c.lb(1, LB_PORT), c.lb(2, LB_PORT)
    for host, lb in ((1, lb1), (2, lb2)):
        for i in range(2):
            c.worker(host, lb, f"h{host}-w{i}")
    for host, lb in ((1, lb1), (2, lb2)):
        c.wait_registered(lb)
        data = json.loads(c.kz.get_async(lb.node_path(c.product)).get(timeout=5)[0])
        assert data["frontend"] == f"{c.ip(host)}:{LB_PORT}", data
    proxy = c.proxy(3)
    load = c.load(3, proxy.address)
    stamp("LBs registered, proxy and load running")

    # 1. Across hosts over TCP, served by both service hosts.
    both_hosts = {"h1-w0", "h1-w1", "h2-w0", "h2-w1"}
    load.wait_seen(both_hosts)
    load.wait_calls(200)
    stamp(f"check 1: {load.progress}")

    # 2. The ZooKeeper leader is killed under load.
    load.phase("zk-leader-killed")
    before = c.sessions()
    product_sessions = {sid: ip for sid, ip in before.items() if ip in c.topo.ips}
    assert set(product_sessions.values()) == set(c.topo.ips), (
        f"a session per host (LB 1, LB 2, proxy) expected before the kill: {before}"
    )
    owners = {lb.frontend: c.node_stat(lb).ephemeralOwner for lb in (lb1, lb2)}
    leader = c.leader()
    killed_at = time.monotonic()
    leader.kill()
    stamp(f"killed ZooKeeper {leader.myid} (the leader, on host {leader.myid})")
    survivors = [node for node in c.zk_nodes if node is not leader]
    modes = netkit.wait_quorum(survivors, 60, followers=1)
    stamp(f"survivors elected a leader: {modes}")

    def reconnected():
        now = c.sessions()
        return [sid for sid in product_sessions if sid not in now] == [] and now

    harness.wait_until(
        reconnected,
        30,
        lambda: f"product sessions {product_sessions} back on the survivors: {c.sessions()}",
        interval=0.2,
    )
    stamp(f"all {len(product_sessions)} product sessions reconnected, same ids")
    assert {lb.frontend: c.node_stat(lb).ephemeralOwner for lb in (lb1, lb2)} == owners

    load.phase("zk-recovered")
    late = c.lb(2, LB_PORT + 1)
    c.worker(2, late, "h2-late")
    c.wait_registered(late)
    load.wait_seen(both_hosts | {"h2-late"})
    load.wait_calls(200)
    stamp(f"new LB registered and routed to, {time.monotonic() - killed_at:.1f} s after the kill")

    # 3. Host 1's LB is stopped by SIGTERM under load.
    load.phase("lb1-draining")
    stopped_at = time.monotonic()
    lb1.send_signal(signal.SIGTERM)
    gone_while_alive = harness.wait_until(
        lambda: (c.node_stat(lb1) is None) and [lb1.alive()], 10, "LB 1's node deleted"
    )
    code = lb1.stop(timeout=30)
    lb1_exit_s = time.monotonic() - stopped_at
    stamp(f"LB 1 exited with {code} after {lb1_exit_s:.1f} s")
    load.phase("after-lb1")
    load.wait_calls(300)
    summary = load.stop()
    stamp("load stopped")

    for name, counts in summary["phases"].items():
        print(
            f"phase {name:18} ok {counts['ok']:6} failed {counts['failed']:3} "
            f"whoami {dict(sorted(counts['whoami'].items()))}"
        )
        for failure in counts["failures"]:
            print(f"    {failure}")
    print(f"total: {summary['ok']} calls ok, {summary['failed']} failed")

    phases = summary["phases"]
    assert summary["failed"] == 0, {n: p["failures"] for n, p in phases.items() if p["failed"]}
    assert both_hosts <= set(phases["start"]["whoami"])
    assert both_hosts | {"h2-late"} <= set(phases["zk-recovered"]["whoami"])
    assert gone_while_alive == [True], "LB 1's node must be gone while it still drains"
    assert code == 0, lb1.output()
    assert lb1_exit_s < 30
    after = phases["after-lb1"]["whoami"]
    assert after and all(name.startswith("h2-") for name in after), after
    assert c.node_stat(lb2) is not None and c.node_stat(late) is not None
