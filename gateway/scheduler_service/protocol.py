"""What a front door and the scheduler service say to each other: JSON shapes, and the progress buffer that turns a
stream's per-chunk events into a few events per batch (pure: no I/O, time passed in).

Times never cross the wire as clock readings: an event carries its *age*, the seconds between it and the moment
its batch was sent, and the service dates it by its own clock (its receipt time minus the age). Front doors and
the service therefore need no common clock (they may run on different machines); the one-way transport delay,
a fraction of a millisecond on a loopback or a data-centre network, is the only error.

Event shapes (JSON arrays, the first element names the kind, the second is the age in seconds):

- ``["f", age, request_id, engine]``: the request's first output token arrived from ``engine``;
- ``["t", age, engine, {request_id: n, ...}]``: ``n`` more output tokens of each request arrived from ``engine``;
- ``["e", age, request_id]``: the request ended (completed, failed, aborted);
- ``["c", age, request_id]``: the client went away while its placement was being asked for;
- ``["p", age, request, rank, decode_rank]``: the front door placed ``request`` itself (a retry after a failed
  try), on ``rank`` (``[engine, index]``) and ``decode_rank`` (or ``null``);
- ``["h", age, rank, scope]``: a request on ``rank`` failed (``scope`` ``"rank"`` or ``"engine"``, what the
  failure blames: :meth:`HealthBook.record_failure <gateway.load.health.HealthBook.record_failure>`) or, with
  ``scope`` ``null``, got its answer started; the service's circuit breakers take it as the front door's did.
"""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from gateway.dispatch import Dispatcher, Placement
from gateway.types import PendingRequest, RankKey

Event = list[Any]
"""One event as sent: see the module docstring."""


def encode_request(request: PendingRequest, now: float) -> dict[str, Any]:
    """``request`` as JSON, its arrival as an age at ``now`` (seconds); its tenant and class only when set
    (``tenants`` configured), so the service's window orders it as the front door's would."""
    body = {
        "id": request.request_id,
        "model": request.model,
        "prompt_tokens": request.prompt_tokens,
        "max_output_tokens": request.max_output_tokens,
        "age_s": max(0.0, now - request.arrival_s),
        "stream": request.stream,
        "prefix_blocks": request.prefix_blocks,
    }
    if request.tenant:
        body["tenant"] = request.tenant
    if request.priority:
        body["priority"] = request.priority
    return body


def decode_request(body: dict[str, Any], now: float) -> PendingRequest:
    """The request :func:`encode_request` sent, dated by the receiver's clock at ``now``.

    Raises:
        KeyError, TypeError, ValueError: ``body`` is not such a request.
    """
    return PendingRequest(
        request_id=str(body["id"]),
        model=str(body["model"]),
        prompt_tokens=int(body["prompt_tokens"]),
        max_output_tokens=int(body["max_output_tokens"]),
        arrival_s=now - float(body["age_s"]),
        stream=bool(body["stream"]),
        prefix_blocks=tuple(int(b) for b in body["prefix_blocks"]),
        tenant=str(body.get("tenant", "")),
        priority=int(body.get("priority", 0)),
    )


def encode_rank(key: RankKey | None) -> list[Any] | None:
    """``[engine, rank]``, or ``None``."""
    return None if key is None else [key.engine, key.rank]


def decode_rank(value: Any) -> RankKey | None:
    """The rank :func:`encode_rank` sent.

    Raises:
        TypeError, ValueError: ``value`` is not such a rank.
    """
    if value is None:
        return None
    engine, rank = value
    return RankKey(str(engine), int(rank))


def encode_placement(placement: Placement, epoch: str) -> dict[str, Any]:
    """The service's answer to a placement: the placement and the service's epoch (its start's random id)."""
    return {
        "rank": encode_rank(placement.rank),
        "window_id": placement.window_id,
        "decode_rank": encode_rank(placement.decode_rank),
        "epoch": epoch,
    }


