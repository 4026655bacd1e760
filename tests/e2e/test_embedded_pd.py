"""The embedded P/D variant (``gateway serve --pd ...``): a prefill and a decode simulated engine started in-process,
configured for the gateway with their role, KV connector and bootstrap port, answering through the gateway in each
protocol, their roles exported in ``gateway_engine_info``; and ``--pd`` refused beside engines of the
configuration."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.cli.serve import serve
from gateway.config import ScrapeConfig, Settings
from gateway.embedded import EMBEDDED_MODEL, EMBEDDED_PD_DP_SIZES, PD_PROTOCOLS, PdProtocol, embedded_engines
from gateway.sim.cluster import running_gateway
from gateway.telemetry import sum_samples

PROTOCOL_LABEL = {"sglang": "sglang", "vllm-nixl": "nixl", "vllm-mooncake": "mooncake"}
"""``--pd`` value → the ``protocol`` label of ``gateway_pd_transfers_total``."""


@pytest.mark.parametrize("pd", PD_PROTOCOLS)
async def test_embedded_pair_is_configured_and_answers(pd: PdProtocol) -> None:
    async with embedded_engines(speed=10.0, pd=pd) as engines:
        prefill, decode = engines
        assert (prefill.role, decode.role) == ("prefill", "decode")
        assert (prefill.dp_size, decode.dp_size) == EMBEDDED_PD_DP_SIZES
        assert {e.flavor for e in engines} == {"sglang" if pd == "sglang" else "vllm"}
        assert prefill.kv_connector == decode.kv_connector == {"vllm-nixl": "nixl", "vllm-mooncake": "mooncake"}.get(pd)
        # the simulated engines rendezvous on the prefill's HTTP port (vLLM NIXL has no bootstrap server)
        port = urlsplit(prefill.url).port
        assert prefill.bootstrap_address == (None if pd == "vllm-nixl" else ("127.0.0.1", port))
        settings = Settings(engines=engines, scrape=ScrapeConfig(interval_s=0.1, timeout_s=1.0))
        assert settings.pd_models() == [EMBEDDED_MODEL]
        async with (
            running_gateway(settings) as url,
            openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0) as client,
            httpx.AsyncClient() as http,
        ):
            whole = await client.completions.create(
                model=EMBEDDED_MODEL, prompt="hello", max_tokens=4, extra_body={"ignore_eos": True}
            )
            assert whole.usage is not None and whole.usage.completion_tokens == 4
            chunks = await client.completions.create(
                model=EMBEDDED_MODEL, prompt="hello", max_tokens=4, stream=True, extra_body={"ignore_eos": True}
            )
            assert "".join([c.choices[0].text async for c in chunks if c.choices])
            metrics = (await http.get(url + "/metrics")).text
    assert sum_samples(metrics, "gateway_pd_transfers_total", protocol=PROTOCOL_LABEL[pd], outcome="ok") == 2
    flavor = "sglang" if pd == "sglang" else "vllm"
    for engine, role in (("sim-prefill", "prefill"), ("sim-decode", "decode")):  # the roles dashboards join on
        assert sum_samples(metrics, "gateway_engine_info", engine=engine, flavor=flavor, role=role) == 1
    assert sum_samples(metrics, "gateway_engine_info") == 2


def test_serve_offers_every_embedded_protocol() -> None:
    (option,) = [p for p in serve.params if p.name == "pd"]
    assert tuple(option.type.choices) == PD_PROTOCOLS  # type: ignore[attr-defined]


def test_pd_is_refused_beside_configured_engines(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("engines:\n  - {name: e, flavor: vllm, url: 'http://127.0.0.1:1', models: [m]}\n")
    result = CliRunner().invoke(main, ["serve", "--config", str(config), "--pd", "sglang"])
    assert result.exit_code == 2, result.output
    assert "--pd chooses the embedded engines" in result.output
