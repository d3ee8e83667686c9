"""A smoke run of every `rotary bench` subcommand: `--quick --limit 2 --json PATH`, exit status 0,
and the machine-readable keys its issue names (the numbers behind docs/BENCHMARKS.md).

Every name in rotary.bench.BENCHMARKS must have an entry in SPECS, so a new benchmark comes
with its smoke run. The runs test the plumbing, not the model's quality (`rotary bench quality`
and the model tests measure that): all but `exit` run on a tiny random Llama built here with the
embedded tokenizer (`--model`), where loading and every forward take milliseconds. `exit` keeps
the embedded model: it needs exit heads and an abstention gate fitted for the model, and the gate
needs completions that are right as well as wrong, which a random model never gives (`rotary
calibrate` on it stops: "0 of 6 training completions were right"); the calibrate test below keeps
it for the same reason.
"""

from __future__ import annotations

import json
import math
import operator
import shutil
import subprocess

import pytest

from rotary.bench import BENCHMARKS
from rotary.completion.rpc.launch import rotary_command

RESULTS_4_8_16 = {"4", "8", "16"}

# name -> (what each dotted path under the report must hold, extra command-line arguments)
SPECS: dict[str, dict[str, set[str]]] = {
    # issue 7
    "quality": {
        f"results.{kind}.{method}": {"pass_at_1", "em", "es", "ws_damage", "latency_ms_p50", "cases"}
        for kind in ("single_line", "multi_line")
        for method in ("service", "plain")
    },
    # issue 8
    "decode": {
        "results.hf": {"decode_ms_per_token_1k", "decode_ms_per_token_4k", "prefill_tok_s_1k", "prefill_tok_s_4k"},
        # issue 25: results.own in the default precision, results.exact the float32 reference
        "results.own": {
            "decode_ms_per_token_1k", "decode_ms_per_token_4k", "prefill_tok_s_1k", "prefill_tok_s_4k",
            "precision", "agreement", "edit_first_token_ms_4k",
        },
        "results.exact": {
            "decode_ms_per_token_1k", "decode_ms_per_token_4k", "prefill_tok_s_1k", "prefill_tok_s_4k",
            "identical", "max_logit_diff", "verify_cost",
        },
        "results.exact.verify_cost": RESULTS_4_8_16,
        "results.batched": {"1", "4", "8"},
        # issue 25: llama.cpp beside it; with the tiny Hugging Face folder it cannot run and says why
        "results.peer": {"available", "why"},
    },
    # the shape it has today (docs/BENCHMARKS.md)
    "latency": {
        "results": {"lsp", "direct", "overhead", "same_suggestion", "nonempty_suggestions", "cases"},
        **{f"results.{path}": {"p50_ms", "p95_ms"} for path in ("lsp", "direct", "overhead")},
    },
    "edits": {
        "results": {"full", "prefix", "conflict", "pie", "pie_refresh"},
        **{
            f"results.{method}": {"em", "es", "same_as_full", "tokens_encoded_frac", "first_token_ms_p50", "cases"}
            for method in ("full", "prefix", "conflict", "pie", "pie_refresh")
        },
        "results_by_context": set(),
    },
    # issue 9 (early exit and abstention), once it exists
    "exit": {
        **{f"results.{m}": {"layers_frac", "speedup", "rouge_l", "em", "tokens_per_s"} for m in ("full", "early_exit")},
        "results.lossless": {"layers_frac", "speedup", "rouge_l", "em", "tokens_per_s", "identical", "accepted_per_verify"},
        "results.abstain": {"auroc", "shown_frac", "em_shown", "em_all"},
    },
    # issue 10 (unit-test generation), once it exists
    "tests": {
        f"results.{m}": {
            "forwards_per_token", "speedup", "identical", "syntax_ok", "pass_rate", "line_cov", "branch_cov",
            "accepted_per_verify",
        }
        for m in ("plain", "ngram", "ast")
    },
    # issue 11 (load), once it exists
    "load": {
        f"results.n={n}": {"p50_ms", "p95_ms", "p99_ms", "lost_edits", "peak_rss_mb", "restarts"} for n in (1, 5, 20)
    },
}


# name -> {dotted path: the value a correct run shows}: what the quick run must find, not only its keys.
# Lossless methods give the same text (decode's own forward, exit's lossless speculation, every test
# generation drafter); the exact cache methods (full recompute, prefix reuse) predict what full
# recompute predicts; the load run loses no edit.
MUST_HOLD: dict[str, dict[str, object]] = {
    "decode": {"results.exact.identical": True},
    "exit": {"results.lossless.identical": True},
    "tests": {f"results.{m}.identical": True for m in ("plain", "ngram", "ast")},
    "edits": {"results.full.same_as_full": 1.0, "results.prefix.same_as_full": 1.0},
    "load": {f"results.n={n}.lost_edits": 0 for n in (1, 5, 20)},
}

