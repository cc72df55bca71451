"""The L7 access log: one line per request on netstack.lb.access, every field checked."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
import socket
import struct
import threading

import pytest

from netstack.config import BalancerLimits, BalancerTimeouts, HealthConfig
from netstack.errors import ConfigError
from netstack.servers.lb import Balancer
from tests.helpers import TIMEOUT, apoll_until, free_port
from tests.servers.lb.http_support import http_backend, http_config, name_and_path, raw
from tests.servers.lb.support import TCPBackend

TIMES = ("tq_ms", "tw_ms", "tc_ms", "tr_ms", "tt_ms")


@pytest.fixture
def access(caplog):
    caplog.set_level(logging.INFO, logger="netstack.lb.access")

    def records() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "netstack.lb.access"]

    return records


def rid_echo(request, body, backend):
    rid = dict(request.headers).get(b"x-request-id", b"-")
    return 200, [("content-type", "text/plain")], b"rid=" + rid


async def exchange(port: int, data: bytes, replies: int = 1) -> tuple[bytes, int]:
    """Send ``data`` on one connection; read until ``replies`` complete replies (by
    content-length) arrived; return the bytes and the client's own port."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local = writer.get_extra_info("sockname")[1]
    writer.write(data)
    out = b""
    try:
        async with asyncio.timeout(TIMEOUT):
            while _complete(out) < replies:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
    finally:
        writer.close()
    return out, local


def _complete(data: bytes) -> int:
    n = 0
    while b"\r\n\r\n" in data:
        head, _, rest = data.partition(b"\r\n\r\n")
        m = re.search(rb"content-length: (\d+)", head, re.I)
        size = int(m[1]) if m else 0
        if len(rest) < size:
            break
        data = rest[size:]
        n += 1
    return n


async def test_a_proxied_request_logs_every_field(access) -> None:
    with http_backend(rid_echo, "app1") as backend:
        async with Balancer(http_config(backend.port)) as lb:
            port = lb.address()[1]
            req = b"GET /a/b?x=1 HTTP/1.1\r\nHost: h\r\nUser-Agent: t/1\r\n\r\n"
            out, local = await exchange(port, req + req, replies=2)
            await apoll_until(lambda: len(access()) == 2)
    first, second = access()
    bodies = re.findall(rb"rid=([0-9a-f]+-[0-9a-f]+)", out)
    replies = out.split(b"HTTP/1.1 ")[1:]
    for rec, body, reply in zip((first, second), bodies, replies, strict=True):
        assert rec.client == f"127.0.0.1:{local}"
        assert rec.frontend == "default"
        assert rec.pool == "default"
        assert rec.backend == f"127.0.0.1:{backend.port}"
        assert (rec.method, rec.target, rec.status) == ("GET", "/a/b?x=1", 200)
        assert rec.bytes == len(b"HTTP/1.1 " + reply)  # head and body, as the client got them
        assert rec.request_id == body.decode()  # what the backend saw
        assert rec.retries == 0
        assert rec.term == "ok"
        times = [getattr(rec, t) for t in TIMES]
        assert all(t is not None and t >= 0 for t in times), times
        assert rec.tt_ms >= rec.tr_ms
        message = rec.getMessage()
        assert message.startswith(f"127.0.0.1:{local} default default/127.0.0.1:{backend.port} ")
        assert f'"GET /a/b?x=1 HTTP/1.1" 200 {rec.bytes} ' in message
        assert message.endswith(f" {rec.request_id} 0 ok")
        timers = message.split(" ")[-4].split("/")
        assert len(timers) == 5
        assert float(timers[4]) == pytest.approx(rec.tt_ms, abs=0.001)
    assert first.request_id != second.request_id
    assert second.tc_ms < 1.0  # the second went on the pooled keep-alive connection


