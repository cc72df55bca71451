"""Model 2, ``threaded``: one OS thread per connection.

The accept loop starts a thread for every connection it accepts. Blocking code stays
simple and connections overlap, because CPython releases the GIL around every blocking
``recv``/``send``. The costs: a thread's stack and kernel task per connection, a GIL
hand-off and a context switch per message, and no bound on the number of threads.
"""

from __future__ import annotations

import threading

from netstack.servers.models.base import ModelServer, accept_until, serve_blocking_connection


class ThreadedServer(ModelServer):
    """Serve each connection in its own thread."""

    name = "threaded"

    def serve(self, stop: threading.Event) -> None:
        threads: list[threading.Thread] = []
        accepted = 0
        try:
            while (conn := accept_until(self.listener, stop)) is not None:
                accepted += 1
                thread = threading.Thread(
                    target=serve_blocking_connection,
                    args=(conn, self.config, self.stats, stop),
                    name=f"threaded-conn-{accepted}",
                    daemon=True,
                )
                thread.start()
                # Forget finished threads so a long run does not keep every handle.
                threads = [t for t in threads if t.is_alive()]
                threads.append(thread)
        finally:
            stop.set()  # also when accept raised: handlers see it within one interval
            for thread in threads:
                thread.join()
