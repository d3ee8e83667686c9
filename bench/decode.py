"""`rotary bench decode`: the Hugging Face forward and Rotary's own forward, side by side in one run.

Size (~530 lines, over the ~400 the project aims at): one benchmark whose phases share its methods and
contexts; the peer (llama.cpp) is bench/peer.py's, the edit cases bench/edits.py's.

Both methods run the same weights on the same real code (files from the corpus, fixed seed),
interleaved step by step so that whatever else the machine does slows both alike:

- decode ms/token at ~1k and ~4k tokens of context (median over steps), greedy;
- prefill tokens/s at 1k and 4k (the whole context in one forward; best of the runs);
- verify cost (own forward): one forward over k = 4, 8, 16 new tokens at ~1k context, divided
  by one token's (medians), the price of checking a draft of k tokens;
- batched decode: total decode tokens/s with 1, 4 and 8 documents (contexts of 400-1100 tokens)
  completing at once through the worker's scheduler (`batched`), and through the batched forward
  alone, one token each per forward (`batched_forward`);
- the first token after a one-line edit of a ~4k-token file (bench/edits.py's one_line_edits and
  run_case, the real engine from a cache of the file before the edit): own.edit_first_token_ms_4k
  with the service's default cache (PIE with refresh), also PIE alone and prefix reuse;
- the peer (`--peer llama.cpp`, bench/peer.py): llama.cpp (node-llama-cpp's prebuilt CPU binary) on
  the same GGUF, threads and token ids, after Rotary's side: results.peer, or available false and why;
- exactness: every greedy completion (the decode cases above plus short completions at random
  places in the corpus, at least 50 in a full run) identical between the methods, and the largest
  logit difference seen at any step.

The HF method is the call the worker made before the own forward (HFBaseline: a transformers
DynamicCache grown by torch.cat, as models/runner.py did until issue 8); the own method is
models/transformer.py's Transformer over cache/buffer.py's KVBuffer. Threads follow the runner's
policy for both: one-token steps (and verify steps, to compare like with like) on decode_threads(),
prefill on prefill_threads(); the own decode is also timed on 1 and on all cores.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
from contextlib import contextmanager

from . import peer
from .report import write_report
from .corpus import python_files


@contextmanager
def _threads(count: int):
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cpu_flags() -> list[str]:
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))


class HFBaseline:
    """Today's HF path, as the worker ran it before the own forward (models/runner.py until issue 8):
    the transformers model called with a DynamicCache that it grows by torch.cat, last logits only."""

    def __init__(self, model):
        import inspect

        self.model = model
        # transformers renamed `past_key_values` to `cache` (5.2x); pass whichever this version takes.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def forward(self, token_ids: list[int], cache, start_position: int):
        import torch

        with torch.inference_mode():
            input_ids = torch.tensor([token_ids], dtype=torch.long, device=self.model.device)  # [1, S]
            positions = torch.arange(start_position, start_position + len(token_ids), device=self.model.device)
            out = self.model(
                input_ids=input_ids,
                **{self._cache_kwarg: cache},
                position_ids=positions.unsqueeze(0),
                cache_position=positions,
                use_cache=True,
                logits_to_keep=1,
            )
            return out.logits[0, -1]  # [vocab]


class Methods:
    """The two forwards over one loaded model, each with its own cache type."""

    def __init__(self, model: str | None, precision: str | None = None):
        from rotary.cache.buffer import KVBuffer
        from rotary.models.loader import ModelLoadError, load_model
        from rotary.models.runner import decode_threads, prefill_threads
        from rotary.models.transformer import Transformer

        try:
            self.loaded = load_model(model, forward="own")
        except ModelLoadError as exc:
            raise SystemExit(f"bench decode: {exc}")
        self.own = self.loaded.model
        assert isinstance(self.own, Transformer)
        # The same weights through transformers (a load of its own: it reads the GGUF with its own reader).
        self.hf = HFBaseline(load_model(model, forward="hf").model)
        self.decode_threads, self.prefill_threads = decode_threads(), prefill_threads()
        # The default precision (or the one asked for), as the worker would run it: `fast`, a packed copy
        # of the float32 forward (which stays the reference of every other phase here).
        from rotary.models.exits import model_fingerprint
        from rotary.models.loader import cache_dir
        from rotary.models.precision import choose_once, packed_copy, requested

        self.precision, self.precision_reason = requested(precision), "asked for"
        if self.precision == "auto":
            fingerprint = model_fingerprint(self.loaded.config, self.loaded.tokenizer, self.own)
            choice = choose_once(self.own, self.decode_threads, fingerprint, cache_dir() / "precision", self.loaded.blocks)
            self.precision, self.precision_reason = choice.precision, choice.reason
        self.fast = packed_copy(self.own, self.precision, self.loaded.blocks)
        c = self.own.config
        self.new_buffer = lambda: KVBuffer(c.n_layers, c.n_kv_heads, c.head_dim, dtype=self.own.dtype, device=self.own.device)

    # Each returns the logits [vocab] and the seconds taken; the state object is the method's cache.

    def hf_prefill(self, ids: list[int]):
        cache = self.hf.new_cache()
        with _threads(self.prefill_threads):
            started = time.perf_counter()
            logits = self.hf.forward(ids, cache, 0)
            return cache, logits, time.perf_counter() - started

    def own_prefill(self, ids: list[int], model=None):
        buffer = self.new_buffer()
        buffer.reserve(len(ids) + 64)
        with _threads(self.prefill_threads):
            started = time.perf_counter()
            logits = buffer.extend(ids, model or self.own).logits[0]
            return buffer, logits, time.perf_counter() - started

    def loaded_at_precision(self):
        """The loaded model for a ModelRunner at self.precision: a twin of the float32 forward, so the
        runner's packing leaves self.own as it is."""
        import dataclasses

        from rotary.models.precision import twin

        return dataclasses.replace(self.loaded, model=twin(self.own))

    def hf_step(self, cache, token: int, threads: int | None = None):
        with _threads(threads or self.decode_threads):
            started = time.perf_counter()
            logits = self.hf.forward([token], cache, cache.get_seq_length())
            return logits, time.perf_counter() - started

    def own_step(self, buffer, tokens: list[int], threads: int | None = None, logits: str = "last", model=None):
        with _threads(threads or self.decode_threads):
            started = time.perf_counter()
            out = buffer.extend(tokens, model or self.own, logits=logits).logits[0]
            return out, time.perf_counter() - started


