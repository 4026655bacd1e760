"""Priority classes and the virtual token counter inside the window: table tests of the rules, then the scheduler
placing a saturated window class by class."""

from __future__ import annotations

from gateway.config import TenantConfig, TenantsConfig, WaterFillConfig, WindowConfig
from gateway.scheduling.fairness import ClassOrder, VirtualTokenCounter
from gateway.scheduling.scheduler import Scheduler
from gateway.types import PendingRequest
from tests.helpers import MODEL, make_view

WINDOW = WindowConfig(
    min_interval_s=0.01,
    max_interval_s=0.1,
    step_fraction=0.5,
    initial_step_s=0.1,
    close_when_idle=False,
    hold_min_arrivals=None,
)


def ask(request_id: str, tenant: str, tokens: int, arrival_s: float = 0.0, priority: int = 0) -> PendingRequest:
    return PendingRequest(request_id, MODEL, tokens, 16, arrival_s, tenant=tenant, priority=priority)


def test_a_tenant_that_becomes_active_is_lifted_to_the_least_active_counter() -> None:
    vtc = VirtualTokenCounter()
    vtc.counters = {"a": 1000.0, "b": 300.0}
    vtc.arrive("b")  # nobody waits and nobody left yet: b keeps its counter
    assert vtc.counter("b") == 300.0
    vtc.arrive("c")  # new, b waits: lifted to min over waiting tenants (b's 300)
    assert vtc.counter("c") == 300.0
    vtc.arrive("a")  # a's own counter is higher: kept
    assert vtc.counter("a") == 1000.0
    vtc.leave("b")
    vtc.leave("c")
    vtc.leave("a")  # the queue is empty; a left last
    vtc.arrive("d")  # nobody waits: lifted to the counter of the tenant that left last
    assert vtc.counter("d") == 1000.0


def test_the_counter_charges_prompt_and_output_tokens_over_the_weight() -> None:
    vtc = VirtualTokenCounter(prompt_weight=1.0, output_weight=2.0, weights={"gold": 2.0})
    vtc.arrive("gold")
    vtc.placed(ask("g", "gold", 100))
    vtc.on_tokens("g", 10)
    assert vtc.counter("gold") == (100 + 2 * 10) / 2
    vtc.on_finish("g")
    vtc.on_tokens("g", 10)  # after the finish nothing is charged
    assert vtc.counter("gold") == 60.0


def test_the_fair_order_takes_the_least_served_tenant_earliest_request_first() -> None:
    vtc = VirtualTokenCounter()
    vtc.counters = {"flood": 500.0, "light": 0.0}
    batch = [ask(f"f{i}", "flood", 200, arrival_s=i * 0.001) for i in range(4)] + [
        ask("l0", "light", 400, arrival_s=0.01),
        ask("l1", "light", 400, arrival_s=0.02),
    ]
    order = [q.request_id for q in vtc.order(batch)]
    # light 0 -> l0 (light 400), light 400 < flood 500 -> l1 (light 800), then flood's in arrival order
    assert order == ["l0", "l1", "f0", "f1", "f2", "f3"]
    assert vtc.counters == {"flood": 500.0, "light": 0.0}  # ordering charges nothing


def test_admission_stops_at_the_free_capacity_and_the_lowest_class_is_never_forced() -> None:
    classes = ClassOrder(3, None, max_wait_s=10.0)
    tier = [ask(f"r{i}", "t", 1000, arrival_s=float(i)) for i in range(5)]
    admitted, held = classes.admit(0, tier, {MODEL: 2500.0}, now=5.0)
    assert [q.request_id for q in admitted] == ["r0", "r1", "r2"]  # admitted while below 2,500 tokens
    assert [q.request_id for q in held] == ["r3", "r4"]
    old = [ask("old", "t", 1000, arrival_s=0.0), ask("new", "t", 1000, arrival_s=19.0)]
    admitted, held = classes.admit(1, old, {MODEL: 0.0}, now=20.0)
    assert [q.request_id for q in admitted] == ["old"] and [q.request_id for q in held] == ["new"]
    admitted, held = classes.admit(2, old, {MODEL: 0.0}, now=20.0)
    assert admitted == [] and len(held) == 2


def config(*names: tuple[str, str]) -> TenantsConfig:
    return TenantsConfig(tenants=[TenantConfig(name=n, priority=p) for n, p in names])


def scheduler(tenants: TenantsConfig | None) -> Scheduler:
    # one engine, 2 ranks of 1,000 prompt tokens a step: room for 4,000 queued prompt tokens (2 steps each)
    view = make_view("e", dp_size=2, budget=1000)
    allocator = WaterFillConfig(min_queue_tokens=0)
    return Scheduler("sbs", view, window=WINDOW, allocator=allocator, decode=None, tenants=tenants)


def test_a_saturated_window_places_the_interactive_class_and_defers_the_batch_class() -> None:
    batch = [ask(f"b{i}", "etl", 1000, arrival_s=0.001 * i, priority=2) for i in range(6)]
    chat = [ask(f"c{i}", "chat", 500, arrival_s=0.01 + 0.001 * i, priority=0) for i in range(2)]
    placed = {}
    for tenants in (None, config(("chat", "interactive"), ("etl", "batch"))):
        s = scheduler(tenants)
        for q in batch + chat:
            s.submit(PendingRequest(**{f: getattr(q, f) for f in q.__dataclass_fields__}), q.arrival_s)
        outcome = s.poll(0.1)
        assert outcome is not None
        placed[tenants is not None] = sorted(q.request_id for q, _ in outcome.assigned)
    # without classes the batch requests that came first fill the ranks and both chat requests wait
    assert placed[False] == ["b0", "b1", "b2", "b3"]
    # with them the chat requests go first (one a rank), and the batch class takes what still fits
    assert placed[True] == ["b0", "b1", "c0", "c1"]


def test_within_a_class_a_light_tenant_is_not_starved_by_a_flood() -> None:
    s = scheduler(config(("flood", "standard"), ("light", "standard")))
    flood = [ask(f"f{i}", "flood", 500, arrival_s=0.001 * i, priority=1) for i in range(40)]
    light = [ask(f"l{i}", "light", 500, arrival_s=0.05 + 0.001 * i, priority=1) for i in range(4)]
    for q in flood + light:
        s.submit(q, q.arrival_s)
    outcome = s.poll(0.1)
    assert outcome is not None
    tenants = [q.tenant for q, _ in outcome.assigned]
    # 8 requests of 500 tokens fit; the counter alternates between the two tenants, the light one first
    # (both counters start at 0, its lift to the flood's; ties go to the earlier request, the flood's)
    assert tenants.count("light") == 4 and tenants.count("flood") == 4
    assert outcome.deferred == 36
    assert s.fairness is not None and s.fairness.counter("light") == s.fairness.counter("flood") == 2000.0
    # output tokens are charged as they come back
    s.on_first_token(outcome.assigned[0][0].request_id, "e", 0.2)
    assert s.fairness.counter(outcome.assigned[0][0].tenant) == 2002.0


def test_the_scheduler_service_protocol_carries_tenant_and_class_only_when_set() -> None:
    from gateway.scheduler_service.protocol import decode_request, encode_request

    plain = PendingRequest("r", MODEL, 10, 4, 1.0)
    assert "tenant" not in encode_request(plain, 2.0) and "priority" not in encode_request(plain, 2.0)
    assert decode_request(encode_request(plain, 2.0), 2.0) == plain
    tagged = ask("t", "etl", 10, arrival_s=1.0, priority=2)
    assert decode_request(encode_request(tagged, 2.0), 2.0) == tagged
