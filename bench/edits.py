"""`rotary bench edits`: keeping a document's KV cache across edits, method against method.

The protocol follows the PIE paper (He et al., 2024) on real code: a context
(the lines before some line of a real file, about N tokens) is edited by an
insertion of lines, a deletion of lines, or edits in several places; then the
next line after the context is predicted greedily. The text after the edit is
the real file, so the true next line is the file's own; the text before the
edit is the real file perturbed (lines removed, lines copied in from elsewhere
in the file), and the cache starts out holding it.

Methods, side by side on every case:
- full: encode the edited context from scratch (the accuracy reference);
- prefix: keep the unchanged prefix, re-encode everything after the first edit
  (what plain prefix caching does; exact);
- conflict: encode the edited tokens, keep the rest without re-rotating keys;
- pie: encode the edited tokens, re-rotate the keys of every moved token;
- pie_refresh: pie, then re-encode stale tokens among the last 128 before the cursor.

Per method: exact match and edit similarity of the predicted line against the
true one, agreement with full's prediction, the fraction of full's tokens
encoded, and the time to the first token (median): from the request to its
first generated token, all work included, as a user waits for it. It is timed
on a completion of one token from another copy of the same cache, since the
first line is streamed only once it is whole. (The engine's prefill time is no
measure of the update: a small edit's tokens ride in the first decoding round,
a big re-encode runs before it, so that figure leaves out PIE's forward and
keeps prefix reuse's.)
"""

from __future__ import annotations

import keyword
import random
import re
import statistics
import sys
import time
from dataclasses import dataclass, field, replace

from .report import edit_similarity, write_report
from .corpus import python_files

METHODS = ("full", "prefix", "conflict", "pie", "pie_refresh")
EDIT_KINDS = ("insertion", "deletion", "multi_place")
REFRESH_WINDOW = 128
MAX_LINE_TOKENS = 24
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class Case:
    file: str
    kind: str
    context_tokens: int
    before: str  # the context the cache holds
    after: str  # the context after the edit (real code)
    target: str  # the true next line


@dataclass
class MethodResult:
    em: list[float] = field(default_factory=list)
    es: list[float] = field(default_factory=list)
    same: list[float] = field(default_factory=list)
    encoded_frac: list[float] = field(default_factory=list)
    first_token_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        return {
            "em": round(statistics.mean(self.em), 4),
            "es": round(statistics.mean(self.es), 4),
            "same_as_full": round(statistics.mean(self.same), 4),
            "tokens_encoded_frac": round(statistics.mean(self.encoded_frac), 4),
            "first_token_ms_p50": round(statistics.median(self.first_token_ms), 2),
            "cases": len(self.em),
        }


def _perturb(lines: list[str], kind: str, rng: random.Random, donor: list[str]) -> list[str] | None:
    """Lines the cache held before the edit that turned them into `lines` (the real code)."""
    n = len(lines)
    if n < 12:
        return None

    def some_donor_lines(k: int) -> list[str]:
        start = rng.randrange(0, max(1, len(donor) - k))
        return donor[start : start + k]

    if kind == "insertion":  # the user inserted k real lines: before the edit they were missing
        k = rng.randint(1, 3)
        at = rng.randrange(1, n - k - 1)
        return lines[:at] + lines[at + k :]
    if kind == "deletion":  # the user deleted k lines: before the edit they were there
        k = rng.randint(1, 3)
        at = rng.randrange(1, n - 1)
        return lines[:at] + some_donor_lines(k) + lines[at:]
    # multi_place: 2-3 places, each a one-line insertion or deletion
    places = sorted(rng.sample(range(1, n - 1), rng.randint(2, 3)), reverse=True)
    out = list(lines)
    for at in places:
        if rng.random() < 0.5:
            del out[at]
        else:
            out[at:at] = some_donor_lines(1)
    return out


