"""The supervisor's parts on their own: the generated balancer config, ports, the restart
policy (with stand-in child commands, so a crash loop takes milliseconds), start failures."""

from __future__ import annotations

import asyncio
import socket
import sys
import tomllib
from pathlib import Path

import pytest

from netstack.config import UpConfig
from netstack.errors import ConfigError
from netstack.servers.lb import load_config
from netstack.servers.up import supervisor as sv
from netstack.servers.up.supervisor import (
    Child,
    ChildSpec,
    Supervisor,
    UpStartupError,
    balancer_toml,
    pick_ports,
)
from netstack.servers.up.topology import Kind, State
from tests.helpers import TIMEOUT, apoll_until, free_port

pytestmark = pytest.mark.single_loop  # child processes are under test, not the loop


def test_generated_balancer_config_routes_chat_and_dashboard() -> None:
    text = balancer_toml(
        listen="127.0.0.1:8000",
        web=[("web-1", "127.0.0.1:20001"), ("web-2", "127.0.0.1:20002")],
        chat="127.0.0.1:20003",
        dashboard="127.0.0.1:20004",
    )
    cfg = load_config(
        tomllib.loads(text),
        source="up-balancer.toml",
        env={"NETSTACK_ADMIN_TOKEN": "x" * 20},
        flags={"admin_bind": "127.0.0.1:20005"},
    )
    (frontend,) = cfg.frontends
    assert (frontend.listen, frontend.mode, frontend.pool) == ("127.0.0.1:8000", "http", "web")
    routes = [(r.path_prefix, r.rewrite_prefix, r.pool) for r in frontend.routes]
    assert routes == [("/chat/", "/", "chat"), ("/_dashboard", None, "dashboard")]
    web = cfg.pool("web")
    assert [(b.name, b.address) for b in web.backends] == [
        ("web-1", "127.0.0.1:20001"),
        ("web-2", "127.0.0.1:20002"),
    ]
    assert web.health.check_path == "/healthz"
    assert cfg.admin.admin_bind == "127.0.0.1:20005"
    assert "x" * 20 not in text  # the token is never written to the file


def test_up_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="web_servers must be 1-16"):
        UpConfig(web_servers=0)
    with pytest.raises(ConfigError, match="db: expected postgresql"):
        UpConfig(db="sqlite:///x.db")
    with pytest.raises(ConfigError, match="redis"):
        UpConfig(redis="http://cache")
    with pytest.raises(ConfigError, match="admin_token"):
        UpConfig(admin_token="short")
    with pytest.raises(ConfigError, match="listen"):
        UpConfig(listen="8000")


def test_picked_ports_are_distinct_and_free() -> None:
    ports = pick_ports(12)
    assert len(set(ports)) == 12
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # nobody holds it


async def ready() -> bool:
    return True


def fake_child(sup: Supervisor, code: str, name: str = "web-1") -> Child:
    """A child whose "netstack" is ``python -c CODE`` (the -m netstack args are ignored)."""
    sup.python = [sys.executable, "-c", code]
    spec = ChildSpec(name=name, kind=Kind.WEB, argv=[], env={}, address="-", probe=ready)
    child = Child(sup, spec, None)
    sup.children[name] = child
    child.task = asyncio.create_task(child.run())
    return child


async def test_crash_loop_gives_up_and_restore_starts_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sv, "BACKOFF_INITIAL", 0.001)
    lines: list[str] = []
    sup = Supervisor(UpConfig(data_dir=str(tmp_path)), write=lines.append)
    child = fake_child(sup, "import sys; print('boom', flush=True); sys.exit(1)")
    assert await child.first_start is None  # ready, then it crashes
    await apoll_until(lambda: child.state == State.FAILED, timeout=4 * TIMEOUT)
    assert child.restarts == sv.CRASH_LIMIT - 1
    assert any("web-1 crashed 5 times" in line for line in lines)
    assert any(line.endswith("| boom") for line in lines)  # prefixed child output
    assert sup.components()[0].pid is None

    sup.restore("web-1")
    await apoll_until(lambda: child.restarts > sv.CRASH_LIMIT - 1, timeout=4 * TIMEOUT)
    await sup.close()
    assert child.task is not None
    assert child.task.done()


