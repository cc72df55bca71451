"""Frozen configuration dataclasses and the one loader that fills them.

Every setting is a field of a frozen dataclass with a ``help`` in its metadata. From those
fields, and nothing else, come the CLI flags (``--max-frame-bytes``), the environment
variables (``NETSTACK_MAX_FRAME_BYTES``) and the TOML keys (``max_frame_bytes``, at the top
level or inside a table named after its group, e.g. ``[limits]``). Precedence is
defaults < TOML < environment < flags, applied by :func:`build`.

Groups (``Limits``, ``Timeouts``, ``TLS``) compose into one config per product. A config is
validated once, in ``__post_init__``, and never changes. Servers take it as a parameter
and never read the environment themselves.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from netstack.errors import ConfigError

ENV_PREFIX = "NETSTACK_"

T = TypeVar("T")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


# --------------------------------------------------------------------------- groups


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Sizes and counts a peer may not exceed."""

    # Same default as websockets' max_size: large enough for real messages, small enough
    # that a hostile length prefix cannot make us allocate gigabytes.
    max_frame_bytes: int = field(
        default=1 << 20, metadata=_help("largest length-prefixed frame body accepted")
    )
    # nginx's large_client_header_buffers is 8 KiB per line; chat lines carry JSON, so 64 KiB.
    max_line_bytes: int = field(
        default=64 * 1024, metadata=_help("longest line frame accepted, terminator excluded")
    )
    # 65507 is the largest UDP payload over IPv4 (65535 - 8 UDP - 20 IP header bytes).
    max_datagram_bytes: int = field(
        default=65507, metadata=_help("largest UDP datagram sent or accepted")
    )
    # gunicorn's worker_connections default is 1000; same order of magnitude.
    max_connections: int = field(
        default=1024, metadata=_help("concurrent connections; more are refused")
    )
    # Write-buffer water marks: asyncio's default high mark is 64 KiB.
    write_buffer_high_bytes: int = field(
        default=64 * 1024, metadata=_help("pause reading when this many bytes are unsent")
    )
    write_buffer_low_bytes: int = field(
        default=16 * 1024, metadata=_help("resume reading when unsent bytes fall below this")
    )

    def __post_init__(self) -> None:
        for name in (
            "max_frame_bytes",
            "max_line_bytes",
            "max_datagram_bytes",
            "max_connections",
            "write_buffer_high_bytes",
        ):
            _positive(name, getattr(self, name))
        if self.max_datagram_bytes > 65507:
            raise ConfigError(
                "max_datagram_bytes must be <= 65507 (largest UDP payload)",
                field="max_datagram_bytes",
            )
        if not 0 <= self.write_buffer_low_bytes <= self.write_buffer_high_bytes:
            raise ConfigError(
                "write_buffer_low_bytes must be between 0 and write_buffer_high_bytes",
                field="write_buffer_low_bytes",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    """Seconds; ``None`` disables a timeout."""

    # A half-sent frame followed by silence must not hold a slot forever; 60 s is nginx's
    # client_body_timeout. Checked by a tick timer (transport/stream.py IDLE_TICKS): a silent
    # connection closes after between 1 and 1.25 times this, never earlier.
    idle_timeout: float | None = field(
        default=60.0, metadata=_help("close a connection silent this long (none: never)")
    )
    connect_timeout: float = field(default=5.0, metadata=_help("TCP connect timeout"))
    # UDP has no connection: a lost datagram is only noticed by this timeout.
    request_timeout: float = field(
        default=1.0, metadata=_help("wait this long for a reply before retrying")
    )
    # uvicorn's timeout_graceful_shutdown is unset by default; gunicorn's is 30 s.
    graceful_timeout: float = field(
        default=10.0, metadata=_help("on shutdown, wait this long for connections to finish")
    )

    def __post_init__(self) -> None:
        if self.idle_timeout is not None:
            _positive("idle_timeout", self.idle_timeout)
        _positive("connect_timeout", self.connect_timeout)
        _positive("request_timeout", self.request_timeout)
        _non_negative("graceful_timeout", self.graceful_timeout)


@dataclass(frozen=True, slots=True, kw_only=True)
class TLS:
    """TLS files. A server needs certfile and keyfile; a client may give cafile."""

    certfile: str | None = field(default=None, metadata=_help("PEM certificate chain"))
    keyfile: str | None = field(default=None, metadata=_help("PEM private key"))
    cafile: str | None = field(
        default=None, metadata=_help("client: PEM CA bundle to verify the server with")
    )

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError(
                "certfile and keyfile must be given together",
                field="keyfile" if self.keyfile is None else "certfile",
            )

    @property
    def enabled(self) -> bool:
        return self.certfile is not None or self.cafile is not None


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """Logging, configured by the CLI only."""

    log_level: Literal["debug", "info", "warning", "error"] = field(
        default="info", metadata=_help("lowest level logged")
    )
    log_format: Literal["text", "json"] = field(
        default="text", metadata=_help("text for people, json for log shippers")
    )


# --------------------------------------------------------------------------- products

Proto = Literal["tcp", "udp"]
Framing = Literal["length", "line"]


@dataclass(frozen=True, slots=True, kw_only=True)
class EchoServerConfig:
    """``netstack echo serve``."""

    proto: Proto = field(default="tcp", metadata=_help("transport"))
    bind: str = field(default="127.0.0.1:9000", metadata=_help("HOST:PORT or [IPv6]:PORT"))
    framing: Framing = field(default="length", metadata=_help("TCP frame format"))
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    tls: TLS = field(default_factory=TLS)

    def __post_init__(self) -> None:
        parse_hostport(self.bind, field="bind")
        if self.proto == "udp" and self.tls.enabled:
            raise ConfigError("certfile: TLS is not available over UDP", field="certfile")
        if self.tls.enabled and self.tls.certfile is None:
            raise ConfigError("a TLS server needs certfile and keyfile", field="certfile")


@dataclass(frozen=True, slots=True, kw_only=True)
class EchoClientConfig:
    """``netstack echo send``."""

    proto: Proto = field(default="tcp", metadata=_help("transport"))
    connect: str = field(default="127.0.0.1:9000", metadata=_help("server HOST:PORT"))
    framing: Framing = field(default="length", metadata=_help("TCP frame format"))
    count: int = field(default=1000, metadata=_help("messages to send"))
    size: int = field(default=64, metadata=_help("bytes per message"))
    # One connection measures latency; more measure throughput (one message in flight each).
    concurrency: int = field(
        default=1, metadata=_help("parallel connections (UDP: requests in flight)")
    )
    # Jittered exponential backoff, as AWS's "Exponential Backoff and Jitter" advises.
    retries: int = field(
        default=5, metadata=_help("reconnects (TCP) or resends (UDP) before giving up")
    )
    backoff_initial: float = field(default=0.1, metadata=_help("first retry delay, seconds"))
    backoff_max: float = field(default=5.0, metadata=_help("longest retry delay, seconds"))
    limits: Limits = field(default_factory=Limits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    tls: TLS = field(default_factory=TLS)

    def __post_init__(self) -> None:
        parse_hostport(self.connect, field="connect")
        _positive("count", self.count)
        _positive("size", self.size)
        _positive("concurrency", self.concurrency)
        _non_negative("retries", self.retries)
        _positive("backoff_initial", self.backoff_initial)
        if self.backoff_max < self.backoff_initial:
            raise ConfigError("backoff_max must be >= backoff_initial", field="backoff_max")
        if (
            self.framing == "line"
            and self.proto == "tcp"
            and self.size > self.limits.max_line_bytes
        ):
            raise ConfigError("size exceeds max_line_bytes", field="size")
        if (
            self.proto == "tcp"
            and self.framing == "length"
            and self.size > self.limits.max_frame_bytes
        ):
            raise ConfigError("size exceeds max_frame_bytes", field="size")
        if self.proto == "udp" and self.size + 4 > self.limits.max_datagram_bytes:
            raise ConfigError("size + 4-byte request id exceeds max_datagram_bytes", field="size")


# --------------------------------------------------------------------------- HTTP / WSGI


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPLimits:
    """What an HTTP/1.1 peer may send; each limit has its own status (RFC 9110 §15.5)."""

    # Apache's LimitRequestLine is 8190; gunicorn's limit_request_line is 4094. -> 414
    max_request_line_bytes: int = field(
        default=8190, metadata=_help("longest request line (method, target, version); 414")
    )
    # h11's default is 16 KiB (node.js 16 KiB since 2018, tomcat 8 KiB). -> 431
    max_header_bytes: int = field(
        default=16 * 1024, metadata=_help("request line plus all header lines; 431")
    )
    # gunicorn's limit_request_fields is 100. -> 431
    max_header_count: int = field(default=100, metadata=_help("header lines per request; 431"))
    # nginx's client_max_body_size is 1 MiB; uploads need it raised on purpose. -> 413
    max_body_bytes: int | None = field(
        default=1 << 20, metadata=_help("request body size (none: unlimited); 413")
    )

    def __post_init__(self) -> None:
        for name in ("max_request_line_bytes", "max_header_bytes", "max_header_count"):
            _positive(name, getattr(self, name))
        if self.max_body_bytes is not None:
            _non_negative("max_body_bytes", self.max_body_bytes)
        if self.max_request_line_bytes > self.max_header_bytes:
            raise ConfigError(
                "max_request_line_bytes must be <= max_header_bytes",
                field="max_request_line_bytes",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPTimeouts:
    """HTTP connection timers, in seconds; ``None`` disables one."""

    # nginx's client_header_timeout is 60 s; slowloris defence wants far less. -> 408
    header_timeout: float | None = field(
        default=10.0, metadata=_help("a request head must arrive within this; 408 then close")
    )
    # uvicorn's timeout_keep_alive is 5 s, gunicorn's keepalive 2 s.
    keepalive_timeout: float | None = field(
        default=5.0, metadata=_help("close a keep-alive connection idle this long")
    )
    # A body that stalls (no byte for this long) or a client that stops reading our response.
    # nginx's client_body_timeout and send_timeout are both 60 s.
    body_timeout: float | None = field(
        default=30.0, metadata=_help("close when a request body stalls this long")
    )
    write_timeout: float | None = field(
        default=30.0, metadata=_help("close when the client reads nothing of a response this long")
    )

    def __post_init__(self) -> None:
        for name in ("header_timeout", "keepalive_timeout", "body_timeout", "write_timeout"):
            value = getattr(self, name)
            if value is not None:
                _positive(name, value)


HTTPParserName = Literal["httptools", "h11"]

# gunicorn's default access log format (its "%(X)s" atoms are what this format uses).
DEFAULT_ACCESS_LOG_FORMAT = '%(h)s %(l)s %(u)s %(t)s "%(r)s" %(s)s %(b)s "%(f)s" "%(a)s"'


@dataclass(frozen=True, slots=True, kw_only=True)
class WSGIServerConfig:
    """``netstack serve MODULE:APP``."""

    app: str = field(default="", metadata=_help("MODULE:APP, the WSGI application"))
    factory: bool = field(
        default=False, metadata=_help("APP is a factory: call it with no arguments")
    )
    chdir: str | None = field(default=None, metadata=_help("change to this directory first"))
    root_path: str = field(default="", metadata=_help("SCRIPT_NAME the app is mounted under"))
    bind: tuple[str, ...] = field(
        default=("127.0.0.1:8000",),
        metadata=_help("HOST:PORT, [IPv6]:PORT, unix:PATH or fd:N; repeatable"),
    )
    # gunicorn's default backlog.
    backlog: int = field(default=2048, metadata=_help("listen backlog per socket"))
    workers: int = field(default=1, metadata=_help("worker processes (pre-fork)"))
    # waitress's default is 4 threads; gunicorn gthread's is 1.
    threads: int = field(
        default=4, metadata=_help("app threads per worker; 0 runs the app on the event loop")
    )
    reload: bool = field(default=False, metadata=_help("restart when source files change (dev)"))
    parser: HTTPParserName = field(default="httptools", metadata=_help("HTTP/1.1 parser"))
    # gunicorn's default trusts the local host only.
    forwarded_allow_ips: str = field(
        default="127.0.0.1,::1",
        metadata=_help("peers whose X-Forwarded-*/Forwarded headers are trusted ('*': all)"),
    )
    proxy_protocol: bool = field(
        default=False, metadata=_help("expect a PROXY v1/v2 header from allowed peers")
    )
    access_log: bool = field(default=True, metadata=_help("log one line per request"))
    access_log_format: str = field(
        default=DEFAULT_ACCESS_LOG_FORMAT, metadata=_help("gunicorn-style %(atom)s format")
    )
    metrics_bind: str | None = field(
        default=None, metadata=_help("HOST:PORT for Prometheus /metrics (none: off)")
    )
    # gunicorn: 0 disables; jitter spreads restarts so workers do not all recycle at once.
    max_requests: int = field(
        default=0, metadata=_help("restart a worker after this many requests (0: never)")
    )
    max_requests_jitter: int = field(
        default=0, metadata=_help("add up to this many requests to max_requests, at random")
    )
    limits: Limits = field(default_factory=Limits)
    http_limits: HTTPLimits = field(default_factory=HTTPLimits)
    timeouts: Timeouts = field(default_factory=Timeouts)
    http_timeouts: HTTPTimeouts = field(default_factory=HTTPTimeouts)
    tls: TLS = field(default_factory=TLS)

    def __post_init__(self) -> None:
        if not self.bind:
            raise ConfigError("bind: give at least one address", field="bind")
        for address in self.bind:
            parse_bind(address)
        _positive("backlog", self.backlog)
        _positive("workers", self.workers)
        _non_negative("threads", self.threads)
        _non_negative("max_requests", self.max_requests)
        _non_negative("max_requests_jitter", self.max_requests_jitter)
        if self.metrics_bind is not None:
            parse_hostport(self.metrics_bind, field="metrics_bind")
        if self.tls.cafile is not None and self.tls.certfile is None:
            raise ConfigError("a TLS server needs certfile and keyfile", field="certfile")


BindKind = Literal["tcp", "unix", "fd"]


def parse_bind(text: str) -> tuple[BindKind, str, int]:
    """Parse a ``--bind`` value: ``HOST:PORT``, ``[IPv6]:PORT``, ``unix:PATH`` or ``fd:N``.

    Returns:
        ``("tcp", host, port)``, ``("unix", path, 0)`` or ``("fd", "", fd)``.

    Raises:
        ConfigError: naming ``bind``.
    """
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ConfigError("bind: unix: needs a path", field="bind")
        return "unix", path, 0
    if text.startswith("fd:") or text.startswith("fd://"):
        number = text.removeprefix("fd://").removeprefix("fd:")
        if not number.isdigit():
            raise ConfigError(f"bind: fd: needs a number, got {text!r}", field="bind")
        return "fd", "", int(number)
    host, port = parse_hostport(text, field="bind")
    return "tcp", host, port


# --------------------------------------------------------------------------- helpers


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}", field=name)


def _non_negative(name: str, value: float) -> None:
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value!r}", field=name)


def parse_hostport(text: str, *, field: str = "bind") -> tuple[str, int]:
    """Split ``HOST:PORT`` or ``[IPv6]:PORT`` into host and port.

    Raises:
        ConfigError: naming ``field`` when the text is not of that shape.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"{field}: expected HOST:PORT, got {text!r}", field=field)
    if host.startswith("["):
        if not host.endswith("]"):
            raise ConfigError(f"{field}: unbalanced '[' in {text!r}", field=field)
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(
            f"{field}: write IPv6 addresses as [ADDR]:PORT, got {text!r}", field=field
        )
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(
            f"{field}: port must be a number, got {port_text!r}", field=field
        ) from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"{field}: port must be 0-65535, got {port}", field=field)
    return host, port


# --------------------------------------------------------------------------- loader


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One leaf setting, flattened out of its group.

    Attributes:
        name: unique setting name (TOML key, ``--flag-name``, ``NETSTACK_NAME``).
        group: the group field it lives in (``"limits"``), or ``None`` at top level.
        type: the resolved annotation.
        default: the default value.
        help: one line for ``--help``.
    """

    name: str
    group: str | None
    type: Any
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def choices(self) -> tuple[str, ...] | None:
        args = _literal_args(self.type)
        return tuple(str(a) for a in args) if args else None

    @property
    def is_bool(self) -> bool:
        return self.type is bool

    @property
    def is_tuple(self) -> bool:
        return typing.get_origin(self.type) is tuple


def _literal_args(tp: Any) -> tuple[Any, ...]:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return ()


def _default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def specs(cls: type[Any]) -> list[FieldSpec]:
    """Every leaf setting of a config class, groups flattened, in declaration order."""
    out: list[FieldSpec] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = typing.get_type_hints(tp)
            for g in dataclasses.fields(tp):
                out.append(
                    FieldSpec(
                        g.name, f.name, sub[g.name], _default_of(g), g.metadata.get("help", "")
                    )
                )
        else:
            out.append(FieldSpec(f.name, None, tp, _default_of(f), f.metadata.get("help", "")))
    names = [s.name for s in out]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:  # a programming error in a config class, not a user error
        raise TypeError(f"{cls.__name__}: setting names must be unique, repeated: {dupes}")
    return out


def _iter_types(tp: Any) -> Iterator[Any]:
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        yield from typing.get_args(tp)
    else:
        yield tp


def convert(spec: FieldSpec, raw: object, *, source: str) -> Any:
    """Turn ``raw`` (text from env/flags, or a TOML value) into the field's type.

    Raises:
        ConfigError: naming the field and the source when the value does not fit.
    """

    def bad(reason: str) -> ConfigError:
        return ConfigError(f"{spec.name}: {reason} (from {source})", field=spec.name)

    options = list(_iter_types(spec.type))
    if isinstance(raw, str) and type(None) in options and raw.strip().lower() in ("none", ""):
        return None
    errors: list[str] = []
    for tp in options:
        if tp is type(None):
            if raw is None:
                return None
            continue
        try:
            return _convert_one(tp, raw)
        except (TypeError, ValueError) as exc:
            errors.append(str(exc))
    raise bad("; ".join(errors) or f"invalid value {raw!r}")


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _convert_one(tp: Any, raw: object) -> Any:
    if args := _literal_args(tp):
        if raw in args:
            return raw
        raise ValueError(f"must be one of {', '.join(map(str, args))}, got {raw!r}")
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise ValueError(f"expected true or false, got {raw!r}")
    if tp is int:
        if isinstance(raw, bool):
            raise ValueError(f"expected an integer, got {raw!r}")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            try:
                return int(raw.replace("_", ""), 0)
            except ValueError:
                pass
        raise ValueError(f"expected an integer, got {raw!r}")
    if tp is float:
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        raise ValueError(f"expected a number, got {raw!r}")
    if tp is str:
        if isinstance(raw, str):
            return raw
        raise ValueError(f"expected a string, got {raw!r}")
    if typing.get_origin(tp) is tuple:
        (item, _ellipsis) = typing.get_args(tp)
        if isinstance(raw, str):
            parts: list[object] = [p.strip() for p in raw.split(",") if p.strip()]
        elif isinstance(raw, (list, tuple)):
            parts = list(raw)
        else:
            raise ValueError(f"expected a comma-separated list, got {raw!r}")
        return tuple(_convert_one(item, p) for p in parts)
    raise TypeError(f"unsupported setting type {tp!r}")  # a bug in a config class


def build(
    cls: type[T],
    *,
    toml: Mapping[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, object] | None = None,
) -> T:
    """Build ``cls`` from its defaults, a parsed TOML document, the environment and flags.

    Args:
        toml: parsed TOML; keys are setting names at the top level or inside a table named
            after the setting's group (``[limits]``). Unknown keys are errors.
        env: environment; only ``NETSTACK_<NAME>`` keys of known settings are read.
        flags: setting name -> value given on the command line (``None`` means not given).

    Raises:
        ConfigError: naming the field, for an unknown key or a bad value anywhere.
    """
    all_specs = {s.name: s for s in specs(cls)}
    values: dict[str, Any] = {}

    for key, raw in (toml or {}).items():
        if key in all_specs:
            values[key] = convert(all_specs[key], raw, source="config file")
            continue
        groups = {s.group for s in all_specs.values() if s.group}
        if key in groups and isinstance(raw, Mapping):
            for sub, sub_raw in raw.items():
                spec = all_specs.get(sub)
                if spec is None or spec.group != key:
                    raise ConfigError(f"unknown key {key}.{sub} in config file", field=sub)
                values[sub] = convert(spec, sub_raw, source="config file")
            continue
        raise ConfigError(f"unknown key {key!r} in config file", field=key)

    for spec in all_specs.values():
        if env is not None and spec.env in env:
            values[spec.name] = convert(spec, env[spec.env], source=spec.env)
        if flags is not None and flags.get(spec.name) is not None:
            values[spec.name] = convert(spec, flags[spec.name], source=spec.flag)

    return _assemble(cls, values)


def _assemble(cls: type[T], values: Mapping[str, Any]) -> T:
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]  # cls is a dataclass type
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sub = {g.name: values[g.name] for g in dataclasses.fields(tp) if g.name in values}
            kwargs[f.name] = tp(**sub)  # type: ignore[operator]  # a dataclass type
        elif f.name in values:
            kwargs[f.name] = values[f.name]
    return cls(**kwargs)


