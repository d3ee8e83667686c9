"""`rotary soak kills`, short: the real daemon's own worker is SIGKILLed mid-completion six times.

Six, one more than MAX_START_FAILURES: a worker killed after it served counts as started, so kills
in a row never stop the daemon as a crash loop. After each kill the daemon starts a new worker, the
next completion equals a fresh engine's on the text the client built, and the document is intact.
The daemon's worker runs the tiny random Llama of tests/test_bench_smoke.py (`--model`): what is
checked is the restart and the text, and each restart then loads the model in a blink instead of
the embedded one's seconds. It answers in a fraction of a second, so the kill comes 0-50 ms after the
request (`--kill-delay 0,0.05`) to land while it is in flight.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from rotary.lsp.worker import MAX_START_FAILURES
from rotary.completion.rpc.launch import rotary_command

from .test_bench_smoke import tiny_llama_dir  # noqa: F401  a fixture

pytestmark = [pytest.mark.model]


def test_every_kill_of_the_worker_is_recovered(tmp_path, tiny_llama_dir):  # noqa: F811
    kills = MAX_START_FAILURES + 1
    path = tmp_path / "kills.json"
    out = subprocess.run(
        rotary_command("--log-level", "warning", "soak", "kills", "--kills", str(kills),
         "--seed", "3", "--model", str(tiny_llama_dir), "--kill-delay", "0,0.05", "--json", str(path)),
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads(path.read_text())
    assert report["kills"] == kills and report["recovered"] == kills, report["failures"]
    assert report["lost_documents"] == 0 and report["wrong_completions"] == 0
    assert report["mid_completion"] >= 1  # at least one kill landed while a completion was in flight
    assert report["nonempty_expected"] >= 1  # the comparisons are not all of empty texts
    assert report["daemon_restarts"] == kills and report["daemon_worker_state"] == "ready"
