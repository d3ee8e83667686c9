"""The rules the daemon (lsp/) and the worker (completion/) both obey, written once beside the stubs.

A limit, a checksum or a mode name that both sides must agree on lives here and nowhere else:
two copies drift (the daemon once skipped files past 2 M characters while the worker took 4 M).
The daemon imports this module, so it stays as light as the stubs: the standard library and
the generated worker_pb2, never torch, cache/ or models/.
"""

from __future__ import annotations

import zlib
from typing import NamedTuple

from . import worker_pb2 as pb

# -- limits ----------------------------------------------------------------------------------

# The text of a document (OpenDocument, the result of an EditDocument), of a CompleteText and of a
# GenerateTests request: at most this many code points. The daemon does not send a larger file (it
# gets no completions) and the worker refuses one, so both sides agree on every file. 2 M is the
# daemon's bound from the start: far past any hand-written source file (what is larger is
# generated, minified or data), and the bounds below and in the daemon (lsp/sync.py) and the
# worker's per-session budget (documents.py) are sized for documents of at most this length.
MAX_DOCUMENT_CHARS = 2_000_000
# One EditDocument: at most this many changes, and this many characters copied applying them
# (each change copies the text). The daemon keeps its pending changes far below both (it resends
# the whole document instead), so these only stop a client that sends too much in one edit.
MAX_CHANGES_PER_EDIT = 10_000
MAX_EDIT_WORK_CHARS = 256_000_000  # about 0.1 s of copying
# One GenerateTests request (worker.proto): tests per request and tokens per test (0 in either
# field: the default), the drafters it may name (greedy output is the same with each; "" is the
# default), and the sampling knobs' ranges. `rotary tests` checks its -n against MAX_TESTS before
# it asks; the worker refuses anything outside these (rotary.testgen.generate.check_request).
DEFAULT_TESTS = 5
MAX_TESTS = 20
DEFAULT_TEST_TOKENS = 128
MAX_TEST_TOKENS = 512
# ast: line patterns, their literals guessed from the group's lines; ast-strict: DiffTester's rule
# (stop at each literal); ast+ngram: patterns, and n-gram lookup where none matches (the default).
TEST_DRAFTERS = ("plain", "ngram", "ast", "ast+ngram", "ast-strict")
DEFAULT_TEST_DRAFTER = "ast+ngram"
MAX_TEMPERATURE = 5  # temperature 0 (greedy) to this; top_p 0 to 1


# -- the checksum of a document's text ------------------------------------------------------


def text_crc32(text: str) -> int:
    """DocumentAck.crc32: zlib's CRC-32 of the text in UTF-8. The worker sends it, the daemon
    compares it with its own text's; a lone surrogate is encoded as its own three bytes."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


# -- mode names: one row per mode, every spelling of it ---------------------------------------


class CompletionMode(NamedTuple):
    setting: str  # the LSP setting rotary.completionMode (and the editors' declarations)
    name: str  # the engine's (completion/stops.py) and `rotary complete --mode`
    wire: int  # CompleteOptions.mode


AUTO, SINGLE_LINE, MULTI_LINE = "auto", "single_line", "multi_line"
COMPLETION_MODES = (
    CompletionMode("auto", AUTO, pb.COMPLETION_MODE_AUTO),  # multi-line where a block starts, else single-line
    CompletionMode("singleLine", SINGLE_LINE, pb.COMPLETION_MODE_SINGLE_LINE),
    CompletionMode("multiLine", MULTI_LINE, pb.COMPLETION_MODE_MULTI_LINE),
)
COMPLETION_MODE_BY_SETTING = {mode.setting: mode for mode in COMPLETION_MODES}
COMPLETION_MODE_BY_NAME = {mode.name: mode for mode in COMPLETION_MODES}
COMPLETION_MODE_BY_WIRE = {mode.wire: mode for mode in COMPLETION_MODES}


class CacheMode(NamedTuple):
    name: str  # the engine's (completion/engine.py) and WorkerClient.complete's
    wire: int  # CompleteOptions.cache


EDIT_AWARE, PREFIX, NO_CACHE = "edit_aware", "prefix", "none"
CACHE_MODES = (
    CacheMode(EDIT_AWARE, pb.CACHE_MODE_EDIT_AWARE),  # the LSP setting editAwareCache: true
    CacheMode(PREFIX, pb.CACHE_MODE_PREFIX),  # editAwareCache: false
    CacheMode(NO_CACHE, pb.CACHE_MODE_NONE),
)
CACHE_MODE_BY_NAME = {mode.name: mode for mode in CACHE_MODES}
CACHE_MODE_BY_WIRE = {mode.wire: mode for mode in CACHE_MODES}


class DecodingMode(NamedTuple):
    setting: str  # the LSP setting rotary.decodingMode
    early_exit: bool  # CompleteOptions.early_exit (the engine's CompletionOptions.early_exit)
    plain_decoding: bool  # CompleteOptions.plain_decoding (the engine's drafter "none"; off: "ngram")


DECODING_MODES = (
    DecodingMode("lossless", early_exit=False, plain_decoding=False),  # guesses verified: plain greedy's text
    DecodingMode("earlyExit", early_exit=True, plain_decoding=False),  # lossy
    DecodingMode("plain", early_exit=False, plain_decoding=True),  # one token per forward
)
DECODING_MODE_BY_SETTING = {mode.setting: mode for mode in DECODING_MODES}
