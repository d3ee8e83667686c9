"""`rotary bench latency`: keystroke-to-suggestion latency through the LSP daemon and gRPC,
against the bare model call on the same text, measured in the same run.

For each case (a file from the corpus and a cursor inside one of its lines) the
file is opened with the cursor's line cut one character short, that character
is typed (didChange), and ghost text is requested (inlineCompletion) at once
(debounce 0, so the number is the service's own cost, not the typing pause).
`lsp` is the time from the keystroke to the answer as an editor sees it;
`direct` is the same completion computed in this process by the engine the
worker runs (same text, same cache state, same tokens), without LSP or gRPC.
The overhead is their paired difference.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import time
from pathlib import Path

from rotary.completion.rpc.launch import rotary_command

from .report import write_report
from .corpus import sample_files
from .harness import percentile, running_worker


def make_cases(corpus: str | None, limit: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for path in sample_files(corpus, limit * 3, seed):
        lines = path.read_text(encoding="utf-8").split("\n")
        candidates = [i for i, ln in enumerate(lines[:150]) if len(ln.strip()) >= 12 and i >= 10]
        if not candidates:
            continue
        line = rng.choice(candidates)
        text_line = lines[line]
        indent = len(text_line) - len(text_line.lstrip())
        column = rng.randint(indent + 4, len(text_line) - 1)
        cases.append({"file": str(path), "line": line, "column": column, "text": "\n".join(lines)})
        if len(cases) == limit:
            break
    return cases


async def _measure(worker_address: str, cases: list[dict], max_tokens: int, direct, progress) -> tuple[list[dict], list[dict]]:
    """Per case: the LSP path, then the direct path on the same text (interleaved, so drift hits both alike)."""
    from lsprotocol import types
    from pygls.lsp.client import LanguageClient

    client = LanguageClient("rotary-bench", "1")
    ready = asyncio.Event()

    @client.feature("rotary/status")
    def status(params):
        state = params.state if hasattr(params, "state") else params["state"]
        if state == "ready":
            ready.set()

    await client.start_io(*rotary_command("--log-level", "warning", "lsp", "--worker", worker_address))
    await client.initialize_async(
        types.InitializeParams(
            capabilities=types.ClientCapabilities(),
            initialization_options={"completionMode": "singleLine", "maxTokens": max_tokens, "debounceMs": 0},
        )
    )
    client.initialized(types.InitializedParams())
    await asyncio.wait_for(ready.wait(), timeout=600)
    lsp_out, direct_out = [], []
    for i, case in enumerate(cases):
        uri = Path(case["file"]).resolve().as_uri() + f"#case{i}"
        lines = case["text"].split("\n")
        cut_line = lines[case["line"]][: case["column"]]
        before = lines[case["line"]][: case["column"] - 1]
        opened = "\n".join(lines[: case["line"]] + [before + lines[case["line"]][case["column"] :]] + lines[case["line"] + 1 :])
        client.text_document_did_open(
            types.DidOpenTextDocumentParams(types.TextDocumentItem(uri=uri, language_id="python", version=1, text=opened))
        )
        # Warm the document: the first request encodes the file (an editor does this when the file opens).
        await client.text_document_inline_completion_async(
            types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(case["line"], len(before)),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
            )
        )
        started = time.perf_counter()
        client.text_document_did_change(
            types.DidChangeTextDocumentParams(
                text_document=types.VersionedTextDocumentIdentifier(uri=uri, version=2),
                content_changes=[
                    types.TextDocumentContentChangePartial(
                        range=types.Range(types.Position(case["line"], len(before)), types.Position(case["line"], len(before))),
                        text=cut_line[-1],
                    )
                ],
            )
        )
        result = await client.text_document_inline_completion_async(
            types.InlineCompletionParams(
                text_document=types.TextDocumentIdentifier(uri=uri),
                position=types.Position(case["line"], case["column"]),
                context=types.InlineCompletionContext(trigger_kind=types.InlineCompletionTriggerKind.Automatic),
            )
        )
        elapsed = (time.perf_counter() - started) * 1000
        lsp_out.append({"ms": elapsed, "text": result.items[0].insert_text if result and result.items else ""})
        client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(uri=uri)))
        direct_out.append(direct(i, case))
        progress()
    await client.shutdown_async(None)
    client.exit(None)
    await client.stop()
    return lsp_out, direct_out


def _direct_path(model: str | None, max_tokens: int):
    """The engine the worker runs, in this process: returns a function timing one case."""
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine, CompletionOptions
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner, configure_threads

    configure_threads()
    engine = CompletionEngine(ModelRunner(load_model(model)), KVStore())
    engine.warm_up()
    options = CompletionOptions(max_tokens=max_tokens, mode="single_line")

    def run_case(i: int, case: dict) -> dict:
        lines = case["text"].split("\n")
        offset = sum(len(ln) + 1 for ln in lines[: case["line"]]) + case["column"]
        before_edit = case["text"][: offset - 1] + case["text"][offset:]
        list(engine.complete(f"case{i}", before_edit, offset - 1, options))  # same warm-up as the LSP path
        started = time.perf_counter()
        chunks = list(engine.complete(f"case{i}", case["text"], offset, options))
        elapsed = (time.perf_counter() - started) * 1000
        engine.kv_store.drop(f"case{i}")
        return {"ms": elapsed, "text": "".join(c.text for c in chunks)}

    return run_case


def main(args) -> int:
    from tqdm import tqdm

    limit = args.limit or (8 if args.quick else 40)
    max_tokens = 16 if args.quick else 32
    cases = make_cases(args.corpus, limit, args.seed)
    print(f"latency: {len(cases)} cases from {args.corpus or 'the standard library'} (seed {args.seed})", file=sys.stderr)

    direct = _direct_path(args.model, max_tokens)
    with running_worker(args.model) as (_worker, address):
        bar = tqdm(total=len(cases), desc="latency", unit="case", file=sys.stderr)
        lsp, direct = asyncio.run(_measure(address, cases, max_tokens, direct, lambda: bar.update(1)))
        bar.close()

    overheads = [a["ms"] - b["ms"] for a, b in zip(lsp, direct)]
    same = sum(a["text"] == b["text"] for a, b in zip(lsp, direct))
    results = {
        "lsp": {"p50_ms": round(statistics.median(a["ms"] for a in lsp), 2), "p95_ms": round(percentile([a["ms"] for a in lsp], 0.95), 2)},
        "direct": {"p50_ms": round(statistics.median(b["ms"] for b in direct), 2), "p95_ms": round(percentile([b["ms"] for b in direct], 0.95), 2)},
        "overhead": {"p50_ms": round(statistics.median(overheads), 2), "p95_ms": round(percentile(overheads, 0.95), 2)},
        "same_suggestion": same,
        "nonempty_suggestions": sum(bool(a["text"]) for a in lsp),  # the agreement is not of empty texts alone
        "cases": len(cases),
    }
    report = {
        "benchmark": "latency",
        "config": {
            "cases": len(cases),
            "seed": args.seed,
            "corpus": args.corpus or "stdlib",
            "model": args.model or "embedded SmolLM2-135M",
            "max_tokens": max_tokens,
            "mode": "singleLine",
            "debounce_ms": 0,
            "cpu_threads": os.cpu_count(),
            "quick": bool(args.quick),
        },
        "results": results,
    }
    print(
        f"\n{'path':<8}{'p50 ms':>10}{'p95 ms':>10}\n"
        f"{'lsp':<8}{results['lsp']['p50_ms']:>10.1f}{results['lsp']['p95_ms']:>10.1f}\n"
        f"{'direct':<8}{results['direct']['p50_ms']:>10.1f}{results['direct']['p95_ms']:>10.1f}\n"
        f"overhead p50 {results['overhead']['p50_ms']:.1f} ms (goal <= 10 ms), "
        f"ratio lsp/direct p50 {results['lsp']['p50_ms'] / max(results['direct']['p50_ms'], 1e-9):.3f}; "
        f"same suggestion in {same}/{len(cases)} cases"
    )
    write_report(args.json, report)
    return 0
