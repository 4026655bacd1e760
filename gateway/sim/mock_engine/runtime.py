"""The real-time driver of an :class:`~gateway.sim.engine_model.EngineModel`: the step loop.

One asyncio task (:meth:`EngineRuntime.run`) waits until the model has work, runs ``model.step()``, sleeps
the step's engine time divided by ``speed``, then delivers the step's tokens to per-request queues. Requests
submitted while a step is running join the next step (the one after with the model's ``join_lag_steps``), as
in a real engine (a step is non-preemptive). Tokens of requests aborted in the meantime are dropped. An
:class:`RuntimeObserver` (the metrics) sees every delivered token, abort and step, stamped with the wall clock.
"""

from __future__ import annotations

import asyncio
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
    ) -> GenerationHandle:
        """Queue a request on a DP rank; read its tokens from ``handle.events``. ``max_new_tokens`` (the request's
        ``max_tokens``) and ``ignore_eos`` are what the engine's admission may know of its output; ``prefix_blocks`` (of
        ``prefix_block_tokens`` tokens each) is what its prefix cache sees of the prompt.

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
        )
        handle = GenerationHandle(request_id, rank, prompt_tokens, output_tokens, finish_reason, self._clock())
        self._live[request_id] = handle
        self._wake.set()
        return handle

    def abort(self, handle: GenerationHandle) -> bool:
        """Abort a request unless it already finished: frees its KV, drops its undelivered tokens, tells the
        observer. Returns True if it was aborted, False if it had finished (or was already aborted)."""
        if handle.done:
            return False
        handle.done = True
        self._live.pop(handle.request_id, None)
        self.model.abort(handle.request_id)
        self._observer.on_abort(handle, self._clock())
        return True

    async def run(self) -> None:
        """The step loop; runs until cancelled."""
        self.running = True
        target = self._clock()
        try:
            while True:
                if not self.model.has_work():
                    self._observer.on_idle()
                    self._wake.clear()
                    await self._wake.wait()
                    target = self._clock()
                    continue
                started = self._clock()
                result = self.model.step()
                # Sleep to an absolute target so per-step overhead does not make the engine drift slow.
                target = max(target, started) + result.duration_s / self._speed
                await asyncio.sleep(max(0.0, target - self._clock()))
                now = self._clock()
                self._observer.on_step(result, now - started)
                self._deliver(result, now)
        finally:
            self.running = False

    def _deliver(self, result: StepResult, now: float) -> None:
        for event in result.tokens:
            handle = self._live.get(event.request_id)
            if handle is None:
                continue  # aborted while the step ran
            if event.finished:
                del self._live[event.request_id]
                handle.done = True
            self._observer.on_token(handle, event, now)
            handle.last_token_s = now
            handle.events.put_nowait(event)
