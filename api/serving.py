"""Serving a finished job's adapter: the manifests that load it on its base, for vLLM, KServe and
KAITO (``kubetune serve-manifest``).

Pure: a FineTuneJob's spec and status in, Kubernetes objects out. Each manifest points at the
adapter where ``status.result.adapter.uri`` says it is (a pvc:// claim, an s3:// or gs:// prefix,
an oci:// artifact pinned by digest) and at the base the job trained on. docs/serving.md walks
through each.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final, Literal

from kubetune.api.models import FineTuneJobSpec, FineTuneJobStatus, SecretKeyRef
from kubetune.api.uris import MODEL_SCHEMES, OUTPUT_SCHEMES, ParsedUri, parse_uri

Stack = Literal["vllm", "kserve", "kaito"]
STACKS: Final[tuple[Stack, ...]] = ("vllm", "kserve", "kaito")

#: Pinned so that a printed manifest serves the same thing tomorrow; --image overrides them.
VLLM_IMAGE: Final = "vllm/vllm-openai:v0.11.0"
ORAS_IMAGE: Final = "ghcr.io/oras-project/oras:v1.3.0"
AWS_CLI_IMAGE: Final = "amazon/aws-cli:2.31.0"
GCLOUD_IMAGE: Final = "gcr.io/google.com/cloudsdktool/google-cloud-cli:stable"

#: Where the vLLM pod finds the adapter and (for a pvc:// base) the base model.
ADAPTERS_DIR: Final = "/adapters"
BASE_DIR: Final = "/models/base"
VLLM_PORT: Final = 8000


class NotServable(ValueError):
    """The job has no adapter yet, or the stack can't load it from where it is."""


@dataclass(frozen=True)
class Served:
    """What every manifest needs to know about one job's adapter."""

    job: str
    namespace: str
    spec: FineTuneJobSpec
    adapter_uri: str
    adapter: ParsedUri
    base: ParsedUri
    revision: str | None

    @property
    def adapter_name(self) -> str:
        """The name clients ask for in the OpenAI API's ``model`` field: the job's."""
        return self.job

    @property
    def base_hub_id(self) -> str | None:
        if self.base.scheme == "hf":
            return self.base.path
        if self.base.scheme == "" and self.base.could_be_hub_id:
            return self.base.uri
        return None

    @property
    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": _dns_label(self.job), "kubetune.io/finetunejob": self.job}


def served(job: dict[str, Any]) -> Served:
    """The adapter of a FineTuneJob as the cluster returns it; NotServable until it succeeded."""
    metadata = job.get("metadata") or {}
    name = str(metadata.get("name", ""))
    status = FineTuneJobStatus.model_validate(job.get("status") or {})
    result = status.result
    if status.phase != "Succeeded" or result is None or result.adapter is None:
        raise NotServable(
            f"FineTuneJob {name} has no adapter to serve yet (phase {status.phase or 'unknown'})"
        )
    spec = FineTuneJobSpec.model_validate(job["spec"])
    adapter = parse_uri(result.adapter.uri, OUTPUT_SCHEMES, "adapter", oci_digest=True)
    base_uri = result.base_model.uri if result.base_model else spec.model.uri
    revision = result.base_model.revision if result.base_model else spec.model.revision
    return Served(
        job=name,
        namespace=str(metadata.get("namespace", "default")),
        spec=spec,
        adapter_uri=result.adapter.uri,
        adapter=adapter,
        base=parse_uri(base_uri, MODEL_SCHEMES, "model"),
        revision=revision,
    )


def render(job: dict[str, Any], stack: Stack, *, image: str | None = None) -> list[dict[str, Any]]:
    """The objects that serve ``job``'s adapter on its base with ``stack``."""
    what = served(job)
    if what.adapter.scheme in ("file", ""):
        raise NotServable(
            f"the adapter of {what.job} is on the trainer's local disk ({what.adapter_uri}); "
            "serve one written to pvc://, s3://, gs:// or oci://"
        )
    if stack == "vllm":
        return vllm(what, image=image or VLLM_IMAGE)
    if stack == "kserve":
        return [kserve(what)]
    return [kaito(what)]


# --- vLLM --------------------------------------------------------------------------------------


