"""LSP positions <-> code-point offsets, in the negotiated position encoding.

LSP counts a position's character in UTF-16 code units by default (or UTF-8
bytes, or code points); the worker counts code points. Positions past the end
of a line clamp to the line's end and lines past the end clamp to the end of
the document, as the LSP specification asks.
"""

from __future__ import annotations

UTF8, UTF16, UTF32 = "utf-8", "utf-16", "utf-32"


def _units(ch: str, encoding: str) -> int:
    if encoding == UTF32:
        return 1
    cp = ord(ch)
    if encoding == UTF16:
        return 2 if cp > 0xFFFF else 1
    return 1 if cp < 0x80 else 2 if cp < 0x800 else 3 if cp < 0x10000 else 4


def line_starts(text: str) -> list[int]:
    starts = [0]
    pos = text.find("\n")
    while pos >= 0:
        starts.append(pos + 1)
        pos = text.find("\n", pos + 1)
    return starts


def offset_at(text: str, line: int, character: int, encoding: str = UTF16, starts: list[int] | None = None) -> int:
    """Code-point offset of an LSP position (clamped into the text)."""
    starts = starts if starts is not None else line_starts(text)
    if line < 0 or character < 0:
        raise ValueError(f"negative position {line}:{character}")
    if line >= len(starts):
        return len(text)
    start = starts[line]
    end = starts[line + 1] - 1 if line + 1 < len(starts) else len(text)
    if encoding == UTF32:
        return min(start + character, end)
    units = 0
    i = start
    while i < end and units < character:
        units += _units(text[i], encoding)
        i += 1
    return i


def position_at(text: str, offset: int, encoding: str = UTF16) -> tuple[int, int]:
    """LSP (line, character) of a code-point offset."""
    offset = max(0, min(offset, len(text)))
    line = text.count("\n", 0, offset)
    start = text.rfind("\n", 0, offset) + 1
    return line, sum(_units(ch, encoding) for ch in text[start:offset])
