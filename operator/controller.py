"""What the operator's handlers and its reconcile share: the settings, the API client, the
per-job logger, and the Controller with its in-memory indexes of FineTuneJobs, Jobs, Pods and
(with ``KUBETUNE_GROUP_WORKLOAD=jobset``) JobSets."""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import kopf

from kubetune.api.contract import (
    ATTEMPT_ANNOTATION,
    COMPLETION_INDEX_LABEL,
    FINETUNEJOB_ANNOTATION,
    KUEUE_QUEUE_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
)
from kubetune.api.models import API_VERSION, KIND
from kubetune.operator import jobset as js
from kubetune.operator.children import PARTIAL_SPEC
from kubetune.operator.kube import Kube, load_config
from kubetune.operator.leader import LeaseLock
from kubetune.operator.names import owned_by
from kubetune.operator.objects import Key, Manifest, Obj
from kubetune.operator.pods import SECRET_REFERENCE_PATHS
from kubetune.operator.progress import ProgressInbox
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.workqueue import WorkQueue

SETTINGS = OperatorSettings()
MANAGED: Final = {MANAGED_BY_LABEL: MANAGED_BY}
LOGGER: Final = logging.getLogger("kubetune.operator")

#: A create's manifest, the object's path, and the object or the kopf error it ended in.
Created = tuple[Obj, str, Obj | kopf.TemporaryError | kopf.PermanentError]

_kube: Kube | None = None

#: Threads that create a job's companions side by side (``creation``), shared by all workers.
CREATE_THREADS: Final = 32
#: Threads that post Events in the background (``writes``).
EVENT_THREADS: Final = 4


def kube() -> Kube:
    global _kube  # noqa: PLW0603 - one API client per process, made at startup
    if _kube is None:
        # A kept-alive connection for every thread that may make a request at once (the
        # workers, the companions' creates, the Events, a few more): with fewer, a busy operator
        # discards connections and pays (and makes the apiserver pay) a TLS handshake for each
        # new one.
        pool = SETTINGS.max_workers + CREATE_THREADS + EVENT_THREADS + 4
        _kube = Kube(load_config(pool), SETTINGS.api_timeout_seconds)
    return _kube


def now() -> datetime:
    return datetime.now(UTC)


def identity() -> str:
    """This replica's name: in its Lease and as the ``reportingInstance`` of its Events."""
    named = SETTINGS.identity or os.environ.get("POD_NAME")
    return named or f"{socket.gethostname()}-{os.getpid()}"


class JobLogger(logging.LoggerAdapter[logging.Logger]):
    """Every line about a FineTuneJob names it (kopf's JSON formatter puts it under ``k8s``)."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        kwargs.setdefault("extra", {}).update(self.extra or {})
        return msg, kwargs


def job_logger(key: Key) -> JobLogger:
    namespace, name = key
    ref = {"apiVersion": API_VERSION, "kind": KIND, "namespace": namespace, "name": name}
    return JobLogger(LOGGER, {"k8s_ref": ref})


# --- the watch caches --------------------------------------------------------------------------


def job_key(namespace: str, name: str) -> Key:
    """A FineTuneJob's key in the indexes, the queue and the operator's maps, its strings
    interned: every watch event parses its own copies, and the first event's would stay as the
    maps' keys, one set per map a job is in."""
    return sys.intern(namespace), sys.intern(name)


def owner_name(annotations: Mapping[str, str]) -> str | None:
    value = annotations.get(FINETUNEJOB_ANNOTATION)
    return str(value) if value else None


METADATA_KEPT: Final = (
    "name", "namespace", "uid", "resourceVersion", "generation", "creationTimestamp",
    "deletionTimestamp", "ownerReferences",
)  # fmt: skip
JOB_SPEC_KEPT: Final = ("suspend", "activeDeadlineSeconds")
#: The few labels and annotations a reconcile reads: a pod's rank, whether Kueue manages a Job
#: (or JobSet), a group Job's attempt (a JobSet's child Job: its restart).
LABELS_KEPT: Final = (COMPLETION_INDEX_LABEL, KUEUE_QUEUE_LABEL, js.RESTART_LABEL)
ANNOTATIONS_KEPT: Final = (ATTEMPT_ANNOTATION,)


#: Strings up to this long are interned in the indexes (``compact``); longer ones are a
#: message or a spec's text, seldom repeated.
INTERNED_LENGTH: Final = 256


