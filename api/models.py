"""The FineTuneJob API (kubetune.io/v1alpha1): spec and status models.

These pydantic models are the one source of truth: the CRD in ``crds/`` is generated from them,
the operator renders Jobs from them and the trainer reads them from its resolved config. Field
descriptions become the CRD's documentation (``kubectl explain finetunejob.spec``).
"""

from __future__ import annotations

import json
import re
import urllib.parse
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from kubetune.api.bounded import AFFINITY, POD_SPEC
from kubetune.api.schema_bounds import conforms
from kubetune.api.uris import (
    ADAPTER_SCHEMES,
    CHECKPOINT_SCHEMES,
    DATASET_SCHEMES,
    MODEL_SCHEMES,
    OCI_PULL_REFERENCE,
    OCI_REFERENCE,
    OUTPUT_SCHEMES,
    parse_uri,
)

GROUP: Final = "kubetune.io"
VERSION: Final = "v1alpha1"
API_VERSION: Final = "kubetune.io/v1alpha1"
KIND: Final = "FineTuneJob"
PLURAL: Final = "finetunejobs"

DatasetFormat = Literal[
    "auto",
    "text",
    "messages",
    "prompt-completion",
    "alpaca",
    "preference",
    "unpaired-preference",
]
#: The formats each training method reads (``auto`` detects one of them from the columns).
METHOD_FORMATS: Final = {
    "sft": ("text", "messages", "prompt-completion", "alpaca"),
    "dpo": ("preference",),
    "kto": ("unpaired-preference", "preference"),
}
#: TRL's DPO losses (``DPOConfig.loss_type``).
DpoLossType = Literal[
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
Phase = Literal["Pending", "Validating", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
#: GPU kinds the preflight knows (memory for the plan; a measured speed where there is one).
OciLayout = Literal["modelpack", "kaito"]
GpuKind = Literal["H200", "H100-80GB", "A100-80GB", "A100-40GB", "L40S", "L4"]

_K8S_NAME = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti|P|Pi|E|Ei)?$")
# Kubernetes' own name syntax (k8s.io/apimachinery/pkg/util/validation), written so that both
# Python's re and the apiserver's RE2 read them: the models and the CRD refuse the same names.
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
_QUALIFIED_HINT = "an optional DNS-subdomain prefix and '/', then at most 63 of [A-Za-z0-9-_.]"


def _uri_rules(what: str, *, oci: bool = False, oci_pull: bool = False) -> dict[str, Any]:
    """The CEL half of ``parse_uri``: what the apiserver can refuse before the operator sees it."""
    rules: list[dict[str, str]] = [
        {
            "rule": "!self.matches('(^|/)[.][.](/|$)')",
            "message": f"{what} URI must not contain '..' segments",
        },
        {
            "rule": (
                "!self.startsWith('pvc://') || "
                "self.matches('^pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?$')"
            ),
            "message": f"{what} URI must be of the form pvc://<claim-name>/<path>",
        },
    ]
    if oci:
        rules.append(
            {
                "rule": f"!self.startsWith('oci://') || self.matches('{OCI_REFERENCE}')",
                "message": (
                    f"{what} URI must be of the form oci://<registry>[:<port>]/<repository>"
                    "[:<tag>] with a lowercase repository"
                ),
            }
        )
    if oci_pull:
        rules.append(
            {
                "rule": f"!self.startsWith('oci://') || self.matches('{OCI_PULL_REFERENCE}')",
                "message": (
                    f"{what} URI must be of the form oci://<registry>[:<port>]/<repository>"
                    "[:<tag>|@sha256:<digest>] with a lowercase repository"
                ),
            }
        )
    return {"x-kubernetes-validations": rules}


_CHECKPOINT_RULE = (
    "output.checkpointUri is required with an oci:// output.uri, and only there: a registry holds "
    "the finished adapter, so the run's checkpoints need a pvc://, s3://, gs:// or local location "
    "for a retried pod to resume from"
)


def _quantity_as_string(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        value = str(value)
    if isinstance(value, str) and (len(value) > 64 or not _QUANTITY.match(value)):
        raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. 8, 500m, 16Gi)")
    return value


Quantity = Annotated[
    str,
    BeforeValidator(_quantity_as_string),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer"}, {"type": "string"}],
            "x-kubernetes-int-or-string": True,
            "maxLength": 64,
        }
    ),
]

#: core/v1 Affinity, each list and string bounded (api/bounded.py).
Affinity = Annotated[dict[str, Any], AfterValidator(conforms(AFFINITY)), WithJsonSchema(AFFINITY)]
#: The pod spec fields a pod template may carry, bounded; fields it doesn't know are left to the
#: operator's policy, which refuses them by name.
PodSpecOverrides = Annotated[
    dict[str, Any],
    AfterValidator(conforms(POD_SPEC, unknown_fields=True)),
    WithJsonSchema(POD_SPEC),
]

#: The largest spec the models accept, as compact JSON. The CRD bounds each field (the apiserver
#: refuses what is over); this bounds them all together, and the fields the policy refuses by
#: name, which the CRD lets through to be refused with a message.
MAX_SPEC_BYTES: Final = 128 * 1024


def _matching(pattern: str, what: str, hint: str, max_length: int) -> Any:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if len(value) > max_length or not compiled.match(value):
            raise ValueError(f"{value[:80]!r} is not a valid {what} ({hint})")
        return value

    return AfterValidator(check)


QualifiedName = Annotated[
    str,
    _matching(_QUALIFIED_NAME, "qualified name", _QUALIFIED_HINT, 317),
    WithJsonSchema({"type": "string", "maxLength": 317, "pattern": _QUALIFIED_NAME}),
]
LabelValue = Annotated[
    str,
    _matching(_LABEL_VALUE, "label value", "at most 63 of [A-Za-z0-9-_.], alphanumeric ends", 63),
    WithJsonSchema({"type": "string", "maxLength": 63, "pattern": _LABEL_VALUE}),
]
DnsSubdomain = Annotated[
    str,
    _matching(_DNS_SUBDOMAIN, "name", "a lowercase DNS subdomain, at most 253 characters", 253),
    WithJsonSchema({"type": "string", "maxLength": 253, "pattern": _DNS_SUBDOMAIN}),
]


def _qualified_keys(field: str) -> dict[str, Any]:
    """CEL for a map's keys (a structural schema can't constrain property names)."""
    return {
        "x-kubernetes-validations": [
            {
                "rule": f"self.all(k, size(k) <= 317 && k.matches('{_QUALIFIED_NAME}'))",
                "message": f"{field} keys must be qualified names ({_QUALIFIED_HINT})",
            }
        ]
    }


def _immutable(field: str) -> dict[str, Any]:
    return {
        "x-kubernetes-validations": [
            {"rule": "self == oldSelf", "message": f"spec.{field} is immutable once the job exists"}
        ]
    }


