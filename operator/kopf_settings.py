"""kopf's settings for this operator: its storage, peering, scanning, watches and retries, and a
diff-base storage that builds nothing (the operator has no handler that reads a diff)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Final, cast

import kopf

from kubetune.api.models import GROUP
from kubetune.operator.controller import MANAGED, SETTINGS

#: The kinds kopf watches only for kubetune's own objects (the handlers' ``labels=MANAGED``):
#: the trainers' NetworkPolicies. FineTuneJobs and the children are the informers' (caches.py).
MANAGED_KINDS: Final = (("networking.k8s.io", "v1", "networkpolicies"),)


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):  # type: ignore[misc]
    """A diff base of nothing. kopf builds an object's "essence" (a deep copy of the whole
    body, then a deep copy of that) on every watch event, to find what changed for its
    on.create, on.update, on.resume handlers and its daemons. This operator registers none of
    those (only indexes and on.event handlers: ``uses_no_diff``), so nothing ever reads the
    diff, and those copies were a fifth of kopf's CPU per event. Nothing is stored on the
    objects either way, and nothing is read back (``fetch``)."""

    def build(
        self,
        *,
        body: kopf.Body,
        extra_fields: Iterable[object] | None = None,
    ) -> kopf.BodyEssence:
        return cast(kopf.BodyEssence, {})

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        """No last-handled state to read either: kopf looked up (and parsed) its annotation on
        every event, for a diff nothing reads."""
        return None


def uses_no_diff(registry: kopf.OperatorRegistry) -> bool:
    """Whether no handler of ``registry`` reads kopf's diff (what ``NoDiffBase`` drops): no
    on.create/update/delete/resume/field handler and no daemon or timer."""
    return not registry._changing.get_all_handlers() and not registry._spawning.get_all_handlers()


def configure(settings: kopf.OperatorSettings, registry: kopf.OperatorRegistry) -> None:
    """kopf's settings for this operator (its handlers in ``registry``): its storage, peering,
    scanning, watches and retries."""
    # Only indexes and event handlers: kopf stores nothing on a FineTuneJob (no finalizer, no
    # progress annotations); the state is the objects themselves.
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    # No handler reads a diff: kopf builds none (were one added, its diffs would be kopf's own).
    storage = NoDiffBase if uses_no_diff(registry) else kopf.AnnotationsDiffBaseStorage
    settings.persistence.diffbase_storage = storage(prefix=GROUP, key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    # Replicas coordinate through the Lease (operator/leader.py), not kopf's peering.
    settings.peering.standalone = True
    if SETTINGS.namespaces:
        # Named namespaces (a pattern is refused at start, informer.check_namespaces): nothing
        # to discover. Scanning would list namespaces, which the chart grants no right to in
        # that mode, and kopf retries that for about a minute before it serves anything.
        settings.scanning.disabled = True
    # A watch ends on the server's timeout; the client's is a backstop for a connection that
    # broke without a word. Watches ask for bookmarks, which the apiserver sends about once a
    # minute, so one silent for longer than the inactivity timeout is dead (a dropped NAT entry,
    # a stuck proxy) and is started again from its last resourceVersion.
    settings.watching.server_timeout = SETTINGS.watch_timeout_seconds
    settings.watching.client_timeout = SETTINGS.watch_timeout_seconds + 30
    settings.watching.inactivity_timeout = SETTINGS.watch_inactivity_seconds
    settings.watching.connect_timeout = 30
    # The trainers' NetworkPolicies are watched through the apiserver's label selector: the
    # handler takes only kubetune's (labels=MANAGED) and kopf would otherwise receive, parse and
    # drop every other policy of the namespaces (of the cluster, watching all of them).
    managed = ",".join(f"{label}={value}" for label, value in MANAGED.items())
    for kind in MANAGED_KINDS:
        settings.watching.label_selectors[kind] = managed
    # The first list of each watch comes in pages (the informers' too: SETTINGS.list_chunk_size).
    settings.watching.chunk_size = SETTINGS.list_chunk_size
    settings.networking.request_timeout = SETTINGS.api_timeout_seconds
    settings.execution.max_workers = SETTINGS.max_workers
    # An object's kopf worker holds its last event's body until it exits, this long idle (5 s).
    settings.queueing.idle_timeout = 1.0
    settings.queueing.error_delays = [1, 2, 5, 10, 30, 60]
