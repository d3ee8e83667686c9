"""Shared fixtures: the real embedded model, and a greedy oracle computed with transformers alone."""

from __future__ import annotations

import functools
import os
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


@functools.lru_cache(maxsize=1)
def reference_tokenizer():
    """The embedded model's tokenizer, loaded with plain transformers (once per session)."""
    from transformers import AutoTokenizer

    from rotary.models.loader import resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(None)), local_files_only=True)


@functools.lru_cache(maxsize=1)
def reference_model():
    """The embedded model loaded with plain transformers (no Rotary code path), for oracles.

    One load for the whole session: every module's oracle is this object (read only)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rotary.models.loader import resolve_model_dir

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model_dir(None)), dtype=torch.float32, local_files_only=True).eval()
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
    """Rotary's own forward (models/transformer.Transformer) as the session's runner built it, the
    object the worker runs. Its weights are shared with `rotary_model()`'s HF modules (share_weights),
    so an oracle for it is `reference_model()`, loaded apart, never `rotary_model().model`."""
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


def _char_class(ch: str) -> int:
    return 0 if ch.isspace() else 1 if (ch.isalnum() or ch == "_") else 2


def healing_split(ids: list[int], text_before: str, tokenizer=None, texts: tuple[str, ...] | None = None) -> int:
    """The documented healing rule, stated here on its own: how many trailing tokens to take back.

    Whole tokens come off the end until their text covers the trailing run of characters of the
    last character's class (whitespace, word characters, anything else), at least one, at most
    6 tokens and 48 characters; never a special token or one that is part of a character, and
    never the whole context. `tokenizer` and `texts` (its token texts): another model's; by
    default the embedded model's.
    """
    if tokenizer is None:
        _, tokenizer = reference_model()
        texts = reference_token_texts()
    run = 0
    while run < len(text_before) and _char_class(text_before[-1 - run]) == _char_class(text_before[-1]):
        run += 1
    taken = chars = 0
    for token in reversed(ids[1:]):
        text = texts[token]
        if taken == 6 or token in tokenizer.all_special_ids or "\ufffd" in text or chars + len(text) > 48:
            break
        taken, chars = taken + 1, chars + len(text)
        if chars >= run:
            break
    return taken


def forbidden_first(text_before: str, text_after: str) -> str:
    """The documented rule for the first character after the healed text, stated here on its own."""
    if text_after.split("\n", 1)[0].strip():
        return ""
    line = text_before.replace("\r\n", "\n").replace("\r", "\n").rsplit("\n", 1)[-1]
    if line and not line.strip():
        return " \t\r\n\f\v"  # after indentation: no more whitespace
    if not line and text_before:
        return "\r\n"  # column 0 of an empty line: stay on this line
    return ""


def greedy_continuation(
    text_before: str,
    max_new_tokens: int = 48,
    text_after: str = "",
    model_and_tokenizer=None,
    fim: dict[str, int] | None = None,
    eos: set[int] | frozenset[int] = frozenset({0, 2, 5}),
    window: int | None = None,
) -> str:
    """Greedy decoding after `text_before` with plain transformers `generate`, healing as documented.

    Independent of Rotary's code: the tokens taken back are chosen by `healing_split`, and the
    constraint is a brute-force check of every token's text in `prefix_allowed_tokens_fn`: the
    generated text must stay a prefix of the healed text, or start with it, and its first
    character past it must not be in `forbidden_first`. End of sequence is always allowed.
    The returned text starts after the healed text.

    By default the embedded model; `model_and_tokenizer` takes another one. With `fim`
    ({"prefix", "suffix", "middle"} token ids) the prompt is prefix-suffix-middle: the healed
    text before the cursor, then the text after it. `eos`: the ids that end generation
    (default: SmolLM2's <|endoftext|>, <|im_end|> and <file_sep>). `window`: the most context
    tokens the model may see (the engine's max_context_tokens less the completion's max_tokens);
    a longer context, after healing, loses its first k * 256 tokens for the smallest k that makes
    it fit (the documented window hop, so a growing file moves the window rarely).
    """
    import torch

    model, tokenizer = model_and_tokenizer or reference_model()
    texts = token_texts(tokenizer)
    ids = tokenizer.encode(text_before, add_special_tokens=False)
    cut = healing_split(ids, text_before, tokenizer, texts)
    heal = tokenizer.decode(ids[len(ids) - cut :], clean_up_tokenization_spaces=False) if cut else ""
    ids = ids[: len(ids) - cut]
    if window is not None and len(ids) > window:
        hops = 1
        while len(ids) - 256 * hops > window:
            hops += 1
        # A window under one hop would keep almost nothing: then it starts exactly `window` from the end.
        ids = ids[256 * hops :] if len(ids) - 256 * hops >= window // 2 else ids[len(ids) - window :]
    if fim is not None:
        ids = [fim["prefix"], *ids, fim["suffix"], *tokenizer.encode(text_after, add_special_tokens=False), fim["middle"]]
    forbidden = forbidden_first(text_before, text_after)
    vocab = range(model.config.vocab_size)
    special = set(tokenizer.all_special_ids)

    def allowed(_batch, input_ids):
        so_far = tokenizer.decode(input_ids[len(ids) :], clean_up_tokenization_spaces=False)
        if len(so_far) > len(heal) or (len(so_far) == len(heal) and not forbidden):
            return list(vocab)
        ok = list(eos)
        for token in vocab:
            if token in special or "\ufffd" in texts[token] or not texts[token]:
                continue  # special tokens and pieces of a character never take part in healing
            text = so_far + texts[token]
            if len(text) <= len(heal):
                fits = heal.startswith(text)
            else:
                fits = text.startswith(heal) and text[len(heal)] not in forbidden
            if fits:
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
    """The prepared embedded model (the converted Hugging Face directory), where `make test` put it."""
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
