"""A model loaded with kubetune's varlen attention stays usable for everything after training:
calls without packed-sequence boundaries (generation with a KV cache, padded batches) take
transformers' SDPA attention with the mask SDPA needs, and answer exactly as an SDPA model does.
(The varlen kernel itself needs CUDA: tests/trainer/test_trainer_gpu.py.)"""

from __future__ import annotations

import pytest
from trainer_helpers import TinyAssets

pytestmark = pytest.mark.trainer


def test_generation_on_a_padded_batch_answers_as_sdpa_does(tiny: TinyAssets) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kubetune.trainer.model import varlen_attention

    name = varlen_attention.register()
    tokenizer = AutoTokenizer.from_pretrained(tiny.model)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    # Two prompts of different lengths: the shorter one is padded, so a mask is needed.
    batch = tokenizer(["reverse: a b c =>", "reverse: a b c d e f g h =>"], return_tensors="pt",
                      padding=True)  # fmt: skip
    assert int(batch["attention_mask"].sum()) < batch["attention_mask"].numel()

    answers = {}
    for attention in ("sdpa", name):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(tiny.model, attn_implementation=attention)
        model.eval()
        assert model.config._attn_implementation == attention
        with torch.no_grad():
            answers[attention] = model.generate(
                **batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            logits = model(**batch).logits
        answers[f"{attention}-logits"] = logits
    assert torch.equal(answers["sdpa"], answers[name])
    assert torch.allclose(answers["sdpa-logits"], answers[f"{name}-logits"], atol=1e-5)


def test_the_kernels_layout_is_a_view_of_the_projection_and_so_is_its_gradient() -> None:
    """q, k and v reach the varlen kernel as (tokens, heads, dim) views of the projections'
    outputs, and their gradients come back as views laid out as those outputs are: no zeroed
    heads-first copy in the backward for the next layers to copy back (issue #31's profile)."""
    import torch

    from kubetune.trainer.model.varlen_attention import tokens_heads

    tokens, heads, dim = 7, 3, 4
    projected = torch.randn(1, tokens, heads * dim, requires_grad=True)
    # What a Llama attention layer hands an attention implementation: (1, heads, tokens, dim).
    states = projected.view(1, tokens, heads, dim).transpose(1, 2)
    arriving: list[torch.Tensor] = []
    states.register_hook(arriving.append)

    laid_out = tokens_heads(states)
    assert laid_out.shape == (tokens, heads, dim)
    assert laid_out.is_contiguous() and laid_out.data_ptr() == projected.data_ptr()
    grad = torch.randn(tokens, heads, dim)
    laid_out.backward(grad)

    assert arriving[0].stride() == states.stride()  # tokens first, as the projection wrote it
    assert torch.equal(projected.grad, grad.reshape(1, tokens, heads * dim))
