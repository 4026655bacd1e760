"""``bench/smg_pd.py``'s pure helpers: the gateway's P/D configuration, the per-pool counts read from the mocks'
``/_sim/requests``, and the pick of a peer's policy pair."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import Settings

BENCH = Path(__file__).parents[2] / "bench"


@pytest.fixture(scope="module")
def smg_pd() -> Any:
    sys.path.insert(0, str(BENCH))  # the script imports _harness beside it
    try:
        spec = importlib.util.spec_from_file_location("smg_pd", BENCH / "smg_pd.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


ENGINES = [
    {
        "name": "p0",
        "flavor": "sglang",
        "url": "http://127.0.0.1:9001",
        "dp_size": 2,
        "models": ["m"],
        "role": "prefill",
        "bootstrap_host": "127.0.0.1",
        "bootstrap_port": 9001,
    },
    {"name": "d0", "flavor": "sglang", "url": "http://127.0.0.1:9002", "dp_size": 2, "models": ["m"], "role": "decode"},
]


def seen(role: str, pinned: list[int], placed: list[int], running: list[int], ok: list[int]) -> dict[str, Any]:
    zeros = [0] * len(pinned)
    return {
        "role": role,
        "pinned": pinned,
        "placed": placed,
        "running": running,
        "held": zeros,
        "transfers_completed": ok,
        "transfers_failed": zeros,
        "polls": {"/v1/loads": 0, "/get_load": 0, "/metrics": 0},
    }


def test_gateway_config_is_a_valid_pd_configuration(smg_pd: Any) -> None:
    like_smg = Settings.model_validate(smg_pd.gateway_config(ENGINES, "cache_aware", "cache_aware", "least_load"))
    assert (like_smg.policy, like_smg.pd.prefill_policy, like_smg.pd.decode_policy) == (
        "cache_aware",
        "cache_aware",
        "least_load",
    )
    assert like_smg.pd_models() == ["m"]
    sbs = smg_pd.gateway_config(ENGINES, "sbs", None, None)
    assert "pd" not in sbs
    assert Settings.model_validate(sbs).pd.decode_policy is None


def test_pools_sum_each_role_per_rank(smg_pd: Any) -> None:
    probe = {
        "p0": seen("prefill", [3, 1], [0, 1], [0, 0], [3, 2]),
        "p1": seen("prefill", [2, 2], [0, 0], [0, 1], [2, 2]),
        "d0": seen("decode", [5, 6], [0, 0], [0, 0], [5, 6]) | {"polls": {"/v1/loads": 1, "/metrics": 1}},
        "smg_get_loads": {"loads": 0},  # anything that is not an engine is skipped
    }
    pools = smg_pd.pools(probe)
    assert pools["prefill"]["per_rank"] == {"p0:0": 3, "p0:1": 2, "p1:0": 2, "p1:1": 2}
    assert (pools["prefill"]["placed"], pools["prefill"]["completed"], pools["prefill"]["running"]) == (1, 9, 1)
    assert pools["decode"]["per_rank"] == {"d0:0": 5, "d0:1": 6}
    assert (pools["decode"]["failed"], pools["decode"]["running"], pools["decode"]["held"]) == (0, 0, 0)
    assert pools["decode"]["load_polls"] == 2
    assert (pools["prefill"]["prefix_queries"], pools["prefill"]["prefix_hits"]) == (0, 0)


def summary(completed: int, failed: int, ttft_mean: float) -> dict[str, Any]:
    return {"completed": completed, "failed": failed, "ttft_s": {"mean": ttft_mean}}


def test_pick_takes_the_lowest_ttft_mean_without_failure(smg_pd: Any) -> None:
    runs = {"a": summary(10, 0, 0.9), "b": summary(9, 1, 0.1), "c": summary(10, 0, 0.5), "d": summary(0, 0, 0.0)}
    assert smg_pd.pick(runs) == "c"
    assert smg_pd.pick({"b": summary(9, 1, 0.1)}) is None
