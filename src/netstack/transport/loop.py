"""The one place that chooses the event loop: uvloop when importable, asyncio otherwise.

Same idea as uvicorn's ``loops/auto.py``. Nothing else in netstack imports uvloop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

T = TypeVar("T")

LoopName = Literal["auto", "asyncio", "uvloop"]


def loop_factory(name: LoopName = "auto") -> Callable[[], asyncio.AbstractEventLoop]:
    """Return a factory for the named loop; ``auto`` prefers uvloop.

    Raises:
        ImportError: ``uvloop`` was asked for explicitly and is not installed.
    """
    if name in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if name == "uvloop":
                raise
        else:
            return uvloop.new_event_loop
    return asyncio.new_event_loop


def loop_name(loop: asyncio.AbstractEventLoop) -> str:
    """``"uvloop"`` or ``"asyncio"``, for logs and benchmark tables."""
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def run(main: Coroutine[Any, Any, T], *, loop: LoopName = "auto", debug: bool | None = None) -> T:
    """Run ``main`` to completion on the chosen loop (``asyncio.run`` with a factory)."""
    with asyncio.Runner(loop_factory=loop_factory(loop), debug=debug) as runner:
        return runner.run(main)
