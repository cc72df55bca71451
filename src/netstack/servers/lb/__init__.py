"""Load balancer: ``netstack balance``.

* :class:`Balancer` (server.py): frontends, pools, health checkers, reload, shutdown;
* relay.py: the L4 TCP relay with failover; udp.py: UDP sessions;
* health.py: active checks (:class:`HealthCheck` is the seam for an HTTP check);
* config.py: the full TOML form (:func:`load_config`).
"""

from netstack.servers.lb.config import load as load_config
from netstack.servers.lb.health import HealthCheck, HealthChecker, tcp_connect_check
from netstack.servers.lb.server import FRONTEND_FACTORIES, Balancer, BalancerStats, FrontendState

__all__ = [
    "FRONTEND_FACTORIES",
    "Balancer",
    "BalancerStats",
    "FrontendState",
    "HealthCheck",
    "HealthChecker",
    "load_config",
    "tcp_connect_check",
]
