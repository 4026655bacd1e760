"""vLLM's MooncakeConnector P/D protocol (vLLM 0.34): both legs at once, joined by a gateway-minted transfer id.

Wire contract (vLLM 0.34 ``distributed/kv_transfer/kv_connector/v1/mooncake/mooncake_connector.py`` and
``mooncake_utils.py``; the SGLang Model Gateway ``request_execution.rs``; llm-d ``connector_mooncake.go``):

- The gateway mints ``transfer_id`` (``xfer-<uuid>``), fresh per attempt; a prefill leg without one logs
  "Missing transfer_id in kv_transfer_params from router!" and sends nothing, and decode silently recomputes the
  prefill.
- Prefill leg: the client's body with ``kv_transfer_params = {"do_remote_decode": true, "do_remote_prefill":
  false, "transfer_id": T}``, ``stream`` false and ``max_tokens`` 1 as for NIXL, pinned with
  ``X-data-parallel-rank: p``.
- Decode leg: the client's body with ``kv_transfer_params = {"do_remote_prefill": true, "do_remote_decode":
  false, "transfer_id": T, "remote_engine_id": E, "remote_bootstrap_addr": "http://<prefill host>:<bootstrap
  port>"}``, pinned with ``X-data-parallel-rank: d``. ``E`` is the engine id of prefill rank ``p``, which the
  prefill engine's Mooncake bootstrap server lists at ``GET /query`` as ``{"<dp_rank>": {"engine_id": ...,
  "worker_addr": ...}}`` (:func:`parse_query`; cacheable, it changes only when the engine restarts).
- The legs may go concurrently (vLLM's example proxy, llm-d and AMD Infera do; the SGLang Model Gateway sends them
  in turn). ``n > 1`` runs whole on decode, as for NIXL.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.engines.vllm import RANK_HEADER
from gateway.pd.legs import DecodeSide, Leg, PdProtocolError, PrefillSide, without
from gateway.pd.vllm_nixl import DROPPED_FOR_PREFILL, supports

__all__ = ["MooncakeAttempt", "attempt", "mint_transfer_id", "parse_query", "supports"]


def _host(host: str) -> str:
    """``host`` as it goes in a URL: an IPv6 address in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def mint_transfer_id() -> str:
    """A fresh transfer id, ``xfer-<32 hex digits>``."""
    return f"xfer-{uuid.uuid4().hex}"


def parse_query(text: str) -> dict[int, str]:
    """``{dp_rank: engine_id}`` from the prefill bootstrap server's ``GET /query`` body.

    Raises:
        PdProtocolError: the body is not a JSON object of rank → object with a string ``engine_id``.
    """
    try:
        body = json.loads(text)
    except ValueError as exc:
        raise PdProtocolError(f"invalid Mooncake bootstrap /query answer: {exc}") from exc
    if not isinstance(body, dict):
        raise PdProtocolError("invalid Mooncake bootstrap /query answer: not a JSON object")
    out: dict[int, str] = {}
    for rank, entry in body.items():
        engine_id = entry.get("engine_id") if isinstance(entry, dict) else None
        if not (isinstance(rank, str) and rank.isdigit() and isinstance(engine_id, str) and engine_id):
            raise PdProtocolError(f"invalid Mooncake bootstrap /query entry for rank {rank!r}")
        out[int(rank)] = engine_id
    return out


@dataclass(frozen=True, slots=True)
class MooncakeAttempt:
    """Both legs of one attempt; ``concurrent`` is true."""

    prefill: Leg
    decode_leg: Leg
    transfer_id: str
    concurrent: bool = True

    def decode(self, prefill_answer: Mapping[str, Any] | None = None) -> Leg:
        return self.decode_leg


def attempt(
    body: Mapping[str, Any], prefill: PrefillSide, decode: DecodeSide, engine_ids: Mapping[int, str]
) -> MooncakeAttempt:
    """Plan one attempt of ``body`` on prefill rank ``prefill`` and decode rank ``decode`` with a fresh transfer
    id; ``engine_ids`` is the prefill engine's ``/query`` (:func:`parse_query`).

    Raises:
        ValueError: ``body`` has ``n > 1``, or ``prefill`` has no bootstrap port.
        PdProtocolError: ``engine_ids`` does not list the prefill rank.
    """
    if not supports(body):
        raise ValueError("n > 1 cannot be split over Mooncake: send it whole to a decode rank")
    if prefill.bootstrap_port is None:
        raise ValueError(f"prefill engine {prefill.engine} has no Mooncake bootstrap port")
    engine_id = engine_ids.get(prefill.rank)
    if engine_id is None:
        raise PdProtocolError(f"prefill engine {prefill.engine} lists no engine id for DP rank {prefill.rank}")
    transfer_id = mint_transfer_id()
    prefill_body = without(body, *DROPPED_FOR_PREFILL)
    prefill_body |= {
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False, "transfer_id": transfer_id},
        "stream": False,
        "max_tokens": 1,
    }
    if "max_completion_tokens" in body:
        prefill_body["max_completion_tokens"] = 1
    decode_body = without(body, "kv_transfer_params") | {
        "kv_transfer_params": {
            "do_remote_prefill": True,
            "do_remote_decode": False,
            "transfer_id": transfer_id,
            "remote_engine_id": engine_id,
            "remote_bootstrap_addr": f"http://{_host(prefill.host)}:{prefill.bootstrap_port}",
        }
    }
    return MooncakeAttempt(
        Leg(prefill_body, {RANK_HEADER: str(prefill.rank)}),
        Leg(decode_body, {RANK_HEADER: str(decode.rank)}),
        transfer_id,
    )
