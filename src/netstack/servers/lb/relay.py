"""The L4 TCP relay: one client connection spliced to one backend connection.

Two ``asyncio.Protocol`` objects write straight into each other's transport; the hot path
is one ``transport.write(data)`` per read and one flag set for the idle sweep. Backpressure
runs both ways: a side whose write buffer passes ``relay_buffer_bytes`` pauses reading on the
other side until it drains. EOF is relayed as a half-close (``write_eof``) and the pair
closes once both directions have ended.

Failover: until the first backend byte reaches the client, the client's bytes are kept (at
most ``REPLAY_MAX_BYTES``). A backend that refuses, times out, or closes or resets before
answering is reported to the pool (passive health) and the next backend gets the same bytes.
A backend closing cleanly after the client half-closed is a normal end of a one-way
exchange, not a failure. Once the backend answered, a failure simply closes the client.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, Literal, cast

from netstack.errors import LocalProtocolError, NoBackendAvailable, RemoteProtocolError
from netstack.proto.balance import Backend, Pool

if TYPE_CHECKING:
    from netstack.servers.lb.server import Balancer, FrontendState

logger = logging.getLogger(__name__)

# Enough for any protocol's first request (HTTP headers, a TLS ClientHello, a Redis or SQL
# command); beyond it the client is streaming and a replay would be wrong anyway.
REPLAY_MAX_BYTES: Final = 64 * 1024


async def connect_backend(
    factory: Callable[[], asyncio.Protocol], backend: Backend, connect_timeout: float
) -> str | None:
    """Connect to ``backend`` within ``connect_timeout`` seconds.

    Returns:
        ``None`` once connected (the protocol's connection_made has run), else why not, as
        the balancer reports it: ``"connect timeout"`` or ``"connect error (...)"``.
    """
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(connect_timeout):
            await loop.create_connection(factory, backend.host, backend.port)
    except TimeoutError:
        return "connect timeout"
    except OSError as exc:
        return f"connect error ({exc.strerror or exc})"
    return None


class ClientConnection(asyncio.Protocol):
    """The client side of a relay; owns the backend side and the failover loop."""

    __slots__ = (
        "_connect_task",
        "_peer",
        "backend",
        "backend_eof",
        "backend_side",
        "backend_transport",
        "balancer",
        "client_eof",
        "closed",
        "early",
        "kept",
        "kept_bytes",
        "pool",
        "proxied",
        "proxy_buffer",
        "replayable",
        "rx",
        "silent",
        "state",
        "transport",
        "tried",
    )

    transport: asyncio.Transport

    def __init__(self, state: FrontendState) -> None:
        self.state = state
        self.balancer: Balancer = state.balancer
        self.pool: Pool = state.pool
        self.backend: Backend | None = None
        self.backend_side: BackendConnection | None = None
        self.backend_transport: asyncio.Transport | None = None
        self.early = True  # no backend byte has reached the client yet
        self.kept: list[bytes] = []  # client bytes kept for a replay while early
        self.kept_bytes = 0
        self.replayable = True  # kept holds every byte the client sent
        self.client_eof = False
        self.backend_eof = False
        self.closed = False
        self.rx = False  # data moved since the last idle sweep
        self.silent = 0
        self.tried: set[Backend] = set()
        self._peer: Any = None
        # The endpoints as a backend should see them, when a trusted PROXY header named them.
        self.proxied: tuple[tuple[str, int], tuple[str, int]] | None = None
        self.proxy_buffer: bytes | None = None  # reading a PROXY header while not None
        self._connect_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ client events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if not self.balancer.admit(self):
            self.closed = True
            self.transport.abort()
            return
        high = self.balancer.cfg.limits.relay_buffer_bytes
        self.transport.set_write_buffer_limits(high=high, low=high // 4)
        trusted = self.state.trusted
        if trusted is not None:
            peer = self.peer
            if trusted.contains(peer[0] if isinstance(peer, tuple) else None):
                self.proxy_buffer = b""  # connect once the header names the real client
                return
        self._start_connect()

    @property
    def peer(self) -> Any:
        """The client's address, read when first needed (a syscall on uvloop)."""
        if self._peer is None:
            self._peer = self.transport.get_extra_info("peername")
        return self._peer

    def endpoints(self) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        """(client, address it connected to) as a backend should see them."""
        if self.proxied is not None:
            return self.proxied
        peer = self.peer
        sockname = self.transport.get_extra_info("sockname")
        if not isinstance(peer, tuple) or not isinstance(sockname, tuple):
            return None, None
        return (peer[0], peer[1]), (sockname[0], sockname[1])

    def _start_connect(self) -> None:
        self._connect_task = asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        self.rx = True
        if self.early:
            if self.proxy_buffer is not None:
                self._proxy_data(data)
            else:
                self._early_data(data)
        else:
            self.backend_transport.write(data)  # type: ignore[union-attr]  # set once not early

    def _proxy_data(self, data: bytes) -> None:
        from netstack.proto import proxy_protocol

        assert self.proxy_buffer is not None
        try:
            header, rest = proxy_protocol.receive(self.proxy_buffer, data)
        except RemoteProtocolError as exc:
            logger.warning("! relay from %s: %s; closing", self.peer, exc)
            self.proxy_buffer = None
            self.abort()
            return
        if header is None:
            self.proxy_buffer = rest
            return
        self.proxy_buffer = None
        source, destination = header.source, header.destination
        if source is not None and destination is not None:
            # LOCAL, UNSPEC and UNIX headers leave the real connection endpoints in place.
            self.proxied = (source, destination)
        self._start_connect()
        if rest:
            self._early_data(rest)

    def _early_data(self, data: bytes) -> None:
        bt = self.backend_transport
        if bt is not None:
            bt.write(data)
            if self.replayable:
                self.kept_bytes += len(data)
                if self.kept_bytes > REPLAY_MAX_BYTES:
                    self.replayable = False  # streaming now: a replay would be wrong
                    self.kept.clear()
                else:
                    self.kept.append(data)
            return
        # Connecting (or failing over): hold the bytes, and stop reading at the replay cap.
        self.kept.append(data)
        self.kept_bytes += len(data)
        if self.kept_bytes >= REPLAY_MAX_BYTES:
            self.replayable = self.kept_bytes <= REPLAY_MAX_BYTES
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.proxy_buffer is not None:  # the client left inside its PROXY header
            self.proxy_buffer = None
            self.close()
            return False
        self.client_eof = True
        bt = self.backend_transport
        if bt is not None and not bt.is_closing():
            bt.write_eof()
        if self.backend_eof:
            self.close()
        return True  # keep the client transport open to relay the backend's answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self._connect_task is not None and not self._connect_task.done():
            self._connect_task.cancel()
        self.closed = True
        bt = self.backend_transport
        if bt is not None and not bt.is_closing():
            bt.close()  # flushes what the client sent before leaving
        self._finish()

    def pause_writing(self) -> None:
        bt = self.backend_transport
        if bt is not None and not bt.is_closing():
            bt.pause_reading()

    def resume_writing(self) -> None:
        bt = self.backend_transport
        if bt is not None and not bt.is_closing():
            bt.resume_reading()

    # ------------------------------------------------------------------ backend side

    async def _connect(self) -> None:
        try:
            await self._connect_loop()
        except Exception:
            # A bug in us: one ERROR with the traceback, this relay closes, the rest go on.
            logger.exception("! relay from %s: internal error; closing", self.peer)
            self.abort()

    async def _connect_loop(self) -> None:
        loop = asyncio.get_running_loop()
        balancer = self.balancer
        pool = self.pool
        timeout = self.state.pool_cfg.timeouts.connect_timeout
        key = None
        if pool.algorithm == "consistent_hash":
            client = self.endpoints()[0]
            key = client[0] if client is not None else ""
        while True:
            try:
                backend = pool.acquire(loop.time(), key=key, exclude=self.tried)
            except NoBackendAvailable as exc:
                balancer.no_backend(self, exc)
                self.close()
                return
            self.tried.add(backend)
            self.backend = backend  # ours to release: failure below, failover or _finish
            side = BackendConnection(self)
            reason = await connect_backend(side.itself, backend, timeout)
            if reason is None:
                return  # attached in connection_made, before any backend byte could arrive
            if self.backend_side is side:  # made, then timed out before we resumed
                self.backend_side = None
                self.backend_transport = None
            if self.backend is backend:
                self.backend = None
                pool.release(backend)
            if self.closed:
                return
            balancer.backend_failed(pool, backend, reason, self)

    def attach(self, side: BackendConnection, bt: asyncio.Transport) -> None:
        """The backend connection is made: send what the client sent so far."""
        if self.closed or self.backend is None:
            bt.close()  # the client left while we connected (and released the backend)
            return
        self.pool.report_success(self.backend)
        self.backend_side = side
        self.backend_transport = bt
        self.backend_eof = False
        high = self.balancer.cfg.limits.relay_buffer_bytes
        bt.set_write_buffer_limits(high=high, low=high // 4)
        if self.state.send_proxy:
            bt.write(self._proxy_header())
        kept = self.kept
        if kept:
            bt.write(b"".join(kept) if len(kept) > 1 else kept[0])
            if not self.replayable:
                kept.clear()
        if self.client_eof:
            bt.write_eof()
        elif not self.transport.is_closing() and not side.backed_up:
            # Reading stopped at the replay cap; unless the kept bytes just filled the
            # backend's buffer (pause_writing above), in which case resume_writing resumes.
            self.transport.resume_reading()

    def _proxy_header(self) -> bytes:
        from netstack.proto import proxy_protocol

        version: Literal[1, 2] = 1 if self.state.send_proxy == 1 else 2
        try:
            header = proxy_protocol.for_connection(*self.endpoints(), version)
        except LocalProtocolError:  # an endpoint that is not an IP address: say UNKNOWN
            header = proxy_protocol.for_connection(None, None, version)
        return proxy_protocol.encode(header)

    def backend_data(self, data: bytes) -> None:
        if self.early:
            self.early = False
            self.kept = []
        self.rx = True
        self.transport.write(data)

    def backend_eof_received(self) -> None:
        self.backend_eof = True
        if self.early and self._can_fail_over(None):
            bt = self.backend_transport
            if bt is not None:
                bt.close()  # connection_lost follows and fails over
            return
        if not self.transport.is_closing():
            if not self.transport.can_write_eof():  # TLS has no half-close: done both ways
                self.close()
                return
            self.transport.write_eof()
        if self.client_eof:
            self.close()

    def backend_lost(self, side: BackendConnection, exc: Exception | None) -> None:
        if side is not self.backend_side:
            return
        self.backend_side = None
        self.backend_transport = None
        backend = self.backend
        if self.closed or backend is None:
            return  # the client side ended first and released the backend
        if self.early and self._can_fail_over(exc):
            self.pool.release(backend)
            self.backend = None
            reason = f"closed before answering ({exc or 'eof'})"
            self.balancer.backend_failed(self.pool, backend, reason, self)
            self._connect_task = asyncio.get_running_loop().create_task(self._connect())
            return
        self.close()

    def _can_fail_over(self, exc: Exception | None) -> bool:
        if not self.replayable:
            return False
        return exc is not None or not self.client_eof

    # ------------------------------------------------------------------ ending

    def close(self) -> None:
        """Close both sides after flushing what each has buffered."""
        if not self.transport.is_closing():
            self.transport.close()
        bt = self.backend_transport
        if bt is not None and not bt.is_closing():
            bt.close()

    def abort(self) -> None:
        """Drop both sides now (shutdown past its drain timeout)."""
        self.transport.abort()
        bt = self.backend_transport
        if bt is not None:
            bt.abort()

    def _finish(self) -> None:
        if self.backend is not None:
            self.pool.release(self.backend)
            self.backend = None
        self.balancer.forget(self)


class BackendConnection(asyncio.Protocol):
    """The backend side of a relay: forwards everything to its client."""

    __slots__ = ("backed_up", "client", "transport")

    def __init__(self, client: ClientConnection) -> None:
        self.client = client
        self.backed_up = False  # between pause_writing and resume_writing

    def itself(self) -> BackendConnection:
        """The protocol factory for ``create_connection``."""
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.client.attach(self, self.transport)

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client.early:
            client.backend_data(data)
        else:
            client.rx = True
            client.transport.write(data)

    def eof_received(self) -> bool:
        self.client.backend_eof_received()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.backend_lost(self, exc)

    def pause_writing(self) -> None:
        self.backed_up = True
        ct = self.client.transport
        if not ct.is_closing():
            ct.pause_reading()

    def resume_writing(self) -> None:
        self.backed_up = False
        ct = self.client.transport
        if not ct.is_closing():
            ct.resume_reading()


__all__ = ["REPLAY_MAX_BYTES", "BackendConnection", "ClientConnection", "connect_backend"]
