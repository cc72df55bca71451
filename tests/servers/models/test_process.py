"""``python -m netstack.servers.models`` as a process, and its argument handling in-process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading

import pytest

from netstack.servers.models import __main__ as runner
from netstack.servers.models.base import ModelConfig
from netstack.servers.models.harness import ServerProcess
from tests.helpers import TIMEOUT
from tests.servers.models.support import echo


def test_subprocess_ready_echo_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "netstack.servers.models", "asyncio", "--bind", "127.0.0.1:0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("READY 127.0.0.1:"), line
        port = int(line.split(":")[1])
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
            assert echo(sock, b"over a process boundary") == b"over a process boundary"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(TIMEOUT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _out, err = proc.communicate()
    assert "Traceback" not in err


@pytest.mark.parametrize("model", ["blocking", "selectloop"])
def test_harness_runs_and_stops_a_model(model) -> None:
    with ServerProcess(model, ("--idle-timeout", "none")) as server:
        assert server.pid > 0
        with socket.create_connection(("127.0.0.1", server.port), timeout=TIMEOUT) as sock:
            assert echo(sock, b"abc") == b"abc"
    assert server.returncode == 0
    assert server.stop() == 0  # idempotent


def test_harness_reports_a_child_that_fails() -> None:
    server = ServerProcess("pool", ("--pool-threads", "0"))
    with pytest.raises(RuntimeError, match=r"did not start.*pool_threads"):
        server.__enter__()
    assert server.returncode == 2
    assert server.stderr_tail() == ""  # released


def test_main_serves_until_signal(monkeypatch: pytest.MonkeyPatch) -> None:
    handlers: dict[int, object] = {}
    ready = threading.Event()
    monkeypatch.setattr(runner.signal, "signal", lambda s, h: handlers.__setitem__(s, h))
    monkeypatch.setattr(runner, "_ready", lambda host, port: ready.set())
    codes: list[int] = []
    thread = threading.Thread(
        target=lambda: codes.append(runner.main(["threaded", "--bind", "127.0.0.1:0"]))
    )
    thread.start()
    assert ready.wait(TIMEOUT)
    handlers[signal.SIGTERM](signal.SIGTERM, None)  # type: ignore[operator]
    thread.join(TIMEOUT)
    assert codes == [0]
    assert set(handlers) == {signal.SIGTERM, signal.SIGINT}


def test_main_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        runner.main(["nosuchmodel"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        runner.main(["blocking", "--bind", "nohostport"])
    assert exc.value.code == 2
    assert "bind" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        runner.main(["blocking", "--idle-timeout", "-1"])
    assert "idle_timeout" in capsys.readouterr().err


def test_main_bind_failure_exits_3(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert runner.main(["blocking", "--bind", f"127.0.0.1:{port}"]) == 3
    assert "cannot listen" in capsys.readouterr().err


def test_model_config_validates() -> None:
    with pytest.raises(ValueError, match="max_running"):
        ModelConfig(max_running=0)
    assert ModelConfig(idle_timeout=None).idle_timeout is None