def _contexts(corpus: str | None, tokenizer, count: int, length: int, seed: int) -> list[list[int]]:
    """`count` contexts of exactly `length` tokens of real code: a random file (continued by more files when short)."""
    files = python_files(corpus)
    rng = random.Random(seed * 1000 + length)
    contexts = []
    for _ in range(count):
        ids: list[int] = []
        first = rng.randrange(len(files))
        for k in range(len(files)):
            text = files[(first + k) % len(files)].read_text(encoding="utf-8")
            ids += tokenizer.encode(text + "\n\n", add_special_tokens=False)
            if len(ids) >= length + 512:
                break
        start = rng.randrange(0, max(1, len(ids) - length - 256))  # not always the file header
        contexts.append(ids[start : start + length])
    return contexts


class Exactness:
    def __init__(self):
        self.completions = 0
        self.identical = 0
        self.max_logit_diff = 0.0
        self.first_mismatch: dict | None = None

    def logits(self, hf, own) -> None:
        self.max_logit_diff = max(self.max_logit_diff, float((hf.float() - own.float()).abs().max()))

    def completion(self, hf_tokens: list[int], own_tokens: list[int], where: str) -> None:
        self.completions += 1
        if hf_tokens == own_tokens:
            self.identical += 1
        elif self.first_mismatch is None:
            self.first_mismatch = {"where": where, "hf": hf_tokens, "own": own_tokens}


