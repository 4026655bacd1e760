"""``gateway mock-engine``'s P/D options."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.sim.calibration import VLLM_NIXL_KV_LEASE_S
from gateway.sim.mock_engine.app import MockEngineConfig


def test_help_lists_the_pd_options() -> None:
    result = CliRunner().invoke(main, ["mock-engine", "--help"])
    assert result.exit_code == 0
    for option in (
        "--role [mixed|prefill|decode]",
        "--pd-timeout",
        "--kv-connector [nixl|mooncake]",
        "--kv-load-failure-policy",
        "--force-query-prefill-dp-rank",
    ):
        assert option in result.output


def test_bad_role_is_refused() -> None:
    result = CliRunner().invoke(main, ["mock-engine", "--flavor", "sglang", "--port", "0", "--role", "both"])
    assert result.exit_code == 2
    assert "--role" in result.output


def test_role_reaches_the_engine_model() -> None:
    assert MockEngineConfig("sglang", 2).model_config().role == "mixed"
    prefill = MockEngineConfig("vllm", 2, role="prefill").model_config()
    assert (prefill.role, prefill.pd_connector, prefill.kv_lease_s) == ("prefill", "vllm", VLLM_NIXL_KV_LEASE_S)
    decode = MockEngineConfig("sglang", 2, role="decode").model_config()
    assert (decode.role, decode.pd_connector, decode.kv_lease_s) == ("decode", "sglang", None)
    with pytest.raises(ValueError, match="role must be"):
        MockEngineConfig("sglang", 2, role="both")  # type: ignore[arg-type]
