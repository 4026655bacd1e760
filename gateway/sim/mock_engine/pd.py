"""P/D disaggregation in the simulated engines: the prefill and decode legs of SGLang's bootstrap protocol and vLLM's
NixlConnector, and the KV handoff between a prefill mock and a decode mock.

The legs are what :mod:`gateway.pd` sends (its module docstrings give the wire contracts); the engine model runs
each role (:mod:`gateway.sim.engine.pd`). The engines move KV over RDMA and rendezvous through a bootstrap server
(SGLang, ``--disaggregation-bootstrap-port``, default 8998) or a per-rank NIXL side channel (vLLM,
``VLLM_NIXL_SIDE_CHANNEL_PORT`` + DP index, default 5600). The mocks rendezvous over HTTP on the prefill mock's own
port, under ``/_sim/pd/``, so that a test runs both mocks in one process with nothing else to start: the gateway is
configured with the prefill mock's HTTP port as its bootstrap port (SGLang), and the prefill mock answers
``remote_port`` = its HTTP port + DP rank (vLLM's rule, with its HTTP port as the side-channel base); the decode mock
takes the rank from ``remote_engine_id`` (``{engine_id}_dp{rank}``) to find the base again.

SGLang (0.5.23), ``gateway mock-engine --flavor sglang --role prefill|decode``:

- Both legs need ``bootstrap_room``; without it the request is refused with HTTP 400 "Invalid request:
  Disaggregated request received without bootstrap room id." (``managers/scheduler.py``). Errors are rendered as
  SGLang renders an aborted request (``entrypoints/openai/serving_base.py``): non-streamed, that status with
  ``{"object": "error", "message", "type", "param", "code"}``, type ``"BadRequestError"`` for 400 and ``"500"`` for
  500; streamed, HTTP 200 and one ``data: {"error": {...}}`` event (type ``"BAD_REQUEST"`` /
  ``"INTERNAL_SERVER_ERROR"``) then ``data: [DONE]``.
- Prefill rank: ``routed_dp_rank`` (or the deprecated ``data_parallel_rank``) first, else ``bootstrap_room %
  dp_size`` (``follow_bootstrap_room``, the P/D prefill default; ``managers/data_parallel_controller.py``
  ``maybe_external_dp_rank_routing``, ``follow_bootstrap_room_scheduler``). An explicit rank that disagrees with the
  room, on a request without ``disagg_prefill_dp_rank``, and a room already used are refused with HTTP 500
  "Prefill bootstrap failed for request rank=<p> req.rid=... req.bootstrap_room=<room> with exception
  KVTransferError(bootstrap_room=<room>): follow_bootstrap_room conflict: ..." / "...: Duplicate or cancelled
  bootstrap room" (``disaggregation/common/conn.py`` ``CommonKVSender.__init__``, ``disaggregation/prefill.py``
  ``handle_bootstrap_failure``). With ``force_query_prefill_dp_rank`` (SGLang's
  ``SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1``) the prefill registers the rank it was given instead of
  refusing it; ``/server_info`` reports ``load_balance_method`` ``follow_bootstrap_room`` either way.
- The prefill starts once the decode side has reserved KV and connected (no optimistic prefill, SGLang's default
  ``--optimistic-prefill-attempts 0``); it waits at most ``pd_timeout_s`` for that
  (``SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT``, 300 s; then "Request <room> timed out after <t>s in
  KVPoll.Bootstrapping"). It finishes at its first token and holds the KV; it answers (one token,
  ``finish_reason`` ``"length"``) only when the decode side has fetched the KV, as SGLang answers a prefill request
  from its inflight queue once the transfer succeeded (``process_disagg_prefill_inflight_queue``).
- Decode rank: ``routed_dp_rank`` else round robin. It queues for its KV reservation, finds the prefill rank
  (``disagg_prefill_dp_rank``, else 0 on a one-rank prefill, else ``bootstrap_room % prefill dp_size``;
  ``DecodePreallocQueue._resolve_prefill_dp_rank``), connects to the prefill mock and waits at most
  ``pd_timeout_s`` (``SGLANG_DISAGGREGATION_WAITING_TIMEOUT``, 300 s) for the KV; then transfers it and decodes. A
  failure is HTTP 500 "Decode transfer failed for request rank=<d> decode_req.req.rid=...
  decode_req.req.bootstrap_room=<room> with exception KVTransferError(bootstrap_room=<room>): <reason>"
  (``decode.py``); an unreachable bootstrap server "Decode handshake failed ...: Could not fetch prefill parallel
  info from bootstrap_addr: <host>:<port>".
- An aborted decode request tells its prefill (SGLang's ``CommonKVReceiver.abort`` sends ``ABORT`` to the prefill,
  which fails the room: "Prefill transfer failed ...: Failed due to an unknown reason from another rank"); an
  aborted prefill request does not tell the decode (``CommonKVSender.abort`` records the failure locally), which
  waits out its timeout.

vLLM (0.34), ``gateway mock-engine --flavor vllm --role prefill|decode``, both ranks pinned by
``X-data-parallel-rank``:

- Prefill: a request with ``kv_transfer_params.do_remote_decode`` finishes at its first token, answers at once with
  top-level ``kv_transfer_params`` (``do_remote_prefill: true``, ``do_remote_decode: false``, ``remote_block_ids``
  as one list per KV cache group, ``remote_engine_id`` ``{engine_id}_dp{rank}``, ``remote_request_id``,
  ``remote_host``, ``remote_port``, ``tp_size``, ``dcp_size``, ``pp_size``, ``remote_num_tokens``,
  ``remote_blocks_expiry_time``, ``remote_registration_generation``, ``transfer_mode: "pull"``;
  ``nixl/pull_scheduler.py`` ``request_finished``) and holds the blocks until the decode side has read them or the
  lease (30 s, ``kv_lease_duration``) expires. Without the params a request runs whole, as vLLM runs it.
- Decode: a request with ``kv_transfer_params.do_remote_prefill`` reserves its prompt's blocks, reads them from the
  prefill mock, transfers them and decodes. Blocks unknown or expired on the prefill side, or a prefill that cannot
  be reached, is a KV load failure: with ``kv_load_failure_policy`` ``"fail"`` (vLLM's default,
  ``vllm/config/kv_transfer.py``) the request ends with HTTP 500 ``{"error": {"message": "Internal server error",
  "type": "InternalServerError", ...}}`` (streamed: one ``data: {"error": ...}`` event, then ``data: [DONE]``), as a
  ``finish_reason="error"`` request does (``entrypoints/generate/base/serving.py`` ``_raise_if_error``); with
  ``"recompute"`` it prefills on its decode rank.

vLLM (0.34) with ``kv_connector="mooncake"`` (``gateway mock-engine --flavor vllm --kv-connector mooncake``), both
ranks pinned by ``X-data-parallel-rank``:

- Prefill: a request with ``kv_transfer_params.do_remote_decode`` and a ``transfer_id`` finishes at its first token,
  answers at once (no ``kv_transfer_params``: ``MooncakeConnectorScheduler.request_finished`` returns none) and holds
  its KV until the decode side has pulled it or ``VLLM_MOONCAKE_ABORT_REQUEST_TIMEOUT`` (480 s) has passed; without
  a ``transfer_id`` (vLLM logs "Missing transfer_id in kv_transfer_params from router!") it runs whole and holds
  nothing. ``GET /query`` answers what its bootstrap server (``VLLM_MOONCAKE_BOOTSTRAP_PORT``, 8998, served here
  on the HTTP port) lists: per DP rank its engine id ``{engine_id}_dp{rank}`` and worker address.
- Decode: a request with ``do_remote_prefill``, ``remote_engine_id``, ``remote_bootstrap_addr`` and ``transfer_id``
  reserves its prompt's blocks, asks the bootstrap's ``/query`` (once per address) for the worker of
  ``remote_engine_id``, pulls the KV (waiting at most 480 s for the prefill; the legs may go in either order), then
  decodes; a failure follows ``kv_load_failure_policy`` as for NIXL. Without those fields vLLM warns "Got invalid
  KVTransferParams" and the request runs whole on the decode rank, as here.
- An aborted prefill drops its transfer silently (vLLM pops its send entry): a pull waiting for it times out.

Faults (``PUT /_sim/faults``, :mod:`gateway.sim.mock_engine.faults`): ``http_500`` and ``hang`` apply to every P/D
leg; ``kill_mid_stream``, ``end_without_done`` and ``stall_mid_stream`` to the legs answered as a generation (all but
SGLang's prefill answer); ``transfer_fail`` breaks a decode leg's KV transfer once the prefill has the KV.

Simplifications (where the mocks differ from the engines): the KV moves at the engine model's bandwidth with no
contention; a reused room is refused whatever the allocation policy (SGLang 0.5.23 detects it only under
``--disaggregation-decode-allocation-policy prefill_complete``) and on any rank; the refusal of a conflicting
rank, a reused room or a missing room is answered at once; the SGLang prefill answer carries no
``input_token_logprobs`` for the router to merge; ``force_query_prefill_dp_rank`` is the prefill side of that
setting only: a decode request without ``disagg_prefill_dp_rank`` still takes ``bootstrap_room % prefill dp_size``
(SGLang's decode under the setting queries the bootstrap server's ``/query_dp_ranks``).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Literal

import httpx
from fastapi import Request, Response
from fastapi.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from gateway.sim.mock_engine.faults import GenerateFault, HangResponse, wait_for_disconnect
from gateway.sim.mock_engine.protocol import (
    GenerationRequest,
    ProtocolError,
    completion_response,
    final_chunks,
    sse_event,
    token_chunks,
    usage_chunk,
)
from gateway.sim.mock_engine.response import GenerationResponse
from gateway.sim.mock_engine.runtime import GenerationHandle

if TYPE_CHECKING:
    from gateway.sim.mock_engine.app import _MockEngine

Role = Literal["mixed", "prefill", "decode"]
"""What a simulated engine serves: everything, or one side of P/D disaggregation."""

KvConnector = Literal["nixl", "mooncake"]
"""vLLM's KV connector under P/D: NixlConnector or MooncakeConnector."""

