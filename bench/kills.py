"""`rotary soak kills`: SIGKILL the daemon's worker mid-completion, again and again.

A real daemon (`rotary lsp`, driven over stdio by pygls's client) starts its own worker, as
editors run it. A document (the start of a real Python file from the standard library) is open and
typed into at its end. Each round:

1. type a few characters of the file's real code (incremental didChange);
2. ask textDocument/inlineCompletion (multi-line, up to 48 tokens) and SIGKILL the worker after
   a random delay (seeded; --kill-delay), while the request is in flight; the answer is no suggestion;
3. type a few more characters while the worker is down or loading;
4. wait until the daemon reports a new worker process ready (its own restart; the kill-to-ready
   time is the recovery time);
5. ask for a completion again and compare it with what a fresh worker gives for the same text: the
   same engine in this process (fresh document, no cache, the worker's settings), computed on the
   reference text the client built from its own keystrokes;
6. compare the daemon's copy of the document (`rotary.stats`: length and CRC-32) with that text.

A round is recovered when a new worker came up, its completion equals the fresh one and the
document is intact. The daemon checks every acknowledgement of the worker (length and CRC-32), so
the completion being right on the reference text also shows the worker's copy is right.

The daemon runs with its own worker only: an external worker (`--worker`) is not the daemon's to
restart, so a kill there tests the operator's process manager, not Rotary.
"""

from __future__ import annotations

import asyncio
import faulthandler
import json
import os
import random
import signal
import statistics
import sys
import time

from .corpus import sample_files
from .harness import Editor, crc32

MAX_TOKENS = 48
ANSWER_TIMEOUT_S = 120.0  # the daemon's own deadline for a completion is 60 s
ROUND_STACK_DUMP_S = 300  # a round takes ~10-30 s: past this, dump stacks (see _soak)
SETTINGS = {"completionMode": "multiLine", "maxTokens": MAX_TOKENS, "debounceMs": 0, "abstainThreshold": 0}


def _reference_engine(model: str | None):
    """A fresh worker's computation, in this process: the worker's engine and settings."""
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine, CompletionOptions
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner, configure_threads

    configure_threads()
    engine = CompletionEngine(ModelRunner(load_model(model)), KVStore(), 2048, 1024)
    engine.warm_up()
    options = CompletionOptions(max_tokens=MAX_TOKENS, mode="multi_line", abstain_threshold=0.0, refresh_window=128)
    count = iter(range(10**9))

    def complete(text: str, offset: int) -> str:
        uri = f"soak-kills-reference-{next(count)}"
        try:
            return "".join(c.text for c in engine.complete(uri, text, offset, options))
        finally:
            engine.kv_store.drop(uri)

    return complete


def _document(seed: int) -> tuple[str, str, str]:
    """(the file's URI, the opened text, the real code typed after it): a stdlib file cut after its 40th line."""
    rng = random.Random(seed)
    for path in sample_files(None, 50, seed):
        text = path.read_text(encoding="utf-8")
        if "\r" in text:
            continue
        lines = text.split("\n")
        if len(lines) < 400:
            continue
        cut = sum(len(ln) + 1 for ln in lines[: rng.randint(30, 60)])
        return path.resolve().as_uri(), text[:cut], text[cut:]
    raise SystemExit("no stdlib file of 400 lines found")


