"""llama.cpp as the peer of `rotary bench decode`: the same GGUF, threads and token ids, in the same run.

The peer is node-llama-cpp 3.21.1 (bench/llamacpp, installed by `make peer-setup`), run on its prebuilt
CPU binary (@node-llama-cpp/linux-x64: getLlama with gpu false, build "never", no download). Its script,
bench/llamacpp/peer.mjs, takes one JSON job on stdin (the GGUF, the threads, the contexts as token ids
from Rotary's tokenizer, the one-line edits) and prints its measurements as JSON; `measure` turns them
into the report's results.peer. Where the peer cannot run (not installed, no node, a model that is no
GGUF, a failure) results.peer says so: {"available": False, "why": ...}.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

PEER = "llama.cpp"
PEER_DIR = Path(__file__).resolve().parent / "llamacpp"
SCRIPT = PEER_DIR / "peer.mjs"
PACKAGE = "node-llama-cpp"
BINARY_PACKAGE = "@node-llama-cpp/linux-x64"  # the prebuilt CPU binary: the only one the peer uses
SETUP = "make peer-setup (cd bench/llamacpp && npm ci)"


class PeerError(RuntimeError):
    """The peer ran and failed: the message says how, with the end of its stderr."""


def unavailable(why: str) -> dict:
    return {"available": False, "why": why}


def why_not_installed() -> str | None:
    """None when the peer can run here, else the reason it cannot."""
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the peer's prebuilt binary ({BINARY_PACKAGE}) is for Linux x86-64, not {sys.platform} {platform.machine()}"
    if shutil.which("node") is None:
        return f"node is not on PATH: the peer runs under Node.js ({SETUP})"
    modules = PEER_DIR / "node_modules"
    for package in (PACKAGE, BINARY_PACKAGE):
        if not (modules / package / "package.json").is_file():
            return f"{PEER} is not installed: {modules / package} is absent; run {SETUP}"
    return None


def gguf_for(model: str | None) -> tuple[Path | None, str | None]:
    """The GGUF file the peer loads for `--model` (None: the embedded default), or the reason there is none."""
    from rotary.models.loader import ModelLoadError, find_default_gguf

    if model is None:
        try:
            return find_default_gguf(), None
        except ModelLoadError as exc:
            return None, str(exc)
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.resolve(), None
    if path.is_dir():
        return None, f"the model {model} is a Hugging Face folder; {PEER} runs GGUF files (pass --model FILE.gguf)"
    return None, f"the model {model} is no .gguf file; {PEER} runs GGUF files (pass --model FILE.gguf)"


def run_job(job: dict, timeout: float) -> dict:
    """Run peer.mjs on one job; its JSON output, or PeerError with what went wrong."""
    try:
        out = subprocess.run(
            ["node", str(SCRIPT)], input=json.dumps(job), capture_output=True, text=True,
            timeout=timeout, cwd=PEER_DIR,
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise PeerError(f"{PEER} did not finish in {timeout:.0f} s; its stderr ends: {stderr[-1500:]!r}") from None
    if out.returncode != 0:
        error = next((line.strip() for line in reversed(out.stderr.splitlines()) if "Error" in line and not line.lstrip().startswith("at ")), "")
        raise PeerError(f"{PEER} exited with status {out.returncode}: {error or 'see its stderr'}; its stderr ends: {out.stderr[-1500:]!r}")
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        raise PeerError(f"{PEER} printed no JSON result: stdout {out.stdout[-500:]!r}, stderr {out.stderr[-1500:]!r}") from None


def _key(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


def measure(
    model: str | None,
    contexts: dict[int, list[list[int]]],
    steps: int,
    threads: int,
    prefill_threads: int,
    edits: list[tuple[list[int], list[int]]] = (),
    edit_length: int = 4096,
    tokenize_check: tuple[str, list[int]] | None = None,
    timeout: float = 3600,
) -> dict:
    """results.peer: the peer on the same GGUF, threads and token ids as Rotary.

    `contexts`: per length (1024, 4096), the decode cases' token ids: decode ms/token (median over
    `steps` greedy steps after the prefill, on `threads`; also on `prefill_threads`), prefill
    tokens/s (best case, on `prefill_threads`) and the greedy tokens of each case (the first from the
    prefill, then one a step). `edits`: (before, after) token ids of a file with one line changed;
    the time from the edit to the first new token with the file before it cached, median, keyed
    edit_first_token_ms_{4k}: the common prefix reused (llama-server's prompt cache), and `_shift`:
    the matching tokens after the edit kept too, their KV shifted (llama.cpp's context shift).
    `tokenize_check`: a text and Rotary's ids for it: build.tokenize_agrees says whether llama.cpp's
    own tokenizer gives the same. Never raises for the peer's own failures: they come back as
    {"available": False, "why": ...}.
    """
    why = why_not_installed()
    gguf, why_no_gguf = gguf_for(model)
    if why or why_no_gguf:
        return unavailable(why or why_no_gguf)
    job = {
        "gguf": str(gguf), "threads": threads, "prefill_threads": prefill_threads, "steps": steps,
        "contexts": {str(n): cases for n, cases in contexts.items()},
        "edits": [{"before": before, "after": after} for before, after in edits],
    }
    if tokenize_check:
        job["tokenize_check"] = {"text": tokenize_check[0], "ids": tokenize_check[1]}
    try:
        out = run_job(job, timeout)
    except PeerError as exc:
        return unavailable(str(exc))
    results: dict = {"available": True}
    for length, run in sorted(out["decode"].items(), key=lambda kv: int(kv[0])):
        key = _key(int(length))
        results[f"decode_ms_per_token_{key}"] = run["ms_per_token"]
        results[f"decode_ms_per_token_{key}_by_threads"] = run["ms_per_token_by_threads"]
        results[f"prefill_tok_s_{key}"] = run["prefill_tok_s"]
        results[f"greedy_tokens_{key}"] = run["greedy_tokens"]
    if out.get("edit"):
        key = _key(edit_length)
        edit = out["edit"]
        results[f"edit_first_token_ms_{key}"] = edit["first_token_ms"]
        results[f"edit_first_token_ms_{key}_shift"] = edit["first_token_ms_shift"]
        results[f"edit_tokens_evaluated_{key}"] = edit["tokens_evaluated"]
        results[f"edit_tokens_evaluated_{key}_shift"] = edit["tokens_evaluated_shift"]
    results["build"] = {**out["build"], "gguf": str(gguf)}
    return results


def why_not_run(choice: str | None, model: str | None) -> str | None:
    """`--peer` (None: llama.cpp when it can run): None when the peer runs, else the reason it does not."""
    if choice == "none":
        return "not asked for (--peer none)"
    return why_not_installed() or gguf_for(model)[1]


def for_decode(args, tokenizer, contexts: dict[int, list[list[int]]], edit_cases: list, steps: int, threads: int, prefill_threads: int) -> dict:
    """results.peer of `rotary bench decode`: the peer on Rotary's decode contexts (token ids) and one-line
    edits (bench/edits.py's one_line_edits: the files before and after, tokenized by Rotary's tokenizer)."""
    why = why_not_run(args.peer, args.model)
    if why:
        return unavailable(why)
    print(f"decode: {PEER} on the same contexts and edits (bench/llamacpp/peer.mjs)", file=sys.stderr)
    edits = [(tokenizer.encode(c.before, add_special_tokens=False), tokenizer.encode(c.after, add_special_tokens=False)) for c in edit_cases]
    check = (edit_cases[0].before, edits[0][0]) if edit_cases else None
    lengths = {c.context_tokens for c in edit_cases} or {4096}
    return measure(args.model, contexts, steps, threads, prefill_threads, edits, max(lengths), check)


def summary_lines(own: dict, peer: dict) -> list[str]:
    """The printed comparison: own against the peer, each figure with the ratio own/peer."""
    if not peer.get("available"):
        return [f"{PEER}: not run: {peer.get('why')}"]
    lines = []
    for label, key, unit in (
        ("decode 1k", "decode_ms_per_token_1k", "ms"),
        ("decode 4k", "decode_ms_per_token_4k", "ms"),
        ("prefill 1k", "prefill_tok_s_1k", "tokens/s"),
        ("prefill 4k", "prefill_tok_s_4k", "tokens/s"),
        ("first token after a one-line edit, 4k", "edit_first_token_ms_4k", "ms"),
    ):
        if key in own and key in peer and peer[key]:
            lines.append(f"own vs {PEER} {label}: {own[key]:.1f} {unit} vs {peer[key]:.1f} {unit} (own/{PEER} {own[key] / peer[key]:.2f}x)")
    build = peer["build"]
    lines.append(
        f"{PEER}: node-llama-cpp {build['node-llama-cpp']} ({build['llama.cpp']}, {build['binary']} binary, gpu {build['gpu']}), "
        f"decode on {build['threads']} thread(s), prefill and edits on {build['prefill_threads']}"
    )
    return lines
