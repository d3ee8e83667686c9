"""Line patterns of generated tests, mined with tree-sitter (the drafter that proposes them: drafting.py).

DiffTester's insight (TECHNIQUES.md section 3), for an autoregressive model: tests of one focal
function repeat the same structure (the same calls, the same assert shape) and differ mostly in
literals. So:

- Every line of the tests generated so far is parsed on its own (a partial line's syntax errors
  stay local) and reduced to a *shape*: its syntax tree with each literal (numbers, strings,
  booleans, None/null, and here also negative numbers and lists/tuples/arrays made only of
  literals) and each comment replaced by a hole. Lines whose shapes are equal (same node types,
  identical identifiers and operators) form a group; the text between the holes of the group's
  latest line is its *template*.
- Groups remember which group followed them and across what gap (line break, blank lines,
  indentation), so the end of one line predicts the start of the next.
- While decoding, the current line is matched against the templates (match_template), holes
  consuming one literal each (scan_literal).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from .languages import parser

# Node types that are literals (holes) in each grammar.
LITERALS = {
    "python": {"integer", "float", "string", "concatenated_string", "true", "false", "none"},
    "java": {
        "decimal_integer_literal", "hex_integer_literal", "octal_integer_literal", "binary_integer_literal",
        "decimal_floating_point_literal", "hex_floating_point_literal", "string_literal", "character_literal",
        "text_block", "true", "false", "null_literal",
    },
    "cpp": {
        "number_literal", "string_literal", "raw_string_literal", "char_literal", "concatenated_string",
        "true", "false", "null", "nullptr", "user_defined_literal",
    },
}
COMMENTS = {"python": {"comment"}, "java": {"line_comment", "block_comment"}, "cpp": {"comment"}}
# A container whose elements are all literals is a literal too (tests vary input sizes, not only values).
CONTAINERS = {
    "python": {"list", "tuple", "set", "dictionary", "pair", "parenthesized_expression"},
    "java": {"array_initializer"},
    "cpp": {"initializer_list"},
}
NEGATION = {"python": "unary_operator", "java": "unary_expression", "cpp": "unary_expression"}

HOLE = "\u2026"  # how a hole is shown in --explain
RECENT_LINES = 32  # lines per group whose literals are kept for guessing


# -- one line's shape -------------------------------------------------------------


@dataclass(frozen=True)
class LineShape:
    signature: tuple  # the syntax tree, literals and comments as holes: equal signatures group
    segments: tuple[str, ...]  # the line's text between holes (one more than holes)
    holes: tuple[str, ...] = ()  # this line's literals (an example of what each hole holds)

    @property
    def pattern(self) -> str:
        return HOLE.join(self.segments)


def _is_literal(node, language: str) -> bool:
    kind = node.type
    if kind in LITERALS[language]:
        return True
    if kind == NEGATION[language] and node.child_count == 2 and node.children[0].type in ("-", "+"):
        return _is_literal(node.children[1], language)
    if kind in CONTAINERS[language]:
        named = [c for c in node.children if c.is_named and c.type not in COMMENTS[language]]
        # "()" is no literal (a call's parentheses); "(1)" and "[]" are
        return (bool(named) or kind != "parenthesized_expression") and all(_is_literal(c, language) for c in named)
    return False


def shape_of(content: str, language: str) -> LineShape | None:
    """The shape of one line (without its indentation); None for a blank line."""
    if not content.strip():
        return None
    data = content.encode("utf-8")
    tree = parser(language).parse(data)
    holes: list[tuple[int, int]] = []

    def walk(node) -> tuple | None:
        if node.type in COMMENTS[language]:
            holes.append((node.start_byte, node.end_byte))
            return None  # a comment is a hole in the text and nothing in the shape: with or without one, lines group
        if node.is_named and _is_literal(node, language):
            holes.append((node.start_byte, node.end_byte))
            return ("*",)
        if node.child_count == 0:
            return (node.type, node.text.decode("utf-8", "replace"))
        return (node.type, tuple(sig for sig in map(walk, node.children) if sig is not None))

    signature = walk(tree.root_node) or ("comment",)
    segments, literals, last = [], [], 0
    for start, end in holes:
        segments.append(data[last:start].decode("utf-8", "replace"))
        literals.append(data[start:end].decode("utf-8", "replace"))
        last = end
    segments.append(data[last:].decode("utf-8", "replace"))
    return LineShape(signature, tuple(segments), tuple(literals))


# -- literals in text: what a hole consumes while matching ------------------------------

NUMBER_CHARS = frozenset("0123456789abcdefABCDEFxXoO_.+-jJlLuU")
WORD_LITERALS = ("True", "False", "None", "true", "false", "null", "nullptr", "NULL")
OPEN, CLOSE = "([{", ")]}"


def scan_literal(text: str, pos: int, language: str) -> tuple[int, bool] | None:
    """Where the literal starting at text[pos] ends: (end, closed). closed is False when the text ends
    inside it or where it could still go on (a number, a word); None when no literal starts there."""
    if pos >= len(text):
        return pos, False
    ch = text[pos]
    comment = "#" if language == "python" else "//"
    if text.startswith(comment, pos) or text.startswith("/*", pos):
        return len(text), False  # a comment runs to the end of the line
    if ch in "\"'" or (ch in "bBrRuUfFL" and pos + 1 < len(text) and text[pos + 1] in "\"'"):
        quote_at = pos if ch in "\"'" else pos + 1
        return _scan_quoted(text, quote_at)
    if ch in OPEN:
        depth, i = 0, pos
        while i < len(text):
            c = text[i]
            if c in "\"'":
                end, closed = _scan_quoted(text, i)
                if not closed:
                    return len(text), False
                i = end
                continue
            if c in OPEN:
                depth += 1
            elif c in CLOSE:
                depth -= 1
                if depth == 0:
                    return i + 1, True
            i += 1
        return len(text), False
    if ch.isdigit() or (ch in "-+." and pos + 1 < len(text) and (text[pos + 1].isdigit() or text[pos + 1] == ".")) or (
        ch in "-+." and pos + 1 == len(text)
    ):
        i = pos + 1
        while i < len(text) and (text[i] in NUMBER_CHARS and not (text[i] in "+-" and text[i - 1] not in "eE")):
            i += 1
        return i, i < len(text)
    if ch.isalpha() or ch == "_":
        i = pos
        while i < len(text) and (text[i].isalnum() or text[i] == "_"):
            i += 1
        word = text[pos:i]
        if i < len(text):
            return (i, True) if word in WORD_LITERALS else None
        return (i, False) if any(w.startswith(word) for w in WORD_LITERALS) else None  # True, Tr, ...
    return None


def _scan_quoted(text: str, pos: int) -> tuple[int, bool]:
    quote = text[pos]
    if text.startswith(quote * 3, pos):
        end = text.find(quote * 3, pos + 3)
        return (end + 3, True) if end >= 0 else (len(text), False)
    i = pos + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            return i + 1, True
        i += 1
    return len(text), False


@dataclass
class Match:
    """Where a line's content stands against a template."""

    segment: int  # index of the segment the content ends in (or of the segment before the hole it ends in)
    offset: int  # characters of that segment already written
    partial: str | None = None  # the content ends inside the hole after `segment`: the literal so far
    literals: tuple[str, ...] = ()  # the literals the content filled the holes before it with


