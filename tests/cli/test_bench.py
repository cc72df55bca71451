"""``netstack bench models`` in-process with tiny settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from netstack.cli import main


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "models", "--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out
    assert "netstack bench models --quick" in out
    assert "--connections" in out
    assert "NETSTACK_CONNECTIONS" in out


def test_tiny_run_prints_table_and_writes_png(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "plots" / "tmp.png"
    argv = ["bench", "models", "--models", "asyncio,selectloop", "--connections", "1,2"]
    argv += ["--sizes", "64", "--duration", "0.3", "--output", str(png)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("model", "conns", "msgs/s", "p99 ms", "CPU %", "threads", "RSS MiB", "other"):
        assert heading in out
    rows = [line for line in out.splitlines() if line.startswith(("│ asyncio", "│ selectloop"))]
    assert len(rows) == 4, out
    assert all("/1 " in r or "/2 " in r for r in rows)
    assert f"plot written to {png}" in out.replace("\n", "")


def test_quick_keeps_explicit_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "q.png"
    argv = ["bench", "models", "--quick", "--models", "blocking", "--connections", "3"]
    argv += ["--duration", "0.2", "--output", str(png), "--repeats", "3"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│ blocking")]
    assert len(rows) == 1  # quick's sizes (64 only), the given connections
    assert " 64 " in rows[0]
    assert "1/3" in rows[0]  # one client served at a time; the others wait
    assert "median msgs/s of 3 runs" in out.replace("\n", "")
    assert png.exists()


def test_race_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "models", "--race"]) == 0
    out = capsys.readouterr().out
    assert "lost updates" in out
    assert "locked result" in out


@pytest.mark.parametrize(
    ("argv", "field"),
    [
        (["--connections", "0"], "connections"),
        (["--connections", "1,x"], "connections"),
        (["--models", "fibers"], "models"),
        (["--sizes", "0"], "sizes"),
        (["--duration", "-1"], "duration"),
        (["--connections", "100000"], "connections"),
    ],
)
def test_bad_values_exit_2(argv: list[str], field: str, capsys) -> None:
    assert main(["bench", "models", *argv]) == 2
    assert field in capsys.readouterr().err


def test_server_that_cannot_start_exits_1(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from netstack.servers.models import harness

    monkeypatch.setattr(harness.ServerProcess, "__enter__", _fail_to_start)
    argv = ["bench", "models", "--models", "asyncio", "--connections", "1", "--sizes", "64"]
    argv += ["--duration", "0.1", "--output", str(tmp_path / "x.png")]
    assert main(argv) == 1
    assert "did not start" in capsys.readouterr().err


def _fail_to_start(self: object) -> None:
    raise RuntimeError("asyncio server did not start (exit 3): boom")
