"""Decode-aware rank choice: two objectives, outlier ranks found by the interquartile range, lexicographic choice.

Our reading of SBS's decode allocation ("dual-objective, IQR-informed decode allocation with lexicographic
selection", Tian et al., arXiv 2512.16134; ``docs/design.md`` §2.6). A decode step of a DP+EP instance lasts as long as
its heaviest rank, and a rank's decode work grows with its running requests and with their KV tokens
(:meth:`gateway.sim.calibration.EngineModelConfig.decode_s`). So a rank is judged on two objectives:

1. *requests*: the requests it holds, running or queued for prefill (those queued will be decoding by the
   time a request placed now decodes);
2. *KV tokens*: the KV tokens of those requests (local accounting: prompts plus generated tokens).

**Outliers** (Tukey's fences, J. W. Tukey, *Exploratory Data Analysis*, 1977): over a group of ranks, a rank
whose value on either objective lies above ``Q3 + k * IQR`` (``IQR = Q3 - Q1``, quartiles by linear
interpolation, :func:`statistics.quantiles` with ``method="inclusive"``; the IQR floored at one bucket, see
:func:`iqr_outliers`) is an outlier and is ranked after every other rank: another request there would
lengthen every step of the group. With fewer than :data:`MIN_RANKS_FOR_QUARTILES` ranks
quartiles say nothing and no rank is an outlier.

**Lexicographic choice** among the rest (and then among the outliers): fewest requests first, counted in
buckets of ``bucket`` requests so that a difference of one or two requests (noise next to a decode batch of
tens) does not override the second objective; then fewest KV tokens.

Pure functions over :class:`~gateway.types.RankLoad` snapshots; the allocators call them
(:func:`gateway.scheduling.allocation.water_fill`, :func:`gateway.scheduling.phase.phase_fill`).
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from gateway.types import RankKey, RankLoad

if TYPE_CHECKING:
    from gateway.config import DecodeConfig

IQR_K = 1.5
"""Default fence multiplier ``k``: Tukey's "outside" fence (Exploratory Data Analysis, 1977)."""

RUNNING_BUCKET = 4
"""Default bucket width of the requests objective, requests. On the calibrated engine model four requests'
fixed decode cost (4 x ``decode_req_s`` = 0.48 ms a step) equals the attention cost of about 17k KV tokens
(x ``decode_kv_s`` = 2.86e-8 s), a few long contexts: within such a band the KV objective decides
(``bench/results/decisions.md#running-bucket``)."""

MIN_RANKS_FOR_QUARTILES = 4
"""Fewer ranks than this have no meaningful quartiles: no rank is called an outlier."""


@dataclass(frozen=True, slots=True)
class DecodeLoad:
    """The two decode objectives of one rank: ``requests`` (running plus queued) and ``kv_tokens`` (tokens)."""

    requests: float
    kv_tokens: float

    @classmethod
    def of(cls, load: RankLoad) -> DecodeLoad:
        """The objectives of a rank snapshot."""
        return cls(load.running + load.waiting, load.kv_tokens)

    def plus(self, prompt_tokens: float) -> DecodeLoad:
        """The objectives after one more request of ``prompt_tokens`` tokens lands on the rank."""
        return DecodeLoad(self.requests + 1, self.kv_tokens + prompt_tokens)


def upper_fence(values: Sequence[float], k: float, min_spread: float = 0.0) -> float:
    """``Q3 + k * max(Q3 - Q1, min_spread)`` of ``values``; ``inf`` with fewer than
    :data:`MIN_RANKS_FOR_QUARTILES` values.

    Raises:
        ValueError: ``k`` or ``min_spread`` is negative.
    """
    if k < 0 or min_spread < 0:
        raise ValueError(f"k and min_spread must be >= 0, got {k}, {min_spread}")
    if len(values) < MIN_RANKS_FOR_QUARTILES:
        return math.inf
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q3 + k * max(q3 - q1, min_spread)


