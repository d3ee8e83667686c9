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

This module holds the gate as the worker runs it (its features and score, read from the
calibration artifact) and how a gate's scores are measured (pure Python; the benchmark uses it
too). Fitting the gate is completion/calibrate.py's, which imports this module, never the reverse.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Sequence

# Characters of context before a completion point when the gate is fitted (calibrate.py) or measured
# (bench/exit.py): about 500 tokens, so calibration stays minutes on 2 cores.
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


def auroc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve (the probability a positive outranks a negative; ties count half)."""
    pairs = sorted(zip(scores, labels))
    positives = sum(labels)
    negatives = len(labels) - positives
    if not positives or not negatives:
        return float("nan")
    rank_sum, i = 0.0, 0
    while i < len(pairs):
        j = i
        while j < len(pairs) and pairs[j][0] == pairs[i][0]:
            j += 1
        average_rank = (i + j + 1) / 2  # ranks are 1-based
        rank_sum += average_rank * sum(1 for _, label in pairs[i:j] if label)
        i = j
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def measure(scores: Sequence[float], correct: Sequence[bool], threshold: float) -> dict:
    shown = [ok for s, ok in zip(scores, correct) if s >= threshold]
    return {
        "auroc": round(auroc(list(scores), list(correct)), 4),
        "shown_frac": round(len(shown) / max(1, len(correct)), 4),
        "em_shown": round(sum(shown) / max(1, len(shown)), 4),
        "em_all": round(sum(correct) / max(1, len(correct)), 4),
    }
