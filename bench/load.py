"""`rotary bench load`: N simulated editors typing at once against one shared worker.

For N = 1, 5 and 20, one real worker is started (`rotary worker --listen 127.0.0.1:PORT`, the
model given by --model or the embedded one), and N editors connect to it, each a real daemon
(`rotary lsp --worker ADDR`) driven over stdio by its own pygls LanguageClient, all in one asyncio
loop. Each editor opens a real Python file from the corpus with a stretch of its code cut out, and
types that stretch back at human speed: bursts of keystrokes about 0.12 s apart (about 5 keys a
second overall), a pause after each burst, a typo now and then that is backspaced at once, and the
editor's auto-indentation after a line break. Every keystroke is an incremental didChange; at the
start of each pause the editor asks textDocument/inlineCompletion, and its next keystroke waits for
the answer (the user reads the suggestion), so a slow service slows the typing rather than piling
requests up without end. The schedule comes from --seed. `--keystrokes K` types only the first K
keystrokes of each stretch (then asks once more): a smoke run of a few seconds per N, not a load.

Measured per N:
- completion latency, p50/p95/p99: from sending the inlineCompletion request to its answer, as the
  client sees it (the daemon's settings are its defaults: debounce 50 ms, mode auto, 64 tokens).
  The editors open their files one after another before the typing starts, each asking once (the
  worker encodes the whole file), timed apart as `open_ms`; then all type at once.
- lost_edits: after its session every editor compares what the daemon holds (`rotary.stats`:
  length and CRC-32 of its text, the worker's version, nothing pending) and what the worker holds
  (an EditDocument with no changes at that version, whose acknowledgement carries the worker's
  length and CRC-32) with the reference text the client built from its own keystrokes. An editor
  whose daemon or worker text differs counts all its edits as lost.
- peak_rss_mb: the worker's VmHWM (/proc), a fresh worker per N.
- restarts: the daemons' worker restarts (a busy worker must never be restarted), plus whether the
  worker process is still the one started.

Why asyncio and pygls's client, not locust: locust drives HTTP (or custom) request/response users
in gevent greenlets and reports per-request stats; our editors are LSP clients over stdio pipes to a
daemon process each, exchanging notifications (didOpen/didChange) and requests on one stream. The
pygls client is the one the end-to-end tests use, fits asyncio, and the percentiles are a few lines.
"""

from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .report import write_report
from .corpus import sample_files
from rotary.cache.pids import pid_alive

from .harness import Editor, check_texts, percentile, running_worker

SIZES = (1, 5, 20)
# The editors' daemons run at a lower priority than the worker: in a shared-worker deployment each
# daemon runs on its user's machine, and here twenty of them (pygls, asyncio, a gRPC channel each,
# ~5% of a core apiece while typing) would otherwise take CPU from the worker they measure. Their
# work is still in every latency: a request waits for its daemon as before.
EDITOR_NICENESS = 10


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


# -- what an editor types ---------------------------------------------------------------------------------


@dataclass
class Keystroke:
    delay_s: float  # wait before it
    kind: str  # "type" (insert text at the cursor) or "backspace" (delete the character before it)
    text: str = ""
    complete_after: bool = False  # a pause follows: ask for a completion


@dataclass
class Session:
    uri: str
    file: str
    initial: str  # the file with the stretch to type cut out
    cursor: int  # code-point offset where typing starts
    keys: list[Keystroke] = field(default_factory=list)


def make_session(path: Path, uri: str, rng: random.Random, keystrokes: int) -> Session | None:
    """Cut a stretch of code (about `keystrokes` characters, whole lines) out of the file at a line
    inside its first 120, and the keystrokes that type it back."""
    text = path.read_text(encoding="utf-8")
    if "\r" in text:
        return None  # positions here count \n only
    lines = text.split("\n")
    candidates = [i for i in range(10, min(len(lines) - 5, 120)) if lines[i].strip() and not lines[i - 1].rstrip().endswith("\\")]
    if not candidates:
        return None
    first = rng.choice(candidates)
    last, size = first, 0
    while last < len(lines) - 1 and size < keystrokes:
        size += len(lines[last].strip()) + 1
        last += 1
    start = sum(len(ln) + 1 for ln in lines[:first]) + (len(lines[first]) - len(lines[first].lstrip()))
    end = sum(len(ln) + 1 for ln in lines[:last])  # the start of line `last`
    stretch = text[start:end]
    if not stretch.strip():
        return None
    session = Session(uri=uri, file=str(path), initial=text[:start] + text[end:], cursor=start)
    # Keystrokes: one per character, except that a line break brings the next line's indentation with
    # it (the editor's auto-indent). Bursts of 8-30 keys about 0.12 s apart, then a 0.6-2 s pause.
    burst_left = rng.randint(8, 30)
    i = 0
    while i < len(stretch):
        ch = stretch[i]
        i += 1
        if ch == "\n":
            j = i
            while j < len(stretch) and stretch[j] in " \t":
                j += 1
            ch, i = stretch[i - 1 : j], j
        delay = max(0.03, rng.gauss(0.12, 0.04))
        if rng.random() < 0.03 and ch.isalpha():  # a typo, seen and backspaced at once
            session.keys.append(Keystroke(delay, "type", rng.choice("qxzjkv")))
            session.keys.append(Keystroke(max(0.05, rng.gauss(0.25, 0.08)), "backspace"))
            delay = max(0.03, rng.gauss(0.15, 0.05))
        session.keys.append(Keystroke(delay, "type", ch))
        burst_left -= 1
        if burst_left <= 0:
            session.keys[-1].complete_after = True
            burst_left = rng.randint(8, 30)
    session.keys[-1].complete_after = True  # the session ends with a completion: everything is flushed
    return session


