"""Pins the balancer's public API, which the L7 frontend will build on."""

from __future__ import annotations

import netstack.proto.balance as balance
import netstack.servers.lb as lb


def test_balance_exports() -> None:
    assert set(balance.__all__) == {
        "SLOW_START_FLOOR",
        "VNODES",
        "Admin",
        "Backend",
        "BackendEvent",
        "Pool",
        "RandomSource",
        "State",
        "hash_key",
        "make_pool",
    }


def test_lb_exports() -> None:
    assert set(lb.__all__) == {
        "FRONTEND_FACTORIES",
        "Balancer",
        "BalancerStats",
        "Connection",
        "FrontendState",
        "HealthCheck",
        "HTTPListener",
        "HealthChecker",
        "Listener",
        "check_for",
        "load_config",
        "tcp_connect_check",
    }
    for name in lb.__all__:
        assert hasattr(lb, name)
    assert set(lb.FRONTEND_FACTORIES) == {"tcp", "udp", "http"}
