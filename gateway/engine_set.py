"""The engine set at runtime: engines added, drained and removed while the gateway serves.

Three sources change it: the admin API (:mod:`gateway.server.admin`), the configuration file reloaded on SIGHUP
(:meth:`EngineSet.apply`) and discovery; each change is counted in ``gateway_engine_changes_total{change, source}``.

- **Add.** The engine's DP ranks join the load view (idle, on local accounting until its first scrape) and the
  circuit breakers, its scraper and prober tasks start, and it is *held* (no new placement) until its first health
  probe has answered: a probe that failed leaves its breaker open, so it takes requests only once a later probe
  succeeds. An engine is validated as one in the configuration file would be, together with the engines already
  there (unique name, one way of serving each model, one P/D protocol per model).
- **Drain.** No new request is placed on it (held, ``gateway_engine_draining{engine}`` 1); requests in flight there,
  both legs of P/D requests included, go on to their end. ``/ready`` is not affected. **Undrain** lets it take
  requests again.
- **Remove.** The engine is drained, then, once no request is in flight on it, its scraper and prober tasks stop
  (awaited), its ranks leave the load view, its breakers, prefix-cache blocks and step-time model are dropped and
  its per-engine series are no longer exported. Removed **by force**, the requests in flight there are failed at
  once rather than awaited: their engine connections are closed (:meth:`EngineClient.abort
  <gateway.engines.client.EngineClient.abort>`), so each fails as it would if the engine's connection broke: a
  request whose answer has not begun reaching its client is tried again on another engine (the retry policy of
  ``upstream.*``), and a stream already begun ends with an OpenAI-style error event and ``[DONE]``.

The engine set itself is pure bookkeeping over the gateway's resources; the only waiting it does is for the first
probe of an engine added and for the requests in flight on an engine removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from pydantic import ValidationError

from gateway.config import EngineConfig, Settings
from gateway.dispatch import Dispatcher
from gateway.engines import Engine
from gateway.engines.client import EngineClient
from gateway.load.health import BreakerState, HealthBook
from gateway.load.prober import HealthProber
from gateway.load.scraper import MetricsScraper
from gateway.load.view import EngineSpec, LoadView
from gateway.telemetry import GatewayMetrics

log = logging.getLogger(__name__)

ChangeSource = Literal["admin", "reload", "discovery"]
"""Who changed the engine set: the admin API, the configuration file reloaded, or discovery."""
EngineStateName = Literal["ready", "draining", "down"]
"""``ready``: takes new requests; ``draining``: takes none, finishes those in flight (being removed, too, when
:attr:`EngineStatus.removing`); ``down``: its circuit breaker is open, or it has not answered a probe yet."""

REMOVAL_POLL_S = 0.05
"""How often a removal waiting for an engine's requests in flight to end looks again, seconds."""
FORCED_REMOVAL_WAIT_S = 30.0
"""Longest wait, after a removal by force closed an engine's connections, for its requests to end (each ends as
soon as its handler sees its connection closed; one still waiting for the engine's answer headers sees it when
they come): past it the engine is removed whatever is still counted there, seconds."""


class EngineSetError(Exception):
    """A change the engine set refuses: ``status`` 400 (invalid engine), 404 (unknown engine) or 409 (conflicts
    with the engines there, or with one being removed).

    Attributes:
        message: what is wrong, naming the field where there is one.
        status: the HTTP status to answer with.
        param: the field at fault, if any.
    """

    def __init__(self, message: str, status: int, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """One engine as the admin API lists it.

    Attributes:
        name, url, flavor, role, dp_size, models: from its configuration.
        state: :data:`EngineStateName`.
        removing: a removal waits for its requests in flight to end.
        inflight: requests in flight on its ranks.
    """

    name: str
    url: str
    flavor: str
    role: str
    dp_size: int
    models: list[str]
    state: EngineStateName
    removing: bool
    inflight: int

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.url,
            "flavor": self.flavor,
            "role": self.role,
            "dp_size": self.dp_size,
            "models": self.models,
            "state": self.state,
            "removing": self.removing,
            "inflight": self.inflight,
        }


