"""``netstack up``: the reference architecture on one machine, with its dashboard."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import signal
import sys
from typing import TYPE_CHECKING, Any

import click

from netstack import log
from netstack.cli.exits import StartupFailure
from netstack.cli.options import config_options, load_config
from netstack.config import UpConfig

if TYPE_CHECKING:
    from netstack.servers.up.supervisor import Supervisor

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# What the children import; a missing one is named before anything starts.
NEEDS = {
    "flask": "web",
    "grpc": "grpc",
    "grpc_health": "grpc",
    "grpc_reflection": "grpc",
    "websockets": "chat",
}


@click.command(name="up")
@config_options(UpConfig)
def command(config_file: str | None, **flags: Any) -> None:
    """Run the whole stack on this machine until Ctrl-C: balancer, web, gRPC, chat, dashboard.

    Starts and supervises `netstack balance` (L7) on --listen, --web-servers `netstack
    serve` processes running the bundled notes app, the gRPC notes service (`netstack rpc
    serve`) and the chat service (`netstack chat serve`, routed under /chat/), plus a live
    dashboard under /_dashboard/. SQLite databases live in --data-dir unless --db names a
    PostgreSQL database. Each child's output is prefixed with its name; a crashed child is
    restarted with backoff. Ctrl-C or SIGTERM stops the balancer first, then the web servers,
    then the services. Exits 3 with one line when the public port is taken or a child
    cannot start.

    \b
    Examples:
      netstack up
      netstack up --listen 0.0.0.0:8080 --web-servers 4 --demo-load
      netstack up --data-dir /var/lib/netstack
      netstack up --db postgresql://netstack:pw@127.0.0.1/netstack --redis redis://127.0.0.1:6379/0
      NETSTACK_ADMIN_TOKEN=... netstack up --listen 127.0.0.1:9000
    """
    cfg = load_config(UpConfig, flags, config_file=config_file)
    missing = sorted({extra for mod, extra in NEEDS.items() if not _importable(mod)})
    if missing:
        extras = ",".join(missing)
        raise StartupFailure(f"netstack up needs more packages: pip install 'netstack[{extras}]'")
    from netstack.transport import loop as loops

    # The supervisor's own log lines (its dashboard's server...) look like its children's.
    log.prefix_text_lines("up       | ")
    loops.run(_up(cfg))


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


async def _up(cfg: UpConfig) -> None:
    from netstack.servers.up.supervisor import Supervisor, UpStartupError

    tty = sys.stdout.isatty()
    # `netstack --log-level debug up` applies to the children too.
    level = logging.getLevelName(logging.getLogger("netstack").level).lower()
    sup = Supervisor(
        cfg,
        write=lambda line: click.echo(line),
        colour=tty,
        log_level=level if level in ("debug", "info", "warning", "error") else None,
    )
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, sup.request_stop)
    try:
        try:
            await sup.start()
        except UpStartupError as exc:
            if sup.interrupted:  # Ctrl-C while starting: not a failure
                click.echo("stopped before everything was up")
                return
            raise StartupFailure(str(exc)) from None
        show_urls(sup, cfg)
        await sup.wait()
        sup.say("stopping: balancer, then web servers, then services (Ctrl-C again: kill)")
    finally:
        await sup.close()  # a second Ctrl-C meanwhile kills every child at once
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    sup.say("all stopped")


def show_urls(sup: Supervisor, cfg: UpConfig) -> None:
    """The addresses a person needs, in a small panel (plain lines without rich)."""
    urls = sup.urls
    admin_token = "(your --admin-token)" if cfg.admin_token else sup.admin_token
    rows = [
        ("App", urls["app"]),
        ("Dashboard", urls["dashboard"]),
        ("Chat", urls["chat"]),
        ("gRPC notes", f"{urls['grpc']}  token {sup.rpc_token}"),
        ("Admin API", f"{urls['admin']}  Bearer {admin_token}"),
        ("Data", urls["data"] if cfg.db is None else "PostgreSQL (--db)"),
    ]
    title = f"netstack up: ready in {sup.started_in or 0:.1f}s"
    names = ", ".join(f"{c.name} pid {c.pid}" for c in sup.components())
    try:
        from rich.console import Console
        from rich.panel import Panel
        from rich.table import Table
    except ImportError:
        click.echo(title)
        for label, value in rows:
            click.echo(f"  {label:<11} {value}")
        click.echo(f"  {names}")
        click.echo("Press Ctrl-C to stop.")
        return
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, value in rows:
        table.add_row(label, value)
    console = Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 110)
    console.print(
        Panel(table, title=title, subtitle="Ctrl-C stops everything", expand=False),
    )
    console.print(names, style="dim")
    sys.stdout.flush()


__all__ = ["command"]
