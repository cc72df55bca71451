"""Echo client: N request/response messages, verified, with RTT percentiles and throughput.

TCP: ``concurrency`` connections, one outstanding message each. A connection that cannot be
made is retried with exponential backoff and full jitter ("Exponential Backoff and Jitter",
AWS Architecture Blog, 2015); a message in flight when its connection drops is re-sent on
a new connection and counted in ``resent``.

UDP: one connected endpoint shared by ``concurrency`` workers. Every attempt carries a fresh
4-byte request id, so a late reply to an earlier attempt is recognised as stale and ignored.
An attempt unanswered within ``Timeouts.request_timeout`` is re-sent after a backoff.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import ssl
import time
from dataclasses import dataclass, field

from netstack.config import EchoClientConfig, Limits, parse_hostport
from netstack.errors import ConnectionClosed
from netstack.proto.framing import Frame, decode_datagram, encode_datagram
from netstack.servers.measure import nearest_rank
from netstack.servers.messaging.framed import FramedProtocol
from netstack.transport.datagram import Address, DatagramProtocol
from netstack.transport.tls import client_context

logger = logging.getLogger(__name__)


def backoff_delay(
    attempt: int, *, initial: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Full-jitter backoff: uniform in ``[0, min(maximum, initial * 2**attempt)]``."""
    cap = min(maximum, initial * (2**attempt))
    return (rng or random).uniform(0.0, cap)


