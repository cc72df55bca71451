"""HTTP benchmark: `netstack serve` against gunicorn, waitress, uvicorn and granian.

Not a test (not run in CI). Each case is a fresh server process with 1 worker serving a
hello-world app from bench/apps/ on a free port; wrk drives it over loopback:

    wrk -t1 -c50 -d{duration}s --latency http://127.0.0.1:PORT/

Pinned cases run the server under `taskset -c 0` and wrk under `taskset -c 1`. The two
`--workers` cases (netstack with 2 workers against 1) run unpinned, wrk too, because two
workers pinned to one core would measure nothing. Every run starts each server, waits for
it to accept a connection (polling with a deadline), checks one real response (status 200
and the exact body), warms up, measures, and stops it; runs interleave the servers, so
drift on a shared machine hits them all alike. Each cell is the median of --runs.

The peers live in their own venv, bench/.venv-peers (gitignored), created and filled on
first use: gunicorn, waitress, uvicorn[standard] (httptools + uvloop), granian, flask.
wrk comes from apt when missing. netstack is `<repo>/.venv/bin/netstack serve` (`make
test` creates that venv); flask is pip-installed there too for the Flask case. A server
that does not start or answers wrongly is reported as failed and the run carries on.

    .venv/bin/python bench/http.py                      # 10 s x 3 runs, all cases
    .venv/bin/python bench/http.py --quick              # 3 s x 1 run, no warm-up
    .venv/bin/python bench/http.py --only uvicorn,granian --duration 2 --runs 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
APPS = REPO / "bench" / "apps"
PEERS_VENV = REPO / "bench" / ".venv-peers"
NETSTACK = REPO / ".venv" / "bin" / "netstack"
PEER_PACKAGES = ["gunicorn", "waitress", "uvicorn[standard]", "granian", "flask"]
PEER_MODULES = ["gunicorn", "waitress", "uvicorn", "uvloop", "httptools", "granian", "flask"]
BODY = b"Hello, world!"
READY_TIMEOUT = 20.0  # seconds for a server to accept its first connection
STOP_TIMEOUT = 10.0


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One server configuration. ``cmd`` holds ``{port}`` where the port goes."""

    name: str
    server: str
    app: str  # "hello" or "flask"
    cmd: tuple[str, ...]
    pinned: bool = True
    note: str = ""


