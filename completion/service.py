"""The model worker: the gRPC service over documents, caches and the completion engine.

The model loads in a background thread so Health answers at once (with the
load progress in its message); Complete answers UNAVAILABLE until it is ready.
Typed document errors map to status codes the daemon acts on. CompleteText serves
tools that have a text but no document; the standard health and reflection services
beside rotary.v1.Worker are set up in standard_services.py.

Several daemons may share a worker, each a session (its `rotary-session` metadata; none: the
session ""). What a session keeps is its own: documents, KV caches and their snapshots, CompleteText
cache keys, n-gram sources and speculation statistics, a share of the document bounds, and a lease.
No session's text reaches another's answers, guesses or stats (docs/RELIABILITY.md).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import threading
import time
from concurrent import futures
from dataclasses import asdict

import grpc

from rotary.cache.pids import pid_alive

from .documents import (
    Change,
    DocumentNotOpen,
    DocumentStore,
    DocumentTooLarge,
    OffsetOutOfRange,
    ReservedUri,
    VersionMismatch,
    check_change_count,
    key_session,
    store_key,
)
from .rpc import worker_pb2 as pb
from .rpc import worker_pb2_grpc as pb_grpc
from .rpc.access import SESSION_METADATA, WorkerInterceptor, server_credentials, unix_socket_path
from .rpc.access import is_local_address
from .rpc.wire import AUTO, CACHE_MODE_BY_WIRE, COMPLETION_MODE_BY_WIRE, EDIT_AWARE, NO_CACHE, text_crc32
from .standard_services import add_standard_services, report_load
from .text_request import InvalidArgument, cache_uri, check_complete_text

log = logging.getLogger(__name__)

# A daemon calls Health every 2 s while its worker is ready: a session silent this long has gone
# away (exited, killed, lost its connection), and its documents are dropped. A daemon that comes
# back finds its documents gone (NOT_FOUND) and resends them. The session "" (clients that name
# none, `rotary complete`) has the same lease.
SESSION_LEASE_S = 120.0
# Streaming calls (Complete, CompleteText, GenerateTests, any other service's) served at once; one
# more gets RESOURCE_EXHAUSTED. Each holds a gRPC thread while it streams: the rest of the pool
# (RPC_THREADS) stays for the quick calls, and health checks have threads of their own.
# $ROTARY_MAX_STREAMS overrides the limit.
MAX_STREAMS = 64
RPC_THREADS = 128
HEALTH_METHODS = ("/rotary.v1.Worker/Health", "/grpc.health.v1.Health/Check")
HEALTH_THREADS = 4

STATUS_OF_ERROR = {
    DocumentNotOpen: grpc.StatusCode.NOT_FOUND,
    VersionMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    OffsetOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    DocumentTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ReservedUri: grpc.StatusCode.INVALID_ARGUMENT,
}


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
        self.counters = {
            "completions": 0,
            "completions_cancelled": 0,
            "completions_failed": 0,
            "completions_empty": 0,
            "completions_abstained": 0,
            "tokens_generated": 0,
            "tokens_drafted": 0,
            "drafts_accepted": 0,
            "forwards": 0,
            "tokens_reused": 0,
            "tokens_encoded": 0,
            "tokens_rerotated": 0,
            "stale_refreshed": 0,
            "edits": 0,
            "edits_rejected": 0,
            "tests_generated": 0,
            "sessions_expired": 0,
            "documents_expired": 0,
        }
        self._latencies_ms: list[float] = []
        self._counter_lock = threading.Lock()

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
            info = loaded.info
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
            self._count("edits_rejected")
            context.abort(STATUS_OF_ERROR[type(exc)], str(exc))
        self._count("edits")
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
            with self._counter_lock:
                self.counters["sessions_expired"] += 1
                self.counters["documents_expired"] += open_before
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
        from .engine import CompletionOptions

        opts = request.options
        options = CompletionOptions(
            max_tokens=opts.max_tokens,
            mode=COMPLETION_MODE_BY_WIRE[opts.mode].name if opts.mode in COMPLETION_MODE_BY_WIRE else AUTO,
            cache_mode=CACHE_MODE_BY_WIRE[opts.cache].name if opts.cache in CACHE_MODE_BY_WIRE else EDIT_AWARE,
            refresh_window=self.refresh_window,
            **verdict_options(opts),
        )
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
                if not chunk.done:
                    chunks.put(pb.CompletionChunk(request_id=request.request_id, text=chunk.text))
                    continue
                self._record(chunk)
                chunks.put(
                    pb.CompletionChunk(
                        request_id=request.request_id,
                        text=chunk.text,
                        done=True,
                        stop_reason=chunk.stop_reason,
                        stats=pb.CompletionStats(**asdict(chunk.stats)),
                    )
                )
        except Exception as exc:  # logged here, reported to the caller as INTERNAL
            self._count("completions_failed")
            log.exception("completion %s failed", request.request_id)
            chunks.put(exc)
        finally:
            chunks.put(None)

    def CompleteText(self, request, context):
        """Complete with no document: the text comes in the request (limits in worker.proto)."""
        from .engine import MAX_TOKENS_LIMIT, CompletionOptions

        try:
            check_complete_text(request, MAX_TOKENS_LIMIT)
        except InvalidArgument as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if not self.ready.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, self.load_message)
        opts = request.options
        options = CompletionOptions(
            max_tokens=opts.max_tokens,
            mode=COMPLETION_MODE_BY_WIRE[opts.mode].name,
            # Without a cache key nothing is kept: the engine neither reads nor stores a cache.
            cache_mode=CACHE_MODE_BY_WIRE[opts.cache].name if request.cache_key else NO_CACHE,
            refresh_window=self.refresh_window,
            **verdict_options(opts),
        )
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
                self._count("tests_generated")
                replies.put(pb.GenerateTestsReply(
                    request_id=rid, done_tests=len(tests), total_tests=count,
                    message=f"test {len(tests)} of {count}: {test.name}", test=_test_message(test, request.explain),
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
        with self._counter_lock:
            counters = dict(self.counters)
            latencies = sorted(self._latencies_ms)
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
                "background_refreshed": self.engine.background_refreshed,
                "refresh_window": self.refresh_window,
                **store.counters,
            }
            scheduler = self.engine.scheduler
            out["model_thread"] = {
                "forward": self.engine.runner.path,  # "own" (Rotary's forward) or "hf" (transformers fallback)
                "queue_depth": scheduler.queue_depth,
                "rounds": scheduler.rounds,
                "decode_rounds": scheduler.decode_rounds,
                "mean_batch": round(scheduler.batched_rows / scheduler.decode_rounds, 2) if scheduler.decode_rounds else None,
                "batched_rows": scheduler.batched_rows,
                "prefill_steps": scheduler.prefill_steps,
                "encode_batches": scheduler.encode_batches,
                "encode_rows": scheduler.encode_rows,
                "riders": scheduler.riders,  # recorded prefill steps run as rows of a decoding round
                "prefill_s": round(scheduler.prefill_seconds, 2),
                "decode_s": round(scheduler.decode_seconds, 2),
                "decode_tokens_fed": self.engine.decode_tokens_fed,
            }
            out["speculation"] = self.engine.drafting(session)[1].snapshot()  # how many of this session's guesses pay
        return out

    # -- helpers -------------------------------------------------------------

    def _record(self, chunk) -> None:
        s = chunk.stats
        with self._counter_lock:
            key = "completions_cancelled" if chunk.stop_reason == "cancelled" else "completions"
            self.counters[key] += 1
            self.counters["tokens_generated"] += s.tokens_generated
            self.counters["tokens_reused"] += s.tokens_reused
            self.counters["tokens_encoded"] += s.tokens_encoded
            self.counters["tokens_rerotated"] += s.tokens_rerotated
            self.counters["stale_refreshed"] += s.stale_refreshed
            self.counters["tokens_drafted"] += s.tokens_drafted
            self.counters["drafts_accepted"] += s.drafts_accepted
            self.counters["forwards"] += s.forwards
            if chunk.stop_reason == "abstained":
                self.counters["completions_abstained"] += 1
            if chunk.stop_reason != "cancelled":
                self._latencies_ms = (self._latencies_ms + [s.total_ms])[-1000:]

    def _count(self, key: str) -> None:
        with self._counter_lock:
            self.counters[key] += 1

    @staticmethod
    def _guard(context, fn, *args):
        try:
            return fn(*args)
        except tuple(STATUS_OF_ERROR) as exc:
            context.abort(STATUS_OF_ERROR[type(exc)], str(exc))


def max_streams_setting() -> int:
    """$ROTARY_MAX_STREAMS, else MAX_STREAMS; a value that is not a positive integer stops the worker."""
    value = os.environ.get("ROTARY_MAX_STREAMS", "").strip()
    if not value:
        return MAX_STREAMS
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"ROTARY_MAX_STREAMS={value!r}: expected a positive whole number of streaming calls")
    return int(value)


class StreamLimit:
    """How many streaming calls are served at once: at most `limit`, the next refused (counted)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0
        self.refused = 0
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def slot(self, context):
        with self._lock:
            full = self.open >= self.limit
            if full:
                self.refused += 1
            else:
                self.open += 1
        if full:
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the worker is serving its limit of {self.limit} streaming calls at once; retry when one ends",
            )
        try:
            yield
        finally:
            with self._lock:
                self.open -= 1

    def stats(self) -> dict:
        return {"streams_open": self.open, "streams_refused": self.refused, "max_streams": self.limit}


