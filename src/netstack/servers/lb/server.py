"""The balancer: frontends (listeners), pools, health checkers, reload and shutdown.

``Balancer`` has the ``asyncio.Server`` shape (start, serve_forever, close, wait_closed,
``async with``) plus :meth:`Balancer.reload`. New connections read their frontend's
current :class:`FrontendState`; a reload swaps the states, so established connections
finish on the pools and timeouts they started with. A listener whose address and protocol
survive a reload keeps its socket (no connection is refused during the swap); backends that
keep their pool, name and address keep their health state and counters.

Modes: ``tcp`` (``relay.py``) and ``udp`` (``udp.py``). ``http`` plugs in through
:data:`FRONTEND_FACTORIES` once the HTTP/1.1 core exists.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from netstack.config import (
    BackendConfig,
    BalancerConfig,
    FrontendConfig,
    PoolConfig,
    parse_hostport,
)
from netstack.errors import ConfigError, NoBackendAvailable
from netstack.proto.balance import Admin, Backend, BackendEvent, Pool
from netstack.proto.forwarded import TrustedPeers
from netstack.servers.lb.accesslog import AccessLog
from netstack.servers.lb.health import HealthCheck, HealthChecker, check_for
from netstack.servers.lb.relay import ClientConnection
from netstack.servers.lb.tls import TLSAcceptor
from netstack.servers.lb.udp import UDPFrontend
from netstack.transport.listener import Lifecycle, format_address
from netstack.transport.tls import frontend_context

logger = logging.getLogger(__name__)

# At most one WARNING per second per kind under a flood of refusals.
WARN_INTERVAL = 1.0
IDLE_TICKS = 4


@dataclass
class BalancerStats:
    """Counters for logs, tests and (later) the metrics endpoint."""

    accepted: int = 0
    refused: int = 0  # over max_connections or shutting down
    no_backend: int = 0  # connections/sessions refused: no backend eligible
    backend_failures: int = 0  # connect errors/timeouts, early closes (each one failed over)
    idle_closed: int = 0
    reloads: int = 0
    tls_handshakes: int = 0
    tls_handshake_failures: int = 0  # failed, timed out or closed before completing
    state_changes: collections.Counter[tuple[str, str, str]] = field(
        default_factory=collections.Counter
    )  # (pool, backend, new state) -> count


class Connection(Protocol):
    """What the balancer tracks per client connection (the L4 relay; later L7 too)."""

    state: FrontendState
    rx: bool  # data moved since the last idle sweep; the sweep clears it
    silent: int  # sweeps in a row without data

    @property
    def peer(self) -> Any: ...

    def close(self) -> None: ...

    def abort(self) -> None: ...


@dataclass(frozen=True)
class FrontendState:
    """What a frontend's new connections use; replaced as a whole on reload.

    Attributes:
        trusted: peers whose PROXY header is read (``None``: accept_proxy is off).
        send_proxy: PROXY protocol version sent to backends (0: none).
        tls_context: the TLS context new connections get (``None``: plaintext); a reload loads
            the certificate files again into a new one.
    """

    balancer: Balancer
    cfg: FrontendConfig
    pool: Pool
    pool_cfg: PoolConfig
    trusted: TrustedPeers | None = None
    send_proxy: int = 0
    # Every pool of this config generation by name, for L7 routes (cfg.routes[i].pool).
    pools: Mapping[str, Pool] = field(default_factory=dict)
    config: BalancerConfig | None = None
    tls_context: ssl.SSLContext | None = None

    @classmethod
    def make(
        cls,
        balancer: Balancer,
        cfg: FrontendConfig,
        pools: Mapping[str, Pool],
        config: BalancerConfig,
        context: ssl.SSLContext | None = None,
    ) -> FrontendState:
        pool_cfg = config.pool(cfg.pool)
        trusted = TrustedPeers(cfg.proxy_allow_ips) if cfg.accept_proxy else None
        send = {"none": 0, "v1": 1, "v2": 2}[pool_cfg.send_proxy]
        return cls(balancer, cfg, pools[cfg.pool], pool_cfg, trusted, send, pools, config, context)


class Listener:
    """One bound frontend (a TCP server or a UDP endpoint) and its current state."""

    def __init__(self, balancer: Balancer, state: FrontendState) -> None:
        self.balancer = balancer
        self.state = state
        self.proto = "udp" if state.cfg.mode == "udp" else "tcp"
        self.server: asyncio.Server | None = None
        self.udp: UDPFrontend | None = None

    @property
    def key(self) -> tuple[str, str]:
        return listener_key(self.state.cfg)

    def make_protocol(self) -> asyncio.Protocol:
        """A protocol for one accepted connection (L7 overrides this)."""
        return ClientConnection(self.state)

    def accept(self) -> asyncio.Protocol:
        """The protocol factory: through a TLS handshake first on a TLS frontend."""
        context = self.state.tls_context
        if context is not None:
            return TLSAcceptor(self, context)
        return self.make_protocol()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = parse_hostport(self.state.cfg.listen, field="listen")
        if self.proto == "udp":
            frontend = UDPFrontend(self)
            await loop.create_datagram_endpoint(lambda: frontend, local_addr=(host, port))
            self.udp = frontend
        else:
            self.server = await loop.create_server(
                self.accept,
                host,
                port,
                backlog=self.balancer.cfg.limits.listen_backlog,
                reuse_address=True,
            )

    @property
    def sockets(self) -> list[socket.socket]:
        if self.server is not None:
            return list(self.server.sockets)
        if self.udp is not None and self.udp.transport is not None:
            sock = self.udp.transport.get_extra_info("socket")
            return [sock] if sock is not None else []
        return []

    def close(self) -> None:
        """Stop accepting; established connections carry on."""
        if self.server is not None:
            self.server.close()
        if self.udp is not None:
            self.udp.close()


def listener_key(fe: FrontendConfig) -> tuple[str, str]:
    """What a reload matches listeners by: protocol and address, plus the frontend's name
    for port 0 (each such frontend gets its own port, kept across reloads)."""
    proto = "udp" if fe.mode == "udp" else "tcp"
    if fe.listen.endswith(":0"):
        return (proto, f"{fe.listen}#{fe.name}")
    return (proto, fe.listen)


FrontendFactory = Callable[["Balancer", FrontendState], Listener]
# mode -> listener factory; L7 adds "http" here.
FRONTEND_FACTORIES: dict[str, FrontendFactory] = {"tcp": Listener, "udp": Listener}


class Balancer(Lifecycle):
    """A load balancer serving a :class:`BalancerConfig`.

    Args:
        cfg: frontends, pools, limits, timeouts.
        check_factory: picks each pool's active health check (default: TCP connect for
            pools with TCP frontends, none for UDP-only pools).

    Raises:
        ConfigError: a frontend uses a mode this build cannot serve yet.
    """

    def __init__(
        self,
        cfg: BalancerConfig,
        *,
        check_factory: Callable[[PoolConfig, set[str]], HealthCheck | None] = check_for,
    ) -> None:
        _check_modes(cfg)
        self._contexts = tls_contexts(cfg)
        super().__init__()  # stop event and close task: serve_forever, close, async with
        self.cfg = cfg
        self.check_factory = check_factory
        self.stats = BalancerStats()
        self.connections: set[Connection] = set()
        self.listeners: dict[tuple[str, str], Listener] = {}
        self.pools: dict[str, Pool] = {}
        self.checkers: dict[str, HealthChecker] = {}
        self._checker_tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._all_closed = asyncio.Event()
        self._sweeper: asyncio.TimerHandle | None = None
        self._tick = 0.0
        self._last_warn: dict[str, float] = {}
        self._reload_lock = asyncio.Lock()
        self.handshakes: set[asyncio.Task[None]] = set()  # TLS handshakes in progress

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bind every frontend and start the health checkers.

        Raises:
            OSError: a frontend address cannot be bound (nothing is left bound).
        """
        pools = self._build_pools(self.cfg, {})
        listeners = await self._bind(self.cfg, pools, {}, self._contexts)
        self.pools = pools
        self.listeners = listeners
        self._start_checkers(self.cfg)
        self._schedule_sweep()
        for listener in self.listeners.values():
            for sock in listener.sockets:
                logger.info(
                    "listening on %s %s (frontend %s -> pool %s)",
                    scheme(listener.state.cfg),
                    format_address(sock.getsockname()),
                    listener.state.cfg.name,
                    listener.state.cfg.pool,
                )

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return tuple(sock for listener in self.listeners.values() for sock in listener.sockets)

    @property
    def addresses(  # type: ignore[override]  # named by frontend and protocol, not bare pairs
        self,
    ) -> list[tuple[str, str, tuple[str, int]]]:
        """``(frontend name, proto, (host, port))`` per bound socket; ports read back."""
        out = []
        for listener in self.listeners.values():
            for sock in listener.sockets:
                out.append((listener.state.cfg.name, listener.proto, sock.getsockname()[:2]))
        return out

    def address(self, frontend: str = "default") -> tuple[str, int]:
        """The first bound ``(host, port)`` of a frontend."""
        return next(a for name, _, a in self.addresses if name == frontend)

    async def _shutdown(self) -> None:
        self._closing = True
        for listener in self.listeners.values():
            listener.close()
        for task in list(self.handshakes):
            task.cancel()
        await self._stop_checkers()
        if self._sweeper is not None:
            self._sweeper.cancel()
        if not self.connections:
            self._all_closed.set()
        drain = self.cfg.timeouts.drain_timeout
        logger.info("draining %d connection(s) for up to %.1fs", len(self.connections), drain)
        try:
            async with asyncio.timeout(drain):
                await self._all_closed.wait()
        except TimeoutError:
            logger.warning(
                "drain_timeout=%.1fs expired: aborting %d connection(s)",
                drain,
                len(self.connections),
            )
            for conn in list(self.connections):
                conn.abort()
            await self._all_closed.wait()
        for listener in self.listeners.values():
            if listener.server is not None:
                await listener.server.wait_closed()
        logger.info("balancer closed")

    # ------------------------------------------------------------------ reload

    async def reload(self, cfg: BalancerConfig) -> None:
        """Serve ``cfg`` from now on; established connections finish on the old config.

        Raises:
            ConfigError: ``cfg`` uses a mode this build cannot serve.
            OSError: a new frontend address cannot be bound; the old config keeps running.
        """
        _check_modes(cfg)
        contexts = tls_contexts(cfg)  # certificates read again: renewed files apply now
        async with self._reload_lock:
            old_backends = {
                (pool.name, b.name, b.host, b.port): b
                for pool in self.pools.values()
                for b in pool.backends
            }
            pools = self._build_pools(cfg, old_backends)
            listeners = await self._bind(cfg, pools, self.listeners, contexts)
            for key, listener in self.listeners.items():
                if key not in listeners:
                    listener.close()
            await self._stop_checkers()
            self.cfg = cfg
            self.pools = pools
            self.listeners = listeners
            self._start_checkers(cfg)
            self.stats.reloads += 1
            logger.info(
                "reloaded: %d frontend(s), %d pool(s); %d connection(s) finish on the old config",
                len(cfg.frontends),
                len(cfg.pools),
                len(self.connections),
            )

    def _build_pools(
        self, cfg: BalancerConfig, old: dict[tuple[str, str, str, int], Backend]
    ) -> dict[str, Pool]:
        pools = {}
        for pc in cfg.pools:
            backends = []
            for bc in pc.backends:
                fresh = Backend.from_config(bc)
                kept = old.get((pc.name, fresh.name, fresh.host, fresh.port))
                if kept is not None:
                    kept.weight = fresh.weight
                    backends.append(kept)
                else:
                    backends.append(fresh)
            pools[pc.name] = Pool(
                pc.name,
                backends,
                algorithm=pc.algorithm,
                health=pc.health,
                hash_balance=pc.hash_balance,
            )
        return pools

    async def _bind(
        self,
        cfg: BalancerConfig,
        pools: dict[str, Pool],
        current: dict[tuple[str, str], Listener],
        contexts: Mapping[str, ssl.SSLContext],
    ) -> dict[tuple[str, str], Listener]:
        """Listeners for ``cfg``: reuse bound ones by (proto, address), bind the rest.

        All or nothing: when one bind fails, those bound here are closed again.
        """
        out: dict[tuple[str, str], Listener] = {}
        started: list[Listener] = []
        try:
            for fe in cfg.frontends:
                state = FrontendState.make(self, fe, pools, cfg, contexts.get(fe.name))
                listener = current.get(listener_key(fe))
                if listener is not None and type(listener) is not FRONTEND_FACTORIES[fe.mode]:
                    # tcp <-> http on the same address: the socket cannot be shared between
                    # the two kinds of listener; rebind (refusals possible for a moment).
                    listener.close()
                    listener = None
                if listener is not None:
                    listener.state = state
                else:
                    listener = FRONTEND_FACTORIES[fe.mode](self, state)
                    await listener.start()
                    started.append(listener)
                out[listener.key] = listener
        except BaseException:
            for listener in started:
                listener.close()
            raise
        return out

    # ------------------------------------------------------------------ health

    def _start_checkers(self, cfg: BalancerConfig) -> None:
        loop = asyncio.get_running_loop()
        modes: dict[str, set[str]] = collections.defaultdict(set)
        for fe in cfg.frontends:
            modes[fe.pool].add(fe.mode)
            for route in fe.routes:
                modes[route.pool].add(fe.mode)
        self.checkers = {}
        for pc in cfg.pools:
            checker = HealthChecker(
                self.pools[pc.name],
                pc,
                self.check_factory(pc, modes[pc.name]),
                self.report_events,
            )
            self.checkers[pc.name] = checker
            self._checker_tasks.append(loop.create_task(checker.run()))

    async def _stop_checkers(self) -> None:
        tasks, self._checker_tasks = self._checker_tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def report_events(self, pool: Pool) -> None:
        """Log each of the pool's state changes once and count it."""
        for event in pool.events_received():
            self.stats.state_changes[(event.pool, event.backend, event.new)] += 1
            _log_event(event)

    def backend_failed(
        self, pool: Pool, backend: Backend, reason: str, conn: Connection | None
    ) -> None:
        """Real traffic to ``backend`` failed (passive health); the caller fails over."""
        self.stats.backend_failures += 1
        pool.report_failure(backend, asyncio.get_running_loop().time(), reason)
        logger.debug(
            "! backend %s/%s failed for %s: %s",
            pool.name,
            backend.name,
            conn.peer if conn is not None else "udp",
            reason,
        )
        self.report_events(pool)
        checker = self.checkers.get(pool.name)
        if checker is not None and checker.pool is pool and pool.next_wakeup is not None:
            checker.poke()

    # ------------------------------------------------------------------ connections

    def admit(self, conn: Connection) -> bool:
        """Admit a new client connection, or refuse it (shutting down, max_connections)."""
        if self._closing:
            self.stats.refused += 1
            return False
        limit = self.cfg.limits.max_connections
        if len(self.connections) >= limit:
            self.stats.refused += 1
            self._warn(
                "max_connections",
                "refusing connection from %s: max_connections=%d reached",
                conn.peer,
                limit,
            )
            return False
        self.stats.accepted += 1
        self.connections.add(conn)
        return True

    def forget(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if self._closing and not self.connections:
            self._all_closed.set()

    def no_backend(self, conn: Connection | None, exc: NoBackendAvailable) -> None:
        self.stats.no_backend += 1
        peer = conn.peer if conn is not None else "a udp client"
        self._warn("no_backend", "refusing %s: %s", peer, exc)

    def _warn(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warn.get(kind, float("-inf")) >= WARN_INTERVAL:
            self._last_warn[kind] = now
            logger.warning(msg, *args)

    def _schedule_sweep(self) -> None:
        # One sweep for every relay, IDLE_TICKS per shortest idle_timeout: a relay silent
        # both ways closes after between its timeout and timeout + one tick.
        active = [p.timeouts.idle_timeout for p in self.cfg.pools if p.timeouts.idle_timeout]
        if not active:
            self._sweeper = None
            return
        self._tick = min(active) / IDLE_TICKS
        self._sweeper = asyncio.get_running_loop().call_later(self._tick, self._sweep)

    def _sweep(self) -> None:
        tick = self._tick
        for conn in list(self.connections):
            if conn.rx:
                conn.rx = False
                conn.silent = 0
                continue
            conn.silent += 1
            timeout = conn.state.pool_cfg.timeouts.idle_timeout
            if timeout is not None and conn.silent * tick >= timeout:
                self.stats.idle_closed += 1
                logger.debug("x relay from %s idle for %.1fs; closing", conn.peer, timeout)
                conn.close()
        self._schedule_sweep()

    # ------------------------------------------------------------------ admin operations
    # For the admin API. A reload rebuilds pools from the config, so backends added here
    # last until the next reload (the file stays the source of truth).

    def set_admin(self, pool: str, backend: str, admin: Admin) -> None:
        """Enable, drain or disable a backend. Disabling also closes its relays.

        Raises:
            KeyError: no such pool or backend.
        """
        p = self.pools[pool]
        b = p.get(backend)
        p.set_admin(b, admin, asyncio.get_running_loop().time())
        self.report_events(p)
        if admin is Admin.DISABLED:
            for conn in list(self.connections):
                if getattr(conn, "backend", None) is b:
                    conn.close()

    def add_backend(self, pool: str, cfg: BackendConfig) -> Backend:
        """Add a backend to a pool (new connections may use it at once).

        Raises:
            KeyError: no such pool.
            ValueError: a backend of that name exists.
        """
        backend = Backend.from_config(cfg)
        self.pools[pool].add(backend)
        logger.info("backend %s/%s added (%s:%d)", pool, backend.name, backend.host, backend.port)
        return backend

    def remove_backend(self, pool: str, backend: str) -> None:
        """Remove a backend; its established relays finish.

        Raises:
            KeyError: no such pool or backend.
            ValueError: it is the pool's last backend.
        """
        self.pools[pool].remove(backend)
        logger.info("backend %s/%s removed", pool, backend)

    def metrics(self) -> str:
        """Prometheus text exposition of the counters (see :func:`metrics_text`)."""
        return metrics_text(self)

    def snapshot(self) -> dict[str, Any]:
        """Backends with state and counters, for the admin API and tests."""
        return {
            name: [
                {
                    "name": b.name,
                    "address": f"{b.host}:{b.port}",
                    "state": b.state.value,
                    "admin": b.admin.value,
                    "active": b.active,
                    "total": b.total,
                    "failures": b.failures,
                    "ejections": b.ejections,
                }
                for b in pool.backends
            ]
            for name, pool in self.pools.items()
        }


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metrics_text(balancer: Balancer) -> str:
    """The balancer's counters in the Prometheus text exposition format (version 0.0.4).

    The admin endpoint serves this; it reads counters only, so it is cheap to scrape.
    """
    st = balancer.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: Sequence[tuple[str, float]]) -> None:
        lines.append(f"# HELP netstack_lb_{name} {help_}")
        lines.append(f"# TYPE netstack_lb_{name} {kind}")
        for labels, value in samples:
            lines.append(f"netstack_lb_{name}{labels} {value:g}")

    metric(
        "connections_accepted_total", "counter", "Client connections admitted.", [("", st.accepted)]
    )
    metric(
        "connections_refused_total",
        "counter",
        "Client connections refused (max_connections, shutting down).",
        [("", st.refused)],
    )
    metric(
        "connections_active", "gauge", "Client connections open.", [("", len(balancer.connections))]
    )
    metric(
        "no_backend_total",
        "counter",
        "Connections or sessions with no backend available.",
        [("", st.no_backend)],
    )
    metric(
        "backend_failures_total",
        "counter",
        "Connect errors, timeouts and early closes (each one failed over).",
        [("", st.backend_failures)],
    )
    metric("idle_closed_total", "counter", "Relays closed by idle_timeout.", [("", st.idle_closed)])
    metric("reloads_total", "counter", "Successful config reloads.", [("", st.reloads)])
    metric(
        "tls_handshakes_total",
        "counter",
        "TLS handshakes completed on TLS frontends.",
        [("", st.tls_handshakes)],
    )
    metric(
        "tls_handshake_failures_total",
        "counter",
        "TLS handshakes that failed, timed out or were abandoned.",
        [("", st.tls_handshake_failures)],
    )
    udp = [lst.udp for lst in balancer.listeners.values() if lst.udp is not None]
    metric(
        "udp_sessions",
        "gauge",
        "UDP client sessions open.",
        [("", sum(len(u.sessions) for u in udp))],
    )
    for name, kind, help_, samples in http_metrics(balancer):
        metric(name, kind, help_, samples)
    per_backend: dict[str, list[tuple[str, float]]] = collections.defaultdict(list)
    for pool in balancer.pools.values():
        for b in pool.backends:
            labels = f'{{pool="{_label(pool.name)}",backend="{_label(b.name)}"}}'
            per_backend["backend_up"].append((labels, 1 if b.eligible else 0))
            per_backend["backend_active"].append((labels, b.active))
            per_backend["backend_connections_total"].append((labels, b.total))
            per_backend["backend_failed_total"].append((labels, b.failures))
            per_backend["backend_ejections_total"].append((labels, b.ejections))
    helps = {
        "backend_up": ("gauge", "1 if the backend takes new connections (up and enabled)."),
        "backend_active": ("gauge", "Connections in progress to the backend."),
        "backend_connections_total": ("counter", "Connections sent to the backend."),
        "backend_failed_total": ("counter", "Passive failures of the backend."),
        "backend_ejections_total": ("counter", "Times the backend was ejected."),
    }
    for name, (kind, help_) in helps.items():
        metric(name, kind, help_, per_backend[name])
    changes = [
        (f'{{pool="{_label(p)}",backend="{_label(b)}",state="{_label(n)}"}}', count)
        for (p, b, n), count in sorted(st.state_changes.items())
    ]
    metric(
        "backend_state_changes_total",
        "counter",
        "Backend health/admin changes, by new state.",
        changes,
    )
    return "\n".join(lines) + "\n"


def http_metrics(balancer: Balancer) -> list[tuple[str, str, str, list[tuple[str, float]]]]:
    """The L7 listeners' counters (none without http frontends)."""
    http = [lst for lst in balancer.listeners.values() if hasattr(lst, "responses")]
    if not http:
        return []
    by_class: collections.Counter[int] = collections.Counter()
    for lst in http:
        by_class.update(lst.responses)
    return [
        (
            "http_requests_total",
            "counter",
            "HTTP requests received by http frontends.",
            [("", sum(lst.requests for lst in http))],  # type: ignore[attr-defined]
        ),
        (
            "http_retries_total",
            "counter",
            "HTTP requests retried on another backend (under the retry budget).",
            [("", sum(lst.retries for lst in http))],  # type: ignore[attr-defined]
        ),
        (
            "http_responses_total",
            "counter",
            "HTTP responses sent, by status class.",
            [(f'{{code="{c}xx"}}', n) for c, n in sorted(by_class.items())],
        ),
    ]


def _check_modes(cfg: BalancerConfig) -> None:
    for fe in cfg.frontends:
        if fe.mode not in FRONTEND_FACTORIES:
            raise ConfigError(
                f"frontend {fe.name!r}: mode {fe.mode!r} is not yet available "
                "(L7 comes with the HTTP/1.1 core); use tcp or udp",
                field="mode",
            )
        for name in ("proxy_allow_ips", "forwarded_allow_ips", "allow_ips", "deny_ips"):
            try:
                TrustedPeers(getattr(fe, name))
            except ConfigError as exc:
                raise ConfigError(f"frontend {fe.name!r}: {name}: {exc}", field=name) from None
        if fe.mode == "http" and fe.access_log:
            try:
                AccessLog(fe.access_log_format)
            except ConfigError as exc:
                raise ConfigError(f"frontend {fe.name!r}: {exc}", field=exc.field) from None


def tls_contexts(cfg: BalancerConfig) -> dict[str, ssl.SSLContext]:
    """Each TLS frontend's context by frontend name, its files read now.

    Raises:
        ConfigError: naming the frontend, the setting and the file.
    """
    out = {}
    for fe in cfg.frontends:
        tls = fe.tls
        if tls.certfile is None or tls.keyfile is None:
            continue
        try:
            out[fe.name] = frontend_context(
                tls.certfile,
                tls.keyfile,
                ca_certs=tls.ca_certs,
                alpn=("http/1.1",) if fe.mode == "http" else (),
            )
        except ConfigError as exc:
            raise ConfigError(f"frontend {fe.name!r}: {exc}", field=exc.field) from None
    return out


def scheme(fe: FrontendConfig) -> str:
    """What a frontend speaks, for "listening on" lines: tcp, udp, http, https or tls."""
    if fe.mode == "http":
        return "https" if fe.tls.enabled else "http"
    if fe.tls.enabled:
        return "tls"
    return fe.mode


def _log_event(event: BackendEvent) -> None:
    level = logging.INFO if event.new in ("up", "enabled") else logging.WARNING
    logger.log(
        level,
        "backend %s/%s %s -> %s (%s)",
        event.pool,
        event.backend,
        event.old,
        event.new,
        event.reason,
    )


__all__ = [
    "FRONTEND_FACTORIES",
    "Balancer",
    "BalancerStats",
    "Connection",
    "FrontendState",
    "Listener",
    "listener_key",
    "scheme",
    "tls_contexts",
]
