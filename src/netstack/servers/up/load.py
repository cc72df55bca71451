"""``netstack up --demo-load``: a small, bounded, open-loop load so the dashboard moves.

Requests leave on a fixed schedule (``rate`` per second) whether or not earlier ones have
answered, as a population of independent users would send them (an *open* loop; a closed
loop slows down with the server and hides its latency). The mix, over the example notes
app's public URL:

* ``GET /`` (the HTML page), ``GET /api/notes`` (the list),
* ``POST /api/notes`` with a JSON ``{"title", "body"}`` (at most :data:`MAX_CREATED` notes
  per run, so a long demo does not fill the database),
* ``GET /api/notes/<id>`` of notes this run created.

It is bounded three ways: ``duration`` seconds, ``rate * duration`` requests, and
:data:`MAX_IN_FLIGHT` requests outstanding (a request due while that many are waiting is
counted as ``dropped``, not queued). It talks to loopback hosts only, and an HTTP error or
a dead backend is counted, never raised: killing a web server from the dashboard must not
stop it.

The client is h11 over asyncio streams with a small keep-alive pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import quote, urlsplit

import h11

logger = logging.getLogger(__name__)

# A demo, not a benchmark: enough to move the charts, small enough for a laptop.
MAX_RATE: Final = 1000.0
MAX_DURATION: Final = 24 * 3600.0
MAX_IN_FLIGHT: Final = 64
MAX_CREATED: Final = 200
MAX_BODY_BYTES: Final = 1 << 20
REQUEST_TIMEOUT: Final = 5.0
# (weight, kind): reads dominate, as on most sites.
MIX: Final = ((20, "home"), (30, "list"), (15, "create"), (35, "read"))


@dataclass
class LoadStats:
    """What a run did; updated live, so a caller may read it while the load runs."""

    sent: int = 0
    ok: int = 0  # 2xx and 3xx answers
    errors: int = 0  # every other answer, and every failure to get one
    dropped: int = 0  # due while MAX_IN_FLIGHT requests were outstanding: never sent
    created: int = 0  # notes created (and read back by later requests)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # connect errors, timeouts...
    by_kind: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    prefix: str  # the base URL's path, without a trailing slash

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def loopback_target(base_url: str) -> Target:
    """Parse ``http://HOST[:PORT][/PREFIX]`` and check that HOST is a loopback address.

    Raises:
        ValueError: not ``http://``, no host, or a host that is not loopback.
    """
    parts = urlsplit(base_url)
    if parts.scheme != "http":
        raise ValueError(f"demo load needs an http:// URL, not {base_url!r}")
    host = parts.hostname
    if not host:
        raise ValueError(f"no host in {base_url!r}")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(
                f"refusing to send demo load to {host!r}: only loopback hosts "
                "(127.0.0.0/8, ::1, localhost) are allowed"
            )
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"bad port in {base_url!r}") from None
    return Target(host, port, parts.path.rstrip("/"))


class _Conn:
    __slots__ = ("h11", "reader", "received", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.received = False  # a byte of the current response arrived
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _Client:
    """HTTP/1.1 with keep-alive: idle connections are reused, broken ones dropped."""

    def __init__(self, target: Target, max_idle: int) -> None:
        self.target = target
        self.idle: list[_Conn] = []
        self.max_idle = max_idle

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One exchange. A reused connection that fails before any byte of the response is
        retried once on a new one (the server closed it while idle, as browsers assume)."""
        reused = bool(self.idle)
        conn = self.idle.pop() if reused else await self._open()
        try:
            status, data = await self._exchange(conn, method, path, body)
        except (OSError, h11.ProtocolError, asyncio.IncompleteReadError, EOFError):
            conn.close()
            if not reused or conn.received:
                raise
            conn = await self._open()  # the server closed an idle keep-alive connection
            try:
                status, data = await self._exchange(conn, method, path, body)
            except BaseException:
                conn.close()
                raise
        except BaseException:
            conn.close()
            raise
        if (
            conn.h11.our_state is h11.DONE
            and conn.h11.their_state is h11.DONE
            and len(self.idle) < self.max_idle
        ):
            conn.h11.start_next_cycle()
            conn.received = False
            self.idle.append(conn)
        else:
            conn.close()
        return status, data

    async def _open(self) -> _Conn:
        reader, writer = await asyncio.open_connection(self.target.host, self.target.port)
        return _Conn(reader, writer)

    async def _exchange(
        self, conn: _Conn, method: str, path: str, body: bytes | None
    ) -> tuple[int, bytes]:
        headers = [
            ("Host", self.target.authority),
            ("User-Agent", "netstack-demo-load"),
            ("Accept", "application/json, text/html;q=0.9"),
        ]
        if body is not None:
            headers += [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        h = conn.h11
        out = h.send(h11.Request(method=method, target=self.target.prefix + path, headers=headers))
        if body:
            out += h.send(h11.Data(data=body))
        out += h.send(h11.EndOfMessage())
        conn.writer.write(out)
        await conn.writer.drain()
        status, chunks, size = 0, [], 0
        while True:
            event = h.next_event()
            if event is h11.NEED_DATA:
                data = await conn.reader.read(65536)
                conn.received = conn.received or bool(data)
                h.receive_data(data)  # b"" is EOF: h11 raises if the response is incomplete
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size <= MAX_BODY_BYTES:
                    chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return status, b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise EOFError("connection closed before the response")

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def _note_id(body: bytes) -> str | None:
    """The id in a created note's JSON: ``{"id": ...}`` or ``{"note": {"id": ...}}``."""
    try:
        doc: Any = json.loads(body)
    except ValueError:
        return None
    if isinstance(doc, dict) and isinstance(doc.get("note"), dict):
        doc = doc["note"]
    if isinstance(doc, dict):
        value = doc.get("id")
        if isinstance(value, (int, str)) and not isinstance(value, bool) and str(value):
            return quote(str(value), safe="")
    return None


async def run_demo_load(
    base_url: str,
    *,
    stop: asyncio.Event,
    rate: float = 50.0,
    duration: float = 600.0,
    max_in_flight: int = MAX_IN_FLIGHT,
    timeout: float = REQUEST_TIMEOUT,  # noqa: ASYNC109 - per request, not for the whole call
    stats: LoadStats | None = None,
    seed: int | None = None,
) -> None:
    """Send the demo mix to ``base_url`` until ``stop`` is set or the bounds are reached.

    Args:
        base_url: the public ``http://`` URL of the example app (loopback only).
        stop: set it to end the run early; requests in flight get ``timeout`` to finish.
        rate: requests per second, on a fixed schedule (open loop).
        duration: seconds; at most ``ceil(rate * duration)`` requests leave.
        max_in_flight: outstanding requests; a request due beyond it is dropped.
        timeout: seconds for one request (connect to last byte).
        stats: filled in live when given.
        seed: for a reproducible mix.

    Raises:
        ValueError: a non-loopback or non-http URL, or a rate/duration out of bounds.
    """
    target = loopback_target(base_url)
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"rate must be in (0, {MAX_RATE:g}] requests/s, not {rate!r}")
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"duration must be in (0, {MAX_DURATION:g}] seconds, not {duration!r}")
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, not {max_in_flight!r}")
    if not timeout > 0:
        raise ValueError(f"timeout must be > 0, not {timeout!r}")
    stats = stats if stats is not None else LoadStats()
    rng = random.Random(seed)
    client = _Client(target, max_idle=max_in_flight)
    created: list[str] = []
    kinds = [kind for _, kind in MIX]
    weights = [w for w, _ in MIX]

    async def one(kind: str, n: int) -> None:
        if kind == "read" and not created:
            kind = "create" if stats.created < MAX_CREATED else "list"
        if kind == "create" and stats.created >= MAX_CREATED:
            kind = "list"
        stats.by_kind[kind] += 1
        try:
            async with asyncio.timeout(timeout):
                if kind == "home":
                    status, _ = await client.request("GET", "/")
                elif kind == "list":
                    status, _ = await client.request("GET", "/api/notes")
                elif kind == "read":
                    status, _ = await client.request("GET", f"/api/notes/{rng.choice(created)}")
                else:
                    stats.created += 1  # reserved now, so concurrent creates stay under the cap
                    doc = {"title": f"demo note {n}", "body": f"written by the demo load, #{n}"}
                    status, body = await client.request(
                        "POST", "/api/notes", json.dumps(doc).encode()
                    )
                    note = _note_id(body) if 200 <= status < 300 else None
                    if note is None:
                        stats.created -= 1
                    else:
                        created.append(note)
        except TimeoutError:
            stats.errors += 1
            stats.failures["timeout"] += 1
            return
        except (OSError, h11.ProtocolError, EOFError, asyncio.IncompleteReadError) as exc:
            stats.errors += 1
            stats.failures[type(exc).__name__] += 1
            return
        stats.statuses[status] += 1
        if 200 <= status < 400:
            stats.ok += 1
        else:
            stats.errors += 1

    loop = asyncio.get_running_loop()
    start = loop.time()
    end = start + duration
    total = math.ceil(rate * duration)
    tasks: set[asyncio.Task[None]] = set()
    try:
        for n in range(total):
            due = start + n / rate
            if due >= end:
                break
            wait = due - loop.time()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await stop.wait()
            if stop.is_set():
                break
            if len(tasks) >= max_in_flight:
                stats.dropped += 1
                continue
            stats.sent += 1
            task = asyncio.create_task(one(rng.choices(kinds, weights)[0], n))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(set(tasks), timeout=timeout)
    finally:
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        client.close()
        logger.info(
            "demo load: %d sent, %d ok, %d errors, %d dropped, %d notes created",
            stats.sent,
            stats.ok,
            stats.errors,
            stats.dropped,
            stats.created,
        )


__all__ = ["LoadStats", "loopback_target", "run_demo_load"]
