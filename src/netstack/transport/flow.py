"""FlowControl: backpressure in both directions for one stream connection.

Two reasons stop us reading from a peer:

* our writes to it are backed up (the transport called ``pause_writing``): a peer that
  never reads must not make us buffer its echoes without bound;
* the application has too many unprocessed events (``set_backlog``).

Reading resumes once neither holds. ``drain()`` lets coroutines wait for the write buffer to
fall below the low-water mark, like ``asyncio.StreamWriter.drain``.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Final

from netstack.errors import ConnectionClosed

# Events queued but not yet handled before we stop reading; resume at half. The same order
# as uvicorn's per-connection flow control and the asyncio streams 64 KiB default.
DEFAULT_MAX_BACKLOG: Final = 64


class FlowControl:
    """Pause/resume reading a transport, and ``drain()`` for writers.

    Args:
        transport: the connection's transport.
        high: write-buffer high-water mark in bytes (``Limits.write_buffer_high_bytes``).
        low: low-water mark (``Limits.write_buffer_low_bytes``).
        max_backlog: unprocessed events that pause reading.
    """

    __slots__ = (
        "_app_paused",
        "_closed",
        "_transport",
        "_waiters",
        "max_backlog",
        "pauses",
        "reading_paused",
        "writing_paused",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        *,
        high: int,
        low: int,
        max_backlog: int = DEFAULT_MAX_BACKLOG,
    ) -> None:
        # uvloop's transports do not subclass asyncio.Transport, so no isinstance checks.
        transport.set_write_buffer_limits(high=high, low=low)
        self._transport = transport
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed = False
        self._app_paused = False
        self.max_backlog = max_backlog
        self.writing_paused = False
        self.reading_paused = False
        self.pauses = 0  # times reading was paused, for tests and stats

    def pause_writing(self) -> None:
        """The transport's write buffer went over the high-water mark."""
        self.writing_paused = True
        self._update()

    def resume_writing(self) -> None:
        """The write buffer drained below the low-water mark."""
        self.writing_paused = False
        self._wake(None)
        self._update()

    def set_backlog(self, pending: int) -> None:
        """Report how many events the application has not processed yet."""
        if self._app_paused:
            if pending <= self.max_backlog // 2:
                self._app_paused = False
                self._update()
        elif pending >= self.max_backlog:
            self._app_paused = True
            self._update()

    async def drain(self) -> None:
        """Wait until the write buffer is below the low-water mark.

        Raises:
            ConnectionClosed: the connection is (or becomes) closed.
        """
        if self._closed:
            raise ConnectionClosed("connection lost")
        if not self.writing_paused:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def connection_lost(self) -> None:
        """Fail pending ``drain()`` calls; nothing will be written any more."""
        self._closed = True
        self._wake(ConnectionClosed("connection lost"))

    def _wake(self, exc: Exception | None) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                if exc is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(exc)

    def _update(self) -> None:
        want = self.writing_paused or self._app_paused
        if want == self.reading_paused or self._closed or self._transport.is_closing():
            return
        if want:
            self._transport.pause_reading()
            self.pauses += 1
        else:
            self._transport.resume_reading()
        self.reading_paused = want