def _decode_side_by_side(methods: Methods, ids: list[int], steps: int, exact: Exactness, where: str, own_first: bool = False):
    """Prefill both (in the order asked), then `steps` greedy steps alternating HF and own;
    return (prefill s, step s) per method."""
    if own_first:
        own_buffer, own_logits, own_prefill = methods.own_prefill(ids)
        hf_cache, hf_logits, hf_prefill = methods.hf_prefill(ids)
    else:
        hf_cache, hf_logits, hf_prefill = methods.hf_prefill(ids)
        own_buffer, own_logits, own_prefill = methods.own_prefill(ids)
    exact.logits(hf_logits, own_logits)
    hf_tokens, own_tokens, hf_times, own_times = [], [], [], []
    for _ in range(steps):
        hf_tokens.append(int(hf_logits.argmax()))
        own_tokens.append(int(own_logits.argmax()))
        if hf_tokens[-1] != own_tokens[-1]:
            break
        hf_logits, seconds = methods.hf_step(hf_cache, hf_tokens[-1])
        hf_times.append(seconds)
        own_logits, seconds = methods.own_step(own_buffer, [own_tokens[-1]])
        own_times.append(seconds)
        exact.logits(hf_logits, own_logits)
    exact.completion(hf_tokens, own_tokens, where)
    return {"hf": (hf_prefill, hf_times), "own": (own_prefill, own_times), "buffer": own_buffer}


def _precision_side_by_side(methods: Methods, ids: list[int], steps: int, exact_first: bool) -> dict:
    """The float32 forward and the default precision's on one context, each greedy on its own, steps
    alternating: prefill s and step s of `fast`, and both token lists (agreement)."""
    runs = {}
    for name in (("exact", "fast") if exact_first else ("fast", "exact")):
        model = methods.own if name == "exact" else methods.fast
        buffer, logits, seconds = methods.own_prefill(ids, model)
        runs[name] = {"model": model, "buffer": buffer, "logits": logits, "prefill": seconds, "steps": [], "tokens": []}
    for _ in range(steps):
        for run in runs.values():
            run["tokens"].append(int(run["logits"].argmax()))
            run["logits"], seconds = methods.own_step(run["buffer"], [run["tokens"][-1]], model=run["model"])
            run["steps"].append(seconds)
    return {name: (run["prefill"], run["steps"], run["tokens"]) for name, run in runs.items()}


