"""`rotary bench tests`: unit-test generation on TestEval, plain decoding and the drafters side by side.

For each program (a LeetCode solution, its focal method `Solution.<func_name>`), n = 5 tests are
generated one after another (testgen/generate.py: the earlier tests in the context), greedily,
once per method, the methods taking turns program by program so that drift of a shared machine
hits them alike:

- plain: one token per forward;
- ngram: prompt lookup (drafters.NgramDrafter) over the prompt and the tokens generated so far;
- ast-strict: the tree-sitter line patterns of the tests so far (testgen/patterns.py, testgen/drafting.py), DiffTester's
  rule: the shared text up to the next literal;
- ast: the patterns, each literal guessed from the group's lines (verification is lossless, so a
  guess costs only a wider verify);
- ast+ngram: the patterns, and n-gram lookup where no pattern predicts.

Speed: forward passes per generated token, accepted draft tokens per verify, wall-clock time of
the generation (prefill included) and of its decoding, each against plain; and a modeled speedup
that does not depend on the machine's other load: each verify costs what a forward of its width
(1 + draft tokens) costs, measured at the start of the run against a one-token step. Greedy
outputs must be byte-identical to plain's. Quality, computed on plain's tests (and on any method whose tests
differ): the fraction that parses, the fraction that passes against the reference solution, and
line and branch coverage of the solution (coverage.py, import lines excluded as TestEval does) by
the tests that run without an error other than a failed assertion and call the focal method
(TestEval's rule), averaged over programs. Generated tests run in a sandbox (testgen/sandbox.py).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

from .report import write_report

METHODS = ("plain", "ngram", "ast-strict", "ast", "ast+ngram")
# TestEval's Python programs ship with Rotary (MIT, bench/data/testeval/LICENSE): a fresh machine has them.
DEFAULT_DATA = Path(__file__).resolve().parent / "data" / "testeval" / "leetcode-py.jsonl"
TESTS_PER_PROGRAM = 5
TEST_TOKENS = 128
# DiffTester (TECHNIQUES.md section 3), n = 5, Python, TestEval-extend: wall-clock 1.42-2.30x, TFLOP ratio 1.55-2.70x.


def load_programs(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def quality(program: dict, tests, sandbox_timeout: float = 30.0, allow_network: bool = False) -> dict:
    """Syntax, pass/fail against the reference solution, and coverage of it (TestEval's rules)."""
    from rotary.testgen.sandbox import run_tests

    name = program["func_name"]
    valid = [t for t in tests if t.syntax_ok]
    header = "from solution import *  # noqa\n\n"
    source = header + "\n\n".join(t.code for t in valid) + "\n"
    outcome = {t.name: "syntax" for t in tests if not t.syntax_ok}
    run = run_tests("solution", program["python_solution"], source, coverage=False, timeout=sandbox_timeout, allow_network=allow_network) if valid else None
    if run is not None:
        for t in valid:
            outcome[t.name] = "error" if run.load_error else run.results.get(t.name, "error")
    # TestEval's executable tests: no error other than a failed assertion, and the focal method called.
    executable = [t for t in valid if outcome[t.name] in ("passed", "failed") and f".{name}(" in t.code]
    line_cov = branch_cov = 0.0
    network = run.network if run is not None else ""
    if executable:
        cov_run = run_tests(
            "solution", program["python_solution"], header + "\n\n".join(t.code for t in executable) + "\n",
            coverage=True, timeout=sandbox_timeout, allow_network=allow_network,
        )
        line_cov, branch_cov = cov_run.line_cov or 0.0, cov_run.branch_cov or 0.0
    return {
        "tests": len(tests),
        "syntax_ok": len(valid),
        "passed": sum(1 for o in outcome.values() if o == "passed"),
        "executable": len(executable),
        "line_cov": line_cov,
        "branch_cov": branch_cov,
        "outcomes": outcome,
        "network": network,
    }


def verify_costs(runner, text: str, repeats: int) -> dict[int, float]:
    """The cost of a forward of w tokens (w = 1..16) after ~600 tokens of context, in one-token steps
    (medians, widths taking turns so that load changes hit them alike)."""
    from rotary.cache.buffer import KVBuffer

    info = runner.info
    buffer = KVBuffer(info.num_layers, info.num_kv_heads, info.head_dim, dtype=runner.dtype, device=runner.device)
    ids = runner.encode_text(text)[:600]
    buffer.extend(ids, runner.forward, logits=None)
    base = buffer.length
    times: dict[int, list[float]] = {w: [] for w in range(1, 17)}
    for _ in range(repeats):
        for width in times:
            started = time.perf_counter()
            buffer.extend(ids[:width], runner.forward, logits="all")
            times[width].append(time.perf_counter() - started)
            buffer.rollback(base)
    one = statistics.median(times[1])
    return {w: round(statistics.median(t) / one, 3) for w, t in times.items()}


def modeled_cost(tests, costs: dict[int, float]) -> float:
    """What a run's verifies cost in one-token steps: drafted verifies by their width, the others 1."""
    total = 0.0
    for test in tests:
        drafted = [d.proposed for d in test.drafts if d.proposed]
        total += (test.stats.forwards - len(drafted)) * costs[1]
        total += sum(costs.get(1 + n, costs[16]) for n in drafted)
    return total


def main(args) -> int:
    from tqdm import tqdm

    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine
    from rotary.testgen.sandbox import UNISOLATED_NOTE, isolation, refusal, running_anyway
    from rotary.testgen.drafting import DRAFT_TOKENS
    from rotary.testgen.focal import find_focal
    from rotary.testgen.generate import generate_tests
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner, configure_threads

    data = Path(getattr(args, "data", None) or DEFAULT_DATA)
    if not data.exists():
        print(f"bench tests: no TestEval data at {data}; pass --data PATH (TestEval's leetcode-py.jsonl format)", file=sys.stderr)
        return 2
    allow_network = bool(getattr(args, "allow_network", False))
    iso = isolation()
    if not iso.available and not allow_network:  # said before the model loads, not after
        print(f"bench tests: {refusal(iso)}", file=sys.stderr)
        return 2
    sandbox_note = iso.note if iso.available else UNISOLATED_NOTE
    if not iso.available:
        print(f"bench tests: {running_anyway(iso)}", file=sys.stderr)
    programs = load_programs(data)
    quick = bool(args.quick)
    count = args.limit or (6 if quick else 50)
    rng = random.Random(args.seed)
    chosen = sorted(rng.sample(range(len(programs)), min(count, len(programs))))
    n_tests = 3 if quick else TESTS_PER_PROGRAM
    methods = METHODS
    if getattr(args, "methods", None):
        wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in METHODS]
        if unknown:
            print(f"bench tests: unknown method(s) {', '.join(unknown)}; use {', '.join(METHODS)}", file=sys.stderr)
            return 2
        methods = tuple(m for m in METHODS if m == "plain" or m in wanted)  # plain: the reference of every ratio

    configure_threads()
    loaded = load_model(args.model)
    runner = ModelRunner(loaded)
    engine = CompletionEngine(runner, KVStore())
    engine.warm_up()
    costs = verify_costs(runner, programs[chosen[0]]["python_solution"] * 4, 3 if quick else 9)
    print(
        f"tests: {loaded.info.name}, {len(chosen)} programs of {data.name} (seed {args.seed}), n = {n_tests} tests each, "
        f"up to {TEST_TOKENS} tokens a test, {DRAFT_TOKENS} draft tokens per verify; sandbox: {sandbox_note}",
        file=sys.stderr,
    )
    print("verify cost in one-token steps by width: " + ", ".join(f"{w}: {c:.2f}" for w, c in costs.items()), file=sys.stderr)
    totals = {
        m: {"tokens": 0, "forwards": 0, "drafted": 0, "accepted": 0, "seconds": 0.0, "decode_ms": 0.0, "identical": 0, "tests": 0, "modeled": 0.0}
        for m in methods
    }
    per_program = []
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    bar = tqdm(total=len(chosen) * len(methods), desc="tests", unit="run", file=sys.stderr)
    for position, index in enumerate(chosen):
        program = programs[index]
        focal = find_focal("solution.py", program["python_solution"], f"Solution.{program['func_name']}")
        order = methods[position % len(methods) :] + methods[: position % len(methods)]  # take turns going first
        outputs = {}
        for method in order:
            tests = list(generate_tests(
                engine, focal, count=n_tests, max_tokens=TEST_TOKENS, drafter=method,
                description=program.get("description", "")[:600],
            ))
            outputs[method] = tests
            t = totals[method]
            t["modeled"] += modeled_cost(tests, costs)
            for test in tests:
                s = test.stats
                t["tokens"] += s.tokens_generated
                t["forwards"] += s.forwards
                t["drafted"] += s.tokens_drafted
                t["accepted"] += s.drafts_accepted
                t["seconds"] += test.seconds
                t["decode_ms"] += s.decode_ms
                t["tests"] += 1
            bar.update(1)
        reference = [t.code for t in outputs["plain"]]
        row = {"task_num": program["task_num"], "func_name": program["func_name"], "methods": {}}
        plain_quality = quality(program, outputs["plain"], allow_network=allow_network)
        for method in methods:
            tests = outputs[method]
            same = sum(1 for a, b in zip(reference, [t.code for t in tests]) if a == b)
            totals[method]["identical"] += same
            q = plain_quality if same == len(reference) == len(tests) else quality(program, tests, allow_network=allow_network)
            totals[method].setdefault("quality", []).append(q)
            row["methods"][method] = {
                "tokens": sum(t.stats.tokens_generated for t in tests),
                "forwards": sum(t.stats.forwards for t in tests),
                "accepted": sum(t.stats.drafts_accepted for t in tests),
                "seconds": round(sum(t.seconds for t in tests), 2),
                "identical": same == len(reference) == len(tests),
                "passed": q["passed"],
                "line_cov": round(q["line_cov"], 3),
            }
        row["tests"] = reference
        row["outcomes"] = plain_quality["outcomes"]
        per_program.append(row)
    bar.close()
    engine.scheduler.stop()

    plain = totals["plain"]
    results = {}
    for method in methods:
        t = totals[method]
        qs = t["quality"]
        tests = sum(q["tests"] for q in qs)
        results[method] = {
            "forwards_per_token": round(t["forwards"] / t["tokens"], 4),
            "fewer_forwards": round(plain["forwards"] / t["forwards"], 3),
            "accepted_per_verify": round(t["accepted"] / t["forwards"], 3),
            "accepted_of_drafted": round(t["accepted"] / t["drafted"], 3) if t["drafted"] else None,
            "speedup": round(plain["seconds"] / t["seconds"], 3),
            "modeled_speedup": round(plain["modeled"] / t["modeled"], 3),
            "decode_speedup": round(plain["decode_ms"] / t["decode_ms"], 3),
            "seconds": round(t["seconds"], 1),
            "tokens": t["tokens"],
            "forwards": t["forwards"],
            "identical": t["identical"] == plain["tests"] == t["tests"],
            "identical_tests": t["identical"],
            "syntax_ok": round(sum(q["syntax_ok"] for q in qs) / tests, 3),
            "pass_rate": round(sum(q["passed"] for q in qs) / tests, 3),
            "executable_rate": round(sum(q["executable"] for q in qs) / tests, 3),
            "line_cov": round(statistics.mean(q["line_cov"] for q in qs), 3),
            "branch_cov": round(statistics.mean(q["branch_cov"] for q in qs), 3),
        }
    report = {
        "benchmark": "tests",
        "config": {
            "model": loaded.info.name,
            "data": str(data),
            "programs": len(chosen),
            "program_indices": chosen,
            "tests_per_program": n_tests,
            "max_tokens_per_test": TEST_TOKENS,
            "draft_tokens": DRAFT_TOKENS,
            "verify_cost": {str(w): c for w, c in costs.items()},
            "seed": args.seed,
            "methods": list(methods),
            "quick": quick,
            "cpu_count": os.cpu_count(),
            "sandbox_network": sandbox_note,
        },
        "results": results,
        "programs": per_program,
        "seconds": round(time.perf_counter() - started, 1),
        "load_average": {"start": round(load_before, 2), "end": round(os.getloadavg()[0], 2)},
    }
    _print_table(results, len(chosen), n_tests)
    print(f"load average {report['load_average']['start']:.1f} -> {report['load_average']['end']:.1f} on {os.cpu_count()} cores")
    write_report(args.json, report)
    return 0 if all(r["identical"] for r in results.values()) else 1


def _print_table(results: dict, programs: int, n: int) -> None:
    print(f"\n{programs} programs x {n} tests, greedy")
    head = f"{'method':<11}{'fwd/token':>10}{'fewer fwd':>10}{'acc/verify':>11}{'wall x':>8}{'decode x':>9}{'modeled x':>10}{'identical':>10}"
    print(head)
    for method, r in results.items():
        print(
            f"{method:<11}{r['forwards_per_token']:>10.3f}{r['fewer_forwards']:>9.2f}x{r['accepted_per_verify']:>11.2f}"
            f"{r['speedup']:>7.2f}x{r['decode_speedup']:>8.2f}x{r['modeled_speedup']:>9.2f}x{str(r['identical']):>10}"
        )
    r = results["plain"]
    print(
        f"quality (plain; identical outputs share it): syntax ok {r['syntax_ok']:.3f}, pass {r['pass_rate']:.3f}, "
        f"executable {r['executable_rate']:.3f}, line coverage {r['line_cov']:.3f}, branch coverage {r['branch_cov']:.3f}"
    )