def decode_placement(body: dict[str, Any]) -> tuple[Placement, str]:
    """The placement and the epoch :func:`encode_placement` sent.

    Raises:
        KeyError, TypeError, ValueError: ``body`` is not such an answer.
    """
    rank = decode_rank(body["rank"])
    if rank is None:
        raise ValueError("a placement without a rank")
    window_id = body["window_id"]
    return Placement(rank, None if window_id is None else int(window_id), decode_rank(body["decode_rank"])), str(
        body["epoch"]
    )


@dataclass(slots=True)
class _EngineTokens:
    """A front door's token events of one engine not yet sent: the chunk times it must send to keep the service's
    step clock right, and the counts it may sum.

    Attributes:
        last_sent: the time of the last chunk of this engine whose time went out (in an event), or ``None``.
        held_at: the time of the newest chunk whose count is held (``None`` when none is).
        held: request id → tokens held.
    """

    last_sent: float | None = None
    held_at: float | None = None
    held: dict[str, int] = field(default_factory=dict)


class ProgressBuffer:
    """The events a front door owes the service, coalesced so that a stream's chunks do not each become an event,
    while the service's scheduler ends in the same state as if it had seen every chunk.

    Why that holds: :meth:`Scheduler.on_tokens <gateway.scheduling.scheduler.Scheduler.on_tokens>` does two things
    with a chunk. It adds the tokens to the request's KV in the load view (a sum: the count may be merged), and it
    feeds the step clock, which observes only a chunk that begins a new burst of its engine (one arriving at least
    ``boundary_gap_s`` after that engine's previous chunk, :meth:`StepClock.continues_burst
    <gateway.scheduling.step_clock.StepClock.continues_burst>`); a chunk inside a burst only moves the burst's
    last-chunk time. So each engine's chunks are sent as events whose times keep every gap the service sees
    inside a burst below ``boundary_gap_s``: a chunk that begins a burst goes out with its own time; a chunk inside
    one is held (its count summed per request) as long as it is within ``boundary_gap_s`` of the engine's last sent
    time, and the held counts go out, dated by the newest held chunk, when the next chunk would be further than
    that (or when the batch is taken). First tokens, finishes, cancellations and placements go out one each, in
    order.

    Args:
        boundary_gap_s: the step clock's burst gap (:attr:`StepClock.boundary_gap_s
            <gateway.scheduling.step_clock.StepClock.boundary_gap_s>`), seconds.
    """

    def __init__(self, boundary_gap_s: float) -> None:
        self.boundary_gap_s = boundary_gap_s
        self._events: list[tuple[float, Event]] = []
        self._engines: dict[str, _EngineTokens] = {}
        self._successes: set[RankKey] = set()
        self.urgent = False
        """Whether the buffer holds an event that frees capacity or ends a request (send it without waiting)."""

    def __len__(self) -> int:
        return len(self._events) + sum(1 for e in self._engines.values() if e.held)

    def first_token(self, request_id: str, engine: str, now: float) -> None:
        """The first token of ``request_id`` arrived from ``engine`` at ``now``."""
        tokens = self._engine(engine)
        self._release_held(engine, tokens)
        self._events.append((now, ["f", 0.0, request_id, engine]))
        tokens.last_sent = now
        self.urgent = True

    def tokens(self, request_id: str, engine: str, n: int, now: float) -> None:
        """``n`` more tokens of ``request_id`` arrived from ``engine`` at ``now``."""
        tokens = self._engine(engine)
        gap = self.boundary_gap_s
        if tokens.last_sent is not None and now - tokens.last_sent >= gap and tokens.held_at is not None:
            self._release_held(engine, tokens)  # keeps the burst chained at the service
        if tokens.last_sent is None or now - tokens.last_sent >= gap:
            self._events.append((now, ["t", 0.0, engine, {request_id: n}]))  # a new burst: its own time
            tokens.last_sent = now
            return
        tokens.held[request_id] = tokens.held.get(request_id, 0) + n
        tokens.held_at = now

    def finish(self, request_id: str, now: float) -> None:
        """``request_id`` ended at ``now`` (its held tokens go out before)."""
        for engine, tokens in self._engines.items():
            if request_id in tokens.held:
                self._release_held(engine, tokens)
        self._events.append((now, ["e", 0.0, request_id]))
        self.urgent = True

    def cancel(self, request_id: str, now: float) -> None:
        """The client of ``request_id`` went away at ``now`` while its placement was being asked for."""
        self._events.append((now, ["c", 0.0, request_id]))
        self.urgent = True

    def placed(self, request: PendingRequest, placement: Placement, now: float) -> None:
        """The front door placed ``request`` itself at ``now`` (a retry)."""
        body = encode_request(request, now)
        self._events.append((now, ["p", 0.0, body, encode_rank(placement.rank), encode_rank(placement.decode_rank)]))
        self.urgent = True

    def outcome(self, key: RankKey, scope: str | None, now: float) -> None:
        """A request on ``key`` failed at ``now`` (``scope`` blamed) or, with ``scope`` ``None``, got its answer
        started. A failure is urgent (the service must stop placing there); successes on a rank are sent once a
        batch (a breaker only needs to know that one came after the last failure)."""
        if scope is None:
            if key in self._successes:
                return
            self._successes.add(key)
        else:
            self._successes.discard(key)
            self.urgent = True
        self._events.append((now, ["h", 0.0, encode_rank(key), scope]))

    def take(self, now: float) -> list[Event]:
        """Every event owed, in order, dated as ages at ``now``; the buffer is empty afterwards."""
        for engine, tokens in self._engines.items():
            self._release_held(engine, tokens)
        events = sorted(self._events, key=lambda e: e[0])  # stable: same-time events keep their order
        self._events = []
        self._successes.clear()
        self.urgent = False
        for when, event in events:
            event[1] = max(0.0, now - when)
        return [event for _, event in events]

    def clear(self) -> None:
        """Drop every event owed (the service they were for is gone)."""
        self._events.clear()
        self._engines.clear()
        self._successes.clear()
        self.urgent = False

    def _engine(self, engine: str) -> _EngineTokens:
        tokens = self._engines.get(engine)
        if tokens is None:
            tokens = self._engines[engine] = _EngineTokens()
        return tokens

    def _release_held(self, engine: str, tokens: _EngineTokens) -> None:
        if tokens.held_at is None:
            return
        self._events.append((tokens.held_at, ["t", 0.0, engine, tokens.held]))
        tokens.last_sent = tokens.held_at
        tokens.held = {}
        tokens.held_at = None


