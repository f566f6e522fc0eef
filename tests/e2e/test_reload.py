"""SIGHUP reloads rpc_proxy's configuration (issue 15, CONTRACT section 9 "Zero downtime and
reload"). Real ZooKeeper, a real echo backend and rpc_proxy; a Thrift-generated client on one
connection that stays open through every reload.

1. A changed `request_timeout_ms` (5000 -> 800) is in force for the next call on the same
   connection: `slow(1500)` succeeds before the reload and fails with code 6 after it, within
   800 ms + margin; no client connection was closed (the same connection keeps working and
   the proxy counted no new connection).
2. A broken file: the proxy logs it, keeps its configuration (the 800 ms timeout still holds),
   stays alive and serving, and `rpc_proxy_config_reloads_total{result="error"}` moves; a key
   that needs a restart (`max_connections`) is named in a warning and not applied.
"""

import signal
import time

from test_resilience import admin_address, http_get, total
from thrift.Thrift import TApplicationException

import harness

INTERNAL_ERROR = 6


def reloads(proxy, result):
    return total(http_get(proxy, "/metrics"), "rpc_proxy_config_reloads_total", result=result)


def reload_with(proxy, result, **changes):
    """Rewrites the proxy's config.ini with `changes`, sends SIGHUP and waits until the reload
    is counted with `result`."""
    before = reloads(proxy, result)
    proxy.settings.update({key: str(value) for key, value in changes.items()})
    harness.write_config(proxy.config_path, proxy.settings)
    proxy.send_signal(signal.SIGHUP)
    harness.wait_until(
        lambda: reloads(proxy, result) > before,
        10,
        lambda: f"reload counted as {result}\n{proxy.output()}",
    )


def test_sighup_applies_request_timeout_keeps_connections_and_survives_a_bad_file(
    backends, proxies, clients
):
    backends.start("A")
    proxy = proxies.start(request_timeout_ms=5000, admin_address=admin_address())
    conn = clients(proxy.address, timeout=10.0)
    assert conn.slow(1500, "before") == "before"
    # The readiness probe of the harness made one connection too.
    connections = total(http_get(proxy, "/metrics"), "rpc_proxy_client_connections_total")

    reload_with(proxy, "ok", request_timeout_ms=800)
    start = time.monotonic()
    try:
        conn.slow(1500, "after")
        raise AssertionError("slow(1500) succeeded past an 800 ms request timeout")
    except TApplicationException as exc:
        took = time.monotonic() - start
        assert exc.type == INTERNAL_ERROR, exc.message
        assert "timeout" in exc.message, exc.message
    assert took < 1.45, f"the old 5 s timeout still held: {took:.2f} s"
    assert conn.echo("same connection") == "same connection"

    text = proxy.output()
    assert "configuration reloaded" in text, text
    reload_with(proxy, "ok", max_connections=5)
    harness.wait_until(
        lambda: "max_connections" in proxy.output(), 5, "max_connections named in a warning"
    )

    # A broken file: refused, counted, the running configuration kept.
    proxy.settings["request_timeout_ms"] = "soon"
    reload_with(proxy, "error")
    assert proxy.alive()
    assert conn.echo("still serving") == "still serving"
    start = time.monotonic()
    try:
        conn.slow(1500, "kept")
        raise AssertionError("the refused file's keys were applied")
    except TApplicationException as exc:
        assert exc.type == INTERNAL_ERROR, exc.message
    assert time.monotonic() - start < 1.45
    metrics = http_get(proxy, "/metrics")
    assert total(metrics, "rpc_proxy_client_connections_total") == connections, "reconnected"
    print(
        "RESULT reload: ok",
        reloads(proxy, "ok"),
        "error",
        reloads(proxy, "error"),
        f"timeout after reload {took:.2f} s",
    )
