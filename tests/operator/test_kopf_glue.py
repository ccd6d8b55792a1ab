"""How the operator meets its watches: each change (a deletion too) queues its FineTuneJob once
every kind is listed, then every FineTuneJob is queued once; children are filed by their job's
annotation, through the label kubetune puts on them; and kopf, which now watches only the
trainers' NetworkPolicies, builds no diff base (no handler of this operator reads one)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import kopf
import pytest

from kubetune.operator import kopf_settings, main
from kubetune.operator.caches import Caches
from kubetune.operator.informer import path_namespace, watched_paths
from kubetune.operator.objects import Key

pytestmark = pytest.mark.unit

FTJ: dict[str, Any] = {
    "kind": "FineTuneJob",
    "metadata": {"name": "run-1", "namespace": "team", "uid": "u1", "resourceVersion": "5"},
    "spec": {},
    "status": {"phase": "Running"},
}
JOB: dict[str, Any] = {
    "kind": "Job",
    "metadata": {"name": "run-1-job", "namespace": "team", "resourceVersion": "6",
                 "annotations": {"kubetune.io/finetunejob": "run-1"}},
    "spec": {"suspend": True, "template": {"spec": {"containers": []}}},
}  # fmt: skip


def test_changes_queue_their_job_only_once_every_kind_is_listed_then_every_job_once() -> None:
    async def scenario() -> list[list[Key]]:
        queued: list[Key] = []
        caches = Caches(queued.append)
        seen = []
        caches.finetunejobs.put(
            ("team", "old"), {**FTJ, "metadata": {**FTJ["metadata"], "name": "old"}}
        )
        caches.finetunejobs.put(("team", "run-1"), FTJ)
        caches._finetunejob_changed("ADDED", ("team", "run-1"), FTJ)
        caches._child_changed("ADDED", ("team", "run-1"), JOB)
        seen.append(list(queued))  # the first lists: nothing queued yet
        await caches._queue_all_once_listed()  # every informer listed (none here)
        seen.append(sorted(queued))
        queued.clear()
        caches._child_changed("MODIFIED", ("team", "run-1"), JOB)
        caches._child_changed("DELETED", ("team", "run-1"), JOB)
        caches._finetunejob_changed("DELETED", ("team", "old"), FTJ)
        seen.append(list(queued))  # from now on each change queues its job, a deletion too
        return seen

    before, listed, after = asyncio.run(scenario())
    assert before == []
    assert listed == [("team", "old"), ("team", "run-1")]
    assert after == [("team", "run-1"), ("team", "run-1"), ("team", "old")]


def test_children_are_filed_by_their_jobs_annotation_slimmed_and_jobs_by_their_own_name() -> None:
    caches = Caches(lambda _key: None)
    assert caches.jobs.put(("team", "run-1-job"), JOB) == (None, ("team", "run-1"))
    assert caches.pods.put(("team", "stray"), {"metadata": {"name": "stray"}}) == (None, None)
    (job,) = caches.jobs[("team", "run-1")]
    assert job["spec"] == {"suspend": True} and job["kind"] == "Job"  # no template kept
    assert list(caches.pods) == []
    assert caches.finetunejobs.put(("team", "run-1"), FTJ) == (None, ("team", "run-1"))
    (ftj,) = caches.finetunejobs[("team", "run-1")]
    assert ftj["status"] == {"phase": "Running"}


def test_the_children_are_watched_through_the_label_selector_and_the_jobs_are_not() -> None:
    """The informers ask the apiserver for kubetune's Jobs and Pods only (the label kubetune puts
    on them), every FineTuneJob; kopf, for kubetune's NetworkPolicies only."""
    watches = {w.path: w.selector for w in Caches(lambda _key: None).watches(jobsets=False)}
    managed = "app.kubernetes.io/managed-by=kubetune-operator"
    assert watches == {
        "/apis/kubetune.io/v1alpha1/finetunejobs": None,
        "/apis/batch/v1/jobs": managed,
        "/api/v1/pods": managed,
    }
    settings = kopf.OperatorSettings()
    kopf_settings.configure(settings, kopf.get_default_registry())
    selectors = settings.watching.label_selectors
    policies = kopf.Resource("networking.k8s.io", "v1", "networkpolicies")
    assert selectors.collect(policies) == [managed]


def test_named_namespaces_are_watched_one_by_one_and_a_pattern_is_refused() -> None:
    assert watched_paths("batch", "v1", "jobs", ["a", "b"]) == [
        "/apis/batch/v1/namespaces/a/jobs",
        "/apis/batch/v1/namespaces/b/jobs",
    ]
    assert [path_namespace(p) for p in watched_paths("", "v1", "pods", ["a", "b"])] == ["a", "b"]
    assert path_namespace("/api/v1/pods") is None
    with pytest.raises(ValueError, match="team-\\*: a pattern"):
        watched_paths("", "v1", "pods", ["a", "team-*"])


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


def test_the_operator_freezes_what_it_imported_and_collects_the_young_less_often() -> None:
    before = gc.get_threshold()
    try:
        main.tune_gc()
        assert gc.get_threshold() == main.GC_THRESHOLDS
        assert gc.get_freeze_count() > 10_000  # the modules, kopf's and the client's objects
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
