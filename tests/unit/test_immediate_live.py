"""Immediate policies place from the live ranks (``choose_live``, :class:`gateway.load.live.LiveLoads`) exactly
as from a fresh snapshot (``choose``), on seeded sequences of arrivals, progress, scrapes (whole and fractional
figures, stale ones), circuit breakers opening and closing, with and without ``state_sync``; and the load view's
``unsure`` shortcut gives the snapshot that asking ``usable`` of every rank gives."""

from __future__ import annotations

import random

import pytest

from gateway.config import (
    DecodeConfig,
    HealthConfig,
    PdConfig,
    PhaseAwareConfig,
    PrefixCacheConfig,
    WindowConfig,
)
from gateway.load.health import HealthBook
from gateway.load.live import LiveLoads
from gateway.load.view import DECODE_ROLES, PREFILL_ROLES, EngineSpec, LoadView
from gateway.scheduling.baselines import IMMEDIATE_POLICIES
from gateway.scheduling.scheduler import NoServingRankError, Scheduler
from gateway.types import PendingRequest, RankKey, RankMetrics

HEALTH = HealthConfig(failure_threshold=2, open_s=0.3, max_open_s=1.0)


def random_specs(rng: random.Random) -> list[EngineSpec]:
    """One to four engines of 1-24 ranks, serving ``m``, ``x`` or both; sometimes a prefill and a decode engine
    serving ``p`` P/D."""
    models = [frozenset({"m"}), frozenset({"m", "x"}), frozenset({"x"}), frozenset({"m"})]
    specs = [
        EngineSpec(f"e{e}", rng.randint(1, 24), rng.choice(models), rng.choice([512, 2048, 8192]))
        for e in range(rng.randint(1, 4))
    ]
    if rng.random() < 0.4:
        specs.append(EngineSpec("p0", rng.randint(1, 12), frozenset({"p"}), 2048, role="prefill"))
        specs.append(EngineSpec("d0", rng.randint(1, 12), frozenset({"p"}), 2048, role="decode"))
    return specs


class World:
    """A scheduler, its load view and circuit breakers; ``live`` places through ``choose_live`` with the breakers'
    ``unsure`` shortcut, otherwise through ``choose`` on snapshots, asking ``usable`` of every rank."""

    def __init__(
        self,
        policy: str,
        specs: list[EngineSpec],
        *,
        live: bool,
        seed: int,
        state_sync: bool,
        pd: PdConfig | None = None,
    ) -> None:
        self.health = HealthBook([RankKey(s.name, r) for s in specs for r in range(s.dp_size)], HEALTH)
        self.view = LoadView(
            specs,
            stale_after_s=1.0,
            nonstream_prefill_s=0.2,
            usable=self.health.usable,
            unsure=self.health.unsure if live else None,
            state_sync=state_sync,
        )
        self.scheduler = Scheduler(
            policy,
            self.view,
            window=WindowConfig(),
            allocator=PhaseAwareConfig(),
            decode=DecodeConfig(),
            prefix_cache=PrefixCacheConfig(capacity_tokens=20_000),
            seed=seed,
            pd=pd,
        )
        mode, legs = self.scheduler._mode, self.scheduler.legs
        if live:
            assert mode.live is not None  # type: ignore[attr-defined]
        else:  # the snapshot path
            mode.live = None  # type: ignore[attr-defined]
            legs._live_prefill = legs._live_decode = None
        self.probes = {roles: LiveLoads(self.view, roles) for roles in (PREFILL_ROLES, DECODE_ROLES)}

    def submit(self, request: PendingRequest, now: float) -> RankKey | None:
        try:
            key = self.scheduler.submit(request, now)
        except NoServingRankError:
            return None
        assert key is not None
        self.health.on_dispatch(key, now)
        return key


