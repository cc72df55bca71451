"""Reading what the dashboard shows: Prometheus text endpoints and the balancer's admin API.

Everything here is small and synchronous: the dashboard's collector thread calls
:func:`fetch` with a short timeout for each source, parses the text once into
:class:`Samples`, and turns two consecutive scrapes into rates and latency quantiles with
:func:`counter_delta` and :func:`histogram_quantile` (the same arithmetic as PromQL's
``rate()`` and ``histogram_quantile()``, on two points).

A counter that goes *down* between two scrapes belongs to a process that restarted: its
count since the restart is the whole new value (PromQL's reset rule).
"""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

# A scrape of a local process answers in milliseconds; a second means it is stuck.
DEFAULT_TIMEOUT: Final = 1.0
# No exposition or admin answer the dashboard reads is anywhere near this big.
MAX_BODY_BYTES: Final = 4 << 20

# Environment proxies (http_proxy) must never see loopback scrapes: no ProxyHandler.
_OPENER: Final = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ScrapeError(Exception):
    """A source did not answer usefully; the message is short and fit for the page."""


def fetch(url: str, *, timeout: float = DEFAULT_TIMEOUT, token: str | None = None) -> bytes:
    """GET ``url`` and return the body of a 200 answer.

    Args:
        url: an ``http://`` URL.
        timeout: seconds for the connection and for each read.
        token: sent as ``Authorization: Bearer TOKEN`` when given.

    Raises:
        ScrapeError: refused, timed out, a non-200 status or an oversized body.
    """
    if not url.startswith("http://"):
        raise ScrapeError(f"not an http:// URL: {url!r}")
    request = urllib.request.Request(url, headers={"Accept": "*/*", "User-Agent": "netstack-up"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            body: bytes = resp.read(MAX_BODY_BYTES + 1)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ScrapeError(f"HTTP {exc.code} from {url}") from None
    except urllib.error.URLError as exc:
        raise ScrapeError(f"{_reason(exc.reason)} ({url})") from None
    except (OSError, ValueError) as exc:  # timeouts mid-body, resets, bad status lines
        raise ScrapeError(f"{_reason(exc)} ({url})") from None
    if len(body) > MAX_BODY_BYTES:
        raise ScrapeError(f"answer over {MAX_BODY_BYTES} bytes ({url})")
    return body


def _reason(exc: object) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__


def fetch_json(url: str, *, timeout: float = DEFAULT_TIMEOUT, token: str | None = None) -> Any:
    """:func:`fetch` and decode a JSON body.

    Raises:
        ScrapeError: as :func:`fetch`, or the body is not JSON.
    """
    body = fetch(url, timeout=timeout, token=token)
    try:
        return json.loads(body)
    except ValueError:
        raise ScrapeError(f"not JSON ({url})") from None


# ---------------------------------------------------------------------- samples


@dataclass(frozen=True, slots=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


class Samples:
    """One scrape's samples, looked up by name and label subset."""

    __slots__ = ("by_name",)

    def __init__(self, samples: Iterable[Sample] = ()) -> None:
        self.by_name: dict[str, list[Sample]] = {}
        for sample in samples:
            self.by_name.setdefault(sample.name, []).append(sample)

    def __contains__(self, name: str) -> bool:
        return name in self.by_name

    def select(self, name: str, **labels: str) -> list[Sample]:
        """Samples of ``name`` whose labels include ``labels``."""
        return [
            s
            for s in self.by_name.get(name, ())
            if all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def total(self, name: str, **labels: str) -> float | None:
        """The sum over :meth:`select`, or None when the metric is absent."""
        found = self.select(name, **labels)
        return sum(s.value for s in found) if found else None

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``{label value: summed value}`` over the samples of ``name``."""
        out: dict[str, float] = {}
        for s in self.by_name.get(name, ()):
            key = s.labels.get(label, "")
            out[key] = out.get(key, 0.0) + s.value
        return out

    def buckets(self, histogram: str) -> dict[float, float]:
        """A histogram's cumulative buckets ``{upper bound: count}`` (summed over labels)."""
        out: dict[float, float] = {}
        for s in self.by_name.get(f"{histogram}_bucket", ()):
            try:
                bound = float(s.labels["le"])
            except (KeyError, ValueError):
                continue
            out[bound] = out.get(bound, 0.0) + s.value
        return out


def parse_metrics(text: str) -> Samples:
    """Parse the Prometheus text exposition format (version 0.0.4).

    Raises:
        ScrapeError: the text does not parse, or prometheus-client is not installed.
    """
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:  # pragma: no cover - the dev install has it
        raise ScrapeError(
            "prometheus-client is not installed (pip install 'netstack[metrics]')"
        ) from None
    try:
        return Samples(
            Sample(s.name, s.labels, float(s.value))
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if math.isfinite(s.value)  # NaN/Inf gauges mean "unknown" here (and are not JSON)
        )
    except (ValueError, TypeError, IndexError, KeyError) as exc:
        raise ScrapeError(f"bad metrics text: {str(exc)[:80]}") from None


def scrape(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> Samples:
    """:func:`fetch` then :func:`parse_metrics`."""
    return parse_metrics(fetch(url, timeout=timeout).decode("utf-8", "replace"))


# ---------------------------------------------------------------------- arithmetic


def counter_delta(previous: float | None, current: float | None) -> float | None:
    """How much a counter grew between two scrapes (None if either is missing).

    A counter that went down restarted from zero: everything it has now is new.
    """
    if previous is None or current is None:
        return None
    return current if current < previous else current - previous


def bucket_deltas(
    previous: Mapping[float, float], current: Mapping[float, float]
) -> dict[float, float]:
    """Per-bound growth of a cumulative histogram; a reset of the total resets all."""
    reset = current.get(math.inf, 0.0) < previous.get(math.inf, 0.0)
    out = {}
    for bound, count in current.items():
        before = 0.0 if reset else previous.get(bound, 0.0)
        out[bound] = count if count < before else count - before
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets`` by linear interpolation within a bucket.

    As PromQL's ``histogram_quantile``: the first bucket's lower bound is 0, and a rank in
    the ``+Inf`` bucket answers the highest finite bound. None without observations.
    """
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if bounds[-1] != math.inf or total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == math.inf:
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower  # pragma: no cover - the +Inf bucket holds every observation


def normalize_address(address: str) -> str:
    """``HOST:PORT`` with the loopback spellings folded, so ``localhost:80`` matches
    ``127.0.0.1:80`` when backends are matched to components."""
    host, sep, port = address.rpartition(":")
    if not sep:
        return address
    host = host.strip("[]").lower()
    if host in ("localhost", "::1", "0.0.0.0", "::", "") or host.startswith("127."):
        host = "127.0.0.1"
    return f"{host}:{port}"
