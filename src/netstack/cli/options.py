"""Click options generated from config dataclass fields, and the config loader for commands.

One source of truth (shared/STYLE.md §4): every setting's flag, environment variable and
TOML key come from :func:`netstack.config.specs`. Flags default to ``None`` so that
:func:`netstack.config.build` can tell "not given" from "given", which keeps the
precedence defaults < TOML < environment < flags.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

import click

from netstack.config import FieldSpec, build, specs
from netstack.errors import ConfigError

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def _describe(spec: FieldSpec) -> str:
    default = spec.default
    if isinstance(default, tuple):
        default = ",".join(map(str, default)) or "none"
    elif default is None:
        default = "none"
    elif isinstance(default, bool):
        default = str(default).lower()
    return f"{spec.help} [default: {default}; env: {spec.env}]"


def _join_multiple(_ctx: click.Context, _param: click.Parameter, value: Any) -> str | None:
    """``--bind a --bind b,c`` -> ``"a,b,c"``; not given -> ``None`` (keeps precedence)."""
    if not value:
        return None
    return ",".join(value)


def config_options(cls: type[Any], *, exclude: Iterable[str] = ()) -> Callable[[F], F]:
    """Add ``--config FILE`` and one option per setting of ``cls`` to a click command."""
    skip = set(exclude)

    def decorate(func: F) -> F:
        for spec in reversed([s for s in specs(cls) if s.name not in skip]):
            if spec.is_bool:
                opt = click.option(
                    f"{spec.flag}/--no-{spec.flag[2:]}",
                    spec.name,
                    default=None,
                    help=_describe(spec),
                )
            elif spec.is_tuple:
                # Repeatable, and each value may itself be a comma-separated list.
                opt = click.option(
                    spec.flag,
                    spec.name,
                    multiple=True,
                    default=None,
                    metavar=spec.name.split("_")[-1].upper(),
                    callback=_join_multiple,
                    help=_describe(spec) + " (repeatable)",
                )
            else:
                metavar = (
                    "|".join(spec.choices) if spec.choices else spec.name.split("_")[-1].upper()
                )
                opt = click.option(
                    spec.flag, spec.name, default=None, metavar=metavar, help=_describe(spec)
                )
            func = opt(func)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False),
            default=None,
            help="TOML file with settings (keys as the flags, with underscores).",
        )(func)

    return decorate


def read_toml(path: str | None) -> dict[str, Any]:
    """Parse a TOML settings file.

    Raises:
        ConfigError: the file is missing, unreadable or not valid TOML.
    """
    if path is None:
        return {}
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path}: {exc.strerror}", field="config") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}", field="config") from exc


def load_config(
    cls: type[T],
    flags: Mapping[str, Any],
    *,
    config_file: str | None = None,
    env: Mapping[str, str] | None = None,
) -> T:
    """Build ``cls`` from defaults < ``config_file`` < environment < ``flags``."""
    return build(
        cls,
        toml=read_toml(config_file),
        env=os.environ if env is None else env,
        flags=flags,
    )


def check_prometheus() -> None:
    """``--metrics-bind`` needs the ``metrics`` extra: a usage error without it.

    Raises:
        ConfigError: prometheus_client cannot be imported.
    """
    try:
        import prometheus_client  # noqa: F401  # the `metrics` extra
    except ImportError:
        raise ConfigError(
            "metrics_bind: needs prometheus-client (pip install 'netstack[metrics]')",
            field="metrics_bind",
        ) from None
