"""An OpenAI create request → the FineTuneJob manifest: the method and its hyperparameters
(``"auto"`` left to the spec's defaults, the learning-rate multiplier over the template's rate),
the suffix, seed and metadata as annotations, checked by the spec's own model. Data in, data
out: no I/O. The other direction is mapping.py's."""

from __future__ import annotations

import copy
import json
import re
import secrets
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import ValidationError

from kubetune.api.models import FineTuneJobSpec
from kubetune.server.errors import bad_request
from kubetune.server.mapping import (
    METADATA,
    MODEL,
    SUFFIX,
    TRAINING_FILE,
    VALIDATION_FILE,
    base_learning_rate,
)

T = TypeVar("T")
SUFFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")


def new_job_name() -> str:
    return f"ftjob-{secrets.token_hex(8)}"


#: OpenAI's method types → spec.method.type.
METHODS: Mapping[str, str] = {"supervised": "sft", "dpo": "dpo"}
#: The hyperparameters each method takes.
HYPERPARAMETERS: Mapping[str, frozenset[str]] = {
    "supervised": frozenset({"n_epochs", "batch_size", "learning_rate_multiplier"}),
    "dpo": frozenset({"n_epochs", "batch_size", "learning_rate_multiplier", "beta"}),
}


def _object(parent: Mapping[str, Any], key: str, prefix: str = "") -> dict[str, Any]:
    """``parent[key]`` where it is a JSON object, {} where it is absent or null; 400 naming the
    parameter otherwise."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request(f"{prefix}{key} must be an object", f"{prefix}{key}")
    return value


def method_of(request: Mapping[str, Any]) -> str:
    """The OpenAI method type a create request asks for (supervised when it names none)."""
    method = _object(request, "method")
    kind = method.get("type", "supervised")
    if not isinstance(kind, str) or kind not in METHODS:
        raise bad_request(
            f"method {kind!r} is not offered here; use {' or '.join(METHODS)}", "method.type"
        )
    return str(kind)


def _hyperparameters(request: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The hyperparameters of the request (top level, or its method's)."""
    options = _object(_object(request, "method"), kind, "method.")
    hyper = _object(options, "hyperparameters", f"method.{kind}.") or _object(
        request, "hyperparameters"
    )
    unknown = set(hyper) - HYPERPARAMETERS[kind]
    if unknown:
        raise bad_request(
            f"unknown hyperparameters for {kind}: {', '.join(sorted(unknown))}",
            "hyperparameters",
        )
    return hyper


def _positive(value: Any, name: str, kind: Callable[[Any], T]) -> T | None:
    if value is None or value == "auto":
        return None
    if isinstance(value, bool):
        raise bad_request(f"{name} must be a positive number or 'auto'", f"hyperparameters.{name}")
    try:
        number = kind(value)
    except (TypeError, ValueError, OverflowError):
        raise bad_request(
            f"{name} must be a positive number or 'auto'", f"hyperparameters.{name}"
        ) from None
    if not number > 0:  # type: ignore[operator]
        raise bad_request(f"{name} must be a positive number or 'auto'", f"hyperparameters.{name}")
    return number


def _annotations(request: Mapping[str, Any]) -> dict[str, str]:
    """What the OpenAI job shows that the spec doesn't hold: model name, file ids, suffix and
    metadata, as ``openai.kubetune.io/`` annotations."""
    annotations = {MODEL: str(request["model"]), TRAINING_FILE: str(request["training_file"])}
    if request.get("validation_file"):
        annotations[VALIDATION_FILE] = str(request["validation_file"])
    suffix = request.get("suffix")
    if suffix is not None:
        if not isinstance(suffix, str) or not SUFFIX_PATTERN.match(suffix):
            raise bad_request("suffix: 1 to 40 of [A-Za-z0-9_.-]", "suffix")
        annotations[SUFFIX] = suffix
    metadata = request.get("metadata")
    if metadata is not None:
        if (
            not isinstance(metadata, dict)
            or len(metadata) > 16
            or not all(
                isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise bad_request(
                "metadata: at most 16 string pairs (keys to 64, values to 512 characters)",
                "metadata",
            )
        annotations[METADATA] = json.dumps(metadata, sort_keys=True)
    return annotations


def job_manifest(
    name: str,
    namespace: str,
    request: Mapping[str, Any],
    *,
    model_uri: str,
    dataset_uri: str,
    template: Mapping[str, Any],
    output_uri: str,
    eval_uri: str | None = None,
) -> dict[str, Any]:
    """The FineTuneJob a create request asks for: the platform's template, the request's model,
    data (and validation data: ``eval_uri``), method, hyperparameters and seed over it. Checked
    with the API models (400 naming the field)."""
    spec: dict[str, Any] = copy.deepcopy(dict(template))
    spec["model"] = {**(spec.get("model") or {}), "uri": model_uri}
    dataset = {**(spec.get("dataset") or {}), "uri": dataset_uri, "format": "auto"}
    if eval_uri is not None:
        for other in ("evalSplit", "evalFraction"):
            dataset.pop(other, None)
        dataset["evalUri"] = eval_uri
    spec["dataset"] = dataset
    spec["output"] = {**(spec.get("output") or {}), "uri": output_uri}
    training = dict(spec.get("training") or {})
    kind = method_of(request)
    hyper = _hyperparameters(request, kind)
    if kind == "dpo":
        method: dict[str, Any] = {"type": "dpo"}
        beta = _positive(hyper.get("beta"), "beta", float)
        if beta is not None:
            method["dpo"] = {"beta": beta}
        spec["method"] = method
    epochs = _positive(hyper.get("n_epochs"), "n_epochs", int)
    if epochs is not None:
        training.pop("maxSteps", None)
        training["epochs"] = epochs
    batch = _positive(hyper.get("batch_size"), "batch_size", int)
    if batch is not None:
        training["batchSize"] = batch
        training.pop("microBatchSize", None)
    multiplier = _positive(hyper.get("learning_rate_multiplier"), "learning_rate_multiplier", float)
    if multiplier is not None:
        training["learningRate"] = base_learning_rate(template) * multiplier
    seed = request.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= 2**32 - 1:
            raise bad_request("seed must be an integer from 0 to 4294967295", "seed")
        training["seed"] = seed
    spec["training"] = training
    try:
        FineTuneJobSpec.model_validate(spec)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise bad_request(f"the job this asks for is invalid: {where}: {first['msg']}") from None
    annotations = _annotations(request)
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": spec,
    }


# --- read --------------------------------------------------------------------------------------


__all__ = ["job_manifest", "method_of", "new_job_name"]
