"""The balancer's config: quick form, full TOML form, and errors naming file, key, reason."""

from __future__ import annotations

import tomllib

import pytest

from netstack.config import BalancerQuickConfig, build
from netstack.errors import ConfigError
from netstack.servers.lb.config import is_full_form, load

FULL = """
[limits]
max_connections = 50

[timeouts]
connect_timeout = 2.5

[health]
rise = 4

[frontends.web]
listen = "127.0.0.1:8080"
mode = "http"
pool = "app"
[[frontends.web.routes]]
path_prefix = "/api"
pool = "api"
[[frontends.web.routes]]
host = "admin.example.com"
header = "X-Tenant=blue"
pool = "api"

[frontends.raw]
listen = "127.0.0.1:9090"
pool = "api"

[pools.app]
algorithm = "consistent_hash"
hash_key = "cookie:session"
backends = ["127.0.0.1:9001", { address = "127.0.0.1:9002", weight = 3, name = "big" }]
[pools.app.health]
rise = 1
slow_start = 5
[pools.app.timeouts]
connect_timeout = 1

[pools.api]
backends = ["[::1]:9003"]
"""


def parse(text: str, **kw):
    return load(tomllib.loads(text), source="lb.toml", **kw)


def test_full_form() -> None:
    cfg = parse(FULL)
    assert [f.name for f in cfg.frontends] == ["web", "raw"]
    web = cfg.frontends[0]
    assert (web.listen, web.mode, web.pool) == ("127.0.0.1:8080", "http", "app")
    assert [(r.path_prefix, r.host, r.header, r.pool) for r in web.routes] == [
        ("/api", None, None, "api"),
        (None, "admin.example.com", "X-Tenant=blue", "api"),
    ]
    assert cfg.frontends[1].mode == "tcp"
    app = cfg.pool("app")
    assert (app.algorithm, app.hash_key) == ("consistent_hash", "cookie:session")
    assert [(b.address, b.weight, b.name) for b in app.backends] == [
        ("127.0.0.1:9001", 1, "127.0.0.1:9001"),
        ("127.0.0.1:9002", 3, "big"),
    ]
    assert (app.health.rise, app.health.slow_start, app.timeouts.connect_timeout) == (1, 5.0, 1.0)
    api = cfg.pool("api")
    assert (api.health.rise, api.timeouts.connect_timeout) == (4, 2.5)  # top-level defaults
    assert cfg.limits.max_connections == 50
    assert cfg.limits.listen_backlog == 4096


def test_env_and_flags_set_top_level_defaults_pool_tables_win() -> None:
    cfg = parse(FULL, env={"NETSTACK_RISE": "7"}, flags={"max_connections": "9"})
    assert cfg.limits.max_connections == 9
    assert cfg.pool("api").health.rise == 7
    assert cfg.pool("app").health.rise == 1


def test_quick_form_from_flags_and_flat_file() -> None:
    doc = tomllib.loads(
        'listen = "127.0.0.1:0"\nalgorithm = "random"\n[limits]\nlisten_backlog = 64\n'
    )
    assert not is_full_form(doc)
    cfg = load(doc, source="q.toml", flags={"backend": ("127.0.0.1:1", "127.0.0.1:2")})
    [pool] = cfg.pools
    assert [b.address for b in pool.backends] == ["127.0.0.1:1", "127.0.0.1:2"]
    assert pool.algorithm == "random"
    assert cfg.limits.listen_backlog == 64
    assert cfg.frontends[0].listen == "127.0.0.1:0"


def test_quick_form_backend_env_is_comma_separated() -> None:
    cfg = load({}, env={"NETSTACK_BACKEND": "127.0.0.1:1,127.0.0.1:2"})
    assert len(cfg.pools[0].backends) == 2


def test_quick_form_needs_a_backend() -> None:
    with pytest.raises(ConfigError, match="--backend") as info:
        load({})
    assert info.value.field == "backend"


def test_quick_form_file_error_names_the_file() -> None:
    with pytest.raises(ConfigError, match=r"^q\.toml: unknown key 'nope'"):
        load({"nope": 1}, source="q.toml")


