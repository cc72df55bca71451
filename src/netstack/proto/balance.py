"""Load-balancing algorithms and backend health, sans-I/O: time is always an argument.

Theory of operation
-------------------

A :class:`Pool` holds :class:`Backend` objects and picks one per new connection (or
request) with one of six algorithms (``config.Algorithm``):

* ``round_robin``: the eligible backends in turn, weights ignored;
* ``weighted_round_robin``: nginx's *smooth* weighted round robin: each pick adds every
  backend's weight to its ``current`` score, takes the highest and subtracts the total
  from it, which spreads a heavy backend's turns out (5,1,1 gives a a b a c a a);
* ``least_connections``: the lowest ``(active + 1) / weight``; ties go round robin;
* ``power_of_two``: two distinct random eligible backends, the less loaded one wins
  (Mitzenmacher's "power of two choices"); the random source is injectable;
* ``consistent_hash``: a ring of virtual nodes hashed from the backend names; a key (client
  IP, a header or cookie value: the caller chooses) walks clockwise to the first eligible
  backend whose load is under ``ceil(c * (total + 1) / n)``: Google's "consistent hashing
  with bounded loads" (Mirrokni, Thorup, Zadimoghaddam 2016), ``c`` = ``hash_balance``;
* ``random``: weighted random.

Health
------

Each backend has a health :class:`State` and an administrative :class:`Admin` state. It is
*eligible* for new connections iff ``state is UP and admin is ENABLED``.

::

    UP --fall failed checks--> DOWN --rise passed checks--> UP (slow start)
    UP --max_fails consecutive failures--> EJECTED --ejection period over--> UP (slow start)
    EJECTED --fall failed checks--> DOWN

* Active checks (:meth:`Pool.report_check`) count consecutive passes and failures.
* Passive results (:meth:`Pool.report_failure` / :meth:`Pool.report_success`) come from
  real traffic; ``max_fails`` consecutive failures eject a backend for ``ejection_time *
  2**streak`` seconds (capped at ``max_ejection_time``). The streak goes back to 0 once a
  backend has stayed in service as long as its last ejection lasted.
* A backend that comes back (to UP from DOWN or EJECTED) ramps its weight linearly from
  ``SLOW_START_FLOOR`` to full over ``slow_start`` seconds (weight-aware algorithms only).
* ``Admin.DRAINING``: no new connections, established ones finish. ``Admin.DISABLED``: no
  new connections; the server may also close established ones.

Every change of a backend's ``state`` or ``admin`` queues one :class:`BackendEvent`, drained
with :meth:`Pool.events_received`, so the server logs each change once and counts it.

Invariants: ``active >= 0``; ``ejected_until`` is set iff ``state is EJECTED``; the cached
eligible list equals ``[b for b in backends if b.eligible]`` whenever a pick reads it.
"""

from __future__ import annotations

import bisect
import enum
import hashlib
import math
import random
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Final, Protocol

from netstack.config import Algorithm, BackendConfig, HealthConfig, parse_hostport
from netstack.errors import NoBackendAvailable

# Virtual nodes per unit of weight on the consistent-hash ring; ketama uses 160 per server
# (40 hashes x 4 points). 100 keeps the load spread within a few percent for small pools.
VNODES: Final = 100
# A recovering backend starts at this fraction of its weight, so it gets *some* traffic.
SLOW_START_FLOOR: Final = 0.05


class State(enum.Enum):
    """Health of a backend."""

    UP = "up"
    DOWN = "down"  # failed `fall` active checks in a row
    EJECTED = "ejected"  # passive: too many consecutive failures, out for a period


class Admin(enum.Enum):
    """Administrative state, set by an operator."""

    ENABLED = "enabled"
    DRAINING = "draining"  # no new connections; established ones finish
    DISABLED = "disabled"  # no new connections


