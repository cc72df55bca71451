"""StreamProtocol: one asyncio Protocol base for every sans-I/O stream core.

``data_received`` feeds the core, turns a ``RemoteProtocolError`` into a close in one place
(:meth:`StreamProtocol.reject`), hands each event to :meth:`StreamProtocol.handle_event`
and writes what the core queued. Products subclass it and implement ``make_core`` and
``handle_event`` (websockets' ``Protocol`` split; shared/STYLE.md §2).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any, Final, Generic, Protocol, TypeVar, cast

from netstack.config import Limits, Timeouts
from netstack.errors import LimitExceeded, RemoteProtocolError
from netstack.transport.flow import FlowControl

logger = logging.getLogger(__name__)

E = TypeVar("E")

_conn_ids = itertools.count(1)
# The idle timer ticks this many times per idle_timeout. A read only sets a flag (reading a
# clock per read cost more); a connection closes after IDLE_TICKS silent ticks in a row,
# that is after between idle_timeout and idle_timeout * (1 + 1/IDLE_TICKS) of silence.
IDLE_TICKS: Final = 4


class Core(Protocol[E]):
    """The shape of every sans-I/O stream core (``proto/``)."""

    def receive_data(self, data: bytes) -> None: ...

    def receive_eof(self) -> None: ...

    def events_received(self) -> list[E]: ...

    def data_to_send(self) -> list[bytes]: ...


class ConnectionRegistry(Protocol):
    """What a listener offers its connections (``transport.listener.Server``)."""

    def register(self, conn: StreamProtocol[Any]) -> bool:
        """Admit ``conn``; ``False`` means refuse it (e.g. max_connections reached)."""

    def unregister(self, conn: StreamProtocol[Any]) -> None: ...


class StreamProtocol(asyncio.Protocol, Generic[E]):
    """Drive a sans-I/O core from an asyncio stream transport.

    Args:
        limits: write-buffer water marks for flow control.
        timeouts: ``idle_timeout`` closes a connection the peer has left silent.
        registry: the listener that admits and tracks this connection, if any.

    Subclasses implement :meth:`make_core` and :meth:`handle_event`, and may override
    :meth:`busy` (work in flight that a graceful shutdown should wait for).
    """

    transport: asyncio.Transport
    core: Core[E]
    flow: FlowControl

    def __init__(
        self,
        *,
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
        registry: ConnectionRegistry | None = None,
    ) -> None:
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.registry = registry
        self.conn_id = 0
        self.peer: Any = None
        self.closed: asyncio.Future[None] | None = None
        self.in_flight = 0
        self._draining = False
        self._closing = False
        self._idle_handle: asyncio.TimerHandle | None = None
        self._rx = False  # data arrived since the last idle tick
        self._silent_ticks = 0
        self._idle_tick = 0.0  # seconds between idle checks, set with the timer
        self._log_extra: dict[str, object] = {}

    # ------------------------------------------------------------------ product hooks

    def make_core(self) -> Core[E]:  # pragma: no cover - abstract
        """Return a fresh core for a new connection."""
        raise NotImplementedError

    def handle_event(self, event: E) -> None:  # pragma: no cover - abstract
        """Handle one event from the core (product logic)."""
        raise NotImplementedError

    def busy(self) -> bool:
        """Whether work is in flight; a graceful shutdown waits until this is false."""
        return self.in_flight > 0

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.conn_id = next(_conn_ids)
        self.peer = transport.get_extra_info("peername")
        self._log_extra = {"conn_id": self.conn_id}
        self.core = self.make_core()
        self.flow = FlowControl(
            self.transport,
            high=self.limits.write_buffer_high_bytes,
            low=self.limits.write_buffer_low_bytes,
        )
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        if self.registry is not None and not self.registry.register(self):
            self.close()
            return
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("= conn %d open from %s", self.conn_id, self.peer, extra=self._log_extra)
        if self.timeouts.idle_timeout is not None:
            self._idle_tick = self.timeouts.idle_timeout / IDLE_TICKS
            self._idle_handle = self._loop.call_later(self._idle_tick, self._check_idle)

    def data_received(self, data: bytes) -> None:
        # The hot path: one write per read, and as few calls as the core allows.
        self._rx = True
        core = self.core
        try:
            core.receive_data(data)
        except RemoteProtocolError as exc:
            self._dispatch()  # frames completed before the error are still served
            self.reject(exc)
            return
        try:
            for event in core.events_received():
                self.handle_event(event)
            chunks = core.data_to_send()
            if chunks:
                if len(chunks) == 1 and not self._closing and chunks[0]:
                    self.transport.write(chunks[0])
                else:
                    self._write(chunks)
        except Exception:
            self.internal_error()
            return
        if self._draining and not self.busy():
            self.close()

    def eof_received(self) -> bool | None:
        try:
            self.core.receive_eof()
        except RemoteProtocolError as exc:
            self._dispatch()
            self.reject(exc)
            return None
        self._dispatch()
        return None  # close our side too, after flushing

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        self.flow.connection_lost()
        if self.registry is not None:
            self.registry.unregister(self)
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "x conn %d closed (%s)", self.conn_id, exc or "clean", extra=self._log_extra
            )

    # ------------------------------------------------------------------ helpers

    def _dispatch(self) -> None:
        core = self.core
        try:
            for event in core.events_received():
                self.handle_event(event)
            self.flush()
        except Exception:
            self.internal_error()
            return
        if self._draining and not self.busy():
            self.close()

    def flush(self) -> None:
        """Write what the core queued; an empty chunk means half-close (``write_eof``)."""
        chunks = self.core.data_to_send()
        if chunks:
            self._write(chunks)

    def _write(self, chunks: list[bytes]) -> None:
        if self._closing or self.transport.is_closing():
            return
        if b"" in chunks:
            end = chunks.index(b"")
            if end:
                self.transport.write(b"".join(chunks[:end]))
            self.transport.write_eof()
        else:
            self.transport.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])

    def reject(self, exc: RemoteProtocolError) -> None:
        """The peer broke the protocol: log at WARNING (no traceback) and close.

        The one place a peer's protocol error becomes a close. Subclasses that owe the peer
        a reply (an error status) queue it on the core, then call ``super().reject(exc)``.
        """
        if isinstance(exc, LimitExceeded):
            logger.warning(
                "! conn %d from %s: limit %s exceeded (limit %d, got %s); closing",
                self.conn_id,
                self.peer,
                exc.limit,
                exc.value,
                exc.actual,
                extra=self._log_extra,
            )
        else:
            logger.warning(
                "! conn %d from %s: protocol error: %s; closing",
                self.conn_id,
                self.peer,
                exc,
                extra=self._log_extra,
            )
        self.flush()
        self.close()

    def internal_error(self) -> None:
        """A bug in us or the app: log once at ERROR with the traceback, then abort."""
        logger.exception(
            "! conn %d from %s: internal error; closing",
            self.conn_id,
            self.peer,
            extra=self._log_extra,
        )
        self.abort()

    def begin_work(self) -> None:
        """An event was taken on for asynchronous processing."""
        self.in_flight += 1
        self.flow.set_backlog(self.in_flight)

    def end_work(self) -> None:
        """Asynchronous processing of one event finished."""
        self.in_flight -= 1
        self.flow.set_backlog(self.in_flight)
        self.flush()
        if self._draining and not self.busy():
            self.close()

    def shutdown(self) -> None:
        """Graceful close: close now if idle, else once in-flight work is done."""
        self._draining = True
        if not self.busy():
            self.close()

    def close(self) -> None:
        """Close after flushing what is already written."""
        self._closing = True
        if not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Close now, dropping unsent data."""
        self._closing = True
        self.transport.abort()

    async def wait_closed(self) -> None:
        """Wait until the connection is lost."""
        if self.closed is not None:
            await asyncio.shield(self.closed)

    def _check_idle(self) -> None:
        # One tick (IDLE_TICKS per idle_timeout): never early, at most one tick late.
        self._idle_handle = None
        if self._rx:
            self._rx = False
            self._silent_ticks = 0
        else:
            self._silent_ticks += 1
        if self._silent_ticks < IDLE_TICKS:
            self._idle_handle = self._loop.call_later(self._idle_tick, self._check_idle)
            return
        timeout = self.timeouts.idle_timeout
        busy = self.busy()
        logger.log(
            logging.WARNING if busy else logging.DEBUG,
            "! conn %d from %s: idle for %.1fs%s; closing",
            self.conn_id,
            self.peer,
            timeout,
            " inside a frame" if busy else "",
            extra=self._log_extra,
        )
        # A silent peer may also not be reading: close() could wait on unsent data forever.
        if self.transport.get_write_buffer_size():
            self.abort()
        else:
            self.close()


__all__ = ["ConnectionRegistry", "Core", "StreamProtocol"]
