from __future__ import annotations

from typing import Literal

import pytest

from netstack.config import (
    TLS,
    BenchModelsConfig,
    EchoClientConfig,
    EchoServerConfig,
    Limits,
    LogConfig,
    Timeouts,
    build,
    parse_hostport,
    specs,
)
from netstack.errors import ConfigError


def test_defaults_are_valid() -> None:
    for cls in (
        Limits,
        Timeouts,
        TLS,
        LogConfig,
        EchoServerConfig,
        EchoClientConfig,
        BenchModelsConfig,
    ):
        cls()


def test_configs_are_frozen() -> None:
    cfg = Limits()
    with pytest.raises(AttributeError):
        cfg.max_frame_bytes = 1  # type: ignore[misc]


def test_specs_flatten_groups() -> None:
    by_name = {s.name: s for s in specs(EchoServerConfig)}
    spec = by_name["max_frame_bytes"]
    assert spec.group == "limits"
    assert spec.flag == "--max-frame-bytes"
    assert spec.env == "NETSTACK_MAX_FRAME_BYTES"
    assert spec.default == 1 << 20
    assert spec.help
    assert by_name["proto"].choices == ("tcp", "udp")
    assert by_name["bind"].choices is None
    assert all(s.help for s in by_name.values()), "every setting needs a help text"


def test_precedence_defaults_toml_env_flags() -> None:
    toml = {"limits": {"max_frame_bytes": 10}, "bind": "127.0.0.1:1"}
    env = {"NETSTACK_MAX_FRAME_BYTES": "20", "NETSTACK_UNRELATED": "x"}
    assert build(EchoServerConfig).limits.max_frame_bytes == 1 << 20
    assert build(EchoServerConfig, toml=toml).limits.max_frame_bytes == 10
    assert build(EchoServerConfig, toml=toml, env=env).limits.max_frame_bytes == 20
    cfg = build(
        EchoServerConfig, toml=toml, env=env, flags={"max_frame_bytes": "30", "proto": None}
    )
    assert cfg.limits.max_frame_bytes == 30
    assert cfg.bind == "127.0.0.1:1"
    assert cfg.proto == "tcp"


def test_flat_toml_keys_also_accepted() -> None:
    assert build(EchoServerConfig, toml={"idle_timeout": 2}).timeouts.idle_timeout == 2.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"toml": {"nope": 1}}, "nope"),
        ({"toml": {"limits": {"idle_timeout": 1}}}, "idle_timeout"),
        ({"toml": {"max_frame_bytes": "big"}}, "max_frame_bytes"),
        ({"toml": {"max_frame_bytes": True}}, "max_frame_bytes"),
        ({"toml": {"bind": 5}}, "bind"),
        ({"toml": {"idle_timeout": "soon"}}, "idle_timeout"),
        ({"env": {"NETSTACK_MAX_FRAME_BYTES": "-1"}}, "max_frame_bytes"),
        ({"env": {"NETSTACK_PROTO": "sctp"}}, "proto"),
        ({"flags": {"bind": "nonsense"}}, "bind"),
        ({"flags": {"bind": "::1:80"}}, "bind"),
        ({"flags": {"bind": "[::1:80"}}, "bind"),
        ({"flags": {"bind": "h:99999"}}, "bind"),
        ({"flags": {"bind": "h:x"}}, "bind"),
        ({"flags": {"certfile": "c.pem"}}, "keyfile"),
        ({"flags": {"keyfile": "k.pem"}}, "certfile"),
        ({"flags": {"proto": "udp", "certfile": "c", "keyfile": "k"}}, "certfile"),
        ({"flags": {"cafile": "ca.pem"}}, "certfile"),
        ({"flags": {"max_datagram_bytes": "70000"}}, "max_datagram_bytes"),
        ({"flags": {"write_buffer_low_bytes": "999999"}}, "write_buffer_low_bytes"),
        ({"flags": {"graceful_timeout": "-1"}}, "graceful_timeout"),
        ({"flags": {"connect_timeout": "0"}}, "connect_timeout"),
    ],
)
def test_bad_values_name_the_field(kwargs: dict[str, dict[str, object]], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(EchoServerConfig, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("flags", "field"),
    [
        ({"count": "0"}, "count"),
        ({"retries": "-1"}, "retries"),
        ({"backoff_max": "0.01"}, "backoff_max"),
        ({"framing": "line", "size": "70000"}, "size"),
        ({"size": str(2 << 20)}, "size"),
        ({"proto": "udp", "size": "65504"}, "size"),
        ({"connect": "x"}, "connect"),
    ],
)
def test_client_bad_values(flags: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        build(EchoClientConfig, flags=flags)
    assert info.value.field == field


def test_value_conversions() -> None:
    cfg = build(
        EchoServerConfig,
        env={"NETSTACK_IDLE_TIMEOUT": "none", "NETSTACK_MAX_CONNECTIONS": "1_000"},
        flags={"max_line_bytes": "0x100"},
    )
    assert cfg.timeouts.idle_timeout is None
    assert cfg.limits.max_connections == 1000
    assert cfg.limits.max_line_bytes == 256
    assert build(EchoServerConfig, toml={"idle_timeout": 3}).timeouts.idle_timeout == 3.0


def test_tuples_and_bools() -> None:
    cfg = build(BenchModelsConfig, env={"NETSTACK_QUICK": "yes"}, flags={"connections": "1, 5"})
    assert cfg.quick is True
    assert cfg.connections == (1, 5)
    assert build(BenchModelsConfig, toml={"sizes": [8, 16], "quick": False}).sizes == (8, 16)
    assert build(BenchModelsConfig, flags={"race": True}).race is True
    with pytest.raises(ConfigError, match="quick"):
        build(BenchModelsConfig, env={"NETSTACK_QUICK": "maybe"})
    with pytest.raises(ConfigError, match="connections"):
        build(BenchModelsConfig, flags={"connections": "1,x"})
    with pytest.raises(ConfigError, match="connections"):
        build(BenchModelsConfig, toml={"connections": 5})
    with pytest.raises(ConfigError, match="models"):
        build(BenchModelsConfig, flags={"models": "threaded,fibers"})
    with pytest.raises(ConfigError, match="connections"):
        build(BenchModelsConfig, flags={"connections": "0"})
    with pytest.raises(ConfigError, match="sizes"):
        build(BenchModelsConfig, flags={"sizes": "-3"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:0", ("::1", 0)),
        ("localhost:65535", ("localhost", 65535)),
    ],
)
def test_parse_hostport(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


def test_tls_enabled() -> None:
    assert not TLS().enabled
    assert TLS(cafile="x").enabled
    assert TLS(certfile="c", keyfile="k").enabled


def test_duplicate_setting_names_are_a_bug() -> None:
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Bad:
        limits: Limits = field(default_factory=Limits)
        max_frame_bytes: int = field(default=1, metadata={"help": "x"})

    with pytest.raises(TypeError, match="unique"):
        specs(Bad)


def test_unsupported_type_is_a_bug() -> None:
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Odd:
        ratio: complex = field(default=1j, metadata={"help": "x"})

    with pytest.raises(ConfigError, match="unsupported"):
        build(Odd, flags={"ratio": "1"})


def test_literal_without_none() -> None:
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class Mode:
        mode: Literal["a", "b"] = field(default="a", metadata={"help": "x"})

    with pytest.raises(ConfigError, match="one of a, b"):
        build(Mode, flags={"mode": "none"})