class ApiModel(BaseModel):
    """Frozen, camelCase on the wire, and no unknown field passes silently."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_default=True,
        allow_inf_nan=False,
    )


# --- spec ------------------------------------------------------------------------------------


class SecretKeyRef(ApiModel):
    """A key of a Secret in the job's namespace."""

    name: str = Field(description="Name of the Secret.", max_length=253, pattern=_K8S_NAME)
    key: str = Field(default="token", description="Key within the Secret.", max_length=253)


class RegistryCredentialsRef(ApiModel):
    """A ``kubernetes.io/dockerconfigjson`` Secret in the job's namespace (what ``kubectl create
    secret docker-registry`` makes): its ``.dockerconfigjson`` key holds the registry's login."""

    name: str = Field(description="Name of the Secret.", max_length=253, pattern=_K8S_NAME)


class RegistrySpec(ApiModel):
    """How the trainer reaches the registry of an oci:// output."""

    credentials_secret_ref: RegistryCredentialsRef | None = Field(
        default=None,
        description=(
            "A kubernetes.io/dockerconfigjson Secret of the job's namespace with a login for the "
            "registry (its creator must be allowed to read it). Unset: anonymous push."
        ),
    )
    plain_http: bool = Field(
        default=False,
        description=(
            "Talk to the registry over plain http (no TLS); only for a registry the platform "
            "names (the chart's trainer.plainHttpRegistries), such as the local cluster's."
        ),
    )
    layout: OciLayout = Field(
        default="modelpack",
        description=(
            "How the adapter is laid out in the registry. modelpack: one CNCF ModelPack artifact, "
            "a raw layer a file (model.adapter of a later job pulls it back). kaito: the adapter "
            "image KAITO's inference.adapters[].source.image pulls (an OCI image whose one "
            "gzip layer holds the files under data/)."
        ),
    )


class StartingAdapterSpec(ApiModel):
    """A LoRA adapter to continue training from, instead of a fresh one."""

    uri: str = Field(
        description=(
            "The adapter: oci://registry/repository[:tag|@sha256:digest] (as a kubetune output "
            "pushed it), a hub id or hf://id, s3://, gs://, pvc://claim/path, or a local path "
            "(kubetune train only). Its rank and alpha must be lora.r and lora.alpha, and it must "
            "fit the base model; checked before any GPU is asked for."
        ),
        min_length=1,
        max_length=1024,
        json_schema_extra=_uri_rules("model.adapter", oci_pull=True),
    )
    revision: str = Field(
        default="main", description="Hub revision, for a hub adapter.", max_length=256
    )
    registry: RegistrySpec | None = Field(
        default=None, description="Credentials and transport for an oci:// adapter."
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        parse_uri(value, ADAPTER_SCHEMES, "model.adapter", oci_digest=True)
        return value

    @model_validator(mode="after")
    def _registry(self) -> StartingAdapterSpec:
        if self.registry is not None and not self.uri.startswith("oci://"):
            raise ValueError("model.adapter.registry applies only to an oci:// model.adapter.uri")
        return self


class ModelSpec(ApiModel):
    """The base model to fine-tune."""

    uri: str = Field(
        description=(
            "Base model: a hub id (meta-llama/Llama-2-7b-hf), hf://id, s3://bucket/prefix, "
            "gs://bucket/prefix, pvc://claim/path, or a local path (kubetune train only)."
        ),
        min_length=1,
        max_length=1024,
        json_schema_extra=_uri_rules("model"),
    )
    revision: str = Field(
        default="main",
        description="Hub revision (branch, tag or commit sha) to pin the model to.",
        max_length=256,
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret holding a hub token, for gated or private models. Never logged.",
    )
    trust_remote_code: bool = Field(
        default=False,
        description="Run model code shipped with the checkpoint. Off unless you trust its source.",
    )
    adapter: StartingAdapterSpec | None = Field(
        default=None,
        description="Continue training this LoRA adapter (SFT) instead of starting a fresh one.",
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        parse_uri(value, MODEL_SCHEMES, "model")
        return value


class ColumnMapping(ApiModel):
    """Names of the dataset's columns, where they differ from the format's defaults."""

    text: str | None = Field(
        default=None, description="Column with plain text (text).", max_length=128
    )
    messages: str | None = Field(
        default=None, description="Column with chat messages (messages).", max_length=128
    )
    prompt: str | None = Field(
        default=None, description="Prompt column (prompt-completion).", max_length=128
    )
    completion: str | None = Field(
        default=None, description="Completion column (prompt-completion).", max_length=128
    )
    instruction: str | None = Field(
        default=None, description="Instruction column (alpaca).", max_length=128
    )
    input: str | None = Field(default=None, description="Input column (alpaca).", max_length=128)
    output: str | None = Field(default=None, description="Output column (alpaca).", max_length=128)
    chosen: str | None = Field(
        default=None, description="Preferred answer column (preference).", max_length=128
    )
    rejected: str | None = Field(
        default=None, description="Dispreferred answer column (preference).", max_length=128
    )
    label: str | None = Field(
        default=None,
        description="Desirable (true) or not (false) column (unpaired-preference).",
        max_length=128,
    )


class DatasetSpec(ApiModel):
    """The training data."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": (
                        "(has(self.evalSplit) ? 1 : 0) + (has(self.evalFraction) ? 1 : 0)"
                        " + (has(self.evalUri) ? 1 : 0) <= 1"
                    ),
                    "message": (
                        "set at most one of dataset.evalSplit, dataset.evalFraction and "
                        "dataset.evalUri"
                    ),
                }
            ]
        }
    )

    uri: str = Field(
        description=(
            "Dataset: a hub id, hf://id, https://..., s3://, gs://, pvc://claim/path or a local "
            "path. Files may be jsonl, json, csv or parquet."
        ),
        min_length=1,
        max_length=1024,
        json_schema_extra=_uri_rules("dataset"),
    )
    format: DatasetFormat = Field(
        default="auto",
        description=(
            "Record format: text, messages (chat), prompt-completion, alpaca "
            "(instruction/input/output); for method dpo and kto preference (prompt/chosen/"
            "rejected) and for kto unpaired-preference (prompt/completion/label), each as text "
            "or chat messages; or auto to detect it from the columns."
        ),
    )
    split: str = Field(default="train", description="Split to train on.", max_length=128)
    revision: str | None = Field(
        default=None, description="Hub revision of a hub dataset.", max_length=256
    )
    columns: ColumnMapping = Field(
        default_factory=ColumnMapping, description="Column names, where not the defaults."
    )
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template for messages; the tokenizer's own when unset.",
        max_length=16384,
    )
    completion_only_loss: bool = Field(
        default=True,
        description=(
            "Train on completions/assistant turns only (prompt tokens are masked), where the "
            "format has them."
        ),
    )
    eval_split: str | None = Field(
        default=None, description="Split to evaluate on.", max_length=128
    )
    eval_fraction: float | None = Field(
        default=None,
        description="Fraction of the training data held out for evaluation (0 < f <= 0.5).",
        gt=0,
        le=0.5,
    )
    eval_uri: str | None = Field(
        default=None,
        description=(
            "Evaluation data from elsewhere: a URI of the same kinds as uri (its records in the "
            "same format, read with the same columns)."
        ),
        min_length=1,
        max_length=1024,
        json_schema_extra=_uri_rules("dataset.evalUri"),
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        parse_uri(value, DATASET_SCHEMES, "dataset")
        return value

    @field_validator("eval_uri")
    @classmethod
    def _eval_uri(cls, value: str | None) -> str | None:
        if value is not None:
            parse_uri(value, DATASET_SCHEMES, "dataset.evalUri")
        return value

    @model_validator(mode="after")
    def _one_eval_source(self) -> DatasetSpec:
        sources = (self.eval_split, self.eval_fraction, self.eval_uri)
        if sum(source is not None for source in sources) > 1:
            raise ValueError(
                "set at most one of dataset.evalSplit, dataset.evalFraction and dataset.evalUri"
            )
        return self


_FP8_RULE = "quantization.fp8Matmuls: on needs quantization.computeDtype: bfloat16"


class QuantizationSpec(ApiModel):
    """4-bit quantization of the frozen base model (bitsandbytes)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": (
                        "!has(self.fp8Matmuls) || self.fp8Matmuls != 'on' || "
                        "!has(self.computeDtype) || self.computeDtype == 'bfloat16'"
                    ),
                    "message": _FP8_RULE,
                }
            ]
        }
    )

    type: Literal["nf4", "fp4"] = Field(default="nf4", description="4-bit data type.")
    double_quant: bool = Field(
        default=True, description="Quantize the quantization constants too (saves ~0.4 bit/param)."
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Dtype of the matmuls on dequantized weights."
    )
    fp8_matmuls: Literal["auto", "on", "off"] = Field(
        default="auto",
        description=(
            "Run the frozen base's matmuls (its forward and its input gradient) in FP8 e4m3 with "
            "a scale per row, on Hopper's FP8 tensor cores; the LoRA adapter and its gradients "
            "stay bf16. Changes the numerics: each base matmul rounds both operands to 3 "
            "mantissa bits. auto: on where the GPU has compute capability 9.0 or newer (H100, "
            "H200), computeDtype is bfloat16, torch has row-wise scaled matmuls and the memory "
            "plan's micro-steps hold at least 4,096 tokens (smaller ones unmeasured) and "
            "lora.dropout is 0, else off. on: FP8 whatever the micro-step, refused where it "
            "can't run (or with a LoRA dropout); off: bf16 as before."
        ),
    )

    @model_validator(mode="after")
    def _fp8_needs_bf16(self) -> QuantizationSpec:
        if self.fp8_matmuls == "on" and self.compute_dtype != "bfloat16":
            raise ValueError(_FP8_RULE)
        return self


