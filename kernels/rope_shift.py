"""Re-rotate cached RoPE keys when their tokens move (the "shift" of Positional Integrity Encoding).

RoPE stores rotated keys, k_p = R_p k. Rotations compose, R_delta R_p = R_(p+delta),
so a cached key whose token moved from position p to p + delta is fixed by one more
rotation by delta: no matmul, no attention, no model. Values are never touched
(RoPE does not act on V), and neither are the dimensions past the rotary ones
(partial rotary keeps them position-free).

Three pieces, as for every kernel in rotary.kernels:
- shift_keys_reference: plain torch, any device; the definition of correct.
- shift_keys_triton:    one Triton kernel for CUDA, in place; one launch covers all
                        layers when the keys are one stacked tensor.
- shift_keys:           the dispatcher; picks Triton for CUDA tensors when triton
                        imports, the reference otherwise, once per device type.
                        ROTARY_KERNELS=reference forces the reference.

Shapes. `keys` is either one stacked tensor [layers, batch, kv_heads, seq, head_dim]
or a sequence of per-layer tensors [batch, kv_heads, seq, head_dim] (Hugging Face
DynamicCache: `[layer.keys for layer in cache.layers]`). Grouped-query attention
needs nothing special: only the kv_heads that are cached get rotated.
`segments` are (start, end, delta) on the seq axis, each rotating [start, end) by
delta positions; they must not overlap (a token rotated twice is a planning bug).
`inv_freq` [rotary_dim / 2] are the model's rotary inverse frequencies *as used by
its forward pass* (after llama3 / linear / yarn rescaling: any per-pair frequency
works, because each pair rotates independently). Attention scaling factors (yarn's
mscale) multiply cos and sin at encode time and must not be applied again here.

Conventions. "half" (Hugging Face Llama's rotate_half): pair i is (i, i + R/2).
"interleaved" (GPT-J, Meta's original Llama): pair i is (2i, 2i + 1). Either way
pair i rotates by delta * inv_freq[i]:
    first'  = first * cos - second * sin
    second' = second * cos + first * sin

Precision. A delta of 10^4 tokens times inv_freq near 1 is an angle near 10^4 rad,
where a float32 angle is off by ~10^-3 rad. So angles and their cos/sin are computed
in float64 (one tiny [segments, R/2] table) and only then rounded to float32; the
rotation itself runs in float32 (float64 for float64 keys) and is stored in the
keys' dtype.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import Literal, Sequence, Union

import torch

Convention = Literal["half", "interleaved"]
CONVENTIONS = ("half", "interleaved")
KeySegment = tuple[int, int, int]  # (start, end, delta) on the seq axis
Keys = Union[torch.Tensor, Sequence[torch.Tensor]]

BACKEND_ENV_VAR = "ROTARY_KERNELS"  # "reference" forces the torch reference; "auto" (default) picks
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Tokens per Triton program: 64 tokens x 32 pairs keeps two [64, 32] fp32 tiles in
# registers with 4 warps, and a 4096-token segment is 64 programs per head.
DEFAULT_BLOCK_TOKENS = 64


# ---------------------------------------------------------------------------
# Shared checks and tables


def _check_inputs(
    keys: Keys, segments: Sequence[KeySegment], inv_freq: torch.Tensor, convention: str
) -> tuple[list[torch.Tensor], bool, list[KeySegment]]:
    """Validate the arguments once for every backend; return (layer tensors, stacked?, active segments).

    Active segments are those that change something (delta != 0, non-empty).
    """
    assert convention in CONVENTIONS, f"convention must be one of {CONVENTIONS}, got {convention!r}"
    if isinstance(keys, torch.Tensor):
        assert keys.dim() == 5, f"stacked keys must be [layers, batch, kv_heads, seq, head_dim], got {tuple(keys.shape)}"
        layers, stacked = [keys], True
    else:
        layers, stacked = list(keys), False
        assert layers, "no layers given"
        first = layers[0]
        for layer_keys in layers:
            assert isinstance(layer_keys, torch.Tensor)
            assert layer_keys.dim() == 4, f"per-layer keys must be [batch, kv_heads, seq, head_dim], got {tuple(layer_keys.shape)}"
            assert layer_keys.shape == first.shape, "all layers must have the same shape"
            assert layer_keys.dtype == first.dtype and layer_keys.device == first.device, "all layers must share dtype and device"
    sample = layers[0]
    assert sample.is_floating_point(), f"keys must be floating point, got {sample.dtype}"
    seq_len, head_dim = sample.shape[-2], sample.shape[-1]

    assert inv_freq.dim() == 1 and inv_freq.is_floating_point(), "inv_freq must be a 1-D float tensor [rotary_dim / 2]"
    rotary_dim = 2 * inv_freq.numel()
    assert 0 < rotary_dim <= head_dim, f"rotary dim {rotary_dim} (2 x len(inv_freq)) does not fit head_dim {head_dim}"

    active: list[KeySegment] = []
    previous_end = 0
    for segment in sorted((int(s), int(e), int(d)) for s, e, d in segments):
        start, end, delta = segment
        assert 0 <= start <= end <= seq_len, f"segment {segment} outside the cached sequence [0, {seq_len})"
        if end == start:
            continue  # an empty segment touches nothing, so it cannot overlap anything
        assert start >= previous_end, f"segment {segment} overlaps the one before it"
        previous_end = end
        if delta != 0:
            active.append(segment)
    return layers, stacked, active


def rotation_cos_sin(
    deltas: Sequence[int], inv_freq: torch.Tensor, *, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of delta * inv_freq, each [len(deltas), len(inv_freq)], computed in float64 then cast to `dtype`."""
    device = inv_freq.device if device is None else device
    deltas64 = torch.tensor(list(deltas), dtype=torch.float64, device=device)
    angles = deltas64[:, None] * inv_freq.to(device=device, dtype=torch.float64)[None, :]  # [segments, R/2]
    return torch.cos(angles).to(dtype).contiguous(), torch.sin(angles).to(dtype).contiguous()


