"""Shared test helpers: deadlines, polling, chunk feeders."""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

# Every timeout in the tests is a multiple of this unit, so slow CI can scale them all.
TIMEOUT = 5.0 * float(os.environ.get("NETSTACK_TEST_TIMEOUT_FACTOR", "1"))


def poll_until(
    predicate: Callable[[], bool], timeout: float = TIMEOUT, interval: float = 0.01
) -> None:
    """Wait until ``predicate()`` is true, failing the test after ``timeout`` seconds.

    Polling with a deadline, never a bare sleep, is how tests synchronise.
    """
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout:.1f}s: {predicate}")
        time.sleep(interval)


async def apoll_until(
    predicate: Callable[[], bool | Awaitable[bool]],
    timeout: float = TIMEOUT,  # noqa: ASYNC109 - a test deadline, applied with asyncio.timeout
    interval: float = 0.01,
) -> None:
    """Async twin of :func:`poll_until`."""
    async with asyncio.timeout(timeout):
        while True:
            result = predicate()
            if isinstance(result, Awaitable):
                result = await result
            if result:
                return
            await asyncio.sleep(interval)


def splits(data: bytes, seed: int = 0) -> Iterator[list[bytes]]:
    """Yield ``data`` three ways: whole, one byte at a time, and cut at random points."""
    yield [data]
    yield [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    for _ in range(3):
        cuts = (
            sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 8))))
            if len(data) > 1
            else []
        )
        edges = [0, *cuts, len(data)]
        yield [data[a:b] for a, b in itertools.pairwise(edges)]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port nobody listens on, chosen *below* the ephemeral range.

    A port from bind(0) is ephemeral: once released, the kernel may hand it to the client's
    own socket, which then talks to itself (a UDP "reply" that is its own request, a TCP
    self-connect), and the "unreachable" server answers.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low = int(fh.read().split()[0])
    except OSError:  # not Linux: the common default
        low = 32768
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(10_000, low)
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")