class LoraSpec(ApiModel):
    """The LoRA adapter (PEFT)."""

    r: int = Field(default=16, ge=1, le=1024, description="Rank of the update matrices.")
    alpha: float = Field(
        default=32, gt=0, description="Scaling numerator: the update is scaled by alpha / r."
    )
    dropout: float = Field(
        default=0.0,
        ge=0,
        lt=1,
        description=(
            "Dropout on the LoRA input. 0 by default: 0.05 cost 5% of the tokens/s and 16 GiB "
            "on a 7B run, with no measured quality gain (docs/trainer.md)."
        ),
    )
    target_modules: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        max_length=64,
        description="Modules to adapt: names or suffixes, or all-linear.",
    )
    modules_to_save: list[Annotated[str, Field(max_length=256)]] = Field(
        default_factory=list,
        max_length=16,
        description="Modules trained in full and saved with the adapter (e.g. lm_head).",
    )


class TrainingSpec(ApiModel):
    """Hyperparameters of the run (SFT, DPO or KTO)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(has(self.epochs) && has(self.maxSteps))",
                    "message": "set either training.epochs or training.maxSteps, not both",
                },
                {
                    "rule": (
                        "!has(self.microBatchSize) || self.batchSize % self.microBatchSize == 0"
                    ),
                    "message": "training.batchSize must be a multiple of training.microBatchSize",
                },
            ]
        }
    )

    epochs: float | None = Field(
        default=None, gt=0, le=1000, description="Passes over the data (3 when maxSteps is unset)."
    )
    max_steps: int | None = Field(
        default=None, ge=1, description="Optimizer steps to run, instead of epochs."
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    batch_size: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="Effective batch size: sequences per optimizer step, across accumulation.",
    )
    micro_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="Sequences per forward pass per GPU; chosen for you when unset.",
    )
    gradient_accumulation_steps: int | None = Field(
        default=None, ge=1, description="Derived from batchSize / microBatchSize when unset."
    )
    max_length: int = Field(
        default=2048, ge=16, le=131072, description="Maximum sequence length in tokens."
    )
    packing: bool = Field(
        default=True,
        description="Pack sequences padding-free (no compute spent on padding).",
    )
    lr_scheduler: Literal[
        "cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts"
    ] = Field(default="cosine", description="Learning-rate schedule.")
    warmup_ratio: float = Field(
        default=0.03, ge=0, le=1, description="Fraction of steps spent warming up."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float = Field(default=0.3, gt=0, description="Gradient clipping norm.")
    seed: int = Field(
        default=42, ge=0, le=2**32 - 1, description="Random seed (data order, LoRA init)."
    )
    checkpoint_steps: int = Field(
        default=100,
        ge=1,
        description="Checkpoint every N optimizer steps (and always on SIGTERM).",
    )
    logging_steps: int = Field(default=10, ge=1, description="Log metrics every N steps.")
    gradient_checkpointing: bool | None = Field(
        default=None,
        description=(
            "Recompute activations in backward: much less memory, about a third slower. Unset "
            "(auto): the memory plan checkpoints as few decoder layers as the GPU's free memory "
            "needs (none, some spread evenly, or all); true: all layers; false: none."
        ),
    )
    attention: Literal["auto", "varlen", "flex_attention", "sdpa", "eager"] = Field(
        default="auto",
        description=(
            "Attention kernel; auto picks the fastest that works on the node: varlen "
            "(FlashAttention's variable-length kernel, packed sequences on a GPU of compute "
            "capability 8.0 or newer), else flex_attention on a GPU, else sdpa."
        ),
    )
    liger_kernel: Literal["auto", "on", "off"] = Field(
        default="auto", description="Liger fused kernels; auto uses them on CUDA when installed."
    )
    optimizer: str = Field(
        default="auto",
        max_length=64,
        description=(
            "transformers optimizer name; auto = the memory plan's pick: adamw_torch_fused on a "
            "GPU with room for its fp32 states, else paged_adamw_8bit; adamw_torch on a CPU."
        ),
    )
    profile: Literal["speed", "memory"] = Field(
        default="speed",
        description=(
            "What the memory plan optimises. speed: the fastest plan the GPU's free memory holds "
            "(checkpointing as few layers as fit, the biggest micro-steps). memory: the least GPU "
            "memory: every decoder layer checkpointed with the checkpoints kept in CPU memory, "
            "one packed row of maxLength a micro-step, paged 8-bit AdamW (a 7B model trains in "
            "about 5 GiB at 2,048 tokens a micro-step, at a fraction of the speed)."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if self.epochs is not None and self.max_steps is not None:
            raise ValueError("set either training.epochs or training.maxSteps, not both")
        if self.micro_batch_size is not None and self.batch_size % self.micro_batch_size:
            raise ValueError(
                "training.batchSize must be a multiple of training.microBatchSize "
                f"({self.batch_size} is not a multiple of {self.micro_batch_size})"
            )
        return self


class HubPushSpec(ApiModel):
    """Push the adapter to a model hub after training."""

    repo_id: str = Field(
        description="Hub repository, e.g. my-org/llama2-support-lora.", max_length=256
    )
    private: bool = Field(default=True, description="Create the repository as private.")
    token_secret_ref: SecretKeyRef = Field(description="Secret with a token that may write.")


class OutputSpec(ApiModel):
    """Where the adapter goes."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.registry) || self.uri.startsWith('oci://')",
                    "message": "output.registry applies only to an oci:// output.uri",
                },
                {
                    "rule": "self.uri.startsWith('oci://') == has(self.checkpointUri)",
                    "message": _CHECKPOINT_RULE,
                },
            ]
        }
    )

    uri: str = Field(
        description=(
            "pvc://claim/path, s3://bucket/prefix, gs://bucket/prefix, "
            "oci://registry/repository[:tag] (pushed as one OCI artifact; the tag defaults to "
            "latest), or a local path."
        ),
        min_length=1,
        max_length=1024,
        json_schema_extra=_uri_rules("output", oci=True),
    )
    checkpoint_uri: str | None = Field(
        default=None,
        description=(
            "For an oci:// output, and required with it: where the run keeps its checkpoints and "
            "working files (pvc://claim/path, s3://, gs:// or a local path), so that a retried "
            "pod resumes. A registry holds the finished adapter, not checkpoints."
        ),
        min_length=1,
        max_length=1024,
        json_schema_extra=_uri_rules("output.checkpointUri"),
    )
    registry: RegistrySpec | None = Field(
        default=None, description="Credentials and transport for an oci:// output."
    )
    push_to_hub: HubPushSpec | None = Field(default=None, description="Also push to a hub.")
    merge: bool = Field(
        default=False, description="Also write the base model with the adapter merged in."
    )
    merge_base: Literal["original", "dequantized"] = Field(
        default="original",
        description=(
            "What output.merge merges the adapter into: the original weights in the compute "
            "dtype (answers like the base with the adapter served beside it), or the dequantized "
            "4-bit weights the adapter was trained against (answers like the trained model)."
        ),
    )

    @field_validator("uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        parse_uri(value, OUTPUT_SCHEMES, "output")
        return value

    @field_validator("checkpoint_uri")
    @classmethod
    def _checkpoint_uri(cls, value: str | None) -> str | None:
        if value is not None:
            parse_uri(value, CHECKPOINT_SCHEMES, "output.checkpointUri")
        return value

    @model_validator(mode="after")
    def _oci(self) -> OutputSpec:
        is_oci = self.uri.startswith("oci://")
        if self.registry is not None and not is_oci:
            raise ValueError("output.registry applies only to an oci:// output.uri")
        if is_oci != (self.checkpoint_uri is not None):
            raise ValueError(_CHECKPOINT_RULE)
        return self

    @property
    def is_oci(self) -> bool:
        return self.uri.startswith("oci://")

    @property
    def working_uri(self) -> str:
        """Where the run writes its adapter files, checkpoints and metrics: the output itself,
        or for an oci:// output its checkpointUri (the artifact is pushed from there)."""
        return self.checkpoint_uri if self.checkpoint_uri is not None else self.uri


class ResourcesSpec(ApiModel):
    """What the trainer pod asks for."""

    gpus: int = Field(
        default=1,
        ge=0,
        le=16,
        description="GPUs per pod, one training rank each (0 runs one rank on the CPU).",
    )
    nodes: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Pods (usually one per node); the effective batch divides over all ranks.",
    )
    gpu_resource_name: QualifiedName = Field(
        default="nvidia.com/gpu",
        description="Extended resource name of a GPU (domain/name, e.g. nvidia.com/gpu).",
    )
    cpu: Quantity | None = Field(default=None, description="CPU request and limit.")
    memory: Quantity | None = Field(default=None, description="Memory request and limit.")
    shm_size: Quantity = Field(
        default="8Gi", description="Size of /dev/shm (memory-backed) for data loader workers."
    )

    @property
    def world_size(self) -> int:
        """Training ranks in all: one per GPU, or one per pod on the CPU."""
        return max(self.gpus, 1) * self.nodes