def make_sessions(
    corpus: str | None, count: int, seed: int, keystrokes: int, tag: str, max_keys: int | None = None
) -> list[Session]:
    """`max_keys`: each session types only the first this many keystrokes of its stretch (and ends with a completion)."""
    rng = random.Random(seed)
    sessions: list[Session] = []
    for path in sample_files(corpus, count * 4, seed):
        session = make_session(path, f"{path.resolve().as_uri()}#{tag}-e{len(sessions)}", rng, keystrokes)
        if session is not None and max_keys is not None and len(session.keys) > max_keys:
            del session.keys[max_keys:]
            session.keys[-1].complete_after = True
        if session is not None:
            sessions.append(session)
        if len(sessions) == count:
            break
    return sessions


# -- one editor -------------------------------------------------------------------------------------------


@dataclass
class EditorResult:
    latencies_ms: list[float] = field(default_factory=list)
    shown: list[bool] = field(default_factory=list)  # per completion: a suggestion came back (else nothing: abstained, or none)
    open_ms: float | None = None
    suggestions: int = 0
    edits: int = 0
    lost_edits: int = 0
    daemon_ok: bool = False
    worker_ok: bool = False
    why: str = ""
    restarts: int = 0
    drift_detected: int = 0
    documents_resent: int = 0
    worker_unavailable: int = 0
    errors: int = 0


async def open_file(editor: Editor, session: Session) -> float:
    """The editor opens its file and asks once: the worker encodes the file (timed as `open_ms`)."""
    editor.open(session.uri, session.initial)
    ms, _ = await editor.complete(session.uri, session.initial, session.cursor)
    return ms


async def run_editor(
    editor: Editor, session: Session, worker_stub, max_completions: int, deadline: float, rng: random.Random,
    open_ms: float | None = None,
) -> EditorResult:
    out = EditorResult(open_ms=open_ms)
    text, cursor = session.initial, session.cursor
    completions = 0
    for key in session.keys:
        await asyncio.sleep(key.delay_s)
        if key.kind == "type":
            text = editor.change(session.uri, text, cursor, cursor, key.text)
            cursor += len(key.text)
        else:
            text = editor.change(session.uri, text, cursor - 1, cursor, "")
            cursor -= 1
        out.edits += 1
        stop = completions + 1 >= max_completions or time.monotonic() > deadline
        if key.complete_after or stop:
            ms, suggestion = await editor.complete(session.uri, text, cursor)
            out.latencies_ms.append(ms)
            out.shown.append(suggestion is not None)
            out.suggestions += suggestion is not None
            completions += 1
            if stop:
                break
            await asyncio.sleep(rng.uniform(0.6, 2.0))  # the pause (it begins when the suggestion shows)
    check = await check_texts(editor, session.uri, text, worker_stub)
    out.daemon_ok, out.worker_ok, out.why = check["daemon_ok"], check["worker_ok"], check["why"].strip()
    if not (out.daemon_ok and out.worker_ok):
        out.lost_edits = out.edits  # which of them is unknown: all are counted
    stats = await editor.stats()
    out.restarts = stats["worker"]["restarts"]
    daemon = stats["daemon"]
    out.drift_detected, out.documents_resent = daemon["drift_detected"], daemon["documents_resent"]
    out.worker_unavailable, out.errors = daemon["worker_unavailable"], daemon["errors"]
    editor.close(session.uri)
    return out


# -- one N ------------------------------------------------------------------------------------------------


