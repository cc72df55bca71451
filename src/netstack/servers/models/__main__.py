"""``python -m netstack.servers.models MODEL --bind HOST:PORT``: one model as a process.

Prints ``READY HOST:PORT`` on stdout once listening (port 0 is resolved), serves until
SIGTERM or SIGINT, then exits 0. Exit 2 on bad arguments, 3 when the bind fails. This is
what ``netstack bench models`` starts for each measurement; it sits here rather than in
``cli/`` because it is a server process, not a user-facing command, and it handles its
own signals for that reason.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import threading
from collections.abc import Callable, Sequence

from netstack import log
from netstack.config import ALL_MODELS, parse_hostport
from netstack.errors import ConfigError
from netstack.servers.models import MODELS, AsyncioServer, ModelConfig, create_listener
from netstack.transport.loop import run


def _optional_seconds(text: str) -> float | None:
    return None if text.lower() == "none" else float(text)


def _parser() -> argparse.ArgumentParser:
    defaults = ModelConfig()
    parser = argparse.ArgumentParser(
        prog="python -m netstack.servers.models",
        description="Serve the length-prefixed echo protocol with one concurrency model.",
    )
    parser.add_argument("model", choices=ALL_MODELS)
    parser.add_argument("--bind", default="127.0.0.1:0", help="HOST:PORT (port 0: any free)")
    parser.add_argument("--max-frame-bytes", type=int, default=defaults.max_frame_bytes)
    parser.add_argument(
        "--idle-timeout",
        type=_optional_seconds,
        default=defaults.idle_timeout,
        help="seconds, or 'none'",
    )
    parser.add_argument("--pool-threads", type=int, default=defaults.pool_threads)
    parser.add_argument("--max-running", type=int, default=defaults.max_running)
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), default="warning"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one model server; return the process exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        host, port = parse_hostport(args.bind, field="bind")
        config = ModelConfig(
            max_frame_bytes=args.max_frame_bytes,
            idle_timeout=args.idle_timeout,
            pool_threads=args.pool_threads,
            max_running=args.max_running,
        )
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    log.configure(args.log_level)
    try:
        listener = create_listener(host, port)
    except OSError as exc:
        print(f"{parser.prog}: error: cannot listen on {args.bind}: {exc}", file=sys.stderr)
        return 3
    with listener:
        bound_host, bound_port = listener.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        if args.model == "asyncio":
            server = AsyncioServer(listener, config, loop=args.loop)
            _run_asyncio(server, lambda: _ready(shown, bound_port))
        else:
            model = MODELS[args.model](listener, config)
            stop = threading.Event()
            for signum in (signal.SIGTERM, signal.SIGINT):
                signal.signal(signum, lambda _signum, _frame: stop.set())
            _ready(shown, bound_port)
            model.serve(stop)
    return 0


def _ready(host: str, port: int) -> None:
    print(f"READY {host}:{port}", flush=True)


def _run_asyncio(server: AsyncioServer, ready: Callable[[], None]) -> None:
    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await server.serve_async(stop, ready=ready)

    run(serve(), loop=server.loop_name)


if __name__ == "__main__":
    raise SystemExit(main())
