"""The fused 4-bit LoRA layer computes what PEFT's computes: the same outputs and the same
gradients for the input and both adapter matrices, on a real bitsandbytes NF4 layer (CPU), and
PEFT's own forward wherever the fused one doesn't apply."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.trainer


def _lora_model(dropout: float = 0.0, seed: int = 0, device: str = "cpu") -> Any:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)

    class TwoLayers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = bnb.nn.Linear4bit(
                128, 192, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
            )
            self.down = bnb.nn.Linear4bit(
                192, 128, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4"
            )

        def forward(self, x: Any) -> Any:
            return self.down(torch.nn.functional.silu(self.up(x)))

    model = TwoLayers()
    for layer in (model.up, model.down):
        full = torch.randn(layer.out_features, layer.in_features) / layer.in_features**0.5
        # NF4 with double quantisation, as kubetune loads a base (quantised on the move).
        layer.weight = bnb.nn.Params4bit(
            full.bfloat16(), requires_grad=False, quant_type="nf4", compress_statistics=True
        )._quantize(device)
        if layer.bias is not None:
            layer.bias = torch.nn.Parameter(
                torch.randn(layer.out_features, device=device).bfloat16(), False
            )
    model.is_loaded_in_4bit = True  # as transformers marks a 4-bit model, for PEFT's dispatch
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=["up", "down"])
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            # B starts at zero in PEFT; a non-zero B makes every gradient term count.
            param.data = (torch.randn_like(param) * 0.1).bfloat16()
    return peft_model.to(device)


def _forward_backward(model: Any, x: Any) -> tuple[Any, Any, dict[str, Any]]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out.float() ** 2).mean().backward()
    grads = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.float().detach(), x.grad.float(), grads


def _close(a: Any, b: Any, rtol: float = 0.02) -> bool:
    return float((a - b).norm() / b.norm()) < rtol


def _fused_matches_peft(device: str) -> None:
    import torch

    from kubetune.trainer.model.fused_lora import fuse_lora_layers

    x = torch.randn(2, 24, 128, device=device).bfloat16()
    plain = _lora_model(device=device)
    expected_out, expected_dx, expected_grads = _forward_backward(plain, x)

    fused = _lora_model(device=device)
    assert fuse_lora_layers(fused) == 2
    out, dx, grads = _forward_backward(fused, x)

    assert out.shape == expected_out.shape
    assert _close(out, expected_out), "outputs differ"
    assert _close(dx, expected_dx), "input gradients differ"
    assert set(grads) == set(expected_grads) and len(grads) == 4  # A and B of both layers
    for name, grad in grads.items():
        assert _close(grad, expected_grads[name]), f"gradient of {name} differs"


def test_fused_layer_gives_pefts_outputs_and_gradients() -> None:
    _fused_matches_peft("cpu")


@pytest.mark.gpu
def test_fused_layer_gives_pefts_outputs_and_gradients_on_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA)")
    _fused_matches_peft("cuda")


def test_dropout_no_grad_and_disabled_adapters_take_pefts_own_forward() -> None:
    import torch

    from kubetune.trainer.model import fused_lora

    calls = []
    original = fused_lora.FusedLoRA4bit.apply

    def counting(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    x = torch.randn(1, 8, 128).bfloat16()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fused_lora.FusedLoRA4bit, "apply", counting)
        with_dropout = _lora_model(dropout=0.1)
        fused_lora.fuse_lora_layers(with_dropout)
        with_dropout(x)
        assert calls == []

        model = _lora_model()
        fused_lora.fuse_lora_layers(model)
        with torch.no_grad():
            model(x)
        with model.disable_adapter():
            model(x)
        model.eval()
        model(x)
        assert calls == []
        model.train()
        model(x)
        assert len(calls) == 2