def cases() -> list[Case]:
    peers = PEERS_VENV / "bin"
    ns = str(NETSTACK)
    bind = "127.0.0.1:{port}"

    def netstack(app: str, *extra: str) -> tuple[str, ...]:
        return (ns, "serve", app, "--bind", bind, *extra, "--no-access-log")

    fixed = [
        Case(
            "netstack-t0",
            "netstack",
            "hello",
            netstack("hello_wsgi:app", "--threads", "0", "--workers", "1"),
            note="--threads 0: the app runs on the event loop",
        ),
        Case(
            "netstack",
            "netstack",
            "hello",
            netstack("hello_wsgi:app", "--workers", "1"),
            note="default thread pool",
        ),
        Case(
            "netstack-flask",
            "netstack",
            "flask",
            netstack("flask_hello:app", "--workers", "1"),
            note="default thread pool",
        ),
        Case(
            "netstack-w1",
            "netstack",
            "hello",
            netstack("hello_wsgi:app", "--threads", "0", "--workers", "1"),
            pinned=False,
            note="unpinned, 1 worker",
        ),
        Case(
            "netstack-w2",
            "netstack",
            "hello",
            netstack("hello_wsgi:app", "--threads", "0", "--workers", "2"),
            pinned=False,
            note="unpinned, 2 workers",
        ),
        Case(
            "gunicorn-sync",
            "gunicorn",
            "hello",
            (str(peers / "gunicorn"), "-w", "1", "-k", "sync", "-b", bind, "hello_wsgi:app"),
            note="sync worker: no keep-alive",
        ),
        Case(
            "gunicorn-gthread",
            "gunicorn",
            "hello",
            (
                *(str(peers / "gunicorn"), "-w", "1", "-k", "gthread", "--threads", "4"),
                *("-b", bind, "hello_wsgi:app"),
            ),
            note="4 threads",
        ),
        Case(
            "waitress",
            "waitress",
            "hello",
            (str(peers / "waitress-serve"), "--listen=" + bind, "hello_wsgi:app"),
            note="4 threads (default)",
        ),
        Case(
            "waitress-flask",
            "waitress",
            "flask",
            (str(peers / "waitress-serve"), "--listen=" + bind, "flask_hello:app"),
            note="4 threads (default)",
        ),
        Case(
            "uvicorn",
            "uvicorn",
            "hello (ASGI)",
            (
                *(str(peers / "uvicorn"), "hello_asgi:app", "--host", "127.0.0.1"),
                *("--port", "{port}", "--workers", "1", "--loop", "uvloop"),
                *("--http", "httptools", "--no-access-log", "--log-level", "warning"),
            ),
            note="uvloop + httptools",
        ),
        Case(
            "granian",
            "granian",
            "hello",
            (
                *(str(peers / "granian"), "--interface", "wsgi", "--host", "127.0.0.1"),
                *("--port", "{port}", "--workers", "1", "hello_wsgi:app"),
            ),
            note="--interface wsgi",
        ),
    ]
    # The peers' own worker scaling, measured like netstack's (unpinned, wrk too): the
    # "2 workers vs 1" ratio depends on the server's CPU per request against wrk's on two
    # shared cores (see scaling_rows), so the peers' ratios are the yardstick.
    scaling = [
        replace(
            peer,
            name=f"{peer.name}-w{n}",
            cmd=_with_workers(peer.cmd, n),
            pinned=False,
            note=f"unpinned, {n} worker{'s' if n > 1 else ''}",
        )
        for peer in fixed
        if peer.name in ("granian", "uvicorn")
        for n in (1, 2)
    ]
    return fixed + scaling


def _with_workers(cmd: tuple[str, ...], n: int) -> tuple[str, ...]:
    at = cmd.index("--workers") + 1
    return (*cmd[:at], str(n), *cmd[at + 1 :])


@dataclass(frozen=True)
class Target:
    label: str
    numerator: str
    denominator: str
    metric: str  # "rps" (higher is better) or "p99" (lower is better)
    threshold: float


TARGETS = [
    Target("threads0 vs granian, req/s", "netstack-t0", "granian", "rps", 1.0),
    Target("threads0 vs uvicorn, req/s", "netstack-t0", "uvicorn", "rps", 1.5),
    Target("default vs waitress, req/s (hello)", "netstack", "waitress", "rps", 2.5),
    Target("default vs waitress, req/s (Flask)", "netstack-flask", "waitress-flask", "rps", 1.5),
    # No number given for p99: "no worse than uvicorn" is the assumption here.
    Target("threads0 vs uvicorn, p99 latency", "netstack-t0", "uvicorn", "p99", 1.0),
    Target("2 workers vs 1 worker, req/s", "netstack-w2", "netstack-w1", "rps", 1.3),
]


# ------------------------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    socket_errors: int
    non_2xx: int
    server_cpu: float = float("nan")  # % of one core, whole process tree (100 = one core)
    client_cpu: float = float("nan")  # wrk's own CPU, % of one core


_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(match[1]) * _UNITS_MS[match[2]]


def parse_wrk(output: str) -> WrkResult:
    """Read req/s, p50/p99, socket errors and non-2xx/3xx counts from `wrk --latency`."""
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s*(\d+) requests in", output, re.M)
    if rps is None or p50 is None or p99 is None or total is None:
        raise ValueError("unexpected wrk output:\n" + output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return WrkResult(
        rps=float(rps[1]),
        p50_ms=_ms(p50[1]),
        p99_ms=_ms(p99[1]),
        requests=int(total[1]),
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
    )


def run_wrk(port: int, duration: float, connections: int, pinned: bool) -> WrkResult:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency"]
    cmd.append(f"http://127.0.0.1:{port}/")
    if pinned:
        cmd = ["taskset", "-c", "1", *cmd]
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=True, timeout=duration + 30
    ).stdout
    after, elapsed = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - start
    result = parse_wrk(out)
    # taskset execs wrk in the same child, so the reaped child's rusage is wrk's own.
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    result.client_cpu = used / elapsed * 100
    return result


