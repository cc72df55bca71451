"""Prometheus ``/metrics`` for the asyncio servers (``rpc serve``, ``chat serve``).

Theory of operation
-------------------
A server counts in plain Python ints and floats (no lock: everything runs on its event
loop) and exposes them through a prometheus_client *custom collector*: an object whose
``collect()`` yields metric families built from those numbers when a scrape comes in.
:func:`render` turns a collector into the text exposition format, and
:func:`start_metrics_server` serves it with netstack's own WSGI server, run inline on the same
loop (``threads=0``, as the balancer's admin API does), so there is no third HTTP
endpoint to maintain and a scrape reads the counters without any synchronisation.

prometheus_client is imported only when a scrape is rendered (the ``metrics`` extra);
counting costs a few integer operations per call or message. ``netstack serve`` keeps its
own selector-based endpoint (:mod:`netstack.servers.wsgi.metrics`): its pre-fork master
has no event loop, but it shares :data:`LATENCY_BUCKETS`, :class:`Histogram` and
:func:`render` with this module.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Final, Protocol

if TYPE_CHECKING:
    from netstack.servers.wsgi import WSGIServer

# prometheus_client's default latency buckets, in seconds, with three below 5 ms: a WSGI
# hello or a proxied request takes well under a millisecond, and with 5 ms as the first
# bound every quantile of such traffic interpolates to 2.5-5 ms.
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
)
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


class Collector(Protocol):
    """The prometheus_client custom-collector protocol."""

    def collect(self) -> Iterable[Any]: ...


def bucket_label(bound: float) -> str:
    """The ``le`` label of a bucket bound (``+Inf`` for the last one)."""
    return "+Inf" if bound == float("inf") else repr(bound)


class Histogram:
    """A latency histogram in plain numbers: :meth:`observe` is a bisect and two adds."""

    __slots__ = ("buckets", "sum")

    def __init__(self) -> None:
        # One slot per bucket bound plus +Inf; non-cumulative until family().
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.buckets)

    def family(self, name: str, documentation: str) -> Any:
        """A ``HistogramMetricFamily`` of the observations so far."""
        from prometheus_client.core import HistogramMetricFamily

        return HistogramMetricFamily(
            name,
            documentation,
            buckets=cumulative(self.buckets),
            sum_value=self.sum,
        )


def cumulative(buckets: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts (one per :data:`LATENCY_BUCKETS` bound, then +Inf) as ``le`` pairs."""
    out, running = [], 0
    for bound, n in zip((*LATENCY_BUCKETS, float("inf")), buckets, strict=True):
        running += n
        out.append((bucket_label(bound), running))
    return out


def render(collector: Collector) -> bytes:
    """The Prometheus text exposition (version 0.0.4) of one collector."""
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return generate_latest(registry)


StartResponse = Callable[..., Any]


class MetricsApp:
    """A WSGI app: ``GET /metrics`` (or ``/``) renders ``collector``; HEAD too.

    Anything else is 404 (other paths) or 405 (other methods), like the master's endpoint.
    """

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterator[bytes]:
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        if method not in ("GET", "HEAD"):
            status, body, kind = "405 Method Not Allowed", b"GET /metrics\n", "text/plain"
        elif path not in ("/metrics", "/"):
            status, body, kind = "404 Not Found", b"try /metrics\n", "text/plain"
        else:
            status, body, kind = "200 OK", render(self.collector), CONTENT_TYPE
        headers = [("Content-Type", kind), ("Content-Length", str(len(body)))]
        if status.startswith("405"):
            headers.append(("Allow", "GET, HEAD"))
        start_response(status, headers)
        return iter([body])


async def start_metrics_server(bind: str, collector: Collector) -> WSGIServer:
    """A started WSGIServer answering ``GET /metrics`` on ``bind`` (HOST:PORT), on the
    running loop.

    Raises:
        OSError: ``cannot bind metrics_bind HOST:PORT: reason`` (the CLI's exit 3).
    """
    from netstack.config import WSGIServerConfig
    from netstack.servers.wsgi import WSGIServer

    cfg = WSGIServerConfig(
        app="netstack.servers.metrics", bind=(bind,), threads=0, access_log=False
    )
    server = WSGIServer(cfg, MetricsApp(collector))
    try:
        await server.start()
    except OSError as exc:
        raise OSError(f"cannot bind metrics_bind {bind}: {exc.strerror or exc}") from None
    return server


__all__ = [
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "Collector",
    "Histogram",
    "MetricsApp",
    "bucket_label",
    "cumulative",
    "render",
    "start_metrics_server",
]
