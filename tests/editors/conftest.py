"""Shared helpers for the editor tests: where things are, and the server commands."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
EDITORS = REPO / "editors"
FAKE_SERVER = Path(__file__).with_name("fake_server.py")


def rotary_executable() -> str | None:
    """The `rotary` the README's set-up installs: the repo venv's, else the one on PATH."""
    env = os.environ.get("ROTARY_SERVER")
    if env:
        return env
    venv = Path(sys.prefix) / "bin" / "rotary"
    if venv.exists():
        return str(venv)
    return shutil.which("rotary")


@pytest.fixture(scope="session")
def fake_server_cmd() -> list[str]:
    return [sys.executable, str(FAKE_SERVER)]


@pytest.fixture(scope="session")
def real_server_cmd() -> list[str]:
    exe = rotary_executable()
    if not exe:
        pytest.skip("no rotary executable (pip install -e . first)")
    return [exe, "lsp"]
