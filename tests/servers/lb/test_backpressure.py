"""Backpressure both ways: a slow reader pauses the other side; memory stays bounded."""

from __future__ import annotations

import asyncio
import socket
import threading

from netstack.config import BalancerLimits
from netstack.servers.lb import Balancer
from tests.helpers import TIMEOUT, apoll_until
from tests.servers.lb.support import TCPBackend, lb_config

TOTAL = 16 << 20
HIGH = 64 * 1024
# A paused reader may still have one read in hand: asyncio and uvloop read 256 KiB at most.
SLACK = 256 * 1024


def the_relay(lb: Balancer):
    assert len(lb.connections) == 1
    return next(iter(lb.connections))


async def test_slow_client_pauses_the_backend() -> None:
    block = b"\xab" * (1 << 20)

    def flood(conn: socket.socket, backend: TCPBackend) -> None:
        conn.recv(2)
        for _ in range(TOTAL // len(block)):
            conn.sendall(block)

    with TCPBackend(flood) as backend:
        cfg = lb_config(backend.port, limits=BalancerLimits(relay_buffer_bytes=HIGH))
        async with Balancer(cfg) as lb:
            sock = socket.create_connection(lb.address(), timeout=TIMEOUT)
            with sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
                sock.sendall(b"go")
                await apoll_until(lambda: lb.connections)
                relay = the_relay(lb)
                await apoll_until(
                    lambda: (
                        relay.backend_transport is not None
                        and not relay.backend_transport.is_reading()
                    )
                )
                assert relay.transport.get_write_buffer_size() <= HIGH + SLACK

                def drain() -> int:
                    got = 0
                    while chunk := sock.recv(1 << 20):
                        assert chunk == b"\xab" * len(chunk)
                        got += len(chunk)
                    return got

                assert await asyncio.to_thread(drain) == TOTAL


async def test_slow_backend_pauses_the_client() -> None:
    go = threading.Event()
    received: list[int] = []

    def slow_sink(conn: socket.socket, backend: TCPBackend) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        go.wait(TIMEOUT * 2)
        got = 0
        while chunk := conn.recv(1 << 20):
            got += len(chunk)
        received.append(got)
        conn.sendall(b"%d" % got)

    with TCPBackend(slow_sink) as backend:
        cfg = lb_config(backend.port, limits=BalancerLimits(relay_buffer_bytes=HIGH))
        async with Balancer(cfg) as lb:
            sock = socket.create_connection(lb.address(), timeout=TIMEOUT * 2)
            with sock:

                def send_all() -> None:
                    block = b"\xcd" * (1 << 20)
                    for _ in range(TOTAL // len(block)):
                        sock.sendall(block)
                    sock.shutdown(socket.SHUT_WR)

                sender = asyncio.create_task(asyncio.to_thread(send_all))
                await apoll_until(lambda: lb.connections)
                relay = the_relay(lb)
                await apoll_until(lambda: not relay.transport.is_reading())
                assert relay.backend_transport is not None
                assert relay.backend_transport.get_write_buffer_size() <= HIGH + SLACK
                assert not sender.done()  # the client is blocked, not buffered in us
                go.set()
                await sender
                answer = await asyncio.to_thread(sock.recv, 64)
            assert answer == b"%d" % TOTAL
            assert received == [TOTAL]
