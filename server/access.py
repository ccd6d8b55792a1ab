"""Authorization decisions cached briefly, as the API server's webhook authorizer caches them:
the caller's own SelfSubjectAccessReview, kept ``allowed_ttl`` seconds when allowed and
``denied_ttl`` when denied, keyed by a hash of the token (never the token), the namespace and
the verb. A revoked caller loses access within ``allowed_ttl``."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable

#: Decisions kept at most; beyond it the oldest half goes.
MAX_ENTRIES = 20_000

Review = Callable[[str, str, str], Awaitable[bool]]


class AccessCache:
    """``allowed(token, namespace, verb)``: a cached ``review`` (the caller's access review;
    a 401 from it is raised, never kept). Concurrent misses of one key share one review."""

    def __init__(
        self,
        review: Review,
        allowed_ttl: float,
        denied_ttl: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.review = review
        self.allowed_ttl = allowed_ttl
        self.denied_ttl = denied_ttl
        self.clock = clock
        self.decisions: dict[tuple[str, str, str], tuple[bool, float]] = {}
        self.pending: dict[tuple[str, str, str], asyncio.Future[bool]] = {}

    async def allowed(self, token: str, namespace: str, verb: str) -> bool:
        key = (hashlib.sha256(token.encode()).hexdigest(), namespace, verb)
        now = self.clock()
        held = self.decisions.get(key)
        if held is not None and held[1] > now:
            return held[0]
        if key in self.pending:
            return await asyncio.shield(self.pending[key])
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.pending[key] = future
        try:
            decision = await self.review(token, namespace, verb)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: a waiter-less failure isn't logged as unhandled
            raise
        finally:
            del self.pending[key]
        future.set_result(decision)
        if len(self.decisions) >= MAX_ENTRIES:
            for old in sorted(self.decisions, key=lambda k: self.decisions[k][1])[
                : MAX_ENTRIES // 2
            ]:
                del self.decisions[old]
        ttl = self.allowed_ttl if decision else self.denied_ttl
        self.decisions[key] = (decision, self.clock() + ttl)
        return decision


__all__ = ["AccessCache"]
