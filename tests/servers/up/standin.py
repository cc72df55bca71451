"""A tiny stand-in for the dashboard helper's modules, used ONLY while they are missing.

The product imports ``netstack.servers.up.dashboard`` and ``netstack.servers.up.load``
(built on another branch). Until they land, :func:`install` puts these minimal versions in
``sys.modules`` so the supervisor can be tested; when the real modules exist, it does
nothing and the real ones run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
import types
from typing import Any


class Dashboard:
    """The agreed API: ``Dashboard(controller, interval=1.0)``, ``.app``, ``.close()``."""

    def __init__(self, controller: Any, interval: float = 1.0) -> None:
        self.controller = controller
        self.interval = interval
        self.closed = False

    def app(self, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        rows = [
            {"name": c.name, "state": c.state.value, "pid": c.pid, "restarts": c.restarts}
            for c in self.controller.components()
        ]
        body = json.dumps(
            {
                "script_name": environ.get("SCRIPT_NAME"),
                "path": environ.get("PATH_INFO"),
                "components": rows,
            }
        ).encode()
        start_response(
            "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        )
        return [body]

    def close(self) -> None:
        self.closed = True


async def run_demo_load(
    base_url: str, *, stop: asyncio.Event, rate: float = 50.0, duration: float = 600.0
) -> None:
    """Sends nothing (the real generator is on the dashboard branch)."""


def install() -> None:
    for name, attrs in (
        ("netstack.servers.up.dashboard", {"Dashboard": Dashboard}),
        ("netstack.servers.up.load", {"run_demo_load": run_demo_load}),
    ):
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        module = types.ModuleType(name)
        module.__dict__.update(attrs)
        sys.modules[name] = module
