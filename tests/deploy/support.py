"""Helpers for the deploy/ checks: YAML and TOML loading, and real CLI parsing.

Every ``netstack ...`` command line found in a unit, a compose file or a manifest is
parsed by the real click CLI (``make_context``, which parses without running), then its
settings are built into the command's real config object with the environment the
deployment gives it. A renamed flag, a bad address or an environment variable that no
setting reads fails a test.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import click
import yaml

import netstack.config as config
from netstack.cli import main_group
from netstack.config import (
    ChatServerConfig,
    LogConfig,
    RPCClientConfig,
    RPCServerConfig,
    WSGIServerConfig,
    build,
    specs,
)
from netstack.servers.lb import load_config as load_balancer_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
# Read by the bundled notes app (its factory builds NotesWebConfig), not by `netstack serve`.
WEB_APP_ENV = {"NETSTACK_NOTES_RPC", "NETSTACK_NOTES_TOKEN", "NETSTACK_SERVED_BY"}
WEB_APP = "netstack.servers.up.web:create_app"
CONFIGS: dict[tuple[str, ...], type[Any]] = {
    ("serve",): WSGIServerConfig,
    ("rpc", "serve"): RPCServerConfig,
    ("rpc", "call"): RPCClientConfig,
    ("chat", "serve"): ChatServerConfig,
}


def yaml_docs(path: Path) -> list[Any]:
    with path.open() as fh:
        docs = [d for d in yaml.safe_load_all(fh) if d is not None]
    assert docs, f"{path}: no YAML document"
    return docs


def toml(path: Path) -> dict[str, Any]:
    with path.open("rb") as fh:
        return tomllib.load(fh)


@dataclasses.dataclass
class Parsed:
    path: tuple[str, ...]  # ("rpc", "serve")
    params: dict[str, Any]  # the leaf command's parsed options and arguments


def parse(argv: Sequence[str]) -> Parsed:
    """Parse ``netstack ARGS...`` with the real CLI, without running the command.

    Raises:
        click.UsageError: an unknown command or flag, a missing value.
    """
    assert argv, "an empty command line"
    assert Path(argv[0]).name == "netstack", f"not a netstack command: {argv}"
    cmd: click.Command = main_group
    name, args, parent, path = "netstack", list(argv[1:]), None, []
    while True:
        ctx = cmd.make_context(name, args, parent=parent)
        if not isinstance(cmd, click.Group):
            return Parsed(tuple(path), dict(ctx.params))
        protected = getattr(ctx, "_protected_args", None)  # click >= 8.2 (protected_args before)
        rest = [*(ctx.protected_args if protected is None else protected), *ctx.args]
        sub_name, sub, args = cmd.resolve_command(ctx, rest)
        assert sub is not None, f"no command in {argv}"
        assert sub_name is not None
        cmd, name, parent = sub, sub_name, ctx
        path.append(sub_name)


def env_names(cls: type[Any]) -> set[str]:
    return {spec.env for spec in specs(cls)}


def check_command(
    argv: Sequence[str], env: Mapping[str, str], files: Mapping[str, Path] | None = None
) -> Parsed:
    """Parse ``argv`` and build its config from ``env`` (NETSTACK_* of the deployment).

    ``files`` maps paths the command names (``/etc/netstack/balancer.toml``) to the
    repository files deployed there.
    """
    parsed = parse(argv)
    netstack_env = {k: v for k, v in env.items() if k.startswith("NETSTACK_")}
    flags = {k: v for k, v in parsed.params.items() if k != "config_file"}
    known = env_names(LogConfig)
    if parsed.path == ("balance",):
        source = parsed.params["config_file"]
        assert source is not None, f"the balancer runs with --config: {argv}"
        repo_file = (files or {})[source]
        load_balancer_config(toml(repo_file), source=str(repo_file), env=netstack_env, flags=flags)
        known |= env_names(config.BalancerQuickConfig)
    else:
        cls = CONFIGS[parsed.path]
        build(cls, env=netstack_env, flags=flags)
        known |= env_names(cls)
        if parsed.path == ("serve",) and flags.get("app") == WEB_APP:
            known |= WEB_APP_ENV
            web_config = getattr(config, "NotesWebConfig", None)
            if web_config is not None:  # the notes app is merged: hold it to its settings
                assert env_names(web_config) >= WEB_APP_ENV
                build(web_config, env=netstack_env)
    unknown = set(netstack_env) - known
    assert not unknown, f"{argv[:3]}: no setting reads {sorted(unknown)}"
    return parsed


def hostport(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def bind_port(parsed: Parsed, flag: str = "bind") -> int:
    """The port of ``--bind`` (``--metrics-bind``...) as the command was given it."""
    value = parsed.params[flag]
    assert value is not None, f"{parsed.path}: --{flag.replace('_', '-')} is not given"
    return hostport(value.split(",")[0])[1]


def substitute(text: str, values: Mapping[str, str], pattern: str) -> str:
    """Replace ``${VAR}``/``${VAR:-x}``/``${VAR:?msg}`` (compose) or ``$(VAR)`` (k8s)."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in values, f"{name} is used but not defined"
        return values[name]

    return re.sub(pattern, one, text)


COMPOSE_VAR = r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?][^}]*)?\}"
K8S_VAR = r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)"
