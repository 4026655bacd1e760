"""Where each stored Response lives: the engine and DP rank that produced it, remembered by the front door.

vLLM and SGLang keep a stored response in the memory of the API-server process that answered it
(``docs/responses.md``), so a follow-up (``previous_response_id``), a retrieval or a cancel must reach that
engine; the rank is kept too, so a follow-up lands where the conversation's prefix is cached. The map is bounded
(least recently used forgotten beyond ``responses.max_remembered``) and entries expire ``responses.ttl_s`` after
their last use. Pure: time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from gateway.types import RankKey


@dataclass(frozen=True, slots=True)
class ResponseHome:
    """The engine rank that produced a stored response.

    Attributes:
        rank: its engine and DP rank.
        model: the model it was produced with.
        expires_at: the clock time (seconds) after which it is forgotten, unless used again before.
    """

    rank: RankKey
    model: str
    expires_at: float


class ResponseHomes:
    """Response id → :class:`ResponseHome`, least recently used first.

    Args:
        max_remembered: at most this many ids are kept; the least recently used goes first.
        ttl_s: an id not used for this long, seconds, is forgotten.

    Raises:
        ValueError: ``max_remembered`` < 1 or ``ttl_s`` <= 0.
    """

    def __init__(self, max_remembered: int, ttl_s: float) -> None:
        if max_remembered < 1 or ttl_s <= 0:
            raise ValueError(f"max_remembered must be >= 1 and ttl_s > 0, got {max_remembered} and {ttl_s}")
        self.max_remembered = max_remembered
        self.ttl_s = ttl_s
        self._homes: OrderedDict[str, ResponseHome] = OrderedDict()
        self.evicted = 0
        """Ids forgotten to keep within ``max_remembered``, since start."""
        self.expired = 0
        """Ids forgotten after ``ttl_s`` unused, since start."""

    def __len__(self) -> int:
        return len(self._homes)

    def remember(self, response_id: str, rank: RankKey, model: str, now: float) -> None:
        """``response_id`` was produced on ``rank`` at ``now``."""
        homes = self._homes
        homes[response_id] = ResponseHome(rank, model, now + self.ttl_s)
        homes.move_to_end(response_id)
        self._expire(now)
        while len(homes) > self.max_remembered:
            homes.popitem(last=False)
            self.evicted += 1

    def lookup(self, response_id: str, now: float) -> ResponseHome | None:
        """Where ``response_id`` lives, or ``None`` if it was never remembered, expired or was evicted; a hit
        counts as a use (it becomes the most recent and its expiry moves to ``now + ttl_s``)."""
        self._expire(now)
        home = self._homes.get(response_id)
        if home is None:
            return None
        renewed = ResponseHome(home.rank, home.model, now + self.ttl_s)
        self._homes[response_id] = renewed
        self._homes.move_to_end(response_id)
        return renewed

    def forget(self, response_id: str) -> None:
        """Forget ``response_id`` (deleted at its engine)."""
        self._homes.pop(response_id, None)

    def forget_engine(self, engine: str) -> int:
        """Forget every response of ``engine`` (removed from the gateway); return how many."""
        gone = [rid for rid, home in self._homes.items() if home.rank.engine == engine]
        for rid in gone:
            del self._homes[rid]
        return len(gone)

    def _expire(self, now: float) -> None:
        """Drop the expired ids at the old end: use order is expiry order, since every use renews by ``ttl_s``."""
        homes = self._homes
        while homes:
            oldest = next(iter(homes.values()))
            if oldest.expires_at > now:
                return
            homes.popitem(last=False)
            self.expired += 1
