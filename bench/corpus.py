"""Where benchmarks read code from: any folder of Python files (default: the standard library)."""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path


def default_corpus() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_files(corpus: str | None, min_lines: int = 40, max_bytes: int = 400_000) -> list[Path]:
    root = Path(corpus) if corpus else default_corpus()
    if not root.is_dir():
        raise SystemExit(f"--corpus {root} is not a folder")
    skip = ("site-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3")
    files = []
    for path in sorted(root.rglob("*.py")):
        if any(part in skip for part in path.relative_to(root).parts[:-1]):
            continue
        try:
            size = path.stat().st_size
            if size > max_bytes:
                continue
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if text.count("\n") >= min_lines and "\x00" not in text:
            files.append(path)
    if not files:
        raise SystemExit(f"no Python files with at least {min_lines} lines under {root}")
    return files


def sample_files(corpus: str | None, count: int, seed: int) -> list[Path]:
    files = python_files(corpus)
    rng = random.Random(seed)
    return rng.sample(files, min(count, len(files)))
