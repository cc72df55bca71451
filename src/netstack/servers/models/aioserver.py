"""Model 5, ``asyncio``: an :class:`asyncio.Protocol` on uvloop (or asyncio's own loop).

The loop calls ``data_received`` with whatever bytes arrived; the protocol feeds them to
the :class:`EchoSession` and ``transport.write``\\ s the echo, usually straight into the
socket without leaving the callback. There is no coroutine per connection, no future per
read and the fd stays registered for the connection's whole life: on uvloop the read,
the write and the readiness bookkeeping all run in C (libuv).

Idle timeout: one watchdog timer per connection, re-armed lazily as in the selectloop
model. The loop comes from :mod:`netstack.transport.loop` (uvloop when importable).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable
from typing import cast

from netstack.servers.models.base import (
    LISTEN_BACKLOG,
    STOP_CHECK_INTERVAL,
    EchoSession,
    ModelConfig,
    ModelServer,
    Stats,
    log_idle,
    log_peer_error,
)
from netstack.transport.loop import LoopName, run

logger = logging.getLogger(__name__)


class EchoProtocol(asyncio.Protocol):
    """One connection: bytes in, echoed frames out."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        config: ModelConfig,
        stats: Stats,
        connections: set[EchoProtocol],
    ) -> None:
        self._loop = loop
        self._config = config
        self._stats = stats
        self._connections = connections
        self._session = EchoSession(config.max_frame_bytes)
        self._conn_id = 0
        self._transport: asyncio.Transport | None = None
        self._last = 0.0
        self._watchdog: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[None] = loop.create_future()

    @property
    def transport(self) -> asyncio.Transport:
        assert self._transport is not None, "set in connection_made"
        return self._transport

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        self._conn_id = self._stats.connection_opened()
        self._stats.handler_started()
        self._connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        idle = self._config.idle_timeout
        if idle is not None:
            self._last = self._loop.time()
            self._watchdog = self._loop.call_later(idle, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self._watchdog is not None:
            self._last = self._loop.time()
        reply = self._session.receive(data)
        if reply.frames:
            self.transport.write(reply.data)
            self._stats.add(reply.frames, reply.payload_bytes)
        if reply.error is not None:
            log_peer_error(self._conn_id, reply.error)
            self.transport.close()

    def eof_received(self) -> bool | None:
        if (error := self._session.receive_eof()) is not None:
            log_peer_error(self._conn_id, error)
        return None  # let the transport close itself

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            logger.debug("x conn %d: %s", self._conn_id, exc, extra={"conn_id": self._conn_id})
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._connections.discard(self)
        self._stats.handler_finished()
        if not self.lost.done():
            self.lost.set_result(None)

    def _check_idle(self) -> None:
        idle = self._config.idle_timeout
        assert idle is not None
        left = self._last + idle - self._loop.time()
        if left > 0:
            self._watchdog = self._loop.call_later(left, self._check_idle)
            return
        log_idle(self._conn_id, idle)
        self.transport.close()


class AsyncioServer(ModelServer):
    """Serve with :class:`EchoProtocol` on an asyncio loop.

    Args:
        loop: ``auto`` (uvloop when importable), ``asyncio`` or ``uvloop``.
    """

    name = "asyncio"

    def __init__(
        self,
        listener: socket.socket,
        config: ModelConfig | None = None,
        *,
        loop: LoopName = "auto",
    ) -> None:
        super().__init__(listener, config)
        self.loop_name: LoopName = loop

    def serve(self, stop: threading.Event) -> None:
        run(self._serve_until_event(stop), loop=self.loop_name)

    async def _serve_until_event(self, stop: threading.Event) -> None:
        # A threading.Event cannot wake a loop; a short poll bridges it.
        done = asyncio.Event()

        async def watch() -> None:
            while not stop.is_set():  # noqa: ASYNC110 - a threading.Event cannot wake a loop
                await asyncio.sleep(STOP_CHECK_INTERVAL)
            done.set()

        watcher = asyncio.create_task(watch())
        try:
            await self.serve_async(done)
        finally:
            watcher.cancel()

    async def serve_async(
        self, stop: asyncio.Event, *, ready: Callable[[], None] | None = None
    ) -> None:
        """Serve on the running loop until ``stop`` is set, then close every connection.

        Args:
            stop: set it to shut down.
            ready: called once the server is accepting connections.
        """
        loop = asyncio.get_running_loop()
        connections: set[EchoProtocol] = set()
        # asyncio closes the socket it serves on; hand it a duplicate so the caller's
        # listener stays the caller's to close.
        server = await loop.create_server(
            lambda: EchoProtocol(loop, self.config, self.stats, connections),
            sock=self.listener.dup(),
            backlog=LISTEN_BACKLOG,
        )
        if ready is not None:
            ready()
        try:
            await stop.wait()
        finally:
            server.close()
            closing = list(connections)
            for conn in closing:
                conn.transport.abort()  # close() would wait to flush to a stalled peer
            await server.wait_closed()
            # Let connection_lost callbacks run before the loop goes away.
            await asyncio.gather(*(conn.lost for conn in closing))
