"""Unit-test generation for a focal function: N tests one after another through the completion front.

After the focal function's module context (focal.py) comes a test file for it (layout.py), one
test at a time: test k gets a header of its own and the model writes its body; the stop rules end
it where the block ends. Each test is generated with every earlier test in the text, and the text
grows, so the document's KV cache is reused from one test to the next (same cache key).

That growing file is what the drafters feed on (drafting.py): the lines of earlier tests are
mined into patterns that propose the next tokens, verified in one forward (completion/decode.py).
Greedy decoding (the default) gives the same tests with every drafter; sampling (temperature > 0)
keeps the model's distribution (completion/sampling.py). Each test is one
`CompletionEngine.complete_prompt` call, like any other client's completion.

Generated code is never executed here (see sandbox.py for --check and the benchmark).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from rotary.completion.engine import CompletionOptions
from rotary.completion.rpc.wire import (
    DEFAULT_TEST_DRAFTER,
    DEFAULT_TEST_TOKENS,
    DEFAULT_TESTS,
    MAX_DOCUMENT_CHARS,
    MAX_TEMPERATURE,
    MAX_TEST_TOKENS,
    MAX_TESTS,
    MULTI_LINE,
    TEST_DRAFTERS,
)
from rotary.completion.sampling import Sampler

from .drafting import DRAFT_TOKENS, DraftRecord, make_drafter
from .focal import Focal
from .languages import TestGenError, syntax_error
from .layout import complete_lines, file_text, intent, layout


def check_request(request) -> None:
    """The limits of a GenerateTestsRequest (worker.proto, rpc/wire.py); a broken one raises TestGenError naming the field."""
    if not request.text:
        raise TestGenError("text: empty (the source file's text is needed)")
    if len(request.text) > MAX_DOCUMENT_CHARS:
        raise TestGenError(f"text: {len(request.text)} characters is over the limit of {MAX_DOCUMENT_CHARS}")
    if not request.path and not request.language_id:
        raise TestGenError("path: empty (a file name or a language_id is needed to know the language)")
    if not 0 <= request.count <= MAX_TESTS:
        raise TestGenError(f"count: {request.count} is outside 0..{MAX_TESTS} (0: {DEFAULT_TESTS})")
    if not 0 <= request.max_tokens <= MAX_TEST_TOKENS:
        raise TestGenError(f"max_tokens: {request.max_tokens} is outside 0..{MAX_TEST_TOKENS} (0: {DEFAULT_TEST_TOKENS})")
    if request.drafter and request.drafter not in TEST_DRAFTERS:
        raise TestGenError(f"drafter: unknown {request.drafter!r}; use one of {', '.join(TEST_DRAFTERS)}")
    if not 0 <= request.temperature <= MAX_TEMPERATURE:
        raise TestGenError(f"temperature: {request.temperature} is outside 0..{MAX_TEMPERATURE} (0: greedy)")
    if not 0 <= request.top_p <= 1:
        raise TestGenError(f"top_p: {request.top_p} is outside 0..1")


@dataclass
class GeneratedTest:
    index: int  # 1-based
    name: str
    intent: str
    code: str  # the whole test (header, body, closing)
    body: str  # what the model wrote
    stop_reason: str
    syntax_error: str | None
    seconds: float
    stats: object  # engine.CompletionStats
    drafts: list[DraftRecord] = field(default_factory=list)
    dropped_lines: int = 0  # trailing lines cut off a test the token limit ended mid-statement (complete_lines)

    @property
    def syntax_ok(self) -> bool:
        return self.syntax_error is None


@dataclass
class TestFile:
    __test__ = False  # not a pytest class
    focal: Focal
    tests: list[GeneratedTest]
    file_name: str
    text: str  # the file to write (syntax-invalid Python tests are kept as comments)


def generate_tests(
    engine,
    focal: Focal,
    count: int = DEFAULT_TESTS,
    max_tokens: int = DEFAULT_TEST_TOKENS,
    drafter: str = DEFAULT_TEST_DRAFTER,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    is_cancelled: Callable[[], bool] = lambda: False,
    cache_key: str | None = None,
    description: str = "",
    draft_tokens: int = DRAFT_TOKENS,
) -> Iterator[GeneratedTest]:
    """Generate `count` tests for `focal`, one after another, yielding each as it is finished.

    `cache_key`: the KV cache the growing test file uses (None: a fresh one, dropped at the end).
    `description`: optional prose about the function (TestEval gives a problem statement), shown
    as a comment before the code. Stops early (without the test in progress) when cancelled.
    """
    if drafter not in TEST_DRAFTERS:
        raise TestGenError(f"drafter: unknown {drafter!r}; use one of {', '.join(TEST_DRAFTERS)}")
    lay = layout(focal)
    runner = engine.runner
    draft = make_drafter(drafter, focal.language, runner.encode_text, runner.decode_ids, draft_tokens)
    comment = "#" if focal.language == "python" else "//"
    head = ""
    if description.strip():
        head = "".join(f"{comment} {line}".rstrip() + "\n" for line in description.strip().splitlines()) + "\n"
    text = head + focal.context + lay.intro
    tests_start = len(text)
    key = cache_key or f"rotary-tests:{id(draft):x}:{time.monotonic_ns()}"
    # The engine reads max_tokens 0 as its own default; here it has always meant one token.
    options = CompletionOptions(max_tokens=max(1, max_tokens), mode=MULTI_LINE, drafter="none")
    try:
        for k in range(1, count + 1):
            if is_cancelled():
                return
            header = lay.header(k, intent(k)) + (lay.scaffold if k == 1 else "")
            text += header
            prompt = engine.build_context(text, len(text), max_tokens)
            draft.begin(prompt, tests_start)
            sampler = Sampler(temperature, top_p, seed * 1009 + k) if temperature > 0 else None
            started = time.perf_counter()
            chunks = list(engine.complete_prompt(
                key, prompt, options, is_cancelled, drafter=draft, sampler=sampler, draft_tokens=draft_tokens, remember=False,
            ))
            last = chunks[-1]
            if last.stop_reason == "cancelled":
                return
            body = "".join(c.text for c in chunks).rstrip()
            code = (header.lstrip("\n") + body).rstrip() + lay.closing
            error = syntax_error(focal.language, code)
            dropped = 0
            if error is not None and last.stop_reason == "max_tokens":
                # The limit cut the test mid-statement: keep its complete lines (the later tests see them too).
                kept = complete_lines(focal.language, header, body, lay.closing)
                if kept != body:
                    dropped = body.count("\n") - kept.count("\n")
                    body = kept
                    code = (header.lstrip("\n") + body).rstrip() + lay.closing
                    error = None
            text += body.rstrip() + lay.closing.rstrip(" ")
            if not text.endswith("\n"):
                text += "\n"
            yield GeneratedTest(
                index=k, name=lay.test_name(k), intent=intent(k), code=code, body=body,
                stop_reason=last.stop_reason, syntax_error=error, dropped_lines=dropped,
                seconds=time.perf_counter() - started, stats=last.stats, drafts=list(getattr(draft, "records", [])),
            )
    finally:
        if cache_key is None:
            engine.kv_store.drop(key)


def generate_file(engine, focal: Focal, **kwargs) -> TestFile:
    """Every test of `generate_tests` and the file that holds them."""
    tests = list(generate_tests(engine, focal, **kwargs))
    lay = layout(focal)
    return TestFile(focal, tests, lay.file_name, file_text(focal, lay, tests))
