"""The resolved trainer config: what the operator writes to a ConfigMap and the trainer reads."""

from __future__ import annotations

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


_SAFE_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class TrainerConfig(ApiModel):
    api_version: Literal["kubetune.io/v1alpha1"] = API_VERSION
    kind: Literal["TrainerConfig"] = CONFIG_KIND
    job: JobRef | None = None
    spec: FineTuneJobSpec
    progress: ProgressSettings = Field(default_factory=ProgressSettings)
    token_file: str | None = None

    def to_yaml(self) -> str:
        data = self.model_dump(by_alias=True, exclude_none=True, mode="json")
        # libyaml's emitter where PyYAML has it (its wheels do): the same text, in a tenth of
        # the time (the operator writes one config per job; the pure-Python emitter was the
        # largest item of its CPU per job).
        return yaml.dump(data, Dumper=_SAFE_DUMPER, sort_keys=False)


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
