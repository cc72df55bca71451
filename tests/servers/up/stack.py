"""A real ``netstack up`` for the tests: the supervisor in a thread, its children real
processes, and a plain HTTP client that goes through the balancer."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from netstack.config import UpConfig
from netstack.servers.up.supervisor import Supervisor
from netstack.servers.up.topology import Component, State
from netstack.transport.loop import loop_factory
from tests.helpers import TIMEOUT, poll_until


@dataclass
class Reply:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    @property
    def served_by(self) -> str | None:
        return self.headers.get("X-Served-By")

    def json(self) -> Any:
        return json.loads(self.body)


class Up:
    """The supervisor running on its own event loop in a thread (the dashboard calls the
    Controller from other threads in the same way)."""

    def __init__(self, cfg: UpConfig) -> None:
        self.cfg = cfg
        self.lines: list[str] = []
        self.sup: Supervisor | None = None
        self.failure: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._main, name="netstack-up", daemon=True)

    def _main(self) -> None:
        loop = loop_factory("auto")()
        self._loop = loop
        asyncio.set_event_loop(loop)  # WSGIServer() looks for the thread's loop
        try:
            loop.run_until_complete(self._run())
        except BaseException as exc:
            self.failure = exc
        finally:
            self._ready.set()
            asyncio.set_event_loop(None)
            loop.close()

    async def _run(self) -> None:
        self.sup = sup = Supervisor(self.cfg, write=self.lines.append)
        await sup.start()
        self._ready.set()
        await sup.wait()
        await sup.close()

    def start(self) -> Up:
        self._thread.start()
        # A first start installs nothing but spawns six Python processes on a shared box.
        assert self._ready.wait(12 * TIMEOUT), "netstack up did not start"
        if self.failure is not None:
            raise self.failure
        return self

    def stop(self) -> None:
        if self._loop is not None and self.sup is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self.sup.request_stop)
        self._thread.join(8 * TIMEOUT)
        assert not self._thread.is_alive(), "netstack up did not stop"

    @property
    def supervisor(self) -> Supervisor:
        assert self.sup is not None
        return self.sup

    # ------------------------------------------------------------------ helpers

    @property
    def address(self) -> tuple[str, int]:
        host, port = self.supervisor.public
        return host, port

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        address: tuple[str, int] | None = None,
    ) -> Reply:
        """One request on a new connection (so the balancer picks a backend for each)."""
        host, port = address or self.address
        conn = http.client.HTTPConnection(host, port, timeout=2 * TIMEOUT)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> Reply:
        return self.request("GET", path, **kw)

    def post_json(self, path: str, doc: object) -> Reply:
        return self.request(
            "POST",
            path,
            body=json.dumps(doc).encode(),
            headers={"Content-Type": "application/json"},
        )

    def component(self, name: str) -> Component:
        return next(c for c in self.supervisor.components() if c.name == name)

    def wait_state(self, name: str, state: State, timeout: float = 3 * TIMEOUT) -> Component:
        poll_until(lambda: self.component(name).state == state, timeout=timeout)
        return self.component(name)

    def wait_serving(self, names: set[str], timeout: float = 4 * TIMEOUT) -> None:
        """Until requests through the balancer have been answered by each of ``names``."""
        seen: set[str] = set()

        def all_seen() -> bool:
            reply = self.get("/healthz")
            if reply.status == 200 and reply.served_by:
                seen.add(reply.served_by)
            return names <= seen

        poll_until(all_seen, timeout=timeout, interval=0.05)


def processes_in_sessions(sessions: set[int]) -> list[int]:
    """Pids of live processes whose session is one of ``sessions`` (children of up run in
    their own sessions, so this finds a netstack serve worker left by its master too)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, session = fields[0], int(fields[3])
        if session in sessions and state != "Z":
            found.append(int(entry))
    return found