def main(args) -> int:
    import torch
    from tqdm import tqdm

    quick = bool(args.quick)
    methods = Methods(args.model, getattr(args, "precision", None))
    tokenizer = methods.loaded.tokenizer
    plan = {
        "decode_cases": {1024: 1 if quick else 3, 4096: 1 if quick else 2},
        "decode_steps": 8 if quick else 24,
        "completions": args.limit or (6 if quick else 50),
        "completion_tokens": 12 if quick else 16,
        "verify_repeats": 5 if quick else 15,
        "batched_steps": 6 if quick else 16,
        "batched_tokens": 12 if quick else 32,
    }
    if args.limit:
        plan["decode_cases"] = {n: min(c, args.limit) for n, c in plan["decode_cases"].items()}
    print(
        f"decode: {methods.loaded.info.name}, decode on {methods.decode_threads} thread(s), prefill on "
        f"{methods.prefill_threads}; corpus {args.corpus or 'the standard library'} (seed {args.seed})",
        file=sys.stderr,
    )
    total = (
        sum(plan["decode_cases"].values()) + plan["completions"] + 1 + 3 * 4 + 4 + (2 if methods.prefill_threads > 1 else 1)
    )
    load_before = os.getloadavg()[0]
    peer_why = peer.why_not_run(args.peer, args.model)
    print(f"decode: peer {peer.PEER}" if not peer_why else f"decode: no peer: {peer_why}", file=sys.stderr)
    bar = tqdm(total=total, desc="decode", unit="step", file=sys.stderr)
    exact = Exactness()
    started = time.perf_counter()

    # Decode and prefill speed at ~1k and ~4k, with every case also a greedy completion.
    speed = {"hf": {}, "own": {}}
    last_1k_buffer = None
    for length, count in plan["decode_cases"].items():
        prefill = {"hf": [], "own": []}
        steps = {"hf": [], "own": []}
        for i, ids in enumerate(_contexts(args.corpus, tokenizer, count, length, args.seed)):
            run = _decode_side_by_side(methods, ids, plan["decode_steps"], exact, f"{length} tokens, case {i}", own_first=i % 2 == 1)
            for name in ("hf", "own"):
                prefill[name].append(length / run[name][0])
                steps[name] += run[name][1]
            if length == 1024:
                last_1k_buffer = run["buffer"]
            bar.update(1)
        key = "1k" if length == 1024 else "4k"
        for name in ("hf", "own"):
            speed[name][f"decode_ms_per_token_{key}"] = round(statistics.median(steps[name]) * 1000, 2)
            speed[name][f"prefill_tok_s_{key}"] = round(max(prefill[name]), 1)

    # Short completions at random places: the bulk of the exactness check.
    rng = random.Random(args.seed)
    for i in range(plan["completions"]):
        length = rng.randint(200, 1000)
        ids = _contexts(args.corpus, tokenizer, 1, length, args.seed + 7919 * (i + 1))[0]
        _decode_side_by_side(methods, ids, plan["completion_tokens"], exact, f"completion {i} ({length} tokens)")
        bar.update(1)

    # The default precision against float32: the same decode cases and completions, each forward greedy
    # on its own; speed of `fast`, and the share of greedy completions identical to float32's.
    fast_speed, agreements = {}, []
    for length, count in plan["decode_cases"].items():
        prefill, steps = [], []
        for i, ids in enumerate(_contexts(args.corpus, tokenizer, count, length, args.seed)):
            run = _precision_side_by_side(methods, ids, plan["decode_steps"], exact_first=i % 2 == 0)
            prefill.append(length / run["fast"][0])
            steps += run["fast"][1]
            agreements.append(run["fast"][2] == run["exact"][2])
        key = "1k" if length == 1024 else "4k"
        fast_speed[f"decode_ms_per_token_{key}"] = round(statistics.median(steps) * 1000, 2)
        fast_speed[f"prefill_tok_s_{key}"] = round(max(prefill), 1)
    for i in range(plan["completions"]):
        length = rng.randint(200, 1000)
        ids = _contexts(args.corpus, tokenizer, 1, length, args.seed + 7919 * (i + 1))[0]
        run = _precision_side_by_side(methods, ids, plan["completion_tokens"], exact_first=i % 2 == 0)
        agreements.append(run["fast"][2] == run["exact"][2])
    bar.update(1)

    # Verify cost: one forward over k tokens against one token, same buffer, rolled back each time.
    buffer = last_1k_buffer
    base = buffer.length
    draft = list(buffer.token_ids[-16:])  # any ids: the cost does not depend on them
    verify_times: dict[int, list[float]] = {1: [], 4: [], 8: [], 16: []}
    for _ in range(plan["verify_repeats"]):
        for k in verify_times:
            _, seconds = methods.own_step(buffer, draft[:k], logits="all")
            buffer.rollback(base)
            verify_times[k].append(seconds)
    one = statistics.median(verify_times[1])
    verify_cost = {str(k): round(statistics.median(verify_times[k]) / one, 2) for k in (4, 8, 16)}
    bar.update(3 * 4)

    # The batched forward alone: 1, 4, 8 documents, one token each per forward.
    # The three batch sizes take turns step by step (medians), so load changes hit them alike.
    from rotary.cache.buffer import extend_batch

    lengths = [400 + 100 * j for j in range(8)]  # different lengths, 400..1100
    docs = [_contexts(args.corpus, tokenizer, 1, n, args.seed + 31 * (j + 1))[0] for j, n in enumerate(lengths)]
    groups = {}
    for size in (1, 4, 8):
        buffers, next_ids = [], []
        for ids in docs[:size]:
            b, logits, _ = methods.own_prefill(ids)
            buffers.append(b)
            next_ids.append([int(logits.argmax())])
        groups[size] = [buffers, next_ids, []]
        bar.update(1)
    with _threads(methods.decode_threads):
        for _ in range(plan["batched_steps"]):
            for size, group in groups.items():
                buffers, next_ids, times = group
                t0 = time.perf_counter()
                out = extend_batch(buffers, next_ids, methods.own)
                times.append(time.perf_counter() - t0)
                group[1] = [[int(i)] for i in out.logits.argmax(-1).tolist()]
    batched_forward = {str(size): round(size / statistics.median(group[2]), 2) for size, group in groups.items()}
    del groups

    # Batched decode through the scheduler, as the worker serves several editors: 1, 4, 8 documents
    # completing at once (each cache prepared first, so the timed run is decoding).
    batched = _through_scheduler(methods.loaded_at_precision(), methods.precision, docs, tokenizer, plan["batched_tokens"])
    bar.update(1)

    # Own decode on 1 thread and on all cores, step by step in turn (the runner's decode_threads picks one).
    ids = _contexts(args.corpus, tokenizer, 1, 1024, args.seed + 1)[0]
    runs = {}
    for threads in sorted({1, methods.prefill_threads}):
        buffer, logits, _ = methods.own_prefill(ids)
        runs[threads] = [buffer, logits, []]
        bar.update(1)
    for _ in range(plan["decode_steps"]):
        for threads, run in runs.items():
            logits, seconds = methods.own_step(run[0], [int(run[1].argmax())], threads=threads)
            run[1] = logits
            run[2].append(seconds)
    by_threads = {str(t): round(statistics.median(run[2]) * 1000, 2) for t, run in runs.items()}
    bar.close()

    reference = dict(speed["own"])  # the float32 forward: results.exact
    reference.update(
        identical=exact.identical == exact.completions,
        max_logit_diff=float(f"{exact.max_logit_diff:.3g}"),
        verify_cost=verify_cost,
        decode_ms_per_token_1k_by_threads=by_threads,
    )
    # results.own: the default precision (auto's choice, or the one asked for); its agreement with float32.
    own = dict(
        fast_speed,
        precision=methods.precision,
        precision_reason=methods.precision_reason,
        agreement=round(sum(agreements) / len(agreements), 3),
        agreement_of=len(agreements),
    )
    # The first token after a one-line edit of a ~4k file; then llama.cpp on the same contexts and edits.
    from .edits import one_line_edits

    edit_cases = one_line_edits(args.corpus, 4096, plan["decode_cases"][4096], args.seed, tokenizer)
    own.update(_own_edit_first_token_ms(methods.loaded_at_precision(), methods.precision, edit_cases))
    contexts = {n: _contexts(args.corpus, tokenizer, c, n, args.seed) for n, c in plan["decode_cases"].items()}
    peer_results = peer.for_decode(
        args, tokenizer, contexts, edit_cases, plan["decode_steps"], methods.decode_threads, methods.prefill_threads
    )
    results = {
        "hf": speed["hf"], "exact": reference, "own": own, "batched": batched, "batched_forward": batched_forward, "peer": peer_results,
    }
    report = {
        "benchmark": "decode",
        "config": {
            "model": methods.loaded.info.name,
            "dtype": methods.loaded.info.dtype,
            "seed": args.seed,
            "corpus": args.corpus or "stdlib",
            "quick": quick,
            "cpu_count": os.cpu_count(),
            "cpu_flags": _cpu_flags(),
            "torch": torch.__version__,
            "decode_threads": methods.decode_threads,
            "prefill_threads": methods.prefill_threads,
            **{k: (v if not isinstance(v, dict) else {str(n): c for n, c in v.items()}) for k, v in plan.items()},
        },
        "results": results,
        "completions": exact.completions,
        "identical_completions": exact.identical,
        "first_mismatch": exact.first_mismatch,
        "seconds": round(time.perf_counter() - started, 1),
        # Other processes on the machine slow both methods and make 2-thread runs erratic; ratios hold better.
        "load_average": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
    }
    _print_table(results, exact)
    print("\n".join(peer.summary_lines(own, peer_results)))
    print(f"load average {report['load_average']['start']:.1f} -> {report['load_average']['end']:.1f} on {os.cpu_count()} cores")
    write_report(args.json, report)
    return 0 if exact.identical == exact.completions else 1


