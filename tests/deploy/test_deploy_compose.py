"""docker-compose.yml and its P/D variant docker-compose.pd.yml: valid for docker-compose, every gateway-image
command is one the CLI accepts, and each file's compose services, gateway configuration (deploy/compose/) and
Prometheus configuration (deploy/prometheus/) agree on names, roles and ports."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

import click
import dockerfile
import pytest
import yaml

from gateway.config import load_settings
from tests.deploy.tools import DEPLOY, ROOT, parse_command, run_tool

GATEWAY_IMAGE = "sbs-gateway:local"
STACKS = {
    "mixed": ("docker-compose.yml", "gateway.yaml", "prometheus.yml"),
    "pd": ("docker-compose.pd.yml", "gateway-pd.yaml", "prometheus-pd.yml"),
}
"""Each local stack: its compose file, its gateway configuration (deploy/compose/) and its Prometheus
configuration (deploy/prometheus/)."""


def compose_config(file: str = "docker-compose.yml") -> dict[str, Any]:
    """A compose file as docker-compose resolves it (anchors, extends, profiles and defaults applied)."""
    out = run_tool("docker-compose", "--file", file, "--profile", "bench", "config")
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


def prometheus_config_file(config: dict[str, Any]) -> str:
    """The Prometheus configuration the compose ``prometheus`` service reads, relative to deploy/prometheus."""
    (flag,) = [a for a in config["services"]["prometheus"]["command"] if a.startswith("--config.file=")]
    mounts = [str(v).split(":") for v in config["services"]["prometheus"]["volumes"]]  # SOURCE:TARGET:MODE
    assert [str(DEPLOY / "prometheus"), "/etc/prometheus", "ro"] in mounts, mounts
    return flag.removeprefix("--config.file=/etc/prometheus/")


def gateway_services(config: dict[str, Any]) -> dict[str, list[str]]:
    return {
        name: [str(arg) for arg in service["command"]]
        for name, service in config["services"].items()
        if service.get("image") == GATEWAY_IMAGE
    }


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_compose_file_is_valid_and_has_the_stack() -> None:
    config = compose_config()
    assert {"gateway", "engine-sglang", "engine-vllm", "bench", "prometheus", "grafana"} <= set(config["services"])
    flavours = {option(args, "--flavor") for args in gateway_services(config).values() if args[0] == "mock-engine"}
    assert flavours == {"sglang", "vllm"}
    for args in gateway_services(config).values():
        if args[0] == "mock-engine":
            assert int(option(args, "--dp-size")) > 1, args
    assert config["services"]["bench"]["profiles"] == ["bench"]
    for name, service in config["services"].items():
        for port in service.get("ports", []):  # docker-compose 1.29 prints the short form, HOST_IP:HOST:CONTAINER
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_pd_compose_file_is_valid_and_has_a_prefill_and_a_decode_engine() -> None:
    config = compose_config("docker-compose.pd.yml")
    assert {"gateway", "engine-prefill", "engine-decode", "bench", "prometheus", "grafana"} == set(config["services"])
    engines = [args for args in gateway_services(config).values() if args[0] == "mock-engine"]
    assert sorted(option(args, "--role") for args in engines) == ["decode", "prefill"]
    assert all(int(option(args, "--dp-size")) > 1 for args in engines)
    assert config["services"]["bench"]["profiles"] == ["bench"]
    for name, service in config["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    home = config["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana" / "dashboards" / home.rsplit("/", 1)[1]).is_file(), home


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_every_gateway_image_command_is_accepted_by_the_cli(stack: str) -> None:
    services = gateway_services(compose_config(STACKS[stack][0]))
    engines = {"engine-sglang", "engine-vllm"} if stack == "mixed" else {"engine-prefill", "engine-decode"}
    assert set(services) == {"gateway", "bench", *engines}
    for name, args in services.items():
        ctx = parse_command(args)
        assert ctx.command.name == args[0], name


def test_the_command_check_rejects_a_bad_command() -> None:
    with pytest.raises(click.UsageError):
        parse_command(["mock-engine", "--flavor", "tgi", "--port", "1"])
    with pytest.raises(click.UsageError):
        parse_command(["serve", "--no-such-option"])
    with pytest.raises(click.UsageError):
        parse_command(["mock-engine", "--flavor", "vllm"])  # --port is required
    with pytest.raises(click.UsageError):
        parse_command(["serv"])


@pytest.mark.parametrize("stack", sorted(STACKS))
def test_gateway_config_engines_prometheus_targets_and_services_agree(stack: str) -> None:
    compose_file, gateway_file, prometheus_file = STACKS[stack]
    config = compose_config(compose_file)
    services = gateway_services(config)
    settings = load_settings(DEPLOY / "compose" / gateway_file)
    mounts = [str(v).split(":") for v in config["services"]["gateway"]["volumes"]]  # SOURCE:TARGET:MODE
    assert [str(DEPLOY / "compose" / gateway_file), "/etc/gateway/gateway.yaml", "ro"] in mounts, mounts
    assert option(services["gateway"], "--config") == "/etc/gateway/gateway.yaml"
    assert prometheus_config_file(config) == prometheus_file
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / prometheus_file).read_text())
    jobs = {job["job_name"]: job["static_configs"] for job in prometheus["scrape_configs"]}
    engine_targets = {target: group["labels"] for group in jobs["engines"] for target in group["targets"]}
    assert len(engine_targets) == len(settings.engines)
    for engine in settings.engines:
        url = urlsplit(engine.url)
        args = services[str(url.hostname)]
        assert args[0] == "mock-engine", engine.name
        role = option(args, "--role") if "--role" in args else "mixed"
        assert (option(args, "--flavor"), int(option(args, "--dp-size")), url.port, role) == (
            engine.flavor,
            engine.dp_size,
            int(option(args, "--port")),
            engine.role,
        ), engine.name
        connector = option(args, "--kv-connector") if "--kv-connector" in args else None
        assert connector == engine.kv_connector or (connector is None and engine.flavor == "sglang"), engine.name
        if engine.bootstrap_address is not None:  # the simulated engines rendezvous on the prefill's HTTP port
            assert engine.bootstrap_address == (url.hostname, url.port), engine.name
        labels = {"flavor": engine.flavor, "engine_name": engine.name}
        assert engine_targets[url.netloc] == labels | ({"role": engine.role} if engine.role != "mixed" else {})
    assert jobs["gateway"][0]["targets"] == [f"gateway:{option(services['gateway'], '--port')}"]
    assert option(services["bench"], "--url") == f"http://gateway:{option(services['gateway'], '--port')}"


def test_dockerfile_is_multi_stage_non_root_with_a_health_check() -> None:
    instructions = dockerfile.parse_file(str(ROOT / "Dockerfile"))  # Docker's own parser: a syntax error raises
    stages = [i for i in instructions if i.cmd == "FROM"]
    assert len(stages) >= 2, "multi-stage: build in one stage, copy the venv into a slim one"
    final = instructions[instructions.index(stages[-1]) :]
    users = [i.value[0] for i in final if i.cmd == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    (healthcheck,) = [i for i in final if i.cmd == "HEALTHCHECK"]
    assert healthcheck.value[0] == "CMD" and "/health'" in healthcheck.value[-1]
    (entrypoint,) = [i.value for i in final if i.cmd == "ENTRYPOINT"]
    (cmd,) = [i.value for i in final if i.cmd == "CMD"]
    assert entrypoint == ("gateway",)
    assert parse_command(list(cmd)).command.name == "serve"
    # what the build copies from the context exists, and .dockerignore lets it through
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    for copy in (i for i in instructions if i.cmd == "COPY" and not i.flags):
        for source in copy.value[:-1]:
            assert (ROOT / source).exists() and source in allowed, f"COPY {source}: missing or ignored"
