"""What a run leaves behind: digests, the model card, the loss curve, result.json, and the
termination message the operator copies into ``status.result``."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from kubetune.api.contract import (
    TERMINATION_LOG_ENV,
    TERMINATION_MESSAGE_LIMIT,
    TERMINATION_MESSAGE_PATH,
)
from kubetune.api.documents import finite_only
from kubetune.api.models import FineTuneJobSpec, TrainerResult
from kubetune.api.uris import display_uri

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_CARD_FILE = "README.md"
RESULT_FILE = "result.json"
METRICS_FILE = "metrics.jsonl"
LOSS_CURVE_FILE = "loss_curve.png"
MERGED_DIR = "merged"


def result_json(result: TrainerResult) -> dict[str, Any]:
    """The result as JSON the Kubernetes API takes (a NaN metric, say a diverged evaluation's
    loss, left out)."""
    dumped: dict[str, Any] = finite_only(
        result.model_dump(by_alias=True, exclude_none=True, mode="json")
    )
    return dumped


def termination_message(result: TrainerResult) -> str:
    """The result as JSON within 4 KiB: evaluation samples go first, then the message is cut."""
    text = json.dumps(result_json(result), separators=(",", ":"))
    if len(text.encode()) <= TERMINATION_MESSAGE_LIMIT:
        return text
    result = result.model_copy(update={"evaluation": None})
    text = json.dumps(result_json(result), separators=(",", ":"))
    while len(text.encode()) > TERMINATION_MESSAGE_LIMIT and result.message:
        keep = max(0, len(result.message) - (len(text.encode()) - TERMINATION_MESSAGE_LIMIT) - 16)
        result = result.model_copy(update={"message": result.message[:keep] + "..."})
        text = json.dumps(result_json(result), separators=(",", ":"))
        if keep == 0:
            break
    return text


def write_termination_message(result: TrainerResult) -> Path | None:
    """Write where Kubernetes reads it; on a laptop there is no such file, and that is fine."""
    path = Path(os.environ.get(TERMINATION_LOG_ENV, TERMINATION_MESSAGE_PATH))
    try:
        with path.open("w", encoding="utf-8") as f:
            f.write(termination_message(result))
    except OSError as exc:
        log.debug("no termination message written to %s: %s", path, exc.strerror)
        return None
    return path


def write_result(directory: Path, result: TrainerResult) -> Path:
    path = directory / RESULT_FILE
    path.write_text(json.dumps(result_json(result), indent=2) + "\n", encoding="utf-8")
    return path


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def forget_metrics_after(path: Path, step: int) -> int:
    """Drop the metrics lines logged after ``step``: a run resumed from the checkpoint of that
    step logs those steps again, and only the lines of the steps that count should stay.
    Returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        if json.loads(line).get("step", 0) > step:
            dropped += 1
        else:
            kept.append(line + "\n")
    if dropped:
        partial = path.with_name(path.name + ".partial")
        partial.write_text("".join(kept), encoding="utf-8")
        partial.replace(path)
    return dropped


def plot_loss_curve(metrics: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    evaluation = [(m["step"], m["eval_loss"]) for m in metrics if "eval_loss" in m]
    if not train and not evaluation:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display in a pod
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        axes.plot(*zip(*train, strict=True), label="train loss")
    if evaluation:
        axes.plot(*zip(*evaluation, strict=True), "o-", label="eval loss")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def model_card(
    name: str,
    spec: FineTuneJobSpec,
    result: TrainerResult,
    effective: dict[str, Any],
) -> str:
    """A README.md in the hub's model-card shape: front matter, then what a reader needs."""
    training = spec.training
    hyper = {
        "quantization": f"{spec.quantization.type}"
        + (" + double quant" if spec.quantization.double_quant else "")
        + f", compute {spec.quantization.compute_dtype}",
        "lora r / alpha / dropout": f"{spec.lora.r} / {spec.lora.alpha} / {spec.lora.dropout}",
        "target modules": ", ".join(spec.lora.target_modules),
        "learning rate": training.learning_rate,
        "batch size (effective)": training.batch_size,
        "max length": training.max_length,
        "scheduler / warmup": f"{training.lr_scheduler} / {training.warmup_ratio}",
        "seed": training.seed,
        **effective,
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in hyper.items())
    metrics = "\n".join(f"| {k} | {v:.4g} |" for k, v in sorted(result.metrics.items()))
    front = {
        "base_model": display_uri(spec.model.uri),
        "library_name": "peft",
        "tags": ["kubetune", "qlora", "lora", "sft", "trl"],
    }
    samples = ""
    if result.evaluation and result.evaluation.samples:
        samples = "\n## Samples\n\n| prompt | base | adapter |\n|---|---|---|\n" + "\n".join(
            f"| {_cell(s.prompt)} | {_cell(s.base)} | {_cell(s.adapter)} |"
            for s in result.evaluation.samples
        )
    return (
        "---\n"
        + "\n".join(f"{k}: {json.dumps(v)}" for k, v in front.items())
        + "\n---\n\n"
        + f"# {name}\n\n"
        + "A QLoRA adapter trained by kubetune (TRL SFTTrainer, PEFT LoRA, bitsandbytes 4-bit).\n\n"
        + f"- base model: `{display_uri(spec.model.uri)}` at revision `{spec.model.revision}`\n"
        + (
            f"- continued from the adapter `{result.base_model.adapter}`\n"
            if result.base_model is not None and result.base_model.adapter
            else ""
        )
        + f"- dataset: `{display_uri(spec.dataset.uri)}` (format {spec.dataset.format}), "
        + "fingerprint "
        + f"`{result.dataset_fingerprint}`\n"
        + (f"- adapter sha256: `{result.adapter.sha256}`\n" if result.adapter else "")
        + "\n## Hyperparameters\n\n| setting | value |\n|---|---|\n"
        + rows
        + "\n\n## Metrics\n\n| metric | value |\n|---|---|\n"
        + metrics
        + "\n"
        + samples
        + "\n\n![loss curve](loss_curve.png)\n"
    )


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:200]
