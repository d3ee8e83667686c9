"""Nothing leaves the machine: the embedded model is prepared and completes with no network at all.

README: "nothing is fetched from a model hub, nothing leaves the machine". Two layers check it:
- the commands run in a network namespace of their own (`unshare -rn`: no interface but a loopback
  that is down), so anything that needs the network fails, and the completion with it;
- every Python process they start (the CLI, its worker) records each socket connect and name lookup
  through an audit hook (a sitecustomize on PYTHONPATH, inherited by the worker): only unix sockets
  may appear. That also catches an attempt whose failure some library would swallow.

A control shows the hook sees what it must: a process that looks up a hub's name under the same
environment leaves a `socket.getaddrinfo` line in the log.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from rotary.completion.rpc.launch import python_command, rotary_command
from tests.conftest import first_line, greedy_continuation

AUDIT = '''
import os, socket, sys

_log = os.environ["ROTARY_TEST_NETWORK_LOG"]

def _hook(event, args):
    if event == "socket.connect":
        line = f"connect {socket.AddressFamily(args[0].family).name} {args[1]!r}"
    elif event in ("socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr", "socket.sendto"):
        line = f"{event} {args[:2]!r}"
    else:
        return
    with open(_log, "a") as f:
        f.write(f"{os.getpid()} {line}\\n")

with open(_log, "a") as f:
    f.write(f"{os.getpid()} started {sys.argv[1:3]!r}\\n")
sys.addaudithook(_hook)
'''


def _without_network() -> list[str]:
    if shutil.which("unshare") and subprocess.run(["unshare", "-rn", "true"], capture_output=True).returncode == 0:
        return ["unshare", "-rn"]
    return []


@pytest.mark.model
def test_prepare_and_complete_with_no_network(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(AUDIT)
    log = tmp_path / "network.log"
    env = {**os.environ, "PYTHONPATH": str(site), "ROTARY_TEST_NETWORK_LOG": str(log),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}  # a cache of its own: the model is converted in here too
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.pop(name, None)  # Rotary must set what it needs itself
    namespace = _without_network()

    prepared = subprocess.run([*namespace, *rotary_command("prepare-model")], env=env, capture_output=True,
                              text=True, timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert Path(prepared.stdout.strip().splitlines()[-1]).is_relative_to(tmp_path / "cache")

    source = tmp_path / "example.py"
    text = "def area(width, height):\n    return width"
    source.write_text(text)
    completed = subprocess.run(
        [*namespace, *rotary_command("--log-level", "warning", "complete", str(source), "--line", "2",
                                     "--mode", "single_line", "--max-tokens", "16")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    expected = first_line(greedy_continuation(text, 16))
    assert expected.strip() and completed.stdout.rstrip("\n") == expected

    events = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    # the hook ran in the CLI and in the worker it started (else the check below would be vacuous)
    assert any(e.startswith("started ['--log-level', 'warning']") for e in events), events
    assert any(e.startswith("started ['worker'") for e in events), events
    leaving = [e for e in events if not e.startswith(("started ", "connect AF_UNIX "))]
    assert not leaving, leaving

    control = "import socket\ntry:\n    socket.getaddrinfo('huggingface.co', 443)\nexcept OSError:\n    pass"
    subprocess.run([*namespace, *python_command("-c", control)], env=env, timeout=60)
    assert any("socket.getaddrinfo ('huggingface.co', 443)" in line for line in log.read_text().splitlines())
