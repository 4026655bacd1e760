"""The gateway's view of every DP rank's load: scraped metrics reconciled with local accounting.

Pure state with time passed in; the scraper and the dispatcher feed it events.

Scraped engine metrics lag (scrape interval, engine logging interval). Between scrapes the view adds what the
gateway itself dispatched and subtracts what it saw start and finish, so a burst cannot all land on one rank
("herding", ``docs/design.md`` §2.7, §7). At each scrape the deltas restart from the engine's figures. The figures never
fall below what the gateway knows it has in flight on the rank (its own requests are a lower bound, whatever a
lagging scrape says), and when the last good scrape is older than ``stale_after_s`` (or there was none) the view
uses local accounting alone.

Prompt tokens still to prefill are local accounting unless the engine reports them per rank (SGLang's ``GET
/v1/loads`` ``num_waiting_uncached_tokens``, :attr:`RankMetrics.queued_prefill_tokens`), which knows what the
gateway's estimate cannot: the true token count and the prefix-cache hits. Then a rank's queued prefill tokens
are the engine's figure at its last scrape, plus the prompt tokens dispatched to it since and still queued (the
SGLang Model Gateway's since-poll tally, ``gateway/scheduling/baselines/least_load.py``); "since" is from when
the figure was asked for (:attr:`RankMetrics.queued_read_at`), so a request still on its way to the engine then
is counted by its estimate, not lost between the two. As the requests the gateway had queued at the scrape leave
the queue (first token, or finished unstarted), the engine's figure shrinks
in proportion to their estimated tokens: ``W * (Q - left) / Q``, ``Q`` the gateway's own queued tokens at the
scrape. Subtracting their estimates instead would take a whole overestimated or cached prompt off a figure that
held only its uncached, true part, and empty a rank that still has work
(``bench/results/token_count_remedies.md``). KV tokens held are local accounting only.

A streamed request counts as waiting (queued for prefill) until its first token comes back; a non-streamed one,
whose first token is not observable, for ``nonstream_prefill_s`` per chunked-prefill budget its prompt spans (a
100k-token prompt is prefilled over 13 steps of an 8k budget, not in one).

P/D disaggregation (``docs/design.md`` §4.4): each engine has a role (:attr:`EngineSpec.role`). A P/D request is
recorded twice: its prompt on its prefill rank (:meth:`LoadView.on_dispatch`) until its first token, when it
leaves that rank whole (its KV moves to decode), and the request on its decode rank
(:meth:`LoadView.on_dispatch_decode`) from dispatch until it finishes, counted as running there from the start:
a request in the decode engine's pre-allocation or transfer queue holds (or will hold) its KV and joins the
decode batch without another prefill, so the decode allocation must count it. The engines report those queues
(:attr:`RankMetrics.decode_prealloc`, :attr:`RankMetrics.decode_transfer`), and their adapters count them in the
rank's running requests (:mod:`gateway.engines.sglang`, :mod:`gateway.engines.vllm`), so a decode rank's requests
merge as every rank's do: the engine's figure at the scrape plus the decode legs dispatched since it was read, less
those finished since. A leg the engine already counted is not counted again: legs sent before the engine's figures
were asked for (:attr:`RankMetrics.queued_read_at`, else when the scrape arrived) are in them, the others are
added. The queues themselves are reported per rank (:attr:`RankLoad.decode_prealloc`, ``decode_transfer``: the
engine's figures, the gateway's legs sent since added to the pre-allocation queue, where each arrives; 0 without
fresh figures). A decode rank's KV tokens are the engine's where it reports them (SGLang's ``num_total_tokens``,
:attr:`RankMetrics.kv_tokens`: the reservations of requests in transfer and the tokens of those still to reserve
included) plus the change in the gateway's own accounting since they were read (legs sent since, tokens generated,
legs finished), never below the gateway's own; elsewhere KV tokens are local accounting.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from gateway.types import RankKey, RankLoad, RankMetrics


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What the load view needs to know of one engine.

    Attributes:
        name: engine name.
        dp_size: number of DP ranks.
        models: models it serves.
        prefill_budget: prefill tokens per rank per step.
        role: the engine's role.
    """

    name: str
    dp_size: int
    models: frozenset[str]
    prefill_budget: int
    role: str = "mixed"
    """``mixed``, ``prefill`` or ``decode`` (``engines[].role``)."""


