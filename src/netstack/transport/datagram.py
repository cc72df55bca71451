"""DatagramProtocol: the UDP base. One bad datagram never stops an endpoint.

``datagram_received`` refuses anything over ``Limits.max_datagram_bytes`` and hands the rest
to :meth:`DatagramProtocol.handle_datagram`. A ``RemoteProtocolError`` raised there drops the
datagram: it is counted (``dropped``, ``drop_reasons``), logged at DEBUG each time and at
WARNING at most once per ``WARN_INTERVAL`` seconds, so a flood cannot flood the log too.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any, Final, cast

from netstack.config import Limits
from netstack.errors import LimitExceeded, RemoteProtocolError

logger = logging.getLogger(__name__)

Address = Any  # (host, port) for IPv4, (host, port, flowinfo, scope_id) for IPv6

# One WARNING a second is readable by a person and cheap under a flood.
WARN_INTERVAL: Final = 1.0


class DatagramProtocol(asyncio.DatagramProtocol):
    """UDP endpoint base: size limit, drop counting, rate-limited warnings.

    Args:
        limits: ``max_datagram_bytes`` is enforced on receive and send.

    Attributes:
        received: datagrams received (including dropped ones).
        dropped: datagrams dropped as garbage, short or oversize.
        drop_reasons: dropped datagrams by reason (the limit name or ``"malformed"``).
        errors: datagrams whose handler raised an unexpected exception (a bug).
    """

    transport: asyncio.DatagramTransport

    def __init__(self, *, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.received = 0
        self.dropped = 0
        self.errors = 0
        self.drop_reasons: collections.Counter[str] = collections.Counter()
        self._last_warn = float("-inf")
        self._suppressed = 0
        self.closed: asyncio.Future[None] | None = None

    def handle_datagram(self, data: bytes, addr: Address) -> None:  # pragma: no cover
        """Product hook; raise ``RemoteProtocolError`` to drop ``data``."""
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.received += 1
        try:
            if len(data) > self.limits.max_datagram_bytes:
                raise LimitExceeded(
                    "max_datagram_bytes", self.limits.max_datagram_bytes, actual=len(data)
                )
            self.handle_datagram(data, addr)
        except RemoteProtocolError as exc:
            self.drop(exc, addr)
        except Exception:
            # A bug must not close the endpoint (asyncio would): log it and keep serving.
            self.errors += 1
            logger.exception("! error handling a datagram from %s", addr)

    def drop(self, exc: RemoteProtocolError, addr: Address) -> None:
        """Count and log a datagram we refuse."""
        self.dropped += 1
        reason = exc.limit if isinstance(exc, LimitExceeded) else "malformed"
        self.drop_reasons[reason] += 1
        logger.debug("! dropped datagram from %s: %s", addr, exc)
        now = self._loop.time()
        if now - self._last_warn >= WARN_INTERVAL:
            more = f" (+{self._suppressed} more since last warning)" if self._suppressed else ""
            logger.warning("! dropped datagram from %s: %s%s", addr, exc, more)
            self._last_warn = now
            self._suppressed = 0
        else:
            self._suppressed += 1

    def send(self, data: bytes, addr: Address | None = None) -> None:
        """Send one datagram (``addr`` is ``None`` on a connected endpoint)."""
        if not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def error_received(self, exc: Exception) -> None:
        # ICMP errors (port unreachable) surface here; they concern one peer, not us.
        logger.debug("! datagram error: %s", exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed is not None and not self.closed.done():
            self.closed.set_result(None)
