"""The llama.cpp peer of `rotary bench decode` (bench/peer.py running bench/llamacpp/peer.mjs):
node-llama-cpp's prebuilt CPU binary on the embedded GGUF, fed Rotary's token ids.

What it is said to do: run the prebuilt binary (never a build), on the same GGUF and threads, and
report positive decode, prefill and edit figures with the versions it ran; its greedy tokens after
a 1k prefill agree with Rotary's exact greedy tokens at first; an edit re-evaluates only from the
first token that differs (the common prefix stays cached); where it cannot run, it says why.

Greedy agreement: llama.cpp runs the GGUF's Q4_1 weights on activations quantized to 8 bits
(Q8_1), Rotary the same weights dequantized to float32, so their logits differ a little and greedy
texts part where two candidates are close. Measured on 8 contexts of 1024 tokens of the standard
library (bench/decode.py's _contexts, seeds 0-7, the prefill's token and 8 steps each, 2026-12-08,
the linux-x64 binary's haswell (AVX2) CPU variant), all 72 tokens agreed. The test asserts only
the first MUST_AGREE tokens, on seed 0's context: the binary's other CPU variants (AVX-512, AMX)
take other kernels, whose rounding was not measured.

Without bench/llamacpp/node_modules (`make peer-setup`) the model test skips, saying so. The
module did not exist before issue 25: every test here failed (ImportError) before it.
"""

from __future__ import annotations

import json

import pytest

from rotary.bench import peer

MUST_AGREE = 3


def _require_peer() -> None:
    """Skip, saying why, where the peer cannot run: `make peer-setup` (run by `make editors-setup`) installs it."""
    if peer.why_not_installed() is not None:
        pytest.skip(f"the llama.cpp peer cannot run here: {peer.why_not_installed()}")


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@pytest.mark.model
def test_peer_runs_the_prebuilt_binary_and_agrees_with_rotarys_greedy_tokens():
    """The peer on the embedded GGUF, tiny: one 1k context prefilled on 1 thread, its greedy steps on 2
    (the prefill's state copied into the 2-thread context, the path the bench takes when decode and
    prefill threads differ), a one-line edit of a ~120-token file. available, positive figures, the
    build it names (node-llama-cpp 3.21.1, the prebuilt linux-x64 binary, no GPU); its first greedy
    tokens are Rotary's own forward's; the edit evaluated exactly the tokens from the first that differs on."""
    _require_peer()
    from rotary.bench.decode import _contexts
    from rotary.bench.edits import change_one_line
    from rotary.cache.buffer import KVBuffer

    from tests.conftest import rotary_model, rotary_transformer

    tokenizer = rotary_model().tokenizer
    ids = _contexts(None, tokenizer, 1, 1024, 0)[0]
    before_text = tokenizer.decode(ids[:120])
    after_text = change_one_line(before_text)
    before = tokenizer.encode(before_text, add_special_tokens=False)
    after = tokenizer.encode(after_text, add_special_tokens=False)
    steps = MUST_AGREE - 1
    results = peer.measure(
        None, {1024: [ids]}, steps, threads=2, prefill_threads=1, edits=[(before, after)],
        edit_length=len(before), tokenize_check=(before_text, before), timeout=300,
    )
    assert results["available"] is True, results.get("why")
    for key in ("decode_ms_per_token_1k", "prefill_tok_s_1k", f"edit_first_token_ms_{len(before)}"):
        assert results[key] > 0, (key, results[key])

    build = results["build"]
    assert build["node-llama-cpp"] == "3.21.1"
    assert build["binary"] == "prebuilt" and build["gpu"] is False
    assert build["llama.cpp"].startswith("ggml-org/llama.cpp@")
    assert any("@node-llama-cpp/linux-x64/" in path and path.endswith("llama-addon.node") for path in build["loaded"]), build["loaded"]
    assert build["threads"] == 2 and build["prefill_threads"] == 1 and build["gguf"].endswith(".gguf")
    assert set(results["decode_ms_per_token_1k_by_threads"]) == {"1", "2"}
    assert build["tokenize_agrees"] is True  # llama.cpp's own tokenizer gives Rotary's ids for this text

    # The edit: only the tokens from the first that differs were evaluated (the prefix stayed cached).
    assert results[f"edit_tokens_evaluated_{len(before)}"] == [len(after) - _common_prefix(before, after)]
    assert 0 < len(after) - _common_prefix(before, after) < len(after)  # something was reused, something not

    # Rotary's exact greedy tokens: its own forward (the worker's) over a KV buffer, from the same ids.
    own = rotary_transformer()
    c = own.config
    buffer = KVBuffer(c.n_layers, c.n_kv_heads, c.head_dim, dtype=own.dtype, device=own.device)
    logits = buffer.extend(ids, own).logits[0]
    rotary_tokens = []
    for _ in range(MUST_AGREE):
        rotary_tokens.append(int(logits.argmax()))
        logits = buffer.extend([rotary_tokens[-1]], own).logits[0]
    peer_tokens = results["greedy_tokens_1k"][0]
    assert len(peer_tokens) == MUST_AGREE
    assert peer_tokens == rotary_tokens, (peer_tokens, rotary_tokens)


def test_without_the_installed_peer_it_says_why(monkeypatch, tmp_path):
    """No bench/llamacpp/node_modules: results.peer is available false, and why names what to run."""
    monkeypatch.setattr(peer, "PEER_DIR", tmp_path)
    results = peer.measure(None, {1024: [[1, 2, 3]]}, 2, 1, 1)
    assert results["available"] is False
    if "node-llama-cpp" in results["why"]:
        assert "make peer-setup" in results["why"] and str(tmp_path / "node_modules") in results["why"]
    else:  # not Linux x86-64, or no node: said so
        assert "Linux x86-64" in results["why"] or "node is not on PATH" in results["why"]
    assert peer.why_not_run(None, None) == results["why"]
    assert peer.why_not_run("none", None) == "not asked for (--peer none)"


def test_a_hugging_face_folder_or_a_non_gguf_model_has_no_peer(tmp_path):
    """llama.cpp runs GGUF files: `--model DIR` (a Hugging Face folder) or another file gets available
    false with the reason, whether or not the peer is installed."""
    (tmp_path / "config.json").write_text("{}")
    results = peer.measure(str(tmp_path), {1024: [[1, 2, 3]]}, 2, 1, 1)
    assert results["available"] is False
    if peer.why_not_installed() is None:
        assert results["why"] == f"the model {tmp_path} is a Hugging Face folder; llama.cpp runs GGUF files (pass --model FILE.gguf)"
    gguf, why = peer.gguf_for(str(tmp_path / "config.json"))
    assert gguf is None and "is no .gguf file" in why


def test_a_file_that_is_no_gguf_fails_the_peer_with_its_error(tmp_path):
    """A `.gguf` that is not one, with a job the size of the bench's (eight 4k contexts, ~200 KB on
    stdin): the peer reads the whole job, fails loading the model, and results.peer carries
    llama.cpp's error, not a crash. Before the fix the script read stdin with readFileSync(0), which
    failed with EAGAIN on a pipe still being written (the first `bench decode --peer` run lost the
    peer so): this test failed so then."""
    _require_peer()
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file" * 100)
    job = {4096: [list(range(4096))] * 8}
    assert len(json.dumps(job)) > 64 * 1024  # more than a pipe holds at once
    results = peer.measure(str(bad), job, 2, 1, 1, timeout=120)
    assert results["available"] is False
    assert results["why"].startswith('llama.cpp exited with status 1: InvalidGgufMagicError: Invalid GGUF magic'), results["why"]
