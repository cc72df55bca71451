"""Whole-stack benchmark: what each tier of `netstack up` costs on a read endpoint.

Not a test (not run in CI). It starts ``netstack up --web-servers 2`` (SQLite in a temp
data dir, the real supervisor, balancer, web servers, gRPC service), creates --notes
notes through the public port, then measures reading one note, ``GET /api/notes/ID``, at
each depth of the stack:

* ``lb``: through the balancer to the 2 web servers -> gRPC -> SQLite (the whole stack);
* ``web``: straight to one web server (Flask on ``netstack serve``) -> gRPC -> SQLite;
* ``grpc``: ``GetNote`` straight to the notes service (grpc.aio client, one channel,
  N concurrent calls in a closed loop) -> SQLite;
* ``sqlite``: the same ``SELECT`` on the notes database file in this process (the floor).

HTTP tiers are driven by ``wrk -t1 --latency`` and the gRPC tier by a Python client in
its own process, each pinned to core 1 with ``taskset`` (the stack itself is unpinned: it
is six processes on two cores). Two load shapes: ``-c1`` (one request at a time: the
latency a request pays at each tier, so the differences between tiers are each tier's
overhead) and ``-c50`` (throughput). Every cell is the median of --runs runs; the tiers
take turns within a run. The balancer's and the web servers' CPU (user+system over the
measured run) say which tier was the bottleneck.

    .venv/bin/python bench/up.py                       # 5 s x 3 runs
    .venv/bin/python bench/up.py --quick               # 2 s x 1 run
    .venv/bin/python bench/up.py --markdown --png bench/RESULTS-up.png
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# bench/http.py would shadow the standard library's http package (urllib needs it).
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO / "bench"]
# bench/http.py's wrk parser and process-group CPU reader, loaded under another name.
_spec = importlib.util.spec_from_file_location("bench_http", REPO / "bench" / "http.py")
assert _spec is not None
assert _spec.loader is not None
bench_http = importlib.util.module_from_spec(_spec)
sys.modules["bench_http"] = bench_http  # dataclasses look their module up there
_spec.loader.exec_module(bench_http)
PYTHON = REPO / ".venv" / "bin" / "python"
READY_TIMEOUT = 60.0
TIERS = ("lb", "web", "grpc", "sqlite")
SHAPES = (1, 50)
TIER_TEXT = {
    "lb": "balancer -> 2 web -> gRPC -> SQLite",
    "web": "1 web server -> gRPC -> SQLite",
    "grpc": "gRPC GetNote -> SQLite",
    "sqlite": "SELECT in process",
}


@dataclass
class Point:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu: dict[str, float] = field(default_factory=dict)  # component -> % of one core


# ------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    proc: subprocess.Popen[str]
    port: int
    grpc: str
    token: str
    components: list[dict[str, Any]]
    data: Path
    lines: list[str]

    def pid_of(self, name: str) -> int | None:
        for c in self.components:
            if c["name"] == name:
                return c.get("pid")
        return None


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_stack(work: Path) -> Stack:
    port = free_port()
    cmd = [str(PYTHON), "-m", "netstack", "--log-level", "warning", "up"]
    cmd += ["--listen", f"127.0.0.1:{port}", "--web-servers", "2", "--data-dir", str(work)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    assert proc.stdout is not None
    lines: list[str] = []
    grpc = token = None
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        match = re.search(r"gRPC notes\s+(\S+)\s+token\s+(\S+)", line)
        if match:
            grpc, token = match[1], match[2]
        if "balancer pid" in line:
            break
    if grpc is None or token is None or proc.poll() is not None:
        stop_stack(proc)
        raise SystemExit("netstack up did not start:\n" + "".join(lines[-20:]))
    # Keep draining its output so a chatty child never blocks on a full pipe.
    import threading

    threading.Thread(
        target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True
    ).start()  # type: ignore[union-attr]
    snap = get_json(f"http://127.0.0.1:{port}/_dashboard/api/snapshot")
    return Stack(proc, port, grpc, token, snap["components"], work, lines)


def stop_stack(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def get_json(url: str, data: bytes | None = None) -> Any:
    import urllib.request

    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def seed(stack: Stack, count: int) -> int:
    """Create ``count`` notes through the public port; the id of the one we read."""
    ids = []
    for i in range(count):
        body = json.dumps({"title": f"note {i}", "body": "x" * 200}).encode()
        reply = get_json(f"http://127.0.0.1:{stack.port}/api/notes", body)
        note = reply.get("note", reply)
        ids.append(int(note["id"]))
    return ids[len(ids) // 2]


# ------------------------------------------------------------------------- the loads


def parse_wrk(out: str) -> Point:
    r = bench_http.parse_wrk(out)
    return Point(r.rps, r.p50_ms, r.p99_ms, r.socket_errors + r.non_2xx)


def run_wrk(url: str, conns: int, duration: float) -> Point:
    cmd = ["taskset", "-c", "1", "wrk", "-t1", f"-c{conns}", f"-d{max(1, round(duration))}s"]
    out = subprocess.run(
        [*cmd, "--latency", url], capture_output=True, text=True, check=True, timeout=duration + 30
    ).stdout
    return parse_wrk(out)


def run_grpc(target: str, token: str, note: int, conns: int, duration: float) -> Point:
    cmd = ["taskset", "-c", "1", str(PYTHON), __file__, "grpc-load", target, token]
    cmd += [str(note), str(conns), str(duration)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=duration + 60)
    data = json.loads(out.stdout)
    return Point(data["rps"], data["p50_ms"], data["p99_ms"], data["errors"])


async def grpc_load(target: str, token: str, note: int, conns: int, duration: float) -> None:
    """The gRPC tier's closed-loop client (runs in its own, pinned, process)."""
    import grpc

    from netstack.servers.rpc._pb import notes_pb2 as pb
    from netstack.servers.rpc._pb import notes_pb2_grpc as pb_grpc

    meta = (("authorization", f"Bearer {token}"),)
    latencies: list[float] = []
    errors = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.NotesStub(channel)
        request = pb.GetNoteRequest(id=note)
        await stub.GetNote(request, metadata=meta, timeout=5)  # connected, warm
        end = time.perf_counter() + duration

        async def worker() -> None:
            nonlocal errors
            while (start := time.perf_counter()) < end:
                try:
                    await stub.GetNote(request, metadata=meta, timeout=5)
                except grpc.RpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - start)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    n = len(latencies)
    print(
        json.dumps(
            {
                "rps": n / elapsed,
                "p50_ms": latencies[n // 2] * 1e3 if n else float("nan"),
                "p99_ms": latencies[min(n - 1, int(n * 0.99))] * 1e3 if n else float("nan"),
                "errors": errors,
            }
        )
    )


def run_sqlite(db: Path, note: int, duration: float) -> Point:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    table = conn.execute(
        "SELECT name FROM sqlite_master WHERE type='table' AND name LIKE '%note%'"
    ).fetchone()[0]
    query = f"SELECT * FROM {table} WHERE id = ?"  # the table name is ours
    latencies = []
    end = time.perf_counter() + duration
    while (start := time.perf_counter()) < end:
        conn.execute(query, (note,)).fetchone()
        latencies.append(time.perf_counter() - start)
    conn.close()
    latencies.sort()
    n = len(latencies)
    return Point(n / duration, latencies[n // 2] * 1e3, latencies[int(n * 0.99)] * 1e3, 0)


def measure(stack: Stack, tier: str, conns: int, duration: float, note: int) -> Point:
    names = ["balancer", "web-1", "web-2", "rpc"]
    pids = {n: stack.pid_of(n) for n in names}
    before = {n: bench_http.group_cpu_seconds(p) for n, p in pids.items() if p}
    t0 = time.monotonic()
    if tier == "lb":
        point = run_wrk(f"http://127.0.0.1:{stack.port}/api/notes/{note}", conns, duration)
    elif tier == "web":
        web = next(c for c in stack.components if c["name"] == "web-1")
        point = run_wrk(f"http://{web['address']}/api/notes/{note}", conns, duration)
    elif tier == "grpc":
        point = run_grpc(stack.grpc, stack.token, note, conns, duration)
    else:
        point = run_sqlite(stack.data / "notes.sqlite3", note, duration)
    wall = time.monotonic() - t0
    point.cpu = {
        n: 100 * (bench_http.group_cpu_seconds(p) - before[n]) / wall for n, p in pids.items() if p
    }
    return point


# ------------------------------------------------------------------------- report


def median_point(points: list[Point]) -> Point:
    med = Point(
        statistics.median(p.rps for p in points),
        statistics.median(p.p50_ms for p in points),
        statistics.median(p.p99_ms for p in points),
        sum(p.errors for p in points),
    )
    for name in points[0].cpu:
        med.cpu[name] = statistics.median(p.cpu.get(name, 0.0) for p in points)
    return med


def rows(results: dict[tuple[str, int], Point]) -> list[list[str]]:
    out = []
    for conns in SHAPES:
        for i, tier in enumerate(TIERS):
            p = results.get((tier, conns))
            if p is None:
                continue
            below = results.get((TIERS[i + 1], conns)) if i + 1 < len(TIERS) else None
            overhead = f"{p.p50_ms - below.p50_ms:.3f}" if below is not None else "-"
            cpu = ", ".join(f"{n} {v:.0f}" for n, v in p.cpu.items() if v >= 5) or "-"
            out.append(
                [
                    tier,
                    TIER_TEXT[tier],
                    str(conns) if tier != "sqlite" else "1 (in process)",
                    f"{p.rps:,.0f}",
                    f"{p.p50_ms:.3f}",
                    f"{p.p99_ms:.3f}",
                    overhead,
                    str(p.errors),
                    cpu,
                ]
            )
    return out


COLUMNS = [
    "tier",
    "path",
    "concurrency",
    "req/s",
    "p50 ms",
    "p99 ms",
    "this tier's p50 ms",
    "errors",
    "CPU % (>= 5)",
]


def print_table(header: str, body: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 220)
    console.print(header)
    table = Table(title="GET /api/notes/ID, medians")
    for i, col in enumerate(COLUMNS):
        table.add_column(col, justify="right" if 2 < i < 8 else "left")
    for row in body:
        table.add_row(*row)
    console.print(table)


def markdown(header: str, body: list[list[str]], argv: Sequence[str]) -> str:
    lines = [f"- **Run:** {header}", f"- **Command:** `python bench/up.py {' '.join(argv)}`", ""]
    lines.append("| " + " | ".join(COLUMNS) + " |")
    lines.append("|" + "---|" * len(COLUMNS))
    lines.extend("| " + " | ".join(row) + " |" for row in body)
    return "\n".join(lines) + "\n"


def plot(path: str, results: dict[tuple[str, int], Point]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    tiers = [t for t in TIERS if (t, 1) in results]
    left.bar(tiers, [results[(t, 1)].p50_ms for t in tiers], color="tab:blue", label="p50")
    left.bar(
        tiers,
        [results[(t, 1)].p99_ms - results[(t, 1)].p50_ms for t in tiers],
        bottom=[results[(t, 1)].p50_ms for t in tiers],
        color="tab:orange",
        label="p99",
    )
    left.set_ylabel("ms per request, one at a time")
    left.set_title("latency by depth (c=1)")
    left.legend()
    tiers50 = [t for t in TIERS if (t, 50) in results and t != "sqlite"]
    right.bar(tiers50, [results[(t, 50)].rps for t in tiers50], color="tab:blue")
    right.set_ylabel("requests/s")
    right.set_title("throughput by depth (c=50)")
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("netstack up: GET /api/notes/ID through each tier")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"chart: {path}")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list[:1] == ["grpc-load"]:
        target, token, note, conns, duration = args_list[1:6]
        asyncio.run(grpc_load(target, token, int(note), int(conns), float(duration)))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--notes", type=int, default=200, help="notes created first")
    parser.add_argument("--quick", action="store_true", help="2 s x 1 run")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--png", default=None, help="write the chart here")
    args = parser.parse_args(args_list)
    if args.quick:
        args.runs, args.duration = 1, 2.0
    if not shutil.which("wrk") or not shutil.which("taskset"):
        raise SystemExit("needs wrk and taskset (apt-get install -y wrk util-linux)")
    loads: list[float] = []
    results: dict[tuple[str, int], list[Point]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-up-") as tmp:
        stack = start_stack(Path(tmp))
        try:
            note = seed(stack, args.notes)
            loads.append(os.getloadavg()[0])
            from rich.progress import Progress

            steps = [(t, c) for t in TIERS for c in SHAPES if not (t == "sqlite" and c != 1)]
            with Progress() as progress:
                task = progress.add_task("measuring", total=args.runs * len(steps))
                for _ in range(args.runs):
                    for tier, conns in steps:
                        point = measure(stack, tier, conns, args.duration, note)
                        results.setdefault((tier, conns), []).append(point)
                        progress.advance(task)
            loads.append(os.getloadavg()[0])
        finally:
            stop_stack(stack.proc)
    medians = {key: median_point(points) for key, points in results.items()}
    header = (
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}; netstack up "
        f"--web-servers 2 (unpinned), clients on core 1; {args.runs} run(s) x "
        f"{args.duration:g} s; {args.notes} notes; load average {loads[0]:.2f} -> {loads[-1]:.2f}"
    )
    body = rows(medians)
    print_table(header, body)
    if args.markdown:
        print(markdown(header, body, args_list))
    if args.png:
        plot(args.png, medians)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
