"""The window allocators place exactly as the straightforward scan did (``reference_allocation.py``), on seeded
random windows: instance shapes, budgets, models, loads (whole and fractional token figures), KV watermarks,
forced requests, prefix hits, long-prefill isolation and every settings switch, on both paths (the compiled loop,
``gateway.scheduling.kernel``, and the numpy or Python one it falls back to); so do the immediate policies whose
scans were restructured (the rotating minimum, ``prefix_hash``'s ring)."""

from __future__ import annotations

import math
import random

import pytest

from gateway.scheduling import kernel
from gateway.scheduling.allocation import placement_order, water_fill
from gateway.scheduling.baselines.policies import ShortestQueue
from gateway.scheduling.baselines.prefix_hash import PrefixHash
from gateway.scheduling.decode import DecodeRanker
from gateway.scheduling.phase import phase_fill
from gateway.scheduling.prefix_index import PrefixIndex
from gateway.scheduling.step_clock import StepClock
from gateway.types import PendingRequest, RankKey, RankLoad
from tests.unit.reference_allocation import (
    ReferenceRanker,
    reference_phase_fill,
    reference_prefix_hash_target,
    reference_rotating_pick,
    reference_water_fill,
)

NOW = 50.0


def _figure(rng: random.Random, high: float, fractional: bool) -> float:
    value = rng.uniform(0, high)
    return value if fractional else float(round(value))


def random_window(seed: int) -> tuple[list[RankLoad], list[PendingRequest], StepClock, dict[RankKey, float]]:
    """Ranks, a batch, a step clock and the current step's tokens, all drawn from ``seed``."""
    rng = random.Random(seed)
    fractional = rng.random() < 0.3
    ranks: list[RankLoad] = []
    current: dict[RankKey, float] = {}
    clock = StepClock(0.05)
    idle = rng.random() < 0.2
    for e in range(rng.randint(1, 5)):
        engine = f"e{e}"
        budget = rng.choice([512, 2048, 8192])
        models = rng.choice([frozenset({"m"}), frozenset({"m"}), frozenset({"m", "x"}), frozenset({"x"})])
        for i in range(rng.randint(1, 14)):
            b = budget if rng.random() < 0.9 else rng.choice([1024, 4096])
            queued = 0.0 if idle or rng.random() < 0.2 else _figure(rng, 3.5 * b, fractional)
            key = RankKey(engine, i)
            current[key] = min(queued, b) * rng.choice([0.0, 0.5, 1.0]) if not fractional else rng.uniform(0, b)
            ranks.append(
                RankLoad(
                    key=key,
                    models=models if rng.random() < 0.95 else frozenset({"m"}),
                    prefill_budget=b,
                    running=0.0 if idle else float(rng.randint(0, 40)),
                    waiting=0.0 if idle else float(rng.randint(0, 6)),
                    queued_prefill_tokens=queued,
                    kv_tokens=0.0 if idle else _figure(rng, 200_000, fractional),
                    kv_usage=rng.choice([None, rng.uniform(0, 1), 0.97]),
                    usable=rng.random() < 0.92,
                )
            )
        if rng.random() < 0.7:
            t = NOW - 1.0
            for _ in range(rng.randint(2, 6)):
                clock.observe_tokens(
                    engine,
                    t,
                    [(r.key, int(r.queued_prefill_tokens), r.prefill_budget) for r in ranks if r.key.engine == engine],
                    decodes_next=True,
                )
                t += rng.uniform(0.02, 0.3)
    rng.shuffle(ranks) if rng.random() < 0.1 else None
    pool = [tuple(rng.getrandbits(40) for _ in range(rng.randint(1, 6))) for _ in range(5)]
    batch = []
    for i in range(rng.randint(1, 40)):
        tokens = rng.choice([rng.randint(1, 3000), rng.randint(1, 20_000), rng.randint(60_000, 90_000)])
        blocks = rng.choice(pool)[: rng.randint(1, 6)] if rng.random() < 0.5 else ()
        request = PendingRequest(
            f"r{i}",
            rng.choice(["m", "m", "m", "x", "y"]),
            tokens,
            64,
            NOW - rng.choice([0.0, 0.01, 0.5, 20.0]),
            prefix_blocks=blocks,
        )
        request.deferrals = rng.choice([0, 0, 0, 1, 2])
        batch.append(request)
    return ranks, batch, clock, current


def _prefix(rng: random.Random, ranks: list[RankLoad], batch: list[PendingRequest]) -> PrefixIndex:
    index = PrefixIndex(600_000)
    for request in batch:
        if request.prefix_blocks and rng.random() < 0.5:
            index.insert(rng.choice(ranks).key, request.prefix_blocks[: rng.randint(1, len(request.prefix_blocks))])
    return index


