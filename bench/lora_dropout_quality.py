"""Does LoRA dropout buy accuracy? The tiny model's toy task (reversal), on the CPU, per dropout.

    python bench/lora_dropout_quality.py --dropouts 0,0.05 --seeds 1,2 --out results.jsonl

Trains the tiny Llama of kubetune_devtools.tiny through ``kubetune train`` (real NF4, PEFT, TRL)
with each dropout and seed, with evaluation data held out by the task's own generator, and prints
the exact-match accuracy and final loss of each run as JSON lines. Evidence at toy scale only: a
run with held-out data of the real task is what settles it for a real model.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
from pathlib import Path
from typing import Any

from qlora_throughput import append_record


def exact_match(model: Any, tokenizer: Any, pairs: list[tuple[str, str]]) -> float:
    import torch

    hits = 0
    for prompt, expected in pairs:
        inputs = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            output = model.generate(
                **inputs, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        answer = tokenizer.decode(
            output[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True
        )
        hits += answer.strip() == expected
    return hits / len(pairs)


def train_and_score(
    work: Path, model: Path, data: Path, dropout: float, seed: int
) -> dict[str, Any]:
    import torch
    import yaml
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    from kubetune.trainer.run.local_run import main as kubetune
    from kubetune_devtools.tiny import demo_manifest, toy_eval_prompts

    manifest = demo_manifest(model, data)
    manifest["spec"]["lora"]["dropout"] = dropout
    manifest["spec"]["training"]["seed"] = seed
    manifest["spec"].pop("evaluation", None)
    out = work / f"adapter-{dropout}-{seed}"
    manifest["spec"]["output"]["uri"] = str(out)
    job = work / f"job-{dropout}-{seed}.yaml"
    job.write_text(yaml.safe_dump(manifest), encoding="utf-8")
    with contextlib.redirect_stdout(io.StringIO()):
        code = kubetune(["train", str(job), "--no-progress"])
    result = json.loads((out / "result.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(
        model,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        ),
        dtype=torch.float32,
    )
    adapted = PeftModel.from_pretrained(base, str(out)).eval()
    tokenizer = AutoTokenizer.from_pretrained(model)
    accuracy = exact_match(adapted, tokenizer, toy_eval_prompts(64))
    metrics = result.get("metrics", {})
    return {"dropout": dropout, "seed": seed, "exit": code, "exact_match": accuracy,
            "final_loss": metrics.get("final_loss"), "steps": metrics.get("steps")}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dropouts", default="0,0.05")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--out", type=Path, default=Path("dropout-quality.jsonl"))
    args = parser.parse_args()

    import torch

    from kubetune_devtools import tiny

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = tiny.write_tiny_model(work / "model")
        data = tiny.write_toy_datasets(work / "data")["prompt-completion"]
        for seed in (int(s) for s in args.seeds.split(",")):
            for dropout in (float(d) for d in args.dropouts.split(",")):
                record = train_and_score(work, model, data, dropout, seed)
                append_record(args.out, record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
