#!/usr/bin/env python
"""Standalone GPU check of the RoPE key shift: correctness PASS/FAIL lines, then a timing table.

Run from the repository root on a CUDA machine with torch and triton:

    python tests/kernels/gpu_check.py            # exits 0 only if every check passed

No pytest needed. Works whether or not the rotary package is installed (it then
loads kernels/rope_shift.py by path). Without CUDA it fails, unless
TRITON_INTERPRET=1 is set: then it runs the same checks on small CPU tensors
through Triton's interpreter and skips the timing (how the kernel was checked on
a machine without a GPU).

The timed cache is the embedded model's: 30 layers, 3 KV heads, head_dim 64,
4096 tokens, batch 1; the shifted segment is everything after an edit near the start.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def load_rope_shift():
    try:
        from rotary.kernels import rope_shift

        return rope_shift
    except ImportError:
        spec = importlib.util.spec_from_file_location("rope_shift", REPO_ROOT / "kernels" / "rope_shift.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


rope_shift = load_rope_shift()

CONVENTIONS = ("half", "interleaved")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
failures: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}{('  ' + detail) if detail else ''}", flush=True)
    if not ok:
        failures.append(name)


def default_inv_freq(rotary_dim: int, theta: float = 100000.0) -> torch.Tensor:
    return (1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)).to(torch.float32)


def rope_at(pre: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, convention: str) -> torch.Tensor:
    """Independent RoPE in float64 via complex numbers: rotate pre-RoPE keys [..., seq, D] to `positions`."""
    pre = pre.to(torch.float64)
    half = inv_freq.numel()
    angles = positions.to(torch.float64)[:, None] * inv_freq.to(pre.device, torch.float64)[None, :]
    turn = torch.polar(torch.ones_like(angles), angles)
    if convention == "half":
        pairs = torch.complex(pre[..., :half], pre[..., half : 2 * half]) * turn
        rotated = torch.cat([pairs.real, pairs.imag], dim=-1)
    else:
        pairs = torch.view_as_complex(pre[..., : 2 * half].reshape(*pre.shape[:-1], half, 2).contiguous()) * turn
        rotated = torch.view_as_real(pairs).flatten(-2)
    return torch.cat([rotated, pre[..., 2 * half :]], dim=-1)


def tolerance(dtype: torch.dtype, scale: float) -> float:
    return 8 * torch.finfo(dtype).eps * scale


def max_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.double() - expected.double()).abs().max().item()


def check_correctness(device: str, seq_len: int, num_layers: int) -> None:
    generator = torch.Generator().manual_seed(0)
    shape = (num_layers, 1, 3, seq_len, 64)
    inv_freq = default_inv_freq(64)
    # A keep-less plan: two shifted segments and one far shift, with ragged block edges.
    segments = [(3, seq_len // 3, +7), (seq_len // 3 + 5, seq_len - 9, -13), (seq_len - 9, seq_len, 50000)]
    positions = torch.arange(seq_len)
    for start, end, delta in segments:
        positions[start:end] += delta
    pre = torch.randn(shape, generator=generator, dtype=torch.float64)

    for convention in CONVENTIONS:
        cached64 = rope_at(pre, torch.arange(seq_len), inv_freq, convention)
        truth = rope_at(pre, positions, inv_freq, convention).to(device)
        scale = truth.abs().max().item()
        for dtype in DTYPES:
            keys = cached64.to(device=device, dtype=dtype)
            reference = keys.clone()
            rope_shift.shift_keys_reference(reference, segments, inv_freq, convention)
            for form in ("stacked", "per-layer"):
                triton_keys = keys.clone()
                target = triton_keys if form == "stacked" else list(triton_keys.unbind(0))
                rope_shift.shift_keys_triton(target, segments, inv_freq, convention)
                if device == "cuda":
                    torch.cuda.synchronize()
                name = f"triton {form:9s} {convention:11s} {str(dtype):14s}"
                vs_reference = max_error(triton_keys, reference)
                vs_truth = max_error(triton_keys, truth)
                ok = vs_reference <= tolerance(dtype, scale) and vs_truth <= 2 * tolerance(dtype, scale)
                report(name, ok, f"max|triton-ref|={vs_reference:.2e} max|triton-rope(p+d)|={vs_truth:.2e}")

    # Keys as a strided view of a K/V store: values must come back bit-identical.
    kv = torch.randn(num_layers, 2, 1, 3, seq_len, 64, generator=generator).to(device=device, dtype=torch.bfloat16)
    values_before = kv[:, 1].clone()
    untouched_tokens = kv[:, 0, ..., :3, :].clone()
    rope_shift.shift_keys_triton(kv[:, 0], segments, inv_freq, "half")
    report("values and unshifted tokens untouched (strided K/V layout)",
           torch.equal(kv[:, 1], values_before) and torch.equal(kv[:, 0, ..., :3, :], untouched_tokens))

    if device == "cuda":
        rope_shift.reset_backend_choice()
        expected = "reference" if os.environ.get(rope_shift.BACKEND_ENV_VAR, "") == "reference" else "triton"
        report(f"dispatcher picks {expected} for CUDA tensors", rope_shift.selected_backend("cuda") == expected)


def time_ms(fn, iterations: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end))
    samples.sort()
    return samples[len(samples) // 2]


def timing_table() -> None:
    num_layers, kv_heads, seq_len, head_dim = 30, 3, 4096, 64
    inv_freq = default_inv_freq(head_dim)
    segments = [(100, seq_len, +5)]  # an insertion near the top: the whole suffix re-rotates
    rotated = seq_len - 100
    print()
    print(f"timing: keys [{num_layers}, 1, {kv_heads}, {seq_len}, {head_dim}], {rotated} tokens shifted, median of 20")
    print(f"{'dtype':16s}{'backend':22s}{'ms':>10s}{'GB/s':>10s}{'speedup':>10s}")
    for dtype in DTYPES:
        keys = torch.randn(num_layers, 1, kv_heads, seq_len, head_dim, device="cuda", dtype=dtype)
        per_layer = list(keys.unbind(0))
        moved_bytes = 2 * num_layers * kv_heads * rotated * head_dim * keys.element_size()  # read + write
        runs = [
            ("reference stacked", lambda: rope_shift.shift_keys_reference(keys, segments, inv_freq, "half")),
            ("reference per-layer", lambda: rope_shift.shift_keys_reference(per_layer, segments, inv_freq, "half")),
            ("triton stacked", lambda: rope_shift.shift_keys_triton(keys, segments, inv_freq, "half")),
            ("triton per-layer", lambda: rope_shift.shift_keys_triton(per_layer, segments, inv_freq, "half")),
            ("triton interleaved", lambda: rope_shift.shift_keys_triton(keys, segments, inv_freq, "interleaved")),
        ]
        baseline = None
        for name, fn in runs:
            ms = time_ms(fn)
            baseline = baseline or ms
            print(f"{str(dtype):16s}{name:22s}{ms:10.3f}{moved_bytes / ms / 1e6:10.1f}{baseline / ms:9.1f}x")


def main() -> int:
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    print(f"torch {torch.__version__}", end="")
    if not rope_shift.triton_available():
        print()
        report("triton imports", False)
        return 1
    import triton

    print(f", triton {triton.__version__}", end="")
    if torch.cuda.is_available():
        print(f", {torch.cuda.get_device_name()}")
        started = time.perf_counter()
        check_correctness("cuda", seq_len=4096, num_layers=30)
        print(f"(correctness checks took {time.perf_counter() - started:.1f} s, Triton compiles included)")
        timing_table()
    elif interpreting:
        print(", Triton interpreter on CPU (no timing)")
        check_correctness("cpu", seq_len=200, num_layers=2)
    else:
        print()
        report("CUDA available", False, "run on a GPU machine, or set TRITON_INTERPRET=1 for a CPU dry run")
        return 1
    print()
    print(f"{'ALL PASSED' if not failures else f'{len(failures)} FAILED'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
