"""The engine against the independent oracle in every mode the single-line tests leave out.

Each test completes through the engine in-process (prompt, healing, cache, speculative
decoding, stop rules) and compares with plain transformers greedy decoding
(tests/conftest.py `greedy_continuation`) cut by the documented stop rule, which each
test states here as a function of its own, written from the documentation
(completion/stops.py's docstring, docs/ARCHITECTURE.md) and not from the code:

- multi-line: the block ends before the first later line that leaves it, or at a blank
  line at top level;
- text after the cursor on the same line: the suggestion never repeats it;
- a context longer than the window: the model sees the last tokens only, the window
  starting on a 256-token hop (docs/ARCHITECTURE.md step 4; tests/conftest.py `oracle_prompt`).

Whether the cursor's line opens a block is decided by Python's own grammar (`ast`), not by
a list of opener strings, so the cases are real Python whose block structure is known.

Every comparison also asserts that the oracle's answer is not empty, so a reply of nothing
can never pass for an oracle of nothing.
"""

from __future__ import annotations

import ast
import functools

import pytest

from tests.conftest import greedy_continuation, oracle_prompt, reference_model, rotary_engine, rotary_runner

pytestmark = pytest.mark.model


@functools.lru_cache(maxsize=4)
def engine(max_context_tokens: int = 2048):
    """The session's engine (tests/conftest.py), or one with a smaller window on the session's runner."""
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine

    if max_context_tokens == 2048:
        return rotary_engine()
    return CompletionEngine(rotary_runner(), KVStore(), max_context_tokens=max_context_tokens)


def suggest(before: str, after: str, mode: str, max_tokens: int, max_context_tokens: int = 2048) -> str:
    from rotary.completion.engine import CompletionOptions

    options = CompletionOptions(max_tokens=max_tokens, mode=mode, cache_mode="none")
    chunks = engine(max_context_tokens).complete(None, before + after, len(before), options)
    return "".join(c.text for c in chunks)


# -- the documented rules, stated here ----------------------------------------------------

def parses(source: str) -> bool:
    try:
        ast.parse(source)
    except SyntaxError:
        return False
    return True


def opens_block(before: str) -> bool:
    """The cursor ends a block opener ("such as def f():"): its line has code, and Python's grammar
    wants an indented block after it: the text before the cursor does not parse as it is, and does
    with a more indented statement on the next line."""
    cursor_line = before.split("\n")[-1]
    deeper = cursor_line[: len(cursor_line) - len(cursor_line.lstrip())] + "    pass"
    return bool(cursor_line.strip()) and not parses(before) and parses(before + "\n" + deeper)


def width(line: str) -> int:
    """Indentation width: a space counts 1, a tab 4."""
    n = 0
    for ch in line:
        if ch not in " \t":
            break
        n += 4 if ch == "\t" else 1
    return n


def end_of_block(raw: str, before: str) -> str | None:
    """Multi-line rule: the suggestion ends before the first later line that leaves the cursor's block.

    A line leaves the block when it has content and is indented less than the cursor's line,
    or, when the cursor ends a block opener, not more than that line; at top level (cursor's
    line not indented, no opener) a blank line after some content ends it too. Returns None
    when the raw text never ends the block (the budget or end of sequence decides instead).
    """
    cursor_line = before.split("\n")[-1]
    opener = opens_block(before)
    base = width(cursor_line)
    lines = raw.split("\n")
    for i in range(1, len(lines)):
        line, finished = lines[i], i < len(lines) - 1
        if line.strip():
            if width(line) < base or (opener and width(line) <= base):
                return "\n".join(lines[:i]).rstrip()
        elif finished and base == 0 and not opener and any(l.strip() for l in lines[:i]):
            return "\n".join(lines[:i]).rstrip()
    return None


def without_text_after(raw: str, after: str) -> str | None:
    """Rule for text after the cursor on its line: one line, and when that line ends with the
    text after the cursor, that text is cut off (it is already there). None while the line is
    unfinished in the raw text."""
    rest_of_line = after.split("\n", 1)[0].strip()
    if "\n" not in raw:
        return None
    line = raw.split("\n", 1)[0].rstrip()
    if rest_of_line and line.endswith(rest_of_line):
        line = line[: len(line) - len(rest_of_line)].rstrip()
    return line


def one_line(raw: str) -> str:
    """Single-line rule: up to the first line break after some non-blank text (leading line breaks
    kept), or all of it when the token budget or the end of sequence comes first."""
    body = raw.lstrip("\r\n")
    return (raw[: len(raw) - len(body)] + body.split("\n", 1)[0]).rstrip()