class CallLimits(grpc.ServerInterceptor):
    """Streaming calls within the StreamLimit; health checks on a thread pool of their own, so a
    worker serving every thread of its main pool still answers them (the daemon restarts a worker
    whose Health misses its deadline). Outermost: it wraps the handlers the other interceptors made."""

    def __init__(self, streams: StreamLimit, health_pool: futures.ThreadPoolExecutor):
        self.streams, self.health_pool = streams, health_pool

    def intercept_service(self, continuation, details):
        handler = continuation(details)
        if handler is None:
            return handler
        kind = dict(deserializer=handler.request_deserializer, serializer=handler.response_serializer)
        if details.method in HEALTH_METHODS and handler.unary_unary is not None:
            check = handler.unary_unary

            def health(request, context):
                return check(request, context)

            health.experimental_thread_pool = self.health_pool  # grpc's per-method pool (grpc/_server.py)
            return grpc.unary_unary_rpc_method_handler(health, kind["deserializer"], kind["serializer"])
        for make, behavior in (
            (grpc.unary_stream_rpc_method_handler, handler.unary_stream),
            (grpc.stream_stream_rpc_method_handler, handler.stream_stream),
        ):
            if behavior is not None:
                return make(self._limited(behavior), kind["deserializer"], kind["serializer"])
        return handler

    def _limited(self, behavior):
        def stream(request, context):
            with self.streams.slot(context):
                yield from behavior(request, context)

        return stream


