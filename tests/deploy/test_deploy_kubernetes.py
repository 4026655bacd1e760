"""deploy/kubernetes: the kustomize base and the SGLang overlays (DP attention; P/D) render with ``kubectl kustomize``,
pass ``kubernetes-validate --strict`` against the Kubernetes API schemas, and hold what an operator needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import load_settings
from tests.deploy.tools import DEPLOY, parse_command, run_tool

KUBERNETES = DEPLOY / "kubernetes"
TREES = {
    "base": KUBERNETES / "base",
    "sglang-dp-attention": KUBERNETES / "overlays" / "sglang-dp-attention",
    "sglang-pd": KUBERNETES / "overlays" / "sglang-pd",
}
CRD_KINDS = {"ServiceMonitor"}
"""Kinds outside the core API (Prometheus Operator), which kubernetes-validate has no schema for."""


SCHEDULER = "sbs-gateway-scheduler"
"""The name of the scheduler service's Deployment and Service."""


def render(tree: Path, tmp_path: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    """The rendered file, and its documents by kind (the gateway's), with the scheduler service's Deployment and
    Service under ``scheduler Deployment`` and ``scheduler Service``."""
    out = run_tool("kubectl", "kustomize", str(tree)).stdout
    path = tmp_path / "rendered.yaml"
    path.write_text(out)
    docs: dict[str, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(out):
        if doc:
            key = f"scheduler {doc['kind']}" if doc["metadata"]["name"] == SCHEDULER else doc["kind"]
            assert key not in docs, f"two {key}s"
            docs[key] = doc
    return path, docs


@pytest.mark.parametrize("name", sorted(TREES))
def test_manifests_render_and_validate(name: str, tmp_path: Path) -> None:
    path, docs = render(TREES[name], tmp_path)
    assert set(docs) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "ServiceMonitor",
        "PodDisruptionBudget",
        "scheduler Deployment",
        "scheduler Service",
    }
    out = run_tool("kubernetes-validate", "--strict", str(path))
    report = out.stdout + out.stderr
    for doc in docs.values():
        if doc["kind"] not in CRD_KINDS:
            assert f"passed for resource {doc['kind'].lower()}/{doc['metadata']['name']}" in report, report


@pytest.mark.parametrize("name", sorted(TREES))
def test_manifests_wire_config_probes_and_monitoring(name: str, tmp_path: Path) -> None:
    _, docs = render(TREES[name], tmp_path)
    deployment, service = docs["Deployment"], docs["Service"]
    pod = deployment["spec"]["template"]
    container = pod["spec"]["containers"][0]
    # the command is one the CLI accepts, and its configuration file is the ConfigMap's, valid for the gateway
    ctx = parse_command(container["args"])
    assert ctx.command.name == "serve"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "config")
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    config_file = Path(ctx.params["config_path"])
    assert str(config_file.parent) == mount["mountPath"]
    gateway_yaml = tmp_path / "gateway.yaml"
    gateway_yaml.write_text(docs["ConfigMap"]["data"][config_file.name])
    settings = load_settings(gateway_yaml)
    assert settings.engines, "the ConfigMap must list the engines"
    # probes, resources, non-root
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert {"requests", "limits"} <= set(container["resources"])
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # the Service selects the pods; the ServiceMonitor scrapes the Service's port; the PDB covers the pods
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    monitor = docs["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    pdb = docs["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["minAvailable"] < deployment["spec"]["replicas"]


def test_sglang_example_is_a_dp_attention_deployment(tmp_path: Path) -> None:
    _, docs = render(TREES["sglang-dp-attention"], tmp_path)
    path = tmp_path / "gateway.yaml"
    path.write_text(docs["ConfigMap"]["data"]["gateway.yaml"])
    settings = load_settings(path)
    assert {e.flavor for e in settings.engines} == {"sglang"}
    assert all(e.dp_size > 1 for e in settings.engines)
    assert "--enable-dp-attention" in path.read_text()


def test_sglang_pd_example_is_a_disaggregated_deployment(tmp_path: Path) -> None:
    _, docs = render(TREES["sglang-pd"], tmp_path)
    path = tmp_path / "gateway.yaml"
    path.write_text(docs["ConfigMap"]["data"]["gateway.yaml"])
    settings = load_settings(path)
    assert settings.pd_models() == ["deepseek-v3"]
    roles = {e.role: e for e in settings.engines}
    assert set(roles) == {"prefill", "decode"} and {e.flavor for e in settings.engines} == {"sglang"}
    assert roles["prefill"].bootstrap_address == ("sglang-prefill.llm.svc.cluster.local", 8998)
    text = path.read_text()
    assert "--disaggregation-mode prefill" in text and "--disaggregation-mode decode" in text


@pytest.mark.parametrize("name", sorted(TREES))
def test_replicas_share_one_scheduler_service(name: str, tmp_path: Path) -> None:
    """The gateway replicas point at the scheduler service's Service; it runs ``gateway scheduler`` on their
    configuration, one replica replaced with Recreate (the replicas place alone meanwhile), probed and scraped."""
    _, docs = render(TREES[name], tmp_path)
    deployment, scheduler, service = docs["Deployment"], docs["scheduler Deployment"], docs["scheduler Service"]
    assert deployment["spec"]["replicas"] >= 2
    assert scheduler["spec"]["replicas"] == 1 and scheduler["spec"]["strategy"]["type"] == "Recreate"
    pod = scheduler["spec"]["template"]
    container = pod["spec"]["containers"][0]
    ctx = parse_command(container["args"])
    assert ctx.command.name == "scheduler"
    gateway_container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert ctx.params["config_path"] == parse_command(gateway_container["args"]).params["config_path"]
    volume = next(v for v in pod["spec"]["volumes"] if v["name"] == "config")
    assert volume["configMap"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v1/health"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # the Service selects the scheduler's pods only, on the port the command listens on; the gateway's URL is it
    labels = pod["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert not service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    assert port["port"] == ctx.params["port"]
    gateway_yaml = tmp_path / "gateway.yaml"
    gateway_yaml.write_text(docs["ConfigMap"]["data"]["gateway.yaml"])
    settings = load_settings(gateway_yaml)
    assert settings.scheduler_service is not None
    assert settings.scheduler_service.url == f"http://{SCHEDULER}:{port['port']}"
    # the ServiceMonitor scrapes the scheduler's /metrics too; the gateway's PDB does not cover it
    monitor = docs["ServiceMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == port["name"]
    assert not docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_discovery_example_watches_the_engine_pods_with_read_only_rights(tmp_path: Path) -> None:
    """The discovery overlay renders and validates; its gateway and scheduler pods run as a ServiceAccount whose Role
    reads the namespace's pods (get, list, watch) and nothing else; its configuration discovers by label selector."""
    out = run_tool("kubectl", "kustomize", str(KUBERNETES / "overlays" / "discovery")).stdout
    path = tmp_path / "rendered.yaml"
    path.write_text(out)
    docs = [doc for doc in yaml.safe_load_all(out) if doc]
    report = run_tool("kubernetes-validate", "--strict", str(path))
    for doc in docs:
        if doc["kind"] not in CRD_KINDS:
            resource = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
            assert f"passed for resource {resource}" in report.stdout + report.stderr, resource
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        by_kind.setdefault(doc["kind"], []).append(doc)
    [account], [role], [binding] = by_kind["ServiceAccount"], by_kind["Role"], by_kind["RoleBinding"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": account["metadata"]["namespace"]}
    ]
    assert {d["metadata"]["namespace"] for d in (account, role, binding)} == {"llm"}
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    assert set(deployments) == {"sbs-gateway", SCHEDULER}
    for deployment in deployments.values():  # the front doors and the scheduler service each discover the pods
        assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    [config_map] = by_kind["ConfigMap"]
    gateway_yaml = tmp_path / "gateway.yaml"
    gateway_yaml.write_text(config_map["data"]["gateway.yaml"])
    settings = load_settings(gateway_yaml)
    assert settings.discovery is not None and settings.engines == []
    assert settings.discovery.label_selector == "app.kubernetes.io/component=engine"
    assert settings.discovery.namespace is None  # the pod's own: the namespace the Role grants
