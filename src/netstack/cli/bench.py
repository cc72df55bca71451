"""``netstack bench models``: compare the five concurrency models.

For every (model, connections, size) point: start the model as its own process
(:class:`~netstack.servers.models.harness.ServerProcess`), drive it from a pool of load
processes (:func:`~netstack.servers.models.loadclient.run_load`) on 127.0.0.1, sample the
server's CPU time, threads and RSS with psutil, then stop it. rich, matplotlib and psutil
are imported inside the command, so importing the CLI stays cheap.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import click

from netstack.cli.exits import RuntimeFailure
from netstack.cli.options import config_options, load_config
from netstack.config import BenchModelsConfig, ModelName

if TYPE_CHECKING:
    from rich.console import Console

    from netstack.servers.models.loadclient import LoadResult, LoadWorkers

QUICK_CONNECTIONS = (1, 10, 50)
QUICK_SIZES = (64,)
QUICK_DURATION = 1.0
SAMPLE_INTERVAL = 0.1  # seconds between psutil samples of the server
START_ALLOWANCE = 0.02  # seconds for a share to reach its load process


@click.group(name="bench")
def group() -> None:
    """Benchmarks people compare: tables and PNG plots."""


@dataclass(frozen=True, slots=True)
class Point:
    """One measured (model, connections, size) point."""

    model: ModelName
    connections: int
    size: int
    load: LoadResult
    cpu_percent: float
    other_cpu_percent: float
    threads: int
    rss_mib: float
    exit_code: int | None

    @property
    def p50_ms(self) -> float | None:
        value = self.load.percentiles(50)[0]
        return None if value is None else value * 1e3

    @property
    def p99_ms(self) -> float | None:
        value = self.load.percentiles(99)[0]
        return None if value is None else value * 1e3


@group.command(name="models")
@config_options(BenchModelsConfig)
def models(config_file: str | None, **flags: Any) -> int:
    """Compare the concurrency models: msgs/s, latency, server CPU, threads, memory.

    Each model (blocking, threaded, pool, selectloop, asyncio) runs as its own process
    serving length-prefixed echo on 127.0.0.1. CLIENT_PROCESSES load processes keep
    CONNECTIONS ping-pong connections busy for DURATION seconds per point. Prints a
    table and writes a PNG: throughput and p99 latency against connections.

    --quick runs connections 1,10,50, size 64 and 1 s per point (about 30 s), unless
    those flags are given too. --race only shows the lost-update race and its fix.

    \b
    Examples:
      netstack bench models --quick
      netstack bench models --models asyncio,selectloop --connections 1,10,100 --sizes 64
      netstack bench models --duration 2 --output bench/models.png
      netstack bench models --race
    """
    cfg = load_config(BenchModelsConfig, flags, config_file=config_file)
    if cfg.quick:
        cfg = dataclasses.replace(
            cfg,
            connections=QUICK_CONNECTIONS if flags["connections"] is None else cfg.connections,
            sizes=QUICK_SIZES if flags["sizes"] is None else cfg.sizes,
            duration=QUICK_DURATION if flags["duration"] is None else cfg.duration,
        )

    from rich.console import Console

    console = Console(width=None if Console().is_terminal else 120)
    if cfg.race:
        _show_race(console)
        return 0

    points = _run(cfg, Console(stderr=True))
    console.print(_table(cfg, points))
    output = Path(cfg.output)
    _plot(points, output)
    console.print(f"plot written to {output}")
    return 0


def _run(cfg: BenchModelsConfig, err_console: Console) -> list[Point]:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from netstack.servers.models.loadclient import LoadWorkers

    grid = [
        (model, conns, size)
        for size in cfg.sizes
        for model in cfg.models
        for conns in cfg.connections
    ]
    points: list[Point] = []
    with (
        LoadWorkers(cfg.client_processes) as workers,
        Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
            console=err_console,
        ) as progress,
    ):
        task = progress.add_task("bench models", total=len(grid))
        for model, conns, size in grid:
            progress.update(task, description=f"{model:<10} {conns:>4} conns {size:>5} B")
            runs = [
                _measure(workers, cfg, cast(ModelName, model), conns, size)
                for _ in range(cfg.repeats)
            ]
            runs.sort(key=lambda p: p.load.rate)
            points.append(runs[(len(runs) - 1) // 2])  # the median run (lower one if even)
            progress.advance(task)
    return points


def _measure(
    workers: LoadWorkers, cfg: BenchModelsConfig, model: ModelName, conns: int, size: int
) -> Point:
    import psutil

    from netstack.servers.models.harness import ServerProcess
    from netstack.servers.models.loadclient import LoadSpec, merge, split

    args = ("--pool-threads", str(cfg.pool_threads), "--max-running", str(cfg.max_running))
    shares = split(conns, cfg.client_processes)
    budget = math.ceil(cfg.max_messages / len(shares))
    try:
        with ServerProcess(model, args) as server:
            proc = psutil.Process(server.pid)
            ours = [proc, *(psutil.Process(pid) for pid in workers.pids)]
            threads, rss = proc.num_threads(), proc.memory_info().rss
            ours_before, machine_before = [_busy(p.cpu_times()) for p in ours], _machine_busy()
            started = time.monotonic()
            # One absolute deadline: no share runs on after the others have stopped.
            deadline = time.monotonic() + cfg.duration + START_ALLOWANCE
            specs = [
                LoadSpec("127.0.0.1", server.port, n, size, cfg.duration, budget, deadline)
                for n in shares
            ]
            workers.start(specs)
            while (results := workers.wait(SAMPLE_INTERVAL)) is None:
                threads = max(threads, proc.num_threads())
                rss = max(rss, proc.memory_info().rss)
            ours_after, machine_after = [_busy(p.cpu_times()) for p in ours], _machine_busy()
            ended = time.monotonic()
    except RuntimeError as exc:
        raise RuntimeFailure(str(exc)) from exc
    elapsed = ended - started
    ours_busy = [after - before for before, after in zip(ours_before, ours_after, strict=True)]
    # Everything else the machine did meanwhile: other users' jobs, but also the kernel's
    # softirq work for our own loopback traffic, so it is never quite zero.
    other = machine_after - machine_before - sum(ours_busy)
    return Point(
        model=model,
        connections=conns,
        size=size,
        load=merge(results),
        cpu_percent=100 * ours_busy[0] / elapsed,
        other_cpu_percent=max(0.0, 100 * other / elapsed),
        threads=threads,
        rss_mib=rss / (1 << 20),
        exit_code=server.returncode,
    )


def _busy(times: Any) -> float:
    return float(times.user + times.system)


def _machine_busy() -> float:
    import psutil

    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(cfg: BenchModelsConfig, points: list[Point]) -> Any:
    from rich.table import Table

    from netstack.transport.loop import loop_factory

    loop = "uvloop" if loop_factory("auto").__module__.startswith("uvloop") else "asyncio"
    table = Table(
        title=(
            f"Concurrency models: {cfg.duration:g} s per point"
            + (f", median msgs/s of {cfg.repeats} runs" if cfg.repeats > 1 else "")
            + f", {cfg.client_processes} load "
            f"process{'es' if cfg.client_processes > 1 else ''}, {os.cpu_count()} CPUs, "
            f"Python {platform.python_version()}, "
            f"asyncio model on {loop}"
        ),
        title_justify="left",
    )
    for name in ("model", "conns", "size", "msgs/s", "p50 ms", "p99 ms", "CPU %"):
        table.add_column(name, justify="left" if name == "model" else "right", no_wrap=True)
    for name in ("threads", "RSS MiB", "served", "errors", "other CPU %"):
        table.add_column(name, justify="right", no_wrap=True)
    for p in points:
        errors = str(p.load.errors)
        if p.exit_code not in (0, None):
            errors += f" (exit {p.exit_code})"
        table.add_row(
            p.model,
            str(p.connections),
            str(p.size),
            f"{p.load.rate:,.0f}",
            _fmt(p.p50_ms, 3),
            _fmt(p.p99_ms, 3),
            f"{p.cpu_percent:.0f}",
            str(p.threads),
            f"{p.rss_mib:.1f}",
            f"{p.load.served}/{p.connections}",
            errors,
            f"{p.other_cpu_percent:.0f}",
        )
    return table


def _plot(points: list[Point], output: Path) -> None:
    from matplotlib.figure import Figure

    sizes = sorted({p.size for p in points})
    models = list(dict.fromkeys(p.model for p in points))
    fig = Figure(figsize=(11, 4 * len(sizes)), layout="constrained")
    axes = fig.subplots(len(sizes), 2, squeeze=False)
    for row, size in enumerate(sizes):
        rate_ax, p99_ax = axes[row]
        for model in models:
            series = sorted(
                (p for p in points if p.model == model and p.size == size),
                key=lambda p: p.connections,
            )
            xs = [p.connections for p in series]
            rates = [p.load.rate for p in series]
            p99 = [p.p99_ms if p.p99_ms is not None else math.nan for p in series]
            (line,) = rate_ax.plot(xs, rates, marker="o", label=model)
            p99_ax.plot(xs, p99, marker="o", color=line.get_color(), label=model)
            # Hollow markers: some connections never got a reply (blocking, pool).
            partial = [i for i, p in enumerate(series) if p.load.served < p.connections]
            for ax, ys in ((rate_ax, rates), (p99_ax, p99)):
                ax.scatter(
                    [xs[i] for i in partial],
                    [ys[i] for i in partial],
                    s=70,
                    facecolors="white",
                    edgecolors=line.get_color(),
                    linewidths=1.5,
                    zorder=3,
                )
        for ax, ylabel in ((rate_ax, "messages / s"), (p99_ax, "p99 latency (ms)")):
            ax.set_xscale("log")
            ax.set_xlabel("concurrent connections")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        rate_ax.set_title(f"Throughput, {size}-byte messages")
        p99_ax.set_title(f"p99 round trip, {size}-byte messages (served connections)")
        p99_ax.set_yscale("log")
        rate_ax.legend()
    fig.supxlabel(
        "Hollow marker: not every connection was served (blocking serves one at a time, pool "
        "max_running at a time);\nits latency covers the served connections only. "
        "Closed loop: one message in flight per connection.",
        fontsize=9,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=110)


def _show_race(console: Console) -> None:
    from rich.table import Table

    from netstack.servers.models.race import demonstrate

    result = demonstrate()
    table = Table(
        title=(
            f"Lost updates: {result.threads} threads x {result.per_thread} increments "
            "(read; time.sleep(0); write)"
        ),
        title_justify="left",
    )
    for name in ("expected", "unsafe result", "lost updates", "locked result", "lost (locked)"):
        table.add_column(name, justify="right")
    table.add_row(
        str(result.expected),
        str(result.unsafe),
        str(result.lost),
        str(result.locked),
        str(result.lost_locked),
    )
    console.print(table)
