"""Project-wide invariants: generated stubs are current, dependencies point one way, the daemon stays light."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
from rotary.completion.rpc.launch import python_command, rotary_command

ROOT = Path(__file__).resolve().parent.parent

# Which rotary subpackages each package may import (ARCHITECTURE.md: nothing points upward).
ALLOWED = {
    "lsp": {"lsp", "completion.rpc"},
    "completion": {"completion", "cache", "models", "kernels"},
    "cache": {"cache", "kernels"},
    "models": {"models", "kernels"},
    "kernels": {"kernels"},
}


def rotary_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.startswith("rotary."):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("rotary."))
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_one_way(package):
    bad = []
    for path in (ROOT / package).rglob("*.py"):
        for module in rotary_imports(path):
            target = module.removeprefix("rotary.")
            if not any(target == a or target.startswith(a + ".") for a in ALLOWED[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, bad


def test_lsp_never_imports_torch():
    code = "import sys, rotary.lsp.server, rotary.lsp.worker; print(sorted(m for m in ('torch', 'transformers', 'rotary.models', 'rotary.cache') if m in sys.modules))"
    out = subprocess.run(python_command("-c", code), capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_grpc_stubs_are_current():
    result = subprocess.run(python_command("-m", "rotary.completion.gen_stubs", "--check"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cli_help_lists_every_command():
    out = subprocess.run(rotary_command("--help"), capture_output=True, text=True, check=True).stdout
    for command in ("worker", "lsp", "complete", "bench", "demo"):
        assert command in out