def make_payload(seq: int, size: int) -> bytes:
    """``size`` printable bytes (no newline, so line framing works) that vary with ``seq``."""
    unit = f"{seq:x}.".encode()
    return (unit * (size // len(unit) + 1))[:size]


@dataclass
class EchoReport:
    """What a run of the echo client measured."""

    proto: str
    target: str
    count: int
    size: int
    concurrency: int
    ok: int = 0
    errors: int = 0  # replies that did not match, or messages given up on
    resent: int = 0  # messages sent again after a drop or a timeout
    reconnects: int = 0  # TCP connections made after the first one of a worker
    stale: int = 0  # UDP replies to an earlier attempt, or duplicates, ignored
    connect_failures: int = 0  # TCP connection attempts that failed (each one backed off)
    elapsed: float = 0.0
    rtts: list[float] = field(default_factory=list)

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the RTTs in seconds (0.0 without samples)."""
        if not self.rtts:
            return 0.0
        return nearest_rank(sorted(self.rtts), q)

    @property
    def rate(self) -> float:
        """Messages echoed per second."""
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def record(self, reply: bytes, payload: bytes, sent_at: float) -> None:
        """Count one answered message: its round trip, and whether the echo matched."""
        self.rtts.append(time.perf_counter() - sent_at)
        if reply == payload:
            self.ok += 1
        else:
            self.errors += 1

    def lines(self) -> list[str]:
        """The human summary printed by ``netstack echo send``."""
        return [
            f"{self.proto} {self.target}: {self.count} messages of {self.size} bytes"
            f" over {self.concurrency} connection(s) in {self.elapsed:.3f}s",
            f"ok {self.ok}  errors {self.errors}  resent {self.resent}"
            f"  reconnects {self.reconnects}  stale {self.stale}",
            f"rtt p50 {self.percentile(50) * 1e3:.3f} ms  p99 {self.percentile(99) * 1e3:.3f} ms",
            f"throughput {self.rate:.0f} msgs/s",
        ]


class EchoClientProtocol(FramedProtocol):
    """A TCP client connection with one outstanding request."""

    def __init__(self, cfg: EchoClientConfig) -> None:
        super().__init__(cfg.framing, limits=cfg.limits, timeouts=cfg.timeouts)
        self.unexpected = 0
        self._waiter: asyncio.Future[bytes] | None = None

    def handle_event(self, event: Frame) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is None or waiter.done():
            self.unexpected += 1
        else:
            waiter.set_result(event)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionClosed(f"connection lost: {exc or 'closed by peer'}"))

    async def request(self, payload: bytes) -> bytes:
        """Send one frame and wait for the next frame back.

        Raises:
            ConnectionClosed: the connection is closed or drops before the reply.
        """
        if self.transport.is_closing():
            raise ConnectionClosed("connection closed")
        waiter: asyncio.Future[bytes] = self._loop.create_future()
        self._waiter = waiter
        self.codec.send(payload)
        self.flush()
        return await waiter


class UDPEchoClientProtocol(DatagramProtocol):
    """A connected UDP endpoint matching replies to requests by id."""

    def __init__(self, *, limits: Limits | None = None) -> None:
        super().__init__(limits=limits)
        self.waiters: dict[int, asyncio.Future[bytes]] = {}
        self.stale = 0

    def handle_datagram(self, data: bytes, addr: Address) -> None:
        request_id, payload = decode_datagram(
            data, max_datagram_bytes=self.limits.max_datagram_bytes
        )
        waiter = self.waiters.pop(request_id, None)
        if waiter is None or waiter.done():
            self.stale += 1
            return
        waiter.set_result(payload)

    def error_received(self, exc: Exception) -> None:
        # Port unreachable: fail the attempts in flight now rather than at their timeout.
        super().error_received(exc)
        for waiter in self.waiters.values():
            if not waiter.done():
                waiter.set_exception(exc)
        self.waiters.clear()


class EchoClient:
    """Run the request/response load described by ``cfg``; see :meth:`run`."""

    def __init__(self, cfg: EchoClientConfig, *, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.host, self.port = parse_hostport(cfg.connect, field="connect")
        self.ssl = client_context(cfg.tls) if cfg.proto == "tcp" else None
        self.rng = rng or random.Random()
        self.report = EchoReport(
            proto=("tls" if self.ssl else cfg.proto),
            target=cfg.connect,
            count=cfg.count,
            size=cfg.size,
            concurrency=cfg.concurrency,
        )
        self._seq = itertools.count()
        self._request_ids = itertools.count(self.rng.randrange(1 << 31))

    def _backoff(self, attempt: int) -> float:
        return backoff_delay(
            attempt, initial=self.cfg.backoff_initial, maximum=self.cfg.backoff_max, rng=self.rng
        )

    def _next_seq(self) -> int | None:
        seq = next(self._seq)
        return seq if seq < self.cfg.count else None

    async def run(self) -> EchoReport:
        """Send ``count`` messages and return the report.

        Raises:
            ConnectionClosed: the server could not be reached after ``retries`` attempts.
        """
        start = time.perf_counter()
        endpoint = await self._open_udp() if self.cfg.proto == "udp" else None
        try:
            async with asyncio.TaskGroup() as tg:
                for _ in range(self.cfg.concurrency):
                    worker = self._udp_worker(endpoint) if endpoint else self._tcp_worker()
                    tg.create_task(worker)
        except* ConnectionClosed as group:
            raise group.exceptions[0] from None
        finally:
            if endpoint is not None:
                self.report.stale = endpoint.stale
                endpoint.transport.close()
        self.report.elapsed = time.perf_counter() - start
        return self.report

    # ------------------------------------------------------------------ TCP

    async def _connect(self) -> EchoClientProtocol:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        last: BaseException | None = None
        for attempt in range(cfg.retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt - 1))
            try:
                async with asyncio.timeout(cfg.timeouts.connect_timeout):
                    _, protocol = await loop.create_connection(
                        lambda: EchoClientProtocol(cfg),
                        self.host,
                        self.port,
                        ssl=self.ssl,
                        server_hostname=self.host if self.ssl else None,
                    )
                return protocol
            except ssl.SSLCertVerificationError as exc:
                raise ConnectionClosed(f"TLS with {cfg.connect} failed: {exc}") from None
            except (OSError, TimeoutError) as exc:
                last = exc
                self.report.connect_failures += 1
                logger.debug("! connect to %s failed (attempt %d): %s", cfg.connect, attempt, exc)
        reason = "timed out" if isinstance(last, TimeoutError) else str(last)
        raise ConnectionClosed(
            f"cannot connect to {cfg.proto} {cfg.connect} after {cfg.retries} retries: {reason}"
        )

    async def _tcp_worker(self) -> None:
        report, cfg = self.report, self.cfg
        conn: EchoClientProtocol | None = None
        first = True
        try:
            while (seq := self._next_seq()) is not None:
                payload = make_payload(seq, cfg.size)
                drops = 0
                while True:
                    if conn is None or conn.transport.is_closing():
                        if drops > 1:
                            await asyncio.sleep(self._backoff(drops - 2))
                        conn = await self._connect()
                        if not first:
                            report.reconnects += 1
                        first = False
                    sent_at = time.perf_counter()
                    try:
                        reply = await conn.request(payload)
                    except ConnectionClosed as exc:
                        drops += 1
                        conn = None
                        if drops > cfg.retries:
                            logger.warning("! giving up on message %d: %s", seq, exc)
                            report.errors += 1
                            break
                        report.resent += 1
                        continue
                    report.record(reply, payload, sent_at)
                    break
        finally:
            if conn is not None:
                conn.close()
                await conn.wait_closed()

    # ------------------------------------------------------------------ UDP

    async def _open_udp(self) -> UDPEchoClientProtocol:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_datagram_endpoint(
            lambda: UDPEchoClientProtocol(limits=self.cfg.limits),
            remote_addr=(self.host, self.port),
        )
        return protocol

    async def _udp_worker(self, endpoint: UDPEchoClientProtocol) -> None:
        report, cfg = self.report, self.cfg
        loop = asyncio.get_running_loop()
        last: BaseException | None = None
        while (seq := self._next_seq()) is not None:
            payload = make_payload(seq, cfg.size)
            for attempt in range(cfg.retries + 1):
                if attempt:
                    report.resent += 1
                    await asyncio.sleep(self._backoff(attempt - 1))
                request_id = next(self._request_ids) & 0xFFFFFFFF
                datagram = encode_datagram(
                    request_id, payload, max_datagram_bytes=cfg.limits.max_datagram_bytes
                )
                waiter = endpoint.waiters[request_id] = loop.create_future()
                sent_at = time.perf_counter()
                endpoint.send(datagram)
                try:
                    async with asyncio.timeout(cfg.timeouts.request_timeout):
                        reply = await waiter
                except (TimeoutError, OSError) as exc:
                    endpoint.waiters.pop(request_id, None)
                    last = exc
                    continue
                report.record(reply, payload, sent_at)
                break
            else:
                report.errors += 1
                logger.warning("! giving up on message %d after %d retries", seq, cfg.retries)
                if report.ok == 0:
                    reason = "no reply" if isinstance(last, TimeoutError) else str(last)
                    raise ConnectionClosed(
                        f"cannot reach udp {cfg.connect} after {cfg.retries} retries: {reason}"
                    )