def iqr_outliers(loads: Mapping[RankKey, DecodeLoad], k: float = IQR_K, bucket: int = 1) -> frozenset[RankKey]:
    """Ranks above the upper fence on either objective (see the module docstring).

    The spread is floored at one bucket of requests (``bucket``) and, for KV, at that many requests of the
    group's mean KV tokens per request: with no spread at all (every rank holding the same number of
    requests, common right after a balanced batch) Tukey's fence would call a rank one request above its
    peers an outlier, and differences within a bucket are what the lexicographic key already calls noise.

    Args:
        loads: the decode objectives of one group of ranks (the ranks of one instance: they step together).
        k: fence multiplier (>= 0).
        bucket: bucket width of the requests objective (>= 1).

    Returns:
        The outlier ranks; empty when fewer than :data:`MIN_RANKS_FOR_QUARTILES` ranks are given.

    Raises:
        ValueError: ``k`` is negative.
    """
    values = list(loads.values())
    total_requests = sum(v.requests for v in values)
    kv_per_request = sum(v.kv_tokens for v in values) / total_requests if total_requests else 0.0
    requests_fence = upper_fence([v.requests for v in values], k, bucket)
    kv_fence = upper_fence([v.kv_tokens for v in values], k, bucket * kv_per_request)
    return frozenset(key for key, v in loads.items() if v.requests > requests_fence or v.kv_tokens > kv_fence)


