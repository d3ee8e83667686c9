"""The daemon's side of "Generate unit tests": which Python function a position is in, and where the
test file goes. Pure Python (`ast`); the generation itself happens in the worker (GenerateTests)."""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from urllib.parse import quote

from pygls.uris import from_fs_path, to_fs_path


@dataclass(frozen=True)
class FunctionAt:
    qualname: str  # "name" or "Class.method" (nested classes and functions joined with dots)
    name: str
    line: int  # 0-based line of its `def`


def function_at(text: str, line: int) -> FunctionAt | None:
    """The innermost function or method whose lines hold `line` (0-based); None when the text does
    not parse or the line is in no function."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return None
    best: FunctionAt | None = None

    def visit(body, prefix: str) -> None:
        nonlocal best
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                first = min([d.lineno for d in node.decorator_list] + [node.lineno]) - 1
                last = (node.end_lineno or node.lineno) - 1
                if not first <= line <= last:
                    continue
                qualname = prefix + node.name
                if isinstance(node, ast.ClassDef):
                    visit(node.body, qualname + ".")
                else:
                    best = FunctionAt(qualname, node.name, node.lineno - 1)
                    visit(node.body, qualname + ".")

    visit(tree.body, "")
    return best


def new_test_file_uri(source_uri: str, file_name: str, exists=os.path.lexists) -> str:
    """Where the new test file goes: beside the source, under a name no file (nor link) has yet.

    Only the base name of the worker's `file_name` is used: a worker's "../x" or "/etc/x" must not
    put a file outside the source's folder. Raises ValueError when it has no usable base name."""
    name = os.path.basename(file_name.replace("\\", "/"))
    if name in ("", ".", "..") or "\x00" in name:
        raise ValueError(f"the worker proposed no usable file name ({file_name!r})")
    path = to_fs_path(source_uri) if source_uri.startswith("file:") else None
    if not path:
        return source_uri.rsplit("/", 1)[0] + "/" + quote(name)
    folder = os.path.dirname(path)
    stem, ext = os.path.splitext(name)
    candidate, k = os.path.join(folder, name), 2
    while exists(candidate):
        candidate, k = os.path.join(folder, f"{stem}_{k}{ext}"), k + 1
    return from_fs_path(candidate)
