"""`make run`'s demo, for real: a worker, the LSP daemon over stdio, a completion printed."""

import subprocess

import pytest
from rotary.completion.rpc.launch import rotary_command


@pytest.mark.model
def test_demo_prints_a_suggestion_through_lsp(unix_socket_address):
    out = subprocess.run(
        rotary_command("demo", "--no-serve", "--listen", unix_socket_address), capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "suggestion (" in out.stdout and "through LSP + gRPC" in out.stdout
    assert "daemon connected to the worker" in out.stdout


@pytest.mark.model
def test_complete_one_shot_prints_the_completion(tmp_path):
    from tests.conftest import first_line, greedy_continuation

    source = tmp_path / "example.py"
    text = "def area(width, height):\n    return width"
    source.write_text(text)
    out = subprocess.run(
        rotary_command("--log-level", "warning", "complete", str(source), "--line", "2",
         "--mode", "single_line", "--max-tokens", "16"),
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    expected = first_line(greedy_continuation(text, 16))
    assert expected.strip(), "the oracle produced nothing; the test would be vacuous"
    assert out.stdout.rstrip("\n") == expected


def test_complete_rejects_positions_outside_the_file(tmp_path):
    source = tmp_path / "short.py"
    source.write_text("x = 1\n")
    out = subprocess.run(
        rotary_command("complete", str(source), "--line", "9"), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "outside" in out.stderr
