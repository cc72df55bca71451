"""Compiled ``%(atom)s`` log formats, shared by the WSGI and the balancer access logs.

A format is compiled once against a table of atoms (name -> function of the record the
server passes): only the atoms it uses are computed per line, and a bad format (unknown
atom, ``%s`` without a name, ``%(s)d``) is a :class:`~netstack.errors.ConfigError` at
start-up rather than a broken line per request. ``{name}X`` atoms (gunicorn's ``{header}i``)
go to a ``special`` function for the kinds a server supports.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from netstack.errors import ConfigError

R = TypeVar("R")

_ATOM = re.compile(r"%\(([^)]*)\)")
_BARE = re.compile(r"%(?!\()")
_SPECIAL = re.compile(r"\{([^}]+)\}([a-z])")

_clock_second = -1
_clock_text = ""


def clf_time() -> str:
    """``[25/Nov/2026:13:05:01 +0000]``, formatted once per second."""
    global _clock_second, _clock_text
    now = int(time.time())
    if now != _clock_second:
        _clock_second = now
        _clock_text = time.strftime("[%d/%b/%Y:%H:%M:%S %z]", time.localtime(now))
    return _clock_text


class AtomFormat(Generic[R]):
    """``fmt`` compiled against ``atoms``.

    Args:
        fmt: the format, e.g. ``'%(h)s "%(r)s" %(s)s'``.
        atoms: atom name -> function of the record giving its text.
        special: for ``{name}X`` atoms: ``(name, X)`` -> function, or ``None`` for an
            unsupported kind ``X``.
        field: the setting named in errors.
        known: the list of atoms shown when one is unknown.

    Raises:
        ConfigError: an unknown atom, a conversion without an atom name, or a format
            ``%`` cannot apply.
    """

    def __init__(
        self,
        fmt: str,
        atoms: Mapping[str, Callable[[R], str]],
        special: Callable[[str, str], Callable[[R], str] | None] | None = None,
        *,
        field: str = "access_log_format",
        known: str = "",
    ) -> None:
        self.fmt = fmt
        getters: dict[str, Callable[[R], str]] = {}
        for atom in _ATOM.findall(fmt):
            match = _SPECIAL.fullmatch(atom)
            getter = special(match[1], match[2]) if match and special else atoms.get(atom)
            if getter is None:
                raise ConfigError(
                    f"{field}: unknown atom %({atom})s; known: {known or ' '.join(atoms)}",
                    field=field,
                )
            getters[atom] = getter
        if _BARE.search(fmt.replace("%%", "")):
            raise ConfigError(
                f"{field}: every conversion needs an atom, like %(s)s: {fmt!r}", field=field
            )
        try:
            fmt % dict.fromkeys(getters, "-")
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"{field}: {exc} in {fmt!r}", field=field) from None
        self.getters = tuple(getters.items())

    def format(self, record: R) -> str:
        return self.fmt % {atom: get(record) for atom, get in self.getters}


__all__ = ["AtomFormat", "clf_time"]
