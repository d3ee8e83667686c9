"""`rotary soak edits`: random LSP edit sequences through the daemon's sync code and the worker's document store.

Each sequence opens a document, then applies random incremental LSP edits to
it: multi-byte text, surrogate pairs, `\\r\\n`, lone `\\r`, characters that are
no line break in LSP (U+2028, form feed), empty documents, edits at the end,
positions past the end of a line or of the document, whole-document
replacements, repeated and out-of-order editor versions, close and reopen, in
UTF-16, UTF-8 or UTF-32 positions. Flushes to the worker come at random points,
and so do faults: a worker restart (announced or not), a lost acknowledgement
(the worker applied the edit, the daemon never heard), and a worker that
misapplies an edit (the length or only the CRC-32 of its acknowledgement
shows it).

The daemon side is the real `rotary.lsp.sync.DocumentSync`; the worker side is
the real `WorkerService` and its `DocumentStore`, called with requests and
answers that go through protobuf bytes as over gRPC (no socket, so 10,000
sequences take minutes). After every sequence the daemon's text, the worker's
text and a reference must agree. The reference is written here on its own: it
applies each LSP range to the text as code units of the position encoding
(UTF-16 units, UTF-8 bytes or code points) with the specification's line
breaks, and never calls Rotary's position code.

The tests run the same property a few hundred times (tests/lsp/test_edit_properties.py);
`rotary soak edits --sequences 10000` runs it on demand and reports the count of
lost or misapplied edits, which must be 0.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array
from dataclasses import dataclass, field

import grpc
from lsprotocol import types

from rotary.completion.documents import DocumentError
from rotary.completion.rpc import worker_pb2 as pb
from rotary.completion.service import WorkerService
from rotary.lsp.sync import DocumentSync, wire_text

ENCODINGS = ("utf-16", "utf-8", "utf-32")
URI = "file:///soak/doc.py"
# Pieces of text: ASCII, 2- and 3-byte UTF-8, astral characters (surrogate pairs in UTF-16), every LSP
# line break, and characters that break lines elsewhere (Python's splitlines) but not in LSP.
PIECES = ("a", "b", "x = 1", " ", "\t", "é", "中", "😀", "𝔸", "\n", "\r\n", "\r", "\u2028", "\x0c", "\u0085", "")
CR, LF = 0x0D, 0x0A


# -- the reference: LSP ranges applied to code units, independently of rotary.lsp.positions ------------


def to_units(text: str, encoding: str) -> list[int]:
    if encoding == "utf-16":
        return list(array("H", text.encode("utf-16-le")))
    if encoding == "utf-8":
        return list(text.encode("utf-8"))
    return [ord(ch) for ch in text]


def from_units(units: list[int], encoding: str) -> str:
    if encoding == "utf-16":
        return array("H", units).tobytes().decode("utf-16-le")
    if encoding == "utf-8":
        return bytes(units).decode("utf-8")
    return "".join(map(chr, units))


def unit_lines(units: list[int]) -> list[tuple[int, int]]:
    """(start, end of content) of each line; a line ends at LF, CR LF or a CR alone (LSP's definition)."""
    lines, start, i, n = [], 0, 0, len(units)
    while i < n:
        if units[i] == LF or units[i] == CR:
            width = 2 if units[i] == CR and i + 1 < n and units[i + 1] == LF else 1
            lines.append((start, i))
            i += width
            start = i
        else:
            i += 1
    lines.append((start, n))
    return lines


def reference_offset(units: list[int], line: int, character: int) -> int:
    """Unit offset of an LSP position: lines past the end clamp to the end, characters to the line's end."""
    lines = unit_lines(units)
    if line >= len(lines):
        return len(units)
    start, end = lines[line]
    return start + min(character, end - start)


def reference_apply(text: str, change, encoding: str) -> str:
    if getattr(change, "range", None) is None:
        return change.text
    units = to_units(text, encoding)
    start = reference_offset(units, change.range.start.line, change.range.start.character)
    end = reference_offset(units, change.range.end.line, change.range.end.character)
    return from_units(units[:start] + to_units(change.text, encoding) + units[end:], encoding)


def pick_position(text: str, encoding: str, line_pick: int, column_pick: int, overshoot: int) -> types.Position:
    """A position at a character boundary (where editors put them), or past the end of a line/document."""
    points = [ord(ch) for ch in text]
    lines = unit_lines(points)
    line = line_pick % (len(lines) + 1)  # one past the last line: clamps to the end
    if line == len(lines):
        return types.Position(line=line + overshoot, character=column_pick % 4)
    start, end = lines[line]
    column = column_pick % (end - start + 1)
    character = len(to_units(text[start : start + column], encoding))
    if overshoot and column == end - start:
        character += overshoot  # past the end of the line: clamps to it
    return types.Position(line=line, character=character)


# -- the worker, in process ----------------------------------------------------------------------------


class _Aborted(Exception):
    def __init__(self, code, details):
        super().__init__(details)
        self.code, self.details = code, details


class _Context:
    def invocation_metadata(self):
        return ()  # no session: the in-process worker serves this one daemon

    def abort(self, code, details):
        raise _Aborted(code, details)


class InProcessWorker:
    """The real WorkerService's document calls behind the daemon's async stub interface.

    Requests and answers go through protobuf bytes as they would over gRPC. Faults for the next
    EditDocument: "lost_ack" (applied, but the daemon gets DEADLINE_EXCEEDED), "misapply_length"
    (an insertion applied twice) and "misapply_shift" (an insertion one place later: same length,
    only the CRC-32 differs).
    """

    def __init__(self):
        self.service = WorkerService()
        self.next_edit_fault: str | None = None
        self.calls = 0

    async def _call(self, name: str, request, reply_type, fault: str | None = None):
        self.calls += 1
        request = type(request).FromString(request.SerializeToString())
        if fault and fault.startswith("misapply"):
            request = _misapply(request, fault)
        try:
            reply = getattr(self.service, name)(request, _Context())
        except _Aborted as exc:
            raise grpc.aio.AioRpcError(exc.code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=exc.details) from None
        if fault == "lost_ack":
            raise grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), details="lost")
        return reply_type.FromString(reply.SerializeToString())

    async def OpenDocument(self, request, timeout=None):
        return await self._call("OpenDocument", request, pb.DocumentAck)

    async def EditDocument(self, request, timeout=None):
        fault, self.next_edit_fault = self.next_edit_fault, None
        return await self._call("EditDocument", request, pb.DocumentAck, fault)

    async def CloseDocument(self, request, timeout=None):
        return await self._call("CloseDocument", request, pb.DocumentAck)

    def restart(self) -> None:
        """A new worker process: it knows no documents."""
        self.service = WorkerService()

    def text(self, uri: str) -> str | None:
        try:
            return self.service.documents.get(uri).text
        except Exception:
            return None


