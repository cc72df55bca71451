"""``netstack echo serve|send`` in process via main(argv), plus one subprocess smoke test."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from netstack.cli import main
from netstack.cli.options import load_config
from netstack.config import EchoServerConfig
from netstack.servers.messaging import create_server
from netstack.transport.listener import format_address
from tests.helpers import TIMEOUT, free_port


@pytest.fixture(params=["tcp", "udp"])
def server_in_thread(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """An echo server on its own loop in a thread, so main() can run a loop here."""
    ready = threading.Event()
    state: dict[str, object] = {}

    async def serve() -> None:
        srv = create_server(EchoServerConfig(proto=request.param, bind="127.0.0.1:0"))
        await srv.start()
        state.update(srv=srv, loop=asyncio.get_running_loop())
        ready.set()
        await srv.serve_forever()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    assert ready.wait(TIMEOUT)
    srv = state["srv"]
    try:
        yield request.param, format_address(srv.addresses[0])  # type: ignore[attr-defined]
    finally:
        state["loop"].call_soon_threadsafe(srv.request_stop)  # type: ignore[attr-defined]
        thread.join(TIMEOUT)
        assert not thread.is_alive()


def test_send_prints_percentiles_and_rate(server_in_thread, capsys):
    proto, addr = server_in_thread
    argv = ["echo", "send", "--proto", proto, "--connect", addr, "--count", "50", "--size", "32"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "ok 50  errors 0" in out
    assert "p50" in out
    assert "p99" in out
    assert "msgs/s" in out


def test_unknown_flag_is_usage_error(capsys):
    assert main(["echo", "serve", "--no-such-flag"]) == 2
    assert "--no-such-flag" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["echo", "serve", "--max-frame-bytes", "-1"], "max_frame_bytes"),
        (["echo", "serve", "--bind", "nonsense"], "bind"),
        (["echo", "send", "--count", "0"], "count"),
        (["echo", "serve", "--framing", "xml"], "framing"),
    ],
)
def test_bad_value_is_usage_error_naming_the_field(argv, field, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert field in err
    assert err.count("\n") == 1


def test_missing_certfile_is_usage_error(tmp_path, capsys):
    missing = str(tmp_path / "nope.pem")
    argv = ["echo", "serve", "--bind", "127.0.0.1:0", "--certfile", missing, "--keyfile", missing]
    assert main(argv) == 2
    assert "certfile" in capsys.readouterr().err


def test_port_in_use_is_startup_failure(capsys):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        assert main(["echo", "serve", "--bind", f"127.0.0.1:{port}"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"127.0.0.1:{port}" in err


def test_unreachable_server_is_runtime_failure(capsys):
    port = free_port()
    argv = ["echo", "send", "--connect", f"127.0.0.1:{port}", "--retries", "1"]
    assert main([*argv, "--backoff-initial", "0.01"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot connect" in err


def test_serve_help_has_examples(capsys):
    assert main(["echo", "serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out
    assert "  netstack echo serve --bind 127.0.0.1:9000\n" in out  # \b kept the layout


def test_precedence_toml_env_flag(tmp_path):
    toml = tmp_path / "echo.toml"
    toml.write_text("[limits]\nmax_frame_bytes = 111\n")
    env = {"NETSTACK_MAX_FRAME_BYTES": "222"}
    load = load_config
    assert load(EchoServerConfig, {}, config_file=str(toml), env={}).limits.max_frame_bytes == 111
    assert load(EchoServerConfig, {}, config_file=str(toml), env=env).limits.max_frame_bytes == 222
    flags = {"max_frame_bytes": "333"}
    cfg = load(EchoServerConfig, flags, config_file=str(toml), env=env)
    assert cfg.limits.max_frame_bytes == 333


def test_serve_subprocess_smoke():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "netstack", "echo", "serve", "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("listening on tcp 127.0.0.1:"), line
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            sock.sendall(struct.pack("!I", 5) + b"hello")
            got = b""
            while len(got) < 9:
                chunk = sock.recv(64)
                assert chunk
                got += chunk
            assert got == struct.pack("!I", 5) + b"hello"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT) == 0
        _, err = proc.communicate(timeout=TIMEOUT)
        assert "listener closed" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]


def test_serve_in_process_stops_on_sigterm(monkeypatch):
    listening = threading.Event()

    class Stdout(io.StringIO):
        def write(self, text: str) -> int:
            n = super().write(text)
            if "listening on" in self.getvalue():
                listening.set()  # printed after the signal handlers are installed
            return n

    out = Stdout()
    monkeypatch.setattr(sys, "stdout", out)

    finished = threading.Event()

    def stop_when_listening() -> None:
        if listening.wait(TIMEOUT) and not finished.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=stop_when_listening)
    killer.start()
    try:
        assert main(["echo", "serve", "--bind", "127.0.0.1:0"]) == 0
    finally:
        finished.set()
        listening.set()
        killer.join(TIMEOUT)
    assert "listening on tcp 127.0.0.1:" in out.getvalue()
