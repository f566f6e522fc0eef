"""The status page (`GET /` of the admin endpoint, CONTRACT section 9) in a real browser:
headless Chromium from Debian (`chromium`) loads it from a real rpc_proxy and a real rpc_lb,
runs its script (`--virtual-time-budget`), and the test reads the DOM it dumps: a service
row (`data-service`) per registered service, an endpoint or worker row (`data-state`) per
endpoint or worker, charts with data, and names from ZooKeeper shown as text, never run.

Screenshots go to the test's tmp dir and to target/e2e/ (status-page.png, status-page-lb.png);
with RPC_SAVE_SCREENSHOT=1 also to docs/, where the README shows them.

A missing `chromium` fails these tests (scripts/setup.sh installs it); set RPC_CHROMIUM to use
another binary.
"""

import json
import os
import shutil
import subprocess
import threading
from html.parser import HTMLParser

import pytest
import test_lb
from test_admin import admin_settings, get, wait_http
from thrift.Thrift import TApplicationException

import harness

pytestmark = pytest.mark.timeout(180)

# ZooKeeper node names cannot hold `/`, so `<script>...</script>` cannot be a service name:
# the hostile service name is markup without a slash, and the hostile endpoint address (a
# unix path, which may hold any byte) carries the script element.
HOSTILE_SERVICE = "<img src=x onerror=document.title=1>\"'&"
HOSTILE_PATH = "/nonexistent-rpc-e2e/<script>alert(1)</script>"
WINDOW = "1280,900"
SAVED = harness.REPO_ROOT / "target" / "e2e"


@pytest.fixture(scope="session")
def chromium():
    path = os.environ.get("RPC_CHROMIUM") or shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found: run scripts/setup.sh (Debian package `chromium`)")
    return path


# The mesh fixtures of test_lb.py (rpc_lb and rpc_thrift workers).
lb_bin = test_lb.lb_bin
mesh = test_lb.mesh


def browse(chromium, url, profile, *args):
    """Runs headless Chromium on `url` with `args`; returns its stdout."""
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=5000",
        *args,
        url,
    ]
    done = subprocess.run(cmd, capture_output=True, timeout=90)
    assert done.returncode == 0, (
        f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr.decode(errors='replace')}"
    )
    return done.stdout.decode()


def dump_dom(chromium, url, tmp_path):
    return parse(browse(chromium, url, tmp_path / "profile-dom", "--dump-dom"))


def screenshot(chromium, url, tmp_path, name):
    """Saves a screenshot of `url` as `name` in tmp_path and target/e2e (and docs/ with
    RPC_SAVE_SCREENSHOT=1); returns the tmp_path one."""
    path = tmp_path / name
    browse(
        chromium,
        url,
        tmp_path / "profile-shot",
        f"--screenshot={path}",
        f"--window-size={WINDOW}",
    )
    assert path.exists() and path.stat().st_size > 10_000, f"no screenshot at {path}"
    destinations = [SAVED]
    if os.environ.get("RPC_SAVE_SCREENSHOT"):
        destinations.append(harness.REPO_ROOT / "docs")
    for directory in destinations:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, directory / name)
    print(f"screenshot: {path} (copied to {', '.join(map(str, destinations))})")
    return path


# === a small DOM, from the HTML Chromium dumps ===

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source"}


class Node:
    def __init__(self, tag, attrs, parent):
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children = []

    def text(self):
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag=None, **attrs):
        """Every element under this one with `tag` whose attributes include `attrs`
        (`class_` for `class`; None: the attribute is there with any value)."""
        found = []
        for child in self.children:
            if isinstance(child, str):
                continue
            wanted = {k.rstrip("_"): v for k, v in attrs.items()}
            if (tag is None or child.tag == tag) and all(
                k in child.attrs and (v is None or child.attrs[k] == v) for k, v in wanted.items()
            ):
                found.append(child)
            found.extend(child.all(tag, **attrs))
        return found

    def one(self, tag=None, **attrs):
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"{len(found)} <{tag} {attrs}> elements"
        return found[0]


class TreeBuilder(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: (v or "") for k, v in attrs}, self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag, attrs):
        self.current.children.append(Node(tag, {k: (v or "") for k, v in attrs}, self.current))

    def handle_endtag(self, tag):
        node = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data):
        self.current.children.append(data)


def parse(html):
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root


def service_rows(dom):
    """{service name: (its row, [its endpoint or worker rows])}, from each <tbody>."""
    rows = {}
    for body in dom.all("tbody"):
        (service,) = body.all("tr", class_="service")
        others = [tr for tr in body.all("tr") if tr is not service]
        rows[service.attrs["data-service"]] = (service, others)
    return rows


def assert_nothing_injected(dom, title):
    """No element came from a name: only the page's own script, no <img>, title intact."""
    scripts = dom.all("script")
    assert len(scripts) == 1, [s.text()[:80] for s in scripts]
    assert "alert(1)" not in scripts[0].text()
    assert dom.all("img") == []
    assert dom.one("title").text() == title


# === rpc_proxy ===


