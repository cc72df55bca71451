"""``WSGIServer``: listeners, the per-worker tick, the app thread pool and graceful close.

One instance runs in each worker process (or in the only process). It mirrors
``asyncio.Server``: ``async with WSGIServer(cfg, app) as srv: await srv.serve_forever()``.

With a :class:`~netstack.servers.wsgi.balance.LoadSlot` (pre-fork workers, ``--workers``
above 1) the server listens on ``dup()`` copies of the shared sockets and publishes its
open connection count; while it holds more than its share it closes those asyncio servers
(the shared sockets keep listening for the other workers) and re-creates them when a peer
wakes it or it finds itself back within its share, or when the peers accept nothing while
connections wait (see ``balance.py``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import queue
import random
import socket
import stat
import threading
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

from netstack.config import WSGIServerConfig, parse_bind
from netstack.errors import ConfigError
from netstack.proto.forwarded import ClientInfo, Source, TrustedPeers, resolve
from netstack.proto.http11 import Request
from netstack.servers.wsgi.accesslog import access_logger, log_exchange
from netstack.servers.wsgi.app import WSGIApp
from netstack.servers.wsgi.balance import (
    CLOSED,
    LISTENING,
    MAX_PAUSE,
    PAUSE,
    PAUSED,
    STALL,
    WAKE_SIGNAL,
    LoadSlot,
    backlog,
)
from netstack.servers.wsgi.environ import base_environ, build_environ
from netstack.servers.wsgi.protocol import Exchange, FileWrapper, WSGIProtocol
from netstack.transport.backlog import accept_pending, refuse_new_connections
from netstack.transport.listener import Lifecycle
from netstack.transport.tls import server_context

logger = logging.getLogger(__name__)

SERVER_LINE = b"server: netstack\r\n"
# What an untrusted client's forwarding headers become in environ: removed.
_FORWARDING_KEYS = (
    "HTTP_FORWARDED",
    "HTTP_X_FORWARDED_FOR",
    "HTTP_X_FORWARDED_PROTO",
    "HTTP_X_FORWARDED_HOST",
    "HTTP_X_FORWARDED_PORT",
    "HTTP_X_FORWARDED_PREFIX",
    "HTTP_X_REAL_IP",
)


def bind_socket(address: str, backlog: int) -> socket.socket:
    """Create a listening socket for one ``--bind`` value.

    Raises:
        ConfigError: a malformed address (names ``bind``).
        OSError: the address cannot be bound (in use, permission).
    """
    kind, host, port = parse_bind(address)
    if kind == "fd":
        sock = socket.socket(fileno=port)
        if sock.type != socket.SOCK_STREAM:
            raise ConfigError(f"bind: fd {port} is not a stream socket", field="bind")
        sock.listen(backlog)
    elif kind == "unix":
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(host).st_mode):
                os.unlink(host)  # a stale socket from a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(host)
        sock.listen(backlog)
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=backlog)
    sock.setblocking(False)
    return sock


def tick_interval(cfg: WSGIServerConfig) -> float:
    """How often deadlines are checked: a quarter of the shortest timeout, at most 1 s."""
    t = cfg.http_timeouts
    enabled = [
        x
        for x in (t.header_timeout, t.keepalive_timeout, t.body_timeout, t.write_timeout)
        if x is not None
    ]
    return max(0.01, min([1.0, *(x / 4 for x in enabled)]))


class _ThreadPool:
    """N daemon threads taking callables from one queue (cheaper than an Executor's
    futures: the result goes back to the loop through ``call_soon_threadsafe``)."""

    def __init__(self, size: int) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"netstack-app-{i}", daemon=True)
            for i in range(size)
        ]
        for thread in self._threads:
            thread.start()

    def _work(self) -> None:
        get = self._queue.get
        while True:
            job = get()
            if job is None:
                return
            try:
                job()
            except BaseException:  # a bug in Exchange itself; keep the thread alive
                logger.exception("unexpected error in an app thread")

    def submit(self, job: Callable[[], None]) -> None:
        self._queue.put(job)

    def shutdown(self) -> None:
        for _ in self._threads:
            self._queue.put(None)

    def alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)


class WSGIServer(Lifecycle):
    """Serve a WSGI app on the configured listeners.

    Args:
        cfg: the server configuration.
        app: the WSGI callable.
        sockets: already-bound listening sockets (pre-fork workers inherit them); when
            ``None`` the server binds ``cfg.bind`` itself.
        multiprocess: sets ``wsgi.multiprocess``.
        load_slot: this worker's slot in the master's connection table: the worker
            stops accepting while it holds more than its share (pre-fork workers only).
    """

    def __init__(
        self,
        cfg: WSGIServerConfig,
        app: WSGIApp,
        *,
        sockets: list[socket.socket] | None = None,
        multiprocess: bool = False,
        load_slot: LoadSlot | None = None,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.app = app
        self.limits = cfg.limits
        self.http_limits = cfg.http_limits
        self.http_timeouts = cfg.http_timeouts
        self.keepalive_timeout = cfg.http_timeouts.keepalive_timeout
        self.root_path = cfg.root_path
        self.parser = cfg.parser
        self.threads = cfg.threads
        self.multiprocess = multiprocess
        self._given_sockets = sockets
        self._sockets: list[socket.socket] = []
        # Unix socket files this server created (and removes on close).
        self._unix_paths: list[str] = []
        self.ssl = server_context(cfg.tls)
        self.trusted = TrustedPeers(cfg.forwarded_allow_ips)
        self.proxy_protocol = cfg.proxy_protocol
        self.connections: set[WSGIProtocol] = set()
        self.closing = False
        self.now = 0.0
        # Server and Date header lines, rebuilt once a second by the tick.
        self.default_block = SERVER_LINE
        self._date_second = -1
        self._all_closed = asyncio.Event()
        self._servers: list[asyncio.Server] = []
        self.load_slot = load_slot
        if load_slot is not None:
            load_slot.limit = cfg.limits.max_connections
        # Balancing state: whether accepting is paused (and how often it was), the pause
        # timer and its interval, what the peers had admitted at the last look, and when
        # peers that admit nothing while connections wait count as stalled.
        self.paused = False
        self.pauses = 0
        self._pause_timer: asyncio.TimerHandle | None = None
        self._peer_progress: dict[int, int] = {}
        self._pause_interval = PAUSE
        self._stall_at = 0.0
        # Bumped by every pause: a _listen() started before it must not install servers.
        self._generation = 0
        self._tick_task: asyncio.Task[None] | None = None
        self._pool: _ThreadPool | None = None
        # Responses finished by app threads, waiting for the loop (see to_loop).
        self._from_threads: collections.deque[tuple[Callable[[Any], None], Any]] = (
            collections.deque()
        )
        self._drain_scheduled = False
        # The running loop when built inside one (the admin and metrics endpoints): the
        # policy's "current" loop may be unset there (asyncio.Runner with a loop factory).
        try:
            self.loop: asyncio.AbstractEventLoop = asyncio.get_running_loop()
        except RuntimeError:
            self.loop = asyncio.get_event_loop_policy().get_event_loop()
        # Counters (the metrics endpoint and tests read them).
        self.requests = 0
        self.refused = 0
        self.rejected = 0
        self.timed_out = 0
        self.app_errors = 0
        self.max_requests = 0
        if cfg.max_requests:
            self.max_requests = cfg.max_requests + random.randint(0, cfg.max_requests_jitter)
        self.access_log = cfg.access_log
        self.on_request: Callable[[Exchange], None] | None = None
        # What reaching max_requests does; a pre-fork worker asks its master for a
        # replacement instead, and stops when the master sends SIGTERM.
        self.on_max_requests: Callable[[], None] = self.request_stop
        # Whether exchanges record their start time (access log, metrics), and whether
        # request_finished() has anything to do beyond counting.
        self.timed = cfg.access_log
        self.observed = bool(cfg.access_log or self.max_requests)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind (unless given sockets) and start accepting.

        Raises:
            OSError: an address cannot be bound.
        """
        self.loop = loop = asyncio.get_running_loop()
        self._update_clock()
        if self._given_sockets is not None:
            self._sockets = list(self._given_sockets)
        else:
            try:
                for address in self.cfg.bind:
                    sock = bind_socket(address, self.cfg.backlog)
                    self._sockets.append(sock)
                    if sock.family == socket.AF_UNIX:
                        self._unix_paths.append(sock.getsockname())
            except OSError:
                for sock in self._sockets:
                    sock.close()
                raise
        if self.threads:
            self._pool = _ThreadPool(self.threads)
        if self.load_slot is not None:
            await self._listen()
            loop.add_signal_handler(WAKE_SIGNAL, self._woken)
            self.load_slot.state(LISTENING)
        else:
            for sock in self._sockets:
                server = await loop.create_server(
                    lambda: WSGIProtocol(self), sock=sock, ssl=self.ssl, backlog=self.cfg.backlog
                )
                self._servers.append(server)
        self._tick_task = loop.create_task(self._tick(tick_interval(self.cfg)))

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(self._sockets)

    @property
    def addresses(self) -> list[Any]:  # (host, port) pairs, or unix socket paths
        """Bound addresses: ``(host, port)`` for TCP, the path for unix sockets."""
        out = []
        for sock in self._sockets:
            name = sock.getsockname()
            out.append(tuple(name[:2]) if isinstance(name, tuple) else name)
        return out

    async def _shutdown(self) -> None:
        """uvicorn's shutdown(), event-driven: stop accepting, drain, then abort."""
        self.closing = True
        # Closing a listener resets what waits in its accept queue: take that first
        # (transport/backlog.py). The master stops new handshakes on shared listeners.
        queued = []
        for sock in self._sockets:
            if self._given_sockets is None:
                refuse_new_connections(sock)
            queued += accept_pending(sock)
        for server in self._servers:
            server.close()
        if self.load_slot is not None:
            # The servers listened on copies: close the originals now, so that once every
            # process has closed its copy the kernel refuses new connections instead of
            # queueing them for nobody.
            self.load_slot.state(CLOSED)
            self.loop.remove_signal_handler(WAKE_SIGNAL)
            if self._pause_timer is not None:
                self._pause_timer.cancel()
            for sock in self._sockets:
                sock.close()
        handoffs = [
            self.loop.create_task(
                self.loop.connect_accepted_socket(lambda: WSGIProtocol(self), conn, ssl=self.ssl)
            )
            for conn in queued
        ]
        logger.info("shutting down: %d connection(s) to finish", len(self.connections))
        for conn in list(self.connections):
            conn.shutdown()
        if not self.connections:
            self._all_closed.set()
        try:
            async with asyncio.timeout(self.cfg.timeouts.graceful_timeout):
                if handoffs:  # each is admitted (and waited for) once its transport is made
                    await asyncio.gather(*handoffs, return_exceptions=True)
                await self._all_closed.wait()
        except TimeoutError:
            logger.warning(
                "graceful_timeout=%.1fs expired: aborting %d connection(s)",
                self.cfg.timeouts.graceful_timeout,
                len(self.connections),
            )
            for conn in list(self.connections):
                conn.abort()
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        if self._tick_task is not None:
            self._tick_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._tick_task
        if self._pool is not None:
            # Wait (bounded) for the app threads to finish, so that none of them hands a
            # callback to this loop after the server is closed and the loop goes away.
            self._pool.shutdown()
            deadline = self.loop.time() + self.cfg.timeouts.graceful_timeout
            while self._pool.alive() and self.loop.time() < deadline:  # noqa: ASYNC110 - a thread setting an Event would need the loop we are protecting
                await asyncio.sleep(0.01)
            self._drain_from_threads()
        for sock in self._sockets:
            sock.close()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                os.unlink(path)

    # ------------------------------------------------------------------ connections

    def admit(self, conn: WSGIProtocol) -> bool:
        # A connection accepted while shutting down (it was in the backlog when the
        # listener closed) is served once, with Connection: close, like one still waiting
        # for its first request: a 503 would fail a request no client may retry.
        if len(self.connections) >= self.limits.max_connections:
            self.refused += 1
            logger.warning(
                "refusing a connection: max_connections=%d reached",
                self.limits.max_connections,
            )
            return False
        self.connections.add(conn)
        if self.closing:
            self._all_closed.clear()  # one more to wait for
        elif self.load_slot is not None:
            self._balance()
        return True

    def release(self, conn: WSGIProtocol) -> None:
        self.connections.discard(conn)
        if self.load_slot is not None:
            self.load_slot.closed(len(self.connections))
        if self.closing and not self.connections:
            self._all_closed.set()

    # ------------------------------------------------------------------ balancing

    async def _listen(self) -> None:
        """Create the asyncio servers, on copies of the shared listening sockets."""
        generation = self._generation
        servers = []
        try:
            for sock in self._sockets:
                copy = sock.dup()
                try:
                    server = await self.loop.create_server(
                        lambda: WSGIProtocol(self),
                        sock=copy,
                        ssl=self.ssl,
                        backlog=self.cfg.backlog,
                    )
                except BaseException:
                    copy.close()
                    raise
                servers.append(server)
        except BaseException:
            for server in servers:
                server.close()
            raise
        if self.closing or self.paused or generation != self._generation:
            for server in servers:  # shut down (or paused again) meanwhile
                server.close()
            return
        self._servers = servers

    def _balance(self) -> None:
        """After admitting a connection: publish the count, pause if above the share."""
        slot = self.load_slot
        assert slot is not None
        n = len(self.connections)
        if not slot.opened(n) or self.paused:
            return
        self.paused = True
        self.pauses += 1
        logger.debug("pausing accept at %d connection(s)", n)
        self._generation += 1
        slot.state(PAUSED)
        for server in self._servers:
            server.close()  # the shared sockets stay open: the peers keep accepting
        self._servers = []
        self._peer_progress = slot.progress()
        self._pause_interval = PAUSE
        self._stall_at = self.loop.time() + STALL
        self._pause_timer = self.loop.call_later(PAUSE, self._pause_check)

    def _pause_check(self) -> None:
        """While paused, every PAUSE or so: listen again once back within the share, or
        when connections waited STALL and no peer accepted any (those peers are then
        ignored until they accept again: an app blocking the loop, a stopped process)."""
        slot = self.load_slot
        assert slot is not None
        self._pause_timer = None
        if self.closing:
            return
        if slot.over_share(len(self.connections)):
            now = self.loop.time()
            before = self._peer_progress
            interval = PAUSE
            if slot.moved(before):
                self._peer_progress = slot.progress()
                self._stall_at = now + STALL
            elif not self._waiting():
                # Nobody to serve: look less often while nothing changes.
                self._stall_at = now + STALL
                interval = self._pause_interval = min(2 * self._pause_interval, MAX_PAUSE)
            elif now >= self._stall_at:
                slot.stall(before)
                logger.debug("peers stalled: %s", slot.stalled)
                interval = 0.0
            if interval:
                self._pause_timer = self.loop.call_later(interval, self._pause_check)
                return
        self._resume()

    def _woken(self) -> None:
        """A peer that accepts saw us paused with fewer connections than it holds."""
        slot = self.load_slot
        assert slot is not None
        slot.woken()
        if self.paused and not self.closing and not slot.over_share(len(self.connections)):
            if self._pause_timer is not None:
                self._pause_timer.cancel()
            self._resume()

    def _resume(self) -> None:
        slot = self.load_slot
        assert slot is not None
        self._pause_timer = None
        self.paused = False
        logger.debug("resuming accept at %d connection(s)", len(self.connections))
        slot.state(LISTENING)
        task = self.loop.create_task(self._listen())
        task.add_done_callback(self._listened)

    def _waiting(self) -> bool:
        """Whether connections wait to be accepted (unknown counts as yes)."""
        return any(backlog(sock) != 0 for sock in self._sockets)

    def _listened(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # Cannot happen with sockets that listened a moment ago; should it, stopping
            # beats a worker that silently never accepts again.
            logger.error("cannot listen again: stopping this worker", exc_info=task.exception())
            self.request_stop()

    def submit(self, job: Callable[[], None]) -> None:
        assert self._pool is not None
        self._pool.submit(job)

    def to_loop(self, callback: Callable[[Any], None], arg: Any) -> None:
        """From an app thread: run ``callback(arg)`` on the loop, in call order.

        Completed responses are queued and the loop is woken once per batch instead of
        once per response (``call_soon_threadsafe`` takes a lock and allocates a handle
        each time): under load one wake-up delivers many responses.
        """
        self._from_threads.append((callback, arg))
        if not self._drain_scheduled:
            self._drain_scheduled = True
            self.loop.call_soon_threadsafe(self._drain_from_threads)

    def _drain_from_threads(self) -> None:
        self._drain_scheduled = False  # before draining: a later append schedules again
        queued = self._from_threads
        while queued:
            callback, arg = queued.popleft()
            try:
                callback(arg)
            except Exception:  # a bug in Exchange; the other responses still go out
                logger.exception("unexpected error finishing a response")

    def environ_for(self, request: Request, conn: WSGIProtocol) -> dict[str, Any]:
        base = conn.base_environ
        if base is None:
            base = conn.base_environ = self._base_for(conn)
        environ = build_environ(base, request, self.root_path)
        if (
            "HTTP_X_FORWARDED_FOR" in environ
            or "HTTP_FORWARDED" in environ
            or "HTTP_X_FORWARDED_PROTO" in environ
            or "HTTP_X_FORWARDED_HOST" in environ
        ):
            self._apply_forwarded(environ, request, conn)
        return environ

    def _apply_forwarded(
        self, environ: dict[str, Any], request: Request, conn: WSGIProtocol
    ) -> None:
        """Honour forwarding headers from a trusted peer; hide them from the app otherwise."""
        info: ClientInfo | None = None
        if conn.peer_trusted:
            # X-Forwarded-* unless only RFC 7239 Forwarded is present.
            source: Source = (
                "forwarded"
                if "HTTP_X_FORWARDED_FOR" not in environ and "HTTP_FORWARDED" in environ
                else "x-forwarded"
            )
            peer = conn.peer if isinstance(conn.peer, tuple) else None
            info = resolve(
                peer, request.headers, self.trusted, environ["wsgi.url_scheme"], source=source
            )
        if info is not None and info.proxied:
            if info.client_addr is not None:
                environ["REMOTE_ADDR"] = info.client_addr
                environ["REMOTE_PORT"] = (
                    str(info.client_port) if info.client_port is not None else ""
                )
            environ["wsgi.url_scheme"] = info.scheme
            if info.host is not None:
                environ["HTTP_HOST"] = info.host
            return
        for key in _FORWARDING_KEYS:
            environ.pop(key, None)

    def _base_for(self, conn: WSGIProtocol) -> dict[str, Any]:
        """The environ keys shared by every request on one connection."""
        sockname = conn.transport.get_extra_info("sockname")
        if isinstance(sockname, tuple):
            name, port = str(sockname[0]), str(sockname[1])
        else:
            name, port = "localhost", ""
        base = base_environ(
            server_name=name,
            server_port=port,
            script_name=self.cfg.root_path,
            multithread=self.threads > 1,
            multiprocess=self.multiprocess,
            url_scheme="https" if self.ssl is not None else "http",
        )
        peer = conn.peer
        if isinstance(peer, tuple):
            base["REMOTE_ADDR"] = peer[0]
            base["REMOTE_PORT"] = str(peer[1])
        else:
            base["REMOTE_ADDR"] = "unix"
            base["REMOTE_PORT"] = ""
        base["wsgi.file_wrapper"] = FileWrapper
        return base

    def request_finished(self, exchange: Exchange | None) -> None:
        """Count a finished request; log it, report it, recycle the worker if due.

        Only called when :attr:`observed` is set; otherwise the protocol just counts.
        """
        self.requests += 1
        if exchange is not None:
            if self.access_log and access_logger.isEnabledFor(logging.INFO):
                log_exchange(self.cfg.access_log_format, exchange)
            if self.on_request is not None:
                self.on_request(exchange)
        if self.max_requests and self.requests >= self.max_requests and not self.closing:
            logger.info("max_requests=%d reached: restarting this worker", self.max_requests)
            self.max_requests = 0
            self.on_max_requests()

    # ------------------------------------------------------------------ clock

    def _update_clock(self) -> None:
        self.now = now = self.loop.time()
        second = int(now)
        if second != self._date_second:
            self._date_second = second
            date = formatdate(usegmt=True).encode("ascii")
            self.default_block = SERVER_LINE + b"date: " + date + b"\r\n"

    async def _tick(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self._update_clock()
            now = self.now
            for conn in [c for c in self.connections if c.deadline <= now]:
                conn.on_deadline()
