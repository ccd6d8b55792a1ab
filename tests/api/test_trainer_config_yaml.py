"""The trainer config's YAML: the operator's fast path (libyaml's emitter, a leaner representer)
writes byte for byte what PyYAML's pure-Python ``safe_dump`` writes, and reads back the same."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import yaml
from api_cases import MINIMAL

from kubetune.api.config import NO_FOLDING, TrainerConfig, block_yaml, load_trainer_config
from kubetune.api.manifest import load_finetunejob

pytestmark = pytest.mark.unit

EXAMPLES = sorted(
    p
    for p in (Path(__file__).parents[2] / "examples").glob("*.yaml")
    if "kind: FineTuneJob" in p.read_text()
)
LONG = "a long value " * 20
MULTI_LINE = "first line\nsecond line: with a colon\n\n  indented, after a blank line\n"

#: A job whose free-text fields carry what trips emitters: non-ASCII text, long and multi-line
#: strings, strings that read as other types, special characters.
AWKWARD: dict[str, Any] = {
    **MINIMAL,
    "spec": {
        **MINIMAL["spec"],
        "model": {"uri": "org/modèle-ünïcode", "revision": "0123abc"},
        "evaluation": {
            "prompts": [
                "translate: 日本語のテキスト =>",
                "emoji 🙂 and a tab\there",
                LONG,
                MULTI_LINE,
                "yes",
                "1e3",
                "0o17",
                "null",
                "~",
                "- a dash",
                "key: value",
                "#not a comment",
                "'single' and \"double\" quotes",
                " leading and trailing spaces ",
                "a\u0085next line and a \u2028 separator",
            ],
            "maxNewTokens": 8,
        },
        "training": {"maxSteps": 10, "learningRate": 1e-05, "warmupRatio": 0.0},
        "podTemplate": {
            "metadata": {
                "annotations": {
                    "example.com/long": LONG,
                    "example.com/multi-line": MULTI_LINE,
                    "example.com/unicode": "café — naïve ☃",
                    "example.com/number": "12345",
                    "example.com/empty": "",
                    "a" * 60 + "." + "b" * 60 + ".example.com/" + "k" * 60: "a key over 128",
                },
                "labels": {"team": "ml-platform"},
            },
        },
    },
}

#: Plain data beyond what the models let through: special floats and big ints, empty
#: collections, nesting.
SCALARS: dict[str, Any] = {
    "floats": [0.0, -0.0, 1.5, 1e17, 1e-05, 2.5e-300, float("inf"), float("-inf"), float("nan")],
    "ints": [0, -1, 2**63, -(2**70)],
    "bools": [True, False],
    "none": None,
    "empty": {"list": [], "map": {}, "string": ""},
    "nested": [{"a": [1, {"b": ["c", {"d": None}]}]}, [], [[]]],
    "unicode keys ü": {"ключ": "значение"},
    "long": LONG * 3,
    "multi": MULTI_LINE,
}


def config_of(manifest: Any) -> TrainerConfig:
    spec = load_finetunejob(manifest).spec
    return TrainerConfig.model_validate(
        {
            "spec": spec.model_dump(by_alias=True),
            "job": {"name": "j", "namespace": "n", "uid": "3f9a-uid"},
            "progress": {"reporter": "operator", "url": "https://kubetune.example/progress"},
        }
    )


def python_yaml(config: TrainerConfig) -> str:
    """PyYAML's pure-Python representer and emitter, as the trainer config was written before."""
    data = config.model_dump(by_alias=True, exclude_none=True, mode="json")
    return yaml.dump(data, Dumper=yaml.SafeDumper, sort_keys=False, width=NO_FOLDING)


@pytest.mark.parametrize(
    "manifest", [*EXAMPLES, AWKWARD], ids=lambda m: getattr(m, "name", "awkward")
)
def test_the_trainer_config_is_the_text_pyyaml_writes(manifest: Any, tmp_path: Path) -> None:
    config = config_of(manifest)
    text = config.to_yaml()
    assert text == python_yaml(config)
    path = tmp_path / "config.yaml"
    path.write_text(text)
    assert load_trainer_config(path) == config


