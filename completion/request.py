"""One completion request's types: what it asks (CompletionOptions), what it counts
(CompletionStats), what it streams (Chunk). Plain data, shared by the front (engine.py), the
scheduler and the steps it runs (steps.py)."""

from __future__ import annotations

from dataclasses import dataclass

from .rpc.wire import AUTO, EDIT_AWARE

DEFAULT_MAX_TOKENS = 64


@dataclass
class CompletionOptions:
    max_tokens: int = DEFAULT_MAX_TOKENS
    mode: str = AUTO
    # edit_aware (PIE), prefix (reuse the unchanged prefix only), none (from scratch),
    # conflict (PIE without re-rotation: a benchmark baseline only).
    cache_mode: str = EDIT_AWARE
    # Re-encode stale tokens among the last N before the cursor before completing (0: never).
    refresh_window: int = 128
    # Who guesses tokens ahead for one-forward verification: "ngram" (prompt lookup) or "none"
    # (one token per forward). The text is the same either way.
    drafter: str = "ngram"
    # Abstention: show nothing when the calibrated gate's P(first line right) is below this.
    # None: the threshold calibrated for the model; 0: never abstain.
    abstain_threshold: float | None = None
    # Lossy early exit per token (needs calibrated exit heads); its threshold (None: calibrated).
    early_exit: bool = False
    exit_threshold: float | None = None


@dataclass
class CompletionStats:
    context_tokens: int = 0
    tokens_reused: int = 0
    tokens_encoded: int = 0
    tokens_rerotated: int = 0
    stale_refreshed: int = 0
    tokens_generated: int = 0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    forwards: int = 0  # decoding forward passes (verify steps)
    tokens_drafted: int = 0
    drafts_accepted: int = 0
    layers_run: int = 0  # layers evaluated for the generated tokens (fewer than layers x tokens with early exit)
    confidence: float = -1.0  # the abstention gate's P(first line right); -1 without a gate


@dataclass
class Chunk:
    text: str
    done: bool = False
    stop_reason: str = ""
    stats: CompletionStats | None = None
    features: list[float] | None = None  # the first line's features for the abstention gate (last chunk)
