"""Real tokens/s, peak memory, MFU and time to first step: kubetune's defaults vs plain TRL.

Run on a GPU machine (see ../shared/gpu/README.md for the setup; nothing is downloaded):

    PYTHONUNBUFFERED=1 python bench/qlora_throughput.py --shape llama2-7b --out results.jsonl

The model is built from a config (speed and memory don't depend on weight values), saved once
to ``--model-dir`` and then loaded by each configuration through its own 4-bit path. The data is
pre-tokenised and synthetic, with a realistic length mix (log-normal, median ~380 tokens, capped
at the max length), so padding waste is part of what is measured. Each configuration runs in its
own process, so peak memory and compiled kernels don't leak from one into the next. Tokens/s
counts real tokens (TRL's ``num_tokens``: attention-mask sums, or packed lengths without padding;
kubetune takes its bucket padding back out) over the steps after the warm-up; peak memory is
``torch.cuda.max_memory_allocated()``; MFU is model FLOPs (the count in :func:`flops_per_token`,
no recompute) per second over the card's dense bf16 peak; time to first step runs from the start
of ``train()`` (model loaded) to the end of the first optimizer step, and ``startup_seconds``
from the process start. The modes:

- ``kubetune``: a FineTuneJob with no speed knob set, through kubetune's own trainer;
- ``trl-defaults``: the TRL documentation's QLoRA example (padded batches of 4, checkpointing
  on, SDPA, LoRA dropout 0.05);
- ``trl-best``: plain TRL with the best hand-set flags (packing, Liger, flex attention,
  checkpointing off, LoRA dropout 0, batch 4); ``trl-best-checkpointed``: the same with
  gradient checkpointing on (what fits a small card);
- ``kubetune-micro8``, ``kubetune-unpadded``, ``kubetune-checkpointed``, ``kubetune-adamw``:
  the defaults with one lever changed (8 rows, 16,384 tokens, a micro-step, which the plan
  picks itself where it fits since 2026-11-29; no padding to one shape; every layer
  checkpointed; paged 8-bit AdamW), to measure what each gives; ``kubetune-micro4``,
  ``-micro2``, ``-micro1``: 4, 2 or 1 rows a micro-step (the plan then checkpoints as few
  layers as fit), to measure the plan's alternatives under a memory cap;
- ``kubetune-flex``, ``kubetune-unfused``, ``kubetune-before``: the defaults with flex attention
  (micro-steps padded to one shape) instead of varlen; with PEFT's own LoRA forward instead of
  the fused one; with both (the defaults before either lever);
- ``kubetune-scales``, ``kubetune-keepw``: the fused layers keep their NF4 block scales in fp32
  for the run (one kernel a dequantisation instead of three; off by default until measured), or
  the plan keeps the whole bf16 base where it fits (no
  dequantisation in a step; 2 bytes a base weight more memory); both with the base's matmuls in
  bf16 (``fp8Matmuls: off``), as are ``kubetune-unfused`` and ``kubetune-before``;
- ``kubetune-memory``: ``training.profile: memory`` (every layer checkpointed and offloaded to
  CPU memory, one row of ``--max-length`` a micro-step, paged 8-bit AdamW);
- ``kubetune-fp8``, ``kubetune-bf16``: the defaults with ``quantization.fp8Matmuls`` on (the
  frozen base's matmuls in FP8; the plan keeps the e4m3 base where it fits) or off;
  ``kubetune-fp8-percall``: FP8 with only the NF4 block scales kept (the e4m3 weight made
  again in every call, as on a card without room for the e4m3 base), to measure what keeping it
  gives on the same card; ``kubetune-fp8-twostep``: the same, the e4m3 weight made by
  dequantising to bf16, quantising and (backward) transposing instead of in one kernel from the
  4-bit codes (``fused_lora.E4M3_FROM_CODES`` off: the per-call path before that kernel);
  ``kubetune-fp8-keept``: FP8 with the e4m3 base's transposed copy kept too where it fits
  (``memory.KEEP_FP8_TRANSPOSED_WHERE_THEY_FIT``: no transpose in a backward call);
  ``kubetune-grouped``, ``kubetune-ungrouped``: the defaults with q, k, v and gate, up as one
  function each where their base runs in FP8 (``grouped_lora.GROUP_SIBLINGS`` on), or every
  adapted layer alone (off);
- loss parity: ``kubetune-parity`` (the defaults with ``batchSize: --batch`` and the base's
  matmuls in bf16, ``fp8Matmuls: off``) and ``kubetune-fp8-parity`` (the same with them in FP8)
  against ``trl-parity`` (plain TRL: packing, SDPA, no Liger, no checkpointing, its own QLoRA
  preparation, and kubetune's default hyperparameters: cosine schedule, 3% warm-up, gradient
  clipping at 0.3, fused AdamW), on the same packed rows in the same order (same packing, seed
  and tokens per step). Both losses per step and the largest relative difference are printed,
  one record for each kubetune parity mode; ``--token-range`` draws the synthetic tokens from a
  small range so that the loss has something to learn.

``--memory-cap-gib G`` caps every configuration's GPU memory to G GiB, as a 24 GB card would
(``torch.cuda.set_per_process_memory_fraction`` before anything is allocated): kubetune's memory
plan reads the cap and plans for it; TRL's flags are the bench's (``--batch``, the mode), and a
configuration that runs out of memory is recorded as such. To compare on a 24 GiB cap:

    python bench/qlora_throughput.py --modes kubetune,trl-best --batch 2 --memory-cap-gib 24

``--profile-step N`` records a torch.profiler table of optimizer step N (top kernels by GPU
time) in the record and in ``--profile-out``.

``--gpus N`` (kubetune modes only) trains data-parallel on N GPUs of this machine, as a pod with
``resources.gpus: N`` does: the same launcher (``kubetune.trainer.run.launcher``, torch's elastic
agent, NCCL) starts N ranks, each with its own 4-bit base on its own GPU, and the batch of the
spec (``--kubetune-batch``, kubetune's default when unset) divides over them. Tokens/s is then the
real tokens of all ranks (TRL gathers them) per second; peak memory is rank 0's. To compare
with one GPU:

    python bench/qlora_throughput.py --modes kubetune --gpus 1 --out results.jsonl
    python bench/qlora_throughput.py --modes kubetune --gpus 2 --out results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
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
MODES = ("kubetune", "trl-best", "trl-defaults")
EXTRA_MODES = (
    "kubetune-micro8",
    "kubetune-micro4",
    "kubetune-micro2",
    "kubetune-micro1",
    "kubetune-unpadded",
    "kubetune-checkpointed",
    "kubetune-adamw",
    "kubetune-memory",
    "kubetune-parity",
    "trl-parity",
    "kubetune-flex",
    "kubetune-unfused",
    "kubetune-before",
    "trl-best-checkpointed",
    "kubetune-scales",
    "kubetune-keepw",
    "kubetune-fp8",
    "kubetune-bf16",
    "kubetune-fp8-parity",
    "kubetune-fp8-percall",
    "kubetune-fp8-twostep",
    "kubetune-fp8-keept",
    "kubetune-grouped",
    "kubetune-ungrouped",
)
#: The kubetune parity modes, each compared with ``trl-parity``.
PARITY_MODES = ("kubetune-parity", "kubetune-fp8-parity")
#: ``quantization.fp8Matmuls`` of the modes that set it (the rest: the spec's default, auto).
#: The levers measured before FP8 keep measuring what they did: the bf16 base.
FP8_MODES = {
    "kubetune-fp8": "on",
    "kubetune-fp8-percall": "on",
    "kubetune-fp8-twostep": "on",
    "kubetune-fp8-keept": "on",
    "kubetune-bf16": "off",
    "kubetune-fp8-parity": "on",
    "kubetune-parity": "off",
    "kubetune-scales": "off",
    "kubetune-keepw": "off",
    "kubetune-unfused": "off",
    "kubetune-before": "off",
}
#: Dense bf16 peak of the cards this is run on (FLOP/s), for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
PROCESS_STARTED = time.perf_counter()


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
    # The measured configurations run in child processes: leave them the whole card.
    del model
    torch.cuda.empty_cache()
    print(f"built {shape} in {time.perf_counter() - started:.0f}s at {directory}", flush=True)


def synthetic_dataset(
    count: int, max_length: int, vocab: int, seed: int = 0, token_range: int | None = None
) -> Any:
    from datasets import Dataset

    rng = random.Random(seed)  # noqa: S311 -- synthetic data, not secrets
    top = min(vocab, 400 + token_range) if token_range else vocab
    rows = []
    for _ in range(count):
        length = int(min(max_length, max(16, rng.lognormvariate(math.log(380), 0.7))))
        rows.append([rng.randrange(400, top) for _ in range(length)])
    return Dataset.from_dict({"input_ids": rows})


def flops_per_token(shape: str, lengths: list[int], lora_rank: int = 16) -> float:
    """Model FLOPs per real token of one training step of a frozen 4-bit base with LoRA.

    The base's Linear layers and the LM head run forward (2 FLOPs a weight) and backward for
    the input gradients only (2 more; the base gets no weight gradients); the adapters run
    forward and both backward products (6 a weight); causal attention over each document costs
    2·h·n² forward per layer and twice that backward. Recompute is not counted.
    """
    s = SHAPES[shape]
    h, i, layers, vocab = (
        s["hidden_size"],
        s["intermediate_size"],
        s["num_hidden_layers"],
        (s["vocab_size"]),
    )
    kv = h // s["num_attention_heads"] * s["num_key_value_heads"]
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]
    base = layers * sum(a * b for a, b in linears) + vocab * h
    lora = layers * sum(lora_rank * (a + b) for a, b in linears)
    attention = 6 * h * layers * sum(n * n for n in lengths) / sum(lengths)
    return 4 * base + 6 * lora + attention


#: Kernel name fragments (lower case) → the group a profile's GPU time is summed under; first
#: match wins, in this order.
KERNEL_GROUPS = (
    ("bitsandbytes dequantisation", ("dequantize",)),
    ("attention", ("flash", "fmha", "attn", "flex")),
    ("liger (norm, swiglu, rope, loss)", ("rms_norm", "swiglu", "rope", "liger", "cross_entropy")),
    ("optimizer", ("adam", "multi_tensor", "optimizer")),
    ("matmuls (cuBLAS)", ("nvjet", "gemm", "cutlass", "sm90_xmma", "ampere_", "splitk")),
    ("copies and memsets", ("memcpy", "memset", "copy")),
    ("elementwise and reductions", ("elementwise", "reduce", "vectorized", "triton_")),
)


def kernel_group(name: str) -> str:
    lowered = name.lower()
    for group, fragments in KERNEL_GROUPS:
        if any(fragment in lowered for fragment in fragments):
            return group
    return "other"


def profile_groups(kernels: list[tuple[str, float]], step_ms: float) -> dict[str, float]:
    """GPU milliseconds of a profiled step by kernel group, and the step's wall time in which
    no kernel ran (``GPU idle``: the host launching, or waiting)."""
    groups: dict[str, float] = {}
    for name, ms in kernels:
        group = kernel_group(name)
        groups[group] = groups.get(group, 0.0) + ms
    groups["GPU idle (wall time less kernel time)"] = max(0.0, step_ms - sum(groups.values()))
    return {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])}


def _profile_summary(profiler: Any, out: Path | None, rows: int = 25) -> list[dict[str, Any]]:
    """The profiled step's top operators and kernels by their own GPU time, then the GPU time of
    all of them (``gpu_ms_in_all``, against the step's wall time: the rest is the GPU idle)."""
    events = profiler.key_averages()

    def device_us(event: Any) -> float:
        for name in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(event, name):
                return float(getattr(event, name))
        return 0.0

    total = sum(device_us(e) for e in events) or 1.0
    # An operator's own GPU time is its kernels' (listed too): the kernels alone add up the step.
    on_gpu = [e for e in events if "CUDA" in str(getattr(e, "device_type", ""))]
    kernels = sum(device_us(e) for e in on_gpu)
    top = sorted(events, key=device_us, reverse=True)[:rows]
    if out is not None:
        out.write_text(
            events.table(sort_by="self_device_time_total", row_limit=60, max_name_column_width=90)
        )
        # The same operators by input shapes: which layer's copy or add a row is.
        out.with_suffix(".shapes.txt").write_text(
            profiler.key_averages(group_by_input_shape=True).table(
                sort_by="self_device_time_total",
                row_limit=80,
                max_name_column_width=50,
                max_shapes_column_width=120,
            )
        )
    return [
        {
            "name": e.key[:120],
            "calls": e.count,
            "self_gpu_ms": round(device_us(e) / 1e3, 2),
            "share": round(device_us(e) / total, 4),
        }
        for e in top
    ] + [{"gpu_ms_in_all": round(kernels / 1e3, 1),
           "kernels": [(e.key, device_us(e) / 1e3) for e in on_gpu]}]  # fmt: skip


def throughput_callback(
    warmup: int, record: dict[str, Any], profile_step: int = 0, profile_out: Path | None = None
) -> Any:
    from transformers import TrainerCallback

    profiling: list[Any] = []

    class Throughput(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            record["_train_begin"] = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            now = time.perf_counter()
            last = record.get("_last_step", record.get("_train_begin", now))
            record.setdefault("step_seconds", []).append(round(now - last, 2))
            record["_last_step"] = now
            if state.global_step == 1 and "_train_begin" in record:
                record["first_step_seconds"] = round(now - record.pop("_train_begin"), 1)
                record["startup_seconds"] = round(now - PROCESS_STARTED, 1)
            if profile_step and state.global_step == profile_step and profiling:
                import torch

                torch.cuda.synchronize()
                profiler = profiling.pop()
                profiler.stop()
                record["profile_step_seconds"] = round(time.perf_counter() - last, 2)
                record["profile"] = _profile_summary(profiler, profile_out, rows=60)
                whole = record["profile"].pop()
                record["profile_gpu_ms"] = whole["gpu_ms_in_all"]
                record["profile_groups_ms"] = profile_groups(
                    whole["kernels"], record["profile_step_seconds"] * 1e3
                )
            elif profile_step and state.global_step == profile_step - 1:
                import torch
                from torch.profiler import ProfilerActivity, profile

                torch.cuda.synchronize()
                profiler = profile(
                    activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True
                )
                profiler.start()
                profiling.append(profiler)
                record["_last_step"] = time.perf_counter()

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            if not logs or "num_tokens" not in logs:
                return
            point = (time.perf_counter(), float(logs["num_tokens"]), state.global_step)
            if state.global_step >= warmup and "start" not in record:
                record["start"] = point
            record["end"] = point
            if "loss" in logs:
                record.setdefault("losses", []).append(round(float(logs["loss"]), 4))
                record.setdefault("loss_steps", []).append(state.global_step)

    return Throughput()


def load_4bit_base(model_dir: Path, **kwargs: Any) -> tuple[Any, Any]:
    """(tokenizer, model): the saved model in NF4 with double quantization and bf16 compute, as
    the TRL documentation's QLoRA example loads it (``kwargs`` to ``from_pretrained``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        ),
        dtype=torch.bfloat16,
        device_map={"": 0 if torch.cuda.is_available() else "cpu"},
        **kwargs,
    )
    return tokenizer, model


def train_with_recipe(
    spec: Any, dataset: Any, record: dict[str, Any], callback: Any, *, data_format: str = "text"
) -> Any:
    """kubetune's own trainer on ``spec``, fed ``dataset`` as it is (the data step skipped), with
    ``callback`` measuring; its settings and plan go into ``record``. The recipe."""
    from kubetune.api.config import TrainerConfig
    from kubetune.trainer.dataset.formats import PreparedData
    from kubetune.trainer.run.distributed import this_rank
    from kubetune.trainer.run.recipe import QLoRASFTRecipe

    recipe = QLoRASFTRecipe(TrainerConfig(spec=spec), rank=this_rank())

    def synthetic_data() -> None:
        recipe.data = PreparedData(
            train=dataset,
            eval=None,
            format=data_format,
            fingerprint="synthetic",
            assistant_only_loss=False,
            completion_only_loss=False,
            method=spec.method.type,
        )

    recipe._setup_data = synthetic_data  # type: ignore[method-assign]
    recipe.setup()
    record["settings"] = recipe.speed.__dict__ if recipe.speed else {}
    recipe._trainer.add_callback(callback)
    recipe.train()
    report = recipe.plan_report()
    record["plan"] = report.model_dump(by_alias=True) if report else None
    return recipe


def run_kubetune(args: argparse.Namespace, dataset: Any, record: dict[str, Any]) -> Any:
    """The trainer exactly as a FineTuneJob with default settings runs it, data aside."""
    from kubetune.api.models import FineTuneJobSpec
    from kubetune.trainer.run.distributed import this_rank

    lever: dict[str, Any] = {
        "kubetune-micro8": {"microBatchSize": 8},
        "kubetune-micro4": {"microBatchSize": 4},
        "kubetune-micro2": {"microBatchSize": 2},
        "kubetune-micro1": {"microBatchSize": 1},
        "kubetune-checkpointed": {"gradientCheckpointing": True},
        "kubetune-adamw": {"optimizer": "paged_adamw_8bit"},
        "kubetune-memory": {"profile": "memory"},
        "kubetune-parity": {"batchSize": args.batch},
        "kubetune-fp8-parity": {"batchSize": args.batch},
        "kubetune-flex": {"attention": "flex_attention"},
        "kubetune-before": {"attention": "flex_attention"},
    }.get(args.mode, {})
    if args.kubetune_batch:
        lever = {"batchSize": args.kubetune_batch, **lever}
    # A fresh output folder for every run: the trainer resumes from (or finds finished) what an
    # earlier run of the same mode left there, and would then train no step at all (seen on
    # 2026-12-05: the capped runs found the uncapped run's finished adapter).
    cap = f"-cap{args.memory_cap_gib:g}" if args.memory_cap_gib else ""
    output = Path(args.work) / f"{args.shape}-{args.mode}-x{args.gpus}{cap}"
    if this_rank().is_main:
        shutil.rmtree(output, ignore_errors=True)
    fp8 = FP8_MODES.get(args.mode)
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": str(args.model_dir)},
            "dataset": {"uri": "synthetic.jsonl"},
            **({"quantization": {"fp8Matmuls": fp8}} if fp8 else {}),
            "training": {
                "maxSteps": args.steps,
                "maxLength": args.max_length,
                "loggingSteps": args.logging_steps,
                "checkpointSteps": 1_000_000,
                **lever,
            },
            "output": {"uri": str(output)},
            "resources": {"gpus": args.gpus},
        }
    )
    if args.mode == "kubetune-unpadded":
        from dataclasses import replace

        from kubetune.trainer.plan import speed

        apply_plan = speed.apply_plan
        speed.apply_plan = lambda s, p: replace(apply_plan(s, p), pad_to_tokens=None)  # type: ignore[assignment]
    if args.mode in ("kubetune-fp8-percall", "kubetune-fp8-twostep"):
        from dataclasses import replace

        from kubetune.trainer.plan import speed

        planned = speed.apply_plan
        speed.apply_plan = lambda s, p: replace(planned(s, p), kept_dequantization="scales")  # type: ignore[assignment]
    if args.mode == "kubetune-fp8-twostep":
        from kubetune.trainer.model import fused_lora

        fused_lora.E4M3_FROM_CODES = False
    if args.mode == "kubetune-fp8-keept":
        from kubetune.trainer.plan import memory

        memory.KEEP_FP8_TRANSPOSED_WHERE_THEY_FIT = True  # and the transposed copy where it fits
    if args.mode in ("kubetune-scales", "kubetune-keepw"):
        from kubetune.trainer.plan import memory

        if args.mode == "kubetune-keepw":
            memory.KEEP_WEIGHTS_WHERE_THEY_FIT = True  # the plan keeps them where they fit
        else:
            memory.KEEP_SCALES = True
    if args.mode in ("kubetune-grouped", "kubetune-ungrouped"):
        from kubetune.trainer.model import grouped_lora

        grouped_lora.GROUP_SIBLINGS = args.mode == "kubetune-grouped"
    if args.mode in ("kubetune-unfused", "kubetune-before"):
        from kubetune.trainer.model import fused_lora

        fused_lora.fuse_lora_layers = lambda model: 0  # PEFT's own LoRA forward

    callback = throughput_callback(args.warmup, record, args.profile_step, args.profile_out)
    train_with_recipe(spec, dataset, record, callback)


def run_trl_defaults(args: argparse.Namespace, dataset: Any, record: dict[str, Any]) -> Any:
    """What the TRL documentation's QLoRA example does: SFTConfig defaults, padded batches
    (``trl-best``: with the hand-set flags packing, Liger and flex attention)."""
    best = args.mode in ("trl-best", "trl-best-checkpointed")
    checkpointed = args.mode == "trl-best-checkpointed"
    parity = args.mode == "trl-parity"
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    tokenizer, model = load_4bit_base(
        args.model_dir, **({"attn_implementation": "flex_attention"} if best else {})
    )
    record["settings"] = {"attention": model.config._attn_implementation, "packing": best or parity,
                          "liger_kernel": best,
                          "gradient_checkpointing": checkpointed or not (best or parity),
                          "lora_dropout": 0.0 if best or parity else 0.05}  # fmt: skip
    # kubetune's default hyperparameters, for the loss-parity comparison only.
    same_recipe: dict[str, Any] = {"lr_scheduler_type": "cosine", "warmup_steps": 0.03,
                                   "max_grad_norm": 0.3, "optim": "adamw_torch_fused",
                                   "padding_free": True} if parity else {}  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=str(Path(args.work) / "trl-out"),
            max_steps=args.steps,
            per_device_train_batch_size=args.batch,
            max_length=args.max_length,
            learning_rate=2e-4,
            logging_steps=args.logging_steps,
            save_strategy="no",
            report_to=[],
            packing=best or parity,
            use_liger_kernel=best,
            # The expert turns checkpointing off on a card with memory to spare.
            gradient_checkpointing=checkpointed or not (best or parity),
            **same_recipe,
        ),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0 if best or parity else 0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
        callbacks=[throughput_callback(args.warmup, record, args.profile_step, args.profile_out)],
    )
    trainer.train()


def run_timed(
    run: Callable[[argparse.Namespace, Any, dict[str, Any]], Any],
    args: argparse.Namespace,
    dataset: Any,
    record: dict[str, Any],
) -> None:
    """``run(args, dataset, record)`` timed into ``record``; running out of memory (CUDA's error,
    or kubetune's plan refusing before anything loads) is recorded as its result."""
    import torch

    started = time.perf_counter()
    try:
        run(args, dataset, record)
    except torch.cuda.OutOfMemoryError:
        record["error"] = "out of memory"
    except Exception as error:  # kubetune's own OutOfMemory: the plan refused before loading
        from kubetune.trainer.errors import OutOfMemory

        if not isinstance(error, OutOfMemory):
            raise
        record["error"] = f"out of memory (plan): {error}"
    record["wall_seconds"] = round(time.perf_counter() - started, 1)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from kubetune.trainer.run.distributed import this_rank

    cuda = torch.cuda.is_available()
    if cuda:
        # Each rank on its own GPU from the start (no context of every rank on GPU 0).
        torch.cuda.set_device(this_rank().local_rank)
        torch.cuda.reset_peak_memory_stats()
        if args.memory_cap_gib:
            # A smaller card: the caching allocator may hold no more than the cap (the CUDA
            # context is outside it, as on a real card of that size it is outside the free
            # memory the plan sees).
            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(args.memory_cap_gib * 2**30 / total)
    dataset = synthetic_dataset(
        args.examples, args.max_length, SHAPES[args.shape]["vocab_size"],
        token_range=args.token_range,
    )  # fmt: skip
    record: dict[str, Any] = {
        "mode": args.mode,
        "shape": args.shape,
        "gpus": args.gpus,
        "batch": args.batch,
        "memory_cap_gib": args.memory_cap_gib,
    }
    run = run_kubetune if args.mode.startswith("kubetune") else run_trl_defaults
    run_timed(run, args, dataset, record)
    if "start" in record and "end" in record and record["end"][2] > record["start"][2]:
        record.pop("_last_step", None)
        (t0, n0, s0), (t1, n1, s1) = record.pop("start"), record.pop("end")
        record["tokens_per_second"] = round((n1 - n0) / (t1 - t0), 1)
        record["timed_steps"] = s1 - s0
    record["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None
    record["card"] = torch.cuda.get_device_name() if cuda else "cpu"
    lengths = [len(row) for row in dataset["input_ids"]]
    record["gflop_per_token"] = round(flops_per_token(args.shape, lengths) / 1e9, 2)
    peak = next((v for k, v in PEAK_FLOPS.items() if k in record["card"]), None)
    if peak and record.get("tokens_per_second"):
        record["mfu"] = round(
            record["tokens_per_second"] * record["gflop_per_token"] * 1e9 / (peak * args.gpus), 3
        )
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


def launch_ranks(args: argparse.Namespace) -> int:
    """This configuration on ``--gpus`` ranks, through the launcher a pod uses."""
    import tempfile

    import torch

    from kubetune.trainer.run.distributed import plan_topology
    from kubetune.trainer.run.launcher import run_ranks

    topology = plan_topology(args.gpus, 1, {}, torch.cuda.device_count())
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as directory:
        died, _, error = run_ranks(topology, [__file__, *sys.argv[1:]], Path(directory))
    if died or error:
        print(json.dumps({"mode": args.mode, "gpus": args.gpus, "error": error or died}))
        return 1
    return 0


def append_record(out: Path, record: dict[str, Any]) -> None:
    """One result: a JSON line appended to ``out`` and printed."""
    with out.open("a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)


def run_each_mode(
    args: argparse.Namespace, script: str, ours: Callable[[dict[str, Any]], bool]
) -> dict[str, dict[str, Any]]:
    """Each of ``args.modes`` run by ``script --mode MODE`` in a process of its own, then the
    newest record of each mode in ``args.out`` that ``ours`` says this command's settings wrote."""
    for mode in args.modes.split(","):
        command = [sys.executable, script, *sys.argv[1:], "--mode", mode]
        subprocess.run(command, check=False, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    results: dict[str, dict[str, Any]] = {}
    for line in args.out.read_text().splitlines() if args.out.exists() else []:
        record = json.loads(line)
        if ours(record):
            results[record["mode"]] = record
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama2-7b")
    parser.add_argument(
        "--mode", choices=MODES + EXTRA_MODES, help="run one configuration (internal)"
    )
    parser.add_argument("--modes", default=",".join(MODES), help="configurations, in order")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--logging-steps",
        type=int,
        default=10,
        help="log every N steps (every configuration; 10 is the spec's default). Tokens/s runs "
        "from the first log at or after --warmup to the last; 1 for per-step losses",
    )
    parser.add_argument("--batch", type=int, default=4, help="TRL's sequences per device per step")
    parser.add_argument(
        "--gpus", type=int, default=1, help="GPUs to train on data-parallel (kubetune modes)"
    )
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--work", default="/tmp/kubetune-bench")
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench-results.jsonl"))
    parser.add_argument(
        "--kubetune-batch", type=int, help="batchSize of the kubetune modes (default: the spec's)"
    )
    parser.add_argument(
        "--token-range", type=int, help="draw the synthetic tokens from this many ids only"
    )
    parser.add_argument(
        "--memory-cap-gib", type=float, help="cap each configuration's GPU memory (GiB)"
    )
    parser.add_argument("--profile-step", type=int, default=0, help="profile this optimizer step")
    parser.add_argument("--profile-out", type=Path, help="where the profile's table goes")
    args = parser.parse_args()
    args.model_dir = args.model_dir or Path(args.work) / f"model-{args.shape}"

    if args.mode:
        from kubetune.trainer.run.distributed import this_rank

        rank = this_rank()
        if args.gpus > 1 and rank.outcomes is None:
            if not args.mode.startswith("kubetune"):
                raise SystemExit(f"--gpus {args.gpus} runs the kubetune modes only")
            return launch_ranks(args)
        record = measure(args)
        if rank.is_main:
            append_record(args.out, record)
        return 0

    build_model(args.shape, args.model_dir)
    results = run_each_mode(
        args,
        __file__,
        lambda record: (
            record.get("shape") == args.shape
            and "mode" in record
            and record.get("gpus", 1) == args.gpus
            and record.get("memory_cap_gib") == args.memory_cap_gib
        ),
    )
    for mine in ("kubetune", "kubetune-fp8"):
        ours = results.get(mine, {}).get("tokens_per_second")
        for mode, record in results.items():
            theirs = record.get("tokens_per_second")
            if ours and theirs and mode not in ("kubetune", mine):
                ratio = {"ratio": f"{mine} / {mode}", "shape": args.shape,
                         "tokens_per_second": round(ours / theirs, 3)}  # fmt: skip
                append_record(args.out, ratio)
    for mode in PARITY_MODES:
        if mode in results and "trl-parity" in results:
            parity = loss_parity(results[mode], results["trl-parity"], args.shape, mode)
            append_record(args.out, parity)
    return 0


def loss_parity(
    ours: dict[str, Any], theirs: dict[str, Any], shape: str, mode: str = "kubetune-parity"
) -> dict[str, Any]:
    """Both loss curves at the steps both logged, the largest relative difference of a step's
    loss, and the relative difference of how far each fell (first step to the mean of the last
    three). Steps are matched by number: kubetune also logs the first step, TRL doesn't."""
    mine = dict(zip(ours.get("loss_steps", []), ours.get("losses", []), strict=True))
    other = dict(zip(theirs.get("loss_steps", []), theirs.get("losses", []), strict=True))
    common = sorted(set(mine) & set(other))
    a, b = [mine[s] for s in common], [other[s] for s in common]
    steps = len(common)
    result: dict[str, Any] = {"parity": f"{mode} vs trl-parity", "shape": shape,
                              "steps": common, "kubetune_losses": a, "trl_losses": b}  # fmt: skip
    if steps:
        result["max_relative_difference"] = round(
            max(abs(x - y) / abs(y) for x, y in zip(a[:steps], b[:steps], strict=True)), 5
        )
    if steps >= 4:
        fell_a = a[0] - sum(a[steps - 3 : steps]) / 3
        fell_b = b[0] - sum(b[steps - 3 : steps]) / 3
        result["loss_fell"] = {"kubetune": round(fell_a, 4), "trl": round(fell_b, 4)}
        if fell_b:
            result["fall_relative_difference"] = round(abs(fell_a - fell_b) / abs(fell_b), 4)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
