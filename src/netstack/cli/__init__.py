"""Layer 3: the ``netstack`` click group, logging set-up and exit codes.

``main(argv)`` never raises: it returns 0 ok, 1 runtime failure, 2 usage or config error,
3 startup failure, printing one clear line on stderr for 1-3.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from netstack import __version__, log
from netstack.cli import exits
from netstack.cli.options import load_config
from netstack.config import LogConfig
from netstack.errors import ConfigError, NetstackError
from netstack.servers.procutil import die_with_parent_from_env


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="netstack")
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default=None,
    help="lowest level logged [default: info; env: NETSTACK_LOG_LEVEL]",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default=None,
    help="log line format [default: text; env: NETSTACK_LOG_FORMAT]",
)
def main_group(log_level: str | None, log_format: str | None) -> None:
    """netstack: networking toolkit and server suite.

    \b
    Examples:
      netstack echo serve --bind 127.0.0.1:9000
      netstack echo send --connect 127.0.0.1:9000 --count 1000 --size 64
      netstack bench models --quick
      netstack serve myapp:app --bind 127.0.0.1:8000 --workers 2
      netstack chat serve --bind 127.0.0.1:8700
      netstack rpc serve --bind 127.0.0.1:50051 --token s3cret
      netstack up --web-servers 2 --demo-load
    """
    cfg = load_config(LogConfig, {"log_level": log_level, "log_format": log_format})
    log.configure(cfg.log_level, cfg.log_format)


def _register() -> None:
    from netstack.cli import balance, bench, chat, echo, rpc, serve, up

    main_group.add_command(echo.group)
    main_group.add_command(bench.group)
    main_group.add_command(serve.command)
    main_group.add_command(chat.group)
    main_group.add_command(balance.balance)
    main_group.add_command(rpc.group)
    main_group.add_command(up.command)


_register()


def _fail(code: int, message: str) -> int:
    click.echo(f"netstack: error: {message}", err=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return an exit code (never raises, except KeyboardInterrupt)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not die_with_parent_from_env():
        return _fail(exits.RUNTIME_FAILURE, "the supervising process is gone")
    try:
        result = main_group.main(args, prog_name="netstack", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.exceptions.Abort:
        return _fail(exits.RUNTIME_FAILURE, "aborted")
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except ConfigError as exc:
        return _fail(exits.USAGE, str(exc))
    except exits.StartupFailure as exc:
        return _fail(exits.STARTUP_FAILURE, str(exc))
    except (exits.RuntimeFailure, NetstackError, OSError) as exc:
        if os.environ.get("NETSTACK_TRACEBACK"):
            raise
        return _fail(exits.RUNTIME_FAILURE, str(exc))
    except KeyboardInterrupt:
        return 130
    return result if isinstance(result, int) else exits.OK


__all__ = ["main", "main_group"]
