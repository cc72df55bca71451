"""Chat benchmark: many WebSocket clients on one ``netstack chat serve`` process.

Not a test (not run in CI). For each client count (default 1,000, 5,000 and 10,000) it:

1. writes a fresh SQLite database with N accounts, a login session each and a room
   ``bench`` that all of them belong to (scrypt would cost ~50 ms per login: the clients
   ``resume`` with known tokens instead, which the server checks in the store as usual);
2. starts ``netstack chat serve`` (uvloop) as its own process, optionally pinned to CPU 0
   (``--taskset``; this load client then runs on CPU 1), and reads its RSS;
3. connects the N clients (a lean raw-frame WebSocket client, see ``Client``; this
   process, a bounded number of handshakes at once), resumes their sessions and waits
   until all are subscribed, then reads the server's RSS again: **memory per
   connection** is the difference over N;
4. **fan-out latency**: one client says a message in ``bench`` ``--broadcasts`` times, one
   after the other; each of the N clients notes when the message arrived; p50/p99 over all
   deliveries of all broadcasts, from the send to the receipt (one process, one clock);
   also the server's CPU time per broadcast (what the fan-out costs the server, whatever
   the load generator's speed);
5. **sustained messages/s**: ``--senders`` clients (default 100) each keep one ``say`` in
   flight in a room of their own (``load``, the senders only, so every message is also
   delivered to the 100) for ``--duration`` seconds; accepted messages/s and deliveries/s;
6. with ``--hold S``: every client stays idle S seconds (past the server's keepalive pings,
   which the client answers) and must still be connected.

Everything is bounded: client counts, runs, broadcast count and durations come from the
command line and every wait has a deadline. Loopback only. ``--repeat`` runs every size
that many times (in rounds) and reports medians; the header gives the load average.

    python bench/chat.py --clients 1000,5000,10000 --taskset --repeat 3 --png bench/RESULTS-chat.png
    python bench/chat.py --clients 50 --broadcasts 3 --duration 1      # a smoke run
"""

# ruff: noqa: E402  (the path fix below must run before the imports)
from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder is sys.path[0], and bench/http.py would shadow the stdlib
# ``http`` package that websockets imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import psutil
import uvloop

from netstack.servers.chat import auth
from netstack.servers.chat.sqlite import SQLiteStore

HANDSHAKES_AT_ONCE = 200
PHASE_TIMEOUT = 300.0  # seconds: any phase that takes longer aborts the run
BENCH_ROOM = "bench"
LOAD_ROOM = "load"


_T0 = time.monotonic()


def progress(text: str) -> None:
    print(f"[{time.monotonic() - _T0:7.1f} s] {text}", file=sys.stderr, flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[k]


# --------------------------------------------------------------------------- setup


async def seed(db: Path, clients: int, senders: int) -> list[str]:
    """N users with a session each, all in ``bench``; the first ``senders`` also in ``load``."""
    store = SQLiteStore(db)
    await store.open()
    now = int(time.time() * 1000)
    tokens: list[str] = []
    dummy = auth.hash_password("not used: clients resume", n=2**4)
    owner = None
    bench = load = None
    for i in range(clients):
        user = await store.create_user(f"u{i}", dummy, now)
        token = auth.new_token()
        await store.create_session(auth.token_hash(token), user.id, now + 86_400_000, now)
        tokens.append(token)
        if owner is None:
            owner = user
            bench = await store.create_room(BENCH_ROOM, "public", "", user.id, now)
            load = await store.create_room(LOAD_ROOM, "public", "", user.id, now)
        else:
            assert bench is not None
            assert load is not None
            await store.add_member(bench.id, user.id, "member", now)
            if i < senders:
                await store.add_member(load.id, user.id, "member", now)
    await store.close()
    return tokens


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def start_server(db: Path, clients: int, taskset: bool) -> tuple[subprocess.Popen[str], int]:
    cmd = [
        sys.executable,
        "-m",
        "netstack",
        "--log-level",
        "warning",
        "chat",
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--tcp-bind",
        "none",
        "--db",
        str(db),
        "--max-clients",
        str(clients + 100),
        "--flood-rate",
        "1000000",
        "--flood-burst",
        "1000000",
        "--max-outgoing-bytes",
        str(64 << 20),
    ]
    if taskset:
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=raise_fd_limit)
    assert proc.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith("listening on ws "):
            return proc, int(line.rsplit(":", 1)[1])
    proc.kill()
    raise RuntimeError("the chat server did not start")


def server_process(proc: subprocess.Popen[str]) -> psutil.Process:
    """The server's python process (below taskset if any)."""
    p = psutil.Process(proc.pid)
    children = p.children()
    return children[0] if children else p


def server_rss(proc: subprocess.Popen[str]) -> int:
    return server_process(proc).memory_info().rss


