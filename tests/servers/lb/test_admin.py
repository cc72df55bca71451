"""The balancer's admin HTTP API on its own port: token, backends, drain/enable, metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from netstack.config import AdminConfig
from netstack.errors import ConfigError
from netstack.servers.lb import Balancer
from netstack.servers.lb.admin import admin_server
from tests.helpers import TIMEOUT
from tests.servers.lb.support import TCPBackend, backends, lb_config, reply_line, request

TOKEN = "s3cret-token-for-tests"


def call(port: int, method: str, path: str, body: Any = None, token: str | None = TOKEN) -> Any:
    """One admin call (blocking; run it in a thread): (status, parsed body)."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            raw, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        raw, status = exc.read(), exc.code
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


async def admin_call(port: int, method: str, path: str, **kw: Any) -> Any:
    return await asyncio.to_thread(call, port, method, path, **kw)


async def test_admin_api_lists_drains_adds_and_removes_backends() -> None:
    with backends(reply_line, 2) as bs:
        async with Balancer(lb_config(*(b.port for b in bs))) as lb:
            admin = admin_server(lb, AdminConfig(admin_bind="127.0.0.1:0", admin_token=TOKEN))
            async with admin:
                port = int(admin.addresses[0][1])
                status, listing = await admin_call(port, "GET", "/api/backends")
                assert status == 200
                names = [b["name"] for b in listing["default"]]
                assert names == [f"127.0.0.1:{b.port}" for b in bs]

                # Drain the first backend: new connections all go to the second.
                status, _ = await admin_call(
                    port, "POST", f"/api/pools/default/backends/{names[0]}/drain"
                )
                assert status == 200
                replies = [
                    await asyncio.to_thread(request, lb.address()[1], b"x\n") for _ in range(4)
                ]
                assert {r.split()[0] for r in replies} == {b"b1"}
                status, _ = await admin_call(
                    port, "POST", f"/api/pools/default/backends/{names[0]}/enable"
                )
                assert status == 200

                # Add a third backend at runtime, then remove it.
                with TCPBackend(reply_line, name="b2") as extra:
                    status, added = await admin_call(
                        port,
                        "POST",
                        "/api/pools/default/backends",
                        body={"address": f"127.0.0.1:{extra.port}", "name": "extra"},
                    )
                    assert (status, added["backend"]) == (201, "extra")
                    replies = [
                        await asyncio.to_thread(request, lb.address()[1], b"x\n") for _ in range(6)
                    ]
                    assert b"b2" in {r.split()[0] for r in replies}
                    status, _ = await admin_call(
                        port, "DELETE", "/api/pools/default/backends/extra"
                    )
                    assert status == 200
                status, listing = await admin_call(port, "GET", "/api/backends")
                assert [b["name"] for b in listing["default"]] == names

                status, text = await admin_call(port, "GET", "/metrics", token=None)
                assert status == 200
                assert "netstack_lb_" in text


@pytest.mark.parametrize(
    ("method", "path", "body", "token", "status"),
    [
        ("GET", "/api/backends", None, None, 401),
        ("GET", "/api/backends", None, "wrong-token-wrong-token", 401),
        ("POST", "/api/backends", None, TOKEN, 405),
        ("POST", "/api/pools/nope/backends/x/drain", None, TOKEN, 404),
        ("POST", "/api/pools/default/backends/nope/drain", None, TOKEN, 404),
        ("POST", "/api/pools/default/backends", {"address": "not an address"}, TOKEN, 400),
        ("POST", "/api/pools/default/backends", {"weight": 2}, TOKEN, 400),
        ("POST", "/api/reload", None, TOKEN, 409),
        ("GET", "/nothing-here", None, TOKEN, 404),
    ],
    ids=[
        "no-token",
        "wrong-token",
        "wrong-method",
        "unknown-pool",
        "unknown-backend",
        "bad-address",
        "no-address",
        "no-config-to-reload",
        "unknown-path",
    ],
)
async def test_admin_api_refuses_clearly(
    method: str, path: str, body: Any, token: str | None, status: int
) -> None:
    with backends(reply_line, 1) as bs:
        async with Balancer(lb_config(bs[0].port)) as lb:
            admin = admin_server(lb, AdminConfig(admin_bind="127.0.0.1:0", admin_token=TOKEN))
            async with admin:
                port = int(admin.addresses[0][1])
                got, doc = await admin_call(port, method, path, body=body, token=token)
    assert got == status
    assert "error" in doc


async def test_removing_the_last_backend_is_a_conflict() -> None:
    with backends(reply_line, 1) as bs:
        async with Balancer(lb_config(bs[0].port)) as lb:
            admin = admin_server(lb, AdminConfig(admin_bind="127.0.0.1:0", admin_token=TOKEN))
            async with admin:
                port = int(admin.addresses[0][1])
                got, _ = await admin_call(
                    port, "DELETE", f"/api/pools/default/backends/127.0.0.1:{bs[0].port}"
                )
    assert got == 409


def test_the_admin_api_needs_a_long_token() -> None:
    with pytest.raises(ConfigError, match="admin_token"):
        AdminConfig(admin_bind="127.0.0.1:0", admin_token="short")
    with pytest.raises(ConfigError, match="admin_token"):
        AdminConfig(admin_bind="127.0.0.1:0")
    assert AdminConfig().admin_bind is None  # off by default
