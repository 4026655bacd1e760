"""The vocabulary of a P/D request: the two legs, the ranks they are pinned to, and one attempt's plan."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol


class PdProtocolError(ValueError):
    """A prefill leg's answer lacks what the decode leg needs (for example vLLM NIXL's ``kv_transfer_params``)."""


@dataclass(frozen=True, slots=True)
class Leg:
    """One leg as sent: the JSON body and the headers to add (the rank pin among them where the engine takes it
    in a header).

    Attributes:
        body: the request body (a fresh dict; the client's body is never mutated).
        headers: headers to set on the upstream request.
    """

    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PrefillSide:
    """The prefill DP rank a request goes to.

    Attributes:
        engine: the prefill engine's configured name.
        rank: the DP rank, ``0 <= rank < dp_size``.
        dp_size: the prefill engine's DP size.
        host: the host the decode engine reaches the prefill engine's bootstrap server at.
        bootstrap_port: the prefill engine's bootstrap port (SGLang ``--disaggregation-bootstrap-port``, vLLM
            Mooncake's bootstrap server); ``None`` where the protocol has none (vLLM NIXL).

    Raises:
        ValueError: ``rank`` outside ``[0, dp_size)``.
    """

    engine: str
    rank: int
    dp_size: int
    host: str
    bootstrap_port: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.dp_size:
            raise ValueError(f"prefill rank {self.rank} outside [0, {self.dp_size})")


@dataclass(frozen=True, slots=True)
class DecodeSide:
    """The decode DP rank a request goes to.

    Attributes:
        engine: the decode engine's configured name.
        rank: the DP rank.
    """

    engine: str
    rank: int


class PdAttempt(Protocol):
    """One attempt of one request on one prefill rank and one decode rank. A retry is a new attempt: a fresh
    bootstrap room or transfer id, possibly other ranks.

    Attributes:
        concurrent: both legs go at once (the decode leg does not need the prefill's answer); otherwise the
            prefill leg must finish first.
        prefill: the prefill leg.
    """

    concurrent: bool
    prefill: Leg

    def decode(self, prefill_answer: Mapping[str, Any] | None = None) -> Leg:
        """The decode leg. A sequential protocol builds it from the prefill leg's JSON answer.

        Raises:
            PdProtocolError: the answer lacks what the decode leg needs.
        """
        ...


def without(body: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """A deep copy of ``body`` without ``keys``."""
    out = copy.deepcopy(dict(body))
    for key in keys:
        out.pop(key, None)
    return out
