"""Settings: the YAML file, ``GATEWAY_*`` environment variables, keyword overrides, and errors naming the field."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import pytest

from gateway.config import (
    ConfigError,
    DecodeConfig,
    EngineConfig,
    PhaseAwareConfig,
    Settings,
    StepAlignedCloseConfig,
    WaterFillConfig,
    WindowConfig,
    load_settings,
)

ISSUE_EXAMPLE = """\
policy: sbs
engines:
  - name: sg0
    flavor: sglang
    url: http://10.0.0.1:30000
    dp_size: 8
    role: mixed
    models: [deepseek-v3]
"""


def write(tmp_path: Path, text: str, name: str = "gateway.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def engine(**fields: Any) -> dict[str, Any]:
    """A valid engine entry, with ``fields`` replaced."""
    return {"name": "v0", "flavor": "vllm", "url": "http://127.0.0.1:8000", "models": ["m"], **fields}


def test_issue_example_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ISSUE_EXAMPLE))
    assert settings.policy == "sbs"
    assert settings.engines == [
        EngineConfig(
            name="sg0", flavor="sglang", url="http://10.0.0.1:30000", dp_size=8, role="mixed", models=["deepseek-v3"]
        )
    ]
    assert settings.served_models() == ["deepseek-v3"]
    assert settings.window == WindowConfig()
    assert settings.port == 8000


def test_path_may_be_a_string(tmp_path: Path) -> None:
    assert load_settings(str(write(tmp_path, ISSUE_EXAMPLE))).engines[0].name == "sg0"


def test_no_file_no_environment_gives_the_defaults() -> None:
    settings = load_settings()
    assert settings == Settings()
    assert settings.engines == []
    assert settings.policy == "sbs"


def test_loaded_settings_are_plain_settings(tmp_path: Path) -> None:
    """Two loads of one file compare equal, to each other and to a hand-built Settings, and survive pickling."""
    path = write(tmp_path, ISSUE_EXAMPLE)
    settings = load_settings(path)
    assert type(settings) is Settings
    assert settings == load_settings(path)
    assert settings == Settings(policy="sbs", engines=load_settings(path).engines)
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_POLICY", "round_robin")
    settings = load_settings(write(tmp_path, ISSUE_EXAMPLE))
    assert settings.policy == "round_robin"
    assert settings.engines[0].name == "sg0"


def test_gateway_config_names_the_file_when_no_path_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", str(write(tmp_path, ISSUE_EXAMPLE)))
    assert load_settings().engines[0].name == "sg0"


def test_explicit_path_wins_over_gateway_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", str(write(tmp_path, ISSUE_EXAMPLE)))
    other = write(tmp_path, "policy: least_tokens\n", name="other.yaml")
    settings = load_settings(other)
    assert settings.policy == "least_tokens"
    assert settings.engines == []


def test_nested_environment_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """GATEWAY_WINDOW__MAX_INTERVAL_S sets one nested field; the file's other window fields are kept."""
    path = write(tmp_path, "window:\n  min_interval_s: 0.01\n  max_interval_s: 0.4\n")
    monkeypatch.setenv("GATEWAY_WINDOW__MAX_INTERVAL_S", "0.1")
    settings = load_settings(path)
    assert settings.window == WindowConfig(min_interval_s=0.01, max_interval_s=0.1)


def test_engines_from_environment_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ENGINES", '[{"name": "v0", "flavor": "vllm", "url": "http://h:8000", "models": ["m"]}]')
    assert load_settings().engines == [EngineConfig(name="v0", flavor="vllm", url="http://h:8000", models=["m"])]


def test_keyword_overrides_win_over_environment_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_POLICY", "round_robin")
    monkeypatch.setenv("GATEWAY_PORT", "9000")
    settings = load_settings(write(tmp_path, ISSUE_EXAMPLE + "port: 8500\n"), policy="shortest_queue", port=7000)
    assert (settings.policy, settings.port) == ("shortest_queue", 7000)


