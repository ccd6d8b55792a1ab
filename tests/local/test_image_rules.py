"""How a real node finds what it imports: the image store ``make images`` fills, by reference."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kubetune.local.images import ImageStore, normalized

pytestmark = pytest.mark.unit


def test_an_untagged_reference_means_latest() -> None:
    assert normalized("busybox") == "busybox:latest"
    assert normalized("registry:5000/ml/t") == "registry:5000/ml/t:latest"
    assert normalized("t@sha256:00") == "t@sha256:00"


def test_a_stored_image_is_found_by_either_form_with_its_manifest_digest(tmp_path: Path) -> None:
    layout = tmp_path / "t%3Alatest" / "oci"
    layout.mkdir(parents=True)
    index = {"manifests": [{"digest": "sha256:" + "ab" * 32}]}
    (layout / "index.json").write_text(json.dumps(index))
    store = ImageStore(tmp_path)

    for reference in ("t", "t:latest"):
        image = store.find(reference)
        assert image is not None and (image.reference, image.digest) == (
            "t:latest",
            "sha256:" + "ab" * 32,
        )
    assert store.find("python:3.11") is None
