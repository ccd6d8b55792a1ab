"""The Dockerfile, read with dockerfile-parse (no Docker engine here): targets, users, entrypoints,
and that every file it copies exists and gets past .dockerignore."""

from __future__ import annotations

import fnmatch
import shlex
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[dict[str, Any]]:
    parser = DockerfileParser(path=str(REPO / "Dockerfile"))
    return list(parser.structure)


def stages() -> dict[str, list[dict[str, Any]]]:
    """Instructions per stage name (FROM ... AS name)."""
    result: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    for instruction in instructions():
        if instruction["instruction"] == "FROM":
            words = instruction["value"].split()
            current = []
            result[words[-1] if len(words) >= 3 and words[-2].upper() == "AS" else words[0]] = (
                current
            )
        current.append(instruction)
    return result


def last(stage: list[dict[str, Any]], name: str) -> str:
    return [i["value"] for i in stage if i["instruction"] == name][-1]


def build_args() -> dict[str, str]:
    args = {}
    for instruction in instructions():
        if instruction["instruction"] == "ARG" and "=" in instruction["value"]:
            key, _, value = instruction["value"].partition("=")
            args[key] = value
    return args


def test_both_targets_exist_and_run_their_console_script() -> None:
    built = stages()

    assert last(built["trainer"], "ENTRYPOINT") == '["kubetune-trainer"]'
    assert last(built["operator"], "ENTRYPOINT") == '["kubetune-operator"]'


@pytest.mark.parametrize("target", ["trainer", "operator"])
def test_each_target_runs_as_a_numeric_non_root_user(target: str) -> None:
    user = last(stages()[target], "USER")
    uid = user.split(":")[0]

    assert uid.isdigit() and int(uid) != 0, user


def test_both_images_are_built_on_one_slim_python_pinned_by_tag_with_no_cuda_base() -> None:
    # torch's wheels carry the CUDA libraries: the trainer needs only the node's driver.
    args = build_args()

    python = args["PYTHON_IMAGE"]
    assert python.startswith("python:3.11-slim") and ":latest" not in python
    assert "CUDA_IMAGE" not in args
    bases = {i["value"].split()[0] for i in instructions() if i["instruction"] == "FROM"}
    assert bases <= {"${PYTHON_IMAGE}"}, bases


def test_each_image_installs_its_own_pinned_requirements_first_then_the_project_alone() -> None:
    built = stages()

    for target, other in (("operator", "trainer"), ("trainer", "operator")):
        steps = [(i["instruction"], i["value"]) for i in built[target]]
        text = " ".join(value for _, value in steps)
        assert f"requirements/{target}.txt" in text and f"{other}.txt" not in text
        runs = [value for instruction, value in steps if instruction == "RUN"]
        (deps,) = [r for r in runs if f"-r /opt/kubetune-requirements/{target}.txt" in r]
        (project,) = [r for r in runs if "/opt/kubetune-src" in r]
        assert "--require-hashes" in deps
        assert "--no-deps" in project
        # The dependencies' layer comes before the source enters the stage: a source change
        # rebuilds only the project's layer.
        source_copy = steps.index(("COPY", "--from=source /src /opt/kubetune-src"))
        assert runs.index(deps) < runs.index(project)
        assert [v for _, v in steps[:source_copy]].count(deps) == 1


def dockerignore_allows(path: str) -> bool:
    """Whether the build context keeps ``path`` (Docker's rules: last matching pattern wins)."""
    allowed = True
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes):
            allowed = negate
    return allowed


def test_every_file_copied_from_the_context_exists_and_is_not_dockerignored() -> None:
    sources = []
    for instruction in instructions():
        if instruction["instruction"] not in ("COPY", "ADD"):
            continue
        words = shlex.split(instruction["value"])
        if any(w.startswith("--from=") for w in words):
            continue
        sources += [w for w in words[:-1] if not w.startswith("--")]

    assert sources
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: not in the repository"
        assert dockerignore_allows(source.rstrip("/")), f"COPY {source}: excluded by .dockerignore"


def test_the_context_holds_every_package_the_distribution_builds() -> None:
    import tomllib

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    package_dirs = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = {
        shlex.split(i["value"])[0].rstrip("/")
        for i in instructions()
        if i["instruction"] == "COPY" and "--from" not in i["value"]
    }

    assert package_dirs <= copied, package_dirs - copied
    assert pyproject["project"]["readme"] in " ".join(
        i["value"] for i in instructions() if i["instruction"] == "COPY"
    )
    assert not dockerignore_allows(".venv/bin/python") and not dockerignore_allows(".git/HEAD")
