"""Loading ``MODULE:APP``: import the module, find the callable, call a factory."""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from netstack.errors import ConfigError

WSGIApp = Callable[..., Any]


def load_app(spec: str, *, factory: bool = False, chdir: str | None = None) -> WSGIApp:
    """Import ``MODULE:APP`` (``APP`` may be dotted: ``pkg.mod:obj.app``).

    Args:
        factory: ``APP`` is called with no arguments and returns the application.
        chdir: change to this directory first; it is put first on ``sys.path``.

    Raises:
        ConfigError: naming ``app`` when the module or attribute cannot be found or the
            result is not callable. Errors raised while importing the module propagate:
            they are the application's, and their traceback is what a user needs.
    """
    if chdir is not None:
        try:
            os.chdir(chdir)
        except OSError as exc:
            raise ConfigError(f"chdir: cannot change to {chdir!r}: {exc}", field="chdir") from None
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"app: expected MODULE:APP, got {spec!r}", field="app")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(f"app: no module named {exc.name!r}", field="app") from None
        raise
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(
                f"app: module {module_name!r} has no attribute {attr!r}", field="app"
            ) from None
    if factory:
        if not callable(obj):
            raise ConfigError(f"app: factory {spec!r} is not callable", field="app")
        obj = obj()
    if not callable(obj):
        raise ConfigError(f"app: {spec!r} is not callable (a WSGI app is)", field="app")
    return obj  # type: ignore[no-any-return]  # a user object, checked callable above
