"""VS Code extension: its unit tests (`npm test`), the offline .vsix build, and the
end-to-end tests in a real VS Code (code-server 4.100.3 in Debian's Chromium), which
editors/vscode/scripts/e2e.sh runs (scenarios of e2e-driver.mjs: basic, indent); install
its tooling once with `e2e.sh install` (`make editors-setup`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from .conftest import EDITORS, REPO, rotary_executable

EXT = EDITORS / "vscode"
pytestmark = pytest.mark.editor


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(os.environ.get("ROTARY_EDITORS_CACHE") or Path(base) / "rotary-editors")


@pytest.fixture(scope="module")
def npm() -> str:
    exe = shutil.which("npm")
    if not exe or not shutil.which("node"):
        pytest.skip("node/npm not installed")
    if not (EXT / "node_modules").is_dir():
        pytest.skip("editors/vscode/node_modules missing: run `npm ci` there (make editors-setup)")
    return exe


def run(cmd: list[str], timeout: int, env: dict | None = None) -> str:
    proc = subprocess.run(cmd, cwd=EXT, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def test_unit(npm):
    out = run([npm, "test"], timeout=300)
    assert "# fail 0" in out and "# pass " in out, out


def test_package_builds_a_small_vsix(npm):
    for old in EXT.glob("*.vsix"):
        old.unlink()
    run([npm, "run", "package"], timeout=300)
    vsix = next(EXT.glob("*.vsix"))
    assert vsix.stat().st_size < 1_000_000
    names = set(zipfile.ZipFile(vsix).namelist())
    assert "extension/dist/extension.js" in names
    assert "extension/package.json" in names
    assert not any("node_modules" in n or n.endswith(".ts") or "/test/" in n for n in names), names


def run_e2e(scenario: str) -> tuple[str, Path]:
    """editors/vscode/scripts/e2e.sh run, one scenario of e2e-driver.mjs; its output and artifacts folder."""
    if not (cache_dir() / "code-server-4.100.3" / ".rotary-installed").exists() or not shutil.which("chromium"):
        pytest.skip("code-server/chromium not installed: editors/vscode/scripts/e2e.sh install")
    server = rotary_executable()
    if not server:
        pytest.skip("no rotary executable")
    artifacts = REPO / "artifacts" / "vscode-e2e"
    out = run(
        [str(EXT / "scripts" / "e2e.sh"), "run"],
        timeout=900,
        env={"ROTARY_SERVER": server, "ROTARY_ARTIFACTS": str(artifacts), "ROTARY_E2E_SCENARIO": scenario},
    )
    assert "[driver] PASS" in out and "not ok" not in out, out
    return out, artifacts


@pytest.mark.model
def test_end_to_end_in_code_server(npm):
    """Type, ghost text, Tab, accept word then Tab, the server's counters: every file compared
    byte for byte with the server's reply (from the language client's trace)."""
    _, artifacts = run_e2e("basic")
    assert (artifacts / "02-basic-ghost-text.png").exists()


@pytest.mark.model
def test_enter_then_accept_in_code_server(npm):
    """Issue 7: Enter after `def add(a, b):` / `    with open(path) as f:` (VS Code's Python
    onEnter rule indents), Tab: the line is the editor's indentation followed by exactly the
    server's suggestion."""
    run_e2e("indent")
