"""A value checked against a bounded schema of :mod:`~kubetune.api.bounded` (the models' half of
its bounds: the CRD carries the same schema to the apiserver), and how large the JSON of a value a
schema admits can be (``max_characters``, ``largest``: tests pin them)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

from kubetune.api.bounded import MAX_KEY, Schema


def problems(
    value: Any, schema: Mapping[str, Any], path: str, *, unknown_fields: bool = False
) -> list[str]:
    """Where ``value`` breaks ``schema``'s types and bounds, as the apiserver would say it.
    ``unknown_fields``: let fields the schema doesn't know pass (the operator's policy refuses
    the pod fields it may not merge, by name)."""
    found: list[str] = []
    _check(value, schema, path, found, unknown_fields)
    return [problem.removeprefix(": ") for problem in found]


def _check(
    value: Any, schema: Mapping[str, Any], path: str, found: list[str], unknown: bool
) -> None:
    if len(found) >= 8:
        return
    if schema.get("x-kubernetes-int-or-string"):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            found.append(f"{path}: must be an integer or a string")
        elif isinstance(value, str) and len(value) > schema["maxLength"]:
            found.append(f"{path}: may not be longer than {schema['maxLength']}")
        return
    kind = schema.get("type")
    if kind == "string":
        if not isinstance(value, str):
            found.append(f"{path}: must be a string")
        elif len(value) > schema["maxLength"]:
            found.append(f"{path}: may not be longer than {schema['maxLength']}")
        elif "enum" in schema and value not in schema["enum"]:
            found.append(f"{path}: must be one of {', '.join(schema['enum'])}")
    elif kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            found.append(f"{path}: must be an integer")
        elif not schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf):
            found.append(f"{path}: must be between {schema['minimum']} and {schema['maximum']}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            found.append(f"{path}: must be a boolean")
    elif kind == "array":
        if not isinstance(value, list):
            found.append(f"{path}: must be a list")
        elif len(value) > schema["maxItems"]:
            found.append(f"{path}: must have at most {schema['maxItems']} items")
        else:
            for index, item in enumerate(value):
                _check(item, schema["items"], f"{path}[{index}]", found, unknown)
    elif kind == "object":
        _check_object(value, schema, path, found, unknown)


def _check_object(
    value: Any, schema: Mapping[str, Any], path: str, found: list[str], unknown: bool
) -> None:
    if not isinstance(value, dict):
        found.append(f"{path}: must be an object")
        return
    if len(value) > schema.get("maxProperties", math.inf):
        found.append(f"{path}: must have at most {schema['maxProperties']} properties")
        return
    missing = [key for key in schema.get("required", ()) if key not in value]
    if missing:
        found.append(f"{path}: {', '.join(missing)} required")
    if "additionalProperties" in schema:
        limit = schema[MAX_KEY]
        for key, item in value.items():
            if len(str(key)) > limit:
                found.append(f"{path}: keys may not be longer than {limit}")
            _check(item, schema["additionalProperties"], f"{path}[{key!r:.40}]", found, unknown)
        return
    properties = schema.get("properties", {})
    for key, item in value.items():
        if key in properties:
            _check(item, properties[key], _join(path, key), found, unknown)
        elif not unknown:
            # The apiserver refuses (strict clients) or drops a field its schema doesn't know.
            found.append(f"{_join(path, key)}: unknown field")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def conforms(
    schema: Schema, *, unknown_fields: bool = False
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """A pydantic after-validator: the value keeps to ``schema``'s types and bounds (messages
    name the part of the field that doesn't)."""

    def check(value: dict[str, Any]) -> dict[str, Any]:
        found = problems(value, schema, "", unknown_fields=unknown_fields)
        if found:
            raise ValueError("; ".join(found))
        return value

    return check


def max_characters(schema: Mapping[str, Any]) -> int:
    """An upper bound of the characters in the JSON of any value ``schema`` admits (keys and
    punctuation counted, a number as 20)."""
    if schema.get("x-kubernetes-int-or-string"):
        return int(schema["maxLength"]) + 2
    kind = schema.get("type")
    if kind == "string":
        if "maxLength" not in schema and "enum" in schema:
            return 2 + max(len(value) for value in schema["enum"])
        return 2 + int(schema["maxLength"])
    if kind in ("integer", "number", "boolean"):
        return 20
    if kind == "array":
        return 2 + int(schema["maxItems"]) * (max_characters(schema["items"]) + 1)
    if kind == "object":
        if "additionalProperties" in schema:
            key = 2 + _key_length(schema)
            value = max_characters(schema["additionalProperties"])
            return 2 + int(schema["maxProperties"]) * (key + value + 2)
        sizes = sorted(
            (len(name) + 4 + max_characters(child) for name, child in schema["properties"].items()),
            reverse=True,
        )
        return 2 + sum(sizes[: schema.get("maxProperties", len(sizes))])
    raise ValueError(f"unbounded schema: {schema}")


def _key_length(schema: Mapping[str, Any]) -> int:
    """A map's key bound: its CEL rule's (the CRD keeps no other trace of it)."""
    for rule in schema.get("x-kubernetes-validations", ()):
        found = re.search(r"size\(k\) <= (\d+)", rule["rule"])
        if found:
            return int(found.group(1))
    raise ValueError(f"a map without a bound on its keys: {schema}")


def largest(schema: Mapping[str, Any]) -> Any:
    """The largest value ``schema`` admits: every field set, every list and map full, every
    string as long as allowed (what the tests give the apiserver and the operator)."""
    if schema.get("x-kubernetes-int-or-string"):
        return "9" * int(schema["maxLength"])
    kind = schema.get("type")
    if kind == "string":
        return schema["enum"][0] if "enum" in schema else "a" * int(schema["maxLength"])
    if kind == "integer":
        return int(schema.get("maximum", 2**31 - 1))
    if kind == "boolean":
        return False
    if kind == "array":
        return [largest(schema["items"]) for _ in range(int(schema["maxItems"]))]
    if "additionalProperties" in schema:
        length = _key_length(schema)
        return {
            f"{index:0{length}d}": largest(schema["additionalProperties"])
            for index in range(int(schema["maxProperties"]))
        }
    properties = schema["properties"]
    names = sorted(properties, key=lambda name: max_characters(properties[name]), reverse=True)
    required = list(schema.get("required", ()))
    kept = required + [n for n in names if n not in required]
    return {name: largest(properties[name]) for name in kept[: schema.get("maxProperties")]}
