"""How every Rotary process starts another Python process: never with the current folder on sys.path.

The repository's top-level folders (kernels/, models/, cache/, lsp/, completion/, tests/, editors/)
share their names with PyPI packages: transformers >= 5.25 imports the PyPI package `kernels`.
`python -m rotary` from the repository root would put the root first on sys.path, and the
repository's folder would shadow the installed package. Python's `-P` (3.11+, the same as
PYTHONSAFEPATH=1) leaves the current folder out, so workers, daemons and tests' subprocesses
import what is installed, wherever they are started from.
"""

from __future__ import annotations

import sys


def python_command(*args: str) -> list[str]:
    """This interpreter, started without the current folder or the script's folder on sys.path."""
    return [sys.executable, "-P", *args]


def rotary_command(*args: str) -> list[str]:
    """The `rotary` command line (`rotary worker ...`, `rotary lsp ...`) in this interpreter."""
    return python_command("-m", "rotary", *args)
