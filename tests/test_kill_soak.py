"""`rotary soak kills`, short: the real daemon's own worker is SIGKILLed mid-completion six times.

Six, one more than MAX_START_FAILURES: a worker killed after it served counts as started, so kills
in a row never stop the daemon as a crash loop. After each kill the daemon starts a new worker, the
next completion equals a fresh engine's on the text the client built, and the document is intact.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from rotary.lsp.worker import MAX_START_FAILURES
from rotary.completion.rpc.launch import rotary_command

pytestmark = [pytest.mark.model]


def test_every_kill_of_the_worker_is_recovered(tmp_path):
    kills = MAX_START_FAILURES + 1
    path = tmp_path / "kills.json"
    out = subprocess.run(
        rotary_command("--log-level", "warning", "soak", "kills", "--kills", str(kills),
         "--seed", "3", "--json", str(path)),
        capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads(path.read_text())
    assert report["kills"] == kills and report["recovered"] == kills, report["failures"]
    assert report["lost_documents"] == 0 and report["wrong_completions"] == 0
    assert report["mid_completion"] >= 1  # at least one kill landed while a completion was in flight
    assert report["nonempty_expected"] >= 1  # the comparisons are not all of empty texts
    assert report["daemon_restarts"] == kills and report["daemon_worker_state"] == "ready"
