"""Request parsing: two parsers behind one interface, and the checks both share.

Theory of operation. A parser turns bytes into events appended to a list it is given:
``Request``, ``Data``*, ``EndOfMessage`` for each request, in order, several requests
per ``feed()`` when the client pipelines. Each ``Request`` is also appended to a queue
it is given, the requests awaiting a response. Two implementations:

* :class:`LLHTTPRequestParser` wraps httptools (llhttp, C): the default, fast.
* :class:`H11RequestParser` wraps h11 (pure Python): the fallback when httptools is not
  installed, and the reference the tests compare the fast one against.

Both raise :class:`~netstack.errors.RemoteProtocolError` (``status_hint`` 400, 413, 414,
431 or 505) and nothing else; foreign exceptions are converted here, once. Both apply
:func:`check_head` so that the stricter-than-RFC rules (no duplicate Content-Length,
no Transfer-Encoding in HTTP/1.0, exactly one Host) do not depend on the parser.

States of a parser: *head* (reading a request line and headers; bytes counted against
``max_header_bytes`` even before a header line completes, so a header that never ends
cannot grow memory without bound), *body*, and *paused* after a request that asks to
switch protocols (``Upgrade`` or ``CONNECT``): the bytes after it are held until the
caller decides, with :meth:`resume`, whether the protocol switched (the held bytes are
then returned raw) or not (they are parsed as the next request).
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import httptools

from netstack.config import HTTPLimits
from netstack.errors import LimitExceeded, RemoteProtocolError
from netstack.proto.http11.events import END_OF_MESSAGE, Data, EndOfMessage, Event, Request

# Bytes a request line adds around method and target: two spaces, "HTTP/1.1", CRLF.
_REQUEST_LINE_OVERHEAD = 12
# ": " and CRLF around each header line.
_HEADER_LINE_OVERHEAD = 4


class RequestParser(Protocol):
    """What :class:`~netstack.proto.http11.connection.HTTPConnection` needs of a parser."""

    paused: bool

    def feed(self, data: bytes) -> None:
        """Parse ``data``, appending events. Raises RemoteProtocolError."""

    def feed_eof(self) -> bool:
        """The peer closed. Returns True when that happened between requests.

        Raises:
            RemoteProtocolError: when EOF cut a request short.
        """

    def resume(self, switched: bool) -> bytes:
        """Leave the paused state; return held bytes if ``switched``, else parse them."""


_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}

# Headers check_head looks at; any other name costs one set lookup.
_SPECIAL = frozenset(
    (b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect")
)


def bad_request(message: str, status: int = 400) -> RemoteProtocolError:
    return RemoteProtocolError(message, status_hint=status)


def _connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",")}


def check_head(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: list[tuple[bytes, bytes]],
    parser_keep_alive: bool,
    limits: HTTPLimits,
    measure: bool = True,
) -> Request:
    """Validate a parsed request head and build its :class:`Request`.

    Args:
        parser_keep_alive: the parser's own keep-alive verdict (version + Connection).
        measure: add up the head's size against ``max_header_bytes``. A caller that knows
            fewer bytes than the limit were fed since the head began may skip it.

    Raises:
        RemoteProtocolError: 505 for a version other than 1.0/1.1 (RFC 9110 §15.6.6);
            400 for a missing or repeated Host in HTTP/1.1 (RFC 9112 §3.2), duplicate or
            non-numeric Content-Length, Transfer-Encoding in HTTP/1.0 or together with
            Content-Length (RFC 9112 §6.1, request smuggling); 413 for a declared body
            over ``max_body_bytes``.
    """
    if version != b"1.1" and version != b"1.0":
        raise bad_request(f"HTTP version {version.decode('latin-1')} not supported", 505)
    if len(headers) > limits.max_header_count:
        raise LimitExceeded(
            "max_header_count",
            limits.max_header_count,
            actual=len(headers),
            status_hint=431,
            close_code=None,
        )
    if measure:
        size = len(method) + len(target) + _REQUEST_LINE_OVERHEAD
        size += sum([len(n) + len(v) + _HEADER_LINE_OVERHEAD for n, v in headers])
        if size > limits.max_header_bytes:
            raise header_limit(limits, size)
    hosts = 0
    content_length: int | None = None
    chunked = False
    expect_continue = False
    upgrade: bytes | None = None
    connection_upgrade = False
    for name, value in headers:
        if name not in _SPECIAL:
            continue
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if content_length is not None:
                raise bad_request("more than one Content-Length")
            if not value.isdigit():
                raise bad_request("Content-Length is not a number")
            content_length = int(value)
        elif name == b"transfer-encoding":
            if chunked or value.lower() != b"chunked":
                # RFC 9112 §6.1: a server MAY reply 501 to an unknown coding; chunked only.
                raise bad_request("Transfer-Encoding other than a single 'chunked'", 501)
            chunked = True
        elif name == b"connection":
            connection_upgrade = b"upgrade" in _connection_tokens(value)
        elif name == b"upgrade":
            upgrade = value.lower()
        elif name == b"expect" and value.lower() == b"100-continue":
            expect_continue = True
    if chunked:
        if content_length is not None:
            raise bad_request("Content-Length together with Transfer-Encoding")
        if version == b"1.0":
            raise bad_request("Transfer-Encoding in an HTTP/1.0 request")
    if hosts > 1 or (hosts == 0 and version == b"1.1"):
        raise bad_request("an HTTP/1.1 request needs exactly one Host header")
    if (
        content_length is not None
        and limits.max_body_bytes is not None
        and content_length > limits.max_body_bytes
    ):
        raise LimitExceeded(
            "max_body_bytes", limits.max_body_bytes, actual=content_length, close_code=None
        )
    if method == b"CONNECT":
        upgrade = b"connect"
    elif not connection_upgrade:
        upgrade = None
    return Request(
        method,
        target,
        headers,
        version,
        parser_keep_alive,
        upgrade,
        expect_continue and version == b"1.1",
        chunked,
        content_length,
    )


def header_limit(limits: HTTPLimits, actual: int | None = None) -> LimitExceeded:
    return LimitExceeded(
        "max_header_bytes", limits.max_header_bytes, actual=actual, status_hint=431
    )


def body_limit(limits: HTTPLimits, actual: int) -> LimitExceeded:
    assert limits.max_body_bytes is not None
    return LimitExceeded("max_body_bytes", limits.max_body_bytes, actual=actual, close_code=None)


class LLHTTPRequestParser:
    """httptools (llhttp) behind :class:`RequestParser`.

    httptools reports through callbacks on this object; exceptions raised in a callback
    come back from ``feed_data`` as ``HttpParserCallbackError`` with ours as context.
    """

    __slots__ = (
        "_body_bytes",
        "_closed",
        "_events",
        "_head_fed",
        "_headers",
        "_held",
        "_in_head",
        "_keep_alive",
        "_limits",
        "_measure",
        "_parser",
        "_requests",
        "_started",
        "_url",
        "paused",
    )

    def __init__(self, events: list[Event], requests: deque[Request], limits: HTTPLimits) -> None:
        self._events = events
        self._requests = requests
        self._limits = limits
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_fed = 0
        self._body_bytes = 0
        self._in_head = True
        self._started = False
        self._held = b""
        self._closed = False
        self._keep_alive = True
        self._measure = False
        self.paused = False

    # ----------------------------------------------------------------- interface

    def feed(self, data: bytes) -> None:
        if self.paused:
            self._held += data
            return
        if self._closed:
            return  # after a request that ends the connection nothing more is read
        if self._in_head:
            if not self._started:
                # At a message boundary: from here every byte of the head is counted.
                self._head_fed = 0
                self._measure = False
            self._head_fed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.paused = True
            self._held = data[offset:]
            return
        except httptools.HttpParserCallbackError as exc:
            context = exc.__context__
            if isinstance(context, RemoteProtocolError):
                raise context from None
            raise  # pragma: no cover - a bug in a callback, not a peer error
        except httptools.HttpParserInvalidMethodError:
            raise bad_request("invalid request method") from None
        except httptools.HttpParserInvalidURLError:
            raise bad_request("invalid request target") from None
        except httptools.HttpParserError as exc:
            if self._closed:
                return  # llhttp refuses data after "Connection: close"; we ignore it
            raise bad_request(f"malformed request: {exc}") from None
        # A head that has not ended yet: bound what httptools may be holding.
        if self._in_head and self._head_fed > self._limits.max_header_bytes:
            if not self._headers:
                # Still inside the request line.
                raise LimitExceeded(
                    "max_request_line_bytes",
                    self._limits.max_request_line_bytes,
                    status_hint=414,
                    close_code=None,
                )
            raise header_limit(self._limits)

    def feed_eof(self) -> bool:
        if self._started and not self.paused:
            raise bad_request("connection closed in the middle of a request")
        if self._in_head and self._head_fed and not self._closed:
            raise bad_request("connection closed in the middle of a request head")
        return True

    def resume(self, switched: bool) -> bytes:
        held, self._held = self._held, b""
        self.paused = False
        if switched:
            return held
        # llhttp cannot continue after an upgrade: start a fresh parser.
        self._parser = httptools.HttpRequestParser(self)
        if held:
            self.feed(held)
        return b""

    # ----------------------------------------------------------------- callbacks

    # No on_message_begin (httptools skips callbacks that are not defined): the state of
    # a message is reset when the previous one completes, and on_url marks the start.

    def on_url(self, url: bytes) -> None:
        self._started = True
        self._url += url
        if len(self._url) > self._limits.max_request_line_bytes:
            raise LimitExceeded(
                "max_request_line_bytes",
                self._limits.max_request_line_bytes,
                actual=len(self._url),
                status_hint=414,
                close_code=None,
            )

    def on_header(self, name: bytes, value: bytes) -> None:
        # Count and size are checked once, in check_head; until then the bytes fed while
        # in the head (feed()) bound what this list can hold.
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        version = parser.get_http_version()
        request = check_head(
            parser.get_method(),
            self._url,
            _VERSIONS.get(version) or version.encode("ascii"),
            self._headers,
            parser.should_keep_alive(),
            self._limits,
            # Fewer bytes than the limit fed since the head began: it cannot exceed it.
            self._measure or self._head_fed > self._limits.max_header_bytes,
        )
        self._keep_alive = request.keep_alive
        self._measure = False
        self._head_fed = 0
        self._url = b""
        self._headers = []
        self._events.append(request)
        self._requests.append(request)

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        limit = self._limits.max_body_bytes
        if limit is not None and self._body_bytes > limit:
            raise body_limit(self._limits, self._body_bytes)
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        self._events.append(END_OF_MESSAGE)
        self._body_bytes = 0
        if not self._keep_alive:
            self._closed = True
        self._in_head = True
        self._started = False
        # The rest of this feed's bytes were not counted: measure the next head exactly.
        self._measure = True
        self._head_fed = 0


class H11RequestParser:
    """h11 behind :class:`RequestParser`, used as a pure request parser.

    h11 is a whole connection: it will not parse request N+1 until it has seen our
    response to request N. To use it as a parser only, each complete request is answered
    inside h11 with a throw-away ``204`` whose bytes are discarded; our real responses are
    written by :mod:`netstack.proto.http11.write` for both parsers.
    """

    def __init__(self, events: list[Event], requests: deque[Request], limits: HTTPLimits) -> None:
        import h11

        self._h11 = h11
        self._events = events
        self._requests = requests
        self._limits = limits
        self._conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_header_bytes)
        self._body_bytes = 0
        self._started = False
        self._held = b""
        self._closed = False
        self.paused = False

    def feed(self, data: bytes) -> None:
        if self.paused or self._closed:
            self._held += data
            return
        self._conn.receive_data(data)
        self._pump()

    def _pump(self) -> None:
        h11 = self._h11
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint
                if status == 431:
                    raise header_limit(self._limits) from None
                if "Transfer-Encoding" in str(exc) or status == 501:
                    raise bad_request(f"malformed request: {exc}", 501) from None
                raise bad_request(f"malformed request: {exc}", status) from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if event is h11.PAUSED and conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    self.paused = True
                    self._held = conn.trailing_data[0]
                return
            if isinstance(event, h11.Request):
                self._on_request(event)
            elif isinstance(event, h11.Data):
                self._body_bytes += len(event.data)
                limit = self._limits.max_body_bytes
                if limit is not None and self._body_bytes > limit:
                    raise body_limit(self._limits, self._body_bytes)
                self._events.append(Data(bytes(event.data)))
            elif isinstance(event, h11.EndOfMessage):
                trailers = list(event.headers)
                self._events.append(EndOfMessage(trailers) if trailers else END_OF_MESSAGE)
                self._started = False
                if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                    continue  # next_event() answers PAUSED with the held bytes
                self._finish_cycle()
                if self._closed:
                    return
            else:  # ConnectionClosed
                return

    def _on_request(self, event: object) -> None:
        h11 = self._h11
        assert isinstance(event, h11.Request)
        self._started = True
        self._body_bytes = 0
        headers = [(bytes(n), bytes(v)) for n, v in event.headers]
        target = bytes(event.target)
        if len(target) > self._limits.max_request_line_bytes:
            raise LimitExceeded(
                "max_request_line_bytes",
                self._limits.max_request_line_bytes,
                actual=len(target),
                status_hint=414,
                close_code=None,
            )
        version = bytes(event.http_version)
        keep_alive = self._keep_alive(version, headers)
        request = check_head(
            bytes(event.method), target, version, headers, keep_alive, self._limits
        )
        self._events.append(request)
        self._requests.append(request)

    @staticmethod
    def _keep_alive(version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        tokens: set[bytes] = set()
        for name, value in headers:
            if name == b"connection":
                tokens |= _connection_tokens(value)
        if version == b"1.0":
            return b"keep-alive" in tokens
        return b"close" not in tokens

    def _finish_cycle(self) -> None:
        h11 = self._h11
        conn = self._conn
        conn.send(h11.Response(status_code=204, headers=[]))
        conn.send(h11.EndOfMessage())
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            # The request ended the connection (Connection: close, HTTP/1.0): what follows
            # is never parsed, as with llhttp after a non-keep-alive request.
            self._closed = True

    def feed_eof(self) -> bool:
        if self.paused or self._closed:
            return True
        if self._started:
            raise bad_request("connection closed in the middle of a request")
        # Bytes of an unfinished head are pending inside h11.
        if self._conn.trailing_data[0]:
            raise bad_request("connection closed in the middle of a request")
        return True

    def resume(self, switched: bool) -> bytes:
        held, self._held = self._held, b""
        self.paused = False
        if switched:
            return held
        h11 = self._h11
        self._conn = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self._limits.max_header_bytes
        )
        if held:
            self.feed(held)
        return b""


def make_parser(
    name: str, events: list[Event], requests: deque[Request], limits: HTTPLimits
) -> RequestParser:
    """The parser called ``name`` (``"httptools"`` or ``"h11"``).

    httptools is a core dependency (pyproject), so both are always importable; h11 is
    the fallback for platforms where httptools has no wheel, chosen with ``--parser h11``.
    """
    if name == "httptools":
        return LLHTTPRequestParser(events, requests, limits)
    if name == "h11":
        return H11RequestParser(events, requests, limits)
    raise ValueError(f"unknown HTTP parser {name!r}")
