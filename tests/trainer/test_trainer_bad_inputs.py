"""Bad input: each fails with its exit code and a message naming the cause, and leaves nothing
behind that looks like a success."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import TinyAssets, job_manifest, write_manifest

from kubetune.trainer.run.local_run import main as kubetune
from kubetune_devtools.tiny import toy_records, write_jsonl

pytestmark = pytest.mark.trainer


def _assert_failed_without_success_traces(
    output: Path, termination_log: Path, exit_code: int, reason: str, message: str
) -> None:
    assert not (output / "result.json").exists()
    assert not (output / "adapter_model.safetensors").exists()
    written = json.loads(termination_log.read_text())
    assert written["outcome"] == "Failed"
    assert written["reason"] == reason
    assert message in written["message"]


Setup = Callable[[TinyAssets, Path], dict[str, Any]]


def _missing_dataset(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
    return job_manifest(tiny.model, tmp / "nope.jsonl", tmp / "out")


def _empty_dataset(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
    (tmp / "empty.jsonl").write_text("")
    return job_manifest(tiny.model, tmp / "empty.jsonl", tmp / "out")


def _malformed_line(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
    path = write_jsonl(tmp / "broken.jsonl", toy_records("text", 2))
    with path.open("a") as f:
        f.write('{"text": "reverse: a b =>" b a}\n')
    return job_manifest(tiny.model, path, tmp / "out")


def _missing_columns(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
    path = write_jsonl(tmp / "qa.jsonl", [{"question": "q", "answer": "a"}])
    return job_manifest(
        tiny.model, path, tmp / "out", dataset_extra={"format": "prompt-completion"}
    )


def _unreadable_model(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
    return job_manifest(tmp / "no-such-model", tiny.datasets["text"], tmp / "out")


def _unwritable_output(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
    # A path below a regular file can't be created, whoever runs the test (root included).
    (tmp / "a-file").write_text("")
    return job_manifest(tiny.model, tiny.datasets["text"], tmp / "a-file" / "out")


def _another_runs_checkpoints(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
    # A finished or interrupted run left its checkpoints in the output location.
    checkpoint = tmp / "out" / "checkpoints" / "checkpoint-20"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    (tmp / "out" / "checkpoints" / "run.json").write_text('{"run": "finetunejob/another-uid"}')
    return job_manifest(tiny.model, tiny.datasets["text"], tmp / "out")


def _unreadable_marker(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
    # Checkpoints whose owner can't be told: continuing them could be continuing anyone's.
    _another_runs_checkpoints(tiny, tmp)
    (tmp / "out" / "checkpoints" / "run.json").write_text("[]")
    return job_manifest(tiny.model, tiny.datasets["text"], tmp / "out")


def _records_with(tmp: Path, fmt: str, line: int, change: dict[str, Any]) -> Path:
    """Toy records of ``fmt`` in a file, the one on ``line`` changed."""
    records: list[Any] = toy_records(fmt, 3)
    records[line - 1] = {**records[line - 1], **change}
    return write_jsonl(tmp / "bad.jsonl", records)


def _dataset_case(fmt: str, line: int, change: dict[str, Any], **extra: Any) -> Setup:
    def setup(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
        path = _records_with(tmp, fmt, line, change)
        return job_manifest(tiny.model, path, tmp / "out", dataset_extra=extra)

    return setup


def _mapped_null(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
    records = [{"question": "q", "answer": "a"}, {"question": None, "answer": "a"}]
    path = write_jsonl(tmp / "bad.jsonl", records)
    columns = {"prompt": "question", "completion": "answer"}
    return job_manifest(tiny.model, path, tmp / "out", dataset_extra={"columns": columns})


def _chat(*contents: Any) -> dict[str, Any]:
    roles = ["user", "assistant"] * len(contents)
    return {"messages": [{"role": r, "content": c} for r, c in zip(roles, contents, strict=False)]}


def _raw_lines(*lines: str) -> Setup:
    def setup(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
        path = write_jsonl(tmp / "bad.jsonl", toy_records("text", 1))
        with path.open("a") as f:
            f.writelines(line + "\n" for line in lines)
        return job_manifest(tiny.model, path, tmp / "out")

    return setup


def _with_setting(section: str, key: str, value: Any) -> Setup:
    def setup(tiny: TinyAssets, tmp: Path) -> dict[str, Any]:
        manifest = job_manifest(tiny.model, tiny.datasets["text"], tmp / "out")
        manifest["spec"][section][key] = value
        return manifest

    return setup


LAYERS = "the model's layers are named down_proj, embed_tokens, gate_proj, k_proj, lm_head"

CASES: list[tuple[str, Setup, int, str, str]] = [
    ("missing dataset", _missing_dataset, 3, "DatasetError", "dataset not found"),
    ("empty dataset", _empty_dataset, 3, "DatasetError", "is empty"),
    ("malformed jsonl", _malformed_line, 3, "DatasetError", "line 3 is not valid JSON"),
    ("missing columns", _missing_columns, 3, "DatasetError", "needs column(s) prompt, completion"),
    ("unreadable model", _unreadable_model, 4, "ModelError", "no-such-model does not exist"),
    ("unwritable output", _unwritable_output, 2, "InvalidConfig", "is not writable"),
    (
        "another run's checkpoints",
        _another_runs_checkpoints,
        2,
        "InvalidConfig",
        "already holds the checkpoints of another run (finetunejob/another-uid)",
    ),
    (
        "checkpoints with an unreadable marker",
        _unreadable_marker,
        2,
        "InvalidConfig",
        "already holds the checkpoints of a run it can't identify",
    ),
    # Records that would end in a traceback deep inside tokenization: named by file and line.
    (
        "null prompt",
        _dataset_case("prompt-completion", 2, {"prompt": None}),
        3,
        "DatasetError",
        "bad.jsonl line 2: 'prompt' is null; format prompt-completion needs text there",
    ),
    (
        "null completion",
        _dataset_case("prompt-completion", 3, {"completion": None}),
        3,
        "DatasetError",
        "bad.jsonl line 3: 'completion' is null",
    ),
    (
        "null in a mapped column",
        _mapped_null,
        3,
        "DatasetError",
        "bad.jsonl line 2: 'question' (dataset.columns.prompt) is null",
    ),
    (
        "a number where text belongs",
        _dataset_case("alpaca", 2, {"output": 42}),
        3,
        "DatasetError",
        "bad.jsonl line 2: 'output' is a number; format alpaca needs text there",
    ),
    (
        "null message content",
        _dataset_case("messages", 2, _chat("hi", None)),
        3,
        "DatasetError",
        "bad.jsonl line 2: the content of message 2 of 'messages' is null; it must be text",
    ),
    (
        "list message content",
        _dataset_case("messages", 3, _chat([{"type": "text", "text": "hi"}], "ho")),
        3,
        "DatasetError",
        "bad.jsonl line 3: the content of message 1 of 'messages' is a list; it must be text",
    ),
    (
        "a JSON line that is no object",
        _raw_lines('["reverse: a b =>", " b a"]'),
        3,
        "DatasetError",
        "bad.jsonl: line 2 is a JSON array, not an object with one field per column",
    ),
    (
        "deeply nested JSON",
        _raw_lines('{"text": ' + "[" * 65 + "]" * 65 + "}"),
        3,
        "DatasetError",
        "bad.jsonl: line 2 nests arrays and objects more than 64 deep",
    ),
    (
        "JSON nested deeper than the parser goes",
        _raw_lines('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}"),
        3,
        "DatasetError",
        "bad.jsonl: line 2 nests arrays and objects more than 64 deep",
    ),
    (
        "an integer longer than Python reads",
        _raw_lines('{"text": ' + "9" * 5000 + "}"),
        3,
        "DatasetError",
        "bad.jsonl: line 2 is JSON that can't be read (too deep or too long)",
    ),
    # Settings that would fail inside the trainer's construction: named by field.
    (
        "unknown optimizer",
        _with_setting("training", "optimizer", "adamw_turbo"),
        2,
        "InvalidConfig",
        "spec.training.optimizer: unknown optimizer 'adamw_turbo'; use auto or one of ",
    ),
    (
        "unknown target modules",
        _with_setting("lora", "targetModules", ["q_proj", "attention.query"]),
        2,
        "InvalidConfig",
        "spec.lora.targetModules: 'attention.query' match no module of the model; " + LAYERS,
    ),
    (
        "target modules naming blocks of layers",
        _with_setting("lora", "targetModules", ["self_attn"]),
        2,
        "InvalidConfig",
        "spec.lora.targetModules: 'self_attn' name blocks of layers, not layers LoRA can adapt",
    ),
    (
        "unknown modules to save",
        _with_setting("lora", "modulesToSave", ["score"]),
        2,
        "InvalidConfig",
        "spec.lora.modulesToSave: 'score' match no module of the model",
    ),
]


@pytest.mark.parametrize(
    ("setup", "exit_code", "reason", "message"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_exits_with_its_code_and_names_the_cause(
    tiny: TinyAssets,
    tmp_path: Path,
    termination_log: Path,
    capsys: pytest.CaptureFixture[str],
    setup: Setup,
    exit_code: int,
    reason: str,
    message: str,
) -> None:
    manifest = setup(tiny, tmp_path)
    path = write_manifest(tmp_path / "job.yaml", manifest)
    assert kubetune(["train", str(path), "--no-progress"]) == exit_code
    assert message in capsys.readouterr().err
    output = Path(manifest["spec"]["output"]["uri"])
    _assert_failed_without_success_traces(output, termination_log, exit_code, reason, message)


def test_an_output_holding_another_runs_adapter_is_left_alone(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path
) -> None:
    output = tmp_path / "out"
    (output / "checkpoints").mkdir(parents=True)
    (output / "adapter_model.safetensors").write_bytes(b"their weights")
    (output / "checkpoints" / "run.json").write_text('{"run": "finetunejob/another-uid"}')
    manifest = job_manifest(tiny.model, tiny.datasets["text"], output)
    assert kubetune(["train", str(write_manifest(tmp_path / "job.yaml", manifest))]) == 2
    written = json.loads(termination_log.read_text())
    assert written["reason"] == "InvalidConfig"
    assert "finished adapter of another run (finetunejob/another-uid)" in written["message"]
    assert (output / "adapter_model.safetensors").read_bytes() == b"their weights"


def test_unknown_format_is_an_invalid_manifest(
    tiny: TinyAssets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = job_manifest(
        tiny.model, tiny.datasets["text"], tmp_path / "out", dataset_extra={"format": "sharegpt"}
    )
    path = write_manifest(tmp_path / "job.yaml", manifest)
    assert kubetune(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.dataset.format" in err and "text" in err
    assert not (tmp_path / "out").exists()


def test_invalid_manifest_names_each_bad_field(
    tiny: TinyAssets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = job_manifest(
        tiny.model, tiny.datasets["text"], tmp_path / "out", training={"learningRate": -1}
    )
    manifest["spec"]["lora"]["r"] = 0
    path = write_manifest(tmp_path / "job.yaml", manifest)
    assert kubetune(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "spec.training.learningRate" in err
    assert "spec.lora.r" in err


def test_invalid_trainer_config_exits_2_and_says_so_in_the_termination_message(
    tmp_path: Path, termination_log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from kubetune.trainer.cli import main as trainer

    config = tmp_path / "config.yaml"
    config.write_text("apiVersion: kubetune.io/v1alpha1\nkind: TrainerConfig\nspec: {model: {}}\n")
    assert trainer(["--config", str(config)]) == 2
    written = json.loads(termination_log.read_text())
    assert written["outcome"] == "Failed"
    assert written["reason"] == "InvalidConfig"
    assert "spec.model.uri" in written["message"]


def test_hub_model_that_cannot_be_fetched_is_a_model_error(
    tiny: TinyAssets, tmp_path: Path, termination_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The session runs with HF_HUB_OFFLINE=1: the hub is as unreachable as a gated repo.
    manifest = job_manifest(tiny.model, tiny.datasets["text"], tmp_path / "out")
    manifest["spec"]["model"]["uri"] = "example-org/no-such-model"
    path = write_manifest(tmp_path / "job.yaml", manifest)
    assert kubetune(["train", str(path)]) == 4
    assert "example-org/no-such-model" in capsys.readouterr().err
    assert json.loads(termination_log.read_text())["reason"] == "ModelError"


def test_hub_dataset_that_cannot_be_fetched_is_a_dataset_error(
    tiny: TinyAssets, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest = job_manifest(tiny.model, "hf://example-org/no-such-dataset", tmp_path / "out")
    path = write_manifest(tmp_path / "job.yaml", manifest)
    assert kubetune(["train", str(path)]) == 3
    assert "cannot load hub dataset example-org/no-such-dataset" in capsys.readouterr().err


def test_out_of_gpu_memory_exits_5_and_names_the_knobs_to_turn(
    tiny: TinyAssets,
    tmp_path: Path,
    termination_log: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import torch
    from trl import SFTTrainer

    def out_of_memory(*_: Any, **__: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SFTTrainer, "train", out_of_memory)
    manifest = job_manifest(tiny.model, tiny.datasets["text"], tmp_path / "out")
    path = write_manifest(tmp_path / "job.yaml", manifest)
    assert kubetune(["train", str(path)]) == 5
    written = json.loads(termination_log.read_text())
    assert written["reason"] == "OutOfMemory"
    assert "training.microBatchSize (now 16" in written["message"]
    assert "training.gradientCheckpointing: true" in written["message"]
    assert "set training.profile: memory" in written["message"]
