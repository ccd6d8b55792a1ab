"""How the handlers meet kopf: each watch event queues its FineTuneJob from the index handler
kopf calls for it anyway (once every index is filled), the on.event handlers take only what no
index handler sees (deletions, events before the indexes are filled), and kopf builds no diff
base (no handler of this operator reads one)."""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf
import pytest

from kubetune.operator import handlers, kopf_settings, main
from kubetune.operator.controller import Controller
from kubetune.operator.workqueue import WorkQueue

pytestmark = pytest.mark.unit

FTJ: dict[str, Any] = {
    "kind": "FineTuneJob",
    "metadata": {"name": "run-1", "namespace": "team", "uid": "u1", "resourceVersion": "5"},
    "spec": {},
    "status": {"phase": "Running"},
}
JOB_ANNOTATIONS = {"kubetune.io/finetunejob": "run-1"}


def controller() -> Controller:
    return Controller(
        finetunejobs={("team", "old"): [{}]},  # type: ignore[arg-type]  # a kopf.Index's keys
        jobs={},  # type: ignore[arg-type]
        pods={},  # type: ignore[arg-type]
        queue=WorkQueue(),
        executor=ThreadPoolExecutor(1),
        lease=None,
        leader=True,
    )


def queued(ctl: Controller) -> list[tuple[str, str]]:
    return list(ctl.queue._urgent)


def test_index_handlers_queue_their_job_only_once_kopf_filled_every_index(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> list[list[tuple[str, str]]]:
        ctl = controller()
        monkeypatch.setattr(handlers, "_controller", ctl)
        monkeypatch.setattr(handlers, "_listed", False)
        seen = []
        body = kopf.Body(FTJ)
        await handlers.finetunejobs_index(namespace="team", name="run-1", body=body)
        await handlers.jobs_index(namespace="team", annotations=JOB_ANNOTATIONS, body=body)
        seen.append(queued(ctl))  # the first listing: nothing queued yet
        # kopf calls an on.event handler only once every index is filled: every job is queued.
        await handlers.job_event(annotations=JOB_ANNOTATIONS, namespace="team")
        seen.append(sorted(queued(ctl)))
        ctl.queue = WorkQueue()
        await handlers.jobs_index(namespace="team", annotations=JOB_ANNOTATIONS, body=body)
        seen.append(queued(ctl))  # from now on, the index handler queues the event's job
        return seen

    before, listed, after = asyncio.run(scenario())
    assert before == []
    assert listed == [("team", "old"), ("team", "run-1")]
    assert after == [("team", "run-1")]


def test_the_event_handlers_take_deletions_and_only_them_once_the_indexes_are_filled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(handlers, "_listed", False)
    assert handlers._unindexed(type=None) and handlers._unindexed(type="MODIFIED")
    monkeypatch.setattr(handlers, "_listed", True)
    assert handlers._unindexed(type="DELETED")
    assert not handlers._unindexed(type="ADDED") and not handlers._unindexed(type="MODIFIED")
    assert not handlers._unindexed(type=None)  # a relisting after a watch broke
    registry = kopf.get_default_registry()
    ours = (handlers.finetunejob_event, handlers.job_event, handlers.pod_event)
    filters = [h.when for h in registry._watching.get_all_handlers() if h.fn in ours]
    assert filters == [handlers._unindexed] * 3


def test_kopf_builds_no_diff_base_as_no_handler_reads_one() -> None:
    registry = kopf.get_default_registry()
    assert kopf_settings.uses_no_diff(registry)
    settings = kopf.OperatorSettings()
    kopf_settings.configure(settings, registry)
    storage = settings.persistence.diffbase_storage
    assert isinstance(storage, kopf_settings.NoDiffBase)
    assert storage.build(body=kopf.Body(FTJ)) == {}
    stored = {**FTJ, "metadata": {**FTJ["metadata"], "annotations": {
        "kubetune.io/last-handled-configuration": '{"spec": {"a": 1}}'}}}  # fmt: skip
    assert storage.fetch(body=kopf.Body(stored)) is None  # an older operator's is not read
    # An operator that did register a handler reading diffs would get kopf's own diff base.
    other = kopf.OperatorRegistry()
    kopf.on.update("example.com", "v1", "things", registry=other)(lambda **_: None)
    kopf_settings.configure(settings, other)
    assert not isinstance(settings.persistence.diffbase_storage, kopf_settings.NoDiffBase)


def test_the_children_are_watched_through_the_label_selector_and_the_jobs_are_not() -> None:
    """kopf asks the apiserver for kubetune's Jobs, Pods, JobSets and NetworkPolicies only (the
    label the handlers filter on); every FineTuneJob is the operator's."""
    settings = kopf.OperatorSettings()
    kopf_settings.configure(settings, kopf.get_default_registry())
    selectors = settings.watching.label_selectors
    for group, version, plural in (("batch", "v1", "jobs"), ("", "v1", "pods")):
        found = selectors.collect(kopf.Resource(group, version, plural))
        assert found == ["app.kubernetes.io/managed-by=kubetune-operator"]
    assert selectors.collect(kopf.Resource("kubetune.io", "v1alpha1", "finetunejobs")) == []


def test_the_operator_freezes_what_it_imported_and_collects_the_young_less_often() -> None:
    before = gc.get_threshold()
    try:
        main.tune_gc()
        assert gc.get_threshold() == main.GC_THRESHOLDS
        assert gc.get_freeze_count() > 10_000  # the modules, kopf's and the client's objects
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
