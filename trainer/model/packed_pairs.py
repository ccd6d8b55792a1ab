"""DPO pairs without padding: each padded micro-batch runs through the model as one packed row.

TRL's preference collator pads a micro-batch's sequences (prompt + chosen and prompt + rejected of
each pair) to the longest one, and its ``padding_free`` option is switched off in the pinned TRL
("temporarily unavailable after a refactor"). On the 7B benchmark's length mix (prompt + answer
≈ 550 tokens, log-normal) about 40% of a padded micro-batch of 4 pairs is padding, and every 4-bit
matmul and the reference pass compute it all the same.

:func:`pack_padded_pairs` wraps the forward that TRL's fused LM head installed on the base model: a
call with ``fused_lm_head=True`` (the policy's and the reference's log-probabilities, in training
and in evaluation) takes the real tokens of every row into one row, with their positions and
boundaries (``cu_seq_lens_*``), so kubetune's varlen attention
(:mod:`kubetune.trainer.model.varlen_attention`) attends within each sequence; the labels are
shifted within each sequence (``shift_labels``, which the fused head scores as given), and the
per-token outputs are scattered back to the padded layout TRL reads. Every other call (generation,
a call with embeddings or positions of its own) goes to the wrapped forward unchanged.
"""

from __future__ import annotations

import types
from typing import Any

#: The fused head's per-token outputs, scattered back to the padded layout.
PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")
#: Inputs a caller can give that the packing would have to build itself: such a call runs as is.
_OWN_INPUTS = ("inputs_embeds", "position_ids", "shift_labels")


def pack_padded_pairs(model: Any) -> None:
    """Make ``model``'s fused-LM-head forward (TRL's ``add_fused_lm_head``) run unpadded."""
    inner = model.forward

    def forward(
        self: Any,
        *args: Any,
        input_ids: Any = None,
        attention_mask: Any = None,
        labels: Any = None,
        fused_lm_head: bool = False,
        **kwargs: Any,
    ) -> Any:
        plain = (
            not fused_lm_head
            or args
            or input_ids is None
            or attention_mask is None
            or labels is None
            or any(kwargs.get(k) is not None for k in _OWN_INPUTS)
        )
        if plain:
            return inner(
                *args,
                input_ids=input_ids,
                attention_mask=attention_mask,
                labels=labels,
                fused_lm_head=fused_lm_head,
                **kwargs,
            )
        return _packed_call(inner, input_ids, attention_mask, labels, kwargs)

    model.forward = types.MethodType(forward, model)


def _packed_call(inner: Any, input_ids: Any, attention_mask: Any, labels: Any, kwargs: Any) -> Any:
    import torch

    mask = attention_mask.bool()
    real = mask.reshape(-1)
    lengths = mask.sum(dim=1)
    ids = input_ids.reshape(-1)[real].unsqueeze(0)
    positions = (mask.cumsum(dim=1) - 1).reshape(-1)[real].unsqueeze(0)
    row_labels = labels.reshape(-1)[real]
    # Each token's label is the next token of its own sequence; a sequence's last token has none.
    shift_labels = torch.full_like(row_labels, -100)
    shift_labels[:-1] = row_labels[1:]
    ends = lengths[lengths > 0].cumsum(dim=0) - 1
    shift_labels[ends] = -100
    bounds = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=input_ids.device)
    bounds[1:] = lengths.cumsum(dim=0)
    longest = int(lengths.max())
    outputs = inner(
        input_ids=ids,
        position_ids=positions,
        shift_labels=shift_labels.unsqueeze(0),
        fused_lm_head=True,
        cu_seq_lens_q=bounds,
        cu_seq_lens_k=bounds,
        max_length_q=longest,
        max_length_k=longest,
        **kwargs,
    )
    for name in PER_TOKEN:
        value = getattr(outputs, name, None)
        if value is None:
            continue
        padded = value.new_zeros(real.shape).masked_scatter(real, value.reshape(-1))
        # TRL's layout: position j holds the log-probability of token j + 1 (one column less).
        setattr(outputs, name, padded.view(mask.shape)[:, :-1])
    return outputs
