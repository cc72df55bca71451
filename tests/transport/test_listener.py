"""Listener details not covered by the messaging tests."""

from __future__ import annotations

import asyncio

from netstack.config import Timeouts
from netstack.servers.messaging import EchoProtocol, UDPEchoProtocol
from netstack.transport.listener import DatagramServer, Server, format_address
from tests.helpers import TIMEOUT
from tests.transport.support import server_config


def test_format_address():
    assert format_address(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert format_address(("::1", 80, 0, 0)) == "[::1]:80"


async def test_unstarted_servers_have_no_sockets_and_close_cleanly():
    cfg = server_config()
    tcp = Server(lambda: EchoProtocol(cfg), "127.0.0.1", 0)
    udp = DatagramServer(UDPEchoProtocol, "127.0.0.1", 0)
    assert tcp.sockets == ()
    assert udp.sockets == ()
    assert tcp.addresses == []
    for srv in (tcp, udp):
        srv.close()
        srv.close()  # idempotent
        await srv.wait_closed()


async def test_connection_arriving_during_shutdown_is_refused(logs):
    cfg = server_config(timeouts=Timeouts(graceful_timeout=TIMEOUT))
    async with Server(lambda: EchoProtocol(cfg), "127.0.0.1", 0) as srv:
        srv._closing = True  # the window between close() starting and the socket closing
        reader, writer = await asyncio.open_connection(*srv.addresses[0])
        try:
            async with asyncio.timeout(TIMEOUT):
                assert await reader.read() == b""
        finally:
            writer.close()
        srv._closing = False
    assert any("shutting down" in m for m in logs.messages(20))
