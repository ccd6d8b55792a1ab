"""The job cache's bookkeeping against a scripted API server: LIST then WATCH from its
resourceVersion, events applied in order (an older copy never replaces a newer one), a 410 Gone
answered by a new LIST, lists per namespace newest first, and a namespace the server's identity
may not watch left to the caller's own reads. The real API server's side is
test_server_on_cluster.py's (the server there reads through this cache)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from kubetune.server import cache
from kubetune.server.cache import JobCache
from kubetune.server.errors import ApiError
from kubetune.server.kube import Kube

pytestmark = pytest.mark.unit


def job(namespace: str, name: str, version: int, created: str = "2026-12-05T12:00:00Z") -> Any:
    return {
        "metadata": {
            "namespace": namespace, "name": name, "resourceVersion": str(version),
            "creationTimestamp": created, "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {},
    }  # fmt: skip


class ScriptedApi:
    """LIST answers and WATCH streams, one per call, in order; every call recorded."""

    jobs_path = staticmethod(Kube.jobs_path)

    def __init__(self, lists: list[Any], watches: list[list[Any]]) -> None:
        self.lists = lists
        self.watches = watches
        self.calls: list[tuple[str, str]] = []
        self.done = asyncio.Event()

    async def request(self, token: str, method: str, path: str, **_: Any) -> Any:
        self.calls.append(("list", path))
        answer = self.lists.pop(0)
        if isinstance(answer, ApiError):
            raise answer
        return answer

    async def watch(
        self, token: str, path: str, version: str, seconds: int
    ) -> AsyncIterator[dict[str, Any]]:
        self.calls.append(("watch", version))
        if not self.watches:
            self.done.set()
            await asyncio.Event().wait()  # held open, as a quiet watch is
        for event in self.watches.pop(0):
            yield event


def made(api: ScriptedApi, tmp_path: Path) -> JobCache:
    token = tmp_path / "token"
    token.write_text("server-token\n")
    fake: Kube = api  # type: ignore[assignment]
    return JobCache(fake, token)


def run(scenario: Any) -> Any:
    return asyncio.run(scenario)


def test_events_follow_the_list_in_order_and_a_410_lists_again(tmp_path: Path) -> None:
    api = ScriptedApi(
        lists=[
            {"metadata": {"resourceVersion": "10"}, "items": [job("a", "one", 5)]},
            {"metadata": {"resourceVersion": "40"},
             "items": [job("a", "one", 31), job("a", "three", 40)]},
        ],
        watches=[
            [
                {"type": "ADDED", "object": job("a", "two", 11, "2026-12-05T12:01:00Z")},
                {"type": "MODIFIED", "object": job("a", "one", 12)},
                {"type": "MODIFIED", "object": job("a", "one", 9)},  # older: ignored
                {"type": "ADDED", "object": job("b", "other", 13)},
                {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "20"}}},
            ],
            [{"type": "ERROR", "object": {"code": 410, "message": "too old"}}],
        ],
    )  # fmt: skip
    jobs = made(api, tmp_path)

    async def scenario() -> tuple[list[str], list[str], Any, list[str]]:
        jobs.start()
        view = await jobs.view("a")
        assert view is not None
        await asyncio.wait_for(api.done.wait(), 10)
        names = [j["metadata"]["name"] for j in view.listing("a", cache_key)]
        other = [j["metadata"]["name"] for j in view.listing("b", cache_key)]
        one = view.jobs[("a", "one")]
        await jobs.stop()
        return names, other, one, [call[1] for call in api.calls]

    names, other, one, calls = run(scenario())
    # The second LIST (after 410) replaced the first's world: "two" is gone, "three" came.
    assert names == ["three", "one"]
    assert other == []
    assert one["metadata"]["resourceVersion"] == "31"
    assert "managedFields" not in one["metadata"]
    path = Kube.jobs_path(None)
    assert calls == [path, "10", "20", path, "40"]


def cache_key(job: Any) -> tuple[str, str]:
    meta = job["metadata"]
    return (meta["creationTimestamp"], meta["name"])


def test_a_namespace_the_server_may_not_watch_is_read_with_the_callers_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    forbidden = ApiError(403, "forbidden")
    api = ScriptedApi(
        lists=[forbidden, forbidden, {"metadata": {"resourceVersion": "3"}, "items": []}],
        watches=[],
    )
    jobs = made(api, tmp_path)
    monkeypatch.setattr(cache, "FORBIDDEN_RETRY_SECONDS", 0.0)

    async def scenario() -> tuple[bool, bool]:
        jobs.start()  # cluster-wide: forbidden
        refused = await jobs.view("a") is None  # the namespace's own watch: forbidden too
        allowed = await jobs.view("a") is not None  # retried later: now allowed
        await jobs.stop()
        return refused, allowed

    assert run(scenario()) == (True, True)
    assert [call[1] for call in api.calls[:3]] == [
        Kube.jobs_path(None), Kube.jobs_path("a"), Kube.jobs_path("a"),
    ]  # fmt: skip


def test_a_write_is_kept_at_once_and_never_replaced_by_an_older_event(tmp_path: Path) -> None:
    api = ScriptedApi(lists=[{"metadata": {"resourceVersion": "1"}, "items": []}], watches=[])
    jobs = made(api, tmp_path)

    async def scenario() -> str:
        jobs.start()
        view = await jobs.view("a")
        assert view is not None
        jobs.observe(job("a", "mine", 7))
        view.put(job("a", "mine", 6))  # a late event of the state before the write
        version = view.jobs[("a", "mine")]["metadata"]["resourceVersion"]
        await jobs.stop()
        return str(version)

    assert run(scenario()) == "7"