def _misapply(request: pb.EditDocumentRequest, fault: str) -> pb.EditDocumentRequest:
    for i, change in enumerate(request.changes):
        if change.text and change.start == change.end:
            if fault == "misapply_length":
                request.changes.insert(i + 1, pb.TextChange(start=change.start, end=change.end, text=change.text))
            else:
                change.start += 1
                change.end += 1
            break
    return request


# -- one sequence ---------------------------------------------------------------------------------------


@dataclass
class SoakStats:
    sequences: int = 0
    edits: int = 0  # LSP content changes applied
    flushes: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    resent: int = 0  # documents the daemon resent whole (refusals, drift, restarts)
    drift_detected: int = 0
    mismatches: int = 0  # sequences whose texts disagreed at the end: lost or misapplied edits
    first_mismatch: str | None = None


async def run_sequence(
    initial: str, encoding: str, ops: list[tuple], stats: SoakStats | None = None, on_flush=None
) -> tuple[str, str, str | None]:
    """Apply `ops` to a document; return (reference, daemon's text, worker's text) after a final flush.

    `on_flush(worker)`, when given, runs after every flush that the worker acknowledged."""
    stats = stats or SoakStats()
    sync, worker = DocumentSync(), InProcessWorker()
    reference, version = initial, 1
    sync.opened(URI, version, "python", initial)

    async def flush() -> None:
        """What a completion request does: flush, then Complete at the acknowledged version, whose
        refusal (the worker lost or moved past the document) makes the daemon resend it once."""
        stats.flushes += 1
        for _attempt in range(2):
            try:
                copy = await sync.flush(URI, worker)
            except grpc.aio.AioRpcError:
                return  # as a completion would: nothing this time, the changes stay pending
            if copy is None:
                return
            try:
                worker.service.documents.get(URI, copy.acked_version)
            except DocumentError:
                sync.resend(URI)
                continue
            if on_flush is not None:
                on_flush(worker)
            return

    for op in ops:
        kind = op[0]
        if kind == "edit":
            _, picks, version_step = op
            changes = []
            text = reference
            for (l1, c1, o1), (l2, c2, o2), insert, whole in picks:
                if whole:
                    change = types.TextDocumentContentChangeWholeDocument(text=insert)
                else:
                    a = pick_position(text, encoding, l1, c1, o1)
                    b = pick_position(text, encoding, l2, c2, o2)
                    units = to_units(text, encoding)
                    if reference_offset(units, a.line, a.character) > reference_offset(units, b.line, b.character):
                        a, b = b, a
                    change = types.TextDocumentContentChangePartial(range=types.Range(start=a, end=b), text=insert)
                text = reference_apply(text, change, encoding)
                changes.append(change)
            reference = text
            version += version_step  # 0: a repeated version; negative: out of order
            sync.changed(URI, version, changes, encoding)
            stats.edits += len(changes)
        elif kind == "flush":
            await flush()
        elif kind == "reopen":
            copy = sync.closed(URI)
            if copy is not None:
                await sync.close_in_worker(copy, worker)
            version += 1
            sync.opened(URI, version, "python", reference)
        elif kind == "restart":
            worker.restart()
            if op[1]:  # the daemon noticed (its worker connection calls this on every restart)
                sync.worker_restarted()
        else:  # a fault on the next EditDocument
            worker.next_edit_fault = kind
        if kind in ("restart", "lost_ack", "misapply_length", "misapply_shift"):
            stats.faults[kind] = stats.faults.get(kind, 0) + 1
    worker.next_edit_fault = None
    await flush()
    stats.resent += sync.reopens
    stats.drift_detected += sync.drifts
    return reference, sync.docs[URI].text, worker.text(URI)


