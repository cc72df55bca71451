"""deploy/k8s: manifests have what the API server needs and agree with one another."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.support import (
    DEPLOY,
    K8S_VAR,
    bind_port,
    check_command,
    hostport,
    substitute,
    toml,
    yaml_docs,
)
from tests.helpers import TIMEOUT

K8S = DEPLOY / "k8s"
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}
NETSTACK_TIERS = {"balancer", "web", "rpc", "chat"}


def kustomization() -> dict[str, Any]:
    (doc,) = yaml_docs(K8S / "kustomization.yaml")
    return doc


def secret() -> dict[str, Any]:
    (doc,) = yaml_docs(K8S / "secret.example.yaml")
    assert doc["kind"] == "Secret"
    return doc


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    """Every object kustomization.yaml applies."""
    out = []
    for name in kustomization()["resources"]:
        out.extend(yaml_docs(K8S / name))
    return out


def by_kind(objects, kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def workloads(objects) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] in WORKLOADS}


def containers(workload) -> list[dict[str, Any]]:
    return workload["spec"]["template"]["spec"]["containers"]


def container_env(container, values: dict[str, str]) -> dict[str, str]:
    """The container's environment with Secret refs and $(VAR) resolved from placeholders."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = substitute(item["value"], env, K8S_VAR)
        elif "secretKeyRef" in item["valueFrom"]:
            env[item["name"]] = values[item["valueFrom"]["secretKeyRef"]["key"]]
        else:
            env[item["name"]] = "from-the-downward-api"
    return env


def argv(container) -> list[str]:
    return [*container.get("command", []), *container.get("args", [])]


def test_kustomization_lists_every_manifest_and_its_files_exist():
    doc = kustomization()
    listed = set(doc["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secret.example.yaml"}
    assert listed == on_disk
    for generator in doc["configMapGenerator"]:
        for name in generator["files"]:
            assert (K8S / name).is_file(), name
    assert "secret.example.yaml" not in listed  # placeholders are never applied


def test_every_object_has_api_version_kind_and_name(objects):
    for obj in objects:
        assert obj["apiVersion"], obj
        assert obj["kind"], obj
        assert obj["metadata"]["name"], obj
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects}
    for tier in NETSTACK_TIERS | {"postgres", "redis"}:
        assert ("Service", tier) in kinds, tier


def test_selectors_match_template_labels(objects):
    for name, workload in workloads(objects).items():
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name
    for name, service in by_kind(objects, "Service").items():
        selector = service["spec"]["selector"]
        matched = [
            w
            for w in workloads(objects).values()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matched) == 1, f"Service {name} selects {len(matched)} workloads"
    for policy in by_kind(objects, "NetworkPolicy").values():
        selected = policy["spec"]["podSelector"]["matchLabels"]
        assert any(
            selected.items() <= w["spec"]["template"]["metadata"]["labels"].items()
            for w in workloads(objects).values()
        ), policy["metadata"]["name"]


def _port_names_and_numbers(workload) -> dict[Any, int]:
    ports: dict[Any, int] = {}
    for container in containers(workload):
        for port in container.get("ports", []):
            ports[port["containerPort"]] = port["containerPort"]
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    return ports


def test_service_target_ports_are_container_ports(objects):
    for name, service in by_kind(objects, "Service").items():
        selector = service["spec"]["selector"]
        workload = next(
            w
            for w in workloads(objects).values()
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        )
        ports = _port_names_and_numbers(workload)
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"Service {name}: {port['targetPort']}"


def test_containers_have_probes_limits_and_run_unprivileged(objects):
    for name, workload in workloads(objects).items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        ports = _port_names_and_numbers(workload)
        for container in containers(workload):
            for kind in ("readinessProbe", "livenessProbe"):
                probe = container[kind]
                handler = next(k for k in ("httpGet", "tcpSocket", "grpc", "exec") if k in probe)
                if handler != "exec":
                    assert probe[handler]["port"] in ports, f"{name} {kind}"
            limits = container["resources"]["limits"]
            assert limits["cpu"], name
            assert limits["memory"], name
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False, name
            assert context["capabilities"]["drop"] == ["ALL"], name


