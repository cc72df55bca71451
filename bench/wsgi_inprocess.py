"""Per-request CPU cost of ``netstack serve --threads 0`` in process: no sockets.

Not a test (not run in CI). Feeds wrk's request (``GET /`` with a Host header) one at a
time to ``WSGIProtocol.data_received`` of a real ``WSGIServer`` (every limit and timeout
at its default, access log off as in bench/http.py) with a no-op transport, and the same
bytes to the 60-line floor (bench/sketch_wsgi.py). Prints the best of 7 timings in µs per
request (CPU time of this process): the Python work of each path without the kernel
and the loop.

    .venv/bin/python bench/wsgi_inprocess.py [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import timeit
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    del sys.path[0]  # bench/http.py would shadow the stdlib http package
sys.path.append(str(HERE / "apps"))
sys.path.append(str(HERE))

from hello_wsgi import app  # noqa: E402
from sketch_wsgi import Sketch  # noqa: E402

from netstack.config import WSGIServerConfig  # noqa: E402
from netstack.servers.wsgi.protocol import WSGIProtocol  # noqa: E402
from netstack.servers.wsgi.server import WSGIServer  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"  # what wrk sends
# What a browser sends (--browser): ten headers.
BROWSER = (
    b"GET /index.html?q=1 HTTP/1.1\r\nHost: example.com\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
    b"Connection: keep-alive\r\nCookie: session=abc123; theme=dark\r\n"
    b"Upgrade-Insecure-Requests: 1\r\nSec-Fetch-Dest: document\r\n"
    b"Sec-Fetch-Mode: navigate\r\n\r\n"
)
NUMBER = 100_000
REPEAT = 7


class NullTransport:
    """Just enough of a transport for ``connection_made`` and ``data_received``."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += 1

    def get_extra_info(self, name: str, default: object = None) -> object:
        if name in ("peername", "sockname"):
            return ("127.0.0.1", 1)
        return default

    def is_closing(self) -> bool:
        return False

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass


def netstack_protocol(parser: str = "httptools") -> tuple[Any, NullTransport]:
    cfg = WSGIServerConfig(app="hello_wsgi:app", threads=0, access_log=False, parser=parser)
    server = WSGIServer(cfg, app)
    server._update_clock()
    protocol = WSGIProtocol(server)
    transport = NullTransport()
    protocol.connection_made(transport)
    return protocol, transport


def sketch_protocol() -> tuple[Any, NullTransport]:
    protocol = Sketch(app)
    transport = NullTransport()
    protocol.connection_made(transport)
    return protocol, transport


def best(protocol: Any, transport: NullTransport, request: bytes = REQUEST) -> float:
    feed = protocol.data_received
    feed(request)
    assert transport.written == 1, "no response"
    # CPU time, not wall time: the machine is shared, and a descheduled run is not slower.
    timer = timeit.Timer(lambda: feed(request), timer=time.process_time)
    times = timer.repeat(number=NUMBER, repeat=REPEAT)
    assert transport.written == 1 + NUMBER * REPEAT, "a request went unanswered"
    return min(times) / NUMBER * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", action="store_true", help="cProfile netstack's path")
    p.add_argument("--parser", default="httptools")
    p.add_argument("--browser", action="store_true", help="a 10-header request, not wrk's")
    args = p.parse_args()
    asyncio.set_event_loop(asyncio.new_event_loop())
    if args.profile:
        import cProfile
        import pstats

        protocol, _ = netstack_protocol(args.parser)
        feed = protocol.data_received
        request = BROWSER if args.browser else REQUEST
        with cProfile.Profile() as prof:
            for _ in range(NUMBER):
                feed(request)
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        return
    request = BROWSER if args.browser else REQUEST
    sketch = best(*sketch_protocol(), request)
    netstack = best(*netstack_protocol(args.parser), request)
    print(f"sketch   {sketch:6.2f} us/request")
    print(f"netstack {netstack:6.2f} us/request  (+{netstack - sketch:.2f})")


if __name__ == "__main__":
    main()
