"""Stream framing codecs: length-prefixed frames and line frames, plus UDP request ids.

Theory of operation
-------------------
A codec turns a byte stream into :data:`Frame` events and frames into bytes. It has the
shape of every netstack core (``receive_data``, ``receive_eof``, ``events_received``,
``send``, ``data_to_send``), so one transport class drives any of them.

Events are plain ``bytes``, not frozen dataclasses (a deliberate deviation from
shared/STYLE.md §2). A codec has exactly one event type, a complete payload, so a wrapper
carries no information that the type does not, and building one was the largest single cost
on the framed echo hot path: a ``@dataclass(frozen=True, slots=True)`` with one field costs
about 0.2 µs to build on CPython 3.11, and dropping it cut the whole in-process echo path
from about 1.07 to 0.74 µs per message (bench/echo_inprocess.py; bench/RESULTS.md, "## Echo").
``bytes`` is already immutable and hashable, which is what a frozen event gives.
:data:`Frame` names the type for readers and annotations.

States::

    OPEN --receive_eof (buffer empty)--------> CLOSED
    OPEN --receive_eof (partial frame)-------> ERROR   raises RemoteProtocolError
    OPEN --bad bytes / limit exceeded--------> ERROR   raises RemoteProtocolError
    CLOSED/ERROR --receive_data/receive_eof--> unchanged, raises LocalProtocolError

Invariants:

* Limits are checked before a body is buffered. For length frames the 4-byte header
  announces the size, so an oversized frame is refused as soon as its header arrives. For
  line frames a missing terminator is refused once more than ``max_line_bytes`` (+1 for a
  possible ``\\r``) bytes are waiting.
* Frames completed before an error stay in :meth:`events_received`: the caller may still
  serve them (nothing accepted is lost) and then close.
* Splitting the input differently never changes the events (tests feed it whole, a byte at
  a time and at random splits).
"""

from __future__ import annotations

import enum
import struct
from typing import Final, Literal, TypeAlias

from netstack.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError
from netstack.proto.buffer import ReceiveBuffer

HEADER: Final = struct.Struct("!I")
"""Length prefix: 4-byte unsigned big-endian (network order), as in most binary protocols."""

_HEADER_SIZE: Final = HEADER.size
_pack_header: Final = HEADER.pack
_unpack_header: Final = HEADER.unpack_from

# Prefixes of small frames, built once: a tuple index is cheaper per frame than a pack call.
_SMALL_HEADERS: Final = tuple(_pack_header(n) for n in range(256))

REQUEST_ID: Final = struct.Struct("!I")
"""UDP request id prefixed to every datagram so replies can be matched to requests."""


Frame: TypeAlias = bytes
"""One complete message, without its length prefix or line terminator (see the module
docstring for why an event is plain ``bytes``)."""


class State(enum.Enum):
    OPEN = "open"
    CLOSED = "closed"
    ERROR = "error"


_OPEN: Final = State.OPEN  # a module global reads faster than an Enum attribute


