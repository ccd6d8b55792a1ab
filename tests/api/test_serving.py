"""The serving manifests built from a job's spec and status, without a cluster: the bases and
locations each stack can load, and a clear refusal for the rest (tests/cli/test_serve_manifest.py
applies them to a real apiserver)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from kubetune.api.serving import NotServable, render

pytestmark = pytest.mark.unit


def job(output: str, *, base: str = "meta-llama/Llama-2-7b-hf", r: int = 16) -> dict[str, Any]:
    return {
        "metadata": {"name": "support", "namespace": "team-a"},
        "spec": {
            "model": {"uri": base},
            "dataset": {"uri": "pvc://data/train.jsonl"},
            "output": {"uri": output},
            "lora": {"r": r},
        },
        "status": {
            "phase": "Succeeded",
            "result": {
                "outcome": "Succeeded",
                "reason": "Succeeded",
                "adapter": {"uri": output, "sha256": "a" * 64, "sizeBytes": 1},
                "baseModel": {"uri": base},
            },
        },
    }


def vllm_args(objects: list[dict[str, Any]]) -> list[str]:
    return list(objects[0]["spec"]["template"]["spec"]["containers"][0]["args"])


def test_vllm_serves_a_base_on_a_claim_from_the_mounted_claim() -> None:
    objects = render(job("pvc://adapters/support", base="pvc://models/llama"), "vllm")
    args = vllm_args(objects)
    assert args[args.index("--model") + 1] == "/models/base"
    pod = objects[0]["spec"]["template"]["spec"]
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["/models/base"]["subPath"] == "llama"


def test_vllm_max_lora_rank_is_the_smallest_it_accepts_that_holds_r() -> None:
    args = vllm_args(render(job("pvc://adapters/support", r=12), "vllm"))
    assert args[args.index("--max-lora-rank") + 1] == "16"
    module = json.loads(args[args.index("--lora-modules") + 1])
    assert module == {
        "name": "support",
        "path": "/adapters/support",
        "base_model_name": "meta-llama/Llama-2-7b-hf",
    }


def test_kserve_takes_a_base_in_a_bucket_as_it_is() -> None:
    (service,) = render(job("s3://b/adapters/support", base="s3://b/models/llama"), "kserve")
    assert service["spec"]["model"]["uri"] == "s3://b/models/llama"


@pytest.mark.parametrize(
    ("stack", "output", "base", "says"),
    [
        ("vllm", "pvc://adapters/support", "s3://b/models/llama", "--for kserve"),
        ("kaito", "pvc://adapters/support", "pvc://models/llama", "Hugging Face model id"),
        ("kaito", "pvc://adapters/support", "meta-llama/Llama-2-7b-hf", "pvc://<claim>"),
        ("kaito", "gs://b/adapters/support", "meta-llama/Llama-2-7b-hf", "oci://"),
        ("kserve", "/tmp/out", "meta-llama/Llama-2-7b-hf", "local disk"),
    ],
)
def test_what_a_stack_cannot_load_is_refused_with_what_to_do(
    stack: str, output: str, base: str, says: str
) -> None:
    with pytest.raises(NotServable) as refused:
        render(job(output, base=base), stack)  # type: ignore[arg-type]
    assert says in str(refused.value)


def test_a_job_that_has_not_succeeded_has_nothing_to_serve() -> None:
    running = job("pvc://adapters/support")
    running["status"] = {"phase": "Running"}
    with pytest.raises(NotServable, match="no adapter to serve yet"):
        render(running, "kserve")
