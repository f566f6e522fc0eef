"""Many clients at once: every reply goes to its own caller."""

import threading
import uuid

import pytest

THREADS = 32
CALLS_PER_THREAD = 200


@pytest.mark.parametrize("concurrent", [False, True], ids=["plain", "concurrent"])
def test_concurrent_clients_get_their_own_replies(backends, proxies, clients, concurrent):
    # With concurrent endpoints the replies also come back from upstream out of order.
    backends.start("A", concurrent=concurrent)
    backends.start("B", concurrent=concurrent)
    proxy = proxies.start()
    conns = [clients(proxy.address, timeout=30) for _ in range(THREADS)]
    run = uuid.uuid4().hex[:8]
    start = threading.Barrier(THREADS)
    crossed, errors, done = [], [], []
    lock = threading.Lock()

    def worker(tid, conn):
        start.wait(timeout=30)
        ok = 0
        for i in range(CALLS_PER_THREAD):
            # Unique per call, with sizes from a few bytes to about 1 KiB.
            payload = f"{run}:{tid}:{i}:" + "p" * ((tid * 31 + i * 7) % 1000)
            try:
                reply = conn.echo(payload)
            except Exception as exc:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(f"thread {tid} call {i}: {exc!r}")
                return
            if reply != payload:
                with lock:
                    crossed.append((payload[:40], reply[:40]))
            else:
                ok += 1
        with lock:
            done.append(ok)

    threads = [threading.Thread(target=worker, args=(t, c)) for t, c in enumerate(conns)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads), "client threads still running"
    assert not errors, f"{len(errors)} calls failed, e.g. {errors[:3]}"
    assert not crossed, f"{len(crossed)} replies went to the wrong call, e.g. {crossed[:3]}"
    assert sum(done) == THREADS * CALLS_PER_THREAD