def match_template(content: str, segments: Sequence[str], language: str) -> Match | None:
    """Match a line's content (no indentation) against a template; None when it does not fit."""
    pos = 0
    literals: list[str] = []
    for i, segment in enumerate(segments):
        if i > 0:
            scanned = scan_literal(content, pos, language)
            if scanned is None:
                return None
            end, closed = scanned
            if not closed and end >= len(content):
                return Match(i - 1, len(segments[i - 1]), partial=content[pos:], literals=tuple(literals))
            literals.append(content[pos:end])
            pos = end
        rest = content[pos:]
        if len(rest) <= len(segment):
            return Match(i, len(rest), literals=tuple(literals)) if segment.startswith(rest) else None
        if not rest.startswith(segment):
            return None
        pos += len(segment)
    return None  # the content goes on past the template


# -- the mined groups ----------------------------------------------------------------------


@dataclass
class Group:
    id: int
    shape: LineShape  # the latest line's (its segments are the template)
    lines: list[int] = field(default_factory=list)  # absolute line numbers of its lines
    recent: list[LineShape] = field(default_factory=list)  # its latest lines' shapes (their literals), oldest first
    last_seen: int = 0  # order of the latest line mined into it
    next_group: int | None = None  # the group of the line that followed the latest line, and the gap
    gap: str = ""

    @property
    def pattern(self) -> str:
        return self.shape.pattern


@dataclass
class Occurrence:
    text: str
    group: int
    indent: str


class PatternMiner:
    """Groups of lines by shape, fed one complete line at a time in file order."""

    def __init__(self, language: str):
        parser(language)  # fail early for a language without a grammar
        self.language = language
        self.groups: dict[tuple, Group] = {}
        self.by_id: list[Group] = []
        self.lines: dict[int, Occurrence] = {}  # absolute line number -> its occurrence
        self._order = 0
        self._previous: int | None = None  # the last non-blank line mined

    def add_line(self, number: int, text: str) -> Group | None:
        """Mine line `number` (its whole text, indentation included); a line already mined is skipped."""
        known = self.lines.get(number)
        if known is not None and known.text == text:
            return self.by_id[known.group]
        content = text.lstrip()
        shape = shape_of(content, self.language)
        if shape is None:
            return None
        group = self.groups.get(shape.signature)
        if group is None:
            group = self.groups[shape.signature] = Group(id=len(self.by_id), shape=shape)
            self.by_id.append(group)
        self._order += 1
        group.shape, group.last_seen = shape, self._order
        group.lines.append(number)
        group.recent = (group.recent + [shape])[-RECENT_LINES:]
        indent = text[: len(text) - len(content)]
        self.lines[number] = Occurrence(text, group.id, indent)
        previous = self._previous
        if previous is not None and previous < number:
            before = self.by_id[self.lines[previous].group]
            before.next_group, before.gap = group.id, "\n" * (number - previous) + indent
        self._previous = number
        return group

    def group_of_line(self, number: int) -> Group | None:
        found = self.lines.get(number)
        return self.by_id[found.group] if found is not None else None

    def candidates(self, first: Group | None, min_lines: int) -> list[Group]:
        """Groups to match a line against: the predicted one first, then the most recently seen."""
        ordered = sorted(self.by_id, key=lambda g: -g.last_seen)
        if first is not None:
            ordered = [first] + [g for g in ordered if g.id != first.id]
        return [g for g in ordered if len(g.lines) >= min_lines]
