"""Echo benchmark: netstack's framed echo server against a raw uvloop Protocol.

Not a test (not run in CI). In one run it starts, each as its own process:

* ``raw``: a uvloop ``asyncio.Protocol`` with no framing that writes back what it reads
  (the ceiling for any asyncio server in Python);
* ``netstack``: ``netstack echo serve --framing length``;
* ``selectloop``: the from-scratch selectors model
  (``python -m netstack.servers.models selectloop``), when it is importable.

A bounded load client (uvloop, this process) drives each server with ping-pong
connections: every connection sends one length-prefixed message and waits for the same byte
count back before sending the next. It runs each scenario (default: 1 and 50 connections)
for ``--duration`` seconds, ``--runs`` times, interleaving servers within a run so drift
hits them all alike, and prints the median msgs/s and the ratio netstack/raw.

    python bench/echo.py --runs 5 --taskset
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import uvloop

NETSTACK_ARGS = ("--framing", "length", "--bind", "127.0.0.1:0")


# --------------------------------------------------------------------------- raw server


class RawEcho(asyncio.Protocol):
    """No framing: write back whatever arrives."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


async def _raw_server(bind_host: str) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawEcho, bind_host, 0)
    host, port = server.sockets[0].getsockname()[:2]
    print(f"READY {host}:{port}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


# --------------------------------------------------------------------------- load client


class PingPong(asyncio.Protocol):
    """One connection: send a message, wait for ``len(message)`` bytes back, repeat."""

    def __init__(self, message: bytes, stats: Stats) -> None:
        self.message = message
        self.expect = len(message)
        self.stats = stats
        self.pending = 0
        self.sent_at = 0.0
        self.running = True
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]

    def start(self) -> None:
        self.pending = self.expect
        self.sent_at = time.perf_counter()
        self.transport.write(self.message)

    def data_received(self, data: bytes) -> None:
        self.pending -= len(data)
        if self.pending > 0:
            return
        now = time.perf_counter()
        stats = self.stats
        stats.count += 1
        if stats.sample:
            stats.rtts.append(now - self.sent_at)
        if self.running:
            self.pending = self.expect
            self.sent_at = now
            self.transport.write(self.message)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass
class Stats:
    count: int = 0
    sample: bool = False
    rtts: list[float] = field(default_factory=list)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (Linux /proc), 0.0 where unavailable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(
    host: str, port: int, connections: int, size: int, duration: float, pid: int = 0
) -> tuple[float, float, float]:
    """Return (msgs/s, p99 ms, server CPU %) for ``connections`` ping-pong connections."""
    loop = asyncio.get_running_loop()
    message = struct.pack("!I", size) + b"x" * size
    stats = Stats()
    conns: list[PingPong] = []
    for _ in range(connections):
        _, proto = await loop.create_connection(lambda: PingPong(message, stats), host, port)
        conns.append(proto)
    for c in conns:
        c.start()
    await asyncio.sleep(min(0.3, duration / 4))  # warm up
    stats.count, stats.sample = 0, True
    start, cpu_start = time.perf_counter(), cpu_seconds(pid)
    await asyncio.sleep(duration)
    done, elapsed = stats.count, time.perf_counter() - start
    cpu = (cpu_seconds(pid) - cpu_start) / elapsed * 100
    stats.sample = False
    for c in conns:
        c.running = False
        c.transport.close()
    await asyncio.gather(*(c.closed for c in conns))
    rtts = sorted(stats.rtts)
    p99 = rtts[int(len(rtts) * 0.99)] * 1e3 if rtts else float("nan")
    return done / elapsed, p99, cpu


# --------------------------------------------------------------------------- servers


@dataclass
class ServerProc:
    name: str
    proc: subprocess.Popen[str]
    host: str
    port: int


def _pin(cmd: list[str], core: int | None) -> list[str]:
    return ["taskset", "-c", str(core), *cmd] if core is not None else cmd


