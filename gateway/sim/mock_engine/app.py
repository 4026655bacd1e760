"""A simulated SGLang or vLLM DP+EP engine behind an OpenAI-compatible HTTP API.

:func:`create_mock_engine_app` builds a FastAPI app around one :class:`~gateway.sim.engine_model.EngineModel`;
its lifespan owns the step-loop task (:class:`~gateway.sim.mock_engine.runtime.EngineRuntime`). Endpoints:

- both flavours: ``POST /v1/chat/completions``, ``POST /v1/completions`` (JSON or SSE; rank pinning, errors
  and output lengths as in :mod:`gateway.sim.mock_engine.protocol`), ``GET /v1/models``, ``GET /health``,
  ``GET /metrics`` (:mod:`gateway.sim.mock_engine.metrics`);
- SGLang flavour also: ``GET /health_generate``, ``GET /server_info`` (alias ``/get_server_info``),
  ``GET /model_info`` (alias ``/get_model_info``), ``GET /v1/loads`` (per-rank loads in SGLang 0.5.23's shape,
  :func:`sglang_v1_loads`; what the SGLang Model Gateway polls) and ``GET /get_load`` (the older bare list that
  sglang-router 0.3 polls);
- a mixed engine, both flavours: the Responses API (``POST /v1/responses``, ``GET /v1/responses/{id}``,
  ``POST /v1/responses/{id}/cancel``; its store with :attr:`MockEngineConfig.response_store`), as
  :mod:`gateway.sim.mock_engine.responses` describes;
- fault injection (simulation only): ``GET``/``PUT``/``DELETE /_sim/faults`` (:mod:`gateway.sim.mock_engine.faults`);
- what the engine was asked (simulation only): ``GET /_sim/requests``, requests accepted per DP rank, pinned by the
  caller or placed by the engine, and the load polls served (``/v1/loads``, ``/get_load``, ``/metrics``), so a
  benchmark can show whether a router in front pinned ranks and polled loads;
- a P/D engine (``MockEngineConfig.role`` prefill or decode; :mod:`gateway.sim.mock_engine.pd`): the flavour's P/D
  legs on the generation routes, ``GET /_sim/pd/info`` and, on a prefill, the KV rendezvous its decode mocks call
  (SGLang ``POST /_sim/pd/sglang/connect``, ``/done``, ``/abort``; vLLM NIXL ``POST /_sim/pd/nixl/read``, ``/done``;
  vLLM Mooncake the bootstrap server's ``GET /query`` and ``POST /_sim/pd/mooncake/pull``, ``/done``).

Unpinned requests go where the real engine would put them: vLLM by its ``waiting * 4 + running`` rule,
SGLang round robin. Run one from the shell with ``gateway mock-engine --flavor vllm --dp-size 4 --port 8001``
or from Python with ``asyncio.run(serve_mock_engine(MockEngineConfig("vllm", 4), "127.0.0.1", 8001))``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.sim.calibration import VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT_S, VLLM_NIXL_KV_LEASE_S, EngineModelConfig
from gateway.sim.engine_model import EngineModel, RankStats
from gateway.sim.mock_engine.faults import FaultInjector, FaultPlan, HangResponse, silence_injected_crashes
from gateway.sim.mock_engine.metrics import MockEngineMetrics
from gateway.sim.mock_engine.pd import (
    DEFAULT_PD_TIMEOUT_S,
    KvConnector,
    KvLoadFailurePolicy,
    PdEngine,
    Role,
    request_body,
    sglang_error,
    vllm_generation_error,
)
from gateway.sim.mock_engine.protocol import (
    MIN_PREFIX_BLOCK_TOKENS,
    Flavor,
    GenerationRequest,
    PrefixTokenizer,
    ProtocolError,
    RequestKind,
    TokenIdEncoder,
    bad_request,
    error_body,
    parse_generation_request,
)
from gateway.sim.mock_engine.response import GenerationResponse
from gateway.sim.mock_engine.responses import ResponsesEndpoints
from gateway.sim.mock_engine.runtime import EngineRuntime, GenerationHandle

ServerInfoMaxRunning = Literal["per-rank", "sglang"]
"""What ``/server_info`` reports as ``max_running_requests`` (:attr:`MockEngineConfig.server_info_max_running`)."""

SIMULATED_SGLANG_VERSION = "0.5.23-sim"
"""``version`` reported by the SGLang flavour's ``/server_info`` (the SGLang version it imitates)."""


