"""Any local Hugging Face model directory loads through the same loader; RoPE that does not compose
(dynamic NTK scaling) is detected and the cache falls back to prefix reuse."""

from __future__ import annotations

import shutil

import pytest
import torch

pytestmark = pytest.mark.model


def tiny_llama(tmp_path, rope_parameters: dict):
    """A small random Llama with the embedded model's tokenizer, saved as a plain HF directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from rotary.models.loader import resolve_model_dir

    source = resolve_model_dir(None)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_parameters=rope_parameters, tie_word_embeddings=True, eos_token_id=0,
    )
    torch.manual_seed(0)
    target = tmp_path / "tiny-llama"
    LlamaForCausalLM(config).save_pretrained(target)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)
    return target


def completion_stats(loaded, text: str, edited: str):
    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine, CompletionOptions
    from rotary.models.runner import ModelRunner

    engine = CompletionEngine(ModelRunner(loaded), KVStore())
    options = CompletionOptions(max_tokens=4, refresh_window=0)
    list(engine.complete("u", text, len(text), options))
    chunks = list(engine.complete("u", edited, len(edited), options))
    return engine, chunks[-1].stats


TEXT = "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a"
EDITED = "import math\n" + TEXT


def test_local_directory_with_default_rope_uses_the_edit_aware_cache(tmp_path):
    from rotary.models.loader import load_model

    loaded = load_model(tiny_llama(tmp_path, {"rope_type": "default", "rope_theta": 10000.0}))
    assert loaded.info.num_layers == 2 and loaded.info.num_kv_heads == 2 and loaded.info.rope.composable
    engine, stats = completion_stats(loaded, TEXT, EDITED)
    assert engine.edit_aware_supported and stats.tokens_rerotated > 0


def test_dynamic_ntk_rope_falls_back_to_prefix_reuse(tmp_path):
    from rotary.models.loader import load_model

    loaded = load_model(tiny_llama(tmp_path, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}))
    assert not loaded.info.rope.composable
    assert any("does not compose" in note for note in loaded.notes)
    engine, stats = completion_stats(loaded, TEXT, EDITED)
    assert not engine.edit_aware_supported
    assert stats.tokens_rerotated == 0 and stats.tokens_encoded == stats.context_tokens  # the edit is at the top


# -- a second local model, completion for completion against transformers ----------------------------


def tiny_model(tmp_path, architecture: str):
    """A small random model of `architecture` with the embedded model's tokenizer (not the embedded weights)."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from rotary.models.loader import resolve_model_dir

    sizes = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=512, eos_token_id=0, bos_token_id=0)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**sizes, num_key_value_heads=2, tie_word_embeddings=True))
    elif architecture == "qwen2":  # biases on q, k and v; untied head
        model = Qwen2ForCausalLM(Qwen2Config(**sizes, num_key_value_heads=2, tie_word_embeddings=False))
    else:  # GPT-NeoX: rotary on a quarter of each head, parallel attention and MLP, GELU
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**sizes, rotary_pct=0.25, tie_word_embeddings=False))
    target = tmp_path / f"tiny-{architecture}"
    model.save_pretrained(target)
    source = resolve_model_dir(None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, target / name)
    return target


def one_line(raw: str) -> str:
    """The documented single-line rule: up to the first line break after some non-blank text
    (leading line breaks kept), or all of it when the budget or the end of sequence comes first."""
    body = raw.lstrip("\r\n")
    return (raw[: len(raw) - len(body)] + body.split("\n", 1)[0]).rstrip()


@pytest.mark.parametrize("architecture, path", [("llama", "own"), ("qwen2", "own"), ("gpt_neox", "hf")])
def test_a_second_local_model_completes_exactly_as_transformers_greedy(tmp_path, architecture, path):
    """Llama-family models run on Rotary's own forward, others through transformers (models/hf.py);
    either way the completion, fresh and after an edit above the cursor, is transformers' greedy one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rotary.cache.store import KVStore
    from rotary.completion.engine import CompletionEngine, CompletionOptions
    from rotary.models.loader import load_model
    from rotary.models.runner import ModelRunner
    from rotary.models.transformer import Transformer
    from tests.conftest import greedy_continuation

    torch.manual_seed(0)
    directory = tiny_model(tmp_path, architecture)
    loaded = load_model(directory)
    assert loaded.info.architecture == architecture
    assert isinstance(loaded.model, Transformer) == (path == "own")
    runner = ModelRunner(loaded)
    assert runner.path == path
    if path == "hf":  # no layer access: early exit is refused where it is asked for, with the reason
        with pytest.raises(ValueError, match="cannot exit early: it runs through transformers"):
            runner.exit_forward()
    engine = CompletionEngine(runner, KVStore())
    # The oracle's own copy: the own forward takes the loaded model's weights (and may lay them out anew).
    oracle = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)

    options = CompletionOptions(max_tokens=12, mode="single_line")
    renamed = TEXT.replace("def sub(a, b):", "def subtract(a, b, c=0):")  # reuse before the edit, move after it
    for text in (TEXT, renamed):
        raw = greedy_continuation(text, 12, model_and_tokenizer=(oracle, tokenizer), eos=set(loaded.info.eos_token_ids))
        expected = one_line(raw)
        assert expected.strip(), f"the oracle produced nothing ({raw!r}); the test would be vacuous"
        chunks = list(engine.complete("file:///second-model.py", text, len(text), options))
        assert "".join(c.text for c in chunks) == expected
    stats = chunks[-1].stats
    assert stats.tokens_reused > 0
    assert (stats.tokens_rerotated > 0) == (path == "own")  # the fallback's model has partial rotary: prefix reuse
