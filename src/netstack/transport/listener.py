"""Listeners with the ``asyncio.Server`` shape: start, serve_forever, close, wait_closed.

``Server`` (TCP, optionally TLS) admits at most ``Limits.max_connections`` connections and
shuts down gracefully, as uvicorn's ``shutdown()`` does but driven by events, not polling:

1. stop accepting;
2. ask each connection to finish (``StreamProtocol.shutdown``: idle ones close now, busy
   ones once their in-flight frame is served);
3. wait for the last one inside ``Timeouts.graceful_timeout``, then abort the rest.

``DatagramServer`` is the UDP twin (no connections to drain). ``serve_forever`` returns
after :meth:`request_stop`, which the CLI calls from its signal handlers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, Self

from netstack.config import Limits, Timeouts
from netstack.transport.datagram import DatagramProtocol
from netstack.transport.stream import StreamProtocol

logger = logging.getLogger(__name__)


def format_address(addr: tuple[Any, ...]) -> str:
    """``127.0.0.1:9000`` or ``[::1]:9000``."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Lifecycle:
    """Stop event, ``serve_forever``, ``close``/``wait_closed`` and the async context
    manager: the ``asyncio.Server`` shape shared by every netstack server.

    Subclasses implement :meth:`start`, :meth:`_shutdown` and :attr:`sockets`.
    """

    name = ""

    def __init__(self) -> None:
        self._stop = asyncio.Event()
        self._close_task: asyncio.Task[None] | None = None

    async def start(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    async def _shutdown(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def sockets(self) -> tuple[socket.socket, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Bound (host, port) pairs; read the port back after binding port 0."""
        return [tuple(s.getsockname()[:2]) for s in self.sockets]

    def request_stop(self) -> None:
        """Make :meth:`serve_forever` return after a graceful close (signal-safe)."""
        self._stop.set()

    async def serve_forever(self) -> None:
        """Serve until :meth:`request_stop` or :meth:`close`, then close gracefully."""
        await self._stop.wait()
        self.close()
        await self.wait_closed()

    def close(self) -> None:
        """Start a graceful close; :meth:`wait_closed` waits for it to finish."""
        if self._close_task is None:
            self._stop.set()
            self._close_task = asyncio.get_running_loop().create_task(self._shutdown())

    async def wait_closed(self) -> None:
        """Wait until :meth:`close` has finished."""
        if self._close_task is not None:
            await asyncio.shield(self._close_task)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()


DEFAULT_BACKLOG: Final = 2048
"""Listen queue of netstack's TCP listeners (gunicorn's default)."""


class Server(Lifecycle):
    """A TCP listener serving :class:`StreamProtocol` connections.

    Args:
        protocol_factory: returns a new protocol per connection; the server sets itself as
            the protocol's ``registry``.
        host: address to bind (``"::1"`` for IPv6).
        port: port to bind; 0 picks a free one (read it back from :attr:`addresses`).
        limits: ``max_connections`` is enforced here.
        timeouts: ``graceful_timeout`` bounds :meth:`close`.
        ssl: a server TLS context, or ``None`` for plain TCP.
        backlog: the listen(2) queue. asyncio's default of 100 overflows when hundreds of
            clients connect at once to a busy loop: the kernel then drops their handshakes'
            last ACK and the clients, which think they are connected, are cut ~20 s later.
            gunicorn's 2048 (Linux caps it at ``net.core.somaxconn``).
    """

    def __init__(
        self,
        protocol_factory: Callable[[], StreamProtocol[Any]],
        host: str,
        port: int,
        *,
        limits: Limits | None = None,
        timeouts: Timeouts | None = None,
        ssl: ssl.SSLContext | None = None,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        super().__init__()
        self.backlog = backlog
        self._protocol_factory = protocol_factory
        self.host = host
        self.port = port
        self.limits = limits or Limits()
        self.timeouts = timeouts or Timeouts()
        self.ssl = ssl
        self.name = "tls" if ssl is not None else "tcp"
        self.connections: set[StreamProtocol[Any]] = set()
        self.refused = 0
        self._all_closed = asyncio.Event()
        self._closing = False
        self._server: asyncio.Server | None = None

    def _factory(self) -> StreamProtocol[Any]:
        protocol = self._protocol_factory()
        protocol.registry = self
        return protocol

    async def start(self) -> None:
        """Bind and start accepting.

        Raises:
            OSError: the address is in use or cannot be bound.
        """
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._factory,
            self.host,
            self.port,
            ssl=self.ssl,
            reuse_address=True,
            backlog=self.backlog,
        )
        for addr in self.addresses:
            logger.info("listening on %s %s", self.name, format_address(addr))

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._server.sockets) if self._server is not None else ()

    def register(self, conn: StreamProtocol[Any]) -> bool:
        if self._closing:
            logger.info("refusing connection %d from %s: shutting down", conn.conn_id, conn.peer)
            return False
        if len(self.connections) >= self.limits.max_connections:
            self.refused += 1
            logger.warning(
                "refusing connection %d from %s: max_connections=%d reached",
                conn.conn_id,
                conn.peer,
                self.limits.max_connections,
                extra={"conn_id": conn.conn_id},
            )
            return False
        self.connections.add(conn)
        return True

    def unregister(self, conn: StreamProtocol[Any]) -> None:
        self.connections.discard(conn)
        if self._closing and not self.connections:
            self._all_closed.set()

    async def _shutdown(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        busy = len(self.connections)
        logger.info("closing %s listener: %d connection(s) to finish", self.name, busy)
        for conn in list(self.connections):
            conn.shutdown()
        if not self.connections:
            self._all_closed.set()
        try:
            async with asyncio.timeout(self.timeouts.graceful_timeout):
                await self._all_closed.wait()
        except TimeoutError:
            logger.warning(
                "graceful_timeout=%.1fs expired: aborting %d connection(s)",
                self.timeouts.graceful_timeout,
                len(self.connections),
            )
            for conn in list(self.connections):
                conn.abort()
            await self._all_closed.wait()
        if self._server is not None:
            await self._server.wait_closed()
        logger.info("%s listener closed", self.name)


class DatagramServer(Lifecycle):
    """A UDP endpoint serving one :class:`DatagramProtocol`.

    Args:
        protocol_factory: returns the endpoint's protocol.
        host: address to bind.
        port: port to bind; 0 picks a free one.
    """

    name = "udp"

    def __init__(
        self, protocol_factory: Callable[[], DatagramProtocol], host: str, port: int
    ) -> None:
        super().__init__()
        self._protocol_factory = protocol_factory
        self.host = host
        self.port = port
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: DatagramProtocol | None = None

    @property
    def protocol(self) -> DatagramProtocol:
        assert self._protocol is not None, "start() first"
        return self._protocol

    async def start(self) -> None:
        """Bind the endpoint.

        Raises:
            OSError: the address is in use or cannot be bound.
        """
        loop = asyncio.get_running_loop()
        self._transport, self._protocol = await loop.create_datagram_endpoint(
            self._protocol_factory, local_addr=(self.host, self.port)
        )
        for addr in self.addresses:
            logger.info("listening on udp %s", format_address(addr))

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        if self._transport is None:
            return ()
        sock = self._transport.get_extra_info("socket")
        return (sock,) if sock is not None else ()

    async def _shutdown(self) -> None:
        if self._transport is not None and self._protocol is not None:
            self._transport.close()
            if self._protocol.closed is not None:
                await self._protocol.closed
        logger.info("udp endpoint closed")