def _own_edit_first_token_ms(loaded, precision: str, cases) -> dict[str, float]:
    """Rotary's time to the first token after each one-line edit (bench/edits.py's run_case: the real
    engine, from a cache of the file before the edit), median: the service's default cache (PIE with
    refresh, edit_first_token_ms_4k), PIE alone (_pie) and prefix reuse (_prefix, as llama.cpp's)."""
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine
    from rotary.models.runner import ModelRunner

    from .edits import run_case

    if not cases:
        return {}
    engine = CompletionEngine(ModelRunner(loaded, precision), KVStore(), max_context_tokens=max(c.context_tokens for c in cases) + 64)
    engine.warm_up()
    runs = [run_case(engine, case, methods=("pie_refresh", "pie", "prefix")) for case in cases]
    engine.scheduler.stop()
    key = "edit_first_token_ms_4k"
    return {
        f"{key}{suffix}": round(statistics.median(run[method]["first_token_ms"] for run in runs), 2)
        for method, suffix in (("pie_refresh", ""), ("pie", "_pie"), ("prefix", "_prefix"))
    }


def _through_scheduler(loaded, precision: str, docs: list[list[int]], tokenizer, tokens: int) -> dict[str, float]:
    """Decode tokens/s with 1, 4 and 8 documents completing at once through the worker's scheduler."""
    import threading

    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine, CompletionOptions
    from rotary.models.runner import ModelRunner

    engine = CompletionEngine(ModelRunner(loaded, precision), KVStore())
    texts = [tokenizer.decode(ids) for ids in docs]
    options = CompletionOptions(max_tokens=tokens, mode="multi_line", drafter="none")
    for j, text in enumerate(texts):  # each document's cache, so the timed runs below are decoding
        list(engine.complete(f"doc{j}", text, len(text), CompletionOptions(max_tokens=1, drafter="none")))
    rates = {}
    for size in (1, 4, 8):
        generated = [0] * size

        def run(j: int) -> None:
            chunks = list(engine.complete(f"doc{j}", texts[j], len(texts[j]), options))
            generated[j] = chunks[-1].stats.tokens_generated

        threads = [threading.Thread(target=run, args=(j,)) for j in range(size)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        rates[str(size)] = round(sum(generated) / (time.perf_counter() - started), 2)
    engine.scheduler.stop()
    return rates


def _print_table(results: dict, exact: Exactness) -> None:
    hf, reference, own, batched = results["hf"], results["exact"], results["own"], results["batched"]
    rows = [
        ("decode ms/token, 1k context", "decode_ms_per_token_1k", True),
        ("decode ms/token, 4k context", "decode_ms_per_token_4k", True),
        ("prefill tokens/s, 1k", "prefill_tok_s_1k", False),
        ("prefill tokens/s, 4k", "prefill_tok_s_4k", False),
    ]

    def ratio(a: float, b: float, lower_is_better: bool) -> str:
        numerator, denominator = (a, b) if lower_is_better else (b, a)
        return f"{numerator / denominator:>9.2f}x" if denominator else f"{'n/a':>10}"  # a --quick run may skip a size

    precision = own["precision"]
    print(f"\n{'':<30}{'HF':>10}{'own exact':>10}{'vs HF':>10}{'own ' + precision:>12}{'vs exact':>10}")
    for label, key, lower_is_better in rows:
        print(
            f"{label:<30}{hf[key]:>10.1f}{reference[key]:>10.1f}{ratio(hf[key], reference[key], lower_is_better)}"
            f"{own[key]:>12.1f}{ratio(reference[key], own[key], lower_is_better)}"
        )
    print(f"own precision {precision} ({own['precision_reason']}); greedy completions identical to exact's: "
          f"{own['agreement']:.0%} of {own['agreement_of']}")
    own = reference  # what follows was measured on the float32 forward
    print("verify cost (own, x one token): " + ", ".join(f"k={k}: {v:.2f}" for k, v in own["verify_cost"].items()))
    one = batched["1"] or float("nan")
    print("batched decode through the scheduler (tokens/s): " + ", ".join(f"{n} docs: {v:.1f} ({v / one:.2f}x)" for n, v in batched.items()))
    forward = results["batched_forward"]
    alone = forward["1"] or float("nan")
    print("batched forward alone (tokens/s): " + ", ".join(f"{n} docs: {v:.1f} ({v / alone:.2f}x)" for n, v in forward.items()))
    print("own decode ms/token at 1k by threads: " + ", ".join(f"{t}: {v:.1f}" for t, v in own["decode_ms_per_token_1k_by_threads"].items()))
    print(
        f"exactness: {exact.identical}/{exact.completions} greedy completions identical, "
        f"max logit difference {exact.max_logit_diff:.2e}"
    )