PREFILL_ROLES = frozenset({"mixed", "prefill"})
"""Roles whose ranks take prefill: the ranks a prompt may be placed on."""
DECODE_ROLES = frozenset({"decode"})
"""Roles whose ranks take the decode legs of P/D requests."""


@dataclass(slots=True)
class _InFlight:
    key: RankKey
    state: _RankState
    """The state of rank :attr:`key` (spares hashing the key on every token)."""
    prompt_tokens: int
    dispatched_at: float
    prefill_tokens: int
    started: bool = False
    in_engine_figure: bool = False
    """Sent before the engine's last figures were read (so counted in them): a prompt queued on its rank then, or a
    decode leg."""
    generated: int = 0
    unstarted_at_read: bool = False
    """Sent before the engine's last figures were read and without its first token then: the engine counted it as
    waiting or, already, as running (see :attr:`_RankState.waiting_at_read`)."""


@dataclass(slots=True)
class _RankState:
    spec: EngineSpec
    key: RankKey
    engine: _EngineState
    position: int
    """The rank's place in its engine's :attr:`_EngineState.states`."""
    local_waiting: int = 0
    local_running: int = 0
    queued_prefill_tokens: int = 0
    kv_tokens: int = 0
    scraped: RankMetrics | None = None
    dispatched_since: int = 0
    started_since: int = 0
    finished_waiting_since: int = 0
    finished_running_since: int = 0
    decode_dispatched_since: int = 0
    """Decode legs dispatched since the last scrape (counted as running from dispatch)."""
    decode_new: int = 0
    """Decode legs in flight that the engine's last figures do not count (sent after they were read)."""
    kv_at_read: int = 0
    """Local KV tokens of the decode legs the engine's last figures count, as they stood at the scrape."""
    queued_at_scrape: int = 0
    """Local queued prefill tokens when the last scrape arrived."""
    queued_left_since: int = 0
    """Prompt tokens of the requests queued at the last scrape that left the queue since (started, or finished
    unstarted)."""
    queued_new: int = 0
    """Prompt tokens dispatched since the last scrape and still queued."""
    waiting_at_read: int = 0
    """With ``running_before_first_token``: of the gateway's requests unstarted when the engine's last figures were
    read, how many those figures may still count as waiting: at most the engine's waiting count. An engine counts a
    request as running before its first token reaches the gateway (vLLM once it schedules its first prefill chunk,
    SGLang once its prefill step ends), so the first token of a request beyond these moves nothing from waiting to
    running: it is in the running figure already, and counting it again shows a busy rank until the next scrape."""
    decodes: bool = False
    """Requests decode on the rank and no prompt tokens are queued there (counted in
    :attr:`_EngineState.decoding_ranks`)."""
    load: RankLoad | None = None
    """The rank's last snapshot entry while none of its figures changed since (``None``: build it again)."""
    usable: bool = True
    """Whether new requests may go to the rank, as last asked (:attr:`load` carries it)."""
    touched: bool = False
    """Some figure changed since the last scrape of the engine (so its since-scrape counters may not all be 0)."""


@dataclass(slots=True)
class _EngineState:
    last_scrape_ok: float | None = None
    last_scrape_attempt: float | None = None
    consecutive_failures: int = 0
    ranks: list[RankKey] = field(default_factory=list)
    states: list[_RankState] = field(default_factory=list)
    """The ranks' states, in the order of :attr:`ranks`."""
    queued: dict[RankKey, int] = field(default_factory=dict)
    """The prompt tokens queued on each rank that has any (:attr:`_RankState.queued_prefill_tokens` not 0)."""
    decoding_ranks: int = 0
    """Ranks whose :attr:`_RankState.decodes` holds."""
    loads: list[RankLoad] = field(default_factory=list)
    """The ranks' snapshot entries, in rank order, as of the last :meth:`LoadView.refresh` (empty before it)."""
    loads_fresh: bool | None = None
    """Whether the engine's scrape was fresh when :attr:`loads` were built (``None``: not built yet)."""
    changed: list[_RankState] = field(default_factory=list)
    """Ranks whose snapshot entry was dropped since the last refresh."""


