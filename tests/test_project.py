"""Project-wide invariants: generated stubs are current, dependencies point one way, the daemon stays light."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
from rotary.completion.rpc.launch import python_command, rotary_command

ROOT = Path(__file__).resolve().parent.parent

# Which rotary subpackages each package (folder) may import (ARCHITECTURE.md: nothing points upward).
# completion/rpc is what the daemon imports of the worker: the stubs and the rules both obey.
ALLOWED = {
    "lsp": {"lsp", "completion.rpc"},
    "completion": {"completion", "cache", "models", "kernels"},
    "completion/rpc": {"completion.rpc"},
    "cache": {"cache", "kernels"},
    "models": {"models", "kernels"},
    "kernels": {"kernels"},
}
# What the daemon and what it imports never load, not even inside a function (the daemon starts fast).
HEAVY = ("torch", "transformers", "triton", "safetensors", "gguf", "accelerate")
NEVER = {"lsp": HEAVY, "completion/rpc": HEAVY}


def absolute_imports(path: Path) -> set[str]:
    """The modules `path` imports by absolute name (relative imports stay inside its package)."""
    tree = ast.parse(path.read_text(), str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def rotary_imports(path: Path) -> set[str]:
    return {module for module in absolute_imports(path) if module.startswith("rotary.")}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_dependencies_point_one_way(package):
    bad = []
    for path in (ROOT / package).rglob("*.py"):
        for module in rotary_imports(path):
            target = module.removeprefix("rotary.")
            if not any(target == a or target.startswith(a + ".") for a in ALLOWED[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
        for module in absolute_imports(path):
            if module.split(".")[0] in NEVER.get(package, ()):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, bad


def test_lsp_never_imports_torch():
    """Nor any of the worker but completion/rpc (its parent package's empty __init__ aside)."""
    code = (
        "import sys, rotary.lsp.server, rotary.lsp.worker, rotary.lsp.tcp; print(sorted(m for m in sys.modules if "
        "m in ('torch', 'transformers', 'triton', 'rotary.models', 'rotary.cache', 'rotary.kernels') or "
        "m.startswith('rotary.completion.') and not m.startswith('rotary.completion.rpc')))"
    )
    out = subprocess.run(python_command("-c", code), capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_grpc_stubs_are_current():
    result = subprocess.run(python_command("-m", "rotary.completion.gen_stubs", "--check"), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_cli_help_lists_every_command():
    out = subprocess.run(rotary_command("--help"), capture_output=True, text=True, check=True).stdout
    for command in ("worker", "lsp", "complete", "bench", "demo"):
        assert command in out