def make_cases(corpus: str | None, counts: dict[int, int], seed: int, tokenizer) -> list[Case]:
    rng = random.Random(seed)
    files = python_files(corpus)
    rng.shuffle(files)
    cases: list[Case] = []
    for context, per_context in counts.items():
        made = 0
        for path in files:
            if made == per_context:
                break
            lines = path.read_text(encoding="utf-8").split("\n")
            # ~3.2 characters a token in Python: find the last line of a context of about `context` tokens.
            total = 0
            end = None
            for i, line in enumerate(lines):
                total += len(line) + 1
                if total >= context * 3.2:
                    end = i
                    break
            if end is None or end + 1 >= len(lines):
                continue
            start = 0
            after = lines[start:end]
            ids = tokenizer.encode("\n".join(after) + "\n", add_special_tokens=False)
            while len(ids) > context and len(after) > 20:
                after = after[: max(20, int(len(after) * context / len(ids)))]
                ids = tokenizer.encode("\n".join(after) + "\n", add_special_tokens=False)
            # The next line must have content to predict.
            target_index = len(after)
            while target_index < len(lines) and not lines[target_index].strip():
                after.append(lines[target_index])
                target_index += 1
            if target_index >= len(lines):
                continue
            kind = EDIT_KINDS[made % len(EDIT_KINDS)]
            before = _perturb(after, kind, rng, lines)
            if before is None or before == after:
                continue
            cases.append(
                Case(str(path), kind, context, "\n".join(before) + "\n", "\n".join(after) + "\n", lines[target_index])
            )
            made += 1
        if made < per_context:
            print(f"edits: only {made} cases of ~{context} tokens in the corpus", file=sys.stderr)
    return cases