# ---------------------------------------------------------------------------
# Reference


def _rotate_pairs_(block: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, convention: str) -> None:
    """Rotate the rotary pairs of `block` [..., tokens, head_dim] in place by (cos, sin) [R/2]."""
    half = cos.shape[-1]
    if convention == "half":
        first, second = block[..., :half], block[..., half : 2 * half]
    else:
        first, second = block[..., 0 : 2 * half : 2], block[..., 1 : 2 * half : 2]
    x1, x2 = first.to(cos.dtype), second.to(cos.dtype)
    # Both results exist before either view is written: x1/x2 may alias the views.
    rotated_first = x1 * cos - x2 * sin
    rotated_second = x2 * cos + x1 * sin
    first.copy_(rotated_first)
    second.copy_(rotated_second)


def shift_keys_reference(
    keys: Keys, segments: Sequence[KeySegment], inv_freq: torch.Tensor, convention: Convention = "half"
) -> Keys:
    """Rotate keys[..., start:end, :] by delta positions for each (start, end, delta), in place; returns `keys`."""
    layers, _, active = _check_inputs(keys, segments, inv_freq, convention)
    if not active:
        return keys
    sample = layers[0]
    math_dtype = torch.float64 if sample.dtype == torch.float64 else torch.float32
    cos, sin = rotation_cos_sin([d for _, _, d in active], inv_freq, dtype=math_dtype, device=sample.device)
    # inference_mode: caches built under inference_mode hold inference tensors,
    # which refuse in-place writes outside it; normal tensors accept writes inside it.
    with torch.inference_mode():
        for layer_keys in layers:
            for index, (start, end, _) in enumerate(active):
                _rotate_pairs_(layer_keys[..., start:end, :], cos[index], sin[index], convention)
    return keys


# ---------------------------------------------------------------------------
# Triton

# Bound on first use by _triton_kernel(); None until then so importing this module
# never imports triton (CPU machines have none).
triton = None
tl = None


def triton_available() -> bool:
    """Whether triton imports here (decided once; CPU-only machines have no triton)."""
    return _triton_imports()


