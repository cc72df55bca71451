"""One HTTP/1.1 connection of the WSGI server: parse, run the app, write the response.

Theory of operation
-------------------
``data_received`` feeds :class:`~netstack.proto.http11.HTTPConnection` and walks the
events it returns. Body events of the request in progress go to its body; everything
after (pipelined requests) waits in ``pending`` until that request's response is done
*and* its body has ended, so responses leave in request order (RFC 9112 §9.3.2).

Each request becomes an :class:`Exchange`, run one of two ways:

* ``threads == 0`` (inline): the app runs on the event loop once the body is complete
  (bounded by ``max_body_bytes``); a streaming response is pumped chunk by chunk and the
  pump stops while the transport's write buffer is above its high-water mark, resuming
  in ``resume_writing``.
* ``threads > 0``: the app runs in a worker thread as soon as the head is parsed, reading
  a :class:`~netstack.servers.wsgi.body.StreamingBody`; what it sends is handed to the
  loop in batches, in order, and the thread blocks while writing is paused or too much
  is in flight.

Timers are deadlines checked by the server's tick (one sweep for all connections), not one
timer handle per request: ``header`` (a head must complete), ``keepalive`` (idle between
requests), ``body`` (a body must keep arriving) and ``write`` (the client must keep
reading). None runs while the app is working.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from tempfile import SpooledTemporaryFile
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final

from netstack.errors import LocalProtocolError, RemoteProtocolError
from netstack.proto.http11 import (
    END_OF_MESSAGE,
    ConnectionClosed,
    Data,
    EndOfMessage,
    HTTPConnection,
    InformationalResponse,
    Request,
    State,
)
from netstack.proto.http11.write import reason_phrase
from netstack.servers.wsgi.body import BodyError, StreamingBody

if TYPE_CHECKING:
    from netstack.servers.wsgi.server import WSGIServer

logger = logging.getLogger(__name__)

INF: Final = float("inf")
# Kinds of deadline a connection can be under.
NO_TIMER, HEADER, KEEPALIVE, BODY, WRITE, LINGER = range(6)
# After an error reply, how long and how much we keep reading (and discarding) so that
# closing with unread input does not make the kernel reset the connection and destroy
# the reply before the client reads it (nginx's lingering_close).
LINGER_SECONDS: Final = 2.0
LINGER_BYTES: Final = 1 << 20
# Pipelined requests parsed ahead of the one being answered before we stop reading.
MAX_PENDING_EVENTS: Final = 64
# Inline mode keeps a body this large in memory, then spools it to a temporary file.
SPOOL_BYTES: Final = 1 << 20
# Block size for files sent without sendfile.
FILE_BLOCK: Final = 256 * 1024
# Bytes an app thread may have handed to the loop and not yet seen written.
THREAD_IN_FLIGHT: Final = 256 * 1024

CONNECTION_CLOSE: Final = (b"connection", b"close")
# Enum members as globals (CPython 3.11 pays a descriptor call for State.IDLE).
IDLE: Final = State.IDLE
CLOSED: Final = State.CLOSED
# "Content-Type" -> b"content-type", for the header names applications send.
_NAMES: dict[str, bytes] = {}

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]
# What start_response makes of a status and header list: (code, encoded headers, has a
# Content-Length, its value if valid). Apps send the same few again and again; keyed by
# (status, *headers), bounded (emptied when full), only valid ones kept.
EncodedResponse = tuple[int, tuple[tuple[bytes, bytes], ...], bool, int | None]
_RESPONSES: dict[tuple[Any, ...], EncodedResponse] = {}
_RESPONSES_SIZE: Final = 256


def _close_result(close: Callable[[], object]) -> None:
    """Call the ``close()`` of an app's response iterable (PEP 3333); its error is the app's
    bug, logged with the traceback, and the connection goes on."""
    try:
        close()
    except Exception:
        logger.exception("error closing the app's response iterable")


def _encode_response(status: str, headers: list[tuple[str, str]]) -> EncodedResponse:
    """Check and encode what an app gave start_response (PEP 3333: latin-1 strings).

    Raises:
        ValueError: a malformed status line or header pair.
    """
    try:
        code = int(status[:3])
        if len(status) < 4 or status[3] != " " or code < 200:
            raise ValueError
        encoded = []
        has_length = False
        declared = None
        for name, value in headers:
            raw = _NAMES.get(name)
            if raw is None:
                raw = name.lower().encode("latin-1")
                if len(_NAMES) < 1024:
                    _NAMES[name] = raw
            encoded_value = value.encode("latin-1")
            if raw == b"content-length":
                has_length = True
                if encoded_value.isdigit():
                    declared = int(encoded_value)
            encoded.append((raw, encoded_value))
    except (ValueError, TypeError, UnicodeEncodeError, AttributeError):
        raise ValueError(
            f"invalid status or headers from the app: {status!r} {headers!r}"
        ) from None
    result = (code, tuple(encoded), has_length, declared)
    if type(status) is str and all(
        type(h) is tuple and type(h[0]) is str and type(h[1]) is str for h in headers
    ):
        # (an equal key made of other types, say a str subclass, could encode
        # differently: only plain str in tuple pairs are remembered.)
        if len(_RESPONSES) >= _RESPONSES_SIZE:
            _RESPONSES.clear()
        _RESPONSES[(status, *headers)] = result
    return result


def error_response(status: int, message: str, *, close: bool = True) -> bytes:
    """A complete, small plain-text error response (the one place errors become replies)."""
    body = f"{status} {reason_phrase(status).decode()}: {message}\n".encode()
    head = (
        b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
        b"content-length: %d\r\n" % (status, reason_phrase(status), len(body))
    )
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


SERVICE_UNAVAILABLE: Final = error_response(503, "too many connections, try again")


class _EmptyInput:
    """``wsgi.input`` of a request without a body: always at its end (one shared object;
    closing it does nothing, so an app cannot break it for the next request)."""

    def read(self, size: int | None = -1) -> bytes:
        return b""

    def readline(self, size: int | None = -1) -> bytes:
        return b""

    def readlines(self, hint: int = -1) -> list[bytes]:
        return []

    def __iter__(self) -> Iterator[bytes]:
        return iter(())

    def close(self) -> None:
        pass


EMPTY_INPUT: Final = _EmptyInput()


class _NoBody:
    """Stands in for the body of a request without one, to swallow its EndOfMessage."""

    done = False

    def feed(self, data: bytes) -> bool:  # pragma: no cover - a body-less request has no Data
        return False

    def finish(self) -> None:
        pass

    def fail(self, reason: str) -> None:
        pass


class _BufferedBody:
    """Inline mode: the whole body, collected before the app runs."""

    __slots__ = ("done", "file")

    def __init__(self) -> None:
        # Closed by fail() or by the exchange once the app is done with it.
        self.file: Any = SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
        self.done = False

    def feed(self, data: bytes) -> bool:
        self.file.write(data)
        return False

    def finish(self) -> None:
        self.file.seek(0)
        self.done = True

    def fail(self, reason: str) -> None:
        self.file.close()


Body = _NoBody | _BufferedBody | StreamingBody


class FileWrapper:
    """``wsgi.file_wrapper``: the server sends the file with ``os.sendfile`` when it can."""

    def __init__(self, filelike: Any, blksize: int = 64 * 1024) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self) -> Iterator[bytes]:
        while True:
            data = self.filelike.read(self.blksize)
            if not data:
                return
            yield data


class WSGIProtocol(asyncio.Protocol):
    """asyncio protocol for one client connection of a :class:`WSGIServer`."""

    def __init__(self, server: WSGIServer) -> None:
        self.server = server
        self.transport: Any = None
        self.conn: HTTPConnection | None = None
        self.peer: Any = None
        self.pending: deque[Any] = deque()
        self.body: Body | None = None
        self.exchange: Exchange | None = None
        self.discarding = False
        self.write_paused = False
        self.read_paused = False
        self.closed = False
        self.timer = NO_TIMER
        self.deadline = INF
        self.requests = 0
        self.base_environ: dict[str, Any] | None = None
        self.peer_trusted = False
        self.lingering = False
        self.lingered = 0
        self.write_waiter: asyncio.Future[None] | None = None
        # PROXY protocol: bytes received before the header is complete.
        self.proxy_buffer: bytes | None = None

    # ------------------------------------------------------------------ asyncio

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        server = self.server
        if not server.admit(self):
            transport.write(SERVICE_UNAVAILABLE)
            transport.close()
            self.closed = True
            return
        self.conn = HTTPConnection(server.http_limits, server.parser)
        peer = transport.get_extra_info("peername")
        self.peer = peer if isinstance(peer, tuple) else None
        self.peer_trusted = server.trusted.contains(peer[0] if self.peer else None)
        if server.proxy_protocol and self.peer_trusted:
            self.proxy_buffer = b""
        transport.set_write_buffer_limits(
            high=server.limits.write_buffer_high_bytes, low=server.limits.write_buffer_low_bytes
        )
        self._arm(HEADER, server.http_timeouts.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake_writer()
        self.server.release(self)
        if self.body is not None:
            self.body.fail("the client closed the connection")
        exchange = self.exchange
        if exchange is not None:
            exchange.lost = True
            exchange.wake_writer()  # a thread blocked on writing wakes up and stops

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None:
            return
        if self.lingering:
            self.lingered += len(data)
            if self.lingered > LINGER_BYTES:
                self.abort()
            return
        if self.proxy_buffer is not None:
            data = self._proxy_header(data)
            if not data:
                return
        try:
            conn.receive_data(data)
        except RemoteProtocolError as exc:
            self._reject(exc)
            return
        events = conn.events_received()
        if events:
            self._handle(events)
        elif self.timer == KEEPALIVE:
            # The first bytes of a new head: from now on it has header_timeout to finish.
            self._arm(HEADER, self.server.http_timeouts.header_timeout)

    def _proxy_header(self, data: bytes) -> bytes:
        """Consume a PROXY v1/v2 header from a trusted peer; return the bytes after it."""
        from netstack.proto import proxy_protocol

        assert self.proxy_buffer is not None
        try:
            header, rest = proxy_protocol.receive(self.proxy_buffer, data)
        except RemoteProtocolError as exc:
            self.proxy_buffer = None
            self._reject(exc)
            return b""
        if header is None:
            self.proxy_buffer = rest
            return b""
        self.proxy_buffer = None
        if header.source is not None:
            self.peer = header.source
            # The proxy vouches for the client, which is not itself a trusted proxy.
            self.peer_trusted = self.server.trusted.contains(header.source[0])
        return rest

    def eof_received(self) -> bool:
        conn = self.conn
        if conn is None or self.lingering:
            return False
        try:
            conn.receive_eof()
        except RemoteProtocolError as exc:
            if self.body is not None:
                self.body.fail(str(exc))
            if self.exchange is None:
                self._close()
            else:
                self.exchange.must_close = True  # the client cut its request short
            return True
        self._handle(conn.events_received())
        return True  # keep our side open to finish answering, then close

    async def writable(self) -> None:
        """Wait until the transport accepts writes again (or the connection is lost)."""
        if not self.write_paused or self.closed:
            return
        if self.write_waiter is None:
            self.write_waiter = self.server.loop.create_future()
        await self.write_waiter

    def _wake_writer(self) -> None:
        waiter, self.write_waiter = self.write_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True
        self._arm(WRITE, self.server.http_timeouts.write_timeout)

    def resume_writing(self) -> None:
        self.write_paused = False
        self._wake_writer()
        if self.timer == WRITE:
            self._arm(NO_TIMER, None)
        exchange = self.exchange
        if exchange is not None:
            exchange.wake_writer()
            if exchange.inline_iterator is not None:
                exchange.pump()

    # ------------------------------------------------------------------ events

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            body = self.body
            kind = type(event)
            if body is not None:
                if kind is Data:
                    if not self.discarding and body.feed(event.data):
                        self._pause_reading()
                    self._arm(BODY, self.server.http_timeouts.body_timeout)
                    continue
                if kind is EndOfMessage:
                    self.body = None
                    if body is not _NO_BODY:
                        self.discarding = False
                        body.finish()
                        if self.timer == BODY:
                            self._arm(NO_TIMER, None)
                    exchange = self.exchange
                    if exchange is not None and not exchange.started:
                        exchange.start()
                    elif exchange is None:
                        self._next()
                    continue
            if self.exchange is not None or self.pending:
                self.pending.append(event)
                if len(self.pending) > MAX_PENDING_EVENTS:
                    self._pause_reading()
                continue
            if kind is Request:
                self.timer = NO_TIMER
                self.deadline = INF
                self.exchange = Exchange(self, event)
            elif kind is ConnectionClosed:
                self._close()
            # Data/EndOfMessage here belong to a body being discarded after an early response.

    def _next(self) -> None:
        """The last response is done: start the next pipelined request, if any."""
        pending = self.pending
        if self.read_paused and len(pending) <= MAX_PENDING_EVENTS // 2:
            self._resume_reading()
        if pending and self.exchange is None and self.body is None:
            events = list(pending)
            pending.clear()
            self._handle(events)

    def response_done(self) -> None:
        """Called on the loop when an exchange has sent its whole response."""
        exchange = self.exchange
        self.exchange = None
        self.requests += 1
        server = self.server
        if exchange is not None and exchange.spool is not None:
            exchange.spool.fail("")  # closes the temporary file
        if server.observed:
            server.request_finished(exchange)
        else:
            server.requests += 1
        conn = self.conn
        assert conn is not None
        if conn.our_state is not IDLE or self.closed or server.closing:
            self._close()
            return
        if self.body is not None:
            # The app answered without reading the whole body: drop the rest of it.
            self.discarding = True
            if self.read_paused:
                self._resume_reading()
        else:
            self.timer = KEEPALIVE
            timeout = server.keepalive_timeout
            self.deadline = INF if timeout is None else server.now + timeout
        if self.pending or self.read_paused:
            self._next()
        if exchange is not None and exchange.request.upgrade is not None:
            # We declined the upgrade: requests the client pipelined behind it were held
            # by the core and are parsed now, without new bytes arriving.
            events = conn.events_received()
            if events:
                self._handle(events)

    # ------------------------------------------------------------------ output

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.transport.write(data)

    def flush(self) -> None:
        conn = self.conn
        assert conn is not None
        out = conn.data_to_send()
        if out and not self.closed:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _reject(self, exc: RemoteProtocolError) -> None:
        """A malformed request or a limit: a short error response, then close."""
        logger.warning("%s: %s", _format_peer(self.peer), exc)
        self.server.rejected += 1
        if self.body is not None:
            self.body.fail(str(exc))
            self.body = None
        if self.exchange is None or not self.exchange.headers_sent:
            self.write(error_response(exc.status_hint, str(exc)))
        if self.conn is not None:
            self.conn.close()
        exchange = self.exchange
        if exchange is None or not exchange.started:
            # Nothing is running the app (an inline request still collecting its body).
            if exchange is not None and exchange.spool is not None:
                exchange.spool.fail(str(exc))
            self.exchange = None
            self._close_lingering()
        else:
            exchange.must_close = True  # the app thread finishes, then the connection closes

    def _close_lingering(self) -> None:
        """Close after an error reply: half-close, drain the client's input, then close."""
        transport = self.transport
        if self.closed or self.lingering:
            return
        if not transport.can_write_eof():
            self._close()
            return
        self.lingering = True
        transport.write_eof()
        self._resume_reading()
        self._arm(LINGER, LINGER_SECONDS)

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping unsent bytes. Also after :meth:`_close`: a graceful close
        waits for the write buffer to drain, which never happens while the client does
        not read; the write timeout and the shutdown deadline end it here."""
        self.closed = True
        self.transport.abort()  # (a no-op on a transport already gone)

    # ------------------------------------------------------------------ flow and timers

    def _pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()

    def resume_reading_threadsafe(self) -> None:
        self.server.loop.call_soon_threadsafe(self._resume_reading)

    def _arm(self, kind: int, timeout: float | None) -> None:
        self.timer = kind
        self.deadline = INF if timeout is None else self.server.now + timeout

    def on_deadline(self) -> None:
        """The server's tick found this connection past its deadline."""
        kind = self.timer
        self.timer = NO_TIMER
        self.deadline = INF
        if kind in (KEEPALIVE, LINGER):
            self._close()
        elif kind == HEADER:
            self.server.timed_out += 1
            logger.warning("%s: request head not complete in time", _format_peer(self.peer))
            self.write(error_response(408, "request head not received in time"))
            self._close_lingering()
        elif kind == BODY:
            self.server.timed_out += 1
            logger.warning("%s: request body stalled", _format_peer(self.peer))
            if self.body is not None:
                self.body.fail("timed out waiting for the request body")
            if self.exchange is None or not self.exchange.headers_sent:
                self.write(error_response(408, "request body not received in time"))
                if self.exchange is not None:
                    self.exchange.must_close = True
            self._close()
        elif kind == WRITE:
            self.server.timed_out += 1
            logger.warning("%s: client stopped reading the response", _format_peer(self.peer))
            self.abort()

    def shutdown(self) -> None:
        """Graceful close: idle keep-alive connections close now, busy ones after their
        response. A connection still waiting for its first request (accepted just before
        the listener closed) is answered first, within header_timeout: closing it would
        fail a request on a fresh connection, which no client may retry."""
        if self.exchange is None and self.body is None and self.timer == KEEPALIVE:
            self._close()


