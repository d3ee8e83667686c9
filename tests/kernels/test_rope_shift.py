"""Tests of the RoPE key shift: the reference against an independent RoPE, Triton against the reference.

The independent construction: draw random *pre-RoPE* keys, rotate them to
positions p with Hugging Face's own apply_rotary_pos_emb ("half") or a
complex-number product ("interleaved", as in Meta's Llama), then demand that
shifting a segment by delta equals rotating it to p + delta from scratch.
"""

from __future__ import annotations

import math
import os
import subprocess

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from rotary.completion.rpc.launch import python_command
from rotary.kernels import rope_shift
from rotary.kernels.rope_shift import (
    rotation_cos_sin,
    selected_backend,
    shift_keys,
    shift_keys_reference,
    shift_keys_triton,
)

CONVENTIONS = ("half", "interleaved")


def default_inv_freq(rotary_dim: int, theta: float = 100000.0) -> torch.Tensor:
    return 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)


def llama3_inv_freq(rotary_dim: int, theta: float = 500000.0) -> torch.Tensor:
    """Llama 3.1's non-uniform rescaling: low frequencies divided by 8, high kept, a smooth ramp between."""
    factor, low_freq_factor, high_freq_factor, original_context = 8.0, 1.0, 4.0, 8192
    inv_freq = default_inv_freq(rotary_dim, theta)
    wavelength = 2 * math.pi / inv_freq
    smooth = (original_context / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = torch.where(wavelength > original_context / low_freq_factor, inv_freq / factor, inv_freq)
    ramp = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    in_ramp = (wavelength >= original_context / high_freq_factor) & (wavelength <= original_context / low_freq_factor)
    return torch.where(in_ramp, ramp, scaled)


def rope_at(pre_keys: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, convention: str) -> torch.Tensor:
    """Rotate pre-RoPE keys [..., seq, head_dim] to `positions` [seq], in float64; dims past 2*len(inv_freq) pass through."""
    pre = pre_keys.to(torch.float64)
    rotary_dim = 2 * inv_freq.numel()
    rot, passthrough = pre[..., :rotary_dim], pre[..., rotary_dim:]
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(torch.float64)[None, :]  # [seq, R/2]
    if convention == "half":
        emb = torch.cat([angles, angles], dim=-1)  # the Hugging Face layout of cos/sin
        _, rotated = apply_rotary_pos_emb(rot, rot, emb.cos(), emb.sin(), unsqueeze_dim=0)
    else:
        pairs = torch.view_as_complex(rot.reshape(*rot.shape[:-1], -1, 2).contiguous())
        rotated = torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
    return torch.cat([rotated, passthrough], dim=-1)


def positions_after(seq_len: int, segments) -> torch.Tensor:
    positions = torch.arange(seq_len)
    for start, end, delta in segments:
        positions[start:end] += delta
    return positions


def make_case(shape, segments, inv_freq, convention, dtype=torch.float64, seed=0):
    """(cached keys at positions 0..S-1, expected keys after the shift in float64)."""
    generator = torch.Generator().manual_seed(seed)
    pre = torch.randn(shape, generator=generator, dtype=torch.float64)
    seq_len = shape[-2]
    cached = rope_at(pre, torch.arange(seq_len), inv_freq, convention).to(dtype)
    expected = rope_at(pre, positions_after(seq_len, segments), inv_freq, convention)
    return cached, expected


def tolerance(dtype: torch.dtype) -> float:
    """Absolute tolerance for keys of unit scale: a few rounding steps of the dtype (float64: math error only)."""
    return 1e-10 if dtype == torch.float64 else 8 * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------
# Reference against the independent construction

SEGMENTS = [(3, 9, +5), (9, 20, -2), (25, 40, +1000)]


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("inv_freq_kind", ["default", "llama3"])
def test_shift_equals_rope_at_the_new_positions(convention, inv_freq_kind):
    inv_freq = default_inv_freq(64) if inv_freq_kind == "default" else llama3_inv_freq(64)
    shape = (2, 1, 3, 48, 64)  # layers, batch, kv_heads (GQA: 3 cached heads), seq, head_dim
    keys, expected = make_case(shape, SEGMENTS, inv_freq, convention)
    untouched = keys.clone()
    assert shift_keys_reference(keys, SEGMENTS, inv_freq, convention) is keys  # in place
    torch.testing.assert_close(keys, expected, atol=1e-10, rtol=0)
    # Tokens outside every segment are bit-identical.
    for start, end in [(0, 3), (20, 25), (40, 48)]:
        assert torch.equal(keys[..., start:end, :], untouched[..., start:end, :])


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_conventions_are_not_interchangeable(convention):
    # Guards the test itself: shifting with the wrong pairing must be visibly wrong.
    inv_freq = default_inv_freq(64)
    keys, expected = make_case((1, 1, 2, 16, 64), [(0, 16, 7)], inv_freq, convention)
    other = "interleaved" if convention == "half" else "half"
    shift_keys_reference(keys, [(0, 16, 7)], inv_freq, other)
    assert (keys - expected).abs().max() > 0.1


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reduced_precision_keys_stay_within_dtype_tolerance(convention, dtype):
    inv_freq = default_inv_freq(64)
    keys, expected = make_case((1, 2, 2, 64, 64), SEGMENTS, inv_freq, convention, dtype=dtype)
    shift_keys_reference(keys, SEGMENTS, inv_freq, convention)
    assert keys.dtype == dtype
    scale = expected.abs().max().item()
    torch.testing.assert_close(keys.to(torch.float64), expected, atol=tolerance(dtype) * scale, rtol=0)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_large_deltas_use_accurate_angles(convention):
    # 60000 positions at inv_freq 1 is a 60000 rad angle: in float32 it would be
    # off by up to ~5e-4 rad and so would every rotated key; float64 angles keep float32 keys exact.
    inv_freq = default_inv_freq(64, theta=10000.0)
    segments = [(0, 16, 60000), (16, 32, -45000)]
    keys, expected = make_case((1, 1, 1, 32, 64), segments, inv_freq, convention, dtype=torch.float32)
    shift_keys_reference(keys, segments, inv_freq, convention)
    scale = expected.abs().max().item()
    torch.testing.assert_close(keys.to(torch.float64), expected, atol=8 * torch.finfo(torch.float32).eps * scale, rtol=0)


def test_float32_angle_table_would_fail_the_large_delta_test():
    # The precision above is real: cos/sin of float32(60000 * inv_freq) miss by more than the tolerance.
    inv_freq = default_inv_freq(64, theta=10000.0)
    accurate_cos, _ = rotation_cos_sin([60000], inv_freq, dtype=torch.float64)
    naive_cos = torch.cos(torch.tensor(60000.0) * inv_freq.to(torch.float32))
    assert (accurate_cos[0] - naive_cos.double()).abs().max() > 100 * tolerance(torch.float32)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_shift_there_and_back_is_identity_and_shifts_compose(convention):
    inv_freq = llama3_inv_freq(32)
    keys, _ = make_case((3, 1, 2, 20, 32), [], inv_freq, convention)
    original = keys.clone()
    shift_keys_reference(keys, [(2, 12, 37)], inv_freq, convention)
    shift_keys_reference(keys, [(2, 12, -37)], inv_freq, convention)
    torch.testing.assert_close(keys, original, atol=1e-12, rtol=0)

    twice = original.clone()
    shift_keys_reference(twice, [(0, 20, 11)], inv_freq, convention)
    shift_keys_reference(twice, [(0, 20, -30)], inv_freq, convention)
    once = original.clone()
    shift_keys_reference(once, [(0, 20, -19)], inv_freq, convention)
    torch.testing.assert_close(twice, once, atol=1e-12, rtol=0)


def test_delta_zero_and_empty_segments_are_no_ops():
    inv_freq = default_inv_freq(64)
    keys, _ = make_case((2, 1, 3, 10, 64), [], inv_freq, "half", dtype=torch.float32)
    original = keys.clone()
    shift_keys_reference(keys, [(0, 10, 0), (4, 4, 9)], inv_freq, "half")
    shift_keys_reference(keys, [], inv_freq, "half")
    assert torch.equal(keys, original)


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_partial_rotary_leaves_the_position_free_dims_alone(convention):
    inv_freq = default_inv_freq(16)  # rotary_dim 16 of head_dim 64
    keys, expected = make_case((1, 1, 2, 12, 64), [(0, 12, 9)], inv_freq, convention)
    original = keys.clone()
    shift_keys_reference(keys, [(0, 12, 9)], inv_freq, convention)
    torch.testing.assert_close(keys, expected, atol=1e-10, rtol=0)
    assert torch.equal(keys[..., 16:], original[..., 16:])


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_per_layer_list_and_stacked_tensor_give_identical_results(convention):
    inv_freq = llama3_inv_freq(64)
    stacked, _ = make_case((4, 2, 3, 30, 64), [], inv_freq, convention, dtype=torch.float32)
    per_layer = [layer.clone() for layer in stacked]
    shift_keys_reference(stacked, SEGMENTS[:2], inv_freq, convention)
    returned = shift_keys_reference(per_layer, SEGMENTS[:2], inv_freq, convention)
    assert returned is per_layer
    for layer_index, layer_keys in enumerate(per_layer):
        assert torch.equal(layer_keys, stacked[layer_index])


def test_values_sharing_storage_with_keys_are_untouched():
    # A store may hold K and V of each layer side by side: [layers, 2, batch, heads, seq, dim].
    inv_freq = default_inv_freq(64)
    kv = torch.randn(3, 2, 1, 3, 16, 64)
    values_before = kv[:, 1].clone()
    keys = kv[:, 0]  # a strided view: layer stride spans the values too
    expected = keys.clone()
    shift_keys_reference(expected, [(2, 14, 5)], inv_freq, "half")
    shift_keys(keys, [(2, 14, 5)], inv_freq, "half")
    assert torch.equal(kv[:, 1], values_before)
    assert torch.equal(kv[:, 0], expected)


def test_inference_tensors_can_be_shifted():
    # Caches filled under torch.inference_mode() hold inference tensors, which refuse
    # in-place writes outside that mode; the executor must not have to care.
    inv_freq = default_inv_freq(64)
    with torch.inference_mode():
        keys = torch.randn(1, 1, 2, 8, 64)
    expected = keys.clone()
    shift_keys_reference(expected, [(0, 8, 3)], inv_freq, "half")
    shift_keys([keys[0]], [(0, 8, 3)], inv_freq, "half")
    assert torch.equal(keys, expected)


@pytest.mark.parametrize(
    "segments, message",
    [
        ([(0, 5, 1), (4, 8, 2)], "overlaps"),
        ([(0, 11, 1)], "outside"),
        ([(5, 3, 1)], "outside"),
    ],
)
def test_bad_segments_are_rejected(segments, message):
    keys = torch.zeros(1, 1, 1, 10, 8)
    with pytest.raises(AssertionError, match=message):
        shift_keys_reference(keys, segments, default_inv_freq(8), "half")


def test_bad_shapes_and_conventions_are_rejected():
    inv_freq = default_inv_freq(8)
    with pytest.raises(AssertionError, match="convention"):
        shift_keys_reference(torch.zeros(1, 1, 1, 4, 8), [(0, 4, 1)], inv_freq, "neox")
    with pytest.raises(AssertionError, match="stacked"):
        shift_keys_reference(torch.zeros(1, 1, 4, 8), [(0, 4, 1)], inv_freq, "half")
    with pytest.raises(AssertionError, match="head_dim"):
        shift_keys_reference(torch.zeros(1, 1, 1, 4, 4), [(0, 4, 1)], inv_freq, "half")
    with pytest.raises(AssertionError, match="same shape"):
        shift_keys_reference([torch.zeros(1, 1, 4, 8), torch.zeros(1, 1, 5, 8)], [(0, 4, 1)], inv_freq, "half")


# ---------------------------------------------------------------------------
# Dispatch


@pytest.fixture
def fresh_backend_choice():
    rope_shift.reset_backend_choice()
    yield
    rope_shift.reset_backend_choice()


def test_cpu_tensors_use_the_reference(fresh_backend_choice):
    assert selected_backend("cpu") == "reference"


def test_dispatcher_prefers_triton_on_cuda_and_obeys_the_env_var(fresh_backend_choice, monkeypatch):
    monkeypatch.setattr(rope_shift, "triton_available", lambda: True)
    monkeypatch.delenv(rope_shift.BACKEND_ENV_VAR, raising=False)
    assert selected_backend("cuda") == "triton"
    # Decided once: changing the variable later has no effect until reset.
    monkeypatch.setenv(rope_shift.BACKEND_ENV_VAR, "reference")
    assert selected_backend("cuda") == "triton"
    rope_shift.reset_backend_choice()
    assert selected_backend("cuda") == "reference"

    rope_shift.reset_backend_choice()
    monkeypatch.setattr(rope_shift, "triton_available", lambda: False)
    monkeypatch.delenv(rope_shift.BACKEND_ENV_VAR)
    assert selected_backend("cuda") == "reference"


def test_invalid_env_var_warns_and_falls_back_to_auto(fresh_backend_choice, monkeypatch):
    monkeypatch.setenv(rope_shift.BACKEND_ENV_VAR, "cuda-please")
    with pytest.warns(UserWarning, match="ROTARY_KERNELS"):
        assert selected_backend("cpu") == "reference"


def test_importing_kernels_does_not_import_triton():
    code = "import sys, rotary.kernels; sys.exit('triton' in sys.modules)"
    assert subprocess.run(python_command("-c", code)).returncode == 0


# ---------------------------------------------------------------------------
# Triton against the reference (a GPU, or Triton's interpreter on CPU tensors)


def _triton_device() -> str | None:
    if torch.cuda.is_available() and rope_shift.triton_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1" and rope_shift.triton_available():
        return "cpu"
    return None


TRITON_DEVICE = _triton_device()
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="needs CUDA and triton (or TRITON_INTERPRET=1 with triton)")


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("form", ["stacked", "per-layer"])
def test_triton_matches_reference(convention, dtype, form):
    inv_freq = llama3_inv_freq(64).to(torch.float32)
    segments = [(0, 5, -7), (5, 70, 3), (100, 230, 60000)]  # blocks partly filled, a segment over several blocks
    keys, _ = make_case((3, 2, 3, 256, 64), [], inv_freq, convention, dtype=dtype)
    keys = keys.to(TRITON_DEVICE)
    expected = keys.clone()
    shift_keys_reference(expected, segments, inv_freq, convention)
    target = keys if form == "stacked" else list(keys.unbind(0))
    shift_keys_triton(target, segments, inv_freq, convention)
    scale = expected.abs().max().item()
    # Both round the same float32 result once into `dtype`: at most an ulp or two apart.
    torch.testing.assert_close(keys.float(), expected.float(), atol=tolerance(dtype) * scale, rtol=0)


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_triton_strided_keys_partial_rotary_and_untouched_values(convention):
    inv_freq = default_inv_freq(24).to(torch.float32)  # rotary_dim 24 of 64: HALF=12 is not a power of two
    kv = torch.randn(4, 2, 1, 5, 100, 64, dtype=torch.float16).to(TRITON_DEVICE)  # [layers, K/V, batch, heads, seq, dim]
    values_before = kv[:, 1].clone()
    expected = kv[:, 0].clone()
    segments = [(1, 33, 4), (40, 100, -40)]
    shift_keys_reference(expected, segments, inv_freq, convention)
    shift_keys_triton(kv[:, 0], segments, inv_freq, convention, block_tokens=16)
    assert torch.equal(kv[:, 1], values_before)
    scale = expected.abs().max().item()
    torch.testing.assert_close(kv[:, 0].float(), expected.float(), atol=tolerance(torch.float16) * scale, rtol=0)
    assert torch.equal(kv[:, 0, ..., 24:], expected[..., 24:])