class Toleration(ApiModel):
    """A toleration, as in a Pod spec."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!(self.operator == 'Exists' && has(self.value) && self.value != '')",
                    "message": "a toleration with operator Exists takes no value",
                },
                {
                    "rule": "!has(self.tolerationSeconds) || self.effect == 'NoExecute'",
                    "message": "tolerationSeconds needs effect NoExecute",
                },
            ]
        }
    )

    key: QualifiedName | None = Field(default=None, description="Taint key.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: LabelValue | None = Field(default=None, description="Taint value.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; all when unset."
    )
    toleration_seconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("tolerationSeconds needs effect NoExecute")
        return self


class SchedulingSpec(ApiModel):
    """Where the trainer pod may run."""

    node_selector: dict[QualifiedName, LabelValue] = Field(
        default_factory=dict,
        max_length=32,
        description="Node labels the pod requires.",
        json_schema_extra=_qualified_keys("scheduling.nodeSelector"),
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Taints the pod tolerates."
    )
    affinity: Affinity | None = Field(
        default=None,
        description=(
            "Pod affinity, as in a Pod spec: node affinity, pod affinity and anti-affinity, each "
            "list and string bounded (checked again by the Job's API)."
        ),
    )
    priority_class_name: DnsSubdomain | None = Field(
        default=None, description="PriorityClass of the pod."
    )
    queue_name: LabelValue | None = Field(
        default=None,
        description="Kueue LocalQueue; the Job is created suspended and Kueue admits it.",
    )


class RunPolicySpec(ApiModel):
    """Lifecycle of the run."""

    suspend: bool = Field(default=False, description="Suspend the run (resumes from a checkpoint).")
    backoff_limit: int = Field(
        default=3, ge=0, le=100, description="Retries after unexpected failures."
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Fail the run after this many seconds."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Delete the finished FineTuneJob after this many seconds."
    )


class PodTemplateMetadata(ApiModel):
    labels: dict[QualifiedName, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Extra labels (kubetune's own always win).",
        json_schema_extra=_qualified_keys("podTemplate.metadata.labels"),
    )
    annotations: dict[QualifiedName, Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=dict,
        max_length=16,
        description="Extra annotations (kubetune's own always win).",
        json_schema_extra=_qualified_keys("podTemplate.metadata.annotations"),
    )


class PodTemplateOverrides(ApiModel):
    """Escape hatch, refused unless the operator's settings allow the fields it sets: merged
    into the trainer pod, under kubetune's service account, security context and command."""

    metadata: PodTemplateMetadata = Field(
        default_factory=PodTemplateMetadata, description="Labels and annotations for the pod."
    )
    spec: PodSpecOverrides = Field(
        default_factory=dict,
        description=(
            "Pod spec fields merged over kubetune's (containers merge by name), each list and "
            "string bounded. Fields the operator's settings don't allow are refused."
        ),
    )


