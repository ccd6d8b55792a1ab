"""The product's modules and functions stay a size a newcomer can read (CONVENTIONS.md): no
module over 400 lines but the API models (one pydantic class per CRD object, generated into the
CRD and docs/reference.md), no function over 80 lines. A test, so a carve can't quietly come
undone; the limit's message names what grew."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "operator", "trainer", "cli", "local", "server")
MODULE_LINES = 400
FUNCTION_LINES = 80
#: The API's pydantic models: one class per object of the CRD, read as a reference.
EXEMPT_MODULES = {"api/models.py"}


def product_modules() -> list[Path]:
    return sorted(path for package in PACKAGES for path in (REPO / package).rglob("*.py"))


def long_functions(source: str) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function or method in ``source`` longer than the limit."""
    return [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > FUNCTION_LINES
    ]


def test_no_product_module_is_over_400_lines() -> None:
    too_long = {
        path.relative_to(REPO).as_posix(): lines
        for path in product_modules()
        if (lines := path.read_text(encoding="utf-8").count("\n")) > MODULE_LINES
        and path.relative_to(REPO).as_posix() not in EXEMPT_MODULES
    }
    assert too_long == {}, f"modules over {MODULE_LINES} lines: split them by what they hold"


def test_no_product_function_is_over_80_lines() -> None:
    too_long = {
        f"{path.relative_to(REPO).as_posix()}:{name}": lines
        for path in product_modules()
        for name, lines in long_functions(path.read_text(encoding="utf-8"))
    }
    assert too_long == {}, f"functions over {FUNCTION_LINES} lines: carve them"


def test_the_function_check_finds_a_long_method_of_a_class() -> None:
    body = "\n".join(f"        x{i} = {i}" for i in range(FUNCTION_LINES))
    source = f"class Runner:\n    def run(self):\n{body}\n"
    assert long_functions(source) == [("run", FUNCTION_LINES + 1)]
    assert long_functions("def short():\n    return 1\n") == []
