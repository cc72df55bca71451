"""The HTTP active health check: ``GET path`` and an expected status (HAProxy's httpchk).

Plugs into :class:`~netstack.servers.lb.health.HealthCheck`; :func:`check_for` picks it for
pools that an ``http`` frontend uses and whose health config names a ``check_path``.
"""

from __future__ import annotations

import asyncio
import contextlib

from netstack.config import HTTPLimits
from netstack.errors import RemoteProtocolError
from netstack.proto.balance import Backend
from netstack.proto.http11 import END_OF_MESSAGE, HTTPClientConnection, Request, Response
from netstack.servers.lb.health import HealthCheck

# A health answer needs no big head; its body is read and dropped (bounded).
CHECK_LIMITS = HTTPLimits(max_body_bytes=1 << 20)


def http_check(path: str, expect: int | None = None) -> HealthCheck:
    """A check that passes when ``GET path`` answers ``expect`` (default: any 2xx/3xx)."""
    target = path.encode("ascii")

    async def check(backend: Backend, timeout: float) -> bool:  # noqa: ASYNC109
        try:
            async with asyncio.timeout(timeout):
                status = await _probe(backend, target)
        except (OSError, TimeoutError, RemoteProtocolError):
            return False
        if expect is None:
            return 200 <= status < 400
        return status == expect

    return check


async def _probe(backend: Backend, target: bytes) -> int:
    reader, writer = await asyncio.open_connection(backend.host, backend.port)
    try:
        conn = HTTPClientConnection(CHECK_LIMITS)
        host = f"{backend.host}:{backend.port}".encode()
        headers = [(b"host", host), (b"user-agent", b"netstack-health-check")]
        conn.send(Request(b"GET", target, headers, keep_alive=False))
        conn.send(END_OF_MESSAGE)
        writer.write(b"".join(conn.data_to_send()))
        while True:
            data = await reader.read(65536)
            if data:
                conn.receive_data(data)
            else:
                conn.receive_eof()
            for event in conn.events_received():
                if isinstance(event, Response):
                    return event.status_code
            if not data:
                raise RemoteProtocolError("closed without a response", status_hint=502)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


__all__ = ["http_check"]