def lexicographic_key(load: DecodeLoad, bucket: int = RUNNING_BUCKET) -> tuple[int, float]:
    """Sort key: requests in buckets of ``bucket`` (>= 1), then KV tokens; the smaller, the better."""
    return (int(load.requests // bucket), load.kv_tokens)


def _quartiles(ordered: Sequence[float]) -> tuple[float, float]:
    """``(Q1, Q3)`` of already sorted values, as :func:`statistics.quantiles` computes them with ``n=4`` and
    ``method="inclusive"`` (the same operations, so the same floats); at least two values."""
    m = len(ordered) - 1
    j, delta = divmod(m, 4)
    q1 = (ordered[j] * (4 - delta) + ordered[j + 1] * delta) / 4
    j, delta = divmod(3 * m, 4)
    q3 = (ordered[j] * (4 - delta) + ordered[j + 1] * delta) / 4
    return q1, q3


class _Group:
    """One instance's decode objectives, kept sorted for its quartiles (updates O(log n) search plus an O(n)
    memmove; the fences O(1) once the sums are known)."""

    __slots__ = ("exact_sums", "fences", "keys", "kv_sorted", "kv_sum", "magnitude", "requests_sorted", "requests_sum")

    def __init__(self, keys: list[RankKey], requests: list[float], kv_tokens: list[float]) -> None:
        self.keys = keys
        self.requests_sorted = sorted(requests)
        self.kv_sorted = sorted(kv_tokens)
        self.requests_sum = sum(requests)
        self.kv_sum = sum(kv_tokens)
        # Whole numbers whose magnitudes add up to less than 2**53 add exactly in any order, so running sums
        # equal the left-to-right sums; otherwise the sums are recomputed in group order.
        self.magnitude = sum(map(abs, requests)) + sum(map(abs, kv_tokens))
        self.exact_sums = self.magnitude < 2**53 and all(float(v).is_integer() for v in requests + kv_tokens)
        self.fences: tuple[float, float] | None = None


class DecodeRanker:
    """Decode-aware preference over ranks, kept up to date while a batch is being placed.

    Each instance's objectives are kept sorted, so the fences (:func:`iqr_outliers`) follow a placement in
    O(log n) comparisons plus an O(n) memmove, and :meth:`is_outlier` costs two comparisons; the outliers and
    keys are those :func:`iqr_outliers` and :func:`lexicographic_key` give on the current loads.

    Args:
        ranks: a snapshot of the ranks.
        iqr_k: fence multiplier, or ``None`` to call no rank an outlier (the IQR step switched off).
        bucket: bucket width of the requests objective (>= 1).

    Raises:
        ValueError: ``bucket < 1`` or a negative ``iqr_k``.
    """

    def __init__(self, ranks: Sequence[RankLoad], *, iqr_k: float | None = IQR_K, bucket: int = RUNNING_BUCKET):
        if bucket < 1:
            raise ValueError(f"bucket must be >= 1, got {bucket}")
        if iqr_k is not None and iqr_k < 0:
            raise ValueError(f"iqr_k must be >= 0, got {iqr_k}")
        self.iqr_k = iqr_k
        self.bucket = bucket
        self.ranks = ranks
        """The snapshot the ranker was built on."""
        self._loads: dict[RankKey, DecodeLoad] | None = None
        self._group_map: dict[str, _Group] = {}

    @property
    def built(self) -> bool:
        """Whether the per-rank loads and groups exist yet (they are built on first use: the compiled placement
        loops read the snapshot directly, :func:`ranker_arrays`)."""
        return self._loads is not None

    @property
    def loads(self) -> dict[RankKey, DecodeLoad]:
        """Each rank's objectives, with what was placed on it so far."""
        if self._loads is None:
            self._build()
            assert self._loads is not None
        return self._loads

    @property
    def _groups(self) -> dict[str, _Group]:
        if self._loads is None:
            self._build()
        return self._group_map

    def _build(self) -> None:
        self._loads = loads = {}
        members: dict[str, tuple[list[RankKey], list[float], list[float]]] = {}
        for r in self.ranks:
            load = loads[r.key] = DecodeLoad.of(r)
            keys, requests, kv_tokens = members.setdefault(r.key.engine, ([], [], []))
            keys.append(r.key)
            requests.append(load.requests)
            kv_tokens.append(load.kv_tokens)
        self._group_map = {engine: _Group(*group) for engine, group in members.items()}

    def fences(self, engine: str) -> tuple[float, float]:
        """``(requests fence, KV tokens fence)`` of ``engine``'s group (:func:`iqr_outliers`): a rank above either
        is an outlier; ``(inf, inf)`` with the outlier test off or fewer than :data:`MIN_RANKS_FOR_QUARTILES`
        ranks."""
        group = self._groups.get(engine)
        if group is None or self.iqr_k is None or len(group.keys) < MIN_RANKS_FOR_QUARTILES:
            return (math.inf, math.inf)
        if group.fences is None:
            if group.exact_sums:
                total_requests, total_kv = group.requests_sum, group.kv_sum
            else:
                values = [self.loads[k] for k in group.keys]
                total_requests = sum(v.requests for v in values)
                total_kv = sum(v.kv_tokens for v in values)
            kv_per_request = total_kv / total_requests if total_requests else 0.0
            k = self.iqr_k
            q1, q3 = _quartiles(group.requests_sorted)
            requests_fence = q3 + k * max(q3 - q1, self.bucket)
            q1, q3 = _quartiles(group.kv_sorted)
            group.fences = (requests_fence, q3 + k * max(q3 - q1, self.bucket * kv_per_request))
        return group.fences

    def outliers(self, engine: str) -> frozenset[RankKey]:
        """Outlier ranks of ``engine``'s group (see :func:`iqr_outliers`)."""
        group = self._groups.get(engine)
        if group is None:
            return frozenset()
        requests_fence, kv_fence = self.fences(engine)
        loads = self.loads
        return frozenset(k for k in group.keys if loads[k].requests > requests_fence or loads[k].kv_tokens > kv_fence)

    def is_outlier(self, rank: RankKey) -> bool:
        """Whether ``rank`` is an outlier of its group (see :meth:`outliers`)."""
        requests_fence, kv_fence = self.fences(rank.engine)
        load = self.loads[rank]
        return load.requests > requests_fence or load.kv_tokens > kv_fence

    def key(self, rank: RankKey) -> tuple[int, int, float]:
        """Preference key of ``rank`` with what was placed on it so far: non-outliers first, then the
        lexicographic key (smaller is better)."""
        load = self.loads[rank]
        return (int(self.is_outlier(rank)), int(load.requests // self.bucket), load.kv_tokens)

    def place(self, rank: RankKey, prompt_tokens: float) -> None:
        """Record a request of ``prompt_tokens`` tokens placed on ``rank``."""
        old = self.loads[rank]
        new = self.loads[rank] = old.plus(prompt_tokens)
        group = self._groups[rank.engine]
        _replace(group.requests_sorted, old.requests, new.requests)
        _replace(group.kv_sorted, old.kv_tokens, new.kv_tokens)
        group.requests_sum += 1
        group.kv_sum += prompt_tokens
        group.magnitude += 1 + abs(prompt_tokens)
        group.exact_sums = group.exact_sums and group.magnitude < 2**53 and float(prompt_tokens).is_integer()
        group.fences = None


@dataclass(frozen=True, slots=True)
class RankerArrays:
    """A :class:`DecodeRanker`'s state as flat arrays, for the compiled placement loops
    (:mod:`gateway.scheduling.kernel`): per given rank, and per instance (its group: every rank of the engine the
    ranker was built on, usable or not) the objectives in group order and sorted, the sums and whether they are
    exact (``g_sums``: requests, KV tokens, magnitude), and whether its fences are computed at all."""

    requests: np.ndarray
    kv: np.ndarray
    g_pos: np.ndarray
    """Each given rank's position in the group arrays, ``-1`` when its engine has no group."""
    g_start: np.ndarray
    g_requests: np.ndarray
    g_kv: np.ndarray
    g_requests_sorted: np.ndarray
    g_kv_sorted: np.ndarray
    g_exact: np.ndarray
    g_sums: np.ndarray
    g_on: np.ndarray
    bucket: float
    iqr_k: float


def ranker_arrays(ranker: DecodeRanker, engines: Sequence[str], ranks: Sequence[RankLoad]) -> RankerArrays:
    """``ranker``'s state over the instances ``engines`` (in that order) and the ranks ``ranks`` (each of one of
    them), as :class:`RankerArrays`; read straight from its snapshot while nothing was placed through it."""
    if not ranker.built:
        return _snapshot_arrays(ranker, engines, ranks)
    loads = ranker.loads
    requests: list[float] = []
    kv: list[float] = []
    sorted_requests: list[float] = []
    sorted_kv: list[float] = []
    starts = [0]
    exact: list[bool] = []
    sums: list[tuple[float, float, float]] = []
    on: list[bool] = []
    position: dict[RankKey, int] = {}
    for engine in engines:
        group = ranker._groups.get(engine)
        if group is None:
            exact.append(True)
            sums.append((0.0, 0.0, 0.0))
            on.append(False)
        else:
            for key in group.keys:
                position[key] = len(requests)
                requests.append(loads[key].requests)
                kv.append(loads[key].kv_tokens)
            sorted_requests += group.requests_sorted
            sorted_kv += group.kv_sorted
            exact.append(group.exact_sums)
            sums.append((group.requests_sum, group.kv_sum, group.magnitude))
            on.append(ranker.iqr_k is not None and len(group.keys) >= MIN_RANKS_FOR_QUARTILES)
        starts.append(len(requests))
    keys = [r.key for r in ranks]
    return RankerArrays(
        requests=np.array([loads[k].requests for k in keys], dtype=float),
        kv=np.array([loads[k].kv_tokens for k in keys], dtype=float),
        g_pos=np.array([position.get(k, -1) for k in keys], dtype=np.int64),
        g_start=np.array(starts, dtype=np.int64),
        g_requests=np.array(requests, dtype=float),
        g_kv=np.array(kv, dtype=float),
        g_requests_sorted=np.array(sorted_requests, dtype=float),
        g_kv_sorted=np.array(sorted_kv, dtype=float),
        g_exact=np.array(exact, dtype=np.bool_),
        g_sums=np.array(sums, dtype=float).reshape(-1, 3),
        g_on=np.array(on, dtype=np.bool_),
        bucket=float(ranker.bucket),
        iqr_k=0.0 if ranker.iqr_k is None else float(ranker.iqr_k),
    )


def _snapshot_arrays(ranker: DecodeRanker, engines: Sequence[str], ranks: Sequence[RankLoad]) -> RankerArrays:
    """:func:`ranker_arrays` of a ranker nothing was placed through: its groups' objectives, sums and exactness as
    :class:`_Group` computes them, from its snapshot; ``ranks`` found in it by identity (by key when they are
    other objects)."""
    slot = {engine: i for i, engine in enumerate(engines)}
    members: list[list[RankLoad]] = [[] for _ in engines]
    for r in ranker.ranks:
        i = slot.get(r.key.engine)
        if i is not None:
            members[i].append(r)
    requests: list[float] = []
    kv: list[float] = []
    sorted_requests: list[float] = []
    sorted_kv: list[float] = []
    starts = [0]
    exact: list[bool] = []
    sums: list[tuple[float, float, float]] = []
    on: list[bool] = []
    for group in members:
        g_requests = [r.running + r.waiting for r in group]
        g_kv = [r.kv_tokens for r in group]
        requests += g_requests
        kv += g_kv
        sorted_requests += sorted(g_requests)
        sorted_kv += sorted(g_kv)
        magnitude = sum(map(abs, g_requests)) + sum(map(abs, g_kv))
        values = np.array(g_requests + g_kv, dtype=float)
        # float(v).is_integer(): finite and equal to its floor
        exact.append(magnitude < 2**53 and bool(np.all(np.isfinite(values) & (values == np.floor(values)))))
        sums.append((sum(g_requests), sum(g_kv), magnitude))
        on.append(bool(group) and ranker.iqr_k is not None and len(group) >= MIN_RANKS_FOR_QUARTILES)
        starts.append(len(requests))
    by_identity = {id(r): p for p, r in enumerate(r for group in members for r in group)}
    positions = [by_identity.get(id(r), -1) for r in ranks]
    if -1 in positions:
        by_key = {r.key: p for p, r in enumerate(r for group in members for r in group)}
        positions = [by_key.get(r.key, -1) for r in ranks]
    g_requests_all = np.array(requests, dtype=float)
    g_kv_all = np.array(kv, dtype=float)
    g_pos = np.array(positions, dtype=np.int64)
    found = g_pos >= 0
    return RankerArrays(
        requests=np.where(found, g_requests_all[np.where(found, g_pos, 0)] if len(requests) else 0.0, 0.0),
        kv=np.where(found, g_kv_all[np.where(found, g_pos, 0)] if len(kv) else 0.0, 0.0),
        g_pos=g_pos,
        g_start=np.array(starts, dtype=np.int64),
        g_requests=g_requests_all,
        g_kv=g_kv_all,
        g_requests_sorted=np.array(sorted_requests, dtype=float),
        g_kv_sorted=np.array(sorted_kv, dtype=float),
        g_exact=np.array(exact, dtype=np.bool_),
        g_sums=np.array(sums, dtype=float).reshape(-1, 3),
        g_on=np.array(on, dtype=np.bool_),
        bucket=float(ranker.bucket),
        iqr_k=0.0 if ranker.iqr_k is None else float(ranker.iqr_k),
    )


def _replace(ordered: list[float], old: float, new: float) -> None:
    """Replace one ``old`` by ``new`` in the sorted list ``ordered``."""
    del ordered[bisect.bisect_left(ordered, old)]
    bisect.insort(ordered, new)


def decode_ranker(ranks: Sequence[RankLoad], settings: DecodeConfig | None) -> DecodeRanker | None:
    """The decode-aware choice over a snapshot with ``settings`` (``decode`` section), or ``None`` when it is off."""
    if settings is None:
        return None
    return DecodeRanker(ranks, iqr_k=settings.iqr_k, bucket=settings.running_bucket)
