"""Load-balancer benchmark: `netstack balance` against HAProxy, nginx and PumpkinLB.

Not a test (not run in CI). One run starts two nginx backends (1 worker each, own temp
prefix and config, free ports) that answer ``GET /`` with a 13-byte static body and serve
``GET /big`` as a static file (--bulk-mib MiB). Then, for each proxy case and each run, it
starts a fresh proxy process on a free port in front of both backends (round robin) and:

* drives it with ``wrk -t1 -c50 -d{duration}s --latency`` (after a warm-up) for req/s,
  p50/p99, socket errors and non-2xx responses. L4 cases relay the same HTTP requests
  to nginx through their TCP relay;
* for L4 cases (and ``direct``), downloads ``/big`` once through the relay on one
  connection (``Connection: close``, so the backend closes right after the last byte and
  the proxy must flush before it closes too) and reports GB/s and whether every byte
  arrived: exact byte count, and every chunk compared with the file's known content.

Cases: ``netstack-tcp`` / ``netstack-http`` (``<repo>/.venv/bin/netstack balance --mode
tcp|http --no-access-log``, as the peers log nothing either; a mode the command refuses is
reported as failed to start), ``haproxy-tcp`` / ``haproxy-http`` (``mode tcp|http``,
nbthread 1), ``nginx-stream`` (L4, stream module) / ``nginx-http`` (L7, proxy_pass to a
keepalive upstream), ``pumpkinlb`` (L4 only, pip package in bench/.venv-peers) and
``direct`` (wrk straight to one backend: the ceiling).

Placement: the proxy runs under ``taskset -c 0``, wrk and the bulk client on core 1, the
nginx backends unpinned (the scheduler puts them on either core). Runs interleave the
cases so drift on a shared machine hits them all alike; each cell is the median of --runs.
"proxy CPU %", "backends CPU %" and "wrk CPU %" are user+system time of each process group
(wrk: the process itself) over the measured wrk run (100 = one core): a proxy well under
100 % was not the bottleneck; wrk plus the backends near 100 % of core 1 means the harness was.
haproxy, nginx, libnginx-mod-stream and wrk come from apt-get when missing (as root).

PumpkinLB as shipped: its config can only name a port (ConfigParser splits a
``host:port`` key at the colon), so it listens on 0.0.0.0. It forks a process per
connection (all on core 0 here) and listens with a backlog of 5.

    .venv/bin/python bench/lb.py                       # 10 s x 3 runs, 1 GiB bulk
    .venv/bin/python bench/lb.py --quick               # 3 s x 1 run, 256 MiB, no warm-up
    .venv/bin/python bench/lb.py --only netstack-tcp,haproxy-tcp --duration 2 --runs 1
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import os
import platform
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PEERS_VENV = REPO / "bench" / ".venv-peers"
NETSTACK = REPO / ".venv" / "bin" / "netstack"
PUMPKIN = PEERS_VENV / "bin" / "PumpkinLB.py"
STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
APT_PACKAGES = {"haproxy": "haproxy", "nginx": "nginx", "wrk": "wrk"}
BODY = b"Hello, world!"
READY_TIMEOUT = 20.0  # seconds for a process to accept its first connection
STOP_TIMEOUT = 10.0
BLOCK = 1024 * 1024 + 7  # the big file is one random block of this size, repeated
RECV_BYTES = 1024 * 1024  # <= BLOCK: a chunk always fits in the doubled block


def _load_http_bench() -> ModuleType:
    """bench/http.py, for its wrk runner and parser, free_port and the `http` unshadowing.

    Loaded under another name: ``import http`` must keep meaning the stdlib package.
    """
    spec = importlib.util.spec_from_file_location("bench_http", REPO / "bench" / "http.py")
    if spec is None or spec.loader is None:
        raise ImportError("cannot load bench/http.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


bench_http = _load_http_bench()


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    name: str
    proxy: str  # netstack, haproxy, nginx, pumpkinlb or "-" (direct)
    layer: str  # "L4", "L7" or "-" (direct)
    note: str = ""


CASES = [
    Case("netstack-tcp", "netstack", "L4", "balance --mode tcp"),
    Case("haproxy-tcp", "haproxy", "L4", "mode tcp, nbthread 1"),
    Case("nginx-stream", "nginx", "L4", "stream module, 1 worker"),
    Case("pumpkinlb", "pumpkinlb", "L4", "a process per connection; listens on 0.0.0.0"),
    Case("netstack-http", "netstack", "L7", "balance --mode http"),
    Case("haproxy-http", "haproxy", "L7", "mode http, nbthread 1"),
    Case("nginx-http", "nginx", "L7", "proxy_pass, upstream keepalive 64, 1 worker"),
    Case("direct", "-", "-", "no proxy: wrk to backend 1 (ceiling)"),
]


def proxy_command(case: Case, port: int, backends: list[int], workdir: Path) -> list[str]:
    """The command line for ``case`` on ``port``, writing its config file into ``workdir``."""
    listen = f"127.0.0.1:{port}"
    servers = [f"127.0.0.1:{b}" for b in backends]
    if case.proxy == "netstack":
        mode = "tcp" if case.layer == "L4" else "http"
        flags = [arg for s in servers for arg in ("--backend", s)]
        # No access log: HAProxy and nginx run with logging off here too.
        flags.append("--no-access-log")
        return [str(NETSTACK), "balance", "--listen", listen, *flags, "--mode", mode]
    if case.proxy == "haproxy":
        conf = workdir / f"{case.name}-{port}.cfg"
        conf.write_text(haproxy_config(case.layer, listen, servers))
        return [_tool("haproxy"), "-db", "-f", str(conf)]
    if case.proxy == "nginx":
        prefix = workdir / f"{case.name}-{port}"
        body = nginx_stream_block(listen, servers) if case.layer == "L4" else None
        if body is None:
            body = nginx_http_block(
                f"upstream backends {{ {' '.join(f'server {s};' for s in servers)}"
                " keepalive 64; }\n"
                f"  server {{ listen {listen} backlog=4096;\n"
                "    location / { proxy_pass http://backends; proxy_http_version 1.1;"
                ' proxy_set_header Connection ""; } }',
                prefix,
            )
        return nginx_command(prefix, body, stream=case.layer == "L4")
    if case.proxy == "pumpkinlb":
        # ConfigParser splits "host:port=..." at the first ':', so the key can only be a
        # port: PumpkinLB then listens on all interfaces.
        conf = workdir / f"{case.name}-{port}.ini"
        conf.write_text(f"[mappings]\n{port}={','.join(servers)}\n")
        return [str(PEERS_VENV / "bin" / "python"), str(PUMPKIN), str(conf)]
    raise ValueError(f"no command for {case.name}")


def haproxy_config(layer: str, listen: str, servers: list[str]) -> str:
    mode = "tcp" if layer == "L4" else "http"
    lines = [
        "global",
        "  nbthread 1",
        "  maxconn 4096",
        "defaults",
        f"  mode {mode}",
        "  timeout connect 5s",
        "  timeout client 60s",
        "  timeout server 60s",
        "frontend fe",
        f"  bind {listen}",
        "  default_backend be",
        "backend be",
        "  balance roundrobin",
        *(f"  server s{i} {s}" for i, s in enumerate(servers, 1)),
    ]
    return "\n".join(lines) + "\n"


def nginx_main(prefix: Path, stream: bool) -> str:
    load = f"load_module {STREAM_MODULE};\n" if stream else ""
    return (
        f"{load}worker_processes 1;\ndaemon off;\nmaster_process on;\n"
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "worker_rlimit_nofile 65536;\nevents { worker_connections 16384; }\n"
    )


def nginx_http_block(servers: str, prefix: Path) -> str:
    temps = "".join(
        f"  {kind}_temp_path {prefix}/tmp/{kind};\n"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"http {{\n  access_log off;\n{temps}  {servers}\n}}\n"


def nginx_stream_block(listen: str, servers: list[str]) -> str:
    upstream = " ".join(f"server {s};" for s in servers)
    return (
        f"stream {{\n  upstream backends {{ {upstream} }}\n"
        f"  server {{ listen {listen} backlog=4096; proxy_pass backends; }}\n}}\n"
    )


def nginx_command(prefix: Path, block: str, stream: bool = False) -> list[str]:
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_main(prefix, stream) + block)
    return [_tool("nginx"), "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)]


def backend_command(prefix: Path, port: int, www: Path) -> list[str]:
    server = (
        f"sendfile on;\n  server {{ listen 127.0.0.1:{port} backlog=4096; root {www};\n"
        '    location = / { default_type text/plain; return 200 "Hello, world!"; }\n'
        "    location = /big { default_type application/octet-stream; } }"
    )
    return nginx_command(prefix, nginx_http_block(server, prefix))


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@dataclass(frozen=True)
class Target:
    label: str
    numerator: str
    denominator: str | None  # None: an absolute bound on the numerator's value
    metric: str  # "rps", "p99", "gbps", "broken" (bulk runs not intact) or "errors"
    op: str  # ">=", "<=", "<" or "=="
    threshold: float


TARGETS = [
    Target("L4 req/s vs HAProxy", "netstack-tcp", "haproxy-tcp", "rps", ">=", 0.9),
    Target("L4 req/s vs PumpkinLB", "netstack-tcp", "pumpkinlb", "rps", ">=", 3.0),
    Target("L4 p99 latency, ms", "netstack-tcp", None, "p99", "<", 10.0),
    Target("L7 req/s vs nginx", "netstack-http", "nginx-http", "rps", ">=", 0.7),
    Target("L7 p99 latency vs nginx", "netstack-http", "nginx-http", "p99", "<=", 2.0),
    Target("L4 bulk GB/s vs HAProxy", "netstack-tcp", "haproxy-tcp", "gbps", ">=", 1.0),
    Target("L4 bulk runs not intact", "netstack-tcp", None, "broken", "==", 0),
    Target("L4 errors (socket + non-2xx)", "netstack-tcp", None, "errors", "==", 0),
    Target("L7 errors (socket + non-2xx)", "netstack-http", None, "errors", "==", 0),
]


# --------------------------------------------------------------------------- processes


class StartFailure(Exception):
    """A process did not start, or answered the check request wrongly."""


@dataclass
class Running:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path


LIVE: list[Running] = []  # everything started and not yet stopped, for the final cleanup


def launch(name: str, cmd: list[str], port: int, logdir: Path, pinned: bool) -> Running:
    """Start ``cmd`` in its own session, wait until ``port`` accepts, check ``GET /``."""
    if not Path(cmd[0]).exists():
        raise StartFailure(f"{cmd[0]} does not exist")
    if pinned:
        cmd = ["taskset", "-c", "0", *cmd]
    log = logdir / f"{name}-{port}.log"
    with log.open("wb") as fh:
        # Own session: master, workers and forked children can be signalled at once.
        proc = subprocess.Popen(
            cmd, cwd=logdir, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )
    running = Running(name, proc, port, log)
    LIVE.append(running)
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            stop(running)
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
    except (OSError, ValueError) as exc:
        stop(running)
        raise StartFailure(f"bad answer to GET /: {exc}") from None
    return running


def check_response(port: int) -> None:
    """One keep-alive ``GET /``: status 200 and the exact body, or ValueError.

    Keep-alive, read up to Content-Length: a proxy that drops a response arriving together
    with the backend's close (PumpkinLB does) still passes the check; the bulk case shows it.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        data = b""
        while True:
            head, sep, body = data.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head) if sep else None
            if length is not None and len(body) >= int(length[1]):
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    status = head.split(b"\r\n", 1)[0]
    if not status.startswith(b"HTTP/1.1 200") or body != BODY:
        raise ValueError(f"{status[:40]!r}, body {body[:40]!r}")