class DpoSpec(ApiModel):
    """Direct Preference Optimization (TRL's DPOTrainer); TRL's defaults."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.lossType != 'exo_pair' || self.labelSmoothing > 0.0",
                    "message": "method.dpo.lossType exo_pair needs method.dpo.labelSmoothing > 0",
                }
            ]
        }
    )

    beta: float = Field(
        default=0.1,
        gt=0,
        le=100,
        description=(
            "How far the adapter may move from the reference (the base, adapter disabled): "
            "higher stays closer. For ipo, the regularization parameter tau."
        ),
    )
    loss_type: DpoLossType = Field(
        default="sigmoid", description="The preference loss (TRL's DPOConfig.loss_type)."
    )
    # At most 0.49 rather than below 0.5: the apiserver compares a whole-number default (0)
    # with an exclusive fractional maximum as integers (0 < 0), and refuses the CRD.
    label_smoothing: float = Field(
        default=0.0,
        ge=0,
        le=0.49,
        description=(
            "Probability that a pair's preference is flipped (robust; below 0.5), or EXO's "
            "epsilon (exo_pair)."
        ),
    )

    @model_validator(mode="after")
    def _consistent(self) -> DpoSpec:
        if self.loss_type == "exo_pair" and self.label_smoothing == 0:
            raise ValueError("method.dpo.lossType exo_pair needs method.dpo.labelSmoothing > 0")
        return self


class KtoSpec(ApiModel):
    """Kahneman-Tversky Optimization (TRL's KTOTrainer); TRL's defaults."""

    beta: float = Field(
        default=0.1,
        gt=0,
        le=100,
        description="How far the adapter may move from the reference: higher stays closer.",
    )
    loss_type: Literal["kto", "apo_zero_unpaired"] = Field(
        default="kto", description="The loss (TRL's KTOConfig.loss_type)."
    )
    desirable_weight: float = Field(
        default=1.0, gt=0, le=100, description="Weight of the desirable examples' loss."
    )
    undesirable_weight: float = Field(
        default=1.0, gt=0, le=100, description="Weight of the undesirable examples' loss."
    )


class MethodSpec(ApiModel):
    """What the run trains the adapter for: supervised answers, or preferences."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "!has(self.dpo) || self.type == 'dpo'",
                    "message": "method.dpo is for method.type dpo",
                },
                {
                    "rule": "!has(self.kto) || self.type == 'kto'",
                    "message": "method.kto is for method.type kto",
                },
            ]
        }
    )

    type: Literal["sft", "dpo", "kto"] = Field(
        default="sft",
        description=(
            "sft: supervised fine-tuning (TRL's SFTTrainer). dpo: preference pairs (prompt, "
            "chosen, rejected) with TRL's DPOTrainer. kto: desirable and undesirable answers "
            "(prompt, completion, label; or pairs) with TRL's KTOTrainer. The reference model "
            "of dpo and kto is the 4-bit base with the adapter disabled (no second copy)."
        ),
    )
    dpo: DpoSpec | None = Field(default=None, description="DPO settings (type dpo).")
    kto: KtoSpec | None = Field(default=None, description="KTO settings (type kto).")

    @model_validator(mode="after")
    def _consistent(self) -> MethodSpec:
        if self.dpo is not None and self.type != "dpo":
            raise ValueError("method.dpo is for method.type dpo")
        if self.kto is not None and self.type != "kto":
            raise ValueError("method.kto is for method.type kto")
        return self

    @property
    def preference(self) -> bool:
        """Whether the run learns from preferences (a reference pass per example)."""
        return self.type != "sft"

    @property
    def dpo_settings(self) -> DpoSpec:
        return self.dpo or DpoSpec()

    @property
    def kto_settings(self) -> KtoSpec:
        return self.kto or KtoSpec()


class EvaluationSpec(ApiModel):
    """What to show about the adapter after training."""

    prompts: list[Annotated[str, Field(max_length=2048)]] = Field(
        default_factory=list,
        max_length=16,
        description="Prompts answered by the base model and by base + adapter, in the result.",
    )
    max_new_tokens: int = Field(default=32, ge=1, le=1024, description="Tokens to generate.")


class ValidationSpec(ApiModel):
    """The Validating phase: a CPU pod checks the data and estimates the run before any GPU pod."""

    enabled: bool = Field(
        default=True,
        description=(
            "Before the GPU Job, run the trainer's preflight in a small CPU Job: read and "
            "tokenize the dataset, count examples, tokens and steps, plan memory, and fail the "
            "job on a dataset or model problem before a GPU is requested."
        ),
    )
    gpu_kind: GpuKind | None = Field(
        default=None,
        description=(
            "The GPU the trainer will get, for the memory plan and the time estimate (the "
            "operator can't know which card a node has). Unset: no peak memory or seconds."
        ),
    )
    max_sample_records: int = Field(
        default=100_000,
        ge=100,
        le=10_000_000,
        description=(
            "Datasets with more records are checked in full but tokenized on a sample of this "
            "many, and the counts extrapolated (status.estimate.sampled)."
        ),
    )


def _tracking_uri(value: str) -> str:
    """An http(s) URL with a host and no credentials in it: they come from Secrets only."""
    parsed = parse_uri(value, ("http", "https"), "tracking.mlflow.trackingUri")
    if parsed.scheme not in ("http", "https"):
        raise ValueError("tracking.mlflow.trackingUri must be an http:// or https:// URL")
    parts = urllib.parse.urlsplit(value)
    if "@" in parts.netloc or parts.query or parts.fragment:
        raise ValueError(
            "tracking.mlflow.trackingUri must not carry credentials, a query or a fragment; "
            "give credentials through tracking.mlflow.usernameSecretRef/passwordSecretRef or "
            "tokenSecretRef"
        )
    return value


