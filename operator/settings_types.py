"""Field types of the operator's settings from the environment (comma-separated lists, and an
empty value read as unset), and the base of its groups of settings."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict
from pydantic_settings import NoDecode


def split_csv(value: object) -> object:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


def _empty_is_none(value: object) -> object:
    return None if isinstance(value, str) and not value.strip() else value


CsvList = Annotated[list[str], NoDecode, BeforeValidator(split_csv)]
OptionalInt = Annotated[int | None, BeforeValidator(_empty_is_none)]
OptionalStr = Annotated[str | None, BeforeValidator(_empty_is_none)]
IntCsvList = Annotated[list[int], NoDecode, BeforeValidator(split_csv)]


class SettingsGroup(BaseModel):
    """One concern's settings, mixed into ``OperatorSettings``: each field's description is the
    docstring under it."""

    model_config = ConfigDict(use_attribute_docstrings=True)
