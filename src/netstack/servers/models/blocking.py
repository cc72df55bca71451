"""Model 1, ``blocking``: one thread, one connection at a time.

Accept a connection, serve it until it closes, then accept the next. Every other client
waits in the kernel's listen backlog: it has connected (the kernel finished the handshake)
and may have sent its first frame, but nobody reads it until the current client leaves.
This is the baseline the other four models improve on.
"""

from __future__ import annotations

import threading

from netstack.servers.models.base import ModelServer, accept_until, serve_blocking_connection


class BlockingServer(ModelServer):
    """Serve connections one after another in the calling thread."""

    name = "blocking"

    def serve(self, stop: threading.Event) -> None:
        while (conn := accept_until(self.listener, stop)) is not None:
            serve_blocking_connection(conn, self.config, self.stats, stop)