@dataclass(slots=True)
class _Entry:
    engine: Engine
    draining: bool = False
    removal: asyncio.Task[None] | None = None
    """The removal waiting for the engine's requests in flight to end, if one was asked for."""


@dataclass(slots=True)
class ReloadPlan:
    """What applying a new list of engines changes: names to add, to remove (drained first) and to replace (an
    entry whose settings changed: removed once drained, then added again)."""

    add: list[EngineConfig] = field(default_factory=list)
    remove: list[str] = field(default_factory=list)
    replace: list[EngineConfig] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.add or self.remove or self.replace)


def plan_reload(running: Sequence[EngineConfig], wanted: Sequence[EngineConfig]) -> ReloadPlan:
    """The changes that turn the ``running`` engines into the ``wanted`` ones, by name, in ``wanted``'s order."""
    now = {e.name: e for e in running}
    names = {e.name for e in wanted}
    plan = ReloadPlan(remove=[e.name for e in running if e.name not in names])
    for engine in wanted:
        current = now.get(engine.name)
        if current is None:
            plan.add.append(engine)
        elif current != engine:
            plan.replace.append(engine)
    return plan


class EngineSet:
    """The engines of one running gateway and the changes to them (module docstring).

    Args:
        settings: the gateway settings (the engines it started with; the rest is read to validate engines added).
        engines: the gateway's engine name → engine map, changed in place (the relay looks engines up there).
        models: the gateway's list of served models, changed in place.
        view, health, dispatcher, scraper, prober, client, metrics: the gateway's resources.
        clock: monotonic clock, seconds.
    """

    def __init__(
        self,
        settings: Settings,
        engines: dict[str, Engine],
        models: list[str],
        *,
        view: LoadView,
        health: HealthBook,
        dispatcher: Dispatcher,
        scraper: MetricsScraper,
        prober: HealthProber,
        client: EngineClient,
        metrics: GatewayMetrics,
        clock: Callable[[], float],
    ) -> None:
        self.settings = settings
        self.engines = engines
        self.models = models
        self.view = view
        self.health = health
        self.dispatcher = dispatcher
        self.scraper = scraper
        self.prober = prober
        self.client = client
        self.metrics = metrics
        self.clock = clock
        self._entries = {name: _Entry(engine) for name, engine in engines.items()}
        self.removed_listeners: list[Callable[[str], object]] = []
        """Called with an engine's name once it is removed (what the gateway remembers of it elsewhere goes too:
        the ranks that store Responses, :meth:`~gateway.server.responses_store.ResponseHomes.forget_engine`)."""
        self._adding: set[asyncio.Task[EngineStatus]] = set()
        self._closing = False

    # -- reading --------------------------------------------------------------------------------------------

    @property
    def configs(self) -> list[EngineConfig]:
        """The engines' settings, in the order they joined."""
        return [entry.engine.config for entry in self._entries.values()]

    def status(self, name: str) -> EngineStatus:
        """The status of engine ``name``.

        Raises:
            EngineSetError: 404, unknown engine.
        """
        entry = self._entry(name)
        config = entry.engine.config
        now = self.clock()
        state: EngineStateName
        if entry.draining:
            state = "draining"
        elif self.health.held(name) or self.health.engine(name).state(now) is BreakerState.OPEN:
            state = "down"
        else:
            state = "ready"
        return EngineStatus(
            name=name,
            url=config.url,
            flavor=config.flavor,
            role=config.role,
            dp_size=config.dp_size,
            models=list(config.models),
            state=state,
            removing=entry.removal is not None,
            inflight=self.view.engine_inflight(name),
        )

    def list(self) -> list[EngineStatus]:
        """Every engine's status, in the order they joined."""
        return [self.status(name) for name in self._entries]

    def names_removing(self) -> set[str]:
        """The engines whose removal waits for their requests in flight to end."""
        return {name for name, entry in self._entries.items() if entry.removal is not None}

    def _entry(self, name: str) -> _Entry:
        entry = self._entries.get(name)
        if entry is None:
            raise EngineSetError(f"no engine named {name!r}", 404, "name")
        return entry

    # -- validating -----------------------------------------------------------------------------------------

    def validate_new(self, raw: object) -> EngineConfig:
        """``raw`` (a JSON object) as a new engine's settings, checked as an ``engines`` entry of the configuration
        file would be and against the engines there now.

        Raises:
            EngineSetError: 400, the entry is invalid or does not fit with the engines there; 409, an engine of that
                name is there already.
        """
        try:
            config = EngineConfig.model_validate(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise EngineSetError(f"{where or 'engine'}: {first['msg']}", 400, where) from None
        if config.name in self._entries:
            raise EngineSetError(f"an engine named {config.name!r} is already in the gateway", 409, "name")
        self.check_fits([*self.configs, config])
        return config

    def check_fits(self, engines: Sequence[EngineConfig]) -> None:
        """Check that ``engines`` together would be a valid ``engines`` list with the gateway's other settings.

        Raises:
            EngineSetError: 400, naming the problem.
        """
        data = self.settings.model_dump(exclude={"engines", "models"})
        data["engines"] = [e.model_dump() for e in engines]
        try:
            Settings.model_validate(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise EngineSetError(str(first["msg"]).removeprefix("Value error, "), 400, "engines") from None

    # -- changing -------------------------------------------------------------------------------------------

    async def add(self, config: EngineConfig, source: ChangeSource) -> EngineStatus:
        """Add the engine of ``config`` (validated by :meth:`validate_new`); return its status once its first health
        probe answered (``ready``, or ``down`` when that probe failed).

        Raises:
            EngineSetError: 409, an engine of that name is there already (or the gateway is shutting down).
        """
        name = config.name
        if name in self._entries or self._closing:
            raise EngineSetError(f"an engine named {name!r} is already in the gateway", 409, "name")
        engine = Engine.from_config(config)
        self._entries[name] = _Entry(engine)
        self.engines[name] = engine
        self.health.add_engine(name, config.dp_size, held=True)
        self.view.add_engine(
            EngineSpec(name, config.dp_size, frozenset(config.models), config.prefill_budget_tokens, config.role)
        )
        if config.prefill_alignment in ("prefill_delayer", "prefill_schedule_interval"):
            self.dispatcher.scheduler.set_prefill_alignment(name, True)
        self.metrics.describe_engines([(name, config.flavor, config.role)])
        self.metrics.engine_draining.labels(name).set(0)
        self._served_changed()
        await self.scraper.add(engine)
        await self.prober.add(engine)
        if name in self._entries and not self._entries[name].draining:
            self.health.hold(name, False)
        self.prober.publish()
        self.dispatcher.notify_load_changed()
        self.metrics.engine_changes.labels("added", source).inc()
        kind = f"{config.flavor} {config.role}, {config.dp_size} DP ranks"
        log.info("engine %s added (%s) by %s", name, kind, source)
        return self.status(name)

    def drain(self, name: str, source: ChangeSource) -> EngineStatus:
        """Place no new request on engine ``name``; those in flight go on. Draining a draining engine changes
        nothing.

        Raises:
            EngineSetError: 404, unknown engine.
        """
        entry = self._entry(name)
        if not entry.draining:
            entry.draining = True
            self.health.hold(name, True)
            self.metrics.engine_draining.labels(name).set(1)
            self.metrics.engine_changes.labels("drained", source).inc()
            self.dispatcher.notify_load_changed()  # the ranks' usability changed: whatever caches it must look again
            log.info("engine %s draining (%d requests in flight) by %s", name, self.view.engine_inflight(name), source)
        return self.status(name)

    def undrain(self, name: str, source: ChangeSource) -> EngineStatus:
        """Let engine ``name`` take new requests again (as its circuit breakers allow).

        Raises:
            EngineSetError: 404, unknown engine; 409, it is being removed.
        """
        entry = self._entry(name)
        if entry.removal is not None:
            raise EngineSetError(f"engine {name!r} is being removed", 409, "name")
        if entry.draining:
            entry.draining = False
            self.health.hold(name, False)
            self.metrics.engine_draining.labels(name).set(0)
            self.metrics.engine_changes.labels("undrained", source).inc()
            self.dispatcher.notify_load_changed()
            log.info("engine %s takes requests again by %s", name, source)
        return self.status(name)

    async def remove(self, name: str, source: ChangeSource, *, force: bool = False, wait: bool = False) -> bool:
        """Remove engine ``name``: drain it, then remove it once no request is in flight there (``force``: fail
        those in flight now, module docstring). Return whether it is gone on return; if not, its removal goes on in
        the background (``wait``: wait for it instead).

        Raises:
            EngineSetError: 404, unknown engine.
        """
        entry = self._entry(name)
        self.drain(name, source)
        if entry.removal is None:
            entry.removal = asyncio.create_task(self._remove_when_idle(name, source), name=f"engine-removal-{name}")
        removal = entry.removal
        if force:
            with self.client.abort(entry.engine.config.url):
                await self._idle(name, FORCED_REMOVAL_WAIT_S)
        if force or wait or self.view.engine_inflight(name) == 0:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(removal)
        return name not in self._entries

    async def _idle(self, name: str, timeout_s: float | None) -> None:
        """Wait until no request is in flight on engine ``name`` (at most ``timeout_s`` seconds, when given)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                # polled, not signalled: requests end on many paths (the relay, retries, a scheduler service's
                # events), and only a removal waits, so the request path carries no hook for it
                while self.view.engine_inflight(name):  # noqa: ASYNC110
                    await asyncio.sleep(REMOVAL_POLL_S)

    async def _remove_when_idle(self, name: str, source: ChangeSource) -> None:
        await self._idle(name, None)
        await self._forget(name, source)

    async def _forget(self, name: str, source: ChangeSource) -> None:
        """Take engine ``name`` out of every resource (its tasks stopped first, so none scrapes or probes it
        after)."""
        left = self.view.engine_inflight(name)
        if left:
            log.warning("engine %s removed with %d requests still counted in flight there", name, left)
        await self.scraper.remove(name)
        await self.prober.remove(name)
        self.view.remove_engine(name)
        self.health.remove_engine(name)
        self.dispatcher.scheduler.forget_engine(name)
        del self._entries[name]
        self.engines.pop(name, None)
        self.metrics.forget_engine(name)
        for listener in self.removed_listeners:
            listener(name)
        self._served_changed()
        self.dispatcher.notify_load_changed()
        self.metrics.engine_changes.labels("removed", source).inc()
        log.info("engine %s removed by %s", name, source)

    def _served_changed(self) -> None:
        """The served models follow the engines (in place: the front door reads the list per request)."""
        served: list[str] = []
        for entry in self._entries.values():
            served += [m for m in entry.engine.config.models if m not in served]
        self.models[:] = served

    async def apply(self, engines: Sequence[EngineConfig], source: ChangeSource) -> ReloadPlan:
        """Make the engine set ``engines`` (a validated configuration's list): engines not there are added, engines
        no longer listed are removed once drained, and an engine whose settings changed is drained, removed once
        idle and added again with its new settings. Returns at once for what must wait for requests in flight;
        additions are awaited (their first probe).

        Raises:
            EngineSetError: 400, the list does not fit the gateway's other settings.
        """
        self.check_fits(engines)
        plan = plan_reload(self.configs, engines)
        for name in plan.remove:
            await self.remove(name, source)
        for config in plan.replace:
            await self.remove(config.name, source)
            entry = self._entries.get(config.name)
            if entry is None:
                await self.add(config, source)
            else:
                assert entry.removal is not None
                entry.removal.add_done_callback(functools.partial(self._readd, config, source))
        for config in plan.add:
            await self.add(config, source)
        return plan

    def _readd(self, config: EngineConfig, source: ChangeSource, removal: asyncio.Task[None]) -> None:
        """Add ``config``'s engine again once the removal of its old settings is done (not when it was cancelled)."""
        if self._closing or removal.cancelled() or config.name in self._entries:
            return
        task = asyncio.get_running_loop().create_task(self.add(config, source), name=f"engine-add-{config.name}")
        self._adding.add(task)
        task.add_done_callback(self._adding.discard)

    async def aclose(self) -> None:
        """Stop every removal and addition still under way (the gateway is shutting down)."""
        self._closing = True
        tasks = [e.removal for e in self._entries.values() if e.removal is not None] + list(self._adding)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, EngineSetError):
                await task
