"""Process plumbing shared by supervisors (``netstack serve``'s master, ``netstack up``)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

PARENT_ENV = "NETSTACK_DIE_WITH_PARENT"
"""Set by a supervisor to its pid: the child stops when that process dies (see
:func:`die_with_parent_from_env`)."""


def die_with_parent(sig: int = signal.SIGTERM) -> None:  # pragma: no cover - runs in a child
    """Linux: have the kernel send ``sig`` to this process when its parent dies, even by
    SIGKILL (``PR_SET_PDEATHSIG``). Elsewhere a no-op: callers that need it everywhere keep
    an orphan watch (``getppid()`` polling) as well.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, sig)


def die_with_parent_from_env() -> bool:
    """Honour :data:`PARENT_ENV` once, at a child's start; False when the parent is gone.

    The variable is removed so this process's own children do not inherit it. The parent
    may die between ``fork`` and ``prctl``: comparing ``getppid()`` with the pid the parent
    wrote closes that window.
    """
    value = os.environ.pop(PARENT_ENV, None)
    if value is None:
        return True
    die_with_parent()
    return str(os.getppid()) == value
