"""Server CPU time per request under a short keep-alive load: netstack vs the floor.

Not a test. Throughput on a shared machine is noise; CPU seconds of the server's
process tree divided by the requests wrk completed is not (much). Cases: ``sketch``
(bench/sketch_wsgi.py, the 60-line inline floor on uvloop + httptools), ``netstack-t0``
(``netstack serve --threads 0``), ``granian`` and ``uvicorn`` when bench/.venv-peers has
them (bench/http.py installs it). Server on core 0, wrk on core 1.

    .venv/bin/python bench/cpu.py --duration 4 --runs 3 sketch netstack-t0 granian
    .venv/bin/python bench/cpu.py --baseline ../main/.venv/bin/netstack baseline-t0 netstack-t0
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if sys.path and Path(sys.path[0]).resolve() == HERE:
    del sys.path[0]  # bench/http.py would shadow the stdlib http package

_spec = importlib.util.spec_from_file_location("bench_http", HERE / "http.py")
assert _spec is not None
assert _spec.loader is not None
bench_http = importlib.util.module_from_spec(_spec)
sys.modules["bench_http"] = bench_http
_spec.loader.exec_module(bench_http)


def all_cases(baseline: str | None) -> dict[str, object]:
    found = {case.name: case for case in bench_http.cases()}
    if baseline is not None:
        # The same --threads 0 case run by another checkout's netstack (e.g. main's).
        t0 = found["netstack-t0"]
        found["baseline-t0"] = bench_http.Case(
            "baseline-t0", "netstack", "hello", (baseline, *t0.cmd[1:]), note=baseline
        )
    found["sketch"] = bench_http.Case(
        "sketch",
        "sketch",
        "hello",
        (sys.executable, str(HERE / "sketch_wsgi.py"), "hello_wsgi:app", "{port}"),
        note="60-line inline floor",
    )
    return found


def measure(
    case: object, duration: float, connections: int, logdir: Path
) -> tuple[float, float, float]:
    """(µs of server CPU per request, of which user, req/s) for one bounded wrk run."""
    running = bench_http.start(case, True, logdir)
    try:
        pgid = running.proc.pid
        bench_http.run_wrk(running.port, 1, connections, True)  # warm-up
        user0, sys0 = bench_http.group_cpu(pgid)
        result = bench_http.run_wrk(running.port, duration, connections, True)
        user1, sys1 = bench_http.group_cpu(pgid)
    finally:
        bench_http.stop(running)
    if result.socket_errors or result.non_2xx:
        print(f"  ({case.name}: {result.socket_errors} socket errors, {result.non_2xx} non-2xx)")
    n = result.requests
    total = (user1 - user0 + sys1 - sys0) / n * 1e6
    return total, (user1 - user0) / n * 1e6, result.rps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("cases", nargs="+")
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--baseline", help="another netstack executable: adds case baseline-t0")
    args = p.parse_args()
    cases = all_cases(args.baseline)
    unknown = [name for name in args.cases if name not in cases]
    if unknown:
        p.error(f"unknown case(s) {unknown}; known: {sorted(cases)}")
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in args.cases}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.runs):
            for name in args.cases:
                us, user, rps = measure(cases[name], args.duration, args.connections, Path(tmp))
                results[name].append((us, user, rps))
                print(
                    f"run {run + 1}/{args.runs} {name:>12} {us:6.2f} us/request "
                    f"(user {user:5.2f}) {rps:9,.0f} req/s"
                )
                time.sleep(0.2)
    print()
    for name, rows in results.items():
        us = statistics.median(r[0] for r in rows)
        user = statistics.median(r[1] for r in rows)
        rps = statistics.median(r[2] for r in rows)
        low = min(r[0] for r in rows)
        print(
            f"{name:>12}  median {us:6.2f} us/request (user {user:5.2f})  {rps:9,.0f} req/s"
            f"  (min {low:.2f})"
        )


if __name__ == "__main__":
    main()
