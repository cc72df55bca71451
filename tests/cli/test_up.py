"""``netstack up`` flags: usage errors exit 2 before anything starts."""

from __future__ import annotations

import pytest

from netstack.cli import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--web-servers", "0"], "web_servers must be 1-16"),
        (["--web-servers", "many"], "expected an integer"),
        (["--listen", "8000"], "listen: expected HOST:PORT"),
        (["--db", "mysql://x"], "db: expected postgresql"),
        (["--admin-token", "short"], "admin_token"),
    ],
)
def test_bad_settings_exit_2(args: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    assert main(["up", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("netstack: error: ")
    assert message in err


def test_help_lists_every_setting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["up", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in (
        "--listen",
        "--web-servers",
        "--data-dir",
        "--db",
        "--redis",
        "--demo-load",
        "--admin-token",
        "NETSTACK_WEB_SERVERS",
        "Examples:",
    ):
        assert flag in out