# ---------------------------------------------------------------------------- servers


class StartFailure(Exception):
    """A server did not start, or answered the check request wrongly."""


def free_port() -> int:
    """A free port below the ephemeral range (a released ephemeral port can be reused by
    wrk's own sockets, which would then talk to themselves)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except OSError:
        low = 32768
    rng = random.Random()
    for _ in range(100):
        port = rng.randrange(10_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port")


@dataclass
class Running:
    case: Case
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


def start(case: Case, pinned: bool, logdir: Path) -> Running:
    port = free_port()
    cmd = [part.replace("{port}", str(port)) for part in case.cmd]
    if not Path(cmd[0]).exists():
        raise StartFailure(f"{cmd[0]} does not exist")
    if pinned:
        cmd = ["taskset", "-c", "0", *cmd]
    log = logdir / f"{case.name}-{port}.log"
    env = {**os.environ, "PYTHONPATH": str(APPS), "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as fh:
        # Own session: the whole process tree (master + workers) can be signalled at once.
        proc = subprocess.Popen(
            cmd, cwd=APPS, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = Running(case, proc, port, log)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise StartFailure(f"exited with {proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline:
                stop(running)
                raise StartFailure(
                    f"not accepting after {READY_TIMEOUT:.0f} s: {_tail(log)}"
                ) from None
            time.sleep(0.05)
    try:
        check_response(port)
    except Exception as exc:
        stop(running)
        raise StartFailure(f"bad answer to GET /: {exc}") from None
    return running


def check_response(port: int) -> None:
    import http.client  # after main() unshadowed the stdlib package

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read()
    finally:
        conn.close()
    if resp.status != 200 or body != BODY:
        raise ValueError(f"status {resp.status}, body {body[:60]!r}")


def stop(running: Running) -> None:
    proc = running.proc
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Workers that outlive their master (they should not) die with the session.
    _signal_group(proc.pid, signal.SIGKILL)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def group_cpu(pgid: int, reaped: bool = False) -> tuple[float, float]:
    """(user, system) CPU seconds of every live process in group ``pgid`` (Linux /proc),
    with ``reaped`` also those of the children they waited for (processes that come and go).
    """
    user = system = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[2]) == pgid:
            user += int(fields[11]) + (int(fields[13]) if reaped else 0)
            system += int(fields[12]) + (int(fields[14]) if reaped else 0)
    tick = os.sysconf("SC_CLK_TCK")
    return user / tick, system / tick


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of every live process in group ``pgid`` (Linux /proc).

    Servers run in their own session, so this is the master and all its workers and
    threads: more than 100 % over a pinned run would mean the pin did not hold.
    """
    return sum(group_cpu(pgid))


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no output)"
    return " | ".join(text[-lines:]) or "(no output)"


# ---------------------------------------------------------------------------- set-up


def ensure_peers(install: bool) -> None:
    python = PEERS_VENV / "bin" / "python"
    probe = f"import {', '.join(PEER_MODULES)}"
    if python.exists() and _ok([str(python), "-c", probe]):
        return
    if not install:
        print(f"peers missing in {PEERS_VENV} and --no-install given", file=sys.stderr)
        return
    print(f"creating {PEERS_VENV} with {', '.join(PEER_PACKAGES)}", file=sys.stderr)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *PEER_PACKAGES], check=True)


def ensure_netstack_flask(install: bool) -> None:
    python = NETSTACK.parent / "python"
    if not python.exists() or _ok([str(python), "-c", "import flask"]) or not install:
        return
    print(f"installing flask into {python.parent.parent} for the Flask case", file=sys.stderr)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "flask"], check=False)