ModelName = Literal["blocking", "threaded", "pool", "selectloop", "asyncio"]
ALL_MODELS: tuple[ModelName, ...] = ("blocking", "threaded", "pool", "selectloop", "asyncio")
MAX_BENCH_CONNECTIONS = 4096


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchModelsConfig:
    """``netstack bench models``: the concurrency-model comparison."""

    models: tuple[str, ...] = field(
        default=ALL_MODELS, metadata=_help("models to run, comma-separated")
    )
    connections: tuple[int, ...] = field(
        default=(1, 10, 50, 200), metadata=_help("concurrency levels, comma-separated")
    )
    sizes: tuple[int, ...] = field(
        default=(64, 4096), metadata=_help("message sizes in bytes, comma-separated")
    )
    duration: float = field(default=3.0, metadata=_help("seconds of load per point"))
    quick: bool = field(default=False, metadata=_help("a ~30 s run: fewer points, shorter"))
    race: bool = field(
        default=False, metadata=_help("only show the lost-update race demonstration")
    )
    output: str = field(default="bench/models.png", metadata=_help("PNG plot path"))
    # A pool of 16 threads with at most 8 handlers running: small enough to show queueing
    # at 50+ connections, large enough to overlap I/O waits.
    pool_threads: int = field(default=16, metadata=_help("pool model: worker threads"))
    max_running: int = field(
        default=8, metadata=_help("pool model: semaphore cap on running handlers")
    )
    # One process on the 2-core benchmark machine leaves the server a whole core. With two,
    # three busy processes share two cores and the server is starved (asyncio model at 200
    # connections: 73-81 % server CPU instead of 98-99 %). Raise it on bigger machines.
    client_processes: int = field(default=1, metadata=_help("load generator processes"))
    # A safety bound next to duration: the fastest model does under 100k msgs/s on two
    # cores, so this only ends a point early when duration is 10 s or more.
    max_messages: int = field(
        default=1_000_000, metadata=_help("per point: stop after this many replies")
    )
    # Single runs on a shared 2-core VM vary by 10-30 %; bench/RESULTS.md uses 3.
    repeats: int = field(
        default=1, metadata=_help("runs per point; the run with the median msgs/s is shown")
    )

    def __post_init__(self) -> None:
        unknown = set(self.models) - set(ALL_MODELS)
        if unknown or not self.models:
            raise ConfigError(
                f"models: unknown {sorted(unknown)}; choose from {', '.join(ALL_MODELS)}",
                field="models",
            )
        if not self.connections or min(self.connections) <= 0:
            raise ConfigError("connections must be positive integers", field="connections")
        # Each connection is a descriptor in the client and in the server (and a thread in
        # the threaded model); beyond this the run measures ulimits, not models.
        if max(self.connections) > MAX_BENCH_CONNECTIONS:
            raise ConfigError(
                f"connections must be <= {MAX_BENCH_CONNECTIONS}", field="connections"
            )
        if not self.sizes or min(self.sizes) <= 0:
            raise ConfigError("sizes must be positive integers", field="sizes")
        if max(self.sizes) > Limits().max_frame_bytes:
            raise ConfigError(
                f"sizes must be <= {Limits().max_frame_bytes} (the servers' max_frame_bytes)",
                field="sizes",
            )
        _positive("duration", self.duration)
        _positive("pool_threads", self.pool_threads)
        _positive("max_running", self.max_running)
        _positive("client_processes", self.client_processes)
        _positive("max_messages", self.max_messages)
        _positive("repeats", self.repeats)


