"""The balancer's admin HTTP API, served by netstack's own WSGI server on its own port.

The app runs inline on the balancer's event loop (``--threads 0``): every call is a few
dictionary operations on the live :class:`~netstack.servers.lb.Balancer`, so there is no
thread and no lock. Routes::

    GET    /healthz                                   200 "ok" (no token)
    GET    /metrics                                   Prometheus text (no token)
    GET    /api/backends                              pools -> backends with state/stats
    POST   /api/pools/POOL/backends                   {"address": "H:P", "weight"?, "name"?}
    DELETE /api/pools/POOL/backends/NAME              remove (established relays finish)
    POST   /api/pools/POOL/backends/NAME/drain        no new connections, old ones finish
    POST   /api/pools/POOL/backends/NAME/disable      no new connections, relays closed
    POST   /api/pools/POOL/backends/NAME/enable
    POST   /api/reload                                re-read the config (as SIGHUP)

``/api/*`` needs ``Authorization: Bearer TOKEN`` (compared in constant time); errors are
JSON ``{"error": ...}`` with 400, 401, 404, 405 or 409.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from netstack.config import AdminConfig, BackendConfig, WSGIServerConfig
from netstack.errors import ConfigError
from netstack.proto.balance import Admin
from netstack.servers.lb.server import Balancer
from netstack.servers.wsgi import WSGIServer

logger = logging.getLogger(__name__)

StartResponse = Callable[..., Any]
ACTIONS = {"drain": Admin.DRAINING, "disable": Admin.DISABLED, "enable": Admin.ENABLED}
MAX_BODY = 64 * 1024


class AdminApp:
    """The WSGI application of the admin API.

    Args:
        balancer: the running balancer.
        token: the bearer token /api/* requires.
        reload: re-reads the configuration (the CLI's SIGHUP handler), or ``None``.
    """

    def __init__(
        self,
        balancer: Balancer,
        token: str,
        reload: Callable[[], Coroutine[Any, Any, None]] | None = None,
    ) -> None:
        self.balancer = balancer
        self.token = token.encode()
        self.reload = reload
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        parts = [p for p in environ.get("PATH_INFO", "").split("/") if p]
        try:
            status, body = self._route(method, parts, environ)
        except _Error as exc:
            status, body = exc.status, {"error": exc.message}
        if isinstance(body, str):
            data = body.encode()
            kind = "text/plain; version=0.0.4; charset=utf-8"
        else:
            data = json.dumps(body, indent=1).encode() + b"\n"
            kind = "application/json"
        headers = [("Content-Type", kind), ("Content-Length", str(len(data)))]
        if status.startswith("401"):
            headers.append(("WWW-Authenticate", 'Bearer realm="netstack-admin"'))
        start_response(status, headers)
        return [data]

    # ------------------------------------------------------------------ routing

    def _route(self, method: str, parts: list[str], environ: dict[str, Any]) -> tuple[str, Any]:
        if parts == ["healthz"]:
            return "200 OK", "ok\n"
        if parts == ["metrics"]:
            _allow(method, "GET")
            return "200 OK", self.balancer.metrics()
        if not parts or parts[0] != "api":
            raise _Error("404 Not Found", "no such endpoint")
        self._authorize(environ)
        rest = parts[1:]
        if rest == ["backends"]:
            _allow(method, "GET")
            return "200 OK", self.balancer.snapshot()
        if rest == ["reload"]:
            _allow(method, "POST")
            return self._reload()
        if len(rest) >= 3 and rest[0] == "pools" and rest[2] == "backends":
            pool = rest[1]
            if pool not in self.balancer.pools:
                raise _Error("404 Not Found", f"no pool {pool!r}")
            if len(rest) == 3:
                _allow(method, "POST")
                return self._add(pool, environ)
            name = rest[3]
            if len(rest) == 4:
                _allow(method, "DELETE")
                return self._remove(pool, name)
            if len(rest) == 5 and rest[4] in ACTIONS:
                _allow(method, "POST")
                return self._set_admin(pool, name, ACTIONS[rest[4]])
        raise _Error("404 Not Found", "no such endpoint")

    def _authorize(self, environ: dict[str, Any]) -> None:
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode("latin-1"), self.token
        ):
            raise _Error("401 Unauthorized", "missing or wrong bearer token")

    # ------------------------------------------------------------------ actions

    def _set_admin(self, pool: str, name: str, admin: Admin) -> tuple[str, Any]:
        try:
            self.balancer.set_admin(pool, name, admin)
        except KeyError:
            raise _Error("404 Not Found", f"no backend {name!r} in pool {pool!r}") from None
        logger.info("admin API: %s/%s -> %s", pool, name, admin.value)
        return "200 OK", {"pool": pool, "backend": name, "admin": admin.value}

    def _add(self, pool: str, environ: dict[str, Any]) -> tuple[str, Any]:
        doc = _json_body(environ)
        try:
            cfg = BackendConfig(
                address=str(doc["address"]),
                weight=int(doc.get("weight", 1)),
                name=str(doc.get("name", "")),
            )
        except KeyError:
            raise _Error("400 Bad Request", "a backend needs an address") from None
        except (ConfigError, TypeError, ValueError) as exc:
            raise _Error("400 Bad Request", str(exc)) from None
        try:
            backend = self.balancer.add_backend(pool, cfg)
        except ValueError as exc:
            raise _Error("409 Conflict", str(exc)) from None
        return "201 Created", {"pool": pool, "backend": backend.name, "address": cfg.address}

    def _remove(self, pool: str, name: str) -> tuple[str, Any]:
        try:
            self.balancer.remove_backend(pool, name)
        except KeyError:
            raise _Error("404 Not Found", f"no backend {name!r} in pool {pool!r}") from None
        except ValueError as exc:
            raise _Error("409 Conflict", str(exc)) from None
        return "200 OK", {"pool": pool, "removed": name}

    def _reload(self) -> tuple[str, Any]:
        if self.reload is None:
            raise _Error("409 Conflict", "this balancer has no configuration to reload")
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return "202 Accepted", {"reload": "started"}


class _Error(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _Error("405 Method Not Allowed", f"use {allowed}")


def _json_body(environ: dict[str, Any]) -> dict[str, Any]:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise _Error("400 Bad Request", "bad Content-Length") from None
    if length > MAX_BODY:
        raise _Error("400 Bad Request", "body too large")
    raw = environ["wsgi.input"].read(length) if length else b""
    try:
        doc = json.loads(raw or b"{}")
    except ValueError:
        raise _Error("400 Bad Request", "the body is not JSON") from None
    if not isinstance(doc, dict):
        raise _Error("400 Bad Request", "the body must be a JSON object")
    return doc


def admin_server(
    balancer: Balancer,
    cfg: AdminConfig,
    reload: Callable[[], Coroutine[Any, Any, None]] | None = None,
) -> WSGIServer:
    """An unstarted WSGIServer for the admin API on ``cfg.admin_bind``.

    Raises:
        ConfigError: the admin API is not configured.
    """
    if cfg.admin_bind is None or cfg.admin_token is None:
        raise ConfigError("admin_bind: the admin API is off", field="admin_bind")
    server_cfg = WSGIServerConfig(
        app="netstack.servers.lb.admin", bind=(cfg.admin_bind,), threads=0, access_log=False
    )
    return WSGIServer(server_cfg, AdminApp(balancer, cfg.admin_token, reload))
