"""Test generation without a model: the focal function in Python, Java and C++, bad input, the file written."""

from __future__ import annotations

import pytest

from rotary.completion.rpc import worker_pb2 as pb
from rotary.testgen.focal import FocalNotFound, find_focal
from rotary.testgen.generate import GeneratedTest, check_request
from rotary.testgen.languages import SourceError, TestGenError, UnsupportedLanguage, syntax_error
from rotary.testgen.layout import complete_lines, file_text, layout

PYTHON = '''import math
from typing import List


class Stack:
    def __init__(self):
        self.items = []

    def push(self, item):
        self.items.append(item)

    @staticmethod
    def hypot(a, b):
        return math.sqrt(a * a + b * b)


def mean(values: List[float]) -> float:
    return sum(values) / len(values)
'''

JAVA = '''package demo;

import java.util.List;

public class Calculator {
    public int add(int a, int b) {
        return a + b;
    }

    public static int twice(int a) {
        return 2 * a;
    }
}
'''

CPP = '''#include <vector>

namespace demo {
class Counter {
 public:
  int add(int a, int b) { return a + b; }
  int size() const;
};

int Counter::size() const { return 0; }

int total(const std::vector<int>& v) {
    int s = 0;
    for (int x : v) s += x;
    return s;
}
}  // namespace demo
'''


def test_python_functions_and_methods():
    method = find_focal("pkg/stack.py", PYTHON, "Stack.push")
    assert (method.language, method.name, method.class_name, method.module) == ("python", "push", "Stack", "stack")
    assert method.context == PYTHON and not method.static and not method.constructor_args
    assert find_focal("stack.py", PYTHON, "Stack.hypot").static
    function = find_focal("stack.py", PYTHON, "mean")
    assert function.class_name is None and function.display == "mean"


def test_large_python_files_show_imports_class_and_function():
    filler = "".join(f"\n\ndef helper_{i}(x):\n    return x + {i}\n" for i in range(400))
    focal = find_focal("big.py", PYTHON + filler, "Stack.push")
    assert "import math" in focal.context and "class Stack:" in focal.context
    assert "def push(self, item):\n        self.items.append(item)" in focal.context
    assert "def hypot(a, b): ..." in focal.context and "helper_3" not in focal.context


def test_java_and_cpp_focal_methods():
    java = find_focal("src/Calculator.java", JAVA, "Calculator.add")
    assert (java.language, java.name, java.class_name) == ("java", "add", "Calculator")
    assert find_focal("Calculator.java", JAVA, "twice").static
    cpp = find_focal("counter.cc", CPP, "Counter::add")
    assert (cpp.language, cpp.name, cpp.class_name) == ("cpp", "add", "Counter")
    out_of_line = find_focal("counter.cc", CPP, "demo::Counter::size")
    assert out_of_line.class_name == "Counter" and out_of_line.qualname == "demo::Counter::size"
    free = find_focal("counter.cc", CPP, "total")
    assert free.class_name is None and free.qualname == "demo::total"


@pytest.mark.parametrize(
    "path, text, qualname, error, words",
    [
        ("stack.py", PYTHON, "Stack.pop", FocalNotFound, ["Stack.pop", "Stack.push", "mean"]),
        ("stack.py", PYTHON, "Stack", FocalNotFound, ["is a class", "Stack.push"]),
        ("broken.py", "def f(:\n    pass\n", "f", SourceError, ["broken.py", "does not parse", "line 1"]),
        ("Calculator.java", JAVA, "Calculator.sub", FocalNotFound, ["Calculator.sub", "Calculator.add"]),
        ("Broken.java", "class A { void f( }", "A.f", SourceError, ["Broken.java", "does not parse as Java"]),
        ("counter.cc", CPP, "Counter::missing", FocalNotFound, ["Counter::missing"]),
        ("broken.cpp", "int f( {", "f", SourceError, ["broken.cpp", "does not parse as C++"]),
        ("lib.rb", "def f; end", "f", UnsupportedLanguage, ["no grammar", ".rb"]),
        ("stack.py", PYTHON, "", FocalNotFound, ["FILE::QUALNAME"]),
    ],
)
def test_bad_input_names_the_problem(path, text, qualname, error, words):
    with pytest.raises(error) as info:
        find_focal(path, text, qualname)
    for word in words:
        assert word in str(info.value)


def test_language_id_overrides_the_extension():
    with pytest.raises(UnsupportedLanguage, match="rust"):
        find_focal("stack.py", PYTHON, "mean", language_id="rust")
    assert find_focal("snippet.txt", PYTHON, "mean", language_id="python").language == "python"


