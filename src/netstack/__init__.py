"""netstack: a Python networking toolkit and server suite.

From raw sockets to a load-balanced multi-tier web system: framed TCP/UDP messaging,
five concurrency models compared, and (in later layers) an HTTP/1.1 WSGI server, an
L4/L7 load balancer, a chat service and a gRPC application service.
"""

from netstack.errors import (
    ConfigError,
    ConnectionClosed,
    LimitExceeded,
    LocalProtocolError,
    NetstackError,
    NetstackTimeout,
    NoBackendAvailable,
    ProtocolError,
    RemoteProtocolError,
)

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ConnectionClosed",
    "LimitExceeded",
    "LocalProtocolError",
    "NetstackError",
    "NetstackTimeout",
    "NoBackendAvailable",
    "ProtocolError",
    "RemoteProtocolError",
    "__version__",
]
