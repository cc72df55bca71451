"""In-process harness for the L7 proxy's Python cost per request (no sockets, no loop I/O).

Not a test. A real :class:`~netstack.servers.lb.Balancer` (quick form, ``--mode http``,
two backends that are never connected to) is started on the running loop; then one
client :class:`~netstack.servers.lb.http.ProxyConnection` and one pooled
:class:`~netstack.servers.lb.http.Upstream` per backend get recording fake transports,
and a loop feeds wrk's request to the client side and nginx's answer to whichever
upstream got the request. What remains is the proxy's own Python work per request
(parse, route, rewrite, pick, write, parse the answer, rewrite, write): the loop's
syscalls are not in it (``bench/l7cpu.py`` measures the whole process).

    .venv/bin/python bench/l7harness.py                    # µs/request, best of 5
    .venv/bin/python bench/l7harness.py --profile          # cProfile, sorted by tottime
    .venv/bin/python bench/l7harness.py --pipeline 4       # 4 requests per client read
    .venv/bin/python bench/l7harness.py --access-log       # with the access log (to /dev/null)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Any

# bench/http.py would shadow the stdlib `http` (this folder is sys.path[0]).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

from netstack.config import BalancerQuickConfig  # noqa: E402
from netstack.servers.lb import Balancer  # noqa: E402
from netstack.servers.lb.http import HTTPListener, ProxyConnection, Upstream  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Wed, 25 Nov 2026 15:25:17 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    b"Hello, world!"
)


class FakeTransport:
    """Enough of asyncio.Transport for the proxy; writes are kept for the harness."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.out: list[bytes] = []
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self.peer
        if name == "sockname":
            return ("127.0.0.1", 8080)
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.out.append(data)

    def writelines(self, data: Any) -> None:
        self.out.extend(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


def _check(out: list[bytes], pipeline: int) -> None:
    data = b"".join(out)
    if data.count(b"HTTP/1.1 200 OK\r\n") != pipeline or not data.endswith(b"Hello, world!"):
        raise SystemExit(f"unexpected proxy output: {data!r}")


async def run(args: argparse.Namespace) -> None:
    cfg = BalancerQuickConfig(
        listen="127.0.0.1:0",
        backend=("127.0.0.1:1", "127.0.0.1:2"),
        mode="http",
        access_log=args.access_log,
    ).to_balancer()
    if args.access_log:  # formatted and written as `netstack balance` would, to /dev/null
        import logging

        from netstack import log

        log.configure("info")  # as the CLI does; then its stderr handler writes to /dev/null
        handler = logging.getLogger("netstack").handlers[0]
        assert isinstance(handler, logging.StreamHandler)
        handler.setStream(open(os.devnull, "w"))  # noqa: ASYNC230, SIM115  # for the run
    async with Balancer(cfg) as lb:
        listener = next(iter(lb.listeners.values()))
        assert isinstance(listener, HTTPListener)
        ups: dict[Any, Upstream] = {}
        for backend in listener.state.pool.backends:
            up = Upstream(listener, backend)
            up.connection_made(FakeTransport(("127.0.0.1", backend.port)))  # type: ignore[arg-type]
            listener.park(up, 0.0)
            ups[backend] = up
        client = ProxyConnection(listener)
        ct = FakeTransport(("127.0.0.1", 40000))
        client.connection_made(ct)  # type: ignore[arg-type]
        request = REQUEST * args.pipeline
        by_transport = {id(up.transport): up for up in ups.values()}

        def one() -> None:
            client.data_received(request)
            for _ in range(args.pipeline):
                up = client.upstream
                assert up is not None
                t = up.transport
                assert isinstance(t, FakeTransport)
                t.out.clear()
                by_transport[id(t)].data_received(RESPONSE)

        for _ in range(200):
            one()
        _check(ct.out[-1:] if args.pipeline == 1 else ct.out[-args.pipeline :], args.pipeline)
        n = args.requests // args.pipeline
        if args.profile:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(n):
                one()
                ct.out.clear()
            prof.disable()
            prof.dump_stats("/tmp/l7perf/prof.out")
            stats = pstats.Stats(prof, stream=sys.stdout)
            stats.sort_stats("tottime").print_stats(30)
            stats.sort_stats("cumulative").print_stats(40)
        else:
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.process_time()
                for _ in range(n):
                    one()
                    ct.out.clear()
                best = min(best, (time.process_time() - t0) / (n * args.pipeline))
            print(f"{best * 1e6:.2f} us/request (best of {args.repeat} x {n * args.pipeline})")
        client.connection_lost(None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=5_000)
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--pipeline", type=int, default=1)
    p.add_argument("--profile", action="store_true")
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--no-gc", action="store_true", help="gc.disable() during the runs")
    p.add_argument("--access-log", action="store_true", help="log each request to /dev/null")
    args = p.parse_args()
    if args.no_gc:
        import gc

        gc.disable()
    if args.uvloop:
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