# name -> {dotted path: (operator, bound)}: what shows that MUST_HOLD could have failed in this run.
# Lossless decoding gives the same text trivially when no guess is ever kept: guesses were kept
# (on the tiny model the n-gram drafter's are; the AST drafter's never are, as a random model
# writes no Python: tests/completion/test_testgen_model.py::test_greedy_tests_are_identical_with_every_drafter
# checks kept AST guesses on the embedded model). The exact cache methods agree with full recompute
# trivially when the prediction does not depend on the cache: the lossy one (no re-rotation) differs
# from it, and prefix reuse re-encoded less than everything. Latency's suggestions agree on text, not
# on nothing; each load size sent edits.
MEANINGFUL: dict[str, dict[str, tuple[str, float]]] = {
    "tests": {"results.ngram.accepted_per_verify": (">", 0)},
    "exit": {"results.lossless.accepted_per_verify": (">", 0)},
    "edits": {"results.conflict.same_as_full": ("<", 1), "results.prefix.tokens_encoded_frac": ("<", 1)},
    "latency": {"results.nonempty_suggestions": (">", 0)},
    "load": {f"results.n={n}.edits_sent": (">", 0) for n in (1, 5, 20)},
}
OPERATORS = {">": operator.gt, "<": operator.lt}

# name -> its smoke run's extra command-line arguments; TINY stands for the tiny Llama's folder.
TINY = "<tiny llama>"
ARGUMENTS: dict[str, list[str]] = {
    "quality": ["--model", TINY],
    "latency": ["--model", TINY],
    "edits": ["--model", TINY],
    # with the embedded model its 1k and 4k prefills alone take minutes on a CPU even with --quick
    "decode": ["--model", TINY],
    "tests": ["--model", TINY, "--methods", "ngram,ast"],  # the three SPECS names (not ast-strict, ast+ngram)
    "exit": [],  # the embedded model: see the module's docstring
    # ten keystrokes an editor, not --quick's 90 at human speed: the edits and the texts checked are the same kind
    "load": ["--model", TINY, "--keystrokes", "10"],
}


def test_every_benchmark_has_a_smoke_run():
    missing = [name for name in BENCHMARKS if name not in SPECS or name not in ARGUMENTS]
    assert not missing, f"add the JSON keys of {missing} (from their issue) to SPECS and its arguments to ARGUMENTS in {__file__}"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, model_dir):
    """A small random Llama (2 layers, 64 wide) with the embedded tokenizer and 8k positions, in a
    temporary folder. Its weights are drawn wider than transformers' default (std 0.1, the query and
    key projections 1.3 times that), so its greedy text depends on the context and on where each key
    sits (a cache that keeps keys unrotated after an edit predicts otherwise) yet still repeats
    itself now and then (the n-gram drafter's guesses are kept). The special tokens' embeddings are
    zero, so their logits are 0, below the largest of the others: the text never ends at once (a
    completion of no tokens has no tokens/s)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, tie_word_embeddings=True, eos_token_id=0, bos_token_id=0,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:17] = 0  # SmolLM2's special tokens are ids 0-16
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight *= 1.3
            layer.self_attn.k_proj.weight *= 1.3
    target = tmp_path_factory.mktemp("tiny-llama-8k")
    model.save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, target / name)
    return target


def at(report: dict, path: str):
    node = report
    for part in path.split("."):
        assert isinstance(node, dict) and part in node, f"{path}: no {part!r} in {sorted(node) if isinstance(node, dict) else node!r}"
        node = node[part]
    return node


def numbers_in(node) -> list[float]:
    if isinstance(node, dict):
        return [x for value in node.values() for x in numbers_in(value)]
    if isinstance(node, bool) or not isinstance(node, (int, float)):
        return []
    return [float(node)]


@pytest.mark.model
@pytest.mark.parametrize("name", BENCHMARKS)
def test_benchmark_quick_run_writes_the_keys_its_issue_names(name, tmp_path, request):
    spec = SPECS.get(name)
    if spec is None:
        pytest.fail(f"no smoke spec for {name!r}: see test_every_benchmark_has_a_smoke_run")
    extra = [str(request.getfixturevalue("tiny_llama_dir")) if arg == TINY else arg for arg in ARGUMENTS[name]]
    path = tmp_path / f"{name}.json"
    out = subprocess.run(
        rotary_command("--log-level", "warning", "bench", name, "--quick", "--limit", "2",
         "--json", str(path), *extra),
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads(path.read_text())
    assert report.get("benchmark", name) == name
    for dotted, keys in spec.items():
        node = at(report, dotted)
        assert isinstance(node, dict), f"{dotted} is not an object: {node!r}"
        assert keys <= set(node), f"{dotted} lacks {sorted(keys - set(node))}"
    assert all(math.isfinite(x) for x in numbers_in(report["results"])), report["results"]
    assert_what_must_hold(name, report)


def assert_what_must_hold(name: str, report: dict) -> None:
    """MUST_HOLD's values, MEANINGFUL's bounds, and latency's suggestions the same on both paths in every case."""
    for dotted, value in MUST_HOLD.get(name, {}).items():
        found = at(report, dotted)
        assert found == value and type(found) is type(value), f"{name}: {dotted} is {found!r}, not {value!r}"
    for dotted, (op, bound) in MEANINGFUL.get(name, {}).items():
        found = at(report, dotted)
        assert OPERATORS[op](found, bound), f"{name}: {dotted} is {found!r}, not {op} {bound}: MUST_HOLD shows nothing here"
    if name == "edits":
        for method in SPECS["edits"]["results"]:
            assert 0.0 <= at(report, f"results.{method}.same_as_full") <= 1.0, method
    if name == "latency":
        cases = at(report, "results.cases")
        assert cases > 0 and at(report, "results.same_suggestion") == cases, report["results"]


