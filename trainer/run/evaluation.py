"""After training: the same prompts answered by the base (adapter disabled) and by the adapter."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from kubetune.api.models import EvaluationSample
from kubetune.trainer.dataset.formats import alpaca_prompt


def render_prompt(tokenizer: Any, prompt: str, dataset_format: str) -> str:
    """The prompt as the model saw prompts in training, so the comparison is a fair one."""
    if dataset_format == "messages":
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return str(rendered)
    if dataset_format == "alpaca":
        return alpaca_prompt(prompt)
    return prompt


def _generate(model: Any, tokenizer: Any, text: str, max_new_tokens: int) -> str:
    import torch

    # Chat templates carry their own special tokens; plain prompts get the tokenizer's BOS.
    add_special = not text.startswith(tokenizer.bos_token or "\0")
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=add_special)
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    with torch.no_grad():
        output = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    new_tokens = output[0][inputs["input_ids"].shape[1] :]
    return str(tokenizer.decode(new_tokens, skip_special_tokens=True)).strip()


def compare_base_and_adapter(
    peft_model: Any,
    tokenizer: Any,
    prompts: list[str],
    dataset_format: str,
    *,
    max_new_tokens: int,
    precision: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext,
) -> list[EvaluationSample]:
    """Each prompt answered greedily by the base model and by the adapter. ``precision`` is the
    autocast that training ran under: a 4-bit model prepared for bf16 training keeps its norms in
    fp32 and its LM head in bf16, and only autocast makes the two meet (on a GPU, Liger's fused
    norm hides this; on the CPU, generating without it fails in the LM head)."""
    was_training = peft_model.training
    use_cache = peft_model.config.use_cache
    peft_model.eval()
    peft_model.config.use_cache = True
    samples = []
    try:
        with precision():
            for prompt in prompts:
                text = render_prompt(tokenizer, prompt, dataset_format)
                with peft_model.disable_adapter():
                    base = _generate(peft_model, tokenizer, text, max_new_tokens)
                adapted = _generate(peft_model, tokenizer, text, max_new_tokens)
                samples.append(EvaluationSample(prompt=prompt, base=base, adapter=adapted))
    finally:
        peft_model.config.use_cache = use_cache
        if was_training:
            peft_model.train()
    return samples
