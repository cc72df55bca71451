"""The ``netstack up`` supervisor: starts, watches, restarts and stops the child processes.

Theory of operation
-------------------
Ports are chosen once, at start (:func:`pick_ports`), and kept for the life of the
supervisor, so a restarted child comes back on the same address and the balancer's
generated config never changes. Each child is a real ``python -m netstack ...``
subprocess in its own session (process group): Ctrl-C in the terminal reaches only the
supervisor, which then stops the tiers in order, and a child's whole tree (a ``netstack
serve`` master and its workers) can be signalled at once.

Each :class:`Child` runs one loop task: spawn, poll its readiness probe (an HTTP
``/healthz`` or a TCP connect; never a sleep standing in for readiness) until it answers
or the process exits, then wait for the exit. An exit nobody asked for is a crash: the
child is restarted after a backoff (0.5 s doubling to 8 s), and after ``CRASH_LIMIT``
crashes within ``CRASH_WINDOW`` seconds, or an exit with status 3 (startup failure), it is
FAILED and left alone. :meth:`Supervisor.kill` sends SIGKILL and marks it STOPPED (never
restarted); :meth:`Supervisor.restore` starts a STOPPED or FAILED child again.

Startup order: notes (gRPC) and chat services and the web servers together (the web app
reaches the notes service lazily), then the dashboard, served in this process by
netstack's WSGI server, then the balancer, whose public port opens last, when everything
behind it answers. Shutdown runs the other way: balancer first, then the dashboard and
the web servers, then the services. Each child gets SIGTERM and ``STOP_TIMEOUT`` seconds,
then SIGKILL on its process group.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import importlib.util
import ipaddress
import json
import logging
import os
import random
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from netstack.config import (
    ChatServerConfig,
    RPCServerConfig,
    UpConfig,
    WSGIServerConfig,
    parse_hostport,
    specs,
)
from netstack.servers.procutil import PARENT_ENV
from netstack.servers.up.topology import Component, Kind, State

if TYPE_CHECKING:
    from netstack.servers.wsgi import WSGIServer

logger = logging.getLogger(__name__)

HOST: Final = "127.0.0.1"
# A child must answer its probe within this after spawning (gRPC and Flask imports take a
# few seconds of CPU on a small, busy machine).
READY_TIMEOUT: Final = 60.0
PROBE_INTERVAL: Final = 0.05
STOP_TIMEOUT: Final = 10.0
BACKOFF_INITIAL: Final = 0.5
BACKOFF_MAX: Final = 8.0
# systemd's default StartLimitBurst=5 in StartLimitIntervalSec=10s; children here take
# seconds to start, so a longer window.
CRASH_LIMIT: Final = 5
CRASH_WINDOW: Final = 60.0
# A child that stayed up this long after being ready starts its backoff afresh.
STABLE_AFTER: Final = 30.0
STARTUP_FAILURE_STATUS: Final = 3
WEB_APP: Final = "netstack.servers.up.web:create_app"
DASHBOARD_PREFIX: Final = "/_dashboard"
CHAT_PREFIX: Final = "/chat/"
DISPLAY_ORDER: Final = {Kind.BALANCER: 0, Kind.WEB: 1, Kind.RPC: 2, Kind.CHAT: 3}
# ANSI colours for the name prefixes (when the output is a terminal).
COLOURS: Final = ("36", "32", "35", "33", "34", "96", "92", "95", "93", "94")


class UpStartupError(Exception):
    """``netstack up`` could not start (a port in use, a child that would not start)."""


# --------------------------------------------------------------------------- ports


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            return int(fh.read().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: the IANA range starts here
        return 49152


def pick_ports(count: int, host: str = HOST) -> list[int]:
    """``count`` distinct TCP ports nobody listens on, below the ephemeral range.

    A port from ``bind(0)`` is ephemeral: once released, the kernel may give it to an
    outgoing connection (the balancer's own health checks) before the child binds it. A
    port below the range is only taken by something that binds it on purpose.
    """
    low = _ephemeral_low()
    rng = random.Random()
    held: list[socket.socket] = []
    try:
        for _ in range(count * 50):
            if len(held) == count:
                break
            probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                probe.bind((host, rng.randrange(20_000, max(low, 20_001))))
            except OSError:
                probe.close()
                continue
            held.append(probe)
        if len(held) < count:
            raise UpStartupError(f"cannot find {count} free ports on {host}")
        return [s.getsockname()[1] for s in held]
    finally:
        for probe in held:
            probe.close()


def check_bindable(address: str) -> None:
    """Fail early, with the OS's reason, when the public address cannot be bound.

    Raises:
        UpStartupError: ``cannot bind HOST:PORT: Address already in use``.
    """
    host, port = parse_hostport(address, field="listen")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the balancer
            probe.bind((host, port))
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UpStartupError(f"cannot bind {address}: {reason}") from None


# --------------------------------------------------------------------------- probes


async def tcp_ok(host: str, port: int) -> bool:
    """Whether ``host:port`` accepts a TCP connection within a second."""
    from netstack.servers.lb.health import tcp_connects

    return await tcp_connects(host, port, 1.0)


async def http_ok(host: str, port: int, path: str) -> bool:
    """Whether ``GET path`` on ``host:port`` answers 2xx within a second."""
    writer = None
    try:
        async with asyncio.timeout(1.0):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
            )
            line = await reader.readline()
    except (OSError, TimeoutError):
        return False
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    parts = line.split()
    return len(parts) >= 2 and parts[1][:1] == b"2"


# --------------------------------------------------------------------------- children


@dataclasses.dataclass(slots=True)
class ChildSpec:
    """How to start and probe one child.

    Attributes:
        name: component name (``web-1``).
        kind: its tier.
        argv: the arguments after ``python -m netstack``.
        env: extra environment variables (secrets go here, not on the command line).
        address: ``HOST:PORT`` of its main protocol.
        probe: answers True once the child serves.
        metrics_url: its Prometheus endpoint, or None.
        admin_url: the balancer's admin API base, or None.
    """

    name: str
    kind: Kind
    argv: list[str]
    env: dict[str, str]
    address: str
    probe: Callable[[], Awaitable[bool]]
    metrics_url: str | None = None
    admin_url: str | None = None


class Child:
    """One supervised process and its restart loop."""

    def __init__(self, sup: Supervisor, spec: ChildSpec, colour: str | None) -> None:
        self.sup = sup
        self.spec = spec
        self.name = spec.name
        self.proc: asyncio.subprocess.Process | None = None
        self.state = State.STARTING
        self.restarts = 0
        # Set by Supervisor.kill: the next exit was asked for, even if a restore came since.
        self.killed = False
        self.crashes: collections.deque[float] = collections.deque(maxlen=CRASH_LIMIT)
        self.consecutive = 0
        self.tail: collections.deque[str] = collections.deque(maxlen=6)
        self.wake = asyncio.Event()
        # None once ready; the reason when the first start failed.
        self.first_start: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self.prefix = f"{spec.name:<9}| "
        if colour is not None:
            self.prefix = f"\x1b[{colour}m{self.prefix}\x1b[0m"

    # ------------------------------------------------------------------ view

    def component(self) -> Component:
        proc = self.proc
        running = proc is not None and proc.returncode is None
        return Component(
            name=self.name,
            kind=self.spec.kind,
            address=self.spec.address,
            metrics_url=self.spec.metrics_url,
            admin_url=self.spec.admin_url,
            pid=proc.pid if running and proc is not None else None,
            state=self.state,
            restarts=self.restarts,
        )

    def current(self) -> State:
        with self.sup.lock:
            return self.state

    def _was_killed(self) -> bool:
        with self.sup.lock:
            killed, self.killed = self.killed, False
            return killed

    def _set(self, state: State) -> None:
        with self.sup.lock:
            self.state = state

    # ------------------------------------------------------------------ loop

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            if not self.first_start.done():
                self.first_start.set_result(f"{self.name} did not start")

    async def _run(self) -> None:
        while not self.sup.stopping:
            if self.state in (State.STOPPED, State.FAILED):
                await self.wake.wait()
                self.wake.clear()
                continue
            code, was_ready, ran = await self._run_once()
            if self.sup.stopping:
                return
            if self._was_killed():
                if self.current() == State.STOPPED:  # else restored already: start again
                    self.sup.say(
                        f"{self.name} exited ({_describe_exit(code)}); stopped until restored"
                    )
                if not self.first_start.done():
                    self.first_start.set_result(f"{self.name} was stopped while starting")
                continue
            why = _describe_exit(code)
            if not self.first_start.done():
                reason = self.tail[-1].removeprefix("netstack: error: ") if self.tail else why
                self.first_start.set_result(f"{self.name} could not start: {reason}")
                self._set(State.FAILED)
                return
            now = time.monotonic()
            self.crashes.append(now)
            if code == STARTUP_FAILURE_STATUS:
                self.sup.say(f"{self.name} failed to start ({why}); giving up, restore to retry")
                self._set(State.FAILED)
                continue
            if len(self.crashes) == CRASH_LIMIT and now - self.crashes[0] < CRASH_WINDOW:
                self.sup.say(
                    f"{self.name} crashed {CRASH_LIMIT} times in {CRASH_WINDOW:.0f}s "
                    f"({why}); giving up, restore to retry"
                )
                self._set(State.FAILED)
                continue
            self.consecutive = 1 if was_ready and ran >= STABLE_AFTER else self.consecutive + 1
            delay = min(BACKOFF_MAX, BACKOFF_INITIAL * 2 ** (self.consecutive - 1))
            self.sup.say(f"{self.name} crashed ({why}); restarting in {delay:.1f}s")
            with self.sup.lock:
                self.state = State.RESTARTING
                self.restarts += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self.sup.stop_event.wait()

    async def _run_once(self) -> tuple[int, bool, float]:
        """Spawn, wait until ready or exited, wait for the exit: (status, was ready, uptime)."""
        self._set(State.STARTING)
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.sup.python,
                "-m",
                "netstack",
                *self.spec.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=self.sup.child_env(self.spec.env),
                start_new_session=True,
                limit=1 << 20,
            )
        except OSError as exc:
            self.tail.append(f"cannot run {self.sup.python[0]}: {exc.strerror or exc}")
            return -1, False, 0.0
        with self.sup.lock:
            self.proc = proc
        assert proc.stdout is not None
        assert proc.stderr is not None
        pumps = [
            asyncio.create_task(self._pump(proc.stdout)),
            asyncio.create_task(self._pump(proc.stderr)),
        ]
        exited = asyncio.create_task(proc.wait())
        ready_at = None
        try:
            if await self._wait_ready(exited):
                ready_at = time.monotonic()
                with self.sup.lock:
                    if self.state == State.STARTING:
                        self.state = State.RUNNING
                if not self.first_start.done():
                    self.first_start.set_result(None)
            code = await exited
            await asyncio.wait(pumps, timeout=1.0)
        finally:
            for task in (exited, *pumps):
                task.cancel()
            _signal_group(proc.pid, signal.SIGKILL)  # workers left behind by a dead master
        ran = time.monotonic() - ready_at if ready_at is not None else 0.0
        return code, ready_at is not None, ran

    async def _wait_ready(self, exited: asyncio.Task[int]) -> bool:
        deadline = time.monotonic() + READY_TIMEOUT
        while not exited.done():
            if await self.spec.probe():
                return True
            if time.monotonic() > deadline:
                self.tail.append(f"not ready after {READY_TIMEOUT:.0f}s")
                self.signal(signal.SIGKILL)
                return False
            await asyncio.wait({exited}, timeout=PROBE_INTERVAL)
        return False

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line over the limit: show it in pieces
                line = await stream.read(1 << 16)
            if not line:
                return
            text = line.decode("utf-8", "replace").rstrip()
            if text:
                self.tail.append(text)
                self.sup.write(self.prefix + text)

    # ------------------------------------------------------------------ control

    def signal(self, sig: int) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL on the whole group after STOP_TIMEOUT."""
        task = self.task
        proc = self.proc
        if proc is not None and proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await proc.wait()
            except TimeoutError:
                self.sup.say(f"{self.name} did not stop within {STOP_TIMEOUT:.0f}s: killing it")
                _signal_group(proc.pid, signal.SIGKILL)
        if task is not None and not task.done():
            self.wake.set()
            try:
                async with asyncio.timeout(STOP_TIMEOUT):
                    await task
            except TimeoutError:  # its output pipes stay open (a grandchild holds them)
                task.cancel()
                if proc is not None:
                    _signal_group(proc.pid, signal.SIGKILL)
                with contextlib.suppress(asyncio.CancelledError):
                    await task


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


# --------------------------------------------------------------------------- supervisor


def _loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) is only reachable from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/netstack`` when XDG_DATA_HOME is set, else ``./netstack-data``."""
    xdg = os.environ.get("XDG_DATA_HOME")
    return Path(xdg) / "netstack" if xdg else Path("netstack-data")


def _has_setting(cls: type[Any], name: str) -> bool:
    return any(s.name == name for s in specs(cls))


class Supervisor:
    """Runs the reference architecture and implements the dashboard's Controller.

    ``await sup.start()`` brings everything up (raises :class:`UpStartupError`), then
    ``await sup.wait()`` returns once ``sup.stop_event`` is set, and ``await sup.close()``
    shuts down in order. ``components``/``kill``/``restore`` are thread-safe.

    Args:
        cfg: the configuration.
        write: where prefixed child output and supervisor notes go (one line per call).
        python: the interpreter command that runs ``-m netstack``.
        colour: colour the name prefixes (a terminal).
        log_level: the children's ``NETSTACK_LOG_LEVEL`` (None: inherited).
    """

    def __init__(
        self,
        cfg: UpConfig,
        *,
        write: Callable[[str], None] | None = None,
        python: Sequence[str] = (sys.executable,),
        colour: bool = False,
        log_level: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.log_level = log_level
        self.python = list(python)
        self._write = write or (lambda line: print(line, flush=True))
        self.colour = colour
        self.admin_token = cfg.admin_token or secrets.token_urlsafe(24)
        self.rpc_token = secrets.token_urlsafe(24)
        self.lock = threading.Lock()
        self.stopping = False
        self.interrupted = False
        self.stop_event = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.children: dict[str, Child] = {}
        self.data_dir = Path(cfg.data_dir) if cfg.data_dir else default_data_dir()
        self.dashboard: Any = None
        self.dashboard_server: WSGIServer | None = None
        self.urls: dict[str, str] = {}
        self.public: tuple[str, int] = (HOST, 0)  # the balancer's address, once planned
        self._config_path = self.data_dir / "up-balancer.toml"
        self._balancer_toml = ""
        self.started_in: float | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._closed = False

    # ------------------------------------------------------------------ Controller

    def components(self) -> list[Component]:
        with self.lock:
            children = sorted(self.children.values(), key=lambda c: DISPLAY_ORDER[c.spec.kind])
            return [child.component() for child in children]

    def kill(self, name: str) -> None:
        child = self.children[name]  # KeyError: no such component
        if child.spec.kind == Kind.BALANCER:
            raise ValueError("the balancer serves the dashboard itself; it cannot be killed")
        with self.lock:
            child.state = State.STOPPED
            proc = child.proc
            if proc is not None and proc.returncode is None:
                child.killed = True
                _signal_group(proc.pid, signal.SIGKILL)
        self.loop.call_soon_threadsafe(self.say, f"{name}: killed (SIGKILL) on request")

    def restore(self, name: str) -> None:
        child = self.children[name]  # KeyError: no such component
        with self.lock:
            if child.state not in (State.STOPPED, State.FAILED):
                return
            child.state = State.STARTING
            child.crashes.clear()
            child.consecutive = 0
        self.loop.call_soon_threadsafe(child.wake.set)
        self.loop.call_soon_threadsafe(self.say, f"{name}: restore requested")

    # ------------------------------------------------------------------ output

    def write(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):  # a closed terminal must not stop us
            self._write(line)

    def say(self, text: str) -> None:
        self.write(("\x1b[1mup       | \x1b[0m" if self.colour else "up       | ") + text)

    def child_env(self, extra: dict[str, str]) -> dict[str, str]:
        """The environment without the user's NETSTACK_* settings (they are for ``up``),
        keeping the log settings, plus ``extra``."""
        keep = {"NETSTACK_LOG_LEVEL", "NETSTACK_LOG_FORMAT", "NETSTACK_TRACEBACK"}
        env = {k: v for k, v in os.environ.items() if not k.startswith("NETSTACK_") or k in keep}
        env["PYTHONUNBUFFERED"] = "1"
        # A supervisor killed with SIGKILL leaves no children serving on behind it.
        env[PARENT_ENV] = str(os.getpid())
        if self.log_level is not None:
            env["NETSTACK_LOG_LEVEL"] = self.log_level
        env.update(extra)
        return env

    # ------------------------------------------------------------------ plan

    def _plan(self) -> tuple[list[ChildSpec], ChildSpec, int]:
        cfg = self.cfg
        n = cfg.web_servers
        # rpc, chat and each web server: a port and a metrics port; admin, dashboard, and
        # the public port when --listen asks for port 0.
        ports = iter(pick_ports(2 * n + 7))
        metrics = importlib.util.find_spec("prometheus_client") is not None
        store = ["--db", cfg.db] if cfg.db else ["--data-dir", str(self.data_dir)]
        specs_: list[ChildSpec] = []

        def metrics_args(cls: type[Any] | None) -> tuple[list[str], str | None]:
            port = next(ports)
            if not metrics or (cls is not None and not _has_setting(cls, "metrics_bind")):
                return [], None
            return ["--metrics-bind", f"{HOST}:{port}"], f"http://{HOST}:{port}/metrics"

        rpc_port = next(ports)
        extra, url = metrics_args(RPCServerConfig)
        specs_.append(
            ChildSpec(
                name="rpc",
                kind=Kind.RPC,
                argv=["rpc", "serve", "--bind", f"{HOST}:{rpc_port}", *store, *extra],
                env={"NETSTACK_TOKEN": self.rpc_token},
                address=f"{HOST}:{rpc_port}",
                probe=lambda: tcp_ok(HOST, rpc_port),
                metrics_url=url,
            )
        )
        chat_port = next(ports)
        extra, url = metrics_args(ChatServerConfig)
        redis = ["--redis", cfg.redis] if cfg.redis else []
        specs_.append(
            ChildSpec(
                name="chat",
                kind=Kind.CHAT,
                argv=[
                    "chat",
                    "serve",
                    "--bind",
                    f"{HOST}:{chat_port}",
                    "--tcp-bind",
                    "none",
                    *store,
                    *redis,
                    *extra,
                ],
                env={},
                address=f"{HOST}:{chat_port}",
                probe=lambda: http_ok(HOST, chat_port, "/healthz"),
                metrics_url=url,
            )
        )
        for i in range(1, n + 1):
            port = next(ports)
            extra, url = metrics_args(WSGIServerConfig)
            specs_.append(
                ChildSpec(
                    name=f"web-{i}",
                    kind=Kind.WEB,
                    argv=[
                        "serve",
                        WEB_APP,
                        "--factory",
                        "--bind",
                        f"{HOST}:{port}",
                        "--workers",
                        "1",
                        # A person watches the dashboard; a line per request would bury
                        # the lines that matter (crashes, restarts).
                        "--no-access-log",
                        *extra,
                    ],
                    env={
                        "NETSTACK_NOTES_RPC": f"{HOST}:{rpc_port}",
                        "NETSTACK_NOTES_TOKEN": self.rpc_token,
                        "NETSTACK_SERVED_BY": f"web-{i}",
                    },
                    address=f"{HOST}:{port}",
                    probe=functools.partial(http_ok, HOST, port, "/healthz"),
                    metrics_url=url,
                )
            )
        admin_port = next(ports)
        dashboard_port = next(ports)
        host, port = parse_hostport(cfg.listen, field="listen")
        if port == 0:
            port = next(ports)
        listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        config_path = self._config_path
        balancer = ChildSpec(
            name="balancer",
            kind=Kind.BALANCER,
            # The token goes by NETSTACK_ADMIN_TOKEN, never into the file or argv.
            # No access log, as for the web servers: the dashboard shows the traffic.
            argv=[
                "balance",
                "--config",
                str(config_path),
                "--admin-bind",
                f"{HOST}:{admin_port}",
                "--no-access-log",
            ],
            env={"NETSTACK_ADMIN_TOKEN": self.admin_token},
            address=listen,
            probe=lambda: self._balancer_ready(host, port, admin_port),
            metrics_url=f"http://{HOST}:{admin_port}/metrics",
            admin_url=f"http://{HOST}:{admin_port}",
        )
        self._balancer_toml = balancer_toml(
            listen=listen,
            web=[(s.name, s.address) for s in specs_ if s.kind == Kind.WEB],
            chat=f"{HOST}:{chat_port}",
            dashboard=f"{HOST}:{dashboard_port}",
        )
        display = "localhost" if host in ("127.0.0.1", "0.0.0.0", "::", "::1") else host
        base = f"http://{display}:{port}"
        self.urls = {
            "app": f"{base}/",
            "dashboard": f"{base}{DASHBOARD_PREFIX}/",
            "chat": f"{base}{CHAT_PREFIX}",
            "grpc": f"{HOST}:{rpc_port}",
            "admin": f"http://{HOST}:{admin_port}/api/backends",
            "data": str(self.data_dir),
        }
        self.public = (host, port)
        return specs_, balancer, dashboard_port

    async def _balancer_ready(self, host: str, port: int, admin_port: int) -> bool:
        target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        return await http_ok(HOST, admin_port, "/healthz") and await tcp_ok(target, port)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Bring everything up; returns once the public port serves.

        Raises:
            UpStartupError: a port in use, a child that would not start (everything
                already started is stopped again).
        """
        began = time.monotonic()
        check_bindable(self.cfg.listen)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UpStartupError(
                f"cannot create the data directory {self.data_dir}: {exc.strerror}"
            ) from None
        backends, balancer, dashboard_port = self._plan()
        try:
            self._config_path.write_text(self._balancer_toml)
        except OSError as exc:
            raise UpStartupError(f"cannot write {self._config_path}: {exc.strerror}") from None
        try:
            await self._start_children(backends)
            await self._start_dashboard(dashboard_port)
            await self._start_children([balancer])
        except BaseException:
            await self.close()
            raise
        self.started_in = time.monotonic() - began
        if self.cfg.demo_load:
            self._load_task = asyncio.create_task(self._demo_load())

    async def _start_children(self, specs_: list[ChildSpec]) -> None:
        new = []
        for spec in specs_:
            colour = COLOURS[len(self.children) % len(COLOURS)] if self.colour else None
            child = Child(self, spec, colour)
            with self.lock:
                self.children[spec.name] = child
            child.task = asyncio.create_task(child.run())
            new.append(child)
        waiting: dict[asyncio.Future[Any], Child] = {c.first_start: c for c in new}
        stop: asyncio.Future[Any] = asyncio.ensure_future(self.stop_event.wait())
        try:
            while waiting:
                done, _ = await asyncio.wait({*waiting, stop}, return_when=asyncio.FIRST_COMPLETED)
                if stop in done:
                    raise UpStartupError("interrupted while starting")
                for fut in done:
                    del waiting[fut]
                    failure = fut.result()
                    if failure is not None:
                        raise UpStartupError(failure)
        finally:
            stop.cancel()

    async def _start_dashboard(self, port: int) -> None:
        from netstack.servers.up.dashboard import Dashboard
        from netstack.servers.wsgi import WSGIServer

        # The dashboard has no login: its kill/restore buttons exist only when the public
        # port is on loopback (only people on this machine reach it).
        control = _loopback(self.public[0])
        if not control:
            self.say("dashboard: kill/restore off (--listen is not a loopback address)")
        self.dashboard = Dashboard(self, interval=1.0, control=control)
        cfg = WSGIServerConfig(
            app="netstack.servers.up.dashboard",
            bind=(f"{HOST}:{port}",),
            root_path=DASHBOARD_PREFIX,
            # Each live chart holds a thread for its server-sent event stream.
            threads=16,
            access_log=False,
        )
        self.dashboard_server = WSGIServer(cfg, self.dashboard.app)
        try:
            await self.dashboard_server.start()
        except OSError as exc:
            raise UpStartupError(
                f"cannot bind the dashboard on {HOST}:{port}: {exc.strerror or exc}"
            ) from None

    async def _demo_load(self) -> None:
        from netstack.servers.up.load import run_demo_load

        host, port = self.public
        target = "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host
        base = f"http://[{target}]:{port}" if ":" in target else f"http://{target}:{port}"
        self.say(f"demo load: requests to {base} (bounded; Ctrl-C stops everything)")
        try:
            await run_demo_load(base, stop=self.stop_event)
        except Exception:
            logger.exception("the demo load generator failed")
        else:
            self.say("demo load: finished")

    def request_stop(self) -> None:
        """Begin shutting down (signal handlers call this); a second call while shutting
        down kills every child at once, as a second Ctrl-C does for docker compose."""
        if self.stopping and self.interrupted:
            self.say("second interrupt: killing every process now")
            with self.lock:
                for child in self.children.values():
                    if child.proc is not None and child.proc.returncode is None:
                        _signal_group(child.proc.pid, signal.SIGKILL)
            return
        self.interrupted = True
        self.stop_event.set()

    async def wait(self) -> None:
        """Until :meth:`request_stop`."""
        await self.stop_event.wait()

    async def close(self) -> None:
        """Stop in order: balancer, then dashboard and web servers, then services."""
        if self._closed:
            return
        self._closed = True
        self.stopping = True
        self.stop_event.set()
        if self._load_task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                async with asyncio.timeout(STOP_TIMEOUT):
                    await self._load_task
        tiers = [
            [c for c in self.children.values() if c.spec.kind == Kind.BALANCER],
            [c for c in self.children.values() if c.spec.kind == Kind.WEB],
            [c for c in self.children.values() if c.spec.kind in (Kind.RPC, Kind.CHAT)],
        ]
        for i, tier in enumerate(tiers):
            stops = [asyncio.create_task(c.stop()) for c in tier]
            if i == 1:
                stops.append(asyncio.create_task(self._stop_dashboard()))
            if stops:
                await asyncio.gather(*stops)

    async def _stop_dashboard(self) -> None:
        if self.dashboard is not None:
            await asyncio.to_thread(self.dashboard.close)
        if self.dashboard_server is not None:
            self.dashboard_server.close()
            await self.dashboard_server.wait_closed()


