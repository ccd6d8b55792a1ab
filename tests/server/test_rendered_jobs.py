"""The hot reads' encoded jobs (server/rendered.py): the same JSON the mapping gives, and a job
that changed is never shown as it was (no cluster)."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from kubetune.server import mapping
from kubetune.server.context import list_of
from kubetune.server.rendered import RenderedJobs

pytestmark = pytest.mark.unit

TEMPLATE = {"training": {"maxSteps": 10, "learningRate": 1.0e-2}}


def job(
    name: str, version: str, phase: str = "Running", namespace: str = "team-a"
) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": version,
                     "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"model": {"uri": "pvc://work/model"}, "dataset": {"uri": "pvc://data/a.jsonl"},
                 "output": {"uri": "pvc://work/adapters/x"}},
        "status": {"phase": phase},
    }  # fmt: skip


def test_a_jobs_json_is_the_openai_job_the_mapping_makes() -> None:
    rendered = RenderedJobs(TEMPLATE)
    shown = job("ftjob-1", "7")
    assert json.loads(rendered.job_json(shown)) == mapping.openai_job(shown, TEMPLATE)
    assert json.loads(rendered.job_json(shown))["status"] == "running"


def test_a_job_that_changed_is_shown_as_it_is_now() -> None:
    rendered = RenderedJobs(TEMPLATE)
    assert json.loads(rendered.job_json(job("ftjob-1", "7")))["status"] == "running"
    done = job("ftjob-1", "8", phase="Failed")
    assert json.loads(rendered.job_json(done))["status"] == "failed"
    # The same name in another namespace is another job.
    other = job("ftjob-1", "8", phase="Succeeded", namespace="team-b")
    assert json.loads(rendered.job_json(other))["status"] == "succeeded"
    assert json.loads(rendered.job_json(done))["status"] == "failed"


def test_a_job_without_a_resource_version_is_rendered_each_time() -> None:
    rendered = RenderedJobs(TEMPLATE)
    first = job("ftjob-1", "")
    assert json.loads(rendered.job_json(first))["status"] == "running"
    changed = copy.deepcopy(first)
    changed["status"]["phase"] = "Succeeded"
    assert json.loads(rendered.job_json(changed))["status"] == "succeeded"


@pytest.mark.parametrize("count, more", [(0, False), (1, True), (3, False)])
def test_a_page_is_openais_list_envelope_around_the_jobs(count: int, more: bool) -> None:
    rendered = RenderedJobs(TEMPLATE)
    jobs = [job(f"ftjob-{i}", str(i + 1)) for i in range(count)]
    page = json.loads(rendered.page_json(jobs, more))
    assert page == list_of([mapping.openai_job(j, TEMPLATE) for j in jobs], more)
