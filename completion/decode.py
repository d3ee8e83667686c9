"""One request's decoding, as a small state machine the scheduler steps: choose, verify, stop, stream.

Plain greedy decoding is the special case of a speculative loop whose draft is empty.
Each step the scheduler feeds the pending token (chosen but not yet run through the
model) followed by the drafter's guesses, takes logits for every fed position, and
hands them to `verify`: position j's logits choose the token after fed token j, under
the healing constraint (prompt.py); a guess is kept while it equals that choice; the
first disagreement becomes the new pending token and the cache rolls back past it.
So the text is exactly what one-token greedy decoding gives, whatever the drafter.

The stop rules see the text after every token, and the text that became final is
streamed as chunks; the last chunk carries the stop reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from .drafters import Drafter, NoDrafter, SpeculationPolicy
from .prompt import HealingConstraint, Prompt
from .sampling import Sampler
from .stops import StopRules
from .verdict import line_features

MAX_MARGIN = 20.0  # a token healing left alone leads by infinity; the gate's features stay finite

# At most this many guesses per verify step (a SpeculationPolicy may verify fewer).
DEFAULT_DRAFT_TOKENS = 8


@dataclass
class VerifyResult:
    keep: int  # how many fed tokens keep their K/V (the pending token plus the guesses kept)
    finished: bool


@dataclass
class Generation:
    """The decoding state of one completion request."""

    prompt: Prompt
    stops: StopRules
    max_tokens: int
    eos_ids: frozenset[int]
    decode_ids: Callable[[Sequence[int]], str]
    healing_mask: Callable[[str, str], torch.Tensor]
    drafter: Drafter = field(default_factory=NoDrafter)
    draft_tokens: int = DEFAULT_DRAFT_TOKENS
    # How many of the drafter's guesses are worth verifying on this machine (None: all of them);
    # it is told what became of them. Shared by the worker's requests.
    speculation: SpeculationPolicy | None = None
    # None: greedy. A sampler draws each token and accepts guesses by the speculative-sampling
    # rule (sampling.py), so drafts keep the model's distribution.
    sampler: Sampler | None = None
    # Abstention (verdict.py): P(the first line is right) from its tokens' features; below
    # `abstain_below` the completion ends with nothing, "abstained". None: no gate.
    gate: Callable[[list[float]], float] | None = None
    abstain_below: float = 0.0
    # The gate's upper bound for a first line still being written (Gate.best_score): below
    # `abstain_below`, decoding stops at once with the same verdict. None: judge whole lines only.
    gate_bound: Callable[[Sequence[float], Sequence[float], int, float], float] | None = None
    # Lossy early exit: the forward may stop after an exit layer for each token; no guesses then
    # (verifying them would run every layer anyway).
    early_exit: bool = False

    generated: list[int] = field(default_factory=list)  # every chosen token, the pending one included
    text: str = ""  # decode_ids(generated)
    sent: str = ""  # the part of the final text already streamed
    stop_reason: str = ""
    final_text: str | None = None
    forwards: int = 0  # verify steps run (one forward each)
    drafted: int = 0
    drafts_kept: int = 0
    layers_run: int = 0  # layers evaluated for the generated tokens (the engine adds them)
    logprobs: list[float] = field(default_factory=list)  # per generated token, under the distribution it came from
    margins: list[float] = field(default_factory=list)  # per generated token: its log-probability minus the runner-up's
    visible_lengths: list[int] = field(default_factory=list)  # per generated token: length of the visible text after it
    confidence: float | None = None  # the gate's score, once decided
    features: list[float] | None = None  # the first line's features (verdict.FEATURES)

    def __post_init__(self) -> None:
        self.constraint = HealingConstraint(self.prompt.heal, self.prompt.forbidden_after_heal)
        self._scored = (0.0, 0.0)  # log-probability and margin of the token _choose picked last
        # The context's last token when the prefill left it to the first decoding step (start_unfed).
        self._unfed_context: int | None = None
        self._evidence = None  # the drafter's evidence for the guesses being verified (SpeculationPolicy)

    # -- the first token, from the prefill's logits -------------------------

    def start(self, logits: torch.Tensor) -> None:
        """Choose the first token from the logits after the context (its last token was fed by the prefill)."""
        token = self._choose(logits)
        if not self.finished:
            self._take(token)

    def start_unfed(self, last_context_token: int) -> None:
        """The prefill stopped one token short: the first decoding step feeds the context's last token,
        alone, and its logits choose the first token, as start() would have (so under load the
        token joins a batched round instead of costing a forward of its own)."""
        self._unfed_context = last_context_token

    @property
    def feeds_context(self) -> bool:
        """The next step feeds the context's last token (start_unfed), not a generated one."""
        return self._unfed_context is not None

    @property
    def finished(self) -> bool:
        return bool(self.stop_reason)

    @property
    def pending(self) -> int:
        """The last chosen token, not yet run through the model."""
        return self.generated[-1]

    # -- one verify step --------------------------------------------------

    def to_feed(
        self, context_ids: Sequence[int], max_draft: int | None = None, base_tokens: int = 1, setting=None
    ) -> list[int]:
        """The pending token and the drafter's guesses (none while healing still constrains the text).

        `max_draft`: at most this many guesses this step (the scheduler's share when it batches);
        `base_tokens`: tokens of this step's forward besides the guesses (every row's pending token, the
        deferred forwards' tokens); `setting`: what the forward runs on (its thread count), for the speculation policy."""
        if self._unfed_context is not None:
            return [self._unfed_context]  # no guesses: the first token is chosen exactly as start() would
        room = self.max_tokens - len(self.generated)
        healing = self.constraint.remaining(self.text) is not None
        limit = self.draft_tokens if max_draft is None else min(self.draft_tokens, max_draft)
        k = 0 if healing or self.early_exit else min(limit, room)
        draft = self.drafter.propose([*context_ids, *self.generated], k) if k > 0 else []
        if draft and self.speculation is not None:
            self._evidence = getattr(self.drafter, "evidence", None)
            draft = draft[: self.speculation.draft_length(self._evidence, len(draft), base_tokens, setting)]
        self.drafted += len(draft)
        return [self.pending, *draft]

    def verify(self, fed: Sequence[int], logits: torch.Tensor) -> VerifyResult:
        """Take the model's logits [len(fed), vocab] for the fed tokens; keep what greedy decoding keeps."""
        if self._unfed_context is not None:  # the context's last token: its logits give the first token
            self._unfed_context = None  # (the prefill's forward, done late: not counted as a decoding one)
            self.start(logits[0])
            return VerifyResult(keep=1, finished=self.finished)
        self.forwards += 1
        draft = list(fed[1:])
        kept, missed = 0, False
        for j in range(len(fed)):
            token = self._choose(logits[j], draft[j] if j < len(draft) else None)
            if self.finished:
                break
            self._take(token)
            missed = j < len(draft) and token != draft[j]
            if self.finished or j == len(draft) or missed:
                break
            kept += 1
        self.drafts_kept += kept
        self.drafter.accepted(len(draft), kept)
        if draft and self.speculation is not None:
            self.speculation.record(self._evidence, kept, missed)
        return VerifyResult(keep=1 + kept, finished=self.finished)

    def cancel(self) -> None:
        self.stop_reason, self.final_text = "cancelled", self.sent

    # -- chunks ---------------------------------------------------------------

    def take_chunk(self) -> str:
        """Text that became final since the last call (to stream now).

        Nothing is streamed before the first line is judged: with a gate, a completion it finds
        likely wrong ends here, with nothing sent ("abstained").
        """
        if self.confidence is None and not self._judge():
            return ""
        if self.final_text is not None:
            committed = self.final_text
        else:
            committed = self._decision().committed
        if committed.startswith(self.sent) and len(committed) > len(self.sent):
            delta, self.sent = committed[len(self.sent) :], committed
            return delta
        return ""

    # -- abstention -------------------------------------------------------------

    def _first_line_end(self) -> int | None:
        """Where the first line of the visible text ends (None: no line break after it yet)."""
        visible = self.constraint.visible(self.text)
        content = visible.lstrip("\r\n")  # a single-line completion may begin by opening the next line
        newline = content.find("\n")
        return None if newline < 0 else len(visible) - len(content) + newline

    def _judge(self) -> bool:
        """Score the first line once it is complete (or the completion ended); False while it is not."""
        first_end = self._first_line_end()
        if not self.finished and first_end is None:
            return False
        if first_end is None:
            first_end = len(self.constraint.visible(self.text))
        count = next((i + 1 for i, n in enumerate(self.visible_lengths) if n >= first_end), len(self.visible_lengths))
        self.features = line_features(self.logprobs[:count], self.margins[:count])
        self.confidence = self.gate(self.features) if self.gate is not None else -1.0
        if self.gate is not None and self.confidence < self.abstain_below and self.stop_reason != "cancelled":
            self.stop_reason, self.final_text = "abstained", ""
        return True

    # -- internals ------------------------------------------------------------

    def _choose(self, logits: torch.Tensor, guess: int | None = None) -> int:
        """Greedy choice for the next token (or the sampler's, given the guess to accept or reject),
        under the healing constraint while it applies; ends on EOS."""
        remaining = self.constraint.remaining(self.text)
        if remaining is not None:
            logits = logits.masked_fill(~self.healing_mask(remaining, self.constraint.forbidden_next), float("-inf"))
        token = int(torch.argmax(logits)) if self.sampler is None else self.sampler.choose(logits, guess)
        if self.confidence is None:  # the gate reads the first line's scores only; later tokens skip the softmax
            logprobs = torch.log_softmax(logits.float(), -1)
            first, second = (float(v) for v in torch.topk(logprobs, 2).values)
            chosen = float(logprobs[token])
            # The lead over the runner-up (a sampled token below the top: its gap to the top, negative).
            margin = chosen - second if chosen >= first else chosen - first
            self._scored = (chosen, min(margin, MAX_MARGIN))
        if token in self.eos_ids:
            self._finish("eos")
        return token

    def _take(self, token: int) -> None:
        self.generated.append(token)
        self.text = self.decode_ids(self.generated)
        self.logprobs.append(self._scored[0])
        self.margins.append(self._scored[1])
        self.visible_lengths.append(len(self.constraint.visible(self.text)))
        if self.text.endswith("\ufffd"):  # half a character: wait for the rest before judging the text
            if len(self.generated) >= self.max_tokens:
                self._finish("max_tokens")
            return
        decision = self._decision()
        if decision.stop_reason:
            self.stop_reason, self.final_text = decision.stop_reason, decision.final or ""
        elif len(self.generated) >= self.max_tokens:
            self._finish("max_tokens")
        else:
            self._abstain_early()

    def _abstain_early(self) -> None:
        """Abstain now if no ending of the first line (still open: every token so far is in it) could
        pass the gate; `confidence` is then that bound, an upper bound of the line's score."""
        if self.gate_bound is None or self.confidence is not None or self.abstain_below <= 0:
            return
        if self._first_line_end() is not None:
            return  # the line is complete: _judge scores it exactly
        bound = self.gate_bound(self.logprobs, self.margins, self.max_tokens - len(self.generated), MAX_MARGIN)
        if bound < self.abstain_below:
            self.features = line_features(self.logprobs, self.margins)
            self.confidence = bound
            self.stop_reason, self.final_text = "abstained", ""

    def _decision(self):
        return self.stops.check(self.constraint.visible(self.text))

    def _finish(self, reason: str) -> None:
        final = self.stops.finish(self.constraint.visible(self.text), reason).final or ""
        if not final.startswith(self.sent):  # the stop rules promise this; never send text twice
            final = self.sent
        self.stop_reason, self.final_text = reason, final
