"""K front doors in the virtual-time simulator: the arrival split, what each front door's view holds under each
sharing mode, the scheduler service's hops, and the plain simulation as the one-front-door case."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
from click.testing import CliRunner

from gateway.cli import main
from gateway.config import DecodeConfig, PhaseAwareConfig, WindowConfig
from gateway.load.view import EngineSpec, LoadView
from gateway.scheduling.scheduler import Scheduler
from gateway.sim.frontdoors import FrontDoorConfig, FrontDoors
from gateway.sim.information import InformationLimits
from gateway.sim.pd_driver import PdPools
from gateway.sim.simulate import SimConfig, simulate
from gateway.types import RankMetrics
from gateway.workload.traces import TraceRequest
from tests.helpers import req

MODEL = "m"


def synthetic_trace(n: int = 300, rate: float = 30.0, seed: int = 1) -> list[TraceRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append(TraceRequest(t, rng.randint(50, 6000), rng.randint(1, 300)))
    return out


LIMITED = SimConfig(instances=2, dp_size=4, limits=InformationLimits(nonstream_share=0.3, dispatch_latency_s=0.002))
"""Two instances of 4 ranks, 30% of requests not streamed and 2 ms to the engines (so every path of the
simulator's progress runs)."""


def records(trace: list[TraceRequest], config: SimConfig) -> list[tuple[float | None, ...]]:
    return [(r.sent_s, r.first_token_s, r.done_s) for r in simulate(trace, config).records]


@pytest.mark.parametrize("policy", ["sbs", "least_tokens", "random"])
@pytest.mark.parametrize(
    "doors",
    [
        FrontDoorConfig(1, "independent"),
        FrontDoorConfig(1, "shared-view", latency_s=0.02),
        FrontDoorConfig(1, "service", latency_s=0.0),
        FrontDoorConfig(8, "service", latency_s=0.0),
    ],
    ids=lambda d: d.describe(),
)
def test_one_view_without_delay_is_the_plain_simulation(policy, doors):
    # one front door in any mode, or any number consulting a scheduler service at no latency: one scheduler sees
    # every request and event when the plain simulation's does, so every time is the same
    trace = synthetic_trace()
    config = replace(LIMITED, policy=policy)
    assert records(trace, replace(config, front_doors=doors)) == records(trace, config)


@pytest.mark.parametrize("policy", ["sbs", "least_tokens"])
def test_the_scheduler_service_costs_two_hops_per_placement_whatever_the_count(policy):
    trace = synthetic_trace(n=200, rate=5.0)
    latency = 0.004
    config = SimConfig(policy=policy, instances=2, dp_size=4)
    one = records(trace, replace(config, front_doors=FrontDoorConfig(1, "service", latency)))
    assert records(trace, replace(config, front_doors=FrontDoorConfig(8, "service", latency))) == one
    waits = [sent - r.arrival_s for (sent, _, done), r in zip(one, trace, strict=True) if sent is not None and done]
    assert len(waits) == len(trace) and min(waits) >= 2 * latency - 1e-9
    if policy == "least_tokens":  # placed on arrival at the service, sent when the answer is back
        assert max(waits) == pytest.approx(2 * latency)


def door_set(config: FrontDoorConfig, policy: str = "least_tokens", scrape_interval_s: float = 0.5) -> FrontDoors:
    """Front doors over one engine of 2 ranks that always scrape as idle."""
    specs = [EngineSpec("e0", 2, frozenset({MODEL}), 8192)]

    def make(door: int) -> Scheduler:
        view = LoadView(specs, stale_after_s=3.0)
        return Scheduler(
            policy, view, window=WindowConfig(), allocator=PhaseAwareConfig(), decode=DecodeConfig(), seed=door
        )

    idle = {0: RankMetrics(0, 0, 0.0), 1: RankMetrics(0, 0, 0.0)}
    return FrontDoors(config, make, lambda engine: dict(idle), ["e0"], scrape_interval_s, 0.05, seed=0)


def holders(doors: FrontDoors, request_id: str) -> list[int]:
    """The front doors whose load view counts ``request_id`` in flight."""
    return [j for j, door in enumerate(doors.doors) if door.view.rank_of(request_id) is not None]


def test_independent_front_doors_see_only_their_own_dispatches():
    doors = door_set(FrontDoorConfig(3, "independent", split="round_robin"))
    for i in range(6):
        assert doors.submit(req(str(i), 1000, model=MODEL), 0.001 * i) is not None
    doors.poll(1.0)
    assert [holders(doors, str(i)) for i in range(6)] == [[0], [1], [2], [0], [1], [2]]
    # each door spread its own two requests over the two ranks, unaware of the others'
    assert [sorted(door.view.rank_of(str(i)).rank for i in range(j, 6, 3)) for j, door in enumerate(doors.doors)] == [
        [0, 1]
    ] * 3
    doors.on_finish("1", 1.0)
    assert holders(doors, "1") == [] and holders(doors, "4") == [1]


def test_a_shared_view_takes_the_other_doors_events_after_the_latency():
    # scrapes every 100 s: doors 1 and 2 read the engine first at 33 s and 67 s
    doors = door_set(FrontDoorConfig(3, "shared-view", latency_s=0.01, split="round_robin"), scrape_interval_s=100)
    doors.submit(req("a", 1000, model=MODEL), 1.0)
    assert holders(doors, "a") == [0]
    assert doors.next_deadline() == pytest.approx(1.01)
    assert doors.poll(1.0099) is None and holders(doors, "a") == [0]
    doors.poll(1.01)
    assert holders(doors, "a") == [0, 1, 2]
    # door 1 now sees rank a's rank as loaded and places its own request on the other rank
    key_a = doors.doors[0].view.rank_of("a")
    key_b = doors.submit(req("b", 1000, model=MODEL), 1.02)
    assert key_b is not None and key_b != key_a
    doors.on_first_token("a", "e0", 1.5)
    doors.on_finish("a", 1.6)
    assert holders(doors, "a") == [1, 2]
    doors.poll(1.61)
    assert holders(doors, "a") == []


def test_each_front_door_scrapes_on_its_own_phase():
    doors = door_set(FrontDoorConfig(2, "independent"))
    assert doors.next_deadline() == pytest.approx(0.25)  # door 1 reads at half the interval, door 0 with the simulator
    doors.poll(0.25)
    assert not doors.doors[1].view.scrape_fresh("e0", 0.25)
    doors.poll(0.3)
    assert doors.doors[1].view.scrape_fresh("e0", 0.3) and not doors.doors[0].view.scrape_fresh("e0", 0.3)
    assert doors.next_deadline() == pytest.approx(0.75)


@pytest.mark.parametrize("split", ["random", "round_robin"])
def test_the_load_balancer_spreads_arrivals_over_the_front_doors(split):
    config = FrontDoorConfig(4, "independent", split=split)
    first, again = door_set(config), door_set(config)
    for doors in (first, again):
        for i in range(400):
            doors.submit(req(str(i), 100, model=MODEL), 0.0)
    assert first.arrivals == again.arrivals and sum(first.arrivals) == 400
    if split == "round_robin":
        assert first.arrivals == [100] * 4
    else:
        assert min(first.arrivals) >= 70, first.arrivals


def test_independent_front_doors_herd_where_a_shared_view_does_not():
    # bursts of 16 requests within 10 ms, scrapes every 2 s: four doors that each count only their own
    # dispatches put their shares of a burst on the same ranks; a shared view at 1 ms spreads them
    rng = random.Random(5)
    trace = [
        TraceRequest(burst * 1.0 + i * 0.0006, rng.randint(500, 3000), rng.randint(20, 200))
        for burst in range(20)
        for i in range(16)
    ]
    config = SimConfig(policy="least_tokens", instances=2, dp_size=4, scrape_interval_s=2.0)
    one = simulate(trace, config).summary()["ttft_s"]["mean"]
    shared = simulate(trace, replace(config, front_doors=FrontDoorConfig(4, "shared-view", 0.0001))).summary()
    independent = simulate(trace, replace(config, front_doors=FrontDoorConfig(4, "independent"))).summary()
    assert shared["completed"] == independent["completed"] == len(trace)
    assert independent["ttft_s"]["mean"] > 1.2 * shared["ttft_s"]["mean"], (one, shared, independent)
    assert shared["ttft_s"]["mean"] < 1.1 * one


def test_front_doors_refuse_bad_settings_and_p_d_pools():
    with pytest.raises(ValueError, match="count"):
        FrontDoorConfig(0)
    with pytest.raises(ValueError, match="latency_s"):
        FrontDoorConfig(2, "service", -0.001)
    with pytest.raises(ValueError, match="sharing"):
        FrontDoorConfig(2, "gossip")  # type: ignore[arg-type]
    config = SimConfig(pd=PdPools(1, 2, 1, 2), front_doors=FrontDoorConfig(2))
    with pytest.raises(ValueError, match="mixed instances only"):
        simulate(synthetic_trace(n=10), config)


def test_cli_simulate_runs_front_doors(tmp_path):
    args = ["simulate", "--trace", "azure-code", "--duration", "60", "--policy", "sbs", "--instances", "1"]
    args += ["--dp-size", "4", "--no-progress", "--preset", "idealised"]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    plain = CliRunner().invoke(main, [*args, "--output", str(a)])
    doors = CliRunner().invoke(
        main,
        [*args, "--front-doors", "4", "--sharing", "shared-view", "--sharing-latency-ms", "5", "--output", str(b)],
    )
    assert plain.exit_code == doors.exit_code == 0, plain.output + doors.output
    assert "4 front doors, shared-view 5 ms" in doors.output
    one, four = (json.loads(path.read_text())["sbs"] for path in (a, b))
    assert one["completed"] == four["completed"] and one["ttft_s"] != four["ttft_s"]
    bad = CliRunner().invoke(main, [*args, "--sharing", "service"])
    assert bad.exit_code != 0 and "--front-doors" in bad.output
