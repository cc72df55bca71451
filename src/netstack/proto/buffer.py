"""ReceiveBuffer: bytes accumulate at the end and are consumed from the front.

Theory of operation
-------------------
Data is appended to a ``bytearray``. Consumers take bytes from the front, either a fixed
count (:meth:`ReceiveBuffer.read_exact`) or up to a delimiter
(:meth:`ReceiveBuffer.read_until`). Two things keep the total work linear in the bytes
received, whatever the split of the input (h11's ``_receivebuffer`` makes the same two
choices):

* Consumed bytes are not deleted one read at a time (that would shift the tail on every
  read). A start offset moves instead, and the dead prefix is dropped only when it is at
  least half the buffer, so each byte is moved O(1) times on average.
* A delimiter search remembers where it stopped (``_search_from``), so bytes that arrive
  one at a time are not rescanned from the start for every arrival.

Invariant: ``_start <= _search_from <= len(_data)`` and the unread bytes are
``_data[_start:]``.
"""

from __future__ import annotations


class ReceiveBuffer:
    """A byte buffer with linear-time delimiter search and front consumption."""

    __slots__ = ("_data", "_search_from", "_start")

    def __init__(self) -> None:
        self._data = bytearray()
        self._start = 0
        self._search_from = 0

    def __len__(self) -> int:
        """Number of unread bytes."""
        return len(self._data) - self._start

    def __bool__(self) -> bool:
        return len(self._data) > self._start

    def __bytes__(self) -> bytes:
        return bytes(self._data[self._start :])

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append received bytes."""
        self._data += data

    def peek(self, n: int) -> bytes:
        """Return up to ``n`` unread bytes without consuming them."""
        return bytes(self._data[self._start : self._start + n])

    def read_exact(self, n: int) -> bytes | None:
        """Consume and return exactly ``n`` bytes, or ``None`` if fewer are buffered."""
        if len(self) < n:
            return None
        out = bytes(self._data[self._start : self._start + n])
        self._consume(n)
        return out

    def read_until(self, delimiter: bytes) -> bytes | None:
        """Consume and return the bytes up to and including ``delimiter``.

        Returns ``None`` when the delimiter is not buffered yet; the next call resumes the
        search where this one stopped (minus a possible partial delimiter).
        """
        index = self._data.find(delimiter, self._search_from)
        if index < 0:
            # The delimiter may straddle the end: rescan its length - 1 last bytes next time.
            self._search_from = max(self._start, len(self._data) - len(delimiter) + 1)
            return None
        end = index + len(delimiter)
        out = bytes(self._data[self._start : end])
        self._consume(end - self._start)
        return out

    def _consume(self, n: int) -> None:
        self._start += n
        if self._start * 2 >= len(self._data):
            del self._data[: self._start]
            self._start = 0
        self._search_from = self._start
