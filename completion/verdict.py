"""Abstention: say nothing when the suggestion is likely wrong.

A suggestion that is wrong costs the user a read and a dismissal; SEC (TECHNIQUES.md
section 2) finds completions continued after a wrong token are accepted 4.2% of the time.
The gate scores the first line of a completion from the model's own confidence while it
wrote it: how probable its tokens were (mean, lowest, first), how far the chosen token led
the runner-up, and how long the line is. A logistic regression fitted by `rotary calibrate`
turns these into the probability that the line is right; below the threshold the worker
returns no completion and says so ("abstained"), and the daemon shows it in its status and
stats. The threshold is a setting (0 turns abstention off). While the first line is still being
written, `Gate.best_score` bounds the score of every way it could end: once even that is below the
threshold, decoding stops there with the same verdict (one very unlikely token usually settles it).
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

# Characters of context before a completion point: about 500 tokens, so calibration stays minutes on 2 cores.
CONTEXT_CHARS = 1500

FEATURES = ("mean_logprob", "min_logprob", "first_logprob", "mean_margin", "low_prob_frac", "log_tokens")


def line_features(logprobs: Sequence[float], margins: Sequence[float]) -> list[float]:
    """Features of one line from its tokens' log-probabilities and top-1 minus top-2 log-probability margins."""
    if not logprobs:
        return [0.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    return [
        statistics.fmean(logprobs),
        min(logprobs),
        logprobs[0],
        statistics.fmean(margins),
        sum(lp < math.log(0.5) for lp in logprobs) / len(logprobs),
        math.log1p(len(logprobs)),
    ]


@dataclass
class Gate:
    weights: list[float]
    bias: float
    threshold: float  # show the completion when score >= threshold

    def score(self, features: Sequence[float]) -> float:
        return _sigmoid(self.bias + sum(w * f for w, f in zip(self.weights, features)))

    def best_score(self, logprobs: Sequence[float], margins: Sequence[float], more: int, margin_bound: float) -> float:
        """An upper bound of the score of any first line that starts with these tokens and has at most
        `more` tokens more (each: log-probability <= 0, margin within +-margin_bound).

        Below the threshold, no ending of the line can pass: the completion is abstained on at once,
        the same decision the whole line would get, without decoding the rest of it (under load,
        abstained completions were about half of all). Each feature's term is bounded on its own
        (a sum of maxima bounds the maximum of the sum); every feature of n = k + r tokens is monotone
        in r, so each term's maximum is at r = 0 or r = more.
        """
        k = len(logprobs)
        if k == 0:
            return 1.0
        total, lowest, first = sum(logprobs), min(logprobs), logprobs[0]
        margin_sum, low = sum(margins), sum(lp < math.log(0.5) for lp in logprobs)

        def spans(r: int) -> list[tuple[float, float]]:
            """Each feature's (lowest, highest) over lines of k + r tokens, in FEATURES order."""
            n = k + r
            return [
                (-math.inf if r else total / n, total / n),  # mean_logprob
                (-math.inf if r else lowest, lowest),  # min_logprob
                (first, first),  # first_logprob
                ((margin_sum - margin_bound * r) / n, (margin_sum + margin_bound * r) / n),  # mean_margin
                (low / n, (low + r) / n),  # low_prob_frac
                (math.log1p(n), math.log1p(n)),  # log_tokens
            ]

        z = self.bias
        for weight, now, later in zip(self.weights, spans(0), spans(max(0, more))):
            z += max(weight * (hi if weight >= 0 else lo) for lo, hi in (now, later))  # +inf: no bound
        return _sigmoid(z)

    def as_dict(self) -> dict:
        return {"features": list(FEATURES), "weights": self.weights, "bias": self.bias, "threshold": self.threshold}

    @classmethod
    def from_dict(cls, data: dict) -> Gate:
        assert list(data["features"]) == list(FEATURES), "the gate was fitted on other features"
        return cls([float(w) for w in data["weights"]], float(data["bias"]), float(data["threshold"]))


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, z))))  # clamped: an infinite z is a sure 0 or 1


@dataclass
class Point:
    features: list[float]
    correct: bool  # the suggestion's first line equals the real rest of the line
    suggestion: str
    truth: str


