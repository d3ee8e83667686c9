"""`make run`'s demo, for real: a worker, the LSP daemon over stdio, a completion printed."""

import socket
import subprocess
import sys

import pytest


@pytest.mark.model
def test_demo_prints_a_suggestion_through_lsp():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = subprocess.run(
        [sys.executable, "-m", "rotary", "demo", "--no-serve", "--listen", f"127.0.0.1:{port}"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "suggestion (" in out.stdout and "through LSP + gRPC" in out.stdout
    assert "daemon connected to the worker" in out.stdout
