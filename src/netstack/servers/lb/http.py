"""The L7 (HTTP/1.1) frontend: a reverse proxy with pooled keep-alive backend connections.

Theory of operation
-------------------
Each client connection is a :class:`ProxyConnection` around a server-role
:class:`~netstack.proto.http11.HTTPConnection`; each backend connection an
:class:`Upstream` around a client-role :class:`~netstack.proto.http11.HTTPClientConnection`.
The two protocols call each other directly (no task, no queue per request): a request head
picks a route and a backend, takes an idle pooled :class:`Upstream` (or connects one in a
task) and writes the request; body ``Data`` is written as it arrives; the response's events
are written to the client in the same callback that parsed them. Backpressure runs both
ways by pausing the other side's reading, as in the L4 relay.

One exchange at a time per client connection: events of pipelined requests wait in
``pending`` until the response before them is complete (RFC 9112 §9.3.2), like the WSGI
server's protocol.

Failures before any response byte went to the client are retried on another backend: a
connect error or timeout always; a 502/503 answer, or a connection closed before
answering, only for idempotent methods, while the request is still replayable (the body so
far is kept up to ``REPLAY_MAX_BYTES``) and the listener's retry budget allows. Each
failure and each 5xx is reported to the pool (passive health). Once the response head went
out, a backend failure aborts the client connection (the client sees a truncated message,
never a spliced one).

Timers are deadlines checked by the listener's tick, never one handle per request:
``HEADER`` (a request head must complete: 408), ``KEEPALIVE`` (idle client), ``RESPONSE``
(the backend must keep answering: 504) and ``LINGER`` (after an error reply). Pooled
backend connections expire after ``backend_idle_timeout``.

After a ``101 Switching Protocols`` from the backend both connections become a raw byte
tunnel (WebSocket and other upgrades), with half-close relayed (a TLS client cannot
half-close: the backend's EOF closes it).

The access log (``accesslog.py``) costs nothing when off: each stamp and field is behind
``self.alog``. When on, an exchange records ``perf_counter()`` stamps (first byte, head
parsed, backend picked, connection ready, response head) and how it ended (``term``);
``_finish_exchange`` logs the line, and ``connection_lost`` logs one never finished (a
client gone, a tunnel closed, an abort mid-response). Answers that no exchange carries
(403 at accept, 400 for a bad head, 408) go through ``_write_error``.

Fast paths (the proxy's CPU per request is the L7 benchmark; ``bench/l7harness.py``
and ``bench/l7cpu.py`` measure it). The request for the backend is serialised here and
handed to :meth:`~netstack.proto.http11.HTTPClientConnection.send_request_head` as one
header block, never re-split into a list, unless a route adds a header the client core
must see (Host, framing, Connection, Upgrade). A keep-alive client repeating the same
target and headers gets the block kept from its last request with a new request id
(untrusted peers; the block skips the core's checks after it passed them once). A whole
response below 500 that arrived in one read (head, body, end) goes out with one
``send_response`` and one write, its filtered headers kept per backend connection while
the backend repeats them. Anything else takes the general, event-by-event path.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import itertools
import logging
import math
import os
from collections import deque
from time import perf_counter
from typing import TYPE_CHECKING, Any, Final, cast

from netstack.config import FrontendConfig, HTTPLimits, PoolConfig, RouteConfig, parse_header_rule
from netstack.errors import LocalProtocolError, NoBackendAvailable, RemoteProtocolError
from netstack.proto.balance import Backend, Pool
from netstack.proto.forwarded import (
    FORWARDING_HEADERS,
    TrustedPeers,
    append_forwarded,
    resolve,
)
from netstack.proto.http11 import (
    END_OF_MESSAGE,
    ClientState,
    ConnectionClosed,
    Data,
    EndOfMessage,
    HTTPClientConnection,
    HTTPConnection,
    InformationalResponse,
    Request,
    Response,
    State,
)
from netstack.proto.http11.parse import connection_tokens
from netstack.proto.http11.write import reason_phrase
from netstack.proto.ratelimit import RateLimiter
from netstack.servers.lb.accesslog import REPLY_TERMS, AccessLog, access_logger
from netstack.servers.lb.relay import REPLAY_MAX_BYTES, connect_backend
from netstack.servers.lb.server import Listener
from netstack.servers.wsgi.protocol import LINGER_BYTES, LINGER_SECONDS, error_response

if TYPE_CHECKING:
    from netstack.servers.lb.server import Balancer, FrontendState

logger = logging.getLogger(__name__)

INF: Final = float("inf")
# (A module global: State.IDLE is a descriptor call in CPython 3.11.)
IDLE: Final = State.IDLE
NO_TIMER, HEADER, KEEPALIVE, RESPONSE, LINGER, BODY = range(6)
# Pipelined events parsed ahead of the exchange in progress before we stop reading.
MAX_PENDING_EVENTS: Final = 64
# Client reading paused because: the backend is not reading; connecting with the replay
# buffer full; too many pipelined events.
PAUSE_UPSTREAM, PAUSE_CONNECT, PAUSE_PENDING = 1, 2, 4
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
# RFC 9110 §7.6.1 hop-by-hop fields (plus the framing ones the cores set themselves).
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
# Added request headers that keep a route off the pre-serialised fast path.
ADD_NOT_PLAIN: Final = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection", b"upgrade"}
)
# Responses keep Content-Length: the server core frames the body by it.
RESPONSE_HOP_BY_HOP: Final = HOP_BY_HOP - {b"content-length"}
# Retries: a budget of retry_budget tokens per request, this many to start with and at most.
RETRY_FLOOR: Final = 10.0
# The upstream parser: a proxy passes bodies of any size.
PROXY_LIMITS: Final = HTTPLimits(max_body_bytes=None, max_header_bytes=64 * 1024)
CLIENT_LIMITS: Final = HTTPLimits(max_body_bytes=None)
TEXT_PLAIN: Final = (b"content-type", b"text/plain; charset=utf-8")


def _underscored(names: frozenset[bytes]) -> set[bytes]:
    """Every spelling of ``names`` with some dashes as underscores (``x_forwarded-for``):
    WSGI maps both to one key, so they would smuggle a value past a strip."""
    out: set[bytes] = set()
    for name in names:
        parts = name.split(b"-")
        for mask in range(1 << (len(parts) - 1)):
            joined = parts[0]
            for i, part in enumerate(parts[1:]):
                joined += (b"_" if mask >> i & 1 else b"-") + part
            out.add(joined)
    return out


def _ips(text: str) -> TrustedPeers | None:
    return TrustedPeers(text) if text.strip() else None


def _rules(rules: tuple[str, ...]) -> list[tuple[bytes, bytes]]:
    return [parse_header_rule(r, field="headers") for r in rules]


class Route:
    """A compiled routing rule (or a frontend's default): where and how to forward."""

    __slots__ = (
        "add_request",
        "add_request_block",
        "add_response",
        "drop_request",
        "drop_response",
        "drop_trusted",
        "drop_untrusted",
        "header",
        "header_value",
        "host",
        "plain",
        "pool",
        "pool_cfg",
        "prefix",
        "rewrite",
        "sticky",
    )

    host: bytes | None
    prefix: bytes | None
    rewrite: bytes | None
    header: bytes | None
    header_value: bytes | None

    def __init__(
        self, pool: Pool, pool_cfg: PoolConfig, fe: FrontendConfig, rc: RouteConfig | None
    ) -> None:
        self.pool = pool
        self.pool_cfg = pool_cfg
        self.sticky = pool_cfg.sticky_cookie.encode() if pool_cfg.sticky_cookie else None
        self.host = self.prefix = self.rewrite = self.header = self.header_value = None
        add_req = _rules(fe.add_request_headers)
        add_resp = _rules(fe.add_response_headers)
        drop_req = {h.lower().encode() for h in fe.remove_request_headers}
        drop_resp = {h.lower().encode() for h in fe.remove_response_headers}
        if rc is not None:
            self.host = rc.host.lower().encode() if rc.host else None
            self.prefix = rc.path_prefix.encode() if rc.path_prefix else None
            self.rewrite = rc.rewrite_prefix.encode() if rc.rewrite_prefix else None
            if rc.header:
                name, sep, value = rc.header.partition("=")
                self.header = name.strip().lower().encode()
                self.header_value = value.strip().encode() if sep else None
            add_req += _rules(rc.add_request_headers)
            add_resp += _rules(rc.add_response_headers)
            drop_req |= {h.lower().encode() for h in rc.remove_request_headers}
            drop_resp |= {h.lower().encode() for h in rc.remove_response_headers}
        # Added headers replace any of the same name.
        drop_req |= {n for n, _ in add_req}
        drop_resp |= {n for n, _ in add_resp}
        self.add_request = add_req
        self.add_response = add_resp
        self.drop_request = frozenset(drop_req)
        self.drop_response = frozenset(drop_resp | RESPONSE_HOP_BY_HOP)
        # Added headers serialised once; "plain" when none of them is one the client core
        # must see as a header (Host, framing, Connection, Upgrade): then requests take
        # the pre-serialised fast path (HTTPClientConnection.send_request_head).
        self.add_request_block = b"".join([n + b": " + v + b"\r\n" for n, v in add_req])
        self.plain = not any(n in ADD_NOT_PLAIN for n, _ in add_req)
        # Rules.__init__ sets these: its drop sets (trusted peer or not) plus drop_request.
        self.drop_trusted = self.drop_untrusted = self.drop_request

    def matches(self, host: bytes | None, path: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        if self.host is not None and (host is None or host.partition(b":")[0].lower() != self.host):
            return False
        prefix = self.prefix
        if prefix is not None and not (
            path == prefix
            or (path.startswith(prefix) and (prefix.endswith(b"/") or path[len(prefix)] == 47))
        ):
            return False
        if self.header is not None:
            values = [v for n, v in headers if n == self.header]
            if not values or (self.header_value is not None and self.header_value not in values):
                return False
        return True

    def rewrite_target(self, target: bytes) -> bytes:
        if self.rewrite is None or self.prefix is None:
            return target
        rest = target[len(self.prefix) :]
        if self.rewrite.endswith(b"/") and rest.startswith(b"/"):
            rest = rest[1:]
        out = self.rewrite + rest
        return out if out.startswith(b"/") else b"/" + out


# The key (route, request headers, target, method, Request.upgrade), then the head's
# prefix and suffix, the backend's target, the upgrade proposed, and whether a request id
# goes between prefix and suffix.
UpCache = tuple[
    Route, list[tuple[bytes, bytes]], bytes, bytes, bytes | None, bytes, bytes, bytes, bool, bool
]


class Rules:
    """Everything a frontend's requests need from its :class:`FrontendState`, compiled."""

    __slots__ = (
        "access",
        "allow",
        "default",
        "deny",
        "drop_trusted",
        "drop_untrusted",
        "request_id",
        "routes",
        "state",
        "trusted",
    )

    def __init__(self, state: FrontendState) -> None:
        fe = state.cfg
        cfg = state.config
        self.state = state
        pools = state.pools or {fe.pool: state.pool}

        def pool_cfg(name: str) -> PoolConfig:
            return cfg.pool(name) if cfg is not None else state.pool_cfg

        self.routes = [Route(pools[r.pool], pool_cfg(r.pool), fe, r) for r in fe.routes]
        self.default = Route(state.pool, state.pool_cfg, fe, None)
        self.trusted = TrustedPeers(fe.forwarded_allow_ips)
        self.allow = _ips(fe.allow_ips)
        self.deny = _ips(fe.deny_ips)
        self.request_id = fe.request_id_header.lower().encode() or None
        self.access = AccessLog(fe.access_log_format) if fe.access_log else None
        rid = {self.request_id} if self.request_id else set()
        self.drop_trusted = frozenset(HOP_BY_HOP | {b"host"})
        untrusted = FORWARDING_HEADERS | rid
        self.drop_untrusted = frozenset(HOP_BY_HOP | _underscored(untrusted) | {b"host"})
        for route in (*self.routes, self.default):
            route.drop_trusted = self.drop_trusted | route.drop_request
            route.drop_untrusted = self.drop_untrusted | route.drop_request

    def route(self, host: bytes | None, target: bytes, headers: list[tuple[bytes, bytes]]) -> Route:
        if self.routes:
            path = target.partition(b"?")[0]
            for route in self.routes:
                if route.matches(host, path, headers):
                    return route
        return self.default


def sticky_id(backend: Backend) -> bytes:
    """The cookie value naming ``backend`` (stable, reveals no address)."""
    return hashlib.blake2b(backend.name.encode(), digest_size=6).hexdigest().encode()


def cookie_value(headers: list[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The value of cookie ``name`` in the request's Cookie headers, if any."""
    for n, value in headers:
        if n == b"cookie":
            for part in value.split(b";"):
                key, sep, val = part.strip().partition(b"=")
                if sep and key == name:
                    return val.strip()
    return None


class HTTPListener(Listener):
    """An ``http`` frontend: its idle backend connections, rate limiter and tick."""

    def __init__(self, balancer: Balancer, state: FrontendState) -> None:
        super().__init__(balancer, state)
        self.idle: dict[Backend, list[Upstream]] = {}
        self.conns: set[ProxyConnection] = set()
        self.now = 0.0
        self.closing = False
        self.retry_tokens = RETRY_FLOOR
        self.requests = 0
        self.retries = 0
        self.responses: collections.Counter[int] = collections.Counter()  # by status // 100
        self.upstreams_opened = 0
        self.limiter: RateLimiter | None = None
        self._rules: Rules | None = None
        self._tick_handle: asyncio.TimerHandle | None = None
        self._id_prefix = os.urandom(4).hex().encode()
        self.id_text = self._id_prefix.decode() + "-"  # (the access log's request ids)
        self._ids = itertools.count()

    @property
    def rules(self) -> Rules:
        """The current state's compiled rules (rebuilt after a reload swapped the state)."""
        rules = self._rules
        if rules is None or rules.state is not self.state:
            rules = self._rules = Rules(self.state)
            fe = self.state.cfg
            limiter = self.limiter
            if fe.rate_limit is None:
                self.limiter = None
            elif limiter is None or (limiter.rate, limiter.burst) != (fe.rate_limit, fe.rate_burst):
                self.limiter = RateLimiter(fe.rate_limit, fe.rate_burst)
        return rules

    def make_protocol(self) -> asyncio.Protocol:
        return ProxyConnection(self)

    async def start(self) -> None:
        await super().start()
        _ = self.rules  # fail early on bad rules
        loop = asyncio.get_running_loop()
        self.now = loop.time()
        self._tick_handle = loop.call_later(self.tick_interval(), self._tick)

    def tick_interval(self) -> float:
        t = self.balancer.cfg.timeouts
        values = [t.header_timeout, t.keepalive_timeout, t.body_timeout]
        for p in self.balancer.cfg.pools:
            values += [p.timeouts.request_timeout, p.timeouts.backend_idle_timeout]
        active = [v for v in values if v is not None]
        return min(1.0, max(0.02, min(active, default=4.0) / 4))

    def next_request_id(self) -> bytes:
        return b"%s-%x" % (self._id_prefix, next(self._ids))

    def allow_retry(self) -> bool:
        """Spend one retry from the budget (retry_budget per request, RETRY_FLOOR at most)."""
        if self.retry_tokens >= 1.0:
            self.retry_tokens -= 1.0
            self.retries += 1
            return True
        return False

    def count_request(self) -> None:
        self.requests += 1
        budget = self.balancer.cfg.limits.retry_budget
        tokens = self.retry_tokens + budget
        # At most the floor plus the budget's share of the requests in flight now.
        cap = RETRY_FLOOR + budget * len(self.conns)
        self.retry_tokens = tokens if tokens < cap else cap

    # ------------------------------------------------------------------ backend pool

    def take_idle(self, backend: Backend) -> Upstream | None:
        idle = self.idle.get(backend)
        while idle:
            up = idle.pop()
            if not up.transport.is_closing():
                return up
        return None

    def park(self, up: Upstream, now: float) -> None:
        """Keep a reusable backend connection for the next request, or close it."""
        up.client = None
        idle = self.idle.get(up.backend)
        if idle is None:
            idle = self.idle[up.backend] = []
        limit = self.balancer.cfg.limits.max_idle_backend_connections
        if self.closing or len(idle) >= limit or up.transport.is_closing():
            up.transport.close()
            return
        if up.read_paused:
            up.read_paused = False
            up.transport.resume_reading()
        up.idle_since = now
        idle.append(up)

    def drop_idle(self, backend: Backend) -> None:
        """Close every idle connection to ``backend``."""
        for up in self.idle.pop(backend, ()):
            up.transport.close()

    def forget_idle(self, up: Upstream) -> None:
        idle = self.idle.get(up.backend)
        if idle and up in idle:
            idle.remove(up)

    # ------------------------------------------------------------------ tick

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = self.now = loop.time()
        for conn in list(self.conns):
            if conn.deadline <= now:
                conn.on_deadline(now)
        timeouts = {p.name: p.timeouts.backend_idle_timeout for p in self.balancer.cfg.pools}
        expiry = min(timeouts.values(), default=4.0)
        for backend, idle in list(self.idle.items()):
            while idle and idle[0].idle_since + expiry <= now:
                idle.pop(0).transport.close()
            if not idle:
                del self.idle[backend]
        limiter = self.limiter
        if limiter is not None and len(limiter) > 10_000:
            limiter.prune(now)
        if self.closing and not self.conns:
            self._tick_handle = None
            return
        self._tick_handle = loop.call_later(self.tick_interval(), self._tick)

    def close(self) -> None:
        """Stop accepting; idle connections close now, busy ones after their response."""
        super().close()
        self.closing = True
        for idle in self.idle.values():
            for up in idle:
                up.transport.close()
        self.idle.clear()
        for conn in list(self.conns):
            conn.shutdown()


class Upstream(asyncio.Protocol):
    """One connection to a backend: parses responses for the client it serves."""

    __slots__ = (
        "backend",
        "client",
        "conn",
        "fresh",
        "head_cache",
        "idle_since",
        "listener",
        "read_paused",
        "transport",
        "tunnel",
    )

    transport: asyncio.Transport

    def __init__(self, listener: HTTPListener, backend: Backend) -> None:
        self.listener = listener
        self.backend = backend
        self.client: ProxyConnection | None = None
        self.conn = HTTPClientConnection(PROXY_LIMITS)
        self.fresh = True  # no request sent on it yet
        # (route, response headers, them filtered for the route): see _respond.
        self.head_cache: tuple[Route, list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]] | None
        self.head_cache = None
        self.idle_since = 0.0
        self.read_paused = False
        self.tunnel = False

    def itself(self) -> Upstream:
        return self

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        high = self.listener.balancer.cfg.limits.relay_buffer_bytes
        self.transport.set_write_buffer_limits(high=high, low=high // 4)
        self.listener.upstreams_opened += 1

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None:  # idle: the backend has nothing to say; it is closing or broken
            self.transport.close()
            return
        client.rx = True
        client.up_rx = True
        if self.tunnel:
            client.sent += len(data)
            client.transport.write(data)
            return
        conn = self.conn
        try:
            conn.receive_data(data)
        except RemoteProtocolError as exc:
            client.upstream_failed(self, f"malformed response: {exc}", exc)
            return
        events = conn.events_received()
        if events:
            client.upstream_events(self, events)

    def eof_received(self) -> bool:
        client = self.client
        if client is None:
            return False
        if self.tunnel:
            client.tunnel_eof(upstream=True)
            return True
        try:
            self.conn.receive_eof()
        except RemoteProtocolError:
            client.upstream_closed(self, "closed before the response was complete")
            return False
        events = self.conn.events_received()
        if events:
            client.upstream_events(self, events)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        client = self.client
        if client is None:
            self.listener.forget_idle(self)
            return
        client.upstream_closed(self, f"closed before answering ({exc or 'eof'})")

    def pause_writing(self) -> None:
        client = self.client
        if client is not None:
            client.pause(PAUSE_UPSTREAM)

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.resume(PAUSE_UPSTREAM)

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))


class ProxyConnection(asyncio.Protocol):
    """One client connection of an ``http`` frontend."""

    # Slots: more than 30 attributes would cost CPython 3.11 its shared-key instance
    # dicts (and their specialised attribute access) on the hot path.
    __slots__ = (
        "_fwd_cache",
        "_peer",
        "_up_cache",
        "_up_cache_checked",
        "alog",
        "attempts",
        "backend",
        "balancer",
        "body_done",
        "body_end",
        "body_open",
        "body_rx",
        "busy",
        "client_ip",
        "closed",
        "conn",
        "connect_task",
        "deadline",
        "discarding",
        "fwd_trusted",
        "head_sent",
        "kept",
        "kept_bytes",
        "lingered",
        "lingering",
        "listener",
        "log_backend",
        "log_client",
        "pauses",
        "pending",
        "proxy_buffer",
        "request",
        "request_sent",
        "retry_ok",
        "reused",
        "rid",
        "route",
        "rx",
        "scheme",
        "sent",
        "set_cookie",
        "silent",
        "state",
        "status",
        "streamed",
        "t0",
        "t_end",
        "t_head",
        "t_start",
        "t_try",
        "t_up",
        "term",
        "timer",
        "transport",
        "tried",
        "tunnel",
        "tunnel_eofs",
        "up_block",
        "up_checked",
        "up_request",
        "up_rx",
        "up_switch",
        "up_target",
        "upstream",
    )

    transport: asyncio.Transport

    def __init__(self, listener: HTTPListener) -> None:
        # Per-exchange flags, reset by _after_exchange. (Instance attributes, not class
        # defaults: CPython 3.11 does not specialise reading a class attribute through
        # an instance, and these are read several times per request.)
        self.busy = False  # an exchange is in progress (request routed, response not done)
        self.body_open = False  # the current request's body is still arriving
        self.body_done = False  # the whole request body was received (end kept in body_end)
        self.discarding = False  # dropping the rest of a body already answered
        self.head_sent = False  # the response head went to the client
        self.request_sent = False  # the request went to the current upstream
        self.streamed = False  # body bytes were sent and dropped from kept: no replay
        self.retry_ok = False  # idempotent method: 502/503 and early closes may be retried
        self.reused = False  # the current upstream came from the idle pool
        self.up_rx = False
        self.body_rx = False  # request body bytes arrived since the last BODY check
        self.tunnel = False
        self.tunnel_eofs = 0
        self.listener = listener
        self.balancer = listener.balancer
        self.state: FrontendState = listener.state
        self.conn = HTTPConnection(CLIENT_LIMITS)
        self.closed = False
        self.rx = False
        self.silent = 0
        self.pauses = 0
        self.timer = NO_TIMER
        self.deadline = INF
        self.lingering = False
        self.lingered = 0
        self.pending: deque[Any] = deque()
        self.client_ip: str = ""
        self.fwd_trusted = False
        self.proxy_buffer: bytes | None = None
        self._peer: Any = None
        # Per Host: this hop's forwarding headers for an untrusted client, and serialised.
        self._fwd_cache: tuple[bytes | None, list[tuple[bytes, bytes]], bytes] | None = None
        # The last fast-path request head (see _upstream_request), and whether the
        # client core accepted it once (then its checks are skipped: up_checked).
        self._up_cache: UpCache | None = None
        self._up_cache_checked = False
        self.up_checked = False
        # The exchange in progress.
        self.request: Request | None = None
        # The request for the backend: a Request (general path), or a target and a
        # serialised header block (fast path; up_switch: it proposes an upgrade).
        self.up_request: Request | None = None
        self.up_block: bytes | None = None
        self.up_target = b""
        self.up_switch = False
        self.route: Route | None = None
        self.backend: Backend | None = None
        self.upstream: Upstream | None = None
        self.connect_task: asyncio.Task[None] | None = None
        self.kept: list[Data] = []
        self.kept_bytes = 0
        self.body_end: EndOfMessage | None = None
        self.tried: set[Backend] = set()
        self.set_cookie: bytes | None = None
        self.scheme = "http"
        # The access log (None: off) and what it records of the exchange; the times are
        # perf_counter() stamps, 0.0 for a phase not reached. See accesslog.py.
        self.alog: AccessLog | None = None
        self.sent: int = 0  # bytes written to the client in this exchange
        self.status: int = 0
        self.term: str = ""
        self.rid: bytes | int | None = None
        self.attempts: int = 0
        self.log_backend: Backend | None = None
        self.log_client: str | None = None  # "ip:port", made once per client
        self.t0: float = 0.0
        self.t_start: float = 0.0
        self.t_try: float = 0.0
        self.t_up: float = 0.0
        self.t_head: float = 0.0
        self.t_end: float = 0.0

    # ------------------------------------------------------------------ asyncio (client)

    @property
    def peer(self) -> Any:
        if self._peer is None:
            self._peer = self.transport.get_extra_info("peername")
        return self._peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        listener = self.listener
        rules = listener.rules
        access = rules.access
        if access is not None and access_logger.isEnabledFor(logging.INFO):
            self.alog = access
        if transport.get_extra_info("sslcontext") is not None:
            self.scheme = "https"
        peer = self.peer
        self._set_client(peer[0] if isinstance(peer, tuple) else "")
        if not self.balancer.admit(self):
            self.closed = True
            self._write_error(503, "too many connections, try again", "max_connections")
            self.transport.close()
            return
        listener.conns.add(self)
        high = self.balancer.cfg.limits.relay_buffer_bytes
        self.transport.set_write_buffer_limits(high=high, low=high // 4)
        trusted = self.state.trusted
        if trusted is not None and trusted.contains(self.client_ip):
            self.proxy_buffer = b""
        elif not self._allowed(rules):
            return
        self._arm(HEADER, self.balancer.cfg.timeouts.header_timeout)

    def _set_client(self, ip: str) -> None:
        self.client_ip = ip
        self.log_client = None
        self.fwd_trusted = self.listener.rules.trusted.contains(ip)
        self._fwd_cache = None
        self._up_cache = None

    def _allowed(self, rules: Rules) -> bool:
        ip = self.client_ip
        if (rules.allow is not None and not rules.allow.contains(ip)) or (
            rules.deny is not None and rules.deny.contains(ip)
        ):
            self._write_error(403, "forbidden", "forbidden")
            self.conn.close()
            self._close_lingering()
            return False
        return True

    def data_received(self, data: bytes) -> None:
        self.rx = True
        if self.tunnel:
            up = self.upstream
            if up is not None:
                up.transport.write(data)
            return
        if self.lingering:
            self.lingered += len(data)
            if self.lingered > LINGER_BYTES:
                self.abort()
            return
        if self.proxy_buffer is not None:
            data = self._proxy_header(data)
            if not data:
                return
        if self.alog is not None and not self.t0:
            self.t0 = perf_counter()  # the first byte of a request
        conn = self.conn
        try:
            conn.receive_data(data)
        except RemoteProtocolError as exc:
            self._reject(exc)
            return
        events = conn.events_received()
        if events:
            self._handle(events)
        elif self.timer == KEEPALIVE:
            self._arm(HEADER, self.balancer.cfg.timeouts.header_timeout)

    def _proxy_header(self, data: bytes) -> bytes:
        from netstack.proto import proxy_protocol

        assert self.proxy_buffer is not None
        try:
            header, rest = proxy_protocol.receive(self.proxy_buffer, data)
        except RemoteProtocolError as exc:
            self.proxy_buffer = None
            logger.warning("! %s: %s; closing", self.peer, exc)
            self.abort()
            return b""
        if header is None:
            self.proxy_buffer = rest
            return b""
        self.proxy_buffer = None
        if header.source is not None:
            self._set_client(header.source[0])
        if not self._allowed(self.listener.rules):
            return b""
        return rest

    def eof_received(self) -> bool:
        if self.tunnel:
            self.tunnel_eof(upstream=False)
            return True
        if self.lingering:
            return False
        try:
            self.conn.receive_eof()
        except RemoteProtocolError:
            # The client left mid-request: nobody is waiting for an answer.
            self._close()
            return False
        self._handle(self.conn.events_received())
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.alog is not None and self.t_start:  # an exchange never finished
            self._log(self.term or ("upgraded" if self.tunnel else "client_aborted"))
        self.listener.conns.discard(self)
        task = self.connect_task
        if task is not None and not task.done():
            task.cancel()
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.client = None
            up.transport.close()  # mid-exchange: the backend connection is not reusable
        self._release_backend()
        self.balancer.forget(self)

    def pause_writing(self) -> None:
        up = self.upstream
        if up is not None and not up.read_paused:
            up.read_paused = True
            up.transport.pause_reading()

    def resume_writing(self) -> None:
        up = self.upstream
        if up is not None and up.read_paused:
            up.read_paused = False
            up.transport.resume_reading()

    def pause(self, reason: int) -> None:
        if not self.pauses and not self.closed:
            self.transport.pause_reading()
        self.pauses |= reason

    def resume(self, reason: int) -> None:
        if self.pauses & reason:
            self.pauses &= ~reason
            if not self.pauses and not self.closed:
                self.transport.resume_reading()

    # ------------------------------------------------------------------ client events

    def _handle(self, events: list[Any]) -> None:
        for event in events:
            kind = type(event)
            if self.body_open:
                if kind is Data:
                    if not self.discarding:
                        self._body_data(event)
                    continue
                if kind is EndOfMessage:
                    self.body_open = False
                    if self.discarding:
                        self.discarding = False
                        if not self.busy:
                            self._after_exchange()
                    else:
                        self._body_end(event)
                    continue
            if kind is EndOfMessage and not self.pending:
                continue  # the end of the body-less request just started
            if self.busy or self.pending:
                self.pending.append(event)
                if len(self.pending) > MAX_PENDING_EVENTS:
                    self.pause(PAUSE_PENDING)
                continue
            if kind is Request:
                self._start(event)
            elif kind is ConnectionClosed:
                self._close()

    def _start(self, request: Request) -> None:
        listener = self.listener
        self.timer = NO_TIMER
        self.deadline = INF
        self.busy = True
        self.request = request
        self.body_open = bool(request.chunked or request.content_length)
        if self.body_open:
            self.body_rx = False
            self._arm(BODY, self.balancer.cfg.timeouts.body_timeout)
        listener.count_request()
        rules = listener.rules
        self.state = rules.state
        if self.alog is not None:
            self.t_start = now = perf_counter()
            if not self.t0:
                self.t0 = now
        limiter = listener.limiter
        if limiter is not None:
            now = asyncio.get_running_loop().time()
            key = self.client_ip
            if self.fwd_trusted:  # behind a trusted proxy: limit its clients, not it
                info = resolve((key, 0), request.headers, rules.trusted, "http")
                key = info.client_addr or key
            if not limiter.allow(key, now):
                wait = math.ceil(limiter.retry_after(key)) or 1
                self.balancer._warn("rate_limit", "rate limit: 429 to %s", key)
                self.reply(429, "rate limit exceeded", [(b"retry-after", b"%d" % wait)])
                return
        if request.method == b"CONNECT":
            allow = [(b"allow", b"GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH")]
            self.reply(405, "CONNECT is not supported", allow, close=True)
            return
        headers = request.headers
        host = None
        for name, value in headers:
            if name == b"host":
                host = value
                break
        route = rules.route(host, request.target, headers) if rules.routes else rules.default
        self.route = route
        try:
            self._upstream_request(request, route, rules, host)
        except LocalProtocolError as exc:
            self.reply(400, f"cannot forward this request: {exc}", close=True)
            return
        self.retry_ok = request.method in IDEMPOTENT
        self._dispatch()

    def _upstream_request(
        self, request: Request, route: Route, rules: Rules, host: bytes | None
    ) -> None:
        """Build the request for the backend: hop-by-hop and (from an untrusted peer)
        forwarding headers out; Host first, then the others in order, the request id,
        this hop's forwarding headers, the route's added headers and any Upgrade.

        On the fast path (a plain route, an untrusted peer) the serialised head is kept
        for the next request of this connection with the same target and headers
        (the usual case for a keep-alive client): only a new request id goes in.
        """
        headers = request.headers
        rid_name = rules.request_id
        cache = self._up_cache
        if (
            cache is not None
            and cache[0] is route
            and cache[2] == request.target
            and cache[3] == request.method
            and cache[4] == request.upgrade
            and cache[1] == headers
        ):
            prefix, suffix, self.up_target, self.up_switch, needs_rid = cache[5:]
            self.up_checked = self._up_cache_checked
        else:
            self.up_checked = False
            trusted = self.fwd_trusted
            drop = route.drop_trusted if trusted else route.drop_untrusted
            rid: bytes | None = None
            extra_tokens: set[bytes] | None = None
            upgrade: bytes | None = None
            out = []
            for name, value in headers:
                if name in drop:
                    if name == b"connection":
                        tokens = connection_tokens(value) - {b"close", b"keep-alive", b"upgrade"}
                        if tokens:
                            extra_tokens = (extra_tokens or set()) | tokens
                    elif name == b"upgrade":
                        upgrade = value
                    continue
                if name == rid_name:
                    rid = value
                out.append((name, value))
            if extra_tokens:
                out = [(n, v) for n, v in out if n not in extra_tokens]
            needs_rid = rid_name is not None and rid is None
            host_text = host.decode("latin-1") if host is not None else None
            self.rid = rid
            if trusted:
                if needs_rid:
                    assert rid_name is not None
                    self.rid = rid = self.listener.next_request_id()
                    out.append((rid_name, rid))
                    needs_rid = False
                out = append_forwarded(out, self.client_ip or None, self.scheme, host_text)
                fwd: list[tuple[bytes, bytes]] = []
                fwd_block = b""
            else:
                fwd_cache = self._fwd_cache
                if fwd_cache is None or fwd_cache[0] != host:
                    fwd = append_forwarded([], self.client_ip or None, self.scheme, host_text)
                    block = b"".join([n + b": " + v + b"\r\n" for n, v in fwd])
                    fwd_cache = self._fwd_cache = (host, fwd, block)
                fwd, fwd_block = fwd_cache[1], fwd_cache[2]
            if host is None:  # HTTP/1.0 without Host: name the address the client reached
                sockname = self.transport.get_extra_info("sockname")
                host = b"%s:%d" % (str(sockname[0]).encode(), sockname[1])
            switch = request.upgrade is not None and upgrade is not None
            target = request.target
            if route.rewrite is not None:
                target = route.rewrite_target(target)
            if not route.plain:
                if needs_rid:
                    assert rid_name is not None
                    self.rid = rid = self.listener.next_request_id()
                    out.append((rid_name, rid))
                out += fwd
                out += route.add_request
                out.insert(0, (b"host", host))
                if switch:
                    assert upgrade is not None
                    out += [(b"connection", b"upgrade"), (b"upgrade", upgrade)]
                self.up_request = Request(
                    request.method,
                    target,
                    out,
                    keep_alive=True,
                    upgrade=request.upgrade,
                    chunked=request.chunked,
                    content_length=request.content_length if not request.chunked else None,
                )
                return
            prefix = b"".join([n + b": " + v + b"\r\n" for n, v in out])
            prefix = b"host: " + host + b"\r\n" + prefix
            suffix = fwd_block + route.add_request_block
            if switch:
                assert upgrade is not None
                suffix += b"connection: upgrade\r\nupgrade: " + upgrade + b"\r\n"
            self.up_target = target
            self.up_switch = switch
            if not trusted:
                key = (route, headers, request.target, request.method, request.upgrade)
                self._up_cache = (*key, prefix, suffix, target, switch, needs_rid)
                self._up_cache_checked = False
        if needs_rid:
            assert rid_name is not None
            listener = self.listener  # (next_request_id, inline)
            self.rid = n = next(listener._ids)  # (the access log formats it)
            rid_line = b"%s: %s-%x\r\n" % (rid_name, listener._id_prefix, n)
            self.up_block = prefix + rid_line + suffix
        else:
            self.up_block = prefix + suffix

    # ------------------------------------------------------------------ backends

    def _pick(self, route: Route) -> Backend:
        pool = route.pool
        now = self.listener.now
        request = self.request
        assert request is not None
        self.set_cookie = None
        if route.sticky is not None:
            wanted = cookie_value(request.headers, route.sticky)
            if wanted is not None:
                for b in pool.backends:
                    if b.eligible and b not in self.tried and sticky_id(b) == wanted:
                        # Pool.acquire's bookkeeping, for a backend the cookie chose.
                        b.active += 1
                        b.total += 1
                        return b
            backend = pool.acquire(now, exclude=self.tried)
            self.set_cookie = (
                route.sticky + b"=" + sticky_id(backend) + b"; Path=/; HttpOnly; SameSite=Lax"
            )
            return backend
        if pool.algorithm != "consistent_hash":
            return pool.acquire(now, exclude=self.tried)
        kind, _, arg = route.pool_cfg.hash_key.partition(":")
        key: str = self.client_ip
        if kind == "header":
            name = arg.lower().encode()
            key = next((v.decode("latin-1") for n, v in request.headers if n == name), "")
        elif kind == "cookie":
            value = cookie_value(request.headers, arg.encode())
            key = value.decode("latin-1") if value is not None else self.client_ip
        return pool.acquire(now, key=key, exclude=self.tried)

    def _dispatch(self) -> None:
        """Send the request to a backend: an idle pooled connection, else a new one."""
        route = self.route
        assert route is not None
        pool = route.pool
        try:
            if route.sticky is None and pool.algorithm != "consistent_hash":
                self.set_cookie = None  # (_pick's common case, inline)
                backend = pool.acquire(self.listener.now, exclude=self.tried)
            else:
                backend = self._pick(route)
        except NoBackendAvailable as exc:
            self.balancer.no_backend(self, exc)
            wake = pool.next_wakeup
            wait = 1 if wake is None else max(1, math.ceil(wake - self.listener.now))
            message = "no backend could answer" if self.tried else "no backend available"
            self.reply(503, message, [(b"retry-after", b"%d" % wait)], close=self.body_open)
            return
        self.tried.add(backend)
        self.backend = backend
        if self.alog is not None:
            self.t_try = perf_counter()
            self.t_up = 0.0
            self.attempts += 1
            self.log_backend = backend
        idle = self.listener.idle.get(backend)  # (take_idle, inline)
        while idle:
            up = idle.pop()
            if not up.transport.is_closing():
                self._attach(up)
                return
        if self.kept_bytes >= REPLAY_MAX_BYTES:
            self.pause(PAUSE_CONNECT)
        self.connect_task = asyncio.get_running_loop().create_task(self._connect(backend))

    async def _connect(self, backend: Backend) -> None:
        try:
            await self._connect_once(backend)
        except Exception:
            logger.exception("! http proxy for %s: internal error; closing", self.peer)
            self.abort()

    async def _connect_once(self, backend: Backend) -> None:
        route = self.route
        assert route is not None
        up = Upstream(self.listener, backend)
        reason = await connect_backend(up.itself, backend, route.pool_cfg.timeouts.connect_timeout)
        if reason is None:
            self.connect_task = None
            if self.closed or self.backend is not backend:
                self.listener.park(up, self.listener.now)
                return
            route.pool.report_success(backend)
            self._attach(up)
            return
        self.connect_task = None
        if getattr(up, "transport", None) is not None:
            up.transport.close()
        if self.closed or self.backend is not backend:
            return
        self._release_backend()
        self.balancer.backend_failed(route.pool, backend, reason, self)
        self._dispatch()  # connect failures are always retried, on the next backend

    def _attach(self, up: Upstream) -> None:
        """Write the request (and the body so far) on ``up``."""
        route = self.route
        assert route is not None
        up.client = self
        self.upstream = up
        self.up_rx = False
        self.reused = not up.fresh
        if self.alog is not None:
            self.t_up = perf_counter()
        if self.pauses:
            self.resume(PAUSE_CONNECT)
        conn = up.conn
        request = self.request
        assert request is not None
        block = self.up_block
        bodyless = not request.chunked and not request.content_length
        try:
            if block is not None:
                conn.send_request_head(
                    request.method,
                    self.up_target,
                    block,
                    content_length=request.content_length,
                    chunked=request.chunked,
                    upgrade=self.up_switch,
                    end=bodyless,
                    checked=self.up_checked,
                )
                if self._up_cache is not None:
                    # (The block came from the cache, or made it: the core accepted it.)
                    self._up_cache_checked = True
            else:
                assert self.up_request is not None
                conn.send(self.up_request)
            if block is None or not bodyless:
                for data in self.kept:
                    conn.send(data)
                if not self.body_open:  # no body, or all of it arrived while connecting
                    conn.send(self.body_end or END_OF_MESSAGE)
        except LocalProtocolError as exc:  # e.g. a header rule our writer refuses
            self.upstream = None
            up.client = None
            up.transport.close()
            self.reply(400, f"cannot forward this request: {exc}", close=True)
            return
        out = conn.data_to_send()  # (up.flush, inline)
        up.transport.write(out[0] if len(out) == 1 else b"".join(out))
        up.fresh = False
        self.request_sent = True
        if self.kept_bytes > REPLAY_MAX_BYTES:
            self.kept = []
            self.streamed = True
        if not self.body_open:  # (_arm_response, inline)
            self.up_rx = False
            timeout = route.pool_cfg.timeouts.request_timeout
            self.timer = RESPONSE
            self.deadline = INF if timeout is None else self.listener.now + timeout

    def _arm_response(self) -> None:
        route = self.route
        assert route is not None
        self.up_rx = False
        self._arm(RESPONSE, route.pool_cfg.timeouts.request_timeout)

    def _body_data(self, event: Data) -> None:
        self.body_rx = True
        if not self.streamed:
            self.kept.append(event)
            self.kept_bytes += len(event.data)
        up = self.upstream
        if up is None or not self.request_sent:
            if self.kept_bytes >= REPLAY_MAX_BYTES:
                self.pause(PAUSE_CONNECT)  # connecting: hold at most about this much
            return
        if not self.streamed and self.kept_bytes > REPLAY_MAX_BYTES:
            self.kept = []
            self.streamed = True
        if up.conn.our_state is not ClientState.SEND_BODY:
            return  # the backend answered early and will not read on
        up.conn.send(event)
        up.flush()

    def _body_end(self, event: EndOfMessage) -> None:
        self.body_done = True
        self.body_end = event
        up = self.upstream
        if up is None or not self.request_sent:
            return
        if up.conn.our_state is ClientState.SEND_BODY:
            up.conn.send(event)
            up.flush()
        if self.busy and not self.head_sent:
            self._arm_response()
        if not self.busy:
            self._after_exchange()

    # ------------------------------------------------------------------ backend events

    def upstream_events(self, up: Upstream, events: list[Any]) -> None:
        if up is not self.upstream:
            return
        if len(events) == 3 and events[2] is END_OF_MESSAGE and not self.head_sent:
            # The commonest answer: a whole small response in one read.
            response, data = events[0], events[1]
            if (
                type(response) is Response
                and type(data) is Data
                and response.status_code < 500
                and response.reason == reason_phrase(response.status_code)
            ):
                self._respond(up, response, data.data)
                return
        conn = self.conn
        for event in events:
            kind = type(event)
            if kind is Data:
                conn.send(event)
            elif kind is Response:
                if not self._response_head(up, event):
                    return
            elif kind is EndOfMessage:
                self._response_end(up, event)
                return
            elif kind is InformationalResponse:
                if event.status_code == 101:
                    self._switch(up, event)
                    return
                # 100 Continue, 103 Early Hints: passed on (not to HTTP/1.0 clients).
                drop = self.route.drop_response if self.route is not None else HOP_BY_HOP
                info = [(n, v) for n, v in event.headers if n not in drop]
                conn.send(InformationalResponse(event.status_code, info, event.reason))
        self.flush()

    def _response_head(self, up: Upstream, response: Response) -> bool:
        """Forward a response head; false when the exchange went elsewhere (retry, 502)."""
        backend = self.backend
        route = self.route
        assert backend is not None
        assert route is not None
        status = response.status_code
        if status >= 500:
            self.balancer.backend_failed(route.pool, backend, f"status {status}", self)
            if (
                (status == 502 or status == 503)
                and self.retry_ok
                and not self.streamed
                and len(self.tried) < len(route.pool.backends)
                and self.listener.allow_retry()
            ):
                self._drop_upstream(up)
                self._release_backend()
                self._retry()
                return False
        else:
            route.pool.report_success(backend)
        drop = route.drop_response
        headers = [(n, v) for n, v in response.headers if n not in drop]
        headers += route.add_response
        if self.set_cookie is not None:
            headers.append((b"set-cookie", self.set_cookie))
        if self.listener.closing:
            headers.append((b"connection", b"close"))
        try:
            self.conn.send_head(status, headers, b"", response.reason)
        except LocalProtocolError as exc:
            self.upstream_failed(up, f"cannot forward the response: {exc}", None)
            return False
        self.head_sent = True
        self.status = status
        if self.alog is not None:
            self.t_head = perf_counter()
        self.listener.responses[status // 100] += 1
        self._arm_response()
        return True

    def _respond(self, up: Upstream, response: Response, body: bytes) -> None:
        """Forward a whole response (head, body, end) below 500: _response_head and
        _response_end in one, with one write."""
        backend = self.backend
        route = self.route
        assert backend is not None
        assert route is not None
        route.pool.report_success(backend)
        listener = self.listener
        # The backend's last header list, filtered for this route: a server sends the
        # same headers again and again (but for Date, once a second).
        received = response.headers
        cache = up.head_cache
        if (
            cache is not None
            and cache[0] is route
            and (cache[1] is received or cache[1] == received)
        ):
            headers = cache[2]
        else:
            drop = route.drop_response
            headers = [(n, v) for n, v in received if n not in drop]
            if route.add_response:
                headers += route.add_response
            up.head_cache = (route, received, headers)
        if self.set_cookie is not None or listener.closing:
            headers = headers.copy()
            if self.set_cookie is not None:
                headers.append((b"set-cookie", self.set_cookie))
            if listener.closing:
                headers.append((b"connection", b"close"))
        status = response.status_code
        conn = self.conn
        try:
            conn.send_response(status, headers, body)  # (the standard reason phrase)
        except LocalProtocolError as exc:
            self.upstream_failed(up, f"cannot forward the response: {exc}", None)
            return
        self.head_sent = True
        self.status = status
        if self.alog is not None:
            self.t_head = perf_counter()
        listener.responses[status // 100] += 1
        out = conn.data_to_send()  # (flush, inline)
        data = out[0] if len(out) == 1 else b"".join(out)
        self.sent += len(data)
        if not self.closed:
            self.transport.write(data)
        self.upstream = None
        if up.conn.reusable:
            listener.park(up, listener.now)
        else:
            up.client = None
            up.transport.close()
        self._finish_exchange()

    def _response_end(self, up: Upstream, event: EndOfMessage) -> None:
        self.conn.send(event)
        self.flush()
        self.upstream = None
        if up.conn.reusable:
            self.listener.park(up, self.listener.now)
        else:
            up.client = None
            up.transport.close()
        self._finish_exchange()

    def _switch(self, up: Upstream, event: InformationalResponse) -> None:
        """101 from the backend: tunnel raw bytes both ways from now on."""
        route = self.route
        assert route is not None
        headers = [(n, v) for n, v in event.headers if n not in route.drop_response]
        upgrade = next((v for n, v in event.headers if n == b"upgrade"), None)
        headers.append((b"connection", b"upgrade"))
        if upgrade is not None:
            headers.append((b"upgrade", upgrade))
        try:
            self.conn.send(InformationalResponse(101, headers, event.reason))
        except LocalProtocolError as exc:
            self.upstream_failed(up, f"cannot switch protocols: {exc}", None)
            return
        self.head_sent = True
        self.status = 101
        if self.alog is not None:
            self.t_head = perf_counter()
        self.flush()
        self.tunnel = up.tunnel = True
        self.timer = NO_TIMER
        self.deadline = INF
        rest = up.conn.switched_protocol_data()
        if rest:
            self.sent += len(rest)
            self.transport.write(rest)
        early = self.conn.switched_protocol_data()
        if early:
            up.transport.write(early)
        self.resume(PAUSE_PENDING | PAUSE_CONNECT)

    def tunnel_eof(self, *, upstream: bool) -> None:
        other = self.transport if upstream else (self.upstream.transport if self.upstream else None)
        if other is not None and not other.is_closing():
            if not other.can_write_eof():  # a TLS client: no half-close, so close
                self._close()
                return
            other.write_eof()
        self.tunnel_eofs += 1
        if self.tunnel_eofs >= 2:
            self._close()

    def upstream_failed(self, up: Upstream, reason: str, exc: RemoteProtocolError | None) -> None:
        """The backend broke the protocol (or we cannot forward its answer)."""
        if up is not self.upstream:
            return
        backend = self.backend
        route = self.route
        assert backend is not None
        assert route is not None
        self._drop_upstream(up)
        self._release_backend()
        self.balancer.backend_failed(route.pool, backend, reason, self)
        logger.warning("! backend %s/%s: %s", route.pool.name, backend.name, reason)
        self.term = "bad_response"
        if self.head_sent:
            self.abort()
            return
        self.reply(502, "bad response from the backend", close=self.body_open)

    def upstream_closed(self, up: Upstream, reason: str) -> None:
        """The backend connection closed (or reset) before the response was complete."""
        if up is not self.upstream:
            return
        self._drop_upstream(up)
        if self.tunnel:
            self._close()
            return
        backend = self.backend
        route = self.route
        assert backend is not None
        assert route is not None
        self._release_backend()
        if self.head_sent:
            self.balancer.backend_failed(route.pool, backend, "closed mid-response", self)
            self.term = "backend_aborted"
            self.abort()
            return
        if self.reused and not self.up_rx and self.retry_ok and not self.streamed:
            # A pooled connection the backend had already closed (its keep-alive timeout
            # raced our reuse): not a backend failure. Its other idle ones likely went the
            # same way; retry on a fresh connection, outside the retry budget.
            self.listener.drop_idle(backend)
            self.tried.discard(backend)
            self.reused = False
            self._retry()
            return
        self.balancer.backend_failed(route.pool, backend, reason, self)
        if (
            self.retry_ok
            and not self.streamed
            and len(self.tried) < len(route.pool.backends)
            and self.listener.allow_retry()
        ):
            self._retry()
            return
        self.term = "backend_closed"
        self.reply(502, "the backend closed the connection", close=self.body_open)

    def _retry(self) -> None:
        self.request_sent = False
        self.timer = NO_TIMER
        self.deadline = INF
        self._dispatch()

    def _drop_upstream(self, up: Upstream) -> None:
        self.upstream = None
        up.client = None
        up.transport.close()

    def _release_backend(self) -> None:
        backend = self.backend
        if backend is not None:
            self.backend = None
            route = self.route
            if route is not None:
                route.pool.release(backend)

    # ------------------------------------------------------------------ replies

    def reply(
        self,
        status: int,
        message: str,
        headers: list[tuple[bytes, bytes]] | None = None,
        *,
        close: bool = False,
    ) -> None:
        """Answer the current request ourselves with a small text body."""
        body = b"%d %s: %s\n" % (status, reason_phrase(status), message.encode())
        out = [TEXT_PLAIN, (b"content-length", b"%d" % len(body)), *(headers or [])]
        if close or self.listener.closing:
            out.append((b"connection", b"close"))
        try:
            self.conn.send_response(status, out, body)
        except LocalProtocolError:  # the response had started: nothing sane to add
            self.conn.close()
            self.abort()
            return
        self.head_sent = True
        self.status = status
        if not self.term:
            self.term = REPLY_TERMS.get(status, "proxy")
        self.listener.responses[status // 100] += 1
        self.flush()
        self._finish_exchange()

    def _reject(self, exc: RemoteProtocolError) -> None:
        """A malformed request or a limit: an error reply (unless a response is under way),
        then a lingering close. The request never reaches a backend."""
        logger.warning("%s: %s", self.peer, exc)
        if self.busy and self.head_sent:
            self.term = "bad_request"
            self.abort()
            return
        task = self.connect_task
        if task is not None and not task.done():
            task.cancel()
        if self.upstream is not None:
            self._drop_upstream(self.upstream)
        self._release_backend()
        self._write_error(exc.status_hint, str(exc), "bad_request")
        self._close_lingering()

    # ------------------------------------------------------------------ exchange end

    def _finish_exchange(self) -> None:
        if self.alog is not None:
            self._log(self.term or "ok")
        self.busy = False
        backend = self.backend
        if backend is not None:  # (_release_backend, inline: every exchange ends here)
            self.backend = None
            route = self.route
            if route is not None:
                route.pool.release(backend)
        if self.body_open and not self.discarding:
            self.discarding = True  # answered before the body ended: drop the rest
            self.kept = []
            self.body_rx = False
            self._arm(BODY, self.balancer.cfg.timeouts.body_timeout)
        self._after_exchange()

    def _after_exchange(self) -> None:
        listener = self.listener
        if self.body_open:
            if listener.closing:
                self._close_lingering()
                return
            self.resume(PAUSE_CONNECT | PAUSE_UPSTREAM)
            return  # wait for the body's end, then go on
        # Reset the exchange's fields.
        self.request = None
        self.up_request = None
        self.up_block = None
        self.route = None
        self.upstream = None
        if self.kept:
            self.kept = []
        self.kept_bytes = 0
        self.body_end = None
        self.tried.clear()
        self.set_cookie = None
        self.body_done = False
        self.head_sent = False
        self.request_sent = False
        self.streamed = False
        conn = self.conn
        if conn.our_state is not IDLE or self.closed:
            self._close()
            return
        pending = self.pending
        if listener.closing and not pending:
            self._close()
            return
        more = conn.events_received()  # requests held behind a refused upgrade
        if more:
            pending.extend(more)
        timeout = self.balancer.cfg.timeouts.keepalive_timeout
        self.timer = KEEPALIVE
        self.deadline = INF if timeout is None else listener.now + timeout
        if pending:
            events = list(pending)
            pending.clear()
            self.resume(PAUSE_PENDING)
            self._handle(events)

    # ------------------------------------------------------------------ output, closing

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out and not self.closed:
            data = out[0] if len(out) == 1 else b"".join(out)
            self.sent += len(data)
            self.transport.write(data)

    def _write_error(self, status: int, message: str, term: str) -> None:
        """Write a complete error reply that no exchange carries (and log it)."""
        data = error_response(status, message)
        self.transport.write(data)
        if self.alog is not None:
            self.sent += len(data)
            self.status = status
            self._log(term)

    def _log(self, term: str) -> None:
        """The access log line of the exchange (or rejection) just ended, then a reset."""
        alog = self.alog
        assert alog is not None
        self.term = term
        alog.log(self)
        self.t0 = self.t_start = self.t_try = self.t_up = self.t_head = 0.0
        self.sent = self.status = self.attempts = 0
        self.term = ""
        self.rid = None
        self.log_backend = None

    def _arm(self, kind: int, timeout: float | None) -> None:
        self.timer = kind
        self.deadline = INF if timeout is None else self.listener.now + timeout

    def on_deadline(self, now: float) -> None:
        kind = self.timer
        if kind == RESPONSE:
            route = self.route
            timeout = route.pool_cfg.timeouts.request_timeout if route else None
            up = self.upstream
            if self.up_rx or up is None or up.read_paused:
                self.up_rx = False  # still answering (or the client is not reading)
                self.deadline = INF if timeout is None else now + timeout
                return
            self._backend_timeout()
            return
        if kind == BODY:
            timeout = self.balancer.cfg.timeouts.body_timeout
            if not self.body_open:
                self.timer = NO_TIMER  # the body ended; the next timer was armed, or none
                self.deadline = INF
            elif self.body_rx or self.pauses:  # arriving, or we are the ones not reading
                self.body_rx = False
                self.deadline = INF if timeout is None else now + timeout
            else:
                self._body_stalled()
            return
        self.timer = NO_TIMER
        self.deadline = INF
        if kind == HEADER:
            if not self.busy:
                logger.debug("x %s: request head not complete in time", self.peer)
                self._write_error(408, "request head not received in time", "header_timeout")
                self.conn.close()
                self._close_lingering()
        elif kind in (KEEPALIVE, LINGER):
            self._close()

    def _body_stalled(self) -> None:
        """The client stopped sending its request body: 408 (unless answered), then close."""
        logger.debug("x %s: request body stalled", self.peer)
        self.timer = NO_TIMER
        self.deadline = INF
        up = self.upstream
        if up is not None:
            self._drop_upstream(up)  # it waits for the rest of the body: not reusable
        task = self.connect_task
        if task is not None and not task.done():
            task.cancel()
        self._release_backend()
        if self.busy and not self.head_sent:
            self._write_error(408, "request body not received in time", "body_timeout")
        elif self.busy:
            self.term = "body_timeout"
            self.abort()  # a response is under way and cannot be finished
            return
        self.conn.close()
        self._close()

    def _backend_timeout(self) -> None:
        up = self.upstream
        backend = self.backend
        route = self.route
        assert up is not None
        assert backend is not None
        assert route is not None
        self._drop_upstream(up)
        self._release_backend()
        self.balancer.backend_failed(route.pool, backend, "response timeout", self)
        self.term = "backend_timeout"
        if self.head_sent:
            self.abort()
            return
        self.reply(504, "the backend did not answer in time", close=self.body_open)

    def shutdown(self) -> None:
        """Graceful close: idle connections close now, busy ones after their response."""
        if not self.busy and not self.tunnel:  # (maybe discarding an answered body)
            self._close()

    def _close_lingering(self) -> None:
        transport = self.transport
        if self.closed or self.lingering:
            return
        if not transport.can_write_eof():  # TLS: no half-close, so no lingering either
            self._close()
            return
        self.lingering = True
        transport.write_eof()
        self.pauses = 0
        transport.resume_reading()
        self._arm(LINGER, LINGER_SECONDS)

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()
            up = self.upstream
            if up is not None and self.tunnel:
                up.transport.close()

    def close(self) -> None:
        self._close()

    def abort(self) -> None:
        self.closed = True
        self.transport.abort()
        up = self.upstream
        if up is not None:
            up.transport.abort()


__all__ = ["HTTPListener", "ProxyConnection", "Route", "Rules", "Upstream"]
