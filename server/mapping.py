"""Pure mappings from FineTuneJobs to OpenAI's fine-tuning shapes: a FineTuneJob (its spec,
status and Events) → OpenAI's job, event, checkpoint and result-file objects; the annotations
both directions share; cursor pagination. Data in, data out: no I/O. The other direction, a
create request → the manifest, is manifest.py's."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from kubetune.api.models import DpoSpec, TrainingSpec
from kubetune.api.timestamps import parse_rfc3339
from kubetune.api.uris import display_uri
from kubetune.server.errors import bad_request

ANNOTATION = "openai.kubetune.io/"
MODEL = ANNOTATION + "model"
TRAINING_FILE = ANNOTATION + "training-file"
VALIDATION_FILE = ANNOTATION + "validation-file"
SUFFIX = ANNOTATION + "suffix"
METADATA = ANNOTATION + "metadata"
CANCELLED = ANNOTATION + "cancelled-at"
JOB_ID = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
#: What an OpenAI job's status is for each FineTuneJob phase (cancelled comes from the
#: annotation the cancel call sets; a suspended job is "paused", as OpenAI's pause makes it, and
#: runPolicy.suspend decides that before the phase follows).
PHASE_STATUS: Mapping[str | None, str] = {
    None: "validating_files",
    "Pending": "validating_files",
    "Validating": "validating_files",
    "Queued": "queued",
    "Running": "running",
    "Succeeded": "succeeded",
    "Failed": "failed",
    "Suspended": "paused",
}
#: The request field a failure reason points at.
REASON_PARAM: Mapping[str, str] = {
    "DatasetError": "training_file",
    "ModelError": "model",
}
FINISHED = frozenset({"succeeded", "failed", "cancelled"})
#: A succeeded job's result file (its curves as CSV) is named for the job: nothing is stored.
RESULT_FILE = "file-result-"
RESULT_COLUMNS = (
    ("step", "step"), ("train_loss", "loss"), ("learning_rate", "learningRate"),
    ("tokens_per_second", "tokensPerSecond"),
)  # fmt: skip
T = TypeVar("T")


def unix(timestamp: str | None) -> int | None:
    """RFC 3339 → seconds since the epoch; None for none, or for a text that is no time (an
    annotation anyone who may edit the job can write)."""
    if not timestamp:
        return None
    try:
        return int(parse_rfc3339(str(timestamp)).timestamp())
    except (ValueError, OverflowError):
        return None


def base_learning_rate(template: Mapping[str, Any]) -> float:
    """The learning rate a multiplier of 1 means: the template's, else the spec's default."""
    value = (template.get("training") or {}).get("learningRate")
    if value is not None:
        return float(value)
    return float(TrainingSpec.model_fields["learning_rate"].default)


def _annotations(job: Mapping[str, Any]) -> dict[str, str]:
    return dict((job.get("metadata") or {}).get("annotations") or {})


def _metadata(annotations: Mapping[str, str]) -> dict[str, str] | None:
    """The request's metadata as the create request stored it; None where the annotation is
    absent or (edited with kubectl) no JSON object of strings."""
    try:
        value = json.loads(annotations[METADATA])
    except (KeyError, ValueError, RecursionError):
        return None
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        return None
    return value


def _condition(status: Mapping[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c.get("type") == type_), {})


def openai_status(job: Mapping[str, Any]) -> str:
    status = job.get("status") or {}
    mapped = PHASE_STATUS.get(status.get("phase"), "validating_files")
    if mapped in ("succeeded", "failed"):
        return mapped
    if CANCELLED in _annotations(job):
        return "cancelled"
    # What the caller asked for shows at once: paused as soon as runPolicy.suspend is set, and
    # queued again as soon as it is cleared, before the operator has acted on either.
    suspend = bool(((job.get("spec") or {}).get("runPolicy") or {}).get("suspend", False))
    if suspend:
        return "paused"
    if mapped == "paused":
        return "queued"
    return mapped


def base_model_name(job: Mapping[str, Any]) -> str:
    """The model as the caller named it (API jobs), else the spec's model URI."""
    return _annotations(job).get(MODEL) or str(job["spec"]["model"]["uri"])


def fine_tuned_model(job: Mapping[str, Any]) -> str:
    """The adapter's stable name, OpenAI style: ``ft:<base>:<namespace>:<suffix>:<job>``."""
    meta = job["metadata"]
    suffix = _annotations(job).get(SUFFIX, "")
    return f"ft:{base_model_name(job)}:{meta.get('namespace', '')}:{suffix}:{meta['name']}"


def job_of_model(model: str) -> str | None:
    """The job name a fine-tuned model's name ends with."""
    if not model.startswith("ft:"):
        return None
    name = model.rsplit(":", 1)[-1]
    return name if JOB_ID.match(name) else None