def test_secret_refs_name_keys_of_the_example_secret(objects):
    example = secret()
    for workload in workloads(objects).values():
        for container in containers(workload):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == example["metadata"]["name"]
                    assert ref["key"] in example["stringData"], ref


def test_every_netstack_command_parses_with_its_environment(objects):
    values = secret()["stringData"]
    files = {"/etc/netstack/balancer.toml": K8S / "balancer.toml"}
    tiers = workloads(objects)
    for tier in NETSTACK_TIERS:
        (container,) = containers(tiers[tier])
        assert container["image"] == "netstack"  # rewritten by kustomization's images:
        check_command(argv(container), container_env(container, values), files)


def test_balancer_config_map_is_mounted_where_the_command_reads_it(objects):
    (balancer,) = containers(workloads(objects)["balancer"])
    config = argv(balancer)[argv(balancer).index("--config") + 1]
    mount = next(m for m in balancer["volumeMounts"] if m["name"] == "config")
    assert Path(config).parent == Path(mount["mountPath"])
    volume = next(
        v
        for v in workloads(objects)["balancer"]["spec"]["template"]["spec"]["volumes"]
        if v["name"] == "config"
    )
    generated = {g["name"]: g["files"] for g in kustomization()["configMapGenerator"]}
    assert Path(config).name in generated[volume["configMap"]["name"]]


def test_balancer_backends_are_services_on_the_pods_ports(objects):
    doc = toml(K8S / "balancer.toml")
    services = by_kind(objects, "Service")
    values = secret()["stringData"]
    tiers = workloads(objects)
    for pool in doc["pools"].values():
        assert pool["health"]["check_path"] == "/healthz"
        for backend in pool["backends"]:
            host, port = hostport(backend["address"])
            service = services[host]
            (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == port]
            (container,) = containers(tiers[host])
            parsed = check_command(argv(container), container_env(container, values))
            assert _port_names_and_numbers(tiers[host])[service_port["targetPort"]] == bind_port(
                parsed
            )
    _, listen = hostport(doc["frontends"]["public"]["listen"])
    assert _port_names_and_numbers(tiers["balancer"])["http"] == listen
    routes = doc["frontends"]["public"]["routes"]
    assert [r["pool"] for r in routes if r["path_prefix"] == "/chat/"] == ["chat"]


def test_web_and_rpc_agree_on_address_and_token(objects):
    values = secret()["stringData"]
    tiers = workloads(objects)
    (web,) = containers(tiers["web"])
    (rpc,) = containers(tiers["rpc"])
    web_env, rpc_env = container_env(web, values), container_env(rpc, values)
    host, port = hostport(web_env["NETSTACK_NOTES_RPC"])
    assert host == "rpc"
    rpc_service = by_kind(objects, "Service")["rpc"]
    (service_port,) = rpc_service["spec"]["ports"]
    assert service_port["port"] == port
    assert web_env["NETSTACK_NOTES_TOKEN"] == rpc_env["NETSTACK_TOKEN"]
    assert rpc_env["NETSTACK_DB"].startswith("postgresql://netstack:")
    assert rpc_env["NETSTACK_DB"].endswith("@postgres:5432/netstack")


def test_kustomize_renders_the_config_map_from_the_toml(tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=TIMEOUT * 4
    )
    assert result.returncode == 0, result.stderr
    rendered = [d for d in yaml.safe_load_all(result.stdout) if d]
    (config_map,) = [d for d in rendered if d["kind"] == "ConfigMap"]
    assert config_map["data"]["balancer.toml"] == (K8S / "balancer.toml").read_text()
    assert {d["metadata"].get("namespace") for d in rendered if d["kind"] != "Namespace"} == {
        "netstack"
    }
    balancer = next(
        d for d in rendered if d["kind"] == "Deployment" and d["metadata"]["name"] == "balancer"
    )
    (volume,) = balancer["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]  # hash suffix followed
