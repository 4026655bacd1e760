"""Sending a request to its DP rank and, while it fails before any byte reached the client, to other ranks.

A try has failed when the engine cannot be reached, times out, answers HTTP 5xx, or (streams) breaks off before
its first event; an answer that is not streamed is read whole before anything is sent on, so one that breaks
off before its end is tried again too, and so is a stream read whole by a ``consume`` callback (the non-streamed
answer the gateway assembles from a stream, :mod:`gateway.server.assemble`). Every failed try feeds the circuit breakers
(:class:`~gateway.load.health.HealthBook`) and the retry throttle (:class:`~gateway.load.health.RetryThrottle`);
what it counts as comes from its error class (``failure_kind``, ``blame``; see :mod:`gateway.errors`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from gateway.dispatch import Placement
from gateway.engines.client import UpstreamResponse
from gateway.errors import GatewayError, UpstreamError, UpstreamStatusError, UpstreamTimeoutError
from gateway.load.health import BreakerState
from gateway.logs import request_log
from gateway.server import fastjson
from gateway.server.assemble import error_event_status, leading_error
from gateway.server.headers import upstream_request_headers
from gateway.server.state import GatewayState
from gateway.types import PendingRequest, RankKey

log = logging.getLogger(__name__)


@dataclass(slots=True)
class StartedAnswer:
    """A request whose answer has begun at an engine: the rank, the response, and either (streams) its first
    chunk or (anything else) its whole body.

    Attributes:
        prefill_leg: a P/D request's prefill leg still running once the decode leg's answer began
            (:mod:`gateway.server.pd_relay`); ended by :meth:`end_prefill_leg` when the client's answer ends.
    """

    key: RankKey
    upstream: UpstreamResponse
    first_chunk: bytes | None = None
    body: bytes = b""
    prefill_leg: asyncio.Task[Any] | None = None

    def end_prefill_leg(self) -> None:
        """Cancel the prefill leg if it still runs (its connection is closed, so the engine aborts it)."""
        if self.prefill_leg is not None and not self.prefill_leg.done():
            self.prefill_leg.cancel()


def backoff_s(tries: int, rng: random.Random, *, base_s: float, max_s: float) -> float:
    """The wait before the next try after ``tries`` failed ones, seconds: exponential backoff with full jitter,
    uniform in ``[0, min(max_s, base_s * 2**tries)]`` (M. Brooker, "Exponential Backoff And Jitter", AWS
    Architecture Blog, 2015)."""
    return rng.uniform(0, min(max_s, base_s * 2**tries))


Consume = Callable[[StartedAnswer], Awaitable[None]]
"""Reads a started stream to its end within its try (raising :class:`~gateway.errors.UpstreamError` if it
breaks, which fails the try)."""


async def begin_answer(
    state: GatewayState, key: RankKey, upstream: UpstreamResponse, stream: bool, first_byte_by: float
) -> StartedAnswer:
    """Read an engine's answer on ``key`` until it has begun: for a 200 stream (``stream`` asked) its first chunk,
    leaving the response open; any other answer whole, the response closed (nothing is sent to the client before
    the whole answer is in, so a broken body fails the try too).

    Args:
        first_byte_by: the event-loop time the first chunk must arrive by (``upstream.first_byte_timeout_s``).

    Raises:
        UpstreamStatusError: the engine answered HTTP 5xx, or its stream opened with an error event of a 5xx code
            (:func:`~gateway.server.assemble.leading_error`); the body is read, the response left to the caller to
            close.
        UpstreamError: the stream ended or timed out before its first chunk.
    """
    adapter = state.engines[key.engine].adapter
    if upstream.status >= 500:
        raw = await upstream.read()
        raise UpstreamStatusError(upstream.status, adapter.normalize_error(upstream.status, raw))
    answer = StartedAnswer(key, upstream)
    if upstream.status == 200 and stream and "text/event-stream" in upstream.content_type:
        first = await upstream.next_chunk(max(0.0, first_byte_by - asyncio.get_running_loop().time()))
        if not first:
            raise UpstreamError("the engine closed the stream before its first event")
        failed = leading_error(first)
        if failed is not None and (status := error_event_status(failed[0])) >= 500:
            raise UpstreamStatusError(status, adapter.normalize_error(status, failed[1]))
        answer.first_chunk = first
    else:
        answer.body = await upstream.read()
        upstream.close()
    return answer


async def send_with_retries(
    state: GatewayState,
    pending: PendingRequest,
    key: RankKey,
    path: str,
    body: dict[str, object],
    request_id: str,
    consume: Consume | None = None,
) -> StartedAnswer:
    """Send the request to ``key`` and, while it fails before any byte reached the client, to other ranks.

    At most ``upstream.max_attempts`` tries, with :func:`backoff_s` between them, and none while retry
    throttling is engaged. The request is released from the load view after each failed try and after the last
    one (the caller releases it once the answer is over). A 5xx on the last try is answered with the engine's
    own error body; any other status is returned as it is.

    Args:
        state: the running gateway.
        pending: the request as placed (its ``request_id`` is the gateway's key in the load view).
        key: the DP rank it was placed on.
        path: the engine endpoint, e.g. ``/v1/chat/completions``.
        body: the client's JSON body (each try pins its own copy to its rank).
        request_id: the client's ``X-Request-Id`` (logged and sent upstream).
        consume: for a stream nothing of which is relayed, reads it whole within the try (the response is then
            closed when the answer is returned).

    Raises:
        GatewayError: the last try failed (its error), or no other rank is usable for a retry (the previous
            try's error).
    """
    failed: set[RankKey] = set()
    tries = 1
    while True:
        try:
            return await try_once(state, key, pending.stream, path, body, request_id, consume)
        except UpstreamError as exc:
            # nothing reached the client yet, so any failure may be retried; but a non-streamed request that
            # timed out has used its whole total_timeout_s
            total_spent = isinstance(exc, UpstreamTimeoutError) and not pending.stream
            placement = await next_try(state, pending, key, exc, tries, failed, total_spent=total_spent)
            log.info("request %s: retrying on %s after %s failed: %s", request_id, placement.rank, key, exc.message)
            key = placement.rank
            tries += 1
        except BaseException:
            state.dispatcher.finish(pending.request_id)
            raise


async def next_try(
    state: GatewayState,
    pending: PendingRequest,
    key: RankKey,
    error: UpstreamError,
    tries: int,
    failed: set[RankKey],
    *,
    total_spent: bool = False,
) -> Placement:
    """After the ``tries``-th try of ``pending`` failed on ``key`` with ``error`` before any byte reached the
    client: release it from the load view, count the failure (:func:`record_failure`), and either give up or wait
    the backoff (:func:`backoff_s`) and place it again, avoiding the ranks in ``failed``.

    ``failed`` gains ``key``. The placement is the dispatcher's (:meth:`~gateway.dispatch.Dispatcher.retry_placement`,
    which prefers engines with no failed rank; a new pair for a P/D request); the retry is counted in
    ``gateway_upstream_retries_total`` and the request log names its rank.

    Args:
        total_spent: the try used the request's whole ``upstream.total_timeout_s`` (no retry).

    Raises:
        UpstreamError: ``error``, when this was the last try (``upstream.max_attempts``), ``total_spent``, retry
            throttling is engaged, or no other rank is usable.
    """
    config = state.settings.upstream
    state.dispatcher.finish(pending.request_id)
    record_failure(state, key, error)
    final = tries >= config.max_attempts or total_spent
    if not final and not state.retry_throttle.allows_retry():
        state.metrics.retries_throttled.inc()
        final = True
    if final:
        raise error
    failed.add(key)
    wait_s = backoff_s(tries, state.retry_rng, base_s=config.retry_backoff_s, max_s=config.retry_backoff_max_s)
    await asyncio.sleep(wait_s)
    try:
        placement = state.dispatcher.retry_placement(pending, failed)
    except GatewayError:
        raise error from None
    state.metrics.upstream_retries.labels(key.engine).inc()
    log_entry = request_log()
    log_entry.engine, log_entry.rank = placement.rank.engine, placement.rank.rank
    return placement


def record_failure(state: GatewayState, key: RankKey, exc: UpstreamError) -> None:
    """Feed a failed try on ``key`` to the circuit breakers, the retry throttle and
    ``gateway_upstream_failures_total``.

    A try sent before the breaker it blames opened (an engine that died under the requests it was serving) does
    not take a retry token: its breaker ignores it too (:meth:`~gateway.load.health.CircuitBreaker.record_failure`),
    and the failure is one fault already known, not more evidence that retries would only add load (gRFC A6's
    reason to throttle).
    """
    now = state.clock()
    breaker = state.health.engine(key.engine) if exc.blame == "engine" else state.health.rank(key)
    known = breaker.state(now) is BreakerState.OPEN
    state.metrics.upstream_failures.labels(key.engine, exc.failure_kind).inc()
    if not known:
        state.retry_throttle.on_failure()
    state.health.record_failure(key, exc.blame, now)
    state.prober.publish()


async def try_once(
    state: GatewayState,
    key: RankKey,
    stream: bool,
    path: str,
    body: dict[str, object],
    request_id: str,
    consume: Consume | None = None,
) -> StartedAnswer:
    """One try on ``key``: send, wait for the headers and, for a 200 stream, for its first chunk (then, with
    ``consume``, for the rest of it); read any other answer whole.

    Raises:
        UpstreamStatusError: the engine answered HTTP 5xx (the body is read, the response closed).
        UpstreamError: the engine could not be reached, timed out, or the stream broke before its first chunk
            (with ``consume``: before its end).
    """
    config = state.settings.upstream
    engine = state.engines[key.engine]
    headers = upstream_request_headers(request_id)
    sent = dict(body)
    engine.adapter.pin_rank(sent, headers, key.rank)
    payload = fastjson.dumps(sent)
    headers_timeout = config.first_byte_timeout_s if stream else config.total_timeout_s
    first_byte_by = asyncio.get_running_loop().time() + config.first_byte_timeout_s
    upstream = await state.client.post_json(
        engine.url(path), payload, headers, headers_timeout_s=headers_timeout, total_timeout_s=config.total_timeout_s
    )
    try:
        answer = await begin_answer(state, key, upstream, stream, first_byte_by)
        if answer.first_chunk is not None and consume is not None:
            await consume(answer)
            upstream.close()
    except BaseException:
        upstream.close()
        raise
    state.health.record_success(key, state.clock())
    state.retry_throttle.on_success()
    return answer
