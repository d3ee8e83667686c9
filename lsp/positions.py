"""LSP positions <-> code-point offsets, in the negotiated position encoding.

LSP counts a position's character in UTF-16 code units by default (or UTF-8
bytes, or code points); the worker counts code points. Lines end at `\\n`,
`\\r\\n` or a lone `\\r`, as the LSP specification defines them (no other
character breaks a line). Positions past the end of a line clamp to the line's
end (before its line break) and lines past the end clamp to the end of the
document, as the specification asks.
"""

from __future__ import annotations

import re

UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _units(ch: str, encoding: str) -> int:
    if encoding == UTF32:
        return 1
    cp = ord(ch)
    if encoding == UTF16:
        return 2 if cp > 0xFFFF else 1
    return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4


def line_starts(text: str) -> list[int]:
    """Offset of the first character of every line (a `\\r\\n` is one break)."""
    if "\r" not in text:  # the common case, without the regex
        starts = [0]
        pos = text.find("\n")
        while pos >= 0:
            starts.append(pos + 1)
            pos = text.find("\n", pos + 1)
        return starts
    return [0, *(m.end() for m in _LINE_BREAK.finditer(text))]


def _line_end(text: str, starts: list[int], line: int) -> int:
    """Offset just before the line break that ends `line` (or the end of the text)."""
    if line + 1 >= len(starts):
        return len(text)
    end = starts[line + 1] - 1
    if text[end] == "\n" and end > starts[line] and text[end - 1] == "\r":
        end -= 1
    return end


def offset_at(text: str, line: int, character: int, encoding: str = UTF16, starts: list[int] | None = None) -> int:
    """Code-point offset of an LSP position (clamped into the text)."""
    starts = starts if starts is not None else line_starts(text)
    if line < 0 or character < 0:
        raise ValueError(f"negative position {line}:{character}")
    if line >= len(starts):
        return len(text)
    start = starts[line]
    end = _line_end(text, starts, line)
    if encoding == UTF32:
        return min(start + character, end)
    units = 0
    i = start
    while i < end and units < character:
        units += _units(text[i], encoding)
        i += 1
    return i


def line_start_before(text: str, offset: int) -> int:
    """Offset of the first character of the line that holds `offset`."""
    return max(text.rfind("\n", 0, offset), text.rfind("\r", 0, offset)) + 1


def position_at(text: str, offset: int, encoding: str = UTF16) -> tuple[int, int]:
    """LSP (line, character) of a code-point offset."""
    offset = max(0, min(offset, len(text)))
    if offset and text[offset - 1] == "\r" and offset < len(text) and text[offset] == "\n":
        offset -= 1  # between the two characters of a \r\n: the end of that line
    head = text[:offset]
    line = len(line_starts(head)) - 1
    start = line_start_before(text, offset)
    return line, sum(_units(ch, encoding) for ch in text[start:offset])
