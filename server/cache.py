"""A watch-backed cache of FineTuneJobs, as Kubernetes clients' informers keep one: a LIST, then
a WATCH from its resourceVersion (bookmarks on; re-listed on 410 Gone), filled with the server's
own read-only identity. One cluster-wide watch where that identity may list every namespace,
else one a namespace, started when a caller first reads there. It only ever answers a caller
whose own access review allowed the read (``access.py``); a namespace it can't fill, or a job
it doesn't hold, is read with the caller's token as before."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune.server.errors import ApiError
from kubetune.server.kube import Kube

log = logging.getLogger("kubetune.server.cache")
#: How long the API server keeps one watch open before the cache starts the next.
WATCH_SECONDS = 240
#: How long a reader waits for a new namespace's first LIST before reading without the cache.
SYNC_WAIT_SECONDS = 5.0
#: Back-off after a failed LIST or WATCH, and before a forbidden namespace is tried again.
RETRY_SECONDS = 2.0
FORBIDDEN_RETRY_SECONDS = 60.0

Key = tuple[str, str]  # (namespace, name)


def _version(job: dict[str, Any]) -> int:
    try:
        return int(job["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


def _slim(job: dict[str, Any]) -> dict[str, Any]:
    """The object as the API answers it, less managedFields (never shown, most of its bytes)."""
    job["metadata"].pop("managedFields", None)
    return job


class Watch:
    """One LIST+WATCH of FineTuneJobs (one namespace's, or every namespace's)."""

    def __init__(self, kube: Kube, token: Callable[[], str], namespace: str | None) -> None:
        self.kube = kube
        self.token = token
        self.namespace = namespace
        self.path = kube.jobs_path(namespace)
        self.jobs: dict[Key, dict[str, Any]] = {}
        self.by_namespace: dict[str, dict[str, dict[str, Any]]] = {}
        self.ordered: dict[str, list[dict[str, Any]]] = {}
        self.synced = asyncio.Event()
        self.forbidden = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name=f"watch {self.namespace or '*'}")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    # --- the store -------------------------------------------------------------------------

    def put(self, job: dict[str, Any]) -> None:
        """Keep ``job`` unless what is held is newer."""
        meta = job["metadata"]
        key = (str(meta.get("namespace", "")), str(meta["name"]))
        held = self.jobs.get(key)
        if held is not None and _version(held) > _version(job):
            return
        self.jobs[key] = _slim(job)
        self.by_namespace.setdefault(key[0], {})[key[1]] = job
        self.ordered.pop(key[0], None)

    def drop(self, job: dict[str, Any]) -> None:
        meta = job["metadata"]
        key = (str(meta.get("namespace", "")), str(meta["name"]))
        self.jobs.pop(key, None)
        self.by_namespace.get(key[0], {}).pop(key[1], None)
        self.ordered.pop(key[0], None)

    def replace(self, items: list[dict[str, Any]]) -> None:
        self.jobs.clear()
        self.by_namespace.clear()
        self.ordered.clear()
        for job in items:
            self.put(job)

    def listing(self, namespace: str, key: Callable[[dict[str, Any]], Any]) -> list[Any]:
        """The namespace's jobs sorted by ``key``, newest first (kept until the next change)."""
        if namespace not in self.ordered:
            jobs = list(self.by_namespace.get(namespace, {}).values())
            self.ordered[namespace] = sorted(jobs, key=key, reverse=True)
        return self.ordered[namespace]

    # --- list and watch --------------------------------------------------------------------

    async def _list(self) -> str:
        body = await self.kube.request(
            self.token(), "GET", self.path, verb="list", what="finetunejobs"
        )
        self.replace(body.get("items") or [])
        self.synced.set()
        return str(body["metadata"]["resourceVersion"])

    async def _watch(self, version: str) -> str | None:
        """Apply events until the watch ends; the resourceVersion to go on from, or None when
        it is too old (410 Gone: list again)."""
        async for event in self.kube.watch(self.token(), self.path, version, WATCH_SECONDS):
            kind, obj = event.get("type"), event.get("object") or {}
            if kind == "ERROR":
                if obj.get("code") == 410:
                    return None
                raise ApiError(502, f"watch error {obj.get('code')}", code="upstream")
            if kind in {"ADDED", "MODIFIED"}:
                self.put(obj)
            elif kind == "DELETED":
                self.drop(obj)
            version = str((obj.get("metadata") or {}).get("resourceVersion") or version)
        return version

    async def _run(self) -> None:
        version: str | None = None
        while True:
            try:
                if version is None:
                    version = await self._list()
                version = await self._watch(version)
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status in {401, 403}:
                    log.info("the server may not watch finetunejobs in %s", self.namespace or "*")
                    self.synced.clear()  # never answer from what it may no longer read
                    self.forbidden.set()
                    return
                log.warning("watch of finetunejobs failed (%s); again", exc.status)
                version = None
                await asyncio.sleep(RETRY_SECONDS)
            except Exception as exc:  # the connection dropped: watch on from where it was
                log.warning("watch of finetunejobs ended (%s); again", type(exc).__name__)
                await asyncio.sleep(RETRY_SECONDS)


class JobCache:
    """Every watch the server holds; ``view(namespace)`` the synced one covering a namespace,
    or None where reads go to the API server with the caller's token."""

    def __init__(self, kube: Kube, token_file: Path) -> None:
        self.kube = kube
        self.token_file = token_file
        self.cluster: Watch | None = None
        self.namespaces: dict[str, Watch] = {}
        self.retry_at: dict[str, float] = {}

    def token(self) -> str:
        """The server's own token, read at each LIST and WATCH (the kubelet rotates it)."""
        return self.token_file.read_text().strip()

    def start(self) -> None:
        self.cluster = Watch(self.kube, self.token, None)
        self.cluster.start()

    async def stop(self) -> None:
        for watch in [self.cluster, *self.namespaces.values()]:
            if watch is not None:
                await watch.stop()

    async def view(self, namespace: str) -> Watch | None:
        if self.cluster is not None and await _outcome(self.cluster):
            return self.cluster
        loop = asyncio.get_running_loop()
        watch = self.namespaces.get(namespace)
        if watch is not None and watch.forbidden.is_set():
            if loop.time() < self.retry_at.get(namespace, 0):
                return None
            del self.namespaces[namespace]
            watch = None
        if watch is None:
            watch = self.namespaces[namespace] = Watch(self.kube, self.token, namespace)
            self.retry_at[namespace] = loop.time() + FORBIDDEN_RETRY_SECONDS
            watch.start()
        return watch if await _outcome(watch) else None

    def observe(self, job: dict[str, Any]) -> None:
        """A job the server just wrote (with the caller's token): kept at once, so the caller
        reads their own write even before its watch event arrives."""
        namespace = str(job["metadata"].get("namespace", ""))
        for watch in (self.cluster, self.namespaces.get(namespace)):
            if watch is not None and watch.synced.is_set():
                watch.put(dict(job, metadata=dict(job["metadata"])))


async def _outcome(watch: Watch) -> bool:
    """Whether ``watch`` is synced, waiting up to SYNC_WAIT_SECONDS for its first LIST."""
    if watch.synced.is_set():
        return True
    if watch.forbidden.is_set():
        return False
    synced = asyncio.ensure_future(watch.synced.wait())
    forbidden = asyncio.ensure_future(watch.forbidden.wait())
    await asyncio.wait(
        {synced, forbidden}, timeout=SYNC_WAIT_SECONDS, return_when="FIRST_COMPLETED"
    )
    synced.cancel()
    forbidden.cancel()
    return watch.synced.is_set()


__all__ = ["JobCache", "Watch"]