def check_sequence(initial: str, encoding: str, ops: list[tuple], stats: SoakStats | None = None) -> None:
    """Run one sequence and assert that the three texts agree."""
    reference, daemon, worker = asyncio.run(run_sequence(initial, encoding, ops, stats))
    assert daemon == reference, f"daemon's text {daemon!r} is not the reference {reference!r}"
    assert worker == wire_text(reference), f"worker's text {worker!r} is not the reference {reference!r}"


# -- hypothesis strategies (used by the tests and by the soak command) ---------------------------------


def strategies():
    from hypothesis import strategies as st

    text = st.lists(st.sampled_from(PIECES), max_size=24).map("".join)
    pick = st.tuples(st.integers(0, 64), st.integers(0, 64), st.sampled_from((0, 0, 0, 1, 3)))
    change = st.tuples(pick, pick, text, st.integers(0, 19).map(lambda n: n == 0))  # 1 in 20 replaces the whole text
    edit = st.tuples(st.just("edit"), st.lists(change, min_size=1, max_size=3), st.sampled_from((1, 1, 1, 1, 2, 0, -1)))
    fault = st.sampled_from((("restart", True), ("restart", False), ("lost_ack",), ("misapply_length",), ("misapply_shift",)))
    op = st.one_of(*[edit] * 12, *[st.just(("flush",))] * 4, st.just(("reopen",)), *[fault] * 2)
    return text, st.sampled_from(ENCODINGS), st.lists(op, min_size=4, max_size=48)


# -- the command ------------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    if getattr(args, "name", "edits") == "kills":
        from .kills import main as kills_main

        return kills_main(args)
    from hypothesis import HealthCheck, Phase, given, seed, settings

    import logging

    logging.getLogger("rotary.lsp.sync").setLevel(logging.ERROR)  # refusals and drift are counted, not logged
    text, encoding, ops = strategies()
    stats = SoakStats()
    started = time.perf_counter()

    @seed(args.seed)
    @settings(
        max_examples=args.sequences, database=None, deadline=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )
    @given(text, encoding, ops)
    def one(initial, enc, sequence):
        stats.sequences += 1
        if stats.sequences % 1000 == 0:
            print(f"  {stats.sequences} sequences, {stats.edits} edits, {time.perf_counter() - started:.0f} s", file=sys.stderr)
        check_sequence(initial, enc, sequence, stats)

    failure = None
    try:
        one()
    except AssertionError as exc:  # hypothesis has shrunk it to a minimal example
        stats.mismatches = 1
        failure = str(exc)
    report = {
        "sequences": stats.sequences,
        "edits_applied": stats.edits,
        "flushes": stats.flushes,
        "faults_injected": stats.faults,
        "documents_resent": stats.resent,
        "drift_detected": stats.drift_detected,
        "lost_or_misapplied": stats.mismatches,
        "failure": failure,
        "seconds": round(time.perf_counter() - started, 1),
        "seed": args.seed,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        from .report import write_report

        write_report(args.json, report)
    return 1 if stats.mismatches else 0