@dataclass(frozen=True, slots=True)
class BackendEvent:
    """A backend's health or admin state changed.

    Attributes:
        pool: pool name.
        backend: backend name.
        old: previous value: a :class:`State` value (``up``, ``down``, ``ejected``) for a
            health change, an :class:`Admin` value (``enabled``, ``draining``, ``disabled``)
            for an admin change.
        new: the new value, of the same kind as ``old``.
        reason: why, for the log line.
        at: the ``now`` passed with the input that caused it.
    """

    pool: str
    backend: str
    old: str
    new: str
    reason: str
    at: float


class RandomSource(Protocol):
    """What ``power_of_two`` and ``random`` need; ``random.Random`` fits."""

    def random(self) -> float: ...

    def randrange(self, stop: int, /) -> int: ...


def hash_key(key: str) -> int:
    """A stable 64-bit hash (Python's ``hash`` of a str changes between processes)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")


class Backend:
    """One backend server and its counters. Mutated only through its :class:`Pool`.

    Attributes:
        name: label in logs and metrics.
        host: address.
        port: port.
        weight: configured weight.
        state: health state.
        admin: administrative state.
        active: connections in progress (acquired, not yet released).
        total: connections ever acquired.
        failures: passive failures ever reported.
        ejections: times ejected.
    """

    __slots__ = (
        "_current",
        "_fails",
        "_falls",
        "_rises",
        "_streak",
        "active",
        "admin",
        "ejected_until",
        "ejections",
        "failures",
        "host",
        "last_ejection",
        "name",
        "port",
        "ramp_from",
        "ramp_until",
        "returned_at",
        "state",
        "total",
        "weight",
    )

    def __init__(self, name: str, host: str, port: int, weight: int = 1) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.weight = weight
        self.state = State.UP
        self.admin = Admin.ENABLED
        self.active = 0
        self.total = 0
        self.failures = 0
        self.ejections = 0
        self.ejected_until: float | None = None
        self.last_ejection = 0.0  # length of the last ejection period
        self.returned_at = 0.0  # when it last came back from an ejection
        self.ramp_from = 0.0
        self.ramp_until = 0.0  # slow start ends here (0: no ramp)
        self._rises = 0
        self._falls = 0
        self._fails = 0  # consecutive passive failures
        self._streak = 0  # consecutive ejections, for the backoff
        self._current = 0.0  # smooth weighted round robin score

    @classmethod
    def from_config(cls, cfg: BackendConfig) -> Backend:
        host, port = parse_hostport(cfg.address, field="address")
        return cls(cfg.name, host, port, cfg.weight)

    @property
    def eligible(self) -> bool:
        """Whether new connections may go here."""
        return self.state is State.UP and self.admin is Admin.ENABLED

    @property
    def status(self) -> str:
        """One word: the admin state when not enabled, else the health state."""
        return self.admin.value if self.admin is not Admin.ENABLED else self.state.value

    def effective_weight(self, now: float) -> float:
        """The weight, scaled down during slow start."""
        if now >= self.ramp_until:
            return float(self.weight)
        span = self.ramp_until - self.ramp_from
        fraction = (now - self.ramp_from) / span
        return self.weight * max(SLOW_START_FLOOR, fraction)

    def __repr__(self) -> str:
        return f"<Backend {self.name} {self.status} active={self.active}>"


class Pool:
    """Backends, one algorithm and the health state machine of each backend.

    Args:
        name: pool name, for events.
        backends: the pool's backends, in order.
        algorithm: one of ``config.ALGORITHMS``.
        health: check/ejection/slow-start policy.
        hash_balance: ``c`` of consistent hashing with bounded loads (> 1).
        rng: random source for ``power_of_two`` and ``random``.

    Raises:
        ValueError: no backends, or two with the same name.
    """

    def __init__(
        self,
        name: str,
        backends: Iterable[Backend],
        *,
        algorithm: Algorithm = "round_robin",
        health: HealthConfig | None = None,
        hash_balance: float = 1.25,
        rng: RandomSource | None = None,
    ) -> None:
        self.name = name
        self.backends: list[Backend] = list(backends)
        if not self.backends:
            raise ValueError("a pool needs at least one backend")
        if len({b.name for b in self.backends}) != len(self.backends):
            raise ValueError("backend names must be unique")
        self.algorithm: Algorithm = algorithm
        self.health = health or HealthConfig()
        self.hash_balance = hash_balance
        self.rng: RandomSource = rng or random.Random()
        self._events: list[BackendEvent] = []
        self._eligible: list[Backend] = []
        self._dirty = True
        self._timer = math.inf  # earliest time a timed state (ejection, ramp) changes
        self._cursor = 0
        self._ring: list[int] = []
        self._ring_backends: list[Backend] = []
        self._pick = self._picker(algorithm)
        self._build_ring()

    # ------------------------------------------------------------------ picking

    def acquire(
        self, now: float, key: str | None = None, exclude: Collection[Backend] = ()
    ) -> Backend:
        """Pick a backend for one new connection and count it as active.

        Args:
            now: current time, seconds (any monotonic clock, the same on every call).
            key: the consistent-hash key (ignored by the other algorithms).
            exclude: backends already tried for this connection (failover).

        Returns:
            The backend; call :meth:`release` once when the connection ends.

        Raises:
            NoBackendAvailable: no eligible backend outside ``exclude``.
            ValueError: ``consistent_hash`` without a key.
        """
        if now >= self._timer:
            self.advance(now)
        if self._dirty:
            self._eligible = [b for b in self.backends if b.eligible]
            self._dirty = False
        candidates = self._eligible
        if exclude:
            candidates = [b for b in candidates if b not in exclude]
        if not candidates:
            raise NoBackendAvailable(
                f"pool {self.name!r}: no backend available "
                f"({', '.join(f'{b.name} {b.status}' for b in self.backends)})"
            )
        backend = self._pick(candidates, now, key)
        backend.active += 1
        backend.total += 1
        return backend

    def release(self, backend: Backend) -> None:
        """A connection acquired from ``backend`` ended."""
        backend.active -= 1

    def _picker(self, algorithm: Algorithm) -> _Picker:
        pickers: dict[str, _Picker] = {
            "round_robin": self._round_robin,
            "weighted_round_robin": self._smooth_weighted,
            "least_connections": self._least_connections,
            "power_of_two": self._power_of_two,
            "consistent_hash": self._consistent_hash,
            "random": self._random,
        }
        try:
            return pickers[algorithm]
        except KeyError:
            raise ValueError(f"unknown algorithm {algorithm!r}") from None

    def _round_robin(self, candidates: list[Backend], now: float, key: str | None) -> Backend:
        backend = candidates[self._cursor % len(candidates)]
        self._cursor += 1
        return backend

    def _smooth_weighted(self, candidates: list[Backend], now: float, key: str | None) -> Backend:
        # nginx ngx_http_upstream_get_peer(): add, take the max, subtract the total.
        total = 0.0
        best = candidates[0]
        for b in candidates:
            w = b.effective_weight(now)
            b._current += w
            total += w
            if b._current > best._current:
                best = b
        best._current -= total
        return best

    def _least_connections(self, candidates: list[Backend], now: float, key: str | None) -> Backend:
        n = len(candidates)
        start = self._cursor % n
        self._cursor += 1
        best = candidates[start]
        best_load = (best.active + 1) / best.effective_weight(now)
        for i in range(1, n):
            b = candidates[(start + i) % n]
            load = (b.active + 1) / b.effective_weight(now)
            if load < best_load:
                best, best_load = b, load
        return best

    def _power_of_two(self, candidates: list[Backend], now: float, key: str | None) -> Backend:
        n = len(candidates)
        if n == 1:
            return candidates[0]
        i = self.rng.randrange(n)
        j = self.rng.randrange(n - 1)
        a, b = candidates[i], candidates[j + (j >= i)]  # two distinct ones
        if (b.active + 1) / b.effective_weight(now) < (a.active + 1) / a.effective_weight(now):
            return b
        return a

    def _random(self, candidates: list[Backend], now: float, key: str | None) -> Backend:
        weights = [b.effective_weight(now) for b in candidates]
        point = self.rng.random() * sum(weights)
        for b, w in zip(candidates, weights, strict=True):
            point -= w
            if point < 0:
                return b
        return candidates[-1]  # float rounding left a sliver past the last weight

    def _consistent_hash(self, candidates: list[Backend], now: float, key: str | None) -> Backend:
        if key is None:
            raise ValueError("consistent_hash needs a key")
        allowed = set(candidates)
        # The cap is over every eligible backend (the paper's mean load), failover
        # exclusions included, so the walk may find none under it: see the fallback.
        eligible = self._eligible
        total = sum(b.active for b in eligible)
        capacity = math.ceil(self.hash_balance * (total + 1) / len(eligible))
        ring = self._ring_backends
        size = len(ring)
        step = bisect.bisect_left(self._ring, hash_key(key))
        seen: set[Backend] = set()
        while len(seen) < len(self.backends):
            b = ring[step % size]
            step += 1
            if b in seen:
                continue
            seen.add(b)
            if b in allowed and b.active < capacity:
                return b
        # Only when `exclude` removed every backend with spare capacity.
        return min(candidates, key=lambda b: b.active)

    def _build_ring(self) -> None:
        points: list[tuple[int, int]] = []
        for index, b in enumerate(self.backends):
            for v in range(VNODES * b.weight):
                points.append((hash_key(f"{b.name}#{v}"), index))
        points.sort()
        self._ring = [h for h, _ in points]
        self._ring_backends = [self.backends[i] for _, i in points]

    # ------------------------------------------------------------------ membership

    def add(self, backend: Backend) -> None:
        """Add a backend (admin API).

        Raises:
            ValueError: a backend with that name exists.
        """
        if any(b.name == backend.name for b in self.backends):
            raise ValueError(f"backend {backend.name!r} exists")
        self.backends.append(backend)
        self._build_ring()
        self._dirty = True

    def remove(self, name: str) -> Backend:
        """Remove a backend; its established connections are the caller's to finish.

        Raises:
            KeyError: no such backend.
            ValueError: it is the last one.
        """
        backend = self.get(name)
        if len(self.backends) == 1:
            raise ValueError("cannot remove the last backend of a pool")
        self.backends.remove(backend)
        self._build_ring()
        self._dirty = True
        return backend

    def get(self, name: str) -> Backend:
        """The backend called ``name``.

        Raises:
            KeyError: no such backend.
        """
        for b in self.backends:
            if b.name == name:
                return b
        raise KeyError(name)

    # ------------------------------------------------------------------ health inputs

    def report_check(self, backend: Backend, ok: bool, now: float) -> None:
        """Feed one active health check result."""
        if ok:
            backend._falls = 0
            if backend.state is State.DOWN:
                backend._rises += 1
                if backend._rises >= self.health.rise:
                    self._come_back(backend, now, f"{backend._rises} checks passed")
            return
        backend._rises = 0
        if backend.state is State.DOWN:
            return
        backend._falls += 1
        if backend._falls >= self.health.fall:
            old = backend.state
            backend.state = State.DOWN
            backend.ejected_until = None
            backend._falls = 0
            backend.ramp_until = 0.0
            self._changed(backend, old, f"{self.health.fall} checks failed", now)

    def report_failure(self, backend: Backend, now: float, reason: str = "failure") -> None:
        """Real traffic to ``backend`` failed (connect refused, timed out, reset)."""
        backend.failures += 1
        if backend.state is not State.UP:
            return
        backend._fails += 1
        if backend._fails < self.health.max_fails:
            return
        ejected = sum(1 for b in self.backends if b.state is State.EJECTED)
        if ejected >= max(1, len(self.backends) * self.health.max_ejection_percent // 100):
            # Envoy's max_ejection_percent: a fault shared by every backend (a database
            # behind them all answering 5xx) must not take the whole pool out.
            return
        if now - backend.returned_at >= backend.last_ejection:
            backend._streak = 0  # in service as long as it was last out: start over
        period = min(
            self.health.ejection_time * 2.0**backend._streak, self.health.max_ejection_time
        )
        old = backend.state
        backend.state = State.EJECTED
        backend.ejected_until = now + period
        backend.last_ejection = period
        backend.ejections += 1
        backend._streak += 1
        backend._fails = 0
        backend.ramp_until = 0.0
        self._timer = min(self._timer, now + period)
        self._changed(
            backend,
            old,
            f"{self.health.max_fails} consecutive failures, last: {reason}; out {period:g}s",
            now,
        )

    def report_success(self, backend: Backend) -> None:
        """Real traffic to ``backend`` succeeded (connected)."""
        backend._fails = 0

    def set_admin(self, backend: Backend, admin: Admin, now: float) -> None:
        """Enable, drain or disable a backend."""
        if backend.admin is admin:
            return
        old = backend.admin
        backend.admin = admin
        self._changed(backend, old, "admin", now)

    def advance(self, now: float) -> None:
        """Apply the timed transitions due at ``now`` (ejections ending, ramps finishing).

        :meth:`acquire` calls it; a server calls it from a timer at :attr:`next_wakeup` so
        that events come out even when no traffic arrives.
        """
        timer = math.inf
        for b in self.backends:
            if b.ejected_until is not None:
                if now >= b.ejected_until:
                    b.returned_at = now
                    self._come_back(b, now, "ejection period over")
                else:
                    timer = min(timer, b.ejected_until)
            if b.ramp_until > now:
                timer = min(timer, b.ramp_until)
            elif b.ramp_until:
                b.ramp_until = 0.0
        self._timer = timer

    @property
    def next_wakeup(self) -> float | None:
        """When :meth:`advance` next has something to do, or ``None``."""
        return None if self._timer == math.inf else self._timer

    def _come_back(self, backend: Backend, now: float, reason: str) -> None:
        old = backend.state
        backend.state = State.UP
        backend.ejected_until = None
        backend._rises = 0
        backend._fails = 0
        backend._current = 0.0
        if self.health.slow_start > 0:
            backend.ramp_from = now
            backend.ramp_until = now + self.health.slow_start
            self._timer = min(self._timer, backend.ramp_until)
        self._changed(backend, old, reason, now)

    def _changed(self, backend: Backend, old: State | Admin, reason: str, now: float) -> None:
        self._dirty = True
        new = backend.state if isinstance(old, State) else backend.admin
        self._events.append(
            BackendEvent(self.name, backend.name, old.value, new.value, reason, now)
        )

    def events_received(self) -> list[BackendEvent]:
        """Drain the status changes since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    @property
    def eligible(self) -> list[Backend]:
        """Backends that may take new connections now (as of the last pick or advance)."""
        return [b for b in self.backends if b.eligible]


class _Picker(Protocol):
    def __call__(self, candidates: list[Backend], now: float, key: str | None, /) -> Backend: ...


def make_pool(
    name: str,
    backends: Iterable[BackendConfig],
    *,
    algorithm: Algorithm = "round_robin",
    health: HealthConfig | None = None,
    hash_balance: float = 1.25,
    rng: RandomSource | None = None,
) -> Pool:
    """A :class:`Pool` from backend configs."""
    return Pool(
        name,
        (Backend.from_config(b) for b in backends),
        algorithm=algorithm,
        health=health,
        hash_balance=hash_balance,
        rng=rng,
    )


__all__ = [
    "SLOW_START_FLOOR",
    "VNODES",
    "Admin",
    "Backend",
    "BackendEvent",
    "Pool",
    "RandomSource",
    "State",
    "hash_key",
    "make_pool",
]
