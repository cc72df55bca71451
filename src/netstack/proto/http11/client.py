"""The client side of an HTTP/1.1 connection, sans I/O (the L7 balancer's backend side).

Theory of operation
-------------------
One request at a time (no pipelining: a balancer gains little from it and it makes
failures ambiguous). Two halves:

*Our side* writes the request with :mod:`netstack.proto.http11.write`::

    IDLE --Request--> SEND_BODY --EndOfMessage--> DONE

The body framing comes from the ``Request`` event, never from its headers (which must
not carry Content-Length or Transfer-Encoding): ``content_length`` set means a
Content-Length body, ``chunked`` a chunked one, neither means no body.

*Their side* is a response parser started afresh for each request, told the request's
method and whether it asked to switch protocols, because the framing of a response
depends on them (RFC 9112 §6.3)::

    IDLE --(request sent)--> SEND_BODY --final EndOfMessage--> DONE
                                    \\--101--> SWITCHED_PROTOCOL

Zero or more ``InformationalResponse`` come before the ``Response``. No body for a HEAD
request or a 1xx/204/304 status, whatever Content-Length says; a response with neither
Content-Length nor chunked coding runs until the server closes (:meth:`receive_eof`
then ends it). When both sides are DONE the connection goes back to IDLE (reusable:
:attr:`HTTPClientConnection.reusable`) if both messages allowed keep-alive and no byte
followed the response; else both sides are MUST_CLOSE.

Two parsers, as on the server side: httptools' ``HttpResponseParser`` (default) and h11
(fallback and reference). llhttp cannot be told that a response answers a HEAD, so for
a HEAD request the llhttp wrapper finds the end of each head itself and feeds llhttp
only the head. Every peer fault is a :class:`~netstack.errors.RemoteProtocolError`
with ``status_hint`` 502 (the balancer's answer); it leaves the connection CLOSED.
CONNECT is not supported (a balancer tunnels with Upgrade).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final, Protocol

import httptools

from netstack.config import HTTPLimits
from netstack.errors import LimitExceeded, LocalProtocolError, RemoteProtocolError
from netstack.proto.http11.events import (
    END_OF_MESSAGE,
    ConnectionClosed,
    Data,
    EndOfMessage,
    Event,
    Headers,
    InformationalResponse,
    Request,
    Response,
)
from netstack.proto.http11.parse import connection_tokens
from netstack.proto.http11.write import (
    check_header_block,
    encode_chunk,
    encode_headers,
    encode_request_head,
    encode_request_line,
    encode_trailers,
)

if TYPE_CHECKING:
    import h11

_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
_FRAMING = frozenset((b"content-length", b"transfer-encoding"))
_RESPONSE_SPECIAL = frozenset((b"content-length", b"transfer-encoding", b"connection"))


class ClientState(enum.Enum):
    """One side of a client connection."""

    IDLE = "idle"
    SEND_BODY = "send_body"
    DONE = "done"
    MUST_CLOSE = "must_close"
    SWITCHED_PROTOCOL = "switched_protocol"
    CLOSED = "closed"


# Enum members as module globals: in CPython 3.11 ``ClientState.IDLE`` is a descriptor
# call (tens of ns), paid several times per exchange on the balancer's hot path.
_IDLE: Final = ClientState.IDLE
_SEND_BODY: Final = ClientState.SEND_BODY
_DONE: Final = ClientState.DONE
_MUST_CLOSE: Final = ClientState.MUST_CLOSE
_SWITCHED_PROTOCOL: Final = ClientState.SWITCHED_PROTOCOL
_CLOSED: Final = ClientState.CLOSED


def bad_response(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, status_hint=502)


def _limit(name: str, value: int, actual: int | None = None) -> LimitExceeded:
    return LimitExceeded(name, value, actual=actual, status_hint=502, close_code=None)


def check_response_head(
    status: int,
    headers: Headers,
    version: bytes,
    no_body: bool,
    limits: HTTPLimits,
    reason_length: int = 0,
    measure: bool = True,
) -> tuple[bool, bool]:
    """Validate a final response head; return (keep-alive, body runs until close).

    Raises:
        RemoteProtocolError: a version other than 1.0/1.1; a repeated or non-numeric
            Content-Length, or one with Transfer-Encoding; a Transfer-Encoding other
            than chunked; more headers than ``max_header_count`` or bytes than
            ``max_header_bytes`` (when ``measure``); a declared body
            over ``max_body_bytes``.
    """
    if version != b"1.1" and version != b"1.0":
        raise bad_response(f"HTTP version {version.decode('latin-1')} in a response")
    if len(headers) > limits.max_header_count:
        raise _limit("max_header_count", limits.max_header_count, len(headers))
    if measure:
        size = sum([len(n) + len(v) + 4 for n, v in headers]) + reason_length + 17
        if size > limits.max_header_bytes:
            raise _limit("max_header_bytes", limits.max_header_bytes, size)
    length: int | None = None
    chunked = False
    tokens: set[bytes] = set()
    for name, value in headers:
        if name not in _RESPONSE_SPECIAL:
            continue
        if name == b"content-length":
            if length is not None or not value.isdigit():
                raise bad_response("a response with a bad or repeated Content-Length")
            length = int(value)
        elif name == b"transfer-encoding":
            if chunked or value.lower() != b"chunked":
                raise bad_response("a response with a Transfer-Encoding other than chunked")
            chunked = True
        elif b"," in value:  # connection, a list
            tokens |= connection_tokens(value)
        else:  # connection, one token (the usual "keep-alive" or "close")
            tokens.add(value.strip().lower())
    if chunked and length is not None:
        raise bad_response("a response with both Content-Length and Transfer-Encoding")
    if (
        not no_body
        and length is not None
        and limits.max_body_bytes is not None
        and length > limits.max_body_bytes
    ):
        raise _limit("max_body_bytes", limits.max_body_bytes, length)
    if version == b"1.0":
        keep_alive = b"keep-alive" in tokens and b"close" not in tokens
    else:
        keep_alive = b"close" not in tokens
    until_close = not no_body and length is None and not chunked
    return keep_alive and not until_close, until_close


class ResponseParser(Protocol):
    """What :class:`HTTPClientConnection` needs of a response parser (one per response).

    Attributes:
        done: the final response is complete.
        keep_alive: the response allows the connection to be reused.
        switched: a 101 was received; ``rest`` holds the bytes after it, raw.
        rest: after a 101, the bytes received since.
        stray: bytes came after a complete response (the connection cannot be reused).
    """

    done: bool
    keep_alive: bool
    switched: bool
    rest: bytes
    stray: bool

    def start(self, method: bytes, upgrade: bool) -> None:
        """Expect the response to a request with ``method`` (and an Upgrade proposal)."""

    def feed(self, data: bytes) -> None:
        """Parse ``data``, appending events. Raises RemoteProtocolError."""

    def feed_eof(self) -> None:
        """The server closed before the response was complete: ends a body that runs
        until close, else raises RemoteProtocolError."""


class _Stray(Exception):
    """Raised in a callback to stop llhttp at bytes that follow a complete response."""


class LLHTTPResponseParser:
    """httptools' ``HttpResponseParser`` behind :class:`ResponseParser`."""

    __slots__ = (
        "_body_bytes",
        "_events",
        "_head_buffer",
        "_head_fed",
        "_head_only",
        "_headers",
        "_in_head",
        "_last",
        "_limits",
        "_parser",
        "_reason",
        "_reusable",
        "_since_body",
        "_status",
        "_until_close",
        "_upgrade",
        "done",
        "keep_alive",
        "rest",
        "stray",
        "switched",
    )

    def __init__(self, events: list[Event], limits: HTTPLimits) -> None:
        self._events = events
        self._limits = limits
        self._parser = httptools.HttpResponseParser(self)
        self._headers: Headers = []
        self._reason = b""
        self._head_buffer = b""
        self._reusable = True
        self._status = 0
        # (headers, version, no body, keep-alive, until close) of the last final response.
        self._last: tuple[Headers, str, bool, bool, bool] | None = None
        self.start(b"GET", False)

    def start(self, method: bytes, upgrade: bool) -> None:
        # llhttp goes on to the next message by itself after a complete one; it is
        # replaced only when it was left mid-message (HEAD) or after an error or a 101.
        if not self._reusable:
            self._parser = httptools.HttpResponseParser(self)
        self._head_only = method == b"HEAD"
        self._reusable = not self._head_only
        self._upgrade = upgrade
        self._head_fed = 0
        self._body_bytes = 0
        self._since_body = 0
        self._in_head = True
        self._until_close = False
        self.done = False
        self.keep_alive = False
        self.switched = False
        self.stray = False
        self.rest = b""

    def feed(self, data: bytes) -> None:
        if self.done:  # only after a 101: a complete response ends the feeding
            self.rest += data
            return
        if self._head_only:
            self._feed_heads(data)
            return
        if self._in_head:
            self._head_fed += len(data)
        else:
            self._since_body += len(data)
        try:  # (what _feed does, without a call on the hot path)
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._failed(data, exc)
        if self._in_head:
            if self._head_fed > self._limits.max_header_bytes:
                raise _limit("max_header_bytes", self._limits.max_header_bytes, self._head_fed)
        elif not self.done:
            # Bytes since the last body byte: chunk-size lines, extensions, trailers
            # (httptools buffers a trailer line whole). As in parse.LLHTTPRequestParser.
            since = self._since_body
            if since < 0:
                since = self._since_body = len(data)
            if since > self._limits.max_header_bytes:
                raise _limit("max_header_bytes", self._limits.max_header_bytes, since)

    def _feed(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            self._failed(data, exc)

    def _failed(self, data: bytes, exc: Exception) -> None:
        """llhttp stopped inside ``data``: a 101, a stray message, or an error."""
        self._reusable = False
        if isinstance(exc, httptools.HttpParserUpgrade):
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.rest = data[offset:]
            return
        if isinstance(exc, httptools.HttpParserCallbackError):
            context = exc.__context__
            if isinstance(context, _Stray):
                self.stray = True
                return
            if isinstance(context, RemoteProtocolError):
                raise context from None
            raise exc  # pragma: no cover - a bug in a callback, not a peer error
        raise bad_response(f"malformed response: {exc}") from None

    def _feed_heads(self, data: bytes) -> None:
        # HEAD: llhttp would read a body after a Content-Length; give it heads only.
        old = len(self._head_buffer)
        buffer = self._head_buffer + data
        while not self.done:
            # Search only where a CRLF CRLF can end that was not there before.
            end = buffer.find(b"\r\n\r\n", max(0, old - 3))
            old = 0
            if end < 0:
                if len(buffer) > self._limits.max_header_bytes:
                    raise _limit("max_header_bytes", self._limits.max_header_bytes)
                self._head_buffer = buffer
                return
            head, buffer = buffer[: end + 4], buffer[end + 4 :]
            self._parser = httptools.HttpResponseParser(self)
            self._feed(head)  # (a head ends with CRLF CRLF: llhttp completes it or fails)
        self.stray = bool(buffer.strip(b"\r\n"))  # (as llhttp skips empty lines)
        self._head_buffer = b""

    def feed_eof(self) -> None:
        # (Only called while the response is incomplete.)
        if self._until_close and not self._in_head:
            self._events.append(END_OF_MESSAGE)
            self.done = True
            return
        raise bad_response("the server closed the connection before the end of a response")

    # ----------------------------------------------------------------- callbacks

    def on_message_begin(self) -> None:
        if self.done:
            raise _Stray  # llhttp went on to parse what followed the response

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = self._status = parser.get_status_code()
        version = parser.get_http_version()
        headers, self._headers = self._headers, []
        reason, self._reason = self._reason, b""
        self._in_head = False
        self._since_body = -1
        if status < 200:
            if status == 101:
                if not self._upgrade:
                    raise bad_response("101 Switching Protocols to a request that did not ask")
                self.switched = True
                self.done = True
            self._events.append(InformationalResponse(status, headers, reason))
            return
        no_body = self._head_only or status == 204 or status == 304
        # Fewer bytes than the limit fed since the response began: no need to measure.
        measure = self._head_only or self._head_fed > self._limits.max_header_bytes
        last = self._last
        if (
            last is not None
            and not measure
            and last[1] == version
            and last[2] == no_body
            and last[0] == headers
        ):
            # The same header list as the last response (a server repeats itself): the
            # same verdict, and the same list object (cheap to compare downstream).
            headers = last[0]
            self.keep_alive, self._until_close = last[3], last[4]
        else:
            self.keep_alive, self._until_close = check_response_head(
                status,
                headers,
                _VERSIONS.get(version) or version.encode(),
                no_body,
                self._limits,
                len(reason),
                measure,
            )
            self._last = (headers, version, no_body, self.keep_alive, self._until_close)
        self._events.append(Response(status, headers, reason, _VERSIONS.get(version, b"1.1")))
        if self._head_only:
            self._events.append(END_OF_MESSAGE)
            self.done = True

    def on_body(self, body: bytes) -> None:
        self._since_body = 0
        self._body_bytes += len(body)
        limit = self._limits.max_body_bytes
        if limit is not None and self._body_bytes > limit:
            raise _limit("max_body_bytes", limit, self._body_bytes)
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        if self._head_only:
            return  # ended at the final head already (llhttp completes a 204/304 itself)
        if self._status < 200:
            self._in_head = True  # a 1xx: the final response follows (or a 101 switched)
            return
        trailers, self._headers = self._headers, []
        if len(trailers) > self._limits.max_header_count:
            raise _limit("max_header_count", self._limits.max_header_count, len(trailers))
        self._events.append(EndOfMessage(trailers) if trailers else END_OF_MESSAGE)
        self.done = True


class H11ResponseParser:
    """h11 behind :class:`ResponseParser`: a client connection per response, sent a
    throw-away request with the same method (and Upgrade proposal) so that h11 frames
    the response as ours."""

    def __init__(self, events: list[Event], limits: HTTPLimits) -> None:
        import h11

        self._h11 = h11
        self._events = events
        self._limits = limits
        self.start(b"GET", False)

    def start(self, method: bytes, upgrade: bool) -> None:
        lib = self._h11
        conn: h11.Connection = lib.Connection(
            lib.CLIENT, max_incomplete_event_size=self._limits.max_header_bytes
        )
        headers = [(b"host", b"h")]
        if upgrade:
            headers += [(b"connection", b"upgrade"), (b"upgrade", b"x")]
        conn.send(lib.Request(method=method, target=b"/", headers=headers))
        conn.send(lib.EndOfMessage())
        self._conn = conn
        self._head_only = method == b"HEAD"
        self._body_bytes = 0
        self._until_close = False
        self.done = False
        self.keep_alive = False
        self.switched = False
        self.stray = False
        self.rest = b""

    def feed(self, data: bytes) -> None:
        if self.done:  # only after a 101: a complete response ends the feeding
            self.rest += data
            return
        if data:
            self._conn.receive_data(data)
            self._pump()

    def feed_eof(self) -> None:
        # (Only called while the response is incomplete.) h11 either ends a body that
        # runs until close or raises; it never asks for more data after EOF.
        self._conn.receive_data(b"")
        self._pump()
        assert self.done

    def _pump(self) -> None:
        h11 = self._h11
        conn = self._conn
        while not self.done:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    raise _limit("max_header_bytes", self._limits.max_header_bytes) from None
                raise bad_response(f"malformed response: {exc}") from None
            if event is h11.NEED_DATA:
                return
            if isinstance(event, h11.InformationalResponse):
                self._events.append(
                    InformationalResponse(
                        event.status_code,
                        [(bytes(n), bytes(v)) for n, v in event.headers],
                        bytes(event.reason),
                    )
                )
            elif isinstance(event, h11.Response):
                headers = [(bytes(n), bytes(v)) for n, v in event.headers]
                version = bytes(event.http_version)
                no_body = self._head_only or event.status_code in (204, 304)
                self.keep_alive, self._until_close = check_response_head(
                    event.status_code, headers, version, no_body, self._limits, len(event.reason)
                )
                self._events.append(
                    Response(event.status_code, headers, bytes(event.reason), version)
                )
            elif isinstance(event, h11.Data):
                self._body_bytes += len(event.data)
                limit = self._limits.max_body_bytes
                if limit is not None and self._body_bytes > limit:
                    raise _limit("max_body_bytes", limit, self._body_bytes)
                self._events.append(Data(bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                trailers = [(bytes(n), bytes(v)) for n, v in event.headers]
                if len(trailers) > self._limits.max_header_count:
                    raise _limit("max_header_count", self._limits.max_header_count)
                self._events.append(EndOfMessage(trailers) if trailers else END_OF_MESSAGE)
                self.done = True
                # (Empty lines are not stray: llhttp skips them before a message.)
                self.stray = bool(conn.trailing_data[0].strip(b"\r\n"))
            else:
                # A 101: h11 only pauses here after a switch (our EndOfMessage was sent),
                # and never reports ConnectionClosed before a complete response (it
                # raises instead).
                assert event is h11.PAUSED
                self.switched = True
                self.done = True
                self.rest = conn.trailing_data[0]


def make_response_parser(name: str, events: list[Event], limits: HTTPLimits) -> ResponseParser:
    """A response parser (``"httptools"`` or ``"h11"``); :meth:`ResponseParser.start`
    it for each request."""
    if name == "httptools":
        return LLHTTPResponseParser(events, limits)
    if name == "h11":
        return H11ResponseParser(events, limits)
    raise ValueError(f"unknown HTTP parser {name!r}")


class HTTPClientConnection:
    """Client-role HTTP/1.1 connection: write requests, parse their responses.

    Args:
        limits: what a response may hold (``max_header_bytes``, ``max_header_count``,
            ``max_body_bytes``: a proxy usually wants ``max_body_bytes=None``).
        parser: ``"httptools"`` (default) or ``"h11"``.
    """

    __slots__ = (
        "_events",
        "_framing_chunked",
        "_parser",
        "_remaining",
        "_request_keep_alive",
        "_to_send",
        "our_state",
        "their_state",
    )

    def __init__(self, limits: HTTPLimits, parser: str = "httptools") -> None:
        self._events: list[Event] = []
        self._to_send: list[bytes] = []
        self._parser = make_response_parser(parser, self._events, limits)
        self._remaining: int | None = 0  # body bytes still due; None: chunked
        self._framing_chunked = False
        self._request_keep_alive = True
        self.our_state = _IDLE
        self.their_state = _IDLE

    @property
    def reusable(self) -> bool:
        """Another request can be sent now (the last exchange ended with keep-alive)."""
        return self.our_state is _IDLE and self.their_state is _IDLE

    # ------------------------------------------------------------------- our side

    def send(self, event: Event) -> None:
        """Queue ``event``'s bytes for :meth:`data_to_send`.

        Raises:
            LocalProtocolError: the event is not allowed now, or is malformed; nothing
                changes.
        """
        kind = type(event)
        if kind is Request:
            assert isinstance(event, Request)
            self._send_request(event)
        elif kind is Data:
            assert isinstance(event, Data)
            self._send_data(event.data)
        elif kind is EndOfMessage:
            assert isinstance(event, EndOfMessage)
            self._send_end(event.headers)
        else:
            raise LocalProtocolError(f"a client cannot send {kind.__name__}")

    def _send_request(self, request: Request) -> None:
        if not self.reusable:
            raise LocalProtocolError(
                f"cannot send a request in state {self.our_state}/{self.their_state}"
            )
        method = request.method
        if method == b"CONNECT":
            raise LocalProtocolError("CONNECT is not supported by the client role")
        hosts = 0
        tokens: set[bytes] = set()
        upgrade = False
        for name, value in request.headers:
            if name in _FRAMING:
                raise LocalProtocolError(
                    "the framing is set from Request.content_length/chunked, not headers"
                )
            if name == b"host":
                hosts += 1
            elif name == b"connection":
                tokens |= connection_tokens(value)
            elif name == b"upgrade":
                upgrade = True
        if hosts != 1:
            raise LocalProtocolError("a request needs exactly one Host header")
        extra: Headers = []
        if request.content_length is not None:
            if request.chunked:
                raise LocalProtocolError("a request body is either chunked or has a length")
            extra.append((b"content-length", b"%d" % request.content_length))
        elif request.chunked:
            extra.append((b"transfer-encoding", b"chunked"))
        keep_alive = request.keep_alive and b"close" not in tokens
        if not keep_alive and b"close" not in tokens:
            extra.append((b"connection", b"close"))
        head = encode_request_head(method, request.target, [*request.headers, *extra])
        # Nothing can fail from here on.
        self._commit(head, keep_alive, request.chunked, request.content_length)
        self._parser.start(method, upgrade and b"upgrade" in tokens)

    def send_request_head(
        self,
        method: bytes,
        target: bytes,
        block: bytes,
        *,
        content_length: int | None = None,
        chunked: bool = False,
        upgrade: bool = False,
        end: bool = False,
        checked: bool = False,
    ) -> None:
        """Send a request head whose header lines the caller serialised (a proxy's fast
        path): ``send(Request(method, target, headers, ...))``, keep-alive.

        Args:
            block: the header lines, each ``name: value\\r\\n``. The caller guarantees
                token names, exactly one Host and none of Content-Length,
                Transfer-Encoding or a Connection with ``close``; control characters and
                stray CR or LF are checked here.
            content_length: the body's length (``None``: no body, or chunked).
            chunked: the body is chunked.
            upgrade: ``block`` proposes to switch protocols (``Connection: upgrade`` and
                an ``Upgrade`` header).
            end: the request has no body: ``send(EndOfMessage())`` too.
            checked: the same method, target and block (but for lines the caller
                wrote itself) went through this method before: skip their checks.

        Raises:
            LocalProtocolError: as :meth:`send`; nothing changes.
        """
        if self.our_state is not _IDLE or self.their_state is not _IDLE:
            raise LocalProtocolError(
                f"cannot send a request in state {self.our_state}/{self.their_state}"
            )
        if method == b"CONNECT":
            raise LocalProtocolError("CONNECT is not supported by the client role")
        if end and (chunked or content_length):
            raise LocalProtocolError("a request with a body does not end with its head")
        if content_length is not None:
            if chunked:
                raise LocalProtocolError("a request body is either chunked or has a length")
            block += b"content-length: %d\r\n" % content_length
        elif chunked:
            block += b"transfer-encoding: chunked\r\n"
        if checked:
            head = method + b" " + target + b" HTTP/1.1\r\n"
        else:
            head = encode_request_line(method, target)
            check_header_block(block)
        # Nothing can fail from here on.
        self._to_send.append(head + block + b"\r\n")
        self._request_keep_alive = True
        self._framing_chunked = chunked
        self._remaining = None if chunked else (content_length or 0)
        self._parser.start(method, upgrade)
        # (end: what _send_end does for a request without a body, the response pending)
        self.our_state = _DONE if end else _SEND_BODY
        self.their_state = _SEND_BODY

    def _commit(self, head: bytes, keep_alive: bool, chunked: bool, length: int | None) -> None:
        self._to_send.append(head)
        self._request_keep_alive = keep_alive
        self._framing_chunked = chunked
        self._remaining = None if chunked else (length or 0)
        self.our_state = _SEND_BODY
        self.their_state = _SEND_BODY

    def _send_data(self, data: bytes) -> None:
        if self.our_state is not _SEND_BODY:
            raise LocalProtocolError(f"cannot send body data in state {self.our_state}")
        if not data:
            return
        remaining = self._remaining
        if remaining is None:
            self._to_send.append(encode_chunk(data))
            return
        if len(data) > remaining:
            raise LocalProtocolError(f"request body longer than declared ({remaining} left)")
        self._remaining = remaining - len(data)
        self._to_send.append(data)

    def _send_end(self, trailers: Headers) -> None:
        if self.our_state is not _SEND_BODY:
            raise LocalProtocolError(f"cannot end a request in state {self.our_state}")
        if self._remaining:
            raise LocalProtocolError(
                f"request body shorter than declared ({self._remaining} bytes missing)"
            )
        if self._framing_chunked:
            self._to_send.append(encode_trailers(trailers))
        elif trailers:
            encode_headers(trailers)  # checked all the same
        self.our_state = _DONE
        self._cycle()

    def data_to_send(self) -> list[bytes]:
        """Drain the bytes queued by :meth:`send`."""
        out = self._to_send
        if out:
            self._to_send = []
        return out

    # ------------------------------------------------------------------- their side

    def receive_data(self, data: bytes) -> None:
        """Parse bytes from the server.

        Raises:
            RemoteProtocolError: a malformed response, a limit, or bytes nobody asked
                for; the connection is then CLOSED.
        """
        parser = self._parser
        state = self.their_state
        if state is _CLOSED:
            return
        if state is not _SEND_BODY and state is not _SWITCHED_PROTOCOL:
            if not data:
                return
            self.close()
            raise bad_response("bytes from the server with no request outstanding")
        try:
            parser.feed(data)
        except RemoteProtocolError:
            self.close()
            raise
        self._after_feed(parser)

    def receive_eof(self) -> None:
        """The server closed its side.

        Raises:
            RemoteProtocolError: the response was cut short (or never came) while a
                request was outstanding.
        """
        state = self.their_state
        if state is _CLOSED:
            return
        parser = self._parser
        if state is _SEND_BODY:
            try:
                parser.feed_eof()
            except RemoteProtocolError:
                self.close()
                raise
            self._after_feed(parser)
        self._events.append(ConnectionClosed())
        if self.their_state is not _SWITCHED_PROTOCOL:
            self.their_state = _CLOSED
            if self.our_state is not _SEND_BODY:
                self.our_state = _CLOSED

    def _after_feed(self, parser: ResponseParser) -> None:
        if self.their_state is not _SEND_BODY or not parser.done:
            return
        if parser.switched:
            self.their_state = _SWITCHED_PROTOCOL
            self.our_state = _SWITCHED_PROTOCOL
            return
        if self.our_state is not _DONE:
            self.their_state = _DONE
            return
        # Both sides done: _cycle, inline (the end of nearly every exchange).
        if self._request_keep_alive and parser.keep_alive and not parser.stray:
            self.our_state = self.their_state = _IDLE
        else:
            self.our_state = self.their_state = _MUST_CLOSE

    def _cycle(self) -> None:
        if self.our_state is not _DONE or self.their_state is not _DONE:
            return
        parser = self._parser
        if self._request_keep_alive and parser.keep_alive and not parser.stray:
            self.our_state = _IDLE
            self.their_state = _IDLE
        else:
            self.our_state = _MUST_CLOSE
            self.their_state = _MUST_CLOSE

    def events_received(self) -> list[Event]:
        """Drain the events parsed so far."""
        events = self._events
        if not events:
            return []
        drained = events.copy()
        events.clear()
        return drained

    def switched_protocol_data(self) -> bytes:
        """After a 101: the bytes the server sent after it (and since), raw."""
        parser = self._parser
        if self.their_state is not _SWITCHED_PROTOCOL:
            raise LocalProtocolError("the protocol has not been switched")
        rest, parser.rest = parser.rest, b""
        return rest

    def close(self) -> None:
        """Nothing more will be sent or parsed."""
        self.our_state = _CLOSED
        self.their_state = _CLOSED
