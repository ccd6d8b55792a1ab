"""The operator's Prometheus metrics (served on their own port by ``metrics_server``).

FineTuneJobs by phase and the per-job progress gauges follow the watch cache, so every replica
reports them; transitions, reconciles and API requests count what this replica did.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Final

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import REGISTRY, GaugeMetricFamily
from prometheus_client.registry import Collector

from kubetune.operator.objects import Key

PHASES: Final = ("Pending", "Validating", "Queued", "Running", "Suspended", "Succeeded", "Failed")

RECONCILE_SECONDS: Final = Histogram(
    "kubetune_reconcile_duration_seconds",
    "Time of one reconcile of a FineTuneJob, API calls included.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
RECONCILES: Final = Counter(
    "kubetune_reconciles_total", "Reconciles by result (ok, retry, error).", ["result"]
)
TRANSITIONS: Final = Counter(
    "kubetune_phase_transitions_total",
    "Phase changes the operator wrote, by previous and new phase.",
    ["from_phase", "to_phase"],
)
API_REQUESTS: Final = Counter(
    "kubetune_api_requests_total",
    "Requests of the operator's own (watches aside) to the Kubernetes API by verb, resource and "
    "HTTP status (0: no answer).",
    ["verb", "resource", "code"],
)
API_ERRORS: Final = Counter(
    "kubetune_api_errors_total",
    "Failed requests to the Kubernetes API (status >= 400 or no answer), by verb and status.",
    ["verb", "code"],
)
POLICY_RESTORES: Final = Counter(
    "kubetune_network_policy_restores_total",
    "Trainer NetworkPolicies written again after someone deleted or changed them.",
)
RETRIES: Final = Counter(
    "kubetune_reconcile_retries_total", "Reconciles queued again after a failure."
)
QUEUE_DEPTH: Final = Gauge("kubetune_workqueue_depth", "FineTuneJobs waiting for a reconcile.")
LEADER: Final = Gauge("kubetune_leader", "1 while this replica is the active one, else 0.")
CREATE_TO_JOB_SECONDS: Final = Histogram(
    "kubetune_create_to_job_seconds",
    "From a FineTuneJob's creationTimestamp to its Job created by this replica.",
    buckets=(0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
)


def resource_of(path: str) -> str:
    """``pods``, ``finetunejobs/status``, ``leases``: the resource an API path names."""
    parts = path.split("?", 1)[0].strip("/").split("/")
    if "namespaces" in parts:
        index = parts.index("namespaces") + 2
        rest = parts[index:] if len(parts) > index else parts[index - 2 : index - 1]
    else:
        rest = parts[3:] if parts[:1] == ["apis"] else parts[2:]
    if len(rest) >= 3:
        return f"{rest[0]}/{rest[2]}"
    return rest[0] if rest else "unknown"


_PROGRESS_FIELDS: Final = {
    "step": "kubetune_finetunejob_progress_step",
    "percent": "kubetune_finetunejob_progress_percent",
    "loss": "kubetune_finetunejob_progress_loss",
    "tokensPerSecond": "kubetune_finetunejob_progress_tokens_per_second",
    "etaSeconds": "kubetune_finetunejob_progress_eta_seconds",
}
_PROGRESS_HELP: Final = {
    "step": "Optimizer steps done (status.progress.step).",
    "percent": "Percent complete (status.progress.percent).",
    "loss": "Latest training loss (status.progress.loss).",
    "tokensPerSecond": "Real tokens per second (status.progress.tokensPerSecond).",
    "etaSeconds": "Estimated seconds to finish (status.progress.etaSeconds).",
}


class FineTuneJobCollector(Collector):
    """Phases and progress of the FineTuneJobs in the watch cache, read at scrape time; a job
    that is gone has no series."""

    def __init__(self) -> None:
        self._jobs: dict[Key, tuple[str, dict[str, float]]] = {}

    def observe(self, key: Key, status: Mapping[str, Any] | None) -> None:
        """Called on every FineTuneJob event (None: deleted)."""
        if status is None:
            self._jobs.pop(key, None)
            return
        progress = status.get("progress") or {}
        values = {
            field: float(progress[field])
            for field in _PROGRESS_FIELDS
            if isinstance(progress.get(field), int | float)
        }
        self._jobs[key] = (str(status.get("phase") or "Pending"), values)

    def phase_of(self, key: Key) -> str | None:
        entry = self._jobs.get(key)
        return entry[0] if entry else None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        jobs = dict(self._jobs)  # a copy is atomic: the event loop may change the dict meanwhile
        by_phase = GaugeMetricFamily(
            "kubetune_finetunejobs", "FineTuneJobs in the watch cache by phase.", labels=["phase"]
        )
        counts = dict.fromkeys(PHASES, 0)
        # One pass over every job; the progress series only from those that report (a
        # Validating, Queued or finished job has none): a scrape at 10,000 retained jobs walks
        # them once, not once per progress field.
        reporting = []
        for key, (phase, values) in jobs.items():
            counts[phase] = counts.get(phase, 0) + 1
            if values:
                reporting.append((key, values))
        for phase, count in counts.items():
            by_phase.add_metric([phase], count)
        yield by_phase
        for field, metric in _PROGRESS_FIELDS.items():
            family = GaugeMetricFamily(metric, _PROGRESS_HELP[field], labels=["namespace", "name"])
            for (namespace, name), values in reporting:
                if field in values:
                    family.add_metric([namespace, name], values[field])
            yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


JOBS: Final = FineTuneJobCollector()
REGISTRY.register(JOBS)
