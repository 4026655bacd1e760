"""P/D disaggregation in the virtual-time simulator: prefill and decode pools of engine models, and the handoff
between them as each engine's protocol runs it.

:class:`PdPools` describes the pools (instances, DP ranks, the KV connector, the per-leg policies);
:class:`PdDriver` holds their :class:`~gateway.sim.engine_model.EngineModel` instances (role ``prefill`` or
``decode``, the rules of :mod:`gateway.sim.engine.pd`) and moves each request through its two legs, as the HTTP P/D
mocks (:mod:`gateway.sim.mock_engine.pd`) and the gateway's relay (:mod:`gateway.server.pd_relay`) do over HTTP:

- SGLang bootstrap (``connector="sglang"``): the gateway sends both legs at once. The decode leg joins its rank's
  pre-allocation queue; once it has its KV reservation it connects to the prefill rank, whose request only then
  starts (SGLang's default, no optimistic prefill). The prefill finishes at its first token and holds the KV; the
  transfer starts at once and takes :meth:`~gateway.sim.calibration.EngineModelConfig.kv_transfer_s`; when it ends
  the decode rank emits the first output token (the prefill's, carried with the KV) and decodes on, the prefill rank
  frees the KV and answers the gateway.
- vLLM NixlConnector (``connector="vllm"``): the gateway sends the prefill leg; it finishes at its first token,
  holds the KV and answers at once; when the answer reaches the gateway it sends the decode leg, which reserves the
  prompt's blocks, reads them (the same transfer time) and decodes, its first output token coming from its first
  step; the prefill rank frees the KV when the read ends.

What the gateway sees is fed to its scheduler as the live relay feeds it: the prefill leg's answer
(:meth:`~gateway.scheduling.scheduler.Scheduler.on_first_token` with the prefill engine), then the decode leg's
tokens and finish with the decode engine. The information limits' delays apply to every hop between gateway and
engine (``to_engine_s`` to each leg, ``to_gateway_s`` to each answer and token); the engines' own handshake and
the gateway's relay cost nothing. No faults, timeouts or retries are simulated (the HTTP tests cover them).
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, replace
from typing import Protocol

from gateway.config import PdConfig
from gateway.load.view import EngineSpec
from gateway.sim.calibration import EngineModelConfig, PdConnector
from gateway.sim.engine_model import EngineModel, RankStats, TokenEvent
from gateway.types import RankKey, RankMetrics


@dataclass(frozen=True)
class PdPools:
    """Prefill and decode pools of one simulated P/D deployment.

    Attributes:
        prefill_instances: prefill engine instances (>= 1).
        prefill_dp_size: DP ranks per prefill instance (>= 1).
        decode_instances: decode engine instances (>= 1).
        decode_dp_size: DP ranks per decode instance (>= 1).
        connector: whose handoff the engines follow (``"sglang"``: the bootstrap protocol; ``"vllm"``: the
            NixlConnector's, prefill first).
        prefill_policy: the prefill leg's own policy (``pd.prefill_policy``); None lets the scheduler's policy place
            it.
        decode_policy: the decode leg's policy (``pd.decode_policy``); None: ``sbs`` under ``sbs``, else the
            scheduler's policy.
    """

    prefill_instances: int = 2
    prefill_dp_size: int = 8
    decode_instances: int = 1
    decode_dp_size: int = 16
    connector: PdConnector = "sglang"
    prefill_policy: str | None = None
    decode_policy: str | None = None

    def __post_init__(self) -> None:
        sizes = (self.prefill_instances, self.prefill_dp_size, self.decode_instances, self.decode_dp_size)
        if min(sizes) < 1:
            raise ValueError(f"every pool needs >= 1 instance of >= 1 rank, got {sizes}")
        if self.connector not in ("sglang", "vllm"):
            raise ValueError(f"connector must be 'sglang' or 'vllm', got {self.connector!r}")
        if self.prefill_policy == "follow_bootstrap_room" and self.connector != "sglang":
            raise ValueError("prefill_policy 'follow_bootstrap_room' is SGLang's rule: it needs connector 'sglang'")

    def pd_config(self) -> PdConfig:
        """The gateway's ``pd`` section for these per-leg policies.

        Raises:
            pydantic.ValidationError: an unknown policy name.
        """
        return PdConfig.model_validate({"prefill_policy": self.prefill_policy, "decode_policy": self.decode_policy})

    def engine_config(self, engine: EngineModelConfig, role: str) -> EngineModelConfig:
        """``engine`` as an instance of ``role`` (``"prefill"`` or ``"decode"``) with this connector."""
        return replace(engine, role=role, pd_connector=self.connector)  # type: ignore[arg-type]


class SimHooks(Protocol):
    """What the driver needs of the simulation it runs in (:mod:`gateway.sim.simulate`)."""

    now: float

    def push(self, t: float, kind: str, data: object = None) -> None:
        """Schedule event ``kind`` with ``data`` at time ``t``."""

    def deliver(self, events: list[TokenEvent], name: str) -> None:
        """Client-visible tokens from decode engine ``name``: to the gateway (after their delay)."""

    def start_step(self, name: str) -> None:
        """Start a step of engine ``name`` if it has work."""

    def is_idle(self, name: str) -> bool:
        """Whether engine ``name`` runs no step now."""

    def on_prefill_answer(self, request_id: str, name: str) -> None:
        """The prefill leg's answer from engine ``name`` reached the gateway."""


@dataclass(slots=True)
class _Legs:
    prefill: RankKey
    decode: RankKey
    prompt_tokens: int
    output_tokens: int
    prefix_blocks: tuple[int, ...]
    to_engine_s: float
    to_gateway_s: float
    answered: bool = False
    """The prefill leg's answer reached the gateway."""
    decoded: bool = False
    """The decode leg finished."""


class PdDriver:
    """The pools' engine models and the handoff between them (see the module docstring).

    Args:
        pools: the pools.
        engine: the engine model both pools run, before its role is set.
        sim: the simulation's hooks.
    """

    def __init__(self, pools: PdPools, engine: EngineModelConfig, sim: SimHooks) -> None:
        self.pools = pools
        self.sim = sim
        prefill = pools.engine_config(engine, "prefill")
        decode = pools.engine_config(engine, "decode")
        self.prefill_names = [f"p{n}" for n in range(pools.prefill_instances)]
        self.decode_names = [f"d{n}" for n in range(pools.decode_instances)]
        self.engines = {n: EngineModel(prefill, pools.prefill_dp_size) for n in self.prefill_names}
        self.engines |= {n: EngineModel(decode, pools.decode_dp_size) for n in self.decode_names}
        self._legs: dict[str, _Legs] = {}
        self._connecting: dict[RankKey, deque[str]] = {}
        """SGLang: per decode rank, in pre-allocation order, the requests whose prefill waits for their reservation."""
        self._fetching: dict[str, set[str]] = {n: set() for n in self.decode_names}
        """Per decode engine, the requests whose KV the prefill side has and whose transfer has not ended."""
        self._timers: dict[str, float] = {}
        self._bootstrapping: Counter[RankKey] = Counter()
        """SGLang: per prefill rank, the prefill legs waiting for their decode side (the bootstrap queue)."""
        self.legs_sent: Counter[RankKey] = Counter()
        """Legs sent per rank, prefill and decode."""

    def specs(self, models: frozenset[str], budget: int) -> list[EngineSpec]:
        """The load view's engines: the prefill pool, then the decode pool."""
        return [EngineSpec(n, self.pools.prefill_dp_size, models, budget, "prefill") for n in self.prefill_names] + [
            EngineSpec(n, self.pools.decode_dp_size, models, budget, "decode") for n in self.decode_names
        ]

    def is_prefill(self, name: str) -> bool:
        """Whether ``name`` is a prefill engine."""
        return name not in self._fetching

    def unloaded_extra_s(self, prompt_tokens: int) -> float:
        """What P/D adds to an unloaded request's TTFT over its prefill: the KV transfer, seconds."""
        return self.engines[self.decode_names[0]].config.kv_transfer_s(prompt_tokens)

    # -- the gateway sends ------------------------------------------------------------------------------

    def send(
        self,
        request_id: str,
        prefill: RankKey,
        decode: RankKey,
        prompt_tokens: int,
        output_tokens: int,
        prefix_blocks: tuple[int, ...],
        to_engine_s: float = 0.0,
        to_gateway_s: float = 0.0,
    ) -> None:
        """The gateway sends request ``request_id`` to prefill rank ``prefill`` and decode rank ``decode`` now (legs
        reach the engines ``to_engine_s`` later; answers and tokens the gateway ``to_gateway_s`` after they leave)."""
        legs = _Legs(prefill, decode, prompt_tokens, output_tokens, prefix_blocks, to_engine_s, to_gateway_s)
        self._legs[request_id] = legs
        self.legs_sent.update((prefill, decode))
        self.sim.push(self.sim.now + to_engine_s, "pd", ("legs", request_id))

    def handle(self, action: str, request_id: str) -> None:
        """Run a scheduled P/D event (``request_id`` is the engine's name for a timer)."""
        if action == "timer":
            self._timers.pop(request_id, None)
            self.wake(request_id)
            return
        legs = self._legs[request_id]
        if action == "legs":
            if self.pools.connector == "sglang":
                self._add_decode(request_id, legs)
                self._connecting.setdefault(legs.decode, deque()).append(request_id)
                self._bootstrapping[legs.prefill] += 1
                self.wake(legs.decode.engine)
            else:
                self._add_prefill(request_id, legs)
                self.wake(legs.prefill.engine)
            return
        if action == "answer":
            self.sim.on_prefill_answer(request_id, legs.prefill.engine)
            legs.answered = True
            if self.pools.connector == "vllm":
                self.sim.push(self.sim.now + legs.to_engine_s, "pd", ("decode_leg", request_id))
            elif legs.decoded:
                del self._legs[request_id]
            return
        if action == "decode_leg":
            self._add_decode(request_id, legs)
            self._kv_ready(request_id, legs)
            self.wake(legs.decode.engine)
            return
        raise ValueError(f"unknown P/D event {action!r}")

    def _add_prefill(self, request_id: str, legs: _Legs) -> None:
        self.engines[legs.prefill.engine].add_request(
            request_id, legs.prefill.rank, legs.prompt_tokens, 1, prefix_blocks=legs.prefix_blocks, hold_kv=True
        )

    def _add_decode(self, request_id: str, legs: _Legs) -> None:
        self.engines[legs.decode.engine].add_request(
            request_id, legs.decode.rank, legs.prompt_tokens, legs.output_tokens, remote_prefill=True
        )

    def _kv_ready(self, request_id: str, legs: _Legs) -> None:
        self.engines[legs.decode.engine].kv_ready(request_id, self.sim.now)
        self._fetching[legs.decode.engine].add(request_id)

    # -- the engines run ---------------------------------------------------------------------------------

    def wake(self, name: str) -> None:
        """Engine ``name`` has news (a leg, its KV, a timer): if it runs no step, bring its P/D queues to now and start
        a step."""
        if self.sim.is_idle(name):
            self.sim.start_step(name)

    def before_step(self, name: str) -> None:
        """Bring engine ``name``'s P/D queues to now, as the engine does between steps: free expired leases, reserve
        KV, start and end transfers."""
        tokens = self.engines[name].advance(self.sim.now)
        if name in self._fetching:
            self._decode_progress(name, tokens)

    def after_idle(self, name: str) -> None:
        """Engine ``name`` has no step to run: schedule a wake-up at its next timed P/D event (a transfer's end, a
        lease's expiry), if any."""
        event_s = self.engines[name].next_event_s()
        if event_s is None or self._timers.get(name) == event_s:
            return
        self._timers[name] = event_s
        self.sim.push(max(event_s, self.sim.now), "pd", ("timer", name))

    def prefill_tokens(self, events: list[TokenEvent]) -> None:
        """The tokens a prefill engine's step produced: each finishes a prefill, whose KV is then held for the
        decode side."""
        for event in events:
            legs = self._legs[event.request_id]
            if self.pools.connector == "sglang":
                self._kv_ready(event.request_id, legs)
                self.wake(legs.decode.engine)
            else:
                self.sim.push(self.sim.now + legs.to_gateway_s, "pd", ("answer", event.request_id))

    def _decode_progress(self, name: str, tokens: list[TokenEvent]) -> None:
        """After decode engine ``name`` advanced: start the prefills whose reservation came (SGLang), end the
        transfers that completed, and deliver the first tokens they emitted (SGLang)."""
        engine = self.engines[name]
        for rank in range(engine.dp_size):
            queue = self._connecting.get(RankKey(name, rank))
            while queue and engine.pd_phase(queue[0]) != "prealloc":
                request_id = queue.popleft()
                legs = self._legs[request_id]
                self._bootstrapping[legs.prefill] -= 1
                self._add_prefill(request_id, legs)
                self.wake(legs.prefill.engine)
        fetching = self._fetching[name]
        done = [r for r in fetching if engine.pd_phase(r) not in ("prealloc", "transfer")]
        for request_id in done:
            fetching.discard(request_id)
            legs = self._legs[request_id]
            self.engines[legs.prefill.engine].release_held(request_id)
            if self.pools.connector == "sglang":
                self.sim.push(self.sim.now + legs.to_gateway_s, "pd", ("answer", request_id))
        if tokens:
            self.sim.deliver(tokens, name)

    def rank_metrics(
        self, name: str, stats: list[RankStats], now: float, queued_tokens: bool
    ) -> dict[int, RankMetrics]:
        """What a scrape of P/D engine ``name`` tells the gateway, per DP rank, as its adapter reads the engine
        (:mod:`gateway.engines.sglang`: ``GET /v1/loads`` of a P/D server, its queues counted in running or waiting;
        :mod:`gateway.engines.vllm`: the KV fetch stages counted in running), from the engine model's ``stats``
        read at ``now``; ``queued_tokens``: the gateway also takes the queued prefill tokens
        (``scrape.engine_queued_tokens``)."""
        sglang = self.pools.connector == "sglang"
        out = {}
        for s in stats:
            if name in self._fetching:  # decode: its pre-allocation and transfer queues decode there
                out[s.rank] = RankMetrics(
                    s.running + s.prealloc + s.transfer,
                    s.waiting,
                    s.kv_usage,
                    queued_read_at=now if sglang else None,
                    decode_prealloc=s.prealloc,
                    decode_transfer=s.transfer,
                    kv_tokens=s.kv_used_tokens + s.prealloc_tokens if sglang else None,
                )
                continue
            bootstrap = self._bootstrapping[RankKey(name, s.rank)] if sglang else 0
            out[s.rank] = RankMetrics(
                s.running,
                s.waiting + bootstrap,
                s.kv_usage,
                queued_prefill_tokens=s.waiting_prompt_tokens if queued_tokens else None,
                queued_read_at=now if sglang or queued_tokens else None,
                prefill_bootstrap=bootstrap if sglang else None,
                prefill_inflight=s.held if sglang else None,
            )
        return out

    def finished(self, request_id: str) -> None:
        """The decode leg of ``request_id`` finished: forget its legs once the prefill's answer is in too."""
        legs = self._legs[request_id]
        legs.decoded = True
        if legs.answered:
            del self._legs[request_id]
