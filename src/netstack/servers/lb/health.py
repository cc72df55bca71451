"""Active health checks: one task per pool probes every backend each ``check_interval``.

The probe is a seam (:class:`HealthCheck`): :func:`tcp_connect_check`, or the HTTP GET
check (path, expected status) of ``httpcheck.py`` for pools of ``http`` frontends with a
``check_path``, chosen by :func:`check_for`. The same task applies the pool's timed
transitions (an ejection ending) at :attr:`Pool.next_wakeup`, so state changes are reported
even without traffic.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Protocol

from netstack.config import PoolConfig
from netstack.proto.balance import Admin, Backend, Pool

logger = logging.getLogger(__name__)


class HealthCheck(Protocol):
    """Probe one backend; true means healthy. Must not raise for a failed probe."""

    async def __call__(self, backend: Backend, timeout: float) -> bool: ...  # noqa: ASYNC109


async def tcp_connects(host: str, port: int, timeout: float) -> bool:  # noqa: ASYNC109
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` (then closed)."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def tcp_connect_check(backend: Backend, timeout: float) -> bool:  # noqa: ASYNC109
    """Healthy if a TCP connection opens within ``timeout`` (then closed at once)."""
    return await tcp_connects(backend.host, backend.port, timeout)


def check_for(pool_cfg: PoolConfig, modes: set[str]) -> HealthCheck | None:
    """The active check for a pool, or ``None`` when it gets none.

    Pools that only UDP frontends use get no active check: a UDP probe needs knowledge
    of the protocol; they rely on passive results (ICMP unreachable) instead.
    """
    if pool_cfg.health.check_interval is None or modes <= {"udp"}:
        return None
    if pool_cfg.health.check_path is not None and "http" in modes:
        from netstack.servers.lb.httpcheck import http_check

        return http_check(pool_cfg.health.check_path, pool_cfg.health.check_status)
    return tcp_connect_check


class HealthChecker:
    """Runs a pool's active checks and timed transitions until cancelled.

    Args:
        pool: the pool to feed.
        cfg: its config (interval, timeout).
        check: the probe, or ``None`` for timed transitions only.
        on_events: called after inputs were fed, to drain and report the pool's events.
    """

    def __init__(
        self,
        pool: Pool,
        cfg: PoolConfig,
        check: HealthCheck | None,
        on_events: Callable[[Pool], None],
    ) -> None:
        self.pool = pool
        self.cfg = cfg
        self.check = check
        self.on_events = on_events
        self.rounds = 0
        self._poked = asyncio.Event()

    def poke(self) -> None:
        """The pool got a timed state (an ejection): recompute the next wakeup now."""
        self._poked.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.cfg.health.check_interval
        next_check = loop.time()
        while True:
            now = loop.time()
            if self.check is not None and interval is not None and now >= next_check:
                await self.check_once()
                next_check = loop.time() + interval
            self.pool.advance(loop.time())
            self.on_events(self.pool)
            wake = next_check if self.check is not None else float("inf")
            if self.pool.next_wakeup is not None:
                wake = min(wake, self.pool.next_wakeup)
            delay = wake - loop.time()
            self._poked.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if delay == float("inf") else max(0.0, delay)):
                    await self._poked.wait()

    async def check_once(self) -> None:
        """Probe every backend that is not disabled, concurrently; feed the results."""
        assert self.check is not None
        backends = [b for b in self.pool.backends if b.admin is not Admin.DISABLED]
        timeout = self.cfg.health.check_timeout
        results = await asyncio.gather(*(self.check(b, timeout) for b in backends))
        now = asyncio.get_running_loop().time()
        for backend, ok in zip(backends, results, strict=True):
            self.pool.report_check(backend, ok, now)
        self.rounds += 1
        self.on_events(self.pool)


__all__ = ["HealthCheck", "HealthChecker", "check_for", "tcp_connect_check"]