async def run_size(
    n: int, sessions: list[Session], address: str, worker_pid: int, max_completions: int, seconds: float, seed: int,
    settings: dict | None = None,
) -> dict:
    import grpc

    from rotary.completion.rpc import worker_pb2_grpc as pb_grpc

    editors = [Editor(f"e{i}", ["--worker", address], settings=settings, niceness=EDITOR_NICENESS) for i in range(n)]
    channel = grpc.aio.insecure_channel(address)
    stub = pb_grpc.WorkerStub(channel)
    try:
        await asyncio.gather(*(e.start() for e in editors))
        await asyncio.gather(*(e.wait_ready() for e in editors))
        # The files are opened one after another before the typing starts (users open files at
        # different times; 20 whole-file encodes at the same instant would measure that, not typing).
        opens = [await open_file(e, s) for e, s in zip(editors, sessions)]
        at_start = await worker_side(stub)
        started = time.monotonic()
        deadline = started + seconds
        results = await asyncio.gather(
            *(
                run_editor(e, s, stub, max_completions, deadline, random.Random(seed * 1000 + i), opens[i])
                for i, (e, s) in enumerate(zip(editors, sessions))
            )
        )
        wall = time.monotonic() - started
        worker_view = await worker_side(stub, at_start)
    finally:
        await asyncio.gather(*(e.stop() for e in editors))
        await channel.close()
    latencies = [ms for r in results for ms in r.latencies_ms]
    with_suggestion = [ms for r in results for ms, shown in zip(r.latencies_ms, r.shown) if shown]
    without = [ms for r in results for ms, shown in zip(r.latencies_ms, r.shown) if not shown]
    opens = [r.open_ms for r in results if r.open_ms is not None]
    alive = pid_alive(worker_pid)
    edits = sum(r.edits for r in results)
    return {
        "editors": n,
        "completions": len(latencies),
        "p50_ms": _round(percentile(latencies, 0.5)),
        "p95_ms": _round(percentile(latencies, 0.95)),
        "p99_ms": _round(percentile(latencies, 0.99)),
        "mean_ms": _round(statistics.fmean(latencies) if latencies else None),
        # split by answer: a suggestion shown, or nothing (mostly abstained: the gate found it likely wrong)
        "p95_ms_with_suggestion": _round(percentile(with_suggestion, 0.95)),
        "p95_ms_without": _round(percentile(without, 0.95)),
        "open_ms_p50": _round(percentile(opens, 0.5)),
        "suggestions": sum(r.suggestions for r in results),
        "edits_sent": edits,
        "edits_applied": edits - sum(r.lost_edits for r in results),
        "lost_edits": sum(r.lost_edits for r in results),
        "texts_checked": len(results),
        "texts_differing": [r.why for r in results if not (r.daemon_ok and r.worker_ok)],
        "keystrokes_per_s": round(edits / wall / n, 2) if wall else None,
        "seconds": round(wall, 1),
        "restarts": sum(r.restarts for r in results) + (0 if alive else 1),
        "worker_alive": alive,
        "drift_detected": sum(r.drift_detected for r in results),
        "documents_resent": sum(r.documents_resent for r in results),
        "worker_unavailable": sum(r.worker_unavailable for r in results),
        "errors": sum(r.errors for r in results),
        "worker": worker_view,
    }


async def worker_side(stub, before: dict | None = None) -> dict:
    """The worker's own view of the run: its latency (request to last chunk, without the daemon and the
    LSP hop; over its last 1,000 completions, the opening ones included) and how its model thread
    spent the run: counters are the change since `before` (taken when the typing starts), so the
    opening encodes are not in them."""
    import json

    from rotary.completion.rpc import worker_pb2 as pb

    stats = json.loads((await stub.Stats(pb.StatsRequest(), timeout=30)).json)
    thread = stats.get("model_thread", {})
    view = {
        "latency_ms_p50": stats.get("latency_ms_p50"),
        "latency_ms_p95": stats.get("latency_ms_p95"),
        "completions": stats.get("completions"),
        "completions_abstained": stats.get("completions_abstained"),
        "tokens_generated": stats.get("tokens_generated"),
        "forwards": stats.get("forwards"),
        "tokens_encoded": stats.get("tokens_encoded"),
        "stale_refreshed": stats.get("stale_refreshed"),
        "decode_rounds": thread.get("decode_rounds"),
        "batched_rows": thread.get("batched_rows"),
        "rounds": thread.get("rounds"),
        "prefill_steps": thread.get("prefill_steps"),
        "deferred_batches": thread.get("deferred_batches"),
        "deferred_jobs": thread.get("deferred_jobs"),
        "deferred_in_decode": thread.get("deferred_in_decode"),
        "prefill_s": thread.get("prefill_s"),
        "decode_s": thread.get("decode_s"),
        "decode_tokens_fed": thread.get("decode_tokens_fed"),
    }
    if before is not None:
        for key, value in view.items():
            if not key.startswith("latency") and isinstance(value, (int, float)) and isinstance(before.get(key), (int, float)):
                view[key] = round(value - before[key], 2)
    view["mean_batch"] = round(view["batched_rows"] / view["decode_rounds"], 2) if view["batched_rows"] and view["decode_rounds"] else None
    return view


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