class RankWatch:
    """The ranks whose snapshot entry :meth:`LoadView.refresh` replaced since the watch's owner last emptied
    :attr:`keys` (:meth:`LoadView.watch`): a consumer that keeps something per rank (an index of the ranks by load)
    updates those ranks only. :attr:`reset` is set when the view's set of ranks changed (an engine added or
    removed): the consumer takes the whole snapshot again and clears it."""

    __slots__ = ("keys", "reset")

    def __init__(self) -> None:
        self.keys: set[RankKey] = set()
        self.reset = False


class LoadView:
    """Per-rank load, updated by scrapes and by the gateway's own dispatch events.

    Args:
        engines: the engines and their ranks.
        stale_after_s: scraped figures older than this are ignored (seconds).
        nonstream_prefill_s: how long a non-streamed request counts as queued for prefill, per chunked-prefill
            budget of its rank that its prompt spans (seconds).
        usable: whether new requests may go to a rank at a time (the gateway passes its circuit breakers'
            :meth:`~gateway.load.health.HealthBook.usable`); every rank is usable when ``None``.
        unsure: the ranks ``usable`` may find unusable now: every other rank is usable at any time, so ``usable``
            is asked only of these and of those it last refused (the gateway passes
            :meth:`~gateway.load.health.HealthBook.unsure`); ``None``: it is asked of every rank at every refresh.
        state_sync: add the gateway's own dispatches, first tokens and finishes to the figures between scrapes
            (``docs/design.md`` §2.7, "robust state synchronization"). ``False``, for ablation: between two
            scrapes of an engine its ranks' snapshot stays what it was at the last scrape (before any scrape: the
            live local accounting, i.e. idle).
        running_before_first_token: the engines count a request as running before its first token reaches the
            gateway, so of the gateway's requests unstarted when an engine's figures were read, only as many as the
            engine counted waiting move from waiting to running at their first token
            (:attr:`_RankState.waiting_at_read`); ``False``: each does, and a request the engine already ran counts
            twice until the next scrape (``scrape.running_before_first_token``).
    """

    def __init__(
        self,
        engines: Iterable[EngineSpec],
        *,
        stale_after_s: float,
        nonstream_prefill_s: float = 1.0,
        usable: Callable[[RankKey, float], bool] | None = None,
        unsure: Callable[[], Collection[RankKey]] | None = None,
        state_sync: bool = True,
        running_before_first_token: bool = False,
    ) -> None:
        self.stale_after_s = stale_after_s
        self.nonstream_prefill_s = nonstream_prefill_s
        self.state_sync = state_sync
        self.running_before_first_token = running_before_first_token
        self._usable = usable
        self._unsure = unsure
        self._refused: set[RankKey] = set()
        """Ranks ``usable`` refused at the last refresh."""
        self._watches: list[RankWatch] = []
        self._frozen: dict[RankKey, RankLoad] = {}
        self._ranks: dict[RankKey, _RankState] = {}
        self._engines: dict[str, _EngineState] = {}
        for spec in engines:
            engine = self._engines.setdefault(spec.name, _EngineState())
            for rank in range(spec.dp_size):
                key = RankKey(spec.name, rank)
                state = self._ranks[key] = _RankState(spec, key, engine, len(engine.states))
                engine.ranks.append(key)
                engine.states.append(state)
        self._inflight: dict[str, _InFlight] = {}
        self._decode: dict[str, _InFlight] = {}
        """Decode legs of P/D requests, by request id."""
        self._pd_models = self._prefill_models()
        self._nonstream_due: list[tuple[float, str]] = []

    def _prefill_models(self) -> frozenset[str]:
        return frozenset(
            model for key, state in self._ranks.items() if state.spec.role == "prefill" for model in state.spec.models
        )

    # -- the engine set (engines added and removed at runtime, :mod:`gateway.engine_set`) ---------

    def add_engine(self, spec: EngineSpec) -> None:
        """Add ``spec``'s engine and its DP ranks (idle, unscraped: local accounting until its first scrape).

        Raises:
            ValueError: an engine of that name is already in the view.
        """
        if spec.name in self._engines:
            raise ValueError(f"engine {spec.name!r} is already in the load view")
        engine = self._engines[spec.name] = _EngineState()
        for rank in range(spec.dp_size):
            key = RankKey(spec.name, rank)
            state = self._ranks[key] = _RankState(spec, key, engine, len(engine.states))
            engine.ranks.append(key)
            engine.states.append(state)
        self._pd_models = self._prefill_models()
        for watch in self._watches:
            watch.reset = True

    def remove_engine(self, name: str) -> None:
        """Drop engine ``name`` and its ranks: their load leaves every snapshot. Call it once no request is in flight
        there (:meth:`engine_inflight`); any still recorded is forgotten with the ranks.

        Raises:
            KeyError: ``name`` is unknown.
        """
        estate = self._engines.pop(name)
        for key in estate.ranks:
            del self._ranks[key]
            self._frozen.pop(key, None)
        for table in (self._inflight, self._decode):
            for request_id in [r for r, item in table.items() if item.key.engine == name]:
                del table[request_id]
        self._refused.difference_update(estate.ranks)
        self._pd_models = self._prefill_models()
        for watch in self._watches:
            watch.reset = True

    def has_rank(self, key: RankKey) -> bool:
        """Whether ``key`` is a rank of the view."""
        return key in self._ranks

    def engine_inflight(self, name: str) -> int:
        """Requests in flight on engine ``name``'s ranks (a P/D request counts on each engine holding a leg)."""
        tables = (self._inflight, self._decode) if self._decode else (self._inflight,)
        return sum(1 for table in tables for item in table.values() if item.key.engine == name)

    @property
    def engine_names(self) -> list[str]:
        """The engines, in configuration order."""
        return list(self._engines)

    @property
    def pd_models(self) -> frozenset[str]:
        """Models served P/D (listed by prefill engines)."""
        return self._pd_models

    def role(self, engine: str) -> str:
        """The role of ``engine``.

        Raises:
            KeyError: ``engine`` is unknown.
        """
        return self._ranks[self._engines[engine].ranks[0]].spec.role

    @property
    def keys(self) -> list[RankKey]:
        """All DP ranks, engine by engine."""
        return list(self._ranks)

    def queued_prefill_tokens(self, engine: str) -> list[tuple[RankKey, int, int]]:
        """``(rank, prompt tokens sent and not yet prefilled, per-step prefill budget)`` for each rank of ``engine``.

        Raises:
            KeyError: ``engine`` is unknown.
        """
        out = []
        for key in self._engines[engine].ranks:
            state = self._ranks[key]
            out.append((key, state.queued_prefill_tokens, state.spec.prefill_budget))
        return out

    def prefill_queue(self, engine: str) -> tuple[dict[RankKey, int], int, int]:
        """``engine``'s prompt tokens sent and not yet prefilled, sparsely: ``(tokens by rank, for the ranks that have
        any, in no particular order; the engine's number of ranks; their per-step prefill budget)``. The dictionary
        is the view's own, live: read it at once, do not keep or change it.

        Raises:
            KeyError: ``engine`` is unknown.
        """
        estate = self._engines[engine]
        spec = self._ranks[estate.ranks[0]].spec
        return estate.queued, spec.dp_size, spec.prefill_budget

    def rank_of(self, request_id: str) -> RankKey | None:
        """The rank ``request_id`` was dispatched to (a P/D request's decode rank, where its tokens come from), or
        ``None`` if it is not in flight."""
        item = self._decode.get(request_id) or self._inflight.get(request_id)
        return None if item is None else item.key

    def decode_rank_of(self, request_id: str) -> RankKey | None:
        """The decode rank of a P/D request in flight, or ``None``."""
        item = self._decode.get(request_id)
        return None if item is None else item.key

    def decodes_next_step(self, engine: str) -> bool:
        """Whether some rank of ``engine`` has requests decoding (first token seen, not finished) and no prompt
        tokens queued, by the gateway's own accounting: such a rank decodes in the engine's next step, so that
        step ends with tokens the gateway sees (:mod:`gateway.scheduling.step_clock`).

        Raises:
            KeyError: ``engine`` is unknown.
        """
        return self._engines[engine].decoding_ranks > 0

    def inflight_count(self) -> int:
        """Requests dispatched and not yet finished."""
        if not self._decode:
            return len(self._inflight)
        return len(self._inflight.keys() | self._decode.keys())

    # -- dispatch events ---------------------------------------------------------------------------------

    def on_dispatch(
        self, request_id: str, key: RankKey, prompt_tokens: int, now: float, *, stream: bool, cached_tokens: int = 0
    ) -> None:
        """The gateway sent ``request_id`` to rank ``key``; the rank's prefix cache probably holds ``cached_tokens``
        of its ``prompt_tokens`` (:mod:`gateway.scheduling.prefix_index`), so only the rest queue for prefill, while
        the whole prompt takes KV.

        Raises:
            KeyError: ``key`` is not a known rank.
            ValueError: ``request_id`` is already in flight.
        """
        state = self._ranks[key]
        if request_id in self._inflight:
            raise ValueError(f"request {request_id!r} is already in flight")
        prefill = max(0, prompt_tokens - cached_tokens)
        self._inflight[request_id] = _InFlight(key, state, prompt_tokens, now, prefill)
        state.local_waiting += 1
        state.dispatched_since += 1
        state.queued_prefill_tokens += prefill
        state.queued_new += prefill
        state.kv_tokens += prompt_tokens
        self._changed(state)
        if not stream:
            chunks = max(1, math.ceil(prefill / state.spec.prefill_budget))
            heapq.heappush(self._nonstream_due, (now + self.nonstream_prefill_s * chunks, request_id))

    def on_dispatch_decode(self, request_id: str, key: RankKey, prompt_tokens: int, now: float) -> None:
        """The gateway sent the decode leg of P/D request ``request_id`` to decode rank ``key``: it counts as running
        there, holding its prompt's KV, until :meth:`on_finish` (see the module docstring).

        Raises:
            KeyError: ``key`` is not a known rank.
            ValueError: the decode leg of ``request_id`` is already in flight.
        """
        state = self._ranks[key]
        if request_id in self._decode:
            raise ValueError(f"the decode leg of {request_id!r} is already in flight")
        self._decode[request_id] = _InFlight(key, state, prompt_tokens, now, 0, started=True)
        state.local_running += 1
        state.decode_dispatched_since += 1
        state.decode_new += 1
        state.kv_tokens += prompt_tokens
        self._changed(state)

    def on_first_token(self, request_id: str, now: float) -> None:
        """The first output token of ``request_id`` came back: its prefill is done (a P/D request leaves its prefill
        rank). Unknown ids are ignored."""
        item = self._inflight.get(request_id)
        if item is None or item.started:
            return
        if request_id in self._decode:
            self._release(request_id)
            return
        item.started = True
        state = item.state
        state.local_waiting -= 1
        state.local_running += 1
        if self._left_waiting_figure(state, item):
            state.started_since += 1
        self._leave_queue(state, item)
        self._changed(state)

    def on_tokens(self, request_id: str, n: int) -> None:
        """``n`` more output tokens of ``request_id`` came back (they grow its KV)."""
        item = (self._decode.get(request_id) if self._decode else None) or self._inflight.get(request_id)
        if item is not None and n > 0:
            item.generated += n
            state = item.state
            state.kv_tokens += n
            if state.load is not None:
                state.load = None
                state.engine.changed.append(state)

    def on_finish(self, request_id: str, now: float) -> None:
        """``request_id`` completed, failed or was aborted (both legs of a P/D request). Unknown ids are ignored."""
        decode = self._decode.pop(request_id, None)
        if decode is not None:
            state = decode.state
            state.kv_tokens -= decode.prompt_tokens + decode.generated
            state.local_running -= 1
            state.finished_running_since += 1
            if not decode.in_engine_figure:
                state.decode_new -= 1
            self._changed(state)
        self._release(request_id)

    def _release(self, request_id: str) -> None:
        """Take ``request_id`` off the rank it was dispatched to (for a P/D request: its prefill rank)."""
        item = self._inflight.pop(request_id, None)
        if item is None:
            return
        state = item.state
        state.kv_tokens -= item.prompt_tokens + item.generated
        if item.started:
            state.local_running -= 1
            state.finished_running_since += 1
        else:
            state.local_waiting -= 1
            if self._left_waiting_figure(state, item):
                state.finished_waiting_since += 1
            else:
                state.finished_running_since += 1
            self._leave_queue(state, item)
        self._changed(state)

    @staticmethod
    def _left_waiting_figure(state: _RankState, item: _InFlight) -> bool:
        """Whether ``item``, leaving the waiting state, leaves the engine's waiting figure as last read (or the
        requests dispatched since): not when that figure counted it as running already."""
        if not item.unstarted_at_read:
            return True
        item.unstarted_at_read = False
        if state.waiting_at_read > 0:
            state.waiting_at_read -= 1
            return True
        return False

    def _leave_queue(self, state: _RankState, item: _InFlight) -> None:
        state.queued_prefill_tokens -= item.prefill_tokens
        if item.in_engine_figure:
            state.queued_left_since += item.prefill_tokens
        else:
            state.queued_new -= item.prefill_tokens

    @staticmethod
    def _drop_load(state: _RankState) -> None:
        """The rank's snapshot entry no longer holds: build it again at the next snapshot."""
        if state.load is not None:
            state.load = None
            state.engine.changed.append(state)

    @staticmethod
    def _changed(state: _RankState) -> None:
        """Some figure of ``state`` changed: its snapshot entry goes, and its engine's tallies of queued tokens and
        decoding ranks follow it."""
        engine, tokens = state.engine, state.queued_prefill_tokens
        if state.load is not None:
            state.load = None
            engine.changed.append(state)
        state.touched = True
        if tokens:
            engine.queued[state.key] = tokens
        else:
            engine.queued.pop(state.key, None)
        decodes = state.local_running > 0 and tokens <= 0
        if decodes != state.decodes:
            state.decodes = decodes
            engine.decoding_ranks += 1 if decodes else -1

    def _promote_nonstream(self, now: float) -> None:
        while self._nonstream_due and self._nonstream_due[0][0] <= now:
            _, request_id = heapq.heappop(self._nonstream_due)
            self.on_first_token(request_id, now)

    # -- scrape events -----------------------------------------------------------------------------------

    def on_scrape(self, engine: str, ranks: dict[int, RankMetrics], now: float) -> None:
        """A scrape of ``engine`` succeeded with per-rank figures (ranks it did not report keep local accounting).

        Raises:
            KeyError: ``engine`` is unknown.
        """
        estate = self._engines[engine]
        estate.last_scrape_ok = now
        estate.last_scrape_attempt = now
        estate.consecutive_failures = 0
        for state in estate.states:
            scraped = ranks.get(state.key.rank)
            if not state.touched and (scraped is state.scraped or scraped == state.scraped):
                continue  # the same figures, and every since-scrape counter still 0: nothing changes
            state.scraped = scraped
            state.dispatched_since = state.started_since = 0
            state.finished_waiting_since = state.finished_running_since = state.decode_dispatched_since = 0
            state.queued_at_scrape = state.queued_left_since = state.queued_new = 0
            state.decode_new = state.kv_at_read = state.waiting_at_read = 0
            state.touched = False
            self._drop_load(state)
        for item in self._decode.values():
            if item.key.engine != engine:
                continue
            state = item.state
            state.touched = True
            self._drop_load(state)
            item.in_engine_figure = item.dispatched_at < self._read_at(state, now)
            if item.in_engine_figure:
                state.kv_at_read += item.prompt_tokens + item.generated
            else:
                state.decode_dispatched_since += 1
                state.decode_new += 1
        for item in self._inflight.values() if self.running_before_first_token else ():
            if item.key.engine == engine and not item.started:
                state = self._ranks[item.key]
                item.unstarted_at_read = item.dispatched_at < self._read_at(state, now)
                state.waiting_at_read += item.unstarted_at_read
        for key in estate.ranks:
            state = self._ranks[key]
            waiting = state.scraped.waiting if state.scraped is not None else 0.0
            state.waiting_at_read = min(state.waiting_at_read, max(0, math.floor(waiting)))
        reported = any(m.queued_prefill_tokens is not None for m in ranks.values())
        for item in self._inflight.values() if reported else ():
            if item.key.engine != engine or item.started:
                continue
            state = item.state
            state.touched = True
            self._drop_load(state)
            item.in_engine_figure = item.dispatched_at < self._read_at(state, now)
            if item.in_engine_figure:
                state.queued_at_scrape += item.prefill_tokens
            else:
                state.queued_new += item.prefill_tokens
        if not self.state_sync:
            self.refresh(now)
            for state in estate.states:
                assert state.load is not None
                self._frozen[state.key] = state.load
                for watch in self._watches:
                    watch.keys.add(state.key)

    @staticmethod
    def _read_at(state: _RankState, now: float) -> float:
        """When the rank's last figures were asked for (:attr:`RankMetrics.queued_read_at`), else ``now``."""
        scraped = state.scraped
        return now if scraped is None or scraped.queued_read_at is None else scraped.queued_read_at

    def on_scrape_failure(self, engine: str, now: float) -> None:
        """A scrape of ``engine`` failed (unreachable, timeout, unparsable)."""
        estate = self._engines[engine]
        estate.last_scrape_attempt = now
        estate.consecutive_failures += 1

    def scrape_fresh(self, engine: str, now: float) -> bool:
        """Whether ``engine`` has a successful scrape younger than ``stale_after_s``."""
        last = self._engines[engine].last_scrape_ok
        return last is not None and now - last <= self.stale_after_s

    def engine_reachable(self, engine: str) -> bool:
        """Whether the last scrape attempt of ``engine`` succeeded (or none was made yet)."""
        return self._engines[engine].consecutive_failures == 0

    # -- snapshot ----------------------------------------------------------------------------------------

    def snapshot(self, now: float, roles: frozenset[str] | None = None) -> list[RankLoad]:
        """Every rank's load as the allocator should see it at ``now``; with ``roles``, only the ranks of engines
        with one of them (:data:`PREFILL_ROLES`, :data:`DECODE_ROLES`)."""
        self.refresh(now)
        out: list[RankLoad] = []
        for estate in self._engines.values():
            states = estate.states
            if states and (roles is None or states[0].spec.role in roles):
                out += estate.loads
        if self.state_sync:
            return out
        return [self._frozen.get(load.key, load) for load in out]

    def watch(self) -> RankWatch:
        """A :class:`RankWatch` that :meth:`refresh` tells of every rank whose snapshot entry it replaces (and a
        scrape, of every rank whose frozen entry it replaces, without ``state_sync``), from now on."""
        watch = RankWatch()
        self._watches.append(watch)
        return watch

    def entry(self, key: RankKey) -> RankLoad:
        """Rank ``key``'s entry in the snapshot as of the last :meth:`refresh` (or :meth:`snapshot`).

        Raises:
            KeyError: ``key`` is not a known rank.
        """
        load = self._ranks[key].load
        if not self.state_sync:
            load = self._frozen.get(key, load)
        assert load is not None, "entry() before refresh()"
        return load

    def refresh(self, now: float) -> None:
        """Bring every rank's snapshot entry up to ``now``: the non-streamed requests whose prefill is due start,
        ``usable`` is asked again (of the :attr:`unsure` ranks only, when given), and the entries of the ranks whose
        figures, usability or scrape freshness changed are built again, the others kept; the watches
        (:meth:`watch`) hear of each entry replaced. Costs O(engines + ranks changed + ranks unsure)."""
        self._promote_nonstream(now)
        if self._usable is not None:
            self._ask_usable(self._usable, now)
        watches = self._watches
        for estate in self._engines.values():
            last = estate.last_scrape_ok
            fresh = last is not None and now - last <= self.stale_after_s
            if estate.loads_fresh is not fresh:
                estate.changed.clear()
                estate.loads = [self._build(s, fresh) for s in estate.states]
                estate.loads_fresh = fresh
                rebuilt: Iterable[_RankState] = estate.states
            elif estate.changed:
                rebuilt = [s for s in estate.changed if s.load is None]
                estate.changed.clear()
                for s in rebuilt:
                    estate.loads[s.position] = self._build(s, fresh)
            else:
                continue
            for watch in watches:
                watch.keys.update(s.key for s in rebuilt)

    def _ask_usable(self, usable_at: Callable[[RankKey, float], bool], now: float) -> None:
        """Ask ``usable_at`` of the ranks it may refuse (every rank without ``unsure``); a rank whose answer
        changed gets its entry built again."""
        if self._unsure is None:
            asked: Iterable[RankKey] = self._ranks
            unsure: Collection[RankKey] | None = None
        else:
            unsure = self._unsure()
            if not unsure and not self._refused:
                return
            asked = {key for key in unsure if key in self._ranks} | self._refused
        for key in asked:
            ok = True if unsure is not None and key not in unsure else usable_at(key, now)
            if ok:
                self._refused.discard(key)
            else:
                self._refused.add(key)
            s = self._ranks[key]
            if ok != s.usable:
                s.usable = ok
                self._drop_load(s)

    @staticmethod
    def _build(s: _RankState, fresh: bool) -> RankLoad:
        s.load = LoadView._rank_load(s, fresh, s.usable)
        return s.load

    @staticmethod
    def _rank_load(s: _RankState, fresh: bool, usable: bool) -> RankLoad:
        """One rank's snapshot entry, from its figures, whether its engine's scrape is ``fresh`` and whether it is
        ``usable``."""
        waiting = float(s.local_waiting)
        running = float(s.local_running)
        kv_usage: float | None = None
        queued = float(s.queued_prefill_tokens)
        kv_tokens = float(s.kv_tokens)
        prealloc = transfer = 0.0
        if s.scraped is not None and fresh:
            scraped_waiting = s.scraped.waiting + s.dispatched_since - s.started_since
            scraped_waiting -= s.finished_waiting_since
            scraped_running = s.scraped.running + s.started_since + s.decode_dispatched_since
            scraped_running -= s.finished_running_since
            waiting = max(waiting, scraped_waiting)
            running = max(running, scraped_running)
            kv_usage = s.scraped.kv_usage
            if s.scraped.queued_prefill_tokens is not None:
                reported = s.scraped.queued_prefill_tokens
                if s.queued_at_scrape > 0:
                    reported *= max(0, s.queued_at_scrape - s.queued_left_since) / s.queued_at_scrape
                queued = reported + s.queued_new
            if s.scraped.decode_prealloc is not None:
                prealloc = s.scraped.decode_prealloc + s.decode_new
            transfer = s.scraped.decode_transfer or 0.0
            if s.scraped.kv_tokens is not None and s.spec.role in DECODE_ROLES:
                kv_tokens = max(kv_tokens, s.scraped.kv_tokens + s.kv_tokens - s.kv_at_read)
        return RankLoad(
            key=s.key,
            models=s.spec.models,
            running=running,
            waiting=waiting,
            queued_prefill_tokens=queued,
            kv_tokens=kv_tokens,
            kv_usage=kv_usage,
            prefill_budget=s.spec.prefill_budget,
            usable=usable,
            decode_prealloc=prealloc,
            decode_transfer=transfer,
        )
