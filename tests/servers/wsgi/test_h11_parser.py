"""The WSGI server on the h11 parser (the fallback): same behaviour as with httptools."""

from __future__ import annotations

import pytest

from tests.servers.wsgi.support import echo, exchange, get, hello, responses, serve


@pytest.mark.parametrize("threads", [0, 2], ids=["inline", "threaded"])
async def test_keep_alive_pipelining_and_chunked_bodies_on_h11(threads: int) -> None:
    raw = (
        get("/a")
        + b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        + get("/c", extra="Connection: close\r\n")
    )
    async with serve(echo, parser="h11", threads=threads) as server:
        data = await exchange(server, raw)
    replies = responses(data)
    assert [r.body for r in replies] == [b"GET /a  0\n", b"POST /b  3\nabc", b"GET /c  0\n"]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 17000 + b"\r\n\r\n", 431),
    ],
    ids=["differing-cl", "obs-fold", "431"],
)
async def test_bad_requests_on_h11(raw: bytes, status: int) -> None:
    async with serve(hello, parser="h11") as server:
        data = await exchange(server, raw)
    assert responses(data)[0].status == status
