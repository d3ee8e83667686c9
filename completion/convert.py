"""The worker's messages and the engine's types: what a request asks turned into CompletionOptions,
what the engine answers turned into replies, and the status code of each document error.

Plain conversions on the generated messages (no torch, no model); the servicer (service.py) calls
them. The wire's spellings and their mapping are completion/rpc/wire.py's.
"""

from __future__ import annotations

from dataclasses import asdict

import grpc

from .documents import DocumentNotOpen, DocumentTooLarge, OffsetOutOfRange, ReservedUri, VersionMismatch
from .request import Chunk, CompletionOptions
from .rpc import worker_pb2 as pb
from .rpc.wire import AUTO, CACHE_MODE_BY_WIRE, COMPLETION_MODE_BY_WIRE, EDIT_AWARE, NO_CACHE

STATUS_OF_ERROR = {
    DocumentNotOpen: grpc.StatusCode.NOT_FOUND,
    VersionMismatch: grpc.StatusCode.FAILED_PRECONDITION,
    OffsetOutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    DocumentTooLarge: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ReservedUri: grpc.StatusCode.INVALID_ARGUMENT,
}


def document_options(opts: pb.CompleteOptions, refresh_window: int) -> CompletionOptions:
    """A Complete request's options (an unknown mode or cache mode: the default)."""
    return CompletionOptions(
        max_tokens=opts.max_tokens,
        mode=COMPLETION_MODE_BY_WIRE[opts.mode].name if opts.mode in COMPLETION_MODE_BY_WIRE else AUTO,
        cache_mode=CACHE_MODE_BY_WIRE[opts.cache].name if opts.cache in CACHE_MODE_BY_WIRE else EDIT_AWARE,
        refresh_window=refresh_window,
        **verdict_options(opts),
    )


def text_options(request: pb.CompleteTextRequest, refresh_window: int) -> CompletionOptions:
    """A CompleteText request's options (checked before: text_request.check_complete_text)."""
    opts = request.options
    return CompletionOptions(
        max_tokens=opts.max_tokens,
        mode=COMPLETION_MODE_BY_WIRE[opts.mode].name,
        # Without a cache key nothing is kept: the engine neither reads nor stores a cache.
        cache_mode=CACHE_MODE_BY_WIRE[opts.cache].name if request.cache_key else NO_CACHE,
        refresh_window=refresh_window,
        **verdict_options(opts),
    )


def verdict_options(opts) -> dict:
    """Abstention, early exit and drafting as the request asks (unset thresholds: the calibrated ones)."""
    return {
        "abstain_threshold": opts.abstain_threshold if opts.HasField("abstain_threshold") else None,
        "early_exit": opts.early_exit,
        "exit_threshold": opts.exit_threshold if opts.HasField("exit_threshold") else None,
        "drafter": "none" if opts.plain_decoding else "ngram",
    }


def completion_chunk(request_id: str, chunk: Chunk) -> pb.CompletionChunk:
    """One chunk of a completion's stream; the last one carries the stop reason and the stats."""
    if not chunk.done:
        return pb.CompletionChunk(request_id=request_id, text=chunk.text)
    return pb.CompletionChunk(
        request_id=request_id, text=chunk.text, done=True, stop_reason=chunk.stop_reason,
        stats=pb.CompletionStats(**asdict(chunk.stats)),
    )


def test_message(test, explain: bool) -> pb.GeneratedTest:
    return pb.GeneratedTest(
        index=test.index, name=test.name, intent=test.intent, code=test.code, syntax_ok=test.syntax_ok,
        syntax_error=test.syntax_error or "", stop_reason=test.stop_reason, stats=pb.CompletionStats(**asdict(test.stats)),
        seconds=test.seconds,
        drafts=[
            pb.PatternDraft(source=d.source, pattern=d.pattern, group=d.group, text=d.text, proposed=d.proposed, accepted=d.kept)
            for d in test.drafts
        ] if explain else [],
    )
