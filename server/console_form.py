"""The console's new-job form: its fields (named by their manifest path, defaults read from the
API models), the manifest a submission makes, and the checks ``kubetune validate`` makes
(``load_finetunejob``): problems come back one per field, named as in ``kubectl explain``. Pure:
no I/O."""

from __future__ import annotations

import copy
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel

from kubetune.api.errors import SpecError
from kubetune.api.manifest import load_finetunejob
from kubetune.api.models import API_VERSION, KIND, FineTuneJobSpec
from kubetune.server.console_html import Html, join, tag

#: metadata.name of a FineTuneJob: a DNS label (the batch Job and its pods are named from it).
NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class FormField:
    path: str  # the manifest path, e.g. spec.training.learningRate
    label: str
    kind: str = "text"  # text | number | select | lines
    choices: tuple[str, ...] = ()
    required: bool = False
    hint: str = ""


FIELDS: tuple[FormField, ...] = (
    FormField("metadata.name", "Name", required=True, hint="lower-case letters, digits and -"),
    FormField("spec.model.uri", "Base model", required=True,
              hint="hub id, hf://, s3://, gs:// or pvc://claim/path"),
    FormField("spec.model.revision", "Model revision"),
    FormField("spec.dataset.uri", "Dataset", required=True,
              hint="pvc://claim/file.jsonl, https://, s3://, gs:// or a hub dataset"),
    FormField("spec.dataset.format", "Dataset format", "select",
              ("auto", "text", "messages", "prompt-completion", "alpaca")),
    FormField("spec.method.type", "Method", "select", ("sft", "dpo", "kto")),
    FormField("spec.training.epochs", "Epochs", "number", hint="or max steps"),
    FormField("spec.training.maxSteps", "Max steps", "number"),
    FormField("spec.training.learningRate", "Learning rate", "number"),
    FormField("spec.training.batchSize", "Batch size", "number"),
    FormField("spec.training.maxLength", "Max length (tokens)", "number"),
    FormField("spec.lora.r", "LoRA rank", "number"),
    FormField("spec.lora.alpha", "LoRA alpha", "number"),
    FormField("spec.quantization.type", "Quantization", "select", ("nf4", "fp4")),
    FormField("spec.resources.gpus", "GPUs per pod", "number"),
    FormField("spec.output.uri", "Adapter output", required=True,
              hint="pvc://claim/path, s3:// or gs://"),
    FormField("spec.evaluation.prompts", "Evaluation prompts", "lines",
              hint="one per line: answered by the base model and with the adapter"),
)  # fmt: skip


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            found = _model_of(arg)
            if found is not None:
                return found
    return None


def default_of(path: str, template: Mapping[str, Any] | None = None) -> str:
    """What a ``spec.`` field is when the form leaves it empty (the input's placeholder): the
    platform's job template's value, else the API models' default."""
    parts = path.split(".")
    if parts[0] != "spec":
        return ""
    node: Any = template or {}
    for part in parts[1:]:
        node = node.get(part) if isinstance(node, Mapping) else None
    if node is not None and not isinstance(node, Mapping | list):
        return str(node)
    model: type[BaseModel] | None = FineTuneJobSpec
    value: Any = None
    for part in parts[1:]:
        if model is None:
            return ""
        by_alias = {info.alias or name: info for name, info in model.model_fields.items()}
        info = by_alias.get(part)
        if info is None:
            return ""
        value = None if info.is_required() else info.get_default(call_default_factory=True)
        model = _model_of(info.annotation)
    return "" if value is None or isinstance(value, BaseModel) else str(value)


def _typed(text: str, kind: str) -> Any:
    if kind == "lines":
        return [line.strip() for line in text.splitlines() if line.strip()]
    if kind != "number":
        return text
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            continue
    return text  # the models say what is wrong with it, naming the field


