"""Shared fixtures: the real embedded model, and a greedy oracle computed with transformers alone."""

from __future__ import annotations

import functools
import os
import re
import string
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The oracle comparisons check decoding: the text greedy decoding produces. Abstention (the gate
# that withholds a likely-wrong suggestion) has tests of its own that set a threshold explicitly
# (tests/completion/test_verdict.py, tests/lsp/test_abstention.py); everywhere else every worker
# (in-process or started by a daemon or an editor, which inherit the environment) shows what it
# decoded.
os.environ.setdefault("ROTARY_ABSTAIN_THRESHOLD", "0")
# The oracles are transformers' float32 forward, compared within float32 rounding: every worker runs
# `exact` (models/precision.py). The other precisions are compared with exact within their stated bounds
# in tests/models/test_precision.py, and `auto` (the users' default) is run there too.
os.environ.setdefault("ROTARY_PRECISION", "exact")


@functools.lru_cache(maxsize=1)
def reference_dir() -> Path:
    """The embedded GGUF as plain transformers reads it (its own GGUF reader and dequantiser), saved as a
    Hugging Face folder once: no Rotary code but the line that finds the file. Rotary itself never writes
    such a copy (it reads the GGUF at every load), so the suite keeps its own under the test cache,
    made by one process at a time (a file lock) and published whole (a rename)."""
    import fcntl

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rotary.models.loader import find_default_gguf

    gguf = find_default_gguf()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rotary-tests"
    target = base / f"reference-{gguf.stem}-{gguf.stat().st_size}"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / "reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").is_file():
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            del model.config.quantization_config  # save_pretrained refuses it; the weights are float32 now
            model.hf_quantizer = None
            tmp = base / f"{target.name}.tmp{os.getpid()}"
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            tmp.rename(target)
    return target


@functools.lru_cache(maxsize=1)
def reference_tokenizer():
    """The embedded model's tokenizer, loaded with plain transformers (once per session)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(reference_dir()), local_files_only=True)


@functools.lru_cache(maxsize=1)
def reference_model():
    """The embedded model loaded with plain transformers (no Rotary code path), for oracles.

    One load for the whole session: every module's oracle is this object (read only)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(reference_dir()), dtype=torch.float32, local_files_only=True).eval()
    return model, reference_tokenizer()


@functools.lru_cache(maxsize=4)
def token_texts(tokenizer) -> tuple[str, ...]:
    """Every token's text as `tokenizer` decodes it alone (decoded once per tokenizer and session)."""
    return tuple(tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in range(len(tokenizer)))


def reference_token_texts() -> tuple[str, ...]:
    return token_texts(reference_tokenizer())


@functools.lru_cache(maxsize=1)
def rotary_model():
    """The embedded model through Rotary's own loader (`load_model(None)`), once per session.

    Shared by every in-process test of Rotary's code: the weights are never written by them."""
    from rotary.models.loader import load_model

    return load_model(None)


@functools.lru_cache(maxsize=1)
def rotary_runner():
    """One ModelRunner on `rotary_model()` for the session; engines with other settings are built on it."""
    from rotary.models.runner import ModelRunner

    return ModelRunner(rotary_model())


def rotary_transformer():
    """Rotary's own forward (models/transformer.Transformer) as the session's loader built it, the
    object the worker runs; its oracle is `reference_model()`, loaded apart by transformers."""
    runner = rotary_runner()
    assert runner.path == "own", f"the embedded model should take Rotary's own forward, not {runner.path}"
    return runner._forward


@functools.lru_cache(maxsize=1)
def rotary_engine():
    """One CompletionEngine with the default settings for the session (its own KVStore).

    A test that changes an attribute of it (the gate, the abstention default) puts it back in a
    `finally`; a test that puts a document in its store takes it out again."""
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine

    return CompletionEngine(rotary_runner(), KVStore())


# -- the oracle: documented behaviour, stated without Rotary's code ------------------------------------
#
# What a suggestion must be, from docs/ARCHITECTURE.md ("One keystroke" step 4, "What the editor inserts"):
# - token healing: the end of the text before the cursor (the trailing run of whitespace, word or operator
#   characters) is taken back; the model sees the tokens before it and first writes it again, under a
#   constraint, so the text before the cursor plus the suggestion neither repeats nor drops a character;
# - after the editor's auto-indentation the suggestion starts with a non-whitespace character; at column 0
#   of an empty line it may start with indentation but not with a line break;
# - with FIM tokens and code after the cursor the prompt is prefix-suffix-middle (StarCoder's PSM form);
# - a context longer than the window keeps its last tokens from a multiple of the 256-token window hop.

