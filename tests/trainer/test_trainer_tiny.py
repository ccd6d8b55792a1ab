"""The tiny builders that the tests and `make demo` share."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.api.manifest import load_finetunejob
from kubetune_devtools import tiny

pytestmark = pytest.mark.unit


def test_tiny_cli_writes_a_model_datasets_and_a_valid_manifest(tmp_path: Path) -> None:
    assert tiny.main([str(tmp_path / "demo")]) == 0
    job = load_finetunejob(tmp_path / "demo" / "tiny-reverse.yaml")
    assert (Path(job.spec.model.uri) / "config.json").is_file()
    assert Path(job.spec.dataset.uri).is_file()
    assert job.spec.output.uri == str(tmp_path / "demo" / "adapter")
    assert len(list((tmp_path / "demo" / "data").glob("reverse-*.jsonl"))) == 4


def test_tokenizer_gives_one_token_per_letter_and_has_a_chat_template() -> None:
    tokenizer = tiny.build_tokenizer()
    assert len(tokenizer.tokenize(" c a f")) == 3
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_model_linear_dimensions_are_multiples_of_64() -> None:
    import torch

    model = tiny.build_model(tiny.build_tokenizer())
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    assert all(m.in_features % 64 == 0 and m.out_features % 64 == 0 for m in linears)