def vllm(what: Served, *, image: str) -> list[dict[str, Any]]:
    """A Deployment running vLLM's OpenAI server with the adapter as a LoRA module, and its
    Service. The adapter is mounted (pvc://) or copied into an emptyDir by an init container
    (oras for oci://, the cloud CLI for s3:// and gs://)."""
    name = f"{_dns_label(what.job, 58)}-vllm"
    adapter_dir = f"{ADAPTERS_DIR}/{what.adapter_name}"
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    init: list[dict[str, Any]] = []
    env: list[dict[str, Any]] = []

    if what.adapter.scheme == "pvc":
        volumes.append(_claim_volume("adapter", what.adapter.claim))
        mounts.append(_mount("adapter", adapter_dir, what.adapter.path))
    else:
        volumes.append({"name": "adapter", "emptyDir": {}})
        mounts.append({"name": "adapter", "mountPath": ADAPTERS_DIR, "readOnly": True})
        fetch, extra = _fetch_container(what, adapter_dir)
        init.append(fetch)
        volumes += extra

    model, revision = _vllm_base(what, volumes, mounts)
    if what.spec.model.token_secret_ref is not None:
        env.append(_secret_env("HF_TOKEN", what.spec.model.token_secret_ref))
    args = ["--model", model]
    if revision:
        args += ["--revision", revision]
    args += [
        "--port", str(VLLM_PORT),
        "--enable-lora",
        "--max-lora-rank", str(_lora_rank(what.spec.lora.r)),
        "--lora-modules", json.dumps(
            {"name": what.adapter_name, "path": adapter_dir, "base_model_name": model},
            separators=(",", ":"),
        ),
    ]  # fmt: skip
    gpu = what.spec.resources.gpu_resource_name
    container: dict[str, Any] = {
        "name": "vllm",
        "image": image,
        "args": args,
        "ports": [{"name": "http", "containerPort": VLLM_PORT}],
        "resources": {"limits": {gpu: "1"}},
        "volumeMounts": mounts,
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
    }
    if env:
        container["env"] = env
    pod: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if init:
        pod["initContainers"] = init
    selector = {"app.kubernetes.io/name": name}
    meta = {"name": name, "namespace": what.namespace, "labels": {**what.labels, **selector}}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": meta,
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {"metadata": {"labels": meta["labels"]}, "spec": pod},
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": selector,
            "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
        },
    }
    return [deployment, service]


def _vllm_base(
    what: Served, volumes: list[dict[str, Any]], mounts: list[dict[str, Any]]
) -> tuple[str, str | None]:
    hub = what.base_hub_id
    if hub is not None:
        return hub, what.revision
    if what.base.scheme == "pvc":
        volumes.append(_claim_volume("base", what.base.claim))
        mounts.append(_mount("base", BASE_DIR, what.base.path))
        return BASE_DIR, None
    raise NotServable(
        f"vLLM loads its base from a hub id or a mounted volume; {what.job}'s base "
        f"{what.base.uri} is neither: copy it to a pvc:// claim, or serve with --for kserve"
    )


