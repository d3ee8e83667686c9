"""Early exit in the own forward, against transformers' own modules: the exit is where the controller says,
the logits are the exit head's, and the skipped layers' K/V are the exiting state projected (state copying)."""

from __future__ import annotations

import pytest
import torch

from rotary.models.exits import ExitingForward
from tests.conftest import reference_model, reference_tokenizer, rotary_transformer

pytestmark = pytest.mark.model

EXIT_AT = 9


def transformer():
    """Rotary's own forward on the embedded model: the session's runner's (tests/conftest.py)."""
    return rotary_transformer()


def heads(always: bool, rank: int = 4, seed: int = 0):
    """Exit heads at layers 9 and 19 whose controller always (or never) exits; random small adapters."""
    from rotary.models.exits import ExitHeads

    dim = transformer().config.dim
    gen = torch.Generator().manual_seed(seed)
    layers = (EXIT_AT, 19)
    down = {l: torch.randn(dim, rank, generator=gen) * 0.01 for l in layers}
    up = {l: torch.randn(rank, dim, generator=gen) * 0.01 for l in layers}
    gate_w = {l: torch.zeros(dim) for l in layers}
    gate_b = {l: torch.tensor(50.0 if always else -50.0) for l in layers}
    return ExitHeads(layers, down, up, gate_w, gate_b, threshold=0.5)


def prefilled(ids):
    from rotary.cache.buffer import KVBuffer

    c = transformer().config
    buffer = KVBuffer(c.n_layers, c.n_kv_heads, c.head_dim)
    buffer.extend(ids, transformer(), logits=None)
    return buffer


def prompt_ids():
    return reference_tokenizer().encode("def area(width, height):\n    return width *", add_special_tokens=False)


def test_a_controller_that_never_exits_changes_nothing():
    ids = prompt_ids()
    plain = prefilled(ids[:-1])
    with_heads = prefilled(ids[:-1])
    a = plain.extend(ids[-1:], transformer(), logits="all")
    b = with_heads.extend(ids[-1:], ExitingForward(transformer(), heads(always=False)), logits="all")
    assert b.exited is None and torch.equal(a.logits, b.logits)
    assert torch.equal(plain.used(), with_heads.used())


def test_exit_logits_and_copied_state_match_transformers_modules():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    hf, _ = reference_model()  # plain transformers, loaded apart: no weight shared with the own forward
    ids = prompt_ids()
    exits = heads(always=True)
    buffer = prefilled(ids[:-1])
    position = len(ids) - 1
    out = buffer.extend(ids[-1:], ExitingForward(transformer(), exits), logits="all")
    assert out.exited == EXIT_AT
    assert buffer.is_complete() and buffer.length == len(ids)  # every layer holds the token's K/V

    # The reference: transformers' own modules on the full sequence, up to the exit layer.
    with torch.inference_mode():
        states = hf(torch.tensor([ids]), output_hidden_states=True).hidden_states  # [layers + 1] of [1, T, dim]
        h = states[EXIT_AT + 1][0, -1]  # after layer EXIT_AT
        adapted = h + (h @ exits.down[EXIT_AT]) @ exits.up[EXIT_AT]
        expected_logits = hf.lm_head(hf.model.norm(adapted))
        assert (out.logits[0, -1] - expected_logits).abs().max() < 1e-3
        position_ids = torch.tensor([[position]])
        cos, sin = hf.model.rotary_emb(h.view(1, 1, -1), position_ids)
        for j in range(EXIT_AT + 1, hf.config.num_hidden_layers):
            layer = hf.model.layers[j]
            normed = layer.input_layernorm(h.view(1, 1, -1))
            attn = layer.self_attn
            k = attn.k_proj(normed).view(1, 1, -1, attn.head_dim).transpose(1, 2)  # [1, KV, 1, Dh]
            v = attn.v_proj(normed).view(1, 1, -1, attn.head_dim).transpose(1, 2)
            _, k = apply_rotary_pos_emb(k, k, cos, sin)
            assert (buffer.kv[j, 0, :, position] - k[0, :, 0]).abs().max() < 1e-4, j
            assert (buffer.kv[j, 1, :, position] - v[0, :, 0]).abs().max() < 1e-4, j
        # Layers up to the exit hold what the full forward writes there (to float rounding: other shapes).
        full = prefilled(ids)
        assert (buffer.kv[: EXIT_AT + 1, :, :, : len(ids)] - full.kv[: EXIT_AT + 1, :, :, : len(ids)]).abs().max() < 1e-4


def test_exit_heads_round_trip_through_the_artifact(tmp_path):
    from rotary.models.exits import ExitHeads

    original = heads(always=True)
    original.meta = {"gate": {"weights": [1.0], "bias": 0.0, "threshold": 0.4}}
    path = tmp_path / "exits.safetensors"
    original.save(path)
    back = ExitHeads.load(path)
    assert back.layers == original.layers and back.threshold == original.threshold and back.meta == original.meta
    for layer in original.layers:
        assert torch.equal(back.down[layer], original.down[layer]) and torch.equal(back.up[layer], original.up[layer])
        assert float(back.gate_b[layer]) == float(original.gate_b[layer])


def test_the_embedded_model_finds_its_shipped_calibration():
    """The exit heads and the abstention gate shipped for the embedded model (models/calibration/) are found
    for it as the set-up prepares it. Failed when transformers 5.25's config (a new `transformers_version`,
    `_model_name_or_path` holding a path) changed the fingerprint: the worker then ran with no gate and no heads."""
    from tests.conftest import rotary_runner

    runner = rotary_runner()
    assert runner.exits is not None, f"no calibration for fingerprint {runner.fingerprint}"
    assert "/models/calibration/" in runner.exits_from and runner.fingerprint in runner.exits_from
    assert runner.exits.meta.get("gate"), "the shipped artifact carries the abstention gate"


def test_the_fingerprint_ignores_the_transformers_release_and_the_path():
    """An artifact fits its model wherever it lies and whichever transformers loaded it; a different
    architecture or other weights are another model."""
    import copy

    from rotary.models.exits import model_fingerprint

    model, tokenizer = reference_model()
    before = model_fingerprint(model.config, tokenizer, model)
    config = copy.deepcopy(model.config)
    config.transformers_version, config._name_or_path = "0.0.1", "/somewhere/else"
    assert model_fingerprint(config, tokenizer, model) == before
    config.num_hidden_layers = model.config.num_hidden_layers - 1
    assert model_fingerprint(config, tokenizer, model) != before


def test_the_fingerprint_of_the_gguf_read_by_rotary_equals_that_of_transformers_reading_it():
    """Rotary reads the GGUF itself (models/gguf.py, no transformers): the fingerprint of what it
    holds, config, vocabulary and weights, equals the one of the model transformers makes of the same
    file. Fails if a weight differs (e.g. q not un-permuted) or the tokenizer's vocabulary does."""
    from rotary.models.exits import model_fingerprint
    from tests.conftest import rotary_runner

    model, tokenizer = reference_model()
    assert rotary_runner().fingerprint == model_fingerprint(model.config, tokenizer, model)
