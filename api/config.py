"""The resolved trainer config: what the operator writes to a ConfigMap and the trainer reads."""

from __future__ import annotations

import json
import math
import re
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
_RESOLVER: Final = yaml.resolver.Resolver()


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


#: A string written as it is (a plain scalar) wherever it stands: letters, digits and
#: ``_./:=@+%-``, not starting with an indicator, not ending in ``:``; the resolver must read it
#: back as a string (``_plain``). A key is a simple key only while short (the emitter counts its
#: tag too: 122 characters at most); from 100, the emitter writes it.
_PLAIN_TEXT: Final = re.compile(r"[A-Za-z0-9_/][A-Za-z0-9_./:=@+%-]*")
_SIMPLE_KEY_MAX: Final = 100
#: Sections written by the emitter before (``_section``), by their JSON text: the operator's
#: own (``progress``, with its CA bundle) are the same for every job.
_SECTIONS: dict[str, str] = {}
_SECTIONS_MAX: Final = 64
#: ``_plain``'s answer per text (keys and most values are the same in every job's config).
_PLAIN: dict[str, bool] = {}


def _section(key: str, value: object) -> str:
    """The YAML of one top-level ``key: value`` of a block mapping, as ``yaml.dump`` writes it
    within the whole (a block mapping's entries are written one after another, each on its own
    at the same indentation): written directly where every scalar in it is plain JSON data that
    needs no quoting (``_block``), else by libyaml's emitter, remembered for the next job."""
    lines: list[str] = []
    try:
        _block({key: value}, 0, lines)
    except _NotPlain:
        pass
    else:
        return "".join(lines)
    memo = json.dumps([key, value], separators=(",", ":"))
    text = _SECTIONS.get(memo)
    if text is None:
        text = yaml.dump({key: value}, Dumper=_PlainDumper, sort_keys=False, width=NO_FOLDING)
        if len(_SECTIONS) >= _SECTIONS_MAX:
            _SECTIONS.clear()
        _SECTIONS[memo] = text
    return text


def _block(mapping: dict[str, object], indent: int, out: list[str], first: str = "") -> None:
    """PyYAML's block style for a non-empty ``mapping`` at ``indent``; ``first``: what the first
    line starts with instead of the indentation (a sequence item's ``- ``)."""
    pad = " " * indent
    lead = first or pad
    for key, value in mapping.items():
        if type(key) is not str or len(key) >= _SIMPLE_KEY_MAX:
            raise _NotPlain
        head = f"{lead}{_scalar(key)}:"
        lead = pad
        if type(value) is dict and value:
            out.append(head + "\n")
            _block(value, indent + 2, out)  # type: ignore[arg-type]
        elif type(value) is list and value:
            out.append(head + "\n")
            _items(value, indent, out)  # type: ignore[arg-type]
        else:
            out.append(f"{head} {_scalar(value)}\n")


def _items(items: list[object], indent: int, out: list[str]) -> None:
    """A non-empty block sequence; in a mapping, its ``- `` at the mapping's own indentation."""
    pad = " " * indent
    for item in items:
        if type(item) is dict and item:
            _block(item, indent + 2, out, first=pad + "- ")  # type: ignore[arg-type]
        elif type(item) is list and item:
            raise _NotPlain  # a sequence in a sequence: the emitter's
        else:
            out.append(f"{pad}- {_scalar(item)}\n")


def _scalar(value: object) -> str:
    """A scalar (or an empty collection, written in flow style) as the emitter writes it, when
    it needs no quoting."""
    kind = type(value)
    if kind is str:
        plain = _PLAIN.get(value)  # type: ignore[call-overload]
        if plain is None:
            plain = _plain(value)  # type: ignore[arg-type]
        if plain:
            return value  # type: ignore[return-value]
        raise _NotPlain
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        return _float_text(value)  # type: ignore[arg-type]
    if value is None:
        return "null"
    if kind is dict and not value:
        return "{}"
    if kind is list and not value:
        return "[]"
    raise _NotPlain


def _plain(text: str) -> bool:
    """Whether ``text`` is written as it is (``_PLAIN_TEXT``) and the resolver reads it back
    as a string (not a number, a bool, null, a timestamp, ...); remembered per text."""
    plain = (
        _PLAIN_TEXT.fullmatch(text) is not None
        and text[-1] != ":"
        and _RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) == _STR  # type: ignore[no-untyped-call]
    )
    if len(_PLAIN) >= _RESOLVED_MAX:
        _PLAIN.clear()
    _PLAIN[text] = plain
    return plain


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
        # The same text as yaml.safe_dump(data, sort_keys=False, width=NO_FOLDING): each
        # top-level key's block on its own (``_section``). The operator writes one config per
        # job, and the emitter was the largest item of its CPU there. No line is folded: libyaml
        # and PyYAML fold long quoted strings differently (the same value, other text);
        # unfolded, the two write the same bytes.
        return block_yaml(data)


def block_yaml(data: dict[str, object]) -> str:
    """``yaml.safe_dump(data, sort_keys=False, width=NO_FOLDING)`` of a mapping, byte for byte."""
    if not data:
        return "{}\n"
    return "".join(_section(key, value) for key, value in data.items())


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
