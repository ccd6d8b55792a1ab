"""The pinned requirements (requirements/*.txt, written by `make lock` from pyproject.toml) agree
with pyproject.toml: every dependency the operator image, the trainer image and `make setup`'s
environment need, followed through each package's own requirements for the images' platform, is
pinned at a version its requirers accept, with hashes, and nothing else is pinned. Offline: the
packages' own requirements are read from .venv, which `make setup` installs from
requirements/dev.txt."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = canonicalize_name(PYPROJECT["project"]["name"])
# The images' platform (Dockerfile: python:3.11-slim on Linux x86_64); hack/lock.sh resolves for it.
PLATFORM = {
    "python_version": "3.11",
    "python_full_version": "3.11.2",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
# Each file and what it is the lock of: the project's extras, or the build system's requirements.
TARGETS = {
    "operator.txt": ("operator", "server"),
    "trainer.txt": ("trainer",),
    "dev.txt": ("operator", "server", "trainer", "dev"),
}
PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)")


def pinned(file: str) -> dict[str, tuple[str, int]]:
    """``{name: (version, number of hashes)}`` of a requirements file."""
    pins: dict[str, tuple[str, int]] = {}
    name = ""
    for line in (REPO / "requirements" / file).read_text().splitlines():
        if match := PIN.match(line):
            name = canonicalize_name(match["name"])
            assert name not in pins, f"{file}: {name} pinned twice"
            pins[name] = (match["version"], 0)
        elif line.strip().startswith("--hash=sha256:"):
            version, hashes = pins[name]
            pins[name] = (version, hashes + 1)
        else:
            assert not line.strip() or line.lstrip().startswith("#"), f"{file}: {line!r}"
    return pins


def applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(
        requirement.marker.evaluate({**default_environment(), **PLATFORM, "extra": extra})
        for extra in extras | {""}
    )


def needed(roots: list[Requirement], pins: dict[str, tuple[str, int]]) -> set[str]:
    """The names reached from ``roots`` through each pinned package's requirements (read from
    the distribution installed in .venv, which must be the pinned version); each requirement on
    the way is checked against the pinned version."""
    seen: dict[str, set[str]] = {}
    queue = [(requirement, {""}) for requirement in roots]
    while queue:
        requirement, extras = queue.pop()
        if not applies(requirement, extras):
            continue
        name = canonicalize_name(requirement.name)
        if name == PROJECT:
            continue
        assert name in pins, f"{name} ({requirement}) is needed but not pinned: run `make lock`"
        version = pins[name][0]
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{name}=={version} is pinned but {requirement} is required: run `make lock`"
        )
        wanted = set(requirement.extras) | {""}
        if wanted <= seen.get(name, set()):
            continue
        seen[name] = seen.get(name, set()) | wanted
        installed = importlib.metadata.distribution(name)
        assert installed.version == version, (
            f".venv has {name} {installed.version}, the lock pins {version}: run `make setup`"
        )
        for line in installed.requires or []:
            queue.append((Requirement(line), wanted))
    return set(seen)


def project_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    optional = PYPROJECT["project"]["optional-dependencies"]
    lines = PYPROJECT["project"]["dependencies"] + [r for e in extras for r in optional[e]]
    return [Requirement(line) for line in lines]


@pytest.mark.parametrize("file", sorted(TARGETS))
def test_the_lock_pins_exactly_what_pyproject_needs_for_the_target(file: str) -> None:
    pins = pinned(file)

    assert needed(project_requirements(TARGETS[file]), pins) == set(pins), (
        f"requirements/{file} pins packages nothing needs: run `make lock`"
    )
    assert all(hashes for _, hashes in pins.values()), f"{file}: a pin without a hash"


def test_the_build_backend_is_pinned_too() -> None:
    pins = pinned("build.txt")
    roots = [Requirement(line) for line in PYPROJECT["build-system"]["requires"]]

    assert needed(roots, pins) == set(pins)


def test_a_package_has_one_version_in_every_file() -> None:
    everything = pinned("dev.txt")
    for file in ("operator.txt", "trainer.txt"):
        for name, (version, _) in pinned(file).items():
            assert everything[name][0] == version, f"{name}: {version} in {file}, not in dev.txt"


def test_no_file_names_a_package_index_or_any_url() -> None:
    for file in (REPO / "requirements").iterdir():
        text = file.read_text()
        assert not re.search(r"(?i)https?://|--index-url|--extra-index-url|--find-links", text)
