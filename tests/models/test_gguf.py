"""Rotary reads GGUF weights itself (models/gguf.py): every value as llama.cpp's reference dequantisers
give it, every weight as transformers' own GGUF loader makes it."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import torch

from rotary.models.gguf import GGUFError, GGUFFile, hf_name
from rotary.models.loader import find_default_gguf


def test_every_tensor_of_the_embedded_model_equals_the_reference_dequantisation():
    """Q4_1, Q8_0 and F32 (the embedded model's types) through Rotary's torch paths, bit for bit equal to
    the `gguf` package's numpy dequantisers (llama.cpp's reference; read with its own reader). Fails if a
    nibble order, a scale's place or the rounding of d * q + m differs."""
    import gguf

    ours = GGUFFile(find_default_gguf())
    reference = gguf.GGUFReader(str(find_default_gguf()))
    kinds = set()
    for tensor in reference.tensors:
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        got = ours.tensor(tensor.name)
        assert tuple(got.shape) == expected.shape, tensor.name
        assert np.array_equal(got.numpy().view(np.uint32), expected.astype(np.float32).view(np.uint32)), tensor.name
        kinds.add(tensor.tensor_type.name)
    assert kinds >= {"Q4_1", "Q8_0", "F32"}
    assert ours.metadata["general.architecture"] == "llama" and ours.metadata["llama.block_count"] == 30
    assert ours.metadata["tokenizer.ggml.tokens"] == 49152  # skipped, its length kept


def test_q4_0_blocks_equal_the_reference():
    """Q4_0, which the embedded model does not use: random blocks quantised by the `gguf` package, then
    dequantised by both."""
    import gguf

    from rotary.models.gguf import Q4_0, _dequantize

    values = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q4_0)
    expected = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
    got = _dequantize(blocks.reshape(-1), Q4_0, values.size).reshape(values.shape)
    assert torch.equal(got, torch.from_numpy(expected))


@pytest.mark.model
def test_the_weights_equal_those_transformers_reads_from_the_same_file():
    """Every weight under its Hugging Face name, q and k un-permuted, equal to the model transformers makes
    of the same GGUF (tests/conftest.py's reference, no Rotary code): fails without the un-permutation."""
    from tests.conftest import reference_model

    model, _ = reference_model()
    expected = model.state_dict()
    seen = set()
    config = model.config
    for name, weight in GGUFFile(find_default_gguf()).hf_tensors(config.num_attention_heads, config.num_key_value_heads):
        assert torch.equal(weight, expected[name]), name
        seen.add(name)
    assert seen == set(expected) - {"lm_head.weight"}  # tied: the GGUF has no output.weight


def test_names_map_to_hugging_face_names():
    assert hf_name("blk.3.attn_q.bias") == "model.layers.3.self_attn.q_proj.bias"
    assert hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("rope_freqs.weight") is None


def test_a_file_that_is_not_gguf_or_of_another_version_is_a_clear_error(tmp_path):
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        GGUFFile(other)
    future = tmp_path / "future.gguf"
    future.write_bytes(b"GGUF" + struct.pack("<IQQ", 9, 0, 0))
    with pytest.raises(GGUFError, match="version 9"):
        GGUFFile(future)
