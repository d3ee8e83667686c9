"""Stop rules: where a completion ends, decided from text alone (no model, no tokens).

A `StopRules` is built once per request from the text around the cursor and then
shown the whole generated text after every token. It answers with the part of
the text that is final (safe to stream) and, once the completion should end,
the stop reason and the final text.

Rules:
- single-line: end at the first newline after some non-blank text (a
  completion that starts at the end of a line may begin with a newline and
  then fill the next line);
- multi-line: end before the first later line that leaves the current block
  (indented less than the cursor's line; or, after a block opener such as
  "def f():", not indented more than it), or at a blank line when completing
  at top level;
- never repeat what follows the cursor: when the line being completed ends
  with the text after the cursor on that line, that text is cut off, and when
  a generated line equals the next line of the document, stop before it (a
  single-line suggestion that would only duplicate the next line is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

from .rpc.wire import AUTO, MULTI_LINE, SINGLE_LINE

BLOCK_OPENERS = (":", "{", "(", "[", "=>", "->", " do", " then")


def bracket_depth(text: str) -> int:
    """Opening minus closing brackets, outside string literals (a rough count: one line of code)."""
    depth, quote, escaped = 0, "", False
    for ch in text:
        if quote:
            escaped = ch == "\\" and not escaped
            if ch == quote and not escaped:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
    return depth


def indentation(line: str) -> int:
    """Width of a line's leading whitespace (a tab counts as 4)."""
    width = 0
    for ch in line:
        if ch == " ":
            width += 1
        elif ch == "\t":
            width += 4
        else:
            break
    return width


@dataclass
class StopDecision:
    committed: str  # prefix of the final text that can be sent now
    stop_reason: str | None = None  # set once the completion should end
    final: str | None = None  # the final text, with stop_reason


class StopRules:
    def __init__(self, text_before: str, text_after: str, mode: str = AUTO):
        line_start = text_before.rfind("\n") + 1
        self.line_prefix = text_before[line_start:]
        line_end = text_after.find("\n")
        self.line_suffix = (text_after if line_end < 0 else text_after[:line_end]).strip()
        rest = "" if line_end < 0 else text_after[line_end + 1 :]
        self.next_line = next((ln.strip() for ln in rest.split("\n") if ln.strip()), "")
        self.base_indent = indentation(self.line_prefix)
        stripped = self.line_prefix.rstrip()
        self.opens_block = bool(stripped) and stripped.endswith(BLOCK_OPENERS) and not self.line_suffix
        if mode == AUTO:
            # Multi-line where a block starts or on an empty line; inside a line, finish that line.
            at_blank_line = not self.line_prefix.strip() and not self.line_suffix
            mode = MULTI_LINE if (self.opens_block or at_blank_line) else SINGLE_LINE
        self.mode = mode
        if self.opens_block:
            self.base_indent = indentation(self.line_prefix)

    def check(self, generated: str) -> StopDecision:
        """Decide on the generated text so far."""
        lines = generated.split("\n")
        # First line: the rest of the cursor's line.
        first = lines[0]
        # Only a finished first line can be judged: ")" may close a call the model opened itself.
        cut = self._suffix_cut(first) if len(lines) > 1 else None
        if cut is not None:
            return self._stop(first[:cut], "suffix")
        if self.mode == SINGLE_LINE or self.line_suffix:
            # Text after the cursor on this line means a one-line completion whatever the mode.
            return self._single_line(lines)
        return self._multi_line(lines)

    def finish(self, generated: str, reason: str) -> StopDecision:
        """The model stopped (end of sequence, token budget, cancel): apply the rules once more and end."""
        decision = self.check(generated)
        if decision.stop_reason is not None:
            return decision
        lines = generated.split("\n")
        cut = self._suffix_cut(lines[0]) if len(lines) == 1 else None
        if cut is not None:
            return self._stop(lines[0][:cut], "suffix")
        if (self.mode == SINGLE_LINE or self.line_suffix) and self._repeats_next_line(generated.lstrip("\r\n"), not generated.startswith(("\n", "\r"))):
            return self._stop("", "suffix")
        if self.mode == MULTI_LINE and not self.line_suffix and len(lines) > 1:
            # An unfinished last line is dropped unless it is all there is after the first line.
            body = "\n".join(lines[:-1]) if lines[-1].strip() and reason == "max_tokens" and len(lines) > 2 else generated
            return self._stop(body, reason)
        return self._stop(generated, reason)

    # -- rules -----------------------------------------------------------

    def _suffix_cut(self, first_line: str) -> int | None:
        """Where the first line reaches the text already after the cursor, if it does.

        The line may repeat that text and go on ("10, 10))  # area" where ")" follows the cursor):
        of the places where it starts, the first at which the cursor's line, completed there,
        has its brackets balanced is the cut; else the line must end with it.
        """
        if not self.line_suffix:
            return None
        start = first_line.find(self.line_suffix)
        while start >= 0:
            if bracket_depth(self.line_prefix + first_line[:start] + self.line_suffix) == 0:
                return start
            start = first_line.find(self.line_suffix, start + 1)
        stripped = first_line.rstrip()
        if stripped.endswith(self.line_suffix):
            return len(stripped) - len(self.line_suffix)
        return None

    def _single_line(self, lines: list[str]) -> StopDecision:
        # Leading newlines are allowed only when the cursor ends its line: the completion fills the next line.
        content = 0
        while content < len(lines) - 1 and not lines[content].strip() and not self.line_suffix:
            content += 1
        if content < len(lines) - 1:  # the line with content is complete
            if self._repeats_next_line(lines[content], content == 0):
                return self._stop("", "suffix")
            return self._stop("\n".join(lines[: content + 1]), "end_of_line")
        return StopDecision(committed="")

    def _repeats_next_line(self, line: str, on_cursor_line: bool) -> bool:
        """True when a completed line would read exactly as the next non-blank line of the document."""
        whole = (self.line_prefix + line) if on_cursor_line else line
        return bool(self.next_line) and not self.line_suffix and whole.strip() == self.next_line

    def _multi_line(self, lines: list[str]) -> StopDecision:
        complete = lines[:-1]  # the last element is still being written
        if complete and self._repeats_next_line(lines[0], True):
            return self._stop("", "suffix")  # the first line would only repeat the line below
        accepted = 1
        seen_content = bool(lines[0].strip())
        for i in range(1, len(complete) + 1):
            line = lines[i] if i < len(lines) else ""
            is_complete = i < len(complete)
            if not line.strip():
                if seen_content and self.base_indent == 0 and not self.opens_block and is_complete:
                    return self._stop("\n".join(lines[:i]), "end_of_block")
                accepted = i + 1 if is_complete else accepted
                continue
            # Indentation is known once a line has any non-blank character.
            if self._leaves_block(line):
                return self._stop("\n".join(lines[:i]), "end_of_block")
            if is_complete and self.next_line and line.strip() == self.next_line:
                return self._stop("\n".join(lines[:i]), "suffix")
            seen_content = True
            if is_complete:
                accepted = i + 1
        # Every complete line accepted so far is final (the first one too, once its line break came).
        committed = "\n".join(lines[: min(accepted, len(complete))])
        return StopDecision(committed=committed.rstrip() if complete else "")

    def _leaves_block(self, line: str) -> bool:
        indent = indentation(line)
        if self.opens_block:
            return indent <= self.base_indent
        return indent < self.base_indent

    @staticmethod
    def _stop(text: str, reason: str) -> StopDecision:
        final = text.rstrip()
        return StopDecision(committed=final, stop_reason=reason, final=final)
