"""L7 settings: validation with clear errors, and the documented example stays valid."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

from netstack.config import (
    BalancerLimits,
    BalancerTimeouts,
    FrontendConfig,
    HealthConfig,
    PoolConfig,
    RouteConfig,
    parse_header_rule,
)
from netstack.errors import ConfigError
from netstack.servers.lb import load_config


def test_documented_http_example_is_valid() -> None:
    path = Path(__file__).resolve().parents[3] / "docs" / "balance-http.md"
    block = re.search(r"```toml\n(.*?)```", path.read_text(), re.S)
    assert block is not None
    cfg = load_config(tomllib.loads(block[1]), source=str(path))
    web = cfg.frontends[0]
    assert web.mode == "http"
    assert web.rate_limit == 5
    assert web.routes[0].rewrite_prefix == "/v2"
    assert cfg.pool("app").health.check_path == "/"
    assert cfg.pool("api").timeouts.request_timeout == 10.0


def test_quick_form_http_flags() -> None:
    cfg = load_config(
        {},
        flags={
            "backend": ("127.0.0.1:1",),
            "mode": "http",
            "rate_limit": "7.5",
            "forwarded_allow_ips": "10.0.0.0/8",
            "sticky_cookie": "srv",
            "check_path": "/healthz",
        },
    )
    assert cfg.frontends[0].rate_limit == 7.5
    assert cfg.frontends[0].forwarded_allow_ips == "10.0.0.0/8"
    assert cfg.pools[0].sticky_cookie == "srv"
    assert cfg.pools[0].health.check_path == "/healthz"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: RouteConfig(pool="p", host="h", rewrite_prefix="/x"), "needs path_prefix"),
        (lambda: RouteConfig(pool="p", path_prefix="/a", rewrite_prefix="x"), "start with '/'"),
        (lambda: RouteConfig(pool="p", host="h", add_request_headers=("nocolon",)), "NAME: VALUE"),
        (lambda: RouteConfig(pool="p", host="h", remove_request_headers=("a b",)), "header name"),
        (lambda: FrontendConfig(add_response_headers=("X: a\x01",)), "NAME: VALUE"),
        (lambda: FrontendConfig(rate_limit=0), "rate_limit"),
        (lambda: FrontendConfig(rate_burst=0), "rate_burst"),
        (lambda: FrontendConfig(request_id_header="x id"), "request_id_header"),
        (lambda: HealthConfig(check_path="health"), "check_path"),
        (lambda: HealthConfig(check_status=99), "check_status"),
        (lambda: BalancerLimits(retry_budget=1.5), "retry_budget"),
        (lambda: BalancerLimits(max_idle_backend_connections=-1), "max_idle"),
        (lambda: BalancerTimeouts(request_timeout=0), "request_timeout"),
        (lambda: PoolConfig(backends=(), sticky_cookie="a;b"), "sticky_cookie"),
    ],
)
def test_bad_http_settings(make, message) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_header_rule_parsing() -> None:
    assert parse_header_rule("X-Env:  prod ", field="f") == (b"x-env", b"prod")
    with pytest.raises(ConfigError, match="Latin-1"):
        parse_header_rule("X: \u20ac", field="f")


def test_bad_route_in_file_names_the_key() -> None:
    doc = {
        "frontends": {"web": {"mode": "http", "routes": [{"pool": "app", "rewrite_prefix": "/x"}]}},
        "pools": {"app": {"backends": ["127.0.0.1:1"]}},
    }
    with pytest.raises(ConfigError, match=r"lb.toml: frontends.web.routes\[0\]"):
        load_config(doc, source="lb.toml")


@pytest.mark.parametrize("name", ["forwarded_allow_ips", "allow_ips", "deny_ips"])
def test_bad_ip_lists_are_refused_before_binding(name) -> None:
    import dataclasses

    from netstack.servers.lb import Balancer
    from tests.servers.lb.http_support import http_config

    cfg = http_config(1)
    fe = dataclasses.replace(cfg.frontends[0], **{name: "10.0.0.300"})
    with pytest.raises(ConfigError, match=f"frontend 'default': {name}: trusted proxy"):
        Balancer(dataclasses.replace(cfg, frontends=(fe,)))
