"""The model worker's servicer: the gRPC methods over documents, caches and the completion engine.

The model loads in a background thread so Health answers at once (with the
load progress in its message); Complete answers UNAVAILABLE until it is ready.
Typed document errors map to status codes the daemon acts on (convert.py, which also turns
requests into the engine's options and answers into replies). CompleteText serves tools that
have a text but no document. The server around the servicer (its call limits, the standard
health and reflection services, `serve`) is server.py.

Several daemons may share a worker, each a session (its `rotary-session` metadata; none: the
session ""). What a session keeps is its own: documents, KV caches and their snapshots, CompleteText
cache keys, n-gram sources and speculation statistics, a share of the document bounds, and a lease.
No session's text reaches another's answers, guesses or stats (docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time

import grpc

from .convert import STATUS_OF_ERROR, completion_chunk, document_options, test_message, text_options
from .counters import WorkerCounters
from .documents import Change, DocumentStore, check_change_count, key_session, store_key
from .rpc import worker_pb2 as pb
from .rpc import worker_pb2_grpc as pb_grpc
from .rpc.access import SESSION_METADATA
from .rpc.wire import text_crc32
from .streams import StreamLimit, max_streams_setting
from .text_request import InvalidArgument, cache_uri, check_complete_text

log = logging.getLogger(__name__)

# A daemon calls Health every 2 s while its worker is ready: a session silent this long has gone
# away (exited, killed, lost its connection), and its documents are dropped. A daemon that comes
# back finds its documents gone (NOT_FOUND) and resends them. The session "" (clients that name
# none, `rotary complete`) has the same lease.
SESSION_LEASE_S = 120.0


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(
        self,
        model_path: str | None = None,
        cache_budget_mb: int = 1024,
        max_context_tokens: int = 2048,
        refresh_window: int = 128,
        stale_budget: int = 1024,
        session_lease_s: float = SESSION_LEASE_S,
        max_streams: int | None = None,
    ):
        self.model_path = model_path
        self.streams = StreamLimit(max_streams or max_streams_setting())
        self.session_lease_s = session_lease_s
        self._session_seen: dict[str, float] = {}  # session -> when it last called (monotonic)
        self.refresh_window = refresh_window
        self.stale_budget = stale_budget
        self.cache_budget_mb = cache_budget_mb
        self.max_context_tokens = max_context_tokens
        self.documents = DocumentStore()
        self.engine = None
        self.model_info = None
        self.load_error: str | None = None
        self.load_message = "loading model"
        self.ready = threading.Event()
        self.started = time.time()
        self.counters = WorkerCounters()

    # -- model loading -----------------------------------------------------

    def flush_snapshots(self) -> None:
        """Shutdown: every changed cache copied on the model thread, then written by the store's writer."""
        if self.engine is not None:
            self.engine.flush_snapshots()

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self._load, name="rotary-model-load", daemon=True)
        thread.start()
        return thread

    def _load(self) -> None:
        try:
            from rotary.cache.store import KVStore
            from rotary.models.loader import kv_dir, load_model
            from rotary.models.runner import ModelRunner, configure_threads

            from .engine import CompletionEngine

            configure_threads()

            def progress(msg: str) -> None:
                self.load_message = msg
                log.info("%s", msg)

            loaded = load_model(self.model_path, progress=progress)
            runner = ModelRunner(loaded)
            info = runner.info  # its identity names the precision too (KV snapshots of one never load in another)
            store = KVStore(
                self.cache_budget_mb << 20,
                spill_dir=kv_dir() / info.identity,
                identity=info.identity,
                dtype=info.dtype,
                layout=(info.num_layers, info.num_kv_heads, info.head_dim),
                device=runner.device,
                owner=key_session,  # over the budget, the session holding the most gives up a cache first
            )
            engine = CompletionEngine(runner, store, self.max_context_tokens, self.stale_budget)
            progress("warming up")
            engine.warm_up()  # the first forward pays one-off setup; keep it out of the first keystroke
            self.engine = engine
            if not self.engine.edit_aware_supported:
                log.warning("edit-aware cache is off for this model (RoPE %s); prefix reuse instead", info.rope.rope_type)
            self.model_info = info
            self.load_message = f"ready: {loaded.info.name}"
            self.ready.set()
        except Exception as exc:  # any load failure is reported through Health, never crashes the server
            self.load_error = str(exc)
            self.load_message = f"model failed to load: {exc}"
            log.error("%s", self.load_message)

    # -- documents ---------------------------------------------------------

    def OpenDocument(self, request, context):
        # A reopened document keeps its KV cache: the next completion diffs token ids against it.
        session = self._session(context)
        doc = self._guard(context, self.documents.open, request.uri, request.version, request.language_id, request.text, session)
        return pb.DocumentAck(uri=doc.uri, version=doc.version, length=len(doc.text), crc32=text_crc32(doc.text))

    def EditDocument(self, request, context):
        try:
            check_change_count(request.uri, len(request.changes))  # before a million objects are built
            changes = [Change(c.start, c.end, c.text) for c in request.changes]
            doc = self.documents.edit(request.uri, request.base_version, request.new_version, changes, self._session(context))
        except tuple(STATUS_OF_ERROR) as exc:
            self.counters.count("edits_rejected")
            context.abort(STATUS_OF_ERROR[type(exc)], str(exc))
        self.counters.count("edits")
        return pb.DocumentAck(uri=doc.uri, version=doc.version, length=len(doc.text), crc32=text_crc32(doc.text))

    def CloseDocument(self, request, context):
        # The session's own cache of the document goes with it, snapshot included.
        session = self._session(context)
        self._guard(context, self.documents.close, request.uri, session)
        if self.engine is not None:
            self.engine.kv_store.drop(store_key(session, request.uri))
        return pb.DocumentAck(uri=request.uri)

    # -- sessions (one per daemon) ---------------------------------------------

    def _session(self, context) -> str:
        """The caller's session ("" when it names none), and a note that it is alive."""
        session = dict(context.invocation_metadata() or ()).get(SESSION_METADATA, "")
        self._session_seen[session] = time.monotonic()
        return session

    def expire_sessions(self, now: float | None = None) -> list[str]:
        """Drop the documents of sessions silent for longer than the lease; the sessions dropped.

        Their caches leave memory (their snapshots stay on disk for a reopen), and what the session's
        n-gram drafters learnt goes too."""
        now = time.monotonic() if now is None else now
        expired = [s for s, seen in list(self._session_seen.items()) if now - seen > self.session_lease_s]
        for session in expired:
            self._session_seen.pop(session, None)
            open_before = self.documents.sessions().get(session, 0)
            self.documents.close_session(session)
            if self.engine is not None:
                for key, _ in self.engine.kv_store.items():  # its documents' and its CompleteText keys' caches
                    if key_session(key) == session:
                        self.engine.kv_store.forget(key)
                self.engine.forget_session(session)
            self.counters.add(sessions_expired=1, documents_expired=open_before)
            log.info("session %s silent for over %.0f s: %d documents dropped", session[:8], self.session_lease_s, open_before)
        return expired

    # -- completion --------------------------------------------------------

    def Complete(self, request, context):
        if not self.ready.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, self.load_message)
        session = self._session(context)
        doc = self._guard(context, self.documents.get, request.uri, request.version, session)
        if not 0 <= request.offset <= len(doc.text):
            context.abort(
                grpc.StatusCode.OUT_OF_RANGE,
                f"{request.uri}: offset {request.offset} is outside the text of {len(doc.text)} characters",
            )
        options = document_options(request.options, self.refresh_window)
        yield from self._relay(
            context, f"rotary-complete-{request.request_id}", "completion failed",
            lambda cancelled, out: self._run_completion(store_key(session, doc.uri), doc.text, session, request, options, cancelled, out),
        )

    @staticmethod
    def _relay(context, thread_name: str, failure: str, work):
        """Run `work(cancelled, out)` on its own thread and yield what it puts on `out` until None.

        The work holds the model only on that thread: if the caller cancels or stops reading, the
        loop still ends at its next cancel check and frees the model. An exception put on `out`
        ends the call with INTERNAL.
        """
        cancelled = threading.Event()
        context.add_callback(cancelled.set)  # fires when the caller cancels or the call ends
        out: queue.Queue = queue.Queue()
        threading.Thread(target=work, args=(cancelled, out), name=thread_name, daemon=True).start()
        while (item := out.get()) is not None:
            if isinstance(item, Exception):
                context.abort(grpc.StatusCode.INTERNAL, f"{failure}: {item}")
            yield item

    def _run_completion(self, key, text, session, request, options, cancelled: threading.Event, chunks: queue.Queue) -> None:
        """`key`: the KV store key of the session's cache (None: keep none)."""
        try:
            for chunk in self.engine.complete(key, text, request.offset, options, cancelled.is_set, session=session):
                if chunk.done:
                    self.counters.record(chunk)
                chunks.put(completion_chunk(request.request_id, chunk))
        except Exception as exc:  # logged here, reported to the caller as INTERNAL
            self.counters.count("completions_failed")
            log.exception("completion %s failed", request.request_id)
            chunks.put(exc)
        finally:
            chunks.put(None)

    def CompleteText(self, request, context):
        """Complete with no document: the text comes in the request (limits in worker.proto)."""
        from .engine import MAX_TOKENS_LIMIT

        try:
            check_complete_text(request, MAX_TOKENS_LIMIT)
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self.ready.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, self.load_message)
        options = text_options(request, self.refresh_window)
        # The caller's keys are its session's own: another session's same key is another cache.
        session = self._session(context)
        key = store_key(session, cache_uri(request.cache_key)) if request.cache_key else None
        yield from self._relay(
            context, f"rotary-complete-text-{request.request_id}", "completion failed",
            lambda cancelled, out: self._run_completion(key, request.text, session, request, options, cancelled, out),
        )

    # -- unit-test generation ----------------------------------------------

    def GenerateTests(self, request, context):
        """Tests for one function, streamed as each is finished (limits in worker.proto)."""
        from rotary.testgen.focal import FocalNotFound, find_focal
        from rotary.testgen.generate import check_request
        from rotary.testgen.languages import TestGenError, UnsupportedLanguage

        try:
            check_request(request)
            focal = find_focal(request.path, request.text, request.qualname, request.language_id)
        except FocalNotFound as exc:
            context.abort(grpc.StatusCode.NOT_FOUND, str(exc))
        except (TestGenError, UnsupportedLanguage) as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self.ready.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, self.load_message)
        yield from self._relay(
            context, f"rotary-tests-{request.request_id}", "test generation failed",
            lambda cancelled, out: self._run_test_generation(focal, request, cancelled, out),
        )

    def _run_test_generation(self, focal, request, cancelled: threading.Event, replies: queue.Queue) -> None:
        from rotary.testgen.generate import generate_tests
        from rotary.testgen.layout import file_text, layout

        from .rpc.wire import DEFAULT_TEST_DRAFTER, DEFAULT_TEST_TOKENS, DEFAULT_TESTS

        count = request.count or DEFAULT_TESTS
        rid = request.request_id
        try:
            replies.put(pb.GenerateTestsReply(
                request_id=rid, total_tests=count, message=f"generating {count} tests for {focal.display}",
                language=focal.language, focal=focal.qualname,
            ))
            tests = []
            for test in generate_tests(
                self.engine, focal, count=count, max_tokens=request.max_tokens or DEFAULT_TEST_TOKENS,
                drafter=request.drafter or DEFAULT_TEST_DRAFTER, temperature=request.temperature, top_p=request.top_p or 1.0,
                seed=request.seed, is_cancelled=cancelled.is_set,
            ):
                tests.append(test)
                self.counters.count("tests_generated")
                replies.put(pb.GenerateTestsReply(
                    request_id=rid, done_tests=len(tests), total_tests=count,
                    message=f"test {len(tests)} of {count}: {test.name}", test=test_message(test, request.explain),
                    language=focal.language, focal=focal.qualname,
                ))
            lay = layout(focal)
            replies.put(pb.GenerateTestsReply(
                request_id=rid, done_tests=len(tests), total_tests=count, done=True,
                message="cancelled" if cancelled.is_set() else f"{len(tests)} tests for {focal.display}",
                file_text=file_text(focal, lay, tests), file_name=lay.file_name,
                language=focal.language, focal=focal.qualname,
            ))
        except Exception as exc:  # logged here, reported to the caller as INTERNAL
            log.exception("test generation %s failed", rid)
            replies.put(exc)
        finally:
            replies.put(None)

    # -- health and stats --------------------------------------------------

    def Health(self, request, context):
        self._session(context)  # the daemon's polling keeps its session alive
        info = self.model_info
        return pb.HealthReply(
            ready=self.ready.is_set(),
            model=info.name if info else "",
            model_path=info.path if info else (self.model_path or ""),
            device=str(self.engine.runner.device) if self.engine else "",
            open_documents=len(self.documents),
            message=self.load_message,
            queue_depth=self.engine.scheduler.queue_depth if self.engine else 0,
            busy_seconds=self.engine.scheduler.busy_for() if self.engine else 0.0,
        )

    def Stats(self, request, context):
        return pb.StatsReply(json=json.dumps(self.stats(self._session(context))))

    def stats(self, session: str = "") -> dict:
        """The worker's counters; `session`: whose speculation statistics to show (its own alone)."""
        counters, latencies = self.counters.snapshot()
        out = {
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "ready": self.ready.is_set(),
            "model": self.model_info.as_dict() if self.model_info else None,
            "open_documents": len(self.documents),
            "document_chars": self.documents.total_chars,
            "sessions": len(self.documents.sessions()),
            "session_lease_s": self.session_lease_s,
            **self.streams.stats(),
            **counters,
        }
        if latencies:
            out["latency_ms_p50"] = round(latencies[len(latencies) // 2], 1)
            out["latency_ms_p95"] = round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))], 1)
        if self.engine is not None:
            store = self.engine.kv_store
            out["cache"] = {
                "edit_aware": self.engine.edit_aware_supported,
                "mode_note": None if self.engine.edit_aware_supported else "RoPE does not compose: prefix reuse with recompute",
                "documents": len(store),
                "bytes": store.total_bytes(),
                "budget_bytes": store.budget_bytes,
                "stale_tokens": store.stale_tokens(),
                "background_refreshed": self.engine.kv_manager.background_refreshed,
                "refresh_window": self.refresh_window,
                **store.counters,
            }
            scheduler = self.engine.scheduler
            out["model_thread"] = {
                "forward": self.engine.runner.path,  # "own" (Rotary's forward) or "hf" (transformers fallback)
                "precision": self.engine.runner.precision,  # exact, fp16 or int4 (models/precision.py)
                "precision_reason": self.engine.runner.precision_reason,  # "asked for", or what auto measured
                "queue_depth": scheduler.queue_depth,
                "rounds": scheduler.rounds,
                "decode_rounds": scheduler.decode_rounds,
                "mean_batch": round(scheduler.batched_rows / scheduler.decode_rounds, 2) if scheduler.decode_rounds else None,
                "batched_rows": scheduler.batched_rows,
                "prefill_steps": scheduler.prefill_steps,
                "deferred_batches": scheduler.deferred_batches,  # deferred forwards run in forwards of their own
                "deferred_jobs": scheduler.deferred_jobs,
                "deferred_in_decode": scheduler.deferred_in_decode,  # deferred forwards run as rows of a decoding round
                "prefill_s": round(scheduler.prefill_seconds, 2),
                "decode_s": round(scheduler.decode_seconds, 2),
                "decode_tokens_fed": self.engine.steps.decode_tokens_fed,
            }
            out["speculation"] = self.engine.drafting(session)[1].snapshot()  # how many of this session's guesses pay
        return out

    # -- helpers -------------------------------------------------------------

    @staticmethod
    def _guard(context, fn, *args):
        try:
            return fn(*args)
        except tuple(STATUS_OF_ERROR) as exc:
            context.abort(STATUS_OF_ERROR[type(exc)], str(exc))
