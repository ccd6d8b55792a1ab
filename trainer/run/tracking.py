"""Experiment tracking (``spec.tracking``): MLflow and TensorBoard through transformers' own
callbacks, configured by the environment variables they read.

transformers' ``MLflowCallback`` logs the Trainer's arguments and the model's config as
parameters and every logging step's metrics; its ``TensorBoardCallback`` writes event files.
kubetune adds what only it knows: the run is started here (so a retried pod that resumes from a
checkpoint continues the same MLflow run, found by its ``kubetune.run`` tag), the spec's own
settings go in as ``kubetune.*`` parameters, and once the adapter is published its location,
sha256, base model and dataset fingerprint are set as tags on that same run. Only rank 0 talks to
the server (the recipe starts the run there; the callbacks check ``is_world_process_zero``).

Credentials reach the process only as MLflow's own variables (MLFLOW_TRACKING_USERNAME,
MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_TOKEN), set by the pod from Secret references; their
values are redacted from everything the run writes (see :func:`tracking_secrets`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal

from kubetune.api.contract import MLFLOW_PASSWORD_ENV, MLFLOW_TOKEN_ENV
from kubetune.api.models import FineTuneJobSpec, TrackingRef, TrackingSpec, TrainerResult
from kubetune.api.uris import display_uri
from kubetune.trainer.errors import TrainerFailure, first_line

log = logging.getLogger(__name__)

#: TensorBoard event files go here, under the output (beside the adapter).
TENSORBOARD_DIR: Final = "runs"
#: The tag that finds a run again when a retried pod resumes from a checkpoint.
RUN_TAG: Final = "kubetune.run"
#: The variables holding MLflow's secrets; the pod sets them from Secret references.
_SECRET_ENV: Final = (MLFLOW_PASSWORD_ENV, MLFLOW_TOKEN_ENV)


class TrackingUnavailable(TrainerFailure):
    """The tracking server can't be reached or refuses us: retried (it may come back), and
    found before the model is loaded."""


#: MLflow's own words before the body it quotes, when a server answers with an error.
_MLFLOW_STATUS = re.compile(r"^API request to endpoint \S+ failed with error code (\d{3}) ")


def tracking_failure(exc: BaseException) -> str:
    """Why talking to the tracking server failed, in fixed words and its status code: never its
    answer (a tenant names the server, and whatever it answers would land in the job's status)."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, RestException):
        return f"the server answered an MLflow error (HTTP {exc.get_http_status_code()})"
    if isinstance(exc, MlflowException):
        status = _MLFLOW_STATUS.match(str(exc))
        if status:
            return f"the server answered HTTP {status.group(1)}"
        if str(exc).startswith("API request to ") and " failed with exception " in str(exc):
            return "cannot connect to it"
        if "response body was not in a valid JSON format" in str(exc):
            return "its answer is not MLflow's (not JSON)"
        return f"MLflow failed ({type(exc).__name__}; the trainer's log says why)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot connect to it: {exc.strerror}"
    return f"{type(exc).__name__} (the trainer's log says why)"


def report_to(tracking: TrackingSpec | None) -> list[str]:
    """The ``report_to`` integrations for ``tracking`` (none when unset)."""
    if tracking is None:
        return []
    integrations = []
    if tracking.mlflow is not None:
        integrations.append("mlflow")
    if tracking.tensorboard is not None and tracking.tensorboard.enabled:
        integrations.append("tensorboard")
    return integrations


def run_name(spec: FineTuneJobSpec, job_name: str) -> str | None:
    mlflow = spec.tracking.mlflow if spec.tracking else None
    if mlflow is None:
        return None
    return mlflow.run_name or job_name


def tracking_environment(spec: FineTuneJobSpec, output_dir: Path) -> dict[str, str]:
    """What transformers' callbacks read from the environment for ``spec.tracking``."""
    tracking = spec.tracking
    env: dict[str, str] = {}
    if tracking is None:
        return env
    if tracking.mlflow is not None:
        env["MLFLOW_TRACKING_URI"] = tracking.mlflow.tracking_uri
        env["MLFLOW_EXPERIMENT_NAME"] = tracking.mlflow.experiment_name
        # Nested keys (lora_config.r) rather than parameters dropped for being too long.
        env["MLFLOW_FLATTEN_PARAMS"] = "true"
    if tracking.tensorboard is not None and tracking.tensorboard.enabled:
        env["TENSORBOARD_LOGGING_DIR"] = str(output_dir / TENSORBOARD_DIR)
    return env


def tracking_secrets(environ: Mapping[str, str] | None = None) -> list[str]:
    """The MLflow credentials in the environment: never to be shown anywhere."""
    environ = os.environ if environ is None else environ
    return [environ[name] for name in _SECRET_ENV if environ.get(name)]


def spec_parameters(spec: FineTuneJobSpec) -> dict[str, str]:
    """The spec's settings that the Trainer's arguments don't carry, as ``kubetune.*`` params."""
    lora, quantization = spec.lora, spec.quantization
    return {
        "kubetune.model": display_uri(spec.model.uri),
        "kubetune.model_revision": spec.model.revision,
        "kubetune.dataset": display_uri(spec.dataset.uri),
        "kubetune.dataset_format": spec.dataset.format,
        "kubetune.batch_size": str(spec.training.batch_size),
        "kubetune.lora.r": str(lora.r),
        "kubetune.lora.alpha": str(lora.alpha),
        "kubetune.lora.dropout": str(lora.dropout),
        "kubetune.lora.target_modules": ",".join(lora.target_modules)[:500],
        "kubetune.quantization": quantization.type,
        "kubetune.quantization.double_quant": str(quantization.double_quant).lower(),
        "kubetune.quantization.compute_dtype": quantization.compute_dtype,
        "kubetune.world_size": str(spec.resources.world_size),
    }


def result_tags(result: TrainerResult) -> dict[str, str]:
    """The published adapter, as tags on the run (URIs as ``display_uri`` shows them)."""
    tags: dict[str, str] = {"kubetune.outcome": result.outcome}
    if result.adapter is not None:
        tags["kubetune.adapter.uri"] = result.adapter.uri
        tags["kubetune.adapter.sha256"] = result.adapter.sha256
        tags["kubetune.adapter.size_bytes"] = str(result.adapter.size_bytes)
    if result.base_model is not None:
        tags["kubetune.base_model.uri"] = result.base_model.uri
        if result.base_model.revision:
            tags["kubetune.base_model.revision"] = result.base_model.revision
    if result.dataset_fingerprint:
        tags["kubetune.dataset.fingerprint"] = result.dataset_fingerprint
    return tags


class MlflowRun:
    """The MLflow run of one training, started before the Trainer's callback sees it (which then
    logs into it and leaves ending it to us), tagged after publishing, ended with the outcome."""

    def __init__(self, spec: FineTuneJobSpec, *, identity: str, name: str) -> None:
        assert spec.tracking is not None and spec.tracking.mlflow is not None
        self.settings = spec.tracking.mlflow
        self.spec = spec
        self.identity = identity
        self.name = name
        self.where = display_uri(self.settings.tracking_uri)
        self.run_id: str | None = None
        self.experiment_id: str | None = None

    def reference(self) -> TrackingRef | None:
        """The run, for the result (None before the run started)."""
        if self.run_id is None:
            return None
        return TrackingRef(mlflow_experiment_id=self.experiment_id, mlflow_run_id=self.run_id)

    def start(self, *, resuming: bool) -> None:
        """Attach to this job's run when resuming from a checkpoint, else start a new one. A
        server that can't be reached fails here, before the model is loaded."""
        import mlflow
        from mlflow.exceptions import MlflowException

        mlflow.set_tracking_uri(self.settings.tracking_uri)
        try:
            experiment = mlflow.set_experiment(self.settings.experiment_name)
            self.experiment_id = str(experiment.experiment_id)
            previous = self._previous_run(experiment.experiment_id) if resuming else None
            if previous is not None:
                self.run_id = mlflow.start_run(run_id=previous).info.run_id
                log.info("MLflow: continuing run %s at %s", previous, self.where)
            else:
                run = mlflow.start_run(run_name=self.name, tags={RUN_TAG: self.identity})
                self.run_id = run.info.run_id  # ended by end(), whatever happens next
                mlflow.log_params(spec_parameters(self.spec))
                log.info(
                    "MLflow: run %s in experiment %r at %s",
                    run.info.run_id,
                    self.settings.experiment_name,
                    self.where,
                )
        except (MlflowException, OSError) as exc:
            raise TrackingUnavailable(
                f"MLflow tracking server {self.where} (tracking.mlflow.trackingUri): "
                f"{tracking_failure(exc)}",
                detail=first_line(exc, 500),
            ) from None

    def _previous_run(self, experiment_id: str) -> str | None:
        from mlflow.tracking import MlflowClient

        identity = self.identity.replace("'", "")
        runs = MlflowClient().search_runs(
            [experiment_id],
            filter_string=f"tags.`{RUN_TAG}` = '{identity}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
        return runs[0].info.run_id if runs else None

    def tag_result(self, result: TrainerResult) -> None:
        """The adapter's location and sha256, base model and dataset fingerprint, on the run."""
        from mlflow.tracking import MlflowClient

        assert self.run_id is not None
        client = MlflowClient()
        for key, value in result_tags(result).items():
            client.set_tag(self.run_id, key, value)
        final = {k: v for k, v in result.metrics.items() if k != "steps"}
        if final:
            client.log_batch(self.run_id, metrics=_final_metrics(final))

    def end(self, status: Literal["FINISHED", "FAILED", "KILLED"]) -> None:
        import mlflow

        if self.run_id is None:
            return
        try:
            mlflow.flush_async_logging()
            mlflow.end_run(status)
        except Exception:
            log.warning("MLflow: could not end run %s at %s", self.run_id, self.where)


def _final_metrics(metrics: Mapping[str, float]) -> list[Any]:
    import time

    from mlflow.entities import Metric

    stamp = int(time.time() * 1000)
    return [Metric(f"final/{key}", value, stamp, 0) for key, value in sorted(metrics.items())]
