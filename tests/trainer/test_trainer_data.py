"""Dataset reading and shaping: every format, auto-detection, column mapping, splits, fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import TinyAssets

from kubetune.api.models import DatasetSpec
from kubetune.trainer.dataset.formats import prepare
from kubetune.trainer.errors import DatasetUnusable, InvalidConfig
from kubetune_devtools.tiny import CHAT_TEMPLATE, toy_records, write_jsonl

pytestmark = pytest.mark.unit

PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    ("fmt", "columns"),
    [
        ("text", ["text"]),
        ("prompt-completion", ["prompt", "completion"]),
        ("alpaca", ["prompt", "completion"]),
        ("messages", ["messages"]),
    ],
)
def test_auto_detects_each_format_and_shapes_it_for_trl(
    tiny: TinyAssets, fmt: str, columns: list[str]
) -> None:
    data = prepare(DatasetSpec(uri=str(tiny.datasets[fmt])), CHAT_TEMPLATE, seed=0)
    assert data.format == fmt
    assert data.train.column_names == columns
    assert len(data.train) == 512


def test_alpaca_records_become_alpaca_prompts_with_the_output_as_completion(
    tmp_path: Path,
) -> None:
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"}]
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    data = prepare(DatasetSpec(uri=str(path), format="alpaca"), None, seed=0)
    row = data.train[0]
    assert "### Instruction:\nAdd." in row["prompt"]
    assert "### Input:\n2 and 3" in row["prompt"]
    assert row["prompt"].endswith("### Response:\n")
    assert row["completion"] == "5"
    assert data.completion_only_loss


def test_column_mapping_renames_the_users_columns(tmp_path: Path) -> None:
    rows = [{"question": "q1", "answer": "a1", "id": 1}]
    path = write_jsonl(tmp_path / "qa.jsonl", rows)
    spec = DatasetSpec.model_validate(
        {"uri": str(path), "columns": {"prompt": "question", "completion": "answer"}}
    )
    data = prepare(spec, None, seed=0)
    assert data.format == "prompt-completion"
    assert data.train[0] == {"prompt": "q1", "completion": "a1"}


def test_a_mapped_column_that_is_absent_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "qa.jsonl", [{"question": "q", "answer": "a"}])
    spec = DatasetSpec.model_validate(
        {"uri": str(path), "columns": {"prompt": "query", "completion": "answer"}}
    )
    with pytest.raises(DatasetUnusable, match=r"no column 'query' \(dataset.columns.prompt\)"):
        prepare(spec, None, seed=0)


def test_messages_with_generation_markers_train_on_assistant_turns(tiny: TinyAssets) -> None:
    data = prepare(DatasetSpec(uri=str(tiny.datasets["messages"])), CHAT_TEMPLATE, seed=0)
    assert data.assistant_only_loss
    assert data.train.column_names == ["messages"]


def test_messages_without_generation_markers_split_off_the_last_assistant_turn(
    tiny: TinyAssets,
) -> None:
    data = prepare(DatasetSpec(uri=str(tiny.datasets["messages"])), PLAIN_CHAT_TEMPLATE, seed=0)
    assert data.completion_only_loss and not data.assistant_only_loss
    row = data.train[0]
    assert [m["role"] for m in row["prompt"]] == ["user"]
    assert [m["role"] for m in row["completion"]] == ["assistant"]


def test_completion_only_loss_can_be_turned_off(tiny: TinyAssets) -> None:
    spec = DatasetSpec(uri=str(tiny.datasets["messages"]), completion_only_loss=False)
    data = prepare(spec, CHAT_TEMPLATE, seed=0)
    assert not data.completion_only_loss and not data.assistant_only_loss


def test_messages_need_a_chat_template(tiny: TinyAssets) -> None:
    with pytest.raises(InvalidConfig, match=r"dataset\.chatTemplate"):
        prepare(DatasetSpec(uri=str(tiny.datasets["messages"])), None, seed=0)


def test_eval_fraction_holds_out_part_of_the_data(tiny: TinyAssets) -> None:
    spec = DatasetSpec(uri=str(tiny.datasets["text"]), eval_fraction=0.25)
    data = prepare(spec, None, seed=0)
    assert data.eval is not None
    assert (len(data.train), len(data.eval)) == (384, 128)


def test_eval_split_reads_the_named_file_of_a_directory(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "data" / "train.jsonl", toy_records("text", 8))
    write_jsonl(tmp_path / "data" / "test.jsonl", toy_records("text", 3, seed=5))
    spec = DatasetSpec(uri=str(tmp_path / "data"), eval_split="test")
    data = prepare(spec, None, seed=0)
    assert data.eval is not None
    assert (len(data.train), len(data.eval)) == (8, 3)


def test_eval_uri_reads_evaluation_data_from_another_file(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", toy_records("prompt-completion", 8))
    held = write_jsonl(tmp_path / "held.jsonl", toy_records("prompt-completion", 3, seed=5))
    data = prepare(DatasetSpec(uri=str(train), eval_uri=str(held)), None, seed=0)
    assert data.eval is not None
    assert (len(data.train), len(data.eval)) == (8, 3)
    alone = prepare(DatasetSpec(uri=str(train)), None, seed=0)
    assert data.fingerprint != alone.fingerprint  # the evaluation data is part of what was read


def test_a_missing_eval_uri_is_named_as_such(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", toy_records("text", 4))
    spec = DatasetSpec(uri=str(train), eval_uri=str(tmp_path / "nowhere.jsonl"))
    with pytest.raises(
        DatasetUnusable, match=r"dataset not found: .*nowhere.jsonl \(dataset.evalUri"
    ):
        prepare(spec, None, seed=0)


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_reads_csv_parquet_and_json_files(tmp_path: Path, suffix: str) -> None:
    import pandas as pd

    frame = pd.DataFrame(toy_records("prompt-completion", 5))
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        frame.to_csv(path, index=False)
    elif suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text(json.dumps(frame.to_dict(orient="records")))
    data = prepare(DatasetSpec(uri=str(path)), None, seed=0)
    assert data.format == "prompt-completion"
    assert len(data.train) == 5


def test_pvc_uris_resolve_under_the_claim_mount_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBETUNE_PVC_ROOT", str(tmp_path / "mnt"))
    write_jsonl(tmp_path / "mnt" / "data" / "support.jsonl", toy_records("text", 4))
    data = prepare(DatasetSpec(uri="pvc://data/support.jsonl"), None, seed=0)
    assert len(data.train) == 4


def test_fingerprint_is_stable_and_follows_the_content(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", toy_records("text", 4))
    first = prepare(DatasetSpec(uri=str(path)), None, seed=0).fingerprint
    again = prepare(DatasetSpec(uri=str(path)), None, seed=0).fingerprint
    write_jsonl(path, toy_records("text", 4, seed=9))
    changed = prepare(DatasetSpec(uri=str(path)), None, seed=0).fingerprint
    assert first == again != changed
    assert first.startswith("sha256:")


def test_undetectable_columns_ask_for_a_format_and_mapping(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"foo": "x", "bar": "y"}])
    with pytest.raises(DatasetUnusable, match=r"cannot detect .*dataset.columns") as raised:
        prepare(DatasetSpec(uri=str(path)), None, seed=0)
    # The columns are the data's words: for the trainer's log, not the job's status.
    assert "foo" not in raised.value.message
    assert raised.value.detail == "the dataset's columns: 'foo', 'bar'"
    assert "'foo', 'bar'" in raised.value.log_line()
