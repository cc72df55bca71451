"""Building the WSGI ``environ`` (PEP 3333) from a parsed request."""

from __future__ import annotations

import sys
from typing import Any
from urllib.parse import unquote_to_bytes

from netstack.proto.http11 import Request

# b"user-agent" -> "HTTP_USER_AGENT"; bounded, names come from clients.
_KEYS: dict[bytes, str | None] = {}
_MAX_KEYS = 512
_SPECIAL_KEYS = {b"content-type": "CONTENT_TYPE", b"content-length": "CONTENT_LENGTH"}


def _key(name: bytes) -> str | None:
    key = _KEYS.get(name)
    if key is None and name not in _KEYS:
        if b"_" in name:
            # gunicorn 22+ and nginx drop these: "X_Forwarded_For" must not be able to pose
            # as "X-Forwarded-For" once both become HTTP_X_FORWARDED_FOR.
            key = None
        else:
            key = _SPECIAL_KEYS.get(name) or "HTTP_" + name.decode("latin-1").upper().replace(
                "-", "_"
            )
        if len(_KEYS) < _MAX_KEYS:
            _KEYS[name] = key
    return key


def base_environ(
    *,
    server_name: str,
    server_port: str,
    script_name: str,
    multithread: bool,
    multiprocess: bool,
    url_scheme: str,
) -> dict[str, Any]:
    """The keys that are the same for every request on one listener."""
    return {
        "SERVER_NAME": server_name,
        "SERVER_PORT": server_port,
        "SCRIPT_NAME": script_name,
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": url_scheme,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": multithread,
        "wsgi.multiprocess": multiprocess,
        "wsgi.run_once": False,
        "wsgi.input_terminated": True,
        "QUERY_STRING": "",
    }


_METHODS: dict[bytes, str] = {}
# request-target -> (RAW_URI, PATH_INFO, QUERY_STRING) when there is no SCRIPT_NAME to
# strip; bounded (emptied when full), short targets only.
_TARGETS: dict[bytes, tuple[str, str, str]] = {}
_TARGETS_SIZE = 1024
_TARGET_MAX = 256


def _parse_target(target: bytes, script_name: str) -> tuple[str, str, str]:
    """(RAW_URI, PATH_INFO, QUERY_STRING) of a request-target."""
    raw = target.decode("latin-1")
    path, _, query = raw.partition("?")
    if path[:1] != "/" and path != "*":
        # absolute-form (RFC 9112 §3.2.2): http://host/path -> /path
        scheme_end = path.find("://")
        if scheme_end != -1:
            slash = path.find("/", scheme_end + 3)
            path = path[slash:] if slash != -1 else "/"
    path_info = unquote_to_bytes(path).decode("latin-1") if "%" in path else path
    if script_name and (path_info == script_name or path_info.startswith(script_name + "/")):
        path_info = path_info[len(script_name) :]
    return raw, path_info, query


_PROTOCOLS = {b"1.1": "HTTP/1.1", b"1.0": "HTTP/1.0"}


def build_environ(base: dict[str, Any], request: Request, script_name: str) -> dict[str, Any]:
    """A fresh environ for ``request`` from the connection's ``base``; the caller adds
    ``wsgi.input``.

    PATH_INFO is percent-decoded and then decoded as latin-1, as PEP 3333 asks, so every
    byte survives (frameworks re-encode it to latin-1 and decode it as UTF-8).
    """
    environ = base.copy()
    target = request.target
    parsed = None if script_name else _TARGETS.get(target)
    if parsed is None:
        parsed = _parse_target(target, script_name)
        if not script_name and len(target) <= _TARGET_MAX:
            if len(_TARGETS) >= _TARGETS_SIZE:
                _TARGETS.clear()
            _TARGETS[target] = parsed
    raw, path_info, query = parsed
    method = _METHODS.get(request.method)
    if method is None:
        method = request.method.decode("latin-1")
        if len(_METHODS) < 64:
            _METHODS[request.method] = method
    environ["REQUEST_METHOD"] = method
    environ["PATH_INFO"] = path_info
    if query:
        environ["QUERY_STRING"] = query
    environ["RAW_URI"] = raw
    environ["SERVER_PROTOCOL"] = _PROTOCOLS[request.http_version]
    for name, value in request.headers:
        key = _KEYS.get(name) or _key(name)
        if key is None:
            continue
        if key in environ:
            if key.startswith("HTTP_"):
                separator = "; " if key == "HTTP_COOKIE" else ", "
                environ[key] = environ[key] + separator + value.decode("latin-1")
            continue
        environ[key] = value.decode("latin-1")
    return environ
