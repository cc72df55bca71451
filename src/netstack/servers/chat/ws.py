"""Chat over WebSocket (``websockets``' asyncio server), plus the HTTP side of the same port.

``/ws`` is the WebSocket endpoint: JSON text messages, Origin checked (same origin or
``allowed_origins``; clients that send no Origin, i.e. not browsers, are accepted),
keepalive pings, messages over ``max_message_bytes`` closed with 1009 by websockets.
Other paths are plain HTTP answered in ``process_request``: ``/`` the browser page,
``/files/<sha256>`` a shared file (session token in ``Authorization: Bearer`` or
``?token=``), ``/healthz``.

Imported lazily (``websockets`` is the ``chat`` extra).
"""

from __future__ import annotations

import asyncio
import http
import importlib.resources
import logging
import re
import ssl
import struct
import urllib.parse

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import OPEN

from netstack.config import ChatServerConfig
from netstack.proto.chat import HASH_RE
from netstack.servers.chat.service import INLINE_MIMES, ChatService, utf8

logger = logging.getLogger(__name__)

WS_PATH = "/ws"
_HOST_RE = re.compile(r"[A-Za-z0-9.\-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")

# The browser client: three static files, no build step.
STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/index.html": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/app.css": ("app.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}


def page_csp(host: str) -> str:
    """The page loads only its own files and talks only to this server."""
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob:; "
        f"connect-src 'self' ws://{host} wss://{host}; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def load_static() -> dict[str, bytes]:
    """The browser client's files, read once (``static/``)."""
    root = importlib.resources.files("netstack.servers.chat").joinpath("static")
    return {name: root.joinpath(name).read_bytes() for name, _ in STATIC.values()}


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame (RFC 6455 §5.2), as a server sends it."""
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = struct.pack("!BBH", 0x81, 126, size)
    else:
        header = struct.pack("!BBQ", 0x81, 127, size)
    return header + payload


class _LastFrame:
    """The frame of the text being fanned out, built once for all its recipients (a
    publish hands the same ``str`` object to every subscriber in turn)."""

    text: str = ""
    frame: bytes = b""


def framed(text: str) -> bytes:
    """``text`` as a server text frame, cached for the text being fanned out."""
    if text is not _LastFrame.text:
        _LastFrame.text, _LastFrame.frame = text, text_frame(utf8(text))
    return _LastFrame.frame


class WSOutlet:
    """A websockets connection as a session :class:`~.service.Outlet`."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self._closing: asyncio.Task[None] | None = None

    def write(self, text: str) -> None:
        # A fan-out to N clients was N times websockets' broadcast([ws]): a Frame object,
        # its serialisation and the protocol's output queue per recipient. Server frames
        # are unmasked, so every recipient gets the same bytes: build them once and write
        # them to each transport. Safe because we never compress (compression=None) nor
        # fragment, and websockets writes each of its own frames (pings, close) whole and
        # synchronously, so frames never interleave. Like broadcast(), skip connections
        # that are closing.
        ws = self.ws
        if ws.protocol.state is OPEN:
            ws.transport.write(framed(text))

    def close(self, code: int, reason: str) -> None:
        if self._closing is None:
            self._closing = asyncio.get_running_loop().create_task(self.ws.close(code, reason))

    def buffered(self) -> int:
        return self.ws.transport.get_write_buffer_size()


def _response(status: http.HTTPStatus, body: bytes, content_type: str, **extra: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            ("X-Content-Type-Options", "nosniff"),
            ("Referrer-Policy", "no-referrer"),
        ]
    )
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    return Response(status.value, status.phrase, headers, body)


class _BadRequest(Exception):
    pass


def _header(headers: Headers, name: str) -> str | None:
    """A header that must appear at most once (a repeated Host or Origin is refused)."""
    try:
        return headers.get(name)
    except MultipleValuesError:
        raise _BadRequest(f"repeated {name} header") from None


def _text(status: http.HTTPStatus, text: str) -> Response:
    return _response(status, text.encode(), "text/plain; charset=utf-8")


