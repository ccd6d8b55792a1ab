"""Packed sequences through torch's variable-length FlashAttention (``training.attention: varlen``).

TRL's padding-free collator hands the model a micro-step's packed sequences as one row with
their boundaries (``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``). Flex attention turns the
boundaries into a block mask and compiles a kernel for it, again for every new length (which is
why kubetune pads every flex micro-step to one shape; what the compilation cost:
docs/performance.md). ``torch.nn.attention.varlen.varlen_attn`` (torch ≥ 2.10) runs
FlashAttention-2's varlen kernel on the boundaries directly: nothing to compile, any length, no
padding.

Registered with transformers as the attention implementation :data:`NAME` (and its mask
function): a call that carries the boundaries goes to ``varlen_attn``; any other (a padded
evaluation batch, generation with a KV cache) goes to transformers' own SDPA attention with the
mask SDPA needs, so the model stays usable for everything the trainer does after training.
"""

from __future__ import annotations

import importlib.util
from typing import Any

#: The attention implementation's name in transformers' registries.
NAME = "kubetune_varlen"


def available() -> bool:
    """Whether this torch has ``varlen_attn`` (torch ≥ 2.10)."""
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def supported_on_this_gpu() -> bool:
    """FlashAttention-2 kernels need compute capability 8.0 (Ampere) or newer."""
    import torch

    return available() and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def tokens_heads(states: Any) -> Any:
    """(1, heads, tokens, dim) -> (tokens, heads, dim), as FlashAttention's varlen kernel takes
    them: a view of the projection's output (tokens first), and so is its gradient. Indexing the
    batch's one row instead (``states[0]``) has a backward that writes the gradient into a new
    zeroed tensor with the heads first, which every later gradient then copies back to tokens
    first: six copies a layer, 4.8% of an H100's time in a 7B step (2.8-3.9% faster without them;
    docs/performance.md)."""
    return states.transpose(1, 2).flatten(0, 1)


def _attention(  # noqa: PLR0917 (transformers calls it with these by position)
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Any, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None or query.shape[0] != 1 or dropout:
        return sdpa_attention_forward(  # type: ignore[no-any-return]
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    import torch
    from torch.nn.attention.varlen import varlen_attn

    q, k, v = (tokens_heads(t) for t in (query, key, value))
    out = varlen_attn(
        q,
        k,
        v,
        cu_q.to(dtype=torch.int32, device=q.device),
        cu_k.to(dtype=torch.int32, device=q.device),
        int(kwargs["max_length_q"]),
        int(kwargs["max_length_k"]),
        scale=scaling,
        window_size=(-1, 0),  # causal
    )
    assert isinstance(out, torch.Tensor)  # no auxiliary outputs asked for
    return out.unsqueeze(0), None  # (1, tokens, heads, dim), as transformers' kernels return it


def _mask(*args: Any, attention_mask: Any = None, **kwargs: Any) -> Any:
    """No mask for packed training (the boundaries travel beside it); SDPA's mask when the batch
    is padded, for the SDPA fallback."""
    if attention_mask is None:
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register() -> str:
    """Make :data:`NAME` an attention implementation transformers' models accept."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, _attention)
    AttentionMaskInterface.register(NAME, _mask)
    return NAME