def test_full_form_refuses_quick_flags() -> None:
    with pytest.raises(ConfigError, match=r"--backend: lb\.toml defines frontends and pools"):
        parse(FULL, flags={"backend": ("127.0.0.1:1",)})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("[pools.api]", "[pools.api]\nalgorithm = 'fastest'"),
            "lb.toml: pools.api.algorithm: must be one of round_robin",
        ),
        (
            ('backends = ["[::1]:9003"]', 'backends = ["nonsense"]'),
            "lb.toml: pools.api.backends[0].address: address: expected HOST:PORT, got 'nonsense'",
        ),
        (
            ('backends = ["[::1]:9003"]', "backends = []"),
            "lb.toml: pools.api.backends: expected a list",
        ),
        (
            ('backends = ["[::1]:9003"]', "backends = [3]"),
            "lb.toml: pools.api.backends[0]: expected HOST:PORT or a table",
        ),
        (
            ('backends = ["[::1]:9003"]', "backends = [{ weight = 2 }]"),
            "lb.toml: pools.api.backends[0].address: missing",
        ),
        (
            ('backends = ["[::1]:9003"]', 'backends = [{ address = "h:1", weight = 999 }]'),
            "lb.toml: pools.api.backends[0].weight: weight must be 1-256",
        ),
        (
            ('backends = ["[::1]:9003"]', 'backends = [{ address = "h:1", name = 5 }]'),
            "lb.toml: pools.api.backends[0].name: expected a string",
        ),
        (
            ('backends = ["[::1]:9003"]', 'backends = [{ address = "h:1", port = 5 }]'),
            "lb.toml: pools.api.backends[0].port: unknown key",
        ),
        (
            ('backends = ["[::1]:9003"]', 'backends = ["h:1", "h:1"]'),
            "lb.toml: pools.api.backends: backend 'h:1' is listed twice",
        ),
        (
            ("[pools.app.health]\nrise = 1", "[pools.app.health]\nrise = 0"),
            "lb.toml: pools.app.health.rise: rise must be > 0",
        ),
        (
            ("[pools.app.health]\nrise = 1", "[pools.app.health]\nrize = 1"),
            "lb.toml: pools.app.health.rize: unknown key",
        ),
        (
            (
                "[pools.app.timeouts]\nconnect_timeout = 1",
                "[pools.app.timeouts]\nconnect_timeout = 'x'",
            ),
            "lb.toml: pools.app.timeouts.connect_timeout: expected a number, got 'x'",
        ),
        (
            ('hash_key = "cookie:session"', 'hash_key = "cookie"'),
            "lb.toml: pools.app.hash_key: hash_key must be client_ip, header:NAME or cookie:NAME",
        ),
        (
            ('pool = "app"\n[[', 'pool = "nope"\n[['),
            "lb.toml: frontends.web.pool: unknown pool 'nope' (pools: app, api)",
        ),
        (
            ('pool = "api"\n[[', 'pool = "gone"\n[['),
            "lb.toml: frontends.web.routes[0].pool: unknown pool 'gone'",
        ),
        (
            ('path_prefix = "/api"', 'path_prefix = "api"'),
            "lb.toml: frontends.web.routes[0].path_prefix: path_prefix must start with '/'",
        ),
        (
            ('path_prefix = "/api"\n', ""),
            "lb.toml: frontends.web.routes[0].pool: a route needs host, path_prefix or header",
        ),
        (('mode = "http"', 'mode = "tcp"'), "lb.toml: frontends.web.routes: routes need mode"),
        (('mode = "http"', 'mode = "smtp"'), "lb.toml: frontends.web.mode: must be one of tcp"),
        (
            ('listen = "127.0.0.1:9090"', 'listen = "127.0.0.1:8080"'),
            "lb.toml: frontend 'raw': tcp 127.0.0.1:8080 is already used",
        ),
        (
            ('listen = "127.0.0.1:9090"', 'listen = "9090"'),
            "lb.toml: frontends.raw.listen: listen: expected HOST:PORT",
        ),
        (
            ("[limits]\nmax_connections = 50", "[limits]\nmax_connections = -1"),
            "lb.toml: max_connections must be > 0",
        ),
        (("[limits]\n", "[limitz]\n"), "lb.toml: limitz: unknown key"),
        (
            ("[frontends.raw]\n", '[frontends.raw]\nname = "x"\n'),
            "lb.toml: frontends.raw.name: unknown key",
        ),
    ],
)
def test_errors_name_file_key_and_reason(edit, message) -> None:
    old, new = edit
    assert old in FULL
    text = FULL.replace(old, new, 1)
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({"pools": {"a": {"backends": ["h:1"]}}}, "lb.toml: frontends: expected one or more"),
        ({"pools": {"a": 1}, "frontends": {}}, "lb.toml: pools.a: expected a table"),
        (
            {"pools": {"a": {"backends": ["h:1"], "health": 3}}, "frontends": {"f": {"pool": "a"}}},
            "lb.toml: pools.a.health: expected a table",
        ),
        (
            {"pools": {"a": {"backends": ["h:1"]}}, "frontends": {"f": {"pool": "a", "routes": 1}}},
            "lb.toml: frontends.f.routes: expected [[frontends.f.routes]] tables",
        ),
        (
            {"pools": {"a": {"backends": ["h:1"]}}, "frontends": {"f": {"routes": [1]}}},
            "lb.toml: frontends.f.routes[0]: expected a table",
        ),
        (
            {
                "pools": {"a": {"backends": ["h:1"]}},
                "frontends": {"f": {"mode": "http", "routes": [{"host": "x"}]}},
            },
            "lb.toml: frontends.f.routes[0].pool: missing",
        ),
        (
            {
                "pools": {"a": {"backends": ["h:1"]}},
                "frontends": {"f": {"mode": "http", "routes": [{"pool": "a"}]}},
            },
            "lb.toml: frontends.f.routes[0].pool: a route needs host, path_prefix or header",
        ),
    ],
)
def test_structural_errors(doc, message) -> None:
    with pytest.raises(ConfigError) as info:
        load(doc, source="lb.toml")
    assert str(info.value).startswith(message), str(info.value)


