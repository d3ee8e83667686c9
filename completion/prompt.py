"""What the model sees for one request, and the constraint its first tokens must meet (token healing).

Token healing, as a constraint on text rather than on one token. A tokenizer
splits the end of the text before the cursor differently from how it splits the
same characters once the user's code goes on: SmolLM2 writes a trailing "\\n    "
as one token, but "\\n    return" as "\\n   " + " return"; "x = retu" ends in
" re" + "tu" where "x = return" has " return". A context ending on such a split
asks the model to continue from a token sequence it has rarely seen, and it
answers with junk (often more whitespace).

So the prompt backs up over the end of the context wherever the split there is
unnatural: the trailing run of whitespace, of identifier characters (a partial
word or number), or of operator characters. Those tokens are removed and their
text becomes `heal`. Decoding is then constrained so that the generated text
stays consistent with `heal` until it is covered: each generated token must
either be a prefix of what remains of `heal`, or cover it and go on. What the
user sees is only the text after `heal`.

Whitespace-exact suggestions. When the cursor sits on a line holding nothing but
indentation (the editor's auto-indent after Enter), the suggestion is inserted
after that indentation, so it must not add any: once `heal` is covered, the next
character may not be whitespace. At column 0 of an empty line it may be
indentation but not a line break (the suggestion belongs on this line).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Callable, Sequence

# How far back healing may reach: enough for a partial identifier or an indentation run,
# bounded so that a long word does not turn into a long constrained decode.
MAX_HEAL_TOKENS = 6
MAX_HEAL_CHARS = 48

# A truncated context starts on a multiple of this, so it moves rarely (unless the budget is under
# one hop, where rounding would leave too little: then it starts exactly a budget from the end).
WINDOW_HOP = 256

# After `heal` is covered, the first new character may not be any of these.
NO_WHITESPACE = " \t\r\n\f\v"
NO_LINE_BREAK = "\r\n"


@dataclass
class Prompt:
    ids: list[int]  # the token ids the model sees
    text_before: str
    text_after: str
    truncated: bool = False
    heal: str = ""  # text taken off the end of the context; generation reproduces it first
    # Characters the first generated character after `heal` may not be ("" = any).
    forbidden_after_heal: str = ""
    fim: bool = False


def char_class(ch: str) -> str:
    if ch in " \t\r\n\f\v":
        return "space"
    if ch.isalnum() or ch == "_":
        return "word"
    return "symbol"


def trailing_run_start(text: str) -> int:
    """Start of the run of same-class characters (whitespace, word or symbol) that ends `text`."""
    if not text:
        return 0
    cls = char_class(text[-1])
    i = len(text) - 1
    while i > 0 and char_class(text[i - 1]) == cls:
        i -= 1
    return i


def heal_length(ids: Sequence[int], text_before: str, token_text: Callable[[int], str], special: frozenset[int]) -> int:
    """How many tokens to take off the end of `ids` (which encode `text_before`) for token healing.

    Enough tokens to cover the trailing run of the text's last character class, at least one,
    within MAX_HEAL_TOKENS / MAX_HEAL_CHARS; never a special token or a partial character,
    and never the whole context.
    """
    run = len(text_before) - trailing_run_start(text_before)
    taken, chars = 0, 0
    while taken < min(MAX_HEAL_TOKENS, len(ids) - 1):
        token = ids[len(ids) - 1 - taken]
        text = token_text(token)
        if token in special or "\ufffd" in text or not text or chars + len(text) > MAX_HEAL_CHARS:
            break
        taken += 1
        chars += len(text)
        if chars >= run:
            break
    return taken


def line_prefix(text_before: str) -> str:
    """The text between the start of the cursor's line and the cursor (LSP line breaks: \\n, \\r\\n, \\r)."""
    start = max(text_before.rfind("\n"), text_before.rfind("\r")) + 1
    return text_before[start:]


def line_rest(text_after: str) -> str:
    """The text between the cursor and the end of its line (LSP line breaks: \\n, \\r\\n, \\r)."""
    ends = [i for i in (text_after.find("\n"), text_after.find("\r")) if i >= 0]
    return text_after[: min(ends)] if ends else text_after


def forbidden_after(text_before: str, text_after: str) -> str:
    """What the suggestion may not start with, given where the cursor is."""
    if line_rest(text_after).strip():
        return ""
    prefix = line_prefix(text_before)
    if prefix and not prefix.strip():
        return NO_WHITESPACE  # after auto-indentation: the indentation is already there
    if not prefix and text_before:
        return NO_LINE_BREAK  # column 0 of an empty line: the suggestion goes on this line
    return ""


class Vocabulary:
    """Token texts of a model, indexed for the healing constraint's lookups."""

    def __init__(self, texts: Sequence[str], excluded: frozenset[int]):
        # Special tokens and partial characters never take part in healing.
        self.texts = list(texts)
        usable = [(t, i) for i, t in enumerate(self.texts) if t and i not in excluded and "\ufffd" not in t]
        usable.sort()
        self._sorted_texts = [t for t, _ in usable]
        self._sorted_ids = [i for _, i in usable]
        self._by_text: dict[str, list[int]] = {}
        for t, i in usable:
            self._by_text.setdefault(t, []).append(i)

    def starting_with(self, prefix: str) -> list[int]:
        lo = bisect.bisect_left(self._sorted_texts, prefix)
        hi = bisect.bisect_left(self._sorted_texts, prefix + "\U0010ffff")
        return self._sorted_ids[lo:hi]

    def exactly(self, text: str) -> list[int]:
        return self._by_text.get(text, [])

    def allowed(self, remaining: str, forbidden_next: str) -> list[int]:
        """Token ids allowed when `remaining` of the healed text is still to be generated.

        A token may be a proper prefix of `remaining`, or cover it and go on, provided the first
        character past it is not in `forbidden_next`. With `remaining` empty (just covered),
        only that first-character rule applies.
        """
        ids = [i for n in range(1, len(remaining)) for i in self.exactly(remaining[:n])]
        if not remaining:
            candidates = self._sorted_ids
        else:
            candidates = self.starting_with(remaining)
        if not forbidden_next:
            return ids + list(candidates)
        k = len(remaining)
        return ids + [i for i in candidates if len(self.texts[i]) == k or self.texts[i][k] not in forbidden_next]


class HealingConstraint:
    """Tracks generated text against `heal`; says which tokens the next step may take, or None once free."""

    def __init__(self, heal: str, forbidden_next: str):
        self.heal = heal
        self.forbidden_next = forbidden_next

    def remaining(self, generated: str) -> str | None:
        """What of `heal` (plus the one-character rule) is still to be met; None when the constraint is done."""
        if len(generated) > len(self.heal) or (len(generated) == len(self.heal) and not self.forbidden_next):
            return None
        return self.heal[len(generated) :]

    def visible(self, generated: str) -> str:
        """The part of the generated text the user sees: what comes after `heal`."""
        return generated[len(self.heal) :] if generated.startswith(self.heal) else ""
