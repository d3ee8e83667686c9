"""Unit-test generation for a focal function: the prompt, N tests one after another, and their drafters.

A focal function (`FILE::QUALNAME`) is found in its source (Python with `ast`, Java and C++ with
tree-sitter), and the model sees its module context: the whole file when it is small, else the
imports, the class header and constructor, and the function itself. After it comes a test file
for it, one test at a time: test k gets a header of its own (`def test_<name>_<k>():` and an
intent comment, so the tests differ) and the model writes its body; the stop rules end it where
the block ends. Each test is generated with every earlier test in the text, and the text grows,
so the document's KV cache is reused from one test to the next (same cache key).

That growing file is what the drafters feed on (ast_patterns.py): the lines of earlier tests are
mined into patterns that propose the next tokens, verified in one forward (decode.py). Greedy
decoding (the default) gives the same tests with every drafter; sampling (temperature > 0)
keeps the model's distribution (sampling.py).

A test the token limit ends mid-statement keeps its complete lines (complete_lines), so the file
holds tests that parse; one that no such cut repairs is written as a comment.

The first test starts from a short scaffold (construct the object, call the function in an
assertion), so a small model writes an assertion rather than prose; the others are free.

Generated code is never executed here (see sandbox.py for --check and the benchmark).
"""

from __future__ import annotations

import ast
import functools
import re
import time
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Callable, Iterator, Sequence

from .ast_patterns import AstPatternDrafter, DraftRecord, UnsupportedLanguage, language_of, parser
from .drafters import NgramDrafter, NoDrafter
from .prompt import Prompt

# ast: line patterns, their literals guessed from the group's lines; ast-strict: DiffTester's rule
# (stop at each literal); ast+ngram: patterns, and n-gram lookup where none matches (the default).
DRAFTERS = ("plain", "ngram", "ast", "ast+ngram", "ast-strict")
DEFAULT_DRAFTER = "ast+ngram"
DEFAULT_TESTS = 5
MAX_TESTS = 20
DEFAULT_TEST_TOKENS = 128
MAX_TEST_TOKENS = 512
WHOLE_FILE_CHARS = 6000  # a source this small is shown whole; a larger one as imports + class + function
# Draft tokens per verify. On a CPU a verify of 5 to 8 tokens costs about 2.5 one-token steps and
# one of 16 about 3.3, and patterns often predict 10 tokens or more (a line's end, the next line's
# start); 15 keeps a verify (16 tokens with the pending one) on the runner's decode threads.
DRAFT_TOKENS = 15

INTENTS = (
    "a typical input",
    "the smallest input (an edge case)",
    "a larger input",
    "repeated values",
    "zero or negative values",
    "a boundary case",
    "an input with no valid answer",
    "an input that is already ordered",
    "a single element",
    "mixed values",
)


class TestGenError(ValueError):
    """Bad input for test generation; the message names the problem."""

    __test__ = False  # not a pytest class
    code = "INVALID_ARGUMENT"


class SourceError(TestGenError):
    """The source file does not parse."""


class FocalNotFound(TestGenError):
    code = "NOT_FOUND"


@dataclass
class Focal:
    """The function tests are generated for."""

    language: str  # python, java, cpp
    path: str
    qualname: str
    name: str
    class_name: str | None
    context: str  # the code the model sees
    module: str  # what a Python test file imports (the file's stem)
    static: bool = False  # no instance needed (staticmethod, classmethod, Java/C++ static)
    constructor_args: bool = False  # the class's constructor takes arguments

    @property
    def display(self) -> str:
        sep = "::" if self.language == "cpp" else "."
        return f"{self.class_name}{sep}{self.name}" if self.class_name else self.name


