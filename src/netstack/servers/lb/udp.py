"""UDP mode: one session per client address, each with its own socket to one backend.

A datagram from a new client address picks a backend and opens a connected UDP socket to
it; later datagrams of that client go through the same socket, and the backend's replies
go back to the client from the frontend's address. A session silent for
``udp_session_timeout`` (checked by a sweep at a quarter of it: closed after 1 to 1.25
times the timeout) is forgotten. An ICMP error from the backend (port unreachable) counts
as a passive failure and ends the session: the client's next datagram picks again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final, cast

from netstack.errors import NoBackendAvailable
from netstack.proto.balance import Backend, Pool

if TYPE_CHECKING:
    from netstack.servers.lb.server import Balancer, Listener

logger = logging.getLogger(__name__)

Address = Any
SWEEP_TICKS: Final = 4
# Datagrams held per session while its backend socket is being opened.
MAX_PENDING: Final = 64


class UDPSession(asyncio.DatagramProtocol):
    """A client's connected socket to its backend."""

    transport: asyncio.DatagramTransport | None

    def __init__(self, frontend: UDPFrontend, client: Address, pool: Pool, backend: Backend):
        self.frontend = frontend
        self.client = client
        self.pool = pool
        self.backend = backend
        self.transport = None
        self.pending: list[bytes] = []
        self.rx = True
        self.silent = 0
        self.closed = False
        self.connect_task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        for data in self.pending:
            self.transport.sendto(data)
        self.pending = []

    def send(self, data: bytes) -> None:
        self.rx = True
        if self.transport is not None:
            self.transport.sendto(data)
        elif len(self.pending) < MAX_PENDING:
            self.pending.append(data)
        else:
            self.frontend.dropped += 1

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.rx = True
        ft = self.frontend.transport
        if ft is not None:
            ft.sendto(data, self.client)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and friends: the backend is not there.
        self.frontend.balancer.backend_failed(self.pool, self.backend, f"udp error ({exc})", None)
        self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.pool.release(self.backend)
        self.frontend.forget(self)
        if self.transport is not None:
            self.transport.close()


class UDPFrontend(asyncio.DatagramProtocol):
    """The frontend endpoint: maps client addresses to sessions."""

    transport: asyncio.DatagramTransport | None

    def __init__(self, listener: Listener) -> None:
        self.listener = listener
        self.balancer: Balancer = listener.balancer
        self.transport = None
        self.sessions: dict[Address, UDPSession] = {}
        self.dropped = 0
        self.expired = 0
        self.opened = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._last_warn = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._schedule_sweep()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        session = self.sessions.get(addr)
        if session is None:
            session = self._open(addr)
            if session is None:
                self.dropped += 1
                return
        session.send(data)

    def _open(self, addr: Address) -> UDPSession | None:
        balancer = self.balancer
        if len(self.sessions) >= balancer.cfg.limits.max_udp_sessions:
            self._warn(
                "max_udp_sessions=%d reached: dropping datagrams of new client %s",
                balancer.cfg.limits.max_udp_sessions,
                addr,
            )
            return None
        state = self.listener.state
        pool = state.pool
        loop = asyncio.get_running_loop()
        key = str(addr[0]) if pool.algorithm == "consistent_hash" else None
        try:
            backend = pool.acquire(loop.time(), key=key)
        except NoBackendAvailable as exc:
            balancer.no_backend(None, exc)
            return None
        session = UDPSession(self, addr, pool, backend)
        self.sessions[addr] = session
        self.opened += 1
        session.connect_task = loop.create_task(self._connect(session))
        return session

    async def _connect(self, session: UDPSession) -> None:
        loop = asyncio.get_running_loop()
        backend = session.backend
        try:
            await loop.create_datagram_endpoint(
                lambda: session, remote_addr=(backend.host, backend.port)
            )
        except OSError as exc:
            self.balancer.backend_failed(session.pool, backend, f"udp connect ({exc})", None)
            session.close()

    def forget(self, session: UDPSession) -> None:
        if self.sessions.get(session.client) is session:
            del self.sessions[session.client]

    def _schedule_sweep(self) -> None:
        timeout = self.listener.state.pool_cfg.timeouts.udp_session_timeout
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(timeout / SWEEP_TICKS, self._sweep)

    def _sweep(self) -> None:
        for session in list(self.sessions.values()):
            if session.rx:
                session.rx = False
                session.silent = 0
                continue
            session.silent += 1
            if session.silent >= SWEEP_TICKS:
                self.expired += 1
                logger.debug("x udp session %s expired", session.client)
                session.close()
        self._schedule_sweep()

    def _warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warn >= 1.0:
            self._last_warn = now
            logger.warning(msg, *args)

    def error_received(self, exc: Exception) -> None:
        logger.debug("! udp frontend error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session in list(self.sessions.values()):
            session.close()
        self.transport = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


__all__ = ["UDPFrontend", "UDPSession"]
