"""Property-based: whatever a tenant's spec or the cluster's objects say, the operator's pure core
never crashes and always ends in a condition a person can read."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kubetune.api.contract import CONDITION_TYPES, Reason
from kubetune.api.models import FineTuneJobStatus
from kubetune.operator.planner import plan
from kubetune.operator.settings import OperatorSettings
from kubetune.operator.status import derive_status, rejected_status

pytestmark = pytest.mark.unit

NOW = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SETTINGS = OperatorSettings()
UID = "ftj-uid"
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

text = st.text(max_size=40)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(), text)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(text, inner, max_size=4)),
    max_leaves=20,
)

URIS = st.sampled_from(
    ["org/model", "hf://org/m", "s3://b/k", "pvc://claim/p", "ftp://x/y", "../up", "", "gs://b/o"]
)
spec_fields = st.fixed_dictionaries(
    {
        "model": st.fixed_dictionaries(
            {"uri": URIS},
            optional={"revision": text, "trustRemoteCode": st.booleans(), "junk": json_values},
        ),
        "dataset": st.fixed_dictionaries(
            {"uri": URIS}, optional={"format": st.sampled_from(["auto", "text", "nope"])}
        ),
        "output": st.fixed_dictionaries({"uri": URIS}),
    },
    optional={
        "training": st.dictionaries(
            st.sampled_from(["epochs", "maxSteps", "batchSize", "learningRate", "maxLength"]),
            st.one_of(st.integers(-3, 64), st.floats(allow_nan=True), text),
            max_size=4,
        ),
        "resources": st.dictionaries(
            st.sampled_from(["gpus", "cpu", "memory"]), scalars, max_size=3
        ),
        "runPolicy": st.dictionaries(
            st.sampled_from(["suspend", "backoffLimit", "activeDeadlineSeconds"]),
            st.one_of(st.booleans(), st.integers(0, 1000)),
            max_size=3,
        ),
        "podTemplate": json_values,
        "image": text,
        "surprise": json_values,
    },
)


def finetunejob(spec: Any, status: Any = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "fuzz", "namespace": "ns", "uid": UID, "generation": 3},
        "spec": spec,
        "status": status or {},
    }


def readable(status: dict[str, Any]) -> None:
    """JSON the Kubernetes API takes (no NaN or infinity), parses as the CRD's status, and its
    Ready condition says why in words."""
    json.dumps(status, allow_nan=False)
    parsed = FineTuneJobStatus.model_validate(status)
    assert parsed.phase is not None
    types = [c.type for c in parsed.conditions]
    assert "Ready" in types and set(types) <= set(CONDITION_TYPES)
    ready = next(c for c in parsed.conditions if c.type == "Ready")
    assert ready.reason and ready.reason.isidentifier() and ready.reason[0].isupper()
    if parsed.phase == "Failed":
        failed = next(c for c in parsed.conditions if c.type == "Failed")
        assert failed.status == "True" and failed.message


@FUZZ
@given(spec_fields)
def test_any_spec_is_created_or_fails_with_a_readable_condition(spec: dict[str, Any]) -> None:
    work = plan(finetunejob(spec), [], [], SETTINGS, NOW)
    # A valid spec starts: its Validating phase's Job, or (validation off) the trainer's.
    started = work.validate if work.validate is not None else work.create
    assert (started is None) != (work.reject is None)
    if work.reject is not None:
        assert work.reject.reason in {Reason.INVALID_SPEC, Reason.DENIED}
        assert work.reject.message
        readable(rejected_status(finetunejob(spec), work.reject, NOW))


container_state = st.one_of(
    st.just({}),
    st.fixed_dictionaries({"running": st.fixed_dictionaries({"startedAt": st.just("2026-01-02T03:00:00Z")})}),
    st.fixed_dictionaries(
        {
            "terminated": st.fixed_dictionaries(
                {"exitCode": st.integers(-1, 300)},
                optional={
                    "reason": st.sampled_from(["Error", "OOMKilled", "Completed", ""]),
                    "message": st.one_of(
                        text,
                        st.builds(json.dumps, json_values),
                        st.builds(
                            json.dumps,
                            st.fixed_dictionaries(
                                {"outcome": st.sampled_from(["Succeeded", "Failed"]),
                                 "reason": st.sampled_from(["DatasetError", "x", ""])},
                                optional={"adapter": json_values, "metrics": json_values},
                            ),
                        ),
                    ),
                },
            )
        }
    ),
    st.fixed_dictionaries(
        {"waiting": st.fixed_dictionaries({"reason": st.sampled_from(
            ["ImagePullBackOff", "CreateContainerConfigError", "ContainerCreating", ""])},
            optional={"message": text})}
    ),
)  # fmt: skip
pods = st.lists(
    st.fixed_dictionaries(
        {
            "metadata": st.fixed_dictionaries(
                {
                    "name": st.sampled_from(["p-1", "p-2", "p-3"]),
                    "creationTimestamp": st.sampled_from(
                        ["2026-01-02T03:00:00Z", "2026-01-02T03:01:00Z"]
                    ),
                    "ownerReferences": st.just([{"uid": "job-uid", "controller": True}]),
                },
                optional={"deletionTimestamp": st.just("2026-01-02T03:02:00Z")},
            ),
            "status": st.fixed_dictionaries(
                {"phase": st.sampled_from(["Pending", "Running", "Succeeded", "Failed", "Unknown"])},
                optional={
                    "startTime": st.just("2026-01-02T03:00:01Z"),
                    "containerStatuses": st.lists(
                        st.fixed_dictionaries(
                            {"name": st.sampled_from(["trainer", "sidecar"]), "state": container_state},
                            optional={"lastState": container_state},
                        ),
                        max_size=2,
                    ),
                    "conditions": st.lists(
                        st.fixed_dictionaries({
                            "type": st.sampled_from(["PodScheduled", "Ready", "DisruptionTarget"]),
                            "status": st.sampled_from(["True", "False"]),
                            "reason": st.sampled_from(["Unschedulable", "x"]),
                        }, optional={"message": text}),
                        max_size=2,
                    ),
                },
            ),
        }
    ),
    max_size=3,
)  # fmt: skip
job_conditions = st.lists(
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["Complete", "Failed", "FailureTarget", "SuccessCriteriaMet", "Suspended"]),
            "status": st.sampled_from(["True", "False"]),
        },
        optional={"reason": st.sampled_from(["BackoffLimitExceeded", "DeadlineExceeded", "PodFailurePolicy", ""]),
                  "message": text},
    ),
    max_size=3,
)  # fmt: skip
jobs = st.one_of(
    st.none(),
    st.builds(
        lambda conditions, suspend, counts: {
            "metadata": {
                "name": "fuzz",
                "uid": "job-uid",
                "resourceVersion": "1",
                "ownerReferences": [{"uid": UID, "controller": True}],
            },
            "spec": {"suspend": suspend},
            "status": {"conditions": conditions, **counts},
        },
        job_conditions,
        st.booleans(),
        st.dictionaries(st.sampled_from(["active", "failed", "succeeded"]), st.integers(0, 5)),
    ),
)
previous_status = st.one_of(
    st.just({}),
    st.fixed_dictionaries(
        {},
        optional={
            "phase": st.sampled_from(["Pending", "Running", "Queued", "Suspended"]),
            "attempts": st.integers(0, 5),
            "podName": st.sampled_from(["p-1", "p-9"]),
            "startTime": st.just("2026-01-02T03:00:00Z"),
            "progress": st.just({"step": 3}),
        },
    ),
)


@FUZZ
@given(jobs, pods, previous_status, st.booleans())
def test_any_job_and_pods_derive_a_readable_status(
    job: dict[str, Any] | None, pod_list: list[dict[str, Any]], previous: Any, queued: bool
) -> None:
    spec = {"scheduling": {"queueName": "q"}} if queued else {}
    ftj = finetunejob(spec, previous)
    status = derive_status(ftj, job, pod_list, NOW)
    readable(status)
    assert "progress" not in status
    if job is not None:
        work = plan(ftj, [job], pod_list, SETTINGS, NOW)
        assert work.create is None and work.reject is None
        assert "progress" not in (work.status_patch or {})