FIM_PREFIX, FIM_SUFFIX, FIM_MIDDLE = "<fim_prefix>", "<fim_suffix>", "<fim_middle>"  # StarCoder / SmolLM2 names
WINDOW_HOP = 256  # docs/ARCHITECTURE.md step 4


def trailing_run(text: str) -> str:
    """The trailing run of whitespace, of word characters (letters, digits, `_`) or of other characters
    (operators, punctuation) that ends `text`: what token healing takes back (docs/ARCHITECTURE.md step 4)."""
    match = re.search(r"(\s+|\w+|[^\s\w]+)\Z", text)
    return match.group() if match else ""


def healed_split(text_before: str, tokenizer=None) -> tuple[list[int], str]:
    """(what the model sees, the text it must first write again) for the text before the cursor.

    The tokenizer's own tokens of `text_before`, less every token that holds a character of its
    trailing run (so a partial word, an indentation or an operator is written by the model in the
    split it would choose itself); the text of those tokens is returned second, and the two read
    as `text_before` exactly. Stated from the documented rule, not from completion/prompt.py: no
    counting of tokens, and no cap. Rotary bounds how far healing reaches (completion/prompt.py
    MAX_HEAL_TOKENS, MAX_HEAL_CHARS) and never takes back a special token or a piece of a character,
    or the whole context; none of that is documented behaviour, so a text that would meet one of
    those limits is outside this oracle: it says so (AssertionError) rather than guess.

    Mutation check (2026-12-07): `heal_length` in completion/prompt.py returning `min(taken, 1)` (one
    token back whatever the run) fails tests/completion/test_healing.py::test_the_model_sees_the_text_before_the_trailing_run
    ("    retu" ends in " ret" + "u": one token back leaves " ret" in the context).
    """
    from rotary.completion.prompt import MAX_HEAL_CHARS, MAX_HEAL_TOKENS

    tokenizer = tokenizer or reference_tokenizer()
    assert text_before, "an empty text before the cursor is outside this oracle"
    ids = tokenizer.encode(text_before, add_special_tokens=False)
    run_start = len(text_before) - len(trailing_run(text_before))
    keep = len(ids)
    while keep:  # drop tokens from the end until what is left ends before the trailing run starts
        seen = tokenizer.decode(ids[:keep], clean_up_tokenization_spaces=False)
        if len(seen) <= run_start and text_before.startswith(seen):
            break
        keep -= 1
    heal = text_before[len(tokenizer.decode(ids[:keep], clean_up_tokenization_spaces=False)) :]
    taken = ids[keep:]
    assert keep > 0, f"{text_before!r} is one run: outside this oracle (Rotary keeps at least one token)"
    assert len(taken) <= MAX_HEAL_TOKENS and len(heal) <= MAX_HEAL_CHARS, f"{heal!r}: past Rotary's healing bound"
    assert not set(taken) & set(tokenizer.all_special_ids), f"{heal!r}: a special token in the healed text"
    assert all("\ufffd" not in tokenizer.decode([t]) for t in taken), f"{heal!r}: a character split across tokens"
    return ids[:keep], heal


def forbidden_first(text_before: str, text_after: str) -> str:
    """What the suggestion may not start with (docs/ARCHITECTURE.md, What the editor inserts): when the
    cursor's line holds only whitespace, no whitespace after the editor's indentation, and no line
    break at column 0. Lines end at \\n, \\r\\n or \\r (LSP)."""
    before_on_line = re.split(r"\r\n|\r|\n", text_before)[-1]
    after_on_line = re.split(r"\r\n|\r|\n", text_after)[0]
    if (before_on_line + after_on_line).strip():
        return ""  # code on the cursor's line: no rule
    return string.whitespace if before_on_line else "\r\n"


