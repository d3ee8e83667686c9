"""README's documented defaults and settings, each against its documented value or meaning.

Without a model: the command line's defaults as `rotary worker` and `rotary lsp --tcp` would use them
(the real `rotary.cli.main`, stopped where it would start serving), `$ROTARY_MAX_STREAMS`'s default in
a real worker's Stats, and what the daemon's settings ask of the worker (the real daemon and worker
service, the engine a recording fake, tests/fakes.py). With the model (`model`): what the worker does
with what it is asked (`abstainThreshold -1`, `editAwareCache false`).

The oracle is README (its table and its Commands block), written out here, never the code's constants.
Checked by mutation (by hand, then put back): `--session-lease` default 60, IDLE_S 600, MAX_STREAMS 32,
`maxTokens` default 32, the prefix cache mode sent for `editAwareCache true`: each fails a test here.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import pytest
from lsprotocol import types
from rotary.completion.rpc.launch import rotary_command
from rotary.completion.service import WorkerService
from rotary.lsp.server import RotaryServer
from rotary.lsp.worker import READY

import rotary.cli
from tests.fakes import FakeEngine, start_worker, until
from tests.lsp.test_lsp_protocol import RawClient, stop_daemon

URI = "file:///documented_defaults.py"


def main_of_rotary(monkeypatch, argv: list[str]) -> int:
    """`rotary.cli.main(argv)` in this process; what it sets in the environment (HF_HUB_OFFLINE, ...) is
    put back afterwards."""
    for name in ("HF_HUB_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
        monkeypatch.setenv(name, os.environ.get(name, "1"))
    return rotary.cli.main(argv)


# -- the command line's defaults -----------------------------------------------------------------------


def test_rotary_worker_drops_a_silent_sessions_documents_after_120_s_by_default(monkeypatch):
    """README Commands and docs/RELIABILITY.md Sessions: `--session-lease` seconds, "default 120"."""
    served = {}
    monkeypatch.setattr("rotary.completion.server.serve", lambda *args, **kwargs: served.update(kwargs))
    assert main_of_rotary(monkeypatch, ["worker", "--listen", "unix:/nonexistent-rotary-test/w.sock"]) == 0
    assert served["session_lease_s"] == 120


def test_rotary_lsp_tcp_closes_a_silent_session_after_300_s_by_default(monkeypatch):
    """README Commands: "a session silent for --idle-timeout seconds, default 300, is closed"."""
    daemons = []
    monkeypatch.setattr("rotary.lsp.tcp.TcpDaemon.run", lambda self, *args: daemons.append(self))
    assert main_of_rotary(monkeypatch, ["lsp", "--tcp", "127.0.0.1:0", "--worker", "unix:/nonexistent-rotary-test/w.sock"]) == 0
    assert [d.idle_s for d in daemons] == [300]


def test_a_worker_serves_at_most_64_streaming_calls_by_default(monkeypatch):
    """README Commands: "at most $ROTARY_MAX_STREAMS streaming calls at once (default 64)", as a worker
    made with the variable unset counts them (what its Stats reports as `max_streams`)."""
    monkeypatch.delenv("ROTARY_MAX_STREAMS", raising=False)
    assert WorkerService().streams.stats()["max_streams"] == 64


# -- what the settings ask of the worker ------------------------------------------------------------------


class RecordingEngine(FakeEngine):
    """The fake engine, keeping the options each completion arrived with (after the worker service read them)."""

    def __init__(self):
        super().__init__()
        self.options = []

    def complete(self, uri, text, offset, options, is_cancelled=lambda: False, session=""):
        self.options.append(options)
        yield from super().complete(uri, text, offset, options, is_cancelled, session)


class Discard:
    def write(self, data: bytes) -> None:
        pass


def options_for(settings: dict):
    """The engine's options for one completion the daemon asks as the inline-completion handler does,
    with `settings` from the client (initializationOptions) and the rest at their defaults."""
    worker_server, service, address = start_worker()
    service.engine = RecordingEngine()

    async def run():
        server = RotaryServer(address)
        server.protocol.set_writer(Discard())  # what the editor would be shown: not read here
        server.apply_settings(settings)
        server.worker.start()
        assert await until(lambda: server.worker.state == READY)
        server.sync.opened(URI, 1, "python", "def f():\n    ")
        result = await server.complete(URI, types.Position(1, 4), server.settings.worker_mode())
        await server.worker.stop()
        return result

    try:
        assert asyncio.run(run()) is not None
    finally:
        worker_server.stop(0)
    (options,) = service.engine.options
    return options


def test_the_default_settings_reach_the_worker_as_documented():
    """README Settings: `maxTokens` 64 is the completion's token budget; `completionMode` "auto";
    `abstainThreshold` -1 and `exitThreshold` -1 leave the worker's own (calibrated) thresholds, so
    none is sent; `editAwareCache` true keeps the cache across edits (the edit-aware mode);
    `decodingMode` "lossless" is n-gram guesses, not early exit."""
    options = options_for({})
    assert (options.max_tokens, options.mode) == (64, "auto")
    assert (options.abstain_threshold, options.exit_threshold) == (None, None)
    assert options.cache_mode == "edit_aware"
    assert (options.early_exit, options.drafter) == (False, "ngram")


def test_edit_aware_cache_false_asks_for_prefix_reuse_only():
    """README Settings: `editAwareCache` false does not keep the document's cache across edits: the
    worker reuses only the unchanged prefix (what that mode does: test_edit_aware_cache_off_reuses_only_the_unchanged_prefix)."""
    assert options_for({"rotary": {"editAwareCache": False}}).cache_mode == "prefix"


def test_thresholds_set_by_the_client_are_sent():
    """The other side of -1: a threshold the client sets reaches the worker as it is."""
    options = options_for({"rotary": {"abstainThreshold": 0.25, "exitThreshold": 0.75, "maxTokens": 9}})
    assert (options.abstain_threshold, options.exit_threshold, options.max_tokens) == (0.25, 0.75, 9)


# -- --model on the command line wins ---------------------------------------------------------------------------


def test_the_model_flag_wins_over_the_clients_model_without_a_question(tmp_path):
    """README Settings: the editor's `model` "applies only after you answer Allow (`--model` needs none and
    wins)": with `rotary lsp --model M`, a client's model is neither asked about nor applied, from
    initializationOptions or a later didChangeConfiguration."""
    flag_model = str(tmp_path / "the-flags-model")
    proc = subprocess.Popen(
        rotary_command("lsp", "--worker", f"unix:{tmp_path}/no-worker.sock", "--model", flag_model),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )
    client = RawClient(proc.stdout, proc.stdin)

    def model_setting() -> str:
        reply = client.request("workspace/executeCommand", {"command": "rotary.stats", "arguments": []})
        return reply["result"]["daemon"]["settings"]["model"]

    try:
        client.request("initialize", {
            "processId": None, "rootUri": None, "capabilities": {"window": {"showMessage": {}}},
            "initializationOptions": {"rotary": {"model": "/the/clients/model"}},
        })
        client.notify("initialized", {})
        assert model_setting() == flag_model
        client.notify("workspace/didChangeConfiguration", {"settings": {"rotary": {"model": "/another/model"}}})
        assert model_setting() == flag_model
        assert [r for r in client.server_requests if r["method"] == "window/showMessageRequest"] == []
    finally:
        stop_daemon(proc, client)


# -- with the model: what the worker does with it ----------------------------------------------------------------


@pytest.mark.model
def test_abstain_threshold_minus_one_is_the_workers_default_from_the_environment(monkeypatch):
    """README Settings: `abstainThreshold` -1 is "the worker's default (the threshold calibrated for the
    model, or `$ROTARY_ABSTAIN_THRESHOLD` set where the worker runs)". A request with no threshold
    (what -1 sends, above) abstains on a worker whose environment says 0.999; a request's own 0 (never abstain) wins over the environment; unset, the calibrated one applies."""
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine, CompletionOptions

    from tests.conftest import rotary_runner

    text = "import os\n\n\ndef read_config(path):\n    "

    def complete(env: str | None, **options):
        if env is None:
            monkeypatch.delenv("ROTARY_ABSTAIN_THRESHOLD", raising=False)
        else:
            monkeypatch.setenv("ROTARY_ABSTAIN_THRESHOLD", env)
        engine = CompletionEngine(rotary_runner(), KVStore())  # reads the variable as the worker does, at start
        assert engine.gate is not None, "the embedded model ships a calibrated abstention gate"
        last = list(engine.complete(None, text, len(text), CompletionOptions(max_tokens=8, **options)))[-1]
        return engine, last.stop_reason

    assert complete("0.999")[1] == "abstained"
    assert complete("0.999", abstain_threshold=0.0)[1] != "abstained"
    engine, _ = complete(None)
    assert engine.abstain_below(CompletionOptions()) == engine.gate.threshold