def error_of(job: Mapping[str, Any]) -> dict[str, Any] | None:
    status = job.get("status") or {}
    if status.get("phase") != "Failed":
        return None
    failed = _condition(status, "Failed")
    result = status.get("result") or {}
    code = result.get("reason") or failed.get("reason") or "Failed"
    message = failed.get("message") or result.get("message") or "the job failed"
    return {"code": code, "message": message, "param": REASON_PARAM.get(code)}


def _trained_tokens(job: Mapping[str, Any]) -> int | None:
    status = job.get("status") or {}
    if status.get("phase") != "Succeeded":
        return None
    estimate = status.get("estimate") or {}
    tokens, steps = estimate.get("tokens"), estimate.get("steps")
    done = (status.get("progress") or {}).get("step")
    if tokens is None:
        return None
    epochs = (job["spec"].get("training") or {}).get("epochs")
    if epochs is not None:
        return int(tokens * float(epochs))
    if steps and done is not None:
        # Tokens an epoch over the epoch's steps, times the steps taken.
        return int(tokens * done / steps)
    return int(tokens)


def _estimated_finish(job: Mapping[str, Any]) -> int | None:
    status = job.get("status") or {}
    if status.get("phase") != "Running":
        return None
    progress = status.get("progress") or {}
    updated, eta = unix(progress.get("updatedAt")), progress.get("etaSeconds")
    if updated is not None and eta is not None:
        return int(updated + eta)
    start, seconds = unix(status.get("startTime")), (status.get("estimate") or {}).get("seconds")
    if start is not None and seconds is not None:
        return int(start + seconds)
    return None


