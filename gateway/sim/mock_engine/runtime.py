"""The real-time driver of an :class:`~gateway.sim.engine_model.EngineModel`: the step loop.

One asyncio task (:meth:`EngineRuntime.run`) waits until the model has work, runs ``model.step()``, sleeps
the step's engine time divided by ``speed``, then delivers the step's tokens to per-request queues. Requests
submitted while a step is running join the next step (the one after with the model's ``join_lag_steps``), as
in a real engine (a step is non-preemptive). Tokens of requests aborted in the meantime are dropped. An
:class:`RuntimeObserver` (the metrics) sees every delivered token, abort and step, stamped with the wall clock.

P/D disaggregation (an engine model whose ``role`` is prefill or decode): before each step, and while idle at the
model's next timed event, the loop calls :meth:`EngineModel.advance <gateway.sim.engine_model.EngineModel.advance>`
with the engine time (wall seconds since start times ``speed``), delivers the tokens it emits, and sets each P/D
decode handle's ``reserved`` and ``transferred`` events as its request gets its KV reservation and its KV.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.sim.engine_model import EngineModel, StepResult, TokenEvent


@dataclass(eq=False)
class GenerationHandle:
    """One request in flight through the runtime.

    Attributes:
        request_id: the id inside the model.
        rank: the DP rank serving it.
        prompt_tokens: prompt length, tokens.
        output_tokens: tokens it will generate, tokens.
        finish_reason: reported when it finishes (``"length"`` or ``"stop"``).
        arrival_s: wall-clock submission time, seconds (the runtime's clock).
        events: its tokens, in order, as the step loop delivers them.
        last_token_s: wall-clock time of its latest token, seconds, or None before the first.
        done: True once it finished or was aborted.
        finished: set once its last token was delivered (never for an aborted request).
        reserved: P/D decode: set once its KV is reserved (it left the pre-allocation queue).
        transferred: P/D decode: set once its KV has arrived (it decodes from now on).
    """

    request_id: str
    rank: int
    prompt_tokens: int
    output_tokens: int
    finish_reason: Literal["length", "stop"]
    arrival_s: float
    events: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)
    last_token_s: float | None = None
    done: bool = False
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    reserved: asyncio.Event = field(default_factory=asyncio.Event)
    transferred: asyncio.Event = field(default_factory=asyncio.Event)


_TIMER_SLACK_S = 1e-4
"""Wall seconds added to an idle wait for a timed P/D event, so that it is due when the loop wakes."""


class RuntimeObserver(Protocol):
    """Receives the runtime's events (implemented by the Prometheus metrics)."""

    def on_token(self, handle: GenerationHandle, event: TokenEvent, now_s: float) -> None:
        """A token was delivered; ``handle.last_token_s`` still holds the previous token's time."""

    def on_abort(self, handle: GenerationHandle, now_s: float) -> None:
        """A request was aborted before its last token was delivered."""

    def on_step(self, result: StepResult, wall_s: float) -> None:
        """A step ended after ``wall_s`` wall-clock seconds."""

    def on_idle(self) -> None:
        """The model ran out of work; the loop is waiting."""


class EngineRuntime:
    """Drives a model in real time, ``speed`` engine seconds per wall second.

    Args:
        model: the engine model (owned by the runtime from now on).
        speed: engine clock rate relative to wall time (> 0); 1.0 is real time.
        observer: receives tokens, aborts and steps.
        clock: wall clock, seconds (monotonic).

    Raises:
        ValueError: if ``speed <= 0``.
    """

    def __init__(
        self,
        model: EngineModel,
        speed: float,
        observer: RuntimeObserver,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.model = model
        self._speed = speed
        self._observer = observer
        self._clock = clock
        self._live: dict[str, GenerationHandle] = {}
        self._remote: dict[str, GenerationHandle] = {}  # P/D decode requests until their KV has arrived
        self._start = clock()
        self._wake = asyncio.Event()
        self._counter = 0
        self.running = False

    def submit(
        self,
        rank: int,
        prompt_tokens: int,
        output_tokens: int,
        finish_reason: Literal["length", "stop"],
        *,
        max_new_tokens: int | None = None,
        ignore_eos: bool = False,
        prefix_blocks: tuple[int, ...] = (),
        prefix_block_tokens: int = 1,
        hold_kv: bool = False,
        remote_prefill: bool = False,
    ) -> GenerationHandle:
        """Queue a request on a DP rank; read its tokens from ``handle.events``. ``max_new_tokens`` (the request's
        ``max_tokens``) and ``ignore_eos`` are what the engine's admission may know of its output; ``prefix_blocks`` (of
        ``prefix_block_tokens`` tokens each) is what its prefix cache sees of the prompt; ``hold_kv`` and
        ``remote_prefill`` as in :meth:`EngineModel.add_request <gateway.sim.engine_model.EngineModel.add_request>`.

        Raises:
            ValueError: from :meth:`EngineModel.add_request` (bad rank, request larger than a rank's KV).
        """
        self._counter += 1
        request_id = f"req-{self._counter}"
        self.model.add_request(
            request_id,
            rank,
            prompt_tokens,
            output_tokens,
            max_new_tokens=max_new_tokens,
            ignore_eos=ignore_eos,
            prefix_blocks=prefix_blocks,
            prefix_block_tokens=prefix_block_tokens,
            hold_kv=hold_kv,
            remote_prefill=remote_prefill,
        )
        handle = GenerationHandle(request_id, rank, prompt_tokens, output_tokens, finish_reason, self._clock())
        self._live[request_id] = handle
        if remote_prefill:
            self._remote[request_id] = handle
        self._wake.set()
        return handle

    def engine_now(self) -> float:
        """Engine time, seconds: wall seconds since the runtime was made times ``speed``."""
        return (self._clock() - self._start) * self._speed

    def kv_ready(self, handle: GenerationHandle) -> bool:
        """The prefill side has ``handle``'s KV: its transfer may start (:meth:`EngineModel.kv_ready`)."""
        ready = self.model.kv_ready(handle.request_id, self.engine_now())
        self._wake.set()
        return ready

    def recompute(self, handle: GenerationHandle) -> bool:
        """``handle``'s KV cannot be fetched: it prefills on its own rank instead (:meth:`EngineModel.recompute`)."""
        done = self.model.recompute(handle.request_id)
        if done:
            self._remote.pop(handle.request_id, None)
            handle.reserved.set()
            handle.transferred.set()
            self._wake.set()
        return done

    def release_held(self, handle: GenerationHandle) -> bool:
        """Free the KV a finished P/D prefill request holds (:meth:`EngineModel.release_held`)."""
        released = self.model.release_held(handle.request_id)
        self._wake.set()
        return released

    def holds(self, handle: GenerationHandle) -> bool:
        """Whether ``handle``'s finished P/D prefill request still holds its KV (not released, aborted or expired)."""
        return self.model.holds(handle.request_id)

    def abort(self, handle: GenerationHandle) -> bool:
        """Abort a request unless it already finished: frees its KV, drops its undelivered tokens, tells the
        observer. Returns True if it was aborted, False if it had finished (or was already aborted)."""
        if handle.done:
            return False
        handle.done = True
        self._live.pop(handle.request_id, None)
        self._remote.pop(handle.request_id, None)
        self.model.abort(handle.request_id)
        self._observer.on_abort(handle, self._clock())
        self._wake.set()
        return True

    async def run(self) -> None:
        """The step loop; runs until cancelled."""
        self.running = True
        target = self._clock()
        try:
            while True:
                self._advance()
                if not self.model.has_work():
                    self._observer.on_idle()
                    self._wake.clear()
                    await self._idle()
                    target = self._clock()
                    continue
                started = self._clock()
                result = self.model.step(self.engine_now())
                # Sleep to an absolute target so per-step overhead does not make the engine drift slow.
                target = max(target, started) + result.duration_s / self._speed
                await asyncio.sleep(max(0.0, target - self._clock()))
                now = self._clock()
                self._observer.on_step(result, now - started)
                self._deliver(result, now)
        finally:
            self.running = False

    async def _idle(self) -> None:
        """Wait for a wake-up, or until the model's next timed P/D event."""
        event_s = self.model.next_event_s()
        if event_s is None:
            await self._wake.wait()
            return
        timeout = max(0.0, (event_s - self.engine_now()) / self._speed) + _TIMER_SLACK_S
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    def _advance(self) -> None:
        """Bring the model's P/D queues to the engine time; deliver their tokens and wake their handles."""
        if self.model.config.role == "mixed":
            return
        tokens = self.model.advance(self.engine_now())
        for request_id, handle in list(self._remote.items()):
            phase = self.model.pd_phase(request_id)
            if phase != "prealloc":
                handle.reserved.set()
            if phase not in ("prealloc", "transfer"):
                handle.transferred.set()
                del self._remote[request_id]
        self._deliver_tokens(tokens, self._clock())

    def _deliver(self, result: StepResult, now: float) -> None:
        self._deliver_tokens(result.tokens, now)

    def _deliver_tokens(self, tokens: list[TokenEvent], now: float) -> None:
        for event in tokens:
            handle = self._live.get(event.request_id)
            if handle is None:
                continue  # aborted while the step ran
            if event.finished:
                del self._live[event.request_id]
                handle.done = True
                handle.finished.set()
            self._observer.on_token(handle, event, now)
            handle.last_token_s = now
            handle.events.put_nowait(event)
