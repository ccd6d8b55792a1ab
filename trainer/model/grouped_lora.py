"""Sibling adapted layers that read one input — attention's q, k and v, the MLP's gate and up —
computed as one autograd function where their base matmuls run in FP8.

Computed one by one (:class:`~kubetune.trainer.model.fused_lora.FusedLoRA4bit`), each sibling
reads the input again for its LoRA ``x A^T`` and its ``dA``, writes its own input gradient
``g W + s (g B) A``, and autograd then adds the siblings' input gradients: on the 7B shapes two
extra passes over a tokens x 4,096 tensor for each of q, k, v and one for gate, up, plus two and
one additions of such tensors, every micro-step of every layer. :class:`FusedLoRAGroup4bit`
computes the same function for the siblings together:

- forward: the input quantised once (as each alone already shares it), each sibling's base
  ``x W_i^T`` in FP8 into its own output (so nothing downstream sees another layout);
  ``x [A_1; A_2; ...]^T`` one matmul; each output ``+= s_i (x A_i^T) B_i^T`` in place;
- backward: the output gradients quantised as the one row ``[g_1 s_1 | g_2 s_2 | ...]`` they
  would be side by side, one scale a row over them all (``fp8_segments.quantize_row_segments``,
  without concatenating them), ``dx = [g_1 | g_2 | ...] [W_1; W_2; ...]`` one FP8 matmul over
  all their output features, then ``dx += [g_1 B_1 s_1 | ...] [A_1; A_2; ...]`` in place;
  ``[dA_1; dA_2; ...]`` one matmul; each ``dB_i`` as alone.

Where the memory plan keeps the e4m3 base for the run, the siblings' weights are kept side by
side (the one copy: each sibling's is a view of it); else the joint input-gradient operand is
made in each backward call from each sibling's.

Transformers' Llama-family attention calls ``q_proj``, ``k_proj`` and ``v_proj`` one after
another on the same hidden-states tensor, and the MLP ``gate_proj`` and ``up_proj``. The first
sibling called computes every output, returns its own and holds the others for that same tensor
object; a sibling then called with it takes its held output. A sibling called with any other
input, or a call that isn't the fused case for every sibling (``fused_lora``'s rules), is
computed alone, as before; a group whose held outputs are not all taken before its first sibling
is called again stops for the run (logged): its siblings don't read one input in this model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from kubetune.trainer.model import fused_lora
from kubetune.trainer.model.fp8_base import Fp8Weight, base_forward, forget_last_input
from kubetune.trainer.model.fp8_segments import joint_input_grad

log = logging.getLogger(__name__)

#: Whether runs group siblings where the base runs in FP8: on, 1.4% (7B) and 3.1% (8B) faster
#: on an H100 in one command (docs/performance.md); the bench's ``kubetune-ungrouped`` mode turns
#: it off, ``kubetune-grouped`` on.
GROUP_SIBLINGS = True
#: Siblings that read one input, by the names transformers' Llama-family models give them.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


@dataclass(eq=False)
class SiblingGroup:
    """Adapted 4-bit layers (PEFT LoRA layers :func:`fused_lora.fuse_lora_layers` routed) that
    read one input, their base matmuls in FP8; ``kept``: their e4m3 weights side by side for the
    run ((sum N, K), with the transposed copy where the plan keeps one), else None."""

    layers: list[Any]
    names: tuple[str, ...] = ()
    kept: Any = None
    #: The input the held outputs were computed for, and the held outputs by sibling.
    held_input: torch.Tensor | None = None
    held: dict[int, torch.Tensor] = field(default_factory=dict)
    #: Set where the siblings turned out not to be called on one input (each then alone).
    stopped: bool = False

    def output(self, layer: Any, x: torch.Tensor, name: str) -> torch.Tensor | None:
        """``layer``'s output for ``x`` with adapter ``name``: held from the call of a sibling
        on the same tensor, or computed now for every sibling; None where the group can't
        compute it (``layer`` computes alone)."""
        index = next(i for i, member in enumerate(self.layers) if member is layer)
        if self.held_input is x and index in self.held:
            out = self.held.pop(index)
            if not self.held:
                self.held_input = None
            return out
        if index != 0 or self.stopped:
            return None
        if self.held:
            # The last call's other outputs were never taken: these siblings don't read one
            # input here, and computing them together would compute some twice.
            self.stopped = True
            self.held, self.held_input = {}, None
            log.warning(
                "%s are not called on one input: each is computed alone for the rest of the run",
                ", ".join(self.names),
            )
            return None
        if x.dtype != torch.bfloat16 or any(
            fused_lora._fusable_adapter(member, x, (), {}) != name for member in self.layers
        ):
            return None
        adapters = []
        for member in self.layers:
            adapters += [member.lora_A[name].weight, member.lora_B[name].weight]
        scalings = tuple(float(member.scaling[name]) for member in self.layers)
        outs = FusedLoRAGroup4bit.apply(x, self, scalings, *adapters)  # type: ignore[no-untyped-call]
        self.held = {i: out for i, out in enumerate(outs) if i != index}
        self.held_input = x
        return outs[index]  # type: ignore[no-any-return]

    def weights(self) -> list[Any]:
        """The siblings' 4-bit base weights."""
        return [member.get_base_layer().weight for member in self.layers]

    def input_grad_operand(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The siblings' e4m3 weights side by side, transposed ((K, sum N) row-major: the joint
        input gradient's operand), and their row scales (sum N,)."""
        if self.kept is not None:
            return self.kept.transposed_operand(), self.kept.scale
        parts = [
            fused_lora._fp8_operand(weight, torch.bfloat16, transposed=True)
            for weight in self.weights()
        ]
        transposed = torch.cat(
            [p.transposed if p.transposed is not None else p.data.t() for p in parts], dim=1
        )
        return transposed, torch.cat([p.scale for p in parts])


class FusedLoRAGroup4bit(torch.autograd.Function):
    """``x W_i^T + s_i (x A_i^T) B_i^T`` for every sibling ``i`` of a :class:`SiblingGroup`,
    frozen 4-bit ``W_i`` in FP8, trainable ``A_i``, ``B_i`` (passed as ``A_1, B_1, A_2, ...``)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        group: SiblingGroup,
        scalings: tuple[float, ...],
        *adapters: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        dtype = x.dtype
        rows = x.reshape(-1, x.shape[-1])
        lora_b = [b.to(dtype) for b in adapters[1::2]]
        lora_a = torch.cat([a.to(dtype) for a in adapters[0::2]])
        xa = torch.mm(rows, lora_a.t())
        outs = []
        start = 0
        for weight, b, scaling in zip(group.weights(), lora_b, scalings, strict=True):
            out = base_forward(rows, fused_lora._fp8_operand(weight, dtype))
            out.addmm_(xa[:, start : start + b.shape[1]], b.t(), alpha=scaling)
            start += b.shape[1]
            outs.append(out.view(*x.shape[:-1], out.shape[-1]))
        ctx.save_for_backward(rows, xa, lora_a, *lora_b)
        ctx.group, ctx.scalings, ctx.input_shape = group, scalings, x.shape
        ctx.param_dtypes = tuple(p.dtype for p in adapters)
        return tuple(outs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        rows, xa, lora_a, *lora_b = ctx.saved_tensors
        gs = [g.reshape(-1, g.shape[-1]).to(rows.dtype) for g in grads]
        zero = fused_lora._zero(rows.device, rows.dtype)
        # s_i g_i B_i side by side (tokens x the ranks' sum: small), the scalings as alphas.
        g_xa = torch.cat(
            [
                torch.addmm(zero, g, b, beta=0, alpha=scaling)
                for g, b, scaling in zip(gs, lora_b, ctx.scalings, strict=True)
            ],
            dim=1,
        )
        needs = ctx.needs_input_grad
        grad_a_joint = torch.mm(g_xa.t(), rows) if any(needs[3::2]) else None
        adapter_grads: list[torch.Tensor | None] = []
        start = 0
        for i, (g, b, scaling) in enumerate(zip(gs, lora_b, ctx.scalings, strict=True)):
            ranks = slice(start, start + b.shape[1])
            start += b.shape[1]
            grad_a = grad_b = None
            if needs[3 + 2 * i] and grad_a_joint is not None:
                grad_a = grad_a_joint[ranks].to(ctx.param_dtypes[2 * i])
            if needs[4 + 2 * i]:
                grad_b = torch.addmm(zero, g.t(), xa[:, ranks], beta=0, alpha=scaling)
                grad_b = grad_b.to(ctx.param_dtypes[2 * i + 1])
            adapter_grads += [grad_a, grad_b]
        grad_x = None
        if needs[0]:
            forget_last_input()  # the forward's last input: not read again before the next
            transposed, column_scale = ctx.group.input_grad_operand()
            grad_x = joint_input_grad(gs, transposed, column_scale)
            grad_x.addmm_(g_xa, lora_a)
            grad_x = grad_x.view(ctx.input_shape)
        return (grad_x, None, None, *adapter_grads)


def _groupable(layers: list[Any]) -> bool:
    """Whether these fused layers can be computed as one group: their base matmuls in FP8
    (``fused_lora.use_fp8_matmuls`` or a kept e4m3 copy), no bias, one input width."""
    bases = [layer.get_base_layer() for layer in layers]
    weights = [getattr(base, "weight", None) for base in bases]
    if any(getattr(w, fused_lora.FP8_WEIGHT, None) is None for w in weights):
        return False
    if any(getattr(base, "bias", None) is not None for base in bases):
        return False
    return len({int(w.quant_state.shape[1]) for w in weights}) == 1  # type: ignore[union-attr]


def _keep_side_by_side(group: SiblingGroup) -> None:
    """Where every sibling keeps its e4m3 weight for the run, keep them as one (sum N, K) copy
    instead, each sibling's a view of it: the joint input gradient's operand without a copy."""
    kept = [getattr(weight, fused_lora.FP8_WEIGHT) for weight in group.weights()]
    if not all(isinstance(k, Fp8Weight) for k in kept):
        return
    with torch.no_grad():
        transposed = None
        if all(k.transposed is not None for k in kept):
            transposed = torch.cat([k.transposed for k in kept], dim=1)
        joint = Fp8Weight(
            data=torch.cat([k.data for k in kept]),
            scale=torch.cat([k.scale for k in kept]),
            transposed=transposed,
        )
    start = 0
    for weight, k in zip(group.weights(), kept, strict=True):
        rows = slice(start, start + k.data.shape[0])
        start += k.data.shape[0]
        view = Fp8Weight(data=joint.data[rows], scale=joint.scale[rows])
        setattr(weight, fused_lora.FP8_WEIGHT, view)
    group.kept = joint


def group_siblings(model: Any) -> int:
    """Compute every set of :data:`SIBLINGS` that :func:`fused_lora.fuse_lora_layers` routed and
    whose base matmuls run in FP8 as one :class:`SiblingGroup` (after
    ``fused_lora.keep_dequantization`` and ``use_fp8_matmuls``). Returns how many groups."""
    grouped = 0
    for module in model.modules():
        for names in SIBLINGS:
            layers = [getattr(module, name, None) for name in names]
            if not all(hasattr(layer, "peft_forward") for layer in layers):
                continue
            if any(getattr(layer, fused_lora.GROUP, None) is not None for layer in layers):
                continue
            if not _groupable(layers):
                continue
            group = SiblingGroup(layers=layers, names=names)
            _keep_side_by_side(group)
            for layer in layers:
                setattr(layer, fused_lora.GROUP, group)
            grouped += 1
    return grouped