def ensure_wrk(install: bool) -> bool:
    if shutil.which("wrk"):
        return True
    if install and shutil.which("apt-get") and os.geteuid() == 0:
        print("installing wrk with apt-get", file=sys.stderr)
        if not _ok(["apt-get", "install", "-y", "-q", "wrk"]):
            _ok(["apt-get", "update", "-q"])
            _ok(["apt-get", "install", "-y", "-q", "wrk"])
    return shutil.which("wrk") is not None


def _ok(cmd: list[str]) -> bool:
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def versions() -> str:
    code = (
        "import importlib.metadata as m\n"
        "for p in ('gunicorn','waitress','uvicorn','granian','flask','uvloop','httptools'):\n"
        "    try: print(p, m.version(p))\n"
        "    except m.PackageNotFoundError: print(p, '-')\n"
    )
    out = subprocess.run(
        [str(PEERS_VENV / "bin" / "python"), "-c", code], capture_output=True, text=True
    ).stdout
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    wrk_version = wrk.split()[1] if wrk.startswith("wrk ") else "?"
    return ", ".join([*out.splitlines(), f"wrk {wrk_version}"])


# ------------------------------------------------------------------------------ main


@dataclass
class Outcome:
    results: list[WrkResult] = field(default_factory=list)
    failure: str | None = None

    def median(self, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in self.results)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [c.name for c in cases()]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--runs", type=int, default=3, help="runs per case; cells are medians")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk before each run")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--only", default="", help="comma-separated cases: " + ",".join(names))
    p.add_argument("--quick", action="store_true", help="3 s x 1 run, no warm-up")
    p.add_argument("--no-pin", action="store_true", help="never use taskset")
    p.add_argument("--no-install", action="store_true", help="do not pip/apt-get anything")
    p.add_argument("--png", default=str(REPO / "bench" / "RESULTS-http.png"))
    p.add_argument("--markdown", action="store_true", help="also print a RESULTS.md table")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.runs, args.warmup = 3.0, 1, 0.0
    unknown = set(filter(None, args.only.split(","))) - set(names)
    if unknown:
        p.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(names)}")
    return args


def unshadow_stdlib_http() -> None:
    """This file is named like the stdlib package ``http``; run as a script, its folder is
    ``sys.path[0]`` and ``import http.client`` (here, in rich, in matplotlib) would find this
    file. Drop the folder from the path before anything imports ``http``."""
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    if getattr(sys.modules.get("http"), "__file__", None) == str(Path(__file__).resolve()):
        del sys.modules["http"]


