"""Whose progress report the operator takes: the TokenReview's answer read, and the reporting
pod checked against the job it names (pure; tests/operator/test_progress.py runs them against
the real apiserver)."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.token_buckets import TokenBuckets
from kubetune.operator.progress import (
    PodIdentity,
    ProgressInbox,
    identity_of,
    read_report,
    reporting_job,
)

pytestmark = pytest.mark.unit

AUDIENCE = "kubetune.io/progress"
POD = PodIdentity("team-a", "default", "run-1-abcde", "pod-uid")


def review(**user: Any) -> dict[str, Any]:
    return {
        "authenticated": True,
        "audiences": [AUDIENCE],
        "user": {
            "username": "system:serviceaccount:team-a:default",
            "extra": {
                "authentication.kubernetes.io/pod-name": ["run-1-abcde"],
                "authentication.kubernetes.io/pod-uid": ["pod-uid"],
            },
            **user,
        },
    }


def test_a_reviewed_token_names_its_service_account_and_the_pod_it_is_bound_to() -> None:
    assert identity_of(review(), AUDIENCE) == POD


@pytest.mark.parametrize(
    "status",
    [
        {**review(), "authenticated": False},
        {**review(), "audiences": ["https://kubernetes.default.svc"]},
        review(username="alice"),  # not a ServiceAccount
        review(extra={}),  # not bound to a pod
    ],
    ids=["unauthenticated", "other-audience", "a-user", "unbound"],
)
def test_a_token_not_of_kubetunes_audience_or_bound_to_no_pod_is_nobody(
    status: dict[str, Any],
) -> None:
    assert identity_of(status, AUDIENCE) is None


FTJ = {"metadata": {"name": "run-1", "namespace": "team-a", "uid": "ftj-uid"}}
TRAINER_JOB = {"metadata": {"name": "run-1", "uid": "job-uid",
                            "ownerReferences": [{"uid": "ftj-uid", "controller": True}]}}  # fmt: skip
VALIDATION_JOB = {"metadata": {"name": "run-1-validate", "uid": "validation-uid",
                               "ownerReferences": [{"uid": "ftj-uid", "controller": True}]}}  # fmt: skip


def pod(owner: str = "job-uid", name: str = "run-1-abcde", uid: str = "pod-uid") -> dict[str, Any]:
    return {"metadata": {"name": name, "uid": uid,
                         "ownerReferences": [{"uid": owner, "controller": True}]}}  # fmt: skip


def check(identity: PodIdentity = POD, pods: list[dict[str, Any]] | None = None,
          job: dict[str, Any] | None = None) -> str | None:  # fmt: skip
    return reporting_job(
        identity,
        job or {"namespace": "team-a", "name": "run-1", "uid": "ftj-uid"},
        "default",
        ftj=FTJ,
        jobs=[VALIDATION_JOB, TRAINER_JOB],
        pods=[pod()] if pods is None else pods,
        jobsets=[],
    )


def test_the_jobs_own_trainer_pod_may_report() -> None:
    assert check() is None


def test_a_pod_of_another_namespace_or_account_may_not() -> None:
    assert check(PodIdentity("team-b", "default", "run-1-abcde", "pod-uid")) is not None
    assert check(PodIdentity("team-a", "builder", "run-1-abcde", "pod-uid")) is not None


def test_a_pod_that_is_not_the_jobs_or_a_replaced_one_may_not() -> None:
    assert check(pods=[pod(name="other-pod")]) is not None
    assert check(pods=[pod(uid="old-uid")]) is not None  # same name, an earlier pod
    assert check(pods=[pod(owner="validation-uid")]) is not None  # the Validating phase's pod
    assert check(pods=[pod(owner="someone-elses-job")]) is not None


def test_a_report_for_a_job_of_the_same_name_but_another_uid_is_refused() -> None:
    assert check(job={"namespace": "team-a", "name": "run-1", "uid": "deleted-ftj"}) is not None


def test_the_inbox_keeps_the_newest_report_and_writes_it_once_per_interval() -> None:
    inbox = ProgressInbox(interval_seconds=3600)
    key = ("team-a", "run-1")
    assert inbox.put(key, {"step": 1}) == 0.0
    inbox.put(key, {"step": 2})
    assert inbox.take(key) == {"step": 2}
    assert inbox.take(key) is None
    assert inbox.put(key, {"step": 3}) > 0  # not before the interval is up
    assert inbox.take(key) is None
    assert inbox.due_in(key) is not None


def test_a_pod_that_floods_the_endpoint_is_held_to_its_rate_and_others_are_not() -> None:
    limit = TokenBuckets(rate=0.001, burst=3)  # the endpoint keeps one bucket per pod uid
    assert [limit.allow("flooding-pod") for _ in range(5)] == [True, True, True, False, False]
    assert limit.allow("another-pod")


def test_the_runs_last_step_is_written_at_once_whatever_the_interval() -> None:
    inbox = ProgressInbox(interval_seconds=3600)
    key = ("team-a", "run-1")
    inbox.put(key, {"step": 5, "totalSteps": 10})
    assert inbox.take(key) is not None
    assert inbox.put(key, {"step": 10, "totalSteps": 10}) == 0.0
    assert inbox.take(key) == {"step": 10, "totalSteps": 10}


def test_a_report_is_read_as_its_job_and_progress() -> None:
    body = b'{"job": {"namespace": "team-a", "name": "run-1", "uid": "u"}, "progress": {"step": 3}}'
    job, key, progress = read_report(body)
    assert (job["uid"], key, progress.step) == ("u", ("team-a", "run-1"), 3)


def test_a_reports_nan_and_infinities_are_left_out() -> None:
    # The operator writes the report into the status, which the Kubernetes API refuses with one.
    body = (
        b'{"job": {"namespace": "a", "name": "b"}, "progress": {"step": 3, "loss": NaN,'
        b' "tokensPerSecond": Infinity, "history": [{"step": 1, "loss": -Infinity}]}}'
    )
    _, _, progress = read_report(body)
    assert (progress.step, progress.loss, progress.tokens_per_second) == (3, None, None)
    assert progress.history is not None and progress.history[0].loss is None


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b'{"job": "run-1", "progress": {}}',
        b'{"job": {"namespace": "a"}, "progress": {}}',
        b'{"job": {"namespace": "a", "name": "b"}, "progress": {"step": "many"}}',
        b"\xff\xfe",
        # Nested past Python's recursion limit: the decoder's RecursionError was a 500.
        b'{"job": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    ],
)
def test_a_body_of_any_other_shape_is_refused_as_one(body: bytes) -> None:
    with pytest.raises(ValueError, match="not a progress report"):
        read_report(body)