def compact(value: Any) -> Any:
    """A copy of a parsed JSON value for the indexes, each of its keys and short strings
    interned: the same condition types, reasons, timestamps, owner uids and names repeated over
    thousands of objects are held once, and nothing of the watch event's parsed body stays
    referenced (the whole event can be freed)."""
    if isinstance(value, str):
        return sys.intern(value) if len(value) <= INTERNED_LENGTH else value
    if isinstance(value, Mapping):
        return {sys.intern(str(k)): compact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [compact(v) for v in value]
    return value


def slim(body: Mapping[str, Any], spec: Iterable[str] | None = None) -> Manifest:
    """What a reconcile reads of an object, for the in-memory index: no managedFields, no
    last-applied annotation, no pod template (at 5,000 jobs, most of the operator's memory),
    ``compact``."""
    metadata = body.get("metadata") or {}
    kept: Manifest = {
        # A resourceVersion is never repeated: interning it would only grow the interned table.
        "metadata": {
            key: metadata[key] if key == "resourceVersion" else compact(metadata[key])
            for key in METADATA_KEPT
            if key in metadata
        },
        "status": compact(body.get("status") or {}),
    }
    if body.get("kind"):
        kept["kind"] = sys.intern(str(body["kind"]))
    for field, names in (("labels", LABELS_KEPT), ("annotations", ANNOTATIONS_KEPT)):
        values = metadata.get(field) or {}
        picked = {name: compact(values[name]) for name in names if name in values}
        if picked:
            kept["metadata"][field] = picked
    source = body.get("spec") or {}
    kept["spec"] = compact(source if spec is None else {k: source[k] for k in spec if k in source})
    return kept


#: What a reconcile reads of a FineTuneJob's spec, outside the moment it makes children: how
#: many pods and GPUs (status, group restarts), the run policy (suspend, deadline, retries,
#: TTL), the Kueue queue, whether there is a Validating phase, and the Secret references (to
#: name the field whose Secret a pod can't read). The rest (affinity, the pod template,
#: prompts, ...) is read from the API when children are made: a tenant's large spec never sits
#: in the operator's memory.
FINETUNEJOB_SPEC_KEPT: Final[tuple[tuple[str, ...], ...]] = (
    ("resources", "nodes"),
    ("resources", "gpus"),
    ("runPolicy",),
    ("scheduling", "queueName"),
    ("validation", "enabled"),
    *SECRET_REFERENCE_PATHS,
)


#: Phases of a FineTuneJob whose children are still to be made (no phase: a new one): the index
#: keeps its whole spec until then, if it is small (nearly every one is: about a KiB), so making
#: them reads nothing more from the API. A large one is read when its children are made.
UNSTARTED_PHASES: Final = (None, "Validating")
WHOLE_SPEC_KEPT_BYTES: Final = 16 * 1024


def slim_finetunejob(body: Mapping[str, Any], indexed: Obj | None = None) -> Manifest:
    """A FineTuneJob for the index: ``slim`` with no ``status.progress``, and (once its children
    are made) only ``FINETUNEJOB_SPEC_KEPT`` of its spec, marked ``PARTIAL_SPEC``
    (``planner.needs_whole_spec`` says when a reconcile needs the whole spec). ``indexed``: what
    the index holds for it now, whose whole spec is taken as it is while the object's generation
    says its spec is the same (the event of a status write: no second copy of the spec)."""
    # The trainer's progress (its curve history too) is for people and /metrics (read from the
    # events), never for a reconcile.
    status = {k: v for k, v in (body.get("status") or {}).items() if k != "progress"}
    kept = slim(
        {"kind": body.get("kind"), "metadata": body.get("metadata") or {}, "status": status}, ()
    )
    if kept["status"].get("phase") in UNSTARTED_PHASES:
        if indexed is not None and PARTIAL_SPEC not in indexed and _same_spec(indexed, kept):
            kept["spec"] = indexed["spec"]
            return kept
        spec = body.get("spec") or {}
        if len(json.dumps(spec, separators=(",", ":"))) <= WHOLE_SPEC_KEPT_BYTES:
            kept["spec"] = compact(spec)
            return kept
    whole = body.get("spec")
    for path in FINETUNEJOB_SPEC_KEPT:
        value: Any = whole
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        if value is None:
            continue
        target = kept["spec"]
        for key in path[:-1]:
            target = target.setdefault(key, {})
        target[path[-1]] = compact(value)
    kept[PARTIAL_SPEC] = True
    return kept


def _same_spec(indexed: Obj, kept: Manifest) -> bool:
    """Whether two states of a FineTuneJob have the same spec: the same object, at the same
    generation (the apiserver counts every change of a custom resource's spec in it)."""
    old, new = indexed["metadata"], kept["metadata"]
    generation = new.get("generation")
    return (
        generation is not None
        and old.get("generation") == generation
        and old.get("uid") is not None
        and old.get("uid") == new.get("uid")
    )


#: A watch cache: a FineTuneJob's key → the objects filed under it (``informer.Index``).
Cache = Mapping[Key, Collection[Obj]]


@dataclass
class Controller:
    """What the handlers share: the indexes, the queue, what this replica wrote recently."""

    finetunejobs: Cache
    jobs: Cache
    pods: Cache
    queue: WorkQueue[Key]
    executor: ThreadPoolExecutor
    lease: LeaseLock | None
    leader: bool = False
    #: Status this replica wrote that the cache may not show yet: read over the cached one.
    written: dict[Key, Obj] | None = None
    #: Jobs (or JobSets) this replica created that the cache may not show yet.
    created: dict[Key, Obj] | None = None
    #: The JobSets' index: only where the settings ask for JobSet.
    jobsets: Cache | None = None
    #: Groups are made as JobSets: the settings ask for it and its CRD was there at start.
    use_jobset: bool = False
    #: Progress the trainers reported, waiting for a status write (None: no endpoint).
    progress: ProgressInbox | None = None
    #: When each namespace's shared trainer NetworkPolicy was last checked (monotonic seconds).
    shared_checked: dict[str, float] | None = None
    #: What each job's last reconcile saw (``seen_mark``): a resync skips a job unchanged since.
    reconciled: dict[Key, tuple[Any, ...]] | None = None
    #: What a job's last pass planned from when its plan had nothing to do (``quiet_mark``):
    #: any event that leaves what the planner reads as it was is skipped (``still_quiet``).
    quiet: dict[Key, tuple[Any, ...]] | None = None

    def __post_init__(self) -> None:
        self.written = {}
        self.created = {}
        self.shared_checked = {}
        self.reconciled = {}
        self.quiet = {}


def index_values(index: Cache, key: Key) -> list[Obj]:
    store = index.get(key)
    return list(store) if store is not None else []


def snapshot(ctl: Controller, key: Key) -> tuple[Obj | None, list[Obj], list[Obj], list[Obj]]:
    """The FineTuneJob, its Jobs, Pods and JobSets as this replica knows them (runs on the event
    loop, where the watch caches change the indexes, so the copy is consistent)."""
    assert ctl.written is not None and ctl.created is not None
    found = index_values(ctl.finetunejobs, key)
    if not found:
        ctl.written.pop(key, None)
        ctl.created.pop(key, None)
        return None, [], [], []
    ftj = dict(found[0])
    status = dict(ftj.get("status") or {})
    written = ctl.written.get(key)
    if written is not None:
        if all(status.get(k) == v for k, v in written.items()):
            del ctl.written[key]  # the cache has caught up with our write
        else:
            ftj["status"] = {**status, **written}
    jobs = index_values(ctl.jobs, key)
    jobsets = index_values(ctl.jobsets, key) if ctl.jobsets is not None else []
    uid = str(ftj["metadata"].get("uid"))
    created = ctl.created.get(key)
    if created is not None:
        name = created["metadata"].get("name")
        cached = jobsets if created.get("kind") == js.KIND else jobs
        if any(
            owned_by(obj, uid) and obj["metadata"].get("name") == name for obj in cached
        ) or not owned_by(created, uid):
            del ctl.created[key]
        else:
            cached.append(created)
    return ftj, jobs, index_values(ctl.pods, key), jobsets


def seen_mark(
    ctl: Controller, key: Key, ftj: Obj, children: tuple[list[Obj], list[Obj], list[Obj]]
) -> tuple[Any, ...]:
    """What a reconcile of ``key`` sees, in short: the resourceVersions of the FineTuneJob and
    of each child in the caches (Jobs, Pods, JobSets), and whether this replica's own writes
    are still overlaid. Two equal marks plan the same (the planner reads time only for what it
    requeues itself)."""

    def versions(objects: list[Obj]) -> tuple[str, ...]:
        return tuple(sorted(str(o["metadata"].get("resourceVersion")) for o in objects))

    assert ctl.written is not None and ctl.created is not None
    jobs, pods, jobsets = children
    return (
        ftj["metadata"].get("resourceVersion"),
        versions(jobs),
        versions(pods),
        versions(jobsets),
        key in ctl.written,
        key in ctl.created,
    )


def quiet_mark(ftj: Obj, mark: tuple[Any, ...]) -> tuple[Any, ...]:
    """What the planner reads of a FineTuneJob and its children, in short, for a pass whose plan
    had nothing to do: its uid, generation (the spec: whole or the part the cache keeps, which
    is all a plan reads unless it makes children), deletion, status, and the children's
    resourceVersions (from ``seen_mark``). Unlike ``seen_mark``, not the FineTuneJob's own
    resourceVersion: the watch event of the operator's own status write changes that, and
    nothing a plan reads."""
    metadata = ftj["metadata"]
    status = ftj.get("status") or {}
    return (
        metadata.get("uid"),
        metadata.get("generation"),
        metadata.get("deletionTimestamp"),
        status,
        *mark[1:4],
    )


def still_quiet(ctl: Controller, key: Key, ftj: Obj, mark: tuple[Any, ...]) -> bool:
    """Whether ``key``'s last pass planned nothing to do (and no later time to look again) from
    what the planner reads now: its status equal, the rest the same. Then this pass would plan
    the same, and is skipped (the planner reads the time only for what it requeues itself);
    the mark takes the status the cache holds now (no older copy is kept alive)."""
    assert ctl.quiet is not None
    before = ctl.quiet.get(key)
    if before is None:
        return False
    now = quiet_mark(ftj, mark)
    if before[:3] != now[:3] or before[4:] != now[4:]:
        return False
    if before[3] is not now[3] and before[3] != now[3]:
        return False
    ctl.quiet[key] = now
    return True
