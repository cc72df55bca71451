"""UDP mode: per-client sessions, idle expiry, unreachable backends, limits."""

from __future__ import annotations

import asyncio
import socket

from netstack.config import BalancerLimits, BalancerTimeouts, HealthConfig
from netstack.servers.lb import Balancer
from tests.helpers import TIMEOUT, apoll_until, free_port
from tests.servers.lb.support import UDPBackend, lb_config


def client() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(TIMEOUT)
    return sock


async def ask(sock: socket.socket, addr: tuple[str, int], data: bytes) -> bytes:
    sock.sendto(data, addr)
    reply, _ = await asyncio.to_thread(sock.recvfrom, 65535)
    return reply


def frontend(lb: Balancer):
    return lb.listeners["udp", "127.0.0.1:0#default"].udp


async def test_sessions_are_sticky_per_client_and_expire() -> None:
    timeouts = BalancerTimeouts(udp_session_timeout=0.2)
    with UDPBackend("u0") as u0, UDPBackend("u1") as u1:
        async with Balancer(lb_config(u0.port, u1.port, mode="udp", timeouts=timeouts)) as lb:
            addr = lb.address()
            with client() as a, client() as b:
                assert await ask(a, addr, b"1") == b"u0:1"
                assert await ask(b, addr, b"2") == b"u1:2"
                for i in range(3):
                    assert await ask(a, addr, b"a%d" % i) == b"u0:a%d" % i
                    assert await ask(b, addr, b"b%d" % i) == b"u1:b%d" % i
                fe = frontend(lb)
                assert len(fe.sessions) == 2
                assert len(u0.peers) == len(u1.peers) == 1  # one backend socket per session
                await apoll_until(lambda: not fe.sessions)
                assert fe.expired == 2
                assert all(b["active"] == 0 for b in lb.snapshot()["default"])
                # After expiry a client gets a new session (round robin goes on).
                assert await ask(a, addr, b"again") == b"u0:again"
                assert fe.opened == 3


async def test_large_datagram_relayed_intact() -> None:
    with UDPBackend("u") as u:
        async with Balancer(lb_config(u.port, mode="udp")) as lb, asyncio.timeout(TIMEOUT):
            with client() as a:
                payload = bytes(range(256)) * 200
                assert await ask(a, lb.address(), payload) == b"u:" + payload


async def test_unreachable_backend_is_ejected_and_client_moves_on() -> None:
    health = HealthConfig(check_interval=None, max_fails=1, ejection_time=60.0)
    dead = free_port(socket.SOCK_DGRAM)
    with UDPBackend("alive") as alive:
        async with Balancer(lb_config(dead, alive.port, mode="udp", health=health)) as lb:
            addr = lb.address()
            with client() as a:
                a.settimeout(0.2)
                replies = []
                for i in range(20):  # the first datagram goes to the dead backend and is lost
                    a.sendto(b"x%d" % i, addr)
                    try:
                        reply, _ = await asyncio.to_thread(a.recvfrom, 100)
                    except TimeoutError:
                        continue
                    replies.append(reply)
                    break
                assert replies
                assert replies[0].startswith(b"alive:")
            assert lb.stats.backend_failures == 1
            assert lb.snapshot()["default"][0]["state"] == "ejected"


async def test_session_limit_and_no_backend_drop_datagrams() -> None:
    limits = BalancerLimits(max_udp_sessions=1)
    with UDPBackend("u") as u:
        async with Balancer(lb_config(u.port, mode="udp", limits=limits)) as lb:
            addr = lb.address()
            with client() as a, client() as b:
                assert await ask(a, addr, b"1") == b"u:1"
                b.sendto(b"2", addr)
                fe = frontend(lb)
                await apoll_until(lambda: fe.dropped == 1)
    async with Balancer(lb_config(free_port(), mode="udp")) as lb:
        # UDP-only pools get no active checks; take the backend down by hand.
        pool = lb.pools["default"]
        for _ in range(pool.health.fall):
            pool.report_check(pool.backends[0], False, 0.0)
        with client() as a:
            a.sendto(b"x", lb.address())
            await apoll_until(lambda: lb.stats.no_backend == 1)
