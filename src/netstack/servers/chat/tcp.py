"""Chat over TCP: newline-delimited JSON through the shared line framing.

Each line is one client message (``proto/framing.py`` ``LineCodec``, limited to
``max_message_bytes``); each server event is one line. A line over the limit gets a
``too_large`` error line and the connection closes (the framing cannot resynchronise
inside an over-long line).
"""

from __future__ import annotations

import asyncio

from netstack.config import ChatLimits, Limits, Timeouts
from netstack.errors import LimitExceeded, RemoteProtocolError
from netstack.proto.chat import Code, encode, error_event
from netstack.proto.framing import Frame, LineCodec
from netstack.servers.chat.service import ChatService, Session, utf8_line
from netstack.transport.stream import StreamProtocol


class ChatTCPProtocol(StreamProtocol[Frame]):
    """One TCP chat client: lines in, lines out, one :class:`Session`."""

    session: Session | None

    def __init__(self, service: ChatService, limits: ChatLimits, timeouts: Timeouts) -> None:
        super().__init__(
            limits=Limits(
                max_line_bytes=limits.max_message_bytes, max_connections=limits.max_clients
            ),
            timeouts=timeouts,
        )
        self.service = service
        self.session = None

    def make_core(self) -> LineCodec:
        return LineCodec(self.limits.max_line_bytes)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.transport.is_closing():  # not refused by max_connections
            self.session = self.service.open_session(self)

    def handle_event(self, event: Frame) -> None:
        if self.session is not None:
            self.session.receive(event)

    def reject(self, exc: RemoteProtocolError) -> None:
        if isinstance(exc, LimitExceeded):
            self.write(
                encode(
                    error_event(
                        Code.TOO_LARGE, f"message exceeds {exc.value} bytes; closing connection"
                    )
                )
            )
        super().reject(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.session is not None:
            self.session.connection_lost()

    # ------------------------------------------------------------------ Outlet

    def write(self, text: str) -> None:
        if not self.transport.is_closing():
            self.transport.write(utf8_line(text))

    def close(self, code: int = 1000, reason: str = "") -> None:
        # Outlet.close: TCP has no close code; the error event before it says why.
        super().close()

    def buffered(self) -> int:
        return self.transport.get_write_buffer_size()
