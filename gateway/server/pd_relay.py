"""Sending a P/D request as its two legs, and trying again with a new pair while it fails before any byte reached
the client.

Each attempt is planned by the protocol's module of :mod:`gateway.pd` with the placement's prefill and decode
ranks: SGLang's bootstrap protocol and vLLM's MooncakeConnector send both legs at once, vLLM's NixlConnector the
prefill leg first and the decode leg with the ``kv_transfer_params`` its answer carries. The client's answer,
streamed or assembled (:mod:`gateway.server.assemble`), is the decode leg's; the prefill leg's answer is read
whole and dropped (NIXL: parsed for the decode leg), and its arrival tells the dispatcher the prompt left the
prefill rank.

Failure semantics (the P/D bug the peers' users report most, ``docs/design.md`` §4.4): a decode leg left alone
waits for a KV transfer that never comes (SGLang: up to its 300 s bootstrap timeout) and a prefill leg left alone
holds its KV for a decode that never pulls it, so

- when one leg fails before the decode leg's answer began, the other is cancelled at once (its connection
  closed, which makes the engine abort it);
- the attempt is then tried again, up to ``upstream.max_attempts`` tries with the backoff and throttling of
  :mod:`gateway.server.retry` (one decision for plain and P/D tries, :func:`~gateway.server.retry.next_try`), as a
  new attempt: a new bootstrap room, transfer id and upstream request id, on a pair the dispatcher chooses again
  avoiding the rank whose leg failed (SGLang's retraction 503 on the decode leg is a 5xx like any other);
- a client that goes away cancels the attempt, which cancels both legs;
- every leg is bounded by the gateway's own ``upstream`` timeouts.

A prefill leg still running once the decode leg's answer began is left to finish (its KV has been handed over)
and cancelled when the client's answer ends (:meth:`StartedAnswer.end_prefill_leg
<gateway.server.retry.StartedAnswer.end_prefill_leg>`). An engine's 4xx on either leg is the client's answer,
after cancelling the other leg. vLLM requests with ``n > 1`` are not split (the KV handoff is single-consumer,
:func:`gateway.pd.vllm_nixl.supports`): they run whole on the decode rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from gateway.config import EngineConfig
from gateway.dispatch import Placement
from gateway.engines.client import UpstreamResponse
from gateway.errors import UpstreamError, UpstreamStatusError, UpstreamTimeoutError
from gateway.pd import DecodeSide, Leg, PdProtocolError, PrefillSide, sglang_bootstrap, vllm_mooncake, vllm_nixl
from gateway.server.headers import upstream_request_headers
from gateway.server.retry import Consume, StartedAnswer, begin_answer, next_try
from gateway.server.state import GatewayState
from gateway.types import PendingRequest, RankKey

log = logging.getLogger(__name__)

PdProtocol = Literal["sglang", "nixl", "mooncake"]
LegName = Literal["prefill", "decode"]

MOONCAKE_QUERY_PATH = "/query"
"""The vLLM Mooncake bootstrap server's listing of each DP rank's engine id (vLLM 0.34
``mooncake/mooncake_utils.py``, ``MooncakeBootstrapServer``)."""
MOONCAKE_QUERY_MAX_BYTES = 1 << 20
"""Largest ``/query`` body read, bytes (a few hundred bytes per DP rank)."""


def protocol_of(engine: EngineConfig) -> PdProtocol:
    """The P/D protocol a prefill or decode engine speaks: SGLang's bootstrap, or its vLLM KV connector.

    Raises:
        ValueError: a vLLM engine without ``kv_connector`` (a mixed engine).
    """
    if engine.flavor == "sglang":
        return "sglang"
    if engine.kv_connector is None:
        raise ValueError(f"engine {engine.name} has no kv_connector")
    return engine.kv_connector


class LegFailed(Exception):
    """One leg of an attempt failed (the other is cancelled by whoever catches this).

    Attributes:
        leg: ``prefill`` or ``decode``.
        key: the rank the leg was sent to.
        error: the failure, as the client would get it if no retry follows.
        kind: the ``kind`` label of ``gateway_pd_leg_failures_total``.
    """

    def __init__(self, leg: LegName, key: RankKey, error: UpstreamError, kind: str | None = None) -> None:
        super().__init__(f"{leg} leg on {key} failed: {error.message}")
        self.leg = leg
        self.key = key
        self.error = error
        self.kind = kind or error.failure_kind


async def send_pd(
    state: GatewayState,
    pending: PendingRequest,
    placement: Placement,
    path: str,
    body: dict[str, Any],
    request_id: str,
    consume: Consume | None = None,
) -> StartedAnswer:
    """Send a P/D request as its two legs and, while an attempt fails before any byte reached the client, try again
    on a new pair (see the module docstring).

    Args:
        state: the running gateway.
        pending: the request as placed (its ``request_id`` is the gateway's key in the load view).
        placement: its prefill rank (``rank``) and decode rank (``decode_rank``).
        path: the engine endpoint, e.g. ``/v1/chat/completions``.
        body: the JSON body the decode leg answers (the client's, or a copy asking for a stream).
        request_id: the client's ``X-Request-Id``; each attempt's legs carry ``<it>-<12 hex digits>``.
        consume: reads the decode leg's stream whole within the attempt (an assembled non-streamed answer).

    Returns:
        The decode leg's started answer (or an engine's 4xx answer on either leg), with the prefill leg still
        running, if it is, in :attr:`~gateway.server.retry.StartedAnswer.prefill_leg`.

    Raises:
        GatewayError: the last attempt's failure, or no other pair is usable for a retry.
    """
    failed: set[RankKey] = set()
    tries = 1
    while True:
        protocol = protocol_of(state.engines[placement.rank.engine].config)
        try:
            answer = await _attempt(state, pending, placement, protocol, path, body, request_id, consume)
        except LegFailed as exc:
            state.metrics.pd_leg_failures.labels(exc.key.engine, exc.leg, exc.kind).inc()
            state.metrics.pd_transfers.labels(protocol, f"{exc.leg}_failed").inc()
            if protocol == "mooncake":
                state.mooncake_engine_ids.pop(placement.rank.engine, None)
            # a non-streamed decode leg that timed out has used its whole total_timeout_s
            total_spent = isinstance(exc.error, UpstreamTimeoutError) and exc.leg == "decode" and not pending.stream
            try:
                placement = await next_try(state, pending, exc.key, exc.error, tries, failed, total_spent=total_spent)
            except UpstreamError as error:
                raise error from None
            log.info("request %s: P/D attempt %d failed (%s); retrying on %s", request_id, tries, exc, placement)
            tries += 1
        except asyncio.CancelledError:
            state.metrics.pd_transfers.labels(protocol, "cancelled").inc()
            state.dispatcher.finish(pending.request_id)
            raise
        except BaseException:
            state.dispatcher.finish(pending.request_id)
            raise
        else:
            state.retry_throttle.on_success()
            return answer


async def _attempt(
    state: GatewayState,
    pending: PendingRequest,
    placement: Placement,
    protocol: PdProtocol,
    path: str,
    body: dict[str, Any],
    request_id: str,
    consume: Consume | None,
) -> StartedAnswer:
    """One attempt on the placement's pair.

    Raises:
        LegFailed: a leg failed before the decode leg's answer began (the other leg is cancelled by then).
    """
    prefill_key, decode_key = placement.rank, placement.decode_rank
    if decode_key is None:
        raise ValueError(f"request {pending.request_id} has no decode rank")
    attempt_id = f"{request_id}-{uuid.uuid4().hex[:12]}"
    metrics = state.metrics.pd_transfers
    if protocol != "sglang" and not vllm_nixl.supports(body):
        whole = Leg(dict(body))
        state.engines[decode_key.engine].adapter.pin_rank(whole.body, whole.headers, decode_key.rank)
        answer = await _decode_leg(state, decode_key, path, whole, attempt_id)
        await _consume(answer, consume)
        metrics.labels(protocol, "whole").inc()
        return answer
    prefill_config = state.engines[prefill_key.engine].config
    host, port = prefill_config.bootstrap_address or (urlsplit(prefill_config.url).hostname or "", None)
    prefill = PrefillSide(prefill_key.engine, prefill_key.rank, prefill_config.dp_size, host, port)
    decode = DecodeSide(decode_key.engine, decode_key.rank)
    plan: sglang_bootstrap.SglangBootstrapAttempt | vllm_nixl.NixlAttempt | vllm_mooncake.MooncakeAttempt
    if protocol == "sglang":
        pin = state.settings.pd.prefill_policy != "follow_bootstrap_room"
        plan = sglang_bootstrap.attempt(body, prefill, decode, state.pd_rng, pin_prefill=pin)
    elif protocol == "nixl":
        plan = vllm_nixl.attempt(body, prefill, decode, attempt_id)
    else:
        engine_ids = await _mooncake_engine_ids(state, prefill_key)
        try:
            plan = vllm_mooncake.attempt(body, prefill, decode, engine_ids)
        except PdProtocolError as exc:
            raise LegFailed("prefill", prefill_key, UpstreamError(str(exc)), "protocol") from exc
    prefill_task = asyncio.create_task(_prefill_leg(state, prefill_key, path, plan.prefill, attempt_id, pending))
    decode_task: asyncio.Task[StartedAnswer] | None = None
    try:
        if plan.concurrent:
            decode_task = asyncio.create_task(_decode_leg(state, decode_key, path, plan.decode(), attempt_id))
            answer = await _race(prefill_task, decode_task)
        else:
            prefill_answer = await prefill_task
            if prefill_answer.upstream.status != 200:
                answer = prefill_answer
            else:
                decode_leg = _nixl_decode_leg(plan, prefill_key, prefill_answer.body)
                decode_task = asyncio.create_task(_decode_leg(state, decode_key, path, decode_leg, attempt_id))
                answer = await decode_task
        if answer.upstream.status == 200:
            await _consume(answer, consume)
    except BaseException:
        await _cancel(prefill_task, decode_task)
        raise
    if answer.upstream.status != 200:  # an engine's 4xx: the client's answer; the other leg has no use
        await _cancel(prefill_task, decode_task)
        metrics.labels(protocol, "rejected").inc()
        return answer
    metrics.labels(protocol, "ok").inc()
    if not prefill_task.done():
        prefill_task.add_done_callback(lambda task: _late_prefill(state, prefill_key, task))
        answer.prefill_leg = prefill_task
    return answer


async def _race(prefill: asyncio.Task[StartedAnswer], decode: asyncio.Task[StartedAnswer]) -> StartedAnswer:
    """Wait for the decode leg's answer to begin while the prefill leg runs; return it, or the prefill leg's 4xx
    answer. A failed leg raises its :class:`LegFailed` at once (the caller cancels the other)."""
    waiting: set[asyncio.Task[StartedAnswer]] = {prefill, decode}
    while True:
        done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if decode in done and decode.exception() is None:
            return decode.result()
        if prefill in done:
            answer = prefill.result()  # raises its LegFailed
            if answer.upstream.status != 200:
                return answer
        if decode in done:
            return decode.result()  # raises its LegFailed


def _nixl_decode_leg(plan: Any, prefill_key: RankKey, raw: bytes) -> Leg:
    """The NIXL decode leg from the prefill leg's JSON answer.

    Raises:
        LegFailed: the answer is not JSON or carries no ``kv_transfer_params`` (kind ``protocol``).
    """
    try:
        parsed = json.loads(raw)
        if not isinstance(parsed, dict):
            raise PdProtocolError("the prefill answer is not a JSON object")
        leg = plan.decode(parsed)
    except (ValueError, PdProtocolError) as exc:
        raise LegFailed("prefill", prefill_key, UpstreamError(f"unusable prefill answer: {exc}"), "protocol") from exc
    assert isinstance(leg, Leg)
    return leg


async def _consume(answer: StartedAnswer, consume: Consume | None) -> None:
    """Read a started decode stream whole with ``consume`` (assembly), within the attempt.

    Raises:
        LegFailed: the stream broke, stalled or carried a 5xx error event.
    """
    if consume is None or answer.first_chunk is None:
        return
    try:
        await consume(answer)
    except UpstreamError as exc:
        answer.upstream.close()
        raise LegFailed("decode", answer.key, exc) from exc
    finally:
        answer.upstream.close()


async def _cancel(*tasks: asyncio.Task[StartedAnswer] | None) -> None:
    """Cancel the legs still running and wait for them to close their connections."""
    legs = [task for task in tasks if task is not None]
    for leg in legs:
        leg.cancel()
    for leg in legs:
        with contextlib.suppress(asyncio.CancelledError, LegFailed, UpstreamError):
            await leg


def _late_prefill(state: GatewayState, key: RankKey, task: asyncio.Task[StartedAnswer]) -> None:
    """A prefill leg that ended after the decode leg's answer began: a failure is counted (kind ``late``), not
    retried (the client has its answer)."""
    if task.cancelled():
        return
    exc = task.exception()
    if isinstance(exc, LegFailed):
        state.metrics.pd_leg_failures.labels(key.engine, "prefill", "late").inc()
        log.warning("prefill leg on %s failed after its decode leg began: %s", key, exc.error.message)


async def _post(state: GatewayState, key: RankKey, path: str, leg: Leg, request_id: str) -> UpstreamResponse:
    """POST one leg (its body and headers as planned; the pins are in them) and wait for the answer's headers."""
    config = state.settings.upstream
    headers = upstream_request_headers(request_id) | leg.headers
    stream = leg.body.get("stream") is True
    return await state.client.post_json(
        state.engines[key.engine].url(path),
        json.dumps(leg.body, ensure_ascii=False).encode(),
        headers,
        headers_timeout_s=config.first_byte_timeout_s if stream else config.total_timeout_s,
        total_timeout_s=config.total_timeout_s,
    )


async def _prefill_leg(
    state: GatewayState, key: RankKey, path: str, leg: Leg, request_id: str, pending: PendingRequest
) -> StartedAnswer:
    """Send the prefill leg and read its answer whole (dropped but for NIXL's ``kv_transfer_params``); a 200 tells
    the dispatcher the prompt left the prefill rank.

    Raises:
        LegFailed: unreachable, timed out, broken, or HTTP 5xx.
    """
    try:
        upstream = await _post(state, key, path, leg, request_id)
        try:
            raw = await upstream.read()
        finally:
            upstream.close()
    except UpstreamError as exc:
        raise LegFailed("prefill", key, exc) from exc
    if upstream.status >= 500:
        error = UpstreamStatusError(
            upstream.status, state.engines[key.engine].adapter.normalize_error(upstream.status, raw)
        )
        raise LegFailed("prefill", key, error)
    if upstream.status == 200:
        state.health.record_success(key, state.clock())
        state.dispatcher.first_token(pending.request_id, key.engine)
    return StartedAnswer(key, upstream, body=raw)


async def _decode_leg(state: GatewayState, key: RankKey, path: str, leg: Leg, request_id: str) -> StartedAnswer:
    """Send the decode leg and wait for its answer to begin: a 200 stream's first chunk, or any other answer whole.

    Raises:
        LegFailed: unreachable, timed out, broken before its first chunk, or HTTP 5xx.
    """
    config = state.settings.upstream
    first_byte_by = asyncio.get_running_loop().time() + config.first_byte_timeout_s
    try:
        upstream = await _post(state, key, path, leg, request_id)
    except UpstreamError as exc:
        raise LegFailed("decode", key, exc) from exc
    try:
        answer = await begin_answer(state, key, upstream, leg.body.get("stream") is True, first_byte_by)
    except UpstreamError as exc:
        upstream.close()
        raise LegFailed("decode", key, exc) from exc
    except BaseException:
        upstream.close()
        raise
    state.health.record_success(key, state.clock())
    return answer


async def _mooncake_engine_ids(state: GatewayState, key: RankKey) -> Mapping[int, str]:
    """The prefill engine's ``{dp_rank: engine_id}`` from its Mooncake bootstrap server's ``GET /query``, cached
    per engine until an attempt on it fails.

    Raises:
        LegFailed: the server cannot be read (the prefill leg's failure; kind ``protocol`` for a bad body).
    """
    cached = state.mooncake_engine_ids.get(key.engine)
    if cached is not None and key.rank in cached:
        return cached
    address = state.engines[key.engine].config.bootstrap_address
    if address is None:
        raise ValueError(f"engine {key.engine} has no Mooncake bootstrap server")
    host, port = address
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}{MOONCAKE_QUERY_PATH}"
    try:
        text = await state.client.get_text(url, state.settings.scrape.timeout_s, MOONCAKE_QUERY_MAX_BYTES)
        ids = vllm_mooncake.parse_query(text)
    except UpstreamError as exc:
        raise LegFailed("prefill", key, exc) from exc
    except PdProtocolError as exc:
        raise LegFailed("prefill", key, UpstreamError(str(exc)), "protocol") from exc
    state.mooncake_engine_ids[key.engine] = ids
    return ids
