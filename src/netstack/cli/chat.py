"""``netstack chat serve``: the chat server (WebSocket + browser page, and TCP)."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import click

from netstack.cli.exits import StartupFailure
from netstack.cli.options import config_options, load_config
from netstack.config import ChatServerConfig

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Settings of the shared groups that mean nothing to a chat server.
NOT_FOR_SERVER = ("cafile", "connect_timeout", "request_timeout")


@click.group(name="chat")
def group() -> None:
    """Chat service: rooms, DMs and presence over WebSocket and TCP, with a browser page."""


@group.command(name="serve")
@config_options(ChatServerConfig, exclude=NOT_FOR_SERVER)
def serve(config_file: str | None, **flags: Any) -> None:
    """Run a chat server until SIGINT/SIGTERM, then close gracefully.

    The --bind port serves the WebSocket endpoint /ws, the browser page at / and shared
    files at /files/HASH; --tcp-bind serves newline-delimited JSON. Prints
    "listening on ws|wss|tcp|tls HOST:PORT" once bound (useful with port 0).

    \b
    Examples:
      netstack chat serve
      netstack chat serve --bind 0.0.0.0:8700 --tcp-bind none --db /var/lib/netstack/chat.db
      netstack chat serve --bind 127.0.0.1:0 --tcp-bind 127.0.0.1:0 --flood-rate 2 --flood-burst 10
      netstack chat serve --db postgresql://chat:pw@db/chat --redis redis://cache:6379/0
      netstack chat serve --certfile cert.pem --keyfile key.pem --max-message-bytes 65536 \\
          --max-file-bytes 32768
    """
    cfg = load_config(ChatServerConfig, flags, config_file=config_file)
    try:
        import websockets  # noqa: F401  # the `chat` extra
    except ImportError:
        raise StartupFailure(
            "the chat server needs the websockets package: pip install 'netstack[chat]'"
        ) from None
    from netstack.transport import loop as loops

    loops.run(_serve(cfg))


async def _serve(cfg: ChatServerConfig) -> None:
    from netstack.servers.chat import ChatServer, database_location
    from netstack.servers.chat.scaleout import ScaleOutUnavailable
    from netstack.servers.chat.server import redact
    from netstack.servers.chat.store import StoreUnavailable
    from netstack.transport.listener import format_address

    server = ChatServer(cfg)
    try:
        await server.start()
    except OSError as exc:
        raise StartupFailure(f"cannot bind chat listeners: {exc.strerror or exc}") from None
    except StoreUnavailable as exc:
        reason = " ".join(str(exc.__cause__ or exc).split())  # libpq's span several lines
        raise StartupFailure(
            f"cannot open database {redact(database_location(cfg))}: {reason}"
        ) from None
    except ScaleOutUnavailable as exc:
        raise StartupFailure(f"redis {redact(cfg.redis or '')}: {exc}") from None
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, server.request_stop)
    try:
        click.echo(f"database {redact(database_location(cfg))}")
        if cfg.redis is not None:
            click.echo(f"scale-out redis {redact(cfg.redis)} (prefix {cfg.redis_prefix})")
        for kind, addr in server.listening():
            click.echo(f"listening on {kind} {format_address(addr)}")
        kind, addr = server.listening()[0]
        scheme = "https" if kind == "wss" else "http"
        click.echo(f"browser page {scheme}://{format_address(addr)}/")
        await server.serve_forever()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        await server.close()