def check_request(request) -> None:
    """The limits of a GenerateTestsRequest (worker.proto); a broken one raises TestGenError naming the field."""
    from .rpc.wire import MAX_DOCUMENT_CHARS

    if not request.text:
        raise TestGenError("text: empty (the source file's text is needed)")
    if len(request.text) > MAX_DOCUMENT_CHARS:
        raise TestGenError(f"text: {len(request.text)} characters is over the limit of {MAX_DOCUMENT_CHARS}")
    if not request.path and not request.language_id:
        raise TestGenError("path: empty (a file name or a language_id is needed to know the language)")
    if not 0 <= request.count <= MAX_TESTS:
        raise TestGenError(f"count: {request.count} is outside 0..{MAX_TESTS} (0: {DEFAULT_TESTS})")
    if not 0 <= request.max_tokens <= MAX_TEST_TOKENS:
        raise TestGenError(f"max_tokens: {request.max_tokens} is outside 0..{MAX_TEST_TOKENS} (0: {DEFAULT_TEST_TOKENS})")
    if request.drafter and request.drafter not in DRAFTERS:
        raise TestGenError(f"drafter: unknown {request.drafter!r}; use one of {', '.join(DRAFTERS)}")
    if not 0 <= request.temperature <= 5:
        raise TestGenError(f"temperature: {request.temperature} is outside 0..5 (0: greedy)")
    if not 0 <= request.top_p <= 1:
        raise TestGenError(f"top_p: {request.top_p} is outside 0..1")


# -- finding the focal function ---------------------------------------------------------------


def find_focal(path: str, text: str, qualname: str, language_id: str = "") -> Focal:
    """The focal function `qualname` in `text` (the file at `path`); raises a TestGenError or an
    UnsupportedLanguage (a language without a grammar here) naming the problem."""
    try:
        language = language_of(path, language_id)
        parser(language)
    except ImportError as exc:  # the grammar wheel is missing
        raise UnsupportedLanguage(f"the tree-sitter grammar for {language_id or path} is not installed ({exc})") from None
    qualname = qualname.strip()
    if not qualname:
        raise FocalNotFound(f"{path}: no function named (give FILE::QUALNAME, e.g. {PurePath(path).name}::my_function)")
    finder = {"python": _find_python, "java": _find_java, "cpp": _find_cpp}[language]
    return finder(path, text, qualname)


def _not_found(path: str, qualname: str, available: Sequence[str]) -> FocalNotFound:
    listed = ", ".join(available[:20]) + (", ..." if len(available) > 20 else "")
    return FocalNotFound(f"{path}: no function or method {qualname!r}" + (f" (found: {listed})" if listed else " (it defines none)"))


def _module_name(path: str) -> str:
    stem = PurePath(path).stem
    return re.sub(r"\W", "_", stem) or "module"


