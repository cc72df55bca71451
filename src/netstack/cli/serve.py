"""``netstack serve MODULE:APP``: the HTTP/1.1 WSGI server (pre-fork master + workers)."""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from netstack.cli.exits import StartupFailure
from netstack.cli.options import check_prometheus, config_options, load_config
from netstack.config import WSGIServerConfig, parse_hostport
from netstack.errors import ConfigError

if TYPE_CHECKING:
    from netstack.servers.wsgi.balance import LoadSlot
    from netstack.servers.wsgi.master import StatusPipe

logger = logging.getLogger(__name__)

# Settings of the shared groups that mean nothing to an HTTP server.
NOT_HTTP = (
    "max_frame_bytes",
    "max_line_bytes",
    "max_datagram_bytes",
    "idle_timeout",
    "connect_timeout",
    "request_timeout",
    "cafile",
)
SKIP_DIRS = frozenset({".git", ".venv", "venv", "__pycache__", "node_modules", ".tox"})
MAX_WATCHED_FILES = 5000


@click.command(name="serve")
@click.argument("app", required=False)
@config_options(WSGIServerConfig, exclude=(*NOT_HTTP, "app"))
def command(app: str | None, config_file: str | None, **flags: Any) -> None:
    """Serve the WSGI application APP (MODULE:ATTR) over HTTP/1.1.

    A master process binds the addresses and supervises --workers processes: a worker
    that dies is restarted, SIGHUP replaces the workers one by one without refusing a
    connection, SIGTERM/SIGINT stop gracefully (in-flight requests finish, idle
    keep-alive connections close, at most --graceful-timeout seconds).

    \b
    Examples:
      netstack serve myapp:app
      netstack serve myapp:app --bind 0.0.0.0:8000 --workers 4
      netstack serve myapp:create_app --factory --threads 0 --no-access-log
      netstack serve myapp:app --bind unix:/run/app.sock --bind [::1]:8080
      netstack serve myapp:app --certfile cert.pem --keyfile key.pem --reload
      netstack serve myapp:app --workers 2 --metrics-bind 127.0.0.1:9100
      netstack serve myapp:app --max-requests 10000 --max-requests-jitter 1000
      netstack serve myapp:app --access-log-format '%(h)s "%(r)s" %(s)s %(M)sms'
    """
    flags["app"] = app
    cfg = load_config(WSGIServerConfig, flags, config_file=config_file)
    if not cfg.app:
        raise ConfigError("app: give MODULE:APP (argument or 'app' in the config)", field="app")
    if cfg.chdir is not None:
        try:
            os.chdir(cfg.chdir)
        except OSError as exc:
            raise ConfigError(f"chdir: cannot change to {cfg.chdir!r}: {exc.strerror}") from None
    _check_module(cfg.app)
    if cfg.access_log:
        from netstack.servers.wsgi.accesslog import check_format

        check_format(cfg.access_log_format)
    if cfg.tls.certfile is not None:
        from netstack.transport.tls import server_context

        server_context(cfg.tls)  # a bad certificate is a usage error, before any fork

    from netstack.servers.wsgi.master import Master
    from netstack.servers.wsgi.server import bind_socket

    sockets: list[socket.socket] = []
    metrics_socket = None
    try:
        for address in cfg.bind:
            sockets.append(_bind(address, functools.partial(bind_socket, address, cfg.backlog)))
        if cfg.metrics_bind is not None:
            check_prometheus()
            host, port = parse_hostport(cfg.metrics_bind, field="metrics_bind")
            metrics_socket = _bind(
                cfg.metrics_bind,
                lambda: socket.create_server(
                    (host, port),
                    family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                    backlog=64,
                ),
            )
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    scheme = "https" if cfg.tls.certfile else "http"
    for sock in sockets:
        click.echo(f"listening on {_describe(sock, scheme)}")
    if metrics_socket is not None:
        click.echo(f"metrics on {_describe(metrics_socket, 'http')}/metrics")
    watch = _source_fingerprint if cfg.reload else None
    master = Master(
        cfg,
        sockets,
        lambda socks, status, load: _worker_main(cfg, socks, status, load),
        watch=watch,
        metrics_socket=metrics_socket,
    )
    status = master.run()
    if status:
        raise StartupFailure(master.failure or "a worker could not start; see the log above")