def stop(running: Running) -> None:
    proc = running.proc
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    # Workers or forked children that outlive their parent die with the session.
    _signal_group(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ValueError):
        LIVE.remove(running)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no output)"
    return " | ".join(text[-lines:]) or "(no output)"


# -------------------------------------------------------------------------------- bulk


@dataclass
class BulkResult:
    gbps: float
    expected: int
    received: int  # body bytes that arrived, right or wrong
    first_bad: int | None  # offset of the first byte that differs from the file, if any
    error: str = ""  # "closed early", "stalled", a bad status...

    @property
    def lost(self) -> int:
        return max(0, self.expected - self.received)

    @property
    def intact(self) -> bool:
        return self.received == self.expected and self.first_bad is None and not self.error


def write_big_file(path: Path, size: int) -> bytes:
    """Fill ``path`` with ``size`` bytes: one seeded random block repeated. Returns it."""
    block = random.Random(20261125).randbytes(BLOCK)
    with path.open("wb") as fh:
        left = size
        while left > 0:
            fh.write(block[: min(left, BLOCK)])
            left -= BLOCK
    return block


def fetch_bulk(port: int, size: int, block: bytes, pin: bool) -> BulkResult:
    """GET /big on one connection, counting and comparing every body byte.

    Runs in this thread pinned to core 1 (when ``pin``); stops at ``size`` body bytes, at
    EOF, or when nothing arrives for 10 s.
    """
    doubled = block + block
    buf = bytearray(RECV_BYTES)
    view = memoryview(buf)
    before = os.sched_getaffinity(0)
    if pin:
        os.sched_setaffinity(0, {1})
    received, first_bad, error = 0, None, ""
    try:
        start = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"GET /big HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            head = b""
            while b"\r\n\r\n" not in head and len(head) < 65536:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                head += chunk
            head, sep, rest = head.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
            if not sep or not head.startswith(b"HTTP/1.1 200") or length is None:
                return BulkResult(0.0, size, 0, None, f"bad response head {head[:60]!r}")
            if int(length[1]) != size:
                return BulkResult(0.0, size, 0, None, f"content-length {length[1].decode()}")
            n = len(rest)
            buf[:n] = rest
            while True:
                if n:
                    if first_bad is None:
                        offset = received % BLOCK
                        got = buf if n == RECV_BYTES else buf[:n]
                        expect = doubled[offset : offset + n]
                        if got != expect:  # bytes compare: memcmp (memoryview's is slow)
                            first_bad = received + next(i for i in range(n) if got[i] != expect[i])
                    received += n
                if received >= size:
                    break
                try:
                    n = sock.recv_into(view, min(RECV_BYTES, size - received))
                except TimeoutError:
                    error = "stalled 10 s"
                    break
                if n == 0:
                    error = "closed early"
                    break
        elapsed = time.perf_counter() - start
    except OSError as exc:
        return BulkResult(0.0, size, received, first_bad, f"{type(exc).__name__}: {exc}")
    finally:
        os.sched_setaffinity(0, before)
    return BulkResult(received / elapsed / 1e9, size, received, first_bad, error)


