"""Servers the tests start on a port the OS picks (`--listen 127.0.0.1:0`, `lsp --tcp 127.0.0.1:0`),
held by the server from the start: the port is read from its "listening on" line, never chosen by a
test, freed, and hoped still free when the server binds it."""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile

# `rotary worker`: "listening on 127.0.0.1:PORT (...)"; `rotary lsp --tcp`: "listening on ('127.0.0.1', PORT)".
_WORKER = re.compile(r"listening on (\S+):(\d+)")
_LSP = re.compile(r"listening on \('([^']+)', (\d+)")


def wait_listening(proc: subprocess.Popen) -> tuple[str, int, str]:
    """Read `proc`'s stderr (text mode) to its "listening on" line: (host, port, the line). An
    AssertionError with what it printed if it ends before. Blocks until the line or the end."""
    seen = []
    while True:
        line = proc.stderr.readline()
        seen.append(line)
        found = _LSP.search(line) or _WORKER.search(line)
        if found:
            return found.group(1), int(found.group(2)), line
        if not line and proc.poll() is not None:
            raise AssertionError(f"never listened:\n{''.join(seen)}")


# A worker address nothing can ever listen on (/dev/null is no folder): a daemon given it gets no
# worker. Not a port assumed closed, which any process may take meanwhile.
UNREACHABLE = "unix:/dev/null/rotary-no-worker.sock"


@contextlib.contextmanager
def unix_address(name: str = "worker.sock"):
    """`unix:PATH` in a private temporary folder of its own, removed after: for a server whose address
    must be known before it starts. Under the system's temp folder, short, as a socket path must be."""
    with tempfile.TemporaryDirectory(prefix="rotary-") as folder:
        yield f"unix:{folder}/{name}"
