"""The resolved trainer config: what the operator writes to a ConfigMap and the trainer reads."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Final, Literal

import yaml
from pydantic import Field, ValidationError

from kubetune.api.documents import DocumentTooLarge, load_yaml_documents
from kubetune.api.errors import ConfigError
from kubetune.api.manifest import format_validation_error
from kubetune.api.models import API_VERSION, ApiModel, FineTuneJobSpec

CONFIG_KIND: Final = "TrainerConfig"


class JobRef(ApiModel):
    """The FineTuneJob a trainer run belongs to (its progress goes to this object's status)."""

    name: str
    namespace: str
    uid: str | None = None


class ProgressSettings(ApiModel):
    interval_seconds: float = Field(default=10.0, gt=0)
    #: ``operator``: POST to ``url`` with the pod's projected progress token.
    reporter: Literal["none", "file", "operator"] = "none"
    file: str | None = None
    #: The operator's progress endpoint (https://...).
    url: str | None = None
    #: PEM certificates the trainer trusts for ``url`` (the operator's CA); empty: the system's.
    ca_bundle: str | None = None
    #: The projected token file (re-read for every report: the kubelet renews it).
    token_file: str | None = None


#: The widest line libyaml takes (a C int): no string is folded over lines.
NO_FOLDING: Final = 2**31 - 1
#: libyaml's emitter where PyYAML has it (its wheels do), else PyYAML's own: the same text.
_SAFE_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
_STR, _INT, _FLOAT, _BOOL, _NULL, _MAP, _SEQ = (
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "map", "seq")
)
#: What the resolver said of a scalar's text before (its answer depends on the text alone).
_RESOLVED: dict[tuple[str, tuple[bool, bool]], str] = {}
_RESOLVED_MAX: Final = 4096


def _node(data: object) -> yaml.Node:
    """The node PyYAML's SafeRepresenter makes of plain JSON-shaped data under ``yaml.dump``'s
    defaults (block style, no aliases: nothing in a model dump is shared), without its per-value
    dispatch and alias bookkeeping; anything else is handed back to it (``_NotPlain``)."""
    kind = type(data)
    if kind is str:
        return yaml.ScalarNode(_STR, data)
    if kind is dict:
        pairs = [(_node(k), _node(v)) for k, v in data.items()]  # type: ignore[attr-defined]
        return yaml.MappingNode(_MAP, pairs, flow_style=False)
    if kind is list:
        return yaml.SequenceNode(_SEQ, [_node(v) for v in data], flow_style=False)  # type: ignore[attr-defined]
    if kind is bool:
        return yaml.ScalarNode(_BOOL, "true" if data else "false")
    if kind is int:
        return yaml.ScalarNode(_INT, str(data))
    if kind is float:
        return yaml.ScalarNode(_FLOAT, _float_text(data))  # type: ignore[arg-type]
    if data is None:
        return yaml.ScalarNode(_NULL, "null")
    raise _NotPlain


def _float_text(value: float) -> str:
    """SafeRepresenter.represent_float's text."""
    if math.isnan(value):
        return ".nan"
    if math.isinf(value):
        return ".inf" if value > 0 else "-.inf"
    text = repr(value).lower()
    return text.replace("e", ".0e", 1) if "." not in text and "e" in text else text


class _NotPlain(Exception):
    """A value the fast path does not represent: the representer's own path takes the data."""


class _PlainDumper(_SAFE_DUMPER):  # type: ignore[valid-type,misc]
    """``_SAFE_DUMPER`` with the same output from less Python per value: plain data becomes
    nodes in one pass (``_node``), and the resolver's answer for a scalar's text (asked twice
    per scalar by the emitter) is remembered."""

    def represent(self, data: object) -> None:
        try:
            node = _node(data)
        except _NotPlain:
            super().represent(data)
            return
        self.serialize(node)

    def resolve(self, kind: type, value: object, implicit: tuple[bool, bool]) -> str:
        if kind is not yaml.ScalarNode or type(value) is not str:
            return str(super().resolve(kind, value, implicit))
        key = (value, implicit)
        tag = _RESOLVED.get(key)
        if tag is None:
            tag = str(super().resolve(kind, value, implicit))
            if len(_RESOLVED) >= _RESOLVED_MAX:
                _RESOLVED.clear()
            _RESOLVED[key] = tag
        return tag


class TrainerConfig(ApiModel):
    api_version: Literal["kubetune.io/v1alpha1"] = API_VERSION
    kind: Literal["TrainerConfig"] = CONFIG_KIND
    job: JobRef | None = None
    spec: FineTuneJobSpec
    progress: ProgressSettings = Field(default_factory=ProgressSettings)
    token_file: str | None = None

    def to_yaml(self) -> str:
        data = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        # The same text as yaml.safe_dump(data, sort_keys=False, width=NO_FOLDING), from
        # libyaml's emitter and a representer that does less per value: the operator writes one
        # config per job, and PyYAML's own emitter, then its representer, were the largest items
        # of its CPU there. No line is folded: libyaml and PyYAML fold long quoted strings
        # differently (the same value, other text); unfolded, the two write the same bytes.
        return yaml.dump(data, Dumper=_PlainDumper, sort_keys=False, width=NO_FOLDING)


def load_trainer_config(path: str | Path) -> TrainerConfig:
    """Read a TrainerConfig file; any problem is a ConfigError with a message naming the field."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read trainer config {path}: {exc.strerror}") from exc
    try:
        documents = load_yaml_documents(text, f"trainer config {path}")
    except yaml.YAMLError as exc:
        raise ConfigError(f"trainer config {path} is not valid YAML: {exc}") from exc
    except DocumentTooLarge as exc:
        raise ConfigError(str(exc)) from exc
    if len(documents) != 1:
        raise ConfigError(f"trainer config {path} must hold one document, not {len(documents)}")
    data = documents[0]
    if not isinstance(data, dict):
        raise ConfigError(f"trainer config {path} must be a mapping, not {type(data).__name__}")
    try:
        return TrainerConfig.model_validate(data)
    except ValidationError as exc:
        lines = format_validation_error(exc, TrainerConfig)
        raise ConfigError("invalid trainer config:\n" + "\n".join(lines)) from exc
