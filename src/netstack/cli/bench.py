"""``netstack bench models``: compare the five concurrency models."""

from __future__ import annotations

import click


@click.group(name="bench")
def group() -> None:
    """Benchmarks people compare: tables and PNG plots."""
