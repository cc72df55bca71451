"""Model 4, ``selectloop``: the echo protocol on the from-scratch :mod:`.selectloop`.

One thread, one :class:`~netstack.servers.models.selectloop.Task` per connection. A task
reads with ``await loop.sock_recv``, feeds the :class:`EchoSession`, and writes the echo
with ``await loop.sock_sendall``; while it waits, the loop serves the others.

Idle timeout without a timer per message: each connection has one watchdog timer. A
``recv`` only records the time; when the watchdog fires it re-arms itself for the time
left, or, once the connection has been silent for ``idle_timeout``, cancels the task.
The stop event is a ``threading.Event``, which cannot wake a selector, so a timer checks
it every :data:`~netstack.servers.models.base.STOP_CHECK_INTERVAL`.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

from netstack.servers.models.base import (
    RECV_BYTES,
    STOP_CHECK_INTERVAL,
    EchoSession,
    ModelServer,
    log_idle,
    log_peer_error,
)
from netstack.servers.models.selectloop import CancelledError, SelectLoop, Task, TimerHandle

logger = logging.getLogger(__name__)


class SelectLoopServer(ModelServer):
    """Serve every connection as a task on one :class:`SelectLoop`."""

    name = "selectloop"

    def serve(self, stop: threading.Event) -> None:
        loop = SelectLoop()
        try:
            loop.run_until_complete(self._main(loop, stop))
        finally:
            loop.close()

    async def _main(self, loop: SelectLoop, stop: threading.Event) -> None:
        self.listener.setblocking(False)
        tasks: set[Task[None]] = set()
        acceptor = loop.create_task(self._accept(loop, tasks))
        while not stop.is_set() and not acceptor.done():
            await loop.sleep(STOP_CHECK_INTERVAL)
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        for task in [acceptor, *tasks]:
            with contextlib.suppress(CancelledError):
                await task

    async def _accept(self, loop: SelectLoop, tasks: set[Task[None]]) -> None:
        while True:
            try:
                conn, _addr = await loop.sock_accept(self.listener)
            except OSError as exc:  # EMFILE, ECONNABORTED: keep listening
                logger.warning("accept failed: %s", exc)
                await loop.sleep(STOP_CHECK_INTERVAL)
                continue
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._serve_connection(loop, conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    async def _serve_connection(self, loop: SelectLoop, conn: socket.socket) -> None:
        stats = self.stats
        conn_id = stats.connection_opened()
        stats.handler_started()
        session = EchoSession(self.config.max_frame_bytes)
        idle = self.config.idle_timeout
        watchdog = _Watchdog(loop, idle) if idle is not None else None
        try:
            while True:
                data = await loop.sock_recv(conn, RECV_BYTES)
                if watchdog is not None:
                    watchdog.last = loop.time()
                if not data:
                    if (eof_error := session.receive_eof()) is not None:
                        log_peer_error(conn_id, eof_error)
                    return
                reply = session.receive(data)
                if reply.frames:
                    await loop.sock_sendall(conn, reply.data)
                    stats.add(reply.frames, reply.payload_bytes)
                if reply.error is not None:
                    log_peer_error(conn_id, reply.error)
                    return
        except CancelledError:
            if watchdog is None or not watchdog.fired:
                raise
            log_idle(conn_id, watchdog.idle_timeout)
        except OSError as exc:
            logger.debug("x conn %d: %s", conn_id, exc, extra={"conn_id": conn_id})
        finally:
            if watchdog is not None:
                watchdog.cancel()
            stats.handler_finished()
            conn.close()


class _Watchdog:
    """Cancels the current task once ``last`` is ``idle_timeout`` in the past."""

    def __init__(self, loop: SelectLoop, idle_timeout: float) -> None:
        task = loop.current_task()
        assert task is not None, "a watchdog is created inside a task"
        self._loop = loop
        self._task = task
        self.idle_timeout = idle_timeout
        self.last = loop.time()
        self.fired = False
        self._timer: TimerHandle = loop.call_later(idle_timeout, self._check)

    def _check(self) -> None:
        left = self.last + self.idle_timeout - self._loop.time()
        if left > 0:
            self._timer = self._loop.call_later(left, self._check)
        else:
            self.fired = True
            self._task.cancel()

    def cancel(self) -> None:
        self._timer.cancel()
