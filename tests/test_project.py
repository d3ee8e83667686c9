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
    # testgen: the gRPC service only (test_only_the_service_calls_testgen)
    "completion": {"completion", "cache", "models", "kernels", "testgen"},
    "completion/rpc": {"completion.rpc"},
    "cache": {"cache", "kernels"},
    "models": {"models", "kernels"},
    "kernels": {"kernels"},
    # test generation is a client of the completion front (test_testgen_uses_only_the_completion_front)
    "testgen": {"testgen", "completion"},
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
    """Nor any of the worker but completion/rpc (its parent package's empty __init__ aside), nor rotary.testgen."""
    code = (
        "import sys, rotary.lsp.server, rotary.lsp.worker, rotary.lsp.tcp; print(sorted(m for m in sys.modules if "
        "m in ('torch', 'transformers', 'triton', 'rotary.models', 'rotary.cache', 'rotary.kernels') or "
        "m.startswith('rotary.completion.') and not m.startswith('rotary.completion.rpc') or m.startswith('rotary.testgen')))"
    )
    out = subprocess.run(python_command("-c", code), capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_only_the_service_calls_testgen():
    """In completion/, only the gRPC service imports rotary.testgen: the front and what it runs never
    call back into their client (docs/ARCHITECTURE.md)."""
    bad = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in (ROOT / "completion").rglob("*.py")
        if path != ROOT / "completion" / "service.py"
        for module in rotary_imports(path)
        if module == "rotary.testgen" or module.startswith("rotary.testgen.")
    ]
    assert not bad, bad


# What test generation may use of completion/: the front (engine.py) and the pure pieces it hands
# it (a drafter, a prompt, a sampler) and the wire rules; never the scheduler's Job.
TESTGEN_USES = {"engine", "drafters", "prompt", "sampling", "rpc.wire"}


def test_testgen_uses_only_the_completion_front():
    """rotary.testgen reaches the model only through CompletionEngine's public methods: it imports
    no other completion module and touches no private attribute of another object. The generation
    loop as it was in completion/testgen.py (a Job built from `engine._prefill` and `engine._finish`,
    its fields filtered with `dataclasses.fields(Job)`) fails both checks."""
    bad = []
    for path in (ROOT / "testgen").rglob("*.py"):
        for module in rotary_imports(path):
            if module.startswith("rotary.completion") and module.removeprefix("rotary.completion.") not in TESTGEN_USES:
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            private = isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            if private and not (isinstance(node.value, ast.Name) and node.value.id == "self"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {ast.unparse(node)}")
    assert not bad, bad


def test_finding_a_focal_function_loads_no_torch():
    """`rotary tests` finds the focal function and checks its arguments before it starts a worker,
    with rotary.testgen's focal, layout and languages modules: none of them loads torch (it was so
    in completion/testgen.py too; this keeps the split from losing it)."""
    code = (
        "import sys, rotary.testgen.focal, rotary.testgen.layout, rotary.testgen.languages; "
        "print(sorted(m for m in sys.modules if m in ('torch', 'rotary.completion.engine', 'rotary.models')))"
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
