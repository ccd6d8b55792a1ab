"""The fused 4-bit LoRA layer computes what PEFT's computes: the same outputs and the same
gradients for the input and both adapter matrices, on a real bitsandbytes NF4 layer (CPU), and
PEFT's own forward wherever the fused one doesn't apply."""

from __future__ import annotations

from typing import Any

import pytest
from trainer_helpers import forward_backward

pytestmark = pytest.mark.trainer


def _lora_model(
    dropout: float = 0.0, seed: int = 0, device: str = "cpu", sizes: tuple[int, int] = (128, 192)
) -> Any:
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    outer, inner = sizes

    class TwoLayers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = bnb.nn.Linear4bit(
                outer, inner, bias=False, compute_dtype=torch.bfloat16, quant_type="nf4"
            )
            self.down = bnb.nn.Linear4bit(
                inner, outer, bias=True, compute_dtype=torch.bfloat16, quant_type="nf4"
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


def _close(a: Any, b: Any, rtol: float = 0.02) -> bool:
    return float((a - b).norm() / b.norm()) < rtol


def _fused_matches_peft(device: str, keep: str | None = None) -> None:
    import torch

    from kubetune.trainer.model.fused_lora import fuse_lora_layers, keep_dequantization

    x = torch.randn(2, 24, 128, device=device).bfloat16()
    plain = _lora_model(device=device)
    expected_out, expected_dx, expected_grads = forward_backward(plain, x)

    fused = _lora_model(device=device)
    assert fuse_lora_layers(fused) == 2
    if keep is not None:
        assert keep_dequantization(fused, keep) == 2
    out, dx, grads = forward_backward(fused, x)

    assert out.shape == expected_out.shape
    assert _close(out, expected_out), "outputs differ"
    assert _close(dx, expected_dx), "input gradients differ"
    assert set(grads) == set(expected_grads) and len(grads) == 4  # A and B of both layers
    for name, grad in grads.items():
        assert _close(grad, expected_grads[name]), f"gradient of {name} differs"


def test_fused_layer_gives_pefts_outputs_and_gradients() -> None:
    _fused_matches_peft("cpu")


@pytest.mark.parametrize("keep", ["scales", "weights"])
def test_kept_dequantization_gives_pefts_outputs_and_gradients(keep: str) -> None:
    _fused_matches_peft("cpu", keep)


def test_kept_weight_is_bitsandbytes_dequantization_and_is_dropped() -> None:
    import torch
    from bitsandbytes.functional import dequantize_4bit

    from kubetune.trainer.model import fused_lora

    model = _lora_model()
    fused_lora.fuse_lora_layers(model)
    fused_lora.keep_dequantization(model, "scales")
    fused_lora.keep_dequantization(model, "weights")
    weight = model.base_model.model.up.base_layer.weight
    expected = dequantize_4bit(weight.data, weight.quant_state)
    assert torch.equal(getattr(weight, fused_lora.KEPT_WEIGHT), expected)
    delattr(weight, fused_lora.KEPT_WEIGHT)  # the kept scales alone dequantise the same
    assert torch.equal(fused_lora._dequantized(weight, torch.bfloat16), expected)
    fused_lora.drop_kept_dequantization(model)
    assert not hasattr(weight, fused_lora.KEPT_ABSMAX)
    assert "_kubetune" not in " ".join(model.state_dict())


@pytest.mark.gpu
@pytest.mark.parametrize("keep", [None, "scales", "weights"])
def test_fused_layer_gives_pefts_outputs_and_gradients_on_cuda(keep: str | None) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA)")
    _fused_matches_peft("cuda", keep)


#: The FP8 base against the bf16 one, relative Frobenius error of outputs and gradients: one
#: e4m3 product is within 5.1% (tests/trainer/test_fp8_base.py derives it); two layers in a row
#: add their errors in quadrature, sqrt(2) x 5.1% = 7.2%.
FP8_TWO_LAYER_TOLERANCE = 0.08


def _fp8_against_bf16(device: str, keep: str | None) -> None:
    import torch

    from kubetune.trainer.model import fused_lora

    x = torch.randn(2, 23, 128, device=device).bfloat16()  # 46 tokens: no multiple of 16
    bf16 = _lora_model(device=device)
    fused_lora.fuse_lora_layers(bf16)
    expected_out, expected_dx, expected_grads = forward_backward(bf16, x)

    fp8 = _lora_model(device=device)
    fused_lora.fuse_lora_layers(fp8)
    assert fused_lora.use_fp8_matmuls(fp8) == 2
    if keep:
        assert fused_lora.keep_dequantization(fp8, keep) == 2
    out, dx, grads = forward_backward(fp8, x)

    assert not torch.equal(out, expected_out), "the FP8 path was not taken"
    assert _close(out, expected_out, FP8_TWO_LAYER_TOLERANCE), "outputs differ"
    assert _close(dx, expected_dx, FP8_TWO_LAYER_TOLERANCE), "input gradients differ"
    assert set(grads) == set(expected_grads) and len(grads) == 4
    for name, grad in grads.items():
        assert _close(grad, expected_grads[name], FP8_TWO_LAYER_TOLERANCE), f"{name} differs"


