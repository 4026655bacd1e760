"""A discrete-step model of one DP+EP engine instance: ``dp_size`` DP ranks running steps in lockstep.

Pure and synchronous: no I/O, no asyncio, no clock. :meth:`EngineModel.step` plans and commits one forward
step of the whole instance and returns how long it took (engine seconds) and which output tokens it
produced; whoever drives the model (the HTTP mock engine in real time, a simulator in virtual time) owns
the clock. Deterministic: the same calls give the same results.

Per DP rank (docs/design.md §1 and §5; constants and formulas in :mod:`gateway.sim.calibration`):

- a FCFS *waiting* queue of requests not yet fully prefilled and a *running* set of decoding requests;
- each step the rank decodes one token for every running request and prefills waiting requests in FCFS
  order up to ``max_prefill_tokens_per_step`` new tokens (chunked prefill: a long prompt is split over
  several steps);
- a waiting request is *admitted* (may start prefill) only when its prompt plus its output tokens fit the
  rank's unreserved KV capacity and the rank holds fewer than ``max_running_requests``; otherwise it and
  everything behind it waits (head-of-line blocking). Reserving the full output up front means a rank never
  runs out of KV mid-decode, so the model never preempts;
- the step that completes a request's prefill emits its first output token; each later step emits one;
  a request that has produced its ``output_tokens`` finishes and frees its KV.

Instance step time = ``alltoall_s + max over ranks(prefill work + decode work)``: a rank with nothing to
do runs a dummy step and waits for the slowest. With no work on any rank there is no step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.sim.calibration import EngineModelConfig


@dataclass(frozen=True)
class TokenEvent:
    """One output token produced by a step.

    Attributes:
        request_id: the request it belongs to.
        rank: the DP rank that produced it.
        index: 0-based index of the token among the request's output tokens (0 = first token).
        finished: True when this is the request's last token (the request has left the model).
    """

    request_id: str
    rank: int
    index: int
    finished: bool


@dataclass(frozen=True)
class StepResult:
    """What one lockstep step did.

    Attributes:
        duration_s: engine time of the step, seconds (0.0 when there was no work and so no step).
        tokens: the output tokens produced at the end of the step, rank by rank.
        prefill_tokens_per_rank: new prompt tokens prefilled by each rank, length ``dp_size``.
        decode_reqs_per_rank: requests decoded by each rank, length ``dp_size``.
        work_s_per_rank: each rank's own work, seconds, excluding all-to-all, length ``dp_size``; the
            gap to the maximum is that rank's idle (bubble) time.
    """

    duration_s: float
    tokens: list[TokenEvent]
    prefill_tokens_per_rank: list[int]
    decode_reqs_per_rank: list[int]
    work_s_per_rank: list[float]


@dataclass(frozen=True)
class RankStats:
    """A snapshot of one DP rank between steps.

    Attributes:
        rank: the DP rank.
        running: requests decoding (prefill complete).
        waiting: requests not yet fully prefilled (queued or part-way through a chunked prefill).
        waiting_prompt_tokens: prompt tokens still to prefill over the waiting requests, tokens.
        kv_used_tokens: tokens held in the rank's KV cache (prefilled prompt + generated), tokens.
        kv_capacity_tokens: the rank's KV capacity, tokens.
        kv_usage: ``kv_used_tokens / kv_capacity_tokens``, fraction 0–1.
    """

    rank: int
    running: int
    waiting: int
    waiting_prompt_tokens: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    kv_usage: float


@dataclass(eq=False)
class _Request:
    request_id: str
    rank: int
    prompt_tokens: int
    output_tokens: int
    prefilled: int = 0
    generated: int = 0
    admitted: bool = False

    @property
    def kv_tokens(self) -> int:
        return self.prefilled + self.generated

    @property
    def kv_reservation(self) -> int:
        return self.prompt_tokens + self.output_tokens


@dataclass(eq=False)
class _Rank:
    waiting: dict[str, _Request] = field(default_factory=dict)  # insertion order = FCFS
    running: dict[str, _Request] = field(default_factory=dict)
    kv_used: int = 0
    kv_reserved: int = 0
    admitted: int = 0  # running + admitted waiting


class EngineModel:
    """One engine instance of ``dp_size`` DP ranks (see the module docstring for the rules).

    Args:
        config: per-rank timing and capacity.
        dp_size: number of DP ranks (>= 1).

    Raises:
        ValueError: if ``dp_size < 1``.
    """

    def __init__(self, config: EngineModelConfig, dp_size: int) -> None:
        if dp_size < 1:
            raise ValueError(f"dp_size must be >= 1, got {dp_size}")
        self.config = config
        self.dp_size = dp_size
        self._ranks = [_Rank() for _ in range(dp_size)]
        self._requests: dict[str, _Request] = {}
        self._next_round_robin = 0

    def add_request(self, request_id: str, rank: int, prompt_tokens: int, output_tokens: int) -> None:
        """Queue a request on a DP rank; it joins at the next step.

        Args:
            request_id: unique among the requests in the model.
            rank: DP rank, ``0 <= rank < dp_size``.
            prompt_tokens: prompt length, tokens (>= 1).
            output_tokens: exact number of output tokens to generate (>= 1).

        Raises:
            ValueError: bad rank, duplicate id, non-positive lengths, or a request whose prompt plus
                output exceeds one rank's KV capacity (it could never be admitted).
        """
        if not 0 <= rank < self.dp_size:
            raise ValueError(f"rank must be in [0, {self.dp_size}), got {rank}")
        if request_id in self._requests:
            raise ValueError(f"duplicate request id {request_id!r}")
        if prompt_tokens < 1 or output_tokens < 1:
            raise ValueError(f"prompt_tokens and output_tokens must be >= 1, got {prompt_tokens}, {output_tokens}")
        if prompt_tokens + output_tokens > self.config.kv_capacity_tokens:
            raise ValueError(
                f"prompt_tokens + output_tokens = {prompt_tokens + output_tokens} exceeds the KV capacity "
                f"of a rank ({self.config.kv_capacity_tokens} tokens)"
            )
        req = _Request(request_id, rank, prompt_tokens, output_tokens)
        self._requests[request_id] = req
        self._ranks[rank].waiting[request_id] = req

    def abort(self, request_id: str) -> bool:
        """Remove a request wherever it is and free its KV. Returns True if it was in the model."""
        req = self._requests.get(request_id)
        if req is None:
            return False
        rank = self._ranks[req.rank]
        rank.waiting.pop(request_id, None)
        rank.running.pop(request_id, None)
        self._release(rank, req)
        return True

    def has_work(self) -> bool:
        """True if any rank has a waiting or running request (so :meth:`step` would run a step)."""
        return any(r.waiting or r.running for r in self._ranks)

    def step(self) -> StepResult:
        """Plan and commit one lockstep step of all ranks; returns its duration and output tokens.

        With no work anywhere, returns a zero-duration result with no tokens (no step happened).
        """
        n = self.dp_size
        if not self.has_work():
            return StepResult(0.0, [], [0] * n, [0] * n, [0.0] * n)
        tokens: list[TokenEvent] = []
        prefill_tokens = [0] * n
        decode_reqs = [0] * n
        work = [0.0] * n
        for index, rank in enumerate(self._ranks):
            decoding = list(rank.running.values())
            if decoding:
                kv = sum(r.kv_tokens for r in decoding)
                work[index] += self.config.decode_s(len(decoding), kv)
            completed: list[_Request] = []
            work[index] += self._prefill(rank, completed, prefill_tokens, index)
            decode_reqs[index] = len(decoding)
            for req in decoding:
                tokens.append(self._emit(rank, req))
            for req in completed:
                del rank.waiting[req.request_id]
                rank.running[req.request_id] = req
                tokens.append(self._emit(rank, req))
        duration = self.config.alltoall_s + max(work)
        return StepResult(duration, tokens, prefill_tokens, decode_reqs, work)

    def rank_stats(self) -> list[RankStats]:
        """Per-rank snapshot, index = DP rank."""
        cap = self.config.kv_capacity_tokens
        return [
            RankStats(
                rank=i,
                running=len(r.running),
                waiting=len(r.waiting),
                waiting_prompt_tokens=sum(q.prompt_tokens - q.prefilled for q in r.waiting.values()),
                kv_used_tokens=r.kv_used,
                kv_capacity_tokens=cap,
                kv_usage=r.kv_used / cap,
            )
            for i, r in enumerate(self._ranks)
        ]

    def pick_rank_vllm(self) -> int:
        """vLLM's internal DP load balancing: the rank with the least ``waiting * 4 + running``, lowest
        rank on ties (vLLM V1 ``DPLBAsyncMPClient.get_core_engine_for_request``, vllm/v1/engine/
        core_client.py)."""
        scores = [len(r.waiting) * 4 + len(r.running) for r in self._ranks]
        return scores.index(min(scores))

    def pick_rank_round_robin(self) -> int:
        """SGLang's default DP dispatch (``--load-balance-method round_robin``): ranks 0, 1, ... in turn."""
        rank = self._next_round_robin
        self._next_round_robin = (rank + 1) % self.dp_size
        return rank

    def _prefill(self, rank: _Rank, completed: list[_Request], prefill_tokens: list[int], index: int) -> float:
        """Prefill FCFS up to the token budget; appends requests whose prefill completes. Returns seconds."""
        cfg = self.config
        budget = cfg.max_prefill_tokens_per_step
        work = 0.0
        for req in list(rank.waiting.values()):
            if budget == 0:
                break
            if not req.admitted:
                fits_kv = rank.kv_reserved + req.kv_reservation <= cfg.kv_capacity_tokens
                if not fits_kv or rank.admitted >= cfg.max_running_requests:
                    break  # head-of-line blocking
                req.admitted = True
                rank.admitted += 1
                rank.kv_reserved += req.kv_reservation
            chunk = min(req.prompt_tokens - req.prefilled, budget)
            work += cfg.prefill_chunk_s(chunk, req.prefilled)
            req.prefilled += chunk
            rank.kv_used += chunk
            budget -= chunk
            prefill_tokens[index] += chunk
            if req.prefilled == req.prompt_tokens:
                completed.append(req)
        return work

    def _emit(self, rank: _Rank, req: _Request) -> TokenEvent:
        event = TokenEvent(req.request_id, req.rank, req.generated, req.generated + 1 == req.output_tokens)
        req.generated += 1
        rank.kv_used += 1
        if event.finished:
            del rank.running[req.request_id]
            self._release(rank, req)
        return event

    def _release(self, rank: _Rank, req: _Request) -> None:
        del self._requests[req.request_id]
        rank.kv_used -= req.kv_tokens
        if req.admitted:
            rank.admitted -= 1
            rank.kv_reserved -= req.kv_reservation