def main(argv: Sequence[str] | None = None) -> int:
    unshadow_stdlib_http()
    args = parse_args(argv)
    install = not args.no_install
    if not ensure_wrk(install):
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    ensure_peers(install)
    ensure_netstack_flask(install)
    can_pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    only = set(filter(None, args.only.split(",")))
    selected = [c for c in cases() if not only or c.name in only]
    outcomes = {c.name: Outcome() for c in selected}
    load_before = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory(prefix="bench-http-") as tmp:
        for run in range(args.runs):
            for case in selected:
                outcome = outcomes[case.name]
                if outcome.failure is not None:
                    continue  # failed once: do not retry every run
                pinned = case.pinned and can_pin
                try:
                    server = start(case, pinned, Path(tmp))
                except StartFailure as exc:
                    outcome.failure = f"failed to start: {exc}"
                    print(f"{case.name}: {outcome.failure}", file=sys.stderr)
                    continue
                try:
                    if args.warmup > 0:
                        run_wrk(server.port, args.warmup, args.connections, pinned)
                    cpu0, t0 = group_cpu_seconds(server.proc.pid), time.monotonic()
                    result = run_wrk(server.port, args.duration, args.connections, pinned)
                    cpu1, t1 = group_cpu_seconds(server.proc.pid), time.monotonic()
                    result.server_cpu = (cpu1 - cpu0) / (t1 - t0) * 100
                except (subprocess.SubprocessError, ValueError) as exc:
                    outcome.failure = f"wrk failed: {exc}"
                    print(f"{case.name}: {outcome.failure}", file=sys.stderr)
                    continue
                finally:
                    stop(server)
                outcome.results.append(result)
                print(
                    f"run {run + 1}/{args.runs} {case.name:>16} {result.rps:>10,.0f} req/s"
                    f"  p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms"
                    f"  server cpu {result.server_cpu:.0f}%  wrk cpu {result.client_cpu:.0f}%"
                    f"  errors {result.socket_errors}  non-2xx {result.non_2xx}",
                    file=sys.stderr,
                )
    header = (
        f"{started:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs,"
        f" Python {platform.python_version()}; {versions()};"
        f" wrk -t1 -c{args.connections} -d{max(1, round(args.duration))}s, {args.runs} run(s),"
        f" warm-up {args.warmup:g} s, taskset {'on' if can_pin else 'off'};"
        f" load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    rows = table_rows(selected, outcomes, can_pin)
    checks = target_rows(outcomes)
    scaling = scaling_rows(outcomes)
    print_tables(header, rows, checks, scaling)
    for name, o in outcomes.items():
        if o.failure:
            print(f"{name}: {o.failure}")
    if args.markdown:
        print()
        print(markdown(header, rows, checks, scaling, argv))
    if any(o.results for o in outcomes.values()):
        plot(args.png, selected, outcomes)
    return 0


def table_rows(
    selected: list[Case], outcomes: dict[str, Outcome], can_pin: bool
) -> list[list[str]]:
    rows = []
    for case in selected:
        o = outcomes[case.name]
        pinned = "0 / 1" if case.pinned and can_pin else "no"
        if not o.results:
            failure = o.failure or ""
            short = failure if len(failure) <= 60 else failure[:57] + "..."
            rows.append([case.name, case.app, pinned, *"-------", short])
            continue
        rows.append(
            [
                case.name,
                case.app,
                pinned,
                f"{o.median('rps'):,.0f}",
                f"{o.median('p50_ms'):.2f}",
                f"{o.median('p99_ms'):.2f}",
                f"{o.median('server_cpu'):.0f}",
                f"{o.median('client_cpu'):.0f}",
                str(sum(r.socket_errors for r in o.results)),
                str(sum(r.non_2xx for r in o.results)),
                case.note + (f" ({o.failure})" if o.failure else ""),
            ]
        )
    return rows


def target_rows(outcomes: dict[str, Outcome]) -> list[list[str]]:
    rows = []
    for t in TARGETS:
        num, den = outcomes.get(t.numerator), outcomes.get(t.denominator)
        if num is None or den is None or not num.results or not den.results:
            rows.append([t.label, f"{t.numerator} / {t.denominator}", _want(t), "n/a", "-"])
            continue
        attr = "rps" if t.metric == "rps" else "p99_ms"
        ratio = num.median(attr) / den.median(attr)
        ok = ratio >= t.threshold if t.metric == "rps" else ratio <= t.threshold
        rows.append(
            [
                t.label,
                f"{t.numerator} / {t.denominator}",
                _want(t),
                f"{ratio:.2f}",
                "pass" if ok else "FAIL",
            ]
        )
    return rows


SCALING_COLUMNS = [
    *("server", "1 worker req/s", "2 workers req/s", "2 / 1", "server us/req (2)"),
    *("wrk us/req (2)", "2-core ceiling req/s", "best 2 / 1 = 2s/(s+w)"),
]


def scaling_rows(outcomes: dict[str, Outcome]) -> list[list[str]]:
    """Each server's 2-workers-vs-1 ratio beside the most two shared cores allow.

    Unpinned, two workers and wrk share two cores, so two workers can serve at most
    2 cores / (server CPU + wrk CPU per request) req/s, while one worker, alone on a core,
    serves 1 / (server CPU per request). So the best ratio is 2s / (s + w), s and w the
    server's and wrk's CPU per request: the cheaper the server is per request compared with
    wrk, the lower its best possible ratio. It is not a measure of the server alone.
    """
    rows = []
    for server in ("netstack", "granian", "uvicorn"):
        one, two = outcomes.get(f"{server}-w1"), outcomes.get(f"{server}-w2")
        if one is None or two is None or not one.results or not two.results:
            continue
        rps1, rps2 = one.median("rps"), two.median("rps")
        server_us = two.median("server_cpu") / 100 / rps2 * 1e6
        wrk_us = two.median("client_cpu") / 100 / rps2 * 1e6
        ceiling = 2e6 / (server_us + wrk_us)
        rows.append(
            [
                server,
                f"{rps1:,.0f}",
                f"{rps2:,.0f}",
                f"{rps2 / rps1:.2f}",
                f"{server_us:.1f}",
                f"{wrk_us:.1f}",
                f"{ceiling:,.0f}",
                f"{2 * server_us / (server_us + wrk_us):.2f}",
            ]
        )
    return rows


def _want(t: Target) -> str:
    return f">= {t.threshold:g}" if t.metric == "rps" else f"<= {t.threshold:g}"


COLUMNS = [
    *("case", "app", "cores srv/wrk", "req/s", "p50 ms", "p99 ms", "server CPU %"),
    *("wrk CPU %", "sock err", "non-2xx", "note"),
]
TARGET_COLUMNS = ["target", "ratio of", "wanted", "measured", "result"]


def print_tables(
    header: str, rows: list[list[str]], checks: list[list[str]], scaling: list[list[str]]
) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(header)
        for line in (COLUMNS, *rows, TARGET_COLUMNS, *checks, SCALING_COLUMNS, *scaling):
            print("  ".join(line))
        return
    # Not a terminal (piped to a file): wide enough that the table does not wrap.
    console = Console(width=None if sys.stdout.isatty() else 200)
    console.print(header)
    for columns, body, title in [
        (COLUMNS, rows, "medians"),
        (TARGET_COLUMNS, checks, "targets"),
        (SCALING_COLUMNS, scaling, "worker scaling, unpinned (server and wrk CPU per request)"),
    ]:
        if not body:
            continue
        table = Table(title=title)
        for i, col in enumerate(columns):
            right = 2 < i < 10 if columns is COLUMNS else i > 0 and columns is SCALING_COLUMNS
            table.add_column(col, justify="right" if right or col == "measured" else "left")
        for row in body:
            table.add_row(*row)
        console.print(table)


def markdown(
    header: str,
    rows: list[list[str]],
    checks: list[list[str]],
    scaling: list[list[str]],
    argv: Sequence[str] | None,
) -> str:
    command = "python bench/http.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"- **Run:** {header}", f"- **Command:** `{command.strip()}`", ""]
    for columns, body in [(COLUMNS, rows), (TARGET_COLUMNS, checks), (SCALING_COLUMNS, scaling)]:
        if not body:
            continue
        lines.append("| " + " | ".join(columns) + " |")
        lines.append("|" + "---|" * len(columns))
        lines.extend(
            "| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in body
        )
        lines.append("")
    return "\n".join(lines)


def plot(path: str, selected: list[Case], outcomes: dict[str, Outcome]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG", file=sys.stderr)
        return
    done = [c for c in selected if outcomes[c.name].results]
    names = [c.name for c in done]
    colors = ["tab:blue" if c.server == "netstack" else "tab:gray" for c in done]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    ax1.barh(names, [outcomes[n].median("rps") for n in names], color=colors)
    ax1.set_xlabel("requests/s (median)")
    ax1.invert_yaxis()
    ax2.barh(names, [outcomes[n].median("p99_ms") for n in names], color=colors)
    ax2.set_xlabel("p99 latency, ms (median)")
    ax2.invert_yaxis()
    ax2.set_yticklabels([])
    fig.suptitle("bench/http.py: hello world (and Flask), medians; blue: netstack")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