def _rankers(rng: random.Random, ranks: list[RankLoad]) -> tuple[DecodeRanker | None, ReferenceRanker | None]:
    if rng.random() < 0.25:
        return None, None
    k = rng.choice([1.5, 1.5, 0.0, None])
    bucket = rng.choice([1, 4])
    return DecodeRanker(ranks, iqr_k=k, bucket=bucket), ReferenceRanker(ranks, iqr_k=k, bucket=bucket)


def outcome(allocation) -> tuple[list[tuple[str, RankKey]], list[str], list[str]]:
    return (
        [(r.request_id, k) for r, k in allocation.assigned],
        [r.request_id for r in allocation.deferred],
        [r.request_id for r in allocation.unplaceable],
    )


def test_the_compiled_loops_are_available():
    assert kernel.load() is not None  # numba is a dependency: the path the allocators take by default


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("seed", range(300))
def test_phase_fill_places_as_the_scan(seed, compiled):
    ranks, batch, clock, current = random_window(seed)
    rng = random.Random(seed + 10_000)
    fast, reference = _rankers(rng, ranks)
    prefix = _prefix(rng, ranks, batch) if rng.random() < 0.6 else None
    settings = {
        "now": NOW,
        "max_wait_s": 10.0,
        "queue_steps": rng.choice([2.0, 1.0, math.inf]),
        "min_queue_tokens": rng.choice([0.0, 16_384.0]),
        "decode_stall_weight": rng.choice([0.005, 0.0, 0.5]),
        "use_step_phase": rng.random() < 0.8,
        "shortest_first": rng.random() < 0.2,
        "long_prefill_tokens": rng.choice([None, 65_536, 5_000]),
        "prefix": prefix,
    }
    expected = reference_phase_fill(batch, ranks, clock, current, decode=reference, **settings)
    placed = phase_fill(batch, ranks, clock, current, decode=fast, compiled=compiled, **settings)
    assert outcome(placed) == outcome(expected)