def event_times(events: list[Event], received: float, last_s: float) -> list[float]:
    """When each of a batch's ``events`` happened on the receiver's clock: ``received`` minus its age, never before
    ``last_s`` (the last event applied, from any front door) nor after ``received``, so the scheduler's time only
    moves forward."""
    out = []
    for event in events:
        last_s = min(received, max(last_s, received - float(event[1])))
        out.append(last_s)
    return out


def apply_progress(dispatcher: Dispatcher, event: Event, when: float, engines: Container[str]) -> None:
    """Apply one progress event (``f``, ``t``, ``e`` or ``p``) to ``dispatcher`` at ``when``; tokens from an engine
    not in ``engines`` are ignored.

    Raises:
        ValueError: the event's kind is not one of those.
        KeyError, TypeError, IndexError: a malformed event.
    """
    kind = event[0]
    if kind == "t":
        if event[2] in engines:
            for request_id, n in event[3].items():
                dispatcher.tokens(str(request_id), event[2], int(n), when)
    elif kind == "f":
        if event[3] in engines:
            dispatcher.first_token(str(event[2]), event[3], when)
    elif kind == "e":
        dispatcher.finish(str(event[2]), when)
    elif kind == "p":
        rank = decode_rank(event[3])
        if rank is None:
            raise ValueError("a placement event without a rank")
        dispatcher.adopt(decode_request(event[2], when), Placement(rank, None, decode_rank(event[4])), when)
    else:
        raise ValueError(f"unknown event kind {kind!r}")