# ---------------------------------------------------------------------------- set-up


def ensure_tools(install: bool) -> list[str]:
    """apt-get what is missing; returns the names still missing afterwards."""

    def missing() -> list[str]:
        out = [pkg for tool, pkg in APT_PACKAGES.items() if not Path(_tool(tool)).exists()]
        return out + ([] if STREAM_MODULE.exists() else ["libnginx-mod-stream"])

    need = missing()
    if need and install and shutil.which("apt-get") and os.geteuid() == 0:
        print(f"installing {' '.join(need)} with apt-get", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "-q", *need]
        if not _ok(cmd, env):
            _ok(["apt-get", "update", "-q"], env)
            _ok(cmd, env)
        need = missing()
    return need


def ensure_pumpkin(install: bool) -> None:
    python = PEERS_VENV / "bin" / "python"
    if PUMPKIN.exists() or not install:
        return
    print(f"installing PumpkinLB into {PEERS_VENV}", file=sys.stderr)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PEERS_VENV)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "PumpkinLB"], check=False)


def _ok(cmd: list[str], env: dict[str, str] | None = None) -> bool:
    return subprocess.run(cmd, capture_output=True, check=False, env=env).returncode == 0


def versions() -> str:
    def first_line(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, check=False)
        except OSError:
            return "-"
        return (
            (out.stdout or out.stderr).strip().splitlines()[0] if out.stdout or out.stderr else "-"
        )

    haproxy = re.search(r"version (\S+)", first_line([_tool("haproxy"), "-v"]))
    nginx = first_line([_tool("nginx"), "-v"]).rpartition("/")[2]
    pumpkin = first_line([str(PEERS_VENV / "bin" / "python"), str(PUMPKIN), "--version"])
    pumpkin_v = re.search(r"Version (\S+)", pumpkin)
    netstack = first_line([str(NETSTACK), "--version"]).rpartition(" ")[2]
    wrk = first_line(["wrk", "--version"]).split()
    return (
        f"netstack {netstack}, HAProxy {haproxy[1] if haproxy else '-'}, nginx {nginx},"
        f" PumpkinLB {pumpkin_v[1] if pumpkin_v else '-'},"
        f" wrk {wrk[1] if len(wrk) > 1 else '-'}"
    )