V1_LOADS_SECTIONS = frozenset({"all", "core", "memory", "spec", "lora", "disagg", "queues"})
"""The ``include`` values SGLang's ``GET /v1/loads`` accepts (``LoadSnapshot.VALID_SECTIONS``,
sglang/srt/entrypoints/v1_loads.py); anything else is HTTP 400."""


def sglang_v1_loads(
    stats: list[RankStats],
    include: str | None,
    max_running_requests: int,
    gen_throughput: Callable[[int], float],
    dp_rank: int | None = None,
    mode: str = "null",
    bootstrap_queue: Callable[[int], int] = lambda _rank: 0,
) -> dict[str, Any]:
    """The body of SGLang's ``GET /v1/loads`` for the ranks in ``stats``, as SGLang 0.5.23 sends it.

    Shape (sglang/srt/entrypoints/v1_loads.py and ``LoadSnapshot.to_dict``): ``{"timestamp", "version",
    "loads": [per rank]}``; per rank the twelve core fields always, then the sections ``include`` (comma-separated,
    default ``all``) names: ``memory``, ``speculative`` and ``lora`` (``null`` here, as SGLang sends a section whose
    feature is off or whose figures it cannot read), ``disaggregation`` (mode ``"null"``, queues 0) and ``queues``.
    ``dp_rank`` outside the ranks gives an empty list, as SGLang does. A P/D engine (``mode`` ``"prefill"`` or
    ``"decode"``) reports its queues in ``disaggregation`` (prefill ``prefill_bootstrap_queue_reqs``, from
    ``bootstrap_queue``: waiting for the decode side, and ``prefill_inflight_queue_reqs``: holding KV for it; decode
    ``decode_prealloc_queue_reqs`` and ``decode_transfer_queue_reqs``) and counts them as SGLang's
    ``SchedulerLoadInquirer.get_loads`` does (sglang/srt/managers/scheduler_components/load_inquirer.py):
    ``num_waiting_reqs`` adds the bootstrap queue (prefill) or the pre-allocation and transfer queues (decode);
    on decode ``num_waiting_uncached_tokens`` is 0, ``num_total_tokens`` is the KV in use (the transfers'
    reservations included) plus the pre-allocation queue's prompt tokens, and ``num_active_tokens``
    (``LoadSnapshot``, sglang/srt/managers/load_snapshot.py) is that less the tokens whose KV has not arrived (the
    pre-allocation and transfer queues'); on prefill ``num_active_tokens`` equals ``num_total_tokens`` (the bootstrap
    queue's prompt tokens, which SGLang adds to both, are not known to the mock and are left out).

    The simulated engine has no prefix cache in this form, so every waiting token is uncached
    (``num_waiting_uncached_tokens``) and ``cache_hit_rate`` is 0; ``num_total_tokens`` is the KV in use plus the
    waiting prompt tokens still to prefill (SGLang adds each waiting request's whole ``seqlen``); ``utilization``
    is 0, as SGLang 0.5.23 reports it (its setter is never reached).

    Raises:
        ValueError: a section not in :data:`V1_LOADS_SECTIONS` (SGLang answers HTTP 400).
    """
    sections = {s.strip() for s in include.split(",")} if include else {"all"}
    if unknown := sections - V1_LOADS_SECTIONS:
        raise ValueError(f"Invalid include sections: {sorted(unknown)}. Valid options: {sorted(V1_LOADS_SECTIONS)}")
    wanted = V1_LOADS_SECTIONS if "all" in sections else sections
    loads = []
    for s in stats:
        if dp_rank is not None and s.rank != dp_rank:
            continue
        load: dict[str, Any] = {
            "dp_rank": s.rank,
            "num_running_reqs": s.running,
            "num_waiting_reqs": s.waiting,
            "num_waiting_uncached_tokens": s.waiting_prompt_tokens,
            "num_used_tokens": s.kv_used_tokens,
            "num_total_tokens": s.kv_used_tokens + s.waiting_prompt_tokens,
            "max_total_num_tokens": s.kv_capacity_tokens,
            "max_running_requests": max_running_requests,
            "token_usage": round(s.kv_usage, 4),
            "gen_throughput": round(gen_throughput(s.rank), 2),
            "cache_hit_rate": 0.0,
            "utilization": 0.0,
        }
        if mode == "prefill":
            load["num_waiting_reqs"] = s.waiting + bootstrap_queue(s.rank)
            load["num_active_tokens"] = load["num_total_tokens"]
        elif mode == "decode":
            load["num_waiting_reqs"] = s.waiting + s.prealloc + s.transfer
            load["num_waiting_uncached_tokens"] = 0
            load["num_total_tokens"] = s.kv_used_tokens + s.prealloc_tokens
            load["num_active_tokens"] = s.kv_used_tokens - s.transfer_kv_tokens
        if "memory" in wanted:
            load["memory"] = None
        if "spec" in wanted:
            load["speculative"] = None
        if "lora" in wanted:
            load["lora"] = None
        if "disagg" in wanted:
            load["disaggregation"] = {
                "mode": mode,
                "prefill_bootstrap_queue_reqs": bootstrap_queue(s.rank),
                "prefill_inflight_queue_reqs": s.held,
                "decode_prealloc_queue_reqs": s.prealloc,
                "decode_transfer_queue_reqs": s.transfer,
                "decode_retracted_queue_reqs": 0,
                "kv_transfer_speed_gb_s": 0.0,
                "kv_transfer_latency_ms": 0.0,
            }
        if "queues" in wanted:
            load["queues"] = {"waiting": s.waiting, "grammar": 0, "paused": 0, "retracted": 0}
        loads.append(load)
    return {"timestamp": datetime.now(UTC).isoformat(), "version": SIMULATED_SGLANG_VERSION, "loads": loads}


