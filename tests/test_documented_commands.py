"""README's commands that had no test of their own, each against what README says it does.

`rotary soak edits --sequences N` (0 lost edits, a JSON report), `rotary bench load` (1, 5 and 20
editors), the set-up's torch rule (the Makefile's own recipe, run against a stand-in venv), the
grpcurl commands' requests (each a valid request of the method it names; the offset the end of the
text), and `--model PATH` with a `.gguf` file and with a Hugging Face directory (`model`: the real
model, converted once into a fresh `$XDG_CACHE_HOME/rotary`).

Checked by mutation (by hand, then put back): `SIZES = (1, 5, 10)` in bench/load.py, and a Makefile
that installs torch whatever the venv has, each fail a test here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import textwrap
from pathlib import Path

import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2
from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.rpc.launch import rotary_command

from tests.test_documented_defaults import main_of_rotary

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def run_rotary(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        rotary_command(*args), stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        env=env or os.environ.copy(), check=False,
    )


# -- rotary soak edits ----------------------------------------------------------------------------------


def test_rotary_soak_edits_runs_sequences_and_reports_no_lost_edit(tmp_path):
    """README Commands: `rotary soak edits --sequences N`: "random edit sequences, 0 lost edits expected";
    the command line runs that many sequences and says so, on stdout and in `--json PATH`."""
    report_path = tmp_path / "soak.json"
    result = run_rotary("soak", "edits", "--sequences", "3", "--seed", "1", "--json", str(report_path))
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["sequences"] == 3 and report["edits_applied"] > 0
    assert report["lost_or_misapplied"] == 0 and report["failure"] is None
    assert json.loads(result.stdout)["lost_or_misapplied"] == 0


# -- rotary bench load ------------------------------------------------------------------------------------


def test_rotary_bench_load_runs_1_5_and_20_editors(monkeypatch, capsys):
    """README Commands: `rotary bench load`: "1, 5 and 20 editors typing at once against one worker". The
    command line, stopped before its first worker starts, announces those sizes; the run itself is the
    quick smoke run's (tests/test_bench_smoke.py) and, in full, on demand (docs/BENCHMARKS.md)."""

    class Stopped(Exception):
        pass

    def stop_here(*args, **kwargs):
        raise Stopped

    monkeypatch.setattr("rotary.bench.load.make_sessions", stop_here)
    with pytest.raises(Stopped):
        main_of_rotary(monkeypatch, ["bench", "load"])
    assert re.search(r"load: N = \[1, 5, 20\] editors .*full", capsys.readouterr().err)


# -- the set-up's torch rule --------------------------------------------------------------------------------


STAND_IN_PYTHON = """\
#!/usr/bin/env bash
# A stand-in for the venv's python: `-c "import torch"` as $HAS_TORCH says; `-m pip ...` is logged.
if [ "$1" = -c ]; then [ "$2" = "import torch" ] && exit "$HAS_TORCH"; exit 0; fi
if [ "$1" = -m ] && [ "$2" = pip ]; then echo "${@:3}" >> "$PIP_LOG"; exit 0; fi
exit 3
"""


@pytest.mark.parametrize("has_torch", [False, True])
def test_the_set_up_installs_torch_only_when_the_venv_has_none(tmp_path, has_torch):
    """README Two commands: "torch: `torch==2.13.0` (a CPU build) only when the venv has no torch; a venv
    with your own CUDA torch keeps it". The Makefile's install recipe, run for a stand-in venv whose
    python answers `import torch` as told and logs every pip command (nothing is installed)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(STAND_IN_PYTHON)
    python.chmod(0o755)
    log = tmp_path / "pip.log"
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), f"VENV={venv}", f"{venv}/.rotary-installed"],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "HAS_TORCH": "0" if has_torch else "1", "PIP_LOG": str(log)},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    installs = [line for line in log.read_text().splitlines() if line.split()[-2:] == ["-r", "lock/torch.txt"]]
    assert len(installs) == (0 if has_torch else 1), log.read_text()
    pins = [line.split()[0] for line in (ROOT / "lock" / "torch.txt").read_text().splitlines() if line.startswith("torch==")]
    assert pins == ["torch==2.13.0+cpu"]  # the CPU build of 2.13.0
    assert "--require-hashes" in log.read_text() and "--no-deps" in log.read_text()


# -- the grpcurl commands -------------------------------------------------------------------------------------


def grpcurl_commands() -> list[list[str]]:
    """README's grpcurl block, one argument list per grpcurl command (continuation lines joined)."""
    block = README.read_text().split("The same steps with [grpcurl]", 1)[1]
    block = block.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        while "grpcurl" in words:  # `until grpcurl ... | grep ...; do ...`: from grpcurl to the pipe
            words = words[words.index("grpcurl"):]
            end = next((i for i, w in enumerate(words) if w in ("|", ";")), len(words))
            commands.append(words[:end])
            words = words[end:]
    return commands


