"""The drafter of test generation: proposes the text the mined line patterns (patterns.py) share.

While decoding, the current line is matched against the templates, holes consuming one literal
each; when it matches a template's fixed text, the rest of that text up to the next hole is
proposed as a draft (and, at the end of the line, the gap and the start of the next line). The
model verifies the draft in one forward pass (completion/decode.py), so the output never
changes; only the number of forward passes does.

The drafter is told where a generation starts (`begin`) and counts the tokens it produced from the
verify feedback, so it reads the generated text from the end of the tokens it is shown whatever
else precedes them. Every draft is logged with the pattern that made it and how many of its
tokens the model kept (`rotary tests --explain`).

`make_drafter` makes the drafter a request names (rotary.completion.rpc.wire.TEST_DRAFTERS): the
patterns, n-gram lookup or none, each given what it needs when it is made.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from rotary.completion.drafters import NgramDrafter, NoDrafter
from rotary.completion.prompt import Prompt
from rotary.completion.rpc.wire import TEST_DRAFTERS

from .languages import TestGenError
from .patterns import Group, LineShape, Match, PatternMiner, match_template

# Draft tokens per verify. On a CPU a verify of 5 to 8 tokens costs about 2.5 one-token steps and
# one of 16 about 3.3, and patterns often predict 10 tokens or more (a line's end, the next line's
# start); 15 keeps a verify (16 tokens with the pending one) on the runner's decode threads.
DRAFT_TOKENS = 15


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
    (e.g. n-gram lookup) proposes where no pattern does; its drafts are logged as `fallback_name`'s.

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
        fallback_name: str = "fallback",
        min_lines: int = 1,
        max_draft: int = 16,
        chain_lines: bool = True,
        guess_literals: bool = False,
    ):
        self.miner = PatternMiner(language)
        self.language = language
        self.encode, self.decode = encode, decode
        self.fallback, self.fallback_name = fallback, fallback_name
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
                self._pending_record = DraftRecord(self.fallback_name, "", -1, self.decode(ids), len(ids))
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


# -- the drafter a request names --------------------------------------------------------------


class GeneratedTail:
    """Shows a drafter the prompt's ids and this generation's tokens, counted from the verify feedback,
    whatever else the decoder puts before them (so every drafter of a benchmark sees the same text).

    `decode`: the model's ids -> text, for the records of --explain."""

    def __init__(self, inner, name: str, decode: Callable[[Sequence[int]], str]):
        self.inner, self.name, self.decode = inner, name, decode
        self.records: list[DraftRecord] = []
        self._prompt_ids: list[int] = []
        self._generated = 0
        self._pending: list[int] | None = None

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
    """A drafter for one batch of tests (kept across its tests: the patterns grow with them).
    `encode` / `decode`: the model's tokenizer (text -> ids, ids -> text)."""
    if kind == "plain":
        return GeneratedTail(NoDrafter(), "plain", decode)
    if kind == "ngram":
        return GeneratedTail(NgramDrafter(), "ngram", decode)
    if kind in ("ast", "ast+ngram", "ast-strict"):
        fallback = NgramDrafter() if kind == "ast+ngram" else None
        return AstPatternDrafter(
            language, encode, decode, fallback=fallback, fallback_name="ngram", max_draft=draft_tokens,
            guess_literals=kind != "ast-strict",
        )
    raise TestGenError(f"drafter: unknown {kind!r}; use one of {', '.join(TEST_DRAFTERS)}")