class WSTransport:
    """The WebSocket/HTTP listener of a chat server."""

    def __init__(
        self, service: ChatService, cfg: ChatServerConfig, ssl_context: ssl.SSLContext | None
    ) -> None:
        self.service = service
        self.cfg = cfg
        self.ssl = ssl_context
        self.static = load_static()
        self.server: Server | None = None
        self.clients = 0

    async def start(self, host: str, port: int) -> None:
        limits, timeouts = self.cfg.chat_limits, self.cfg.chat_timeouts
        self.server = await serve(
            self._handler,
            host,
            port,
            process_request=self._process_request,
            max_size=limits.max_message_bytes,
            ping_interval=timeouts.ping_interval,
            ping_timeout=timeouts.ping_timeout,
            # permessage-deflate costs ~64 KiB of zlib state per connection; chat lines
            # are short. Off, like the memory-per-connection target asks.
            compression=None,
            ssl=self.ssl,
            reuse_address=True,
            backlog=limits.backlog,
            server_header="netstack-chat",
        )

    @property
    def addresses(self) -> list[tuple[str, int]]:
        assert self.server is not None
        return [tuple(s.getsockname()[:2]) for s in self.server.sockets]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    # ------------------------------------------------------------------ WebSocket

    async def _handler(self, ws: ServerConnection) -> None:
        session = self.service.open_session(WSOutlet(ws))
        self.clients += 1
        try:
            async for message in ws:
                session.receive(message)
        except ConnectionClosed:
            pass
        finally:
            self.clients -= 1
            session.connection_lost()

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        if origin in self.cfg.allowed_origins:
            return True
        scheme = "https" if self.ssl is not None else "http"
        return host is not None and origin == f"{scheme}://{host}"

    # ------------------------------------------------------------------ HTTP

    async def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        try:
            return await self._route(request)
        except _BadRequest as exc:
            return _text(http.HTTPStatus.BAD_REQUEST, f"{exc}\n")
        except Exception:
            logger.exception("chat HTTP request %s failed", request.path)
            return _text(http.HTTPStatus.INTERNAL_SERVER_ERROR, "internal error\n")

    async def _route(self, request: Request) -> Response | None:
        path, _, query = request.path.partition("?")
        headers = request.headers
        if (_header(headers, "Upgrade") or "").lower() == "websocket":
            if path != WS_PATH:
                return _text(http.HTTPStatus.NOT_FOUND, f"WebSocket endpoint is {WS_PATH}\n")
            if self.clients >= self.cfg.chat_limits.max_clients:
                logger.warning(
                    "chat: refusing WebSocket: max_clients=%d reached",
                    self.cfg.chat_limits.max_clients,
                )
                return _text(http.HTTPStatus.SERVICE_UNAVAILABLE, "too many clients\n")
            origin = _header(headers, "Origin")
            if origin is not None and not self.origin_allowed(origin, _header(headers, "Host")):
                logger.warning("chat: refused WebSocket from Origin %s", origin)
                return _text(http.HTTPStatus.FORBIDDEN, "Origin not allowed\n")
            return None
        if request.method != "GET":
            return _text(http.HTTPStatus.METHOD_NOT_ALLOWED, "only GET\n")
        if path in STATIC:
            name, content_type = STATIC[path]
            host = _header(headers, "Host") or ""
            return _response(
                http.HTTPStatus.OK,
                self.static[name],
                content_type,
                Content_Security_Policy=page_csp(host if _HOST_RE.fullmatch(host) else "localhost"),
                Cache_Control="no-cache",
            )
        if path == "/healthz":
            return _text(http.HTTPStatus.OK, "ok\n")
        if path.startswith("/files/"):
            return await self._file(path.removeprefix("/files/"), query, headers)
        return _text(http.HTTPStatus.NOT_FOUND, "not found\n")

    async def _file(self, file_hash: str, query: str, headers: Headers) -> Response:
        token = urllib.parse.parse_qs(query).get("token", [""])[0]
        auth = _header(headers, "Authorization") or ""
        if auth.lower().startswith("bearer "):
            token = auth[7:].strip()
        if not token:
            return _text(http.HTTPStatus.UNAUTHORIZED, "a session token is required\n")
        if not HASH_RE.fullmatch(file_hash):
            return _text(http.HTTPStatus.NOT_FOUND, "no such file\n")
        try:
            found = await self.service.download(token, file_hash)
        except PermissionError:
            return _text(http.HTTPStatus.UNAUTHORIZED, "bad or expired session token\n")
        if found is None:
            return _text(http.HTTPStatus.NOT_FOUND, "no such file\n")
        info, data = found
        inline = info.mime in INLINE_MIMES
        quoted = urllib.parse.quote(info.name, safe="")
        disposition = "inline" if inline else "attachment"
        return _response(
            http.HTTPStatus.OK,
            data,
            info.mime if inline else "application/octet-stream",
            Content_Disposition=f"{disposition}; filename*=UTF-8''{quoted}",
            Content_Security_Policy="default-src 'none'; sandbox",
            Cache_Control="private, max-age=31536000, immutable",
        )
