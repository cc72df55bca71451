"""The echo client against real servers, including ones that misbehave on purpose."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from netstack.config import TLS, EchoClientConfig, Limits, Timeouts
from netstack.errors import ConnectionClosed
from netstack.proto.framing import Frame
from netstack.servers.messaging import EchoClient, EchoProtocol, EchoReport, UDPEchoProtocol
from netstack.servers.messaging.client import backoff_delay, make_payload
from netstack.transport.listener import DatagramServer, Server, format_address
from tests.helpers import TIMEOUT, apoll_until, free_port
from tests.transport.support import echo_server, server_config, udp_server


def client_config(addr, **kw) -> EchoClientConfig:
    kw.setdefault("backoff_initial", 0.01)
    kw.setdefault("backoff_max", 0.05)
    return EchoClientConfig(connect=format_address(addr), **kw)


async def run(cfg: EchoClientConfig) -> EchoReport:
    async with asyncio.timeout(TIMEOUT * 2):
        return await EchoClient(cfg, rng=random.Random(1)).run()


@pytest.mark.parametrize("framing", ["length", "line"])
async def test_tcp_round_trips_are_verified(framing):
    async with echo_server(server_config(framing=framing)) as srv:
        report = await run(
            client_config(srv.addresses[0], framing=framing, count=200, size=100, concurrency=4)
        )
    assert (report.ok, report.errors, report.resent, report.reconnects) == (200, 0, 0, 0)
    assert len(report.rtts) == 200
    assert 0 < report.percentile(50) <= report.percentile(99)
    assert report.rate > 0
    text = "\n".join(report.lines())
    assert "p50" in text
    assert "p99" in text
    assert "msgs/s" in text


async def test_tls_client_with_cafile(tls_certs):
    tls = TLS(certfile=tls_certs.certfile, keyfile=tls_certs.keyfile)
    async with echo_server(server_config(tls=tls)) as srv:
        report = await run(
            client_config(srv.addresses[0], count=20, tls=TLS(cafile=tls_certs.cafile))
        )
        assert report.ok == 20
        assert report.proto == "tls"
        # Without our CA the handshake fails at once and is not retried.
        untrusted = client_config(srv.addresses[0], count=1, tls=TLS(cafile=tls_certs.certfile))
        with pytest.raises(ConnectionClosed, match="TLS"):
            await run(untrusted)


class MangleProtocol(EchoProtocol):
    def handle_event(self, event: Frame) -> None:
        self.codec.send(event[::-1])


async def test_mismatched_echo_counts_as_error():
    cfg = server_config()
    async with Server(lambda: MangleProtocol(cfg), "127.0.0.1", 0) as srv:
        report = await run(client_config(srv.addresses[0], count=3, size=10))
    assert (report.ok, report.errors) == (0, 3)


async def test_tcp_message_resent_after_server_drops_the_connection():
    cfg = server_config()
    dropped: list[int] = []

    class DropFirst(EchoProtocol):
        def handle_event(self, event: Frame) -> None:
            if not dropped:
                dropped.append(self.conn_id)
                self.abort()  # the message is in flight when the connection dies
                return
            super().handle_event(event)

    async with Server(lambda: DropFirst(cfg), "127.0.0.1", 0) as srv:
        report = await run(client_config(srv.addresses[0], count=5))
    assert dropped
    assert (report.ok, report.errors, report.resent, report.reconnects) == (5, 0, 1, 1)


async def test_tcp_client_backs_off_until_the_server_is_up():
    port = free_port()
    client = EchoClient(
        client_config(("127.0.0.1", port), count=3, retries=50, backoff_max=0.05),
        rng=random.Random(2),
    )
    task = asyncio.create_task(client.run())
    try:
        await apoll_until(lambda: client.report.connect_failures >= 2)
        async with echo_server(server_config(f"127.0.0.1:{port}")):
            async with asyncio.timeout(TIMEOUT):
                report = await task
    finally:
        task.cancel()
    assert report.ok == 3
    assert report.connect_failures >= 2


async def test_tcp_unreachable_after_retries():
    cfg = client_config(("127.0.0.1", free_port()), retries=2)
    with pytest.raises(ConnectionClosed, match="after 2 retries"):
        await run(cfg)


async def test_tcp_gives_up_when_every_connection_drops():
    cfg = server_config()

    class AlwaysDrop(EchoProtocol):
        def handle_event(self, event: Frame) -> None:
            self.abort()

    async with Server(lambda: AlwaysDrop(cfg), "127.0.0.1", 0) as srv:
        report = await run(client_config(srv.addresses[0], count=2, retries=1))
    assert (report.ok, report.errors, report.resent) == (0, 2, 2)


@pytest.mark.parametrize("bind", ["127.0.0.1:0", "[::1]:0"])
async def test_udp_round_trips(bind):
    async with udp_server(server_config(bind, proto="udp")) as srv:
        report = await run(
            client_config(srv.addresses[0], proto="udp", count=100, size=200, concurrency=3)
        )
    assert (report.ok, report.errors, report.resent) == (100, 0, 0)


class DropFirstUDP(UDPEchoProtocol):
    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def handle_datagram(self, data, addr):
        self.seen += 1
        if self.seen == 1:
            return  # lost on the way
        super().handle_datagram(data, addr)
        if self.seen == 2:
            self.send(data, addr)  # and a duplicate reply, to be ignored


async def test_udp_client_retries_a_lost_reply_and_ignores_duplicates():
    async with DatagramServer(DropFirstUDP, "127.0.0.1", 0) as srv:
        cfg = client_config(
            srv.addresses[0],
            proto="udp",
            count=5,
            timeouts=Timeouts(request_timeout=0.1),
        )
        report = await run(cfg)
    assert (report.ok, report.errors, report.resent) == (5, 0, 1)
    assert report.stale == 1


async def test_udp_unreachable():
    cfg = client_config(
        ("127.0.0.1", free_port(socket.SOCK_DGRAM)),
        proto="udp",
        retries=1,
        timeouts=Timeouts(request_timeout=0.05),
    )
    with pytest.raises(ConnectionClosed, match="cannot reach udp"):
        await run(cfg)


async def test_udp_silent_server_after_first_reply_counts_errors():
    class AnswerOnce(UDPEchoProtocol):
        def handle_datagram(self, data, addr):
            if not self.echoed:
                super().handle_datagram(data, addr)

    async with DatagramServer(AnswerOnce, "127.0.0.1", 0) as srv:
        cfg = client_config(
            srv.addresses[0],
            proto="udp",
            count=2,
            retries=1,
            timeouts=Timeouts(request_timeout=0.05),
        )
        report = await run(cfg)
    assert (report.ok, report.errors, report.resent) == (1, 1, 1)


def test_udp_payload_over_max_datagram_is_refused_locally():
    from netstack.errors import ConfigError

    with pytest.raises(ConfigError, match="max_datagram_bytes"):
        EchoClientConfig(proto="udp", size=100, limits=Limits(max_datagram_bytes=100))


def test_backoff_is_full_jitter_and_capped():
    rng = random.Random(0)
    for attempt in range(10):
        cap = min(1.0, 0.1 * 2**attempt)
        delays = [backoff_delay(attempt, initial=0.1, maximum=1.0, rng=rng) for _ in range(50)]
        assert all(0 <= d <= cap for d in delays)
    assert 0 <= backoff_delay(3, initial=0.1, maximum=1.0) <= 0.8


def test_payload_and_percentiles():
    p = make_payload(12345, 40)
    assert len(p) == 40
    assert b"\n" not in p
    assert p != make_payload(12346, 40)
    report = EchoReport(proto="tcp", target="x", count=4, size=1, concurrency=1)
    assert report.percentile(50) == 0.0
    assert report.rate == 0.0
    report.rtts = [0.004, 0.001, 0.003, 0.002]
    assert report.percentile(50) == 0.002
    assert report.percentile(99) == 0.004
