"""``netstack echo serve|send``: framed TCP/UDP echo and request/response client."""

from __future__ import annotations

import click


@click.group(name="echo")
def group() -> None:
    """Framed TCP/UDP echo server and request/response client."""
