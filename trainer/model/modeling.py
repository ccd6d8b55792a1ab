"""The base model in 4-bit, its tokenizer, and the LoRA config."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kubetune.api.models import LoraSpec, ModelSpec, QuantizationSpec
from kubetune.api.uris import MODEL_SCHEMES, display_uri
from kubetune.trainer import locations
from kubetune.trainer.errors import InvalidConfig, ModelUnusable, first_line
from kubetune.trainer.plan.memory import checkpointed_layer_indices
from kubetune.trainer.plan.shape import ModelShape
from kubetune.trainer.plan.speed import SpeedSettings

if TYPE_CHECKING:
    from peft import LoraConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def locate_model(spec: ModelSpec) -> tuple[str, bool]:
    """(what ``from_pretrained`` takes, whether it is a hub id) for the spec's model URI."""
    try:
        where = locations.resolve(spec.uri, MODEL_SCHEMES, "model")
    except ValueError as exc:
        raise InvalidConfig(f"model.uri: {exc}") from None
    if where.kind == "hub":
        assert where.remote is not None
        return where.remote, True
    if where.kind == "object-store":
        try:
            return str(locations.fetch_object_store(spec.uri, "models")), False
        except ImportError as exc:
            raise ModelUnusable(
                f"cannot read {display_uri(spec.uri)}: {exc.name} is not installed (s3fs for "
                "s3://, gcsfs for gs://)"
            ) from None
        except Exception as exc:
            raise ModelUnusable(
                f"cannot download model {display_uri(spec.uri)}: {first_line(exc)}"
            ) from None
    assert where.path is not None
    if not where.path.is_dir() or not (where.path / "config.json").is_file():
        what = "does not exist" if not where.path.exists() else "holds no config.json"
        raise ModelUnusable(f"model path {where.path} {what} (model.uri {display_uri(spec.uri)})")
    if where.confined_to is not None:
        try:
            locations.refuse_escapes(where.path, where.confined_to)
        except ValueError as exc:
            raise InvalidConfig(f"model.uri: {exc}") from None
    return str(where.path), False


def _load_kwargs(spec: ModelSpec, is_hub: bool, token: str | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"trust_remote_code": spec.trust_remote_code}
    if is_hub:
        kwargs.update(revision=spec.revision, token=token)
    return kwargs


def load_tokenizer(
    source: str, spec: ModelSpec, is_hub: bool, token: str | None, chat_template: str | None
) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_load_kwargs(spec, is_hub, token))
    except Exception as exc:
        raise ModelUnusable(
            f"cannot load the tokenizer of {display_uri(spec.uri)}: {first_line(exc)}"
        ) from None
    if chat_template:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        # Llama-2 ships without a pad token; padding is masked out, so any token will do.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_shape(source: str, spec: ModelSpec, is_hub: bool, token: str | None) -> ModelShape | None:
    """The shape the memory plan needs, from the model's config (None: not a decoder shape it
    knows; the plan then checkpoints every layer)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, **_load_kwargs(spec, is_hub, token))
        return ModelShape.from_config(config.to_dict())
    except Exception as exc:
        log.warning("no memory plan for %s: %s", display_uri(spec.uri), first_line(exc))
        return None


def base_config(source: str, spec: ModelSpec, is_hub: bool, token: str | None) -> Any:
    """The base model's transformers config (for checks that need no weights)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, **_load_kwargs(spec, is_hub, token))
    except Exception as exc:
        raise ModelUnusable(
            f"cannot read the config of {display_uri(spec.uri)}: {first_line(exc)}"
        ) from None


def torch_dtype(name: str) -> Any:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]