class Codec:
    """Shared event queue, outgoing queue and state for both codecs."""

    limit_name: str = ""

    def __init__(self, limit: int) -> None:
        if limit <= 0:
            raise ValueError(f"{self.limit_name} must be > 0")
        self.limit = limit
        self.state = State.OPEN
        self._buffer = ReceiveBuffer()
        self._events: list[Frame] = []
        self._outgoing: list[bytes] = []

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; complete frames become events.

        Raises:
            LimitExceeded: a frame is larger than the limit (named in ``.limit``).
            RemoteProtocolError: the bytes are not valid framing.
            LocalProtocolError: the codec is already closed.
        """
        self._check_open("receive_data")
        self._buffer.feed(data)
        try:
            self._parse()
        except RemoteProtocolError:
            self.state = State.ERROR
            raise

    def receive_eof(self) -> None:
        """The peer closed its side.

        Raises:
            RemoteProtocolError: the stream ended inside a frame.
        """
        self._check_open("receive_eof")
        if self._buffer:
            self.state = State.ERROR
            raise RemoteProtocolError(
                f"connection closed inside a frame ({len(self._buffer)} bytes pending)"
            )
        self.state = State.CLOSED

    def events_received(self) -> list[Frame]:
        """Drain and return the frames completed so far."""
        events, self._events = self._events, []
        return events

    def send(self, frame: Frame) -> None:
        """Queue ``frame`` for sending; fetch its bytes with :meth:`data_to_send`."""
        self._outgoing.append(self.encode(frame))

    def data_to_send(self) -> list[bytes]:
        """Drain and return the bytes queued by :meth:`send`."""
        out, self._outgoing = self._outgoing, []
        return out

    def encode(self, payload: bytes) -> bytes:  # pragma: no cover - abstract
        raise NotImplementedError

    def _parse(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_open(self, what: str) -> None:
        if self.state is not State.OPEN:
            raise LocalProtocolError(f"{what} called in state {self.state.value}")


class LengthPrefixedCodec(Codec):
    """Frames are a 4-byte big-endian length followed by that many bytes.

    Args:
        max_frame_bytes: largest body accepted or sent.
    """

    limit_name = "max_frame_bytes"

    def __init__(self, max_frame_bytes: int = 1 << 20) -> None:
        super().__init__(max_frame_bytes)
        self._partial = False  # bytes of an incomplete frame are buffered

    def receive_data(self, data: bytes) -> None:
        """Feed received bytes; complete frames become events.

        Fast path (the common case of whole frames per read): with nothing buffered, frames
        are cut straight out of ``data`` and only an incomplete tail is buffered, which
        saves a copy into and out of the buffer per frame. The outcome is the same as
        :meth:`Codec.receive_data`'s for any split of the input.

        Raises:
            LimitExceeded: a frame is larger than ``max_frame_bytes``.
            LocalProtocolError: the codec is already closed.
        """
        if self._partial or self.state is not _OPEN:
            Codec.receive_data(self, data)
            self._partial = bool(self._buffer)
            return
        end_of_data = len(data)
        if end_of_data >= _HEADER_SIZE:
            (size,) = _unpack_header(data)
            if end_of_data == _HEADER_SIZE + size and size <= self.limit:
                self._events.append(data[_HEADER_SIZE:])  # exactly one frame
                return
        pos = 0
        limit = self.limit
        events = self._events
        while end_of_data - pos >= _HEADER_SIZE:
            (size,) = _unpack_header(data, pos)
            if size > limit:
                self._buffer.feed(data[pos:])  # as the general path leaves it
                self.state = State.ERROR
                raise LimitExceeded("max_frame_bytes", limit, actual=size)
            end = pos + _HEADER_SIZE + size
            if end > end_of_data:
                break
            events.append(data[pos + _HEADER_SIZE : end])
            pos = end
        if pos < end_of_data:
            self._buffer.feed(data[pos:])
            self._partial = True

    def send(self, frame: Frame) -> None:
        """Queue ``frame`` with its length prefix (:meth:`encode`, inlined: a hot path).

        Raises:
            LocalProtocolError: the frame is larger than ``max_frame_bytes``.
        """
        size = len(frame)
        if size > self.limit:
            self.encode(frame)  # raises
        self._outgoing.append((_SMALL_HEADERS[size] if size < 256 else _pack_header(size)) + frame)

    def encode(self, payload: bytes) -> bytes:
        """Return ``payload`` with its length prefix.

        Raises:
            LocalProtocolError: ``payload`` is larger than ``max_frame_bytes``.
        """
        if len(payload) > self.limit:
            raise LocalProtocolError(
                f"frame of {len(payload)} bytes exceeds max_frame_bytes={self.limit}"
            )
        return HEADER.pack(len(payload)) + payload

    def _parse(self) -> None:
        # The header stays in the buffer until its body is complete, so "bytes buffered"
        # always means "inside a frame" (receive_eof relies on it).
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack(self._buffer.peek(HEADER.size))
            if size > self.limit:
                raise LimitExceeded("max_frame_bytes", self.limit, actual=size)
            frame = self._buffer.read_exact(HEADER.size + size)
            if frame is None:
                return
            self._events.append(frame[HEADER.size :])


class LineCodec(Codec):
    """Frames are lines ending in ``\\n``; a ``\\r`` just before it is dropped too.

    Args:
        max_line_bytes: longest line accepted or sent, terminator excluded.
    """

    limit_name = "max_line_bytes"

    def __init__(self, max_line_bytes: int = 64 * 1024) -> None:
        super().__init__(max_line_bytes)

    def encode(self, payload: bytes) -> bytes:
        """Return ``payload`` followed by ``\\n``.

        Raises:
            LocalProtocolError: ``payload`` contains ``\\n`` or is longer than the limit.
        """
        if b"\n" in payload:
            raise LocalProtocolError("a line frame cannot contain a newline")
        if len(payload) > self.limit:
            raise LocalProtocolError(
                f"line of {len(payload)} bytes exceeds max_line_bytes={self.limit}"
            )
        return payload + b"\n"

    def _parse(self) -> None:
        while (raw := self._buffer.read_until(b"\n")) is not None:
            line = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
            if len(line) > self.limit:
                raise LimitExceeded("max_line_bytes", self.limit, actual=len(line))
            self._events.append(line)
        # No terminator yet: refuse to buffer more than one line can hold (+1 for a '\r').
        pending = len(self._buffer)
        if pending > self.limit + 1 or (
            pending == self.limit + 1 and not self._buffer.peek(pending).endswith(b"\r")
        ):
            raise LimitExceeded("max_line_bytes", self.limit, actual=pending)


Framing = Literal["length", "line"]


def make_codec(framing: Framing, *, max_frame_bytes: int, max_line_bytes: int) -> Codec:
    """Return a fresh codec for ``framing``."""
    if framing == "length":
        return LengthPrefixedCodec(max_frame_bytes)
    return LineCodec(max_line_bytes)


def encode_datagram(request_id: int, payload: bytes, *, max_datagram_bytes: int) -> bytes:
    """Return a UDP datagram: 4-byte request id, then ``payload``.

    Raises:
        LocalProtocolError: the datagram would exceed ``max_datagram_bytes`` or the id does
            not fit in 32 bits.
    """
    if not 0 <= request_id <= 0xFFFFFFFF:
        raise LocalProtocolError(f"request id {request_id} does not fit in 32 bits")
    size = REQUEST_ID.size + len(payload)
    if size > max_datagram_bytes:
        raise LocalProtocolError(
            f"datagram of {size} bytes exceeds max_datagram_bytes={max_datagram_bytes}"
        )
    return REQUEST_ID.pack(request_id) + payload


def decode_datagram(datagram: bytes, *, max_datagram_bytes: int) -> tuple[int, bytes]:
    """Split a datagram into (request id, payload).

    Raises:
        LimitExceeded: the datagram is larger than ``max_datagram_bytes``.
        RemoteProtocolError: it is too short to hold a request id.
    """
    if len(datagram) > max_datagram_bytes:
        raise LimitExceeded("max_datagram_bytes", max_datagram_bytes, actual=len(datagram))
    if len(datagram) < REQUEST_ID.size:
        raise RemoteProtocolError(f"datagram of {len(datagram)} bytes has no request id")
    (request_id,) = REQUEST_ID.unpack_from(datagram)
    return request_id, datagram[REQUEST_ID.size :]
