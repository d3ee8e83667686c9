"""Abstention through the real path: LSP over stdio -> daemon -> gRPC -> worker -> the calibrated gate.

A user who sets a strict `abstainThreshold` gets no ghost text, and is told why: the daemon's
`rotary/status` notification says "likely wrong" with the confidence, and `rotary.stats` counts it.
Setting the threshold to 0 (never abstain) brings the suggestion back, equal to transformers' greedy
continuation: abstention withholds a suggestion, it never changes one.
"""

from __future__ import annotations


import pytest
import pytest_lsp
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from tests.conftest import first_line, greedy_continuation
from tests.lsp.test_lsp_e2e import daemon_stats, inline, open_document, wait_ready
from rotary.completion.rpc.launch import rotary_command

pytestmark = [pytest.mark.model]

TEXT = "import os\n\n\ndef read_config(path):\n    with open(path) as handle:\n        return handle."


@pytest_lsp.fixture(config=ClientServerConfig(server_command=rotary_command("lsp")))
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

    # decodingMode reaches the worker. "plain": one token per forward, no guesses, the same text.
    async def complete_with(**settings) -> tuple[str, dict]:
        base = {"abstainThreshold": 0, "completionMode": "singleLine", "debounceMs": 0, "maxTokens": 32}
        client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"rotary": {**base, **settings}}))
        result = await inline(client, 5, len(last_line), invoked=True)
        return (result.items[0].insert_text if result else None), (await daemon_stats(client))["last_completion"]

    plain, stats = await complete_with(decodingMode="plain")
    assert plain == expected
    assert stats["tokens_drafted"] == 0 and stats["forwards"] == stats["tokens_generated"] - 1
    assert stats["tokens_generated"] > 2, stats  # enough tokens for the early-exit check below
    # "earlyExit" with a threshold every token passes: each decoding step stops at the first exit layer.
    _, stats = await complete_with(decodingMode="earlyExit", exitThreshold=0.0)
    steps = stats["tokens_generated"] - 1  # the first token comes from the prefill, with every layer
    assert 0 < stats["layers_run"] < 30 * steps, stats
    # Back to the default: the text of plain decoding again.
    lossless, stats = await complete_with(decodingMode="lossless")
    assert lossless == expected and stats["layers_run"] == 30 * (stats["tokens_generated"] - 1)