def oracle_prompt(
    text_before: str, text_after: str = "", tokenizer=None, fim: bool = False, window: int | None = None
) -> tuple[list[int], str]:
    """(the token ids the model sees, the healed text) as documented.

    `fim`: the prefix-suffix-middle form, built as text in the model's FIM format
    (`<fim_prefix>` text before the cursor less the healed text `<fim_suffix>` text after
    `<fim_middle>`, StarCoder's PSM layout) and tokenized whole, so neither the order nor the
    placement of the FIM tokens comes from Rotary. `window`: the most context tokens the model may
    see (the engine's max_context_tokens less the completion's max_tokens). The documented rule
    (docs/ARCHITECTURE.md step 4): a longer context keeps the longest tail of its tokens that fits
    and starts on a multiple of WINDOW_HOP (so a file growing at its end moves the window rarely);
    a window so small that this tail is under half of it keeps exactly its last `window` tokens.

    Mutation checks (2026-12-07): prefix and suffix swapped in completion/engine.py build_context
    fails tests/test_fim.py::test_fim_prompt_and_greedy_middle_match_transformers; completion/prompt.py
    WINDOW_HOP = 255 fails tests/completion/test_oracle_modes.py::test_a_context_longer_than_the_window_completes_from_the_window.
    """
    tokenizer = tokenizer or reference_tokenizer()
    ids, heal = healed_split(text_before, tokenizer)
    if fim:
        assert window is None, "the FIM window is outside this oracle"
        psm = FIM_PREFIX + text_before[: len(text_before) - len(heal)] + FIM_SUFFIX + text_after + FIM_MIDDLE
        return tokenizer.encode(psm, add_special_tokens=False), heal
    if window is not None and len(ids) > window:
        on_hops = [ids[start:] for start in range(0, len(ids), WINDOW_HOP) if len(ids) - start <= window]
        longest = on_hops[0] if on_hops else []
        ids = longest if len(longest) >= window // 2 else ids[len(ids) - window :]
    return ids, heal


