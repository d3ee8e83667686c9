"""Stop rules decide from text alone: exact expectations."""

from rotary.completion.stops import MULTI_LINE, SINGLE_LINE, StopRules


def final(rules: StopRules, generated: str, reason: str = "max_tokens") -> tuple[str, str]:
    """Feed the text token by token (char by char here) as the engine does; return (text, reason)."""
    for i in range(1, len(generated) + 1):
        decision = rules.check(generated[:i])
        if decision.stop_reason:
            return decision.final, decision.stop_reason
    end = rules.finish(generated, reason)
    return end.final, end.stop_reason


def test_single_line_stops_at_end_of_line():
    rules = StopRules("x = compute(", "", SINGLE_LINE)
    assert final(rules, "a, b)\ny = 2\n") == ("a, b)", "end_of_line")


def test_single_line_at_end_of_line_may_fill_the_next_line():
    rules = StopRules("def f(x):", "", SINGLE_LINE)
    assert final(rules, "\n    return x\n    pass") == ("\n    return x", "end_of_line")


def test_text_after_cursor_is_not_repeated():
    rules = StopRules("print(value", ")\nnext_line()", SINGLE_LINE)
    assert final(rules, ".upper())\n") == (".upper()", "suffix")


def test_auto_mode_is_single_line_inside_a_line_and_multi_line_after_an_opener():
    assert StopRules("x = 1 +", "", "auto").mode == SINGLE_LINE
    assert StopRules("def f(x):", "", "auto").mode == MULTI_LINE
    assert StopRules("if x:\n    ", "", "auto").mode == MULTI_LINE


def test_multi_line_stops_when_the_block_ends():
    rules = StopRules("def f(x):", "", MULTI_LINE)
    text, reason = final(rules, "\n    y = x + 1\n    return y\n\ndef g():\n    pass\n")
    assert (text, reason) == ("\n    y = x + 1\n    return y", "end_of_block")


def test_multi_line_inside_a_block_stops_at_a_dedent():
    rules = StopRules("class A:\n    def f(self):\n        ", "", MULTI_LINE)
    text, reason = final(rules, "a = 1\n        return a\n    def g(self):\n")
    assert (text, reason) == ("a = 1\n        return a", "end_of_block")


def test_multi_line_stops_before_repeating_the_next_line_of_the_document():
    rules = StopRules("def f(x):", "\n    return y\n", MULTI_LINE)
    text, reason = final(rules, "\n    y = x * 2\n    return y\n")
    assert (text, reason) == ("\n    y = x * 2", "suffix")


def test_committed_text_is_always_a_prefix_of_the_final_text():
    rules = StopRules("def f(x):", "", MULTI_LINE)
    generated = "\n    a = 1\n\n    b = 2\n    return a + b\nprint(1)\n"
    committed = []
    for i in range(1, len(generated) + 1):
        decision = rules.check(generated[:i])
        committed.append(decision.committed)
        if decision.stop_reason:
            break
    for c in committed:
        assert decision.final.startswith(c)
    assert decision.final == "\n    a = 1\n\n    b = 2\n    return a + b"


def test_budget_exhausted_multi_line_drops_the_unfinished_line():
    rules = StopRules("def f(x):", "", MULTI_LINE)
    assert rules.finish("\n    a = 1\n    b = 2\n    ret", "max_tokens").final == "\n    a = 1\n    b = 2"


def test_whitespace_only_completion_is_empty():
    rules = StopRules("x = 1", "", SINGLE_LINE)
    assert rules.finish("   ", "eos").final == ""


def test_single_line_that_only_repeats_the_next_line_is_dropped():
    # The cursor on an empty indented line; the model writes the line that follows instead of this one.
    rules = StopRules("def f(x):\n    ", "\n    return y\n", SINGLE_LINE)
    assert final(rules, "return y\n") == ("", "suffix")
    assert final(rules, "return y", reason="eos") == ("", "suffix")
    assert final(rules, "y = x * 2\n") == ("y = x * 2", "end_of_line")
    # Filling the next line from the end of a line: the same rule on that line.
    rules = StopRules("def f(x):", "\n    return y\n", SINGLE_LINE)
    assert final(rules, "\n    return y\n") == ("", "suffix")


def test_the_text_after_the_cursor_is_cut_where_the_line_balances_even_when_the_model_goes_on():
    rules = StopRules("print(area(", ")\n", SINGLE_LINE)
    assert final(rules, "10, 10))  # Output: 100\n") == ("10, 10)", "suffix")
    rules = StopRules("values = [f(x", ")]\n", SINGLE_LINE)
    assert final(rules, ") for x in xs)]\n") == (") for x in xs", "suffix")


def test_multi_line_first_line_that_repeats_the_next_line_is_dropped():
    rules = StopRules("x = 1\n", "\ny = 2\nprint(x)\n", "auto")
    assert final(rules, "y = 2\n\n") == ("", "suffix")


def test_multi_line_streams_the_first_line_once_it_is_complete():
    rules = StopRules("def f(x):\n    ", "", MULTI_LINE)
    assert rules.check("y = x + 1").committed == ""
    assert rules.check("y = x + 1\n    ret").committed == "y = x + 1"
