"""Access log lines from a real WSGIServer on 127.0.0.1:0, and format checking."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import os
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from wsgiref.validate import validator

import pytest

from netstack.config import DEFAULT_ACCESS_LOG_FORMAT, WSGIServerConfig
from netstack.errors import ConfigError
from netstack.log import ACCESS_LOGGER, JSONFormatter
from netstack.servers.wsgi import WSGIServer
from netstack.servers.wsgi.accesslog import check_format
from tests.helpers import TIMEOUT


def app(environ, start_response):
    if environ["PATH_INFO"] == "/empty":
        start_response("204 No Content", [])
        return []
    body = b"hello"
    start_response(
        "201 Created",
        [("Content-Type", "text/plain"), ("Content-Length", "5"), ("X-Trace", "t-42")],
    )
    return [body]


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.records]


@pytest.fixture
def access_records():
    handler = Records()
    logger = logging.getLogger(ACCESS_LOGGER)
    saved = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(saved)


@asynccontextmanager
async def serving(**options) -> AsyncIterator[int]:
    cfg = WSGIServerConfig(app="x:app", bind=("127.0.0.1:0",), **options)
    async with WSGIServer(cfg, validator(app)) as server:
        yield server.addresses[0][1]


def fetch(port: int, path: str, headers: dict[str, str] | None = None) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


async def test_default_format_is_gunicorns(access_records):
    async with serving() as port:
        headers = {"User-Agent": "probe/1.0", "Referer": "http://ref.example/"}
        assert await asyncio.to_thread(fetch, port, "/a/b?x=1", headers) == 201
        assert await asyncio.to_thread(fetch, port, "/empty") == 204
    first, second = access_records.lines
    assert re.fullmatch(
        r"127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d [+-]\d{4}\] "
        r'"GET /a/b\?x=1 HTTP/1\.1" 201 5 "http://ref\.example/" "probe/1\.0"',
        first,
    ), first
    assert second.endswith('"GET /empty HTTP/1.1" 204 - "-" "-"')  # b is "-" for 0 bytes


async def test_every_atom(access_records):
    fmt = (
        "m=%(m)s U=%(U)s q=%(q)s H=%(H)s s=%(s)s B=%(B)s b=%(b)s u=%(u)s l=%(l)s "
        "in=%({X-Request-Id}i)s missing=%({x-nope}i)s out=%({x-trace}o)s "
        "env=%({REMOTE_ADDR}e)s scheme=%({wsgi.url_scheme}e)s lower=%({remote_addr}e)s "
        "p=%(p)s T=%(T)s M=%(M)s D=%(D)s L=%(L)s 100%%"
    )
    async with serving(access_log_format=fmt) as port:
        await asyncio.to_thread(fetch, port, "/p?k=v", {"X-Request-Id": "r-7"})
    (line,) = access_records.lines
    fields = dict(f.split("=", 1) for f in line.split(" ")[:-1])
    assert fields == {
        "m": "GET",
        "U": "/p",
        "q": "k=v",
        "H": "HTTP/1.1",
        "s": "201",
        "B": "5",
        "b": "5",
        "u": "-",
        "l": "-",
        "in": "r-7",
        "missing": "-",
        "out": "t-42",
        "env": "127.0.0.1",
        "scheme": "http",
        "lower": "127.0.0.1",
        "p": f"<{os.getpid()}>",
        "T": "0",
        "M": fields["M"],
        "D": fields["D"],
        "L": fields["L"],
    }
    assert line.endswith(" 100%")
    assert 0 <= int(fields["M"]) < 1000 * TIMEOUT
    assert int(fields["D"]) >= int(fields["M"])
    assert float(fields["L"]) * 1_000_000 == pytest.approx(int(fields["D"]), abs=2)


async def test_records_carry_fields_for_json_logs(access_records):
    async with serving() as port:
        await asyncio.to_thread(fetch, port, "/j?q=1")
    (record,) = access_records.records
    doc = json.loads(JSONFormatter().format(record))
    assert doc["logger"] == "netstack.access"
    assert doc["message"].startswith("127.0.0.1 - - [")
    assert doc["method"] == "GET"
    assert doc["path"] == "/j"
    assert doc["query"] == "q=1"
    assert doc["status"] == 201
    assert doc["bytes"] == 5
    assert doc["remote_addr"] == "127.0.0.1"
    assert 0 <= doc["duration_ms"] < 1000 * TIMEOUT


async def test_no_access_log_logs_nothing(access_records):
    async with serving(access_log=False) as port:
        assert await asyncio.to_thread(fetch, port, "/") == 201
    assert access_records.records == []


@pytest.mark.parametrize(
    ("fmt", "message"),
    [
        ("%(h)s %(nope)s", "unknown atom %(nope)s"),
        ("%s %(h)s", "every conversion needs an atom"),
        ("%(h)s %", "every conversion needs an atom"),
        ("%(s)d", "%(s)d"),
        ("%(h)s %(", "incomplete format key"),
        ("%({x}q)s", "unknown atom %({x}q)s"),
    ],
)
def test_a_wrong_format_is_a_config_error(fmt, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        check_format(fmt)
    assert info.value.field == "access_log_format"  # type: ignore[attr-defined]


def test_good_formats_compile():
    for fmt in (DEFAULT_ACCESS_LOG_FORMAT, "plain text", "%(h)s 100%% %({a}i)s %({b}o)s"):
        assert check_format(fmt).fmt == fmt


async def test_a_library_user_with_a_wrong_format_still_gets_a_line(access_records):
    # The CLI refuses a wrong format at start-up; WSGIServer used directly logs the
    # error with the request instead of raising on every request.
    async with serving(access_log_format="%(h)s %(oops)s") as port:
        assert await asyncio.to_thread(fetch, port, "/") == 201
    (line,) = access_records.lines
    assert line.startswith("access_log_format: unknown atom %(oops)s")
    assert line.endswith(" GET 201")