def _bind(address: str, bind: Callable[[], socket.socket]) -> socket.socket:
    try:
        return bind()
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise StartupFailure(f"cannot bind {address}: {reason}") from None


def _describe(sock: socket.socket, scheme: str) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        host = name[0]
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{name[1]}"
    return f"unix:{name}"


def _check_module(spec: str) -> None:
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ConfigError(f"app: expected MODULE:APP, got {spec!r}", field="app")
    cwd = os.getcwd()
    import sys

    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        found = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigError(f"app: no module named {module!r} (from {cwd})", field="app")


def _source_fingerprint() -> object:
    """Modification times of the Python files under the working directory."""
    stamps = []
    for root, dirs, files in os.walk("."):
        dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(root, name)
                try:
                    stamps.append((path, os.stat(path).st_mtime_ns))
                except OSError:
                    continue
                if len(stamps) >= MAX_WATCHED_FILES:
                    return tuple(stamps)
    return tuple(sorted(stamps))


def _worker_main(
    cfg: WSGIServerConfig,
    sockets: list[socket.socket],
    status: StatusPipe,
    load: LoadSlot | None = None,
) -> int:
    """In a worker process: load the app and serve until SIGTERM/SIGINT."""
    from netstack.servers.wsgi import load_app
    from netstack.servers.wsgi.master import APP_LOAD_FAILED
    from netstack.transport import loop as loops

    try:
        app = load_app(cfg.app, factory=cfg.factory)
    except ConfigError as exc:
        status.error(str(exc))
        return APP_LOAD_FAILED
    except Exception as exc:
        # The app's own error: its traceback is what the user needs, then one summary line.
        logger.exception("cannot load the app %s", cfg.app)
        status.error(f"cannot load the app {cfg.app}: {type(exc).__name__}: {exc}")
        return APP_LOAD_FAILED
    try:
        return loops.run(_worker_serve(cfg, app, sockets, status, load))
    except Exception as exc:
        if not status.is_ready:
            logger.exception("the worker could not start")
            status.error(f"a worker could not start: {type(exc).__name__}: {exc}")
            return APP_LOAD_FAILED
        raise


async def _worker_serve(
    cfg: WSGIServerConfig,
    app: Any,
    sockets: list[socket.socket],
    status: StatusPipe,
    load: LoadSlot | None,
) -> int:
    from netstack.servers.wsgi import WSGIServer

    server = WSGIServer(cfg, app, sockets=sockets, multiprocess=cfg.workers > 1, load_slot=load)
    # The master starts a replacement first, then stops this worker with SIGTERM.
    server.on_max_requests = status.recycle
    loop = asyncio.get_running_loop()
    tasks: list[asyncio.Task[None]] = []
    metrics = None
    if cfg.metrics_bind is not None:
        from netstack.servers.wsgi.metrics import SNAPSHOT_INTERVAL, WorkerMetrics

        metrics = WorkerMetrics(server)
        metrics.attach()

        async def report() -> None:
            while True:
                await asyncio.sleep(SNAPSHOT_INTERVAL)
                status.metrics(metrics.snapshot())

        tasks.append(loop.create_task(report()))
    await server.start()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    master = os.getppid()

    async def orphan_watch() -> None:
        # A worker whose master died (kill -9) must not serve on forever (Linux also
        # sets PR_SET_PDEATHSIG, which is immediate).
        while os.getppid() == master:  # noqa: ASYNC110 - no event exists for a parent's death
            await asyncio.sleep(1.0)
        logger.warning("the master process is gone: stopping")
        server.request_stop()

    tasks.append(loop.create_task(orphan_watch()))
    status.ready()
    logger.info("worker pid %d serving %s", os.getpid(), cfg.app)
    try:
        await server.serve_forever()
    finally:
        for task in tasks:
            task.cancel()
        if metrics is not None:
            status.metrics(metrics.snapshot())
    return 0
