"""``--metrics-bind`` on ``rpc serve`` and ``chat serve``: flags, exit codes, a real scrape."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from netstack.cli import main
from tests.helpers import TIMEOUT
from tests.helpers.scrape import scrape, value

NETSTACK = (sys.executable, "-m", "netstack")


def _serve(kind: str, tmp_path) -> list[str]:
    if kind == "rpc":
        return ["rpc", "serve", "--bind", "127.0.0.1:0", "--data-dir", str(tmp_path)]
    return [
        "chat",
        "serve",
        "--bind",
        "127.0.0.1:0",
        "--tcp-bind",
        "none",
        "--data-dir",
        str(tmp_path),
    ]


@pytest.mark.parametrize("kind", ["rpc", "chat"])
def test_help_offers_metrics_bind_with_an_example(kind, capsys):
    assert main([kind, "serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--metrics-bind" in out
    assert "NETSTACK_METRICS_BIND" in out
    assert f"netstack {kind} serve --metrics-bind 127.0.0.1:" in out


@pytest.mark.parametrize("kind", ["rpc", "chat"])
def test_bad_metrics_bind_is_a_usage_error(kind, capsys, tmp_path):
    assert main([*_serve(kind, tmp_path), "--metrics-bind", "nonsense"]) == 2
    err = capsys.readouterr().err
    assert "metrics_bind" in err
    assert err.count("\n") == 1


@pytest.mark.parametrize("kind", ["rpc", "chat"])
def test_metrics_port_in_use_is_startup_failure(kind, capsys, tmp_path):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main([*_serve(kind, tmp_path), "--metrics-bind", f"127.0.0.1:{port}"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"cannot bind metrics_bind 127.0.0.1:{port}: Address already in use" in err


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rpc", "chat"])
def test_serve_prints_the_metrics_url_and_serves_it(kind, tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "NETSTACK_METRICS_BIND": "127.0.0.1:0"}
    proc = subprocess.Popen(
        [*NETSTACK, *_serve(kind, tmp_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        lines = []
        for _ in range(6):  # the metrics line comes after the listening lines
            lines.append(proc.stdout.readline())
            if lines[-1].startswith("metrics on "):
                break
        url = lines[-1].split()[-1]
        assert url.startswith("http://127.0.0.1:"), lines
        assert url.endswith("/metrics"), lines
        host, port = url.removeprefix("http://").removesuffix("/metrics").split(":")
        samples = scrape((host, int(port)))
        if kind == "rpc":
            assert value(samples, "netstack_rpc_calls_in_flight") == 0
        else:
            assert value(samples, "netstack_chat_users_online") == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
