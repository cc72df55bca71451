"""RPCServer: the notes service with health checking and reflection on a grpc.aio server.

``async with RPCServer(cfg) as srv: await srv.serve_forever()``, like every netstack
server. Shutdown (``request_stop``, then ``close``): health turns NOT_SERVING, WatchNotes
streams end with UNAVAILABLE (they would otherwise hold the grace period open), the
server stops accepting calls, in-flight calls get ``grace_period`` seconds to finish and
are cancelled after it, and the store (with its change feed, if any) closes last.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from netstack.config import RPCServerConfig, parse_hostport
from netstack.errors import ConfigError
from netstack.servers import datadir
from netstack.servers.rpc._pb import notes_pb2_grpc
from netstack.servers.rpc.auth import TokenAuth
from netstack.servers.rpc.metrics import RPCMetrics
from netstack.servers.rpc.service import SERVICE_NAME, NotesService
from netstack.servers.rpc.sqlite import SQLiteNoteStore
from netstack.servers.rpc.store import NoteStore

if TYPE_CHECKING:
    from netstack.servers.wsgi import WSGIServer

logger = logging.getLogger(__name__)

DB_FILENAME: Final = "notes.sqlite3"


def database_location(cfg: RPCServerConfig) -> str:
    """The SQLite path or database URL ``cfg`` asks for."""
    return datadir.database_location(cfg.db, cfg.data_dir, DB_FILENAME)


def open_store(location: str) -> NoteStore:
    """A store for a SQLite path (or ``sqlite:///path``) or a ``postgresql://`` URL."""
    if location.startswith(("postgresql://", "postgres://")):
        from netstack.servers.rpc.postgres import PostgresNoteStore

        return PostgresNoteStore(location)
    return SQLiteNoteStore(location.removeprefix("sqlite://"))


def _probe_bind(host: str, port: int) -> None:
    """Bind ``host:port`` with a plain socket first, for the OS's own error message.

    gRPC's core reports a failed bind only as "Failed to bind" (and logs the reason to
    stderr itself); the probe gives "Address already in use" or "Cannot assign requested
    address" instead. Port 0 needs no probe.
    """
    if port == 0:
        return
    for family, kind, proto, _, addr in socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            probe.bind(addr)


class RPCServer:
    """The notes gRPC service on ``cfg.bind``.

    Args:
        cfg: the server configuration.
        store: a store to use instead of the one ``cfg.db`` names (not yet opened).
    """

    def __init__(self, cfg: RPCServerConfig, *, store: NoteStore | None = None) -> None:
        self.cfg = cfg
        self.store = store if store is not None else open_store(database_location(cfg))
        # Shared by several instances (PostgreSQL): every watcher event comes from the feed.
        self.feed = self.store.change_feed()
        self.service = NotesService(
            self.store,
            limits=cfg.rpc_limits,
            store_timeout=cfg.store_timeout,
            publish_locally=self.feed is None,
        )
        self.health = HealthServicer()
        # Counted only with --metrics-bind: otherwise no handler is wrapped.
        self.metrics = RPCMetrics(lambda: len(self.service.hub))
        self.metrics_server: WSGIServer | None = None
        self._server: grpc.aio.Server | None = None
        self._stop = asyncio.Event()
        self._closed = False
        self.port = 0

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) actually bound (the port is real when cfg asked for 0)."""
        host, _ = parse_hostport(self.cfg.bind)
        return host, self.port

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) of ``GET /metrics``, or None without ``metrics_bind``."""
        if self.metrics_server is None:
            return None
        host, port = self.metrics_server.addresses[0]
        return host, port

    async def start(self) -> None:
        """Open the store, bind and start serving (and ``/metrics`` with ``metrics_bind``).

        Raises:
            StoreUnavailable: the database cannot be opened.
            OSError: an address cannot be bound.
        """
        if self.cfg.metrics_bind is not None:
            await self._start_metrics(self.cfg.metrics_bind)
        try:
            await self._start()
        except BaseException:
            await self._stop_metrics()
            raise

    async def _start_metrics(self, bind: str) -> None:
        from netstack.servers.metrics import start_metrics_server

        self.metrics_server = await start_metrics_server(bind, self.metrics)

    async def _stop_metrics(self) -> None:
        if self.metrics_server is not None:
            self.metrics_server.close()
            await self.metrics_server.wait_closed()

    async def _start(self) -> None:
        await self.store.open()
        if self.feed is not None:
            try:
                await self.feed.start(self.service)
            except BaseException:
                await self.store.close()
                raise
        limits = self.cfg.rpc_limits
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.metrics_server is not None:  # outermost: it sees UNAUTHENTICATED calls too
            interceptors.append(self.metrics)
        if self.cfg.token:
            interceptors.append(TokenAuth(self.cfg.token))
        server = grpc.aio.server(
            interceptors=interceptors or None,
            options=[
                # Without this, two servers silently share a port (gRPC's default is on).
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", limits.max_message_bytes),
            ],
        )
        notes_pb2_grpc.add_NotesServicer_to_server(self.service, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        host, port = parse_hostport(self.cfg.bind)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        credentials = self._credentials()
        try:
            _probe_bind(host, port)
            if credentials is None:
                self.port = server.add_insecure_port(target)
            else:
                self.port = server.add_secure_port(target, credentials)
        except (OSError, RuntimeError) as exc:  # grpc reports a failed bind as RuntimeError
            await self._close_store()
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise OSError(f"cannot bind {self.cfg.bind}: {reason}") from None
        await server.start()
        self._server = server
        await self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "notes service on %s:%d (auth %s)", host, self.port, "on" if self.cfg.token else "off"
        )

    @property
    def scheme(self) -> str:
        """``grpcs`` with TLS, else ``grpc`` (for the "listening on" line)."""
        return "grpcs" if self.cfg.tls.certfile else "grpc"

    def _credentials(self) -> grpc.ServerCredentials | None:
        tls = self.cfg.tls
        if tls.certfile is None or tls.keyfile is None:
            return None
        try:
            key = Path(tls.keyfile).read_bytes()
            chain = Path(tls.certfile).read_bytes()
        except OSError as exc:
            field = "keyfile" if exc.filename == tls.keyfile else "certfile"
            raise ConfigError(f"{field}: cannot read {exc.filename}: {exc.strerror}") from None
        return grpc.ssl_server_credentials([(key, chain)])

    def request_stop(self) -> None:
        """Ask :meth:`serve_forever` to return (signal-handler safe)."""
        self._stop.set()

    async def serve_forever(self) -> None:
        await self._stop.wait()

    async def close(self) -> None:
        """Stop accepting, let in-flight calls finish within grace_period, close the store."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._server is not None:
            await self.health.enter_graceful_shutdown()
            self.service.hub.close()
            await self._server.stop(self.cfg.grace_period)
        await self._close_store()
        await self._stop_metrics()
        logger.info("notes service stopped")

    async def _close_store(self) -> None:
        if self.feed is not None:
            await self.feed.close()
        await self.store.close()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

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