def _fetch_container(what: Served, target: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """An init container that copies the adapter's files into ``target`` (an emptyDir), and the
    volumes it needs besides."""
    mount: list[dict[str, Any]] = [{"name": "adapter", "mountPath": ADAPTERS_DIR}]
    volumes: list[dict[str, Any]] = []
    container: dict[str, Any]
    uri = what.adapter_uri
    if what.adapter.scheme == "oci":
        reference = uri.removeprefix("oci://")
        args = ["pull", reference, "--output", target]
        registry = what.spec.output.registry
        if registry is not None and registry.plain_http:
            args.append("--plain-http")
        container = {"name": "fetch-adapter", "image": ORAS_IMAGE, "args": args}
        if registry is not None and registry.credentials_secret_ref is not None:
            secret = registry.credentials_secret_ref.name
            mount.append({"name": "registry-auth", "mountPath": "/auth", "readOnly": True})
            container["args"] = [*args, "--registry-config", "/auth/.dockerconfigjson"]
            volumes.append({"name": "registry-auth", "secret": {"secretName": secret}})
    elif what.adapter.scheme == "s3":
        container = {
            "name": "fetch-adapter",
            "image": AWS_CLI_IMAGE,
            "args": ["s3", "cp", "--recursive", "--exclude", "checkpoints/*", uri, target],
            "env": _object_store_env(what),
        }
    else:
        container = {
            "name": "fetch-adapter",
            "image": GCLOUD_IMAGE,
            "command": ["gcloud", "storage", "cp", "--recursive", f"{uri.rstrip('/')}/*", target],
        }
    container["volumeMounts"] = mount
    return container, volumes


def _object_store_env(what: Served) -> list[dict[str, Any]]:
    store = what.spec.object_store
    if store is None:
        return []
    env: list[dict[str, Any]] = []
    if store.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": store.endpoint})
    if store.region:
        env.append({"name": "AWS_DEFAULT_REGION", "value": store.region})
    for var, ref in (
        ("AWS_ACCESS_KEY_ID", store.access_key_id_secret_ref),
        ("AWS_SECRET_ACCESS_KEY", store.secret_access_key_secret_ref),
        ("AWS_SESSION_TOKEN", store.session_token_secret_ref),
    ):
        if ref is not None:
            env.append(_secret_env(var, ref))
    return env


# --- KServe ------------------------------------------------------------------------------------


def kserve(what: Served) -> dict[str, Any]:
    """An ``LLMInferenceService`` (serving.kserve.io/v1alpha2) with the adapter under
    ``spec.model.lora.adapters``: KServe's storage initializer reads both URIs itself."""
    hub = what.base_hub_id
    base_uri = f"hf://{hub}" if hub is not None else what.base.uri
    model: dict[str, Any] = {
        "uri": base_uri,
        "name": hub or what.job,
        "lora": {"adapters": [{"uri": what.adapter_uri, "name": what.adapter_name}]},
    }
    gpu = what.spec.resources.gpu_resource_name
    return {
        "apiVersion": "serving.kserve.io/v1alpha2",
        "kind": "LLMInferenceService",
        "metadata": {
            "name": _dns_label(what.job),
            "namespace": what.namespace,
            "labels": what.labels,
        },
        "spec": {
            "model": model,
            "replicas": 1,
            "router": {"route": {}},
            "template": {
                "containers": [{"name": "main", "resources": {"limits": {gpu: "1"}}}],
            },
        },
    }


# --- KAITO -------------------------------------------------------------------------------------


def kaito(what: Served) -> dict[str, Any]:
    """A KAITO ``Workspace`` (kaito.sh/v1beta1) serving the base as a Hugging Face preset with the
    adapter in ``inference.adapters``: mounted from its claim (pvc://) or pulled by KAITO's
    puller from the adapter image an ``output.registry.layout: kaito`` push made (oci://)."""
    hub = what.base_hub_id
    if hub is None:
        raise NotServable(
            f"KAITO serves a preset or a Hugging Face model id; {what.job}'s base {what.base.uri} "
            "is neither: serve with --for vllm or --for kserve"
        )
    source: dict[str, Any] = {"name": _dns_label(what.adapter_name)}
    if what.adapter.scheme == "pvc":
        claim: dict[str, Any] = {"claimName": what.adapter.claim, "readOnly": True}
        source["volumeSource"] = {"persistentVolumeClaim": claim}
        if what.adapter.path:
            raise NotServable(
                f"KAITO mounts a whole claim as the adapter's folder; {what.job}'s adapter is "
                f"under {what.adapter.path!r} in claim {what.adapter.claim}: write it to the "
                "claim's root (output.uri: pvc://<claim>) or serve with --for vllm or kserve"
            )
    elif what.adapter.scheme == "oci":
        registry = what.spec.output.registry
        if registry is None or registry.layout != "kaito":
            raise NotServable(
                f"KAITO pulls an adapter image with its files under data/; {what.job}'s adapter "
                "is a ModelPack artifact: push it with output.registry.layout: kaito, or serve "
                "with --for vllm or kserve"
            )
        source["image"] = what.adapter_uri.removeprefix("oci://")
        if registry.credentials_secret_ref is not None:
            source["imagePullSecrets"] = [registry.credentials_secret_ref.name]
    else:
        raise NotServable(
            f"KAITO takes adapters from an image or a volume, not {what.adapter.scheme}://; push "
            "the adapter to oci:// or write it to pvc://, or serve with --for vllm or kserve"
        )
    preset: dict[str, Any] = {"name": hub}
    if what.spec.model.token_secret_ref is not None:
        preset["presetOptions"] = {"modelAccessSecret": what.spec.model.token_secret_ref.name}
    return {
        "apiVersion": "kaito.sh/v1beta1",
        "kind": "Workspace",
        "metadata": {
            "name": _dns_label(what.job),
            "namespace": what.namespace,
            "labels": what.labels,
        },
        "resource": {"labelSelector": {"matchLabels": {"kubetune.io/serving": "gpu"}}},
        "inference": {"preset": preset, "adapters": [{"source": source}]},
    }


# --- helpers -----------------------------------------------------------------------------------


def _claim_volume(name: str, claim: str | None) -> dict[str, Any]:
    return {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}


def _mount(name: str, path: str, sub_path: str) -> dict[str, Any]:
    mount: dict[str, Any] = {"name": name, "mountPath": path, "readOnly": True}
    if sub_path.strip("/"):
        mount["subPath"] = sub_path.strip("/")
    return mount


def _secret_env(name: str, ref: SecretKeyRef) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def _lora_rank(r: int) -> int:
    """vLLM accepts only these ``--max-lora-rank`` values; the smallest that holds ``r``."""
    for rank in (8, 16, 32, 64, 128, 256, 320, 512):
        if r <= rank:
            return rank
    raise NotServable(f"vLLM serves LoRA ranks up to 512; this adapter's r is {r}")


def _dns_label(name: str, limit: int = 63) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:limit].strip("-")
    return label or "adapter"