def _find_python(path: str, text: str, qualname: str) -> Focal:
    try:
        tree = ast.parse(text, filename=path)
    except SyntaxError as exc:
        raise SourceError(f"{path} does not parse as Python (line {exc.lineno}: {exc.msg})") from None
    available: list[str] = []

    def collect(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                available.append(prefix + node.name)
            elif isinstance(node, ast.ClassDef):
                collect(node.body, prefix + node.name + ".")

    collect(tree.body, "")
    parts = qualname.replace("::", ".").split(".")
    scope, owner, node = tree.body, None, None
    for i, part in enumerate(parts):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part), None)
        if node is None:
            raise _not_found(path, qualname, available)
        if i < len(parts) - 1:
            if not isinstance(node, ast.ClassDef):
                raise _not_found(path, qualname, available)
            owner, scope = node, node.body
    if isinstance(node, ast.ClassDef):
        methods = [m for m in available if m.startswith(qualname + ".")]
        raise FocalNotFound(f"{path}: {qualname!r} is a class; name one of its methods" + (f" ({', '.join(methods[:10])})" if methods else ""))
    decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list}
    static = owner is not None and bool(decorators & {"staticmethod", "classmethod"})
    constructor_args = False
    if owner is not None:
        init = next((n for n in owner.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is not None:
            args = init.args
            constructor_args = len(args.args) - len(args.defaults) > 1 or any(d is None for d in args.kw_defaults)
    if len(text) <= WHOLE_FILE_CHARS:
        context = text
    else:
        lines = text.splitlines()

        def source(n) -> str:
            start = min([d.lineno for d in getattr(n, "decorator_list", [])] + [n.lineno])
            return "\n".join(lines[start - 1 : n.end_lineno])

        pieces = [source(n) for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        if owner is not None:
            header = lines[owner.lineno - 1]
            members = []
            for n in owner.body:
                if n is node or (isinstance(n, ast.FunctionDef) and n.name == "__init__"):
                    members.append(source(n))
                elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    members.append(lines[n.lineno - 1].rstrip() + " ...")
            pieces.append(header + "\n" + "\n\n".join(members))
        else:
            pieces.append(source(node))
        context = "\n\n".join(pieces)
    return Focal(
        "python", path, ".".join(parts), node.name, owner.name if owner else None, context.rstrip() + "\n",
        _module_name(path), static, constructor_args,
    )


def _ts_error(path: str, language: str, root) -> SourceError | None:
    if not root.has_error:
        return None
    stack = [root]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            return SourceError(f"{path} does not parse as {language.capitalize() if language == 'java' else 'C++'} (line {node.start_point[0] + 1})")
        stack.extend(reversed(node.children))
    return SourceError(f"{path} does not parse")


def _find_java(path: str, text: str, qualname: str) -> Focal:
    data = text.encode("utf-8")
    root = parser("java").parse(data).root_node
    error = _ts_error(path, "java", root)
    if error:
        raise error
    found, available = [], []

    def walk(node, classes):
        for child in node.children:
            if child.type in ("class_declaration", "record_declaration", "enum_declaration", "interface_declaration"):
                name = child.child_by_field_name("name").text.decode()
                body = child.child_by_field_name("body")
                if body is not None:
                    walk(body, classes + [(name, child)])
            elif child.type == "method_declaration" and classes:
                name = child.child_by_field_name("name").text.decode()
                qual = ".".join([c for c, _ in classes] + [name])
                available.append(qual)
                if qual == qualname or qual.endswith("." + qualname) or (name == qualname):
                    found.append((child, classes))

    walk(root, [])
    if len(found) != 1:
        if len(found) > 1:
            raise FocalNotFound(f"{path}: {qualname!r} names {len(found)} methods; qualify it (Class.method)")
        raise _not_found(path, qualname, available)
    method, classes = found[0]
    cls_name, cls = classes[-1]
    modifiers = next((c for c in method.children if c.type == "modifiers"), None)
    static = modifiers is not None and b"static" in modifiers.text
    constructors = [c for c in cls.child_by_field_name("body").children if c.type == "constructor_declaration"]
    constructor_args = bool(constructors) and all(
        c.child_by_field_name("parameters").named_child_count > 0 for c in constructors
    )
    if len(text) <= WHOLE_FILE_CHARS:
        context = text
    else:
        imports = [c.text.decode() for c in root.children if c.type in ("package_declaration", "import_declaration")]
        header = data[cls.start_byte : cls.child_by_field_name("body").start_byte].decode()
        context = "\n".join(imports) + "\n\n" + header + "{\n    " + method.text.decode() + "\n}\n"
    return Focal("java", path, ".".join([c for c, _ in classes] + [method.child_by_field_name("name").text.decode()]),
                 method.child_by_field_name("name").text.decode(), cls_name, context.rstrip() + "\n",
                 _module_name(path), static, constructor_args)


def _find_cpp(path: str, text: str, qualname: str) -> Focal:
    data = text.encode("utf-8")
    root = parser("cpp").parse(data).root_node
    error = _ts_error(path, "cpp", root)
    if error:
        raise error
    wanted = qualname.replace(".", "::")
    found, available = [], []

    def declared_name(declarator):
        while declarator is not None and declarator.type not in ("function_declarator",):
            declarator = declarator.child_by_field_name("declarator")
        if declarator is None:
            return None
        name = declarator.child_by_field_name("declarator")
        return name.text.decode() if name is not None else None

    def walk(node, scopes):
        for child in node.children:
            if child.type == "namespace_definition":
                name = child.child_by_field_name("name")
                body = child.child_by_field_name("body")
                if body is not None:
                    walk(body, scopes + ([name.text.decode()] if name is not None else []))
            elif child.type in ("class_specifier", "struct_specifier"):
                name = child.child_by_field_name("name")
                body = child.child_by_field_name("body")
                if name is not None and body is not None:
                    walk(body, scopes + [name.text.decode()])
            elif child.type == "function_definition":
                name = declared_name(child.child_by_field_name("declarator"))
                if name is None:
                    continue
                qual = "::".join(scopes + [name])
                available.append(qual)
                if qual == wanted or qual.endswith("::" + wanted) or name == wanted:
                    found.append((child, qual))
            elif child.type in ("declaration_list", "field_declaration_list", "template_declaration", "linkage_specification"):
                walk(child, scopes)

    walk(root, [])
    if len(found) != 1:
        if len(found) > 1:
            raise FocalNotFound(f"{path}: {qualname!r} names {len(found)} functions; qualify it (Class::method)")
        raise _not_found(path, qualname, available)
    function, qual = found[0]
    parts = qual.split("::")
    name = parts[-1]
    # A class, if the function is a member: the enclosing class_specifier, or the qualifier of an out-of-line definition.
    class_name = None
    node = function.parent
    while node is not None:
        if node.type in ("class_specifier", "struct_specifier"):
            class_name = node.child_by_field_name("name").text.decode()
            break
        node = node.parent
    if class_name is None and len(parts) > 1:
        classes = {c.child_by_field_name("name").text.decode() for c in _descendants(root) if c.type in ("class_specifier", "struct_specifier") and c.child_by_field_name("name") is not None}
        class_name = parts[-2] if parts[-2] in classes else None
    static = b"static" in data[function.start_byte : function.child_by_field_name("declarator").start_byte]
    if len(text) <= WHOLE_FILE_CHARS:
        context = text
    else:
        includes = [c.text.decode().rstrip() for c in root.children if c.type in ("preproc_include", "using_declaration")]
        context = "\n".join(includes) + "\n\n" + function.text.decode() + "\n"
    return Focal("cpp", path, qual, name, class_name, context.rstrip() + "\n", _module_name(path), static, False)


def _descendants(node):
    stack = [node]
    while stack:
        n = stack.pop()
        yield n
        stack.extend(n.children)


# -- the test file: what the model sees, what is written ------------------------------------


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


@dataclass
class Layout:
    """One language's test file: the prompt's test section, each test's header, the file around the tests."""

    intro: str  # after the focal context, before the first test (the model sees it; the file does not)
    file_head: str  # the written file's beginning
    file_tail: str  # the written file's end
    header: Callable[[int, str], str]  # (k, intent) -> the test's header, ending where the body starts
    scaffold: str  # the first test's body starts with this
    closing: str  # appended after each test's body
    test_name: Callable[[int], str]
    file_name: str


def layout(focal: Focal) -> Layout:
    name, cls = focal.name, focal.class_name
    if focal.language == "python":
        if cls and not focal.static:
            var = "solution" if cls == "Solution" else _snake(cls)
            make = f"{var} = {cls}" if focal.constructor_args else f"{var} = {cls}()\n    assert {var}.{name}"
            scaffold = make
        else:
            scaffold = f"assert {cls + '.' if cls else ''}{name}"
        top = cls or name
        imports = f"from {focal.module} import *  # noqa: F401,F403\nfrom {focal.module} import {top}\n"
        return Layout(
            intro=f"\n\n# Unit tests for {focal.display}: each test calls it on one input and asserts the expected result.\n",
            file_head=f'"""Unit tests for {focal.module}.{focal.display}, generated by Rotary."""\n\n{imports}',
            file_tail="",
            header=lambda k, intent: f"\n\ndef test_{name}_{k}():\n    # {intent}\n    ",
            scaffold=scaffold,
            closing="",
            test_name=lambda k: f"test_{name}_{k}",
            file_name=f"test_{focal.module}.py",
        )
    if focal.language == "java":
        owner = cls or "Solution"
        var = _snake(owner) if owner != "Solution" else "solution"
        scaffold = "assertEquals" if focal.static else f"{owner} {var} = new {owner}" + ("" if focal.constructor_args else "();\n        assertEquals")
        return Layout(
            intro=f"\n\n// Unit tests for {focal.display} (JUnit 5): each test calls it on one input and checks the expected result.\nclass {owner}Test {{\n",
            file_head=f"import org.junit.jupiter.api.Test;\n\nimport static org.junit.jupiter.api.Assertions.*;\n\nclass {owner}Test {{\n",
            file_tail="}\n",
            header=lambda k, intent: f"\n    @Test\n    void test_{name}_{k}() {{\n        // {intent}\n        ",
            scaffold=scaffold,
            closing="\n    }\n",
            test_name=lambda k: f"test_{name}_{k}",
            file_name=f"{owner}Test.java",
        )
    suite = cls or focal.module
    if cls and not focal.static:
        var = "solution" if cls == "Solution" else _snake(cls)
        scaffold = f"{cls} {var};\n    EXPECT_EQ"
    else:
        scaffold = "EXPECT_EQ"
    return Layout(
        intro=f"\n\n// Unit tests for {focal.display} (GoogleTest): each test calls it on one input and checks the expected result.\n#include <gtest/gtest.h>\n",
        file_head=f'#include <gtest/gtest.h>\n\n#include "{PurePath(focal.path).name}"\n',
        file_tail="",
        header=lambda k, intent: f"\nTEST({suite}Test, {name}_{k}) {{\n    // {intent}\n    ",
        scaffold=scaffold,
        closing="\n}\n",
        test_name=lambda k: f"{suite}Test.{name}_{k}",
        file_name=f"{focal.module}_test.cpp",
    )


def intent(k: int) -> str:
    base = INTENTS[(k - 1) % len(INTENTS)]
    return base if k <= len(INTENTS) else f"{base} (variant {(k - 1) // len(INTENTS) + 1})"


def complete_lines(language: str, header: str, body: str, closing: str) -> str:
    """The body of a test the token limit cut mid-statement, without the trailing lines that keep it
    from parsing (the cut line, an unclosed block); at least its first line is kept, and a body that
    no cut makes parse comes back whole (it is then written as a comment, see file_text)."""
    lines = body.split("\n")
    while len(lines) > 1:
        lines.pop()
        candidate = "\n".join(lines).rstrip()
        if syntax_error(language, (header.lstrip("\n") + candidate).rstrip() + closing) is None:
            return candidate
    return body


def syntax_error(language: str, code: str) -> str | None:
    """Why one test does not parse on its own (None: it does). Parsing only; nothing is run."""
    if language == "python":
        try:
            ast.parse(code)
        except SyntaxError as exc:
            return f"line {exc.lineno}: {exc.msg}"
        return None
    root = parser(language).parse(code.encode("utf-8")).root_node
    error = _ts_error("test", language, root)
    return str(error).split(" (", 1)[-1].rstrip(")") if error else None


# -- drafters -----------------------------------------------------------------------------------------


class GeneratedTail:
    """Shows a drafter the prompt's ids and this generation's tokens, counted from the verify feedback,
    whatever else the decoder puts before them (so every drafter of a benchmark sees the same text)."""

    def __init__(self, inner, name: str):
        self.inner, self.name = inner, name
        self.records: list[DraftRecord] = []
        self._prompt_ids: list[int] = []
        self._generated = 0
        self._pending: list[int] | None = None
        self.decode: Callable[[Sequence[int]], str] = lambda ids: ""

    def begin(self, prompt: Prompt, mine_from: int = 0) -> None:
        self._prompt_ids, self._generated, self.records = list(prompt.ids), 1, []

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        ids = list(self.inner.propose([*self._prompt_ids, *tokens[len(tokens) - self._generated :]], k))
        self._pending = ids or None
        return ids

    def accepted(self, proposed: int, kept: int) -> None:
        self._generated += kept + 1
        self.inner.accepted(proposed, kept)
        if self._pending is not None and proposed:
            self.records.append(DraftRecord(self.name, "", -1, self.decode(self._pending), proposed, kept))
        self._pending = None


def make_drafter(kind: str, language: str, encode, decode, draft_tokens: int = DRAFT_TOKENS):
    """A drafter for one batch of tests (kept across its tests: the patterns grow with them)."""
    if kind == "plain":
        drafter = GeneratedTail(NoDrafter(), "plain")
    elif kind == "ngram":
        drafter = GeneratedTail(NgramDrafter(), "ngram")
    elif kind in ("ast", "ast+ngram", "ast-strict"):
        fallback = None
        if kind == "ast+ngram":
            fallback = NgramDrafter()
            fallback.name = "ngram"
        return AstPatternDrafter(
            language, encode, decode, fallback=fallback, max_draft=draft_tokens, guess_literals=kind != "ast-strict"
        )
    else:
        raise TestGenError(f"drafter: unknown {kind!r}; use one of {', '.join(DRAFTERS)}")
    drafter.decode = decode
    return drafter


# -- generation -------------------------------------------------------------------------------------------


@dataclass
class GeneratedTest:
    index: int  # 1-based
    name: str
    intent: str
    code: str  # the whole test (header, body, closing)
    body: str  # what the model wrote
    stop_reason: str
    syntax_error: str | None
    seconds: float
    stats: object  # engine.CompletionStats
    drafts: list[DraftRecord] = field(default_factory=list)
    dropped_lines: int = 0  # trailing lines cut off a test the token limit ended mid-statement (complete_lines)

    @property
    def syntax_ok(self) -> bool:
        return self.syntax_error is None


@dataclass
class TestFile:
    __test__ = False  # not a pytest class
    focal: Focal
    tests: list[GeneratedTest]
    file_name: str
    text: str  # the file to write (syntax-invalid Python tests are kept as comments)
    drafter: object = None


def file_text(focal: Focal, lay: Layout, tests: Sequence[GeneratedTest]) -> str:
    parts = [lay.file_head]
    for test in tests:
        code = test.code.strip("\n")
        if focal.language == "python" and not test.syntax_ok:
            code = f"# rotary: {test.name} does not parse ({test.syntax_error}); kept as a comment\n" + "\n".join(
                "# " + line if line else "#" for line in code.split("\n")
            )
        parts.append("\n\n" + code + "\n" if focal.language == "python" else "\n" + code.rstrip() + "\n")
    if focal.language == "python" and any("pytest." in t.code for t in tests):
        parts[0] = parts[0] + "import pytest\n"
    parts.append(lay.file_tail)
    return "".join(parts)


def generate_tests(
    engine,
    focal: Focal,
    count: int = DEFAULT_TESTS,
    max_tokens: int = DEFAULT_TEST_TOKENS,
    drafter: str = DEFAULT_DRAFTER,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    is_cancelled: Callable[[], bool] = lambda: False,
    cache_key: str | None = None,
    description: str = "",
    draft_tokens: int = DRAFT_TOKENS,
) -> Iterator[GeneratedTest]:
    """Generate `count` tests for `focal`, one after another, yielding each as it is finished.

    `cache_key`: the KV cache the growing test file uses (None: a fresh one, dropped at the end).
    `description`: optional prose about the function (TestEval gives a problem statement), shown
    as a comment before the code. Stops early (without the test in progress) when cancelled.
    """
    from .engine import CompletionOptions
    from .sampling import Sampler

    if drafter not in DRAFTERS:
        raise TestGenError(f"drafter: unknown {drafter!r}; use one of {', '.join(DRAFTERS)}")
    lay = layout(focal)
    runner = engine.runner
    draft = make_drafter(drafter, focal.language, runner.encode_text, runner.decode_ids, draft_tokens)
    comment = "#" if focal.language == "python" else "//"
    head = ""
    if description.strip():
        head = "".join(f"{comment} {line}".rstrip() + "\n" for line in description.strip().splitlines()) + "\n"
    text = head + focal.context + lay.intro
    tests_start = len(text)
    key = cache_key or f"rotary-tests:{id(draft):x}:{time.monotonic_ns()}"
    options = CompletionOptions(max_tokens=max_tokens, mode="multi_line", drafter="none")
    try:
        for k in range(1, count + 1):
            if is_cancelled():
                return
            header = lay.header(k, intent(k)) + (lay.scaffold if k == 1 else "")
            text += header
            prompt = engine.build_context(text, len(text), max_tokens)
            draft.begin(prompt, tests_start)
            sampler = Sampler(temperature, top_p, seed * 1009 + k) if temperature > 0 else None
            started = time.perf_counter()
            chunks = list(_complete(engine, key, prompt, options, draft, sampler, draft_tokens, is_cancelled))
            last = chunks[-1]
            if last.stop_reason == "cancelled":
                return
            body = "".join(c.text for c in chunks).rstrip()
            code = (header.lstrip("\n") + body).rstrip() + lay.closing
            error = syntax_error(focal.language, code)
            dropped = 0
            if error is not None and last.stop_reason == "max_tokens":
                # The limit cut the test mid-statement: keep its complete lines (the later tests see them too).
                kept = complete_lines(focal.language, header, body, lay.closing)
                if kept != body:
                    dropped = body.count("\n") - kept.count("\n")
                    body = kept
                    code = (header.lstrip("\n") + body).rstrip() + lay.closing
                    error = None
            text += body.rstrip() + lay.closing.rstrip(" ")
            if not text.endswith("\n"):
                text += "\n"
            yield GeneratedTest(
                index=k, name=lay.test_name(k), intent=intent(k), code=code, body=body,
                stop_reason=last.stop_reason, syntax_error=error, dropped_lines=dropped,
                seconds=time.perf_counter() - started, stats=last.stats, drafts=list(getattr(draft, "records", [])),
            )
    finally:
        if cache_key is None:
            engine.kv_store.drop(key)


def generate_file(engine, focal: Focal, **kwargs) -> TestFile:
    """Every test of `generate_tests` and the file that holds them."""
    tests = list(generate_tests(engine, focal, **kwargs))
    lay = layout(focal)
    return TestFile(focal, tests, lay.file_name, file_text(focal, lay, tests))


def _complete(engine, key, prompt, options, drafter, sampler, draft_tokens, is_cancelled):
    """engine.complete_prompt with two more knobs (a sampler; draft tokens per verify): the same Job,
    prefill and finish, with the Generation given them before it is submitted."""
    import dataclasses

    from .engine import MAX_TOKENS_LIMIT, CompletionStats
    from .scheduler import Job

    max_tokens = max(1, min(options.max_tokens, MAX_TOKENS_LIMIT))
    engine.kv_store.get(key)  # a spilled cache comes back from disk here, not on the model thread
    generation = engine.new_generation(prompt, options, max_tokens, drafter)
    generation.sampler = sampler
    generation.draft_tokens = draft_tokens
    fields = {
        "key": key,
        "prefill": functools.partial(engine._prefill, prompt=prompt, options=options),
        "generation": generation,
        "finish": engine._finish,
        "is_cancelled": is_cancelled,
        "stats": CompletionStats(context_tokens=len(prompt.ids)),
        "options": options,
    }
    known = {f.name for f in dataclasses.fields(Job)}
    job = Job(**{name: value for name, value in fields.items() if name in known})
    yield from engine.scheduler.submit(job).chunks()
