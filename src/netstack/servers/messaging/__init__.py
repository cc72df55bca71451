"""Messaging: framed TCP/UDP echo servers and the request/response client.

``netstack echo serve`` runs :func:`create_server`; ``netstack echo send`` runs
:class:`EchoClient`.
"""

from netstack.servers.messaging.client import EchoClient, EchoReport
from netstack.servers.messaging.server import EchoProtocol, UDPEchoProtocol, create_server

__all__ = ["EchoClient", "EchoProtocol", "EchoReport", "UDPEchoProtocol", "create_server"]
