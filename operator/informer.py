"""A plain list+watch of one kind (client-go's informer) into an in-memory index, on the
operator's event loop, in place of kopf's watches for FineTuneJobs, Jobs, Pods and JobSets.

kopf processed each watch event through its whole machinery (a worker task per object, causes,
handler invocations, timeouts): ~0.76 ms an event, ~3 ms a job, a third of the operator's CPU
(docs/performance.md, "fourth round"), where all the operator wants is the object slimmed into an
index and its owner's key queued. An ``Informer`` does only that: the first list in pages
(``SETTINGS.list_chunk_size``), then a watch from the list's resourceVersion with bookmarks and a
server timeout, started again from the last resourceVersion it saw when it ends or breaks; a
watch whose resourceVersion is too old (410 Gone) lists again and puts the index right, each
object that changed or vanished since reported as an event. Its ``Index`` answers as a kopf.Index
does (a key to the objects filed under it), so the workers read it unchanged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any, Final
from urllib.parse import quote, unquote

import aiohttp

from kubetune.operator.kube import Kube
from kubetune.operator.objects import Key, Obj

#: An object's own place: its namespace and name.
Ident = tuple[str, str]
#: The key an object is filed under (None: not indexed), from its body.
Keyer = Callable[[Mapping[str, Any]], Key | None]
#: What the index keeps of an object (its body, and what the index held for it before).
Slimmer = Callable[[Mapping[str, Any], Obj | None], Obj]
#: Told of each change once it is in the index: its type (ADDED, MODIFIED, DELETED), the key it
#: is filed under and the object's body.
Listener = Callable[[str, Key, Mapping[str, Any]], None]

LOGGER: Final = logging.getLogger("kubetune.operator.informer")
#: Seconds between attempts after failed lists or watches in a row: then the last, again.
BACKOFF: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
#: A watch that ends sooner than this (without an error) is started again after a pause.
SHORT_WATCH_SECONDS: Final = 1.0
#: Characters that make a namespace a pattern (kopf's globs): the informer watches names only.
PATTERN_CHARACTERS: Final = frozenset("*?[!")


class Gone(Exception):
    """The watch's resourceVersion is too old (410): list again."""


class Index(Mapping[Key, Collection[Obj]]):
    """Key → the objects filed under it (a FineTuneJob's key: the FineTuneJob; for children, its
    Jobs, Pods or JobSets), as a kopf.Index answers."""

    def __init__(self, keyer: Keyer, slimmer: Slimmer) -> None:
        self._keyer, self._slimmer = keyer, slimmer
        self._by_key: dict[Key, dict[Ident, Obj]] = {}
        self._where: dict[Ident, Key] = {}

    def __getitem__(self, key: Key) -> Collection[Obj]:
        return self._by_key[key].values()

    def __iter__(self) -> Iterator[Key]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def idents(self) -> list[Ident]:
        return list(self._where)

    def holds(self, ident: Ident) -> bool:
        return ident in self._where

    def version(self, ident: Ident) -> str | None:
        """The resourceVersion the index holds of the object at ``ident`` (None: none)."""
        key = self._where.get(ident)
        if key is None:
            return None
        return str(self._by_key[key][ident]["metadata"].get("resourceVersion"))

    def put(self, ident: Ident, body: Mapping[str, Any]) -> tuple[Key | None, Key | None]:
        """File ``body`` (slimmed) under its key: (the key it was under, the key it is under)."""
        old = self._where.get(ident)
        key = self._keyer(body)
        previous = self._by_key[old].get(ident) if old is not None else None
        if old is not None and old != key:
            self._drop(ident, old)
        if key is not None:
            self._by_key.setdefault(key, {})[ident] = self._slimmer(body, previous)
            self._where[ident] = key
        return old, key

    def remove(self, ident: Ident) -> Key | None:
        """Forget the object at ``ident``: the key it was under (None: it was not indexed)."""
        old = self._where.get(ident)
        if old is not None:
            self._drop(ident, old)
        return old

    def _drop(self, ident: Ident, key: Key) -> None:
        del self._where[ident]
        store = self._by_key[key]
        del store[ident]
        if not store:
            del self._by_key[key]


