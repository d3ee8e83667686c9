"""Line-pattern mining (tree-sitter, per language) and the pattern drafter, on fixtures, without a model.

The drafter is driven by a character-level tokenizer and an oracle that knows the text the model
would write: each step it proposes, the oracle keeps the agreeing prefix (as verification does),
and the number of steps is what a real run would pay in forward passes.
"""

from __future__ import annotations

import pytest

from rotary.completion.prompt import Prompt
from rotary.testgen.drafting import AstPatternDrafter
from rotary.testgen.languages import UnsupportedLanguage, language_of
from rotary.testgen.patterns import PatternMiner, match_template, shape_of


def encode(text: str) -> list[int]:
    return [ord(c) for c in text]


def decode(ids) -> str:
    return "".join(chr(i) for i in ids)


def group_ids(language: str, lines: list[str]) -> list[int]:
    miner = PatternMiner(language)
    return [miner.add_line(n, line).id for n, line in enumerate(lines)]


# -- shapes and groups, per language ----------------------------------------------------------

PYTHON_LINES = [
    "    assert solution.add(1, 2) == 3",
    "    assert solution.add(-10, 2.5) == -7.5  # negatives",  # literals and a comment differ: same group
    "    assert solution.add([1, 2], [3]) == [1, 2, 3]",  # lists of literals are literals
    "    assert solution.sub(1, 2) == -1",  # another identifier: another group
    "    assert solution.add(x, 2) == 3",  # a name where a literal was: another group
    '    assert solution.add("a", None) is True',  # another operator: another group
    "    solution = Solution()",
]


def test_python_lines_group_by_shape_with_literals_and_comments_as_wildcards():
    ids = group_ids("python", PYTHON_LINES)
    assert ids[0] == ids[1] == ids[2]
    assert len(set(ids)) == 5
    shape = shape_of(PYTHON_LINES[1].strip(), "python")
    assert shape.segments == ("assert solution.add(", ", ", ") == ", "  ", "")
    assert shape.holes == ("-10", "2.5", "-7.5", "# negatives")
    assert shape_of("assert solution.add(1, 2) == 3", "python").pattern == "assert solution.add(\u2026, \u2026) == \u2026"
    assert shape_of("   ", "python") is None


def test_java_lines_group_by_shape():
    lines = [
        "        assertEquals(3, solution.add(1, 2));",
        '        assertEquals(-7, solution.add(-3, -4)); // negatives',
        "        assertEquals(3, solution.sub(5, 2));",
        "        int[] values = {1, 2, 3};",
        "        int[] values = {};",
        "        assertTrue(solution.isEmpty(null));",
        "        assertTrue(solution.isEmpty(\"x\"));",
    ]
    ids = group_ids("java", lines)
    assert ids[0] == ids[1] and ids[2] != ids[0]
    assert ids[3] == ids[4] and ids[5] == ids[6]
    assert shape_of(lines[0].strip(), "java").segments == ("assertEquals(", ", solution.add(", ", ", "));")


def test_cpp_lines_group_by_shape():
    lines = [
        "    EXPECT_EQ(3, solution.add(1, 2));",
        "    EXPECT_EQ(-1.5, solution.add(0, -1.5));  // edge",
        "    EXPECT_EQ(3, solution.add(1, 2, 0));",  # one more argument: another shape
        "    std::vector<int> v = {1, 2, 3};",
        "    std::vector<int> v = {};",
        '    EXPECT_TRUE(solution.ok("a", nullptr));',
        "    EXPECT_TRUE(solution.ok('b', true));",
    ]
    ids = group_ids("cpp", lines)
    assert ids[0] == ids[1] and ids[2] != ids[0]
    assert ids[3] == ids[4] and ids[5] == ids[6]
    assert shape_of("std::vector<int> v = {1, 2, 3};", "cpp").segments == ("std::vector<int> v = ", ";")


