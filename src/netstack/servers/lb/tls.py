"""TLS termination on a frontend: the handshake, then the frontend's own protocol.

A TLS frontend accepts with :class:`TLSAcceptor` rather than passing ``ssl=`` to
``create_server``: each connection takes the listener's *current* context when it is
accepted (a reload that renews the certificate applies to new connections while the
established ones go on with theirs), and a failed or slow handshake is counted and
logged here at DEBUG (a scanner or a plaintext client is not worth a WARNING each).

Bytes read before ``loop.start_tls`` owns the connection (uvloop starts reading right
after ``connection_made``, before the handshake task runs) are the start of the
ClientHello: they are handed to the TLS protocol before its handshake starts. Once the
handshake is done the frontend's protocol (the L4 relay or the L7 proxy) gets
``connection_made`` with the TLS transport. Backends stay plaintext.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    from netstack.servers.lb.server import Listener

logger = logging.getLogger(__name__)


class TLSAcceptor(asyncio.Protocol):
    """One connection of a TLS frontend: the handshake, then a pass-through.

    ``start_tls`` makes this object the TLS transport's protocol (and never calls its
    ``connection_made``); it keeps whatever arrives before the frontend's protocol is
    attached (data sent with the client's Finished message, an early close), then
    forwards every call. ``eof_received`` returns false: a TLS close_notify ends the
    connection (no half-close over TLS), and saying otherwise only earns a warning.
    """

    def __init__(self, listener: Listener, context: ssl.SSLContext) -> None:
        self.listener = listener
        self.context = context
        self.app: asyncio.Protocol | None = None
        self.started = False  # start_tls owns the connection
        self.hello: list[bytes] = []  # raw bytes read before that
        self.early: list[bytes] = []  # decrypted bytes before the app protocol is attached
        self.eof = False
        self.lost: list[Exception | None] = []
        self.raw: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = self.raw = cast(asyncio.Transport, transport)
        raw.pause_reading()  # start_tls resumes it: it reads the ClientHello itself
        balancer = self.listener.balancer
        if balancer._closing:
            raw.abort()
            return
        if (
            len(balancer.handshakes) + len(balancer.connections)
            >= balancer.cfg.limits.max_connections
        ):
            # Handshakes in progress count toward max_connections: a flood of silent
            # clients cannot hold more descriptors than that.
            balancer.stats.refused += 1
            balancer._warn(
                "max_connections",
                "refusing TLS connection from %s: max_connections=%d reached",
                raw.get_extra_info("peername"),
                balancer.cfg.limits.max_connections,
            )
            raw.abort()
            return
        task = asyncio.get_running_loop().create_task(self._handshake(raw))
        balancer.handshakes.add(task)
        task.add_done_callback(balancer.handshakes.discard)

    def data_received(self, data: bytes) -> None:
        app = self.app
        if app is not None:
            app.data_received(data)
        elif not self.started:
            self.hello.append(data)
            assert self.raw is not None
            self.raw.pause_reading()  # start_tls resumes it
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        app = self.app
        if app is None:
            self.eof = True
        else:
            app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        app = self.app
        if app is None:
            self.lost.append(exc)
        else:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.pause_writing()

    def resume_writing(self) -> None:
        if self.app is not None:
            self.app.resume_writing()

    async def _handshake(self, raw: asyncio.Transport) -> None:
        listener = self.listener
        balancer = listener.balancer
        loop = asyncio.get_running_loop()
        peer = raw.get_extra_info("peername")
        try:
            if raw.is_closing() or self.lost:
                raise ConnectionResetError("closed before the handshake")
            self.started = True
            if self.hello:  # runs after start_tls set its protocol, before its handshake
                loop.call_soon(_feed, raw, b"".join(self.hello))
                self.hello = []
            tls = await loop.start_tls(
                raw,
                self,
                self.context,
                server_side=True,
                ssl_handshake_timeout=listener.state.cfg.tls.tls_handshake_timeout,
            )
        except (OSError, EOFError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            balancer.stats.tls_handshake_failures += 1
            logger.debug("! TLS handshake with %s failed: %s", peer, exc)
            raw.abort()
            return
        except asyncio.CancelledError:
            raw.abort()
            raise
        if tls is None:  # pragma: no cover - start_tls returns None only when closed
            raw.abort()
            return
        balancer.stats.tls_handshakes += 1
        try:
            self._attach(listener.make_protocol(), tls)
        except Exception:  # a bug of ours: this connection only
            logger.exception("! TLS connection from %s: internal error; closing", peer)
            tls.abort()

    def _attach(self, app: asyncio.Protocol, tls: asyncio.BaseTransport) -> None:
        """Hand the connection to the frontend's protocol, with what arrived meanwhile."""
        app.connection_made(tls)
        self.app = app
        early, self.early = self.early, []
        for data in early:
            if tls.is_closing():
                break
            app.data_received(data)
        if self.eof:
            app.eof_received()
        for lost in self.lost:
            app.connection_lost(lost)


def _feed(raw: asyncio.Transport, data: bytes) -> None:
    """Give ``data`` to the TLS protocol now reading ``raw`` (BufferedProtocol calls)."""
    protocol: Any = raw.get_protocol()  # uvloop's is not an asyncio.BufferedProtocol
    if raw.is_closing() or not hasattr(protocol, "buffer_updated"):
        return  # pragma: no cover - closed meanwhile; both loops' SSL protocols are buffered
    view = memoryview(data)
    while view:
        buf = protocol.get_buffer(len(view))
        n = min(len(buf), len(view))
        buf[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


__all__ = ["TLSAcceptor"]