def _format_peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer or "unix")


class Exchange:
    """One request and its response: calls the app and turns what it returns into events."""

    # Class-level defaults: most exchanges never change these, and not assigning them
    # per request is measurably cheaper than __slots__ on this hot path.
    started = False
    headers_sent = False
    must_close = False
    lost = False
    continue_sent = False
    has_length = False
    # The app's Content-Length, when it gave a valid one.
    declared_length: int | None = None
    status_code = 0
    sent_bytes = 0
    start_time = 0.0
    inline_iterator: Iterator[bytes] | None = None
    result: Iterable[bytes] | None = None
    # Created when a worker thread streams a response (see send_threaded): bytes handed
    # to the loop and not yet written, under a condition the loop notifies.
    flow: threading.Condition | None = None
    in_flight = 0
    file_task: asyncio.Task[None] | None = None
    # Inline mode: the body collected before the app runs (closed after the response).
    spool: _BufferedBody | None = None
    # Encoded by start_response (a tuple it may share with other exchanges: replaced, never
    # mutated, when a header is added).
    response_headers: Sequence[tuple[bytes, bytes]] = ()

    def __init__(self, protocol: WSGIProtocol, request: Request) -> None:
        self.protocol = protocol
        self.server = server = protocol.server
        self.request = request
        if server.timed:
            self.start_time = time.perf_counter()
        self.environ = environ = server.environ_for(request, protocol)
        if not (request.chunked or request.content_length):
            protocol.body = _NO_BODY
            environ["wsgi.input"] = EMPTY_INPUT
            if server.threads:
                self.started = True
                server.submit(self.run_threaded)
            return  # inline: started on EndOfMessage, right after this in the same events
        if server.threads == 0:
            body = self.spool = _BufferedBody()
            environ["wsgi.input"] = body  # replaced by the file once complete
            protocol.body = body
            protocol._arm(BODY, server.http_timeouts.body_timeout)
            if request.expect_continue:
                self._send_continue()
            return  # started on EndOfMessage
        streaming = StreamingBody(
            resume=protocol.resume_reading_threadsafe,
            on_first_read=self._continue_threadsafe if request.expect_continue else None,
            timeout=server.http_timeouts.body_timeout,
        )
        protocol.body = streaming
        environ["wsgi.input"] = streaming
        protocol._arm(BODY, server.http_timeouts.body_timeout)
        self.started = True
        server.submit(self.run_threaded)

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        """Inline mode: the body is complete, run the app on the loop."""
        self.started = True
        spool = self.spool
        if spool is not None:
            self.environ["wsgi.input"] = spool.file
        if self.must_close:
            self.protocol.response_done()
            return
        try:
            result = self.server.app(self.environ, self.start_response)
        except Exception:
            self.app_error()
            return
        if type(result) is list and len(result) <= 1:
            self.complete(result[0] if result else b"")
            return
        if type(result) is FileWrapper:
            self.start_file(result)
            return
        self.result = result
        try:
            iterator = iter(result)
            first = next(iterator, None)
        except Exception:
            self.app_error()
            return
        if first is not None and len(first) == self.declared_length:
            # The whole declared body came in one chunk (Flask, Django...): one write. A
            # server must not send more than Content-Length (PEP 3333), so nothing more
            # is read from the iterable, which complete() closes.
            self.complete(first)
            return
        if first:
            self.send_data(first)
        self.inline_iterator = iterator
        self.pump()

    def pump(self) -> None:
        """Inline mode: send chunks until the iterator ends or writing pauses."""
        iterator = self.inline_iterator
        assert iterator is not None
        protocol = self.protocol
        try:
            for chunk in iterator:
                if chunk:
                    self.send_data(chunk)
                if protocol.write_paused and not protocol.closed:
                    return  # resume_writing() calls pump() again
                if protocol.closed:
                    break
        except Exception:
            self.inline_iterator = None
            self.app_error()
            return
        self.inline_iterator = None
        self.finish()

    # ------------------------------------------------------------------ WSGI

    def start_response(
        self,
        status: str,
        headers: list[tuple[str, str]],
        exc_info: ExcInfo | None = None,
    ) -> Callable[[bytes], None]:
        if exc_info is not None:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # PEP 3333: avoid a reference cycle
        elif self.status_code:
            raise AssertionError("start_response() called twice without exc_info")
        try:
            cached = _RESPONSES.get((status, *headers))
        except TypeError:  # an unhashable header (a list pair): checked below, not cached
            cached = None
        if cached is None:
            cached = _encode_response(status, headers)
        self.status_code, self.response_headers, self.has_length, self.declared_length = cached
        return self.write_callable

    def write_callable(self, data: bytes) -> None:
        """The legacy ``write()`` returned by start_response (PEP 3333)."""
        if not self.status_code:
            raise AssertionError("write() before start_response()")
        if self.server.threads == 0:
            self.send_data(data)
        else:
            self.send_threaded(data)

    # ------------------------------------------------------------------ sending (loop)

    def complete(self, body: bytes) -> None:
        """Head, body and end in one write (the body is known in full)."""
        protocol = self.protocol
        conn = protocol.conn
        assert conn is not None
        if not self.status_code:
            self.app_error(AssertionError("the app returned without calling start_response()"))
            return
        if self.must_close or protocol.closed or conn.our_state is CLOSED:
            conn.close()
            protocol.response_done()
            return
        headers = self.response_headers
        if not self.has_length:
            headers = self.response_headers = [*headers, (b"content-length", b"%d" % len(body))]
        if self.server.closing:
            # shutting down: no more requests here
            headers = self.response_headers = [*headers, CONNECTION_CLOSE]
        try:
            data = conn.respond(self.status_code, headers, body, self.server.default_block)
        except LocalProtocolError as exc:
            self.app_error(exc)
            return
        self.headers_sent = True
        self.sent_bytes = len(body)
        if not protocol.closed:
            protocol.transport.write(data)
        if self.result is not None:
            self.finish_close_result()
        protocol.response_done()

    def send_head(self) -> None:
        conn = self.protocol.conn
        assert conn is not None
        if not self.status_code:
            raise AssertionError("the app sent body data before start_response()")
        if self.server.closing:
            self.response_headers = [*self.response_headers, CONNECTION_CLOSE]
        conn.send_head(self.status_code, self.response_headers, self.server.default_block)
        self.headers_sent = True

    def send_data(self, data: bytes) -> None:
        protocol = self.protocol
        if protocol.closed or self.must_close or protocol.conn.our_state is CLOSED:  # type: ignore[union-attr]  # set in connection_made
            return
        if not self.headers_sent:
            self.send_head()
        conn = protocol.conn
        assert conn is not None
        conn.send(Data(data))
        self.sent_bytes += len(data)
        protocol.flush()

    def finish(self) -> None:
        """End the response (after a streamed body) and move to the next request."""
        protocol = self.protocol
        conn = protocol.conn
        assert conn is not None
        if not protocol.closed and not self.must_close and conn.our_state is not CLOSED:
            try:
                if not self.headers_sent:
                    if not self.status_code:
                        raise AssertionError("the app returned without calling start_response()")
                    self.send_head()
                conn.send(END_OF_MESSAGE)
            except (LocalProtocolError, AssertionError) as exc:
                self.app_error(exc)
                return
            protocol.flush()
        self.finish_close_result()
        protocol.response_done()

    def finish_close_result(self) -> None:
        result = self.result
        self.result = None
        close = getattr(result, "close", None)
        if close is not None:
            _close_result(close)

    def app_error(self, exc: BaseException | None = None) -> None:
        """The app raised (or broke WSGI): 500 if nothing was sent, else cut the connection."""
        protocol = self.protocol
        error = exc if exc is not None else sys.exc_info()[1]
        status = 500
        if isinstance(error, BodyError):
            # The app failed reading a body the client broke (limit, stall, hang-up): the
            # client was answered (413) or is gone, or stalled (408). Not an app bug.
            logger.warning("request body failed while the app read it: %s", error)
            status = 408
        else:
            logger.error(
                "error in the app handling %s %s",
                self.request.method.decode("latin-1"),
                self.request.target.decode("latin-1"),
                exc_info=exc if exc is not None else True,
            )
            self.server.app_errors += 1
        self.finish_close_result()
        self.inline_iterator = None
        if not self.headers_sent and not protocol.closed and not self.must_close:
            self.status_code = status
            message = "internal server error" if status == 500 else "request body not received"
            protocol.write(error_response(status, message))
            self.sent_bytes = 0
        if protocol.conn is not None:
            protocol.conn.close()
        protocol.response_done()
        protocol._close()

    # ------------------------------------------------------------------ files

    def start_file(self, wrapper: FileWrapper) -> None:
        """On the loop: send a ``wsgi.file_wrapper`` response.

        A regular file goes out with ``os.sendfile`` where the loop can do it (asyncio's
        loop, plain TCP); uvloop has no sendfile, so there, and under TLS, the file is
        read with ``os.pread`` in blocks under flow control. Objects without a file
        descriptor are iterated like any other response.
        """
        self.result = wrapper
        file = wrapper.filelike
        try:
            fd = file.fileno()
            offset = file.tell()
            size = os.fstat(fd).st_size - offset
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            self.inline_iterator = iter(wrapper)
            self.pump()
            return
        count = max(size, 0)
        declared = [v for n, v in self.response_headers if n == b"content-length"]
        if declared and declared[0].isdigit():
            count = min(count, int(declared[0]))
        elif not declared:
            self.response_headers = [*self.response_headers, (b"content-length", b"%d" % count)]
        try:
            self.send_head()
        except (LocalProtocolError, AssertionError) as exc:
            self.app_error(exc)
            return
        self.protocol.flush()
        self.file_task = self.server.loop.create_task(self._send_file(file, fd, offset, count))

    async def _send_file(self, file: Any, fd: int, offset: int, count: int) -> None:
        protocol = self.protocol
        conn = protocol.conn
        assert conn is not None
        loop = self.server.loop
        try:
            if not conn.sending_body:
                pass  # HEAD: the head was all
            elif hasattr(loop, "_sendfile_native") and self.server.ssl is None:
                conn.send_body_elsewhere(count)
                await loop.sendfile(protocol.transport, file, offset, count)
                self.sent_bytes = count
            else:
                position, end = offset, offset + count
                while position < end and not protocol.closed:
                    data = os.pread(fd, min(FILE_BLOCK, end - position), position)
                    if not data:
                        break  # the file shrank: finish() reports the short body
                    position += len(data)
                    self.send_data(data)
                    if protocol.write_paused:
                        await protocol.writable()
        except (OSError, RuntimeError, LocalProtocolError) as exc:
            if not protocol.closed:
                self.app_error(exc)
            else:
                self.finish_close_result()
                protocol.response_done()
            return
        self.finish()

    def _send_continue(self) -> None:
        if not self.continue_sent and not self.headers_sent:
            self.continue_sent = True
            conn = self.protocol.conn
            assert conn is not None
            if conn.our_state is IDLE:
                conn.send(InformationalResponse(100))
                self.protocol.flush()

    # ------------------------------------------------------------------ threaded mode

    def _continue_threadsafe(self) -> None:
        self.server.loop.call_soon_threadsafe(self._send_continue)

    def run_threaded(self) -> None:
        """In a worker thread: run the app and hand what it sends to the loop."""
        result: Any = None
        try:
            result = self.server.app(self.environ, self.start_response)
            if type(result) is list and len(result) <= 1:
                self.server.to_loop(self.complete, result[0] if result else b"")
                return
            if type(result) is FileWrapper:
                self.server.to_loop(self.start_file, result)
                return
            iterator = iter(result)
            first = next(iterator, None)
            if first is not None and len(first) == self.declared_length:
                # The whole declared body in one chunk (Flask, Django...): one write.
                self._close_in_thread(result)
                self.server.to_loop(self.complete, first)
                return
            if first:
                self.send_threaded(first)
            for chunk in iterator:
                if chunk:
                    self.send_threaded(chunk)
                if self.lost or self.must_close:
                    break
        except Exception as exc:
            self._close_in_thread(result)
            # (through to_loop, like the chunks, so that it runs after them)
            if self.lost:  # the client went away: not the app's fault, not an ERROR
                self.server.to_loop(self._finish_from_thread, None)
            else:
                self.server.to_loop(self.app_error, exc)
            return
        self._close_in_thread(result)
        self.server.to_loop(self._finish_from_thread, None)

    def _finish_from_thread(self, _: object) -> None:
        self.finish()

    def _close_in_thread(self, result: Any) -> None:
        """Close the app's iterable in the app thread: close() may block (a framework's
        teardown, a database session), which must never happen on the event loop."""
        close = getattr(result, "close", None)
        if close is not None:
            _close_result(close)

    def send_threaded(self, data: bytes) -> None:
        """From the app thread: hand one chunk to the loop, in order.

        Up to THREAD_IN_FLIGHT bytes may wait for the loop, and none while the transport
        is paused, so a fast generator cannot queue an unbounded response in memory, and a
        slow client stalls only its own thread (BodyError after write_timeout).
        """
        flow = self.flow
        if flow is None:
            flow = self.flow = threading.Condition(threading.Lock())
        timeout = self.server.http_timeouts.write_timeout
        with flow:
            while not self.lost and (
                self.in_flight > THREAD_IN_FLIGHT or self.protocol.write_paused
            ):
                if not flow.wait(timeout):
                    raise BodyError("the client stopped reading the response")
            if self.lost:
                raise BodyError("the client closed the connection")
            self.in_flight += len(data)
        self.server.to_loop(self._send_from_thread, data)

    def _send_from_thread(self, data: bytes) -> None:
        self.send_data(data)
        flow = self.flow
        assert flow is not None
        with flow:
            self.in_flight -= len(data)
            flow.notify_all()

    def wake_writer(self) -> None:
        """On the loop: writing resumed or the connection is gone; wake a waiting thread."""
        flow = self.flow
        if flow is not None:
            with flow:
                flow.notify_all()


_NO_BODY: Final = _NoBody()
