"""UDP echo server: request ids, drops counted, no crash."""

from __future__ import annotations

import asyncio
import socket

import pytest

from netstack.config import Limits
from netstack.proto.framing import encode_datagram
from netstack.servers.messaging import UDPEchoProtocol
from netstack.transport import datagram
from tests.helpers import TIMEOUT, apoll_until
from tests.transport.support import server_config, udp_server


class Endpoint(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data, addr):
        self.queue.put_nowait(data)


async def open_endpoint(addr):
    loop = asyncio.get_running_loop()
    return await loop.create_datagram_endpoint(Endpoint, remote_addr=addr)


async def recv(ep: Endpoint) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        return await ep.queue.get()


@pytest.mark.parametrize("bind", ["127.0.0.1:0", "[::1]:0"])
async def test_udp_echo(bind):
    async with udp_server(server_config(bind, proto="udp")) as srv:
        transport, ep = await open_endpoint(srv.addresses[0])
        try:
            dgram = encode_datagram(7, b"ping", max_datagram_bytes=100)
            transport.sendto(dgram)
            assert await recv(ep) == dgram
        finally:
            transport.close()


async def test_garbage_short_and_oversize_are_dropped_and_counted(logs, monkeypatch):
    monkeypatch.setattr(datagram, "WARN_INTERVAL", 3600.0)  # one warning, then suppressed
    cfg = server_config(proto="udp", limits=Limits(max_datagram_bytes=64))
    async with udp_server(cfg) as srv:
        proto = srv.protocol
        assert isinstance(proto, UDPEchoProtocol)
        transport, ep = await open_endpoint(srv.addresses[0])
        try:
            raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            raw.sendto(b"", srv.addresses[0])  # empty (asyncio's sendto skips b"")
            raw.close()
            transport.sendto(b"ab")  # too short
            transport.sendto(b"x" * 65)  # over max_datagram_bytes
            await apoll_until(lambda: proto.dropped == 3)
            assert proto.drop_reasons == {"malformed": 2, "max_datagram_bytes": 1}
            good = encode_datagram(1, b"still served", max_datagram_bytes=64)
            transport.sendto(good)
            assert await recv(ep) == good
            assert proto.echoed == 1
            assert ep.queue.empty()  # nothing came back for the garbage
        finally:
            transport.close()
    warnings = logs.messages()
    assert len(warnings) == 1, warnings  # rate-limited
    assert len(logs.messages(10)) == 3  # DEBUG: every drop


async def test_warning_reports_suppressed_count(logs, monkeypatch):
    cfg = server_config(proto="udp")
    async with udp_server(cfg) as srv:
        proto = srv.protocol
        proto.drop_reasons.clear()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(3):
                sock.sendto(b"?", srv.addresses[0])
            await apoll_until(lambda: proto.dropped == 3)
            monkeypatch.setattr(datagram, "WARN_INTERVAL", 0.0)
            sock.sendto(b"?", srv.addresses[0])
            await apoll_until(lambda: proto.dropped == 4)
        finally:
            sock.close()
    assert any("+2 more" in m for m in logs.messages())


async def test_a_bug_in_the_handler_does_not_close_the_endpoint(logs):
    class Flaky(UDPEchoProtocol):
        def handle_datagram(self, data, addr):
            if data.endswith(b"boom"):
                raise ZeroDivisionError("a bug")
            super().handle_datagram(data, addr)

    from netstack.transport.listener import DatagramServer

    async with DatagramServer(Flaky, "127.0.0.1", 0) as srv:
        transport, ep = await open_endpoint(srv.addresses[0])
        try:
            transport.sendto(encode_datagram(1, b"boom", max_datagram_bytes=100))
            await apoll_until(lambda: srv.protocol.errors == 1)
            good = encode_datagram(2, b"fine", max_datagram_bytes=100)
            transport.sendto(good)
            assert await recv(ep) == good
        finally:
            transport.close()
    errors = [r for r in logs.records if r.levelno == 40]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
