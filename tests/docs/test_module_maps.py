"""The module tables in docs/ say what the modules' own docstrings say (``make docs``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_devtools import module_maps

pytestmark = pytest.mark.unit


def test_every_module_map_in_docs_matches_the_modules() -> None:
    assert module_maps.stale() == [], "run `make docs` and commit the tables it rewrites"


def test_a_new_module_shows_in_its_folders_map_and_one_without_a_docstring_is_refused(
    tmp_path: Path,
) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text('"""The package."""\n')
    (tmp_path / "pkg" / "queue.py").write_text('"""A queue | with a pipe.\n\nDetails."""\n')
    doc = "intro\n<!-- module-map: pkg -->\nold rows\n<!-- /module-map -->\noutro\n"
    assert module_maps.regenerate(doc, tmp_path) == (
        "intro\n<!-- module-map: pkg -->\n| module | what it owns |\n|---|---|\n"
        "| `queue.py` | A queue \\| with a pipe. |\n<!-- /module-map -->\noutro\n"
    )
    (tmp_path / "pkg" / "bare.py").write_text("x = 1\n")
    with pytest.raises(ValueError, match=r"bare\.py has no docstring"):
        module_maps.regenerate(doc, tmp_path)