def test_none_overrides_are_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI passes None for options the user did not give: they must not mask the file or the environment."""
    monkeypatch.setenv("GATEWAY_POLICY", "round_robin")
    settings = load_settings(write(tmp_path, ISSUE_EXAMPLE + "port: 8500\n"), host=None, port=None, policy=None)
    assert (settings.host, settings.port, settings.policy) == ("127.0.0.1", 8500, "round_robin")


def test_trailing_slash_is_stripped_from_the_url() -> None:
    assert load_settings(engines=[engine(url="http://h:8000/")]).engines[0].url == "http://h:8000"


@pytest.mark.parametrize(
    ("yaml_text", "field"),
    [
        pytest.param(
            "engines:\n  - {name: a, flavor: tgi, url: 'http://h:1', models: [m]}\n", "engines.0.flavor", id="flavor"
        ),
        pytest.param(
            "engines:\n  - {name: a, flavor: vllm, url: 'http://h:1', models: [m], dp_size: 0}\n",
            "engines.0.dp_size",
            id="dp-size-0",
        ),
        pytest.param(
            "engines:\n  - {name: a, flavor: vllm, url: 'localhost:8000', models: [m]}\n",
            "engines.0.url",
            id="url-without-scheme",
        ),
        pytest.param(
            "engines:\n  - {name: a, flavor: vllm, url: 'http://h:1', models: [m], role: router}\n",
            "engines.0.role",
            id="role-unknown",
        ),
        pytest.param(
            "engines:\n  - {name: a, flavor: vllm, url: 'http://h:1', models: []}\n", "engines.0.models", id="no-models"
        ),
        pytest.param(
            "engines:\n"
            "  - {name: a, flavor: vllm, url: 'http://h:1', models: [m]}\n"
            "  - {name: b, flavor: vllm, url: 'http://h:2', models: [m]}\n"
            "  - {name: a, flavor: sglang, url: 'http://h:3', models: [m]}\n",
            "engines: duplicate engine names ['a']",
            id="duplicate-engine-names",
        ),
        pytest.param("polcy: sbs\n", "polcy", id="unknown-top-level-key"),
        pytest.param("window:\n  min_interval_s: 1.0\n  max_interval_s: 0.5\n", "window", id="window-min-above-max"),
        pytest.param("window:\n  max_interval_s: 0\n", "window.max_interval_s", id="window-zero"),
        pytest.param("port: 70000\n", "port", id="port-out-of-range"),
        pytest.param("policy: fastest\n", "policy", id="unknown-policy"),
    ],
)
def test_invalid_file_names_the_field(tmp_path: Path, yaml_text: str, field: str) -> None:
    path = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert field in message
    assert str(path) in message


def test_window_min_above_max_names_both_bounds(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="min_interval_s must not exceed max_interval_s"):
        load_settings(write(tmp_path, "window:\n  min_interval_s: 1.0\n  max_interval_s: 0.5\n"))


@pytest.mark.parametrize(
    ("flavor", "alignment"), [("vllm", "prefill_delayer"), ("sglang", "prefill_schedule_interval")]
)
def test_an_alignment_of_the_other_flavour_is_refused(flavor: str, alignment: str) -> None:
    with pytest.raises(ConfigError, match=rf"engines\.0: .*prefill_alignment: '{alignment}' is not a setting of"):
        load_settings(engines=[engine(flavor=flavor, prefill_alignment=alignment)])


def test_every_offending_field_is_named() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(engines=[engine(flavor="tgi"), engine(name="v1", dp_size=0)], port=-1)
    message = str(info.value)
    for field in ("engines.0.flavor", "engines.1.dp_size", "port"):
        assert field in message


@pytest.mark.parametrize(
    ("name", "value", "field"),
    [
        pytest.param("GATEWAY_POLICY", "fastest", "policy", id="policy"),
        pytest.param("GATEWAY_PORT", "eighty", "port", id="port"),
        pytest.param("GATEWAY_WINDOW__MAX_INTERVAL_S", "0.001", "window", id="nested-window-below-min"),
    ],
)
def test_invalid_environment_names_the_field(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"invalid configuration \(environment\):\n  {field}: "):
        load_settings()


def test_invalid_override_names_the_field() -> None:
    with pytest.raises(ConfigError, match=r"engines\.0\.url: .*'ftp://h'"):
        load_settings(engines=[engine(url="ftp://h")])


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="configuration file not found") as info:
        load_settings(missing)
    assert str(missing) in str(info.value)


def test_missing_file_named_by_gateway_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings()


def test_a_directory_is_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_settings(tmp_path)


def test_yaml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "policy: sbs\nengines: [\n  - name: sg0\n")
    with pytest.raises(ConfigError, match="invalid configuration") as info:
        load_settings(path)
    assert str(path) in str(info.value)
    assert "line 3" in str(info.value)


def test_yaml_that_is_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="invalid configuration"):
        load_settings(write(tmp_path, "- policy\n- sbs\n"))


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "")) == Settings()


def test_served_models_deduplicates_in_order() -> None:
    settings = load_settings(
        engines=[
            engine(name="a", models=["deepseek-v3", "qwen3-8b"]),
            engine(name="b", models=["llama-3-70b", "deepseek-v3"]),
            engine(name="c", models=["qwen3-8b", "mistral-7b", "mistral-7b"]),
        ]
    )
    assert settings.served_models() == ["deepseek-v3", "qwen3-8b", "llama-3-70b", "mistral-7b"]


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, ISSUE_EXAMPLE))
    with pytest.raises(ValueError, match="frozen"):
        settings.port = 1  # type: ignore[misc]


SCHEDULING_EXAMPLE = """\
policy: sbs
window:
  max_interval_s: 0.2
  step_aligned_close: {lead_s: 0.01}
