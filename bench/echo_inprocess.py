"""Per-message CPU cost of the echo path in process: no sockets, a no-op transport.

Not a test (not run in CI). Feeds one 64-byte length-prefixed message at a time to
``data_received`` of netstack's ``EchoProtocol`` (every default on) and of a raw
``asyncio.Protocol`` that writes back what it reads, and prints the best of 7 timings in
µs per message. It isolates the Python work of the generic path from the kernel and the
loop, which dominate ``bench/echo.py``.

    python bench/echo_inprocess.py
"""

from __future__ import annotations

import asyncio
import struct
import timeit

from netstack.config import EchoServerConfig
from netstack.servers.messaging.server import EchoProtocol

MESSAGE = struct.pack("!I", 64) + b"x" * 64
NUMBER = 200_000
REPEAT = 7


class NullTransport:
    """Just enough of a transport for ``connection_made`` and ``data_received``."""

    def write(self, data: bytes) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 1) if name == "peername" else default

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class RawEcho(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def per_message_us(protocol: asyncio.Protocol) -> float:
    protocol.connection_made(NullTransport())  # type: ignore[arg-type]
    feed = protocol.data_received
    best = min(timeit.repeat(lambda: feed(MESSAGE), number=NUMBER, repeat=REPEAT))
    return best / NUMBER * 1e6


async def main() -> None:
    raw = per_message_us(RawEcho())
    netstack = EchoProtocol(EchoServerConfig())
    ns = per_message_us(netstack)
    netstack.connection_lost(None)  # cancels the idle timer
    print(f"raw {raw:.3f} µs/msg  netstack {ns:.3f} µs/msg  difference {ns - raw:.3f}")


if __name__ == "__main__":
    asyncio.run(main())