def _test_message(test, explain: bool) -> pb.GeneratedTest:
    return pb.GeneratedTest(
        index=test.index, name=test.name, intent=test.intent, code=test.code, syntax_ok=test.syntax_ok,
        syntax_error=test.syntax_error or "", stop_reason=test.stop_reason, stats=pb.CompletionStats(**asdict(test.stats)),
        seconds=test.seconds,
        drafts=[
            pb.PatternDraft(source=d.source, pattern=d.pattern, group=d.group, text=d.text, proposed=d.proposed, accepted=d.kept)
            for d in test.drafts
        ] if explain else [],
    )


def verdict_options(opts) -> dict:
    """Abstention, early exit and drafting as the request asks (unset thresholds: the calibrated ones)."""
    return {
        "abstain_threshold": opts.abstain_threshold if opts.HasField("abstain_threshold") else None,
        "early_exit": opts.early_exit,
        "exit_threshold": opts.exit_threshold if opts.HasField("exit_threshold") else None,
        "drafter": "none" if opts.plain_decoding else "ngram",
    }


def make_server(
    service: WorkerService, token: str | None = None, reflection: bool = False, rpc_threads: int | None = None
) -> tuple[grpc.Server, object]:
    """The gRPC server of a worker service (no port yet) and its standard health servicer.

    Completion calls wait on the model thread without holding it; at most the service's stream
    limit of them hold a thread, so the quick calls (Stats, documents) find one among `rpc_threads`
    (default: RPC_THREADS, at least the limit plus 16), and health checks run on threads of their own."""
    health_pool = futures.ThreadPoolExecutor(max_workers=HEALTH_THREADS, thread_name_prefix="rotary-health")
    server = grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=rpc_threads or max(RPC_THREADS, service.streams.limit + 16), thread_name_prefix="rotary-rpc"
        ),
        interceptors=[
            CallLimits(service.streams, health_pool),
            WorkerInterceptor(token),  # the access token, and a clear error for unparsable requests
        ],
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.so_reuseport", 0)],
    )
    pb_grpc.add_WorkerServicer_to_server(service, server)
    return server, add_standard_services(server, reflection)


def serve(
    listen: str,
    model_path: str | None = None,
    cache_budget_mb: int = 1024,
    parent_pid: int | None = None,
    on_bound=None,
    max_context_tokens: int = 2048,
    refresh_window: int = 128,
    stale_budget: int = 1024,
    reflection: bool | None = None,
    token: str | None = None,
    tls: tuple[bytes, bytes] | None = None,
    session_lease_s: float = SESSION_LEASE_S,
) -> None:
    """Serve until interrupted (or until the parent process, when given, is gone).

    `token`: every call but the standard health check must carry it (rpc/access.py); `tls`: a
    (certificate, key) PEM pair to serve TLS with. The caller checks that a non-local address has both.

    Beside rotary.v1.Worker: grpc.health.v1.Health, and server reflection when `reflection`
    (None: on for loopback and unix sockets, off elsewhere)."""
    service = WorkerService(model_path, cache_budget_mb, max_context_tokens, refresh_window, stale_budget, session_lease_s)
    server, health = make_server(service, token, is_local_address(listen) if reflection is None else reflection)
    port = server.add_secure_port(listen, server_credentials(*tls)) if tls else server.add_insecure_port(listen)
    if unix_socket_path(listen):
        os.chmod(unix_socket_path(listen), 0o600)  # this user alone connects
    if port == 0 and not listen.startswith("unix:"):
        raise SystemExit(f"could not listen on {listen}")
    bound = listen if listen.startswith("unix:") or not listen.endswith(":0") else f"{listen.rsplit(':', 1)[0]}:{port}"
    server.start()
    report_load(health, service.load_in_background(), service.ready)
    stop = threading.Event()
    # SIGTERM (the daemon stopping its worker) ends the loop below like Ctrl-C, so snapshots get written.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if on_bound:
        on_bound(bound)
    try:
        while not stop.is_set() and server.wait_for_termination(timeout=1.0):  # True: timed out, still serving
            if parent_pid and not pid_alive(parent_pid):
                log.info("parent %s is gone; worker exits", parent_pid)
                break
            service.expire_sessions()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        health.enter_graceful_shutdown()
        server.stop(grace=0.5)
        service.flush_snapshots()