async def test_proxy_answers_are_logged_with_their_termination(access) -> None:
    def garbage(sock, backend):
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 2xx Nope\r\n\r\n")

    def slow(sock, backend):
        sock.recv(65536)
        backend.gate.wait(TIMEOUT)

    with TCPBackend(garbage, "bad") as bad:
        async with Balancer(http_config(bad.port)) as lb:
            out = await raw(
                lb.address()[1], b"GET /g HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert out.startswith(b"HTTP/1.1 502 ")
            # 400: a malformed request, never routed.
            out400 = await raw(lb.address()[1], b"NOT HTTP AT ALL\r\n\r\n")
            assert out400.startswith(b"HTTP/1.1 400 ")
            await apoll_until(lambda: len(access()) == 2)
    r502, r400 = access()
    assert (r502.status, r502.term, r502.backend) == (502, "bad_response", f"127.0.0.1:{bad.port}")
    assert r502.bytes == len(out)
    assert (r400.status, r400.term, r400.method, r400.backend) == (400, "bad_request", "-", "-")
    assert r400.bytes == len(out400)
    assert ' -/- "-" 400 ' in r400.getMessage()

    dead = free_port()
    cfg = http_config(
        dead, health=HealthConfig(max_ejection_percent=100), rate_limit=0.01, rate_burst=1
    )
    async with Balancer(cfg) as lb:
        before = len(access())
        out = await raw(lb.address()[1], b"GET /n HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 503 ")
        out = await raw(lb.address()[1], b"GET /n HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert out.startswith(b"HTTP/1.1 429 ")
        await apoll_until(lambda: len(access()) == before + 2)
    r503, r429 = access()[before:]
    assert (r503.status, r503.term, r503.retries) == (503, "no_backend", 0)
    assert r503.backend == f"127.0.0.1:{dead}"  # the one tried
    assert r503.tc_ms is None  # the connect failed: no connection time
    assert (r429.status, r429.term, r429.backend, r429.tw_ms) == (429, "rate_limited", "-", None)

    sock_backend = TCPBackend(slow, "slow")
    sock_backend.gate = threading.Event()  # type: ignore[attr-defined]
    with sock_backend:
        cfg = http_config(sock_backend.port, timeouts=BalancerTimeouts(request_timeout=0.2))
        async with Balancer(cfg) as lb:
            before = len(access())
            out = await raw(
                lb.address()[1], b"GET /s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert out.startswith(b"HTTP/1.1 504 ")
            await apoll_until(lambda: len(access()) == before + 1)
            sock_backend.gate.set()  # type: ignore[attr-defined]
    (r504,) = access()[before:]
    assert (r504.status, r504.term) == (504, "backend_timeout")
    assert r504.tr_ms is None
    assert r504.tc_ms is not None
    assert r504.tt_ms >= 200


async def test_retries_abort_and_client_abort(access) -> None:
    def failing(request, body, backend):
        return 503, [], b"busy"

    def half(sock, backend):
        sock.recv(65536)
        sock.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly ten b")

    with http_backend(failing, "bad") as bad, http_backend(name_and_path, "good") as good:
        async with Balancer(http_config(bad.port, good.port)) as lb:
            out = await raw(
                lb.address()[1], b"GET /r HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert out.endswith(b"good /r")
            await apoll_until(lambda: len(access()) == 1)
    (rec,) = access()
    assert (rec.status, rec.retries, rec.backend, rec.term) == (
        200,
        1,
        f"127.0.0.1:{good.port}",
        "ok",
    )

    with TCPBackend(half) as backend:
        async with Balancer(http_config(backend.port)) as lb:
            out = await raw(lb.address()[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.endswith(b"only ten b")
            await apoll_until(lambda: len(access()) == 2)
    rec = access()[1]
    assert (rec.status, rec.term, rec.bytes) == (200, "backend_aborted", len(out))

    def never(sock, backend):
        sock.recv(65536)
        backend.stop.wait(TIMEOUT)

    with TCPBackend(never) as backend:
        backend.stop = threading.Event()  # type: ignore[attr-defined]
        async with Balancer(http_config(backend.port)) as lb:
            _, writer = await asyncio.open_connection("127.0.0.1", lb.address()[1])
            writer.write(b"GET /gone HTTP/1.1\r\nHost: x\r\n\r\n")
            await apoll_until(lambda: backend.served == 1)
            sock = writer.get_extra_info("socket")  # a reset, not a half-close
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            await apoll_until(lambda: len(access()) == 3)
            backend.stop.set()  # type: ignore[attr-defined]
    rec = access()[2]
    assert (rec.status, rec.term, rec.target, rec.bytes) == (None, "client_aborted", "/gone", 0)
    assert rec.getMessage().split(" ")[6] == "-"  # no status


async def test_a_tunnelled_upgrade_is_logged_when_it_closes(access) -> None:
    def upgrade_then_echo(sock, backend):
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: x-raw\r\n\r\n"
        )
        while chunk := sock.recv(65536):
            sock.sendall(chunk.upper())

    with TCPBackend(upgrade_then_echo) as backend:
        async with Balancer(http_config(backend.port)) as lb:
            reader, writer = await asyncio.open_connection("127.0.0.1", lb.address()[1])
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: x-raw\r\n\r\n"
            )
            payload = os.urandom(5000).hex().encode()
            async with asyncio.timeout(TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
                assert access() == []  # not before the tunnel ends
                writer.write(payload)
                writer.write_eof()
                out = await reader.read()
            writer.close()
            assert out == payload.upper()
            await apoll_until(lambda: len(access()) == 1)
    (rec,) = access()
    assert (rec.status, rec.term, rec.method, rec.target) == (101, "upgraded", "GET", "/ws")
    assert rec.bytes == len(head) + len(out)
    assert rec.tr_ms is not None
    assert rec.tt_ms >= rec.tr_ms


async def test_forbidden_and_off_and_custom_format(access) -> None:
    with http_backend(name_and_path) as backend:
        async with Balancer(http_config(backend.port, deny_ips="127.0.0.0/8")) as lb:
            out = await raw(lb.address()[1], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 403 ")
            await apoll_until(lambda: len(access()) == 1)
        assert (access()[0].status, access()[0].term) == (403, "forbidden")
        async with Balancer(http_config(backend.port, access_log=False)) as lb:
            out = await raw(
                lb.address()[1], b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert out.startswith(b"HTTP/1.1 200 ")
        assert len(access()) == 1
        fmt = '%(h)s %(m)s %(U)s %(q)s %(H)s %(s)s %(b)s %({x-tag}i)s %(a)s "%(f)s" %(t)s'
        async with Balancer(http_config(backend.port, access_log_format=fmt)) as lb:
            await raw(
                lb.address()[1],
                b"GET /p?q=2 HTTP/1.0\r\nHost: x\r\nX-Tag: t1\r\nUser-Agent: ua\r\n\r\n",
            )
            await apoll_until(lambda: len(access()) == 2)
        line = access()[1].getMessage()
        assert re.fullmatch(r'127\.0\.0\.1 GET /p q=2 HTTP/1\.0 200 \d+ t1 ua "-" \[.+\]', line), (
            line
        )
    # Refused at accept (max_connections): 503, logged with the client's address.
    cfg = dataclasses.replace(http_config(backend.port), limits=BalancerLimits(max_connections=1))
    async with Balancer(cfg) as lb:
        _, holder = await asyncio.open_connection("127.0.0.1", lb.address()[1])
        await apoll_until(lambda: len(lb.connections) == 1)
        out, local = await exchange(lb.address()[1], b"")
        assert out.startswith(b"HTTP/1.1 503 ")
        await apoll_until(lambda: len(access()) == 3)
        holder.close()
    rec = access()[2]
    assert (rec.client, rec.status, rec.term) == (f"127.0.0.1:{local}", 503, "max_connections")
    assert rec.bytes == len(out)
    with pytest.raises(ConfigError, match=r"unknown atom %\(zz\)s"):
        Balancer(http_config(backend.port, access_log_format="%(zz)s"))


def test_access_log_quick_flag_and_full_form() -> None:
    from netstack.servers.lb import load_config

    doc = {
        "frontends": {"web": {"listen": "127.0.0.1:0", "mode": "http", "pool": "p"}},
        "pools": {"p": {"backends": ["127.0.0.1:9"]}},
    }
    assert load_config(doc).frontends[0].access_log is True
    cfg = load_config(doc, flags={"access_log": False})
    assert cfg.frontends[0].access_log is False
    cfg = load_config(doc, env={"NETSTACK_ACCESS_LOG": "false"})
    assert cfg.frontends[0].access_log is False
    doc["frontends"]["web"]["access_log"] = False  # type: ignore[index]
    assert load_config(doc).frontends[0].access_log is False
    quick = load_config(
        {}, flags={"backend": ("127.0.0.1:9",), "mode": "http", "access_log": False}
    )
    assert quick.frontends[0].access_log is False


async def test_json_logs_carry_every_field() -> None:
    import io
    import json

    from netstack.log import JSONFormatter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JSONFormatter())
    logger = logging.getLogger("netstack.lb.access")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with http_backend(name_and_path) as backend:
            async with Balancer(http_config(backend.port)) as lb:
                out = await raw(
                    lb.address()[1], b"GET /j HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                )
                await apoll_until(lambda: stream.getvalue().count("\n") == 1)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    doc = json.loads(stream.getvalue())
    assert doc["logger"] == "netstack.lb.access"
    assert doc["message"].endswith(" 0 ok")
    assert (doc["method"], doc["target"], doc["status"], doc["bytes"]) == (
        "GET",
        "/j",
        200,
        len(out),
    )
    assert doc["backend"] == f"127.0.0.1:{backend.port}"
    assert doc["term"] == "ok"
    assert all(isinstance(doc[k], float) for k in TIMES)
