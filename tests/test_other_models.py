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
