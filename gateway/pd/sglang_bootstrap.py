"""SGLang's P/D bootstrap protocol: the same body to both legs at once, joined by a bootstrap room.

Wire contract (SGLang 0.5.23 ``sglang/srt/entrypoints/openai/protocol.py`` and ``disaggregation/``; the SGLang
Model Gateway ``routers/http/pd_router.rs``):

- Both legs get the client's body plus ``bootstrap_host`` and ``bootstrap_port`` (the prefill engine's bootstrap
  server, default port 8998) and ``bootstrap_room``, a random integer in ``[0, 2**63 - 1]``. The decode engine
  fetches the KV cache from the prefill engine through that room; the answer, streamed or not, comes from decode,
  and the prefill leg's answer is read and dropped.
- Rooms must be unique per attempt: SGLang 0.5.23 fails a reused room ("Duplicate or cancelled bootstrap room"),
  so every attempt, retries included, mints a new one (:func:`mint_room`).
- DP ranks: the prefill leg gets ``routed_dp_rank = p``; the decode leg ``routed_dp_rank = d`` and
  ``disagg_prefill_dp_rank = p`` (what the decode engine's pre-allocation queue reads first to find the prefill
  rank, ``DecodePreallocQueue._resolve_prefill_dp_rank``). A prefill engine left at its default for P/D
  (``follow_bootstrap_room``: rank = room mod DP size) refuses an external rank that disagrees with the room, so
  the room is also aligned to ``p`` (``room ≡ p (mod dp_size)``, as AMD Infera does): the two pins can never
  conflict, whichever the engine reads. The deprecated ``data_parallel_rank`` is removed so it cannot disagree.
- Both legs are sent concurrently; if either fails the other must be cancelled at once (a decode leg left alone
  waits for a bootstrap that never comes, up to SGLang's 300 s timeout).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gateway.pd.legs import DecodeSide, Leg, PrefillSide, without

ROOM_MAX = 2**63 - 1
"""Largest bootstrap room (a signed 64-bit integer in SGLang and the SGLang Model Gateway)."""
DEFAULT_BOOTSTRAP_PORT = 8998
"""SGLang's ``--disaggregation-bootstrap-port`` default (0.5.23 ``arg_groups/fields/disagg.py``)."""
LEGACY_RANK_FIELD = "data_parallel_rank"


def mint_room(rng: random.Random, prefill_rank: int, prefill_dp_size: int) -> int:
    """A fresh random bootstrap room in ``[0, 2**63 - 1]`` with ``room % prefill_dp_size == prefill_rank``.

    Raises:
        ValueError: ``prefill_rank`` outside ``[0, prefill_dp_size)``.
    """
    if not 0 <= prefill_rank < prefill_dp_size:
        raise ValueError(f"prefill rank {prefill_rank} outside [0, {prefill_dp_size})")
    room = rng.getrandbits(63)
    room += prefill_rank - room % prefill_dp_size
    if room > ROOM_MAX:
        room -= prefill_dp_size
    return room


@dataclass(frozen=True, slots=True)
class SglangBootstrapAttempt:
    """Both legs of one attempt (see the module docstring). ``concurrent`` is always true."""

    prefill: Leg
    decode_leg: Leg
    room: int
    concurrent: bool = True

    def decode(self, prefill_answer: Mapping[str, Any] | None = None) -> Leg:
        return self.decode_leg


def attempt(
    body: Mapping[str, Any], prefill: PrefillSide, decode: DecodeSide, rng: random.Random, *, pin_prefill: bool = True
) -> SglangBootstrapAttempt:
    """Plan one attempt of ``body`` on prefill rank ``prefill`` and decode rank ``decode`` with a fresh room.

    The client's body is not mutated; any bootstrap or rank fields it carried are overwritten (the gateway decides
    placement). With ``pin_prefill`` false (the gateway's ``follow_bootstrap_room``), the room alone names the
    prefill rank: the prefill leg carries no ``routed_dp_rank`` and the decode leg no ``disagg_prefill_dp_rank``,
    so both engines derive it as ``room % dp_size``, which the room's alignment makes ``prefill.rank``.
    """
    room = mint_room(rng, prefill.rank, prefill.dp_size)
    common = without(body, LEGACY_RANK_FIELD, "routed_dp_rank", "disagg_prefill_dp_rank")
    common |= {
        "bootstrap_host": prefill.host,
        "bootstrap_port": prefill.bootstrap_port or DEFAULT_BOOTSTRAP_PORT,
        "bootstrap_room": room,
    }
    prefill_pin = {"routed_dp_rank": prefill.rank} if pin_prefill else {}
    decode_pin = {"disagg_prefill_dp_rank": prefill.rank} if pin_prefill else {}
    prefill_body = common | prefill_pin
    decode_body = without(common) | {"routed_dp_rank": decode.rank} | decode_pin
    return SglangBootstrapAttempt(Leg(prefill_body), Leg(decode_body), room)
