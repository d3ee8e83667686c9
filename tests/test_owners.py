"""The documented owner of each piece of state is its only writer (docs/ARCHITECTURE.md, Owners).

Read statically with `ast`, without importing anything: every module of the rotary package
(tests/test_architecture.py's list) is scanned for writes to another object's attribute
(`x.name = ...`, `x.name += ...`, `x.name: T = ...`, `del x.name`, `setattr(x, "name", ...)`;
an object's own `self.name = ...` in its own methods is its own business and not counted). For
each attribute below, only its owner's module may write it, and the Owners table of
docs/ARCHITECTURE.md names that owner in the row that names the attribute.

Shown by mutation: before the KV manager (cache/manager.py) existed, completion/engine.py set
`entry.dirty`, `entry.refresh_position` and `entry.pinned` and cache/store.py set `entry.pinned`
and `entry.dirty`; test_each_piece_of_state_has_one_writer failed naming those lines (run against
commit 6f8cb52). Putting `entry.dirty = True` back into completion/engine.py (by hand, then
removed) fails it again; test_the_scan_sees_every_kind_of_write checks the scan itself on such
mutations.
"""

from __future__ import annotations

import ast
import re

import pytest

from tests.test_architecture import ROOT, modules

# attribute -> the module that alone writes it (from outside the object that holds it)
OWNERS = {
    # a cache's flags (cache/store.py's DocumentKV): pinning, staleness and refresh, snapshots
    "pinned": "cache/manager.py",
    "dirty": "cache/manager.py",
    "refresh_position": "cache/manager.py",
    # a KVBuffer's ids and fill depths change with its tensors, through its methods
    "filled": "cache/buffer.py",
    "tokens": "cache/buffer.py",
    # a request on the model thread: its state and its prefill steps are the scheduler's ...
    "state": "completion/scheduler.py",
    "steps": "completion/scheduler.py",
    "deferred": "completion/scheduler.py",
    # ... its cache while it runs and its timing, the steps' (completion/steps.py)
    "entry": "completion/steps.py",
    "decode_started": "completion/steps.py",
}


def writes(source: str, filename: str = "<source>") -> list[tuple[str, int]]:
    """(attribute, line) of every write to another object's attribute in `source`."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif (
            isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr")
            and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) and isinstance(node.args[1].value, str)
        ):
            found.append((node.args[1].value, node.lineno))
            continue
        else:
            continue
        while targets:
            target = targets.pop(0)
            if isinstance(target, (ast.Tuple, ast.List)):  # `a.x, b.y = ...`
                targets.extend(target.elts)
            elif isinstance(target, ast.Starred):
                targets.append(target.value)
            elif isinstance(target, ast.Attribute) and not (isinstance(target.value, ast.Name) and target.value.id == "self"):
                found.append((target.attr, target.lineno))  # the outermost only: in `job.entry.pinned`, `entry` is read
    return sorted(found, key=lambda write: write[1])


def writers() -> dict[str, list[str]]:
    """attribute -> ["path:line", ...] of the rotary modules that write it."""
    out: dict[str, list[str]] = {}
    for path in modules().values():
        relative = path.relative_to(ROOT).as_posix()
        for attr, line in writes(path.read_text(), relative):
            if attr in OWNERS:
                out.setdefault(attr, []).append(f"{relative}:{line}")
    return out


def test_the_scan_sees_every_kind_of_write():
    mutated = (
        "entry.dirty = True\n"
        "job.entry.pinned = False\n"
        "entry.refresh_position += 64\n"
        "a.state, b.steps = 1, 2\n"
        "setattr(entry, 'pinned', True)\n"
        "del buffer.filled\n"
        "self.tokens = []\n"  # an object's own attribute: not another's
        "print(entry.dirty)\n"  # a read
    )
    assert writes(mutated) == [
        ("dirty", 1), ("pinned", 2), ("refresh_position", 3), ("state", 4), ("steps", 4), ("pinned", 5), ("filled", 6),
    ]


def test_each_piece_of_state_has_one_writer():
    wrong = {
        attr: [place for place in places if not place.startswith(OWNERS[attr] + ":")]
        for attr, places in writers().items()
    }
    wrong = {attr: places for attr, places in wrong.items() if places}
    assert not wrong, "written outside its owner (" + ", ".join(f"{a}: {OWNERS[a]}" for a in wrong) + "): " + repr(wrong)


def test_every_owner_writes_what_it_owns():
    """The table is not stale: each owner still writes each attribute it is said to own."""
    found = writers()
    missing = [attr for attr, owner in OWNERS.items() if not any(p.startswith(owner + ":") for p in found.get(attr, ()))]
    assert not missing, missing


@pytest.mark.parametrize("attr", sorted(OWNERS))
def test_the_owner_is_the_one_docs_architecture_names(attr):
    """A row of the Owners table names the attribute (in backticks) and its owner's module."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text[text.index("## Owners") :]
    rows = [line for line in table.splitlines() if line.startswith("|") and re.search(rf"`{attr}`", line)]
    assert any(f"`{OWNERS[attr]}`" in row for row in rows), f"no Owners row names `{attr}` with `{OWNERS[attr]}`"
