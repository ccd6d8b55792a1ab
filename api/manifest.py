"""Reading FineTuneJob manifests with errors a person can act on."""

from __future__ import annotations

import types
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from kubetune.api.documents import DocumentTooLarge, check_limits, load_yaml_documents
from kubetune.api.errors import SpecError
from kubetune.api.models import API_VERSION, KIND, FineTuneJob


def _field_names(model: type[BaseModel]) -> list[str]:
    return [info.alias or name for name, info in model.model_fields.items()]


def _submodel(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation such as ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, typing.Annotated):
        for arg in typing.get_args(annotation):
            found = _submodel(arg)
            if found is not None:
                return found
    return None


def _model_at(root: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        by_alias = {info.alias or name: info for name, info in model.model_fields.items()}
        info = by_alias.get(part) or model.model_fields.get(part)
        if info is None:
            return None
        model = _submodel(info.annotation)
    return model


def format_validation_error(
    exc: ValidationError, root: type[BaseModel], prefix: str = ""
) -> list[str]:
    """One ``field.path: what is wrong (what is allowed)`` line per problem; ``prefix`` (e.g.
    ``spec``) is where ``root`` sits in the manifest, so paths read as in `kubectl explain`."""
    lines: list[str] = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        parts = (prefix, *loc) if prefix else loc
        path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in parts)
        path = path.replace(".[", "[")
        kind = error["type"]
        message = str(error["msg"])
        if kind == "extra_forbidden":
            parent = _model_at(root, loc[:-1])
            allowed = ", ".join(_field_names(parent)) if parent else "see kubectl explain"
            message = f"unknown field (allowed here: {allowed})"
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "value_error":
            message = message.removeprefix("Value error, ")
        elif kind == "union_tag_invalid" or kind.startswith("literal"):
            message = message.replace("Input should be", "must be")
        lines.append(f"{path}: {message}" if path else message)
    return lines


def load_finetunejob(source: str | Path | dict[str, Any]) -> FineTuneJob:
    """Parse and default a FineTuneJob from a YAML file or a mapping; SpecError if invalid."""
    if isinstance(source, dict):
        data: Any = source
        try:
            check_limits(data, "the manifest")
        except DocumentTooLarge as exc:
            raise SpecError([str(exc)]) from exc
    else:
        path = Path(source)
        try:
            documents = load_yaml_documents(path.read_text(), str(path))
        except OSError as exc:
            raise SpecError([f"cannot read {path}: {exc.strerror}"]) from exc
        except yaml.YAMLError as exc:
            raise SpecError([f"{path} is not valid YAML: {exc}"]) from exc
        except DocumentTooLarge as exc:
            raise SpecError([str(exc)]) from exc
        jobs = [d for d in documents if isinstance(d, dict) and d.get("kind") == KIND]
        if len(documents) == 1:
            jobs = documents  # one document: say what is wrong with it, its kind included
        if len(jobs) != 1:
            raise SpecError(
                [f"{path}: expected exactly one FineTuneJob document, found {len(jobs)}"]
            )
        data = jobs[0]
    if not isinstance(data, dict):
        raise SpecError(["a FineTuneJob manifest must be a mapping"])
    problems = []
    if data.get("apiVersion") != API_VERSION:
        problems.append(f"apiVersion: must be {API_VERSION}, not {data.get('apiVersion')!r}")
    if data.get("kind") != KIND:
        problems.append(f"kind: must be {KIND}, not {data.get('kind')!r}")
    if "spec" not in data:
        problems.append("spec: required field is missing")
    if problems:
        raise SpecError(problems)
    try:
        return FineTuneJob.model_validate(data)
    except ValidationError as exc:
        raise SpecError(format_validation_error(exc, FineTuneJob)) from exc