def server_cpu(proc: subprocess.Popen[str]) -> float:
    """CPU seconds (user + system) the server has used so far."""
    times = server_process(proc).cpu_times()
    return times.user + times.system


# --------------------------------------------------------------------------- clients
#
# A lean client: a raw asyncio Protocol speaking just enough RFC 6455 (one handshake, text
# frames, ping -> pong). The websockets client costs ~85 us of this process's CPU per
# received message (frame parser, assembler, a task wake-up per message, then the
# listener's): at 10,000 clients one broadcast took this client ~0.85 s to read, so the
# measured "fan-out" was the load generator's own queue. Here a delivery costs one
# data_received callback, and its arrival time is taken there, before any JSON parsing.

_HANDSHAKE = (
    "GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Key: bmV0c3RhY2stYmVuY2gtMQ==\r\n"
    "Sec-WebSocket-Version: 13\r\n\r\n"
)
_MASK = b"\0\0\0\0"  # a zero mask: XOR is the identity (loopback bench, no proxy to poison)
_MARK = b'"text":"b#'


def client_frame(opcode: int, payload: bytes) -> bytes:
    size = len(payload)
    if size < 126:
        header = bytes((0x80 | opcode, 0x80 | size))
    elif size < 1 << 16:
        header = bytes((0x80 | opcode, 0x80 | 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + size.to_bytes(8, "big")
    return header + _MASK + payload


class Client(asyncio.Protocol):
    """One bench connection: ``call`` a command, note when broadcast markers arrive."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.upgraded = asyncio.get_running_loop().create_future()
        self.waiting: asyncio.Future[dict[str, object]] | None = None
        self.received: dict[bytes, float] = {}  # marker -> arrival time (perf_counter)
        self.messages = 0  # "message" events received (load phase)
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        transport.write(_HANDSHAKE.format(port=self.port).encode())

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for fut in (self.upgraded, self.waiting):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError("connection lost"))

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        buf = self.buf
        buf += data
        if not self.upgraded.done():
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.upgraded.set_exception(RuntimeError(bytes(buf[:end]).decode()))
                return
            del buf[: end + 4]
            self.upgraded.set_result(None)
        pos = 0
        while len(buf) - pos >= 2:
            opcode, size = buf[pos] & 0x0F, buf[pos + 1] & 0x7F
            head = 2
            if size == 126:
                if len(buf) - pos < 4:
                    break
                size, head = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif size == 127:
                if len(buf) - pos < 10:
                    break
                size, head = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            if len(buf) - pos < head + size:
                break
            payload = bytes(buf[pos + head : pos + head + size])
            pos += head + size
            if opcode == 0x1:
                self.text(payload, now)
            elif opcode == 0x9:  # ping: the server's keepalive
                self.send_frame(0xA, payload)
        del buf[:pos]

    def text(self, payload: bytes, now: float) -> None:
        if payload.startswith(b'{"type":"message"'):
            self.messages += 1
            mark = payload.find(_MARK)
            if mark >= 0:
                start = mark + len(_MARK) - 2
                self.received[payload[start : payload.index(b'"', start)]] = now
            return
        waiting = self.waiting
        if waiting is not None and payload.startswith((b'{"type":"ack"', b'{"type":"error"')):
            event = json.loads(payload)
            if event.get("id") == 1 and not waiting.done():
                waiting.set_result(event)

    def send_frame(self, opcode: int, payload: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(client_frame(opcode, payload))

    async def call(self, kind: str, **fields: object) -> dict[str, object]:
        """Send a command and wait for its reply (one at a time per client)."""
        self.waiting = asyncio.get_running_loop().create_future()
        self.send_frame(0x1, json.dumps({"type": kind, "id": 1, **fields}).encode())
        event = await self.waiting
        self.waiting = None
        if event["type"] == "error":
            raise RuntimeError(f"{kind}: {event}")
        return event

    def close(self) -> None:
        self.send_frame(0x8, (1000).to_bytes(2, "big"))
        if self.transport is not None:
            self.transport.close()


async def open_client(port: int, token: str, sem: asyncio.Semaphore) -> Client:
    async with sem:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_connection(lambda: Client(port), "127.0.0.1", port)
        async with asyncio.timeout(60):
            await client.upgraded
            await client.call("resume", token=token)  # the hello before it is skipped
        return client


async def fanout(clients: list[Client], broadcasts: int) -> list[float]:
    """Latencies (ms) of every delivery of ``broadcasts`` messages to every client."""
    sender = clients[0]
    latencies: list[float] = []
    for i in range(broadcasts):
        marker = f"b#{i}"
        key = marker.encode()
        sent = time.perf_counter()
        await sender.call("say", room=BENCH_ROOM, text=marker)
        deadline = time.monotonic() + PHASE_TIMEOUT
        while sum(1 for c in clients[1:] if key in c.received) < len(clients) - 1:
            if time.monotonic() > deadline:
                raise RuntimeError(f"broadcast {i} not delivered to every client in time")
            await asyncio.sleep(0.005)
        latencies += [(c.received[key] - sent) * 1000 for c in clients[1:]]
    return latencies


async def sustained(clients: list[Client], duration: float) -> tuple[float, float]:
    """``say`` in a closed loop from each client for ``duration`` s: (msgs/s, deliveries/s)."""
    stop_at = time.monotonic() + duration
    counts = [0] * len(clients)
    before = sum(c.messages for c in clients)

    async def run(i: int, client: Client) -> None:
        while time.monotonic() < stop_at:
            await client.call("say", room=LOAD_ROOM, text="x")
            counts[i] += 1

    start = time.monotonic()
    async with asyncio.timeout(duration + PHASE_TIMEOUT):
        await asyncio.gather(*(run(i, c) for i, c in enumerate(clients)))
    elapsed = time.monotonic() - start
    return sum(counts) / elapsed, (sum(c.messages for c in clients) - before) / elapsed


# --------------------------------------------------------------------------- one scenario


@dataclass
class Result:
    clients: int
    connect_s: float
    kib_per_conn: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_ms: float  # server CPU per broadcast (the fan-out's cost, whatever the client)
    msgs_per_s: float
    deliveries_per_s: float


async def scenario(n: int, args: argparse.Namespace, workdir: Path) -> Result:
    db = Path(tempfile.mkdtemp(dir=workdir)) / f"chat-{n}.sqlite3"  # fresh for every run
    senders = min(args.senders, n)
    tokens = await seed(db, n, senders)
    progress(f"{n} clients: database ready")
    proc, port = start_server(db, n, args.taskset)
    progress(f"{n} clients: server up on port {port}")
    try:
        before = server_rss(proc)
        sem = asyncio.Semaphore(HANDSHAKES_AT_ONCE)
        t0 = time.monotonic()
        async with asyncio.timeout(PHASE_TIMEOUT):
            clients = await asyncio.gather(*(open_client(port, t, sem) for t in tokens))
        connect_s = time.monotonic() - t0
        after = server_rss(proc)
        progress(f"{n} clients: connected in {connect_s:.1f} s")
        cpu = server_cpu(proc)
        latencies = await fanout(clients, args.broadcasts)
        cpu_ms = (server_cpu(proc) - cpu) / args.broadcasts * 1000
        progress(f"{n} clients: fan-out measured")
        msgs, deliveries = await sustained(clients[:senders], args.duration)
        progress(f"{n} clients: load phase done")
        if args.hold:  # stable: still connected after keepalive pings (every 20 s) went by
            await asyncio.sleep(args.hold)
            pong = await clients[-1].call("ping")
            dropped = sum(c.closed for c in clients)
            progress(f"{n} clients: held {args.hold:g} s, {dropped} dropped, ping {pong['re']}")
            if dropped:
                raise RuntimeError(f"{dropped} of {n} clients were dropped while idle")
        for c in clients:
            c.close()
        return Result(
            clients=n,
            connect_s=connect_s,
            kib_per_conn=(after - before) / n / 1024,
            p50_ms=statistics.median(latencies),
            p99_ms=percentile(latencies, 0.99),
            max_ms=max(latencies),
            server_cpu_ms=cpu_ms,
            msgs_per_s=msgs,
            deliveries_per_s=deliveries,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        # Wait without blocking this loop: the clients must answer the server's closing
        # handshakes, or it waits websockets' close_timeout (10 s) for each of them.
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        progress(f"{n} clients: server stopped")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--clients", default="1000,5000,10000", help="comma-separated client counts")
    p.add_argument("--broadcasts", type=int, default=20, help="fan-out messages per scenario")
    p.add_argument("--senders", type=int, default=100, help="clients sending in the load phase")
    p.add_argument("--duration", type=float, default=5.0, help="seconds of the load phase")
    p.add_argument("--repeat", type=int, default=1, help="runs per client count (medians)")
    p.add_argument(
        "--hold", type=float, default=0.0, help="then keep every client idle this long (s)"
    )
    p.add_argument("--png", default=None, help="draw latency and memory per client count here")
    p.add_argument(
        "--taskset", action="store_true", help="pin the server to CPU 0 and this client to CPU 1"
    )
    args = p.parse_args(argv)
    args.client_counts = [int(x) for x in args.clients.split(",") if x]
    if not args.client_counts or min(args.client_counts) < 2 or max(args.client_counts) > 20_000:
        p.error("--clients: counts between 2 and 20000")
    if not 1 <= args.broadcasts <= 1000 or not 0 < args.duration <= 120:
        p.error("--broadcasts 1-1000 and --duration up to 120 s")
    if not 1 <= args.repeat <= 5 or not 0 <= args.hold <= 300:
        p.error("--repeat 1-5 and --hold up to 300 s")
    return args


COLUMNS: Final = (
    ("connect_s", "connect s", "{:.1f}"),
    ("kib_per_conn", "KiB/conn", "{:.1f}"),
    ("p50_ms", "fan-out p50 ms", "{:.1f}"),
    ("p99_ms", "p99 ms", "{:.1f}"),
    ("max_ms", "max ms", "{:.1f}"),
    ("server_cpu_ms", "server CPU ms/broadcast", "{:.1f}"),
    ("msgs_per_s", "msgs/s (senders)", "{:,.0f}"),
    ("deliveries_per_s", "deliveries/s", "{:,.0f}"),
)


def median(runs: list[Result], attr: str) -> float:
    return statistics.median(getattr(r, attr) for r in runs)


def table(rows: list[tuple[str, list[Result]]]) -> str:
    """Markdown: one row per label, each cell the median over its runs."""
    lines = [
        "| clients | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---:" * (len(COLUMNS) + 1) + "|",
    ]
    for label, runs in rows:
        cells = [fmt.format(median(runs, attr)) for attr, _, fmt in COLUMNS]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(path: str, by_size: dict[int, list[Result]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(by_size)
    fig, (lat, mem) = plt.subplots(1, 2, figsize=(12, 4.5))
    for attr, label, color in (("p50_ms", "p50", "tab:blue"), ("p99_ms", "p99", "tab:orange")):
        mid = [median(by_size[n], attr) for n in sizes]
        low = [
            m - min(getattr(r, attr) for r in by_size[n]) for n, m in zip(sizes, mid, strict=True)
        ]
        high = [
            max(getattr(r, attr) for r in by_size[n]) - m for n, m in zip(sizes, mid, strict=True)
        ]
        lat.errorbar(sizes, mid, yerr=[low, high], marker="o", capsize=4, label=label, color=color)
    cpu = [median(by_size[n], "server_cpu_ms") for n in sizes]
    lat.plot(sizes, cpu, marker="s", ls=":", color="tab:gray", label="server CPU per broadcast")
    lat.plot([1000], [50], "v", color="tab:red", label="p99 targets")
    lat.plot([10000], [250], "v", color="tab:red")
    lat.set_xlabel("connected WebSocket clients")
    lat.set_ylabel("ms (median of runs; bars: min-max)")
    lat.set_title("Fan-out of one message to every client")
    lat.legend()
    kib = [median(by_size[n], "kib_per_conn") for n in sizes]
    mem.bar([f"{n:,}" for n in sizes], kib, color="tab:blue")
    mem.axhline(30, color="tab:red", ls="--", label="target 30 KiB")
    mem.set_xlabel("connected WebSocket clients")
    mem.set_ylabel("server RSS KiB per connection")
    mem.set_title("Memory per idle connection")
    mem.legend()
    fig.suptitle("netstack chat, one server process (shared 2-CPU machine)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.taskset:
        if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
            print("--taskset needs the taskset tool and 2+ CPUs", file=sys.stderr)
            return 2
        os.sched_setaffinity(0, {1})
    raise_fd_limit()
    started = datetime.datetime.now(datetime.UTC)
    by_size: dict[int, list[Result]] = {n: [] for n in args.client_counts}
    loads: list[float] = []
    with tempfile.TemporaryDirectory(prefix="netstack-chat-bench-") as tmp:
        for run in range(args.repeat):  # rounds, so machine noise spreads over every size
            for n in args.client_counts:
                loads.append(os.getloadavg()[0])
                progress(f"run {run + 1}/{args.repeat}, load average {loads[-1]:.2f}")
                by_size[n].append(uvloop.run(scenario(n, args, Path(tmp))))
    print(
        f"# netstack chat bench, {started:%Y-%m-%d %H:%M} UTC, {platform.python_version()},"
        f" {os.cpu_count()} CPUs, taskset {'on' if args.taskset else 'off'},"
        f" {args.broadcasts} broadcasts, {args.senders} senders for {args.duration:g} s,"
        f" median of {args.repeat} run(s); 1-min load average before each scenario"
        f" {min(loads):.2f}-{max(loads):.2f}"
    )
    print(table([(f"{n:,}", by_size[n]) for n in args.client_counts]))
    if args.repeat > 1:
        print("\nEvery run:\n")
        print(table([(f"{n:,} #{i + 1}", [r]) for n in by_size for i, r in enumerate(by_size[n])]))
    if args.png:
        plot(args.png, by_size)
        print(f"\nchart: {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
