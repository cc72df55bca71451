"""Model 3, ``pool``: a fixed pool of worker threads fed by a queue of connections.

Theory of operation
-------------------
The accept loop (the calling thread) puts each accepted socket on ``_queue``, a
``queue.Queue`` with no size bound: the listen backlog and this queue together hold the
connections that wait. ``pool_threads`` workers each take one connection at a time and
serve it to the end. Three synchronisation primitives, each with one job:

* ``queue.Queue`` hands connections from the acceptor to the workers. It is a condition
  variable around a deque: a worker sleeps in ``get()`` until there is work, without
  spinning.
* ``threading.BoundedSemaphore(max_running)`` caps how many handlers *run* at once,
  independently of how many threads exist. A worker that has taken a connection acquires
  it before serving and releases it after. It stands for a scarce downstream resource
  (database connections, licences, CPU-heavy work) that must be limited below the thread
  count. *Bounded* makes a release without a matching acquire raise ``ValueError``
  instead of silently raising the cap.
* the ``threading.Lock`` inside :class:`~netstack.servers.models.base.Stats` is a mutex
  around the shared counters (messages, bytes, connections, running handlers), whose
  read-add-write updates would otherwise lose increments (``race.py``).

Invariants: at most ``pool_threads`` threads serve (the pool size bounds memory and
scheduler load, whatever the load); at most ``max_running`` handlers are between acquire
and release, checked by ``stats.peak_active``; every accepted socket is closed exactly
once, by the worker that served it or, at shutdown, by the drain of ``_queue``.

Shutdown: the acceptor stops accepting, puts one ``None`` per worker on the queue, and
joins the workers; a worker that meets ``None`` exits. Workers serving a connection see
the stop event within one check interval. Connections still queued are closed unserved.
"""

from __future__ import annotations

import queue
import socket
import threading

from netstack.servers.models.base import (
    ModelConfig,
    ModelServer,
    accept_until,
    serve_blocking_connection,
)


class PoolServer(ModelServer):
    """Serve connections with ``pool_threads`` workers, ``max_running`` at a time."""

    name = "pool"

    def __init__(self, listener: socket.socket, config: ModelConfig | None = None) -> None:
        super().__init__(listener, config)
        self._queue: queue.Queue[socket.socket | None] = queue.Queue()
        self._running = threading.BoundedSemaphore(self.config.max_running)

    def serve(self, stop: threading.Event) -> None:
        workers = [
            threading.Thread(target=self._work, args=(stop,), name=f"pool-{i}", daemon=True)
            for i in range(self.config.pool_threads)
        ]
        for worker in workers:
            worker.start()
        try:
            while (conn := accept_until(self.listener, stop)) is not None:
                self._queue.put(conn)
        finally:
            stop.set()
            for _ in workers:
                self._queue.put(None)
            for worker in workers:
                worker.join()
            self._drain()

    def _work(self, stop: threading.Event) -> None:
        while (conn := self._queue.get()) is not None:
            if stop.is_set():
                conn.close()
                continue
            with self._running:
                serve_blocking_connection(conn, self.config, self.stats, stop)

    def _drain(self) -> None:
        while True:
            try:
                conn = self._queue.get_nowait()
            except queue.Empty:
                return
            if conn is not None:
                conn.close()
