"""The editors declare the server's settings with the same names, types and defaults
(VS Code contributes.configuration, the Neovim defaults table): checked against
the server's own typed tree, rotary.lsp.settings."""

from __future__ import annotations

import json
import subprocess

import pytest

from .conftest import EDITORS
from .test_nvim import nvim_binary

settings_mod = pytest.importorskip("rotary.lsp.settings")

VSCODE_CLIENT_ONLY = {"rotary.serverPath", "rotary.languages", "rotary.trace.server"}


def test_vscode_declares_the_server_settings():
    package = json.loads((EDITORS / "vscode" / "package.json").read_text())
    declared = package["contributes"]["configuration"]["properties"]
    schema = settings_mod.settings_schema()
    server_keys = {f"rotary.{k}" for k in schema}
    assert set(declared) - VSCODE_CLIENT_ONLY == server_keys
    for key, spec in schema.items():
        decl = declared[f"rotary.{key}"]
        assert decl["type"] == spec["type"], key
        assert decl["default"] == spec["default"], key
    assert declared["rotary.completionMode"]["enum"] == list(settings_mod.COMPLETION_MODES)


def test_vscode_settings_that_redirect_text_or_load_code_are_user_only():
    # A repository's .vscode/settings.json must not send the user's code elsewhere
    # (workerAddress) or load a model of its choosing (model): machine or application scope.
    declared = json.loads((EDITORS / "vscode" / "package.json").read_text())["contributes"]["configuration"]["properties"]
    for key in ("rotary.workerAddress", "rotary.model"):
        assert declared[key].get("scope") in ("machine", "application"), key


def test_vscode_extension_defaults_match_package_json():
    # src/settings.ts holds the defaults sent when a user has not set a key.
    source = (EDITORS / "vscode" / "src" / "settings.ts").read_text()
    for key, spec in settings_mod.settings_schema().items():
        literal = json.dumps(spec["default"])
        assert f"  {key}: {literal}," in source, key


def test_neovim_defaults_table_matches_the_server():
    nvim = nvim_binary()
    if not nvim:
        pytest.skip("no nvim")
    code = (
        f"vim.opt.rtp:prepend([[{EDITORS / 'nvim'}]]);"
        "io.stdout:write(vim.json.encode(require('rotary.config').defaults.settings))"
    )
    out = subprocess.run(
        [nvim, "--headless", "-u", "NONE", "-i", "NONE", "--cmd", f"lua {code}", "+qa!"],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout
    table = json.loads(out)
    schema = settings_mod.settings_schema()
    assert set(table) == set(schema)
    for key, spec in schema.items():
        assert table[key] == spec["default"], key