class MlflowTrackingSpec(ApiModel):
    """Log the run to an MLflow tracking server: parameters, metrics per logging step, and the
    adapter's location and sha256, base model and dataset fingerprint as tags."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.usernameSecretRef) == has(self.passwordSecretRef)",
                    "message": (
                        "set tracking.mlflow.usernameSecretRef and passwordSecretRef together"
                    ),
                }
            ]
        }
    )

    tracking_uri: str = Field(
        description=(
            "The tracking server, http(s)://host[:port][/path]. No credentials in it: use the "
            "secret references."
        ),
        min_length=1,
        max_length=1024,
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.matches('^https?://[^/@?#]+(/[^?#]*)?$')",
                    "message": (
                        "tracking.mlflow.trackingUri must be an http(s) URL without "
                        "credentials, query or fragment"
                    ),
                }
            ]
        },
    )
    experiment_name: str = Field(
        description="Experiment to log the run under (created when it does not exist).",
        min_length=1,
        max_length=256,
    )
    run_name: str | None = Field(
        default=None,
        description="Name of the MLflow run; the FineTuneJob's name when unset.",
        max_length=256,
    )
    username_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the HTTP basic-auth user (MLFLOW_TRACKING_USERNAME).",
    )
    password_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the HTTP basic-auth password (MLFLOW_TRACKING_PASSWORD).",
    )
    token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a bearer token (MLFLOW_TRACKING_TOKEN).",
    )

    @field_validator("tracking_uri")
    @classmethod
    def _uri(cls, value: str) -> str:
        return _tracking_uri(value)

    @model_validator(mode="after")
    def _basic_auth_pair(self) -> MlflowTrackingSpec:
        if (self.username_secret_ref is None) != (self.password_secret_ref is None):
            raise ValueError("set tracking.mlflow.usernameSecretRef and passwordSecretRef together")
        return self


class TensorBoardSpec(ApiModel):
    """TensorBoard event files, written beside the adapter (``<output>/runs/``)."""

    enabled: bool = Field(default=True, description="Write TensorBoard event files.")


class TrackingSpec(ApiModel):
    """Experiment tracking: where the run's parameters and metrics go besides the status."""

    mlflow: MlflowTrackingSpec | None = Field(
        default=None, description="Log to an MLflow tracking server."
    )
    tensorboard: TensorBoardSpec | None = Field(
        default=None, description="Write TensorBoard event files beside the adapter."
    )


class ObjectStoreSpec(ApiModel):
    """How the trainer reaches the object store of the spec's s3:// URIs: credentials from a
    Secret of the job's namespace (which its creator must be allowed to read), and another
    S3-compatible endpoint where the platform allows it. Unset: the standard AWS credential chain
    of the trainer pod (e.g. workload identity)."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": (
                        "has(self.accessKeyIdSecretRef) == has(self.secretAccessKeySecretRef)"
                    ),
                    "message": (
                        "set objectStore.accessKeyIdSecretRef and secretAccessKeySecretRef together"
                    ),
                }
            ]
        }
    )

    endpoint: str | None = Field(
        default=None,
        description=(
            "An S3-compatible endpoint, https://host[:port] (AWS_ENDPOINT_URL); one of the "
            "endpoints the platform allows (the chart's trainer.allowedObjectStoreEndpoints). "
            "Unset: AWS's own."
        ),
        max_length=512,
        pattern=r"^https?://[^/@?#\s]+/?$",
    )
    region: str | None = Field(
        default=None,
        description="The store's region (AWS_DEFAULT_REGION).",
        max_length=64,
        pattern=r"^[a-z0-9-]+$",
    )
    access_key_id_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the access key id (AWS_ACCESS_KEY_ID).",
    )
    secret_access_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding the secret access key (AWS_SECRET_ACCESS_KEY).",
    )
    session_token_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a session token (AWS_SESSION_TOKEN), for temporary keys.",
    )

    @model_validator(mode="after")
    def _key_pair(self) -> ObjectStoreSpec:
        if (self.access_key_id_secret_ref is None) != (self.secret_access_key_secret_ref is None):
            raise ValueError(
                "set objectStore.accessKeyIdSecretRef and secretAccessKeySecretRef together"
            )
        return self


_FORMAT_RULE = (
    "dataset.format must be one method.type trains on (sft: text, messages, prompt-completion, "
    "alpaca; dpo: preference; kto: preference, unpaired-preference) or auto"
)


class FineTuneJobSpec(ApiModel):
    """A QLoRA fine-tuning run: supervised, or on preferences."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": (
                        "!has(self.dataset.format) || self.dataset.format == 'auto' || "
                        "((!has(self.method) || !has(self.method.type) || "
                        "self.method.type == 'sft') ? "
                        "self.dataset.format in ['text', 'messages', 'prompt-completion', "
                        "'alpaca'] : (self.method.type == 'dpo' ? "
                        "self.dataset.format == 'preference' : "
                        "self.dataset.format in ['preference', 'unpaired-preference']))"
                    ),
                    "message": _FORMAT_RULE,
                }
            ]
        }
    )

    model: ModelSpec = Field(description="The base model.", json_schema_extra=_immutable("model"))
    dataset: DatasetSpec = Field(
        description="The training data.", json_schema_extra=_immutable("dataset")
    )
    quantization: QuantizationSpec = Field(
        default_factory=QuantizationSpec,
        description="4-bit quantization of the base.",
        json_schema_extra=_immutable("quantization"),
    )
    lora: LoraSpec = Field(
        default_factory=LoraSpec,
        description="The LoRA adapter.",
        json_schema_extra=_immutable("lora"),
    )
    method: MethodSpec = Field(
        default_factory=MethodSpec,
        description="Supervised fine-tuning (the default) or preference tuning (dpo, kto).",
        json_schema_extra=_immutable("method"),
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec,
        description="Hyperparameters.",
        json_schema_extra=_immutable("training"),
    )
    output: OutputSpec = Field(
        description="Where the adapter goes.", json_schema_extra=_immutable("output")
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec,
        description="What the trainer pod asks for.",
        json_schema_extra=_immutable("resources"),
    )
    scheduling: SchedulingSpec = Field(
        default_factory=SchedulingSpec, description="Where the trainer pod may run."
    )
    run_policy: RunPolicySpec = Field(
        default_factory=RunPolicySpec, description="Suspension, retries, deadlines, cleanup."
    )
    image: str | None = Field(
        default=None,
        max_length=512,
        description="Trainer image; the operator's default when unset.",
        json_schema_extra=_immutable("image"),
    )
    pod_template: PodTemplateOverrides | None = Field(
        default=None, description="Escape hatch: fields merged into the trainer pod."
    )
    evaluation: EvaluationSpec | None = Field(
        default=None,
        description="Prompts to compare base and adapter on after training.",
        json_schema_extra=_immutable("evaluation"),
    )
    validation: ValidationSpec = Field(
        default_factory=ValidationSpec,
        description="The Validating phase before the GPU Job (on by default).",
        json_schema_extra=_immutable("validation"),
    )
    tracking: TrackingSpec | None = Field(
        default=None,
        description="Experiment tracking: MLflow and TensorBoard.",
        json_schema_extra=_immutable("tracking"),
    )
    object_store: ObjectStoreSpec | None = Field(
        default=None,
        description="Credentials and endpoint for the spec's s3:// URIs.",
        json_schema_extra=_immutable("objectStore"),
    )

    def uris(self) -> list[tuple[str, str, bool]]:
        """Every URI the spec names, as (field, uri, whether the trainer writes there): what
        the operator mounts, the policy checks and the trainer redacts."""
        named = [("spec.model.uri", self.model.uri, False)]
        if self.model.adapter is not None:
            named.append(("spec.model.adapter.uri", self.model.adapter.uri, False))
        named.append(("spec.dataset.uri", self.dataset.uri, False))
        if self.dataset.eval_uri is not None:
            named.append(("spec.dataset.evalUri", self.dataset.eval_uri, False))
        named.append(("spec.output.uri", self.output.uri, True))
        if self.output.checkpoint_uri is not None:
            named.append(("spec.output.checkpointUri", self.output.checkpoint_uri, True))
        return named

    @model_validator(mode="after")
    def _cross_field(self) -> FineTuneJobSpec:
        given = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        size = _json_size(given)
        if size > MAX_SPEC_BYTES:
            largest = sorted(given, key=lambda k: _json_size(given[k]), reverse=True)[:2]
            raise ValueError(
                f"spec is {size} bytes of JSON, more than {MAX_SPEC_BYTES}; the largest "
                f"fields: {', '.join(f'spec.{k}' for k in largest)}"
            )
        plan = plan_training(self.training, self.resources.world_size)  # raises naming the field
        method, fmt = self.method.type, self.dataset.format
        if self.model.adapter is not None and method != "sft":
            raise ValueError(
                f"model.adapter: continuing an adapter is for method.type sft, not {method} (its "
                "reference model would be the base without the adapter)"
            )
        if fmt != "auto" and fmt not in METHOD_FORMATS[method]:
            raise ValueError(
                f"{_FORMAT_RULE}: method.type {method} doesn't train on dataset.format {fmt}"
            )
        if method == "kto" and self.method.kto_settings.loss_type == "kto":
            per_rank = plan.micro_batch_size * plan.gradient_accumulation_steps
            if per_rank < 2 or (self.training.micro_batch_size or 2) < 2:
                raise ValueError(
                    "method.type kto estimates its KL term within a micro-batch: it needs at "
                    "least 2 examples a micro-batch (training.batchSize a rank and "
                    "training.microBatchSize of at least 2)"
                )
        return self