def completion_points(files: Sequence[Path], count: int, seed: int) -> list[tuple[str, int, str]]:
    """(text up to the cursor, cursor offset, the real rest of the line) at random cuts inside lines of real code."""
    rng = random.Random(seed)
    points = []
    order = list(files)
    rng.shuffle(order)
    for path in order:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        lines = text.split("\n")
        candidates = [i for i, ln in enumerate(lines) if len(ln.strip()) >= 12 and i >= 5 and not ln.strip().startswith("#")]
        if not candidates:
            continue
        i = rng.choice(candidates)
        line = lines[i]
        indent = len(line) - len(line.lstrip())
        cut = rng.randint(indent + 2, len(line) - 3)
        offset = sum(len(ln) + 1 for ln in lines[:i]) + cut
        start = max(0, offset - CONTEXT_CHARS)
        # The file ends at the cursor, as when the rest of the line is being typed: with the rest of
        # the line still after the cursor, the stop rules (never repeat the text after the cursor)
        # would rightly refuse to write it.
        points.append((text[start:offset], offset - start, line[cut:].rstrip()))
        if len(points) == count:
            break
    return points


def collect_points(engine, files: Sequence[Path], count: int, seed: int, progress: Callable[[int], None] | None = None) -> list[Point]:
    """Complete the rest of a line at random cuts through the service's path; record features and correctness."""
    from .engine import CompletionOptions

    points = []
    options = CompletionOptions(max_tokens=32, mode="single_line", cache_mode="none", abstain_threshold=0.0)
    for text, offset, truth in completion_points(files, count, seed):
        chunks = list(engine.complete(None, text, offset, options))
        suggestion = "".join(c.text for c in chunks)
        points.append(Point(chunks[-1].features or line_features([], []), suggestion.strip() == truth.strip(), suggestion, truth))
        if progress:
            progress(1)
    return points


def fit_gate(fit: Sequence[Point], held: Sequence[Point], min_shown: float) -> tuple[dict, dict]:
    """Fit the logistic gate on `fit`; pick the threshold on `fit`; report on `held` (AUROC, shown, EM)."""
    import torch

    from .calibrate import auroc, fit_logistic

    x = torch.tensor([p.features for p in fit], dtype=torch.float32)
    y = torch.tensor([p.correct for p in fit])
    right = int(y.sum())
    if right in (0, len(fit)) or not torch.isfinite(x).all():
        raise ValueError(
            f"abstention gate: {right} of {len(fit)} training completions were right and "
            f"{'some' if not torch.isfinite(x).all() else 'no'} features were not finite; it needs both right and wrong "
            "completions with finite features (more --points, or a corpus of ordinary code)"
        )
    with torch.enable_grad():
        w, b = fit_logistic(x, y)
    gate = Gate(w.tolist(), float(b), 0.0)
    fit_scores = [gate.score(p.features) for p in fit]
    gate.threshold = choose_threshold(fit_scores, [p.correct for p in fit], min_shown)
    held_scores = [gate.score(p.features) for p in held]
    report = {
        "points_fit": len(fit),
        "points_held_out": len(held),
        "threshold": round(gate.threshold, 4),
        **measure(held_scores, [p.correct for p in held], gate.threshold),
    }
    return gate.as_dict(), report


def choose_threshold(scores: Sequence[float], correct: Sequence[bool], min_shown: float) -> float:
    """The threshold that maximises the exact match of what is shown while showing at least `min_shown`."""
    ranked = sorted(zip(scores, correct), reverse=True)
    keep = max(1, math.ceil(min_shown * len(ranked)))
    best, best_em = 0.0, -1.0
    hits = 0
    for i, (score, ok) in enumerate(ranked, 1):
        hits += ok
        if i >= keep and hits / i > best_em:
            best, best_em = score, hits / i
    return best


def measure(scores: Sequence[float], correct: Sequence[bool], threshold: float) -> dict:
    from .calibrate import auroc

    shown = [ok for s, ok in zip(scores, correct) if s >= threshold]
    return {
        "auroc": round(auroc(list(scores), list(correct)), 4),
        "shown_frac": round(len(shown) / max(1, len(correct)), 4),
        "em_shown": round(sum(shown) / max(1, len(shown)), 4),
        "em_all": round(sum(correct) / max(1, len(correct)), 4),
    }
