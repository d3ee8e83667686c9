"""Test generation on the real model, in-process: greedy output is the same with every drafter (lossless),
the drafters save forward passes, and sampling is reproducible from its seed; a C++ focal function takes the
same path."""

from __future__ import annotations


import pytest

from tests.conftest import rotary_engine

pytestmark = pytest.mark.model

SOURCE = '''class Solution:
    def addDigits(self, num: int) -> int:
        """Add the digits of num until one digit is left."""
        while num >= 10:
            num = sum(int(d) for d in str(num))
        return num
'''


engine = rotary_engine  # the session's one engine (tests/conftest.py)


def generate(drafter: str, **kwargs):
    from rotary.testgen.focal import find_focal
    from rotary.testgen.generate import generate_tests

    focal = find_focal("solution.py", SOURCE, "Solution.addDigits")
    return list(generate_tests(engine(), focal, count=3, max_tokens=40, drafter=drafter, **kwargs))


def test_greedy_tests_are_identical_with_every_drafter():
    plain = generate("plain")
    assert len(plain) == 3 and all(t.body.strip() for t in plain), [t.code for t in plain]
    assert plain[0].code.startswith("def test_addDigits_1():\n    # a typical input\n    solution = Solution()")
    forwards = {"plain": sum(t.stats.forwards for t in plain)}
    for drafter in ("ngram", "ast", "ast+ngram"):
        tests = generate(drafter)
        assert [t.code for t in tests] == [t.code for t in plain], drafter
        forwards[drafter] = sum(t.stats.forwards for t in tests)
        if drafter.startswith("ast"):
            assert any(d.source == "ast" and d.kept for t in tests for d in t.drafts), drafter
    assert forwards["ast"] < forwards["plain"] and forwards["ast+ngram"] < forwards["plain"], forwards


def test_sampling_is_reproducible_and_drafts_are_verified():
    first = generate("ast+ngram", temperature=0.8, seed=3)
    again = generate("ast+ngram", temperature=0.8, seed=3)
    assert [t.code for t in first] == [t.code for t in again]
    assert sum(t.stats.tokens_drafted for t in first) > 0


CPP = '''int add(int a, int b) {
    return a + b;
}
'''


def test_cpp_tests_take_the_same_path():
    from rotary.testgen.focal import find_focal
    from rotary.testgen.generate import generate_tests

    focal = find_focal("calc.cpp", CPP, "add")
    plain = list(generate_tests(engine(), focal, count=2, max_tokens=32, drafter="plain"))
    drafted = list(generate_tests(engine(), focal, count=2, max_tokens=32, drafter="ast+ngram"))
    assert plain[0].code.startswith("TEST(calcTest, add_1) {\n    // a typical input\n    EXPECT_EQ"), plain[0].code
    assert [t.code for t in drafted] == [t.code for t in plain]
    assert sum(t.stats.forwards for t in drafted) < sum(t.stats.forwards for t in plain)


def test_generated_tests_are_not_remembered_as_completions():
    """Test generation's drafters keep their own state: its tests never enter the engine's n-gram
    sources (it calls complete_prompt with remember=False), as when it built its own Job without
    sources. Fails with remember=True (checked by flipping it in testgen/generate.py)."""
    recent = engine().sources._recent  # the session's recent completions (drafters.TokenSources)
    before = list(recent)
    generate("ast+ngram")
    assert list(recent) == before