def manifest_of(
    values: Mapping[str, str], namespace: str, template: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The FineTuneJob a submission describes: the platform's job template (the spec every job
    made through the server starts from, as the API's), the filled fields over it; the API
    server defaults the rest, as for ``kubectl apply``."""
    manifest: dict[str, Any] = {
        "apiVersion": API_VERSION, "kind": KIND, "metadata": {},
        "spec": copy.deepcopy(dict(template or {})),
    }  # fmt: skip
    for field in FIELDS:
        text = (values.get(field.path) or "").strip()
        if not text:
            continue
        node = manifest
        *parents, leaf = field.path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _typed(text, field.kind)
    manifest["metadata"]["namespace"] = namespace
    return manifest


def problems_of(manifest: dict[str, Any]) -> list[str]:
    """What ``kubetune validate`` says of the manifest (each ``field.path: what is wrong``), and
    whether its name is one the API server takes."""
    found = []
    name = str(manifest["metadata"].get("name") or "")
    if not name:
        found.append("metadata.name: required field is missing")
    elif not NAME.match(name):
        found.append(
            "metadata.name: must be a DNS label: at most 63 lower-case letters, digits and '-', "
            "starting and ending with a letter or digit"
        )
    try:
        load_finetunejob(manifest)
    except SpecError as exc:
        found.extend(exc.problems)
    return found


def manifest_yaml(manifest: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(manifest), sort_keys=False, allow_unicode=True)


def _field_problems(path: str, problems: list[str]) -> list[str]:
    return [p for p in problems if p == path or p.startswith((f"{path}:", f"{path}."))]


def _field_row(
    field: FormField, value: str, problems: list[str], template: Mapping[str, Any] | None
) -> Html:
    """One field of the form: its label, control (filled with what was sent), hint with the
    template's default, and its problems."""
    ident = "f-" + field.path.replace(".", "-")
    mine = _field_problems(field.path, problems)
    error = (
        tag('<p class="field-error" id="{ident}-error">{text}</p>', ident=ident,
            text="; ".join(mine))
        if mine
        else Html("")
    )  # fmt: skip
    described = f"{ident}-hint" + (f" {ident}-error" if mine else "")
    attrs = tag(
        'id="{ident}" name="{name}" aria-describedby="{described}"{invalid}{required}',
        ident=ident,
        name=field.path,
        described=described,
        invalid=Html(' aria-invalid="true"') if mine else Html(""),
        required=Html(" required") if field.required else Html(""),
    )
    default = default_of(field.path, template)
    if field.kind == "select":
        chosen = value or default
        options = join(
            tag('<option value="{v}"{sel}>{v}</option>', v=choice,
                sel=Html(" selected") if choice == chosen else Html(""))
            for choice in field.choices
        )  # fmt: skip
        control = tag("<select {attrs}>{options}</select>", attrs=attrs, options=options)
    elif field.kind == "lines":
        control = tag('<textarea {attrs} rows="3">{value}</textarea>', attrs=attrs, value=value)
    else:
        control = tag(
            '<input type="text" {attrs} value="{value}" placeholder="{placeholder}"'
            '{mode} autocomplete="off">',
            attrs=attrs,
            value=value,
            placeholder=default,
            mode=Html(' inputmode="decimal"') if field.kind == "number" else Html(""),
        )
    hint = " · ".join(x for x in (field.hint, f"default {default}" if default else "") if x)
    return tag(
        '<div class="field"><label for="{ident}">{label}</label>{control}'
        '<p class="hint" id="{ident}-hint">{hint}</p>{error}</div>',
        ident=ident,
        label=field.label + (" *" if field.required else ""),
        control=control,
        hint=hint,
        error=error,
    )


def render_form(
    values: Mapping[str, str],
    namespaces: list[str],
    namespace: str,
    problems: list[str],
    *,
    csrf: str,
    template: Mapping[str, Any] | None = None,
) -> Html:
    """The form, filled with what was sent; each field's problems under it."""
    rows = [_field_row(field, values.get(field.path, ""), problems, template) for field in FIELDS]
    ns_options = join(
        tag('<option value="{n}"{sel}>{n}</option>', n=n,
            sel=Html(" selected") if n == namespace else Html(""))
        for n in namespaces
    )  # fmt: skip
    summary = Html("")
    if problems:
        summary = tag(
            '<div class="problems" id="problems" role="alert" tabindex="-1"><h2>The spec is '
            "invalid</h2><ul>{items}</ul></div>",
            items=join(tag("<li>{p}</li>", p=p) for p in problems),
        )
    return tag(
        '{summary}<form method="post" action="/ui/new" class="new-job" novalidate '
        'enctype="multipart/form-data">'
        '<input type="hidden" name="csrf" value="{csrf}">'
        '<div class="field"><label for="f-namespace">Namespace *</label>'
        '<select id="f-namespace" name="metadata.namespace">{ns}</select></div>'
        "{rows}"
        '<div class="field"><label for="f-datasetFile">Or upload the dataset</label>'
        '<input type="file" id="f-datasetFile" name="datasetFile" accept=".jsonl,application/jsonl"'
        ' aria-describedby="f-datasetFile-hint"><p class="hint" id="f-datasetFile-hint">JSON Lines'
        "; checked as the Validating phase checks a dataset, then the job reads it from this "
        "server (its dataset URI is filled in)</p>{file_error}</div>"
        '<div class="actions"><button type="submit" name="action" value="preview">Check and show '
        'YAML</button> <button type="submit" name="action" value="create">Create job</button>'
        "</div></form>",
        summary=summary,
        csrf=csrf,
        ns=ns_options,
        rows=join(rows),
        file_error=(
            tag('<p class="field-error">{text}</p>', text="; ".join(file_problems))
            if (file_problems := _field_problems("datasetFile", problems))
            else Html("")
        ),
    )


__all__ = ["FIELDS", "default_of", "manifest_of", "manifest_yaml", "problems_of", "render_form"]