# ------------------------------------------------------------------------------ main


@dataclass
class Outcome:
    results: list[Any] = field(default_factory=list)  # bench_http.WrkResult
    bulk: list[BulkResult] = field(default_factory=list)
    backend_cpu: list[float] = field(default_factory=list)  # both backends, % of one core
    failure: str | None = None

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.results))

    def value(self, metric: str) -> float | None:
        """A target's metric, or None when nothing was measured."""
        if metric in ("gbps", "broken"):
            if not self.bulk:
                return None
            if metric == "gbps":
                return statistics.median(b.gbps for b in self.bulk)
            return float(sum(not b.intact for b in self.bulk))
        if not self.results:
            return None
        if metric == "errors":
            return float(sum(r.socket_errors + r.non_2xx for r in self.results))
        return self.median("rps" if metric == "rps" else "p99_ms")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [c.name for c in CASES]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--runs", type=int, default=3, help="runs per case; cells are medians")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk before each run")
    p.add_argument("--connections", type=int, default=50)
    p.add_argument(
        "--bulk-mib", type=int, default=1024, help="size of the bulk file, MiB (0: no bulk)"
    )
    p.add_argument("--only", default="", help="comma-separated cases: " + ",".join(names))
    p.add_argument("--quick", action="store_true", help="3 s x 1 run, 256 MiB, no warm-up")
    p.add_argument("--no-pin", action="store_true", help="never use taskset")
    p.add_argument("--no-install", action="store_true", help="do not pip/apt-get anything")
    p.add_argument("--png", default=str(REPO / "bench" / "RESULTS-lb.png"))
    p.add_argument("--markdown", action="store_true", help="also print a RESULTS.md section")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.runs, args.warmup = 3.0, 1, 0.0
        args.bulk_mib = min(args.bulk_mib, 256)
    unknown = set(filter(None, args.only.split(","))) - set(names)
    if unknown:
        p.error(f"unknown case(s) {', '.join(sorted(unknown))}; choose from {', '.join(names)}")
    if args.runs < 1 or args.bulk_mib < 0:
        p.error("--runs must be >= 1 and --bulk-mib >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    bench_http.unshadow_stdlib_http()  # bench/ is sys.path[0]: keep `http` the stdlib one
    args = parse_args(argv)
    install = not args.no_install
    still_missing = ensure_tools(install)
    if "wrk" in still_missing:
        print("wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    ensure_pumpkin(install)
    can_pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) > 1
    only = set(filter(None, args.only.split(",")))
    selected = [c for c in CASES if not only or c.name in only]
    outcomes = {c.name: Outcome() for c in selected}
    bulk_size = args.bulk_mib * 1024 * 1024
    load_before = os.getloadavg()[0]
    started = datetime.datetime.now(datetime.UTC)
    # SIGTERM (e.g. a timeout wrapper) unwinds like Ctrl-C, so `finally` stops everything.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="bench-lb-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)  # nginx workers (user nobody when run as root) read www/
        www = work / "www"
        www.mkdir()
        block = write_big_file(www / "big", bulk_size) if bulk_size else b""
        try:
            backends = start_backends(work)
            for run in range(args.runs):
                for case in selected:
                    measure(case, outcomes[case.name], run, args, backends, work, block, can_pin)
        except StartFailure as exc:  # measure() catches the proxies' own
            print(f"nginx backends: failed to start: {exc}", file=sys.stderr)
            return 3
        finally:
            for running in list(LIVE):
                stop(running)
    placement = (
        "proxy on core 0, wrk and bulk client on core 1, nginx backends unpinned"
        if can_pin
        else "taskset off: nothing pinned"
    )
    header = (
        f"{started:%Y-%m-%d %H:%M} UTC, {platform.machine()}, {os.cpu_count()} CPUs,"
        f" Python {platform.python_version()}; {versions()};"
        f" wrk -t1 -c{args.connections} -d{max(1, round(args.duration))}s --latency,"
        f" {args.runs} run(s), warm-up {args.warmup:g} s; bulk {args.bulk_mib} MiB;"
        f" {placement}; load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
    )
    if still_missing:
        header += f"; missing: {', '.join(still_missing)}"
    tables = [
        (REQUEST_COLUMNS, request_rows(selected, outcomes, can_pin), "requests (medians)"),
        (BULK_COLUMNS, bulk_rows(selected, outcomes), f"L4 bulk, {args.bulk_mib} MiB"),
        (TARGET_COLUMNS, target_rows(outcomes), "targets"),
    ]
    if not bulk_size:
        del tables[1]
    print_tables(header, tables)
    for name, o in outcomes.items():
        if o.failure:
            print(f"{name}: {o.failure}")
    if args.markdown:
        print()
        print(markdown(header, tables, argv))
    if any(o.results or o.bulk for o in outcomes.values()):
        plot(args.png, selected, outcomes)
    return 0


def start_backends(work: Path) -> list[Running]:
    backends = []
    for i in (1, 2):
        port = bench_http.free_port()
        cmd = backend_command(work / f"backend{i}", port, work / "www")
        backends.append(launch(f"backend{i}", cmd, port, work, pinned=False))
    return backends


def measure(
    case: Case,
    outcome: Outcome,
    run: int,
    args: argparse.Namespace,
    backends: list[Running],
    work: Path,
    block: bytes,
    can_pin: bool,
) -> None:
    """One run of one case: a fresh proxy, wrk (warm-up, then measured), then bulk."""
    if outcome.failure is not None:
        return  # failed once: do not retry every run
    proxy = None
    port = backends[0].port
    if case.proxy != "-":
        port = bench_http.free_port()
        try:
            cmd = proxy_command(case, port, [b.port for b in backends], work)
            proxy = launch(case.name, cmd, port, work, can_pin)
        except StartFailure as exc:
            outcome.failure = f"failed to start: {exc}"
            print(f"{case.name}: {outcome.failure}", file=sys.stderr)
            return
    try:
        if args.warmup > 0:
            bench_http.run_wrk(port, args.warmup, args.connections, can_pin)
        pgid = proxy.proc.pid if proxy else 0
        cpu0, t0 = _cpu(pgid), time.monotonic()
        back0 = sum(_cpu(b.proc.pid) for b in backends)
        result = bench_http.run_wrk(port, args.duration, args.connections, can_pin)
        elapsed = time.monotonic() - t0
        result.server_cpu = (_cpu(pgid) - cpu0) / elapsed * 100 if pgid else 0
        back_cpu = (sum(_cpu(b.proc.pid) for b in backends) - back0) / elapsed * 100
        outcome.results.append(result)
        outcome.backend_cpu.append(back_cpu)
        print(
            f"run {run + 1}/{args.runs} {case.name:>14} {result.rps:>10,.0f} req/s"
            f"  p50 {result.p50_ms:.2f} ms  p99 {result.p99_ms:.2f} ms"
            f"  proxy cpu {result.server_cpu:.0f}%  backends cpu {back_cpu:.0f}%"
            f"  wrk cpu {result.client_cpu:.0f}%"
            f"  errors {result.socket_errors}  non-2xx {result.non_2xx}",
            file=sys.stderr,
        )
        if block and case.layer != "L7":
            bulk = fetch_bulk(port, args.bulk_mib * 1024 * 1024, block, can_pin)
            outcome.bulk.append(bulk)
            print(
                f"run {run + 1}/{args.runs} {case.name:>14} bulk {bulk.gbps:.2f} GB/s"
                f"  {bulk.received:,}/{bulk.expected:,} bytes  {_content(bulk)}",
                file=sys.stderr,
            )
    except (subprocess.SubprocessError, ValueError) as exc:
        outcome.failure = f"wrk failed: {exc}"
        print(f"{case.name}: {outcome.failure}", file=sys.stderr)
    finally:
        if proxy is not None:
            stop(proxy)


def _cpu(pgid: int) -> float:
    """CPU seconds of process group ``pgid``: user + system of its live processes, plus
    those of the children they reaped (PumpkinLB's per-connection processes come and go)."""
    return sum(bench_http.group_cpu(pgid, reaped=True)) if pgid else 0.0


def _content(b: BulkResult) -> str:
    parts = []
    if b.first_bad is not None:
        parts.append(f"differs from byte {b.first_bad:,}")
    if b.lost:
        parts.append(f"{b.lost:,} bytes lost")
    if b.error:
        parts.append(b.error)
    return ", ".join(parts) or "intact"


REQUEST_COLUMNS = [
    *("case", "layer", "cores proxy/wrk", "req/s", "p50 ms", "p99 ms", "proxy CPU %"),
    *("backends CPU %", "wrk CPU %"),
    *("sock err", "non-2xx", "note"),
]
BULK_COLUMNS = ["case", "GB/s", "bytes received (worst run)", "bytes lost", "content", "note"]
TARGET_COLUMNS = ["target", "ratio of", "wanted", "measured", "result"]


def request_rows(
    selected: list[Case], outcomes: dict[str, Outcome], can_pin: bool
) -> list[list[str]]:
    rows = []
    for case in selected:
        o = outcomes[case.name]
        cores = ("0 / 1" if case.proxy != "-" else "- / 1") if can_pin else "no"
        if not o.results:
            rows.append([case.name, case.layer, cores, *"--------", _short(o.failure or "")])
            continue
        rows.append(
            [
                case.name,
                case.layer,
                cores,
                f"{o.median('rps'):,.0f}",
                f"{o.median('p50_ms'):.2f}",
                f"{o.median('p99_ms'):.2f}",
                f"{o.median('server_cpu'):.0f}" if case.proxy != "-" else "-",
                f"{statistics.median(o.backend_cpu):.0f}",
                f"{o.median('client_cpu'):.0f}",
                str(sum(r.socket_errors for r in o.results)),
                str(sum(r.non_2xx for r in o.results)),
                case.note + (f" ({o.failure})" if o.failure else ""),
            ]
        )
    return rows


def bulk_rows(selected: list[Case], outcomes: dict[str, Outcome]) -> list[list[str]]:
    rows = []
    for case in selected:
        if case.layer == "L7":
            continue
        o = outcomes[case.name]
        if not o.bulk:
            rows.append([case.name, "-", "-", "-", "-", _short(o.failure or "")])
            continue
        worst = min(o.bulk, key=lambda b: (b.intact, b.received))
        rows.append(
            [
                case.name,
                f"{statistics.median(b.gbps for b in o.bulk):.2f}",
                f"{worst.received:,} / {worst.expected:,}",
                f"{worst.lost:,}",
                _content(worst),
                f"{sum(b.intact for b in o.bulk)}/{len(o.bulk)} runs intact",
            ]
        )
    return rows


_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
    "==": lambda a, b: a == b,
}


