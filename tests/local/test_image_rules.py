"""How the local node combines an image's config with a pod's container, as a kubelet does."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune.local.images import Image, ImageConfig, ImageStore, image_argv, image_user, normalized

pytestmark = pytest.mark.unit

CONFIG = ImageConfig(entrypoint=("kubetune-trainer",), cmd=("--help",), user="1000:1000")


@pytest.mark.parametrize(
    ("container", "argv"),
    [
        ({}, ["kubetune-trainer", "--help"]),
        ({"args": ["--config", "c.yaml"]}, ["kubetune-trainer", "--config", "c.yaml"]),
        ({"command": ["python"]}, ["python"]),
        ({"command": ["python"], "args": ["-V"]}, ["python", "-V"]),
    ],
)
def test_command_replaces_entrypoint_and_drops_cmd_args_replace_cmd(
    container: dict[str, list[str]], argv: list[str]
) -> None:
    assert image_argv({"name": "c", **container}, CONFIG) == argv


def test_pod_run_as_user_and_group_override_the_images_user(tmp_path: Path) -> None:
    image = Image("t:1", "sha256:0", tmp_path, CONFIG)

    assert image_user({}, {}, image) == (1000, 1000)
    assert image_user({}, {"runAsUser": 5, "runAsGroup": 6}, image) == (5, 6)
    assert image_user({"securityContext": {"runAsUser": 7}}, {"runAsUser": 5}, image)[0] == 7


def test_an_untagged_reference_means_latest_and_host_patterns_match_either_form() -> None:
    store = ImageStore(Path("/nonexistent"), host_patterns=["busybox:latest", "kubetune/*"])

    assert normalized("busybox") == "busybox:latest"
    assert normalized("registry:5000/ml/t") == "registry:5000/ml/t:latest"
    assert normalized("t@sha256:00") == "t@sha256:00"
    assert store.runs_on_host("busybox") and store.runs_on_host("kubetune/trainer:0.1.0")
    assert not store.runs_on_host("python:3.11")
    assert store.find("python:3.11") is None