SHUTDOWN_GRACE_S = 5
"""Seconds uvicorn lets in-flight requests run on shutdown before cancelling them (which aborts them)."""


@dataclass(frozen=True)
class MockEngineConfig:
    """Settings of one simulated engine instance.

    Raises:
        ValueError: on construction, for an unknown flavour, ``dp_size < 1``, ``speed <= 0`` or
            ``max_model_len < 2``.
    """

    flavor: Flavor
    """Which engine's HTTP API, rank pinning, errors and metrics to imitate: ``"sglang"`` or ``"vllm"``."""

    dp_size: int
    """Number of DP ranks of the instance."""

    model: str = "deepseek-v3"
    """Served model name: requests naming another model get 404; echoed in responses and metric labels."""

    speed: float = 1.0
    """Engine seconds per wall-clock second: each step sleeps ``duration_s / speed``. 1.0 is real time."""

    engine_model: EngineModelConfig = field(default_factory=EngineModelConfig)
    """Per-rank timing, capacity and engine behaviour of the engine model: the idealised default, or the engine
    as shipped (:meth:`EngineModelConfig.as_shipped`; ``gateway mock-engine --profile as-shipped``)."""

    seed: int = 0
    """Seeds the hash behind natural (non-``ignore_eos``) output lengths (response ids are random UUIDs, so
    that engines sharing a seed never hand out the same id)."""

    max_model_len: int = 131072
    """Longest prompt + ``max_tokens`` accepted, tokens (DeepSeek-V3's 128k context); longer → HTTP 400."""

    tokenizer: PrefixTokenizer = "estimate"
    """Who counts a prompt's tokens and cuts it into prefix blocks: ``"estimate"``, the gateway's own estimator
    (four characters a token), or ``"deepseek"``, DeepSeek-V3's tokenizer after its chat template, as the real
    engine counts (:func:`gateway.sim.mock_engine.protocol.prompt_blocks`)."""

    role: Role = "mixed"
    """``"mixed"``, or one side of P/D disaggregation: ``"prefill"`` or ``"decode"``, speaking the flavour's P/D
    protocol (SGLang's bootstrap, vLLM's NixlConnector; :mod:`gateway.sim.mock_engine.pd`). The engine model gets
    the same ``role`` and ``pd_connector`` = the flavour (and, for a vLLM prefill whose model sets no lease, vLLM's
    30 s lease)."""

    pd_timeout_s: float | None = None
    """SGLang: how long a prefill waits for its decode side to connect, and a decode for its KV, seconds
    (``SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT``, ``SGLANG_DISAGGREGATION_WAITING_TIMEOUT``: 300). vLLM Mooncake:
    how long a pull waits for its prefill (``VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT``: 480). None: the engine's
    default (:attr:`handoff_timeout_s`)."""

    kv_connector: KvConnector = "nixl"
    """vLLM P/D: the KV connector whose protocol the engine speaks, ``"nixl"`` (NixlConnector) or ``"mooncake"``
    (MooncakeConnector)."""

    kv_load_failure_policy: KvLoadFailurePolicy = "fail"
    """vLLM decode: a request whose KV cannot be read fails (``"fail"``, vLLM's default) or prefills locally
    (``"recompute"``)."""

    engine_id: str | None = None
    """vLLM prefill: the engine id in ``remote_engine_id`` (``{engine_id}_dp{rank}``); None: a random UUID, as
    vLLM's ``kv_transfer_config.engine_id`` defaults."""

    force_query_prefill_dp_rank: bool = False
    """SGLang prefill: ``SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1`` (0.5.23 ``environ.py``, default
    off): a request pinned to a rank other than ``bootstrap_room % dp_size`` registers its rank with the bootstrap
    server instead of being refused with the ``follow_bootstrap_room`` conflict (``CommonKVSender.__init__``)."""

    response_store: bool = False
    """Keep finished Responses in memory for ``previous_response_id``, retrieval and cancel, as vLLM with
    ``VLLM_ENABLE_RESPONSES_API_STORE=1`` and SGLang with ``--enable-response-store`` do; off, as in both engines
    by default (:mod:`gateway.sim.mock_engine.responses`)."""

    server_info_max_running: ServerInfoMaxRunning = "per-rank"
    """What SGLang's ``GET /server_info`` reports as ``max_running_requests``. ``"per-rank"`` (the default, what
    the mock always reported): the engine model's running-request cap of one DP rank. ``"sglang"``: as SGLang
    0.5.x reports it. The top-level fields are its ``ServerArgs`` (``entrypoints/http_server.py``
    ``get_server_info``), so ``max_running_requests`` is the ``--max-running-requests`` flag as given
    (:attr:`max_running_requests_flag`: a whole-engine figure, which each rank divides by the attention DP size in
    ``mem_cache/kv_cache_configurator.py`` ``resolve_max_num_reqs``), ``null`` when the flag is unset; the value a
    rank enforces is in its ``internal_states`` row as ``effective_max_running_requests_per_dp``
    (``managers/scheduler.py`` ``get_internal_state``)."""

    max_running_requests_flag: int | None = None
    """SGLang's ``--max-running-requests`` as the operator gave it (``None``: unset), reported by
    :attr:`server_info_max_running` ``"sglang"``; the engine model's per-rank cap comes from the same flag
    (:meth:`EngineModelConfig.as_shipped`)."""

    def __post_init__(self) -> None:
        if self.flavor not in ("sglang", "vllm"):
            raise ValueError(f"flavor must be 'sglang' or 'vllm', got {self.flavor!r}")
        if self.dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {self.dp_size}")
        if self.speed <= 0:
            raise ValueError(f"speed must be > 0, got {self.speed}")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.role not in ("mixed", "prefill", "decode"):
            raise ValueError(f"role must be 'mixed', 'prefill' or 'decode', got {self.role!r}")
        if self.pd_timeout_s is not None and self.pd_timeout_s <= 0:
            raise ValueError(f"pd_timeout_s must be > 0, got {self.pd_timeout_s}")
        if self.kv_connector not in ("nixl", "mooncake"):
            raise ValueError(f"kv_connector must be 'nixl' or 'mooncake', got {self.kv_connector!r}")
        if self.server_info_max_running not in ("per-rank", "sglang"):
            raise ValueError(
                f"server_info_max_running must be 'per-rank' or 'sglang', got {self.server_info_max_running!r}"
            )

    @property
    def handoff_timeout_s(self) -> float:
        """:attr:`pd_timeout_s`, or the engine's default: SGLang 300 s, vLLM Mooncake 480 s."""
        if self.pd_timeout_s is not None:
            return self.pd_timeout_s
        return VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT_S if self.flavor == "vllm" else DEFAULT_PD_TIMEOUT_S

    def model_config(self) -> EngineModelConfig:
        """The engine model's settings with this engine's P/D role (see :attr:`role`)."""
        em = self.engine_model
        if self.role == "mixed":
            return em
        lease = em.kv_lease_s
        if lease is None and self.flavor == "vllm" and self.role == "prefill":
            lease = VLLM_NIXL_KV_LEASE_S if self.kv_connector == "nixl" else VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT_S
        return replace(em, role=self.role, pd_connector=self.flavor, kv_lease_s=lease)


