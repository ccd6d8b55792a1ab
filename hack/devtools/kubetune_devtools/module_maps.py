"""The module tables in docs/, generated from the modules' own docstrings so they can't drift.

A table sits between ``<!-- module-map: FOLDER -->`` and ``<!-- /module-map -->`` in a doc and
has one row per module of FOLDER: its file name and the first paragraph of its docstring.
``python -m kubetune_devtools.module_maps --write`` (``make docs``) rewrites every table;
without ``--write`` it lists the tables that differ and exits 1 (a test runs that check).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
DOCS = ("docs/operator.md", "docs/trainer.md", "docs/local-cluster.md", "docs/api.md")
MAP = re.compile(
    r"(<!-- module-map: (?P<folder>[\w/.-]+) -->\n)(?P<table>.*?)(<!-- /module-map -->)", re.S
)


def summary(module: Path) -> str:
    """The first paragraph of ``module``'s docstring, on one line; a module without one fails."""
    docstring = ast.get_docstring(ast.parse(module.read_text(encoding="utf-8")))
    if not docstring:
        raise ValueError(f"{module} has no docstring: say in one paragraph what it owns")
    first = docstring.split("\n\n", 1)[0]
    return " ".join(first.split()).replace("``", "`").replace("|", "\\|")


def table(folder: Path) -> str:
    rows = [
        f"| `{module.relative_to(folder).as_posix()}` | {summary(module)} |"
        for module in sorted(folder.rglob("*.py"))
        if module.name != "__init__.py" or module.parent != folder
    ]
    return "\n".join(["| module | what it owns |", "|---|---|", *rows]) + "\n"


def regenerate(text: str, repo: Path = REPO) -> str:
    """``text`` with every module map in it rebuilt from the folder it names."""
    return MAP.sub(lambda m: m.group(1) + table(repo / m.group("folder")) + m.group(4), text)


def stale(repo: Path = REPO) -> list[str]:
    """The docs whose module maps differ from the modules."""
    found = []
    for doc in DOCS:
        path = repo / doc
        if path.is_file() and regenerate(path.read_text(encoding="utf-8"), repo) != path.read_text(
            encoding="utf-8"
        ):
            found.append(doc)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--write", action="store_true", help="rewrite the tables in place")
    args = parser.parse_args(argv)
    if args.write:
        for doc in DOCS:
            path = REPO / doc
            if path.is_file():
                path.write_text(regenerate(path.read_text(encoding="utf-8")), encoding="utf-8")
        return 0
    differing = stale()
    for doc in differing:
        print(f"{doc}: its module map differs from the modules' docstrings (make docs)")
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())
