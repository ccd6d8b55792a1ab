"""Where a URI points on the trainer's node: hub ids, local paths, and claims it may not leave."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.api.config import TrainerConfig
from kubetune.api.models import DatasetSpec, FineTuneJobSpec
from kubetune.api.uris import DATASET_SCHEMES, MODEL_SCHEMES, OUTPUT_SCHEMES
from kubetune.trainer.errors import InvalidConfig
from kubetune.trainer.locations import resolve

pytestmark = pytest.mark.unit


@pytest.fixture
def claims(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A pvc root with a claim ``data`` and, beside it, a folder outside every claim."""
    root = tmp_path / "pvc"
    (root / "data" / "sets").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(root))
    return root


@pytest.mark.parametrize("uri", ["meta-llama/Llama-2-7b-hf", "Qwen/Qwen2.5-7B", "gpt2"])
def test_a_bare_org_name_is_a_hub_id(uri: str, tmp_path: Path) -> None:
    where = resolve(uri, MODEL_SCHEMES, "model")
    assert (where.kind, where.remote) == ("hub", uri)
    assert resolve(f"hf://{uri}", MODEL_SCHEMES, "model").remote == uri


@pytest.mark.parametrize("uri", ["data/train.jsonl", "./model", "~/model", "/abs/model"])
def test_paths_are_local_even_where_nothing_exists_yet(uri: str) -> None:
    where = resolve(uri, DATASET_SCHEMES, "dataset")
    assert where.kind == "local" and where.path is not None and where.path.is_absolute()


def test_an_existing_folder_named_like_a_hub_id_is_local(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve("org/model", MODEL_SCHEMES, "model").path == tmp_path / "org" / "model"


def test_an_output_is_never_a_hub_id() -> None:
    assert resolve("org/adapter", OUTPUT_SCHEMES, "output").kind == "local"


def test_a_claim_path_lives_under_the_claims_mount(claims: Path) -> None:
    where = resolve("pvc://data/sets/train.jsonl", DATASET_SCHEMES, "dataset")
    assert where.path == claims.resolve() / "data" / "sets" / "train.jsonl"
    assert where.confined_to == claims.resolve() / "data"


def test_dot_dot_out_of_a_claim_is_refused_by_the_parser(claims: Path) -> None:
    with pytest.raises(ValueError, match=r"'\.\.' segments"):
        resolve("pvc://data/../x", OUTPUT_SCHEMES, "output")


def test_a_symlink_out_of_a_claim_is_refused(claims: Path) -> None:
    (claims / "data" / "escape").symlink_to(claims.parent / "elsewhere")
    with pytest.raises(ValueError, match="leads out of its claim 'data'"):
        resolve("pvc://data/escape/adapter", OUTPUT_SCHEMES, "output")
    (claims / "data" / "inside").symlink_to(claims / "data" / "sets")
    assert resolve("pvc://data/inside", OUTPUT_SCHEMES, "output").kind == "local"


def test_an_output_leading_out_of_its_claim_exits_2_naming_the_field(
    claims: Path, tmp_path: Path
) -> None:
    from kubetune.trainer.run.runner import run

    (claims / "data" / "escape").symlink_to(claims.parent / "elsewhere")
    spec = FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "org/model"},
            "dataset": {"uri": "pvc://data/sets/train.jsonl"},
            "output": {"uri": "pvc://data/escape/adapter"},
        }
    )
    outcome = run(TrainerConfig(spec=spec), write_termination=False)
    assert outcome.exit_code == 2
    assert outcome.result.reason == "InvalidConfig"
    assert outcome.result.message.startswith("output.uri: ")
    assert "leads out of its claim" in outcome.result.message
    assert not (claims.parent / "elsewhere" / "adapter").exists()


def test_a_dataset_file_linked_out_of_its_claim_is_refused(claims: Path, tmp_path: Path) -> None:
    from kubetune.trainer.dataset.formats import prepare

    secret = tmp_path / "elsewhere" / "secrets.jsonl"
    secret.write_text(json.dumps({"text": "not yours"}) + "\n")
    (claims / "data" / "sets" / "train.jsonl").symlink_to(secret)
    with pytest.raises(InvalidConfig, match=r"dataset.uri: .*train.jsonl leads out of its claim"):
        prepare(DatasetSpec(uri="pvc://data/sets"), None, seed=0)
