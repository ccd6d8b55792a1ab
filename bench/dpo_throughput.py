"""DPO on the QLoRA path: kubetune's default preference path vs plain TRL ``DPOTrainer``.

Run on a GPU machine (see ../shared/gpu/README.md; nothing is downloaded):

    PYTHONUNBUFFERED=1 python bench/dpo_throughput.py --shape llama2-7b --out results.jsonl

The model is built from a config and saved once, as ``bench/qlora_throughput.py`` does (the
same ``--model-dir`` is shared). The data are synthetic preference pairs as text (decoded from
random ids of the saved tokenizer, so each trainer tokenizes them itself, as it would a user's
file): a prompt (log-normal, median ~260 tokens) and a chosen and a rejected answer (log-normal,
median ~220), each sequence capped at ``--max-length``. Each configuration runs in its own
process. The modes:

- ``kubetune-dpo``: a FineTuneJob with ``method: {type: dpo}`` and no speed knob set, through
  kubetune's own trainer (its memory plan, optimizer choice, fused LoRA layers);
- ``trl-dpo-best``: plain TRL ``DPOTrainer`` with the best hand-set flags for the same QLoRA
  job: no gradient checkpointing, Liger's kernels (TRL keeps its own fused LM head), LoRA
  dropout 0, fused AdamW, ``--batch`` pairs a step;
- ``kubetune-dpo-no-liger``: the same without Liger's layer kernels (RMSNorm, SwiGLU, RoPE; on
  in the default path, TRL keeping its own fused LM head), to measure that lever alone;
- ``kubetune-dpo-padded``: the same with SDPA attention, so its micro-batches run padded as
  TRL's do (the default unpads them: ``kubetune.trainer.model.packed_pairs``);
- ``trl-dpo-defaults``: ``DPOConfig``'s defaults (checkpointing on, batch 8 pairs), with the
  job's max length.

Reported per configuration: ``tokens_per_second`` (TRL's ``num_tokens``: the attention-mask sum,
the prompt counted once in each of the pair's two sequences, no padding), ``pair_tokens_per_second``
(prompt + chosen + rejected once, the same count scaled by the data's ratio of the two),
``pairs_per_second`` and peak GPU memory (``torch.cuda.max_memory_allocated()``), over the steps
after ``--warmup``; the ratios of kubetune's to each other configuration's.
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
from pathlib import Path
from typing import Any

from qlora_throughput import (
    SHAPES,
    _versions,
    append_record,
    build_model,
    load_4bit_base,
    run_each_mode,
    run_timed,
    throughput_callback,
    train_with_recipe,
)

MODES = (
    "kubetune-dpo",
    "trl-dpo-best",
    "trl-dpo-defaults",
    "kubetune-dpo-no-liger",
    "kubetune-dpo-padded",
)


def synthetic_pairs(
    count: int, max_length: int, tokenizer: Any, seed: int = 0
) -> tuple[Any, dict[str, float]]:
    """Preference pairs as text, and the data's token counts (prompt + chosen + rejected once,
    and as the two sequences a trainer sees)."""
    from datasets import Dataset

    rng = random.Random(seed)  # noqa: S311 -- synthetic data, not secrets
    # Words that are one token each with their leading space, so lengths come out as drawn.
    words = [
        tokenizer.convert_tokens_to_string([token])
        for token in tokenizer.get_vocab()
        if token.startswith("\u0120") and token[1:].isalpha()
    ]
    words = [w for w in words if len(tokenizer(w, add_special_tokens=False).input_ids) == 1]

    def text(median: float, cap: int) -> str:
        length = int(min(cap, max(8, rng.lognormvariate(math.log(median), 0.6))))
        return "".join(rng.choice(words) for _ in range(length))

    rows: dict[str, list[str]] = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(count):
        rows["prompt"].append(text(260, max_length // 2))
        rows["chosen"].append(text(220, max_length // 2))
        rows["rejected"].append(text(220, max_length // 2))
    sample = min(count, 200)
    lengths = {k: [len(tokenizer(v).input_ids) for v in rows[k][:sample]] for k in rows}
    once = sum(lengths["prompt"]) + sum(lengths["chosen"]) + sum(lengths["rejected"])
    seen = once + sum(lengths["prompt"])
    counts = {
        "words": len(words),
        "mean_prompt_tokens": round(sum(lengths["prompt"]) / sample, 1),
        "mean_answer_tokens": round(
            (sum(lengths["chosen"]) + sum(lengths["rejected"])) / (2 * sample), 1
        ),
        "pair_tokens_over_sequence_tokens": round(once / seen, 4),
    }
    return Dataset.from_dict(rows), counts


def run_kubetune(args: argparse.Namespace, dataset: Any, record: dict[str, Any]) -> None:
    """The trainer exactly as a FineTuneJob with ``method: {type: dpo}`` runs it, data aside."""
    from kubetune.api.models import FineTuneJobSpec

    cap = f"-cap{args.memory_cap_gib:g}" if args.memory_cap_gib else ""
    output = Path(args.work) / f"{args.shape}-{args.mode}{cap}"
    shutil.rmtree(output, ignore_errors=True)
    training: dict[str, Any] = {
        "maxSteps": args.steps,
        "maxLength": args.max_length,
        "loggingSteps": args.logging_steps,
        "checkpointSteps": 1_000_000,
    }
    if args.kubetune_batch:
        training["batchSize"] = args.kubetune_batch
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": str(args.model_dir)},
            "dataset": {"uri": "synthetic.jsonl", "format": "preference"},
            "method": {"type": "dpo"},
            "training": training,
            "output": {"uri": str(output)},
        }
    )
    if args.mode in ("kubetune-dpo-no-liger", "kubetune-dpo-padded"):
        from dataclasses import replace

        from kubetune.trainer.run import preference

        keep = preference.preference_speed
        no_liger = args.mode == "kubetune-dpo-no-liger"
        change = {"liger_kernel": False} if no_liger else {"attention": "sdpa"}
        preference.preference_speed = lambda s: replace(keep(s), **change)  # type: ignore[assignment]
    recipe = train_with_recipe(
        spec, dataset, record, throughput_callback(args.warmup, record), data_format="preference"
    )
    record["pairs_per_step"] = (
        recipe.plan.micro_batch_size * recipe.plan.gradient_accumulation_steps
    )


def run_trl(args: argparse.Namespace, dataset: Any, record: dict[str, Any]) -> None:
    """Plain TRL ``DPOTrainer`` on the same 4-bit base and adapter."""
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    best = args.mode == "trl-dpo-best"
    tokenizer, model = load_4bit_base(args.model_dir)
    flags: dict[str, Any] = {}
    if best:
        flags = {
            "per_device_train_batch_size": args.batch,
            "gradient_checkpointing": False,
            "use_liger_kernel": torch.cuda.is_available(),
            "optim": "adamw_torch_fused",
        }
    record["settings"] = {"attention": model.config._attn_implementation, **flags}
    config = DPOConfig(
        output_dir=str(Path(args.work) / "trl-dpo-out"),
        max_steps=args.steps,
        max_length=args.max_length,
        logging_steps=args.logging_steps,
        save_strategy="no",
        report_to=[],
        bf16=torch.cuda.is_available(),
        **flags,
    )
    record["pairs_per_step"] = config.per_device_train_batch_size
    record["settings"]["gradient_checkpointing"] = config.gradient_checkpointing
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0 if best else 0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        callbacks=[throughput_callback(args.warmup, record)],
    )
    trainer.train()


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoTokenizer

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        if args.memory_cap_gib:
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    dataset, counts = synthetic_pairs(args.examples, args.max_length, tokenizer)
    record: dict[str, Any] = {
        "mode": args.mode,
        "shape": args.shape,
        "batch": args.batch,
        "memory_cap_gib": args.memory_cap_gib,
        "data": counts,
    }
    run_timed(run_kubetune if args.mode.startswith("kubetune") else run_trl, args, dataset, record)
    record.pop("_last_step", None)
    record.pop("_train_begin", None)
    if "start" in record and "end" in record and record["end"][2] > record["start"][2]:
        (t0, n0, s0), (t1, n1, s1) = record.pop("start"), record.pop("end")
        seconds = t1 - t0
        record["tokens_per_second"] = round((n1 - n0) / seconds, 1)
        record["pair_tokens_per_second"] = round(
            (n1 - n0) / seconds * counts["pair_tokens_over_sequence_tokens"], 1
        )
        record["pairs_per_second"] = round((s1 - s0) * record["pairs_per_step"] / seconds, 2)
        record["timed_steps"] = s1 - s0
    record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    record["card"] = torch.cuda.get_device_name() if cuda else "cpu"
    record["versions"] = _versions()
    return record


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument("--mode", choices=MODES, help="run one configuration (internal)")
    parser.add_argument("--modes", default=",".join(MODES), help="configurations, in order")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--logging-steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4, help="trl-dpo-best's pairs a step")
    parser.add_argument("--kubetune-batch", type=int, help="kubetune's batchSize (default: spec's)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--work", default="/tmp/kubetune-bench")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-results.jsonl"))
    parser.add_argument("--memory-cap-gib", type=float, help="cap the GPU memory (GiB)")
    args = parser.parse_args()
    args.model_dir = args.model_dir or Path(args.work) / f"model-{args.shape}"

    if args.mode:
        record = measure(args)
        append_record(args.out, record)
        return 0

    build_model(args.shape, args.model_dir)
    modes = args.modes.split(",")
    results = run_each_mode(
        args,
        __file__,
        lambda record: record.get("mode") in modes and record.get("shape") == args.shape,
    )
    ours = results.get("kubetune-dpo", {})
    for mode, record in results.items():
        if mode == "kubetune-dpo" or not ours.get("tokens_per_second"):
            continue
        if record.get("tokens_per_second"):
            ratio = {
                "ratio": f"kubetune-dpo / {mode}",
                "shape": args.shape,
                "tokens_per_second": round(
                    ours["tokens_per_second"] / record["tokens_per_second"], 3
                ),
            }
            append_record(args.out, ratio)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
