"""`rotary bench exit`: dynamic early exit, lossless speculation and abstention, against the full model.

Completion points on held-out code (files `rotary calibrate` did not fit on: the same seeded
split), as SEC measures: a random cut inside a line; the model completes the rest of the
line and the next line (multi-line mode, up to 24 tokens, two lines kept). Side by side on
every point, in one run:
- full: the own forward, every layer, one token per forward (the reference);
- early_exit: the controller may stop after an exit layer (lossy), at the calibrated threshold
  and the others given with --thresholds;
- lossless: the same text as full, decoded with guesses verified in one forward (n-gram lookup).

Per method: the mean fraction of layers evaluated per generated token, the decode speedup
over full (decode time, same points), ROUGE-L (LCS over tokens, F-measure) and exact match
against the true continuation, agreement with full's text, tokens/s; for lossless whether
every output is identical and the guesses accepted per verify step. Abstention: the gate's
score for "the first line is right" on full's completions: AUROC, the fraction shown at the
calibrated threshold, and the exact match of the shown completions against all.
"""

from __future__ import annotations

import statistics
import sys
import time

from .report import write_report

MAX_TOKENS = 24


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F-measure over whitespace tokens (longest common subsequence)."""
    from rapidfuzz.distance import LCSseq

    a, b = candidate.split(), reference.split()
    if not a or not b:
        return float(a == b)
    lcs = LCSseq.similarity(a, b)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def two_lines(text: str) -> str:
    return "\n".join(text.split("\n")[:2]).rstrip()


def points(corpus: str | None, count: int, seed: int) -> list[tuple[str, int, str]]:
    """(text up to the cursor, cursor offset, the true rest of the line and the next line) on held-out files."""
    import random

    from rotary.completion.calibrate import split_files
    from rotary.completion.verdict import CONTEXT_CHARS

    from .corpus import python_files

    _, held_out = split_files(python_files(corpus), seed)
    rng = random.Random(seed)
    rng.shuffle(held_out)
    out = []
    for path in held_out:
        try:
            lines = path.read_text(encoding="utf-8").split("\n")
        except (OSError, UnicodeDecodeError):
            continue
        candidates = [i for i, ln in enumerate(lines[:-1]) if len(ln.strip()) >= 12 and i >= 5 and lines[i + 1].strip()]
        for i in rng.sample(candidates, min(3, len(candidates))):
            line = lines[i]
            indent = len(line) - len(line.lstrip())
            cut = rng.randint(indent + 2, len(line) - 3)
            offset = sum(len(ln) + 1 for ln in lines[:i]) + cut
            text = "\n".join(lines)
            start = max(0, offset - CONTEXT_CHARS)  # as calibration's points (completion/verdict.py)
            out.append((text[start:offset], offset - start, line[cut:] + "\n" + lines[i + 1]))  # the file ends at the cut
            if len(out) == count:
                return out
    return out


def main(args) -> int:
    from tqdm import tqdm

    from rotary.cache.store import KVStore
    from rotary.completion.calibrate import auroc
    from rotary.completion.engine import CompletionEngine, CompletionOptions
    from rotary.completion.verdict import Gate, measure
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner, configure_threads

    configure_threads()
    runner = ModelRunner(load_model(args.model))
    if runner.exits is None:
        print("bench exit: no exit heads for this model: run `rotary calibrate` first", file=sys.stderr)
        return 2
    engine = CompletionEngine(runner, KVStore())
    engine.warm_up()
    count = args.limit or (20 if args.quick else 300)
    cases = points(args.corpus, count, args.seed)
    calibrated = runner.exits.threshold
    thresholds = sorted({calibrated, *[float(t) for t in (args.thresholds.split(",") if args.thresholds else ("0.8", "0.95"))]})
    methods = {"full": CompletionOptions(drafter="none")}
    for t in thresholds:
        methods[f"early_exit@{t:g}"] = CompletionOptions(drafter="none", early_exit=True, exit_threshold=t)
    methods["lossless"] = CompletionOptions(drafter="ngram")
    for options in methods.values():
        options.max_tokens, options.mode, options.abstain_threshold = MAX_TOKENS, "multi_line", 0.0
    print(f"exit: {len(cases)} held-out points, methods {list(methods)}, exit layers {list(runner.exits.layers)}", file=sys.stderr)

    rows: dict[str, list[dict]] = {m: [] for m in methods}
    for i, (text, offset, truth) in enumerate(tqdm(cases, desc="exit", unit="point", file=sys.stderr)):
        # The point's context is encoded once (a document cache); every method then decodes from
        # the same cached state, so the timings compare decoding alone.
        key = f"bench-exit-{i}"
        list(engine.complete(key, text, offset, CompletionOptions(max_tokens=1, drafter="none", abstain_threshold=0.0)))
        for name, options in methods.items():
            # Every method decodes from the same state: the worker's recent completions (n-gram
            # sources) would hand lossless the text full just produced at this very point.
            engine.sources.clear()
            started = time.perf_counter()
            chunks = list(engine.complete(key, text, offset, options))
            elapsed = time.perf_counter() - started
            last = chunks[-1]
            got = two_lines("".join(c.text for c in chunks))
            stats = last.stats
            rows[name].append({
                "text": got, "truth": two_lines(truth), "decode_ms": stats.decode_ms, "tokens": stats.tokens_generated,
                "layers": stats.layers_run, "forwards": stats.forwards, "kept": stats.drafts_accepted,
                "confidence": last.stats.confidence, "features": last.features, "seconds": elapsed,
            })
        engine.kv_store.drop(key)

    full = rows["full"]
    full_decode = sum(r["decode_ms"] for r in full)
    layers_total = runner.info.num_layers

    def summary(name: str) -> dict:
        rs = rows[name]
        tokens = sum(r["tokens"] for r in rs)
        out = {
            "layers_frac": round(sum(r["layers"] for r in rs) / max(1, tokens * layers_total), 4),
            "speedup": round(full_decode / max(1e-9, sum(r["decode_ms"] for r in rs)), 3),
            "rouge_l": round(statistics.fmean(rouge_l(r["text"], r["truth"]) for r in rs), 4),
            "em": round(statistics.fmean(r["text"].strip() == r["truth"].strip() for r in rs), 4),
            "agreement": round(statistics.fmean(r["text"] == f["text"] for r, f in zip(rs, full)), 4),
            "tokens_per_s": round(tokens / max(1e-9, sum(r["decode_ms"] for r in rs) / 1000), 2),
        }
        if name == "lossless":
            out["identical"] = all(r["text"] == f["text"] for r, f in zip(rs, full))
            out["accepted_per_verify"] = round(sum(r["kept"] for r in rs) / max(1, sum(r["forwards"] for r in rs)), 3)
        return out

    results = {name: summary(name) for name in methods}
    results["early_exit"] = results[f"early_exit@{calibrated:g}"]
    gate = Gate.from_dict(runner.exits.meta["gate"])
    scores = [gate.score(r["features"]) for r in full]
    first_right = [r["text"].split("\n")[0].strip() == r["truth"].split("\n")[0].strip() for r in full]
    results["abstain"] = measure(scores, first_right, gate.threshold) | {"threshold": gate.threshold}
    results["abstain"]["auroc"] = round(auroc(scores, first_right), 4)
    # Per point, so the abstention figures can be recomputed at any other threshold of the same gate.
    results["abstain"]["points"] = [[round(s, 6), ok] for s, ok in zip(scores, first_right)]

    print(f"\n{'method':<22}{'layers':>8}{'speedup':>9}{'ROUGE-L':>9}{'EM':>7}{'agree':>7}{'tok/s':>8}")
    for name in methods:
        r = results[name]
        print(f"{name:<22}{r['layers_frac']:>8.3f}{r['speedup']:>9.2f}{r['rouge_l']:>9.3f}{r['em']:>7.3f}{r['agreement']:>7.3f}{r['tokens_per_s']:>8.1f}")
    a = results["abstain"]
    print(f"abstention: AUROC {a['auroc']:.3f}, shown {a['shown_frac']:.2f}, EM shown {a['em_shown']:.3f} vs all {a['em_all']:.3f}")
    print(f"lossless: identical {results['lossless']['identical']}, accepted per verify {results['lossless']['accepted_per_verify']}")
    # What the worker's speculation policy learnt over the run: guess-by-guess rates per n-gram match
    # length, and forward times by tokens fed (which decide how many guesses it verified).
    results["lossless"]["speculation"] = engine.speculation.snapshot()
    print(f"speculation: {results['lossless']['speculation']}")
    write_report(args.json, {
        "benchmark": "exit",
        "config": {"points": len(cases), "seed": args.seed, "corpus": args.corpus or "stdlib", "max_tokens": MAX_TOKENS,
                   "exit_layers": list(runner.exits.layers), "thresholds": thresholds, "quick": bool(args.quick),
                   "model": runner.info.name, "exit_heads": runner.exits_from},
        "results": results,
        "gate": runner.exits.meta["gate"],
    })
    return 0
