"""docker-compose.yml: valid for docker-compose, every gateway-image command is one the CLI accepts, and the
compose services, deploy/compose/gateway.yaml and deploy/prometheus/prometheus.yml agree on names and ports."""

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


def compose_config() -> dict[str, Any]:
    """docker-compose.yml as docker-compose resolves it (anchors, profiles and defaults applied)."""
    out = run_tool("docker-compose", "--file", "docker-compose.yml", "--profile", "bench", "config")
    config: dict[str, Any] = yaml.safe_load(out.stdout)
    return config


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


def test_every_gateway_image_command_is_accepted_by_the_cli() -> None:
    services = gateway_services(compose_config())
    assert set(services) == {"gateway", "engine-sglang", "engine-vllm", "bench"}
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


def test_gateway_config_engines_prometheus_targets_and_services_agree() -> None:
    config = compose_config()
    services = gateway_services(config)
    settings = load_settings(DEPLOY / "compose" / "gateway.yaml")
    mounts = [str(v).split(":") for v in config["services"]["gateway"]["volumes"]]  # SOURCE:TARGET:MODE
    assert [str(DEPLOY / "compose" / "gateway.yaml"), "/etc/gateway/gateway.yaml", "ro"] in mounts, mounts
    assert option(services["gateway"], "--config") == "/etc/gateway/gateway.yaml"
    prometheus = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"] for job in prometheus["scrape_configs"]}
    engine_targets = {target: group["labels"] for group in jobs["engines"] for target in group["targets"]}
    assert len(engine_targets) == len(settings.engines)
    for engine in settings.engines:
        url = urlsplit(engine.url)
        args = services[str(url.hostname)]
        assert args[0] == "mock-engine", engine.name
        assert (option(args, "--flavor"), int(option(args, "--dp-size")), url.port) == (
            engine.flavor,
            engine.dp_size,
            int(option(args, "--port")),
        ), engine.name
        assert engine_targets[url.netloc] == {"flavor": engine.flavor, "engine_name": engine.name}
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
