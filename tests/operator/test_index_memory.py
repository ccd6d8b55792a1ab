"""What the operator's in-memory indexes hold per retained FineTuneJob (docs/performance.md, "Where
the operator's memory goes"): each job's index entries, its FineTuneJob and its Job, are parsed
from separate watch events, as the operator gets them; what they keep is the same data a
reconcile reads, and the strings repeated from job to job (condition types, reasons, messages,
timestamps of a burst, the owner's name and uid) are held once."""

from __future__ import annotations

import gc
import json
import tracemalloc
from typing import Any

import pytest

from kubetune.operator.caches import Caches
from kubetune.operator.informer import place

pytestmark = pytest.mark.unit

JOBS = 500
STAMP = "2026-12-06T00:05:11Z"
SUSPENDED = "suspended by spec.runPolicy.suspend"


def condition(type_: str, status: str, reason: str, message: str = SUSPENDED) -> dict[str, Any]:
    return {"lastTransitionTime": STAMP, "message": message, "observedGeneration": 1,
            "reason": reason, "status": status, "type": type_}  # fmt: skip


def suspended_finetunejob(i: int) -> dict[str, Any]:
    """A validated, suspended FineTuneJob as the apiserver sends it (the side-by-side bench's)."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": f"retained-{i:05d}", "namespace": "bench-retained",
                     "uid": f"{i:08d}-f410-4981-a80b-a75e93a9e31b", "generation": 1,
                     "resourceVersion": str(100_000 + 2 * i), "creationTimestamp": STAMP},
        "spec": {"model": {"uri": "org/model"}, "output": {"uri": "s3://bucket/adapter"},
                 "dataset": {"uri": "https://datasets.invalid/train.jsonl"},
                 "resources": {"gpus": 0}, "runPolicy": {"suspend": True, "backoffLimit": 0},
                 "validation": {"enabled": True}},
        "status": {
            "conditions": [
                condition("Ready", "False", "Suspended"),
                condition("Running", "False", "Suspended"),
                condition("Succeeded", "False", "InProgress", ""),
                condition("Failed", "False", "NoFailure"),
                condition("Suspended", "True", "Suspended"),
            ],
            "observedGeneration": 1, "phase": "Suspended", "worldSize": 1,
        },
    }  # fmt: skip


def validation_job(i: int) -> dict[str, Any]:
    owner = suspended_finetunejob(i)["metadata"]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": f"{owner['name']}-validate", "namespace": owner["namespace"],
            "uid": f"{i:08d}-0000-4981-a80b-a75e93a9e31b", "generation": 1,
            "resourceVersion": str(100_001 + 2 * i), "creationTimestamp": STAMP,
            "labels": {"app.kubernetes.io/managed-by": "kubetune", "kubetune.io/job-uid": owner["uid"]},
            "annotations": {"kubetune.io/finetunejob": owner["name"]},
            "ownerReferences": [{"apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob",
                                 "name": owner["name"], "uid": owner["uid"],
                                 "controller": True, "blockOwnerDeletion": True}],
        },
        "spec": {"suspend": True, "activeDeadlineSeconds": 600, "backoffLimit": 0,
                 "template": {"spec": {"containers": [{"name": "validate", "image": "x"}]}}},
        "status": {
            "conditions": [{"lastProbeTime": STAMP, "lastTransitionTime": STAMP,
                            "message": "Job suspended", "reason": "JobSuspended",
                            "status": "True", "type": "Suspended"}],
            "ready": 0, "terminating": 0, "uncountedTerminatedPods": {},
        },
    }  # fmt: skip


def indexed(
    events: list[tuple[str, str]],
) -> tuple[Caches, list[tuple[dict[str, Any], dict[str, Any]]]]:
    """Each event parsed and filed in the operator's own indexes (``caches.Caches``, returned:
    what they hold besides the objects, a key's store and an object's place, is counted too)."""
    caches = Caches(lambda _key: None)
    kept = []
    for ftj, job in events:
        body, child = json.loads(ftj), json.loads(job)
        _, key = caches.finetunejobs.put(place(body["metadata"]), body)
        caches.jobs.put(place(child["metadata"]), child)
        assert key is not None
        (slimmed,) = caches.finetunejobs[key]
        (slimmed_job,) = caches.jobs[key]
        kept.append((slimmed, slimmed_job))
    return caches, kept


def test_a_retained_job_costs_its_indexes_under_six_kib() -> None:
    events = [(json.dumps(suspended_finetunejob(i)), json.dumps(validation_job(i)))
              for i in range(JOBS)]  # fmt: skip
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        caches, kept = indexed(events)
        gc.collect()
        per_job = (tracemalloc.get_traced_memory()[0] - before) / JOBS
    finally:
        tracemalloc.stop()

    assert len(caches.jobs) == JOBS
    # was 9.2 KB a job before the entries were compacted; of the 5.8 now, ~0.8 is the indexes'
    # own (a store per key, each object's place)
    assert per_job < 6 * 1024
    ftj, job = kept[7]
    assert ftj["status"] == suspended_finetunejob(7)["status"]
    assert job["metadata"]["ownerReferences"] == validation_job(7)["metadata"]["ownerReferences"]
    assert job["spec"] == {"suspend": True, "activeDeadlineSeconds": 600}
