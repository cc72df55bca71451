"""The server side of an HTTP/1.1 connection, sans I/O.

Theory of operation
-------------------
Two halves, as in h11's ``_state.py``:

*Their side* is a :class:`~netstack.proto.http11.parse.RequestParser`. Every byte given
to :meth:`HTTPConnection.receive_data` is parsed at once, so a pipelining client's
requests all come out of one :meth:`events_received` call, in order. Each ``Request``
is also queued internally: responses are matched to requests first-in, first-out.

*Our side* is a small state machine over the response to the oldest unanswered request::

    IDLE --Response--> SEND_BODY --EndOfMessage--> IDLE        (keep-alive)
                                               \\-> MUST_CLOSE  (no keep-alive)
    IDLE --InformationalResponse(100)--> IDLE
    IDLE --InformationalResponse(101)--> SWITCHED_PROTOCOL      (Upgrade accepted)
    any  --close()--> CLOSED

The response framing is chosen when the ``Response`` is sent (RFC 9112 §6.3): no body for
HEAD, 1xx, 204 and 304; ``Content-Length`` when the application gave one (more or fewer
body bytes than declared is a :class:`~netstack.errors.LocalProtocolError`); chunked for
an HTTP/1.1 client otherwise; and for an HTTP/1.0 client, a body delimited by closing
the connection. The connection is kept alive only when the request allowed it, the
response did not say ``Connection: close`` and the body is not close-delimited.

Invariants: bytes leave only through :meth:`data_to_send`; after MUST_CLOSE or CLOSED
nothing more is parsed; a request that asked to switch protocols pauses the parser
until the response to it decides (101 switches, anything else resumes parsing). After
a 101, bytes given to :meth:`receive_data` are held raw for
:meth:`switched_protocol_data`, never parsed.

Errors: a :class:`~netstack.errors.RemoteProtocolError` from :meth:`receive_data` or
:meth:`receive_eof` leaves the connection CLOSED (its reply is the caller's to write). A
:class:`~netstack.errors.LocalProtocolError` from a ``send*`` method changes nothing, so
the caller may still send another response (a 500 or 502) instead.

Bytes held behind an upgrade request are parsed when the response to it ends: if they
are malformed, the connection is CLOSED after that response (nothing is raised from a
``send*`` method for the peer's fault).

CONNECT: the server role never opens a tunnel; any final response to a CONNECT request
resumes parsing, as if refused (a 2xx would be wrong: send 101 only to an Upgrade).

The caller (a server) must call :meth:`events_received` again after it finishes each
response: requests held behind an upgrade request may have become available without
new bytes arriving.
"""

from __future__ import annotations

import enum
from collections import deque

from netstack.config import HTTPLimits
from netstack.errors import LocalProtocolError, RemoteProtocolError
from netstack.proto.http11.events import (
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Headers,
    InformationalResponse,
    Request,
    Response,
)
from netstack.proto.http11.parse import RequestParser, connection_tokens, make_parser
from netstack.proto.http11.write import (
    LAST_CHUNK,
    encode_chunk,
    encode_headers,
    encode_trailers,
    status_line,
)


class State(enum.Enum):
    """Our side of the connection."""

    IDLE = "idle"
    SEND_BODY = "send_body"
    MUST_CLOSE = "must_close"
    SWITCHED_PROTOCOL = "switched_protocol"
    CLOSED = "closed"


class Framing(enum.Enum):
    """How the body of the response being sent is delimited."""

    NONE = "none"  # HEAD, 1xx, 204, 304: body bytes given are dropped
    LENGTH = "length"
    CHUNKED = "chunked"
    CLOSE = "close"  # HTTP/1.0 without Content-Length: the end is the connection's end


_NO_BODY_STATUS = frozenset({204, 304})
_FRAMING_HEADERS = frozenset({b"content-length", b"connection", b"transfer-encoding"})

