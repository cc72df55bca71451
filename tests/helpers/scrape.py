"""Scrape a real ``/metrics`` endpoint over HTTP and parse it with prometheus_client."""

from __future__ import annotations

import asyncio
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import TIMEOUT

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(address: tuple[str, int], path: str = "/metrics") -> Samples:
    """``{(sample name, labels): value}`` of one GET (stdlib HTTP client, blocking)."""
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=TIMEOUT) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def ascrape(address: tuple[str, int], path: str = "/metrics") -> Samples:
    """:func:`scrape` in a thread, so the server on this loop can answer."""
    return await asyncio.to_thread(scrape, address, path)


def value(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value; a missing sample fails the test with the names present."""
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} not in {sorted(n for n, _ in samples)}"
    return samples[key]
