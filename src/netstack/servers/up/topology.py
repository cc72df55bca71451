"""What ``netstack up`` runs, as the dashboard sees it.

The supervisor owns the child processes and implements :class:`Controller`; the dashboard
only reads :class:`Component` records, scrapes their metrics endpoints and asks the
controller to kill or restore a component. Neither imports the other's internals.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol


class Kind(enum.Enum):
    """The tier a component belongs to."""

    BALANCER = "balancer"
    WEB = "web"
    RPC = "rpc"
    CHAT = "chat"


class State(enum.Enum):
    """A child process's lifecycle state, as the supervisor tracks it."""

    STARTING = "starting"  # spawned, not yet answering
    RUNNING = "running"
    RESTARTING = "restarting"  # crashed; the supervisor is bringing it back
    STOPPED = "stopped"  # killed on request (dashboard/CLI); not restarted until restore()
    FAILED = "failed"  # gave up (startup failure, exit 3, or crash loop)


@dataclass(frozen=True, slots=True)
class Component:
    """One supervised process.

    Attributes:
        name: unique and stable, e.g. ``"balancer"``, ``"web-1"``, ``"web-2"``, ``"rpc"``,
            ``"chat"``; the dashboard shows it and passes it back to the controller.
        kind: its tier.
        address: ``HOST:PORT`` it serves its main protocol on (HTTP, gRPC, chat HTTP/WS).
        metrics_url: its Prometheus text endpoint (``http://HOST:PORT/metrics``), or None.
        admin_url: the balancer's admin API base (``http://HOST:PORT``), balancer only.
        pid: the current process id, or None while it is not running.
        state: the supervisor's view of it.
        restarts: how many times the supervisor restarted it after a crash.
    """

    name: str
    kind: Kind
    address: str
    metrics_url: str | None = None
    admin_url: str | None = None
    pid: int | None = None
    state: State = State.STARTING
    restarts: int = 0


class Controller(Protocol):
    """The supervisor, as the dashboard drives it. Methods are thread-safe."""

    admin_token: str
    """The bearer token of the balancer's admin API (for the dashboard's own reads)."""

    def components(self) -> list[Component]:
        """A consistent snapshot of every component, in a stable display order."""
        ...

    def kill(self, name: str) -> None:
        """SIGKILL the component's process; it stays STOPPED until :meth:`restore`.

        Raises:
            KeyError: no such component.
            ValueError: the component may not be killed (the balancer: it serves the
                dashboard itself).
        """
        ...

    def restore(self, name: str) -> None:
        """Start a STOPPED (or FAILED) component again; a no-op when it is running.

        Raises:
            KeyError: no such component.
        """
        ...