def test_successor_links_remember_the_gap():
    miner = PatternMiner("python")
    lines = ["def test_a_1():", "    # intent", "    solution = Solution()", "    assert solution.a(1) == 2", "", "", "def test_a_2():"]
    for n, line in enumerate(lines):
        miner.add_line(n, line)
    comment = miner.group_of_line(1)
    assert miner.by_id[comment.next_group].pattern == "solution = Solution()" and comment.gap == "\n    "
    last = miner.group_of_line(3)
    assert last.next_group == miner.group_of_line(6).id and last.gap == "\n\n\n"


def test_matching_a_partial_line_against_a_template():
    segments = ("assert solution.add(", ", ", ") == ", "")
    assert match_template("assert sol", segments, "python").offset == len("assert sol")
    inside = match_template("assert solution.add([1, 2", segments, "python")
    assert inside.partial == "[1, 2" and inside.segment == 0
    closed = match_template('assert solution.add("a, b", ', segments, "python")  # the comma in the string is the literal's
    assert (closed.segment, closed.offset, closed.partial) == (1, 2, None)
    assert match_template("assert solution.sub(", segments, "python") is None
    assert match_template("x = 1", segments, "python") is None


def test_languages_come_from_extensions_or_ids():
    assert language_of("a/b.py") == "python" and language_of("X.java") == "java" and language_of("x.cc") == "cpp"
    assert language_of("anything", "cpp") == "cpp"
    with pytest.raises(UnsupportedLanguage, match="ruby"):
        language_of("x.rb", "ruby")
    with pytest.raises(UnsupportedLanguage, match=r"\.rb"):
        language_of("lib/x.rb")


# -- the drafter ------------------------------------------------------------------------------


def simulate(drafter: AstPatternDrafter, prompt_text: str, target: str, mine_from: int, k: int = 64, repeat_context: bool = False):
    """Decode `target` after `prompt_text` with the drafter; return the verify steps taken.

    `repeat_context`: show the drafter the generated tokens twice, as a decoder that passes its
    cache's ids before the generated ones does; the drafter must read only the end."""
    prompt = Prompt(ids=encode(prompt_text), text_before=prompt_text, text_after="")
    drafter.begin(prompt, mine_from)
    want = encode(target)
    generated = want[:1]
    steps = 0
    while len(generated) < len(want):
        shown = prompt.ids + (generated[:-1] if repeat_context else []) + generated
        draft = drafter.propose(shown, k)
        kept = 0
        while kept < len(draft) and len(generated) + kept < len(want) and draft[kept] == want[len(generated) + kept]:
            kept += 1
        generated = want[: len(generated) + kept + 1]
        drafter.accepted(len(draft), kept)
        steps += 1
    return steps


PY_PROMPT = '''class Solution:
    def add(self, a, b):
        return a + b


# Unit tests for Solution.add


def test_add_1():
    # a typical input
    solution = Solution()
    assert solution.add(1, 2) == 3


def test_add_2():
    # negatives
    '''
PY_TEST = "solution = Solution()\n    assert solution.add(-1, -2) == -3\n\n\ndef"


@pytest.mark.parametrize("repeat_context", [False, True])
def test_python_drafts_the_shared_structure_and_leaves_literals_to_the_model(repeat_context):
    drafter = AstPatternDrafter("python", encode, decode, max_draft=64)
    steps = simulate(drafter, PY_PROMPT, PY_TEST, PY_PROMPT.index("# Unit tests"), repeat_context=repeat_context)
    texts = [(r.text, r.kept, r.proposed) for r in drafter.records]
    first = drafter.records[0]
    # At the body's start the intent comment's successor and the line after it, up to the first literal.
    assert first.text == "olution = Solution()\n    assert solution.add(" and first.kept == first.proposed, texts
    assert first.pattern == "solution = Solution()"
    # Where a literal ends is the model's call (a number may go on); once it has written the next
    # character, the rest of the fixed text up to the next literal comes as a draft.
    assert (" ", 1, 1) in texts and (" == ", 4, 4) in texts, texts
    assert all(r.source == "ast" for r in drafter.records)
    assert steps < len(PY_TEST) / 2, (steps, texts)
    plain = simulate(AstPatternDrafter("python", encode, decode, max_draft=0), PY_PROMPT, PY_TEST, PY_PROMPT.index("# Unit"))
    assert plain == len(PY_TEST) - 1  # no drafts: one step per token after the first


