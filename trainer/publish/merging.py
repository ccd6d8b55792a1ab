"""Merging a trained adapter into its base model, for servers that take one set of weights.

A QLoRA adapter is trained against the *dequantized* 4-bit weights ``W_q``, not the original
ones ``W``; the two differ by the quantization error. So there are two bases to merge into:

- ``original``: ``W + BA`` in the compute dtype. It answers like the original base with the
  adapter loaded on it, which is what vLLM, KServe and KAITO serve from ``--lora-modules`` /
  ``adapters`` on the same base: a merged model and an adapter served beside it agree.
- ``dequantized``: ``W_q + BA``. It answers like the model that was trained and evaluated (the
  run's loss, its evaluation samples), and it carries the 4-bit error into every weight.

``original`` is the default (docs/trainer.md gives the measured difference between the two).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from kubetune.api.models import FineTuneJobSpec

MergeBase = Literal["original", "dequantized"]


def load_base(spec: FineTuneJobSpec, into: MergeBase, *, token: str | None) -> Any:
    """The base model as the merge sees it: the original weights in the compute dtype, or the
    4-bit weights the adapter was trained against, dequantized back to the compute dtype."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from kubetune.trainer.model.modeling import locate_model, torch_dtype

    source, is_hub = locate_model(spec.model)
    kwargs: dict[str, Any] = {"trust_remote_code": spec.model.trust_remote_code}
    if is_hub:
        kwargs.update(revision=spec.model.revision, token=token)
    dtype = torch_dtype(spec.quantization.compute_dtype)
    if into == "original":
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
    cuda = torch.cuda.is_available()
    # The same quantization as training (modeling.load_quantized_model): NF4 is deterministic,
    # so these are the very 4-bit weights the adapter learned on.
    quantized = AutoModelForCausalLM.from_pretrained(
        source,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.quantization.type,
            bnb_4bit_use_double_quant=spec.quantization.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=torch.uint8,
        ),
        dtype=dtype,
        device_map={"": torch.cuda.current_device()} if cuda else {"": "cpu"},
        **kwargs,
    )
    base = quantized.dequantize(dtype=dtype)
    # Saved without its quantization_config, the merged folder loads as a plain model.
    if hasattr(base.config, "quantization_config"):
        del base.config.quantization_config
    return base.to("cpu") if cuda else base


def merge_adapter(
    spec: FineTuneJobSpec,
    adapter_dir: Path,
    target: Path,
    *,
    into: MergeBase,
    token: str | None,
    tokenizer: Any = None,
) -> None:
    """Base + the adapter in ``adapter_dir`` as one model in the compute dtype, in ``target``."""
    import torch
    from peft import PeftModel

    base = load_base(spec, into, token=token)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(target)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    del base, merged
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
