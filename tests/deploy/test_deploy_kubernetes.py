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


def render(tree: Path, tmp_path: Path) -> tuple[Path, dict[str, dict[str, Any]]]:
    out = run_tool("kubectl", "kustomize", str(tree)).stdout
    path = tmp_path / "rendered.yaml"
    path.write_text(out)
    return path, {doc["kind"]: doc for doc in yaml.safe_load_all(out) if doc}


@pytest.mark.parametrize("name", sorted(TREES))
def test_manifests_render_and_validate(name: str, tmp_path: Path) -> None:
    path, docs = render(TREES[name], tmp_path)
    assert set(docs) == {"ConfigMap", "Deployment", "Service", "ServiceMonitor", "PodDisruptionBudget"}
    out = run_tool("kubernetes-validate", "--strict", str(path))
    report = out.stdout + out.stderr
    for kind, doc in docs.items():
        if kind not in CRD_KINDS:
            assert f"passed for resource {kind.lower()}/{doc['metadata']['name']}" in report, report


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