def run(policy: str, seed: int, *, state_sync: bool = True, steps: int = 400) -> int:
    """Drive a live and a snapshot world through the same seeded events; return how many requests were placed."""
    rng = random.Random(seed)
    specs = random_specs(rng)
    pd = PdConfig(prefill_policy=rng.choice([None, "least_load", "round_robin", "random", "follow_bootstrap_room"]))
    worlds = [World(policy, specs, live=live, seed=seed, state_sync=state_sync, pd=pd) for live in (True, False)]
    models = ["m"] * 7 + ["x"] + (["p"] * 3 if specs[-1].role == "decode" else [])
    keys = [RankKey(s.name, r) for s in specs for r in range(s.dp_size)]
    fractional = rng.random() < 0.3
    inflight: list[str] = []
    now, placed = 10.0, 0
    for step in range(steps):
        now += rng.expovariate(40.0)
        action = rng.random()
        if action < 0.45:
            tokens = rng.randint(1, 9000)
            blocks: tuple[int, ...] = ()
            if rng.random() < 0.6:
                conv = rng.randrange(12)
                blocks = tuple(hash((seed, conv, i)) & (2**62 - 1) for i in range(1 + rng.randrange(5)))
            rid = f"r{step}"
            model = rng.choice(models)
            stream = rng.random() < 0.8
            got = [
                w.submit(PendingRequest(rid, model, tokens, 128, now, stream=stream, prefix_blocks=blocks), now)
                for w in worlds
            ]
            assert got[0] == got[1], f"step {step}: live {got[0]} != snapshot {got[1]}"
            if got[0] is not None:
                inflight.append(rid)
                placed += 1
        elif action < 0.6 and inflight:
            rid = rng.choice(inflight)
            engine = _engine(worlds[1], rid)
            for w in worlds:
                w.scheduler.on_first_token(rid, engine, now)
        elif action < 0.72 and inflight:
            rid, n = rng.choice(inflight), rng.randint(1, 30)
            engine = _engine(worlds[1], rid)
            for w in worlds:
                w.scheduler.on_tokens(rid, engine, n, now)
        elif action < 0.82 and inflight:
            rid = inflight.pop(rng.randrange(len(inflight)))
            for w in worlds:
                w.scheduler.on_finish(rid, now)
        elif action < 0.9:
            spec = rng.choice(specs)
            figures = {
                r: RankMetrics(
                    running=_figure(rng, 20, fractional),
                    waiting=_figure(rng, 6, fractional),
                    kv_usage=rng.choice([None, rng.random()]),
                    queued_prefill_tokens=rng.choice([None, _figure(rng, 9000, fractional)]),
                )
                for r in range(spec.dp_size)
                if rng.random() < 0.9
            }
            for w in worlds:
                w.scheduler.on_scrape(spec.name, figures, now)
        elif action < 0.97:
            key = rng.choice(keys)
            outcome = rng.choice(["rank", "engine", None, None])
            for w in worlds:
                if outcome is None:
                    w.health.record_success(key, now)
                else:
                    w.health.record_failure(key, outcome, now)  # type: ignore[arg-type]
        else:
            spec = rng.choice(specs)
            ok = rng.random() < 0.5
            for w in worlds:
                w.health.record_probe(spec.name, ok, now)
        if step % 25 == 0:
            for roles, probe in worlds[0].probes.items():
                probe.refresh(now)
                assert probe.loads == worlds[1].view.snapshot(now, roles)
            assert worlds[0].view.snapshot(now) == worlds[1].view.snapshot(now)
    return placed


def _engine(world: World, request_id: str) -> str:
    key = world.view.rank_of(request_id)
    assert key is not None
    return key.engine


def _figure(rng: random.Random, high: float, fractional: bool) -> float:
    value = rng.uniform(0, high)
    return value if fractional else float(round(value))


def test_every_built_in_immediate_policy_chooses_from_the_live_ranks() -> None:
    for name in IMMEDIATE_POLICIES:
        world = World(name, [EngineSpec("e", 2, frozenset({"m"}), 512)], live=True, seed=0, state_sync=True)
        assert world.scheduler.submit(PendingRequest("r", "m", 100, 16, 1.0), 1.0) in (RankKey("e", 0), RankKey("e", 1))


@pytest.mark.parametrize("policy", sorted(IMMEDIATE_POLICIES))
def test_live_placements_equal_snapshot_placements(policy: str) -> None:
    seeds = range(4) if policy in ("phase_aware", "prefix_hash") else range(10)
    placed = sum(run(policy, seed) for seed in seeds)
    assert placed > 50 * len(seeds)


@pytest.mark.parametrize("policy", ["least_load", "cache_aware", "prefix_hash", "round_robin", "shortest_queue"])
def test_live_placements_equal_snapshot_placements_without_state_sync(policy: str) -> None:
    for seed in range(4):
        run(policy, 100 + seed, state_sync=False)


