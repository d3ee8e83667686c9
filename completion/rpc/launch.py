"""How every Rotary process starts another Python process: never with the current folder on sys.path.

The repository's top-level folders (kernels/, models/, cache/, lsp/, completion/, tests/, editors/)
share their names with PyPI packages: transformers >= 5.25 imports the PyPI package `kernels`.
`python -m rotary` from the repository root would put the root first on sys.path, and the
repository's folder would shadow the installed package. Python's `-P` (3.11+, the same as
PYTHONSAFEPATH=1) leaves the current folder out, so workers, daemons and tests' subprocesses
import what is installed, wherever they are started from.

A worker started here is tied to its starter (`--parent-pid`): it exits when the starter is gone,
so not even a SIGKILL of the daemon, the demo or `rotary complete` leaves a worker behind.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

# Where `rotary worker` (and the demo's worker) listens unless told otherwise.
DEFAULT_LISTEN = "127.0.0.1:50151"


def python_command(*args: str) -> list[str]:
    """This interpreter, started without the current folder or the script's folder on sys.path."""
    return [sys.executable, "-P", *args]


def rotary_command(*args: str) -> list[str]:
    """The `rotary` command line (`rotary worker ...`, `rotary lsp ...`) in this interpreter."""
    return python_command("-m", "rotary", *args)


def worker_command(listen: str, model: str | None = None, log_level: str | None = None) -> list[str]:
    """`rotary worker` serving on `listen` for this process (it exits when this process is gone);
    `model`: a local model instead of the embedded one."""
    args = ["--log-level", log_level] if log_level else []
    args += ["worker", "--listen", listen, "--parent-pid", str(os.getpid())]
    if model:
        args += ["--model", model]
    return rotary_command(*args)


def spawn_worker(listen: str, model: str | None = None, log_level: str | None = None) -> subprocess.Popen:
    """Start `worker_command(...)` (stdin closed; its output goes where this process's goes)."""
    return subprocess.Popen(worker_command(listen, model, log_level), stdin=subprocess.DEVNULL)


def private_socket() -> tuple[str, str]:
    """(folder, address) of a unix socket in a new folder that only this user can enter (0700)."""
    folder = tempfile.mkdtemp(prefix="rotary-")
    os.chmod(folder, 0o700)
    return folder, f"unix:{folder}/worker.sock"
