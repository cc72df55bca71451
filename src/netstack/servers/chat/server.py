"""ChatServer: the store, the fan-out, the session logic and both listeners, as one unit.

``async with ChatServer(cfg) as srv: await srv.serve_forever()``, like every netstack
server. Shutdown tells clients the server is going away (WebSocket close 1001), closes
both listeners (TCP gracefully, within ``graceful_timeout``) and then the store.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
from types import TracebackType
from typing import TYPE_CHECKING, Self
from urllib.parse import urlsplit, urlunsplit

from netstack.config import ChatServerConfig, Limits, parse_hostport
from netstack.errors import ConfigError
from netstack.servers import datadir
from netstack.servers.chat.fanout import (
    Fanout,
    LocalFanout,
    LocalPresence,
    LoginThrottle,
    Presence,
)
from netstack.servers.chat.service import LOGIN_WINDOW, MAX_LOGIN_FAILURES, ChatService
from netstack.servers.chat.sqlite import SQLiteStore
from netstack.servers.chat.store import Store, StoreUnavailable
from netstack.servers.chat.tcp import ChatTCPProtocol
from netstack.transport.listener import Server, format_address
from netstack.transport.tls import server_context

if TYPE_CHECKING:
    from netstack.servers.chat.ws import WSTransport
    from netstack.servers.wsgi import WSGIServer

logger = logging.getLogger(__name__)

DB_FILENAME = "chat.sqlite3"


def database_location(cfg: ChatServerConfig) -> str:
    """The SQLite path or database URL ``cfg`` asks for."""
    return datadir.database_location(cfg.db, cfg.data_dir, DB_FILENAME)


def open_store(location: str) -> Store:
    """A store for a SQLite path (or ``sqlite:///path``) or a ``postgresql://`` URL.

    Raises:
        ConfigError: the URL names a store whose driver is not installed.
    """
    if location.startswith(("postgresql://", "postgres://")):
        try:
            import psycopg  # noqa: F401  # the `db` extra
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise ConfigError(
                "db: the PostgreSQL store needs psycopg: pip install 'netstack[db]'", field="db"
            ) from None
        from netstack.servers.chat.postgres import PostgresStore

        return PostgresStore(location)
    if location.startswith("sqlite://"):
        location = location.removeprefix("sqlite://") or ":memory:"
    return SQLiteStore(location)


def redact(location: str) -> str:
    """``location`` with any password in a URL replaced by ``***`` (for logs and output)."""
    if "://" not in location:
        return location
    parts = urlsplit(location)
    if parts.password is None:
        return location
    netloc = parts.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


class ChatServer:
    """A chat server: WebSocket/HTTP on ``cfg.bind``, TCP on ``cfg.tcp_bind``.

    Args:
        cfg: the configuration.
        store: overrides the store named by ``cfg.db`` (tests, other backends).
        fanout: overrides the fan-out (in-process, or Redis with ``cfg.redis``).
        presence: overrides the presence counts (in-process, or Redis with ``cfg.redis``).

    With ``cfg.redis`` the failed-login throttle is shared through Redis too.
    """

    def __init__(
        self,
        cfg: ChatServerConfig,
        *,
        store: Store | None = None,
        fanout: Fanout | None = None,
        presence: Presence | None = None,
    ) -> None:
        self.cfg = cfg
        self.store = store if store is not None else open_store(database_location(cfg))
        if cfg.redis is not None:
            from netstack.servers.chat.scaleout import RedisFanout, RedisPresence, RedisThrottle

            instance = secrets.token_hex(8)
            fanout = fanout or RedisFanout(cfg.redis, prefix=cfg.redis_prefix, instance=instance)
            presence = presence or RedisPresence(
                cfg.redis,
                prefix=cfg.redis_prefix,
                ttl=cfg.chat_timeouts.presence_ttl,
                instance=instance,
            )
            self.throttle: LoginThrottle | None = RedisThrottle(
                cfg.redis,
                prefix=cfg.redis_prefix,
                max_failures=MAX_LOGIN_FAILURES,
                window=LOGIN_WINDOW,
            )
        else:
            self.throttle = None
        self.fanout = fanout if fanout is not None else LocalFanout()
        self.presence = presence if presence is not None else LocalPresence()
        self.service = ChatService(
            self.store,
            self.fanout,
            presence=self.presence,
            throttle=self.throttle,
            limits=cfg.chat_limits,
            timeouts=cfg.chat_timeouts,
            idle_timeout=cfg.timeouts.idle_timeout,
        )
        self.ssl = server_context(cfg.tls)
        self.tcp: Server | None = None
        self.ws: WSTransport | None = None
        self.metrics_server: WSGIServer | None = None
        self._stop = asyncio.Event()
        self._closed = False
        self._started = False

    async def start(self) -> None:
        """Open the store and bind both listeners.

        Raises:
            OSError: an address cannot be bound.
        """
        from netstack.servers.chat.ws import WSTransport  # websockets: imported lazily

        try:
            await self.store.open()
        except StoreUnavailable:
            await self.store.close()
            raise
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open the chat database: {exc}") from exc
        try:
            await self.fanout.start()
            await self.presence.start()
            await self.service.throttle.start()
            ws = self.ws = WSTransport(self.service, self.cfg, self.ssl)
            host, port = parse_hostport(self.cfg.bind, field="bind")
            await ws.start(host, port)
            if self.cfg.tcp_bind is not None:
                host, port = parse_hostport(self.cfg.tcp_bind, field="tcp_bind")
                self.tcp = Server(
                    lambda: ChatTCPProtocol(self.service, self.cfg.chat_limits, self.cfg.timeouts),
                    host,
                    port,
                    limits=Limits(max_connections=self.cfg.chat_limits.max_clients),
                    timeouts=self.cfg.timeouts,
                    ssl=self.ssl,
                    backlog=self.cfg.chat_limits.backlog,
                )
                await self.tcp.start()
            if self.cfg.metrics_bind is not None:
                await self._start_metrics(self.cfg.metrics_bind)
        except BaseException:
            await self.close()
            raise
        self._started = True
        for name, addr in self.listening():
            if name in ("ws", "wss"):  # the TCP listener logs its own line
                logger.info("listening on %s %s", name, format_address(addr))

    async def _start_metrics(self, bind: str) -> None:
        from netstack.servers.chat.metrics import ChatMetrics
        from netstack.servers.metrics import start_metrics_server

        self.metrics_server = await start_metrics_server(bind, ChatMetrics(self))

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of ``GET /metrics``, or None without ``metrics_bind``."""
        if self.metrics_server is None:
            return None
        host, port = self.metrics_server.addresses[0]
        return host, port

    def listening(self) -> list[tuple[str, tuple[str, int]]]:
        """``(kind, (host, port))`` for each bound socket: ``ws``/``wss`` and ``tcp``/``tls``."""
        out: list[tuple[str, tuple[str, int]]] = []
        if self.ws is not None and self.ws.server is not None:
            kind = "wss" if self.ssl is not None else "ws"
            out.extend((kind, addr) for addr in self.ws.addresses)
        if self.tcp is not None:
            out.extend((self.tcp.name, addr) for addr in self.tcp.addresses)
        return out

    @property
    def ws_address(self) -> tuple[str, int]:
        return next(addr for kind, addr in self.listening() if kind in ("ws", "wss"))

    @property
    def tcp_address(self) -> tuple[str, int]:
        return next(addr for kind, addr in self.listening() if kind in ("tcp", "tls"))

    def request_stop(self) -> None:
        self._stop.set()

    async def serve_forever(self) -> None:
        await self._stop.wait()
        await self.close()

    async def close(self) -> None:
        """Close both listeners, every client, then the store (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.service.shutdown()
        if self.ws is not None:
            await self.ws.close()
        if self.tcp is not None:
            self.tcp.close()
            await self.tcp.wait_closed()
        await self.service.drain()  # offline presence of the sessions just closed
        await self.fanout.close()
        await self.presence.close()
        await self.service.throttle.close()
        self.service.close()
        await self.store.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
            await self.metrics_server.wait_closed()
        if self._started:
            logger.info("chat server closed")

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