# --------------------------------------------------------------------------- chat

DB_SCHEMES: tuple[str, ...] = ("sqlite", "postgresql", "postgres")
REDIS_SCHEMES: tuple[str, ...] = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatLimits:
    """What one chat client may send, and how fast."""

    # websockets' default max_size (1 MiB): room for a base64 upload of max_file_bytes.
    max_message_bytes: int = field(
        default=1 << 20, metadata=_help("largest client message (JSON text) accepted")
    )
    # Slack caps a message at 40,000 characters but truncates display at 4,000; IRC at 512 bytes.
    max_text_chars: int = field(default=4000, metadata=_help("longest chat message text"))
    # Fits max_message_bytes once base64-encoded (4/3) with room for the JSON around it.
    max_file_bytes: int = field(default=512 * 1024, metadata=_help("largest uploaded file"))
    # IRC servers allow roughly one line per 2 s after a burst of 5-10; chat UIs need more.
    flood_rate: float = field(
        default=5.0, metadata=_help("flood control: commands per second refilled")
    )
    flood_burst: int = field(
        default=20, metadata=_help("flood control: commands allowed in a burst")
    )
    flood_tolerance: int = field(
        default=10,
        metadata=_help("flood control: commands dropped after the warning before disconnect"),
    )
    # Same order as the echo server's max_connections.
    max_clients: int = field(
        default=10000, metadata=_help("concurrent chat connections per transport")
    )
    # A reader that falls this far behind is dropped instead of buffering without bound.
    max_outgoing_bytes: int = field(
        default=4 << 20, metadata=_help("drop a client whose unsent output exceeds this")
    )
    # gunicorn's default; asyncio's 100 overflows when hundreds of clients (re)connect at
    # once, as they do after a restart or a network blip.
    backlog: int = field(
        default=2048, metadata=_help("listen backlog of the WebSocket and TCP listeners")
    )

    def __post_init__(self) -> None:
        for name in (
            "max_message_bytes",
            "max_text_chars",
            "max_file_bytes",
            "flood_rate",
            "flood_burst",
            "max_clients",
            "max_outgoing_bytes",
            "backlog",
        ):
            _positive(name, getattr(self, name))
        _non_negative("flood_tolerance", self.flood_tolerance)
        if (self.max_file_bytes + 2) // 3 * 4 + 1024 > self.max_message_bytes:
            raise ConfigError(
                "max_file_bytes: a base64 upload must fit in max_message_bytes "
                "(needs max_file_bytes * 4/3 + 1 KiB <= max_message_bytes)",
                field="max_file_bytes",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatTimeouts:
    """Chat-specific seconds (the shared ``Timeouts`` group supplies idle/graceful)."""

    # websockets' defaults: a ping every 20 s, the connection is dead after 20 s unanswered.
    ping_interval: float | None = field(
        default=20.0, metadata=_help("WebSocket: send a ping this often (none: never)")
    )
    ping_timeout: float | None = field(
        default=20.0, metadata=_help("WebSocket: close if a ping is unanswered this long")
    )
    # A week, like many web sessions; resume tokens are single strings a client keeps.
    session_ttl: float = field(
        default=7 * 24 * 3600.0, metadata=_help("login session token lifetime")
    )
    # With --redis: a crashed instance's users stop counting as online after this long
    # (heartbeat every third of it), and a survivor announces them offline within one more
    # heartbeat. Short enough that DMs queue and member lists are right soon after a crash.
    presence_ttl: float = field(
        default=30.0,
        metadata=_help("with redis: seconds before a dead instance's users go offline"),
    )

    # Slack-like: presence changes of a room are sent as one batch per interval instead of
    # one event per change to every member (O(N^2) when N clients connect at once). A
    # quarter second is below what a person notices in a member list.
    presence_interval: float | None = field(
        default=0.25,
        metadata=_help("coalesce presence changes per room this long (none: send each at once)"),
    )

    def __post_init__(self) -> None:
        if self.ping_interval is not None:
            _positive("ping_interval", self.ping_interval)
        if self.ping_timeout is not None:
            _positive("ping_timeout", self.ping_timeout)
        _positive("session_ttl", self.session_ttl)
        _positive("presence_ttl", self.presence_ttl)
        if self.presence_interval is not None:
            _positive("presence_interval", self.presence_interval)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatServerConfig:
    """``netstack chat serve``."""

    bind: str = field(
        default="127.0.0.1:8700", metadata=_help("WebSocket + HTTP (browser page) HOST:PORT")
    )
    tcp_bind: str | None = field(
        default="127.0.0.1:8701",
        metadata=_help("newline-delimited JSON over TCP HOST:PORT (none: off)"),
    )
    db: str | None = field(
        default=None,
        metadata=_help("SQLite file or postgresql://... (none: chat.sqlite3 in the data dir)"),
    )
    data_dir: str | None = field(
        default=None,
        metadata=_help("where the default database lives (none: $XDG_DATA_HOME/netstack)"),
    )
    allowed_origins: tuple[str, ...] = field(
        default=(),
        metadata=_help("extra browser Origins allowed for WebSocket (same origin always is)"),
    )
    redis: str | None = field(
        default=None,
        metadata=_help(
            "redis://... shared by several instances: fan-out and presence (none: one process)"
        ),
    )
    redis_prefix: str = field(
        default="netstack:chat",
        metadata=_help("Redis channel and key prefix (deployments sharing a Redis differ)"),
    )
    # A port of its own, as `netstack serve` and `netstack rpc serve` do: the chat port is
    # public, the metrics port need not be.
    metrics_bind: str | None = field(
        default=None, metadata=_help("HOST:PORT for Prometheus /metrics (none: off)")
    )
    chat_limits: ChatLimits = field(default_factory=ChatLimits)
    chat_timeouts: ChatTimeouts = field(default_factory=ChatTimeouts)
    timeouts: Timeouts = field(default_factory=Timeouts)
    tls: TLS = field(default_factory=TLS)

    def __post_init__(self) -> None:
        parse_hostport(self.bind, field="bind")
        if self.tcp_bind is not None:
            parse_hostport(self.tcp_bind, field="tcp_bind")
        if self.db is not None and "://" in self.db:
            scheme = self.db.split("://", 1)[0].lower()
            if scheme not in DB_SCHEMES:
                raise ConfigError(
                    f"db: unsupported scheme {scheme!r}; use a file path or postgresql://",
                    field="db",
                )
        if self.tls.enabled and self.tls.certfile is None:
            raise ConfigError("a TLS server needs certfile and keyfile", field="certfile")
        if self.redis is not None and not self.redis.startswith(REDIS_SCHEMES):
            raise ConfigError(
                f"redis: expected redis://, rediss:// or unix://, got {self.redis!r}",
                field="redis",
            )
        if not self.redis_prefix or any(c.isspace() for c in self.redis_prefix):
            raise ConfigError("redis_prefix: a non-empty name without spaces", field="redis_prefix")
        if self.metrics_bind is not None:
            parse_hostport(self.metrics_bind, field="metrics_bind")
        for origin in self.allowed_origins:
            if "://" not in origin:
                raise ConfigError(
                    f"allowed_origins: expected scheme://host[:port], got {origin!r}",
                    field="allowed_origins",
                )


@dataclass(frozen=True, slots=True, kw_only=True)
class ChatClientConfig:
    """``netstack chat connect`` (the password comes from NETSTACK_CHAT_PASSWORD or a prompt)."""

    url: str = field(
        default="ws://127.0.0.1:8700/ws",
        metadata=_help("server: ws://HOST:PORT/ws, wss://HOST:PORT/ws or tcp://HOST:PORT"),
    )
    nick: str | None = field(default=None, metadata=_help("log in as NICK (none: asked)"))
    register: bool = field(default=False, metadata=_help("create the account, then log in"))
    room: str | None = field(default=None, metadata=_help("join (or create) this room at start"))
    # Like the page: 0.5 s doubling to 30 s, with jitter, so a restarted server is not stormed.
    reconnect_initial: float = field(
        default=0.5, metadata=_help("first reconnect delay after a lost connection, seconds")
    )
    reconnect_max: float = field(default=30.0, metadata=_help("longest reconnect delay, seconds"))
    tls: TLS = field(default_factory=TLS)

    def __post_init__(self) -> None:
        if not self.url.startswith(("ws://", "wss://", "tcp://", "tls://")):
            raise ConfigError(
                f"url: expected ws://, wss://, tcp:// or tls://, got {self.url!r}", field="url"
            )
        if self.url.startswith(("tcp://", "tls://")):
            parse_hostport(self.url.split("://", 1)[1].rstrip("/"), field="url")
        _positive("reconnect_initial", self.reconnect_initial)
        if self.reconnect_max < self.reconnect_initial:
            raise ConfigError("reconnect_max must be >= reconnect_initial", field="reconnect_max")


# --------------------------------------------------------------------------- load balancer
#
# One data model for both forms of ``netstack balance``: the quick form (flags, env and a
# flat TOML, built by the generic loader into :class:`BalancerQuickConfig`) and the full
# TOML form (several frontends and named pools, parsed by ``servers/lb/config.py``) both
# end as a :class:`BalancerConfig`. The group classes below are shared by both, so every
# health/limit/timeout key is declared once.

Algorithm = Literal[
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "power_of_two",
    "consistent_hash",
    "random",
]
ALGORITHMS: tuple[Algorithm, ...] = typing.get_args(Algorithm)
BalanceMode = Literal["tcp", "udp", "http"]
ProxyVersion = Literal["none", "v1", "v2"]


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthConfig:
    """Backend health: active checks, passive ejection, slow start (per pool)."""

    # HAProxy's defaults: inter 2s, rise 2, fall 3.
    check_interval: float | None = field(
        default=2.0, metadata=_help("active check every this many seconds (none: no checks)")
    )
    check_timeout: float = field(default=1.0, metadata=_help("active check connect timeout"))
    rise: int = field(default=2, metadata=_help("passing checks that bring a down backend up"))
    fall: int = field(default=3, metadata=_help("failing checks that take a backend down"))
    # Envoy's outlier detection ejects after 5 consecutive errors; a refused connect is a
    # clearer signal than a 5xx, so 3.
    max_fails: int = field(
        default=3, metadata=_help("consecutive connect failures that eject a backend")
    )
    # Envoy: base_ejection_time 30 s, max_ejection_time 300 s; nginx fail_timeout 10 s.
    ejection_time: float = field(
        default=10.0, metadata=_help("first ejection period; doubles on each repeat")
    )
    max_ejection_time: float = field(
        default=300.0, metadata=_help("longest ejection period, seconds")
    )
    # Envoy's max_ejection_percent (10 %, and at least one backend); 50 % keeps half a
    # pool serving when a fault behind all of them makes each one fail in turn.
    max_ejection_percent: int = field(
        default=50,
        metadata=_help("most of a pool passive checks may eject at once, % (at least one)"),
    )
    # HAProxy's slowstart and nginx's slow_start are off by default.
    slow_start: float = field(
        default=0.0, metadata=_help("ramp a recovered backend's weight over this many seconds")
    )
    # HAProxy's `option httpchk GET /path` with `http-check expect status`; its default
    # expectation is any 2xx or 3xx.
    check_path: str | None = field(
        default=None,
        metadata=_help("http pools: GET this path as the active check (none: TCP connect)"),
    )
    check_status: int | None = field(
        default=None, metadata=_help("status the HTTP check expects (none: any 2xx or 3xx)")
    )

    def __post_init__(self) -> None:
        if self.check_path is not None and not self.check_path.startswith("/"):
            raise ConfigError(
                f"check_path must start with '/', got {self.check_path!r}", field="check_path"
            )
        if self.check_status is not None and not 100 <= self.check_status <= 599:
            raise ConfigError(
                f"check_status must be 100-599, got {self.check_status!r}", field="check_status"
            )
        if self.check_interval is not None:
            _positive("check_interval", self.check_interval)
        _positive("check_timeout", self.check_timeout)
        _positive("rise", self.rise)
        _positive("fall", self.fall)
        _positive("max_fails", self.max_fails)
        _positive("ejection_time", self.ejection_time)
        if not 0 <= self.max_ejection_percent <= 100:
            raise ConfigError(
                f"max_ejection_percent must be 0-100, got {self.max_ejection_percent!r}",
                field="max_ejection_percent",
            )
        if self.max_ejection_time < self.ejection_time:
            raise ConfigError(
                "max_ejection_time must be >= ejection_time", field="max_ejection_time"
            )
        _non_negative("slow_start", self.slow_start)


@dataclass(frozen=True, slots=True, kw_only=True)
class BalancerLimits:
    """Listener and relay limits of the balancer."""

    # HAProxy and nginx ask the kernel for large backlogs; Linux caps it at somaxconn
    # (4096 since 5.4), so asking for more buys nothing.
    listen_backlog: int = field(default=4096, metadata=_help("listen(2) backlog"))
    # HAProxy's maxconn defaults to a few thousand; each relayed connection holds two fds.
    max_connections: int = field(
        default=10_000, metadata=_help("concurrent client connections; more are refused")
    )
    # HAProxy's tune.bufsize is 16 KiB per direction, nginx's proxy_buffer_size 16 KiB; a
    # larger high mark keeps bulk relays streaming between pauses.
    relay_buffer_bytes: int = field(
        default=256 * 1024, metadata=_help("unsent bytes per direction before pausing the reader")
    )
    max_udp_sessions: int = field(
        default=10_000, metadata=_help("UDP client sessions; datagrams of new ones are dropped")
    )
    # nginx's upstream `keepalive 32` example; HAProxy keeps idle server connections too.
    max_idle_backend_connections: int = field(
        default=32, metadata=_help("http: idle keep-alive connections kept per backend")
    )
    # Envoy's retry budget: retries at most 20 % of requests (plus a small floor).
    retry_budget: float = field(
        default=0.2, metadata=_help("http: retries as a fraction of requests (0: no retries)")
    )

    def __post_init__(self) -> None:
        for name in (
            "listen_backlog",
            "max_connections",
            "relay_buffer_bytes",
            "max_udp_sessions",
        ):
            _positive(name, getattr(self, name))
        _non_negative("max_idle_backend_connections", self.max_idle_backend_connections)
        if not 0.0 <= self.retry_budget <= 1.0:
            raise ConfigError(
                f"retry_budget must be 0-1, got {self.retry_budget!r}", field="retry_budget"
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class BalancerTimeouts:
    """Balancer timeouts, seconds; ``None`` disables one."""

    # HAProxy's examples use `timeout connect 5s`; failover to the next backend follows.
    connect_timeout: float = field(
        default=5.0, metadata=_help("backend connect timeout; then try the next backend")
    )
    # nginx stream's proxy_timeout is 10 min; HAProxy's examples use 50 s client/server.
    idle_timeout: float | None = field(
        default=600.0, metadata=_help("close a relay silent both ways this long (none: never)")
    )
    # nginx stream's proxy_timeout applies to UDP sessions too; DNS-like traffic needs less.
    udp_session_timeout: float = field(
        default=30.0, metadata=_help("forget a UDP client session silent this long")
    )
    # gunicorn's graceful_timeout is 30 s.
    drain_timeout: float = field(
        default=30.0, metadata=_help("on shutdown, wait this long for relays to finish")
    )
    # nginx's proxy_read_timeout is 60 s: between two reads from the backend.
    request_timeout: float | None = field(
        default=60.0,
        metadata=_help("http: a backend silent this long while answering gets a 504"),
    )
    # Shorter than the keep-alive timeout of common backends (netstack serve and uvicorn
    # 5 s), so that we rarely reuse a connection the backend is closing.
    backend_idle_timeout: float = field(
        default=4.0, metadata=_help("http: close a pooled backend connection idle this long")
    )
    # nginx's client_header_timeout is 60 s, keepalive_timeout 75 s; less invites fewer
    # idle sockets.
    header_timeout: float | None = field(
        default=10.0, metadata=_help("http: a request head must arrive within this; 408")
    )
    keepalive_timeout: float | None = field(
        default=15.0, metadata=_help("http: close a client keep-alive connection idle this long")
    )
    # nginx's client_body_timeout is 60 s (between two reads); netstack serve's is 30 s.
    body_timeout: float | None = field(
        default=30.0, metadata=_help("http: a request body stalled this long gets a 408")
    )

    def __post_init__(self) -> None:
        for name in ("request_timeout", "header_timeout", "keepalive_timeout", "body_timeout"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        _positive("backend_idle_timeout", self.backend_idle_timeout)
        _positive("connect_timeout", self.connect_timeout)
        if self.idle_timeout is not None:
            _positive("idle_timeout", self.idle_timeout)
        _positive("udp_session_timeout", self.udp_session_timeout)
        _non_negative("drain_timeout", self.drain_timeout)


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendConfig:
    """One backend server of a pool."""

    address: str = field(metadata=_help("HOST:PORT"))
    weight: int = field(default=1, metadata=_help("relative share of new connections"))
    name: str = field(default="", metadata=_help("label in logs and metrics (default: address)"))

    def __post_init__(self) -> None:
        parse_hostport(self.address, field="address")
        if not 1 <= self.weight <= 256:  # HAProxy's weight range is 0-256
            raise ConfigError(f"weight must be 1-256, got {self.weight!r}", field="weight")
        if not self.name:
            object.__setattr__(self, "name", self.address)


@dataclass(frozen=True, slots=True, kw_only=True)
class PoolConfig:
    """A named group of backends with its algorithm, health policy and timeouts."""

    name: str = field(default="default", metadata=_help("pool name"))
    algorithm: Algorithm = field(default="round_robin", metadata=_help("balancing algorithm"))
    # For consistent_hash: where the key comes from. L4 has only the client address.
    hash_key: str = field(
        default="client_ip",
        metadata=_help("consistent_hash key: client_ip, header:NAME or cookie:NAME"),
    )
    # Google's "consistent hashing with bounded loads" uses c = 1.25 in its examples.
    hash_balance: float = field(
        default=1.25, metadata=_help("consistent_hash: max load as a multiple of the mean")
    )
    # HAProxy's send-proxy / send-proxy-v2 server options; off by default, as there.
    send_proxy: ProxyVersion = field(
        default="none", metadata=_help("send a PROXY protocol header to backends (TCP)")
    )
    # HAProxy's `cookie NAME insert`: the balancer sets the cookie to name the backend.
    sticky_cookie: str | None = field(
        default=None, metadata=_help("http: keep a client on one backend with this cookie")
    )
    backends: tuple[BackendConfig, ...] = ()
    health: HealthConfig = field(default_factory=HealthConfig)
    timeouts: BalancerTimeouts = field(default_factory=BalancerTimeouts)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("name must not be empty", field="name")
        if self.sticky_cookie is not None and not _TOKEN_RE.fullmatch(self.sticky_cookie):
            raise ConfigError(
                f"sticky_cookie must be a cookie name, got {self.sticky_cookie!r}",
                field="sticky_cookie",
            )
        if not self.backends:
            raise ConfigError("a pool needs at least one backend", field="backends")
        names = [b.name for b in self.backends]
        if len(set(names)) != len(names):
            dupe = next(n for n in names if names.count(n) > 1)
            raise ConfigError(f"backend {dupe!r} is listed twice", field="backends")
        kind, _, arg = self.hash_key.partition(":")
        if not (self.hash_key == "client_ip" or (kind in ("header", "cookie") and arg)):
            raise ConfigError(
                f"hash_key must be client_ip, header:NAME or cookie:NAME, got {self.hash_key!r}",
                field="hash_key",
            )
        if self.hash_balance <= 1.0:
            raise ConfigError(
                f"hash_balance must be > 1, got {self.hash_balance!r}", field="hash_balance"
            )


_TOKEN_RE = re.compile(r"[-!#$%&'*+.^_`|~0-9A-Za-z]+")


def parse_header_rule(rule: str, *, field: str) -> tuple[bytes, bytes]:
    """``"Name: value"`` -> ``(b"name", b"value")``.

    Raises:
        ConfigError: not a header name, a colon and a value without control characters.
    """
    name, sep, value = rule.partition(":")
    name, value = name.strip(), value.strip()
    if not sep or not _TOKEN_RE.fullmatch(name) or any(ord(c) < 32 for c in value):
        raise ConfigError(f"{field}: expected 'NAME: VALUE', got {rule!r}", field=field)
    try:
        return name.lower().encode("ascii"), value.encode("latin-1")
    except UnicodeEncodeError:
        raise ConfigError(f"{field}: {rule!r} is not Latin-1", field=field) from None


def _check_header_rules(cfg: Any) -> None:
    for name in ("add_request_headers", "add_response_headers"):
        for rule in getattr(cfg, name):
            parse_header_rule(rule, field=name)
    for name in ("remove_request_headers", "remove_response_headers"):
        for header in getattr(cfg, name):
            if not _TOKEN_RE.fullmatch(header):
                raise ConfigError(f"{name}: {header!r} is not a header name", field=name)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderRules:
    """Header add/remove rules of an http frontend (and of a route, applied on top)."""

    add_request_headers: tuple[str, ...] = field(
        default=(), metadata=_help("'NAME: VALUE' headers set on requests to the backend")
    )
    remove_request_headers: tuple[str, ...] = field(
        default=(), metadata=_help("header names removed from requests to the backend")
    )
    add_response_headers: tuple[str, ...] = field(
        default=(), metadata=_help("'NAME: VALUE' headers set on responses to the client")
    )
    remove_response_headers: tuple[str, ...] = field(
        default=(), metadata=_help("header names removed from responses to the client")
    )

    def __post_init__(self) -> None:
        _check_header_rules(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouteConfig(HeaderRules):
    """An L7 rule: requests matching every given condition go to ``pool``."""

    pool: str = field(metadata=_help("target pool"))
    host: str | None = field(default=None, metadata=_help("Host header, without port"))
    path_prefix: str | None = field(default=None, metadata=_help("request path prefix"))
    header: str | None = field(default=None, metadata=_help("NAME or NAME=VALUE"))
    # nginx `location /api/ { proxy_pass http://app/; }` replaces the prefix.
    rewrite_prefix: str | None = field(
        default=None, metadata=_help("replace the matched path_prefix with this")
    )

    def __post_init__(self) -> None:
        if self.host is None and self.path_prefix is None and self.header is None:
            raise ConfigError("a route needs host, path_prefix or header", field="pool")
        if self.rewrite_prefix is not None:
            if self.path_prefix is None:
                raise ConfigError("rewrite_prefix needs path_prefix", field="rewrite_prefix")
            if not self.rewrite_prefix.startswith("/"):
                raise ConfigError(
                    f"rewrite_prefix must start with '/', got {self.rewrite_prefix!r}",
                    field="rewrite_prefix",
                )
        _check_header_rules(self)
        if self.path_prefix is not None and not self.path_prefix.startswith("/"):
            raise ConfigError(
                f"path_prefix must start with '/', got {self.path_prefix!r}", field="path_prefix"
            )
        if self.header is not None and not self.header.partition("=")[0].strip():
            raise ConfigError("header needs a NAME", field="header")


@dataclass(frozen=True, slots=True, kw_only=True)
class FrontendTLS:
    """TLS termination on a tcp or http frontend (backends stay plaintext)."""

    certfile: str | None = field(
        default=None, metadata=_help("PEM certificate chain: terminate TLS on the frontend")
    )
    keyfile: str | None = field(default=None, metadata=_help("PEM private key of certfile"))
    ca_certs: str | None = field(
        default=None, metadata=_help("PEM CA bundle: require client certificates it signed")
    )
    # nginx bounds a handshake by client_header_timeout (60 s); a real client needs well
    # under a second on a LAN, a few on a bad mobile link.
    tls_handshake_timeout: float = field(
        default=10.0, metadata=_help("close a client whose TLS handshake takes longer")
    )

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise ConfigError(
                "certfile and keyfile must be given together",
                field="keyfile" if self.keyfile is None else "certfile",
            )
        if self.ca_certs is not None and self.certfile is None:
            raise ConfigError("ca_certs needs certfile and keyfile", field="ca_certs")
        _positive("tls_handshake_timeout", self.tls_handshake_timeout)

    @property
    def enabled(self) -> bool:
        return self.certfile is not None


# HAProxy's httplog timers (ms) and what went where; see servers/lb/accesslog.py.
DEFAULT_LB_ACCESS_LOG_FORMAT = (
    '%(client)s %(frontend)s %(pool)s/%(backend)s "%(r)s" %(s)s %(B)s '
    "%(Tq)s/%(Tw)s/%(Tc)s/%(Tr)s/%(Tt)s %(rid)s %(retries)s %(term)s"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class HTTPFrontendOptions(HeaderRules):
    """What an http frontend does to every request (flags of the quick form too)."""

    # http mode. No peer is trusted by default: an edge proxy overwrites what clients claim.
    forwarded_allow_ips: str = field(
        default="",
        metadata=_help("http: peers whose X-Forwarded-*/Forwarded/X-Request-Id are kept"),
    )
    request_id_header: str = field(
        default="x-request-id", metadata=_help("http: request id header added ('' : none)")
    )
    allow_ips: str = field(
        default="", metadata=_help("http: only these IPs/CIDRs may connect ('': everyone); 403")
    )
    deny_ips: str = field(default="", metadata=_help("http: IPs/CIDRs refused with 403"))
    rate_limit: float | None = field(
        default=None, metadata=_help("http: requests per second per client IP (none: off); 429")
    )
    # nginx limit_req's burst; a browser opens ~6 connections and loads a page at once.
    rate_burst: int = field(default=20, metadata=_help("http: requests a client may burst"))
    # nginx and HAProxy's httplog log every request by default.
    access_log: bool = field(
        default=True, metadata=_help("http: log one line per request (netstack.lb.access)")
    )
    access_log_format: str = field(
        default=DEFAULT_LB_ACCESS_LOG_FORMAT,
        metadata=_help("http: access line, %(atom)s format (see the README)"),
    )

    def __post_init__(self) -> None:
        if self.rate_limit is not None:
            _positive("rate_limit", self.rate_limit)
        _positive("rate_burst", self.rate_burst)
        if self.request_id_header and not _TOKEN_RE.fullmatch(self.request_id_header):
            raise ConfigError(
                f"request_id_header must be a header name, got {self.request_id_header!r}",
                field="request_id_header",
            )
        _check_header_rules(self)

    def http_options(self) -> dict[str, Any]:
        """These settings by name (to copy them from the quick form to its frontend)."""
        names = [f.name for f in dataclasses.fields(HTTPFrontendOptions)]
        return {name: getattr(self, name) for name in names}


@dataclass(frozen=True, slots=True, kw_only=True)
class FrontendConfig(HTTPFrontendOptions):
    """A listening address, its mode, default pool and (L7) routes."""

    name: str = field(default="default", metadata=_help("frontend name"))
    listen: str = field(default="127.0.0.1:8080", metadata=_help("HOST:PORT to accept on"))
    mode: BalanceMode = field(default="tcp", metadata=_help("tcp, udp or http"))
    pool: str = field(default="default", metadata=_help("pool for traffic no route matches"))
    accept_proxy: bool = field(
        default=False, metadata=_help("read a PROXY v1/v2 header from trusted peers (TCP)")
    )
    # The same default as netstack serve's forwarded_allow_ips: the local host only.
    proxy_allow_ips: str = field(
        default="127.0.0.1,::1",
        metadata=_help("peers whose PROXY headers are trusted: IPs, CIDRs or '*'"),
    )
    routes: tuple[RouteConfig, ...] = ()
    tls: FrontendTLS = field(default_factory=FrontendTLS)

    def __post_init__(self) -> None:
        parse_hostport(self.listen, field="listen")
        if self.routes and self.mode != "http":
            raise ConfigError("routes need mode = 'http'", field="routes")
        if self.tls.enabled and self.mode == "udp":
            raise ConfigError("certfile: TLS is not available over UDP", field="certfile")
        if self.tls.enabled and self.accept_proxy:  # the PROXY header precedes the hello
            raise ConfigError(
                "accept_proxy: not available with TLS termination yet", field="accept_proxy"
            )
        HTTPFrontendOptions.__post_init__(self)


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """The balancer's admin HTTP API: its own port, a bearer token."""

    admin_bind: str | None = field(
        default=None, metadata=_help("HOST:PORT of the admin API and /metrics (none: off)")
    )
    # Bearer token for /api/*; /metrics and /healthz stay open for scrapers and probes.
    admin_token: str | None = field(
        default=None, metadata=_help("token the admin API requires (Authorization: Bearer)")
    )

    def __post_init__(self) -> None:
        if self.admin_bind is None:
            return
        parse_hostport(self.admin_bind, field="admin_bind")
        if not self.admin_token or len(self.admin_token) < 16:
            raise ConfigError(
                "admin_token: the admin API needs a token of 16 characters or more "
                "(NETSTACK_ADMIN_TOKEN keeps it out of the process list)",
                field="admin_token",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class BalancerConfig:
    """Everything ``netstack balance`` runs: frontends, the pools they use, limits."""

    frontends: tuple[FrontendConfig, ...]
    pools: tuple[PoolConfig, ...]
    limits: BalancerLimits = field(default_factory=BalancerLimits)
    timeouts: BalancerTimeouts = field(default_factory=BalancerTimeouts)
    admin: AdminConfig = field(default_factory=AdminConfig)

    def __post_init__(self) -> None:
        if not self.frontends:
            raise ConfigError("at least one frontend is needed", field="frontends")
        pools = {p.name for p in self.pools}
        if len(pools) != len(self.pools):
            raise ConfigError("pool names must be unique", field="pools")
        seen: set[tuple[str, str]] = set()
        for fe in self.frontends:
            for target in (fe.pool, *(r.pool for r in fe.routes)):
                if target not in pools:
                    raise ConfigError(
                        f"frontend {fe.name!r} uses unknown pool {target!r}", field="pool"
                    )
            pool = self.pool(fe.pool)
            if fe.mode != "http" and pool.hash_key != "client_ip":
                raise ConfigError(
                    f"pool {pool.name!r}: hash_key {pool.hash_key!r} needs HTTP, but frontend "
                    f"{fe.name!r} is {fe.mode}: use client_ip",
                    field="hash_key",
                )
            proto = "udp" if fe.mode == "udp" else "tcp"
            if (proto, fe.listen) in seen and not fe.listen.endswith(":0"):
                raise ConfigError(
                    f"frontend {fe.name!r}: {proto} {fe.listen} is already used", field="listen"
                )
            seen.add((proto, fe.listen))

    def pool(self, name: str) -> PoolConfig:
        """The pool called ``name`` (validated to exist)."""
        return next(p for p in self.pools if p.name == name)


@dataclass(frozen=True, slots=True, kw_only=True)
class BalancerQuickConfig(HTTPFrontendOptions):
    """``netstack balance`` quick form: one frontend, one pool, from flags/env/flat TOML."""

    listen: str = field(default="127.0.0.1:8080", metadata=_help("HOST:PORT to accept on"))
    backend: tuple[str, ...] = field(default=(), metadata=_help("backend HOST:PORT"))
    mode: BalanceMode = field(default="tcp", metadata=_help("tcp, udp or http"))
    algorithm: Algorithm = field(default="round_robin", metadata=_help("balancing algorithm"))
    hash_key: str = field(
        default="client_ip",
        metadata=_help("consistent_hash key: client_ip, header:NAME or cookie:NAME"),
    )
    send_proxy: ProxyVersion = field(
        default="none", metadata=_help("send a PROXY protocol header to backends (TCP)")
    )
    accept_proxy: bool = field(
        default=False, metadata=_help("read a PROXY v1/v2 header from trusted peers (TCP)")
    )
    proxy_allow_ips: str = field(
        default="127.0.0.1,::1",
        metadata=_help("peers whose PROXY headers are trusted: IPs, CIDRs or '*'"),
    )
    sticky_cookie: str | None = field(
        default=None, metadata=_help("http: keep a client on one backend with this cookie")
    )
    health: HealthConfig = field(default_factory=HealthConfig)
    limits: BalancerLimits = field(default_factory=BalancerLimits)
    timeouts: BalancerTimeouts = field(default_factory=BalancerTimeouts)
    admin: AdminConfig = field(default_factory=AdminConfig)
    tls: FrontendTLS = field(default_factory=FrontendTLS)

    def __post_init__(self) -> None:
        parse_hostport(self.listen, field="listen")
        for address in self.backend:
            parse_hostport(address, field="backend")
        HTTPFrontendOptions.__post_init__(self)

    def to_balancer(self) -> BalancerConfig:
        """The equivalent full config: frontend ``default`` -> pool ``default``.

        Raises:
            ConfigError: no backend was given.
        """
        if not self.backend:
            raise ConfigError(
                "backend: give at least one --backend HOST:PORT (or --config FILE)",
                field="backend",
            )
        pool = PoolConfig(
            algorithm=self.algorithm,
            hash_key=self.hash_key,
            send_proxy=self.send_proxy,
            sticky_cookie=self.sticky_cookie,
            backends=tuple(BackendConfig(address=a) for a in self.backend),
            health=self.health,
            timeouts=self.timeouts,
        )
        return BalancerConfig(
            frontends=(
                FrontendConfig(
                    listen=self.listen,
                    mode=self.mode,
                    accept_proxy=self.accept_proxy,
                    proxy_allow_ips=self.proxy_allow_ips,
                    tls=self.tls,
                    **self.http_options(),
                ),
            ),
            pools=(pool,),
            limits=self.limits,
            timeouts=self.timeouts,
            admin=self.admin,
        )


# --------------------------------------------------------------------------- gRPC notes service


@dataclass(frozen=True, slots=True, kw_only=True)
class RPCLimits:
    """What one gRPC client may send or make the notes service hold."""

    # A title is a line in a list (GitHub issue titles allow 256 characters).
    max_title_chars: int = field(default=200, metadata=_help("longest note title"))
    # A note is text, not a file store; 64 KiB is far above what a person types.
    max_note_bytes: int = field(default=64 * 1024, metadata=_help("largest note body, UTF-8"))
    max_query_chars: int = field(default=200, metadata=_help("longest search query"))
    # AIP-158: a default page size and a maximum that larger requests are clamped to.
    default_page_size: int = field(default=20, metadata=_help("notes per page when unset"))
    max_page_size: int = field(default=100, metadata=_help("larger page sizes are clamped"))
    max_watchers: int = field(
        default=1000, metadata=_help("concurrent WatchNotes streams; more get RESOURCE_EXHAUSTED")
    )
    # Each subscriber queues at most this many events; one that falls further behind is
    # ended with RESOURCE_EXHAUSTED rather than buffering without bound.
    max_watch_backlog: int = field(
        default=256, metadata=_help("events queued per WatchNotes subscriber")
    )
    # gRPC's own default receive limit is 4 MiB.
    max_message_bytes: int = field(
        default=1 << 20, metadata=_help("largest gRPC request message accepted")
    )

    def __post_init__(self) -> None:
        for name in (
            "max_title_chars",
            "max_note_bytes",
            "max_query_chars",
            "default_page_size",
            "max_page_size",
            "max_watchers",
            "max_watch_backlog",
            "max_message_bytes",
        ):
            _positive(name, getattr(self, name))
        if self.default_page_size > self.max_page_size:
            raise ConfigError(
                "default_page_size must be <= max_page_size", field="default_page_size"
            )
        if self.max_note_bytes + 4 * self.max_title_chars + 1024 > self.max_message_bytes:
            raise ConfigError(
                "max_message_bytes must leave room for a whole note "
                "(max_note_bytes + 4 * max_title_chars + 1 KiB)",
                field="max_message_bytes",
            )


def _check_token(token: str | None) -> None:
    # RFC 6750 §2.1 b64token characters: what fits in "authorization: Bearer TOKEN".
    allowed = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~+/=")
    if token is not None and (not token or not set(token) <= allowed):
        raise ConfigError(
            "token: use letters, digits and -._~+/= only (RFC 6750 bearer token)", field="token"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class RPCServerConfig:
    """``netstack rpc serve``: the gRPC notes service."""

    # 50051 is the port every gRPC tutorial and grpcurl example uses.
    bind: str = field(default="127.0.0.1:50051", metadata=_help("HOST:PORT or [IPv6]:PORT"))
    db: str | None = field(
        default=None,
        metadata=_help("SQLite file or postgresql://... (none: notes.sqlite3 in the data dir)"),
    )
    data_dir: str | None = field(
        default=None,
        metadata=_help("where the default database lives (none: $XDG_DATA_HOME/netstack)"),
    )
    token: str | None = field(
        default=None,
        metadata=_help("require 'authorization: Bearer TOKEN' (none: no auth; health stays open)"),
    )
    # Without a client deadline a store call still must not hang a handler forever.
    store_timeout: float = field(
        default=30.0, metadata=_help("longest store call when the client sets no deadline")
    )
    # uvicorn's timeout_graceful_shutdown is unset by default; gunicorn's is 30 s.
    grace_period: float = field(
        default=10.0, metadata=_help("on shutdown, wait this long for in-flight calls")
    )
    # Off by default, like `netstack serve`: an open port is something to opt into.
    metrics_bind: str | None = field(
        default=None, metadata=_help("HOST:PORT for Prometheus /metrics (none: off)")
    )
    rpc_limits: RPCLimits = field(default_factory=RPCLimits)
    tls: TLS = field(default_factory=TLS)

    def __post_init__(self) -> None:
        parse_hostport(self.bind, field="bind")
        if self.tls.enabled and self.tls.certfile is None:
            raise ConfigError("a TLS server needs certfile and keyfile", field="certfile")
        if self.db is not None and "://" in self.db:
            scheme = self.db.split("://", 1)[0].lower()
            if scheme not in DB_SCHEMES:
                raise ConfigError(
                    f"db: unsupported scheme {scheme!r}; use a file path or postgresql://",
                    field="db",
                )
        _check_token(self.token)
        _positive("store_timeout", self.store_timeout)
        _non_negative("grace_period", self.grace_period)
        if self.metrics_bind is not None:
            parse_hostport(self.metrics_bind, field="metrics_bind")


@dataclass(frozen=True, slots=True, kw_only=True)
class RPCClientConfig:
    """``netstack rpc call``: a reflection-driven gRPC client."""

    connect: str = field(default="127.0.0.1:50051", metadata=_help("server HOST:PORT"))
    token: str | None = field(
        default=None, metadata=_help("send 'authorization: Bearer TOKEN' (none: no auth)")
    )
    # grpcurl has no default deadline; a unary CLI call should not hang on a stuck server,
    # while a stream (WatchNotes) is meant to run until Ctrl-C.
    deadline: float | None = field(
        default=None,
        metadata=_help(
            "seconds the call may take (none: 10 s for unary calls, no limit for streams)"
        ),
    )
    # Only cafile matters to the client; the CLI leaves certfile/keyfile off its --help.
    tls: TLS = field(default_factory=TLS)

    def __post_init__(self) -> None:
        parse_hostport(self.connect, field="connect")
        _check_token(self.token)
        if self.deadline is not None:
            _positive("deadline", self.deadline)


# --------------------------------------------------------------------------- netstack up


@dataclass(frozen=True, slots=True, kw_only=True)
class UpConfig:
    """``netstack up``: the reference architecture on one machine."""

    # The port Flask's and Django's development servers use.
    listen: str = field(
        default="127.0.0.1:8000", metadata=_help("public HOST:PORT of the balancer")
    )
    # Two is the least that shows balancing and failover.
    web_servers: int = field(default=2, metadata=_help("netstack serve processes (1-16)"))
    data_dir: str | None = field(
        default=None,
        metadata=_help(
            "SQLite databases live here (none: $XDG_DATA_HOME/netstack if set, "
            "else ./netstack-data)"
        ),
    )
    db: str | None = field(
        default=None,
        metadata=_help("postgresql://... shared by the notes and chat services (none: SQLite)"),
    )
    redis: str | None = field(
        default=None, metadata=_help("redis://... for chat scale-out (none: no Redis)")
    )
    demo_load: bool = field(
        default=False, metadata=_help("run a bounded load generator so the dashboard moves")
    )
    admin_token: str | None = field(
        default=None,
        metadata=_help("bearer token of the balancer's admin API (none: a random one)"),
    )

    def __post_init__(self) -> None:
        parse_hostport(self.listen, field="listen")
        if not 1 <= self.web_servers <= 16:
            raise ConfigError(
                f"web_servers must be 1-16, got {self.web_servers!r}", field="web_servers"
            )
        if self.db is not None and not self.db.startswith(("postgresql://", "postgres://")):
            raise ConfigError(
                f"db: expected postgresql://..., got {self.db.split('://', 1)[0]!r} "
                "(the default is SQLite in --data-dir)",
                field="db",
            )
        if self.redis is not None and not self.redis.startswith(REDIS_SCHEMES):
            raise ConfigError(
                f"redis: expected redis://, rediss:// or unix://, got {self.redis!r}",
                field="redis",
            )
        if self.admin_token is not None and len(self.admin_token) < 16:
            raise ConfigError(
                "admin_token: use 16 characters or more (or leave it out for a random one)",
                field="admin_token",
            )


@dataclass(frozen=True, slots=True, kw_only=True)
class NotesWebConfig:
    """The bundled notes web app (``netstack serve netstack.servers.up.web:create_app
    --factory``), read from ``NETSTACK_*`` variables by the factory."""

    notes_rpc: str = field(
        default="127.0.0.1:50051", metadata=_help("HOST:PORT of the gRPC notes service")
    )
    notes_token: str | None = field(
        default=None, metadata=_help("bearer token for the notes service (none: no auth)")
    )
    # Below the balancer's 60 s request_timeout, so a stuck tier answers 504 from here,
    # with a body that says which tier.
    rpc_deadline: float = field(
        default=5.0, metadata=_help("deadline of each gRPC call made for a request, seconds")
    )
    served_by: str = field(
        default="web", metadata=_help("X-Served-By header value: this server's name")
    )

    def __post_init__(self) -> None:
        parse_hostport(self.notes_rpc, field="notes_rpc")
        _check_token(self.notes_token)
        _positive("rpc_deadline", self.rpc_deadline)
        if not self.served_by or not _TOKEN_RE.fullmatch(self.served_by):
            raise ConfigError(
                f"served_by: a short name without spaces, got {self.served_by!r}",
                field="served_by",
            )
