"""The merge of a 7B adapter on the GPU machine (``output.merge``): seconds, peak host memory and
peak GPU memory for each base (``mergeBase: original`` and ``dequantized``), through the trainer's
own ``kubetune.trainer.publish.merging.merge_adapter``. Figures in docs/performance.md.

Weights don't change the cost: a Llama-2-7B-shaped model is initialised in bfloat16 from its
config and saved to /tmp, with a LoRA adapter (r 16, all-linear, random non-zero B) beside it
(../shared/gpu/README.md). Each merge runs in a process of its own, so its peaks are its own.

    bash bench/gpu.sh python3 bench/merge_7b.py --out bench/results/merge-7b.jsonl
    .venv/bin/python bench/merge_7b.py --smoke --out /tmp/merge-smoke.jsonl   # CPU, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("KUBETUNE_MERGE_BENCH_DIR", "/tmp/kubetune-merge-bench"))
BASE = ROOT / "base"
ADAPTER = ROOT / "adapter"


#: Llama-2-7B's shape; --smoke shrinks it to check the script on a CPU in seconds.
SHAPE = {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32}
SMOKE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}


def prepare(shape: dict[str, int]) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    if (ADAPTER / "adapter_config.json").is_file():
        return
    config = LlamaConfig(
        **shape,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
        max_position_embeddings=4096,
    )
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(BASE)
    lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, lora).save_pretrained(ADAPTER)
    del model
    torch.cuda.empty_cache()


def merge_once(into: str) -> dict[str, Any]:
    import torch

    from kubetune.api.models import FineTuneJobSpec
    from kubetune.trainer.publish.merging import merge_adapter

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": str(BASE)},
            "dataset": {"uri": str(ROOT / "data.jsonl")},
            "output": {"uri": str(ROOT / "out")},
            "quantization": {"type": "nf4", "doubleQuant": True, "computeDtype": "bfloat16"},
        }
    )
    target = ROOT / f"merged-{into}"
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    merge_adapter(spec, ADAPTER, target, into=into, token=None)  # type: ignore[arg-type]
    seconds = time.perf_counter() - start
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    shutil.rmtree(target)
    return {
        "mergeBase": into,
        "seconds": round(seconds, 1),
        "peak_host_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        "merged_gib": round(size / 2**30, 2),
        "gpu": torch.cuda.get_device_name() if cuda else None,
        "torch": torch.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--smoke", action="store_true", help="a 2-layer model: check the script")
    parser.add_argument("--one", choices=["original", "dequantized"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(merge_once(args.one)))
        return 0
    ROOT.mkdir(parents=True, exist_ok=True)
    prepare(SMOKE if args.smoke else SHAPE)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for into in ("original", "dequantized"):
        run = subprocess.run(
            [sys.executable, __file__, "--out", str(args.out), "--one", into],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if run.returncode != 0:
            print(run.stderr[-3000:], file=sys.stderr)
            return run.returncode
        line = run.stdout.strip().splitlines()[-1]
        print(line)
        with args.out.open("a") as out:
            out.write(line + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
