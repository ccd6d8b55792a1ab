"""Real tokens/s and peak GPU memory: kubetune's trainer path vs plain TRL defaults.

Run on a GPU machine (see ../shared/gpu/README.md for the setup; nothing is downloaded):

    PYTHONUNBUFFERED=1 python bench/qlora_throughput.py --shape llama2-7b --out results.jsonl

The model is built from a config (speed and memory don't depend on weight values), saved once
to ``--model-dir`` and then loaded by each configuration through its own 4-bit path. The data is
pre-tokenised and synthetic, with a realistic length mix (log-normal, median ~380 tokens, capped
at the max length), so padding waste is part of what is measured. Each configuration runs in its
own process, so peak memory and compiled kernels don't leak from one into the next. Tokens/s
counts real tokens (TRL's ``num_tokens``: attention-mask sums, or packed lengths without padding)
over the steps after the warm-up; peak memory is ``torch.cuda.max_memory_allocated()``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

SHAPES: dict[str, dict[str, int]] = {
    "llama2-7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },
    "llama3-8b": {
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "vocab_size": 128256,
    },
    # For trying the script itself in a minute.
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1024,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "vocab_size": 32000,
    },
}
MODES = ("kubetune", "trl-defaults")
#: Variants for comparisons: kubetune with another optimizer; TRL with the hand-set best flags of
#: ../shared/gpu/README.md (packing + Liger + flex attention, gradient checkpointing on).
EXTRA_MODES = ("kubetune-adamw", "trl-best")


def build_model(shape: str, directory: Path) -> None:
    """Random bf16 weights on the GPU, saved with a (tiny) tokenizer so loaders find one."""
    if (directory / "config.json").exists():
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kubetune_devtools.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        **SHAPES[shape],
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    started = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    # Initialising 7B parameters takes seconds on a GPU and many minutes on a CPU.
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    print(f"built {shape} in {time.perf_counter() - started:.0f}s at {directory}", flush=True)


def synthetic_dataset(count: int, max_length: int, vocab: int, seed: int = 0) -> Any:
    from datasets import Dataset

    rng = random.Random(seed)  # noqa: S311 -- synthetic data, not secrets
    rows = []
    for _ in range(count):
        length = int(min(max_length, max(16, rng.lognormvariate(math.log(380), 0.7))))
        rows.append([rng.randrange(400, vocab) for _ in range(length)])
    return Dataset.from_dict({"input_ids": rows})


def throughput_callback(warmup: int, record: dict[str, Any]) -> Any:
    from transformers import TrainerCallback

    class Throughput(TrainerCallback):  # type: ignore[misc]
        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if not logs or "num_tokens" not in logs:
                return
            point = (time.perf_counter(), float(logs["num_tokens"]), state.global_step)
            if state.global_step == warmup:
                record["start"] = point
            record["end"] = point

    return Throughput()


def run_kubetune(args: argparse.Namespace, dataset: Any, record: dict[str, Any]) -> Any:
    """The trainer exactly as a FineTuneJob with default settings runs it, data aside."""
    from kubetune.api.config import TrainerConfig
    from kubetune.api.models import FineTuneJobSpec
    from kubetune.trainer.data import PreparedData
    from kubetune.trainer.recipe import QLoRASFTRecipe

    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": str(args.model_dir)},
            "dataset": {"uri": "synthetic.jsonl"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "targetModules": ["all-linear"]},
            "training": {
                "maxSteps": args.steps,
                "batchSize": args.batch,
                "microBatchSize": args.batch,
                "maxLength": args.max_length,
                "loggingSteps": 1,
                "checkpointSteps": 1_000_000,
                **({"optimizer": "adamw_torch"} if args.mode == "kubetune-adamw" else {}),
            },
            "output": {"uri": str(Path(args.work) / f"{args.mode}-out")},
        }
    )
    recipe = QLoRASFTRecipe(TrainerConfig(spec=spec))

    def synthetic_data() -> None:
        recipe.data = PreparedData(
            train=dataset,
            eval=None,
            format="text",
            fingerprint="synthetic",
            assistant_only_loss=False,
            completion_only_loss=False,
        )

    recipe._setup_data = synthetic_data  # type: ignore[method-assign]
    recipe.setup()
    record["settings"] = recipe.speed.__dict__ if recipe.speed else {}
    recipe._trainer.add_callback(throughput_callback(args.warmup, record))
    recipe.train()


def run_trl_defaults(args: argparse.Namespace, dataset: Any, record: dict[str, Any]) -> Any:
    """What the TRL documentation's QLoRA example does: SFTConfig defaults, padded batches
    (``trl-best``: with the hand-set flags packing, Liger and flex attention)."""
    best = args.mode == "trl-best"
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        args.model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        dtype=torch.bfloat16,
        device_map={"": 0 if torch.cuda.is_available() else "cpu"},
        **({"attn_implementation": "flex_attention"} if best else {}),
    )
    record["settings"] = {"attention": model.config._attn_implementation, "packing": best,
                          "liger_kernel": best}  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(Path(args.work) / "trl-out"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            max_length=args.max_length,
            learning_rate=2e-4,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            packing=best,
            use_liger_kernel=best,
            gradient_checkpointing=True,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        callbacks=[throughput_callback(args.warmup, record)],
    )
    trainer.train()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    dataset = synthetic_dataset(args.examples, args.max_length, SHAPES[args.shape]["vocab_size"])
    record: dict[str, Any] = {"mode": args.mode, "shape": args.shape}
    started = time.perf_counter()
    try:
        (run_kubetune if args.mode.startswith("kubetune") else run_trl_defaults)(
            args, dataset, record
        )
    except torch.cuda.OutOfMemoryError:
        record["error"] = "out of memory"
    record["wall_seconds"] = round(time.perf_counter() - started, 1)
    if "start" in record and "end" in record and record["end"][2] > record["start"][2]:
        (t0, n0, s0), (t1, n1, s1) = record.pop("start"), record.pop("end")
        record["tokens_per_second"] = round((n1 - n0) / (t1 - t0), 1)
        record["timed_steps"] = s1 - s0
    record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    record["card"] = torch.cuda.get_device_name() if cuda else "cpu"
    record["versions"] = _versions()
    return record


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    names = ("torch", "transformers", "trl", "peft", "bitsandbytes", "liger-kernel")
    found = {}
    for name in names:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            found[name] = "absent"
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument(
        "--mode", choices=MODES + EXTRA_MODES, help="run one configuration (internal)"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="configurations, in order")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4, help="sequences per device per step")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--work", default="/tmp/kubetune-bench")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-results.jsonl"))
    args = parser.parse_args()
    args.model_dir = args.model_dir or Path(args.work) / f"model-{args.shape}"

    if args.mode:
        record = measure(args)
        with args.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record), flush=True)
        return 0

    build_model(args.shape, args.model_dir)
    results = {}
    for mode in args.modes.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
        subprocess.run(command, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines = args.out.read_text().splitlines() if args.out.exists() else []
        for line in lines:
            record = json.loads(line)
            results[record["mode"]] = record
    if {"kubetune", "trl-defaults"} <= set(results):
        fast = results["kubetune"].get("tokens_per_second")
        base = results["trl-defaults"].get("tokens_per_second")
        if fast and base:
            print(f"kubetune / TRL defaults: {fast / base:.2f}x real tokens/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
