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
then returned raw) or not (they are parsed as the next request). Once switched, a
parser keeps holding whatever is fed to it, for the caller to collect with
:meth:`resume` again. While undecided, it holds at most ``max_header_bytes``.

The two parsers are made to agree (the corpus in ``tests/data/http11`` checks it, fed
whole, byte by byte and in random splits): llhttp is strict, so the h11 wrapper adds
the checks h11 leaves out (:func:`check_raw_head`: bare LF, obs-fold, DEL, repeated or
list-valued Content-Length, which h11 merges), and the llhttp wrapper strips trailing
whitespace from values and reports trailers, as h11 does. Differences that remain are
listed in ``tests/proto/http11/test_parsers.py`` (``KNOWN_DIFFERENCES``).
"""

from __future__ import annotations

import re
from collections import deque
from typing import TYPE_CHECKING, Final, Protocol

import httptools

from netstack.config import HTTPLimits
from netstack.errors import LimitExceeded, RemoteProtocolError
from netstack.proto.http11.events import END_OF_MESSAGE, Data, EndOfMessage, Event, Request

if TYPE_CHECKING:
    import h11

# Bytes a request line adds around method and target: two spaces, "HTTP/1.1", CRLF.
_REQUEST_LINE_OVERHEAD = 12
# ": " and CRLF around each header line.
_HEADER_LINE_OVERHEAD = 4


class RequestParser(Protocol):
    """What :class:`~netstack.proto.http11.connection.HTTPConnection` needs of a parser."""

    paused: bool

    @property
    def in_message(self) -> bool:
        """A ``Request`` was reported and its ``EndOfMessage`` not yet (body pending)."""

    def feed(self, data: bytes) -> None:
        """Parse ``data``, appending events. Raises RemoteProtocolError."""

    def feed_eof(self) -> bool:
        """The peer closed; bytes fed after this are ignored. Returns True when that
        happened between requests.

        Raises:
            RemoteProtocolError: when EOF cut a request short.
        """

    def resume(self, switched: bool) -> bytes:
        """Leave the paused state; return held bytes if ``switched``, else parse them."""


_VERSIONS = {"1.1": b"1.1", "1.0": b"1.0"}
# The end of a request line ("... HTTP/1.1" CR) -> its version.
_LINE_VERSIONS = {b" HTTP/1.1\r": b"1.1", b" HTTP/1.0\r": b"1.0"}

# Headers check_head looks at; any other name costs one set lookup.
_SPECIAL = frozenset(
    (b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade", b"expect")
)


def bad_request(message: str, status: int = 400) -> RemoteProtocolError:
    return RemoteProtocolError(message, status_hint=status)


def connection_tokens(value: bytes) -> set[bytes]:
    """The lowercased tokens of a Connection header value."""
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
        if version.startswith(b"0."):
            # HTTP/0.9 has no headers and no status line: not a request we can answer.
            raise bad_request("HTTP/0.9 requests are not supported")
        raise bad_request(f"HTTP version {version.decode('latin-1')} not supported", 505)
    if len(headers) > limits.max_header_count:
        raise header_count_limit(limits, len(headers))
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
            # (keep-alive or close, nearly always: tokenise only a value that might say so)
            if not connection_upgrade and b"upgrade" in value.lower():
                connection_upgrade = b"upgrade" in connection_tokens(value)
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
    if upgrade is not None:
        # llhttp stops at the end of the head of a request that asks to switch, so a body
        # would be taken for the new protocol's bytes (h11 reads it): refuse it outright.
        if chunked or content_length:
            raise bad_request("a request that asks to switch protocols cannot have a body")
        if version == b"1.0" and method != b"CONNECT":
            upgrade = None  # RFC 9110 §7.8: ignore Upgrade in an HTTP/1.0 request
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


def header_count_limit(limits: HTTPLimits, actual: int) -> LimitExceeded:
    return LimitExceeded(
        "max_header_count",
        limits.max_header_count,
        actual=actual,
        status_hint=431,
        close_code=None,
    )


def request_line_limit(limits: HTTPLimits, actual: int | None = None) -> LimitExceeded:
    return LimitExceeded(
        "max_request_line_bytes",
        limits.max_request_line_bytes,
        actual=actual,
        status_hint=414,
        close_code=None,
    )


def body_limit(limits: HTTPLimits, actual: int) -> LimitExceeded:
    assert limits.max_body_bytes is not None
    return LimitExceeded("max_body_bytes", limits.max_body_bytes, actual=actual, close_code=None)


def _hold(held: bytes, data: bytes, switched: bool, limits: HTTPLimits) -> bytes:
    """``held + data``, bounded while the switch is undecided (a paused parser)."""
    held += data
    if not switched and len(held) > limits.max_header_bytes:
        raise header_limit(limits, len(held))
    return held


# What h11 accepts (as RFC 9112 lets a recipient do) and llhttp refuses: checked on the
# raw head by the h11 wrapper so that the two parsers agree, strictly.
_OBS_FOLD: Final = re.compile(rb"\n[ \t]")
_CONTENT_LENGTH: Final = re.compile(rb"\ncontent-length[ \t]*:([^\r\n]*)", re.IGNORECASE)


def check_raw_head(head: bytes) -> None:
    """Refuse a request head that h11 would accept but llhttp does not.

    Each of these lets a lenient and a strict parser disagree about where a message
    ends, the root of request smuggling, so netstack refuses them with either parser.

    Raises:
        RemoteProtocolError: 400 for a bare LF line ending (RFC 9112 §2.2), obsolete
            line folding (§5.2), a DEL in a field value (RFC 9110 §5.5), or a
            Content-Length repeated or given as a list (RFC 9110 §8.6; h11 merges
            identical values).
    """
    if head.count(b"\n") != head.count(b"\r\n"):
        raise bad_request("bare LF in the request head")
    if _OBS_FOLD.search(head) is not None:
        raise bad_request("obsolete line folding in the request head")
    if b"\x7f" in head:
        raise bad_request("DEL character in the request head")
    lengths = _CONTENT_LENGTH.findall(head)
    if len(lengths) > 1 or (lengths and b"," in lengths[0]):
        raise bad_request("more than one Content-Length")


def _llhttp_error(exc: Exception) -> RemoteProtocolError:
    """Convert an llhttp error, with the statuses check_head and h11 give the same input."""
    message = str(exc)
    if message == "Invalid HTTP version":  # HTTP/1.2, 3.0...: h11 parses them, then 505
        return bad_request(f"malformed request: {message}", 505)
    if message.startswith("Invalid `Transfer-Encoding`"):  # "chunked, gzip" and the like
        return bad_request(f"malformed request: {message}", 501)
    return bad_request(f"malformed request: {message}")


class LLHTTPRequestParser:
    """httptools (llhttp) behind :class:`RequestParser`.

    httptools reports through callbacks on this object; exceptions raised in a callback
    come back from ``feed_data`` as ``HttpParserCallbackError`` with ours as context.
    Trailer fields come through ``on_header`` too, after the head is complete.
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
        "_line_version",
        "_max_head",
        "_max_line",
        "_measure",
        "_parser",
        "_requests",
        "_since_body",
        "_started",
        "_switched",
        "_url",
        "paused",
    )

    def __init__(self, events: list[Event], requests: deque[Request], limits: HTTPLimits) -> None:
        self._events = events
        self._requests = requests
        self._limits = limits
        self._max_head = limits.max_header_bytes
        self._max_line = limits.max_request_line_bytes
        self._parser = httptools.HttpRequestParser(self)
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._head_fed = 0
        self._body_bytes = 0
        self._since_body = 0
        self._in_head = True
        self._started = False
        self._held = b""
        self._closed = False
        self._switched = False
        self._keep_alive = True
        self._measure = False
        self._line_version: bytes | None = None
        self.paused = False

    # ----------------------------------------------------------------- interface

    @property
    def in_message(self) -> bool:
        return self._started and not self._in_head  # (a partial head is not reported)

    def feed(self, data: bytes) -> None:
        if self._closed:
            return  # after a request that ends the connection, or EOF, nothing is read
        if self.paused:
            self._held = _hold(self._held, data, self._switched, self._limits)
            return
        if self._in_head:
            if self._started:
                self._head_fed += len(data)
            else:
                # At a message boundary: from here every byte of the head is counted.
                self._head_fed = len(data)
                self._measure = False
                # When this feed holds the whole request line, read the version off its
                # end: get_http_version() formats a string (0.2 µs a request). llhttp
                # validates the line; a line it refuses never reaches on_headers_complete.
                end = data.find(b"\n")
                self._line_version = _LINE_VERSIONS.get(data[end - 10 : end]) if end > 10 else None
        else:
            self._since_body += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset = exc.args[0] if exc.args and isinstance(exc.args[0], int) else len(data)
            self.paused = True
            self._held = _hold(b"", data[offset:], False, self._limits)
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
            raise _llhttp_error(exc) from None
        if self._in_head:
            # A head that has not ended yet: bound what httptools may be holding. A long
            # request line was refused in on_url already, so this is the header block.
            if self._head_fed > self._max_head:
                raise header_limit(self._limits)
        else:
            # Bytes fed since the last body byte: chunk-size lines, extensions and
            # trailers, which httptools buffers (a trailer line) and llhttp never bounds.
            since = self._since_body
            if since < 0:
                # The head ended in this feed and no body byte followed: count the whole
                # feed, head included (so head and framing before the first body byte
                # must fit in max_header_bytes together, when they come in one read).
                since = self._since_body = len(data)
            if since > self._max_head:
                raise header_limit(self._limits)

    def feed_eof(self) -> bool:
        self._closed = True  # nothing can follow the end of the stream
        if self.paused and not self._switched:
            self._held = b""  # requests behind an undecided upgrade: the client has gone
        if self._started:  # (never while paused: the upgrade request was complete)
            raise bad_request("connection closed in the middle of a request")
        return True

    def resume(self, switched: bool) -> bytes:
        held, self._held = self._held, b""
        if switched:
            # Stay paused: what arrives from now on is the new protocol's, held for the
            # caller (collected by calling resume(True) again).
            self._switched = True
            return held
        self.paused = False
        # llhttp cannot continue after an upgrade: start a fresh parser.
        self._parser = httptools.HttpRequestParser(self)
        if held:
            self.feed(held)
        return b""

    # ----------------------------------------------------------------- callbacks

    # The state of a message is reset when the previous one completes. on_message_begin
    # (one call per request) only marks that a message has started, for feed_eof.

    def on_message_begin(self) -> None:
        self._started = True

    def on_url(self, url: bytes) -> None:
        # Called once per feed that holds part of the target, so pieces are joined.
        joined = self._url = self._url + url
        if len(joined) > self._max_line:
            raise request_line_limit(self._limits, len(joined))

    def on_header(self, name: bytes, value: bytes) -> None:
        # Count and size are checked once, in check_head; until then the bytes fed while
        # in the head (feed()) bound what this list can hold. llhttp strips leading
        # whitespace from a value but not trailing whitespace; h11 strips both.
        self._headers.append((name.lower(), value.rstrip(b" \t")))

    def on_headers_complete(self) -> None:
        parser = self._parser
        self._in_head = False
        self._since_body = -1  # (see feed)
        version = self._line_version
        if version is None:
            text = parser.get_http_version()
            version = _VERSIONS.get(text) or text.encode("ascii")
        else:
            self._line_version = None  # (the next request in this feed has its own line)
        request = check_head(
            parser.get_method(),
            self._url,
            version,
            self._headers,
            parser.should_keep_alive(),
            self._limits,
            # Fewer bytes than the limit fed since the head began: it cannot exceed it.
            self._measure or self._head_fed > self._max_head,
        )
        self._keep_alive = request.keep_alive
        self._measure = False
        self._url = b""
        self._headers = []
        self._events.append(request)
        self._requests.append(request)

    def on_body(self, body: bytes) -> None:
        self._since_body = 0
        self._body_bytes += len(body)
        limit = self._limits.max_body_bytes
        if limit is not None and self._body_bytes > limit:
            raise body_limit(self._limits, self._body_bytes)
        self._events.append(Data(body))

    def on_message_complete(self) -> None:
        trailers = self._headers
        if trailers:
            # Chunked trailers (RFC 9112 §7.1.2), reported through on_header.
            self._headers = []
            if len(trailers) > self._limits.max_header_count:
                raise header_count_limit(self._limits, len(trailers))
            self._events.append(EndOfMessage(trailers))
        else:
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
    written by :mod:`netstack.proto.http11.write` for both parsers. h11 never keeps an
    HTTP/1.0 connection alive; when the client asked for it (``Connection: keep-alive``)
    the next request is parsed by a fresh h11 connection.

    ``_raw`` mirrors h11's receive buffer, so that each request's raw head can be given
    to :func:`check_raw_head`.
    """

    def __init__(self, events: list[Event], requests: deque[Request], limits: HTTPLimits) -> None:
        import h11

        self._h11 = h11
        self._events = events
        self._requests = requests
        self._limits = limits
        self._conn = self._new_connection()
        self._raw = bytearray()
        self._body_bytes = 0
        self._started = False
        self._keep_alive = True
        self._held = b""
        self._closed = False
        self._switched = False
        self.paused = False

    def _new_connection(self) -> h11.Connection:
        lib = self._h11
        conn: h11.Connection = lib.Connection(
            lib.SERVER, max_incomplete_event_size=self._limits.max_header_bytes
        )
        return conn

    def _unread(self) -> int:
        # h11 has no public way to get this without copying the buffer (trailing_data).
        return len(self._conn._receive_buffer)

    @property
    def in_message(self) -> bool:
        return self._started

    def feed(self, data: bytes) -> None:
        if self._closed or not data:
            return  # (h11 takes b"" for the end of the stream)
        if self.paused:
            self._held = _hold(self._held, data, self._switched, self._limits)
            return
        self._raw += data
        self._conn.receive_data(data)
        self._pump()

    def _pump(self) -> None:
        h11 = self._h11
        raw = self._raw
        while True:
            conn = self._conn
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise self._convert(exc) from None
            if event is h11.NEED_DATA:
                return
            if event is h11.PAUSED:
                # Only after a request that proposed to switch protocols: the throw-away
                # response completes every other cycle at once.
                self.paused = True
                self._held = _hold(b"", bytes(raw), False, self._limits)
                raw.clear()
                return
            taken = len(raw) - self._unread()
            if isinstance(event, h11.Request):
                head = bytes(raw[:taken])
                del raw[:taken]
                check_raw_head(head)
                self._on_request(event)
                continue
            del raw[:taken]
            if isinstance(event, h11.Data):
                self._body_bytes += len(event.data)
                limit = self._limits.max_body_bytes
                if limit is not None and self._body_bytes > limit:
                    raise body_limit(self._limits, self._body_bytes)
                self._events.append(Data(bytes(event.data)))
                continue
            assert isinstance(event, h11.EndOfMessage)  # no ConnectionClosed: no b"" fed
            trailers = list(event.headers)
            if len(trailers) > self._limits.max_header_count:
                raise header_count_limit(self._limits, len(trailers))
            self._events.append(EndOfMessage(trailers) if trailers else END_OF_MESSAGE)
            self._started = False
            if conn.their_state is h11.MIGHT_SWITCH_PROTOCOL:
                continue  # next_event() answers PAUSED
            self._finish_cycle()
            if self._closed:
                return

    def _convert(self, exc: h11.RemoteProtocolError) -> RemoteProtocolError:
        status = exc.error_status_hint
        if status == 431:
            # h11 only knows that the head grew too long; llhttp tells a long target
            # (414) from a long header block (431) as it goes.
            if not self._started:
                raw = self._raw
                end = raw.find(b"\n")
                line = raw if end < 0 else raw[:end]
                parts = line.split(b" ", 2)
                if len(parts) > 1 and len(parts[1]) > self._limits.max_request_line_bytes:
                    return request_line_limit(self._limits, len(parts[1]))
            return header_limit(self._limits)
        if "Transfer-Encoding" in str(exc) or status == 501:
            return bad_request(f"malformed request: {exc}", 501)
        return bad_request(f"malformed request: {exc}", status)

    def _on_request(self, event: h11.Request) -> None:
        self._started = True
        self._body_bytes = 0
        headers = [(bytes(n), bytes(v)) for n, v in event.headers]
        target = bytes(event.target)
        if len(target) > self._limits.max_request_line_bytes:
            raise request_line_limit(self._limits, len(target))
        version = bytes(event.http_version)
        keep_alive = self._keep_alive_of(version, headers)
        request = check_head(
            bytes(event.method), target, version, headers, keep_alive, self._limits
        )
        self._keep_alive = keep_alive
        self._events.append(request)
        self._requests.append(request)

    @staticmethod
    def _keep_alive_of(version: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        tokens: set[bytes] = set()
        for name, value in headers:
            if name == b"connection":
                tokens |= connection_tokens(value)
        if version == b"1.0":
            return b"keep-alive" in tokens and b"close" not in tokens
        return b"close" not in tokens

    def _finish_cycle(self) -> None:
        h11 = self._h11
        conn = self._conn
        conn.send(h11.Response(status_code=204, headers=[]))
        conn.send(h11.EndOfMessage())
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        elif self._keep_alive:
            # An HTTP/1.0 keep-alive request: h11 would close, we go on.
            self._conn = self._new_connection()
            if self._raw:
                self._conn.receive_data(bytes(self._raw))
        else:
            # The request ended the connection (Connection: close, HTTP/1.0): what follows
            # is never parsed, as with llhttp after a non-keep-alive request.
            self._closed = True
            self._raw.clear()

    def feed_eof(self) -> bool:
        if self._closed:
            return True
        self._closed = True  # nothing can follow the end of the stream
        if self.paused:
            if not self._switched:
                self._held = b""  # requests behind an undecided upgrade: the client has gone
            return True
        if self._started or self._raw:
            raise bad_request("connection closed in the middle of a request")
        return True

    def resume(self, switched: bool) -> bytes:
        held, self._held = self._held, b""
        if switched:
            self._switched = True
            return held
        self.paused = False
        self._conn = self._new_connection()
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
