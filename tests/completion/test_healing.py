"""Token healing on the real model: suggestions fit the cursor character for character.

The engine's suggestions are compared with an independent oracle (tests/conftest.py:
transformers `generate` on the context the documented healing rule leaves, constrained by brute
force to write the typed text again first), its context with the oracle's, and a property test cuts real files at random points and checks that the text
before the cursor plus the suggestion neither repeats nor drops a character.
"""

from __future__ import annotations

import inspect
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import first_line, greedy_continuation, healed_split, rotary_engine

pytestmark = pytest.mark.model


engine = rotary_engine  # the session's one engine (tests/conftest.py)


def suggest(before: str, after: str = "", mode: str = "single_line", max_tokens: int = 32) -> str:
    from rotary.completion.engine import CompletionOptions

    options = CompletionOptions(max_tokens=max_tokens, mode=mode, cache_mode="none")
    return "".join(c.text for c in engine().complete("file:///heal.py", before + after, len(before), options))


BELOW = "\n\n\ndef main():\n    print(add(1, 2))\n"


HEALING_CASES = [
    ("def add(a, b):\n    ", BELOW),  # after Enter and auto-indent, code below
    ("import os\n\n\ndef read(path):\n    with open(path) as f:\n        ", "\n"),  # deeper indent
    ("class Stack:\n\tdef push(self, item):\n\t\t", "\n"),  # tabs
    ("def add(a, b):\r\n    ", "\r\n"),  # CRLF
    ("def total(xs):\n    result = 0\n    for x in xs:\n        result += x\n    retu", "\n"),  # mid-identifier
    ("import os\n\npath = os.", "\n"),  # after a dot
    ("def positive(n):\n    return n >", "\n"),  # after an operator
    ("def square(x):\n    return x * x\n\n\ndef cube(x):\n", "\n\nprint(cube(3))\n"),  # column 0, code below
]


@pytest.mark.parametrize("before, after", HEALING_CASES)
def test_the_model_sees_the_text_before_the_trailing_run(before, after):
    """The documented split (tests/conftest.py `healed_split`): the model sees the tokenizer's own tokens up to
    the trailing run of whitespace, word or operator characters, and the rest is written again.

    Mutation checks (2026-12-07): completion/prompt.py `heal_length` returning `min(taken, 1)` fails the
    "retu" case (" ret" + "u": the context keeps " ret"); returning one token more than the run needs
    fails the first case (the context loses "):")."""
    prompt = engine().build_context(before + after, len(before), 32)
    ids, heal = healed_split(before)
    assert (prompt.ids, prompt.heal) == (ids, heal)


@pytest.mark.parametrize("before, after", HEALING_CASES)
def test_suggestion_equals_independent_oracle(before, after):
    got = suggest(before, after)
    expected = greedy_continuation(before, 32, text_after=after)
    if "\n" in expected.lstrip("\r\n"):
        expected = expected[: len(expected) - len(expected.lstrip("\r\n"))] + first_line(expected.lstrip("\r\n"))
    assert expected.strip(), "the oracle produced nothing; the test would be vacuous"
    assert got == expected.rstrip()


@pytest.mark.parametrize(
    "before, indent",
    [
        ("def add(a, b):\n    ", "    "),
        ("import os\n\n\ndef read(path):\n    with open(path) as f:\n        ", "        "),
        ("class Stack:\n\tdef push(self, item):\n\t\t", "\t\t"),
    ],
)
def test_after_auto_indent_the_accepted_line_keeps_the_editors_indentation(before, indent):
    """The issue's defect: Enter after a block opener, accept the ghost text; the line must keep its indent."""
    suggestion = suggest(before, "\n", mode="auto")
    assert suggestion and not suggestion[0].isspace(), repr(suggestion)
    accepted_line = (before + suggestion).split("\n")[before.count("\n")]
    assert accepted_line.startswith(indent) and not accepted_line[len(indent)].isspace(), repr(accepted_line)


def test_column_zero_single_line_request_stays_on_its_line():
    suggestion = suggest("def square(x):\n    return x * x\n\n\ndef cube(x):\n", "\n\nprint(cube(3))\n")
    assert suggestion and suggestion[0] not in "\r\n"


def real_python_sources() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = ["textwrap.py", "shlex.py", "fnmatch.py", "bisect.py", "colorsys.py"]
    return [(stdlib / m).read_text() for m in modules if (stdlib / m).exists()] or [inspect.getsource(inspect)]


SOURCES = real_python_sources()


@settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, len(SOURCES) - 1), st.floats(0.05, 0.95))
def test_text_before_plus_suggestion_never_repeats_or_drops_a_character(source_index, where):
    """At any cut point: what the model saw plus what it generated is exactly the text before plus the suggestion."""
    from rotary.completion.engine import CompletionOptions

    source = SOURCES[source_index]
    cut = int(len(source) * where)
    start = max(0, source.rfind("\n", 0, max(0, cut - 600)) + 1)  # about 600 characters of context
    before, after = source[start:cut], source[cut:]
    eng = engine()
    runner = eng.runner
    uri = f"file:///cut-{source_index}-{cut}.py"
    prompt = eng.build_context(before + after, len(before), 6)
    assert not prompt.truncated
    # The context the model sees, plus the healed text, is exactly the text before the cursor.
    assert runner.decode_ids(prompt.ids) + prompt.heal == before
    options = CompletionOptions(max_tokens=6, mode="multi_line")
    visible = "".join(c.text for c in eng.complete(uri, before + after, len(before), options))
    # Everything run through the model (context, then generated tokens) reads as the text before the
    # cursor and then the suggestion: nothing repeated, nothing dropped at the boundary.
    fed = runner.decode_ids(eng.kv_store.get(uri).tokens.token_ids)
    eng.kv_store.drop(uri)
    common = min(len(fed), len(before))
    assert fed[:common] == before[:common], (before[-40:], fed[-60:])
    tail = fed[len(before) :]
    assert tail.startswith(visible) or visible.startswith(tail), (tail, visible)
