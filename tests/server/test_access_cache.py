"""The access cache: an allowed review is reused for its TTL and asked again after it, a denied
one for the shorter TTL; another token (or namespace, or verb) is asked on its own; a refused
token (401) is never kept; concurrent askers share one review. The clock is the test's."""

from __future__ import annotations

import asyncio

import pytest

from kubetune.server.access import AccessCache
from kubetune.server.errors import ApiError, unauthorized

pytestmark = pytest.mark.unit


class Reviews:
    """What the API server would answer, and every review asked of it."""

    def __init__(self) -> None:
        self.rights: set[tuple[str, str, str]] = set()
        self.asked: list[tuple[str, str, str]] = []
        self.now = 0.0

    async def review(self, token: str, namespace: str, verb: str) -> bool:
        self.asked.append((token, namespace, verb))
        if token == "bad":
            raise unauthorized()
        await asyncio.sleep(0)
        return (token, namespace, verb) in self.rights


def cache(reviews: Reviews) -> AccessCache:
    return AccessCache(reviews.review, allowed_ttl=10, denied_ttl=2, clock=lambda: reviews.now)


def test_a_revoked_caller_loses_access_once_the_allowed_ttl_has_passed() -> None:
    reviews = Reviews()
    reviews.rights.add(("alice", "team-a", "get"))
    access = cache(reviews)

    async def scenario() -> list[bool]:
        seen = [await access.allowed("alice", "team-a", "get")]
        reviews.rights.clear()  # the RoleBinding is deleted
        reviews.now = 9.9
        seen.append(await access.allowed("alice", "team-a", "get"))  # within the TTL: kept
        reviews.now = 10.0
        seen.append(await access.allowed("alice", "team-a", "get"))  # asked again: denied
        return seen

    assert asyncio.run(scenario()) == [True, True, False]
    assert len(reviews.asked) == 2


def test_a_denied_answer_is_kept_only_for_the_shorter_ttl() -> None:
    reviews = Reviews()
    access = cache(reviews)

    async def scenario() -> list[bool]:
        seen = [await access.allowed("bob", "team-a", "list")]
        reviews.rights.add(("bob", "team-a", "list"))  # granted
        reviews.now = 1.9
        seen.append(await access.allowed("bob", "team-a", "list"))
        reviews.now = 2.0
        seen.append(await access.allowed("bob", "team-a", "list"))
        return seen

    assert asyncio.run(scenario()) == [False, False, True]


def test_each_token_namespace_and_verb_is_decided_on_its_own() -> None:
    reviews = Reviews()
    reviews.rights.add(("alice", "team-a", "get"))
    access = cache(reviews)

    async def scenario() -> list[bool]:
        return [
            await access.allowed("alice", "team-a", "get"),
            await access.allowed("mallory", "team-a", "get"),
            await access.allowed("alice", "team-b", "get"),
            await access.allowed("alice", "team-a", "delete"),
        ]

    assert asyncio.run(scenario()) == [True, False, False, False]
    assert len(reviews.asked) == 4
    assert all("alice" not in key[0] for key in access.decisions)  # hashed, never the token


def test_a_refused_token_is_never_kept() -> None:
    reviews = Reviews()
    access = cache(reviews)

    async def twice() -> None:
        for _ in range(2):
            with pytest.raises(ApiError) as raised:
                await access.allowed("bad", "team-a", "get")
            assert raised.value.status == 401

    asyncio.run(twice())
    assert len(reviews.asked) == 2
    assert access.decisions == {}


def test_concurrent_askers_share_one_review() -> None:
    reviews = Reviews()
    reviews.rights.add(("alice", "team-a", "get"))
    access = cache(reviews)

    async def fifty() -> list[bool]:
        return list(
            await asyncio.gather(*(access.allowed("alice", "team-a", "get") for _ in range(50)))
        )

    assert asyncio.run(fifty()) == [True] * 50
    assert len(reviews.asked) == 1
