"""CPU time per proxied request of the L7 balancer (and of nginx as the L7 proxy).

Not a test and not a throughput benchmark: on a shared machine req/s is noise, but the
CPU a proxy spends per request is steady enough to compare code changes. One run starts
the two nginx backends of ``bench/lb.py``; then, for each case and each run, a fresh
proxy pinned to core 0, a short ``wrk -t1 -c50`` warm-up, and a measured ``wrk`` run on
core 1. The figure is the user + system CPU time of the proxy's process group over the
measured run divided by the requests wrk completed (µs/request). Medians of ``--runs``.

Cases: ``netstack`` (``python -m netstack balance --mode http`` from this checkout, or
from ``--src DIR`` to measure another tree, e.g. ``--src /work/main/src`` for a
baseline; give several ``--src`` to compare trees in one run) and ``nginx``
(``proxy_pass`` to a keep-alive upstream, one worker, as in ``bench/lb.py``).

    .venv/bin/python bench/l7cpu.py                        # 3 runs x 3 s
    .venv/bin/python bench/l7cpu.py --src /work/main/src --src src --runs 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "lb.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load bench/lb.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


lb = _load("bench_lb")


def _system(pgid: int) -> float:
    """System CPU seconds of process group ``pgid`` (its live processes)."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            total += int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    lb.bench_http.unshadow_stdlib_http()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=3.0, help="seconds of measured wrk")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--src", action="append", default=[], help="netstack source tree(s)")
    p.add_argument("--no-nginx", action="store_true")
    p.add_argument("--mode", default="http", choices=["http", "tcp"], help="netstack's mode")
    args = p.parse_args(argv)
    srcs = [str(Path(s).resolve()) for s in args.src] or [str(REPO / "src")]
    cases: list[tuple[str, str | None]] = [(f"netstack {s}", s) for s in srcs]
    if not args.no_nginx:
        cases.append(("nginx", None))
    figures: dict[str, list[float]] = {name: [] for name, _ in cases}
    users: dict[str, list[float]] = {name: [] for name, _ in cases}
    rps: dict[str, list[float]] = {name: [] for name, _ in cases}
    with tempfile.TemporaryDirectory(prefix="bench-l7cpu-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        (work / "www").mkdir()
        try:
            backends = lb.start_backends(work)
            ports = [b.port for b in backends]
            for run in range(args.runs):
                for name, src in cases:
                    port = lb.bench_http.free_port()
                    if src is None:
                        case = next(c for c in lb.CASES if c.name == "nginx-http")
                        cmd = lb.proxy_command(case, port, ports, work)
                    else:
                        os.environ["PYTHONPATH"] = src
                        listen = f"127.0.0.1:{port}"
                        flags = [a for b in ports for a in ("--backend", f"127.0.0.1:{b}")]
                        cmd = [sys.executable, "-m", "netstack", "balance", "--listen", listen]
                        cmd += [*flags, "--mode", args.mode]
                    proxy = lb.launch(name.split()[0], cmd, port, work, pinned=True)
                    try:
                        if args.warmup > 0:
                            lb.bench_http.run_wrk(port, args.warmup, args.connections, True)
                        cpu0, sys0 = lb._cpu(proxy.proc.pid), _system(proxy.proc.pid)
                        result = lb.bench_http.run_wrk(port, args.duration, args.connections, True)
                        cpu = lb._cpu(proxy.proc.pid) - cpu0
                        system = _system(proxy.proc.pid) - sys0
                    finally:
                        lb.stop(proxy)
                    us = cpu / max(1, result.requests) * 1e6
                    sys_us = system / max(1, result.requests) * 1e6
                    figures[name].append(us)
                    users[name].append(us - sys_us)
                    rps[name].append(result.rps)
                    print(
                        f"run {run + 1} {name}: {us:.1f} us/request ({sys_us:.1f} system),"
                        f" {result.rps:,.0f} req/s,"
                        f" errors {result.socket_errors}, non-2xx {result.non_2xx}",
                        file=sys.stderr,
                    )
        finally:
            for running in list(lb.LIVE):
                lb.stop(running)
    nginx = statistics.median(figures["nginx"]) if "nginx" in figures else None
    for name, values in figures.items():
        med = statistics.median(values)
        ratio = f"  nginx/this {nginx / med:.2f}x" if nginx else ""
        user = users[name]
        print(
            f"{name}: median {med:.1f} us/request (min {min(values):.1f}; user median"
            f" {statistics.median(user):.1f}, min {min(user):.1f}),"
            f" {statistics.median(rps[name]):,.0f} req/s{ratio}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