def load_quantized_model(
    source: str,
    *,
    spec: ModelSpec,
    quantization: QuantizationSpec,
    speed: SpeedSettings,
    is_hub: bool,
    token: str | None,
    cuda: bool,
) -> PreTrainedModel:
    """The base model with its Linear layers in bitsandbytes 4-bit, ready for k-bit training."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch_dtype(quantization.compute_dtype)
    attention = speed.attention
    if attention == "varlen":
        from kubetune.trainer.model import varlen_attention

        attention = varlen_attention.register()
    bnb = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            quantization_config=bnb,
            dtype=dtype,
            attn_implementation=attention,
            # The whole model on this rank's GPU: distributed.start_group made LOCAL_RANK's
            # the current one (device 0 outside a group).
            device_map={"": torch.cuda.current_device()} if cuda else {"": "cpu"},
            **_load_kwargs(spec, is_hub, token),
        )
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as exc:
        raise ModelUnusable(
            f"cannot load model {display_uri(spec.uri)}: {first_line(exc)}"
        ) from None
    model.config.use_cache = False  # the KV cache only costs memory while training
    model = prepare_model_for_kbit_training(
        model,
        use_gradient_checkpointing=speed.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if dtype == torch.bfloat16:
        _embeddings_back_to_bf16(model)
        if not speed.liger_kernel:
            _norms_back_to_bf16(model)
    return model


def _embeddings_back_to_bf16(model: PreTrainedModel) -> None:
    """Undo prepare_model_for_kbit_training's fp32 upcast of the embeddings and the LM head.

    In fp32 they make the whole residual stream fp32: every attention and every 4-bit matmul's
    output then runs in fp32, which cost 30% of the tokens/s and 3.5 GiB on the 7B benchmark
    (docs/trainer.md). bf16 has fp32's range, so only fp16 needs the upcast; norms stay fp32,
    as TRL's own QLoRA path keeps them (where Liger's norm kernel runs; without it,
    _norms_back_to_bf16).
    """
    import torch

    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        weight = getattr(module, "weight", None) if module is not None else None
        if weight is not None and weight.dtype == torch.float32:
            module.to(torch.bfloat16)


def _norms_back_to_bf16(model: PreTrainedModel) -> None:
    """Without Liger's norm kernel (the preference trainers run without it), undo the fp32
    upcast of the norms too: transformers' RMSNorm multiplies its fp32 weight into its output,
    so every layer's output, and with it the whole residual stream, would be fp32 (each matmul
    and attention of the run in fp32, and the memory that costs). The norms are frozen and
    were bf16 in the checkpoint; their statistics are still computed in fp32 by the module."""
    import torch

    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            "norm" in type(module).__name__.lower()
            and isinstance(weight, torch.nn.Parameter)
            and weight.dtype == torch.float32
        ):
            module.to(torch.bfloat16)


def check_lora_targets(model: Any, spec: LoraSpec) -> None:
    """Refuse ``targetModules`` and ``modulesToSave`` names that match no module of the model
    (PEFT would fail deep inside the trainer's construction, or save nothing), naming the field,
    the names, and the layer names the model has."""
    import torch

    modules = dict(model.named_modules())
    leaves = {name for name, m in modules.items() if name and not any(True for _ in m.children())}
    layers = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name in leaves
            if isinstance(modules[name], (torch.nn.Linear, torch.nn.Embedding))
        }
    )

    def matches(target: str, suffix_only: bool) -> list[str]:
        if suffix_only:  # PEFT's rule for modules_to_save
            return [n for n in modules if n and n.endswith(target)]
        return [n for n in modules if n == target or n.endswith(f".{target}")]

    def refuse(field: str, names: list[str], why: str) -> None:
        raise InvalidConfig(
            f"{field}: {', '.join(map(repr, names))} {why}; the model's layers are named "
            + ", ".join(layers)
        )

    if spec.target_modules != ["all-linear"]:
        unknown = [t for t in spec.target_modules if not matches(t, suffix_only=False)]
        if unknown:
            refuse("spec.lora.targetModules", unknown, "match no module of the model")
        containers = [
            t for t in spec.target_modules if not set(matches(t, suffix_only=False)) & leaves
        ]
        if containers:
            refuse(
                "spec.lora.targetModules",
                containers,
                "name blocks of layers, not layers LoRA can adapt",
            )
    unknown = [t for t in spec.modules_to_save if not matches(t, suffix_only=True)]
    if unknown:
        refuse("spec.lora.modulesToSave", unknown, "match no module of the model")


def lora_config(spec: LoraSpec) -> LoraConfig:
    from peft import LoraConfig

    targets: str | list[str] = (
        "all-linear" if spec.target_modules == ["all-linear"] else list(spec.target_modules)
    )
    return LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=targets,
        modules_to_save=list(spec.modules_to_save) or None,
        bias="none",
        task_type="CAUSAL_LM",
    )


def partial_checkpointing_callback(checkpointed: int) -> Any:
    """A callback that, once the Trainer has turned checkpointing on for every decoder layer,
    leaves it on for ``checkpointed`` of them (spread evenly) and turns it off for the rest."""
    from transformers import TrainerCallback
    from transformers.modeling_layers import GradientCheckpointingLayer

    class PartialCheckpointing(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            model = kwargs["model"]
            layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
            keep = set(checkpointed_layer_indices(checkpointed, len(layers)))
            for index, layer in enumerate(layers):
                layer.gradient_checkpointing = index in keep
            log.info("checkpointing %d of %d decoder layers", len(keep), len(layers))

    return PartialCheckpointing()


def check_optimizer_runs_here(sft_config: Any, model: Any, optimizer: str) -> None:
    """A known optimizer whose package is missing (or that needs settings kubetune doesn't
    pass) is a config problem, found before the first step rather than at it."""
    from trl import SFTTrainer

    try:
        SFTTrainer.get_optimizer_cls_and_kwargs(sft_config, model)
    except (ImportError, ValueError, RuntimeError) as exc:
        raise InvalidConfig(
            f"spec.training.optimizer: {optimizer} can't be used here: {first_line(exc)}"
        ) from None


def offload_checkpoints_to_cpu(model: Any, *, pin_memory: bool) -> None:
    """Keep what the decoder saves for the backward pass in CPU memory (``training.profile:
    memory``).

    With every layer checkpointed (non-reentrant), what the decoder saves is each layer's inputs
    (torch saves them outside the checkpoint's own hooks); torch's ``save_on_cpu`` hooks, active
    while the decoder runs forward, move them to (pinned) CPU memory and bring each back when
    its layer is recomputed. The loss head runs outside, on the GPU as before.
    """
    import torch

    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    active: list[Any] = []

    def enter(module: Any, args: Any) -> None:
        if torch.is_grad_enabled() and module.training:
            context = torch.autograd.graph.save_on_cpu(pin_memory=pin_memory)
            context.__enter__()
            active.append(context)

    def leave(module: Any, args: Any, output: Any) -> None:
        if active:
            active.pop().__exit__(None, None, None)

    decoder.register_forward_pre_hook(enter)
    decoder.register_forward_hook(leave, always_call=True)
