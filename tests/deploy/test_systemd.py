"""deploy/systemd: units pass systemd-analyze verify and agree with the balancer TOML."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.deploy.support import DEPLOY, bind_port, check_command, hostport, toml
from tests.helpers import TIMEOUT

SYSTEMD = DEPLOY / "systemd"
INSTALLED = "/opt/netstack/bin/netstack"
UNITS = sorted(SYSTEMD.glob("*.service"))
# The web template, instantiated as the balancer TOML's backends are.
WEB_INSTANCES = ("1", "2")


def unit(path: Path) -> configparser.ConfigParser:
    # systemd allows repeated keys (EnvironmentFile=...): keep the last, check them all below.
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(path)
    return parser


def values(path: Path, section: str, key: str) -> list[str]:
    prefix = f"{key}="
    out, current = [], None
    for line in path.read_text().splitlines():
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and line.startswith(prefix):
            out.append(line[len(prefix) :])
    return out


def env_file(path: str) -> dict[str, str]:
    """An EnvironmentFile= as deployed: the committed example of the same name."""
    example = SYSTEMD / (Path(path).name + ".example")
    assert example.is_file(), f"no {example.name} for {path}"
    env = {}
    for line in example.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    return env


def exec_start(path: Path, instance: str = "") -> tuple[list[str], dict[str, str]]:
    """The ExecStart command line and its environment, with %i set to ``instance``."""
    (line,) = values(path, "Service", "ExecStart")
    env: dict[str, str] = {}
    for name in values(path, "Service", "EnvironmentFile"):
        env.update(env_file(name.lstrip("-")))
    for assignment in values(path, "Service", "Environment"):
        name, _, value = assignment.partition("=")
        env[name] = value
    env = {k: v.replace("%i", instance) for k, v in env.items()}
    return shlex.split(line.replace("%i", instance)), env


def test_there_is_a_unit_per_tier():
    assert {p.name for p in UNITS} == {
        "netstack-balancer.service",
        "netstack-web@.service",
        "netstack-rpc.service",
        "netstack-chat.service",
    }


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_units_have_the_required_keys(path):
    parsed = unit(path)
    assert parsed["Unit"]["Description"]
    service = parsed["Service"]
    assert service["ExecStart"].startswith(f"{INSTALLED} ")
    assert service["User"] == "netstack"  # never root
    assert service["Group"] == "netstack"
    assert service["Restart"] == "on-failure"
    assert service["NoNewPrivileges"] == "yes"
    assert service["MemoryMax"]
    assert service["LimitNOFILE"]
    assert parsed["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_every_command_parses_with_its_environment(path):
    files = {"/etc/netstack/balancer.toml": SYSTEMD / "balancer.toml"}
    for instance in WEB_INSTANCES if "@" in path.name else ("",):
        argv, env = exec_start(path, instance)
        check_command(argv, env, files)


def test_balancer_backends_are_the_units_ports():
    doc = toml(SYSTEMD / "balancer.toml")
    web = doc["pools"]["web"]["backends"]
    template = SYSTEMD / "netstack-web@.service"
    ports = [bind_port(check_command(*exec_start(template, i))) for i in WEB_INSTANCES]
    assert [hostport(b["address"]) for b in web] == [("127.0.0.1", p) for p in ports]
    chat_argv, chat_env = exec_start(SYSTEMD / "netstack-chat.service")
    (chat,) = doc["pools"]["chat"]["backends"]
    assert hostport(chat["address"])[1] == bind_port(check_command(chat_argv, chat_env))
    for pool in doc["pools"].values():
        assert pool["health"]["check_path"] == "/healthz"
    # The web servers call the rpc unit where it listens.
    rpc_argv, rpc_env = exec_start(SYSTEMD / "netstack-rpc.service")
    _, web_env = exec_start(template, "1")
    assert hostport(web_env["NETSTACK_NOTES_RPC"])[1] == bind_port(check_command(rpc_argv, rpc_env))
    assert web_env["NETSTACK_NOTES_TOKEN"] == rpc_env["NETSTACK_TOKEN"]


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze not installed")
    # verify insists that ExecStart's binary exists: point it at this environment's.
    netstack = Path(sys.executable).with_name("netstack")
    assert netstack.is_file()
    for path in UNITS:
        text = path.read_text().replace(INSTALLED, str(netstack))
        (tmp_path / path.name).write_text(text)
    names = [str(tmp_path / p.name.replace("@.", f"@{WEB_INSTANCES[0]}.")) for p in UNITS]
    result = subprocess.run(
        [analyze, "verify", "--man=no", *names],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 4,
    )
    assert result.returncode == 0, result.stderr
    # Unknown keys and unparsable values are only warnings: fail on any about our units.
    ours = [line for line in result.stderr.splitlines() if "netstack" in line]
    assert not ours, "\n".join(ours)