def test_the_grpcurl_commands_ask_for_what_the_worker_serves():
    """README gRPC: the grpcurl commands (not run: grpcurl is not part of the set-up). Each names a
    message or method the worker serves, each request body is a valid request of its method, and "the
    offset counts code points, so 22 is the end of this text" holds."""
    commands = grpcurl_commands()
    assert len(commands) == 4, commands
    pool = {
        "rotary.v1.Worker": (pb.DESCRIPTOR.services_by_name["Worker"], pb),
        "grpc.health.v1.Health": (health_pb2.DESCRIPTOR.services_by_name["Health"], health_pb2),
    }
    described = [c[c.index("describe") + 1] for c in commands if "describe" in c]
    assert described == ["rotary.v1.CompleteTextRequest"] and "CompleteTextRequest" in pb.DESCRIPTOR.message_types_by_name
    bodies = {}
    for words in commands:
        assert words[1] == "-plaintext" and "127.0.0.1:50151" in words
        if "-d" not in words:
            continue
        service, method = words[-1].rsplit("/", 1)
        descriptor, module = pool[service]
        request_type = getattr(module, descriptor.methods_by_name[method].input_type.name)
        bodies[method] = json_format.Parse(words[words.index("-d") + 1], request_type())
    assert bodies["Check"].service == "rotary.v1.Worker"
    request = bodies["CompleteText"]
    assert request.text == "def fibonacci(n):\n    " and request.language_id == "python"
    assert request.offset == len(request.text) == 22


# -- --model PATH: a .gguf file, a Hugging Face directory --------------------------------------------------------


@pytest.mark.model
def test_model_takes_a_gguf_file_prepared_once_and_cached_and_a_hugging_face_directory(tmp_path, shared_worker):
    """README: "`--model PATH` takes any local Hugging Face causal-LM directory with RoPE (config.json +
    weights) or a local `.gguf` file (prepared once and cached; its weights are read from the file at
    every load, no copy)", and the first run prepares into `$XDG_CACHE_HOME/rotary`. The embedded
    model's own .gguf, given to `--model` with a fresh cache: the first `prepare-model` prepares it
    there, without weights, the second finds it; `rotary complete --model FILE.gguf` (a worker of its
    own) prepares nothing more and completes; the session's shared worker, started with
    `rotary worker --model DIR` on the embedded model's prepared folder (tests/conftest.py),
    completes the same text (the same weights)."""
    from rotary.models.loader import find_default_gguf

    gguf = find_default_gguf()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    first = run_rotary("prepare-model", "--model", str(gguf), env=env)
    assert first.returncode == 0 and "preparing" in first.stderr, first.stderr
    converted = Path(first.stdout.strip().splitlines()[-1])
    assert converted.parent == tmp_path / "cache" / "rotary" / "models" and (converted / "config.json").is_file()
    assert not [p.name for p in converted.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf")]  # no copy of the weights
    second = run_rotary("prepare-model", "--model", str(gguf), env=env)
    assert second.returncode == 0 and "preparing" not in second.stderr
    assert Path(second.stdout.strip().splitlines()[-1]) == converted

    source = tmp_path / "sample.py"
    source.write_text(textwrap.dedent("""\
        def fibonacci(n):
            if n < 2:
                return n
            return
        """))
    result = run_rotary("complete", str(source), "--line", "4", "--model", str(gguf), env=env)
    assert result.returncode == 0, result.stderr
    assert "preparing" not in result.stderr and result.stdout.strip()
    assert sorted(p.name for p in converted.parent.iterdir()) == [converted.name]  # prepared once, found again

    from rotary.models.loader import resolve_model_dir

    assert (resolve_model_dir(None) / "config.json").is_file()  # what the shared worker was given: a folder
    through_directory = run_rotary("complete", str(source), "--line", "4", "--worker", shared_worker.address)
    assert through_directory.returncode == 0, through_directory.stderr
    assert result.stdout == through_directory.stdout
