"""Prometheus metrics of the notes service (``netstack rpc serve --metrics-bind``).

:class:`RPCMetrics` is a grpc.aio server interceptor placed outside the token check, so
it sees every call that reaches a handler, UNAUTHENTICATED ones included. It wraps the
handler's behaviour and reads the final status when the behaviour ends: ``OK`` when it
returns (unless it called ``set_code``), the aborted code from ``context.code()`` when it
aborts (the servicer maps every error with ``context.abort``), ``DEADLINE_EXCEEDED`` or
``CANCELLED`` when gRPC cancels it, ``UNKNOWN`` when it raises anything else (what gRPC
sends then). A method the server does not implement counts once, under the method label
``other`` (clients choose those names, so they must not create series).

Exposed names (the ``netstack up`` dashboard scrapes these)::

    netstack_rpc_calls_total{method="/notes.v1.Notes/CreateNote",code="OK"}   counter
    netstack_rpc_call_duration_seconds                                         histogram
    netstack_rpc_calls_in_flight                                               gauge
    netstack_rpc_watchers                                                      gauge

The duration histogram has no labels and observes calls with a single response only
(unary and client-streaming): a WatchNotes stream lasts as long as its client wants, and
would turn p99 into "how long people watch".
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeAlias

import grpc

from netstack.servers.metrics import Histogram

if TYPE_CHECKING:
    Handler: TypeAlias = grpc.RpcMethodHandler[Any, Any]
    Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]

OTHER_METHOD: Final = "other"


def final_code(context: Context, exc: BaseException | None) -> str:
    """The name of the status a call ends with (``"OK"``, ``"NOT_FOUND"``...)."""
    if exc is None or isinstance(exc, grpc.aio.AbortError):
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code.name
        return "OK" if exc is None else "UNKNOWN"
    if isinstance(exc, asyncio.CancelledError):
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "UNKNOWN"


class RPCMetrics(grpc.aio.ServerInterceptor):
    """Counts calls by method and status, times them, tracks in-flight calls and watchers.

    Args:
        watchers: the number of open WatchNotes streams (read at scrape time).
        clock: monotonic seconds (tests may pass their own).
    """

    def __init__(
        self,
        watchers: Callable[[], int] = lambda: 0,
        *,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.watchers = watchers
        self.clock = clock
        self.calls: dict[tuple[str, str], int] = {}
        self.in_flight = 0
        self.duration = Histogram()

    def count(self, method: str, code: str) -> None:
        key = (method, code)
        self.calls[key] = self.calls.get(key, 0) + 1

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            self.count(OTHER_METHOD, "UNIMPLEMENTED")
            return None
        return self._wrap(handler, handler_call_details.method)

    def _wrap(self, handler: Handler, method: str) -> Handler:
        behavior = (
            handler.unary_unary
            or handler.stream_unary
            or handler.unary_stream
            or handler.stream_stream
        )
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a sync behaviour runs in gRPC's thread pool: not ours to time
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(handler.stream_unary, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, method),
                handler.request_deserializer,
                handler.response_serializer,
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.stream_stream, method),
            handler.request_deserializer,
            handler.response_serializer,
        )

    @contextlib.contextmanager
    def _call(self, method: str, context: Context, *, timed: bool) -> Iterator[None]:
        """One call's accounting: in flight while it runs, then counted by its final code
        (and timed, unless it is a server stream)."""
        self.in_flight += 1
        start = self.clock() if timed else 0.0
        failure: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            failure = exc
            raise
        finally:
            self.in_flight -= 1
            if timed:
                self.duration.observe(self.clock() - start)
            self.count(method, final_code(context, failure))

    def _unary(self, behavior: Any, method: str) -> Any:
        async def unary(request: Any, context: Context) -> Any:
            with self._call(method, context, timed=True):
                return await behavior(request, context)

        return unary

    def _stream(self, behavior: Any, method: str) -> Any:
        if inspect.isasyncgenfunction(behavior):

            async def generator(request: Any, context: Context) -> AsyncIterator[Any]:
                with self._call(method, context, timed=False):
                    async for response in behavior(request, context):
                        yield response

            return generator

        # A coroutine that writes with context.write (WatchNotes, health Watch).
        async def writer(request: Any, context: Context) -> None:
            with self._call(method, context, timed=False):
                await behavior(request, context)

        return writer

    def collect(self) -> Iterator[Any]:
        """The prometheus_client custom-collector protocol."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        calls = CounterMetricFamily(
            "netstack_rpc_calls",
            "Finished gRPC calls by full method name and status code",
            labels=["method", "code"],
        )
        for (method, code), n in sorted(self.calls.items()):
            calls.add_metric([method, code], n)
        yield calls
        yield self.duration.family(
            "netstack_rpc_call_duration_seconds",
            "Time to answer a unary or client-streaming call (server streams excluded)",
        )
        yield GaugeMetricFamily(
            "netstack_rpc_calls_in_flight", "Calls being handled", value=self.in_flight
        )
        yield GaugeMetricFamily(
            "netstack_rpc_watchers", "Open WatchNotes streams", value=self.watchers()
        )