@pytest.mark.gpu
@needs_triton
def test_triton_leaves_tokens_outside_segments_bit_identical():
    inv_freq = default_inv_freq(64).to(torch.float32)
    keys = torch.randn(2, 1, 3, 130, 64, dtype=torch.bfloat16).to(TRITON_DEVICE)
    original = keys.clone()
    shift_keys_triton(keys, [(10, 75, 9), (75, 80, 0)], inv_freq, "half")
    assert torch.equal(keys[..., :10, :], original[..., :10, :])
    assert torch.equal(keys[..., 75:, :], original[..., 75:, :])
    assert not torch.equal(keys[..., 10:75, :], original[..., 10:75, :])


# ---------------------------------------------------------------------------
# End to end on the embedded model: PIE is exact in layer 0

@pytest.mark.model
def test_layer0_keys_after_edit_equal_a_full_recompute():
    """Layer-0 keys depend only on the token and its position, so PIE must reproduce them exactly there."""
    from rotary.cache.plan import plan_update
    from tests.conftest import reference_model

    model, tokenizer = reference_model()  # the session's plain transformers load of the embedded model
    old_text = "def area(width, height):\n    return width * height\n\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n"
    new_text = old_text.replace("def area(", "def rectangle_area(").replace("    return 2 *", "    # both sides\n    return 2 *")
    old_ids, new_ids = tokenizer(old_text)["input_ids"], tokenizer(new_text)["input_ids"]
    plan = plan_update(old_ids, new_ids)
    assert plan.tokens_rerotated > 0 and len(plan.encode_ranges()) == 2

    with torch.inference_mode():
        old_cache = model(torch.tensor([old_ids]), use_cache=True).past_key_values
        new_cache = model(torch.tensor([new_ids]), use_cache=True).past_key_values
    old_keys = [layer.keys for layer in old_cache.layers]  # [batch, kv_heads, seq, head_dim] each
    new_keys = [layer.keys for layer in new_cache.layers]
    shifts = [(s.old_start, s.old_end, s.delta) for s in plan.segments if s.is_reused and s.delta]  # rotate before moving
    shift_keys(old_keys, shifts, model.model.rotary_emb.inv_freq, "half")

    for segment in plan.segments:
        if not segment.is_reused:
            continue
        shifted = old_keys[0][..., segment.old_start : segment.old_end, :]
        recomputed = new_keys[0][..., segment.new_start : segment.new_end, :]
        torch.testing.assert_close(shifted, recomputed, atol=1e-4, rtol=1e-4)
        # Deeper layers are only approximately right (stale), but far closer than unrotated keys.
        if segment.delta != 0:
            last = len(old_keys) - 1
            shifted_deep = old_keys[last][..., segment.old_start : segment.old_end, :].flatten()
            recomputed_deep = new_keys[last][..., segment.new_start : segment.new_end, :].flatten()
            assert torch.nn.functional.cosine_similarity(shifted_deep, recomputed_deep, dim=0) > 0.9