def large_window(seed: int) -> tuple[list[RankLoad], list[PendingRequest], StepClock, dict[RankKey, float]]:
    """A window at cluster scale, as the benchmark's: two or three instances of 40 to 130 ranks of one budget each,
    whole token figures from none to three budgets queued, a fitted step clock, and a batch of 150 requests, some
    longer than a budget, some continuing a shared prefix (``phase_kernel``'s cost regions and instance bounds)."""
    rng = random.Random(seed)
    ranks: list[RankLoad] = []
    current: dict[RankKey, float] = {}
    clock = StepClock(0.05)
    for e in range(rng.randint(2, 3)):
        engine = f"e{e}"
        budget = rng.choice([2048, 8192])
        for i in range(rng.randint(40, 130)):
            queued = float(round(rng.uniform(0, 3 * budget))) if rng.random() < 0.9 else 0.0
            key = RankKey(engine, i)
            current[key] = float(min(queued, budget) * rng.choice([0.0, 0.5, 1.0]) // 1)
            ranks.append(
                RankLoad(
                    key=key,
                    models=frozenset({"m"}),
                    prefill_budget=budget,
                    running=float(rng.randint(0, 40)),
                    waiting=float(rng.randint(0, 6)),
                    queued_prefill_tokens=queued,
                    kv_tokens=float(rng.randint(0, 200_000)),
                    kv_usage=rng.choice([None, rng.uniform(0, 0.9), 0.97]),
                    usable=rng.random() < 0.97,
                )
            )
        t = NOW - 1.0
        for _ in range(rng.randint(3, 8)):
            clock.observe_tokens(
                engine,
                t,
                [(r.key, int(r.queued_prefill_tokens * rng.random()), r.prefill_budget) for r in ranks[-5:]],
                decodes_next=True,
            )
            t += rng.uniform(0.02, 0.3)
    pool = [tuple(rng.getrandbits(40) for _ in range(rng.randint(1, 6))) for _ in range(8)]
    batch = []
    for i in range(150):
        tokens = rng.choice([rng.randint(1, 3000), rng.randint(1, 12_000), rng.randint(20_000, 40_000)])
        blocks = rng.choice(pool)[: rng.randint(1, 6)] if rng.random() < 0.4 else ()
        request = PendingRequest(f"r{i}", "m", tokens, 64, NOW - rng.choice([0.0, 0.01, 20.0]), prefix_blocks=blocks)
        request.deferrals = rng.choice([0, 0, 0, 1])
        batch.append(request)
    return ranks, batch, clock, current


@pytest.mark.parametrize("seed", range(12))
def test_phase_fill_places_a_large_window_as_the_scan(seed):
    ranks, batch, clock, current = large_window(seed)
    rng = random.Random(seed + 30_000)
    fast, reference = _rankers(rng, ranks)
    prefix = _prefix(rng, ranks, batch) if rng.random() < 0.7 else None
    settings = {
        "now": NOW,
        "max_wait_s": 10.0,
        "queue_steps": rng.choice([2.0, 3.0, math.inf]),
        "decode_stall_weight": rng.choice([0.005, 0.5]),
        "use_step_phase": rng.random() < 0.8,
        "shortest_first": rng.random() < 0.2,
        "long_prefill_tokens": rng.choice([None, None, 20_000]),
        "prefix": prefix,
    }
    expected = reference_phase_fill(batch, ranks, clock, current, decode=reference, **settings)
    assert outcome(phase_fill(batch, ranks, clock, current, decode=fast, **settings)) == outcome(expected)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
@pytest.mark.parametrize("seed", range(300))
def test_water_fill_places_as_the_scan(seed, compiled):
    ranks, batch, _, _ = random_window(seed)
    rng = random.Random(seed + 20_000)
    fast, reference = _rankers(rng, ranks)
    settings = {
        "now": NOW,
        "max_wait_s": 10.0,
        "queue_steps": rng.choice([2.0, 1.0, math.inf]),
        "min_queue_tokens": rng.choice([0.0, 16_384.0]),
        "shortest_first": rng.random() < 0.2,
    }
    expected = reference_water_fill(batch, ranks, decode=reference, **settings)
    assert outcome(water_fill(batch, ranks, decode=fast, compiled=compiled, **settings)) == outcome(expected)


@pytest.mark.parametrize("seed", range(100))
def test_decode_ranker_keys_follow_the_scan(seed):
    ranks, batch, _, _ = random_window(seed)
    rng = random.Random(seed)
    k = rng.choice([1.5, 0.0, None])
    fast, reference = DecodeRanker(ranks, iqr_k=k), ReferenceRanker(ranks, iqr_k=k)
    for request in batch:
        key = rng.choice(ranks).key
        fast.place(key, request.prompt_tokens)
        reference.place(key, request.prompt_tokens)
        assert [fast.key(r.key) for r in ranks] == [reference.key(r.key) for r in ranks]
        assert fast.outliers(key.engine) == reference.outliers(key.engine)


@pytest.mark.parametrize("seed", range(50))
def test_rotating_policies_pick_as_the_rotated_scan(seed):
    rng = random.Random(seed)
    ranks = [
        RankLoad(
            RankKey("e", i), frozenset({"m"}), 8192, running=float(rng.randint(0, 3)), waiting=float(rng.randint(0, 2))
        )
        for i in range(rng.randint(1, 12))
    ]
    policy = ShortestQueue()
    start = 0
    for _ in range(20):
        expected, start = reference_rotating_pick(start, ranks, lambda r: r.queue_length)
        assert policy.choose(PendingRequest("r", "m", 10, 1, 0.0), ranks) == expected
        assert policy._next == start


@pytest.mark.parametrize("seed", range(20))
def test_prefix_hash_targets_the_ring_of_the_candidates(seed):
    rng = random.Random(seed)
    ranks = [RankLoad(RankKey(f"e{i % 3}", i), frozenset({"m"}), 8192) for i in range(rng.randint(1, 10))]
    policy = PrefixHash()
    for _ in range(10):
        candidates = [r for r in ranks if rng.random() < 0.8] or ranks[:1]
        head = rng.getrandbits(60)
        request = PendingRequest("r", "m", 10, 1, 0.0, prefix_blocks=(head,))
        assert policy.choose(request, candidates) == reference_prefix_hash_target(candidates, head)


@pytest.mark.parametrize("seed", range(50))
def test_the_compiled_paths_order_a_batch_as_placement_order(seed):
    _, batch, _, _ = random_window(seed)
    for shortest_first in (False, True):
        order, tokens, arrival = kernel.placement_arrays(batch, shortest_first)
        assert [q.request_id for q in order] == [q.request_id for q in placement_order(batch, shortest_first)]
        assert tokens.tolist() == [q.prompt_tokens for q in order]
        assert arrival.tolist() == [q.arrival_s for q in order]


@pytest.mark.parametrize("seed", range(20))
def test_phase_fill_takes_block_ids_beyond_unsigned_64_bits(seed):
    """Block ids numpy cannot hold as unsigned 64-bit integers (negative, or wider) take the dictionary path."""
    ranks, batch, clock, current = random_window(seed)
    for request in batch:
        request.prefix_blocks = tuple(-b if b % 2 else b + 2**70 for b in request.prefix_blocks)
    rng = random.Random(seed)
    prefix = _prefix(rng, ranks, batch)
    settings = {"now": NOW, "max_wait_s": 10.0, "queue_steps": 2.0, "prefix": prefix}
    expected = reference_phase_fill(batch, ranks, clock, current, **settings)
    assert outcome(phase_fill(batch, ranks, clock, current, **settings)) == outcome(expected)