def test_unsure_asks_only_unsure_ranks_and_gives_the_same_snapshot() -> None:
    specs = [EngineSpec("a", 3, frozenset({"m"}), 512), EngineSpec("b", 2, frozenset({"m"}), 512)]
    health = HealthBook([RankKey(s.name, r) for s in specs for r in range(s.dp_size)], HEALTH)
    asked: list[RankKey] = []

    def usable(key: RankKey, now: float) -> bool:
        asked.append(key)
        return health.usable(key, now)

    view = LoadView(specs, stale_after_s=1.0, usable=usable, unsure=health.unsure)
    plain = LoadView(specs, stale_after_s=1.0, usable=health.usable)
    assert view.snapshot(1.0) == plain.snapshot(1.0)
    assert asked == [], "every breaker closed: no rank is asked"
    for _ in range(2):
        health.record_failure(RankKey("a", 1), "rank", 1.0)
    assert view.snapshot(1.1) == plain.snapshot(1.1)
    assert [r.usable for r in view.snapshot(1.1)] == [True, False, True, True, True]
    assert set(asked) == {RankKey("a", 1)}
    asked.clear()
    health.record_probe("b", False, 1.2)  # an engine never seen healthy opens at its first failure
    assert [r.usable for r in view.snapshot(1.2)] == [True, False, True, False, False]
    assert view.snapshot(1.2) == plain.snapshot(1.2)
    assert set(asked) == {RankKey("a", 1), RankKey("b", 0), RankKey("b", 1)}
    # half-open at 1.4: the rank takes one trial request; the engine waits for a probe
    assert [r.usable for r in view.snapshot(1.45)] == [True, True, True, False, False]
    health.on_dispatch(RankKey("a", 1), 1.45)
    assert view.snapshot(1.46) == plain.snapshot(1.46)
    assert not view.snapshot(1.46)[1].usable, "the trial is in flight"
    health.record_success(RankKey("a", 1), 1.5)
    health.record_probe("b", True, 1.6)
    asked.clear()
    assert [r.usable for r in view.snapshot(1.7)] == [True] * 5
    assert view.snapshot(1.7) == plain.snapshot(1.7)
    assert set(asked) == set(), "closed again: the ranks last refused are set usable without asking"
    assert health.unsure() == set()


def test_refresh_rebuilds_and_reports_only_the_ranks_that_changed() -> None:
    view = LoadView([EngineSpec("a", 4, frozenset({"m"}), 512)], stale_after_s=1.0)
    watch = view.watch()
    live = LiveLoads(view, PREFILL_ROLES)
    dirty = live.subscribe()
    live.refresh(1.0)
    first = list(live.loads)
    assert live.layout == 1 and dirty == set()
    assert watch.keys == {RankKey("a", r) for r in range(4)}, "the first refresh builds every entry"
    watch.keys.clear()
    view.on_dispatch("r", RankKey("a", 2), 300, 1.0, stream=True)
    live.refresh(1.1)
    assert dirty == {2}, "only the rank the request went to"
    assert [a is b for a, b in zip(first, live.loads, strict=True)] == [True, True, False, True]
    assert watch.keys == {RankKey("a", 2)}
    dirty.clear()
    live.refresh(1.2)
    assert dirty == set(), "nothing changed since"
    view.on_scrape("a", {r: RankMetrics(running=1.0) for r in range(4)}, 1.3)
    live.refresh(1.3)
    assert dirty == {0, 1, 2, 3}
    dirty.clear()
    live.refresh(2.5)  # the scrape is stale now: every entry goes back to local accounting
    assert dirty == {0, 1, 2, 3}
    assert live.loads == view.snapshot(2.5, PREFILL_ROLES) and live.layout == 1


@pytest.mark.parametrize("policy", ["least_load", "round_robin", "cache_aware", "prefix_hash", "phase_aware"])
def test_live_placements_follow_engines_added_held_and_removed(policy: str) -> None:
    # the engine set at runtime (gateway.engine_set): an added engine's ranks join the live ranks, a held
    # (draining) one takes nothing new, a removed one is never chosen again; live and snapshot agree throughout
    specs = [EngineSpec("a", 3, frozenset({"m"}), 512)]
    worlds = [World(policy, specs, live=live, seed=3, state_sync=True) for live in (True, False)]
    now = 1.0

    def place(n: int) -> set[RankKey]:
        nonlocal now
        seen: set[RankKey] = set()
        for i in range(n):
            now += 0.01
            rid = f"q{now:.2f}-{i}"
            blocks = (hash((rid, "prefix")) & (2**62 - 1),)
            got = [w.submit(PendingRequest(rid, "m", 2000, 16, now, prefix_blocks=blocks), now) for w in worlds]
            assert got[0] == got[1]
            assert got[0] is not None
            seen.add(got[0])
        return seen

    assert {k.engine for k in place(6)} == {"a"}
    b = EngineSpec("b", 2, frozenset({"m"}), 512)
    for w in worlds:
        w.health.add_engine("b", 2, held=False)
        w.view.add_engine(b)
    assert "b" in {k.engine for k in place(20)}, "the added engine's ranks are chosen"
    for w in worlds:
        w.health.hold("a", True)
    assert {k.engine for k in place(10)} == {"b"}, "nothing new on the held engine"
    for w in worlds:
        w.health.hold("a", False)
        w.view.remove_engine("b")
        w.health.remove_engine("b")
        w.scheduler.forget_engine("b")
    assert {k.engine for k in place(10)} == {"a"}, "the removed engine is never chosen"
    for roles, probe in worlds[0].probes.items():
        probe.refresh(now)
        assert probe.loads == worlds[1].view.snapshot(now, roles)