def hyperparameters_of(job: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    training = job["spec"].get("training") or {}
    defaults = TrainingSpec.model_fields
    lr = float(training.get("learningRate", defaults["learning_rate"].default))
    epochs = training.get("epochs")
    hyper: dict[str, Any] = {
        "batch_size": training.get("batchSize", defaults["batch_size"].default),
        "learning_rate_multiplier": round(lr / base_learning_rate(template), 6),
        "n_epochs": int(epochs) if epochs is not None and float(epochs).is_integer() else epochs,
    }
    if _method_type(job) == "dpo":
        dpo = (job["spec"].get("method") or {}).get("dpo") or {}
        hyper["beta"] = dpo.get("beta", DpoSpec.model_fields["beta"].default)
    return hyper


def _method_type(job: Mapping[str, Any]) -> str:
    return str((job["spec"].get("method") or {}).get("type", "sft"))


def openai_method(job: Mapping[str, Any], hyper: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's ``method`` of a job: supervised, dpo, or (made with kubectl) the spec's type."""
    kind = {"sft": "supervised"}.get(_method_type(job), _method_type(job))
    return {"type": kind, kind: {"hyperparameters": dict(hyper)}}


def openai_job(job: Mapping[str, Any], template: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's ``fine_tuning.job`` for a FineTuneJob."""
    meta = job["metadata"]
    status = job.get("status") or {}
    annotations = _annotations(job)
    state = openai_status(job)
    finished = unix(status.get("completionTime")) or unix(annotations.get(CANCELLED))
    hyper = hyperparameters_of(job, template)
    metadata = _metadata(annotations)
    return {
        "id": meta["name"],
        "object": "fine_tuning.job",
        "created_at": unix(meta.get("creationTimestamp")) or 0,
        "error": error_of(job),
        "fine_tuned_model": fine_tuned_model(job) if state == "succeeded" else None,
        "finished_at": finished if state in FINISHED else None,
        "hyperparameters": hyper,
        "method": openai_method(job, hyper),
        "model": base_model_name(job),
        "organization_id": meta.get("namespace", ""),
        "result_files": [result_file_id(job)] if result_csv(job) is not None else [],
        "seed": (job["spec"].get("training") or {}).get("seed", 42),
        "status": state,
        "trained_tokens": _trained_tokens(job),
        # A job made with kubectl names its data by URI: shown without credentials or query.
        "training_file": annotations.get(TRAINING_FILE)
        or display_uri(str(job["spec"]["dataset"]["uri"])),
        "validation_file": annotations.get(VALIDATION_FILE),
        "estimated_finish": _estimated_finish(job),
        "integrations": [],
        "metadata": metadata,
    }


def result_file_id(job: Mapping[str, Any]) -> str:
    return f"{RESULT_FILE}{job['metadata']['name']}"


def result_csv(job: Mapping[str, Any]) -> str | None:
    """OpenAI's result file of a succeeded job: one CSV row per point of the curves the trainer
    kept (``status.progress.history``); None when there is none."""
    if openai_status(job) != "succeeded":
        return None
    history = ((job.get("status") or {}).get("progress") or {}).get("history") or []
    if not history:
        return None
    rows = [",".join(name for name, _ in RESULT_COLUMNS)]
    for point in history:
        rows.append(
            ",".join("" if point.get(key) is None else str(point[key]) for _, key in RESULT_COLUMNS)
        )
    return "\n".join(rows) + "\n"


def job_sort_key(job: Mapping[str, Any]) -> tuple[str, str]:
    meta = job["metadata"]
    return (str(meta.get("creationTimestamp", "")), str(meta["name"]))


def page(
    items: Sequence[T], after: str | None, limit: int, id_of: Callable[[T], str]
) -> tuple[list[T], bool]:
    """The ``limit`` items after the one whose id is ``after`` (items already in order), and
    whether more follow."""
    if not 1 <= limit <= 100:
        raise bad_request("limit must be from 1 to 100", "limit")
    start = 0
    if after:
        ids = [id_of(item) for item in items]
        if after not in ids:
            raise bad_request(f"after: no item {after!r} in this list", "after")
        start = ids.index(after) + 1
    chosen = list(items[start : start + limit])
    return chosen, start + limit < len(items)


# --- events and checkpoints --------------------------------------------------------------------


def job_events(job: Mapping[str, Any], kube_events: Sequence[Mapping[str, Any]]) -> list[Any]:
    """OpenAI's ``fine_tuning.job.event`` list, newest first: the job's Kubernetes Events (the
    operator's phase changes), its creation, its latest progress as metrics, its end."""
    meta = job["metadata"]
    name = meta["name"]
    status = job.get("status") or {}
    events: list[tuple[float, int, dict[str, Any]]] = []

    def add(
        ident: str, at: int | None, level: str, message: str, *, kind: str = "message",
        data: Any = None, exact: float | None = None,
    ) -> None:  # fmt: skip
        # ``created_at`` has whole seconds: within one, the operator's Events order by their
        # eventTime (``exact``, to the microsecond), and the rest as they are added (creation,
        # the operator's Events, progress, the end), which is the order they happened in.
        events.append((exact or at or 0, len(events), {
                "id": ident,
                "object": "fine_tuning.job.event",
                "created_at": at or 0,
                "level": level,
                "message": message,
                "type": kind,
                "data": data,
            })
        )  # fmt: skip

    add(f"ftevent-{name}-created", unix(meta.get("creationTimestamp")), "info",
        "Created fine-tuning job")  # fmt: skip
    for event in kube_events:
        when = event.get("lastTimestamp") or event.get("eventTime") or event.get("firstTimestamp")
        level = "warn" if event.get("type") == "Warning" else "info"
        uid = (event.get("metadata") or {}).get("uid", "")
        exact = event.get("eventTime")
        add(f"ftevent-{uid}", unix(when), level,
            f"{event.get('reason', '')}: {event.get('message', '')}".strip(": "),
            exact=parse_rfc3339(exact).timestamp() if exact else None)  # fmt: skip
    progress = status.get("progress") or {}
    if progress.get("updatedAt"):
        data = {
            "step": progress.get("step"),
            "total_steps": progress.get("totalSteps"),
            "train_loss": progress.get("loss"),
            "learning_rate": progress.get("learningRate"),
            "tokens_per_second": progress.get("tokensPerSecond"),
        }
        add(f"ftevent-{name}-step-{progress.get('step', 0)}", unix(progress["updatedAt"]), "info",
            f"Step {progress.get('step', 0)}/{progress.get('totalSteps') or '?'}: training loss="
            f"{progress.get('loss')}", kind="metrics", data=data)  # fmt: skip
    state = openai_status(job)
    finished = unix(status.get("completionTime")) or unix(_annotations(job).get(CANCELLED))
    # The end is the newest event: the operator's own Event for it may carry a later second
    # than the Job's completionTime (or be the only time there is).
    finished = max([finished or 0, *(event["created_at"] for *_, event in events)])
    last = max([float(finished), *(exact for exact, *_ in events)])
    if state == "succeeded":
        add(f"ftevent-{name}-succeeded", finished, "info", "The job has successfully completed",
            exact=last)  # fmt: skip
    elif state == "failed":
        error = error_of(job) or {}
        add(f"ftevent-{name}-failed", finished, "error",
            f"The job failed: {error.get('code')}: {error.get('message')}", exact=last)  # fmt: skip
    elif state == "cancelled":
        add(f"ftevent-{name}-cancelled", finished, "info", "The job was cancelled", exact=last)
    ordered = sorted(events, key=lambda e: (e[2]["created_at"], e[0], e[1]), reverse=True)
    return [event for *_, event in ordered]


def job_checkpoints(job: Mapping[str, Any]) -> list[dict[str, Any]]:
    """OpenAI's ``fine_tuning.job.checkpoint`` list: the finished adapter (the run's
    intermediate checkpoints are the trainer's, under the output location, and not in status)."""
    if openai_status(job) != "succeeded":
        return []
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    name = job["metadata"]["name"]
    step = int(progress.get("step") or 0)
    return [
        {
            "id": f"ftckpt-{name}-{step}",
            "object": "fine_tuning.job.checkpoint",
            "created_at": unix(status.get("completionTime")) or 0,
            "fine_tuned_model_checkpoint": fine_tuned_model(job),
            "fine_tuning_job_id": name,
            "metrics": {"step": step, "train_loss": progress.get("loss")},
            "step_number": step,
        }
    ]
