"""``netstack chat serve``: the chat server (WebSocket + browser page, and TCP)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Any

import click

from netstack.cli.exits import RuntimeFailure, StartupFailure
from netstack.cli.options import check_prometheus, config_options, load_config
from netstack.config import ChatClientConfig, ChatServerConfig
from netstack.errors import ConfigError

if TYPE_CHECKING:
    from netstack.servers.chat.client import ChatClient

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Settings of the shared groups that mean nothing to a chat server.
NOT_FOR_SERVER = ("cafile", "connect_timeout", "request_timeout")
PASSWORD_ENV = "NETSTACK_CHAT_PASSWORD"


@click.group(name="chat")
def group() -> None:
    """Chat service: rooms, DMs and presence over WebSocket and TCP, with a browser page."""


@group.command(name="serve")
@config_options(ChatServerConfig, exclude=NOT_FOR_SERVER)
def serve(config_file: str | None, **flags: Any) -> None:
    """Run a chat server until SIGINT/SIGTERM, then close gracefully.

    The --bind port serves the WebSocket endpoint /ws, the browser page at / and shared
    files at /files/HASH; --tcp-bind serves newline-delimited JSON. Prints
    "listening on ws|wss|tcp|tls HOST:PORT" once bound (useful with port 0). With
    --metrics-bind, GET /metrics on that address serves Prometheus text (users online,
    connections by transport, messages accepted, rooms in use).

    \b
    Examples:
      netstack chat serve
      netstack chat serve --bind 0.0.0.0:8700 --tcp-bind none --db /var/lib/netstack/chat.db
      netstack chat serve --bind 127.0.0.1:0 --tcp-bind 127.0.0.1:0 --flood-rate 2 --flood-burst 10
      netstack chat serve --db postgresql://chat:pw@db/chat --redis redis://cache:6379/0
      netstack chat serve --certfile cert.pem --keyfile key.pem --max-message-bytes 65536 \\
          --max-file-bytes 32768
      netstack chat serve --metrics-bind 127.0.0.1:9102
    """
    cfg = load_config(ChatServerConfig, flags, config_file=config_file)
    try:
        import websockets  # noqa: F401  # the `chat` extra
    except ImportError:
        raise StartupFailure(
            "the chat server needs the websockets package: pip install 'netstack[chat]'"
        ) from None
    if cfg.metrics_bind is not None:
        check_prometheus()
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
        if server.metrics_address is not None:
            click.echo(f"metrics on http://{format_address(server.metrics_address)}/metrics")
        await server.serve_forever()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        await server.close()


@group.command(name="connect")
@config_options(ChatClientConfig)
def connect(config_file: str | None, **flags: Any) -> int:
    """Chat in the terminal: rooms, DMs, history, and reconnect with backfill.

    Type to talk in the current room (or to the current person); commands start with a
    slash: /join ROOM, /msg NICK [TEXT], /who, /history [N], /leave, /rooms, /topic,
    /invite, /kick, /ban, /mute, /help, /quit (or Ctrl-D). The password comes from
    $NETSTACK_CHAT_PASSWORD, else it is asked. When the connection drops the client
    reconnects with backoff and prints what was said meanwhile. Exits 1 when the server
    cannot be reached at start or refuses the login.

    \b
    Examples:
      netstack chat connect --nick alice
      netstack chat connect --url ws://127.0.0.1:8700/ws --nick bob --register --room general
      NETSTACK_CHAT_PASSWORD=... netstack chat connect --url tcp://127.0.0.1:8701 --nick carol
      netstack chat connect --url wss://chat.example.org/ws --cafile ca.pem --nick dave
    """
    cfg = load_config(ChatClientConfig, flags, config_file=config_file)
    try:
        import prompt_toolkit  # noqa: F401  # the `chat` extra
        import websockets  # noqa: F401
    except ImportError:
        raise StartupFailure(
            "the chat client needs websockets and prompt_toolkit: pip install 'netstack[chat]'"
        ) from None
    interactive = sys.stdin.isatty()
    if cfg.nick is None:
        if not interactive:
            raise ConfigError("nick: needed when stdin is not a terminal", field="nick")
        from prompt_toolkit import prompt

        cfg = dataclasses.replace(cfg, nick=prompt("nick: ").strip())
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        if not interactive:
            raise ConfigError(f"password: set {PASSWORD_ENV} when stdin is not a terminal")
        from prompt_toolkit import prompt

        password = prompt("password: ", is_password=True)
    from netstack.transport import loop as loops

    loops.run(_connect(cfg, password, interactive))
    return 0


async def _connect(cfg: ChatClientConfig, password: str, interactive: bool) -> None:
    from netstack.servers.chat.client import ChatClient, ClientError

    def output(line: str) -> None:
        print(line, flush=True)

    client = ChatClient(cfg, password, output)
    runner = asyncio.get_running_loop().create_task(client.run())
    ready = asyncio.get_running_loop().create_task(client.wait_ready())
    await asyncio.wait({runner, ready}, return_when=asyncio.FIRST_COMPLETED)
    try:
        if runner.done():
            ready.cancel()
            runner.result()  # raises why the first connection failed
            return
        await _read_lines(client, runner, interactive)
    except (OSError, ClientError) as exc:
        raise RuntimeFailure(str(exc)) from None
    finally:
        client.stop()
        ready.cancel()
        if not runner.done():
            await asyncio.wait({runner}, timeout=5)
        if runner.done() and not runner.cancelled():
            failure = runner.exception()
            if isinstance(failure, ClientError):
                raise RuntimeFailure(str(failure))


async def _read_lines(client: ChatClient, runner: asyncio.Task[None], interactive: bool) -> None:
    """Typed lines to the client until /quit, end of input, or the client gives up."""
    if interactive:
        from prompt_toolkit import PromptSession
        from prompt_toolkit.patch_stdout import patch_stdout

        session: PromptSession[str] = PromptSession()

        async def next_line() -> str | None:
            try:
                return await session.prompt_async(lambda: client.prompt)
            except (EOFError, KeyboardInterrupt):
                return None

        stdout_patch: Any = patch_stdout()
    else:
        lines: asyncio.Queue[str | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def pump() -> None:  # a daemon thread: a blocked read never holds up the exit
            for line in sys.stdin:
                loop.call_soon_threadsafe(lines.put_nowait, line)
            loop.call_soon_threadsafe(lines.put_nowait, None)

        threading.Thread(target=pump, name="chat-stdin", daemon=True).start()

        async def next_line() -> str | None:
            return await lines.get()

        stdout_patch = contextlib.nullcontext()
    with stdout_patch:
        while True:
            reading = asyncio.get_running_loop().create_task(next_line())
            await asyncio.wait({reading, runner}, return_when=asyncio.FIRST_COMPLETED)
            if not reading.done():  # the client stopped (login refused on a reconnect)
                reading.cancel()
                return
            line = reading.result()
            if line is None or not await client.command(line):
                return
