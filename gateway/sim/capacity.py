"""How loaded a simulated cluster is by a trace: the engine time its work needs at best, over the time it has.

Policy-independent and analytic: derived from the engine model's own step-time formula
(:mod:`gateway.sim.engine_model`, constants in :mod:`gateway.sim.calibration`), no simulation.

Derivation. One lockstep step of an instance lasts ``alltoall_s + max over ranks(prefill work + decode work)``.
Prefill and decode of a rank *add* inside one step, and the all-to-all is paid once per step whatever the step
carries. Summed over a run, a rank's work splits into a part fixed by the requests alone and a per-step part:

- prefill of a prompt of ``L`` tokens costs ``prefill_token_s * L + prefill_attn_s * L**2 / 2`` however it is
  chunked (the chunk costs ``c * (p + c/2)`` telescope to ``L**2 / 2``);
- its ``n`` output tokens cost ``n - 1`` decode steps (the step that completes the prefill emits the first
  token) at ``decode_req_s + decode_kv_s * (L + j)`` for ``j = 1 .. n-1``:
  ``(n-1) * (decode_req_s + decode_kv_s * L) + decode_kv_s * n * (n-1) / 2``;
- every step costs every rank ``alltoall_s``, so the only freedom a scheduler has is how *few* steps it needs
  and how evenly it spreads the work. A rank needs at least as many steps as each of
  (a) its prompt tokens over the chunked-prefill budget (full prefill chunks),
  (b) its request-steps over ``max_running_requests`` (a request holds a running slot from the first step of
  its prefill, ``ceil(L / budget)`` steps at least, to its last token, ``n - 1`` more), and
  (c) its KV-token-steps over ``kv_capacity_tokens`` (the same steps, holding ``L + n`` reserved tokens).
  Prefill and decode share steps, so the bound is the *largest* of the three, not their sum.
- the step lasts as long as its heaviest rank, and a request is pinned to one rank with its chunks in
  successive steps. A chunk late in a long prompt costs more than a fresh full-budget chunk (its attention
  runs over the context before it: at 8192 tokens, 1.23 s fresh, 8.3 s after 90k tokens), while each other rank
  of its instance can do at most one chunk in that step, at best a fresh full one. So every such chunk idles the
  other ``dp_size - 1`` ranks for its excess over a fresh full chunk: the *lockstep excess*. Counting it in
  full assumes no two such chunks share a step, which holds when long prompts are rare (Mooncake: 1% of
  prompts above 100k tokens; on the Azure traces no chunk has any excess, their prompts stay under 8k).

The *needed engine time* of a trace is then ``W + X + S * alltoall_s`` rank-seconds: ``W`` the request-fixed
work, ``X`` the lockstep excess and ``S`` the fewest steps, summed over the cluster, with the work spread
perfectly evenly over its ``instances * dp_size`` ranks otherwise (a fluid bound: integer requests, other
imbalance and bursts only add). The *load* is the needed time over the time available, ``ranks x span`` (span =
first to last arrival). Load 1.0 means a scheduler that balances every step perfectly could just keep up on
average; the load scales exactly with the rate scale (the work is fixed, the span divides), and the capacity is
``rate / load`` (requests or tokens per second). It is an average over the span: a bursty slice (Azure code:
minutes at 3.6x the slice's mean) is overloaded in its bursts well below load 1.0, which
:func:`peak_load` measures.

Calibration check (tests/unit/test_capacity.py): 4096-token prompts with a 16384-token budget give 7.7k prompt
tokens/s per rank, DeepSeek's published 7.8k per H800; 4k-context decode at 128 requests per rank gives the
published 55 ms step.

It assumes every step perfectly balanced across ranks: read it as what such a scheduler could reach, not as what
a given policy sustains. Checked against the simulator, and what the bound means in steady state:
``bench/results/decisions.md#analytic-load``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from gateway.sim.calibration import EngineModelConfig
from gateway.workload.traces import TraceRequest


@dataclass(frozen=True)
class Needed:
    """The engine time a trace needs on a perfectly balanced cluster, split by what bounds it.

    Attributes:
        prefill_work_s: prefill compute over all requests (linear + attention), rank-seconds.
        decode_work_s: decode compute over all requests, rank-seconds.
        lockstep_excess_s: rank time idled by chunks costlier than a fresh full chunk, rank-seconds.
        steps: fewest rank-steps (summed over ranks) that can carry the work: the largest of ``prefill_steps``,
            ``slot_steps`` and ``kv_steps``.
        prefill_steps: prompt tokens over the chunked-prefill budget, rank-steps.
        slot_steps: request-steps over ``max_running_requests``, rank-steps.
        kv_steps: reserved-KV-token-steps over ``kv_capacity_tokens``, rank-steps.
        alltoall_s: all-to-all latency per step, seconds.
    """

    prefill_work_s: float
    decode_work_s: float
    lockstep_excess_s: float
    prefill_steps: float
    slot_steps: float
    kv_steps: float
    alltoall_s: float

    @property
    def steps(self) -> float:
        return max(self.prefill_steps, self.slot_steps, self.kv_steps)

    @property
    def total_s(self) -> float:
        """Needed engine time, rank-seconds: work, lockstep excess and one all-to-all per step."""
        return self.prefill_work_s + self.decode_work_s + self.lockstep_excess_s + self.steps * self.alltoall_s

    @property
    def bound(self) -> str:
        """Which step count binds: ``"prefill"`` (chunk budget), ``"slots"`` (running requests) or ``"kv"``."""
        named = {"prefill": self.prefill_steps, "slots": self.slot_steps, "kv": self.kv_steps}
        return max(named, key=lambda k: named[k])


def lockstep_excess_s(prompt_tokens: int, engine: EngineModelConfig) -> float:
    """Seconds by which the chunks of one prompt exceed a fresh full-budget chunk each (module docstring)."""
    budget = engine.max_prefill_tokens_per_step
    fresh = engine.prefill_chunk_s(budget, 0)
    excess, done = 0.0, 0
    while done < prompt_tokens:
        chunk = min(budget, prompt_tokens - done)
        excess += max(0.0, engine.prefill_chunk_s(chunk, done) - fresh)
        done += chunk
    return excess


def needed_engine_time(trace: Sequence[TraceRequest], engine: EngineModelConfig, dp_size: int) -> Needed:
    """The engine time ``trace`` needs on instances of ``dp_size`` DP ranks at the engine model's most efficient
    operating point (module docstring).

    Independent of arrival times. An empty trace needs nothing.
    """
    budget = engine.max_prefill_tokens_per_step
    prefill = decode = excess = prompt_tokens = slot_steps = kv_steps = 0.0
    for r in trace:
        length, n = r.prompt_tokens, r.output_tokens
        prefill += engine.prefill_token_s * length + engine.prefill_attn_s * length * length / 2
        excess += (dp_size - 1) * lockstep_excess_s(length, engine)
        decode += (n - 1) * (engine.decode_req_s + engine.decode_kv_s * length) + engine.decode_kv_s * n * (n - 1) / 2
        held = math.ceil(length / budget) + n - 1
        prompt_tokens += length
        slot_steps += held
        kv_steps += held * (length + n)
    return Needed(
        prefill_work_s=prefill,
        decode_work_s=decode,
        lockstep_excess_s=excess,
        prefill_steps=prompt_tokens / budget,
        slot_steps=slot_steps / engine.max_running_requests,
        kv_steps=kv_steps / engine.kv_capacity_tokens,
        alltoall_s=engine.alltoall_s,
    )


def span_s(trace: Sequence[TraceRequest]) -> float:
    """First to last arrival, seconds.

    Raises:
        ValueError: fewer than two requests or all arriving at once (no rate).
    """
    if len(trace) < 2 or trace[-1].arrival_s <= trace[0].arrival_s:
        raise ValueError("need at least two requests arriving at different times")
    return trace[-1].arrival_s - trace[0].arrival_s


@dataclass(frozen=True)
class Capacity:
    """A trace's load on a cluster and the rates at which it would be exactly 1.0.

    Attributes:
        load: needed engine time over ``ranks x span``, fraction (1.0 = a perfect scheduler just keeps up).
        ranks: DP ranks of the cluster.
        needed: the needed engine time and its parts.
        request_rps: the trace's request rate, requests/s.
        capacity_rps: ``request_rps / load``, requests/s.
        capacity_prompt_tok_s: prompt tokens/s at load 1.0.
        capacity_output_tok_s: output tokens/s at load 1.0.
    """

    load: float
    ranks: int
    needed: Needed
    request_rps: float
    capacity_rps: float
    capacity_prompt_tok_s: float
    capacity_output_tok_s: float

    def rate_scale_for(self, load: float) -> float:
        """The factor to :func:`~gateway.workload.traces.rescale` the trace by for it to offer ``load``."""
        return load / self.load

    def as_dict(self) -> dict[str, float | int | str]:
        """JSON-able form."""
        return {
            "load": self.load,
            "ranks": self.ranks,
            "bound": self.needed.bound,
            "lockstep_excess_fraction": self.needed.lockstep_excess_s / self.needed.total_s,
            "request_rps": self.request_rps,
            "capacity_rps": self.capacity_rps,
            "capacity_prompt_tok_s": self.capacity_prompt_tok_s,
            "capacity_output_tok_s": self.capacity_output_tok_s,
        }


def cluster_load(trace: Sequence[TraceRequest], engine: EngineModelConfig, instances: int, dp_size: int) -> Capacity:
    """The load ``trace`` (at its own arrival times) puts on ``instances`` x ``dp_size`` DP ranks of ``engine``,
    and the capacity.

    In engine time: for an engine whose clock runs at ``speed`` times real time, rescale the arrivals by
    ``rate_scale / speed`` first.

    Raises:
        ValueError: ``instances`` or ``dp_size`` below 1, or a trace without a rate (see :func:`span_s`).
    """
    if instances < 1 or dp_size < 1:
        raise ValueError(f"instances and dp_size must be >= 1, got {instances}, {dp_size}")
    ranks = instances * dp_size
    span = span_s(trace)
    needed = needed_engine_time(trace, engine, dp_size)
    load = needed.total_s / (ranks * span)
    return Capacity(
        load=load,
        ranks=ranks,
        needed=needed,
        request_rps=len(trace) / span,
        capacity_rps=len(trace) / span / load,
        capacity_prompt_tok_s=sum(r.prompt_tokens for r in trace) / span / load,
        capacity_output_tok_s=sum(r.output_tokens for r in trace) / span / load,
    )


def peak_load(
    trace: Sequence[TraceRequest], engine: EngineModelConfig, instances: int, dp_size: int, window_s: float = 60.0
) -> float:
    """The load of the busiest ``window_s`` of ``trace`` (requests grouped by arrival into consecutive windows from
    the first arrival; the needed time of each window's requests over ``ranks x window_s``), fraction.

    A diagnostic of burstiness beside :func:`cluster_load`'s average: queues absorb a burst shorter than the time
    they take to drain, so a peak above 1.0 means a backlog for a while, not necessarily an overload.
    """
    start = trace[0].arrival_s
    groups: dict[int, list[TraceRequest]] = {}
    for r in trace:
        groups.setdefault(int((r.arrival_s - start) // window_s), []).append(r)
    ranks = instances * dp_size
    return max(needed_engine_time(g, engine, dp_size).total_s for g in groups.values()) / (ranks * window_s)