def target_rows(outcomes: dict[str, Outcome]) -> list[list[str]]:
    rows = []
    for t in TARGETS:
        of = t.numerator if t.denominator is None else f"{t.numerator} / {t.denominator}"
        wanted = f"{t.op} {t.threshold:g}" + ("x" if t.denominator else "")
        num = outcomes[t.numerator].value(t.metric) if t.numerator in outcomes else None
        den = 1.0
        if t.denominator is not None:
            den_o = outcomes.get(t.denominator)
            den = den_o.value(t.metric) if den_o else None  # type: ignore[assignment]
        if num is None or den is None or den == 0:
            failed = [
                f"{name} {outcomes[name].failure}"
                for name in (t.numerator, t.denominator)
                if name in outcomes and outcomes[name].failure
            ]
            why = "; ".join(failed) if failed else "not run"
            rows.append([t.label, of, wanted, "n/a", _short(why, 50)])
            continue
        measured = num / den
        text = f"{measured:.2f}" if t.denominator or t.metric == "p99" else f"{measured:g}"
        ok = _OPS[t.op](measured, t.threshold)
        rows.append([t.label, of, wanted, text, "pass" if ok else "FAIL"])
    return rows


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


Table = tuple[list[str], list[list[str]], str]


def print_tables(header: str, tables: list[Table]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table as RichTable
    except ImportError:
        print(header)
        for columns, body, title in tables:
            print(f"\n{title}")
            for line in (columns, *body):
                print("  ".join(line))
        return
    console = Console(width=None if sys.stdout.isatty() else 220)
    console.print(header)
    for columns, body, title in tables:
        table = RichTable(title=title)
        for col in columns:
            numeric = col in ("req/s", "p50 ms", "p99 ms", "proxy CPU %", "sock err", "non-2xx")
            numeric = numeric or col in (
                "backends CPU %",
                "wrk CPU %",
                "GB/s",
                "bytes lost",
                "measured",
            )
            table.add_column(col, justify="right" if numeric else "left")
        for row in body:
            table.add_row(*row)
        console.print(table)


def markdown(header: str, tables: list[Table], argv: Sequence[str] | None) -> str:
    command = "python bench/lb.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = [f"- **Run:** {header}", f"- **Command:** `{command.strip()}`", ""]
    for columns, body, title in tables:
        lines.append(f"**{title}**")
        lines.append("")
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

    def color(case: Case) -> str:
        return {"netstack": "tab:blue", "-": "lightgray"}.get(case.proxy, "tab:gray")

    def bars(ax: Any, cases: list[Case], values: list[float], failed: list[str]) -> Any:
        """Horizontal bars, one per case; a case with no value gets its reason as text."""
        labels = [f"{c.name} ({c.layer})" if c.layer != "-" else c.name for c in cases]
        drawn = ax.barh(labels, values, color=[color(c) for c in cases])
        for i, why in enumerate(failed):
            if why:
                ax.text(0.01, i, why, transform=ax.get_yaxis_transform(), va="center")
        ax.invert_yaxis()
        return drawn

    def failed(case: Case) -> str:
        return (
            " failed to start"
            if "failed to start" in (outcomes[case.name].failure or "")
            else " not measured"
        )

    nan = float("nan")
    reqs = [outcomes[c.name] for c in selected]
    why = ["" if o.results else failed(c) for c, o in zip(selected, reqs, strict=True)]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, attr, xlabel in [
        (axes[0], "rps", "requests/s (median)"),
        (axes[1], "p99_ms", "p99 latency, ms (median, log scale)"),
    ]:
        values = [o.median(attr) if o.results else nan for o in reqs]
        bars(ax, selected, values, why)
        ax.set_xlabel(xlabel)
    axes[0].xaxis.set_major_formatter(lambda x, _: f"{x / 1000:g}k")
    axes[1].set_xscale("log")
    axes[1].set_yticklabels([])
    l4 = [c for c in selected if c.layer != "L7"]
    gbps = [
        statistics.median(b.gbps for b in outcomes[c.name].bulk) if outcomes[c.name].bulk else nan
        for c in l4
    ]
    drawn = bars(axes[2], l4, gbps, ["" if outcomes[c.name].bulk else failed(c) for c in l4])
    for bar, case in zip(drawn, l4, strict=True):
        if outcomes[case.name].bulk and not all(b.intact for b in outcomes[case.name].bulk):
            bar.set_hatch("//")
            axes[2].annotate(
                " bytes lost", (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center"
            )
    axes[2].set_xlabel("L4 bulk GB/s (median; hatched: not every byte arrived)")
    fig.suptitle("bench/lb.py: proxies in front of 2 nginx backends; blue: netstack balance")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