def test_generate_tests_request_limits():
    ok = pb.GenerateTestsRequest(text="def f():\n    pass\n", path="a.py", qualname="f")
    check_request(ok)
    for fields, field in [
        ({"text": ""}, "text"),
        ({"path": ""}, "path"),
        ({"count": 21}, "count"),
        ({"count": -1}, "count"),
        ({"max_tokens": 513}, "max_tokens"),
        ({"drafter": "magic"}, "drafter"),
        ({"temperature": 6.0}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
    ]:
        request = pb.GenerateTestsRequest()
        request.CopyFrom(ok)
        for key, value in fields.items():
            setattr(request, key, value)
        with pytest.raises(TestGenError) as info:
            check_request(request)
        assert str(info.value).startswith(field + ":"), info.value


def make_test(k: int, code: str, language: str = "python") -> GeneratedTest:
    return GeneratedTest(
        index=k, name=f"test_push_{k}", intent="", code=code, body="", stop_reason="end_of_block",
        syntax_error=syntax_error(language, code), seconds=0.0, stats=None,
    )


def test_the_written_python_file_imports_the_module_and_comments_out_broken_tests():
    focal = find_focal("pkg/stack.py", PYTHON, "Stack.push")
    lay = layout(focal)
    assert lay.file_name == "test_stack.py"
    assert lay.scaffold == "stack = Stack()\n    assert stack.push"
    good = make_test(1, "def test_push_1():\n    # a typical input\n    stack = Stack()\n    assert stack.push(1) is None\n")
    bad = make_test(2, "def test_push_2():\n    # the smallest input\n    assert stack.push(\n")
    assert good.syntax_ok and not bad.syntax_ok
    text = file_text(focal, lay, [good, bad])
    compile(text, "test_stack.py", "exec")  # the file parses, the broken test kept as a comment
    assert "from stack import *" in text and "from stack import Stack" in text
    assert "# rotary: test_push_2 does not parse" in text and "#     assert stack.push(" in text


@pytest.mark.parametrize(
    "language, header, body, closing, kept",
    [
        # Python: the line the limit cut, and the block it opened, go; the complete assertions stay.
        ("python", "\n\ndef test_clamp_2():\n    # an edge case\n    ",
         "assert clamp(1, 0, 10) == 1\n    for x in range(3):\n        assert clamp(x, 0, 1) <= ", "",
         "assert clamp(1, 0, 10) == 1"),
        # The first line continues the scaffold (`assert clamp`): kept when it completes a statement.
        ("python", "\n\ndef test_clamp_1():\n    # a typical input\n    assert clamp",
         "(5, 0, 10) == 5\n    assert clamp(11, 0, 10) ==", "", "(5, 0, 10) == 5"),
        ("java", "\n    @Test\n    void test_add_1() {\n        // a typical input\n        ",
         "assertEquals(3, calculator.add(1, 2));\n        assertEquals(5, calculator.add(2,", "\n    }\n",
         "assertEquals(3, calculator.add(1, 2));"),
        ("cpp", "\nTEST(CalcTest, add_1) {\n    // a typical input\n    ",
         "EXPECT_EQ(add(1, 2), 3);\n    EXPECT_EQ(add(2,", "\n}\n", "EXPECT_EQ(add(1, 2), 3);"),
        # Nothing to keep: the body comes back whole (written as a comment).
        ("python", "\n\ndef test_clamp_3():\n    ", "assert clamp(1,\n    0,", "", "assert clamp(1,\n    0,"),
    ],
)
def test_a_test_cut_by_the_token_limit_keeps_its_complete_lines(language, header, body, closing, kept):
    assert syntax_error(language, (header.lstrip("\n") + body).rstrip() + closing) is not None
    assert complete_lines(language, header, body, closing) == kept
    if kept != body:
        assert syntax_error(language, (header.lstrip("\n") + kept).rstrip() + closing) is None


def test_java_and_cpp_files_wrap_the_tests():
    java = find_focal("Calculator.java", JAVA, "Calculator.add")
    lay = layout(java)
    test = make_test(1, "@Test\n    void test_add_1() {\n        assertEquals(3, calculator.add(1, 2));\n    }\n", "java")
    text = file_text(java, lay, [test])
    assert lay.file_name == "CalculatorTest.java" and text.startswith("import org.junit.jupiter.api.Test;")
    assert text.rstrip().endswith("}") and "class CalculatorTest {" in text
    cpp = find_focal("counter.cc", CPP, "Counter::add")
    lay = layout(cpp)
    assert lay.file_name == "counter_test.cpp" and '#include "counter.cc"' in lay.file_head
    assert lay.header(2, "edge").startswith("\nTEST(CounterTest, add_2) {")
