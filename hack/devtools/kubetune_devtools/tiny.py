"""Tiny, self-made models, tokenizers and datasets: kubetune's tests and `make demo` run on them.

Nothing here is downloaded. The model is Llama-shaped (so every code path that a real Llama takes is
taken), small enough to train in seconds on a CPU, and every Linear dimension is a multiple of 64
so that bitsandbytes quantizes it exactly as it would a 7B model. The toy task, reversing a short
run of letters, is learnable by such a model in a few hundred steps, and a random base model gets
it right almost never: an adapter that learned anything shows up as a wide accuracy gap.

Run ``python -m kubetune_devtools.tiny OUTDIR`` to write a model, a tokenizer, the task in every
dataset format and a FineTuneJob manifest that trains on them.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

#: The letters of the toy task; few, so that each is seen often and a tiny model learns them all.
TOY_LETTERS = "abcdefgh"
TOY_INSTRUCTION = "reverse:"

#: A chat template in the usual ChatML shape. The ``{% generation %}`` markers let TRL train on the
#: assistant turns alone (assistant-only loss), as a real instruct model's template would.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]

#: Room for the tokenizer's vocabulary, rounded up to a multiple of 64 for the embedding tables.
TINY_VOCAB_SIZE = 384
LM_HEAD_SCALE = 25.0


def toy_words(count: int, seed: int = 0, min_len: int = 3, max_len: int = 4) -> list[str]:
    """Random letter runs, spaced (``"c a f"``) so the tokenizer gives one token per letter."""
    rng = random.Random(seed)  # noqa: S311 -- toy data, not secrets
    return [
        " ".join(rng.choice(TOY_LETTERS) for _ in range(rng.randint(min_len, max_len)))
        for _ in range(count)
    ]


def toy_prompt(word: str) -> str:
    return f"{TOY_INSTRUCTION} {word} =>"


def toy_answer(word: str) -> str:
    return " " + " ".join(reversed(word.split()))


def toy_records(fmt: str, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """The reversal task in one dataset format: text, messages, prompt-completion or alpaca."""
    rows: list[dict[str, Any]] = []
    for word in toy_words(count, seed):
        prompt, answer = toy_prompt(word), toy_answer(word)
        if fmt == "text":
            rows.append({"text": prompt + answer})
        elif fmt == "prompt-completion":
            rows.append({"prompt": prompt, "completion": answer})
        elif fmt == "messages":
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": answer.strip()},
                    ]
                }
            )
        elif fmt == "alpaca":
            rows.append({"instruction": TOY_INSTRUCTION, "input": word, "output": answer.strip()})
        else:
            raise ValueError(f"unknown toy dataset format {fmt!r}")
    return rows


def toy_preference_records(fmt: str, count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Preferences on the reversal task: the reversed letters preferred to the letters as given
    (palindromes, where the two agree, left out). ``fmt``: ``preference`` (text),
    ``preference-messages`` (chat), ``openai-preference`` (OpenAI's DPO file format) or
    ``unpaired-preference`` (KTO: each pair as a desirable and an undesirable answer)."""
    rows: list[dict[str, Any]] = []
    words = [w for w in toy_words(count * 2, seed) if w.split() != w.split()[::-1]][:count]
    for word in words:
        prompt, good, bad = toy_prompt(word), toy_answer(word), " " + word
        if fmt == "preference":
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
        elif fmt == "preference-messages":
            rows.append(
                {
                    "prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": good.strip()}],
                    "rejected": [{"role": "assistant", "content": bad.strip()}],
                }
            )
        elif fmt == "openai-preference":
            rows.append(
                {
                    "input": {"messages": [{"role": "user", "content": prompt}]},
                    "preferred_output": [{"role": "assistant", "content": good.strip()}],
                    "non_preferred_output": [{"role": "assistant", "content": bad.strip()}],
                }
            )
        elif fmt == "unpaired-preference":
            rows.append({"prompt": prompt, "completion": good, "label": True})
            rows.append({"prompt": prompt, "completion": bad, "label": False})
        else:
            raise ValueError(f"unknown toy preference format {fmt!r}")
    return rows


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def _tokenizer_corpus() -> list[str]:
    # The tokenizer learns the chat template's words and the task's letters; nothing else matters.
    corpus = [toy_prompt(w) + toy_answer(w) for w in toy_words(2000, seed=1)]
    corpus += [
        "user", "assistant", "system", "You are a helpful assistant.",
        "Below is an instruction that describes a task. Write a response.",
        "### Instruction:", "### Input:", "### Response:",
    ] * 50  # fmt: skip
    return corpus


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the spot, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE - 16,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    bos = backend.token_to_id("<|begin_of_text|>")
    backend.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|begin_of_text|>",  # noqa: S106 -- a vocabulary token, not a password
        eos_token="<|im_end|>",  # noqa: S106
        pad_token="<|pad|>",  # noqa: S106
        additional_special_tokens=["<|im_start|>", "<|end_of_text|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, layers: int = 2, seed: int = 0
) -> LlamaForCausalLM:
    """A randomly initialised Llama, Linear dims in multiples of 64 (bitsandbytes' block size)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden_size // 32),
        num_key_value_heads=max(1, hidden_size // 32),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    # A freshly initialised output layer (std 0.02) can't produce confident logits, and LoRA leaves
    # it frozen: scale it to the size a trained model's has, so that adapters can learn the task.
    with torch.no_grad():
        model.lm_head.weight.mul_(LM_HEAD_SCALE)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def write_tiny_model(directory: Path, hidden_size: int = 64, layers: int = 2) -> Path:
    """Save a tiny model and its tokenizer to ``directory``, loadable by ``from_pretrained``."""
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, hidden_size=hidden_size, layers=layers)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_toy_datasets(directory: Path, count: int = 512, seed: int = 0) -> dict[str, Path]:
    """The reversal task in every format, one jsonl file each, named for the format."""
    return {
        fmt: write_jsonl(directory / f"reverse-{fmt}.jsonl", toy_records(fmt, count, seed))
        for fmt in ("text", "messages", "prompt-completion", "alpaca")
    }


def write_toy_preference_datasets(directory: Path) -> dict[str, Path]:
    """Preferences on the toy task, one folder per format, each with a ``train`` split and a
    held-out ``test`` split (other seeds)."""
    folders = {}
    for fmt in ("preference", "preference-messages", "unpaired-preference"):
        write_jsonl(directory / fmt / "train.jsonl", toy_preference_records(fmt, 256, seed=0))
        write_jsonl(directory / fmt / "test.jsonl", toy_preference_records(fmt, 64, seed=7))
        folders[fmt] = directory / fmt
    return folders


def toy_eval_prompts(count: int, seed: int = 1234) -> list[tuple[str, str]]:
    """Held-out (prompt, expected answer) pairs for exact-match scoring."""
    return [(toy_prompt(w), toy_answer(w).strip()) for w in toy_words(count, seed)]


def tiny_cpu_settings(**training: Any) -> dict[str, Any]:
    """The tiny model's quantization, LoRA and training settings for a run of seconds on a CPU
    (10 steps, a checkpoint every 5; ``training`` overrides those fields): the operator's and the
    server's tests, and the server's job template in them, train with these. A fresh copy."""
    return {
        "quantization": {"type": "nf4", "computeDtype": "float32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {
            "maxSteps": 10,
            "learningRate": 1.0e-2,
            "batchSize": 4,
            "maxLength": 64,
            "packing": False,
            "warmupRatio": 0.0,
            "lrScheduler": "constant",
            "checkpointSteps": 5,
            "loggingSteps": 1,
            "gradientCheckpointing": False,
            **training,
        },
    }


def demo_manifest(model_dir: Path, dataset: Path, name: str = "tiny-reverse") -> dict[str, Any]:
    """A FineTuneJob that trains the tiny model on the toy task on a CPU in about a minute."""
    return {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": str(model_dir)},
            "dataset": {"uri": str(dataset), "format": "auto"},
            "quantization": {"type": "nf4", "doubleQuant": True, "computeDtype": "float32"},
            "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "targetModules": ["all-linear"]},
            "training": {
                "maxSteps": 300,
                "maxGradNorm": 1.0,
                "learningRate": 5.0e-3,
                "batchSize": 16,
                "microBatchSize": 16,
                "maxLength": 64,
                "packing": False,
                "warmupRatio": 0.0,
                "lrScheduler": "constant",
                "checkpointSteps": 50,
                "loggingSteps": 10,
                "gradientCheckpointing": False,
            },
            "output": {"uri": "out/tiny-reverse"},
            "evaluation": {"prompts": [p for p, _ in toy_eval_prompts(4)], "maxNewTokens": 8},
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kubetune_devtools.tiny",
        description="Write a tiny model, tokenizer, toy datasets and a FineTuneJob that uses them.",
    )
    parser.add_argument("outdir", type=Path)
    args = parser.parse_args(argv)
    outdir: Path = args.outdir.resolve()
    model_dir = write_tiny_model(outdir / "model")
    datasets = write_toy_datasets(outdir / "data")
    datasets.update(write_toy_preference_datasets(outdir / "data"))
    import yaml

    manifest_path = outdir / "tiny-reverse.yaml"
    manifest = demo_manifest(model_dir, datasets["prompt-completion"])
    manifest["spec"]["output"]["uri"] = str(outdir / "adapter")
    manifest_path.write_text(yaml.safe_dump(manifest, sort_keys=False), encoding="utf-8")
    print(f"model:    {model_dir}")
    print(f"datasets: {', '.join(str(p) for p in datasets.values())}")
    print(f"manifest: {manifest_path}  (kubetune train {manifest_path})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