KvLoadFailurePolicy = Literal["fail", "recompute"]
"""vLLM's ``kv_load_failure_policy`` (0.34 ``vllm/config/kv_transfer.py``, default ``"fail"``)."""

DEFAULT_PD_TIMEOUT_S = 300.0
"""SGLang's ``SGLANG_DISAGGREGATION_BOOTSTRAP_TIMEOUT`` and ``SGLANG_DISAGGREGATION_WAITING_TIMEOUT`` defaults,
seconds (0.5.23 ``sglang/srt/environ.py``)."""

VLLM_BLOCK_IDS_PER_GROUP = 16
"""Tokens per KV block in the block ids the vLLM prefill mock answers (vLLM's default block size)."""

_HTTP_SLACK_S = 5.0
"""Seconds a decode mock's long-poll to the prefill mock waits beyond the handoff timeout before giving up."""


def sglang_error(status: int, message: str, stream: bool) -> Response:
    """An aborted request as SGLang 0.5.23 answers it (see the module docstring)."""
    if stream:
        kind = "BAD_REQUEST" if status == 400 else "INTERNAL_SERVER_ERROR"
        error = {"object": "error", "message": message, "type": kind, "param": None, "code": status}
        body = sse_event({"error": error}) + sse_event("[DONE]")
        return Response(body, media_type="text/event-stream")
    kind = "BadRequestError" if status == 400 else str(status)
    return JSONResponse(
        {"object": "error", "message": message, "type": kind, "param": None, "code": status}, status_code=status
    )


