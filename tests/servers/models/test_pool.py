"""The pool model: bounded threads, a semaphore cap on running handlers, exact statistics."""

from __future__ import annotations

import threading

from netstack.servers.models.base import Stats
from netstack.servers.models.race import demonstrate
from tests.helpers import TIMEOUT, poll_until
from tests.servers.models.support import echo, running


def test_semaphore_caps_running_handlers() -> None:
    with running("pool", pool_threads=6, max_running=2) as srv:
        stats = srv.server.stats
        clients = [srv.connect() for _ in range(5)]
        try:
            for i, client in enumerate(clients):
                client.sendall(b"\0\0\0\x01" + bytes([i]))
            # Two handlers run; the other three workers hold a connection but wait on the
            # semaphore. Each client closing lets exactly one more in.
            for done in range(5):
                poll_until(lambda done=done: stats.snapshot().messages == min(done + 2, 5))
                assert stats.snapshot().active <= 2
                clients[done].close()
            poll_until(lambda: stats.snapshot().active == 0)
        finally:
            for client in clients:
                client.close()
        snap = stats.snapshot()
        assert snap.peak_active == 2  # reached, never exceeded
        assert snap.connections == 5
        workers = [t for t in threading.enumerate() if t.name.startswith("pool-")]
        assert len(workers) == 6


def test_stats_under_contention_are_exact() -> None:
    clients, per_client = 8, 150
    errors: list[BaseException] = []

    def client(srv, i: int) -> None:
        try:
            with srv.connect() as sock:
                for n in range(per_client):
                    payload = bytes([i]) * (n % 7)
                    assert echo(sock, payload) == payload
        except BaseException as exc:
            errors.append(exc)

    with running("pool", pool_threads=8, max_running=8) as srv:
        threads = [threading.Thread(target=client, args=(srv, i)) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        assert not errors
        poll_until(lambda: srv.server.stats.snapshot().messages == clients * per_client)
        snap = srv.server.stats.snapshot()
        assert snap.payload_bytes == clients * sum(n % 7 for n in range(per_client))
        assert snap.connections == clients


def test_stats_lock_keeps_every_update() -> None:
    stats = Stats()

    def hammer() -> None:
        for _ in range(5000):
            stats.add(1, 3)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert (snap.messages, snap.payload_bytes) == (20_000, 60_000)


def test_race_loses_updates_without_the_lock() -> None:
    result = demonstrate(threads=4, per_thread=500)
    assert result.expected == 2000
    assert result.lost > 0
    assert result.unsafe < result.expected
    assert result.lost_locked == 0
    assert result.locked == result.expected
