"""The reference architecture on one machine (``netstack up``).

``netstack up`` starts and supervises a balancer (L7) on one public port, N ``netstack
serve`` processes running the bundled example web app, the gRPC notes service, the chat
service (routed under ``/chat``) and a dashboard (routed under ``/_dashboard``).

:mod:`.topology` is the contract between the supervisor (which starts the processes) and
the dashboard (which watches and controls them).
"""

from netstack.servers.up.topology import Component, Controller, Kind, State

__all__ = ["Component", "Controller", "Kind", "State"]
