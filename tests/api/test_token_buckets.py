"""The request limits' token buckets (the operator's progress endpoint, kubetune-server)."""

from __future__ import annotations

import pytest

from kubetune.api.token_buckets import TokenBuckets

pytestmark = pytest.mark.unit


def test_one_bucket_for_all_callers_refuses_past_its_burst() -> None:
    shared = TokenBuckets(rate=0.001, burst=2)  # the progress endpoint's TokenReview budget
    assert [shared.allow() for _ in range(3)] == [True, True, False]


def test_a_flood_of_new_keys_starts_every_bucket_full_again_instead_of_growing() -> None:
    buckets = TokenBuckets(rate=0.001, burst=1, size=2)
    assert [buckets.allow("a"), buckets.allow("a"), buckets.allow("b")] == [True, False, True]
    assert buckets.allow("c")  # a third key: the two kept are forgotten
    assert buckets.allow("a")
