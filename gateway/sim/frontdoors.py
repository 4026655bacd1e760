"""K front doors in the virtual-time simulator: the gateway replicated behind a plain L4 load balancer, with one of
three ways of sharing what it knows.

Arrivals are split among ``count`` front doors as a plain load balancer does: a seeded random choice (kube-proxy's
iptables rules pick a backend at random per connection; here per request, as if each came on its own connection),
or round robin. What each front door knows follows the sharing mode (:data:`Sharing`):

- ``service``: one scheduler (window, load view, step clock, prefix index, scrapers) in a process of its own that
  every front door consults per request, as llm-d's endpoint picker serves Envoy. A request reaches the scheduler
  ``latency_s`` after its front door took it, and the decision reaches the front door ``latency_s`` after it was
  made; the front door then sends it to its rank. Every first token, token and finish a front door relays reaches
  the scheduler ``latency_s`` late, dated when it happened (the front door sends its age, as the live scheduler
  service's protocol does), so the step clock times steps as well as one process does and only the load view
  learns late. The scheduler scrapes the engines itself (no hop). All front doors have the same
  latency to it, so ``count`` changes nothing here: only the latency does (the service's own CPU per placement is
  not modelled; ``bench/`` times the allocator).
- ``shared-view``: a scheduler per front door, each placing its own share of the arrivals with its own window and
  scraping every engine itself (front door ``j`` at ``j / count`` of the scrape interval, phases staggered). Each
  front door publishes its dispatches (rank, prompt and prefix blocks), first tokens and finishes, and the other
  front doors apply them to their load views and prefix indexes ``latency_s`` later, as Dynamo's
  ``--router-replica-sync`` publishes active-sequence lifecycle events over NATS core (ai-dynamo/dynamo, the
  router operations guide). Tokens after the first are not published (they only grow KV), and the step clock of a
  front door learns only from the tokens it relays itself.
- ``independent``: as ``shared-view`` with nothing published: each front door sees its own dispatches and the
  engines' scrapes, the per-replica in-flight count that the SGLang Model Gateway, production-stack and AIBrix
  replicas keep.

No faults are simulated: the scheduler service and the store never fail (the live gateway's fallback is tested over
HTTP). With one front door, or a zero latency under ``service``, every mode runs exactly the plain simulation.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal, get_args

from gateway.scheduling.scheduler import Scheduler, WindowOutcome, record_dispatch
from gateway.types import PendingRequest, RankKey, RankMetrics

Sharing = Literal["service", "shared-view", "independent"]
"""How front doors share their scheduling view (module docstring)."""
Split = Literal["random", "round_robin"]
"""How the load balancer in front of the front doors spreads arrivals."""
SHARINGS: tuple[str, ...] = get_args(Sharing)
SPLITS: tuple[str, ...] = get_args(Split)


@dataclass(frozen=True)
class FrontDoorConfig:
    """The front doors of one simulated gateway.

    Attributes:
        count: front doors (>= 1).
        sharing: how they share their scheduling view (module docstring).
        latency_s: ``service``: one-way latency between a front door and the scheduler service, seconds (a
            placement costs two: the request to the service, the decision back); ``shared-view``: delay before a
            front door's event reaches the others' load views, seconds; unused by ``independent``.
        split: how arrivals are spread over the front doors.

    Raises:
        ValueError: ``count < 1``, ``latency_s < 0``, or an unknown sharing mode or split.
    """

    count: int = 1
    sharing: Sharing = "independent"
    latency_s: float = 0.0
    split: Split = "random"

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"front doors: count must be >= 1, got {self.count}")
        if self.latency_s < 0:
            raise ValueError(f"front doors: latency_s must be >= 0, got {self.latency_s}")
        if self.sharing not in SHARINGS:
            raise ValueError(f"front doors: sharing must be one of {', '.join(SHARINGS)}, got {self.sharing!r}")
        if self.split not in SPLITS:
            raise ValueError(f"front doors: split must be one of {', '.join(SPLITS)}, got {self.split!r}")

    def describe(self) -> str:
        """One line for logs and tables, e.g. ``4 front doors, shared-view 5 ms``."""
        latency = "" if self.sharing == "independent" else f" {self.latency_s * 1000:g} ms"
        return f"{self.count} front door{'s' if self.count > 1 else ''}, {self.sharing}{latency}"


class FrontDoors:
    """The gateway side of a simulation with several front doors: the simulator drives it through the same methods
    it calls on one :class:`~gateway.scheduling.scheduler.Scheduler` (``submit``, ``poll``, ``next_deadline``,
    progress and scrapes), and it routes each call to the front door or scheduler that would see it, when it would.

    Delayed messages wait in a queue of their own; :meth:`next_deadline` includes the next one, so the simulator
    calls :meth:`poll` when it is due and :meth:`poll` delivers it.

    Args:
        config: the front doors.
        make_scheduler: builds front door ``j``'s scheduler with its own load view (``j`` = 0 for the service).
        read_ranks: every rank's gauges of an engine as a scrape reads them now.
        engines: the engines' names.
        scrape_interval_s: time between two scrapes of an engine by one front door, seconds.
        scrape_lag_s: age of the scraped figures when they reach the front door, seconds.
        seed: seed of the random split.
    """

    def __init__(
        self,
        config: FrontDoorConfig,
        make_scheduler: Callable[[int], Scheduler],
        read_ranks: Callable[[str], dict[int, RankMetrics]],
        engines: Iterable[str],
        scrape_interval_s: float,
        scrape_lag_s: float,
        seed: int,
    ) -> None:
        self.config = config
        self.service = config.sharing == "service"
        self.doors = [make_scheduler(j) for j in range(1 if self.service else config.count)]
        """The schedulers: the service's alone, or one per front door."""
        self.latency_s = config.latency_s
        self._publish = config.sharing == "shared-view" and config.count > 1
        self._read = read_ranks
        self._interval = scrape_interval_s
        self._lag = scrape_lag_s
        self._rng = random.Random(seed)
        self._turn = 0
        self.arrivals = [0] * config.count
        """Requests each front door took."""
        self._owner: dict[str, int] = {}
        """The front door that placed each request in flight (its scheduler sees its progress)."""
        self._queue: list[tuple[float, int, Callable[..., object], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._out: list[tuple[PendingRequest, RankKey]] = []
        """Decisions that reached their front door during the current :meth:`poll`."""
        names = list(engines)
        for j in range(1, len(self.doors)):  # front door 0 takes the simulator's own scrapes
            for name in names:
                self._at(j * scrape_interval_s / len(self.doors), self._scrape, j, name)

    def _at(self, when: float, handler: Callable[..., object], *args: Any) -> None:
        """Deliver ``handler(*args, now)`` at ``when`` (seconds)."""
        heapq.heappush(self._queue, (when, next(self._seq), handler, args))

    def _door(self) -> int:
        """The front door the load balancer gives the next arrival."""
        count = self.config.count
        if count == 1:
            door = 0
        elif self.config.split == "random":
            door = self._rng.randrange(count)
        else:
            door, self._turn = self._turn, (self._turn + 1) % count
        self.arrivals[door] += 1
        return door

    # -- the simulator's calls -----------------------------------------------------------------------------

    def submit(self, request: PendingRequest, now: float) -> RankKey | None:
        """A request arrives at the load balancer: return its rank if its front door placed it at once, else
        ``None`` (it waits in a window, or for the scheduler service's answer)."""
        door = self._door()
        if self.service:
            if self.latency_s > 0:
                self._at(now + self.latency_s, self._service_submit, request)
                return None
            return self.doors[0].submit(request, now)
        self._owner[request.request_id] = door
        key = self.doors[door].submit(request, now)
        if key is not None and self._publish:
            self._at(now + self.latency_s, self._remote_dispatch, door, request, key, now)
        return key

    def poll(self, now: float) -> WindowOutcome | None:
        """Deliver the messages due by ``now``, then let every scheduler close its window if due; return the
        placements that reached their front doors now."""
        queue = self._queue
        while queue and queue[0][0] <= now:
            _, _, handler, args = heapq.heappop(queue)
            handler(*args, now)
        for j, door in enumerate(self.doors):
            outcome = door.poll(now)
            if outcome is not None:
                for request, key in outcome.assigned:
                    self._placed(j, request, key, now)
        if not self._out:
            return None
        out, self._out = self._out, []
        return WindowOutcome(out)

    def next_deadline(self) -> float | None:
        """When :meth:`poll` must next run: the earliest window deadline or queued message, or ``None``."""
        deadlines = [d for d in (door.next_deadline() for door in self.doors) if d is not None]
        if self._queue:
            deadlines.append(self._queue[0][0])
        return min(deadlines, default=None)

    def on_first_token(self, request_id: str, engine: str, now: float) -> None:
        """A front door relays the first token of ``request_id`` from ``engine``."""
        if self.service:
            self._to_service(now, self.doors[0].on_first_token, request_id, engine)
            return
        door = self._owner[request_id]
        self.doors[door].on_first_token(request_id, engine, now)
        if self._publish:
            self._at(now + self.latency_s, self._remote_first_token, door, request_id)

    def on_tokens(self, request_id: str, engine: str, n: int, now: float) -> bool:
        """A front door relays ``n`` more tokens of ``request_id``; return whether its scheduler saw a new step
        of ``engine`` now (never, when they reach the scheduler service later)."""
        if self.service:
            if self.latency_s > 0:
                self._to_service(now, self.doors[0].on_tokens, request_id, engine, n)
                return False
            return self.doors[0].on_tokens(request_id, engine, n, now)
        return self.doors[self._owner[request_id]].on_tokens(request_id, engine, n, now)

    def on_finish(self, request_id: str, now: float) -> None:
        """A front door relays the finish of ``request_id``."""
        if self.service:
            self._to_service(now, self.doors[0].on_finish, request_id)
            return
        door = self._owner.pop(request_id)
        self.doors[door].on_finish(request_id, now)
        if self._publish:
            self._at(now + self.latency_s, self._remote_finish, door, request_id)

    def on_scrape(self, engine: str, ranks: dict[int, RankMetrics], now: float) -> None:
        """The simulator's scrape of ``engine`` (the service's, or front door 0's) arrives."""
        self.doors[0].on_scrape(engine, ranks, now)

    def set_prefill_alignment(self, engine: str, aligned: bool) -> None:
        """Every scheduler learns whether ``engine`` aligns prefill itself."""
        for door in self.doors:
            door.set_prefill_alignment(engine, aligned)

    # -- delivery ----------------------------------------------------------------------------------------------

    def _placed(self, door: int, request: PendingRequest, key: RankKey, now: float) -> None:
        """Scheduler ``door`` placed ``request`` on ``key`` at ``now``."""
        if self.service and self.latency_s > 0:
            self._at(now + self.latency_s, self._decided, request, key)
            return
        self._out.append((request, key))
        if self._publish:
            self._at(now + self.latency_s, self._remote_dispatch, door, request, key, now)

    def _to_service(self, now: float, method: Callable[..., object], *args: Any) -> None:
        """Call ``method(*args, now)`` on the scheduler service: at once, or when it arrives ``latency_s`` later,
        still dated ``now`` (the front door sends each event's age, the service dates it by its own clock)."""
        if self.latency_s > 0:
            self._at(now + self.latency_s, self._dated, method, args, now)
        else:
            method(*args, now)

    @staticmethod
    def _dated(method: Callable[..., object], args: tuple[Any, ...], happened: float, now: float) -> None:
        method(*args, happened)

    def _service_submit(self, request: PendingRequest, now: float) -> None:
        key = self.doors[0].submit(request, now)
        if key is not None:
            self._placed(0, request, key, now)

    def _decided(self, request: PendingRequest, key: RankKey, now: float) -> None:
        self._out.append((request, key))

    def _remote_dispatch(self, owner: int, request: PendingRequest, key: RankKey, sent_s: float, now: float) -> None:
        """Front door ``owner``'s dispatch (made at ``sent_s``) reaches the other front doors: their load views
        count it from when it was made, their prefix indexes take its blocks."""
        for j, door in enumerate(self.doors):
            if j != owner:
                record_dispatch(door.view, door.prefix, request, key, sent_s)

    def _remote_first_token(self, owner: int, request_id: str, now: float) -> None:
        for j, door in enumerate(self.doors):
            if j != owner:
                door.view.on_first_token(request_id, now)
                door.on_capacity_changed()

    def _remote_finish(self, owner: int, request_id: str, now: float) -> None:
        for j, door in enumerate(self.doors):
            if j != owner:
                door.view.on_finish(request_id, now)
                door.on_capacity_changed()

    def _scrape(self, door: int, engine: str, now: float) -> None:
        """Front door ``door`` reads ``engine``'s gauges now; they reach it ``scrape_lag_s`` later."""
        self._at(now + self._lag, self.doors[door].on_scrape, engine, self._read(engine))
        self._at(now + self._interval, self._scrape, door, engine)
