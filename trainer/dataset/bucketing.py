"""Packed micro-steps of one shape: flex attention compiles once, and tokens/s stays honest.

With packing, TRL's padding-free collator concatenates a micro-step's packed rows into one
sequence whose length changes from step to step, and every new length made flex attention (and
Liger's kernels) compile again. With ``pad_to_multiple_of`` set to the plan's tokens per
micro-step, every micro-step is padded to that one length (padding tokens are one-token
documents with no loss). TRL then counts the padding as trained tokens; :func:`counting_padding`
marks each batch with its padding so that the trainer takes it back out of ``num_tokens``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

#: The batch key that carries a micro-step's padding count; removed before the model sees it.
PADDING_KEY = "kubetune_padding_tokens"


def counting_padding(collate: Callable[[list[Any]], Any]) -> Callable[[list[Any]], Any]:
    """``collate`` that also says how many of its batch's tokens are padding."""

    def collate_and_count(examples: list[Any]) -> Any:
        batch = collate(examples)
        if "position_ids" in batch and "input_ids" in batch:
            real = sum(len(example["input_ids"]) for example in examples)
            batch[PADDING_KEY] = max(int(batch["input_ids"].numel()) - real, 0)
        return batch

    return collate_and_count


def take_padding(inputs: dict[str, Any]) -> int:
    """The padding count of a batch, removed from it."""
    return int(inputs.pop(PADDING_KEY, 0))