def _json_size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), default=str).encode())


class FineTuneJob(ApiModel):
    """A FineTuneJob manifest (status is read separately, see FineTuneJobStatus)."""

    model_config = ConfigDict(extra="ignore")

    api_version: Literal["kubetune.io/v1alpha1"] = Field(default=API_VERSION)
    kind: Literal["FineTuneJob"] = Field(default=KIND)
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: FineTuneJobSpec

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", "finetunejob"))


class TrainingPlan(BaseModel):
    """How a TrainingSpec is carried out on a given number of GPUs."""

    model_config = ConfigDict(frozen=True)

    epochs: float | None
    max_steps: int | None
    micro_batch_size: int
    gradient_accumulation_steps: int


def plan_training(training: TrainingSpec, ranks: int) -> TrainingPlan:
    """Resolve epochs and split the effective batch over ranks, micro-batches and accumulation.

    ``ranks`` is the world size (``ResourcesSpec.world_size``): each rank takes
    ``batchSize / ranks`` sequences per optimizer step.
    """
    devices = max(ranks, 1)
    if training.batch_size % devices:
        raise ValueError(
            f"training.batchSize ({training.batch_size}) must divide over {devices} ranks "
            "(resources.gpus x resources.nodes)"
        )
    per_device = training.batch_size // devices
    micro = training.micro_batch_size
    accumulation = training.gradient_accumulation_steps
    if micro is None and accumulation is None:
        # Up to 4 sequences per pass: the measured sweet spot with gradient checkpointing on.
        micro = max(d for d in range(1, min(per_device, 4) + 1) if per_device % d == 0)
    if micro is None:
        assert accumulation is not None
        if per_device % accumulation:
            raise ValueError(
                f"training.batchSize ({training.batch_size}) is not divisible by "
                f"training.gradientAccumulationSteps ({accumulation}) x {devices} GPU(s)"
            )
        micro = per_device // accumulation
    if accumulation is None:
        if per_device % micro:
            raise ValueError(
                f"training.batchSize ({training.batch_size}) is not divisible by "
                f"training.microBatchSize ({micro}) x {devices} GPU(s)"
            )
        accumulation = per_device // micro
    if micro * accumulation != per_device:
        raise ValueError(
            f"training.microBatchSize ({micro}) x training.gradientAccumulationSteps "
            f"({accumulation}) x {devices} GPU(s) must equal training.batchSize "
            f"({training.batch_size})"
        )
    epochs = training.epochs
    if epochs is None and training.max_steps is None:
        epochs = 3.0
    return TrainingPlan(
        epochs=epochs,
        max_steps=training.max_steps,
        micro_batch_size=micro,
        gradient_accumulation_steps=accumulation,
    )


# --- status ----------------------------------------------------------------------------------


class StatusModel(BaseModel):
    """Status is written by kubetune; read it leniently so older fields never break a reader."""

    model_config = ConfigDict(
        frozen=True, extra="ignore", alias_generator=to_camel, populate_by_name=True
    )


class Condition(StatusModel):
    """A condition, shaped like metav1.Condition."""

    type: str = Field(description="Condition type, PascalCase.", max_length=316)
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(description="One-word CamelCase reason.", max_length=1024)
    message: str = Field(default="", description="Human-readable details.", max_length=32768)
    last_transition_time: str = Field(description="When status last changed (RFC 3339).")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation this condition was set for."
    )


CURVE_POINTS = 200
"""The most points ``status.progress.history`` holds; older points are thinned evenly."""


class CurvePoint(StatusModel):
    """One logged step of the training curves."""

    step: int = Field(description="Optimizer step of this point.")
    loss: float | None = Field(default=None, description="Training loss logged at this step.")
    learning_rate: float | None = Field(default=None, description="Learning rate at this step.")
    tokens_per_second: float | None = Field(
        default=None, description="Throughput in real tokens per second up to this step."
    )


