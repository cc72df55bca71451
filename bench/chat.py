"""Chat benchmark: many WebSocket clients on one ``netstack chat serve`` process.

Not a test (not run in CI). For each client count (default 1,000, 5,000 and 10,000) it:

1. writes a fresh SQLite database with N accounts, a login session each and a room
   ``bench`` that all of them belong to (scrypt would cost ~50 ms per login: the clients
   ``resume`` with known tokens instead, which the server checks in the store as usual);
2. starts ``netstack chat serve`` (uvloop) as its own process, optionally pinned to CPU 0
   (``--taskset``; this load client then runs on CPU 1), and reads its RSS;
3. connects the N clients (websockets, this process, a bounded number of handshakes at
   once), resumes their sessions and waits until all are subscribed, then reads the
   server's RSS again: **memory per connection** is the difference over N;
4. **fan-out latency**: one client says a message in ``bench`` ``--broadcasts`` times, one
   after the other; each of the N clients notes when the message arrived; p50/p99 over all
   deliveries of all broadcasts, from the send to the receipt (one process, one clock);
5. **sustained messages/s**: ``--senders`` clients (default 100) each keep one ``say`` in
   flight in a room of their own (``load``, the senders only, so every message is also
   delivered to the 100) for ``--duration`` seconds; accepted messages/s and deliveries/s.

Everything is bounded: client counts, broadcast count and durations come from the command
line and every wait has a deadline. Loopback only.

    python bench/chat.py --clients 1000,5000,10000 --taskset
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
from dataclasses import dataclass, field

import psutil
import uvloop
from websockets.asyncio.client import ClientConnection, connect

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


def server_rss(proc: subprocess.Popen[str]) -> int:
    """RSS of the server (the python process, below taskset if any)."""
    p = psutil.Process(proc.pid)
    children = p.children()
    return (children[0] if children else p).memory_info().rss


# --------------------------------------------------------------------------- clients


@dataclass
class Client:
    ws: ClientConnection
    received: dict[str, float] = field(default_factory=dict)  # marker text -> arrival time
    watch: str = ""

    async def call(self, kind: str, **fields: object) -> dict[str, object]:
        """Send a command and read until its reply (events before it are noted)."""
        await self.ws.send(json.dumps({"type": kind, "id": 1, **fields}))
        while True:
            event = json.loads(await self.ws.recv())
            if event.get("type") in ("ack", "error") and event.get("id") == 1:
                if event["type"] == "error":
                    raise RuntimeError(f"{kind}: {event}")
                return event  # type: ignore[no-any-return]


async def open_client(port: int, token: str, sem: asyncio.Semaphore) -> Client:
    async with sem:
        # max_queue=None: a client that stops reading (after the load phase) still drains
        # its socket, so closing it is not held up by TCP backpressure.
        ws = await connect(
            f"ws://127.0.0.1:{port}/ws", max_size=None, max_queue=None, open_timeout=60
        )
        client = Client(ws)
        json.loads(await ws.recv())  # hello
        await client.call("resume", token=token)
        return client


async def listen(client: Client, prefix: str, stop: asyncio.Event) -> None:
    """Note the arrival time of each ``message`` whose text starts with ``prefix``."""
    while not stop.is_set():
        try:
            raw = await client.ws.recv()
        except Exception:
            return
        now = time.perf_counter()
        if '"type":"message"' not in raw or prefix not in raw:
            continue
        text = json.loads(raw)["message"]["text"]
        client.received[text] = now


async def fanout(clients: list[Client], broadcasts: int) -> list[float]:
    """Latencies (ms) of every delivery of ``broadcasts`` messages to every client."""
    stop = asyncio.Event()
    listeners = [asyncio.create_task(listen(c, "b#", stop)) for c in clients[1:]]
    sender = clients[0]
    latencies: list[float] = []
    try:
        for i in range(broadcasts):
            marker = f"b#{i}"
            sent = time.perf_counter()
            await sender.call("say", room=BENCH_ROOM, text=marker)
            deadline = time.monotonic() + PHASE_TIMEOUT
            while sum(1 for c in clients[1:] if marker in c.received) < len(clients) - 1:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"broadcast {i} not delivered to every client in time")
                await asyncio.sleep(0.005)
            latencies += [(c.received[marker] - sent) * 1000 for c in clients[1:]]
    finally:
        stop.set()
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
    return latencies


async def sustained(clients: list[Client], duration: float) -> tuple[float, float]:
    """``say`` in a closed loop from each client for ``duration`` s: (msgs/s, deliveries/s)."""
    stop_at = time.monotonic() + duration
    counts = [0] * len(clients)
    delivered = [0] * len(clients)

    async def run(i: int, client: Client) -> None:
        ws = client.ws
        while time.monotonic() < stop_at:
            await ws.send(json.dumps({"type": "say", "id": 1, "room": LOAD_ROOM, "text": "x"}))
            while True:  # deliveries from others arrive in between; count them too
                raw = await ws.recv()
                if '"type":"message"' in raw:
                    delivered[i] += 1
                elif '"type":"ack"' in raw:
                    counts[i] += 1
                    break
                elif '"type":"error"' in raw:
                    raise RuntimeError(raw)

    start = time.monotonic()
    async with asyncio.timeout(duration + PHASE_TIMEOUT):
        await asyncio.gather(*(run(i, c) for i, c in enumerate(clients)))
    elapsed = time.monotonic() - start
    return sum(counts) / elapsed, sum(delivered) / elapsed


# --------------------------------------------------------------------------- one scenario


@dataclass
class Result:
    clients: int
    connect_s: float
    kib_per_conn: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    msgs_per_s: float
    deliveries_per_s: float


async def scenario(n: int, args: argparse.Namespace, workdir: Path) -> Result:
    db = workdir / f"chat-{n}.sqlite3"
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
        latencies = await fanout(clients, args.broadcasts)
        progress(f"{n} clients: fan-out measured")
        msgs, deliveries = await sustained(clients[:senders], args.duration)
        progress(f"{n} clients: load phase done")
        await asyncio.gather(*(c.ws.close() for c in clients), return_exceptions=True)
        return Result(
            clients=n,
            connect_s=connect_s,
            kib_per_conn=(after - before) / n / 1024,
            p50_ms=statistics.median(latencies),
            p99_ms=percentile(latencies, 0.99),
            max_ms=max(latencies),
            msgs_per_s=msgs,
            deliveries_per_s=deliveries,
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
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
    p.add_argument(
        "--taskset", action="store_true", help="pin the server to CPU 0 and this client to CPU 1"
    )
    args = p.parse_args(argv)
    args.client_counts = [int(x) for x in args.clients.split(",") if x]
    if not args.client_counts or min(args.client_counts) < 2 or max(args.client_counts) > 20_000:
        p.error("--clients: counts between 2 and 20000")
    if not 1 <= args.broadcasts <= 1000 or not 0 < args.duration <= 120:
        p.error("--broadcasts 1-1000 and --duration up to 120 s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.taskset:
        if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
            print("--taskset needs the taskset tool and 2+ CPUs", file=sys.stderr)
            return 2
        os.sched_setaffinity(0, {1})
    raise_fd_limit()
    started = datetime.datetime.now(datetime.UTC)
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="netstack-chat-bench-") as tmp:
        for n in args.client_counts:
            result = uvloop.run(scenario(n, args, Path(tmp)))
            results.append(result)
    print(
        f"# netstack chat bench, {started:%Y-%m-%d %H:%M} UTC, {platform.python_version()},"
        f" {os.cpu_count()} CPUs, taskset {'on' if args.taskset else 'off'},"
        f" {args.broadcasts} broadcasts, {args.senders} senders for {args.duration:g} s"
    )
    print(
        "| clients | connect s | KiB/conn | fan-out p50 ms | p99 ms | max ms"
        " | msgs/s (senders) | deliveries/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.clients:,} | {r.connect_s:.1f} | {r.kib_per_conn:.1f} | {r.p50_ms:.1f}"
            f" | {r.p99_ms:.1f} | {r.max_ms:.1f} | {r.msgs_per_s:,.0f}"
            f" | {r.deliveries_per_s:,.0f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
