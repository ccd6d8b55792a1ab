"""kopf's watch of the trainers' NetworkPolicies, and the task that writes one back: an event
for a policy kubetune labels (deleted, or changed by someone with edit rights) queues the policy's
place; one task a place asks ``policy_restore.wanted`` (pure) what belongs there from the indexes
and writes it with ``creation.ensure_rendered`` on a worker thread, again after the work queue's
backoff if the write fails. Only the leader writes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import kopf

from kubetune.operator import metrics, policy_restore
from kubetune.operator.companions import shared
from kubetune.operator.controller import LOGGER, MANAGED, SETTINGS, Controller, index_values
from kubetune.operator.creation import ensure_rendered
from kubetune.operator.objects import Key, Obj
from kubetune.operator.workqueue import BACKOFF


def register(controller: Callable[[], Controller | None]) -> None:
    """Register the NetworkPolicy event handler with kopf's default registry; ``controller``
    gives the process's controller once it has started (None before)."""

    @kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)  # type: ignore[untyped-decorator]
    async def policy_event(
        type: str | None, namespace: str, name: str, body: kopf.Body, **_: Any
    ) -> None:
        ctl = controller()
        if ctl is None:
            return
        if type == "DELETED" and shared(body):
            assert ctl.shared_checked is not None
            ctl.shared_checked.pop(namespace, None)  # the next job's children check it again
        if not ctl.leader:
            return
        key = (namespace, name)
        running = key in _RESTORING
        _RESTORING[key] = (type, dict(body))
        if not running:
            task = asyncio.create_task(_restore_policy(ctl, key))
            _RESTORE_TASKS.add(task)  # held until done (the loop keeps only weak references)
            task.add_done_callback(_RESTORE_TASKS.discard)


#: NetworkPolicies being put back → the last event seen of each (type, body).
_RESTORING: dict[Key, tuple[str | None, Obj]] = {}
_RESTORE_TASKS: set[asyncio.Task[None]] = set()


async def _restore_policy(ctl: Controller, key: Key) -> None:
    """Write the rendered policy at ``key`` while its last event shows it gone or changed and it
    still belongs there; a failed write is tried again after the work queue's backoff."""
    loop = asyncio.get_running_loop()
    failures = 0
    try:
        while key in _RESTORING and ctl.leader:
            current = _RESTORING[key]
            event_type, body = current
            manifest = policy_restore.wanted(
                body,
                SETTINGS,
                unfinished_job=lambda job: _unfinished(ctl, job),
                namespace_busy=lambda namespace: _namespace_busy(ctl, namespace),
            )
            if manifest is None or not policy_restore.needs_writing(event_type, body, manifest):
                if _RESTORING.get(key) is current:
                    break  # nothing newer came meanwhile
                continue
            outcome = await loop.run_in_executor(ctl.executor, ensure_rendered, manifest)
            if isinstance(outcome, kopf.TemporaryError | kopf.PermanentError):
                wait = BACKOFF[min(failures, len(BACKOFF) - 1)]
                failures += 1
                LOGGER.warning("NetworkPolicy %s/%s: %s (again in %ss)", *key, outcome, wait)
                await asyncio.sleep(wait)
                continue
            LOGGER.warning(
                "NetworkPolicy %s/%s was %s: the rendered one is in place again",
                *key,
                "deleted" if event_type == "DELETED" else "changed",
            )
            metrics.POLICY_RESTORES.inc()
            if shared(manifest):
                assert ctl.shared_checked is not None
                ctl.shared_checked[key[0]] = time.monotonic()
            if _RESTORING.get(key) is current:
                break  # our own write's event may come still: it compares equal, nothing to do
    finally:
        _RESTORING.pop(key, None)


def _unfinished(ctl: Controller, key: Key) -> Obj | None:
    found = index_values(ctl.finetunejobs, key)
    if not found:
        return None
    ftj = found[0]
    assert ctl.written is not None
    written = ctl.written.get(key)
    if written is not None:  # a status this replica wrote that the cache may not show yet
        ftj = {**ftj, "status": {**(ftj.get("status") or {}), **written}}
    return ftj if policy_restore.unfinished(ftj) else None


def _namespace_busy(ctl: Controller, namespace: str) -> bool:
    return any(_unfinished(ctl, key) is not None for key in ctl.finetunejobs if key[0] == namespace)


# --- events → the queue ------------------------------------------------------------------------
