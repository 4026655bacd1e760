"""Placement per phase for P/D disaggregated models: a prefill rank and a decode rank for each request.

The prefill leg goes where the scheduler's policy puts prompts, restricted to the prefill ranks (``sbs``: the
window and its allocator; an immediate baseline: its choice), unless ``pd.prefill_policy`` names a baseline of
its own for that leg, as the SGLang Model Gateway's ``--prefill-policy`` does. ``follow_bootstrap_room`` is
SGLang's own rule when no rank is pinned: the prefill engine serves the request on rank ``bootstrap_room %
dp_size`` (SGLang 0.5.23 ``managers/data_parallel_controller.py``, the P/D prefill default ``auto`` →
``follow_bootstrap_room``), and a random 63-bit room makes that rank uniform; :class:`FollowBootstrapRoom` draws
it so, and the relay then sends no rank pin (:mod:`gateway.pd.sglang_bootstrap`).

The decode leg's rank is chosen once the prefill rank is known (``pd.decode_policy``): ``sbs`` is the decode
allocation of :mod:`gateway.scheduling.decode` (running requests and KV tokens, IQR outliers, lexicographic;
:class:`DecodeAllocation`) over the decode ranks serving the model, or any immediate baseline over them, as the
SGLang Model Gateway's ``--decode-policy``. A decode rank's running requests count those waiting for their KV to
be reserved or receiving it: the load view counts every decode leg in flight as running on its rank from dispatch
(:meth:`gateway.load.view.LoadView.on_dispatch_decode`), so each choice sees the previous ones, and the engines'
pre-allocation and transfer queues join the rank's running requests when they are scraped (once: a leg the engine
reports is no longer added by the view).

Pure: snapshots in, ranks out.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gateway.scheduling.baselines import make_immediate_policy
from gateway.scheduling.baselines.base import ImmediatePolicy, StepPlacement, serving
from gateway.scheduling.decode import DecodeRanker
from gateway.types import PendingRequest, RankKey, RankLoad

if TYPE_CHECKING:
    from gateway.config import DecodeConfig


class FollowBootstrapRoom:
    """SGLang's prefill rank without a pin: uniform over the usable prefill ranks serving the model (the rank a
    random bootstrap room lands on), drawn from a seeded generator.

    Args:
        seed: the generator's seed (``baselines.seed``).
    """

    name = "follow_bootstrap_room"

    def __init__(self, seed: int = 0) -> None:
        self._rng = random.Random(seed)

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        candidates = serving(request, ranks)
        return self._rng.choice(candidates).key if candidates else None


class DecodeAllocation:
    """The decode allocation (``pd.decode_policy: sbs``): the best rank by
    :meth:`~gateway.scheduling.decode.DecodeRanker.key` (non-outliers first, then requests in buckets, then KV
    tokens) among the usable decode ranks serving the model; ties go to the first in configuration order. With
    the ``decode`` section ``None``: fewest requests, then fewest KV tokens. Requests are the rank's running and
    waiting ones, the pre-allocation and transfer queues included (:attr:`RankLoad.running`); KV tokens include
    those reserved for requests in transfer where the engine reports them (:attr:`RankLoad.kv_tokens`).

    Args:
        settings: the ``decode`` section.
    """

    name = "sbs"

    def __init__(self, settings: DecodeConfig | None) -> None:
        self.settings = settings

    def choose(self, request: PendingRequest, ranks: Sequence[RankLoad]) -> RankKey | None:
        candidates = serving(request, ranks)
        if not candidates:
            return None
        if self.settings is None:
            return min(candidates, key=lambda r: (r.running + r.waiting, r.kv_tokens)).key
        ranker = DecodeRanker(candidates, iqr_k=self.settings.iqr_k, bucket=self.settings.running_bucket)
        return min(candidates, key=lambda r: ranker.key(r.key)).key


def prefill_leg_policy(name: str | None, seed: int, steps: StepPlacement | None = None) -> ImmediatePolicy | None:
    """The prefill leg's own policy (``pd.prefill_policy``), or ``None`` when the scheduler's policy places it;
    ``steps`` is the scheduler's step placement (``phase_aware`` needs it).

    Raises:
        ValueError: an unknown name, or ``phase_aware`` without ``steps``.
    """
    if name is None:
        return None
    if name == FollowBootstrapRoom.name:
        return FollowBootstrapRoom(seed)
    return make_immediate_policy(name, seed=seed, steps=steps)


def decode_leg_policy(
    name: str, decode: DecodeConfig | None, seed: int, steps: StepPlacement | None = None
) -> ImmediatePolicy:
    """The decode leg's policy: ``sbs`` (:class:`DecodeAllocation`) or an immediate baseline by name; ``steps`` as
    for :func:`prefill_leg_policy`.

    Raises:
        ValueError: an unknown name, or ``phase_aware`` without ``steps``.
    """
    if name == DecodeAllocation.name:
        return DecodeAllocation(decode)
    return make_immediate_policy(name, seed=seed, steps=steps)


def choose_avoiding(
    policy: ImmediatePolicy, request: PendingRequest, ranks: Sequence[RankLoad], failed: set[RankKey]
) -> RankKey | None:
    """``policy``'s choice among ``ranks`` outside ``failed``, preferring engines with no failed rank; any rank
    outside ``failed`` when only failed engines are left; any rank when every one failed already (a request still
    within ``upstream.max_attempts`` tries again rather than failing while a transient fault may have passed);
    ``None`` when none serves."""
    candidates = [r for r in ranks if r.key not in failed]
    failed_engines = {k.engine for k in failed}
    elsewhere = [r for r in candidates if r.key.engine not in failed_engines]
    return policy.choose(request, elsewhere) or policy.choose(request, candidates) or policy.choose(request, ranks)