def test_python_lines_of_the_current_test_are_patterns_at_once():
    prompt = PY_PROMPT
    target = "solution = Solution()\n    assert solution.add(4, 5) == 9\n    assert solution.add(7, 8) == 15\n"
    drafter = AstPatternDrafter("python", encode, decode, max_draft=64)
    simulate(drafter, prompt, target, prompt.index("# Unit tests"))
    # Test 1 ended after one assertion, so after this test's first one the patterns guess its end (the
    # model disagrees); once the model has begun another line, the assertion's structure is drafted.
    texts = [(r.text, r.kept, r.proposed) for r in drafter.records]
    assert ("\n\ndef test_add_2():\n    ", 0, 24) in texts, texts
    assert texts[-3:] == [("ssert solution.add(", 19, 19), (" ", 1, 1), (" == ", 4, 4)], texts


def test_guessed_literals_are_drafted_when_asked():
    target = "solution = Solution()\n    assert solution.add(1, 2) == 3\n"
    exact = AstPatternDrafter("python", encode, decode, max_draft=64)
    guess = AstPatternDrafter("python", encode, decode, max_draft=64, guess_literals=True)
    mine_from = PY_PROMPT.index("# Unit tests")
    assert simulate(guess, PY_PROMPT, target, mine_from) < simulate(exact, PY_PROMPT, target, mine_from)


JAVA_PROMPT = '''public class Solution {
    public int add(int a, int b) { return a + b; }
}

// Unit tests for Solution.add (JUnit 5)
class SolutionTest {
    @Test
    void test_add_1() {
        // a typical input
        Solution solution = new Solution();
        assertEquals(3, solution.add(1, 2));
    }

    @Test
    void test_add_2() {
        // negatives
        '''
JAVA_TEST = "Solution solution = new Solution();\n        assertEquals(-3, solution.add(-1, -2));\n    }"

CPP_PROMPT = '''class Solution {
 public:
  int add(int a, int b) { return a + b; }
};

// Unit tests for Solution::add (GoogleTest)
#include <gtest/gtest.h>

TEST(SolutionTest, add_1) {
    // a typical input
    Solution solution;
    EXPECT_EQ(3, solution.add(1, 2));
}

TEST(SolutionTest, add_2) {
    // negatives
    '''
CPP_TEST = "Solution solution;\n    EXPECT_EQ(-3, solution.add(-1, -2));\n}"


@pytest.mark.parametrize(
    "language, prompt, target, first",
    [
        ("java", JAVA_PROMPT, JAVA_TEST, "olution solution = new Solution();\n        assertEquals("),
        ("cpp", CPP_PROMPT, CPP_TEST, "olution solution;\n    EXPECT_EQ("),
    ],
)
def test_java_and_cpp_drafts(language, prompt, target, first):
    drafter = AstPatternDrafter(language, encode, decode, max_draft=64)
    steps = simulate(drafter, prompt, target, prompt.index("// Unit tests"))
    assert drafter.records[0].text == first and drafter.records[0].kept == len(first), drafter.records
    assert any(r.text == " solution.add(" and r.kept == r.proposed for r in drafter.records), drafter.records
    assert steps < len(target) / 2


def test_fallback_drafts_where_no_pattern_does():
    from rotary.completion.drafters import NgramDrafter

    drafter = AstPatternDrafter("python", encode, decode, fallback=NgramDrafter(), fallback_name="ngram", max_draft=64)
    # The literals repeat the first test's: n-gram lookup copies them where the patterns have holes.
    target = "solution = Solution()\n    assert solution.add(1, 2) == 3\n"
    simulate(drafter, PY_PROMPT, target, PY_PROMPT.index("# Unit tests"))
    sources = {r.source for r in drafter.records}
    assert sources == {"ast", "ngram"}, drafter.records
