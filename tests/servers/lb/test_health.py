"""Active checks, timed ejection ends, admin states, and the check seam, on real sockets."""

from __future__ import annotations

import asyncio
import logging
import socket

from netstack.config import HealthConfig
from netstack.proto.balance import Admin, Backend
from netstack.servers.lb import Balancer
from netstack.servers.lb.health import check_for, tcp_connect_check
from tests.helpers import apoll_until, free_port
from tests.servers.lb.support import (
    TCPBackend,
    echo_until_eof,
    lb_config,
    refused,
    reply_line,
    request,
)


def state(lb: Balancer, i: int) -> str:
    return lb.snapshot()["default"][i]["state"]


async def test_active_checks_take_a_backend_down_and_bring_it_back(caplog) -> None:
    caplog.set_level(logging.INFO, logger="netstack.servers.lb")
    port = free_port()
    health = HealthConfig(check_interval=0.05, check_timeout=0.5, fall=2, rise=2)
    with TCPBackend(reply_line, name="alive") as alive:
        async with Balancer(lb_config(port, alive.port, health=health)) as lb:
            await apoll_until(lambda: state(lb, 0) == "down")
            assert lb.checkers["default"].rounds >= 2
            lb_port = lb.address()[1]
            for _ in range(3):
                assert await asyncio.to_thread(request, lb_port, b"q\n") == b"alive q\n"
            assert lb.stats.backend_failures == 0  # never tried: the checks took it out
            with TCPBackend(reply_line, name="back", port=port):
                await apoll_until(lambda: state(lb, 0) == "up")
                replies = {await asyncio.to_thread(request, lb_port, b"q\n") for _ in range(4)}
                assert replies == {b"alive q\n", b"back q\n"}
    changes = lb.stats.state_changes
    assert changes[("default", f"127.0.0.1:{port}", "down")] == 1
    assert changes[("default", f"127.0.0.1:{port}", "up")] == 1
    assert caplog.text.count("up -> down (2 checks failed)") == 1
    assert caplog.text.count("down -> up (2 checks passed)") == 1


async def test_ejection_ends_on_time_without_traffic(caplog) -> None:
    caplog.set_level(logging.INFO, logger="netstack.servers.lb")
    health = HealthConfig(check_interval=None, max_fails=1, ejection_time=0.2)
    with TCPBackend(reply_line, name="alive") as alive:
        async with Balancer(lb_config(free_port(), alive.port, health=health)) as lb:
            await asyncio.to_thread(request, lb.address()[1], b"q\n")
            assert state(lb, 0) == "ejected"
            await apoll_until(lambda: state(lb, 0) == "up")  # the checker's wakeup timer
            assert "ejected -> up (ejection period over)" in caplog.text


async def test_check_seam_takes_any_probe() -> None:
    probed: list[str] = []

    async def always_bad(backend: Backend, timeout: float) -> bool:  # noqa: ASYNC109
        probed.append(backend.name)
        return False

    health = HealthConfig(check_interval=0.05, fall=1)
    with TCPBackend(reply_line) as b:
        lb = Balancer(lb_config(b.port, health=health), check_factory=lambda pc, modes: always_bad)
        async with lb:
            await apoll_until(lambda: state(lb, 0) == "down")
            assert probed
            assert await asyncio.to_thread(refused, lb.address()[1])
            assert lb.stats.no_backend == 1


async def test_tcp_connect_check_and_default_choice() -> None:
    with TCPBackend(reply_line) as b:
        assert await tcp_connect_check(Backend("b", "127.0.0.1", b.port), 1.0)
    assert not await tcp_connect_check(Backend("d", "127.0.0.1", free_port()), 1.0)
    pool = lb_config(1, health=HealthConfig()).pools[0]
    assert check_for(pool, {"tcp"}) is tcp_connect_check
    assert check_for(pool, {"udp"}) is None  # UDP-only pools rely on passive results


async def test_draining_backend_keeps_its_relays_takes_no_new_ones() -> None:
    with TCPBackend(echo_until_eof, name="d") as d, TCPBackend(reply_line, name="o") as other:
        async with Balancer(lb_config(d.port, other.port)) as lb:
            port = lb.address()[1]
            held = socket.create_connection(("127.0.0.1", port))
            with held:
                held.sendall(b"1")
                assert await asyncio.to_thread(held.recv, 1) == b"1"  # round robin: d first
                pool = lb.pools["default"]
                pool.set_admin(pool.backends[0], Admin.DRAINING, 0.0)
                for _ in range(3):
                    assert await asyncio.to_thread(request, port, b"n\n") == b"o n\n"
                held.sendall(b"2")
                assert await asyncio.to_thread(held.recv, 1) == b"2"
            lb.report_events(pool)
            assert lb.stats.state_changes[("default", f"127.0.0.1:{d.port}", "draining")] == 1


async def test_metrics_text_counts_state_changes_and_connections() -> None:
    health = HealthConfig(check_interval=None, max_fails=1, ejection_time=60.0)
    dead = free_port()
    with TCPBackend(reply_line, name="alive") as alive:
        async with Balancer(lb_config(dead, alive.port, health=health)) as lb:
            await asyncio.to_thread(request, lb.address()[1], b"q\n")
            await apoll_until(lambda: not lb.connections)
            text = lb.metrics()
    lines = set(text.splitlines())
    assert "netstack_lb_connections_accepted_total 1" in lines
    assert "netstack_lb_backend_failures_total 1" in lines
    assert f'netstack_lb_backend_up{{pool="default",backend="127.0.0.1:{dead}"}} 0' in lines
    assert f'netstack_lb_backend_up{{pool="default",backend="127.0.0.1:{alive.port}"}} 1' in lines
    assert (
        f'netstack_lb_backend_state_changes_total{{pool="default",backend="127.0.0.1:{dead}",'
        'state="ejected"} 1'
    ) in lines
    assert "# TYPE netstack_lb_backend_active gauge" in lines
    assert text.endswith("\n")


async def test_admin_operations_drain_disable_add_remove() -> None:
    from netstack.config import BackendConfig

    with (
        TCPBackend(echo_until_eof, name="a") as a,
        TCPBackend(reply_line, name="b") as b,
        TCPBackend(reply_line, name="c") as c,
    ):
        async with Balancer(lb_config(a.port, b.port)) as lb:
            port = lb.address()[1]
            held = socket.create_connection(("127.0.0.1", port), timeout=5)
            with held:
                held.sendall(b"1")
                assert await asyncio.to_thread(held.recv, 1) == b"1"  # on a
                a_name = f"127.0.0.1:{a.port}"
                lb.set_admin("default", a_name, Admin.DISABLED)  # closes a's relays
                assert await asyncio.to_thread(held.recv, 1) == b""
            added = lb.add_backend("default", BackendConfig(address=f"127.0.0.1:{c.port}"))
            lb.remove_backend("default", f"127.0.0.1:{b.port}")
            assert await asyncio.to_thread(request, port, b"x\n") == b"c x\n"
            assert added.total == 1
            assert lb.stats.state_changes[("default", a_name, "disabled")] == 1
