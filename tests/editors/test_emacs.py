"""Emacs + eglot (Emacs 28+, Debian: apt-get install emacs-nox elpa-eglot) get a completion
from Rotary through textDocument/completion, in batch mode (editors/emacs/test-eglot.el)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from .conftest import EDITORS, REPO

pytestmark = [
    pytest.mark.editor,
    pytest.mark.skipif(shutil.which("emacs") is None, reason="emacs not installed (apt-get install emacs-nox elpa-eglot)"),
]

SCRIPT = EDITORS / "emacs" / "test-eglot.el"


# The buffer test-eglot.el opens, its point at the end, and the settings it sends.
SOURCE = "import math\n\n\ndef add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return"
MAX_TOKENS = 32


def run_emacs(cmd: list[str], timeout_s: int, expect: str | None = None) -> str:
    env = {**os.environ, "ROTARY_TEST_CMD": json.dumps(cmd), "ROTARY_TEST_TIMEOUT": str(timeout_s)}
    if expect is not None:
        env["ROTARY_TEST_EXPECT"] = json.dumps(expect)
    proc = subprocess.run(
        ["emacs", "--batch", "-Q", "-l", str(SCRIPT)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s + 120,
    )
    output = proc.stdout + proc.stderr
    if "Cannot open load file" in output and "eglot" in output:
        pytest.skip("eglot not installed (apt-get install elpa-eglot)")
    assert proc.returncode == 0 and "not ok" not in output, output
    return output


def test_eglot_with_fake_server(fake_server_cmd):
    out = run_emacs(fake_server_cmd, 30)
    assert "ok - completion-at-point inserted the candidate" in out


@pytest.mark.model
def test_eglot_with_real_server(real_server_cmd):
    """The suggestion inserted is the model's greedy first line, not just any candidate (before, any
    non-empty answer passed)."""
    from tests.conftest import first_line, greedy_continuation

    assert SOURCE in SCRIPT.read_text().replace("\\n", "\n"), "SOURCE must be the buffer test-eglot.el opens"
    expected = first_line(greedy_continuation(SOURCE, MAX_TOKENS))
    assert expected.strip(), "the oracle produced nothing; the test would be vacuous"
    out = run_emacs(real_server_cmd, int(os.environ.get("ROTARY_TEST_TIMEOUT", "240")), expect=expected)
    assert "ok - a completion from Rotary via textDocument/completion" in out
    assert "ok - the inserted suggestion is the expected one" in out, out