@pytest.mark.model
def test_edit_aware_cache_off_reuses_only_the_unchanged_prefix():
    """README Settings: `editAwareCache` true keeps each document's KV cache across edits; false does not:
    after an edit near the top, the prefix mode reuses no token past the edit, the edit-aware mode keeps
    the tokens after it too. The same text comes out either way."""
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine, CompletionOptions

    from tests.conftest import reference_tokenizer, rotary_runner

    head = "import os\n"
    body = "".join(f"def f{i}(x):\n    return x + {i}\n\n\n" for i in range(12)) + "def g(x):\n    "
    text, edited = head + body, head + "import sys\n" + body
    prefix_tokens = len(reference_tokenizer().encode(head, add_special_tokens=False))
    results = {}
    for mode in ("edit_aware", "prefix"):
        engine = CompletionEngine(rotary_runner(), KVStore())
        options = CompletionOptions(max_tokens=8, cache_mode=mode, refresh_window=0)
        list(engine.complete(f"file:///{mode}.py", text, len(text), options))
        chunks = list(engine.complete(f"file:///{mode}.py", edited, len(edited), options))
        results[mode] = ("".join(c.text for c in chunks), chunks[-1].stats.tokens_reused)
    assert results["prefix"][1] <= prefix_tokens + 1  # at most the tokens before the edit
    assert results["edit_aware"][1] > prefix_tokens + 100  # the functions after the edit too
    assert results["prefix"][0] == results["edit_aware"][0]


@pytest.mark.model
def test_exit_threshold_minus_one_is_the_calibrated_threshold():
    """README Settings: `exitThreshold` -1 (no threshold sent, above) is "calibrated": an early-exit
    completion without a threshold runs exactly as one given the model's calibrated threshold, and
    another threshold changes how many layers run (so the comparison can tell them apart)."""
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine, CompletionOptions

    from tests.conftest import rotary_runner

    runner = rotary_runner()
    assert runner.exits is not None, "the embedded model ships calibrated exit heads"
    engine = CompletionEngine(runner, KVStore())
    text = "import os\n\n\ndef list_python_files(folder):\n    "

    def run(threshold):
        options = CompletionOptions(max_tokens=16, early_exit=True, exit_threshold=threshold, abstain_threshold=0.0)
        chunks = list(engine.complete(None, text, len(text), options))
        return "".join(c.text for c in chunks), chunks[-1].stats.layers_run

    unset, calibrated = run(None), run(runner.exits.threshold)
    assert unset == calibrated and unset[1] > 0
    assert run(1.0)[1] != unset[1]  # never sure enough to stop early: every layer runs
