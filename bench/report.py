"""What every benchmark's report shares: writing `--json PATH`, and the edit similarity (ES) of two texts."""

from __future__ import annotations


def write_report(path: str | None, report: dict) -> None:
    """Write a benchmark's machine-readable results (`--json PATH`), if asked for."""
    if not path:
        return
    import json
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(report, indent=2))


def edit_similarity(a: str, b: str) -> float:
    """1 - Levenshtein distance / longer length: the ES of the PIE paper and of code-completion papers."""
    from rapidfuzz.distance import Levenshtein

    return Levenshtein.normalized_similarity(a, b)
