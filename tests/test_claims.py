"""Every claim backed: docs/CLAIMS.md lists README's and docs/RELIABILITY.md's claims with the tests
that check them, and every test named there, or in docs/RELIABILITY.md, exists.

"Exists" means pytest collects it: the file is there and `pytest --collect-only` lists the node id
(parametrized ids count without their `[...]`). One collection run in a subprocess, no model.
`test_the_check_reports_missing_and_malformed_names` shows the check fails on a table naming a test
that does not exist.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from rotary.completion.rpc.launch import python_command

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = ROOT / "docs" / "CLAIMS.md"
RELIABILITY = ROOT / "docs" / "RELIABILITY.md"

NODE_ID = re.compile(r"tests/[\w/]+\.py::\w+")
TEST_FILE = re.compile(r"tests/[\w/]+\.py")
HEADER = re.compile(r"^\|\s*claim\s*\|\s*where\s*\|\s*tests\s*\|\s*$")


def claim_rows(text: str) -> list[tuple[str, list[str]]]:
    """The rows of the `| claim | where | tests |` table: (the row's claim and place, its tests cell split
    on `; `, each entry with its backticks removed). Raises ValueError when there is no such table."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if HEADER.match(line)), None)
    if start is None:
        raise ValueError("no `| claim | where | tests |` table")
    rows = []
    for line in lines[start + 2 :]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        claim, tests = line.strip().strip("|").rsplit("|", 1)  # the tests cell is the last one
        rows.append((claim.strip(), [entry.strip().strip("`") for entry in tests.split(";") if entry.strip()]))
    return rows


def claim_problems(rows: list[tuple[str, list[str]]], collected: set[str]) -> list[str]:
    """What is wrong with the rows: a row with no test, an entry that is no `tests/path.py::name`,
    a name whose file is missing or that pytest did not collect."""
    problems = []
    for claim, tests in rows:
        if not tests:
            problems.append(f"{claim}: names no test")
        for test in tests:
            if not NODE_ID.fullmatch(test):
                problems.append(f"{claim}: {test!r} is not tests/path.py::test_name")
            elif not (ROOT / test.split("::")[0]).is_file():
                problems.append(f"{claim}: {test}: no such file")
            elif test not in collected:
                problems.append(f"{claim}: {test}: no such test (pytest did not collect it)")
    return problems


def reliability_references(text: str) -> tuple[set[str], set[str]]:
    """The full node ids docs/RELIABILITY.md names, and the bare test names (`test_x`, `::test_x`,
    `...::test_x`, which refer to a file named nearby)."""
    full = set(NODE_ID.findall(text))
    bare = set(re.findall(r"(?:`|(?<![\w.])\.{0,3}::)(test_\w+)\b", text))
    return full, bare - {node.split("::")[1] for node in full}


def collect(files: list[str]) -> set[str]:
    """Node ids pytest collects from these files, parameters stripped."""
    result = subprocess.run(
        python_command("-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files),
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    ids = {line.split("[")[0] for line in result.stdout.splitlines() if "::" in line}
    assert result.returncode == 0 and ids, f"collection failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return ids


@pytest.fixture(scope="module")
def collected() -> set[str]:
    rows = claim_rows(CLAIMS.read_text())
    named = {test.split("::")[0] for _, tests in rows for test in tests if NODE_ID.fullmatch(test)}
    named |= set(TEST_FILE.findall(RELIABILITY.read_text()))
    named.add("tests/test_claims.py")  # for the check's own unit test below
    return collect(sorted(f for f in named if (ROOT / f).is_file()))


def test_every_claim_names_tests_that_exist(collected):
    rows = claim_rows(CLAIMS.read_text())
    assert len(rows) >= 40, f"docs/CLAIMS.md's table parsed to {len(rows)} rows"
    problems = claim_problems(rows, collected)
    assert not problems, "docs/CLAIMS.md names tests that do not exist:\n  " + "\n  ".join(problems)


def test_every_test_named_in_reliability_exists(collected):
    full, bare = reliability_references(RELIABILITY.read_text())
    assert full and bare
    problems = [f"{node}: no such test" for node in sorted(full - collected)]
    names = {node.split("::")[1] for node in collected}
    problems += [f"`{name}`: no test of that name in the files docs/RELIABILITY.md names (or a path without tests/)" for name in sorted(bare - names)]
    assert not problems, "docs/RELIABILITY.md names tests that do not exist:\n  " + "\n  ".join(problems)


def test_the_check_reports_missing_and_malformed_names(collected):
    """The check can fail: a table naming a test that is not there, a file that is not there, an entry
    that is no node id and a row without a test is reported, row by row; the real name passes."""
    table = "\n".join([
        "| claim | where | tests |",
        "| --- | --- | --- |",
        "| real | README.md | `tests/test_claims.py::test_the_check_reports_missing_and_malformed_names` |",
        "| `a|b` in a cell | README.md | `tests/test_claims.py::test_no_such_test`; `tests/test_claims.py::claim_rows` |",
        "| gone | README.md | `tests/no_such_file.py::test_x` |",
        "| vague | README.md | the soak |",
        "| none | README.md | |",
        "",
        "| claim | where | tests |",  # a second table is not read
    ])
    rows = claim_rows(table)
    assert [claim.split("|")[0].strip() for claim, _ in rows] == ["real", "`a", "gone", "vague", "none"]
    problems = claim_problems(rows, collected)
    assert problems == [
        "`a|b` in a cell | README.md: tests/test_claims.py::test_no_such_test: no such test (pytest did not collect it)",
        "`a|b` in a cell | README.md: tests/test_claims.py::claim_rows: no such test (pytest did not collect it)",
        "gone | README.md: tests/no_such_file.py::test_x: no such file",
        "vague | README.md: 'the soak' is not tests/path.py::test_name",
        "none | README.md: names no test",
    ]
    with pytest.raises(ValueError):
        claim_rows("no table here")
    full, bare = reliability_references("`tests/a.py::test_one`, `::test_two`, ...::test_three and `test_four`; tests/b.py")
    assert full == {"tests/a.py::test_one"} and bare == {"test_two", "test_three", "test_four"}
