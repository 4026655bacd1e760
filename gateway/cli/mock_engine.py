"""``gateway mock-engine``: one simulated engine with SGLang's or vLLM's HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import click

from gateway.cli.engine_options import engine_flag_options, engine_model_config


@click.command("mock-engine")
@click.option("--flavor", type=click.Choice(["sglang", "vllm"]), required=True, help="Engine API to imitate.")
@click.option("--dp-size", type=click.IntRange(min=1), default=8, show_default=True, help="DP ranks.")
@click.option("--port", type=click.IntRange(0, 65535), required=True, help="Port to listen on.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--model", default="deepseek-v3", show_default=True, help="Served model name.")
@click.option(
    "--speed",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Engine clock speed: X times real time (below 1 is slower).",
)
@click.option(
    "--profile",
    type=click.Choice(["idealised", "as-shipped"]),
    default="idealised",
    show_default=True,
    help="Engine model: idealised, or the engine as shipped (its budgets, step rules, admission; its flags below).",
)
@click.option(
    "--tokenizer",
    type=click.Choice(["estimate", "deepseek"]),
    default="estimate",
    show_default=True,
    help="Who counts prompt tokens and cuts prompts into prefix-cache blocks: the gateway's estimator, or "
    "DeepSeek-V3's tokenizer with its chat template (as the real engine).",
)
@click.option(
    "--role",
    type=click.Choice(["mixed", "prefill", "decode"]),
    default="mixed",
    show_default=True,
    help="P/D disaggregation: serve one side, speaking the flavour's protocol (SGLang bootstrap, vLLM NIXL); the "
    "rendezvous is on this engine's HTTP port (give it as the SGLang bootstrap port).",
)
@click.option(
    "--pd-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="P/D handoff timeout, seconds. SGLang: a prefill waiting for its decode side, a decode for its KV "
    "(SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT / _WAITING_TIMEOUT, default 300); vLLM Mooncake: a pull waiting for "
    "its prefill (VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT, default 480).",
)
@click.option(
    "--kv-connector",
    type=click.Choice(["nixl", "mooncake"]),
    default="nixl",
    show_default=True,
    help="vLLM P/D: the KV connector's protocol (NixlConnector or MooncakeConnector).",
)
@click.option(
    "--kv-load-failure-policy",
    type=click.Choice(["fail", "recompute"]),
    default="fail",
    show_default=True,
    help="vLLM P/D decode: a request whose KV cannot be read fails, or prefills locally.",
)
@click.option(
    "--force-query-prefill-dp-rank",
    is_flag=True,
    help="SGLang P/D prefill: SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1, a request pinned to a rank "
    "other than bootstrap_room mod DP size is served (its rank registered) instead of refused.",
)
@click.option(
    "--enable-response-store",
    is_flag=True,
    help="Keep finished Responses for previous_response_id, retrieval and cancel (vLLM: "
    "VLLM_ENABLE_RESPONSES_API_STORE=1; SGLang: --enable-response-store; off in both by default).",
)
@click.option(
    "--server-info-max-running",
    type=click.Choice(["per-rank", "sglang"]),
    default="per-rank",
    show_default=True,
    help="SGLang /server_info max_running_requests: one DP rank's cap (what this mock always reported), or as "
    "SGLang reports it (the --max-running-requests flag, null when unset; each rank's cap in internal_states).",
)
@engine_flag_options
def mock_engine(
    flavor: str,
    dp_size: int,
    port: int,
    host: str,
    model: str,
    speed: float,
    profile: str,
    tokenizer: str,
    prefill_rate: float | None,
    batching: str,
    ttft_slo: float,
    tpot_slo: float,
    role: str,
    pd_timeout: float | None,
    kv_connector: str,
    kv_load_failure_policy: str,
    force_query_prefill_dp_rank: bool,
    enable_response_store: bool,
    server_info_max_running: str,
    **engine_flags: Any,
) -> None:
    """Run a simulated DP+EP engine (DeepSeek-V3/H800 timing model) with SGLang's or vLLM's HTTP API.

    \b
    Example (SGLang as shipped at DP 8: 1,024 prefill tokens a rank a step):
      gateway mock-engine --flavor sglang --dp-size 8 --port 8001 --profile as-shipped --chunked-prefill-size 8192

    \b
    Example (SGLang as shipped with its PrefillDelayer; vLLM with its prefill cadence):
      gateway mock-engine --flavor sglang --port 8001 --profile as-shipped --enable-prefill-delayer
      gateway mock-engine --flavor vllm --port 8002 --profile as-shipped --prefill-schedule-interval 2

    \b
    Example (a SGLang P/D pair; the gateway gives the prefill's port 8011 as its bootstrap port):
      gateway mock-engine --flavor sglang --role prefill --dp-size 4 --port 8011
      gateway mock-engine --flavor sglang --role decode --dp-size 8 --port 8012
    """
    from gateway.sim.mock_engine.app import MockEngineConfig, serve_mock_engine

    engine_model = engine_model_config(
        profile,  # type: ignore[arg-type]
        flavor,
        dp_size,
        prefill_rate,
        batching=batching,
        ttft_slo=ttft_slo,
        tpot_slo=tpot_slo,
        **engine_flags,
    )
    config = MockEngineConfig(
        flavor=flavor,  # type: ignore[arg-type]
        dp_size=dp_size,
        model=model,
        speed=speed,
        engine_model=engine_model,
        tokenizer=tokenizer,  # type: ignore[arg-type]
        role=role,  # type: ignore[arg-type]
        pd_timeout_s=pd_timeout,
        kv_connector=kv_connector,  # type: ignore[arg-type]
        kv_load_failure_policy=kv_load_failure_policy,  # type: ignore[arg-type]
        force_query_prefill_dp_rank=force_query_prefill_dp_rank,
        response_store=enable_response_store,
        server_info_max_running=server_info_max_running,  # type: ignore[arg-type]
        max_running_requests_flag=engine_flags.get("max_running_requests"),
    )
    click.echo(
        f"simulated {flavor} {role} engine ({profile}), {dp_size} DP ranks, model {model}, "
        f"{engine_model.max_prefill_tokens_per_step} prefill tokens a rank a step, on http://{host}:{port}",
        err=True,
    )
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve_mock_engine(config, host, port))