def test_quick_config_validates_addresses() -> None:
    with pytest.raises(ConfigError, match="backend: expected HOST:PORT"):
        build(BalancerQuickConfig, flags={"backend": ("nope",)})


def test_proxy_settings_in_both_forms() -> None:
    flags = {"backend": ("h:1",), "send_proxy": "v2", "accept_proxy": True}
    cfg = load({}, flags={**flags, "proxy_allow_ips": "10.0.0.0/8"})
    assert cfg.pools[0].send_proxy == "v2"
    assert (cfg.frontends[0].accept_proxy, cfg.frontends[0].proxy_allow_ips) == (
        True,
        "10.0.0.0/8",
    )
    full = parse(
        FULL.replace("[pools.api]\n", '[pools.api]\nsend_proxy = "v1"\n').replace(
            "[frontends.raw]\n", "[frontends.raw]\naccept_proxy = true\n"
        )
    )
    assert full.pool("api").send_proxy == "v1"
    assert full.frontends[1].accept_proxy
    with pytest.raises(ConfigError, match=r"pools\.api\.send_proxy: must be one of none, v1, v2"):
        parse(FULL.replace("[pools.api]\n", '[pools.api]\nsend_proxy = "v3"\n'))


def test_documented_example_is_valid() -> None:
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "docs" / "balance.example.toml"
    cfg = load(tomllib.loads(path.read_text()), source=str(path))
    assert [f.name for f in cfg.frontends] == ["db", "dns", "edge"]
    assert cfg.pool("web").health.slow_start == 30.0
    assert cfg.pool("resolvers").timeouts.udp_session_timeout == 10.0
    assert cfg.pool("postgres").backends[1].name == "replica"


def test_l4_frontend_needs_client_ip_hash_key() -> None:
    with pytest.raises(ConfigError, match="hash_key 'cookie:session' needs HTTP") as info:
        parse(
            FULL.replace(
                'listen = "127.0.0.1:9090"\npool = "api"', 'listen = "127.0.0.1:9090"\npool = "app"'
            )
        )
    assert str(info.value).startswith("lb.toml: pool 'app'")
    with pytest.raises(ConfigError, match="needs HTTP"):
        load({}, flags={"backend": ("h:1",), "hash_key": "header:X-User"})


ADMIN_FILE = """
[frontends.web]
listen = "127.0.0.1:0"
mode = "http"
pool = "web"
[pools.web]
backends = ["127.0.0.1:9"]
[admin]
admin_bind = "127.0.0.1:0"
"""


def test_admin_token_from_the_environment_completes_a_file_with_admin_bind() -> None:
    """The token belongs in NETSTACK_ADMIN_TOKEN, not in the file; the file alone is
    incomplete, not wrong."""
    doc = tomllib.loads(ADMIN_FILE)
    cfg = load(doc, source="lb.toml", env={"NETSTACK_ADMIN_TOKEN": "t" * 20})
    assert (cfg.admin.admin_bind, cfg.admin.admin_token) == ("127.0.0.1:0", "t" * 20)
    with pytest.raises(ConfigError) as missing:
        load(doc, source="lb.toml", env={})
    assert str(missing.value).startswith("admin_token: the admin API needs a token")
    doc["admin"]["admin_token"] = "short"
    with pytest.raises(ConfigError) as short:
        load(doc, source="lb.toml", env={})
    assert str(short.value).startswith("lb.toml: admin_token:")  # the file set it: named
