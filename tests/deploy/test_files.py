"""deploy/: every file parses, the balancer TOMLs load with netstack's own loader."""

from __future__ import annotations

import pytest

from netstack.config import BalancerConfig
from netstack.servers.lb import load_config
from tests.deploy.support import DEPLOY, toml, yaml_docs

YAML = sorted([*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")])
BALANCER_TOMLS = sorted(DEPLOY.rglob("balancer.toml"))


def test_there_is_something_to_check():
    assert len(YAML) >= 9
    assert [p.parent.name for p in BALANCER_TOMLS] == ["compose", "k8s", "systemd"]


@pytest.mark.parametrize("path", YAML, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path):
    for doc in yaml_docs(path):
        assert isinstance(doc, dict), path


@pytest.mark.parametrize("path", BALANCER_TOMLS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_balancer_toml_loads_with_the_balancers_own_loader(path):
    cfg = load_config(toml(path), source=str(path), env={})
    assert isinstance(cfg, BalancerConfig)
    (frontend,) = cfg.frontends
    assert frontend.mode == "http"
    assert frontend.pool == "web"
    (route,) = frontend.routes
    assert (route.path_prefix, route.rewrite_prefix, route.pool) == ("/chat/", "/", "chat")
    for pool in cfg.pools:
        assert pool.health.check_path == "/healthz", pool.name  # HTTP checks, not TCP


def test_readme_explains_every_file():
    readme = (DEPLOY / "README.md").read_text()
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and path.name != "README.md":
            assert str(path.relative_to(DEPLOY)) in readme, path


def test_the_image_user_is_the_one_compose_and_kubernetes_run_as():
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    (user,) = [line.split()[1] for line in lines if line.startswith("USER ")]
    uid, gid = user.split(":")
    assert int(uid) != 0
    (compose,) = yaml_docs(DEPLOY / "compose" / "compose.yaml")
    assert compose["services"]["rpc"]["user"] == user
    for tier in ("balancer", "web", "rpc", "chat"):
        (workload, _service) = yaml_docs(DEPLOY / "k8s" / f"{tier}.yaml")
        context = workload["spec"]["template"]["spec"]["securityContext"]
        assert (context["runAsUser"], context["runAsGroup"]) == (int(uid), int(gid)), tier
