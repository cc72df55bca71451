"""The full TOML form of ``netstack balance``: frontends, named pools, routes.

The dataclasses live in :mod:`netstack.config` (one source of truth for every key); this
module only walks the nested document, converts each value with the same field specs the
flags use, and turns every error into ``FILE: dotted.key: reason``::

    [limits]                      # BalancerLimits (also [timeouts], [health]: pool defaults)
    max_connections = 20000

    [frontends.web]
    listen = "0.0.0.0:8080"
    mode = "http"                 # tcp | udp | http
    pool = "app"                  # where traffic no route matches goes
    tls = { certfile = "site.pem", keyfile = "site.key" }   # optional: terminate TLS
    [[frontends.web.routes]]
    path_prefix = "/api"
    pool = "api"

    [pools.app]
    algorithm = "least_connections"
    backends = ["10.0.0.1:8000", { address = "10.0.0.2:8000", weight = 2 }]
    [pools.app.health]            # overrides [health] for this pool
    rise = 3

A document without ``frontends`` and ``pools`` is the quick form's flat settings
(``listen``, ``backend``, ``algorithm``...). In the full form, flags and ``NETSTACK_*``
variables set the top-level ``[limits]``/``[timeouts]``/``[health]`` defaults; a pool's own
table still wins, being more specific.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

from netstack.config import (
    BackendConfig,
    BalancerConfig,
    BalancerQuickConfig,
    BalancerTimeouts,
    FieldSpec,
    FrontendConfig,
    FrontendTLS,
    HealthConfig,
    HTTPFrontendOptions,
    PoolConfig,
    RouteConfig,
    build,
    convert,
    specs,
)
from netstack.errors import ConfigError

T = TypeVar("T")

GROUPS = ("limits", "timeouts", "health", "admin")
QUICK_ONLY = (
    "listen",
    "backend",
    "mode",
    "algorithm",
    "hash_key",
    "send_proxy",
    "accept_proxy",
    "proxy_allow_ips",
    "sticky_cookie",
    *(f.name for f in dataclasses.fields(HTTPFrontendOptions) if f.name != "access_log"),
    *(f.name for f in dataclasses.fields(FrontendTLS)),
)


def is_full_form(doc: Mapping[str, object]) -> bool:
    """Whether ``doc`` uses frontends/pools (else it is the quick form's flat keys)."""
    return "frontends" in doc or "pools" in doc


def _build_quick(
    doc: Mapping[str, object],
    source: str,
    env: Mapping[str, str] | None,
    flags: Mapping[str, object],
) -> BalancerQuickConfig:
    """File < env < flags; an error about a key the file sets names the file.

    Built in one go, not the file first on its own: a check across settings (the admin API
    needs a token) may be satisfied by a variable (``NETSTACK_ADMIN_TOKEN``) the file
    rightly leaves out.
    """
    try:
        return build(BalancerQuickConfig, toml=doc, env=env, flags=flags)
    except ConfigError as exc:
        if exc.field is not None and _sets(doc, exc.field) and flags.get(exc.field) is None:
            raise ConfigError(f"{source}: {exc}", field=exc.field) from None
        raise


def _sets(doc: Mapping[str, object], key: str) -> bool:
    """Whether the file sets ``key``, at the top or in one of its groups' tables."""
    if key in doc:
        return True
    return any(isinstance(table, Mapping) and key in table for table in doc.values())


def load(
    doc: Mapping[str, object],
    *,
    source: str = "config file",
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> BalancerConfig:
    """Build the :class:`BalancerConfig` from a parsed TOML document, env and flags.

    Args:
        doc: the parsed file (``{}`` when there is none).
        source: the file name, for error messages.
        env: environment (``NETSTACK_*`` keys).
        flags: setting name -> command-line value (``None``: not given).

    Raises:
        ConfigError: ``FILE: key.path: reason`` for a bad file; ``name: reason`` for a bad
            flag or variable.
    """
    flags = dict(flags or {})
    if not is_full_form(doc):
        return _build_quick(doc, source, env, flags).to_balancer()

    given = [name for name in QUICK_ONLY if flags.get(name) is not None]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise ConfigError(
            f"{flag}: {source} defines frontends and pools; use one or the other", field=given[0]
        )
    extra = set(doc) - {"frontends", "pools", *GROUPS}
    if extra:
        key = sorted(extra)[0]
        raise ConfigError(
            f"{source}: {key}: unknown key "
            "(expected frontends, pools, limits, timeouts, health, admin)",
            field=key,
        )
    top = {g: doc[g] for g in GROUPS if g in doc}
    base = _build_quick(top, source, env, flags)

    pools = tuple(
        _pool(name, table, base, source)
        for name, table in _tables(doc.get("pools", {}), "pools", source).items()
    )
    frontends = tuple(
        _frontend(name, table, source)
        for name, table in _tables(doc.get("frontends", {}), "frontends", source).items()
    )
    # --no-access-log (or NETSTACK_ACCESS_LOG): every frontend, over the file.
    if flags.get("access_log") is not None or "NETSTACK_ACCESS_LOG" in (env or {}):
        frontends = tuple(dataclasses.replace(fe, access_log=base.access_log) for fe in frontends)
    known = ", ".join(p.name for p in pools)
    for fe in frontends:
        targets = [(f"frontends.{fe.name}.pool", fe.pool)]
        targets += [
            (f"frontends.{fe.name}.routes[{i}].pool", r.pool) for i, r in enumerate(fe.routes)
        ]
        for where, target in targets:
            if target not in {p.name for p in pools}:
                raise ConfigError(
                    f"{source}: {where}: unknown pool {target!r} (pools: {known})", field="pool"
                )
    try:
        return BalancerConfig(
            frontends=frontends,
            pools=pools,
            limits=base.limits,
            timeouts=base.timeouts,
            admin=base.admin,
        )
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}", field=exc.field) from None


def _tables(raw: object, path: str, source: str) -> dict[str, Mapping[str, object]]:
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(f"{source}: {path}: expected one or more [{path}.NAME] tables")
    for name, table in raw.items():
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: {path}.{name}: expected a table", field=name)
    return dict(raw)


def _fields(
    cls: type[Any],
    table: Mapping[str, object],
    path: str,
    source: str,
    *,
    nested: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Convert the scalar keys of ``table`` with ``cls``'s field specs."""
    known = {s.name: s for s in specs(cls) if s.group is None}
    out: dict[str, Any] = {}
    for key, raw in table.items():
        if key in nested:
            continue
        spec: FieldSpec | None = known.get(key)
        if spec is None or spec.name in ("name",):
            choices = ", ".join(k for k in (*known, *nested) if k != "name")
            raise ConfigError(
                f"{source}: {path}.{key}: unknown key (expected one of: {choices})", field=key
            )
        try:
            out[key] = convert(spec, raw, source=source)
        except ConfigError as exc:
            reason = str(exc).removeprefix(f"{key}: ").removesuffix(f" (from {source})")
            raise ConfigError(f"{source}: {path}.{key}: {reason}", field=key) from None
    return out


def _make(cls: type[T], kwargs: Mapping[str, Any], path: str, source: str) -> T:
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {path}.{exc.field}: {exc}", field=exc.field) from None


def _group(
    cls: type[T], base: T, raw: object, path: str, source: str
) -> T:  # a pool's [pools.X.health] / [pools.X.timeouts] over the top-level defaults
    if raw is None:
        return base
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: {path}: expected a table")
    kwargs = {
        f.name: getattr(base, f.name)
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]  # a dataclass type
    }
    kwargs.update(_fields(cls, raw, path, source))
    return _make(cls, kwargs, path, source)


def _pool(
    name: str, table: Mapping[str, object], base: BalancerQuickConfig, source: str
) -> PoolConfig:
    path = f"pools.{name}"
    kwargs = _fields(PoolConfig, table, path, source, nested=("backends", "health", "timeouts"))
    raw_backends = table.get("backends")
    if not isinstance(raw_backends, list) or not raw_backends:
        raise ConfigError(
            f"{source}: {path}.backends: expected a list of HOST:PORT strings or tables",
            field="backends",
        )
    backends = []
    for i, item in enumerate(raw_backends):
        where = f"{path}.backends[{i}]"
        if isinstance(item, str):
            item = {"address": item}
        if not isinstance(item, Mapping):
            raise ConfigError(f"{source}: {where}: expected HOST:PORT or a table", field="backends")
        fields = _fields(BackendConfig, item, where, source, nested=("name",))
        if "name" in item:
            if not isinstance(item["name"], str):
                raise ConfigError(f"{source}: {where}.name: expected a string", field="name")
            fields["name"] = item["name"]
        if "address" not in fields:
            raise ConfigError(f"{source}: {where}.address: missing", field="address")
        backends.append(_make(BackendConfig, fields, where, source))
    kwargs["backends"] = tuple(backends)
    kwargs["health"] = _group(
        HealthConfig, base.health, table.get("health"), f"{path}.health", source
    )
    kwargs["timeouts"] = _group(
        BalancerTimeouts, base.timeouts, table.get("timeouts"), f"{path}.timeouts", source
    )
    return _make(PoolConfig, {**kwargs, "name": name}, path, source)


def _frontend(name: str, table: Mapping[str, object], source: str) -> FrontendConfig:
    path = f"frontends.{name}"
    kwargs = _fields(FrontendConfig, table, path, source, nested=("routes", "tls"))
    kwargs["tls"] = _group(FrontendTLS, FrontendTLS(), table.get("tls"), f"{path}.tls", source)
    raw_routes = table.get("routes", [])
    if not isinstance(raw_routes, list):
        raise ConfigError(f"{source}: {path}.routes: expected [[{path}.routes]] tables")
    routes = []
    for i, item in enumerate(raw_routes):
        where = f"{path}.routes[{i}]"
        if not isinstance(item, Mapping):
            raise ConfigError(f"{source}: {where}: expected a table", field="routes")
        fields = _fields(RouteConfig, item, where, source)
        if "pool" not in fields:
            raise ConfigError(f"{source}: {where}.pool: missing", field="pool")
        routes.append(_make(RouteConfig, fields, where, source))
    kwargs["routes"] = tuple(routes)
    return _make(FrontendConfig, {**kwargs, "name": name}, path, source)


__all__ = ["is_full_form", "load"]
