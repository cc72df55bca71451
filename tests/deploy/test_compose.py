"""deploy/compose: the compose file, its .env.example and the balancer TOML agree."""

from __future__ import annotations

import pytest

from tests.deploy.support import (
    COMPOSE_VAR,
    DEPLOY,
    bind_port,
    check_command,
    hostport,
    substitute,
    toml,
    yaml_docs,
)

COMPOSE = DEPLOY / "compose"
NETSTACK_SERVICES = {"balancer", "web-1", "web-2", "rpc", "chat-1", "chat-2"}


def env_example() -> dict[str, str]:
    values = {}
    for line in (COMPOSE / ".env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            values[name] = value
    return values


@pytest.fixture(scope="module")
def compose() -> dict:
    (doc,) = yaml_docs(COMPOSE / "compose.yaml")
    return doc


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def environment(service: dict) -> dict[str, str]:
    raw = service.get("environment", {})
    values = env_example()
    return {k: substitute(str(v), values, COMPOSE_VAR) for k, v in raw.items()}


def commands(services: dict) -> dict[str, list[str]]:
    return {name: s["command"] for name, s in services.items() if name in NETSTACK_SERVICES}


def test_the_whole_architecture_is_there(services):
    assert set(services) == NETSTACK_SERVICES | {"postgres", "redis"}


def test_every_variable_used_is_in_the_env_example(compose):
    text = (COMPOSE / "compose.yaml").read_text()
    substitute(text, env_example(), COMPOSE_VAR)  # asserts each one is defined
    committed = {p.name for p in COMPOSE.iterdir()}
    assert ".env" not in committed, "the real .env holds secrets: never commit it"


def test_every_netstack_command_parses_with_its_environment(services):
    files = {"/etc/netstack/balancer.toml": COMPOSE / "balancer.toml"}
    for name in NETSTACK_SERVICES:
        service = services[name]
        check_command(service["command"], environment(service), files)
        health = service["healthcheck"]["test"]
        if health[1] == "netstack":
            check_command(health[1:], {})


def test_balancer_backends_are_services_listening_on_those_ports(services):
    doc = toml(COMPOSE / "balancer.toml")
    for pool in doc["pools"].values():
        for backend in pool["backends"]:
            host, port = hostport(backend["address"])
            assert host in services, f"backend {host} is not a compose service"
            parsed = check_command(services[host]["command"], environment(services[host]))
            assert bind_port(parsed) == port, f"{host} does not listen on {port}"
    routes = doc["frontends"]["public"]["routes"]
    chat = next(r for r in routes if r["pool"] == "chat")
    assert chat["path_prefix"] == "/chat/"
    assert all(
        backend["address"].startswith("chat-") for backend in doc["pools"]["chat"]["backends"]
    )
    for pool in doc["pools"].values():
        assert pool["health"]["check_path"] == "/healthz"  # HTTP health checks


def test_only_the_balancer_is_published_on_its_listen_port(services):
    doc = toml(COMPOSE / "balancer.toml")
    _, listen = hostport(doc["frontends"]["public"]["listen"])
    published = [substitute(p, env_example(), COMPOSE_VAR) for p in services["balancer"]["ports"]]
    assert [int(p.rsplit(":", 1)[1]) for p in published] == [listen]
    assert [n for n, s in services.items() if "ports" in s] == ["balancer"]


def test_web_servers_find_rpc_and_share_its_token(services):
    rpc_port = bind_port(check_command(services["rpc"]["command"], environment(services["rpc"])))
    rpc_token = environment(services["rpc"])["NETSTACK_TOKEN"]
    for name in ("web-1", "web-2"):
        env = environment(services[name])
        assert hostport(env["NETSTACK_NOTES_RPC"]) == ("rpc", rpc_port)
        assert env["NETSTACK_NOTES_TOKEN"] == rpc_token
        assert env["NETSTACK_SERVED_BY"] == name


def test_chat_and_rpc_use_the_postgres_and_redis_services(services):
    password = env_example()["POSTGRES_PASSWORD"]
    user = services["postgres"]["environment"]["POSTGRES_USER"]
    database = services["postgres"]["environment"]["POSTGRES_DB"]
    url = f"postgresql://{user}:{password}@postgres:5432/{database}"
    for name in ("rpc", "chat-1", "chat-2"):
        assert environment(services[name])["NETSTACK_DB"] == url
    for name in ("chat-1", "chat-2"):
        assert environment(services[name])["NETSTACK_REDIS"].startswith("redis://redis:6379/")


def test_services_restart_have_limits_health_checks_and_run_unprivileged(services):
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name
        assert service["deploy"]["resources"]["limits"]["memory"], name
        assert service["healthcheck"]["test"][0] == "CMD", name
        assert "no-new-privileges:true" in service["security_opt"], name
        if name in NETSTACK_SERVICES:
            assert service["user"] == "10001:10001", name
            assert service["read_only"] is True, name
            assert service["cap_drop"] == ["ALL"], name
    assert services["redis"]["user"] != "0"