class Traffic:
    """A few client threads calling through the proxy until stopped: echo, short slow calls
    (so p50 and p99 differ) and an undeclared failure now and then (errors)."""

    def __init__(self, clients, address, services, threads=2):
        self._stop = threading.Event()
        self.calls = 0
        self._threads = [
            threading.Thread(target=self._run, args=(clients, address, service, i), daemon=True)
            for service in services
            for i in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, clients, address, service, index):
        conn = clients(address, service=service)
        n = 0
        while not self._stop.is_set() and n < 5000:
            n += 1
            if n % 25 == 0:
                try:
                    conn.fail("on purpose")
                except TApplicationException:
                    pass
            elif n % 4 == 0:
                conn.slow(5 + (n * 7 + index) % 40, "s")
            else:
                assert conn.echo(f"{index}-{n}") == f"{index}-{n}"
            self.calls += 1
            # Busier and quieter spells, so the charts have a shape.
            self._stop.wait((0.005, 0.02, 0.04)[(n // 150) % 3])

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=20)


def test_proxy_page_in_a_browser(backends, proxies, clients, zk, product, chromium, tmp_path):
    a, b = backends.start("A"), backends.start("B")
    a.register(zk, product, HOSTILE_SERVICE)
    harness.register_endpoint(zk, product, HOSTILE_SERVICE, HOSTILE_PATH)
    b.register(zk, product, "idle")
    proxy = proxies.start(**admin_settings())
    wait_http(proxy, "/healthz", 200)
    url = f"http://{proxy.settings['admin_address']}/"

    # The server's own markup, before any script: every row is there.
    code, html = get(proxy, "/")
    assert code == 200
    served = parse(html)
    assert served.one("main").attrs["data-rendered"] == "server"
    assert set(service_rows(served)) == {"echo", HOSTILE_SERVICE, "idle"}

    traffic = Traffic(clients, proxy.address, ["echo", HOSTILE_SERVICE])
    try:
        # The charts need a few samples (one a second) with calls in them; the picture for
        # the README a fuller minute.
        seconds = 30 if os.environ.get("RPC_SAVE_SCREENSHOT") else 2
        harness.wait_until(
            lambda: (
                traffic.calls > 100
                and _minute(proxy, "echo").get("seconds", 0) >= seconds
                and _minute(proxy, HOSTILE_SERVICE).get("calls_per_s", 0) > 0
            ),
            seconds + 30,
            "calls show in /status/history",
        )
        dom = dump_dom(chromium, url, tmp_path)
        screenshot(chromium, url, tmp_path, "status-page.png")
    finally:
        traffic.stop()

    assert dom.one("main").attrs["data-rendered"] == "script", "the script drew the page"
    assert "data-error" not in dom.one(id="updated").attrs, dom.one(id="updated").text()
    assert_nothing_injected(dom, "rpc_proxy status")
    assert dom.one(id="zookeeper").text() == "connected"
    rows = service_rows(dom)
    assert set(rows) == {"echo", HOSTILE_SERVICE, "idle"}

    echo, echo_endpoints = rows["echo"]
    assert echo.one("th").text() == "echo"
    assert sorted(tr.attrs["data-address"] for tr in echo_endpoints) == sorted(
        [a.address, b.address]
    )
    assert [tr.attrs["data-state"] for tr in echo_endpoints] == ["connected", "connected"]
    calls, errors, p50, p99 = [td for td in echo.all("td", class_="metric")]
    assert float(calls.one("span").text()) > 0, calls.text()
    assert p50.one("span").text().endswith(" ms") and p99.one("span").text().endswith(" ms")
    assert int(errors.one("span").text()) >= 1, "fail() calls are errors"
    for cell in (calls, p50, p99):
        assert cell.all("polyline"), "the chart has data"

    # The hostile name is text in the row and its attribute, and nothing else.
    hostile, hostile_endpoints = rows[HOSTILE_SERVICE]
    assert hostile.one("th").text() == HOSTILE_SERVICE
    states = {tr.attrs["data-address"]: tr.attrs["data-state"] for tr in hostile_endpoints}
    assert states[a.address] == "connected"
    assert states[HOSTILE_PATH] in ("backoff", "ejected"), states
    (bad,) = [tr for tr in hostile_endpoints if tr.attrs["data-address"] == HOSTILE_PATH]
    assert bad.all("td")[0].text() == HOSTILE_PATH

    idle, idle_endpoints = rows["idle"]
    assert [tr.attrs["data-state"] for tr in idle_endpoints] == ["idle"]
    assert idle.all("td", class_="metric")[0].one("span").text() == "0"


def _minute(proxy, service):
    """The last minute of `service` in /status/history (empty before two samples)."""
    code, body = get(proxy, "/status/history")
    assert code == 200, body
    for found in json.loads(body)["services"]:
        if found["name"] == service:
            return found["minute"] or {}
    return {}


# === rpc_lb ===


def test_lb_page_in_a_browser(mesh, clients, chromium, tmp_path):
    lb = mesh.lb(**admin_settings())
    worker = mesh.worker(lb, "w0", pool_size=2)
    mesh.wait_registered(lb)
    wait_http(lb, "/healthz", 200)
    direct = clients(lb.frontend)
    for n in range(5):
        assert direct.echo(f"m{n}") == f"m{n}"
    url = f"http://{lb.settings['admin_address']}/"

    dom = dump_dom(chromium, url, tmp_path)
    screenshot(chromium, url, tmp_path, "status-page-lb.png")

    assert dom.one("main").attrs["data-rendered"] == "script"
    assert_nothing_injected(dom, "rpc_lb status")
    rows = service_rows(dom)
    assert list(rows) == ["echo"]
    service, workers = rows["echo"]
    assert service.one("th").text() == "echo"
    assert service.one("span", class_="badge").text() == "registered"
    assert [(tr.attrs["data-state"], tr.attrs["data-pid"]) for tr in workers] == [
        ("ready", str(worker.pid))
    ]
    (row,) = workers
    cells = [td.text() for td in row.all("td")]
    assert cells[0] == f"pid {worker.pid}"
    assert cells[2] == "0 / 2", "nothing in flight, two slots"
    assert int(cells[3]) >= 5, "calls served"
    assert dom.one(id="queue").text() == "0"
    assert dom.one(id="ready").text() == "1 of 1"
