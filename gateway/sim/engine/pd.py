"""P/D disaggregation in the engine model: a prefill rank holds the KV of finished requests for the decode side; a
decode rank reserves KV for a request, fetches its prompt's KV from the prefill rank, then decodes it.

Per rank (:class:`~gateway.sim.engine.rank.Rank`), the request's path (settings and sources in
:attr:`gateway.sim.calibration.EngineModelConfig.role`):

- prefill, ``hold_kv``: waiting → running (prefill) → finishes at its first token → *held* (KV kept, no running slot)
  → freed when the decode side has fetched it, when it is aborted, or when its lease expires;
- decode, ``remote_prefill``: *prealloc* (FCFS; the head blocks the rest until its reservation fits,
  :meth:`DecodeHandoff.fits`) → *transfer* (its prompt's KV allocated; the transfer starts once the prefill side has
  the KV and takes :meth:`EngineModelConfig.kv_transfer_s`) → running (decoding, no prefill compute).

Pure and synchronous; the driver passes the time in (engine seconds on its own clock).
"""

from __future__ import annotations

from gateway.sim.calibration import EngineModelConfig
from gateway.sim.engine.admission import Admission
from gateway.sim.engine.rank import Rank, Request, ceil_div


class DecodeHandoff:
    """A decode rank's pre-allocation queue and transfers (see the module docstring).

    Args:
        config: the engine model's settings.
        admission: the rank's admission rule (a request that starts decoding takes a running slot there).
    """

    def __init__(self, config: EngineModelConfig, admission: Admission) -> None:
        self.config = config
        self._admission = admission

    def fits(self, rank: Rank, req: Request) -> bool:
        """Whether ``req``, the head of ``rank``'s pre-allocation queue, may reserve its KV now."""
        cfg = self.config
        if rank.admitted + len(rank.transfer) >= cfg.max_running_requests:
            return False
        if cfg.pd_connector == "vllm":
            free_blocks = cfg.kv_capacity_tokens // cfg.kv_block_size - rank.kv_blocks
            return ceil_div(req.prompt_tokens, cfg.kv_block_size) <= free_blocks
        clip = cfg.new_token_ratio.clip_max_new_tokens
        reserved = cfg.num_reserved_decode_tokens
        running = list(rank.running.values())
        retractable = sum(r.prompt_tokens + r.generated for r in running)
        single = max((min(r.max_new_tokens, clip) + r.prompt_tokens for r in running), default=retractable)
        active = len(running) + len(rank.transfer) + len(rank.waiting)
        allocatable = cfg.kv_capacity_tokens - rank.kv_used - max(reserved * active, single - retractable)
        required = max(req.prompt_tokens + reserved, req.prompt_tokens + min(req.max_new_tokens, clip) - retractable)
        return required <= allocatable

    def admit(self, rank: Rank, now_s: float) -> None:
        """Reserve KV for the heads of the pre-allocation queue, FCFS, while they fit; each allocates its prompt's KV
        and starts its transfer if the prefill side already has the KV."""
        while rank.prealloc:
            req = next(iter(rank.prealloc.values()))
            if not self.fits(rank, req):
                return
            del rank.prealloc[req.request_id]
            req.kv = req.prompt_tokens
            rank.kv_used += req.kv
            rank.kv_blocks += ceil_div(req.kv, self.config.kv_block_size)
            rank.transfer[req.request_id] = req
            if req.kv_ready:
                self.start(req, now_s)

    def start(self, req: Request, now_s: float) -> None:
        """Start ``req``'s transfer at ``now_s`` (it has its reservation and the prefill side has the KV)."""
        if req.transfer_end_s is None:
            req.transfer_end_s = now_s + self.config.kv_transfer_s(req.prompt_tokens)

    def arrived(self, rank: Rank, now_s: float) -> list[Request]:
        """Move the requests whose transfer has completed by ``now_s`` to running, earliest first; returns them."""
        done = sorted(
            (r for r in rank.transfer.values() if r.transfer_end_s is not None and r.transfer_end_s <= now_s),
            key=lambda r: r.transfer_end_s or 0.0,
        )
        for req in done:
            del rank.transfer[req.request_id]
            req.prefilled = req.prompt_tokens
            self._admission.adopt(rank, req)
            rank.running[req.request_id] = req
        return done


def next_event_s(ranks: list[Rank]) -> float | None:
    """The earliest transfer end or held-KV lease expiry over ``ranks``, engine seconds, or None."""
    times = [r.transfer_end_s for rank in ranks for r in rank.transfer.values() if r.transfer_end_s is not None]
    times += [r.held_until_s for rank in ranks for r in rank.held.values() if r.held_until_s is not None]
    return min(times, default=None)