def start_server(name: str, cmd: list[str], marker: str, core: int | None) -> ServerProc:
    proc = subprocess.Popen(
        _pin(cmd, core),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(marker):
            addr = line.strip().rsplit(" ", 1)[1]
            host, _, port = addr.rpartition(":")
            return ServerProc(name, proc, host.strip("[]"), int(port))
    proc.kill()
    proc.wait()
    raise RuntimeError(f"{name}: did not print {marker!r} (exit {proc.poll()})")


def stop_server(server: ServerProc) -> None:
    server.proc.send_signal(signal.SIGTERM)
    try:
        server.proc.wait(10)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
    if server.proc.stdout is not None:
        server.proc.stdout.close()


def selectloop_available() -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import netstack.servers.models.selectloop"],
        capture_output=True,
        check=False,
    )
    return probe.returncode == 0


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--duration", type=float, default=2.0, help="seconds per measurement")
    p.add_argument("--size", type=int, default=64, help="message body bytes")
    p.add_argument("--connections", default="1,50", help="comma-separated scenarios")
    p.add_argument(
        "--taskset", action="store_true", help="pin servers to CPU 0 and this client to CPU 1"
    )
    p.add_argument("--no-selectloop", action="store_true")
    p.add_argument("--raw-server", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.raw_server:
        uvloop.run(_raw_server("127.0.0.1"))
        return 0
    server_core: int | None = None
    if args.taskset:
        if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
            print("--taskset needs the taskset tool and 2+ CPUs", file=sys.stderr)
            return 2
        server_core = 0
        os.sched_setaffinity(0, {1})
    scenarios = [int(c) for c in args.connections.split(",")]
    py = sys.executable
    specs = [
        ("raw", [py, os.path.abspath(__file__), "--raw-server"], "READY"),
        (
            "netstack",
            # Default settings (idle timeout, limits, flow control all on), as users get it.
            [py, "-m", "netstack", "--log-level", "warning", "echo", "serve", *NETSTACK_ARGS],
            "listening on",
        ),
    ]
    missing: list[str] = []
    if not args.no_selectloop:
        if selectloop_available():
            specs.append(
                (
                    "selectloop",
                    [py, "-m", "netstack.servers.models", "selectloop", "--bind", "127.0.0.1:0"],
                    "READY",
                )
            )
        else:
            missing.append("selectloop (netstack.servers.models.selectloop not importable)")

    load_before = os.getloadavg()[0]  # other work on the machine skews every figure
    servers = [start_server(name, cmd, marker, server_core) for name, cmd, marker in specs]
    results: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    try:
        for run in range(args.runs):
            for conns in scenarios:
                for srv in servers:
                    rate, p99, cpu = uvloop.run(
                        drive(srv.host, srv.port, conns, args.size, args.duration, srv.proc.pid)
                    )
                    results.setdefault((srv.name, conns), []).append((rate, p99, cpu))
                    print(
                        f"run {run + 1}/{args.runs} {srv.name:>10} c={conns:<3}"
                        f" {rate:>9.0f} msgs/s  p99 {p99:.3f} ms  server cpu {cpu:.0f}%",
                        file=sys.stderr,
                    )
    finally:
        for srv in servers:
            stop_server(srv)

    names = [s.name for s in servers]
    print()
    print(
        f"# {datetime.date.today()} {platform.machine()} {os.cpu_count()} CPUs,"
        f" Python {platform.python_version()}, uvloop {uvloop.__version__},"
        f" size {args.size} B, {args.runs} runs x {args.duration:g} s,"
        f" taskset {'on' if args.taskset else 'off'},"
        f" load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    header = "| connections | " + " | ".join(f"{n} msgs/s" for n in names)
    print(header + " | netstack/raw | paired | server CPU µs/msg raw / netstack |")
    print("|---" * (len(names) + 4) + "|")
    worst = float("inf")
    for conns in scenarios:
        cells = []
        med: dict[str, float] = {}
        cost: dict[str, float] = {}
        for n in names:
            rates, p99s, cpus = zip(*results[(n, conns)], strict=True)
            med[n] = statistics.median(rates)
            # CPU per message is robust to other load on the machine, throughput is not.
            cost[n] = statistics.median(c / 100 / r * 1e6 for r, c in zip(rates, cpus, strict=True))
            cells.append(
                f"{med[n]:,.0f} (p99 {statistics.median(p99s):.3f} ms,"
                f" cpu {statistics.median(cpus):.0f}%)"
            )
        ratio = med["netstack"] / med["raw"]
        # Runs alternate servers, so each run also gives a paired ratio: robust to drift.
        paired = statistics.median(
            n[0] / r[0]
            for n, r in zip(results[("netstack", conns)], results[("raw", conns)], strict=True)
        )
        worst = min(worst, ratio)
        print(
            f"| {conns} | "
            + " | ".join(cells)
            + f" | {ratio:.2f} | {paired:.2f} | {cost['raw']:.1f} / {cost['netstack']:.1f} |"
        )
    for m in missing:
        print(f"missing: {m}")
    print(
        f"target netstack >= 0.9x raw: {'met' if worst >= 0.9 else 'NOT met'} (worst {worst:.2f})"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