def change_one_line(text: str) -> str | None:
    """`text` with one line changed, as a user renames something: the first name (not a keyword) on
    the middle line, or on the next line that has one, gets "_2" appended. None if no line has a name."""
    lines = text.split("\n")
    for i in range(len(lines) // 2, len(lines)):
        name = next((m for m in NAME.finditer(lines[i]) if not keyword.iskeyword(m.group())), None)
        if name:
            lines[i] = lines[i][: name.end()] + "_2" + lines[i][name.end() :]
            return "\n".join(lines)
    return None


def one_line_edits(corpus: str | None, context: int, count: int, seed: int, tokenizer) -> list[Case]:
    """Up to `count` real files of about `context` tokens (make_cases' text after its edit), each with
    one line changed (change_one_line); the cache holds the real file (`before`)."""
    cases = []
    for case in make_cases(corpus, {context: count}, seed, tokenizer):
        edited = change_one_line(case.after)
        if edited is not None:
            cases.append(replace(case, kind="one_line", before=case.after, after=edited))
    return cases


def run_case(engine, case: Case, methods: tuple[str, ...] = METHODS) -> dict[str, dict]:
    """Each method (of METHODS) completes the next line through the engine, starting from the cache of the text before the edit."""
    from rotary.cache.buffer import KVBuffer
    from rotary.cache.plan import DocumentTokens
    from rotary.cache.store import DocumentKV
    from rotary.completion.engine import CompletionOptions

    before_ids = engine.runner.encode_text(case.before)
    base = DocumentKV(buffer=engine.new_buffer())
    engine.prepare_now(base, before_ids, CompletionOptions(cache_mode="none"))
    modes = {
        "full": CompletionOptions(cache_mode="none"),
        "prefix": CompletionOptions(cache_mode="prefix"),
        "conflict": CompletionOptions(cache_mode="conflict", refresh_window=0),
        "pie": CompletionOptions(cache_mode="edit_aware", refresh_window=0),
        "pie_refresh": CompletionOptions(cache_mode="edit_aware", refresh_window=REFRESH_WINDOW),
    }

    def from_base(uri: str, options: CompletionOptions) -> tuple[list, float]:
        """The completion from a copy of the cache of the text before the edit (every method and pass
        starts there), and the milliseconds from the request to its end."""
        copy = KVBuffer.from_kv(base.buffer.used().clone(), DocumentTokens(base.buffer.token_ids))
        engine.kv_store.put(uri, DocumentKV(buffer=copy))
        try:
            started = time.perf_counter()
            chunks = list(engine.complete(uri, case.after, len(case.after), options))
            return chunks, (time.perf_counter() - started) * 1000
        finally:
            engine.kv_store.forget(uri)

    out = {}
    for method in methods:
        options = modes[method]
        uri = f"bench-edits:{method}"
        options.mode = "single_line"
        # The time to the first token: a completion of one token, from the request to its end.
        _, first_token_ms = from_base(uri, replace(options, max_tokens=1))
        options.max_tokens = MAX_LINE_TOKENS
        chunks, _ = from_base(uri, options)
        stats = chunks[-1].stats
        line = "".join(c.text for c in chunks).lstrip("\n").split("\n")[0]
        out[method] = {"line": line, "encoded": stats.tokens_encoded + stats.stale_refreshed, "first_token_ms": first_token_ms}
    return out


def main(args) -> int:
    from tqdm import tqdm

    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner, configure_threads

    # --contexts 1024,4096 or with per-context case counts: 1024:200,4096:60
    spec = [c.split(":") for c in (args.contexts or ("512" if args.quick else "1024:200,4096:60")).split(",")]
    default_count = args.limit or (6 if args.quick else 200)
    counts = {int(c[0]): int(c[1]) if len(c) > 1 and not args.limit else default_count for c in spec}
    contexts = list(counts)
    configure_threads()
    runner = ModelRunner(load_model(args.model))
    engine = CompletionEngine(runner, KVStore(), max_context_tokens=max(contexts) + 64)
    engine.warm_up()
    cases = make_cases(args.corpus, counts, args.seed, runner.tokenizer)
    print(f"edits: {len(cases)} cases, contexts {contexts}, corpus {args.corpus or 'stdlib'}, seed {args.seed}", file=sys.stderr)

    by_context: dict[int, dict[str, MethodResult]] = {c: {m: MethodResult() for m in METHODS} for c in contexts}
    overall = {m: MethodResult() for m in METHODS}
    for case in tqdm(cases, desc="edits", unit="case", file=sys.stderr):
        result = run_case(engine, case)
        full_line = result["full"]["line"]
        full_encoded = result["full"]["encoded"]
        for method, r in result.items():
            for bucket in (by_context[case.context_tokens][method], overall[method]):
                bucket.em.append(float(r["line"].strip() == case.target.strip()))
                bucket.es.append(edit_similarity(r["line"].strip(), case.target.strip()))
                bucket.same.append(float(r["line"] == full_line))
                bucket.encoded_frac.append(r["encoded"] / full_encoded)
                bucket.first_token_ms.append(r["first_token_ms"])

    report = {
        "benchmark": "edits",
        "config": {
            "contexts": contexts,
            "cases": len(cases),
            "cases_per_context": {str(c): n for c, n in counts.items()},
            "edit_kinds": list(EDIT_KINDS),
            "refresh_window": REFRESH_WINDOW,
            "seed": args.seed,
            "corpus": args.corpus or "stdlib",
            "model": args.model or "embedded SmolLM2-135M",
            "quick": bool(args.quick),
        },
        "results": {m: overall[m].summary() for m in METHODS},
        "results_by_context": {str(c): {m: by_context[c][m].summary() for m in METHODS if by_context[c][m].em} for c in contexts},
    }
    for context in contexts:
        rows = report["results_by_context"].get(str(context))
        if not rows:
            continue
        print(f"\ncontext ~{context} tokens, {rows['full']['cases']} cases")
        print(f"{'method':<12}{'EM':>7}{'ES':>7}{'same':>7}{'enc frac':>10}{'1st token ms':>14}")
        for m, r in rows.items():
            print(f"{m:<12}{r['em']:>7.3f}{r['es']:>7.3f}{r['same_as_full']:>7.3f}{r['tokens_encoded_frac']:>10.4f}{r['first_token_ms_p50']:>14.1f}")
        print(
            f"ratios: full/pie first token {rows['full']['first_token_ms_p50'] / rows['pie']['first_token_ms_p50']:.1f}x, "
            f"prefix/pie first token {rows['prefix']['first_token_ms_p50'] / rows['pie']['first_token_ms_p50']:.1f}x, "
            f"pie encodes {100 * rows['pie']['tokens_encoded_frac']:.1f}% of full's tokens"
        )
    write_report(args.json, report)
    return 0
