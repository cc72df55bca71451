"""Exit codes (shared/DESIGN.md): 0 ok, 1 runtime failure, 2 usage/config, 3 startup."""

from __future__ import annotations

from typing import Final

OK: Final = 0
RUNTIME_FAILURE: Final = 1
USAGE: Final = 2
STARTUP_FAILURE: Final = 3


class StartupFailure(Exception):
    """A command could not start (bind failed, port in use): exit 3 with one line."""


class RuntimeFailure(Exception):
    """A command started but failed (server unreachable, messages lost): exit 1."""