@pytest.mark.parametrize(
    "keep", [None, "fp8", "fp8-transposed"], ids=["quantised-per-call", "kept", "kept-transposed"]
)
def test_fp8_base_matmuls_stay_within_e4m3s_rounding_of_the_bf16_layer(keep: str | None) -> None:
    _fp8_against_bf16("cpu", keep)


def test_the_kept_e4m3_base_computes_what_the_per_call_one_does_and_is_dropped() -> None:
    import torch

    from kubetune.trainer.model import fused_lora
    from kubetune.trainer.model.fp8_base import Fp8Weight

    x = torch.randn(1, 16, 128).bfloat16()
    results = []
    for keep in (None, "fp8-transposed", "fp8"):
        model = _lora_model()
        fused_lora.fuse_lora_layers(model)
        fused_lora.use_fp8_matmuls(model)
        if keep:
            fused_lora.keep_dequantization(model, keep)
        results.append(forward_backward(model, x))
    (out, dx, grads) = results[0]
    for kept_out, kept_dx, kept_grads in results[1:]:
        assert torch.equal(out, kept_out) and torch.equal(dx, kept_dx)
        assert all(torch.equal(grads[name], kept_grads[name]) for name in grads)

    weight = model.base_model.model.up.base_layer.weight
    kept = getattr(weight, fused_lora.FP8_WEIGHT)
    assert isinstance(kept, Fp8Weight) and kept.data.dtype == torch.float8_e4m3fn
    assert kept.data.shape == (192, 128) and kept.scale.shape == (192,)
    fused_lora.drop_kept_dequantization(model)
    assert not hasattr(weight, fused_lora.FP8_WEIGHT)
    assert "_kubetune" not in " ".join(model.state_dict())


def test_layers_whose_sizes_are_no_multiples_of_16_keep_the_bf16_base() -> None:
    import torch

    from kubetune.trainer.model import fused_lora

    x = torch.randn(1, 8, 120).bfloat16()
    expected = forward_backward(_lora_model(sizes=(120, 200)), x)
    model = _lora_model(sizes=(120, 200))
    assert fused_lora.fuse_lora_layers(model) == 2
    assert fused_lora.use_fp8_matmuls(model) == 0
    assert fused_lora.keep_dequantization(model, "fp8") == 0
    out, dx, _ = forward_backward(model, x)
    assert _close(out, expected[0]) and _close(dx, expected[1])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "keep", [None, "fp8", "fp8-transposed"], ids=["quantised-per-call", "kept", "kept-transposed"]
)
def test_fp8_base_matmuls_on_cuda_stay_within_e4m3s_rounding_of_the_bf16_layer(
    keep: str | None,
) -> None:
    import torch

    from kubetune.trainer.model import fp8_base

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA)")
    if not fp8_base.supported_on_this_gpu():
        pytest.skip(f"{torch.cuda.get_device_name()} runs no row-wise FP8 matmul (needs sm90+)")
    _fp8_against_bf16("cuda", keep)


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


@pytest.mark.gpu
def test_the_per_call_e4m3_weight_made_from_the_codes_is_bitwise_the_two_step_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the GPU a per-call FP8 weight comes from its 4-bit codes in one kernel (forward's
    layout and the input gradient's transposed one), with the block scales the speed plan keeps
    in fp32: the same outputs and gradients, bit for bit, as dequantising to bf16, quantising
    and transposing. (Double-quantised scales not kept: the two steps, as before.)"""
    import torch

    from kubetune.trainer.model import fp8_base, fused_lora

    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU (CUDA)")
    if not fp8_base.supported_on_this_gpu():
        pytest.skip(f"{torch.cuda.get_device_name()} runs no row-wise FP8 matmul (needs sm90+)")
    x = torch.randn(2, 23, 128, device="cuda").bfloat16()
    results, made = [], []
    for from_codes in (True, False):
        monkeypatch.setattr(fused_lora, "E4M3_FROM_CODES", from_codes)
        model = _lora_model(device="cuda")
        fused_lora.fuse_lora_layers(model)
        assert fused_lora.keep_dequantization(model, "scales") == 2
        assert fused_lora.use_fp8_matmuls(model) == 2
        weight = model.base_model.model.up.base_layer.weight
        made.append(type(getattr(weight, fused_lora.FP8_WEIGHT)).__name__)
        results.append(forward_backward(model, x))
    assert made == ["Fp8FromCodes", "bool"]
    (out, dx, grads), (two_step_out, two_step_dx, two_step_grads) = results
    assert torch.equal(out, two_step_out) and torch.equal(dx, two_step_dx)
    assert all(torch.equal(grads[name], two_step_grads[name]) for name in grads)
