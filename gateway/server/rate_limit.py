"""Per-tenant rate limits as token buckets, with time passed in (pure; no I/O, no clock of its own).

A bucket of a limit of ``L`` a minute holds at most ``L`` (one minute's worth, so a tenant that was idle may send a
minute's worth at once) and refills at ``L / 60`` a second, continuously: the classic token bucket (Turner, "New
directions in communications", 1986; the shape OpenAI's and SMG's per-key limits take). A request is admitted when
every bucket of its tenant holds what it needs; it then takes it from all of them at once, or from none.

Tokens are known only approximately at admission (the prompt estimate; the completion not at all). A request that
needs more than a whole bucket waits for a full bucket, then takes what it needs and leaves the bucket in debt
(below zero), so that one huge request is admitted at all and the debt delays the next ones. When the answer ends,
:meth:`TokenBucket.charge` settles the difference between what was taken and what the engine reported (more:
further debt; less: a refund, never above a full bucket).
"""

from __future__ import annotations

import math

SECONDS_PER_MINUTE = 60.0


class TokenBucket:
    """A token bucket of ``per_minute`` a minute, full at ``now``.

    Args:
        per_minute: the limit (> 0): the bucket's capacity, refilled over one minute.
        now: the caller's clock, seconds.

    Raises:
        ValueError: ``per_minute`` is not positive and finite.
    """

    def __init__(self, per_minute: float, now: float) -> None:
        if not (per_minute > 0 and math.isfinite(per_minute)):
            raise ValueError(f"per_minute must be positive and finite, got {per_minute}")
        self.capacity = float(per_minute)
        self.rate_per_s = self.capacity / SECONDS_PER_MINUTE
        self.level = self.capacity
        self._at = now

    def _refill(self, now: float) -> None:
        if now > self._at:
            self.level = min(self.capacity, self.level + (now - self._at) * self.rate_per_s)
            self._at = now

    def available(self, now: float) -> float:
        """What the bucket holds at ``now`` (negative while in debt)."""
        self._refill(now)
        return self.level

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds from ``now`` until the bucket holds ``amount`` (at most its capacity); 0 when it does now."""
        need = min(amount, self.capacity) - self.available(now)
        return max(0.0, need / self.rate_per_s)

    def take(self, amount: float, now: float) -> None:
        """Take ``amount`` (the caller checked :meth:`wait_s` is 0); may leave the bucket in debt."""
        self._refill(now)
        self.level -= amount

    def charge(self, amount: float, now: float) -> None:
        """Settle ``amount`` more (positive: further use; negative: a refund), never above a full bucket."""
        self._refill(now)
        self.level = min(self.capacity, self.level - amount)


def retry_after_s(wait_s: float) -> int:
    """The ``Retry-After`` value for a wait of ``wait_s`` seconds: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(wait_s - 1e-9))
