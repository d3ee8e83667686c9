"""Abstention through the real path: LSP over stdio -> daemon -> gRPC -> worker -> the calibrated gate.

A user who sets a strict `abstainThreshold` gets no ghost text, and is told why: the daemon's
`rotary/status` notification says "likely wrong" with the confidence, and `rotary.stats` counts it.
Setting the threshold to 0 (never abstain) brings the suggestion back, equal to transformers' greedy
continuation: abstention withholds a suggestion, it never changes one.
"""

from __future__ import annotations

import sys

import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from tests.conftest import first_line, greedy_continuation
from tests.lsp.test_lsp_e2e import URI, daemon_stats, inline, open_document, wait_ready

pytestmark = [pytest.mark.model]

TEXT = "import os\n\n\ndef read_config(path):\n    with open(path) as handle:\n        return handle."


@pytest_lsp.fixture(config=ClientServerConfig(server_command=[sys.executable, "-m", "rotary", "lsp"]))
async def client(lsp_client: LanguageClient):
    lsp_client.statuses = []

    @lsp_client.feature("rotary/status")
    def on_status(params):
        lsp_client.statuses.append(params)

    params = types.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"),
        # A threshold no line of this model reaches: the gate must withhold the suggestion.
        initialization_options={"completionMode": "singleLine", "debounceMs": 0, "maxTokens": 32, "abstainThreshold": 0.999},
    )
    await lsp_client.initialize_session(params)
    yield
    await lsp_client.shutdown_session()


async def test_an_abstention_is_shown_in_status_and_stats_and_the_setting_turns_it_off(client: LanguageClient):
    await wait_ready(client)
    open_document(client, TEXT)
    last_line = TEXT.split("\n")[-1]
    # No gate (models/calibration/ lacks the embedded model's artifact) would answer here instead.
    assert await inline(client, 5, len(last_line), invoked=True) is None
    daemon = await daemon_stats(client)
    assert daemon["abstained"] == 1 and daemon["suggestions"] == 0
    said = [s for s in client.statuses if getattr(s, "lastResult", None) == "abstained"]
    assert said and "likely wrong (confidence 0." in said[-1].message, client.statuses

    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"rotary": {"abstainThreshold": 0, "completionMode": "singleLine", "debounceMs": 0, "maxTokens": 32}})
    )
    expected = first_line(greedy_continuation(TEXT, max_new_tokens=32))
    assert expected.strip(), "the oracle produced nothing; the test would be vacuous"
    result = await inline(client, 5, len(last_line), invoked=True)
    assert result is not None and result.items[0].insert_text == expected
    assert (await daemon_stats(client))["abstained"] == 1
