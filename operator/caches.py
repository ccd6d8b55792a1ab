"""The operator's watch caches: an ``informer.Informer`` per kind and watched namespace, each
feeding an ``informer.Index`` of slimmed objects by their FineTuneJob's key, and queueing that
key on each change (a deletion too) once every kind is listed; then every FineTuneJob is queued
once (a pass before would plan from caches half filled)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp

from kubetune.api.models import GROUP, KIND, PLURAL, VERSION
from kubetune.operator import jobset as js
from kubetune.operator import metrics
from kubetune.operator.controller import (
    JOB_SPEC_KEPT,
    LOGGER,
    MANAGED,
    SETTINGS,
    job_key,
    kube,
    owner_name,
    slim,
    slim_finetunejob,
)
from kubetune.operator.informer import Index, Informer, Listener, watched_paths
from kubetune.operator.kube import finetunejob_path
from kubetune.operator.objects import Key, Obj

#: The finalizer kopf put on FineTuneJobs for an earlier kubetune version (this one puts none).
LEGACY_FINALIZER: Final = f"{GROUP}/finalizer"


def finetunejob_key(body: Mapping[str, Any]) -> Key | None:
    """A FineTuneJob is filed under its own key (interned, as every key of the operator's)."""
    metadata = body.get("metadata") or {}
    return job_key(str(metadata.get("namespace")), str(metadata.get("name")))


def owner_key(body: Mapping[str, Any]) -> Key | None:
    """A child's FineTuneJob's key, from its annotation (None: a child of no job)."""
    metadata = body.get("metadata") or {}
    owner = owner_name(metadata.get("annotations") or {})
    return None if owner is None else job_key(str(metadata.get("namespace")), owner)


def child_slimmer(kept: tuple[str, ...]) -> Callable[[Mapping[str, Any], Obj | None], Obj]:
    """A child kind's ``slim``, keeping the spec fields ``kept`` (what it held before is not
    needed: a child's entry is made from its event alone)."""
    return lambda body, _previous: slim(body, kept)


@dataclass(frozen=True)
class Watch:
    """One collection to list and watch: its path, its kind (for the log), the index it fills,
    who is told of each change, and the label selector (None: every object)."""

    path: str
    kind: str
    index: Index
    listener: Listener
    selector: str | None


@dataclass
class Caches:
    """The indexes the workers read, and the informers that fill them."""

    enqueue: Callable[[Key], None]
    finetunejobs: Index = field(init=False)
    jobs: Index = field(init=False)
    pods: Index = field(init=False)
    jobsets: Index | None = field(init=False)
    #: Every kind listed once: from then on each change queues its key.
    listed: bool = False
    informers: list[Informer] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None

    def __post_init__(self) -> None:
        self.finetunejobs = Index(finetunejob_key, slim_finetunejob)
        self.jobs = Index(owner_key, child_slimmer(JOB_SPEC_KEPT))
        self.pods = Index(owner_key, child_slimmer(()))
        self.jobsets = (
            Index(owner_key, child_slimmer(("suspend",)))
            if SETTINGS.group_workload == "jobset"
            else None
        )

    def _finetunejob_changed(self, type: str, key: Key, body: Mapping[str, Any]) -> None:
        metrics.JOBS.observe(key, None if type == "DELETED" else body.get("status") or {})
        finalizers = (body.get("metadata") or {}).get("finalizers")
        if finalizers and LEGACY_FINALIZER in finalizers and type != "DELETED":
            self._drop_legacy_finalizer(key, body)
        if self.listed:
            self.enqueue(key)

    def _child_changed(self, _type: str, key: Key, _body: Mapping[str, Any]) -> None:
        if self.listed:
            self.enqueue(key)

    def watches(self, jobsets: bool) -> list[Watch]:
        """What to list and watch: each kind at each watched namespace (the cluster's when none
        is named), into its index; the children (and JobSets only with ``jobsets``: their CRD
        is served) through the label kubetune puts on them, so a namespace's other Jobs and
        Pods (the cluster's, watching all namespaces) never reach the operator."""
        managed = ",".join(f"{label}={value}" for label, value in MANAGED.items())
        children = self._child_changed
        kinds: list[tuple[tuple[str, str, str, str], Index, Listener, str | None]] = [
            ((GROUP, VERSION, PLURAL, KIND), self.finetunejobs, self._finetunejob_changed, None),
            (("batch", "v1", "jobs", "Job"), self.jobs, children, managed),
            (("", "v1", "pods", "Pod"), self.pods, children, managed),
        ]
        if jobsets and self.jobsets is not None:
            jobset = (js.GROUP, js.VERSION, js.PLURAL, js.KIND)
            kinds.append((jobset, self.jobsets, children, managed))
        namespaces = list(SETTINGS.namespaces)
        return [
            Watch(path, kind, index, listener, selector)
            for (group, version, plural, kind), index, listener, selector in kinds
            for path in watched_paths(group, version, plural, namespaces)
        ]

    def start(self, jobsets: bool) -> None:
        """Start an informer for each of ``watches(jobsets)`` on this loop; the first lists
        done, queue every FineTuneJob."""
        # One connection per watch; the apiserver's answers come in on this loop.
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        self.informers = [
            Informer(
                kube(),
                self.session,
                watch.path,
                watch.kind,
                index=watch.index,
                listener=watch.listener,
                selector=watch.selector,
                chunk_size=SETTINGS.list_chunk_size,
                timeout_seconds=SETTINGS.watch_timeout_seconds,
                inactivity_seconds=SETTINGS.watch_inactivity_seconds,
            )
            for watch in self.watches(jobsets)
        ]
        self.tasks = [asyncio.create_task(informer.run()) for informer in self.informers]
        self.tasks.append(asyncio.create_task(self._queue_all_once_listed()))

    async def _queue_all_once_listed(self) -> None:
        await asyncio.gather(*(informer.listed.wait() for informer in self.informers))
        self.listed = True
        for key in list(self.finetunejobs.keys()):
            self.enqueue(key)

    def _drop_legacy_finalizer(self, key: Key, body: Mapping[str, Any]) -> None:
        """Take an earlier kubetune version's finalizer off a FineTuneJob (kopf did, when it
        watched them: this operator puts none, and would hold its deletion for ever), at the
        resourceVersion seen (a 409: the next event tries again), on a thread."""
        metadata = body["metadata"]
        patch = {
            "metadata": {
                "finalizers": [f for f in metadata["finalizers"] if f != LEGACY_FINALIZER],
                "resourceVersion": metadata.get("resourceVersion"),
            }
        }

        def drop() -> None:
            try:
                kube().merge_patch(finetunejob_path(*key), patch, read_answer=False)
            except Exception as exc:  # the next event of the object tries again
                LOGGER.warning("%s/%s: finalizer %s not removed: %s", *key, LEGACY_FINALIZER, exc)

        asyncio.get_running_loop().run_in_executor(None, drop)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.session is not None:
            await self.session.close()