def test_the_awkward_values_are_in_the_config() -> None:
    text = config_of(AWKWARD).to_yaml()
    assert yaml.safe_load(text)["spec"]["evaluation"]["prompts"][3] == MULTI_LINE
    assert "\\u65E5" in text  # non-ASCII escaped, as safe_dump does by default


@pytest.mark.parametrize(
    "dumper",
    [d for d in (yaml.SafeDumper, getattr(yaml, "CSafeDumper", None)) if d is not None],
    ids=lambda d: d.__name__,
)
def test_plain_data_is_written_as_pyyaml_writes_it(dumper: type[yaml.SafeDumper]) -> None:
    from kubetune.api import config as config_module

    def dump(dumper: type[yaml.SafeDumper]) -> str:
        return yaml.dump(SCALARS, Dumper=dumper, sort_keys=False, width=NO_FOLDING)

    expected = dump(yaml.SafeDumper)
    fast = dump(config_module._PlainDumper)
    assert fast == expected
    assert dump(dumper) == expected
    again = yaml.safe_load(fast)
    assert again["floats"][-1] != again["floats"][-1]  # nan
    assert {**again, "floats": None} == {**SCALARS, "floats": None}
    assert again["floats"][:-1] == SCALARS["floats"][:-1]


def test_data_the_fast_path_does_not_know_goes_through_pyyaml() -> None:
    from kubetune.api import config as config_module

    data = {"tuple": (1, 2), "set": {3}}
    expected = yaml.dump(data, Dumper=yaml.SafeDumper, sort_keys=False, width=NO_FOLDING)
    fast = yaml.dump(data, Dumper=config_module._PlainDumper, sort_keys=False, width=NO_FOLDING)
    assert fast == expected


def python_dump(data: Any) -> str:
    return yaml.dump(data, Dumper=yaml.SafeDumper, sort_keys=False, width=NO_FOLDING)


def test_plain_data_is_written_directly_as_pyyaml_writes_it() -> None:
    assert block_yaml(SCALARS) == python_dump(SCALARS)
    assert block_yaml({}) == python_dump({})


#: Strings that look plain but read back as something else, or need quotes in one place only.
#: No key of 123 to 128 characters and no empty key: there libyaml's emitter (the operator's
#: before this fast path, and still for what the fast path hands over) writes a simple key where
#: PyYAML's writes ``? key``; both read back the same.
TRAPS = (
    "yes", "No", "on", "OFF", "y", "n", "null", "Null", "~", "true", "1", "-1", "+1", "1e3",
    "1.", ".5", "0x1F", "0o17", "0b101", "1_000", "1:20", "190:20:30", "2001-12-14",
    "2001-12-14t21:59:43.10-05:00", "=", "<<", ".inf", ".NaN", "a:", "a::", "x:y", "s3://b/k",
    "-a", "a-", "_", "@a", "%a", "a%", "a@b", "a=b", "a+b", "a/b", "a.b", "-", "--", "---",
    "...", ":a", "a,b", "a#b", "a #b", "#a", "a b", "", " ", "a" * 130, "k" * 129, "k" * 122, "k" * 99, "k" * 100,
)  # fmt: skip


def random_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth < 4 and roll < 0.25:
        return {random_key(rng): random_value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if depth < 4 and roll < 0.4:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return rng.choice(
        [rng.choice(TRAPS), rng.randint(-(2**70), 2**70), rng.uniform(-1e6, 1e6),
         rng.choice([0.0, 1e-05, 5e-4, 1e17, 2.0]), rng.choice([True, False, None]),
         "".join(rng.choice("abz09_./:-=@+%") for _ in range(rng.randint(1, 12)))]
    )  # fmt: skip


def random_key(rng: random.Random) -> str:
    return rng.choice([*[t for t in TRAPS if t], "model", "uri", "targetModules", "caBundle"])


def test_random_plain_data_is_written_byte_for_byte_as_pyyaml_writes_it() -> None:
    rng = random.Random(25)
    for _ in range(3000):
        data = {random_key(rng): random_value(rng, 0) for _ in range(rng.randint(0, 5))}
        assert block_yaml(data) == python_dump(data), data