allocator:
  kind: phase_aware
  decode_stall_weight: 0.01
  long_prefill_tokens: null
decode:
  iqr_k: null
baselines:
  seed: 7
"""


def test_scheduling_sections_load(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, SCHEDULING_EXAMPLE))
    assert settings.window.step_aligned_close == StepAlignedCloseConfig(lead_s=0.01)
    assert settings.allocator == PhaseAwareConfig(decode_stall_weight=0.01, long_prefill_tokens=None)
    assert settings.decode == DecodeConfig(iqr_k=None)
    assert settings.baselines.seed == 7


def test_allocator_kind_defaults_to_phase_aware_and_water_fill_takes_only_its_own_settings(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "allocator:\n  shortest_first: true\n")).allocator == PhaseAwareConfig(
        shortest_first=True
    )
    water = load_settings(write(tmp_path, "allocator:\n  kind: water_fill\n  queue_steps: null\n")).allocator
    assert water == WaterFillConfig(queue_steps=None)
    with pytest.raises(ConfigError, match=r"allocator\.water_fill\.decode_stall_weight"):
        load_settings(write(tmp_path, "allocator:\n  kind: water_fill\n  decode_stall_weight: 0.01\n"))


def test_decode_null_switches_the_decode_aware_choice_off(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "decode: null\n")).decode is None


@pytest.mark.parametrize(
    ("yaml_text", "new_place"),
    [
        ("window:\n  allocator: water_fill\n", "allocator.kind"),
        ("window:\n  decode_stall_weight: 0.01\n", "allocator.decode_stall_weight"),
        ("window:\n  stagger: false\n", "allocator.use_step_phase"),
        ("window:\n  long_prefill_isolation: false\n", "allocator.long_prefill_tokens"),
        ("window:\n  prefill_capacity: false\n", "allocator.queue_steps"),
        ("window:\n  decode_aware: false\n", "decode"),
        ("window:\n  iqr_outliers: false\n", "decode.iqr_k"),
        ("window:\n  close_lead_s: 0.01\n", "window.step_aligned_close.lead_s"),
        ("window:\n  step_aligned_close: true\n", "window.step_aligned_close is a section"),
        ("seed: 3\n", "baselines.seed"),
    ],
)
def test_an_old_flat_key_names_its_new_place(tmp_path: Path, yaml_text: str, new_place: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(new_place)):
        load_settings(write(tmp_path, yaml_text))


def test_an_old_flat_key_from_the_environment_names_its_new_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_WINDOW__ALLOCATOR", "water_fill")
    with pytest.raises(ConfigError, match=r"window\.allocator moved to allocator\.kind"):
        load_settings()


@pytest.mark.parametrize("policy", ["round_robin", "power_of_two"])
def test_the_policy_environment_shorthand_keeps_working(monkeypatch: pytest.MonkeyPatch, policy: str) -> None:
    monkeypatch.setenv("GATEWAY_POLICY", policy)
    assert load_settings().policy == policy


def test_allocator_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_ALLOCATOR__DECODE_STALL_WEIGHT", "0.01")
    assert load_settings().allocator == PhaseAwareConfig(decode_stall_weight=0.01)
