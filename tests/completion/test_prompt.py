"""Token healing's boundaries on the real tokenizer (no model forward): what is taken back, and what may follow.

Each boundary class where users type: after indentation (spaces, tabs), mid-identifier,
mid-number, after an operator or a dot, at column 0 of an empty line, with CRLF.
"""

from __future__ import annotations

import pytest

from rotary.completion.prompt import (
    NO_LINE_BREAK,
    NO_WHITESPACE,
    HealingConstraint,
    Vocabulary,
    forbidden_after,
    heal_length,
    line_prefix,
    trailing_run_start,
)
from tests.conftest import reference_token_texts, reference_tokenizer

tokenizer = reference_tokenizer  # the session's tokenizer and token texts (tests/conftest.py)
token_texts = reference_token_texts


def healed(text_before: str) -> str:
    tok = tokenizer()
    ids = tok.encode(text_before, add_special_tokens=False)
    cut = heal_length(ids, text_before, lambda i: token_texts()[i], frozenset(tok.all_special_ids))
    return "".join(token_texts()[i] for i in ids[len(ids) - cut :])


@pytest.mark.parametrize(
    "text_before, must_cover",
    [
        ("def add(a, b):\n    ", "\n    "),  # after indentation (spaces)
        ("class A:\n\tdef f(self):\n\t\t", "\n\t\t"),  # after indentation (tabs)
        ("def add(a, b):\r\n    ", "\r\n    "),  # CRLF
        ("def f(xs):\n    total = 0\n    for x in xs:\n        total += x\n    retu", "retu"),  # mid-identifier
        ("config = load_configuration_fr", "load_configuration_fr"),  # identifier of several tokens
        ("timeout = 120", "120"),  # mid-number (this tokenizer writes one token per digit)
        ("import os\npath = os.", "."),  # after a dot
        ("if count >", ">"),  # after an operator
        ("x = 1\n", "\n"),  # column 0 of an empty line
        ("x = 1\n\n\n", "\n\n\n"),  # several blank lines
    ],
)
def test_healing_takes_back_the_whole_trailing_run(text_before, must_cover):
    heal = healed(text_before)
    assert text_before.endswith(heal), "the healed text is the end of the text before the cursor"
    assert heal.endswith(must_cover) and len(heal) >= len(must_cover), (heal, must_cover)


def test_healing_never_takes_the_whole_context_or_a_long_word():
    assert healed("x") == ""  # one token: nothing to take back
    long_name = "a_" * 60
    heal = healed("value = " + long_name)
    assert 0 < len(heal) <= 48


def test_trailing_run_classes():
    assert trailing_run_start("abc  ") == 3
    assert trailing_run_start("x.foo_bar1") == 2
    assert trailing_run_start("a >= ") == 4
    assert trailing_run_start("a >=") == 2
    assert trailing_run_start("") == 0


@pytest.mark.parametrize(
    "before, after, forbidden",
    [
        ("def f():\n    ", "", NO_WHITESPACE),  # after auto-indentation, nothing after the cursor
        ("def f():\n    ", "\n    return 1\n", NO_WHITESPACE),  # code below the cursor
        ("def f():\n\t", "\n", NO_WHITESPACE),
        ("x = 1\n", "\ny = 2\n", NO_LINE_BREAK),  # column 0 of an empty line
        ("x = 1\r\n", "", NO_LINE_BREAK),
        ("x = foo", "\n", ""),  # mid-line: anything may follow
        ("    ", "x = 1\n", ""),  # text after the cursor on the line: it is not an empty line
        ("", "", ""),  # empty document
        # A lone \r ends a line too (LSP), after the cursor as before it. Both failed before the fix
        # (2026-12-07): the text after the cursor was cut at "\n" only, so the next lines counted as
        # code on the cursor's line.
        ("def f():\r    ", "\r    return 1\r", NO_WHITESPACE),
        ("x = 1\r", "\ry = 2\r", NO_LINE_BREAK),
    ],
)
def test_what_may_follow_the_healed_text(before, after, forbidden):
    assert forbidden_after(before, after) == forbidden


def test_line_prefix_counts_every_lsp_line_break():
    assert line_prefix("a\nb") == "b"
    assert line_prefix("a\r\n  ") == "  "
    assert line_prefix("a\r  ") == "  "


def test_vocabulary_allows_prefixes_and_covers_of_the_healed_text():
    texts = ["\n", "\n   ", "\n    ", "\n        ", " return", "return", "re", "x", "<s>", "\ufffd"]
    vocab = Vocabulary(texts, excluded=frozenset({8}))
    allowed = {texts[i] for i in vocab.allowed("\n    ", "")}
    assert allowed == {"\n", "\n   ", "\n    ", "\n        "}
    # After indentation: a token that covers the healed text may not add whitespace.
    allowed = {texts[i] for i in vocab.allowed("\n    ", NO_WHITESPACE)}
    assert allowed == {"\n", "\n   ", "\n    "}
    # "\n   " generated, " " remains: " return" covers it and goes on with a non-space.
    assert {texts[i] for i in vocab.allowed(" ", NO_WHITESPACE)} == {" return"}
    # Just covered: the next token must not start with whitespace; special and partial tokens never.
    assert {texts[i] for i in vocab.allowed("", NO_WHITESPACE)} == {"return", "re", "x"}


def test_constraint_ends_once_the_healed_text_is_covered():
    c = HealingConstraint("\n    ", NO_WHITESPACE)
    assert c.remaining("") == "\n    "
    assert c.remaining("\n   ") == " "
    assert c.remaining("\n    ") == ""  # covered, but the next character is still ruled
    assert c.remaining("\n    r") is None
    assert c.visible("\n    return") == "return"
    assert c.visible("\n   ") == ""
    free = HealingConstraint("ba", "")
    assert free.remaining("ba") is None and free.visible("bar") == "r"
