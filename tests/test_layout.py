"""The layout's promises, read from the source: the core never imports a tool, and no function is long.

    python -m pytest -q tests/test_layout.py
"""

import ast
import os

from conftest import REPO

CORE = ["model.py", "train.py", "sample.py", "common.py", "eval.py", *(f"data/{name}" for name in
        sorted(os.listdir(os.path.join(REPO, "data"))) if name.endswith(".py"))]


def python_files(folders=("", "data", "tools", "records")) -> list[str]:
    return [os.path.join(folder, name) for folder in folders for name in sorted(os.listdir(os.path.join(REPO, folder)))
            if name.endswith(".py")]


def parse(path: str) -> ast.Module:
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        return ast.parse(f.read())


def imported_modules(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    return names


def test_the_core_never_imports_a_tool():
    for path in CORE:
        tools = {name for name in imported_modules(parse(path)) if name.split(".")[0] == "tools"}
        assert not tools, f"{path} imports {tools}"


def test_no_function_is_over_60_lines():
    for path in python_files():
        lengths = {node.name: node.end_lineno - node.lineno + 1 for node in ast.walk(parse(path))
                   if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
        assert max(lengths.values(), default=0) <= 60, (path, {k: v for k, v in lengths.items() if v > 60})