@functools.lru_cache(maxsize=None)
def _triton_imports() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install raising anything else
        return False
    return True


def _triton_interpreting() -> bool:
    """TRITON_INTERPRET=1 runs kernels on CPU tensors in Triton's interpreter (how this kernel is checked without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and triton_available()


@functools.lru_cache(maxsize=None)
def _triton_kernel():
    """Import triton and define the kernel on first use, so importing this module never needs triton."""
    # Bound as module globals (not closure cells) so the JIT resolves `tl` like
    # any kernel written at module level, whatever the triton version.
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def rope_shift_kernel(
        keys_ptr,  # keys, [layers, batch, kv_heads, seq, head_dim], last dim contiguous
        cos_ptr,  # float32 [segments, HALF]
        sin_ptr,  # float32 [segments, HALF]
        blocks_ptr,  # int32 [blocks, 3]: (segment index, first token, end token), end - first <= BLOCK_T
        rows,  # layers * batch * kv_heads
        batch,
        kv_heads,
        stride_layer,
        stride_batch,
        stride_head,
        stride_token,
        HALF: tl.constexpr,  # rotary pairs per head = len(inv_freq)
        BLOCK_HALF: tl.constexpr,  # HALF rounded up to a power of two
        BLOCK_T: tl.constexpr,
        INTERLEAVED: tl.constexpr,
    ):
        # One program per (block of tokens, layer x batch x head row). Rows vary
        # fastest, so programs running together share one block-table entry and
        # one cos/sin row.
        pid = tl.program_id(0)
        row = pid % rows
        block = pid // rows
        head = row % kv_heads
        batch_index = (row // kv_heads) % batch
        layer = row // (kv_heads * batch)

        segment = tl.load(blocks_ptr + block * 3)
        token_start = tl.load(blocks_ptr + block * 3 + 1)
        token_end = tl.load(blocks_ptr + block * 3 + 2)

        pairs = tl.arange(0, BLOCK_HALF)
        pair_mask = pairs < HALF
        # Every token of a block belongs to one segment: one cos/sin row for all.
        cos = tl.load(cos_ptr + segment * HALF + pairs, mask=pair_mask, other=1.0)
        sin = tl.load(sin_ptr + segment * HALF + pairs, mask=pair_mask, other=0.0)

        tokens = token_start + tl.arange(0, BLOCK_T)
        mask = (tokens < token_end)[:, None] & pair_mask[None, :]
        # int64 offsets: a long cache of a large model exceeds 2^31 elements.
        base = (
            keys_ptr
            + layer.to(tl.int64) * stride_layer
            + batch_index.to(tl.int64) * stride_batch
            + head.to(tl.int64) * stride_head
        )
        token_offsets = tokens.to(tl.int64)[:, None] * stride_token
        if INTERLEAVED:
            first_cols = 2 * pairs
            second_cols = 2 * pairs + 1
        else:
            first_cols = pairs
            second_cols = pairs + HALF
        first_ptrs = base + token_offsets + first_cols[None, :]
        second_ptrs = base + token_offsets + second_cols[None, :]

        x1 = tl.load(first_ptrs, mask=mask, other=0.0).to(tl.float32)  # [BLOCK_T, BLOCK_HALF]
        x2 = tl.load(second_ptrs, mask=mask, other=0.0).to(tl.float32)
        rotated_first = x1 * cos[None, :] - x2 * sin[None, :]
        rotated_second = x2 * cos[None, :] + x1 * sin[None, :]
        tl.store(first_ptrs, rotated_first.to(keys_ptr.dtype.element_ty), mask=mask)
        tl.store(second_ptrs, rotated_second.to(keys_ptr.dtype.element_ty), mask=mask)

    return rope_shift_kernel


def _block_table(active: Sequence[KeySegment], block_tokens: int, device: torch.device) -> torch.Tensor:
    """Split segments into blocks of at most `block_tokens` tokens: int32 [blocks, 3] of (segment, start, end)."""
    rows = [
        (index, first, min(first + block_tokens, end))
        for index, (start, end, _) in enumerate(active)
        for first in range(start, end, block_tokens)
    ]
    return torch.tensor(rows, dtype=torch.int32).to(device)


def shift_keys_triton(
    keys: Keys,
    segments: Sequence[KeySegment],
    inv_freq: torch.Tensor,
    convention: Convention = "half",
    *,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
) -> Keys:
    """Same contract as shift_keys_reference, on CUDA tensors, in one launch per stacked tensor (or per layer)."""
    layers, stacked, active = _check_inputs(keys, segments, inv_freq, convention)
    sample = layers[0]
    assert sample.is_cuda or _triton_interpreting(), "the Triton kernel needs CUDA tensors"
    assert sample.dtype in TRITON_DTYPES, f"Triton kernel supports {TRITON_DTYPES}, got {sample.dtype}"
    assert block_tokens > 0 and block_tokens & (block_tokens - 1) == 0, "block_tokens must be a power of two"
    for layer_keys in layers:
        assert layer_keys.stride(-1) == 1, "head_dim must be contiguous"
    if not active:
        return keys

    kernel = _triton_kernel()
    half = inv_freq.numel()
    cos, sin = rotation_cos_sin([d for _, _, d in active], inv_freq, dtype=torch.float32, device=sample.device)
    blocks = _block_table(active, block_tokens, sample.device)

    # A stacked tensor is one launch; per-layer tensors are the same kernel with one layer each.
    launches = [keys] if stacked else [layer_keys.unsqueeze(0) for layer_keys in layers]
    for tensor in launches:
        num_layers, batch, kv_heads = tensor.shape[0], tensor.shape[1], tensor.shape[2]
        rows = num_layers * batch * kv_heads
        if rows == 0:
            continue
        grid = (rows * blocks.shape[0],)
        assert grid[0] < 2**31, "too many programs for one launch: raise block_tokens"
        # Launch on the tensor's own GPU, not whichever is current.
        with torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext():
            kernel[grid](
                tensor,
                cos,
                sin,
                blocks,
                rows,
                batch,
                kv_heads,
                tensor.stride(0),
                tensor.stride(1),
                tensor.stride(2),
                tensor.stride(3),
                HALF=half,
                BLOCK_HALF=1 << (half - 1).bit_length(),
                BLOCK_T=block_tokens,
                INTERLEAVED=convention == "interleaved",
            )
    return keys


# ---------------------------------------------------------------------------
# Dispatch


@functools.lru_cache(maxsize=None)
def _backend_for(device_type: str) -> str:
    requested = os.environ.get(BACKEND_ENV_VAR, "auto").strip().lower() or "auto"
    if requested not in ("auto", "reference"):
        # A bad setting must not break completion: warn and behave as "auto".
        warnings.warn(f"{BACKEND_ENV_VAR}={requested!r} is not 'auto' or 'reference'; using 'auto'", stacklevel=3)
        requested = "auto"
    if requested == "reference" or device_type != "cuda" or not triton_available():
        return "reference"
    return "triton"


def selected_backend(device: torch.device | str) -> str:
    """'triton' or 'reference': what shift_keys uses for tensors on `device` (decided once per device type)."""
    return _backend_for(torch.device(device).type)


def reset_backend_choice() -> None:
    """Forget the cached choice (tests, or after changing ROTARY_KERNELS)."""
    _backend_for.cache_clear()
    _triton_imports.cache_clear()


def shift_keys(
    keys: Keys, segments: Sequence[KeySegment], inv_freq: torch.Tensor, convention: Convention = "half"
) -> Keys:
    """Rotate cached keys in place so that tokens moved by `delta` carry RoPE for their new positions.

    keys: stacked [layers, batch, kv_heads, seq, head_dim] or a list of [batch, kv_heads, seq, head_dim];
    segments: (start, end, delta) on the seq axis; inv_freq: [rotary_dim / 2]. Returns `keys`.
    """
    sample = keys if isinstance(keys, torch.Tensor) else keys[0]
    if selected_backend(sample.device) == "triton":
        return shift_keys_triton(keys, segments, inv_freq, convention)
    return shift_keys_reference(keys, segments, inv_freq, convention)
