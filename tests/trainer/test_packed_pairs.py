"""DPO micro-batches unpadded (kubetune.trainer.model.packed_pairs): the policy's and the reference's
per-token log-probabilities, entropies and the other outputs of TRL's fused LM head, and the
gradients through them, are those of the padded batch TRL would have run, in TRL's layout. On
the CPU the packed row's sequences are kept apart by transformers' SDPA mask from the positions;
on a GPU by kubetune's varlen attention from the boundaries."""

from __future__ import annotations

from typing import Any

import pytest
from trainer_helpers import TinyAssets

FIELDS = ("log_probs", "entropy", "mean_logits", "is_top1")


def _pairs_batch(vocab: int, device: str) -> dict[str, Any]:
    """Four sequences (two pairs: chosen rows first), right-padded as TRL's collator pads them,
    labels only on the completions."""
    import torch

    generator = torch.Generator().manual_seed(0)
    shapes = [(5, 7), (9, 2), (5, 11), (9, 4)]  # (prompt, completion) tokens per sequence
    longest = max(p + c for p, c in shapes)
    input_ids = torch.zeros(len(shapes), longest, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (prompt, completion) in enumerate(shapes):
        tokens = torch.randint(3, vocab, (prompt + completion,), generator=generator)
        input_ids[row, : prompt + completion] = tokens
        attention_mask[row, : prompt + completion] = 1
        labels[row, prompt : prompt + completion] = tokens[prompt:]
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


def _padded_and_packed(model: Any, batch: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from trl.trainer.utils import add_fused_lm_head

    from kubetune.trainer.model.packed_pairs import pack_padded_pairs

    add_fused_lm_head(model, outputs=FIELDS)
    results = []
    for pack in (False, True):
        if pack:
            pack_padded_pairs(model)
        model.zero_grad()
        outputs = model(**batch, use_cache=False, fused_lm_head=True)
        (outputs.log_probs.sum()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append({"outputs": outputs, "grads": grads})
    return results[0], results[1]


@pytest.mark.trainer
def test_a_packed_micro_batch_scores_every_completion_token_as_the_padded_one(
    tiny: TinyAssets,
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.model, attn_implementation="sdpa")
    batch = _pairs_batch(model.config.vocab_size, "cpu")
    padded, packed = _padded_and_packed(model, batch)

    for name in FIELDS:
        want, got = getattr(padded["outputs"], name), getattr(packed["outputs"], name)
        assert got.shape == want.shape == (4, batch["input_ids"].shape[1] - 1)
        assert torch.allclose(got.float(), want.float(), atol=1e-5), name
    # Every completion token is scored (a non-zero log-probability), and nothing else.
    scored = packed["outputs"].log_probs != 0
    assert torch.equal(scored, batch["labels"][:, 1:] != -100)
    assert padded["grads"].keys() == packed["grads"].keys() and packed["grads"]
    for name, grad in padded["grads"].items():
        assert torch.allclose(packed["grads"][name], grad, atol=1e-5, rtol=1e-4), name
    # Generation and plain calls are the wrapped forward's own.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.shape[:2] == batch["input_ids"].shape


@pytest.mark.gpu
def test_on_a_gpu_varlen_attention_keeps_the_packed_pairs_apart(tiny: TinyAssets) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune.trainer.model import varlen_attention

    if not varlen_attention.supported_on_this_gpu():
        pytest.skip("needs a CUDA GPU that runs varlen attention")
    model = AutoModelForCausalLM.from_pretrained(
        tiny.model, attn_implementation=varlen_attention.register(), dtype=torch.bfloat16
    ).cuda()
    batch = _pairs_batch(model.config.vocab_size, "cuda")
    padded, packed = _padded_and_packed(model, batch)
    want, got = padded["outputs"].log_probs.float(), packed["outputs"].log_probs.float()
    # bf16 end to end: within a few bf16 steps of each log-probability.
    assert (got - want).abs().max() < 5e-2 * want.abs().max().clamp(min=1)
    assert torch.equal(got != 0, batch["labels"][:, 1:] != -100)