def main(args) -> int:
    keystrokes = 90 if args.quick else 300  # characters typed per editor (about 20 s or 60 s of typing)
    seconds = 45.0 if args.quick else 120.0  # a bound on each N's typing time (slow answers slow typing)
    max_keys = getattr(args, "keystrokes", None)  # only the first K keystrokes of each stretch (a smoke run)
    if max_keys is not None and max_keys < 1:
        raise SystemExit(f"--keystrokes must be at least 1, not {max_keys}")
    max_completions = args.limit or 10_000
    wanted = [int(n) for n in args.sizes.split(",")] if getattr(args, "sizes", None) else list(SIZES)
    sizes = [(n, min(n, args.limit) if args.limit else n) for n in wanted]
    results = {}
    mode = getattr(args, "decoding_mode", None)
    settings = {"decodingMode": mode} if mode else None  # the daemons' initializationOptions
    load_avg = os.getloadavg()
    print(f"load: N = {[n for n, _ in sizes]} editors (seed {args.seed}, {'quick' if args.quick else 'full'}); load average {load_avg}", file=sys.stderr)
    for n, count in sizes:
        sessions = make_sessions(args.corpus, count, args.seed + n, keystrokes, f"load-n{n}-{os.getpid()}", max_keys)
        if len(sessions) < count:
            raise SystemExit(f"only {len(sessions)} usable files in the corpus for {count} editors")
        with running_worker(args.model) as (worker, address):
            result = asyncio.run(run_size(count, sessions, address, worker.pid, max_completions, seconds, args.seed, settings))
            result["peak_rss_mb"] = peak_rss_mb(worker.pid)
        results[f"n={n}"] = result
        print(
            f"  n={n}: {result['completions']} completions, p50 {result['p50_ms']} p95 {result['p95_ms']} p99 {result['p99_ms']} ms, "
            f"lost edits {result['lost_edits']}/{result['edits_sent']}, worker peak RSS {result['peak_rss_mb']} MB, "
            f"restarts {result['restarts']}; worker p50/p95 {result['worker']['latency_ms_p50']}/{result['worker']['latency_ms_p95']} ms, "
            f"mean batch {result['worker']['mean_batch']}; model thread: prefill {result['worker']['prefill_s']} s "
            f"in {result['worker']['prefill_steps']} steps, decode {result['worker']['decode_s']} s in {result['worker']['decode_rounds']} rounds",
            file=sys.stderr,
        )
    p95_1, p95_20 = (results.get(k, {}).get("p95_ms") for k in ("n=1", "n=20"))
    report = {
        "benchmark": "load",
        "config": {
            "sizes": [n for n, _ in sizes],
            "editors": {f"n={n}": count for n, count in sizes},
            "seed": args.seed,
            "corpus": args.corpus or "stdlib",
            "model": args.model or "embedded SmolLM2-135M",
            "keystrokes_per_editor": keystrokes,
            "max_keystrokes_per_editor": max_keys,  # --keystrokes: only the first K of them typed
            "max_seconds_per_n": seconds,
            "max_completions_per_editor": args.limit,
            "daemon_settings": "defaults (debounceMs 50, completionMode auto, maxTokens 64, decodingMode lossless)"
            + (f", but decodingMode {mode}" if mode else ""),
            "client": "asyncio + pygls LanguageClient over stdio, one `rotary lsp --worker` per editor",
            "cpu_count": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in load_avg],
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "quick": bool(args.quick),
        },
        "results": results,
        "p95_ratio_n20_n1": round(p95_20 / p95_1, 2) if p95_1 and p95_20 else None,
    }
    print(f"\n{'N':>4}{'compl.':>8}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'lost':>6}{'RSS MB':>8}{'restarts':>9}")
    for n, _ in sizes:
        r = results[f"n={n}"]
        print(f"{n:>4}{r['completions']:>8}{r['p50_ms']!s:>9}{r['p95_ms']!s:>9}{r['p99_ms']!s:>9}{r['lost_edits']:>6}{r['peak_rss_mb']!s:>8}{r['restarts']:>9}")
    print(f"p95 at N=20 / p95 at N=1: {report['p95_ratio_n20_n1']} (goal <= 4)")
    write_report(args.json, report)
    lost = sum(r["lost_edits"] for r in results.values())
    return 1 if lost else 0
