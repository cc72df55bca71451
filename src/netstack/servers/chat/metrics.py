"""Prometheus metrics of a chat instance (``netstack chat serve --metrics-bind``).

Everything is read from the live server when a scrape comes in, except the message
counter, which :class:`~.service.ChatService` bumps when it accepts a ``say`` or ``dm``.
The figures are this instance's: with ``--redis`` each instance reports its own users and
connections, and a dashboard sums them. Exposed names (the ``netstack up`` dashboard
scrapes these)::

    netstack_chat_users_online                 gauge: distinct users logged in here
    netstack_chat_connections{transport="ws"}  gauge: open connections (ws, tcp)
    netstack_chat_messages_total               counter: room messages and DMs accepted
    netstack_chat_rooms                        gauge: rooms with a member logged in here
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netstack.servers.chat.server import ChatServer


class ChatMetrics:
    """A prometheus_client custom collector over a :class:`ChatServer`."""

    def __init__(self, server: ChatServer) -> None:
        self.server = server

    def connections(self) -> dict[str, int]:
        """Open connections by transport (a TLS listener counts as its plain name)."""
        server = self.server
        ws = server.ws.clients if server.ws is not None else 0
        tcp = len(server.tcp.connections) if server.tcp is not None else 0
        return {"ws": ws, "tcp": tcp}

    def rooms(self) -> int:
        """Rooms at least one session logged in here belongs to."""
        return len(
            {
                room
                for sessions in self.server.service.online.values()
                for s in sessions
                for room in s.rooms
            }
        )

    def collect(self) -> Iterator[Any]:
        """The prometheus_client custom-collector protocol."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        service = self.server.service
        yield GaugeMetricFamily(
            "netstack_chat_users_online",
            "Distinct users logged in on this instance",
            value=len(service.online),
        )
        connections = GaugeMetricFamily(
            "netstack_chat_connections",
            "Open client connections by transport",
            labels=["transport"],
        )
        for transport, n in self.connections().items():
            connections.add_metric([transport], n)
        yield connections
        yield CounterMetricFamily(
            "netstack_chat_messages",
            "Room messages and direct messages accepted from clients",
            value=service.messages_accepted,
        )
        yield GaugeMetricFamily(
            "netstack_chat_rooms",
            "Rooms with at least one member logged in on this instance",
            value=self.rooms(),
        )
