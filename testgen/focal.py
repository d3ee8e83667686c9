"""The focal function: the function or method tests are generated for, found by its qualified name
(Python with `ast`, Java and C++ with tree-sitter), and the code of its module the model sees.

The model sees the whole file when it is small (WHOLE_FILE_CHARS), else the imports, the class
header and constructor, and the function itself.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import PurePath
from typing import Sequence

from .languages import SourceError, TestGenError, UnsupportedLanguage, language_of, parse_error, parser

WHOLE_FILE_CHARS = 6000  # a source this small is shown whole; a larger one as imports + class + function


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


def _find_java(path: str, text: str, qualname: str) -> Focal:
    data = text.encode("utf-8")
    root = parser("java").parse(data).root_node
    error = parse_error(path, "java", root)
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
    error = parse_error(path, "cpp", root)
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
