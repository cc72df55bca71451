"""Echo servers: framed TCP (length or line, optional TLS) and UDP with request ids."""

from __future__ import annotations

from netstack.config import EchoServerConfig, Limits, parse_hostport
from netstack.proto.framing import Frame, decode_datagram
from netstack.servers.messaging.framed import FramedProtocol
from netstack.transport.datagram import Address, DatagramProtocol
from netstack.transport.listener import DatagramServer, Server
from netstack.transport.tls import server_context


class EchoProtocol(FramedProtocol):
    """Send every frame back on the connection it came from."""

    def __init__(self, cfg: EchoServerConfig) -> None:
        super().__init__(cfg.framing, limits=cfg.limits, timeouts=cfg.timeouts)

    def handle_event(self, event: Frame) -> None:
        self.codec.send(event)

    def busy(self) -> bool:
        # A partial frame is in flight: graceful shutdown waits for the rest of it.
        return self.in_flight > 0 or self.codec.buffered > 0


class UDPEchoProtocol(DatagramProtocol):
    """Send every well-formed datagram (4-byte request id + payload) back to its sender."""

    def __init__(self, *, limits: Limits | None = None) -> None:
        super().__init__(limits=limits)
        self.echoed = 0

    def handle_datagram(self, data: bytes, addr: Address) -> None:
        decode_datagram(data, max_datagram_bytes=self.limits.max_datagram_bytes)
        self.echoed += 1
        self.send(data, addr)


def create_server(cfg: EchoServerConfig) -> Server | DatagramServer:
    """Return an unstarted echo listener for ``cfg`` (``await srv.start()`` or ``async with``).

    Raises:
        ConfigError: the TLS files cannot be loaded.
    """
    host, port = parse_hostport(cfg.bind, field="bind")
    if cfg.proto == "udp":
        return DatagramServer(lambda: UDPEchoProtocol(limits=cfg.limits), host, port)
    return Server(
        lambda: EchoProtocol(cfg),
        host,
        port,
        limits=cfg.limits,
        timeouts=cfg.timeouts,
        ssl=server_context(cfg.tls),
    )


__all__ = ["EchoProtocol", "UDPEchoProtocol", "create_server"]
