"""Token buckets: at most ``rate`` requests a second from each caller, in bursts of ``burst``.

One piece of code for every request limit kubetune keeps: the operator's progress endpoint (per
pod, and its TokenReviews for all callers together) and kubetune-server (per caller).
"""

from __future__ import annotations

import time


class TokenBuckets:
    """A token bucket per key: each holds up to ``burst`` tokens and refills at ``rate`` a
    second; a request takes one. At most ``size`` keys are kept: a new key past that starts every
    bucket full again, so a flood of new keys can't grow the memory."""

    def __init__(self, rate: float, burst: float, size: int = 10_000) -> None:
        self.rate, self.burst, self.size = rate, burst, size
        self._buckets: dict[str, tuple[float, float]] = {}  # key → (tokens, when counted)

    def allow(self, key: str = "") -> bool:
        """Take a token from ``key``'s bucket; False when it has none left."""
        now = time.monotonic()
        tokens, then = self._buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.rate)
        if len(self._buckets) >= self.size and key not in self._buckets:
            self._buckets.clear()
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            return False
        self._buckets[key] = (tokens - 1.0, now)
        return True
