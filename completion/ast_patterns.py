"""Line patterns of generated tests, mined with tree-sitter, and a drafter that proposes their shared text.

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
- While decoding, the current line is matched against the templates, holes consuming one literal
  each; when it matches a template's fixed text, the rest of that text up to the next hole is
  proposed as a draft (and, at the end of the line, the gap and the start of the next line). The
  model verifies the draft in one forward pass (decode.py), so the output never changes; only the
  number of forward passes does.

The drafter is told where a generation starts (`begin`) and counts the tokens it produced from the
verify feedback, so it reads the generated text from the end of the tokens it is shown whatever
else precedes them. Every draft is logged with the pattern that made it and how many of its
tokens the model kept (`rotary tests --explain`).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

from .prompt import Prompt

# Languages with a tree-sitter grammar from PyPI (module, function returning the language).
GRAMMARS = {"python": "tree_sitter_python", "java": "tree_sitter_java", "cpp": "tree_sitter_cpp"}
EXTENSIONS = {
    ".py": "python", ".pyi": "python", ".java": "java",
    ".cpp": "cpp", ".cc": "cpp", ".cxx": "cpp", ".c++": "cpp", ".hpp": "cpp", ".hh": "cpp", ".hxx": "cpp", ".h": "cpp",
}
LANGUAGE_IDS = {"python": "python", "java": "java", "cpp": "cpp", "c++": "cpp", "c": "cpp"}

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


# -- the drafter ---------------------------------------------------------------------------------


@dataclass
class DraftRecord:
    """One draft, for --explain: who made it, what it said, how much of it the model kept."""

    source: str  # "ast" or the fallback's name
    pattern: str  # the template that drafted it ("" for the fallback)
    group: int  # its group id (-1 for the fallback)
    text: str
    proposed: int  # tokens
    kept: int = 0


class AstPatternDrafter:
    """The Drafter protocol (drafters.py) over mined line patterns; an optional fallback drafter
    (e.g. n-gram lookup) proposes where no pattern does.

    `encode` / `decode`: the model's tokenizer (text -> ids, ids -> text). The fallback is shown the
    prompt's ids and this generation's tokens (whatever the decoder shows before them). `min_lines`: a group
    drafts once it has this many lines (DiffTester uses groups of 2 or more; verification is
    lossless here, so 1 costs only a rejected draft when a pattern was seen once). `max_draft`:
    at most this many tokens per draft (also at most the k the decoder asks for).
    """

    name = "ast"

    def __init__(
        self,
        language: str,
        encode: Callable[[str], list[int]],
        decode: Callable[[Sequence[int]], str],
        fallback=None,
        min_lines: int = 1,
        max_draft: int = 16,
        chain_lines: bool = True,
        guess_literals: bool = False,
    ):
        self.miner = PatternMiner(language)
        self.language = language
        self.encode, self.decode = encode, decode
        self.fallback = fallback
        self.min_lines = min_lines
        self.max_draft = max_draft
        self.chain_lines = chain_lines
        self.guess_literals = guess_literals
        self.records: list[DraftRecord] = []  # the current generation's drafts
        self.proposed = 0
        self.kept = 0
        self._mine_from_line = 0
        self._base_lines = 0  # complete lines before the generation starts
        self._first_partial = ""  # the text of the line the generation starts in, before it
        self._prompt_ids: list[int] = []
        self._generated = 0  # tokens generated so far in this generation (from the verify feedback)
        self._pending_record: DraftRecord | None = None

    # -- the generation's frame ------------------------------------------------------

    def begin(self, prompt: Prompt, mine_from: int = 0) -> None:
        """A new generation continues `prompt`; lines of its text from character `mine_from` on are
        tests (earlier lines, the focal code, are never mined)."""
        base = prompt.text_before[: len(prompt.text_before) - len(prompt.heal)]
        head, newline, partial = base.rpartition("\n")
        self._base_lines = base.count("\n")
        self._first_partial = partial
        self._mine_from_line = base.count("\n", 0, mine_from)
        lines = head.split("\n") if newline else []
        for number in range(self._mine_from_line, len(lines)):
            self.miner.add_line(number, lines[number])
        self._prompt_ids = list(prompt.ids)
        self._generated = 1  # the first token is chosen from the prefill's logits before any draft
        self.records = []
        self._pending_record = None

    def generated_ids(self, tokens: Sequence[int]) -> list[int]:
        """This generation's tokens: the end of what the decoder shows (the context before it may vary)."""
        return list(tokens[len(tokens) - self._generated :]) if self._generated else []

    # -- the Drafter protocol -------------------------------------------------------

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        k = min(k, self.max_draft)
        if k <= 0:
            return []
        generated = self.generated_ids(tokens)
        lines = (self._first_partial + self.decode(generated)).split("\n")
        for i in range(len(lines) - 1):  # complete lines of this generation are patterns too
            number = self._base_lines + i
            if number >= self._mine_from_line:
                self.miner.add_line(number, lines[i])
        current_number = self._base_lines + len(lines) - 1
        text, follow, group = self._draft_text(lines, current_number)
        ids = self._encode_draft(text, follow)[:k] if text else []
        if ids:
            self._pending_record = DraftRecord("ast", group.pattern, group.id, self.decode(ids), len(ids))
            return ids
        if self.fallback is not None:
            ids = list(self.fallback.propose([*self._prompt_ids, *generated], k))
            if ids:
                self._pending_record = DraftRecord(getattr(self.fallback, "name", "fallback"), "", -1, self.decode(ids), len(ids))
            return ids
        return []

    def accepted(self, proposed: int, kept: int) -> None:
        self._generated += kept + 1
        self.proposed += proposed
        self.kept += kept
        record, self._pending_record = self._pending_record, None
        if record is not None and proposed:
            record.kept = kept
            self.records.append(record)
        if self.fallback is not None and record is not None and record.source != "ast":
            self.fallback.accepted(proposed, kept)  # counters only (n-gram lookup learns nothing from it)

    # -- what to propose --------------------------------------------------------------

    def _draft_text(self, lines: list[str], current_number: int) -> tuple[str, str, Group | None]:
        """What the patterns predict after the current line so far: (text, the literal expected after
        it, the group predicting it); text is empty when they predict nothing."""
        nothing = "", "", None
        previous = self._previous_line(current_number, lines)
        before = self.miner.group_of_line(previous) if previous is not None else None
        current = lines[-1]
        content = current.lstrip()
        if not content:
            # At the start of a line (or in the blank lines between): the group that followed the previous line.
            if before is None or before.next_group is None:
                return nothing
            since = "\n" * (current_number - previous) + current
            if not before.gap.startswith(since):
                return nothing
            nxt = self.miner.by_id[before.next_group]
            if len(nxt.lines) < self.min_lines:
                return nothing
            return (*self._take(self._pieces(nxt, 0, 0, before.gap[len(since) :])), nxt)
        predicted = self.miner.by_id[before.next_group] if before is not None and before.next_group is not None else None
        for group in self.miner.candidates(predicted, self.min_lines):
            found = match_template(content, group.shape.segments, self.language)
            if found is not None:
                shape = self._example(group, found) if self.guess_literals else group.shape
                text, follow = self._take(self._pieces(group, found.segment, found.offset, "", found.partial, shape))
                if text:
                    return text, follow, group
                if found.partial is None:
                    return nothing  # the line is at a hole of its best match: the literal is the model's
        return nothing

    @staticmethod
    def _example(group: Group, found: Match) -> LineShape:
        """The line of the group whose literals the current line has repeated so far (the latest such,
        else the latest whose literal starts as the one being written, else the latest line)."""
        n = len(found.literals)
        fits = [
            shape for shape in reversed(group.recent)
            if shape.segments == group.shape.segments  # (the same shape may be spaced differently)
            and (found.partial is None or (n < len(shape.holes) and shape.holes[n].startswith(found.partial)))
        ]
        same = next((shape for shape in fits if shape.holes[:n] == found.literals), None)
        return same or (fits[0] if fits else group.shape)

    def _pieces(self, group: Group, segment: int, offset: int, prefix: str, partial: str | None = None, shape=None):
        """The text a line of the group (`shape`, default its latest) goes on with from (segment,
        offset), as (text, is_literal) pieces: fixed text, the literal that hole held there, fixed
        text, ...; at the end of the line, the gap and the next group's latest line, and so on."""
        shape = shape or group.shape
        if partial is not None:
            example = shape.holes[segment]
            if not example.startswith(partial):
                return
            yield prefix + example[len(partial) :], True
            segment, offset, prefix = segment + 1, 0, ""
        while True:
            yield prefix + shape.segments[segment][offset:], False
            prefix, offset = "", 0
            if segment < len(shape.holes):
                yield shape.holes[segment], True
                segment += 1
                continue
            if not self.chain_lines or group.next_group is None:
                return
            nxt = self.miner.by_id[group.next_group]
            if len(nxt.lines) < self.min_lines:
                return
            group, shape, segment, prefix = nxt, nxt.shape, 0, group.gap

    def _take(self, pieces) -> tuple[str, str]:
        """Join pieces up to the first literal (unless literals are guessed) or the length budget;
        return the text and the literal that follows it ("" when none does)."""
        text, budget = "", 4 * self.max_draft  # characters: tokens of code average 3 or so
        for piece, literal in pieces:
            if literal and not self.guess_literals:
                return text, piece
            text += piece
            if len(text) >= budget:
                break
        return text, ""

    def _encode_draft(self, text: str, follow: str) -> list[int]:
        """The tokens of `text` as the model would write them before `follow`: tokenized together,
        keeping only the tokens that end within `text` (a space before a literal belongs to it)."""
        ids = self.encode(text + follow)
        kept = []
        for token in ids:
            kept.append(token)
            if len(self.decode(kept)) > len(text):
                kept.pop()
                break
        return kept

    def _previous_line(self, current_number: int, lines: list[str]) -> int | None:
        """The last non-blank line before the current one (absolute number), if it was mined."""
        number = current_number - 1
        while number >= self._mine_from_line:
            i = number - self._base_lines
            text = lines[i] if i >= 0 else (self.miner.lines[number].text if number in self.miner.lines else "")
            if text.strip():
                return number if number in self.miner.lines else None
            number -= 1
        return None

    # -- explain -----------------------------------------------------------------------

    def groups(self) -> list[Group]:
        return list(self.miner.by_id)