def vllm_generation_error(stream: bool) -> Response:
    """vLLM 0.34's answer to a request that finished with ``finish_reason="error"`` (a KV load failure under
    ``kv_load_failure_policy="fail"``)."""
    error = {"message": "Internal server error", "type": "InternalServerError", "param": None, "code": 500}
    if stream:
        return Response(sse_event({"error": error}) + sse_event("[DONE]"), media_type="text/event-stream")
    return JSONResponse({"error": error}, status_code=500)


def kv_transfer_error(room: int, reason: str) -> str:
    """``str(KVTransferError(room, reason))`` (sglang/srt/disaggregation/common/conn.py)."""
    return f"KVTransferError(bootstrap_room={room}): {reason}"


def conflict_reason(rank: int, room: int, dp_size: int) -> str:
    """SGLang 0.5.23's ``follow_bootstrap_room`` conflict (``CommonKVSender.__init__``)."""
    return (
        f"follow_bootstrap_room conflict: dispatched to dp_rank {rank} but bootstrap_room {room} implies dp_rank "
        f"{room % dp_size}. Set SGLANG_DISAGGREGATION_FORCE_QUERY_PREFILL_DP_RANK=1 to allow mixed routing."
    )


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Hang(Exception):
    """The request is to hang (an injected fault)."""


@dataclass(eq=False)
class _Room:
    """One SGLang handoff on the prefill mock, keyed by (room, prefill rank)."""

    decode_connected: asyncio.Event = field(default_factory=asyncio.Event)
    kv_ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str | None = None
    prompt_tokens: int = 0
    has_prefill: bool = False  # a prefill leg owns it (and removes it when it ends)

    def fail(self, reason: str) -> None:
        if self.failure is None and not self.done.is_set():
            self.failure = reason
        for event in (self.decode_connected, self.kv_ready, self.done):
            event.set()


@dataclass(eq=False)
class _Blocks:
    """What a vLLM prefill mock holds for one request until the decode side has read it."""

    handle: GenerationHandle
    engine_id: str
    reading: bool = False