# Serialised, checked header blocks with their framing facts, keyed by the header list.
# Servers send the same few header sets again and again. Bounded: emptied when full (so
# that a stream of one-off header sets cannot freeze it full of stale ones), and big
# blocks are never kept.
_HEAD_CACHE: dict[tuple[tuple[bytes, bytes], ...], tuple[bytes, int | None, bool, bool]] = {}
_HEAD_CACHE_SIZE = 512
_HEAD_CACHE_MAX_BLOCK = 2048


def _analyse(headers: Headers) -> tuple[bytes, int | None, bool, bool]:
    """Check and serialise ``headers``; return (block, Content-Length, has Connection,
    Connection has the ``close`` token).

    Raises:
        LocalProtocolError: a bad name or value, a malformed or repeated Content-Length,
            or a Transfer-Encoding (the framing is the connection's to choose).
    """
    length: int | None = None
    has_connection = False
    close = False
    for name, value in headers:
        if name not in _FRAMING_HEADERS:
            continue
        if name == b"content-length":
            if length is not None or not value.isdigit():
                raise LocalProtocolError("Content-Length must be given once, as digits")
            length = int(value)
        elif name == b"connection":
            has_connection = True
            if b"close" in connection_tokens(value):
                close = True
        else:
            raise LocalProtocolError("the server sets Transfer-Encoding itself")
    return encode_headers(headers)[:-2], length, has_connection, close