def greedy_continuation(
    text_before: str,
    max_new_tokens: int = 48,
    text_after: str = "",
    model_and_tokenizer=None,
    fim: bool = False,
    eos: set[int] | frozenset[int] = frozenset({0, 2, 5}),
    window: int | None = None,
) -> str:
    """The suggestion at the cursor by the documented behaviour, with plain transformers `generate`.

    The model sees `oracle_prompt` (healing, FIM form, window; see there) and decodes greedily
    under one constraint, checked by brute force over every token's text in
    `prefix_allowed_tokens_fn`: what it writes must agree with the healed text (the end of the
    typed text) until it has covered it, and then go on with a character not in `forbidden_first`.
    So the text before the cursor followed by the returned suggestion is exactly the text the
    model wrote after its context: nothing typed is repeated or dropped. End of sequence is always
    allowed; special tokens and pieces of a character never stand for typed text.

    By default the embedded model; `model_and_tokenizer` takes another one. `eos`: the ids that end
    generation (default: SmolLM2's <|endoftext|>, <|im_end|> and <file_sep>).

    Mutation check (2026-12-07): completion/prompt.py `forbidden_after` returning "" (whitespace
    allowed after the auto-indent) fails tests/completion/test_healing.py::test_suggestion_equals_independent_oracle
    (its CRLF case: the engine then suggests "    a += b" after the editor's indentation).
    """
    import torch

    model, tokenizer = model_and_tokenizer or reference_model()
    texts = token_texts(tokenizer)
    ids, heal = oracle_prompt(text_before, text_after, tokenizer, fim=fim, window=window)
    forbidden = forbidden_first(text_before, text_after)
    vocab = range(model.config.vocab_size)
    special = set(tokenizer.all_special_ids)

    def allowed(_batch, input_ids):
        written = tokenizer.decode(input_ids[len(ids) :], clean_up_tokenization_spaces=False)
        if len(written) > len(heal) or (len(written) == len(heal) and not forbidden):
            return list(vocab)  # the typed text is covered (and its next character judged): free
        ok = list(eos)
        for token in vocab:
            if token in special or "\ufffd" in texts[token] or not texts[token]:
                continue
            text = written + texts[token]
            if heal.startswith(text) or (text.startswith(heal) and text[len(heal)] not in forbidden):
                ok.append(token)
        return ok

    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.eos_token_id, prefix_allowed_tokens_fn=allowed,
        )
    generated = out[0, len(ids) :].tolist()
    for i, token in enumerate(generated):
        if token in eos:
            generated = generated[:i]
            break
    text = tokenizer.decode(generated, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return text[len(heal) :] if text.startswith(heal) else ""


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


@pytest.fixture(scope="session")
def python_exe() -> str:
    return sys.executable


@pytest.fixture(scope="session")
def model_dir():
    """The prepared embedded model (its config, tokenizer and facts; the weights stay in the GGUF), where `make test` put it."""
    from rotary.models.loader import resolve_model_dir

    return resolve_model_dir(None)


@pytest.fixture(scope="session", autouse=True)
def kv_dir_of_the_session(tmp_path_factory):
    """No worker of the suite writes KV snapshots to the user's ~/.cache/rotary/kv, where one run
    could restore another's (snapshots are found by URI): every process the suite starts (workers,
    daemons and the workers they start, editors, the demo) inherits $ROTARY_KV_DIR. This one covers
    the session's and modules' fixtures; `kv_dir_of_the_test` gives each test a folder of its own.
    The prepared model stays in the user's cache (XDG_CACHE_HOME), converted once."""
    from rotary.models.loader import KV_DIR_ENV

    with pytest.MonkeyPatch.context() as env:
        env.setenv(KV_DIR_ENV, str(tmp_path_factory.mktemp("kv-session")))
        yield


@pytest.fixture(autouse=True)
def kv_dir_of_the_test(kv_dir_of_the_session, tmp_path_factory, monkeypatch):
    """Each test's processes keep their KV snapshots in a folder of the test's own."""
    from rotary.models.loader import KV_DIR_ENV

    monkeypatch.setenv(KV_DIR_ENV, str(tmp_path_factory.mktemp("kv")))


@pytest.fixture(scope="session")
def built_wheel(tmp_path_factory):
    """Rotary's wheel, built once per session from a copy of the sources (setuptools writes build/ and
    *.egg-info beside what it builds): (its path, pip's verbose output). What the editable install of
    the test venv cannot show (what ships) is checked on it."""
    import shutil
    import subprocess

    from rotary.completion.rpc.launch import python_command

    folder = tmp_path_factory.mktemp("wheel")
    source = folder / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "node_modules", "*.egg-info",
                                                                "__pycache__", "artifacts", ".hypothesis"))
    built = subprocess.run(
        python_command("-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
                       "-w", str(folder), str(source)),
        capture_output=True, text=True, cwd=folder,
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    return next(folder.glob("rotary-*.whl")), built.stdout + built.stderr


@pytest.fixture
def unix_socket_address():
    """A fresh `unix:PATH` in a private folder (tests/listening.py::unix_address), for a server whose
    address must be known before it starts."""
    from tests.listening import unix_address

    with unix_address() as address:
        yield address


def spawn_worker(tmp_path, *extra: str):
    """Start `rotary worker` and return (process, address) once it listens (its model is then still loading).

    It binds a port the OS picks (`--listen 127.0.0.1:0`) and the address is read from its
    "listening on" line, so no port is chosen here and freed before the worker takes it. Its
    snapshots live in tmp_path/kv and its other caches under tmp_path/cache, so no state is carried
    between runs (a cache key's cache, like a document's, would otherwise outlive the worker); the
    model is the embedded one, already converted, unless `extra` names another."""
    import re
    import subprocess
    import tempfile
    import time

    from rotary.completion.rpc.launch import rotary_command
    from rotary.models.loader import KV_DIR_ENV, resolve_model_dir

    fd, log = tempfile.mkstemp(prefix="worker-", suffix=".log", dir=tmp_path)
    os.close(fd)
    log = Path(log)
    model = [] if "--model" in extra else ["--model", str(resolve_model_dir(None))]
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), KV_DIR_ENV: str(tmp_path / "kv")}
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            rotary_command("--log-level", "warning", "worker", "--listen", "127.0.0.1:0", *model, *extra),
            stdin=subprocess.DEVNULL, stderr=stderr, env=env,
        )
    deadline = time.monotonic() + 60  # a guard against a hang, not a measure
    while not (bound := re.search(r"listening on (127\.0\.0\.1:\d+)", log.read_text())):
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)
    return proc, bound.group(1)


def stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=60)  # it writes the snapshots of changed documents before exiting


@pytest.fixture(scope="session")
def shared_worker(tmp_path_factory):
    """One real worker (the embedded model over real gRPC, default flags) for the whole session, as a
    WorkerClient; its caches under a temporary XDG_CACHE_HOME. For the tests that need no special
    worker flags (test_worker_grpc, test_grpc_interface, test_testgen_entrypoints); each of them
    keeps to URIs and cache keys of its own, and compares counters before and after, never absolutes."""
    from rotary.completion.client import WorkerClient

    proc, address = spawn_worker(tmp_path_factory.mktemp("shared-worker"))
    client = WorkerClient(address)
    try:
        client.wait_ready(timeout=300)
        yield client
    finally:
        client.close()
        stop(proc)


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n auto --dist loadgroup`): the editor tests share the
    editors' build folders (node_modules, the .vsix, the Neovim and Emacs runtime files), so they
    form one xdist group and run in one process, one after another."""
    editors = os.path.join(ROOT, "tests", "editors") + os.sep
    for item in items:
        if str(item.path).startswith(editors):
            item.add_marker(pytest.mark.xdist_group("editors"))