def _toml(value: object) -> str:
    # JSON strings, numbers and arrays are valid TOML values.
    return json.dumps(value)


def balancer_toml(*, listen: str, web: list[tuple[str, str]], chat: str, dashboard: str) -> str:
    """The generated ``netstack balance`` config (full form). The admin API is set on the
    command line and its token in ``NETSTACK_ADMIN_TOKEN``, so no secret is on disk."""
    backends = ", ".join(
        f"{{ address = {_toml(addr)}, name = {_toml(name)} }}" for name, addr in web
    )
    return f"""\
# Generated by `netstack up` at each start; edits are overwritten.
[timeouts]
# Live dashboard streams are long requests: do not wait 30 s for them on Ctrl-C.
drain_timeout = 3.0

[frontends.public]
listen = {_toml(listen)}
mode = "http"
pool = "web"

[[frontends.public.routes]]
path_prefix = {_toml(CHAT_PREFIX)}
rewrite_prefix = "/"
pool = "chat"

[[frontends.public.routes]]
path_prefix = {_toml(DASHBOARD_PREFIX)}
pool = "dashboard"

[pools.web]
algorithm = "round_robin"
backends = [{backends}]

[pools.web.health]
check_path = "/healthz"
check_interval = 1.0
fall = 2
rise = 2
# The web servers answer 503/504 while the notes service is down; counted as their own
# failures, that would eject every web server for a dependency's outage and keep them out
# for the ejection time after it is back. The /healthz checks above find a dead web
# server within 2 s, and a refused connect is always retried on the other one.
max_fails = 1000000

[pools.chat]
backends = [{{ address = {_toml(chat)}, name = "chat" }}]

[pools.chat.health]
check_path = "/healthz"
check_interval = 2.0

[pools.dashboard]
backends = [{{ address = {_toml(dashboard)}, name = "dashboard" }}]
"""


__all__ = ["Child", "ChildSpec", "Supervisor", "UpStartupError", "balancer_toml", "pick_ports"]
