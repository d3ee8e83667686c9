"""`rotary calibrate`: fit the exit heads, their controller and the abstention gate on a corpus of code.

Everything is fitted on one part of the corpus (files chosen by a seeded hash of their
path) and measured on the other, never on the files it was fitted on:

1. Hidden states: chunks of the training files run through the model one slice of layers at
   a time, keeping the hidden state after every exit layer, the final one, and the full
   model's next-token choice.
2. Exit heads (models/exits.py): per exit layer a rank-r residual adapter in front of the
   tied LM head, first fitted by least squares to map the layer's hidden state to the final
   one, then trained with cross-entropy against the full model's choice (the frozen head and
   backbone stay as they are).
3. Controller: per exit layer a logistic regression on the hidden state predicting whether that
   layer's head agrees with the full model; the exit threshold is the lowest probability at
   which held-out exits still agree at the target rate.
4. Abstention gate (completion/verdict.py scores it at run time; it is fitted here): completion points on training files (the rest of a
   line after a random cut) completed by the service; a logistic regression over the first
   line's token probabilities predicts whether the line is right; its threshold keeps at
   least `--min-shown` of completions while maximising the exact match of those shown.

The artifact is written to the cache (next to the prepared model; `--out PATH`: there instead) and
its report printed. The embedded model's artifact ships in models/calibration/ (docs/BENCHMARKS.md
has the command that made it).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .rpc.wire import NO_CACHE, SINGLE_LINE
from .verdict import CONTEXT_CHARS, Gate, auroc, line_features, measure

DEFAULT_EXIT_LAYERS = (9, 14, 19, 24, 27)
DEFAULT_RANK = 32


def split_files(files: list[Path], seed: int, held_out: float = 0.3) -> tuple[list[Path], list[Path]]:
    """(train, held-out) by a seeded hash of each path: stable whatever the order of the list."""
    train, test = [], []
    for path in files:
        digest = hashlib.sha256(f"{seed}:{path.name}:{path.parent.name}".encode()).digest()
        (test if digest[0] / 256 < held_out else train).append(path)
    return train, test


@dataclass
class HiddenStates:
    by_layer: dict[int, torch.Tensor]  # exit layer -> [N, dim]
    final: torch.Tensor  # [N, dim], before the final norm
    choice: torch.Tensor  # [N] the full model's next token
    truth: torch.Tensor  # [N] the real next token


@torch.inference_mode()
def collect_hidden_states(runner, new_buffer, files: list[Path], exit_layers, tokens: int, chunk: int, seed: int, progress=None) -> HiddenStates:
    """Run chunks of `files` through the model one layer slice at a time, keeping the exits' hidden states."""
    from rotary.models.batch import Batch

    model = runner._forward  # the own forward: layer slices and hidden states (its head, below)
    rng = random.Random(seed)
    layers = sorted(exit_layers)
    keep: dict[int, list] = {layer: [] for layer in layers}
    finals, choices, truths = [], [], []
    total = 0
    order = list(files)
    rng.shuffle(order)
    for path in order:
        if total >= tokens:
            break
        try:
            ids = runner.encode_text(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            continue
        if len(ids) < chunk + 1:
            continue
        start = rng.randrange(0, len(ids) - chunk)
        piece = ids[start : start + chunk + 1]
        buffer = new_buffer()
        buffer.reserve(chunk)
        batch = Batch(caches=[buffer], starts=[0], ids=torch.tensor([piece[:-1]]), logits=None)
        x, first = model.embedded(batch), 0
        for layer in layers + [runner.info.num_layers - 1]:
            x, first = model.run_layers(x, range(first, layer + 1), batch), layer + 1
            if layer in keep:
                keep[layer].append(x[0].clone())
        finals.append(x[0].clone())
        choices.append(model._head(x[0]).argmax(-1))
        truths.append(torch.tensor(piece[1:]))
        total += chunk
        if progress:
            progress(chunk)
    return HiddenStates(
        {layer: torch.cat(v) for layer, v in keep.items()}, torch.cat(finals), torch.cat(choices), torch.cat(truths)
    )


def fit_adapter(model, hidden: torch.Tensor, final: torch.Tensor, choice: torch.Tensor, rank: int, epochs: int, seed: int):
    """A rank-r residual adapter h -> h + h @ down @ up: least squares to the final hidden state, then
    cross-entropy against the full model's choice through the frozen final norm and tied head."""
    torch.manual_seed(seed)
    hidden, final = hidden.clone(), final.clone()  # collected under inference_mode: normal tensors for autograd
    # Least squares for the full map, then its best rank-r residual (truncated SVD of W - I).
    gram = hidden.T @ hidden + 1e-3 * torch.eye(hidden.shape[1])
    w = torch.linalg.solve(gram, hidden.T @ final)  # [dim, dim]
    u, s, vh = torch.linalg.svd(w - torch.eye(w.shape[0]))
    down = (u[:, :rank] * s[:rank].sqrt()).clone().requires_grad_(True)  # [dim, r]
    up = (s[:rank].sqrt()[:, None] * vh[:rank]).clone().requires_grad_(True)  # [r, dim]
    optimizer = torch.optim.Adam([down, up], lr=1e-3)
    n = hidden.shape[0]
    batch = 512
    for _ in range(epochs):
        order = torch.randperm(n)
        for i in range(0, n, batch):
            index = order[i : i + batch]
            h = hidden[index]
            logits = model._head(h + (h @ down) @ up)  # [b, vocab]
            loss = F.cross_entropy(logits, choice[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return down.detach(), up.detach()


def fit_logistic(features: torch.Tensor, labels: torch.Tensor, steps: int = 300, l2: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """Logistic regression by L-BFGS: features [N, d], labels [N] in {0, 1}; returns (w [d], b [])."""
    features = features.clone()  # collected under inference_mode: a normal tensor for autograd
    w = torch.zeros(features.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")
    target = labels.float()

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(features @ w + b, target) + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return w.detach(), b.detach()


def exit_threshold(probs: torch.Tensor, agree: torch.Tensor, target: float) -> float:
    """The lowest controller probability at which the exits it allows agree with the full model at `target`."""
    order = torch.argsort(probs, descending=True)
    agree_sorted = agree[order].float()
    running = torch.cumsum(agree_sorted, 0) / torch.arange(1, len(agree_sorted) + 1)
    ok = (running >= target).nonzero()
    if len(ok) == 0:
        return 1.01  # never exit
    return float(probs[order][int(ok[-1])])


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
    options = CompletionOptions(max_tokens=32, mode=SINGLE_LINE, cache_mode=NO_CACHE, abstain_threshold=0.0)
    for text, offset, truth in completion_points(files, count, seed):
        chunks = list(engine.complete(None, text, offset, options))
        suggestion = "".join(c.text for c in chunks)
        points.append(Point(chunks[-1].features or line_features([], []), suggestion.strip() == truth.strip(), suggestion, truth))
        if progress:
            progress(1)
    return points


def fit_gate(fit: Sequence[Point], held: Sequence[Point], min_shown: float) -> tuple[dict, dict]:
    """Fit the logistic gate on `fit`; pick the threshold on `fit`; report on `held` (AUROC, shown, EM)."""
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


def fit_exit_heads(args, runner, engine, train: list[Path], test: list[Path], report: dict):
    """Steps 1-3: hidden states, exit adapters, controllers and their threshold; measured on `test`."""
    from tqdm import tqdm

    from rotary.models.exits import ExitHeads

    layers = tuple(int(x) for x in (args.exit_layers.split(",") if args.exit_layers else DEFAULT_EXIT_LAYERS))
    tokens = args.tokens or (6000 if args.quick else 20000)
    chunk = 256
    report.update(exit_layers=list(layers), rank=args.rank)

    bar = tqdm(total=tokens, desc="hidden states (train)", unit="tok", file=sys.stderr)
    fit = collect_hidden_states(runner, engine.new_buffer, train, layers, tokens, chunk, args.seed, bar.update)
    bar.close()
    bar = tqdm(total=tokens // 3, desc="hidden states (held out)", unit="tok", file=sys.stderr)
    held = collect_hidden_states(runner, engine.new_buffer, test, layers, tokens // 3, chunk, args.seed + 1, bar.update)
    bar.close()

    model = runner._forward
    downs, ups, gate_w, gate_b, per_layer = {}, {}, {}, {}, {}
    epochs = 1 if args.quick else 2
    for layer in tqdm(layers, desc="exit heads", unit="layer", file=sys.stderr):
        with torch.enable_grad():
            down, up = fit_adapter(model, fit.by_layer[layer], fit.final, fit.choice, args.rank, epochs, args.seed)
        with torch.no_grad():
            agree_fit = (model._head(fit.by_layer[layer] + (fit.by_layer[layer] @ down) @ up).argmax(-1) == fit.choice)
            h_held = held.by_layer[layer]
            agree_held = (model._head(h_held + (h_held @ down) @ up).argmax(-1) == held.choice)
            lens = (model._head(h_held).argmax(-1) == held.choice).float().mean().item()
        with torch.enable_grad():
            w, b = fit_logistic(fit.by_layer[layer], agree_fit)
        probs = torch.sigmoid(h_held @ w + b)
        downs[layer], ups[layer], gate_w[layer], gate_b[layer] = down, up, w, b
        per_layer[str(layer)] = {
            "agreement_logit_lens": round(lens, 4),
            "agreement_exit_head": round(agree_held.float().mean().item(), 4),
            "controller_auroc": round(auroc(probs.tolist(), agree_held.tolist()), 4),
        }
    report["exits"] = per_layer

    # One threshold for every exit layer: the lowest at which held-out exits agree at the target rate.
    all_probs = torch.cat([torch.sigmoid(held.by_layer[l] @ gate_w[l] + gate_b[l]) for l in layers])
    all_agree = torch.cat([
        model._head(held.by_layer[l] + (held.by_layer[l] @ downs[l]) @ ups[l]).argmax(-1) == held.choice for l in layers
    ])
    threshold = exit_threshold(all_probs, all_agree, args.agreement)
    report["exit_threshold"] = round(threshold, 4)
    report["exit_target_agreement"] = args.agreement

    return ExitHeads(layers, downs, ups, gate_w, gate_b, threshold)


def main(args, files: list[Path]) -> int:
    """The CLI entry point: rotary calibrate [--model M] [--corpus DIR] [--tokens N] [--seed S] [--quick];
    `files`: the corpus's Python files (the CLI lists them)."""
    from tqdm import tqdm

    from rotary.cache.store import KVStore
    from rotary.models.exits import artifact_path
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner, configure_threads

    from .engine import CompletionEngine

    configure_threads()
    torch.manual_seed(args.seed)
    runner = ModelRunner(load_model(args.model))
    if not runner.layer_access:
        print(f"calibrate: {runner.info.name} runs through transformers: no layer access, no exit heads", file=sys.stderr)
        return 2
    engine = CompletionEngine(runner, KVStore())
    train, test = split_files(files, args.seed)
    report: dict = {"model": runner.info.name, "seed": args.seed, "corpus": args.corpus or "stdlib",
                    "train_files": len(train), "held_out_files": len(test)}
    started = time.perf_counter()
    if args.gate_only:  # keep the model's exit heads (the user's or the shipped ones); refit the gate alone
        if runner.exits is None:
            print("calibrate --gate-only: this model has no exit heads yet: run without --gate-only", file=sys.stderr)
            return 2
        heads = runner.exits
        report.update({k: v for k, v in heads.meta.get("report", {}).items() if k in ("exit_layers", "rank", "exits", "exit_threshold", "exit_target_agreement")})
    else:
        heads = fit_exit_heads(args, runner, engine, train, test, report)

    # The abstention gate, from completions on training files; measured on held-out ones.
    points = args.points or (60 if args.quick else 200)
    bar = tqdm(total=points, desc="abstention (train)", unit="completion", file=sys.stderr)
    fit_points = collect_points(engine, train, points, args.seed, bar.update)
    bar.close()
    bar = tqdm(total=points // 2, desc="abstention (held out)", unit="completion", file=sys.stderr)
    held_points = collect_points(engine, test, points // 2, args.seed + 1, bar.update)
    bar.close()
    gate, gate_report = fit_gate(fit_points, held_points, args.min_shown)
    report["abstention"] = gate_report

    fingerprint = runner.fingerprint
    heads.meta = {"model_fingerprint": fingerprint, "gate": gate, "report": report}
    # --out: there only (to inspect, or to ship); otherwise where the worker finds it for this model.
    path = Path(args.out) if args.out else artifact_path(fingerprint)
    report["artifact"] = str(path)
    report["seconds"] = round(time.perf_counter() - started, 1)
    heads.meta["report"] = report
    heads.save(path)
    report["artifact_bytes"] = path.stat().st_size
    print(json.dumps(report, indent=2))
    engine.scheduler.stop()
    return 0