class _MockEngine:
    """The state behind one app: model, runtime, metrics, and the route handlers."""

    def __init__(self, config: MockEngineConfig) -> None:
        self.config = config
        self.model = EngineModel(config.model_config(), config.dp_size)
        self.metrics = MockEngineMetrics(
            config.flavor, config.model, config.dp_size, self.model.rank_stats, role=config.role
        )
        self.runtime = EngineRuntime(self.model, config.speed, self.metrics)
        self.faults = FaultInjector()
        em = config.engine_model
        self.prefix_block_tokens = max(em.kv_block_size, MIN_PREFIX_BLOCK_TOKENS) if em.enable_prefix_caching else None
        self.tokenizer: TokenIdEncoder | None = None
        if config.tokenizer == "deepseek":
            from gateway.workload.tokenizer import deepseek_tokenizer

            self.tokenizer = deepseek_tokenizer()
        self.serving = False
        self._created = int(time.time())
        self.pinned = [0] * config.dp_size
        self.placed = [0] * config.dp_size
        self.polls = {"/v1/loads": 0, "/get_load": 0, "/metrics": 0}
        self.pd = PdEngine(self) if config.role != "mixed" else None
        self.responses = ResponsesEndpoints(self)
        if self.pd is not None:
            self.metrics.bootstrap_queue = self.pd.bootstrap_queue

    @contextlib.asynccontextmanager
    async def lifespan(self, _app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(self.runtime.run(), name=f"mock-{self.config.flavor}-step-loop")
        self.serving = True
        try:
            yield
        finally:
            self.serving = False
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if self.pd is not None:
                await self.pd.close()

    def error(self, exc: ProtocolError) -> JSONResponse:
        return JSONResponse(error_body(self.config.flavor, exc), status_code=exc.status)

    async def generate(self, request: Request, kind: RequestKind) -> Response:
        cfg = self.config
        if not self.serving:
            return self.error(ProtocolError(503, "The engine is not running.", "ServiceUnavailableError"))
        try:
            parse = functools.partial(
                parse_generation_request,
                kind=kind,
                raw_body=await request.body(),
                headers=request.headers,
                flavor=cfg.flavor,
                served_model=cfg.model,
                dp_size=cfg.dp_size,
                max_model_len=cfg.max_model_len,
                seed=cfg.seed,
                prefix_block_tokens=self.prefix_block_tokens,
                tokenizer=self.tokenizer,
            )
            # encoding a long prompt takes tens of milliseconds: off the event loop, which runs the steps
            req = await asyncio.to_thread(parse) if self.tokenizer is not None else parse()
            if self.pd is not None:
                return await self.pd.generate(request, req, request_body(await request.body()))
            rank = req.rank if req.rank is not None else self.pick_rank()
            (self.placed if req.rank is None else self.pinned)[rank] += 1
            fault = self.faults.request_fault(rank)
            if fault == "http_500":
                raise ProtocolError(500, "injected fault: internal error", "InternalServerError")
            if fault == "error_event":
                if cfg.flavor == "sglang":
                    return sglang_error(500, "injected fault: internal error", req.stream)
                return vllm_generation_error(req.stream)
            if fault == "hang":
                return HangResponse()
            try:
                handle = self.submit(rank, req)
            except ValueError as exc:
                raise bad_request(str(exc), "max_tokens") from exc
        except ProtocolError as exc:
            return self.error(exc)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        return GenerationResponse(
            self.runtime, handle, req, response_id, int(time.time()), fault, self.faults.plan.after_chunks
        )

    def submit(self, rank: int, req: GenerationRequest) -> GenerationHandle:
        """Start ``req`` on DP rank ``rank`` of the engine model, with its prefix blocks.

        Raises:
            ValueError: the request does not fit the model (its ``max_tokens`` or prompt).
        """
        return self.runtime.submit(
            rank,
            req.prompt_tokens,
            req.output_tokens,
            req.finish_reason,
            max_new_tokens=req.max_tokens,
            ignore_eos=req.ignore_eos,
            prefix_blocks=req.prefix_blocks,
            prefix_block_tokens=self.prefix_block_tokens or 1,
        )

    def pick_rank(self) -> int:
        """The rank the real engine would give an unpinned request."""
        if self.config.flavor == "vllm":
            return self.model.pick_rank_vllm()
        return self.model.pick_rank_round_robin()

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, "completion")

    async def models(self) -> dict[str, Any]:
        card = {
            "id": self.config.model,
            "object": "model",
            "created": self._created,
            "owned_by": self.config.flavor,
            "root": self.config.model,
            "parent": None,
            "max_model_len": self.config.max_model_len,
        }
        return {"object": "list", "data": [card]}

    async def health(self) -> Response:
        fault = self.faults.plan.health
        if fault != "ok":
            self.faults.count(f"health_{fault}")
            if fault == "hang":
                return HangResponse()
        return Response(status_code=200 if self.serving and fault == "ok" else 503)

    async def metrics_text(self) -> Response:
        self.polls["/metrics"] += 1
        plan = self.faults.plan
        if plan.metrics != "ok":
            self.faults.count(f"metrics_{plan.metrics}")
        if plan.metrics == "hang":
            return HangResponse()
        if plan.metrics == "garbage":
            return Response(b"\x00{not prometheus}\n# TYPE\nvllm:num_requests_running{engine=", media_type="text/plain")
        if plan.metrics == "slow":
            await asyncio.sleep(plan.metrics_delay_s)
        return Response(self.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def requests_seen(self) -> dict[str, object]:
        """Generation requests accepted per DP rank (``pinned``: the caller named the rank; ``placed``: the engine
        chose it), load polls served per route, and per DP rank the prompt tokens looked up in and found in its
        prefix cache (``prefix_cache_queries`` / ``prefix_cache_hits``, zeros without one), since start. A P/D
        engine adds, per DP rank, the KV transfers completed and failed (``transfers_completed`` /
        ``transfers_failed``: handed over by a prefill, received by a decode), the requests still in the engine
        (``running``: waiting, running, queued for or fetching KV), the requests holding KV for the decode side
        (``held``) and the KV in use (``kv_used_tokens``)."""
        stats = self.model.rank_stats()
        seen: dict[str, object] = {
            "pinned": self.pinned,
            "placed": self.placed,
            "polls": self.polls,
            "prefix_cache_queries": [s.prefix_cache_queries for s in stats],
            "prefix_cache_hits": [s.prefix_cache_hits for s in stats],
        }
        if self.pd is None:
            seen["responses"] = self.responses.counters()
        if self.pd is not None:
            seen |= self.pd.counters()
            seen["running"] = [s.running + s.waiting + s.prealloc + s.transfer for s in stats]
            seen["held"] = [s.held for s in stats]
            seen["kv_used_tokens"] = [s.kv_used_tokens for s in stats]
        return seen

    async def get_faults(self) -> dict[str, object]:
        return self.faults.describe()

    async def put_faults(self, plan: FaultPlan) -> dict[str, object]:
        self.faults.plan = plan
        return self.faults.describe()

    async def delete_faults(self) -> dict[str, object]:
        self.faults.plan = FaultPlan()
        return self.faults.describe()

    async def v1_loads(self, include: str | None = None, dp_rank: int | None = None) -> Response:
        """SGLang's ``GET /v1/loads`` (:func:`sglang_v1_loads`); an unknown ``include`` section is HTTP 400."""
        self.polls["/v1/loads"] += 1
        try:
            body = sglang_v1_loads(
                self.model.rank_stats(),
                include,
                self.config.engine_model.max_running_requests,
                self.metrics.gen_throughput,
                dp_rank,
                "null" if self.pd is None else self.config.role,
                self.pd.bootstrap_queue if self.pd is not None else lambda _rank: 0,
            )
        except ValueError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        return JSONResponse(body)

    async def loads(self) -> list[dict[str, Any]]:
        """Per-rank loads, the shape of SGLang's older ``/get_load``: ``num_reqs`` counts running + waiting."""
        self.polls["/get_load"] += 1
        return self._get_load_rows()

    def _get_load_rows(self) -> list[dict[str, Any]]:
        return [
            {
                "dp_rank": s.rank,
                "num_reqs": s.running + s.waiting,
                "num_waiting_reqs": s.waiting,
                "num_tokens": s.kv_used_tokens,
            }
            for s in self.model.rank_stats()
        ]

    @property
    def load_balance_method(self) -> str:
        """SGLang's resolved ``--load-balance-method`` as ``/server_info`` reports it: ``auto`` resolves to
        ``follow_bootstrap_room`` on a P/D prefill server and to ``round_robin`` elsewhere (0.5.23
        ``arg_groups/serving_hook.py`` ``handle_load_balance_method``; ``/server_info`` gives resolved values)."""
        return "follow_bootstrap_room" if self.config.role == "prefill" else "round_robin"

    async def server_info(self) -> dict[str, Any]:
        cfg, em = self.config, self.config.engine_model
        states: list[dict[str, Any]] = self._get_load_rows()
        reported: int | None = em.max_running_requests
        if cfg.server_info_max_running == "sglang":
            reported = cfg.max_running_requests_flag
            states = [{**row, "effective_max_running_requests_per_dp": em.max_running_requests} for row in states]
        return {
            "model_path": cfg.model,
            "tokenizer_path": cfg.model,
            "served_model_name": cfg.model,
            "dp_size": cfg.dp_size,
            "tp_size": cfg.dp_size,
            "ep_size": cfg.dp_size,
            "enable_dp_attention": True,
            "load_balance_method": self.load_balance_method,
            "chunked_prefill_size": em.max_prefill_tokens_per_step,
            "max_running_requests": reported,
            "max_total_num_tokens": em.kv_capacity_tokens,
            "context_length": cfg.max_model_len,
            "disaggregation_mode": "null" if self.pd is None else self.config.role,
            "enable_prefill_delayer": em.enable_prefill_delayer,
            "prefill_delayer_max_delay_passes": em.prefill_delayer_max_delay_passes,
            "internal_states": states,
            "version": SIMULATED_SGLANG_VERSION,
        }

    async def model_info(self) -> dict[str, Any]:
        cfg = self.config
        return {"model_path": cfg.model, "tokenizer_path": cfg.model, "is_generation": True}


def create_mock_engine_app(config: MockEngineConfig) -> FastAPI:
    """Build the HTTP app of one simulated engine (see the module docstring for its endpoints).

    The app's lifespan starts and stops the step loop; requests made without it running get HTTP 503
    (remember that ``httpx.ASGITransport`` does not run lifespan: enter ``app.router.lifespan_context``).
    """
    engine = _MockEngine(config)
    silence_injected_crashes()
    app = FastAPI(
        title=f"simulated {config.flavor} engine",
        lifespan=engine.lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.add_api_route("/v1/chat/completions", engine.chat_completions, methods=["POST"])
    app.add_api_route("/v1/completions", engine.completions, methods=["POST"])
    app.add_api_route("/v1/models", engine.models, methods=["GET"])
    app.add_api_route("/health", engine.health, methods=["GET"])
    app.add_api_route("/metrics", engine.metrics_text, methods=["GET"])
    app.add_api_route("/_sim/faults", engine.get_faults, methods=["GET"])
    app.add_api_route("/_sim/faults", engine.put_faults, methods=["PUT"])
    app.add_api_route("/_sim/faults", engine.delete_faults, methods=["DELETE"])
    app.add_api_route("/_sim/requests", engine.requests_seen, methods=["GET"])
    if engine.pd is None:
        app.add_api_route("/v1/responses", engine.responses.create, methods=["POST"])
        app.add_api_route("/v1/responses/{response_id}", engine.responses.retrieve, methods=["GET"])
        app.add_api_route("/v1/responses/{response_id}/cancel", engine.responses.cancel, methods=["POST"])
    if engine.pd is not None:
        app.add_api_route("/_sim/pd/info", engine.pd.info, methods=["GET"])
        if config.role == "prefill" and config.flavor == "sglang":
            app.add_api_route("/_sim/pd/sglang/connect", engine.pd.sglang_connect, methods=["POST"])
            app.add_api_route("/_sim/pd/sglang/done", engine.pd.sglang_done, methods=["POST"])
            app.add_api_route("/_sim/pd/sglang/abort", engine.pd.sglang_abort, methods=["POST"])
        if config.role == "prefill" and config.flavor == "vllm" and config.kv_connector == "nixl":
            app.add_api_route("/_sim/pd/nixl/read", engine.pd.nixl_read, methods=["POST"])
            app.add_api_route("/_sim/pd/nixl/done", engine.pd.nixl_done, methods=["POST"])
        if config.role == "prefill" and config.flavor == "vllm" and config.kv_connector == "mooncake":
            app.add_api_route("/query", engine.pd.mooncake_query, methods=["GET"])
            app.add_api_route("/_sim/pd/mooncake/pull", engine.pd.mooncake_pull, methods=["POST"])
            app.add_api_route("/_sim/pd/mooncake/done", engine.pd.mooncake_done, methods=["POST"])
    app.state.engine = engine
    if config.flavor == "sglang":
        app.add_api_route("/health_generate", engine.health, methods=["GET"])
        for path in ("/server_info", "/get_server_info"):
            app.add_api_route(path, engine.server_info, methods=["GET"])
        for path in ("/model_info", "/get_model_info"):
            app.add_api_route(path, engine.model_info, methods=["GET"])
        app.add_api_route("/v1/loads", engine.v1_loads, methods=["GET"])
        app.add_api_route("/get_load", engine.loads, methods=["GET"])
    return app


def mock_engine_server(config: MockEngineConfig, host: str, port: int) -> uvicorn.Server:
    """A uvicorn server (log level warning, no websockets) for a new simulated engine app.

    ``port=0`` picks a free port: read it from ``server.servers[0].sockets[0].getsockname()`` once
    ``server.started`` is True.
    """
    app = create_mock_engine_app(config)
    uvicorn_config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan="on",
        ws="none",
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
    )
    return uvicorn.Server(uvicorn_config)


async def serve_mock_engine(config: MockEngineConfig, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve a simulated engine on ``host:port`` until the process is interrupted."""
    await mock_engine_server(config, host, port).serve()
