"""One config.ini for both binaries of a host (CONTRACT sections 4 and 9): `rpc_lb` and
`rpc_proxy` read the same file, each binds the admin endpoint its own key names
(`lb_admin_address`, `proxy_admin_address`; `admin_address` is the default of both), and a
call goes client -> proxy -> LB -> worker. Before those keys existed the second binary to
start exited 1 with "Address already in use".
"""

import subprocess
import urllib.request

import pytest
import test_admin

import harness

pytestmark = pytest.mark.timeout(120)

# The LB fixture of the admin tests (an LB with its workers, stopped after the test).
mesh = test_admin.mesh


def start_on(process, config_path):
    """Starts a `harness.Proxy` or `harness.Lb` on `config_path` as it is (their own
    `start` writes a config.ini from their settings) and waits until it accepts."""
    process.config_path = config_path
    cmd = [str(process.binary), "-c", str(config_path), *process.args]
    with open(process.stdout_path, "ab") as out, open(process.stderr_path, "ab") as err:
        process.proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=process.workdir
        )
    process.wait_ready()
    return process


def get(address, path):
    """(status, body) of `GET http://<address><path>`."""
    with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
        return response.status, response.read().decode()


def test_one_config_serves_lb_and_proxy_with_their_own_admin_endpoints(
    mesh, proxies, clients, product, workdir, zk_server
):
    ports = [harness.free_port() for _ in range(3)]
    shared, proxy_admin, lb_admin = (f"127.0.0.1:{port}" for port in ports)
    settings = {
        "zk": zk_server.address,
        "product": product,
        "admin_address": shared,
        "proxy_admin_address": proxy_admin,
        "lb_admin_address": lb_admin,
        # rpc_proxy
        "proxy_address": str(workdir / "proxy.sock"),
        # rpc_lb
        "service": "echo",
        "front_host": "127.0.0.1",
        "front_port": str(harness.free_port()),
        "back_address": str(workdir / "back.sock"),
    }
    config = workdir / "config.ini"
    harness.write_config(config, settings)

    lb_dir, proxy_dir = workdir / "lb", workdir / "proxy"
    lb_dir.mkdir()
    proxy_dir.mkdir()
    lb = harness.Lb(mesh.lb_bin, lb_dir, settings)
    mesh.lbs.append(lb)
    start_on(lb, config)
    mesh.worker(lb, "w0")
    mesh.wait_workers(lb, 1)
    mesh.wait_registered(lb)

    proxy = harness.Proxy(proxies._binary, proxy_dir, settings)
    proxies.started.append(proxy)
    start_on(proxy, config)

    assert clients(proxy.address).whoami() == "w0"
    assert lb.alive() and proxy.alive()

    # Each binary answers on its own key's address, and not on the shared default.
    for name, address in (("rpc_lb", lb_admin), ("rpc_proxy", proxy_admin)):
        code, body = harness.wait_until(
            lambda address=address: get(address, "/healthz"),
            20,
            f"{name} /healthz on {address}",
        )
        assert code == 200, body
        code, text = get(address, "/metrics")
        assert code == 200
        assert f"{name}_requests_total" in text, f"{address} is not {name}'s:\n{text[:500]}"
    assert harness.connection_refused(shared)
