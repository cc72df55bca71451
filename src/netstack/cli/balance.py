"""``netstack balance``: the load balancer, from flags (quick form) or a TOML file."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import click

from netstack.cli.exits import StartupFailure
from netstack.cli.options import config_options, read_toml
from netstack.config import BalancerConfig, BalancerQuickConfig
from netstack.errors import ConfigError
from netstack.servers.lb import Balancer, load_config
from netstack.servers.lb.server import scheme
from netstack.transport import loop as loops
from netstack.transport.listener import format_address

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def load(config_file: str | None, flags: Mapping[str, Any]) -> BalancerConfig:
    """Defaults < file < ``NETSTACK_*`` < flags, in either the quick or the full form.

    Raises:
        ConfigError: naming the file, key and reason (or the flag).
    """
    return load_config(
        read_toml(config_file), source=config_file or "config", env=os.environ, flags=flags
    )


@click.command(name="balance")
@config_options(BalancerQuickConfig)
def balance(config_file: str | None, **flags: Any) -> None:
    """Load balancer: relay TCP connections, UDP sessions or HTTP requests to backends.

    Prints "listening on PROTO HOST:PORT" per frontend once bound. SIGHUP reloads the config
    (new connections and requests use it, established ones finish on the old); SIGINT/SIGTERM
    drain connections for up to --drain-timeout, then stop.

    --mode http is a reverse proxy: keep-alive both ways, pooled backend connections,
    X-Forwarded-*/Forwarded and X-Request-Id, retries, 502/503/504 answers, WebSocket
    tunnels, routes by host/path/header (full form), and one access log line per request
    on the netstack.lb.access logger (--no-access-log turns it off). The full form
    (--config FILE with [frontends.NAME] and [pools.NAME] tables) runs several frontends
    and pools.

    --certfile/--keyfile terminate TLS (1.2+) on the frontend, tcp or http mode (ALPN
    http/1.1, X-Forwarded-Proto https); backends stay plaintext. --ca-certs also requires
    client certificates. SIGHUP reads the certificate files again for new connections.

    \b
    Examples:
      netstack balance --listen 127.0.0.1:8080 --backend 127.0.0.1:9001 --backend 127.0.0.1:9002
      netstack balance --mode http --listen 0.0.0.0:80 --backend 10.0.0.1:80 --backend h2:80
      netstack balance --mode http --backend 127.0.0.1:8000 --check-path /health --rate-limit 50
      netstack balance --listen 0.0.0.0:5353 --mode udp --backend 10.0.0.1:53 --backend 10.0.0.2:53
      netstack balance --backend h1:80 --backend h2:80 --algorithm least_connections
      netstack balance --mode http --listen [::]:443 --certfile c.pem --keyfile k.pem --backend h:80
      netstack balance --mode http --backend 127.0.0.1:8000 --no-access-log
      netstack balance --config lb.toml
      NETSTACK_ADMIN_TOKEN=... netstack balance --backend h1:80 --admin-bind 127.0.0.1:9900
    """
    cfg = load(config_file, flags)
    Balancer(cfg)  # refuses modes this build cannot serve, before anything binds
    loops.run(_serve(cfg, config_file, flags))


def raise_nofile(cfg: BalancerConfig) -> None:
    """Raise the soft descriptor limit toward what max_connections needs, as HAProxy does.

    Each relay holds two descriptors; without this a default soft limit of 1024 turns
    max_connections=10000 into accept() errors at about 500 connections.
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - not Unix
        return
    need = 2 * cfg.limits.max_connections + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = need if hard == resource.RLIM_INFINITY else min(need, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    if want < 2 * cfg.limits.max_connections:  # INFO: the hard limit is the operator's call
        logger.info(
            "descriptor limit %d is below the %d that max_connections=%d needs",
            want,
            need,
            cfg.limits.max_connections,
        )


async def _serve(cfg: BalancerConfig, config_file: str | None, flags: Mapping[str, Any]) -> None:
    balancer = Balancer(cfg)
    try:
        await balancer.start()
    except OSError as exc:
        listens = ", ".join(f"{f.mode} {f.listen}" for f in cfg.frontends)
        raise StartupFailure(f"cannot bind {listens}: {exc.strerror or exc}") from None
    raise_nofile(cfg)  # after binding, so that a failed start prints one line only
    loop = asyncio.get_running_loop()
    reloads: set[asyncio.Task[None]] = set()
    admin = None
    if cfg.admin.admin_bind is not None:
        from netstack.servers.lb.admin import admin_server

        admin = admin_server(balancer, cfg.admin, lambda: _reload(balancer, config_file, flags))
        try:
            await admin.start()
        except OSError as exc:
            balancer.close()
            await balancer.wait_closed()
            raise StartupFailure(
                f"cannot bind the admin API on {cfg.admin.admin_bind}: {exc.strerror or exc}"
            ) from None

    def on_hup() -> None:
        task = loop.create_task(_reload(balancer, config_file, flags))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, balancer.request_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        schemes = {f.name: scheme(f) for f in cfg.frontends}
        for name, proto, addr in balancer.addresses:
            shown = schemes.get(name, proto)  # http, https, tls: what clients speak
            click.echo(f"listening on {shown} {format_address(addr)}")
        if admin is not None:
            click.echo(f"admin API on http://{format_address(admin.addresses[0])}/api/backends")
        await balancer.serve_forever()
    finally:
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if admin is not None:
            admin.close()
            await admin.wait_closed()
        balancer.close()
        await balancer.wait_closed()


async def _reload(balancer: Balancer, config_file: str | None, flags: Mapping[str, Any]) -> None:
    try:
        cfg = load(config_file, flags)
        await balancer.reload(cfg)
    except ConfigError as exc:
        logger.error("reload refused, keeping the running config: %s", exc)
    except OSError as exc:
        logger.error("reload failed, keeping the running config: %s", exc.strerror or exc)


__all__ = ["balance"]
