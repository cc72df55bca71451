"""Where a service keeps its SQLite database when no ``--db`` URL is given."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/netstack``, else ``~/.local/share/netstack`` (XDG base dirs)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "netstack"


def database_location(db: str | None, data_dir: str | None, filename: str) -> str:
    """``db`` (a URL or path) when given, else ``filename`` in ``data_dir`` (default:
    :func:`default_data_dir`)."""
    if db is not None:
        return db
    return str((Path(data_dir) if data_dir else default_data_dir()) / filename)
