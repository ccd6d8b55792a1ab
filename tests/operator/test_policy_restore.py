"""Which trainer NetworkPolicy the operator writes back after someone deleted or changed it."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune.api.models import FineTuneJobSpec
from kubetune.operator.companions import TRAINERS_POLICY, trainers_policy
from kubetune.operator.policy_restore import needs_writing, unfinished, wanted
from kubetune.operator.render import render
from kubetune.operator.settings import OperatorSettings

pytestmark = pytest.mark.unit

SETTINGS = OperatorSettings()
UID = "0b5e6c1e-2f4d-4c6a-9c1e-4f2b7d3a9e10"


def ftj(phase: str | None, nodes: int = 2, uid: str = UID) -> dict[str, Any]:
    return {
        "metadata": {"name": "pair", "namespace": "team", "uid": uid},
        "spec": {"resources": {"nodes": nodes}},
        "status": {"phase": phase} if phase else {},
    }


def group_policy_of(uid: str = UID) -> dict[str, Any]:
    spec = FineTuneJobSpec.model_validate({
        "model": {"uri": "org/model"}, "dataset": {"uri": "https://example.com/d.jsonl"},
        "output": {"uri": "s3://bucket/a"}, "resources": {"nodes": 2, "gpus": 0},
    })  # fmt: skip
    children = render(spec, {"name": "pair", "namespace": "team", "uid": uid}, SETTINGS)
    return next(
        c
        for c in children
        if c["kind"] == "NetworkPolicy" and c["metadata"]["name"] == "pair-trainer"
    )


def decide(policy: dict[str, Any], job: dict[str, Any] | None) -> dict[str, Any] | None:
    return wanted(
        policy,
        SETTINGS,
        unfinished_job=lambda key: job if key == ("team", "pair") else None,
        namespace_busy=lambda namespace: job is not None and namespace == "team",
    )


def test_the_shared_policy_is_put_back_while_a_job_of_the_namespace_is_unfinished() -> None:
    shared = trainers_policy("team", SETTINGS)
    assert decide(shared, ftj("Suspended")) == shared
    assert decide(shared, None) is None


def test_a_groups_policy_is_put_back_as_rendered_for_its_own_unfinished_job() -> None:
    rendered = group_policy_of()
    assert decide(rendered, ftj("Running")) == rendered
    assert decide(rendered, None) is None  # finished or gone: the caller found none unfinished
    # A policy of an earlier job of the same name (another uid) is not this job's to restore.
    assert decide(group_policy_of("another-uid"), ftj("Running")) is None


def test_only_a_deleted_or_changed_policy_is_written_again() -> None:
    shared = trainers_policy("team", SETTINGS)
    assert needs_writing("DELETED", shared, shared)
    assert not needs_writing("MODIFIED", shared, shared)  # this operator's own write, seen back
    opened = {**shared, "spec": {**shared["spec"], "egress": [{}]}}
    assert needs_writing("MODIFIED", opened, shared)
    assert shared["metadata"]["name"] == TRAINERS_POLICY


def test_a_finished_or_deleted_job_needs_no_policy() -> None:
    assert unfinished(ftj(None)) and unfinished(ftj("Suspended"))
    assert not unfinished(ftj("Succeeded")) and not unfinished(ftj("Failed"))
    going = ftj("Running")
    going["metadata"]["deletionTimestamp"] = "2026-12-05T20:00:00Z"
    assert not unfinished(going)
