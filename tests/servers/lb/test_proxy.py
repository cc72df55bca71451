"""PROXY protocol: sent to backends (v1/v2), accepted from trusted peers only."""

from __future__ import annotations

import asyncio
import dataclasses
import socket

import pytest

from netstack.config import FrontendConfig
from netstack.errors import ConfigError
from netstack.proto import proxy_protocol
from netstack.servers.lb import Balancer
from tests.helpers import TIMEOUT, apoll_until
from tests.servers.lb.support import TCPBackend, lb_config


def header_then_echo(conn: socket.socket, backend: TCPBackend) -> None:
    """Parse a PROXY header, answer 'SRC:PORT DST:PORT|' then echo the rest to EOF."""
    buffer = b""
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            return
        buffer += chunk
        parsed = proxy_protocol.parse(buffer)
        if parsed is not None:
            break
    header, used = parsed
    conn.sendall(
        f"v{header.version} {header.src_addr}:{header.src_port} "
        f"{header.dst_addr}:{header.dst_port}|".encode()
    )
    rest = buffer[used:]
    if rest:
        conn.sendall(rest)
    while chunk := conn.recv(4096):
        conn.sendall(chunk)


def exchange(port: int, prefix: bytes, body: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(prefix + body)
        sock.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := sock.recv(4096):
            out += chunk
        return out


def with_frontend(cfg, **changes):
    fe = dataclasses.replace(cfg.frontends[0], **changes)
    return dataclasses.replace(cfg, frontends=(fe,))


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_send_proxy_names_the_client(version) -> None:
    with TCPBackend(header_then_echo) as backend:
        cfg = lb_config(backend.port)
        cfg = dataclasses.replace(
            cfg, pools=(dataclasses.replace(cfg.pools[0], send_proxy=version),)
        )
        async with Balancer(cfg) as lb:
            port = lb.address()[1]

            def run() -> tuple[bytes, tuple[str, int]]:
                with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
                    me = sock.getsockname()
                    sock.sendall(b"payload")
                    sock.shutdown(socket.SHUT_WR)
                    out = b""
                    while chunk := sock.recv(4096):
                        out += chunk
                    return out, me

            out, me = await asyncio.to_thread(run)
    assert out == f"{version} 127.0.0.1:{me[1]} 127.0.0.1:{port}|payload".encode()


async def test_accept_proxy_from_trusted_peer_and_forward_it() -> None:
    incoming = proxy_protocol.encode_v1(
        proxy_protocol.ProxyHeader(
            1, "PROXY", "INET", "STREAM", "203.0.113.7", 4242, "198.51.100.1", 443
        )
    )
    with TCPBackend(header_then_echo) as backend:
        cfg = lb_config(backend.port)
        cfg = dataclasses.replace(
            with_frontend(cfg, accept_proxy=True),
            pools=(dataclasses.replace(cfg.pools[0], send_proxy="v2"),),
        )
        async with Balancer(cfg) as lb:
            port = lb.address()[1]
            # The header may arrive in pieces; the payload after it is relayed as is.
            out = await asyncio.to_thread(exchange, port, incoming, b"data")
            assert out == b"v2 203.0.113.7:4242 198.51.100.1:443|data"


async def test_untrusted_peer_header_is_relayed_as_data() -> None:
    with TCPBackend(header_then_echo) as backend:
        cfg = lb_config(backend.port)
        cfg = dataclasses.replace(
            with_frontend(cfg, accept_proxy=True, proxy_allow_ips="10.0.0.0/8"),
            pools=(dataclasses.replace(cfg.pools[0], send_proxy="v1"),),
        )
        async with Balancer(cfg) as lb:
            port = lb.address()[1]
            spoof = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
            out = await asyncio.to_thread(exchange, port, spoof, b"x")
            assert out.startswith(b"v1 127.0.0.1:")
            assert out.endswith(b"|" + spoof + b"x")


async def test_bad_proxy_header_closes_only_that_connection(caplog) -> None:
    with TCPBackend(header_then_echo) as backend:
        cfg = with_frontend(lb_config(backend.port), accept_proxy=True)
        async with Balancer(cfg) as lb:
            port = lb.address()[1]
            try:
                out = await asyncio.to_thread(exchange, port, b"GET / HTTP/1.1\r\n", b"")
            except ConnectionResetError:
                out = b""
            assert out == b""
            assert "invalid PROXY protocol header" in caplog.text
            await apoll_until(lambda: not lb.connections)
            assert backend.served == 0
            # A client leaving inside its header is closed quietly too.
            assert await asyncio.to_thread(exchange, port, b"PROXY TCP4", b"") == b""


def test_bad_allow_list_is_config_error() -> None:
    cfg = with_frontend(lb_config(1), accept_proxy=True, proxy_allow_ips="not-an-ip")
    with pytest.raises(ConfigError, match="proxy_allow_ips"):
        Balancer(cfg)
    assert FrontendConfig().proxy_allow_ips == "127.0.0.1,::1"
