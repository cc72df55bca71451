"""``wsgi.input`` for request bodies that arrive while the application runs in a thread.

The event loop feeds de-chunked body bytes in; an application thread reads them out,
blocking until bytes arrive or the body ends. The buffer is bounded: when it holds more
than ``high`` bytes the loop stops reading the socket, and it resumes once the reader has
taken it below ``low``, so a slow application never makes us hold a whole upload in memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterator


class BodyError(OSError):
    """Reading the body failed: the client went away or stalled (the app sees an OSError)."""


class StreamingBody:
    """A blocking, bounded, file-like ``wsgi.input``.

    Args:
        resume: called (from the reading thread) when the buffer drains below ``low``
            after :meth:`feed` reported it full; it must be thread-safe.
        on_first_read: called once before the first read (sends ``100 Continue``).
        timeout: longest wait for the next bytes, seconds (``None``: no limit).
    """

    def __init__(
        self,
        *,
        resume: Callable[[], None],
        on_first_read: Callable[[], None] | None = None,
        high: int = 256 * 1024,
        low: int = 64 * 1024,
        timeout: float | None = None,
    ) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._chunks: deque[bytes] = deque()
        self._size = 0
        self._done = False
        self._error: str | None = None
        self._full = False
        self._resume = resume
        self._on_first_read = on_first_read
        self._high = high
        self._low = low
        self._timeout = timeout

    # ------------------------------------------------------------ loop side

    def feed(self, data: bytes) -> bool:
        """Add bytes; returns True when the buffer is full and reading should pause."""
        with self._cond:
            self._chunks.append(data)
            self._size += len(data)
            self._cond.notify()
            self._full = self._size > self._high
            return self._full

    def finish(self) -> None:
        """The body is complete."""
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def fail(self, reason: str) -> None:
        """The body will never complete (connection lost, timeout)."""
        with self._cond:
            if not self._done:
                self._error = reason
                self._done = True
            self._cond.notify_all()

    @property
    def done(self) -> bool:
        return self._done

    # ------------------------------------------------------------ app side

    def _wait(self) -> None:
        # Called with the lock held, until there are bytes or the body ended.
        if self._on_first_read is not None:
            callback, self._on_first_read = self._on_first_read, None
            self._cond.release()
            try:
                callback()
            finally:
                self._cond.acquire()
        while not self._chunks and not self._done:
            if not self._cond.wait(self._timeout):
                raise BodyError("timed out waiting for the request body")
        if self._error is not None and not self._chunks:
            raise BodyError(self._error)

    def _took(self, n: int) -> None:
        self._size -= n
        if self._full and self._size <= self._low:
            self._full = False
            self._resume()

    def read(self, size: int | None = -1) -> bytes:
        """Read up to ``size`` bytes (all that remain when ``size`` is -1 or None)."""
        with self._cond:
            if size is None or size < 0:
                parts = []
                while True:
                    self._wait()
                    if not self._chunks:
                        break
                    while self._chunks:
                        chunk = self._chunks.popleft()
                        self._took(len(chunk))
                        parts.append(chunk)
                return b"".join(parts)
            if size == 0:
                return b""
            self._wait()
            if not self._chunks:
                return b""
            chunk = self._chunks.popleft()
            if len(chunk) > size:
                self._chunks.appendleft(chunk[size:])
                chunk = chunk[:size]
            self._took(len(chunk))
            return chunk

    def readline(self, size: int | None = -1) -> bytes:
        """Read one line, at most ``size`` bytes when given."""
        limit = -1 if size is None else size
        parts: list[bytes] = []
        got = 0
        with self._cond:
            while limit < 0 or got < limit:
                self._wait()
                if not self._chunks:
                    break
                chunk = self._chunks.popleft()
                end = chunk.find(b"\n") + 1 or len(chunk)
                if limit >= 0:
                    end = min(end, limit - got)
                if end < len(chunk):
                    self._chunks.appendleft(chunk[end:])
                    chunk = chunk[:end]
                self._took(len(chunk))
                parts.append(chunk)
                got += len(chunk)
                if chunk.endswith(b"\n"):
                    break
        return b"".join(parts)

    def readlines(self, hint: int = -1) -> list[bytes]:
        lines: list[bytes] = []
        total = 0
        while True:
            line = self.readline()
            if not line:
                return lines
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                return lines

    def __iter__(self) -> Iterator[bytes]:
        while True:
            line = self.readline()
            if not line:
                return
            yield line
