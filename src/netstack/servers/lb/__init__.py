"""Load balancer: ``netstack balance``.

* :class:`Balancer` (server.py): frontends, pools, health checkers, reload, shutdown;
  :data:`FRONTEND_FACTORIES` maps a frontend mode to its :class:`Listener` (L7 adds
  ``"http"``), and :class:`Connection` is what the balancer tracks per client;
* relay.py: the L4 TCP relay with failover; udp.py: UDP sessions;
* health.py: active checks (:class:`HealthCheck` is the seam for an HTTP check);
* config.py: the full TOML form (:func:`load_config`).
"""

from netstack.servers.lb.config import load as load_config
from netstack.servers.lb.health import HealthCheck, HealthChecker, check_for, tcp_connect_check
from netstack.servers.lb.http import HTTPListener
from netstack.servers.lb.server import (
    FRONTEND_FACTORIES,
    Balancer,
    BalancerStats,
    Connection,
    FrontendState,
    Listener,
)

FRONTEND_FACTORIES["http"] = HTTPListener

__all__ = [
    "FRONTEND_FACTORIES",
    "Balancer",
    "BalancerStats",
    "Connection",
    "FrontendState",
    "HTTPListener",
    "HealthCheck",
    "HealthChecker",
    "Listener",
    "check_for",
    "load_config",
    "tcp_connect_check",
]
