"""P/D configuration: engine roles, bootstrap servers, KV connectors, and which pools serve a model. Every invalid
combination fails at start with a message naming its field."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import DEFAULT_BOOTSTRAP_PORT, ConfigError, EngineConfig, load_settings


def sglang(name: str, role: str, **fields: Any) -> dict[str, Any]:
    entry = {"name": name, "flavor": "sglang", "url": f"http://{name}.local:30000", "role": role, "models": ["m"]}
    return entry | fields


def vllm(name: str, role: str, connector: str | None = "nixl", **fields: Any) -> dict[str, Any]:
    entry = {"name": name, "flavor": "vllm", "url": f"http://{name}.local:8000", "role": role, "models": ["m"]}
    return entry | ({} if connector is None else {"kv_connector": connector}) | fields


def refused(engines: list[dict[str, Any]], **settings: Any) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(engines=engines, **settings)
    return str(info.value)


@pytest.mark.parametrize(
    ("entry", "field"),
    [
        (vllm("p", "prefill", connector=None), "kv_connector: a vllm prefill engine needs one"),
        (vllm("d", "decode", connector=None), "kv_connector: a vllm decode engine needs one"),
        (sglang("p", "prefill", kv_connector="nixl"), "kv_connector: only vllm prefill and decode engines"),
        (vllm("x", "mixed", connector="nixl"), "kv_connector: only vllm prefill and decode engines"),
        (vllm("p", "prefill", bootstrap_port=9000), "bootstrap_port: only prefill engines with a bootstrap server"),
        (vllm("p", "prefill", bootstrap_host="h"), "bootstrap_host: only prefill engines with a bootstrap server"),
        (sglang("d", "decode", bootstrap_port=9000), "bootstrap_port: only prefill engines"),
        (vllm("d", "decode", "mooncake", bootstrap_port=9000), "bootstrap_port: only prefill engines"),
        ({**sglang("x", "mixed"), "bootstrap_host": "h"}, "bootstrap_host: only prefill engines"),
    ],
)
def test_engine_field_refused(entry: dict[str, Any], field: str) -> None:
    message = refused([entry])
    assert "engines.0" in message
    assert field in message


@pytest.mark.parametrize(
    ("engines", "field"),
    [
        ([sglang("p", "prefill")], "engines[0].models: model 'm' has prefill engines ['p'] but no decode engine"),
        ([sglang("d", "decode")], "engines[0].models: model 'm' has decode engines ['d'] but no prefill engine"),
        (
            [sglang("p", "prefill"), sglang("d", "decode"), sglang("x", "mixed")],
            "engines[2].role: model 'm' is served P/D",
        ),
        ([sglang("p", "prefill"), vllm("d", "decode")], "engines[1].flavor: vllm, but engines[0] (p)"),
        ([vllm("p", "prefill", "mooncake"), vllm("d", "decode", "nixl")], "engines[1].kv_connector: nixl"),
    ],
)
def test_model_pools_refused(engines: list[dict[str, Any]], field: str) -> None:
    assert field in refused(engines)


def test_follow_bootstrap_room_is_sglang_only() -> None:
    message = refused([vllm("p", "prefill"), vllm("d", "decode")], pd={"prefill_policy": "follow_bootstrap_room"})
    assert "pd.prefill_policy: follow_bootstrap_room is SGLang's" in message


def test_unknown_leg_policy_names_its_field() -> None:
    assert "pd.decode_policy" in refused([], pd={"decode_policy": "follow_bootstrap_room"})


def test_bootstrap_address_defaults_to_the_url_host_and_8998() -> None:
    assert EngineConfig(**sglang("p", "prefill")).bootstrap_address == ("p.local", DEFAULT_BOOTSTRAP_PORT)
    mooncake = EngineConfig(**vllm("p", "prefill", "mooncake", bootstrap_host="10.0.0.7", bootstrap_port=9100))
    assert mooncake.bootstrap_address == ("10.0.0.7", 9100)
    assert EngineConfig(**vllm("p", "prefill", "nixl")).bootstrap_address is None
    assert EngineConfig(**sglang("d", "decode")).bootstrap_address is None


@pytest.mark.parametrize(
    "engines",
    [
        [sglang("p", "prefill", bootstrap_port=9000), sglang("d", "decode"), sglang("x", "mixed", models=["other"])],
        [vllm("p", "prefill"), vllm("d1", "decode"), vllm("d2", "decode")],
        [vllm("p", "prefill", "mooncake", bootstrap_port=9100), vllm("d", "decode", "mooncake")],
    ],
)
def test_valid_pd_configurations_load(engines: list[dict[str, Any]]) -> None:
    settings = load_settings(engines=engines)
    assert settings.pd_models() == ["m"]