def kill_delay_range(text: str) -> tuple[float, float]:
    """--kill-delay MIN,MAX (seconds)."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise SystemExit(f"--kill-delay takes MIN,MAX in seconds, e.g. 0.05,0.6, not {text!r}") from None
    if not 0 <= low <= high:
        raise SystemExit(f"--kill-delay: need 0 <= MIN <= MAX, not {text!r}")
    return low, high


async def _soak(args, kill_delay: tuple[float, float]) -> dict:
    kills = args.kills
    rng = random.Random(args.seed)
    reference_complete = _reference_engine(args.model)
    file_uri, text, rest = _document(args.seed)
    uri = f"{file_uri}#soak-kills-{os.getpid()}"
    editor = Editor("soak", ["--model", args.model] if args.model else [], SETTINGS)
    await editor.start()
    rounds: list[dict] = []
    started = time.monotonic()
    try:
        stats = await editor.wait_ready(timeout=600)
        pid = stats["worker"]["pid"]
        editor.open(uri, text)
        await editor.complete(uri, text, len(text))  # the worker encodes the document

        def type_some(text: str, rest: str) -> tuple[str, str]:
            n = rng.randint(1, 6)
            for ch in rest[:n]:
                text = editor.change(uri, text, len(text), len(text), ch)
            return text, rest[n:]

        for i in range(kills):
            if args.max_seconds and time.monotonic() - started > args.max_seconds:
                print(f"  stopping after {i} kills: --max-seconds {args.max_seconds} reached", file=sys.stderr)
                break
            if len(rest) < 20:  # the file is used up: start over from its opening
                editor.close(uri)
                uri = f"{file_uri}#soak-kills-{os.getpid()}-{i}"
                file_uri, text, rest = _document(args.seed + i + 1)
                editor.open(uri, text)
            # A round that hangs prints every thread's stack to stderr after this long; the round itself is
            # bounded by the timeouts below. (Two runs hung, after 2 and after 79 kills: the daemon's stderr,
            # a pipe nobody read, had filled and its next log line blocked it. The Editor reads it now.)
            faulthandler.dump_traceback_later(ROUND_STACK_DUMP_S, exit=False)
            text, rest = type_some(text, rest)
            request = asyncio.ensure_future(editor.complete(uri, text, len(text)))
            await asyncio.sleep(rng.uniform(*kill_delay))
            in_flight = not request.done()
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            try:  # a lost answer fails the round instead of hanging the soak
                _ms, killed_answer = await asyncio.wait_for(request, timeout=ANSWER_TIMEOUT_S)
            except asyncio.TimeoutError:
                killed_answer = "NO ANSWER"
            text, rest = type_some(text, rest)  # typed while the worker is gone
            try:
                ready = await editor.wait_ready(
                    timeout=300, ok=lambda s: s["worker"]["state"] == "ready" and s["worker"].get("pid") not in (None, pid)
                )
            except (RuntimeError, asyncio.TimeoutError) as exc:  # the daemon never came back: the run ends here
                rounds.append({
                    "kill": i + 1, "mid_completion": in_flight, "answer_of_killed_request": killed_answer,
                    "recovery_s": None, "first_answer_s": None, "suggestion": None, "expected": None,
                    "right": False, "document_intact": False, "worker_state": f"no new worker: {exc!r}",
                    "daemon_log_tail": list(editor.stderr_tail)[-20:],
                })
                print(f"  kill {i + 1}: NO NEW WORKER ({exc!r}): FAILED; the soak stops", file=sys.stderr)
                break
            recovery_s = time.monotonic() - killed_at
            new_pid = ready["worker"]["pid"]
            try:
                _ms, suggestion = await asyncio.wait_for(editor.complete(uri, text, len(text)), timeout=ANSWER_TIMEOUT_S)
            except asyncio.TimeoutError:
                suggestion = "NO ANSWER"
            first_answer_s = time.monotonic() - killed_at
            expected = reference_complete(text, len(text))
            stats = await editor.stats()
            doc = stats["daemon"]["documents"].get(uri)
            intact = doc is not None and doc["length"] == len(text) and doc["crc32"] == crc32(text)
            right = suggestion != "NO ANSWER" and (suggestion or "") == expected
            rounds.append(
                {
                    "kill": i + 1,
                    "mid_completion": in_flight,
                    "answer_of_killed_request": killed_answer,
                    "recovery_s": round(recovery_s, 2),
                    "first_answer_s": round(first_answer_s, 2),
                    "suggestion": suggestion,
                    "expected": expected,
                    "right": right,
                    "document_intact": intact,
                    "worker_state": stats["worker"]["state"],
                }
            )
            status = "ok" if right and intact else "FAILED"
            print(
                f"  kill {i + 1}: {'mid-completion' if in_flight else 'after the answer'}, ready again in {recovery_s:.1f} s, "
                f"completion {'equal' if right else 'DIFFERENT'} ({len(expected)} chars), document {'intact' if intact else 'LOST'}: {status}",
                file=sys.stderr,
            )
            pid = new_pid
        faulthandler.cancel_dump_traceback_later()  # each round's call replaced the previous round's timer
        try:
            final = await editor.stats()
        except asyncio.TimeoutError:  # a daemon that stopped answering: reported with the rounds so far
            final = {"worker": {"restarts": None, "state": "no answer"}, "daemon": {"documents_resent": None, "drift_detected": None}}
    finally:
        await editor.stop()
    recovered = [r for r in rounds if r["right"] and r["document_intact"]]
    recoveries = [r["recovery_s"] for r in rounds if r["recovery_s"] is not None]
    first_answers = [r["first_answer_s"] for r in rounds if r["first_answer_s"] is not None]
    return {
        "kills": len(rounds),
        "kills_asked": kills,
        "mid_completion": sum(r["mid_completion"] for r in rounds),
        "recovered": len(recovered),
        "lost_documents": sum(not r["document_intact"] for r in rounds),
        "wrong_completions": sum(not r["right"] for r in rounds),
        "nonempty_expected": sum(bool(r["expected"]) for r in rounds),
        "mean_recovery_s": round(statistics.fmean(recoveries), 2) if recoveries else None,
        "max_recovery_s": max(recoveries, default=None),
        "mean_first_answer_s": round(statistics.fmean(first_answers), 2) if first_answers else None,
        "daemon_restarts": final["worker"]["restarts"],
        "daemon_worker_state": final["worker"]["state"],
        "documents_resent": final["daemon"]["documents_resent"],
        "drift_detected": final["daemon"]["drift_detected"],
        "seconds": round(time.monotonic() - started, 1),
        "seed": args.seed,
        "model": args.model or "embedded SmolLM2-135M",
        "settings": SETTINGS,
        "kill_delay_s": list(kill_delay),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "failures": [r for r in rounds if not (r["right"] and r["document_intact"])][:10],
    }


def main(args) -> int:
    kill_delay = kill_delay_range(args.kill_delay)  # a bad range is refused before anything starts
    report = asyncio.run(_soak(args, kill_delay))
    summary = {k: v for k, v in report.items() if k != "failures"}
    print(json.dumps(summary, indent=2))
    if report["failures"]:
        print("failures:", json.dumps(report["failures"], indent=2))
    if args.json:
        from .report import write_report

        write_report(args.json, {"soak": "kills", **report})
    return 0 if report["kills"] and report["recovered"] == report["kills"] else 1