def check_namespaces(namespaces: list[str]) -> None:
    """Refuse a namespace pattern (kopf's globs): the watches take names, as the chart's
    ``watchNamespaces`` gives them."""
    patterns = [n for n in namespaces if PATTERN_CHARACTERS & set(n)]
    if patterns:
        raise ValueError(
            f"KUBETUNE_NAMESPACES: {', '.join(patterns)}: a pattern; the operator watches "
            "namespaces by name (list each one, or none for all)"
        )


def watched_paths(group: str, version: str, plural: str, namespaces: list[str]) -> list[str]:
    """The collection paths to list and watch: one per namespace, or the cluster's when none is
    named (``check_namespaces``: no pattern)."""
    check_namespaces(namespaces)
    prefix = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if not namespaces:
        return [f"{prefix}/{plural}"]
    return [f"{prefix}/namespaces/{quote(n)}/{plural}" for n in namespaces]


def path_namespace(path: str) -> str | None:
    """The namespace a collection path is in (None: the cluster's collection)."""
    parts = path.split("/")
    return unquote(parts[parts.index("namespaces") + 1]) if "namespaces" in parts else None


class Informer:
    """One kind's list+watch at one collection path, into ``index``; ``listener`` told of each
    change. ``listed`` is set once the first list is in the index."""

    def __init__(
        self,
        kube: Kube,
        session: aiohttp.ClientSession,
        path: str,
        kind: str,
        *,
        index: Index,
        listener: Listener,
        selector: str | None,
        chunk_size: int,
        timeout_seconds: int,
        inactivity_seconds: float,
    ) -> None:
        self.kube, self.session, self.path, self.kind = kube, session, path, kind
        self.index, self.listener = index, listener
        self.selector, self.chunk_size = selector, chunk_size
        self.timeout_seconds, self.inactivity_seconds = timeout_seconds, inactivity_seconds
        #: The one namespace watched (None: every namespace), from the path.
        self.namespace = path_namespace(path)
        self.listed = asyncio.Event()
        #: Where the next watch starts (None: list first).
        self.version: str | None = None

    async def run(self) -> None:
        """List, then watch for ever; list again after a 410, start the watch again from the
        last resourceVersion after it ends or breaks (after a backoff when it failed)."""
        failures = 0
        while True:
            try:
                if self.version is None:
                    await self._list()
                    self.listed.set()
                began = time.monotonic()
                await self._watch()
                failures = 0
                if time.monotonic() - began < SHORT_WATCH_SECONDS:
                    # A server that ends every watch at once is not asked again in a tight loop.
                    await asyncio.sleep(BACKOFF[0])
            except Gone:
                self.version = None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # every failure is retried, and said
                wait = BACKOFF[min(failures, len(BACKOFF) - 1)]
                failures += 1
                LOGGER.warning(
                    "watching %s at %s: %s (again in %ss)", self.kind, self.path, _said(exc), wait
                )
                await asyncio.sleep(wait)

    def _query(self, **extra: str) -> dict[str, str]:
        query = {"labelSelector": self.selector} if self.selector else {}
        query.update(extra)
        return query

    async def _get(
        self, query: dict[str, str], timeout: aiohttp.ClientTimeout
    ) -> aiohttp.ClientResponse:
        url, tls, server_name, proxy = self.kube.endpoint()
        response = await self.session.get(
            url + self.path,
            proxy=proxy,
            params=query,
            headers={"Accept": "application/json", **self.kube.auth_headers()},
            ssl=tls if tls is not None else False,
            server_hostname=server_name,
            timeout=timeout,
        )
        if response.status == 410:
            response.release()
            raise Gone()
        if response.status >= 300:
            text = await response.text()
            response.release()
            raise aiohttp.ClientResponseError(
                response.request_info, (), status=response.status, message=text[:500]
            )
        return response

    async def _list(self) -> None:
        """The whole collection, a page at a time, into the index: each object new or changed
        since the index last held it reported, and each one gone reported deleted."""
        # A page silent as long as a watch may be is dead too (a stalled connection).
        timeout = aiohttp.ClientTimeout(sock_connect=30, sock_read=self.inactivity_seconds)
        # The index may hold other namespaces' objects too (one informer per namespace).
        unseen = {i for i in self.index.idents() if self.namespace in (None, i[0])}
        token = ""
        while True:
            query = self._query(limit=str(self.chunk_size))
            if token:
                query["continue"] = token
            response = await self._get(query, timeout)
            async with response:
                page = await response.json(loads=json.loads)
            kind = str(page.get("kind") or "").removesuffix("List")
            for item in page.get("items") or []:
                metadata = item.get("metadata") or {}
                ident = place(metadata)
                unseen.discard(ident)
                if self.index.version(ident) == metadata.get("resourceVersion"):
                    continue
                if kind:
                    item.setdefault("kind", kind)  # a list's items carry no kind
                self._apply("MODIFIED" if self.index.holds(ident) else "ADDED", ident, item)
            meta = page.get("metadata") or {}
            token = meta.get("continue") or ""
            if not token:
                self.version = str(meta.get("resourceVersion"))
                break
        for ident in unseen:
            old = self.index.remove(ident)
            if old is not None:
                gone = {"metadata": {"namespace": ident[0], "name": ident[1]}}
                self.listener("DELETED", old, gone)

    async def _watch(self) -> None:
        """One watch from ``self.version`` until the server ends it (its timeout) or it goes
        silent for ``inactivity_seconds`` (the apiserver sends a bookmark about once a minute):
        each event into the index."""
        assert self.version is not None
        timeout = aiohttp.ClientTimeout(
            total=self.timeout_seconds + 30, sock_connect=30, sock_read=self.inactivity_seconds
        )
        query = self._query(
            watch="true",
            resourceVersion=self.version,
            allowWatchBookmarks="true",
            timeoutSeconds=str(self.timeout_seconds),
        )
        response = await self._get(query, timeout)
        async with response:
            rest = b""
            async for chunk in response.content.iter_any():
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                for line in lines:
                    if line.strip():
                        self._event(json.loads(line))

    def _event(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        body = event.get("object") or {}
        if kind == "ERROR":
            if body.get("code") == 410:
                raise Gone()
            raise RuntimeError(f"watch error: {body.get('code')} {body.get('message')}")
        metadata = body.get("metadata") or {}
        version = metadata.get("resourceVersion")
        if kind != "BOOKMARK":
            ident = place(metadata)
            self._apply(str(kind), ident, body)
        if version:
            self.version = str(version)

    def _apply(self, kind: str, ident: Ident, body: Mapping[str, Any]) -> None:
        if kind == "DELETED":
            old = self.index.remove(ident)
            key = old
        else:
            old, key = self.index.put(ident, body)
            if key is None and old is not None:
                kind, key = "DELETED", old  # no longer filed under any key
        if key is not None:
            self.listener(kind, key, body)
        if old is not None and key is not None and old != key:
            self.listener("DELETED", old, body)


def place(metadata: Mapping[str, Any]) -> Ident:
    """An object's place, its strings interned: the index keeps it as long as the object, and
    the slimmed object's own metadata holds the same strings (``controller.compact``)."""
    return sys.intern(str(metadata.get("namespace") or "")), sys.intern(str(metadata.get("name")))


def _said(exc: BaseException) -> str:
    """A failure in a few words: the status and message of an answer, else the exception."""
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"{exc.status} {exc.message}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
