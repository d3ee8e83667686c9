"""The languages tests are generated for: which grammar a file takes, its tree-sitter parser, and
whether a piece of code parses. Also the errors of bad input that every part of testgen raises.

Python, Java and C++ have a tree-sitter grammar from PyPI; a grammar is imported on first use.
"""

from __future__ import annotations

import ast
import functools
import importlib

# Languages with a tree-sitter grammar from PyPI (module, function returning the language).
GRAMMARS = {"python": "tree_sitter_python", "java": "tree_sitter_java", "cpp": "tree_sitter_cpp"}
EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".java": "java",
    ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp", ".c++": "cpp", ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp", ".h": "cpp",
}
LANGUAGE_IDS = {"python": "python", "java": "java", "cpp": "cpp", "c++": "cpp", "c": "cpp"}


class TestGenError(ValueError):
    """Bad input for test generation; the message names the problem."""

    __test__ = False  # not a pytest class
    code = "INVALID_ARGUMENT"


class SourceError(TestGenError):
    """The source file does not parse."""


class UnsupportedLanguage(ValueError):
    """A language with no tree-sitter grammar here (or its grammar is not installed): test generation's
    INVALID_ARGUMENT, like a TestGenError."""


def language_of(path: str, language_id: str = "") -> str:
    """The grammar for a file: from an LSP language id when given, else from the file name's extension."""
    if language_id:
        found = LANGUAGE_IDS.get(language_id.lower())
        if found is None:
            raise UnsupportedLanguage(
                f"no grammar for language {language_id!r}: tests can be generated for {', '.join(sorted(GRAMMARS))}"
            )
        return found
    dot = path.rfind(".")
    ext = path[dot:].lower() if dot > path.rfind("/") else ""
    found = EXTENSIONS.get(ext)
    if found is None:
        raise UnsupportedLanguage(
            f"no grammar for {path!r} ({ext or 'no extension'}): tests can be generated for Python (.py), "
            "Java (.java) and C++ (.cpp, .cc, .h, .hpp)"
        )
    return found


@functools.lru_cache(maxsize=None)
def parser(language: str):
    """A tree-sitter parser for one of GRAMMARS (the grammar wheel is imported on first use)."""
    if language not in GRAMMARS:
        raise UnsupportedLanguage(f"no grammar for {language!r}: tests can be generated for {', '.join(sorted(GRAMMARS))}")
    import tree_sitter

    grammar = importlib.import_module(GRAMMARS[language])
    return tree_sitter.Parser(tree_sitter.Language(grammar.language()))


def parse_error(path: str, language: str, root) -> SourceError | None:
    """The first error in a tree-sitter tree (`root`, of Java or C++ code from `path`), or None."""
    if not root.has_error:
        return None
    stack = [root]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            return SourceError(f"{path} does not parse as {language.capitalize() if language == 'java' else 'C++'} (line {node.start_point[0] + 1})")
        stack.extend(reversed(node.children))
    return SourceError(f"{path} does not parse")


def syntax_error(language: str, code: str) -> str | None:
    """Why one test does not parse on its own (None: it does). Parsing only; nothing is run."""
    if language == "python":
        try:
            ast.parse(code)
        except SyntaxError as exc:
            return f"line {exc.lineno}: {exc.msg}"
        return None
    root = parser(language).parse(code.encode("utf-8")).root_node
    error = parse_error("test", language, root)
    return str(error).split(" (", 1)[-1].rstrip(")") if error else None
