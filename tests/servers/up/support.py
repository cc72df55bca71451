"""A real little topology for the dashboard tests, and the controller that drives it.

:class:`ProcController` implements :class:`netstack.servers.up.topology.Controller` over
real processes: a ``netstack balance --mode http`` with its admin API in front of two
``netstack serve --metrics-bind`` processes. ``kill`` is a real SIGKILL of the web
server's process group; ``restore`` starts it again on the same ports.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from netstack.servers.up.topology import Component, Kind, State
from tests.helpers import TIMEOUT, free_port
from tests.servers.wsgi.procs import Serve

TOKEN = "dashboard-test-token-0123456789"


class Web:
    def __init__(self, name: str, root: Path) -> None:
        self.name = name
        self.cwd = root / name
        self.cwd.mkdir()
        self.port = free_port()
        self.metrics_port = free_port()
        self.proc: Serve | None = None
        self.state = State.STOPPED
        self.starts = 0

    def start(self) -> None:
        self.proc = Serve(
            self.cwd,
            "--bind",
            f"127.0.0.1:{self.port}",
            "--metrics-bind",
            f"127.0.0.1:{self.metrics_port}",
            "--no-access-log",
        )
        self.starts += 1
        self.state = State.RUNNING

    def kill(self) -> None:
        proc, self.proc = self.proc, None
        self.state = State.STOPPED
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.proc.wait(TIMEOUT)
            proc.kill()  # closes its pipes

    def component(self) -> Component:
        return Component(
            name=self.name,
            kind=Kind.WEB,
            address=f"127.0.0.1:{self.port}",
            metrics_url=f"http://127.0.0.1:{self.metrics_port}/metrics",
            pid=self.proc.pid if self.proc else None,
            state=self.state,
            restarts=max(0, self.starts - 1),
        )


class Balancer:
    """``netstack balance --mode http`` over the web servers, admin API on its own port."""

    def __init__(self, ports: list[int]) -> None:
        self.port = free_port()
        self.admin_port = free_port()
        cmd = [
            sys.executable,
            "-m",
            "netstack",
            "balance",
            "--mode",
            "http",
            "--listen",
            f"127.0.0.1:{self.port}",
            *[arg for port in ports for arg in ("--backend", f"127.0.0.1:{port}")],
            "--admin-bind",
            f"127.0.0.1:{self.admin_port}",
            "--check-interval",
            "0.5",
            # A killed backend is ejected after failed connects; the default 10 s ejection
            # would make the restore half of a test wait that long.
            "--ejection-time",
            "1",
        ]
        env = {**os.environ, "NETSTACK_ADMIN_TOKEN": TOKEN, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        ready = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if "admin API on" in line:
                    ready.set()
            ready.set()

        self.reader = threading.Thread(target=pump, daemon=True)
        self.reader.start()
        if not ready.wait(3 * TIMEOUT) or self.proc.poll() is not None:
            self.close()
            raise AssertionError("the balancer did not start:\n" + "".join(self.lines))

    def component(self) -> Component:
        return Component(
            name="balancer",
            kind=Kind.BALANCER,
            address=f"127.0.0.1:{self.port}",
            admin_url=f"http://127.0.0.1:{self.admin_port}",
            pid=self.proc.pid,
            state=State.RUNNING if self.proc.poll() is None else State.FAILED,
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(3 * TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(TIMEOUT)
        self.reader.join(TIMEOUT)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class ProcController:
    """The topology :class:`~netstack.servers.up.topology.Controller`, over real processes."""

    admin_token = TOKEN

    def __init__(self, root: Path, *, web: int = 2) -> None:
        self.lock = threading.Lock()
        self.web = [Web(f"web-{i}", root) for i in range(1, web + 1)]
        self.balancer: Balancer | None = None
        self.calls: list[tuple[str, str]] = []
        try:
            for w in self.web:
                w.start()
            self.balancer = Balancer([w.port for w in self.web])
        except BaseException:
            self.close()
            raise

    def components(self) -> list[Component]:
        with self.lock:
            assert self.balancer is not None
            return [self.balancer.component(), *(w.component() for w in self.web)]

    def _find(self, name: str) -> Web:
        for w in self.web:
            if w.name == name:
                return w
        if name == "balancer":
            raise ValueError("the balancer serves the dashboard; it cannot be killed")
        raise KeyError(name)

    def kill(self, name: str) -> None:
        with self.lock:
            self.calls.append(("kill", name))
            self._find(name).kill()

    def restore(self, name: str) -> None:
        with self.lock:
            self.calls.append(("restore", name))
            if name == "balancer":
                return
            w = self._find(name)
            if w.proc is None:
                w.start()

    def url(self, path: str = "/") -> str:
        assert self.balancer is not None
        return f"http://127.0.0.1:{self.balancer.port}{path}"

    def close(self) -> None:
        if self.balancer is not None:
            self.balancer.close()
        for w in self.web:
            if w.proc is not None:
                w.proc.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def post(port: int, path: str, **headers: str) -> tuple[int, Any]:
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3 * TIMEOUT)
    try:
        conn.request("POST", path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return resp.status, json.loads(body) if body else None
    finally:
        conn.close()


class DashServer:
    """The dashboard's WSGI app on a real netstack WSGIServer (threads mode), mounted under
    ``/_dashboard`` as the balancer routes it, on its own event loop in a thread so the
    tests can be plain blocking code."""

    def __init__(self, app: Any, *, threads: int = 8) -> None:
        import asyncio

        from netstack.config import WSGIServerConfig
        from netstack.servers.wsgi import WSGIServer

        self.port = 0
        self.error: BaseException | None = None
        ready = threading.Event()
        cfg = WSGIServerConfig(
            app="dashboard:app",
            bind=("127.0.0.1:0",),
            threads=threads,
            root_path="/_dashboard",
            access_log=False,
        )

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            self.stop = asyncio.Event()
            try:
                async with WSGIServer(cfg, app) as server:
                    self.port = server.addresses[0][1]
                    ready.set()
                    await self.stop.wait()
            except BaseException as exc:
                self.error = exc
                ready.set()

        self.thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
        self.thread.start()
        if not ready.wait(3 * TIMEOUT) or self.error is not None:
            raise AssertionError(f"the dashboard server did not start: {self.error!r}")

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}/_dashboard{path}"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(3 * TIMEOUT)
        assert not self.thread.is_alive(), "the dashboard server did not stop"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class Exporter:
    """A real HTTP server on loopback serving whatever text a test sets: a stand-in for a
    process's /metrics (and the balancer's /api/backends), with counters the test chooses
    (resets, restarts, odd values) instead of waiting for real traffic to produce them."""

    def __init__(self, token: str | None = None) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.pages: dict[str, tuple[int, str]] = {}
        self.token = token
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                token = outer.token
                if (
                    token is not None
                    and self.path.startswith("/api/")
                    and self.headers.get("Authorization") != f"Bearer {token}"
                ):
                    self._send(401, "unauthorized\n")
                    return
                status, text = outer.pages.get(self.path, (404, "not found\n"))
                self._send(status, text)

            def _send(self, status: int, text: str) -> None:
                body = text.encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def url(self, path: str = "/metrics") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def set(self, text: str, path: str = "/metrics", status: int = 200) -> None:
        self.pages[path] = (status, text)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(TIMEOUT)


class Traffic:
    """Keep-alive GETs through the balancer from one thread, bounded in count and time."""

    def __init__(self, port: int, max_requests: int = 20_000) -> None:
        self.port = port
        self.max_requests = max_requests
        self.stop = threading.Event()
        self.ok = 0
        self.failed = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 20 * TIMEOUT
        conn = None
        for _ in range(self.max_requests):
            if self.stop.is_set() or time.monotonic() > deadline:
                break
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                if resp.status == 200:
                    self.ok += 1
                else:
                    self.failed += 1
            except OSError:
                self.failed += 1
                if conn is not None:
                    conn.close()
                conn = None
            # Pace it a little: the 2-core machine is shared, and figures need no flood.
            self.stop.wait(0.002)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2 * TIMEOUT)