class HTTPConnection:
    """Server-role HTTP/1.1 connection: parse requests, frame responses.

    Args:
        limits: the :class:`~netstack.config.HTTPLimits` the parser enforces.
        parser: ``"httptools"`` (default) or ``"h11"``.
    """

    __slots__ = (
        "_events",
        "_framing",
        "_parser",
        "_remaining",
        "_requests",
        "_to_send",
        "keep_alive",
        "our_state",
        "their_eof",
    )

    def __init__(self, limits: HTTPLimits, parser: str = "httptools") -> None:
        self._events: list[Event] = []
        self._requests: deque[Request] = deque()
        self._parser: RequestParser = make_parser(parser, self._events, self._requests, limits)
        self._to_send: list[bytes] = []
        self._framing = Framing.NONE
        self._remaining = 0
        self.our_state = State.IDLE
        #: False once the connection must close after the current response.
        self.keep_alive = True
        #: The peer has closed its sending side.
        self.their_eof = False

    # ------------------------------------------------------------------- their side

    def receive_data(self, data: bytes) -> None:
        """Parse bytes from the peer.

        Raises:
            RemoteProtocolError: malformed input or a limit; ``status_hint`` is the reply.
        """
        state = self.our_state
        if state is State.MUST_CLOSE or state is State.CLOSED:
            return
        try:
            self._parser.feed(data)
        except RemoteProtocolError:
            self.close()
            raise

    def receive_eof(self) -> None:
        """The peer closed its sending side.

        Raises:
            RemoteProtocolError: when the close cut a request short.
        """
        if self.their_eof:
            return
        self.their_eof = True
        state = self.our_state
        if state is State.CLOSED:
            return
        if state is not State.MUST_CLOSE:
            try:
                self._parser.feed_eof()
            except RemoteProtocolError:
                self.close()
                raise
        elif self._parser.in_message:
            # We are closing and the peer gave up on a request we had already answered
            # (an early response to an unread body): no ConnectionClosed mid-message.
            return
        self._events.append(ConnectionClosed())

    def events_received(self) -> list[Event]:
        """Drain the events parsed so far (see the module docstring for the order)."""
        # The parser keeps appending to this list object, so copy it out and clear it.
        events = self._events
        if not events:
            return []
        drained = events.copy()
        events.clear()
        return drained

    @property
    def pending_requests(self) -> int:
        """Requests parsed whose response is not finished yet (pipelining depth)."""
        return len(self._requests)

    @property
    def current_request(self) -> Request | None:
        """The request the next response answers."""
        return self._requests[0] if self._requests else None

    # ------------------------------------------------------------------- our side

    def send(self, event: Event) -> None:
        """Queue ``event``'s bytes for :meth:`data_to_send`.

        Raises:
            LocalProtocolError: the event is not allowed now (a caller bug).
        """
        kind = type(event)
        if kind is Data:
            assert isinstance(event, Data)
            self._send_data(event.data)
        elif kind is Response:
            assert isinstance(event, Response)
            self._send_response(event)
        elif kind is EndOfMessage:
            assert isinstance(event, EndOfMessage)
            self._send_end(event.headers)
        elif kind is InformationalResponse:
            assert isinstance(event, InformationalResponse)
            self._send_informational(event)
        else:
            raise LocalProtocolError(f"a server cannot send {kind.__name__}")

    def send_response(
        self, status: int, headers: Headers, body: bytes = b"", trusted: bytes = b""
    ) -> None:
        """Send a whole response at once: head, body and end, in one write.

        The fast path for the common case; same rules as ``Response`` + ``Data`` +
        ``EndOfMessage``.

        Args:
            trusted: extra header lines, already serialised and checked by the caller
                (a server's ``Date`` and ``Server``, rebuilt once a second).
        """
        head = self._head(status, headers, b"", trusted, len(body))
        framing = self._framing
        if framing is Framing.LENGTH:
            self._to_send.append(head + body)
        elif framing is Framing.CHUNKED:
            self._to_send.append(head + encode_chunk(body) + LAST_CHUNK)
        elif framing is Framing.NONE:
            self._to_send.append(head)
        else:
            self._to_send.append(head + body)
        self._remaining = 0
        self._finish()

    def send_head(
        self, status: int, headers: Headers, trusted: bytes = b"", reason: bytes = b""
    ) -> None:
        """``send(Response(...))`` with pre-serialised ``trusted`` header lines added."""
        self._to_send.append(self._head(status, headers, reason, trusted))

    def _send_informational(self, event: InformationalResponse) -> None:
        if self.our_state is not State.IDLE or not self._requests:
            raise LocalProtocolError(f"cannot send a 1xx response in state {self.our_state}")
        status = event.status_code
        if not 100 <= status <= 199:
            raise LocalProtocolError(f"informational status must be 1xx, got {status}")
        request = self._requests[0]
        if status == 101 and request.upgrade is None:
            # (check_head drops the Upgrade of an HTTP/1.0 request, RFC 9110 §7.8.)
            raise LocalProtocolError("101 Switching Protocols answers only an Upgrade request")
        if request.http_version == b"1.0":
            return  # RFC 9110 §15.2: never send 1xx to an HTTP/1.0 client
        self._to_send.append(status_line(status, event.reason) + encode_headers(event.headers))
        if status == 101:
            self._requests.popleft()
            self.our_state = State.SWITCHED_PROTOCOL
            self.keep_alive = False

    def switched_protocol_data(self) -> bytes:
        """After a 101: the bytes the client sent after its request, now not HTTP."""
        if self.our_state is not State.SWITCHED_PROTOCOL:
            raise LocalProtocolError("the protocol has not been switched")
        return self._parser.resume(switched=True)

    def _head(
        self, status: int, headers: Headers, reason: bytes, trusted: bytes, body_length: int = -1
    ) -> bytes:
        """The response head; commits the framing and state only once nothing can fail."""
        if self.our_state is not State.IDLE:
            raise LocalProtocolError(f"cannot start a response in state {self.our_state}")
        if not self._requests:
            raise LocalProtocolError("no request to respond to")
        request = self._requests[0]
        if status < 200:
            raise LocalProtocolError("use InformationalResponse for 1xx statuses")
        line = status_line(status, reason)
        key = tuple(headers)
        info = _HEAD_CACHE.get(key)
        if info is None:
            info = _analyse(headers)
            if len(info[0]) <= _HEAD_CACHE_MAX_BLOCK:
                if len(_HEAD_CACHE) >= _HEAD_CACHE_SIZE:
                    _HEAD_CACHE.clear()
                _HEAD_CACHE[key] = info
        block, length, has_connection, asks_close = info
        close = asks_close or not request.keep_alive
        extra = b""
        if request.method == b"HEAD" or status in _NO_BODY_STATUS:
            framing = Framing.NONE
        elif length is not None:
            framing = Framing.LENGTH
            if body_length >= 0 and body_length != length:
                raise LocalProtocolError(
                    f"Content-Length is {length} but the body has {body_length} bytes"
                )
        elif request.http_version == b"1.1":
            framing = Framing.CHUNKED
            extra = b"transfer-encoding: chunked\r\n"
        else:
            framing = Framing.CLOSE
            close = True
        if close:
            self.keep_alive = False
            if not asks_close:
                extra += b"connection: close\r\n"
        elif request.http_version == b"1.0" and not has_connection:
            extra += b"connection: keep-alive\r\n"
        self._framing = framing
        self._remaining = length or 0
        self.our_state = State.SEND_BODY
        return line + block + trusted + extra + b"\r\n"

    def _send_response(self, response: Response) -> None:
        self._to_send.append(
            self._head(response.status_code, response.headers, response.reason, b"")
        )

    def _send_data(self, data: bytes) -> None:
        if self.our_state is not State.SEND_BODY:
            raise LocalProtocolError(f"cannot send body data in state {self.our_state}")
        framing = self._framing
        if not data or framing is Framing.NONE:
            return
        if framing is Framing.CHUNKED:
            self._to_send.append(encode_chunk(data))
            return
        if framing is Framing.LENGTH:
            if len(data) > self._remaining:
                raise LocalProtocolError(
                    f"body longer than its Content-Length ({self._remaining} bytes left)"
                )
            self._remaining -= len(data)
        self._to_send.append(data)

    def send_body_elsewhere(self, count: int) -> None:
        """Account for ``count`` body bytes the caller writes itself (``os.sendfile``).

        Raises:
            LocalProtocolError: unless a Content-Length response is being sent with at
                least ``count`` bytes still due.
        """
        if (
            self.our_state is not State.SEND_BODY
            or self._framing is not Framing.LENGTH
            or not 0 <= count <= self._remaining
        ):
            raise LocalProtocolError("out-of-band body bytes need a Content-Length response")
        self._remaining -= count

    @property
    def sending_body(self) -> bool:
        """The response being sent has a body (not HEAD, 204 or 304)."""
        return self.our_state is State.SEND_BODY and self._framing is not Framing.NONE

    def _send_end(self, trailers: Headers) -> None:
        if self.our_state is not State.SEND_BODY:
            raise LocalProtocolError(f"cannot end a response in state {self.our_state}")
        if self._framing is Framing.LENGTH and self._remaining:
            raise LocalProtocolError(
                f"body shorter than its Content-Length ({self._remaining} bytes missing)"
            )
        if self._framing is Framing.CHUNKED:
            self._to_send.append(encode_trailers(trailers))
        self._finish()

    def _finish(self) -> None:
        self._requests.popleft()
        if not self.keep_alive:
            self.our_state = State.MUST_CLOSE
            return
        self.our_state = State.IDLE
        if self._parser.paused:
            # The request just answered asked to upgrade; we did not: parse what follows.
            try:
                self._parser.resume(switched=False)
            except RemoteProtocolError:
                # The held bytes are malformed. This response went out whole; the
                # connection ends after it (a server closes when the state is not IDLE).
                self.close()

    def data_to_send(self) -> list[bytes]:
        """Drain the bytes queued by :meth:`send`."""
        out = self._to_send
        if out:
            self._to_send = []
        return out

    def close(self) -> None:
        """Our side is finished; nothing more will be sent or parsed."""
        self.our_state = State.CLOSED
        self.keep_alive = False
