"""vLLM's NixlConnector P/D protocol (pull mode, vLLM 0.34): prefill first, then decode with what prefill returns.

Wire contract (vLLM ``tests/v1/kv_connector/nixl_integration/toy_proxy_server.py``;
``distributed/kv_transfer/kv_connector/v1/nixl/``; the SGLang Model Gateway ``routers/http/pd_router.rs``):

- Prefill leg: the client's body with ``kv_transfer_params = {"do_remote_decode": true, "do_remote_prefill": false,
  "remote_engine_id": null, "remote_block_ids": null, "remote_host": null, "remote_port": null}``, ``stream``
  false, ``max_tokens`` 1 (and ``max_completion_tokens`` 1 when the client set it), without ``stream_options``,
  ``min_tokens`` and ``min_completion_tokens``. Its JSON answer carries top-level ``kv_transfer_params`` (the
  prefill rank's engine id ``{engine_id}_dp{rank}``, block ids, side-channel host and port, a 30 s lease).
- Decode leg: the client's body, unchanged otherwise, with the ``kv_transfer_params`` the prefill returned; its
  answer (streamed or not) is the client's.
- Both legs carry the same ``X-Request-Id`` (load-bearing for NIXL correlation on vLLM < 0.13) and are pinned with
  ``X-data-parallel-rank``; decode needs no knowledge of the prefill rank (the returned params name it).
- ``n > 1``: the KV handoff is single-consumer (each of decode's fan-out children would pull, and the first to
  finish frees the prefill blocks under its siblings), so such a request skips P/D and runs whole on decode
  (:func:`supports`), as the SGLang Model Gateway does over HTTP.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.engines.vllm import RANK_HEADER
from gateway.pd.legs import DecodeSide, Leg, PdProtocolError, PrefillSide, without

REQUEST_ID_HEADER = "X-Request-Id"
PREFILL_PARAMS: dict[str, Any] = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
"""The prefill leg's ``kv_transfer_params``."""
DROPPED_FOR_PREFILL = ("stream_options", "min_tokens", "min_completion_tokens", "kv_transfer_params")


def supports(body: Mapping[str, Any]) -> bool:
    """Whether ``body`` can be split over NIXL: not with ``n > 1`` (see the module docstring)."""
    n = body.get("n")
    return not (isinstance(n, int) and not isinstance(n, bool) and n > 1)


@dataclass(frozen=True, slots=True)
class NixlAttempt:
    """One attempt: the prefill leg now, the decode leg from the prefill's answer. ``concurrent`` is false."""

    prefill: Leg
    client_body: dict[str, Any]
    decode_headers: dict[str, str]
    concurrent: bool = False

    def decode(self, prefill_answer: Mapping[str, Any] | None = None) -> Leg:
        """The decode leg with the ``kv_transfer_params`` of ``prefill_answer`` (the prefill leg's JSON answer).

        Raises:
            PdProtocolError: the answer has no ``kv_transfer_params`` object (a prefill engine without the NIXL
                connector as producer, or a truncated answer).
        """
        params = None if prefill_answer is None else prefill_answer.get("kv_transfer_params")
        if not isinstance(params, dict) or not params:
            raise PdProtocolError("the prefill answer carries no kv_transfer_params: is it a NIXL kv_producer?")
        return Leg(without(self.client_body) | {"kv_transfer_params": dict(params)}, dict(self.decode_headers))


def attempt(body: Mapping[str, Any], prefill: PrefillSide, decode: DecodeSide, request_id: str) -> NixlAttempt:
    """Plan one attempt of ``body`` on prefill rank ``prefill`` then decode rank ``decode``; ``request_id`` goes to
    both legs as ``X-Request-Id`` (a fresh one per attempt).

    Raises:
        ValueError: ``body`` has ``n > 1`` (check :func:`supports` first).
    """
    if not supports(body):
        raise ValueError("n > 1 cannot be split over NIXL: send it whole to a decode rank")
    client = without(body, "kv_transfer_params")
    prefill_body = without(body, *DROPPED_FOR_PREFILL)
    prefill_body |= {"kv_transfer_params": dict(PREFILL_PARAMS), "stream": False, "max_tokens": 1}
    if "max_completion_tokens" in body:
        prefill_body["max_completion_tokens"] = 1
    prefill_headers = {REQUEST_ID_HEADER: request_id, RANK_HEADER: str(prefill.rank)}
    decode_headers = {REQUEST_ID_HEADER: request_id, RANK_HEADER: str(decode.rank)}
    return NixlAttempt(Leg(prefill_body, prefill_headers), client, decode_headers)
