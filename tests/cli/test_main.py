from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest

from netstack import __version__, log
from netstack.cli import main


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert __version__ in capsys.readouterr().out


def test_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "Examples:" in out
    assert "echo" in out
    assert "bench" in out


def test_unknown_command_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["frobnicate"]) == 2
    assert "No such command" in capsys.readouterr().err


def test_bad_log_level_is_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--log-level", "loud", "echo", "--help"]) == 2
    assert "--log-level" in capsys.readouterr().err


def test_bad_env_log_level_names_field(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETSTACK_LOG_LEVEL", "loud")
    assert main(["echo", "--help"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("netstack: error: log_level")
    assert err.count("\n") == 1


def test_every_command_has_help_with_examples() -> None:
    """Walk the click tree: every leaf command documents an example."""
    import click

    from netstack.cli import main_group

    def leaves(group: click.Group, prefix: list[str]) -> list[list[str]]:
        out = []
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                out.extend(leaves(cmd, [*prefix, name]))
            else:
                out.append([*prefix, name])
        return out

    commands = leaves(main_group, [])
    assert commands, "no commands registered"
    for path in commands:
        cmd = main_group
        for part in path:
            cmd = cmd.commands[part]  # type: ignore[attr-defined]
        assert "Examples:" in (cmd.help or ""), f"netstack {' '.join(path)} has no examples"


def test_json_log_format(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("debug", "json")
    try:
        logging.getLogger("netstack.test").warning("limit %s hit", "max_x", extra={"conn_id": 7})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("netstack.test").exception("failed")
    finally:
        log.configure("info", "text")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["message"] == "limit max_x hit"
    assert lines[0]["level"] == "warning"
    assert lines[0]["conn_id"] == 7
    assert lines[0]["logger"] == "netstack.test"
    assert "ValueError: boom" in lines[1]["exc"]


def test_text_log_level_filters(capsys: pytest.CaptureFixture[str]) -> None:
    log.configure("warning", "text")
    try:
        logging.getLogger("netstack.test").info("hidden")
        logging.getLogger("netstack.test").warning("shown")
    finally:
        log.configure("info", "text")
    err = capsys.readouterr().err
    assert "shown" in err
    assert "hidden" not in err


def test_python_dash_m_entry_point() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "netstack", "--version"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0
    assert __version__ in out.stdout


def test_prefix_text_lines_starts_every_text_line(capsys: pytest.CaptureFixture[str]) -> None:
    """`netstack up` prefixes its own log lines like its children's; JSON stays JSON."""
    log.configure("info", "text")
    try:
        log.prefix_text_lines("up       | ")
        logging.getLogger("netstack.test").info("hello %s", "there")
        err = capsys.readouterr().err
        assert err.startswith("up       | ")
        assert err.rstrip().endswith("netstack.test: hello there")
        log.configure("info", "json")
        log.prefix_text_lines("up | ")
        logging.getLogger("netstack.test").info("x")
        assert json.loads(capsys.readouterr().err)["message"] == "x"
    finally:
        log.configure("info", "text")
