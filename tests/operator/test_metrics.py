"""The operator's metrics: per-job series follow the watch cache and go with the job."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from kubetune.operator.metrics import FineTuneJobCollector, resource_of

pytestmark = pytest.mark.unit


def scrape(collector: FineTuneJobCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_jobs_are_counted_by_phase_and_progress_series_go_with_the_job() -> None:
    jobs = FineTuneJobCollector()
    jobs.observe(("ns", "a"), {"phase": "Running", "progress": {"step": 4, "loss": 0.5}})
    jobs.observe(("ns", "b"), {"phase": "Running"})
    jobs.observe(("ns", "c"), {})

    text = scrape(jobs)
    assert 'kubetune_finetunejobs{phase="Running"} 2.0' in text
    assert 'kubetune_finetunejobs{phase="Pending"} 1.0' in text
    assert 'kubetune_finetunejob_progress_step{name="a",namespace="ns"} 4.0' in text
    assert 'kubetune_finetunejob_progress_loss{name="a",namespace="ns"} 0.5' in text

    jobs.observe(("ns", "a"), None)
    assert 'name="a"' not in scrape(jobs)


@pytest.mark.parametrize(
    ("path", "resource"),
    [
        ("/api/v1/namespaces/ns/pods", "pods"),
        ("/apis/batch/v1/namespaces/ns/jobs/j", "jobs"),
        ("/apis/kubetune.io/v1alpha1/namespaces/ns/finetunejobs/x/status", "finetunejobs/status"),
        ("/apis/coordination.k8s.io/v1/namespaces/ns/leases/l", "leases"),
    ],
)
def test_api_requests_are_counted_by_resource(path: str, resource: str) -> None:
    assert resource_of(path) == resource
