"""Whether a process is still there, by its id.

The KV store asks it of the writers of half-written snapshot files (store.py), the worker of its
parent (completion/server.py). Plain Python, so the worker's main thread asks it without
loading torch; in cache/, the lowest package that needs it.
"""

from __future__ import annotations

import os


def pid_alive(pid: int) -> bool:
    """Is process `pid` still there (also when it belongs to another user)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