def put(report: dict, dotted: str, value) -> None:
    node = report
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value


def test_a_report_that_breaks_what_must_hold_fails():
    """The checks above can fail: each value of MUST_HOLD changed in a report that otherwise holds
    (identical False, same_as_full 0.5, one lost edit, one latency case that differs) is caught, and so
    is each bound of MEANINGFUL met exactly (no guess kept, conflict as good as full, no edit sent...)."""
    for name in MUST_HOLD.keys() | MEANINGFUL.keys():
        must, meaningful = MUST_HOLD.get(name, {}), MEANINGFUL.get(name, {})
        report: dict = {}
        for dotted, value in must.items():
            put(report, dotted, value)
        for dotted, (op, bound) in meaningful.items():
            put(report, dotted, bound + 1 if op == ">" else bound - 0.5)
        if name == "edits":
            for method in SPECS["edits"]["results"]:
                report["results"].setdefault(method, {}).setdefault("same_as_full", 0.8)
        if name == "latency":
            report["results"].update(cases=2, same_suggestion=2)
        assert_what_must_hold(name, report)
        broken_values = {dotted: False if value is True else 0.5 if isinstance(value, float) else value + 1 for dotted, value in must.items()}
        broken_values.update({dotted: bound for dotted, (_, bound) in meaningful.items()})
        for dotted, value in broken_values.items():
            broken = json.loads(json.dumps(report))
            put(broken, dotted, value)
            with pytest.raises(AssertionError, match=dotted):
                assert_what_must_hold(name, broken)
    latency = {"results": {"cases": 2, "same_suggestion": 2, "nonempty_suggestions": 1}}
    assert_what_must_hold("latency", latency)
    latency["results"]["same_suggestion"] = 1
    with pytest.raises(AssertionError):
        assert_what_must_hold("latency", latency)


@pytest.mark.model
def test_calibrate_writes_an_artifact_the_worker_can_load(tmp_path):
    """`rotary calibrate`, tiny: one exit layer, a few hundred tokens, a handful of completion points.
    The embedded model, not the tiny one: the abstention gate needs right completions among its points."""
    from rotary.models.exits import ExitHeads

    path = tmp_path / "exits.safetensors"
    out = subprocess.run(
        rotary_command("--log-level", "warning", "calibrate", "--quick", "--tokens", "512",
         "--points", "6", "--exit-layers", "9", "--rank", "4", "--out", str(path)),
        capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads(out.stdout)
    assert report["artifact"] == str(path) and report["exit_layers"] == [9]
    assert {"agreement_logit_lens", "agreement_exit_head", "controller_auroc"} <= set(report["exits"]["9"])
    assert {"auroc", "shown_frac", "em_shown", "em_all", "threshold"} <= set(report["abstention"])
    heads = ExitHeads.load(path)
    assert heads.layers == (9,) and heads.down[9].shape[1] == 4
    assert abs(heads.meta["gate"]["threshold"] - report["abstention"]["threshold"]) < 1e-3  # the report rounds