@dataclass(eq=False)
class _Transfer:
    """One vLLM Mooncake transfer on the prefill mock, keyed by transfer id; a pull may come before its prefill."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    handle: GenerationHandle | None = None
    pulled: bool = False


class PdEngine:
    """The P/D side of one simulated engine (see the module docstring).

    Args:
        engine: the simulated engine (its config, runtime, model and per-rank counters).
    """

    def __init__(self, engine: _MockEngine) -> None:
        self.engine = engine
        cfg = engine.config
        self.role: Role = cfg.role
        self.engine_id = cfg.engine_id or str(uuid.uuid4())
        self.transfers_completed = [0] * cfg.dp_size
        self.transfers_failed = [0] * cfg.dp_size
        self._rooms: dict[tuple[int, int], _Room] = {}
        self._rooms_seen: set[int] = set()
        self._bootstrapping = [0] * cfg.dp_size  # SGLang prefill: waiting for the decode side to connect
        self._decode_rooms: set[int] = set()
        self._blocks: dict[str, _Blocks] = {}
        self._prefill_dp_sizes: dict[str, int] = {}
        self._transfers: dict[str, _Transfer] = {}  # vLLM Mooncake prefill: by transfer id
        self._queries: dict[str, dict[str, Any]] = {}  # vLLM Mooncake decode: /query by bootstrap address
        self._client: httpx.AsyncClient | None = None
        self._fault: GenerateFault = "ok"  # the injected fault of the request being accepted
        self._tasks: set[asyncio.Task[None]] = set()
        self.dead = False  # killed (gateway.sim.mock_engine.faults.killable_server): it notifies no one any more

    # --- lifecycle and figures ---------------------------------------------------------------------------------

    async def close(self) -> None:
        """Finish the notifications under way and close the HTTP client towards prefill mocks."""
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(10.0))
        return self._client

    def bootstrap_queue(self, rank: int) -> int:
        """SGLang prefill: requests on ``rank`` waiting for their decode side to connect."""
        return self._bootstrapping[rank]

    def counters(self) -> dict[str, list[int] | int]:
        """Per-rank KV transfers completed and failed (prefill: KV handed over; decode: KV received), the SGLang
        prefill legs waiting for their decode side (``bootstrapping``, per rank), and the handoffs this mock still
        keeps state for (``handoffs``: SGLang rooms and decode rooms, vLLM NIXL blocks, Mooncake transfers)."""
        self.expire_blocks()
        self.expire_transfers()
        handoffs = len(self._rooms) + len(self._decode_rooms) + len(self._blocks) + len(self._transfers)
        return {
            "transfers_completed": self.transfers_completed,
            "transfers_failed": self.transfers_failed,
            "bootstrapping": list(self._bootstrapping),
            "handoffs": handoffs,
        }

    def info(self) -> dict[str, Any]:
        """``GET /_sim/pd/info``: the prefill's parallel info the decode side reads (SGLang's bootstrap ``/route``
        stand-in)."""
        cfg = self.engine.config
        return {"role": self.role, "flavor": cfg.flavor, "dp_size": cfg.dp_size, "follow_bootstrap_room": True}

    # --- the legs ----------------------------------------------------------------------------------------------

    async def generate(self, request: Request, req: GenerationRequest, body: dict[str, Any]) -> Response:
        """Answer one generation request on a prefill or decode mock (with the injected faults of
        :mod:`gateway.sim.mock_engine.faults`)."""
        try:
            return self._generate(request, req, body)
        except ProtocolError as exc:
            return self.engine.error(exc)
        except _Hang:
            return HangResponse()

    def _generate(self, request: Request, req: GenerationRequest, body: dict[str, Any]) -> Response:
        cfg = self.engine.config
        if cfg.flavor == "sglang":
            room = _int(body.get("bootstrap_room"))
            if room is None:
                rid = uuid.uuid4().hex
                message = f"Invalid request: Disaggregated request received without bootstrap room id. req.rid='{rid}'"
                return sglang_error(400, message, req.stream)
            if self.role == "prefill":
                return self._sglang_prefill(req, body, room)
            return self._sglang_decode(req, body, room)
        params = body.get("kv_transfer_params")
        params = params if isinstance(params, dict) else {}
        if cfg.kv_connector == "mooncake":
            if self.role == "prefill" and params.get("do_remote_decode") and params.get("transfer_id"):
                return self._mooncake_prefill(req, str(params["transfer_id"]))
            if (
                self.role == "decode"
                and params.get("do_remote_prefill")
                and all(params.get(p) for p in ("remote_engine_id", "remote_bootstrap_addr", "transfer_id"))
            ):
                return self._mooncake_decode(req, params)
            return self._plain(req)
        if self.role == "prefill" and params.get("do_remote_decode"):
            return self._nixl_prefill(request, req)
        if self.role == "decode" and params.get("do_remote_prefill"):
            return self._nixl_decode(req, params)
        return self._plain(req)

    def _rank(self, req: GenerationRequest, default: Callable[[], int]) -> int:
        rank = req.rank if req.rank is not None else default()
        (self.engine.placed if req.rank is None else self.engine.pinned)[rank] += 1
        self._fault = self.engine.faults.request_fault(rank)
        if self._fault == "http_500":
            raise ProtocolError(500, "injected fault: internal error", "InternalServerError")
        if self._fault == "hang":
            raise _Hang
        return rank

    def _submit(self, req: GenerationRequest, rank: int, **kwargs: Any) -> GenerationHandle:
        """Submit ``req`` on ``rank``. A request that prefills here (all but a decode leg's) looks its prompt up
        in the rank's prefix cache, as a mixed engine's does: SGLang's prefill server keeps its radix cache, and
        its decode server has none unless ``--disaggregation-decode-enable-radix-cache`` (0.5.23
        ``disaggregation/decode.py``); vLLM's prefix caching is on in both roles, but a decode leg's KV comes
        whole from the prefill."""
        prefix: dict[str, Any] = {}
        if not kwargs.get("remote_prefill"):
            prefix = {"prefix_blocks": req.prefix_blocks, "prefix_block_tokens": self.engine.prefix_block_tokens or 1}
        try:
            return self.engine.runtime.submit(
                rank,
                req.prompt_tokens,
                req.output_tokens,
                req.finish_reason,
                max_new_tokens=req.max_tokens,
                ignore_eos=req.ignore_eos,
                **prefix,
                **kwargs,
            )
        except ValueError as exc:
            raise ProtocolError(400, str(exc), "BadRequestError", "max_tokens") from exc

    def _response(self, req: GenerationRequest, handle: GenerationHandle, **kwargs: Any) -> GenerationResponse:
        prefix = "chatcmpl" if req.kind == "chat" else "cmpl"
        fault = "ok" if self._fault == "transfer_fail" else self._fault
        after = self.engine.faults.plan.after_chunks
        return GenerationResponse(
            self.engine.runtime, handle, req, f"{prefix}-{uuid.uuid4().hex}", int(time.time()), fault, after, **kwargs
        )

    def _plain(self, req: GenerationRequest) -> Response:
        rank = self._rank(req, self.engine.pick_rank)
        try:
            handle = self._submit(req, rank)
        except ProtocolError as exc:
            return self.engine.error(exc)
        return self._response(req, handle)

    # --- SGLang ------------------------------------------------------------------------------------------------

    def _sglang_prefill(self, req: GenerationRequest, body: dict[str, Any], room: int) -> Response:
        dp_size = self.engine.config.dp_size
        rank = self._rank(req, lambda: room % dp_size)
        rid = uuid.uuid4().hex
        reason = None
        if room in self._rooms_seen:
            reason = "Duplicate or cancelled bootstrap room"
        elif (
            dp_size > 1
            and body.get("disagg_prefill_dp_rank") is None
            and rank != room % dp_size
            and not self.engine.config.force_query_prefill_dp_rank
        ):
            reason = conflict_reason(rank, room, dp_size)
        self._rooms_seen.add(room)
        if reason is not None:
            self.transfers_failed[rank] += 1
            return sglang_error(500, self._prefill_failure("bootstrap", rank, rid, room, reason), req.stream)
        state = self._rooms.setdefault((room, rank), _Room())
        state.prompt_tokens = req.prompt_tokens
        state.has_prefill = True
        one_token = replace(req, output_tokens=1, finish_reason="length")
        return SglangPrefillResponse(self, one_token, room, rank, rid, state)

    def _prefill_failure(self, stage: str, rank: int, rid: str, room: int, reason: str) -> str:
        return (
            f"Prefill {stage} failed for request rank={rank} req.rid='{rid}' req.bootstrap_room={room} with "
            f"exception {kv_transfer_error(room, reason)}"
        )

    def _sglang_decode(self, req: GenerationRequest, body: dict[str, Any], room: int) -> Response:
        rank = self._rank(req, self.engine.model.pick_rank_round_robin)
        broken = self._fault == "transfer_fail"
        rid = uuid.uuid4().hex

        def failure(stage: str, reason: str) -> str:
            return (
                f"Decode {stage} failed for request rank={rank} decode_req.req.rid='{rid}' "
                f"decode_req.req.bootstrap_room={room} with exception {kv_transfer_error(room, reason)}"
            )

        if room in self._decode_rooms:
            self.transfers_failed[rank] += 1
            return sglang_error(500, failure("handshake", "Duplicate decode bootstrap room"), req.stream)
        try:
            handle = self._submit(req, rank, remote_prefill=True)
        except ProtocolError as exc:
            return self.engine.error(exc)
        self._decode_rooms.add(room)
        host, port = body.get("bootstrap_host"), _int(body.get("bootstrap_port"))
        addr = f"{host}:{port}"
        prefill_rank = _int(body.get("disagg_prefill_dp_rank"))
        timeout_s = self.engine.config.handoff_timeout_s
        connected: dict[str, Any] = {}  # the prefill rank once connected; "done" once the KV has arrived

        async def handoff() -> Response | None:
            await handle.reserved.wait()
            p = prefill_rank
            try:
                if p is None:
                    dp = await self._prefill_dp_size(f"http://{addr}")
                    p = 0 if dp == 1 else room % dp
                answer = await self.client().post(
                    f"http://{addr}/_sim/pd/sglang/connect",
                    json={"room": room, "rank": p, "timeout_s": timeout_s},
                    timeout=timeout_s + _HTTP_SLACK_S,
                )
            except (httpx.HTTPError, ValueError):
                self.transfers_failed[rank] += 1
                message = failure("handshake", f"Could not fetch prefill parallel info from bootstrap_addr: {addr}")
                return sglang_error(500, message, req.stream)
            if answer.status_code != 200:
                self.transfers_failed[rank] += 1
                reason = answer.json().get("reason", "KV transfer failed")
                return sglang_error(500, failure("transfer", reason), req.stream)
            if broken:  # injected: the transfer breaks; both sides fail it
                self.transfers_failed[rank] += 1
                await self._notify(f"http://{addr}/_sim/pd/sglang/abort", {"room": room, "rank": p})
                reason = "Failed due to an unknown reason from another rank"
                return sglang_error(500, failure("transfer", reason), req.stream)
            connected["rank"] = p
            self.engine.runtime.kv_ready(handle)
            await handle.transferred.wait()
            self.transfers_completed[rank] += 1
            connected["done"] = True
            await self._notify(f"http://{addr}/_sim/pd/sglang/done", {"room": room, "rank": p})
            return None

        def cleanup() -> None:
            self._decode_rooms.discard(room)
            if "rank" in connected and "done" not in connected:  # aborted while fetching: tell the prefill
                self._background(f"http://{addr}/_sim/pd/sglang/abort", {"room": room, "rank": connected["rank"]})

        return self._response(req, handle, prepare=handoff, cleanup=cleanup)

    async def _prefill_dp_size(self, base: str) -> int:
        """The prefill mock's DP size, asked once per bootstrap address (SGLang caches ``prefill_info_table``)."""
        if base not in self._prefill_dp_sizes:
            answer = await self.client().get(f"{base}/_sim/pd/info")
            answer.raise_for_status()
            self._prefill_dp_sizes[base] = int(answer.json()["dp_size"])
        return self._prefill_dp_sizes[base]

    def _background(self, url: str, payload: dict[str, Any]) -> None:
        """:meth:`_notify` from synchronous code (a response's cleanup), without waiting."""
        task = asyncio.get_running_loop().create_task(self._notify(url, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _pull(self, url: str, payload: dict[str, Any], timeout_s: float | None = None) -> bool:
        """POST a vLLM decode mock's KV read to its prefill mock; whether it answered 200 (``timeout_s``: the
        client's default when ``None``)."""
        try:
            if timeout_s is None:
                answer = await self.client().post(url, json=payload)
            else:
                answer = await self.client().post(url, json=payload, timeout=timeout_s)
        except httpx.HTTPError:
            return False
        return answer.status_code == 200

    async def _hand_over(
        self,
        ok: bool,
        req: GenerationRequest,
        handle: GenerationHandle,
        rank: int,
        reading: dict[str, bool],
        done_url: str,
        done_payload: dict[str, Any],
    ) -> Response | None:
        """What a vLLM decode mock does once its KV read ended (``ok``: it succeeded): on failure, recompute the
        prefill under ``kv_load_failure_policy="recompute"`` or answer vLLM's generation error; on success, let the
        model take the KV, wait for the transfer and tell the prefill mock at ``done_url``. ``reading`` holds
        ``"now"`` while the transfer runs (the request's cleanup reads it)."""
        if not ok:
            self.transfers_failed[rank] += 1
            policy = self.engine.config.kv_load_failure_policy
            if policy == "recompute" and self.engine.runtime.recompute(handle):
                return None
            return vllm_generation_error(req.stream)
        reading["now"] = True
        self.engine.runtime.kv_ready(handle)
        await handle.transferred.wait()
        self.transfers_completed[rank] += 1
        del reading["now"]
        await self._notify(done_url, done_payload)
        return None

    async def _notify(self, url: str, payload: dict[str, Any]) -> None:
        """Best-effort POST to a prefill mock (its failure is the prefill's to see); none once :attr:`dead`."""
        if self.dead:
            return
        try:
            await self.client().post(url, json=payload)
        except httpx.HTTPError:
            return

    async def sglang_connect(self, request: Request) -> Response:
        """``POST /_sim/pd/sglang/connect`` ``{room, rank, timeout_s}`` on a prefill mock: the decode side has
        reserved KV for the room on prefill rank ``rank`` and waits for it. 200 ``{"prompt_tokens"}`` once the
        prefill has the KV; 410 ``{"reason"}`` if the prefill failed; 504 ``{"reason"}`` after ``timeout_s``. A
        decode side that leaves while waiting is an abort notification: the room fails."""
        payload = await request.json()
        room, rank, timeout_s = int(payload["room"]), int(payload["rank"]), float(payload["timeout_s"])
        state = self._rooms.setdefault((room, rank), _Room())
        state.decode_connected.set()
        started = time.monotonic()
        waiter = asyncio.ensure_future(asyncio.wait_for(state.kv_ready.wait(), timeout_s))
        gone = asyncio.ensure_future(wait_for_disconnect(request.receive))
        try:
            await asyncio.wait({waiter, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not state.has_prefill and not state.kv_ready.is_set() and self._rooms.get((room, rank)) is state:
                del self._rooms[room, rank]  # no prefill leg came: forget the room
        if not waiter.done():
            waiter.cancel()
            state.fail("Failed due to an unknown reason from another rank")
            return JSONResponse({"reason": "aborted by the decode side"}, status_code=499)
        if waiter.exception() is not None:
            elapsed = time.monotonic() - started
            reason = f"Request {room} timed out after {elapsed:.1f}s in KVPoll.WaitingForInput"
            if self._rooms.get((room, rank)) is state and state.failure is None:
                state.fail(reason)
            return JSONResponse({"reason": reason}, status_code=504)
        if state.failure is not None:
            return JSONResponse({"reason": state.failure}, status_code=410)
        return JSONResponse({"prompt_tokens": state.prompt_tokens})

    async def sglang_done(self, request: Request) -> dict[str, bool]:
        """``POST /_sim/pd/sglang/done`` ``{room, rank}``: the decode side has the room's KV."""
        payload = await request.json()
        state = self._rooms.get((int(payload["room"]), int(payload["rank"])))
        if state is not None:
            state.done.set()
        return {"found": state is not None}

    async def sglang_abort(self, request: Request) -> dict[str, bool]:
        """``POST /_sim/pd/sglang/abort`` ``{room, rank}``: the decode side aborted the room (SGLang's ``ABORT``
        notification): the prefill fails it."""
        payload = await request.json()
        state = self._rooms.get((int(payload["room"]), int(payload["rank"])))
        if state is not None:
            state.fail("Failed due to an unknown reason from another rank")
        return {"found": state is not None}

    # --- vLLM NIXL ---------------------------------------------------------------------------------------------

    def _nixl_prefill(self, request: Request, req: GenerationRequest) -> Response:
        rank = self._rank(req, self.engine.pick_rank)
        try:
            handle = self._submit(replace(req, output_tokens=1), rank, hold_kv=True)
        except ProtocolError as exc:
            return self.engine.error(exc)
        request_id = f"{request.headers.get('x-request-id') or uuid.uuid4().hex}-{handle.request_id}"
        engine_id = f"{self.engine_id}_dp{rank}"
        self._blocks[request_id] = _Blocks(handle, engine_id)
        host, port = request.scope.get("server") or ("127.0.0.1", 0)
        blocks = -(-req.prompt_tokens // VLLM_BLOCK_IDS_PER_GROUP)
        first_block = int(handle.request_id.rsplit("-", 1)[-1]) * 100_000
        lease = self.engine.model.config.kv_lease_s or 0.0

        def params() -> dict[str, Any]:
            return {
                "kv_transfer_params": {
                    "do_remote_prefill": True,
                    "do_remote_decode": False,
                    "remote_block_ids": [list(range(first_block, first_block + blocks))],
                    "remote_engine_id": engine_id,
                    "remote_request_id": request_id,
                    "remote_host": host,
                    "remote_port": port + rank,
                    "tp_size": 1,
                    "dcp_size": 1,
                    "pp_size": 1,
                    "remote_num_tokens": req.prompt_tokens,
                    "remote_blocks_expiry_time": time.perf_counter() + lease,
                    "remote_registration_generation": 0,
                    "transfer_mode": "pull",
                }
            }

        def cleanup() -> None:
            blocks_entry = self._blocks.get(request_id)
            if blocks_entry is not None and not self.engine.runtime.holds(handle):
                self._blocks.pop(request_id, None)

        return self._response(req, handle, extra=params, cleanup=cleanup)

    async def nixl_read(self, request: Request) -> Response:
        """``POST /_sim/pd/nixl/read`` ``{remote_request_id, remote_engine_id}`` on a prefill mock (the NIXL side
        channel's stand-in): 200 ``{"prompt_tokens"}`` if the blocks are still held, 404 if unknown, released or
        expired."""
        payload = await request.json()
        self.expire_blocks()
        entry = self._blocks.get(str(payload.get("remote_request_id")))
        if (
            entry is None
            or entry.engine_id != payload.get("remote_engine_id")
            or entry.reading
            or not self.engine.runtime.holds(entry.handle)
        ):
            return JSONResponse({"detail": "unknown or expired blocks"}, status_code=404)
        entry.reading = True
        return JSONResponse({"prompt_tokens": entry.handle.prompt_tokens})

    async def nixl_done(self, request: Request) -> dict[str, bool]:
        """``POST /_sim/pd/nixl/done`` ``{remote_request_id, aborted?}``: the decode side has the blocks (or gave
        up on them, ``aborted``); free them."""
        payload = await request.json()
        entry = self._blocks.pop(str(payload.get("remote_request_id")), None)
        if entry is None:
            return {"found": False}
        if self.engine.runtime.release_held(entry.handle):
            counter = self.transfers_failed if payload.get("aborted") else self.transfers_completed
            counter[entry.handle.rank] += 1
        return {"found": True}

    def expire_blocks(self) -> None:
        """Forget the vLLM blocks whose lease expired (counted as failed transfers)."""
        for request_id, entry in list(self._blocks.items()):
            if entry.handle.done and not entry.reading and not self.engine.runtime.holds(entry.handle):
                del self._blocks[request_id]
                self.transfers_failed[entry.handle.rank] += 1

    def _nixl_decode(self, req: GenerationRequest, params: dict[str, Any]) -> Response:
        rank = self._rank(req, self.engine.pick_rank)
        try:
            handle = self._submit(req, rank, remote_prefill=True)
        except ProtocolError as exc:
            return self.engine.error(exc)
        broken = self._fault == "transfer_fail"
        base = _side_channel(params)
        done_payload: dict[str, Any] = {"remote_request_id": params.get("remote_request_id")}
        reading: dict[str, bool] = {}

        async def handoff() -> Response | None:
            await handle.reserved.wait()
            ok = (
                base is not None
                and not broken
                and await self._pull(
                    f"{base}/_sim/pd/nixl/read",
                    {
                        "remote_request_id": params.get("remote_request_id"),
                        "remote_engine_id": params.get("remote_engine_id"),
                    },
                )
            )
            return await self._hand_over(ok, req, handle, rank, reading, f"{base}/_sim/pd/nixl/done", done_payload)

        def cleanup() -> None:
            if reading:  # aborted while reading: the prefill frees its blocks (vLLM notifies it with no blocks)
                self._background(f"{base}/_sim/pd/nixl/done", done_payload | {"aborted": True})

        return self._response(req, handle, prepare=handoff, cleanup=cleanup)

    # --- vLLM Mooncake -----------------------------------------------------------------------------------------

    async def mooncake_query(self, request: Request) -> dict[str, Any]:
        """``GET /query``: what vLLM's ``MooncakeBootstrapServer`` lists, one entry per DP rank,
        ``{"<dp_rank>": {"engine_id": "{engine_id}_dp{rank}", "worker_addr": {"0": {"0": "<host>:<port>"}}}}``
        (0.34 ``mooncake/mooncake_utils.py``); the worker address is this mock's HTTP address."""
        host, port = request.scope.get("server") or ("127.0.0.1", 0)
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return {
            str(rank): {"engine_id": f"{self.engine_id}_dp{rank}", "worker_addr": {"0": {"0": addr}}}
            for rank in range(self.engine.config.dp_size)
        }

    def _mooncake_prefill(self, req: GenerationRequest, transfer_id: str) -> Response:
        rank = self._rank(req, self.engine.pick_rank)
        try:
            handle = self._submit(replace(req, output_tokens=1), rank, hold_kv=True)
        except ProtocolError as exc:
            return self.engine.error(exc)
        entry = self._transfers.setdefault(transfer_id, _Transfer())
        entry.handle = handle
        entry.arrived.set()

        def cleanup() -> None:
            # aborted before it finished: forgotten (vLLM drops its send entry; a waiting pull times out)
            if not handle.finished.is_set() and self._transfers.get(transfer_id) is entry:
                del self._transfers[transfer_id]

        return self._response(req, handle, cleanup=cleanup)

    async def mooncake_pull(self, request: Request) -> Response:
        """``POST /_sim/pd/mooncake/pull`` ``{transfer_id, timeout_s}`` on a prefill mock (the Mooncake transfer's
        stand-in): waits at most ``timeout_s`` for the prefill of that transfer to finish, then 200
        ``{"prompt_tokens"}``; 504 "Timeout waiting for P side ready." or 410 "KV expired on P side before the
        pull." as vLLM 0.34 reports them (``MooncakeConnectorWorker``)."""
        payload = await request.json()
        transfer_id, timeout_s = str(payload["transfer_id"]), float(payload["timeout_s"])
        entry = self._transfers.setdefault(transfer_id, _Transfer())

        async def ready() -> GenerationHandle:
            await entry.arrived.wait()
            assert entry.handle is not None
            await entry.handle.finished.wait()
            return entry.handle

        try:
            handle = await asyncio.wait_for(ready(), timeout_s)
        except TimeoutError:
            if self._transfers.get(transfer_id) is entry and entry.handle is None:
                del self._transfers[transfer_id]
            return JSONResponse({"reason": "Timeout waiting for P side ready."}, status_code=504)
        if entry.pulled or not self.engine.runtime.holds(handle):
            self._transfers.pop(transfer_id, None)
            return JSONResponse({"reason": "KV expired on P side before the pull."}, status_code=410)
        entry.pulled = True
        return JSONResponse({"prompt_tokens": handle.prompt_tokens})

    async def mooncake_done(self, request: Request) -> dict[str, bool]:
        """``POST /_sim/pd/mooncake/done`` ``{transfer_id, aborted?}``: the decode side has the KV (or gave up on
        it); free it."""
        payload = await request.json()
        entry = self._transfers.pop(str(payload.get("transfer_id")), None)
        if entry is None or entry.handle is None:
            return {"found": False}
        if self.engine.runtime.release_held(entry.handle):
            counter = self.transfers_failed if payload.get("aborted") else self.transfers_completed
            counter[entry.handle.rank] += 1
        return {"found": True}

    def expire_transfers(self) -> None:
        """Forget the Mooncake transfers whose prefill KV expired unpulled (counted as failed)."""
        for transfer_id, entry in list(self._transfers.items()):
            handle = entry.handle
            if handle is not None and handle.finished.is_set() and not self.engine.runtime.holds(handle):
                del self._transfers[transfer_id]
                if not entry.pulled:
                    self.transfers_failed[handle.rank] += 1

    async def _mooncake_worker(self, bootstrap: str, engine_id: str) -> str | None:
        """The base URL of the prefill rank ``engine_id`` from its bootstrap server's ``/query`` (asked once per
        bootstrap address, as vLLM caches it), or None."""
        if bootstrap not in self._queries:
            try:
                answer = await self.client().get(f"{bootstrap}/query")
                answer.raise_for_status()
                self._queries[bootstrap] = answer.json()
            except (httpx.HTTPError, ValueError):
                return None
        for entry in self._queries[bootstrap].values():
            if isinstance(entry, dict) and entry.get("engine_id") == engine_id:
                addr = entry.get("worker_addr", {}).get("0", {}).get("0")
                return f"http://{addr}" if isinstance(addr, str) else None
        return None

    def _mooncake_decode(self, req: GenerationRequest, params: dict[str, Any]) -> Response:
        rank = self._rank(req, self.engine.pick_rank)
        try:
            handle = self._submit(req, rank, remote_prefill=True)
        except ProtocolError as exc:
            return self.engine.error(exc)
        broken = self._fault == "transfer_fail"
        timeout_s = self.engine.config.handoff_timeout_s
        transfer_id = str(params["transfer_id"])
        worker: dict[str, str] = {}
        reading: dict[str, bool] = {}

        async def handoff() -> Response | None:
            await handle.reserved.wait()
            base = await self._mooncake_worker(str(params["remote_bootstrap_addr"]), str(params["remote_engine_id"]))
            ok = False
            if base is not None and not broken:
                worker["base"] = base
                ok = await self._pull(
                    f"{base}/_sim/pd/mooncake/pull",
                    {"transfer_id": transfer_id, "timeout_s": timeout_s},
                    timeout_s + _HTTP_SLACK_S,
                )
            done_url = f"{worker.get('base')}/_sim/pd/mooncake/done"
            return await self._hand_over(ok, req, handle, rank, reading, done_url, {"transfer_id": transfer_id})

        def cleanup() -> None:
            if reading:
                self._background(
                    f"{worker['base']}/_sim/pd/mooncake/done", {"transfer_id": transfer_id, "aborted": True}
                )

        return self._response(req, handle, prepare=handoff, cleanup=cleanup)


def _side_channel(params: dict[str, Any]) -> str | None:
    """The prefill mock's base URL from vLLM's ``kv_transfer_params`` (see the module docstring), or None."""
    engine_id, host, port = params.get("remote_engine_id"), params.get("remote_host"), _int(params.get("remote_port"))
    if not isinstance(engine_id, str) or not isinstance(host, str) or port is None or "_dp" not in engine_id:
        return None
    rank = engine_id.rsplit("_dp", 1)[1]
    if not rank.isdigit():
        return None
    host = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"http://{host}:{port - int(rank)}"


class SglangPrefillResponse(Response):
    """The prefill leg of SGLang's bootstrap protocol (see the module docstring): wait for the decode side, prefill,
    hold the KV until the decode side has it, then answer one token (or the failure)."""

    def __init__(self, pd: PdEngine, req: GenerationRequest, room: int, rank: int, rid: str, state: _Room) -> None:
        self.status_code = 200
        self.background = None
        self.init_headers()
        self._pd, self._req, self._room, self._rank, self._rid, self._state = pd, req, room, rank, rid, state
        self._handle: GenerationHandle | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pd, state = self._pd, self._state
        produce = asyncio.ensure_future(self._run())
        watch = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({produce, watch}, return_when=asyncio.FIRST_COMPLETED)
            if produce.done():
                response = produce.result()
                await response(scope, receive, send)
        finally:
            for task in (produce, watch):
                task.cancel()
            await asyncio.gather(produce, watch, return_exceptions=True)
            if self._handle is not None:
                pd.engine.runtime.abort(self._handle)
                pd.engine.runtime.release_held(self._handle)
            if pd._rooms.get((self._room, self._rank)) is state:
                del pd._rooms[self._room, self._rank]

    async def _run(self) -> Response:
        pd, state, req, rank = self._pd, self._state, self._req, self._rank
        timeout_s = pd.engine.config.handoff_timeout_s
        started = time.monotonic()
        pd._bootstrapping[rank] += 1
        try:
            try:
                await asyncio.wait_for(state.decode_connected.wait(), timeout_s)
            except TimeoutError:
                elapsed = time.monotonic() - started
                state.fail(f"Request {self._room} timed out after {elapsed:.1f}s in KVPoll.Bootstrapping")
                return self._failure("bootstrap")
        finally:
            pd._bootstrapping[rank] -= 1
        if state.failure is not None:
            return self._failure("bootstrap")
        try:
            handle = self._handle = pd._submit(req, rank, hold_kv=True)
        except ProtocolError as exc:
            state.fail(exc.message)
            return pd.engine.error(exc)
        await handle.events.get()
        state.kv_ready.set()
        ready = time.monotonic()
        try:
            await asyncio.wait_for(state.done.wait(), timeout_s)
        except TimeoutError:
            state.fail(f"Request {self._room} timed out after {time.monotonic() - ready:.1f}s in KVPoll.Transferring")
        if state.failure is not None:
            return self._failure("transfer")
        pd.engine.runtime.release_held(handle)
        pd.transfers_completed[rank] += 1
        return self._answer()

    def _failure(self, stage: str) -> Response:
        self._pd.transfers_failed[self._rank] += 1
        reason = self._state.failure or "Failed due to an unknown reason from another rank"
        message = self._pd._prefill_failure(stage, self._rank, self._rid, self._room, reason)
        return sglang_error(500, message, self._req.stream)

    def _answer(self) -> Response:
        req = self._req
        prefix = "chatcmpl" if req.kind == "chat" else "cmpl"
        rid, created = f"{prefix}-{self._rid}", int(time.time())
        if not req.stream:
            return JSONResponse(completion_response(req, rid, created))
        body = b"".join(sse_event(c) for c in token_chunks(req, rid, created, 0))
        body += b"".join(sse_event(c) for c in final_chunks(req, rid, created))
        if req.include_usage:
            body += sse_event(usage_chunk(req, rid, created))
        return Response(body + sse_event("[DONE]"), media_type="text/event-stream")


def request_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (already validated by the protocol parser)."""
    body = json.loads(raw)
    return body if isinstance(body, dict) else {}
