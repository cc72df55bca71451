"""``netstack echo serve|send``: framed TCP/UDP echo and request/response client."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import click

from netstack.cli.exits import RuntimeFailure, StartupFailure
from netstack.cli.options import config_options, load_config
from netstack.config import EchoClientConfig, EchoServerConfig
from netstack.errors import ConnectionClosed
from netstack.servers.messaging import EchoClient, create_server
from netstack.transport import loop as loops
from netstack.transport.listener import format_address

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@click.group(name="echo")
def group() -> None:
    """Framed TCP/UDP echo server and request/response client."""


# Settings of the shared groups that mean nothing to one side are left off its --help.
SERVER_ONLY = ("max_connections", "graceful_timeout")
CLIENT_ONLY = ("cafile", "connect_timeout", "request_timeout")


@group.command(name="serve")
@config_options(EchoServerConfig, exclude=CLIENT_ONLY)
def serve(config_file: str | None, **flags: Any) -> None:
    """Run an echo server until SIGINT/SIGTERM, then close gracefully.

    Prints "listening on PROTO HOST:PORT" once bound (useful with port 0).

    \b
    Examples:
      netstack echo serve --bind 127.0.0.1:9000
      netstack echo serve --bind [::1]:0 --framing line
      netstack echo serve --proto udp --bind 0.0.0.0:9000
      netstack echo serve --certfile cert.pem --keyfile key.pem --max-frame-bytes 65536
    """
    cfg = load_config(EchoServerConfig, flags, config_file=config_file)
    loops.run(_serve(cfg))


async def _serve(cfg: EchoServerConfig) -> None:
    server = create_server(cfg)
    try:
        await server.start()
    except OSError as exc:
        raise StartupFailure(f"cannot bind {cfg.proto} {cfg.bind}: {exc.strerror or exc}") from None
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, server.request_stop)
    try:
        for addr in server.addresses:
            click.echo(f"listening on {server.name} {format_address(addr)}")
        await server.serve_forever()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        server.close()
        await server.wait_closed()


@group.command(name="send")
@config_options(EchoClientConfig, exclude=SERVER_ONLY)
def send(config_file: str | None, **flags: Any) -> int:
    """Send COUNT messages of SIZE bytes, verify each echo, print RTT p50/p99 and msgs/s.

    Exits 1 when the server cannot be reached after --retries attempts or a message is lost.

    \b
    Examples:
      netstack echo send --connect 127.0.0.1:9000 --count 1000 --size 64
      netstack echo send --connect [::1]:9000 --framing line --concurrency 8
      netstack echo send --proto udp --connect 127.0.0.1:9000 --request-timeout 0.2
      netstack echo send --connect localhost:9443 --cafile ca.pem
    """
    cfg = load_config(EchoClientConfig, flags, config_file=config_file)
    try:
        report = loops.run(EchoClient(cfg).run())
    except ConnectionClosed as exc:
        raise RuntimeFailure(exc.reason) from None
    for line in report.lines():
        click.echo(line)
    if report.errors:
        raise RuntimeFailure(f"{report.errors} of {report.count} messages failed")
    return 0
