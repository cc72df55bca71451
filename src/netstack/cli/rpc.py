"""``netstack rpc serve|call``: the gRPC notes service and a reflection-driven client.

``grpc`` (the ``grpc`` extra) is imported inside the commands only, so ``netstack --help``
stays light.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from typing import Any

import click

from netstack.cli.exits import RuntimeFailure, StartupFailure
from netstack.cli.options import check_prometheus, config_options, load_config
from netstack.config import RPCClientConfig, RPCServerConfig
from netstack.errors import ConfigError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _need_grpc() -> None:
    try:
        import grpc  # noqa: F401  # the `grpc` extra
        import grpc_health  # noqa: F401
        import grpc_reflection  # noqa: F401
    except ImportError:
        raise StartupFailure(
            "netstack rpc needs grpcio, grpcio-health-checking and grpcio-reflection: "
            "pip install 'netstack[grpc]'"
        ) from None


@click.group(name="rpc")
def group() -> None:
    """gRPC notes service (notes.v1.Notes) and a grpcurl-style client."""


@group.command(name="serve")
@config_options(RPCServerConfig, exclude=("cafile",))
def serve(config_file: str | None, **flags: Any) -> None:
    """Run the notes gRPC service until SIGINT/SIGTERM, then shut down gracefully.

    Serves notes.v1.Notes (servers/rpc/proto/notes.proto) with the standard health
    checking and reflection services. With --token, calls must send
    "authorization: Bearer TOKEN" (health and reflection stay open). Prints
    "listening on grpc HOST:PORT" (grpcs with TLS) once bound (useful with port 0). On
    SIGTERM it stops accepting calls and lets in-flight ones finish within --grace-period.
    With --metrics-bind, GET /metrics on that address serves Prometheus text (calls by
    method and status code, latency, in-flight calls, open watchers).

    \b
    Examples:
      netstack rpc serve
      netstack rpc serve --bind 127.0.0.1:0 --token s3cret --data-dir ./data
      netstack rpc serve --bind 0.0.0.0:50051 --db postgresql://netstack:pw@db/netstack
      NETSTACK_TOKEN=s3cret netstack rpc serve --db /var/lib/netstack/notes.sqlite3
      netstack rpc serve --certfile cert.pem --keyfile key.pem --bind 0.0.0.0:50051
      netstack rpc serve --metrics-bind 127.0.0.1:9101
    """
    cfg = load_config(RPCServerConfig, flags, config_file=config_file)
    _need_grpc()
    if cfg.metrics_bind is not None:
        check_prometheus()
    from netstack.transport import loop as loops

    loops.run(_serve(cfg))


async def _serve(cfg: RPCServerConfig) -> None:
    from netstack.servers.rpc import RPCServer, database_location
    from netstack.servers.rpc.store import StoreUnavailable
    from netstack.transport.listener import format_address

    server = RPCServer(cfg)
    try:
        await server.start()
    except OSError as exc:
        raise StartupFailure(str(exc)) from None
    except StoreUnavailable as exc:
        raise StartupFailure(f"cannot open database {database_location(cfg)}: {exc}") from None
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, server.request_stop)
    try:
        location = database_location(cfg)
        if "://" in location:  # never print a password
            location = location.split("://", 1)[0] + "://" + location.rsplit("@", 1)[-1]
        click.echo(f"database {location}")
        host, port = server.address
        click.echo(f"listening on {server.scheme} {f'[{host}]' if ':' in host else host}:{port}")
        if server.metrics_address is not None:
            click.echo(f"metrics on http://{format_address(server.metrics_address)}/metrics")
        if cfg.token is None:
            click.echo("auth off: anyone who can connect may call (set --token)")
        await server.serve_forever()
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
        await server.close()


@group.command(name="call")
@click.argument("method", required=False)
@click.option(
    "--data",
    "-d",
    default="{}",
    show_default=True,
    help="request as JSON (proto3 JSON mapping); @FILE reads a file, @- stdin",
)
@click.option(
    "--list",
    "list_",
    is_flag=True,
    help="list the server's services (or, with METHOD set to a service, its methods)",
)
@config_options(RPCClientConfig, exclude=("certfile", "keyfile"))
def call(method: str | None, data: str, list_: bool, config_file: str | None, **flags: Any) -> int:
    """Call METHOD (package.Service/Method) with a JSON request; print the JSON response.

    Request and response types come from the server's reflection service, as with
    grpcurl. A server stream prints one JSON object per line until it ends (Ctrl-C to
    stop watching). A non-OK status exits 1 with "CODE: message".

    \b
    Examples:
      netstack rpc call --list
      netstack rpc call --list notes.v1.Notes
      netstack rpc call notes.v1.Notes/CreateNote --data '{"title": "hello", "body": "world"}'
      netstack rpc call notes.v1.Notes/ListNotes -d '{"pageSize": 10}' --token s3cret
      netstack rpc call notes.v1.Notes/WatchNotes --connect 10.0.0.5:50051
      netstack rpc call grpc.health.v1.Health/Check --deadline 1
      netstack rpc call --list --connect notes.example.com:50051 --cafile ca.pem
    """
    cfg = load_config(RPCClientConfig, flags, config_file=config_file)
    if not list_ and method is None:
        raise ConfigError("METHOD is required (or use --list)", field="method")
    if data.startswith("@"):
        source = data[1:]
        try:
            data = sys.stdin.read() if source == "-" else open(source).read()  # noqa: SIM115
        except OSError as exc:
            raise ConfigError(f"--data: cannot read {source}: {exc.strerror}") from None
    _need_grpc()
    from netstack.servers.rpc.client import CallError, ReflectionClient, UsageError

    try:
        with ReflectionClient(cfg) as client:
            if list_:
                lines = client.methods(method) if method else client.services()
                for line in lines:
                    click.echo(line)
                return 0
            assert method is not None
            stream = client.method(method).server_streaming
            for response in client.call(method, data):
                click.echo(json.dumps(response, ensure_ascii=False, indent=None if stream else 2))
    except UsageError as exc:
        raise ConfigError(str(exc)) from None
    except CallError as exc:
        raise RuntimeFailure(str(exc)) from None
    return 0