async def test_exit_status_3_after_a_restart_is_failed_at_once(tmp_path: Path) -> None:
    lines: list[str] = []
    sup = Supervisor(UpConfig(data_dir=str(tmp_path)), write=lines.append)
    child = fake_child(sup, "import sys; sys.exit(3)")
    assert await child.first_start is None
    await apoll_until(lambda: child.state == State.FAILED, timeout=2 * TIMEOUT)
    assert child.restarts == 0
    assert any("failed to start (exit status 3); giving up" in line for line in lines)
    await sup.close()


async def test_a_child_that_cannot_start_is_a_startup_failure(tmp_path: Path) -> None:
    cfg = UpConfig(listen=f"127.0.0.1:{free_port()}", data_dir=str(tmp_path), web_servers=1)
    sup = Supervisor(
        cfg,
        write=lambda line: None,
        python=[sys.executable, "-c", "import sys; print('netstack: error: nope'); sys.exit(2)"],
    )
    with pytest.raises(UpStartupError, match=r"could not start: nope"):
        await sup.start()
    assert all(c.pid is None for c in sup.components())
    assert (tmp_path / "up-balancer.toml").exists()


async def test_demo_load_targets_the_public_port(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[str, asyncio.Event]] = []

    async def record(base_url: str, *, stop: asyncio.Event, **kw: object) -> None:
        calls.append((base_url, stop))

    import netstack.servers.up.load as load

    monkeypatch.setattr(load, "run_demo_load", record)
    lines: list[str] = []
    sup = Supervisor(UpConfig(data_dir=str(tmp_path)), write=lines.append)
    sup.public = ("0.0.0.0", 8123)
    await sup._demo_load()
    assert calls == [("http://127.0.0.1:8123", sup.stop_event)]
    assert any("demo load: finished" in line for line in lines)


async def test_second_interrupt_kills_a_child_that_ignores_sigterm(tmp_path: Path) -> None:
    flag = tmp_path / "ignoring"
    lines: list[str] = []
    sup = Supervisor(UpConfig(data_dir=str(tmp_path)), write=lines.append)
    sup.python = [
        sys.executable,
        "-c",
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
        f"pathlib.Path({str(flag)!r}).touch(); time.sleep(60)",
    ]

    async def ignoring() -> bool:
        return flag.exists()

    spec = ChildSpec(name="rpc", kind=Kind.RPC, argv=[], env={}, address="-", probe=ignoring)
    child = Child(sup, spec, None)
    sup.children["rpc"] = child
    child.task = asyncio.create_task(child.run())
    assert await child.first_start is None
    sup.request_stop()  # first Ctrl-C: SIGTERM, which this child ignores
    closing = asyncio.create_task(sup.close())
    await apoll_until(lambda: sup.stopping)
    assert not closing.done()
    sup.request_stop()  # second Ctrl-C: SIGKILL now, not after STOP_TIMEOUT
    async with asyncio.timeout(sv.STOP_TIMEOUT / 2):
        await closing
    assert sup.components()[0].pid is None
    assert any("second interrupt: killing every process now" in line for line in lines)


async def test_child_environment_drops_the_users_netstack_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NETSTACK_BIND", "0.0.0.0:1")  # meant for `up`, not for its children
    monkeypatch.setenv("NETSTACK_LOG_FORMAT", "json")
    monkeypatch.setenv("PATH_FOR_TEST", "kept")
    sup = Supervisor(UpConfig(data_dir=str(tmp_path)), log_level="warning")
    env = sup.child_env({"NETSTACK_SERVED_BY": "web-1"})
    assert "NETSTACK_BIND" not in env
    assert env["NETSTACK_LOG_FORMAT"] == "json"
    assert env["NETSTACK_LOG_LEVEL"] == "warning"
    assert env["NETSTACK_SERVED_BY"] == "web-1"
    assert env["PATH_FOR_TEST"] == "kept"
    assert env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.0.1", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.org", False),
    ],
)
def test_dashboard_controls_only_on_a_loopback_public_port(host: str, loopback: bool) -> None:
    from netstack.servers.up.supervisor import _loopback

    assert _loopback(host) is loopback
