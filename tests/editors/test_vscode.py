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


@pytest.fixture(scope="session")
def npm() -> str:
    exe = shutil.which("npm")
    if not exe or not shutil.which("node"):
        pytest.skip("node/npm not installed")
    if not (EXT / "node_modules").is_dir():
        pytest.skip("editors/vscode/node_modules missing: run `npm ci` there (make editors-setup)")
    return exe


def run(cmd: list[str], timeout: int, env: dict | None = None, cwd: Path = EXT) -> str:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    return out


def test_unit(npm):
    out = run([npm, "test"], timeout=300)
    assert "# fail 0" in out and "# pass " in out, out


@pytest.fixture(scope="session")
def vsix(npm, tmp_path_factory) -> Path:
    """The .vsix, built once per session in a temporary copy of editors/vscode (its node_modules
    linked, not copied): nothing is written into the repository (no dist/, no .vsix there)."""
    folder = tmp_path_factory.mktemp("vscode")
    source = folder / "vscode"
    shutil.copytree(EXT, source, ignore=shutil.ignore_patterns("node_modules", "dist", "out", "out-test", "*.vsix"))
    (source / "node_modules").symlink_to(EXT / "node_modules", target_is_directory=True)
    built = folder / "rotary.vsix"
    run([npm, "run", "package", "--", "--out", str(built)], timeout=300, cwd=source)
    assert built.is_file(), f"npm run package wrote no {built}"
    return built


def test_package_builds_a_small_vsix(vsix):
    assert vsix.stat().st_size < 1_000_000
    names = set(zipfile.ZipFile(vsix).namelist())
    assert "extension/dist/extension.js" in names
    assert "extension/package.json" in names
    assert not any("node_modules" in n or n.endswith(".ts") or "/test/" in n for n in names), names


def run_e2e(scenario: str, vsix: Path) -> tuple[str, Path]:
    """editors/vscode/scripts/e2e.sh run, one scenario of e2e-driver.mjs, on the session's .vsix (the
    script builds none then); its output and artifacts folder."""
    if not (cache_dir() / "code-server-4.100.3" / ".rotary-installed").exists() or not shutil.which("chromium"):
        pytest.skip("code-server/chromium not installed: editors/vscode/scripts/e2e.sh install")
    server = rotary_executable()
    if not server:
        pytest.skip("no rotary executable")
    artifacts = REPO / "artifacts" / "vscode-e2e"
    out = run(
        [str(EXT / "scripts" / "e2e.sh"), "run"],
        timeout=900,
        env={"ROTARY_SERVER": server, "ROTARY_ARTIFACTS": str(artifacts), "ROTARY_E2E_SCENARIO": scenario, "ROTARY_VSIX": str(vsix)},
    )
    assert "[driver] PASS" in out and "not ok" not in out, out
    return out, artifacts


@pytest.mark.model
def test_end_to_end_in_code_server(vsix):
    """Type, ghost text, Tab, accept word then Tab, the server's counters: every file compared
    byte for byte with the server's reply (from the language client's trace)."""
    _, artifacts = run_e2e("basic", vsix)
    assert (artifacts / "02-basic-ghost-text.png").exists()


@pytest.mark.model
def test_enter_then_accept_in_code_server(vsix):
    """Issue 7: Enter after `def add(a, b):` / `    with open(path) as f:` (VS Code's Python
    onEnter rule indents), Tab: the line is the editor's indentation followed by exactly the
    server's suggestion."""
    run_e2e("indent", vsix)