class Progress(StatusModel):
    """Live training progress: the trainer reports it to the operator, which writes it
    (rate-limited)."""

    step: int = Field(default=0, description="Optimizer steps done.")
    total_steps: int | None = Field(default=None, description="Optimizer steps in the run.")
    epoch: float | None = Field(default=None, description="Epochs done (fractional).")
    percent: float | None = Field(default=None, description="Percent complete.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    learning_rate: float | None = Field(default=None, description="Current learning rate.")
    tokens_per_second: float | None = Field(
        default=None, description="Throughput in real (non-padding) tokens per second."
    )
    eta_seconds: float | None = Field(default=None, description="Estimated seconds to finish.")
    reward_accuracy: float | None = Field(
        default=None,
        description=(
            "Preference tuning (dpo): the latest fraction of pairs whose chosen answer the "
            "adapter rewards above the rejected one."
        ),
    )
    reward_margin: float | None = Field(
        default=None,
        description="Preference tuning: the latest mean chosen reward minus rejected reward.",
    )
    chosen_reward: float | None = Field(
        default=None,
        description=(
            "Preference tuning: the latest mean reward of the chosen (desirable) answers: "
            "beta x log-probability ratio of adapter and reference."
        ),
    )
    rejected_reward: float | None = Field(
        default=None,
        description="Preference tuning: the latest mean reward of the rejected (undesirable) ones.",
    )
    updated_at: str | None = Field(default=None, description="When this was written (RFC 3339).")
    history: list[CurvePoint] | None = Field(
        default=None,
        max_length=CURVE_POINTS,
        description=(
            f"The loss, learning-rate and throughput curves so far, at most {CURVE_POINTS} points"
            " spread evenly over the run (thinned as it grows), oldest first."
        ),
    )


class AdapterRef(StatusModel):
    """The trained adapter."""

    uri: str = Field(description="Where the adapter is.")
    sha256: str = Field(description="sha256 of the adapter weights file.")
    size_bytes: int = Field(description="Size of the adapter weights file in bytes.")


class TrackingRef(StatusModel):
    """Where the run was tracked (spec.tracking), to find it from the job."""

    mlflow_experiment_id: str | None = Field(
        default=None, description="The MLflow experiment of the run (tracking.mlflow)."
    )
    mlflow_run_id: str | None = Field(
        default=None, description="The MLflow run that holds the parameters, metrics and tags."
    )


class BaseModelRef(StatusModel):
    uri: str = Field(description="Base model URI.")
    revision: str | None = Field(default=None, description="Base model revision.")
    adapter: str | None = Field(
        default=None,
        description=(
            "The adapter training continued from (spec.model.adapter; an oci:// one by digest)."
        ),
    )


class EvaluationSample(StatusModel):
    prompt: str = Field(description="Prompt.")
    base: str = Field(description="Answer of the base model.")
    adapter: str = Field(description="Answer of the base model with the adapter.")


class EvaluationResult(StatusModel):
    samples: list[EvaluationSample] = Field(
        default_factory=list, description="Prompts and answers."
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="Held-out metrics.")


class MemoryPlanReport(StatusModel):
    """What the trainer's memory plan chose for the GPU it ran on."""

    gradient_checkpointing: str = Field(
        description="off, all layers, or N of M layers (spread evenly)."
    )
    micro_batch_size: int = Field(description="Packed rows of maxLength per forward pass.")
    tokens_per_micro_step: int = Field(description="Tokens per forward pass.")
    gradient_accumulation_steps: int = Field(description="Micro-steps per optimizer step.")
    optimizer: str = Field(description="The optimizer used.")
    profile: str = Field(default="speed", description="training.profile: speed or memory.")
    checkpoints_offloaded: bool = Field(
        default=False, description="Whether the checkpointed activations were kept in CPU memory."
    )
    estimated_peak_gib: float | None = Field(
        default=None, description="Peak GPU memory the plan expected (GiB)."
    )
    free_gib: float | None = Field(
        default=None, description="Free GPU memory when the plan was made (GiB)."
    )
    peak_gib: float | None = Field(default=None, description="Peak GPU memory measured (GiB).")
    fp8_matmuls: bool = Field(
        default=False,
        description=(
            "Whether the frozen base's matmuls ran in FP8 (quantization.fp8Matmuls as this node "
            "resolved it; layers whose sizes are not multiples of 16 run in bf16 regardless)."
        ),
    )


class EstimatePlan(StatusModel):
    """The memory plan the estimate assumes."""

    micro_batch_size: int = Field(description="Packed rows of maxLength per forward pass.")
    gradient_accumulation_steps: int = Field(description="Micro-steps per optimizer step.")
    gradient_checkpointing: str = Field(
        description="off, all layers, or N of M layers (spread evenly)."
    )
    optimizer: str = Field(description="The optimizer the plan picks.")


class MergeEstimate(StatusModel):
    """What output.merge will cost after training (scaled from a measured 7B merge)."""

    disk_gib: float = Field(alias="diskGiB", description="Size of the merged model (GiB).")
    host_gib: float = Field(alias="hostGiB", description="Peak host memory of the merge (GiB).")
    gpu_gib: float | None = Field(
        default=None,
        alias="gpuGiB",
        description="Peak GPU memory of the merge (GiB; mergeBase dequantized only).",
    )
    seconds: float = Field(
        description="Seconds to load, merge and write (on the machine it was measured on)."
    )


class Estimate(StatusModel):
    """What the Validating phase found and expects of the run."""

    examples: int = Field(description="Training examples after shaping (before packing).")
    tokens: int = Field(description="Tokens in one epoch of the training examples.")
    sequences: int = Field(description="Rows the trainer iterates per epoch (packed or not).")
    steps: int = Field(description="Optimizer steps the run will take.")
    plan: EstimatePlan | None = Field(default=None, description="The memory plan it assumes.")
    gpu_kind: str | None = Field(default=None, description="The GPU the estimate is for.")
    peak_gib: float | None = Field(
        default=None,
        alias="peakGiB",
        description="Estimated peak GPU memory (GiB) on validation.gpuKind.",
    )
    seconds: float | None = Field(
        default=None,
        description="Estimated training seconds on validation.gpuKind (from measured speed).",
    )
    sampled: bool = Field(
        default=False, description="Counts extrapolated from a tokenized sample of the data."
    )
    merge: MergeEstimate | None = Field(
        default=None, description="What output.merge will cost, when it is set."
    )


class TrainerResult(StatusModel):
    """What the trainer reports on exit (its termination message)."""

    outcome: Literal["Succeeded", "Failed"] = Field(description="Succeeded or Failed.")
    reason: str = Field(description="One-word CamelCase reason.")
    message: str = Field(default="", description="Human-readable details.")
    adapter: AdapterRef | None = Field(default=None, description="The adapter, on success.")
    base_model: BaseModelRef | None = Field(default=None, description="The base model used.")
    dataset_fingerprint: str | None = Field(
        default=None, description="Hash of the resolved dataset source and content."
    )
    metrics: dict[str, float] = Field(default_factory=dict, description="Final metrics.")
    evaluation: EvaluationResult | None = Field(
        default=None, description="Base vs adapter answers and held-out metrics."
    )
    plan: MemoryPlanReport | None = Field(
        default=None, description="What the memory plan chose (checkpointing, micro-steps)."
    )
    estimate: Estimate | None = Field(
        default=None, description="The preflight's estimate (kubetune-trainer preflight)."
    )
    tracking: TrackingRef | None = Field(
        default=None, description="The MLflow run of this training, when spec.tracking has one."
    )


class FineTuneJobStatus(StatusModel):
    """Observed state of a FineTuneJob."""

    phase: Phase | None = Field(default=None, description="Summary for people.")
    observed_generation: int | None = Field(
        default=None, description="The .metadata.generation last acted on."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="Ready, Running, Succeeded, Failed, Suspended.",
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    start_time: str | None = Field(default=None, description="When training started.")
    completion_time: str | None = Field(default=None, description="When the job finished.")
    attempts: int | None = Field(default=None, description="Trainer pods started so far.")
    world_size: int | None = Field(
        default=None, description="Training ranks (GPUs per pod x pods, or pods on the CPU)."
    )
    job_name: str | None = Field(default=None, description="The batch/v1 Job running the trainer.")
    pod_name: str | None = Field(
        default=None, description="The trainer pod of the latest attempt (for kubectl logs)."
    )
    progress: Progress | None = Field(
        default=None,
        description=(
            "Live progress: the trainer reports it to the operator, which writes it (at most "
            "once per its progress interval)."
        ),
    )
    estimate: Estimate | None = Field(
        default=None,
        description="Written by the Validating phase before the GPU Job: examples, tokens, "
        "steps, the plan, peak memory and seconds.",
    )
    result: TrainerResult | None = Field(default=None, description="The trainer's result.")