# -- multi-line ---------------------------------------------------------------------------

MULTI_LINE_CASES = [
    # A block opener ends the text, nothing after: auto mode goes multi-line; the two-line body ends at
    # the next def (auto mode taking this line for no opener would end after its first line).
    ("def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):", "", "auto", 24),
    # After the editor's auto-indent inside a method: the block ends at the dedent.
    ("class Point:\n    def __init__(self, x, y):\n        ", "\n", "multi_line", 32),
    # Column 0 at top level: auto goes multi-line and a blank line ends the suggestion.
    ("x = 1\ny = 2\n", "\n", "auto", 24),
]


@pytest.mark.parametrize("before, after, mode, max_tokens", MULTI_LINE_CASES)
def test_multi_line_suggestion_equals_the_oracle_cut_at_the_end_of_the_block(before, after, mode, max_tokens):
    """Mutation check (2026-12-07): ":" taken out of completion/stops.py BLOCK_OPENERS fails the first case
    (auto mode then ends the suggestion after "self.x = x")."""
    raw = greedy_continuation(before, max_tokens, text_after=after)
    expected = end_of_block(raw, before)
    assert expected is not None, f"the oracle's block does not end within {max_tokens} tokens: {raw!r}; pick another case"
    assert expected.strip(), f"the oracle's block is empty ({raw!r}); the test would be vacuous"
    got = suggest(before, after, mode, max_tokens)
    assert got == expected


# -- text after the cursor on the same line -----------------------------------------------

SUFFIX_CASES = [
    ("names = ['a', 'b']\nfor i, name in enumerate(", "):\n    print(i, name)\n"),
    ('def greet(name):\n    print("Hello, " + ', ")\n"),
]


@pytest.mark.parametrize("before, after", SUFFIX_CASES)
@pytest.mark.parametrize("mode", ["auto", "multi_line"])
def test_text_after_the_cursor_is_never_repeated(before, after, mode):
    """Whatever the mode, text after the cursor on its line makes it a one-line suggestion without that text."""
    raw = greedy_continuation(before, 24, text_after=after)
    expected = without_text_after(raw, after)
    assert expected is not None, f"the oracle's line does not end within 24 tokens: {raw!r}"
    assert expected.strip(), f"the oracle produced nothing on the line ({raw!r}); the test would be vacuous"
    rest_of_line = after.split("\n", 1)[0].strip()
    assert raw.split("\n", 1)[0].rstrip().endswith(rest_of_line), "the case must exercise the cut"
    got = suggest(before, after, mode, 24)
    assert got == expected


# -- a context longer than the window -------------------------------------------------------

LEDGER = (
    "from dataclasses import dataclass\n\n\n@dataclass\nclass Invoice:\n    customer: str\n    amount_cents: int\n"
    "    paid: bool = False\n\n\n"
    + "".join(
        f'def rule_{i}(invoice):\n    """Rule {i} of the ledger."""\n    return invoice.amount_cents > {i * 100}\n\n\n'
        for i in range(14)
    )
)


@pytest.mark.parametrize(
    "tail, outside_matters",
    [
        # The class definition is outside the window: the model no longer knows Invoice's fields.
        ('def describe(invoice):\n    return f"{invoice.', True),
        ("def total_due(invoices):\n    return sum(", False),
    ],
)
def test_a_context_longer_than_the_window_completes_from_the_window(tail, outside_matters):
    """max_context_tokens 300 and 16 new tokens: at most 284 context tokens, the window on a 256 hop.

    Mutation check (2026-12-07): completion/prompt.py WINDOW_HOP = 255 fails it (the window starts a
    token early)."""
    before = LEDGER + tail
    max_context, max_tokens = 300, 16
    window = max_context - max_tokens
    _, tokenizer = reference_model()
    assert len(tokenizer.encode(before, add_special_tokens=False)) > window + 128, "the text must not fit the window"
    prompt = engine(max_context).build_context(before, len(before), max_tokens)
    assert prompt.truncated and 0 < len(prompt.ids) <= window
    assert (prompt.ids, prompt.heal) == oracle_prompt(before, window=window)

    expected = one_line(greedy_continuation(before, max_tokens, window=window))
    assert expected, "the oracle produced nothing on the line; the test would be vacuous"
    if outside_matters:  # so this comparison fails if the engine saw the whole text
        assert one_line(greedy_continuation(before, max_tokens)) != expected
    assert suggest(before, "", "single_line", max_tokens, max_context_tokens=max_context) == expected
