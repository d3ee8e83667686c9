"""`:Rotary restart` (README Editors, Neovim), in a real headless Neovim against the fake server
(tests/editors/fake_server.py): the buffer's server is stopped, a new client with a server process
of its own attaches, and it answers the next completion (editors/nvim/tests/restart.lua).

It failed on the plugin before its fix (2026-12-07): `restart()` stopped the client, then `vim.lsp.start`
with `reuse_client = function(client) return client.name == M.NAME end` attached the buffer to that same
client, still stopping (not yet exited), so no new server started and the buffer was left with none.
reuse_client now skips a stopped client (editors/nvim/lua/rotary/client.lua).
"""

from __future__ import annotations

import json

import pytest

from .test_nvim import NVIM_TESTS, nvim, run_lua  # noqa: F401  (nvim: the fixture)

pytestmark = pytest.mark.editor


def test_rotary_restart_starts_a_new_server_that_answers(nvim, fake_server_cmd):  # noqa: F811
    output = run_lua(
        nvim, NVIM_TESTS / "restart.lua", env={"ROTARY_TEST_CMD": json.dumps(fake_server_cmd), "ROTARY_TEST_TIMEOUT": "30"},
        timeout=180,
    )
    assert "ok - :Rotary restart attaches a new client to the buffer" in output
    assert "ok - the new server answers" in output
